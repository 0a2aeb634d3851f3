//! The discrete-event simulation and a live run (simulated workers over HTTP, the real
//! router, the streaming load generator) agree on a small scenario.
//!
//! Tolerance: mean TPOT within 25 % and median TTFT within 50 % (+ 20 ms): the live path
//! adds real scheduling noise on a shared 2-core machine (time-scaled ×2), the DES none.

use std::time::Duration;

use switchyard::config::RouterConfig;
use switchyard::policies::{PolicyConfig, PolicyKind};
use switchyard_bench::client::{run_open_loop, LoadClient};
use switchyard_bench::des::{self, SimWorker};
use switchyard_bench::metrics::{Slo, Summary};
use switchyard_bench::workload::{Arrival, Workload};
use switchyard_sim::model::Profile;
use switchyard_sim::server::{spawn_worker, WorkerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn des_and_live_agree_on_a_small_scenario() {
    let time_scale = 2.0;
    let profile = Profile::h100_llama8b();
    let mut handles = Vec::new();
    for i in 0..2 {
        let config =
            WorkerConfig { port: 0, profile: profile.clone(), time_scale, seed: 5 + i, ..WorkerConfig::default() };
        handles.push(spawn_worker(config).await.expect("worker starts"));
    }
    let urls: Vec<String> = handles.iter().map(|h| h.url()).collect();
    let policy = PolicyConfig::new(PolicyKind::LoadBased, Some(3));
    let router = switchyard::server::start(RouterConfig {
        port: 0,
        worker_urls: urls,
        policy: policy.clone(),
        ..RouterConfig::default()
    })
    .await
    .expect("router starts");

    let workload =
        Workload::Lognormal { prompt_median: 400.0, prompt_sigma: 0.5, output_median: 48.0, output_sigma: 0.3 };
    let specs = workload.requests(Arrival::Poisson, 8.0, 80, 11, 0, None);
    let client = LoadClient::new(&router.url(), "m", time_scale, Duration::from_secs(60));
    let live = run_open_loop(std::slice::from_ref(&client), &specs, |_, _| {}).await;
    let slo = Slo::default();
    let live = Summary::of(&live, &slo, 2);
    assert_eq!(live.errors, 0, "{live:?}");

    let workers = vec![SimWorker { profile: profile.clone(), speed: 1.0 }; 2];
    let sim = des::run_open(&workers, &policy, 1, 5, specs, None);
    let sim = Summary::of(&sim.results, &slo, 2);

    let mean_tpot = |s: &Summary| s.tpot_p50_ms;
    let (lt, st) = (mean_tpot(&live), mean_tpot(&sim));
    assert!((lt - st).abs() <= 0.25 * st, "TPOT p50: live {lt:.2} ms vs DES {st:.2} ms");
    let (lf, sf) = (live.ttft_p50_ms, sim.ttft_p50_ms);
    assert!((lf - sf).abs() <= 0.5 * sf + 20.0, "TTFT p50: live {lf:.1} ms vs DES {sf:.1} ms");
    assert!(
        (live.output_tok_s - sim.output_tok_s).abs() <= 0.2 * sim.output_tok_s,
        "tok/s live {} DES {}",
        live.output_tok_s,
        sim.output_tok_s
    );
    eprintln!(
        "live vs DES: TPOT p50 {lt:.2} / {st:.2} ms, TTFT p50 {lf:.1} / {sf:.1} ms, tok/s {:.0} / {:.0}",
        live.output_tok_s, sim.output_tok_s
    );
    let _ = router.shutdown().await;
}
