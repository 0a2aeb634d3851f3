//! Worker membership as immutable snapshots swapped atomically: the request path reads a
//! snapshot with one atomic load and never takes a lock (after pingora-load-balancing).
//!
//! Membership is an event: every change is announced, in order, to the listeners (the
//! policies), so per-worker state dies with the worker (linkerd's pool). A removed worker is
//! marked retired *before* it is announced, so state recorded concurrently for it (a request
//! finishing there, a policy recording a choice made on an older snapshot) can check the mark
//! and drop itself: whichever runs second cleans up.

use std::mem::{discriminant, Discriminant};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::{Worker, WorkerRole};

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

/// All workers, the healthy ones, the ones requests may go to, and the models they serve, as
/// snapshots.
#[derive(Default)]
pub struct WorkerRegistry {
    all: ArcSwap<Vec<Arc<Worker>>>,
    healthy: ArcSwap<Vec<Arc<Worker>>>,
    /// `healthy`, unless a pool is in health panic ([`WorkerRegistry::with_panic_threshold`]).
    routable: ArcSwap<Vec<Arc<Worker>>>,
    /// Below this share of a pool's workers passing their probes, the pool is in panic.
    panic_threshold: f64,
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

    /// Health panic (Envoy's panic threshold): when fewer than `threshold` of a pool's
    /// workers that have ever passed a probe pass them now, requests go to all of those, not
    /// only the healthy ones (0 turns it off). A probe is a proxy for whether a worker can
    /// serve, and under load it is the first thing to fail: CPU-starved engines answering
    /// `/health` late were all marked unhealthy within seconds of one another, and every
    /// request got 503 though every engine was serving (four router replicas at 1.6x the
    /// knee on 2 cores, README). Spreading over a fleet half of which may be dead is better
    /// than refusing everything; the circuit breakers, which count real requests' failures,
    /// still take out the ones that are. A pool is the workers of one role serving the same
    /// models; engines still loading (never healthy) are never sent anything.
    pub fn with_panic_threshold(mut self, threshold: f64) -> Self {
        self.panic_threshold = threshold;
        self
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

    /// The workers passing their health probes now.
    pub fn healthy(&self) -> Arc<Vec<Arc<Worker>>> {
        self.healthy.load_full()
    }

    /// The workers a policy may choose from now: the healthy ones, and in a pool in health
    /// panic every worker that has served ([`WorkerRegistry::with_panic_threshold`]).
    pub fn routable(&self) -> Arc<Vec<Arc<Worker>>> {
        self.routable.load_full()
    }

    /// Whether some pool is in health panic: then, and only then, workers that fail their
    /// probes are routable.
    pub fn in_panic(&self) -> bool {
        self.routable.load().len() > self.healthy.load().len()
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
            self.refresh_health(&self.all.load());
        }
    }

    /// Recomputes the healthy and routable snapshots of `all`.
    fn refresh_health(&self, all: &[Arc<Worker>]) {
        let healthy: Arc<Vec<Arc<Worker>>> = Arc::new(all.iter().filter(|w| w.is_healthy()).cloned().collect());
        let panicking = pools_in_panic(all, self.panic_threshold);
        let routable = if panicking.is_empty() {
            healthy.clone()
        } else {
            let routable = |w: &Arc<Worker>| w.is_healthy() || (w.ready_once() && panicking.contains(&pool_of(w)));
            Arc::new(all.iter().filter(|w| routable(w)).cloned().collect())
        };
        let (was, now) = (self.in_panic(), routable.len() > healthy.len());
        if was != now {
            if now {
                tracing::warn!(
                    healthy = healthy.len(),
                    routable = routable.len(),
                    threshold = self.panic_threshold,
                    "health panic: too few workers pass their probes; routing across every worker that has served"
                );
            } else {
                tracing::info!(healthy = healthy.len(), "health panic over: routing to the healthy workers only");
            }
        }
        self.healthy.store(healthy);
        self.routable.store(routable);
    }

    fn publish(&self, next: Vec<Arc<Worker>>) {
        let mut models: Vec<String> = next.iter().flat_map(|w| w.models()).collect();
        models.sort();
        models.dedup();
        self.models.store(Arc::new(models));
        self.refresh_health(&next);
        self.all.store(Arc::new(next));
    }
}

/// What makes a pool: a role and the models served.
type Pool = (Discriminant<WorkerRole>, Vec<String>);

fn pool_of(w: &Worker) -> Pool {
    (discriminant(&w.role()), w.models())
}

/// The pools of `all` in health panic: some worker of it has served, and fewer than
/// `threshold` of those pass their probes now.
fn pools_in_panic(all: &[Arc<Worker>], threshold: f64) -> Vec<Pool> {
    if threshold <= 0.0 || all.iter().all(|w| w.is_healthy()) {
        return Vec::new();
    }
    // (pool, workers that have served, of those healthy now); a fleet has few pools.
    let mut pools: Vec<(Pool, usize, usize)> = Vec::new();
    // A worker not yet probed counts as it is (healthy): it takes requests either way.
    for w in all.iter().filter(|w| w.ready_once() || w.is_healthy()) {
        let pool = pool_of(w);
        let i = match pools.iter().position(|(p, _, _)| *p == pool) {
            Some(i) => i,
            None => {
                pools.push((pool, 0, 0));
                pools.len() - 1
            }
        };
        pools[i].1 += 1;
        pools[i].2 += usize::from(w.is_healthy());
    }
    pools
        .into_iter()
        .filter(|&(_, served, healthy)| (healthy as f64) < threshold * served as f64)
        .map(|(p, _, _)| p)
        .collect()
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

    fn urls(ws: &[Arc<Worker>]) -> Vec<&str> {
        ws.iter().map(|w| w.url()).collect()
    }

    #[test]
    fn below_the_panic_threshold_a_pool_routes_to_every_worker_that_has_served_and_no_other_pool_does() {
        let r = WorkerRegistry::new().with_panic_threshold(0.5);
        let regular: Vec<_> = (1..=4).map(worker).collect();
        let decode: Vec<_> =
            (11..=12).map(|p| Arc::new(Worker::new(format!("http://127.0.0.1:{p}"), WorkerRole::Decode))).collect();
        let other_model = worker(21);
        other_model.set_models(vec!["other".into()]);
        for w in regular.iter().chain(&decode).chain([&other_model]) {
            r.add(w.clone()).unwrap();
            r.set_healthy(w, true); // passed a probe: it has served
        }
        // An engine still loading: it has never passed a probe.
        let loading = worker(5);
        r.add(loading.clone()).unwrap();
        r.set_healthy(&loading, false);
        assert!(!r.in_panic());
        assert_eq!(r.routable().len(), 7);

        // Half the regular pool still passes: not below the threshold.
        r.set_healthy(&regular[0], false);
        r.set_healthy(&regular[1], false);
        assert!(!r.in_panic());
        assert_eq!(urls(&r.routable()), urls(&r.healthy()));
        assert!(!r.routable().iter().any(|w| Arc::ptr_eq(w, &regular[0])));

        // One in four: the pool is in panic, and every worker of it that has served is routable
        // again, the loading engine not; the decode pool and the other model's are as they were.
        r.set_healthy(&regular[2], false);
        assert!(r.in_panic());
        assert_eq!(r.healthy().len(), 4);
        assert_eq!(
            urls(&r.routable()),
            vec![
                "http://127.0.0.1:1",
                "http://127.0.0.1:2",
                "http://127.0.0.1:3",
                "http://127.0.0.1:4",
                "http://127.0.0.1:11",
                "http://127.0.0.1:12",
                "http://127.0.0.1:21"
            ]
        );

        // A pool of its own: the other model's only worker down is that pool's panic, and the
        // decode pool at one of two healthy is not in panic.
        r.set_healthy(&regular[2], true);
        assert!(!r.in_panic());
        r.set_healthy(&decode[0], false);
        r.set_healthy(&other_model, false);
        assert!(r.in_panic());
        let routable = r.routable();
        assert!(routable.iter().any(|w| Arc::ptr_eq(w, &other_model)));
        assert!(!routable.iter().any(|w| Arc::ptr_eq(w, &decode[0])));
        assert!(!routable.iter().any(|w| Arc::ptr_eq(w, &regular[0])));
        r.set_healthy(&other_model, true);
        assert!(!r.in_panic());

        // Off (the registry's own default; the router's is `--health-panic-threshold`).
        let off = WorkerRegistry::new();
        let w = worker(1);
        off.add(w.clone()).unwrap();
        off.set_healthy(&w, true);
        off.set_healthy(&w, false);
        assert!(!off.in_panic());
        assert!(off.routable().is_empty());
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
