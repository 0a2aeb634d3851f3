//! How a worker is chosen: the [`RoutingPolicy`] trait, one file per policy, and the factory.
//!
//! A policy is a pure decision over a snapshot of healthy candidates plus its own state: it
//! never does I/O, never sleeps and never filters (the router hands it only workers that
//! may serve). The same objects therefore run in the live router and in offline simulation.
//! What a policy *measures* lives in [`crate::load`]; policies only read it.
//!
//! Adding a policy: one file here implementing [`RoutingPolicy`] with its own config type,
//! one variant in [`PolicyKind`]/[`PolicyConfig`], one line in [`build`].

mod cache_aware;
mod consistent_hash;
mod load_based;
mod marginal_utility;
mod power_of_two;
pub mod radix_tree;
mod random;
mod rng;
mod round_robin;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use cache_aware::{CacheAware, CacheAwareConfig, CacheDecision, DEFAULT_TREE_BYTES};
pub use consistent_hash::{stable_hash, ConsistentHash, ConsistentHashConfig};
pub use load_based::{LoadBased, LoadBasedConfig};
pub use marginal_utility::{Candidate, MarginalUtility, MarginalUtilityConfig, Objective, Overload};
pub use power_of_two::{PowerOfTwo, PowerOfTwoConfig};
pub use random::{Random, RandomConfig};
pub use round_robin::{RoundRobin, RoundRobinConfig};

use crate::load::{FirstTokenOutcome, RequestOutcome};
use crate::request::RequestView;
use crate::workers::{Membership, Worker};

/// What a policy decided for one pool: the candidate's index, and what it expects the
/// request to cost there that the router should count while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    /// Index into the candidate list.
    pub index: usize,
    /// Prompt tokens the policy expects the worker to compute (not served from its prefix
    /// cache); `None` = the policy has no estimate (the whole prompt counts).
    pub uncached_tokens: Option<u32>,
    /// The time to first token the policy predicted there, in ms (traces show it).
    pub predicted_ttft_ms: Option<u32>,
    /// The cost the policy predicted for the fleet, in ms (traces show it).
    pub predicted_cost_ms: Option<u32>,
    /// Why the policy chose it, in a word (traces show it).
    pub reason: Option<&'static str>,
    /// How much of the prompt the policy believes the worker holds, in characters or tokens
    /// of its prefix tree (traces show it).
    pub matched: Option<u64>,
    /// Prompt tokens the policy predicted the chosen worker has cached, and the most it
    /// predicted for any other candidate (the routing audit compares them with what the
    /// worker reports).
    pub predicted_cached: Option<(u32, u32)>,
    /// How long the policy expects the request to wait there to be admitted (a batch slot or
    /// room in the KV cache), in ms (see
    /// [`crate::load::DispatchInfo::slot_wait_ms`]).
    pub slot_wait_ms: Option<u32>,
}

impl Selection {
    /// With the audit's prediction: of `prompt` tokens, `uncached` to compute on the chosen
    /// worker, `best_other_uncached` on the best other candidate (`f64::MAX`: none).
    pub fn with_predicted_cached(mut self, prompt: u32, uncached: f64, best_other_uncached: f64) -> Self {
        let cached = |u: f64| (f64::from(prompt) - u).clamp(0.0, f64::from(prompt)) as u32;
        let other = if best_other_uncached == f64::MAX { 0 } else { cached(best_other_uncached) };
        self.predicted_cached = Some((cached(uncached), other));
        self
    }

    /// The candidate at `index`, with no cache estimate.
    pub fn of(index: usize) -> Self {
        Self {
            index,
            uncached_tokens: None,
            predicted_ttft_ms: None,
            predicted_cost_ms: None,
            reason: None,
            matched: None,
            predicted_cached: None,
            slot_wait_ms: None,
        }
    }
}

/// Where a policy reports on itself (one method for both, so a policy keeps them together).
#[derive(Debug)]
pub enum Report<'a> {
    /// Append the policy's Prometheus families to a scrape.
    Metrics(&'a mut String),
    /// Set the learnt state `GET /debug/policy` shows.
    Debug(&'a mut Option<serde_json::Value>),
}

/// Why no worker could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    /// The candidate list was empty.
    #[error("no healthy workers available")]
    NoHealthyWorkers,
    /// No worker can serve the request within its SLO now; the router may hold it and ask
    /// again after `recheck` or when capacity frees, whichever comes first.
    #[error("every worker is saturated")]
    Saturated {
        /// Longest the router should wait before asking again.
        recheck: Duration,
    },
    /// The request can no longer meet its TTFT SLO and is shed (503 with Retry-After).
    #[error("shed: no worker can serve the request within its TTFT SLO")]
    Shed {
        /// Suggested Retry-After.
        retry_after: Duration,
    },
}

/// One routing policy, used for whole requests (regular mode) and for prefill/decode pairs.
pub trait RoutingPolicy: Send + Sync + fmt::Debug {
    /// The policy's name as given on the command line.
    fn name(&self) -> &'static str;

    /// Picks one of `workers` (all may serve) for `request`.
    fn select_single(&self, workers: &[Arc<Worker>], request: &RequestView) -> Result<Selection, RoutingError>;

    /// Picks a prefill worker and a decode worker. By default two independent single
    /// selections; a policy that can score pairs jointly overrides it.
    fn select_pair(
        &self,
        prefill: &[Arc<Worker>],
        decode: &[Arc<Worker>],
        request: &RequestView,
    ) -> Result<(Selection, Selection), RoutingError> {
        Ok((self.select_single(prefill, request)?, self.select_single(decode, request)?))
    }

    /// What the router observed about a finished request (every ending, abandoned included;
    /// see [`RequestOutcome::ending`]). Stateless policies ignore it.
    fn on_request_complete(&self, _outcome: &RequestOutcome) {}

    /// What the router observed when a streamed request's first token arrived (before it
    /// finishes, so a policy can learn a worker's TTFT without waiting for the whole answer).
    fn on_first_token(&self, _first: &FirstTokenOutcome) {}

    /// A worker joined or left. A policy that keeps per-worker state frees it on removal
    /// (a worker that comes back is a new worker with a new id, and starts cold).
    fn on_membership(&self, _change: &Membership<'_>) {}

    /// Whether the policy reads workers' own load reports (only then does the router poll them).
    fn reads_reported_load(&self) -> bool {
        false
    }

    /// How often [`RoutingPolicy::maintain`] should run, for policies with state to tidy.
    fn maintenance_interval(&self) -> Option<Duration> {
        None
    }

    /// Periodic upkeep (e.g. trimming a cache tree). Pure computation: the router's timer
    /// (or a simulation's virtual clock) calls it, so the policy never owns a thread.
    fn maintain(&self) {}

    /// Reports on the policy: its Prometheus families, or its learnt state as JSON for
    /// `GET /debug/policy`. Stateless policies report nothing.
    fn report(&self, _to: Report<'_>) {}
}

/// Policy names accepted by `--policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Uniformly random.
    Random,
    /// In turn.
    RoundRobin,
    /// Lower load of two random candidates.
    PowerOfTwo,
    /// Least load, random among ties.
    LoadBased,
    /// Prefix-cache affinity with load balancing.
    CacheAware,
    /// Session affinity on a hash ring.
    ConsistentHash,
    /// Least marginal cost on learnt per-worker performance models, within latency SLOs.
    MarginalUtility,
}

impl PolicyKind {
    /// Every policy.
    pub const ALL: [PolicyKind; 7] = [
        PolicyKind::Random,
        PolicyKind::RoundRobin,
        PolicyKind::PowerOfTwo,
        PolicyKind::LoadBased,
        PolicyKind::CacheAware,
        PolicyKind::ConsistentHash,
        PolicyKind::MarginalUtility,
    ];
}

/// A policy with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyConfig {
    /// See [`Random`].
    Random(RandomConfig),
    /// See [`RoundRobin`].
    RoundRobin(RoundRobinConfig),
    /// See [`PowerOfTwo`].
    PowerOfTwo(PowerOfTwoConfig),
    /// See [`LoadBased`].
    LoadBased(LoadBasedConfig),
    /// See [`CacheAware`].
    CacheAware(CacheAwareConfig),
    /// See [`ConsistentHash`].
    ConsistentHash(ConsistentHashConfig),
    /// See [`MarginalUtility`].
    MarginalUtility(MarginalUtilityConfig),
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig::RoundRobin(RoundRobinConfig::default())
    }
}

impl PolicyConfig {
    /// The default settings of `kind`, with `seed` for its random choices.
    pub fn new(kind: PolicyKind, seed: Option<u64>) -> Self {
        match kind {
            PolicyKind::Random => PolicyConfig::Random(RandomConfig { seed }),
            PolicyKind::RoundRobin => PolicyConfig::RoundRobin(RoundRobinConfig::default()),
            PolicyKind::PowerOfTwo => PolicyConfig::PowerOfTwo(PowerOfTwoConfig { seed }),
            PolicyKind::LoadBased => PolicyConfig::LoadBased(LoadBasedConfig { seed }),
            PolicyKind::CacheAware => {
                PolicyConfig::CacheAware(CacheAwareConfig { seed, ..CacheAwareConfig::default() })
            }
            PolicyKind::ConsistentHash => {
                PolicyConfig::ConsistentHash(ConsistentHashConfig { seed, ..ConsistentHashConfig::default() })
            }
            PolicyKind::MarginalUtility => {
                PolicyConfig::MarginalUtility(MarginalUtilityConfig { seed, ..MarginalUtilityConfig::default() })
            }
        }
    }

    /// The seed of its random choices (`None`: from entropy, and round_robin has none).
    pub fn seed(&self) -> Option<u64> {
        match self {
            PolicyConfig::Random(c) => c.seed,
            PolicyConfig::RoundRobin(_) => None,
            PolicyConfig::PowerOfTwo(c) => c.seed,
            PolicyConfig::LoadBased(c) => c.seed,
            PolicyConfig::CacheAware(c) => c.seed,
            PolicyConfig::ConsistentHash(c) => c.seed,
            PolicyConfig::MarginalUtility(c) => c.seed,
        }
    }

    /// The same settings with `seed` for its random choices (round_robin has none).
    pub fn with_seed(&self, seed: Option<u64>) -> Self {
        let mut config = self.clone();
        match &mut config {
            PolicyConfig::Random(c) => c.seed = seed,
            PolicyConfig::RoundRobin(_) => {}
            PolicyConfig::PowerOfTwo(c) => c.seed = seed,
            PolicyConfig::LoadBased(c) => c.seed = seed,
            PolicyConfig::CacheAware(c) => c.seed = seed,
            PolicyConfig::ConsistentHash(c) => c.seed = seed,
            PolicyConfig::MarginalUtility(c) => c.seed = seed,
        }
        config
    }
}

/// Builds a policy from its config.
pub fn build(config: &PolicyConfig) -> Arc<dyn RoutingPolicy> {
    match config {
        PolicyConfig::Random(c) => Arc::new(Random::new(c)),
        PolicyConfig::RoundRobin(c) => Arc::new(RoundRobin::new(c)),
        PolicyConfig::PowerOfTwo(c) => Arc::new(PowerOfTwo::new(c)),
        PolicyConfig::LoadBased(c) => Arc::new(LoadBased::new(c)),
        PolicyConfig::CacheAware(c) => Arc::new(CacheAware::new(c)),
        PolicyConfig::ConsistentHash(c) => Arc::new(ConsistentHash::new(c)),
        PolicyConfig::MarginalUtility(c) => Arc::new(MarginalUtility::new(c)),
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use crate::load::InFlightGuard;
    use crate::workers::{Worker, WorkerRole};

    pub fn workers(n: usize) -> Vec<Arc<Worker>> {
        (0..n).map(|i| Arc::new(Worker::new(format!("http://127.0.0.1:{}", 1000 + i), WorkerRole::Regular))).collect()
    }

    /// Puts `n` requests in flight on `w`; they stay until the guards drop.
    pub fn load(w: &Arc<Worker>, n: usize) -> Vec<InFlightGuard> {
        (0..n).map(|_| InFlightGuard::new(w.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_rejects_an_empty_list_and_picks_in_range() {
        let ws = test_support::workers(3);
        for kind in PolicyKind::ALL {
            let p = build(&PolicyConfig::new(kind, Some(1)));
            let req = RequestView::default();
            assert_eq!(p.select_single(&[], &req), Err(RoutingError::NoHealthyWorkers), "{}", p.name());
            assert_eq!(p.select_pair(&ws, &[], &req), Err(RoutingError::NoHealthyWorkers));
            for _ in 0..50 {
                assert!(p.select_single(&ws, &req).unwrap().index < 3);
                let (a, b) = p.select_pair(&ws[..1], &ws, &req).unwrap();
                assert!(a.index == 0 && b.index < 3);
            }
            assert!(p.select_single(&ws[..1], &req).unwrap().index == 0);
        }
    }
}
