//! Block-based prefix cache with LRU eviction, sharing the worker's KV capacity.
//!
//! Prompts are cut into pages of `page_size` tokens; each page is identified by a hash
//! chained over every page before it (as vLLM's and SGLang's paged caches do), so a page
//! matches only when the whole prefix up to it matches. Pages referenced by a running
//! request cannot be evicted; unreferenced pages are evicted least-recently-used first,
//! deeper pages before their parents on ties so chains shrink from the tail.

use std::collections::{BTreeSet, HashMap};

use switchyard_kv_events::{BlockHash, KvEvent};

/// Chained page hashes of a token sequence (only full pages).
pub fn page_hashes(tokens: &[u32], page_size: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / page_size);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for page in tokens.chunks_exact(page_size) {
        for t in page {
            for b in t.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        // Never 0, so hashes stay distinct from "no page".
        out.push(h | 1);
    }
    out
}

#[derive(Debug, Clone, Copy)]
struct Page {
    refs: u32,
    tick: u64,
    depth: u32,
}

/// The cache: pages present, their reference counts and LRU order.
#[derive(Debug, Default)]
pub struct PrefixCache {
    page_size: usize,
    pages: HashMap<u64, Page>,
    /// Unreferenced pages by (last use, deeper first, hash): the eviction order.
    evictable: BTreeSet<(u64, std::cmp::Reverse<u32>, u64)>,
    tick: u64,
    /// Changes not yet published, in the engines' KV event terms (`None`: not recording).
    log: Option<Vec<KvEvent>>,
}

impl PrefixCache {
    /// An empty cache with pages of `page_size` tokens.
    pub fn new(page_size: usize) -> Self {
        Self { page_size: page_size.max(1), ..Self::default() }
    }

    /// Starts recording stores, evictions and flushes as KV events.
    pub fn record_events(&mut self) {
        self.log.get_or_insert_with(Vec::new);
    }

    /// Whether changes are recorded.
    pub fn records_events(&self) -> bool {
        self.log.is_some()
    }

    /// The changes recorded since the last call.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.log.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// [`PrefixCache::acquire`] for pages a finished prefill stores: `tokens` are their tokens
    /// and `parent` the hash of the page before the first; the pages that were not present
    /// are recorded as stored (one event per run of consecutive new pages).
    pub fn store(&mut self, hashes: &[u64], first_depth: usize, parent: Option<u64>, tokens: &[u32]) -> usize {
        if self.log.is_some() {
            let page = self.page_size;
            let mut run_start: Option<usize> = None;
            let mut events = Vec::new();
            for i in 0..=hashes.len() {
                let new = i < hashes.len() && !self.pages.contains_key(&hashes[i]);
                match (new, run_start) {
                    (true, None) => run_start = Some(i),
                    (false, Some(s)) => {
                        events.push(KvEvent::BlockStored {
                            block_hashes: hashes[s..i].iter().map(|h| BlockHash(*h)).collect(),
                            parent_block_hash: if s == 0 {
                                parent.map(BlockHash)
                            } else {
                                Some(BlockHash(hashes[s - 1]))
                            },
                            token_ids: tokens.get(s * page..i * page).map(<[u32]>::to_vec).unwrap_or_default(),
                            block_size: page as u32,
                            lora_id: None,
                            medium: Some("GPU".into()),
                        });
                        run_start = None;
                    }
                    _ => {}
                }
            }
            if let Some(log) = self.log.as_mut() {
                log.extend(events);
            }
        }
        self.acquire(hashes, first_depth)
    }

    fn log_removed(&mut self, removed: Vec<u64>) {
        if let Some(log) = self.log.as_mut() {
            if !removed.is_empty() {
                log.push(KvEvent::BlockRemoved {
                    block_hashes: removed.into_iter().map(BlockHash).collect(),
                    medium: Some("GPU".into()),
                });
            }
        }
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Tokens held by the cache (referenced or not).
    pub fn tokens(&self) -> u64 {
        (self.pages.len() * self.page_size) as u64
    }

    /// Tokens that eviction could free now.
    pub fn evictable_tokens(&self) -> u64 {
        (self.evictable.len() * self.page_size) as u64
    }

    /// Number of leading pages of `hashes` present in the cache.
    pub fn match_len(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.pages.contains_key(h)).count()
    }

    /// Takes a reference on the pages in `hashes`, inserting those not present.
    /// Returns how many pages were newly inserted (their tokens now belong to the cache).
    pub fn acquire(&mut self, hashes: &[u64], first_depth: usize) -> usize {
        self.tick += 1;
        let tick = self.tick;
        let mut inserted = 0;
        for (i, h) in hashes.iter().enumerate() {
            match self.pages.get_mut(h) {
                Some(p) => {
                    if p.refs == 0 {
                        self.evictable.remove(&(p.tick, std::cmp::Reverse(p.depth), *h));
                    }
                    p.refs += 1;
                    p.tick = tick;
                }
                None => {
                    let depth = (first_depth + i) as u32;
                    self.pages.insert(*h, Page { refs: 1, tick, depth });
                    inserted += 1;
                }
            }
        }
        inserted
    }

    /// Drops a reference on each page in `hashes`; pages left unreferenced become evictable.
    pub fn release(&mut self, hashes: &[u64]) {
        self.tick += 1;
        let tick = self.tick;
        for h in hashes {
            if let Some(p) = self.pages.get_mut(h) {
                p.refs = p.refs.saturating_sub(1);
                p.tick = tick;
                if p.refs == 0 {
                    self.evictable.insert((tick, std::cmp::Reverse(p.depth), *h));
                }
            }
        }
    }

    /// Evicts unreferenced pages, LRU first, until at least `tokens` are freed or none is left.
    /// Returns the tokens freed.
    pub fn evict(&mut self, tokens: u64) -> u64 {
        let mut freed = 0;
        let mut removed = Vec::new();
        while freed < tokens {
            let Some(key) = self.evictable.pop_first() else {
                break;
            };
            self.pages.remove(&key.2);
            if self.log.is_some() {
                removed.push(key.2);
            }
            freed += self.page_size as u64;
        }
        self.log_removed(removed);
        freed
    }

    /// Drops every unreferenced page (SGLang's `/flush_cache`). Returns the tokens freed.
    pub fn flush(&mut self) -> u64 {
        let n = self.evictable.len() as u64;
        let mut removed = Vec::new();
        for key in std::mem::take(&mut self.evictable) {
            self.pages.remove(&key.2);
            if self.log.is_some() {
                removed.push(key.2);
            }
        }
        self.log_removed(removed);
        n * self.page_size as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chained_hashes_match_only_whole_prefixes() {
        let a: Vec<u32> = (0..64).collect();
        let mut b = a.clone();
        b[20] = 999; // second page differs
        let ha = page_hashes(&a, 16);
        let hb = page_hashes(&b, 16);
        assert_eq!(ha.len(), 4);
        assert_eq!(ha[0], hb[0]);
        assert!(ha[1..].iter().zip(&hb[1..]).all(|(x, y)| x != y));
    }

    #[test]
    fn lru_eviction_skips_referenced_pages() {
        let mut c = PrefixCache::new(16);
        let a = page_hashes(&(0..64).collect::<Vec<_>>(), 16);
        let b = page_hashes(&(100..164).collect::<Vec<_>>(), 16);
        assert_eq!(c.acquire(&a, 0), 4);
        c.release(&a);
        assert_eq!(c.acquire(&b, 0), 4);
        assert_eq!(c.evictable_tokens(), 64);
        assert_eq!(c.evict(1_000), 64);
        assert_eq!(c.match_len(&a), 0);
        assert_eq!(c.match_len(&b), 4, "referenced pages survive");
        c.release(&b);
        assert_eq!(c.flush(), 64);
        assert_eq!(c.tokens(), 0);
    }

    #[test]
    fn recorded_events_describe_exactly_the_changes() {
        let mut c = PrefixCache::new(4);
        c.record_events();
        let tokens: Vec<u32> = (0..16).collect();
        let h = page_hashes(&tokens, 4);
        c.acquire(&h[1..2], 1); // page 1 already present (another request stored it)
        c.release(&h[1..2]);
        assert_eq!(c.take_events(), vec![], "a plain acquire is not a store");
        c.store(&h, 0, None, &tokens);
        let events = c.take_events();
        // Page 0 new, page 1 present, pages 2-3 new: two runs, the second chained to page 1.
        assert_eq!(events.len(), 2);
        let KvEvent::BlockStored { block_hashes, parent_block_hash, token_ids, block_size, .. } = &events[1] else {
            panic!("{events:?}")
        };
        assert_eq!(block_hashes, &vec![BlockHash(h[2]), BlockHash(h[3])]);
        assert_eq!(*parent_block_hash, Some(BlockHash(h[1])));
        assert_eq!(token_ids, &(8..16).collect::<Vec<u32>>());
        assert_eq!(*block_size, 4);
        c.release(&h);
        c.evict(4);
        assert_eq!(
            c.take_events(),
            vec![KvEvent::BlockRemoved { block_hashes: vec![BlockHash(h[3])], medium: Some("GPU".into()) }]
        );
    }

    #[test]
    fn tail_pages_evicted_before_parents() {
        let mut c = PrefixCache::new(16);
        let a = page_hashes(&(0..64).collect::<Vec<_>>(), 16);
        c.acquire(&a, 0);
        c.release(&a);
        c.evict(16);
        assert_eq!(c.match_len(&a), 3);
    }
}
