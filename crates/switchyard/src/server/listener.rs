//! The accepting side: one HTTP/1 connection task per client, with the limits a public
//! listener needs and axum's `serve` does not set (it runs hyper without a timer).
//!
//! - **Header read timeout**: a client has `header_read_timeout` from the moment a request
//!   could start (a new connection, or the first byte of the next request on a kept-alive
//!   one) to send its headers; a half-sent request no longer holds a socket forever.
//! - **Idle keep-alive timeout**: a connection with nothing in flight and no byte of a new
//!   request closes after `keep_alive_timeout` (longer than the 60 s nginx keeps upstream
//!   connections, so a proxy in front closes first and never writes into a closed socket).
//! - **Connection cap**: past `max_connections` open connections a new client gets a 503 with
//!   a JSON error and is closed, instead of exhausting file descriptors.
//! - **Shutdown**: every connection is told at once; idle and half-open ones close
//!   immediately, ones with a request in flight finish it (hyper's graceful shutdown).
//!
//! - **TLS** (`--tls-cert-path`): the handshake runs in the connection's task under the header
//!   read timeout, so a client that stalls it holds nothing longer than one that stalls its
//!   headers; a failed handshake closes the connection.
//!
//! Body read timeouts are the handlers' (they own the body); TCP_NODELAY is set on every
//! connection (small SSE chunks otherwise wait for the client's delayed ACK: +40 ms TTFT).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

use super::holding_body::HoldingBody;
use crate::config::ListenerConfig;
use crate::metrics::Metrics;

/// Where a connection stands, for its read deadline.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for the first request, since accept: the header timeout applies.
    Fresh(Instant),
    /// Between requests since then: the keep-alive timeout applies.
    Idle(Instant),
    /// The next request's first byte came then: the header timeout applies.
    Head(Instant),
    /// A request is in flight (its body, its answer): the handlers' own timeouts apply.
    Busy,
}

/// One connection's phase, shared by its IO (reads) and its service (requests). A phase change
/// wakes a read waiting under the old phase's deadline (or under none, while busy).
#[derive(Debug)]
struct ConnState(Mutex<ConnInner>);

#[derive(Debug)]
struct ConnInner {
    phase: Phase,
    /// The reader to wake when the phase changes or the server closes.
    reader: Option<Waker>,
    /// The server is shutting down: close as soon as nothing is in flight.
    closing: bool,
}

impl ConnState {
    fn new() -> Self {
        Self(Mutex::new(ConnInner { phase: Phase::Fresh(Instant::now()), reader: None, closing: false }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, phase: Phase) {
        let mut inner = self.lock();
        inner.phase = phase;
        if let Some(w) = inner.reader.take() {
            w.wake();
        }
    }

    fn close(&self) {
        let mut inner = self.lock();
        inner.closing = true;
        if let Some(w) = inner.reader.take() {
            w.wake();
        }
    }
}

/// The socket, with its read deadline and the open-connections gauge.
struct TimedIo {
    inner: TcpStream,
    state: Arc<ConnState>,
    config: Arc<ListenerConfig>,
    deadline: Option<Pin<Box<Sleep>>>,
    metrics: Arc<Metrics>,
    open: Arc<AtomicUsize>,
}

impl Drop for TimedIo {
    fn drop(&mut self) {
        self.metrics.connection(false);
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let mut inner = self.state.lock();
                    if let Phase::Idle(_) = inner.phase {
                        inner.phase = Phase::Head(Instant::now());
                    }
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let deadline = {
                    let mut inner = self.state.lock();
                    inner.reader = Some(cx.waker().clone());
                    match inner.phase {
                        Phase::Busy => None,
                        _ if inner.closing => {
                            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "shutting down")))
                        }
                        Phase::Fresh(t) | Phase::Head(t) => Some(t + self.config.header_read_timeout),
                        Phase::Idle(t) => Some(t + self.config.keep_alive_timeout),
                    }
                };
                let Some(deadline) = deadline else {
                    self.deadline = None;
                    return Poll::Pending;
                };
                let sleep = self.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "client read timeout")));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Marks its connection busy while it lives (from a request's headers to the end of its answer).
struct Busy(Arc<ConnState>);

impl Busy {
    fn start(state: Arc<ConnState>) -> Self {
        state.set(Phase::Busy);
        Self(state)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.set(Phase::Idle(Instant::now()));
    }
}

/// The app as one connection's hyper service: the peer address as `ConnectInfo`, the
/// connection busy while a request runs.
struct ConnService {
    app: Router,
    peer: SocketAddr,
    state: Arc<ConnState>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<HoldingBody<Busy>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<HoldingBody<Busy>>, Infallible>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let busy = Busy::start(self.state.clone());
        let mut app = self.app.clone();
        Box::pin(async move {
            let resp = tower_service::Service::call(&mut app, req.map(Body::new)).await?;
            Ok(resp.map(|inner| HoldingBody::new(inner, busy)))
        })
    }
}

/// What a client past the connection cap reads before the router closes its connection.
const TOO_MANY_CONNECTIONS: &str = concat!(
    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n",
    "connection: close\r\ncontent-length: 109\r\n\r\n",
    r#"{"error":{"message":"too many open connections (--max-connections)","type":"service_unavailable","code":503}}"#
);

/// Answers a client past the cap: its request's first bytes are read (briefly, so an HTTP
/// client sees an answer to what it sent), then the 503 is written and the connection closed.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut first = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut first)).await;
        let _ = stream.write_all(TOO_MANY_CONNECTIONS.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Serves `app` on `listener` until `stop` changes (or its sender is dropped), then shuts
/// every connection down gracefully and returns once they have all ended.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ListenerConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<()>,
) {
    let config = Arc::new(config);
    let open = Arc::new(AtomicUsize::new(0));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: back off briefly, keep serving.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        if open.load(Ordering::Relaxed) >= config.max_connections {
            tracing::warn!(%peer, max = config.max_connections, "connection refused: too many open connections");
            connections.spawn(refuse(stream));
            continue;
        }
        let _ = stream.set_nodelay(true);
        open.fetch_add(1, Ordering::Relaxed);
        metrics.connection(true);
        let state = Arc::new(ConnState::new());
        let io = TimedIo {
            inner: stream,
            state: state.clone(),
            config: config.clone(),
            deadline: None,
            metrics: metrics.clone(),
            open: open.clone(),
        };
        let service = ConnService { app: app.clone(), peer, state: state.clone() };
        let stop = stop.clone();
        match tls.clone() {
            None => connections.spawn(serve_connection(io, service, state, stop)),
            Some(acceptor) => connections.spawn(async move {
                let mut closing = stop.clone();
                tokio::select! {
                    accepted = acceptor.accept(io) => match accepted {
                        Ok(io) => serve_connection(io, service, state, stop).await,
                        Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    },
                    _ = closing.changed() => {}
                }
            }),
        };
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Serves one connection's requests until it closes, or gracefully once `stop` changes.
async fn serve_connection<I>(io: I, service: ConnService, state: Arc<ConnState>, mut stop: watch::Receiver<()>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            state.close();
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_http_answer_with_a_json_body() {
        let (head, body) = TOO_MANY_CONNECTIONS.split_once("\r\n\r\n").unwrap();
        let length: usize =
            head.lines().find_map(|l| l.strip_prefix("content-length: ")).and_then(|v| v.parse().ok()).unwrap();
        assert_eq!(length, body.len());
        let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
        assert_eq!(v["error"]["code"], 503);
    }
}
