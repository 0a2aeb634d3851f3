//! switchyard-sim: a simulated LLM inference worker.
//!
//! A continuous-batching performance model ([`model`]) behind SGLang- and vLLM-compatible
//! HTTP APIs ([`server`]), with fault injection and whole fleets in one process ([`fleet`]).
//! No GPU needed: tests, benchmarks and users see routing quality through it.

pub mod fleet;
pub mod model;
pub mod server;
