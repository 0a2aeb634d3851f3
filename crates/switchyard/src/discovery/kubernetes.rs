//! Kubernetes service discovery: pods matching a label selector are workers.
//!
//! kube-rs's watcher lists the pods, then watches them from the list's `resourceVersion`; it
//! re-watches when a watch ends or its connection drops, relists on `410 Gone`, and backs off
//! on errors. Every [`RESYNC`] the watch starts over with a fresh list, so a change missed
//! anyhow is repaired. Each list ends in a reconciliation: pods gone meanwhile are removed.
//!
//! A pod is a worker when it is Running and Ready, has an IP and is not terminating. Workers
//! join and leave through the same path as the admin API ([`Onboarding`]); discovery only ever
//! removes workers it added itself (a worker added by hand at the same URL is left alone).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::watch as signal;
use tokio::task::JoinHandle;

use super::{Candidate, Onboarding};
use crate::config::{normalize_worker_url, DiscoveryConfig};
use crate::workers::WorkerRole;

/// The source name discovered workers carry ([`crate::workers::Worker::source`]).
pub const SOURCE: &str = "kubernetes";

/// How often the watch starts over from a fresh list.
const RESYNC: Duration = Duration::from_secs(300);

/// Which roles the router's mode needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Regular workers, by `--selector`.
    Regular,
    /// Prefill and decode workers, by `--prefill-selector` and `--decode-selector`.
    Pd,
}

impl Mode {
    /// The mode of a router in PD mode (`pd`) or not.
    pub fn of(pd: bool) -> Self {
        if pd {
            Mode::Pd
        } else {
            Mode::Regular
        }
    }
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No way to reach an API server.
    #[error("service discovery: no usable Kubernetes configuration ({0})")]
    Config(String),
}

/// Which kind of worker a watched selector finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Regular,
    Prefill,
    Decode,
}

/// Connects to the API server and starts one watch per selector the mode needs. Fails only
/// when there is no configuration to reach a server with; an unreachable server is retried.
pub async fn spawn(
    config: DiscoveryConfig,
    mode: Mode,
    onboarding: Arc<Onboarding>,
    shutdown: signal::Receiver<()>,
) -> Result<(), DiscoveryError> {
    let client = client(&config).await?;
    let config = Arc::new(config);
    let kinds: &[Kind] = match mode {
        Mode::Regular => &[Kind::Regular],
        Mode::Pd => &[Kind::Prefill, Kind::Decode],
    };
    for &kind in kinds {
        let api: Api<Pod> = match &config.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let watch = PodWatch::new(config.clone(), kind, onboarding.clone());
        tokio::spawn(watch.run(api, shutdown.clone()));
    }
    tracing::info!(
        namespace = config.namespace.as_deref().unwrap_or("(all)"),
        ?mode,
        "Kubernetes service discovery started"
    );
    Ok(())
}

async fn client(config: &DiscoveryConfig) -> Result<Client, DiscoveryError> {
    let err = |e: &dyn std::fmt::Display| DiscoveryError::Config(e.to_string());
    // kube's TLS (for https API servers) uses rustls's process-wide provider.
    let _ = crate::tls::default_client_config();
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| err(&e))?
        }
        None => kube::Config::infer().await.map_err(|e| err(&e))?,
    };
    Client::try_from(kube_config).map_err(|e| err(&e))
}

/// What a pod asks for: a worker at `url` with this role and these models.
#[derive(Debug, Clone, PartialEq)]
struct Wanted {
    url: String,
    role: WorkerRole,
    models: Vec<String>,
    kv_events: Option<crate::kv_events::Endpoints>,
}

/// One selector's pods and the workers they became.
struct PodWatch {
    config: Arc<DiscoveryConfig>,
    kind: Kind,
    onboarding: Arc<Onboarding>,
    /// By pod (`namespace/name`): what it asks for now. Shared with the admission tasks,
    /// which register a worker only while its pod still wants it (under this lock).
    wanted: Arc<Mutex<HashMap<String, Wanted>>>,
    /// Admissions in progress, by pod.
    pending: HashMap<String, JoinHandle<()>>,
    /// Pods seen since the current list began.
    listing: Option<HashSet<String>>,
}

impl PodWatch {
    fn new(config: Arc<DiscoveryConfig>, kind: Kind, onboarding: Arc<Onboarding>) -> Self {
        Self { config, kind, onboarding, wanted: Default::default(), pending: HashMap::new(), listing: None }
    }

    fn selector(&self) -> String {
        let labels = match self.kind {
            Kind::Regular => &self.config.selector,
            Kind::Prefill => &self.config.prefill_selector,
            Kind::Decode => &self.config.decode_selector,
        };
        labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }

    async fn run(mut self, api: Api<Pod>, mut shutdown: signal::Receiver<()>) {
        let selector = self.selector();
        loop {
            let config = watcher::Config::default().labels(&selector);
            let mut events = watcher::watcher(api.clone(), config).default_backoff().boxed();
            let resync = tokio::time::sleep(RESYNC);
            tokio::pin!(resync);
            loop {
                tokio::select! {
                    event = events.next() => match event {
                        Some(Ok(event)) => self.on_event(event),
                        Some(Err(e)) => tracing::warn!(selector, error = %e, "Kubernetes watch error; retrying with backoff"),
                        None => break,
                    },
                    _ = &mut resync => break,
                    _ = shutdown.changed() => {
                        for (_, task) in self.pending.drain() {
                            task.abort();
                        }
                        return;
                    }
                }
            }
            tracing::debug!(selector, "Kubernetes watch starting over (resync)");
        }
    }

    fn on_event(&mut self, event: Event<Pod>) {
        match event {
            Event::Init => self.listing = Some(HashSet::new()),
            Event::InitApply(pod) | Event::Apply(pod) => {
                let key = pod_key(&pod);
                if let Some(seen) = &mut self.listing {
                    seen.insert(key.clone());
                }
                let wanted = self.wanted_of(&pod);
                self.set(key, wanted);
            }
            Event::Delete(pod) => self.set(pod_key(&pod), None),
            Event::InitDone => {
                // Pods that did not come back in the new list are gone.
                let Some(seen) = self.listing.take() else { return };
                let gone: Vec<String> = {
                    let wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
                    wanted.keys().filter(|k| !seen.contains(*k)).cloned().collect()
                };
                for key in gone {
                    self.set(key, None);
                }
            }
        }
    }

    /// The worker a pod should be, if it should be one now.
    fn wanted_of(&self, pod: &Pod) -> Option<Wanted> {
        let status = pod.status.as_ref()?;
        if pod.metadata.deletion_timestamp.is_some() || status.phase.as_deref() != Some("Running") {
            return None;
        }
        let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
        let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
        if !ready {
            return None;
        }
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
        let url = normalize_worker_url(&format!("{}://{host}:{}", self.config.scheme, self.config.port)).ok()?;
        let labels = pod.metadata.labels.as_ref();
        let annotations = pod.metadata.annotations.as_ref();
        let role = match self.kind {
            Kind::Regular => WorkerRole::Regular,
            Kind::Decode => WorkerRole::Decode,
            Kind::Prefill => {
                let raw = annotations.and_then(|a| a.get(&self.config.bootstrap_port_annotation));
                let bootstrap_port = raw.and_then(|p| p.trim().parse::<u16>().ok());
                if raw.is_some() && bootstrap_port.is_none() {
                    tracing::warn!(pod = pod_key(pod), value = ?raw, "bootstrap port annotation is not a port; ignored");
                }
                WorkerRole::Prefill { bootstrap_port }
            }
        };
        let model = labels
            .and_then(|l| l.get(&self.config.model_label))
            .or_else(|| annotations.and_then(|a| a.get(&self.config.model_label)))
            .filter(|m| !m.is_empty());
        let endpoint = |annotation: &str| {
            let raw = annotations.and_then(|a| a.get(annotation))?.trim();
            let e = match raw.parse::<u16>() {
                Ok(port) => format!("tcp://{host}:{port}"),
                Err(_) => raw.replace("{host}", &host),
            };
            if switchyard_kv_events::zmtp::tcp_address(&e).is_none() {
                tracing::warn!(
                    pod = pod_key(pod),
                    annotation,
                    value = raw,
                    "KV events annotation is neither a port nor tcp://HOST:PORT; ignored"
                );
                return None;
            }
            Some(e)
        };
        let kv_events = endpoint(&self.config.kv_events_annotation).map(|events| crate::kv_events::Endpoints {
            events,
            replay: endpoint(&format!("{}-replay", self.config.kv_events_annotation)),
        });
        Some(Wanted { url, role, models: model.into_iter().cloned().collect(), kv_events })
    }

    /// Makes `pod` want `next`: nothing changes when it wanted the same; otherwise its old
    /// worker (if any) leaves and the new one is admitted.
    fn set(&mut self, pod: String, next: Option<Wanted>) {
        let previous = {
            let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
            if wanted.get(&pod) == next.as_ref() {
                return;
            }
            match &next {
                Some(w) => wanted.insert(pod.clone(), w.clone()),
                None => wanted.remove(&pod),
            }
        };
        if let Some(task) = self.pending.remove(&pod) {
            task.abort();
        }
        if let Some(old) = previous {
            self.retire(&pod, &old.url);
        }
        if let Some(w) = next {
            self.admit(pod, w);
        }
    }

    /// Removes the workers discovery added at `url` (every rank; never one added by hand).
    fn retire(&self, pod: &str, url: &str) {
        let registry = &self.onboarding.registry;
        for w in registry.at_url(url).iter().filter(|w| w.source() == Some(SOURCE)) {
            if registry.remove(w.key()).is_ok() {
                tracing::info!(pod, worker = w.key(), "worker removed (pod gone, not ready, or moved)");
            }
        }
    }

    /// Probes and registers a pod's worker in the background.
    fn admit(&mut self, pod: String, w: Wanted) {
        let (onboarding, wanted) = (self.onboarding.clone(), self.wanted.clone());
        let candidate = Candidate {
            url: w.url.clone(),
            role: w.role,
            models: w.models.clone(),
            source: Some(SOURCE.into()),
            kv_events: w.kv_events.clone(),
        };
        let task_pod = pod.clone();
        let task = tokio::spawn(async move {
            let pod = task_pod;
            if onboarding.registry.at_url(&candidate.url).iter().any(|x| x.source().is_none()) {
                tracing::info!(pod, worker = candidate.url, "pod's worker was added by hand; left to its owner");
                return;
            }
            let workers = match onboarding.prepare(candidate).await {
                Ok(workers) => workers,
                Err(e) => {
                    tracing::warn!(pod, error = %e, "discovered worker refused");
                    return;
                }
            };
            // Registered only if the pod still wants it: a deletion that came meanwhile
            // removed the entry under this lock, and so wins.
            let still = wanted.lock().unwrap_or_else(|p| p.into_inner());
            if still.get(&pod) != Some(&w) {
                return;
            }
            match onboarding.register(&workers) {
                Ok(()) => tracing::info!(pod, worker = w.url, ranks = workers.len(), "worker discovered"),
                Err(e) => tracing::warn!(pod, error = %e, "discovered worker not registered"),
            }
        });
        self.pending.retain(|_, t| !t.is_finished());
        self.pending.insert(pod, task);
    }
}

fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or(""), pod.metadata.name.as_deref().unwrap_or(""))
}
