//! Health checking: probes each worker on its own connection pool and flips it healthy or
//! unhealthy after consecutive-result thresholds (so one slow probe doesn't evict a worker
//! and one lucky probe doesn't restore a broken one).

pub mod load_poller;

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::Method;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::HealthConfig;
use crate::proxy::Upstream;
use crate::workers::{Worker, WorkerRegistry};

/// Consecutive results of one worker's probes.
#[derive(Debug, Default, Clone, Copy)]
struct Streak {
    failures: u32,
    successes: u32,
}

/// Probes `worker` once: healthy means a 2xx answer within the timeout.
pub async fn probe(upstream: &Upstream, worker: &Worker, endpoint: &str) -> bool {
    probe_status(upstream, worker, endpoint).await.0
}

/// [`probe`], with the status the worker answered (if it answered).
pub async fn probe_status(upstream: &Upstream, worker: &Worker, endpoint: &str) -> (bool, Option<u16>) {
    match upstream.fetch(Method::GET, worker.url(), endpoint).await {
        Ok((status, _)) => ((200..300).contains(&status), Some(status)),
        Err(_) => (false, None),
    }
}

/// Runs the checker until `shutdown` changes or its sender is dropped. With
/// `remove_unhealthy`, a worker marked unhealthy is also removed from the registry.
pub async fn run(
    registry: Arc<WorkerRegistry>,
    upstream: Upstream,
    config: HealthConfig,
    remove_unhealthy: bool,
    mut shutdown: watch::Receiver<()>,
) {
    let mut streaks: HashMap<String, Streak> = HashMap::new();
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let workers = registry.all();
        let mut probes = JoinSet::new();
        for w in workers.iter().cloned() {
            let upstream = upstream.clone();
            let endpoint = config.endpoint.clone();
            probes.spawn(async move {
                let ok = probe(&upstream, &w, &endpoint).await;
                (w, ok)
            });
        }
        let results = tokio::select! {
            r = probes.join_all() => r,
            _ = shutdown.changed() => return,
        };
        streaks.retain(|url, _| workers.iter().any(|w| w.url() == url));
        for (w, ok) in results {
            let s = streaks.entry(w.url().to_owned()).or_default();
            if ok {
                s.successes += 1;
                s.failures = 0;
                if !w.is_healthy() && s.successes >= config.success_threshold {
                    tracing::info!(worker = w.url(), "worker is healthy again");
                    registry.set_healthy(&w, true);
                }
            } else {
                s.failures += 1;
                s.successes = 0;
                if w.is_healthy() && s.failures >= config.failure_threshold {
                    tracing::warn!(worker = w.url(), failures = s.failures, "worker marked unhealthy");
                    registry.set_healthy(&w, false);
                    if remove_unhealthy && registry.remove(w.url()).is_ok() {
                        tracing::warn!(worker = w.url(), "unhealthy worker removed (--remove-unhealthy-workers)");
                    }
                }
            }
        }
    }
}
