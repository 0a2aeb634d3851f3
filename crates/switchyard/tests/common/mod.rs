//! Shared helpers for the router's integration tests: an HTTP client, a scriptable mock
//! worker bound to port 0, and a router started in-process.

#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{self, any};
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use switchyard::config::{HealthConfig, RouterConfig};
use switchyard::policies::{PolicyConfig, PolicyKind};
use switchyard::server::{self, RunningRouter};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A buffered response.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Answer {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client().request(req.body(Full::new(body.into())).unwrap()).await.expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    Answer { status: parts.status, headers: parts.headers, body }
}

pub async fn post(url: &str, body: &Value) -> Answer {
    send("POST", url, &[("content-type", "application/json")], body.to_string()).await
}

pub async fn get(url: &str) -> Answer {
    send("GET", url, &[], Bytes::new()).await
}

/// Polls `check` every 10 ms until it returns true; panics after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a mock worker does with inference requests. The request body may carry `"mode"`:
/// - absent: answer JSON at once describing what it received;
/// - `"hold"`: answer only after the test releases one permit on `gate`;
/// - `"stream"`: send one SSE chunk, wait for a permit, then the rest;
/// - `"status"`: answer with the status in `"status"`.
pub struct MockWorker {
    pub addr: SocketAddr,
    pub gate: Arc<Semaphore>,
    pub received: Arc<AtomicUsize>,
    pub arrivals: mpsc::UnboundedReceiver<Value>,
    _task: tokio::task::JoinHandle<()>,
}

impl MockWorker {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }
}

#[derive(Clone)]
struct MockState {
    port: u16,
    gate: Arc<Semaphore>,
    received: Arc<AtomicUsize>,
    arrivals: mpsc::UnboundedSender<Value>,
}

async fn mock_infer(State(s): State<MockState>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    s.received.fetch_add(1, Ordering::SeqCst);
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let hdrs: HashMap<String, String> =
        headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned())).collect();
    let echo = json!({"worker": s.port, "path": uri.path(), "headers": hdrs, "body": req});
    let _ = s.arrivals.send(echo.clone());
    match req.get("mode").and_then(Value::as_str) {
        Some("hold") => {
            let _permit = s.gate.acquire().await;
            Json(echo).into_response()
        }
        Some("status") => {
            let code = req.get("status").and_then(Value::as_u64).unwrap_or(500) as u16;
            (StatusCode::from_u16(code).unwrap(), Json(json!({"error": "mock"}))).into_response()
        }
        Some("stream") => {
            let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
            let gate = s.gate.clone();
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from("data: {\"chunk\":1}\n\n"))).await;
                let _permit = gate.acquire().await;
                let _ = tx.send(Ok(Bytes::from("data: {\"chunk\":2}\n\n"))).await;
                let _ = tx.send(Ok(Bytes::from("data: [DONE]\n\n"))).await;
            });
            let stream = futures_stream(rx);
            Response::builder().header("content-type", "text/event-stream").body(Body::new(stream)).unwrap()
        }
        _ => Json(echo).into_response(),
    }
}

/// A body from a channel of chunks.
pub fn futures_stream(
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl http_body::Body<Data = Bytes, Error = std::io::Error> {
    struct ChanBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);
    impl http_body::Body for ChanBody {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            self.0.poll_recv(cx).map(|o| o.map(|r| r.map(http_body::Frame::data)))
        }
    }
    ChanBody(rx)
}

pub async fn mock_worker() -> MockWorker {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let (tx, arrivals) = mpsc::unbounded_channel();
    let state = MockState { port: addr.port(), gate: gate.clone(), received: received.clone(), arrivals: tx };
    let app = Router::new()
        .route("/health", routing::get(|| async { "ok" }))
        .route(
            "/v1/models",
            routing::get(|| async { Json(json!({"object":"list","data":[{"id":"mock-model","object":"model"}]})) }),
        )
        .route("/{*path}", any(mock_infer))
        .with_state(state);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    MockWorker { addr, gate, received, arrivals, _task: task }
}

/// A router config for tests: ephemeral port, fast health checks.
pub fn config(workers: Vec<String>, policy: PolicyKind) -> RouterConfig {
    RouterConfig {
        port: 0,
        worker_urls: workers,
        policy: PolicyConfig::new(policy, Some(42)),
        health: HealthConfig {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            failure_threshold: 2,
            success_threshold: 1,
            ..HealthConfig::default()
        },
        ..RouterConfig::default()
    }
}

pub async fn router(config: RouterConfig) -> RunningRouter {
    server::start(config).await.expect("router failed to start")
}

/// Sum of in-flight counts over every worker, from `/get_loads`.
pub async fn total_in_flight(router_url: &str) -> u64 {
    let loads = get(&format!("{router_url}/get_loads")).await.json();
    loads["workers"].as_array().unwrap().iter().map(|w| w["in_flight"].as_u64().unwrap()).sum()
}

pub fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}
