//! Whether a worker's wait is growing or standing.
//!
//! Past the knee marginal_utility lets one worker run late so the others stay in time. That is
//! right when the fleet as a whole is short: the late worker absorbs the overflow and its wait
//! grows for as long as the overload lasts. It is wrong when only the workers holding the hot
//! prefixes are short: then the late worker's wait stands (as many requests in as out), and
//! sending it more of the requests nobody can serve in time keeps it late for good, though the
//! fleet could drain it. The slope of its expected wait over a window tells the two apart
//! (DES, the worker furthest behind, mean TTFT per 20 s: zipf-prefix at 1.4x the knee 5, 18,
//! 31, 46, 59, 65 s — short as a whole; zipf-mixed at 1.4x 3, 8, 9, 9, 9, 9, 11, 8 s — only its
//! holders short).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// One worker's current window: where it started and the wait then, and the slope the last
/// full window measured (seconds of wait per second; `None` before one has closed).
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    wait_secs: f64,
    slope: Option<f64>,
}

/// Per worker, the slope of the expected wait over the last full window.
#[derive(Debug)]
pub struct WaitTrend {
    window: Duration,
    workers: Mutex<HashMap<u32, Window>>,
}

impl WaitTrend {
    /// A trend over windows of `window`.
    pub fn new(window: Duration) -> Self {
        Self { window, workers: Mutex::new(HashMap::new()) }
    }

    /// Records `worker`'s expected wait at `now` and returns the slope of its last full window
    /// (seconds of wait per second), `None` until one has closed. Sampled when the worker is
    /// looked at, not on a timer: a window closes at the first sample past its length.
    pub fn observe(&self, worker: u32, now: Instant, wait: Duration) -> Option<f64> {
        let wait_secs = wait.as_secs_f64();
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        let w = workers.entry(worker).or_insert(Window { start: now, wait_secs, slope: None });
        let elapsed = now.saturating_duration_since(w.start);
        if elapsed >= self.window {
            let slope = (wait_secs - w.wait_secs) / elapsed.as_secs_f64();
            *w = Window { start: now, wait_secs, slope: Some(slope) };
        }
        w.slope
    }

    /// Drops a worker that left the fleet.
    pub fn forget(&self, worker: u32) {
        self.workers.lock().unwrap_or_else(|p| p.into_inner()).remove(&worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_growing_wait_has_a_positive_slope_and_a_standing_one_a_slope_of_zero() {
        let trend = WaitTrend::new(secs(10.0));
        let t0 = Instant::now();
        // Worker 1's wait grows half a second a second; worker 2's stands at 9 s.
        for i in 0..=30 {
            let t = t0 + secs(f64::from(i));
            trend.observe(1, t, secs(5.0 + 0.5 * f64::from(i)));
            trend.observe(2, t, secs(9.0 + if i % 2 == 0 { 0.3 } else { -0.3 }));
        }
        let grow = trend.observe(1, t0 + secs(30.5), secs(20.0)).unwrap();
        let stand = trend.observe(2, t0 + secs(30.5), secs(9.0)).unwrap();
        assert!((grow - 0.5).abs() < 1e-9, "{grow}");
        assert!(stand.abs() < 1e-9, "{stand}");
    }

    #[test]
    fn no_slope_before_a_window_has_closed_and_none_after_forgetting() {
        let trend = WaitTrend::new(secs(10.0));
        let t0 = Instant::now();
        assert_eq!(trend.observe(7, t0, secs(1.0)), None);
        assert_eq!(trend.observe(7, t0 + secs(9.9), secs(50.0)), None);
        assert!(trend.observe(7, t0 + secs(10.0), secs(11.0)).is_some_and(|s| (s - 1.0).abs() < 1e-9));
        trend.forget(7);
        assert_eq!(trend.observe(7, t0 + secs(20.0), secs(11.0)), None);
    }
}
