//! Discrete-event fleet simulation: the simulator's engines in virtual time, routed by the
//! router library's own policy objects and observed through its own in-flight guards —
//! not copies — so what a policy learns and decides here is what it would in production.
//!
//! Virtual time maps onto `tokio::time::Instant`s as `base + t`, which is all the guards and
//! the policies' estimators need. Several router replicas can share one fleet, each with
//! its own policy and its own view of the workers (the stale-view study).
//!
//! A fleet split into prefill and decode workers runs as the router runs it: the policy picks
//! a pair (`select_pair`), both legs hold a guard from dispatch on, the prefill worker computes
//! the prompt and one token, the KV crosses the link (the simulator's transfer time), and the
//! decode worker, which computes no prefill, streams the answer.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use switchyard::kv_events::{BlockBudget, WorkerBlocks};
use switchyard::load::{Ending, FirstTokenOutcome, GuardObserver, InFlightGuard, ReportedLoad, RequestOutcome, Usage};
use switchyard::policies::{build, PolicyConfig, Report, RoutingError, RoutingPolicy, Selection};
use switchyard::request::{RequestView, RoutingText};
use switchyard::routers::hold::{Asked, Hold, HoldQueue};
use switchyard::workers::{Worker, WorkerRole};
use switchyard_sim::model::tokenizer::tokenize;
use switchyard_sim::model::{Engine, EngineEvent, Profile, RequestId, SimRequest};
use switchyard_sim::server::pd::transfer_seconds;
use tokio::time::Instant;

use crate::metrics::RequestResult;
use crate::scenario::{Fault, Scenario};
use crate::workload::RequestSpec;

/// What the simulated routers know of the engines' caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CacheView {
    /// The default router: a prefix tree of the prompts' text, its own guess.
    #[default]
    Text,
    /// A router with the model's tokenizer (`--tokenizer-path`): the tree in token ids.
    Tokens,
    /// A router with the tokenizer and every engine's KV events (`--kv-events-endpoint`):
    /// the engines' real cache state, as each step publishes it.
    Events,
}

/// One simulated worker.
#[derive(Debug, Clone)]
pub struct SimWorker {
    /// Performance profile.
    pub profile: Profile,
    /// Speed factor.
    pub speed: f64,
    /// Whole requests, or one side of a prefill/decode split.
    pub role: WorkerRole,
}

impl SimWorker {
    /// The scenario's workers, repeated cyclically to `n` (or as listed when `n` is `None`).
    pub fn from_scenario(s: &Scenario, n: Option<usize>) -> Vec<SimWorker> {
        let base: Vec<SimWorker> = s
            .workers()
            .into_iter()
            .map(|g| {
                let mut profile = Profile::by_name(&g.profile).unwrap_or_default();
                if let Some(kv) = g.kv_capacity_tokens {
                    profile.kv_capacity_tokens = kv;
                }
                let role = match g.role.as_str() {
                    "prefill" => WorkerRole::Prefill { bootstrap_port: None },
                    "decode" => WorkerRole::Decode,
                    _ => WorkerRole::Regular,
                };
                SimWorker { profile, speed: g.speed, role }
            })
            .collect();
        let n = n.unwrap_or(base.len());
        (0..n).map(|i| base[i % base.len()].clone()).collect()
    }
}

/// Where requests come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Open loop: the requests at their own arrival times.
    Open(Vec<RequestSpec>),
    /// Closed loop: `concurrency` outstanding; each completion sends the next shape.
    Closed {
        /// Request shapes, sent in order.
        shapes: Vec<RequestSpec>,
        /// Outstanding requests.
        concurrency: usize,
    },
}

/// What a simulation produced.
#[derive(Debug, Clone, Default)]
pub struct DesReport {
    /// Per request, in arrival order.
    pub results: Vec<RequestResult>,
    /// Wall-clock nanoseconds of each policy decision.
    pub decision_ns: Vec<f64>,
    /// Requests shed by the policy.
    pub shed: usize,
    /// Virtual seconds simulated.
    pub virtual_secs: f64,
    /// The first replica's policy state at the end (`/debug/policy`'s content).
    pub policy_state: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Time(f64);
impl Eq for Time {}
impl PartialOrd for Time {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Time {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrival(usize),
    StepDone(usize),
    /// A prefill leg's KV reached its decode worker (the key into `Simulation::transfers`).
    Transferred(u64),
    Recheck,
    Slowdown(usize, u64),
    Poll,
}

/// How often simulated routers read the workers' own load reports: the router's default
/// `--load-check-interval`, one constant for both.
const POLL_INTERVAL: f64 = switchyard::config::DEFAULT_LOAD_CHECK_INTERVAL_SECS;

/// One router replica: its policy, its own view of the workers, the observer its guards
/// report to (the policy, as the live router's pool observer does), and its hold queue.
struct Replica {
    policy: Arc<dyn RoutingPolicy>,
    workers: Vec<Arc<Worker>>,
    /// In a PD fleet, the same workers split by role (what `select_pair` is given).
    prefill: Vec<Arc<Worker>>,
    decode: Vec<Arc<Worker>>,
    observer: Arc<dyn GuardObserver>,
    hold: Arc<HoldQueue>,
}

/// A replica's guards report to its policy.
#[derive(Debug)]
struct PolicyObserver(Arc<dyn RoutingPolicy>);

impl GuardObserver for PolicyObserver {
    fn on_first_token(&self, first: &FirstTokenOutcome) {
        self.0.on_first_token(first);
    }
    fn on_end(&self, outcome: &RequestOutcome) {
        self.0.on_request_complete(outcome);
    }
}

struct Open {
    guard: Option<InFlightGuard>,
    last_token: f64,
    /// On a prefill leg: where its request decodes once the KV is there.
    handoff: Option<Handoff>,
}

/// A PD request's decode leg, claimed at dispatch (the router sends both legs at once).
struct Handoff {
    engine: usize,
    guard: InFlightGuard,
    prompt: Vec<u32>,
}

/// Runs `source` on `workers` with one policy per router replica built from `policy`.
pub struct Simulation {
    engines: Vec<Engine>,
    /// In a PD fleet, the prefill and the decode engines' indices (both empty otherwise).
    prefill: Vec<usize>,
    decode: Vec<usize>,
    /// Decode legs whose KV is crossing the link.
    transfers: HashMap<u64, (usize, Handoff)>,
    /// The KV link between prefill and decode workers, GB/s (the simulator's default).
    kv_link_gbps: f64,
    busy: Vec<bool>,
    pending: Vec<Vec<EngineEvent>>,
    replicas: Vec<Replica>,
    base: Instant,
    heap: BinaryHeap<Reverse<(Time, u64, Event)>>,
    seq: u64,
    specs: Vec<RequestSpec>,
    results: Vec<RequestResult>,
    open: HashMap<(usize, RequestId), (usize, Open)>,
    held: VecDeque<(usize, RequestView, Hold)>,
    report: DesReport,
    record_itl: bool,
    closed: Option<usize>,
    next_closed: usize,
    cache_view: CacheView,
    /// Each engine's cache as its events describe it (shared by the replicas' workers: every
    /// replica subscribes to the same events and holds the same view).
    blocks: Vec<Arc<WorkerBlocks>>,
}

impl Simulation {
    /// A fleet of `workers` behind `replicas` routers, each running `policy`.
    pub fn new(workers: &[SimWorker], policy: &PolicyConfig, replicas: usize, seed: u64) -> Self {
        let with_role = |pick: fn(&WorkerRole) -> bool| -> Vec<usize> {
            let pd = workers.iter().any(|w| w.role != WorkerRole::Regular);
            (0..workers.len()).filter(|&i| pd && pick(&workers[i].role)).collect()
        };
        let prefill = with_role(|r| matches!(r, WorkerRole::Prefill { .. }));
        let decode = with_role(|r| matches!(r, WorkerRole::Decode));
        let replicas = (0..replicas.max(1))
            .map(|r| {
                // Every replica names an engine alike, as live routers given the same worker
                // URLs do: what a policy hashes from the URL (consistent_hash's ring) then agrees
                // across replicas. Named per replica, each replica's ring differed and a session
                // was split over up to four engines that one ring keeps together. The name is
                // the one a single router always had, so one router's rings are unchanged.
                let workers: Vec<Arc<Worker>> = workers
                    .iter()
                    .enumerate()
                    .map(|(i, w)| Arc::new(Worker::new(format!("http://sim-0-{i}:1"), w.role)))
                    .collect();
                let policy = build(&replica_config(policy, r));
                let observer: Arc<dyn GuardObserver> = Arc::new(PolicyObserver(policy.clone()));
                Replica {
                    policy,
                    prefill: prefill.iter().map(|&i| workers[i].clone()).collect(),
                    decode: decode.iter().map(|&i| workers[i].clone()).collect(),
                    workers,
                    observer,
                    hold: Arc::new(HoldQueue::default()),
                }
            })
            .collect();
        Self {
            prefill,
            decode,
            transfers: HashMap::new(),
            kv_link_gbps: switchyard_sim::server::WorkerConfig::default().kv_link_gbps,
            engines: workers
                .iter()
                .enumerate()
                .map(|(i, w)| Engine::new(w.profile.clone(), w.speed, seed.wrapping_add(i as u64)))
                .collect(),
            busy: vec![false; workers.len()],
            pending: vec![Vec::new(); workers.len()],
            replicas,
            base: Instant::now(),
            heap: BinaryHeap::new(),
            seq: 0,
            specs: Vec::new(),
            results: Vec::new(),
            open: HashMap::new(),
            held: VecDeque::new(),
            report: DesReport::default(),
            record_itl: false,
            closed: None,
            next_closed: 0,
            cache_view: CacheView::Text,
            blocks: Vec::new(),
        }
    }

    /// Routes with `view` of the engines' caches.
    pub fn with_cache_view(mut self, view: CacheView) -> Self {
        self.cache_view = view;
        if view == CacheView::Events {
            let budget = Arc::new(BlockBudget::new(1 << 40));
            for (i, engine) in self.engines.iter_mut().enumerate() {
                engine.record_kv_events();
                let blocks = Arc::new(WorkerBlocks::new(budget.clone()));
                blocks.set_synced(true);
                for replica in &self.replicas {
                    replica.workers[i].attach_kv_blocks(blocks.clone());
                }
                self.blocks.push(blocks);
            }
        }
        self
    }

    /// Keeps every inter-token gap (memory grows with output tokens).
    pub fn record_itl(mut self, on: bool) -> Self {
        self.record_itl = on;
        self
    }

    /// Slows `fault.worker` between the arrivals at fractions `from` and `to` of the run.
    pub fn with_fault(mut self, fault: &Fault, specs: &[RequestSpec]) -> Self {
        if fault.worker < self.engines.len() && !specs.is_empty() {
            self.push(fault.at(specs, fault.from), Event::Slowdown(fault.worker, fault.slowdown.to_bits()));
            self.push(fault.at(specs, fault.to), Event::Slowdown(fault.worker, 1.0f64.to_bits()));
        }
        self
    }

    fn push(&mut self, t: f64, e: Event) {
        self.seq += 1;
        self.heap.push(Reverse((Time(t), self.seq, e)));
    }

    fn at(&self, t: f64) -> Instant {
        self.base + Duration::from_secs_f64(t.max(0.0))
    }

    /// Runs to completion.
    pub fn run(mut self, source: Source) -> DesReport {
        match source {
            Source::Open(specs) => {
                for (i, s) in specs.iter().enumerate() {
                    self.push(s.at, Event::Arrival(i));
                }
                self.specs = specs;
            }
            Source::Closed { shapes, concurrency } => {
                for i in 0..concurrency.min(shapes.len()) {
                    self.push(0.0, Event::Arrival(i));
                }
                self.next_closed = concurrency.min(shapes.len());
                self.closed = Some(concurrency);
                self.specs = shapes;
            }
        }
        self.results = vec![RequestResult::default(); self.specs.len()];
        self.push(0.0, Event::Poll);
        let mut now = 0.0;
        while let Some(Reverse((Time(t), _, event))) = self.heap.pop() {
            match event {
                Event::Arrival(i) => self.arrive(i, t),
                Event::StepDone(w) => self.step_done(w, t),
                Event::Transferred(key) => self.transferred(key, t),
                Event::Recheck => self.retry_held(t),
                Event::Slowdown(w, bits) => self.engines[w].set_slowdown(f64::from_bits(bits)),
                Event::Poll => {
                    self.poll(t);
                    if !self.heap.is_empty() {
                        self.push(t + POLL_INTERVAL, Event::Poll);
                    }
                    continue;
                }
            }
            now = t;
        }
        self.report.virtual_secs = now;
        self.replicas[0].policy.report(Report::Debug(&mut self.report.policy_state));
        self.report.results = std::mem::take(&mut self.results);
        self.report
    }

    /// Every replica's view of every worker's own report, as the load poller would set it.
    fn poll(&mut self, t: f64) {
        let at = self.at(t);
        for (w, engine) in self.engines.iter().enumerate() {
            let stats = engine.stats();
            let report = ReportedLoad {
                kv_usage: engine.token_usage(),
                queued: stats.waiting as u64,
                running: stats.running as u64,
                at,
            };
            for replica in &self.replicas {
                replica.workers[w].load().set_reported(report);
            }
        }
    }

    fn view(&self, i: usize) -> RequestView {
        let s = &self.specs[i];
        let text = s.prompt.text();
        RequestView {
            text: match self.cache_view {
                CacheView::Text => RoutingText::Text(text),
                CacheView::Tokens | CacheView::Events => RoutingText::Tokens(tokenize(&text)),
            },
            max_tokens: Some(s.output_tokens),
            stream: true,
            routing_key: s.session.map(|k| k.to_string()),
            ..RequestView::default()
        }
    }

    fn arrive(&mut self, i: usize, t: f64) {
        self.results[i].sent_at = t;
        self.results[i].prompt_tokens = self.specs[i].prompt.tokens();
        let view = self.view(i);
        let hold = self.replicas[i % self.replicas.len()].hold.hold(self.at(t));
        self.route(i, view, hold, t);
    }

    /// Asks the request's replica for a worker (the router's own holding protocol); returns
    /// false if it must keep waiting.
    fn route(&mut self, i: usize, mut view: RequestView, mut hold: Hold, t: f64) -> bool {
        let replica = i % self.replicas.len();
        let now = self.at(t);
        view.now = Some(now);
        let Replica { policy, workers, observer, prefill, decode, .. } = &self.replicas[replica];
        let started = std::time::Instant::now();
        let asked = if self.prefill.is_empty() {
            hold.ask(&mut view, now, &mut |v| policy.select_single(workers, v).map(|s| (s, None)))
        } else {
            hold.ask(&mut view, now, &mut |v| policy.select_pair(prefill, decode, v).map(|(p, d)| (p, Some(d))))
        };
        self.report.decision_ns.push(started.elapsed().as_nanos() as f64);
        let (selection, decode_leg) = match asked {
            Asked::Wait(recheck) => {
                self.held.push_back((i, view, hold));
                self.push(t + recheck.as_secs_f64(), Event::Recheck);
                return false;
            }
            Asked::Decided(Ok(selection)) => selection,
            Asked::Decided(Err(RoutingError::Shed { .. })) => {
                self.report.shed += 1;
                self.fail(i, t, "503 shed".into());
                return true;
            }
            Asked::Decided(Err(e)) => {
                self.fail(i, t, format!("503 {e}"));
                return true;
            }
        };
        // A selection indexes the list it was made from: the whole fleet, or one PD pool.
        let engine_of = |pool: &[usize], s: &Selection| if pool.is_empty() { s.index } else { pool[s.index] };
        let w = engine_of(&self.prefill, &selection);
        let claim = |w: usize, s: &Selection| {
            InFlightGuard::claim(workers[w].clone(), view.dispatch_info(s, "/v1/completions"), now, observer.clone())
        };
        let Some(guard) = claim(w, &selection) else {
            self.fail(i, t, "503 circuit open".into());
            return true;
        };
        let prompt = match &view.text {
            RoutingText::Text(s) => tokenize(s),
            RoutingText::Tokens(t) => t.clone(),
            RoutingText::None => Vec::new(),
        };
        let handoff = match decode_leg {
            None => None,
            Some(d) => {
                let engine = engine_of(&self.decode, &d);
                let Some(guard) = claim(engine, &d) else {
                    self.fail(i, t, "503 circuit open".into());
                    return true;
                };
                Some(Handoff { engine, guard, prompt: prompt.clone() })
            }
        };
        // A prefill leg computes the prompt and the first token only.
        let output_tokens = if handoff.is_some() { 1 } else { self.specs[i].output_tokens.max(1) };
        let req = SimRequest { prompt, output_tokens };
        self.results[i].worker = Some(w);
        self.results[i].decode_worker = handoff.as_ref().map(|h| h.engine);
        self.results[i].predicted_ttft_ms = selection.predicted_ttft_ms;
        self.results[i].reason = selection.reason;
        match self.engines[w].submit(req) {
            Ok(id) => {
                self.open.insert((w, id), (i, Open { guard: Some(guard), last_token: t, handoff }));
                self.kick(w, t);
            }
            Err(e) => {
                guard.finish_at(Ending::Failed, Usage::default(), now);
                self.fail(i, t, format!("400 {e}"));
            }
        }
        true
    }

    /// A prefill leg answered: its guard ends, and its KV starts across the link.
    fn prefill_done(&mut self, w: usize, id: RequestId, t: f64) {
        let Some((i, mut open)) = self.open.remove(&(w, id)) else { return };
        let now = self.at(t);
        let r = &self.results[i];
        let usage = Usage {
            prompt_tokens: Some(r.prompt_tokens),
            cached_tokens: Some(r.cached_tokens),
            completion_tokens: Some(1),
        };
        if let Some(mut g) = open.guard.take() {
            g.first_token_at(now);
            g.finish_at(Ending::Succeeded, usage, now);
        }
        if let Some(h) = open.handoff.take() {
            let arrives = t + transfer_seconds(h.prompt.len(), self.kv_link_gbps);
            self.seq += 1;
            let key = self.seq;
            self.transfers.insert(key, (i, h));
            self.push(arrives, Event::Transferred(key));
        }
    }

    /// A decode leg's KV arrived: its worker queues the request, with no prefill to compute.
    fn transferred(&mut self, key: u64, t: f64) {
        let Some((i, h)) = self.transfers.remove(&key) else { return };
        let req = SimRequest { prompt: h.prompt, output_tokens: self.specs[i].output_tokens.max(1) };
        match self.engines[h.engine].submit_transferred(req) {
            Ok(id) => {
                self.open.insert((h.engine, id), (i, Open { guard: Some(h.guard), last_token: t, handoff: None }));
                self.kick(h.engine, t);
            }
            Err(e) => {
                h.guard.finish_at(Ending::Failed, Usage::default(), self.at(t));
                self.fail(i, t, format!("400 {e}"));
            }
        }
    }

    fn fail(&mut self, i: usize, t: f64, error: String) {
        let r = &mut self.results[i];
        r.e2e = t - r.sent_at;
        r.error = Some(error);
        self.finished(t);
    }

    /// A request left the system: in closed loop, the next one arrives.
    fn finished(&mut self, t: f64) {
        if self.closed.is_some() && self.next_closed < self.specs.len() {
            let i = self.next_closed;
            self.next_closed += 1;
            self.push(t, Event::Arrival(i));
        }
    }

    fn retry_held(&mut self, t: f64) {
        let mut waiting = std::mem::take(&mut self.held);
        while let Some((i, view, hold)) = waiting.pop_front() {
            if !self.route(i, view, hold, t) {
                // Still saturated: the rest stay queued behind it, in order.
                let last = self.held.pop_back();
                self.held.extend(last);
                self.held.extend(waiting.drain(..));
                break;
            }
        }
    }

    fn kick(&mut self, w: usize, t: f64) {
        if self.busy[w] {
            return;
        }
        if let Some((duration, events)) = self.engines[w].step() {
            self.busy[w] = true;
            self.pending[w] = events;
            self.push(t + duration, Event::StepDone(w));
        }
    }

    fn step_done(&mut self, w: usize, t: f64) {
        self.busy[w] = false;
        // The step's cache changes are published as it completes.
        if let Some(blocks) = self.blocks.get(w) {
            blocks.apply(&self.engines[w].take_kv_events());
        }
        let events = std::mem::take(&mut self.pending[w]);
        let mut freed = false;
        for e in events {
            match e {
                EngineEvent::Admitted { id, cached_tokens } => {
                    // In a PD fleet the prompt's cache is the prefill worker's.
                    if let Some((i, open)) = self.open.get(&(w, id)) {
                        if self.prefill.is_empty() || open.handoff.is_some() {
                            self.results[*i].cached_tokens = cached_tokens;
                        }
                    }
                }
                EngineEvent::Token { id, index, last } => {
                    let Some((i, open)) = self.open.get_mut(&(w, id)) else { continue };
                    let i = *i;
                    if open.handoff.is_some() {
                        if last {
                            self.prefill_done(w, id, t);
                        }
                        continue;
                    }
                    if index == 0 {
                        let now = self.base + Duration::from_secs_f64(t);
                        if let Some(g) = open.guard.as_mut() {
                            g.first_token_at(now);
                        }
                        self.results[i].ttft = Some(t - self.results[i].sent_at);
                    } else if self.record_itl {
                        self.results[i].itl.push(t - open.last_token);
                    }
                    open.last_token = t;
                    self.results[i].output_tokens = index + 1;
                    if last {
                        if let Some((i, mut open)) = self.open.remove(&(w, id)) {
                            let r = &mut self.results[i];
                            r.e2e = t - r.sent_at;
                            let usage = Usage {
                                prompt_tokens: Some(r.prompt_tokens),
                                cached_tokens: Some(r.cached_tokens),
                                completion_tokens: Some(r.output_tokens),
                            };
                            if let Some(g) = open.guard.take() {
                                g.finish_at(Ending::Succeeded, usage, self.base + Duration::from_secs_f64(t));
                            }
                            freed = true;
                            self.finished(t);
                        }
                    }
                }
                EngineEvent::Preempted { .. } => {}
            }
        }
        self.kick(w, t);
        if freed && !self.held.is_empty() {
            self.retry_held(t);
        }
    }
}

/// `config` for router replica `r`. Live replicas seed their random choices from entropy, each
/// its own; given one seed, every simulated replica made the first one's random choices, decision
/// for decision, and with requests dealt to replicas in turn four consecutive requests went alike
/// (random behind four replicas sent them to one worker). Replica 0 keeps the seed, so one router
/// runs as before.
fn replica_config(config: &PolicyConfig, r: usize) -> PolicyConfig {
    if r == 0 {
        return config.clone();
    }
    config.with_seed(config.seed().map(|s| s ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// Runs an open-loop workload and returns the report.
pub fn run_open(
    workers: &[SimWorker],
    policy: &PolicyConfig,
    replicas: usize,
    seed: u64,
    specs: Vec<RequestSpec>,
    fault: Option<&Fault>,
) -> DesReport {
    run_open_with(workers, policy, replicas, seed, specs, fault, CacheView::Text)
}

/// [`run_open`] with routers that see the engines' caches through `view`.
pub fn run_open_with(
    workers: &[SimWorker],
    policy: &PolicyConfig,
    replicas: usize,
    seed: u64,
    specs: Vec<RequestSpec>,
    fault: Option<&Fault>,
    view: CacheView,
) -> DesReport {
    let mut sim = Simulation::new(workers, policy, replicas, seed).with_cache_view(view);
    if let Some(f) = fault {
        sim = sim.with_fault(f, &specs);
    }
    sim.run(Source::Open(specs))
}

/// Fleet capacity in requests/s: closed loop at `concurrency` outstanding under least
/// in-flight routing (`load_based`), over `shapes`.
pub fn capacity(workers: &[SimWorker], shapes: Vec<RequestSpec>, concurrency: usize, seed: u64) -> f64 {
    let policy = PolicyConfig::new(switchyard::policies::PolicyKind::LoadBased, Some(seed));
    let report = Simulation::new(workers, &policy, 1, seed).run(Source::Closed { shapes, concurrency });
    crate::metrics::steady_rate(&report.results).unwrap_or(0.0)
}

/// Where a fleet's load axis is anchored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knee {
    /// The knee (req/s): the highest Poisson rate at which least-in-flight routing keeps
    /// p99 TTFT within the SLO and ≥ 95 % of requests within both SLOs.
    pub rate: f64,
    /// The closed-loop throughput ceiling under least in-flight ([`best_capacity`]), req/s.
    pub ceiling: f64,
    /// DES runs the bisection took.
    pub evaluations: usize,
}

/// How the knee is found, as results say it.
pub const KNEE_METHOD: &str = "knee: the highest Poisson rate at which load_based (least in flight) keeps p99 TTFT within the SLO and ≥ 95 % of requests within both SLOs, found by bisection (to 1 %) in the discrete-event simulation, each step ≥ 120 s of arrivals";

/// Share of requests within both SLOs required at the knee.
pub const KNEE_ATTAINMENT: f64 = 0.95;

/// Arrivals each step of the knee search spans, seconds: many times a request's own latency.
pub const KNEE_WINDOW_SECS: f64 = 120.0;

/// Whether least-in-flight routing serves `workload` at `rate` (Poisson) within the knee's
/// criteria: one deterministic DES run of at least `min_requests`, and of arrivals over at
/// least `window_secs`.
#[allow(clippy::too_many_arguments)]
pub fn meets_knee(
    workers: &[SimWorker],
    workload: &crate::workload::Workload,
    slo: &crate::metrics::Slo,
    rate: f64,
    min_requests: usize,
    window_secs: f64,
    seed: u64,
    trace: Option<&[crate::workload::TraceRecord]>,
) -> bool {
    let n = min_requests.max((rate * window_secs) as usize).min(200_000);
    let specs = workload.requests(crate::workload::Arrival::Poisson, rate, n, seed, 0, trace);
    let policy = PolicyConfig::new(switchyard::policies::PolicyKind::LoadBased, Some(seed));
    let report = run_open(workers, &policy, 1, seed, specs, None);
    let summary = crate::metrics::Summary::of(&report.results, slo, workers.len());
    summary.errors == 0 && summary.ttft_p99_ms <= slo.ttft_ms && summary.slo_attainment >= KNEE_ATTAINMENT
}

/// Finds the highest rate for which `passes` holds, by bracketing around `guess` (×1.25 or
/// ×0.8 steps) and bisecting to 1 %. `passes` must be monotone (true below the knee).
pub fn bisect_knee(guess: f64, mut passes: impl FnMut(f64) -> bool) -> (f64, usize) {
    let mut evaluations = 0;
    let mut check = |r: f64| {
        evaluations += 1;
        passes(r)
    };
    let guess = guess.max(1e-6);
    let (mut lo, mut hi) = if check(guess) {
        let mut lo = guess;
        loop {
            let up = lo * 1.25;
            if !check(up) || up > guess * 1024.0 {
                break (lo, up);
            }
            lo = up;
        }
    } else {
        let mut hi = guess;
        loop {
            let down = hi * 0.8;
            if check(down) || down < guess / 1024.0 {
                break (down, hi);
            }
            hi = down;
        }
    };
    while hi / lo > 1.01 {
        let mid = (lo * hi).sqrt();
        if check(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo, evaluations)
}

/// The scenario fleet's knee (and its closed-loop ceiling, the bisection's first guess).
pub fn scenario_knee(s: &Scenario, trace: Option<&[crate::workload::TraceRecord]>) -> Knee {
    let (ceiling, _) = scenario_capacity(s, trace);
    knee_on_sample(s, trace, ceiling, knee_sample_seeds(s, 1)[0])
}

/// Seeds of `n` Poisson arrival samples for the knee: first the one load 1.0 is defined on,
/// then the levels' own (the scenario's seed), then others.
pub fn knee_sample_seeds(s: &Scenario, n: usize) -> Vec<u64> {
    let mut seeds = vec![s.seed ^ 0x6b6e, s.seed];
    seeds.extend((1..n.saturating_sub(1) as u64).map(|k| s.seed ^ 0x6b6e ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    seeds.truncate(n);
    seeds
}

/// The knee bisected on the arrival sample (and policy seed) `seed`, from `ceiling`.
///
/// One sample decides where load 1.0 is, so whether the baseline meets the knee's definition
/// on another sample at exactly 1.0 is close to a coin toss wherever it falls off a cliff
/// there; bisecting again over other samples shows how far the knee itself moves
/// (`des --knee-samples`).
pub fn knee_on_sample(s: &Scenario, trace: Option<&[crate::workload::TraceRecord]>, ceiling: f64, seed: u64) -> Knee {
    let workers = SimWorker::from_scenario(s, None);
    let (rate, evaluations) = bisect_knee(ceiling, |rate| {
        meets_knee(&workers, &s.workload, &s.slo, rate, s.capacity.requests, KNEE_WINDOW_SECS, seed, trace)
    });
    Knee { rate, ceiling, evaluations }
}

/// Requests for a steady-state level at `rate`: an arrival window of at least 4× the p99
/// end-to-end latency least in-flight routing shows there (DES) and at least the window the
/// knee was found on ([`KNEE_WINDOW_SECS`]), and no fewer than the scenario's `requests`; at
/// most 50,000.
///
/// The knee's window because load 1.0 means "least in-flight holds the SLOs over that long":
/// a shorter level past it ends before the queue it stands for has grown. With 4× the p99
/// alone (about 30 s of arrivals), least in-flight kept every request within the SLOs at
/// 1.1× the knee on homogeneous, bursty, shared-prefix, shared-prefix-large and pd-prefix;
/// over 120 s it is 29 % on homogeneous. The p99 comes from a short run, which past the
/// knee understates a queue that grows for as long as arrivals last.
pub fn steady_requests(s: &Scenario, rate: f64, trace: Option<&[crate::workload::TraceRecord]>) -> usize {
    let workers = SimWorker::from_scenario(s, None);
    let specs = s.workload.requests(s.arrival, rate, s.requests, s.seed, 0, trace);
    let policy = PolicyConfig::new(switchyard::policies::PolicyKind::LoadBased, Some(s.seed));
    let report = run_open(&workers, &policy, 1, s.seed, specs, s.fault.as_ref());
    let summary = crate::metrics::Summary::of(&report.results, &s.slo, workers.len());
    let window = (4.0 * summary.e2e_p99_ms / 1e3).max(KNEE_WINDOW_SECS);
    ((rate * window).ceil() as usize).clamp(s.requests, 50_000)
}

/// How many times faster than recorded a trace's arrivals play at `rate` (`None` without
/// trace timing).
pub fn trace_compression(s: &Scenario, rate: f64, trace: Option<&[crate::workload::TraceRecord]>) -> Option<f64> {
    let t = trace.filter(|t| t.len() >= 2 && matches!(s.arrival, crate::workload::Arrival::Trace))?;
    let span = t[t.len() - 1].at - t[0].at;
    (span > 0.0).then(|| rate / ((t.len() - 1) as f64 / span))
}

/// The scenario fleet's closed-loop ceiling ([`best_capacity`]) over its capacity shapes.
pub fn scenario_capacity(s: &Scenario, trace: Option<&[crate::workload::TraceRecord]>) -> (f64, usize) {
    let shapes = s.workload.shapes(s.capacity.requests, s.seed ^ 0xcafe, 0, trace);
    best_capacity(&SimWorker::from_scenario(s, None), &shapes, s.seed)
}

/// Outstanding requests per worker tried by [`best_capacity`].
pub const CAPACITY_LADDER: [usize; 5] = [16, 32, 64, 128, 256];

/// The fleet's capacity: the best closed-loop throughput under least in-flight routing over
/// [`CAPACITY_LADDER`] outstanding requests per worker (more is not always better: a slow,
/// small-KV worker given an equal share thrashes its cache). Returns (req/s, per-worker concurrency).
pub fn best_capacity(workers: &[SimWorker], shapes: &[RequestSpec], seed: u64) -> (f64, usize) {
    CAPACITY_LADDER
        .iter()
        .map(|&c| (capacity(workers, shapes.to_vec(), c * workers.len(), seed), c))
        .fold((0.0, 0), |best, x| if x.0 > best.0 { x } else { best })
}
