//! Dispatch: choose a worker through the policy, forward, relay the response.

mod pd;
mod regular;

pub use pd::{PairPolicy, PdRouter};
pub use regular::{is_worker_failure, Observed, RegularRouter, RoutedTo};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Response};
use bytes::Bytes;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::load;
use crate::policies::{RoutingError, RoutingPolicy};
use crate::request::RequestView;

/// Headers that carry a session affinity key, in order of preference.
const ROUTING_KEY_HEADERS: [&str; 2] = ["x-session-id", "x-user-id"];

/// The request view both routers route on: body fields plus the header session key.
fn parse_view(headers: &HeaderMap, body: &[u8]) -> Result<RequestView, ApiError> {
    let key = ROUTING_KEY_HEADERS.iter().find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()));
    RequestView::parse(body, key).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// Requests held at once for capacity (`--mu-overload queue|shed`); past this, a request
/// gets the policy's final answer (best effort or shed) at once instead of waiting.
const MAX_HELD: usize = 4096;
static HELD: AtomicUsize = AtomicUsize::new(0);

/// Calls `select` until it chooses. While the policy answers [`RoutingError::Saturated`]
/// the request is held here (never on a policy's thread): it waits for any in-flight
/// request to end, or the policy's recheck time, and asks again with the time it has
/// waited in `view.waited`, so the policy itself decides when to dispatch or shed.
async fn select_holding<T>(
    view: &mut RequestView,
    mut select: impl FnMut(&RequestView) -> Result<T, RoutingError>,
) -> Result<T, RoutingError> {
    let start = Instant::now();
    let mut holding = false;
    let result = loop {
        view.waited = start.elapsed();
        match select(view) {
            Err(RoutingError::Saturated { recheck }) => {
                if !holding {
                    holding = true;
                    if HELD.fetch_add(1, Ordering::Relaxed) >= MAX_HELD {
                        // Full: make the policy decide now as if the budget were spent.
                        view.waited = Duration::from_secs(3600);
                        let final_answer = select(view);
                        if !matches!(final_answer, Err(RoutingError::Saturated { .. })) {
                            break final_answer;
                        }
                    }
                }
                load::wait_for_capacity(recheck.clamp(Duration::from_millis(1), Duration::from_secs(1))).await;
            }
            other => break other,
        }
    };
    if holding {
        HELD.fetch_sub(1, Ordering::Relaxed);
    }
    view.waited = Duration::ZERO;
    result
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
