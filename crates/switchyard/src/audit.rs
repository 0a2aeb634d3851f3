//! The routing audit: how good each decision's cache prediction was.
//!
//! A prefix-aware policy routes on a guess of what each worker has cached. For every decision
//! that came with a guess, the audit keeps the prompt tokens the policy predicted cached on the
//! chosen worker, the best it predicted on any other candidate, and the cached tokens the
//! worker then reported (`usage.prompt_tokens_details.cached_tokens`, SGLang's
//! `meta_info.cached_tokens`). The error and the "predicted hit, got miss" count go to
//! Prometheus; the last decisions are in `GET /debug/routing`. An operator sees what the guess
//! costs — a worker that evicted, traffic the router did not see, a tokenizer that differs.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::load::{Ending, RequestOutcome};
use crate::metrics::Histogram;

/// Decisions kept for `/debug/routing`.
pub const RECENT: usize = 256;

/// Buckets of the absolute prediction error, in tokens.
const ERROR_BUCKETS: [f64; 9] = [0.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0];

/// One audited decision.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// When the request ended (Unix ms).
    pub at_unix_ms: u64,
    /// The route.
    pub route: &'static str,
    /// The policy that decided.
    pub policy: &'static str,
    /// The chosen worker.
    pub worker: String,
    /// Prompt tokens (the worker's count when it gave one).
    pub prompt_tokens: u32,
    /// Cached tokens the policy predicted on the chosen worker.
    pub predicted_cached: u32,
    /// The most it predicted on any other candidate.
    pub best_other_predicted: u32,
    /// Cached tokens the worker reported.
    pub reported_cached: u32,
    /// `reported - predicted` (negative: the policy expected more than was there).
    pub error: i64,
    /// The policy predicted at least half the prompt cached and the worker had less than half.
    pub predicted_hit_got_miss: bool,
}

/// A counter's label set (`""` for none) and its value.
type Series<'a> = (&'a str, &'a AtomicU64);

/// Audit state: counters, the error histogram, the recent decisions.
#[derive(Debug)]
pub struct RoutingAudit {
    audited: AtomicU64,
    hit_got_miss: AtomicU64,
    predicted_sum: AtomicU64,
    reported_sum: AtomicU64,
    error: Histogram,
    recent: Mutex<VecDeque<Decision>>,
}

impl Default for RoutingAudit {
    fn default() -> Self {
        Self {
            audited: AtomicU64::new(0),
            hit_got_miss: AtomicU64::new(0),
            predicted_sum: AtomicU64::new(0),
            reported_sum: AtomicU64::new(0),
            error: Histogram::new(&ERROR_BUCKETS),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        }
    }
}

impl RoutingAudit {
    /// Audits a request that ended, if its policy predicted and its worker reported.
    pub fn record(&self, o: &RequestOutcome) {
        let (Some((predicted, best_other)), Some(reported)) = (o.dispatch.predicted_cached, o.usage.cached_tokens)
        else {
            return;
        };
        if o.ending != Ending::Succeeded {
            return;
        }
        let prompt = o.usage.prompt_tokens.unwrap_or(o.dispatch.prompt_tokens).max(1);
        let miss = 2 * u64::from(predicted) >= u64::from(prompt) && 2 * u64::from(reported) < u64::from(prompt);
        let error = i64::from(reported) - i64::from(predicted);
        self.audited.fetch_add(1, Ordering::Relaxed);
        self.hit_got_miss.fetch_add(u64::from(miss), Ordering::Relaxed);
        self.predicted_sum.fetch_add(u64::from(predicted), Ordering::Relaxed);
        self.reported_sum.fetch_add(u64::from(reported), Ordering::Relaxed);
        self.error.observe(error.unsigned_abs() as f64);
        let decision = Decision {
            at_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            route: o.dispatch.route,
            policy: o.dispatch.policy,
            worker: o.worker.key().to_owned(),
            prompt_tokens: prompt,
            predicted_cached: predicted,
            best_other_predicted: best_other,
            reported_cached: reported,
            error,
            predicted_hit_got_miss: miss,
        };
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(decision);
    }

    /// `/debug/routing`: totals and the recent decisions, newest last.
    pub fn report(&self) -> serde_json::Value {
        let recent: Vec<Decision> = self.recent.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        serde_json::json!({
            "audited": self.audited.load(Ordering::Relaxed),
            "predicted_hit_got_miss": self.hit_got_miss.load(Ordering::Relaxed),
            "predicted_cached_tokens": self.predicted_sum.load(Ordering::Relaxed),
            "reported_cached_tokens": self.reported_sum.load(Ordering::Relaxed),
            "recent": recent,
        })
    }

    /// The audit's Prometheus families.
    pub fn render(&self, out: &mut String, header: fn(&mut String, &str, &str, &str)) {
        let counters: [(&str, &str, &[Series]); 3] = [
            (
                "switchyard_routing_audited_total",
                "Decisions whose cache prediction was checked against the worker's report.",
                &[("", &self.audited)],
            ),
            (
                "switchyard_routing_predicted_hit_got_miss_total",
                "Decisions predicted to find at least half the prompt cached where the worker had less than half.",
                &[("", &self.hit_got_miss)],
            ),
            (
                "switchyard_routing_cached_tokens_total",
                "Cached prompt tokens: predicted by the policy, reported by the workers.",
                &[("{source=\"predicted\"}", &self.predicted_sum), ("{source=\"reported\"}", &self.reported_sum)],
            ),
        ];
        for (name, help, series) in counters {
            header(out, name, "counter", help);
            for (labels, value) in series {
                let _ = writeln!(out, "{name}{labels} {}", value.load(Ordering::Relaxed));
            }
        }
        header(
            out,
            "switchyard_routing_prediction_error_tokens",
            "histogram",
            "Absolute error of the cached-token prediction, in tokens.",
        );
        self.error.render(out, "switchyard_routing_prediction_error_tokens", "");
    }
}
