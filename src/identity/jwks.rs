//! Local verification of projected tokens against the issuer's JWKS: no API call per request.
//! Keys come from a static set, a file, a JWKS URL or OIDC discovery; they are refreshed
//! periodically and on an unknown `kid`, at most once per `unknown_kid_min_interval`.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;

use super::{
    jwt::{self, ServiceAccountClaims},
    keys::{JwksSource, KeyPolicy, KeyStore},
    ClusterId, Identity, IdentityError, PodRef, Token, TokenValidator, ValidateFuture,
};
use crate::{
    clock::Clock,
    spiffe::{SpiffeId, TrustDomain},
};

/// Rules applied to every token.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub cluster: ClusterId,
    pub trust_domain: TrustDomain,
    /// The accepted `iss` values (several during an issuer migration, as the API server accepts
    /// every `--service-account-issuer`); empty only for diagnostics (`meshid token verify`
    /// without --issuer).
    pub issuers: Vec<String>,
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
    /// First wait after keys failed to load; doubles per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl JwtConfig {
    /// Defaults for a cluster: audience `istio-ca`, 60 s leeway, 5 min refresh, 10 s kid gate.
    pub fn new(cluster: ClusterId, trust_domain: TrustDomain, issuer: Option<String>) -> Self {
        Self {
            cluster,
            trust_domain,
            issuers: issuer.into_iter().collect(),
            audiences: vec![super::DEFAULT_AUDIENCE.into()],
            leeway: Duration::from_secs(60),
            allow_legacy_tokens: false,
            refresh_interval: Duration::from_secs(300),
            unknown_kid_min_interval: Duration::from_secs(10),
            extra_ca_pem: None,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }

    pub(crate) fn key_policy(&self) -> KeyPolicy {
        KeyPolicy {
            issuers: self.issuers.clone(),
            refresh_interval: self.refresh_interval,
            unknown_kid_min_interval: self.unknown_kid_min_interval,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
        }
    }
}

/// Verifies tokens locally against the issuer's keys. Stale keys are refreshed in the
/// background while the current ones keep serving; only the very first fetch is on a request,
/// and while keys have never loaded, fetches back off exponentially (requests fail fast).
pub struct JwksValidator {
    cfg: JwtConfig,
    keys: Arc<KeyStore>,
    clock: Arc<dyn Clock>,
}

// === impl JwksValidator ===

impl JwksValidator {
    /// A validator; keys are fetched on first use.
    pub fn new(
        cfg: JwtConfig,
        source: JwksSource,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, IdentityError> {
        if let JwksSource::Url(url) | JwksSource::Discovery(url) = &source {
            if let Some(why) = super::config::not_https(url) {
                return Err(IdentityError::JwksUnavailable(why));
            }
        }
        let keys = KeyStore::new(
            source,
            cfg.key_policy(),
            cfg.extra_ca_pem.as_deref(),
            clock.clone(),
        )?;
        Ok(Self {
            cfg,
            keys: Arc::new(keys),
            clock,
        })
    }

    /// How many times keys were fetched (for tests and metrics).
    pub fn fetch_count(&self) -> u64 {
        self.keys.fetch_count()
    }

    async fn validate_token(&self, token: &Token) -> Result<Identity, IdentityError> {
        let jws = jwt::parse(token.secret_str())?;
        if jws.claims.is_legacy() && !self.cfg.allow_legacy_tokens {
            return Err(IdentityError::LegacyToken);
        }
        jwt::check_alg(&jws.header.alg)?;
        self.keys.verify(&jws).await?;
        check_claims(&jws.claims, &self.cfg, self.clock.now())
    }
}

impl TokenValidator for JwksValidator {
    fn validate<'a>(&'a self, token: &'a Token) -> ValidateFuture<'a> {
        self.keys.refresh_if_stale();
        Box::pin(self.validate_token(token))
    }

    fn probe(&self) -> super::ProbeFuture<'_> {
        Box::pin(async move {
            self.keys
                .ensure_loaded()
                .await
                .map_err(super::ProbeError::Keys)
        })
    }
}

fn ts(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .map(crate::clock::rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// `exp` (required unless legacy), `nbf` and `iat` against `now` with `leeway`, as go-jose's
/// `ValidateWithLeeway` does for the API server (kube `pkg/serviceaccount/claims.go`).
pub(crate) fn check_times(
    c: &ServiceAccountClaims,
    leeway: Duration,
    now: OffsetDateTime,
) -> Result<(), IdentityError> {
    let now_s = now.unix_timestamp();
    let leeway = i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX);
    match c.exp {
        Some(exp) if now_s > exp.saturating_add(leeway) => {
            return Err(IdentityError::Expired {
                expired_at: ts(exp),
                now: ts(now_s),
            })
        }
        None if !c.is_legacy() => return Err(IdentityError::MissingClaim("exp")),
        _ => {}
    }
    if let Some(nbf) = c.nbf {
        if now_s.saturating_add(leeway) < nbf {
            return Err(IdentityError::NotYetValid {
                not_before: ts(nbf),
                now: ts(now_s),
            });
        }
    }
    if let Some(iat) = c.iat {
        if now_s.saturating_add(leeway) < iat {
            return Err(IdentityError::NotYetValid {
                not_before: format!("{} (issued-at)", ts(iat)),
                now: ts(now_s),
            });
        }
    }
    Ok(())
}

/// The issuer of legacy secret-based tokens (kube `serviceaccount.LegacyIssuer`).
pub(crate) const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";

/// `iss` must be one of `issuers` (any when empty); legacy tokens may also carry the legacy one.
pub(crate) fn check_issuer(
    c: &ServiceAccountClaims,
    issuers: &[String],
) -> Result<(), IdentityError> {
    if issuers.is_empty() {
        return Ok(());
    }
    let got = c.iss.as_deref().ok_or(IdentityError::MissingClaim("iss"))?;
    if issuers.iter().any(|i| i == got) || (c.is_legacy() && got == LEGACY_ISSUER) {
        return Ok(());
    }
    Err(IdentityError::WrongIssuer {
        got: got.into(),
        want: issuers.join(", "),
    })
}

/// Checks time, issuer and audience claims and maps the Kubernetes claims to an identity.
pub(crate) fn check_claims(
    c: &ServiceAccountClaims,
    cfg: &JwtConfig,
    now: OffsetDateTime,
) -> Result<Identity, IdentityError> {
    let legacy = c.is_legacy();
    check_times(c, cfg.leeway, now)?;
    check_issuer(c, &cfg.issuers)?;
    // Always checked, legacy or not: a token minted for another audience is not for us.
    if !c.aud.iter().any(|a| cfg.audiences.contains(a)) {
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
        service_account_uid: c.kubernetes.as_ref().map(|k| k.serviceaccount.uid.clone()),
        pod,
        cluster: cfg.cluster.clone(),
        expires_at: c
            .exp
            .and_then(|e| OffsetDateTime::from_unix_timestamp(e).ok()),
    })
}
