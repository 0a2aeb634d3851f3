//! End-to-end tests of regular mode against mock workers and simulated workers, all on
//! ephemeral loopback ports. Nothing waits with a fixed sleep: tests wait on gates the
//! mock workers expose, or poll for a condition with a deadline.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use switchyard::policies::PolicyKind;
use switchyard_sim::server::{spawn_worker, Faults, WorkerConfig};

const ENDPOINTS: [&str; 5] = ["/v1/chat/completions", "/v1/completions", "/generate", "/v1/embeddings", "/v1/rerank"];

#[tokio::test]
async fn every_inference_endpoint_is_proxied_with_headers_and_request_id() {
    let w = mock_worker().await;
    let r = router(config(vec![w.url()], PolicyKind::RoundRobin)).await;
    for path in ENDPOINTS {
        let a = send(
            "POST",
            &format!("{}{path}", r.url()),
            &[
                ("content-type", "application/json"),
                ("x-request-id", "req-123"),
                ("x-custom", "kept"),
                ("connection", "keep-alive"),
            ],
            json!({"prompt": "hi", "input": "x"}).to_string(),
        )
        .await;
        assert_eq!(a.status, 200, "{path}");
        let echo = a.json();
        assert_eq!(echo["path"], path);
        assert_eq!(echo["headers"]["x-request-id"], "req-123", "request id forwarded");
        assert_eq!(echo["headers"]["x-custom"], "kept");
        assert_eq!(echo["body"]["prompt"], "hi", "body forwarded untouched");
        assert_eq!(a.headers["x-request-id"], "req-123", "request id echoed");
    }
    // Without one, an id is generated, forwarded and echoed.
    let a = post(&format!("{}/generate", r.url()), &json!({"text": "x"})).await;
    let id = a.headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(id.len() >= 8);
    assert_eq!(a.json()["headers"]["x-request-id"], id.as_str());
    assert_eq!(total_in_flight(&r.url()).await, 0);
}

#[tokio::test]
async fn streaming_passes_the_first_chunk_before_the_worker_finishes() {
    let w = mock_worker().await;
    let r = router(config(vec![w.url()], PolicyKind::RoundRobin)).await;
    let req = hyper::Request::post(format!("{}/v1/chat/completions", r.url()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat(json!({"mode": "stream", "stream": true})).to_string())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The worker holds the rest of its stream until we release it: the first chunk can only
    // arrive now if the router does not buffer.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first chunk buffered")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), Bytes::from("data: {\"chunk\":1}\n\n"));
    assert_eq!(total_in_flight(&r.url()).await, 1, "stream still in flight");
    w.release(1);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, Bytes::from("data: {\"chunk\":2}\n\ndata: [DONE]\n\n"));
    eventually(Duration::from_secs(5), "in-flight back to 0", || async { total_in_flight(&r.url()).await == 0 }).await;
}

async fn shares(policy: PolicyKind, workers: usize, requests: usize) -> (Vec<String>, Vec<u16>) {
    let mut ws = Vec::new();
    for _ in 0..workers {
        ws.push(mock_worker().await);
    }
    let urls: Vec<String> = ws.iter().map(|w| w.url()).collect();
    let r = router(config(urls.clone(), policy)).await;
    let mut picks = Vec::new();
    for _ in 0..requests {
        let a = post(&format!("{}/v1/completions", r.url()), &json!({"prompt": "x"})).await;
        picks.push(a.json()["worker"].as_u64().unwrap() as u16);
    }
    (urls, picks)
}

#[tokio::test]
async fn round_robin_rotates_exactly() {
    let (urls, picks) = shares(PolicyKind::RoundRobin, 3, 9).await;
    let ports: Vec<u16> = urls.iter().map(|u| u.rsplit(':').next().unwrap().parse().unwrap()).collect();
    let expected: Vec<u16> = (0..9).map(|i| ports[i % 3]).collect();
    assert_eq!(picks, expected);
}

#[tokio::test]
async fn random_spreads_within_a_statistical_bound() {
    let (_, picks) = shares(PolicyKind::Random, 2, 400).await;
    let mut counts: HashMap<u16, usize> = HashMap::new();
    for p in picks {
        *counts.entry(p).or_default() += 1;
    }
    // Binomial(400, 1/2): σ = 10; 5σ bound.
    assert_eq!(counts.len(), 2);
    assert!(counts.values().all(|&c| (150..=250).contains(&c)), "{counts:?}");
}

#[tokio::test]
async fn load_based_and_power_of_two_pick_the_idle_worker() {
    for policy in [PolicyKind::LoadBased, PolicyKind::PowerOfTwo] {
        let mut a = mock_worker().await;
        let b = mock_worker().await;
        let r = router(config(vec![a.url(), b.url()], policy)).await;
        // Occupy one worker with 3 held requests (they stay in flight until released).
        let mut held = Vec::new();
        for _ in 0..3 {
            let url = format!("{}/v1/completions", r.url());
            held.push(tokio::spawn(async move { post(&url, &json!({"prompt": "x", "mode": "hold"})).await }));
        }
        eventually(Duration::from_secs(5), "3 requests in flight", || async { total_in_flight(&r.url()).await == 3 })
            .await;
        // With random tie-break, the first may have gone to either worker; find the busy one.
        let loads = get(&format!("{}/get_loads", r.url())).await.json();
        let busy: Vec<(String, u64)> = loads["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| (w["url"].as_str().unwrap().to_owned(), w["in_flight"].as_u64().unwrap()))
            .collect();
        let idle_port = busy
            .iter()
            .min_by_key(|(_, n)| *n)
            .map(|(u, _)| u.rsplit(':').next().unwrap().parse::<u64>().unwrap())
            .unwrap();
        let min = busy.iter().map(|(_, n)| *n).min().unwrap();
        let max = busy.iter().map(|(_, n)| *n).max().unwrap();
        if max > min {
            let next = post(&format!("{}/v1/completions", r.url()), &json!({"prompt": "x"})).await;
            assert_eq!(next.json()["worker"].as_u64().unwrap(), idle_port, "{policy:?} chose the busier worker");
        }
        assert!(max - min <= 1, "{policy:?} stacked held requests on one worker: {busy:?}");
        a.release(3);
        b.release(3);
        for h in held {
            assert_eq!(h.await.unwrap().status, 200);
        }
        while a.arrivals.try_recv().is_ok() {}
        eventually(Duration::from_secs(5), "in-flight 0", || async { total_in_flight(&r.url()).await == 0 }).await;
    }
}

#[tokio::test]
async fn error_statuses_are_mapped_with_json_bodies() {
    let w = mock_worker().await;
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.max_payload_size = 1024;
    let r = router(cfg).await;
    let url = r.url();
    let check = |a: &Answer, status: u16, needle: &str| {
        assert_eq!(a.status, status, "{:?}", a.body);
        let msg = a.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains(needle), "{msg} should contain {needle}");
        assert_eq!(a.json()["error"]["code"], status);
    };
    check(&send("POST", &format!("{url}/v1/chat/completions"), &[], "{not json").await, 400, "invalid JSON");
    check(&send("POST", &format!("{url}/generate"), &[], "[1,2]").await, 400, "JSON object");
    check(&get(&format!("{url}/v2/nothing")).await, 404, "/v2/nothing");
    check(&send("POST", &format!("{url}/v1/completions"), &[], vec![b'x'; 4096]).await, 413, "1024");
    check(&post(&format!("{url}/workers"), &json!({"url": "ftp://x:1"})).await, 400, "scheme");
    check(&post(&format!("{url}/workers"), &json!({"url": w.url()})).await, 409, "already");
    check(&send("DELETE", &format!("{url}/workers?url=http://127.0.0.1:1"), &[], "").await, 404, "not registered");
    // Worker errors pass through with their own status and body.
    let a = post(&format!("{url}/v1/completions"), &json!({"prompt": "x", "mode": "status", "status": 503})).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"], "mock");

    // 502: the only worker's port is closed.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let r2 = router(config(vec![dead_url.clone()], PolicyKind::RoundRobin)).await;
    // It failed its first probe, so it is unhealthy: 503 with no healthy worker.
    check(&post(&format!("{}/generate", r2.url()), &json!({"text": "x"})).await, 503, "no healthy");
    let worker = r2.state().registry.get(&dead_url).unwrap();
    r2.state().registry.set_healthy(&worker, true);
    check(&post(&format!("{}/generate", r2.url()), &json!({"text": "x"})).await, 502, "unreachable");
    assert_eq!(total_in_flight(&r2.url()).await, 0);

    // 504: a worker that never answers, with a short request timeout.
    let hung =
        spawn_worker(WorkerConfig { faults: Faults { hang: true, ..Faults::default() }, ..WorkerConfig::default() })
            .await
            .unwrap();
    let mut cfg = config(vec![hung.url()], PolicyKind::RoundRobin);
    cfg.request_timeout = Duration::from_millis(200);
    let r3 = router(cfg).await;
    check(&post(&format!("{}/v1/chat/completions", r3.url()), &chat(json!({}))).await, 504, "did not answer");
    assert_eq!(total_in_flight(&r3.url()).await, 0);
}

#[tokio::test]
async fn connect_failures_move_to_another_worker() {
    let good = mock_worker().await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let r = router(config(vec![dead_url.clone(), good.url()], PolicyKind::RoundRobin)).await;
    let worker = r.state().registry.get(&dead_url).unwrap();
    r.state().registry.set_healthy(&worker, true);
    for _ in 0..6 {
        let a = post(&format!("{}/v1/completions", r.url()), &json!({"prompt": "x"})).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(a.json()["worker"].as_u64().unwrap(), u64::from(good.addr.port()));
    }
}

#[tokio::test]
async fn health_checker_removes_and_restores_a_worker() {
    let sick = spawn_worker(WorkerConfig { time_scale: 50.0, ..WorkerConfig::default() }).await.unwrap();
    let well = spawn_worker(WorkerConfig { time_scale: 50.0, ..WorkerConfig::default() }).await.unwrap();
    let r = router(config(vec![sick.url(), well.url()], PolicyKind::RoundRobin)).await;
    assert_eq!(r.state().registry.healthy().len(), 2);
    sick.set_faults(Faults { health_fail: true, ..Faults::default() }).unwrap();
    eventually(Duration::from_secs(5), "sick worker marked unhealthy", || async {
        get(&format!("{}/readiness", r.url())).await.json()["healthy_workers"] == 1
    })
    .await;
    // Traffic now goes only to the healthy one.
    for _ in 0..4 {
        let a = post(&format!("{}/v1/chat/completions", r.url()), &chat(json!({}))).await;
        assert!(a.json()["id"].as_str().unwrap().contains(&well.addr().port().to_string()));
    }
    sick.set_faults(Faults::default()).unwrap();
    eventually(Duration::from_secs(5), "sick worker restored", || async {
        get(&format!("{}/readiness", r.url())).await.json()["healthy_workers"] == 2
    })
    .await;
}

/// Marks each of `urls` as having passed a probe (its engine came up), then waits until the
/// health checker has marked every worker unhealthy: from then on the router is in panic.
async fn served_then_every_probe_failing(r: &switchyard::server::RunningRouter, urls: &[String]) {
    for url in urls {
        let w = r.state().registry.get(url).unwrap();
        r.state().registry.set_healthy(&w, true);
    }
    eventually(Duration::from_secs(5), "every worker marked unhealthy", || async {
        get(&format!("{}/readiness", r.url())).await.json()["healthy_workers"] == 0
    })
    .await;
}

/// Every worker failing its probes while it still serves (an engine too busy to answer
/// `/health` in time): by default the router is in health panic and routes across all of
/// them; with the panic threshold at 0 it refuses every request.
#[tokio::test]
async fn with_every_probe_failing_the_router_routes_across_the_workers_that_have_served_unless_panic_is_off() {
    let a = spawn_worker(WorkerConfig { time_scale: 50.0, ..WorkerConfig::default() }).await.unwrap();
    let b = spawn_worker(WorkerConfig { time_scale: 50.0, ..WorkerConfig::default() }).await.unwrap();
    let panics = router(config(vec![a.url(), b.url()], PolicyKind::RoundRobin)).await;
    let mut cfg = config(vec![a.url(), b.url()], PolicyKind::RoundRobin);
    cfg.health.panic_threshold = 0.0;
    let refuses = router(cfg).await;
    let readiness = |r: String| async move { get(&format!("{r}/readiness")).await };
    for r in [&panics, &refuses] {
        assert_eq!(readiness(r.url()).await.json()["status"], "ready");
    }
    for w in [&a, &b] {
        w.set_faults(Faults { health_fail: true, ..Faults::default() }).unwrap();
    }
    for r in [&panics, &refuses] {
        served_then_every_probe_failing(r, &[]).await;
    }
    let ready = readiness(panics.url()).await;
    let ready = (ready.status.as_u16(), ready.json()["status"].clone(), ready.json()["routable_workers"].clone());
    assert_eq!(ready, (200, json!("panic"), json!(2)));
    let metrics =
        |r: String| async move { String::from_utf8_lossy(&get(&format!("{r}/metrics")).await.body).into_owned() };
    assert!(metrics(panics.url()).await.contains("switchyard_health_panic 1"));
    let mut served = std::collections::HashSet::new();
    for _ in 0..4 {
        let answer = post(&format!("{}/v1/chat/completions", panics.url()), &chat(json!({}))).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        let id = answer.json()["id"].as_str().unwrap_or_default().to_owned();
        served.extend([&a, &b].iter().map(|w| w.addr().port()).filter(|p| id.contains(&p.to_string())));
    }
    assert_eq!(served.len(), 2, "both workers take requests in panic: {served:?}");
    let refused = post(&format!("{}/v1/chat/completions", refuses.url()), &chat(json!({}))).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert!(
        refused.json()["error"]["message"].as_str().unwrap_or_default().contains("no healthy"),
        "{:?}",
        refused.body
    );
    assert_eq!(readiness(refuses.url()).await.status, 503);

    // Probes pass again: the panic is over.
    for w in [&a, &b] {
        w.set_faults(Faults::default()).unwrap();
    }
    eventually(Duration::from_secs(5), "workers healthy again", || async {
        readiness(panics.url()).await.json()["status"] == "ready"
    })
    .await;
    assert!(metrics(panics.url()).await.contains("switchyard_health_panic 0"));
}

/// In panic a worker that hangs is routable too: its requests end at the request timeout
/// (504, never a hang), and once its circuit breaker has counted them it gets no more.
#[tokio::test]
async fn in_health_panic_a_hung_worker_costs_its_requests_a_timeout_until_its_breaker_opens() {
    let faults = Faults { hang: true, health_fail: true, ..Faults::default() };
    let hung = spawn_worker(WorkerConfig { faults, ..WorkerConfig::default() }).await.unwrap();
    let live = spawn_worker(WorkerConfig {
        faults: Faults { health_fail: true, ..Faults::default() },
        ..WorkerConfig::default()
    })
    .await
    .unwrap();
    let mut cfg = config(vec![hung.url(), live.url()], PolicyKind::RoundRobin);
    cfg.request_timeout = Duration::from_millis(300);
    cfg.circuit_breaker.failure_threshold = 2;
    let r = router(cfg).await;
    served_then_every_probe_failing(&r, &[hung.url(), live.url()]).await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let (url, body) = (format!("{}/v1/chat/completions", r.url()), chat(json!({})));
        let answer =
            tokio::time::timeout(Duration::from_secs(5), post(&url, &body)).await.expect("an answer, not a hang");
        statuses.push(answer.status.as_u16());
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 504).count(), 2, "{statuses:?}");
    assert!(statuses.iter().all(|&s| s == 200 || s == 504), "{statuses:?}");
    assert!(statuses[4..].iter().all(|&s| s == 200), "the breaker keeps the hung worker out: {statuses:?}");
    assert_eq!(total_in_flight(&r.url()).await, 0);
}

/// In panic a worker that is really dead is routable too: its requests fail to connect and
/// are retried on a live one, so none is lost, and its circuit breaker takes it out.
#[tokio::test]
async fn in_health_panic_a_dead_workers_requests_are_retried_on_a_live_one() {
    let live = spawn_worker(WorkerConfig {
        faults: Faults { health_fail: true, ..Faults::default() },
        ..WorkerConfig::default()
    })
    .await
    .unwrap();
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let r = router(config(vec![dead_url.clone(), live.url()], PolicyKind::RoundRobin)).await;
    // Both have served once (as if the dead one died after its engine came up).
    served_then_every_probe_failing(&r, &[dead_url, live.url()]).await;
    assert!(r.state().registry.in_panic());
    for _ in 0..6 {
        let answer = post(&format!("{}/v1/chat/completions", r.url()), &chat(json!({}))).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert!(answer.json()["id"].as_str().unwrap().contains(&live.addr().port().to_string()));
    }
    assert_eq!(total_in_flight(&r.url()).await, 0);
}

#[tokio::test]
async fn workers_can_be_added_and_removed_at_run_time() {
    let a = mock_worker().await;
    let b = mock_worker().await;
    let r = router(config(vec![], PolicyKind::RoundRobin)).await;
    let url = r.url();
    assert_eq!(get(&format!("{url}/readiness")).await.status, 503);
    assert_eq!(post(&format!("{url}/generate"), &json!({"text": "x"})).await.status, 503);
    let added = post(&format!("{url}/workers"), &json!({"url": a.url()})).await;
    assert_eq!(added.status, 200, "{:?}", added.body);
    assert_eq!(added.json()["worker"]["model_id"], "mock-model", "model discovered from /v1/models");
    assert_eq!(send("POST", &format!("{url}/add_worker?url={}", b.url()), &[], "").await.status, 200);
    let list = get(&format!("{url}/list_workers")).await.json();
    assert_eq!(list["urls"], json!([a.url(), b.url()]));
    assert_eq!(get(&format!("{url}/workers")).await.json()["total"], 2);
    // Both serve.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(post(&format!("{url}/generate"), &json!({"text": "x"})).await.json()["worker"].as_u64().unwrap());
    }
    assert_eq!(seen.len(), 2);
    // Remove one each way.
    assert_eq!(send("DELETE", &format!("{url}/workers/{}", a.url()), &[], "").await.status, 200);
    assert_eq!(send("POST", &format!("{url}/remove_worker?url={}", b.url()), &[], "").await.status, 200);
    assert_eq!(get(&format!("{url}/workers")).await.json()["total"], 0);
    assert_eq!(post(&format!("{url}/generate"), &json!({"text": "x"})).await.status, 503);
}

#[tokio::test]
async fn info_endpoints_answer_from_workers_or_degrade() {
    let sim = spawn_worker(WorkerConfig::default()).await.unwrap();
    let mock = mock_worker().await; // no /get_model_info, /get_server_info, /health_generate
    let r = router(config(vec![sim.url()], PolicyKind::RoundRobin)).await;
    let url = r.url();
    for path in ["/health", "/liveness"] {
        assert_eq!(get(&format!("{url}{path}")).await.status, 200);
    }
    assert_eq!(get(&format!("{url}/readiness")).await.json()["status"], "ready");
    assert_eq!(get(&format!("{url}/health_generate")).await.status, 200);
    assert_eq!(get(&format!("{url}/v1/models")).await.json()["data"][0]["id"], "meta-llama/Llama-3.1-8B-Instruct");
    assert_eq!(get(&format!("{url}/get_model_info")).await.json()["is_generation"], true);
    let info = get(&format!("{url}/get_server_info")).await.json();
    assert_eq!(
        (info["router"]["name"].as_str(), info["simulator"].as_str()),
        (Some("switchyard"), Some("switchyard-sim"))
    );
    let flushed = send("POST", &format!("{url}/flush_cache"), &[], "").await;
    assert_eq!((flushed.status.as_u16(), flushed.json()["status"].as_str()), (200, Some("flushed")));

    // A plain OpenAI-compatible server without SGLang's endpoints.
    let r2 = router(config(vec![mock.url()], PolicyKind::RoundRobin)).await;
    let url2 = r2.url();
    assert_eq!(get(&format!("{url2}/v1/models")).await.json()["data"][0]["id"], "mock-model");
    // The mock answers unknown GETs on its catch-all with JSON 200, so check the health path.
    assert_eq!(get(&format!("{url2}/health_generate")).await.status, 200);
    assert_eq!(get(&format!("{url2}/get_server_info")).await.json()["router"]["workers"], 1);
    let loads = get(&format!("{url2}/get_loads")).await.json();
    assert_eq!(loads["workers"][0]["url"], mock.url());
}

#[tokio::test]
async fn in_flight_returns_to_zero_after_success_error_and_disconnect() {
    let sim = spawn_worker(WorkerConfig { time_scale: 20.0, ..WorkerConfig::default() }).await.unwrap();
    let r = router(config(vec![sim.url()], PolicyKind::LoadBased)).await;
    let url = r.url();
    // Success, streaming and not.
    assert_eq!(post(&format!("{url}/v1/chat/completions"), &chat(json!({}))).await.status, 200);
    let s = post(&format!("{url}/v1/chat/completions"), &chat(json!({"stream": true}))).await;
    assert!(String::from_utf8_lossy(&s.body).ends_with("data: [DONE]\n\n"));
    assert_eq!(total_in_flight(&url).await, 0);
    // Worker error.
    sim.set_faults(Faults { error_rate: 1.0, error_status: 500, ..Faults::default() }).unwrap();
    assert_eq!(post(&format!("{url}/v1/chat/completions"), &chat(json!({}))).await.status, 500);
    assert_eq!(total_in_flight(&url).await, 0);
    // Worker dies mid-stream: the client gets an SSE error event, not a silent cut.
    sim.set_faults(Faults { die_after_tokens: Some(3), ..Faults::default() }).unwrap();
    let cut = post(
        &format!("{url}/v1/chat/completions"),
        &chat(json!({"stream": true, "max_tokens": 50, "ignore_eos": true})),
    )
    .await;
    let text = String::from_utf8_lossy(&cut.body).to_string();
    assert!(text.contains("\"error\"") && text.contains("ended the stream early"), "{text}");
    assert_eq!(total_in_flight(&url).await, 0);
    let failed: u64 = get(&format!("{url}/workers")).await.json()["workers"][0]["load"]["failed"].as_u64().unwrap();
    assert_eq!(failed, 2, "500 and the cut stream count as failures");
    // Client disconnects mid-stream.
    sim.set_faults(Faults::default()).unwrap();
    let req = hyper::Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat(json!({"stream": true, "max_tokens": 2000, "ignore_eos": true})).to_string())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    let _ = body.frame().await;
    assert_eq!(total_in_flight(&url).await, 1);
    drop(body);
    eventually(Duration::from_secs(5), "disconnect releases in-flight", || async { total_in_flight(&url).await == 0 })
        .await;
    eventually(Duration::from_secs(5), "worker cancels the abandoned request", || async { sim.stats().running == 0 })
        .await;
}

#[tokio::test]
async fn concurrent_requests_all_get_answers() {
    let mut sims = Vec::new();
    for i in 0..3 {
        sims.push(spawn_worker(WorkerConfig { time_scale: 50.0, seed: i, ..WorkerConfig::default() }).await.unwrap());
    }
    let r = router(config(sims.iter().map(|s| s.url()).collect(), PolicyKind::PowerOfTwo)).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let url = format!("{}/v1/completions", r.url());
        tasks.push(tokio::spawn(async move {
            post(
                &url,
                &json!({"prompt": format!("prompt {i}"), "max_tokens": 16, "ignore_eos": true, "stream": i % 2 == 0}),
            )
            .await
        }));
    }
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, 200);
    }
    assert_eq!(total_in_flight(&r.url()).await, 0);
    let per_worker: Vec<Value> =
        get(&format!("{}/workers", r.url())).await.json()["workers"].as_array().unwrap().clone();
    let dispatched: u64 = per_worker.iter().map(|w| w["load"]["dispatched"].as_u64().unwrap()).sum();
    assert_eq!(dispatched, 60);
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    let exe = env!("CARGO_BIN_EXE_switchyard");
    for args in
        [&["--port", "99999"][..], &["--policy", "nope"], &["--worker-urls", "nohost"], &["--sim-profile", "tpu"]]
    {
        let out = std::process::Command::new(exe).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}

/// Sends 7 prefix groups (coprime with the 4 workers, so round robin cannot align with them) × 6 chat requests (sequentially) and returns the cached prompt
/// tokens the simulated workers reported, summed.
async fn cached_tokens_with(policy: PolicyKind) -> u64 {
    let mut sims = Vec::new();
    for i in 0..4 {
        sims.push(spawn_worker(WorkerConfig { time_scale: 100.0, seed: i, ..WorkerConfig::default() }).await.unwrap());
    }
    let r = router(config(sims.iter().map(|s| s.url()).collect(), policy)).await;
    let mut cached = 0;
    for round in 0..6 {
        for group in 0..7 {
            let system = format!("{group} You are assistant number {group}. ").repeat(30);
            let body = json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": format!("question {round}")}], "max_tokens": 2});
            let a = post(&format!("{}/v1/chat/completions", r.url()), &body).await;
            assert_eq!(a.status, 200);
            cached += a.json()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        }
    }
    cached
}

#[tokio::test]
async fn cache_aware_raises_prefix_cache_hits_over_round_robin() {
    let aware = cached_tokens_with(PolicyKind::CacheAware).await;
    let rr = cached_tokens_with(PolicyKind::RoundRobin).await;
    // cache_aware: every group after its first request hits (5 of 6 rounds); round robin
    // scatters each group over all 4 workers, so the first visit to each worker misses.
    assert!(aware as f64 > rr as f64 * 1.3, "cache_aware {aware} vs round_robin {rr} cached tokens");
}

#[tokio::test]
async fn consistent_hash_keeps_sessions_on_one_worker() {
    let mut ws = Vec::new();
    for _ in 0..4 {
        ws.push(mock_worker().await);
    }
    let r = router(config(ws.iter().map(|w| w.url()).collect(), PolicyKind::ConsistentHash)).await;
    let mut owners = HashMap::new();
    for round in 0..5 {
        for s in 0..20 {
            let session = format!("session-{s}");
            let a = send(
                "POST",
                &format!("{}/v1/chat/completions", r.url()),
                &[("content-type", "application/json"), ("x-session-id", &session)],
                chat(json!({"messages": [{"role": "user", "content": format!("turn {round}")}]})).to_string(),
            )
            .await;
            let worker = a.json()["worker"].as_u64().unwrap();
            assert_eq!(*owners.entry(session).or_insert(worker), worker, "session moved");
        }
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert!(distinct.len() >= 3, "20 sessions should spread over the workers: {owners:?}");
    // The body's `user` field is a key too.
    let url = format!("{}/v1/completions", r.url());
    let body = json!({"prompt": "x", "user": "alice"});
    let first = post(&url, &body).await.json()["worker"].clone();
    for _ in 0..5 {
        assert_eq!(post(&url, &body).await.json()["worker"], first);
    }
}
