//! The continuous-batching engine: one worker's scheduler and step-time model.
//!
//! This is a pure state machine over virtual time: [`Engine::step`] runs one engine
//! iteration and says how long it took, so the same code drives the real-time HTTP worker
//! (which sleeps for the scaled duration) and virtual-time studies (which just add it up).
//!
//! Scheduling follows SGLang/vLLM in the respects that matter to a router:
//! - FCFS waiting queue; the running batch is capped by `max_running_requests` and by KV
//!   capacity, which is shared with the prefix cache;
//! - chunked prefill with a per-step token budget; a prefilling step also produces the
//!   request's first token;
//! - every decoding sequence emits one token per step; when KV runs out mid-decode the most
//!   recently admitted request is preempted and later recomputed (counted in the stats);
//! - step time `c0 + a·Pf + c1·B + c2·K` × lognormal noise × slowdown ÷ speed.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::prefix_cache::{page_hashes, PrefixCache};
use super::profile::Profile;

/// Identifies a request inside one engine.
pub type RequestId = u64;

/// A request as the engine sees it: prompt tokens and the exact number of tokens to produce.
#[derive(Debug, Clone)]
pub struct SimRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate (≥ 1).
    pub output_tokens: u32,
}

/// Something the engine did to a request during a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineEvent {
    /// The request got KV and entered the running batch; `cached_tokens` of its prompt hit the cache.
    Admitted {
        /// Request.
        id: RequestId,
        /// Prompt tokens served from the prefix cache.
        cached_tokens: u32,
    },
    /// The request produced token `index` (0 = first token). `last` marks completion.
    Token {
        /// Request.
        id: RequestId,
        /// Position of the token in the output.
        index: u32,
        /// Whether this was the final token.
        last: bool,
    },
    /// KV ran out mid-decode: the request went back to the queue and will be recomputed.
    Preempted {
        /// Request.
        id: RequestId,
    },
}

/// Why a request was refused at submission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Prompt plus output would not fit in the worker's context / KV capacity.
    #[error("requested {requested} tokens ({prompt} in the prompt + {output} to generate), but the maximum context length is {max}")]
    ContextTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Requested output tokens.
        output: u32,
        /// Sum of both.
        requested: u64,
        /// The limit.
        max: u64,
    },
    /// An empty prompt.
    #[error("the prompt is empty")]
    EmptyPrompt,
}

/// Counters and gauges exposed as metrics and `/get_load`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    /// Requests in the running batch.
    pub running: usize,
    /// Requests waiting for admission.
    pub waiting: usize,
    /// KV tokens in use (running requests plus prefix cache).
    pub kv_used_tokens: u64,
    /// Of those, cached pages no running request holds (freed on demand, so SGLang's
    /// `token_usage` does not count them).
    pub kv_evictable_tokens: u64,
    /// KV capacity.
    pub kv_capacity_tokens: u64,
    /// Prompt tokens admitted, cumulative.
    pub prompt_tokens_total: u64,
    /// Of those, served from the prefix cache.
    pub cached_tokens_total: u64,
    /// Tokens generated, cumulative.
    pub generation_tokens_total: u64,
    /// Requests completed.
    pub requests_finished: u64,
    /// Preemptions (KV exhausted mid-decode).
    pub preemptions: u64,
    /// Engine steps run.
    pub steps: u64,
    /// Uncached prompt tokens still to prefill, over running and waiting requests.
    pub pending_prefill_tokens: u64,
}

#[derive(Debug)]
struct Active {
    id: RequestId,
    prompt: Vec<u32>,
    hashes: Vec<u64>,
    output_tokens: u32,
    generated: u32,
    /// Context tokens whose KV exists (cached + computed).
    computed: u64,
    /// Context tokens that must have KV before the next token: prompt (+ generated after preemption).
    target: u64,
    /// Leading pages referenced in the prefix cache.
    held_pages: usize,
    /// KV tokens owned privately (not in the prefix cache).
    own: u64,
    cached_tokens: u32,
    /// Its prompt's KV arrived from a prefill worker (PD): nothing to prefill here.
    transferred: bool,
}

impl Active {
    fn prefilling(&self) -> bool {
        self.computed < self.target
    }
    fn context(&self) -> u64 {
        self.prompt.len() as u64 + u64::from(self.generated)
    }
}

/// One worker's engine.
#[derive(Debug)]
pub struct Engine {
    profile: Profile,
    speed: f64,
    slowdown: f64,
    waiting: VecDeque<Active>,
    running: Vec<Active>,
    cache: PrefixCache,
    own_total: u64,
    rng: StdRng,
    next_id: RequestId,
    stats: EngineStats,
    events: Vec<EngineEvent>,
}

impl Engine {
    /// An idle engine for `profile`, `speed` × faster than the profile, with a seeded RNG.
    pub fn new(profile: Profile, speed: f64, seed: u64) -> Self {
        let cache = PrefixCache::new(profile.page_size);
        let stats = EngineStats { kv_capacity_tokens: profile.kv_capacity_tokens, ..EngineStats::default() };
        Self {
            profile,
            speed: if speed > 0.0 { speed } else { 1.0 },
            slowdown: 1.0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            cache,
            own_total: 0,
            rng: StdRng::seed_from_u64(seed),
            next_id: 0,
            stats,
            events: Vec::new(),
        }
    }

    /// The profile this engine runs.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Longest context (prompt + output) a request may ask for.
    pub fn max_context_tokens(&self) -> u64 {
        self.profile.kv_capacity_tokens.min(131_072)
    }

    /// Multiplies every step time by `factor` (fault injection: 1.0 = healthy, 3.0 = 3× slower).
    pub fn set_slowdown(&mut self, factor: f64) {
        self.slowdown = if factor > 0.0 { factor } else { 1.0 };
    }

    /// Queues a request; it is admitted at a later [`Engine::step`].
    pub fn submit(&mut self, req: SimRequest) -> Result<RequestId, SubmitError> {
        self.submit_with(req, false)
    }

    /// Queues a request whose prompt KV was transferred from a prefill worker (PD decode):
    /// it needs KV for the whole prompt but no prefill compute.
    pub fn submit_transferred(&mut self, req: SimRequest) -> Result<RequestId, SubmitError> {
        self.submit_with(req, true)
    }

    fn submit_with(&mut self, req: SimRequest, transferred: bool) -> Result<RequestId, SubmitError> {
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let output = req.output_tokens.max(1);
        let requested = req.prompt.len() as u64 + u64::from(output);
        if requested > self.max_context_tokens() {
            return Err(SubmitError::ContextTooLong {
                prompt: req.prompt.len(),
                output,
                requested,
                max: self.max_context_tokens(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let hashes = page_hashes(&req.prompt, self.profile.page_size);
        let target = req.prompt.len() as u64;
        self.waiting.push_back(Active {
            id,
            prompt: req.prompt,
            hashes,
            output_tokens: output,
            generated: 0,
            computed: 0,
            target,
            held_pages: 0,
            own: 0,
            cached_tokens: 0,
            transferred,
        });
        Ok(id)
    }

    /// Drops a request (client went away). Returns whether it was known.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(pos) = self.waiting.iter().position(|r| r.id == id) {
            self.waiting.remove(pos);
            return true;
        }
        if let Some(pos) = self.running.iter().position(|r| r.id == id) {
            let r = self.running.remove(pos);
            self.release(&r);
            return true;
        }
        false
    }

    /// Records the prefix cache's changes as KV events (for a publisher to take).
    pub fn record_kv_events(&mut self) {
        self.cache.record_events();
    }

    /// The prefix cache's changes since the last call (empty unless recording).
    pub fn take_kv_events(&mut self) -> Vec<switchyard_kv_events::KvEvent> {
        self.cache.take_events()
    }

    /// Drops every unreferenced prefix-cache page.
    pub fn flush_cache(&mut self) {
        self.cache.flush();
    }

    /// Whether there is nothing to run.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Share of KV capacity held by running requests (evictable cache excluded), as engines
    /// report `token_usage`.
    pub fn token_usage(&self) -> f64 {
        let s = self.stats();
        s.kv_used_tokens.saturating_sub(s.kv_evictable_tokens) as f64 / s.kv_capacity_tokens.max(1) as f64
    }

    /// Current counters and gauges.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.clone();
        s.running = self.running.len();
        s.waiting = self.waiting.len();
        s.kv_used_tokens = self.kv_used();
        s.kv_evictable_tokens = self.cache.evictable_tokens();
        s.pending_prefill_tokens =
            self.running.iter().chain(self.waiting.iter()).map(|r| r.target.saturating_sub(r.computed)).sum();
        s
    }

    /// Tokens of `prompt` the prefix cache holds now (what a request would hit if admitted now).
    pub fn cached_prefix_tokens(&self, prompt: &[u32]) -> u64 {
        let hashes = page_hashes(prompt, self.profile.page_size);
        (self.cache.match_len(&hashes) * self.profile.page_size) as u64
    }

    fn kv_used(&self) -> u64 {
        self.cache.tokens() + self.own_total
    }

    fn kv_free(&self) -> u64 {
        self.profile.kv_capacity_tokens.saturating_sub(self.kv_used())
    }

    /// Frees KV until `tokens` are free, evicting the prefix cache LRU-first. Returns success.
    fn make_room(&mut self, tokens: u64) -> bool {
        let free = self.kv_free();
        if free >= tokens {
            return true;
        }
        self.cache.evict(tokens - free);
        self.kv_free() >= tokens
    }

    fn release(&mut self, r: &Active) {
        self.cache.release(&r.hashes[..r.held_pages]);
        self.own_total -= r.own;
    }

    /// Tries to admit the head of the queue. Returns false when it must keep waiting.
    fn admit_head(&mut self) -> bool {
        let Some(mut r) = self.waiting.pop_front() else {
            return false;
        };
        let page = self.profile.page_size;
        // At least one prompt token is always computed, so a full hit still runs a forward pass.
        let max_pages = (r.prompt.len() - 1) / page;
        let matched = if r.transferred { 0 } else { self.cache.match_len(&r.hashes).min(max_pages) };
        self.cache.acquire(&r.hashes[..matched], 0);
        let cached = (matched * page) as u64;
        let needed = r.target - cached;
        if !self.make_room(needed) {
            self.cache.release(&r.hashes[..matched]);
            self.waiting.push_front(r);
            return false;
        }
        r.held_pages = matched;
        r.computed = if r.transferred && r.generated == 0 { r.target } else { cached };
        r.own = needed;
        self.own_total += needed;
        // Cache hits count once per prompt, not again after a preemption.
        if r.generated == 0 {
            r.cached_tokens = cached as u32;
            self.stats.prompt_tokens_total += r.prompt.len() as u64;
            self.stats.cached_tokens_total += cached;
        }
        self.events.push(EngineEvent::Admitted { id: r.id, cached_tokens: r.cached_tokens });
        self.running.push(r);
        true
    }

    /// Preempts the most recently admitted decoding requests until `tokens` of KV are free.
    fn preempt_for(&mut self, tokens: u64) {
        while !self.make_room(tokens) {
            let Some(pos) = self.running.iter().rposition(|r| !r.prefilling()) else {
                return;
            };
            if self.running.iter().filter(|r| !r.prefilling()).count() <= 1 {
                return;
            }
            let mut r = self.running.remove(pos);
            self.release(&r);
            r.held_pages = 0;
            r.own = 0;
            r.computed = 0;
            r.target = r.context();
            self.stats.preemptions += 1;
            self.events.push(EngineEvent::Preempted { id: r.id });
            self.waiting.push_front(r);
        }
    }

    /// Runs one engine iteration. Returns its duration in (unscaled) seconds and what happened,
    /// or `None` when there is nothing to do.
    pub fn step(&mut self) -> Option<(f64, Vec<EngineEvent>)> {
        self.events.clear();
        // Decoding sequences grow by one token this step: make sure their KV exists first.
        let decoding_now = self.running.iter().filter(|r| !r.prefilling()).count() as u64;
        self.preempt_for(decoding_now);

        // Prefill budget: continuing chunks first, then new admissions (FCFS).
        let mut budget = self.profile.chunked_prefill_size;
        let mut chunks: Vec<(usize, u64)> = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if r.prefilling() {
                let n = (r.target - r.computed).min(budget);
                budget -= n;
                chunks.push((i, n));
            }
        }
        while budget > 0 && self.running.len() < self.profile.max_running_requests && !self.waiting.is_empty() {
            if !self.admit_head() {
                break;
            }
            let i = self.running.len() - 1;
            let r = &self.running[i];
            let n = (r.target - r.computed).min(budget);
            if n > 0 {
                budget -= n;
                chunks.push((i, n));
            }
        }

        let prefill_tokens: u64 = chunks.iter().map(|c| c.1).sum();
        let (mut decoding, mut context) = (0u64, 0u64);
        for r in self.running.iter().filter(|r| !r.prefilling()) {
            decoding += 1;
            context += r.context();
        }
        if prefill_tokens == 0 && decoding == 0 {
            return if self.events.is_empty() { None } else { Some((0.0, std::mem::take(&mut self.events))) };
        }
        let noise = (self.profile.noise_sigma * standard_normal(&mut self.rng)).exp();
        let duration = self.profile.step_time(prefill_tokens, decoding, context) * noise * self.slowdown / self.speed;

        // Decode: one token per decoding sequence (decided before this step's prefills finish).
        let decoding_ids: Vec<usize> = (0..self.running.len()).filter(|&i| !self.running[i].prefilling()).collect();
        for i in decoding_ids {
            self.emit_token(i);
        }
        // Prefill chunks; a finished prefill stores its pages in the cache and yields a token.
        for (i, n) in chunks {
            let page = self.profile.page_size;
            let r = &mut self.running[i];
            r.computed += n;
            if !r.prefilling() {
                let full = r.prompt.len() / page;
                if full > r.held_pages {
                    let held = r.held_pages;
                    let moved = ((full - held) * page) as u64;
                    let hashes = r.hashes[held..full].to_vec();
                    let parent = held.checked_sub(1).map(|p| r.hashes[p]);
                    let tokens = if self.cache.records_events() {
                        r.prompt[held * page..full * page].to_vec()
                    } else {
                        Vec::new()
                    };
                    r.held_pages = full;
                    r.own -= moved;
                    self.own_total -= moved;
                    self.cache.store(&hashes, held, parent, &tokens);
                }
                self.emit_token(i);
            }
        }
        // Remove finished requests (emit_token marked them by generated == output_tokens).
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].generated >= self.running[i].output_tokens {
                let r = self.running.remove(i);
                self.release(&r);
                self.stats.requests_finished += 1;
            } else {
                i += 1;
            }
        }
        self.stats.steps += 1;
        Some((duration, std::mem::take(&mut self.events)))
    }

    fn emit_token(&mut self, i: usize) {
        let r = &mut self.running[i];
        let index = r.generated;
        r.generated += 1;
        r.own += 1;
        self.own_total += 1;
        self.stats.generation_tokens_total += 1;
        let last = r.generated >= r.output_tokens;
        self.events.push(EngineEvent::Token { id: r.id, index, last });
    }
}

/// A standard normal sample (Box–Muller), so the crate needs no distributions dependency.
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
