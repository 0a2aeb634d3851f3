//! HTTP handlers: inference (SGLang `/generate`, OpenAI chat/completions), info, load,
//! metrics, and the `/sim/faults` admin endpoint.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use super::body::{ChannelBody, Died};
use super::driver::{Command, TokenMsg};
use super::faults::Faults;
use super::wire::{self, Api, GenRequest, Summary};
use super::{metrics, pd, WorkerState};
use crate::model::engine::standard_normal;
use crate::model::SimRequest;

type Shared = Arc<WorkerState>;

pub(super) fn router(state: Shared) -> Router {
    Router::new()
        .route("/generate", post(|s: State<Shared>, h: HeaderMap, b: Bytes| infer(s, Api::Generate, h, b)))
        .route("/v1/chat/completions", post(|s: State<Shared>, h: HeaderMap, b: Bytes| infer(s, Api::Chat, h, b)))
        .route("/v1/completions", post(|s: State<Shared>, h: HeaderMap, b: Bytes| infer(s, Api::Completion, h, b)))
        .route("/health", get(health))
        .route("/health_generate", get(health_generate))
        .route("/v1/models", get(models))
        .route("/get_model_info", get(model_info))
        .route("/get_server_info", get(server_info))
        .route("/get_load", get(load))
        .route("/flush_cache", post(flush_cache))
        .route("/metrics", get(metrics_text))
        .route("/sim/faults", get(get_faults).post(set_faults))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(wire::error_body(status.as_u16(), message))).into_response()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Output length: exactly `max_tokens` with `ignore_eos`, else a lognormal draw capped by it.
fn output_tokens(state: &WorkerState, req: &GenRequest, room: u64) -> (u32, bool) {
    let cap = req.max_tokens.map_or(room, |m| u64::from(m).min(room)).max(1) as u32;
    if req.ignore_eos {
        return (cap, false);
    }
    let draw = match state.rng.lock() {
        Ok(mut rng) => f64::from(state.config.output_len_median) * (0.8 * standard_normal(&mut *rng)).exp(),
        Err(_) => f64::from(state.config.output_len_median),
    };
    let natural = draw.round().clamp(1.0, f64::from(u32::MAX)) as u32;
    if natural < cap {
        (natural, true)
    } else {
        (cap, false)
    }
}

/// The data-parallel rank a request runs on: its `data_parallel_rank` (SGLang), else its
/// `X-data-parallel-rank` header (vLLM), else the next in turn.
fn rank_of(state: &WorkerState, req: &GenRequest, headers: &HeaderMap) -> Result<usize, String> {
    let header = headers.get("x-data-parallel-rank").map(|v| {
        v.to_str().ok().and_then(|s| s.trim().parse::<u32>().ok()).ok_or("X-data-parallel-rank must be an integer")
    });
    let asked = match (req.data_parallel_rank, header) {
        (Some(r), _) => Some(r),
        (None, Some(h)) => Some(h?),
        (None, None) => None,
    };
    let size = state.engines.len();
    match asked {
        Some(r) if (r as usize) < size => Ok(r as usize),
        Some(r) => Err(format!("data_parallel_rank {r} is out of range: this server runs {size} rank(s)")),
        None => Ok(state.next_rank.fetch_add(1, Ordering::Relaxed) % size),
    }
}

/// How many `traceparent` headers a worker keeps.
const TRACEPARENTS_KEPT: usize = 64;

async fn infer(State(state): State<Shared>, api: Api, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        if let Ok(mut kept) = state.traceparents.lock() {
            if kept.len() == TRACEPARENTS_KEPT {
                kept.pop_front();
            }
            kept.push_back(tp.to_owned());
        }
    }
    let faults = state.faults();
    if faults.hang {
        std::future::pending::<()>().await;
    }
    if faults.error_rate > 0.0 && state.rng.lock().map(|mut r| r.random::<f64>() < faults.error_rate).unwrap_or(false) {
        let status = StatusCode::from_u16(faults.error_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, "injected fault");
    }
    if faults.malformed {
        return (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{\"choices\": [{\"text\": ")
            .into_response();
    }
    let mut req = match wire::parse(api, &body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.0),
    };
    if let Some(tokenizer) = &state.tokenizer {
        // A real engine's prompt: the model's tokenizer and chat template (continuations of
        // the simulator's filler text are not recognised then).
        let api = match api {
            Api::Chat => switchyard_tokenize::PromptApi::Chat,
            Api::Completion => switchyard_tokenize::PromptApi::Completion,
            Api::Generate => switchyard_tokenize::PromptApi::Generate,
        };
        match tokenizer.encode_request(api, &body) {
            Ok(Some(ids)) => {
                req.prompt = ids;
                req.output_offset = 0;
            }
            Ok(None) => {}
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        }
    }
    let rank = match rank_of(&state, &req, &headers) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    state.rank_requests[rank].fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    if faults.first_token_delay_ms > 0 {
        tokio::time::sleep(Duration::from_secs_f64(faults.first_token_delay_ms as f64 / 1e3 / state.config.time_scale))
            .await;
    }
    let max_ctx = state.config.profile.kv_capacity_tokens.min(131_072);
    let room = max_ctx.saturating_sub(req.prompt.len() as u64);
    if let Some(m) = req.max_tokens.filter(|m| u64::from(*m) > room) {
        let msg = format!(
            "this model's maximum context length is {max_ctx} tokens; the request has {} prompt tokens and asks for {m} more",
            req.prompt.len()
        );
        return error(StatusCode::BAD_REQUEST, &msg);
    }
    let (mut output, mut stopped_early) = output_tokens(&state, &req, room);
    let prompt_tokens = req.prompt.len() as u32;
    let vllm_kv = req.kv_transfer_params.as_ref();
    let flag = |k: &str| vllm_kv.and_then(|p| p.get(k)).and_then(Value::as_bool).unwrap_or(false);
    let mut publish = None;
    let mut kv_params = None;
    let mut transferred = false;
    match state.config.role {
        super::Role::Plain => {}
        // Prefill: compute the prompt and the first token only, then hand the KV over.
        super::Role::Prefill => {
            if req.bootstrap_room.is_some() || flag("do_remote_decode") {
                output = 1;
                stopped_early = false;
            }
            publish = req.bootstrap_room;
            if flag("do_remote_decode") {
                kv_params =
                    Some(pd::kv_params_for_decode(state.port, req.prompt.len(), state.config.profile.page_size));
            }
        }
        // Decode: get the KV from the prefill worker first; no prefill compute here.
        super::Role::Decode => {
            match (&req.bootstrap_room, &req.bootstrap_host, req.bootstrap_port) {
                (Some(room), Some(host), Some(port)) => {
                    let wait = Duration::from_secs_f64(state.config.pd_timeout_secs);
                    if let Err(e) = pd::fetch_room(host, port, *room, wait).await {
                        return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
                    }
                }
                _ if flag("do_remote_prefill") => {}
                _ => {
                    let msg = "this is a decode worker: send bootstrap_host/bootstrap_port/bootstrap_room (SGLang PD) or kv_transfer_params with do_remote_prefill (vLLM PD)";
                    return error(StatusCode::BAD_REQUEST, msg);
                }
            }
            let transfer = pd::transfer_seconds(req.prompt.len(), state.config.kv_link_gbps) / state.config.time_scale;
            tokio::time::sleep(Duration::from_secs_f64(transfer)).await;
            transferred = true;
        }
    }
    let sim_request = SimRequest { prompt: req.prompt.clone(), output_tokens: output };
    let input_logprobs = (req.return_logprob && state.config.role != super::Role::Decode)
        .then(|| req.prompt.iter().map(|t| json!([-f64::from(t % 1000) / 100.0, t, null])).collect::<Vec<_>>());
    let tokens = match state.engines[rank].submit_with(sim_request, transferred).await {
        Ok(Ok(rx)) => rx,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match api {
        Api::Chat => format!("chatcmpl-{}-{n}", state.port),
        Api::Completion => format!("cmpl-{}-{n}", state.port),
        Api::Generate => format!("{:032x}", (u128::from(state.port) << 64) | u128::from(n)),
    };
    let ctx = Ctx {
        api,
        id,
        model: req.model.clone().unwrap_or_else(|| state.config.model_name.clone()),
        created: unix_now(),
        prompt_tokens,
        stopped_early,
        start,
        time_scale: state.config.time_scale,
        include_usage: req.include_usage,
        publish: publish.map(|room| (state.rooms.clone(), room)),
        kv_params,
        input_logprobs: input_logprobs.map(Value::Array),
        return_logprob: req.return_logprob,
        die_after: faults.die_after_tokens,
        stall_after: faults.stall_after_tokens,
        error_after: faults.error_event_after_tokens,
        output_offset: req.output_offset,
    };
    if req.stream {
        stream_response(ctx, tokens)
    } else {
        full_response(ctx, tokens).await
    }
}

/// What a response needs to know about its request.
struct Ctx {
    api: Api,
    id: String,
    model: String,
    created: u64,
    prompt_tokens: u32,
    stopped_early: bool,
    start: Instant,
    time_scale: f64,
    include_usage: bool,
    die_after: Option<u32>,
    stall_after: Option<u32>,
    error_after: Option<u32>,
    /// Index of the first output token in the whole answer (continuations).
    output_offset: u32,
    /// Prefill role: publish this room once the prompt is computed.
    publish: Option<(Arc<pd::Rooms>, u64)>,
    /// Prefill role, vLLM style: parameters for the decode worker.
    kv_params: Option<Value>,
    /// `return_logprob`: prompt logprobs (null on decode workers: the prefill side has them).
    input_logprobs: Option<Value>,
    return_logprob: bool,
}

impl Ctx {
    /// A token arrived: the first one means the prompt is computed (prefill hand-over point).
    fn on_token(&self, index: u32) {
        if index == 0 {
            if let Some((rooms, room)) = &self.publish {
                rooms.publish(*room, self.prompt_tokens);
            }
        }
    }

    /// The complete response, with the PD and logprob additions.
    fn full(&self, cached: u32, completion: u32) -> Value {
        let mut v = self.summary(cached, completion).response(self.api);
        if let Some(p) = &self.kv_params {
            v["kv_transfer_params"] = p.clone();
        }
        if self.return_logprob && self.api == Api::Generate {
            v["meta_info"]["input_token_logprobs"] = self.input_logprobs.clone().unwrap_or(Value::Null);
        }
        v
    }

    fn summary(&self, cached_tokens: u32, completion_tokens: u32) -> Summary<'_> {
        Summary {
            id: &self.id,
            model: &self.model,
            created: self.created,
            prompt_tokens: self.prompt_tokens,
            cached_tokens,
            completion_tokens,
            stopped_early: self.stopped_early,
            e2e_latency: self.start.elapsed().as_secs_f64() * self.time_scale,
            output_offset: self.output_offset,
        }
    }
}

fn aborted() -> Response {
    let (tx, body) = ChannelBody::new(1);
    let _ = tx.try_send(Err(Died));
    Response::new(Body::new(body))
}

async fn full_response(ctx: Ctx, mut tokens: UnboundedReceiver<TokenMsg>) -> Response {
    let mut cached = 0;
    while let Some(msg) = tokens.recv().await {
        match msg {
            TokenMsg::Admitted { cached_tokens } => cached = cached_tokens,
            TokenMsg::Token { index, last } => {
                if ctx.die_after.is_some_and(|k| index >= k) {
                    return aborted();
                }
                if ctx.stall_after.is_some_and(|k| index >= k) {
                    // Wedged: the answer never comes (the request ends when the client leaves).
                    return std::future::pending().await;
                }
                if ctx.error_after.is_some_and(|k| index >= k) {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, "injected engine error");
                }
                ctx.on_token(index);
                if last {
                    return Json(ctx.full(cached, index + 1)).into_response();
                }
            }
        }
    }
    error(StatusCode::SERVICE_UNAVAILABLE, "the engine stopped before the request finished")
}

fn stream_response(ctx: Ctx, mut tokens: UnboundedReceiver<TokenMsg>) -> Response {
    let (tx, body) = ChannelBody::new(64);
    tokio::spawn(async move {
        let mut cached = 0;
        while let Some(msg) = tokens.recv().await {
            let (index, last) = match msg {
                TokenMsg::Admitted { cached_tokens } => {
                    cached = cached_tokens;
                    continue;
                }
                TokenMsg::Token { index, last } => (index, last),
            };
            if ctx.die_after.is_some_and(|k| index >= k) {
                let _ = tx.send(Err(Died)).await;
                return;
            }
            if ctx.stall_after.is_some_and(|k| index >= k) {
                // Wedged: nothing more is sent, the connection stays open until the client leaves.
                tx.closed().await;
                return;
            }
            if ctx.error_after.is_some_and(|k| index >= k) {
                let mut chunk = String::new();
                let body =
                    json!({"error": {"message": "injected engine error", "type": "InternalServerError", "code": 500}});
                wire::push_sse(&mut chunk, &body);
                chunk.push_str(wire::SSE_DONE);
                let _ = tx.send(Ok(Bytes::from(chunk))).await;
                return;
            }
            ctx.on_token(index);
            let summary = ctx.summary(cached, index + 1);
            let mut chunk = summary.token_chunk(ctx.api, index, last);
            if index == 0 && ctx.return_logprob && ctx.api == Api::Generate {
                // SGLang sends the prompt logprobs with the first streamed chunk.
                let mut first: Value = json!({"text": summary.text(1), "meta_info": {}});
                if let Some(Value::Object(m)) =
                    serde_json::from_str::<Value>(chunk.trim_start_matches("data: ").trim_end())
                        .ok()
                        .and_then(|v| v.get("meta_info").cloned())
                {
                    first["meta_info"] = Value::Object(m);
                }
                first["meta_info"]["input_token_logprobs"] = ctx.input_logprobs.clone().unwrap_or(Value::Null);
                chunk = String::new();
                wire::push_sse(&mut chunk, &first);
                if last {
                    chunk.push_str(wire::SSE_DONE);
                }
                if tx.send(Ok(Bytes::from(chunk))).await.is_err() || last {
                    return;
                }
                continue;
            }
            if last {
                if ctx.include_usage && ctx.api != Api::Generate {
                    chunk.push_str(&summary.usage_chunk(ctx.api));
                }
                chunk.push_str(wire::SSE_DONE);
            }
            // A closed channel means the client went away: dropping `tokens` cancels the request.
            if tx.send(Ok(Bytes::from(chunk))).await.is_err() || last {
                return;
            }
        }
    });
    let mut resp = Response::new(Body::new(body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

async fn health(State(state): State<Shared>) -> Response {
    state.health_probes.fetch_add(1, Ordering::Relaxed);
    if state.faults().health_fail {
        return error(StatusCode::SERVICE_UNAVAILABLE, "injected health failure");
    }
    StatusCode::OK.into_response()
}

/// Runs a one-token generation through the engine, as SGLang's `/health_generate` does.
async fn health_generate(State(state): State<Shared>) -> Response {
    let faults = state.faults();
    if faults.health_fail || faults.hang {
        return error(StatusCode::SERVICE_UNAVAILABLE, "injected health failure");
    }
    let probe = SimRequest { prompt: vec![1, 2, 3, 4], output_tokens: 1 };
    match state.engine().submit(probe).await {
        Ok(Ok(mut rx)) => {
            while let Some(msg) = rx.recv().await {
                if matches!(msg, TokenMsg::Token { last: true, .. }) {
                    return StatusCode::OK.into_response();
                }
            }
            error(StatusCode::SERVICE_UNAVAILABLE, "engine stopped")
        }
        _ => error(StatusCode::SERVICE_UNAVAILABLE, "engine unavailable"),
    }
}

async fn models(State(state): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": state.config.model_name, "object": "model", "created": unix_now(),
        "owned_by": "switchyard-sim", "root": state.config.model_name,
        "max_model_len": state.config.profile.kv_capacity_tokens.min(131_072),
    }]}))
}

async fn model_info(State(state): State<Shared>) -> Json<Value> {
    Json(json!({
        "model_path": state.config.model_name,
        "tokenizer_path": state.config.model_name,
        "is_generation": true,
    }))
}

async fn server_info(State(state): State<Shared>) -> Json<Value> {
    let c = &state.config;
    Json(json!({
        "model_path": c.model_name,
        "served_model_name": c.model_name,
        "simulator": "switchyard-sim",
        "version": env!("CARGO_PKG_VERSION"),
        "role": c.role,
        "disaggregation_mode": match c.role { super::Role::Plain => "null", super::Role::Prefill => "prefill", super::Role::Decode => "decode" },
        "profile": c.profile,
        "speed": c.speed,
        "time_scale": c.time_scale,
        "max_running_requests": c.profile.max_running_requests,
        "chunked_prefill_size": c.profile.chunked_prefill_size,
        "page_size": c.profile.page_size,
        "max_total_num_tokens": c.profile.kv_capacity_tokens,
        "dp_size": c.dp_size,
    }))
}

async fn load(State(state): State<Shared>) -> Json<Value> {
    let s = state.stats();
    Json(json!({
        "load": s.running + s.waiting,
        // As SGLang's scheduler reports it: running and waiting together.
        "num_reqs": s.running + s.waiting,
        "num_waiting_reqs": s.waiting,
        "num_tokens": s.kv_used_tokens,
        "token_usage": s.kv_used_tokens.saturating_sub(s.kv_evictable_tokens) as f64 / s.kv_capacity_tokens.max(1) as f64,
        "pending_prefill_tokens": s.pending_prefill_tokens,
    }))
}

async fn flush_cache(State(state): State<Shared>) -> Response {
    for engine in &state.engines {
        if let Err(e) = engine.send(Command::FlushCache) {
            return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
        }
    }
    (StatusCode::OK, "Cache flushed.\n").into_response()
}

async fn metrics_text(State(state): State<Shared>) -> Response {
    let text = metrics::render(&state.config.model_name, &state.stats());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn get_faults(State(state): State<Shared>) -> Json<Faults> {
    Json(state.faults())
}

async fn set_faults(State(state): State<Shared>, body: Bytes) -> Response {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid faults: {e}")),
    };
    match state.set_faults(faults) {
        Ok(()) => Json(state.faults()).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}
