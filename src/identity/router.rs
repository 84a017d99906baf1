//! One validator per cluster, chosen by the caller's `ClusterID` metadata: a cluster's own name
//! first, then its aliases (istiod `kubeauth.KubeJWTAuthenticator.getKubeClient` with
//! `CLUSTER_ALIASES`); no `ClusterID` means the default (local) cluster.

use std::{collections::BTreeMap, sync::Arc};

use super::{
    ClusterId, IdentityError, NoDefaultValidator, Peer, ProbeError, Token, TokenValidator,
    ValidateFuture,
};

/// Routes a token to its cluster's validator.
#[derive(Clone)]
pub struct ClusterRouter {
    default: ClusterId,
    clusters: BTreeMap<ClusterId, Arc<dyn TokenValidator>>,
    aliases: BTreeMap<String, ClusterId>,
}

impl ClusterRouter {
    /// A router whose only cluster is `default`.
    pub fn new(default: ClusterId, validator: Arc<dyn TokenValidator>) -> Self {
        let mut clusters = BTreeMap::new();
        clusters.insert(default.clone(), validator);
        Self {
            default,
            clusters,
            aliases: BTreeMap::new(),
        }
    }

    /// A router over `clusters`; `default` must be one of them.
    pub fn from_clusters(
        default: ClusterId,
        clusters: impl IntoIterator<Item = (ClusterId, Arc<dyn TokenValidator>)>,
    ) -> Result<Self, NoDefaultValidator> {
        let clusters: BTreeMap<_, _> = clusters.into_iter().collect();
        if !clusters.contains_key(&default) {
            return Err(NoDefaultValidator(default));
        }
        Ok(Self {
            default,
            clusters,
            aliases: BTreeMap::new(),
        })
    }

    /// Lets callers name `cluster` as `alias` too (a cluster's own name wins over an alias).
    pub fn with_alias(mut self, alias: impl Into<String>, cluster: ClusterId) -> Self {
        self.aliases.insert(alias.into(), cluster);
        self
    }

    /// The default (local) cluster.
    pub fn default_cluster(&self) -> &ClusterId {
        &self.default
    }

    /// Adds (or replaces) a cluster.
    pub fn with_cluster(mut self, id: ClusterId, validator: Arc<dyn TokenValidator>) -> Self {
        self.clusters.insert(id, validator);
        self
    }

    /// Probes every cluster's backend; the first failure names its cluster.
    pub async fn probe_all(&self) -> Result<(), ProbeError> {
        for (id, v) in &self.clusters {
            v.probe().await.map_err(|e| e.in_cluster(id))?;
        }
        Ok(())
    }

    /// Probes the default cluster's backend: the one readiness depends on.
    pub async fn probe_default(&self) -> Result<(), ProbeError> {
        match self.clusters.get(&self.default) {
            Some(v) => v.probe().await,
            None => Err(NoDefaultValidator(self.default.clone()).into()),
        }
    }

    /// Probes every other cluster's backend, each with its result.
    pub async fn probe_remotes(&self) -> Vec<(ClusterId, Result<(), ProbeError>)> {
        let mut out = Vec::new();
        for (id, v) in self.clusters.iter().filter(|(id, _)| **id != self.default) {
            out.push((id.clone(), v.probe().await));
        }
        out
    }

    /// Validates `token` with the validator of `cluster` (the default when `None` or empty),
    /// as a local caller. Cheap for a token still in its cluster's cache.
    pub fn validate<'a>(&'a self, cluster: Option<&str>, token: &'a Token) -> ValidateFuture<'a> {
        self.validate_from(cluster, token, Peer::LOCAL)
    }

    /// Validates `token` for `peer` with the validator of `cluster`.
    pub fn validate_from<'a>(
        &'a self,
        cluster: Option<&str>,
        token: &'a Token,
        peer: Peer,
    ) -> ValidateFuture<'a> {
        match self.resolve(cluster) {
            Ok(v) => v.validate_from(token, peer),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn resolve(&self, cluster: Option<&str>) -> Result<&Arc<dyn TokenValidator>, IdentityError> {
        let Some(name) = cluster.filter(|c| !c.is_empty()) else {
            return self.by_id(&self.default.clone());
        };
        let id = ClusterId(name.to_owned());
        if let Some(v) = self.clusters.get(&id) {
            return Ok(v);
        }
        match self.aliases.get(name) {
            Some(target) => self.by_id(target),
            None => self.by_id(&id),
        }
    }

    fn by_id(&self, id: &ClusterId) -> Result<&Arc<dyn TokenValidator>, IdentityError> {
        self.clusters
            .get(id)
            .ok_or_else(|| IdentityError::UnknownCluster {
                got: id.0.clone(),
                known: self.clusters.keys().map(|k| k.0.clone()).collect(),
            })
    }
}
