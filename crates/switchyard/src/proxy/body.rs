//! The body of a streamed (SSE) response relayed to the client, observed on the way.
//!
//! It owns the request's [`InFlightGuard`] and nothing else: the guard reports the end —
//! finished, failed, or dropped because the client went away (axum drops the body, which
//! drops the upstream connection and so cancels the work there) — to whoever registered on
//! it. The first data frame marks time to first token; SSE events are counted as output
//! tokens when the stream carries no usage. If the worker breaks the stream, the client gets
//! a final `data: {"error": ...}` event instead of a silent truncation.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{header, HeaderValue, Response};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::client::forward_headers;
use crate::load::{Ending, InFlightGuard, Usage};

/// Whether a worker's answer is an SSE stream.
pub fn is_event_stream(resp: &hyper::Response<Incoming>) -> bool {
    is_event_stream_headers(resp.headers())
}

/// Whether response headers announce an SSE stream.
pub fn is_event_stream_headers(headers: &axum::http::HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Whether a whole answer with `status` is complete: a success must parse as JSON (a worker that
/// closes a length-less answer early, or sends garbage, is a failure, not a 200 with a cut body).
pub fn check_whole(status: axum::http::StatusCode, body: &[u8]) -> Result<(), String> {
    if !status.is_success() {
        return Ok(());
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map(|_| ())
        .map_err(|e| format!("the answer is not complete JSON ({e})"))
}

/// A complete worker answer as the client's response.
pub fn buffered(parts: hyper::http::response::Parts, body: Bytes) -> Response<axum::body::Body> {
    let mut out = Response::new(axum::body::Body::from(body));
    *out.status_mut() = parts.status;
    forward_headers(&parts.headers, out.headers_mut());
    out
}

/// How long a relayed stream may go quiet, and when it must be over.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Longest gap between two chunks from the worker.
    pub idle: Duration,
    /// When the whole answer must have ended, if ever.
    pub deadline: Option<Instant>,
}

/// Turns a worker's SSE response into the client's, its guard inside the body.
pub fn relay_stream(
    resp: hyper::Response<Incoming>,
    mut guard: InFlightGuard,
    limits: StreamLimits,
) -> Response<axum::body::Body> {
    let (parts, incoming) = resp.into_parts();
    guard.relay(parts.status.as_u16());
    let failed_status = super::is_worker_failure(parts.status);
    let first = Instant::now() + limits.idle;
    let body = ObservedBody {
        inner: incoming,
        guard: Some(guard),
        failed_status,
        error_event: false,
        events: 0,
        usage: Usage::default(),
        tail: Vec::new(),
        limits,
        _span: tracing::Span::current(),
        timer: Box::pin(tokio::time::sleep_until(limits.deadline.map_or(first, |d| d.min(first)))),
    };
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
    /// Whether the worker sent an error event (it gave up on the request mid-stream).
    error_event: bool,
    /// SSE `data:` events seen (≈ output tokens for token-per-event engines).
    events: u32,
    /// Token counts from `usage` / `meta_info` in the events.
    usage: Usage,
    /// The stream's last bytes, to see whether it ended with its terminal event.
    tail: Vec<u8>,
    limits: StreamLimits,
    /// The attempt's span: open (and in a trace, not yet ended) until the stream is over.
    _span: tracing::Span,
    /// Fires when the worker has been quiet too long, or the request's time is up.
    timer: Pin<Box<Sleep>>,
}

/// Bytes of a stream's end kept to find its terminal event.
const TAIL: usize = 32;

/// Whether a stream's last bytes are its terminal event (`data: [DONE]`, as OpenAI, vLLM and
/// SGLang all end their streams).
fn ends_with_done(tail: &[u8]) -> bool {
    let end = tail.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    let tail = &tail[..end];
    tail.ends_with(b"data: [DONE]") || tail.ends_with(b"data:[DONE]")
}

impl ObservedBody {
    /// The worker broke the stream: the guard ends failed and the client gets a final error
    /// event instead of a silent truncation.
    fn fail(&mut self, reason: &str) -> Frame<Bytes> {
        let worker = self.guard.as_ref().map(|g| g.worker().url().to_owned()).unwrap_or_default();
        tracing::warn!(%worker, reason, "worker broke the stream");
        self.finish(Ending::Failed);
        Frame::data(stream_error_event(&worker, reason))
    }

    /// The last frame arrived with the end of the stream: pass it on, judged like an end.
    fn end(&mut self, frame: Frame<Bytes>) -> Frame<Bytes> {
        if self.failed_status || ends_with_done(&self.tail) {
            let ending = Ending::from_success(!self.failed_status && !self.error_event);
            self.finish(ending);
            return frame;
        }
        // Not terminated: the error event follows the data in the same frame.
        let error = self.fail("the stream ended without its final `data: [DONE]` event");
        match (frame.into_data(), error.into_data()) {
            (Ok(data), Ok(err)) => {
                let mut joined = Vec::with_capacity(data.len() + err.len());
                joined.extend_from_slice(&data);
                joined.extend_from_slice(&err);
                Frame::data(Bytes::from(joined))
            }
            (Ok(data), Err(_)) => Frame::data(data),
            (Err(other), _) => other,
        }
    }

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

/// Whether `data` holds an engine's error event (`data: {"error": …}`, or vLLM's older
/// `{"object": "error", …}`).
fn has_error_event(data: &[u8]) -> bool {
    const MARKERS: [&[u8]; 4] =
        [b"data: {\"error\"", b"data:{\"error\"", b"{\"object\": \"error\"", b"{\"object\":\"error\""];
    MARKERS.iter().any(|m| data.windows(m.len()).any(|w| w == *m))
}

fn count_events(data: &[u8]) -> u32 {
    data.windows(5).filter(|w| w == b"data:").count() as u32
}

impl Drop for ObservedBody {
    /// Dropped after an error event but before the stream's end (a failover took over): the
    /// worker failed the request, whatever the client does next.
    fn drop(&mut self) {
        if self.error_event {
            self.finish(Ending::Failed);
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.guard.is_none() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => {
                if self.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let reason = if self.limits.deadline.is_some_and(|d| Instant::now() >= d) {
                    "the request's total time is up (--request-total-timeout-secs)".to_owned()
                } else {
                    format!("no data for {:.0} s (--stream-idle-timeout-secs)", self.limits.idle.as_secs_f64())
                };
                Poll::Ready(Some(Ok(self.fail(&reason))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref().filter(|d| !d.is_empty()) {
                    self.events += count_events(d);
                    self.error_event |= has_error_event(d);
                    self.usage.scan(d);
                    let keep = TAIL.saturating_sub(d.len()).min(self.tail.len());
                    let drop = self.tail.len() - keep;
                    self.tail.drain(..drop);
                    self.tail.extend_from_slice(&d[d.len().saturating_sub(TAIL)..]);
                    if let Some(g) = self.guard.as_mut() {
                        g.first_token_at(Instant::now());
                    }
                    let idle = Instant::now() + self.limits.idle;
                    let next = self.limits.deadline.map_or(idle, |d| d.min(idle));
                    self.timer.as_mut().reset(next);
                }
                if self.inner.is_end_stream() {
                    return Poll::Ready(Some(Ok(self.end(frame))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                if self.failed_status || ends_with_done(&self.tail) {
                    let ending = Ending::from_success(!self.failed_status && !self.error_event);
                    self.finish(ending);
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(self.fail("the stream ended without its final `data: [DONE]` event"))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Ok(self.fail(&e.to_string())))),
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
    fn the_terminal_event_is_found_in_the_stream_tail() {
        assert!(super::ends_with_done(b"data: {}\n\ndata: [DONE]\n\n"));
        assert!(super::ends_with_done(b"data:[DONE]\r\n"));
        assert!(!super::ends_with_done(b"data: {\"x\":1}\n\n"));
        assert!(!super::ends_with_done(b""));
    }

    #[test]
    fn counts_sse_events() {
        assert_eq!(super::count_events(b"data: {}\n\ndata: {}\n\ndata: [DONE]\n\n"), 3);
        assert_eq!(super::count_events(b"dat"), 0);
        assert!(super::has_error_event(b"data: {}\n\ndata: {\"error\": {\"message\": \"x\"}}\n\n"));
        assert!(!super::has_error_event(b"data: {\"choices\": [{\"text\": \"error\"}]}\n\n"));
    }
}
