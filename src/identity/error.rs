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
}

impl IdentityError {
    /// Whether the failure is the backend's, not the token's (maps to `Unavailable` on the wire).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::TokenReviewFailed(_) | Self::Overloaded(_) | Self::JwksUnavailable(_)
        )
    }

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
        }
    }
}
