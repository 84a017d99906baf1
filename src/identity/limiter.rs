//! A client-side rate limit with a bounded queue (GCRA): calls beyond the rate wait their
//! turn; when the wait would exceed the queue, the call is refused at once as `Overloaded`.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::IdentityError;

/// Rate, burst and queue bound.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimit {
    /// Sustained calls per second.
    pub qps: f64,
    /// Calls allowed at once above the rate.
    pub burst: u32,
    /// Calls that may wait for a slot; one more is refused.
    pub max_queue: u32,
}

impl Default for RateLimit {
    /// 50 qps, burst 100, 1,000 queued: the API server's default client QPS class, with room for
    /// a node's worth of pods starting at once.
    fn default() -> Self {
        Self {
            qps: 50.0,
            burst: 100,
            max_queue: 1000,
        }
    }
}

/// The limiter. Cheap to share; `acquire` is the only call.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    interval: Duration,
    /// Theoretical arrival time of the next call.
    tat: Mutex<Instant>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        let interval = Duration::from_secs_f64(1.0 / limit.qps.max(0.001));
        Self {
            limit,
            interval,
            tat: Mutex::new(Instant::now()),
        }
    }

    /// Waits for a slot, or refuses when the queue is full.
    pub async fn acquire(&self) -> Result<(), IdentityError> {
        let wait = self.reserve(Instant::now())?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    /// Reserves the next slot at `now`, returning how long to wait for it.
    fn reserve(&self, now: Instant) -> Result<Duration, IdentityError> {
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let start = (*tat).max(now);
        let tolerance = self.interval * self.limit.burst.saturating_sub(1);
        let wait = (start - now).saturating_sub(tolerance);
        if wait > self.interval * self.limit.max_queue {
            return Err(IdentityError::Overloaded(format!(
                "more than {} TokenReview calls queued at {} qps",
                self.limit.max_queue, self.limit.qps
            )));
        }
        *tat = start + self.interval;
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_queue_then_refuse() {
        let l = RateLimiter::new(RateLimit {
            qps: 10.0,
            burst: 3,
            max_queue: 2,
        });
        let now = Instant::now();
        let waits: Vec<_> = (0..5).map(|_| l.reserve(now).unwrap()).collect();
        assert_eq!(&waits[..3], &[Duration::ZERO; 3], "burst of 3 goes at once");
        assert_eq!(waits[3], Duration::from_millis(100));
        assert_eq!(waits[4], Duration::from_millis(200));
        assert!(
            matches!(l.reserve(now), Err(IdentityError::Overloaded(_))),
            "queue of 2 is full"
        );
        // Time passing frees slots again.
        assert!(l.reserve(now + Duration::from_secs(1)).unwrap().is_zero());
    }
}
