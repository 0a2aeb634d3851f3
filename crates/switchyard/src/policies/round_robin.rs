//! `round_robin`: candidates in turn, from one atomic counter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{RoutingError, RoutingPolicy, Selection};
use crate::request::RequestView;
use crate::workers::Worker;

/// Settings of [`RoundRobin`] (none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundRobinConfig {}

/// Picks candidates in turn. Each instance (each pool in PD mode) has its own counter.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
    /// Pair selection rotates each pool on its own counter; one shared counter would lock
    /// the two pools into a fixed phase (with two workers each: always the same pair).
    next_prefill: AtomicUsize,
    next_decode: AtomicUsize,
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

    fn select_single(&self, workers: &[Arc<Worker>], _request: &RequestView) -> Result<Selection, RoutingError> {
        if workers.is_empty() {
            return Err(RoutingError::NoHealthyWorkers);
        }
        Ok(Selection::of(self.next.fetch_add(1, Ordering::Relaxed) % workers.len()))
    }

    fn select_pair(
        &self,
        prefill: &[Arc<Worker>],
        decode: &[Arc<Worker>],
        _request: &RequestView,
    ) -> Result<(Selection, Selection), RoutingError> {
        if prefill.is_empty() || decode.is_empty() {
            return Err(RoutingError::NoHealthyWorkers);
        }
        let p = self.next_prefill.fetch_add(1, Ordering::Relaxed) % prefill.len();
        let d = self.next_decode.fetch_add(1, Ordering::Relaxed) % decode.len();
        Ok((Selection::of(p), Selection::of(d)))
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
        let picks: Vec<_> = (0..7).map(|_| p.select_single(&ws, &RequestView::default()).unwrap().index).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2, 0]);
        let pairs: Vec<_> = (0..4)
            .map(|_| p.select_pair(&ws[..2], &ws[..2], &RequestView::default()).unwrap())
            .map(|(a, b)| (a.index, b.index))
            .collect();
        assert_eq!(pairs, vec![(0, 0), (1, 1), (0, 0), (1, 1)], "each pool rotates on its own");
    }
}
