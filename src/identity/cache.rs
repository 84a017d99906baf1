//! A cache of positive results in front of any validator, keyed by SHA-256 of the token and
//! valid until the token's `exp` or a TTL, whichever is first; bounded in size. Concurrent
//! validations of one token share a single call to the inner validator.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::{Identity, IdentityError, Token, TokenValidator, ValidateFuture};
use crate::clock::Clock;

/// Cache bounds.
#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    /// Longest time a result is reused.
    pub ttl: Duration,
    /// Most entries kept.
    pub max_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            max_entries: 100_000,
        }
    }
}

type Key = [u8; 32];
type Flight = Arc<OnceCell<Result<Identity, IdentityError>>>;

struct Entry {
    identity: Identity,
    until: OffsetDateTime,
}

/// Caches positive results of `V` and collapses concurrent identical validations.
pub struct CachingValidator<V> {
    inner: V,
    cfg: CacheConfig,
    clock: Arc<dyn Clock>,
    entries: RwLock<HashMap<Key, Entry>>,
    in_flight: Mutex<HashMap<Key, Flight>>,
}

// === impl CachingValidator ===

impl<V: TokenValidator> CachingValidator<V> {
    pub fn new(inner: V, cfg: CacheConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            inner,
            cfg,
            clock,
            entries: RwLock::default(),
            in_flight: Mutex::default(),
        }
    }

    /// The wrapped validator.
    pub fn inner(&self) -> &V {
        &self.inner
    }

    /// Entries currently cached.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn hit(&self, key: &Key, now: OffsetDateTime) -> Option<Identity> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|e| now < e.until)
            .map(|e| e.identity.clone())
    }

    fn store(&self, key: Key, identity: &Identity, now: OffsetDateTime) {
        let mut until = now + self.cfg.ttl;
        if let Some(exp) = identity.expires_at {
            until = until.min(exp);
        }
        if until <= now {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.cfg.max_entries {
            entries.retain(|_, e| now < e.until);
        }
        if entries.len() >= self.cfg.max_entries {
            // Still full of live entries: drop an arbitrary one rather than grow.
            if let Some(k) = entries.keys().next().copied() {
                entries.remove(&k);
            }
        }
        entries.insert(
            key,
            Entry {
                identity: identity.clone(),
                until,
            },
        );
    }

    async fn validate_cached(&self, token: &Token) -> Result<Identity, IdentityError> {
        let key = token.sha256();
        let now = self.clock.now();
        if let Some(id) = self.hit(&key, now) {
            return Ok(id);
        }
        let flight = {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key).or_default().clone()
        };
        let result = flight
            .get_or_init(|| self.inner.validate(token))
            .await
            .clone();
        {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if map.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                map.remove(&key);
            }
        }
        if let Ok(id) = &result {
            self.store(key, id, self.clock.now());
        }
        result
    }
}

impl<V: TokenValidator> TokenValidator for CachingValidator<V> {
    fn validate<'a>(&'a self, token: &'a Token) -> ValidateFuture<'a> {
        Box::pin(self.validate_cached(token))
    }

    fn probe(&self) -> super::ProbeFuture<'_> {
        self.inner.probe()
    }
}
