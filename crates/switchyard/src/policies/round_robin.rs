//! `round_robin`: candidates in turn, from one atomic counter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{RoutingError, RoutingPolicy};
use crate::request::RequestView;
use crate::workers::Worker;

/// Settings of [`RoundRobin`] (none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundRobinConfig {}

/// Picks candidates in turn. Each instance (each pool in PD mode) has its own counter.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// A policy with `config`.
    pub fn new(_config: &RoundRobinConfig) -> Self {
        Self::default()
    }
}

impl RoutingPolicy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn select_single(&self, workers: &[Arc<Worker>], _request: &RequestView) -> Result<usize, RoutingError> {
        if workers.is_empty() {
            return Err(RoutingError::NoHealthyWorkers);
        }
        Ok(self.next.fetch_add(1, Ordering::Relaxed) % workers.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::test_support::workers;

    #[test]
    fn exact_rotation() {
        let ws = workers(3);
        let p = RoundRobin::default();
        let picks: Vec<_> = (0..7).map(|_| p.select_single(&ws, &RequestView::default()).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2, 0]);
    }
}
