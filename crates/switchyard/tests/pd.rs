//! Prefill/decode disaggregation end to end with simulated prefill and decode workers:
//! every policy in both protocols, streaming and not, logprob merge, and failing legs
//! answered well inside the request timeout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchyard::config::{PdConfig, PdStyle, RetryConfig, RouterConfig};
use switchyard::policies::PolicyKind;
use switchyard_sim::model::Profile;
use switchyard_sim::server::{spawn_worker, Faults, Role, WorkerConfig, WorkerHandle};

struct Fleet {
    prefill: Vec<WorkerHandle>,
    decode: Vec<WorkerHandle>,
}

/// A fleet whose decode engines wait up to 5 s of wall time for their KV: far longer than a
/// healthy prefill leg takes even on a loaded CI machine, so only tests that make a prefill
/// leg fail on purpose ([`fleet_with_kv_wait`]) see decode legs give up.
async fn fleet(prefill: usize, decode: usize) -> Fleet {
    fleet_with_kv_wait(prefill, decode, 5.0).await
}

async fn fleet_with_kv_wait(prefill: usize, decode: usize, kv_wait_secs: f64) -> Fleet {
    fleet_with(
        prefill,
        decode,
        WorkerConfig { time_scale: 100.0, pd_timeout_secs: kv_wait_secs, ..WorkerConfig::default() },
    )
    .await
}

async fn fleet_with(prefill: usize, decode: usize, base: WorkerConfig) -> Fleet {
    let mut f = Fleet { prefill: Vec::new(), decode: Vec::new() };
    for i in 0..prefill {
        f.prefill
            .push(spawn_worker(WorkerConfig { role: Role::Prefill, seed: i as u64, ..base.clone() }).await.unwrap());
    }
    for i in 0..decode {
        f.decode.push(
            spawn_worker(WorkerConfig { role: Role::Decode, seed: 100 + i as u64, ..base.clone() }).await.unwrap(),
        );
    }
    f
}

fn pd_config(f: &Fleet, style: PdStyle, policy: PolicyKind) -> RouterConfig {
    let mut cfg = config(vec![], policy);
    cfg.request_timeout = Duration::from_secs(60);
    cfg.retry = RetryConfig {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..RetryConfig::default()
    };
    cfg.pd = Some(PdConfig {
        style,
        prefill: f.prefill.iter().map(|w| (w.url(), w.bootstrap_port())).collect(),
        decode: f.decode.iter().map(|w| w.url()).collect(),
        prefill_policy: None,
        decode_policy: None,
        prefill_timeout: Duration::from_secs(1),
    });
    cfg
}

fn load_of(workers: &Value, url: &str, field: &str) -> u64 {
    workers["workers"].as_array().unwrap().iter().find(|w| w["url"] == url).unwrap()["load"][field].as_u64().unwrap()
}

#[tokio::test]
async fn every_policy_serves_through_both_pd_protocols() {
    let f = fleet(2, 2).await;
    for style in [PdStyle::Sglang, PdStyle::Vllm] {
        for policy in <PolicyKind as clap::ValueEnum>::value_variants().iter().copied() {
            let r = router(pd_config(&f, style, policy)).await;
            let u = r.url();
            let chat_body =
                json!({"messages": [{"role": "user", "content": "tell me"}], "max_tokens": 6, "ignore_eos": true});
            let a = post(&format!("{u}/v1/chat/completions"), &chat_body).await;
            assert_eq!(a.status, 200, "{style:?} {policy:?}: {:?}", a.body);
            assert_eq!(a.json()["usage"]["completion_tokens"], 6);
            let mut streamed = chat_body.clone();
            streamed["stream"] = json!(true);
            let s = post(&format!("{u}/v1/chat/completions"), &streamed).await;
            let text = String::from_utf8_lossy(&s.body).to_string();
            assert!(
                text.ends_with("data: [DONE]\n\n") && text.matches("\"content\":\"").count() == 7,
                "{style:?} {policy:?}: {text}"
            );
            let g = post(
                &format!("{u}/generate"),
                &json!({"text": "abc def ghi", "sampling_params": {"max_new_tokens": 3, "ignore_eos": true}}),
            )
            .await;
            assert_eq!(g.json()["meta_info"]["completion_tokens"], 3, "{style:?} {policy:?}");
            eventually(Duration::from_secs(5), "both pools idle", || async { total_in_flight(&u).await == 0 }).await;
            let workers = get(&format!("{u}/workers")).await.json();
            let prefill: u64 = f.prefill.iter().map(|w| load_of(&workers, &w.url(), "dispatched")).sum();
            let decode: u64 = f.decode.iter().map(|w| load_of(&workers, &w.url(), "dispatched")).sum();
            assert_eq!((prefill, decode), (3, 3), "{style:?} {policy:?}: one leg each per request");
        }
    }
}

#[tokio::test]
async fn sglang_style_merges_prompt_logprobs_from_the_prefill_leg() {
    let f = fleet(1, 1).await;
    let r = router(pd_config(&f, PdStyle::Sglang, PolicyKind::RoundRobin)).await;
    let a = post(
        &format!("{}/generate", r.url()),
        &json!({"text": "one two three four", "sampling_params": {"max_new_tokens": 2}, "return_logprob": true}),
    )
    .await;
    let v = a.json();
    let prompt_tokens = v["meta_info"]["prompt_tokens"].as_u64().unwrap() as usize;
    let logprobs = v["meta_info"]["input_token_logprobs"].as_array().expect("merged from the prefill leg");
    assert_eq!(logprobs.len(), prompt_tokens);
    // Streamed: the first event carries them.
    let s = post(&format!("{}/generate", r.url()), &json!({"text": "one two three four", "sampling_params": {"max_new_tokens": 3}, "return_logprob": true, "stream": true})).await;
    let text = String::from_utf8_lossy(&s.body).to_string();
    let first: Value = serde_json::from_str(text.split("\n\n").next().unwrap().trim_start_matches("data: ")).unwrap();
    assert_eq!(first["meta_info"]["input_token_logprobs"].as_array().map(Vec::len), Some(prompt_tokens), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    // The decode worker alone has none to give.
    let direct = post(
        &format!("{}/generate", f.decode[0].url()),
        &json!({"text": "x", "return_logprob": true, "kv_transfer_params": {"do_remote_prefill": true}}),
    )
    .await;
    assert!(direct.json()["meta_info"]["input_token_logprobs"].is_null());
}

#[tokio::test]
async fn failing_prefill_legs_are_retried_on_another_pair_quickly() {
    for style in [PdStyle::Sglang, PdStyle::Vllm] {
        let f = fleet_with_kv_wait(2, 2, 0.5).await;
        let r = router(pd_config(&f, style, PolicyKind::RoundRobin)).await;
        let u = r.url();
        let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "ignore_eos": true});
        for (label, fault) in [
            ("errors", Faults { error_rate: 1.0, error_status: 500, ..Faults::default() }),
            ("dead", Faults { refuse_connections: true, ..Faults::default() }),
            ("hung", Faults { hang: true, ..Faults::default() }),
        ] {
            f.prefill[0].set_faults(fault).unwrap();
            for i in 0..4 {
                let started = Instant::now();
                let a = post(&format!("{u}/v1/chat/completions"), &body).await;
                assert_eq!(a.status, 200, "{style:?} prefill {label} request {i}: {:?}", a.body);
                assert!(started.elapsed() < Duration::from_secs(5), "{style:?} {label}: took {:?}", started.elapsed());
            }
            f.prefill[0].set_faults(Faults::default()).unwrap();
        }
        // Every prefill worker broken: a clear error, far below the 60 s request timeout.
        for w in &f.prefill {
            w.set_faults(Faults { refuse_connections: true, ..Faults::default() }).unwrap();
        }
        let started = Instant::now();
        let a = post(&format!("{u}/v1/chat/completions"), &body).await;
        assert!(a.status == 502 || a.status == 503, "{style:?}: {}", a.status);
        assert!(a.json()["error"]["message"].is_string());
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        eventually(Duration::from_secs(5), "in-flight 0 on both pools", || async { total_in_flight(&u).await == 0 })
            .await;
    }
}

/// A prefill worker that is behind is not hung: its legs wait their turn rather than being
/// retried once `--pd-prefill-timeout-secs` has passed. The one prefill worker runs one
/// request at a time, 0.3 s a step, and ten requests arrive together, so the last waits 3 s or
/// more — past the 1-s window — while the worker keeps finishing the ones ahead of it. A flat
/// timeout gave up on every leg queued past the window (each then queued again, or failed with
/// no other prefill worker to try); now each request is prefilled once and nothing fails.
#[tokio::test]
async fn a_prefill_leg_queued_behind_others_is_waited_for_not_retried() {
    for style in [PdStyle::Sglang, PdStyle::Vllm] {
        let real_time = WorkerConfig { time_scale: 1.0, pd_timeout_secs: 60.0, ..WorkerConfig::default() };
        let one_at_a_time = Profile { c0: 0.3, max_running_requests: 1, noise_sigma: 0.0, ..Profile::h100_llama8b() };
        let prefill = WorkerConfig { role: Role::Prefill, profile: one_at_a_time, ..real_time.clone() };
        let f = Fleet {
            prefill: vec![spawn_worker(prefill).await.unwrap()],
            decode: vec![spawn_worker(WorkerConfig { role: Role::Decode, seed: 100, ..real_time }).await.unwrap()],
        };
        let r = router(pd_config(&f, style, PolicyKind::RoundRobin)).await;
        let u = r.url();
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..10 {
            let (url, body) = (
                format!("{u}/v1/chat/completions"),
                json!({"messages": [{"role": "user", "content": format!("q{i}")}], "max_tokens": 2, "ignore_eos": true}),
            );
            sends.spawn(async move { post(&url, &body).await });
        }
        let started = Instant::now();
        while let Some(answer) = sends.join_next().await {
            let a = answer.unwrap();
            assert_eq!(a.status, 200, "{style:?}: {:?}", a.body);
        }
        assert!(
            started.elapsed() > Duration::from_secs(2),
            "{style:?}: the prefill queue was not deep enough to test this"
        );
        eventually(Duration::from_secs(5), "both pools idle", || async { total_in_flight(&u).await == 0 }).await;
        let workers = get(&format!("{u}/workers")).await.json();
        let p = f.prefill[0].url();
        assert_eq!(
            (load_of(&workers, &p, "dispatched"), load_of(&workers, &p, "failed")),
            (10, 0),
            "{style:?}: each prefill leg sent once, none given up on"
        );
    }
}

#[tokio::test]
async fn a_decode_worker_dying_mid_stream_ends_the_stream_with_an_error() {
    // Real-time decode steps (tens of ms a token): at 100x the worker's first tokens and its
    // death could leave in one write, the router would see the connection fail before any
    // byte of the stream and rightly retry (here: no pair left, a 503) instead of the
    // mid-stream case this test is about.
    let f = fleet_with(1, 1, WorkerConfig { time_scale: 1.0, pd_timeout_secs: 5.0, ..WorkerConfig::default() }).await;
    let r = router(pd_config(&f, PdStyle::Sglang, PolicyKind::LoadBased)).await;
    f.decode[0].set_faults(Faults { die_after_tokens: Some(3), ..Faults::default() }).unwrap();
    let started = Instant::now();
    let body =
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "ignore_eos": true, "stream": true});
    let a = post(&format!("{}/v1/chat/completions", r.url()), &body).await;
    let text = String::from_utf8_lossy(&a.body).to_string();
    assert!(text.contains("ended the stream early"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
    eventually(Duration::from_secs(5), "in-flight 0", || async { total_in_flight(&r.url()).await == 0 }).await;
    // A dead decode pool gives a clear error quickly.
    f.decode[0].set_faults(Faults { refuse_connections: true, ..Faults::default() }).unwrap();
    let started = Instant::now();
    let a = post(&format!("{}/v1/chat/completions", r.url()), &json!({"messages": [{"role": "user", "content": "x"}]}))
        .await;
    assert!(a.status.is_server_error() && started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn prefill_and_decode_workers_can_be_added_at_run_time() {
    let f = fleet(1, 1).await;
    let mut cfg = pd_config(&f, PdStyle::Sglang, PolicyKind::RoundRobin);
    if let Some(pd) = cfg.pd.as_mut() {
        pd.prefill.clear();
        pd.decode.clear();
    }
    let r = router(cfg).await;
    let u = r.url();
    assert_eq!(post(&format!("{u}/generate"), &json!({"text": "x"})).await.status, 503);
    let p = &f.prefill[0];
    let added = post(
        &format!("{u}/workers"),
        &json!({"url": p.url(), "role": "prefill", "bootstrap_port": p.bootstrap_port()}),
    )
    .await;
    assert_eq!(added.status, 200, "{:?}", added.body);
    assert_eq!(
        post(&format!("{u}/workers"), &json!({"url": f.decode[0].url()})).await.status,
        400,
        "PD mode needs a role"
    );
    assert_eq!(post(&format!("{u}/workers"), &json!({"url": f.decode[0].url(), "role": "decode"})).await.status, 200);
    let workers = get(&format!("{u}/workers")).await.json();
    let roles: Vec<&str> =
        workers["workers"].as_array().unwrap().iter().map(|w| w["role"]["type"].as_str().unwrap()).collect();
    assert_eq!(roles, vec!["prefill", "decode"]);
    assert_eq!(
        post(&format!("{u}/generate"), &json!({"text": "x", "sampling_params": {"max_new_tokens": 2}})).await.status,
        200
    );
}
