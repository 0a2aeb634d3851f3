//! In-flight request counting with drop guards, after tower's `load::completion`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::workers::Worker;

/// Per-worker load counters, updated by guards and read by policies.
#[derive(Debug, Default)]
pub struct WorkerLoad {
    in_flight: AtomicUsize,
    dispatched: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
}

impl WorkerLoad {
    /// Requests sent to the worker whose responses have not ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests dispatched to the worker since it was added.
    pub fn dispatched(&self) -> u64 {
        self.dispatched.load(Ordering::Relaxed)
    }

    /// Requests that ended successfully.
    pub fn succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
    }

    /// Requests that ended in an error (worker status ≥ 500, transport error, cut stream).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// What the router observed about one finished request, for `on_request_complete`.
#[derive(Debug, Clone)]
pub struct RequestOutcome {
    /// The worker that served it.
    pub worker: Arc<Worker>,
    /// Whether it completed without error.
    pub success: bool,
    /// Time from dispatch to the first response body byte, if any arrived.
    pub time_to_first_byte: Option<Duration>,
    /// Time from dispatch to the end of the response.
    pub latency: Duration,
}

/// Counts one request as in flight on a worker for as long as the guard lives.
#[derive(Debug)]
pub struct InFlightGuard {
    worker: Arc<Worker>,
    dispatched_at: Instant,
    first_byte_at: Option<Instant>,
}

impl InFlightGuard {
    /// Marks a request as dispatched to `worker`.
    pub fn new(worker: Arc<Worker>) -> Self {
        let load = worker.load();
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        load.dispatched.fetch_add(1, Ordering::Relaxed);
        Self { worker, dispatched_at: Instant::now(), first_byte_at: None }
    }

    /// The worker this request is counted on.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// Records the arrival of the first response byte (time to first token for streams).
    pub fn mark_first_byte(&mut self) {
        if self.first_byte_at.is_none() {
            self.first_byte_at = Some(Instant::now());
        }
    }

    /// Ends the request as succeeded or failed (worker-side failure: it also feeds the
    /// worker's circuit breaker) and returns what was observed. A guard dropped without
    /// `complete` (client went away) counts as neither.
    pub fn complete(self, success: bool) -> RequestOutcome {
        self.worker.breaker().record(success);
        let load = self.worker.load();
        let counter = if success { &load.succeeded } else { &load.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        RequestOutcome {
            worker: self.worker.clone(),
            success,
            time_to_first_byte: self.first_byte_at.map(|t| t - self.dispatched_at),
            latency: self.dispatched_at.elapsed(),
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.worker.load().in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::WorkerRole;

    #[test]
    fn guards_count_and_release() {
        let w = Arc::new(Worker::new("http://127.0.0.1:1".into(), WorkerRole::Regular));
        let a = InFlightGuard::new(w.clone());
        let b = InFlightGuard::new(w.clone());
        let c = InFlightGuard::new(w.clone());
        assert_eq!(w.load().in_flight(), 3);
        assert!(!b.complete(false).success);
        assert_eq!((w.load().in_flight(), w.load().failed()), (2, 1));
        assert!(a.complete(true).success);
        drop(c); // abandoned: released, counted neither way
        assert_eq!(
            (w.load().in_flight(), w.load().succeeded(), w.load().failed(), w.load().dispatched()),
            (0, 1, 1, 3)
        );
    }
}
