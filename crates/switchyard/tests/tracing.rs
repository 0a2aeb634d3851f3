//! OpenTelemetry traces end to end: the router exports OTLP/HTTP to an in-process collector;
//! the span trees of a retried request and of a PD request are checked, with the client's
//! `traceparent` continued and each attempt's context propagated to the workers (the
//! simulator records the `traceparent` it receives).
//!
//! One test function: the exporter is a task on the test's runtime and the subscriber is
//! process-global.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;
use switchyard::config::{PdConfig, PdStyle, RetryConfig};
use switchyard::policies::PolicyKind;
use switchyard_sim::server::{spawn_worker, Faults, Role, WorkerConfig, WorkerHandle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

type Received = Arc<Mutex<Vec<Span>>>;

/// An OTLP/HTTP collector on loopback keeping every span it receives.
async fn collector() -> (String, Received) {
    let spans: Received = Arc::default();
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut kept = kept.lock().unwrap();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        kept.extend(scope.spans);
                    }
                }
                ([("content-type", "application/x-protobuf")], Bytes::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    let kv = span.attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The spans of trace `trace_id`, once the request span (the root, ended last) has arrived.
async fn trace(received: &Received, exporter: &Arc<switchyard::telemetry::Exporter>, trace_id: &str) -> Vec<Span> {
    let exporter = exporter.clone();
    tokio::task::spawn_blocking(move || exporter.flush()).await.unwrap();
    let mut spans = Vec::new();
    eventually(Duration::from_secs(10), "the trace's request span is exported", || {
        spans = received.lock().unwrap().iter().filter(|s| hex(&s.trace_id) == trace_id).cloned().collect();
        let done = spans.iter().any(|s| attr(s, "id").is_some() && s.name.starts_with("POST "));
        async move { done }
    })
    .await;
    spans
}

fn children<'a>(spans: &'a [Span], parent: &Span, name: &str) -> Vec<&'a Span> {
    let mut out: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id == parent.span_id && s.name == name).collect();
    out.sort_by_key(|s| s.start_time_unix_nano);
    out
}

/// The parent span id a worker saw in a `traceparent` of trace `trace_id`.
fn parents_seen(worker: &WorkerHandle, trace_id: &str) -> Vec<String> {
    worker
        .traceparents()
        .iter()
        .filter_map(|tp| {
            let parts: Vec<&str> = tp.split('-').collect();
            (parts.len() == 4 && parts[1] == trace_id).then(|| parts[2].to_owned())
        })
        .collect()
}

async fn sim(role: Role, seed: u64) -> WorkerHandle {
    spawn_worker(WorkerConfig { time_scale: 100.0, pd_timeout_secs: 0.5, role, seed, ..WorkerConfig::default() })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_and_pd_requests_export_their_span_trees() {
    let (endpoint, received) = collector().await;
    let (layer, exporter) = switchyard::telemetry::layer(&endpoint, "switchyard-test").unwrap();
    tracing_subscriber::registry().with(layer).init();
    let exporter = Arc::new(exporter);
    let retry = RetryConfig {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..RetryConfig::default()
    };

    // A retried request: one worker answers 503, the attempt is retried on the other.
    let (failing, healthy) = (sim(Role::Plain, 1).await, sim(Role::Plain, 2).await);
    failing.set_faults(Faults { error_rate: 1.0, error_status: 503, ..Faults::default() }).unwrap();
    let mut cfg = config(vec![failing.url(), healthy.url()], PolicyKind::RoundRobin);
    cfg.retry = retry.clone();
    let r = router(cfg).await;
    let client_span = "00f067aa0ba902b7";
    let mut retried = None;
    for i in 0..2 {
        let trace_id = format!("4bf92f3577b34da6a3ce929d0e0e47{i:02x}");
        let traceparent = format!("00-{trace_id}-{client_span}-01");
        let body = chat(json!({})).to_string();
        let headers = [("content-type", "application/json"), ("traceparent", traceparent.as_str())];
        let a = send("POST", &format!("{}/v1/chat/completions", r.url()), &headers, body).await;
        assert_eq!(a.status, 200);
        let spans = trace(&received, &exporter, &trace_id).await;
        let root = spans.iter().find(|s| s.name == "POST /v1/chat/completions").unwrap();
        assert_eq!(hex(&root.parent_span_id), client_span, "the client's trace is continued");
        assert_eq!(attr(root, "http.response.status_code").as_deref(), Some("200"));
        let attempts = children(&spans, root, "attempt");
        let selects = children(&spans, root, "select");
        assert_eq!(selects.len(), attempts.len(), "one selection per attempt");
        assert_eq!(attr(selects[0], "policy").as_deref(), Some("round_robin"));
        if attempts.len() == 2 {
            retried = Some((trace_id, spans.clone()));
        }
    }
    let (trace_id, spans) = retried.expect("round robin sent one request to the failing worker first");
    let root = spans.iter().find(|s| s.name == "POST /v1/chat/completions").unwrap();
    let attempts = children(&spans, root, "attempt");
    assert!(attr(attempts[0], "outcome").unwrap().starts_with("retrying elsewhere"), "{:?}", attempts[0]);
    assert_eq!(attr(attempts[0], "workers"), Some(failing.url()));
    assert_eq!(attr(attempts[1], "outcome").as_deref(), Some("answered"));
    assert_eq!(attr(attempts[1], "workers"), Some(healthy.url()));
    // Each worker saw the context of the attempt that went to it.
    assert!(parents_seen(&failing, &trace_id).contains(&hex(&attempts[0].span_id)));
    assert!(parents_seen(&healthy, &trace_id).contains(&hex(&attempts[1].span_id)));

    // A PD request: the prefill and decode legs are children of the attempt, and each worker
    // saw its leg's context.
    let (prefill, decode) = (sim(Role::Prefill, 3).await, sim(Role::Decode, 4).await);
    let mut cfg = config(vec![], PolicyKind::CacheAware);
    cfg.retry = retry;
    cfg.pd = Some(PdConfig {
        style: PdStyle::Sglang,
        prefill: vec![(prefill.url(), prefill.bootstrap_port())],
        decode: vec![decode.url()],
        prefill_policy: None,
        decode_policy: None,
        prefill_timeout: Duration::from_secs(2),
    });
    let r = router(cfg).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
    let body = json!({"text": "hello", "sampling_params": {"max_new_tokens": 4}, "stream": true}).to_string();
    let headers = [("content-type", "application/json"), ("traceparent", traceparent.as_str())];
    let a = send("POST", &format!("{}/generate", r.url()), &headers, body).await;
    assert_eq!(a.status, 200);
    let spans = trace(&received, &exporter, trace_id).await;
    let root = spans.iter().find(|s| s.name == "POST /generate").unwrap();
    let attempt = children(&spans, root, "attempt")[0];
    let select = children(&spans, root, "select")[0];
    assert_eq!(attr(select, "policy").as_deref(), Some("cache_aware"));
    assert_eq!(attr(select, "workers"), Some(format!("{} {}", prefill.url(), decode.url())));
    assert_eq!(attr(select, "reason").as_deref(), Some("cache_miss"), "cache_aware says why: {select:?}");
    assert_eq!(attr(select, "matched_prefix").as_deref(), Some("0"));
    let (p, d) = (children(&spans, attempt, "prefill"), children(&spans, attempt, "decode"));
    assert_eq!((p.len(), d.len()), (1, 1), "{spans:#?}");
    assert_eq!(attr(p[0], "worker"), Some(prefill.url()));
    assert!(parents_seen(&prefill, trace_id).contains(&hex(&p[0].span_id)));
    assert!(parents_seen(&decode, trace_id).contains(&hex(&d[0].span_id)));
    // The stream kept its attempt open: the attempt ends after the decode leg's head.
    assert!(attempt.end_time_unix_nano >= d[0].end_time_unix_nano);
}
