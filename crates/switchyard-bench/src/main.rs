//! `switchyard-bench`: compare routers on a simulated fleet, or simulate a fleet in virtual time.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard_bench::compare::{self, CompareArgs, Results, Run};
use switchyard_bench::des::{self, SimWorker};
use switchyard_bench::metrics::{percentile, Summary};
use switchyard_bench::scenario::Scenario;
use switchyard_bench::{policy_spec, report};

#[derive(Debug, Parser)]
#[command(name = "switchyard-bench", version, about = "Routing-quality benchmarks for Switchyard and its peers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every router and policy on the same fleet and workload, one after another.
    Compare(CompareArgs),
    /// Discrete-event simulation: the scenario's workload on a (large) virtual fleet.
    Des(DesArgs),
    /// A worker streaming SSE on a fixed schedule (for time-to-first-byte overhead).
    StreamWorker(switchyard_bench::ttfb::StreamWorkerArgs),
    /// Time to the first body chunk of streamed requests, p50/p90/p99.
    Ttfb(switchyard_bench::ttfb::TtfbArgs),
    /// The router-vs-router table over several results.json files (optionally spliced into a
    /// document between `<!-- results:begin -->` and `<!-- results:end -->`).
    Table(TableArgs),
}

#[derive(Debug, clap::Args)]
struct TableArgs {
    /// results.json files, in the order the table lists them.
    #[arg(long, num_args = 1.., required = true)]
    results: Vec<String>,
    /// A markdown file to update in place (between the markers); else the table is printed.
    #[arg(long)]
    splice_into: Option<String>,
}

fn run_table(a: &TableArgs) -> Result<(), String> {
    let all = a
        .results
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read {p}: {e}"))?;
            serde_json::from_str::<Results>(&text).map_err(|e| format!("{p}: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let table = report::public_table(&all);
    match &a.splice_into {
        None => print!("{table}"),
        Some(path) => {
            let doc = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            std::fs::write(path, report::splice(&doc, &table)?).map_err(|e| format!("cannot write {path}: {e}"))?;
            eprintln!("updated the table in {path}");
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
struct DesArgs {
    /// Scenario file.
    #[arg(long)]
    scenario: String,
    /// Policies, comma separated: a switchyard policy name, optionally
    /// `/objective/estimator/overload`, `/dN` (score N sampled workers), `/hmX` (holder margin X)
    /// or `/others` (count other routers' requests), e.g. `marginal_utility/latency`.
    #[arg(long, value_delimiter = ',', default_value = "marginal_utility")]
    policy: Vec<String>,
    /// Workers (the scenario's fleet repeated); default: the scenario's fleet.
    #[arg(long)]
    workers: Option<usize>,
    /// Requests per load level.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Load levels as fractions of capacity, comma separated (default: the scenario's).
    #[arg(long, value_delimiter = ',')]
    load: Vec<f64>,
    /// Router replicas, each seeing 1/R of the traffic with its own view.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// What the routers know of the engines' caches: text (the default router's prefix tree),
    /// tokens (with --tokenizer-path), events (with the engines' KV events as well).
    #[arg(long, value_enum, default_value_t = des::CacheView::Text)]
    cache_view: des::CacheView,
    /// Seed of the policies' own random choices (ties, exploration, sampling); default: the
    /// scenario's seed. The workload and the engines keep the scenario's, so a sweep over it
    /// shows how much of a result is the policy's luck: past the knee a different stream of
    /// tie-breaks can move goodput by a tenth.
    #[arg(long)]
    policy_seed: Option<u64>,
    /// The scenario fleet's knee (req/s), as an earlier run printed it (its `--knee ...`, every
    /// digit: past the knee a rate rounded to 0.01 req/s is another arrival sequence, and a
    /// cell can move by a fifth): skips the bisection, seconds to a minute a run. The knee
    /// depends only on the scenario, so a sweep over policies, policy seeds or replicas needs
    /// it found once.
    #[arg(long, value_parser = positive_rate)]
    knee: Option<f64>,
    /// Instead of running levels: bisect the knee on this many Poisson arrival samples (the
    /// one load 1.0 is defined on, then the levels' own, then others), print each and their
    /// spread, and stop. How far the knee moves between samples is how sharp "load 1.0" is.
    #[arg(long, conflicts_with = "knee", value_parser = clap::value_parser!(u64).range(2..=50))]
    knee_samples: Option<u64>,
    /// Directory for results.json, results.md and <scenario>.svg (same format as `compare`).
    #[arg(long)]
    out: Option<String>,
    /// Also write every request of every run to `<out>/requests-<policy>-<load>.csv` (sent,
    /// worker, tokens, TTFT, TPOT, whether within the SLOs, the policy's predicted TTFT and its
    /// reason); `bench/timeline.py` reads it.
    #[arg(long, requires = "out")]
    per_request: bool,
}

/// `des --knee-samples`: the knee over `n` arrival samples.
fn print_knee_samples(s: &Scenario, n: usize) -> Result<(), String> {
    let trace = s.workload.trace().map_err(|e| e.to_string())?;
    let (ceiling, _) = des::scenario_capacity(s, trace.as_deref());
    let knees: Vec<f64> = des::knee_sample_seeds(s, n)
        .into_iter()
        .map(|seed| des::knee_on_sample(s, trace.as_deref(), ceiling, seed).rate)
        .collect();
    let mut sorted = knees.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let at_knee = |k: f64| format!("{k:.2} ({:+.1} %)", (k / knees[0] - 1.0) * 100.0);
    println!("{}: the knee over {n} Poisson arrival samples, req/s (against load 1.0's)", s.name);
    println!("  load 1.0's sample  {:.2}", knees[0]);
    println!("  the levels' own    {}", at_knee(knees[1]));
    for (i, k) in knees.iter().enumerate().skip(2) {
        println!("  sample {i:<10} {}", at_knee(*k));
    }
    println!("  min {} · median {} · max {}", at_knee(sorted[0]), at_knee(median), at_knee(sorted[sorted.len() - 1]));
    Ok(())
}

/// A `--knee`: a finite rate above zero.
fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("`{s}` is not a rate in requests per second above zero")),
    }
}

fn run_des(a: &DesArgs) -> Result<(), String> {
    let s = Scenario::load(&a.scenario).map_err(|e| e.to_string())?;
    if let Some(n) = a.knee_samples {
        return print_knee_samples(&s, n as usize);
    }
    let fleet_size = s.workers().len();
    let workers = SimWorker::from_scenario(&s, a.workers);
    let trace = s.workload.trace().map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let scale = workers.len() as f64 / fleet_size as f64;
    // The knee, and the closed-loop ceiling where the bisection ran (it starts from it).
    let (knee, ceiling) = match a.knee {
        Some(rate) => {
            eprintln!(
                "load 1.0 = {:.2} req/s ({} workers; the scenario fleet's knee {rate:.2} req/s, given)",
                rate * scale,
                workers.len()
            );
            (rate, None)
        }
        None => {
            let knee = des::scenario_knee(&s, trace.as_deref());
            eprintln!(
                "load 1.0 = {:.2} req/s ({} workers; the scenario fleet's knee {:.2} req/s (`--knee {}`), found in {} DES runs, {:.1} s; its closed-loop ceiling {:.2})",
                knee.rate * scale,
                workers.len(),
                knee.rate,
                knee.rate,
                knee.evaluations,
                started.elapsed().as_secs_f64(),
                knee.ceiling
            );
            (knee.rate, Some(knee.ceiling))
        }
    };
    let capacity = knee * scale;
    if matches!(s.arrival, switchyard_bench::workload::Arrival::Trace) && trace.is_some() {
        // Trace-timed levels replay the trace's own timestamps, scaled to each level's mean
        // rate; past the window the knee was found on they can hold bursts no routing absorbs
        // (Mooncake: load_based's p99 TTFT ~400 s over 20,000 requests even at 0.02 req/s).
        let knee_window = s.capacity.requests.max((knee * des::KNEE_WINDOW_SECS) as usize);
        if a.requests > 2 * knee_window {
            eprintln!(
                "warning: {} requests per level replay the trace well past the {knee_window} its knee was found on; its bursts may saturate every policy (the scenario's steady window is {})",
                a.requests, s.requests
            );
        }
        if let Some(c) = des::trace_compression(&s, capacity, trace.as_deref()) {
            eprintln!("the trace's timeline plays {c:.1}× faster than recorded at load 1.0");
        }
    }
    let loads = if a.load.is_empty() { s.loads.clone() } else { a.load.clone() };
    let mut results = Results::new(&s, capacity);
    results.capacity_method = match ceiling {
        Some(_) => des::KNEE_METHOD.to_owned(),
        None => format!("knee given (`--knee`), as found before: {}", des::KNEE_METHOD),
    };
    results.ceiling_rps = ceiling.map(|c| c * scale);
    for spec in &a.policy {
        let policy = policy_spec::parse(spec, &s.slo, 1.0, a.policy_seed.unwrap_or(s.seed))?;
        for &load in &loads {
            let specs = s.workload.requests(s.arrival, load * capacity, a.requests, s.seed, 0, trace.as_deref());
            let started = std::time::Instant::now();
            let ceiling = switchyard_bench::workload::hit_ceiling(&specs, 16);
            let report =
                des::run_open_with(&workers, &policy, a.replicas, s.seed, specs, s.fault.as_ref(), a.cache_view);
            let wall = started.elapsed().as_secs_f64();
            let summary = Summary::of(&report.results, &s.slo, workers.len());
            let mut ns = report.decision_ns.clone();
            let (p50, p99) = (percentile(&mut ns, 0.5), percentile(&mut ns, 0.99));
            println!(
                "{} {spec} [{:?} x{}] load {load:.2}: goodput {:.2} req/s, throughput {:.2} req/s and {:.0} tok/s over {:.0} s to the last completion, TTFT p50/p99 {:.0}/{:.0} ms, TPOT p50/p99 {:.1}/{:.1} ms, hit {:.2} (ceiling {ceiling:.2}), errors {}, shed {}, decision p50/p99 {:.0}/{:.0} ns, {:.1} s wall",
                s.name, a.cache_view, a.replicas, summary.goodput_rps, summary.throughput_rps, summary.output_tok_s, summary.duration_s, summary.ttft_p50_ms,
                summary.ttft_p99_ms, summary.tpot_p50_ms, summary.tpot_p99_ms, summary.cache_hit_rate, summary.errors,
                report.shed, p50, p99, wall
            );
            if std::env::var_os("SWITCHYARD_DES_DEBUG").is_some() {
                eprintln!("{}", serde_json::to_string_pretty(&report.policy_state).unwrap_or_default());
            }
            if let (true, Some(dir)) = (a.per_request, &a.out) {
                std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
                let path = std::path::Path::new(dir).join(report::requests_file(spec, load));
                std::fs::write(&path, report::requests_csv(&report.results, &s.slo))
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            if workers.len() <= 16 {
                let share: Vec<String> = summary.worker_share.iter().map(|s| format!("{s:.2}")).collect();
                println!("  worker share: {}", share.join(" "));
            }
            let mut run = Run::new("switchyard", spec, &s.name, load, &summary);
            if workers.len() > 16 {
                run.worker_share.clear();
            }
            results.runs.push(run);
        }
    }
    if let Some(dir) = &a.out {
        let md = report::write(
            std::path::Path::new(dir),
            &results,
            &format!("switchyard-bench des --scenario {}", a.scenario),
        )?;
        println!("{md}");
    }
    Ok(())
}

fn block_on(f: impl std::future::Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?.block_on(f)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Des(a) => run_des(a),
        Command::Compare(a) => compare::run(a),
        Command::StreamWorker(a) => block_on(switchyard_bench::ttfb::stream_worker(a)),
        Command::Ttfb(a) => block_on(switchyard_bench::ttfb::ttfb(a)),
        Command::Table(a) => run_table(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
