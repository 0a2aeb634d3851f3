//! Online performance models of each worker, learnt from finished requests.
//!
//! Two linear models per worker (see `policies.md`, marginal_utility):
//! - decode: `TPOT = θ0 + θ1·B̄ + θ2·K̄ + θ3·P̄`
//! - prefill: `TTFT = φ0 + φ1·u + φ2·U + φ3·B`
//!
//! fitted by recursive least squares with time-based forgetting, a roofline prior with wide
//! covariance, Huber weighting and θ ≥ 0. A fleet-pooled fit answers for a worker until it
//! has [`MIN_OWN_SAMPLES`]. A linear model is used because time-averaging commutes with it
//! (the window averages B̄, K̄, P̄ are exact for it) and its derivatives are analytic.
//!
//! [`DifferenceModel`] is the founding notes' estimator (bucketed means by load, slopes as
//! difference quotients), kept as a baseline.
//!
//! Units: times in milliseconds, token counts in thousands, so the coefficients are of
//! similar magnitude and the covariance well conditioned.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{FirstTokenOutcome, RequestOutcome};

/// Samples a worker needs before its own fit replaces the fleet's pooled one.
pub const MIN_OWN_SAMPLES: u64 = 50;
/// Outputs shorter than this say little about TPOT and are left out of the decode fit.
pub const MIN_DECODE_TOKENS: u32 = 8;
/// Residuals beyond this many σ are down-weighted (Huber).
const HUBER_K: f64 = 2.5;

/// One finished request as the models see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When it finished, seconds on the observer's clock.
    pub at: f64,
    /// Decode features `[1, B̄, K̄/1000, P̄/1000]` and TPOT in ms, if the output was long enough.
    pub decode: Option<([f64; 4], f64)>,
    /// Prefill features `[1, u/1000, U/1000, B]` and TTFT in ms.
    pub prefill: Option<([f64; 4], f64)>,
    /// Completion tokens.
    pub output_tokens: Option<u32>,
    /// Prompt tokens served from cache / all prompt tokens, when known.
    pub cache_hit: Option<f64>,
}

impl Sample {
    /// Builds a sample from what the router observed; `None` for failures and answers
    /// without a first-token time.
    pub fn from_outcome(o: &RequestOutcome, at: f64) -> Option<Sample> {
        Self::from_outcome_with(o, at, false)
    }

    /// [`Sample::from_outcome`], with other routers' requests on the worker (from its reports)
    /// counted in the window's batch and context when `others` is set.
    pub fn from_outcome_with(o: &RequestOutcome, at: f64, others: bool) -> Option<Sample> {
        if !o.success() {
            return None;
        }
        let ttft = o.time_to_first_byte?;
        let prompt = o.usage.prompt_tokens.unwrap_or(o.dispatch.prompt_tokens);
        let cached =
            o.usage.cached_tokens.unwrap_or(o.dispatch.prompt_tokens.saturating_sub(o.dispatch.uncached_tokens));
        let uncached = prompt.saturating_sub(cached);
        // A whole (non-streamed) answer's first byte is its last: its "TTFT" includes the decode.
        let whole_answer = o.window.is_none() && o.usage.completion_tokens.is_some_and(|n| n > 1);
        let prefill = (!whole_answer).then(|| {
            let ttft = without_slot_wait(ttft, o.dispatch.slot_wait_ms);
            prefill_features(uncached, o.queued_prefill_ahead, o.in_flight_at_dispatch, ttft)
        });
        let decode = match (o.usage.completion_tokens, o.window) {
            (Some(n), Some(w)) if n >= MIN_DECODE_TOKENS => {
                let tpot_ms = (o.latency.saturating_sub(ttft)).as_secs_f64() * 1e3 / f64::from(n - 1);
                let (b, k) = if others {
                    (w.mean_batch + w.mean_others, w.mean_context + w.mean_others_context)
                } else {
                    (w.mean_batch, w.mean_context)
                };
                Some(([1.0, b, k / 1e3, w.prefill_rate / 1e3], tpot_ms))
            }
            _ => None,
        };
        Some(Sample {
            at,
            decode,
            prefill,
            output_tokens: o.usage.completion_tokens,
            cache_hit: (prompt > 0).then(|| f64::from(cached.min(prompt)) / f64::from(prompt)),
        })
    }

    /// The prefill sample of a streamed request, at its first token, with the policy's own
    /// estimate of its uncached tokens (the worker's count comes only at the end).
    pub fn from_first_token(f: &FirstTokenOutcome, at: f64) -> Sample {
        let uncached = f.dispatch.uncached_tokens.min(f.dispatch.prompt_tokens);
        let ttft = without_slot_wait(f.ttft, f.dispatch.slot_wait_ms);
        Sample {
            at,
            decode: None,
            prefill: Some(prefill_features(uncached, f.queued_prefill_ahead, f.in_flight_at_dispatch, ttft)),
            output_tokens: None,
            cache_hit: None,
        }
    }
}

/// The TTFT the prefill fit learns: the observed one less the admission wait (a batch slot or
/// KV room) the policy predicted for it and adds to the fit's prediction (`DispatchInfo::slot_wait_ms`).
fn without_slot_wait(ttft: Duration, slot_wait_ms: u32) -> Duration {
    ttft.saturating_sub(Duration::from_millis(u64::from(slot_wait_ms)))
}

fn prefill_features(uncached: u32, queued_ahead: u64, in_flight: u64, ttft: Duration) -> ([f64; 4], f64) {
    ([1.0, f64::from(uncached) / 1e3, queued_ahead as f64 / 1e3, in_flight as f64], ttft.as_secs_f64() * 1e3)
}

/// Recursive least squares over `N` features with exponential forgetting in time.
#[derive(Debug, Clone)]
pub struct Rls<const N: usize> {
    theta: [f64; N],
    cov: [[f64; N]; N],
    prior_cov: [f64; N],
    tau_secs: f64,
    last: Option<f64>,
    samples: u64,
    residual_var: f64,
}

impl<const N: usize> Rls<N> {
    /// Starts at `prior` with variance `prior_sd²` per coefficient; forgets with time constant `tau_secs`.
    pub fn new(prior: [f64; N], prior_sd: [f64; N], tau_secs: f64) -> Self {
        let mut cov = [[0.0; N]; N];
        let mut prior_cov = [0.0; N];
        for i in 0..N {
            cov[i][i] = prior_sd[i] * prior_sd[i];
            prior_cov[i] = cov[i][i];
        }
        Self { theta: prior, cov, prior_cov, tau_secs, last: None, samples: 0, residual_var: 0.0 }
    }

    /// Keeps the covariance symmetric positive definite and bounded: no wind-up past the
    /// prior (scaled down as a whole, which preserves definiteness, never clipped entry by
    /// entry) and a small floor on the diagonal against round-off.
    fn condition(&mut self) {
        for i in 0..N {
            for j in 0..i {
                let m = 0.5 * (self.cov[i][j] + self.cov[j][i]);
                self.cov[i][j] = m;
                self.cov[j][i] = m;
            }
        }
        let excess = (0..N).map(|i| self.cov[i][i] / self.prior_cov[i]).fold(0.0, f64::max);
        if excess > 1.0 || !excess.is_finite() {
            let reset = !excess.is_finite();
            for i in 0..N {
                for j in 0..N {
                    self.cov[i][j] = if reset {
                        if i == j {
                            self.prior_cov[i]
                        } else {
                            0.0
                        }
                    } else {
                        self.cov[i][j] / excess
                    };
                }
            }
        }
        for i in 0..N {
            let floor = self.prior_cov[i] * 1e-9;
            if self.cov[i][i] < floor {
                self.cov[i][i] = floor;
            }
        }
    }

    /// Current coefficients, projected to ≥ 0 (no cost falls with load). The projection is
    /// applied on the way out only: clamping the recursion's own state makes it inconsistent
    /// with its covariance, and it then diverges.
    pub fn theta(&self) -> [f64; N] {
        self.theta.map(|t| t.max(0.0))
    }

    /// Samples absorbed.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Residual standard deviation (EWMA), in the target's units.
    pub fn residual_sd(&self) -> f64 {
        self.residual_var.sqrt()
    }

    /// Prediction for features `x` (with the projected coefficients).
    pub fn predict(&self, x: &[f64; N]) -> f64 {
        dot(&self.theta(), x)
    }

    /// Absorbs one observation `y` at features `x`, taken at time `at` (seconds).
    pub fn update(&mut self, x: &[f64; N], y: f64, at: f64) {
        if !y.is_finite() || x.iter().any(|v| !v.is_finite()) {
            return;
        }
        // Forget in proportion to the time since the last sample, not per sample, so a
        // busy worker and a quiet one keep the same memory in seconds.
        let lambda = match self.last {
            Some(last) => (-(at - last).max(0.0) / self.tau_secs).exp().clamp(0.5, 1.0),
            None => 1.0,
        };
        self.last = Some(self.last.map_or(at, |l| l.max(at)));
        let prediction = self.predict(x);
        let residual = y - dot(&self.theta, x);
        // Huber in its ψ form: the residual is clipped at k·σ before it moves θ, so one
        // stalled stream has bounded influence however uncertain the fit is. σ is kept
        // between 2 % and 25 % of the prediction (no scale yet in the warm-up: 50 %), so a burst
        // of outliers can't inflate it into accepting them.
        let scale = if self.samples < 10 {
            0.5 * prediction.abs().max(1e-9)
        } else {
            self.residual_sd().clamp(0.02 * prediction.abs(), 0.25 * prediction.abs().max(1e-9))
        };
        let clipped = residual.clamp(-HUBER_K * scale, HUBER_K * scale);
        let mut px = [0.0; N];
        for (i, row) in self.cov.iter().enumerate() {
            px[i] = dot(row, x);
        }
        let denom = lambda + dot(x, &px);
        if denom <= 0.0 || !denom.is_finite() {
            return;
        }
        for (t, p) in self.theta.iter_mut().zip(&px) {
            *t += p / denom * clipped;
        }
        for i in 0..N {
            for j in 0..N {
                self.cov[i][j] = (self.cov[i][j] - px[i] * px[j] / denom) / lambda;
            }
        }
        self.condition();
        self.residual_var =
            if self.samples == 0 { clipped * clipped } else { 0.95 * self.residual_var + 0.05 * clipped * clipped };
        self.samples += 1;
    }
}

fn dot<const N: usize>(a: &[f64; N], b: &[f64; N]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Which estimator the models use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EstimatorKind {
    /// Linear models by recursive least squares (analytic marginal terms).
    #[default]
    Regression,
    /// Bucketed means by load with difference-quotient slopes (the founding notes' baseline).
    Difference,
}

/// The difference estimator's dense tables: TPOT by decoding batch, TTFT by in-flight count.
type Tables = (Arc<Vec<f64>>, Arc<Vec<f64>>);

/// Predictions for one worker, whichever estimator made them.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    decode: [f64; 4],
    prefill: [f64; 4],
    /// Difference estimator: TPOT (ms) by decoding batch and TTFT (ms) by in-flight count.
    tables: Option<Tables>,
    /// Recent mean residuals (observed − predicted, ms) of TTFT and TPOT: a fast level
    /// correction for where the linear model is wrong (an engine queueing for batch slots).
    bias: [f64; 2],
}

impl Prediction {
    /// Predicted TPOT (ms) at decoding batch `b`, context `k` tokens, prefill rate `p` tokens/s.
    pub fn tpot_ms(&self, b: f64, k: f64, p: f64) -> f64 {
        match &self.tables {
            Some((tpot, _)) => interpolate(tpot, b),
            None => dot(&self.decode, &[1.0, b, k / 1e3, p / 1e3]) + self.bias[1],
        }
    }

    /// Predicted TTFT (ms) for `u` uncached tokens behind `queued` tokens with `b` in flight.
    pub fn ttft_ms(&self, u: f64, queued: f64, b: f64) -> f64 {
        match &self.tables {
            Some((_, ttft)) => interpolate(ttft, b),
            None => dot(&self.prefill, &[1.0, u / 1e3, queued / 1e3, b]) + self.bias[0],
        }
    }

    /// Prefill cost per uncached token (ms), φ1/1000: what one prompt token adds to the
    /// steps of every running request.
    pub fn prefill_ms_per_token(&self) -> f64 {
        self.prefill[1] / 1e3
    }

    /// Decode throughput (tokens per ms) at a batch of `b` requests of `context` tokens each,
    /// without the level correction: how fast the hardware is, compared between workers at
    /// one operating point their data covers. Extrapolating each fit to where it reaches the
    /// SLO amplifies the noise of the coefficients (above all the intercept, which samples
    /// of large batches only barely constrain).
    pub fn throughput_at(&self, b: f64, context: f64) -> f64 {
        let step = match &self.tables {
            Some((tpot, _)) => interpolate(tpot, b),
            None => dot(&self.decode, &[1.0, b, b * context / 1e3, 0.0]),
        };
        b / step.max(1e-3)
    }
}

fn interpolate(table: &[f64], x: f64) -> f64 {
    if table.is_empty() {
        return 0.0;
    }
    let x = x.clamp(0.0, (table.len() - 1) as f64);
    let lo = x.floor() as usize;
    let hi = (lo + 1).min(table.len() - 1);
    let f = x - lo as f64;
    table[lo] * (1.0 - f) + table[hi] * f
}

/// Roofline guess for an 8B model on one modern GPU, in the model's units; wide enough
/// (sd = 3× the value) that the first tens of samples dominate it.
const DECODE_PRIOR: [f64; 4] = [8.0, 0.02, 0.08, 0.3];
const PREFILL_PRIOR: [f64; 4] = [10.0, 30.0, 30.0, 0.5];

fn decode_rls(tau: f64) -> Rls<4> {
    Rls::new(DECODE_PRIOR, DECODE_PRIOR.map(|v| 3.0 * v), tau)
}

fn prefill_rls(tau: f64) -> Rls<4> {
    Rls::new(PREFILL_PRIOR, PREFILL_PRIOR.map(|v| 3.0 * v), tau)
}

/// Bucketed EWMA of TPOT by decoding batch and of TTFT by in-flight count.
#[derive(Debug, Clone, Default)]
pub struct DifferenceModel {
    tpot: Vec<Option<f64>>,
    ttft: Vec<Option<f64>>,
}

const DIFF_BUCKETS: usize = 512;
const DIFF_ALPHA: f64 = 0.1;

impl DifferenceModel {
    fn observe(&mut self, s: &Sample) {
        fn ewma(table: &mut Vec<Option<f64>>, bucket: usize, y: f64) {
            let bucket = bucket.min(DIFF_BUCKETS - 1);
            if table.len() <= bucket {
                table.resize(bucket + 1, None);
            }
            let e = &mut table[bucket];
            *e = Some(e.map_or(y, |m| m + DIFF_ALPHA * (y - m)));
        }
        if let Some((x, y)) = s.decode {
            ewma(&mut self.tpot, x[1].round() as usize, y);
        }
        if let Some((x, y)) = s.prefill {
            ewma(&mut self.ttft, x[3].round() as usize, y);
        }
    }

    /// Dense table: empty buckets filled by linear interpolation between populated ones,
    /// flat beyond the ends.
    fn dense(table: &[Option<f64>], fallback: impl Fn(usize) -> f64) -> Vec<f64> {
        let known: Vec<(usize, f64)> = table.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v))).collect();
        let len = table.len() + 2;
        if known.is_empty() {
            return (0..len).map(fallback).collect();
        }
        (0..len)
            .map(|i| match known.iter().position(|(k, _)| *k >= i) {
                Some(0) => known[0].1,
                None => known[known.len() - 1].1,
                Some(j) => {
                    let ((x0, y0), (x1, y1)) = (known[j - 1], known[j]);
                    y0 + (y1 - y0) * (i - x0) as f64 / (x1 - x0) as f64
                }
            })
            .collect()
    }
}

/// Everything learnt about one worker.
#[derive(Debug, Clone)]
struct WorkerFit {
    decode: Rls<4>,
    prefill: Rls<4>,
    difference: DifferenceModel,
    /// Dense tables of the difference estimator, rebuilt per sample.
    tables: Option<Tables>,
    output_tokens: f64,
    cache_hit: f64,
    prefill_rate: f64,
    /// (predicted, observed) TTFT and TPOT in ms for the last few requests.
    recent: [Vec<[f64; 2]>; 2],
    /// EWMA of TTFT and TPOT residuals (ms).
    bias: [f64; 2],
}

impl WorkerFit {
    /// Moves the level correction of TTFT (`k` = 0) or TPOT (1) by one observation against
    /// a prediction that already includes it: the residual is the bare model's.
    fn correct_level(&mut self, k: usize, pred: f64, obs: f64) {
        if pred.is_finite() && obs.is_finite() {
            self.bias[k] += BIAS_ALPHA * ((obs - pred + self.bias[k]) - self.bias[k]);
        }
    }
}

/// The fleet's models: one fit per worker plus a pooled fit.
#[derive(Debug)]
pub struct FleetModel {
    kind: EstimatorKind,
    tau_secs: f64,
    pooled_decode: Rls<4>,
    pooled_prefill: Rls<4>,
    workers: HashMap<u32, WorkerFit>,
    output_tokens: f64,
}

/// One worker's fitted state, for `/debug/policy`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerReport {
    /// Worker id.
    pub worker: u32,
    /// Samples absorbed by the worker's own decode / prefill fit.
    pub samples: [u64; 2],
    /// Whether predictions still come from the pooled fit.
    pub pooled: bool,
    /// θ: TPOT ms = θ0 + θ1·B̄ + θ2·K̄/1000 + θ3·P̄/1000.
    pub decode_theta: [f64; 4],
    /// φ: TTFT ms = φ0 + φ1·u/1000 + φ2·U/1000 + φ3·B.
    pub prefill_phi: [f64; 4],
    /// Residual σ (ms) of the decode and prefill fits.
    pub residual_sd_ms: [f64; 2],
    /// EWMA of completion tokens and of the cache hit rate.
    pub mean_output_tokens: f64,
    /// Share of prompt tokens served from cache, EWMA.
    pub cache_hit_rate: f64,
    /// Last few requests' `[predicted, observed]` TTFT in ms (observed at their first token).
    pub recent_ttft: Vec<[f64; 2]>,
    /// Last few requests' `[predicted, observed]` TPOT in ms (observed at their end).
    pub recent_tpot: Vec<[f64; 2]>,
}

const RECENT: usize = 8;
/// Weight of the newest residual in the level correction.
const BIAS_ALPHA: f64 = 0.2;

impl FleetModel {
    /// Empty models; `tau_secs` is the forgetting time constant.
    pub fn new(kind: EstimatorKind, tau_secs: f64) -> Self {
        Self {
            kind,
            tau_secs,
            pooled_decode: decode_rls(tau_secs),
            pooled_prefill: prefill_rls(tau_secs),
            workers: HashMap::new(),
            output_tokens: 256.0,
        }
    }

    fn fit(&mut self, worker: u32) -> &mut WorkerFit {
        let tau = self.tau_secs;
        let out = self.output_tokens;
        self.workers.entry(worker).or_insert_with(|| WorkerFit {
            decode: decode_rls(tau),
            prefill: prefill_rls(tau),
            difference: DifferenceModel::default(),
            tables: None,
            output_tokens: out,
            cache_hit: 0.0,
            prefill_rate: 0.0,
            recent: [Vec::new(), Vec::new()],
            bias: [0.0; 2],
        })
    }

    /// Absorbs one sample from `worker`.
    pub fn observe(&mut self, worker: u32, s: &Sample) {
        let before = self.predict(worker);
        if let Some(n) = s.output_tokens {
            self.output_tokens += 0.05 * (f64::from(n) - self.output_tokens);
        }
        if let Some((x, y)) = s.decode {
            self.pooled_decode.update(&x, y, s.at);
        }
        if let Some((x, y)) = s.prefill {
            self.pooled_prefill.update(&x, y, s.at);
        }
        let kind = self.kind;
        let fit = self.fit(worker);
        if let Some(n) = s.output_tokens {
            fit.output_tokens += 0.1 * (f64::from(n) - fit.output_tokens);
        }
        if let Some(h) = s.cache_hit {
            fit.cache_hit += 0.1 * (h - fit.cache_hit);
        }
        let mut observed = [None, None];
        if let Some((x, y)) = s.prefill {
            fit.prefill.update(&x, y, s.at);
            observed[0] = Some([before.ttft_ms(x[1] * 1e3, x[2] * 1e3, x[3]), y]);
        }
        if let Some((x, y)) = s.decode {
            fit.decode.update(&x, y, s.at);
            fit.prefill_rate += 0.2 * (x[3] * 1e3 - fit.prefill_rate);
            observed[1] = Some([before.tpot_ms(x[1], x[2] * 1e3, x[3] * 1e3), y]);
        }
        if kind == EstimatorKind::Difference {
            fit.difference.observe(s);
            let (decode, prefill) = (fit.decode.theta(), fit.prefill.theta());
            // Buckets with no data yet borrow the regression's value there.
            let tpot = DifferenceModel::dense(&fit.difference.tpot, |b| dot(&decode, &[1.0, b as f64, 0.0, 0.0]));
            let ttft = DifferenceModel::dense(&fit.difference.ttft, |b| dot(&prefill, &[1.0, 0.0, 0.0, b as f64]));
            fit.tables = Some((Arc::new(tpot), Arc::new(ttft)));
        }
        for (k, pair) in observed.into_iter().enumerate() {
            let Some([pred, obs]) = pair.filter(|p| p.iter().all(|v| v.is_finite())) else { continue };
            let recent = &mut fit.recent[k];
            if recent.len() == RECENT {
                recent.remove(0);
            }
            recent.push([pred, obs]);
            fit.correct_level(k, pred, obs);
        }
    }

    /// Drops everything kept about `worker` (it left the fleet).
    pub fn forget(&mut self, worker: u32) {
        self.workers.remove(&worker);
    }

    /// Whether `worker`'s TTFT is still predicted by the pooled fit.
    pub fn prefill_pooled(&self, worker: u32) -> bool {
        self.workers.get(&worker).is_none_or(|f| f.prefill.samples() < MIN_OWN_SAMPLES)
    }

    /// A streamed request's TTFT, seen at its first token. A worker still predicted by the
    /// pooled fit moves its level correction at once: otherwise a slow newcomer looks like
    /// the fleet's average until its first requests *finish* — seconds of traffic later.
    /// Fits (and warm workers' corrections) wait for the end, when the worker's own cached-token
    /// count is known: fitting on the router's estimate taught holders' cache misses as slowness.
    pub fn observe_first_token(&mut self, worker: u32, s: &Sample) {
        let Some((x, ttft_ms)) = s.prefill.filter(|_| self.prefill_pooled(worker)) else { return };
        let pred = self.predict(worker).ttft_ms(x[1] * 1e3, x[2] * 1e3, x[3]);
        self.fit(worker).correct_level(0, pred, ttft_ms);
    }

    /// Predictions for `worker` (pooled until it has enough samples of its own).
    pub fn predict(&self, worker: u32) -> Prediction {
        let fit = self.workers.get(&worker);
        let decode = match fit {
            Some(f) if f.decode.samples() >= MIN_OWN_SAMPLES => f.decode.theta(),
            _ => self.pooled_decode.theta(),
        };
        let prefill = match fit {
            Some(f) if f.prefill.samples() >= MIN_OWN_SAMPLES => f.prefill.theta(),
            _ => self.pooled_prefill.theta(),
        };
        let tables = match (self.kind, fit) {
            (EstimatorKind::Difference, Some(f)) => f.tables.clone(),
            _ => None,
        };
        let bias = fit.map_or([0.0; 2], |f| f.bias);
        Prediction { decode, prefill, tables, bias }
    }

    /// Expected completion tokens of a request on `worker` (EWMA).
    pub fn expected_output(&self, worker: u32) -> f64 {
        self.workers.get(&worker).map_or(self.output_tokens, |f| f.output_tokens)
    }

    /// Recent cache hit rate of `worker` (EWMA of cached / prompt tokens).
    pub fn cache_hit_rate(&self, worker: u32) -> f64 {
        self.workers.get(&worker).map_or(0.0, |f| f.cache_hit)
    }

    /// Recent prefill admission rate on `worker`, tokens/s.
    pub fn prefill_rate(&self, worker: u32) -> f64 {
        self.workers.get(&worker).map_or(0.0, |f| f.prefill_rate)
    }

    /// Per-worker state for `/debug/policy`.
    pub fn report(&self) -> Vec<WorkerReport> {
        let mut out: Vec<WorkerReport> = self
            .workers
            .iter()
            .map(|(&id, f)| {
                let p = self.predict(id);
                WorkerReport {
                    worker: id,
                    samples: [f.decode.samples(), f.prefill.samples()],
                    pooled: f.decode.samples() < MIN_OWN_SAMPLES || f.prefill.samples() < MIN_OWN_SAMPLES,
                    decode_theta: p.decode,
                    prefill_phi: p.prefill,
                    residual_sd_ms: [f.decode.residual_sd(), f.prefill.residual_sd()],
                    mean_output_tokens: f.output_tokens,
                    cache_hit_rate: f.cache_hit,
                    recent_ttft: f.recent[0].clone(),
                    recent_tpot: f.recent[1].clone(),
                }
            })
            .collect();
        out.sort_by_key(|r| r.worker);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rls_recovers_a_line_and_clamps_negative_coefficients() {
        let mut r = Rls::new([1.0, 1.0], [10.0, 10.0], 1e9);
        for i in 0..200 {
            let x = (i % 20) as f64;
            r.update(&[1.0, x], 3.0 + 0.5 * x, i as f64);
        }
        let t = r.theta();
        assert!((t[0] - 3.0).abs() < 0.05 && (t[1] - 0.5).abs() < 0.01, "{t:?}");
        let mut r = Rls::new([1.0, 1.0], [10.0, 10.0], 1e9);
        for i in 0..200 {
            let x = (i % 20) as f64;
            r.update(&[1.0, x], 30.0 - 0.5 * x, i as f64);
        }
        assert!(r.theta()[1] >= 0.0);
    }

    /// Decode samples from the simulator's step-time model (h100 constants; ms, ktok),
    /// noise σ 4 %: `TPOT = c0 + c1·B + c2·K + a·P̄·TPOT` (prefill admitted during decode).
    pub(super) fn sim_samples(n: usize, speed: f64, seed: u64, t0: f64) -> Vec<([f64; 4], f64, f64)> {
        use rand::{Rng, SeedableRng};
        let p = switchyard_sim::model::Profile::h100_llama8b();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let b: f64 = rng.random_range(1.0..128.0);
                let k: f64 = b * rng.random_range(200.0..2000.0);
                let prate: f64 = rng.random_range(0.0..4000.0);
                let base = (p.c0 + p.c1 * b + p.c2 * k) / (1.0 - p.a * prate.min(0.5 / p.a)) * 1e3;
                let noise = 1.0 + 0.04 * (rng.random::<f64>() * 2.0 - 1.0) * 1.7;
                ([1.0, b, k / 1e3, prate / 1e3], base * noise / speed, t0 + i as f64 * 0.05)
            })
            .collect()
    }

    fn truth(x: &[f64; 4], speed: f64) -> f64 {
        let p = switchyard_sim::model::Profile::h100_llama8b();
        (p.c0 + p.c1 * x[1] + p.c2 * x[2] * 1e3) / (1.0 - p.a * x[3] * 1e3) * 1e3 / speed
    }

    fn max_rel_error(r: &Rls<4>, speed: f64) -> f64 {
        sim_samples(200, speed, 99, 0.0)
            .iter()
            .map(|(x, _, _)| (r.predict(x) - truth(x, speed)).abs() / truth(x, speed))
            .fold(0.0, f64::max)
    }

    #[test]
    fn recovers_the_simulators_decode_costs() {
        let mut r = decode_rls(120.0);
        for (x, y, t) in sim_samples(2000, 1.0, 1, 0.0) {
            r.update(&x, y, t);
        }
        let p = switchyard_sim::model::Profile::h100_llama8b();
        let th = r.theta();
        // c0 (ms), c1 (ms/seq), c2 (ms per 1k tokens) within 10 %.
        assert!((th[0] - p.c0 * 1e3).abs() < 0.1 * p.c0 * 1e3, "{th:?}");
        assert!((th[1] - p.c1 * 1e3).abs() < 0.1 * p.c1 * 1e3, "{th:?}");
        assert!((th[2] - p.c2 * 1e6).abs() < 0.1 * p.c2 * 1e6, "{th:?}");
        // The linearised prefill term is an approximation; predictions within 8 % everywhere.
        assert!(max_rel_error(&r, 1.0) < 0.08, "{}", max_rel_error(&r, 1.0));
    }

    #[test]
    fn adapts_after_a_step_change_in_speed() {
        let mut r = decode_rls(30.0);
        for (x, y, t) in sim_samples(2000, 1.0, 2, 0.0) {
            r.update(&x, y, t);
        }
        // The worker slows to half speed: 100 s later (≈ 3 τ) the fit follows.
        for (x, y, t) in sim_samples(2000, 0.5, 3, 100.0) {
            r.update(&x, y, t);
        }
        assert!(max_rel_error(&r, 0.5) < 0.1, "{}", max_rel_error(&r, 0.5));
    }

    #[test]
    fn sane_with_few_samples_and_robust_to_outliers() {
        let mut r = decode_rls(120.0);
        let samples = sim_samples(3, 1.0, 4, 0.0);
        for (x, y, t) in &samples {
            r.update(x, *y, *t);
        }
        for (x, _, _) in sim_samples(50, 1.0, 5, 0.0) {
            let (pred, truth) = (r.predict(&x), truth(&x, 1.0));
            assert!(pred > 0.0 && pred < 5.0 * truth && pred > truth / 5.0, "{pred} vs {truth}");
        }
        // 5 % of samples 10× too slow (a stalled stream): Huber keeps predictions within 20 %.
        let mut r = decode_rls(120.0);
        for (i, (x, y, t)) in sim_samples(3000, 1.0, 6, 0.0).into_iter().enumerate() {
            r.update(&x, if i % 20 == 7 { y * 10.0 } else { y }, t);
        }
        assert!(max_rel_error(&r, 1.0) < 0.2, "{} {:?}", max_rel_error(&r, 1.0), r.theta());
    }

    #[test]
    fn throughput_at_a_shared_batch_separates_hardware_not_noise() {
        use rand::{Rng, SeedableRng};
        // Past the knee a worker's samples span only large batches: its fit is good there and
        // its coefficients (the intercept above all) are noise.
        let band = |speed: f64, seed: u64| {
            let p = switchyard_sim::model::Profile::h100_llama8b();
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            (0..400)
                .map(|i| {
                    let b: f64 = rng.random_range(180.0..220.0);
                    let k: f64 = b * rng.random_range(900.0..1100.0);
                    let step = (p.c0 + p.c1 * b + p.c2 * k) * 1e3 / speed;
                    let noise = 1.0 + 0.1 * (rng.random::<f64>() * 2.0 - 1.0);
                    ([1.0, b, k / 1e3, 0.0], step * noise, i as f64 * 0.05)
                })
                .collect::<Vec<_>>()
        };
        let mut m = FleetModel::new(EstimatorKind::Regression, 120.0);
        for (worker, speed, seed) in [(1, 1.0, 21), (2, 1.0, 22), (3, 0.5, 23)] {
            for (x, y, t) in band(speed, seed) {
                let sample =
                    Sample { at: t, decode: Some((x, y)), prefill: None, output_tokens: None, cache_hit: None };
                m.observe(worker, &sample);
            }
        }
        let at = |w| m.predict(w).throughput_at(200.0, 1000.0);
        let (a, b, slow) = (at(1), at(2), at(3));
        let truth = 200.0 / truth(&[1.0, 200.0, 200.0, 0.0], 1.0);
        for t in [a, b] {
            assert!((t / truth - 1.0).abs() < 0.1, "{t} tokens/ms against {truth}");
        }
        // Alike within the policy's tolerance (VICTIM_CAPACITY_TIE, 50 %), the slow one apart.
        assert!(a.max(b) / a.min(b) < 1.1, "identical workers {a} and {b}");
        assert!(a.min(b) / slow > 1.7, "fast {a} {b}, slow {slow}");
    }

    #[test]
    fn pooled_until_a_worker_has_its_own_samples() {
        let mut m = FleetModel::new(EstimatorKind::Regression, 120.0);
        let sample = |x: [f64; 4], y: f64, at: f64| Sample {
            at,
            decode: Some((x, y)),
            prefill: Some(([1.0, 1.0, 0.0, x[1]], 50.0)),
            output_tokens: Some(100),
            cache_hit: Some(0.0),
        };
        for (x, y, t) in sim_samples(400, 1.0, 7, 0.0) {
            m.observe(1, &sample(x, y, t));
        }
        // Worker 2 is twice as slow; with 10 samples its coefficients are still the pool's
        // (its level correction already moves its predictions toward what it shows).
        let slow = sim_samples(400, 0.5, 8, 20.0);
        for (x, y, t) in &slow[..10] {
            m.observe(2, &sample(*x, *y, *t));
        }
        let x = [1.0, 32.0, 32.0, 0.0];
        let r2 = m.report().into_iter().find(|r| r.worker == 2).unwrap();
        assert!(r2.pooled && r2.decode_theta == m.pooled_decode.theta(), "{r2:?}");
        for (x, y, t) in &slow[10..] {
            m.observe(2, &sample(*x, *y, *t));
        }
        let p2 = m.predict(2).tpot_ms(32.0, 32e3, 0.0);
        assert!((p2 / truth(&x, 0.5) - 1.0).abs() < 0.1, "own fit: {p2} vs {}", truth(&x, 0.5));
        assert_eq!(m.report().len(), 2);
    }

    #[test]
    fn prefill_samples_come_from_first_tokens_and_never_from_a_whole_answer() {
        use crate::load::{DispatchInfo, Ending, InFlightGuard, Usage};
        use crate::workers::{Worker, WorkerRole};
        use tokio::time::Instant;
        let w = Arc::new(Worker::new("http://127.0.0.1:1".into(), WorkerRole::Regular));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let info = DispatchInfo { prompt_tokens: 1000, uncached_tokens: 400, ..DispatchInfo::default() };
        let usage = Usage { prompt_tokens: Some(1000), cached_tokens: Some(600), completion_tokens: Some(50) };
        // Streamed: the first token gives an early prefill sample (the router's estimate of
        // the uncached tokens); the end gives both, with the worker's own count.
        let mut g = InFlightGuard::dispatch(w.clone(), info, at(0));
        let first = g.first_token_at(at(120)).expect("first token");
        let early = Sample::from_first_token(&first, 0.12);
        assert_eq!(early.prefill, Some(([1.0, 0.4, 0.0, 0.0], 120.0)));
        let end = Sample::from_outcome(&g.finish_at(Ending::Succeeded, usage, at(1100)), 1.1).expect("sample");
        assert!(end.decode.is_some_and(|(_, tpot)| (tpot - 20.0).abs() < 1e-6));
        assert_eq!(end.prefill.map(|(x, y)| (x[1], y)), Some((0.4, 120.0)));
        // Whole answer: its first byte is its last; no TTFT to learn from.
        let mut g = InFlightGuard::dispatch(w.clone(), info, at(0));
        g.mark_first_byte_at(at(1100));
        let whole = Sample::from_outcome(&g.finish_at(Ending::Succeeded, usage, at(1100)), 1.1).expect("sample");
        assert!(whole.prefill.is_none() && whole.decode.is_none() && whole.output_tokens == Some(50));
        // A PD prefill leg (whole answer, no token count): its answer time is its TTFT.
        let mut g = InFlightGuard::dispatch(w, info, at(0));
        g.mark_first_byte_at(at(90));
        let leg =
            Sample::from_outcome(&g.finish_at(Ending::Succeeded, Usage::default(), at(90)), 0.09).expect("sample");
        assert_eq!(leg.prefill.map(|(_, y)| y), Some(90.0));
    }

    #[test]
    fn the_fit_learns_ttft_without_the_batch_slot_wait_the_policy_predicted() {
        use crate::load::{DispatchInfo, Ending, InFlightGuard, Usage};
        use crate::workers::{Worker, WorkerRole};
        use tokio::time::Instant;
        let w = Arc::new(Worker::new("http://127.0.0.1:1".into(), WorkerRole::Regular));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let usage = Usage { prompt_tokens: Some(1000), cached_tokens: Some(0), completion_tokens: Some(50) };
        let info = |slot_wait_ms| DispatchInfo {
            prompt_tokens: 1000,
            uncached_tokens: 1000,
            slot_wait_ms,
            ..Default::default()
        };
        // 900 ms to the first token, 700 of them predicted as the wait for a batch slot.
        let mut g = InFlightGuard::dispatch(w.clone(), info(700), at(0));
        let first = g.first_token_at(at(900)).expect("first token");
        assert_eq!(Sample::from_first_token(&first, 0.9).prefill.map(|(_, y)| y), Some(200.0));
        let end = Sample::from_outcome(&g.finish_at(Ending::Succeeded, usage, at(1900)), 1.9).expect("sample");
        assert_eq!(end.prefill.map(|(_, y)| y), Some(200.0));
        // The decode is the engine's whatever the wait before it.
        assert!(end.decode.is_some_and(|(_, tpot)| (tpot - 1000.0 / 49.0).abs() < 1e-6));
        // A prediction larger than what was seen leaves zero, never a negative time.
        let mut g = InFlightGuard::dispatch(w, info(5000), at(0));
        let first = g.first_token_at(at(900)).expect("first token");
        assert_eq!(Sample::from_first_token(&first, 0.9).prefill.map(|(_, y)| y), Some(0.0));
    }
}
