//! One validator per cluster, chosen by the caller's `ClusterID` metadata.

use std::{collections::BTreeMap, sync::Arc};

use super::{ClusterId, IdentityError, Token, TokenValidator, ValidateFuture};

/// Routes a token to its cluster's validator.
#[derive(Clone)]
pub struct ClusterRouter {
    default: ClusterId,
    clusters: BTreeMap<ClusterId, Arc<dyn TokenValidator>>,
}

impl ClusterRouter {
    /// A router whose only cluster is `default`.
    pub fn new(default: ClusterId, validator: Arc<dyn TokenValidator>) -> Self {
        let mut clusters = BTreeMap::new();
        clusters.insert(default.clone(), validator);
        Self { default, clusters }
    }

    /// A router over `clusters`; `default` must be one of them.
    pub fn from_clusters(
        default: ClusterId,
        clusters: impl IntoIterator<Item = (ClusterId, Arc<dyn TokenValidator>)>,
    ) -> Result<Self, String> {
        let clusters: BTreeMap<_, _> = clusters.into_iter().collect();
        if !clusters.contains_key(&default) {
            return Err(format!("default cluster {default} has no validator"));
        }
        Ok(Self { default, clusters })
    }

    /// Adds (or replaces) a cluster.
    pub fn with_cluster(mut self, id: ClusterId, validator: Arc<dyn TokenValidator>) -> Self {
        self.clusters.insert(id, validator);
        self
    }

    /// Probes every cluster's backend; the first failure names its cluster.
    pub async fn probe_all(&self) -> Result<(), String> {
        for (id, v) in &self.clusters {
            v.probe().await.map_err(|e| format!("cluster {id}: {e}"))?;
        }
        Ok(())
    }

    /// Validates `token` with the validator of `cluster` (the default when `None` or empty).
    pub fn validate<'a>(&'a self, cluster: Option<&str>, token: &'a Token) -> ValidateFuture<'a> {
        let id = match cluster.filter(|c| !c.is_empty()) {
            Some(c) => ClusterId(c.to_owned()),
            None => self.default.clone(),
        };
        match self.clusters.get(&id) {
            Some(v) => v.validate(token),
            None => {
                let known = self.clusters.keys().map(|k| k.0.clone()).collect();
                Box::pin(async move { Err(IdentityError::UnknownCluster { got: id.0, known }) })
            }
        }
    }
}
