//! Peak router memory per request body, measured with a counting allocator: a body of any
//! kind (token ids, one long prompt, chat messages, embedding input) costs the router at most
//! twice its size plus a constant, in regular and PD mode. A JSON tree of a 16 MB `input_ids`
//! body used to cost 350 MB.
//!
//! Prints a table (`cargo test --release --test memory -- --nocapture` adds 64 MB bodies).
//! The counting allocator is the one place in the workspace that needs `unsafe`.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use switchyard::config::{PdConfig, PdStyle, RouterConfig};
use switchyard::policies::{PolicyConfig, PolicyKind};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A worker that reads a request body frame by frame without keeping it, and answers.
async fn sink() -> String {
    async fn consume(body: Body) -> impl IntoResponse {
        let mut body = body;
        let mut n = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            n += frame.data_ref().map_or(0, |d| d.len());
        }
        (StatusCode::OK, [("content-type", "application/json")], format!(r#"{{"received":{n},"text":"ok"}}"#))
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app =
        axum::Router::new().route("/health", axum::routing::get(|| async { "ok" })).route("/{*path}", post(consume));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

fn body(kind: &str, bytes: usize) -> Bytes {
    let s = match kind {
        "input_ids" => {
            format!(r#"{{"input_ids":[{}0],"sampling_params":{{"max_new_tokens":1}}}}"#, "0,".repeat(bytes / 2))
        }
        "prompt" => format!(r#"{{"prompt":"{}","max_tokens":1}}"#, "abcd ".repeat(bytes / 5)),
        "messages" => {
            let msg = format!(r#"{{"role":"user","content":"{}"}}"#, "word ".repeat(200));
            let n = bytes / msg.len();
            format!(r#"{{"messages":[{}],"max_tokens":1}}"#, vec![msg; n].join(","))
        }
        "input" => format!(r#"{{"input":["{}"],"model":"e"}}"#, "token ".repeat(bytes / 6)),
        _ => unreachable!(),
    };
    Bytes::from(s)
}

fn path(kind: &str) -> &'static str {
    match kind {
        "input_ids" => "/generate",
        "messages" => "/v1/chat/completions",
        "input" => "/v1/embeddings",
        _ => "/v1/completions",
    }
}

/// Peak bytes allocated above the level before the request, while the router handles it.
async fn peak_for(router_url: &str, kind: &str, body: Bytes) -> usize {
    // The client's copy stays alive throughout: its release must not hide the router's use.
    let _client_copy = body.clone();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = hyper::Request::post(format!("{router_url}{}", path(kind)))
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await; // let connection set-up allocations settle
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let answer = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, 200, "{kind}: {answer:?}");
    PEAK.load(Ordering::Relaxed).saturating_sub(base)
}

#[tokio::test(flavor = "current_thread")]
async fn peak_memory_per_body_is_at_most_twice_its_size_plus_a_constant() {
    const CONSTANT: usize = 8 << 20;
    let sizes: &[usize] = if cfg!(debug_assertions) { &[1 << 20, 16 << 20] } else { &[1 << 20, 16 << 20, 64 << 20] };
    let (w, p, d) = (sink().await, sink().await, sink().await);
    let regular = RouterConfig {
        port: 0,
        worker_urls: vec![w],
        policy: PolicyConfig::new(PolicyKind::CacheAware, Some(1)),
        max_payload_size: 65 << 20,
        ..RouterConfig::default()
    };
    let pd = RouterConfig {
        worker_urls: vec![],
        pd: Some(PdConfig {
            style: PdStyle::Sglang,
            prefill: vec![(p, None)],
            decode: vec![d],
            prefill_policy: None,
            decode_policy: None,
            prefill_timeout: Duration::from_secs(30),
        }),
        ..regular.clone()
    };
    println!("{:<10} {:<10} {:>10} {:>12} {:>8}", "mode", "kind", "body MB", "peak MB", "ratio");
    for (mode, config) in [("regular", regular), ("pd", pd)] {
        let router = switchyard::server::start(config).await.unwrap();
        for kind in ["input_ids", "prompt", "messages", "input"] {
            for &size in sizes {
                let b = body(kind, size);
                let len = b.len();
                let peak = peak_for(&router.url(), kind, b).await;
                println!(
                    "{mode:<10} {kind:<10} {:>10.1} {:>12.1} {:>8.2}",
                    len as f64 / 1e6,
                    peak as f64 / 1e6,
                    peak as f64 / len as f64
                );
                assert!(peak <= 2 * len + CONSTANT, "{mode} {kind} {len} B body peaked at {peak} B");
            }
        }
        router.shutdown().await.unwrap();
    }
}
