//! `switchyard-bench compare`: every router under test against a fresh simulated fleet, the
//! same seeded workload at each load level, one after another in one run.
//!
//! The fleet (`switchyard-sim`) and each router run as their own processes, peers included,
//! so every router gets the same treatment. Capacity is measured first: closed loop through
//! switchyard with least-in-flight routing (`load_based`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::{run_closed_loop, run_open_loop, LoadClient};
use crate::metrics::Summary;
use crate::report;
use crate::scenario::Scenario;

/// Arguments of `compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Scenario file.
    #[arg(long)]
    pub scenario: String,
    /// Routers under test, comma separated: `switchyard:POLICY[/objective...][+tokens|+events]`,
    /// `sglang-router:POLICY`, `vllm-router:POLICY`. Default: every switchyard policy,
    /// sglang-router's and vllm-router's cache_aware. `+tokens`: switchyard tokenizes prompts
    /// (`--tokenizer-path`) and keeps a token tree; `+events`: it also follows the workers' KV
    /// events (the exact view). Both need a tokenizer (`--tokenizer-path` or `--workload-tokenizer`).
    #[arg(long, value_delimiter = ',')]
    pub routers: Vec<String>,
    /// Output directory (results.json, results.md, <scenario>.svg).
    #[arg(long, default_value = "bench-results")]
    pub out: String,
    /// Python virtual environment with sglang-router and vllm-router (else `$PEERS_VENV`).
    #[arg(long)]
    pub peers_venv: Option<String>,
    /// Override the scenario's requests per load level.
    #[arg(long)]
    pub requests: Option<usize>,
    /// Override the scenario's load levels (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub loads: Vec<f64>,
    /// Override the scenario's time scale.
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// Use this capacity (req/s, simulated time) instead of measuring it.
    #[arg(long)]
    pub capacity: Option<f64>,
    /// Measure capacity live (closed loop through switchyard load_based at the scenario's
    /// `capacity.concurrency_per_worker`) instead of in the discrete-event simulation.
    #[arg(long)]
    pub live_capacity: bool,
    /// Run each router as this many replicas, request i going to replica i mod N (as the
    /// discrete-event simulation's `--replicas` does).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub replicas: u16,
    /// The workers tokenize with this tokenizer (a model directory or tokenizer.json), and so
    /// do switchyard routers with `+tokens`/`+events`.
    #[arg(long, conflicts_with = "workload_tokenizer")]
    pub tokenizer_path: Option<String>,
    /// Like `--tokenizer-path` with an HF tokenizer written for the workload: one token per
    /// word of the generated prompts, so token counts stay the scenario's.
    #[arg(long)]
    pub workload_tokenizer: bool,
}

/// Every switchyard policy, then the peers' defaults.
pub const DEFAULT_ROUTERS: [&str; 9] = [
    "switchyard:random",
    "switchyard:round_robin",
    "switchyard:power_of_two",
    "switchyard:load_based",
    "switchyard:cache_aware",
    "switchyard:consistent_hash",
    "switchyard:marginal_utility",
    "sglang-router:cache_aware",
    "vllm-router:cache_aware",
];

/// One router at one load.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Run {
    /// `switchyard`, `sglang-router` or `vllm-router`.
    pub router: String,
    /// Policy spec.
    pub policy: String,
    /// Router replicas sharing the traffic.
    #[serde(default = "one")]
    pub replicas: u16,
    /// Scenario name.
    pub scenario: String,
    /// Fraction of capacity.
    pub load: f64,
    /// Requests within both SLOs per second (simulated time).
    pub goodput_rps: f64,
    /// Successful requests per second.
    pub throughput_rps: f64,
    /// Output tokens per second.
    pub output_tok_s: f64,
    /// TTFT p50 (ms).
    pub ttft_p50_ms: f64,
    /// TTFT p99 (ms).
    pub ttft_p99_ms: f64,
    /// TPOT p50 (ms).
    pub tpot_p50_ms: f64,
    /// TPOT p99 (ms).
    pub tpot_p99_ms: f64,
    /// E2E p99 (ms).
    pub e2e_p99_ms: f64,
    /// Cached / prompt tokens.
    pub cache_hit_rate: f64,
    /// Failed requests.
    pub errors: usize,
    /// Failed requests by kind (`metrics::error_kind`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub error_kinds: std::collections::BTreeMap<String, usize>,
    /// Share of requests within both SLOs.
    pub slo_attainment: f64,
    /// Requests per worker (from the workers' own counters).
    pub worker_share: Vec<f64>,
}

impl Results {
    /// No runs yet, for scenario `s` at `capacity`.
    pub fn new(s: &Scenario, capacity: f64) -> Self {
        Self {
            capacity_rps: capacity,
            capacity_method: String::new(),
            ceiling_rps: None,
            scenario: s.name.clone(),
            slo_ttft_ms: s.slo.ttft_ms,
            slo_tpot_ms: s.slo.tpot_ms,
            skipped: Vec::new(),
            runs: Vec::new(),
        }
    }
}

fn one() -> u16 {
    1
}

impl Run {
    /// The run's row from a summary.
    pub fn new(router: &str, policy: &str, scenario: &str, load: f64, s: &Summary) -> Self {
        Self {
            router: router.into(),
            policy: policy.into(),
            replicas: 1,
            scenario: scenario.into(),
            load,
            goodput_rps: s.goodput_rps,
            throughput_rps: s.throughput_rps,
            output_tok_s: s.output_tok_s,
            ttft_p50_ms: s.ttft_p50_ms,
            ttft_p99_ms: s.ttft_p99_ms,
            tpot_p50_ms: s.tpot_p50_ms,
            tpot_p99_ms: s.tpot_p99_ms,
            e2e_p99_ms: s.e2e_p99_ms,
            cache_hit_rate: s.cache_hit_rate,
            errors: s.errors,
            error_kinds: s.error_kinds.clone(),
            slo_attainment: s.slo_attainment,
            worker_share: s.worker_share.clone(),
        }
    }

    /// `router:policy`, with `×N` for N replicas.
    pub fn label(&self) -> String {
        match self.replicas {
            1 => format!("{}:{}", self.router, self.policy),
            n => format!("{}:{} ×{n}", self.router, self.policy),
        }
    }
}

/// `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Results {
    /// The load axis' unit: the fleet's knee (req/s, simulated time), see `capacity_method`.
    pub capacity_rps: f64,
    /// How `capacity_rps` was found.
    #[serde(default)]
    pub capacity_method: String,
    /// The closed-loop throughput ceiling under least in-flight, when measured (req/s).
    #[serde(default)]
    pub ceiling_rps: Option<f64>,
    /// Scenario name.
    pub scenario: String,
    /// SLOs (ms).
    pub slo_ttft_ms: f64,
    /// TPOT SLO (ms).
    pub slo_tpot_ms: f64,
    /// Routers skipped, with why.
    pub skipped: Vec<String>,
    /// One entry per router and load.
    pub runs: Vec<Run>,
}

/// Replaying a trace at the knee's rate compresses (or stretches) its timeline; much
/// compression makes every router saturate in the trace's bursts, whatever the mean load.
fn warn_trace_compression(s: &Scenario, capacity: f64, trace: Option<&[crate::workload::TraceRecord]>) {
    if let Some(c) = crate::des::trace_compression(s, capacity, trace) {
        if c > 4.0 {
            eprintln!(
                "warning: the trace's timeline is compressed {c:.1}× at load 1.0: its bursts will saturate every router"
            );
        }
    }
}

/// A child process killed (by its PID, which we started) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = exe.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found next to switchyard-bench; build it: cargo build --release -p switchyard -p switchyard-sim",
            path.display()
        ))
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// One started worker, as the simulator's stdout describes it.
struct FleetWorker {
    url: String,
    /// `plain`, `prefill` or `decode`.
    role: String,
    bootstrap_port: Option<u16>,
    kv_events: Option<String>,
    kv_events_replay: Option<String>,
}

/// A started fleet.
struct Fleet {
    _proc: Proc,
    workers: Vec<FleetWorker>,
}

/// How the simulated workers run beyond the scenario: their tokenizer, and whether they
/// publish KV events (with a replay socket).
#[derive(Debug, Clone, Default)]
struct FleetOptions {
    tokenizer: Option<String>,
    kv_events: bool,
}

fn start_fleet(s: &Scenario, time_scale: f64, dir: &Path, options: &FleetOptions) -> Result<Fleet, String> {
    let mut scaled = s.clone();
    scaled.time_scale = time_scale;
    let file = dir.join(format!("{}-fleet.toml", s.name));
    std::fs::write(&file, scaled.fleet_toml()).map_err(|e| e.to_string())?;
    let n = s.workers().len();
    let mut cmd = Command::new(sibling_binary("switchyard-sim")?);
    cmd.args(["--fleet", &file.to_string_lossy(), "--base-port", "0", "--log-level", "warn"]);
    if let Some(t) = &options.tokenizer {
        cmd.args(["--tokenizer-path", t]);
    }
    if options.kv_events {
        cmd.args(["--kv-events-port", "0", "--kv-events-replay-port", "0"]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start switchyard-sim: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout from switchyard-sim")?;
    let proc = Proc(child);
    let mut workers = Vec::new();
    for line in BufReader::new(stdout).lines().take(n) {
        let line = line.map_err(|e| e.to_string())?;
        let url = line.split_whitespace().next().unwrap_or_default().to_owned();
        let field = |k: &str| line.split_whitespace().find_map(|f| f.strip_prefix(k)).map(str::to_owned);
        workers.push(FleetWorker {
            url,
            role: field("role=").unwrap_or_default().to_lowercase(),
            bootstrap_port: field("bootstrap_port=").and_then(|p| p.parse().ok()),
            kv_events: field("kv_events="),
            kv_events_replay: field("kv_events_replay="),
        });
    }
    if workers.len() != n {
        return Err(format!("switchyard-sim started {} of {n} workers", workers.len()));
    }
    Ok(Fleet { _proc: proc, workers })
}

/// What a switchyard router knows of the workers' caches: its text tree (the default), a
/// token tree (`+tokens`), or the engines' KV events (`+events`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum CacheView {
    Text,
    Tokens,
    Events,
}

/// Splits a switchyard policy spec's `+tokens`/`+events` suffix off.
fn cache_view(policy: &str) -> (&str, CacheView) {
    if let Some(p) = policy.strip_suffix("+events") {
        (p, CacheView::Events)
    } else if let Some(p) = policy.strip_suffix("+tokens") {
        (p, CacheView::Tokens)
    } else {
        (policy, CacheView::Text)
    }
}

/// The switchyard flags that run on the fleet's clock, each the router's default divided by
/// `time_scale` (workers that many times faster than hardware): the SLOs, the load polls and,
/// for marginal_utility, its learning's forgetting time. The DES runs them at the defaults in
/// the fleet's time; left on the wall clock at half speed, marginal_utility forgot twice as
/// fast and pd-mixed at 1.4x the knee fell from 69.2 req/s to 50.3.
fn fleet_time_flags(policy: &str, slo: &crate::metrics::Slo, time_scale: f64) -> Vec<String> {
    let polls = switchyard::config::DEFAULT_LOAD_CHECK_INTERVAL_SECS / time_scale;
    let mut flags = vec![
        "--slo-ttft-ms".to_owned(),
        (slo.ttft_ms / time_scale).to_string(),
        "--slo-tpot-ms".to_owned(),
        (slo.tpot_ms / time_scale).to_string(),
        "--load-check-interval".to_owned(),
        polls.to_string(),
    ];
    if policy.starts_with("marginal_utility") {
        let tau = switchyard::policies::MarginalUtilityConfig::default().tau.as_secs_f64() / time_scale;
        flags.extend(["--mu-tau-secs".to_owned(), tau.to_string()]);
    }
    flags
}

/// The command line that starts `router` with `policy` on `port` in front of `fleet`.
#[allow(clippy::too_many_arguments)]
fn router_command(
    router: &str,
    policy: &str,
    port: u16,
    fleet: &Fleet,
    s: &Scenario,
    time_scale: f64,
    venv: Option<&str>,
    tokenizer: Option<&str>,
) -> Result<Command, String> {
    let urls: Vec<String> = fleet.workers.iter().filter(|w| w.role == "plain").map(|w| w.url.clone()).collect();
    let pd_args = |vllm: bool| -> Vec<String> {
        let mut a = vec![if vllm { "--vllm-pd-disaggregation" } else { "--pd-disaggregation" }.to_owned()];
        for w in &fleet.workers {
            match w.role.as_str() {
                "prefill" => {
                    a.extend(["--prefill".to_owned(), w.url.clone()]);
                    if !vllm {
                        a.push(w.bootstrap_port.map_or("none".to_owned(), |p| p.to_string()));
                    }
                }
                "decode" => a.extend(["--decode".to_owned(), w.url.clone()]),
                _ => {}
            }
        }
        a
    };
    let max_concurrent = s.admission.map(|a| (a.max_concurrent_per_worker * fleet.workers.len()).to_string());
    let mut cmd;
    match router {
        "switchyard" => {
            let (policy, view) = cache_view(policy);
            cmd = Command::new(sibling_binary("switchyard")?);
            if view != CacheView::Text {
                let path = tokenizer.ok_or("+tokens and +events need --tokenizer-path or --workload-tokenizer")?;
                cmd.args(["--tokenizer-path", path]);
            }
            if view == CacheView::Events {
                if s.is_pd() {
                    return Err("+events is for regular fleets here".into());
                }
                let endpoints = |f: fn(&FleetWorker) -> Option<&String>| -> Result<Vec<String>, String> {
                    fleet
                        .workers
                        .iter()
                        .map(|w| f(w).cloned().ok_or("the fleet publishes no KV events".to_owned()))
                        .collect()
                };
                cmd.arg("--kv-events-endpoint").args(endpoints(|w| w.kv_events.as_ref())?);
                cmd.arg("--kv-events-replay-endpoint").args(endpoints(|w| w.kv_events_replay.as_ref())?);
            }
            cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--log-level", "warn"]);
            cmd.args(["--health-check-interval-secs", "1"]);
            cmd.args(fleet_time_flags(policy, &s.slo, time_scale));
            cmd.args(crate::policy_spec::flags(policy));
            if s.is_pd() {
                cmd.args(pd_args(false));
            } else {
                cmd.arg("--worker-urls").args(&urls);
            }
            if policy.starts_with("marginal_utility") {
                cmd.args(&s.switchyard_args);
            } else if let Some(n) = &max_concurrent {
                cmd.args(["--max-concurrent-requests", n]);
            }
        }
        "sglang-router" | "vllm-router" => {
            let venv = venv.ok_or("no peers venv (--peers-venv or $PEERS_VENV)")?;
            if router == "sglang-router" {
                let python = Path::new(venv).join("bin/python");
                if !python.exists() {
                    return Err(format!("{} not found", python.display()));
                }
                cmd = Command::new(python);
                cmd.args(["-m", "sglang_router.launch_router"]);
            } else {
                let bin = Path::new(venv).join("bin/vllm-router");
                if !bin.exists() {
                    return Err(format!("{} not found", bin.display()));
                }
                cmd = Command::new(bin);
            }
            cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--policy", policy]);
            // Their metrics exporter listens on a fixed port by default: replicas would collide.
            cmd.args(["--prometheus-port", &free_port()?.to_string()]);
            if s.is_pd() {
                cmd.args(pd_args(router == "vllm-router"));
            } else {
                cmd.arg("--worker-urls").args(&urls);
            }
            if let Some(n) = &max_concurrent {
                cmd.args(["--max-concurrent-requests", n]);
            }
        }
        other => return Err(format!("unknown router '{other}' (switchyard, sglang-router, vllm-router)")),
    }
    Ok(cmd)
}

async fn wait_ready(client: &LoadClient, base: &str, deadline: Duration) -> bool {
    let start = tokio::time::Instant::now();
    let probe = crate::workload::RequestSpec {
        at: 0.0,
        prompt: crate::workload::PromptSpec::Prefixed { group: 7, prefix_tokens: 0, seed: 7, tokens: 8 },
        output_tokens: 2,
        session: None,
    };
    while start.elapsed() < deadline {
        if client.get(base, "/health").await.is_some() && client.send(&probe, 0.0).await.error.is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// Requests finished per worker, from each simulated worker's own counter.
async fn finished_per_worker(client: &LoadClient, fleet: &Fleet) -> Vec<f64> {
    let mut out = Vec::new();
    for w in &fleet.workers {
        let text = client.get(&w.url, "/metrics").await.unwrap_or_default();
        let v = text
            .lines()
            .find(|l| l.starts_with("sglang:num_requests_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        out.push(v);
    }
    out
}

fn progress(label: &str, done: usize, total: usize) {
    if done == total || done.is_multiple_of((total / 4).max(1)) {
        let filled = done * 30 / total.max(1);
        eprint!("\r  {label:<44} [{}{}] {done}/{total}", "#".repeat(filled), ".".repeat(30 - filled));
        if done == total {
            eprintln!();
        }
    }
}

/// Runs the comparison and writes the outputs.
pub fn run(args: &CompareArgs) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // Interrupted runs stop their fleet and routers: dropping the comparison drops them.
    runtime.block_on(async {
        tokio::select! {
            r = compare(args) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
            _ = terminated() => Err("terminated".into()),
        }
    })
}

#[cfg(unix)]
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn terminated() {
    std::future::pending::<()>().await
}

async fn compare(args: &CompareArgs) -> Result<(), String> {
    let mut s = Scenario::load(&args.scenario).map_err(|e| e.to_string())?;
    if let Some(n) = args.requests {
        s.requests = n;
    }
    if !args.loads.is_empty() {
        s.loads = args.loads.clone();
    }
    let time_scale = args.time_scale.unwrap_or(s.time_scale);
    let dir = PathBuf::from(&args.out);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let venv = args.peers_venv.clone().or_else(|| std::env::var("PEERS_VENV").ok());
    let routers: Vec<String> = if args.routers.is_empty() {
        DEFAULT_ROUTERS.iter().map(|r| r.to_string()).collect()
    } else {
        args.routers.clone()
    };
    let trace = s.workload.trace().map_err(|e| e.to_string())?;
    let n_workers = s.workers().len();
    let timeout = Duration::from_secs_f64((600.0 / time_scale).max(30.0));

    let mut method = "given on the command line (--capacity)".to_owned();
    let mut ceiling = None;
    let capacity = match args.capacity {
        Some(c) => c,
        None if !args.live_capacity => {
            let started = std::time::Instant::now();
            let knee = crate::des::scenario_knee(&s, trace.as_deref());
            eprintln!(
                "knee from the discrete-event simulation: {:.2} req/s ({} runs, {:.1} s; closed-loop ceiling {:.2})",
                knee.rate,
                knee.evaluations,
                started.elapsed().as_secs_f64(),
                knee.ceiling
            );
            method = crate::des::KNEE_METHOD.to_owned();
            ceiling = Some(knee.ceiling);
            knee.rate
        }
        None => {
            eprintln!(
                "measuring capacity: closed loop, switchyard load_based, {} per worker",
                s.capacity.concurrency_per_worker
            );
            let fleet = start_fleet(&s, time_scale, &dir, &FleetOptions::default())?;
            let port = free_port()?;
            let mut cmd = router_command("switchyard", "load_based", port, &fleet, &s, time_scale, None, None)?;
            let _router = Proc(cmd.stdout(Stdio::null()).spawn().map_err(|e| e.to_string())?);
            let base = format!("http://127.0.0.1:{port}");
            let client = LoadClient::new(&base, "meta-llama/Llama-3.1-8B-Instruct", time_scale, timeout);
            if !wait_ready(&client, &base, Duration::from_secs(60)).await {
                return Err("switchyard did not become ready for the capacity measurement".into());
            }
            let concurrency = s.capacity.concurrency_per_worker * n_workers;
            let shapes =
                s.workload.shapes(s.capacity.requests.max(concurrency * 4), s.seed ^ 0xcafe, 0, trace.as_deref());
            let results = run_closed_loop(&client, &shapes, concurrency).await;
            method = format!(
                "closed-loop throughput through live switchyard load_based at {} outstanding per worker",
                s.capacity.concurrency_per_worker
            );
            crate::metrics::steady_rate(&results)
                .ok_or_else(|| format!("capacity run failed: {:?}", results.iter().find_map(|r| r.error.clone())))?
        }
    };
    eprintln!("capacity: {capacity:.2} req/s (simulated time); time scale {time_scale}");
    // Each level long enough to be steady state: its arrival window several times the
    // requests' own p99 latency (from the DES, least in-flight, at that load), and no shorter
    // than the window the knee was found on (`des::steady_requests`).
    let per_level: Vec<usize> = s
        .loads
        .iter()
        .map(|&load| match args.requests {
            Some(n) => n,
            None => crate::des::steady_requests(&s, load * capacity, trace.as_deref()),
        })
        .collect();
    eprintln!("requests per level: {per_level:?}");
    warn_trace_compression(&s, capacity, trace.as_deref());

    let mut results = Results::new(&s, capacity);
    results.capacity_method = method;
    results.ceiling_rps = ceiling;
    let tokenizer = match (&args.tokenizer_path, args.workload_tokenizer) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => {
            let file = dir.join("workload-tokenizer.json");
            switchyard_tokenize::fixture::write_word_level(&file, crate::workload::prompt_vocabulary())
                .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
            Some(file.to_string_lossy().into_owned())
        }
        (None, false) => None,
    };
    let fleet_options =
        FleetOptions { tokenizer: tokenizer.clone(), kv_events: routers.iter().any(|r| r.ends_with("+events")) };
    for spec in &routers {
        let (router, policy) = spec.split_once(':').unwrap_or((spec.as_str(), "round_robin"));
        let fleet = start_fleet(&s, time_scale, &dir, &fleet_options)?;
        let mut procs = Vec::new();
        let mut clients = Vec::new();
        let mut failure = None;
        for replica in 0..args.replicas {
            let port = free_port()?;
            let cmd =
                router_command(router, policy, port, &fleet, &s, time_scale, venv.as_deref(), tokenizer.as_deref());
            let mut cmd = match cmd {
                Ok(c) => c,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let log_name = format!("{}-{}-{replica}.log", router, policy.replace('/', "-"));
            let log = std::fs::File::create(dir.join(log_name)).map_err(|e| e.to_string())?;
            match cmd.stdout(Stdio::null()).stderr(log).spawn() {
                Ok(child) => procs.push(Proc(child)),
                Err(e) => {
                    failure = Some(format!("it did not start: {e}"));
                    break;
                }
            }
            let base = format!("http://127.0.0.1:{port}");
            let client = LoadClient::new(&base, "meta-llama/Llama-3.1-8B-Instruct", time_scale, timeout);
            if !wait_ready(&client, &base, Duration::from_secs(90)).await {
                failure = Some(format!("not ready within 90 s (see its log in {})", dir.display()));
                break;
            }
            clients.push(client);
        }
        if let Some(e) = failure {
            eprintln!("skipping {spec}: {e}");
            results.skipped.push(format!("{spec}: {e}"));
            continue;
        }
        let client = &clients[0];
        for (li, &load) in s.loads.iter().enumerate() {
            for w in &fleet.workers {
                client.post(&w.url, "/flush_cache", "").await;
            }
            let n = per_level[li];
            let offset: usize = per_level[..li].iter().sum();
            let specs = s.workload.requests(s.arrival, load * capacity, n, s.seed, offset, trace.as_deref());
            let before = finished_per_worker(client, &fleet).await;
            let fault = s.fault.map(|f| (f, f.at(&specs, f.from) / time_scale, f.at(&specs, f.to) / time_scale));
            let fault_task = fault.and_then(|(f, from, to)| {
                let url = fleet.workers.get(f.worker)?.url.clone();
                let client = client.clone();
                Some(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs_f64(from)).await;
                    client.post(&url, "/sim/faults", &format!("{{\"slowdown\": {}}}", f.slowdown)).await;
                    tokio::time::sleep(Duration::from_secs_f64((to - from).max(0.0))).await;
                    client.post(&url, "/sim/faults", "{\"slowdown\": 1.0}").await;
                }))
            });
            let label = format!("{spec} @ {load:.2}");
            let out = run_open_loop(&clients, &specs, |d, t| progress(&label, d, t)).await;
            if let Some(t) = fault_task {
                t.abort();
                if let Some((f, _, _)) = fault {
                    client.post(&fleet.workers[f.worker].url, "/sim/faults", "{\"slowdown\": 1.0}").await;
                }
            }
            let after = finished_per_worker(client, &fleet).await;
            let mut summary = Summary::of(&out, &s.slo, n_workers);
            let total: f64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
            summary.worker_share = after.iter().zip(&before).map(|(a, b)| (a - b) / total.max(1.0)).collect();
            let mut run = Run::new(router, policy, &s.name, load, &summary);
            run.replicas = args.replicas;
            let kinds: Vec<String> = run.error_kinds.iter().map(|(k, n)| format!("{n}× {k}")).collect();
            eprintln!(
                "  goodput {:.2} req/s, TTFT p99 {:.0} ms, TPOT p99 {:.1} ms, hit {:.2}, errors {}{}",
                run.goodput_rps,
                run.ttft_p99_ms,
                run.tpot_p99_ms,
                run.cache_hit_rate,
                run.errors,
                if kinds.is_empty() { String::new() } else { format!(" ({})", kinds.join("; ")) }
            );
            results.runs.push(run);
        }
    }
    let md = report::write(&dir, &results, &format!("switchyard-bench compare --scenario {}", args.scenario))?;
    println!("{md}");
    eprintln!("wrote {}/results.json, results.md, {}.svg", dir.display(), s.name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Slo;

    /// A fleet twice as fast as hardware gets every clock of the router halved, the
    /// forgetting time only where a policy learns.
    #[test]
    fn the_routers_clocks_follow_the_fleets_time_scale() {
        let slo = Slo { ttft_ms: 2000.0, tpot_ms: 100.0 };
        let flag = |flags: &[String], name: &str| -> Option<f64> {
            let i = flags.iter().position(|f| f == name)?;
            flags.get(i + 1)?.parse().ok()
        };
        let mu = fleet_time_flags("marginal_utility/queue", &slo, 2.0);
        assert_eq!(flag(&mu, "--slo-ttft-ms"), Some(1000.0));
        assert_eq!(flag(&mu, "--slo-tpot-ms"), Some(50.0));
        assert_eq!(
            flag(&mu, "--load-check-interval"),
            Some(switchyard::config::DEFAULT_LOAD_CHECK_INTERVAL_SECS / 2.0)
        );
        assert_eq!(flag(&mu, "--mu-tau-secs"), Some(60.0));
        let rr = fleet_time_flags("round_robin", &slo, 2.0);
        assert_eq!((flag(&rr, "--slo-ttft-ms"), flag(&rr, "--mu-tau-secs")), (Some(1000.0), None));
    }
}
