//! Memory measured with a counting allocator. Peak router memory per request body: a body of
//! any kind (token ids, one long prompt, chat messages, embedding input) costs the router at
//! most twice its size plus a constant, in regular and PD mode (a JSON tree of a 16 MB
//! `input_ids` body used to cost 350 MB). The prefix tree's byte accounting against what the
//! allocator really holds, and its byte bound under adversarial prompts.
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

/// Tests here read the process-wide allocation counters: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn peak_memory_per_body_is_at_most_twice_its_size_plus_a_constant() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(peak_memory_per_body());
}

async fn peak_memory_per_body() {
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

use switchyard::policies::radix_tree::RadixTree;

/// A named way of making the i-th prompt.
type Shape = (&'static str, Box<dyn Fn(usize) -> String>);

/// Bytes allocated while `f` runs and still held after (what `f` built).
fn held_by<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = CURRENT.load(Ordering::Relaxed);
    let out = f();
    (out, CURRENT.load(Ordering::Relaxed).saturating_sub(before))
}

#[test]
fn the_tree_accounts_for_what_it_really_holds_within_20_percent() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let shapes: [Shape; 3] = [
        (
            "shared system prompts, multi-turn",
            Box::new(|i| {
                format!("system {} {}\nuser: question {i} about {}\n", i % 64, "policy ".repeat(20), i * 7919 % 1000)
            }),
        ),
        ("many tiny unique suffixes", Box::new(|i| format!("p{i}"))),
        ("multibyte text", Box::new(|i| format!("{} 问题 {i} ✓ {}", "é".repeat(i % 50), "日本語".repeat(i % 7)))),
    ];
    for (name, prompt) in shapes {
        let (tree, held) = held_by(|| {
            let mut t = RadixTree::<u8>::bounded(usize::MAX, 8 << 20);
            for i in 0..50_000 {
                t.insert(prompt(i).as_bytes(), (i % 16) as u32);
            }
            t
        });
        let accounted = tree.memory_bytes();
        let ratio = accounted as f64 / held as f64;
        println!("{name:<36} held {held:>10} B, accounted {accounted:>10} B, ratio {ratio:.3}");
        assert!((0.8..=1.2).contains(&ratio), "{name}: accounted {accounted} B, held {held} B");
    }
}

#[test]
fn the_byte_bound_holds_on_every_insert_for_adversarial_prompts() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const BOUND: usize = 4 << 20;
    let huge = "x".repeat(6 << 20);
    let cases: [Shape; 3] = [
        ("tiny unique suffixes", Box::new(|i| format!("{i}"))),
        (
            "one huge prompt among small ones",
            Box::new(move |i| if i == 500 { huge.clone() } else { format!("small {i}") }),
        ),
        ("multibyte", Box::new(|i| format!("{}{i}", "ü€".repeat(i % 300)))),
    ];
    for (name, prompt) in cases {
        let mut t = RadixTree::<u8>::bounded(usize::MAX, BOUND);
        for i in 0..100_000 {
            let p = prompt(i);
            t.insert(p.as_bytes(), (i % 8) as u32);
            // The bound, exceeded by at most the prompt just inserted (kept whole) and its nodes.
            let slack = p.len() + 4096;
            assert!(t.live_bytes() <= BOUND + slack, "{name}, insert {i}: {} live bytes", t.live_bytes());
        }
        assert!(t.memory_bytes() <= BOUND * 5 / 4 + (6 << 20), "{name}: {} bytes held", t.memory_bytes());
        t.check_invariants().unwrap();
    }
}
