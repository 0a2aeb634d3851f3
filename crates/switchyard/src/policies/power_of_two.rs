//! `power_of_two`: sample two distinct candidates, keep the less loaded (Mitzenmacher's
//! power of two choices: exponentially better max load than random, without a full scan).

use std::sync::Arc;

use super::rng::PolicyRng;
use super::{RoutingError, RoutingPolicy, Selection};
use crate::request::RequestView;
use crate::workers::Worker;

/// Settings of [`PowerOfTwo`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerOfTwoConfig {
    /// RNG seed (tests, simulation); `None` = from entropy.
    pub seed: Option<u64>,
}

/// Lower in-flight load of two random distinct candidates.
#[derive(Debug)]
pub struct PowerOfTwo {
    rng: PolicyRng,
}

impl PowerOfTwo {
    /// A policy with `config`.
    pub fn new(config: &PowerOfTwoConfig) -> Self {
        Self { rng: PolicyRng::new(config.seed) }
    }
}

impl RoutingPolicy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power_of_two"
    }

    fn select_single(&self, workers: &[Arc<Worker>], _request: &RequestView) -> Result<Selection, RoutingError> {
        match workers.len() {
            0 => Err(RoutingError::NoHealthyWorkers),
            1 => Ok(Selection::of(0)),
            n => {
                let a = self.rng.index(n);
                let mut b = self.rng.index(n - 1);
                if b >= a {
                    b += 1;
                }
                Ok(Selection::of(if workers[b].load().in_flight() < workers[a].load().in_flight() { b } else { a }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::test_support::{load, workers};

    #[test]
    fn never_picks_the_busiest_of_two_and_spreads_over_all() {
        let ws = workers(2);
        let _busy = load(&ws[0], 5);
        let p = PowerOfTwo::new(&PowerOfTwoConfig { seed: Some(3) });
        for _ in 0..100 {
            assert_eq!(p.select_single(&ws, &RequestView::default()).unwrap().index, 1);
        }
        let ws = workers(8);
        let mut seen = [false; 8];
        for _ in 0..500 {
            seen[p.select_single(&ws, &RequestView::default()).unwrap().index] = true;
        }
        assert!(seen.iter().all(|s| *s), "{seen:?}");
    }
}
