//! `consistent_hash`: session affinity on a hash ring with virtual nodes (Karger et al.).
//!
//! The key is the request's routing key (`x-session-id` / `x-user-id` header or body `user`),
//! falling back to the routing text. Each worker owns `virtual_nodes` points on a 64-bit ring,
//! hashed from its URL, so every router replica builds the same ring and a worker joining or
//! leaving moves only the keys of its own arcs (≈ 1/N of them).

use std::sync::{Arc, Mutex};

use super::rng::PolicyRng;
use super::{Report, RoutingError, RoutingPolicy, Selection};
use crate::request::{RequestView, RoutingText};
use crate::workers::{Membership, Worker};

/// Settings of [`ConsistentHash`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistentHashConfig {
    /// Points per worker on the ring.
    pub virtual_nodes: usize,
    /// Seed for the fallback when a request has neither key nor text.
    pub seed: Option<u64>,
}

impl Default for ConsistentHashConfig {
    fn default() -> Self {
        Self { virtual_nodes: 160, seed: None }
    }
}

/// A stable 64-bit hash (FNV-1a, then a SplitMix64 finaliser for avalanche).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// One candidate set's ring.
#[derive(Debug)]
struct Ring {
    /// The candidates' ids, in the order they were passed.
    members: Vec<u32>,
    points: Vec<(u64, u32)>,
    last_used: u64,
}

/// Rings kept, one per candidate set seen: a PD router asks with its prefill pool and its
/// decode pool in turn, a retry without the workers that failed. With a single ring every change
/// of set rebuilt it (160 hashed points a worker, sorted): in PD mode twice a request.
const RINGS_KEPT: usize = 16;

/// Points kept over all rings (16 bytes each, 8 MiB): sets that differ by one worker (a retry
/// that leaves out the one that failed) would otherwise keep 16 near-copies of a large fleet's
/// ring (2.6 MB each at 1,024 workers).
const POINTS_KEPT: usize = 1 << 19;

#[derive(Debug, Default)]
struct Rings {
    rings: Vec<Ring>,
    uses: u64,
    /// Rings built so far.
    builds: u64,
}

impl Rings {
    /// The ring of `workers`, built now if this set was not seen (or was evicted).
    fn of(&mut self, workers: &[Arc<Worker>], virtual_nodes: usize) -> &Ring {
        self.uses += 1;
        // Another set's ring differs within its first few members (pools are disjoint).
        let found = self.rings.iter().position(|r| {
            r.members.len() == workers.len() && r.members.iter().zip(workers).all(|(id, w)| *id == w.id())
        });
        let at = match found {
            Some(at) => at,
            None => {
                let mut points = Vec::with_capacity(workers.len() * virtual_nodes);
                for w in workers {
                    for v in 0..virtual_nodes {
                        points.push((stable_hash(format!("{}#{v}", w.url()).as_bytes()), w.id()));
                    }
                }
                points.sort_unstable();
                self.builds += 1;
                // Least recently used out until the new ring fits both bounds (it is kept even
                // when it alone exceeds the points: it is the one being asked for).
                while let Some(oldest) = (0..self.rings.len()).min_by_key(|&i| self.rings[i].last_used) {
                    let kept: usize = self.rings.iter().map(|r| r.points.len()).sum();
                    if self.rings.len() < RINGS_KEPT && kept + points.len() <= POINTS_KEPT {
                        break;
                    }
                    self.rings.swap_remove(oldest);
                }
                self.rings.push(Ring { members: workers.iter().map(|w| w.id()).collect(), points, last_used: 0 });
                self.rings.len() - 1
            }
        };
        self.rings[at].last_used = self.uses;
        &self.rings[at]
    }
}

/// Session affinity by consistent hashing.
#[derive(Debug)]
pub struct ConsistentHash {
    virtual_nodes: usize,
    rings: Mutex<Rings>,
    rng: PolicyRng,
}

impl ConsistentHash {
    /// A policy with `config`.
    pub fn new(config: &ConsistentHashConfig) -> Self {
        Self {
            virtual_nodes: config.virtual_nodes.max(1),
            rings: Mutex::new(Rings::default()),
            rng: PolicyRng::new(config.seed),
        }
    }

    fn key_hash(request: &RequestView) -> Option<u64> {
        if let Some(k) = &request.routing_key {
            return Some(stable_hash(k.as_bytes()));
        }
        match &request.text {
            RoutingText::Text(s) => Some(stable_hash(s.as_bytes())),
            RoutingText::Tokens(t) => {
                let bytes: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
                Some(stable_hash(&bytes))
            }
            RoutingText::None => None,
        }
    }
}

impl RoutingPolicy for ConsistentHash {
    fn name(&self) -> &'static str {
        "consistent_hash"
    }

    fn select_single(&self, workers: &[Arc<Worker>], request: &RequestView) -> Result<Selection, RoutingError> {
        if workers.is_empty() {
            return Err(RoutingError::NoHealthyWorkers);
        }
        let Some(h) = Self::key_hash(request) else {
            return Ok(Selection::of(self.rng.index(workers.len())));
        };
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let ring = rings.of(workers, self.virtual_nodes);
        let at = ring.points.partition_point(|(p, _)| *p < h) % ring.points.len();
        let owner = ring.points[at].1;
        Ok(Selection::of(workers.iter().position(|w| w.id() == owner).unwrap_or(0)))
    }

    /// `workers`: every worker some kept ring holds (the per-worker state `/debug/policy` lists
    /// for every policy); `rings`: each kept ring's size.
    fn report(&self, to: Report<'_>) {
        if let Report::Debug(out) = to {
            let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
            let ids: std::collections::BTreeSet<u32> =
                rings.rings.iter().flat_map(|r| r.members.iter().copied()).collect();
            let workers: Vec<_> = ids.into_iter().map(|id| serde_json::json!({"worker": id})).collect();
            let sizes: Vec<_> = rings
                .rings
                .iter()
                .map(|r| serde_json::json!({"workers": r.members.len(), "points": r.points.len()}))
                .collect();
            *out = Some(serde_json::json!({
                "policy": "consistent_hash",
                "virtual_nodes": self.virtual_nodes,
                "workers": workers,
                "rings": sizes,
            }));
        }
    }

    /// Rings are built from the candidates as they come; a removal drops every ring holding the
    /// worker now rather than when its set is next asked for, so nothing is kept about a worker
    /// that left.
    fn on_membership(&self, change: &Membership<'_>) {
        if let Membership::Removed(w) = change {
            self.rings.lock().unwrap_or_else(|p| p.into_inner()).rings.retain(|r| !r.members.contains(&w.id()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::test_support::workers;

    fn keyed(k: &str) -> RequestView {
        RequestView { routing_key: Some(k.to_owned()), ..RequestView::default() }
    }

    #[test]
    fn same_key_same_worker_and_keys_spread() {
        let ws = workers(4);
        let p = ConsistentHash::new(&ConsistentHashConfig::default());
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let k = format!("session-{i}");
            let w = p.select_single(&ws, &keyed(&k)).unwrap().index;
            assert_eq!(w, p.select_single(&ws, &keyed(&k)).unwrap().index);
            counts[w] += 1;
        }
        // 160 virtual nodes keep each share within ±25% of fair.
        assert!(counts.iter().all(|&c| (750..=1250).contains(&c)), "{counts:?}");
    }

    #[test]
    fn a_joining_worker_moves_about_one_nth_of_keys() {
        let ws = workers(5);
        let p = ConsistentHash::new(&ConsistentHashConfig::default());
        let keys: Vec<String> = (0..5000).map(|i| format!("user-{i}")).collect();
        let pick = |pool: &[Arc<Worker>], k: &str| pool[p.select_single(pool, &keyed(k)).unwrap().index].id();
        let before: Vec<u32> = keys.iter().map(|k| pick(&ws[..4], k)).collect();
        let after: Vec<u32> = keys.iter().map(|k| pick(&ws, k)).collect();
        let moved: Vec<usize> = (0..keys.len()).filter(|&i| before[i] != after[i]).collect();
        let fraction = moved.len() as f64 / keys.len() as f64;
        assert!((0.12..=0.28).contains(&fraction), "moved {fraction:.3}, expected ≈ 1/5");
        assert!(moved.iter().all(|&i| after[i] == ws[4].id()), "keys may only move to the new worker");
        // And leaving moves back exactly those keys.
        let again: Vec<u32> = keys.iter().map(|k| pick(&ws[..4], k)).collect();
        assert_eq!(again, before);
    }

    #[test]
    fn each_candidate_set_keeps_its_ring_and_a_leaving_worker_drops_its_rings() {
        // A PD router asks with the prefill pool, then the decode pool, for every request.
        let ws = workers(6);
        let (prefill, decode) = (&ws[..3], &ws[3..]);
        let p = ConsistentHash::new(&ConsistentHashConfig::default());
        let mut firsts = Vec::new();
        for i in 0..200 {
            let k = keyed(&format!("session-{i}"));
            let (a, b) = (p.select_single(prefill, &k).unwrap(), p.select_single(decode, &k).unwrap());
            firsts.push((a, b));
        }
        assert_eq!(p.rings.lock().unwrap().builds, 2, "one ring per pool, not one per call");
        // The same keys land where they did (the kept rings are the rings).
        for (i, first) in firsts.iter().enumerate() {
            let k = keyed(&format!("session-{i}"));
            assert_eq!((p.select_single(prefill, &k).unwrap(), p.select_single(decode, &k).unwrap()), *first);
        }
        p.on_membership(&Membership::Removed(&ws[4]));
        let rings = p.rings.lock().unwrap().rings.iter().map(|r| r.members.clone()).collect::<Vec<_>>();
        assert_eq!(rings, vec![prefill.iter().map(|w| w.id()).collect::<Vec<_>>()]);
        // Sets beyond RINGS_KEPT evict the least recently used, so memory stays bounded.
        for n in 1..=RINGS_KEPT + 4 {
            p.select_single(&ws[..n.min(6)], &keyed("k")).unwrap();
            p.select_single(&ws[n % 6..], &keyed("k")).unwrap();
        }
        assert!(p.rings.lock().unwrap().rings.len() <= RINGS_KEPT);
    }

    #[test]
    fn a_large_fleets_rings_stay_within_the_points_kept() {
        // 1,024 workers: each ring holds 163,840 points; retries leaving out one worker each
        // make new sets. At most three such rings fit in POINTS_KEPT, the newest always kept.
        let ws = workers(1024);
        let p = ConsistentHash::new(&ConsistentHashConfig::default());
        for skip in 0..6 {
            let pool: Vec<Arc<Worker>> =
                ws.iter().enumerate().filter(|(i, _)| *i != skip).map(|(_, w)| w.clone()).collect();
            p.select_single(&pool, &keyed("session")).unwrap();
        }
        let rings = p.rings.lock().unwrap();
        let kept: usize = rings.rings.iter().map(|r| r.points.len()).sum();
        assert!(kept <= POINTS_KEPT, "{kept} points kept");
        assert_eq!(rings.rings.len(), POINTS_KEPT / (1023 * 160), "as many whole rings as fit");
        assert_eq!(rings.builds, 6);
        assert!(rings.rings.iter().any(|r| !r.members.contains(&ws[5].id())), "the newest set's ring is kept");
    }

    #[test]
    fn falls_back_to_the_routing_text() {
        let ws = workers(3);
        let p = ConsistentHash::new(&ConsistentHashConfig::default());
        let req = RequestView { text: RoutingText::Text("hello".into()), ..RequestView::default() };
        let w = p.select_single(&ws, &req).unwrap();
        assert!((0..10).all(|_| p.select_single(&ws, &req).unwrap() == w));
    }
}
