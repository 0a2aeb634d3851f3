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
    /// A worker did not answer in time.
    #[error("worker {worker} did not answer within {secs:.3} s (--request-timeout-secs)")]
    Timeout {
        /// Worker URL.
        worker: String,
        /// The timeout.
        secs: f64,
    },
}

impl ApiError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NoHealthyWorkers => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::WorkerUnreachable { .. } => StatusCode::BAD_GATEWAY,
            ApiError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) | ApiError::PayloadTooLarge { .. } => "invalid_request_error",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::Conflict(_) => "conflict_error",
            ApiError::NoHealthyWorkers => "service_unavailable",
            ApiError::WorkerUnreachable { .. } => "bad_gateway",
            ApiError::Timeout { .. } => "timeout",
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
        (
            status,
            Json(error_body(status, self.kind(), &self.to_string())),
        )
            .into_response()
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
            (
                ApiError::WorkerUnreachable {
                    worker: "w".into(),
                    reason: "r".into(),
                },
                502,
            ),
            (
                ApiError::Timeout {
                    worker: "w".into(),
                    secs: 1.0,
                },
                504,
            ),
        ];
        for (e, s) in cases {
            assert_eq!(e.status().as_u16(), s);
        }
    }
}
