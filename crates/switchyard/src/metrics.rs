//! Prometheus metrics: families registered once, labels typed and bounded (route, status,
//! worker, policy — never anything per request), rendered in the text exposition format on
//! `/metrics` and on `--prometheus-port`.
//!
//! Per-worker counters that already exist for routing (in-flight, dispatched, breaker and
//! health state) are read from the registry at scrape time rather than counted twice.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::workers::{BreakerState, WorkerRegistry};

/// Latency buckets in seconds: milliseconds (a router's own overhead, TTFT of short
/// prompts) up to ten minutes (long generations).
pub const LATENCY_BUCKETS: [f64; 17] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];
/// Time-per-output-token buckets in seconds.
pub const TPOT_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0];
/// Match-ratio buckets (0–1).
pub const RATIO_BUCKETS: [f64; 10] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// A histogram with fixed buckets, lock-free to observe.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (upper bounds, ascending; +Inf is implicit).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the histogram's `_bucket`, `_sum` and `_count` lines with `labels`.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braced = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braced} {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{braced} {count}");
    }
}

/// `switchyard_requests_total` by (route, status), then worker: bounded by routes × statuses
/// × workers. The worker level is looked up by `&str`, so a hit allocates nothing.
type RequestCounts = BTreeMap<(&'static str, u16), BTreeMap<String, u64>>;

/// Every metric family the router exports.
#[derive(Debug)]
pub struct Metrics {
    policy: &'static str,
    requests: Mutex<RequestCounts>,
    duration: Mutex<BTreeMap<&'static str, Histogram>>,
    ttft: Mutex<BTreeMap<String, Histogram>>,
    tpot: Mutex<BTreeMap<String, Histogram>>,
    retries: AtomicU64,
    /// Broken streams by what became of them.
    stream_failovers: Mutex<BTreeMap<&'static str, u64>>,
    /// Time from a stream breaking to its continuation's first byte.
    failover_delay: Histogram,
    /// Cache predictions against what the workers reported.
    audit: crate::audit::RoutingAudit,
    queue_depth: AtomicU64,
    open_connections: AtomicU64,
}

impl Metrics {
    /// A fresh set for a router running `policy`.
    pub fn new(policy: &'static str) -> Self {
        Self {
            policy,
            requests: Mutex::new(BTreeMap::new()),
            duration: Mutex::new(BTreeMap::new()),
            ttft: Mutex::new(BTreeMap::new()),
            tpot: Mutex::new(BTreeMap::new()),
            retries: AtomicU64::new(0),
            stream_failovers: Mutex::new(BTreeMap::new()),
            failover_delay: Histogram::new(&LATENCY_BUCKETS),
            audit: crate::audit::RoutingAudit::default(),
            queue_depth: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
        }
    }

    /// A finished request: its route, final status, the worker that answered ("none" if
    /// no worker did) and its duration.
    pub fn request(&self, route: &'static str, status: u16, worker: &str, duration: Duration) {
        {
            let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            let by_worker = requests.entry((route, status)).or_default();
            match by_worker.get_mut(worker) {
                Some(n) => *n += 1,
                None => {
                    by_worker.insert(worker.to_owned(), 1);
                }
            }
        }
        self.duration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(route)
            .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS))
            .observe(duration.as_secs_f64());
    }

    /// One attempt ended (its guard reported): timings by worker for streams, and the
    /// request count when the attempt's answer was the client's — with the status the client
    /// saw: 499 when it went away, 502 when a relayed answer broke.
    pub fn attempt_ended(&self, o: &crate::load::RequestOutcome) {
        self.audit.record(o);
        let worker = o.worker.url();
        if o.streamed {
            let tpot = o
                .time_to_first_byte
                .zip(o.usage.completion_tokens.filter(|n| *n >= 2))
                .map(|(ttft, n)| o.latency.saturating_sub(ttft) / (n - 1));
            self.token_timing(worker, o.time_to_first_byte, tpot.filter(|t| *t > Duration::ZERO));
        }
        if let Some(status) = o.relayed {
            let status = match o.ending {
                crate::load::Ending::Abandoned => 499,
                crate::load::Ending::Failed if status < 400 => 502,
                _ => status,
            };
            self.request(o.dispatch.route, status, worker, o.latency);
        }
    }

    /// Time to first token (first body byte) and mean time per output token of a stream.
    pub fn token_timing(&self, worker: &str, ttft: Option<Duration>, tpot: Option<Duration>) {
        if let Some(t) = ttft {
            let mut m = self.ttft.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(worker.to_owned()).or_insert_with(|| Histogram::new(&LATENCY_BUCKETS)).observe(t.as_secs_f64());
        }
        if let Some(t) = tpot {
            let mut m = self.tpot.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(worker.to_owned()).or_insert_with(|| Histogram::new(&TPOT_BUCKETS)).observe(t.as_secs_f64());
        }
    }

    /// Drops every series of a worker that left the fleet (labels stay bounded under churn).
    pub fn forget_worker(&self, worker: &str) {
        for by_worker in self.requests.lock().unwrap_or_else(|p| p.into_inner()).values_mut() {
            by_worker.remove(worker);
        }
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, by_worker| !by_worker.is_empty());
        self.ttft.lock().unwrap_or_else(|p| p.into_inner()).remove(worker);
        self.tpot.lock().unwrap_or_else(|p| p.into_inner()).remove(worker);
    }

    /// One retry (a further attempt on another worker).
    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A relayed stream broke: `outcome` is `continued`, `completed` (it had all its tokens),
    /// `not_continued` (it cannot be continued faithfully, or no continuation was left) or
    /// `failed` (the continuation could not start).
    pub fn stream_failover(&self, outcome: &'static str) {
        *self.stream_failovers.lock().unwrap_or_else(|p| p.into_inner()).entry(outcome).or_insert(0) += 1;
    }

    /// A continuation started relaying `delay` after its stream broke.
    pub fn stream_failover_delay(&self, delay: Duration) {
        self.failover_delay.observe(delay.as_secs_f64());
    }

    /// The routing audit (`/debug/routing`).
    pub fn audit(&self) -> &crate::audit::RoutingAudit {
        &self.audit
    }

    /// Requests waiting for admission.
    pub fn set_queue_depth(&self, n: usize) {
        self.queue_depth.store(n as u64, Ordering::Relaxed);
    }

    /// Client connections opened/closed.
    pub fn connection(&self, opened: bool) {
        if opened {
            self.open_connections.fetch_add(1, Ordering::Relaxed);
        } else {
            self.open_connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The text exposition.
    pub fn render(&self, registry: &WorkerRegistry) -> String {
        let mut out = String::with_capacity(8192);
        let p = self.policy;
        header(&mut out, "switchyard_requests_total", "counter", "Requests answered, by route, status and worker.");
        for ((route, status), by_worker) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            for (worker, v) in by_worker {
                let _ = writeln!(
                    out,
                    "switchyard_requests_total{{route=\"{route}\",status=\"{status}\",worker=\"{worker}\",policy=\"{p}\"}} {v}"
                );
            }
        }
        header(
            &mut out,
            "switchyard_request_duration_seconds",
            "histogram",
            "Request duration, to the end of the response.",
        );
        for (route, h) in self.duration.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            h.render(&mut out, "switchyard_request_duration_seconds", &format!("route=\"{route}\""));
        }
        header(&mut out, "switchyard_ttft_seconds", "histogram", "Time to first token (first body byte) by worker.");
        for (w, h) in self.ttft.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            h.render(&mut out, "switchyard_ttft_seconds", &format!("worker=\"{w}\""));
        }
        header(&mut out, "switchyard_tpot_seconds", "histogram", "Mean time per output token of streams, by worker.");
        for (w, h) in self.tpot.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            h.render(&mut out, "switchyard_tpot_seconds", &format!("worker=\"{w}\""));
        }
        let workers = registry.all();
        header(&mut out, "switchyard_worker_in_flight", "gauge", "Requests in flight per worker.");
        for w in workers.iter() {
            let _ = writeln!(out, "switchyard_worker_in_flight{{worker=\"{}\"}} {}", w.url(), w.load().in_flight());
        }
        header(&mut out, "switchyard_policy_decisions_total", "counter", "Requests the policy sent to each worker.");
        for w in workers.iter() {
            let _ = writeln!(
                out,
                "switchyard_policy_decisions_total{{policy=\"{p}\",worker=\"{}\"}} {}",
                w.url(),
                w.load().dispatched()
            );
        }
        header(&mut out, "switchyard_worker_healthy", "gauge", "1 if the health checker lets the worker serve.");
        for w in workers.iter() {
            let _ = writeln!(out, "switchyard_worker_healthy{{worker=\"{}\"}} {}", w.url(), u8::from(w.is_healthy()));
        }
        header(
            &mut out,
            "switchyard_health_panic",
            "gauge",
            "1 while too few workers pass their health probes and requests go to every worker that has served.",
        );
        let _ = writeln!(out, "switchyard_health_panic {}", u8::from(registry.in_panic()));
        header(&mut out, "switchyard_circuit_breaker_state", "gauge", "0 closed, 1 open, 2 half-open.");
        for w in workers.iter() {
            let v = match w.breaker().state() {
                BreakerState::Closed { .. } => 0,
                BreakerState::Open { .. } => 1,
                BreakerState::HalfOpen { .. } => 2,
            };
            let _ = writeln!(out, "switchyard_circuit_breaker_state{{worker=\"{}\"}} {v}", w.url());
        }
        header(&mut out, "switchyard_retries_total", "counter", "Attempts retried on another worker.");
        let _ = writeln!(out, "switchyard_retries_total {}", self.retries.load(Ordering::Relaxed));
        header(&mut out, "switchyard_stream_failovers_total", "counter", "Relayed streams that broke, by outcome.");
        for (outcome, n) in self.stream_failovers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "switchyard_stream_failovers_total{{outcome=\"{outcome}\"}} {n}");
        }
        header(
            &mut out,
            "switchyard_stream_failover_seconds",
            "histogram",
            "Time from a stream breaking to its continuation's response on another worker.",
        );
        self.failover_delay.render(&mut out, "switchyard_stream_failover_seconds", "");
        self.audit.render(&mut out, header);
        header(&mut out, "switchyard_queue_depth", "gauge", "Requests waiting for admission.");
        let _ = writeln!(out, "switchyard_queue_depth {}", self.queue_depth.load(Ordering::Relaxed));
        header(&mut out, "switchyard_open_connections", "gauge", "Client connections open.");
        let _ = writeln!(out, "switchyard_open_connections {}", self.open_connections.load(Ordering::Relaxed));
        header(&mut out, "switchyard_process_resident_memory_bytes", "gauge", "Router resident set size.");
        let _ = writeln!(out, "switchyard_process_resident_memory_bytes {}", resident_bytes());
        out
    }
}

/// `text` (an exposition) with `key="value"` added to every sample's labels.
pub fn with_label(text: &str, key: &str, value: &str) -> String {
    let value = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            out.push_str(line);
        } else if let Some(i) = line.find('{') {
            out.push_str(&line[..=i]);
            let _ = write!(out, "{key}=\"{value}\",");
            out.push_str(&line[i + 1..]);
        } else if let Some(i) = line.find(' ') {
            let _ = write!(out, "{}{{{key}=\"{value}\"}}{}", &line[..i], &line[i..]);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Appends `more` to `out`, leaving out `# HELP`/`# TYPE` lines `out` already has (a family
/// rendered for several models is declared once).
pub fn append_deduplicated(out: &mut String, more: &str) {
    for line in more.lines() {
        if line.starts_with('#') && out.lines().any(|l| l == line) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// RSS from /proc (0 where unavailable).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_families_get_their_model_label_and_are_declared_once() {
        let one = "# HELP x a\n# TYPE x counter\nx 1\nx_bucket{le=\"1\"} 2\n";
        let mut out = String::new();
        append_deduplicated(&mut out, &with_label(one, "model", "a"));
        append_deduplicated(&mut out, &with_label(one, "model", "b\"c"));
        assert_eq!(out.matches("# TYPE x counter").count(), 1);
        assert!(out.contains("x{model=\"a\"} 1\n") && out.contains("x_bucket{model=\"a\",le=\"1\"} 2"));
        assert!(out.contains("x{model=\"b\\\"c\"} 1"), "{out}");
    }

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&LATENCY_BUCKETS);
        h.observe(0.003);
        h.observe(0.2);
        h.observe(1000.0);
        let mut s = String::new();
        h.render(&mut s, "x", "a=\"b\"");
        assert!(s.contains("x_bucket{a=\"b\",le=\"0.001\"} 0"));
        assert!(s.contains("x_bucket{a=\"b\",le=\"0.005\"} 1"));
        assert!(s.contains("x_bucket{a=\"b\",le=\"0.25\"} 2"));
        assert!(s.contains("x_bucket{a=\"b\",le=\"600\"} 2"));
        assert!(s.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3"));
        assert!(s.contains("x_count{a=\"b\"} 3"));
    }
}
