//! Prefill/decode disaggregation, both protocols the router speaks.
//!
//! **SGLang style.** The router sends the same request, with `bootstrap_host`,
//! `bootstrap_port` and `bootstrap_room`, to a prefill and a decode worker. The prefill worker
//! runs the prefill and publishes the room on its bootstrap server
//! (`GET /bootstrap/{room}?timeout_ms=N` answers once the room is ready, 404 on timeout). The
//! decode worker waits for the room (a clear error if it never comes), charges the KV
//! transfer time (prompt tokens × bytes per token ÷ link bandwidth) and decodes.
//!
//! **vLLM style.** The router prefills with `max_tokens = 1` and
//! `kv_transfer_params.do_remote_decode = true`; the prefill worker answers with the
//! `kv_transfer_params` the decode worker needs (`do_remote_prefill = true`, remote host,
//! port, block ids); the router sends those with the request to the decode worker.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// KV bytes per token (Llama-3.1-8B, bf16: 32 layers × 8 KV heads × 128 dims × 2 × 2 bytes).
pub const KV_BYTES_PER_TOKEN: f64 = 131_072.0;

/// Rooms a prefill worker has finished, by id: the prompt tokens whose KV is ready.
#[derive(Debug, Default)]
pub struct Rooms {
    ready: Mutex<HashMap<u64, u32>>,
    published: Notify,
}

/// Most rooms kept waiting for a decode worker to collect them.
const MAX_ROOMS: usize = 65_536;

impl Rooms {
    /// Marks `room` ready with `prompt_tokens` of KV.
    pub fn publish(&self, room: u64, prompt_tokens: u32) {
        if let Ok(mut m) = self.ready.lock() {
            if m.len() >= MAX_ROOMS {
                m.clear(); // decode workers that never came: forget them all at once
            }
            m.insert(room, prompt_tokens);
        }
        self.published.notify_waiters();
    }

    /// Waits up to `timeout` for `room`; returns its prompt tokens and forgets it.
    pub async fn take(&self, room: u64, timeout: Duration) -> Option<u32> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.published.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(n) = self.ready.lock().ok().and_then(|mut m| m.remove(&room)) {
                return Some(n);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    timeout_ms: Option<u64>,
}

/// The prefill worker's bootstrap server.
pub fn bootstrap_router(rooms: std::sync::Arc<Rooms>) -> Router {
    Router::new()
        .route(
            "/bootstrap/{room}",
            get(|State(rooms): State<std::sync::Arc<Rooms>>, Path(room): Path<u64>, Query(q): Query<WaitQuery>| async move {
                let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(30_000).min(600_000));
                match rooms.take(room, timeout).await {
                    Some(prompt_tokens) => Json(json!({"room": room, "prompt_tokens": prompt_tokens})).into_response(),
                    None => (StatusCode::NOT_FOUND, Json(json!({"error": format!("room {room} not ready")}))).into_response(),
                }
            }),
        )
        .with_state(rooms)
}

/// Why a decode worker could not get a request's KV.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The prefill worker never published the room.
    #[error("KV bootstrap room {room} from {host}:{port} was not ready within {secs:.1} s")]
    Timeout {
        /// Room.
        room: u64,
        /// Prefill bootstrap host.
        host: String,
        /// Its port.
        port: u16,
        /// The wait.
        secs: f64,
    },
    /// The bootstrap server could not be reached.
    #[error("cannot reach the prefill bootstrap server {host}:{port}: {reason}")]
    Unreachable {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// Cause.
        reason: String,
    },
}

/// Decode side, SGLang style: waits (in real time, `timeout`) for the room at the prefill
/// worker's bootstrap server.
pub async fn fetch_room(host: &str, port: u16, room: u64, timeout: Duration) -> Result<(), TransferError> {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri = format!("http://{host}:{port}/bootstrap/{room}?timeout_ms={}", timeout.as_millis());
    let unreachable = |reason: String| TransferError::Unreachable { host: host.to_owned(), port, reason };
    let uri: hyper::Uri = uri.parse().map_err(|e: hyper::http::uri::InvalidUri| unreachable(e.to_string()))?;
    let resp = tokio::time::timeout(timeout + Duration::from_secs(1), client.get(uri))
        .await
        .map_err(|_| TransferError::Timeout { room, host: host.to_owned(), port, secs: timeout.as_secs_f64() })?
        .map_err(|e| unreachable(e.to_string()))?;
    let ok = resp.status().is_success();
    let _ = resp.into_body().collect().await;
    if ok {
        Ok(())
    } else {
        Err(TransferError::Timeout { room, host: host.to_owned(), port, secs: timeout.as_secs_f64() })
    }
}

/// Simulated KV transfer time, in unscaled seconds, for `tokens` over `gbps` GB/s.
pub fn transfer_seconds(tokens: usize, gbps: f64) -> f64 {
    tokens as f64 * KV_BYTES_PER_TOKEN / (gbps.max(0.001) * 1e9)
}

/// vLLM style: the parameters a prefill worker hands back for the decode worker.
pub fn kv_params_for_decode(port: u16, prompt_tokens: usize, page_size: usize) -> Value {
    let blocks: Vec<usize> = (0..prompt_tokens.div_ceil(page_size.max(1))).collect();
    json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_engine_id": format!("switchyard-sim-{port}"),
        "remote_block_ids": blocks,
        "remote_host": "127.0.0.1",
        "remote_port": port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rooms_wait_for_publication_and_time_out() {
        let rooms = std::sync::Arc::new(Rooms::default());
        let waiter = {
            let rooms = rooms.clone();
            tokio::spawn(async move { rooms.take(7, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        rooms.publish(7, 123);
        assert_eq!(waiter.await.unwrap(), Some(123));
        assert_eq!(rooms.take(8, Duration::from_millis(20)).await, None);
        assert!(transfer_seconds(1000, 50.0) > 0.002 && transfer_seconds(1000, 50.0) < 0.003);
    }
}
