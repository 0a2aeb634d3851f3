//! The performance model: what a continuous-batching inference engine does with requests,
//! and how long it takes. Pure and synchronous; the HTTP server and virtual-time studies drive it.

pub mod engine;
pub mod prefix_cache;
pub mod profile;
pub mod tokenizer;
pub mod virtual_time;

pub use engine::{Engine, EngineEvent, EngineStats, RequestId, SimRequest, SubmitError};
pub use profile::Profile;
