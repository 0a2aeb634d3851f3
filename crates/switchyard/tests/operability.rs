//! Operability: metrics content after a known sequence of requests, bounded label
//! cardinality, the separate metrics listener, and static checks of the deploy files
//! (Grafana dashboard, Kubernetes manifests, Dockerfile) against the real router.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::policies::PolicyKind;

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

/// Value of the sample line `name{labels}` (labels exactly as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

#[tokio::test]
async fn metrics_after_a_known_sequence() {
    let w = mock_worker().await;
    let r = router(config(vec![w.url()], PolicyKind::RoundRobin)).await;
    let u = r.url();
    for _ in 0..3 {
        assert_eq!(post(&format!("{u}/v1/chat/completions"), &chat(json!({}))).await.status, 200);
    }
    let stream_body = chat(json!({"mode": "stream", "stream": true}));
    let streaming = {
        let url = format!("{u}/v1/chat/completions");
        tokio::spawn(async move { post(&url, &stream_body).await })
    };
    eventually(Duration::from_secs(5), "stream started", || async { total_in_flight(&u).await == 1 }).await;
    w.release(1);
    assert_eq!(streaming.await.unwrap().status, 200);
    assert_eq!(send("POST", &format!("{u}/generate"), &[], "{bad").await.status, 400);
    assert_eq!(
        post(&format!("{u}/generate"), &json!({"text": "x", "mode": "status", "status": 500})).await.status,
        500
    );

    let text = get(&format!("{u}/metrics")).await;
    assert_eq!(text.headers["content-type"], "text/plain; version=0.0.4");
    let text = String::from_utf8(text.body.to_vec()).unwrap();
    let wl = w.url();
    let chat200 = format!("switchyard_requests_total{{route=\"/v1/chat/completions\",status=\"200\",worker=\"{wl}\",policy=\"round_robin\"}}");
    assert_eq!(sample(&text, &chat200), Some(4.0), "{text}");
    let bad = "switchyard_requests_total{route=\"/generate\",status=\"400\",worker=\"none\",policy=\"round_robin\"}";
    assert_eq!(sample(&text, bad), Some(1.0));
    let failed = format!(
        "switchyard_requests_total{{route=\"/generate\",status=\"500\",worker=\"{wl}\",policy=\"round_robin\"}}"
    );
    assert_eq!(sample(&text, &failed), Some(1.0));
    assert_eq!(sample(&text, "switchyard_request_duration_seconds_count{route=\"/v1/chat/completions\"}"), Some(4.0));
    assert_eq!(sample(&text, &format!("switchyard_ttft_seconds_count{{worker=\"{wl}\"}}")), Some(1.0));
    assert_eq!(sample(&text, &format!("switchyard_worker_in_flight{{worker=\"{wl}\"}}")), Some(0.0));
    assert_eq!(
        sample(&text, &format!("switchyard_policy_decisions_total{{policy=\"round_robin\",worker=\"{wl}\"}}")),
        Some(5.0)
    );
    assert_eq!(sample(&text, &format!("switchyard_worker_healthy{{worker=\"{wl}\"}}")), Some(1.0));
    assert_eq!(sample(&text, &format!("switchyard_circuit_breaker_state{{worker=\"{wl}\"}}")), Some(0.0));
    assert!(sample(&text, "switchyard_process_resident_memory_bytes").unwrap() > 1e6);
    assert!(sample(&text, "switchyard_open_connections").unwrap() >= 1.0);
    // Every family is declared once.
    let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let distinct: HashSet<&&str> = types.iter().collect();
    assert_eq!(types.len(), distinct.len(), "a family declared twice");
}

#[tokio::test]
async fn label_cardinality_stays_bounded_under_10k_distinct_prompts() {
    let ws = [mock_worker().await, mock_worker().await];
    let mut cfg = config(ws.iter().map(|w| w.url()).collect(), PolicyKind::CacheAware);
    cfg.retry.max_attempts = 1;
    let r = router(cfg).await;
    let u = r.url();
    let series = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
    // Warm up until every worker has served (its series exist), then count.
    let mut warm = 0;
    while ws.iter().any(|w| w.received.load(std::sync::atomic::Ordering::SeqCst) == 0) {
        post(&format!("{u}/v1/completions"), &json!({"prompt": format!("{warm} warm-up")})).await;
        warm += 1;
        assert!(warm < 1000, "one worker never served");
    }
    let before = series(std::str::from_utf8(&get(&format!("{u}/metrics")).await.body).unwrap());
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let u = u.clone();
            tokio::spawn(async move {
                for i in 0..625 {
                    let a = send(
                        "POST",
                        &format!("{u}/v1/completions"),
                        &[("x-session-id", &format!("s{t}-{i}")), ("x-request-id", &format!("r{t}-{i}"))],
                        json!({"prompt": format!("distinct prompt {t} {i}"), "user": format!("user{i}")}).to_string(),
                    )
                    .await;
                    assert_eq!(a.status, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let text = String::from_utf8(get(&format!("{u}/metrics")).await.body.to_vec()).unwrap();
    assert_eq!(series(&text), before, "10^4 distinct prompts, sessions and request ids added series");
    let total: f64 = ws
        .iter()
        .map(|w| {
            let s = format!("switchyard_requests_total{{route=\"/v1/completions\",status=\"200\",worker=\"{}\",policy=\"cache_aware\"}}", w.url());
            sample(&text, &s).unwrap_or(0.0)
        })
        .sum();
    assert_eq!(total, 10_000.0 + f64::from(warm));
    assert!(text.contains("switchyard_cache_tree_size{keys=\"text\"}"));
    assert!(sample(&text, "switchyard_cache_match_ratio_count").unwrap() >= 10_000.0);
}

#[tokio::test]
async fn separate_prometheus_listener_serves_metrics() {
    let w = mock_worker().await;
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let mut cfg = config(vec![w.url()], PolicyKind::RoundRobin);
    cfg.prometheus_port = Some(port);
    let _r = router(cfg).await;
    let text = String::from_utf8(get(&format!("http://127.0.0.1:{port}/metrics")).await.body.to_vec()).unwrap();
    assert!(text.contains("# TYPE switchyard_requests_total counter"));
}

#[tokio::test]
async fn grafana_dashboard_queries_only_families_we_export() {
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_file("deploy/grafana/switchyard.json")).unwrap()).unwrap();
    let w = mock_worker().await;
    let r = router(config(vec![w.url()], PolicyKind::CacheAware)).await;
    post(&format!("{}/v1/completions", r.url()), &json!({"prompt": "x"})).await;
    let text = String::from_utf8(get(&format!("{}/metrics", r.url())).await.body.to_vec()).unwrap();
    let exported: HashSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("switchyard_"))
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for n in names {
                let family = n.trim_end_matches("_bucket").trim_end_matches("_count").trim_end_matches("_sum");
                assert!(exported.contains(family), "panel '{}' queries {n}, not exported", p["title"]);
            }
        }
    }
}

#[tokio::test]
async fn kubernetes_probes_and_dockerfile_match_real_routes() {
    let text = std::fs::read_to_string(repo_file("deploy/kubernetes/switchyard.yaml")).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::from_value::<Value>(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["Secret", "Deployment", "Service"]);
    let of = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap();
    let container = &of("Deployment")["spec"]["template"]["spec"]["containers"][0];
    // The public bind takes its admin key from the Secret (else admin changes are refused).
    let env = container["env"].as_array().unwrap();
    let admin = env.iter().find(|e| e["name"] == "SWITCHYARD_API_KEY").unwrap();
    assert_eq!(admin["valueFrom"]["secretKeyRef"]["name"], of("Secret")["metadata"]["name"]);
    let args: Vec<String> =
        container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
    // The manifest's arguments are accepted by the real parser.
    let mut argv = vec!["switchyard".to_owned()];
    argv.extend(args);
    assert!(matches!(switchyard::config::parse_args(argv), switchyard::config::ParseOutcome::Run(_)));
    // The probe paths answer on a running router: liveness 200, readiness 200 with a worker.
    let w = mock_worker().await;
    let r = router(config(vec![w.url()], PolicyKind::RoundRobin)).await;
    for (probe, status) in [("livenessProbe", 200), ("readinessProbe", 200)] {
        let path = container[probe]["httpGet"]["path"].as_str().unwrap();
        assert_eq!(get(&format!("{}{path}", r.url())).await.status, status, "{probe} {path}");
    }
    assert_eq!(of("Service")["spec"]["ports"][0]["port"], 30000);
    let dockerfile = std::fs::read_to_string(repo_file("Dockerfile")).unwrap();
    assert!(dockerfile.contains("EXPOSE 30000") && dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/switchyard\"]"));
    let prom: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo_file("deploy/prometheus/prometheus.yml")).unwrap()).unwrap();
    assert_eq!(prom["scrape_configs"][0]["metrics_path"], "/metrics");
}

use serde::Deserialize;
