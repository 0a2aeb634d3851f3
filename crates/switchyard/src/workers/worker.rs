//! One inference server as the router knows it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::RwLock;

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

/// A worker: its address and role, whether it may be routed to, and its load.
///
/// "Healthy" is decided by the health checker; policies only ever see healthy workers.
#[derive(Debug)]
pub struct Worker {
    id: u32,
    url: String,
    role: WorkerRole,
    healthy: AtomicBool,
    /// Set once the worker is removed from the registry: state still keyed on it (requests
    /// finishing there, a policy's concurrent record) is dropped instead of kept.
    retired: AtomicBool,
    load: WorkerLoad,
    breaker: CircuitBreaker,
    model_id: RwLock<Option<String>>,
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
            url,
            role,
            healthy: AtomicBool::new(true),
            retired: AtomicBool::new(false),
            load: WorkerLoad::default(),
            breaker: CircuitBreaker::new(breaker),
            model_id: RwLock::new(None),
        }
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
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
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

    /// The model the worker said it serves, when it said.
    pub fn model_id(&self) -> Option<String> {
        self.model_id.read().ok().and_then(|m| m.clone())
    }

    /// Records the model the worker serves (from `/v1/models` or `/get_model_info`).
    pub fn set_model_id(&self, model: String) {
        if let Ok(mut m) = self.model_id.write() {
            *m = Some(model);
        }
    }
}
