//! TokenReview through the real `kube` client: the API server decides; meshid checks the
//! answer fails closed (authenticated, no error, audience-aware, a service account).

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
    jwt, ClusterId, Identity, IdentityError, PodRef, RateLimit, RateLimiter, Token, TokenValidator,
    ValidateFuture,
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
}

impl TokenReviewConfig {
    /// Defaults: audience `istio-ca`, legacy tokens refused, 50 qps / burst 100 / queue 1000, 5 s.
    pub fn new(cluster: ClusterId, trust_domain: TrustDomain) -> Self {
        Self {
            cluster,
            trust_domain,
            audiences: vec![super::DEFAULT_AUDIENCE.into()],
            allow_legacy_tokens: false,
            rate: RateLimit::default(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Validates tokens by asking the cluster's API server.
pub struct TokenReviewValidator {
    client: kube::Client,
    api: Api<TokenReview>,
    cfg: TokenReviewConfig,
    limiter: RateLimiter,
    clock: Arc<dyn Clock>,
    calls: AtomicU64,
}

// === impl TokenReviewValidator ===

impl TokenReviewValidator {
    pub fn new(client: kube::Client, cfg: TokenReviewConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            api: Api::all(client.clone()),
            client,
            limiter: RateLimiter::new(cfg.rate),
            cfg,
            clock,
            calls: AtomicU64::new(0),
        }
    }

    /// TokenReview calls made so far.
    pub fn call_count(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    async fn review(&self, token: &Token) -> Result<Identity, IdentityError> {
        let text = token.secret_str();
        if text.is_empty() {
            return Err(IdentityError::NoToken);
        }
        if text.len() > jwt::MAX_TOKEN_LEN {
            return Err(IdentityError::TooLarge {
                len: text.len(),
                max: jwt::MAX_TOKEN_LEN,
            });
        }
        // Refuse what we can refuse without spending an API call.
        let claims = jwt::peek_claims(text);
        if let Some(c) = &claims {
            if c.is_legacy() && !self.cfg.allow_legacy_tokens {
                return Err(IdentityError::LegacyToken);
            }
            let now = self.clock.now().unix_timestamp();
            if let Some(exp) = c.exp.filter(|e| now > *e) {
                return Err(IdentityError::Expired {
                    expired_at: exp.to_string(),
                    now: now.to_string(),
                });
            }
        }
        self.limiter.acquire().await?;
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
        let expires_at = claims
            .and_then(|c| c.exp)
            .and_then(|e| OffsetDateTime::from_unix_timestamp(e).ok());
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
        Box::pin(self.review(token))
    }

    fn probe(&self) -> super::ProbeFuture<'_> {
        Box::pin(async move {
            self.client
                .apiserver_version()
                .await
                .map(|_| ())
                .map_err(|e| {
                    format!(
                        "API server of cluster {} unreachable: {e}",
                        self.cfg.cluster
                    )
                })
        })
    }
}
