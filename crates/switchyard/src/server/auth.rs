//! Who may call what: `--api-key` on admin routes, `--inference-api-key` on inference routes.
//! Tokens are compared in constant time, so response timing leaks nothing about them; the
//! scheme is case-insensitive (`Bearer`, `bearer`), as RFC 9110 says.
//!
//! Admin changes without a key are served only where that is safe: a loopback bind, or an
//! operator's explicit `--allow-unauthenticated-admin`. Otherwise anyone reaching the port
//! could add a worker of theirs and receive other users' prompts.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// What a group of routes requires.
#[derive(Debug, Clone)]
pub enum Access {
    /// Anyone.
    Open,
    /// `Authorization: Bearer <key>`.
    Key(String),
    /// Nobody (admin changes on a public bind without a key): answered 403 with the reason.
    Disabled(&'static str),
}

impl Access {
    /// `key` if set, else open (inference routes).
    pub fn key_or_open(key: &Option<String>) -> Self {
        key.clone().map_or(Access::Open, Access::Key)
    }
}

/// Equal-length-independent constant-time comparison.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// The bearer token of an `Authorization` value, whatever the scheme's case.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn authorized(req: &Request, key: &str) -> bool {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .is_some_and(|token| constant_time_eq(token.as_bytes(), key.as_bytes()))
}

/// Middleware: enforces `access`.
pub async fn require(State(access): State<Access>, req: Request, next: Next) -> Response {
    match &access {
        Access::Open => next.run(req).await,
        Access::Key(k) if authorized(&req, k) => next.run(req).await,
        Access::Key(_) => ApiError::Unauthorized.into_response(),
        Access::Disabled(why) => ApiError::Forbidden((*why).to_owned()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_whole_tokens() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        for v in ["Bearer k", "bearer k", "BEARER  k ", " Bearer k"] {
            assert_eq!(bearer_token(v), Some("k"), "{v}");
        }
        assert_eq!(bearer_token("Basic k"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
