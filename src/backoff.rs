//! One retry schedule for every loop that retries: exponential from `min`, doubling to `max`,
//! with jitter, on the injected clock. The renewal of every credential, the federation and JWKS
//! fetches, the ConfigMap publisher and the readiness probe all wait through it, so none spins
//! and none has timing of its own.

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

use crate::clock::Clock;

/// Consecutive failures and the delay before the next try.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A schedule from `min` doubling to `max` (`min` is raised to 1 ms, `max` to `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// Notes a failure; the delay before the next try: `min · 2^(n-1)` capped at `max`, jittered
    /// into [½, 1] of that (never below `min`), so many loops failing at once spread out.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.delay(self.failures, unit_random())
    }

    /// Notes a success: the next failure starts from `min` again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The delay after the `n`-th consecutive failure for a random draw `r` in [0, 1].
    pub fn delay(&self, n: u32, r: f64) -> Duration {
        let exp = n.saturating_sub(1).min(30);
        let base = self.min.saturating_mul(1u32 << exp).min(self.max);
        base.mul_f64(0.5 + 0.5 * r.clamp(0.0, 1.0)).max(self.min)
    }
}

/// A draw in [0, 1] from the system's CSPRNG (0.5 if it fails).
pub fn unit_random() -> f64 {
    let mut b = [0u8; 4];
    match SystemRandom::new().fill(&mut b) {
        Ok(()) => u32::from_le_bytes(b) as f64 / u32::MAX as f64,
        Err(_) => 0.5,
    }
}

/// Sleeps `d` on `clock` (a manual clock in tests moves it).
pub async fn sleep(clock: &dyn Clock, d: Duration) {
    clock.sleep_until(clock.now() + d).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row per rule: doubling from min, capped at max, jitter within [½, 1] but never
    /// below min, and a success starting over.
    #[test]
    fn delays_double_to_the_cap_with_jitter() {
        let s = Duration::from_secs;
        let b = Backoff::new(s(1), s(60));
        let rows = [
            ("first failure, top of the jitter", 1, 1.0, s(1)),
            ("first failure, bottom: never below min", 1, 0.0, s(1)),
            ("third failure doubles twice", 3, 1.0, s(4)),
            ("third failure, bottom of the jitter", 3, 0.0, s(2)),
            ("capped at max", 20, 1.0, s(60)),
            ("capped at max, jittered", 20, 0.0, s(30)),
            ("a huge count does not overflow", u32::MAX, 1.0, s(60)),
        ];
        for (name, n, r, want) in rows {
            assert_eq!(b.delay(n, r), want, "{name}");
        }
        let mut b = Backoff::new(s(1), s(60));
        for _ in 0..5 {
            b.failed();
        }
        assert_eq!(b.failures(), 5);
        b.succeeded();
        assert_eq!(b.failures(), 0);
        assert!(b.failed() <= s(1));
    }
}
