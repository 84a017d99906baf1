//! TokenReview through the real `kube` client: the API server decides; meshid checks the
//! answer fails closed (authenticated, no error, audience-aware, a service account).
//!
//! In `local` mode a token whose signature verified against the API server's keys is judged by
//! meshid itself when its watch knows the bound pod and service account (`bindings`): the
//! same rule as kube-apiserver's, with no API call; TokenReview answers only what the watch
//! cannot (not synced yet, a pod not seen yet, a token bound to no pod).
//!
//! Only tokens that could be valid cost an API call: everything else (not a JWT, a disallowed
//! algorithm, expired or not yet valid by the API server's own 60 s leeway, a foreign audience or
//! issuer, and — when the cluster's keys could be read from `/openid/v1/jwks` — a bad signature or
//! unknown key) is refused locally. TokenReview then answers what only it knows: whether the pod
//! and service account still exist. Calls are rate limited with a bounded share per peer.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use time::OffsetDateTime;

use super::{
    bindings::{BoundObjects, Verdict},
    jwks, jwt,
    keys::{JwksSource, KeyPolicy, KeyStore},
    ClusterId, Identity, IdentityError, JwtConfig, Peer, PodRef, RateLimit, RateLimiter, Token,
    TokenValidator, ValidateFuture,
};
use crate::{
    clock::Clock,
    spiffe::{SpiffeId, TrustDomain},
};

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SA_GROUP: &str = "system:serviceaccounts";

/// Settings of one cluster's TokenReview backend.
#[derive(Debug, Clone)]
pub struct TokenReviewConfig {
    pub cluster: ClusterId,
    pub trust_domain: TrustDomain,
    /// Sent as `spec.audiences`; one must come back in `status.audiences`.
    pub audiences: Vec<String>,
    pub allow_legacy_tokens: bool,
    pub rate: RateLimit,
    /// Deadline of one TokenReview call.
    pub timeout: Duration,
    /// Accepted `iss` values, checked before the call (empty: left to the API server).
    pub issuers: Vec<String>,
    /// Tolerance for `exp`, `nbf`, `iat` in the local pre-check (the API server's is 60 s).
    pub leeway: Duration,
    /// Verify signatures locally against the API server's `/openid/v1/jwks` (read with the kube
    /// client's credentials) before calling TokenReview; without readable keys, calls go ahead.
    pub verify_signatures: bool,
    /// Who judges the bound pod and service account: the API server (`Review`) or meshid's own
    /// watch where it knows them (`Local`; needs `verify_signatures`).
    pub mode: TokenReviewMode,
}

/// Who judges a verified token's bound objects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenReviewMode {
    /// Every well-formed token costs a TokenReview call.
    #[default]
    Review,
    /// Signature against the API server's JWKS, pod and service account against meshid's own
    /// watch; TokenReview while the watch is not synced or has not seen them.
    Local,
}

impl TokenReviewConfig {
    /// Defaults: audience `istio-ca`, legacy tokens refused, 50 qps / burst 100 / queue 1000
    /// (50 per peer), 5 s, 60 s leeway, signatures verified locally when the keys are readable.
    pub fn new(cluster: ClusterId, trust_domain: TrustDomain) -> Self {
        Self {
            cluster,
            trust_domain,
            audiences: vec![super::DEFAULT_AUDIENCE.into()],
            allow_legacy_tokens: false,
            rate: RateLimit::default(),
            timeout: Duration::from_secs(5),
            issuers: Vec::new(),
            leeway: Duration::from_secs(60),
            verify_signatures: true,
            mode: TokenReviewMode::Review,
        }
    }

    /// The claim checks of a locally judged token (as the JWKS backend applies them).
    fn claim_rules(&self) -> JwtConfig {
        let mut c = JwtConfig::new(self.cluster.clone(), self.trust_domain.clone(), None);
        c.issuers = self.issuers.clone();
        c.audiences = self.audiences.clone();
        c.leeway = self.leeway;
        c.allow_legacy_tokens = self.allow_legacy_tokens;
        c
    }
}

/// Validates tokens by asking the cluster's API server.
pub struct TokenReviewValidator {
    client: kube::Client,
    api: Api<TokenReview>,
    cfg: TokenReviewConfig,
    limiter: RateLimiter,
    keys: Option<Arc<KeyStore>>,
    clock: Arc<dyn Clock>,
    calls: AtomicU64,
    /// `Local` mode: the watched pods and service accounts, and the claim rules.
    bound: Option<(Arc<BoundObjects>, JwtConfig)>,
    local: AtomicU64,
}

// === impl TokenReviewValidator ===

impl TokenReviewValidator {
    /// A validator; in `Local` mode it starts its pod and service-account watches (so it must be
    /// made inside a Tokio runtime) and stops them when dropped.
    pub fn new(client: kube::Client, cfg: TokenReviewConfig, clock: Arc<dyn Clock>) -> Self {
        let keys = cfg.verify_signatures.then(|| {
            let policy = KeyPolicy {
                issuers: cfg.issuers.clone(),
                refresh_interval: Duration::from_secs(300),
                unknown_kid_min_interval: Duration::from_secs(10),
                backoff_initial: Duration::from_secs(1),
                backoff_max: Duration::from_secs(60),
            };
            let source = JwksSource::ApiServer(client.clone());
            KeyStore::new(source, policy, None, clock.clone()).map(Arc::new)
        });
        let keys = match keys.transpose() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(cluster = %cfg.cluster, error = %e, "local token verification is off");
                None
            }
        };
        let bound = (cfg.mode == TokenReviewMode::Local && keys.is_some())
            .then(|| (BoundObjects::watch(client.clone()), cfg.claim_rules()));
        Self {
            api: Api::all(client.clone()),
            client,
            limiter: RateLimiter::new(cfg.rate),
            keys,
            cfg,
            clock,
            calls: AtomicU64::new(0),
            bound,
            local: AtomicU64::new(0),
        }
    }

    /// Tokens judged by meshid's own watch (accepted or refused) so far.
    pub fn local_count(&self) -> u64 {
        self.local.load(Ordering::Relaxed)
    }

    /// Whether the pod and service-account watches hold a complete list (`Local` mode only).
    pub fn bindings_synced(&self) -> bool {
        self.bound.as_ref().is_some_and(|(b, _)| b.synced())
    }

    /// `Local` mode, for a token whose signature verified: the identity when the watch knows its
    /// pod and service account alive, a refusal when it knows one gone, `None` for TokenReview.
    fn judge_locally(
        &self,
        c: &jwt::ServiceAccountClaims,
    ) -> Result<Option<Identity>, IdentityError> {
        let Some((bound, rules)) = &self.bound else {
            return Ok(None);
        };
        // Bound to no pod, or with the API server's implicit audiences: TokenReview decides.
        let (Some(k), false) = (&c.kubernetes, c.aud.is_empty()) else {
            return Ok(None);
        };
        let Some(pod) = &k.pod else { return Ok(None) };
        let now = self.clock.now();
        let sa = &k.serviceaccount;
        let account = Some((sa.name.as_str(), sa.uid.as_str()));
        let pod = Some((pod.name.as_str(), pod.uid.as_str()));
        match bound.judge_binding(&k.namespace, account, pod, now) {
            Verdict::Gone(why) => {
                self.local.fetch_add(1, Ordering::Relaxed);
                Err(IdentityError::Invalidated(why))
            }
            Verdict::Live => {
                let id = jwks::check_claims(c, rules, now)?;
                self.local.fetch_add(1, Ordering::Relaxed);
                Ok(Some(id))
            }
            Verdict::Unknown(why) => {
                tracing::debug!(cluster = %self.cfg.cluster, why, "bound objects unknown locally; asking TokenReview");
                Ok(None)
            }
        }
    }

    /// Signing-key fetches from the API server so far.
    pub fn key_fetch_count(&self) -> u64 {
        self.keys.as_ref().map_or(0, |k| k.fetch_count())
    }

    /// Refuses, without an API call, every token that cannot be valid; `true` when its signature
    /// verified against the API server's keys.
    async fn precheck(&self, jws: &jwt::Jws<'_>) -> Result<bool, IdentityError> {
        let c = &jws.claims;
        if c.is_legacy() && !self.cfg.allow_legacy_tokens {
            return Err(IdentityError::LegacyToken);
        }
        let alg = jws.header.alg.as_str();
        jwt::check_alg(alg)?;
        if c.kubernetes.is_none() && !c.is_legacy() {
            return Err(IdentityError::MissingClaim("kubernetes.io"));
        }
        jwks::check_times(c, self.cfg.leeway, self.clock.now())?;
        jwks::check_issuer(c, &self.cfg.issuers)?;
        // A token without `aud` gets the API server's implicit audiences; one with `aud` must
        // name one of ours (kube `pkg/serviceaccount/jwt.go` intersects them).
        if !c.aud.is_empty() && !c.aud.iter().any(|a| self.cfg.audiences.contains(a)) {
            return Err(IdentityError::AudienceMismatch {
                got: c.aud.clone(),
                want: self.cfg.audiences.clone(),
            });
        }
        let Some(keys) = self.keys.as_ref() else {
            return Ok(false);
        };
        keys.refresh_if_stale();
        match keys.verify(jws).await {
            Err(IdentityError::JwksUnavailable(why)) => {
                tracing::debug!(cluster = %self.cfg.cluster, %why, "signing keys unavailable; TokenReview decides alone");
                Ok(false)
            }
            other => other.map(|()| true),
        }
    }

    /// TokenReview calls made so far.
    pub fn call_count(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    async fn review(&self, token: &Token, peer: Peer) -> Result<Identity, IdentityError> {
        let text = token.secret_str();
        let jws = jwt::parse(text)?;
        if self.precheck(&jws).await? {
            if let Some(id) = self.judge_locally(&jws.claims)? {
                return Ok(id);
            }
        }
        let expires_at = jws
            .claims
            .exp
            .and_then(|e| OffsetDateTime::from_unix_timestamp(e).ok());
        // Held until the answer is in: the peer's share covers queued and running calls.
        let _permit = self.limiter.acquire(peer).await?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(text.to_owned()),
                audiences: Some(self.cfg.audiences.clone()),
            },
            ..Default::default()
        };
        self.calls.fetch_add(1, Ordering::Relaxed);
        let params = PostParams::default();
        let call = self.api.create(&params, &review);
        let answer = tokio::time::timeout(self.cfg.timeout, call)
            .await
            .map_err(|_| {
                IdentityError::TokenReviewFailed(format!(
                    "no answer within {}s",
                    self.cfg.timeout.as_secs()
                ))
            })?
            .map_err(map_kube_error)?;
        let status = answer
            .status
            .ok_or_else(|| IdentityError::TokenReviewFailed("answer has no status".into()))?;
        self.identity_from(status, expires_at)
    }

    fn identity_from(
        &self,
        s: TokenReviewStatus,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<Identity, IdentityError> {
        if let Some(error) = s.error.filter(|e| !e.is_empty()) {
            return Err(IdentityError::ReviewNotAuthenticated { error: Some(error) });
        }
        if s.authenticated != Some(true) {
            return Err(IdentityError::ReviewNotAuthenticated { error: None });
        }
        let got = s.audiences.unwrap_or_default();
        if !got.iter().any(|a| self.cfg.audiences.contains(a)) {
            return Err(IdentityError::ReviewAudienceMismatch {
                got,
                want: self.cfg.audiences.clone(),
            });
        }
        let user = s
            .user
            .ok_or_else(|| IdentityError::NotServiceAccount("no user in the review".into()))?;
        let username = user.username.unwrap_or_default();
        // A service account's token authenticates as that account: the user's UID is its UID.
        let service_account_uid = user.uid.filter(|u| !u.is_empty());
        let (namespace, service_account) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| {
                IdentityError::NotServiceAccount(format!(
                    "user {username:?} is not system:serviceaccount:<ns>:<sa>"
                ))
            })?;
        if !user
            .groups
            .unwrap_or_default()
            .iter()
            .any(|g| g == SA_GROUP)
        {
            return Err(IdentityError::NotServiceAccount(format!(
                "user {username:?} is not in group {SA_GROUP}"
            )));
        }
        let spiffe_id =
            SpiffeId::for_service_account(&self.cfg.trust_domain, namespace, service_account)
                .map_err(|e| IdentityError::NotServiceAccount(e.to_string()))?;
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let pod = match (first(POD_NAME), first(POD_UID)) {
            (Some(name), Some(uid)) => Some(PodRef { name, uid }),
            _ => None,
        };
        Ok(Identity {
            spiffe_id,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            service_account_uid,
            pod,
            cluster: self.cfg.cluster.clone(),
            expires_at,
        })
    }
}

fn map_kube_error(e: kube::Error) -> IdentityError {
    match e {
        kube::Error::Api(status) if status.code == 429 => IdentityError::Overloaded(format!(
            "API server throttled the TokenReview: {}",
            status.message
        )),
        kube::Error::Api(status) => {
            IdentityError::TokenReviewFailed(format!("HTTP {}: {}", status.code, status.message))
        }
        other => IdentityError::TokenReviewFailed(other.to_string()),
    }
}

impl TokenValidator for TokenReviewValidator {
    fn validate<'a>(&'a self, token: &'a Token) -> ValidateFuture<'a> {
        Box::pin(self.review(token, Peer::LOCAL))
    }

    fn validate_from<'a>(&'a self, token: &'a Token, peer: Peer) -> ValidateFuture<'a> {
        Box::pin(self.review(token, peer))
    }

    /// `Local` mode: a cached identity whose pod or service account the watch has since seen
    /// deleted is refused.
    fn recheck(&self, id: &Identity) -> Result<(), IdentityError> {
        let Some((bound, _)) = &self.bound else {
            return Ok(());
        };
        let account =
            (id.service_account_uid.as_deref()).map(|uid| (id.service_account.as_str(), uid));
        let pod = id.pod.as_ref().map(|p| (p.name.as_str(), p.uid.as_str()));
        match bound.judge_binding(&id.namespace, account, pod, self.clock.now()) {
            Verdict::Gone(why) => Err(IdentityError::Invalidated(why)),
            Verdict::Live | Verdict::Unknown(_) => Ok(()),
        }
    }

    /// Ready when meshid may `create tokenreviews` (a SelfSubjectAccessReview, as `kubectl auth
    /// can-i` asks), not merely when the API server answers. Also loads the signing keys.
    fn probe(&self) -> super::ProbeFuture<'_> {
        Box::pin(async move {
            if let Some(keys) = &self.keys {
                if let Err(e) = keys.ensure_loaded().await {
                    tracing::warn!(cluster = %self.cfg.cluster, error = %e, "cannot read the API server's signing keys; every well-formed token costs a TokenReview");
                }
            }
            can_create_tokenreviews(&self.client)
                .await
                .map_err(|e| e.in_cluster(&self.cfg.cluster))
        })
    }
}

/// Asks the API server whether this client may create TokenReviews.
async fn can_create_tokenreviews(client: &kube::Client) -> Result<(), super::ProbeError> {
    use super::ProbeError;
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some("authentication.k8s.io".into()),
                resource: Some("tokenreviews".into()),
                verb: Some("create".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let params = PostParams::default();
    let call = api.create(&params, &review);
    let deadline = Duration::from_secs(5);
    let answer = tokio::time::timeout(deadline, call)
        .await
        .map_err(|_| ProbeError::AccessReviewTimeout(deadline))?
        .map_err(|e| ProbeError::AccessReviewFailed(e.to_string()))?;
    let status = answer.status.unwrap_or_default();
    if status.allowed {
        return Ok(());
    }
    let why = [status.reason, status.evaluation_error]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Err(ProbeError::TokenReviewDenied {
        why: (!why.is_empty()).then_some(why),
    })
}
