//! Forwarding to workers: the pooled HTTP client, request/response header handling, and the
//! observed response body that carries the in-flight guard until the stream ends.

mod body;
pub mod client;

pub use body::{ObservedBody, StreamObserver};
pub use client::{forward_headers, HttpClient, SendError, Upstream, MAX_BUFFERED};
