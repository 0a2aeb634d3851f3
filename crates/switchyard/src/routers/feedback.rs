//! The one registration every in-flight guard of a pool reports to.

use std::sync::Arc;

use super::hold::HoldQueue;
use crate::load::{FirstTokenOutcome, GuardObserver, RequestOutcome};
use crate::metrics::Metrics;
use crate::policies::RoutingPolicy;

/// What hears the end of a request on a pool's worker: the pool's policy (what it learns),
/// the metrics (per-worker timings; the request count when the answer was the client's), and
/// the router's held requests (capacity freed).
#[derive(Debug)]
pub struct PoolObserver {
    pub(super) policy: Arc<dyn RoutingPolicy>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) hold: Arc<HoldQueue>,
}

impl GuardObserver for PoolObserver {
    fn on_first_token(&self, first: &FirstTokenOutcome) {
        self.policy.on_first_token(first);
    }

    fn on_end(&self, outcome: &RequestOutcome) {
        self.metrics.attempt_ended(outcome);
        self.policy.on_request_complete(outcome);
        self.hold.capacity_freed();
    }
}
