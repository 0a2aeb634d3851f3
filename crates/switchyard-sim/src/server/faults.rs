//! Fault injection: what a test or a user can break on a simulated worker, at start-up
//! (flags) or at run time (`POST /sim/faults`).

use serde::{Deserialize, Serialize};

/// The faults in force on one worker. `Faults::default()` is a healthy worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Fraction of inference requests answered with `error_status` (0.0–1.0).
    pub error_rate: f64,
    /// Status of injected errors: 500 or 503 (others are accepted too).
    pub error_status: u16,
    /// Accept inference requests and never answer them.
    pub hang: bool,
    /// Step-time multiplier: 3.0 makes the worker 3× slower (degradation).
    pub slowdown: f64,
    /// Cut every stream (and connection) after this many tokens, as a crashing worker would.
    pub die_after_tokens: Option<u32>,
    /// Stop sending after this many tokens of a response and keep the connection open, as a
    /// wedged engine would (the request never finishes).
    pub stall_after_tokens: Option<u32>,
    /// End streams after this many tokens with the engines' error event
    /// (`data: {"error": …}` then `data: [DONE]`); whole answers get a 500.
    pub error_event_after_tokens: Option<u32>,
    /// Close the listening socket and every open connection: connections are refused.
    pub refuse_connections: bool,
    /// `/health` answers 503 while inference still works.
    pub health_fail: bool,
    /// Inference answers 200 with a body that is not valid JSON.
    pub malformed: bool,
    /// Extra delay before a request reaches the engine (slow start), in unscaled milliseconds.
    pub first_token_delay_ms: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            error_status: 500,
            hang: false,
            slowdown: 1.0,
            die_after_tokens: None,
            stall_after_tokens: None,
            error_event_after_tokens: None,
            refuse_connections: false,
            health_fail: false,
            malformed: false,
            first_token_delay_ms: 0,
        }
    }
}

/// A fault setting that makes no sense.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FaultError {
    /// error_rate outside [0, 1].
    #[error("error_rate must be between 0 and 1, got {0}")]
    ErrorRate(f64),
    /// Non-error status.
    #[error("error_status must be an HTTP error status (400-599), got {0}")]
    ErrorStatus(u16),
    /// Non-positive slowdown.
    #[error("slowdown must be > 0, got {0}")]
    Slowdown(f64),
}

impl Faults {
    /// Checks the values are usable.
    pub fn validate(&self) -> Result<(), FaultError> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(FaultError::ErrorRate(self.error_rate));
        }
        if !(400..=599).contains(&self.error_status) {
            return Err(FaultError::ErrorStatus(self.error_status));
        }
        if !(self.slowdown > 0.0 && self.slowdown.is_finite()) {
            return Err(FaultError::Slowdown(self.slowdown));
        }
        Ok(())
    }
}
