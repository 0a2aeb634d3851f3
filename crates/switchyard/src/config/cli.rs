//! The `switchyard` command line. Flag names and defaults follow sglang-router's so that a
//! user can switch by changing the command name.

use std::time::Duration;

use clap::Parser;

use super::{
    normalize_worker_url, AdmissionConfig, Cidr, CircuitBreakerConfig, ConfigError, DiscoveryConfig, HealthConfig,
    ListenerConfig, PdConfig, PdStyle, RetryConfig, RouterConfig,
};
use crate::load::estimator::EstimatorKind;
use crate::policies::{CacheAwareConfig, MarginalUtilityConfig, Objective, Overload, PolicyConfig, PolicyKind};
use crate::tls::{CertKeyPaths, TlsConfig};

/// LLM inference router: one routing-policy trait for every fleet.
#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(name = "switchyard", version, about, args_override_self = true)]
pub struct Args {
    /// Read options from a TOML or YAML file (keys are the long option names); the command
    /// line overrides it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<String>,
    /// Print the effective configuration (file + command line) as TOML and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// Also write logs to daily-rotated files in this directory.
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<String>,
    /// Export OpenTelemetry traces to this OTLP/HTTP collector (`http://collector:4318`;
    /// `/v1/traces` is added when the URL has no path). Off when unset.
    #[arg(long, alias = "otlp-traces-endpoint", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of exported traces.
    #[arg(long, default_value = "switchyard")]
    pub otlp_service_name: String,
    /// Serve Prometheus metrics on a separate listener at this port (always on `/metrics`).
    #[arg(long)]
    pub prometheus_port: Option<u16>,
    /// Address of the separate metrics listener.
    #[arg(long, default_value = "127.0.0.1")]
    pub prometheus_host: String,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind.
    #[arg(long, default_value_t = 30000)]
    pub port: u16,
    /// Worker base URLs (http://host:port), space separated.
    #[arg(long, num_args = 1.., value_name = "URL")]
    pub worker_urls: Vec<String>,
    /// Routing policy.
    #[arg(long, value_enum, default_value_t = PolicyKind::RoundRobin)]
    pub policy: PolicyKind,
    /// Prefill/decode disaggregation, SGLang style (bootstrap rooms).
    #[arg(long)]
    pub pd_disaggregation: bool,
    /// Prefill/decode disaggregation, vLLM style (kv_transfer_params).
    #[arg(long)]
    pub vllm_pd_disaggregation: bool,
    /// A prefill worker and, optionally, its bootstrap port (or `none`); repeatable.
    #[arg(long, num_args = 1..=2, value_names = ["URL", "BOOTSTRAP_PORT"], action = clap::ArgAction::Append)]
    pub prefill: Vec<String>,
    /// A decode worker; repeatable.
    #[arg(long, value_name = "URL", action = clap::ArgAction::Append)]
    pub decode: Vec<String>,
    /// Policy of the prefill pool (default: --policy).
    #[arg(long, value_enum)]
    pub prefill_policy: Option<PolicyKind>,
    /// Policy of the decode pool (default: --policy).
    #[arg(long, value_enum)]
    pub decode_policy: Option<PolicyKind>,
    /// PD: seconds a prefill leg waits on a worker that finishes nothing before it counts as
    /// failed (hung) and is retried; a worker still finishing others' requests is behind, not
    /// hung, and its legs wait their turn.
    #[arg(long, default_value_t = 60.0, value_parser = positive_secs)]
    pub pd_prefill_timeout_secs: f64,
    /// Demo: start N simulated prefill workers (with --sim-decode, a PD fleet).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub sim_prefill: Option<u16>,
    /// Demo: start M simulated decode workers.
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub sim_decode: Option<u16>,
    /// Seed for the policy's random choices (for reproducible runs).
    #[arg(long)]
    pub policy_seed: Option<u64>,
    /// cache_aware: minimum prefix match ratio to route by cache.
    #[arg(long, default_value_t = 0.3, value_parser = unit_interval)]
    pub cache_threshold: f64,
    /// cache_aware: absolute in-flight difference that counts as imbalanced.
    #[arg(long, default_value_t = 64)]
    pub balance_abs_threshold: usize,
    /// cache_aware: relative in-flight ratio that counts as imbalanced.
    #[arg(long, default_value_t = 1.5, value_parser = positive_number)]
    pub balance_rel_threshold: f64,
    /// cache_aware: seconds between background trims of the prefix tree.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub eviction_interval: u64,
    /// cache_aware: bound on the prefix tree (characters or tokens, summed over workers).
    #[arg(long, default_value_t = 1 << 26)]
    pub max_tree_size: usize,
    /// Tokenize prompts in the router with this model's tokenizer: a model directory
    /// (tokenizer.json, tokenizer_config.json with its chat template) or a tokenizer.json.
    /// Prefix matching then works on the engine's token ids (chat requests through the chat
    /// template), which the KV event view needs for requests that carry text.
    #[arg(long, value_name = "PATH")]
    pub tokenizer_path: Option<String>,
    /// The model directory, as in sglang-router; its tokenizer is used when --tokenizer-path
    /// is not given.
    #[arg(long, value_name = "PATH")]
    pub model_path: Option<String>,
    /// Bound on the router's memory of tokenized prompt pieces (the text between a chat's
    /// added tokens: a conversation's earlier turns), MiB; 0 tokenizes every prompt whole.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub tokenizer_cache_mb: u64,
    /// Subscribe to the workers' KV cache events (vLLM/SGLang ZMQ publishers): one
    /// `tcp://host:port` per worker, in the order of --worker-urls then --prefill then
    /// --decode; or one template with `{host}` (the worker's host) for every worker, including
    /// discovered ones. cache_aware and marginal_utility then use the engines' real cache state.
    #[arg(long, num_args = 1.., value_name = "ENDPOINT")]
    pub kv_events_endpoint: Vec<String>,
    /// The engines' replay sockets (vLLM's `replay_endpoint`), listed like
    /// --kv-events-endpoint: sequence gaps are repaired from them instead of rebuilding the view.
    #[arg(long, num_args = 1.., value_name = "ENDPOINT")]
    pub kv_events_replay_endpoint: Vec<String>,
    /// Topic (prefix) to subscribe to; empty = every topic.
    #[arg(long, default_value = "")]
    pub kv_events_topic: String,
    /// Bound on the KV event block index over all workers, MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub kv_index_max_mb: u64,
    /// cache_aware, marginal_utility: bound on the prefix trees' memory, MiB (node, tenant and
    /// bookkeeping overhead included).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub max_tree_memory_mb: u64,
    /// Seconds between polls of each worker's own load report (`/get_load`, else `/metrics`),
    /// used by power_of_two and by marginal_utility (its KV/queue guards, and with
    /// `--mu-count-other-routers` the requests other router replicas have there); 0 = off.
    #[arg(long, default_value_t = super::DEFAULT_LOAD_CHECK_INTERVAL_SECS, value_parser = non_negative_secs)]
    pub load_check_interval: f64,
    /// marginal_utility: objective (slo = goodput within SLOs, latency, throughput).
    #[arg(long, value_enum, default_value_t = Objective::Slo)]
    pub mu_objective: Objective,
    /// marginal_utility: estimator of the per-worker models.
    #[arg(long, value_enum, default_value_t = EstimatorKind::Regression)]
    pub mu_estimator: EstimatorKind,
    /// marginal_utility: time-to-first-token SLO, in milliseconds.
    #[arg(long, default_value_t = 2000.0, value_parser = positive_ms)]
    pub slo_ttft_ms: f64,
    /// marginal_utility: time-per-output-token SLO, in milliseconds.
    #[arg(long, default_value_t = 100.0, value_parser = positive_ms)]
    pub slo_tpot_ms: f64,
    /// marginal_utility: share of the SLOs a worker without the request's prefix must stay under.
    #[arg(long, default_value_t = 0.5, value_parser = unit_interval)]
    pub mu_slo_margin: f64,
    /// marginal_utility: share of the TTFT SLO a worker holding the request's prefix must stay
    /// under (1: the whole SLO; below 1 spills prefix groups from holders near the edge, which
    /// pays past the knee on traffic sharing system prompts and costs conversations).
    #[arg(long, default_value_t = 1.0, value_parser = unit_interval)]
    pub mu_holder_margin: f64,
    /// marginal_utility: when no worker can meet the SLOs: best-effort, queue, or shed (503).
    #[arg(long, value_enum, default_value_t = Overload::BestEffort)]
    pub mu_overload: Overload,
    /// marginal_utility: relative cost difference counted as a tie (to the fewest in flight).
    #[arg(long, default_value_t = 0.02, value_parser = unit_interval)]
    pub mu_tie_tolerance: f64,
    /// marginal_utility: score a random sample of this many workers plus the longest prefix
    /// holders (0 = all up to 64 workers, 16 sampled beyond; ≥ the fleet = all).
    #[arg(long, default_value_t = 0)]
    pub mu_candidates: usize,
    /// marginal_utility: probability of a random (feasible) choice.
    #[arg(long, default_value_t = 0.01, value_parser = unit_interval)]
    pub mu_epsilon: f64,
    /// marginal_utility: forgetting time constant of the estimators, in seconds.
    #[arg(long, default_value_t = 120.0, value_parser = positive_secs)]
    pub mu_tau_secs: f64,
    /// marginal_utility behind several router replicas: count the requests each worker reports
    /// beyond this router's own (the other replicas') in its load, from the polls of
    /// `--load-check-interval`. Off by default (see the README's "Replicas share the load");
    /// the waits for a batch slot or KV room count them either way.
    #[arg(long)]
    pub mu_count_other_routers: bool,
    /// Time allowed for a worker to answer (response headers; a whole answer's body too), in seconds.
    #[arg(long, default_value_t = 1800.0, value_parser = positive_secs)]
    pub request_timeout_secs: f64,
    /// Longest gap between two chunks of a worker's stream before it counts as stalled
    /// (the client gets an error event), in seconds.
    #[arg(long, default_value_t = 300.0, value_parser = positive_secs)]
    pub stream_idle_timeout_secs: f64,
    /// Longest a request may take in all, from arrival to the end of its answer (streams
    /// included), in seconds; unset = no limit beyond the others.
    #[arg(long, value_parser = positive_secs)]
    pub request_total_timeout_secs: Option<f64>,
    /// Continuations of a stream that breaks mid-way (worker died, cut it, stalled, sent an
    /// error event) on another worker, spliced so the client sees one stream; 0 turns
    /// mid-stream failover off.
    #[arg(long, default_value_t = 1)]
    pub stream_failover_max: u32,
    /// Largest request body accepted, in bytes (sglang-router: 512 MiB; lower here because the
    /// router holds a body while it routes it).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_payload_size: usize,
    /// Time a client has to send a request's headers once it starts, in seconds.
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    pub header_read_timeout_secs: f64,
    /// Time a client has to send a request's body once its headers arrived, in seconds.
    #[arg(long, default_value_t = 60.0, value_parser = positive_secs)]
    pub body_read_timeout_secs: f64,
    /// An idle keep-alive client connection is closed after this many seconds (longer than
    /// the 60 s proxies such as nginx keep upstream connections, so they close first).
    #[arg(long, default_value_t = 75.0, value_parser = positive_secs)]
    pub keep_alive_timeout_secs: f64,
    /// Client connections open at once; more are answered 503 and closed.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// Workers registered at once; more are refused with a clear error.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_workers: u64,
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Seconds between health probes of each worker.
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    pub health_check_interval_secs: f64,
    /// Timeout of one health probe, in seconds.
    #[arg(long, default_value_t = 5.0, value_parser = positive_secs)]
    pub health_check_timeout_secs: f64,
    /// Consecutive failed probes before a worker is marked unhealthy.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_failure_threshold: u32,
    /// Consecutive successful probes before an unhealthy worker is used again.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_success_threshold: u32,
    /// Path probed on each worker.
    #[arg(long, default_value = "/health")]
    pub health_check_endpoint: String,
    /// Health panic: when fewer than this share of a pool's workers pass their probes, route
    /// across every worker of it that has ever passed one (circuit breakers still guard); 0: never.
    #[arg(long, default_value_t = super::DEFAULT_HEALTH_PANIC_THRESHOLD, value_parser = unit_interval)]
    pub health_panic_threshold: f64,
    /// Attempts per request in total (first included), each on a different worker.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub retry_max_retries: u32,
    /// Backoff before the first retry, in milliseconds.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=MAX_SECS as u64 * 1000))]
    pub retry_initial_backoff_ms: u64,
    /// Upper bound on one backoff, in milliseconds.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(0..=MAX_SECS as u64 * 1000))]
    pub retry_max_backoff_ms: u64,
    /// Backoff growth per retry.
    #[arg(long, default_value_t = 1.5, value_parser = positive_number)]
    pub retry_backoff_multiplier: f64,
    /// Random ± fraction applied to each backoff.
    #[arg(long, default_value_t = 0.2, value_parser = unit_interval)]
    pub retry_jitter_factor: f64,
    /// Consecutive worker failures that open a worker's circuit.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub cb_failure_threshold: u32,
    /// Consecutive half-open successes that close it again.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub cb_success_threshold: u32,
    /// Seconds a circuit stays open before one probe request is let through.
    #[arg(long, default_value_t = 60.0, value_parser = positive_secs)]
    pub cb_timeout_duration_secs: f64,
    /// Requests proxied at once (unset = unlimited).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrent_requests: Option<u64>,
    /// Requests that may wait for a slot; more get 429 with Retry-After.
    #[arg(long, default_value_t = 100)]
    pub queue_size: usize,
    /// Longest wait for a slot before 408, in seconds.
    #[arg(long, default_value_t = 60.0, value_parser = positive_secs)]
    pub queue_timeout_secs: f64,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 180.0, value_parser = non_negative_secs)]
    pub shutdown_grace_secs: f64,
    /// Bearer token required on admin routes (worker management, flush_cache, debug). Without
    /// it, admin changes are only served on a loopback bind (or with
    /// --allow-unauthenticated-admin).
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
    #[serde(serialize_with = "redact")]
    pub api_key: Option<String>,
    /// Bearer token required on inference routes; the client's key is for the router and is
    /// not forwarded to workers.
    #[arg(long, env = "SWITCHYARD_INFERENCE_API_KEY", hide_env_values = true)]
    #[serde(serialize_with = "redact")]
    pub inference_api_key: Option<String>,
    /// Bearer token the router sends to workers (every request and probe).
    #[arg(long, env = "SWITCHYARD_WORKER_API_KEY", hide_env_values = true)]
    #[serde(serialize_with = "redact")]
    pub worker_api_key: Option<String>,
    /// Serve admin changes without --api-key on a non-loopback bind (anyone who reaches the
    /// port can then add workers and receive other users' prompts).
    #[arg(long)]
    pub allow_unauthenticated_admin: bool,
    /// Worker addresses allowed (CIDRs, e.g. 10.0.0.0/8); unset = any address except
    /// link-local and cloud metadata ones.
    #[arg(long, num_args = 1.., value_name = "CIDR")]
    pub worker_allow_cidr: Vec<String>,
    /// Seconds start-up waits for a first healthy worker (start-up never fails for it).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_secs)]
    pub worker_startup_timeout_secs: f64,
    /// Remove workers the health checker marks unhealthy.
    #[arg(long)]
    pub remove_unhealthy_workers: bool,
    /// Route to each data-parallel rank of an engine that reports `dp_size` (SGLang's
    /// `/get_server_info`) as its own worker; the chosen rank travels in the request
    /// (`data_parallel_rank`, and the `X-data-parallel-rank` header).
    #[arg(long)]
    pub dp_aware: bool,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key-path.
    #[arg(long, value_name = "FILE")]
    pub tls_cert_path: Option<String>,
    /// The private key of --tls-cert-path (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key_path: Option<String>,
    /// CA certificates (PEM) trusted for https:// workers, besides the system's roots.
    #[arg(long, value_name = "FILE")]
    pub worker_ca_cert: Option<String>,
    /// Client certificate (PEM) for https:// workers that require mTLS; needs --worker-client-key.
    #[arg(long, value_name = "FILE")]
    pub worker_client_cert: Option<String>,
    /// The private key of --worker-client-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub worker_client_key: Option<String>,
    /// Find workers among Kubernetes pods (list + watch): Running, Ready pods matching
    /// --selector (PD: --prefill-selector / --decode-selector).
    #[arg(long)]
    pub service_discovery: bool,
    /// Labels a worker pod carries, as key=value (all must match).
    #[arg(long, num_args = 1.., value_name = "KEY=VALUE")]
    pub selector: Vec<String>,
    /// Namespace to watch (default: every namespace the service account may list).
    #[arg(long, value_name = "NAMESPACE")]
    pub service_discovery_namespace: Option<String>,
    /// Port the worker listens on in its pod.
    #[arg(long, default_value_t = 80)]
    pub service_discovery_port: u16,
    /// Scheme of discovered workers.
    #[arg(long, default_value = "http", value_parser = ["http", "https"])]
    pub service_discovery_scheme: String,
    /// PD: labels of prefill pods, as key=value.
    #[arg(long, num_args = 1.., value_name = "KEY=VALUE")]
    pub prefill_selector: Vec<String>,
    /// PD: labels of decode pods, as key=value.
    #[arg(long, num_args = 1.., value_name = "KEY=VALUE")]
    pub decode_selector: Vec<String>,
    /// PD: the prefill pod annotation that holds its KV bootstrap port.
    #[arg(long, default_value = "sglang.ai/bootstrap-port")]
    pub bootstrap_port_annotation: String,
    /// The pod label (or annotation) that names the model a worker serves; pods without it
    /// are asked (`/v1/models`).
    #[arg(long, default_value = "switchyard.dev/model")]
    pub model_id_label: String,
    /// The pod annotation that says where its engine publishes KV events (a port, or
    /// `tcp://{host}:PORT`); `<annotation>-replay` names its replay socket.
    #[arg(long, default_value = "switchyard.dev/kv-events")]
    pub kv_events_annotation: String,
    /// Reach the Kubernetes API with this kubeconfig (default: the in-cluster service account,
    /// else $KUBECONFIG or ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<String>,
    /// Start N simulated workers in-process and route to them (no GPU needed).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub sim_workers: Option<u16>,
    /// Profile of the simulated workers: h100-llama8b, a100-llama8b, l4-llama8b.
    #[arg(long, default_value = "h100-llama8b")]
    pub sim_profile: String,
    /// Simulated workers run this many times faster than real hardware.
    #[arg(long, default_value_t = 1.0, value_parser = positive_secs)]
    pub sim_time_scale: f64,
}

fn redact<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_some("<redacted>"),
        None => s.serialize_none(),
    }
}

/// The longest duration any flag may hold: one year. Longer values can't be added to a clock
/// reading without overflowing, and mean "never" anyway.
pub const MAX_SECS: f64 = 365.0 * 24.0 * 3600.0;

fn unit_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("expected a number between 0 and 1, got '{s}'")),
    }
}

fn positive_number(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("expected a positive number, got '{s}'")),
    }
}

fn seconds(s: &str, scale: f64, allow_zero: bool) -> Result<f64, String> {
    let unit = if scale == 1.0 { "seconds" } else { "milliseconds" };
    let kind = if allow_zero { "non-negative" } else { "positive" };
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (v > 0.0 || (allow_zero && v == 0.0)) && v / scale <= MAX_SECS => Ok(v),
        Ok(v) if v.is_finite() && v / scale > MAX_SECS => {
            Err(format!("expected at most {} {unit} (one year), got '{s}'", MAX_SECS * scale))
        }
        _ => Err(format!("expected a {kind} number of {unit}, got '{s}'")),
    }
}

fn non_negative_secs(s: &str) -> Result<f64, String> {
    seconds(s, 1.0, true)
}

fn positive_secs(s: &str) -> Result<f64, String> {
    seconds(s, 1.0, false)
}

fn positive_ms(s: &str) -> Result<f64, String> {
    seconds(s, 1e3, false)
}

impl Args {
    fn pd_config(&self) -> Result<Option<PdConfig>, ConfigError> {
        let wanted = self.pd_disaggregation || self.vllm_pd_disaggregation;
        if !wanted {
            if !self.prefill.is_empty()
                || !self.decode.is_empty()
                || self.sim_prefill.is_some()
                || self.sim_decode.is_some()
            {
                return Err(ConfigError::Range {
                    flag: "prefill",
                    reason: "and --decode / --sim-prefill / --sim-decode need --pd-disaggregation or --vllm-pd-disaggregation".into(),
                });
            }
            return Ok(None);
        }
        if self.pd_disaggregation && self.vllm_pd_disaggregation {
            return Err(ConfigError::Range {
                flag: "pd-disaggregation",
                reason: "and --vllm-pd-disaggregation are exclusive".into(),
            });
        }
        // Values arrive flattened: a URL starts a worker, a following number or `none` is its port.
        let mut prefill: Vec<(String, Option<u16>)> = Vec::new();
        for v in &self.prefill {
            if v.contains("://") {
                prefill.push((normalize_worker_url(v)?, None));
            } else if let Some(last) = prefill.last_mut().filter(|l| l.1.is_none()) {
                if v != "none" {
                    last.1 = Some(v.parse::<u16>().map_err(|_| ConfigError::Range {
                        flag: "prefill",
                        reason: format!("bootstrap port must be a port number or 'none', got '{v}'"),
                    })?);
                }
            } else {
                return Err(ConfigError::Range { flag: "prefill", reason: format!("'{v}' is not a worker URL") });
            }
        }
        let decode = self.decode.iter().map(|u| normalize_worker_url(u)).collect::<Result<Vec<_>, _>>()?;
        let with_kind = |k: Option<PolicyKind>| k.map(|k| self.policy_config_for(k));
        Ok(Some(PdConfig {
            style: if self.vllm_pd_disaggregation { PdStyle::Vllm } else { PdStyle::Sglang },
            prefill,
            decode,
            prefill_policy: with_kind(self.prefill_policy),
            decode_policy: with_kind(self.decode_policy),
            prefill_timeout: Duration::from_secs_f64(self.pd_prefill_timeout_secs),
        }))
    }

    /// The simulated-fleet flags: a known profile, and a build that has the simulator.
    #[cfg(feature = "demo")]
    fn check_demo(&self) -> Result<(), ConfigError> {
        use switchyard_sim::model::Profile;
        if Profile::by_name(&self.sim_profile).is_none() {
            return Err(ConfigError::Range {
                flag: "sim-profile",
                reason: format!("'{}' is not a known profile ({})", self.sim_profile, Profile::NAMES.join(", ")),
            });
        }
        Ok(())
    }

    #[cfg(not(feature = "demo"))]
    fn check_demo(&self) -> Result<(), ConfigError> {
        if self.sim_workers.is_some() || self.sim_prefill.is_some() || self.sim_decode.is_some() {
            return Err(ConfigError::Range {
                flag: "sim-workers",
                reason: "needs the simulator, which this build leaves out (build with the `demo` feature)".into(),
            });
        }
        Ok(())
    }

    fn policy_config(&self) -> PolicyConfig {
        self.policy_config_for(self.policy)
    }

    fn policy_config_for(&self, kind: PolicyKind) -> PolicyConfig {
        match PolicyConfig::new(kind, self.policy_seed) {
            PolicyConfig::CacheAware(c) => PolicyConfig::CacheAware(CacheAwareConfig {
                cache_threshold: self.cache_threshold,
                balance_abs_threshold: self.balance_abs_threshold,
                balance_rel_threshold: self.balance_rel_threshold,
                eviction_interval: Duration::from_secs(self.eviction_interval),
                max_tree_size: self.max_tree_size,
                max_tree_bytes: (self.max_tree_memory_mb as usize) << 20,
                ..c
            }),
            PolicyConfig::MarginalUtility(c) => PolicyConfig::MarginalUtility(MarginalUtilityConfig {
                objective: self.mu_objective,
                estimator: self.mu_estimator,
                slo_ttft: Duration::from_secs_f64(self.slo_ttft_ms / 1e3),
                slo_tpot: Duration::from_secs_f64(self.slo_tpot_ms / 1e3),
                slo_margin: self.mu_slo_margin,
                holder_margin: self.mu_holder_margin,
                overload: self.mu_overload,
                tie_tolerance: self.mu_tie_tolerance,
                candidates: self.mu_candidates,
                epsilon: self.mu_epsilon,
                tau: Duration::from_secs_f64(self.mu_tau_secs),
                max_tree_size: self.max_tree_size,
                max_tree_bytes: (self.max_tree_memory_mb as usize) << 20,
                report_max_age: MarginalUtilityConfig::report_max_age_for(self.load_check_interval),
                count_other_routers: self.mu_count_other_routers,
                ..c
            }),
            other => other,
        }
    }

    /// Validates the arguments into a [`RouterConfig`].
    pub fn to_config(&self) -> Result<RouterConfig, ConfigError> {
        let worker_urls = self.worker_urls.iter().map(|u| normalize_worker_url(u)).collect::<Result<Vec<_>, _>>()?;
        if !self.health_check_endpoint.starts_with('/') {
            return Err(ConfigError::Range { flag: "health-check-endpoint", reason: "must start with '/'".into() });
        }
        self.check_demo()?;
        if self.max_payload_size == 0 {
            return Err(ConfigError::Range { flag: "max-payload-size", reason: "must be at least 1 byte".into() });
        }
        Ok(RouterConfig {
            host: self.host.clone(),
            port: self.port,
            worker_urls,
            policy: self.policy_config(),
            request_timeout: Duration::from_secs_f64(self.request_timeout_secs),
            stream_idle_timeout: Duration::from_secs_f64(self.stream_idle_timeout_secs),
            request_total_timeout: self.request_total_timeout_secs.map(Duration::from_secs_f64),
            stream_failover_max: self.stream_failover_max,
            max_payload_size: self.max_payload_size,
            listener: ListenerConfig {
                header_read_timeout: Duration::from_secs_f64(self.header_read_timeout_secs),
                body_read_timeout: Duration::from_secs_f64(self.body_read_timeout_secs),
                keep_alive_timeout: Duration::from_secs_f64(self.keep_alive_timeout_secs),
                max_connections: self.max_connections as usize,
            },
            health: HealthConfig {
                interval: Duration::from_secs_f64(self.health_check_interval_secs),
                timeout: Duration::from_secs_f64(self.health_check_timeout_secs),
                failure_threshold: self.health_failure_threshold,
                success_threshold: self.health_success_threshold,
                endpoint: self.health_check_endpoint.clone(),
                panic_threshold: self.health_panic_threshold,
            },
            retry: RetryConfig {
                max_attempts: self.retry_max_retries as usize,
                initial_backoff: Duration::from_millis(self.retry_initial_backoff_ms),
                max_backoff: Duration::from_millis(self.retry_max_backoff_ms.max(self.retry_initial_backoff_ms)),
                multiplier: self.retry_backoff_multiplier,
                jitter: self.retry_jitter_factor,
            },
            circuit_breaker: CircuitBreakerConfig {
                failure_threshold: self.cb_failure_threshold,
                success_threshold: self.cb_success_threshold,
                timeout: Duration::from_secs_f64(self.cb_timeout_duration_secs),
            },
            admission: self.max_concurrent_requests.map(|n| AdmissionConfig {
                max_concurrent: n as usize,
                queue_size: self.queue_size,
                queue_timeout: Duration::from_secs_f64(self.queue_timeout_secs),
            }),
            shutdown_grace: Duration::from_secs_f64(self.shutdown_grace_secs),
            load_check_interval: (self.load_check_interval > 0.0)
                .then(|| Duration::from_secs_f64(self.load_check_interval)),
            api_key: non_empty_key("api-key", &self.api_key)?,
            inference_api_key: non_empty_key("inference-api-key", &self.inference_api_key)?,
            worker_api_key: non_empty_key("worker-api-key", &self.worker_api_key)?,
            allow_unauthenticated_admin: self.allow_unauthenticated_admin,
            worker_allow: self
                .worker_allow_cidr
                .iter()
                .map(|c| c.parse::<Cidr>().map_err(|reason| ConfigError::Range { flag: "worker-allow-cidr", reason }))
                .collect::<Result<_, _>>()?,
            max_workers: self.max_workers as usize,
            worker_startup_timeout: Duration::from_secs_f64(self.worker_startup_timeout_secs),
            remove_unhealthy_workers: self.remove_unhealthy_workers,
            pd: self.pd_config()?,
            prometheus_port: self.prometheus_port,
            prometheus_host: self.prometheus_host.clone(),
            dp_aware: self.dp_aware,
            tls: self.tls_config()?,
            discovery: self.discovery_config()?,
            kv_events: self.kv_events_config()?,
            tokenizer_path: self.tokenizer_path_checked()?,
            tokenizer_cache_bytes: (self.tokenizer_cache_mb as usize) << 20,
        })
    }

    /// `--tokenizer-path`, else `--model-path`, loaded once now so a bad one fails start-up.
    fn tokenizer_path_checked(&self) -> Result<Option<std::path::PathBuf>, ConfigError> {
        let (flag, path) = match (&self.tokenizer_path, &self.model_path) {
            (Some(p), _) => ("tokenizer-path", p),
            (None, Some(p)) => ("model-path", p),
            (None, None) => return Ok(None),
        };
        #[cfg(feature = "tokenizer")]
        {
            crate::tokenize::PromptTokenizer::load(path)
                .map_err(|e| ConfigError::Range { flag, reason: e.to_string() })?;
            Ok(Some(path.into()))
        }
        #[cfg(not(feature = "tokenizer"))]
        {
            let _ = path;
            Err(ConfigError::Range { flag, reason: "this build has no tokenizer (the `tokenizer` feature)".into() })
        }
    }

    /// `--kv-events-endpoint` and friends: per worker in flag order, or one `{host}` template.
    fn kv_events_config(&self) -> Result<Option<crate::kv_events::KvEventsConfig>, ConfigError> {
        use crate::kv_events::{Endpoints, KvEventsConfig};
        if self.kv_events_endpoint.is_empty() {
            if !self.kv_events_replay_endpoint.is_empty() {
                return Err(ConfigError::Range {
                    flag: "kv-events-replay-endpoint",
                    reason: "needs --kv-events-endpoint".into(),
                });
            }
            return Ok(None);
        }
        for (flag, list) in [
            ("kv-events-endpoint", &self.kv_events_endpoint),
            ("kv-events-replay-endpoint", &self.kv_events_replay_endpoint),
        ] {
            for e in list {
                let probe = e.replace("{host}", "127.0.0.1");
                if switchyard_kv_events::zmtp::tcp_address(&probe).is_none() || probe.contains("tcp://*") {
                    return Err(ConfigError::Range {
                        flag,
                        reason: format!("'{e}' is not tcp://HOST:PORT (HOST may be {{host}}, the worker's host)"),
                    });
                }
            }
        }
        let templated = self.kv_events_endpoint.len() == 1 && self.kv_events_endpoint[0].contains("{host}");
        let replay_count = self.kv_events_replay_endpoint.len();
        let mut config = KvEventsConfig {
            by_url: Vec::new(),
            template: None,
            topic: self.kv_events_topic.clone(),
            max_index_bytes: (self.kv_index_max_mb as usize) << 20,
            max_message_bytes: crate::kv_events::MAX_MESSAGE_BYTES,
        };
        if templated {
            if replay_count > 1 {
                return Err(ConfigError::Range {
                    flag: "kv-events-replay-endpoint",
                    reason: "with a {host} template for events, give one replay template".into(),
                });
            }
            config.template = Some(Endpoints {
                events: self.kv_events_endpoint[0].clone(),
                replay: self.kv_events_replay_endpoint.first().cloned(),
            });
            return Ok(Some(config));
        }
        let mut urls: Vec<String> = self.worker_urls.clone();
        urls.extend(self.prefill.iter().filter(|v| v.contains("://")).cloned());
        urls.extend(self.decode.iter().cloned());
        let urls = urls.iter().map(|u| normalize_worker_url(u)).collect::<Result<Vec<_>, _>>()?;
        if urls.len() != self.kv_events_endpoint.len() {
            return Err(ConfigError::Range {
                flag: "kv-events-endpoint",
                reason: format!(
                    "gives {} endpoints for {} workers: give one per worker (--worker-urls, then --prefill, then --decode) or one template with {{host}}",
                    self.kv_events_endpoint.len(),
                    urls.len()
                ),
            });
        }
        if replay_count != 0 && replay_count != urls.len() {
            return Err(ConfigError::Range {
                flag: "kv-events-replay-endpoint",
                reason: format!("gives {replay_count} endpoints for {} workers", urls.len()),
            });
        }
        config.by_url = urls
            .into_iter()
            .zip(&self.kv_events_endpoint)
            .enumerate()
            .map(|(i, (url, e))| {
                (url, Endpoints { events: e.clone(), replay: self.kv_events_replay_endpoint.get(i).cloned() })
            })
            .collect();
        Ok(Some(config))
    }

    /// Both or neither of a certificate and its key.
    fn cert_key(
        &self,
        cert: (&'static str, &Option<String>),
        key: (&'static str, &Option<String>),
    ) -> Result<Option<CertKeyPaths>, ConfigError> {
        match (cert.1, key.1) {
            (Some(c), Some(k)) => Ok(Some(CertKeyPaths { cert: c.into(), key: k.into() })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(ConfigError::Range { flag: cert.0, reason: format!("needs --{}", key.0) }),
            (None, Some(_)) => Err(ConfigError::Range { flag: key.0, reason: format!("needs --{}", cert.0) }),
        }
    }

    /// The TLS settings, their files read and checked now (a bad one fails start-up in one line).
    fn tls_config(&self) -> Result<TlsConfig, ConfigError> {
        let config = TlsConfig {
            listener: self.cert_key(("tls-cert-path", &self.tls_cert_path), ("tls-key-path", &self.tls_key_path))?,
            worker_ca: self.worker_ca_cert.as_ref().map(Into::into),
            worker_identity: self.cert_key(
                ("worker-client-cert", &self.worker_client_cert),
                ("worker-client-key", &self.worker_client_key),
            )?,
        };
        if let Some(paths) = &config.listener {
            crate::tls::server_config(paths)
                .map_err(|e| ConfigError::Range { flag: "tls-cert-path", reason: e.to_string() })?;
        }
        if config.worker_ca.is_some() || config.worker_identity.is_some() {
            let flag = if config.worker_identity.is_some() { "worker-client-cert" } else { "worker-ca-cert" };
            crate::tls::client_config(&config).map_err(|e| ConfigError::Range { flag, reason: e.to_string() })?;
        }
        Ok(config)
    }

    fn discovery_config(&self) -> Result<Option<DiscoveryConfig>, ConfigError> {
        let selectors = [
            ("selector", &self.selector),
            ("prefill-selector", &self.prefill_selector),
            ("decode-selector", &self.decode_selector),
        ];
        let mut parsed = Vec::new();
        for (flag, values) in selectors {
            parsed.push(values.iter().map(|v| parse_label(flag, v)).collect::<Result<Vec<_>, _>>()?);
        }
        let [selector, prefill_selector, decode_selector] = <[_; 3]>::try_from(parsed).unwrap_or_default();
        if !self.service_discovery {
            if let Some((flag, _)) = selectors.iter().find(|(_, v)| !v.is_empty()) {
                return Err(ConfigError::Range { flag, reason: "needs --service-discovery".into() });
            }
            return Ok(None);
        }
        if !cfg!(feature = "kubernetes") {
            return Err(ConfigError::Range {
                flag: "service-discovery",
                reason: "needs Kubernetes support, which this build leaves out (build with the `kubernetes` feature)"
                    .into(),
            });
        }
        let pd = self.pd_disaggregation || self.vllm_pd_disaggregation;
        if pd && (prefill_selector.is_empty() || decode_selector.is_empty()) {
            return Err(ConfigError::Range {
                flag: "service-discovery",
                reason: "in PD mode needs --prefill-selector and --decode-selector".into(),
            });
        }
        if !pd && selector.is_empty() {
            return Err(ConfigError::Range { flag: "service-discovery", reason: "needs --selector key=value".into() });
        }
        if !pd && (!prefill_selector.is_empty() || !decode_selector.is_empty()) {
            return Err(ConfigError::Range {
                flag: "prefill-selector",
                reason: "and --decode-selector need --pd-disaggregation or --vllm-pd-disaggregation".into(),
            });
        }
        if self.service_discovery_port == 0 {
            return Err(ConfigError::Range {
                flag: "service-discovery-port",
                reason: "must be a port number (1-65535)".into(),
            });
        }
        for (flag, key) in [
            ("bootstrap-port-annotation", &self.bootstrap_port_annotation),
            ("model-id-label", &self.model_id_label),
            ("kv-events-annotation", &self.kv_events_annotation),
        ] {
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(ConfigError::Range { flag, reason: format!("'{key}' is not a label key") });
            }
        }
        Ok(Some(DiscoveryConfig {
            namespace: self.service_discovery_namespace.clone().filter(|n| !n.is_empty()),
            selector,
            prefill_selector,
            decode_selector,
            port: self.service_discovery_port,
            scheme: self.service_discovery_scheme.clone(),
            bootstrap_port_annotation: self.bootstrap_port_annotation.clone(),
            model_label: self.model_id_label.clone(),
            kv_events_annotation: self.kv_events_annotation.clone(),
            kubeconfig: self.kubeconfig.as_ref().map(Into::into),
        }))
    }
}

/// A `key=value` label requirement.
fn parse_label(flag: &'static str, v: &str) -> Result<(String, String), ConfigError> {
    match v.split_once('=') {
        Some((k, val)) if !k.trim().is_empty() && !val.contains('=') => {
            Ok((k.trim().to_owned(), val.trim().to_owned()))
        }
        _ => Err(ConfigError::Range { flag, reason: format!("expected key=value, got '{v}'") }),
    }
}

/// A key given as an empty string would silently turn authentication off: refused.
fn non_empty_key(flag: &'static str, key: &Option<String>) -> Result<Option<String>, ConfigError> {
    match key {
        Some(k) if k.trim().is_empty() => {
            Err(ConfigError::Range { flag, reason: "must not be empty (leave it unset for no key)".into() })
        }
        Some(k) if k.chars().any(|c| c.is_control() || c == ' ') => {
            Err(ConfigError::Range { flag, reason: "must not contain spaces or control characters".into() })
        }
        other => Ok(other.clone()),
    }
}

/// What the command line asked for.
#[derive(Debug)]
pub enum ParseOutcome {
    /// Run with these arguments.
    Run(Box<Args>),
    /// Print this text (help, version) and exit 0.
    Print(String),
    /// Print this one-line error and exit 2.
    Fail(String),
}

/// Parses the command line without exiting, so errors can be printed as one line.
pub fn parse_args<I, T>(args: I) -> ParseOutcome
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut argv: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    if let Some(path) = super::file::config_path(&argv) {
        let from_file = match super::file::args_from_file(&path) {
            Ok(a) => a,
            Err(e) => return ParseOutcome::Fail(format!("error: {e}")),
        };
        // Values from the file alone first, so an error names the file.
        let mut alone = vec![argv.first().cloned().unwrap_or_else(|| "switchyard".into())];
        alone.extend(from_file.iter().cloned());
        if let Err(e) = Args::try_parse_from(&alone) {
            let first = e.to_string().lines().next().unwrap_or("invalid value").to_owned();
            return ParseOutcome::Fail(format!(
                "error: in config file {path}: {}",
                first.trim_start_matches("error: ")
            ));
        }
        let mut merged = alone;
        merged.extend(argv.drain(1..));
        argv = merged;
    }
    match Args::try_parse_from(argv) {
        Ok(a) if a.print_config => match toml::to_string(&a) {
            Ok(text) => ParseOutcome::Print(text),
            Err(e) => ParseOutcome::Fail(format!("error: cannot print the configuration: {e}")),
        },
        Ok(a) => match a.to_config() {
            Ok(_) => ParseOutcome::Run(Box::new(a)),
            Err(e) => ParseOutcome::Fail(format!("error: {e}")),
        },
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                ParseOutcome::Print(e.to_string())
            }
            _ => {
                let text = e.to_string();
                ParseOutcome::Fail(text.lines().next().unwrap_or("error: invalid arguments").to_owned())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_sglang_router() {
        let ParseOutcome::Run(a) = parse_args(["switchyard"]) else { panic!("defaults must parse") };
        let c = a.to_config().unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 30000));
        assert_eq!(c.request_timeout, Duration::from_secs(1800));
        assert_eq!(c.max_payload_size, 64 * 1024 * 1024);
        assert_eq!((c.health.failure_threshold, c.health.success_threshold), (3, 2));
        assert_eq!(c.health.endpoint, "/health");
        // Not sglang-router's (it has no health panic): Envoy's default.
        assert_eq!(c.health.panic_threshold, 0.5);
        let ParseOutcome::Run(off) = parse_args(["switchyard", "--health-panic-threshold", "0"]) else {
            panic!("0 parses")
        };
        assert_eq!(off.to_config().unwrap().health.panic_threshold, 0.0);
        // One default for the command line, the library's config and the simulator's polls.
        let polls = Some(Duration::from_secs_f64(super::super::DEFAULT_LOAD_CHECK_INTERVAL_SECS));
        assert_eq!((c.load_check_interval, RouterConfig::default().load_check_interval), (polls, polls));
        let ParseOutcome::Run(a) = parse_args(["switchyard", "--policy", "cache_aware", "--max-tree-size", "1000"])
        else {
            panic!()
        };
        let PolicyConfig::CacheAware(ca) = a.to_config().unwrap().policy else { panic!("not cache_aware") };
        assert_eq!((ca.cache_threshold, ca.balance_abs_threshold, ca.balance_rel_threshold), (0.3, 64, 1.5));
        assert_eq!((ca.eviction_interval, ca.max_tree_size), (Duration::from_secs(120), 1000));
        let mu = |args: &[&str]| {
            let ParseOutcome::Run(a) = parse_args(args.iter().copied()) else { panic!("{args:?}") };
            let PolicyConfig::MarginalUtility(c) = a.to_config().unwrap().policy else { panic!("not mu") };
            c
        };
        assert!(!mu(&["switchyard", "--policy", "marginal_utility"]).count_other_routers);
        assert!(mu(&["switchyard", "--policy", "marginal_utility", "--mu-count-other-routers"]).count_other_routers);
        assert_eq!(mu(&["switchyard", "--policy", "marginal_utility"]).holder_margin, 1.0);
        // The library's default forgetting time is the command line's (the benchmark scales it).
        let (cli, lib) = (mu(&["switchyard", "--policy", "marginal_utility"]), MarginalUtilityConfig::default());
        assert_eq!((cli.tau, cli.report_max_age), (lib.tau, lib.report_max_age));
        assert_eq!(mu(&["switchyard", "--policy", "marginal_utility", "--mu-holder-margin", "0.6"]).holder_margin, 0.6);
        assert!(matches!(
            parse_args(["switchyard", "--policy", "marginal_utility", "--mu-holder-margin", "1.5"]),
            ParseOutcome::Fail(e) if e.contains("between 0 and 1")
        ));
    }

    #[test]
    fn kv_event_endpoints_per_worker_or_one_template() {
        let config = |args: &[&str]| {
            let mut argv = vec!["switchyard", "--worker-urls", "http://127.0.0.1:1", "http://127.0.0.1:2"];
            argv.extend_from_slice(args);
            match parse_args(argv) {
                ParseOutcome::Run(a) => Ok(a.to_config().unwrap()),
                ParseOutcome::Fail(e) => Err(e),
                ParseOutcome::Print(p) => panic!("{p}"),
            }
        };
        let c = config(&["--kv-events-endpoint", "tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558"]).unwrap();
        let kv = c.kv_events.unwrap();
        assert_eq!(kv.by_url.len(), 2);
        assert_eq!(
            (kv.by_url[1].0.as_str(), kv.by_url[1].1.events.as_str()),
            ("http://127.0.0.1:2", "tcp://127.0.0.1:5558")
        );
        let c =
            config(&["--kv-events-endpoint", "tcp://{host}:5557", "--kv-events-replay-endpoint", "tcp://{host}:5558"])
                .unwrap();
        let t = c.kv_events.unwrap().template.unwrap();
        assert_eq!((t.events.as_str(), t.replay.as_deref()), ("tcp://{host}:5557", Some("tcp://{host}:5558")));
        let err = config(&["--kv-events-endpoint", "tcp://127.0.0.1:5557"]).unwrap_err();
        assert!(err.to_string().contains("1 endpoints for 2 workers"), "{err}");
        let err = config(&["--kv-events-endpoint", "ipc:///tmp/kv", "tcp://127.0.0.1:1"]).unwrap_err();
        assert!(err.to_string().contains("not tcp://HOST:PORT"), "{err}");
        let err = config(&["--kv-events-replay-endpoint", "tcp://127.0.0.1:1"]).unwrap_err();
        assert!(err.to_string().contains("needs --kv-events-endpoint"), "{err}");
        assert!(config(&["--tokenizer-path", "/nonexistent/model"]).unwrap_err().contains("tokenizer"));
    }

    fn write(name: &str, text: &str) -> String {
        let path = std::env::temp_dir().join(format!("switchyard-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    }

    #[test]
    fn config_file_with_command_line_precedence() {
        let toml = write("a.toml", "port = 31000\npolicy = \"cache_aware\"\nworker-urls = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\nmax_tree_size = 1000\nremove_unhealthy_workers = true\n");
        let ParseOutcome::Run(a) = parse_args(["switchyard", "--config", &toml, "--port", "32000"]) else { panic!() };
        assert_eq!(a.port, 32000, "command line wins");
        assert_eq!(a.policy, PolicyKind::CacheAware);
        assert_eq!((a.worker_urls.len(), a.max_tree_size, a.remove_unhealthy_workers), (2, 1000, true));
        let yaml =
            write("b.yaml", "port: 31001\nworker_urls:\n  - http://127.0.0.1:3\nhealth-check-interval-secs: 0.5\n");
        let ParseOutcome::Run(a) = parse_args(["switchyard", "--config", &yaml]) else { panic!() };
        assert_eq!((a.port, a.worker_urls.len(), a.health_check_interval_secs), (31001, 1, 0.5));
        // The effective configuration prints as TOML that reads back the same.
        let ParseOutcome::Print(text) =
            parse_args(["switchyard", "--config", &toml, "--api-key", "s3cret", "--print-config"])
        else {
            panic!()
        };
        assert!(text.contains("port = 31000") && text.contains("<redacted>") && !text.contains("s3cret"), "{text}");
    }

    #[test]
    fn bad_config_files_name_the_key() {
        for (name, text, needle) in [
            ("c.toml", "prot = 1\n", "'prot'"),
            ("d.toml", "port = \"high\"\n", "--port"),
            ("e.yaml", "policy: [1, {a: 2}]\n", "'policy'"),
            ("f.toml", "remove_unhealthy_workers = 3\n", "'remove_unhealthy_workers'"),
            ("g.toml", "port = \n", "not valid TOML"),
        ] {
            let path = write(name, text);
            match parse_args(["switchyard", "--config", &path]) {
                ParseOutcome::Fail(msg) => assert!(msg.contains(needle) && !msg.contains('\n'), "{name}: {msg}"),
                other => panic!("{name} accepted: {other:?}"),
            }
        }
        assert!(
            matches!(parse_args(["switchyard", "--config", "/no/such/file.toml"]), ParseOutcome::Fail(m) if m.contains("cannot read"))
        );
    }

    #[test]
    fn pd_flags_parse_like_sglang_router() {
        let ParseOutcome::Run(a) = parse_args([
            "switchyard",
            "--pd-disaggregation",
            "--prefill",
            "http://p1:8000",
            "9000",
            "--prefill",
            "http://p2:8000",
            "--prefill",
            "http://p3:8000",
            "none",
            "--decode",
            "http://d1:8000",
            "--decode",
            "http://d2:8000",
            "--decode-policy",
            "power_of_two",
        ]) else {
            panic!()
        };
        let pd = a.to_config().unwrap().pd.unwrap();
        assert_eq!(pd.style, PdStyle::Sglang);
        assert_eq!(
            pd.prefill,
            vec![
                ("http://p1:8000".into(), Some(9000)),
                ("http://p2:8000".into(), None),
                ("http://p3:8000".into(), None)
            ]
        );
        assert_eq!(pd.decode.len(), 2);
        assert!(pd.prefill_policy.is_none() && matches!(pd.decode_policy, Some(PolicyConfig::PowerOfTwo(_))));
        assert!(matches!(parse_args(["switchyard", "--prefill", "http://p:1"]), ParseOutcome::Fail(_)));
        assert!(matches!(
            parse_args(["switchyard", "--pd-disaggregation", "--prefill", "http://p:1", "port"]),
            ParseOutcome::Fail(_)
        ));
    }

    #[test]
    fn bad_values_fail_with_one_line() {
        for argv in [
            vec!["switchyard", "--port", "x"],
            vec!["switchyard", "--policy", "nope"],
            vec!["switchyard", "--worker-urls", "localhost:8000"],
            vec!["switchyard", "--health-failure-threshold", "0"],
            vec!["switchyard", "--request-timeout-secs", "-1"],
            vec!["switchyard", "--no-such-flag"],
            vec!["switchyard", "--cache-threshold", "1.5"],
            vec!["switchyard", "--health-panic-threshold", "1.5"],
            vec!["switchyard", "--health-panic-threshold", "-0.1"],
            vec!["switchyard", "--request-timeout-secs", "1e20"],
            vec!["switchyard", "--queue-timeout-secs", "1e300"],
            vec!["switchyard", "--cb-timeout-duration-secs", "1e25"],
            vec!["switchyard", "--slo-ttft-ms", "1e300"],
            vec!["switchyard", "--retry-max-backoff-ms", "18446744073709551615"],
            vec!["switchyard", "--shutdown-grace-secs", "inf"],
            vec!["switchyard", "--mu-tau-secs", "NaN"],
            vec!["switchyard", "--api-key", ""],
            vec!["switchyard", "--inference-api-key", "  "],
            vec!["switchyard", "--worker-api-key", "a b"],
            vec!["switchyard", "--worker-allow-cidr", "10.0.0.0/33"],
            vec!["switchyard", "--worker-urls", "http://0.0.0.0:8000"],
            vec!["switchyard", "--max-connections", "0"],
        ] {
            match parse_args(argv.clone()) {
                ParseOutcome::Fail(msg) => {
                    assert!(!msg.contains('\n') && msg.starts_with("error"), "{argv:?}: {msg}")
                }
                other => panic!("{argv:?} accepted: {other:?}"),
            }
        }
    }
}
