//! A client-side rate limit with a bounded queue (GCRA): calls beyond the rate wait their
//! turn; when the wait would exceed the queue, the call is refused at once as `Overloaded`.
//! Each peer may hold only `max_queue_per_peer` calls (queued or running), so one caller cannot
//! fill the queue for everyone; a caller that goes away gives its place back. A call is never
//! queued past its own deadline (`crate::deadline`): one that could only get its slot after the
//! caller stopped waiting is refused at once, so the caller backs off and retries instead of
//! timing out (istio-agent retries UNAVAILABLE: `CARetryOptions`, istio `pkg/security/retry.go`).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{IdentityError, Peer};

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
    /// Calls one peer (remote IP; all local callers are one peer) may have queued or running.
    pub max_queue_per_peer: u32,
}

impl Default for RateLimit {
    /// 50 qps, burst 100, 400 queued: the API server's default client QPS class, with room for
    /// a node's worth of pods starting at once; the queue drains in 8 s, inside the default
    /// 10 s `limits.unary_timeout` with 2 s left for the review itself; 50 per peer, so one
    /// caller delays others by at most about a second.
    fn default() -> Self {
        Self {
            qps: 50.0,
            burst: 100,
            max_queue: 400,
            max_queue_per_peer: 50,
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
    /// Calls queued or running, per peer (peers with none are removed).
    peers: Mutex<HashMap<Peer, u32>>,
}

/// A peer's place: held while its call waits and runs; dropping it frees the place.
#[must_use]
pub struct Permit<'a> {
    limiter: &'a RateLimiter,
    peer: Peer,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut peers = self.limiter.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = peers.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

/// A reserved slot not yet reached: dropped early (the caller went away), it is given back.
struct Reservation<'a> {
    limiter: &'a RateLimiter,
    reached: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.reached {
            let mut tat = self.limiter.tat.lock().unwrap_or_else(|e| e.into_inner());
            *tat = tat.checked_sub(self.limiter.interval).unwrap_or(*tat);
        }
    }
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        let interval = Duration::from_secs_f64(1.0 / limit.qps.max(0.001));
        Self {
            limit,
            interval,
            tat: Mutex::new(Instant::now()),
            peers: Mutex::default(),
        }
    }

    /// Waits for a slot for `peer`, or refuses when the queue or the peer's share is full, or
    /// when the slot would come after the current call's deadline. Hold the permit until the
    /// call it guards is done.
    pub async fn acquire(&self, peer: Peer) -> Result<Permit<'_>, IdentityError> {
        let permit = self.admit(peer)?;
        let wait = self.reserve(Instant::now(), crate::deadline::remaining())?;
        if !wait.is_zero() {
            let mut r = Reservation {
                limiter: self,
                reached: false,
            };
            tokio::time::sleep(wait).await;
            r.reached = true;
        }
        Ok(permit)
    }

    /// Calls currently queued or running for `peer`.
    pub fn outstanding(&self, peer: Peer) -> u32 {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.get(&peer).copied().unwrap_or(0)
    }

    fn admit(&self, peer: Peer) -> Result<Permit<'_>, IdentityError> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let n = peers.entry(peer).or_insert(0);
        if *n >= self.limit.max_queue_per_peer {
            return Err(IdentityError::Overloaded(format!(
                "caller {peer} already has {n} TokenReview calls queued or running (max_queue_per_peer)"
            )));
        }
        *n += 1;
        Ok(Permit {
            limiter: self,
            peer,
        })
    }

    /// Reserves the next slot at `now`, returning how long to wait for it; refuses (reserving
    /// nothing) when the queue is full or the wait would use up the caller's `time_left`.
    fn reserve(
        &self,
        now: Instant,
        time_left: Option<Duration>,
    ) -> Result<Duration, IdentityError> {
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
        if let Some(left) = time_left.filter(|left| !wait.is_zero() && wait >= *left) {
            return Err(IdentityError::Overloaded(format!(
                "the next TokenReview slot at {} qps is {} ms away, past the call's deadline ({} ms left)",
                self.limit.qps,
                wait.as_millis(),
                left.as_millis()
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
            max_queue_per_peer: 10,
        });
        let now = Instant::now();
        let waits: Vec<_> = (0..5).map(|_| l.reserve(now, None).unwrap()).collect();
        assert_eq!(&waits[..3], &[Duration::ZERO; 3], "burst of 3 goes at once");
        assert_eq!(waits[3], Duration::from_millis(100));
        assert_eq!(waits[4], Duration::from_millis(200));
        assert!(
            matches!(l.reserve(now, None), Err(IdentityError::Overloaded(_))),
            "queue of 2 is full"
        );
        // Time passing frees slots again.
        assert!(l
            .reserve(now + Duration::from_secs(1), None)
            .unwrap()
            .is_zero());
    }

    #[tokio::test]
    async fn one_peer_cannot_take_the_whole_queue() {
        let l = RateLimiter::new(RateLimit {
            qps: 1.0,
            burst: 1,
            max_queue: 100,
            max_queue_per_peer: 2,
        });
        let greedy = Peer(Some([10, 0, 0, 1].into()));
        let other = Peer(Some([10, 0, 0, 2].into()));
        let a = l.acquire(greedy).await.unwrap();
        let mut b = Box::pin(l.acquire(greedy));
        assert!(
            futures::poll!(b.as_mut()).is_pending(),
            "second call queues"
        );
        let refused = l
            .acquire(greedy)
            .await
            .err()
            .expect("third is over the share");
        assert!(
            matches!(refused, IdentityError::Overloaded(m) if m.contains("max_queue_per_peer"))
        );
        assert_eq!(l.outstanding(greedy), 2);
        // Another peer still gets in line.
        let mut c = Box::pin(l.acquire(other));
        assert!(futures::poll!(c.as_mut()).is_pending());
        assert_eq!(l.outstanding(other), 1);
        drop((a, b, c));
        assert_eq!((l.outstanding(greedy), l.outstanding(other)), (0, 0));
    }

    /// A caller that goes away while queued gives its slot back (issue 8 item 2).
    #[tokio::test]
    async fn a_dropped_waiter_gives_its_slot_back() {
        let l = RateLimiter::new(RateLimit {
            qps: 1.0,
            burst: 1,
            max_queue: 100,
            max_queue_per_peer: 100,
        });
        let _first = l.acquire(Peer::LOCAL).await.unwrap();
        for _ in 0..10 {
            let mut waiting = Box::pin(l.acquire(Peer::LOCAL));
            assert!(futures::poll!(waiting.as_mut()).is_pending());
        }
        // Ten cancelled waiters left nothing behind: the next call waits one interval, not 11.
        let wait = l.reserve(Instant::now(), None).unwrap();
        assert!(wait <= Duration::from_secs(1), "waits {wait:?}");
        assert_eq!(l.outstanding(Peer::LOCAL), 1);
    }

    /// A call is queued only if its slot comes before its deadline; one refused for its
    /// deadline takes no slot, so the calls behind it are not pushed back (issue 13).
    #[test]
    fn a_call_is_not_queued_past_its_deadline() {
        let l = RateLimiter::new(RateLimit {
            qps: 10.0,
            burst: 1,
            max_queue: 100,
            max_queue_per_peer: 100,
        });
        let now = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(l.reserve(now, Some(ms(50))).unwrap(), Duration::ZERO);
        assert_eq!(l.reserve(now, Some(ms(250))).unwrap(), ms(100));
        assert_eq!(l.reserve(now, Some(ms(250))).unwrap(), ms(200));
        let refused = l.reserve(now, Some(ms(250))).unwrap_err();
        assert!(
            matches!(&refused, IdentityError::Overloaded(m) if m.contains("300 ms away") && m.contains("250 ms left")),
            "{refused}"
        );
        assert!(refused.is_unavailable());
        // The refused call took no slot: a caller with more time gets the 300 ms slot.
        assert_eq!(l.reserve(now, Some(ms(1000))).unwrap(), ms(300));
        // A slot due exactly at the deadline is refused too; no deadline queues as before.
        assert!(l.reserve(now, Some(ms(400))).is_err());
        assert_eq!(l.reserve(now, None).unwrap(), ms(400));
    }

    /// `acquire` reads the deadline of the call it serves (`crate::deadline`), so a queued call
    /// is refused at once instead of sleeping into its timeout.
    #[tokio::test(start_paused = true)]
    async fn acquire_refuses_at_once_past_the_calls_deadline() {
        let l = RateLimiter::new(RateLimit {
            qps: 1.0,
            burst: 1,
            max_queue: 100,
            max_queue_per_peer: 100,
        });
        let _first = l.acquire(Peer::LOCAL).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        let second = crate::deadline::scope(deadline, l.acquire(Peer::LOCAL));
        let refused = futures::poll!(Box::pin(second));
        assert!(
            matches!(
                refused,
                std::task::Poll::Ready(Err(IdentityError::Overloaded(_)))
            ),
            "answered at once, not after a wait"
        );
        assert_eq!(
            l.outstanding(Peer::LOCAL),
            1,
            "the refused call left its place"
        );
    }
}
