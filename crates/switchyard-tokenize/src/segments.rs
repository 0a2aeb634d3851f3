//! A prompt tokenized as the pieces between its added tokens, each piece remembered.
//!
//! HF tokenizers split a text at its added tokens (the special tokens chat templates write
//! around every turn) before anything else and encode the pieces independently, so a prompt's
//! ids are its pieces' ids in order, each added token's id between them. A conversation's next
//! turn repeats every earlier piece: remembering pieces by content makes tokenizing it cost
//! about the new turn only. Whether a tokenizer really composes this way (a pre-tokenizer that
//! treats the text's first piece differently does not) is checked when it is loaded, against
//! its own encoding of whole probe texts; when it does not, prompts are encoded whole.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aho_corasick::{AhoCorasick, MatchKind};

use crate::TokenizeError;

/// Pieces shorter than this are encoded every time: a lookup would cost about as much.
const MIN_CACHED_BYTES: usize = 64;
/// What an entry costs beyond its ids (map slot, key, counters, the Arc's header).
const ENTRY_OVERHEAD: usize = 64;

/// What is done with the text between two added tokens.
type PieceFn<'a> = dyn FnMut(&str, &mut Vec<u32>) -> Result<(), TokenizeError> + 'a;

/// Added tokens found in one pass of HF's splitting, leftmost-longest as HF matches them.
struct Splitter {
    matcher: AhoCorasick,
    ids: Vec<u32>,
    /// The tokens' text, for probes.
    texts: Vec<String>,
}

impl Splitter {
    fn new(tokens: Vec<(String, u32)>) -> Option<Self> {
        if tokens.is_empty() {
            return None;
        }
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(t, _)| t.as_str()))
            .ok()?;
        let (texts, ids) = tokens.into_iter().unzip();
        Some(Self { matcher, ids, texts })
    }
}

/// Splits prompts at added tokens and encodes the pieces through a bounded cache.
pub(crate) struct Segmenter {
    /// Tokens HF finds in the raw text (its non-normalized added tokens).
    raw: Splitter,
    /// Tokens HF finds in each piece after normalizing it (its normalized added tokens): only
    /// when normalizing changes nothing, so finding them in the raw piece is the same.
    normalized: Option<Splitter>,
    /// What `add_special_tokens` puts before and after the ids (a BOS, an EOS), when the
    /// tokenizer's post-processor does no more than that.
    wrap: Option<(Vec<u32>, Vec<u32>)>,
    cache: SegmentCache,
}

/// How the piece cache is doing (`/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentCacheStats {
    /// Pieces found in the cache.
    pub hits: u64,
    /// Pieces encoded (and remembered when they fit).
    pub misses: u64,
    /// Bytes the cache holds now (ids and per-entry overhead).
    pub bytes: u64,
    /// Its bound.
    pub budget: u64,
}

impl Segmenter {
    /// A segmenter for `tokenizer` if its encoding composes piece by piece (checked on probe
    /// texts), with a cache of at most `budget` bytes; `None` otherwise.
    pub(crate) fn for_tokenizer(tokenizer: &tokenizers::Tokenizer, budget: usize) -> Option<Self> {
        if budget == 0 || tokenizer.get_encode_special_tokens() {
            return None;
        }
        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        for (id, t) in tokenizer.get_added_tokens_decoder() {
            // HF strips whitespace around these or matches them only as whole words: the
            // pieces beside them are not what a plain split gives.
            if t.lstrip || t.rstrip || t.single_word {
                return None;
            }
            if t.normalized {
                normalized.push((t.content, id));
            } else {
                raw.push((t.content, id));
            }
        }
        let identity_normalizer = match tokenizer.get_normalizer() {
            None => true,
            Some(n) => serde_json::to_value(n)
                .ok()
                .is_some_and(|v| v["type"] == "Sequence" && v["normalizers"].as_array().is_some_and(Vec::is_empty)),
        };
        let raw = Splitter::new(raw)?;
        // HF looks for normalized added tokens within each raw piece after normalizing it; a
        // piece encoded whole is exact either way, split further only when normalizing is a no-op.
        let normalized = if identity_normalizer { Splitter::new(normalized) } else { None };
        let mut s = Self { raw, normalized, wrap: None, cache: SegmentCache::new(budget) };
        let full = |text: &str, special: bool| tokenizer.encode_fast(text, special).ok().map(|e| e.get_ids().to_vec());
        s.wrap = wrap_of(&full("probe text", true)?, &full("probe text", false)?);
        let probes = s.probes();
        for text in &probes {
            if s.encode_pieces(tokenizer, text, false, false).ok() != full(text, false) {
                return None;
            }
        }
        if s.wrap.is_some()
            && probes.iter().any(|text| s.encode_pieces(tokenizer, text, true, false).ok() != full(text, true))
        {
            s.wrap = None;
        }
        Some(s)
    }

    /// Texts that would expose a tokenizer whose pieces do not compose: added tokens at the
    /// start, the end, side by side, between words, before spaces, newlines and non-ASCII.
    fn probes(&self) -> Vec<String> {
        let specials: Vec<&str> = [Some(&self.raw), self.normalized.as_ref()]
            .into_iter()
            .flatten()
            .flat_map(|s| s.texts.iter().take(3).map(String::as_str))
            .collect();
        let pieces = [
            "Hello world",
            " leading space and trailing ",
            "\n\nnew lines\n",
            "  two spaces, tabs\tand ünïcödé 你好 🙂",
            "user",
            "x",
        ];
        let mut out = Vec::new();
        for &s in &specials {
            let mut text = String::new();
            for (i, p) in pieces.iter().enumerate() {
                text.push_str(p);
                text.push_str(s);
                if i % 2 == 0 {
                    text.push_str(s);
                }
            }
            out.push(text.clone());
            out.push(format!("{s}{text}"));
            out.push(format!("{s}hello{s} world"));
        }
        out
    }

    /// `text`'s ids, pieces from the cache where remembered; `None` when `add_special_tokens`
    /// asks for what this tokenizer's post-processor adds and that is not a plain wrap.
    pub(crate) fn encode(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        text: &str,
        add_special_tokens: bool,
    ) -> Option<Result<Vec<u32>, TokenizeError>> {
        if add_special_tokens && self.wrap.is_none() {
            return None;
        }
        Some(self.encode_pieces(tokenizer, text, add_special_tokens, true))
    }

    fn encode_pieces(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        text: &str,
        add_special_tokens: bool,
        cached: bool,
    ) -> Result<Vec<u32>, TokenizeError> {
        let wrap = self.wrap.as_ref().filter(|_| add_special_tokens);
        let mut ids = Vec::with_capacity(text.len() / 3);
        if let Some((before, _)) = wrap {
            ids.extend_from_slice(before);
        }
        self.split(&self.raw, text, &mut ids, &mut |piece, ids| self.normalized_pass(tokenizer, piece, ids, cached))?;
        if let Some((_, after)) = wrap {
            ids.extend_from_slice(after);
        }
        Ok(ids)
    }

    fn normalized_pass(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        piece: &str,
        ids: &mut Vec<u32>,
        cached: bool,
    ) -> Result<(), TokenizeError> {
        match &self.normalized {
            Some(n) => self.split(n, piece, ids, &mut |p, ids| self.piece(tokenizer, p, ids, cached)),
            None => self.piece(tokenizer, piece, ids, cached),
        }
    }

    /// Calls `piece` for the text between `splitter`'s tokens, pushing each token's id.
    fn split(
        &self,
        splitter: &Splitter,
        text: &str,
        ids: &mut Vec<u32>,
        piece: &mut PieceFn<'_>,
    ) -> Result<(), TokenizeError> {
        let mut last = 0;
        for m in splitter.matcher.find_iter(text) {
            piece(&text[last..m.start()], ids)?;
            ids.push(splitter.ids[m.pattern().as_usize()]);
            last = m.end();
        }
        piece(&text[last..], ids)
    }

    fn piece(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        piece: &str,
        ids: &mut Vec<u32>,
        cached: bool,
    ) -> Result<(), TokenizeError> {
        if piece.is_empty() {
            return Ok(());
        }
        let encode = || {
            tokenizer
                .encode_fast(piece, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizeError::Encode(e.to_string()))
        };
        if !cached || piece.len() < MIN_CACHED_BYTES {
            ids.extend(encode()?);
            return Ok(());
        }
        let key = self.cache.key(piece);
        if let Some(hit) = self.cache.get(key) {
            ids.extend_from_slice(&hit);
            return Ok(());
        }
        let fresh = encode()?;
        ids.extend_from_slice(&fresh);
        self.cache.insert(key, fresh.into());
        Ok(())
    }

    pub(crate) fn stats(&self) -> SegmentCacheStats {
        self.cache.stats()
    }
}

/// What `with` (ids with special tokens) adds around `without`, if only that.
fn wrap_of(with: &[u32], without: &[u32]) -> Option<(Vec<u32>, Vec<u32>)> {
    if without.is_empty() || with.len() < without.len() {
        return None;
    }
    let at = with.windows(without.len()).position(|w| w == without)?;
    Some((with[..at].to_vec(), with[at + without.len()..].to_vec()))
}

/// Pieces' ids by a keyed 128-bit hash of their text (two SipHash keys drawn at start: a
/// client cannot aim collisions at keys it does not know), bounded in bytes: past the bound
/// the less recently used half goes.
struct SegmentCache {
    keys: (std::collections::hash_map::RandomState, std::collections::hash_map::RandomState),
    inner: Mutex<CacheInner>,
    budget: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct CacheInner {
    entries: HashMap<u128, (Arc<[u32]>, u64)>,
    bytes: usize,
    clock: u64,
}

impl SegmentCache {
    fn new(budget: usize) -> Self {
        Self {
            keys: Default::default(),
            inner: Mutex::new(CacheInner::default()),
            budget,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Hashed outside the lock: a 100k-token piece is 400 KB of text.
    fn key(&self, piece: &str) -> u128 {
        (u128::from(self.keys.0.hash_one(piece)) << 64) | u128::from(self.keys.1.hash_one(piece))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, key: u128) -> Option<Arc<[u32]>> {
        let mut inner = self.lock();
        inner.clock += 1;
        let clock = inner.clock;
        let hit = inner.entries.get_mut(&key).map(|(ids, used)| {
            *used = clock;
            ids.clone()
        });
        drop(inner);
        let counter = if hit.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    fn insert(&self, key: u128, ids: Arc<[u32]>) {
        let cost = ids.len() * 4 + ENTRY_OVERHEAD;
        // One piece may not take more than an eighth of the cache.
        if cost > self.budget / 8 {
            return;
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let clock = inner.clock;
        if let Some((old, _)) = inner.entries.insert(key, (ids, clock)) {
            inner.bytes -= old.len() * 4 + ENTRY_OVERHEAD;
        }
        inner.bytes += cost;
        if inner.bytes > self.budget {
            let mut used: Vec<u64> = inner.entries.values().map(|(_, u)| *u).collect();
            let mid = used.len() / 2;
            let median = *used.select_nth_unstable(mid).1;
            inner.entries.retain(|_, (_, u)| *u > median);
            inner.bytes = inner.entries.values().map(|(ids, _)| ids.len() * 4 + ENTRY_OVERHEAD).sum();
        }
    }

    fn stats(&self) -> SegmentCacheStats {
        SegmentCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: self.lock().bytes as u64,
            budget: self.budget as u64,
        }
    }
}
