//! Regular mode's attempt: the whole request to one worker.

use axum::body::Body;
use axum::http::Response;

use super::attempt::{Attempt, Failure, Inner};
use crate::error::ApiError;
use crate::load::{Ending, InFlightGuard, Usage};
use crate::proxy::{buffered, check_whole, is_event_stream, is_worker_failure, relay_stream, SendError};

/// Sends the request to the guard's worker and relays its answer.
///
/// Connection failures, breaks before the response headers, worker-failure statuses (unless
/// this is the last chance, when the worker's own answer is relayed) and whole answers cut
/// mid-body are retried elsewhere; nothing has reached the client then. A stream is relayed
/// as it comes, its guard inside the body.
pub(super) async fn run(
    inner: &Inner,
    mut guards: Vec<InFlightGuard>,
    a: &Attempt<'_>,
) -> Result<Response<Body>, Failure> {
    let Some(mut guard) = guards.pop() else {
        return Err(Failure::fatal(ApiError::NoHealthyWorkers));
    };
    let worker = guard.worker().clone();
    let upstream = &inner.upstream;
    let timeout = || ApiError::Timeout { worker: worker.url().to_owned(), secs: upstream.timeout.as_secs_f64() };
    let resp = match upstream.send_to(&worker, a.route, a.headers, a.body.clone()).await {
        Ok(resp) => resp,
        Err(SendError::Timeout) => {
            guard.finish(Ending::Failed, Usage::default());
            return Err(Failure::fatal(timeout()));
        }
        Err(e) => {
            guard.finish(Ending::Failed, Usage::default());
            let error = ApiError::WorkerUnreachable { worker: worker.url().to_owned(), reason: e.to_string() };
            return Err(Failure::retry(error, vec![worker]));
        }
    };
    let status = resp.status();
    // A status outside 100–599 is never relayed: no client could read it.
    let relayable = (100..600).contains(&status.as_u16());
    if is_worker_failure(status) && (!a.last_chance || !relayable) {
        guard.finish(Ending::Failed, Usage::default());
        let error = ApiError::WorkerFailed { worker: worker.url().to_owned(), status: status.as_u16() };
        return Err(Failure::retry(error, vec![worker]));
    }
    if is_event_stream(&resp) {
        return Ok(relay_stream(resp, guard, a.stream));
    }
    // A whole (non-streamed) answer is read before anything is sent, so a worker that breaks
    // it mid-body is one more failed attempt, not a broken response.
    let (parts, incoming) = resp.into_parts();
    match upstream.read_whole(incoming).await.and_then(|b| match check_whole(status, &b) {
        Ok(()) => Ok(b),
        Err(e) => Err(SendError::Transport(e)),
    }) {
        Ok(collected) => {
            guard.mark_first_byte();
            guard.relay(status.as_u16());
            let mut usage = Usage::default();
            usage.scan(&collected);
            guard.finish(Ending::from_success(!is_worker_failure(status)), usage);
            Ok(buffered(parts, collected))
        }
        Err(SendError::Timeout) => {
            guard.finish(Ending::Failed, Usage::default());
            Err(Failure::fatal(timeout()))
        }
        Err(e) => {
            guard.finish(Ending::Failed, Usage::default());
            let error = ApiError::WorkerUnreachable {
                worker: worker.url().to_owned(),
                reason: format!("the response body broke: {e}"),
            };
            Err(Failure::retry(error, vec![worker]))
        }
    }
}
