//! Kubernetes service discovery against an in-process API server that speaks the real
//! list/watch protocol: `PodList` with a `resourceVersion`, newline-delimited watch events
//! (ADDED, MODIFIED, DELETED, BOOKMARK), `410 Gone` for a compacted version, and watch
//! connections the test can cut. The router reaches it through an ordinary kubeconfig, with
//! kube-rs's own client and watcher; workers are simulators on distinct loopback addresses
//! (127.0.0.2, 127.0.0.3, ...) sharing one port, as pods share a container port.

#![cfg(feature = "kubernetes")]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use common::{eventually, post, send};
use serde_json::{json, Value};
use switchyard::config::{DiscoveryConfig, PdConfig, PdStyle, RouterConfig};
use switchyard::policies::PolicyKind;
use switchyard::server::{self, RunningRouter};
use switchyard_sim::server::{spawn_worker, Role, WorkerConfig, WorkerHandle};
use tokio::sync::{broadcast, mpsc, watch};

/// One recorded change: its resourceVersion, the event type, the pod after it.
type Change = (u64, &'static str, Value);

/// The fake API server's state.
#[derive(Default)]
struct Store {
    rv: u64,
    /// By `namespace/name`.
    pods: BTreeMap<String, Value>,
    log: Vec<Change>,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
}

struct Cluster {
    store: Mutex<Store>,
    events: broadcast::Sender<Change>,
    /// Bumped to cut every open watch connection.
    cut: watch::Sender<u64>,
    lists: AtomicUsize,
    watches: AtomicUsize,
}

impl Cluster {
    async fn start() -> (Arc<Self>, String) {
        let cluster = Arc::new(Self {
            store: Mutex::default(),
            events: broadcast::channel(1024).0,
            cut: watch::channel(0).0,
            lists: AtomicUsize::new(0),
            watches: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/api/v1/pods", get(all_pods))
            .route("/api/v1/namespaces/{ns}/pods", get(namespaced_pods))
            .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, Json(status(404, "NotFound", "no such path"))) })
            .with_state(cluster.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (cluster, url)
    }

    fn record(&self, store: &mut Store, kind: &'static str, mut pod: Value) {
        store.rv += 1;
        pod["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        let key = key_of(&pod);
        if kind == "DELETED" {
            store.pods.remove(&key);
        } else {
            store.pods.insert(key, pod.clone());
        }
        let change = (store.rv, kind, pod);
        store.log.push(change.clone());
        let _ = self.events.send(change);
    }

    /// Creates or replaces a pod (ADDED or MODIFIED).
    fn apply(&self, pod: Value) {
        let mut store = self.store.lock().unwrap();
        let kind = if store.pods.contains_key(&key_of(&pod)) { "MODIFIED" } else { "ADDED" };
        self.record(&mut store, kind, pod);
    }

    fn delete(&self, name: &str) {
        let mut store = self.store.lock().unwrap();
        let pod = store.pods.get(&format!("default/{name}")).cloned().expect("no such pod");
        self.record(&mut store, "DELETED", pod);
    }

    /// Deletes a pod while no watch can see it: the history is compacted past the deletion
    /// and every watch is cut, so watchers resume from a version that is gone (410) and must
    /// list again to notice.
    fn delete_unseen(&self, name: &str) {
        {
            let mut store = self.store.lock().unwrap();
            store.pods.remove(&format!("default/{name}"));
            store.rv += 1;
            store.compacted = store.rv + 1;
            store.log.clear();
        }
        self.cut_watches();
    }

    fn cut_watches(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

fn key_of(pod: &Value) -> String {
    format!("{}/{}", pod["metadata"]["namespace"].as_str().unwrap(), pod["metadata"]["name"].as_str().unwrap())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn matches(pod: &Value, namespace: Option<&str>, selector: &[(String, String)]) -> bool {
    let meta = &pod["metadata"];
    namespace.is_none_or(|ns| meta["namespace"] == ns)
        && selector.iter().all(|(k, v)| meta["labels"][k].as_str() == Some(v.as_str()))
}

async fn all_pods(State(c): State<Arc<Cluster>>, Query(q): Query<HashMap<String, String>>) -> Response {
    pods(c, None, q)
}

async fn namespaced_pods(
    State(c): State<Arc<Cluster>>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    pods(c, Some(ns), q)
}

/// `GET .../pods`: a list, or with `watch=true` a stream of events from `resourceVersion`.
fn pods(c: Arc<Cluster>, ns: Option<String>, q: HashMap<String, String>) -> Response {
    let selector: Vec<(String, String)> = q
        .get("labelSelector")
        .map(|s| {
            s.split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').expect("equality selectors only");
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let store = c.store.lock().unwrap();
    if q.get("watch").map(String::as_str) != Some("true") {
        c.lists.fetch_add(1, Ordering::SeqCst);
        let items: Vec<Value> = store.pods.values().filter(|p| matches(p, ns.as_deref(), &selector)).cloned().collect();
        return Json(json!({"apiVersion": "v1", "kind": "PodList",
                            "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}))
        .into_response();
    }
    c.watches.fetch_add(1, Ordering::SeqCst);
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let line = |v: Value| Ok(Bytes::from(format!("{v}\n")));
    if from < store.compacted {
        // What a real API server does: a 200 stream whose one event is the 410 Status.
        let gone = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
        let _ = tx.try_send(line(gone));
        return stream_response(rx);
    }
    let backlog: Vec<Change> = store.log.iter().filter(|(rv, _, _)| *rv > from).cloned().collect();
    let mut live = c.events.subscribe();
    let current = store.rv;
    let mut cut = c.cut.subscribe();
    drop(store);
    let (ns, selector) = (ns.clone(), selector.clone());
    tokio::spawn(async move {
        let wanted = |pod: &Value| matches(pod, ns.as_deref(), &selector);
        for (_, kind, pod) in backlog.into_iter().filter(|(_, _, p)| wanted(p)) {
            if tx.send(line(json!({"type": kind, "object": pod}))).await.is_err() {
                return;
            }
        }
        let bookmark = json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                               "metadata": {"resourceVersion": current.to_string()}}});
        let _ = tx.send(line(bookmark)).await;
        loop {
            tokio::select! {
                change = live.recv() => match change {
                    Ok((rv, kind, pod)) if rv > current && wanted(&pod) => {
                        if tx.send(line(json!({"type": kind, "object": pod}))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = cut.changed() => {
                    // Cut mid-stream: the body breaks, as a dropped connection does.
                    let _ = tx.send(Err(std::io::Error::other("connection cut"))).await;
                    return;
                }
            }
        }
    });
    stream_response(rx)
}

fn stream_response(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response {
    Response::builder().header("content-type", "application/json").body(Body::new(common::futures_stream(rx))).unwrap()
}

/// A pod as the API returns it.
fn pod(name: &str, ip: &str, ready: bool, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "engine", "image": "sim"}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    })
}

fn kubeconfig(server: &str, name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("switchyard-kubeconfig-{name}-{}", std::process::id()));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
         current-context: fake\nusers:\n- name: fake\n  user:\n    token: test-token\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Simulated workers on 127.0.0.2, 127.0.0.3, ... all on one port (as pods share a container
/// port); the port is retried until every address has it free.
async fn pod_workers(n: usize, role: impl Fn(usize) -> WorkerConfig) -> (Vec<WorkerHandle>, u16) {
    'port: for _ in 0..20 {
        let first = spawn_worker(WorkerConfig { host: "127.0.0.2".into(), port: 0, ..role(0) }).await.unwrap();
        let port = first.addr().port();
        let mut workers = vec![first];
        for i in 1..n {
            let host = format!("127.0.0.{}", i + 2);
            match spawn_worker(WorkerConfig { host, port, ..role(i) }).await {
                Ok(w) => workers.push(w),
                Err(_) => continue 'port,
            }
        }
        return (workers, port);
    }
    panic!("no port free on every loopback address");
}

fn sim_config(_: usize) -> WorkerConfig {
    WorkerConfig { time_scale: 100.0, ..WorkerConfig::default() }
}

fn discovery(server: &str, name: &str, port: u16) -> DiscoveryConfig {
    DiscoveryConfig {
        namespace: Some("default".into()),
        selector: vec![("app".into(), "engine".into())],
        port,
        scheme: "http".into(),
        bootstrap_port_annotation: "sglang.ai/bootstrap-port".into(),
        model_label: "switchyard.dev/model".into(),
        kv_events_annotation: "switchyard.dev/kv-events".into(),
        kubeconfig: Some(kubeconfig(server, name)),
        ..DiscoveryConfig::default()
    }
}

async fn workers_of(router: &RunningRouter) -> Vec<String> {
    let v = common::get(&format!("{}/workers", router.url())).await.json();
    let mut urls: Vec<String> =
        v["workers"].as_array().unwrap().iter().map(|w| w["url"].as_str().unwrap().to_owned()).collect();
    urls.sort();
    urls
}

async fn expect_workers(router: &RunningRouter, hosts: &[&str], port: u16, what: &str) {
    let mut want: Vec<String> = hosts.iter().map(|h| format!("http://{h}:{port}")).collect();
    want.sort();
    let mut last = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        last = workers_of(router).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: workers {last:?}, expected {want:?}");
}

const ENGINE: &[(&str, &str)] = &[("app", "engine")];

#[tokio::test]
async fn pods_come_and_go_through_list_watch_cuts_and_410() {
    let (cluster, api) = Cluster::start().await;
    let (sims, port) = pod_workers(4, sim_config).await;
    cluster.apply(pod("a", "127.0.0.2", true, ENGINE, &[]));
    cluster.apply(pod("b", "127.0.0.3", false, ENGINE, &[]));
    cluster.apply(pod("other", "127.0.0.4", true, &[("app", "something-else")], &[]));
    let mut cfg = common::config(vec![], PolicyKind::RoundRobin);
    cfg.discovery = Some(discovery(&api, "regular", port));
    let router = server::start(cfg).await.unwrap();

    expect_workers(&router, &["127.0.0.2"], port, "the ready pod only (b not ready, other not selected)").await;
    let r = post(&format!("{}/v1/completions", router.url()), &json!({"prompt": "p", "max_tokens": 2})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    cluster.apply(pod("b", "127.0.0.3", true, ENGINE, &[]));
    expect_workers(&router, &["127.0.0.2", "127.0.0.3"], port, "b became ready").await;
    cluster.apply(pod("b", "127.0.0.3", false, ENGINE, &[]));
    expect_workers(&router, &["127.0.0.2"], port, "b flapped to not ready").await;
    cluster.apply(pod("b", "127.0.0.3", true, ENGINE, &[]));
    expect_workers(&router, &["127.0.0.2", "127.0.0.3"], port, "b ready again").await;

    // A terminating pod leaves at once; a deleted one too.
    let mut terminating = pod("a", "127.0.0.2", true, ENGINE, &[]);
    terminating["metadata"]["deletionTimestamp"] = json!("2026-12-02T00:00:00Z");
    cluster.apply(terminating);
    expect_workers(&router, &["127.0.0.3"], port, "a terminating").await;
    cluster.delete("a");

    // b's IP changes (a pod replaced under the same name): the old worker leaves.
    cluster.apply(pod("b", "127.0.0.5", true, ENGINE, &[]));
    expect_workers(&router, &["127.0.0.5"], port, "b moved").await;

    // The watch connection is cut mid-stream; a pod added meanwhile still arrives.
    let watches = cluster.watches.load(Ordering::SeqCst);
    cluster.cut_watches();
    cluster.apply(pod("c", "127.0.0.2", true, ENGINE, &[]));
    expect_workers(&router, &["127.0.0.2", "127.0.0.5"], port, "c after a cut watch").await;
    assert!(cluster.watches.load(Ordering::SeqCst) > watches, "the watcher re-watched");

    // A deletion no watch saw: the next watch gets 410 Gone, the watcher lists again, and the
    // new list is reconciled (c is gone).
    let lists = cluster.lists.load(Ordering::SeqCst);
    cluster.delete_unseen("c");
    expect_workers(&router, &["127.0.0.5"], port, "c deleted while unwatched").await;
    assert!(cluster.lists.load(Ordering::SeqCst) > lists, "410 made the watcher list again");
    drop(sims);
    router.shutdown().await.unwrap();
}

#[tokio::test]
async fn workers_added_by_hand_are_never_removed_by_discovery_and_requests_in_flight_finish() {
    let (cluster, api) = Cluster::start().await;
    // Slow enough that a request is still running when its pod goes.
    let (sims, port) = pod_workers(3, |_| WorkerConfig { time_scale: 1.0, ..WorkerConfig::default() }).await;
    cluster.apply(pod("a", "127.0.0.2", true, ENGINE, &[]));
    let mut cfg = common::config(vec![], PolicyKind::RoundRobin);
    cfg.discovery = Some(discovery(&api, "manual", port));
    let router = server::start(cfg).await.unwrap();
    expect_workers(&router, &["127.0.0.2"], port, "a").await;

    // A long request to pod a; a is deleted while it runs; the request still completes.
    let url = format!("{}/generate", router.url());
    let body = json!({"text": "long", "sampling_params": {"max_new_tokens": 256, "ignore_eos": true}});
    let running = tokio::spawn(async move { post(&url, &body).await });
    eventually(Duration::from_secs(20), "the request to run on a", || async { sims[0].stats().running > 0 }).await;
    cluster.delete("a");
    expect_workers(&router, &[], port, "a deleted").await;
    assert!(sims[0].stats().running > 0, "the request outlived its worker's registration");
    let answer = running.await.unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.json()["meta_info"]["completion_tokens"], 256);

    // A worker added by hand at 127.0.0.3; then a pod at the same address comes and goes.
    router.state().register_worker(sims[1].url(), switchyard::workers::WorkerRole::Regular).await.unwrap();
    cluster.apply(pod("shadow", "127.0.0.3", true, ENGINE, &[]));
    cluster.delete("shadow");
    // One watch handles events in order: once the next pod is in, the shadow's were handled.
    cluster.apply(pod("marker", "127.0.0.4", true, ENGINE, &[]));
    expect_workers(&router, &["127.0.0.3", "127.0.0.4"], port, "the manual worker stays").await;
    let manual = common::get(&format!("{}/workers", router.url())).await.json();
    let entry = manual["workers"].as_array().unwrap().iter().find(|w| w["url"] == sims[1].url()).cloned().unwrap();
    assert_eq!(entry["source"], "manual");

    let r = send("GET", &format!("{}/get_loads", router.url()), &[], "").await;
    assert!(r.json()["workers"].as_array().unwrap().iter().all(|w| w["in_flight"] == 0));
    router.shutdown().await.unwrap();
}

#[tokio::test]
async fn pd_roles_come_from_selectors_and_the_bootstrap_port_from_an_annotation() {
    let (cluster, api) = Cluster::start().await;
    let (sims, port) = pod_workers(2, |i| WorkerConfig {
        time_scale: 100.0,
        role: if i == 0 { Role::Prefill } else { Role::Decode },
        model_name: "served-name".into(),
        pd_timeout_secs: 2.0,
        ..WorkerConfig::default()
    })
    .await;
    let bootstrap = sims[0].bootstrap_port().unwrap().to_string();
    let model = [("switchyard.dev/model", "alpha")];
    let prefill_labels = [("app", "engine"), ("role", "prefill"), model[0]];
    let decode_labels = [("app", "engine"), ("role", "decode"), model[0]];
    cluster.apply(pod("p", "127.0.0.2", true, &prefill_labels, &[("sglang.ai/bootstrap-port", &bootstrap)]));
    cluster.apply(pod("d", "127.0.0.3", true, &decode_labels, &[]));
    let mut cfg: RouterConfig = common::config(vec![], PolicyKind::CacheAware);
    cfg.pd = Some(PdConfig {
        style: PdStyle::Sglang,
        prefill: vec![],
        decode: vec![],
        prefill_policy: None,
        decode_policy: None,
        prefill_timeout: Duration::from_secs(5),
    });
    let mut d = discovery(&api, "pd", port);
    d.namespace = None; // every namespace: /api/v1/pods
    d.selector = vec![];
    d.prefill_selector = vec![("role".into(), "prefill".into())];
    d.decode_selector = vec![("role".into(), "decode".into())];
    cfg.discovery = Some(d);
    let router = server::start(cfg).await.unwrap();
    expect_workers(&router, &["127.0.0.2", "127.0.0.3"], port, "prefill and decode").await;
    let listed = common::get(&format!("{}/workers", router.url())).await.json();
    for w in listed["workers"].as_array().unwrap() {
        let expected_role = if w["url"] == sims[0].url() { "prefill" } else { "decode" };
        assert_eq!(w["role"]["type"], expected_role, "{w}");
        assert_eq!(w["models"], json!(["alpha"]), "the model label, not the served name: {w}");
        if expected_role == "prefill" {
            assert_eq!(w["role"]["bootstrap_port"].to_string(), bootstrap);
        }
    }
    let r = post(
        &format!("{}/v1/chat/completions", router.url()),
        &json!({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!([sims[0].stats().requests_finished, sims[1].stats().requests_finished], [1, 1]);
    router.shutdown().await.unwrap();
}

/// A pod that says where its engine publishes KV events (an annotation, no router flag) is
/// subscribed to as soon as it is discovered.
#[tokio::test]
async fn a_pods_kv_events_annotation_is_followed() {
    use switchyard_kv_events::publisher::Publisher;
    let (cluster, api) = Cluster::start().await;
    let (_sims, port) = pod_workers(1, sim_config).await;
    let publisher = Publisher::bind("127.0.0.2:0", None, "", 0).await.unwrap();
    let events_port = publisher.pub_addr().port().to_string();
    cluster.apply(pod("a", "127.0.0.2", true, ENGINE, &[("switchyard.dev/kv-events", &events_port)]));
    let mut cfg = common::config(vec![], PolicyKind::CacheAware);
    cfg.discovery = Some(discovery(&api, "kv", port));
    let router = server::start(cfg).await.unwrap();
    expect_workers(&router, &["127.0.0.2"], port, "the annotated pod").await;
    common::eventually(Duration::from_secs(10), "subscription", || async { publisher.subscribed() == 1 }).await;
    publisher.publish(switchyard_kv_events::EventBatch { ts: 0.0, events: vec![], data_parallel_rank: None }.encode());
    let url = router.url();
    common::eventually(Duration::from_secs(10), "first batch applied", || async {
        let v = common::get(&format!("{url}/debug/kv_events")).await.json();
        v["workers"][0]["synced"] == true
    })
    .await;
    let v = common::get(&format!("{url}/debug/kv_events")).await.json();
    assert_eq!(v["workers"][0]["endpoint"], format!("tcp://127.0.0.2:{events_port}"), "{v}");
    router.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_a_reachable_configuration_start_up_fails_in_one_line() {
    let mut cfg = common::config(vec![], PolicyKind::RoundRobin);
    let mut d = discovery("http://127.0.0.1:1", "missing", 8000);
    d.kubeconfig = Some(std::env::temp_dir().join("switchyard-no-such-kubeconfig"));
    cfg.discovery = Some(d);
    let err = server::start(cfg).await.err().expect("start-up fails");
    assert!(err.to_string().contains("service discovery"), "{err}");
}

#[test]
fn the_discovery_manifest_grants_what_the_watch_needs_and_its_flags_parse() {
    use serde::Deserialize;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/switchyard-discovery.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::from_value::<Value>(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .collect();
    let of = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"));
    let rule = &of("Role")["rules"][0];
    assert_eq!(rule["resources"], json!(["pods"]));
    for verb in ["list", "watch"] {
        assert!(rule["verbs"].as_array().unwrap().iter().any(|v| v == verb), "{verb}");
    }
    let binding = of("RoleBinding");
    assert_eq!(binding["roleRef"]["name"], of("Role")["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], of("ServiceAccount")["metadata"]["name"]);
    let pod = &of("Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], of("ServiceAccount")["metadata"]["name"]);
    let args: Vec<String> =
        pod["containers"][0]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
    assert!(args.contains(&"--service-discovery".to_owned()));
    let argv = std::iter::once("switchyard".to_owned()).chain(args);
    assert!(matches!(switchyard::config::parse_args(argv), switchyard::config::ParseOutcome::Run(_)));
}
