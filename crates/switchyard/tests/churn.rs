//! A seeded churn property test in the spirit of tower's balance test: 10^4 random steps over
//! both modes and every policy — workers added and removed, health flapping, breakers
//! tripped, requests that succeed, fail, hang, are cut mid-stream or abandoned by their client
//! mid-stream, requests held and shed by marginal_utility — with the router's invariants
//! checked after every step:
//!
//! - every request got an answer or a clear error (abandoned ones excepted);
//! - in-flight counts return to zero once nothing runs;
//! - no request reaches a removed worker, or a worker whose circuit is open;
//! - no breaker waits for a probe that is not running;
//! - policies keep no state for workers that left.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use switchyard::config::{CircuitBreakerConfig, PdConfig, PdStyle, RetryConfig};
use switchyard::load::InFlightGuard;
use switchyard::policies::{MarginalUtilityConfig, Overload, PolicyConfig, PolicyKind};
use switchyard::server::RunningRouter;
use switchyard::workers::{BreakerState, Worker, WorkerRole};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Total steps over every (mode, policy) run.
const STEPS: usize = 10_000;
/// How long a tripped circuit stays open.
const OPEN_FOR: Duration = Duration::from_millis(60);
/// The router's request timeout (what a hung worker costs).
const REQUEST_TIMEOUT: Duration = Duration::from_millis(80);

/// A worker that does what each request's `"mode"` says, and notes when requests arrive.
/// A PD prefill worker ends its streams (an engine's prefill leg does not outlive the prompt).
struct Server {
    addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

#[derive(Clone)]
struct ServerState {
    arrivals: Arc<Mutex<Vec<Instant>>>,
    prefill: bool,
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve(State(state): State<ServerState>, body: Bytes) -> Response {
    state.arrivals.lock().unwrap().push(Instant::now());
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let sse = |rx| {
        Response::builder().header("content-type", "text/event-stream").body(Body::new(futures_stream(rx))).unwrap()
    };
    let mode = match req["mode"].as_str().unwrap_or("ok") {
        "endless" if state.prefill => "stream",
        mode => mode,
    };
    match mode {
        "fail" => {
            (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": {"message": "mock failure"}}))).into_response()
        }
        "hang" => std::future::pending().await,
        mode @ ("stream" | "cut" | "endless") => {
            let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
            let mode = mode.to_owned();
            tokio::spawn(async move {
                for i in 0..3 {
                    let _ = tx.send(Ok(Bytes::from(format!("data: {{\"token\":{i}}}\n\n")))).await;
                }
                match mode.as_str() {
                    "cut" => {
                        let _ = tx.send(Err(std::io::Error::other("worker died"))).await;
                    }
                    "endless" => {
                        // Until the client goes away (the channel closes).
                        tx.closed().await;
                    }
                    _ => {
                        let _ = tx.send(Ok(Bytes::from("data: [DONE]\n\n"))).await;
                    }
                }
            });
            sse(rx)
        }
        _ => Json(json!({"choices": [{"text": "ok"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}))
            .into_response(),
    }
}

async fn server(prefill: bool) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/completions", post(serve))
        .route("/generate", post(serve))
        .with_state(ServerState { arrivals: arrivals.clone(), prefill });
    tokio::spawn(async move {
        // Small SSE chunks must not wait for the router's delayed ACK (Nagle: +40 ms each).
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let _ = axum::serve(listener, app).await;
    });
    Server { addr, arrivals }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ok,
    Stream,
    Fail,
    Hang,
    Cut,
    Abandon,
}

const KINDS: [(Kind, u32); 6] =
    [(Kind::Ok, 30), (Kind::Stream, 30), (Kind::Fail, 12), (Kind::Hang, 1), (Kind::Cut, 8), (Kind::Abandon, 8)];

fn pick_kind(rng: &mut StdRng) -> Kind {
    let total: u32 = KINDS.iter().map(|k| k.1).sum();
    let mut x = rng.random_range(0..total);
    for (k, w) in KINDS {
        if x < w {
            return k;
        }
        x -= w;
    }
    Kind::Ok
}

/// Sends one request of `kind`; returns a description of what was wrong with the answer.
async fn request(router_url: String, kind: Kind, pd: bool) -> Result<(), String> {
    let mode = match kind {
        Kind::Ok => "ok",
        Kind::Stream => "stream",
        Kind::Fail => "fail",
        Kind::Hang => "hang",
        Kind::Cut => "cut",
        Kind::Abandon => "endless",
    };
    let stream = matches!(kind, Kind::Stream | Kind::Cut | Kind::Abandon);
    // Distinct prompts: no worker holds a prefix (marginal_utility judges holders differently).
    static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prompt = format!("{} prompt {mode}", NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let (path, body) = if pd {
        ("/generate", json!({"text": prompt, "mode": mode, "stream": stream}))
    } else {
        ("/v1/completions", json!({"prompt": prompt, "mode": mode, "stream": stream}))
    };
    let req = Request::post(format!("{router_url}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = client().request(req).await.map_err(|e| format!("{kind:?}: no answer: {e}"))?;
    let status = resp.status();
    let is_sse =
        resp.headers().get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/event"));
    let mut body = resp.into_body();
    if kind == Kind::Abandon && is_sse {
        let _first = body.frame().await;
        return Ok(()); // the client goes away mid-stream
    }
    let bytes = body.collect().await.map_err(|e| format!("{kind:?}: body broke: {e}"))?.to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    if !status.is_success() {
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|_| format!("{kind:?}: {status} without JSON: {text}"))?;
        return if v.get("error").is_some() {
            Ok(())
        } else {
            Err(format!("{kind:?}: {status} without error: {text}"))
        };
    }
    if is_sse {
        let last = text.split("\n\n").filter(|e| !e.trim().is_empty()).last().unwrap_or("");
        return if last == "data: [DONE]" || last.contains("\"error\"") {
            Ok(())
        } else {
            Err(format!("{kind:?}: stream ended without [DONE] or an error event: {text}"))
        };
    }
    serde_json::from_slice::<Value>(&bytes).map(|_| ()).map_err(|_| format!("{kind:?}: 200 without JSON: {text}"))
}

struct Run {
    router: RunningRouter,
    servers: Vec<Server>,
    pd: bool,
    /// Every worker object the router ever had (removed ones too: their in-flight counts).
    seen: Vec<Arc<Worker>>,
    /// Per server: arrivals counted when it was removed (None while registered).
    removed_at: Vec<Option<usize>>,
    /// Per server: when its breaker was last tripped.
    tripped: HashMap<usize, Instant>,
}

impl Run {
    fn role(&self, i: usize) -> WorkerRole {
        match (self.pd, i % 2) {
            (false, _) => WorkerRole::Regular,
            (true, 0) => WorkerRole::Prefill { bootstrap_port: None },
            (true, _) => WorkerRole::Decode,
        }
    }

    fn registered(&self, i: usize) -> Option<Arc<Worker>> {
        self.router.state().registry.get(&self.servers[i].url())
    }

    async fn add(&mut self, i: usize) {
        if self.registered(i).is_some() {
            return;
        }
        let w = self.router.state().register_worker(self.servers[i].url(), self.role(i)).await.unwrap();
        self.seen.extend(w);
        self.removed_at[i] = None;
        self.tripped.remove(&i); // a new worker object, with a closed breaker
    }

    fn remove(&mut self, i: usize) {
        if self.router.state().registry.remove(&self.servers[i].url()).is_ok() {
            self.removed_at[i] = Some(self.servers[i].arrivals.lock().unwrap().len());
        }
    }

    async fn check(&self, context: &str) {
        // In-flight counts return to zero (an abandoned client is noticed asynchronously).
        let seen = self.seen.clone();
        eventually(Duration::from_secs(5), &format!("{context}: in flight back to zero"), move || {
            let seen = seen.clone();
            async move { seen.iter().all(|w| w.load().in_flight() == 0) }
        })
        .await;
        for (i, s) in self.servers.iter().enumerate() {
            let arrivals = s.arrivals.lock().unwrap();
            if let Some(n) = self.removed_at[i] {
                assert_eq!(arrivals.len(), n, "{context}: server {i} got requests after its removal");
            }
            if let Some(at) = self.tripped.get(&i) {
                let early = arrivals.iter().filter(|t| **t > *at && **t < *at + OPEN_FOR).count();
                assert_eq!(early, 0, "{context}: server {i} got requests while its circuit was open");
            }
        }
        for w in self.router.state().registry.all().iter() {
            assert!(
                !matches!(w.breaker().state(), BreakerState::HalfOpen { probing: true, .. }),
                "{context}: {} waits for a probe that is not running",
                w.url()
            );
        }
        let mut debug = None;
        self.router.state().router.policy().report(switchyard::policies::Report::Debug(&mut debug));
        let registered: Vec<u64> = self.router.state().registry.all().iter().map(|w| u64::from(w.id())).collect();
        if let Some(workers) = debug.as_ref().and_then(|d| d["workers"].as_array()) {
            for id in workers.iter().filter_map(|w| w["worker"].as_u64()) {
                assert!(registered.contains(&id), "{context}: the policy keeps state for removed worker {id}");
            }
        }
    }
}

fn policies() -> Vec<(String, PolicyConfig)> {
    let mut all: Vec<(String, PolicyConfig)> =
        PolicyKind::ALL.iter().map(|k| (format!("{k:?}"), PolicyConfig::new(*k, Some(7)))).collect();
    for overload in [Overload::Queue, Overload::Shed] {
        let config = MarginalUtilityConfig {
            slo_ttft: Duration::from_millis(60),
            overload,
            seed: Some(7),
            ..MarginalUtilityConfig::default()
        };
        all.push((format!("MarginalUtility/{overload:?}"), PolicyConfig::MarginalUtility(config)));
    }
    all
}

async fn run(pd: bool, name: &str, policy: PolicyConfig, steps: usize, rng: &mut StdRng) {
    let saturate = matches!(policy, PolicyConfig::MarginalUtility(_));
    let mut cfg = config(vec![], PolicyKind::RoundRobin);
    cfg.policy = policy;
    cfg.request_timeout = REQUEST_TIMEOUT;
    cfg.circuit_breaker = CircuitBreakerConfig { failure_threshold: 3, success_threshold: 1, timeout: OPEN_FOR };
    cfg.retry = RetryConfig {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
        ..RetryConfig::default()
    };
    if pd {
        cfg.pd = Some(PdConfig {
            style: PdStyle::Sglang,
            prefill: vec![],
            decode: vec![],
            prefill_policy: None,
            decode_policy: None,
            prefill_timeout: REQUEST_TIMEOUT,
        });
    }
    let router = router(cfg).await;
    let mut servers = Vec::new();
    for i in 0..6 {
        servers.push(server(pd && i % 2 == 0).await);
    }
    let mut run = Run { router, servers, pd, seen: Vec::new(), removed_at: vec![None; 6], tripped: HashMap::new() };
    for i in 0..4 {
        run.add(i).await;
    }
    let url = run.router.url();
    for step in 0..steps {
        let context = format!("{} {name} step {step}", if pd { "pd" } else { "regular" });
        let i = rng.random_range(0..6);
        match rng.random_range(0..100) {
            0..4 => run.add(i).await,
            4..7 => run.remove(i),
            7..10 => {
                if let Some(w) = run.registered(i) {
                    let healthy = w.is_healthy();
                    run.router.state().registry.set_healthy(&w, !healthy);
                }
            }
            10..12 => {
                if let Some(w) = run.registered(i) {
                    w.breaker().trip();
                    run.tripped.insert(i, Instant::now());
                }
            }
            12..17 if saturate => {
                // Saturation: requests waiting 25 ms for a first token on every worker put a
                // newcomer's expected TTFT between half and all of marginal_utility's 60 ms SLO,
                // so it is held (then shed, or dispatched at the last moment) until they end;
                // they end while it waits.
                let waiting: Vec<_> = run
                    .router
                    .state()
                    .registry
                    .all()
                    .iter()
                    .flat_map(|w| (0..3).map(|_| InFlightGuard::new(w.clone())))
                    .collect();
                tokio::time::sleep(Duration::from_millis(25)).await;
                let requests: Vec<_> = (0..2).map(|_| tokio::spawn(request(url.clone(), Kind::Stream, pd))).collect();
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
                drop(waiting);
                for r in requests {
                    if let Err(e) = r.await.unwrap() {
                        panic!("{context}: {e}");
                    }
                }
            }
            _ => {
                let n = rng.random_range(1..=3);
                let requests: Vec<_> = (0..n).map(|_| tokio::spawn(request(url.clone(), pick_kind(rng), pd))).collect();
                for r in requests {
                    if let Err(e) = r.await.unwrap() {
                        panic!("{context}: {e}");
                    }
                }
            }
        }
        run.check(&context).await;
    }
    // The overload modes were exercised, not just configured.
    let mut debug = None;
    run.router.state().router.policy().report(switchyard::policies::Report::Debug(&mut debug));
    let count = |k: &str| debug.as_ref().and_then(|d| d[k].as_u64()).unwrap_or(0);
    if name.ends_with("Queue") || name.ends_with("Shed") {
        assert!(count("held") > 0, "{name}: no request was ever held");
    }
    if name.ends_with("Shed") {
        assert!(count("shed") > 0, "{name}: no request was ever shed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_random_steps_keep_every_invariant() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let runs: Vec<(bool, String, PolicyConfig)> =
        [false, true].into_iter().flat_map(|pd| policies().into_iter().map(move |(n, p)| (pd, n, p))).collect();
    let per_run = STEPS / runs.len();
    for (pd, name, policy) in runs {
        run(pd, &name, policy, per_run, &mut rng).await;
    }
}
