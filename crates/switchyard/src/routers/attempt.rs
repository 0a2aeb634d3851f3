//! The attempt loop: select (with holding) → claim each leg's breaker and take its guard →
//! run one attempt (one leg or two) → classify → back off and retry elsewhere, while nothing
//! has reached the client.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Response};
use bytes::Bytes;
use tokio::time::Instant;
use tracing::Instrument;

use super::failover;
use super::feedback::PoolObserver;
use super::hold::HoldQueue;
use super::{pd, regular};
use crate::config::{PdStyle, RetryConfig};
use crate::error::ApiError;
use crate::load::InFlightGuard;
use crate::metrics::Metrics;
use crate::policies::{RoutingError, RoutingPolicy, Selection};
use crate::proxy::{StreamLimits, Upstream};
use crate::request::RequestView;
use crate::workers::{Worker, WorkerRegistry, WorkerRole};

/// Headers that carry a session affinity key, in order of preference.
const ROUTING_KEY_HEADERS: [&str; 2] = ["x-session-id", "x-user-id"];

/// The policies of a router.
#[derive(Debug, Clone)]
pub enum PolicySet {
    /// Regular mode: one pool.
    Single(Arc<dyn RoutingPolicy>),
    /// PD mode, `--policy` choosing pairs through `select_pair`.
    Joint(Arc<dyn RoutingPolicy>),
    /// PD mode, `--prefill-policy` / `--decode-policy`.
    PerPool {
        /// Prefill pool.
        prefill: Arc<dyn RoutingPolicy>,
        /// Decode pool.
        decode: Arc<dyn RoutingPolicy>,
    },
}

impl PolicySet {
    /// The distinct policies (one, or two when the pools have their own).
    pub fn distinct(&self) -> Vec<Arc<dyn RoutingPolicy>> {
        match self {
            PolicySet::Single(p) | PolicySet::Joint(p) => vec![p.clone()],
            PolicySet::PerPool { prefill, decode } if Arc::ptr_eq(prefill, decode) => vec![prefill.clone()],
            PolicySet::PerPool { prefill, decode } => vec![prefill.clone(), decode.clone()],
        }
    }

    /// The policy reported as the router's (the prefill pool's when split).
    pub fn primary(&self) -> &Arc<dyn RoutingPolicy> {
        match self {
            PolicySet::Single(p) | PolicySet::Joint(p) => p,
            PolicySet::PerPool { prefill, .. } => prefill,
        }
    }

    /// The policy that hears leg `leg`'s outcomes (0: the worker, or the prefill leg; 1: decode).
    pub(super) fn for_leg(&self, leg: usize) -> &Arc<dyn RoutingPolicy> {
        match self {
            PolicySet::PerPool { decode, .. } if leg == 1 => decode,
            _ => self.primary(),
        }
    }
}

/// How one attempt runs.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Whole requests to one worker.
    Regular,
    /// A prefill leg and a decode leg.
    Pd {
        /// KV-transfer protocol.
        style: PdStyle,
        /// The prefill leg's own timeout.
        prefill_timeout: Duration,
    },
}

/// Which role's workers a selection looks at.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Every worker (regular mode: all are regular).
    All,
    /// Prefill workers.
    Prefill,
    /// Decode workers.
    Decode,
}

/// Routes inference requests. Cheap to clone (one pointer).
#[derive(Debug, Clone)]
pub struct Dispatcher(pub(super) Arc<Inner>);

/// Builds a pool's policies: fresh ones for each model (so trees and learnt models never mix
/// models), or the same objects for every model (tests, tools).
pub type PolicyFactory = Arc<dyn Fn() -> PolicySet + Send + Sync>;

/// The workers serving one model, as policies see them: its policies, the observers its
/// guards report to, and its held requests.
#[derive(Debug)]
struct Pool {
    policies: PolicySet,
    /// One per leg (regular mode uses the first).
    observers: [Arc<PoolObserver>; 2],
    hold: Arc<HoldQueue>,
}

/// The pool of a fleet that serves one model (or whose models are unknown): any `model` a
/// request names goes to it, as with a single engine.
const SINGLE: &str = "";

pub(super) struct Inner {
    pub(super) registry: Arc<WorkerRegistry>,
    factory: PolicyFactory,
    /// By model; [`SINGLE`] always present.
    pools: std::sync::RwLock<std::collections::HashMap<String, Arc<Pool>>>,
    pub(super) upstream: Upstream,
    retry: RetryConfig,
    pub(super) metrics: Arc<Metrics>,
    pub(super) mode: Mode,
    /// Set once, before the first request ([`Dispatcher::with_limits`]); defaults until then.
    limits: std::sync::OnceLock<Limits>,
    #[cfg(feature = "tokenizer")]
    tokenizer: std::sync::OnceLock<Arc<crate::tokenize::PromptTokenizer>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").field("mode", &self.mode).finish_non_exhaustive()
    }
}

/// Time limits of a dispatcher's requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest gap between two chunks of a relayed stream.
    pub stream_idle: Duration,
    /// Longest a request may take from dispatch to the end of its answer.
    pub total: Option<Duration>,
    /// Continuations of a broken stream on another worker, per request (0: streams that
    /// break end with an error event).
    pub stream_failover_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { stream_idle: Duration::from_secs(300), total: None, stream_failover_max: 1 }
    }
}

/// What one attempt is given.
#[derive(Debug)]
pub(super) struct Attempt<'a> {
    pub route: &'static str,
    pub headers: &'a HeaderMap,
    pub body: &'a Bytes,
    pub view: &'a RequestView,
    /// No attempt or worker is left after this one: a worker's own error answer is relayed
    /// rather than retried.
    pub last_chance: bool,
    /// How long a relayed stream may go quiet, and when the request must be over.
    pub stream: StreamLimits,
}

/// Why an attempt failed, and what a retry must avoid.
#[derive(Debug)]
pub(super) struct Failure {
    pub error: ApiError,
    /// Workers to leave out of later attempts; empty = do not retry (nothing else would help,
    /// or part of the answer may already have reached the worker's side of the client).
    pub blame: Vec<Arc<Worker>>,
}

impl Failure {
    /// Retry elsewhere, without `blame`.
    pub fn retry(error: ApiError, blame: Vec<Arc<Worker>>) -> Self {
        Self { error, blame }
    }

    /// The request's final answer.
    pub fn fatal(error: ApiError) -> Self {
        Self { error, blame: Vec::new() }
    }
}

impl Dispatcher {
    /// A router over `registry` in `mode`, its policies (per model) told of membership changes.
    pub fn new(
        registry: Arc<WorkerRegistry>,
        factory: PolicyFactory,
        mode: Mode,
        upstream: Upstream,
        retry: RetryConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let inner = Arc::new(Inner {
            registry: registry.clone(),
            factory,
            pools: Default::default(),
            upstream,
            retry,
            metrics,
            mode,
            limits: std::sync::OnceLock::new(),
            #[cfg(feature = "tokenizer")]
            tokenizer: std::sync::OnceLock::new(),
        });
        inner.pool(SINGLE);
        let weak = Arc::downgrade(&inner);
        registry.subscribe(Arc::new(move |change| {
            if let Some(inner) = weak.upgrade() {
                for policy in inner.policies() {
                    policy.on_membership(change);
                }
            }
        }));
        Self(inner)
    }

    /// Tokenizes prompts with the model's tokenizer before routing (`--tokenizer-path`).
    #[cfg(feature = "tokenizer")]
    pub fn with_tokenizer(self, tokenizer: Arc<crate::tokenize::PromptTokenizer>) -> Self {
        if self.0.tokenizer.set(tokenizer).is_err() {
            tracing::warn!("dispatcher tokenizer was already set; keeping the first");
        }
        self
    }

    /// The tokenizer prompts are routed with, when there is one.
    #[cfg(feature = "tokenizer")]
    pub fn tokenizer(&self) -> Option<Arc<crate::tokenize::PromptTokenizer>> {
        self.0.tokenizer.get().cloned()
    }

    /// The same dispatcher with `limits` (the first limits given stay).
    pub fn with_limits(self, limits: Limits) -> Self {
        if self.0.limits.set(limits).is_err() {
            tracing::warn!("dispatcher limits were already set; keeping the first");
        }
        self
    }

    /// A regular-mode router with one policy object for every model.
    pub fn regular(
        registry: Arc<WorkerRegistry>,
        policy: Arc<dyn RoutingPolicy>,
        upstream: Upstream,
        retry: RetryConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let factory: PolicyFactory = Arc::new(move || PolicySet::Single(policy.clone()));
        Self::new(registry, factory, Mode::Regular, upstream, retry, metrics)
    }

    /// A PD-mode router with the same policies for every model.
    pub fn pd(
        registry: Arc<WorkerRegistry>,
        policies: PolicySet,
        style: PdStyle,
        prefill_timeout: Duration,
        upstream: Upstream,
        retry: RetryConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let factory: PolicyFactory = Arc::new(move || policies.clone());
        Self::new(registry, factory, Mode::Pd { style, prefill_timeout }, upstream, retry, metrics)
    }

    /// Every distinct policy object, over every model's pool.
    pub fn policies(&self) -> Vec<Arc<dyn RoutingPolicy>> {
        self.0.policies()
    }

    /// Each model's distinct policies (the single-model pool under `""`), by model.
    pub fn policies_by_model(&self) -> Vec<(String, Vec<Arc<dyn RoutingPolicy>>)> {
        let pools = self.0.pools.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, Vec<Arc<dyn RoutingPolicy>>)> =
            pools.iter().map(|(m, p)| (m.clone(), p.policies.distinct())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The policy reported as the router's (the single-model pool's).
    pub fn policy(&self) -> Arc<dyn RoutingPolicy> {
        self.0.pool(SINGLE).policies.primary().clone()
    }

    /// Requests held for capacity now, over every pool.
    pub fn held(&self) -> usize {
        self.0.pools.read().unwrap_or_else(|p| p.into_inner()).values().map(|p| p.hold.held()).sum()
    }

    /// Routes one inference request (`route` like `/v1/chat/completions`). A stream that
    /// breaks is continued elsewhere when it can be ([`failover`]).
    pub async fn route(
        &self,
        route: &'static str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, ApiError> {
        let limits = self.0.limits.get().copied().unwrap_or_default();
        let stream = StreamLimits { idle: limits.stream_idle, deadline: limits.total.map(|t| Instant::now() + t) };
        let response = self.dispatch(route, headers, body.clone(), Vec::new(), stream).await?;
        if limits.stream_failover_max == 0
            || !response.status().is_success()
            || !crate::proxy::is_event_stream_headers(response.headers())
        {
            return Ok(response);
        }
        let Some(api) = failover::continuable(route, &body) else { return Ok(response) };
        let ctx = failover::Continuations {
            dispatcher: self.clone(),
            route,
            headers: headers.clone(),
            body,
            limits: stream,
            left: limits.stream_failover_max,
            span: tracing::Span::current(),
        };
        Ok(failover::FailoverBody::wrap(response, api, ctx))
    }

    /// Routes one request once, leaving out `excluded` (a broken stream's workers), its
    /// streams under `stream`'s limits.
    pub(super) async fn dispatch(
        &self,
        route: &'static str,
        headers: &HeaderMap,
        body: Bytes,
        mut excluded: Vec<Arc<Worker>>,
        stream: StreamLimits,
    ) -> Result<Response<Body>, ApiError> {
        let inner = &self.0;
        let key = ROUTING_KEY_HEADERS.iter().find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()));
        let mut view = RequestView::parse(&body, key).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        #[cfg(feature = "tokenizer")]
        if let Some(tokenizer) = inner.tokenizer.get() {
            crate::tokenize::tokenize_view(tokenizer, route, &body, &mut view).await;
        }
        let (pool, model) = inner.pool_for(&view)?;
        let mut last_error = ApiError::NoHealthyWorkers;
        let attempts = inner.retry.max_attempts.max(1);
        let mut attempt = 0;
        while attempt < attempts {
            if attempt > 0 {
                inner.metrics.retry();
                tokio::time::sleep(inner.retry.backoff(attempt as u32, rand::random())).await;
            }
            let select = tracing::debug_span!(
                target: crate::telemetry::TARGET,
                "select",
                policy = pool.policies.primary().name(),
                attempt,
                workers = tracing::field::Empty,
                reason = tracing::field::Empty,
                matched_prefix = tracing::field::Empty,
                cached_tokens = tracing::field::Empty,
                predicted_ttft_ms = tracing::field::Empty,
                predicted_cost_ms = tracing::field::Empty,
                error = tracing::field::Empty,
            );
            let picked = pool.hold.select(&mut view, |v| inner.pick(&pool, model.as_deref(), v, &excluded));
            let legs = match picked.instrument(select.clone()).await {
                Ok(legs) => legs,
                Err(RoutingError::Shed { retry_after }) => {
                    select.record("error", "shed");
                    return Err(ApiError::Shed { retry_after_secs: retry_after.as_secs().max(1) });
                }
                Err(e) => {
                    select.record("error", tracing::field::display(&e));
                    break;
                }
            };
            record_selection(&select, &legs, &view);
            drop(select);
            let Some(guards) = inner.claim(&pool, &legs, &view, route, &mut excluded) else {
                continue; // a breaker refused (another probe got there first): choose again
            };
            tracing::debug!(
                workers = ?legs.iter().map(|(w, _)| w.url()).collect::<Vec<_>>(),
                policy = pool.policies.primary().name(),
                route,
                attempt,
                "routing decision"
            );
            let last_chance = attempt + 1 == attempts || !inner.has_alternative(&legs, &excluded);
            let a = Attempt { route, headers, body: &body, view: &view, last_chance, stream };
            let span = tracing::debug_span!(
                target: crate::telemetry::TARGET,
                "attempt",
                attempt,
                workers = %WorkerList(&legs),
                outcome = tracing::field::Empty,
            );
            let result = match inner.mode {
                Mode::Regular => regular::run(inner, guards, &a).instrument(span.clone()).await,
                Mode::Pd { style, prefill_timeout } => {
                    pd::run(self, guards, &a, style, prefill_timeout).instrument(span.clone()).await
                }
            };
            span.record(
                "outcome",
                match &result {
                    Ok(_) => "answered".to_owned(),
                    Err(f) if f.blame.is_empty() => format!("failed: {}", f.error),
                    Err(f) => format!("retrying elsewhere: {}", f.error),
                },
            );
            match result {
                Ok(mut response) => {
                    let served = legs.iter().map(|(w, _)| w.clone()).collect();
                    response.extensions_mut().insert(failover::ServedBy(served));
                    return Ok(response);
                }
                Err(Failure { error, blame }) if blame.is_empty() => return Err(error),
                Err(Failure { error, blame }) => {
                    tracing::warn!(
                        workers = ?blame.iter().map(|w| w.url()).collect::<Vec<_>>(),
                        error = %error,
                        attempt,
                        "attempt failed; retrying elsewhere"
                    );
                    last_error = error;
                    excluded.extend(blame);
                }
            }
            attempt += 1;
        }
        Err(last_error)
    }
}

/// The chosen workers' URLs, for spans.
struct WorkerList<'a>(&'a [(Arc<Worker>, Selection)]);

impl std::fmt::Display for WorkerList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (w, _)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(w.key())?;
        }
        Ok(())
    }
}

/// The selection span's attributes: the workers chosen and the policy's reasons.
fn record_selection(span: &tracing::Span, legs: &[(Arc<Worker>, Selection)], view: &RequestView) {
    if span.is_disabled() {
        return;
    }
    span.record("workers", tracing::field::display(WorkerList(legs)));
    if let Some((_, s)) = legs.first() {
        if let Some(reason) = s.reason {
            span.record("reason", reason);
        }
        if let Some(matched) = s.matched {
            span.record("matched_prefix", matched);
        }
        if let Some(uncached) = s.uncached_tokens {
            span.record("cached_tokens", view.prompt_tokens().saturating_sub(uncached));
        }
        if let Some(ttft) = s.predicted_ttft_ms {
            span.record("predicted_ttft_ms", ttft);
        }
        if let Some(cost) = s.predicted_cost_ms {
            span.record("predicted_cost_ms", cost);
        }
    }
}

impl Inner {
    /// The pool for `model`, created (with fresh policies) on first use.
    fn pool(&self, model: &str) -> Arc<Pool> {
        if let Some(p) = self.pools.read().unwrap_or_else(|p| p.into_inner()).get(model) {
            return p.clone();
        }
        let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
        pools
            .entry(model.to_owned())
            .or_insert_with(|| {
                let policies = (self.factory)();
                let hold = Arc::new(HoldQueue::default());
                let observer = |leg: usize| {
                    Arc::new(PoolObserver {
                        policy: policies.for_leg(leg).clone(),
                        metrics: self.metrics.clone(),
                        hold: hold.clone(),
                    })
                };
                let observers = [observer(0), observer(1)];
                Arc::new(Pool { policies, observers, hold })
            })
            .clone()
    }

    fn policies(&self) -> Vec<Arc<dyn RoutingPolicy>> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Arc<dyn RoutingPolicy>> = Vec::new();
        for p in pools.values().flat_map(|p| p.policies.distinct()) {
            if !out.iter().any(|q| Arc::ptr_eq(q, &p)) {
                out.push(p);
            }
        }
        out
    }

    /// The request's pool, and the model its workers must serve. A fleet of one model (or of
    /// workers whose models are unknown) takes any `model`, as a single engine does; a fleet
    /// of several needs the request to name one of them.
    fn pool_for(&self, view: &RequestView) -> Result<(Arc<Pool>, Option<String>), ApiError> {
        let models = self.registry.models();
        if models.len() <= 1 {
            return Ok((self.pool(SINGLE), None));
        }
        match &view.model {
            Some(m) if models.iter().any(|x| x == m) => Ok((self.pool(m), Some(m.clone()))),
            Some(m) => Err(ApiError::ModelNotFound { model: m.clone(), available: models.to_vec() }),
            None => Err(ApiError::BadRequest(format!(
                "the request names no model, and this router serves several: {}",
                models.join(", ")
            ))),
        }
    }

    /// The workers of a pool that may take a request now: routable (healthy, or in a pool in
    /// health panic), serving `model`, breaker letting one through, not excluded. Shares the
    /// registry's snapshot when nothing is filtered out.
    fn candidates(&self, pool: Role, model: Option<&str>, excluded: &[Arc<Worker>]) -> Arc<Vec<Arc<Worker>>> {
        let routable = self.registry.routable();
        let keep = |w: &Arc<Worker>| {
            w.breaker().allows()
                && !excluded.iter().any(|x| Arc::ptr_eq(x, w))
                && model.is_none_or(|m| w.serves(m))
                && matches!(
                    (pool, w.role()),
                    (Role::All, _) | (Role::Prefill, WorkerRole::Prefill { .. }) | (Role::Decode, WorkerRole::Decode)
                )
        };
        if routable.iter().all(keep) {
            return routable;
        }
        Arc::new(routable.iter().filter(|w| keep(w)).cloned().collect())
    }

    /// Asks the pool's policies for this attempt's worker(s): `[worker]` or `[prefill, decode]`.
    fn pick(
        &self,
        pool: &Pool,
        model: Option<&str>,
        view: &RequestView,
        excluded: &[Arc<Worker>],
    ) -> Result<Vec<(Arc<Worker>, Selection)>, RoutingError> {
        let chosen = |pool: &[Arc<Worker>], s: Selection| {
            pool.get(s.index).map(|w| (w.clone(), s)).ok_or(RoutingError::NoHealthyWorkers)
        };
        let both = || (self.candidates(Role::Prefill, model, excluded), self.candidates(Role::Decode, model, excluded));
        match &pool.policies {
            PolicySet::Single(p) => {
                let all = self.candidates(Role::All, model, excluded);
                Ok(vec![chosen(&all, p.select_single(&all, view)?)?])
            }
            PolicySet::Joint(p) => {
                let (pp, dp) = both();
                let (a, b) = p.select_pair(&pp, &dp, view)?;
                Ok(vec![chosen(&pp, a)?, chosen(&dp, b)?])
            }
            PolicySet::PerPool { prefill, decode } => {
                let (pp, dp) = both();
                let a = prefill.select_single(&pp, view)?;
                let b = decode.select_single(&dp, view)?;
                Ok(vec![chosen(&pp, a)?, chosen(&dp, b)?])
            }
        }
    }

    /// Claims each leg's breaker and takes its guard. A refusal (a probe already out) drops
    /// the guards taken so far — abandoned, so their claims return — and excludes the worker.
    fn claim(
        &self,
        pool: &Pool,
        legs: &[(Arc<Worker>, Selection)],
        view: &RequestView,
        route: &'static str,
        excluded: &mut Vec<Arc<Worker>>,
    ) -> Option<Vec<InFlightGuard>> {
        let mut guards = Vec::with_capacity(legs.len());
        for (leg, (worker, selection)) in legs.iter().enumerate() {
            let mut info = view.dispatch_info(selection, route);
            info.policy = pool.policies.for_leg(leg).name();
            let observer = pool.observers[leg.min(1)].clone();
            match InFlightGuard::claim(worker.clone(), info, Instant::now(), observer) {
                Some(g) => guards.push(g),
                None => {
                    excluded.push(worker.clone());
                    return None;
                }
            }
        }
        Some(guards)
    }

    /// Whether every leg could go to another worker if this attempt fails.
    fn has_alternative(&self, legs: &[(Arc<Worker>, Selection)], excluded: &[Arc<Worker>]) -> bool {
        let routable = self.registry.routable();
        legs.iter().all(|(current, _)| {
            routable.iter().any(|w| {
                !Arc::ptr_eq(w, current)
                    && std::mem::discriminant(&w.role()) == std::mem::discriminant(&current.role())
                    && w.breaker().allows()
                    && !excluded.iter().any(|x| Arc::ptr_eq(x, w))
            })
        })
    }
}
