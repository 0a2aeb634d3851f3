//! Workers and the registry that holds them.

mod registry;
mod worker;

pub use registry::{RegistryError, WorkerRegistry};
pub use worker::{Worker, WorkerRole};
