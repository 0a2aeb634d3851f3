//! The performance model's physics, asserted in virtual time (deterministic for a seed).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchyard_sim::model::virtual_time::{run_closed_loop, run_open_loop, Arrival, Completed};
use switchyard_sim::model::{Engine, Profile, SimRequest};

fn unique_prompt(rng: &mut StdRng, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.random::<u32>()).collect()
}

/// Output tokens per second with `concurrency` requests always outstanding.
fn throughput(profile: &Profile, concurrency: usize, prompt: usize, output: u32, total: usize) -> f64 {
    let mut engine = Engine::new(profile.clone(), 1.0, 1);
    let mut rng = StdRng::seed_from_u64(concurrency as u64);
    let (done, elapsed) = run_closed_loop(&mut engine, concurrency, total, |_| SimRequest {
        prompt: unique_prompt(&mut rng, prompt),
        output_tokens: output,
    });
    assert_eq!(done.len(), total);
    done.iter().map(|c| f64::from(c.output_tokens)).sum::<f64>() / elapsed
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn throughput_rises_concavely_with_concurrency_and_flattens_at_kv_capacity() {
    // Each request needs up to 1,024 tokens of KV; 32k tokens hold ~32 at full length.
    let profile = Profile { kv_capacity_tokens: 32_768, ..Profile::h100_llama8b() };
    let levels = [1usize, 2, 4, 8, 16, 32, 64, 128];
    let tput: Vec<f64> = levels.iter().map(|&c| throughput(&profile, c, 512, 512, (4 * c).max(24))).collect();
    eprintln!("concurrency → tok/s: {:?}", levels.iter().zip(&tput).map(|(c, t)| (c, t.round())).collect::<Vec<_>>());
    // Increasing up to the knee.
    for i in 1..6 {
        assert!(tput[i] > tput[i - 1] * 1.3, "throughput must grow below the knee: {tput:?}");
    }
    // Concave: each doubling gains less than the one before.
    for i in 2..6 {
        assert!(tput[i] / tput[i - 1] < tput[i - 1] / tput[i - 2] + 0.02, "not concave at {}: {tput:?}", levels[i]);
    }
    // Knee: beyond KV capacity more concurrency buys (almost) nothing.
    assert!(tput[7] < tput[5] * 1.25, "no knee at KV capacity: {tput:?}");
    assert!(tput[6] / tput[5] < tput[5] / tput[4], "{tput:?}");
}

#[test]
fn kv_exhaustion_preempts_and_still_completes() {
    let profile = Profile { kv_capacity_tokens: 8_192, ..Profile::h100_llama8b() };
    let mut engine = Engine::new(profile, 1.0, 3);
    let mut rng = StdRng::seed_from_u64(3);
    let (done, _) = run_closed_loop(&mut engine, 32, 64, |_| SimRequest {
        prompt: unique_prompt(&mut rng, 256),
        output_tokens: 512,
    });
    assert_eq!(done.len(), 64);
    assert!(engine.stats().preemptions > 0, "KV pressure must cause preemptions");
    assert!(engine.stats().kv_used_tokens <= 8_192 + 64);
}

#[test]
fn ttft_grows_with_queued_prefill() {
    let mut ttfts = Vec::new();
    for queued in [0usize, 4, 8, 16] {
        let mut engine = Engine::new(Profile::h100_llama8b(), 1.0, 5);
        let mut rng = StdRng::seed_from_u64(5);
        let mut arrivals: Vec<Arrival> = (0..queued)
            .map(|_| Arrival {
                at: 0.0,
                request: SimRequest { prompt: unique_prompt(&mut rng, 4096), output_tokens: 8 },
            })
            .collect();
        arrivals.push(Arrival {
            at: 1e-6,
            request: SimRequest { prompt: unique_prompt(&mut rng, 1024), output_tokens: 8 },
        });
        let done = run_open_loop(&mut engine, arrivals);
        let probe = done.iter().find(|c| c.prompt_tokens == 1024).expect("probe finished");
        ttfts.push(probe.ttft());
    }
    eprintln!("TTFT with 0/4/8/16 queued 4k prompts: {ttfts:?}");
    for w in ttfts.windows(2) {
        assert!(w[1] > w[0] * 1.5, "TTFT must rise with queued prefill: {ttfts:?}");
    }
    // 16 × 4,096 tokens at 17 µs each ≈ 1.1 s of prefill ahead.
    assert!(ttfts[3] > 0.9 && ttfts[3] < 2.0, "{ttfts:?}");
}

#[test]
fn a_repeated_prefix_is_cached_and_cuts_ttft() {
    let mut engine = Engine::new(Profile::h100_llama8b(), 1.0, 9);
    let mut rng = StdRng::seed_from_u64(9);
    let system = unique_prompt(&mut rng, 4096);
    let with_suffix = |rng: &mut StdRng, base: &[u32]| {
        let mut p = base.to_vec();
        p.extend(unique_prompt(rng, 128));
        p
    };
    let first = SimRequest { prompt: with_suffix(&mut rng, &system), output_tokens: 4 };
    let second = SimRequest { prompt: with_suffix(&mut rng, &system), output_tokens: 4 };
    let cold = SimRequest { prompt: unique_prompt(&mut rng, 4096 + 128), output_tokens: 4 };
    let done = run_open_loop(
        &mut engine,
        vec![
            Arrival { at: 0.0, request: first },
            Arrival { at: 1.0, request: second },
            Arrival { at: 2.0, request: cold },
        ],
    );
    let by_arrival = |t: f64| done.iter().find(|c| c.arrival == t).cloned().expect("finished");
    let (first, second, cold): (Completed, Completed, Completed) = (by_arrival(0.0), by_arrival(1.0), by_arrival(2.0));
    assert_eq!(first.cached_tokens, 0);
    assert!(second.cached_tokens >= 4096 - 16, "cached {}", second.cached_tokens);
    assert_eq!(cold.cached_tokens, 0);
    assert!(second.ttft() < cold.ttft() * 0.3, "hit {} vs cold {}", second.ttft(), cold.ttft());
    let stats = engine.stats();
    assert!(stats.cached_tokens_total >= 4080 && stats.prompt_tokens_total == 3 * (4096 + 128));
}

#[test]
fn lru_eviction_under_kv_pressure_loses_old_prefixes() {
    let profile = Profile { kv_capacity_tokens: 16_384, ..Profile::h100_llama8b() };
    let mut engine = Engine::new(profile, 1.0, 2);
    let mut rng = StdRng::seed_from_u64(2);
    let old = unique_prompt(&mut rng, 4096);
    run_open_loop(
        &mut engine,
        vec![Arrival { at: 0.0, request: SimRequest { prompt: old.clone(), output_tokens: 2 } }],
    );
    assert!(engine.cached_prefix_tokens(&old) >= 4080);
    // Fill the cache with newer prompts: the old one must be evicted first.
    let fill: Vec<Arrival> = (0..6)
        .map(|i| Arrival {
            at: f64::from(i),
            request: SimRequest { prompt: unique_prompt(&mut rng, 4096), output_tokens: 2 },
        })
        .collect();
    run_open_loop(&mut engine, fill);
    assert_eq!(engine.cached_prefix_tokens(&old), 0);
    assert!(engine.stats().kv_used_tokens <= 16_384);
}

#[test]
fn h100_serves_about_twice_an_a100() {
    for concurrency in [8usize, 128] {
        let h = throughput(&Profile::h100_llama8b(), concurrency, 800, 200, 4 * concurrency);
        let a = throughput(&Profile::a100_llama8b(), concurrency, 800, 200, 4 * concurrency);
        eprintln!("concurrency {concurrency}: h100 {h:.0} tok/s, a100 {a:.0} tok/s, ratio {:.2}", h / a);
        assert!(h / a >= 1.7 && h / a < 2.4, "ratio {:.2} at {concurrency}", h / a);
    }
    // The slow tier is about 3× slower than an A100.
    let a = throughput(&Profile::a100_llama8b(), 8, 800, 200, 32);
    let l4 = throughput(&Profile::l4_llama8b(), 8, 800, 200, 32);
    assert!(a / l4 > 2.5 && a / l4 < 3.5, "a100/l4 {:.2}", a / l4);
}

#[test]
fn tpot_grows_with_batch_and_speed_factor_scales_time() {
    let run = |speed: f64, concurrency: usize| {
        let mut engine = Engine::new(Profile::h100_llama8b(), speed, 4);
        let mut rng = StdRng::seed_from_u64(4);
        let (done, _) = run_closed_loop(&mut engine, concurrency, concurrency * 2, |_| SimRequest {
            prompt: unique_prompt(&mut rng, 256),
            output_tokens: 128,
        });
        mean(done.iter().map(Completed::tpot))
    };
    let (t1, t64) = (run(1.0, 1), run(1.0, 64));
    assert!(t64 > t1 * 1.1, "TPOT must grow with the batch: {t1} vs {t64}");
    assert!((t1 * 1e3 - 5.8).abs() < 0.6, "single-sequence step ≈ c0 + c1 + c2·K: {} ms", t1 * 1e3);
    let fast = run(2.0, 1);
    assert!((t1 / fast - 2.0).abs() < 0.1, "speed 2 halves step time: {t1} vs {fast}");
}

#[test]
fn deterministic_for_a_seed() {
    let go = || {
        let mut engine = Engine::new(Profile::a100_llama8b(), 1.0, 11);
        let mut rng = StdRng::seed_from_u64(11);
        let (done, t) = run_closed_loop(&mut engine, 16, 40, |_| SimRequest {
            prompt: unique_prompt(&mut rng, 300),
            output_tokens: 50,
        });
        (done, t)
    };
    assert_eq!(go(), go());
}
