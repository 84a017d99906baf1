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

/// Fuzzing (`crate::fuzzing::jwt`): a token through parsing, the algorithm rule, signature
/// verification against one key of every type, and the claims checks a validator applies.
#[doc(hidden)]
pub fn fuzz_token(token: &str) {
    use std::sync::OnceLock;
    static KEYS: OnceLock<Vec<jwt::VerifyKey>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        let p256 = crate::ca::PrivateKey::generate(crate::ca::KeyType::EcdsaP256)
            .map(|k| k.public_key_raw().to_vec())
            .unwrap_or_default();
        let p384 = crate::ca::PrivateKey::generate(crate::ca::KeyType::EcdsaP384)
            .map(|k| k.public_key_raw().to_vec())
            .unwrap_or_default();
        let mut n = vec![0xC3u8; 256];
        n[255] |= 1;
        vec![
            jwt::VerifyKey::Rsa {
                n,
                e: vec![1, 0, 1],
            },
            jwt::VerifyKey::EcP256(p256),
            jwt::VerifyKey::EcP384(p384),
            jwt::VerifyKey::EcP521(vec![4; 133]),
        ]
    });
    let Ok(jws) = jwt::parse(token) else {
        return;
    };
    let _ = jwt::check_alg(&jws.header.alg);
    for k in keys {
        let _ = jwt::verify_signature(&jws, k);
    }
    let cfg = JwtConfig::new(
        ClusterId(DEFAULT_CLUSTER.into()),
        crate::spiffe::TrustDomain::new("cluster.local").expect("valid"),
        Some("https://kubernetes.default.svc.cluster.local".into()),
    );
    let now = time::OffsetDateTime::from_unix_timestamp(1_796_083_200).expect("valid");
    let _ = jwks::check_claims(&jws.claims, &cfg, now);
}
