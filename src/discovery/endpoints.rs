//! Endpoints per Envoy cluster (`outbound|<port>|<subset>|<fqdn>`), with each endpoint's
//! tlsMode as the plan decided it: what EDS serves. Like istiod, which builds EDS per proxy
//! (`EndpointBuilder` takes the proxy's `SidecarScope.DestinationRule`), the metadata depends on
//! the client: computed once per model change for a client that only sees rules exported
//! everywhere, and again, for the clusters that differ, for each class of clients whose
//! namespace (and labels, where rules carry a `workloadSelector`) gives them other rules.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde::Serialize;

use super::{
    plan::{Client, ClusterPlan, Planner},
    proof::{NoProofs, ProofLookup, ProxyProof},
    sidecar_of, MeshObjects, MeshSettings, TlsMode,
};

/// One endpoint of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointEntry {
    pub address: String,
    pub port: u16,
    pub ready: bool,
    /// The decision's EDS metadata: `istio` endpoints get the transport-socket-match metadata.
    pub tls_mode: TlsMode,
    /// The Kubernetes cluster the endpoint comes from (EDS: its locality's sub-zone).
    pub cluster: String,
    /// The WorkloadEntry's network, if any.
    pub network: Option<String>,
    /// Its cluster's API server cannot be reached: the last known endpoint, kept and marked.
    pub stale: bool,
}

/// The cluster name Istio gives a service port.
pub fn cluster_name(port: u16, fqdn: &str) -> String {
    format!("outbound|{port}||{fqdn}")
}

/// Counts for the discovery metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DiscoveryStats {
    pub endpoints_istio: usize,
    pub endpoints_disabled: usize,
    /// Per namespace: the share of pods that carry a sidecar.
    pub mtls_coverage: BTreeMap<String, f64>,
    /// Pods whose label disagrees with what they run.
    pub sidecar_mismatches: usize,
    /// Pods labelled tlsMode=istio whose proxy never fetched a certificate (only counted when
    /// meshid knows the proxies: the server's registry).
    pub declared_without_proxy: usize,
}

/// Everything EDS and the metrics need from one model.
#[derive(Clone, Debug, Default)]
pub struct DiscoveryView {
    pub clusters: BTreeMap<String, Vec<EndpointEntry>>,
    /// Clusters visible only in some namespaces (a ServiceEntry's `exportTo`): (own
    /// namespace, exportTo).
    pub export_to: BTreeMap<String, (String, Vec<String>)>,
    pub stats: DiscoveryStats,
    /// Per client namespace with rules of its own (or named by an `exportTo`): the class of
    /// each pod, and of a client whose pod is not known.
    classes: BTreeMap<String, NamespaceClasses>,
    /// Per class: clusters whose endpoints differ from `clusters` (`None`: not this client's).
    overrides: Vec<BTreeMap<String, Option<Vec<EndpointEntry>>>>,
}

#[derive(Clone, Debug, Default)]
struct NamespaceClasses {
    by_pod: HashMap<String, usize>,
    other: usize,
}

fn entries(
    plan: &ClusterPlan,
    silent: &mut std::collections::BTreeSet<String>,
) -> Vec<EndpointEntry> {
    let mut out: Vec<EndpointEntry> = plan
        .endpoints
        .iter()
        .map(|e| {
            if e.backend.tls_label == TlsMode::Istio && e.proof == ProxyProof::Never {
                silent.insert(e.backend.workload.clone());
            }
            EndpointEntry {
                address: e.backend.address.clone(),
                port: e.backend.port,
                ready: e.backend.ready,
                tls_mode: e.eds_tls_mode,
                cluster: e.backend.cluster.clone(),
                network: e.backend.network.clone(),
                stale: e.backend.stale,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.cluster, &a.address, a.port).cmp(&(&b.cluster, &b.address, b.port)));
    out
}

impl DiscoveryView {
    /// Whether a stream of a workload in `namespace` may see `cluster` (`exportTo`).
    pub fn visible_to(&self, cluster: &str, namespace: &str) -> bool {
        self.export_to
            .get(cluster)
            .is_none_or(|(own, to)| super::istio::exported_to(to, own, namespace))
    }

    /// Builds the view of `objs`, with no knowledge of proxies.
    pub fn build(objs: &MeshObjects, s: &MeshSettings) -> Arc<Self> {
        Self::build_with(objs, s, &NoProofs)
    }

    /// The endpoints of `cluster` as a client in `namespace` (pod `pod`, if the token named
    /// it) gets them: its own rules' answer where they differ, else the shared one.
    pub fn endpoints_for(
        &self,
        cluster: &str,
        namespace: &str,
        pod: Option<&str>,
    ) -> Option<&Vec<EndpointEntry>> {
        let class = self.classes.get(namespace).map(|c| {
            pod.and_then(|p| c.by_pod.get(p))
                .copied()
                .unwrap_or(c.other)
        });
        match class.and_then(|i| self.overrides[i].get(cluster)) {
            Some(own) => own.as_ref(),
            None => self.clusters.get(cluster),
        }
    }

    /// Builds the view of `objs`, with the proxies `proofs` knows.
    pub fn build_with(objs: &MeshObjects, s: &MeshSettings, proofs: &dyn ProofLookup) -> Arc<Self> {
        let planner = Planner::new(objs, s, proofs);
        let base = Client::anywhere();
        let mut clusters = BTreeMap::new();
        let mut silent = std::collections::BTreeSet::new();
        let mut export_to = BTreeMap::new();
        for plan in planner.all(Some(&base)) {
            if !plan.served_by_eds {
                continue;
            }
            if !plan.export_to.1.is_empty() {
                export_to.insert(plan.name.clone(), plan.export_to.clone());
            }
            clusters.insert(plan.name.clone(), entries(&plan, &mut silent));
        }
        let (classes, overrides) = client_classes(objs, &planner, &base, &mut silent);
        let mut stats = stats(objs, &clusters);
        stats.declared_without_proxy = silent.len();
        Arc::new(Self {
            clusters,
            export_to,
            stats,
            classes,
            overrides,
        })
    }
}

type Overrides = Vec<BTreeMap<String, Option<Vec<EndpointEntry>>>>;

/// The clients whose DestinationRules differ from `base`'s (`RuleIndex::special_namespaces`),
/// grouped by the selector-bearing rules that select them, each with its differing clusters.
fn client_classes(
    objs: &MeshObjects,
    planner: &Planner<'_>,
    base: &Client,
    silent: &mut std::collections::BTreeSet<String>,
) -> (BTreeMap<String, NamespaceClasses>, Overrides) {
    let mut classes = BTreeMap::new();
    let mut overrides: Overrides = Vec::new();
    for ns in &planner.rules.special_namespaces {
        let selectors = planner.rules.selector_namespaces.get(ns);
        let key = |labels: &BTreeMap<String, String>| -> Vec<usize> {
            selectors
                .into_iter()
                .flatten()
                .enumerate()
                .filter(|(_, sel)| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
                .map(|(i, _)| i)
                .collect()
        };
        let mut by_key: BTreeMap<Vec<usize>, usize> = BTreeMap::new();
        let mut class_of = |labels: &BTreeMap<String, String>, overrides: &mut Overrides| {
            let k = key(labels);
            if let Some(i) = by_key.get(&k) {
                return *i;
            }
            let client = Client {
                name: String::new(),
                namespace: ns.clone(),
                labels: labels.clone(),
                sidecar: true,
            };
            let (plans, replaced) = planner.differing(&client, base);
            let mut own: BTreeMap<String, Option<Vec<EndpointEntry>>> =
                replaced.into_iter().map(|n| (n, None)).collect();
            for plan in plans.iter().filter(|p| p.served_by_eds) {
                own.insert(plan.name.clone(), Some(entries(plan, silent)));
            }
            overrides.push(own);
            by_key.insert(k, overrides.len() - 1);
            overrides.len() - 1
        };
        let mut c = NamespaceClasses {
            other: class_of(&BTreeMap::new(), &mut overrides),
            ..Default::default()
        };
        if selectors.is_some() {
            for p in objs
                .pods
                .iter()
                .filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()))
            {
                let labels = p.metadata.labels.clone().unwrap_or_default();
                let i = class_of(&labels, &mut overrides);
                c.by_pod
                    .insert(p.metadata.name.clone().unwrap_or_default(), i);
            }
        }
        classes.insert(ns.clone(), c);
    }
    (classes, overrides)
}

fn stats(objs: &MeshObjects, clusters: &BTreeMap<String, Vec<EndpointEntry>>) -> DiscoveryStats {
    let mut st = DiscoveryStats::default();
    // Subset clusters repeat their service's endpoints: count the service clusters only.
    for (_, entries) in clusters.iter().filter(|(n, _)| n.contains("||")) {
        for e in entries {
            match e.tls_mode {
                TlsMode::Istio => st.endpoints_istio += 1,
                TlsMode::Disabled => st.endpoints_disabled += 1,
            }
        }
    }
    let mut per_ns: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for p in &objs.pods {
        let info = sidecar_of(p);
        let e = per_ns
            .entry(p.metadata.namespace.clone().unwrap_or_default())
            .or_default();
        e.1 += 1;
        if info.tls_mode == TlsMode::Istio {
            e.0 += 1;
        }
        if !info.warnings.is_empty() {
            st.sidecar_mismatches += 1;
        }
    }
    st.mtls_coverage = per_ns
        .into_iter()
        .map(|(ns, (with, all))| (ns, with as f64 / all as f64))
        .collect();
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::plan::plan_all;

    /// A watch can deliver an EndpointSlice before the pod it names (seen on a real API server
    /// after a relist): EDS leaves that endpoint out until the pod is known, as istiod's
    /// `endpointslice.go` `getPod` does, instead of serving a sidecar's endpoint as plaintext;
    /// `describe` still shows it, with why.
    #[test]
    fn an_endpoint_whose_pod_is_not_known_yet_is_left_out_of_eds() {
        let yaml = br#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
  spec:
    selector: {app: web}
    ports: [{name: http, port: 8080}]
- apiVersion: v1
  kind: Pod
  metadata:
    name: web-0
    namespace: shop
    labels: {app: web, security.istio.io/tlsMode: istio}
  spec: {containers: [{name: app, image: app}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: web-1
    namespace: shop
    labels: {kubernetes.io/service-name: web}
  addressType: IPv4
  ports: [{name: http, port: 8080}]
  endpoints:
  - addresses: [10.0.0.1]
    targetRef: {kind: Pod, name: web-0, namespace: shop}
  - addresses: [10.0.0.2]
    targetRef: {kind: Pod, name: web-1, namespace: shop}
  - addresses: [10.0.0.3]
"#;
        let objs = MeshObjects::from_snapshot(yaml).unwrap();
        let s = MeshSettings::default();
        let view = DiscoveryView::build(&objs, &s);
        let served: Vec<(&str, TlsMode)> = view.clusters
            ["outbound|8080||web.shop.svc.cluster.local"]
            .iter()
            .map(|e| (e.address.as_str(), e.tls_mode))
            .collect();
        assert_eq!(
            served,
            [
                ("10.0.0.1", TlsMode::Istio),
                ("10.0.0.3", TlsMode::Disabled)
            ],
            "the endpoint of the unknown pod web-1 is left out; one naming no pod is served"
        );
        let plan = plan_all(&objs, &s, &NoProofs)
            .into_iter()
            .find(|p| p.name == "outbound|8080||web.shop.svc.cluster.local")
            .unwrap();
        assert!(
            plan.warnings.iter().any(
                |w| w.contains("(10.0.0.2) is named by the EndpointSlice but not in the input")
            ),
            "describe says why it is left out: {:?}",
            plan.warnings
        );
    }
}
