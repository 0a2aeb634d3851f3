//! The simulated worker's HTTP API and fault injection, on ephemeral loopback ports.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use switchyard_sim::server::{spawn_worker, Faults, WorkerConfig, WorkerHandle};

struct Answer {
    status: StatusCode,
    content_type: String,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The JSON payloads of an SSE body, and whether it ended with `[DONE]`.
    fn sse(&self) -> (Vec<Value>, bool) {
        let text = self.text();
        let mut events = Vec::new();
        let mut done = false;
        for frame in text.split("\n\n").filter(|f| !f.is_empty()) {
            let data = frame.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data frame: {frame:?}"));
            if data == "[DONE]" {
                done = true;
            } else {
                assert!(!done, "data after [DONE]");
                events.push(serde_json::from_str(data).unwrap());
            }
        }
        (events, done)
    }
}

async fn call(method: &str, url: String, body: &str) -> Result<Answer, String> {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let resp = client.request(req).await.map_err(|e| format!("request: {e:?}"))?;
    let status = resp.status();
    let content_type = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let body = resp.into_body().collect().await.map_err(|e| format!("body: {e:?}"))?.to_bytes();
    Ok(Answer { status, content_type, body })
}

async fn post(w: &WorkerHandle, path: &str, body: Value) -> Answer {
    call("POST", format!("{}{path}", w.url()), &body.to_string()).await.unwrap()
}

async fn get(w: &WorkerHandle, path: &str) -> Answer {
    call("GET", format!("{}{path}", w.url()), "").await.unwrap()
}

async fn worker(time_scale: f64) -> WorkerHandle {
    spawn_worker(WorkerConfig { time_scale, ..WorkerConfig::default() }).await.unwrap()
}

#[tokio::test]
async fn generate_native_api_with_meta_info() {
    let w = worker(100.0).await;
    let a = post(
        &w,
        "/generate",
        json!({"text": "The quick brown fox jumps", "sampling_params": {"max_new_tokens": 7, "ignore_eos": true}}),
    )
    .await;
    assert_eq!(a.status, 200);
    let v = a.json();
    let m = &v["meta_info"];
    assert_eq!((m["prompt_tokens"].as_u64(), m["completion_tokens"].as_u64()), (Some(7), Some(7)));
    assert_eq!(m["finish_reason"]["type"], "length");
    assert!(m["e2e_latency"].as_f64().unwrap() > 0.0);
    assert_eq!(v["text"].as_str().unwrap().split_whitespace().count(), 7);
    // input_ids and streaming: cumulative text, finish on the last chunk, then [DONE].
    let a = post(&w, "/generate", json!({"input_ids": [1, 2, 3, 4, 5], "sampling_params": {"max_new_tokens": 4, "ignore_eos": true}, "stream": true})).await;
    assert_eq!(a.content_type, "text/event-stream");
    let (events, done) = a.sse();
    assert!(done);
    assert_eq!(events.len(), 4);
    assert_eq!(events[3]["meta_info"]["completion_tokens"], 4);
    assert_eq!(events[3]["meta_info"]["prompt_tokens"], 5);
    assert!(events[2]["meta_info"]["finish_reason"].is_null());
    assert!(events[3]["text"].as_str().unwrap().starts_with(events[2]["text"].as_str().unwrap()));
}

#[tokio::test]
async fn openai_chat_and_completions_with_usage_and_cached_tokens() {
    let w = worker(100.0).await;
    let system = "You are a meticulous assistant. ".repeat(40);
    let chat = |q: &str| json!({"model": "x", "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}], "max_tokens": 5, "ignore_eos": true});
    let first = post(&w, "/v1/chat/completions", chat("first question")).await.json();
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["choices"][0]["message"]["role"], "assistant");
    assert_eq!(first["choices"][0]["finish_reason"], "length");
    assert_eq!(first["usage"]["completion_tokens"], 5);
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let u = &first["usage"];
    assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + 5);
    let second = post(&w, "/v1/chat/completions", chat("second question")).await.json();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= 300, "shared system prompt must hit the prefix cache, got {cached}");

    let c = post(&w, "/v1/completions", json!({"prompt": "Once upon a time", "max_tokens": 3, "ignore_eos": true}))
        .await
        .json();
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["usage"]["completion_tokens"], 3);
    assert_eq!(c["choices"][0]["text"].as_str().unwrap().split_whitespace().count(), 3);
    // Without ignore_eos the length is drawn and capped by max_tokens.
    for _ in 0..5 {
        let c = post(&w, "/v1/completions", json!({"prompt": "x y z", "max_tokens": 20})).await.json();
        let n = c["usage"]["completion_tokens"].as_u64().unwrap();
        assert!((1..=20).contains(&n));
        assert_eq!(c["choices"][0]["finish_reason"], if n < 20 { "stop" } else { "length" });
    }
}

#[tokio::test]
async fn openai_streams_role_deltas_finish_usage_and_done() {
    let w = worker(100.0).await;
    let a = post(&w, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}})).await;
    let (events, done) = a.sse();
    assert!(done);
    assert_eq!(events.len(), 5, "role chunk + 3 tokens + usage");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk"));
    assert_eq!(events[3]["choices"][0]["finish_reason"], "length");
    assert!(events[2]["choices"][0]["finish_reason"].is_null());
    assert_eq!(events[4]["choices"], json!([]));
    assert_eq!(events[4]["usage"]["completion_tokens"], 3);
    // No usage chunk unless asked.
    let a =
        post(&w, "/v1/completions", json!({"prompt": "hi", "max_tokens": 2, "ignore_eos": true, "stream": true})).await;
    let (events, done) = a.sse();
    assert!(done && events.len() == 2 && events.iter().all(|e| e.get("usage").is_none()));
    assert_eq!(events[1]["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn info_load_metrics_and_cache_endpoints() {
    let w = worker(100.0).await;
    assert_eq!(get(&w, "/health").await.status, 200);
    assert_eq!(get(&w, "/health_generate").await.status, 200);
    assert_eq!(get(&w, "/v1/models").await.json()["data"][0]["id"], "meta-llama/Llama-3.1-8B-Instruct");
    assert_eq!(get(&w, "/get_model_info").await.json()["is_generation"], true);
    assert_eq!(get(&w, "/get_server_info").await.json()["max_total_num_tokens"], 430_000);
    post(&w, "/generate", json!({"text": "a b c d e f g h i j k l m n o p q r s t u v w x y z ".repeat(10), "sampling_params": {"max_new_tokens": 2}})).await;
    let load = get(&w, "/get_load").await.json();
    assert_eq!(load["num_reqs"], 0);
    assert!(load["num_tokens"].as_u64().unwrap() > 0, "prefix cache holds the prompt");
    let metrics = get(&w, "/metrics").await.text();
    for family in [
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens_total",
    ] {
        assert!(metrics.contains(&format!("# TYPE {family} ")), "missing {family}");
    }
    assert!(
        metrics.contains("sglang:generation_tokens_total{model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 3"),
        "{metrics}"
    );
    assert_eq!(post(&w, "/flush_cache", json!({})).await.status, 200);
    // The flush is processed by the engine task; the gauge follows once it has run.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while get(&w, "/get_load").await.json()["num_tokens"] != 0 {
        assert!(tokio::time::Instant::now() < deadline, "flush_cache did not empty the cache");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(get(&w, "/nope").await.status, 404);
}

#[tokio::test]
async fn bad_requests_get_engine_style_400s() {
    let w = worker(100.0).await;
    for (path, body, needle) in [
        ("/v1/chat/completions", "{broken", "invalid JSON"),
        ("/v1/chat/completions", r#"{"messages": "hi"}"#, "messages"),
        ("/v1/completions", r#"{"prompt": "x", "max_tokens": 0}"#, "max_tokens"),
        ("/v1/completions", r#"{"prompt": "x", "n": 2}"#, "n=1"),
        ("/generate", r#"{"sampling_params": {"max_new_tokens": 3}}"#, "text"),
        ("/generate", r#"{"text": ""}"#, "empty"),
        (
            "/generate",
            &format!(r#"{{"text": "x", "sampling_params": {{"max_new_tokens": {}}}}}"#, 200_000),
            "context length",
        ),
    ] {
        let a = call("POST", format!("{}{path}", w.url()), body).await.unwrap();
        assert_eq!(a.status, 400, "{path} {body}");
        let v = a.json();
        assert_eq!((v["object"].as_str(), v["code"].as_u64()), (Some("error"), Some(400)));
        assert!(v["message"].as_str().unwrap().contains(needle), "{v}");
    }
    let bad = post(&w, "/sim/faults", json!({"error_rate": 2.0})).await;
    assert_eq!(bad.status, 400);
    let bad = post(&w, "/sim/faults", json!({"no_such_fault": true})).await;
    assert!(bad.status == 400 && bad.json()["message"].as_str().unwrap().contains("no_such_fault"));
}

#[tokio::test]
async fn each_fault_is_observed_by_a_client() {
    let w = worker(100.0).await;
    let req = json!({"prompt": "hello", "max_tokens": 20, "ignore_eos": true});
    let set = |f: Value| post(&w, "/sim/faults", f);
    // Error rate with a chosen status.
    assert_eq!(set(json!({"error_rate": 1.0, "error_status": 503})).await.status, 200);
    assert_eq!(post(&w, "/v1/completions", req.clone()).await.status, 503);
    assert_eq!(get(&w, "/sim/faults").await.json()["error_status"], 503);
    // Malformed JSON with 200.
    set(json!({"malformed": true})).await;
    let a = post(&w, "/v1/completions", req.clone()).await;
    assert!(a.status == 200 && serde_json::from_slice::<Value>(&a.body).is_err());
    // Health failing while inference works.
    set(json!({"health_fail": true})).await;
    assert_eq!(get(&w, "/health").await.status, 503);
    assert_eq!(post(&w, "/v1/completions", req.clone()).await.status, 200);
    // Dies mid-stream: the body breaks after the first tokens.
    set(json!({"die_after_tokens": 5})).await;
    let r = call(
        "POST",
        format!("{}/v1/completions", w.url()),
        &json!({"prompt": "x", "max_tokens": 20, "ignore_eos": true, "stream": true}).to_string(),
    )
    .await;
    assert!(r.is_err(), "a cut stream must not look complete: {:?}", r.map(|a| a.text()));
    // Hang: accepted, never answered.
    set(json!({"hang": true})).await;
    let hung = tokio::time::timeout(Duration::from_millis(300), post(&w, "/v1/completions", req.clone())).await;
    assert!(hung.is_err(), "a hung worker answered");
    // Refuse connections, then recover on the same port.
    set(json!({"refuse_connections": true})).await;
    let refused = call("GET", format!("{}/health", w.url()), "").await;
    assert!(refused.is_err(), "connection accepted while refusing");
    w.set_faults(Faults::default()).unwrap();
    let mut ok = false;
    for _ in 0..200 {
        if let Ok(a) = call("GET", format!("{}/health", w.url()), "").await {
            ok = a.status == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(ok, "worker did not accept connections again");
    assert_eq!(post(&w, "/v1/completions", req).await.status, 200);
}

async fn e2e_seconds(w: &WorkerHandle, tokens: u32) -> f64 {
    let start = tokio::time::Instant::now();
    let a = post(w, "/v1/completions", json!({"prompt": "p", "max_tokens": tokens, "ignore_eos": true})).await;
    assert_eq!(a.status, 200);
    start.elapsed().as_secs_f64()
}

#[tokio::test]
async fn time_scale_and_slowdown_scale_latency() {
    // 400 single-sequence steps ≈ 400 × 5.8 ms = 2.3 s of simulated time.
    let fast = worker(40.0).await; // ≈ 58 ms real
    let slow = worker(10.0).await; // ≈ 230 ms real
    let (tf, ts) = (e2e_seconds(&fast, 400).await, e2e_seconds(&slow, 400).await);
    let (simulated_fast, simulated_slow) = (tf * 40.0, ts * 10.0);
    assert!(
        (simulated_fast / simulated_slow - 1.0).abs() < 0.35,
        "scaled latencies differ: {simulated_fast} vs {simulated_slow}"
    );
    assert!(simulated_slow > 1.8 && simulated_slow < 3.5, "{simulated_slow}");
    // A 4× slowdown fault makes the same request ~4× slower.
    fast.set_faults(Faults { slowdown: 4.0, ..Faults::default() }).unwrap();
    let degraded = e2e_seconds(&fast, 400).await;
    assert!(degraded / tf > 2.5, "slowdown not applied: {tf} → {degraded}");
}
