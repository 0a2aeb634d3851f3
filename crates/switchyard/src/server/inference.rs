//! Inference endpoints: read the body once (bounded), then hand it to the router.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::AppState;
use crate::error::ApiError;

/// Reads a request body up to `limit` bytes; larger bodies get 413 without being read whole.
pub(super) async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::PayloadTooLarge { limit }),
        Err(e) => Err(ApiError::BadRequest(format!("failed to read the request body: {e}"))),
    }
}

async fn route(state: &AppState, path: &'static str, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let started = tokio::time::Instant::now();
    let answer = admit_and_route(state, path, headers, body).await;
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
    let permit = match &state.admission {
        Some(a) => {
            state.metrics.set_queue_depth(a.waiting() + 1);
            let permit = a.admit().await;
            state.metrics.set_queue_depth(a.waiting());
            Some(permit?)
        }
        None => None,
    };
    let bytes = read_body(&headers, body, state.config.max_payload_size).await?;
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
