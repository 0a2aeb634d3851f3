//! Streaming overhead: a worker that streams SSE on a fixed schedule (first chunk at once,
//! then one every interval), and a client that measures time to the first body chunk. Run
//! both directly and through a router in the same run; the difference is the router's
//! time-to-first-byte overhead (`bench/overhead.sh`, `STREAM=1`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::Sleep;

/// `switchyard-bench stream-worker`.
#[derive(Debug, clap::Args)]
pub struct StreamWorkerArgs {
    /// Port to listen on (127.0.0.1).
    #[arg(long)]
    pub port: u16,
    /// SSE chunks per answer (before `[DONE]`).
    #[arg(long, default_value_t = 8)]
    pub chunks: usize,
    /// Time between chunks after the first, milliseconds.
    #[arg(long, default_value_t = 5)]
    pub interval_ms: u64,
}

/// `switchyard-bench ttfb`.
#[derive(Debug, clap::Args)]
pub struct TtfbArgs {
    /// Base URL of the target (a worker or a router).
    #[arg(long)]
    pub url: String,
    /// Requests in all.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// A label for the output line.
    #[arg(long, default_value = "target")]
    pub label: String,
}

/// An SSE answer: the first chunk at once, the rest on the schedule, then `[DONE]`.
struct Schedule {
    sent: usize,
    chunks: usize,
    interval: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Body for Schedule {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent > self.chunks {
            return Poll::Ready(None);
        }
        if self.sent > 0 {
            let interval = self.interval;
            let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        let n = self.sent;
        self.sent += 1;
        let data = if n == self.chunks {
            Bytes::from_static(b"data: [DONE]\n\n")
        } else {
            Bytes::from(format!("data: {{\"choices\":[{{\"index\":0,\"text\":\"t{n} \"}}]}}\n\n"))
        };
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Serves the scheduled stream on every POST (and 200 on `/health`) until the process ends.
pub async fn stream_worker(args: &StreamWorkerArgs) -> Result<(), String> {
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await.map_err(|e| e.to_string())?;
    let (chunks, interval) = (args.chunks, Duration::from_millis(args.interval_ms));
    loop {
        let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                let is_post = req.method() == hyper::Method::POST;
                let _ = req.into_body().collect().await;
                let body: http_body_util::combinators::BoxBody<Bytes, Infallible> = if is_post {
                    Schedule { sent: 0, chunks, interval, sleep: None }.boxed()
                } else {
                    Full::new(Bytes::from_static(b"ok")).boxed()
                };
                let content_type = if is_post { "text/event-stream" } else { "text/plain" };
                Ok::<_, Infallible>(
                    Response::builder().header("content-type", content_type).body(body).unwrap_or_default(),
                )
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Measures time to the first body chunk; prints p50/p90/p99 in microseconds.
pub async fn ttfb(args: &TtfbArgs) -> Result<(), String> {
    let client = Arc::new(crate::client::http_client());
    let per_task = args.requests.div_ceil(args.concurrency.max(1));
    let url = format!("{}/v1/completions", args.url.trim_end_matches('/'));
    let tasks: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(per_task);
                let mut ends = Vec::with_capacity(per_task);
                for _ in 0..per_task {
                    let req = Request::post(&url)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(br#"{"prompt":"hi","stream":true,"max_tokens":8}"#)))
                        .map_err(|e| e.to_string())?;
                    let started = Instant::now();
                    let resp = client.request(req).await.map_err(|e| e.to_string())?;
                    let mut body = resp.into_body();
                    let _first = body.frame().await;
                    times.push(started.elapsed().as_secs_f64() * 1e6);
                    while body.frame().await.is_some() {}
                    ends.push(started.elapsed().as_secs_f64() * 1e6);
                }
                Ok::<_, String>((times, ends))
            })
        })
        .collect();
    let (mut all, mut ends) = (Vec::new(), Vec::new());
    for t in tasks {
        let (times, end) = t.await.map_err(|e| e.to_string())??;
        all.extend(times);
        ends.extend(end);
    }
    all.sort_by(f64::total_cmp);
    ends.sort_by(f64::total_cmp);
    let p = |v: &[f64], q: f64| v[((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1))];
    println!(
        "{:<24} ttfb p50 {:>8.0} µs  p90 {:>8.0} µs  p99 {:>8.0} µs  end p50 {:>8.0} µs  p99 {:>8.0} µs  ({} requests)",
        args.label,
        p(&all, 0.5),
        p(&all, 0.9),
        p(&all, 0.99),
        p(&ends, 0.5),
        p(&ends, 0.99),
        all.len()
    );
    Ok(())
}
