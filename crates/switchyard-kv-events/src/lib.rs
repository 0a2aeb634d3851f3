//! switchyard-kv-events: the KV cache events SGLang and vLLM publish, on the wire.
//!
//! Engines publish their prefix cache's changes (blocks stored with their token ids, blocks
//! removed, everything cleared) as msgpack batches on a ZeroMQ PUB socket, each message
//! `[topic, sequence number (8 bytes, big-endian), batch]`, and keep recent batches for a
//! replay socket (ROUTER) that a subscriber asks from a sequence number on. This crate is that
//! format and no more: [`zmtp`] speaks the ZeroMQ transport over TCP (NULL security, the only
//! mechanism the engines use), [`msgpack`] the subset of msgpack the batches use, [`event`] the
//! batch and event types, [`publisher`] and [`subscriber`] the two ends. The simulator
//! publishes with it and the router subscribes with it.
//!
//! Own code rather than a ZeroMQ crate: the engines use four socket types over TCP and one
//! security mechanism, which is a few hundred lines; owning them keeps the build free of C
//! libraries and puts a bound on every frame a (possibly broken) worker sends.

pub mod event;
pub mod msgpack;
pub mod publisher;
pub mod subscriber;
pub mod zmtp;

pub use event::{BlockHash, EventBatch, KvEvent};
