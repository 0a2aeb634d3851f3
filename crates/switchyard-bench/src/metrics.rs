//! Per-request timings and the aggregates a run is judged by, including goodput under SLOs.
//!
//! All times are in unscaled (simulated-hardware) seconds: a live run multiplies wall-clock
//! durations by the fleet's time scale before they get here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What happened to one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestResult {
    /// Arrival (send) time, seconds from the start of the run.
    pub sent_at: f64,
    /// Time to first token.
    pub ttft: Option<f64>,
    /// Gaps between consecutive tokens.
    pub itl: Vec<f64>,
    /// End-to-end latency.
    pub e2e: f64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Of those, served from a prefix cache (as the worker reported).
    pub cached_tokens: u32,
    /// Output tokens received.
    pub output_tokens: u32,
    /// Error (status or transport), if the request failed.
    pub error: Option<String>,
    /// Worker index that served it, where known (simulation); in a PD fleet, the prefill worker.
    pub worker: Option<usize>,
    /// In a PD fleet, the decode worker's index (simulation).
    pub decode_worker: Option<usize>,
    /// The policy's predicted TTFT for it (ms), where the policy predicts one (simulation).
    pub predicted_ttft_ms: Option<u32>,
    /// Why the policy chose that worker, where it says (simulation).
    pub reason: Option<&'static str>,
}

impl RequestResult {
    /// Mean time per output token after the first.
    pub fn tpot(&self) -> Option<f64> {
        let ttft = self.ttft?;
        (self.output_tokens > 1).then(|| (self.e2e - ttft) / f64::from(self.output_tokens - 1))
    }

    /// Whether it succeeded within both SLOs (seconds).
    pub fn meets(&self, slo: &Slo) -> bool {
        self.error.is_none()
            && self.ttft.is_some_and(|t| t <= slo.ttft_ms / 1e3)
            && self.tpot().is_none_or(|t| t <= slo.tpot_ms / 1e3)
    }
}

/// Latency objectives of a goodput measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    /// TTFT bound, milliseconds (unscaled time).
    #[serde(default = "default_ttft")]
    pub ttft_ms: f64,
    /// TPOT bound, milliseconds.
    #[serde(default = "default_tpot")]
    pub tpot_ms: f64,
}

fn default_ttft() -> f64 {
    2000.0
}
fn default_tpot() -> f64 {
    100.0
}

impl Default for Slo {
    fn default() -> Self {
        Self { ttft_ms: default_ttft(), tpot_ms: default_tpot() }
    }
}

/// Aggregates of one run at one load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Requests sent.
    pub requests: usize,
    /// Requests that failed.
    pub errors: usize,
    /// The failed requests by kind ([`error_kind`]): a count alone cannot tell a router's
    /// connection cap from a client timeout or a worker's 5xx.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub error_kinds: BTreeMap<String, usize>,
    /// Requests within both SLOs per second: the offered rate (over the arrival window) times
    /// the share within SLO, so a short run's drain tail does not dilute it.
    pub goodput_rps: f64,
    /// Successful requests per second over [`Summary::duration_s`] (the drain included): past
    /// the knee, where the queues drain long after the last arrival, it can be below goodput.
    pub throughput_rps: f64,
    /// Output tokens per second over [`Summary::duration_s`].
    pub output_tok_s: f64,
    /// Share of requests within both SLOs.
    pub slo_attainment: f64,
    /// TTFT percentiles (ms).
    pub ttft_p50_ms: f64,
    /// p90.
    pub ttft_p90_ms: f64,
    /// p99.
    pub ttft_p99_ms: f64,
    /// TPOT percentiles (ms).
    pub tpot_p50_ms: f64,
    /// p90.
    pub tpot_p90_ms: f64,
    /// p99.
    pub tpot_p99_ms: f64,
    /// Inter-token latency percentiles (ms).
    pub itl_p50_ms: f64,
    /// p99.
    pub itl_p99_ms: f64,
    /// End-to-end percentiles (ms).
    pub e2e_p50_ms: f64,
    /// p90.
    pub e2e_p90_ms: f64,
    /// p99.
    pub e2e_p99_ms: f64,
    /// Cached prompt tokens / prompt tokens.
    pub cache_hit_rate: f64,
    /// Share of requests served by each worker (where known; in a PD fleet each pool's shares
    /// sum to one).
    pub worker_share: Vec<f64>,
    /// Run length used for rates (first send to last completion), seconds.
    pub duration_s: f64,
}

/// Kinds of error a summary names one by one; any further ones count under `other`, so a
/// worker or router that words every error differently cannot grow the summary without end.
pub const ERROR_KINDS: usize = 8;

/// What kind of failure an error is, in a few words: `STATUS: message` for an HTTP error whose
/// body is an OpenAI-style JSON error (the body's `error.message`, or a plain `error` string),
/// else the error's text up to 80 characters.
pub fn error_kind(error: &str) -> String {
    let from_body = error.split_once(": ").and_then(|(status, body)| {
        let status: u16 = status.parse().ok()?;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        let message = v.pointer("/error/message").or_else(|| v.get("error")).and_then(serde_json::Value::as_str)?;
        Some(format!("{status}: {message}"))
    });
    let kind = from_body.unwrap_or_else(|| error.to_owned());
    kind.chars().take(80).collect()
}

/// Counts `errors` by [`error_kind`], at most [`ERROR_KINDS`] kinds named.
fn count_kinds<'a>(errors: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for e in errors {
        let kind = error_kind(e);
        let key = if kinds.contains_key(&kind) || kinds.len() < ERROR_KINDS { kind } else { "other".to_owned() };
        *kinds.entry(key).or_insert(0) += 1;
    }
    kinds
}

/// The `q`-quantile (0..=1) of `v` by nearest rank; 0 for an empty slice.
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Steady-state completion rate of a closed-loop run: completions per second over the
/// second half of them (the first half is the ramp). `None` with fewer than 4 successes.
pub fn steady_rate(results: &[RequestResult]) -> Option<f64> {
    let mut ends: Vec<f64> = results.iter().filter(|r| r.error.is_none()).map(|r| r.sent_at + r.e2e).collect();
    if ends.len() < 4 {
        return None;
    }
    ends.sort_by(f64::total_cmp);
    let half = ends.len() / 2;
    Some((ends.len() - 1 - half) as f64 / (ends[ends.len() - 1] - ends[half]).max(1e-9))
}

impl Summary {
    /// Aggregates `results` (per-worker shares over `workers` workers).
    pub fn of(results: &[RequestResult], slo: &Slo, workers: usize) -> Summary {
        let n = results.len();
        if n == 0 {
            return Summary::default();
        }
        let start = results.iter().map(|r| r.sent_at).fold(f64::INFINITY, f64::min);
        let end = results.iter().map(|r| r.sent_at + r.e2e).fold(0.0, f64::max);
        let duration = (end - start).max(1e-9);
        let last_sent = results.iter().map(|r| r.sent_at).fold(0.0, f64::max);
        let offered =
            if n > 1 && last_sent > start { (n - 1) as f64 / (last_sent - start) } else { n as f64 / duration };
        let ok: Vec<&RequestResult> = results.iter().filter(|r| r.error.is_none()).collect();
        let good = results.iter().filter(|r| r.meets(slo)).count();
        let ms = |v: Vec<f64>| v.into_iter().map(|x| x * 1e3).collect::<Vec<_>>();
        let mut ttft = ms(ok.iter().filter_map(|r| r.ttft).collect());
        let mut tpot = ms(ok.iter().filter_map(|r| r.tpot()).collect());
        let mut itl = ms(ok.iter().flat_map(|r| r.itl.iter().copied()).collect());
        let mut e2e = ms(ok.iter().map(|r| r.e2e).collect());
        let prompt: u64 = ok.iter().map(|r| u64::from(r.prompt_tokens)).sum();
        let cached: u64 = ok.iter().map(|r| u64::from(r.cached_tokens)).sum();
        let mut share = vec![0.0; workers];
        for r in results {
            for w in [r.worker, r.decode_worker].into_iter().flatten().filter(|w| *w < workers) {
                share[w] += 1.0 / n as f64;
            }
        }
        Summary {
            requests: n,
            errors: n - ok.len(),
            error_kinds: count_kinds(results.iter().filter_map(|r| r.error.as_deref())),
            goodput_rps: good as f64 / n as f64 * offered,
            throughput_rps: ok.len() as f64 / duration,
            output_tok_s: ok.iter().map(|r| f64::from(r.output_tokens)).sum::<f64>() / duration,
            slo_attainment: good as f64 / n as f64,
            ttft_p50_ms: percentile(&mut ttft, 0.5),
            ttft_p90_ms: percentile(&mut ttft, 0.9),
            ttft_p99_ms: percentile(&mut ttft, 0.99),
            tpot_p50_ms: percentile(&mut tpot, 0.5),
            tpot_p90_ms: percentile(&mut tpot, 0.9),
            tpot_p99_ms: percentile(&mut tpot, 0.99),
            itl_p50_ms: percentile(&mut itl, 0.5),
            itl_p99_ms: percentile(&mut itl, 0.99),
            e2e_p50_ms: percentile(&mut e2e, 0.5),
            e2e_p90_ms: percentile(&mut e2e, 0.9),
            e2e_p99_ms: percentile(&mut e2e, 0.99),
            cache_hit_rate: if prompt == 0 { 0.0 } else { cached as f64 / prompt as f64 },
            worker_share: share,
            duration_s: duration,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(sent_at: f64, ttft: f64, e2e: f64, tokens: u32) -> RequestResult {
        RequestResult {
            sent_at,
            ttft: Some(ttft),
            itl: vec![(e2e - ttft) / f64::from(tokens - 1); tokens as usize - 1],
            e2e,
            prompt_tokens: 100,
            cached_tokens: 50,
            output_tokens: tokens,
            error: None,
            worker: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn errors_are_counted_by_kind_and_the_kinds_stay_bounded() {
        let capped = r#"503: {"error":{"message":"too many open connections (--max-connections)","type":"service_unavailable","code":503}}"#;
        let mut results = vec![RequestResult { error: Some(capped.into()), ..Default::default() }; 3];
        results.push(RequestResult { error: Some("timeout after 600s".into()), ..Default::default() });
        results.push(RequestResult { error: Some(r#"502: {"error":"worker died"}"#.into()), ..Default::default() });
        // A hostile peer that words every error differently.
        results.extend((0..20).map(|i| RequestResult { error: Some(format!("500: oops {i}")), ..Default::default() }));
        let s = Summary::of(&results, &Slo::default(), 1);
        assert_eq!(s.errors, 25);
        assert_eq!(s.error_kinds.get("503: too many open connections (--max-connections)"), Some(&3));
        assert_eq!(s.error_kinds.get("timeout after 600s"), Some(&1));
        assert_eq!(s.error_kinds.get("502: worker died"), Some(&1));
        assert_eq!(s.error_kinds.len(), ERROR_KINDS + 1, "{:?}", s.error_kinds);
        assert_eq!(s.error_kinds.values().sum::<usize>(), 25);
        assert_eq!(s.error_kinds.get("other"), Some(&15));
        assert_eq!(error_kind(&"x".repeat(500)).len(), 80);
    }

    #[test]
    fn hand_made_timeline() {
        let slo = Slo { ttft_ms: 500.0, tpot_ms: 50.0 };
        let results = vec![
            req(0.0, 0.1, 1.1, 11),  // tpot 100 ms: misses TPOT
            req(1.0, 0.2, 0.7, 11),  // tpot 50 ms: meets both
            req(2.0, 0.6, 1.0, 5),   // ttft 600 ms: misses TTFT
            req(3.0, 0.05, 1.0, 20), // tpot 50 ms: meets, ends at 4.0
            RequestResult { sent_at: 3.5, e2e: 0.1, error: Some("502".into()), ..Default::default() },
        ];
        let s = Summary::of(&results, &slo, 2);
        assert_eq!((s.requests, s.errors), (5, 1));
        assert_eq!(s.error_kinds.get("502"), Some(&1));
        assert!((s.duration_s - 4.0).abs() < 1e-9);
        // Offered: 4 gaps over 3.5 s of arrivals; 2 of 5 within SLO.
        assert!((s.goodput_rps - 0.4 * 4.0 / 3.5).abs() < 1e-9, "{}", s.goodput_rps);
        assert!((s.throughput_rps - 1.0).abs() < 1e-9);
        assert!((s.slo_attainment - 0.4).abs() < 1e-9);
        assert!((s.output_tok_s - 47.0 / 4.0).abs() < 1e-9);
        assert!((s.ttft_p50_ms - 100.0).abs() < 1e-6 && (s.ttft_p99_ms - 600.0).abs() < 1e-6);
        assert!((s.tpot_p99_ms - 100.0).abs() < 1e-6);
        assert!((s.cache_hit_rate - 0.5).abs() < 1e-9);
        assert!((s.worker_share[0] - 0.8).abs() < 1e-9 && s.worker_share[1] == 0.0);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((percentile(&mut v, 0.5), percentile(&mut v, 0.99), percentile(&mut v, 1.0)), (50.0, 99.0, 100.0));
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }
}
