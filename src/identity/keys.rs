//! An issuer's signing keys, fetched from a `JwksSource`, refreshed periodically and on an
//! unknown `kid` (at most once per `unknown_kid_min_interval`), with exponential backoff while
//! they have never loaded: requests during the backoff fail fast instead of fetching again.
//! Shared by JWKS mode and the TokenReview pre-check.

use std::{
    collections::HashMap,
    fmt,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use serde::Deserialize;
use time::OffsetDateTime;

use super::{
    jwk::JwkSet,
    jwt::{self, Jws, VerifyKey},
    IdentityError,
};
use crate::clock::Clock;

/// Where the signing keys come from.
#[derive(Clone)]
pub enum JwksSource {
    /// A fixed set.
    Static(JwkSet),
    /// A file, re-read on refresh.
    File(PathBuf),
    /// A JWKS URL (https).
    Url(String),
    /// OIDC discovery: `<issuer>/.well-known/openid-configuration` → `jwks_uri`.
    Discovery(String),
    /// The cluster's own API server through the kube client, with its credentials (self-managed
    /// clusters grant `system:service-account-issuer-discovery` only to authenticated callers):
    /// `/.well-known/openid-configuration` (its `issuer` checked) and `/openid/v1/jwks`.
    ApiServer(kube::Client),
}

impl fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Static(s) => f.debug_tuple("Static").field(&s.keys.len()).finish(),
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
            Self::Url(u) => f.debug_tuple("Url").field(u).finish(),
            Self::Discovery(i) => f.debug_tuple("Discovery").field(i).finish(),
            Self::ApiServer(_) => f.write_str("ApiServer"),
        }
    }
}

/// How keys are kept fresh.
#[derive(Clone, Debug)]
pub(crate) struct KeyPolicy {
    /// Issuers the discovery document may name (empty: any).
    pub issuers: Vec<String>,
    pub refresh_interval: Duration,
    pub unknown_kid_min_interval: Duration,
    /// First wait after a failed initial fetch; doubled per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, VerifyKey>,
    /// Keys without a `kid`, tried in order when the token names none.
    anonymous: Vec<VerifyKey>,
    fetched_at: Option<Instant>,
    last_forced: Option<Instant>,
    /// Failed fetches while no keys ever loaded, on the shared retry schedule (`None` until
    /// the first failure).
    backoff: Option<crate::backoff::Backoff>,
    retry_at: Option<OffsetDateTime>,
}

/// The key store.
pub(crate) struct KeyStore {
    source: JwksSource,
    policy: KeyPolicy,
    keys: RwLock<KeyCache>,
    fetch_lock: tokio::sync::Mutex<()>,
    http: super::http::HttpsGetter,
    clock: Arc<dyn Clock>,
    fetches: AtomicU64,
    refreshing: AtomicBool,
}

#[derive(Deserialize)]
struct Discovery {
    #[serde(default)]
    issuer: String,
    jwks_uri: String,
}

// === impl KeyStore ===

impl KeyStore {
    pub(crate) fn new(
        source: JwksSource,
        policy: KeyPolicy,
        extra_ca_pem: Option<&[u8]>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, IdentityError> {
        Ok(Self {
            source,
            policy,
            keys: RwLock::default(),
            fetch_lock: tokio::sync::Mutex::new(()),
            http: super::http::HttpsGetter::new(extra_ca_pem)?,
            clock,
            fetches: AtomicU64::new(0),
            refreshing: AtomicBool::new(false),
        })
    }

    /// How many times keys were fetched.
    pub(crate) fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeyCache> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn has_keys(&self) -> bool {
        self.read().fetched_at.is_some()
    }

    fn stale(&self) -> bool {
        self.read()
            .fetched_at
            .is_none_or(|t| t.elapsed() >= self.policy.refresh_interval)
    }

    /// Starts a background refresh when the keys are stale (the current ones keep serving).
    pub(crate) fn refresh_if_stale(self: &Arc<Self>) {
        if !(self.has_keys() && self.stale()) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return; // one refresh at a time
        }
        let me = self.clone();
        rt.spawn(async move {
            // A failed refresh keeps the current keys; the next stale check tries again.
            if let Err(e) = me.refresh(false).await {
                tracing::warn!(error = %e, "refreshing token signing keys failed; keeping the current ones");
            }
            me.refreshing.store(false, Ordering::Release);
        });
    }

    /// Ok when keys are loaded (fetching them if needed); otherwise why not.
    pub(crate) async fn ensure_loaded(&self) -> Result<(), IdentityError> {
        if self.has_keys() {
            return Ok(());
        }
        self.refresh(false).await
    }

    /// Verifies `jws` against the issuer's keys (fetching them first if needed, and once more,
    /// gated, when its `kid` is unknown).
    pub(crate) async fn verify(&self, jws: &Jws<'_>) -> Result<(), IdentityError> {
        self.ensure_loaded().await?;
        let kid = jws.header.kid.as_deref();
        let keys = match self.lookup(kid) {
            Some(keys) => keys,
            None => {
                self.refresh(true).await?;
                self.lookup(kid).ok_or_else(|| IdentityError::UnknownKid {
                    kid: kid.unwrap_or("(none)").into(),
                })?
            }
        };
        let mut last = IdentityError::BadSignature;
        for k in &keys {
            match jwt::verify_signature(jws, k) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn lookup(&self, kid: Option<&str>) -> Option<Vec<VerifyKey>> {
        let k = self.read();
        match kid {
            Some(kid) => k.keys.get(kid).map(|v| vec![v.clone()]),
            None if k.anonymous.is_empty() && k.keys.len() == 1 => {
                Some(k.keys.values().cloned().collect())
            }
            None if !k.anonymous.is_empty() => Some(k.anonymous.clone()),
            None => None,
        }
    }

    /// The refusal while backing off after failed initial fetches, if one applies.
    fn backing_off(&self, k: &KeyCache) -> Option<IdentityError> {
        let retry_at = k.retry_at.filter(|_| k.fetched_at.is_none())?;
        let now = self.clock.now();
        (now < retry_at).then(|| {
            let secs = (retry_at - now).whole_seconds().max(1);
            IdentityError::JwksUnavailable(format!(
                "signing keys never loaded ({} failed fetches); next attempt in {secs}s",
                k.backoff
                    .as_ref()
                    .map_or(0, crate::backoff::Backoff::failures)
            ))
        })
    }

    /// Re-fetches keys unless, once the fetch lock is held, someone else already did (or the kid
    /// gate is closed, or the initial-fetch backoff is running).
    async fn refresh(&self, forced: bool) -> Result<(), IdentityError> {
        if let Some(e) = self.backing_off(&self.read()) {
            return Err(e);
        }
        let _guard = self.fetch_lock.lock().await;
        {
            let k = self.read();
            if let Some(e) = self.backing_off(&k) {
                return Err(e);
            }
            let fresh = k
                .fetched_at
                .is_some_and(|t| t.elapsed() < self.policy.refresh_interval);
            let gated = k
                .last_forced
                .is_some_and(|t| t.elapsed() < self.policy.unknown_kid_min_interval);
            if (!forced && fresh) || (forced && gated) {
                return Ok(());
            }
        }
        let set = self.fetch().await;
        let mut k = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if forced {
            k.last_forced = Some(Instant::now());
        }
        // A set without one key we can use verifies nothing: as good as no answer.
        let set = set.and_then(|set| {
            if set.keys.iter().any(usable) {
                Ok(set)
            } else {
                Err(IdentityError::JwksUnavailable(format!(
                    "the key set has no usable signing key ({} keys)",
                    set.keys.len()
                )))
            }
        });
        let set = match set {
            Ok(set) => set,
            Err(e) => {
                if k.fetched_at.is_none() {
                    let (min, max) = (self.policy.backoff_initial, self.policy.backoff_max);
                    let wait = k
                        .backoff
                        .get_or_insert_with(|| crate::backoff::Backoff::new(min, max))
                        .failed();
                    k.retry_at = Some(self.clock.now() + wait);
                }
                return Err(e);
            }
        };
        k.keys.clear();
        k.anonymous.clear();
        for jwk in set.keys.iter().filter(|j| usable(j)) {
            let Some(vk) = jwk.to_verify_key() else {
                continue;
            };
            match &jwk.kid {
                Some(kid) => {
                    k.keys.insert(kid.clone(), vk);
                }
                None => k.anonymous.push(vk),
            }
        }
        k.fetched_at = Some(Instant::now());
        k.backoff = None;
        k.retry_at = None;
        Ok(())
    }

    async fn fetch(&self) -> Result<JwkSet, IdentityError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let unavailable = IdentityError::JwksUnavailable;
        match &self.source {
            JwksSource::Static(set) => Ok(set.clone()),
            JwksSource::File(p) => {
                let bytes = tokio::fs::read(p)
                    .await
                    .map_err(|e| unavailable(format!("reading {}: {e}", p.display())))?;
                JwkSet::from_json(&bytes)
            }
            JwksSource::Url(url) => JwkSet::from_json(&self.http.get(url).await?),
            JwksSource::Discovery(issuer) => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let doc = discovery_doc(&url, &self.http.get(&url).await?)?;
                // OpenID Connect Discovery 1.0 §4.3: the document's issuer is the one asked.
                if doc.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
                    return Err(unavailable(format!(
                        "{url} names issuer {:?}, not {issuer:?}",
                        doc.issuer
                    )));
                }
                JwkSet::from_json(&self.http.get(&doc.jwks_uri).await?)
            }
            JwksSource::ApiServer(client) => {
                let path = "/.well-known/openid-configuration";
                let doc = discovery_doc(path, kube_get(client, path).await?.as_bytes())?;
                let want = &self.policy.issuers;
                if !want.is_empty() && !want.contains(&doc.issuer) {
                    return Err(unavailable(format!(
                        "the API server's discovery document names issuer {:?}, not one of the configured {want:?}",
                        doc.issuer
                    )));
                }
                JwkSet::from_json(kube_get(client, "/openid/v1/jwks").await?.as_bytes())
            }
        }
    }
}

fn usable(jwk: &super::Jwk) -> bool {
    jwk.use_.as_deref().is_none_or(|u| u == "sig") && jwk.to_verify_key().is_some()
}

fn discovery_doc(url: &str, body: &[u8]) -> Result<Discovery, IdentityError> {
    serde_json::from_slice(body).map_err(|e| {
        IdentityError::JwksUnavailable(format!("{url} is not an OIDC discovery document: {e}"))
    })
}

async fn kube_get(client: &kube::Client, path: &str) -> Result<String, IdentityError> {
    let unavailable = |e: String| IdentityError::JwksUnavailable(format!("GET {path}: {e}"));
    let req = hyper::Request::get(path)
        .body(Vec::new())
        .map_err(|e| unavailable(e.to_string()))?;
    let fut = client.request_text(req);
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| unavailable("timed out after 10s".into()))?
        .map_err(|e| match e {
            kube::Error::Api(s) => unavailable(format!("HTTP {}: {}", s.code, s.message)),
            other => unavailable(other.to_string()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The initial-fetch retries wait on the shared schedule with this policy's bounds: the
    /// longest wait after the n-th failure doubles from `backoff_initial` up to `backoff_max`.
    #[test]
    fn initial_fetch_retries_double_up_to_the_cap() {
        let b = crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let waits: Vec<u64> = (1..=9).map(|n| b.delay(n, 1.0).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.delay(u32::MAX, 1.0), Duration::from_secs(60));
    }
}
