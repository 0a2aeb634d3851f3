//! Polls each worker's own load report: SGLang's `/get_load` (an object, or one object per
//! data-parallel rank), else the Prometheus `/metrics` of SGLang (`sglang:token_usage`,
//! `sglang:num_queue_reqs`) or vLLM (`vllm:kv_cache_usage_perc`, `vllm:num_requests_waiting`).
//! What the worker says goes into [`crate::load::WorkerLoad::set_reported`]; policies read it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::load::ReportedLoad;
use crate::proxy::Upstream;
use crate::workers::{Worker, WorkerRegistry};

/// Reads one `/get_load` answer: KV usage, waiting and running requests. SGLang's `num_reqs`
/// counts the waiting requests too (`len(running_batch) + num_waiting_reqs`).
pub fn parse_get_load(body: &[u8]) -> Option<(f64, u64, u64)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let ranks: Vec<&Value> = match &v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(_) => vec![&v],
        _ => return None,
    };
    if ranks.is_empty() {
        return None;
    }
    let num = |r: &Value, k: &str| r.get(k).and_then(Value::as_f64);
    let mut usage: f64 = 0.0;
    let (mut queued, mut running) = (0u64, 0u64);
    let mut any = false;
    for r in &ranks {
        if let Some(u) = num(r, "token_usage") {
            usage = usage.max(u);
            any = true;
        }
        let waiting = num(r, "num_waiting_reqs").map(|q| q.max(0.0) as u64);
        if let Some(q) = waiting {
            queued = queued.saturating_add(q);
            any = true;
        }
        if let Some(n) = num(r, "num_reqs") {
            running = running.saturating_add((n.max(0.0) as u64).saturating_sub(waiting.unwrap_or(0)));
            any = true;
        }
    }
    any.then_some((usage, queued, running))
}

/// Reads the load gauges out of a Prometheus text exposition.
pub fn parse_metrics(text: &str) -> Option<(f64, u64, u64)> {
    let mut usage = None;
    let (mut queued, mut running) = (None, None);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.trim().parse::<f64>() else { continue };
        let name = name.split('{').next().unwrap_or(name);
        match name {
            "sglang:token_usage" | "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                usage = Some(usage.map_or(value, |u: f64| u.max(value)))
            }
            "sglang:num_queue_reqs" | "vllm:num_requests_waiting" => {
                queued = Some(queued.unwrap_or(0u64).saturating_add(value.max(0.0) as u64))
            }
            "sglang:num_running_reqs" | "vllm:num_requests_running" => {
                running = Some(running.unwrap_or(0u64).saturating_add(value.max(0.0) as u64))
            }
            _ => {}
        }
    }
    (usage.is_some() || queued.is_some()).then(|| (usage.unwrap_or(0.0), queued.unwrap_or(0), running.unwrap_or(0)))
}

/// One poll of `worker`.
pub async fn poll(upstream: &Upstream, worker: &Worker) -> Option<ReportedLoad> {
    let parsed = match upstream.fetch(Method::GET, worker.url(), "/get_load").await {
        Ok((200, body)) => parse_get_load(&body),
        _ => None,
    };
    let parsed = match parsed {
        Some(p) => Some(p),
        None => match upstream.fetch(Method::GET, worker.url(), "/metrics").await {
            Ok((200, body)) => parse_metrics(&String::from_utf8_lossy(&body)),
            _ => None,
        },
    };
    parsed.map(|(kv_usage, queued, running)| ReportedLoad { kv_usage, queued, running, at: Instant::now() })
}

/// Polls every worker each `interval` until `shutdown` changes.
///
/// Each worker's poll runs on its own: a worker still answering (or timing out on) its last
/// poll is skipped this round, not waited for. A round that waited for every poll let one hung
/// worker — two probe timeouts, `/get_load` then `/metrics`, 10 s by default — hold back every
/// other worker's report, until their reports were older than the policies accept
/// (`report_max_age`, three intervals) and marginal_utility lost its view of the whole fleet.
pub async fn run(
    registry: Arc<WorkerRegistry>,
    upstream: Upstream,
    interval: Duration,
    mut shutdown: watch::Receiver<()>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut polls: JoinSet<()> = JoinSet::new();
    // The worker each running poll is for (a poll that panicked ends its entry too).
    let mut polling: HashMap<tokio::task::Id, String> = HashMap::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        while let Some(done) = polls.try_join_next_with_id() {
            polling.remove(&done.map_or_else(|e| e.id(), |(id, ())| id));
        }
        let busy: HashSet<&str> = polling.values().map(String::as_str).collect();
        let due: Vec<Arc<Worker>> = registry.all().iter().filter(|w| !busy.contains(w.key())).cloned().collect();
        for w in due {
            let (key, upstream) = (w.key().to_owned(), upstream.clone());
            let id = polls
                .spawn(async move {
                    if let Some(report) = poll(&upstream, &w).await {
                        w.load().set_reported(report);
                    }
                })
                .id();
            polling.insert(id, key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::client::new_client;
    use crate::workers::WorkerRole;

    /// A worker that accepts connections and never answers must not hold back the others'
    /// reports: the healthy worker is polled every round while the hung one's poll waits out its
    /// 5-s timeout. Waiting for every poll each round gave it one report in those 2 s.
    #[tokio::test]
    async fn a_hung_worker_does_not_delay_the_others_reports() {
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hung_url = format!("http://{}", hung.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = hung.accept().await {
                open.push(socket);
            }
        });
        let healthy =
            switchyard_sim::server::spawn_worker(switchyard_sim::server::WorkerConfig::default()).await.unwrap();
        let registry = Arc::new(WorkerRegistry::new());
        let good = Arc::new(Worker::new(healthy.url(), WorkerRole::Regular));
        registry.add(Arc::new(Worker::new(hung_url, WorkerRole::Regular))).unwrap();
        registry.add(good.clone()).unwrap();
        let upstream = Upstream::new(new_client(Duration::from_secs(1), 4), Duration::from_secs(5));
        let (stop, shutdown) = watch::channel(());
        let poller = tokio::spawn(run(registry, upstream, Duration::from_millis(50), shutdown));
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut seen = HashSet::new();
        while Instant::now() < deadline && seen.len() < 4 {
            if let Some(r) = good.load().reported() {
                seen.insert(r.at);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(seen.len() >= 4, "the healthy worker was polled {} times in 2 s", seen.len());
        drop(stop);
        poller.await.unwrap();
        held.abort();
    }

    #[test]
    fn reads_sglang_and_vllm_reports() {
        assert_eq!(parse_get_load(br#"{"num_reqs":3,"num_waiting_reqs":2,"token_usage":0.5}"#), Some((0.5, 2, 1)));
        assert_eq!(
            parse_get_load(br#"[{"num_reqs":1,"num_waiting_reqs":0},{"num_reqs":2,"num_waiting_reqs":1}]"#),
            Some((0.0, 1, 2))
        );
        assert_eq!(parse_get_load(b"[]"), None);
        // A broken or hostile worker's numbers saturate; nothing overflows.
        let huge = br#"[{"num_reqs":1e300,"num_waiting_reqs":1},{"num_reqs":1e300,"num_waiting_reqs":1e300}]"#;
        assert_eq!(parse_get_load(huge), Some((0.0, u64::MAX, u64::MAX - 1)));
        assert_eq!(parse_get_load(b"oops"), None);
        let text = "# HELP x\nvllm:num_requests_waiting{model_name=\"m\"} 4.0\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\nvllm:num_requests_running{model_name=\"m\"} 7\n";
        assert_eq!(parse_metrics(text), Some((0.25, 4, 7)));
        assert_eq!(parse_metrics("garbage\n"), None);
    }
}
