//! `marginal_utility`: send each request where one more request costs the fleet least —
//! its own latency plus the delay it imposes on the requests already running there —
//! among the workers where it still meets its latency SLOs.
//!
//! What is *measured* lives in [`crate::load`]: the in-flight guards keep each worker's
//! decoding batch, context, queued prefill U and the requests still waiting for their first
//! token, and the [`FleetModel`] learns from every finished request a linear TPOT model (in
//! B̄, K̄, P̄) and TTFT model (in uncached tokens u, U, B) per worker; a newcomer's first tokens
//! correct its level at once. Behind several router replicas each sees only its own requests;
//! with `count_other_routers` the worker's polled report (running and waiting) less this
//! router's in flight counts the others', in B, K and the learning windows alike. The waits
//! for a batch slot or KV room count them always: they queue in the engine ahead of a
//! newcomer as this router's own do. This file
//! only *chooses*, from those predictions (`policies.md`); B and K below count the waiting
//! requests too, since they join the batch first:
//!
//! - own cost `TTFT_w(u_w) + ô·T_w(B+1, K+p)`; externality `B·[ΔT·min(ô, r̄) + φ1·u_w]`;
//!   marginal throughput `G_w = (B+1)/T(B+1) − B/T(B)`.
//! - objective `slo` (default): keep the workers whose predicted TTFT ≤ margin·SLO and step
//!   time after admission ≤ margin·SLO, then least marginal cost. A worker holding the
//!   request's prefix is judged against the full SLO, *with* the saved prefill, so the guard
//!   never breaks cache affinity while the holder can still serve in time; a cold worker's
//!   cost includes the prefill it must do and the cached prefixes it would evict. Guards where
//!   the smooth model is wrong: reported KV > 90 % or a non-empty engine queue, and requests
//!   there waiting for their first token long enough to miss the (margin) TTFT SLO.
//! - `latency`: least marginal cost over all; `throughput`: greatest `G_w`.
//! - No feasible worker: `best-effort` — where the first token comes soonest among workers
//!   still within the margin of the TTFT budget, else, once some worker is late already
//!   (or the request's prefix is held only by workers that are not in time), the worker
//!   furthest behind, so the others keep meeting it (unless the request is smaller than the
//!   mean and some worker is still in time for it within the whole budget; or, for a held
//!   prefix, unless that worker would cache it into a cache already thrashing: then the holder
//!   furthest behind), and before that (a
//!   burst) where the first token comes soonest — or hold in the router (`queue`,
//!   `shed`): the policy answers [`RoutingError::Saturated`] and the router waits for
//!   capacity, then dispatches the last moment the SLO can still be met, or sheds.
//! - Near-ties (within `--mu-tie-tolerance`) go to the worker with the fewest requests in flight.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::radix_tree::PrefixIndex;
use super::rng::PolicyRng;
use super::{Report, RoutingError, RoutingPolicy, Selection};
use crate::load::estimator::{EstimatorKind, FleetModel, Prediction, Sample, WorkerReport};
use crate::load::sent_prefill::SentPrefill;
use crate::load::wait_trend::WaitTrend;
use crate::load::{FirstTokenOutcome, LoadSnapshot, ReportedLoad, RequestOutcome, CHARS_PER_TOKEN};
use crate::request::{RequestView, RoutingText};
use crate::workers::{Membership, Worker, WorkerRole};

/// What the policy optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Goodput: SLO-feasible workers first, then least marginal cost.
    #[default]
    Slo,
    /// Least own latency plus externality, over all workers.
    Latency,
    /// Greatest marginal decode throughput.
    Throughput,
}

/// What to do when no worker can meet the SLOs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Overload {
    /// Send to the worker with the least predicted TTFT, counting the cache it would evict.
    #[default]
    BestEffort,
    /// Hold in the router until a worker is feasible; best effort once the TTFT budget is spent.
    Queue,
    /// Hold as `queue`, but answer 503 + Retry-After once the TTFT SLO can no longer be met.
    Shed,
}

/// Settings of [`MarginalUtility`].
#[derive(Debug, Clone, PartialEq)]
pub struct MarginalUtilityConfig {
    /// Objective.
    pub objective: Objective,
    /// Estimator of the per-worker models.
    pub estimator: EstimatorKind,
    /// TTFT SLO.
    pub slo_ttft: Duration,
    /// TPOT SLO.
    pub slo_tpot: Duration,
    /// Fraction of the SLOs a cold worker's predictions must stay under.
    pub slo_margin: f64,
    /// Fraction of the TTFT SLO a prefix holder's predicted TTFT must stay under (1: the
    /// whole SLO, the default). Below 1, a holder near the edge of the SLO is no longer
    /// trusted: its prefix group spills to a cold worker in the margin, or its request runs
    /// late on the worker furthest behind, and the holders keep short queues. Past the knee
    /// of traffic sharing a few long system prompts that is worth 6-27 % of goodput (DES,
    /// 0.6: shared-prefix 1.1-1.6x 68.5-65.4 -> 77.8-73.3 req/s, zipf-mixed 1.6x 85.4 -> 108.9,
    /// zipf-prefix 1.6x 102.4 -> 125.3), but conversations, whose prefixes nobody else
    /// shares, lose 2-6 % (multi-turn 1.1x, eight policy seeds, mean 19.13 -> 18.63; 1.6x
    /// 18.88 -> 17.77) and zipf-mixed 1.2x 2 %: an option for fleets whose traffic is the
    /// former, not the default (README).
    pub holder_margin: f64,
    /// Overload handling.
    pub overload: Overload,
    /// Relative cost difference within which candidates count as tied (random pick).
    pub tie_tolerance: f64,
    /// Score a random sample of this many workers, plus the longest prefix holders (0 = all
    /// up to [`AUTO_ALL`] workers, a sample of [`AUTO_SAMPLE`] beyond).
    pub candidates: usize,
    /// Probability of a random (feasible) choice, so slopes stay identifiable.
    pub epsilon: f64,
    /// Forgetting time constant of the estimators.
    pub tau: Duration,
    /// Bound on the prefix tree used for uncached-token estimates.
    pub max_tree_size: usize,
    /// Bound on that tree's memory, bytes.
    pub max_tree_bytes: usize,
    /// Workers reporting KV usage above this are infeasible (unless they hold the prefix).
    pub kv_guard: f64,
    /// Count the requests each worker reports beyond this router's own (other router
    /// replicas') in its batch, context and learning windows. (The waits for a batch slot or
    /// KV room count them either way: [`WorkerState::slot_wait_ms`].) Off by default: behind four
    /// replicas it lifts steady-state goodput past the knee (DES), but the reports are a poll
    /// old and every replica reads the same ones, and while an overload builds it cost up to
    /// a fifth of the goodput on shared-prefix traffic (README, "Replicas share the load").
    pub count_other_routers: bool,
    /// Reports older than this are ignored by the KV/queue guards: three polls (`--load-check-interval`).
    pub report_max_age: Duration,
    /// RNG seed.
    pub seed: Option<u64>,
}

impl MarginalUtilityConfig {
    /// The oldest report the guards read when workers are polled every `poll_secs`: three
    /// polls (one late answer is not a lost view), at least a second.
    pub fn report_max_age_for(poll_secs: f64) -> Duration {
        Duration::from_secs_f64((3.0 * poll_secs).max(1.0))
    }
}

impl Default for MarginalUtilityConfig {
    fn default() -> Self {
        Self {
            objective: Objective::Slo,
            estimator: EstimatorKind::Regression,
            slo_ttft: Duration::from_millis(2000),
            slo_tpot: Duration::from_millis(100),
            slo_margin: 0.5,
            holder_margin: 1.0,
            overload: Overload::BestEffort,
            tie_tolerance: 0.02,
            candidates: 0,
            epsilon: 0.01,
            tau: Duration::from_secs(120),
            max_tree_size: 1 << 26,
            max_tree_bytes: super::cache_aware::DEFAULT_TREE_BYTES,
            kv_guard: 0.9,
            count_other_routers: false,
            report_max_age: Self::report_max_age_for(crate::config::DEFAULT_LOAD_CHECK_INTERVAL_SECS),
            seed: None,
        }
    }
}

/// What the policy knows about one worker at a decision.
struct WorkerState {
    load: LoadSnapshot,
    pred: Prediction,
    hit_rate: f64,
    prefill_rate: f64,
    /// Its own last report, if fresh enough.
    report: Option<ReportedLoad>,
    /// Requests it has finished beyond those sent to it since that report.
    drained: i64,
    /// A PD prefill worker: its requests leave when their prompt is computed, so a newcomer
    /// queues for prefill compute (the TTFT fit's queued tokens), never for a batch slot held
    /// through a decode.
    prefill_leg: bool,
    /// A worker serving whole requests (not one leg of a PD pair): where the worker run late is
    /// chosen by its engine's queue as well (`Candidate::behind_ms`).
    regular: bool,
}

impl WorkerState {
    /// Other routers' requests there (its report less this router's own), when counted.
    fn others(&self, counted: bool) -> f64 {
        if counted {
            self.load.others as f64
        } else {
            0.0
        }
    }

    /// How long a newcomer waits for a batch slot (ms): past the requests the engine runs
    /// at once (`--max-running-requests`, or fewer when its KV cache is full), a request waits
    /// until running ones finish, and a full batch frees a slot every `residence / limit`,
    /// where a request's residence is its decode (`mean_out` steps of `tpot_ms`). The limit is
    /// what the engine runs while its latest report shows a queue (no limit is known without
    /// one: remembering the last one seen cost zipf-mixed at 1.6x 86 -> 48 req/s, mean of three seeds);
    /// the requests ahead are this router's live count, fresher than the report, so the wait
    /// falls to zero as soon as the router has seen the batch drain below the limit, plus
    /// other routers' there as the report last showed them, whatever `count_other_routers`
    /// says. Behind router replicas each one's own count is its share of the engine's queue,
    /// below the limit: no replica saw a wait, and a queue of seconds built at the worker all
    /// of them thought in time (pd-mixed at the knee behind four replicas: the h100 decode
    /// worker's TTFT 0.27 s predicted, 4 s served, goodput 0.68x load_based's; 0.96x counting
    /// them; README "Replicas see the engine's queue").
    ///
    /// The linear TTFT fit, over requests in flight, lags this queue: it grows by a whole
    /// decode per `limit` requests rather than by a prefill each, and the fit learns it only as
    /// such requests finish. Prefix holders, judged by the model alone, ran at 320–460 in
    /// flight against the engine's 256 with the model predicting 1.9 s where the waiting
    /// requests were on course for 3 s (zipf-mixed at 1.4x the knee, 0.67x cache_aware's
    /// goodput; README).
    fn slot_wait_ms(&self, in_flight: f64, mean_out: f64, tpot_ms: f64) -> f64 {
        let Some(r) = self.report.filter(|r| r.queued > 0 && r.running > 0) else { return 0.0 };
        let limit = r.running as f64;
        (in_flight - limit + 1.0).max(0.0) * mean_out * tpot_ms / limit
    }

    /// How long a newcomer waits for room in the KV cache (ms). An engine admits a request
    /// only once its cache can hold the uncached prompt, first come first served, so when the
    /// cache is full of running requests' contexts newcomers queue until finishing ones free
    /// enough, whatever the batch slots say. Long contexts make this the binding limit: on
    /// multi-turn (histories cut at 8k tokens) about 66 requests filled an h100's 430k tokens
    /// with 256 slots free, and 8k prompts the model put at 0.4-1.1 s waited 2-3 s there for
    /// room (DES, README "Waiting for KV room").
    ///
    /// Counted in the router's own units: its decoding requests' contexts hold `held` tokens
    /// at the reported usage `u`, so `held·(1-u)/u` are free; ahead of the newcomer are the
    /// uncached prompts of the requests still before their first token; and the running
    /// requests free `held` tokens over one residence (`mean_out` steps of `tpot_ms`), as in
    /// [`WorkerState::slot_wait_ms`]. Both are the same queue counted two ways, so the
    /// larger is the wait. Behind other routers `others` is the requests the report shows
    /// beyond this router's own, each holding this router's mean context: the cache and its
    /// turnover in the engine's units, while the prompts ahead are this router's own only (the
    /// others' are not known in tokens), so the newcomer's own prompt stands for the prompts
    /// the other replicas send there at the same moment. (Before the others were counted here,
    /// scaling the whole wait down by this router's share lost: four replicas on multi-turn at
    /// 1.2 / 1.6x the knee, eight policy seeds, 17.3 / 14.7 -> 16.0 / 12.7 req/s.)
    ///
    /// Read only while the report shows an engine queue or a cache past the KV guard. Without
    /// either the engine has room, and the prompts before their first token may be admitted
    /// and prefilling, holding theirs already: counted as ahead regardless, ten 8k prompts
    /// being prefilled beside one 1k-token decode, on a cache four-fifths empty, read as a
    /// wait of 84 residences. Splitting them by the report's queue instead lost the gain: a
    /// group sent in one instant is not in the report yet and read as admitted (multi-turn
    /// over twenty arrival draws 0.994 / 0.988x the best other policy at 1.0 / 1.05x the
    /// knee, as with no wait at all).
    fn kv_wait_ms(
        &self,
        load: &LoadSnapshot,
        kv_guard: f64,
        others: f64,
        uncached: f64,
        mean_out: f64,
        tpot_ms: f64,
    ) -> f64 {
        let Some(r) = self.report.filter(|r| r.queued > 0 || r.kv_usage > kv_guard) else { return 0.0 };
        let held = load.context_tokens as f64 + others * load.others_context_per_request;
        // `min` reads NaN and +inf as a full cache; zero, negative or -inf usage gives no wait.
        let usage = r.kv_usage.min(1.0);
        if held <= 0.0 || usage <= 0.0 {
            return 0.0;
        }
        let free = held * (1.0 - usage) / usage;
        let ahead = load.queued_prefill_tokens as f64 + uncached;
        (ahead - free).max(0.0) * mean_out * tpot_ms / held
    }

    /// Whether its report shows an engine queue or a nearly full cache. With `lapses`, the
    /// queue counts only until the router has seen it drain that many requests since the
    /// report, the full cache until it has finished any (see the guard in `candidate`).
    fn guarded(&self, kv_guard: f64, lapses: bool) -> bool {
        self.report.is_some_and(|r| {
            let full = r.kv_usage > kv_guard;
            if lapses {
                r.queued as i64 > self.drained || (full && self.drained <= 0)
            } else {
                full || r.queued > 0
            }
        })
    }
}

/// The request's terms on one worker (tokens, ms).
#[derive(Clone, Copy)]
struct Ask {
    prompt: f64,
    matched: f64,
    out: f64,
    /// Time the router has already held it.
    waited_ms: f64,
    /// The candidates' mean decoding batch (the batch the decode fits learn on): where their
    /// capacities are compared.
    shared_batch: f64,
    /// The worker's mean completion length (the running requests' residence, not this one's).
    mean_out: f64,
    /// The worker's id.
    worker: u32,
}

/// Prefill tokens an engine runs per step beside its decodes (SGLang's `chunked_prefill_size`,
/// vLLM's `max_num_batched_tokens`, both 8,192 by default on large GPUs).
const CHUNK_TOKENS: f64 = 8192.0;

/// A worker holds the request's prefix when it has cached at least this share of the prompt.
const HOLDER_SHARE: f64 = 0.3;

/// Workers whose capacities differ by less than this share are alike when best effort
/// picks the worker to run late: identical workers' learnt models differ by noise (0.25 made
/// the choice flip between them on zipf-prefix past the knee: goodput at 1.4x 1.07 -> 0.90x
/// random's), while an h100 decodes about twice as fast as an a100.
const VICTIM_CAPACITY_TIE: f64 = 0.5;

/// A request whose prefix only late workers hold runs late on the worker furthest behind,
/// unless that worker would have to cache the prefix anew and its cache hits less than the
/// holder's by more than this: a victim that cannot keep what it is sent thrashes, loses the
/// capacity to drain its queue, and stays late for good. zipf-mixed at 1.3x the knee, eight
/// policy seeds: 88.7-117.6 req/s (mean 110.8) -> 110.0-117.3 (mean 116.1); any gap in 0-0.2
/// did it, and 0.2 is the one that changed nothing else (README).
const VICTIM_HIT_GAP: f64 = 0.2;

/// The worker furthest behind takes the late requests of prefixes it does not hold only while
/// its expected wait grows at least this fast (seconds per second, over the last window of
/// [`WAIT_TREND_WINDOW_SLOS`] TTFT SLOs): the sign that the fleet as a whole is short. A wait
/// that stands means only the holders are short; such a request then runs late on its holder
/// furthest behind, and the victim drains (`load::wait_trend`). DES, 20,000 requests,
/// zipf-mixed at 1.4x the knee: 87.0 -> 110.9 req/s on the scenario's seed (0.745 -> 0.950x
/// cache_aware), 102.1 / 104.3 -> 125.9 / 120.3 on policy seeds 2 / 3; 0.1 and 0.3 gave the
/// same there (README).
const GROWING_WAIT: f64 = 0.1;

/// The window of that slope, in TTFT SLOs (10 s at the usual 2 s): long enough that a burst's
/// rise and fall do not read as a trend.
const WAIT_TREND_WINDOW_SLOS: f64 = 5.0;

/// Within the TTFT margin best effort sends a cold prompt where it evicts least, the coldest
/// cache, which stays coldest because it gets the cold prompts; so a worker is passed over there
/// once this router has sent it this share more uncached prompt tokens lately (over
/// [`SENT_PREFILL_HORIZON_SLOS`]) than the candidates' mean. multi-turn, twenty workload draws
/// at the knee rate (1.0 / 1.05x), against the better of load_based and cache_aware: 0.9961 /
/// 0.9946 -> 1.0016 / 1.0001; 0, 0.02, 0.1 and 0.2 gave 1.0016 / 0.9997, 1.0015 / 1.0011,
/// 1.0012 / 0.9973 and 0.9989 / 0.9961 (README, "The coldest cache takes the cold prompts").
const PREFILL_AHEAD: f64 = 0.05;

/// The horizon of that share, in TTFT SLOs (20 s at the usual 2 s): some hundreds of requests
/// at a knee of tens a second, so one long prompt does not decide it. 60 s gave the same.
const SENT_PREFILL_HORIZON_SLOS: f64 = 10.0;

/// Fleets up to this size are scored whole by default.
pub const AUTO_ALL: usize = 64;
/// Beyond [`AUTO_ALL`], the random sample scored by default (power of d)...
pub const AUTO_SAMPLE: usize = 16;
/// ... plus this many workers with the longest prefix match.
const HOLDERS: usize = 8;

/// One candidate's predicted terms (also the decision trace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Candidate {
    /// Index in the candidate list.
    pub index: usize,
    /// The worker's id: what per-worker state outlives one decision by (`index` is only the
    /// position in this decision's list).
    #[serde(skip)]
    pub worker: u32,
    /// Uncached prompt tokens on this worker.
    pub uncached: f64,
    /// Predicted TTFT (ms), from the model.
    pub ttft_ms: f64,
    /// Twice the mean wait of the requests there still before their first token (ms).
    pub waiting_ms: f64,
    /// Predicted step time after admission (ms).
    pub tpot_after_ms: f64,
    /// Own cost: TTFT + ô·step time (ms).
    pub own_ms: f64,
    /// Delay imposed on the running requests (ms, summed).
    pub externality_ms: f64,
    /// Cost of the cached prefixes this request would evict (ms).
    pub eviction_ms: f64,
    /// Marginal decode throughput (tokens/ms).
    pub gain: f64,
    /// Whether it holds the request's prefix.
    pub holder: bool,
    /// Whether it meets the SLO test.
    pub feasible: bool,
    /// Requests in flight there (the router's count): near-ties go to the fewest.
    pub in_flight: f64,
    /// Its decode throughput (tokens/ms, the model's) at the candidates' mean decoding batch
    /// of requests this one's length: what the fleet loses when it runs late. Not neutral
    /// evidence once one worker is late: its steps then carry a queue of prefill chunks, its
    /// fit learns a lower throughput, and it stays the one chosen (prefill-heavy at 1.4x: an
    /// a100 fitted below an l4, 0.07-0.28 against 0.57-1.09). Ranking by this request's whole
    /// cost (prefill as well), or by the capacity remembered from while it was in time, fixed
    /// that case and lost more elsewhere (a worker really slowed kept its old speed; README).
    pub capacity: f64,
    /// Its prefill time per uncached prompt token (ms, the TTFT fit's): its inverse, prefill
    /// throughput, is what a prefill worker's lateness costs a PD fleet, where it decodes
    /// nothing (`for_prefill_leg`). Kept as the fit gives it: the division is paid only there.
    pub prefill_ms_per_token: f64,
    /// Of `ttft_ms`, the wait to be admitted: for a batch slot or for room in the KV cache,
    /// whichever is longer (ms; see `WorkerState::slot_wait_ms` and `WorkerState::kv_wait_ms`).
    pub slot_wait_ms: f64,
    /// Its cache's recent hit rate (cached / prompt tokens, the model's EWMA; 0 where workers
    /// do not report cached tokens).
    pub hit_rate: f64,
    /// How far behind it is, for choosing which worker runs late: the expected TTFT, scaled
    /// up by the requests its engine reports queued beyond this router's own still before
    /// their first token. Behind router replicas each one's expected TTFT counts only its own
    /// requests, so each found the worker it had loaded itself furthest behind, and the
    /// replicas sacrificed a worker each; the engine's queue is what they all read. With one
    /// router that queue is its own, and this is the expected TTFT.
    pub behind_ms: f64,
    /// Which rule chose it when no worker was feasible (best effort's branch); the trace's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_effort: Option<&'static str>,
}

impl Candidate {
    /// TTFT to expect: the model's, or what the requests waiting there are on course for.
    pub fn expected_ttft_ms(&self) -> f64 {
        self.ttft_ms.max(self.waiting_ms)
    }

    /// Whether its first token is expected within `ttft_ms` and its steps within `tpot_ms`.
    pub fn in_time(&self, ttft_ms: f64, tpot_ms: f64) -> bool {
        self.expected_ttft_ms() <= ttft_ms && self.tpot_after_ms <= tpot_ms
    }

    /// What best effort minimises: predicted TTFT plus the eviction it causes.
    pub fn best_effort_ms(&self) -> f64 {
        self.ttft_ms + self.eviction_ms
    }

    /// This candidate as a PD prefill leg: it computes the prompt and the first token only, so
    /// its steps are not the stream's (the decode leg is judged on TPOT) and what the fleet
    /// loses while it runs late is prefill throughput, not decode throughput.
    fn for_prefill_leg(&self) -> Candidate {
        Candidate { tpot_after_ms: 0.0, capacity: 1.0 / self.prefill_ms_per_token.max(1e-9), ..*self }
    }

    /// This candidate, chosen by best effort's rule `why`.
    fn because(&self, why: &'static str) -> Candidate {
        Candidate { best_effort: Some(why), ..*self }
    }

    /// Own cost plus externality plus eviction.
    pub fn cost(&self) -> f64 {
        self.own_ms + self.externality_ms + self.eviction_ms
    }

    /// The decision as the router takes it: this worker, with the uncached tokens expected.
    pub fn selection(&self) -> Selection {
        Selection {
            index: self.index,
            uncached_tokens: Some(self.uncached.round() as u32),
            predicted_ttft_ms: Some(self.expected_ttft_ms().clamp(0.0, f64::from(u32::MAX)) as u32),
            predicted_cost_ms: Some(self.cost().clamp(0.0, f64::from(u32::MAX)) as u32),
            reason: Some(match (self.feasible, self.holder) {
                (true, true) => "feasible_prefix_holder",
                (true, false) => "feasible",
                (false, _) => self.best_effort.unwrap_or("best_effort"),
            }),
            matched: None,
            predicted_cached: None,
            slot_wait_ms: Some(self.slot_wait_ms.clamp(0.0, f64::from(u32::MAX)) as u32),
        }
    }
}

/// Running means of the requests' sizes — prompt tokens and output caps (`max_tokens`) — so
/// best effort can tell a small request from a large one. Relaxed atomics: a mean nudged by a
/// concurrent decision is still a mean.
#[derive(Debug, Default)]
struct SizeMeans {
    prompt: AtomicU64,
    cap: AtomicU64,
}

impl SizeMeans {
    /// Weight of each new request in the means (about the last hundred requests).
    const WEIGHT: f64 = 0.01;
    /// A request counts in the means as at most this many times the mean: one client's
    /// `max_tokens` of 2^32 would otherwise make every other request look small for thousands
    /// of requests; a shift in the traffic still moves the means within tens of requests.
    const OUTLIER: f64 = 10.0;

    fn update(mean: &AtomicU64, x: f64) {
        let prev = f64::from_bits(mean.load(Ordering::Relaxed));
        let next = if prev > 0.0 { prev + Self::WEIGHT * (x.min(Self::OUTLIER * prev) - prev) } else { x };
        mean.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Counts a request once, on its first ask: not again when a held one is rechecked
    /// (`queue`, `shed`), retried after a failed attempt or re-chosen after a breaker's refusal.
    fn observe(&self, request: &RequestView) {
        if request.asks > 0 {
            return;
        }
        Self::update(&self.prompt, f64::from(request.prompt_tokens()));
        if let Some(cap) = request.max_tokens {
            Self::update(&self.cap, f64::from(cap));
        }
    }

    /// The means (prompt tokens, output cap), 0 before the first request: `/debug/policy`.
    fn means(&self) -> (f64, f64) {
        let read = |m: &AtomicU64| f64::from_bits(m.load(Ordering::Relaxed));
        (read(&self.prompt), read(&self.cap))
    }

    /// The request's size over the mean: prompt and output cap each against theirs, averaged
    /// (the prompt alone when it has no cap). 1 until there is a mean to compare with.
    fn relative(&self, request: &RequestView) -> f64 {
        let (mean_prompt, mean_cap) = self.means();
        let ratio = |x: f64, m: f64| (m > 0.0).then(|| x / m);
        let prompt = ratio(f64::from(request.prompt_tokens()), mean_prompt).unwrap_or(1.0);
        match request.max_tokens.and_then(|cap| ratio(f64::from(cap), mean_cap)) {
            Some(cap) => (prompt + cap) / 2.0,
            None => prompt,
        }
    }
}

/// Counters for `/metrics` and `/debug/policy`.
#[derive(Debug, Default)]
struct Counters {
    decisions: AtomicU64,
    infeasible: AtomicU64,
    held: AtomicU64,
    shed: AtomicU64,
    explored: AtomicU64,
    late: AtomicU64,
}

/// The policy.
#[derive(Debug)]
pub struct MarginalUtility {
    config: MarginalUtilityConfig,
    model: RwLock<FleetModel>,
    trees: PrefixIndex,
    rng: PolicyRng,
    epoch: Instant,
    counters: Counters,
    sizes: SizeMeans,
    wait_trend: WaitTrend,
    sent_prefill: SentPrefill,
}

impl MarginalUtility {
    /// A policy with `config`.
    pub fn new(config: &MarginalUtilityConfig) -> Self {
        Self {
            model: RwLock::new(FleetModel::new(config.estimator, config.tau.as_secs_f64())),
            trees: PrefixIndex::new(config.max_tree_size, config.max_tree_bytes),
            rng: PolicyRng::new(config.seed),
            epoch: Instant::now(),
            counters: Counters::default(),
            sizes: SizeMeans::default(),
            wait_trend: WaitTrend::new(config.slo_ttft.mul_f64(WAIT_TREND_WINDOW_SLOS)),
            sent_prefill: SentPrefill::new(config.slo_ttft.mul_f64(SENT_PREFILL_HORIZON_SLOS)),
            config: config.clone(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &MarginalUtilityConfig {
        &self.config
    }

    /// Which workers to score: all of a small fleet; on a large one a random sample (power of
    /// d) plus the workers holding the longest prefix of the request, so affinity survives the
    /// sampling. `--mu-candidates` sets the sample (0 = [`AUTO_SAMPLE`] beyond [`AUTO_ALL`]).
    fn pick_candidates(&self, workers: &[Arc<Worker>], matched: &[usize]) -> Vec<usize> {
        let sample = match self.config.candidates {
            0 if workers.len() <= AUTO_ALL => return (0..workers.len()).collect(),
            0 => AUTO_SAMPLE,
            d if workers.len() <= d => return (0..workers.len()).collect(),
            d => d,
        };
        let mut picked: Vec<usize> = Vec::with_capacity(sample + HOLDERS);
        // The longest matches first (a partial selection, not a sort of the whole fleet).
        let mut holders: Vec<usize> = (0..workers.len()).filter(|&i| matched.get(i).is_some_and(|m| *m > 0)).collect();
        if holders.len() > HOLDERS {
            holders.select_nth_unstable_by(HOLDERS - 1, |a, b| matched[*b].cmp(&matched[*a]));
            holders.truncate(HOLDERS);
        }
        picked.extend(holders);
        let target = picked.len() + sample;
        while picked.len() < target.min(workers.len()) {
            let i = self.rng.index(workers.len());
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        picked
    }

    /// Scores the candidates ([`MarginalUtility::pick_candidates`]) for `request`.
    pub fn score(&self, workers: &[Arc<Worker>], request: &RequestView) -> Vec<Candidate> {
        let matches = self.trees.matches(&request.text);
        let matched_units: Vec<usize> = match &matches {
            Some(m) if !m.tenants.is_empty() => m.of_each(workers.iter().map(|w| w.id())),
            _ => Vec::new(),
        };
        // Workers publishing KV events: the tokens their engine holds, not the tree's guess
        // (the same uncached-token input to the model either way).
        let matched_units = crate::kv_events::overlay_exact(matched_units, workers, request);
        let indices = self.pick_candidates(workers, &matched_units);
        let per_token = match request.text {
            RoutingText::Text(_) => 1.0 / CHARS_PER_TOKEN as f64,
            _ => 1.0,
        };
        let prompt = f64::from(request.prompt_tokens());
        let model = self.model.read().unwrap_or_else(|p| p.into_inner());
        let now = request.now.unwrap_or_else(Instant::now);
        let waited_ms = request.waited.as_secs_f64() * 1e3;
        let states: Vec<(usize, WorkerState)> = indices
            .into_iter()
            .map(|index| {
                let w = &workers[index];
                let state = WorkerState {
                    load: w.load().snapshot_at(now),
                    pred: model.predict(w.id()),
                    hit_rate: model.cache_hit_rate(w.id()),
                    prefill_rate: model.prefill_rate(w.id()),
                    report: w
                        .load()
                        .reported()
                        .filter(|r| now.saturating_duration_since(r.at) <= self.config.report_max_age),
                    drained: w.load().drained_since_report(),
                    prefill_leg: matches!(w.role(), WorkerRole::Prefill { .. }),
                    regular: matches!(w.role(), WorkerRole::Regular),
                };
                (index, state)
            })
            .collect();
        let counted = self.config.count_other_routers;
        let batches = states.iter().map(|(_, s)| s.load.decoding as f64 + s.others(counted));
        let shared_batch = (batches.sum::<f64>() / states.len().max(1) as f64).max(1.0);
        states
            .into_iter()
            .map(|(index, state)| {
                let id = workers[index].id();
                let matched = (matched_units.get(index).copied().unwrap_or(0) as f64 * per_token).min(prompt);
                let mean_out = model.expected_output(id).max(1.0);
                let out = request.max_tokens.map_or(mean_out, |m| mean_out.min(f64::from(m))).max(1.0);
                let ask = Ask { prompt, matched, out, waited_ms, shared_batch, mean_out, worker: id };
                self.candidate(index, &state, &ask)
            })
            .collect()
    }

    fn candidate(&self, index: usize, w: &WorkerState, ask: &Ask) -> Candidate {
        let (s, pred, prefill_rate) = (&w.load, &w.pred, w.prefill_rate);
        let Ask { prompt, matched, out, waited_ms, shared_batch, mean_out, worker } = *ask;
        // The batch the newcomer will decode in: the requests decoding there now and those
        // still before their first token, which join it first. Counting only the decoding ones
        // made a worker with a long prefill queue look idle — the cheapest place for more, a
        // feedback loop that grew its queue (TTFT) until the batch caught up.
        // Other routers' requests there (the worker's report less this router's own) share the
        // batch too; counted when asked (`--mu-count-other-routers`, see its doc for why not by
        // default).
        let others = w.others(self.config.count_other_routers);
        let in_flight = s.in_flight as f64 + others;
        let (b, k) = (
            (s.decoding + s.waiting) as f64 + others,
            (s.context_tokens + s.queued_prefill_tokens) as f64 + others * s.others_context_per_request,
        );
        let uncached = (prompt - matched).max(0.0);
        let t_now = pred.tpot_ms(b, k, prefill_rate).max(1e-3);
        // A PD prefill worker's requests leave once their prompt is computed: a newcomer queues
        // for prefill compute there (the fit's queued tokens), not for a slot or KV room.
        // Other routers' requests queue in the engine ahead of a newcomer as this router's own
        // do, so the waits count them whether or not the fits do (`WorkerState::slot_wait_ms`).
        let queued_others = w.others(true);
        let slot_wait = if w.prefill_leg {
            0.0
        } else {
            w.slot_wait_ms(s.in_flight as f64 + queued_others, mean_out, t_now).max(w.kv_wait_ms(
                s,
                self.config.kv_guard,
                queued_others,
                uncached,
                mean_out,
                t_now,
            ))
        };
        let ttft = pred.ttft_ms(uncached, s.queued_prefill_tokens as f64, in_flight).max(0.0) + slot_wait;
        // The requests already waiting there for their first token are on course for about
        // twice their mean wait so far, and a newcomer queues behind them: live evidence that
        // catches, within one TTFT, a worker the model still thinks fast (nothing finishes there
        // to correct it until much later). A guard, not a cost: as a cost it made the choice
        // chase the noise of momentary queues on a fleet that is merely busy.
        let waiting = 2e3 * s.mean_wait.as_secs_f64();
        let t_after = pred.tpot_ms(b + 1.0, k + prompt, prefill_rate).max(t_now);
        let phi1 = pred.prefill_ms_per_token();
        // The prefill already queued there, and this prompt's, runs in the steps the newcomer
        // decodes in: chunks of up to CHUNK_TOKENS ride along with every decode step until the
        // queue drains. The learnt TPOT model prices prefill at its long-run rate, which is far
        // below this for a short answer behind a queue of long prompts (prefill-heavy traffic:
        // a two-token answer's one gap is a whole chunk's step). Its own TPOT, for the
        // feasibility test and its own cost, adds what the queue puts in each of its steps
        // beyond the average the model already counts.
        let per_step = ((s.queued_prefill_tokens as f64 + uncached) / (out / 2.0).max(1.0)).min(CHUNK_TOKENS);
        let modelled = prefill_rate * t_after / 1e3;
        let t_decode = t_after + phi1 * (per_step - modelled).max(0.0);
        let remaining = out / 2.0;
        let externality = b * ((t_after - t_now) * out.min(remaining) + phi1 * uncached);
        let holder = prompt > 0.0 && matched >= HOLDER_SHARE * prompt;
        // A cold worker's cache is full in steady state (LRU keeps everything until it is),
        // so caching this prompt evicts about as many tokens of other prefixes. Their future
        // hits are lost in proportion to how often that cache hits, and each lost hit is a
        // prefill again — paid by its own request and by the batch running beside it.
        let eviction = if holder { 0.0 } else { phi1 * uncached * w.hit_rate * (1.0 + b) };
        let gain = (b + 1.0) / t_after - b / t_now;
        let (slo_ttft, slo_tpot) = (self.config.slo_ttft.as_secs_f64() * 1e3, self.config.slo_tpot.as_secs_f64() * 1e3);
        // A request the router has held (queue, shed) has spent part of its TTFT budget already.
        let slo_ttft = slo_ttft - waited_ms;
        // Guards where the smooth model is wrong: a nearly full KV cache or a non-empty engine
        // queue (the worker's own polled report), and requests waiting there too long for their
        // first token (the router's live view, which the report, a poll old, cannot be). They
        // never override affinity. Under best effort, where every request is sent and the
        // guard only decides where, the report's queue counts until the router has seen the
        // worker drain that many requests since, its full cache until it has finished any: a
        // guard that outlived its queue kept bursts off the least-loaded worker, the one that
        // had just drained (bursty arrivals at 0.9x the knee: p99 TTFT 886 ms against
        // least-in-flight's 197; 190 since). When the guard decides whether to send at all
        // (`queue`, `shed`), it waits for the next report: the drain count is optimistic when
        // a full cache shrinks the batch, and lapsing early sent held requests into engine
        // queues (overload at 1.5x with shed: goodput 100.0 -> 85.9 req/s). The count is this
        // router's own: what other routers send or finish there is unseen until the next
        // report, which resets it.
        let guarded = w.guarded(self.config.kv_guard, self.config.overload == Overload::BestEffort);
        // The requests queued in the engine that this router has not sent (other routers'):
        // its own still before their first token are all it can have there. Counted in `ttft`
        // already when other routers are. Not on PD legs: behind four replicas it gained on pd
        // at 1.4 / 1.6x the knee (+27 / +34 %) and lost on pd-mixed at every load past it (-3 to
        // -22 %), which nothing here explains yet (README, "Replicas agree on the worker run late").
        let unseen_queue = match w.report {
            Some(r) if w.regular && !self.config.count_other_routers => (r.queued as f64 - s.waiting as f64).max(0.0),
            _ => 0.0,
        };
        let own = s.in_flight as f64;
        let behind = ttft.max(waiting) * (own + unseen_queue).max(1.0) / own.max(1.0);
        let feasible = if holder {
            // Judged by the model only, with the saved prefill: the requests waiting at a busy
            // holder are the same group's, and spilling them on their wait broke affinity.
            ttft <= self.config.holder_margin * slo_ttft && t_decode <= slo_tpot
        } else {
            !guarded
                && ttft.max(waiting) <= self.config.slo_margin * slo_ttft
                && t_decode <= self.config.slo_margin * slo_tpot
        };
        Candidate {
            index,
            worker,
            uncached,
            ttft_ms: ttft,
            waiting_ms: waiting,
            tpot_after_ms: t_decode,
            own_ms: ttft + out * t_decode,
            externality_ms: externality,
            eviction_ms: eviction,
            gain,
            holder,
            feasible,
            in_flight,
            capacity: pred.throughput_at(shared_batch, prompt + out / 2.0),
            prefill_ms_per_token: phi1,
            slot_wait_ms: slot_wait,
            hit_rate: w.hit_rate,
            behind_ms: behind,
            best_effort: None,
        }
    }

    /// Index (into `set`) of the best by `key` (lower is better). Near-ties go to the one
    /// with the fewest requests in flight, at random among equals: a random pick made the
    /// policy route at random between workers whose costs differ by less than the tolerance —
    /// most of a homogeneous fleet — and cost it its queueing near the knee.
    fn best_by(&self, set: &[&Candidate], key: impl Fn(&Candidate) -> f64) -> Option<usize> {
        let best = set.iter().map(|c| key(c)).fold(f64::INFINITY, f64::min);
        if !best.is_finite() {
            return (!set.is_empty()).then(|| self.rng.index(set.len()));
        }
        let tol = best.abs() * self.config.tie_tolerance;
        let ties: Vec<usize> = (0..set.len()).filter(|&i| key(set[i]) <= best + tol).collect();
        let pick = super::load_based::least_loaded(&ties, &self.rng, |&i| set[i].in_flight as usize)?;
        Some(ties[pick])
    }

    /// Chooses among scored candidates; returns the candidate list's entry.
    pub fn choose(&self, scored: &[Candidate], request: &RequestView) -> Result<Candidate, RoutingError> {
        if scored.is_empty() {
            return Err(RoutingError::NoHealthyWorkers);
        }
        self.counters.decisions.fetch_add(1, Ordering::Relaxed);
        self.sizes.observe(request);
        let all: Vec<&Candidate> = scored.iter().collect();
        let explore = self.config.epsilon > 0.0 && (self.rng.index(1_000_000) as f64) < self.config.epsilon * 1e6;
        let pick = |set: &[&Candidate], key: &dyn Fn(&Candidate) -> f64| -> Candidate {
            if explore {
                self.counters.explored.fetch_add(1, Ordering::Relaxed);
                return *set[self.rng.index(set.len())];
            }
            *set[self.best_by(set, key).unwrap_or(0)]
        };
        match self.config.objective {
            Objective::Latency => Ok(pick(&all, &Candidate::cost)),
            Objective::Throughput => Ok(pick(&all, &|c| -c.gain)),
            Objective::Slo => {
                let feasible: Vec<&Candidate> = scored.iter().filter(|c| c.feasible).collect();
                if !feasible.is_empty() {
                    return Ok(pick(&feasible, &Candidate::cost));
                }
                self.counters.infeasible.fetch_add(1, Ordering::Relaxed);
                let best = self.best_effort(&all, request);
                self.overloaded(&all, best, request)
            }
        }
    }

    /// The best effort when no worker passes the margin test.
    ///
    /// Workers whose expected TTFT is still within the margin of the budget left (and step
    /// time within the TPOT SLO) — failing the test only on a guard or the TPOT margin — get the
    /// request where the model predicts the first token soonest, counting the cache a cold
    /// worker would evict (with TTFT alone an overloaded fleet sent prefix groups to whichever
    /// cold worker had the shortest queue and thrashed every cache: hit rate 0.87 → 0.70 on
    /// shared-prefix-large). The eviction is the cost's, counted with the batch beside each lost
    /// hit, so it outweighs the TTFTs and a cold prompt goes to the coldest cache, which stays
    /// coldest: on multi-turn one worker took a quarter more prefill and most of the misses. So
    /// a worker this router has sent more than its share of prefill lately is passed over here
    /// until the others catch up (`not_ahead_on_prefill`); the README ("The coldest cache takes
    /// the cold prompts") has what that gains near the knee and costs at 1.6x behind replicas.
    ///
    /// With nobody within the margin the request is late wherever it goes, and once some worker
    /// is late already (expected TTFT past the whole budget, or step time past the TPOT SLO) it
    /// goes where it costs the others least: to the worker furthest behind, so the queues of
    /// those still meeting the SLO stay short. Spreading late requests evenly
    /// instead made every worker late together — goodput at 1.6× the knee fell to 0.14×
    /// least-in-flight's on prefill-heavy traffic and 0.68× on a slow tier; with this rule it
    /// is 4.1× and 1.04×. Until one is late, though, every worker is merely past the margin:
    /// that is what a burst does at the knee, and a burst passes. Sacrificing a worker to it
    /// left that worker's queue seconds deep after the burst (bursty arrivals at the knee:
    /// p99 TTFT 6.7 s against least-in-flight's 2.2 s, goodput 0.94× its); the request goes
    /// where its first token comes soonest instead (0.96×, homogeneous at the knee 1.02 →
    /// 1.05×; past the knee, where a late worker exists nearly always, 0.94–1.01× of before).
    ///
    /// Two refinements keep that worker the only late one under sustained overload. The margin
    /// applies here too: the model is optimistic exactly when queues grow, and admitting up
    /// to the whole SLO ran the workers still in time at its edge (about half their requests
    /// late). And a request whose prefix some worker holds, but no holder can serve in time,
    /// is late rather than a cold worker's: taking it there evicts the prefixes that keep the
    /// cold worker fast. Together (DES, `bench/des_all.sh`): zipf-prefix at 1.4× the knee
    /// 71.0 → 113.6 req/s (random, which by chance overloads one worker and leaves three with
    /// warm caches, 125.5; over 50,000 arrivals 110.1 against random's 62.6), heterogeneous
    /// 1.2× 0.93 → 1.17× round_robin's, mixed-16 1.4× 0.96 → 1.04× load_based's, slow-tier
    /// 1.6× 0.97 → 1.09× round_robin's. They left bursty at the knee, where overload is
    /// transient, at 0.94× load_based's; waiting for a late worker before sacrificing one (above)
    /// is what moved it.
    ///
    /// Which worker runs late matters on mixed hardware: the one that costs the fleet least is
    /// the one with the smallest capacity, not whichever fell behind first (that was usually a
    /// fast one, given more work). On h100s beside a100s with a 50 ms TPOT SLO (tight-tpot) at
    /// 1.2 / 1.4× the knee: 1.18 / 1.00 → 1.51 / 1.36× the best other policy's goodput. Among
    /// workers alike it is still the one furthest behind. Capacity is compared at one batch
    /// (the candidates' mean), where every fit has data: first it was each fit's batch at the
    /// TPOT SLO, an extrapolation that made identical workers look unlike behind router
    /// replicas (each with a quarter of the samples) and scattered prefix groups onto whichever
    /// fit was worst (zipf-prefix 1.2×, four replicas, text tree: 119.5 → 84.5 req/s; 119.5
    /// again now). The batch is the decoding one, the fits' own feature: also counting the
    /// requests still before their first token (far more, on prefill-heavy traffic, than the
    /// fits have seen decoding) cost prefill-heavy at 1.6× the knee 38.9–46.7 req/s against
    /// 47.2–48.4 over four policy seeds.
    ///
    /// "Furthest behind" is [`Candidate::behind_ms`], which counts the queue a worker's engine
    /// reports beyond this router's own. Behind router replicas each one's view holds only its
    /// own requests, so each found the worker it had loaded itself furthest behind and ran that
    /// one late: four replicas made two or three workers late where one router makes one
    /// (multi-turn at 1.6× the knee, policy seed 1, per request: from 20 s on no request in
    /// time on two workers of four, for a while three; with the engine's queue counted, on
    /// one), and the engine's queue is what they all read alike. The README ("Replicas agree
    /// on the worker run late") has the figures.
    fn best_effort(&self, all: &[&Candidate], request: &RequestView) -> Candidate {
        let budget = self.config.slo_ttft.as_secs_f64() * 1e3 - request.waited.as_secs_f64() * 1e3;
        let slo_tpot = self.config.slo_tpot.as_secs_f64() * 1e3;
        let in_time_ms = self.config.slo_margin * budget;
        let can: Vec<&Candidate> = all.iter().copied().filter(|c| c.in_time(in_time_ms, slo_tpot)).collect();
        // A holder that fits here is feasible already unless `holder_margin` is set below the
        // margin (its test is that share of the SLO), so this mostly reads "some worker holds
        // the prefix"; written as the intent, it stays right whatever the holders' test.
        let prefix_held_by_none_in_time = all.iter().any(|c| c.holder) && !can.iter().any(|c| c.holder);
        // Within the whole budget rather than the margin (asked only when nobody is within the
        // margin); a worker outside it is late already.
        let in_budget: Vec<&Candidate> = if can.is_empty() {
            all.iter().copied().filter(|c| c.in_time(budget, slo_tpot)).collect()
        } else {
            Vec::new()
        };
        if prefix_held_by_none_in_time {
            // Late on the worker furthest behind, not on a smaller cold one: what keeps the
            // cold workers fast here is their caches, not their capacity. Behind router
            // replicas, each with its own noisier fits, choosing by capacity here scattered
            // the prefix groups: zipf-prefix at 1.6x, four replicas with events, 75.7 req/s
            // against one router's 83.2; 104.3 with this branch.
            //
            // Unless the worker furthest behind is cold for this prefix and its cache already
            // hits clearly less than the holder's: then it cannot keep what it is sent, and
            // the request runs late on the holder furthest behind. Without this, one a100 made
            // the victim in a warm-up (every cache cold at 1.3x the knee) came to hold more
            // groups than it could cache, served its own groups late from then on (their
            // holder being the worker furthest behind) and never recovered, in a fleet with
            // capacity to spare (zipf-mixed 1.3x: 88.7 req/s against cache_aware's 115.7).
            // Always on the holder instead, the victim no longer absorbs the overflow where it
            // can cache it (shared-prefix 1.2x: 65.9 -> 21.1 req/s) — where the fleet is short
            // as a whole and the victim's wait grows. Where it stands, only the holders are
            // short, and the victim takes no other holder's late requests (`GROWING_WAIT`).
            self.counters.late.fetch_add(1, Ordering::Relaxed);
            let victim = *all[self.best_by(all, |c| -c.behind_ms).unwrap_or(0)];
            let now = request.now.unwrap_or_else(Instant::now);
            // A prediction that is not a finite, non-negative time (a broken fit) reads as no wait.
            let wait = Duration::try_from_secs_f64(victim.expected_ttft_ms() / 1e3).unwrap_or_default();
            let growing = self.wait_trend.observe(victim.worker, now, wait).is_some_and(|s| s >= GROWING_WAIT);
            let holders: Vec<&Candidate> = all.iter().copied().filter(|c| c.holder).collect();
            match self.best_by(&holders, |c| -c.behind_ms).map(|i| *holders[i]) {
                Some(holder) if !victim.holder && (!growing || victim.hit_rate + VICTIM_HIT_GAP < holder.hit_rate) => {
                    holder.because("best_effort_late_on_holder")
                }
                _ => victim.because("best_effort_late_furthest_behind"),
            }
        } else if let Some(in_time) = can.is_empty().then(|| self.small_in_time(&in_budget, request)).flatten() {
            in_time.because("best_effort_small_in_time")
        } else if can.is_empty() && in_budget.len() < all.len() {
            self.counters.late.fetch_add(1, Ordering::Relaxed);
            // The worker whose lateness costs the fleet least: the smallest capacity, and
            // among workers alike the one furthest behind (already late, so nobody else
            // joins it).
            let least = all.iter().map(|c| c.capacity).fold(f64::INFINITY, f64::min);
            let alike = least * (1.0 + VICTIM_CAPACITY_TIE);
            let smallest: Vec<&Candidate> = all.iter().copied().filter(|c| c.capacity <= alike).collect();
            let pool = if smallest.is_empty() { all } else { &smallest[..] };
            pool[self.best_by(pool, |c| -c.behind_ms).unwrap_or(0)].because("best_effort_late_smallest")
        } else {
            // In time somewhere, or a burst that has made nobody late yet.
            let not_ahead = if can.is_empty() { Vec::new() } else { self.not_ahead_on_prefill(all, &can, request) };
            let (pool, why) = if can.is_empty() {
                (all, "best_effort_burst_soonest")
            } else if not_ahead.is_empty() {
                (&can[..], "best_effort_in_margin_soonest")
            } else {
                (&not_ahead[..], "best_effort_in_margin_soonest")
            };
            pool[self.best_by(pool, Candidate::best_effort_ms).unwrap_or(0)].because(why)
        }
    }

    /// Of `can`, those best effort may send this prompt to: all but the workers this router has
    /// sent more than [`PREFILL_AHEAD`] above the mean of `all`'s recent uncached prompt tokens,
    /// unless they hold its prefix (and so add little prefill). The eviction best effort counts
    /// is what makes the coldest cache the destination of every cold prompt and keeps it
    /// coldest; the bound lets it lead by a little, then passes it over until the others catch
    /// up. Excepting caches warmer than the mean, the ones the eviction does not favour, halved
    /// the gain (multi-turn draws: 0.999 / 0.999). Where no cache hits at all nothing is
    /// evicted and nothing piles up: the TTFTs decide alone and spread the prefill by each
    /// worker's speed, which equal token shares would undo on mixed hardware (tight-tpot at
    /// 1.1x the knee: -9.9 % with the bound there too). Empty when every worker of `can` is
    /// ahead: the caller keeps `can` then.
    fn not_ahead_on_prefill<'a>(
        &self,
        all: &[&Candidate],
        can: &[&'a Candidate],
        request: &RequestView,
    ) -> Vec<&'a Candidate> {
        let n = all.len().max(1) as f64;
        let mean_hit = all.iter().map(|c| c.hit_rate).sum::<f64>() / n;
        if mean_hit <= 0.0 {
            return can.to_vec();
        }
        let now = request.now.unwrap_or_else(Instant::now);
        let sent = self.sent_prefill.recent(all.iter().map(|c| c.worker), now);
        let bound = sent.iter().sum::<f64>() / n * (1.0 + PREFILL_AHEAD);
        let ahead = |c: &Candidate| all.iter().zip(&sent).any(|(a, &s)| a.worker == c.worker && s > bound);
        can.iter().copied().filter(|c| c.holder || !ahead(c)).collect()
    }

    /// A request smaller than the mean (prompt and output cap), when some worker is still
    /// expected to give it its first token within the whole budget: there, soonest first, rather
    /// than late on the worker furthest behind. What the in-time workers must shed to stay in time
    /// is work, and each late request is a lost one: shedding the large ones loses the fewest.
    /// The margin, which keeps large requests off workers at the edge of the SLO, is what a small
    /// one's own short prefill and short stay can do without. DES, `des --policy
    /// marginal_utility --load L --requests 20000`, before → after: bursty at the knee 0.970 →
    /// 0.985× load_based's goodput (over five workload seeds of bursty and of homogeneous at the
    /// knee, worst 0.963 → 0.983×, geometric mean 1.24 → 1.29×); homogeneous 1.2× 86.6 → 101.2
    /// req/s, heterogeneous 1.2× 63.1 → 74.0, slow-tier 1.6× 77.6 → 85.0. Sending half the late
    /// requests there at random instead gained nothing (geometric mean 1.25×): it is the size.
    fn small_in_time(&self, in_budget: &[&Candidate], request: &RequestView) -> Option<Candidate> {
        if self.sizes.relative(request) >= 1.0 {
            return None;
        }
        self.best_by(in_budget, Candidate::best_effort_ms).map(|i| *in_budget[i])
    }

    /// No candidate is feasible: `best` under best effort, else hold the request (the router
    /// asks again), dispatch it at the last moment its TTFT SLO can be met, or shed it.
    fn overloaded(
        &self,
        all: &[&Candidate],
        best: Candidate,
        request: &RequestView,
    ) -> Result<Candidate, RoutingError> {
        if self.config.overload == Overload::BestEffort {
            return Ok(best);
        }
        let fastest = *all[self.best_by(all, Candidate::expected_ttft_ms).unwrap_or(0)];
        let slo_ttft = self.config.slo_ttft.as_secs_f64() * 1e3;
        // TTFT budget left if sent to the fastest worker now.
        let slack = slo_ttft - request.waited.as_secs_f64() * 1e3 - fastest.expected_ttft_ms();
        let last_chance = 0.05 * slo_ttft;
        match self.config.overload {
            _ if slack > last_chance => {
                self.counters.held.fetch_add(1, Ordering::Relaxed);
                Err(RoutingError::Saturated {
                    recheck: Duration::from_secs_f64(((slack - last_chance) / 1e3).min(last_chance / 1e3)),
                })
            }
            // The last moment the SLO can still be met: where it is met soonest.
            _ if slack >= 0.0 => Ok(fastest),
            Overload::Queue | Overload::BestEffort => Ok(best),
            Overload::Shed => {
                self.counters.shed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    waited_ms = request.waited.as_millis() as u64,
                    predicted_ttft_ms = fastest.expected_ttft_ms(),
                    "marginal_utility: shedding a request that can no longer meet its TTFT SLO"
                );
                Err(RoutingError::Shed { retry_after: self.config.slo_ttft })
            }
        }
    }

    /// Feeds one observed request into the models, at `at` on the policy's clock. Requests
    /// that finish on a worker already removed teach nothing (its state is gone for good).
    pub fn observe(&self, outcome: &RequestOutcome, at: Instant) {
        let t = at.saturating_duration_since(self.epoch).as_secs_f64();
        if let Some(sample) = Sample::from_outcome_with(outcome, t, self.config.count_other_routers) {
            let mut model = self.model.write().unwrap_or_else(|p| p.into_inner());
            // Checked under the lock: a worker is retired before its removal forgets it (under
            // this lock), so a request ending meanwhile cannot bring its state back.
            if !outcome.worker.is_retired() {
                model.observe(outcome.worker.id(), &sample);
            }
        }
    }

    /// Feeds one prepared sample for `worker` (simulations, tests).
    pub fn observe_sample(&self, worker: u32, sample: &Sample) {
        self.model.write().unwrap_or_else(|p| p.into_inner()).observe(worker, sample);
    }

    /// Per-worker fitted state, for `/debug/policy`.
    pub fn report(&self) -> Vec<WorkerReport> {
        self.model.read().unwrap_or_else(|p| p.into_inner()).report()
    }

    /// Requests shed so far.
    pub fn shed_count(&self) -> u64 {
        self.counters.shed.load(Ordering::Relaxed)
    }
}

impl RoutingPolicy for MarginalUtility {
    fn name(&self) -> &'static str {
        "marginal_utility"
    }

    fn select_single(&self, workers: &[Arc<Worker>], request: &RequestView) -> Result<Selection, RoutingError> {
        if workers.is_empty() {
            return Err(RoutingError::NoHealthyWorkers);
        }
        let scored = self.score(workers, request);
        let chosen = self.choose(&scored, request)?;
        let worker = &workers[chosen.index];
        let best_other = scored.iter().filter(|c| c.index != chosen.index).map(|c| c.uncached).fold(f64::MAX, f64::min);
        tracing::trace!(
            worker = worker.url(),
            objective = ?self.config.objective,
            candidates = ?scored,
            "marginal_utility decision"
        );
        self.trees.record(&request.text, worker);
        crate::kv_events::note_routed(worker, request);
        self.sent_prefill.record(chosen.worker, chosen.uncached, request.now.unwrap_or_else(Instant::now));
        Ok(chosen.selection().with_predicted_cached(request.prompt_tokens(), chosen.uncached, best_other))
    }

    /// PD: the prefill pool is scored by the prefill model (TTFT with the queued prefill and
    /// the prefill workers' cache), the decode pool by the decode model (step time after
    /// admission and the delay imposed on running decodes); independently, since the KV
    /// transfer cost between specific pairs is not known. When no prefill worker can meet the
    /// TTFT SLO, `--mu-overload` applies as in regular mode (hold, then dispatch or shed).
    ///
    /// A PD fleet's queue builds at the decode workers (a request waits there for a batch slot
    /// before its first token), so a pair is in time only if the decode worker's slot wait fits
    /// in what the prefill leg leaves of the budget. Past the knee, where none does, the request
    /// goes to the decode worker furthest behind, as best effort sends it in regular mode: the
    /// others stay in time instead of every queue growing alike (DES, `pd` at 1.0-1.2x the knee:
    /// 41.6 / 16.7 / 13.1 -> 62.2 / 21.2 / 13.6 req/s, README).
    ///
    /// The prefill leg past the knee follows regular mode's best effort too (`for_prefill_leg`):
    /// late on the prefill worker of least prefill throughput furthest behind, small requests
    /// still in time, rather than on the cheapest, which made every prefill worker late alike
    /// (`pd-mixed`, an h100 and two a100s a pool, at 1.4x the knee: 6.9 req/s, round_robin's
    /// 46.5). A request late already on its prefill leg is late on the decode worker furthest
    /// behind as well: kept off the decode workers still in time, it no longer pushes them past
    /// the SLO (it once starved the pool, when every prefill leg was late: 1.4x, throughput 89
    /// -> 58 req/s). DES, README ("PD past the knee").
    fn select_pair(
        &self,
        prefill: &[Arc<Worker>],
        decode: &[Arc<Worker>],
        request: &RequestView,
    ) -> Result<(Selection, Selection), RoutingError> {
        if prefill.is_empty() || decode.is_empty() {
            return Err(RoutingError::NoHealthyWorkers);
        }
        let margin = self.config.slo_margin;
        let (slo_ttft, slo_tpot) = (self.config.slo_ttft.as_secs_f64() * 1e3, self.config.slo_tpot.as_secs_f64() * 1e3);
        // The sizes best effort tells small requests by (as `choose` does in regular mode).
        self.sizes.observe(request);
        let p_scored = self.score(prefill, request);
        let budget = slo_ttft - request.waited.as_secs_f64() * 1e3;
        let prefill_cost = |c: &Candidate| c.ttft_ms + c.externality_ms + c.eviction_ms;
        let p_feasible: Vec<&Candidate> =
            p_scored.iter().filter(|c| c.expected_ttft_ms() <= if c.holder { 1.0 } else { margin } * budget).collect();
        let p = if p_feasible.is_empty() {
            self.counters.infeasible.fetch_add(1, Ordering::Relaxed);
            let legs: Vec<Candidate> = p_scored.iter().map(Candidate::for_prefill_leg).collect();
            let all: Vec<&Candidate> = legs.iter().collect();
            let best = self.best_effort(&all, request);
            self.overloaded(&all, best, request)?
        } else {
            // Feasible as a prefill leg, whatever the worker's own test (its step time and
            // guards are the stream's, which the decode leg carries): the trace says so.
            Candidate { feasible: true, ..*p_feasible[self.best_by(&p_feasible, prefill_cost).unwrap_or(0)] }
        };
        let d_scored = self.score(decode, request);
        let d_feasible: Vec<&Candidate> = d_scored.iter().filter(|c| c.tpot_after_ms <= margin * slo_tpot).collect();
        let mut d_refs: Vec<&Candidate> = if d_feasible.is_empty() { d_scored.iter().collect() } else { d_feasible };
        // In time if the slot wait fits in what the prefill leg leaves of the budget; where none
        // does — always so for a leg late already (a wait is never negative) — the decode
        // worker furthest behind on batch slots, where a late request costs least.
        let furthest = d_refs.iter().copied().max_by(|a, b| a.slot_wait_ms.total_cmp(&b.slot_wait_ms));
        let left = budget - p.expected_ttft_ms();
        d_refs.retain(|c| c.slot_wait_ms <= left);
        if d_refs.is_empty() {
            d_refs.extend(furthest);
        }
        let d = *d_refs[self.best_by(&d_refs, |c| c.own_ms - c.ttft_ms + c.externality_ms).unwrap_or(0)];
        self.counters.decisions.fetch_add(1, Ordering::Relaxed);
        self.trees.record(&request.text, &prefill[p.index]);
        crate::kv_events::note_routed(&prefill[p.index], request);
        self.sent_prefill.record(p.worker, p.uncached, request.now.unwrap_or_else(Instant::now));
        let p_best_other = p_scored.iter().filter(|c| c.index != p.index).map(|c| c.uncached).fold(f64::MAX, f64::min);
        let p_sel = p.selection().with_predicted_cached(request.prompt_tokens(), p.uncached, p_best_other);
        Ok((p_sel, Selection::of(d.index)))
    }

    fn on_request_complete(&self, outcome: &RequestOutcome) {
        self.observe(outcome, outcome.finished_at);
    }

    fn on_first_token(&self, first: &FirstTokenOutcome) {
        if first.worker.is_retired() {
            return;
        }
        let worker = first.worker.id();
        // Every streamed request passes here; only a worker still on the pooled fit learns
        // from it, so the common case costs a read lock, not a write.
        if !self.model.read().unwrap_or_else(|p| p.into_inner()).prefill_pooled(worker) {
            return;
        }
        let t = first.at.saturating_duration_since(self.epoch).as_secs_f64();
        let sample = Sample::from_first_token(first, t);
        let mut model = self.model.write().unwrap_or_else(|p| p.into_inner());
        if !first.worker.is_retired() {
            model.observe_first_token(worker, &sample);
        }
    }

    fn on_membership(&self, change: &Membership<'_>) {
        if let Membership::Removed(w) = change {
            self.trees.forget(w.id());
            self.model.write().unwrap_or_else(|p| p.into_inner()).forget(w.id());
            self.wait_trend.forget(w.id());
            self.sent_prefill.forget(w.id());
        }
    }

    fn reads_reported_load(&self) -> bool {
        true
    }

    fn maintenance_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(120))
    }

    fn maintain(&self) {
        self.trees.trim();
    }

    fn report(&self, to: Report<'_>) {
        match to {
            Report::Metrics(out) => self.render_metrics(out),
            Report::Debug(out) => *out = Some(self.debug_state()),
        }
    }
}

impl MarginalUtility {
    fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let c = &self.counters;
        for (name, help, v) in [
            ("decisions", "decisions made", &c.decisions),
            ("infeasible", "decisions with no SLO-feasible worker", &c.infeasible),
            ("held", "times a request was held in the router for capacity", &c.held),
            ("shed", "requests answered 503 because they could no longer meet the TTFT SLO", &c.shed),
            ("explored", "random (exploration) choices", &c.explored),
            ("late", "requests no worker could serve within the SLO, sent to the one left to run late", &c.late),
        ] {
            let _ = writeln!(out, "# HELP switchyard_mu_{name}_total marginal_utility: {help}.");
            let _ = writeln!(out, "# TYPE switchyard_mu_{name}_total counter");
            let _ = writeln!(out, "switchyard_mu_{name}_total {}", v.load(Ordering::Relaxed));
        }
    }

    fn debug_state(&self) -> serde_json::Value {
        let c = &self.counters;
        let (mean_prompt, mean_cap) = self.sizes.means();
        serde_json::json!({
            "policy": "marginal_utility",
            "objective": self.config.objective,
            "estimator": self.config.estimator,
            "overload": self.config.overload,
            "slo_ttft_ms": self.config.slo_ttft.as_secs_f64() * 1e3,
            "slo_tpot_ms": self.config.slo_tpot.as_secs_f64() * 1e3,
            "slo_margin": self.config.slo_margin,
            "holder_margin": self.config.holder_margin,
            "decisions": c.decisions.load(Ordering::Relaxed),
            "infeasible": c.infeasible.load(Ordering::Relaxed),
            "held": c.held.load(Ordering::Relaxed),
            "shed": c.shed.load(Ordering::Relaxed),
            "explored": c.explored.load(Ordering::Relaxed),
            "late": c.late.load(Ordering::Relaxed),
            "request_sizes": {"mean_prompt_tokens": mean_prompt, "mean_max_tokens": mean_cap},
            "workers": self.report(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{DispatchInfo, InFlightGuard};
    use crate::policies::test_support::workers;

    /// Trains `worker`'s models on samples from an h100-like engine running `speed`× as fast.
    fn train(p: &MarginalUtility, worker: u32, speed: f64) {
        for i in 0..200 {
            let b = 1.0 + (i % 64) as f64;
            let k = b * 1000.0;
            let tpot = (5.75 + 0.006 * b + 0.054 * k / 1e3) / speed;
            let u = (i % 8) as f64 * 500.0;
            let ttft = (20.0 + 17.0 * u / 1e3 + 17.0 * (i % 5) as f64 + 5.0 * b) / speed;
            p.observe_sample(
                worker,
                &Sample {
                    at: i as f64 * 0.1,
                    decode: Some(([1.0, b, k / 1e3, 0.0], tpot)),
                    prefill: Some(([1.0, u / 1e3, (i % 5) as f64, b], ttft)),
                    output_tokens: Some(200),
                    cache_hit: Some(0.5),
                },
            );
        }
    }

    fn request(text: &str) -> RequestView {
        RequestView { text: RoutingText::Text(text.into()), max_tokens: Some(200), ..RequestView::default() }
    }

    fn policy(config: MarginalUtilityConfig) -> MarginalUtility {
        MarginalUtility::new(&MarginalUtilityConfig { seed: Some(11), epsilon: 0.0, ..config })
    }

    /// `n` workers and a policy trained on each as an h100-like engine.
    fn trained(n: usize, config: MarginalUtilityConfig) -> (Vec<Arc<Worker>>, MarginalUtility) {
        let (ws, p) = (workers(n), policy(config));
        for w in &ws {
            train(&p, w.id(), 1.0);
        }
        (ws, p)
    }

    /// Selects and dispatches like the router does (guard at selection), first token at once.
    fn dispatch(p: &MarginalUtility, ws: &[Arc<Worker>], view: &RequestView) -> (usize, InFlightGuard) {
        let sel = p.select_single(ws, view).unwrap();
        let i = sel.index;
        let mut g = InFlightGuard::dispatch(ws[i].clone(), view.dispatch_info(&sel, ""), Instant::now());
        g.mark_first_byte();
        (i, g)
    }

    #[test]
    fn a_twice_as_fast_worker_gets_more_work_but_not_all() {
        let ws = workers(2);
        let p = policy(MarginalUtilityConfig { slo_ttft: Duration::from_secs(60), ..Default::default() });
        train(&p, ws[0].id(), 2.0);
        train(&p, ws[1].id(), 1.0);
        let mut guards = Vec::new();
        let mut fast = 0;
        for i in 0..120 {
            let (w, g) = dispatch(&p, &ws, &request(&format!("prompt {i} {}", "x".repeat(2000))));
            fast += usize::from(w == 0);
            guards.push(g);
        }
        let share = fast as f64 / 120.0;
        assert!((0.55..0.9).contains(&share), "fast worker's share {share}");
    }

    #[test]
    fn a_prefix_stays_with_its_holder_until_the_holder_would_miss_the_ttft_slo() {
        let (ws, p) = trained(2, MarginalUtilityConfig { slo_ttft: Duration::from_millis(400), ..Default::default() });
        // Both workers busy with other work (their caches hot: hit rate 0.5 from training).
        let mut background: Vec<Vec<InFlightGuard>> = ws
            .iter()
            .map(|w| {
                (0..30)
                    .map(|_| {
                        let mut g = InFlightGuard::dispatch(w.clone(), Default::default(), Instant::now());
                        g.mark_first_byte();
                        g
                    })
                    .collect()
            })
            .collect();
        let system = "s".repeat(8000);
        let (holder, first) = dispatch(&p, &ws, &request(&format!("{system} q0")));
        let mut guards = vec![first];
        let cold = 1 - holder;
        let mut kept = 0;
        for i in 1..200 {
            let view = request(&format!("{system} q{i}"));
            let scored = p.score(&ws, &view);
            assert!(scored[holder].holder && scored[cold].eviction_ms > 0.0 && scored[holder].eviction_ms == 0.0);
            let (w, g) = dispatch(&p, &ws, &view);
            guards.push(g);
            if w != holder {
                break;
            }
            // Kept while feasible, or when no worker is (best effort counts the eviction).
            assert!(scored[holder].feasible || !scored[cold].feasible, "kept only while feasible");
            kept += 1;
        }
        assert!(kept >= 10, "the holder kept its prefix group under load for {kept} requests");
        // Far past its SLO the holder is infeasible, and the prefix spills to a cold worker
        // that can serve it in time (within the margin: one at the edge of the SLO is not
        // trusted, and then the request is late at the holder, see best_effort).
        let _flood: Vec<InFlightGuard> = (0..200).map(|_| InFlightGuard::new(ws[holder].clone())).collect();
        background[cold].clear();
        let view = request(&format!("{system} last"));
        let scored = p.score(&ws, &view);
        assert!(!scored[holder].feasible && scored[cold].expected_ttft_ms() <= 200.0, "{scored:?}");
        assert_eq!(p.select_single(&ws, &view).unwrap().index, cold);
        drop(background);
    }

    #[test]
    fn a_holder_margin_below_one_spills_what_the_holder_would_serve_near_the_edge_of_the_slo() {
        // A holder with a queue, scored under `config`; the guards keep the queue alive.
        let scene = |config: MarginalUtilityConfig| {
            let (ws, p) = trained(2, config);
            let system = "s".repeat(8000);
            let (holder, first) = dispatch(&p, &ws, &request(&format!("{system} q0")));
            let queue: Vec<InFlightGuard> = (0..40).map(|_| InFlightGuard::new(ws[holder].clone())).collect();
            let scored = p.score(&ws, &request(&format!("{system} q1")));
            (holder, scored, (first, queue))
        };
        let (holder, scored, _queue) = scene(MarginalUtilityConfig::default());
        let ttft_ms = scored[holder].ttft_ms;
        assert!(ttft_ms > 0.0 && scored[holder].holder, "{scored:?}");
        // An SLO the holder is predicted to meet at 80 % of it.
        let slo_ttft = Duration::from_secs_f64(ttft_ms / 0.8 / 1e3);
        let (holder, scored, _queue) = scene(MarginalUtilityConfig { slo_ttft, ..Default::default() });
        assert!(scored[holder].holder && scored[holder].feasible, "the whole SLO by default: {scored:?}");
        let (holder, scored, _queue) =
            scene(MarginalUtilityConfig { slo_ttft, holder_margin: 0.6, ..Default::default() });
        assert!(scored[holder].holder && !scored[holder].feasible, "past 60 % of the SLO: {scored:?}");
        let (holder, scored, _queue) =
            scene(MarginalUtilityConfig { slo_ttft, holder_margin: 0.9, ..Default::default() });
        assert!(scored[holder].feasible, "within 90 % of it: {scored:?}");
    }

    /// An infeasible candidate with this predicted TTFT (no wait, TPOT within the SLO).
    fn infeasible(index: usize, ttft_ms: f64, holder: bool) -> Candidate {
        Candidate {
            index,
            worker: index as u32,
            uncached: if holder { 100.0 } else { 2000.0 },
            ttft_ms,
            waiting_ms: 0.0,
            tpot_after_ms: 20.0,
            own_ms: ttft_ms,
            externality_ms: 0.0,
            eviction_ms: 0.0,
            gain: 0.0,
            holder,
            feasible: false,
            in_flight: 1.0,
            capacity: 100.0,
            prefill_ms_per_token: 0.1,
            slot_wait_ms: 0.0,
            hit_rate: 0.0,
            behind_ms: ttft_ms,
            best_effort: None,
        }
    }

    #[test]
    fn best_effort_keeps_the_margin_lets_the_smallest_worker_run_late_once_one_is_late_and_keeps_prefixes_off_cold_caches(
    ) {
        let p = policy(MarginalUtilityConfig { slo_ttft: Duration::from_millis(400), ..Default::default() });
        let view = request("q");
        let chosen = |set: &[Candidate]| p.choose(set, &view).unwrap().index;
        // Within the margin (0.5 × 400 ms): the soonest first token.
        assert_eq!(chosen(&[infeasible(0, 900.0, false), infeasible(1, 150.0, false), infeasible(2, 190.0, false)]), 1);
        // Past the margin everywhere and one worker late already (900 ms > 400 ms): the request
        // is late too, and goes to the worker furthest behind so the others stay in time.
        assert_eq!(chosen(&[infeasible(0, 900.0, false), infeasible(1, 300.0, false), infeasible(2, 600.0, false)]), 0);
        // Of workers unlike in capacity, the smallest runs late, even one not furthest behind
        // (yet): it is the one the fleet misses least. Workers alike (capacities within
        // noise) leave it to the one furthest behind, as above.
        let small = |c: Candidate, capacity: f64| Candidate { capacity, ..c };
        let unlike =
            [infeasible(0, 900.0, false), infeasible(1, 300.0, false), small(infeasible(2, 600.0, false), 50.0)];
        assert_eq!(chosen(&unlike), 2);
        let alike =
            [infeasible(0, 900.0, false), infeasible(1, 300.0, false), small(infeasible(2, 600.0, false), 90.0)];
        assert_eq!(chosen(&alike), 0);
        // The same with a step time past the TPOT SLO as what makes a worker late.
        let slow_steps = Candidate { tpot_after_ms: 150.0, ..infeasible(2, 250.0, false) };
        assert_eq!(chosen(&[infeasible(0, 380.0, false), infeasible(1, 300.0, false), slow_steps]), 0);
        // Past the margin everywhere but nobody late yet (a burst): not sacrificed to the worker
        // furthest behind, but sent where its first token comes soonest.
        assert_eq!(chosen(&[infeasible(0, 390.0, false), infeasible(1, 300.0, false), infeasible(2, 350.0, false)]), 1);
        // Its prefix is held only by a worker that is late. While the worker furthest behind
        // falls further behind (its wait grows: the fleet is short as a whole), the request is
        // late there too, not on the cold worker that could still serve it in time, whose
        // cache it would evict. Its wait is sampled when it is looked at, over windows of five
        // TTFT SLOs (2 s here).
        let t0 = Instant::now();
        let at = |secs: f64| RequestView { now: Some(t0 + Duration::from_secs_f64(secs)), ..request("q") };
        let pick = |set: &[Candidate], secs: f64| p.choose(set, &at(secs)).unwrap();
        let held =
            |victim_ms: f64| [infeasible(0, 500.0, true), infeasible(1, 150.0, false), infeasible(2, victim_ms, false)];
        // No trend yet (no window closed): late on the holder furthest behind.
        assert_eq!(pick(&held(900.0), 0.0).index, 0);
        // Its wait grew 0.9 -> 2 s in 2.5 s: it takes the request.
        assert_eq!(pick(&held(2000.0), 2.5).index, 2);
        assert_eq!(pick(&held(2000.0), 2.6).selection().reason, Some("best_effort_late_furthest_behind"));
        // Also when the cold worker is the smallest: it keeps its cache.
        let held_small =
            [infeasible(0, 500.0, true), small(infeasible(1, 150.0, false), 30.0), infeasible(2, 2000.0, false)];
        assert_eq!(pick(&held_small, 2.7).index, 2);
        // Unless the worker furthest behind would have to cache it and already hits clearly
        // less than the holder (it cannot keep what it is sent): late on the holder then.
        let hits = |c: Candidate, hit_rate: f64| Candidate { hit_rate, ..c };
        // The holder's cache hits 0.9; the worker furthest behind (cold for it, or holding it
        // too) hits `victim_hit`.
        let caches = |victim_hit: f64, victim_holds: bool| {
            [
                hits(infeasible(0, 500.0, true), 0.9),
                infeasible(1, 150.0, false),
                hits(infeasible(2, 2000.0, victim_holds), victim_hit),
            ]
        };
        let thrashing = caches(0.6, false);
        assert_eq!(pick(&thrashing, 2.8).index, 0);
        assert_eq!(pick(&thrashing, 2.9).selection().reason, Some("best_effort_late_on_holder"));
        // Within the gap it is still the worker furthest behind.
        let caching = caches(0.75, false);
        assert_eq!(pick(&caching, 3.0).index, 2);
        // Once its wait stands (2 s again 2.5 s later: as many requests in as out), only the
        // holders are short: the request runs late on its holder, and the victim drains.
        assert_eq!(pick(&held(2000.0), 5.0).index, 0);
        assert_eq!(pick(&caching, 5.1).selection().reason, Some("best_effort_late_on_holder"));
        // When the worker furthest behind holds the prefix too, it stays there whatever its
        // cache and its trend.
        let both_hold = caches(0.1, true);
        assert_eq!(pick(&both_hold, 5.2).index, 2);
        // A holder that can serve it in time still gets it.
        let evicting = Candidate { eviction_ms: 100.0, ..infeasible(1, 150.0, false) };
        assert_eq!(chosen(&[infeasible(0, 180.0, true), evicting, infeasible(2, 900.0, false)]), 0);
        assert_eq!(p.counters.late.load(Ordering::Relaxed), 14);
    }

    #[test]
    fn best_effort_passes_over_a_cold_cache_sent_more_than_its_share_of_prefill_unless_no_cache_hits() {
        let config = MarginalUtilityConfig { slo_ttft: Duration::from_millis(400), ..Default::default() };
        let t0 = Instant::now();
        let at = RequestView { now: Some(t0), ..request("q") };
        // `sent` uncached prompt tokens recorded for workers 0, 1 and 2 just now.
        let sent = |tokens: [f64; 3]| {
            let p = policy(config.clone());
            for (worker, t) in tokens.into_iter().enumerate() {
                p.sent_prefill.record(worker as u32, t, t0);
            }
            p
        };
        let cache = |c: Candidate, hit_rate: f64, eviction_ms: f64| Candidate { hit_rate, eviction_ms, ..c };
        // Every worker within the margin (0.5 x 400 ms). Worker 0's cache is the coldest, so the
        // eviction sends the cold prompt there though its first token comes latest.
        let cold_first = [
            cache(infeasible(0, 190.0, false), 0.1, 5.0),
            cache(infeasible(1, 150.0, false), 0.5, 400.0),
            cache(infeasible(2, 160.0, false), 0.5, 500.0),
        ];
        assert_eq!(sent([3000.0, 3000.0, 3000.0]).choose(&cold_first, &at).unwrap().index, 0);
        // A little ahead of the mean (3.3 %): still there.
        assert_eq!(sent([3150.0, 3000.0, 3000.0]).choose(&cold_first, &at).unwrap().index, 0);
        // Ahead by more than the bound (6.5 %): passed over, the next cheapest takes it.
        let ahead = sent([3300.0, 3000.0, 3000.0]);
        let chosen = ahead.choose(&cold_first, &at).unwrap();
        assert_eq!((chosen.index, chosen.selection().reason), (1, Some("best_effort_in_margin_soonest")));
        // Once the others have caught up (sent as much since), it is the destination again.
        ahead.sent_prefill.record(1, 300.0, t0);
        ahead.sent_prefill.record(2, 300.0, t0);
        assert_eq!(ahead.choose(&cold_first, &at).unwrap().index, 0);
        // Unless it holds the prompt's prefix (little prefill to add).
        let holds = [Candidate { holder: true, ..cold_first[0] }, cold_first[1], cold_first[2]];
        assert_eq!(sent([3300.0, 3000.0, 3000.0]).choose(&holds, &at).unwrap().index, 0);
        // Or it is the only worker within the margin (the others 250-300 ms, late for nobody).
        let alone = [cold_first[0], infeasible(1, 300.0, false), infeasible(2, 250.0, false)];
        assert_eq!(sent([3300.0, 3000.0, 3000.0]).choose(&alone, &at).unwrap().index, 0);
        // No cache hits anywhere (nothing evicted): the soonest first token, however far ahead.
        let no_hits = [infeasible(0, 150.0, false), infeasible(1, 190.0, false), infeasible(2, 160.0, false)];
        assert_eq!(sent([6000.0, 3000.0, 3000.0]).choose(&no_hits, &at).unwrap().index, 0);
    }

    #[test]
    fn every_selection_records_the_uncached_prompt_it_sends() {
        let (ws, p) = trained(2, MarginalUtilityConfig::default());
        let now = Instant::now();
        let view = RequestView { now: Some(now), ..request(&"a fresh prompt ".repeat(40)) };
        let sel = p.select_single(&ws, &view).unwrap();
        let uncached = f64::from(sel.uncached_tokens.unwrap());
        assert!(uncached > 0.0);
        let sent = p.sent_prefill.recent([ws[sel.index].id()], now)[0];
        assert!((sent - uncached).abs() <= 1.0, "{sent} recorded for {uncached} sent");
        assert_eq!(p.sent_prefill.recent([ws[1 - sel.index].id()], now), vec![0.0]);
    }

    #[test]
    fn once_one_is_late_a_request_smaller_than_the_mean_still_goes_where_it_is_in_time() {
        let p = policy(MarginalUtilityConfig { slo_ttft: Duration::from_millis(400), ..Default::default() });
        // `chars` characters of prompt (a quarter as many tokens) and an output cap.
        let sized = |chars: usize, cap: Option<u32>| RequestView {
            text: RoutingText::Text("x".repeat(chars)),
            max_tokens: cap,
            ..RequestView::default()
        };
        let chosen = |set: &[Candidate], view: &RequestView| p.choose(set, view).unwrap().index;
        // Past the margin (200 ms) everywhere and worker 0 late; worker 1 within the whole budget.
        let one_late = [infeasible(0, 900.0, false), infeasible(1, 300.0, false), infeasible(2, 350.0, false)];
        // Requests of the usual size (4,000 characters, 200 tokens) run late on worker 0.
        for _ in 0..100 {
            assert_eq!(chosen(&one_late, &sized(4000, Some(200))), 0);
        }
        let late = p.counters.late.load(Ordering::Relaxed);
        assert_eq!(late, 100);
        // A smaller one (prompt and cap a quarter of the mean) still goes where it is in time.
        assert_eq!(chosen(&one_late, &sized(1000, Some(50))), 1);
        // So does one without a cap whose prompt is small; a larger one does not.
        assert_eq!(chosen(&one_late, &sized(1000, None)), 1);
        assert_eq!(chosen(&one_late, &sized(8000, None)), 0);
        // Small by its prompt but with a cap far above the mean: large on average, late.
        assert_eq!(chosen(&one_late, &sized(1000, Some(800))), 0);
        // One client's absurd cap counts as at most ten means: a request of the usual size after
        // it is still about the mean (unbounded, the cap mean would be ~4e7 and it half that).
        assert_eq!(chosen(&one_late, &sized(4000, Some(u32::MAX))), 0);
        let usual = p.sizes.relative(&sized(4000, Some(200)));
        assert!((0.9..1.0).contains(&usual), "relative size {usual}");
        // Small, but nobody is within the budget for it: late like the rest.
        let all_late = [infeasible(0, 900.0, false), infeasible(1, 500.0, false), infeasible(2, 600.0, false)];
        assert_eq!(chosen(&all_late, &sized(1000, Some(50))), 0);
        // The small ones that found a worker in time are not counted late.
        assert_eq!(p.counters.late.load(Ordering::Relaxed), late + 4);
    }

    #[test]
    fn a_cold_worker_with_a_full_hot_cache_pays_for_the_eviction() {
        let (ws, p) = trained(3, MarginalUtilityConfig::default());
        // Worker 1's cache hits often (training gave every worker 0.5); worker 0's never does.
        for i in 0..60 {
            p.observe_sample(
                ws[0].id(),
                &Sample {
                    at: 30.0 + f64::from(i),
                    decode: None,
                    prefill: None,
                    output_tokens: None,
                    cache_hit: Some(0.0),
                },
            );
        }
        let busy: Vec<InFlightGuard> = ws.iter().flat_map(|w| (0..4).map(|_| InFlightGuard::new(w.clone()))).collect();
        let scored = p.score(&ws, &request(&"y".repeat(4000)));
        assert!(
            scored[1].eviction_ms > 10.0 * scored[0].eviction_ms.max(1e-9) && scored[1].cost() > scored[0].cost(),
            "{scored:?}"
        );
        drop(busy);
    }

    #[test]
    fn a_worker_whose_first_tokens_stop_coming_loses_new_work_before_anything_finishes_there() {
        let (ws, p) = trained(2, MarginalUtilityConfig::default());
        // Worker 0 takes requests and answers none of them: its model still says it is fast,
        // but what waits there has waited for 1.5 s, so a newcomer would miss half the SLO.
        let t0 = Instant::now();
        let stuck: Vec<InFlightGuard> =
            (0..3).map(|_| InFlightGuard::dispatch(ws[0].clone(), Default::default(), t0)).collect();
        let view = RequestView { now: Some(t0 + Duration::from_millis(1500)), ..request("hello") };
        let scored = p.score(&ws, &view);
        assert!(!scored[0].feasible && scored[0].waiting_ms >= 3000.0 && scored[0].ttft_ms < 1000.0, "{scored:?}");
        assert!((0..20).all(|_| p.select_single(&ws, &view).unwrap().index == 1));
        drop(stuck);
    }

    #[test]
    fn a_reported_queue_guards_a_worker_until_the_router_sees_it_drain() {
        let (ws, p) = trained(2, MarginalUtilityConfig::default());
        let t0 = Instant::now();
        let sent = || {
            let mut g = InFlightGuard::dispatch(ws[0].clone(), Default::default(), t0);
            g.mark_first_byte();
            g
        };
        let feasible = || p.score(&ws, &RequestView { now: Some(t0), ..request("hello") })[0].feasible;
        assert!(feasible());
        // Nine in flight when the worker reports two of them queued.
        let mut running: Vec<InFlightGuard> = (0..9).map(|_| sent()).collect();
        ws[0].load().set_reported(ReportedLoad { kv_usage: 0.5, queued: 2, running: 7, at: t0 });
        assert!(!feasible());
        // One more sent, two finished: it has drained one request of the queue since.
        running.push(sent());
        running.truncate(8);
        assert!(!feasible(), "one of the two queued requests is still there");
        running.truncate(7);
        assert!(feasible(), "drained as many as were queued");
        // A nearly full cache guards until anything finishes there.
        ws[0].load().set_reported(ReportedLoad { kv_usage: 0.95, queued: 0, running: 7, at: t0 });
        assert!(!feasible());
        running.push(sent());
        assert!(!feasible(), "more sent, nothing finished");
        running.truncate(0);
        assert!(feasible());
        // Holding modes wait for the next report: the guard decides whether to send at all.
        let (ws, p) = trained(2, MarginalUtilityConfig { overload: Overload::Shed, ..Default::default() });
        let queued = InFlightGuard::dispatch(ws[0].clone(), Default::default(), t0);
        ws[0].load().set_reported(ReportedLoad { kv_usage: 0.5, queued: 1, running: 0, at: t0 });
        drop(queued);
        assert!(!p.score(&ws, &RequestView { now: Some(t0), ..request("hello") })[0].feasible);
    }

    #[test]
    fn behind_other_routers_the_worker_run_late_is_the_one_whose_engine_queue_is_longest() {
        // How far behind each worker is counts the queue its engine reports beyond this
        // router's own requests still before their first token.
        let behind = |config: MarginalUtilityConfig, role: WorkerRole| {
            let p = policy(config);
            let ws: Vec<Arc<Worker>> =
                (0..3).map(|i| Arc::new(Worker::new(format!("http://127.0.0.{}:30000", i + 2), role))).collect();
            for w in &ws {
                train(&p, w.id(), 1.0);
            }
            let t0 = Instant::now();
            let waiting: Vec<InFlightGuard> =
                (0..8).map(|i| InFlightGuard::dispatch(ws[i % 2].clone(), Default::default(), t0)).collect();
            // Four of this router's requests wait on each of the first two; worker 0 reports
            // those four queued, worker 1 forty: thirty-six another router sent. Worker 2 has
            // none of this router's and reports no queue.
            ws[0].load().set_reported(ReportedLoad { kv_usage: 0.5, queued: 4, running: 0, at: t0 });
            ws[1].load().set_reported(ReportedLoad { kv_usage: 0.5, queued: 40, running: 0, at: t0 });
            let scored = p.score(&ws, &RequestView { now: Some(t0), ..request("hello") });
            drop(waiting);
            scored
        };
        let scored = behind(MarginalUtilityConfig::default(), WorkerRole::Regular);
        assert_eq!(scored[0].behind_ms, scored[0].expected_ttft_ms(), "its queue is this router's own: {scored:?}");
        let scaled = scored[1].expected_ttft_ms() * (4.0 + 36.0) / 4.0;
        assert!((scored[1].behind_ms - scaled).abs() < 1e-9 * scaled, "{scored:?}");
        assert!(scored[2].behind_ms > 0.0, "{scored:?}");
        assert_eq!(scored[2].behind_ms, scored[2].expected_ttft_ms(), "nothing in flight: {scored:?}");
        // Counting other routers' requests puts them in the TTFT already: no second time.
        let counted =
            behind(MarginalUtilityConfig { count_other_routers: true, ..Default::default() }, WorkerRole::Regular);
        assert_eq!(counted[1].behind_ms, counted[1].expected_ttft_ms(), "{counted:?}");
        // Nor on a PD leg (README, "Replicas agree on the worker run late").
        let leg = behind(MarginalUtilityConfig::default(), WorkerRole::Decode);
        assert_eq!(leg[1].behind_ms, leg[1].expected_ttft_ms(), "{leg:?}");

        // Which worker runs late follows it: the one whose engine is furthest behind, though
        // this router's own view has another further behind (its own requests there).
        let p = policy(MarginalUtilityConfig { slo_ttft: Duration::from_millis(400), ..Default::default() });
        let view = request("q");
        let at = |c: Candidate, behind_ms: f64| Candidate { behind_ms, ..c };
        let late = [infeasible(0, 900.0, false), infeasible(1, 300.0, false), at(infeasible(2, 600.0, false), 3000.0)];
        let chosen = p.choose(&late, &view).unwrap().selection();
        assert_eq!((chosen.index, chosen.reason), (2, Some("best_effort_late_smallest")));
        // The same where only late workers hold the prefix: late on the one furthest behind.
        let held = [infeasible(0, 900.0, true), infeasible(1, 150.0, false), at(infeasible(2, 600.0, true), 3000.0)];
        let chosen = p.choose(&held, &view).unwrap().selection();
        assert_eq!((chosen.index, chosen.reason), (2, Some("best_effort_late_furthest_behind")));
    }

    /// `n` requests of this router's decoding at `w` since `at` (past their first token).
    fn decoding(w: &Arc<Worker>, n: usize, at: Instant) -> Vec<InFlightGuard> {
        (0..n)
            .map(|_| {
                let mut g = InFlightGuard::dispatch(w.clone(), Default::default(), at);
                g.mark_first_byte();
                g
            })
            .collect()
    }

    /// The slot wait the model gives a newcomer `place`th in line at `worker` for a batch of
    /// `limit`, its step time taken at a batch of `batch` (`WorkerState::slot_wait_ms`).
    fn slot_wait(p: &MarginalUtility, worker: &Worker, batch: f64, place: f64, limit: f64) -> f64 {
        let model = p.model.read().unwrap();
        let id = worker.id();
        let tpot = model.predict(id).tpot_ms(batch, 0.0, model.prefill_rate(id));
        place * model.expected_output(id) * tpot / limit
    }

    #[test]
    fn behind_other_routers_the_slot_wait_counts_the_requests_the_engine_reports_beyond_this_routers_own() {
        let (ws, p) = trained(1, MarginalUtilityConfig::default());
        let t0 = Instant::now();
        let view = RequestView { now: Some(t0), ..request("hello") };
        // Ten of this router's requests decode there; the engine runs 32 and queues 8: thirty
        // are other routers'. A newcomer is 9th in line, as if all forty were this router's.
        let _own = decoding(&ws[0], 10, t0);
        ws[0].load().set_reported(ReportedLoad { kv_usage: 0.5, queued: 8, running: 32, at: t0 });
        let scored = p.score(&ws, &view)[0];
        // The batch the fits price stays this router's own (`count_other_routers` is off).
        let expected = slot_wait(&p, &ws[0], 10.0, 9.0, 32.0);
        assert!((scored.slot_wait_ms - expected).abs() < 1e-6 * expected, "{scored:?} vs {expected}");
        assert_eq!(scored.in_flight, 10.0, "the fits' count is this router's own: {scored:?}");
        // Counting other routers (`--mu-count-other-routers`) puts them in the fits' count too,
        // and the wait is still counted.
        let (ws, p) = trained(1, MarginalUtilityConfig { count_other_routers: true, ..Default::default() });
        let _own: Vec<InFlightGuard> =
            (0..10).map(|_| InFlightGuard::dispatch(ws[0].clone(), Default::default(), t0)).collect();
        ws[0].load().set_reported(ReportedLoad { kv_usage: 0.5, queued: 8, running: 32, at: t0 });
        let counted = p.score(&ws, &view)[0];
        assert_eq!(counted.in_flight, 40.0, "{counted:?}");
        assert!(counted.slot_wait_ms > 0.0, "{counted:?}");
    }

    #[test]
    fn past_the_engines_batch_slot_limit_a_newcomer_waits_for_running_requests_to_finish() {
        let (ws, p) = trained(2, MarginalUtilityConfig::default());
        let t0 = Instant::now();
        let view = RequestView { now: Some(t0), ..request("hello") };
        let running = |n: usize| decoding(&ws[0], n, t0);
        let report = |queued, running| ReportedLoad { kv_usage: 0.5, queued, running, at: t0 };
        let mut guards = running(40);
        // The engine runs all 40: no wait for a slot.
        ws[0].load().set_reported(report(0, 40));
        let free = p.score(&ws, &view)[0];
        assert_eq!(free.slot_wait_ms, 0.0);
        // It runs 32 and queues 8: a newcomer is 9th in line, and a full batch frees a slot
        // every mean decode / 32.
        ws[0].load().set_reported(report(8, 32));
        let queued = p.score(&ws, &view)[0];
        let expected = slot_wait(&p, &ws[0], 40.0, 9.0, 32.0);
        assert!((queued.slot_wait_ms - expected).abs() < 1e-6 * expected, "{queued:?} vs {expected}");
        assert!((queued.ttft_ms - free.ttft_ms - expected).abs() < 1e-6 * expected, "counted in its TTFT");
        assert_eq!(queued.selection().slot_wait_ms, Some(expected as u32), "recorded for the fit");
        // The router's own count is fresher than the report: once it has seen the batch drain
        // below the limit, a newcomer gets a slot at once.
        guards.truncate(31);
        assert_eq!(p.score(&ws, &view)[0].slot_wait_ms, 0.0);
        // No wait is predicted for a worker that never reports its load, however busy.
        let _busy: Vec<InFlightGuard> = (0..40).map(|_| InFlightGuard::new(ws[1].clone())).collect();
        assert_eq!(p.score(&ws, &view)[1].slot_wait_ms, 0.0);
        // Nor for a PD prefill worker under the same report: its requests leave once their
        // prompt is computed, so a newcomer queues for prefill compute (the fit's queued
        // tokens), and what the fit learns from it is its whole TTFT. (Counting a decode-style
        // wait there put marginal_utility at 0.964x load_based's goodput at pd-mixed's knee:
        // README "PD past the knee".)
        let prefill =
            Arc::new(Worker::new("http://127.0.0.9:30000".into(), WorkerRole::Prefill { bootstrap_port: None }));
        train(&p, prefill.id(), 1.0);
        let _prefilling: Vec<InFlightGuard> = (0..40).map(|_| InFlightGuard::new(prefill.clone())).collect();
        prefill.load().set_reported(report(8, 32));
        let leg = p.score(std::slice::from_ref(&prefill), &view)[0];
        assert_eq!((leg.slot_wait_ms, leg.selection().slot_wait_ms), (0.0, Some(0)), "{leg:?}");
        ws[0].load().set_reported(report(8, 32));
        guards.extend(running(9));
        assert!(p.score(&ws, &view)[0].slot_wait_ms > 0.0, "a regular worker under that report still waits");
    }

    #[test]
    fn a_cache_full_of_running_contexts_makes_a_long_prompt_wait_for_room_there() {
        let (ws, p) = trained(2, MarginalUtilityConfig::default());
        let t0 = Instant::now();
        let tokens = |n: usize| RequestView { now: Some(t0), ..request(&"x".repeat(n * CHARS_PER_TOKEN)) };
        let dispatch = |w: &Arc<Worker>, prompt: u32, decoding: bool| {
            let info = DispatchInfo { prompt_tokens: prompt, uncached_tokens: prompt, ..Default::default() };
            let mut g = InFlightGuard::dispatch(w.clone(), info, t0);
            if decoding {
                g.mark_first_byte();
            }
            g
        };
        // Both run 50 requests of 8,000-token contexts (held = 400,000 tokens) and no engine
        // queue, so no slot wait; worker 0's cache is 99 % full, worker 1's half empty.
        let mut guards: Vec<InFlightGuard> =
            ws.iter().flat_map(|w| (0..50).map(|_| dispatch(w, 8000, true)).collect::<Vec<_>>()).collect();
        let report = |kv_usage| ReportedLoad { kv_usage, queued: 0, running: 50, at: t0 };
        ws[0].load().set_reported(report(0.99));
        ws[1].load().set_reported(report(0.5));
        // The step time at the batch and context the candidate sees there (B, K in tokens).
        let step = |b: f64, k: f64| {
            let model = p.model.read().unwrap();
            let id = ws[0].id();
            (model.expected_output(id), model.predict(id).tpot_ms(b, k, model.prefill_rate(id)))
        };
        let (mean_out, tpot) = step(50.0, 400_000.0);
        let held = 400_000.0;
        let free = held * 0.01 / 0.99;
        // An 8,000-token prompt needs more than the ~4,000 free: it waits for running requests
        // to free the rest, which they do at `held` tokens per residence.
        let long = p.score(&ws, &tokens(8000));
        let expected = (8000.0 - free) * mean_out * tpot / held;
        assert!((long[0].slot_wait_ms - expected).abs() < 1e-6 * expected, "{:?} vs {expected}", long[0]);
        assert_eq!(long[1].slot_wait_ms, 0.0, "room for it on the half-empty cache");
        assert!(long[0].ttft_ms - long[1].ttft_ms > 0.99 * expected, "counted in its TTFT: {long:?}");
        assert_eq!(long[0].selection().slot_wait_ms, Some(expected as u32), "recorded for the fit");
        // A short prompt fits in the room left.
        assert_eq!(p.score(&ws, &tokens(1000))[0].slot_wait_ms, 0.0);
        // Prompts waiting there for their first token are ahead of it in the queue for room.
        guards.push(dispatch(&ws[0], 20_000, false));
        let behind = p.score(&ws, &tokens(8000))[0];
        let (_, tpot) = step(51.0, 420_000.0);
        let with_ahead = (20_000.0 + 8000.0 - free) * mean_out * tpot / held;
        assert!((behind.slot_wait_ms - with_ahead).abs() < 1e-6 * with_ahead, "{behind:?} vs {with_ahead}");
        assert!(behind.slot_wait_ms > long[0].slot_wait_ms);
        // A PD prefill worker under the same report waits for prefill compute only.
        let prefill =
            Arc::new(Worker::new("http://127.0.0.9:30000".into(), WorkerRole::Prefill { bootstrap_port: None }));
        train(&p, prefill.id(), 1.0);
        guards.extend((0..50).map(|_| dispatch(&prefill, 8000, true)));
        prefill.load().set_reported(report(0.99));
        assert_eq!(p.score(std::slice::from_ref(&prefill), &tokens(8000))[0].slot_wait_ms, 0.0);
    }

    #[test]
    fn no_wait_for_room_is_read_from_a_cache_with_room_and_no_engine_queue() {
        let (ws, p) = trained(1, MarginalUtilityConfig::default());
        let t0 = Instant::now();
        let dispatch = |prompt: u32| {
            let info = DispatchInfo { prompt_tokens: prompt, uncached_tokens: prompt, ..Default::default() };
            InFlightGuard::dispatch(ws[0].clone(), info, t0)
        };
        // One request decoding a 1,000-token context and ten 8,000-token prompts being
        // prefilled: the engine queues none and its cache is a fifth full.
        let mut decoding = dispatch(1000);
        decoding.mark_first_byte();
        let _burst: Vec<InFlightGuard> = (0..10).map(|_| dispatch(8000)).collect();
        ws[0].load().set_reported(ReportedLoad { kv_usage: 0.19, queued: 0, running: 11, at: t0 });
        let view = RequestView { now: Some(t0), ..request(&"x".repeat(8000 * CHARS_PER_TOKEN)) };
        assert_eq!(p.score(&ws, &view)[0].slot_wait_ms, 0.0);
        // Under an engine queue the same counts are a queue for room: the prompts are ahead of
        // the newcomer, and the room free is what the one decoding context implies.
        ws[0].load().set_reported(ReportedLoad { kv_usage: 0.19, queued: 10, running: 1, at: t0 });
        let queued = p.score(&ws, &view)[0];
        let residence = {
            let model = p.model.read().unwrap();
            let id = ws[0].id();
            model.expected_output(id) * model.predict(id).tpot_ms(11.0, 81_000.0, model.prefill_rate(id))
        };
        let all_ahead = (80_000.0 + 8000.0 - 1000.0 * 0.81 / 0.19) * residence / 1000.0;
        assert!((queued.slot_wait_ms - all_ahead).abs() < 1e-6 * all_ahead, "{queued:?} vs {all_ahead}");
        assert!(all_ahead > 80.0 * residence);
    }

    #[test]
    fn pd_pairs_count_the_decode_workers_wait_for_a_batch_slot_and_sacrifice_the_one_furthest_behind() {
        // ws[0] prefills; ws[1..] decode. Each decode worker runs 32 and holds `in_flight`.
        let (ws, p) = trained(4, MarginalUtilityConfig::default());
        let t0 = Instant::now();
        let view = RequestView { now: Some(t0), ..request("hello") };
        // Reported once they are there, so none of them reads as another router's.
        let load = |w: &Arc<Worker>, in_flight: usize| -> Vec<InFlightGuard> {
            let guards = decoding(w, in_flight, t0);
            w.load().set_reported(ReportedLoad {
                kv_usage: 0.5,
                queued: in_flight.saturating_sub(32) as u64,
                running: 32,
                at: t0,
            });
            guards
        };
        let decode_pick = |p: &MarginalUtility| ws[1 + p.select_pair(&ws[..1], &ws[1..], &view).unwrap().1.index].id();
        let waits =
            |p: &MarginalUtility| -> Vec<f64> { p.score(&ws[1..], &view).iter().map(|c| c.slot_wait_ms).collect() };
        // ws[1] far behind, ws[2] a little, ws[3] with free slots: the pair goes to ws[3].
        let _g1 = load(&ws[1], 400);
        let _g2 = load(&ws[2], 120);
        let _g3 = load(&ws[3], 20);
        let w = waits(&p);
        assert!(w[0] > 2000.0 && w[1] > 2000.0 && w[2] == 0.0, "{w:?}");
        assert_eq!(decode_pick(&p), ws[3].id());
        // Once every decode worker's queue is past the TTFT budget, the one furthest behind takes
        // the request and the others keep what they can still serve in time.
        let _g3 = load(&ws[3], 150);
        assert!(waits(&p).iter().all(|&x| x > 2000.0), "{:?}", waits(&p));
        assert_eq!(decode_pick(&p), ws[1].id());
        // A request whose prefill leg is late already is late on the decode worker furthest
        // behind too, even when another still has a free slot.
        let _g0 = load(&ws[0], 400);
        assert!(p.score(&ws[..1], &view)[0].expected_ttft_ms() > 2000.0);
        drop(_g3);
        assert_eq!(waits(&p)[2], 0.0);
        assert_eq!(decode_pick(&p), ws[1].id());
    }

    #[test]
    fn pd_prefill_legs_past_the_knee_run_late_on_the_slowest_prefill_worker_furthest_behind() {
        // ws[0..3] prefill (ws[0] three times as fast), ws[3] decodes.
        let (ws, p) = (workers(4), policy(MarginalUtilityConfig::default()));
        for (w, speed) in ws.iter().zip([3.0, 1.0, 1.0, 1.0]) {
            train(&p, w.id(), speed);
        }
        let t0 = Instant::now();
        let view = RequestView { now: Some(t0), ..request("hello") };
        let load = |w: &Arc<Worker>, in_flight: usize| decoding(w, in_flight, t0);
        let pick = |p: &MarginalUtility| p.select_pair(&ws[..3], &ws[3..], &view).unwrap().0;
        // Every prefill worker is expected past the TTFT budget (predicted 2.17 / 2.02 / 2.12 s).
        // The fast one is not where late requests cost least, and of the two slow ones the
        // request joins the one furthest behind: the other can come back in time. (Spreading
        // them by cost, as before, sent it to ws[1], the cheapest, and every queue grew.)
        let (_g0, mut g1, _g2) = (load(&ws[0], 1300), load(&ws[1], 400), load(&ws[2], 420));
        let late = pick(&p);
        assert_eq!(late.index, 2, "{late:?}");
        assert_eq!(late.reason, Some("best_effort_late_smallest"));
        // ws[1] drains to within the whole budget but not the margin: large requests still run
        // late on ws[2], and one smaller than the mean the pair choice has seen goes to ws[1],
        // in time (PD learns request sizes as regular mode does).
        g1.truncate(300);
        let sized = |text: &str| RequestView { now: Some(t0), ..request(text) };
        for i in 0..3 {
            // Each its own prompt: one the tree remembers would go to its holder.
            let big = p.select_pair(&ws[..3], &ws[3..], &sized(&format!("{i}{}", "word ".repeat(400)))).unwrap().0;
            assert_eq!((big.index, big.reason), (2, Some("best_effort_late_smallest")), "{big:?}");
        }
        let small = p.select_pair(&ws[..3], &ws[3..], &sized("hi there")).unwrap().0;
        assert_eq!((small.index, small.reason), (1, Some("best_effort_small_in_time")), "{small:?}");
        // Once ws[1] drains it is in time again, and its pick says so.
        g1.truncate(50);
        let in_time = pick(&p);
        assert_eq!((in_time.index, in_time.reason), (1, Some("feasible")), "{in_time:?}");
    }

    #[test]
    fn first_tokens_correct_a_slow_newcomer_before_its_requests_finish() {
        let ws = workers(2);
        let p = policy(MarginalUtilityConfig::default());
        // Worker 1 is known; worker 0 is new, predicted by the pooled fit: as fast as worker 1.
        train(&p, ws[1].id(), 1.0);
        let before = p.score(&ws, &request("hello"));
        assert!((before[0].ttft_ms - before[1].ttft_ms).abs() < 0.2 * before[1].ttft_ms, "{before:?}");
        // Its first tokens come 600 ms after dispatch, each on an empty worker; none finishes.
        let t0 = Instant::now();
        let mut running = Vec::new();
        for i in 0..20u64 {
            let sent = t0 + Duration::from_secs(i);
            let mut g = InFlightGuard::dispatch(ws[0].clone(), Default::default(), sent);
            p.on_first_token(&g.first_token_at(sent + Duration::from_millis(600)).expect("first token"));
            running.push(g);
        }
        drop(running); // abandoned, not finished: no samples, and the worker is idle again
        let after = p.score(&ws, &request("hello"));
        assert!(after[0].ttft_ms > 400.0 && after[0].ttft_ms > 5.0 * before[0].ttft_ms, "{before:?} → {after:?}");
        assert_eq!(p.report().iter().map(|r| r.samples[1]).sum::<u64>(), 200, "the fits wait for the end");
    }

    #[test]
    fn a_held_request_has_spent_part_of_its_ttft_budget() {
        let ws = workers(1);
        let p = policy(MarginalUtilityConfig { overload: Overload::Queue, ..Default::default() });
        train(&p, ws[0].id(), 1.0);
        let mut view = request("hello");
        let fresh = p.score(&ws, &view)[0];
        assert!(fresh.feasible && fresh.ttft_ms > 10.0, "{fresh:?}");
        // Held for all but a few ms of its 2 s SLO: the same worker can no longer serve it in time.
        view.waited = Duration::from_millis(2000) - Duration::from_secs_f64(fresh.ttft_ms / 2e3);
        assert!(!p.score(&ws, &view)[0].feasible);
    }

    #[test]
    fn exploration_never_starves_a_worker() {
        let ws = workers(2);
        let p = MarginalUtility::new(&MarginalUtilityConfig { seed: Some(3), epsilon: 0.01, ..Default::default() });
        train(&p, ws[0].id(), 4.0);
        train(&p, ws[1].id(), 1.0);
        let picks: Vec<usize> =
            (0..3000).map(|_| p.select_single(&ws, &RequestView::default()).unwrap().index).collect();
        let slow = picks.iter().filter(|&&i| i == 1).count();
        assert!(slow > 0 && slow < 60, "slow worker picked {slow} times of 3000");
    }

    #[test]
    fn concurrent_selections_do_not_herd() {
        let (ws, p) = trained(4, MarginalUtilityConfig::default());
        let (ws, p) = (Arc::new(ws), Arc::new(p));
        let counts: Vec<usize> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|t| {
                    let (p, ws) = (p.clone(), ws.clone());
                    s.spawn(move || {
                        (0..8).map(|i| dispatch(&p, &ws, &request(&format!("t{t} r{i}")))).collect::<Vec<_>>()
                    })
                })
                .collect();
            let guards: Vec<_> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
            (0..4).map(|w| guards.iter().filter(|(i, _)| *i == w).count()).collect()
        });
        assert!(counts.iter().all(|&c| (8..=24).contains(&c)), "{counts:?}");
    }

    #[test]
    fn shed_mode_holds_then_sheds_and_best_effort_always_dispatches() {
        let ws = workers(1);
        let slo = Duration::from_millis(100);
        let shed = policy(MarginalUtilityConfig { slo_ttft: slo, overload: Overload::Shed, ..Default::default() });
        let best = policy(MarginalUtilityConfig { slo_ttft: slo, ..Default::default() });
        for p in [&shed, &best] {
            train(p, ws[0].id(), 1.0);
        }
        let _busy: Vec<_> = (0..20).map(|_| InFlightGuard::new(ws[0].clone())).collect();
        let mut view = request(&"q".repeat(400));
        // Predicted TTFT with 20 in flight is far above 50 % of the SLO: held, then shed.
        assert_eq!(best.select_single(&ws, &view).map(|s| s.index), Ok(0));
        let first = shed.select_single(&ws, &view);
        assert!(matches!(first, Err(RoutingError::Saturated { .. }) | Err(RoutingError::Shed { .. })), "{first:?}");
        view.waited = slo;
        assert!(matches!(shed.select_single(&ws, &view), Err(RoutingError::Shed { .. })));
        assert!(shed.shed_count() >= 1);
    }
}
