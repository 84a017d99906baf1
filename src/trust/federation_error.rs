//! Why a federated bundle was not fetched or not stored: shared by the federation client and
//! the federated bundle store.

use thiserror::Error;

use super::spiffe_bundle::BundleError;
use crate::{spiffe::TrustDomain, state::StateError};

/// Why a peer's bundle was not taken. The stored bundle stays.
#[derive(Debug, Error)]
pub enum FederationError {
    #[error("fetching {url}: {why}")]
    Fetch { url: String, why: String },
    #[error("{url} answered HTTP {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("bundle from {url} refused: {source}")]
    Bundle {
        url: String,
        #[source]
        source: BundleError,
    },
    #[error("bundle from {url} holds a root of trust domain {found}, not of {expected}")]
    WrongTrustDomain {
        url: String,
        expected: TrustDomain,
        found: TrustDomain,
    },
    #[error("no stored bundle of {trust_domain} authenticates its https_spiffe endpoint; bootstrap it with `meshid bundle set {trust_domain} FILE`")]
    NoBootstrapBundle { trust_domain: TrustDomain },
    #[error("{trust_domain} is our own trust domain; it cannot be federated")]
    OwnTrustDomain { trust_domain: TrustDomain },
    #[error("{trust_domain} was dissociated by {by} at {at} (`meshid bundle delete --mode dissociate`): its fetched bundles are not stored; trust it again with `meshid bundle set {trust_domain} FILE`, or remove it from [[federation.peers]]")]
    Dissociated {
        trust_domain: TrustDomain,
        at: String,
        by: String,
    },
    #[error("storing the bundle: {0}")]
    State(#[from] StateError),
}

impl FederationError {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Fetch { .. } => "fetch",
            Self::HttpStatus { .. } => "http_status",
            Self::Bundle { .. } => "bundle_invalid",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::NoBootstrapBundle { .. } => "no_bootstrap_bundle",
            Self::OwnTrustDomain { .. } => "own_trust_domain",
            Self::Dissociated { .. } => "dissociated",
            Self::State(_) => "state",
        }
    }
}
