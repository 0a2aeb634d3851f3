//! Health and information endpoints. Optional worker endpoints (`/get_model_info`,
//! `/get_server_info`, `/health_generate`) are used when a worker has them and synthesised
//! when it doesn't, so plain OpenAI-compatible servers (vLLM, llama.cpp, TGI) work too.

use axum::extract::State;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

use super::AppState;
use crate::error::ApiError;

fn json_bytes(status: u16, body: Bytes) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Fetches `path` from the first healthy worker that answers 2xx with JSON.
async fn from_any_worker(state: &AppState, method: Method, path: &str) -> Result<Option<Bytes>, ApiError> {
    let healthy = state.registry.healthy();
    if healthy.is_empty() {
        return Err(ApiError::NoHealthyWorkers);
    }
    for w in healthy.iter() {
        if let Ok((status, body)) = state.control.fetch(method.clone(), w.url(), path).await {
            if (200..300).contains(&status) && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() {
                return Ok(Some(body));
            }
        }
    }
    Ok(None)
}

/// `GET /health`: the router process is up.
pub(super) async fn health() -> StatusCode {
    StatusCode::OK
}

/// `GET /liveness`: the router process is up.
pub(super) async fn liveness() -> StatusCode {
    StatusCode::OK
}

/// `GET /readiness`: 200 when requests can be routed to some worker, else 503. In health
/// panic (too few workers pass their probes, and requests go to every worker that has served)
/// the router is still routing: status `panic`, 200.
pub(super) async fn readiness(State(state): State<AppState>) -> Response {
    let healthy = state.registry.healthy().len();
    let routable = state.registry.routable().len();
    let total = state.registry.all().len();
    let status = match (routable > 0, state.registry.in_panic()) {
        (false, _) => "not ready",
        (true, true) => "panic",
        (true, false) => "ready",
    };
    let body = Json(json!({
        "status": status,
        "healthy_workers": healthy,
        "routable_workers": routable,
        "total_workers": total,
    }));
    if routable > 0 {
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

/// `GET /health_generate`: a healthy worker can generate (its `/health_generate`, or `/health`
/// for servers without it).
pub(super) async fn health_generate(State(state): State<AppState>) -> Result<Response, ApiError> {
    let healthy = state.registry.healthy();
    let worker = healthy.iter().min_by_key(|w| w.load().in_flight()).ok_or(ApiError::NoHealthyWorkers)?;
    let answer = match state.control.fetch(Method::GET, worker.url(), "/health_generate").await {
        Ok((404, _)) => state.control.fetch(Method::GET, worker.url(), "/health").await,
        other => other,
    };
    match answer {
        Ok((status, _)) if (200..300).contains(&status) => Ok(StatusCode::OK.into_response()),
        Ok((status, _)) => Err(ApiError::WorkerUnreachable {
            worker: worker.url().to_owned(),
            reason: format!("health_generate answered {status}"),
        }),
        Err(e) => Err(ApiError::WorkerUnreachable { worker: worker.url().to_owned(), reason: e.to_string() }),
    }
}

/// `GET /v1/models`: every model the fleet serves (the union of what workers reported), or
/// a worker's own list when none reported any.
pub(super) async fn models(State(state): State<AppState>) -> Result<Response, ApiError> {
    let ids = state.registry.models();
    if ids.is_empty() {
        if let Some(body) = from_any_worker(&state, Method::GET, "/v1/models").await? {
            return Ok(json_bytes(200, body));
        }
    }
    let data: Vec<Value> =
        ids.iter().map(|id| json!({"id": id, "object": "model", "owned_by": "switchyard"})).collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// `GET /get_model_info`: a worker's answer, or one built from its reported model.
pub(super) async fn model_info(State(state): State<AppState>) -> Result<Response, ApiError> {
    if let Some(body) = from_any_worker(&state, Method::GET, "/get_model_info").await? {
        return Ok(json_bytes(200, body));
    }
    let model = state.registry.healthy().iter().find_map(|w| w.model_id());
    Ok(Json(json!({"model_path": model, "tokenizer_path": model, "is_generation": true})).into_response())
}

/// `GET /get_server_info`: a worker's server info plus the router's own.
pub(super) async fn server_info(State(state): State<AppState>) -> Result<Response, ApiError> {
    let worker_info = from_any_worker(&state, Method::GET, "/get_server_info")
        .await?
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let mut out = match worker_info {
        Some(Value::Object(m)) => Value::Object(m),
        _ => json!({}),
    };
    out["router"] = json!({
        "name": "switchyard",
        "version": env!("CARGO_PKG_VERSION"),
        "policy": state.router.policy().name(),
        "workers": state.registry.all().len(),
        "healthy_workers": state.registry.healthy().len(),
    });
    Ok(Json(out).into_response())
}

/// `GET /get_loads`: the router's view of each worker's load.
pub(super) async fn loads(State(state): State<AppState>) -> Json<Value> {
    let workers: Vec<Value> = state
        .registry
        .all()
        .iter()
        .map(|w| json!({"url": w.url(), "healthy": w.is_healthy(), "in_flight": w.load().in_flight()}))
        .collect();
    Json(json!({"workers": workers}))
}

/// `GET /metrics`: Prometheus text exposition.
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state.metrics.render(&state.registry);
    let pools = state.router.policies_by_model();
    for (model, policies) in &pools {
        let mut own = String::new();
        for policy in policies {
            policy.report(crate::policies::Report::Metrics(&mut own));
        }
        // With several models, each pool's families carry its model (bounded: one per model).
        if pools.len() > 1 {
            own = crate::metrics::with_label(&own, "model", model);
        }
        crate::metrics::append_deduplicated(&mut text, &own);
    }
    if let Some(kv) = &state.kv_events {
        kv.render(&mut text);
    }
    #[cfg(feature = "tokenizer")]
    if let Some(stats) = state.router.tokenizer().and_then(|t| t.segment_cache_stats()) {
        crate::tokenize::render_cache_stats(&stats, &mut text);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
