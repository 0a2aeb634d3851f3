//! `random`: uniform over the candidates.

use std::sync::Arc;

use super::rng::PolicyRng;
use super::{RoutingError, RoutingPolicy, Selection};
use crate::request::RequestView;
use crate::workers::Worker;

/// Settings of [`Random`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RandomConfig {
    /// RNG seed (tests, simulation); `None` = from entropy.
    pub seed: Option<u64>,
}

/// Picks a candidate uniformly at random.
#[derive(Debug)]
pub struct Random {
    rng: PolicyRng,
}

impl Random {
    /// A policy with `config`.
    pub fn new(config: &RandomConfig) -> Self {
        Self { rng: PolicyRng::new(config.seed) }
    }
}

impl RoutingPolicy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn select_single(&self, workers: &[Arc<Worker>], _request: &RequestView) -> Result<Selection, RoutingError> {
        if workers.is_empty() {
            return Err(RoutingError::NoHealthyWorkers);
        }
        Ok(Selection::of(self.rng.index(workers.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::test_support::workers;

    #[test]
    fn uniform_within_a_statistical_bound() {
        let ws = workers(4);
        let p = Random::new(&RandomConfig { seed: Some(7) });
        let mut counts = [0usize; 4];
        let n = 40_000;
        for _ in 0..n {
            counts[p.select_single(&ws, &RequestView::default()).unwrap().index] += 1;
        }
        // Each count ~ Binomial(n, 1/4): σ ≈ 87; allow 5σ.
        for c in counts {
            assert!((c as i64 - 10_000).abs() < 435, "{counts:?}");
        }
    }
}
