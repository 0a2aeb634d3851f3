//! How much prefill this router has sent each worker lately.
//!
//! Past the knee marginal_utility's best effort sends a cold prompt where it evicts least: the
//! coldest cache. That cache stays coldest because it is sent the cold prompts, so one worker
//! computes a quarter more prefill than the others and takes most of the late first tokens
//! (multi-turn at the knee). Bounding how far one worker's share may run ahead needs the share
//! now. The model's own prefill rate is the one the steps of finished requests carried: it
//! lags a request's whole life and, worse, a worker passed over for running ahead finishes
//! fewer requests, so its figure stopped moving and it stayed passed over (one draw of
//! multi-turn: a worker left with 1.4 M prompt tokens against 2.8-3.0 M, goodput 0.93x). What
//! the router sent is known when it sends it, and a sum that decays falls for a worker sent
//! nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A decayed sum: its value at `at`.
#[derive(Debug, Clone, Copy)]
struct Sum {
    tokens: f64,
    at: Instant,
}

impl Sum {
    fn at(&self, now: Instant, horizon: f64) -> f64 {
        self.tokens * (-now.saturating_duration_since(self.at).as_secs_f64() / horizon).exp()
    }
}

/// Per worker, the uncached prompt tokens sent there, each weighted by e^(-age / horizon).
#[derive(Debug)]
pub struct SentPrefill {
    horizon_secs: f64,
    workers: Mutex<HashMap<u32, Sum>>,
}

impl SentPrefill {
    /// Sums over about `horizon` (the decay's time constant).
    pub fn new(horizon: Duration) -> Self {
        Self { horizon_secs: horizon.as_secs_f64().max(1e-3), workers: Mutex::new(HashMap::new()) }
    }

    /// `tokens` uncached prompt tokens sent to `worker` at `now`. A count that is not a
    /// finite, non-negative number (a broken estimate) adds nothing.
    pub fn record(&self, worker: u32, tokens: f64, now: Instant) {
        if !tokens.is_finite() || tokens < 0.0 {
            return;
        }
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        let sum = workers.entry(worker).or_insert(Sum { tokens: 0.0, at: now });
        *sum = Sum { tokens: sum.at(now, self.horizon_secs) + tokens, at: now };
    }

    /// For each of `workers`, in their order, the decayed sum of what was sent there as of `now`
    /// (0 for a worker sent nothing): one lock for a whole decision's candidates.
    pub fn recent(&self, workers: impl IntoIterator<Item = u32>, now: Instant) -> Vec<f64> {
        let sums = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.into_iter().map(|w| sums.get(&w).map_or(0.0, |s| s.at(now, self.horizon_secs))).collect()
    }

    /// Drops a worker that left the fleet.
    pub fn forget(&self, worker: u32) {
        self.workers.lock().unwrap_or_else(|p| p.into_inner()).remove(&worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sum_adds_what_is_sent_and_decays_by_e_over_one_horizon() {
        let sent = SentPrefill::new(Duration::from_secs(20));
        let t0 = Instant::now();
        sent.record(1, 1000.0, t0);
        sent.record(1, 500.0, t0);
        assert_eq!(sent.recent([1], t0)[0], 1500.0);
        assert_eq!(sent.recent([2, 1], t0), vec![0.0, 1500.0], "a worker sent nothing, and one sent 1,500");
        let later = sent.recent([1], t0 + Duration::from_secs(20))[0];
        assert!((later - 1500.0 / std::f64::consts::E).abs() < 1e-6, "{later}");
        // What is sent later adds to what is left of the earlier.
        sent.record(1, 100.0, t0 + Duration::from_secs(20));
        assert!((sent.recent([1], t0 + Duration::from_secs(20))[0] - later - 100.0).abs() < 1e-6);
    }

    #[test]
    fn broken_counts_add_nothing_and_a_forgotten_worker_starts_again() {
        let sent = SentPrefill::new(Duration::from_secs(20));
        let t0 = Instant::now();
        sent.record(1, 300.0, t0);
        for broken in [f64::NAN, f64::INFINITY, -5.0] {
            sent.record(1, broken, t0);
        }
        assert_eq!(sent.recent([1], t0)[0], 300.0);
        sent.forget(1);
        assert_eq!(sent.recent([1], t0)[0], 0.0);
    }
}
