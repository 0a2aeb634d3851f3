//! One inference server as the router knows it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use serde::Serialize;

use super::CircuitBreaker;
use crate::config::CircuitBreakerConfig;
use crate::load::WorkerLoad;

/// The part a worker plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum WorkerRole {
    /// Serves whole requests.
    Regular,
    /// Prefill server in a PD fleet, with its KV bootstrap port if it has one.
    Prefill {
        /// Bootstrap port for SGLang-style KV transfer.
        bootstrap_port: Option<u16>,
    },
    /// Decode server in a PD fleet.
    Decode,
}

/// One rank of a data-parallel engine (`--dp-aware`): the router picks the rank, and the engine
/// is told which one through the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DpRank {
    /// This rank.
    pub rank: u32,
    /// How many the engine runs.
    pub size: u32,
    /// SGLang reads the rank from the body (`data_parallel_rank`); vLLM only from the
    /// `X-data-parallel-rank` header, which every rank gets.
    pub in_body: bool,
}

/// A worker: its address and role, the models it serves, whether it may be routed to, and its
/// load. A data-parallel engine (`--dp-aware`) is one worker per rank: same URL, own rank.
///
/// "Healthy" is decided by the health checker; policies only ever see healthy workers.
#[derive(Debug)]
pub struct Worker {
    id: u32,
    url: String,
    /// `url`, or `url#rank` for a data-parallel rank: the registry's key.
    key: String,
    dp: Option<DpRank>,
    role: WorkerRole,
    healthy: AtomicBool,
    /// Has passed a health probe at least once (until then it is probed every second).
    ready_once: AtomicBool,
    /// Set once the worker is removed from the registry: state still keyed on it (requests
    /// finishing there, a policy's concurrent record) is dropped instead of kept.
    retired: AtomicBool,
    load: WorkerLoad,
    breaker: CircuitBreaker,
    models: RwLock<Vec<String>>,
    /// Where it came from: `None` for workers given by hand (flags, admin API), else the
    /// discovery source that owns it (only that source may remove it).
    source: Option<String>,
    /// The engine's cache as its KV events describe it, when the router subscribes to them.
    kv_blocks: OnceLock<Arc<crate::kv_events::WorkerBlocks>>,
    /// Where its engine publishes KV events, when its discovery said so (a pod annotation).
    kv_events: Option<crate::kv_events::Endpoints>,
}

impl Worker {
    /// A worker at `url` (already validated and normalised), healthy until a probe says otherwise.
    pub fn new(url: String, role: WorkerRole) -> Self {
        Self::with_breaker(url, role, CircuitBreakerConfig::default())
    }

    /// A worker with its circuit breaker's thresholds.
    pub fn with_breaker(url: String, role: WorkerRole, breaker: CircuitBreakerConfig) -> Self {
        static NEXT_ID: AtomicU32 = AtomicU32::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            key: url.clone(),
            url,
            dp: None,
            role,
            healthy: AtomicBool::new(true),
            ready_once: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            load: WorkerLoad::default(),
            breaker: CircuitBreaker::new(breaker),
            models: RwLock::new(Vec::new()),
            source: None,
            kv_blocks: OnceLock::new(),
            kv_events: None,
        }
    }

    /// The same worker as one data-parallel rank of its engine.
    pub fn with_dp_rank(mut self, dp: DpRank) -> Self {
        self.key = format!("{}#{}", self.url, dp.rank);
        self.dp = Some(dp);
        self
    }

    /// The same worker, owned by a discovery `source` (e.g. `kubernetes`).
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The same worker, its engine publishing KV events at `endpoints`.
    pub fn with_kv_events(mut self, endpoints: crate::kv_events::Endpoints) -> Self {
        self.kv_events = Some(endpoints);
        self
    }

    /// Where its engine publishes KV events, when its discovery said so.
    pub fn kv_events(&self) -> Option<&crate::kv_events::Endpoints> {
        self.kv_events.as_ref()
    }

    /// The registry's key: the URL, with `#rank` for a data-parallel rank.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Its data-parallel rank, when the engine runs several.
    pub fn dp_rank(&self) -> Option<DpRank> {
        self.dp
    }

    /// Its circuit breaker's thresholds (a rank split off later gets the same).
    pub fn breaker_config(&self) -> CircuitBreakerConfig {
        self.breaker.config().clone()
    }

    /// The discovery source that owns it (`None`: added by hand).
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// A process-unique id, stable for the worker's life; policies key per-worker state on it.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Base URL, `scheme://host:port`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Role.
    pub fn role(&self) -> WorkerRole {
        self.role
    }

    /// Whether the health checker currently lets it serve.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy_flag(&self, healthy: bool) -> bool {
        if healthy {
            self.ready_once.store(true, Ordering::Relaxed);
        }
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// Whether it has ever passed a health probe (an engine still loading has not).
    pub fn ready_once(&self) -> bool {
        self.ready_once.load(Ordering::Relaxed)
    }

    /// Whether the worker has left the registry (its in-flight requests may still finish).
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// The circuit breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Load counters.
    pub fn load(&self) -> &WorkerLoad {
        &self.load
    }

    /// The first model the worker said it serves, when it said.
    pub fn model_id(&self) -> Option<String> {
        self.models().first().cloned()
    }

    /// Every model the worker serves (from `/v1/models`, `/get_model_info` or its discovery
    /// labels); empty until known.
    pub fn models(&self) -> Vec<String> {
        self.models.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// Whether it serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.read().is_ok_and(|m| m.iter().any(|x| x == model))
    }

    /// Records the models the worker serves.
    pub fn set_models(&self, models: Vec<String>) {
        if let Ok(mut m) = self.models.write() {
            *m = models;
        }
    }

    /// Attaches the block set its KV event subscription fills (once; a second is ignored).
    pub fn attach_kv_blocks(&self, blocks: Arc<crate::kv_events::WorkerBlocks>) {
        let _ = self.kv_blocks.set(blocks);
    }

    /// The engine's cache as its KV events describe it, when the router subscribes to them.
    pub fn kv_blocks(&self) -> Option<&Arc<crate::kv_events::WorkerBlocks>> {
        self.kv_blocks.get()
    }

    /// Records the one model the worker serves.
    pub fn set_model_id(&self, model: String) {
        self.set_models(vec![model]);
    }
}
