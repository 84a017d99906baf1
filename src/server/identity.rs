//! Token validators from `[[clusters]]`: TokenReview or JWKS per cluster, each behind the cache.

use std::sync::Arc;

use thiserror::Error;

use super::ServerError;
use crate::{
    clock::Clock,
    config::Config,
    identity::{
        CacheConfig, CachingValidator, ClusterId, ClusterRouter, IdentityError, JwksSource,
        JwksValidator, JwtConfig, TokenReviewConfig, TokenReviewValidator, TokenValidator,
    },
    kube_client::{kube_client, KubeClientError},
    spiffe::TrustDomain,
};

/// One token validator per configured cluster, routed by the caller's cluster id and aliases.
pub(super) async fn build_router(
    cfg: &Config,
    td: &TrustDomain,
    clock: &Arc<dyn Clock>,
) -> Result<ClusterRouter, ServerError> {
    let mut clusters = Vec::new();
    for c in &cfg.clusters {
        let v = validator_for(c, td, clock)
            .await
            .map_err(|source| ServerError::Identity {
                cluster: c.name.clone(),
                source,
            })?;
        clusters.push((ClusterId(c.name.clone()), v));
    }
    let default = ClusterId(cfg.default_cluster().name.clone());
    let mut router = ClusterRouter::from_clusters(default, clusters)
        .map_err(|e| ServerError::Config(vec![format!("clusters: {e}")]))?;
    for c in &cfg.clusters {
        for alias in &c.aliases {
            router = router.with_alias(alias.clone(), ClusterId(c.name.clone()));
        }
    }
    Ok(router)
}

/// Why a cluster's token validator could not be built.
#[derive(Debug, Error)]
pub enum ValidatorError {
    #[error(transparent)]
    KubeClient(#[from] KubeClientError),
    #[error("set [tokenreview] or [jwks]")]
    NoBackend,
    #[error("set one of file, url, oidc_issuer or api_server")]
    NoJwksSource,
    #[error("ca_file {}: {source}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

async fn validator_for(
    c: &crate::identity::config::Cluster,
    td: &TrustDomain,
    clock: &Arc<dyn Clock>,
) -> Result<Arc<dyn TokenValidator>, ValidatorError> {
    let cache = CacheConfig {
        ttl: c.cache_ttl,
        max_entries: c.cache_max_entries,
        negative_ttl: c.negative_cache_ttl,
        negative_max_entries: c.negative_cache_max_entries,
    };
    let id = ClusterId(c.name.clone());
    if let Some(tr) = &c.tokenreview {
        let client = kube_client(tr.kubeconfig.as_deref()).await?;
        let mut rc = TokenReviewConfig::new(id, td.clone());
        rc.audiences = c.audiences.clone();
        rc.allow_legacy_tokens = c.allow_legacy_tokens;
        rc.rate = tr.rate;
        rc.timeout = tr.timeout;
        rc.issuers = tr.issuers.clone();
        rc.leeway = c.leeway;
        rc.verify_signatures = tr.verify_signatures;
        rc.mode = tr.mode;
        let v = TokenReviewValidator::new(client, rc, clock.clone());
        return Ok(Arc::new(CachingValidator::new(v, cache, clock.clone())));
    }
    let j = c.jwks.as_ref().ok_or(ValidatorError::NoBackend)?;
    let mut jc = JwtConfig::new(id, td.clone(), Some(j.issuer.clone()));
    jc.issuers.extend(j.additional_issuers.iter().cloned());
    jc.audiences = c.audiences.clone();
    jc.allow_legacy_tokens = c.allow_legacy_tokens;
    jc.leeway = c.leeway;
    if let Some(ca) = &j.ca_file {
        jc.extra_ca_pem = Some(std::fs::read(ca).map_err(|source| ValidatorError::CaFile {
            path: ca.clone(),
            source,
        })?);
    }
    let source = match (&j.file, &j.url, &j.oidc_issuer, &j.api_server) {
        (Some(f), ..) => JwksSource::File(f.clone()),
        (_, Some(u), ..) => JwksSource::Url(u.clone()),
        (_, _, Some(i), _) => JwksSource::Discovery(i.clone()),
        (.., Some(a)) => JwksSource::ApiServer(kube_client(a.kubeconfig.as_deref()).await?),
        _ => return Err(ValidatorError::NoJwksSource),
    };
    let v = JwksValidator::new(jc, source, clock.clone())?;
    Ok(Arc::new(CachingValidator::new(v, cache, clock.clone())))
}
