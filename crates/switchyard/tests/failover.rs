//! Mid-stream failover end to end: streams cut, stalled or failed by simulated workers are
//! continued on other workers, and the client's stream reads as one answer — the simulator's
//! deterministic output makes the expected text, ids and counts known exactly.

mod common;

use std::time::Duration;

use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use switchyard::config::{PdConfig, PdStyle, RetryConfig, RouterConfig};
use switchyard::policies::PolicyKind;
use switchyard_sim::model::tokenizer::{output_token_id, output_token_text};
use switchyard_sim::server::{spawn_worker, Faults, Role, WorkerConfig, WorkerHandle};

const TOKENS: u32 = 12;

async fn sim(role: Role, seed: u64, faults: Faults) -> WorkerHandle {
    let cfg = WorkerConfig { time_scale: 100.0, pd_timeout_secs: 0.5, role, seed, ..WorkerConfig::default() };
    let w = spawn_worker(cfg).await.unwrap();
    w.set_faults(faults).unwrap();
    w
}

/// Every way a worker breaks a stream mid-way, each after a few tokens.
fn breakages() -> [Faults; 3] {
    [
        Faults { die_after_tokens: Some(3), ..Faults::default() },
        Faults { stall_after_tokens: Some(6), ..Faults::default() },
        Faults { error_event_after_tokens: Some(4), ..Faults::default() },
    ]
}

fn tune(cfg: &mut RouterConfig, failover_max: u32) {
    cfg.stream_failover_max = failover_max;
    cfg.stream_idle_timeout = Duration::from_millis(300);
    cfg.retry = RetryConfig {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..RetryConfig::default()
    };
}

fn expected_text(n: u32) -> String {
    (0..n).map(output_token_text).collect()
}

/// One request per API, streamed, `TOKENS` tokens exactly.
fn requests(i: usize) -> [(&'static str, Value); 3] {
    let prompt = format!("request {i}: write something long");
    [
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS,
                   "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": prompt, "max_tokens": TOKENS, "ignore_eos": true, "stream": true,
                   "stream_options": {"include_usage": true}}),
        ),
        (
            "/generate",
            json!({"text": prompt, "sampling_params": {"max_new_tokens": TOKENS, "ignore_eos": true}, "stream": true}),
        ),
    ]
}

/// The JSON chunks of an SSE answer, checking it ends with exactly one `[DONE]` and holds no
/// error event.
fn chunks(body: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(body);
    assert!(!text.contains("\"error\""), "an error event reached the client: {text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "the stream did not end with [DONE]: {text}");
    assert_eq!(text.matches("[DONE]").count(), 1, "{text}");
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad chunk {d:?}: {e}")))
        .collect()
}

/// Checks a streamed answer is the whole, unbroken answer of `TOKENS` tokens with
/// `prompt_tokens` prompt tokens.
fn check_whole_answer(route: &str, body: &[u8], prompt_tokens: u64) {
    let chunks = chunks(body);
    let want = expected_text(TOKENS);
    match route {
        "/generate" => {
            let last = chunks.last().unwrap();
            assert_eq!(last["text"], want.as_str());
            let ids: Vec<Value> = (0..TOKENS).map(|i| json!(output_token_id(i))).collect();
            assert_eq!(last["output_ids"], Value::Array(ids));
            let meta = &last["meta_info"];
            assert_eq!(
                (meta["completion_tokens"].as_u64(), meta["prompt_tokens"].as_u64()),
                (Some(TOKENS.into()), Some(prompt_tokens))
            );
            assert_eq!(meta["finish_reason"]["type"], "length");
            let rids: std::collections::HashSet<String> =
                chunks.iter().map(|c| c["meta_info"]["id"].to_string()).collect();
            assert_eq!(rids.len(), 1, "one request id: {rids:?}");
            // Every chunk's text extends the one before: nothing repeated or lost.
            let texts: Vec<&str> = chunks.iter().filter_map(|c| c["text"].as_str()).collect();
            assert!(texts.windows(2).all(|w| w[1].starts_with(w[0]) && w[1].len() > w[0].len()), "{texts:?}");
        }
        _ => {
            let chat = route == "/v1/chat/completions";
            let ids: std::collections::HashSet<String> = chunks.iter().map(|c| c["id"].to_string()).collect();
            assert_eq!(ids.len(), 1, "one response id: {ids:?}");
            let mut text = String::new();
            let (mut roles, mut finishes) = (0, Vec::new());
            for c in &chunks {
                for choice in c["choices"].as_array().unwrap() {
                    assert_eq!(choice["index"], 0);
                    let piece = if chat { &choice["delta"]["content"] } else { &choice["text"] };
                    text.push_str(piece.as_str().unwrap_or(""));
                    roles += usize::from(chat && choice["delta"].get("role").is_some());
                    if !choice["finish_reason"].is_null() {
                        finishes.push(choice["finish_reason"].clone());
                    }
                }
            }
            assert_eq!(text, want);
            if chat {
                assert_eq!(roles, 1, "exactly one role delta: {}", String::from_utf8_lossy(body));
            }
            assert_eq!(finishes, vec![json!("length")]);
            let usage = &chunks.last().unwrap()["usage"];
            assert_eq!(
                usage,
                &json!({"prompt_tokens": prompt_tokens, "completion_tokens": TOKENS,
                        "total_tokens": prompt_tokens + u64::from(TOKENS),
                        "prompt_tokens_details": usage["prompt_tokens_details"]}),
            );
        }
    }
}

/// Prompt tokens of `body` on an unbroken worker, asked directly.
async fn direct_prompt_tokens(worker: &str, route: &str, body: &Value) -> u64 {
    let mut body = body.clone();
    body["stream"] = json!(false);
    let a = post(&format!("{worker}{route}"), &body).await;
    let v = a.json();
    v["usage"]["prompt_tokens"].as_u64().or_else(|| v["meta_info"]["prompt_tokens"].as_u64()).unwrap()
}

async fn failovers(router: &str, outcome: &str) -> u64 {
    let text = String::from_utf8_lossy(&get(&format!("{router}/metrics")).await.body).to_string();
    let key = format!("switchyard_stream_failovers_total{{outcome=\"{outcome}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&key)).map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_continues_broken_streams_into_one_answer() {
    let mut fleet = Vec::new();
    for (i, f) in breakages().into_iter().enumerate() {
        fleet.push(sim(Role::Plain, i as u64, f).await);
    }
    let healthy = sim(Role::Plain, 9, Faults::default()).await;
    fleet.push(healthy);
    let urls: Vec<String> = fleet.iter().map(|w| w.url()).collect();
    let reference = urls[3].clone();
    for policy in PolicyKind::ALL {
        let mut cfg = config(urls.clone(), policy);
        tune(&mut cfg, 3);
        // Breakers stay closed, so broken workers keep getting first attempts.
        cfg.circuit_breaker.failure_threshold = 1_000;
        let r = router(cfg).await;
        let url = r.url();
        let mut tasks = Vec::new();
        for i in 0..4 {
            for (route, body) in requests(i) {
                let (url, reference) = (url.clone(), reference.clone());
                tasks.push(tokio::spawn(async move {
                    let a = post(&format!("{url}{route}"), &body).await;
                    assert_eq!(a.status, 200);
                    let prompt = direct_prompt_tokens(&reference, route, &body).await;
                    check_whole_answer(route, &a.body, prompt);
                }));
            }
        }
        for t in tasks {
            t.await.unwrap_or_else(|e| panic!("{policy:?}: {e}"));
        }
        assert!(failovers(&url, "continued").await >= 1, "{policy:?}: no stream was continued");
        assert_eq!(failovers(&url, "not_continued").await, 0);
        eventually(Duration::from_secs(5), "in-flight back to 0", || async { total_in_flight(&url).await == 0 }).await;
    }
}

fn pd_router(prefill: &[WorkerHandle], decode: &[WorkerHandle], style: PdStyle, policy: PolicyKind) -> RouterConfig {
    let mut cfg = config(vec![], policy);
    tune(&mut cfg, 2);
    cfg.circuit_breaker.failure_threshold = 1_000;
    cfg.pd = Some(PdConfig {
        style,
        prefill: prefill.iter().map(|w| (w.url(), w.bootstrap_port())).collect(),
        decode: decode.iter().map(|w| w.url()).collect(),
        prefill_policy: None,
        decode_policy: None,
        prefill_timeout: Duration::from_secs(1),
    });
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_dying_mid_stream_continues_on_another_pair() {
    let prefill = vec![sim(Role::Prefill, 1, Faults::default()).await, sim(Role::Prefill, 2, Faults::default()).await];
    let decode = vec![
        sim(Role::Decode, 3, Faults { die_after_tokens: Some(4), ..Faults::default() }).await,
        sim(Role::Decode, 4, Faults { stall_after_tokens: Some(5), ..Faults::default() }).await,
        sim(Role::Decode, 5, Faults::default()).await,
    ];
    let reference_worker = sim(Role::Plain, 6, Faults::default()).await;
    let reference = reference_worker.url();
    for style in [PdStyle::Sglang, PdStyle::Vllm] {
        for policy in PolicyKind::ALL {
            let r = router(pd_router(&prefill, &decode, style, policy)).await;
            let url = r.url();
            // consistent_hash sends each routing key to the decode worker its hash lands on, and
            // the ring follows worker ids, which differ run to run: three prompts (six keys:
            // completions and /generate share one) all missed both broken decode workers once
            // in a clean-clone run. Ten prompts, twenty keys, make that negligible.
            let prompts = if policy == PolicyKind::ConsistentHash { 10 } else { 3 };
            for i in 0..prompts {
                for (route, body) in requests(i) {
                    if style == PdStyle::Vllm && route == "/generate" {
                        continue; // vLLM has no /generate
                    }
                    let a = post(&format!("{url}{route}"), &body).await;
                    assert_eq!(a.status, 200, "{style:?} {policy:?} {route}");
                    let prompt = direct_prompt_tokens(&reference, route, &body).await;
                    check_whole_answer(route, &a.body, prompt);
                }
            }
            assert!(failovers(&url, "continued").await >= 1, "{style:?} {policy:?}: nothing continued");
        }
    }
}

/// Splits an SSE answer into its events' data.
fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body).split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
}

#[tokio::test]
async fn what_cannot_be_continued_still_ends_with_an_error_event() {
    let broken = sim(Role::Plain, 1, Faults { die_after_tokens: Some(3), ..Faults::default() }).await;
    let healthy = sim(Role::Plain, 2, Faults::default()).await;
    let mut cfg = config(vec![broken.url(), healthy.url()], PolicyKind::RoundRobin);
    tune(&mut cfg, 1);
    let r = router(cfg).await;
    // Logprobs the router cannot merge: not continued, even with a healthy worker to go to.
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": TOKENS,
                      "ignore_eos": true, "stream": true, "logprobs": true});
    let mut cut = 0;
    for _ in 0..4 {
        let a = post(&format!("{}/v1/chat/completions", r.url()), &body).await;
        let ev = events(&a.body);
        if ev.last().is_some_and(|e| e.contains("\"error\"")) {
            cut += 1;
            assert!(!ev.iter().any(|e| e == "[DONE]"));
        }
    }
    assert!(cut >= 1, "round robin sent none to the broken worker");
    assert_eq!(failovers(&r.url(), "not_continued").await, cut);
    assert_eq!(failovers(&r.url(), "continued").await, 0);
}

#[tokio::test]
async fn a_failure_beyond_the_limit_ends_with_an_error_event_after_consistent_text() {
    // Every worker breaks: one continuation allowed, so the second break ends the stream.
    let ws = [
        sim(Role::Plain, 1, Faults { die_after_tokens: Some(3), ..Faults::default() }).await,
        sim(Role::Plain, 2, Faults { die_after_tokens: Some(4), ..Faults::default() }).await,
    ];
    let mut cfg = config(ws.iter().map(|w| w.url()).collect(), PolicyKind::RoundRobin);
    tune(&mut cfg, 1);
    let r = router(cfg).await;
    let (route, body) = requests(0)[1].clone();
    let a = post(&format!("{}{route}", r.url()), &body).await;
    let ev = events(&a.body);
    assert!(ev.last().unwrap().contains("\"error\""), "{ev:?}");
    assert_eq!(ev.iter().filter(|e| e.contains("\"error\"")).count(), 1);
    let text: String = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_owned())
        .collect();
    // At most 3 + 4 tokens (a dying worker's last bytes may be lost with its connection),
    // one unbroken prefix of the answer.
    assert!((0..=7).any(|n| text == expected_text(n)), "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(failovers(&r.url(), "continued").await, 1);
    assert_eq!(failovers(&r.url(), "not_continued").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_client_stops_the_continuation() {
    let broken = sim(Role::Plain, 1, Faults { die_after_tokens: Some(2), ..Faults::default() }).await;
    // A slow worker, so the continuation is still generating when the client leaves.
    let slow = spawn_worker(WorkerConfig { time_scale: 1.0, seed: 2, ..WorkerConfig::default() }).await.unwrap();
    slow.set_faults(Faults { slowdown: 5.0, ..Faults::default() }).unwrap();
    let mut cfg = config(vec![broken.url(), slow.url()], PolicyKind::RoundRobin);
    tune(&mut cfg, 1);
    cfg.stream_idle_timeout = Duration::from_secs(30);
    let r = router(cfg).await;
    let url = r.url();
    let body = json!({"prompt": "go", "max_tokens": 5000, "ignore_eos": true, "stream": true});
    let mut continued = false;
    for _ in 0..2 {
        let req = hyper::Request::post(format!("{url}/v1/completions"))
            .header("content-type", "application/json")
            .body(Full::new(axum::body::Bytes::from(body.to_string())))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        let mut stream = resp.into_body();
        // Read 4 tokens: past the broken worker's 2, the continuation is relaying.
        let mut seen = String::new();
        while seen.matches("\"text\"").count() < 4 {
            let frame = tokio::time::timeout(Duration::from_secs(20), stream.frame()).await.unwrap();
            let Some(Ok(frame)) = frame else { panic!("stream ended early: {seen}") };
            if let Ok(d) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&d));
            }
        }
        drop(stream); // the client goes away
        continued |= failovers(&url, "continued").await == 1;
        eventually(Duration::from_secs(5), "in-flight back to 0", || async { total_in_flight(&url).await == 0 }).await;
        eventually(Duration::from_secs(5), "the slow worker stops generating", || async { slow.stats().running == 0 })
            .await;
    }
    assert!(continued, "no request went to the broken worker first");
}

#[tokio::test]
async fn failover_off_keeps_the_error_event() {
    let ws = [
        sim(Role::Plain, 1, Faults { die_after_tokens: Some(3), ..Faults::default() }).await,
        sim(Role::Plain, 2, Faults { die_after_tokens: Some(3), ..Faults::default() }).await,
    ];
    let mut cfg = config(ws.iter().map(|w| w.url()).collect(), PolicyKind::RoundRobin);
    tune(&mut cfg, 0);
    let r = router(cfg).await;
    let (route, body) = requests(0)[0].clone();
    let a = post(&format!("{}{route}", r.url()), &body).await;
    assert!(events(&a.body).last().unwrap().contains("\"error\""));
    assert_eq!(failovers(&r.url(), "continued").await + failovers(&r.url(), "not_continued").await, 0);
}

/// A worker that answers every stream with the role and one token, then half an event, then
/// ends the response cleanly: what a worker that breaks mid-event and closes looks like.
async fn half_event_worker() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Read the whole request (head, then content-length bytes) before answering.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let Ok(n) = socket.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + length {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if head.starts_with("get") {
                    let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    return;
                }
                let event = |delta: Value| {
                    let chunk = json!({"id": "half-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                       "choices": [{"index": 0, "delta": delta, "finish_reason": null}]});
                    format!("data: {chunk}\n\n")
                };
                let body = format!(
                    "{}{}data: {{\"id\":\"half-1\",\"choices\":[{{\"te",
                    event(json!({"role": "assistant", "content": ""})),
                    event(json!({"content": output_token_text(0)})),
                );
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    url
}

#[tokio::test]
async fn half_an_event_never_reaches_the_client() {
    let half = half_event_worker().await;
    let healthy = sim(Role::Plain, 2, Faults::default()).await;
    let mut cfg = config(vec![half.clone(), healthy.url()], PolicyKind::RoundRobin);
    tune(&mut cfg, 1);
    let r = router(cfg).await;
    let (route, body) = requests(0)[0].clone();
    let prompt = direct_prompt_tokens(&healthy.url(), route, &body).await;
    for _ in 0..2 {
        let a = post(&format!("{}{route}", r.url()), &body).await;
        assert!(!String::from_utf8_lossy(&a.body).contains("[{\"te"), "{}", String::from_utf8_lossy(&a.body));
        check_whole_answer(route, &a.body, prompt);
    }
    assert!(failovers(&r.url(), "continued").await >= 1, "round robin sent one to the half-event worker first");
}
