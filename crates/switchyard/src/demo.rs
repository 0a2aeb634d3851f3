//! The built-in demo: simulated workers started in this process, so the router runs with
//! nothing else installed (`switchyard --sim-workers 4`). Behind the default `demo` feature:
//! `cargo build -p switchyard --no-default-features` gives a router without the simulator.

use switchyard_sim::fleet;
use switchyard_sim::model::Profile;
use switchyard_sim::server::{Role, WorkerConfig, WorkerHandle};

use crate::config::{Args, RouterConfig};

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
    let profile = Profile::by_name(profile).ok_or_else(|| format!("unknown simulator profile '{profile}'"))?;
    let base = WorkerConfig { profile, time_scale, ..WorkerConfig::default() };
    let p = WorkerConfig { role: Role::Prefill, ..base.clone() };
    let d = WorkerConfig { role: Role::Decode, seed: 1000, ..base };
    let prefill = fleet::spawn_fleet(fleet::uniform(prefill, 0, &p)).await.map_err(|e| e.to_string())?;
    let decode = fleet::spawn_fleet(fleet::uniform(decode, 0, &d)).await.map_err(|e| e.to_string())?;
    Ok((prefill, decode))
}

/// The simulated workers `--sim-workers` / `--sim-prefill` / `--sim-decode` asked for,
/// running until dropped.
#[derive(Default)]
pub struct DemoFleet {
    workers: Vec<WorkerHandle>,
}

impl DemoFleet {
    /// Starts what `args` asks for and adds the workers to `config`.
    pub async fn start(args: &Args, config: &mut RouterConfig) -> Result<Self, String> {
        let mut workers = match args.sim_workers {
            Some(n) => start_fleet(n.into(), &args.sim_profile, args.sim_time_scale, 0).await?,
            None => Vec::new(),
        };
        config.worker_urls.extend(workers.iter().map(|w| w.url()));
        if args.sim_prefill.is_some() || args.sim_decode.is_some() {
            let (prefill, decode) = start_pd_fleet(
                args.sim_prefill.unwrap_or(1).into(),
                args.sim_decode.unwrap_or(1).into(),
                &args.sim_profile,
                args.sim_time_scale,
            )
            .await?;
            if let Some(pd) = config.pd.as_mut() {
                pd.prefill.extend(prefill.iter().map(|w| (w.url(), w.bootstrap_port())));
                pd.decode.extend(decode.iter().map(|w| w.url()));
            }
            workers.extend(prefill);
            workers.extend(decode);
        }
        Ok(Self { workers })
    }

    /// Prints the simulated workers and a request to try against the router at `url`.
    pub fn print(&self, url: &str, profile: &str) {
        if self.workers.is_empty() {
            return;
        }
        println!("simulated workers ({profile}):");
        for w in &self.workers {
            let role = match w.config().role {
                Role::Plain => "",
                Role::Prefill => " (prefill)",
                Role::Decode => " (decode)",
            };
            println!("  {}{role}", w.url());
        }
        println!(
            "try:\n  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"default\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}],\"max_tokens\":32}}'"
        );
    }
}
