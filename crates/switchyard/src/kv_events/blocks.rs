//! One worker's cached blocks as its engine's KV events describe them, and how much of a
//! request's prompt they hold.
//!
//! Blocks are keyed by the router's own chained hash of their token ids, so a request's
//! prompt is matched by hashing it the same way: no engine hash function is reproduced (vLLM's
//! is seeded per process, SGLang's differs). The engine's hash is kept only to apply
//! removals and to find a stored block's parent.
//!
//! Engines always compute at least the prompt's last token, so a prompt of `n` tokens can hit
//! at most the full blocks of its first `n - 1` tokens; [`prompt_block_hashes`] hashes exactly
//! those, and a prediction equals what the engine then reports.
//!
//! A prompt routed to a worker is cached there before its engine says so: its blocks are
//! stored when its prefill completes, seconds later under load. Until then the blocks are
//! *pending* on that worker, so the same prefix arriving meanwhile goes where it is being
//! computed instead of to whichever worker is least loaded (which spread a popular prefix over
//! every worker in bursts: cache_aware with events fell below its text tree past the knee). A
//! pending block is dropped when the engine stores or removes it, its view is cleared, or after
//! [`PENDING_TTL`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use switchyard_kv_events::{BlockHash, KvEvent};

use crate::workers::Worker;

/// The chain's seed: the "parent" of a sequence's first block.
const ROOT: u64 = 0x2545_f491_4f6c_dd1d;

/// Memory one indexed block takes, bytes: an engine-hash entry (16 B) and a router-hash
/// entry (12 B) in two hash maps at up to 7/8 load with their control bytes, plus growth slack.
pub const BYTES_PER_BLOCK: usize = 64;

fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = parent;
    for t in tokens {
        h = (h.rotate_left(5) ^ u64::from(*t)).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    // splitmix64's finaliser: every token bit reaches every hash bit.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The router's chained hashes of the full `block_size`-token blocks of `tokens`.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
    let mut prev = ROOT;
    for block in tokens.chunks_exact(block_size.max(1)) {
        prev = chain(prev, block);
        out.push(prev);
    }
    out
}

/// The hashes of the blocks a prompt can hit: full blocks of all but its last token.
pub fn prompt_block_hashes(prompt: &[u32], block_size: usize) -> Vec<u64> {
    block_hashes(&prompt[..prompt.len().saturating_sub(1)], block_size)
}

/// The bound on blocks indexed over every worker (`--kv-index-max-mb`).
#[derive(Debug)]
pub struct BlockBudget {
    used: AtomicUsize,
    max_blocks: usize,
    refused: AtomicU64,
}

impl BlockBudget {
    /// A budget of `max_bytes` of index.
    pub fn new(max_bytes: usize) -> Self {
        Self { used: AtomicUsize::new(0), max_blocks: max_bytes / BYTES_PER_BLOCK, refused: AtomicU64::new(0) }
    }

    fn take(&self) -> bool {
        self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| (u < self.max_blocks).then_some(u + 1)).is_ok()
    }

    fn give(&self, n: usize) {
        let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(n)));
    }

    /// Blocks indexed now (stored, and pending on a worker), over every worker.
    pub fn used_blocks(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The most blocks the index holds.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// Stored blocks not indexed because the bound was reached.
    pub fn refused_blocks(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct BlockSet {
    /// Tokens per block, from the latest stored event (0: none yet).
    block_size: u32,
    /// Engine block (its hash, and where it lives) → the router's hash of it.
    by_engine: HashMap<u64, u64>,
    /// Router hash → how many engine blocks have it (the same tokens on GPU and CPU).
    present: HashMap<u64, u32>,
    /// Router hashes of blocks routed here and not stored yet → until when to expect them.
    /// Each holds one block of the budget.
    pending: HashMap<u64, Instant>,
    /// Pending entries at which expired ones are swept next (amortised: twice the survivors).
    sweep_at: usize,
    /// When expired pending entries were last swept.
    last_sweep: Option<Instant>,
}

impl BlockSet {
    /// Drops `router` from the pending blocks, returning its share of the budget.
    fn unpend(&mut self, router: u64, budget: &BlockBudget) {
        if self.pending.remove(&router).is_some() {
            budget.give(1);
        }
    }

    /// Drops the pending blocks expired at `now`, returning their budget; whether any were.
    fn sweep(&mut self, now: Instant, budget: &BlockBudget) -> bool {
        let before = self.pending.len();
        self.pending.retain(|_, until| *until > now);
        budget.give(before - self.pending.len());
        self.sweep_at = 2 * self.pending.len();
        self.last_sweep = Some(now);
        self.pending.len() < before
    }

    /// Takes one block of `budget`, sweeping expired pending blocks first if it is spent.
    /// Sweeps at most every [`SWEEP_EVERY`]: with the budget spent, every request would.
    fn take(&mut self, now: Instant, budget: &BlockBudget) -> bool {
        if budget.take() {
            return true;
        }
        let due = self.last_sweep.is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
        due && self.sweep(now, budget) && budget.take()
    }

    /// Forgets every block, stored and pending, returning their budget.
    fn forget_all(&mut self, budget: &BlockBudget) -> usize {
        let stored = self.by_engine.len();
        budget.give(stored + self.pending.len());
        self.by_engine.clear();
        self.present.clear();
        self.pending.clear();
        stored
    }
}

/// How long a routed prompt's blocks count as cached before the engine stores them: longer
/// than a prompt waits in an overloaded engine's queue, short enough that a request that
/// failed stops attracting its prefix soon.
pub const PENDING_TTL: Duration = Duration::from_secs(60);
/// The least number of pending entries at which expired ones are swept.
const MIN_SWEEP: usize = 1024;
/// With the index's budget spent, expired pending entries are swept at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Where an event says its blocks live, folded into the engine-block key so a block
/// offloaded to CPU and its GPU copy are two entries.
fn engine_key(hash: BlockHash, medium: Option<&str>) -> u64 {
    match medium {
        None | Some("GPU") | Some("gpu") => hash.0,
        Some(m) => hash.0 ^ chain(ROOT, &m.bytes().map(u32::from).collect::<Vec<_>>()),
    }
}

/// What applying a batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Blocks indexed.
    pub stored: usize,
    /// Blocks removed.
    pub removed: usize,
    /// Stored blocks whose parent the router never saw (stored before it subscribed, or
    /// lost): not indexed, since their chain cannot be computed.
    pub orphaned: usize,
    /// Stored blocks refused by the memory bound.
    pub refused: usize,
}

/// One worker's cache view.
#[derive(Debug)]
pub struct WorkerBlocks {
    set: RwLock<BlockSet>,
    /// Events are flowing and nothing is known to be missing: policies may trust the view.
    synced: AtomicBool,
    budget: Arc<BlockBudget>,
}

impl WorkerBlocks {
    /// An empty view, not synced yet, drawing on `budget`.
    pub fn new(budget: Arc<BlockBudget>) -> Self {
        Self { set: RwLock::new(BlockSet::default()), synced: AtomicBool::new(false), budget }
    }

    /// Whether policies may use the view (the subscription is live and complete).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Marks the view usable or not.
    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::Relaxed);
    }

    /// Blocks indexed for this worker.
    pub fn blocks(&self) -> usize {
        self.set.read().map(|s| s.by_engine.len()).unwrap_or(0)
    }

    /// Tokens per block (0 until a block was stored).
    pub fn block_size(&self) -> u32 {
        self.set.read().map(|s| s.block_size).unwrap_or(0)
    }

    /// Forgets every block (an engine restart, a gap nothing can repair).
    pub fn clear(&self) {
        if let Ok(mut s) = self.set.write() {
            s.forget_all(&self.budget);
        }
    }

    /// Applies one batch's events, in order.
    pub fn apply(&self, events: &[KvEvent]) -> Applied {
        let mut done = Applied::default();
        let Ok(mut s) = self.set.write() else { return done };
        let now = Instant::now();
        for event in events {
            match event {
                KvEvent::BlockStored { block_hashes, parent_block_hash, token_ids, block_size, medium, .. } => {
                    let medium = medium.as_deref();
                    let mut prev = match parent_block_hash {
                        None => ROOT,
                        Some(p) => match s.by_engine.get(&engine_key(*p, medium)).or_else(|| s.by_engine.get(&p.0)) {
                            Some(r) => *r,
                            None => {
                                done.orphaned += block_hashes.len();
                                continue;
                            }
                        },
                    };
                    s.block_size = *block_size;
                    let size = *block_size as usize;
                    for (h, tokens) in block_hashes.iter().zip(token_ids.chunks_exact(size)) {
                        let router = chain(prev, tokens);
                        prev = router;
                        let key = engine_key(*h, medium);
                        if let Some(old) = s.by_engine.get(&key).copied() {
                            if old == router {
                                continue;
                            }
                            s.by_engine.remove(&key);
                            unpresent(&mut s.present, old);
                            self.budget.give(1);
                        }
                        // A pending block becomes a stored one: its budget moves with it.
                        s.unpend(router, &self.budget);
                        if !s.take(now, &self.budget) {
                            done.refused += 1;
                            self.budget.refused.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        s.by_engine.insert(key, router);
                        *s.present.entry(router).or_insert(0) += 1;
                        done.stored += 1;
                    }
                }
                KvEvent::BlockRemoved { block_hashes, medium } => {
                    for h in block_hashes {
                        if let Some(router) = s.by_engine.remove(&engine_key(*h, medium.as_deref())) {
                            s.unpend(router, &self.budget);
                            unpresent(&mut s.present, router);
                            self.budget.give(1);
                            done.removed += 1;
                        }
                    }
                }
                KvEvent::AllBlocksCleared => done.removed += s.forget_all(&self.budget),
            }
        }
        done
    }

    /// How many leading blocks of `hashes` (a prompt's [`prompt_block_hashes`]) are cached.
    /// Pending blocks (routed here, not stored yet, unexpired at `now`) count as cached.
    pub fn cached_prefix_blocks(&self, hashes: &[u64], now: Instant) -> usize {
        let Ok(s) = self.set.read() else { return 0 };
        let held = |h: &u64| s.present.contains_key(h) || s.pending.get(h).is_some_and(|until| *until > now);
        prefix_len(hashes, held)
    }

    /// Marks the blocks of `hashes` (a prompt routed here at `now`) beyond those already
    /// stored as pending until the engine stores them, as far as the index's budget allows.
    pub fn note_routed(&self, hashes: &[u64], now: Instant) {
        let Ok(mut s) = self.set.write() else { return };
        if s.pending.len() >= s.sweep_at.max(MIN_SWEEP) {
            s.sweep(now, &self.budget);
        }
        let stored = prefix_len(hashes, |h| s.present.contains_key(h));
        let until = now + PENDING_TTL;
        for h in &hashes[stored..] {
            if let Some(t) = s.pending.get_mut(h) {
                *t = until;
            } else if s.take(now, &self.budget) {
                s.pending.insert(*h, until);
            } else {
                break;
            }
        }
    }

    /// Blocks pending (routed here, not stored yet), expired ones included until swept.
    pub fn pending_blocks(&self) -> usize {
        self.set.read().map(|s| s.pending.len()).unwrap_or(0)
    }
}

/// How many leading `hashes` are `held`: a binary search, since engines evict a sequence's
/// blocks from its tail and a prompt's cached blocks form a prefix of it.
fn prefix_len(hashes: &[u64], held: impl Fn(&u64) -> bool) -> usize {
    let (mut lo, mut hi) = (0usize, hashes.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if held(&hashes[mid - 1]) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

fn unpresent(present: &mut HashMap<u64, u32>, router: u64) {
    if let Some(n) = present.get_mut(&router) {
        *n -= 1;
        if *n == 0 {
            present.remove(&router);
        }
    }
}

/// A prompt's [`prompt_block_hashes`], computed once per request for the block size in use
/// (one, in any real fleet): matching every worker and then marking the chosen one's pending
/// blocks read the same hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptHashes(OnceLock<(u32, Arc<[u64]>)>);

impl PromptHashes {
    /// The hashes of `prompt`'s blocks of `size` tokens.
    pub fn get(&self, prompt: &[u32], size: u32) -> Arc<[u64]> {
        if let Some((_, h)) = self.0.get().filter(|(s, _)| *s == size) {
            return h.clone();
        }
        let h: Arc<[u64]> = prompt_block_hashes(prompt, size as usize).into();
        let _ = self.0.set((size, h.clone()));
        h
    }
}

/// Prompt tokens each of `workers` has cached, from its engine's events: `Some(tokens)` for a
/// worker whose view is synced, `None` for one without events (or whose view is not usable
/// now: the policy falls back to its own estimate there). `None` overall when no worker has
/// a usable view, so the caller skips the work.
pub fn cached_tokens(
    workers: &[Arc<Worker>],
    prompt: &[u32],
    hashes: &PromptHashes,
    now: Instant,
) -> Option<Vec<Option<u32>>> {
    if prompt.len() < 2 || !workers.iter().any(|w| w.kv_blocks().is_some_and(|b| b.is_synced())) {
        return None;
    }
    Some(
        workers
            .iter()
            .map(|w| {
                let blocks = w.kv_blocks().filter(|b| b.is_synced())?;
                let size = blocks.block_size();
                if size == 0 {
                    return Some(0);
                }
                let n = blocks.cached_prefix_blocks(&hashes.get(prompt, size), now);
                Some((n * size as usize) as u32)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: std::ops::Range<u32>, size: u32) -> KvEvent {
        KvEvent::BlockStored {
            block_hashes: hashes.iter().map(|h| BlockHash(*h)).collect(),
            parent_block_hash: parent.map(BlockHash),
            token_ids: tokens.collect(),
            block_size: size,
            lora_id: None,
            medium: Some("GPU".into()),
        }
    }

    fn view(max_bytes: usize) -> WorkerBlocks {
        let b = WorkerBlocks::new(Arc::new(BlockBudget::new(max_bytes)));
        b.set_synced(true);
        b
    }

    #[test]
    fn stored_chains_match_prompts_up_to_the_last_token() {
        let b = view(1 << 20);
        // Engine hashes are arbitrary (100, 101, ...): matching never uses them.
        b.apply(&[stored(&[100, 101], None, 0..8, 4), stored(&[102], Some(101), 8..12, 4)]);
        assert_eq!(b.blocks(), 3);
        let prompt: Vec<u32> = (0..12).collect();
        // 12 tokens: the last is always computed, so the third block cannot hit.
        assert_eq!(b.cached_prefix_blocks(&prompt_block_hashes(&prompt, 4), Instant::now()), 2);
        let longer: Vec<u32> = (0..20).collect();
        assert_eq!(b.cached_prefix_blocks(&prompt_block_hashes(&longer, 4), Instant::now()), 3);
        let other: Vec<u32> = (1..20).collect();
        assert_eq!(b.cached_prefix_blocks(&prompt_block_hashes(&other, 4), Instant::now()), 0);
    }

    #[test]
    fn removals_remove_exactly_what_they_name() {
        let b = view(1 << 20);
        b.apply(&[stored(&[1, 2, 3], None, 0..12, 4)]);
        let prompt: Vec<u32> = (0..13).collect();
        let h = prompt_block_hashes(&prompt, 4);
        assert_eq!(b.cached_prefix_blocks(&h, Instant::now()), 3);
        let applied = b.apply(&[KvEvent::BlockRemoved { block_hashes: vec![BlockHash(3)], medium: None }]);
        assert_eq!(applied.removed, 1);
        assert_eq!(b.cached_prefix_blocks(&h, Instant::now()), 2);
        // A removal of a block never stored changes nothing.
        assert_eq!(b.apply(&[KvEvent::BlockRemoved { block_hashes: vec![BlockHash(77)], medium: None }]).removed, 0);
        assert_eq!(b.blocks(), 2);
        b.apply(&[KvEvent::AllBlocksCleared]);
        assert_eq!((b.blocks(), b.cached_prefix_blocks(&h, Instant::now())), (0, 0));
    }

    #[test]
    fn a_block_on_cpu_and_gpu_survives_the_removal_of_one_copy() {
        let b = view(1 << 20);
        b.apply(&[stored(&[1], None, 0..4, 4)]);
        let mut cpu = stored(&[1], None, 0..4, 4);
        if let KvEvent::BlockStored { medium, .. } = &mut cpu {
            *medium = Some("CPU".into());
        }
        b.apply(&[cpu]);
        assert_eq!(b.blocks(), 2);
        b.apply(&[KvEvent::BlockRemoved { block_hashes: vec![BlockHash(1)], medium: Some("GPU".into()) }]);
        let h = prompt_block_hashes(&(0..5).collect::<Vec<_>>(), 4);
        assert_eq!(b.cached_prefix_blocks(&h, Instant::now()), 1, "the CPU copy still hits");
    }

    #[test]
    fn routed_blocks_count_as_cached_until_stored_removed_cleared_or_expired() {
        let budget = Arc::new(BlockBudget::new(1 << 20));
        let b = WorkerBlocks::new(budget.clone());
        b.set_synced(true);
        let t0 = Instant::now();
        b.apply(&[stored(&[1], None, 0..4, 4)]);
        let prompt: Vec<u32> = (0..13).collect();
        let h = prompt_block_hashes(&prompt, 4);
        assert_eq!(b.cached_prefix_blocks(&h, t0), 1);
        b.note_routed(&h, t0);
        assert_eq!(b.pending_blocks(), 2, "only the blocks beyond the stored one are pending");
        assert_eq!(budget.used_blocks(), 3, "pending blocks hold index budget");
        assert_eq!(b.cached_prefix_blocks(&h, t0), 3, "a prompt routed here hits here before its store event");
        assert_eq!(b.cached_prefix_blocks(&h, t0 + PENDING_TTL), 1, "pending blocks expire");
        // The engine stores the second block: it is no longer pending, and still cached.
        b.apply(&[stored(&[2], Some(1), 4..8, 4)]);
        assert_eq!((b.pending_blocks(), b.cached_prefix_blocks(&h, t0), budget.used_blocks()), (1, 3, 3));
        // A restart clears what was pending with what was stored, and returns the budget.
        b.apply(&[KvEvent::AllBlocksCleared]);
        assert_eq!((b.pending_blocks(), b.cached_prefix_blocks(&h, t0), budget.used_blocks()), (0, 0, 0));
        b.note_routed(&h, t0);
        b.clear();
        assert_eq!((b.pending_blocks(), budget.used_blocks()), (0, 0), "a cold rebuild forgets pending blocks");
    }

    #[test]
    fn pending_blocks_stay_within_the_budget_and_expired_ones_are_swept() {
        let budget = Arc::new(BlockBudget::new(3000 * BYTES_PER_BLOCK));
        let b = WorkerBlocks::new(budget.clone());
        b.set_synced(true);
        let t0 = Instant::now();
        let prompts: Vec<Vec<u64>> = (0..100u32).map(|i| prompt_block_hashes(&vec![i; 401], 4)).collect();
        for p in &prompts {
            b.note_routed(p, t0);
        }
        assert_eq!((b.pending_blocks(), budget.used_blocks()), (3000, 3000), "routing stops marking at the bound");
        // Later, everything marked before has expired: sweeping returns it to the budget.
        let later = t0 + PENDING_TTL + Duration::from_secs(1);
        b.note_routed(&prompts[99], later);
        assert_eq!((b.pending_blocks(), budget.used_blocks()), (100, 100));
        assert_eq!(b.cached_prefix_blocks(&prompts[99], later), 100);
        assert_eq!(b.cached_prefix_blocks(&prompts[0], later), 0);
    }

    #[test]
    fn orphans_and_the_memory_bound_are_counted_not_indexed() {
        let budget = Arc::new(BlockBudget::new(2 * BYTES_PER_BLOCK));
        let b = WorkerBlocks::new(budget.clone());
        let applied = b.apply(&[stored(&[5], Some(4), 0..4, 4)]);
        assert_eq!((applied.orphaned, b.blocks()), (1, 0));
        let applied = b.apply(&[stored(&[1, 2, 3], None, 0..12, 4)]);
        assert_eq!((applied.stored, applied.refused), (2, 1));
        assert_eq!((budget.used_blocks(), budget.refused_blocks()), (2, 1));
        b.clear();
        assert_eq!(budget.used_blocks(), 0, "clearing returns the budget");
    }
}
