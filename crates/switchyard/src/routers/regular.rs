//! Regular mode: each request goes whole to one worker.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use bytes::Bytes;
use tokio::time::Instant;

use crate::config::RetryConfig;
use crate::error::ApiError;
use crate::load::{InFlightGuard, Usage};
use crate::metrics::Metrics;
use crate::policies::{RoutingError, RoutingPolicy};
use crate::proxy::{forward_headers, ObservedBody, SendError, StreamObserver, Upstream};
use crate::workers::{Worker, WorkerRegistry};

/// Routes whole requests to workers of one pool.
#[derive(Debug, Clone)]
pub struct RegularRouter {
    registry: Arc<WorkerRegistry>,
    policy: Arc<dyn RoutingPolicy>,
    upstream: Upstream,
    retry: RetryConfig,
    metrics: Arc<Metrics>,
}

/// Statuses that mean "this worker can't serve it now; another may" (and count against
/// the worker's circuit breaker). Other 4xx are the client's and pass through untouched.
pub fn is_worker_failure(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS
}

/// [`is_worker_failure`] for a raw status code (an invalid code counts as a failure).
pub(crate) fn is_worker_failure_code(code: u16) -> bool {
    StatusCode::from_u16(code).map_or(true, is_worker_failure)
}

impl RegularRouter {
    /// A router over `registry`'s available workers using `policy`, retrying per `retry`.
    pub fn new(
        registry: Arc<WorkerRegistry>,
        policy: Arc<dyn RoutingPolicy>,
        upstream: Upstream,
        retry: RetryConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { registry, policy, upstream, retry, metrics }
    }

    /// The policy in use.
    pub fn policy(&self) -> &Arc<dyn RoutingPolicy> {
        &self.policy
    }

    /// Healthy workers whose circuit lets a request through, minus those already tried.
    fn candidates(&self, tried: &[Arc<Worker>]) -> Arc<Vec<Arc<Worker>>> {
        let healthy = self.registry.healthy();
        if tried.is_empty() && healthy.iter().all(|w| w.breaker().allows()) {
            return healthy;
        }
        Arc::new(
            healthy
                .iter()
                .filter(|w| w.breaker().allows() && !tried.iter().any(|t| Arc::ptr_eq(t, w)))
                .cloned()
                .collect(),
        )
    }

    /// Whether a worker other than `current` and those tried could take a retry.
    fn has_alternative(&self, tried: &[Arc<Worker>], current: &Arc<Worker>) -> bool {
        self.registry
            .healthy()
            .iter()
            .any(|w| !Arc::ptr_eq(w, current) && w.breaker().allows() && !tried.iter().any(|t| Arc::ptr_eq(t, w)))
    }

    /// Routes one inference request (`path` like `/v1/chat/completions`).
    ///
    /// Failed attempts (connection refused, broken before the headers, a worker-failure
    /// status) are retried on another worker with backoff while nothing has reached the
    /// client; a worker-failure response is relayed as is when no attempt or worker is left.
    pub async fn route(
        &self,
        route: &'static str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, ApiError> {
        let path = route;
        let mut view = super::parse_view(headers, &body)?;
        let mut tried: Vec<Arc<Worker>> = Vec::new();
        let mut last_error = ApiError::NoHealthyWorkers;
        let attempts = self.retry.max_attempts.max(1);
        for attempt in 0..attempts {
            if attempt > 0 {
                self.metrics.retry();
                let unit: f64 = rand::random();
                tokio::time::sleep(self.retry.backoff(attempt as u32, unit)).await;
            }
            let selected = super::select_holding(&mut view, |view| {
                let pool = self.candidates(&tried);
                self.policy.select_single(&pool, view).map(|i| pool[i].clone())
            })
            .await;
            let worker = match selected {
                Ok(worker) => worker,
                Err(RoutingError::Shed { retry_after }) => {
                    return Err(ApiError::Shed { retry_after_secs: retry_after.as_secs().max(1) });
                }
                Err(_) => break,
            };
            if !worker.breaker().on_dispatch() {
                tried.push(worker);
                continue;
            }
            // Taken at selection time, so concurrent selections see this request.
            let guard = InFlightGuard::dispatch(worker.clone(), view.dispatch_info(), Instant::now());
            tracing::debug!(worker = worker.url(), policy = self.policy.name(), path, attempt, "routing decision");
            let last_attempt = attempt + 1 == attempts;
            match self.upstream.send(Method::POST, worker.url(), path, headers, body.clone()).await {
                Ok(resp)
                    if is_worker_failure(resp.status()) && !last_attempt && self.has_alternative(&tried, &worker) =>
                {
                    tracing::warn!(
                        worker = worker.url(),
                        status = resp.status().as_u16(),
                        attempt,
                        "worker failed; retrying elsewhere"
                    );
                    last_error =
                        ApiError::WorkerFailed { worker: worker.url().to_owned(), status: resp.status().as_u16() };
                    self.policy.on_request_complete(&guard.complete(false));
                    tried.push(worker);
                }
                Ok(resp) if is_event_stream(&resp) => {
                    let observer = StreamObserver { policy: self.policy.clone(), metrics: self.metrics.clone(), route };
                    let mut out = relay_stream(resp, guard, observer);
                    out.extensions_mut().insert(RoutedTo(worker));
                    return Ok(out);
                }
                Ok(resp) => {
                    // A whole (non-streamed) answer is read before anything is sent, so a worker
                    // that breaks it mid-body is one more failed attempt, not a broken response.
                    let (parts, incoming) = resp.into_parts();
                    match self.upstream.read_whole(incoming).await {
                        Ok(collected) => {
                            let mut guard = guard;
                            guard.mark_first_byte();
                            let mut usage = Usage::default();
                            usage.scan(&collected);
                            let ok = !is_worker_failure(parts.status);
                            self.policy.on_request_complete(&guard.complete_at(ok, usage, Instant::now()));
                            let mut out = buffered(parts, collected);
                            out.extensions_mut().insert(RoutedTo(worker));
                            return Ok(out);
                        }
                        Err(SendError::Timeout) => {
                            self.policy.on_request_complete(&guard.complete(false));
                            return Err(ApiError::Timeout {
                                worker: worker.url().to_owned(),
                                secs: self.upstream.timeout.as_secs_f64(),
                            });
                        }
                        Err(e) => {
                            tracing::warn!(worker = worker.url(), error = %e, attempt, "response body broke; retrying elsewhere");
                            self.policy.on_request_complete(&guard.complete(false));
                            last_error = ApiError::WorkerUnreachable {
                                worker: worker.url().to_owned(),
                                reason: format!("the response body broke: {e}"),
                            };
                            tried.push(worker);
                        }
                    }
                }
                Err(SendError::Timeout) => {
                    self.policy.on_request_complete(&guard.complete(false));
                    return Err(ApiError::Timeout {
                        worker: worker.url().to_owned(),
                        secs: self.upstream.timeout.as_secs_f64(),
                    });
                }
                Err(e) => {
                    tracing::warn!(worker = worker.url(), error = %e, attempt, "attempt failed before any response; retrying elsewhere");
                    self.policy.on_request_complete(&guard.complete(false));
                    last_error = ApiError::WorkerUnreachable { worker: worker.url().to_owned(), reason: e.to_string() };
                    tried.push(worker);
                }
            }
        }
        Err(last_error)
    }
}

pub(crate) fn is_event_stream(resp: &hyper::Response<hyper::body::Incoming>) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// A complete worker answer as the client's response.
pub(crate) fn buffered(parts: hyper::http::response::Parts, body: Bytes) -> Response<Body> {
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = parts.status;
    forward_headers(&parts.headers, out.headers_mut());
    out
}

/// Turns a worker's SSE response into the client's, body observed and guard attached.
pub(crate) fn relay_stream(
    resp: hyper::Response<hyper::body::Incoming>,
    guard: InFlightGuard,
    observer: StreamObserver,
) -> Response<Body> {
    let (parts, incoming) = resp.into_parts();
    let error_status = is_worker_failure(parts.status);
    let body = ObservedBody::new(incoming, guard, observer, parts.status.as_u16(), error_status);
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = parts.status;
    forward_headers(&parts.headers, out.headers_mut());
    // Ask intermediaries (nginx in front of us) not to buffer the stream.
    out.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    out.extensions_mut().insert(Observed);
    out
}

/// Response extension: the worker that answered.
#[derive(Debug, Clone)]
pub struct RoutedTo(pub Arc<Worker>);

/// Response extension: the body records its own metrics when it ends (streams).
#[derive(Debug, Clone, Copy)]
pub struct Observed;
