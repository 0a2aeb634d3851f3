//! Following one engine's event stream: sequence numbers decide whether a batch continues
//! the view, fills a gap (from the replay socket when there is one) or starts it over.
//!
//! - the next number: applied;
//! - a jump: the missing batches are asked from the replay socket; if it returns exactly
//!   them, they are applied in order, otherwise the view is cleared and rebuilt from here on
//!   (cold) — a view missing some events would claim blocks that are gone;
//! - a number at or below the last: the engine restarted (its numbering starts over), so
//!   the view is cleared;
//! - a new connection without a replay socket: the view is cleared too (what happened while
//!   disconnected is unknown); with one, the first message's number tells as above.
//!
//! The view is marked unusable while disconnected, so policies fall back to their estimate.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_kv_events::subscriber::{self, Published, SubscribeError, Subscription};
use switchyard_kv_events::EventBatch;

use super::blocks::WorkerBlocks;

/// Longest wait for a connection or a replay.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection backoff bounds.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(10));
/// Most batches one replay may return.
const MAX_REPLAY: u64 = 100_000;
/// Most bytes one replay may return (a larger gap is rebuilt cold instead).
const MAX_REPLAY_BYTES: usize = 64 << 20;

/// Where one worker's events come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The PUB socket (`tcp://host:port`).
    pub events: String,
    /// The replay (ROUTER) socket, when the engine serves one.
    pub replay: Option<String>,
}

/// Counters of one subscription (Prometheus and `/debug/kv_events`).
#[derive(Debug)]
pub struct SubscriptionStats {
    /// Connected now.
    pub connected: AtomicBool,
    /// Last sequence number applied (-1: none).
    pub last_seq: AtomicI64,
    /// Batches applied.
    pub batches: AtomicU64,
    /// Gaps repaired from the replay socket.
    pub gaps_replayed: AtomicU64,
    /// Gaps that cleared the view (no replay socket, or it could not fill them).
    pub gaps_cold: AtomicU64,
    /// Engine restarts seen (numbering started over).
    pub restarts: AtomicU64,
    /// Connections made after the first.
    pub reconnects: AtomicU64,
    /// Batches that did not decode (each clears the view).
    pub malformed: AtomicU64,
    /// Stored blocks whose parent was never seen.
    pub orphaned: AtomicU64,
}

impl Default for SubscriptionStats {
    fn default() -> Self {
        Self {
            connected: AtomicBool::new(false),
            last_seq: AtomicI64::new(-1),
            batches: AtomicU64::new(0),
            gaps_replayed: AtomicU64::new(0),
            gaps_cold: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            orphaned: AtomicU64::new(0),
        }
    }
}

/// Everything one subscription task needs.
#[derive(Debug, Clone)]
pub struct Follow {
    /// The worker's view.
    pub blocks: Arc<WorkerBlocks>,
    /// Its endpoints.
    pub endpoints: Endpoints,
    /// Topic prefix to subscribe to.
    pub topic: String,
    /// Only batches of this data-parallel rank (or of none) apply.
    pub dp_rank: Option<u32>,
    /// Largest message accepted, bytes.
    pub max_message: usize,
    /// Counters.
    pub stats: Arc<SubscriptionStats>,
}

/// Follows the worker's events until the task is aborted, reconnecting with backoff.
pub async fn run(f: Follow) {
    let mut backoff = BACKOFF.0;
    let mut last: Option<u64> = None;
    let mut connections = 0u64;
    loop {
        match Subscription::connect(&f.endpoints.events, &f.topic, f.max_message, CONNECT_TIMEOUT).await {
            Ok(mut sub) => {
                connections += 1;
                if connections > 1 {
                    f.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    if f.endpoints.replay.is_none() {
                        f.blocks.clear();
                        last = None;
                    }
                }
                f.stats.connected.store(true, Ordering::Relaxed);
                backoff = BACKOFF.0;
                let err = follow(&f, &mut sub, &mut last).await;
                tracing::warn!(endpoint = f.endpoints.events, error = %err, "kv events: subscription lost; reconnecting");
            }
            Err(e) => {
                tracing::debug!(endpoint = f.endpoints.events, error = %e, "kv events: cannot subscribe");
            }
        }
        f.stats.connected.store(false, Ordering::Relaxed);
        f.blocks.set_synced(false);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// Applies messages until the connection fails; returns why it did.
async fn follow(f: &Follow, sub: &mut Subscription, last: &mut Option<u64>) -> SubscribeError {
    loop {
        let msg = match sub.next().await {
            Ok(m) => m,
            Err(e) => return e,
        };
        match *last {
            None => f.blocks.clear(),
            Some(l) if msg.seq == l.wrapping_add(1) => {}
            Some(l) if msg.seq > l => {
                if repair(f, l + 1, msg.seq).await {
                    f.stats.gaps_replayed.fetch_add(1, Ordering::Relaxed);
                } else {
                    f.stats.gaps_cold.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        endpoint = f.endpoints.events,
                        from = l + 1,
                        to = msg.seq,
                        "kv events: gap not repaired; view rebuilt from now"
                    );
                    f.blocks.clear();
                }
            }
            Some(_) => {
                f.stats.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    endpoint = f.endpoints.events,
                    "kv events: sequence restarted (engine restart); view cleared"
                );
                f.blocks.clear();
            }
        }
        apply(f, &msg);
        *last = Some(msg.seq);
        f.blocks.set_synced(true);
    }
}

/// Fetches and applies batches `from..to` from the replay socket; false (nothing applied)
/// unless it returned exactly those.
async fn repair(f: &Follow, from: u64, to: u64) -> bool {
    let Some(endpoint) = &f.endpoints.replay else { return false };
    let wanted = to - from;
    if wanted > MAX_REPLAY {
        return false;
    }
    let limits = subscriber::ReplayLimits {
        messages: wanted as usize + 1,
        message_bytes: f.max_message,
        total_bytes: MAX_REPLAY_BYTES,
    };
    let batches = match subscriber::replay(endpoint, from, limits, CONNECT_TIMEOUT).await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(endpoint, error = %e, "kv events: replay failed");
            return false;
        }
    };
    let missing: Vec<&Published> = batches.iter().filter(|b| b.seq >= from && b.seq < to).collect();
    let exact = missing.len() as u64 == wanted && missing.iter().zip(from..).all(|(b, s)| b.seq == s);
    if exact {
        for b in missing {
            apply(f, b);
        }
    }
    exact
}

/// Applies one batch, then publishes its sequence number: a reader that sees `last_seq` at `n`
/// (Acquire) also sees every block change up to batch `n`.
fn apply(f: &Follow, msg: &Published) {
    match EventBatch::decode(&msg.payload) {
        Ok(batch) => {
            let other_rank = matches!((batch.data_parallel_rank, f.dp_rank), (Some(b), Some(w)) if b != i64::from(w));
            if !other_rank {
                let done = f.blocks.apply(&batch.events);
                f.stats.orphaned.fetch_add(done.orphaned as u64, Ordering::Relaxed);
            }
            f.stats.batches.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            // A batch that cannot be read is a hole in the view nothing will fill.
            f.stats.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(endpoint = f.endpoints.events, error = %e, "kv events: malformed batch; view rebuilt from now");
            f.blocks.clear();
        }
    }
    f.stats.last_seq.store(msg.seq as i64, Ordering::Release);
}
