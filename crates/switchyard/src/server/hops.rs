//! What a proxy owes the next hop: loop detection and the client's address.
//!
//! Every request the router sends upstream carries `x-switchyard-hop` with this router's
//! random id (appended to what came in). A request that arrives carrying the router's own id
//! has gone round in a loop — a worker URL that points back at the router — and gets 508 at
//! once, instead of fanning out into nested requests until something gives way. Chains of
//! different routers are fine, up to [`MAX_HOPS`].
//!
//! `X-Forwarded-For` and `Forwarded` get the peer address appended (never passed on as sent:
//! a client could otherwise claim any address).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

pub use crate::proxy::client::HOP_HEADER;

/// Routers a request may pass through in a chain.
pub const MAX_HOPS: usize = 8;

/// Whether `headers` name `id` among their hops, or more hops than allowed.
pub fn is_loop(headers: &HeaderMap, id: &str) -> bool {
    let hops: Vec<&str> = headers
        .get_all(HOP_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    hops.len() >= MAX_HOPS || hops.contains(&id)
}

fn append(headers: &mut HeaderMap, name: &'static str, value: &str) {
    let joined = match headers.get(name).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {value}"),
        _ => value.to_owned(),
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.remove(name);
        headers.insert(name, v);
    }
}

/// Middleware: 508 for a request that came back to this router; the peer address appended
/// to `X-Forwarded-For` and `Forwarded`.
pub async fn guard(State(id): State<std::sync::Arc<str>>, mut req: Request, next: Next) -> Response {
    if is_loop(req.headers(), &id) {
        return ApiError::Loop.into_response();
    }
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() {
        let ip = peer.ip();
        append(req.headers_mut(), "x-forwarded-for", &ip.to_string());
        let node = if ip.is_ipv6() { format!("for=\"[{ip}]\"") } else { format!("for={ip}") };
        append(req.headers_mut(), "forwarded", &node);
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_and_long_chains_are_detected() {
        let mut h = HeaderMap::new();
        assert!(!is_loop(&h, "me"));
        h.insert(HOP_HEADER, HeaderValue::from_static("a, b"));
        assert!(!is_loop(&h, "me"));
        h.append(HOP_HEADER, HeaderValue::from_static("me"));
        assert!(is_loop(&h, "me"));
        let mut long = HeaderMap::new();
        long.insert(HOP_HEADER, HeaderValue::from_static("1,2,3,4,5,6,7,8"));
        assert!(is_loop(&long, "me"));
    }

    #[test]
    fn forwarded_headers_are_appended_not_replaced() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        append(&mut h, "x-forwarded-for", "10.0.0.9");
        assert_eq!(h["x-forwarded-for"], "6.6.6.6, 10.0.0.9");
        append(&mut h, "forwarded", "for=10.0.0.9");
        assert_eq!(h["forwarded"], "for=10.0.0.9");
    }
}
