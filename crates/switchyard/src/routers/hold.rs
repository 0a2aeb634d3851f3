//! Holding requests in the router while a policy says every worker is saturated
//! (`--mu-overload queue|shed`), instead of piling them into the engines' queues.
//!
//! The protocol is one piece of code shared by the live router and the discrete-event
//! simulation: a [`Hold`] asks the policy (through the caller's `select`) with the time the
//! request has waited so far, and either gets a decision or is told how long it may wait
//! before asking again. How the wait happens is the caller's: the router awaits the queue's
//! wake-up (any in-flight request of this router ending) or the recheck time; the simulation
//! schedules a recheck event and retries held requests when one of its requests finishes.
//!
//! Everything belongs to one [`HoldQueue`] per router instance: two routers in one process
//! never share held counts or wake-ups.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::policies::RoutingError;
use crate::request::RequestView;

/// Requests held at once by default; past this, a request gets the policy's final answer
/// (best effort or shed) at once instead of waiting.
pub const DEFAULT_MAX_HELD: usize = 4096;

/// The wait a policy's recheck hint is clamped to: at least a millisecond (no busy loop), at
/// most a second (a missed wake-up costs little).
const RECHECK: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(1));

/// One router's held requests: their count (bounded) and the wake-up when capacity frees.
#[derive(Debug)]
pub struct HoldQueue {
    held: AtomicUsize,
    max_held: usize,
    freed: Notify,
}

impl Default for HoldQueue {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_HELD)
    }
}

impl HoldQueue {
    /// A queue holding at most `max_held` requests at once.
    pub fn new(max_held: usize) -> Self {
        Self { held: AtomicUsize::new(0), max_held, freed: Notify::new() }
    }

    /// Requests held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Wakes the held requests: an in-flight request of this router ended.
    pub fn capacity_freed(&self) {
        if self.held() > 0 {
            self.freed.notify_waiters();
        }
    }

    /// A new request's ticket, arriving at `since`.
    pub fn hold(self: &Arc<Self>, since: Instant) -> Hold {
        Hold { queue: self.clone(), since, holding: false }
    }

    /// Asks `select` until it decides, waiting for capacity in between (the live router).
    /// The wake-up is armed before each ask, so a release between the ask and the wait is
    /// never missed.
    pub async fn select<T>(
        self: &Arc<Self>,
        view: &mut RequestView,
        mut select: impl FnMut(&RequestView) -> Result<T, RoutingError>,
    ) -> Result<T, RoutingError> {
        let mut hold = self.hold(Instant::now());
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match hold.ask(view, Instant::now(), &mut select) {
                Asked::Decided(result) => return result,
                Asked::Wait(recheck) => {
                    let _ = tokio::time::timeout(recheck, notified).await;
                }
            }
        }
    }
}

/// What one ask gave.
#[derive(Debug)]
pub enum Asked<T> {
    /// The policy decided (a choice, a shed, or no worker at all).
    Decided(Result<T, RoutingError>),
    /// Saturated: ask again after this long, or sooner when capacity frees.
    Wait(Duration),
}

/// One request's place in the hold: counted while it waits, uncounted when dropped.
#[derive(Debug)]
pub struct Hold {
    queue: Arc<HoldQueue>,
    since: Instant,
    holding: bool,
}

impl Hold {
    /// Asks the policy once at `now`, with `view.waited` set to the time held so far: zero
    /// until the policy has once answered "saturated" (the microseconds between the ticket and
    /// the first ask on a live clock are not a wait). Every ask, held or not, counts in
    /// `view.asks`, so a policy tells a request's first ask from a recheck, a retry or a
    /// re-choice after a breaker's refusal, all of which come through here.
    pub fn ask<T>(
        &mut self,
        view: &mut RequestView,
        now: Instant,
        select: &mut impl FnMut(&RequestView) -> Result<T, RoutingError>,
    ) -> Asked<T> {
        view.waited = if self.holding { now.saturating_duration_since(self.since) } else { Duration::ZERO };
        let mut select = |view: &mut RequestView| {
            let answer = select(view);
            view.asks = view.asks.saturating_add(1);
            answer
        };
        let answer = match select(view) {
            Err(RoutingError::Saturated { recheck }) => {
                if !self.holding {
                    self.holding = true;
                    if self.queue.held.fetch_add(1, Ordering::Relaxed) >= self.queue.max_held {
                        // Full: make the policy decide now, as if the budget were spent.
                        view.waited = Duration::from_secs(3600);
                        match select(view) {
                            Err(RoutingError::Saturated { .. }) => {}
                            decided => return self.done(view, decided),
                        }
                    }
                }
                return Asked::Wait(recheck.clamp(RECHECK.0, RECHECK.1));
            }
            decided => decided,
        };
        self.done(view, answer)
    }

    fn done<T>(&mut self, view: &mut RequestView, answer: Result<T, RoutingError>) -> Asked<T> {
        self.release();
        view.waited = Duration::ZERO;
        Asked::Decided(answer)
    }

    fn release(&mut self) {
        if std::mem::replace(&mut self.holding, false) {
            self.queue.held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn held_until_capacity_frees_then_decided_and_uncounted() {
        let queue = Arc::new(HoldQueue::new(8));
        let free = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = {
            let (queue, free) = (queue.clone(), free.clone());
            tokio::spawn(async move {
                let mut view = RequestView::default();
                queue
                    .select(&mut view, |v| {
                        if free.load(Ordering::SeqCst) {
                            Ok(v.waited)
                        } else {
                            Err(RoutingError::Saturated { recheck: Duration::from_secs(30) })
                        }
                    })
                    .await
            })
        };
        while queue.held() == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::advance(Duration::from_millis(300)).await;
        free.store(true, Ordering::SeqCst);
        queue.capacity_freed();
        let waited = task.await.unwrap().unwrap();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(1),
            "woken, not rechecked: {waited:?}"
        );
        assert_eq!(queue.held(), 0);
    }

    #[test]
    fn a_full_queue_asks_for_the_final_answer_at_once() {
        let queue = Arc::new(HoldQueue::new(1));
        let now = Instant::now();
        let saturated_until_desperate = |v: &RequestView| {
            if v.waited >= Duration::from_secs(3600) {
                Err(RoutingError::Shed { retry_after: Duration::from_secs(1) })
            } else {
                Err::<(), _>(RoutingError::Saturated { recheck: Duration::from_millis(5) })
            }
        };
        let mut first = queue.hold(now);
        let mut view = RequestView::default();
        assert!(matches!(first.ask(&mut view, now, &mut { saturated_until_desperate }), Asked::Wait(_)));
        let mut second = queue.hold(now);
        assert!(matches!(
            second.ask(&mut view, now, &mut { saturated_until_desperate }),
            Asked::Decided(Err(RoutingError::Shed { .. }))
        ));
        assert_eq!(queue.held(), 1, "the second was never held");
        drop(first);
        assert_eq!(queue.held(), 0);
    }

    #[test]
    fn a_first_ask_has_waited_nothing_however_late_it_comes_and_a_recheck_counts_from_the_ticket() {
        let queue = Arc::new(HoldQueue::new(4));
        let since = Instant::now();
        let mut hold = queue.hold(since);
        let mut view = RequestView::default();
        let mut seen = Vec::new();
        let mut select = |v: &RequestView| {
            seen.push(v.waited);
            Err::<(), _>(RoutingError::Saturated { recheck: Duration::from_millis(5) })
        };
        assert!(matches!(hold.ask(&mut view, since + Duration::from_millis(3), &mut select), Asked::Wait(_)));
        assert!(matches!(hold.ask(&mut view, since + Duration::from_millis(10), &mut select), Asked::Wait(_)));
        assert_eq!(seen, [Duration::ZERO, Duration::from_millis(10)]);
    }

    #[test]
    fn every_ask_counts_the_full_queues_second_and_a_later_tickets_too() {
        let queue = Arc::new(HoldQueue::new(1));
        let now = Instant::now();
        let seen = std::cell::RefCell::new(Vec::new());
        let saturated = |v: &RequestView| {
            seen.borrow_mut().push(v.asks);
            Err::<(), _>(RoutingError::Saturated { recheck: Duration::from_millis(5) })
        };
        let mut first = queue.hold(now);
        let _ = first.ask(&mut RequestView::default(), now, &mut { saturated });
        seen.borrow_mut().clear();
        // The queue is full: one ask, then the final-answer ask within it.
        let mut view = RequestView::default();
        let mut hold = queue.hold(now);
        assert!(matches!(hold.ask(&mut view, now, &mut { saturated }), Asked::Wait(_)));
        // A retry takes a new ticket but is the same request: it goes on counting.
        let mut retry = queue.hold(now);
        let asked = retry.ask(&mut view, now, &mut |v: &RequestView| Ok::<u32, RoutingError>(v.asks));
        assert!(matches!(asked, Asked::Decided(Ok(2))));
        assert_eq!(*seen.borrow(), [0, 1]);
        assert_eq!(view.asks, 3);
    }

    #[test]
    fn two_queues_share_nothing() {
        let (a, b) = (Arc::new(HoldQueue::new(4)), Arc::new(HoldQueue::new(4)));
        let mut view = RequestView::default();
        let mut h = a.hold(Instant::now());
        let _ = h.ask(&mut view, Instant::now(), &mut |_| {
            Err::<(), _>(RoutingError::Saturated { recheck: Duration::from_millis(1) })
        });
        assert_eq!((a.held(), b.held()), (1, 0));
    }
}
