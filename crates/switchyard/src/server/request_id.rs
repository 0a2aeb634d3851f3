//! `x-request-id`: accepted from the client or generated, forwarded to the worker, echoed
//! back, and attached to every log line of the request.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use rand::Rng;
use tracing::Instrument;

/// The header name.
pub const REQUEST_ID: &str = "x-request-id";

fn valid(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// Middleware: ensures the request has an id and the response carries it.
pub async fn propagate(mut req: Request, next: Next) -> Response {
    let id = match req.headers().get(REQUEST_ID) {
        Some(v) if valid(v) => v.clone(),
        _ => {
            let generated = format!("{:016x}", rand::rng().random::<u64>());
            let v = HeaderValue::from_str(&generated).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
            req.headers_mut().insert(REQUEST_ID, v.clone());
            v
        }
    };
    let path = req.uri().path().to_owned();
    // The request's span, also its trace span: a client's `traceparent` makes it a child.
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        "request",
        id = id.to_str().unwrap_or(""),
        path = %path,
        otel.name = %format_args!("{} {path}", req.method()),
        otel.kind = "server",
        http.response.status_code = tracing::field::Empty,
    );
    crate::telemetry::continue_client_trace(&span, req.headers());
    let mut resp = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", resp.status().as_u16());
    resp.headers_mut().insert(REQUEST_ID, id);
    resp
}
