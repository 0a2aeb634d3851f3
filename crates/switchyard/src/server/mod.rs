//! The HTTP front: routes, middleware (request id, body limit), and start-up/shutdown.

mod admin;
mod admission;
mod auth;
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
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::policies;
use crate::proxy::{client, Identity, Upstream};
use crate::routers::{Dispatcher, PolicySet};
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
    /// Prometheus families.
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// Builds the state for `config` with an empty registry.
    pub fn new(config: RouterConfig) -> Self {
        Self(Arc::new(Shared::new(config)))
    }
}

impl Shared {
    fn new(config: RouterConfig) -> Self {
        let registry = Arc::new(WorkerRegistry::bounded(config.max_workers));
        let identity = Arc::new(Identity {
            hop: format!("{:016x}", rand::random::<u64>()),
            worker_auth: config
                .worker_api_key
                .as_ref()
                .and_then(|k| axum::http::HeaderValue::from_str(&format!("Bearer {k}")).ok()),
            keep_client_auth: config.inference_api_key.is_some(),
        });
        let upstream = |client, timeout| Upstream { client, timeout, identity: identity.clone() };
        let inference = upstream(client::new_client(Duration::from_secs(5), 1024), config.request_timeout);
        let control = upstream(client::new_client(Duration::from_secs(5), 8), Duration::from_secs(30));
        let probes = upstream(client::new_client(config.health.timeout, 4), config.health.timeout);
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
        let router = match &config.pd {
            None => Dispatcher::regular(registry.clone(), policy, inference, config.retry.clone(), metrics.clone()),
            Some(pd) => {
                let policies = match (&pd.prefill_policy, &pd.decode_policy) {
                    (None, None) => PolicySet::Joint(policy),
                    (p, d) => PolicySet::PerPool {
                        prefill: p.as_ref().map_or_else(|| policy.clone(), policies::build),
                        decode: d.as_ref().map_or_else(|| policy.clone(), policies::build),
                    },
                };
                Dispatcher::pd(
                    registry.clone(),
                    policies,
                    pd.style,
                    pd.prefill_timeout,
                    inference,
                    config.retry.clone(),
                    metrics.clone(),
                )
            }
        };
        let router = router.with_limits(crate::routers::Limits {
            stream_idle: config.stream_idle_timeout,
            total: config.request_total_timeout,
        });
        let admission = config.admission.clone().map(|a| Arc::new(admission::Admission::new(a)));
        Self { config: Arc::new(config), registry, router, control, probes, admission, metrics }
    }

    /// Checks a worker's address, probes it once (health, then the model it serves) and
    /// registers it, healthy or not. `url` must be normalised ([`normalize_worker_url`]).
    pub async fn register_worker(&self, url: String, role: WorkerRole) -> Result<Arc<Worker>, ApiError> {
        if self.registry.get(&url).is_some() {
            return Err(ApiError::Conflict(format!("worker {url} is already registered")));
        }
        let worker = self.probe_new_worker(url, role).await?;
        self.registry.add(worker.clone()).map_err(|e| ApiError::Conflict(e.to_string()))?;
        Ok(worker)
    }

    /// A new worker, its address checked, its first health probe and model discovery done.
    async fn probe_new_worker(&self, url: String, role: WorkerRole) -> Result<Arc<Worker>, ApiError> {
        check_worker_address(&url, &self.config.worker_allow).await.map_err(ApiError::BadRequest)?;
        let worker = Arc::new(Worker::with_breaker(url, role, self.config.circuit_breaker.clone()));
        let (healthy, status) = crate::health::probe_status(&self.probes, &worker, &self.config.health.endpoint).await;
        if status == Some(axum::http::StatusCode::LOOP_DETECTED.as_u16()) {
            return Err(ApiError::BadRequest(format!(
                "worker {} answers with this router's own loop error: the URL points back at the router",
                worker.url()
            )));
        }
        if !healthy {
            tracing::warn!(worker = worker.url(), "worker did not pass its first health probe; added as unhealthy");
        }
        worker.set_healthy_flag(healthy);
        if let Some(model) = info::discover_model(&self.control, worker.url()).await {
            worker.set_model_id(model);
        }
        Ok(worker)
    }
}

/// Whether a worker URL's host may be a worker: its literal IP, or every address its name
/// resolves to (within two seconds; a name that does not resolve yet is let through — there
/// is nothing to reach), against the allow-list or the link-local/metadata deny rules.
async fn check_worker_address(url: &str, allow: &[crate::config::Cidr]) -> Result<(), String> {
    let uri: axum::http::Uri = url.parse().map_err(|_| format!("invalid worker URL '{url}'"))?;
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let ips: Vec<std::net::IpAddr> = match host.parse() {
        Ok(ip) => vec![ip],
        Err(_) => match tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host((host, port))).await {
            Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
            _ => Vec::new(),
        },
    };
    for ip in ips {
        crate::config::worker_ip_allowed(ip, allow).map_err(|e| format!("worker {url} refused: {e}"))?;
    }
    Ok(())
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

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
        async move { state.probe_new_worker(url, role).await }
    });
    for worker in futures_join_all(probes).await {
        let added = worker.and_then(|w| state.registry.add(w).map_err(|e| ApiError::Conflict(e.to_string())));
        if let Err(e) = added {
            tracing::warn!(error = %e, "worker not registered");
        }
    }
    wait_for_first_healthy(&state).await;
    let (shutdown, shutdown_rx) = watch::channel(());
    tokio::spawn(crate::health::run(
        state.registry.clone(),
        state.probes.clone(),
        state.config.health.clone(),
        state.config.remove_unhealthy_workers,
        shutdown_rx.clone(),
    ));
    let policies = state.router.policies().distinct();
    let reads_reported_load = policies.iter().any(|p| p.reads_reported_load());
    if let Some(interval) = state.config.load_check_interval.filter(|_| reads_reported_load) {
        tokio::spawn(crate::health::load_poller::run(
            state.registry.clone(),
            state.probes.clone(),
            interval,
            shutdown_rx.clone(),
        ));
    }
    for policy in policies {
        spawn_maintenance(policy, shutdown_rx.clone());
    }
    let app = app(state.clone());
    if let Some(port) = state.config.prometheus_port {
        spawn_metrics_listener(&state, port, shutdown_rx.clone()).await?;
    }
    let task =
        tokio::spawn(listener::serve(listener, app, state.config.listener.clone(), state.metrics.clone(), shutdown_rx));
    Ok(RunningRouter { addr, state, shutdown, task })
}

/// The separate `--prometheus-port` listener: `/metrics` only.
async fn spawn_metrics_listener(state: &AppState, port: u16, stop: watch::Receiver<()>) -> std::io::Result<()> {
    let listener = TcpListener::bind((state.config.prometheus_host.as_str(), port)).await?;
    let app = Router::new().route("/metrics", get(info::metrics)).with_state(state.clone());
    let limits = ListenerConfig { max_connections: 64, ..state.config.listener.clone() };
    tokio::spawn(listener::serve(listener, app, limits, state.metrics.clone(), stop));
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
        for w in state.registry.all().iter() {
            if crate::health::probe(&state.probes, w, &state.config.health.endpoint).await {
                state.registry.set_healthy(w, true);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Calls the policy's `maintain` on its interval until shutdown.
fn spawn_maintenance(policy: Arc<dyn crate::policies::RoutingPolicy>, mut shutdown: watch::Receiver<()>) {
    let Some(every) = policy.maintenance_interval() else {
        return;
    };
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => policy.maintain(),
                _ = shutdown.changed() => return,
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
