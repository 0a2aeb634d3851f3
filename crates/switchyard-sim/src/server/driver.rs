//! Runs an [`Engine`] against the wall clock, `time_scale` × faster than real hardware.
//!
//! The engine computes each step's duration in unscaled time; the driver sleeps until the
//! step's scaled end (an absolute deadline, so timer rounding never accumulates) and then
//! delivers the step's tokens. Requests whose client went away are cancelled in the engine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use switchyard_kv_events::publisher::Publisher;
use switchyard_kv_events::EventBatch;

use crate::model::{Engine, EngineEvent, EngineStats, RequestId, SimRequest, SubmitError};

/// What the engine tells one request's handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMsg {
    /// Entered the running batch with this many prompt tokens from the prefix cache.
    Admitted {
        /// Cached prompt tokens.
        cached_tokens: u32,
    },
    /// Token `index` was produced; `last` marks the end.
    Token {
        /// Position in the output.
        index: u32,
        /// Final token.
        last: bool,
    },
}

/// Where an engine publishes its KV events, and the data-parallel rank its batches carry.
pub type KvEventSink = (Arc<Publisher>, Option<i64>);

/// Commands to the engine task.
#[derive(Debug)]
pub enum Command {
    /// Queue a request; its tokens go to `tokens`.
    Submit {
        /// The request.
        request: SimRequest,
        /// Its prompt KV arrived from a prefill worker (PD decode).
        transferred: bool,
        /// Where its tokens go.
        tokens: mpsc::UnboundedSender<TokenMsg>,
        /// Accepted, or why not.
        reply: oneshot::Sender<Result<RequestId, SubmitError>>,
    },
    /// Drop every unreferenced prefix-cache page.
    FlushCache,
    /// Set the fault slow-down factor.
    SetSlowdown(f64),
}

/// A cloneable handle to a running engine task.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<EngineStats>>,
}

/// The engine task has stopped (the worker is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the simulated engine has stopped")]
pub struct EngineStopped;

impl EngineHandle {
    /// Starts the engine task. It ends when every handle is dropped.
    pub fn spawn(engine: Engine, time_scale: f64) -> Self {
        Self::spawn_publishing(engine, time_scale, None)
    }

    /// [`EngineHandle::spawn`]; with a sink, the engine records its prefix cache's changes and
    /// publishes each step's as one batch when the step completes.
    pub fn spawn_publishing(mut engine: Engine, time_scale: f64, kv_events: Option<KvEventSink>) -> Self {
        if kv_events.is_some() {
            engine.record_kv_events();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(engine.stats()));
        tokio::spawn(run(engine, time_scale.max(1e-6), rx, stats.clone(), kv_events));
        Self { tx, stats }
    }

    /// Queues a request and returns the stream of its tokens.
    pub async fn submit(
        &self,
        request: SimRequest,
    ) -> Result<Result<mpsc::UnboundedReceiver<TokenMsg>, SubmitError>, EngineStopped> {
        self.submit_with(request, false).await
    }

    /// Queues a request; `transferred` marks prompt KV received from a prefill worker.
    pub async fn submit_with(
        &self,
        request: SimRequest,
        transferred: bool,
    ) -> Result<Result<mpsc::UnboundedReceiver<TokenMsg>, SubmitError>, EngineStopped> {
        let (tokens, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        self.tx.send(Command::Submit { request, transferred, tokens, reply }).map_err(|_| EngineStopped)?;
        match answer.await {
            Ok(Ok(_)) => Ok(Ok(rx)),
            Ok(Err(e)) => Ok(Err(e)),
            Err(_) => Err(EngineStopped),
        }
    }

    /// Sends a command that needs no answer.
    pub fn send(&self, cmd: Command) -> Result<(), EngineStopped> {
        self.tx.send(cmd).map_err(|_| EngineStopped)
    }

    /// Latest engine counters (refreshed after every step).
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

async fn run(
    mut engine: Engine,
    time_scale: f64,
    mut rx: mpsc::UnboundedReceiver<Command>,
    stats: Arc<Mutex<EngineStats>>,
    kv_events: Option<KvEventSink>,
) {
    // Published when the step completes, before its tokens are delivered: an answer never
    // reaches its client before the cache change it made is on the wire.
    let send_kv = |engine: &mut Engine| {
        if let Some((publisher, rank)) = &kv_events {
            let events = engine.take_kv_events();
            if !events.is_empty() {
                let ts =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                publisher.publish(EventBatch { ts, events, data_parallel_rank: *rank }.encode());
            }
        }
    };
    let mut sinks: HashMap<RequestId, mpsc::UnboundedSender<TokenMsg>> = HashMap::new();
    let mut base = Instant::now();
    let mut virtual_elapsed = 0.0f64;
    loop {
        while let Ok(cmd) = rx.try_recv() {
            handle(&mut engine, &mut sinks, cmd);
        }
        let stepped = engine.step();
        let Some((duration, events)) = stepped else {
            send_kv(&mut engine);
            publish(&engine, &stats);
            // Nothing runnable: wait for work, then restart the clock from now.
            match rx.recv().await {
                Some(cmd) => handle(&mut engine, &mut sinks, cmd),
                None => return,
            }
            base = Instant::now();
            virtual_elapsed = 0.0;
            continue;
        };
        virtual_elapsed += duration / time_scale;
        tokio::time::sleep_until(base + Duration::from_secs_f64(virtual_elapsed)).await;
        send_kv(&mut engine);
        for ev in events {
            let (id, msg) = match ev {
                EngineEvent::Admitted { id, cached_tokens } => (id, TokenMsg::Admitted { cached_tokens }),
                EngineEvent::Token { id, index, last } => (id, TokenMsg::Token { index, last }),
                EngineEvent::Preempted { .. } => continue,
            };
            let delivered = sinks.get(&id).is_some_and(|s| s.send(msg).is_ok());
            let done = matches!(msg, TokenMsg::Token { last: true, .. });
            if !delivered && !done {
                engine.cancel(id);
            }
            if done || !delivered {
                sinks.remove(&id);
            }
        }
        publish(&engine, &stats);
    }
}

fn handle(engine: &mut Engine, sinks: &mut HashMap<RequestId, mpsc::UnboundedSender<TokenMsg>>, cmd: Command) {
    match cmd {
        Command::Submit { request, transferred, tokens, reply } => {
            let result = if transferred { engine.submit_transferred(request) } else { engine.submit(request) };
            if let Ok(id) = result {
                sinks.insert(id, tokens);
            }
            let _ = reply.send(result);
        }
        Command::FlushCache => engine.flush_cache(),
        Command::SetSlowdown(f) => engine.set_slowdown(f),
    }
}

fn publish(engine: &Engine, stats: &Mutex<EngineStats>) {
    if let Ok(mut s) = stats.lock() {
        *s = engine.stats();
    }
}
