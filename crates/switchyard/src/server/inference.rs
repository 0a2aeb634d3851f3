//! Inference endpoints: read the body once (bounded in size and time), take an admission
//! slot, then hand the request to the dispatcher.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use super::AppState;
use crate::error::ApiError;

/// Reads a request body up to `limit` bytes; larger bodies get 413 without being read whole.
///
/// Memory: with a declared length the buffer is allocated once at that size; without one the
/// frames are kept as they come and joined at the end (at most twice the body, briefly).
pub(super) async fn read_body(headers: &HeaderMap, mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut frames: Vec<Bytes> = Vec::new();
    let mut buf = declared.map(|n| BytesMut::with_capacity(n as usize));
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::BadRequest(format!("failed to read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        total += data.len();
        if total > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        match buf.as_mut() {
            Some(b) => b.extend_from_slice(&data),
            None => frames.push(data),
        }
    }
    Ok(match buf {
        Some(b) => b.freeze(),
        None if frames.len() == 1 => frames.pop().unwrap_or_default(),
        None => {
            let mut joined = BytesMut::with_capacity(total);
            for f in frames.drain(..) {
                joined.extend_from_slice(&f);
            }
            joined.freeze()
        }
    })
}

/// The body, within `--body-read-timeout-secs` and `--max-payload-size`.
async fn read_body_in_time(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.listener.body_read_timeout;
    tokio::time::timeout(limit, read_body(headers, body, state.config.max_payload_size))
        .await
        .map_err(|_| ApiError::BodyTimeout { secs: limit.as_secs_f64() })?
}

async fn route(state: &AppState, path: &'static str, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let started = tokio::time::Instant::now();
    let answer = match state.config.request_total_timeout {
        Some(limit) => tokio::time::timeout(limit, admit_and_route(state, path, headers, body))
            .await
            .unwrap_or(Err(ApiError::TotalTimeout { secs: limit.as_secs_f64() })),
        None => admit_and_route(state, path, headers, body).await,
    };
    // A worker's answer is counted by its in-flight guard when it ends (with the status the
    // client saw); the router's own errors are counted here.
    if let Err(e) = &answer {
        state.metrics.request(path, e.status().as_u16(), "none", started.elapsed());
    }
    answer
}

async fn admit_and_route(
    state: &AppState,
    path: &'static str,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // The body first: a slow sender must not hold an admission slot while it trickles in.
    let bytes = read_body_in_time(state, &headers, body).await?;
    let permit = match &state.admission {
        Some(a) => {
            state.metrics.set_queue_depth(a.waiting() + 1);
            let span = tracing::debug_span!(target: crate::telemetry::TARGET, "admission");
            let permit = tracing::Instrument::instrument(a.admit(), span).await;
            state.metrics.set_queue_depth(a.waiting());
            Some(permit?)
        }
        None => None,
    };
    let response = state.router.route(path, &headers, bytes).await?;
    Ok(match permit {
        Some(p) => super::admission::hold_until_done(response, p),
        None => response,
    })
}

macro_rules! inference_endpoint {
    ($name:ident, $path:literal) => {
        #[doc = concat!("`POST ", $path, "`")]
        pub(super) async fn $name(
            State(state): State<AppState>,
            headers: HeaderMap,
            body: Body,
        ) -> Result<Response, ApiError> {
            route(&state, $path, headers, body).await
        }
    };
}

inference_endpoint!(chat_completions, "/v1/chat/completions");
inference_endpoint!(completions, "/v1/completions");
inference_endpoint!(generate, "/generate");
inference_endpoint!(embeddings, "/v1/embeddings");
inference_endpoint!(rerank, "/v1/rerank");

/// `POST /tokenize` (vLLM's shape): `{"prompt": "..."}` or `{"messages": [...]}` →
/// `{"tokens": [...], "count": n}`, the ids the router routes on (`--tokenizer-path`), so an
/// operator can check them against the engine's own `/tokenize`.
pub(super) async fn tokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body_in_time(&state, &headers, body).await?;
    #[cfg(feature = "tokenizer")]
    if let Some(t) = state.router.tokenizer() {
        /// Only whether the body has `messages` (no JSON tree of the body is built).
        #[derive(serde::Deserialize)]
        struct Probe {
            messages: Option<serde::de::IgnoredAny>,
        }
        let probe: Probe =
            serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
        let api = match probe.messages {
            Some(_) => crate::tokenize::PromptApi::Chat,
            None => crate::tokenize::PromptApi::Completion,
        };
        let tokens = tokio::task::spawn_blocking(move || t.encode_request(api, &bytes))
            .await
            .map_err(|e| ApiError::BadRequest(e.to_string()))?
            .map_err(|e| ApiError::BadRequest(e.to_string()))?
            .ok_or_else(|| ApiError::BadRequest("'prompt' must be a string, or give 'messages'".into()))?;
        return Ok(axum::response::IntoResponse::into_response(axum::Json(
            serde_json::json!({"count": tokens.len(), "tokens": tokens}),
        )));
    }
    let _ = bytes;
    Err(ApiError::NotFound("no tokenizer configured (--tokenizer-path)".into()))
}
