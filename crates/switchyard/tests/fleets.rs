//! Fleets as they are deployed: several models behind one router (a pool and policy state per
//! model), data-parallel engines as one target per rank (`--dp-aware`), and workers that are
//! still starting when the router does.

mod common;

use std::time::Duration;

use common::{config, eventually, get, post, send};
use serde_json::{json, Value};
use switchyard::config::{PdConfig, PdStyle, RouterConfig};
use switchyard::policies::PolicyKind;
use switchyard::server;
use switchyard_sim::server::{spawn_worker, Faults, Role, WorkerConfig, WorkerHandle};

async fn sim(model: &str, role: Role, dp_size: u32) -> WorkerHandle {
    spawn_worker(WorkerConfig {
        time_scale: 100.0,
        model_name: model.into(),
        role,
        dp_size,
        pd_timeout_secs: 2.0,
        ..WorkerConfig::default()
    })
    .await
    .unwrap()
}

fn requests(w: &WorkerHandle) -> u64 {
    w.rank_requests().iter().sum()
}

fn chat(model: Option<&str>, text: &str) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": text}], "max_tokens": 4, "ignore_eos": true});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    body
}

#[tokio::test]
async fn two_models_on_disjoint_workers_each_get_their_own_pool() {
    let alpha = [sim("alpha", Role::Plain, 1).await, sim("alpha", Role::Plain, 1).await];
    let beta = sim("beta", Role::Plain, 1).await;
    let urls = vec![alpha[0].url(), alpha[1].url(), beta.url()];
    let router = server::start(config(urls, PolicyKind::CacheAware)).await.unwrap();
    let base = router.url();

    let models = get(&format!("{base}/v1/models")).await.json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["alpha", "beta"]);

    for i in 0..6 {
        let r = post(&format!("{base}/v1/chat/completions"), &chat(Some("alpha"), &format!("alpha prompt {i}"))).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    for i in 0..3 {
        let r = post(&format!("{base}/v1/chat/completions"), &chat(Some("beta"), &format!("beta prompt {i}"))).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(requests(&alpha[0]) + requests(&alpha[1]), 6, "alpha requests reach alpha workers only");
    assert_eq!(requests(&beta), 3, "beta requests reach the beta worker only");

    // An unknown model: OpenAI's 404, naming what is available.
    let r = post(&format!("{base}/v1/chat/completions"), &chat(Some("gamma"), "x")).await;
    assert_eq!(r.status, 404);
    let e = r.json();
    assert_eq!(e["error"]["code"], "model_not_found", "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("gamma") && msg.contains("alpha") && msg.contains("beta"), "{msg}");
    // No model while several are served: 400 naming them.
    let r = post(&format!("{base}/v1/chat/completions"), &chat(None, "x")).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("alpha"));
    // SGLang's /generate carries its model too.
    let r = post(
        &format!("{base}/generate"),
        &json!({"text": "hi", "model": "beta", "sampling_params": {"max_new_tokens": 2}}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(requests(&beta), 4);

    // Each model's cache_aware tree holds its own workers only.
    let debug = get(&format!("{base}/debug/policy")).await.json();
    let tenants = |model: &str| -> Vec<String> {
        debug["models"][model]["workers"]
            .as_array()
            .unwrap_or_else(|| panic!("no {model} pool in {debug}"))
            .iter()
            .map(|w| w["url"].as_str().unwrap().to_owned())
            .collect()
    };
    let (a, b) = (tenants("alpha"), tenants("beta"));
    assert!(!a.is_empty() && a.iter().all(|u| *u == alpha[0].url() || *u == alpha[1].url()), "{a:?}");
    assert_eq!(b, [beta.url()]);
    router.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_model_takes_requests_without_a_model_and_any_name() {
    let w = sim("only", Role::Plain, 1).await;
    let router = server::start(config(vec![w.url()], PolicyKind::RoundRobin)).await.unwrap();
    for model in [None, Some("only"), Some("gpt-4o")] {
        let r = post(&format!("{}/v1/chat/completions", router.url()), &chat(model, "hi")).await;
        assert_eq!(r.status, 200, "model {model:?}: {:?}", r.body);
    }
    router.shutdown().await.unwrap();
}

#[tokio::test]
async fn pd_pools_are_per_model_too() {
    let (pa, da) = (sim("alpha", Role::Prefill, 1).await, sim("alpha", Role::Decode, 1).await);
    let (pb, db) = (sim("beta", Role::Prefill, 1).await, sim("beta", Role::Decode, 1).await);
    let mut cfg = config(vec![], PolicyKind::CacheAware);
    cfg.pd = Some(PdConfig {
        style: PdStyle::Sglang,
        prefill: vec![(pa.url(), pa.bootstrap_port()), (pb.url(), pb.bootstrap_port())],
        decode: vec![da.url(), db.url()],
        prefill_policy: None,
        decode_policy: None,
        prefill_timeout: Duration::from_secs(5),
    });
    let router = server::start(cfg).await.unwrap();
    for (model, n) in [("beta", 3), ("alpha", 2)] {
        for i in 0..n {
            let r = post(&format!("{}/v1/chat/completions", router.url()), &chat(Some(model), &format!("{model} {i}")))
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
    }
    assert_eq!([requests(&pb), requests(&db)], [3, 3], "beta's legs on beta's workers");
    assert_eq!([requests(&pa), requests(&da)], [2, 2], "alpha's legs on alpha's workers");
    router.shutdown().await.unwrap();
}

fn dp_config(urls: Vec<String>) -> RouterConfig {
    let mut cfg = config(urls, PolicyKind::RoundRobin);
    cfg.dp_aware = true;
    cfg
}

#[tokio::test]
async fn each_data_parallel_rank_is_a_target_and_the_rank_reaches_the_engine() {
    let w = sim("m", Role::Plain, 4).await;
    let router = server::start(dp_config(vec![w.url()])).await.unwrap();
    let listed = get(&format!("{}/workers", router.url())).await.json();
    let ranks: Vec<u64> =
        listed["workers"].as_array().unwrap().iter().map(|w| w["dp_rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, [0, 1, 2, 3], "{listed}");
    for i in 0..8 {
        let r = post(&format!("{}/v1/completions", router.url()), &json!({"prompt": format!("p{i}"), "max_tokens": 2}))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    // Round robin over the four targets: each rank got exactly its share, so the rank the
    // router chose is the one that ran (the simulator would spread unnamed requests evenly
    // too, but by its own counter: a mismatch would show in the per-target load below).
    assert_eq!(w.rank_requests(), [2, 2, 2, 2]);
    let listed = get(&format!("{}/workers", router.url())).await.json();
    for entry in listed["workers"].as_array().unwrap() {
        assert_eq!(entry["load"]["succeeded"], 2, "{entry}");
    }
    // Removing the URL removes every rank.
    let r = send("DELETE", &format!("{}/workers?url={}", router.url(), w.url()), &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(get(&format!("{}/workers", router.url())).await.json()["total"], 0);
    router.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_router_s_rank_overrides_the_client_s() {
    let w = sim("m", Role::Plain, 4).await;
    let router = server::start(dp_config(vec![w.url()])).await.unwrap();
    for i in 0..6 {
        let body = json!({"prompt": format!("p{i}"), "max_tokens": 2, "data_parallel_rank": 3});
        let r = post(&format!("{}/v1/completions", router.url()), &body).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    // Round robin's ranks 0, 1, 2, 3, 0, 1 — not the client's 3 six times.
    assert_eq!(w.rank_requests(), [2, 2, 1, 1]);
    router.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_engine_that_reports_only_data_parallel_size_gets_the_header_only() {
    use axum::routing::{get as route_get, post as route_post};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Option<String>, Value)>();
    let app = axum::Router::new()
        .route("/health", route_get(|| async { "ok" }))
        .route("/get_server_info", route_get(|| async { axum::Json(json!({"data_parallel_size": 2})) }))
        .route("/v1/models", route_get(|| async { axum::Json(json!({"data": [{"id": "v"}]})) }))
        .route(
            "/v1/completions",
            route_post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let tx = tx.clone();
                async move {
                    let rank = headers.get("x-data-parallel-rank").map(|v| v.to_str().unwrap().to_owned());
                    let _ = tx.send((rank, serde_json::from_slice(&body).unwrap()));
                    axum::Json(
                        json!({"choices": [{"text": "x"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let router = server::start(dp_config(vec![url])).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let r = post(&format!("{}/v1/completions", router.url()), &json!({"prompt": "p", "max_tokens": 1})).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let (rank, body) = rx.recv().await.unwrap();
        assert!(body.get("data_parallel_rank").is_none(), "{body}");
        seen.push(rank.expect("the rank header"));
    }
    seen.sort();
    assert_eq!(seen, ["0", "0", "1", "1"]);
    router.shutdown().await.unwrap();
}

/// Health checks so rare that only the starting-worker probe can bring a worker in.
fn rare_health(mut cfg: RouterConfig) -> RouterConfig {
    cfg.health.interval = Duration::from_secs(3600);
    cfg.health.success_threshold = 3;
    cfg
}

#[tokio::test]
async fn a_worker_still_loading_serves_from_its_first_successful_probe() {
    let w = sim("m", Role::Plain, 1).await;
    w.set_faults(Faults { health_fail: true, ..Faults::default() }).unwrap();
    let router = server::start(rare_health(config(vec![w.url()], PolicyKind::RoundRobin))).await.unwrap();
    let url = format!("{}/v1/completions", router.url());
    let r = post(&url, &json!({"prompt": "p", "max_tokens": 1})).await;
    assert_eq!(r.status, 503, "not ready yet: {:?}", r.body);
    // Registration's probe and the checker's first round have both failed...
    eventually(Duration::from_secs(20), "two failed probes", || async { w.health_probes() >= 2 }).await;
    w.set_faults(Faults::default()).unwrap();
    // The next regular round is an hour away and needs three successes: only the one-second
    // probe of never-ready workers can make it healthy within the limit.
    eventually(Duration::from_secs(20), "the loaded worker to serve", || async {
        post(&url, &json!({"prompt": "p", "max_tokens": 1})).await.status == 200
    })
    .await;
    // Its model was learnt then too.
    let models = get(&format!("{}/v1/models", router.url())).await.json();
    assert_eq!(models["data"][0]["id"], "m");
    router.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_data_parallel_engine_still_loading_becomes_its_ranks_when_ready() {
    let w = sim("m", Role::Plain, 2).await;
    w.set_faults(Faults { health_fail: true, ..Faults::default() }).unwrap();
    let router = server::start(rare_health(dp_config(vec![w.url()]))).await.unwrap();
    assert_eq!(get(&format!("{}/workers", router.url())).await.json()["total"], 1);
    eventually(Duration::from_secs(20), "two failed probes", || async { w.health_probes() >= 2 }).await;
    w.set_faults(Faults::default()).unwrap();
    let workers = format!("{}/workers", router.url());
    eventually(Duration::from_secs(20), "two healthy ranks", || async {
        let v = get(&workers).await.json();
        v["total"] == 2 && v["workers"].as_array().unwrap().iter().all(|w| w["healthy"] == true)
    })
    .await;
    for _ in 0..4 {
        let r = post(&format!("{}/v1/completions", router.url()), &json!({"prompt": "p", "max_tokens": 1})).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(w.rank_requests(), [2, 2]);
    router.shutdown().await.unwrap();
}
