//! `load_based`: the least in-flight candidate, random among equals.
//!
//! Ties are broken at random. A deterministic tie-break
//! (first index) sends every concurrent request that sees the same snapshot to the same
//! worker — the herd effect seen in the router we replace.

use std::sync::Arc;

use super::rng::PolicyRng;
use super::{RoutingError, RoutingPolicy, Selection};
use crate::request::RequestView;
use crate::workers::Worker;

/// Settings of [`LoadBased`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadBasedConfig {
    /// RNG seed (tests, simulation); `None` = from entropy.
    pub seed: Option<u64>,
}

/// Least in-flight load, random tie-break.
#[derive(Debug)]
pub struct LoadBased {
    rng: PolicyRng,
}

impl LoadBased {
    /// A policy with `config`.
    pub fn new(config: &LoadBasedConfig) -> Self {
        Self { rng: PolicyRng::new(config.seed) }
    }
}

/// Index of the least-loaded worker by `load`, uniformly random among ties: one pass finds
/// the minimum and counts ties, one RNG draw picks the k-th tie, a second pass finds it.
pub(crate) fn least_loaded<T>(workers: &[T], rng: &PolicyRng, load: impl Fn(&T) -> usize) -> Option<usize> {
    let mut best_load = usize::MAX;
    let mut ties = 0usize;
    let mut first = None;
    for (i, w) in workers.iter().enumerate() {
        let l = load(w);
        if l < best_load {
            best_load = l;
            ties = 1;
            first = Some(i);
        } else if l == best_load {
            ties += 1;
        }
    }
    let first = first?;
    if ties == 1 {
        return Some(first);
    }
    let mut k = rng.index(ties);
    // Loads may move between the passes; then the first minimum stands.
    let pick = workers.iter().enumerate().skip(first).find_map(|(i, w)| {
        if load(w) == best_load {
            if k == 0 {
                return Some(i);
            }
            k -= 1;
        }
        None
    });
    Some(pick.unwrap_or(first))
}

impl RoutingPolicy for LoadBased {
    fn name(&self) -> &'static str {
        "load_based"
    }

    fn select_single(&self, workers: &[Arc<Worker>], _request: &RequestView) -> Result<Selection, RoutingError> {
        least_loaded(workers, &self.rng, |w: &Arc<Worker>| w.load().in_flight())
            .map(Selection::of)
            .ok_or(RoutingError::NoHealthyWorkers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::test_support::{load, workers};

    #[test]
    fn picks_the_idle_worker() {
        let ws = workers(3);
        let _a = load(&ws[0], 2);
        let _b = load(&ws[2], 1);
        let p = LoadBased::new(&LoadBasedConfig { seed: Some(1) });
        for _ in 0..20 {
            assert_eq!(p.select_single(&ws, &RequestView::default()).unwrap().index, 1);
        }
    }

    #[test]
    fn equal_load_selections_spread_instead_of_herding() {
        // N selections that all see the same (equal) snapshot, as concurrent requests do
        // before any guard is taken: a first-index tie-break would send all 64 to worker 0.
        let ws = workers(4);
        let p = LoadBased::new(&LoadBasedConfig { seed: Some(9) });
        let mut counts = [0usize; 4];
        for _ in 0..64 {
            counts[p.select_single(&ws, &RequestView::default()).unwrap().index] += 1;
        }
        assert!(counts.iter().all(|&c| (4..=32).contains(&c)), "{counts:?}");
    }
}
