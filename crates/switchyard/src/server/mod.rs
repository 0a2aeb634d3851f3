//! The HTTP front: routes, middleware (request id, body limit), and start-up/shutdown.

mod admin;
mod admission;
mod auth;
mod holding_body;
mod hops;
mod inference;
mod info;
mod listener;
mod request_id;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use axum::routing::{delete, get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{ListenerConfig, RouterConfig};
use crate::discovery::{Candidate, Onboarding};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::policies;
use crate::proxy::{client, Identity, Upstream};
use crate::routers::{Dispatcher, Mode, PolicyFactory, PolicySet};
use crate::workers::{Worker, WorkerRegistry, WorkerRole};

pub use admission::Admission;
pub use request_id::REQUEST_ID;

/// State shared by every handler: one pointer, so handlers clone it for the price of a
/// reference count (cloning the fields per request cost ~2 % of proxy throughput).
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] points to.
#[derive(Debug)]
pub struct Shared {
    /// Router configuration.
    pub config: Arc<RouterConfig>,
    /// Worker membership.
    pub registry: Arc<WorkerRegistry>,
    /// Inference dispatch.
    pub router: Dispatcher,
    /// Client for info/admin calls to workers (short timeout).
    pub control: Upstream,
    /// Client for health probes (own pool).
    pub probes: Upstream,
    /// Admission control, when configured.
    pub admission: Option<Arc<admission::Admission>>,
    /// How workers join (flags, admin API, discovery).
    pub onboarding: Arc<Onboarding>,
    /// Prometheus families.
    pub metrics: Arc<Metrics>,
    /// The engines' KV event subscriptions, when configured.
    pub kv_events: Option<Arc<crate::kv_events::KvEvents>>,
}

impl AppState {
    /// Builds the state for `config` with an empty registry.
    pub fn new(config: RouterConfig) -> Self {
        Self(Arc::new(Shared::new(config)))
    }
}

impl Shared {
    fn new(config: RouterConfig) -> Self {
        let registry =
            Arc::new(WorkerRegistry::bounded(config.max_workers).with_panic_threshold(config.health.panic_threshold));
        let identity = Arc::new(Identity {
            hop: format!("{:016x}", rand::random::<u64>()),
            worker_auth: config
                .worker_api_key
                .as_ref()
                .and_then(|k| axum::http::HeaderValue::from_str(&format!("Bearer {k}")).ok()),
            keep_client_auth: config.inference_api_key.is_some(),
        });
        let upstream = |client, timeout| Upstream { client, timeout, identity: identity.clone() };
        // Checked when the configuration was built; a file changed since falls back to the
        // system's roots (and https workers that need more fail their probes, visibly).
        let tls = crate::tls::client_config(&config.tls).unwrap_or_else(|e| {
            tracing::error!(error = %e, "worker TLS settings unusable; trusting the system's roots only");
            crate::tls::default_client_config()
        });
        let new_client = |connect, pool| client::new_client_with_tls(connect, pool, tls.clone());
        let inference = upstream(new_client(Duration::from_secs(5), 1024), config.request_timeout);
        let control = upstream(new_client(Duration::from_secs(5), 8), Duration::from_secs(30));
        let probes = upstream(new_client(config.health.timeout, 4), config.health.timeout);
        let policy = policies::build(&config.policy);
        let metrics = Arc::new(Metrics::new(policy.name()));
        {
            let metrics = metrics.clone();
            registry.subscribe(Arc::new(move |change| {
                if let crate::workers::Membership::Removed(w) = change {
                    metrics.forget_worker(w.url());
                }
            }));
        }
        // Each model's pool gets policies of its own, built from the configuration.
        let (policy_config, pd) = (config.policy.clone(), config.pd.clone());
        let factory: PolicyFactory = Arc::new(move || match &pd {
            None => PolicySet::Single(policies::build(&policy_config)),
            Some(pd) => {
                let policy = policies::build(&policy_config);
                match (&pd.prefill_policy, &pd.decode_policy) {
                    (None, None) => PolicySet::Joint(policy),
                    (p, d) => PolicySet::PerPool {
                        prefill: p.as_ref().map_or_else(|| policy.clone(), policies::build),
                        decode: d.as_ref().map_or_else(|| policy.clone(), policies::build),
                    },
                }
            }
        });
        let mode = match &config.pd {
            None => Mode::Regular,
            Some(pd) => Mode::Pd { style: pd.style, prefill_timeout: pd.prefill_timeout },
        };
        let router = Dispatcher::new(registry.clone(), factory, mode, inference, config.retry.clone(), metrics.clone());
        #[cfg(feature = "tokenizer")]
        let router = match config.tokenizer_path.as_ref().map(|p| {
            crate::tokenize::PromptTokenizer::load(p).map(|t| t.with_segment_cache(config.tokenizer_cache_bytes))
        }) {
            Some(Ok(t)) => router.with_tokenizer(Arc::new(t)),
            Some(Err(e)) => {
                tracing::error!(error = %e, "tokenizer unusable; routing on prompt text");
                router
            }
            None => router,
        };
        let router = router.with_limits(crate::routers::Limits {
            stream_idle: config.stream_idle_timeout,
            total: config.request_total_timeout,
            stream_failover_max: config.stream_failover_max,
        });
        let admission = config.admission.clone().map(|a| Arc::new(admission::Admission::new(a)));
        let onboarding = Arc::new(Onboarding {
            registry: registry.clone(),
            probes: probes.clone(),
            control: control.clone(),
            health_endpoint: config.health.endpoint.clone(),
            breaker: config.circuit_breaker.clone(),
            allow: config.worker_allow.clone(),
            dp_aware: config.dp_aware,
        });
        // Discovered pods may name their event endpoints (an annotation) without any flag.
        let kv_config = config.kv_events.clone().or_else(|| config.discovery.as_ref().map(|_| Default::default()));
        let kv_events = kv_config.map(|c| Arc::new(crate::kv_events::KvEvents::new(c)));
        if let Some(kv) = &kv_events {
            // Weak: the registry must not keep the subscriptions alive once the router is gone.
            let kv = Arc::downgrade(kv);
            registry.subscribe(Arc::new(move |change| {
                if let Some(kv) = kv.upgrade() {
                    kv.on_membership(change);
                }
            }));
        }
        Self { config: Arc::new(config), registry, router, control, probes, admission, metrics, onboarding, kv_events }
    }

    /// Checks a worker's address, probes it once (health, then the models it serves and, with
    /// `--dp-aware`, its ranks) and registers it — each rank — healthy or not. `url` must be
    /// normalised ([`crate::config::normalize_worker_url`]).
    pub async fn register_worker(&self, url: String, role: WorkerRole) -> Result<Vec<Arc<Worker>>, ApiError> {
        self.onboarding.admit(Candidate::manual(url, role)).await
    }
}

/// The router's HTTP application.
pub fn app(state: AppState) -> Router {
    let limit = state.config.max_payload_size;
    let admin_access = match &state.config.api_key {
        Some(key) => auth::Access::Key(key.clone()),
        None if state.config.admin_open_without_key() => auth::Access::Open,
        None => auth::Access::Disabled(
            "admin changes are disabled: this router listens beyond loopback without --api-key \
             (set --api-key, or --allow-unauthenticated-admin to accept the risk)",
        ),
    };
    let inference = Router::new()
        .route("/v1/chat/completions", post(inference::chat_completions))
        .route("/v1/completions", post(inference::completions))
        .route("/generate", post(inference::generate))
        .route("/v1/embeddings", post(inference::embeddings))
        .route("/v1/rerank", post(inference::rerank))
        .route("/tokenize", post(inference::tokenize))
        .route_layer(axum::middleware::from_fn_with_state(
            auth::Access::key_or_open(&state.config.inference_api_key),
            auth::require,
        ));
    let admin = Router::new()
        .route("/flush_cache", post(admin::flush_cache))
        .route("/workers", post(admin::add_worker).delete(admin::remove_worker_query))
        .route("/workers/{*url}", delete(admin::remove_worker_path))
        .route("/add_worker", post(admin::legacy_add_worker))
        .route("/remove_worker", post(admin::legacy_remove_worker))
        .route("/debug/policy", get(admin::debug_policy))
        .route("/debug/routing", get(admin::debug_routing))
        .route("/debug/kv_events", get(admin::debug_kv_events))
        .route_layer(axum::middleware::from_fn_with_state(admin_access, auth::require));
    let public = Router::new()
        .route("/health", get(info::health))
        .route("/liveness", get(info::liveness))
        .route("/readiness", get(info::readiness))
        .route("/health_generate", get(info::health_generate))
        .route("/v1/models", get(info::models))
        .route("/get_model_info", get(info::model_info))
        .route("/get_server_info", get(info::server_info))
        .route("/get_loads", get(info::loads))
        .route("/metrics", get(info::metrics))
        .route("/workers", get(admin::list_workers))
        .route("/list_workers", get(admin::legacy_list_workers));
    public
        .merge(inference)
        .merge(admin)
        .fallback(|method: Method, uri: axum::http::Uri| async move {
            ApiError::NotFound(format!("no route for {method} {}", uri.path()))
        })
        .method_not_allowed_fallback(|method: Method, uri: axum::http::Uri| async move {
            ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_owned() }
        })
        .layer(axum::middleware::from_fn_with_state(Arc::<str>::from(state.control.identity.hop.as_str()), hops::guard))
        .layer(axum::middleware::from_fn(request_id::propagate))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// A router running in this process.
pub struct RunningRouter {
    addr: SocketAddr,
    state: AppState,
    shutdown: watch::Sender<()>,
    task: JoinHandle<()>,
}

impl RunningRouter {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, or `https://addr` with a TLS listener.
    pub fn url(&self) -> String {
        let scheme = if self.state.config.tls.listener.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Its shared state (registry, config).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Stops accepting, lets open requests finish, and waits for the server to end.
    ///
    /// Open requests get `--shutdown-grace-secs`; whatever is still running then is cut
    /// (its clients see the connection close) and shutdown completes anyway.
    pub async fn shutdown(self) -> std::io::Result<()> {
        let _ = self.shutdown.send(());
        if let Some(kv) = &self.state.kv_events {
            kv.stop();
        }
        let grace = self.state.config.shutdown_grace;
        let mut task = self.task;
        match tokio::time::timeout(grace, &mut task).await {
            Ok(_) => Ok(()),
            Err(_) => {
                tracing::warn!(grace_secs = grace.as_secs_f64(), "shutdown grace period over; closing open requests");
                task.abort();
                Ok(())
            }
        }
    }
}

/// Binds `config.host:config.port`, registers the configured workers, starts the health
/// checker, and serves until [`RunningRouter::shutdown`] (or until `stop` resolves).
pub async fn start(config: RouterConfig) -> std::io::Result<RunningRouter> {
    let tls = match &config.tls.listener {
        Some(paths) => Some(tokio_rustls::TlsAcceptor::from(
            crate::tls::server_config(paths).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        )),
        None => None,
    };
    let listener = TcpListener::bind((config.host.as_str(), config.port)).await?;
    let addr = listener.local_addr()?;
    let state = AppState::new(config);
    // Probed concurrently, registered in the order given.
    let mut initial: Vec<(String, WorkerRole)> =
        state.config.worker_urls.iter().map(|u| (u.clone(), WorkerRole::Regular)).collect();
    if let Some(pd) = &state.config.pd {
        initial.extend(pd.prefill.iter().map(|(u, port)| (u.clone(), WorkerRole::Prefill { bootstrap_port: *port })));
        initial.extend(pd.decode.iter().map(|u| (u.clone(), WorkerRole::Decode)));
    }
    let probes = initial.into_iter().map(|(url, role)| {
        let state = state.clone();
        async move { state.onboarding.prepare(Candidate::manual(url, role)).await }
    });
    for workers in futures_join_all(probes).await {
        if let Err(e) = workers.and_then(|w| state.onboarding.register(&w)) {
            tracing::warn!(error = %e, "worker not registered");
        }
    }
    wait_for_first_healthy(&state).await;
    let (shutdown, shutdown_rx) = watch::channel(());
    tokio::spawn(crate::health::run(
        state.onboarding.clone(),
        state.config.health.clone(),
        state.config.remove_unhealthy_workers,
        shutdown_rx.clone(),
    ));
    let reads_reported_load = state.router.policies().iter().any(|p| p.reads_reported_load());
    if let Some(interval) = state.config.load_check_interval.filter(|_| reads_reported_load) {
        tokio::spawn(crate::health::load_poller::run(
            state.registry.clone(),
            state.probes.clone(),
            interval,
            shutdown_rx.clone(),
        ));
    }
    spawn_maintenance(state.router.clone(), shutdown_rx.clone());
    #[cfg(feature = "kubernetes")]
    if let Some(discovery) = state.config.discovery.clone() {
        let mode = crate::discovery::kubernetes::Mode::of(state.config.pd.is_some());
        crate::discovery::kubernetes::spawn(discovery, mode, state.onboarding.clone(), shutdown_rx.clone())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    let app = app(state.clone());
    if let Some(port) = state.config.prometheus_port {
        spawn_metrics_listener(&state, port, shutdown_rx.clone()).await?;
    }
    let task = tokio::spawn(listener::serve(
        listener,
        app,
        state.config.listener.clone(),
        tls,
        state.metrics.clone(),
        shutdown_rx,
    ));
    Ok(RunningRouter { addr, state, shutdown, task })
}

/// The separate `--prometheus-port` listener: `/metrics` only.
async fn spawn_metrics_listener(state: &AppState, port: u16, stop: watch::Receiver<()>) -> std::io::Result<()> {
    let listener = TcpListener::bind((state.config.prometheus_host.as_str(), port)).await?;
    let app = Router::new().route("/metrics", get(info::metrics)).with_state(state.clone());
    let limits = ListenerConfig { max_connections: 64, ..state.config.listener.clone() };
    tokio::spawn(listener::serve(listener, app, limits, None, state.metrics.clone(), stop));
    Ok(())
}

/// Start-up with workers still booting: re-probe unhealthy workers until one is healthy or
/// `--worker-startup-timeout-secs` passes. Never fails start-up; the health checker takes over.
async fn wait_for_first_healthy(state: &AppState) {
    let deadline = tokio::time::Instant::now() + state.config.worker_startup_timeout;
    while state.registry.healthy().is_empty() && !state.registry.all().is_empty() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("no healthy worker yet; serving anyway (requests get 503 until one is)");
            return;
        }
        for w in state.registry.all().iter().filter(|w| !w.is_healthy()) {
            if crate::health::probe(&state.probes, w.url(), &state.config.health.endpoint).await {
                state.registry.set_healthy(w, true);
                state.onboarding.on_ready(w).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Calls each policy's `maintain` on its own interval until shutdown — every model's pool,
/// pools created since included (they appear when a model is first asked for).
fn spawn_maintenance(router: Dispatcher, mut shutdown: watch::Receiver<()>) {
    tokio::spawn(async move {
        let mut last: Vec<(Arc<dyn crate::policies::RoutingPolicy>, tokio::time::Instant)> = Vec::new();
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            let now = tokio::time::Instant::now();
            for policy in router.policies() {
                let Some(every) = policy.maintenance_interval() else { continue };
                match last.iter_mut().find(|(p, _)| Arc::ptr_eq(p, &policy)) {
                    Some((_, at)) if now.saturating_duration_since(*at) >= every => {
                        *at = now;
                        policy.maintain();
                    }
                    Some(_) => {}
                    None => last.push((policy, now)),
                }
            }
        }
    });
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for (i, f) in futures.into_iter().enumerate() {
        set.spawn(async move { (i, f.await) });
    }
    let mut out: Vec<_> = set.join_all().await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, o)| o).collect()
}
