//! The discrete-event simulation and a live run (simulated workers over HTTP, the real
//! router, the streaming load generator) agree on a small scenario, with whole requests and
//! with a prefill/decode pair.
//!
//! Tolerance: mean TPOT within 25 % and median TTFT within 50 % (+ 20 ms): the live path
//! adds real scheduling noise on a shared 2-core machine (time-scaled ×2), the DES none.

use std::time::Duration;

use switchyard::config::{PdConfig, PdStyle, RouterConfig};
use switchyard::policies::{PolicyConfig, PolicyKind};
use switchyard::workers::WorkerRole;
use switchyard_bench::client::{run_open_loop, LoadClient};
use switchyard_bench::des::{self, SimWorker};
use switchyard_bench::metrics::{Slo, Summary};
use switchyard_bench::workload::{Arrival, Workload};
use switchyard_sim::model::Profile;
use switchyard_sim::server::{spawn_worker, Role, WorkerConfig};

/// Runs the same open-loop workload through a live router on simulated workers (whole
/// requests, or one prefill and one decode worker in SGLang-style PD mode) and through the
/// DES, and checks that they agree.
async fn des_and_live_agree(pd: bool) {
    let time_scale = 2.0;
    let profile = Profile::h100_llama8b();
    let roles = if pd { [Role::Prefill, Role::Decode] } else { [Role::Plain, Role::Plain] };
    let mut handles = Vec::new();
    for (i, role) in roles.into_iter().enumerate() {
        let config = WorkerConfig {
            port: 0,
            profile: profile.clone(),
            time_scale,
            seed: 5 + i as u64,
            role,
            ..WorkerConfig::default()
        };
        handles.push(spawn_worker(config).await.expect("worker starts"));
    }
    let policy = PolicyConfig::new(PolicyKind::LoadBased, Some(3));
    let mut config = RouterConfig { port: 0, policy: policy.clone(), ..RouterConfig::default() };
    if pd {
        config.pd = Some(PdConfig {
            style: PdStyle::Sglang,
            prefill: vec![(handles[0].url(), handles[0].bootstrap_port())],
            decode: vec![handles[1].url()],
            prefill_policy: None,
            decode_policy: None,
            prefill_timeout: Duration::from_secs(30),
        });
    } else {
        config.worker_urls = handles.iter().map(|h| h.url()).collect();
    }
    let router = switchyard::server::start(config).await.expect("router starts");

    let workload =
        Workload::Lognormal { prompt_median: 400.0, prompt_sigma: 0.5, output_median: 48.0, output_sigma: 0.3 };
    let specs = workload.requests(Arrival::Poisson, 8.0, 80, 11, 0, None);
    let client = LoadClient::new(&router.url(), "m", time_scale, Duration::from_secs(60));
    let live = run_open_loop(std::slice::from_ref(&client), &specs, |_, _| {}).await;
    let slo = Slo::default();
    let live = Summary::of(&live, &slo, 2);
    assert_eq!(live.errors, 0, "{live:?}");

    let role = |r: WorkerRole| SimWorker { profile: profile.clone(), speed: 1.0, role: r };
    let workers = if pd {
        vec![role(WorkerRole::Prefill { bootstrap_port: None }), role(WorkerRole::Decode)]
    } else {
        vec![role(WorkerRole::Regular); 2]
    };
    let sim = des::run_open(&workers, &policy, 1, 5, specs, None);
    assert!(sim.results.iter().all(|r| r.error.is_none() && r.ttft.is_some()), "every DES request answered");
    let sim = Summary::of(&sim.results, &slo, 2);

    let mode = if pd { "PD" } else { "regular" };
    let (lt, st) = (live.tpot_p50_ms, sim.tpot_p50_ms);
    assert!((lt - st).abs() <= 0.25 * st, "{mode}: TPOT p50: live {lt:.2} ms vs DES {st:.2} ms");
    let (lf, sf) = (live.ttft_p50_ms, sim.ttft_p50_ms);
    assert!((lf - sf).abs() <= 0.5 * sf + 20.0, "{mode}: TTFT p50: live {lf:.1} ms vs DES {sf:.1} ms");
    assert!(
        (live.output_tok_s - sim.output_tok_s).abs() <= 0.2 * sim.output_tok_s,
        "{mode}: tok/s live {} DES {}",
        live.output_tok_s,
        sim.output_tok_s
    );
    eprintln!(
        "{mode} live vs DES: TPOT p50 {lt:.2} / {st:.2} ms, TTFT p50 {lf:.1} / {sf:.1} ms, tok/s {:.0} / {:.0}",
        live.output_tok_s, sim.output_tok_s
    );
    let _ = router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn des_and_live_agree_on_a_small_scenario() {
    des_and_live_agree(false).await;
}

/// The DES's PD mode (pair selection, prefill leg, KV transfer, decode leg) against the live
/// router's SGLang-style PD path on the simulator's prefill and decode workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn des_and_live_agree_on_a_prefill_decode_pair() {
    des_and_live_agree(true).await;
}
