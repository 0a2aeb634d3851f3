//! Reliability and security end to end: retries, circuit breaker, admission control, auth,
//! graceful shutdown, fuzzed request bodies, and a bounded chaos run. Loopback only; no
//! fixed sleeps (waits are on gates or polled conditions with deadlines).

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use switchyard::config::{AdmissionConfig, CircuitBreakerConfig, RetryConfig};
use switchyard::policies::PolicyKind;
use switchyard::request::RequestView;
use switchyard_sim::server::{spawn_worker, Faults, WorkerConfig, WorkerHandle};

fn fast_retry() -> RetryConfig {
    RetryConfig {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..RetryConfig::default()
    }
}

async fn sims(n: u64) -> Vec<WorkerHandle> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(spawn_worker(WorkerConfig { time_scale: 50.0, seed: i, ..WorkerConfig::default() }).await.unwrap());
    }
    v
}

fn worker_field(workers: &Value, url: &str, field: &str) -> Value {
    let w = workers["workers"].as_array().unwrap().iter().find(|w| w["url"] == url).unwrap();
    w.pointer(field).cloned().unwrap_or(Value::Null)
}

#[tokio::test]
async fn failed_attempts_are_retried_on_another_worker() {
    let ws = sims(2).await;
    ws[0].set_faults(Faults { error_rate: 1.0, error_status: 503, ..Faults::default() }).unwrap();
    let mut cfg = config(ws.iter().map(|w| w.url()).collect(), PolicyKind::RoundRobin);
    cfg.retry = fast_retry();
    let r = router(cfg).await;
    for i in 0..10 {
        let a = post(&format!("{}/v1/chat/completions", r.url()), &chat(json!({"stream": i % 2 == 0}))).await;
        assert_eq!(a.status, 200, "request {i}: {:?}", a.body);
    }
    let workers = get(&format!("{}/workers", r.url())).await.json();
    assert_eq!(worker_field(&workers, &ws[1].url(), "/load/succeeded"), 10);
    assert!(worker_field(&workers, &ws[0].url(), "/load/failed").as_u64().unwrap() >= 5);
    // Both failing: the last worker's own answer is relayed after trying each once.
    ws[1].set_faults(Faults { error_rate: 1.0, error_status: 500, ..Faults::default() }).unwrap();
    let a = post(&format!("{}/v1/chat/completions", r.url()), &chat(json!({}))).await;
    assert!(a.status == 500 || a.status == 503, "{}", a.status);
    assert_eq!(a.json()["message"], "injected fault");
    assert_eq!(total_in_flight(&r.url()).await, 0);
}

#[tokio::test]
async fn a_worker_dying_mid_body_is_retried_when_nothing_was_sent() {
    let ws = sims(2).await;
    ws[0].set_faults(Faults { die_after_tokens: Some(2), ..Faults::default() }).unwrap();
    let mut cfg = config(ws.iter().map(|w| w.url()).collect(), PolicyKind::RoundRobin);
    cfg.retry = fast_retry();
    let r = router(cfg).await;
    for _ in 0..6 {
        let a =
            post(&format!("{}/v1/completions", r.url()), &json!({"prompt": "x", "max_tokens": 8, "ignore_eos": true}))
                .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.json()["usage"]["completion_tokens"], 8);
    }
}

#[tokio::test]
async fn client_errors_are_neither_retried_nor_held_against_the_worker() {
    let w = mock_worker().await;
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.circuit_breaker = CircuitBreakerConfig { failure_threshold: 3, ..CircuitBreakerConfig::default() };
    let r = router(cfg).await;
    for _ in 0..10 {
        let a = post(&format!("{}/v1/completions", r.url()), &json!({"prompt": "x", "mode": "status", "status": 422}))
            .await;
        assert_eq!(a.status, 422);
    }
    assert_eq!(w.received.load(Ordering::SeqCst), 10, "no retries of a client error");
    let workers = get(&format!("{}/workers", r.url())).await.json();
    assert_eq!(worker_field(&workers, &w.url(), "/circuit_breaker"), "closed");
}

#[tokio::test]
async fn the_circuit_opens_on_a_sick_worker_and_traffic_moves() {
    let ws = sims(2).await;
    ws[0].set_faults(Faults { error_rate: 1.0, error_status: 500, ..Faults::default() }).unwrap();
    let mut cfg = config(ws.iter().map(|w| w.url()).collect(), PolicyKind::RoundRobin);
    cfg.retry = fast_retry();
    cfg.circuit_breaker =
        CircuitBreakerConfig { failure_threshold: 3, success_threshold: 1, timeout: Duration::from_secs(600) };
    let r = router(cfg).await;
    for _ in 0..12 {
        assert_eq!(post(&format!("{}/v1/chat/completions", r.url()), &chat(json!({}))).await.status, 200);
    }
    let workers = get(&format!("{}/workers", r.url())).await.json();
    assert_eq!(worker_field(&workers, &ws[0].url(), "/circuit_breaker"), "open");
    assert_eq!(worker_field(&workers, &ws[0].url(), "/load/dispatched"), 3, "no traffic once open");
    assert_eq!(worker_field(&workers, &ws[1].url(), "/circuit_breaker"), "closed");
}

#[tokio::test]
async fn admission_queue_full_is_429_and_a_long_wait_is_408() {
    let w = mock_worker().await;
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.admission = Some(AdmissionConfig { max_concurrent: 1, queue_size: 1, queue_timeout: Duration::from_secs(1) });
    let r = router(cfg).await;
    let url = format!("{}/v1/completions", r.url());
    let first = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, &json!({"prompt": "x", "mode": "hold"})).await })
    };
    eventually(Duration::from_secs(5), "first request at the worker", || async {
        w.received.load(Ordering::SeqCst) == 1
    })
    .await;
    let second = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, &json!({"prompt": "x"})).await })
    };
    // The second waits in the queue; a third finds the queue full.
    let admission = r.state().admission.clone().unwrap();
    eventually(Duration::from_secs(5), "second request queued", || {
        let waiting = admission.waiting();
        async move { waiting == 1 }
    })
    .await;
    let third = post(&url, &json!({"prompt": "x"})).await;
    assert_eq!(third.status, 429, "{:?}", third.body);
    assert!(third.headers.contains_key("retry-after"));
    assert_eq!(third.json()["error"]["code"], 429);
    let second = second.await.unwrap();
    assert_eq!(second.status, 408, "{:?}", second.body);
    w.release(1);
    assert_eq!(first.await.unwrap().status, 200);
    // The slot is free again.
    assert_eq!(post(&url, &json!({"prompt": "x"})).await.status, 200);
}

#[tokio::test]
async fn admin_and_inference_routes_require_their_keys() {
    let w = mock_worker().await;
    let other = mock_worker().await;
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.api_key = Some("admin-secret".into());
    cfg.inference_api_key = Some("infer-secret".into());
    let r = router(cfg).await;
    let u = r.url();
    let admin_calls: Vec<(&str, String, String)> = vec![
        ("POST", format!("{u}/workers"), json!({"url": other.url()}).to_string()),
        ("POST", format!("{u}/add_worker?url={}", other.url()), String::new()),
        ("POST", format!("{u}/remove_worker?url={}", other.url()), String::new()),
        ("DELETE", format!("{u}/workers?url={}", other.url()), String::new()),
        ("DELETE", format!("{u}/workers/{}", other.url()), String::new()),
        ("POST", format!("{u}/flush_cache"), String::new()),
    ];
    for (method, url, body) in &admin_calls {
        for auth in [None, Some("Bearer wrong"), Some("admin-secret"), Some("Bearer infer-secret")] {
            let headers: Vec<(&str, &str)> = auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
            let a = send(method, url, &headers, body.clone()).await;
            assert_eq!(a.status, 401, "{method} {url} with {auth:?}");
            assert_eq!(a.json()["error"]["type"], "authentication_error");
        }
    }
    // With the key each one is accepted (add, then the removals find it).
    let ok = |a: &Answer| a.status.is_success() || a.status == 404 || a.status == 409 || a.status == 502;
    for (method, url, body) in &admin_calls {
        let a = send(method, url, &[("authorization", "Bearer admin-secret")], body.clone()).await;
        assert!(ok(&a) && a.status != 401, "{method} {url}: {}", a.status);
    }
    // Reading stays open.
    assert_eq!(get(&format!("{u}/workers")).await.status, 200);
    assert_eq!(get(&format!("{u}/health")).await.status, 200);
    // Inference needs its own key.
    let chat_url = format!("{u}/v1/chat/completions");
    assert_eq!(post(&chat_url, &chat(json!({}))).await.status, 401);
    let a = send("POST", &chat_url, &[("authorization", "Bearer admin-secret")], chat(json!({})).to_string()).await;
    assert_eq!(a.status, 401);
    let a = send("POST", &chat_url, &[("authorization", "Bearer infer-secret")], chat(json!({})).to_string()).await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn shutdown_drains_open_requests_then_stops() {
    let w = mock_worker().await;
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.shutdown_grace = Duration::from_secs(30);
    let r = router(cfg).await;
    let url = r.url();
    let held = {
        let url = format!("{url}/v1/completions");
        tokio::spawn(async move { post(&url, &json!({"prompt": "x", "mode": "hold"})).await })
    };
    eventually(Duration::from_secs(5), "request in flight", || async { w.received.load(Ordering::SeqCst) == 1 }).await;
    let stopping = tokio::spawn(r.shutdown());
    // New connections are refused once the listener closes.
    eventually(Duration::from_secs(5), "listener closed", || async {
        tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await.is_err()
    })
    .await;
    assert!(!stopping.is_finished(), "shutdown must wait for the open request");
    w.release(1);
    assert_eq!(held.await.unwrap().status, 200, "the open request completes");
    stopping.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_gives_up_after_the_grace_period() {
    let w = mock_worker().await;
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.shutdown_grace = Duration::from_millis(200);
    let r = router(cfg).await;
    let held = {
        let url = format!("{}/v1/completions", r.url());
        tokio::spawn(async move {
            let req = hyper::Request::post(url)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(json!({"prompt": "x", "mode": "hold"}).to_string())))
                .unwrap();
            client().request(req).await.map(|r| r.status())
        })
    };
    eventually(Duration::from_secs(5), "request in flight", || async { w.received.load(Ordering::SeqCst) == 1 }).await;
    let started = tokio::time::Instant::now();
    r.shutdown().await.unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(3), "grace not honoured: {waited:?}");
    // The binary exits right after, closing the remaining connection; here the worker lets go.
    w.release(1);
    let _ = held.await;
}

/// Mutated request bodies through the parser: ≥ 10^5 inputs, no panic, and every
/// accepted body is a JSON object.
#[test]
fn fuzzed_bodies_never_panic_the_parser() {
    let seeds: Vec<Vec<u8>> = vec![
        br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"stream":true}"#.to_vec(),
        br#"{"messages":[{"role":"system","content":[{"type":"text","text":"x"}]},{"role":"user"}]}"#.to_vec(),
        br#"{"text":"hello","sampling_params":{"max_new_tokens":3},"input_ids":[1,2,3]}"#.to_vec(),
        br#"{"prompt":["a","b"],"user":"u","max_completion_tokens":9}"#.to_vec(),
        "{\"input\":\"日本語 🚀\",\"query\":\"é\"}".as_bytes().to_vec(),
    ];
    let specials: &[u8] = b"{}[]\":,\\0123456789-+.eEtrufalsn \xff\xc3\xa9";
    let mut rng = StdRng::seed_from_u64(99);
    let mut accepted = 0;
    for i in 0..100_000 {
        let mut body = seeds[i % seeds.len()].clone();
        for _ in 0..rng.random_range(1..6) {
            let pos = rng.random_range(0..=body.len());
            match rng.random_range(0..4) {
                0 if pos < body.len() => {
                    body.remove(pos);
                }
                1 => body.insert(pos, specials[rng.random_range(0..specials.len())]),
                2 if pos < body.len() => body[pos] = rng.random(),
                _ => body.truncate(pos),
            }
        }
        let key = if i % 3 == 0 { Some("session") } else { None };
        if let Ok(view) = RequestView::parse(&body, key) {
            accepted += 1;
            assert!(
                serde_json::from_slice::<Value>(&body).is_ok_and(|v| v.is_object()),
                "accepted invalid body {:?}",
                String::from_utf8_lossy(&body)
            );
            let _ = view.text.len();
        }
    }
    assert!(accepted > 1_000, "mutations should leave some bodies valid ({accepted})");
}

/// Chaos: steady concurrent load through the router while workers are killed, hung, made to
/// fail, slowed and cut mid-stream, then restored. Every request must get an answer (success
/// or a clear error) within the timeout plus a margin; in-flight counts return to zero. Run
/// without mid-stream failover (cut streams end with an error event) and with it (none may).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_request_gets_an_answer() {
    let cut_without = chaos_run(0).await;
    let cut_with = chaos_run(1).await;
    eprintln!("chaos: streams ended by an error event: {cut_without} without failover, {cut_with} with it");
    assert_eq!(cut_with, 0, "with failover on, no stream may end with an error event");
}

/// One chaos run with `--stream-failover-max failover_max`: the streams that ended with an
/// error event.
async fn chaos_run(failover_max: u32) -> usize {
    let ws = Arc::new(sims(4).await);
    let mut cfg = config(ws.iter().map(|w| w.url()).collect(), PolicyKind::PowerOfTwo);
    cfg.stream_failover_max = failover_max;
    cfg.retry = fast_retry();
    cfg.request_timeout = Duration::from_millis(1500);
    cfg.circuit_breaker =
        CircuitBreakerConfig { failure_threshold: 5, success_threshold: 1, timeout: Duration::from_millis(300) };
    let r = router(cfg).await;
    let url = r.url();

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chaos = {
        let ws = ws.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let phases = [
                (0, Faults { refuse_connections: true, ..Faults::default() }),
                (1, Faults { hang: true, ..Faults::default() }),
                (2, Faults { error_rate: 1.0, error_status: 500, ..Faults::default() }),
                (3, Faults { slowdown: 5.0, ..Faults::default() }),
                (0, Faults { die_after_tokens: Some(3), ..Faults::default() }),
            ];
            for (i, f) in phases {
                ws[i].set_faults(f).unwrap();
                tokio::time::sleep(Duration::from_millis(400)).await;
                ws[i].set_faults(Faults::default()).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(300)).await; // recovery under load
            done.store(true, Ordering::SeqCst);
        })
    };
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let url = url.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut results = Vec::new();
                // Bounded: until the chaos script ends, at most 1,000 requests per client.
                for i in 0..1_000 {
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    let stream = (c + i) % 2 == 0;
                    let body = json!({"prompt": format!("client {c} request {i}"), "max_tokens": 48, "ignore_eos": true, "stream": stream});
                    let started = tokio::time::Instant::now();
                    let a = post(&format!("{url}/v1/completions"), &body).await;
                    results.push((a, stream, started.elapsed()));
                }
                results
            })
        })
        .collect();
    let (mut sent, mut ok, mut clear_errors, mut max_latency, mut cut) = (0, 0, 0, Duration::ZERO, 0);
    for c in clients {
        for (a, stream, latency) in c.await.unwrap() {
            sent += 1;
            max_latency = max_latency.max(latency);
            let text = String::from_utf8_lossy(&a.body).to_string();
            let complete =
                if stream { text.ends_with("data: [DONE]\n\n") } else { a.json()["usage"]["completion_tokens"] == 48 };
            if a.status == 200 && stream && text.contains("\"error\"") {
                cut += 1;
            }
            if a.status == 200 && complete && !(stream && text.contains("\"error\"")) {
                ok += 1;
            } else if (a.status != 200 && serde_json::from_slice::<Value>(&a.body).is_ok())
                || (stream && text.contains("\"error\""))
            {
                clear_errors += 1;
            } else {
                panic!("unclear answer: {} {text:?}", a.status);
            }
        }
    }
    chaos.await.unwrap();
    let metrics = String::from_utf8_lossy(&get(&format!("{url}/metrics")).await.body).to_string();
    let metric = |name: &str| {
        metrics.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    let (delay_sum, delay_count) =
        (metric("switchyard_stream_failover_seconds_sum "), metric("switchyard_stream_failover_seconds_count "));
    eprintln!(
        "chaos (failover max {failover_max}): sent {sent}, succeeded {ok}, clear errors {clear_errors}, lost {}, \
         streams cut {cut}, continuations {delay_count} (mean time to resume {:.1} ms), max latency {max_latency:?}",
        sent - ok - clear_errors,
        1e3 * delay_sum / delay_count.max(1.0),
    );
    assert!(sent >= 100, "the load must span the chaos script: {sent}");
    assert_eq!(ok + clear_errors, sent, "lost requests");
    assert!(max_latency < Duration::from_millis(1500 + 2500), "max latency {max_latency:?}");
    assert!(ok as f64 >= 0.8 * sent as f64, "successes should dominate: {ok}/{sent}");
    eventually(Duration::from_secs(5), "in-flight back to 0", || async { total_in_flight(&url).await == 0 }).await;
    cut
}

#[tokio::test]
async fn unhealthy_workers_are_removed_when_asked_and_startup_waits_for_one() {
    let ws = sims(2).await;
    let mut cfg = config(ws.iter().map(|w| w.url()).collect(), PolicyKind::RoundRobin);
    cfg.remove_unhealthy_workers = true;
    let r = router(cfg).await;
    ws[0].set_faults(Faults { health_fail: true, ..Faults::default() }).unwrap();
    eventually(Duration::from_secs(5), "sick worker removed", || async {
        get(&format!("{}/list_workers", r.url())).await.json()["urls"] == json!([ws[1].url()])
    })
    .await;
    // Start-up with the only worker still booting: waits (bounded) and then serves.
    let booting = sims(1).await;
    booting[0].set_faults(Faults { health_fail: true, ..Faults::default() }).unwrap();
    let mut cfg = config(vec![booting[0].url()], PolicyKind::RoundRobin);
    cfg.worker_startup_timeout = Duration::from_secs(10);
    cfg.health.success_threshold = 1_000; // only the start-up wait can make it healthy
    let starting = tokio::spawn(router(cfg));
    eventually(Duration::from_secs(5), "first probe refused", || async { !starting.is_finished() }).await;
    booting[0].set_faults(Faults::default()).unwrap();
    let r2 = starting.await.unwrap();
    assert_eq!(get(&format!("{}/readiness", r2.url())).await.status, 200, "ready as soon as start-up returns");
}
