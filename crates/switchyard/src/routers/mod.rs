//! Dispatch: one attempt loop for both modes.
//!
//! ```text
//! select (policy, with holding) ─▶ claim breakers + take guards ─▶ run one attempt ─▶ classify
//!        ▲                                                          regular: one leg   │
//!        └──────────── back off, exclude the workers to blame ◀──── pd: two legs ──────┘
//! ```
//!
//! Regular and PD mode differ only in how one attempt runs ([`regular`] sends one leg, [`pd`]
//! two); selection, holding and shedding, breaker claims, retries and error classification are
//! written once, in [`attempt`]. Every leg's in-flight guard is registered with its pool's
//! [`feedback::PoolObserver`] and reports its own end — to the policy, the breaker, the metrics
//! and the held requests — so nothing here completes a request by hand.

mod attempt;
mod body_edit;
mod failover;
mod feedback;
pub mod hold;
mod pd;
mod regular;

pub use attempt::{Dispatcher, Limits, Mode, PolicyFactory, PolicySet};
pub use body_edit::Members;

pub use crate::proxy::is_worker_failure;

/// [`is_worker_failure`] for a raw status code (an invalid code counts as a failure).
pub(crate) fn is_worker_failure_code(code: u16) -> bool {
    axum::http::StatusCode::from_u16(code).map_or(true, is_worker_failure)
}
