//! Dispatch: choose a worker through the policy, forward, relay the response.

mod regular;

pub use regular::{is_worker_failure, Observed, RegularRouter, RoutedTo};
