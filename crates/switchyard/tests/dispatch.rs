//! The dispatch path's contracts, one regression test per defect the redesign fixed: guards
//! that report their own end (to the policy, in both modes, usage included), breaker probes
//! that cannot wedge, PD claiming breakers (and not blaming a decode worker for its prefill's
//! queue) and honouring marginal_utility's overload modes,
//! per-instance hold queues, and membership reaching the policies.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::config::{CircuitBreakerConfig, PdConfig, PdStyle, RetryConfig};
use switchyard::load::{Ending, RequestOutcome};
use switchyard::metrics::Metrics;
use switchyard::policies::{
    MarginalUtilityConfig, Overload, PolicyConfig, PolicyKind, RoutingError, RoutingPolicy, Selection,
};
use switchyard::proxy::{client, Upstream};
use switchyard::request::RequestView;
use switchyard::routers::{Dispatcher, PolicySet};
use switchyard::workers::{Worker, WorkerRegistry, WorkerRole};
use switchyard_sim::server::{spawn_worker, Faults, Role, WorkerConfig, WorkerHandle};
use tokio::io::AsyncWriteExt;

/// Round robin that writes down every outcome it hears.
#[derive(Debug, Default)]
struct Recording {
    next: std::sync::atomic::AtomicUsize,
    heard: Mutex<Vec<(String, Ending, Option<u32>)>>,
}

impl RoutingPolicy for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn select_single(&self, workers: &[Arc<Worker>], _: &RequestView) -> Result<Selection, RoutingError> {
        if workers.is_empty() {
            return Err(RoutingError::NoHealthyWorkers);
        }
        Ok(Selection::of(self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % workers.len()))
    }
    fn on_request_complete(&self, o: &RequestOutcome) {
        self.heard.lock().unwrap().push((o.worker.url().to_owned(), o.ending, o.usage.completion_tokens));
    }
}

async fn sim(role: Role, faults: Faults) -> WorkerHandle {
    let config = WorkerConfig { role, faults, time_scale: 100.0, pd_timeout_secs: 0.5, ..WorkerConfig::default() };
    spawn_worker(config).await.unwrap()
}

fn fast_retry(attempts: usize) -> RetryConfig {
    RetryConfig {
        max_attempts: attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
        ..RetryConfig::default()
    }
}

/// A PD dispatcher over `prefill` / `decode` with `policy` for both pools, no HTTP front.
fn pd_dispatcher(
    prefill: &[&WorkerHandle],
    decode: &[&WorkerHandle],
    policy: Arc<dyn RoutingPolicy>,
) -> (Dispatcher, Arc<WorkerRegistry>) {
    let registry = Arc::new(WorkerRegistry::new());
    for p in prefill {
        let role = WorkerRole::Prefill { bootstrap_port: p.bootstrap_port() };
        registry.add(Arc::new(Worker::new(p.url(), role))).unwrap();
    }
    for d in decode {
        registry.add(Arc::new(Worker::new(d.url(), WorkerRole::Decode))).unwrap();
    }
    let upstream = Upstream::new(client::new_client(Duration::from_secs(1), 8), Duration::from_secs(10));
    let dispatcher = Dispatcher::pd(
        registry.clone(),
        PolicySet::Joint(policy),
        PdStyle::Sglang,
        Duration::from_secs(2),
        upstream,
        fast_retry(2),
        Arc::new(Metrics::new("recording")),
    );
    (dispatcher, registry)
}

fn generate(stream: bool) -> bytes::Bytes {
    let body =
        json!({"text": "hello there", "sampling_params": {"max_new_tokens": 6, "ignore_eos": true}, "stream": stream});
    bytes::Bytes::from(body.to_string())
}

#[tokio::test]
async fn pd_failures_and_whole_answers_reach_the_policy_with_their_usage() {
    let prefill = [sim(Role::Prefill, Faults::default()).await, sim(Role::Prefill, Faults::default()).await];
    let decode = sim(Role::Decode, Faults::default()).await;
    let sick = sim(Role::Decode, Faults { error_rate: 1.0, error_status: 503, ..Faults::default() }).await;
    let policy = Arc::new(Recording::default());
    // Round robin over one counter: the first pair is (prefill 0, sick); the sick decode
    // answers before its prefill leg, so both are left out of the second pair.
    let (dispatcher, _) = pd_dispatcher(&[&prefill[0], &prefill[1]], &[&decode, &sick], policy.clone());
    let resp = dispatcher.route("/generate", &Default::default(), generate(false)).await.expect("retried");
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    assert!(serde_json::from_slice::<Value>(&body).is_ok());
    let heard = policy.heard.lock().unwrap().clone();
    // First pair: the sick decode failed (told), its prefill leg was cancelled (abandoned) or
    // finished; second pair: both legs succeeded, the decode leg with its token counts.
    assert!(heard.iter().any(|(u, e, _)| *u == sick.url() && *e == Ending::Failed), "{heard:?}");
    let decoded: Vec<_> = heard.iter().filter(|(u, e, _)| *u == decode.url() && *e == Ending::Succeeded).collect();
    assert_eq!(decoded.len(), 1, "{heard:?}");
    assert_eq!(decoded[0].2, Some(6), "the non-streamed decode answer's usage reaches the policy");
    assert_eq!(heard.len(), 4, "every leg of both attempts reported exactly once: {heard:?}");
}

/// One request through (a prefill worker that never answers, a decode engine that waits 1.5 s
/// for its KV — past `KV_WAIT` — then answers 503), retried on a healthy prefill worker; while
/// it waits, the stuck prefill worker finishes other requests if `progressing`. Returns what
/// the policy heard about the stuck prefill worker and about the decode worker.
async fn decode_waits_for_a_stuck_prefill(progressing: bool) -> (Vec<Ending>, Vec<Ending>) {
    let stuck = sim(Role::Prefill, Faults { hang: true, ..Faults::default() }).await;
    let prefill = sim(Role::Prefill, Faults::default()).await;
    let config =
        WorkerConfig { role: Role::Decode, time_scale: 100.0, pd_timeout_secs: 1.5, ..WorkerConfig::default() };
    let decode = spawn_worker(config).await.unwrap();
    let policy = Arc::new(Recording::default());
    // The first pair is (stuck, decode).
    let (dispatcher, registry) = pd_dispatcher(&[&stuck, &prefill], &[&decode], policy.clone());
    let stuck_worker = registry.get(&stuck.url()).unwrap();
    let progress = tokio::spawn(async move {
        if progressing {
            loop {
                switchyard::load::InFlightGuard::new(stuck_worker.clone())
                    .finish(Ending::Succeeded, Default::default());
                tokio::time::sleep(Duration::from_millis(100)).await; // another request done: a pace, not a sync
            }
        }
    });
    let resp = dispatcher.route("/generate", &Default::default(), generate(false)).await.expect("retried");
    progress.abort();
    // Retried without the stuck prefill worker only: the decode worker serves the second pair.
    assert_eq!(resp.status(), 200);
    let heard = policy.heard.lock().unwrap().clone();
    let of = |url: String| heard.iter().filter(|(u, ..)| *u == url).map(|(_, e, _)| *e).collect();
    (of(stuck.url()), of(decode.url()))
}

#[tokio::test]
async fn a_decode_leg_that_waited_for_its_kv_fails_a_hung_prefill_worker_not_the_decode_worker() {
    let (stuck, decode) = decode_waits_for_a_stuck_prefill(false).await;
    assert_eq!(decode, [Ending::Abandoned, Ending::Succeeded], "no failure counted against the decode worker");
    assert_eq!(stuck, [Ending::Failed], "a prefill worker that finished nothing meanwhile is failed");
}

#[tokio::test]
async fn a_decode_leg_that_waited_for_its_kv_fails_no_one_when_the_prefill_worker_is_only_behind() {
    let (stuck, decode) = decode_waits_for_a_stuck_prefill(true).await;
    assert_eq!(decode, [Ending::Abandoned, Ending::Succeeded], "no failure counted against the decode worker");
    // The policy also heard the other requests it finished (the test's own).
    assert!(!stuck.contains(&Ending::Failed) && stuck.contains(&Ending::Abandoned), "{stuck:?}");
}

#[tokio::test]
async fn an_abandoned_half_open_probe_does_not_wedge_the_breaker() {
    let worker = mock_worker().await;
    let mut cfg = config(vec![worker.url()], PolicyKind::RoundRobin);
    cfg.circuit_breaker =
        CircuitBreakerConfig { failure_threshold: 2, success_threshold: 1, timeout: Duration::from_millis(100) };
    cfg.retry = fast_retry(1);
    let router = router(cfg).await;
    let url = format!("{}/v1/completions", router.url());
    for _ in 0..2 {
        assert_eq!(post(&url, &json!({"mode": "status", "status": 500})).await.status, 500);
    }
    let breaker = || router.state().registry.all()[0].breaker().state().name();
    assert_eq!(breaker(), "open");
    tokio::time::sleep(Duration::from_millis(150)).await; // the open period (a timer, not a sync)
    assert_eq!(breaker(), "half_open");
    // The probe: a request the worker holds, abandoned by its client.
    let mut arrivals = worker.arrivals;
    let mut probe = tokio::net::TcpStream::connect(router.addr()).await.unwrap();
    let body = json!({"mode": "hold"}).to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    probe.write_all(format!("{head}{body}").as_bytes()).await.unwrap();
    loop {
        let seen = tokio::time::timeout(Duration::from_secs(5), arrivals.recv()).await.expect("probe arrived").unwrap();
        if seen["body"]["mode"] == "hold" {
            break;
        }
    }
    drop(probe);
    worker.gate.add_permits(1000); // the worker is healthy again
    eventually(Duration::from_secs(5), "the worker serves again", || async {
        post(&url, &json!({"prompt": "hi"})).await.status == 200
    })
    .await;
    assert_eq!(breaker(), "closed");
}

#[tokio::test]
async fn pd_claims_the_breaker_so_a_half_open_worker_gets_one_probe() {
    let prefill = mock_worker().await;
    let (d1, d2) = (mock_worker().await, mock_worker().await);
    let mut cfg = config(vec![], PolicyKind::RoundRobin);
    cfg.circuit_breaker = CircuitBreakerConfig { failure_threshold: 1, success_threshold: 1, timeout: Duration::ZERO };
    cfg.pd = Some(PdConfig {
        style: PdStyle::Sglang,
        prefill: vec![(prefill.url(), None)],
        decode: vec![d1.url(), d2.url()],
        prefill_policy: None,
        decode_policy: None,
        prefill_timeout: Duration::from_secs(5),
    });
    let router = router(cfg).await;
    let half_open = router.state().registry.get(&d1.url()).unwrap();
    half_open.breaker().trip(); // zero timeout: half-open at once
    assert_eq!(half_open.breaker().state().name(), "half_open");
    let url = format!("{}/generate", router.url());
    let requests: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post(&url, &json!({"text": "x", "mode": "hold"})).await.status })
        })
        .collect();
    eventually(Duration::from_secs(5), "six decode legs arrived", || async {
        d1.received.load(std::sync::atomic::Ordering::SeqCst) + d2.received.load(std::sync::atomic::Ordering::SeqCst)
            >= 6
    })
    .await;
    assert_eq!(d1.received.load(std::sync::atomic::Ordering::SeqCst), 1, "one probe only");
    d1.release(100);
    d2.release(100);
    prefill.release(100);
    for r in requests {
        assert_eq!(r.await.unwrap(), 200);
    }
}

async fn pd_sim_router(overload: Overload) -> (switchyard::server::RunningRouter, Vec<WorkerHandle>) {
    let workers = vec![sim(Role::Prefill, Faults::default()).await, sim(Role::Decode, Faults::default()).await];
    let mut cfg = config(vec![], PolicyKind::MarginalUtility);
    cfg.policy = PolicyConfig::MarginalUtility(MarginalUtilityConfig {
        slo_ttft: Duration::from_micros(1), // no worker can meet it
        overload,
        seed: Some(1),
        ..MarginalUtilityConfig::default()
    });
    cfg.pd = Some(PdConfig {
        style: PdStyle::Sglang,
        prefill: vec![(workers[0].url(), workers[0].bootstrap_port())],
        decode: vec![workers[1].url()],
        prefill_policy: None,
        decode_policy: None,
        prefill_timeout: Duration::from_secs(5),
    });
    (router(cfg).await, workers)
}

#[tokio::test]
async fn pd_honours_marginal_utility_shed_and_queue() {
    let body = json!({"text": "hello", "sampling_params": {"max_new_tokens": 4, "ignore_eos": true}});
    let (shed, _w) = pd_sim_router(Overload::Shed).await;
    let a = post(&format!("{}/generate", shed.url()), &body).await;
    assert_eq!(a.status, 503, "{:?}", a.body);
    assert!(a.headers.contains_key("retry-after"));
    assert_eq!(a.json()["error"]["type"], "overloaded");
    let (queue, _w2) = pd_sim_router(Overload::Queue).await;
    let a = post(&format!("{}/generate", queue.url()), &body).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
}

#[tokio::test]
async fn two_routers_in_one_process_hold_their_own_requests() {
    let w = sim(Role::Plain, Faults::default()).await;
    let mk = |overload| {
        let mut cfg = config(vec![w.url()], PolicyKind::MarginalUtility);
        cfg.policy = PolicyConfig::MarginalUtility(MarginalUtilityConfig {
            slo_ttft: Duration::from_secs(2),
            overload,
            seed: Some(1),
            ..MarginalUtilityConfig::default()
        });
        cfg
    };
    let holding = router(mk(Overload::Queue)).await;
    let other = router(mk(Overload::Queue)).await;
    // As the holding router sees the worker: requests waiting there for 600 ms are on course
    // to miss half the 2 s SLO, so a newcomer is held (its budget lasts a few rechecks more).
    let since = tokio::time::Instant::now() - Duration::from_millis(600);
    let worker = holding.state().registry.all()[0].clone();
    let busy: Vec<_> =
        (0..4).map(|_| switchyard::load::InFlightGuard::dispatch(worker.clone(), Default::default(), since)).collect();
    let url = format!("{}/v1/completions", holding.url());
    let held = tokio::spawn(async move { post(&url, &json!({"prompt": "x", "max_tokens": 2})).await.status });
    eventually(Duration::from_secs(5), "a request is held", || async { holding.state().router.held() == 1 }).await;
    assert_eq!(other.state().router.held(), 0, "the other router holds nothing");
    drop(busy);
    assert_eq!(held.await.unwrap(), 200);
    assert_eq!(holding.state().router.held(), 0);
}

/// Worker ids a policy reports state for in `/debug/policy`.
async fn ids_in_debug(router_url: &str) -> Vec<u64> {
    let v = get(&format!("{router_url}/debug/policy")).await.json();
    v["workers"].as_array().map(|a| a.iter().filter_map(|w| w["worker"].as_u64()).collect()).unwrap_or_default()
}

#[tokio::test]
async fn a_removed_worker_leaves_no_state_in_any_policy() {
    let sims = [sim(Role::Plain, Faults::default()).await, sim(Role::Plain, Faults::default()).await];
    for kind in [PolicyKind::CacheAware, PolicyKind::MarginalUtility, PolicyKind::ConsistentHash] {
        let router = router(config(sims.iter().map(|s| s.url()).collect(), kind)).await;
        let base = router.url();
        for i in 0..16 {
            let body =
                json!({"prompt": format!("{i} distinct prompt"), "max_tokens": 8, "stream": true, "ignore_eos": true});
            assert_eq!(post(&format!("{base}/v1/completions"), &body).await.status, 200);
        }
        let gone = router.state().registry.get(&sims[0].url()).unwrap();
        let before = ids_in_debug(&base).await;
        assert!(before.contains(&u64::from(gone.id())), "{kind:?} kept no state to free: {before:?}");
        // A request still running there when it leaves, finishing afterwards: what the policy
        // hears of it must not bring the worker's state back.
        let mut late = switchyard::load::InFlightGuard::new(gone.clone());
        late.first_token_at(tokio::time::Instant::now());
        let removed = send("DELETE", &format!("{base}/workers?url={}", sims[0].url()), &[], "").await;
        assert_eq!(removed.status, 200);
        let usage =
            switchyard::load::Usage { prompt_tokens: Some(8), cached_tokens: Some(0), completion_tokens: Some(8) };
        let outcome = late.finish(Ending::Succeeded, usage);
        router.state().router.policy().on_request_complete(&outcome);
        for i in 0..4 {
            let body = json!({"prompt": format!("shared prefix {i}"), "max_tokens": 8});
            assert_eq!(post(&format!("{base}/v1/completions"), &body).await.status, 200);
        }
        let ids = ids_in_debug(&base).await;
        assert!(!ids.contains(&u64::from(gone.id())), "{kind:?} still holds state for a removed worker: {ids:?}");
        // Back again: a new worker, starting cold.
        let added = post(&format!("{base}/workers"), &json!({"url": sims[0].url()})).await;
        assert_eq!(added.status, 200);
        let back = router.state().registry.get(&sims[0].url()).unwrap();
        assert_ne!(back.id(), gone.id());
    }
}

#[test]
fn only_policies_that_read_reported_load_say_so() {
    for kind in PolicyKind::ALL {
        let p = switchyard::policies::build(&PolicyConfig::new(kind, Some(1)));
        assert_eq!(p.reads_reported_load(), kind == PolicyKind::MarginalUtility, "{kind:?}");
    }
}
