//! Dispatch: choose a worker through the policy, forward, relay the response.

mod pd;
mod regular;

pub use pd::{PairPolicy, PdRouter};
pub use regular::{is_worker_failure, Observed, RegularRouter, RoutedTo};

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Response};
use bytes::Bytes;

use crate::error::ApiError;
use crate::policies::RoutingPolicy;
use crate::request::RequestView;

/// Headers that carry a session affinity key, in order of preference.
const ROUTING_KEY_HEADERS: [&str; 2] = ["x-session-id", "x-user-id"];

/// The request view both routers route on: body fields plus the header session key.
fn parse_view(headers: &HeaderMap, body: &[u8]) -> Result<RequestView, ApiError> {
    let key = ROUTING_KEY_HEADERS.iter().find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()));
    RequestView::parse(body, key).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// The router for the configured mode.
#[derive(Debug, Clone)]
pub enum Dispatch {
    /// Whole requests to one pool.
    Regular(RegularRouter),
    /// Prefill/decode pairs.
    Pd(PdRouter),
}

impl Dispatch {
    /// Routes one inference request.
    pub async fn route(
        &self,
        route: &'static str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, ApiError> {
        match self {
            Dispatch::Regular(r) => r.route(route, headers, body).await,
            Dispatch::Pd(r) => r.route(route, headers, body).await,
        }
    }

    /// The policy reported for the router (the prefill pool's in PD mode with split policies).
    pub fn policy(&self) -> &Arc<dyn RoutingPolicy> {
        match self {
            Dispatch::Regular(r) => r.policy(),
            Dispatch::Pd(r) => r.policy().primary(),
        }
    }
}
