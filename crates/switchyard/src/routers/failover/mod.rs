//! Mid-stream failover: a stream whose worker dies, cuts it, stalls or sends an error event is
//! continued on another worker, and the client sees one unbroken stream.
//!
//! The relayed stream (whose [`crate::proxy::ObservedBody`] already turns every way a worker
//! can break it into an error event and tells the worker's guard) is read event by event on
//! its way out; complete events only are passed on, so a cut never leaves half an event with
//! the client. The [`Transcript`] keeps what the client has received. When an error event
//! comes, it is held back, the [`continuation`] request is built from the original and the
//! answer so far, and dispatched like any request (policy, holding, breakers, retries; the
//! broken stream's workers excluded). Its events are then [spliced](Transcript::splice) onto
//! the old stream. A request that cannot be continued faithfully, a continuation that fails
//! to start, or one failure too many ends the stream with the error event, as before.
//!
//! The client going away drops this body, and with it the continuation in progress.

mod continuation;
mod transcript;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{HeaderMap, Response};
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

use self::continuation::NotContinued;
pub use self::transcript::Api;
use self::transcript::{Event, Transcript};
use super::attempt::Dispatcher;
use crate::error::ApiError;
use crate::proxy::{is_event_stream_headers, StreamLimits};
use crate::workers::Worker;

/// The workers whose answer a response is (a response extension): one, or the prefill and
/// decode workers. The last one streamed it, and is left out of its continuation (a PD
/// prefill worker is done before the stream starts and is not to blame for its break).
#[derive(Debug, Clone)]
pub struct ServedBy(pub Vec<Arc<Worker>>);

impl ServedBy {
    fn streaming(parts: &axum::http::response::Parts) -> Option<Arc<Worker>> {
        parts.extensions.get::<ServedBy>().and_then(|s| s.0.last().cloned())
    }
}

/// What a stream needs to continue itself.
pub(super) struct Continuations {
    pub dispatcher: Dispatcher,
    pub route: &'static str,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub limits: StreamLimits,
    /// Continuations still allowed.
    pub left: u32,
    /// The request's span: continuations are traced under it.
    pub span: tracing::Span,
}

/// The API of `route`'s streams, if they can be continued, and what in `body` keeps this one
/// from being continued, if anything (such a stream is still watched, to count its breaks).
pub(super) fn continuable(route: &str, body: &[u8]) -> Option<(Api, Option<&'static str>)> {
    let api = Api::of(route)?;
    Some((api, continuation::blocker(api, body)))
}

type Dispatch = Pin<Box<dyn Future<Output = Result<Response<Body>, ApiError>> + Send>>;

enum State {
    /// Relaying the current stream.
    Relaying,
    /// A continuation is being dispatched; `started` for the time it adds.
    Continuing {
        dispatch: Dispatch,
        started: Instant,
    },
    /// The last bytes to send, then the end.
    Ending(Option<Bytes>),
    Done,
}

/// A relayed stream that continues itself on another worker when it breaks.
pub struct FailoverBody {
    current: Body,
    /// Set once a continuation is relayed: its events are rewritten onto the old stream.
    spliced: Option<Transcript>,
    transcript: Transcript,
    /// The start of an event not yet complete.
    pending: BytesMut,
    /// The current stream sent its `[DONE]`.
    done: bool,
    state: State,
    /// The worker streaming now.
    served: Option<Arc<Worker>>,
    /// Why the last stream broke (its error event's message).
    broke_because: String,
    excluded: Vec<Arc<Worker>>,
    ctx: Box<Continuations>,
}

impl FailoverBody {
    /// Wraps `response` (a stream), which `ctx` can continue.
    pub(super) fn wrap(
        response: Response<Body>,
        (api, blocker): (Api, Option<&'static str>),
        ctx: Continuations,
    ) -> Response<Body> {
        let (parts, body) = response.into_parts();
        let served = ServedBy::streaming(&parts);
        let mut transcript = Transcript::new(api);
        transcript.blocker = blocker;
        let body = FailoverBody {
            current: body,
            spliced: None,
            transcript,
            pending: BytesMut::new(),
            done: false,
            state: State::Relaying,
            served,
            broke_because: String::new(),
            excluded: Vec::new(),
            ctx: Box::new(ctx),
        };
        Response::from_parts(parts, Body::new(body))
    }

    fn request_id(&self) -> &str {
        self.ctx.headers.get(crate::server::REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// Takes in a chunk of the current stream: the complete events to pass on, and the error
    /// event if one came (what follows it is dropped).
    fn take(&mut self, data: Bytes) -> (Bytes, Option<Bytes>) {
        let buf = if self.pending.is_empty() {
            data
        } else {
            self.pending.extend_from_slice(&data);
            self.pending.split().freeze()
        };
        let mut out: Option<Vec<u8>> = self.spliced.as_ref().map(|_| Vec::new());
        // A stream that will not be continued is only watched for its end and its errors.
        let watch_only = self.spliced.is_none() && self.transcript.blocker.is_some();
        let mut start = 0;
        while let Some((end, next)) = event_end(&buf[start..]) {
            let (event, whole) = (&buf[start..start + end], buf.slice(start..start + next));
            start += next;
            let event = if watch_only { Event::glance(event) } else { Event::read(event) };
            match event {
                Event::Error | Event::Garbled => {
                    let passed = match out {
                        Some(v) => Bytes::from(v),
                        None => buf.slice(..start - next),
                    };
                    let error = match event {
                        Event::Error => whole,
                        _ => error_event("the worker sent an event that is not JSON (cut mid-event?)"),
                    };
                    return (passed, Some(error));
                }
                Event::Done => self.done = true,
                Event::Chunk(chunk) => {
                    if let Some(base) = &self.spliced {
                        let Some(chunk) = base.splice(chunk) else { continue };
                        if let Some(v) = out.as_mut() {
                            v.extend_from_slice(&sse(&chunk));
                        }
                        self.transcript.observe(chunk);
                        continue;
                    }
                    self.transcript.observe(chunk);
                }
                Event::Other => {}
            }
            if let Some(v) = out.as_mut() {
                v.extend_from_slice(&whole);
            }
        }
        self.pending.extend_from_slice(&buf[start..]);
        let passed = match out {
            Some(v) => Bytes::from(v),
            None => buf.slice(..start),
        };
        (passed, None)
    }

    /// The current stream broke with `error` (an error event): continue, or end with it.
    fn broke(&mut self, error: Bytes) -> State {
        self.pending.clear();
        self.current = Body::empty();
        self.excluded.extend(self.served.take());
        self.broke_because =
            serde_json::from_slice::<serde_json::Value>(error.strip_prefix(b"data:").unwrap_or(&error))
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message").or_else(|| v.get("message")).and_then(|m| m.as_str()).map(str::to_owned)
                })
                .unwrap_or_else(|| "the stream broke".to_owned());
        let metrics = self.ctx.dispatcher.0.metrics.clone();
        let api = self.transcript.api();
        let why = match continuation::body(api, &self.ctx.body, &self.transcript) {
            Err(NotContinued::Complete) => {
                metrics.stream_failover("completed");
                tracing::warn!(request_id = self.request_id(), "stream broke after its last token; ending it");
                return State::Ending(Some(self.end_of_complete_answer()));
            }
            Err(NotContinued::Unfaithful(why)) => why,
            Ok(_) if self.ctx.left == 0 => "no continuations are left (--stream-failover-max)",
            Ok(body) => {
                self.ctx.left -= 1;
                metrics.stream_failover("continued");
                tracing::warn!(
                    request_id = self.request_id(),
                    tokens = self.transcript.tokens,
                    excluded = ?self.excluded.iter().map(|w| w.url()).collect::<Vec<_>>(),
                    "stream broke; continuing it on another worker"
                );
                let ctx = &self.ctx;
                let (dispatcher, route, headers) = (ctx.dispatcher.clone(), ctx.route, ctx.headers.clone());
                let (excluded, limits) = (self.excluded.clone(), ctx.limits);
                let dispatch = Box::pin(tracing::Instrument::instrument(
                    async move { dispatcher.dispatch(route, &headers, body, excluded, limits).await },
                    ctx.span.clone(),
                ));
                return State::Continuing { dispatch, started: Instant::now() };
            }
        };
        metrics.stream_failover("not_continued");
        tracing::warn!(request_id = self.request_id(), reason = why, "stream broke and is not continued");
        State::Ending(Some(error))
    }

    /// The end of an answer that had all its tokens: its finish reason if not yet sent, and
    /// `[DONE]`.
    fn end_of_complete_answer(&self) -> Bytes {
        let mut out = Vec::new();
        if !self.transcript.finished {
            out.extend_from_slice(&sse(&self.transcript.length_end()));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        Bytes::from(out)
    }

    /// A continuation was dispatched: relay its stream, or end with its error.
    fn continued(&mut self, answer: Result<Response<Body>, ApiError>, started: Instant) -> State {
        let metrics = self.ctx.dispatcher.0.metrics.clone();
        match answer {
            Ok(resp) if resp.status().is_success() && is_event_stream_headers(resp.headers()) => {
                metrics.stream_failover_delay(started.elapsed());
                let (parts, body) = resp.into_parts();
                self.served = ServedBy::streaming(&parts);
                tracing::info!(
                    request_id = self.request_id(),
                    worker = self.served.as_ref().map_or("", |w| w.url()),
                    "stream continued"
                );
                self.current = body;
                self.done = false;
                self.spliced = Some(self.transcript.clone());
                State::Relaying
            }
            Ok(resp) => {
                metrics.stream_failover("failed");
                let why = format!("the continuation was answered with status {}", resp.status().as_u16());
                State::Ending(Some(self.uncontinued(&why)))
            }
            Err(e) => {
                metrics.stream_failover("failed");
                State::Ending(Some(self.uncontinued(&e.to_string())))
            }
        }
    }
}

impl FailoverBody {
    /// The error event of a stream whose continuation failed: why it broke, and why it was
    /// not continued.
    fn uncontinued(&self, why: &str) -> Bytes {
        tracing::warn!(request_id = self.request_id(), reason = why, "a broken stream could not be continued");
        error_event(&format!("{}; it could not be continued elsewhere: {why}", self.broke_because))
    }
}

/// Where the first complete event in `buf` ends: (end of its text, start of the next).
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some((i, i + 2));
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

fn sse(chunk: &serde_json::Value) -> Vec<u8> {
    format!("data: {chunk}\n\n").into_bytes()
}

fn error_event(reason: &str) -> Bytes {
    let body = serde_json::json!({"error": {"message": reason, "type": "bad_gateway", "code": 502}});
    Bytes::from(format!("data: {body}\n\n"))
}

impl http_body::Body for FailoverBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Ending(last) => {
                    let last = last.take();
                    this.state = State::Done;
                    if let Some(bytes) = last {
                        return Poll::Ready(Some(Ok(Frame::data(bytes))));
                    }
                }
                State::Continuing { dispatch, started } => {
                    let started = *started;
                    let Poll::Ready(answer) = dispatch.as_mut().poll(cx) else { return Poll::Pending };
                    this.state = this.continued(answer, started);
                }
                State::Relaying => match Pin::new(&mut this.current).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => {
                        let data = match frame.into_data() {
                            Ok(data) => data,
                            Err(frame) => return Poll::Ready(Some(Ok(frame))),
                        };
                        let (passed, error) = this.take(data);
                        if let Some(error) = error {
                            this.state = this.broke(error);
                        }
                        if !passed.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(passed))));
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        this.state = this.broke(error_event(&format!("the stream broke: {e}")));
                    }
                    Poll::Ready(None) if this.done => {
                        this.state = State::Done;
                        let rest = this.pending.split().freeze();
                        if !rest.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(rest))));
                        }
                    }
                    Poll::Ready(None) => {
                        let error = error_event("the stream ended without its final `data: [DONE]` event");
                        this.state = this.broke(error);
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn events_end_at_a_blank_line() {
        assert_eq!(super::event_end(b"data: 1\n\ndata: 2"), Some((7, 9)));
        assert_eq!(super::event_end(b"data: 1\r\n\r\n"), Some((8, 11)));
        assert_eq!(super::event_end(b"data: 1\n"), None);
    }
}
