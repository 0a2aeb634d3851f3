//! Switchyard: an LLM inference router.
//!
//! A request comes in (OpenAI or SGLang API), a [`policies::RoutingPolicy`] picks a worker,
//! the request is proxied and its response (often an SSE stream) flows back untouched while
//! [`load`] observes it. See `shared/design/architecture.md` for the map.

pub mod audit;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery;
pub mod error;
pub mod health;
pub mod kv_events;
pub mod load;
pub mod metrics;
pub mod policies;
pub mod proxy;
pub mod request;
pub mod routers;
pub mod server;
pub mod telemetry;
pub mod tls;
#[cfg(feature = "tokenizer")]
pub mod tokenize;
pub mod workers;
