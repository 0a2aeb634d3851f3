//! Prefill/decode mode's attempt: a (prefill, decode) pair, the request rewritten for the
//! engines' KV-transfer protocol, and neither leg may hang the other.
//!
//! - **SGLang style**: `bootstrap_host`/`bootstrap_port`/`bootstrap_room` are added and the
//!   request goes to both legs at once; the decode leg's answer is returned (prompt logprobs
//!   from the prefill leg merged in when `return_logprob` is set). If either leg fails before
//!   the decode leg has answered, the other is cancelled at once (the anchor router waits out
//!   its request timeout here) and the request is retried on a new pair.
//! - **vLLM style**: prefill with `max_tokens = 1`, `stream = false` and
//!   `kv_transfer_params.do_remote_decode`, then decode with the `kv_transfer_params` the
//!   prefill worker returned.
//!
//! Each attempt's body is written from the client's body by editing its top-level fields
//! ([`Members`]), never by cloning a parsed tree of it.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Response};
use bytes::Bytes;
use serde_json::{json, Value};
use tracing::Instrument;

use super::attempt::{Attempt, Dispatcher, Failure};
use super::body_edit::Members;
use crate::config::PdStyle;
use crate::error::ApiError;
use crate::load::{Ending, InFlightGuard, Usage};
use crate::proxy::{buffered, check_whole, is_event_stream, is_worker_failure, relay_stream, SendError, Upstream};
use crate::workers::{Worker, WorkerRole};

/// A decode leg that fails after waiting at least this long, while its prefill leg has not
/// answered, was waiting for that prefill's KV: the engine gives up after its own transfer
/// timeout (seconds). That is the prefill worker's queue, not a sick decode worker — which
/// fails fast (a refused connection, a 5xx in milliseconds).
const KV_WAIT: Duration = Duration::from_secs(1);

fn host_of(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    match rest.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']').to_owned(),
        None => rest.to_owned(),
    }
}

/// Size of a batched SGLang request (`text` or `input_ids` as a list of prompts), if batched.
fn batch_size(body: &Members<'_>) -> Option<usize> {
    if body.get("text").is_some() {
        return body.array_len("text");
    }
    if body.is_nested_array("input_ids") {
        return body.array_len("input_ids");
    }
    None
}

fn unreachable(w: &Worker, e: impl std::fmt::Display) -> ApiError {
    ApiError::WorkerUnreachable { worker: w.url().to_owned(), reason: e.to_string() }
}

fn timed_out(w: &Worker, limit: Duration) -> ApiError {
    ApiError::Timeout { worker: w.url().to_owned(), secs: limit.as_secs_f64() }
}

fn stalled(w: &Worker, window: Duration) -> ApiError {
    ApiError::PrefillStalled { worker: w.url().to_owned(), secs: window.as_secs_f64() }
}

/// Runs one attempt on the pair whose guards are `[prefill, decode]`.
pub(super) async fn run(
    router: &Dispatcher,
    guards: Vec<InFlightGuard>,
    a: &Attempt<'_>,
    style: PdStyle,
    prefill_timeout: Duration,
) -> Result<Response<Body>, Failure> {
    let Ok([prefill, decode]) = <[InFlightGuard; 2]>::try_from(guards) else {
        return Err(Failure::fatal(ApiError::NoHealthyWorkers));
    };
    let members = Members::parse(a.body).map_err(|e| Failure::fatal(ApiError::BadRequest(e)))?;
    let legs = Legs { router, a, members, prefill_timeout };
    match style {
        PdStyle::Sglang => legs.sglang(prefill, decode).await,
        PdStyle::Vllm => legs.vllm(prefill, decode).await,
    }
}

struct Legs<'a> {
    router: &'a Dispatcher,
    a: &'a Attempt<'a>,
    members: Members<'a>,
    prefill_timeout: Duration,
}

impl Legs<'_> {
    fn upstream(&self) -> &Upstream {
        &self.router.0.upstream
    }

    /// How long a prefill worker may finish nothing before its leg is given up on
    /// ([`whole_unless_stalled`]): never past the request timeout.
    fn prefill_window(&self) -> Duration {
        self.prefill_timeout.min(self.upstream().timeout)
    }

    async fn sglang(&self, prefill: InFlightGuard, decode: InFlightGuard) -> Result<Response<Body>, Failure> {
        let (p, d) = (prefill.worker().clone(), decode.worker().clone());
        let bootstrap_port = match p.role() {
            WorkerRole::Prefill { bootstrap_port } => bootstrap_port,
            _ => None,
        };
        let room = || rand::random::<u64>() >> 1;
        let fields = match batch_size(&self.members) {
            Some(n) => [
                json!(vec![host_of(p.url()); n]),
                json!(vec![bootstrap_port; n]),
                json!((0..n).map(|_| room()).collect::<Vec<_>>()),
            ],
            None => [json!(host_of(p.url())), json!(bootstrap_port), json!(room())],
        };
        let [host, port, room] = fields.map(|v| v.to_string());
        let bytes =
            self.members.rewrite(&[("bootstrap_host", host), ("bootstrap_port", port), ("bootstrap_room", room)], &[]);
        let want_logprobs = self.members.get("return_logprob").is_some_and(|v| v.trim() == "true");

        // Prefill leg: its own task, so it can be cancelled (aborted: its guard then ends as
        // abandoned; or told it failed, below) or left to finish on its own.
        let (fail_prefill, failed) = tokio::sync::oneshot::channel::<()>();
        let prefill_task = {
            let (upstream, headers, route) = (self.upstream().clone(), self.a.headers.clone(), self.a.route);
            let (window, bytes) = (self.prefill_window(), bytes.clone());
            let span = leg_span("prefill", &p);
            tokio::spawn(Instrument::instrument(
                async move {
                    let mut guard = prefill;
                    let worker = guard.worker().clone();
                    let answer = tokio::select! {
                        answer = whole_unless_stalled(&upstream, &worker, route, &headers, bytes, window) => answer,
                        // Told the decode leg gave up on a KV this worker never produced.
                        Ok(()) = failed => {
                            guard.finish(Ending::Failed, Usage::default());
                            return Err(stalled(&worker, window));
                        }
                    };
                    // The prefill leg's whole answer is its first token.
                    guard.mark_first_byte();
                    let ok = matches!(&answer, Ok((s, _)) if !super::is_worker_failure_code(*s));
                    let usage = answer.as_ref().map(|(_, b)| usage_of(b)).unwrap_or_default();
                    guard.finish(Ending::from_success(ok), usage);
                    answer
                },
                span,
            ))
        };
        let mut prefill_task = AbortOnDrop { handle: prefill_task, detached: false };
        let sent = Instrument::instrument(
            self.upstream().send_to(&d, self.a.route, self.a.headers, bytes),
            leg_span("decode", &d),
        );
        tokio::pin!(sent);
        let sent_at = tokio::time::Instant::now();
        let prefill_done_before = p.load().succeeded();
        let mut prefill_answer: Option<Bytes> = None;
        let mut decode = Some(decode);
        let decode_resp = loop {
            tokio::select! {
                joined = &mut prefill_task.handle, if prefill_answer.is_none() => {
                    let error = match joined {
                        Ok(Ok((status, b))) if !super::is_worker_failure_code(status) => {
                            prefill_answer = Some(b);
                            continue;
                        }
                        Ok(Ok((status, _))) => ApiError::WorkerFailed { worker: p.url().to_owned(), status },
                        Ok(Err(e)) => e,
                        Err(e) => unreachable(&p, e),
                    };
                    // The decode leg is cancelled: dropped, its guard ends as abandoned.
                    return Err(Failure::retry(error, vec![p.clone()]));
                }
                sent = &mut sent => {
                    let error = match sent {
                        Ok(resp) if !is_worker_failure(resp.status()) => break resp,
                        Ok(resp) => ApiError::WorkerFailed { worker: d.url().to_owned(), status: resp.status().as_u16() },
                        Err(SendError::Timeout) => timed_out(&d, self.upstream().timeout),
                        Err(e) => unreachable(&d, e),
                    };
                    // A slow or hung prefill makes the decode worker time out waiting for its
                    // KV. Counted against the decode worker, an overloaded prefill pool opened
                    // every decode worker's circuit (PD at 2.8x its capacity: the whole level
                    // failed); so a decode leg that waited for the KV ends without a verdict and
                    // the retry avoids only the prefill worker. That worker is failed only if it
                    // finished nothing meanwhile (hung); one still finishing requests is merely
                    // behind, and opening its circuit would pile its queue onto the others. A
                    // fast failure may be either's.
                    let waited_for_kv = prefill_answer.is_none() && sent_at.elapsed() >= KV_WAIT;
                    if let Some(g) = decode.take() {
                        g.finish(if waited_for_kv { Ending::Abandoned } else { Ending::Failed }, Usage::default());
                    }
                    if waited_for_kv && p.load().succeeded() == prefill_done_before && fail_prefill.send(()).is_ok() {
                        let _ = (&mut prefill_task.handle).await;
                    }
                    let blame = match (waited_for_kv, prefill_answer.is_none()) {
                        (true, _) => vec![p.clone()],
                        (false, true) => vec![p.clone(), d.clone()],
                        (false, false) => vec![d.clone()],
                    };
                    return Err(Failure::retry(error, blame));
                }
            }
        };
        let Some(mut decode) = decode.take() else {
            return Err(Failure::fatal(ApiError::NoHealthyWorkers));
        };
        if self.a.view.stream && is_event_stream(&decode_resp) {
            // Prompt logprobs come from the prefill leg (done by now: the decode worker only
            // answers once the KV is there); otherwise it finishes on its own.
            let inject = if want_logprobs {
                let answer = match prefill_answer.take() {
                    Some(b) => Some(b),
                    None => match (&mut prefill_task.handle).await {
                        Ok(Ok((_, b))) => Some(b),
                        _ => None,
                    },
                };
                answer.as_deref().and_then(prompt_logprobs)
            } else {
                None
            };
            prefill_task.detach();
            let mut out = relay_stream(decode_resp, decode, self.a.stream);
            if let Some(logprobs) = inject {
                let (parts, body) = out.into_parts();
                out = Response::from_parts(parts, Body::new(InjectLogprobs::new(body, logprobs)));
            }
            return Ok(out);
        }
        let status = decode_resp.status();
        let (parts, incoming) = decode_resp.into_parts();
        let whole = self.upstream().read_whole(incoming).await.map_err(|e| e.to_string());
        let decode_bytes = match whole.and_then(|b| check_whole(status, &b).map(|()| b)) {
            Ok(b) => b,
            Err(e) => {
                decode.finish(Ending::Failed, Usage::default());
                return Err(Failure::retry(unreachable(&d, format!("the response body broke: {e}")), vec![d.clone()]));
            }
        };
        decode.mark_first_byte();
        decode.relay(status.as_u16());
        decode.finish(Ending::Succeeded, usage_of(&decode_bytes));
        let mut body = decode_bytes;
        if want_logprobs {
            let prefill_bytes = match prefill_answer {
                Some(b) => b,
                None => match (&mut prefill_task.handle).await {
                    Ok(Ok((_, b))) => b,
                    _ => return Err(Failure::fatal(unreachable(&p, "no prefill answer for logprobs"))),
                },
            };
            body = merge_input_logprobs(&prefill_bytes, body);
        } else {
            prefill_task.detach();
        }
        Ok(buffered(parts, body))
    }

    async fn vllm(&self, mut prefill: InFlightGuard, decode: InFlightGuard) -> Result<Response<Body>, Failure> {
        let (p, d) = (prefill.worker().clone(), decode.worker().clone());
        let mut set = vec![
            ("max_tokens", "1".to_owned()),
            ("stream", "false".to_owned()),
            (
                "kv_transfer_params",
                r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#.to_owned(),
            ),
        ];
        if self.members.get("max_completion_tokens").is_some() {
            set.push(("max_completion_tokens", "1".to_owned()));
        }
        let prefill_body = self.members.rewrite(&set, &["stream_options"]);
        let window = self.prefill_window();
        let answer = Instrument::instrument(
            whole_unless_stalled(self.upstream(), &p, self.a.route, self.a.headers, prefill_body, window),
            leg_span("prefill", &p),
        )
        .await;
        let params = match answer {
            Ok((status, b)) if !super::is_worker_failure_code(status) => {
                prefill.mark_first_byte();
                prefill.finish(Ending::Succeeded, usage_of(&b));
                serde_json::from_slice::<Value>(&b)
                    .ok()
                    .and_then(|v| v.get("kv_transfer_params").cloned())
                    .unwrap_or(Value::Null)
            }
            Ok((status, _)) => {
                prefill.finish(Ending::Failed, Usage::default());
                return Err(Failure::retry(ApiError::WorkerFailed { worker: p.url().to_owned(), status }, vec![p]));
            }
            Err(e) => {
                prefill.finish(Ending::Failed, Usage::default());
                return Err(Failure::retry(e, vec![p]));
            }
        };
        let decode_body = self.members.rewrite(&[("kv_transfer_params", params.to_string())], &[]);
        let mut decode = decode;
        let sent = self.upstream().send_to(&d, self.a.route, self.a.headers, decode_body);
        match Instrument::instrument(sent, leg_span("decode", &d)).await {
            Ok(resp) if is_worker_failure(resp.status()) => {
                let status = resp.status().as_u16();
                decode.finish(Ending::Failed, Usage::default());
                Err(Failure::retry(ApiError::WorkerFailed { worker: d.url().to_owned(), status }, vec![d]))
            }
            Ok(resp) if is_event_stream(&resp) => Ok(relay_stream(resp, decode, self.a.stream)),
            Ok(resp) => {
                let status = resp.status();
                let (parts, incoming) = resp.into_parts();
                let whole = self.upstream().read_whole(incoming).await.map_err(|e| e.to_string());
                match whole.and_then(|b| check_whole(status, &b).map(|()| b)) {
                    Ok(b) => {
                        decode.mark_first_byte();
                        decode.relay(status.as_u16());
                        decode.finish(Ending::Succeeded, usage_of(&b));
                        Ok(buffered(parts, b))
                    }
                    Err(e) => {
                        decode.finish(Ending::Failed, Usage::default());
                        Err(Failure::retry(unreachable(&d, format!("the response body broke: {e}")), vec![d]))
                    }
                }
            }
            Err(SendError::Timeout) => {
                decode.finish(Ending::Failed, Usage::default());
                Err(Failure::fatal(timed_out(&d, self.upstream().timeout)))
            }
            Err(e) => {
                decode.finish(Ending::Failed, Usage::default());
                Err(Failure::retry(unreachable(&d, e), vec![d]))
            }
        }
    }
}

fn usage_of(body: &[u8]) -> Usage {
    let mut usage = Usage::default();
    usage.scan(body);
    usage
}

/// A PD leg's span (until its answer's head, or its whole answer for prefill).
fn leg_span(leg: &'static str, worker: &Worker) -> tracing::Span {
    tracing::debug_span!(target: crate::telemetry::TARGET, "leg", otel.name = leg, worker = worker.key())
}

/// Sends `body` to a prefill `worker` and reads the whole answer, all within the request
/// timeout.
async fn whole(
    upstream: &Upstream,
    worker: &Worker,
    route: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(u16, Bytes), ApiError> {
    let limit = upstream.timeout;
    let call = async {
        let resp = upstream.send_to(worker, route, headers, body).await.map_err(|e| match e {
            SendError::Timeout => timed_out(worker, upstream.timeout),
            e => unreachable(worker, e),
        })?;
        let status = resp.status().as_u16();
        let bytes = upstream.read_whole(resp.into_body()).await.map_err(|e| match e {
            SendError::Timeout => timed_out(worker, upstream.timeout),
            e => unreachable(worker, format!("the response body broke: {e}")),
        })?;
        Ok((status, bytes))
    };
    tokio::time::timeout(limit, call).await.map_err(|_| timed_out(worker, limit))?
}

/// The prefill leg's whole answer, given up on once its worker has finished nothing for a
/// whole `window` (`--pd-prefill-timeout-secs`): such a worker is hung, and the request is
/// retried on another pair. A worker still finishing other requests is behind, not hung, and
/// the leg keeps its place in its queue (up to the request timeout, and the decode engine's own
/// wait for the KV) — the rule a decode leg that gave up waiting for the KV is judged by
/// (`sglang`). A flat timeout failed every leg queued past the window as if its worker were
/// hung: past a PD fleet's knee (live, pd-mixed at 1.6x its knee, 12,000 requests) round_robin
/// retried 3,830 requests, opened the circuits of four healthy prefill workers and answered 22
/// clients with errors; with one prefill worker, or all of them that far behind, the request
/// ended in a 504 though every worker was healthy. Now: no errors, 4 retries (decode 503s).
///
/// A prompt that takes the only busy worker longer than the window to compute is still given
/// up on: nothing else finished meanwhile. Raise the window for such prompts.
async fn whole_unless_stalled(
    upstream: &Upstream,
    worker: &Worker,
    route: &str,
    headers: &HeaderMap,
    body: Bytes,
    window: Duration,
) -> Result<(u16, Bytes), ApiError> {
    let call = whole(upstream, worker, route, headers, body);
    tokio::pin!(call);
    loop {
        let finished_before = worker.load().succeeded();
        match tokio::time::timeout(window, &mut call).await {
            Ok(answer) => return answer,
            Err(_) if worker.load().succeeded() == finished_before => return Err(stalled(worker, window)),
            Err(_) => continue,
        }
    }
}

/// `meta_info.input_token_logprobs` from a prefill answer: a JSON body, or the first SSE
/// event that has them when the request was streamed.
fn prompt_logprobs(answer: &[u8]) -> Option<Value> {
    let find = |v: Value| v.pointer("/meta_info/input_token_logprobs").cloned().filter(|l| !l.is_null());
    if let Ok(v) = serde_json::from_slice::<Value>(answer) {
        return find(v);
    }
    std::str::from_utf8(answer)
        .ok()?
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(find)
}

/// Puts the prefill leg's `meta_info.input_token_logprobs` into the decode leg's answer.
fn merge_input_logprobs(prefill: &[u8], decode: Bytes) -> Bytes {
    let Ok(mut d) = serde_json::from_slice::<Value>(&decode) else { return decode };
    let Some(logprobs) = prompt_logprobs(prefill) else { return decode };
    if let Some(meta) = d.get_mut("meta_info").and_then(Value::as_object_mut) {
        meta.insert("input_token_logprobs".into(), logprobs);
        return Bytes::from(d.to_string());
    }
    decode
}

/// A stream whose first SSE event gets `meta_info.input_token_logprobs` (from the prefill
/// leg); the rest passes through untouched. The first event is looked for in at most
/// [`MAX_FIRST_EVENT`] bytes, scanning each byte once: a worker that never ends an event
/// gets its stream passed through unchanged instead of growing a buffer.
struct InjectLogprobs {
    inner: Body,
    logprobs: Option<Value>,
    pending: Vec<u8>,
    /// Bytes of `pending` already searched for the event's end.
    scanned: usize,
}

/// Longest first event the injector buffers.
const MAX_FIRST_EVENT: usize = 1 << 20;

impl InjectLogprobs {
    fn new(inner: Body, logprobs: Value) -> Self {
        Self { inner, logprobs: Some(logprobs), pending: Vec::new(), scanned: 0 }
    }

    /// Rewrites the first complete event in `pending`; returns the bytes ready to send, or
    /// everything pending unchanged once the first event is too long to wait for.
    fn rewrite_first(&mut self) -> Option<Bytes> {
        let from = self.scanned.saturating_sub(1);
        let Some(at) = self.pending[from..].windows(2).position(|w| w == b"\n\n") else {
            self.scanned = self.pending.len();
            if self.pending.len() > MAX_FIRST_EVENT {
                self.logprobs = None;
                return Some(Bytes::from(std::mem::take(&mut self.pending)));
            }
            return None;
        };
        let end = from + at + 2;
        let event: Vec<u8> = self.pending.drain(..end).collect();
        let logprobs = self.logprobs.take().unwrap_or(Value::Null);
        let rewritten = std::str::from_utf8(&event)
            .ok()
            .and_then(|e| e.strip_prefix("data: "))
            .and_then(|data| serde_json::from_str::<Value>(data.trim_end()).ok())
            .and_then(|mut v| {
                v.get_mut("meta_info")?.as_object_mut()?.insert("input_token_logprobs".into(), logprobs);
                Some(format!("data: {v}\n\n").into_bytes())
            })
            .unwrap_or(event);
        let mut out = rewritten;
        out.append(&mut self.pending);
        Some(Bytes::from(out))
    }
}

impl http_body::Body for InjectLogprobs {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        use std::task::Poll;
        loop {
            if self.logprobs.is_none() && self.pending.is_empty() {
                return std::pin::Pin::new(&mut self.inner).poll_frame(cx);
            }
            match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        self.pending.extend_from_slice(&data);
                        if let Some(out) = self.rewrite_first() {
                            return Poll::Ready(Some(Ok(http_body::Frame::data(out))));
                        }
                    }
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                Poll::Ready(None) => {
                    // Ended before a complete event: pass on what there is.
                    self.logprobs = None;
                    let rest = std::mem::take(&mut self.pending);
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(http_body::Frame::data(Bytes::from(rest)))));
                }
                other => return other,
            }
        }
    }
}

/// A task aborted when dropped (a cancelled leg), unless detached to finish on its own.
struct AbortOnDrop<T> {
    handle: tokio::task::JoinHandle<T>,
    detached: bool,
}

impl<T> AbortOnDrop<T> {
    fn detach(&mut self) {
        self.detached = true;
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if !self.detached {
            self.handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_batches_and_logprob_merge() {
        assert_eq!(host_of("http://10.0.0.1:8000"), "10.0.0.1");
        assert_eq!(host_of("http://[::1]:8000"), "::1");
        let batch = |body: &[u8]| batch_size(&Members::parse(body).unwrap());
        assert_eq!(batch(br#"{"text": ["a", "b"]}"#), Some(2));
        assert_eq!(batch(br#"{"text": "a"}"#), None);
        assert_eq!(batch(br#"{"input_ids": [[1], [2], [3]]}"#), Some(3));
        assert_eq!(batch(br#"{"input_ids": [1, 2, 3]}"#), None);
        let merged = merge_input_logprobs(
            br#"{"meta_info":{"input_token_logprobs":[[-0.1,5,null]]}}"#,
            Bytes::from_static(br#"{"text":"x","meta_info":{"input_token_logprobs":null}}"#),
        );
        let v: Value = serde_json::from_slice(&merged).unwrap();
        assert_eq!(v["meta_info"]["input_token_logprobs"], json!([[-0.1, 5, null]]));
    }

    #[tokio::test]
    async fn the_first_stream_event_gets_prompt_logprobs() {
        let chunks = std::collections::VecDeque::from(vec![
            Bytes::from_static(b"data: {\"text\":\"a\",\"meta_"),
            Bytes::from_static(
                b"info\":{\"input_token_logprobs\":null}}\n\ndata: {\"text\":\"ab\",\"meta_info\":{}}\n\n",
            ),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ]);
        let body = Body::new(Chunks(chunks));
        let injected = InjectLogprobs::new(body, json!([[-1.0, 7, null]]));
        let all = http_body_util::BodyExt::collect(injected).await.unwrap().to_bytes();
        let text = String::from_utf8(all.to_vec()).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3);
        let first: Value = serde_json::from_str(events[0].trim_start_matches("data: ")).unwrap();
        assert_eq!(first["meta_info"]["input_token_logprobs"], json!([[-1.0, 7, null]]));
        assert_eq!(events[1], "data: {\"text\":\"ab\",\"meta_info\":{}}");
        assert_eq!(events[2], "data: [DONE]");
    }

    /// A body of fixed chunks, one frame each.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn an_event_that_never_ends_is_passed_through_not_buffered() {
        let chunk = Bytes::from(vec![b'x'; 64 << 10]);
        let chunks: std::collections::VecDeque<Bytes> = std::iter::repeat_n(chunk, 32).collect();
        let injected = InjectLogprobs::new(Body::new(Chunks(chunks)), json!([1]));
        let all = http_body_util::BodyExt::collect(injected).await.unwrap().to_bytes();
        assert_eq!(all.len(), 32 * (64 << 10), "every byte passed on, unchanged");
        assert!(all.iter().all(|b| *b == b'x'));
    }
}
