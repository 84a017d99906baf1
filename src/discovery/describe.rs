//! `describe`: for a service (or a pod), every endpoint with its sidecar (as declared and as
//! proven by its proxy), the PeerAuthentication in force, the DestinationRule TLS, and the
//! decision with its reason and the side that made it; next to it, what an Istio sidecar fed
//! by istiod would do. Everything comes from the plans EDS serves (`plan.rs`).

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

use super::{
    decide::ClusterTls,
    plan::{
        plan_named, plan_named_for, visible, Client, ClusterPlan, DrRef, EndpointPlan, Mesh,
        Verdict,
    },
    proof::{NoProofs, ProofLookup, ProxyProof},
    sidecar_of, Decision, DiscoveryError, MeshObjects, MeshSettings, PeerAuthResolution, TlsMode,
};
use crate::discovery::resolve_peer_auth;

/// One endpoint on one service port.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointReport {
    pub address: String,
    /// The endpoint (target) port.
    pub port: u16,
    pub service_port: u16,
    /// `name.namespace` of the backing pod, if the endpoint names one.
    pub pod: Option<String>,
    /// What backs the endpoint: `pod N.NS`, `workloadentry N.NS`, `serviceentry N.NS`, `dns HOST`.
    pub workload: String,
    pub network: Option<String>,
    /// The Kubernetes cluster it comes from.
    pub cluster: String,
    /// Its cluster's API server cannot be reached: the last known endpoint.
    pub stale: bool,
    pub ready: bool,
    /// Whether meshid treats the endpoint as having a sidecar.
    pub sidecar: bool,
    /// "proxy connected since T", "declared (tlsMode=istio) but no proxy has fetched a
    /// certificate", "no sidecar", ...
    pub sidecar_state: String,
    pub proof: ProxyProof,
    /// The `security.istio.io/tlsMode` label.
    pub tls_mode: TlsMode,
    /// The EDS metadata meshid serves for it.
    pub eds_tls_mode: TlsMode,
    pub peer_authentication: PeerAuthResolution,
    pub decision: Decision,
    pub why: String,
    /// "cluster", "endpoint" or "client".
    pub decided_by: &'static str,
    /// What an Istio sidecar fed by istiod would do.
    pub istio: Verdict,
    pub warnings: Vec<String>,
}

/// One Envoy cluster of the service.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterReport {
    pub name: String,
    pub port: u16,
    pub subset: Option<String>,
    pub served_by_eds: bool,
    pub tls: ClusterTls,
    pub tls_why: String,
    pub istio_tls: ClusterTls,
    pub istio_tls_why: String,
    /// Addresses of the subset's endpoints (every endpoint for the service cluster).
    pub endpoints: Vec<String>,
}

/// Counts by decision.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub mtls: usize,
    pub plaintext: usize,
    pub tls: usize,
    pub will_fail: usize,
}

/// A client of the service and how it reaches it (`describe service --clients`).
#[derive(Clone, Debug, Serialize)]
pub struct ClientReport {
    pub pod: String,
    pub sidecar: bool,
    /// "mTLS", "plaintext", "mixed (2 mTLS, 1 plaintext)", "will fail (n of m endpoints)".
    pub reaches_with: String,
    pub summary: Summary,
}

/// What `meshid describe service` reports.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceReport {
    pub service: String,
    /// "Service" or "ServiceEntry".
    pub kind: &'static str,
    pub fqdn: String,
    pub mesh_external: bool,
    pub headless: bool,
    pub resolution: String,
    pub auto_mtls: bool,
    /// Who the decisions are for.
    pub client: String,
    /// The namespace-level PeerAuthentication (workloads may override it; see each endpoint).
    pub namespace_peer_authentication: PeerAuthResolution,
    pub destination_rule: Option<DrRef>,
    pub clusters: Vec<ClusterReport>,
    /// The endpoints of the service's clusters (subsets listed in `clusters`).
    pub endpoints: Vec<EndpointReport>,
    pub summary: Summary,
    /// Endpoints where Istio's data plane would do otherwise than meshid's.
    pub istio_differs: usize,
    pub clients: Vec<ClientReport>,
    pub warnings: Vec<String>,
    /// Fields of the input that can change a decision and that meshid does not model.
    pub ignored: Vec<String>,
}

/// What `meshid describe pod` reports.
#[derive(Clone, Debug, Serialize)]
pub struct PodReport {
    pub pod: String,
    pub service_account: String,
    pub sidecar: super::SidecarInfo,
    /// PeerAuthentication per container port (`None` port: the workload level).
    pub peer_authentication: Vec<(Option<u16>, PeerAuthResolution)>,
    /// Each service selecting the pod, with only this pod's endpoints.
    pub services: Vec<ServiceReport>,
}

fn split(name: &str) -> Result<(&str, &str), DiscoveryError> {
    name.split_once('.')
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| DiscoveryError::BadName(name.into()))
}

fn meta_name(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}.{}",
        m.name.as_deref().unwrap_or(""),
        m.namespace.as_deref().unwrap_or("")
    )
}

fn find_pod<'a>(objs: &'a MeshObjects, name: &str, ns: &str) -> Option<&'a Pod> {
    objs.pods.iter().find(|p| {
        p.metadata.name.as_deref() == Some(name) && p.metadata.namespace.as_deref() == Some(ns)
    })
}

fn client_of(objs: &MeshObjects, c: &str) -> Result<Client, DiscoveryError> {
    let (cn, cns) = split(c)?;
    let pod = find_pod(objs, cn, cns).ok_or_else(|| DiscoveryError::NotFound {
        what: "client pod",
        name: c.into(),
        known: vec![],
    })?;
    Ok(Client {
        name: c.to_owned(),
        namespace: cns.to_owned(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        sidecar: sidecar_of(pod).tls_mode == TlsMode::Istio,
    })
}

/// Describes `name.namespace` (a Service, or a ServiceEntry by `name.ns` or host) for a client
/// with a sidecar, or for `client` (`pod.namespace`), with no knowledge of proxies.
pub fn describe_service(
    objs: &MeshObjects,
    s: &MeshSettings,
    name: &str,
    client: Option<&str>,
) -> Result<ServiceReport, DiscoveryError> {
    describe_service_with(objs, s, &NoProofs, name, client, false)
}

/// As `describe_service`, with the proxies `proofs` knows; `clients` lists every pod of the
/// input as a client and how it reaches the service.
pub fn describe_service_with(
    objs: &MeshObjects,
    s: &MeshSettings,
    proofs: &dyn ProofLookup,
    name: &str,
    client: Option<&str>,
    clients: bool,
) -> Result<ServiceReport, DiscoveryError> {
    let not_found = || DiscoveryError::NotFound {
        what: "service",
        name: name.into(),
        known: objs
            .services
            .iter()
            .map(|x| meta_name(&x.metadata))
            .chain(objs.service_entries.iter().map(|x| meta_name(&x.metadata)))
            .collect(),
    };
    if !name.contains('.') {
        return Err(DiscoveryError::BadName(name.into()));
    }
    let c = client.map(|c| client_of(objs, c)).transpose()?;
    let plans = plan_named(objs, s, proofs, name, c.as_ref()).ok_or_else(not_found)?;
    let mut report = build_report(objs, s, &plans, c.as_ref(), None);
    if let Some(se) = objs.service_entries.iter().find(|se| {
        meta_name(&se.metadata) == name
            || plans
                .first()
                .is_some_and(|p| se.spec.hosts.iter().any(|h| h == &p.fqdn))
    }) {
        let ns = se.metadata.namespace.as_deref().unwrap_or("");
        if !visible(&se.spec.export_to, ns, c.as_ref()) {
            report.warnings.push(format!(
                "the ServiceEntry is not exported to namespace {} (exportTo {:?}): this client does not see it",
                c.as_ref().map_or("", |c| c.namespace.as_str()),
                se.spec.export_to
            ));
        }
    }
    if clients {
        report.clients = client_reports(objs, s, proofs, name)?;
    }
    Ok(report)
}

fn client_reports(
    objs: &MeshObjects,
    s: &MeshSettings,
    proofs: &dyn ProofLookup,
    name: &str,
) -> Result<Vec<ClientReport>, DiscoveryError> {
    let clients = objs
        .pods
        .iter()
        .map(|p| client_of(objs, &meta_name(&p.metadata)))
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<Option<&Client>> = clients.iter().map(Some).collect();
    let Some(per_client) = plan_named_for(objs, s, proofs, name, &refs) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (c, plans) in clients.iter().zip(per_client) {
        let r = build_report(objs, s, &plans, Some(c), None);
        let sm = &r.summary;
        let total = sm.mtls + sm.plaintext + sm.tls + sm.will_fail;
        let reaches_with = if sm.will_fail > 0 {
            format!("will fail ({} of {total} endpoints)", sm.will_fail)
        } else if sm.mtls == total && total > 0 {
            "mTLS".into()
        } else if sm.plaintext == total && total > 0 {
            "plaintext".into()
        } else if total == 0 {
            "no endpoints".into()
        } else {
            format!(
                "mixed ({} mTLS, {} plaintext, {} TLS)",
                sm.mtls, sm.plaintext, sm.tls
            )
        };
        out.push(ClientReport {
            pod: c.name.clone(),
            sidecar: c.sidecar,
            reaches_with,
            summary: r.summary,
        });
    }
    Ok(out)
}

fn endpoint_report(plan: &ClusterPlan, e: &EndpointPlan, client_sidecar: bool) -> EndpointReport {
    let v = plan.verdict(e, Mesh::Meshid, client_sidecar);
    let istio = plan.verdict(e, Mesh::Istio, client_sidecar);
    let b = &e.backend;
    EndpointReport {
        address: b.address.clone(),
        port: b.port,
        service_port: plan.port,
        pod: b
            .pod
            .as_ref()
            .map(|p| format!("{}.{}", p.name, b.namespace)),
        workload: b.workload.clone(),
        network: b.network.clone(),
        cluster: b.cluster.clone(),
        stale: b.stale,
        ready: b.ready,
        sidecar: e.sidecar,
        sidecar_state: e.sidecar_state(),
        proof: e.proof.clone(),
        tls_mode: b.tls_label,
        eds_tls_mode: e.eds_tls_mode,
        peer_authentication: e.peer_authentication.clone(),
        decision: v.decision,
        why: v.why,
        decided_by: v.decided_by,
        istio,
        warnings: e.warnings.clone(),
    }
}

fn build_report(
    objs: &MeshObjects,
    s: &MeshSettings,
    plans: &[ClusterPlan],
    client: Option<&Client>,
    only_pod: Option<&str>,
) -> ServiceReport {
    let first = &plans[0];
    let client_sidecar = client.is_none_or(|c| c.sidecar);
    let ns = first.service.split_once('.').map_or("", |x| x.1);
    let mut warnings: Vec<String> = Vec::new();
    let mut endpoints = Vec::new();
    let mut clusters = Vec::new();
    for plan in plans {
        for w in &plan.warnings {
            if !warnings.contains(w) && (only_pod.is_none() || !w.starts_with("no endpoints")) {
                warnings.push(w.clone());
            }
        }
        clusters.push(cluster_report(plan));
        if plan.subset.is_some() {
            continue;
        }
        for e in &plan.endpoints {
            if only_pod.is_some_and(|p| e.backend.workload != format!("pod {p}")) {
                continue;
            }
            endpoints.push(endpoint_report(plan, e, client_sidecar));
        }
    }
    let summary = Summary::of(&endpoints);
    let client_label = client_label(client, ns);
    ServiceReport {
        service: first.service.clone(),
        kind: first.kind,
        fqdn: first.fqdn.clone(),
        mesh_external: first.mesh_external,
        headless: first.passthrough,
        resolution: first.resolution.clone(),
        auto_mtls: s.auto_mtls,
        client: client_label,
        namespace_peer_authentication: resolve_peer_auth(
            &objs.peer_authentications,
            &s.root_namespace,
            ns,
            &Default::default(),
            None,
        ),
        destination_rule: first.destination_rule.clone(),
        clusters,
        istio_differs: endpoints
            .iter()
            .filter(|e| e.istio.decision != e.decision)
            .count(),
        endpoints,
        summary,
        clients: Vec::new(),
        warnings,
        ignored: super::ignored_fields(objs),
    }
}

fn cluster_report(plan: &ClusterPlan) -> ClusterReport {
    ClusterReport {
        name: plan.name.clone(),
        port: plan.port,
        subset: plan.subset.clone(),
        served_by_eds: plan.served_by_eds,
        tls: plan.tls,
        tls_why: plan.tls_why.clone(),
        istio_tls: plan.istio_tls,
        istio_tls_why: plan.istio_tls_why.clone(),
        endpoints: plan
            .endpoints
            .iter()
            .map(|e| e.backend.address.clone())
            .collect(),
    }
}

impl Summary {
    /// Endpoints counted by decision.
    fn of(endpoints: &[EndpointReport]) -> Self {
        let mut summary = Self::default();
        for e in endpoints {
            match e.decision {
                Decision::Mtls | Decision::MutualUser => summary.mtls += 1,
                Decision::Plaintext => summary.plaintext += 1,
                Decision::Tls => summary.tls += 1,
                Decision::WillFail => summary.will_fail += 1,
            }
        }
        summary
    }
}

/// Who the report is for.
fn client_label(client: Option<&Client>, ns: &str) -> String {
    match client {
        Some(c) => format!(
            "pod {} ({})",
            c.name,
            if c.sidecar {
                "with a sidecar"
            } else {
                "without a sidecar"
            }
        ),
        None => format!("a client with a sidecar (and no labels) in namespace {ns}"),
    }
}

/// Describes `name.namespace`: its sidecar, PeerAuthentication, and how clients reach it.
pub fn describe_pod(
    objs: &MeshObjects,
    s: &MeshSettings,
    name: &str,
) -> Result<PodReport, DiscoveryError> {
    describe_pod_with(objs, s, &NoProofs, name)
}

/// As `describe_pod`, with the proxies `proofs` knows.
pub fn describe_pod_with(
    objs: &MeshObjects,
    s: &MeshSettings,
    proofs: &dyn ProofLookup,
    name: &str,
) -> Result<PodReport, DiscoveryError> {
    let (pod_name, ns) = split(name)?;
    let pod = find_pod(objs, pod_name, ns).ok_or_else(|| DiscoveryError::NotFound {
        what: "pod",
        name: name.into(),
        known: objs.pods.iter().map(|p| meta_name(&p.metadata)).collect(),
    })?;
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let mut ports: Vec<Option<u16>> = vec![None];
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        for p in c.ports.iter().flatten() {
            ports.push(Some(p.container_port as u16));
        }
    }
    let peer_authentication = ports
        .into_iter()
        .map(|p| {
            (
                p,
                resolve_peer_auth(
                    &objs.peer_authentications,
                    &s.root_namespace,
                    ns,
                    &labels,
                    p,
                ),
            )
        })
        .collect();
    let services = objs
        .services
        .iter()
        .filter(|svc| {
            svc.metadata.namespace.as_deref() == Some(ns)
                && svc
                    .spec
                    .as_ref()
                    .and_then(|sp| sp.selector.as_ref())
                    .is_some_and(|sel| {
                        !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
                    })
        })
        .filter_map(|svc| {
            let plans = plan_named(objs, s, proofs, &meta_name(&svc.metadata), None)?;
            Some(build_report(objs, s, &plans, None, Some(name)))
        })
        .collect();
    Ok(PodReport {
        pod: name.into(),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|sp| sp.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        sidecar: sidecar_of(pod),
        peer_authentication,
        services,
    })
}
