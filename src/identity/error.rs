use thiserror::Error;

/// Why a token was refused, or could not be checked. Each variant says what was wrong.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("no bearer token was presented")]
    NoToken,
    #[error("token is {len} bytes; the maximum is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token algorithm {alg:?} is not accepted (allowed: RS256/384/512, PS256/384/512, ES256/384/512)")]
    AlgorithmNotAllowed { alg: String },
    #[error("token is signed with unknown key id {kid:?}")]
    UnknownKid { kid: String },
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired at {expired_at} (now {now})")]
    Expired { expired_at: String, now: String },
    #[error("token is not valid before {not_before} (now {now})")]
    NotYetValid { not_before: String, now: String },
    #[error("token issuer {got:?} is not the expected {want}")]
    WrongIssuer { got: String, want: String },
    #[error("token audiences {got:?} include none of {want:?}")]
    AudienceMismatch { got: Vec<String>, want: Vec<String> },
    #[error("token lacks the {0} claim")]
    MissingClaim(&'static str),
    #[error("legacy (secret-based, non-expiring) service-account tokens are refused; use a projected token (allow_legacy_tokens is off)")]
    LegacyToken,
    #[error("token does not name a service account: {0}")]
    NotServiceAccount(String),
    #[error("TokenReview says the token is not authenticated{}", .error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    ReviewNotAuthenticated { error: Option<String> },
    #[error("TokenReview audiences {got:?} include none of the requested {want:?} (the authenticator ignored audiences)")]
    ReviewAudienceMismatch { got: Vec<String>, want: Vec<String> },
    #[error("TokenReview call failed: {0}")]
    TokenReviewFailed(String),
    #[error("identity backend is overloaded ({0}); retry with backoff")]
    Overloaded(String),
    #[error("unknown cluster {got:?}; known clusters: {}", .known.join(", "))]
    UnknownCluster { got: String, known: Vec<String> },
    #[error("signing keys of the token issuer are unavailable: {0}")]
    JwksUnavailable(String),
    #[error("service account token has been invalidated: {0}")]
    Invalidated(String),
}

impl IdentityError {
    /// Whether the failure is the backend's, not the token's (maps to `Unavailable` on the wire).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::TokenReviewFailed(_) | Self::Overloaded(_) | Self::JwksUnavailable(_)
        )
    }

    /// Every label [`reason`](Self::reason) gives.
    pub const REASONS: &'static [&'static str] = &[
        "algorithm",
        "audience",
        "bad_signature",
        "expired",
        "invalidated",
        "issuer",
        "jwks_unavailable",
        "legacy_token",
        "malformed",
        "missing_claim",
        "no_token",
        "not_authenticated",
        "not_service_account",
        "not_yet_valid",
        "overloaded",
        "tokenreview_failed",
        "too_large",
        "unknown_cluster",
        "unknown_kid",
    ];

    /// A short, stable reason label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoToken => "no_token",
            Self::TooLarge { .. } => "too_large",
            Self::Malformed(_) => "malformed",
            Self::AlgorithmNotAllowed { .. } => "algorithm",
            Self::UnknownKid { .. } => "unknown_kid",
            Self::BadSignature => "bad_signature",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::WrongIssuer { .. } => "issuer",
            Self::AudienceMismatch { .. } | Self::ReviewAudienceMismatch { .. } => "audience",
            Self::MissingClaim(_) => "missing_claim",
            Self::LegacyToken => "legacy_token",
            Self::NotServiceAccount(_) => "not_service_account",
            Self::ReviewNotAuthenticated { .. } => "not_authenticated",
            Self::TokenReviewFailed(_) => "tokenreview_failed",
            Self::Overloaded(_) => "overloaded",
            Self::UnknownCluster { .. } => "unknown_cluster",
            Self::JwksUnavailable(_) => "jwks_unavailable",
            Self::Invalidated(_) => "invalidated",
        }
    }
}

/// Why an identity backend cannot be used now (a readiness probe's answer).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ProbeError {
    #[error("identity backends not probed yet")]
    NotProbedYet,
    #[error(transparent)]
    NoValidator(#[from] NoDefaultValidator),
    #[error("cluster {cluster}: {source}")]
    Cluster {
        cluster: super::ClusterId,
        source: Box<ProbeError>,
    },
    #[error("{0}")]
    Keys(IdentityError),
    #[error("API server did not answer a SelfSubjectAccessReview within {0:?}")]
    AccessReviewTimeout(std::time::Duration),
    #[error("SelfSubjectAccessReview failed: {0}")]
    AccessReviewFailed(String),
    #[error("meshid may not create tokenreviews.authentication.k8s.io{}; bind its service account to the ClusterRole system:auth-delegator", .why.as_ref().map(|w| format!(" ({w})")).unwrap_or_default())]
    TokenReviewDenied { why: Option<String> },
}

impl ProbeError {
    /// The same failure, naming the cluster whose backend failed.
    pub fn in_cluster(self, cluster: &super::ClusterId) -> Self {
        Self::Cluster {
            cluster: cluster.clone(),
            source: Box::new(self),
        }
    }
}

/// A cluster router was asked to default to a cluster it has no validator for.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("default cluster {0} has no validator")]
pub struct NoDefaultValidator(pub super::ClusterId);
