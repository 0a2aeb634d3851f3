//! Regular mode: each request goes whole to one worker.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Response};
use bytes::Bytes;

use crate::error::ApiError;
use crate::load::InFlightGuard;
use crate::policies::RoutingPolicy;
use crate::proxy::{forward_headers, ObservedBody, SendError, Upstream};
use crate::request::RequestView;
use crate::workers::{Worker, WorkerRegistry};

/// Headers that carry a session affinity key, in order of preference.
const ROUTING_KEY_HEADERS: [&str; 2] = ["x-session-id", "x-user-id"];

/// Routes whole requests to workers of one pool.
#[derive(Debug, Clone)]
pub struct RegularRouter {
    registry: Arc<WorkerRegistry>,
    policy: Arc<dyn RoutingPolicy>,
    upstream: Upstream,
    max_attempts: usize,
}

impl RegularRouter {
    /// A router over `registry`'s healthy workers using `policy`. `max_attempts` bounds how
    /// many distinct workers are tried when connections fail (nothing sent yet, so safe).
    pub fn new(
        registry: Arc<WorkerRegistry>,
        policy: Arc<dyn RoutingPolicy>,
        upstream: Upstream,
        max_attempts: usize,
    ) -> Self {
        Self {
            registry,
            policy,
            upstream,
            max_attempts: max_attempts.max(1),
        }
    }

    /// The policy in use.
    pub fn policy(&self) -> &Arc<dyn RoutingPolicy> {
        &self.policy
    }

    /// Routes one inference request (`path` like `/v1/chat/completions`).
    pub async fn route(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, ApiError> {
        let key = ROUTING_KEY_HEADERS
            .iter()
            .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()));
        let view =
            RequestView::parse(&body, key).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut tried: Vec<Arc<Worker>> = Vec::new();
        let mut last_error = ApiError::NoHealthyWorkers;
        for _ in 0..self.max_attempts {
            let healthy = self.registry.healthy();
            let candidates: Vec<Arc<Worker>>;
            let pool: &[Arc<Worker>] = if tried.is_empty() {
                &healthy
            } else {
                candidates = healthy
                    .iter()
                    .filter(|w| !tried.iter().any(|t| Arc::ptr_eq(t, w)))
                    .cloned()
                    .collect();
                &candidates
            };
            let Ok(index) = self.policy.select_single(pool, &view) else {
                break;
            };
            let worker = pool[index].clone();
            // Taken at selection time, so concurrent selections see this request.
            let guard = InFlightGuard::new(worker.clone());
            tracing::debug!(
                worker = worker.url(),
                policy = self.policy.name(),
                path,
                "routing decision"
            );
            match self
                .upstream
                .send(Method::POST, worker.url(), path, headers, body.clone())
                .await
            {
                Ok(resp) => return Ok(relay(resp, guard, self.policy.clone())),
                Err(SendError::Connect(reason)) => {
                    tracing::warn!(worker = worker.url(), %reason, "connect failed; trying another worker");
                    self.policy.on_request_complete(&guard.complete(false));
                    last_error = ApiError::WorkerUnreachable {
                        worker: worker.url().to_owned(),
                        reason,
                    };
                    tried.push(worker);
                }
                Err(SendError::Timeout) => {
                    self.policy.on_request_complete(&guard.complete(false));
                    return Err(ApiError::Timeout {
                        worker: worker.url().to_owned(),
                        secs: self.upstream.timeout.as_secs_f64(),
                    });
                }
                Err(e) => {
                    self.policy.on_request_complete(&guard.complete(false));
                    return Err(ApiError::WorkerUnreachable {
                        worker: worker.url().to_owned(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        Err(last_error)
    }
}

/// Turns a worker's response into the client's, body observed and guard attached.
fn relay(
    resp: hyper::Response<hyper::body::Incoming>,
    guard: InFlightGuard,
    policy: Arc<dyn RoutingPolicy>,
) -> Response<Body> {
    let (parts, incoming) = resp.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let error_status = parts.status.is_server_error();
    let body = ObservedBody::new(incoming, guard, policy, sse, error_status);
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = parts.status;
    forward_headers(&parts.headers, out.headers_mut());
    if sse {
        // Ask intermediaries (nginx in front of us) not to buffer the stream.
        out.headers_mut()
            .insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    out
}
