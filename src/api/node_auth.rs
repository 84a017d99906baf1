//! Node agents that ask for other pods' certificates (Istio ambient's ztunnel): the CSR API's
//! `ImpersonatedIdentity` metadata, judged with istiod's rules (`ClusterNodeAuthorizer.
//! authenticateImpersonation`, security/pkg/server/ca/node_auth.go, reached per caller ClusterID
//! through `MulticlusterNodeAuthorizor`; its pod informer filters `status.phase!=Failed`) plus meshid's trust domain.
//!
//! A caller may impersonate `spiffe://<td>/ns/<ns>/sa/<sa>` when
//! 1. its own service account is one of `trusted_node_accounts`;
//! 2. the requested identity parses as Istio's `/ns/<ns>/sa/<sa>` and is in meshid's trust domain
//!    (istiod does not check the trust domain; meshid signs only its own);
//! 3. its token is bound to a pod that exists in discovery's pod index under that name, with that
//!    UID and that service account;
//! 4. at least one pod of the requested service account runs on the caller's pod's node.
//!
//! Pods in phase `Failed` are not in the index (istiod's pod informer filters them out); pods
//! without a node or a service account are not on any node. Everything else is refused; the
//! reason goes to the log and the metric, never to the caller.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

use crate::{
    discovery::MeshObjects,
    identity::Identity,
    spiffe::{SpiffeId, TrustDomain},
};

/// The metadata key ztunnel sets (Istio's `security.ImpersonatedIdentity`).
pub const IMPERSONATED_IDENTITY_KEY: &str = "ImpersonatedIdentity";

/// Every `result` of `meshid_impersonation_requests_total`: `allowed` or a refusal reason.
pub const RESULTS: &[&str] = &[
    "allowed",
    "not_configured",
    "caller_not_trusted",
    "identity_invalid",
    "foreign_trust_domain",
    "caller_not_pod_bound",
    "cluster_not_discovered",
    "caller_pod_not_found",
    "caller_pod_uid_mismatch",
    "caller_pod_service_account_mismatch",
    "not_on_node",
];

/// Why an impersonation was refused: a stable label, and the detail for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub detail: String,
}

fn refuse(reason: &'static str, detail: String) -> Refusal {
    Refusal { reason, detail }
}

/// The identity requested by `ImpersonatedIdentity` in a request's metadata, if it carries one.
/// Read as istiod reads it (`GetStringValue()`): a value that is not a non-empty string asks for
/// nothing, and the certificate is the caller's own.
pub fn requested_identity(meta: Option<&prost_types::Struct>) -> Option<&str> {
    match meta?.fields.get(IMPERSONATED_IDENTITY_KEY)?.kind.as_ref()? {
        prost_types::value::Kind::StringValue(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// One pod, as the node check reads it.
#[derive(Debug, Clone)]
struct PodEntry {
    uid: String,
    service_account: String,
    node: String,
}

/// Pods by name and service accounts by node, from one cluster's pods.
#[derive(Debug, Default)]
pub struct PodIndex {
    by_name: HashMap<(String, String), PodEntry>,
    /// (node, namespace, service account) of every indexed pod with a node.
    on_node: HashSet<(String, String, String)>,
}

impl PodIndex {
    /// Indexes `pods`, leaving out failed ones (istiod's informer field selector
    /// `status.phase!=Failed`).
    pub fn build(pods: &[Pod]) -> Self {
        let mut index = Self::default();
        for pod in pods {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if phase == Some("Failed") {
                continue;
            }
            let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
                continue;
            };
            let spec = pod.spec.as_ref();
            let entry = PodEntry {
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                service_account: spec
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_default(),
                node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            };
            if !entry.node.is_empty() && !entry.service_account.is_empty() {
                index.on_node.insert((
                    entry.node.clone(),
                    ns.clone(),
                    entry.service_account.clone(),
                ));
            }
            index.by_name.insert((ns.clone(), name.clone()), entry);
        }
        index
    }
}

/// The pod index of every cluster discovery watches, by cluster name.
type ClusterIndexes = HashMap<String, Arc<PodIndex>>;

/// Judges impersonation requests against the live pod index of discovery.
pub struct NodeAuthorizer {
    trusted: HashSet<(String, String)>,
    trust_domain: TrustDomain,
    /// The name discovery gives its own cluster (its other clusters are `remotes`).
    local_cluster: String,
    objects: watch::Receiver<Arc<MeshObjects>>,
    /// The index of the last objects seen, rebuilt when discovery publishes new ones.
    cache: Mutex<Option<(Arc<MeshObjects>, Arc<ClusterIndexes>)>>,
}

impl NodeAuthorizer {
    pub fn new(
        trusted: Vec<(String, String)>,
        trust_domain: TrustDomain,
        local_cluster: String,
        objects: watch::Receiver<Arc<MeshObjects>>,
    ) -> Self {
        Self {
            trusted: trusted.into_iter().collect(),
            trust_domain,
            local_cluster,
            objects,
            cache: Mutex::new(None),
        }
    }

    /// The pod index of every cluster discovery watches, by cluster name.
    fn indexes(&self) -> Arc<ClusterIndexes> {
        let objects = self.objects.borrow().clone();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, idx)) = cache.as_ref() {
            if Arc::ptr_eq(seen, &objects) {
                return idx.clone();
            }
        }
        let mut map = HashMap::new();
        map.insert(
            self.local_cluster.clone(),
            Arc::new(PodIndex::build(&objects.pods)),
        );
        for r in &objects.remotes {
            map.insert(r.name.clone(), Arc::new(PodIndex::build(&r.pods)));
        }
        let idx = Arc::new(map);
        *cache = Some((objects, idx.clone()));
        idx
    }

    /// The identity `caller` may have a certificate for when it asks for `requested`, or why not.
    pub fn authorize(&self, caller: &Identity, requested: &str) -> Result<SpiffeId, Refusal> {
        let caller_sa = (caller.namespace.clone(), caller.service_account.clone());
        if !self.trusted.contains(&caller_sa) {
            return Err(refuse(
                "caller_not_trusted",
                format!(
                    "caller {}/{} is not one of trusted_node_accounts",
                    caller.namespace, caller.service_account
                ),
            ));
        }
        let id = SpiffeId::parse(requested)
            .ok()
            .filter(|id| id.service_account().is_some())
            .ok_or_else(|| {
                refuse(
                    "identity_invalid",
                    format!(
                        "impersonated identity {requested:?} is not spiffe://<td>/ns/<ns>/sa/<sa>"
                    ),
                )
            })?;
        if id.trust_domain() != &self.trust_domain {
            return Err(refuse(
                "foreign_trust_domain",
                format!(
                    "impersonated identity {id} is not in trust domain {}",
                    self.trust_domain
                ),
            ));
        }
        let (ns, sa) = id
            .service_account()
            .expect("checked to have the /ns/<ns>/sa/<sa> shape above");
        let Some(pod) = &caller.pod else {
            return Err(refuse(
                "caller_not_pod_bound",
                "the caller's token is not bound to a pod".into(),
            ));
        };
        let indexes = self.indexes();
        let Some(index) = indexes.get(&caller.cluster.0) else {
            return Err(refuse(
                "cluster_not_discovered",
                format!(
                    "the caller's cluster {} is not one discovery watches",
                    caller.cluster
                ),
            ));
        };
        let Some(found) = index
            .by_name
            .get(&(caller.namespace.clone(), pod.name.clone()))
        else {
            return Err(refuse(
                "caller_pod_not_found",
                format!("pod {}/{} not found", caller.namespace, pod.name),
            ));
        };
        if found.uid != pod.uid {
            return Err(refuse(
                "caller_pod_uid_mismatch",
                format!(
                    "pod {}/{} found, but its UID {} is not the token's {}",
                    caller.namespace, pod.name, found.uid, pod.uid
                ),
            ));
        }
        if found.service_account != caller.service_account {
            return Err(refuse(
                "caller_pod_service_account_mismatch",
                format!(
                    "pod {}/{} found, but it runs as {}, not {}",
                    caller.namespace, pod.name, found.service_account, caller.service_account
                ),
            ));
        }
        let on_node = !found.node.is_empty()
            && index
                .on_node
                .contains(&(found.node.clone(), ns.to_owned(), sa.to_owned()));
        if !on_node {
            return Err(refuse(
                "not_on_node",
                format!("no pod of {ns}/{sa} found on node {:?}", found.node),
            ));
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ClusterId, PodRef};
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: (!sa.is_empty()).then(|| sa.into()),
                node_name: (!node.is_empty()).then(|| node.into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    fn caller(ns: &str, sa: &str, pod: Option<(&str, &str)>) -> Identity {
        let td = TrustDomain::new("cluster.local").unwrap();
        Identity {
            spiffe_id: SpiffeId::for_service_account(&td, ns, sa).unwrap(),
            namespace: ns.into(),
            service_account: sa.into(),
            service_account_uid: None,
            pod: pod.map(|(name, uid)| PodRef {
                name: name.into(),
                uid: uid.into(),
            }),
            cluster: ClusterId("Kubernetes".into()),
            expires_at: None,
        }
    }

    fn authorizer(pods: Vec<Pod>) -> (NodeAuthorizer, watch::Sender<Arc<MeshObjects>>) {
        let (tx, rx) = watch::channel(Arc::new(MeshObjects {
            pods,
            ..Default::default()
        }));
        let na = NodeAuthorizer::new(
            vec![("istio-system".into(), "ztunnel".into())],
            TrustDomain::new("cluster.local").unwrap(),
            "Kubernetes".into(),
            rx,
        );
        (na, tx)
    }

    fn mesh() -> Vec<Pod> {
        vec![
            pod(
                "istio-system",
                "ztunnel-a",
                "uid-za",
                "ztunnel",
                "node-a",
                "Running",
            ),
            pod(
                "istio-system",
                "ztunnel-b",
                "uid-zb",
                "ztunnel",
                "node-b",
                "Running",
            ),
            pod(
                "shop",
                "product-0",
                "uid-p0",
                "product-service",
                "node-a",
                "Running",
            ),
            pod(
                "shop",
                "inventory-0",
                "uid-i0",
                "inventory-service",
                "node-b",
                "Running",
            ),
            pod("shop", "batch-0", "uid-b0", "batch", "node-a", "Failed"),
            pod(
                "shop",
                "report-0",
                "uid-r0",
                "report",
                "node-a",
                "Succeeded",
            ),
        ]
    }

    /// istiod's `TestNodeAuthorizer` cases, as `authenticateImpersonation` decides them.
    #[test]
    fn istiods_rules() {
        let (na, _tx) = authorizer(mesh());
        let ztunnel_a = caller("istio-system", "ztunnel", Some(("ztunnel-a", "uid-za")));
        let td = "spiffe://cluster.local";
        assert_eq!(
            na.authorize(&ztunnel_a, &format!("{td}/ns/shop/sa/product-service"))
                .unwrap()
                .to_string(),
            format!("{td}/ns/shop/sa/product-service")
        );
        // A Succeeded pod still counts (only Failed ones are filtered out).
        assert!(na
            .authorize(&ztunnel_a, &format!("{td}/ns/shop/sa/report"))
            .is_ok());
        let reason = |c: &Identity, id: &str| na.authorize(c, id).unwrap_err().reason;
        assert_eq!(
            reason(&ztunnel_a, &format!("{td}/ns/shop/sa/inventory-service")),
            "not_on_node"
        );
        assert_eq!(
            reason(&ztunnel_a, &format!("{td}/ns/shop/sa/batch")),
            "not_on_node"
        );
        assert_eq!(
            reason(
                &caller("shop", "product-service", Some(("product-0", "uid-p0"))),
                &format!("{td}/ns/shop/sa/product-service")
            ),
            "caller_not_trusted"
        );
        assert_eq!(
            reason(
                &caller("istio-system", "ztunnel", Some(("ztunnel-a", "uid-old"))),
                &format!("{td}/ns/shop/sa/product-service")
            ),
            "caller_pod_uid_mismatch"
        );
        assert_eq!(
            reason(
                &caller("istio-system", "ztunnel", Some(("ztunnel-gone", "uid-g"))),
                &format!("{td}/ns/shop/sa/product-service")
            ),
            "caller_pod_not_found"
        );
        assert_eq!(
            reason(
                &caller("istio-system", "ztunnel", None),
                &format!("{td}/ns/shop/sa/product-service")
            ),
            "caller_not_pod_bound"
        );
        assert_eq!(
            reason(
                &ztunnel_a,
                "spiffe://other.example/ns/shop/sa/product-service"
            ),
            "foreign_trust_domain"
        );
        for bad in [
            "product-service",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/product-service/extra",
            "spiffe://cluster.local/sa/x/ns/y",
            "spiffe://Cluster.Local/ns/shop/sa/x",
        ] {
            assert_eq!(reason(&ztunnel_a, bad), "identity_invalid", "{bad}");
        }
    }

    /// The index follows discovery: a pod scheduled later is found, a deleted one is not.
    #[test]
    fn the_index_follows_discovery() {
        let (na, tx) = authorizer(mesh());
        let ztunnel_b = caller("istio-system", "ztunnel", Some(("ztunnel-b", "uid-zb")));
        let want = "spiffe://cluster.local/ns/shop/sa/product-service";
        assert_eq!(
            na.authorize(&ztunnel_b, want).unwrap_err().reason,
            "not_on_node"
        );
        let mut pods = mesh();
        pods.push(pod(
            "shop",
            "product-1",
            "uid-p1",
            "product-service",
            "node-b",
            "Running",
        ));
        tx.send_replace(Arc::new(MeshObjects {
            pods,
            ..Default::default()
        }));
        assert!(na.authorize(&ztunnel_b, want).is_ok());
        tx.send_replace(Arc::new(MeshObjects::default()));
        assert_eq!(
            na.authorize(&ztunnel_b, want).unwrap_err().reason,
            "caller_pod_not_found"
        );
    }

    #[test]
    fn requested_identity_reads_strings_only() {
        use prost_types::{value::Kind, Struct, Value};
        let with = |k: Kind| Struct {
            fields: [(
                IMPERSONATED_IDENTITY_KEY.to_owned(),
                Value { kind: Some(k) },
            )]
            .into(),
        };
        assert_eq!(requested_identity(None), None);
        assert_eq!(
            requested_identity(Some(&with(Kind::StringValue(
                "spiffe://a/ns/b/sa/c".into()
            )))),
            Some("spiffe://a/ns/b/sa/c")
        );
        assert_eq!(
            requested_identity(Some(&with(Kind::StringValue(String::new())))),
            None
        );
        assert_eq!(
            requested_identity(Some(&with(Kind::NumberValue(1.0)))),
            None
        );
    }
}
