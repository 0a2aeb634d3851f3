//! marginal_utility through the real router and simulated workers over HTTP: it learns from
//! proxied streams (visible in `/debug/policy`), `shed` answers 503 with Retry-After, and dead,
//! hung or cut workers and bad bodies still get every request a clear answer.

mod common;

use std::time::Duration;

use common::{get, post, router};
use serde_json::{json, Value};
use switchyard::config::RouterConfig;
use switchyard::policies::{MarginalUtilityConfig, Overload, PolicyConfig};
use switchyard_sim::server::{spawn_worker, Faults, WorkerConfig};

async fn sim_workers(n: usize) -> Vec<switchyard_sim::server::WorkerHandle> {
    let mut out = Vec::new();
    for i in 0..n {
        let config = WorkerConfig { port: 0, time_scale: 20.0, seed: i as u64, ..WorkerConfig::default() };
        out.push(spawn_worker(config).await.expect("sim worker"));
    }
    out
}

fn mu(config: MarginalUtilityConfig, urls: Vec<String>) -> RouterConfig {
    RouterConfig {
        worker_urls: urls,
        policy: PolicyConfig::MarginalUtility(MarginalUtilityConfig { seed: Some(1), ..config }),
        ..common::config(vec![], switchyard::policies::PolicyKind::MarginalUtility)
    }
}

fn completion(i: usize) -> Value {
    json!({"model": "m", "prompt": format!("question {i} {}", "words ".repeat(100)), "max_tokens": 16,
           "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learns_from_proxied_streams_and_explains_itself() {
    let workers = sim_workers(2).await;
    let r = router(mu(MarginalUtilityConfig::default(), workers.iter().map(|w| w.url()).collect())).await;
    let url = format!("{}/v1/completions", r.url());
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..40 {
        let url = url.clone();
        sends.spawn(async move { post(&url, &completion(i)).await });
    }
    while let Some(answer) = sends.join_next().await {
        let answer = answer.expect("request task");
        assert_eq!(answer.status, 200);
        assert!(String::from_utf8_lossy(&answer.body).contains("[DONE]"));
    }
    let state = get(&format!("{}/debug/policy", r.url())).await.json();
    assert_eq!(state["policy"], "marginal_utility");
    assert_eq!(state["decisions"].as_u64(), Some(40), "{state}");
    // Each request's size counted once, on its first ask (best effort tells small from large
    // by these): every request asked for 16 tokens.
    let sizes = &state["request_sizes"];
    assert_eq!(sizes["mean_max_tokens"].as_f64(), Some(16.0), "{state}");
    assert!(sizes["mean_prompt_tokens"].as_f64().is_some_and(|p| p > 100.0), "{state}");
    let reports = state["workers"].as_array().expect("workers");
    let samples: u64 = reports.iter().map(|w| w["samples"][1].as_u64().unwrap_or(0)).sum();
    assert_eq!(samples, 40, "every streamed request became a prefill sample: {state}");
    for w in reports {
        assert!(w["url"].as_str().is_some_and(|u| u.starts_with("http://127.0.0.1:")), "{w}");
        assert_eq!(w["prefill_phi"].as_array().map(Vec::len), Some(4));
        let recent = w["recent_ttft"].as_array().expect("recent_ttft");
        assert!(recent.iter().any(|r| r[1].as_f64().is_some_and(|ttft| ttft > 0.0)), "observed TTFTs: {w}");
    }
    let metrics = get(&format!("{}/metrics", r.url())).await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("switchyard_mu_decisions_total 40"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_answers_503_with_retry_after_and_queue_serves_best_effort() {
    let workers = sim_workers(1).await;
    let urls: Vec<String> = workers.iter().map(|w| w.url()).collect();
    // A 1 ms TTFT SLO nobody can meet: `shed` refuses at once, clearly; `queue` still serves.
    let impossible = MarginalUtilityConfig { slo_ttft: Duration::from_millis(1), ..Default::default() };
    let shed = router(mu(MarginalUtilityConfig { overload: Overload::Shed, ..impossible.clone() }, urls.clone())).await;
    let answer = post(&format!("{}/v1/completions", shed.url()), &completion(1)).await;
    assert_eq!(answer.status, 503);
    assert!(answer.headers.get("retry-after").is_some());
    assert_eq!(answer.json()["error"]["type"], "overloaded", "{}", answer.json());
    let metrics = get(&format!("{}/metrics", shed.url())).await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("switchyard_mu_shed_total 1"));
    let queue = router(mu(MarginalUtilityConfig { overload: Overload::Queue, ..impossible }, urls)).await;
    let answer = post(&format!("{}/v1/completions", queue.url()), &completion(2)).await;
    assert_eq!(answer.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_worker_and_bad_bodies_through_marginal_utility() {
    let workers = sim_workers(1).await;
    // A port nobody listens on: the policy may pick it; the router must retry elsewhere.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let r = router(mu(MarginalUtilityConfig::default(), vec![dead, workers[0].url()])).await;
    let url = format!("{}/v1/completions", r.url());
    for i in 0..10 {
        let answer = post(&url, &completion(i)).await;
        assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    }
    let bad = common::send("POST", &url, &[("content-type", "application/json")], "{oops").await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"]["message"].as_str().is_some_and(|m| m.contains("JSON")));
}

/// The streamed path this policy learns from, under a worker that hangs and one that cuts its
/// streams after the first tokens: every request gets a complete answer or a clear error, the
/// in-flight state (waiting requests included) returns to zero, and failed requests never
/// become samples — only the successful ones do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_and_cut_streams_through_marginal_utility() {
    let workers = sim_workers(3).await;
    workers[0].set_faults(Faults { hang: true, ..Faults::default() }).expect("faults");
    workers[1].set_faults(Faults { die_after_tokens: Some(3), ..Faults::default() }).expect("faults");
    let mut cfg = mu(MarginalUtilityConfig::default(), workers.iter().map(|w| w.url()).collect());
    cfg.request_timeout = Duration::from_millis(800);
    let r = router(cfg).await;
    let url = format!("{}/v1/completions", r.url());
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..24 {
        let url = url.clone();
        sends.spawn(async move { post(&url, &completion(i)).await });
    }
    let (mut ok, mut errors) = (0u64, 0u64);
    while let Some(answer) = sends.join_next().await {
        let answer = answer.expect("request task");
        let text = String::from_utf8_lossy(&answer.body).to_string();
        if answer.status == 200 && text.ends_with("data: [DONE]\n\n") && !text.contains("\"error\"") {
            ok += 1;
        } else if (answer.status != 200 && serde_json::from_str::<Value>(&text).is_ok()) || text.contains("\"error\"") {
            errors += 1;
        } else {
            panic!("unclear answer: {} {text:?}", answer.status);
        }
    }
    assert_eq!(ok + errors, 24);
    assert!(ok > 0 && errors > 0, "the healthy worker serves and the faulty ones were tried: {ok} / {errors}");
    common::eventually(Duration::from_secs(5), "in-flight back to 0", || async {
        common::total_in_flight(&r.url()).await == 0
    })
    .await;
    let state = get(&format!("{}/debug/policy", r.url())).await.json();
    let samples: u64 =
        state["workers"].as_array().expect("workers").iter().map(|w| w["samples"][1].as_u64().unwrap_or(0)).sum();
    assert_eq!(samples, ok, "only successful requests are learnt from: {state}");
}

/// Best effort tells a small request from a large one by the means of the requests' sizes, each
/// request counted once: a retry after a failed attempt (or a re-choice after a breaker's
/// refusal) is the same request asked about again, not another one. Every worker here fails
/// every request, so each request is asked about once per attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_counts_once_in_the_size_means() {
    let workers = sim_workers(3).await;
    for w in &workers {
        w.set_faults(Faults { error_rate: 1.0, error_status: 503, ..Faults::default() }).expect("faults");
    }
    let r = router(mu(MarginalUtilityConfig::default(), workers.iter().map(|w| w.url()).collect())).await;
    let url = format!("{}/v1/completions", r.url());
    let sized = |i: usize, cap: u32| json!({"model": "m", "prompt": format!("question {i} {}", "words ".repeat(100)), "max_tokens": cap});
    for (i, cap) in [(0, 16), (1, 1000)] {
        let answer = post(&url, &sized(i, cap)).await;
        assert!(
            answer.status.is_server_error(),
            "every worker fails: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
    }
    let state = get(&format!("{}/debug/policy", r.url())).await.json();
    let decisions = state["decisions"].as_u64().expect("decisions");
    assert!(decisions > 2, "the failed attempts were retried elsewhere: {state}");
    // Once each: 16, then 1000 (capped at 10x the mean, 160) at weight 0.01: 16 + 0.01 x 144.
    // Counted once per attempt, the 16s would be a wash but the 160s would pull it past 18.8.
    let mean_cap = state["request_sizes"]["mean_max_tokens"].as_f64().expect("mean");
    assert!((mean_cap - 17.44).abs() < 1e-9, "mean output cap {mean_cap} after {decisions} asks: {state}");
}
