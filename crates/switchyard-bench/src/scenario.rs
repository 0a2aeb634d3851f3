//! Scenario files (`bench/scenarios/*.toml`): fleet, workload, arrival process, load levels,
//! SLOs, and optional faults or admission control. A user writes their own without code.
//!
//! ```toml
//! name = "heterogeneous"
//! time_scale = 1.0            # simulated workers run this many times faster than hardware
//! seed = 1
//! requests = 400              # per load level
//! loads = [0.5, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1]
//! [slo]
//! ttft_ms = 2000
//! tpot_ms = 100
//! [[fleet]]
//! profile = "h100-llama8b"
//! count = 2
//! [workload]
//! kind = "lognormal"          # lognormal | shared_prefix | mooncake | azure | sharegpt
//! prompt_median = 800
//! output_median = 200
//! [arrival]
//! process = "poisson"         # poisson | gamma (shape = 0.25) | trace
//! ```

use serde::Deserialize;

use crate::metrics::Slo;
use crate::workload::{Arrival, Workload};

/// One group of identical simulated workers.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetGroup {
    /// Simulator profile.
    pub profile: String,
    /// How many.
    #[serde(default = "one")]
    pub count: usize,
    /// Speed factor.
    #[serde(default = "unit")]
    pub speed: f64,
    /// `plain`, `prefill` or `decode`.
    #[serde(default = "plain")]
    pub role: String,
    /// KV capacity override (tokens).
    #[serde(default)]
    pub kv_capacity_tokens: Option<u64>,
}

fn one() -> usize {
    1
}
fn unit() -> f64 {
    1.0
}
fn plain() -> String {
    "plain".into()
}

/// A worker slowed down for part of each run (the `degraded` scenario).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Worker index in fleet order.
    pub worker: usize,
    /// Step-time multiplier while degraded (1/0.3 ≈ 3.33 for "slows to 0.3×").
    pub slowdown: f64,
    /// Start, as a fraction of each load level's arrivals.
    pub from: f64,
    /// End, same units.
    pub to: f64,
}

impl Fault {
    /// Arrival time (simulated seconds) at `fraction` of `specs`.
    pub fn at(&self, specs: &[crate::workload::RequestSpec], fraction: f64) -> f64 {
        specs.get(((fraction * specs.len() as f64) as usize).min(specs.len().saturating_sub(1))).map_or(0.0, |r| r.at)
    }
}

/// How fleet capacity is measured: closed loop, least in-flight routing, in the
/// discrete-event simulation over a ladder of concurrencies (see `des::best_capacity`), or
/// live at `concurrency_per_worker` with `compare --live-capacity`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// Outstanding requests per worker in a live measurement.
    #[serde(default = "default_conc")]
    pub concurrency_per_worker: usize,
    /// Requests in the measurement.
    #[serde(default = "default_cap_requests")]
    pub requests: usize,
}

fn default_conc() -> usize {
    64
}
fn default_cap_requests() -> usize {
    4000
}

impl Default for Capacity {
    fn default() -> Self {
        Self { concurrency_per_worker: default_conc(), requests: default_cap_requests() }
    }
}

/// Admission control every router runs with (the `overload` scenario).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admission {
    /// Requests proxied at once per worker (peers' `--max-concurrent-requests` = this × workers).
    pub max_concurrent_per_worker: usize,
}

/// A scenario.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name (file stem by default).
    #[serde(default)]
    pub name: String,
    /// Simulated time runs this many times faster than hardware time.
    #[serde(default = "unit")]
    pub time_scale: f64,
    /// Seed of the workload and the fleet.
    #[serde(default)]
    pub seed: u64,
    /// Requests per load level.
    #[serde(default = "default_requests")]
    pub requests: usize,
    /// Load levels as fractions of measured capacity.
    pub loads: Vec<f64>,
    /// SLOs for goodput.
    #[serde(default)]
    pub slo: Slo,
    /// The fleet.
    pub fleet: Vec<FleetGroup>,
    /// Request shapes.
    pub workload: Workload,
    /// Arrival process.
    #[serde(default)]
    pub arrival: Arrival,
    /// Capacity measurement.
    #[serde(default)]
    pub capacity: Capacity,
    /// Optional mid-run degradation.
    #[serde(default)]
    pub fault: Option<Fault>,
    /// Optional admission control for every router.
    #[serde(default)]
    pub admission: Option<Admission>,
    /// Extra switchyard flags for this scenario (e.g. `["--mu-overload", "shed"]`).
    #[serde(default)]
    pub switchyard_args: Vec<String>,
}

fn default_requests() -> usize {
    400
}

/// A scenario file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// I/O.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Bad content.
    #[error("invalid scenario {path}: {message}")]
    Invalid {
        /// Path.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl Scenario {
    /// Parses scenario text; `path` names it in errors and gives the default name. Relative
    /// trace paths are resolved against `SWITCHYARD_TRACES` (default `../shared/data/traces`
    /// from the repository root).
    pub fn parse(path: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let invalid = |message: String| ScenarioError::Invalid { path: path.into(), message };
        let mut s: Scenario = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if s.name.is_empty() {
            s.name = std::path::Path::new(path).file_stem().and_then(|n| n.to_str()).unwrap_or("scenario").to_owned();
        }
        if s.fleet.is_empty() || s.fleet.iter().any(|g| g.count == 0) {
            return Err(invalid("the fleet needs at least one worker".into()));
        }
        for g in &s.fleet {
            if switchyard_sim::model::Profile::by_name(&g.profile).is_none() {
                return Err(invalid(format!("unknown profile '{}'", g.profile)));
            }
            if !["plain", "prefill", "decode"].contains(&g.role.as_str()) {
                return Err(invalid(format!("unknown role '{}'", g.role)));
            }
        }
        let has = |role: &str| s.fleet.iter().any(|g| g.role == role && g.count > 0);
        if s.is_pd() && (has("plain") || !has("prefill") || !has("decode")) {
            return Err(invalid("a PD fleet needs prefill and decode workers and no plain ones".into()));
        }
        if s.loads.is_empty() || s.loads.iter().any(|l| !(*l > 0.0 && l.is_finite())) {
            return Err(invalid("loads must be positive fractions of capacity".into()));
        }
        if s.time_scale.is_nan() || s.time_scale <= 0.0 || s.requests == 0 {
            return Err(invalid("time_scale must be > 0 and requests ≥ 1".into()));
        }
        let traces = std::env::var("SWITCHYARD_TRACES").unwrap_or_else(|_| default_traces_dir());
        match &mut s.workload {
            Workload::Mooncake { path, .. } | Workload::Azure { path, .. } | Workload::Sharegpt { path }
                if std::path::Path::new(path).is_relative() && !std::path::Path::new(path).exists() =>
            {
                *path = format!("{traces}/{path}");
            }
            _ => {}
        }
        Ok(s)
    }

    /// Reads and parses a scenario file.
    pub fn load(path: &str) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { path: path.into(), source })?;
        Self::parse(path, &text)
    }

    /// Workers in fleet order: (profile, speed, role, kv override).
    pub fn workers(&self) -> Vec<&FleetGroup> {
        self.fleet.iter().flat_map(|g| std::iter::repeat_n(g, g.count)).collect()
    }

    /// Whether the fleet is split into prefill and decode workers.
    pub fn is_pd(&self) -> bool {
        self.fleet.iter().any(|g| g.role != "plain")
    }

    /// The fleet as a `switchyard-sim --fleet` file.
    pub fn fleet_toml(&self) -> String {
        let mut out = format!("time_scale = {}\nseed = {}\n", self.time_scale, self.seed);
        for g in &self.fleet {
            out.push_str(&format!(
                "[[worker]]\nprofile = \"{}\"\ncount = {}\nspeed = {}\nrole = \"{}\"\n",
                g.profile, g.count, g.speed, g.role
            ));
            if let Some(kv) = g.kv_capacity_tokens {
                out.push_str(&format!("kv_capacity_tokens = {kv}\n"));
            }
        }
        out
    }
}

/// `../shared/data/traces` next to the repository (the crate lives two levels down).
pub fn default_traces_dir() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/traces").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/scenarios");
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir).expect("bench/scenarios exists") {
            let path = e.expect("entry").path();
            let s = Scenario::load(path.to_str().expect("utf-8 path")).unwrap_or_else(|e| panic!("{e}"));
            names.push(s.name);
        }
        names.sort();
        for expected in [
            "bursty",
            "degraded",
            "heterogeneous",
            "homogeneous",
            "multi-turn",
            "overload",
            "pd",
            "shared-prefix",
            "shared-prefix-large",
            "slow-tier",
            "tight-tpot",
        ] {
            assert!(names.iter().any(|n| n == expected), "missing scenario {expected}: {names:?}");
        }
    }

    #[test]
    fn bad_scenarios_name_the_problem() {
        let e = Scenario::parse("x.toml", "loads=[1.0]\n[[fleet]]\nprofile=\"tpu\"\n[workload]\nkind=\"lognormal\"\nprompt_median=1\noutput_median=1\n").unwrap_err();
        assert!(e.to_string().contains("tpu"), "{e}");
        let e = Scenario::parse(
            "x.toml",
            "loads=[]\n[[fleet]]\nprofile=\"h100\"\n[workload]\nkind=\"lognormal\"\nprompt_median=1\noutput_median=1\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("loads"), "{e}");
        let e = Scenario::parse("x.toml", "loads=[1.0]\nbogus=1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        // A PD fleet needs both pools: without one every request would fail or skip the split.
        let e = Scenario::parse(
            "x.toml",
            "loads=[1.0]\n[[fleet]]\nprofile=\"h100\"\nrole=\"prefill\"\n[workload]\nkind=\"lognormal\"\nprompt_median=1\noutput_median=1\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("prefill and decode"), "{e}");
    }
}
