//! Fleets of simulated workers in one process: `--workers N --base-port P`, or a TOML
//! fleet file listing each worker's port, profile, speed and role.
//!
//! ```toml
//! time_scale = 10.0          # optional, default 1
//! seed = 7                   # optional; worker i gets seed + i
//! [[worker]]
//! profile = "h100-llama8b"
//! count = 2                  # optional, default 1
//! [[worker]]
//! profile = "l4-llama8b"
//! port = 31010               # optional, default: base port + index, or any free port
//! speed = 0.9
//! role = "plain"             # plain | prefill | decode
//! ```

use serde::Deserialize;

use crate::model::Profile;
use crate::server::{spawn_worker, Role, StartError, WorkerConfig, WorkerHandle};

/// A fleet file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// Real time runs this many times faster than simulated time.
    #[serde(default)]
    pub time_scale: Option<f64>,
    /// Base seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Model name served by every worker.
    #[serde(default)]
    pub model_name: Option<String>,
    /// Worker groups.
    pub worker: Vec<WorkerSpec>,
}

/// One `[[worker]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    /// Profile name (see [`Profile::NAMES`]).
    pub profile: String,
    /// Fixed port (only with `count = 1`).
    #[serde(default)]
    pub port: Option<u16>,
    /// Speed factor.
    #[serde(default)]
    pub speed: Option<f64>,
    /// Role.
    #[serde(default)]
    pub role: Option<Role>,
    /// How many identical workers.
    #[serde(default)]
    pub count: Option<usize>,
    /// Override of the profile's KV capacity.
    #[serde(default)]
    pub kv_capacity_tokens: Option<u64>,
}

/// Why a fleet could not be described or started.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The file could not be read.
    #[error("cannot read fleet file {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a valid fleet.
    #[error("invalid fleet file {path}: {message}")]
    Parse {
        /// Path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Unknown profile.
    #[error("unknown profile '{0}' (known: h100-llama8b, a100-llama8b, l4-llama8b)")]
    UnknownProfile(String),
    /// A worker failed to start.
    #[error(transparent)]
    Start(#[from] StartError),
}

/// Worker `i`'s port given the first one (0 = any free port, for every worker).
fn nth_port(first: u16, i: usize) -> u16 {
    if first == 0 {
        0
    } else {
        first.saturating_add(i as u16)
    }
}

/// Worker configs for `count` identical workers on ports `base_port + i` (or free ports if 0);
/// bootstrap and KV event ports likewise count up from the template's.
pub fn uniform(count: usize, base_port: u16, template: &WorkerConfig) -> Vec<WorkerConfig> {
    (0..count)
        .map(|i| WorkerConfig {
            port: nth_port(base_port, i),
            bootstrap_port: template.bootstrap_port.map(|p| nth_port(p, i)),
            kv_events_port: template.kv_events_port.map(|p| nth_port(p, i)),
            kv_events_replay_port: template.kv_events_replay_port.map(|p| nth_port(p, i)),
            seed: template.seed.wrapping_add(i as u64),
            ..template.clone()
        })
        .collect()
}

/// Worker configs from a fleet file's text; `template` supplies what the file leaves out.
pub fn from_toml(
    path: &str,
    text: &str,
    base_port: u16,
    template: &WorkerConfig,
) -> Result<Vec<WorkerConfig>, FleetError> {
    let file: FleetFile =
        toml::from_str(text).map_err(|e| FleetError::Parse { path: path.into(), message: e.to_string() })?;
    let mut out = Vec::new();
    for spec in &file.worker {
        let profile =
            Profile::by_name(&spec.profile).ok_or_else(|| FleetError::UnknownProfile(spec.profile.clone()))?;
        let count = spec.count.unwrap_or(1);
        if count > 1 && spec.port.is_some() {
            return Err(FleetError::Parse {
                path: path.into(),
                message: "'port' cannot be combined with count > 1".into(),
            });
        }
        for _ in 0..count {
            let i = out.len();
            let mut c = template.clone();
            c.profile = profile.clone();
            if let Some(kv) = spec.kv_capacity_tokens {
                c.profile.kv_capacity_tokens = kv;
            }
            c.port = spec.port.unwrap_or(nth_port(base_port, i));
            c.kv_events_port = template.kv_events_port.map(|p| nth_port(p, i));
            c.kv_events_replay_port = template.kv_events_replay_port.map(|p| nth_port(p, i));
            c.speed = spec.speed.unwrap_or(template.speed);
            c.role = spec.role.unwrap_or(template.role);
            c.time_scale = file.time_scale.unwrap_or(template.time_scale);
            c.seed = file.seed.unwrap_or(template.seed).wrapping_add(i as u64);
            if let Some(m) = &file.model_name {
                c.model_name = m.clone();
            }
            out.push(c);
        }
    }
    Ok(out)
}

/// Reads and parses a fleet file.
pub fn load(path: &str, base_port: u16, template: &WorkerConfig) -> Result<Vec<WorkerConfig>, FleetError> {
    let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read { path: path.into(), source })?;
    from_toml(path, &text, base_port, template)
}

/// Starts every worker; on a failure the ones already started are stopped (dropped).
pub async fn spawn_fleet(configs: Vec<WorkerConfig>) -> Result<Vec<WorkerHandle>, FleetError> {
    let mut handles = Vec::with_capacity(configs.len());
    for c in configs {
        handles.push(spawn_worker(c).await?);
    }
    Ok(handles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_file_expands_counts_and_overrides() {
        let text = r#"
            time_scale = 5.0
            [[worker]]
            profile = "h100"
            count = 2
            [[worker]]
            profile = "l4-llama8b"
            speed = 0.5
            role = "decode"
        "#;
        let c = from_toml("f.toml", text, 40000, &WorkerConfig::default()).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c.iter().map(|c| c.port).collect::<Vec<_>>(), vec![40000, 40001, 40002]);
        assert_eq!(c[2].profile.name, "l4-llama8b");
        assert_eq!((c[2].speed, c[2].role, c[0].time_scale), (0.5, Role::Decode, 5.0));
    }

    #[test]
    fn fleet_file_errors_name_the_problem() {
        let e = from_toml("f.toml", "[[worker]]\nprofile = \"tpu\"\n", 0, &WorkerConfig::default()).unwrap_err();
        assert!(e.to_string().contains("tpu"));
        let e = from_toml("f.toml", "[[worker]]\nprofile = \"h100\"\nspeeed = 1\n", 0, &WorkerConfig::default())
            .unwrap_err();
        assert!(e.to_string().contains("speeed"), "{e}");
    }
}
