//! What is measured about each worker. Policies only read these numbers.
//!
//! The in-flight count is kept by [`InFlightGuard`]s: one is taken when a policy picks a
//! worker (so concurrent selections see each other and don't herd onto the same idle worker)
//! and it lives inside the response body, so it is released exactly when the response ends
//! — completed, failed, or abandoned by the client. No error path can leak a count, and the
//! guard itself reports the ending to whoever registered on it ([`GuardObserver`]).
//!
//! The same guards keep each worker's running integrals (decoding batch, context, queued
//! prefill), so every finished request carries the load it saw ([`RequestOutcome`]), and the
//! [`estimator`]s learn each worker's performance model from that stream.

pub mod estimator;
mod inflight;
pub(crate) mod sent_prefill;
mod usage;
pub(crate) mod wait_trend;

pub use inflight::{
    DecodeWindow, DispatchInfo, Ending, FirstTokenOutcome, GuardObserver, InFlightGuard, LoadSnapshot, ReportedLoad,
    RequestOutcome, WorkerLoad,
};
pub use usage::Usage;

/// Tokens per character when a prompt arrives as text: the usual ~4 characters per token
/// of BPE tokenizers on English (and the simulator's tokenizer).
pub const CHARS_PER_TOKEN: usize = 4;
