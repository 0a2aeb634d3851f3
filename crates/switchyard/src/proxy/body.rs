//! The body of a streamed (SSE) response relayed to the client, observed on the way.
//!
//! It owns the request's [`InFlightGuard`] and nothing else: the guard reports the end —
//! finished, failed, or dropped because the client went away (axum drops the body, which
//! drops the upstream connection and so cancels the work there) — to whoever registered on
//! it. The first data frame marks time to first token; SSE events are counted as output
//! tokens when the stream carries no usage. If the worker breaks the stream, the client gets
//! a final `data: {"error": ...}` event instead of a silent truncation.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{header, HeaderValue, Response};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::client::forward_headers;
use crate::load::{Ending, InFlightGuard, Usage};

/// Whether a worker's answer is an SSE stream.
pub fn is_event_stream(resp: &hyper::Response<Incoming>) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// A complete worker answer as the client's response.
pub fn buffered(parts: hyper::http::response::Parts, body: Bytes) -> Response<axum::body::Body> {
    let mut out = Response::new(axum::body::Body::from(body));
    *out.status_mut() = parts.status;
    forward_headers(&parts.headers, out.headers_mut());
    out
}

/// Turns a worker's SSE response into the client's, its guard inside the body.
pub fn relay_stream(resp: hyper::Response<Incoming>, mut guard: InFlightGuard) -> Response<axum::body::Body> {
    let (parts, incoming) = resp.into_parts();
    guard.relay(parts.status.as_u16());
    let failed_status = super::is_worker_failure(parts.status);
    let body = ObservedBody { inner: incoming, guard: Some(guard), failed_status, events: 0, usage: Usage::default() };
    let mut out = Response::new(axum::body::Body::new(body));
    *out.status_mut() = parts.status;
    forward_headers(&parts.headers, out.headers_mut());
    // Ask intermediaries (nginx in front of us) not to buffer the stream.
    out.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    out
}

/// A worker's SSE response body with its guard.
pub struct ObservedBody {
    inner: Incoming,
    /// Present until the stream ends; dropped unfinished (client gone) it reports abandoned.
    guard: Option<InFlightGuard>,
    /// Whether the worker answered with a worker-failure status.
    failed_status: bool,
    /// SSE `data:` events seen (≈ output tokens for token-per-event engines).
    events: u32,
    /// Token counts from `usage` / `meta_info` in the events.
    usage: Usage,
}

impl ObservedBody {
    fn finish(&mut self, ending: Ending) {
        if let Some(guard) = self.guard.take() {
            if self.usage.completion_tokens.is_none() {
                // No usage in the stream: one event per token, less `[DONE]`.
                self.usage.completion_tokens = Some(self.events.saturating_sub(1));
            }
            guard.finish(ending, self.usage);
        }
    }
}

fn stream_error_event(worker: &str, reason: &str) -> Bytes {
    let body = serde_json::json!({"error": {
        "message": format!("worker {worker} ended the stream early: {reason}"),
        "type": "bad_gateway", "code": 502,
    }});
    Bytes::from(format!("data: {body}\n\n"))
}

fn count_events(data: &[u8]) -> u32 {
    data.windows(5).filter(|w| w == b"data:").count() as u32
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.guard.is_none() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref().filter(|d| !d.is_empty()) {
                    self.events += count_events(d);
                    self.usage.scan(d);
                    if let Some(g) = self.guard.as_mut() {
                        g.first_token_at(Instant::now());
                    }
                }
                if self.inner.is_end_stream() {
                    let ending = Ending::from_success(!self.failed_status);
                    self.finish(ending);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                let ending = Ending::from_success(!self.failed_status);
                self.finish(ending);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let worker = self.guard.as_ref().map(|g| g.worker().url().to_owned()).unwrap_or_default();
                tracing::warn!(%worker, error = %e, "worker broke the stream");
                self.finish(Ending::Failed);
                Poll::Ready(Some(Ok(Frame::data(stream_error_event(&worker, &e.to_string())))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.guard.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_sse_events() {
        assert_eq!(super::count_events(b"data: {}\n\ndata: {}\n\ndata: [DONE]\n\n"), 3);
        assert_eq!(super::count_events(b"dat"), 0);
    }
}
