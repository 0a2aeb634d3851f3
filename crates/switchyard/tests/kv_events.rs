//! Engine KV events end to end: the router's subscription against a publisher driven by hand
//! (sequence gaps repaired by replay, gaps without replay rebuilt cold, engine restarts
//! cleared, removals applied), and against simulated workers publishing from their real block
//! cache, where the routing audit's predictions equal what the workers then report.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::kv_events::{Endpoints, KvEventsConfig};
use switchyard::policies::PolicyKind;
use switchyard_kv_events::publisher::Publisher;
use switchyard_kv_events::{BlockHash, EventBatch, KvEvent};
use switchyard_sim::model::Profile;
use switchyard_sim::server::{spawn_worker, WorkerConfig};

const LIMIT: Duration = Duration::from_secs(10);

fn stored(hashes: &[u64], parent: Option<u64>, first_token: u32) -> KvEvent {
    KvEvent::BlockStored {
        block_hashes: hashes.iter().map(|h| BlockHash(*h)).collect(),
        parent_block_hash: parent.map(BlockHash),
        token_ids: (first_token..first_token + 16 * hashes.len() as u32).collect(),
        block_size: 16,
        lora_id: None,
        medium: Some("GPU".into()),
    }
}

fn batch(events: Vec<KvEvent>) -> Vec<u8> {
    EventBatch { ts: 0.0, events, data_parallel_rank: None }.encode()
}

fn kv_config(workers: Vec<(String, Endpoints)>) -> KvEventsConfig {
    KvEventsConfig {
        by_url: workers,
        template: None,
        topic: String::new(),
        max_index_bytes: 1 << 20,
        max_message_bytes: 1 << 20,
    }
}

/// The router's view of `worker` in `/debug/kv_events`.
async fn view(router: &str, worker: &str) -> Value {
    let report = get(&format!("{router}/debug/kv_events")).await.json();
    report["workers"].as_array().unwrap().iter().find(|w| w["worker"] == worker).cloned().unwrap_or(Value::Null)
}

async fn wait_for(router: &str, worker: &str, what: &str, check: impl Fn(&Value) -> bool) {
    eventually(LIMIT, what, || async { check(&view(router, worker).await) }).await;
}

/// Waits until the router has subscribed (the publisher saw its subscription), so nothing
/// published from now on is lost.
async fn subscribed(p: &Publisher, n: usize) {
    eventually(LIMIT, "subscription", || async { p.subscribed() >= n }).await;
}

#[tokio::test]
async fn gaps_are_replayed_or_rebuilt_and_restarts_clear_the_view() {
    let w1 = mock_worker().await;
    let w2 = mock_worker().await;
    let with_replay = Publisher::bind("127.0.0.1:0", Some("127.0.0.1:0"), "", 100).await.unwrap();
    let without = Publisher::bind("127.0.0.1:0", None, "", 100).await.unwrap();
    let endpoints = |p: &Publisher| Endpoints {
        events: format!("tcp://{}", p.pub_addr()),
        replay: p.replay_addr().map(|a| format!("tcp://{a}")),
    };
    let mut cfg = config(vec![w1.url(), w2.url()], PolicyKind::CacheAware);
    cfg.kv_events = Some(kv_config(vec![(w1.url(), endpoints(&with_replay)), (w2.url(), endpoints(&without))]));
    let r = router(cfg).await;
    let url = r.url();
    subscribed(&with_replay, 1).await;
    subscribed(&without, 1).await;

    // Worker 1: seq 0 stores A (2 blocks); seq 1 (B, 1 block) is lost on the live stream; seq 2
    // removes A's second block. The gap is filled from the replay socket, in order.
    with_replay.publish(batch(vec![stored(&[1, 2], None, 0)]));
    wait_for(&url, &w1.url(), "seq 0 applied", |v| v["last_seq"] == 0 && v["blocks"] == 2).await;
    let seq = with_replay.next_seq();
    with_replay.publish_as(seq, batch(vec![stored(&[3], None, 1000)]), false);
    with_replay.publish_as(
        seq + 1,
        batch(vec![KvEvent::BlockRemoved { block_hashes: vec![BlockHash(2)], medium: None }]),
        true,
    );
    wait_for(&url, &w1.url(), "gap replayed", |v| v["last_seq"] == 2).await;
    let v = view(&url, &w1.url()).await;
    assert_eq!((v["gaps_replayed"].as_u64(), v["gaps_cold"].as_u64()), (Some(1), Some(0)), "{v}");
    assert_eq!(v["blocks"], 2, "A's first block and B: {v}");
    assert_eq!(v["synced"], true);

    // Worker 2, no replay socket: the same gap clears the view, rebuilt from what follows.
    without.publish(batch(vec![stored(&[1, 2], None, 0)]));
    wait_for(&url, &w2.url(), "seq 0 applied", |v| v["blocks"] == 2).await;
    without.publish_as(1, batch(vec![stored(&[3], None, 1000)]), false);
    without.publish_as(2, batch(vec![stored(&[4], None, 2000)]), true);
    wait_for(&url, &w2.url(), "gap seen", |v| v["last_seq"] == 2).await;
    let v = view(&url, &w2.url()).await;
    assert_eq!((v["gaps_cold"].as_u64(), v["blocks"].as_u64()), (Some(1), Some(1)), "{v}");

    // Worker 1's engine restarts: numbering starts over and the view is cleared.
    with_replay.restart();
    with_replay.publish(batch(vec![stored(&[9], None, 5000)]));
    wait_for(&url, &w1.url(), "restart seen", |v| v["restarts"] == 1 && v["last_seq"] == 0).await;
    let v = view(&url, &w1.url()).await;
    assert_eq!((v["blocks"].as_u64(), v["last_seq"].as_i64()), (Some(1), Some(0)), "{v}");

    // A batch that is not msgpack clears the view too (counted, never a panic).
    with_replay.publish(b"\xc1 not msgpack".to_vec());
    wait_for(&url, &w1.url(), "malformed seen", |v| v["malformed"] == 1 && v["last_seq"] == 1).await;
    assert_eq!(view(&url, &w1.url()).await["blocks"], 0);

    let metrics = String::from_utf8_lossy(&get(&format!("{url}/metrics")).await.body).into_owned();
    for family in [
        "switchyard_kv_events_gaps_replayed_total{worker=",
        "switchyard_kv_events_restarts_total{worker=",
        "switchyard_kv_index_max_blocks ",
    ] {
        assert!(metrics.contains(family), "{family} missing");
    }
    r.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_exact_view_overrides_the_trees_guess() {
    use std::sync::atomic::Ordering::SeqCst;
    let ws = [mock_worker().await, mock_worker().await];
    let ps = [
        Publisher::bind("127.0.0.1:0", None, "", 0).await.unwrap(),
        Publisher::bind("127.0.0.1:0", None, "", 0).await.unwrap(),
    ];
    let ep = |p: &Publisher| Endpoints { events: format!("tcp://{}", p.pub_addr()), replay: None };
    let mut cfg = config(vec![ws[0].url(), ws[1].url()], PolicyKind::CacheAware);
    cfg.kv_events = Some(kv_config(vec![(ws[0].url(), ep(&ps[0])), (ws[1].url(), ep(&ps[1]))]));
    let r = router(cfg).await;
    let url = r.url();
    let ask = |tail: u32| {
        let mut ids: Vec<u32> = (0..170).collect();
        ids.push(10_000 + tail);
        json!({"input_ids": ids, "sampling_params": {"max_new_tokens": 1}})
    };
    // Before any event the tree decides, and records the prompt on the worker it chose.
    assert_eq!(post(&format!("{url}/generate"), &ask(0)).await.status, 200);
    let first = if ws[0].received.load(SeqCst) == 1 { 0 } else { 1 };
    let other = 1 - first;
    // Now the events say the *other* worker's engine holds the prompt's blocks (the first one
    // evicted it, or another router sent it there), and the first holds nothing.
    for p in &ps {
        subscribed(p, 1).await;
    }
    ps[first].publish(batch(vec![]));
    ps[other].publish(batch(vec![stored(&(100..110).collect::<Vec<_>>(), None, 0)]));
    wait_for(&url, &ws[other].url(), "blocks stored", |v| v["blocks"] == 10 && v["synced"] == true).await;
    wait_for(&url, &ws[first].url(), "synced", |v| v["synced"] == true).await;
    for i in 1..4 {
        assert_eq!(post(&format!("{url}/generate"), &ask(i)).await.status, 200);
    }
    assert_eq!(ws[other].received.load(SeqCst), 3, "the engine's real cache wins over the tree's record");
    assert_eq!(ws[first].received.load(SeqCst), 1);
    // A longer prompt goes where its first 10 blocks are; its next 2 full blocks are pending
    // there (counted as cached) until the engine reports them stored.
    let longer: Vec<u32> = (0..200).collect();
    let body = json!({"input_ids": longer, "sampling_params": {"max_new_tokens": 1}});
    assert_eq!(post(&format!("{url}/generate"), &body).await.status, 200);
    assert_eq!(ws[other].received.load(SeqCst), 4);
    let v = view(&url, &ws[other].url()).await;
    assert_eq!((v["blocks"].as_u64(), v["pending_blocks"].as_u64()), (Some(10), Some(2)), "{v}");
    ps[other].publish(batch(vec![stored(&[110, 111], Some(109), 160)]));
    wait_for(&url, &ws[other].url(), "pending blocks stored", |v| v["blocks"] == 12 && v["pending_blocks"] == 0).await;
    let metrics = String::from_utf8_lossy(&get(&format!("{url}/metrics")).await.body).into_owned();
    assert!(metrics.contains("switchyard_kv_events_pending_blocks{worker="), "pending gauge missing");
    r.shutdown().await.unwrap();
}

/// How a run of [`audit_run`] is set up.
#[derive(Clone, Copy)]
struct Setup<'a> {
    /// The router subscribes to the workers' events.
    events: bool,
    /// The model directory workers (and, with `router_tokenizes`, the router) tokenize with.
    tokenizer: Option<&'a std::path::Path>,
    router_tokenizes: bool,
    /// Chat requests (text) rather than `/generate` with token ids.
    chat: bool,
}

/// Two simulated workers with small caches that evict, publishing events; 36 requests from six
/// prefix groups (more than the two caches hold), one at a time, each sent once the router has
/// applied every batch the workers published (with events). Returns (audited, wrong, hits).
async fn audit_run(s: Setup<'_>) -> (u64, u64, u64) {
    let profile = Profile { kv_capacity_tokens: 3_000, ..Profile::default() };
    let mut ws = Vec::new();
    for seed in 0..2 {
        let c = WorkerConfig {
            time_scale: 200.0,
            seed,
            profile: profile.clone(),
            kv_events_port: Some(0),
            kv_events_replay_port: Some(0),
            tokenizer_path: s.tokenizer.map(|p| p.display().to_string()),
            ..WorkerConfig::default()
        };
        ws.push(spawn_worker(c).await.unwrap());
    }
    let mut cfg = config(ws.iter().map(|w| w.url()).collect(), PolicyKind::CacheAware);
    if s.router_tokenizes {
        cfg.tokenizer_path = s.tokenizer.map(std::path::Path::to_path_buf);
    }
    if s.events {
        cfg.kv_events = Some(kv_config(
            ws.iter()
                .map(|w| {
                    let e =
                        Endpoints { events: w.kv_events_endpoint().unwrap(), replay: w.kv_events_replay_endpoint() };
                    (w.url(), e)
                })
                .collect(),
        ));
    }
    let r = router(cfg).await;
    let url = r.url();
    if s.events {
        for w in &ws {
            let wurl = w.url();
            wait_for(&url, &wurl, "connected", |v| v["connected"] == true).await;
        }
    }
    for i in 0..36u32 {
        let group = (i * 7) % 6;
        let (path, body) = if s.chat {
            let system = format!("{group} You are assistant number {group}. ").repeat(20);
            let body = json!({"model": "m", "max_tokens": 2, "ignore_eos": true,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": format!("question {i}")}]});
            ("/v1/chat/completions", body)
        } else {
            let mut ids: Vec<u32> = (0..640).map(|t| group * 100_000 + t).collect();
            ids.extend([900_000 + i, 900_001 + i]);
            ("/generate", json!({"input_ids": ids, "sampling_params": {"max_new_tokens": 2, "ignore_eos": true}}))
        };
        assert_eq!(post(&format!("{url}{path}"), &body).await.status, 200);
        if s.events {
            // Every batch published so far applied before the next decision.
            for w in &ws {
                let (wurl, published) = (w.url(), w.kv_events_published() as i64);
                wait_for(&url, &wurl, "batches applied", |v| v["last_seq"].as_i64() == Some(published - 1)).await;
            }
        }
    }
    let audit = get(&format!("{url}/debug/routing")).await.json();
    let recent = audit["recent"].as_array().unwrap();
    let wrong = recent.iter().filter(|d| d["error"] != 0).count() as u64;
    let hits = recent.iter().filter(|d| d["reported_cached"].as_u64() > Some(0)).count() as u64;
    r.shutdown().await.unwrap();
    (recent.len() as u64, wrong, hits)
}

#[tokio::test]
async fn with_events_the_audit_finds_every_prediction_exact() {
    let setup = Setup { events: true, tokenizer: None, router_tokenizes: false, chat: false };
    let (audited, wrong, hits) = audit_run(setup).await;
    assert_eq!(audited, 36);
    assert_eq!(wrong, 0, "with events every prediction equals what the worker reported");
    assert!(hits > 0, "the workload has cache hits to predict");
    let (audited, wrong, _) = audit_run(Setup { events: false, ..setup }).await;
    assert_eq!(audited, 36);
    assert!(wrong > 0, "the tree cannot see evictions: its predictions must miss some");
}

/// Chat requests (text): the engines render the model's chat template and tokenize; the
/// router does the same with `--tokenizer-path`, so the events' blocks match its token ids and
/// every prediction is exact. Without the router's tokenizer the same events cannot be used
/// (the router has only text), and the tree's guess shows.
#[tokio::test]
async fn chat_requests_tokenized_like_the_engine_get_exact_predictions() {
    const TEMPLATE: &str = "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";
    let dir = std::env::temp_dir().join(format!("switchyard-kv-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    switchyard_tokenize::fixture::write_model_dir(&dir, Some(TEMPLATE)).unwrap();
    let setup = Setup { events: true, tokenizer: Some(&dir), router_tokenizes: true, chat: true };
    let (audited, wrong, hits) = audit_run(setup).await;
    let (_, wrong_without, _) = audit_run(Setup { router_tokenizes: false, ..setup }).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(audited, 36);
    assert!(hits > 0, "the chat workload has cache hits to predict");
    assert_eq!(wrong, 0, "the router's token ids are the engine's: every prediction exact");
    assert!(wrong_without > 0, "without the tokenizer the router guesses from text");
}

/// A conversation's turns are tokenized once: the router remembers the pieces between the
/// template's added tokens, and the ids of the next turn's prompt are still those of the
/// whole prompt encoded from scratch.
#[tokio::test]
async fn earlier_turns_come_from_the_tokenizer_cache_with_the_same_ids() {
    const TEMPLATE: &str = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}";
    let dir = std::env::temp_dir().join(format!("switchyard-tokenize-turns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    switchyard_tokenize::fixture::write_model_dir(&dir, Some(TEMPLATE)).unwrap();
    let w = mock_worker().await;
    let mut cfg = config(vec![w.url()], PolicyKind::CacheAware);
    cfg.tokenizer_path = Some(dir.clone());
    let r = router(cfg).await;
    let whole = switchyard_tokenize::PromptTokenizer::load(&dir).unwrap().with_segment_cache(0);
    let mut messages = Vec::new();
    let mut hits = Vec::new();
    for turn in 0..4 {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": format!("turn {turn}: a message long enough to be remembered, ünïcödé included. ")}));
        let body = json!({ "messages": messages });
        let a = post(&format!("{}/tokenize", r.url()), &body).await;
        assert_eq!(a.status, 200);
        let want = whole.encode_chat_body(body.to_string().as_bytes()).unwrap();
        assert_eq!(a.json()["tokens"], json!(want), "turn {turn}");
        let metrics = send("GET", &format!("{}/metrics", r.url()), &[], "").await;
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix("switchyard_tokenizer_cache_hits_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .expect("the piece cache's hits in /metrics");
        hits.push(value);
    }
    r.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    // Turn k repeats k earlier messages: hits grow by k (plus probes' none: they are uncached).
    assert_eq!(hits, vec![0, 1, 3, 6], "hits after each turn");
}

/// `POST /tokenize`: the ids the router routes on; clear errors without a tokenizer or with a
/// body it cannot tokenize.
#[tokio::test]
async fn tokenize_answers_ids_or_a_clear_error() {
    let w = mock_worker().await;
    let plain = router(config(vec![w.url()], PolicyKind::CacheAware)).await;
    let a = post(&format!("{}/tokenize", plain.url()), &json!({"prompt": "hi"})).await;
    assert_eq!(a.status, 404);
    assert!(a.json()["error"]["message"].as_str().unwrap_or_default().contains("tokenizer"), "{:?}", a.json());
    plain.shutdown().await.unwrap();

    let dir = std::env::temp_dir().join(format!("switchyard-tokenize-endpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    switchyard_tokenize::fixture::write_model_dir(&dir, Some("{% for m in messages %}{{ m['content'] }}{% endfor %}"))
        .unwrap();
    let mut cfg = config(vec![w.url()], PolicyKind::CacheAware);
    cfg.tokenizer_path = Some(dir.clone());
    let r = router(cfg).await;
    let url = r.url();
    let a = post(&format!("{url}/tokenize"), &json!({"prompt": "hi"})).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["tokens"], json!([257]), "the fixture's hi merge");
    let a = post(&format!("{url}/tokenize"), &json!({"messages": [{"role": "user", "content": "hi!"}]})).await;
    assert_eq!(a.json()["tokens"], json!([257, u32::from(b'!') + 1]));
    let a = post(&format!("{url}/tokenize"), &json!({"prompt": 5})).await;
    assert_eq!(a.status, 400);
    let a = send("POST", &format!("{url}/tokenize"), &[("content-type", "application/json")], "{oops").await;
    assert_eq!(a.status, 400);
    r.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
