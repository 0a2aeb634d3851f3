//! Hot-path benchmarks: policy selection at 4/64/1,024 workers, PD pair selection, radix-tree
//! insert and match at 10^4–10^6 stored prompts of realistic shapes, and the tree's memory per
//! stored character. A plain harness (no criterion) keeps the build lean; each figure is the best
//! of several timed batches, so background noise inflates it less.
//!
//! `cargo bench --bench hot_paths` (add `-- quick` for a shorter run, and section names —
//! exact, selection, pairs, rls, tree, contention — to run only those).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchyard::load::{DispatchInfo, InFlightGuard, ReportedLoad};
use switchyard::policies::radix_tree::{RadixTree, SharedTree};
use switchyard::policies::{build, PolicyConfig, PolicyKind};
use switchyard::request::{RequestView, RoutingText};
use switchyard::workers::{Worker, WorkerRole};

/// Best-of-`rounds` nanoseconds per call of `f`, each round `iters` calls.
fn ns_per_op(rounds: usize, iters: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut best = f64::MAX;
    let mut i = 0;
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..iters {
            f(i);
            i += 1;
        }
        best = best.min(start.elapsed().as_nanos() as f64 / iters as f64);
    }
    best
}

fn system_prompt(g: usize) -> String {
    format!("system: You are assistant {g}. Follow the policy document carefully. ").repeat(12)
}

const WORDS: [&str; 16] = [
    "train",
    "schedule",
    "delay",
    "platform",
    "ticket",
    "refund",
    "connection",
    "station",
    "weather",
    "route",
    "price",
    "seat",
    "luggage",
    "night",
    "express",
    "transfer",
];

/// A chat routing text: one of `groups` system prompts, then 1-3 turns of distinct
/// questions (~100-200 characters each) and answers.
fn conversation(rng: &mut StdRng, groups: usize) -> String {
    let g = rng.random_range(0..groups);
    let mut s = system_prompt(g);
    for turn in 0..rng.random_range(1..4) {
        s.push_str("user: ");
        for _ in 0..rng.random_range(16..32) {
            s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
            s.push(' ');
        }
        s.push_str(&format!("\nassistant: answer {turn}\n"));
    }
    s
}

/// Nanoseconds of each call, sorted.
fn per_call_ns(calls: usize, mut f: impl FnMut(usize)) -> Vec<f64> {
    let mut times: Vec<f64> = (0..calls)
        .map(|i| {
            let start = Instant::now();
            f(i);
            start.elapsed().as_nanos() as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// A table cell: " p50 / p99" of sorted per-call times.
fn p50_p99_cell(sorted: &[f64]) -> String {
    format!(" {:>7.0} / {:>6.0}", percentile(sorted, 0.5), percentile(sorted, 0.99))
}

/// Some load so least-loaded policies have work to do: two requests a worker, one decoding a
/// 2,000-token context and one before its first token, and a fresh report of a nearly full
/// KV cache, so marginal_utility's guards and admission waits run as they do under load.
/// The report comes after the requests, as the engine would show them: none of them reads as
/// another router's.
fn load(workers: &[Arc<Worker>]) -> Vec<InFlightGuard> {
    let now = tokio::time::Instant::now();
    let info = DispatchInfo { prompt_tokens: 2000, uncached_tokens: 2000, ..Default::default() };
    let guards = (0..workers.len() * 2)
        .map(|i| {
            let mut g = InFlightGuard::dispatch(workers[(i * 7) % workers.len()].clone(), info, now);
            if i % 2 == 0 {
                g.mark_first_byte();
            }
            g
        })
        .collect();
    for w in workers {
        w.load().set_reported(ReportedLoad { kv_usage: 0.95, queued: 0, running: 2, at: now });
    }
    guards
}

fn bench_selection(quick: bool) {
    println!("\n## policy selection (ns per select_single: p50 / p99 over single timed calls)");
    println!("{:<16} {:>16} {:>16} {:>16}", "policy", "4", "64", "1024");
    let mut rng = StdRng::seed_from_u64(1);
    let texts: Vec<RequestView> = (0..1024)
        .map(|_| RequestView { text: RoutingText::Text(conversation(&mut rng, 64)), ..RequestView::default() })
        .collect();
    for kind in <PolicyKind as clap::ValueEnum>::value_variants() {
        let mut row = format!("{:<16}", format!("{kind:?}"));
        for n in [4usize, 64, 1024] {
            let workers: Vec<Arc<Worker>> = (0..n)
                .map(|i| Arc::new(Worker::new(format!("http://10.0.0.{}:{}", i % 250, 8000 + i), WorkerRole::Regular)))
                .collect();
            let _guards = load(&workers);
            let policy = build(&PolicyConfig::new(*kind, Some(7)));
            // Warm the policy's state (trees) with the same prompts first.
            for (i, t) in texts.iter().enumerate().take(if quick { 1024 } else { 4096 }) {
                let _ = (i, policy.select_single(&workers, t));
            }
            let calls = if quick { 5_000 } else { 50_000 };
            let times = per_call_ns(calls, |i| {
                black_box(policy.select_single(&workers, &texts[i % texts.len()]).ok());
            });
            row.push_str(&p50_p99_cell(&times));
        }
        println!("{row}");
    }
    // The worst case for prefix matching: one hot system prompt held by every worker.
    let mut row = format!("{:<16}", "hot prefix, all");
    for n in [4usize, 64, 1024] {
        let workers: Vec<Arc<Worker>> = (0..n)
            .map(|i| Arc::new(Worker::new(format!("http://10.0.1.{}:{}", i % 250, 8000 + i), WorkerRole::Regular)))
            .collect();
        let policy = build(&PolicyConfig::new(PolicyKind::CacheAware, Some(7)));
        let hot = system_prompt(0);
        for (i, w) in workers.iter().enumerate() {
            let view = RequestView { text: RoutingText::Text(format!("{hot}user: {i}")), ..RequestView::default() };
            let _ = policy.select_single(std::slice::from_ref(w), &view);
        }
        let views: Vec<RequestView> = (0..256)
            .map(|i| RequestView { text: RoutingText::Text(format!("{hot}user: new {i}")), ..RequestView::default() })
            .collect();
        let times = per_call_ns(if quick { 5_000 } else { 50_000 }, |i| {
            black_box(policy.select_single(&workers, &views[i % views.len()]).ok());
        });
        row.push_str(&p50_p99_cell(&times));
    }
    println!("{row}  (cache_aware)");
}

/// PD pair selection: each policy's `select_pair` over a prefill and a decode pool of `n`
/// workers each, as a `--pd-disaggregation` router asks for every request.
fn bench_pairs(quick: bool) {
    println!("\n## PD pair selection (ns per select_pair, pools of n prefill + n decode: p50 / p99)");
    println!("{:<16} {:>16} {:>16} {:>16}", "policy", "2+2", "16+16", "256+256");
    let mut rng = StdRng::seed_from_u64(2);
    let texts: Vec<RequestView> = (0..1024)
        .map(|_| RequestView { text: RoutingText::Text(conversation(&mut rng, 64)), ..RequestView::default() })
        .collect();
    for kind in <PolicyKind as clap::ValueEnum>::value_variants() {
        let mut row = format!("{:<16}", format!("{kind:?}"));
        for n in [2usize, 16, 256] {
            let pool = |role: WorkerRole, host: usize| -> Vec<Arc<Worker>> {
                (0..n)
                    .map(|i| Arc::new(Worker::new(format!("http://10.{host}.0.{}:{}", i % 250, 8000 + i), role)))
                    .collect()
            };
            let (prefill, decode) =
                (pool(WorkerRole::Prefill { bootstrap_port: None }, 2), pool(WorkerRole::Decode, 3));
            let _guards: Vec<InFlightGuard> = (0..n * 2)
                .flat_map(|i| {
                    [InFlightGuard::new(prefill[(i * 7) % n].clone()), InFlightGuard::new(decode[(i * 5) % n].clone())]
                })
                .collect();
            let policy = build(&PolicyConfig::new(*kind, Some(7)));
            for t in texts.iter().cycle().take(if quick { 1024 } else { 4096 }) {
                let _ = policy.select_pair(&prefill, &decode, t);
            }
            let times = per_call_ns(if quick { 5_000 } else { 50_000 }, |i| {
                black_box(policy.select_pair(&prefill, &decode, &texts[i % texts.len()]).ok());
            });
            row.push_str(&p50_p99_cell(&times));
        }
        println!("{row}");
    }
}

fn bench_rls(quick: bool) {
    use switchyard::load::estimator::Rls;
    println!("\n## marginal_utility estimator (ns per RLS update, 4 features, best of 5)");
    let mut rng = StdRng::seed_from_u64(3);
    let samples: Vec<([f64; 4], f64)> = (0..4096)
        .map(|_| {
            let b: f64 = rng.random_range(1.0..128.0);
            let x = [1.0, b, b * rng.random_range(0.2..2.0), rng.random_range(0.0..4.0)];
            (x, 5.75 + 0.006 * x[1] + 0.054 * x[2] + 0.3 * x[3])
        })
        .collect();
    let mut rls = Rls::new([8.0, 0.02, 0.08, 0.3], [24.0, 0.06, 0.24, 0.9], 120.0);
    let iters = if quick { 20_000 } else { 200_000 };
    let ns = ns_per_op(5, iters, |i| {
        let (x, y) = &samples[i % samples.len()];
        rls.update(x, *y, i as f64 * 1e-3);
    });
    println!("rls update {ns:>10.0}");
    black_box(rls.theta());
}

fn bench_tree(quick: bool) {
    println!("\n## radix tree (text keys; 64 system prompts × multi-turn histories, 16 workers, bound 2^26)");
    println!(
        "{:>10} {:>12} {:>12} {:>14} {:>12} {:>14}",
        "prompts", "insert ns", "match ns", "stored chars", "MiB", "B per char"
    );
    let sizes: &[usize] = if quick { &[10_000, 100_000] } else { &[10_000, 100_000, 1_000_000] };
    for &n in sizes {
        let mut rng = StdRng::seed_from_u64(n as u64);
        let mut tree = RadixTree::<u8>::new(1 << 26);
        let prompts: Vec<String> = (0..4096).map(|_| conversation(&mut rng, 64)).collect();
        let mut inserting = std::time::Duration::ZERO;
        for i in 0..n {
            // Every stored prompt is a fresh conversation (generation not timed).
            let p = conversation(&mut rng, 64);
            let start = Instant::now();
            tree.insert(p.as_bytes(), (i % 16) as u32);
            inserting += start.elapsed();
        }
        let insert_ns = inserting.as_nanos() as f64 / n as f64;
        let match_ns = ns_per_op(5, 5_000, |i| {
            black_box(tree.match_prefix(prompts[i % prompts.len()].as_bytes()));
        });
        let bytes = tree.memory_bytes();
        let chars = tree.total_size();
        println!(
            "{n:>10} {insert_ns:>12.0} {match_ns:>12.0} {chars:>14} {:>12.1} {:>14.2}",
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / chars.max(1) as f64
        );
    }
}

/// Lock contention: threads each doing match-then-insert (what cache_aware does per request)
/// on one shared tree. Aggregate ops/s that stays flat as threads are added means the lock
/// serialises them; on a 2-core machine 2 threads is the meaningful point.
fn bench_contention(quick: bool) {
    println!("\n## shared tree contention (match + insert per op, aggregate)");
    println!("{:>8} {:>14} {:>14}", "threads", "ops/s", "ns/op/thread");
    let per_thread = if quick { 20_000 } else { 100_000 };
    for threads in [1usize, 2, 4] {
        let tree = Arc::new(SharedTree::<u8>::new(1 << 24));
        let start = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let tree = tree.clone();
                std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t as u64);
                    let prompts: Vec<String> = (0..1024).map(|_| conversation(&mut rng, 64)).collect();
                    for i in 0..per_thread {
                        let p = &prompts[i % prompts.len()];
                        black_box(tree.match_prefix(p.as_bytes()));
                        tree.insert(p.as_bytes(), (i % 16) as u32);
                    }
                })
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
        let secs = start.elapsed().as_secs_f64();
        let ops = (threads * per_thread) as f64;
        println!("{threads:>8} {:>14.0} {:>14.0}", ops / secs, secs * 1e9 / per_thread as f64);
    }
}

/// The router's cost with an exact cache view on a 100k-token prompt: tokenizing it (chat
/// template included), hashing its blocks and matching them against 16 workers' indexes, and
/// applying an engine's BlockStored for it. With a real tokenizer when one is at hand
/// (`SWITCHYARD_BENCH_TOKENIZER`, or the DeepSeek tokenizer.json `scripts/test.sh` extracts to
/// `target/parity/`), else the small byte-level fixture.
fn bench_exact_view(quick: bool) {
    use switchyard::kv_events::{cached_tokens, BlockBudget, WorkerBlocks};
    use switchyard_kv_events::{BlockHash, KvEvent};
    use switchyard_tokenize::PromptTokenizer;
    let dir = std::env::temp_dir().join(format!("switchyard-bench-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let real = std::env::var("SWITCHYARD_BENCH_TOKENIZER").ok().or_else(|| {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/parity/deepseek_tokenizer.json");
        std::path::Path::new(p).exists().then(|| p.to_owned())
    });
    // Turns between the model's own added tokens, as real templates write them (DeepSeek V3's
    // layout for its tokenizer; the fixture's only added token otherwise).
    let deepseek = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% else %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}";
    let fixture = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}";
    let template = if real.is_some() { deepseek } else { fixture };
    let which = match &real {
        Some(path) => {
            std::fs::copy(path, dir.join("tokenizer.json")).expect("copy tokenizer");
            std::fs::write(
                dir.join("tokenizer_config.json"),
                serde_json::json!({"bos_token": "<｜begin▁of▁sentence｜>", "chat_template": template}).to_string(),
            )
            .expect("config");
            "DeepSeek tokenizer.json"
        }
        None => {
            switchyard_tokenize::fixture::write_model_dir(&dir, Some(template)).expect("fixture");
            "byte-level fixture"
        }
    };
    let tok = PromptTokenizer::load(&dir).expect("tokenizer");
    // Every prompt encoded whole: what a prompt never seen before costs.
    let whole = PromptTokenizer::load(&dir).expect("tokenizer").with_segment_cache(0);
    // An engine's event storing `tokens` (whole 16-token blocks) from a sequence's start.
    let stored = |tokens: &[u32]| KvEvent::BlockStored {
        block_hashes: (0..tokens.len() as u64 / 16).map(|h| BlockHash(h + 1)).collect(),
        parent_block_hash: None,
        token_ids: tokens.to_vec(),
        block_size: 16,
        lora_id: None,
        medium: None,
    };
    let _ = std::fs::remove_dir_all(&dir);
    let mut rng = StdRng::seed_from_u64(9);
    let mut text = String::new();
    while tok.encode(&text, false).map_or(0, |t| t.len()) < 100_000 {
        for _ in 0..2_000 {
            text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
            text.push(' ');
        }
    }
    let ids = tok.encode(&text, false).expect("encode");
    let rounds = if quick { 2 } else { 5 };
    println!("\n## exact cache view on a {}-token prompt ({which}; best of {rounds})", ids.len());
    let encode = ns_per_op(rounds, 1, |_| {
        black_box(whole.encode(black_box(&text), false).ok());
    });
    let body =
        serde_json::json!({"messages": [{"role": "user", "content": "be brief"}, {"role": "user", "content": text}]})
            .to_string();
    let chat = ns_per_op(rounds, 1, |_| {
        black_box(whole.encode_chat_body(black_box(body.as_bytes())).ok());
    });
    // The same text as a 50-turn conversation; each request adds a user turn never seen before
    // to the turns the previous requests sent (their pieces cached).
    let words: Vec<&str> = text.split(' ').collect();
    let turns: Vec<serde_json::Value> = words
        .chunks(words.len().div_ceil(50))
        .enumerate()
        .map(
            |(i, w)| serde_json::json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": w.join(" ")}),
        )
        .collect();
    let bodies: Vec<String> = (0..rounds * 3)
        .map(|i| {
            let mut m = turns.clone();
            m.push(serde_json::json!({"role": "user", "content": format!("follow-up {i}: ").repeat(40)}));
            serde_json::json!({ "messages": m }).to_string()
        })
        .collect();
    black_box(tok.encode_chat_body(bodies[0].as_bytes()).ok());
    let next_turn = ns_per_op(rounds, 3, |i| {
        black_box(tok.encode_chat_body(black_box(bodies[i % bodies.len()].as_bytes())).ok());
    });
    assert_eq!(
        tok.encode_chat_body(bodies[1].as_bytes()).ok(),
        whole.encode_chat_body(bodies[1].as_bytes()).ok(),
        "cached pieces give the whole prompt's ids"
    );
    // 16 workers: one holds the whole prompt, the others its first quarter.
    let budget = Arc::new(BlockBudget::new(1 << 30));
    let workers: Vec<Arc<Worker>> = (0..16)
        .map(|i| {
            let w = Arc::new(Worker::new(format!("http://bench-{i}:1"), WorkerRole::Regular));
            let blocks = Arc::new(WorkerBlocks::new(budget.clone()));
            blocks.set_synced(true);
            let held = if i == 0 { ids.len() } else { ids.len() / 4 } / 16 * 16;
            blocks.apply(&[stored(&ids[..held])]);
            w.attach_kv_blocks(blocks);
            w
        })
        .collect();
    let matched = ns_per_op(rounds, 10, |_| {
        black_box(cached_tokens(
            black_box(&workers),
            black_box(&ids),
            &Default::default(),
            tokio::time::Instant::now(),
        ));
    });
    let full = ids.len() / 16 * 16;
    let store = ns_per_op(rounds, 1, |_| {
        let blocks = WorkerBlocks::new(budget.clone());
        blocks.apply(&[stored(&ids[..full])]);
        blocks.clear();
    });
    let per_1k = |ns: f64| ns / (ids.len() as f64 / 1000.0) / 1000.0;
    println!("{:<44} {:>10.2} ms  ({:.1} µs per 1k tokens)", "tokenize (raw prompt)", encode / 1e6, per_1k(encode));
    println!(
        "{:<44} {:>10.2} ms  ({:.1} µs per 1k tokens)",
        "tokenize (chat body: parse, template, encode)",
        chat / 1e6,
        per_1k(chat)
    );
    println!(
        "{:<44} {:>10.2} ms  (pieces cached: {})",
        "tokenize next turn of a 50-turn chat",
        next_turn / 1e6,
        tok.segment_cache_stats().is_some()
    );
    println!("{:<44} {:>10.2} ms", "hash blocks + match 16 workers' indexes", matched / 1e6);
    println!("{:<44} {:>10.2} ms", "apply one BlockStored of the whole prompt", store / 1e6);
    for (what, tokenize) in [("a prompt never seen", chat), ("a conversation's next turn", next_turn)] {
        let per_request = (tokenize + matched) / 1e9;
        println!(
            "router CPU per request, {what} (tokenize + match): {:.2} ms = {:.4} core per req/s (llm-d's picker: 0.35-0.5)",
            per_request * 1e3,
            per_request
        );
    }
}

/// A section of the run: its name on the command line, and the benchmark (`quick` or not).
type Section = (&'static str, fn(bool));

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let quick = args.iter().any(|a| a == "quick");
    // Section names after `--` run only those (`cargo bench --bench hot_paths -- quick pairs`).
    let only: Vec<&str> = args.iter().map(String::as_str).filter(|a| *a != "quick").collect();
    let sections: [Section; 6] = [
        ("exact", bench_exact_view),
        ("selection", bench_selection),
        ("pairs", bench_pairs),
        ("rls", bench_rls),
        ("tree", bench_tree),
        ("contention", bench_contention),
    ];
    for (name, run) in sections {
        if only.is_empty() || only.contains(&name) {
            run(quick);
        }
    }
}
