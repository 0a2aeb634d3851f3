//! Worker membership as immutable snapshots swapped atomically: the request path reads a
//! snapshot with one atomic load and never takes a lock (after pingora-load-balancing).
//!
//! Membership is an event: every change is announced, in order, to the listeners (the
//! policies), so per-worker state dies with the worker (linkerd's pool). A removed worker is
//! marked retired *before* it is announced, so state recorded concurrently for it (a request
//! finishing there, a policy recording a choice made on an older snapshot) can check the mark
//! and drop itself: whichever runs second cleans up.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::Worker;

/// A membership change that cannot be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegistryError {
    /// The URL is already registered.
    #[error("worker {0} is already registered")]
    AlreadyExists(String),
    /// The URL is not registered.
    #[error("worker {0} is not registered")]
    NotFound(String),
    /// The registry holds as many workers as it may (`--max-workers`).
    #[error("the router already has {0} workers (--max-workers)")]
    Full(usize),
}

/// A change of membership, as listeners see it.
#[derive(Debug, Clone, Copy)]
pub enum Membership<'a> {
    /// A worker joined.
    Added(&'a Arc<Worker>),
    /// A worker left: forget what is kept about it.
    Removed(&'a Arc<Worker>),
}

/// Something told about every membership change (a policy, an index).
pub type MembershipListener = Arc<dyn Fn(&Membership<'_>) + Send + Sync>;

/// All workers, the healthy ones, and the models they serve, as snapshots.
#[derive(Default)]
pub struct WorkerRegistry {
    all: ArcSwap<Vec<Arc<Worker>>>,
    healthy: ArcSwap<Vec<Arc<Worker>>>,
    /// Every model some registered worker serves, sorted (healthy or not: a model whose
    /// workers are all down is unavailable, not unknown).
    models: ArcSwap<Vec<String>>,
    /// Serialises writers (and so the order of announcements); readers never touch it.
    write: Mutex<()>,
    listeners: Mutex<Vec<MembershipListener>>,
    max_workers: Option<usize>,
}

impl std::fmt::Debug for WorkerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerRegistry").field("workers", &self.all.load().len()).finish_non_exhaustive()
    }
}

impl WorkerRegistry {
    /// An empty registry without a bound on its size.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry holding at most `max` workers.
    pub fn bounded(max: usize) -> Self {
        Self { max_workers: Some(max), ..Self::default() }
    }

    /// Announces every later change to `listener`.
    pub fn subscribe(&self, listener: MembershipListener) {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner()).push(listener);
    }

    fn announce(&self, change: Membership<'_>) {
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for l in &listeners {
            l(&change);
        }
    }

    /// Every registered worker.
    pub fn all(&self) -> Arc<Vec<Arc<Worker>>> {
        self.all.load_full()
    }

    /// The workers a policy may choose from now.
    pub fn healthy(&self) -> Arc<Vec<Arc<Worker>>> {
        self.healthy.load_full()
    }

    /// Every model some registered worker serves, sorted.
    pub fn models(&self) -> Arc<Vec<String>> {
        self.models.load_full()
    }

    /// Looks a worker up by its key (the URL, or `url#rank` for a data-parallel rank).
    pub fn get(&self, key: &str) -> Option<Arc<Worker>> {
        self.all.load().iter().find(|w| w.key() == key).cloned()
    }

    /// Every registered worker (each data-parallel rank) at `url`.
    pub fn at_url(&self, url: &str) -> Vec<Arc<Worker>> {
        self.all.load().iter().filter(|w| w.url() == url).cloned().collect()
    }

    /// Recomputes the model list (after a worker's models changed).
    pub fn refresh_models(&self) {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        self.publish(self.all.load().iter().cloned().collect());
    }

    /// Registers a worker.
    pub fn add(&self, worker: Arc<Worker>) -> Result<(), RegistryError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.all.load();
        if current.iter().any(|w| w.key() == worker.key()) {
            return Err(RegistryError::AlreadyExists(worker.key().to_owned()));
        }
        if let Some(max) = self.max_workers.filter(|m| current.len() >= *m) {
            return Err(RegistryError::Full(max));
        }
        let mut next = Vec::with_capacity(current.len() + 1);
        next.extend(current.iter().cloned());
        next.push(worker.clone());
        self.publish(next);
        self.announce(Membership::Added(&worker));
        Ok(())
    }

    /// Unregisters a worker by key (see [`WorkerRegistry::remove_url`] for every rank at a
    /// URL). Requests already sent to it finish normally.
    pub fn remove(&self, key: &str) -> Result<Arc<Worker>, RegistryError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.all.load();
        let pos = current.iter().position(|w| w.key() == key).ok_or_else(|| RegistryError::NotFound(key.to_owned()))?;
        let mut next: Vec<_> = current.iter().cloned().collect();
        let removed = next.remove(pos);
        removed.retire();
        self.publish(next);
        self.announce(Membership::Removed(&removed));
        Ok(removed)
    }

    /// Unregisters every worker (each data-parallel rank) at `url`; returns them.
    pub fn remove_url(&self, url: &str) -> Result<Vec<Arc<Worker>>, RegistryError> {
        let keys: Vec<String> = self.at_url(url).iter().map(|w| w.key().to_owned()).collect();
        if keys.is_empty() {
            return Err(RegistryError::NotFound(url.to_owned()));
        }
        Ok(keys.iter().filter_map(|k| self.remove(k).ok()).collect())
    }

    /// Sets a worker's health and refreshes the healthy snapshot if it changed.
    pub fn set_healthy(&self, worker: &Worker, healthy: bool) {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if worker.set_healthy_flag(healthy) {
            let all = self.all.load();
            self.healthy.store(Arc::new(all.iter().filter(|w| w.is_healthy()).cloned().collect()));
        }
    }

    fn publish(&self, next: Vec<Arc<Worker>>) {
        let mut models: Vec<String> = next.iter().flat_map(|w| w.models()).collect();
        models.sort();
        models.dedup();
        self.models.store(Arc::new(models));
        self.healthy.store(Arc::new(next.iter().filter(|w| w.is_healthy()).cloned().collect()));
        self.all.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::WorkerRole;

    fn worker(port: u16) -> Arc<Worker> {
        Arc::new(Worker::new(format!("http://127.0.0.1:{port}"), WorkerRole::Regular))
    }

    #[test]
    fn membership_and_health_snapshots() {
        let r = WorkerRegistry::new();
        r.add(worker(1)).unwrap();
        r.add(worker(2)).unwrap();
        assert_eq!(r.add(worker(1)), Err(RegistryError::AlreadyExists("http://127.0.0.1:1".into())));
        let before = r.healthy();
        let w1 = r.get("http://127.0.0.1:1").unwrap();
        r.set_healthy(&w1, false);
        assert_eq!(before.len(), 2, "old snapshots are never mutated");
        assert_eq!(r.healthy().len(), 1);
        r.set_healthy(&w1, true);
        assert_eq!(r.healthy().len(), 2);
        r.remove("http://127.0.0.1:2").unwrap();
        assert_eq!((r.all().len(), r.healthy().len()), (1, 1));
        assert!(r.remove("http://127.0.0.1:2").is_err());
    }

    #[test]
    fn changes_are_announced_in_order_and_removed_workers_are_retired_first() {
        let r = WorkerRegistry::bounded(2);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        r.subscribe(Arc::new(move |c: &Membership<'_>| {
            let entry = match c {
                Membership::Added(w) => format!("+{}", w.url()),
                Membership::Removed(w) => format!("-{} retired={}", w.url(), w.is_retired()),
            };
            log.lock().unwrap().push(entry);
        }));
        r.add(worker(1)).unwrap();
        r.add(worker(2)).unwrap();
        assert_eq!(r.add(worker(3)), Err(RegistryError::Full(2)));
        r.remove("http://127.0.0.1:1").unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec!["+http://127.0.0.1:1", "+http://127.0.0.1:2", "-http://127.0.0.1:1 retired=true"]
        );
    }
}
