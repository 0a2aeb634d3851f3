//! What is measured about each worker. Policies only read these numbers.
//!
//! The in-flight count is kept by [`InFlightGuard`]s: one is taken when a policy picks a
//! worker (so concurrent selections see each other and don't herd onto the same idle worker)
//! and it lives inside the response body, so it is released exactly when the response ends
//! — completed, failed, or abandoned by the client. No error path can leak a count.

mod inflight;

pub use inflight::{InFlightGuard, RequestOutcome, WorkerLoad};
