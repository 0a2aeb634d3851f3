//! Prefill/decode mode: a policy picks a (prefill, decode) pair through `select_pair`, the
//! request is rewritten for the engines' KV-transfer protocol, and neither leg may hang the
//! other.
//!
//! - **SGLang style**: `bootstrap_host`/`bootstrap_port`/`bootstrap_room` are injected and the
//!   request goes to both legs at once; the decode leg's answer is returned (prompt logprobs
//!   from the prefill leg merged in when `return_logprob` is set). If either leg fails before
//!   the decode leg has answered, the other is cancelled at once (the anchor router waits out
//!   its request timeout here) and the request is retried on a new pair.
//! - **vLLM style**: prefill with `max_tokens = 1`, `stream = false` and
//!   `kv_transfer_params.do_remote_decode`, then decode with the `kv_transfer_params` the
//!   prefill worker returned.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Response};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::regular::{buffered, is_event_stream, is_worker_failure, is_worker_failure_code, relay_stream, RoutedTo};
use crate::config::{PdStyle, RetryConfig};
use crate::error::ApiError;
use crate::load::{DispatchInfo, InFlightGuard};
use crate::metrics::Metrics;
use crate::policies::RoutingPolicy;
use crate::proxy::{SendError, StreamObserver, Upstream};
use crate::request::RequestView;
use crate::workers::{Worker, WorkerRegistry, WorkerRole};

/// How the pair is chosen: one policy scoring pairs, or one policy per pool.
#[derive(Debug, Clone)]
pub enum PairPolicy {
    /// `--policy` for both pools, through `select_pair`.
    Joint(Arc<dyn RoutingPolicy>),
    /// `--prefill-policy` / `--decode-policy`.
    PerPool {
        /// Prefill pool.
        prefill: Arc<dyn RoutingPolicy>,
        /// Decode pool.
        decode: Arc<dyn RoutingPolicy>,
    },
}

impl PairPolicy {
    fn select(&self, p: &[Arc<Worker>], d: &[Arc<Worker>], view: &RequestView) -> Option<(usize, usize)> {
        match self {
            PairPolicy::Joint(policy) => policy.select_pair(p, d, view).ok(),
            PairPolicy::PerPool { prefill, decode } => {
                Some((prefill.select_single(p, view).ok()?, decode.select_single(d, view).ok()?))
            }
        }
    }

    /// The policy reported as the router's (the prefill pool's when split).
    pub fn primary(&self) -> &Arc<dyn RoutingPolicy> {
        match self {
            PairPolicy::Joint(p) => p,
            PairPolicy::PerPool { prefill, .. } => prefill,
        }
    }

    fn decode_policy(&self) -> &Arc<dyn RoutingPolicy> {
        match self {
            PairPolicy::Joint(p) => p,
            PairPolicy::PerPool { decode, .. } => decode,
        }
    }
}

/// Routes requests to prefill/decode pairs.
#[derive(Debug, Clone)]
pub struct PdRouter {
    registry: Arc<WorkerRegistry>,
    policy: PairPolicy,
    upstream: Upstream,
    retry: RetryConfig,
    metrics: Arc<Metrics>,
    style: PdStyle,
    prefill_timeout: Duration,
}

/// Why a leg failed (for retry bookkeeping).
enum LegFailure {
    Prefill(Arc<Worker>, ApiError),
    Decode(Arc<Worker>, ApiError),
    /// The decode leg failed while the prefill leg had not answered: either may be at fault
    /// (a hung prefill makes the decode worker time out waiting for its KV), so the retry
    /// avoids both.
    Both(Arc<Worker>, Arc<Worker>, ApiError),
}

fn is_role(w: &Worker, prefill: bool) -> bool {
    matches!((w.role(), prefill), (WorkerRole::Prefill { .. }, true) | (WorkerRole::Decode, false))
}

fn host_of(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    match rest.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']').to_owned(),
        None => rest.to_owned(),
    }
}

/// Size of a batched SGLang request (`text` or `input_ids` as a list of prompts), if batched.
fn batch_size(body: &Value) -> Option<usize> {
    match body.get("text") {
        Some(Value::Array(a)) => return Some(a.len()),
        Some(_) => return None,
        None => {}
    }
    match body.get("input_ids") {
        Some(Value::Array(a)) if a.first().is_some_and(Value::is_array) => Some(a.len()),
        _ => None,
    }
}

fn unreachable(w: &Worker, e: impl std::fmt::Display) -> ApiError {
    ApiError::WorkerUnreachable { worker: w.url().to_owned(), reason: e.to_string() }
}

impl PdRouter {
    /// A PD router over the registry's prefill and decode workers.
    pub fn new(
        registry: Arc<WorkerRegistry>,
        policy: PairPolicy,
        upstream: Upstream,
        retry: RetryConfig,
        metrics: Arc<Metrics>,
        style: PdStyle,
        prefill_timeout: Duration,
    ) -> Self {
        Self { registry, policy, upstream, retry, metrics, style, prefill_timeout }
    }

    /// The pair policy.
    pub fn policy(&self) -> &PairPolicy {
        &self.policy
    }

    fn pool(&self, prefill: bool, tried: &[Arc<Worker>]) -> Vec<Arc<Worker>> {
        self.registry
            .healthy()
            .iter()
            .filter(|w| is_role(w, prefill) && w.breaker().allows() && !tried.iter().any(|t| Arc::ptr_eq(t, w)))
            .cloned()
            .collect()
    }

    /// Routes one request through a prefill/decode pair, retrying on a new pair while
    /// nothing has reached the client.
    pub async fn route(
        &self,
        route: &'static str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, ApiError> {
        let view = super::parse_view(headers, &body)?;
        let json: Value = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let (mut tried_p, mut tried_d) = (Vec::new(), Vec::new());
        let mut last_error = ApiError::NoHealthyWorkers;
        for attempt in 0..self.retry.max_attempts.max(1) {
            if attempt > 0 {
                self.metrics.retry();
                tokio::time::sleep(self.retry.backoff(attempt as u32, rand::random())).await;
            }
            let (pp, dp) = (self.pool(true, &tried_p), self.pool(false, &tried_d));
            let Some((pi, di)) = self.policy.select(&pp, &dp, &view) else { break };
            let (p, d) = (pp[pi].clone(), dp[di].clone());
            tracing::debug!(prefill = p.url(), decode = d.url(), attempt, "pd routing decision");
            let result = match self.style {
                PdStyle::Sglang => self.sglang(route, headers, &json, &p, &d, view.dispatch_info()).await,
                PdStyle::Vllm => self.vllm(route, headers, &json, &p, &d, view.dispatch_info()).await,
            };
            match result {
                Ok(resp) => return Ok(resp),
                Err(LegFailure::Prefill(w, e)) => {
                    tracing::warn!(worker = w.url(), error = %e, "prefill leg failed; decode leg cancelled");
                    last_error = e;
                    tried_p.push(w);
                }
                Err(LegFailure::Decode(w, e)) => {
                    tracing::warn!(worker = w.url(), error = %e, "decode leg failed; prefill leg cancelled");
                    last_error = e;
                    tried_d.push(w);
                }
                Err(LegFailure::Both(pw, dw, e)) => {
                    tracing::warn!(prefill = pw.url(), decode = dw.url(), error = %e, "decode leg failed before the prefill leg answered; both cancelled");
                    last_error = e;
                    tried_p.push(pw);
                    tried_d.push(dw);
                }
            }
        }
        Err(last_error)
    }

    /// Sends `body` to a prefill `worker` and reads the whole answer, within the prefill timeout.
    async fn whole(
        &self,
        worker: &Worker,
        route: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<(u16, Bytes), ApiError> {
        let limit = self.prefill_timeout.min(self.upstream.timeout);
        let timed_out = || ApiError::Timeout { worker: worker.url().to_owned(), secs: limit.as_secs_f64() };
        tokio::time::timeout(limit, self.whole_unbounded(worker, route, headers, body))
            .await
            .map_err(|_| timed_out())?
    }

    async fn whole_unbounded(
        &self,
        worker: &Worker,
        route: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<(u16, Bytes), ApiError> {
        let resp = self.upstream.send(Method::POST, worker.url(), route, headers, body).await.map_err(|e| match e {
            SendError::Timeout => {
                ApiError::Timeout { worker: worker.url().to_owned(), secs: self.upstream.timeout.as_secs_f64() }
            }
            e => unreachable(worker, e),
        })?;
        let status = resp.status().as_u16();
        let bytes = self.upstream.read_whole(resp.into_body()).await.map_err(|e| match e {
            SendError::Timeout => {
                ApiError::Timeout { worker: worker.url().to_owned(), secs: self.upstream.timeout.as_secs_f64() }
            }
            e => unreachable(worker, format!("the response body broke: {e}")),
        })?;
        Ok((status, bytes))
    }

    async fn sglang(
        &self,
        route: &'static str,
        headers: &HeaderMap,
        json: &Value,
        p: &Arc<Worker>,
        d: &Arc<Worker>,
        info: DispatchInfo,
    ) -> Result<Response<Body>, LegFailure> {
        let bootstrap_port = match p.role() {
            WorkerRole::Prefill { bootstrap_port } => bootstrap_port,
            _ => None,
        };
        let mut body = json.clone();
        let room = || rand::random::<u64>() >> 1;
        match batch_size(json) {
            Some(n) => {
                body["bootstrap_host"] = json!(vec![host_of(p.url()); n]);
                body["bootstrap_port"] = json!(vec![bootstrap_port; n]);
                body["bootstrap_room"] = json!((0..n).map(|_| room()).collect::<Vec<_>>());
            }
            None => {
                body["bootstrap_host"] = json!(host_of(p.url()));
                body["bootstrap_port"] = json!(bootstrap_port);
                body["bootstrap_room"] = json!(room());
            }
        }
        let bytes = Bytes::from(body.to_string());
        let want_logprobs = json.get("return_logprob").and_then(Value::as_bool).unwrap_or(false);
        let stream = json.get("stream").and_then(Value::as_bool).unwrap_or(false);

        // Prefill leg: its own task, so it can be cancelled (aborted) or left to finish.
        let prefill_guard = InFlightGuard::dispatch(p.clone(), info, Instant::now());
        let prefill = {
            let (this, p, headers, bytes) = (self.clone(), p.clone(), headers.clone(), bytes.clone());
            tokio::spawn(async move {
                let answer = this.whole(&p, route, &headers, bytes).await;
                let ok = matches!(&answer, Ok((s, _)) if !is_worker_failure_code(*s));
                // The prefill leg's whole answer is its first token.
                let mut prefill_guard = prefill_guard;
                prefill_guard.mark_first_byte();
                let outcome = prefill_guard.complete(ok);
                this.policy.primary().on_request_complete(&outcome);
                answer
            })
        };
        let mut prefill = AbortOnDrop { handle: prefill, detached: false };
        let decode_guard = InFlightGuard::dispatch(d.clone(), info, Instant::now());
        let decode = self.upstream.send(Method::POST, d.url(), route, headers, bytes);
        tokio::pin!(decode);
        let mut prefill_answer: Option<Bytes> = None;
        let decode_resp = loop {
            tokio::select! {
                joined = &mut prefill.handle, if prefill_answer.is_none() => {
                    match joined {
                        Ok(Ok((status, b))) if !is_worker_failure_code(status) => prefill_answer = Some(b),
                        Ok(Ok((status, _))) => return Err(LegFailure::Prefill(p.clone(), ApiError::WorkerFailed { worker: p.url().to_owned(), status })),
                        Ok(Err(e)) => return Err(LegFailure::Prefill(p.clone(), e)),
                        Err(e) => return Err(LegFailure::Prefill(p.clone(), unreachable(p, e))),
                    }
                }
                sent = &mut decode => {
                    let error = match sent {
                        Ok(resp) if !is_worker_failure(resp.status()) => break resp,
                        Ok(resp) => ApiError::WorkerFailed { worker: d.url().to_owned(), status: resp.status().as_u16() },
                        Err(SendError::Timeout) => ApiError::Timeout { worker: d.url().to_owned(), secs: self.upstream.timeout.as_secs_f64() },
                        Err(e) => unreachable(d, e),
                    };
                    decode_guard.complete(false);
                    return Err(if prefill_answer.is_none() {
                        LegFailure::Both(p.clone(), d.clone(), error)
                    } else {
                        LegFailure::Decode(d.clone(), error)
                    });
                }
            }
        };
        if stream && is_event_stream(&decode_resp) {
            // Prompt logprobs come from the prefill leg (already done: the decode worker only
            // answers once the KV is there); otherwise it finishes on its own.
            let inject = if want_logprobs {
                let answer = match prefill_answer.take() {
                    Some(b) => Some(b),
                    None => match (&mut prefill.handle).await {
                        Ok(Ok((_, b))) => Some(b),
                        _ => None,
                    },
                };
                answer.as_deref().and_then(prompt_logprobs)
            } else {
                None
            };
            prefill.detach();
            let observer =
                StreamObserver { policy: self.policy.decode_policy().clone(), metrics: self.metrics.clone(), route };
            let mut out = relay_stream(decode_resp, decode_guard, observer);
            out.extensions_mut().insert(RoutedTo(d.clone()));
            if let Some(logprobs) = inject {
                let (parts, body) = out.into_parts();
                out = Response::from_parts(parts, Body::new(InjectLogprobs::new(body, logprobs)));
            }
            return Ok(out);
        }
        let (parts, incoming) = decode_resp.into_parts();
        let decode_bytes = match self.upstream.read_whole(incoming).await {
            Ok(b) => b,
            Err(_) => {
                decode_guard.complete(false);
                return Err(LegFailure::Decode(d.clone(), unreachable(d, "the response body broke")));
            }
        };
        let decode_outcome = decode_guard.complete(true);
        self.policy.decode_policy().on_request_complete(&decode_outcome);
        let mut body = decode_bytes;
        if want_logprobs {
            let prefill_bytes = match prefill_answer {
                Some(b) => b,
                None => match (&mut prefill.handle).await {
                    Ok(Ok((_, b))) => b,
                    _ => return Err(LegFailure::Prefill(p.clone(), unreachable(p, "no prefill answer for logprobs"))),
                },
            };
            body = merge_input_logprobs(&prefill_bytes, body);
        } else {
            prefill.detach();
        }
        let mut out = buffered(parts, body);
        out.extensions_mut().insert(RoutedTo(d.clone()));
        Ok(out)
    }

    async fn vllm(
        &self,
        route: &'static str,
        headers: &HeaderMap,
        json: &Value,
        p: &Arc<Worker>,
        d: &Arc<Worker>,
        info: DispatchInfo,
    ) -> Result<Response<Body>, LegFailure> {
        let mut prefill_body = json.clone();
        prefill_body["max_tokens"] = json!(1);
        if prefill_body.get("max_completion_tokens").is_some() {
            prefill_body["max_completion_tokens"] = json!(1);
        }
        prefill_body["stream"] = json!(false);
        if let Some(o) = prefill_body.as_object_mut() {
            o.remove("stream_options");
        }
        prefill_body["kv_transfer_params"] = json!({
            "do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null,
        });
        let mut guard = InFlightGuard::dispatch(p.clone(), info, Instant::now());
        let answer = self.whole(p, route, headers, Bytes::from(prefill_body.to_string())).await;
        let params = match answer {
            Ok((status, b)) if !is_worker_failure_code(status) => {
                guard.mark_first_byte();
                self.policy.primary().on_request_complete(&guard.complete(true));
                serde_json::from_slice::<Value>(&b)
                    .ok()
                    .and_then(|v| v.get("kv_transfer_params").cloned())
                    .unwrap_or(Value::Null)
            }
            Ok((status, _)) => {
                guard.complete(false);
                return Err(LegFailure::Prefill(
                    p.clone(),
                    ApiError::WorkerFailed { worker: p.url().to_owned(), status },
                ));
            }
            Err(e) => {
                guard.complete(false);
                return Err(LegFailure::Prefill(p.clone(), e));
            }
        };
        let mut decode_body = json.clone();
        decode_body["kv_transfer_params"] = params;
        let guard = InFlightGuard::dispatch(d.clone(), info, Instant::now());
        match self.upstream.send(Method::POST, d.url(), route, headers, Bytes::from(decode_body.to_string())).await {
            Ok(resp) if is_worker_failure(resp.status()) => {
                let status = resp.status().as_u16();
                guard.complete(false);
                Err(LegFailure::Decode(d.clone(), ApiError::WorkerFailed { worker: d.url().to_owned(), status }))
            }
            Ok(resp) if is_event_stream(&resp) => {
                let observer = StreamObserver {
                    policy: self.policy.decode_policy().clone(),
                    metrics: self.metrics.clone(),
                    route,
                };
                let mut out = relay_stream(resp, guard, observer);
                out.extensions_mut().insert(RoutedTo(d.clone()));
                Ok(out)
            }
            Ok(resp) => {
                let (parts, incoming) = resp.into_parts();
                match self.upstream.read_whole(incoming).await {
                    Ok(b) => {
                        self.policy.decode_policy().on_request_complete(&guard.complete(true));
                        let mut out = buffered(parts, b);
                        out.extensions_mut().insert(RoutedTo(d.clone()));
                        Ok(out)
                    }
                    Err(_) => {
                        guard.complete(false);
                        Err(LegFailure::Decode(d.clone(), unreachable(d, "the response body broke")))
                    }
                }
            }
            Err(e) => {
                guard.complete(false);
                Err(LegFailure::Decode(d.clone(), unreachable(d, e)))
            }
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
/// leg); the rest passes through untouched.
struct InjectLogprobs {
    inner: Body,
    logprobs: Option<Value>,
    pending: Vec<u8>,
}

impl InjectLogprobs {
    fn new(inner: Body, logprobs: Value) -> Self {
        Self { inner, logprobs: Some(logprobs), pending: Vec::new() }
    }

    /// Rewrites the first complete event in `pending`; returns the bytes ready to send.
    fn rewrite_first(&mut self) -> Option<Bytes> {
        let end = self.pending.windows(2).position(|w| w == b"\n\n")? + 2;
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
        assert_eq!(batch_size(&json!({"text": ["a", "b"]})), Some(2));
        assert_eq!(batch_size(&json!({"text": "a"})), None);
        assert_eq!(batch_size(&json!({"input_ids": [[1], [2], [3]]})), Some(3));
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
}
