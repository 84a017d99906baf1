//! SPIFFE identities: trust domains and SPIFFE IDs, validated per the SPIFFE-ID specification.

mod error;
mod id;
mod rules;
mod trust_domain;

pub use error::SpiffeIdError;
pub use id::SpiffeId;
pub use trust_domain::TrustDomain;

/// The trust domain used when none is configured (Istio's and Kubernetes' default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
