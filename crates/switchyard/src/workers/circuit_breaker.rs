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

    /// Whether a request may be sent now.
    pub fn allows(&self) -> bool {
        if !self.tripped.load(Ordering::Relaxed) {
            return true;
        }
        matches!(self.state(), BreakerState::Closed { .. } | BreakerState::HalfOpen { probing: false, .. })
    }

    /// Claims the request slot when the worker is chosen; false if a probe already holds it.
    pub fn on_dispatch(&self) -> bool {
        let _ = self.state();
        let mut s = self.lock();
        match *s {
            BreakerState::Closed { .. } => true,
            BreakerState::HalfOpen { probing: false, successes } => {
                *s = BreakerState::HalfOpen { probing: true, successes };
                true
            }
            _ => false,
        }
    }

    /// Records how a request to the worker ended.
    pub fn record(&self, success: bool) {
        let mut s = self.lock();
        *s = match (*s, success) {
            (BreakerState::Closed { .. }, true) => BreakerState::Closed { failures: 0 },
            (BreakerState::Closed { failures }, false) if failures + 1 >= self.config.failure_threshold => {
                tracing::warn!(failures = failures + 1, "circuit opened");
                BreakerState::Open { until: Instant::now() + self.config.timeout }
            }
            (BreakerState::Closed { failures }, false) => BreakerState::Closed { failures: failures + 1 },
            (BreakerState::HalfOpen { successes, .. }, true) if successes + 1 >= self.config.success_threshold => {
                tracing::info!("circuit closed");
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
        b.record(false);
        b.record(false);
        b.record(true); // a success resets the count
        b.record(false);
        b.record(false);
        assert!(b.allows());
        b.record(false);
        assert_eq!(b.state().name(), "open");
        assert!(!b.allows());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!b.allows());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.allows());
        assert!(b.on_dispatch(), "the probe");
        assert!(!b.allows() && !b.on_dispatch(), "only one probe at a time");
        b.record(true);
        assert!(b.on_dispatch());
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens() {
        let b = breaker();
        for _ in 0..3 {
            b.record(false);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(b.on_dispatch());
        b.record(false);
        assert_eq!(b.state().name(), "open");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!b.allows(), "the timeout restarts");
    }
}
