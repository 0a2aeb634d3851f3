//! Worker management: `/workers` (GET/POST/DELETE), sglang-router's legacy `/add_worker`,
//! `/remove_worker`, `/list_workers`, and `/flush_cache` fanned out to every worker.

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::inference::read_body;
use super::AppState;
use crate::config::normalize_worker_url;
use crate::discovery::Candidate;
use crate::error::ApiError;
use crate::workers::{Worker, WorkerRole};

#[derive(Debug, Deserialize)]
pub(super) struct UrlQuery {
    url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddWorkerBody {
    url: String,
    /// `regular` (default), `prefill` or `decode`.
    #[serde(default)]
    role: Option<String>,
    /// Prefill workers: the KV bootstrap port.
    #[serde(default)]
    bootstrap_port: Option<u16>,
    /// The model it serves, when it should not be asked (sglang-router's field).
    #[serde(default)]
    model_id: Option<String>,
}

fn describe(w: &Worker) -> Value {
    json!({
        "url": w.url(),
        "key": w.key(),
        "dp_rank": w.dp_rank().map(|d| d.rank),
        "dp_size": w.dp_rank().map(|d| d.size),
        "source": w.source().unwrap_or("manual"),
        "models": w.models(),
        "role": w.role(),
        "healthy": w.is_healthy(),
        "circuit_breaker": w.breaker().state().name(),
        "model_id": w.model_id(),
        "load": {"in_flight": w.load().in_flight(), "dispatched": w.load().dispatched(),
                 "succeeded": w.load().succeeded(), "failed": w.load().failed()},
    })
}

fn required_url(q: Result<Query<UrlQuery>, QueryRejection>) -> Result<String, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    let url = q.url.ok_or_else(|| ApiError::BadRequest("missing query parameter 'url'".into()))?;
    normalize_worker_url(&url).map_err(|e| ApiError::BadRequest(e.to_string()))
}

async fn add(state: &AppState, url: &str, role: WorkerRole, models: Vec<String>) -> Result<Response, ApiError> {
    let url = normalize_worker_url(url).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let pd = state.config.pd.is_some();
    if pd == matches!(role, WorkerRole::Regular) {
        let msg = if pd {
            "this router runs in PD mode: add workers with role prefill or decode"
        } else {
            "prefill/decode workers need a router started in PD mode"
        };
        return Err(ApiError::BadRequest(msg.into()));
    }
    let mut candidate = Candidate::manual(url, role);
    candidate.models = models;
    let workers = state.onboarding.admit(candidate).await?;
    let first = workers.first().ok_or(ApiError::NoHealthyWorkers)?;
    tracing::info!(worker = first.url(), healthy = first.is_healthy(), ranks = workers.len(), "worker added");
    let all: Vec<Value> = workers.iter().map(|w| describe(w)).collect();
    Ok((StatusCode::OK, Json(json!({"status": "added", "worker": describe(first), "workers": all}))).into_response())
}

fn remove(state: &AppState, url: &str) -> Result<Response, ApiError> {
    let url = normalize_worker_url(url).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let removed = state.registry.remove_url(&url).map_err(|e| ApiError::NotFound(e.to_string()))?;
    tracing::info!(worker = %url, ranks = removed.len(), "worker removed");
    Ok(Json(json!({"status": "removed", "url": url})).into_response())
}

/// `GET /workers`.
pub(super) async fn list_workers(State(state): State<AppState>) -> Json<Value> {
    let all = state.registry.all();
    Json(json!({"workers": all.iter().map(|w| describe(w)).collect::<Vec<_>>(), "total": all.len()}))
}

/// `POST /workers` with `{"url": "http://host:port"}`.
pub(super) async fn add_worker(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(&headers, body, 1 << 20).await?;
    let req: AddWorkerBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"url\": \"http://host:port\"}}: {e}")))?;
    let role = match req.role.as_deref() {
        None | Some("regular") => WorkerRole::Regular,
        Some("prefill") => WorkerRole::Prefill { bootstrap_port: req.bootstrap_port },
        Some("decode") => WorkerRole::Decode,
        Some(other) => return Err(ApiError::BadRequest(format!("unknown role '{other}' (regular, prefill, decode)"))),
    };
    add(&state, &req.url, role, req.model_id.into_iter().collect()).await
}

/// `DELETE /workers?url=...`.
pub(super) async fn remove_worker_query(
    State(state): State<AppState>,
    q: Result<Query<UrlQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let url = required_url(q)?;
    remove(&state, &url)
}

/// `DELETE /workers/{url}` (the URL percent-encoded or not).
pub(super) async fn remove_worker_path(
    State(state): State<AppState>,
    url: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(url) =
        url.map_err(|e| ApiError::BadRequest(format!("invalid worker URL in the path: {}", e.body_text())))?;
    // A raw "http://host:port" arrives with its "//" collapsed by some clients; restore it.
    let url = if url.contains("://") { url } else { url.replacen(":/", "://", 1) };
    remove(&state, &url)
}

/// `POST /add_worker?url=...` (sglang-router's legacy form).
pub(super) async fn legacy_add_worker(
    State(state): State<AppState>,
    q: Result<Query<UrlQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let url = required_url(q)?;
    add(&state, &url, WorkerRole::Regular, Vec::new()).await
}

/// `POST /remove_worker?url=...` (legacy).
pub(super) async fn legacy_remove_worker(
    State(state): State<AppState>,
    q: Result<Query<UrlQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let url = required_url(q)?;
    remove(&state, &url)
}

/// `GET /list_workers` (legacy): `{"urls": [...]}`.
pub(super) async fn legacy_list_workers(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"urls": state.registry.all().iter().map(|w| w.url().to_owned()).collect::<Vec<_>>()}))
}

/// `POST /flush_cache`: flushes every worker's prefix cache; 200 only if all succeeded.
pub(super) async fn flush_cache(State(state): State<AppState>) -> Response {
    let mut calls = JoinSet::new();
    for w in state.registry.all().iter() {
        let control = state.control.clone();
        let url = w.url().to_owned();
        calls.spawn(async move {
            let r = control.fetch(Method::POST, &url, "/flush_cache").await;
            (url, r)
        });
    }
    let mut results: Vec<Value> = Vec::new();
    let mut all_ok = true;
    for (url, r) in calls.join_all().await {
        let ok = matches!(r, Ok((s, _)) if (200..300).contains(&s));
        all_ok &= ok;
        let detail = match r {
            Ok((s, _)) => json!({"url": url, "status": s, "ok": ok}),
            Err(e) => json!({"url": url, "error": e.to_string(), "ok": false}),
        };
        results.push(detail);
    }
    results.sort_by(|a, b| a["url"].as_str().cmp(&b["url"].as_str()));
    let status = if all_ok { StatusCode::OK } else { StatusCode::BAD_GATEWAY };
    (status, Json(json!({"status": if all_ok { "flushed" } else { "partial" }, "workers": results}))).into_response()
}

/// `GET /debug/routing` (admin): the routing audit — each recent decision's predicted cached
/// tokens on the chosen worker and the best other, against what the worker reported.
pub(super) async fn debug_routing(State(state): State<AppState>) -> Response {
    Json(state.metrics.audit().report()).into_response()
}

/// `GET /debug/kv_events` (admin): each worker's KV event subscription — connected, synced,
/// blocks held, last sequence number, gaps repaired or not, restarts — and the index's bound.
pub(super) async fn debug_kv_events(State(state): State<AppState>) -> Response {
    match &state.kv_events {
        Some(kv) => Json(kv.report()).into_response(),
        None => ApiError::NotFound("KV events are off (no --kv-events-endpoint)".into()).into_response(),
    }
}

/// `GET /debug/policy` (admin): the policy's learnt state — for marginal_utility each
/// worker's fitted coefficients, sample counts, residual σ and recent predictions against
/// observations — with worker ids resolved to URLs.
pub(super) async fn debug_policy(State(state): State<AppState>) -> Response {
    let workers = state.registry.all();
    let describe = |policy: &std::sync::Arc<dyn crate::policies::RoutingPolicy>| {
        let mut state_json = None;
        policy.report(crate::policies::Report::Debug(&mut state_json));
        let Some(mut v) = state_json else {
            return json!({"policy": policy.name(), "state": null});
        };
        if let Some(list) = v.get_mut("workers").and_then(Value::as_array_mut) {
            for entry in list {
                let id = entry.get("worker").and_then(Value::as_u64);
                if let Some(w) = workers.iter().find(|w| Some(u64::from(w.id())) == id) {
                    entry["url"] = json!(w.key());
                }
            }
        }
        v
    };
    let pools = state.router.policies_by_model();
    if pools.len() <= 1 {
        return Json(describe(&state.router.policy())).into_response();
    }
    // Several models: each pool's policy state under its model.
    let by_model: serde_json::Map<String, Value> = pools
        .iter()
        .filter(|(m, _)| !m.is_empty())
        .filter_map(|(m, ps)| ps.first().map(|p| (m.clone(), describe(p))))
        .collect();
    Json(json!({"models": by_model})).into_response()
}
