//! Who is calling: the bearer token and `ClusterID` from gRPC metadata, validated by the
//! cluster's validator. Every failure is counted by reason and answered without detail leaks.

use std::sync::Arc;

use tonic::{metadata::MetadataMap, Status};

use super::status;
use crate::{
    identity::{ClusterRouter, Identity, IdentityError, Token},
    telemetry::Metrics,
};

/// Istio's metadata key naming the cluster whose tokens authenticate the caller.
pub const CLUSTER_ID_KEY: &str = "clusterid";

/// Authenticates gRPC callers.
#[derive(Clone)]
pub struct Authenticator {
    router: ClusterRouter,
    metrics: Arc<Metrics>,
}

impl Authenticator {
    pub fn new(router: ClusterRouter, metrics: Arc<Metrics>) -> Self {
        Self { router, metrics }
    }

    /// The caller's identity, or `Unauthenticated` / `Unavailable`.
    pub async fn authenticate(&self, meta: &MetadataMap) -> Result<Identity, Status> {
        let result = match bearer(meta) {
            Ok(token) => {
                let cluster = meta
                    .get(CLUSTER_ID_KEY)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                self.router.validate(cluster.as_deref(), &token).await
            }
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            self.metrics
                .auth_failures
                .get_or_create(&Metrics::label("reason", e.reason()))
                .inc();
            tracing::info!(reason = e.reason(), error = %e, "caller refused");
            status::identity(&e)
        })
    }
}

/// The token of `authorization: Bearer <token>`.
fn bearer(meta: &MetadataMap) -> Result<Token, IdentityError> {
    let value = meta.get("authorization").ok_or(IdentityError::NoToken)?;
    let value = value
        .to_str()
        .map_err(|_| IdentityError::Malformed("authorization header is not ASCII".into()))?;
    let (scheme, token) = value.split_once(' ').ok_or_else(|| {
        IdentityError::Malformed("authorization header is not \"Bearer <token>\"".into())
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(IdentityError::Malformed(format!(
            "authorization scheme {scheme:?} is not Bearer"
        )));
    }
    let token = Token::new(token);
    if token.secret_str().is_empty() {
        return Err(IdentityError::NoToken);
    }
    Ok(token)
}

/// What a stream needs to re-check its caller later: the token and the cluster it named.
#[derive(Clone)]
pub struct Credentials {
    pub token: Token,
    pub cluster: Option<String>,
}

/// The bearer token and `ClusterID` of a request, if it carries a well-formed bearer token.
pub fn credentials(meta: &MetadataMap) -> Option<Credentials> {
    let token = bearer(meta).ok()?;
    let cluster = meta
        .get(CLUSTER_ID_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Some(Credentials { token, cluster })
}

impl Authenticator {
    /// Re-checks credentials a stream was opened with (through the validator and its cache, so
    /// TokenReview mode sees a deleted pod or service account once the cache entry lapses).
    pub async fn revalidate(&self, creds: &Credentials) -> Result<Identity, IdentityError> {
        let r = self
            .router
            .validate(creds.cluster.as_deref(), &creds.token)
            .await;
        if let Err(e) = &r {
            self.metrics
                .auth_failures
                .get_or_create(&Metrics::label("reason", e.reason()))
                .inc();
        }
        r
    }
}
