//! Admission control: at most `max_concurrent` requests proxied at once, a bounded FIFO
//! queue in front (tokio's semaphore is fair), 429 + `Retry-After` when the queue is full,
//! 408 when a request waited longer than the queue timeout. A slot is held until the
//! response body ends, streams included.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::AdmissionConfig;
use crate::error::ApiError;

/// The limiter.
#[derive(Debug)]
pub struct Admission {
    config: AdmissionConfig,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
}

impl Admission {
    /// A limiter for `config`.
    pub fn new(config: AdmissionConfig) -> Self {
        Self { slots: Arc::new(Semaphore::new(config.max_concurrent)), waiting: AtomicUsize::new(0), config }
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits for a slot (bounded in count and time).
    pub async fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.config.queue_size {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            let retry_after_secs = self.config.queue_timeout.as_secs().clamp(1, 60);
            return Err(ApiError::QueueFull { retry_after_secs });
        }
        let waited = tokio::time::timeout(self.config.queue_timeout, self.slots.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(ApiError::NoHealthyWorkers),
            Err(_) => Err(ApiError::QueueTimeout { secs: self.config.queue_timeout.as_secs_f64() }),
        }
    }
}

/// Ties `permit` to `response`'s body.
pub fn hold_until_done(response: Response, permit: OwnedSemaphorePermit) -> Response {
    let (parts, inner) = response.into_parts();
    Response::from_parts(parts, Body::new(super::holding_body::HoldingBody::new(inner, permit)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn full_queue_is_429_and_a_long_wait_is_408() {
        let a = Arc::new(Admission::new(AdmissionConfig {
            max_concurrent: 1,
            queue_size: 1,
            queue_timeout: Duration::from_secs(5),
        }));
        let held = a.admit().await.unwrap();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.admit().await.map(|_| ()) })
        };
        while a.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(a.admit().await, Err(ApiError::QueueFull { .. })));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(matches!(waiter.await.unwrap(), Err(ApiError::QueueTimeout { .. })));
        drop(held);
        assert!(a.admit().await.is_ok(), "slot freed when the permit drops");
    }
}
