//! Workers and the registry that holds them.

mod circuit_breaker;
mod registry;
mod worker;

pub use circuit_breaker::{BreakerState, CircuitBreaker, Claim};
pub use registry::{Membership, MembershipListener, RegistryError, WorkerRegistry};
pub use worker::{DpRank, Worker, WorkerRole};
