//! The attempt loop: select (with holding) → claim each leg's breaker and take its guard →
//! run one attempt (one leg or two) → classify → back off and retry elsewhere, while nothing
//! has reached the client.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Response};
use bytes::Bytes;
use tokio::time::Instant;

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
    fn for_leg(&self, leg: usize) -> &Arc<dyn RoutingPolicy> {
        match self {
            PolicySet::PerPool { decode, .. } if leg == 1 => decode,
            _ => self.primary(),
        }
    }
}

/// How one attempt runs.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mode {
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

/// Which workers a selection looks at.
#[derive(Debug, Clone, Copy)]
enum Pool {
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

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) registry: Arc<WorkerRegistry>,
    pub(super) policies: PolicySet,
    /// One per leg (regular mode uses the first).
    observers: [Arc<PoolObserver>; 2],
    pub(super) upstream: Upstream,
    retry: RetryConfig,
    pub(super) metrics: Arc<Metrics>,
    hold: Arc<HoldQueue>,
    pub(super) mode: Mode,
    limits: Limits,
}

/// Time limits of a dispatcher's requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest gap between two chunks of a relayed stream.
    pub stream_idle: Duration,
    /// Longest a request may take from dispatch to the end of its answer.
    pub total: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self { stream_idle: Duration::from_secs(300), total: None }
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
    /// A router over `registry` in `mode`, subscribing its policies to membership changes.
    fn new(
        registry: Arc<WorkerRegistry>,
        policies: PolicySet,
        mode: Mode,
        upstream: Upstream,
        retry: RetryConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        for policy in policies.distinct() {
            registry.subscribe(Arc::new(move |change| policy.on_membership(change)));
        }
        let hold = Arc::new(HoldQueue::default());
        let observer = |leg: usize| {
            Arc::new(PoolObserver {
                policy: policies.for_leg(leg).clone(),
                metrics: metrics.clone(),
                hold: hold.clone(),
            })
        };
        let observers = [observer(0), observer(1)];
        let limits = Limits::default();
        Self(Arc::new(Inner { registry, policies, observers, upstream, retry, metrics, hold, mode, limits }))
    }

    /// The same dispatcher with `limits` (only while it is not yet shared).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.limits = limits;
        }
        self
    }

    /// A regular-mode router.
    pub fn regular(
        registry: Arc<WorkerRegistry>,
        policy: Arc<dyn RoutingPolicy>,
        upstream: Upstream,
        retry: RetryConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::new(registry, PolicySet::Single(policy), Mode::Regular, upstream, retry, metrics)
    }

    /// A PD-mode router.
    pub fn pd(
        registry: Arc<WorkerRegistry>,
        policies: PolicySet,
        style: PdStyle,
        prefill_timeout: Duration,
        upstream: Upstream,
        retry: RetryConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::new(registry, policies, Mode::Pd { style, prefill_timeout }, upstream, retry, metrics)
    }

    /// The policies.
    pub fn policies(&self) -> &PolicySet {
        &self.0.policies
    }

    /// The policy reported as the router's.
    pub fn policy(&self) -> &Arc<dyn RoutingPolicy> {
        self.0.policies.primary()
    }

    /// Requests held for capacity now.
    pub fn held(&self) -> usize {
        self.0.hold.held()
    }

    /// Routes one inference request (`route` like `/v1/chat/completions`).
    pub async fn route(
        &self,
        route: &'static str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, ApiError> {
        let inner = &self.0;
        let stream =
            StreamLimits { idle: inner.limits.stream_idle, deadline: inner.limits.total.map(|t| Instant::now() + t) };
        let key = ROUTING_KEY_HEADERS.iter().find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()));
        let mut view = RequestView::parse(&body, key).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut excluded: Vec<Arc<Worker>> = Vec::new();
        let mut last_error = ApiError::NoHealthyWorkers;
        let attempts = inner.retry.max_attempts.max(1);
        let mut attempt = 0;
        while attempt < attempts {
            if attempt > 0 {
                inner.metrics.retry();
                tokio::time::sleep(inner.retry.backoff(attempt as u32, rand::random())).await;
            }
            let legs = match inner.hold.select(&mut view, |v| inner.pick(v, &excluded)).await {
                Ok(legs) => legs,
                Err(RoutingError::Shed { retry_after }) => {
                    return Err(ApiError::Shed { retry_after_secs: retry_after.as_secs().max(1) })
                }
                Err(_) => break,
            };
            let Some(guards) = inner.claim(&legs, &view, route, &mut excluded) else {
                continue; // a breaker refused (another probe got there first): choose again
            };
            tracing::debug!(
                workers = ?legs.iter().map(|(w, _)| w.url()).collect::<Vec<_>>(),
                policy = inner.policies.primary().name(),
                route,
                attempt,
                "routing decision"
            );
            let last_chance = attempt + 1 == attempts || !inner.has_alternative(&legs, &excluded);
            let a = Attempt { route, headers, body: &body, view: &view, last_chance, stream };
            let result = match inner.mode {
                Mode::Regular => regular::run(inner, guards, &a).await,
                Mode::Pd { style, prefill_timeout } => pd::run(self, guards, &a, style, prefill_timeout).await,
            };
            match result {
                Ok(response) => return Ok(response),
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

impl Inner {
    /// The workers of a pool that may take a request now: healthy, breaker letting one
    /// through, not excluded. Shares the registry's snapshot when nothing is filtered out.
    fn pool(&self, pool: Pool, excluded: &[Arc<Worker>]) -> Arc<Vec<Arc<Worker>>> {
        let healthy = self.registry.healthy();
        let keep = |w: &Arc<Worker>| {
            w.breaker().allows()
                && !excluded.iter().any(|x| Arc::ptr_eq(x, w))
                && matches!(
                    (pool, w.role()),
                    (Pool::All, _) | (Pool::Prefill, WorkerRole::Prefill { .. }) | (Pool::Decode, WorkerRole::Decode)
                )
        };
        if healthy.iter().all(keep) {
            return healthy;
        }
        Arc::new(healthy.iter().filter(|w| keep(w)).cloned().collect())
    }

    /// Asks the policies for this attempt's worker(s): `[worker]` or `[prefill, decode]`.
    fn pick(
        &self,
        view: &RequestView,
        excluded: &[Arc<Worker>],
    ) -> Result<Vec<(Arc<Worker>, Selection)>, RoutingError> {
        let chosen = |pool: &[Arc<Worker>], s: Selection| {
            pool.get(s.index).map(|w| (w.clone(), s)).ok_or(RoutingError::NoHealthyWorkers)
        };
        match &self.policies {
            PolicySet::Single(p) => {
                let pool = self.pool(Pool::All, excluded);
                Ok(vec![chosen(&pool, p.select_single(&pool, view)?)?])
            }
            PolicySet::Joint(p) => {
                let (pp, dp) = (self.pool(Pool::Prefill, excluded), self.pool(Pool::Decode, excluded));
                let (a, b) = p.select_pair(&pp, &dp, view)?;
                Ok(vec![chosen(&pp, a)?, chosen(&dp, b)?])
            }
            PolicySet::PerPool { prefill, decode } => {
                let (pp, dp) = (self.pool(Pool::Prefill, excluded), self.pool(Pool::Decode, excluded));
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
        legs: &[(Arc<Worker>, Selection)],
        view: &RequestView,
        route: &'static str,
        excluded: &mut Vec<Arc<Worker>>,
    ) -> Option<Vec<InFlightGuard>> {
        let mut guards = Vec::with_capacity(legs.len());
        for (leg, (worker, selection)) in legs.iter().enumerate() {
            let info = view.dispatch_info(selection, route);
            let observer = self.observers[leg.min(1)].clone();
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
        let healthy = self.registry.healthy();
        legs.iter().all(|(current, _)| {
            healthy.iter().any(|w| {
                !Arc::ptr_eq(w, current)
                    && std::mem::discriminant(&w.role()) == std::mem::discriminant(&current.role())
                    && w.breaker().allows()
                    && !excluded.iter().any(|x| Arc::ptr_eq(x, w))
            })
        })
    }
}
