//! What is measured about each worker. Policies only read these numbers.
//!
//! The in-flight count is kept by [`InFlightGuard`]s: one is taken when a policy picks a
//! worker (so concurrent selections see each other and don't herd onto the same idle worker)
//! and it lives inside the response body, so it is released exactly when the response ends
//! — completed, failed, or abandoned by the client. No error path can leak a count.
//!
//! The same guards keep each worker's running integrals (decoding batch, context, queued
//! prefill), so every finished request carries the load it saw ([`RequestOutcome`]), and the
//! [`estimator`]s learn each worker's performance model from that stream.

pub mod estimator;
mod inflight;
mod usage;

use std::sync::atomic::{AtomicUsize, Ordering};

pub use inflight::{
    DecodeWindow, DispatchInfo, FirstTokenOutcome, InFlightGuard, LoadSnapshot, ReportedLoad, RequestOutcome,
    WorkerLoad,
};
pub use usage::Usage;

/// Tokens per character when a prompt arrives as text: the usual ~4 characters per token
/// of BPE tokenizers on English (and the simulator's tokenizer).
pub const CHARS_PER_TOKEN: usize = 4;

static WAITERS: AtomicUsize = AtomicUsize::new(0);
static FREED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Wakes requests held in the router for capacity (cheap when none is held).
pub(crate) fn capacity_freed() {
    if WAITERS.load(Ordering::Relaxed) > 0 {
        FREED.notify_waiters();
    }
}

/// Waits until some in-flight request ends anywhere, or `timeout` passes.
pub async fn wait_for_capacity(timeout: std::time::Duration) {
    WAITERS.fetch_add(1, Ordering::Relaxed);
    let _ = tokio::time::timeout(timeout, FREED.notified()).await;
    WAITERS.fetch_sub(1, Ordering::Relaxed);
}
