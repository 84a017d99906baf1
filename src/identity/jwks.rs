//! Local verification of projected tokens against the issuer's JWKS: no API call per request.
//! Keys come from a static set, a file, a JWKS URL or OIDC discovery; they are refreshed
//! periodically and on an unknown `kid`, at most once per `unknown_kid_min_interval`.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{
    jwt::{self, ServiceAccountClaims, VerifyKey},
    ClusterId, Identity, IdentityError, PodRef, Token, TokenValidator, ValidateFuture,
};
use crate::{
    clock::Clock,
    spiffe::{SpiffeId, TrustDomain},
};

/// One JSON Web Key (public).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
}

/// A JWK Set, as `kubectl get --raw /openid/v1/jwks` prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    pub keys: Vec<Jwk>,
}

impl Jwk {
    fn to_verify_key(&self) -> Option<VerifyKey> {
        let b = |v: &Option<String>| v.as_deref().and_then(|s| URL_SAFE_NO_PAD.decode(s).ok());
        match (self.kty.as_str(), self.crv.as_deref()) {
            ("RSA", _) => Some(VerifyKey::Rsa {
                n: b(&self.n)?,
                e: b(&self.e)?,
            }),
            ("EC", Some(crv @ ("P-256" | "P-384"))) => {
                let (x, y) = (b(&self.x)?, b(&self.y)?);
                let w = if crv == "P-256" { 32 } else { 48 };
                if x.len() != w || y.len() != w {
                    return None;
                }
                let point = [&[4u8][..], &x, &y].concat();
                Some(if w == 32 {
                    VerifyKey::EcP256(point)
                } else {
                    VerifyKey::EcP384(point)
                })
            }
            _ => None,
        }
    }
}

impl JwkSet {
    /// Parses a JWKS document.
    pub fn from_json(bytes: &[u8]) -> Result<Self, IdentityError> {
        serde_json::from_slice(bytes)
            .map_err(|e| IdentityError::JwksUnavailable(format!("not a JWK Set: {e}")))
    }

    /// A public JWKS for a signing key (what `meshid dev issuer init` publishes).
    pub fn for_key(key: &crate::ca::PrivateKey, kid: &str) -> Self {
        let p = jwt::public_jwk_params(key);
        let get = |k: &str| p.get(k).cloned();
        Self {
            keys: vec![Jwk {
                kty: get("kty").unwrap_or_default(),
                kid: Some(kid.into()),
                alg: Some(jwt::jws_alg(key.key_type()).into()),
                use_: Some("sig".into()),
                n: get("n"),
                e: get("e"),
                crv: get("crv"),
                x: get("x"),
                y: get("y"),
            }],
        }
    }
}

/// Where the signing keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// A fixed set.
    Static(JwkSet),
    /// A file, re-read on refresh.
    File(PathBuf),
    /// A JWKS URL (https).
    Url(String),
    /// OIDC discovery: `<issuer>/.well-known/openid-configuration` → `jwks_uri`.
    Discovery(String),
}

/// Rules applied to every token.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub cluster: ClusterId,
    pub trust_domain: TrustDomain,
    /// The expected `iss`; `None` only for diagnostics (`meshid token verify` without --issuer).
    pub issuer: Option<String>,
    /// At least one must be in the token's `aud`.
    pub audiences: Vec<String>,
    /// Tolerance for `exp`, `nbf`, `iat`.
    pub leeway: Duration,
    pub allow_legacy_tokens: bool,
    /// How often keys are re-fetched.
    pub refresh_interval: Duration,
    /// Minimum time between fetches triggered by an unknown `kid`.
    pub unknown_kid_min_interval: Duration,
    /// Extra CA certificates (PEM) for fetching keys over HTTPS, besides the system roots.
    pub extra_ca_pem: Option<Vec<u8>>,
}

impl JwtConfig {
    /// Defaults for a cluster: audience `istio-ca`, 60 s leeway, 5 min refresh, 10 s kid gate.
    pub fn new(cluster: ClusterId, trust_domain: TrustDomain, issuer: Option<String>) -> Self {
        Self {
            cluster,
            trust_domain,
            issuer,
            audiences: vec![super::DEFAULT_AUDIENCE.into()],
            leeway: Duration::from_secs(60),
            allow_legacy_tokens: false,
            refresh_interval: Duration::from_secs(300),
            unknown_kid_min_interval: Duration::from_secs(10),
            extra_ca_pem: None,
        }
    }
}

struct KeyCache {
    keys: HashMap<String, VerifyKey>,
    /// Keys without a `kid`, tried in order when the token names none.
    anonymous: Vec<VerifyKey>,
    fetched_at: Option<Instant>,
    last_forced: Option<Instant>,
}

/// Verifies tokens locally against the issuer's keys. Stale keys are refreshed in the
/// background while the current ones keep serving; only the very first fetch is on a request.
pub struct JwksValidator(Arc<Inner>);

struct Inner {
    cfg: JwtConfig,
    source: JwksSource,
    keys: RwLock<KeyCache>,
    fetch_lock: tokio::sync::Mutex<()>,
    http: super::http::HttpsGetter,
    clock: Arc<dyn Clock>,
    fetches: std::sync::atomic::AtomicU64,
    refreshing: std::sync::atomic::AtomicBool,
}

// === impl JwksValidator ===

impl JwksValidator {
    /// A validator; keys are fetched on first use.
    pub fn new(
        cfg: JwtConfig,
        source: JwksSource,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, IdentityError> {
        Inner::new(cfg, source, clock).map(|i| Self(Arc::new(i)))
    }

    /// How many times keys were fetched (for tests and metrics).
    pub fn fetch_count(&self) -> u64 {
        self.0.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn refresh_in_background(&self) {
        use std::sync::atomic::Ordering::{AcqRel, Release};
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.0.refreshing.swap(true, AcqRel) {
            return; // one refresh at a time
        }
        let inner = self.0.clone();
        rt.spawn(async move {
            // A failed refresh keeps the current keys; the next stale check tries again.
            let _ = inner.refresh(false).await;
            inner.refreshing.store(false, Release);
        });
    }
}

// === impl Inner ===

impl Inner {
    fn new(
        cfg: JwtConfig,
        source: JwksSource,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, IdentityError> {
        let http = super::http::HttpsGetter::new(cfg.extra_ca_pem.as_deref())?;
        Ok(Self {
            cfg,
            source,
            keys: RwLock::new(KeyCache {
                keys: HashMap::new(),
                anonymous: Vec::new(),
                fetched_at: None,
                last_forced: None,
            }),
            fetch_lock: tokio::sync::Mutex::new(()),
            http,
            clock,
            fetches: Default::default(),
            refreshing: Default::default(),
        })
    }

    async fn fetch(&self) -> Result<JwkSet, IdentityError> {
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let unavailable = |e: String| IdentityError::JwksUnavailable(e);
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
                #[derive(Deserialize)]
                struct Discovery {
                    jwks_uri: String,
                }
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let doc: Discovery =
                    serde_json::from_slice(&self.http.get(&url).await?).map_err(|e| {
                        unavailable(format!("{url} is not an OIDC discovery document: {e}"))
                    })?;
                JwkSet::from_json(&self.http.get(&doc.jwks_uri).await?)
            }
        }
    }

    /// Re-fetches keys if `needed(cache)` still holds once the fetch lock is held.
    async fn refresh(&self, forced: bool) -> Result<(), IdentityError> {
        let _guard = self.fetch_lock.lock().await;
        {
            let k = self.keys.read().unwrap_or_else(|e| e.into_inner());
            let fresh = k
                .fetched_at
                .is_some_and(|t| t.elapsed() < self.cfg.refresh_interval);
            let gated = k
                .last_forced
                .is_some_and(|t| t.elapsed() < self.cfg.unknown_kid_min_interval);
            if (!forced && fresh) || (forced && gated) {
                return Ok(()); // someone else refreshed while we waited, or the kid gate is closed
            }
        }
        let set = self.fetch().await;
        let mut k = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if forced {
            k.last_forced = Some(Instant::now());
        }
        let set = set?;
        k.keys.clear();
        k.anonymous.clear();
        for jwk in &set.keys {
            if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
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
        Ok(())
    }

    fn lookup(&self, kid: Option<&str>) -> Option<Vec<VerifyKey>> {
        let k = self.keys.read().unwrap_or_else(|e| e.into_inner());
        match kid {
            Some(kid) => k.keys.get(kid).map(|v| vec![v.clone()]),
            None if k.anonymous.is_empty() && k.keys.len() == 1 => {
                Some(k.keys.values().cloned().collect())
            }
            None if !k.anonymous.is_empty() => Some(k.anonymous.clone()),
            None => None,
        }
    }

    fn has_keys(&self) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .fetched_at
            .is_some()
    }

    fn stale(&self) -> bool {
        let k = self.keys.read().unwrap_or_else(|e| e.into_inner());
        k.fetched_at
            .is_none_or(|t| t.elapsed() >= self.cfg.refresh_interval)
    }

    async fn validate_token(&self, token: &Token) -> Result<Identity, IdentityError> {
        let jws = jwt::parse(token.secret_str())?;
        if jws.claims.is_legacy() && !self.cfg.allow_legacy_tokens {
            return Err(IdentityError::LegacyToken);
        }
        if !matches!(
            jws.header.alg.as_str(),
            "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512" | "ES256" | "ES384"
        ) {
            return Err(IdentityError::AlgorithmNotAllowed {
                alg: jws.header.alg.clone(),
            });
        }
        if !self.has_keys() {
            self.refresh(false).await?;
        }
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
        let verified = keys.iter().any(|k| match jwt::verify_signature(&jws, k) {
            Ok(()) => true,
            Err(e) => {
                last = e;
                false
            }
        });
        if !verified {
            return Err(last);
        }
        check_claims(&jws.claims, &self.cfg, self.clock.now())
    }
}

impl TokenValidator for JwksValidator {
    fn validate<'a>(&'a self, token: &'a Token) -> ValidateFuture<'a> {
        if self.0.has_keys() && self.0.stale() {
            self.refresh_in_background();
        }
        Box::pin(self.0.validate_token(token))
    }

    fn probe(&self) -> super::ProbeFuture<'_> {
        Box::pin(async move {
            if self.0.has_keys() {
                return Ok(());
            }
            self.0.refresh(false).await.map_err(|e| e.to_string())
        })
    }
}

fn ts(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .map(crate::clock::rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Checks time, issuer and audience claims and maps the Kubernetes claims to an identity.
pub(crate) fn check_claims(
    c: &ServiceAccountClaims,
    cfg: &JwtConfig,
    now: OffsetDateTime,
) -> Result<Identity, IdentityError> {
    let now_s = now.unix_timestamp();
    let leeway = cfg.leeway.as_secs() as i64;
    let legacy = c.is_legacy();
    match c.exp {
        Some(exp) if now_s > exp + leeway => {
            return Err(IdentityError::Expired {
                expired_at: ts(exp),
                now: ts(now_s),
            })
        }
        None if !legacy => return Err(IdentityError::MissingClaim("exp")),
        _ => {}
    }
    if let Some(nbf) = c.nbf {
        if now_s + leeway < nbf {
            return Err(IdentityError::NotYetValid {
                not_before: ts(nbf),
                now: ts(now_s),
            });
        }
    }
    if let Some(iat) = c.iat {
        if now_s + leeway < iat {
            return Err(IdentityError::NotYetValid {
                not_before: format!("{} (issued-at)", ts(iat)),
                now: ts(now_s),
            });
        }
    }
    if let Some(want) = &cfg.issuer {
        let got = c.iss.as_deref().ok_or(IdentityError::MissingClaim("iss"))?;
        if got != want {
            return Err(IdentityError::WrongIssuer {
                got: got.into(),
                want: want.clone(),
            });
        }
    }
    if !legacy && !c.aud.iter().any(|a| cfg.audiences.contains(a)) {
        return Err(IdentityError::AudienceMismatch {
            got: c.aud.clone(),
            want: cfg.audiences.clone(),
        });
    }
    let (namespace, service_account, pod) = match (&c.kubernetes, legacy) {
        (Some(k), _) => (
            k.namespace.clone(),
            k.serviceaccount.name.clone(),
            k.pod.as_ref().map(|p| PodRef {
                name: p.name.clone(),
                uid: p.uid.clone(),
            }),
        ),
        (None, true) => (
            c.legacy_namespace
                .clone()
                .ok_or(IdentityError::MissingClaim(
                    "kubernetes.io/serviceaccount/namespace",
                ))?,
            c.legacy_service_account
                .clone()
                .ok_or(IdentityError::MissingClaim(
                    "kubernetes.io/serviceaccount/service-account.name",
                ))?,
            None,
        ),
        (None, false) => return Err(IdentityError::MissingClaim("kubernetes.io")),
    };
    let expected_sub = format!("system:serviceaccount:{namespace}:{service_account}");
    if c.sub.as_deref().is_some_and(|s| s != expected_sub) {
        return Err(IdentityError::NotServiceAccount(format!(
            "sub {:?} does not match {expected_sub:?}",
            c.sub
        )));
    }
    let spiffe_id = SpiffeId::for_service_account(&cfg.trust_domain, &namespace, &service_account)
        .map_err(|e| IdentityError::NotServiceAccount(e.to_string()))?;
    Ok(Identity {
        spiffe_id,
        namespace,
        service_account,
        pod,
        cluster: cfg.cluster.clone(),
        expires_at: c
            .exp
            .and_then(|e| OffsetDateTime::from_unix_timestamp(e).ok()),
    })
}
