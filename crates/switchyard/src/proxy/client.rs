//! The pooled HTTP/1.1 client (hyper-util, keep-alive; rustls for `https://` workers) and one
//! function that sends a buffered request to a worker.

use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Largest non-streamed answer read whole before relaying (a worker can't make the router
/// hold more for one request).
pub const MAX_BUFFERED: usize = 64 << 20;

/// The header that marks the routers a request went through (loop detection).
pub const HOP_HEADER: &str = "x-switchyard-hop";

/// The header a data-parallel engine reads the chosen rank from (vLLM's; SGLang reads the
/// `data_parallel_rank` body field, which such workers get too).
pub const DP_RANK_HEADER: &str = "x-data-parallel-rank";

/// The client type used for every upstream call.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds a keep-alive pooled client that trusts the system's roots. Health probes get their
/// own so they never queue behind inference traffic.
pub fn new_client(connect_timeout: Duration, pool_max_idle_per_host: usize) -> HttpClient {
    new_client_with_tls(connect_timeout, pool_max_idle_per_host, crate::tls::default_client_config())
}

/// [`new_client`] with its own TLS configuration (extra roots, a client certificate).
pub fn new_client_with_tls(
    connect_timeout: Duration,
    pool_max_idle_per_host: usize,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    // The TLS connector needs the inner one to pass https URLs on.
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(pool_max_idle_per_host)
        .build(connector)
}

/// `body` (a JSON object) with `"key": raw` appended as its last member, so it wins over a
/// member of the same name the client sent (JSON parsers keep the last). One copy, no parse;
/// `None` when `body` does not end like an object.
fn with_member(body: &[u8], key: &str, raw: &str) -> Option<Bytes> {
    let end = body.iter().rposition(|b| !b.is_ascii_whitespace()).filter(|&i| body[i] == b'}')?;
    let start = body.iter().position(|b| !b.is_ascii_whitespace()).filter(|&i| body[i] == b'{')?;
    let empty = body[start + 1..end].iter().all(u8::is_ascii_whitespace);
    let mut out = Vec::with_capacity(body.len() + key.len() + raw.len() + 4);
    out.extend_from_slice(&body[..end]);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(serde_json::Value::from(key).to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(raw.as_bytes());
    out.push(b'}');
    Some(Bytes::from(out))
}

/// Why a request to a worker failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection could not be made: nothing reached the worker, retrying elsewhere is safe.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The request was (possibly) sent but no valid response came back.
    #[error("{0}")]
    Transport(String),
    /// No response headers within the timeout.
    #[error("timed out")]
    Timeout,
    /// The target URL could not be formed.
    #[error("invalid upstream URL: {0}")]
    Url(String),
}

/// Statuses that mean "this worker can't serve it now; another may" (and count against
/// the worker's circuit breaker): 5xx, 408, 429, and anything outside the valid range. Other
/// 4xx are the client's and pass through untouched.
pub fn is_worker_failure(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || !(100..600).contains(&status.as_u16())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the client recomputes.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// Copies end-to-end headers from `from` into `to`: not the hop-by-hop ones, nor any header
/// the sender named in `Connection` (those are for one hop too, RFC 9110 §7.6.1).
pub fn forward_headers(from: &HeaderMap, to: &mut HeaderMap) {
    let named: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for (name, value) in from {
        if !is_hop_by_hop(name) && !named.iter().any(|n| n == name.as_str()) {
            to.append(name.clone(), value.clone());
        }
    }
}

/// How the router presents itself to workers.
#[derive(Debug, Clone)]
pub struct Identity {
    /// This router's id in the loop-detection header.
    pub hop: String,
    /// `Authorization` sent to workers (`--worker-api-key`).
    pub worker_auth: Option<HeaderValue>,
    /// Whether the client's `Authorization` stays with the router (it was the router's key).
    pub keep_client_auth: bool,
}

impl Identity {
    /// A fresh id, no worker key, the client's `Authorization` forwarded.
    pub fn anonymous() -> Self {
        Self { hop: format!("{:016x}", rand::random::<u64>()), worker_auth: None, keep_client_auth: false }
    }
}

/// A client plus the timeout applied to each upstream request.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The pooled client.
    pub client: HttpClient,
    /// Time allowed until the response headers arrive (and, separately, to read a whole body).
    pub timeout: Duration,
    /// How requests present the router to workers.
    pub identity: std::sync::Arc<Identity>,
}

impl Upstream {
    /// An upstream with `client` and `timeout` and an anonymous identity (tests, tools).
    pub fn new(client: HttpClient, timeout: Duration) -> Self {
        Self { client, timeout, identity: std::sync::Arc::new(Identity::anonymous()) }
    }

    /// Sends `body` to `base_url` + `path` with the client's end-to-end `headers`.
    pub async fn send(
        &self,
        method: Method,
        base_url: &str,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, SendError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{base_url}{path}"))
            .body(Full::new(body))
            .map_err(|e| SendError::Url(e.to_string()))?;
        forward_headers(headers, req.headers_mut());
        crate::telemetry::inject_current(req.headers_mut());
        let id = &self.identity;
        if id.keep_client_auth || id.worker_auth.is_some() {
            req.headers_mut().remove(header::AUTHORIZATION);
        }
        if let Some(auth) = &id.worker_auth {
            req.headers_mut().insert(header::AUTHORIZATION, auth.clone());
        }
        let hops = match headers.get(HOP_HEADER).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {}", id.hop),
            None => id.hop.clone(),
        };
        if let Ok(v) = HeaderValue::from_str(&hops) {
            req.headers_mut().insert(HOP_HEADER, v);
        }
        if !req.headers().contains_key(header::CONTENT_TYPE) {
            req.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => Err(SendError::Timeout),
            Ok(Err(e)) if e.is_connect() => Err(SendError::Connect(error_chain(&e))),
            Ok(Err(e)) => Err(SendError::Transport(error_chain(&e))),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// POSTs `body` to `worker`, telling a data-parallel rank which one it is.
    pub async fn send_to(
        &self,
        worker: &crate::workers::Worker,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, SendError> {
        let Some(dp) = worker.dp_rank() else {
            return self.send(Method::POST, worker.url(), path, headers, body).await;
        };
        let body = match dp.in_body {
            true => with_member(&body, "data_parallel_rank", &dp.rank.to_string()).unwrap_or(body),
            false => body,
        };
        let mut headers = headers.clone();
        headers.insert(HeaderName::from_static(DP_RANK_HEADER), HeaderValue::from(dp.rank));
        self.send(Method::POST, worker.url(), path, &headers, body).await
    }

    /// GETs (or POSTs an empty body to) a worker endpoint and buffers the answer.
    pub async fn fetch(&self, method: Method, base_url: &str, path: &str) -> Result<(u16, Bytes), SendError> {
        self.fetch_bounded(method, base_url, path, MAX_BUFFERED).await
    }

    /// [`Upstream::fetch`], the answer's body limited to `limit` bytes (an error beyond).
    pub async fn fetch_bounded(
        &self,
        method: Method,
        base_url: &str,
        path: &str,
        limit: usize,
    ) -> Result<(u16, Bytes), SendError> {
        let resp = self.send(method, base_url, path, &HeaderMap::new(), Bytes::new()).await?;
        let status = resp.status().as_u16();
        Ok((status, self.read_bounded(resp.into_body(), limit).await?))
    }

    /// Reads a whole (non-streamed) answer body, bounded in size and by the timeout.
    pub async fn read_whole(&self, body: Incoming) -> Result<Bytes, SendError> {
        self.read_bounded(body, MAX_BUFFERED).await
    }

    async fn read_bounded(&self, body: Incoming, limit: usize) -> Result<Bytes, SendError> {
        match tokio::time::timeout(self.timeout, Limited::new(body, limit).collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) => Err(SendError::Transport(e.to_string())),
            Err(_) => Err(SendError::Timeout),
        }
    }
}

/// The error with its causes, so "connection refused" is visible behind hyper's summary.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_appended_member_wins_and_the_rest_is_kept() {
        let out = with_member(br#" {"a": 1, "data_parallel_rank": 7} "#, "data_parallel_rank", "2").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!((v["a"].as_u64(), v["data_parallel_rank"].as_u64()), (Some(1), Some(2)));
        assert_eq!(&with_member(b"{}", "k", "3").unwrap()[..], br#"{"k":3}"#);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&with_member(b"{ }", "k", "3").unwrap()).unwrap()["k"],
            3
        );
        assert!(with_member(b"[1]", "k", "3").is_none() && with_member(b"{\"a\":1", "k", "3").is_none());
    }
}
