//! Typed configuration: the command line (sglang-router's flag names where they exist),
//! validation, and the per-policy config types.

mod address;
mod cli;
mod file;

/// Seconds between polls of each worker's own load report, by default (`--load-check-interval`).
/// The discrete-event simulator polls its engines as often. marginal_utility reads the reports
/// (its queue and KV guards), and past the knee they go stale fast: at 5 s it lost a fifth of its
/// goodput on PD traffic, live as in the DES (pd-mixed at 1.4x the knee: live 48.0 against
/// 60-63 req/s at 1 s; DES 61.2 against 78.6), and up to a quarter on conversations in the DES
/// (README, "Load reports"). Not everywhere: live on a mixed fleet at 1.4x it did 8 % better at
/// 5 s (three runs each), and in the DES four scenarios at 1.4-1.6x gain 3-10 % at 5 s. A poll is
/// one small GET per worker.
pub const DEFAULT_LOAD_CHECK_INTERVAL_SECS: f64 = 1.0;

pub use address::{canonical_host, worker_ip_allowed, Cidr};
pub use cli::{parse_args, Args, ParseOutcome, MAX_SECS};

use std::time::Duration;

use crate::policies::PolicyConfig;

/// Health-check settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Time between probes of each worker.
    pub interval: Duration,
    /// Per-probe timeout.
    pub timeout: Duration,
    /// Consecutive failures that make a healthy worker unhealthy.
    pub failure_threshold: u32,
    /// Consecutive successes that make an unhealthy worker healthy again.
    pub success_threshold: u32,
    /// Path probed on each worker.
    pub endpoint: String,
    /// Below this share of a pool's workers passing their probes, requests go to every worker
    /// of it that has served (health panic; 0: never). See `WorkerRegistry::with_panic_threshold`.
    pub panic_threshold: f64,
}

/// Envoy's default panic threshold: below half the pool healthy, a probe failing everywhere at
/// once is likelier the probes' trouble (or load) than half a fleet dying together.
pub const DEFAULT_HEALTH_PANIC_THRESHOLD: f64 = 0.5;

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            failure_threshold: 3,
            success_threshold: 2,
            endpoint: "/health".into(),
            panic_threshold: DEFAULT_HEALTH_PANIC_THRESHOLD,
        }
    }
}

/// Everything the router needs to run, validated.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Bind address.
    pub host: String,
    /// Bind port.
    pub port: u16,
    /// Worker base URLs (`http://host:port`).
    pub worker_urls: Vec<String>,
    /// The routing policy.
    pub policy: PolicyConfig,
    /// Time for a worker to answer: its response headers, and a whole answer's body.
    pub request_timeout: Duration,
    /// Longest gap between two chunks of a worker's stream.
    pub stream_idle_timeout: Duration,
    /// Longest a request may take in all, streams included (`None` = no such limit).
    pub request_total_timeout: Option<Duration>,
    /// Continuations of a broken stream on other workers (0 = off).
    pub stream_failover_max: u32,
    /// Largest accepted request body, in bytes.
    pub max_payload_size: usize,
    /// Client connections: timeouts and the connection cap.
    pub listener: ListenerConfig,
    /// Health checking.
    pub health: HealthConfig,
    /// Retries of failed attempts (nothing sent to the client yet).
    pub retry: RetryConfig,
    /// Per-worker circuit breaker.
    pub circuit_breaker: CircuitBreakerConfig,
    /// Admission control (`None` = unlimited concurrency).
    pub admission: Option<AdmissionConfig>,
    /// Time in-flight requests get to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// How often workers' own load reports are polled (`None` = never).
    pub load_check_interval: Option<Duration>,
    /// Bearer token for admin routes (`None` = open).
    pub api_key: Option<String>,
    /// Bearer token for inference routes (`None` = open).
    pub inference_api_key: Option<String>,
    /// Bearer token sent to workers.
    pub worker_api_key: Option<String>,
    /// Serve admin changes without a key on a non-loopback bind.
    pub allow_unauthenticated_admin: bool,
    /// Networks workers may live in (empty = anywhere but link-local and metadata addresses).
    pub worker_allow: Vec<Cidr>,
    /// Workers registered at once.
    pub max_workers: usize,
    /// How long start-up waits for a first healthy worker (it never fails because of it).
    pub worker_startup_timeout: Duration,
    /// Remove workers from the registry when the health checker marks them unhealthy.
    pub remove_unhealthy_workers: bool,
    /// Prefill/decode disaggregation, when enabled.
    pub pd: Option<PdConfig>,
    /// Separate metrics listener port (`None` = only `/metrics` on the main port).
    pub prometheus_port: Option<u16>,
    /// Address of the metrics listener.
    pub prometheus_host: String,
    /// `--dp-aware`: a data-parallel engine is one routing target per rank.
    pub dp_aware: bool,
    /// TLS to workers and clients.
    pub tls: crate::tls::TlsConfig,
    /// Kubernetes service discovery, when enabled.
    pub discovery: Option<DiscoveryConfig>,
    /// Engine KV event subscriptions (`--kv-events-endpoint`).
    pub kv_events: Option<crate::kv_events::KvEventsConfig>,
    /// The model's tokenizer (`--tokenizer-path` / `--model-path`): a directory or tokenizer.json.
    pub tokenizer_path: Option<std::path::PathBuf>,
    /// Bound on the tokenizer's cache of prompt pieces (`--tokenizer-cache-mb`), bytes.
    pub tokenizer_cache_bytes: usize,
}

/// Kubernetes service discovery (sglang-router's flags): pods matching a selector are workers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DiscoveryConfig {
    /// Namespace watched (`None`: every namespace the service account may list).
    pub namespace: Option<String>,
    /// Labels a regular worker's pod carries (all of them).
    pub selector: Vec<(String, String)>,
    /// PD: labels of prefill pods.
    pub prefill_selector: Vec<(String, String)>,
    /// PD: labels of decode pods.
    pub decode_selector: Vec<(String, String)>,
    /// The port workers listen on in their pods.
    pub port: u16,
    /// `http` or `https`.
    pub scheme: String,
    /// Annotation holding a prefill pod's KV bootstrap port.
    pub bootstrap_port_annotation: String,
    /// Label (or annotation) holding the model a pod serves; absent, the worker is asked.
    pub model_label: String,
    /// Annotation holding where a pod's engine publishes KV events: a port, or a
    /// `tcp://{host}:PORT` endpoint; `<annotation>-replay` likewise for its replay socket.
    pub kv_events_annotation: String,
    /// A kubeconfig file to reach the API server with (`None`: in-cluster service account,
    /// else `$KUBECONFIG` / `~/.kube/config`).
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// Limits on client connections.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// Time to send a request's headers, from its first byte.
    pub header_read_timeout: Duration,
    /// Time to send a request's body, once its headers arrived.
    pub body_read_timeout: Duration,
    /// Time an idle keep-alive connection stays open.
    pub keep_alive_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            keep_alive_timeout: Duration::from_secs(75),
            max_connections: 8192,
        }
    }
}

/// Retry with exponential backoff and jitter (pingora/linkerd style: only before anything
/// reached the client, each attempt on a different worker).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Attempts in total, the first included.
    pub max_attempts: usize,
    /// Backoff before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound on one backoff.
    pub max_backoff: Duration,
    /// Growth factor per attempt.
    pub multiplier: f64,
    /// ± fraction of random jitter on each backoff.
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(30),
            multiplier: 1.5,
            jitter: 0.2,
        }
    }
}

impl RetryConfig {
    /// Backoff before attempt `attempt` (1 = the first retry), jittered by `unit` ∈ [0, 1).
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.powi(attempt.saturating_sub(1) as i32);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let jittered = capped * (1.0 + self.jitter * (2.0 * unit - 1.0));
        Duration::from_secs_f64(jittered.max(0.0))
    }
}

/// Circuit breaker thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreakerConfig {
    /// Consecutive worker-side failures that open the circuit.
    pub failure_threshold: u32,
    /// Consecutive successes in half-open state that close it.
    pub success_threshold: u32,
    /// Time open before a single probe request is let through.
    pub timeout: Duration,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self { failure_threshold: 10, success_threshold: 3, timeout: Duration::from_secs(60) }
    }
}

/// The KV-transfer protocol of a PD fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdStyle {
    /// SGLang: bootstrap host/port/room, both legs at once.
    Sglang,
    /// vLLM: prefill with `kv_transfer_params`, then decode.
    Vllm,
}

/// Prefill/decode mode.
#[derive(Debug, Clone, PartialEq)]
pub struct PdConfig {
    /// Protocol.
    pub style: PdStyle,
    /// Prefill workers and their bootstrap ports.
    pub prefill: Vec<(String, Option<u16>)>,
    /// Decode workers.
    pub decode: Vec<String>,
    /// Policy of the prefill pool when set separately.
    pub prefill_policy: Option<PolicyConfig>,
    /// Policy of the decode pool when set separately.
    pub decode_policy: Option<PolicyConfig>,
    /// Longest wait for the prefill leg (a prompt and one token), far below the request
    /// timeout, so a hung prefill worker costs one retry rather than the whole timeout.
    pub prefill_timeout: Duration,
}

/// Admission control: a concurrency limit with a bounded FIFO queue in front of it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    /// Requests proxied at once.
    pub max_concurrent: usize,
    /// Requests allowed to wait for a slot; beyond this, 429.
    pub queue_size: usize,
    /// Longest wait for a slot; beyond this, 408.
    pub queue_timeout: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 30000,
            worker_urls: Vec::new(),
            policy: PolicyConfig::default(),
            request_timeout: Duration::from_secs(1800),
            stream_idle_timeout: Duration::from_secs(300),
            stream_failover_max: 1,
            request_total_timeout: None,
            max_payload_size: 64 << 20,
            listener: ListenerConfig::default(),
            health: HealthConfig::default(),
            retry: RetryConfig::default(),
            circuit_breaker: CircuitBreakerConfig::default(),
            admission: None,
            shutdown_grace: Duration::from_secs(180),
            load_check_interval: Some(Duration::from_secs_f64(DEFAULT_LOAD_CHECK_INTERVAL_SECS)),
            api_key: None,
            inference_api_key: None,
            worker_api_key: None,
            allow_unauthenticated_admin: false,
            worker_allow: Vec::new(),
            max_workers: 4096,
            worker_startup_timeout: Duration::from_secs(0),
            remove_unhealthy_workers: false,
            pd: None,
            prometheus_port: None,
            prometheus_host: "127.0.0.1".into(),
            dp_aware: false,
            tls: crate::tls::TlsConfig::default(),
            discovery: None,
            kv_events: None,
            tokenizer_path: None,
            tokenizer_cache_bytes: 64 << 20,
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A worker URL is not `http(s)://host:port`.
    #[error("invalid worker URL '{url}': {reason}")]
    WorkerUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A numeric setting is out of range.
    #[error("--{flag} {reason}")]
    Range {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl RouterConfig {
    /// Whether admin changes are served without a key: on a loopback bind, or when the
    /// operator asked for it. With `--api-key` they need the key either way.
    pub fn admin_open_without_key(&self) -> bool {
        self.allow_unauthenticated_admin
            || canonical_host(&self.host).is_ok_and(|(_, ip)| ip.is_some_and(|ip| ip.is_loopback()))
    }
}

/// Checks and normalises a worker URL: scheme http/https, a host, a port; no path; the host in
/// its one canonical spelling (see [`canonical_host`]). Returns it without a trailing slash.
pub fn normalize_worker_url(url: &str) -> Result<String, ConfigError> {
    let err = |reason: &str| ConfigError::WorkerUrl { url: url.to_owned(), reason: reason.to_owned() };
    let uri: hyper::Uri = url.parse().map_err(|_| err("not a URL"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        Some(_) => return Err(err("scheme must be http or https")),
        None => return Err(err("missing scheme (http:// or https://)")),
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(err("must not contain credentials"));
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| err("missing host"))?;
    let (host, _) = canonical_host(host).map_err(|e| err(&e))?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(err("must not contain a path"));
    }
    if uri.query().is_some() {
        return Err(err("must not contain a query"));
    }
    let scheme = uri.scheme_str().unwrap_or("http");
    let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    Ok(format!("{scheme}://{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let r = RetryConfig::default();
        assert_eq!(r.backoff(1, 0.5), Duration::from_millis(50));
        assert_eq!(r.backoff(2, 0.5), Duration::from_millis(75));
        assert_eq!(r.backoff(100, 0.5), Duration::from_secs(30));
        assert_eq!(r.backoff(1, 0.0), Duration::from_millis(40));
        assert!(r.backoff(1, 0.999) < Duration::from_millis(61));
    }

    #[test]
    fn worker_urls_are_validated_and_normalised() {
        assert_eq!(normalize_worker_url("http://127.0.0.1:8000/").unwrap(), "http://127.0.0.1:8000");
        assert_eq!(normalize_worker_url("http://localhost").unwrap(), "http://127.0.0.1:80");
        assert_eq!(normalize_worker_url("http://127.1:8000").unwrap(), "http://127.0.0.1:8000");
        assert_eq!(normalize_worker_url("HTTP://[::1]:80").unwrap(), "http://[::1]:80");
        for bad in [
            "127.0.0.1:8000",
            "ftp://x:1",
            "http://x:1/v1",
            "http://",
            "not a url",
            "http://x:1?a=b",
            "http://0.0.0.0:8000",
            "http://user:pw@x:1",
        ] {
            assert!(normalize_worker_url(bad).is_err(), "{bad} accepted");
        }
    }
}
