//! `switchyard-sim`: run simulated SGLang/vLLM-compatible workers.

use clap::Parser;
use switchyard_sim::fleet;
use switchyard_sim::model::Profile;
use switchyard_sim::server::{Faults, Role, WorkerConfig};

/// Simulated LLM inference workers with a continuous-batching performance model.
#[derive(Debug, Parser)]
#[command(name = "switchyard-sim", version, about)]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Number of workers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: u16,
    /// Port of the first worker; the others take the next ports (0 = any free ports).
    #[arg(long, default_value_t = 31000)]
    base_port: u16,
    /// Performance profile: h100-llama8b, a100-llama8b, l4-llama8b.
    #[arg(long, default_value = "h100-llama8b", value_parser = parse_profile)]
    profile: Profile,
    /// Fleet file (TOML) describing each worker; overrides --workers/--profile.
    #[arg(long)]
    fleet: Option<String>,
    /// Speed factor relative to the profile.
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    speed: f64,
    /// Run this many times faster than real hardware (latencies scale consistently).
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    time_scale: f64,
    /// Base RNG seed (worker i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Model name served.
    #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
    model_name: String,
    /// Role of every worker (PD disaggregation).
    #[arg(long, value_enum, default_value_t = Role::Plain)]
    role: Role,
    /// Prefill role: port of the first worker's KV bootstrap server (the others take the
    /// next ones); unset = any free ports.
    #[arg(long)]
    bootstrap_port: Option<u16>,
    /// Decode role: seconds to wait for a prefill worker's KV before failing the request
    /// (SGLang's `SGLANG_DISAGGREGATION_WAITING_TIMEOUT` default).
    #[arg(long, default_value_t = 300.0, value_parser = positive)]
    pd_timeout_secs: f64,
    /// KV transfer bandwidth between prefill and decode workers, GB/s.
    #[arg(long, default_value_t = 50.0, value_parser = positive)]
    kv_link_gbps: f64,
    /// Override of the KV capacity in tokens.
    #[arg(long)]
    kv_capacity_tokens: Option<u64>,
    /// Median output length when ignore_eos is not set.
    #[arg(long, default_value_t = 200)]
    output_len_median: u32,
    /// Fault: fraction of requests answered with --error-status.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fault: status of injected errors.
    #[arg(long, default_value_t = 500)]
    error_status: u16,
    /// Fault: step-time multiplier (3.0 = 3× slower).
    #[arg(long, default_value_t = 1.0)]
    slowdown: f64,
    /// Fault: cut streams after this many tokens.
    #[arg(long)]
    die_after_tokens: Option<u32>,
    /// Fault: accept requests and never answer.
    #[arg(long)]
    hang: bool,
    /// Fault: /health answers 503.
    #[arg(long)]
    health_fail: bool,
    /// Data-parallel ranks per worker (SGLang `--dp-size`): a request runs on the rank its
    /// `data_parallel_rank` field or `X-data-parallel-rank` header names.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    dp_size: u32,
    /// Serve HTTPS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key_path")]
    tls_cert_path: Option<String>,
    /// The private key of --tls-cert-path (PEM).
    #[arg(long, requires = "tls_cert_path")]
    tls_key_path: Option<String>,
    /// Require client certificates signed by these CAs (PEM): mTLS.
    #[arg(long, requires = "tls_cert_path")]
    tls_client_ca_path: Option<String>,
    /// Publish KV cache events (vLLM/SGLang ZMQ wire format) on this port for the first worker,
    /// the next ports for the others (0 = any free ports); the router subscribes with
    /// `--kv-events-endpoint`.
    #[arg(long)]
    kv_events_port: Option<u16>,
    /// Serve replays of recent KV event batches (the engines' ROUTER replay socket) on this
    /// port for the first worker, the next ports for the others.
    #[arg(long, requires = "kv_events_port")]
    kv_events_replay_port: Option<u16>,
    /// Tokenize with this model's tokenizer (a directory with tokenizer.json and
    /// tokenizer_config.json's chat template, or a tokenizer.json) as a real engine would.
    #[arg(long)]
    tokenizer_path: Option<String>,
    /// Log filter (error, warn, info, debug, trace).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn parse_profile(s: &str) -> Result<Profile, String> {
    Profile::by_name(s).ok_or_else(|| format!("unknown profile '{s}' (known: {})", Profile::NAMES.join(", ")))
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("expected a positive number, got '{s}'")),
    }
}

/// `switchyard-sim des ...`: the discrete-event fleet simulation drives the router's own
/// policies, so it lives in `switchyard-bench` (which depends on both crates; this crate can't
/// depend on the router, which embeds the simulator for `--sim-workers`). Forward to it.
fn forward_des(rest: Vec<std::ffi::OsString>) -> ! {
    let bench = std::env::current_exe().map(|e| e.with_file_name("switchyard-bench"));
    match bench {
        Ok(path) if path.exists() => {
            let status = std::process::Command::new(&path).arg("des").args(rest).status();
            std::process::exit(status.ok().and_then(|s| s.code()).unwrap_or(1));
        }
        _ => {
            eprintln!(
                "error: `des` needs switchyard-bench next to switchyard-sim: cargo build --release -p switchyard-bench"
            );
            std::process::exit(2);
        }
    }
}

#[tokio::main]
async fn main() {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "des") {
        forward_des(argv.split_off(2));
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| "info".into()))
        .init();
    let mut profile = args.profile.clone();
    if let Some(kv) = args.kv_capacity_tokens {
        profile.kv_capacity_tokens = kv;
    }
    let template = WorkerConfig {
        host: args.host.clone(),
        port: 0,
        profile,
        speed: args.speed,
        time_scale: args.time_scale,
        seed: args.seed,
        model_name: args.model_name.clone(),
        role: args.role,
        output_len_median: args.output_len_median,
        faults: Faults {
            error_rate: args.error_rate,
            error_status: args.error_status,
            hang: args.hang,
            slowdown: args.slowdown,
            die_after_tokens: args.die_after_tokens,
            health_fail: args.health_fail,
            ..Faults::default()
        },
        bootstrap_port: args.bootstrap_port,
        pd_timeout_secs: args.pd_timeout_secs,
        kv_link_gbps: args.kv_link_gbps,
        dp_size: args.dp_size,
        tls_cert_path: args.tls_cert_path.clone(),
        tls_key_path: args.tls_key_path.clone(),
        tls_client_ca_path: args.tls_client_ca_path.clone(),
        kv_events_port: args.kv_events_port,
        kv_events_replay_port: args.kv_events_replay_port,
        tokenizer_path: args.tokenizer_path.clone(),
    };
    let configs = match &args.fleet {
        Some(path) => fleet::load(path, args.base_port, &template),
        None => Ok(fleet::uniform(args.workers.into(), args.base_port, &template)),
    };
    let workers = match configs {
        Ok(c) => fleet::spawn_fleet(c).await,
        Err(e) => Err(e),
    };
    let workers = match workers {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    for w in &workers {
        let c = w.config();
        let mut bootstrap = w.bootstrap_port().map(|p| format!(" bootstrap_port={p}")).unwrap_or_default();
        if let Some(e) = w.kv_events_endpoint() {
            bootstrap.push_str(&format!(" kv_events={e}"));
        }
        if let Some(e) = w.kv_events_replay_endpoint() {
            bootstrap.push_str(&format!(" kv_events_replay={e}"));
        }
        println!(
            "{} profile={} speed={} role={:?} time_scale={} dp_size={}{bootstrap}",
            w.url(),
            c.profile.name,
            c.speed,
            c.role,
            c.time_scale,
            c.dp_size
        );
    }
    let _ = tokio::signal::ctrl_c().await;
}
