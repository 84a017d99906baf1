//! The joins auto mTLS needs: a Service's ports through its EndpointSlices
//! (`kubernetes.io/service-name`, ports matched by name) to each endpoint and its pod, plus the
//! WorkloadEntries its selector picks; a ServiceEntry's inline endpoints, or the WorkloadEntries
//! and pods its `workloadSelector` picks. Indexed once per model, so 10,000 pods join in
//! linear time.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::{
    core::v1::{Pod, Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use serde::Serialize;

use super::{
    istio::{ServiceEntry, ServiceEntryPort, WorkloadEntry, WorkloadEntrySpec},
    sidecar_of, MeshObjects, TlsMode, TLS_MODE_LABEL,
};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The pod an endpoint names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodKey {
    pub name: String,
    pub uid: Option<String>,
}

/// One endpoint (address and target port) of a service port, with what decides its TLS.
#[derive(Clone, Debug, Serialize)]
pub struct Backend {
    pub address: String,
    /// The endpoint (target) port.
    pub port: u16,
    pub ready: bool,
    /// `pod NAME.NS`, `workloadentry NAME.NS`, `serviceentry NAME.NS` (inline endpoint) or
    /// `dns HOST` (a DNS ServiceEntry without endpoints).
    pub workload: String,
    #[serde(skip)]
    pub pod: Option<PodKey>,
    pub namespace: String,
    #[serde(skip)]
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    /// The `security.istio.io/tlsMode` label: Istio's decision input.
    pub tls_label: TlsMode,
    /// Whether the pod runs `istio-proxy` (or carries the injection annotation).
    pub runs_proxy: bool,
    pub network: Option<String>,
    /// The Kubernetes cluster the endpoint comes from.
    pub cluster: String,
    /// Its cluster's API server cannot be reached: this is the last known endpoint.
    pub stale: bool,
    /// The endpoint names a Pod (targetRef) that the model does not have (yet: a watch can
    /// deliver the EndpointSlice before the pod). EDS leaves it out until the pod is known, as
    /// istiod does (`endpointslice.go` `getPod`: `expectPod` without a pod skips the endpoint
    /// and `registerEndpointResync` adds it when the pod arrives); otherwise a sidecar's
    /// endpoint would be served without its tlsMode and its clients would pick plaintext.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pod_pending: bool,
    pub warnings: Vec<String>,
}

/// Lookups built once per model.
pub(crate) struct Index<'a> {
    /// By (cluster, namespace, name); cluster 0 is the primary, i + 1 is `objs.remotes[i]`.
    pods: HashMap<(usize, &'a str, &'a str), &'a Pod>,
    pods_by_ns: HashMap<&'a str, Vec<&'a Pod>>,
    slices: HashMap<(&'a str, &'a str), Vec<(usize, &'a EndpointSlice)>>,
    workload_entries: HashMap<&'a str, Vec<&'a WorkloadEntry>>,
    /// (name, stale) per cluster index.
    clusters: Vec<(&'a str, bool)>,
    /// Every Service by (namespace, name), first seen (the primary's first).
    pub services: Vec<&'a Service>,
}

fn selects(sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn label_mode(labels: &BTreeMap<String, String>) -> TlsMode {
    match labels.get(TLS_MODE_LABEL).map(String::as_str) {
        Some("istio") => TlsMode::Istio,
        _ => TlsMode::Disabled,
    }
}

impl<'a> Index<'a> {
    pub fn new(objs: &'a MeshObjects, primary: &'a str) -> Self {
        let mut idx = Self {
            pods: HashMap::new(),
            pods_by_ns: HashMap::new(),
            slices: HashMap::new(),
            workload_entries: HashMap::new(),
            clusters: vec![(primary, false)],
            services: Vec::new(),
        };
        let mut sets = vec![(0, &objs.pods, &objs.endpoint_slices, &objs.services)];
        for (i, r) in objs.remotes.iter().enumerate() {
            idx.clusters.push((r.name.as_str(), r.stale));
            sets.push((i + 1, &r.pods, &r.endpoint_slices, &r.services));
        }
        let mut seen = std::collections::HashSet::new();
        for (c, pods, slices, services) in sets {
            for p in pods {
                if let (Some(n), Some(ns)) =
                    (p.metadata.name.as_deref(), p.metadata.namespace.as_deref())
                {
                    idx.pods.insert((c, ns, n), p);
                    if c == 0 {
                        idx.pods_by_ns.entry(ns).or_default().push(p);
                    }
                }
            }
            for e in slices {
                let svc = e
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL));
                if let (Some(ns), Some(svc)) = (e.metadata.namespace.as_deref(), svc) {
                    idx.slices
                        .entry((ns, svc.as_str()))
                        .or_default()
                        .push((c, e));
                }
            }
            // One service per hostname, merged across clusters (Istio's rule).
            for svc in services {
                let key = (
                    svc.metadata.namespace.as_deref(),
                    svc.metadata.name.as_deref(),
                );
                if seen.insert(key) {
                    idx.services.push(svc);
                }
            }
        }
        for w in &objs.workload_entries {
            if let Some(ns) = w.metadata.namespace.as_deref() {
                idx.workload_entries.entry(ns).or_default().push(w);
            }
        }
        idx
    }

    fn pod_backend(
        &self,
        pod: &Pod,
        address: String,
        port: u16,
        ready: bool,
        cluster: usize,
    ) -> Backend {
        let info = sidecar_of(pod);
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        Backend {
            address,
            port,
            ready,
            workload: format!("pod {name}.{ns}"),
            warnings: info
                .warnings
                .iter()
                .map(|w| format!("pod {name}.{ns} {w}"))
                .collect(),
            pod: Some(PodKey {
                name,
                uid: pod.metadata.uid.clone(),
            }),
            namespace: ns,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            service_account: Some(
                pod.spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into()),
            ),
            tls_label: info.tls_mode,
            runs_proxy: info.runs_proxy,
            network: None,
            cluster: self.clusters[cluster].0.to_owned(),
            stale: self.clusters[cluster].1,
            pod_pending: false,
        }
    }

    fn entry_backend(
        &self,
        spec: &WorkloadEntrySpec,
        workload: String,
        ns: &str,
        port: u16,
    ) -> Backend {
        Backend {
            address: spec.address.clone(),
            port,
            ready: true,
            workload,
            pod: None,
            namespace: ns.to_owned(),
            labels: spec.labels.clone(),
            service_account: spec.service_account.clone(),
            tls_label: label_mode(&spec.labels),
            runs_proxy: false,
            network: spec.network.clone(),
            cluster: self.clusters[0].0.to_owned(),
            stale: false,
            pod_pending: false,
            warnings: Vec::new(),
        }
    }

    /// Every endpoint of `svc` on service port `sp`: EndpointSlices, then the WorkloadEntries
    /// its selector picks (Istio's kube controller does the same for WorkloadEntries).
    pub fn service_backends(&self, svc: &Service, sp: &ServicePort) -> Vec<Backend> {
        let (Some(name), Some(ns)) = (
            svc.metadata.name.as_deref(),
            svc.metadata.namespace.as_deref(),
        ) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (cluster, slice) in self.slices.get(&(ns, name)).into_iter().flatten() {
            let Some(ep_port) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or(""))
            else {
                continue;
            };
            let port = ep_port.port.unwrap_or(sp.port) as u16;
            for endpoint in &slice.endpoints {
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                let pod_ref = endpoint
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        Some((
                            r.name.clone()?,
                            r.namespace.clone().unwrap_or_else(|| ns.into()),
                        ))
                    });
                let pod = pod_ref
                    .as_ref()
                    .and_then(|(pn, pns)| self.pods.get(&(*cluster, pns.as_str(), pn.as_str())));
                for address in &endpoint.addresses {
                    out.push(match (pod, &pod_ref) {
                        (Some(p), _) => self.pod_backend(p, address.clone(), port, ready, *cluster),
                        (None, named) => {
                            let mut b = self.entry_backend(
                                &WorkloadEntrySpec::default(),
                                named
                                    .as_ref()
                                    .map_or("(no pod)".into(), |(n, s)| format!("pod {n}.{s}")),
                                ns,
                                port,
                            );
                            b.address = address.clone();
                            b.ready = ready;
                            b.cluster = self.clusters[*cluster].0.to_owned();
                            b.stale = self.clusters[*cluster].1;
                            if let Some((n, s)) = named {
                                b.pod_pending = true;
                                b.warnings.push(format!(
                                    "pod {n}.{s} is not in the input: EDS leaves this endpoint out until it is (as istiod does)"
                                ));
                            }
                            b
                        }
                    });
                }
            }
        }
        let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
        if let Some(sel) = selector {
            for we in self.workload_entries.get(ns).into_iter().flatten() {
                if !selects(sel, &we.spec.labels) {
                    continue;
                }
                use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
                let target = match &sp.target_port {
                    Some(IntOrString::Int(p)) => Some(*p as u16),
                    _ => None,
                };
                let port = sp
                    .name
                    .as_ref()
                    .and_then(|n| we.spec.ports.get(n))
                    .map(|p| *p as u16)
                    .or(target)
                    .unwrap_or(sp.port as u16);
                out.push(self.entry_backend(
                    &we.spec,
                    format!(
                        "workloadentry {}.{ns}",
                        we.metadata.name.as_deref().unwrap_or("")
                    ),
                    ns,
                    port,
                ));
            }
        }
        out
    }

    /// Every endpoint of a ServiceEntry port: inline endpoints, else what its
    /// `workloadSelector` picks (WorkloadEntries and pods of its namespace), else for DNS the
    /// host itself.
    pub fn service_entry_backends(
        &self,
        se: &ServiceEntry,
        p: &ServiceEntryPort,
        host: &str,
    ) -> Vec<Backend> {
        let ns = se.metadata.namespace.as_deref().unwrap_or("");
        let se_name = se.metadata.name.as_deref().unwrap_or("");
        let target = |ports: &BTreeMap<String, u32>| -> u16 {
            ports
                .get(&p.name)
                .copied()
                .or(p.target_port)
                .unwrap_or(p.number) as u16
        };
        let mut out: Vec<Backend> = se
            .spec
            .endpoints
            .iter()
            .map(|e| {
                self.entry_backend(
                    e,
                    format!("serviceentry {se_name}.{ns}"),
                    ns,
                    target(&e.ports),
                )
            })
            .collect();
        if let Some(sel) = &se.spec.workload_selector {
            for we in self.workload_entries.get(ns).into_iter().flatten() {
                if selects(&sel.labels, &we.spec.labels) {
                    out.push(self.entry_backend(
                        &we.spec,
                        format!(
                            "workloadentry {}.{ns}",
                            we.metadata.name.as_deref().unwrap_or("")
                        ),
                        ns,
                        target(&we.spec.ports),
                    ));
                }
            }
            for pod in self.pods_by_ns.get(ns).into_iter().flatten() {
                let labels = pod.metadata.labels.clone().unwrap_or_default();
                let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
                if let (true, Some(ip)) = (selects(&sel.labels, &labels), ip) {
                    out.push(self.pod_backend(pod, ip, target(&BTreeMap::new()), true, 0));
                }
            }
        }
        if out.is_empty() && se.resolution().starts_with("DNS") && !host.starts_with('*') {
            let mut b = self.entry_backend(
                &WorkloadEntrySpec::default(),
                format!("dns {host}"),
                ns,
                p.number as u16,
            );
            b.address = host.to_owned();
            out.push(b);
        }
        out
    }
}
