//! The body of a streamed (SSE) response relayed to the client, observed on the way.
//!
//! It owns the request's [`InFlightGuard`], so the worker's in-flight count drops exactly
//! when the stream ends — finished, failed, or dropped because the client went away (axum
//! drops the body, which drops the upstream connection and so cancels the work there).
//! The first data frame marks time to first token; SSE events are counted for time per
//! output token. If the worker breaks the stream, the client gets a final
//! `data: {"error": ...}` event instead of a silent truncation.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use tokio::time::Instant;

use crate::load::{InFlightGuard, Usage};
use crate::metrics::Metrics;
use crate::policies::RoutingPolicy;

/// Where a stream's observations go.
#[derive(Debug, Clone)]
pub struct StreamObserver {
    /// Told about the finished request.
    pub policy: Arc<dyn RoutingPolicy>,
    /// Request, TTFT and TPOT metrics.
    pub metrics: Arc<Metrics>,
    /// Route label.
    pub route: &'static str,
}

/// A worker's SSE response body with its guard.
pub struct ObservedBody {
    inner: Incoming,
    guard: Option<InFlightGuard>,
    observer: StreamObserver,
    status: u16,
    /// Whether the worker answered with a worker-failure status.
    error_status: bool,
    /// SSE `data:` events seen (≈ output tokens for token-per-event engines).
    events: u32,
    /// Token counts from `usage` / `meta_info` in the events.
    usage: Usage,
    done: bool,
}

impl ObservedBody {
    /// Wraps `inner`, a stream answered with `status`.
    pub fn new(
        inner: Incoming,
        guard: InFlightGuard,
        observer: StreamObserver,
        status: u16,
        error_status: bool,
    ) -> Self {
        Self {
            inner,
            guard: Some(guard),
            observer,
            status,
            error_status,
            events: 0,
            usage: Usage::default(),
            done: false,
        }
    }

    fn finish(&mut self, success: bool) {
        if let Some(guard) = self.guard.take() {
            if self.usage.completion_tokens.is_none() {
                // No usage in the stream: one event per token, less `[DONE]`.
                self.usage.completion_tokens = Some(self.events.saturating_sub(1));
            }
            let outcome = guard.complete_at(success, self.usage, Instant::now());
            let o = &self.observer;
            o.metrics.request(o.route, self.status, outcome.worker.url(), outcome.latency);
            // Events beyond the first, over the time after it; `[DONE]` and a usage event
            // are included, a small bias toward shorter TPOT on short streams.
            let tpot = outcome
                .time_to_first_byte
                .filter(|_| self.events > 2)
                .map(|ttft| (outcome.latency.saturating_sub(ttft)) / (self.events - 1).max(1));
            o.metrics.token_timing(
                outcome.worker.url(),
                outcome.time_to_first_byte,
                tpot.filter(|t| *t > Duration::ZERO),
            );
            o.policy.on_request_complete(&outcome);
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
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref().filter(|d| !d.is_empty()) {
                    self.events += count_events(d);
                    let mut usage = self.usage;
                    usage.scan(d);
                    self.usage = usage;
                    if let Some(first) = self.guard.as_mut().and_then(|g| g.first_token_at(Instant::now())) {
                        self.observer.policy.on_first_token(&first);
                    }
                }
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
                tracing::warn!(%worker, error = %e, "worker broke the stream");
                self.status = 502;
                self.finish(false);
                Poll::Ready(Some(Ok(Frame::data(stream_error_event(&worker, &e.to_string())))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
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
