//! The simulated worker's HTTP server: SGLang- and vLLM-compatible endpoints over the
//! performance model, fault injection, and an accept loop that can refuse connections.

mod api;
pub mod body;
pub mod driver;
pub mod faults;
mod metrics;
pub mod pd;
pub mod wire;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::model::{Engine, EngineStats, Profile};
use driver::EngineHandle;
pub use faults::{FaultError, Faults};
use switchyard_kv_events::publisher::Publisher;

/// What part a worker plays in a fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Prefill and decode on the same worker.
    #[default]
    Plain,
    /// Prefill only (PD disaggregation).
    Prefill,
    /// Decode only (PD disaggregation).
    Decode,
}

/// Everything needed to start one simulated worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind (0 = any free port).
    pub port: u16,
    /// Performance profile.
    pub profile: Profile,
    /// Speed factor relative to the profile (2.0 = twice as fast).
    pub speed: f64,
    /// Real time runs this many times faster than simulated hardware time.
    pub time_scale: f64,
    /// Seed of the worker's RNG (step noise, output lengths, error injection).
    pub seed: u64,
    /// Model name served.
    pub model_name: String,
    /// Role in a PD fleet.
    pub role: Role,
    /// Median output length (tokens) when `ignore_eos` is not set.
    pub output_len_median: u32,
    /// Faults in force at start.
    pub faults: Faults,
    /// Prefill role: port of the KV bootstrap server (0 or unset = any free port).
    pub bootstrap_port: Option<u16>,
    /// Decode role: how long (real seconds) to wait for a prefill worker's KV. 300 by default,
    /// SGLang's own (`SGLANG_DISAGGREGATION_WAITING_TIMEOUT`): past a PD fleet's knee prefill
    /// queues run tens of seconds, and a decode worker that gave up after 10 s turned late
    /// requests into 503s a real engine would have served (pd-mixed at 1.4x, 12,000 requests,
    /// live: 7,700-9,100 errors under every policy).
    pub pd_timeout_secs: f64,
    /// KV transfer link bandwidth between prefill and decode workers, GB/s.
    pub kv_link_gbps: f64,
    /// Data-parallel ranks: this many engines behind one address, a request's rank chosen by
    /// its `data_parallel_rank` field or `X-data-parallel-rank` header (else round robin).
    pub dp_size: u32,
    /// Serve HTTPS with this certificate chain (PEM); needs `tls_key_path`.
    pub tls_cert_path: Option<String>,
    /// The private key of `tls_cert_path` (PEM).
    pub tls_key_path: Option<String>,
    /// Publish KV cache events (vLLM/SGLang wire format) on this port (0 = any free port).
    pub kv_events_port: Option<u16>,
    /// Tokenize with this model's tokenizer (a directory or tokenizer.json) instead of the
    /// built-in four-bytes-per-token one, as a real engine would.
    pub tokenizer_path: Option<String>,
    /// Serve replays of recent KV event batches on this port (0 = any free port).
    pub kv_events_replay_port: Option<u16>,
    /// Require client certificates signed by these CAs (PEM): mTLS.
    pub tls_client_ca_path: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            profile: Profile::default(),
            speed: 1.0,
            time_scale: 1.0,
            seed: 0,
            model_name: "meta-llama/Llama-3.1-8B-Instruct".into(),
            role: Role::Plain,
            output_len_median: 200,
            faults: Faults::default(),
            bootstrap_port: None,
            pd_timeout_secs: 300.0,
            kv_link_gbps: 50.0,
            dp_size: 1,
            tls_cert_path: None,
            tls_key_path: None,
            tls_client_ca_path: None,
            kv_events_port: None,
            kv_events_replay_port: None,
            tokenizer_path: None,
        }
    }
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A fault setting is invalid.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// The TLS settings are unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// Another setting is out of range.
    #[error("{0}")]
    Config(String),
}

/// State shared by a worker's handlers.
pub(crate) struct WorkerState {
    pub(crate) config: WorkerConfig,
    /// One engine per data-parallel rank.
    pub(crate) engines: Vec<EngineHandle>,
    /// Requests each rank took.
    pub(crate) rank_requests: Vec<AtomicU64>,
    /// `/health` calls answered.
    pub(crate) health_probes: AtomicU64,
    /// The W3C `traceparent` of the last inference requests (tests check propagation).
    pub(crate) traceparents: Mutex<std::collections::VecDeque<String>>,
    /// Round robin over the ranks for requests that name none.
    pub(crate) next_rank: std::sync::atomic::AtomicUsize,
    pub(crate) faults: Mutex<Faults>,
    pub(crate) rng: Mutex<StdRng>,
    pub(crate) next_id: AtomicU64,
    pub(crate) refuse: watch::Sender<bool>,
    pub(crate) port: u16,
    pub(crate) rooms: Arc<pd::Rooms>,
    /// The model's tokenizer and chat template (`--tokenizer-path`), else the built-in one.
    pub(crate) tokenizer: Option<Arc<switchyard_tokenize::PromptTokenizer>>,
}

impl WorkerState {
    pub(crate) fn faults(&self) -> Faults {
        self.faults.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Rank 0's engine (the only one without data parallelism).
    pub(crate) fn engine(&self) -> &EngineHandle {
        &self.engines[0]
    }

    /// Counters summed over the ranks.
    pub(crate) fn stats(&self) -> EngineStats {
        let mut total = self.engines[0].stats();
        for e in &self.engines[1..] {
            let s = e.stats();
            total.running += s.running;
            total.waiting += s.waiting;
            total.kv_used_tokens += s.kv_used_tokens;
            total.kv_evictable_tokens += s.kv_evictable_tokens;
            total.kv_capacity_tokens += s.kv_capacity_tokens;
            total.prompt_tokens_total += s.prompt_tokens_total;
            total.cached_tokens_total += s.cached_tokens_total;
            total.generation_tokens_total += s.generation_tokens_total;
            total.requests_finished += s.requests_finished;
            total.preemptions += s.preemptions;
            total.steps += s.steps;
            total.pending_prefill_tokens += s.pending_prefill_tokens;
        }
        total
    }

    pub(crate) fn set_faults(&self, faults: Faults) -> Result<(), FaultError> {
        faults.validate()?;
        for engine in &self.engines {
            let _ = engine.send(driver::Command::SetSlowdown(faults.slowdown));
        }
        self.refuse.send_replace(faults.refuse_connections);
        if let Ok(mut f) = self.faults.lock() {
            *f = faults;
        }
        Ok(())
    }
}

/// A running simulated worker. Dropping the handle stops it.
pub struct WorkerHandle {
    addr: SocketAddr,
    bootstrap_port: Option<u16>,
    kv_events: Option<Arc<Publisher>>,
    state: Arc<WorkerState>,
    _shutdown: watch::Sender<()>,
}

impl WorkerHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Port of the KV bootstrap server (prefill workers).
    pub fn bootstrap_port(&self) -> Option<u16> {
        self.bootstrap_port
    }

    /// `http://host:port` (`https://localhost:port` when it serves TLS: certificates name hosts).
    pub fn url(&self) -> String {
        match self.state.config.tls_cert_path {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// `tcp://host:port` of its KV event publisher, when it publishes.
    pub fn kv_events_endpoint(&self) -> Option<String> {
        self.kv_events.as_ref().map(|p| format!("tcp://{}", p.pub_addr()))
    }

    /// KV event batches published so far (the next batch's sequence number).
    pub fn kv_events_published(&self) -> u64 {
        self.kv_events.as_ref().map_or(0, |p| p.next_seq())
    }

    /// `tcp://host:port` of its KV event replay socket, when it serves one.
    pub fn kv_events_replay_endpoint(&self) -> Option<String> {
        self.kv_events.as_ref().and_then(|p| p.replay_addr()).map(|a| format!("tcp://{a}"))
    }

    /// `/health` calls it answered.
    pub fn health_probes(&self) -> u64 {
        self.state.health_probes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The W3C `traceparent` headers of the last 64 inference requests, oldest first.
    pub fn traceparents(&self) -> Vec<String> {
        self.state.traceparents.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default()
    }

    /// Requests each data-parallel rank took.
    pub fn rank_requests(&self) -> Vec<u64> {
        self.state.rank_requests.iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed)).collect()
    }

    /// The worker's configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.state.config
    }

    /// Replaces the faults in force.
    pub fn set_faults(&self, faults: Faults) -> Result<(), FaultError> {
        self.state.set_faults(faults)
    }

    /// Latest engine counters (summed over data-parallel ranks).
    pub fn stats(&self) -> EngineStats {
        self.state.stats()
    }
}

/// Binds and starts one simulated worker.
pub async fn spawn_worker(config: WorkerConfig) -> Result<WorkerHandle, StartError> {
    config.faults.validate()?;
    if !(1..=256).contains(&config.dp_size) {
        return Err(StartError::Config(format!("dp_size must be 1-256, got {}", config.dp_size)));
    }
    let tls = tls_acceptor(&config)?;
    let addr_text = format!("{}:{}", config.host, config.port);
    let listener =
        TcpListener::bind(&addr_text).await.map_err(|source| StartError::Bind { addr: addr_text.clone(), source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: addr_text, source })?;
    let tokenizer = match &config.tokenizer_path {
        Some(p) => Some(Arc::new(
            switchyard_tokenize::PromptTokenizer::load(p).map_err(|e| StartError::Config(e.to_string()))?,
        )),
        None => None,
    };
    let kv_events = match config.kv_events_port {
        Some(port) => Some(kv_publisher(&config, port).await?),
        None => None,
    };
    let engines = (0..u64::from(config.dp_size))
        .map(|rank| {
            let engine = Engine::new(config.profile.clone(), config.speed, config.seed.wrapping_add(rank * 7919));
            let sink = kv_events.as_ref().map(|p| (p.clone(), (config.dp_size > 1).then_some(rank as i64)));
            EngineHandle::spawn_publishing(engine, config.time_scale, sink)
        })
        .collect();
    let rank_requests = (0..config.dp_size).map(|_| AtomicU64::new(0)).collect();
    let (refuse, _) = watch::channel(false);
    let state = Arc::new(WorkerState {
        engines,
        rank_requests,
        next_rank: std::sync::atomic::AtomicUsize::new(0),
        health_probes: AtomicU64::new(0),
        traceparents: Mutex::new(std::collections::VecDeque::new()),
        faults: Mutex::new(Faults::default()),
        rng: Mutex::new(StdRng::seed_from_u64(config.seed ^ 0x5eed)),
        next_id: AtomicU64::new(1),
        refuse,
        port: addr.port(),
        rooms: Arc::new(pd::Rooms::default()),
        tokenizer,
        config,
    });
    state.set_faults(state.config.faults.clone())?;
    let (shutdown, shutdown_rx) = watch::channel(());
    let bootstrap_port = if state.config.role == Role::Prefill {
        let bind = format!("{}:{}", state.config.host, state.config.bootstrap_port.unwrap_or(0));
        let l = TcpListener::bind(&bind).await.map_err(|source| StartError::Bind { addr: bind.clone(), source })?;
        let port = l.local_addr().map_err(|source| StartError::Bind { addr: bind, source })?.port();
        let app = pd::bootstrap_router(state.rooms.clone());
        let mut stop = shutdown_rx.clone();
        tokio::spawn(async move {
            let _ =
                axum::serve(l, app).with_graceful_shutdown(async move { while stop.changed().await.is_ok() {} }).await;
        });
        Some(port)
    } else {
        None
    };
    let app = api::router(state.clone());
    tokio::spawn(accept_loop(state.clone(), app, addr, listener, tls, shutdown_rx));
    Ok(WorkerHandle { addr, bootstrap_port, kv_events, state, _shutdown: shutdown })
}

/// Batches kept for replay.
const KV_REPLAY_BATCHES: usize = 10_000;

/// Binds the KV event publisher (and its replay socket).
async fn kv_publisher(config: &WorkerConfig, port: u16) -> Result<Arc<Publisher>, StartError> {
    let pub_addr = format!("{}:{port}", config.host);
    let replay_addr = config.kv_events_replay_port.map(|p| format!("{}:{p}", config.host));
    let publisher = Publisher::bind(&pub_addr, replay_addr.as_deref(), "", KV_REPLAY_BATCHES)
        .await
        .map_err(|source| StartError::Bind { addr: pub_addr, source })?;
    Ok(Arc::new(publisher))
}

/// Accepts connections until shut down. While `refuse_connections` is set the listening
/// socket is closed (connects are refused) and every open connection is dropped.
async fn accept_loop(
    state: Arc<WorkerState>,
    app: axum::Router,
    addr: SocketAddr,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<()>,
) {
    let mut refuse = state.refuse.subscribe();
    let mut listener = Some(listener);
    loop {
        let (kill, _) = watch::channel(());
        if !*refuse.borrow_and_update() {
            let l = match listener.take() {
                Some(l) => l,
                None => match TcpListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "cannot re-bind after refusing connections; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
                            _ = shutdown.changed() => return,
                        }
                    }
                },
            };
            loop {
                tokio::select! {
                    accepted = l.accept() => {
                        if let Ok((stream, _)) = accepted {
                            tokio::spawn(serve_connection(stream, tls.clone(), app.clone(), kill.subscribe()));
                        }
                    }
                    _ = refuse.changed() => if *refuse.borrow_and_update() { break },
                    _ = shutdown.changed() => return,
                }
            }
        }
        // Refusing: the listener is dropped here and `kill` drops every open connection.
        drop(kill);
        loop {
            tokio::select! {
                _ = refuse.changed() => if !*refuse.borrow_and_update() { break },
                _ = shutdown.changed() => return,
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: axum::Router,
    mut kill: watch::Receiver<()>,
) {
    let _ = stream.set_nodelay(true);
    let service = TowerToHyperService::new(app);
    let http = hyper::server::conn::http1::Builder::new();
    let served = async move {
        match tls {
            None => {
                let _ = http.serve_connection(TokioIo::new(stream), service).await;
            }
            Some(acceptor) => {
                // A client without an acceptable certificate (mTLS) fails here.
                if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    let _ = http.serve_connection(TokioIo::new(stream), service).await;
                }
            }
        }
    };
    tokio::select! {
        _ = served => {}
        _ = kill.changed() => {}
    }
}

/// The TLS acceptor `config` asks for, if any.
fn tls_acceptor(config: &WorkerConfig) -> Result<Option<tokio_rustls::TlsAcceptor>, StartError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |e: &dyn std::fmt::Display| StartError::Tls(e.to_string());
    let (cert, key) = match (&config.tls_cert_path, &config.tls_key_path) {
        (Some(c), Some(k)) => (c, k),
        (None, None) if config.tls_client_ca_path.is_none() => return Ok(None),
        _ => return Err(StartError::Tls("needs both a certificate and a key".into())),
    };
    let certs = |path: &str| {
        CertificateDer::pem_file_iter(path).map_err(|e| tls(&e))?.collect::<Result<Vec<_>, _>>().map_err(|e| tls(&e))
    };
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| tls(&e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?;
    let builder = match &config.tls_client_ca_path {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| tls(&e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls(&e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(chain, key).map_err(|e| tls(&e))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))))
}
