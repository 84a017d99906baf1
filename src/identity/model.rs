use std::{fmt, future::Future, net::IpAddr, pin::Pin};

use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::IdentityError;
use crate::spiffe::SpiffeId;

/// A bearer token. Never printed; wiped on drop.
#[derive(Clone)]
pub struct Token(Zeroizing<String>);

impl Token {
    /// Wraps a token string (surrounding whitespace removed).
    pub fn new(s: impl Into<String>) -> Self {
        let s: String = s.into();
        let trimmed = s.trim();
        if trimmed.len() == s.len() {
            Self(Zeroizing::new(s))
        } else {
            Self(Zeroizing::new(trimmed.to_owned()))
        }
    }

    /// The token text, for the validator that must read it.
    pub fn secret_str(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the token: the cache key, and what logs may show.
    pub fn sha256(&self) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes());
        d.as_ref().try_into().expect("SHA-256 is 32 bytes")
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token([redacted])")
    }
}

/// The name of a cluster whose tokens meshid validates (Istio's `ClusterID`).
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct ClusterId(pub String);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The pod a token was bound to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PodRef {
    pub name: String,
    pub uid: String,
}

/// A caller proven by its service-account token.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    pub spiffe_id: SpiffeId,
    pub namespace: String,
    pub service_account: String,
    /// The service account's UID, where the token or the review names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account_uid: Option<String>,
    pub pod: Option<PodRef>,
    pub cluster: ClusterId,
    /// When the token stops being valid (`None` only for tolerated legacy tokens).
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

/// Who is asking: the remote IP of the caller's connection, `None` for a local caller (a Unix
/// socket, or meshid itself re-checking a token). Limits that share a backend between callers
/// are kept per peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Peer(pub Option<IpAddr>);

impl Peer {
    /// Every local caller, as one peer.
    pub const LOCAL: Peer = Peer(None);
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(ip) => write!(f, "{ip}"),
            None => f.write_str("local"),
        }
    }
}

/// The future a validator returns.
pub type ValidateFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Identity, IdentityError>> + Send + 'a>>;

/// The future a readiness probe returns: `Err` says why the backend cannot be used.
pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), super::ProbeError>> + Send + 'a>>;

/// Validates a bearer token into an identity. Implementations fail closed: any doubt is an error.
pub trait TokenValidator: Send + Sync {
    /// Validates `token`.
    fn validate<'a>(&'a self, token: &'a Token) -> ValidateFuture<'a>;

    /// Validates `token` for `peer`, whose share of any shared backend is bounded.
    fn validate_from<'a>(&'a self, token: &'a Token, peer: Peer) -> ValidateFuture<'a> {
        let _ = peer;
        self.validate(token)
    }

    /// Re-checks an identity this validator gave earlier, before a cache hands it out again
    /// (a bound pod deleted since). Default: nothing to re-check.
    fn recheck(&self, id: &Identity) -> Result<(), IdentityError> {
        let _ = id;
        Ok(())
    }

    /// Whether the backend is reachable (keys fetched, API server answering).
    fn probe(&self) -> ProbeFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}
