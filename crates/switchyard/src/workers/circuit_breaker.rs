//! Per-worker circuit breaker: closed → open after consecutive worker-side failures →
//! half-open after a timeout, letting one probe request through → closed after consecutive
//! successes (linkerd2-proxy's consecutive-failures breaker). Only failures that mean the
//! worker is sick count: connection errors, timeouts, 5xx, 408/429, broken streams — never a
//! client's own 4xx. Time is tokio's, so tests run on a paused clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::time::Instant;

use crate::config::CircuitBreakerConfig;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows; counting consecutive failures.
    Closed {
        /// Consecutive failures so far.
        failures: u32,
    },
    /// No traffic until the given instant.
    Open {
        /// When a probe may go through.
        until: Instant,
    },
    /// One probe at a time; counting consecutive successes.
    HalfOpen {
        /// A probe is in flight.
        probing: bool,
        /// Consecutive successes so far.
        successes: u32,
    },
}

impl BreakerState {
    /// Short name for APIs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

/// The breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: CircuitBreakerConfig,
    state: Mutex<BreakerState>,
    /// False while closed: the request path checks this without taking the lock.
    tripped: AtomicBool,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        Self { config, state: Mutex::new(BreakerState::Closed { failures: 0 }), tripped: AtomicBool::new(false) }
    }

    /// Its thresholds.
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current state (an open breaker whose timeout passed reads as half-open).
    pub fn state(&self) -> BreakerState {
        let mut s = self.lock();
        if let BreakerState::Open { until } = *s {
            if Instant::now() >= until {
                *s = BreakerState::HalfOpen { probing: false, successes: 0 };
            }
        }
        *s
    }

    /// Whether a request may be sent now (a hint for filtering candidates: the claim in
    /// [`CircuitBreaker::try_claim`] decides).
    pub fn allows(&self) -> bool {
        if !self.tripped.load(Ordering::Relaxed) {
            return true;
        }
        matches!(self.state(), BreakerState::Closed { .. } | BreakerState::HalfOpen { probing: false, .. })
    }

    /// Claims the right to send one request: always while closed; the single probe permit
    /// while half-open; never while open or while another probe is out. The claim is owned by
    /// the request's in-flight guard, which reports its end — [`CircuitBreaker::record`] on a
    /// verdict, [`CircuitBreaker::release`] when the request is abandoned — so no ending can
    /// leave the breaker waiting for a probe that will never report (linkerd's probation
    /// permit).
    pub fn try_claim(&self) -> Option<Claim> {
        if !self.tripped.load(Ordering::Relaxed) {
            return Some(Claim { probe: false });
        }
        let _ = self.state();
        let mut s = self.lock();
        match *s {
            BreakerState::Closed { .. } => Some(Claim { probe: false }),
            BreakerState::HalfOpen { probing: false, successes } => {
                *s = BreakerState::HalfOpen { probing: true, successes };
                Some(Claim { probe: true })
            }
            _ => None,
        }
    }

    /// Records how a request sent under `claim` ended. In half-open state only the probe's
    /// verdict counts: requests sent before the circuit opened say nothing about recovery.
    /// Returns the new state when the circuit opened or closed, for the caller to log with the
    /// worker's name (the breaker does not know it).
    pub fn record(&self, claim: Claim, success: bool) -> Option<BreakerState> {
        let mut s = self.lock();
        let before = *s;
        *s = match (*s, success) {
            (BreakerState::Closed { .. }, true) => BreakerState::Closed { failures: 0 },
            (BreakerState::Closed { failures }, false) if failures + 1 >= self.config.failure_threshold => {
                BreakerState::Open { until: Instant::now() + self.config.timeout }
            }
            (BreakerState::Closed { failures }, false) => BreakerState::Closed { failures: failures + 1 },
            (half @ BreakerState::HalfOpen { .. }, _) if !claim.probe => half,
            (BreakerState::HalfOpen { successes, .. }, true) if successes + 1 >= self.config.success_threshold => {
                BreakerState::Closed { failures: 0 }
            }
            (BreakerState::HalfOpen { successes, .. }, true) => {
                BreakerState::HalfOpen { probing: false, successes: successes + 1 }
            }
            (BreakerState::HalfOpen { .. }, false) => {
                BreakerState::Open { until: Instant::now() + self.config.timeout }
            }
            (open @ BreakerState::Open { .. }, _) => open,
        };
        self.tripped.store(!matches!(*s, BreakerState::Closed { .. }), Ordering::Relaxed);
        match (before, *s) {
            (BreakerState::Closed { .. }, BreakerState::Open { .. })
            | (BreakerState::HalfOpen { .. }, BreakerState::Closed { .. }) => Some(*s),
            _ => None,
        }
    }

    /// Gives back a claim whose request ended without a verdict on the worker (the client
    /// went away, the router cancelled the leg): a probe permit returns, so the next request
    /// probes instead of the breaker waiting forever.
    pub fn release(&self, claim: Claim) {
        if !claim.probe {
            return;
        }
        let mut s = self.lock();
        if let BreakerState::HalfOpen { probing: true, successes } = *s {
            *s = BreakerState::HalfOpen { probing: false, successes };
        }
    }

    /// Opens the circuit at once (tests, operators): as if the failure threshold was reached.
    pub fn trip(&self) {
        let mut s = self.lock();
        *s = BreakerState::Open { until: Instant::now() + self.config.timeout };
        self.tripped.store(true, Ordering::Relaxed);
    }
}

/// The right to send one request through a breaker, held by the request's in-flight guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a claim must be recorded or released"]
pub struct Claim {
    probe: bool,
}

impl Claim {
    /// Whether this claim holds the half-open probe permit.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(CircuitBreakerConfig {
            failure_threshold: 3,
            success_threshold: 2,
            timeout: Duration::from_secs(60),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_probes_once_and_closes() {
        let b = breaker();
        let c = Claim { probe: false };
        b.record(c, false);
        b.record(c, false);
        b.record(c, true); // a success resets the count
        b.record(c, false);
        b.record(c, false);
        assert!(b.allows());
        assert!(matches!(b.record(c, false), Some(BreakerState::Open { .. })), "the opening is reported");
        assert_eq!(b.state().name(), "open");
        assert!(!b.allows());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!b.allows());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.allows());
        let probe = b.try_claim().expect("the probe");
        assert!(probe.is_probe());
        assert!(!b.allows() && b.try_claim().is_none(), "only one probe at a time");
        b.record(c, true);
        assert!(b.try_claim().is_none(), "a request sent before the circuit opened is no probe");
        b.record(probe, true);
        let probe = b.try_claim().expect("the second probe");
        assert_eq!(b.record(probe, true), Some(BreakerState::Closed { failures: 0 }), "the closing is reported");
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens() {
        let b = breaker();
        for _ in 0..3 {
            b.record(Claim { probe: false }, false);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        let probe = b.try_claim().unwrap();
        b.record(probe, false);
        assert_eq!(b.state().name(), "open");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!b.allows(), "the timeout restarts");
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_gives_its_permit_back() {
        let b = breaker();
        b.trip();
        tokio::time::advance(Duration::from_secs(60)).await;
        let probe = b.try_claim().unwrap();
        assert!(b.try_claim().is_none());
        b.release(probe);
        assert!(b.allows(), "the next request may probe");
        let probe = b.try_claim().expect("a new probe");
        b.record(probe, true);
        assert_eq!(b.state().name(), "half_open");
    }
}
