//! `cache_aware`: send a request where its prefix is most likely cached, unless that would
//! unbalance the fleet (sglang-router's algorithm, with two fixes).
//!
//! 1. If the fleet is imbalanced — `max − min > balance_abs_threshold` and
//!    `max > balance_rel_threshold × min` over in-flight requests — pick the least loaded.
//! 2. Else match the routing text against the fleet-wide [`radix_tree`](super::radix_tree):
//!    if the best worker's match ratio exceeds `cache_threshold`, pick it (ties: less loaded).
//! 3. Else pick the **least loaded** worker. sglang-router picks the worker with the smallest
//!    tree here, which ignores load and sends a burst of new prefixes to one worker.
//!
//! The routing text is the whole conversation (every chat message in order), so turns of
//! one conversation share prefixes; token-id requests use a separate token tree. The chosen
//! worker is recorded under the text. Memory is bounded on every insert (see the tree);
//! [`RoutingPolicy::maintain`] trims to a low-water mark in the background.

use std::sync::Arc;
use std::time::Duration;

use super::load_based::least_loaded;
use super::radix_tree::PrefixIndex;
use super::rng::PolicyRng;
use super::{Report, RoutingError, RoutingPolicy, Selection};
use crate::metrics::{Histogram, RATIO_BUCKETS};
use crate::request::RequestView;
use crate::workers::{Membership, Worker};

/// The prefix trees' default memory bound: with it the whole router stays under 64 MB RSS
/// at full rate on any prompt mix (`bench/overhead.sh` soak).
pub const DEFAULT_TREE_BYTES: usize = 16 << 20;

/// Settings of [`CacheAware`] (sglang-router's names and defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheAwareConfig {
    /// Minimum match ratio (matched / prompt length) to route by cache.
    pub cache_threshold: f64,
    /// Absolute in-flight difference above which the fleet counts as imbalanced.
    pub balance_abs_threshold: usize,
    /// Relative in-flight ratio above which the fleet counts as imbalanced.
    pub balance_rel_threshold: f64,
    /// How often the background sweep trims the tree.
    pub eviction_interval: Duration,
    /// Bound on Σ (characters or tokens) × workers holding them, per tree.
    pub max_tree_size: usize,
    /// Bound on the trees' memory, bytes (node, tenant and LRU overhead included).
    pub max_tree_bytes: usize,
    /// RNG seed for tie-breaks.
    pub seed: Option<u64>,
}

impl Default for CacheAwareConfig {
    fn default() -> Self {
        Self {
            cache_threshold: 0.3,
            balance_abs_threshold: 64,
            balance_rel_threshold: 1.5,
            eviction_interval: Duration::from_secs(120),
            max_tree_size: 1 << 26,
            max_tree_bytes: DEFAULT_TREE_BYTES,
            seed: None,
        }
    }
}

/// Prefix-cache-aware routing with load balancing.
#[derive(Debug)]
pub struct CacheAware {
    config: CacheAwareConfig,
    trees: PrefixIndex,
    rng: PolicyRng,
    match_ratio: Histogram,
}

/// Why a decision was made (for traces and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheDecision {
    /// Loads were imbalanced: least loaded.
    Imbalanced,
    /// The best match exceeded the threshold: `matched` characters (or tokens) of the prompt
    /// are in the chosen worker's tree.
    CacheHit {
        /// Length of the match.
        matched: usize,
    },
    /// No good match: least loaded.
    Miss,
}

/// The tree's match on the chosen worker and the best one on any other.
type Matches = (usize, usize);

impl CacheAware {
    /// A policy with `config`.
    pub fn new(config: &CacheAwareConfig) -> Self {
        Self {
            trees: PrefixIndex::new(config.max_tree_size, config.max_tree_bytes),
            rng: PolicyRng::new(config.seed),
            match_ratio: Histogram::new(&RATIO_BUCKETS),
            config: config.clone(),
        }
    }

    /// Total size of the text tree (characters × workers holding them).
    pub fn text_tree_size(&self) -> usize {
        self.trees.sizes().0
    }

    /// Chooses a worker and says why.
    pub fn decide(
        &self,
        workers: &[Arc<Worker>],
        request: &RequestView,
    ) -> Result<(usize, CacheDecision), RoutingError> {
        self.decide_with_matches(workers, request).map(|(i, why, _)| (i, why))
    }

    /// [`CacheAware::decide`], with the tree's match on the chosen worker and the best match
    /// on any other (in the tree's units), when the tree was consulted.
    fn decide_with_matches(
        &self,
        workers: &[Arc<Worker>],
        request: &RequestView,
    ) -> Result<(usize, CacheDecision, Option<Matches>), RoutingError> {
        let in_flight = |w: &Arc<Worker>| w.load().in_flight();
        let least = || least_loaded(workers, &self.rng, in_flight).ok_or(RoutingError::NoHealthyWorkers);
        if workers.is_empty() {
            return Err(RoutingError::NoHealthyWorkers);
        }
        let (min, max) = workers.iter().map(in_flight).fold((usize::MAX, 0), |(lo, hi), l| (lo.min(l), hi.max(l)));
        let imbalanced = max - min > self.config.balance_abs_threshold
            && max as f64 > self.config.balance_rel_threshold * min as f64;
        let mut matches: Option<Vec<usize>> = None;
        let decision = if imbalanced {
            (least()?, CacheDecision::Imbalanced)
        } else {
            match self.trees.matches(&request.text) {
                Some(m) if m.key_size > 0 => {
                    // One pass over the candidates (sorted by id, like the match): a per-worker
                    // lookup made this O(workers × log tenants) on a thousand workers. Workers
                    // publishing KV events: what their engine holds, not the tree's guess.
                    let matched = m.of_each(workers.iter().map(|w| w.id()));
                    let matched = crate::kv_events::overlay_exact(matched, workers, request);
                    let best = matched.iter().copied().max().unwrap_or(0);
                    self.match_ratio.observe(best as f64 / m.key_size as f64);
                    let decision = if best as f64 / m.key_size as f64 > self.config.cache_threshold {
                        let holders: Vec<usize> = (0..workers.len()).filter(|&i| matched[i] == best).collect();
                        let pick = least_loaded(&holders, &self.rng, |&i| in_flight(&workers[i]))
                            .ok_or(RoutingError::NoHealthyWorkers)?;
                        (holders[pick], CacheDecision::CacheHit { matched: best })
                    } else {
                        (least()?, CacheDecision::Miss)
                    };
                    matches = Some(matched);
                    decision
                }
                _ => (least()?, CacheDecision::Miss),
            }
        };
        self.trees.record(&request.text, &workers[decision.0]);
        crate::kv_events::note_routed(&workers[decision.0], request);
        let chosen = decision.0;
        let pair = matches.map(|m| {
            let other = m.iter().enumerate().filter(|(i, _)| *i != chosen).map(|(_, n)| *n).max().unwrap_or(0);
            (m.get(chosen).copied().unwrap_or(0), other)
        });
        Ok((decision.0, decision.1, pair))
    }
}

impl RoutingPolicy for CacheAware {
    fn name(&self) -> &'static str {
        "cache_aware"
    }

    fn select_single(&self, workers: &[Arc<Worker>], request: &RequestView) -> Result<Selection, RoutingError> {
        let (index, why, matches) = self.decide_with_matches(workers, request)?;
        tracing::trace!(worker = workers[index].url(), decision = ?why, "cache_aware");
        let reason = match why {
            CacheDecision::Imbalanced => "imbalanced",
            CacheDecision::CacheHit { .. } => "cache_hit",
            CacheDecision::Miss => "cache_miss",
        };
        // The tree counts characters of text prompts: in tokens at the router's estimate.
        let to_tokens = |n: usize| match &request.text {
            crate::request::RoutingText::Text(_) => (n / crate::load::CHARS_PER_TOKEN) as u32,
            _ => n as u32,
        };
        let prompt = request.prompt_tokens();
        Ok(Selection {
            reason: Some(reason),
            matched: Some(matches.map_or(0, |(m, _)| m) as u64),
            predicted_cached: matches.map(|(m, other)| (to_tokens(m).min(prompt), to_tokens(other).min(prompt))),
            ..Selection::of(index)
        })
    }

    fn on_membership(&self, change: &Membership<'_>) {
        if let Membership::Removed(w) = change {
            self.trees.forget(w.id());
        }
    }

    fn maintenance_interval(&self) -> Option<Duration> {
        Some(self.config.eviction_interval)
    }

    fn report(&self, to: Report<'_>) {
        use std::fmt::Write;
        let out = match to {
            Report::Metrics(out) => out,
            Report::Debug(out) => {
                let workers: Vec<_> = self
                    .trees
                    .tenant_sizes()
                    .into_iter()
                    .map(|(worker, size)| serde_json::json!({"worker": worker, "tree_size": size}))
                    .collect();
                let (text, tokens) = self.trees.sizes();
                *out = Some(serde_json::json!({
                    "policy": "cache_aware",
                    "tree_size": {"text": text, "tokens": tokens},
                    "tree_bytes": self.trees.memory_bytes(),
                    "workers": workers,
                }));
                return;
            }
        };
        let _ = writeln!(out, "# HELP switchyard_cache_match_ratio cache_aware: best prefix match ratio per decision.");
        let _ = writeln!(out, "# TYPE switchyard_cache_match_ratio histogram");
        self.match_ratio.render(out, "switchyard_cache_match_ratio", "");
        let (text, tokens) = self.trees.sizes();
        let _ =
            writeln!(out, "# HELP switchyard_cache_tree_size cache_aware: stored characters (or tokens) × workers.");
        let _ = writeln!(out, "# TYPE switchyard_cache_tree_size gauge");
        let _ = writeln!(out, "switchyard_cache_tree_size{{keys=\"text\"}} {text}\nswitchyard_cache_tree_size{{keys=\"tokens\"}} {tokens}");
        let bytes = self.trees.memory_bytes();
        let _ =
            writeln!(out, "# HELP switchyard_cache_tree_bytes cache_aware: tree memory (what the allocator holds).");
        let _ = writeln!(out, "# TYPE switchyard_cache_tree_bytes gauge\nswitchyard_cache_tree_bytes {bytes}");
        let _ = writeln!(out, "# HELP switchyard_cache_tree_max_bytes cache_aware: the trees' memory bound.");
        let _ = writeln!(
            out,
            "# TYPE switchyard_cache_tree_max_bytes gauge\nswitchyard_cache_tree_max_bytes {}",
            self.trees.max_bytes()
        );
    }

    /// Trims each tree to 90 % of its bound, so inserts rarely evict on the request path.
    fn maintain(&self) {
        self.trees.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::test_support::{load, workers};
    use crate::request::RoutingText;

    fn chat(system: &str, user: &str) -> RequestView {
        RequestView { text: RoutingText::Text(format!("system: {system}\nuser: {user}\n")), ..RequestView::default() }
    }

    fn policy() -> CacheAware {
        CacheAware::new(&CacheAwareConfig { seed: Some(5), ..CacheAwareConfig::default() })
    }

    #[test]
    fn same_prefix_goes_to_the_same_worker() {
        let ws = workers(4);
        let p = policy();
        let system = "You are a meticulous assistant who cites sources. ".repeat(8);
        let (first, why) = p.decide(&ws, &chat(&system, "q0")).unwrap();
        assert_eq!(why, CacheDecision::Miss);
        for i in 1..20 {
            let (w, why) = p.decide(&ws, &chat(&system, &format!("q{i}"))).unwrap();
            assert!(w == first && matches!(why, CacheDecision::CacheHit { .. }), "{why:?}");
        }
    }

    #[test]
    fn misses_go_to_the_least_loaded_worker_not_the_smallest_tree() {
        let ws = workers(3);
        let p = policy();
        // Worker 0 has the smallest (empty) tree but is the busiest.
        let _busy = load(&ws[0], 5);
        let _mid = load(&ws[1], 3);
        for i in 0..10 {
            let distinct =
                RequestView { text: RoutingText::Text(format!("{i}{i} unrelated prompt")), ..RequestView::default() };
            let (w, why) = p.decide(&ws, &distinct).unwrap();
            assert_eq!(why, CacheDecision::Miss);
            assert_eq!(w, 2, "a miss must go to the least loaded worker");
        }
    }

    #[test]
    fn imbalance_overrides_affinity() {
        let ws = workers(2);
        let p = policy();
        let system = "shared system prompt ".repeat(10);
        let (holder, _) = p.decide(&ws, &chat(&system, "a")).unwrap();
        let _flood = load(&ws[holder], 100);
        let (w, why) = p.decide(&ws, &chat(&system, "b")).unwrap();
        assert_eq!((w, why), (1 - holder, CacheDecision::Imbalanced));
    }

    #[test]
    fn token_requests_use_the_token_tree() {
        let ws = workers(3);
        let p = policy();
        let req = |tail: u32| RequestView {
            text: RoutingText::Tokens((0..500).chain([tail]).collect()),
            ..RequestView::default()
        };
        let (first, _) = p.decide(&ws, &req(1)).unwrap();
        let (w, why) = p.decide(&ws, &req(2)).unwrap();
        assert!(w == first && matches!(why, CacheDecision::CacheHit { .. }), "{why:?}");
        assert_eq!(p.text_tree_size(), 0);
    }
}
