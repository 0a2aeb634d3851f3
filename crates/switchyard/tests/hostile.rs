//! Switchyard treated as an attacker and a broken worker would treat it: an open admin API,
//! aliases and loops, leaked keys, slow and half-sent requests, connection floods, stalled
//! and cut answers, invalid statuses, hostile headers — and a fuzz of raw worker answers.
//! Each test would fail on the router before its hardening.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use switchyard::config::{AdmissionConfig, ListenerConfig, RetryConfig, RouterConfig};
use switchyard::policies::PolicyKind;
use switchyard::server::{app, AppState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a raw worker does with an inference request.
#[derive(Clone)]
enum Raw {
    /// Write these bytes, then close the connection.
    Close(Vec<u8>),
    /// Write these bytes, then keep the connection open and silent.
    Stall(Vec<u8>),
    /// Write the head, then this chunk forever (until the router goes away).
    Endless(Vec<u8>, Vec<u8>),
}

/// A worker speaking raw HTTP/1.1: `/health` answers 200, inference requests get `respond(body)`.
async fn raw_worker(respond: impl Fn(&[u8]) -> Raw + Send + Sync + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let respond = respond.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some((head_end, length)) = read_head(&mut s, &mut buf).await else { return };
                    while buf.len() < head_end + length {
                        let mut chunk = [0u8; 8192];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let request: Vec<u8> = buf.drain(..head_end + length).collect();
                    if request.starts_with(b"GET") {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                        continue;
                    }
                    match respond(&request[head_end..]) {
                        Raw::Close(bytes) => {
                            let _ = s.write_all(&bytes).await;
                            return;
                        }
                        Raw::Stall(bytes) => {
                            let _ = s.write_all(&bytes).await;
                            std::future::pending::<()>().await;
                        }
                        Raw::Endless(head, chunk) => {
                            let _ = s.write_all(&head).await;
                            while s.write_all(&chunk).await.is_ok() {}
                            return;
                        }
                    }
                }
            });
        }
    });
    url
}

/// Reads until a request head is complete; returns its end and the body's content length.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(usize, usize)> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            return Some((i + 4, length));
        }
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn mode(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body).ok().and_then(|v| v["mode"].as_str().map(str::to_owned)).unwrap_or_default()
}

fn fast_retry() -> RetryConfig {
    RetryConfig {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
        ..RetryConfig::default()
    }
}

/// Sends a raw request on a new connection and reads until the router closes it or `limit`
/// passes; returns what was read and whether the connection was closed.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8], limit: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

async fn oneshot(config: RouterConfig, req: Request<Body>) -> (u16, Value) {
    let app = app(AppState::new(config));
    let resp = tower_oneshot(app, req).await;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn tower_oneshot(mut app: axum::Router, req: Request<Body>) -> axum::response::Response {
    use tower_service::Service;
    app.call(req).await.unwrap()
}

fn add_worker_request(url: &str, key: Option<&str>) -> Request<Body> {
    let mut req = Request::post("/workers").header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    req.body(Body::from(json!({"url": url}).to_string())).unwrap()
}

#[tokio::test]
async fn admin_changes_need_a_key_unless_bound_to_loopback_or_explicitly_opened() {
    let public = RouterConfig { host: "0.0.0.0".into(), ..RouterConfig::default() };
    let (status, body) = oneshot(public.clone(), add_worker_request("http://127.0.0.1:9", None)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--api-key"));
    let opened = RouterConfig { allow_unauthenticated_admin: true, ..public.clone() };
    let (status, _) = oneshot(opened, add_worker_request("http://127.0.0.1:9", None)).await;
    assert_ne!(status, 403);
    let keyed = RouterConfig { api_key: Some("k".into()), ..public.clone() };
    assert_eq!(oneshot(keyed.clone(), add_worker_request("http://127.0.0.1:9", None)).await.0, 401);
    // `bearer` in lower case is the same scheme.
    let req = Request::post("/workers")
        .header("authorization", "bearer k")
        .body(Body::from(json!({"url": "http://127.0.0.1:9"}).to_string()))
        .unwrap();
    assert_ne!(oneshot(keyed, req).await.0, 401);
    let loopback = RouterConfig { host: "127.0.0.1".into(), ..RouterConfig::default() };
    assert_ne!(oneshot(loopback, add_worker_request("http://127.0.0.1:9", None)).await.0, 403);
}

#[tokio::test]
async fn one_worker_one_entry_no_metadata_addresses_no_loops() {
    let w = mock_worker().await;
    let router = router(config(vec![w.url()], PolicyKind::RoundRobin)).await;
    let base = router.url();
    let port = w.addr.port();
    for alias in
        [format!("http://127.1:{port}"), format!("http://2130706433:{port}"), format!("http://LOCALHOST:{port}")]
    {
        let a = post(&format!("{base}/workers"), &json!({"url": alias})).await;
        assert_eq!(a.status, 409, "{alias}: {:?}", a.body);
    }
    for bad in ["http://169.254.169.254:80", "http://0.0.0.0:8000", "http://[fe80::1]:80", "http://user:pw@10.0.0.1:80"]
    {
        let a = post(&format!("{base}/workers"), &json!({"url": bad})).await;
        assert_eq!(a.status, 400, "{bad}: {:?}", a.body);
        assert!(a.json()["error"]["message"].is_string());
    }
    let own = post(&format!("{base}/workers"), &json!({"url": base})).await;
    assert_eq!(own.status, 400, "{:?}", own.body);
    assert!(own.json()["error"]["message"].as_str().unwrap().contains("points back"));
    assert_eq!(router.state().registry.all().len(), 1);
}

#[tokio::test]
async fn a_request_that_comes_back_to_its_router_is_refused_at_once() {
    // Two routers pointing at each other: A → B → A.
    let a = router(config(vec![], PolicyKind::RoundRobin)).await;
    let b = router(config(vec![a.url()], PolicyKind::RoundRobin)).await;
    a.state().register_worker(b.url(), switchyard::workers::WorkerRole::Regular).await.unwrap();
    let started = std::time::Instant::now();
    let answer = post(&format!("{}/v1/completions", a.url()), &json!({"prompt": "x"})).await;
    assert_eq!(answer.status, 508, "{:?}", answer.body);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(total_in_flight(&a.url()).await + total_in_flight(&b.url()).await, 0);
}

#[tokio::test]
async fn the_clients_key_stays_with_the_router_and_the_workers_key_goes_to_workers() {
    let w = mock_worker().await;
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.inference_api_key = Some("client-key".into());
    cfg.worker_api_key = Some("worker-key".into());
    let router = router(cfg).await;
    let a = send(
        "POST",
        &format!("{}/v1/completions", router.url()),
        &[("authorization", "Bearer client-key"), ("content-type", "application/json")],
        json!({"prompt": "x"}).to_string(),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["headers"]["authorization"], "Bearer worker-key");
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.inference_api_key = Some("client-key".into());
    let router = common::router(cfg).await;
    let a = send(
        "POST",
        &format!("{}/v1/completions", router.url()),
        &[("authorization", "Bearer client-key"), ("content-type", "application/json")],
        json!({"prompt": "x"}).to_string(),
    )
    .await;
    assert!(a.json()["headers"].get("authorization").is_none(), "{}", a.json());
}

fn quick_listener() -> ListenerConfig {
    ListenerConfig {
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(400),
        keep_alive_timeout: Duration::from_millis(500),
        max_connections: 3,
    }
}

#[tokio::test]
async fn half_sent_requests_idle_connections_and_floods_are_bounded() {
    let w = mock_worker().await;
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.listener = quick_listener();
    let router = router(cfg).await;
    // Half-sent headers: closed after the header timeout, never served.
    let (out, closed) =
        raw_exchange(router.addr(), b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n", Duration::from_secs(3)).await;
    assert!(closed && !out.contains("200"), "{out}");
    // An idle kept-alive connection is closed after the keep-alive timeout.
    let request = "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"prompt\":\"x\"}";
    let (out, closed) = raw_exchange(router.addr(), request.as_bytes(), Duration::from_secs(3)).await;
    assert!(closed && out.starts_with("HTTP/1.1 200"), "{out}");
    // Past the cap: 503 with a JSON error, then closed.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(router.addr()).await.unwrap());
    }
    let addr = router.addr();
    eventually(Duration::from_secs(3), "a fourth connection is refused", || async move {
        let (out, closed) = raw_exchange(addr, b"GET /health HTTP/1.1\r\n\r\n", Duration::from_secs(2)).await;
        closed && out.starts_with("HTTP/1.1 503") && out.contains("max-connections")
    })
    .await;
    drop(held);
}

#[tokio::test]
async fn a_slow_body_holds_no_admission_slot_and_times_out() {
    let w = mock_worker().await;
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.listener = ListenerConfig { body_read_timeout: Duration::from_millis(600), ..quick_listener() };
    cfg.listener.max_connections = 100;
    cfg.admission =
        Some(AdmissionConfig { max_concurrent: 2, queue_size: 0, queue_timeout: Duration::from_millis(50) });
    let router = router(cfg).await;
    let slow = "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prompt\":";
    let slow_senders: Vec<_> = (0..2)
        .map(|_| {
            let addr = router.addr();
            tokio::spawn(async move { raw_exchange(addr, slow.as_bytes(), Duration::from_secs(5)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await; // both are trickling their bodies in
    let normal = post(&format!("{}/v1/completions", router.url()), &json!({"prompt": "x"})).await;
    assert_eq!(normal.status, 200, "{:?}", normal.body);
    for s in slow_senders {
        let (out, _) = s.await.unwrap();
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    }
}

#[tokio::test]
async fn shutdown_closes_idle_and_half_open_connections_at_once() {
    let w = mock_worker().await;
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.shutdown_grace = Duration::from_secs(60);
    cfg.listener.header_read_timeout = Duration::from_secs(60);
    let router = router(cfg).await;
    let mut half_open = TcpStream::connect(router.addr()).await.unwrap();
    half_open.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let _idle = TcpStream::connect(router.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await; // accepted
    let started = std::time::Instant::now();
    router.shutdown().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "shutdown waited {:?}", started.elapsed());
}

/// An SSE head from a raw worker.
const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

#[tokio::test]
async fn a_stalled_stream_ends_with_an_error_event_and_frees_its_slot() {
    let url = raw_worker(|_| {
        let mut b = SSE_HEAD.to_vec();
        b.extend(chunk("data: {\"text\":\"a\"}\n\n"));
        Raw::Stall(b)
    })
    .await;
    let mut cfg = config(vec![url], PolicyKind::RoundRobin);
    cfg.stream_idle_timeout = Duration::from_millis(300);
    cfg.admission = Some(AdmissionConfig { max_concurrent: 1, queue_size: 4, queue_timeout: Duration::from_secs(5) });
    let router = router(cfg).await;
    for _ in 0..2 {
        let a = post(&format!("{}/v1/completions", router.url()), &json!({"prompt": "x", "stream": true})).await;
        let text = String::from_utf8_lossy(&a.body).into_owned();
        assert!(text.starts_with("data: {\"text\":\"a\"}") && text.contains("stream-idle-timeout"), "{text}");
    }
    assert_eq!(total_in_flight(&router.url()).await, 0);
}

#[tokio::test]
async fn cut_and_garbled_answers_are_never_relayed_as_complete() {
    let url = raw_worker(|body| match mode(body).as_str() {
        // No length, no chunking, closed early: framing can't tell, the JSON can.
        "cut" => Raw::Close(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"choices\":[{\"te".to_vec()),
        "sse-cut" => {
            let mut b = SSE_HEAD.to_vec();
            b.extend(chunk("data: {\"text\":\"a\"}\n\n"));
            b.extend(b"0\r\n\r\n");
            Raw::Close(b)
        }
        "status-600" => Raw::Close(b"HTTP/1.1 600 Odd\r\ncontent-length: 2\r\n\r\n{}".to_vec()),
        _ => Raw::Close(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}".to_vec()),
    })
    .await;
    let mut cfg = config(vec![url.clone()], PolicyKind::RoundRobin);
    cfg.retry = fast_retry();
    let router = router(cfg).await;
    let completions = format!("{}/v1/completions", router.url());
    let a = post(&completions, &json!({"mode": "cut", "prompt": "x"})).await;
    assert_eq!(a.status, 502, "{:?}", a.body);
    assert!(a.json()["error"]["message"].as_str().unwrap().contains("JSON"));
    let a = post(&completions, &json!({"mode": "status-600", "prompt": "x"})).await;
    assert_eq!(a.status, 502, "{:?}", a.body);
    let a = post(&completions, &json!({"mode": "sse-cut", "prompt": "x", "stream": true})).await;
    let text = String::from_utf8_lossy(&a.body).into_owned();
    assert!(text.contains("\"error\"") && text.contains("[DONE]"), "{text}");
    // With a good worker beside it, a cut whole answer is retried there.
    let good = mock_worker().await;
    let mut cfg = config(vec![url, good.url()], PolicyKind::RoundRobin);
    cfg.retry = fast_retry();
    let router = common::router(cfg).await;
    for _ in 0..4 {
        let a = post(&format!("{}/v1/completions", router.url()), &json!({"mode": "cut", "prompt": "x"})).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
}

#[tokio::test]
async fn removed_workers_leave_no_metrics_and_the_worker_count_is_capped() {
    let (w1, w2) = (mock_worker().await, mock_worker().await);
    let mut cfg = config(vec![w1.url()], PolicyKind::RoundRobin);
    cfg.max_workers = 1;
    let router = router(cfg).await;
    let base = router.url();
    assert_eq!(post(&format!("{base}/v1/completions"), &json!({"prompt": "x"})).await.status, 200);
    let metrics = |b: Bytes| String::from_utf8_lossy(&b).into_owned();
    assert!(metrics(get(&format!("{base}/metrics")).await.body).contains(&w1.url()));
    let full = post(&format!("{base}/workers"), &json!({"url": w2.url()})).await;
    assert_eq!(full.status, 409, "{:?}", full.body);
    assert!(full.json()["error"]["message"].as_str().unwrap().contains("max-workers"));
    assert_eq!(send("DELETE", &format!("{base}/workers?url={}", w1.url()), &[], "").await.status, 200);
    assert!(!metrics(get(&format!("{base}/metrics")).await.body).contains(&w1.url()));
}

#[tokio::test]
async fn header_hygiene_and_json_errors_everywhere() {
    let w = mock_worker().await;
    let router = router(config(vec![w.url()], PolicyKind::RoundRobin)).await;
    let base = router.url();
    let a = send(
        "POST",
        &format!("{base}/v1/completions"),
        &[
            ("content-type", "application/json"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "hop-only"),
            ("x-forwarded-for", "6.6.6.6"),
        ],
        json!({"prompt": "x"}).to_string(),
    )
    .await;
    let seen = &a.json()["headers"];
    assert!(seen.get("x-secret").is_none(), "{seen}");
    assert_eq!(seen["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(seen["forwarded"], "for=127.0.0.1");
    let wrong_method = send("PUT", &format!("{base}/v1/completions"), &[], "").await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.json()["error"]["code"], 405);
    let bad_path = send("DELETE", &format!("{base}/workers/%FF"), &[], "").await;
    assert_eq!(bad_path.status, 400);
    assert!(bad_path.json()["error"]["message"].is_string());
    let bad_query = send("DELETE", &format!("{base}/workers?url=%FF"), &[], "").await;
    assert_eq!(bad_query.status, 400);
    assert!(bad_query.json()["error"]["message"].is_string());
}

/// A random hostile answer: bad framing, garbage, huge chunk sizes, invalid UTF-8 in SSE,
/// endless bodies, absurd headers — or, now and then, a good one.
fn hostile(rng: &mut StdRng) -> Raw {
    let garbage: Vec<u8> = (0..rng.random_range(0..200)).map(|_| rng.random()).collect();
    match rng.random_range(0..12) {
        0 => Raw::Close(garbage),
        1 => Raw::Close(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{\"short\":".to_vec()),
        2 => Raw::Close(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffff\r\nxx".to_vec()),
        3 => {
            let mut b = SSE_HEAD.to_vec();
            b.extend(chunk("data: \u{fffd}"));
            b.extend(b"5\r\n\xff\xfe\xfd\n\n\r\n0\r\n\r\n");
            Raw::Close(b)
        }
        4 => Raw::Endless(SSE_HEAD.to_vec(), chunk("data: {\"x\":1}\n\n")),
        5 => Raw::Endless(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n".to_vec(),
            b"[[[[[[[[[[".repeat(100),
        ),
        6 => Raw::Close(format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n", "a".repeat(200_000)).into_bytes()),
        7 => Raw::Close(b"HTTP/1.1 999 Nope\r\ncontent-length: 0\r\n\r\n".to_vec()),
        8 => Raw::Stall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 50\r\n\r\n{".to_vec()),
        9 => Raw::Close(b"HTTP/1.1 500 Internal\r\ncontent-length: 4\r\n\r\noops".to_vec()),
        _ => Raw::Close(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}".to_vec()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_worker_answers_always_end_in_a_clear_answer() {
    let seq = Arc::new(AtomicUsize::new(0));
    let url = {
        let seq = seq.clone();
        raw_worker(move |_| {
            let mut rng = StdRng::seed_from_u64(seq.fetch_add(1, Ordering::Relaxed) as u64);
            hostile(&mut rng)
        })
        .await
    };
    let mut cfg = config(vec![url], PolicyKind::RoundRobin);
    cfg.retry = RetryConfig { max_attempts: 1, ..fast_retry() };
    cfg.request_timeout = Duration::from_millis(500);
    cfg.stream_idle_timeout = Duration::from_millis(300);
    cfg.request_total_timeout = Some(Duration::from_secs(2));
    cfg.circuit_breaker.failure_threshold = 1_000_000;
    let router = router(cfg).await;
    for i in 0..120 {
        let stream = i % 2 == 0;
        let started = std::time::Instant::now();
        let a = post(&format!("{}/v1/completions", router.url()), &json!({"prompt": "x", "stream": stream})).await;
        assert!(started.elapsed() < Duration::from_secs(5), "request {i} took {:?}", started.elapsed());
        let text = String::from_utf8_lossy(&a.body).into_owned();
        let is_sse = a.headers.get("content-type").is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event"));
        if is_sse {
            let last = text.split("\n\n").filter(|e| !e.trim().is_empty()).last().unwrap_or("");
            assert!(last.contains("[DONE]") || last.contains("\"error\""), "request {i}: {text:.300}");
        } else if a.status == 200 {
            assert!(serde_json::from_slice::<Value>(&a.body).is_ok(), "request {i}: 200 with {text:.300}");
        } else {
            assert!((500..600).contains(&a.status.as_u16()), "request {i}: {} {text:.300}", a.status);
        }
    }
    assert_eq!(total_in_flight(&router.url()).await, 0);
    assert_eq!(get(&format!("{}/health", router.url())).await.status, 200);
}

#[tokio::test]
async fn fuzzed_request_heads_get_an_answer_or_a_closed_connection_never_a_crash() {
    let w = mock_worker().await;
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.listener.header_read_timeout = Duration::from_millis(300);
    let router = router(cfg).await;
    let mut rng = StdRng::seed_from_u64(7);
    let names =
        ["content-length", "transfer-encoding", "connection", "authorization", "x-session-id", "host", "x-request-id"];
    for i in 0..200 {
        let mut head = b"POST /v1/completions HTTP/1.1\r\n".to_vec();
        for _ in 0..rng.random_range(0..6) {
            let name: Vec<u8> = if rng.random_bool(0.5) {
                names[rng.random_range(0..names.len())].as_bytes().to_vec()
            } else {
                (0..rng.random_range(1..20)).map(|_| rng.random()).collect()
            };
            let value: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random_range(0..=255u8)).collect();
            head.extend(name);
            head.extend(b": ");
            head.extend(value);
            head.extend(b"\r\n");
        }
        head.extend(b"\r\n{\"prompt\":\"x\"}");
        let (out, _) = raw_exchange(router.addr(), &head, Duration::from_secs(2)).await;
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 "), "head {i}: {out:.200}");
    }
    assert_eq!(get(&format!("{}/health", router.url())).await.status, 200);
    assert_eq!(post(&format!("{}/v1/completions", router.url()), &json!({"prompt": "x"})).await.status, 200);
}
