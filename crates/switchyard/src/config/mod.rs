//! Typed configuration: the command line (sglang-router's flag names where they exist),
//! validation, and the per-policy config types.

mod cli;

pub use cli::{parse_args, Args, ParseOutcome};

use std::time::Duration;

use crate::policies::PolicyConfig;

/// Health-check settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Time between probes of each worker.
    pub interval: Duration,
    /// Per-probe timeout.
    pub timeout: Duration,
    /// Consecutive failures that make a healthy worker unhealthy.
    pub failure_threshold: u32,
    /// Consecutive successes that make an unhealthy worker healthy again.
    pub success_threshold: u32,
    /// Path probed on each worker.
    pub endpoint: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            failure_threshold: 3,
            success_threshold: 2,
            endpoint: "/health".into(),
        }
    }
}

/// Everything the router needs to run, validated.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Bind address.
    pub host: String,
    /// Bind port.
    pub port: u16,
    /// Worker base URLs (`http://host:port`).
    pub worker_urls: Vec<String>,
    /// The routing policy.
    pub policy: PolicyConfig,
    /// Whole-request timeout (until the response headers arrive).
    pub request_timeout: Duration,
    /// Largest accepted request body, in bytes.
    pub max_payload_size: usize,
    /// Health checking.
    pub health: HealthConfig,
    /// Attempts per request on connection failures, each on a different worker.
    pub max_connect_attempts: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 30000,
            worker_urls: Vec::new(),
            policy: PolicyConfig::default(),
            request_timeout: Duration::from_secs(1800),
            max_payload_size: 512 << 20,
            health: HealthConfig::default(),
            max_connect_attempts: 3,
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A worker URL is not `http(s)://host:port`.
    #[error("invalid worker URL '{url}': {reason}")]
    WorkerUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A numeric setting is out of range.
    #[error("--{flag} {reason}")]
    Range {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Checks and normalises a worker URL: scheme http/https, a host, a port; no path.
/// Returns it without a trailing slash.
pub fn normalize_worker_url(url: &str) -> Result<String, ConfigError> {
    let err = |reason: &str| ConfigError::WorkerUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: hyper::Uri = url.parse().map_err(|_| err("not a URL"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        Some(_) => return Err(err("scheme must be http or https")),
        None => return Err(err("missing scheme (http:// or https://)")),
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| err("missing host"))?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(err("must not contain a path"));
    }
    if uri.query().is_some() {
        return Err(err("must not contain a query"));
    }
    let scheme = uri.scheme_str().unwrap_or("http");
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Ok(format!("{scheme}://{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_urls_are_validated_and_normalised() {
        assert_eq!(
            normalize_worker_url("http://127.0.0.1:8000/").unwrap(),
            "http://127.0.0.1:8000"
        );
        assert_eq!(
            normalize_worker_url("http://localhost").unwrap(),
            "http://localhost:80"
        );
        for bad in [
            "127.0.0.1:8000",
            "ftp://x:1",
            "http://x:1/v1",
            "http://",
            "not a url",
            "http://x:1?a=b",
        ] {
            assert!(normalize_worker_url(bad).is_err(), "{bad} accepted");
        }
    }
}
