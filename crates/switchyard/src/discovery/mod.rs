//! How workers join: one path for workers given on the command line, added through the admin
//! API, or found by service discovery ([`kubernetes`]). A worker's address is checked, it is
//! probed once, asked which models it serves and (with `--dp-aware`) how many data-parallel
//! ranks it runs, and registered: one routing target per rank.
//!
//! A worker that is still starting (an engine loading its model) is registered unhealthy; the
//! health checker probes it every second and calls [`Onboarding::on_ready`] on its first
//! success, which finishes what could not be asked before (models, ranks).

#[cfg(feature = "kubernetes")]
pub mod kubernetes;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Cidr, CircuitBreakerConfig};
use crate::error::ApiError;
use crate::health::{self, introspect};
use crate::proxy::Upstream;
use crate::workers::{DpRank, Worker, WorkerRegistry, WorkerRole};

/// A worker about to join.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Normalised URL ([`crate::config::normalize_worker_url`]).
    pub url: String,
    /// Its role.
    pub role: WorkerRole,
    /// Models known without asking it (a pod's label); empty: ask the worker.
    pub models: Vec<String>,
    /// The discovery source that owns it; `None` for workers given by hand.
    pub source: Option<String>,
    /// Where its engine publishes KV events, when its discovery says (a pod annotation).
    pub kv_events: Option<crate::kv_events::Endpoints>,
}

impl Candidate {
    /// A worker given by hand.
    pub fn manual(url: String, role: WorkerRole) -> Self {
        Self { url, role, models: Vec::new(), source: None, kv_events: None }
    }
}

/// Everything joining needs.
#[derive(Debug)]
pub struct Onboarding {
    /// Where workers are registered.
    pub registry: Arc<WorkerRegistry>,
    /// Health probes.
    pub probes: Upstream,
    /// Information calls (models, server info).
    pub control: Upstream,
    /// Path of the health probe.
    pub health_endpoint: String,
    /// Each worker's breaker.
    pub breaker: CircuitBreakerConfig,
    /// `--worker-allow-cidr`.
    pub allow: Vec<Cidr>,
    /// `--dp-aware`: one routing target per data-parallel rank.
    pub dp_aware: bool,
}

impl Onboarding {
    /// Checks, probes and registers a worker (each of its ranks). Fails when it is already
    /// registered, its address is refused, or it points back at this router.
    pub async fn admit(&self, candidate: Candidate) -> Result<Vec<Arc<Worker>>, ApiError> {
        if !self.registry.at_url(&candidate.url).is_empty() {
            return Err(ApiError::Conflict(format!("worker {} is already registered", candidate.url)));
        }
        let workers = self.prepare(candidate).await?;
        self.register(&workers)?;
        Ok(workers)
    }

    /// Registers workers [`Onboarding::prepare`]d; all or none.
    pub fn register(&self, workers: &[Arc<Worker>]) -> Result<(), ApiError> {
        for (i, w) in workers.iter().enumerate() {
            if let Err(e) = self.registry.add(w.clone()) {
                for added in &workers[..i] {
                    let _ = self.registry.remove(added.key());
                }
                return Err(ApiError::Conflict(e.to_string()));
            }
        }
        Ok(())
    }

    /// The workers a candidate becomes, its address checked, its first health probe and
    /// introspection done, not registered yet.
    pub async fn prepare(&self, candidate: Candidate) -> Result<Vec<Arc<Worker>>, ApiError> {
        check_worker_address(&candidate.url, &self.allow).await.map_err(ApiError::BadRequest)?;
        let Candidate { url, role, models, source, kv_events } = candidate;
        let mut worker = Worker::with_breaker(url, role, self.breaker.clone());
        if let Some(source) = source {
            worker = worker.with_source(source);
        }
        if let Some(e) = kv_events {
            worker = worker.with_kv_events(e);
        }
        let (healthy, status) = health::probe_status(&self.probes, worker.url(), &self.health_endpoint).await;
        if status == Some(axum::http::StatusCode::LOOP_DETECTED.as_u16()) {
            return Err(ApiError::BadRequest(format!(
                "worker {} answers with this router's own loop error: the URL points back at the router",
                worker.url()
            )));
        }
        if !healthy {
            tracing::warn!(
                worker = worker.url(),
                "worker did not pass its first health probe; probed every second until it does"
            );
        }
        let limit = health::INTROSPECTION_LIMIT;
        let models = match models.is_empty() && healthy {
            true => {
                tokio::time::timeout(limit, introspect::models(&self.control, worker.url())).await.unwrap_or_default()
            }
            false => models,
        };
        worker.set_models(models);
        let dp = match self.dp_aware && healthy {
            true => tokio::time::timeout(limit, introspect::dp_size(&self.control, worker.url())).await.ok().flatten(),
            false => None,
        };
        let workers = ranks(worker, dp);
        for w in &workers {
            w.set_healthy_flag(healthy);
        }
        Ok(workers)
    }

    /// A worker passed a health probe after failing (or never passing) one: learn what it
    /// could not tell before. An engine can come back serving another model, so its models
    /// are asked again; with `--dp-aware`, a worker registered before it could say how many
    /// ranks it runs is replaced by its ranks.
    pub async fn on_ready(&self, worker: &Arc<Worker>) {
        let models = introspect::models(&self.control, worker.url()).await;
        if !models.is_empty() && models != worker.models() {
            tracing::info!(worker = worker.url(), ?models, "worker models");
            for rank in self.registry.at_url(worker.url()) {
                rank.set_models(models.clone());
            }
            self.registry.refresh_models();
        }
        if !self.dp_aware || worker.dp_rank().is_some() || worker.is_retired() {
            return;
        }
        let Some(dp) = introspect::dp_size(&self.control, worker.url()).await.filter(|(n, _)| *n > 1) else {
            return;
        };
        let mut fresh = Worker::with_breaker(worker.url().to_owned(), worker.role(), worker.breaker_config());
        if let Some(source) = worker.source() {
            fresh = fresh.with_source(source);
        }
        if let Some(e) = worker.kv_events() {
            fresh = fresh.with_kv_events(e.clone());
        }
        fresh.set_models(worker.models());
        let ranks = ranks(fresh, Some(dp));
        for r in &ranks {
            r.set_healthy_flag(true);
        }
        if self.registry.remove(worker.key()).is_ok() && self.register(&ranks).is_ok() {
            tracing::info!(worker = worker.url(), ranks = ranks.len(), "data-parallel ranks registered");
        }
    }
}

/// `worker`, or one worker per rank when it runs several.
fn ranks(worker: Worker, dp: Option<(u32, bool)>) -> Vec<Arc<Worker>> {
    match dp {
        Some((size, in_body)) if size > 1 => (0..size)
            .map(|rank| {
                let mut w = Worker::with_breaker(worker.url().to_owned(), worker.role(), worker.breaker_config());
                if let Some(source) = worker.source() {
                    w = w.with_source(source);
                }
                if let Some(e) = worker.kv_events() {
                    w = w.with_kv_events(e.clone());
                }
                w.set_models(worker.models());
                Arc::new(w.with_dp_rank(DpRank { rank, size, in_body }))
            })
            .collect(),
        _ => vec![Arc::new(worker)],
    }
}

/// Whether a worker URL's host may be a worker: its literal IP, or every address its name
/// resolves to (within two seconds; a name that does not resolve yet is let through — there
/// is nothing to reach), against the allow-list or the link-local/metadata deny rules.
async fn check_worker_address(url: &str, allow: &[Cidr]) -> Result<(), String> {
    let uri: axum::http::Uri = url.parse().map_err(|_| format!("invalid worker URL '{url}'"))?;
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let default_port = if uri.scheme_str() == Some("https") { 443 } else { 80 };
    let port = uri.port_u16().unwrap_or(default_port);
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
