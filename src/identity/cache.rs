//! A cache in front of any validator, keyed by SHA-256 of the token: positive results until the
//! token's `exp` or a TTL, whichever is first; refusals (the token's fault, never the backend's)
//! briefly, in a separate bounded map so a flood of bad tokens cannot evict good ones.
//! Concurrent validations of one token share a single call to the inner validator; the shared
//! call is forgotten as soon as its last waiter completes or goes away.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::{Identity, IdentityError, Peer, Token, TokenValidator, ValidateFuture};
use crate::clock::Clock;

/// Cache bounds.
#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    /// Longest time a result is reused.
    pub ttl: Duration,
    /// Most entries kept.
    pub max_entries: usize,
    /// How long a refusal is reused (zero: refusals are not cached).
    pub negative_ttl: Duration,
    /// Most refusals kept.
    pub negative_max_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            max_entries: 100_000,
            negative_ttl: Duration::from_secs(5),
            negative_max_entries: 10_000,
        }
    }
}

type Key = [u8; 32];
type Flight = Arc<OnceCell<Result<Identity, IdentityError>>>;
type FlightMap = Mutex<HashMap<Key, Flight>>;

struct Entry<T> {
    value: T,
    until: OffsetDateTime,
}

/// Caches results of `V` and collapses concurrent identical validations.
pub struct CachingValidator<V> {
    inner: V,
    cfg: CacheConfig,
    clock: Arc<dyn Clock>,
    entries: RwLock<HashMap<Key, Entry<Identity>>>,
    refusals: RwLock<HashMap<Key, Entry<IdentityError>>>,
    in_flight: FlightMap,
}

/// One waiter's share of a flight: when the last waiter leaves (done or dropped), the map
/// entry goes with it.
struct FlightGuard<'a> {
    map: &'a FlightMap,
    key: Key,
    flight: Flight,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        // Clones are taken under this lock, so the count cannot grow while we look at it.
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let ours = map
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight));
        // 2 = the map's reference and ours: nobody else is waiting.
        if ours && (self.flight.initialized() || Arc::strong_count(&self.flight) <= 2) {
            map.remove(&self.key);
        }
    }
}

// === impl CachingValidator ===

impl<V: TokenValidator> CachingValidator<V> {
    pub fn new(inner: V, cfg: CacheConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            inner,
            cfg,
            clock,
            entries: RwLock::default(),
            refusals: RwLock::default(),
            in_flight: Mutex::default(),
        }
    }

    /// The wrapped validator.
    pub fn inner(&self) -> &V {
        &self.inner
    }

    /// Entries currently cached (positive).
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refusals currently cached.
    pub fn refusals_len(&self) -> usize {
        self.refusals
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Validations in flight (tokens with at least one waiter).
    pub fn in_flight_len(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn hit(&self, key: &Key, now: OffsetDateTime) -> Option<Result<Identity, IdentityError>> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get(key).filter(|e| now < e.until) {
            return Some(Ok(e.value.clone()));
        }
        drop(entries);
        let refusals = self.refusals.read().unwrap_or_else(|e| e.into_inner());
        refusals
            .get(key)
            .filter(|e| now < e.until)
            .map(|e| Err(e.value.clone()))
    }

    /// A cached identity the inner validator now refuses (its pod deleted since) is dropped and
    /// the refusal returned.
    fn rechecked(
        &self,
        key: &Key,
        hit: Result<Identity, IdentityError>,
    ) -> Result<Identity, IdentityError> {
        let Ok(id) = hit else { return hit };
        match self.inner.recheck(&id) {
            Ok(()) => Ok(id),
            Err(e) => {
                let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
                entries.remove(key);
                Err(e)
            }
        }
    }

    fn store(&self, key: Key, result: &Result<Identity, IdentityError>, now: OffsetDateTime) {
        match result {
            Ok(identity) => {
                let mut until = now + self.cfg.ttl;
                if let Some(exp) = identity.expires_at {
                    until = until.min(exp);
                }
                insert_bounded(
                    &self.entries,
                    self.cfg.max_entries,
                    key,
                    identity,
                    until,
                    now,
                );
            }
            // The backend's failures are not the token's: never cached.
            Err(e) if !e.is_unavailable() => {
                let until = now + self.cfg.negative_ttl;
                let max = self.cfg.negative_max_entries;
                insert_bounded(&self.refusals, max, key, e, until, now);
            }
            Err(_) => {}
        }
    }

    async fn validate_cached(&self, token: &Token, peer: Peer) -> Result<Identity, IdentityError> {
        let key = token.sha256();
        if let Some(result) = self.hit(&key, self.clock.now()) {
            return self.rechecked(&key, result);
        }
        let guard = {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            FlightGuard {
                map: &self.in_flight,
                key,
                flight: map.entry(key).or_default().clone(),
            }
        };
        let result = guard
            .flight
            .get_or_init(|| self.inner.validate_from(token, peer))
            .await
            .clone();
        drop(guard);
        self.store(key, &result, self.clock.now());
        result
    }
}

fn insert_bounded<T: Clone>(
    map: &RwLock<HashMap<Key, Entry<T>>>,
    max: usize,
    key: Key,
    value: &T,
    until: OffsetDateTime,
    now: OffsetDateTime,
) {
    if until <= now || max == 0 {
        return;
    }
    let mut entries = map.write().unwrap_or_else(|e| e.into_inner());
    if entries.len() >= max {
        entries.retain(|_, e| now < e.until);
    }
    if entries.len() >= max {
        // Still full of live entries: drop an arbitrary one rather than grow.
        if let Some(k) = entries.keys().next().copied() {
            entries.remove(&k);
        }
    }
    entries.insert(
        key,
        Entry {
            value: value.clone(),
            until,
        },
    );
}

impl<V: TokenValidator> TokenValidator for CachingValidator<V> {
    fn validate<'a>(&'a self, token: &'a Token) -> ValidateFuture<'a> {
        Box::pin(self.validate_cached(token, Peer::LOCAL))
    }

    fn validate_from<'a>(&'a self, token: &'a Token, peer: Peer) -> ValidateFuture<'a> {
        Box::pin(self.validate_cached(token, peer))
    }

    fn recheck(&self, id: &Identity) -> Result<(), IdentityError> {
        self.inner.recheck(id)
    }

    fn probe(&self) -> super::ProbeFuture<'_> {
        self.inner.probe()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::clock::ManualClock;

    /// Never answers; counts calls.
    struct Hang(AtomicUsize);

    impl TokenValidator for Hang {
        fn validate<'a>(&'a self, _: &'a Token) -> ValidateFuture<'a> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(futures::future::pending())
        }
    }

    /// Always refuses as malformed; counts calls.
    struct Refuse(AtomicUsize);

    impl TokenValidator for Refuse {
        fn validate<'a>(&'a self, _: &'a Token) -> ValidateFuture<'a> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Err(IdentityError::Malformed("not a JWT".into())) })
        }
    }

    fn clock() -> ManualClock {
        ManualClock::new(OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
    }

    /// Issue 8 item 6: on the old code the map kept the entry after every waiter was dropped.
    #[tokio::test]
    async fn cancelled_waiters_leave_no_flight_behind() {
        let c = CachingValidator::new(
            Hang(AtomicUsize::new(0)),
            CacheConfig::default(),
            Arc::new(clock()),
        );
        let token = Token::new("a.b.c");
        {
            let mut a = c.validate(&token);
            let mut b = c.validate(&token);
            for f in [&mut a, &mut b] {
                assert!(futures::poll!(f.as_mut()).is_pending());
            }
            assert_eq!(c.in_flight_len(), 1, "both waiters share one flight");
            drop(a);
            assert_eq!(c.in_flight_len(), 1, "one waiter is still there");
        }
        assert_eq!(
            c.in_flight_len(),
            0,
            "the last waiter took the flight with it"
        );
        assert_eq!(c.inner().0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn refusals_are_cached_briefly_and_bounded() {
        let clock = clock();
        let cfg = CacheConfig {
            negative_ttl: Duration::from_secs(5),
            negative_max_entries: 3,
            ..CacheConfig::default()
        };
        let c = CachingValidator::new(Refuse(AtomicUsize::new(0)), cfg, Arc::new(clock.clone()));
        let calls = || c.inner().0.load(Ordering::SeqCst);
        let t = Token::new("x.y.z");
        for _ in 0..3 {
            assert!(matches!(
                c.validate(&t).await,
                Err(IdentityError::Malformed(_))
            ));
        }
        assert_eq!(calls(), 1, "the refusal is reused");
        clock.advance(Duration::from_secs(6));
        c.validate(&t).await.unwrap_err();
        assert_eq!(calls(), 2, "and forgotten after negative_ttl");
        for i in 0..10 {
            c.validate(&Token::new(format!("t{i}"))).await.unwrap_err();
        }
        assert!(c.refusals_len() <= 3, "bounded: {}", c.refusals_len());
        assert!(c.is_empty(), "refusals never land in the positive cache");
    }
}
