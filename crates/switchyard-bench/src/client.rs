//! The load generator's HTTP side: streaming completions with exact output lengths
//! (`ignore_eos`, `max_tokens`), timed per token, over one pooled HTTP/1.1 client.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::metrics::RequestResult;
use crate::workload::RequestSpec;

/// A pooled keep-alive HTTP/1.1 client with TCP_NODELAY.
pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(connector)
}

/// A pooled client for one target.
#[derive(Debug, Clone)]
pub struct LoadClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    model: String,
    /// Wall-clock seconds are multiplied by this to give simulated seconds.
    pub time_scale: f64,
    timeout: Duration,
}

impl LoadClient {
    /// A client sending to `base` (`http://host:port`).
    pub fn new(base: &str, model: &str, time_scale: f64, timeout: Duration) -> Self {
        let client = http_client();
        Self { client, base: base.trim_end_matches('/').to_owned(), model: model.to_owned(), time_scale, timeout }
    }

    /// Sends one streamed completion; `sent_at` is its offset (simulated seconds) in the run.
    pub async fn send(&self, spec: &RequestSpec, sent_at: f64) -> RequestResult {
        let prompt = spec.prompt.text();
        let mut result = RequestResult { sent_at, prompt_tokens: spec.prompt.tokens(), ..RequestResult::default() };
        let body = json!({
            "model": self.model, "prompt": prompt, "max_tokens": spec.output_tokens, "ignore_eos": true,
            "stream": true, "stream_options": {"include_usage": true}, "temperature": 0,
        });
        let mut req =
            hyper::Request::post(format!("{}/v1/completions", self.base)).header("content-type", "application/json");
        if let Some(s) = spec.session {
            req = req.header("x-session-id", s.to_string());
        }
        let req = match req.body(Full::new(Bytes::from(body.to_string()))) {
            Ok(r) => r,
            Err(e) => {
                result.error = Some(format!("request: {e}"));
                return result;
            }
        };
        let start = Instant::now();
        let scale = self.time_scale;
        let secs = |t: Instant| t.saturating_duration_since(start).as_secs_f64() * scale;
        let outcome = tokio::time::timeout(self.timeout, async {
            let resp = self.client.request(req).await.map_err(|e| format!("transport: {e}"))?;
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                let text = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                return Err(format!(
                    "{}: {}",
                    status.as_u16(),
                    String::from_utf8_lossy(&text).chars().take(200).collect::<String>()
                ));
            }
            let mut buf: Vec<u8> = Vec::new();
            let mut last: Option<Instant> = None;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("stream broke: {e}"))?;
                let Some(data) = frame.data_ref() else { continue };
                let now = Instant::now();
                buf.extend_from_slice(data);
                while let Some(end) = find(&buf, b"\n\n") {
                    let event: Vec<u8> = buf.drain(..end + 2).collect();
                    let Some(payload) = event.strip_prefix(b"data: ") else { continue };
                    let payload = payload.trim_ascii();
                    if payload == b"[DONE]" {
                        continue;
                    }
                    let v: Value = serde_json::from_slice(payload).map_err(|e| format!("bad event: {e}"))?;
                    if v.get("error").is_some() {
                        return Err(format!("stream error: {}", v["error"]));
                    }
                    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                        let n = |k: &str| u.get(k).and_then(Value::as_u64).map(|n| n as u32);
                        result.output_tokens = n("completion_tokens").unwrap_or(result.output_tokens);
                        if let Some(p) = n("prompt_tokens") {
                            result.prompt_tokens = p;
                        }
                        result.cached_tokens = u
                            .pointer("/prompt_tokens_details/cached_tokens")
                            .and_then(Value::as_u64)
                            .map_or(0, |c| c as u32);
                    }
                    let has_text = v.pointer("/choices/0/text").and_then(Value::as_str).is_some_and(|t| !t.is_empty());
                    if has_text {
                        match last {
                            None => result.ttft = Some(secs(now)),
                            Some(prev) => result.itl.push(now.saturating_duration_since(prev).as_secs_f64() * scale),
                        }
                        last = Some(now);
                    }
                }
            }
            if last.is_none() {
                return Err("the stream ended without a token".into());
            }
            if result.output_tokens == 0 {
                result.output_tokens = result.itl.len() as u32 + 1;
            }
            Ok(())
        })
        .await;
        result.e2e = secs(Instant::now());
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result.error = Some(e),
            Err(_) => result.error = Some(format!("timeout after {:?}", self.timeout)),
        }
        result
    }

    /// GET `path` on `base`; the body as text when the answer is 2xx.
    pub async fn get(&self, base: &str, path: &str) -> Option<String> {
        let req = hyper::Request::get(format!("{base}{path}")).body(Full::new(Bytes::new())).ok()?;
        let resp = tokio::time::timeout(Duration::from_secs(5), self.client.request(req)).await.ok()?.ok()?;
        let ok = resp.status().is_success();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        ok.then(|| String::from_utf8_lossy(&body).into_owned())
    }

    /// POST an empty or JSON body to `base` + `path`; whether it answered 2xx.
    pub async fn post(&self, base: &str, path: &str, body: &str) -> bool {
        let Ok(req) = hyper::Request::post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
        else {
            return false;
        };
        matches!(tokio::time::timeout(Duration::from_secs(5), self.client.request(req)).await, Ok(Ok(r)) if r.status().is_success())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends `specs` open-loop at their arrival times (simulated seconds ÷ time scale of real
/// time), request i through `clients[i mod n]` (router replicas sharing the traffic), and
/// returns the results in order. `on_progress` is called as requests finish.
pub async fn run_open_loop(
    clients: &[LoadClient],
    specs: &[RequestSpec],
    mut on_progress: impl FnMut(usize, usize),
) -> Vec<RequestResult> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, spec) in specs.iter().enumerate() {
        let (client, spec) = (clients[i % clients.len()].clone(), spec.clone());
        let at = start + Duration::from_secs_f64(spec.at / client.time_scale);
        tasks.spawn(async move {
            tokio::time::sleep_until(at).await;
            let sent = start.elapsed().as_secs_f64() * client.time_scale;
            (i, client.send(&spec, sent).await)
        });
    }
    collect(tasks, specs.len(), &mut on_progress).await
}

/// Keeps `concurrency` requests outstanding over `specs` (closed loop).
pub async fn run_closed_loop(client: &LoadClient, specs: &[RequestSpec], concurrency: usize) -> Vec<RequestResult> {
    let start = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let specs = std::sync::Arc::new(specs.to_vec());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, next, specs) = (client.clone(), next.clone(), specs.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(spec) = specs.get(i) else { break };
                let sent = start.elapsed().as_secs_f64() * client.time_scale;
                out.push((i, client.send(spec, sent).await));
            }
            out
        });
    }
    let mut results = vec![RequestResult::default(); specs.len()];
    while let Some(done) = tasks.join_next().await {
        for (i, r) in done.unwrap_or_default() {
            results[i] = r;
        }
    }
    results
}

async fn collect(
    mut tasks: tokio::task::JoinSet<(usize, RequestResult)>,
    n: usize,
    on_progress: &mut impl FnMut(usize, usize),
) -> Vec<RequestResult> {
    let mut results = vec![RequestResult::default(); n];
    let mut done = 0;
    while let Some(joined) = tasks.join_next().await {
        if let Ok((i, r)) = joined {
            results[i] = r;
        }
        done += 1;
        on_progress(done, n);
    }
    results
}
