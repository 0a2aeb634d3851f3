//! Forwarding to workers: the pooled HTTP client, request/response header handling, and the
//! relayed response body that carries the in-flight guard until the stream ends.

mod body;
pub mod client;

pub use body::{
    buffered, check_whole, is_event_stream, is_event_stream_headers, relay_stream, ObservedBody, StreamLimits,
};
pub use client::{forward_headers, is_worker_failure, HttpClient, Identity, SendError, Upstream, MAX_BUFFERED};
