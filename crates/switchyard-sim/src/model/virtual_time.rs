//! Drives an [`Engine`] in virtual time: no clocks, no sleeps, deterministic for a seed.
//!
//! Used by the model's physics tests and by offline studies: feed arrivals (open loop) or
//! keep a fixed number of requests outstanding (closed loop) and read per-request timings.

use std::collections::HashMap;

use super::engine::{Engine, EngineEvent, RequestId, SimRequest};

/// Timings of one completed request, in virtual seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    /// When it was submitted.
    pub arrival: f64,
    /// When its first token was produced.
    pub first_token: f64,
    /// When its last token was produced.
    pub finished: f64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    /// Tokens generated.
    pub output_tokens: u32,
}

impl Completed {
    /// Time to first token.
    pub fn ttft(&self) -> f64 {
        self.first_token - self.arrival
    }
    /// Mean time per output token after the first.
    pub fn tpot(&self) -> f64 {
        if self.output_tokens <= 1 {
            return 0.0;
        }
        (self.finished - self.first_token) / f64::from(self.output_tokens - 1)
    }
}

/// A request arriving at a virtual time.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Arrival time in virtual seconds.
    pub at: f64,
    /// The request.
    pub request: SimRequest,
}

#[derive(Default)]
struct Tracker {
    open: HashMap<RequestId, Completed>,
    done: Vec<Completed>,
}

impl Tracker {
    fn submit(&mut self, engine: &mut Engine, now: f64, req: SimRequest) {
        let prompt_tokens = req.prompt.len() as u32;
        let output_tokens = req.output_tokens.max(1);
        // Submission errors are the caller's mistake in a study; such requests are skipped.
        if let Ok(id) = engine.submit(req) {
            self.open.insert(
                id,
                Completed {
                    arrival: now,
                    first_token: 0.0,
                    finished: 0.0,
                    prompt_tokens,
                    cached_tokens: 0,
                    output_tokens,
                },
            );
        }
    }

    /// Applies a step's events at time `now`; returns how many requests finished.
    fn apply(&mut self, now: f64, events: &[EngineEvent]) -> usize {
        let mut finished = 0;
        for ev in events {
            match *ev {
                EngineEvent::Admitted { id, cached_tokens } => {
                    if let Some(c) = self.open.get_mut(&id) {
                        c.cached_tokens = cached_tokens;
                    }
                }
                EngineEvent::Token { id, index, last } => {
                    if index == 0 {
                        if let Some(c) = self.open.get_mut(&id) {
                            c.first_token = now;
                        }
                    }
                    if last {
                        if let Some(mut c) = self.open.remove(&id) {
                            c.finished = now;
                            self.done.push(c);
                            finished += 1;
                        }
                    }
                }
                EngineEvent::Preempted { .. } => {}
            }
        }
        finished
    }
}

/// Runs arrivals (in any order) to completion. Returns completions in finishing order.
pub fn run_open_loop(engine: &mut Engine, mut arrivals: Vec<Arrival>) -> Vec<Completed> {
    arrivals.sort_by(|a, b| a.at.total_cmp(&b.at));
    let mut pending = arrivals.into_iter().peekable();
    let mut t = Tracker::default();
    let mut now = 0.0;
    loop {
        while let Some(a) = pending.next_if(|a| a.at <= now) {
            t.submit(engine, a.at, a.request);
        }
        match engine.step() {
            Some((d, events)) => {
                now += d;
                t.apply(now, &events);
            }
            None => match pending.peek() {
                Some(a) => now = a.at,
                None => break,
            },
        }
    }
    t.done
}

/// Keeps `concurrency` requests outstanding until `total` have completed.
/// Returns the completions and the virtual time elapsed.
pub fn run_closed_loop(
    engine: &mut Engine,
    concurrency: usize,
    total: usize,
    mut make: impl FnMut(usize) -> SimRequest,
) -> (Vec<Completed>, f64) {
    let mut t = Tracker::default();
    let mut issued = 0;
    let mut now = 0.0;
    while issued < concurrency.min(total) {
        t.submit(engine, now, make(issued));
        issued += 1;
    }
    while let Some((d, events)) = engine.step() {
        now += d;
        let finished = t.apply(now, &events);
        for _ in 0..finished {
            if issued < total {
                t.submit(engine, now, make(issued));
                issued += 1;
            }
        }
    }
    (t.done, now)
}
