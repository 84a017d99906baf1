//! The joins auto mTLS needs: a Service's ports through its EndpointSlices
//! (`kubernetes.io/service-name`, ports matched by name) to each endpoint and its pod, plus the
//! WorkloadEntries its selector picks; a ServiceEntry's inline endpoints, or the WorkloadEntries
//! and pods its `workloadSelector` picks. Indexed once per model, so 10,000 pods join in
//! linear time.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::{
    core::v1::{ObjectReference, Pod, Service, ServicePort},
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
    pub warnings: Vec<String>,
}

/// Lookups built once per model.
pub(crate) struct Index<'a> {
    /// By (cluster, namespace, name); cluster 0 is the primary, i + 1 is `objs.remotes[i]`.
    pods: HashMap<(usize, &'a str, &'a str), &'a Pod>,
    pods_by_ns: HashMap<&'a str, Vec<&'a Pod>>,
    /// By (cluster, IP): pods, for endpoints without a targetRef (`getPodsByIP`).
    pods_by_ip: HashMap<(usize, &'a str), Vec<&'a Pod>>,
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

/// `serviceentry/conversion.go` `getTLSModeFromWorkloadEntry`: the tlsMode label when present,
/// else `istio` when the entry names a service account (a VM running istio-agent), else
/// disabled. Used for ServiceEntry inline endpoints too.
fn entry_tls_mode(spec: &WorkloadEntrySpec) -> TlsMode {
    match spec.labels.get(TLS_MODE_LABEL).map(String::as_str) {
        Some("istio") => TlsMode::Istio,
        Some(_) => TlsMode::Disabled,
        None if spec
            .service_account
            .as_deref()
            .is_some_and(|s| !s.is_empty()) =>
        {
            TlsMode::Istio
        }
        None => TlsMode::Disabled,
    }
}

/// `pod.go` `IsPodReady` and `shouldPodBeInEndpoints`: the pod's Ready condition is True and it
/// is neither finished nor being deleted.
fn pod_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let terminal = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    ready && !terminal && pod.metadata.deletion_timestamp.is_none()
}

/// `pod.go` `getPortMap`: named TCP container ports, the first of a name wins (a port with no
/// protocol is TCP, the API server's default).
fn pod_port(pod: &Pod, name: &str) -> Option<u16> {
    let spec = pod.spec.as_ref()?;
    let native_sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    spec.containers
        .iter()
        .chain(native_sidecars)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            !name.is_empty()
                && p.name.as_deref() == Some(name)
                && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
        })
        .map(|p| p.container_port as u16)
}

impl<'a> Index<'a> {
    pub fn new(objs: &'a MeshObjects, primary: &'a str) -> Self {
        let mut idx = Self {
            pods: HashMap::new(),
            pods_by_ns: HashMap::new(),
            pods_by_ip: HashMap::new(),
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
                    // `pod.go` `PodCache`: only Ready pods are indexed by IP.
                    let by_ip = if pod_ready(p) { Some(p) } else { None };
                    for ip in by_ip
                        .into_iter()
                        .flat_map(|p| p.status.iter())
                        .flat_map(|s| {
                            s.pod_ip
                                .iter()
                                .chain(s.pod_ips.iter().flatten().map(|i| &i.ip))
                        })
                    {
                        let list = idx.pods_by_ip.entry((c, ip.as_str())).or_default();
                        if !list.iter().any(|x| std::ptr::eq(*x, p)) {
                            list.push(p);
                        }
                    }
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
            service_account: spec.service_account.clone().filter(|s| !s.is_empty()),
            tls_label: entry_tls_mode(spec),
            // A VM or other non-pod workload: its tlsMode is all there is to go on.
            runs_proxy: entry_tls_mode(spec) == TlsMode::Istio,
            network: spec.network.clone(),
            cluster: self.clusters[0].0.to_owned(),
            stale: false,
            warnings: Vec::new(),
        }
    }

    /// Every endpoint of `svc` on service port `sp` istiod serves: EndpointSlices, then the
    /// WorkloadEntries its selector picks (Istio's kube controller does the same for
    /// WorkloadEntries). What is left out, and why, goes to `skipped`.
    pub fn service_backends(
        &self,
        svc: &Service,
        sp: &ServicePort,
        skipped: &mut Vec<String>,
    ) -> Vec<Backend> {
        let (Some(name), Some(ns)) = (
            svc.metadata.name.as_deref(),
            svc.metadata.namespace.as_deref(),
        ) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (cluster, slice) in self.slices.get(&(ns, name)).into_iter().flatten() {
            self.slice_backends(*cluster, slice, ns, sp, skipped, &mut out);
        }
        self.selected_workload_entries(svc, sp, ns, &mut out);
        out
    }

    /// One EndpointSlice's endpoints on the service port `sp` (`updateEndpointCacheForSlice`),
    /// each matched to its pod as istiod's `getPod` does.
    fn slice_backends(
        &self,
        cluster: usize,
        slice: &EndpointSlice,
        ns: &str,
        sp: &ServicePort,
        skipped: &mut Vec<String>,
        out: &mut Vec<Backend>,
    ) {
        // `updateEndpointCacheForSlice`: FQDN slices are not supported.
        if slice.address_type == "FQDN" {
            return;
        }
        let Some(ep_port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or(""))
        else {
            return;
        };
        let port = ep_port.port.unwrap_or(sp.port) as u16;
        for endpoint in &slice.endpoints {
            // `endpointHealthStatus`: Ready unset counts as ready; an unready endpoint is
            // not sent (`filterIstioEndpoint`).
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            let target = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"));
            for address in &endpoint.addresses {
                match (self.slice_pod(cluster, target, address, ns), target) {
                    (Some(p), _) => {
                        out.push(self.pod_backend(p, address.clone(), port, ready, cluster))
                    }
                    (None, Some(r)) => skipped.push(format!(
                        "pod {}.{} ({address}) is named by the EndpointSlice but not in the input: not served (istiod waits for the pod)",
                        r.name.as_deref().unwrap_or(""),
                        r.namespace.as_deref().unwrap_or("")
                    )),
                    (None, None) => {
                        let mut b = self.entry_backend(
                            &WorkloadEntrySpec::default(),
                            format!("endpoint {address} (no pod)"),
                            ns,
                            port,
                        );
                        b.address = address.clone();
                        b.ready = ready;
                        b.cluster = self.clusters[cluster].0.to_owned();
                        b.stale = self.clusters[cluster].1;
                        out.push(b);
                    }
                }
            }
        }
    }

    /// `endpointslice.go` `getPod`: by targetRef when it names a pod, else the pod of the
    /// slice's namespace with this IP (`getPodsByIP`).
    fn slice_pod(
        &self,
        cluster: usize,
        target: Option<&ObjectReference>,
        address: &str,
        ns: &str,
    ) -> Option<&'a Pod> {
        match target {
            Some(r) => self
                .pods
                .get(&(
                    cluster,
                    r.namespace.as_deref().unwrap_or(""),
                    r.name.as_deref().unwrap_or(""),
                ))
                .copied(),
            None => self
                .pods_by_ip
                .get(&(cluster, address))
                .and_then(|ps| {
                    ps.iter()
                        .find(|p| p.metadata.namespace.as_deref() == Some(ns))
                })
                .copied(),
        }
    }

    /// WorkloadEntries of the namespace that the Service's selector selects.
    fn selected_workload_entries(
        &self,
        svc: &Service,
        sp: &ServicePort,
        ns: &str,
        out: &mut Vec<Backend>,
    ) {
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
    }

    /// Every endpoint of a ServiceEntry port: inline endpoints, else what its
    /// `workloadSelector` picks (WorkloadEntries and pods of its namespace), else for DNS the
    /// host itself.
    pub fn service_entry_backends(
        &self,
        se: &ServiceEntry,
        p: &ServiceEntryPort,
        host: &str,
        skipped: &mut Vec<String>,
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
                let (true, Some(ip)) = (selects(&sel.labels, &labels), ip) else {
                    continue;
                };
                if !pod_ready(pod) {
                    skipped.push(format!(
                        "pod {}.{ns} is selected but not Ready: not an endpoint (istiod selects Ready pods only)",
                        pod.metadata.name.as_deref().unwrap_or("")
                    ));
                    continue;
                }
                // `convertWorkloadInstanceToServiceInstance`: the pod's container port of the
                // ServiceEntry port's name, else targetPort, else the port number.
                let port = pod_port(pod, &p.name).unwrap_or_else(|| target(&BTreeMap::new()));
                out.push(self.pod_backend(pod, ip, port, true, 0));
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
