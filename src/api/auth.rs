//! Who is calling: the bearer token and `ClusterID` from gRPC metadata, validated by the
//! cluster's validator. Every failure is counted by reason and answered without detail leaks.

use std::sync::Arc;

use tonic::{metadata::MetadataMap, Status};

use super::status;
use crate::{
    identity::{ClusterRouter, Identity, IdentityError, Peer, Token},
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

    /// The caller's identity, or `Unauthenticated` / `Unavailable` with a short reason (the
    /// details go to the log and the metric's `reason` label). Reads only metadata and the peer
    /// address, so it also serves an interceptor (`Request<()>`).
    pub async fn authenticate<T>(&self, req: &tonic::Request<T>) -> Result<Identity, Status> {
        // Unix sockets have no remote address: all local callers are one peer.
        let peer = Peer(req.remote_addr().map(|a| a.ip()));
        let meta = req.metadata();
        let result = match bearer(meta) {
            Ok(token) => {
                let cluster = cluster_id(meta);
                self.router
                    .validate_from(cluster.as_deref(), &token, peer)
                    .await
            }
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            self.metrics
                .auth_failures
                .get_or_create(&Metrics::label("reason", e.reason()))
                .inc();
            tracing::info!(reason = e.reason(), error = %e, %peer, "caller refused");
            status::identity(&e)
        })
    }
}

/// The `ClusterID` the caller names: exactly one value, else none (the default cluster), as
/// istiod's `kubeauth.ExtractClusterID` reads it.
fn cluster_id(meta: &MetadataMap) -> Option<String> {
    let mut values = meta.get_all(CLUSTER_ID_KEY).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => v.to_str().ok().map(str::to_owned),
        _ => None,
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

/// What a stream needs to re-check its caller later: the token, the cluster it named, and the
/// peer it came from (re-checks count against that peer's share of the TokenReview queue).
#[derive(Clone)]
pub struct Credentials {
    pub token: Token,
    pub cluster: Option<String>,
    pub peer: Peer,
}

/// The credentials of a request, if it carries a well-formed bearer token.
pub fn credentials<T>(req: &tonic::Request<T>) -> Option<Credentials> {
    let meta = req.metadata();
    Some(Credentials {
        token: bearer(meta).ok()?,
        cluster: cluster_id(meta),
        peer: Peer(req.remote_addr().map(|a| a.ip())),
    })
}

impl Authenticator {
    /// Re-checks credentials a stream was opened with (through the validator and its cache, so
    /// TokenReview mode sees a deleted pod or service account once the cache entry lapses).
    pub async fn revalidate(&self, creds: &Credentials) -> Result<Identity, IdentityError> {
        let r = self
            .router
            .validate_from(creds.cluster.as_deref(), &creds.token, creds.peer)
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
