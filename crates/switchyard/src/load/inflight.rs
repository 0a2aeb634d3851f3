//! In-flight request counting with drop guards, after tower's `load::completion`, plus the
//! per-worker running integrals that give each finished request its load window.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::usage::Usage;
use crate::workers::{BreakerState, Claim, Worker};

/// Per-worker load counters, updated by guards and read by policies.
#[derive(Debug, Default)]
pub struct WorkerLoad {
    in_flight: AtomicUsize,
    dispatched: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    window: Mutex<Integrals>,
    reported: Mutex<Option<ReportedLoad>>,
    /// This router's in-flight count when the last report was stored.
    in_flight_at_report: AtomicUsize,
}

/// What the worker itself last said about its load (polled `/get_load` or `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReportedLoad {
    /// KV cache usage, 0..=1.
    pub kv_usage: f64,
    /// Requests waiting in the engine's queue.
    pub queued: u64,
    /// Requests running in the engine (besides the waiting ones).
    pub running: u64,
    /// When it was read.
    pub at: Instant,
}

/// Running state of one worker as the router sees it, advanced at every guard event.
///
/// `decoding` (B) counts requests past their first token; `context` (K) sums their prompt
/// tokens; `queued_prefill` (U) sums the uncached prompt tokens of requests still waiting for
/// their first token. The integrals of B and K over time, and the cumulative uncached tokens
/// admitted, let a finished request read its window's averages as two differences: O(1),
/// exact, and no per-request history. `waiting` counts the requests before their first token
/// and `waiting_age` sums their ages (grown by `waiting · dt`, less each one's age as it
/// leaves): the live evidence of a worker that has stopped answering, long before any
/// request on it finishes. `others` counts the requests the worker last reported beyond
/// this router's own (other router replicas' traffic), integrated apart from this router's so
/// a policy that counts them in B and K can learn from windows that count them too.
#[derive(Debug, Default, Clone, Copy)]
struct Integrals {
    last: Option<Instant>,
    decoding: u64,
    context: u64,
    others: u64,
    others_read_at: Option<Instant>,
    int_others: f64,
    int_others_context: f64,
    queued_prefill: u64,
    int_decoding: f64,
    int_context: f64,
    admitted_prefill: u64,
    waiting: u64,
    waiting_age: f64,
}

impl Integrals {
    fn advance(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            let others = self.others_at(last) as f64;
            self.int_decoding += self.decoding as f64 * dt;
            self.int_context += self.context as f64 * dt;
            self.int_others += others * dt;
            self.int_others_context += others * self.context_per_request() * dt;
            self.waiting_age += self.waiting as f64 * dt;
        }
        if self.last.is_none_or(|l| now > l) {
            self.last = Some(now);
        }
    }

    /// The other routers' requests at `now`, while the report that showed them is fresh.
    fn others_at(&self, now: Instant) -> u64 {
        match self.others_read_at {
            Some(at) if now.saturating_duration_since(at) <= OTHERS_MAX_AGE => self.others,
            _ => 0,
        }
    }

    /// Mean context of the requests decoding here, the best guess for the others' (whose
    /// prompts this router never saw).
    fn context_per_request(&self) -> f64 {
        if self.decoding == 0 {
            0.0
        } else {
            self.context as f64 / self.decoding as f64
        }
    }

    /// A request that has waited `age` got its first token or left.
    fn stop_waiting(&mut self, age: Duration) {
        self.waiting = self.waiting.saturating_sub(1);
        self.waiting_age = if self.waiting == 0 { 0.0 } else { (self.waiting_age - age.as_secs_f64()).max(0.0) };
    }
}

/// How long a report's count of other routers' requests is believed: several polls at the
/// default interval (5 s), so a worker that stops answering polls does not keep them forever.
const OTHERS_MAX_AGE: Duration = Duration::from_secs(30);

/// A snapshot of a worker's state, for policies.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadSnapshot {
    /// Requests in flight (queued, prefilling or decoding).
    pub in_flight: u64,
    /// Requests past their first token.
    pub decoding: u64,
    /// Prompt tokens of the decoding requests.
    pub context_tokens: u64,
    /// Uncached prompt tokens of requests still before their first token.
    pub queued_prefill_tokens: u64,
    /// Requests still before their first token.
    pub waiting: u64,
    /// Mean time those have waited so far (zero when none).
    pub mean_wait: Duration,
    /// Requests there that other routers sent (other replicas, direct clients), from the
    /// worker's last report: its running and waiting requests less this router's in flight
    /// when it was read, zero without a fresh report. They are in its batch too.
    pub others: u64,
    /// Context tokens to count for each of `others` (this router's decoding mean).
    pub others_context_per_request: f64,
}

impl WorkerLoad {
    /// Requests sent to the worker whose responses have not ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests dispatched to the worker since it was added.
    pub fn dispatched(&self) -> u64 {
        self.dispatched.load(Ordering::Relaxed)
    }

    /// Requests that ended successfully.
    pub fn succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
    }

    /// Requests that ended in an error (worker status ≥ 500, transport error, cut stream).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The router's view of the worker's batch, context, queued prefill and waiting requests
    /// at `now` (the wall clock, or a simulation's virtual time).
    pub fn snapshot_at(&self, now: Instant) -> LoadSnapshot {
        let w = *self.window.lock().unwrap_or_else(|p| p.into_inner());
        let since = w.last.map_or(0.0, |l| now.saturating_duration_since(l).as_secs_f64());
        let mean_wait = if w.waiting == 0 { 0.0 } else { w.waiting_age / w.waiting as f64 + since };
        LoadSnapshot {
            in_flight: self.in_flight() as u64,
            decoding: w.decoding,
            context_tokens: w.context,
            queued_prefill_tokens: w.queued_prefill,
            waiting: w.waiting,
            mean_wait: Duration::from_secs_f64(mean_wait),
            others: w.others_at(now),
            others_context_per_request: w.context_per_request(),
        }
    }

    /// How many more requests the worker has finished than this router sent it since its last
    /// report: the drop in this router's in-flight count (negative when it grew). The report is
    /// a poll old; a queue it showed is gone once the worker has drained that many.
    pub fn drained_since_report(&self) -> i64 {
        self.in_flight_at_report.load(Ordering::Relaxed) as i64 - self.in_flight() as i64
    }

    /// The worker's own last report, if the load poller has one.
    pub fn reported(&self) -> Option<ReportedLoad> {
        *self.reported.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a report from the load poller, and what it shows beyond this router's own
    /// requests. Requests in transit either way (sent but not yet arrived, finished but not yet
    /// seen) make the difference noisy by a few, never by other routers' whole share.
    pub fn set_reported(&self, report: ReportedLoad) {
        let in_flight = self.in_flight();
        self.in_flight_at_report.store(in_flight, Ordering::Relaxed);
        let others = report.running.saturating_add(report.queued).saturating_sub(in_flight as u64);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        // A router alone with its workers (nothing beyond its own, before or now) leaves its
        // window to the guards' own clock.
        if others > 0 || w.others_at(report.at) > 0 {
            w.advance(report.at);
            w.others = others;
            w.others_read_at = Some(report.at);
        }
        drop(w);
        *self.reported.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
    }

    fn with_window<R>(&self, now: Instant, f: impl FnOnce(&mut Integrals) -> R) -> R {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.advance(now);
        f(&mut w)
    }
}

/// What the router knows about a request when it dispatches it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchInfo {
    /// Prompt tokens (estimated from the text when the request has no token ids).
    pub prompt_tokens: u32,
    /// Of those, the tokens the policy expects the worker to have to compute (not cached).
    pub uncached_tokens: u32,
    /// The route it was sent to (`/v1/chat/completions`, ...), for metrics.
    pub route: &'static str,
    /// The policy's prediction of the prompt tokens cached on this worker, and the most it
    /// predicted on any other candidate (for the routing audit).
    pub predicted_cached: Option<(u32, u32)>,
    /// The policy that made the decision, for the routing audit.
    pub policy: &'static str,
    /// The wait to be admitted (a batch slot or room in the KV cache) the policy predicted and
    /// counted in its TTFT (ms): taken off the observed TTFT before the TTFT fit learns from
    /// it, so the fit stays the engine's own prefill and queue time and the wait is not
    /// counted twice.
    pub slot_wait_ms: u32,
}

/// How a request on a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Answered in full without a worker-side error.
    Succeeded,
    /// A worker-side failure: an error status, a transport error, a cut, garbled or stalled
    /// answer. Counts against the worker's circuit breaker.
    Failed,
    /// Ended without a verdict on the worker: the client went away, or the router cancelled
    /// the leg because its other leg failed. Counts neither way; a breaker probe is returned.
    Abandoned,
}

impl Ending {
    /// `Succeeded` or `Failed`.
    pub fn from_success(success: bool) -> Self {
        if success {
            Ending::Succeeded
        } else {
            Ending::Failed
        }
    }
}

/// Hears how the requests it is registered on go: at the first token of a stream, and
/// exactly once at the end, whatever the ending (tower's `TrackCompletion`: the handle
/// reports, nobody completes by hand). The router registers one observer per pool — the
/// policy, the metrics and the held-request wake-ups behind it.
pub trait GuardObserver: Send + Sync + fmt::Debug {
    /// A streamed request's first token arrived.
    fn on_first_token(&self, _first: &FirstTokenOutcome) {}
    /// The request ended (called once per guard).
    fn on_end(&self, outcome: &RequestOutcome);
}

/// Averages over a request's decode window (first token → end) on its worker.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeWindow {
    /// Time-averaged decoding concurrency B̄ (this request included).
    pub mean_batch: f64,
    /// Time-averaged context tokens K̄ of the decoding requests.
    pub mean_context: f64,
    /// Uncached prefill tokens admitted per second during the window, P̄.
    pub prefill_rate: f64,
    /// Time-averaged requests of other routers there (from the worker's reports), and their
    /// context tokens (at this router's mean per request): not in `mean_batch`/`mean_context`.
    pub mean_others: f64,
    /// See `mean_others`.
    pub mean_others_context: f64,
}

/// What the router observed about one finished request, for `on_request_complete`.
#[derive(Debug, Clone)]
pub struct RequestOutcome {
    /// The worker that served it.
    pub worker: Arc<Worker>,
    /// How it ended.
    pub ending: Ending,
    /// The status relayed to the client, when this attempt's answer was the client's.
    pub relayed: Option<u16>,
    /// Whether its first token was seen in a stream (else the first byte was the whole answer).
    pub streamed: bool,
    /// Time from dispatch to the first response body byte, if any arrived.
    pub time_to_first_byte: Option<Duration>,
    /// Time from dispatch to the end of the response.
    pub latency: Duration,
    /// When it ended (virtual time in a simulation).
    pub finished_at: Instant,
    /// What was known at dispatch.
    pub dispatch: DispatchInfo,
    /// Requests in flight on the worker when this one was sent (itself excluded).
    pub in_flight_at_dispatch: u64,
    /// Uncached prompt tokens queued ahead of it at dispatch, U.
    pub queued_prefill_ahead: u64,
    /// Token counts the worker reported (or the router counted).
    pub usage: Usage,
    /// Load over the decode window, when the request streamed its first token separately.
    pub window: Option<DecodeWindow>,
}

/// What the router observed when a streamed request's first token arrived, for
/// `on_first_token`: its time to first token is known long before the request finishes,
/// and a policy that learns from it corrects a slow worker within one TTFT.
#[derive(Debug, Clone)]
pub struct FirstTokenOutcome {
    /// The worker serving it.
    pub worker: Arc<Worker>,
    /// Time from dispatch to the first token.
    pub ttft: Duration,
    /// When the first token arrived (virtual time in a simulation).
    pub at: Instant,
    /// What was known at dispatch.
    pub dispatch: DispatchInfo,
    /// Requests in flight on the worker when this one was sent (itself excluded).
    pub in_flight_at_dispatch: u64,
    /// Uncached prompt tokens queued ahead of it at dispatch, U.
    pub queued_prefill_ahead: u64,
}

impl RequestOutcome {
    /// Whether it completed without a worker-side error.
    pub fn success(&self) -> bool {
        self.ending == Ending::Succeeded
    }
}

#[derive(Debug, Clone, Copy)]
struct FirstToken {
    at: Instant,
    streamed: bool,
    int_decoding: f64,
    int_context: f64,
    int_others: f64,
    int_others_context: f64,
    admitted_prefill: u64,
}

/// Counts one request as in flight on a worker for as long as the guard lives, and reports
/// its end exactly once: [`InFlightGuard::finish`] on a verdict, or on drop as
/// [`Ending::Abandoned`] (the client went away, a leg was cancelled). The end feeds the
/// worker's counters and running integrals, its circuit breaker (the claim taken at dispatch)
/// and the registered [`GuardObserver`].
pub struct InFlightGuard {
    worker: Arc<Worker>,
    dispatched_at: Instant,
    info: DispatchInfo,
    in_flight_at_dispatch: u64,
    queued_prefill_ahead: u64,
    first_token: Option<FirstToken>,
    claim: Option<Claim>,
    observer: Option<Arc<dyn GuardObserver>>,
    relayed: Option<u16>,
    ended: bool,
}

impl fmt::Debug for InFlightGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightGuard")
            .field("worker", &self.worker.url())
            .field("info", &self.info)
            .field("claim", &self.claim)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl InFlightGuard {
    /// Marks a request as dispatched to `worker` now, with nothing known about its size.
    pub fn new(worker: Arc<Worker>) -> Self {
        Self::dispatch(worker, DispatchInfo::default(), Instant::now())
    }

    /// Marks a request as dispatched to `worker` at `now` (a simulation passes virtual time),
    /// without a breaker claim or an observer (tests, what-if scoring).
    pub fn dispatch(worker: Arc<Worker>, info: DispatchInfo, now: Instant) -> Self {
        let load = worker.load();
        let in_flight_at_dispatch = load.in_flight.fetch_add(1, Ordering::Relaxed) as u64;
        load.dispatched.fetch_add(1, Ordering::Relaxed);
        let queued_prefill_ahead = load.with_window(now, |w| {
            let ahead = w.queued_prefill;
            w.queued_prefill += u64::from(info.uncached_tokens);
            w.waiting += 1;
            ahead
        });
        Self {
            worker,
            dispatched_at: now,
            info,
            in_flight_at_dispatch,
            queued_prefill_ahead,
            first_token: None,
            claim: None,
            observer: None,
            relayed: None,
            ended: false,
        }
    }

    /// Claims `worker`'s circuit breaker and, if it lets the request through, dispatches it at
    /// `now` with `observer` registered. `None` when the breaker refuses (open, or another
    /// probe is out): nothing is counted then.
    pub fn claim(
        worker: Arc<Worker>,
        info: DispatchInfo,
        now: Instant,
        observer: Arc<dyn GuardObserver>,
    ) -> Option<Self> {
        let claim = worker.breaker().try_claim()?;
        let mut guard = Self::dispatch(worker, info, now);
        guard.claim = Some(claim);
        guard.observer = Some(observer);
        Some(guard)
    }

    /// The worker this request is counted on.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// When it was dispatched.
    pub fn dispatched_at(&self) -> Instant {
        self.dispatched_at
    }

    /// Marks this attempt's answer as the one relayed to the client, with `status`.
    pub fn relay(&mut self, status: u16) {
        self.relayed = Some(status);
    }

    /// Records the arrival of a whole (non-streamed) answer's first byte.
    pub fn mark_first_byte(&mut self) {
        self.mark_first_byte_at(Instant::now());
    }

    /// [`InFlightGuard::mark_first_byte`] at a given time.
    pub fn mark_first_byte_at(&mut self, now: Instant) {
        self.mark_first(now, false);
    }

    fn mark_first(&mut self, now: Instant, streamed: bool) -> bool {
        if self.first_token.is_some() {
            return false;
        }
        let (prompt, uncached) = (u64::from(self.info.prompt_tokens), u64::from(self.info.uncached_tokens));
        let age = now.saturating_duration_since(self.dispatched_at);
        let first = self.worker.load().with_window(now, |w| {
            w.stop_waiting(age);
            w.queued_prefill = w.queued_prefill.saturating_sub(uncached);
            w.admitted_prefill += uncached;
            w.decoding += 1;
            w.context += prompt;
            FirstToken {
                at: now,
                streamed,
                int_decoding: w.int_decoding,
                int_context: w.int_context,
                int_others: w.int_others,
                int_others_context: w.int_others_context,
                admitted_prefill: w.admitted_prefill,
            }
        });
        self.first_token = Some(first);
        true
    }

    /// Records a streamed request's first token at `now`, tells the observer, and returns
    /// what was observed, once (`None` if the first byte was already marked).
    pub fn first_token_at(&mut self, now: Instant) -> Option<FirstTokenOutcome> {
        if !self.mark_first(now, true) {
            return None;
        }
        let first = FirstTokenOutcome {
            worker: self.worker.clone(),
            ttft: now.saturating_duration_since(self.dispatched_at),
            at: now,
            dispatch: self.info,
            in_flight_at_dispatch: self.in_flight_at_dispatch,
            queued_prefill_ahead: self.queued_prefill_ahead,
        };
        if let Some(o) = &self.observer {
            o.on_first_token(&first);
        }
        Some(first)
    }

    /// Ends the request now with `ending` and the token counts seen in the answer.
    pub fn finish(self, ending: Ending, usage: Usage) -> RequestOutcome {
        self.finish_at(ending, usage, Instant::now())
    }

    /// [`InFlightGuard::finish`] at `now`.
    pub fn finish_at(mut self, ending: Ending, usage: Usage, now: Instant) -> RequestOutcome {
        self.end(ending, usage, now)
    }

    /// The one place a request ends: breaker, counters, integrals, observer.
    fn end(&mut self, ending: Ending, usage: Usage, now: Instant) -> RequestOutcome {
        self.ended = true;
        match (self.claim.take(), ending) {
            (Some(c), Ending::Abandoned) => self.worker.breaker().release(c),
            (Some(c), e) => match self.worker.breaker().record(c, e == Ending::Succeeded) {
                Some(BreakerState::Open { .. }) => {
                    let threshold = self.worker.breaker().config().failure_threshold;
                    tracing::warn!(worker = self.worker.url(), failures = threshold, "circuit opened");
                }
                Some(_) => tracing::info!(worker = self.worker.url(), "circuit closed"),
                None => {}
            },
            (None, _) => {}
        }
        let load = self.worker.load();
        match ending {
            Ending::Succeeded => load.succeeded.fetch_add(1, Ordering::Relaxed),
            Ending::Failed => load.failed.fetch_add(1, Ordering::Relaxed),
            Ending::Abandoned => 0,
        };
        let first = self.first_token;
        let (prompt, uncached) = (u64::from(self.info.prompt_tokens), u64::from(self.info.uncached_tokens));
        let age = now.saturating_duration_since(self.dispatched_at);
        let window = load.with_window(now, |w| {
            let window = first.and_then(|f| {
                let dt = now.saturating_duration_since(f.at).as_secs_f64();
                (dt > 0.0).then(|| DecodeWindow {
                    mean_batch: (w.int_decoding - f.int_decoding) / dt,
                    mean_context: (w.int_context - f.int_context) / dt,
                    prefill_rate: (w.admitted_prefill - f.admitted_prefill) as f64 / dt,
                    mean_others: (w.int_others - f.int_others) / dt,
                    mean_others_context: (w.int_others_context - f.int_others_context) / dt,
                })
            });
            if first.is_some() {
                w.decoding = w.decoding.saturating_sub(1);
                w.context = w.context.saturating_sub(prompt);
            } else {
                w.queued_prefill = w.queued_prefill.saturating_sub(uncached);
                w.stop_waiting(age);
            }
            window
        });
        let was = load.in_flight.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(was > 0);
        let outcome = RequestOutcome {
            worker: self.worker.clone(),
            ending,
            relayed: self.relayed,
            streamed: first.is_some_and(|f| f.streamed),
            time_to_first_byte: first.map(|f| f.at.saturating_duration_since(self.dispatched_at)),
            latency: age,
            finished_at: now,
            dispatch: self.info,
            in_flight_at_dispatch: self.in_flight_at_dispatch,
            queued_prefill_ahead: self.queued_prefill_ahead,
            usage,
            window,
        };
        if let Some(o) = &self.observer {
            o.on_end(&outcome);
        }
        outcome
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if !self.ended {
            self.end(Ending::Abandoned, Usage::default(), Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::WorkerRole;

    #[test]
    fn guards_count_and_release() {
        let w = Arc::new(Worker::new("http://127.0.0.1:1".into(), WorkerRole::Regular));
        let a = InFlightGuard::new(w.clone());
        let b = InFlightGuard::new(w.clone());
        let c = InFlightGuard::new(w.clone());
        assert_eq!(w.load().in_flight(), 3);
        assert!(!b.finish(Ending::Failed, Usage::default()).success());
        assert_eq!((w.load().in_flight(), w.load().failed()), (2, 1));
        assert!(a.finish(Ending::Succeeded, Usage::default()).success());
        drop(c); // abandoned: released, counted neither way
        assert_eq!(
            (w.load().in_flight(), w.load().succeeded(), w.load().failed(), w.load().dispatched()),
            (0, 1, 1, 3)
        );
    }

    #[test]
    fn waiting_requests_and_their_mean_wait_follow_first_tokens_and_releases() {
        let w = Arc::new(Worker::new("http://127.0.0.1:1".into(), WorkerRole::Regular));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut a = InFlightGuard::dispatch(w.clone(), DispatchInfo::default(), at(0));
        let b = InFlightGuard::dispatch(w.clone(), DispatchInfo::default(), at(2));
        let s = w.load().snapshot_at(at(4));
        assert_eq!((s.waiting, s.mean_wait), (2, Duration::from_secs(3)), "ages 4 s and 2 s");
        let first = a.first_token_at(at(5)).expect("first token reported once");
        assert_eq!(first.ttft, Duration::from_secs(5));
        assert!(a.first_token_at(at(6)).is_none());
        let s = w.load().snapshot_at(at(6));
        assert_eq!((s.waiting, s.decoding, s.mean_wait), (1, 1, Duration::from_secs(4)), "only b waits, for 4 s");
        drop(b);
        assert_eq!(w.load().snapshot_at(at(9)).mean_wait, Duration::ZERO);
        assert_eq!(
            a.finish_at(Ending::Succeeded, Usage::default(), at(10)).time_to_first_byte,
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn a_report_beyond_this_routers_own_requests_counts_in_the_batch_until_it_is_stale() {
        let w = Arc::new(Worker::new("http://127.0.0.1:1".into(), WorkerRole::Regular));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let info = DispatchInfo { prompt_tokens: 100, ..DispatchInfo::default() };
        let mut a = InFlightGuard::dispatch(w.clone(), info, at(0));
        a.first_token_at(at(1)).expect("first token");
        // The engine runs 4 and queues 1: 4 of them are another router's.
        w.load().set_reported(ReportedLoad { kv_usage: 0.1, queued: 1, running: 4, at: at(2) });
        let s = w.load().snapshot_at(at(3));
        assert_eq!((s.in_flight, s.decoding, s.others), (1, 1, 4));
        assert_eq!(s.others_context_per_request, 100.0, "this router's mean context stands in for theirs");
        // The finished request's window (1 s to 4 s) saw its own batch of 1 throughout and the
        // others' 4 for the last 2 s, counted apart.
        let window = a.finish_at(Ending::Succeeded, Usage::default(), at(4)).window.expect("a window");
        assert_eq!((window.mean_batch, window.mean_context), (1.0, 100.0));
        assert!((window.mean_others - 8.0 / 3.0).abs() < 1e-9, "others {}", window.mean_others);
        assert!((window.mean_others_context - 800.0 / 3.0).abs() < 1e-6, "{}", window.mean_others_context);
        // Fewer than this router's own in flight: nobody else's.
        let _b = InFlightGuard::dispatch(w.clone(), info, at(5));
        let _c = InFlightGuard::dispatch(w.clone(), info, at(5));
        w.load().set_reported(ReportedLoad { kv_usage: 0.1, queued: 0, running: 1, at: at(6) });
        assert_eq!(w.load().snapshot_at(at(7)).others, 0);
        w.load().set_reported(ReportedLoad { kv_usage: 0.1, queued: 3, running: 2, at: at(8) });
        assert_eq!(w.load().snapshot_at(at(8)).others, 3);
        // A worker that stops answering polls does not keep them.
        assert_eq!(w.load().snapshot_at(at(8) + OTHERS_MAX_AGE + Duration::from_secs(1)).others, 0);
    }

    /// Counts what an observer hears.
    #[derive(Debug, Default)]
    struct Heard(Mutex<Vec<(Ending, Option<u16>, bool)>>, AtomicUsize);

    impl GuardObserver for Heard {
        fn on_first_token(&self, _first: &FirstTokenOutcome) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
        fn on_end(&self, o: &RequestOutcome) {
            self.0.lock().unwrap().push((o.ending, o.relayed, o.streamed));
        }
    }

    #[test]
    fn a_claimed_guard_reports_once_to_its_observer_and_its_breaker() {
        use crate::config::CircuitBreakerConfig;
        let w = Arc::new(Worker::with_breaker(
            "http://127.0.0.1:1".into(),
            WorkerRole::Regular,
            CircuitBreakerConfig { failure_threshold: 1, success_threshold: 1, timeout: Duration::ZERO },
        ));
        let heard = Arc::new(Heard::default());
        let now = Instant::now();
        let mut a = InFlightGuard::claim(w.clone(), DispatchInfo::default(), now, heard.clone()).unwrap();
        a.relay(200);
        assert!(a.first_token_at(now).is_some() && a.first_token_at(now).is_none());
        let _ = a.finish(Ending::Failed, Usage::default());
        assert_eq!(w.breaker().state().name(), "half_open", "the failure opened it (zero timeout)");
        // The half-open probe is abandoned: dropped unfinished, it gives its permit back.
        let probe = InFlightGuard::claim(w.clone(), DispatchInfo::default(), now, heard.clone()).unwrap();
        assert!(InFlightGuard::claim(w.clone(), DispatchInfo::default(), now, heard.clone()).is_none());
        drop(probe);
        let probe = InFlightGuard::claim(w.clone(), DispatchInfo::default(), now, heard.clone()).expect("permit back");
        let _ = probe.finish(Ending::Succeeded, Usage::default());
        assert_eq!(w.breaker().state().name(), "closed");
        assert_eq!(
            *heard.0.lock().unwrap(),
            vec![(Ending::Failed, Some(200), true), (Ending::Abandoned, None, false), (Ending::Succeeded, None, false)]
        );
        assert_eq!(heard.1.load(Ordering::Relaxed), 1);
        assert_eq!(w.load().in_flight(), 0);
    }
}
