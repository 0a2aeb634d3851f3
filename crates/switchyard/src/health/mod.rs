//! Health checking: probes each worker on its own connection pool and flips it healthy or
//! unhealthy after consecutive-result thresholds (so one slow probe doesn't evict a worker
//! and one lucky probe doesn't restore a broken one).
//!
//! A worker that has never passed a probe (an engine still loading its model, a pod just
//! scheduled) is the exception: it is probed every second and serves from its first success,
//! instead of waiting out `success_threshold` health intervals.

pub mod introspect;
pub mod load_poller;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::HealthConfig;
use crate::discovery::Onboarding;
use crate::proxy::Upstream;
use crate::workers::Worker;

/// How often a worker that has never been ready is probed.
const STARTING_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often a healthy worker whose models are still unknown is asked again.
const MODELS_RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// Consecutive results of one worker's probes.
#[derive(Debug, Default, Clone, Copy)]
struct Streak {
    failures: u32,
    successes: u32,
}

/// Probes the worker at `url` once: healthy means a 2xx answer within the timeout.
pub async fn probe(upstream: &Upstream, url: &str, endpoint: &str) -> bool {
    probe_status(upstream, url, endpoint).await.0
}

/// [`probe`], with the status the worker answered (if it answered).
pub async fn probe_status(upstream: &Upstream, url: &str, endpoint: &str) -> (bool, Option<u16>) {
    // A probe's answer is not read beyond 64 KiB (a worker cannot make probing expensive).
    match upstream.fetch_bounded(Method::GET, url, endpoint, 64 << 10).await {
        Ok((status, _)) => ((200..300).contains(&status), Some(status)),
        Err(_) => (false, None),
    }
}

/// Runs the checker until `shutdown` changes or its sender is dropped. With
/// `remove_unhealthy`, a worker marked unhealthy is also removed from the registry.
///
/// The ranks of a data-parallel engine share one probe (one process answers for all).
pub async fn run(
    onboarding: Arc<Onboarding>,
    config: HealthConfig,
    remove_unhealthy: bool,
    mut shutdown: watch::Receiver<()>,
) {
    let registry = onboarding.registry.clone();
    let mut streaks: HashMap<String, Streak> = HashMap::new();
    let mut ticker = tokio::time::interval(config.interval.min(STARTING_PROBE_INTERVAL));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_round: Option<Instant> = None;
    // Introspection runs beside the probes (a worker slow to describe itself must not delay
    // anyone's health checks): one at a time per URL, retries of unknown models spaced out.
    let introspecting: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
    let mut last_asked: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = Instant::now();
        let full_round = last_round.is_none_or(|t| now.duration_since(t) >= config.interval);
        if full_round {
            last_round = Some(now);
        }
        let workers = registry.all();
        // One probe per URL: every worker in a full round, else only those never ready.
        let mut urls: Vec<&str> = Vec::new();
        for w in workers.iter().filter(|w| full_round || !w.ready_once()) {
            if !urls.contains(&w.url()) {
                urls.push(w.url());
            }
        }
        let mut probes = JoinSet::new();
        for url in urls {
            let (upstream, endpoint, url) = (onboarding.probes.clone(), config.endpoint.clone(), url.to_owned());
            probes.spawn(async move {
                let ok = probe(&upstream, &url, &endpoint).await;
                (url, ok)
            });
        }
        let results: HashMap<String, bool> = tokio::select! {
            r = probes.join_all() => r.into_iter().collect(),
            _ = shutdown.changed() => return,
        };
        streaks.retain(|key, _| workers.iter().any(|w| w.key() == key));
        let mut ready: Vec<(Arc<Worker>, bool)> = Vec::new();
        for w in workers.iter() {
            let Some(&ok) = results.get(w.url()) else { continue };
            let s = streaks.entry(w.key().to_owned()).or_default();
            if ok {
                s.successes += 1;
                s.failures = 0;
                let first = !w.ready_once();
                if !w.is_healthy() && (first || s.successes >= config.success_threshold) {
                    tracing::info!(worker = w.key(), first, "worker is healthy");
                    registry.set_healthy(w, true);
                    ready.push((w.clone(), true));
                } else if w.is_healthy() && w.models().is_empty() {
                    ready.push((w.clone(), false)); // its models are still unknown: ask again
                }
            } else {
                s.failures += 1;
                s.successes = 0;
                if w.is_healthy() && s.failures >= config.failure_threshold {
                    tracing::warn!(worker = w.key(), failures = s.failures, "worker marked unhealthy");
                    registry.set_healthy(w, false);
                    if remove_unhealthy && registry.remove(w.key()).is_ok() {
                        tracing::warn!(worker = w.key(), "unhealthy worker removed (--remove-unhealthy-workers)");
                    }
                }
            }
        }
        last_asked.retain(|url, _| workers.iter().any(|w| w.url() == url));
        // Ranks of one engine are introspected once.
        ready.dedup_by(|a, b| a.0.url() == b.0.url());
        for (w, became_healthy) in ready {
            let url = w.url().to_owned();
            if !became_healthy && last_asked.get(&url).is_some_and(|t| now.duration_since(*t) < MODELS_RETRY_INTERVAL) {
                continue;
            }
            if !lock(&introspecting).insert(url.clone()) {
                continue;
            }
            last_asked.insert(url.clone(), now);
            let (onboarding, introspecting) = (onboarding.clone(), introspecting.clone());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(INTROSPECTION_LIMIT, onboarding.on_ready(&w)).await;
                lock(&introspecting).remove(&url);
            });
        }
    }
}

/// Longest a worker's introspection (models, ranks) may take.
pub const INTROSPECTION_LIMIT: Duration = Duration::from_secs(10);

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
