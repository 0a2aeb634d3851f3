//! The built-in demo: simulated workers started in this process, so the router runs with
//! nothing else installed (`switchyard --sim-workers 4`).

use switchyard_sim::fleet;
use switchyard_sim::model::Profile;
use switchyard_sim::server::{WorkerConfig, WorkerHandle};

/// Starts `count` simulated workers of `profile` on free loopback ports.
pub async fn start_fleet(count: usize, profile: &str, time_scale: f64, seed: u64) -> Result<Vec<WorkerHandle>, String> {
    let profile = Profile::by_name(profile)
        .ok_or_else(|| format!("unknown simulator profile '{profile}' (known: {})", Profile::NAMES.join(", ")))?;
    let template = WorkerConfig { profile, time_scale, seed, ..WorkerConfig::default() };
    fleet::spawn_fleet(fleet::uniform(count, 0, &template)).await.map_err(|e| e.to_string())
}

/// Starts a simulated PD fleet: `prefill` prefill workers (each with a KV bootstrap server on
/// a free port) and `decode` decode workers.
pub async fn start_pd_fleet(
    prefill: usize,
    decode: usize,
    profile: &str,
    time_scale: f64,
) -> Result<(Vec<WorkerHandle>, Vec<WorkerHandle>), String> {
    use switchyard_sim::server::Role;
    let profile = Profile::by_name(profile).ok_or_else(|| format!("unknown simulator profile '{profile}'"))?;
    let base = WorkerConfig { profile, time_scale, ..WorkerConfig::default() };
    let p = WorkerConfig { role: Role::Prefill, ..base.clone() };
    let d = WorkerConfig { role: Role::Decode, seed: 1000, ..base };
    let prefill = fleet::spawn_fleet(fleet::uniform(prefill, 0, &p)).await.map_err(|e| e.to_string())?;
    let decode = fleet::spawn_fleet(fleet::uniform(decode, 0, &d)).await.map_err(|e| e.to_string())?;
    Ok((prefill, decode))
}
