//! The response body relayed to the client, observed on the way.
//!
//! It owns the request's [`InFlightGuard`], so the worker's in-flight count drops exactly
//! when the stream ends — finished, failed, or dropped because the client went away (axum
//! drops the body, which drops the upstream connection and so cancels the work there).
//! The first data frame marks time to first byte. If the worker breaks an SSE stream,
//! the client gets a final `data: {"error": ...}` event instead of a silent truncation.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::load::InFlightGuard;
use crate::policies::RoutingPolicy;

/// A worker's response body with its guard.
pub struct ObservedBody {
    inner: Incoming,
    guard: Option<InFlightGuard>,
    policy: Arc<dyn RoutingPolicy>,
    sse: bool,
    /// Whether the worker answered with an error status (counts as a failed request).
    error_status: bool,
    done: bool,
}

impl ObservedBody {
    /// Wraps `inner`; `sse` selects the error-event behaviour for broken streams.
    pub fn new(
        inner: Incoming,
        guard: InFlightGuard,
        policy: Arc<dyn RoutingPolicy>,
        sse: bool,
        error_status: bool,
    ) -> Self {
        Self { inner, guard: Some(guard), policy, sse, error_status, done: false }
    }

    fn finish(&mut self, success: bool) {
        if let Some(guard) = self.guard.take() {
            let outcome = guard.complete(success);
            self.policy.on_request_complete(&outcome);
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

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if frame.data_ref().is_some_and(|d| !d.is_empty()) {
                    if let Some(g) = self.guard.as_mut() {
                        g.mark_first_byte();
                    }
                }
                // A server writing a sized body stops polling once it has every byte, so
                // the end must be noticed here rather than from a final `None`.
                if self.inner.is_end_stream() {
                    self.done = true;
                    let success = !self.error_status;
                    self.finish(success);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.done = true;
                let success = !self.error_status;
                self.finish(success);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                let worker = self.guard.as_ref().map(|g| g.worker().url().to_owned()).unwrap_or_default();
                tracing::warn!(%worker, error = %e, "worker response broke mid-body");
                self.finish(false);
                if self.sse {
                    Poll::Ready(Some(Ok(Frame::data(stream_error_event(&worker, &e.to_string())))))
                } else {
                    Poll::Ready(Some(Err(e)))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}
