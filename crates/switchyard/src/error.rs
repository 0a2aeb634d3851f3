//! Errors a client can see, and the one place that maps them to HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// No such route or resource.
    #[error("{0}")]
    NotFound(String),
    /// The change conflicts with current state (e.g. worker already registered).
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than `--max-payload-size`.
    #[error("request body exceeds the {limit}-byte limit (--max-payload-size)")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// No worker may serve the request.
    #[error("no healthy workers available")]
    NoHealthyWorkers,
    /// A worker could not be reached or broke the connection before answering.
    #[error("worker {worker} is unreachable: {reason}")]
    WorkerUnreachable {
        /// Worker URL.
        worker: String,
        /// What failed.
        reason: String,
    },
    /// Every attempt failed; the last one with this status (only when no response is kept).
    #[error("worker {worker} answered {status} and no other worker could serve the request")]
    WorkerFailed {
        /// Worker URL.
        worker: String,
        /// Its status.
        status: u16,
    },
    /// Admission queue full.
    #[error("too many requests: the admission queue is full (--queue-size); retry after {retry_after_secs} s")]
    QueueFull {
        /// Suggested wait.
        retry_after_secs: u64,
    },
    /// Waited too long for an admission slot.
    #[error("request waited {secs:.1} s for a free slot (--queue-timeout-secs)")]
    QueueTimeout {
        /// The queue timeout.
        secs: f64,
    },
    /// Shed by the policy: no worker can serve the request within its TTFT SLO.
    #[error("overloaded: no worker can serve the request within the TTFT SLO (--mu-overload shed); retry after {retry_after_secs} s")]
    Shed {
        /// Suggested wait.
        retry_after_secs: u64,
    },
    /// Missing or wrong bearer token.
    #[error("missing or invalid API key (Authorization: Bearer ...)")]
    Unauthorized,
    /// The client did not send its body in time.
    #[error("the request body did not arrive within {secs:.1} s (--body-read-timeout-secs)")]
    BodyTimeout {
        /// The timeout.
        secs: f64,
    },
    /// The request as a whole took too long.
    #[error("the request did not complete within {secs:.1} s (--request-total-timeout-secs)")]
    TotalTimeout {
        /// The timeout.
        secs: f64,
    },
    /// The request came back to this router (a worker URL that points at the router itself).
    #[error("request loop: this router forwarded the request to itself (a worker URL points back at the router)")]
    Loop,
    /// The operation is not allowed in this configuration.
    #[error("{0}")]
    Forbidden(String),
    /// The request names a model no worker serves.
    #[error("the model '{model}' does not exist here; available: {}", available.join(", "))]
    ModelNotFound {
        /// The model asked for.
        model: String,
        /// The models the router serves.
        available: Vec<String>,
    },
    /// The method is not served on this path.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// A worker did not answer in time.
    #[error("worker {worker} did not answer within {secs:.3} s (--request-timeout-secs)")]
    Timeout {
        /// Worker URL.
        worker: String,
        /// The timeout.
        secs: f64,
    },
    /// A PD prefill worker finished nothing while a prefill leg waited on it: hung.
    #[error("prefill worker {worker} finished no request in {secs:.3} s (--pd-prefill-timeout-secs)")]
    PrefillStalled {
        /// Worker URL.
        worker: String,
        /// The window it finished nothing in.
        secs: f64,
    },
}

impl ApiError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) | ApiError::ModelNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NoHealthyWorkers | ApiError::Shed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::WorkerUnreachable { .. } | ApiError::WorkerFailed { .. } => StatusCode::BAD_GATEWAY,
            ApiError::Timeout { .. } | ApiError::TotalTimeout { .. } | ApiError::PrefillStalled { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Loop => StatusCode::LOOP_DETECTED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::QueueTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) | ApiError::PayloadTooLarge { .. } => "invalid_request_error",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::ModelNotFound { .. } => "invalid_request_error",
            ApiError::Conflict(_) => "conflict_error",
            ApiError::NoHealthyWorkers => "service_unavailable",
            ApiError::Shed { .. } => "overloaded",
            ApiError::WorkerUnreachable { .. } | ApiError::WorkerFailed { .. } => "bad_gateway",
            ApiError::Timeout { .. }
            | ApiError::TotalTimeout { .. }
            | ApiError::BodyTimeout { .. }
            | ApiError::PrefillStalled { .. } => "timeout",
            ApiError::Loop => "loop_detected",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::MethodNotAllowed { .. } => "invalid_request_error",
            ApiError::QueueFull { .. } => "rate_limit_error",
            ApiError::QueueTimeout { .. } => "timeout",
            ApiError::Unauthorized => "authentication_error",
        }
    }
}

/// The OpenAI-style error body: `{"error": {"message", "type", "code"}}`.
pub fn error_body(status: StatusCode, kind: &str, message: &str) -> serde_json::Value {
    json!({"error": {"message": message, "type": kind, "code": status.as_u16()}})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = error_body(status, self.kind(), &self.to_string());
        if let ApiError::ModelNotFound { model, .. } = &self {
            // OpenAI's shape for this one: the code names the error, `param` the field.
            body["error"]["code"] = json!("model_not_found");
            body["error"]["param"] = json!("model");
            body["error"]["model"] = json!(model);
        }
        let mut resp = (status, Json(body)).into_response();
        let retry_after = match &self {
            ApiError::QueueFull { retry_after_secs } | ApiError::Shed { retry_after_secs } => Some(*retry_after_secs),
            ApiError::NoHealthyWorkers => Some(5),
            _ => None,
        };
        if let Some(secs) = retry_after {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(secs));
        }
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let cases = [
            (ApiError::BadRequest("x".into()), 400),
            (ApiError::NotFound("x".into()), 404),
            (ApiError::PayloadTooLarge { limit: 1 }, 413),
            (ApiError::NoHealthyWorkers, 503),
            (ApiError::Shed { retry_after_secs: 2 }, 503),
            (ApiError::WorkerUnreachable { worker: "w".into(), reason: "r".into() }, 502),
            (ApiError::Timeout { worker: "w".into(), secs: 1.0 }, 504),
            (ApiError::PrefillStalled { worker: "w".into(), secs: 1.0 }, 504),
            (ApiError::BodyTimeout { secs: 1.0 }, 408),
            (ApiError::Loop, 508),
            (ApiError::Forbidden("x".into()), 403),
            (ApiError::MethodNotAllowed { method: "PUT".into(), path: "/x".into() }, 405),
        ];
        for (e, s) in cases {
            assert_eq!(e.status().as_u16(), s);
        }
    }
}
