//! Hardware/model profiles: the step-time constants of the performance model.
//!
//! Constants for Llama-3.1-8B (bf16, TP1) come from public fits (inference-sim/BLIS
//! coefficients for vLLM on H100 and A100) and a roofline estimate (16 GB of weights,
//! 128 KiB of KV per token). The L4 tier is a slow, small-KV worker: about 3× an A100's
//! step costs with a quarter of the KV capacity. See `shared/design/simulator.md`.

use serde::{Deserialize, Serialize};

/// The constants of one worker kind. Times are in seconds of *unscaled* (real-hardware) time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Profile {
    /// Profile name as given on the command line.
    pub name: String,
    /// Fixed cost of one engine step (kernel launches, sampling, scheduling).
    pub c0: f64,
    /// Cost per prefill token in a step.
    pub a: f64,
    /// Cost per decoding sequence in a step.
    pub c1: f64,
    /// Cost per context token attended to by the decoding sequences.
    pub c2: f64,
    /// Optional quadratic attention term per prefill token squared (0 disables).
    pub q: f64,
    /// KV cache capacity in tokens, shared between running requests and the prefix cache.
    pub kv_capacity_tokens: u64,
    /// Upper bound on the running batch.
    pub max_running_requests: usize,
    /// Per-step prefill token budget (chunked prefill).
    pub chunked_prefill_size: u64,
    /// Tokens per KV page (prefix-cache granularity).
    pub page_size: usize,
    /// σ of the lognormal step-time noise.
    pub noise_sigma: f64,
}

impl Default for Profile {
    fn default() -> Self {
        Self::h100_llama8b()
    }
}

impl Profile {
    /// H100 serving Llama-3.1-8B.
    pub fn h100_llama8b() -> Self {
        Self {
            name: "h100-llama8b".into(),
            c0: 5.75e-3,
            a: 17e-6,
            c1: 6e-6,
            c2: 54e-9,
            q: 0.0,
            kv_capacity_tokens: 430_000,
            max_running_requests: 256,
            chunked_prefill_size: 8192,
            page_size: 16,
            noise_sigma: 0.04,
        }
    }

    /// A100 serving Llama-3.1-8B.
    pub fn a100_llama8b() -> Self {
        Self { name: "a100-llama8b".into(), c0: 10.9e-3, a: 48e-6, c1: 18e-6, c2: 89e-9, ..Self::h100_llama8b() }
    }

    /// L4 serving Llama-3.1-8B: the slow, small-KV tier (about 3× an A100's costs).
    pub fn l4_llama8b() -> Self {
        let a100 = Self::a100_llama8b();
        Self {
            name: "l4-llama8b".into(),
            c0: 3.0 * a100.c0,
            a: 3.0 * a100.a,
            c1: 3.0 * a100.c1,
            c2: 3.0 * a100.c2,
            kv_capacity_tokens: 100_000,
            ..a100
        }
    }

    /// Names accepted by [`Profile::by_name`].
    pub const NAMES: [&'static str; 3] = ["h100-llama8b", "a100-llama8b", "l4-llama8b"];

    /// Looks a built-in profile up by name (`h100`, `a100` and `l4` are accepted as short forms).
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "h100-llama8b" | "h100" => Some(Self::h100_llama8b()),
            "a100-llama8b" | "a100" => Some(Self::a100_llama8b()),
            "l4-llama8b" | "l4" => Some(Self::l4_llama8b()),
            _ => None,
        }
    }

    /// Deterministic step time (before noise and speed) for a step with `prefill_tokens`
    /// new tokens, `decoding` sequences and `context` tokens attended by them.
    pub fn step_time(&self, prefill_tokens: u64, decoding: u64, context: u64) -> f64 {
        let pf = prefill_tokens as f64;
        self.c0 + self.a * pf + self.q * pf * pf + self.c1 * decoding as f64 + self.c2 * context as f64
    }
}
