//! The routing audit end to end: cache_aware's predictions against the cached tokens the
//! simulated workers report, in `/debug/routing` and `/metrics`, including the miss the guess
//! makes when a worker evicts what the router's tree still holds.

mod common;

use common::*;
use serde_json::{json, Value};
use switchyard::policies::PolicyKind;
use switchyard_sim::server::{spawn_worker, WorkerConfig};

fn ask(prefix: &str, suffix: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": format!("{prefix}{suffix}")}], "max_tokens": 2})
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(name)).map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn predictions_are_checked_against_what_workers_report() {
    let mut ws = Vec::new();
    for seed in 0..2 {
        ws.push(spawn_worker(WorkerConfig { time_scale: 100.0, seed, ..WorkerConfig::default() }).await.unwrap());
    }
    let r = router(config(ws.iter().map(|w| w.url()).collect(), PolicyKind::CacheAware)).await;
    let url = r.url();
    let prefix = "You are a careful assistant. ".repeat(80); // ~2,300 characters shared
    for suffix in ["first question", "second question"] {
        assert_eq!(post(&format!("{url}/v1/chat/completions"), &ask(&prefix, suffix)).await.status, 200);
    }
    let audit = get(&format!("{url}/debug/routing")).await.json();
    let recent = audit["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 2, "{audit}");
    // The first saw an empty tree and an empty cache; the second was predicted to hit, and did.
    assert_eq!((recent[0]["predicted_cached"].as_u64(), recent[0]["reported_cached"].as_u64()), (Some(0), Some(0)));
    let (predicted, reported) =
        (recent[1]["predicted_cached"].as_u64().unwrap(), recent[1]["reported_cached"].as_u64().unwrap());
    let prompt = recent[1]["prompt_tokens"].as_u64().unwrap();
    assert!(2 * predicted >= prompt && 2 * reported >= prompt, "{audit}");
    // The tree counts characters, the engine whole 16-token pages: close, not equal.
    assert!(predicted.abs_diff(reported) <= 32, "{audit}");
    assert_eq!(recent[1]["best_other_predicted"], 0);
    assert_eq!(recent[1]["worker"], recent[0]["worker"]);
    assert_eq!(recent[1]["policy"], "cache_aware");

    // The holder evicts everything; the router's tree still says it holds the prefix.
    let holder = recent[1]["worker"].as_str().unwrap().to_owned();
    assert_eq!(send("POST", &format!("{holder}/flush_cache"), &[], "").await.status, 200);
    assert_eq!(post(&format!("{url}/v1/chat/completions"), &ask(&prefix, "third question")).await.status, 200);
    let audit = get(&format!("{url}/debug/routing")).await.json();
    let last = audit["recent"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["worker"], holder.as_str());
    assert_eq!(last["reported_cached"], 0, "{last}");
    assert_eq!(last["predicted_hit_got_miss"], true, "{last}");
    assert!(last["error"].as_i64().unwrap() < -(prompt as i64) / 2);
    assert_eq!(audit["predicted_hit_got_miss"], 1);

    let metrics = String::from_utf8_lossy(&get(&format!("{url}/metrics")).await.body).into_owned();
    assert_eq!(metric(&metrics, "switchyard_routing_audited_total "), 3);
    assert_eq!(metric(&metrics, "switchyard_routing_predicted_hit_got_miss_total "), 1);
    assert_eq!(metric(&metrics, "switchyard_routing_prediction_error_tokens_count "), 3);
    // round_robin makes no prediction: nothing audited.
    let rr = router(config(ws.iter().map(|w| w.url()).collect(), PolicyKind::RoundRobin)).await;
    assert_eq!(post(&format!("{}/v1/chat/completions", rr.url()), &ask(&prefix, "x")).await.status, 200);
    assert_eq!(get(&format!("{}/debug/routing", rr.url())).await.json()["audited"], 0);
}
