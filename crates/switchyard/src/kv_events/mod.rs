//! The engines' real cache state, from their KV events (`--kv-events-endpoint`).
//!
//! Each worker with an event endpoint gets a subscription ([`sync`]) that keeps its
//! [`WorkerBlocks`] — the blocks its engine holds, keyed by the router's hash of their tokens —
//! and attaches it to the [`Worker`]. Policies read it through [`cached_tokens`]: exact for
//! workers whose view is synced, their own estimate (the prefix tree) for the others.

mod blocks;
mod sync;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

pub use blocks::{
    block_hashes, cached_tokens, prompt_block_hashes, Applied, BlockBudget, PromptHashes, WorkerBlocks, BYTES_PER_BLOCK,
};
pub use sync::{Endpoints, SubscriptionStats};

use crate::request::{RequestView, RoutingText};
use crate::workers::{Membership, Worker};

/// A prefix-aware policy's per-worker match (`tree`, in its units, possibly empty) with the
/// exact cached tokens put in for every worker whose event view is synced. Exact only for
/// requests that carry token ids (the units of the token tree), else `tree` unchanged.
pub fn overlay_exact(mut tree: Vec<usize>, workers: &[Arc<Worker>], request: &RequestView) -> Vec<usize> {
    let RoutingText::Tokens(tokens) = &request.text else { return tree };
    let Some(exact) = cached_tokens(workers, tokens, &request.block_hashes, request.now.unwrap_or_else(Instant::now))
    else {
        return tree;
    };
    tree.resize(workers.len(), 0);
    for (m, e) in tree.iter_mut().zip(exact) {
        if let Some(e) = e {
            *m = e as usize;
        }
    }
    tree
}

/// Marks `request`'s prompt as being cached on `worker` (pending until its engine stores it),
/// when the request carries token ids and the worker's event view is synced. Times are the
/// request's (`RequestView::now`: virtual in the simulation).
pub fn note_routed(worker: &Worker, request: &RequestView) {
    let RoutingText::Tokens(tokens) = &request.text else { return };
    let Some(blocks) = worker.kv_blocks().filter(|b| b.is_synced()) else { return };
    let size = blocks.block_size();
    if size > 0 && tokens.len() >= 2 {
        blocks.note_routed(&request.block_hashes.get(tokens, size), request.now.unwrap_or_else(Instant::now));
    }
}

/// Largest event batch accepted from an engine, bytes. One engine step's batch holds the
/// blocks it stored (at most a prefill chunk's tokens per running prompt, a few bytes each) and
/// removed: far below this. Decoding keeps integer arrays (token ids, hashes) at 8 bytes an
/// element and anything else at 32, so this also bounds what a broken or hostile publisher can
/// make the router allocate (64 MiB for integers, 256 MiB at worst).
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Where workers publish their events, and the index's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventsConfig {
    /// Endpoints of workers given by URL (normalised), in flag order.
    pub by_url: Vec<(String, Endpoints)>,
    /// For any other worker: endpoint templates with `{host}` (the worker's host).
    pub template: Option<Endpoints>,
    /// Topic prefix to subscribe to (empty: every topic).
    pub topic: String,
    /// Memory bound of the block index over all workers, bytes.
    pub max_index_bytes: usize,
    /// Largest event message accepted, bytes.
    pub max_message_bytes: usize,
}

impl Default for KvEventsConfig {
    /// No endpoints (workers that name their own, from discovery, are still followed).
    fn default() -> Self {
        Self {
            by_url: Vec::new(),
            template: None,
            topic: String::new(),
            max_index_bytes: 64 << 20,
            max_message_bytes: MAX_MESSAGE_BYTES,
        }
    }
}

impl KvEventsConfig {
    /// Where `worker` publishes, if known.
    pub fn endpoints_for(&self, worker: &Worker) -> Option<Endpoints> {
        if let Some(e) = worker.kv_events() {
            return Some(e.clone());
        }
        if let Some((_, e)) = self.by_url.iter().find(|(u, _)| u == worker.url()) {
            return Some(e.clone());
        }
        let t = self.template.as_ref()?;
        let uri: axum::http::Uri = worker.url().parse().ok()?;
        let host = uri.host()?;
        Some(Endpoints {
            events: t.events.replace("{host}", host),
            replay: t.replay.as_ref().map(|r| r.replace("{host}", host)),
        })
    }
}

/// A per-worker Prometheus family: name, type, help, and its value for one subscription.
type Family = (&'static str, &'static str, &'static str, fn(&Subscription) -> u64);

/// `tcp://host:PORT` with PORT + `by` (unchanged when it has no port to offset).
fn offset_port(endpoint: &str, by: u32) -> String {
    match endpoint.rsplit_once(':') {
        Some((head, port)) => match port.parse::<u32>() {
            Ok(p) if p + by <= u32::from(u16::MAX) => format!("{head}:{}", p + by),
            _ => endpoint.to_owned(),
        },
        None => endpoint.to_owned(),
    }
}

#[derive(Debug)]
struct Subscription {
    url: String,
    blocks: Arc<WorkerBlocks>,
    stats: Arc<SubscriptionStats>,
    endpoints: Endpoints,
    task: tokio::task::JoinHandle<()>,
}

/// Every worker's subscription; follows the registry's membership.
#[derive(Debug)]
pub struct KvEvents {
    config: KvEventsConfig,
    budget: Arc<BlockBudget>,
    subs: Mutex<HashMap<u32, Subscription>>,
}

impl Drop for KvEvents {
    fn drop(&mut self) {
        self.stop();
    }
}

impl KvEvents {
    /// No subscriptions yet; they start as workers join ([`KvEvents::on_membership`]).
    pub fn new(config: KvEventsConfig) -> Self {
        Self { budget: Arc::new(BlockBudget::new(config.max_index_bytes)), config, subs: Mutex::new(HashMap::new()) }
    }

    /// A worker joined (subscribe, when it publishes) or left (unsubscribe, free its blocks).
    pub fn on_membership(&self, change: &Membership<'_>) {
        match change {
            Membership::Added(w) => self.subscribe(w),
            Membership::Removed(w) => {
                if let Some(s) = self.subs.lock().ok().and_then(|mut s| s.remove(&w.id())) {
                    s.task.abort();
                    s.blocks.clear();
                }
            }
        }
    }

    fn subscribe(&self, worker: &Arc<Worker>) {
        let Some(mut endpoints) = self.config.endpoints_for(worker) else { return };
        // Data-parallel engines publish each rank on the endpoint's port + rank (vLLM,
        // TensorRT-LLM); the rank's batches carry the rank too, which is checked.
        if let Some(rank) = worker.dp_rank().map(|d| d.rank).filter(|r| *r > 0) {
            endpoints.events = offset_port(&endpoints.events, rank);
            endpoints.replay = endpoints.replay.map(|r| offset_port(&r, rank));
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(worker = worker.url(), "kv events: no runtime to subscribe on");
            return;
        };
        let blocks = Arc::new(WorkerBlocks::new(self.budget.clone()));
        worker.attach_kv_blocks(blocks.clone());
        let stats = Arc::new(SubscriptionStats::default());
        let follow = sync::Follow {
            blocks: blocks.clone(),
            endpoints: endpoints.clone(),
            topic: self.config.topic.clone(),
            dp_rank: worker.dp_rank().map(|d| d.rank),
            max_message: self.config.max_message_bytes,
            stats: stats.clone(),
        };
        tracing::info!(worker = worker.url(), endpoint = endpoints.events, replay = ?endpoints.replay, "kv events: subscribing");
        let task = runtime.spawn(sync::run(follow));
        let sub = Subscription { url: worker.url().to_owned(), blocks, stats, endpoints, task };
        if let Ok(mut subs) = self.subs.lock() {
            if let Some(old) = subs.insert(worker.id(), sub) {
                old.task.abort();
            }
        }
    }

    /// Ends every subscription.
    pub fn stop(&self) {
        if let Ok(subs) = self.subs.lock() {
            for s in subs.values() {
                s.task.abort();
            }
        }
    }

    /// Appends the subscriptions' Prometheus families.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let Ok(subs) = self.subs.lock() else { return };
        let mut subs: Vec<&Subscription> = subs.values().collect();
        subs.sort_by(|a, b| a.url.cmp(&b.url));
        let families: [Family; 9] = [
            (
                "switchyard_kv_events_connected",
                "gauge",
                "Whether the worker's KV event subscription is connected.",
                |s| u64::from(s.stats.connected.load(Ordering::Relaxed)),
            ),
            (
                "switchyard_kv_events_synced",
                "gauge",
                "Whether policies use the worker's event view (else their estimate).",
                |s| u64::from(s.blocks.is_synced()),
            ),
            ("switchyard_kv_events_blocks", "gauge", "Blocks the worker's engine holds, per its events.", |s| {
                s.blocks.blocks() as u64
            }),
            (
                "switchyard_kv_events_pending_blocks",
                "gauge",
                "Blocks routed to the worker that its engine has not reported stored yet.",
                |s| s.blocks.pending_blocks() as u64,
            ),
            ("switchyard_kv_events_batches_total", "counter", "Event batches applied.", |s| {
                s.stats.batches.load(Ordering::Relaxed)
            }),
            (
                "switchyard_kv_events_gaps_replayed_total",
                "counter",
                "Sequence gaps repaired from the replay socket.",
                |s| s.stats.gaps_replayed.load(Ordering::Relaxed),
            ),
            (
                "switchyard_kv_events_gaps_cold_total",
                "counter",
                "Sequence gaps (or unreadable batches) that cleared the view.",
                |s| s.stats.gaps_cold.load(Ordering::Relaxed) + s.stats.malformed.load(Ordering::Relaxed),
            ),
            (
                "switchyard_kv_events_restarts_total",
                "counter",
                "Engine restarts seen (sequence numbers started over).",
                |s| s.stats.restarts.load(Ordering::Relaxed),
            ),
            (
                "switchyard_kv_events_orphan_blocks_total",
                "counter",
                "Stored blocks whose parent was never seen (not indexed).",
                |s| s.stats.orphaned.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for s in &subs {
                let _ = writeln!(out, "{name}{{worker=\"{}\"}} {}", s.url, value(s));
            }
        }
        let b = &self.budget;
        let _ = writeln!(
            out,
            "# HELP switchyard_kv_index_blocks Blocks indexed from KV events over all workers.\n\
             # TYPE switchyard_kv_index_blocks gauge\nswitchyard_kv_index_blocks {}\n\
             # HELP switchyard_kv_index_max_blocks The block index's bound (--kv-index-max-mb / {BYTES_PER_BLOCK} bytes per block).\n\
             # TYPE switchyard_kv_index_max_blocks gauge\nswitchyard_kv_index_max_blocks {}\n\
             # HELP switchyard_kv_index_refused_blocks_total Stored blocks not indexed because the bound was reached.\n\
             # TYPE switchyard_kv_index_refused_blocks_total counter\nswitchyard_kv_index_refused_blocks_total {}",
            b.used_blocks(),
            b.max_blocks(),
            b.refused_blocks()
        );
    }

    /// Each subscription's state (`GET /debug/kv_events`).
    pub fn report(&self) -> serde_json::Value {
        let Ok(subs) = self.subs.lock() else { return serde_json::Value::Null };
        let mut workers: Vec<serde_json::Value> = subs
            .values()
            .map(|s| {
                let st = &s.stats;
                // Read first: every field below then reflects at least the batches up to it.
                let last_seq = st.last_seq.load(Ordering::Acquire);
                serde_json::json!({
                    "worker": s.url,
                    "endpoint": s.endpoints.events,
                    "replay_endpoint": s.endpoints.replay,
                    "connected": st.connected.load(Ordering::Relaxed),
                    "synced": s.blocks.is_synced(),
                    "blocks": s.blocks.blocks(),
                    "pending_blocks": s.blocks.pending_blocks(),
                    "block_size": s.blocks.block_size(),
                    "last_seq": last_seq,
                    "batches": st.batches.load(Ordering::Relaxed),
                    "gaps_replayed": st.gaps_replayed.load(Ordering::Relaxed),
                    "gaps_cold": st.gaps_cold.load(Ordering::Relaxed),
                    "restarts": st.restarts.load(Ordering::Relaxed),
                    "reconnects": st.reconnects.load(Ordering::Relaxed),
                    "malformed": st.malformed.load(Ordering::Relaxed),
                    "orphan_blocks": st.orphaned.load(Ordering::Relaxed),
                })
            })
            .collect();
        workers.sort_by(|a, b| a["worker"].as_str().cmp(&b["worker"].as_str()));
        serde_json::json!({
            "index": {
                "blocks": self.budget.used_blocks(),
                "max_blocks": self.budget.max_blocks(),
                "refused_blocks": self.budget.refused_blocks(),
            },
            "workers": workers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_parallel_ranks_publish_on_consecutive_ports() {
        assert_eq!(offset_port("tcp://10.0.0.1:5557", 3), "tcp://10.0.0.1:5560");
        assert_eq!(offset_port("tcp://[::1]:5557", 1), "tcp://[::1]:5558");
        assert_eq!(offset_port("tcp://h:65535", 1), "tcp://h:65535");
    }
}
