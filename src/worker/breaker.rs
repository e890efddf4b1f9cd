//! A circuit breaker in front of FusionAuth: after a run of "FusionAuth is unavailable"
//! failures, workers stop claiming for a cool-down, then let one probe through (half-open).
//! An outage therefore costs one probe per cool-down instead of every event's attempts.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
struct Inner {
    failures: u32,
    open_until: Option<Instant>,
    cooldown: Duration,
    probe_in_flight: bool,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    inner: Mutex<Inner>,
    threshold: u32,
    base_cooldown: Duration,
    max_cooldown: Duration,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner {
                failures: 0,
                open_until: None,
                cooldown,
                probe_in_flight: false,
            }),
            threshold,
            base_cooldown: cooldown,
            max_cooldown: cooldown.max(Duration::from_secs(60)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere; the counters are still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        let g = self.lock();
        match g.open_until {
            None => BreakerState::Closed,
            Some(t) if Instant::now() < t => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// How many entities may be claimed now: all of `wanted` when closed, none while open,
    /// one probe when half-open (and none while that probe is out).
    pub fn claim_limit(&self, wanted: usize) -> usize {
        let mut g = self.lock();
        match g.open_until {
            None => wanted,
            Some(t) if Instant::now() < t => 0,
            Some(_) if g.probe_in_flight => 0,
            Some(_) => {
                g.probe_in_flight = true;
                wanted.min(1)
            }
        }
    }

    /// When the breaker will next let a probe through (for sleeping until then).
    pub fn open_for(&self) -> Option<Duration> {
        let g = self.lock();
        g.open_until
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    pub fn on_success(&self) {
        let mut g = self.lock();
        g.failures = 0;
        g.open_until = None;
        g.cooldown = self.base_cooldown;
        g.probe_in_flight = false;
    }

    /// Records an "unavailable" failure; returns true if the breaker is (now) open.
    pub fn on_unavailable(&self) -> bool {
        let mut g = self.lock();
        g.failures = g.failures.saturating_add(1);
        let half_open = g.open_until.is_some_and(|t| Instant::now() >= t);
        if half_open || g.probe_in_flight {
            g.cooldown = (g.cooldown * 2).min(self.max_cooldown);
            g.open_until = Some(Instant::now() + g.cooldown);
            g.probe_in_flight = false;
            return true;
        }
        if g.open_until.is_some() {
            return true;
        }
        if g.failures >= self.threshold {
            g.open_until = Some(Instant::now() + g.cooldown);
            return true;
        }
        false
    }

    /// A failure that says nothing about availability (e.g. a 400) ends a probe too.
    pub fn on_other(&self) {
        let mut g = self.lock();
        if g.probe_in_flight {
            g.probe_in_flight = false;
            g.failures = 0;
            g.open_until = None;
            g.cooldown = self.base_cooldown;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_probes_after_the_cooldown() {
        let b = CircuitBreaker::new(3, Duration::from_millis(30));
        assert_eq!(b.claim_limit(10), 10);
        assert!(!b.on_unavailable());
        assert!(!b.on_unavailable());
        assert!(b.on_unavailable());
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.claim_limit(10), 0);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.claim_limit(10), 1);
        assert_eq!(b.claim_limit(10), 0, "only one probe at a time");
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.claim_limit(10), 10);
    }

    #[test]
    fn a_failed_probe_reopens_with_a_longer_cooldown() {
        let b = CircuitBreaker::new(1, Duration::from_millis(20));
        b.on_unavailable();
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(b.claim_limit(5), 1);
        assert!(b.on_unavailable());
        assert_eq!(b.state(), BreakerState::Open);
        let left = b.open_for().unwrap();
        assert!(left > Duration::from_millis(25), "{left:?}");
    }
}
