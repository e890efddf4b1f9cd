//! The durable retry schedule: exponential with jitter, capped.

use std::time::Duration;

use rand::Rng;

use crate::config::RetrySettings;

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    pub max_attempts: i32,
}

impl RetryPolicy {
    pub fn new(settings: &RetrySettings, max_attempts: i32) -> Self {
        Self {
            initial: settings.initial,
            max: settings.max,
            multiplier: settings.multiplier,
            max_attempts,
        }
    }

    /// The delay before attempt `attempts + 1`, without jitter.
    pub fn base_delay(&self, attempts: i32) -> Duration {
        let exp = (attempts.max(1) - 1).min(60);
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        Duration::from_secs_f64(secs.min(self.max.as_secs_f64()))
    }

    /// The delay with "equal jitter": between half and all of the base delay, so many
    /// events failing together do not come back together. Never less than `at_least`
    /// (a `Retry-After` the server asked for), never more than the cap.
    pub fn delay(&self, attempts: i32, at_least: Option<Duration>) -> Duration {
        let base = self.base_delay(attempts);
        let jitter = rand::thread_rng().gen_range(0.5..=1.0);
        let d = base.mul_f64(jitter);
        match at_least {
            Some(min) => d.max(min.min(self.max)),
            None => d,
        }
    }

    /// Whether an entity that has had `attempts` attempts may have another.
    pub fn exhausted(&self, attempts: i32) -> bool {
        attempts >= self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            max_attempts: 5,
        }
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let p = policy();
        assert_eq!(p.base_delay(1), Duration::from_secs(1));
        assert_eq!(p.base_delay(2), Duration::from_secs(2));
        assert_eq!(p.base_delay(4), Duration::from_secs(8));
        assert_eq!(p.base_delay(30), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_between_half_and_the_whole_delay() {
        let p = policy();
        for _ in 0..200 {
            let d = p.delay(3, None);
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(4),
                "{d:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_honoured_but_clamped() {
        let p = policy();
        assert!(p.delay(1, Some(Duration::from_secs(30))) >= Duration::from_secs(30));
        assert!(p.delay(1, Some(Duration::from_secs(3600))) <= Duration::from_secs(60));
    }

    #[test]
    fn attempts_run_out() {
        let p = policy();
        assert!(!p.exhausted(4));
        assert!(p.exhausted(5));
    }
}
