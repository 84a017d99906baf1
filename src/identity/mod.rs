//! Who is calling: Kubernetes service-account tokens validated by TokenReview (through the
//! `kube` client) or locally against the issuer's JWKS, with a cache, single-flight, a rate
//! limit in front of the API server, and routing by cluster.

pub mod bindings;
mod cache;
pub mod config;
pub mod dev_issuer;
mod error;
mod http;
mod jwk;
mod jwks;
mod jwt;
mod keys;
mod limiter;
mod model;
mod router;
mod tokenreview;

pub use cache::{CacheConfig, CachingValidator};
pub use error::{IdentityError, NoDefaultValidator, ProbeError};
pub use jwk::{Jwk, JwkSet};
pub use jwks::{JwksValidator, JwtConfig};
pub use jwt::{sign_token, ServiceAccountClaims};
pub use keys::JwksSource;
pub use limiter::{RateLimit, RateLimiter};
pub use model::{
    ClusterId, Identity, Peer, PodRef, ProbeFuture, Token, TokenValidator, ValidateFuture,
};
pub use router::ClusterRouter;
pub use tokenreview::{TokenReviewConfig, TokenReviewMode, TokenReviewValidator};

/// The `ClusterID` of the default cluster: what stock Istio sidecars send (the injection
/// template's `ISTIO_META_CLUSTER_ID` default).
pub const DEFAULT_CLUSTER: &str = "Kubernetes";

/// The audience meshid asks for by default (Istio's).
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
