//! The one decision: for every service port (and DestinationRule subset) the Envoy cluster's
//! TLS, and for every endpoint the EDS metadata and what the client's proxy then does. EDS
//! (`endpoints.rs`), the cluster template (`template.rs`) and `describe` (`describe.rs`) all
//! read these plans, so what meshid serves and what it explains cannot disagree.
//!
//! Each plan carries two answers: meshid's (per endpoint, workload-level PeerAuthentication,
//! optionally proxies proven by their SDS streams) and a prediction of what an Istio sidecar
//! fed by istiod does (`push_context.go` `BestEffortInferServiceMTLSMode`: namespace/mesh
//! PeerAuthentication only, headless services all-or-nothing, the tlsMode label decides).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use serde::Serialize;

use super::{
    decide::{
        cluster_tls, endpoint_metadata, outcome, ClusterInput, ClusterTls, EndpointInput, Inbound,
    },
    istio::{exported_to, resolve_host, ServiceEntry, TrafficPolicy},
    join::{Backend, Index},
    proof::{PodName, ProofLookup, ProxyProof},
    resolve_peer_auth, Decision, DestinationRule, DrTlsMode, MeshObjects, MeshSettings,
    PeerAuthMode, PeerAuthResolution, TlsMode,
};

/// Which answer: meshid's own, or Istio's data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mesh {
    Meshid,
    Istio,
}

/// The client a plan is made for (`None`: any client with a sidecar, in no namespace that has
/// its own DestinationRule; what EDS serves).
#[derive(Clone, Debug)]
pub struct Client {
    /// `name.namespace`.
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub sidecar: bool,
}

/// The DestinationRule a cluster follows, and which part of it decided.
#[derive(Clone, Debug, Serialize)]
pub struct DrRef {
    pub name: String,
    pub namespace: String,
    pub host: String,
    /// e.g. "port 8080 entry (replaces the top-level policy)", "top-level trafficPolicy".
    pub cluster_side: String,
    pub endpoint_side: String,
}

/// One endpoint of a cluster.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointPlan {
    #[serde(flatten)]
    pub backend: Backend,
    pub proof: ProxyProof,
    pub peer_authentication: PeerAuthResolution,
    /// meshid's EDS metadata: `istio` means `envoy.transport_socket_match: {tlsMode: istio}`.
    pub eds_tls_mode: TlsMode,
    pub eds_why: String,
    /// The metadata istiod's EDS would send.
    pub istio_eds_tls_mode: TlsMode,
    /// Whether the endpoint counts as a sidecar for meshid (label, and proof when required).
    pub sidecar: bool,
    pub warnings: Vec<String>,
}

impl EndpointPlan {
    /// The sidecar as `describe` states it.
    pub fn sidecar_state(&self) -> String {
        let declared = self.backend.tls_label == TlsMode::Istio;
        match (&self.proof, declared) {
            (ProxyProof::Connected { since }, _) => format!("proxy connected since {since}"),
            (ProxyProof::Recent { at }, _) => format!("proxy obtained a certificate at {at}"),
            (ProxyProof::Never, true) => {
                "declared (tlsMode=istio) but no proxy has fetched a certificate".into()
            }
            (_, true) => "declared (tlsMode=istio)".into(),
            (_, false) if self.backend.runs_proxy => {
                "runs istio-proxy but is not labelled tlsMode=istio".into()
            }
            (_, false) => "no sidecar".into(),
        }
    }

    fn inbound(&self, mesh: Mesh) -> Inbound {
        Inbound {
            proxy: self.backend.tls_label == TlsMode::Istio || self.backend.runs_proxy,
            proxy_has_cert: mesh == Mesh::Istio || self.proof != ProxyProof::Never,
            peer_auth: self.peer_authentication.mode,
        }
    }
}

/// One Envoy cluster: a service port, optionally one DestinationRule subset.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterPlan {
    /// `outbound|<port>|<subset>|<fqdn>`.
    pub name: String,
    /// `name.namespace` of the Service or ServiceEntry.
    pub service: String,
    /// "Service" or "ServiceEntry".
    pub kind: &'static str,
    pub fqdn: String,
    pub port: u16,
    pub subset: Option<String>,
    pub mesh_external: bool,
    /// Headless Service, ServiceEntry resolution NONE, or DestinationRule PASSTHROUGH.
    pub passthrough: bool,
    /// ServiceEntry resolution (`STATIC`, `DNS`, `NONE`); "EDS" for Services.
    pub resolution: String,
    /// Whether meshid's EDS serves this cluster.
    pub served_by_eds: bool,
    /// Namespace and `exportTo` of the ServiceEntry it comes from (empty list: everywhere).
    pub export_to: (String, Vec<String>),
    pub destination_rule: Option<DrRef>,
    /// meshid's cluster TLS, and why.
    pub tls: ClusterTls,
    pub tls_why: String,
    /// What istiod would put on the cluster, and why.
    pub istio_tls: ClusterTls,
    pub istio_tls_why: String,
    pub endpoints: Vec<EndpointPlan>,
    pub warnings: Vec<String>,
}

impl ClusterPlan {
    /// What the client's proxy does to endpoint `e`, and why; `decided_by` names the side.
    pub fn verdict(&self, e: &EndpointPlan, mesh: Mesh, client_sidecar: bool) -> Verdict {
        let (tls, tls_why, meta) = match mesh {
            Mesh::Meshid => (self.tls, &self.tls_why, e.eds_tls_mode == TlsMode::Istio),
            Mesh::Istio => (
                self.istio_tls,
                &self.istio_tls_why,
                e.istio_eds_tls_mode == TlsMode::Istio,
            ),
        };
        let (decision, what) = outcome(tls, meta, e.inbound(mesh), client_sidecar);
        let (decided_by, why) = if !client_sidecar {
            ("client", what.to_owned())
        } else if tls == ClusterTls::AutoMatch {
            let eds_why = if mesh == Mesh::Meshid {
                e.eds_why.as_str()
            } else {
                "tlsMode label"
            };
            ("endpoint", format!("{what} ({eds_why}; {tls_why})"))
        } else {
            ("cluster", format!("{what} ({tls_why})"))
        };
        Verdict {
            decision,
            why,
            decided_by,
        }
    }
}

/// A decision with its reason and the side that made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub decision: Decision,
    pub why: String,
    /// "cluster" (the Envoy cluster's one TLS setting), "endpoint" (EDS metadata through the
    /// socket matches) or "client" (a client without a sidecar).
    pub decided_by: &'static str,
}

/// The DestinationRule for `fqdn` as `push_context.go` `destinationRule` looks it up: the
/// client's namespace (its own rules, selector-bearing ones only when they select the client),
/// then the service's namespace, then the root namespace (rules exported to the client); the
/// most specific host wins, then the oldest rule.
pub fn destination_rule<'a>(
    drs: &'a [DestinationRule],
    s: &MeshSettings,
    fqdn: &str,
    svc_ns: &str,
    client: Option<&Client>,
) -> Option<&'a DestinationRule> {
    let mut order: Vec<&str> = client.map(|c| c.namespace.as_str()).into_iter().collect();
    for ns in [svc_ns, s.root_namespace.as_str()] {
        if !order.contains(&ns) {
            order.push(ns);
        }
    }
    for ns in order {
        let local = client.is_some_and(|c| c.namespace == ns);
        let best = drs
            .iter()
            .filter(|d| d.metadata.namespace.as_deref() == Some(ns))
            .filter(|d| match (&d.spec.workload_selector, client) {
                (Some(sel), Some(c)) if local => sel
                    .match_labels
                    .iter()
                    .all(|(k, v)| c.labels.get(k) == Some(v)),
                (Some(sel), _) => sel.match_labels.is_empty(),
                (None, _) => true,
            })
            .filter(|d| {
                local || client.is_none_or(|c| exported_to(&d.spec.export_to, ns, &c.namespace))
            })
            .filter_map(|d| Some((d.host_match(fqdn, &s.domain)?, d)))
            .max_by(|(sa, a), (sb, b)| {
                sa.cmp(sb).then_with(|| {
                    // Older first: reverse the creation order so max picks the oldest.
                    let ka = (&a.metadata.creation_timestamp, &a.metadata.name);
                    let kb = (&b.metadata.creation_timestamp, &b.metadata.name);
                    kb.cmp(&ka)
                })
            });
        if let Some((_, d)) = best {
            return Some(d);
        }
    }
    None
}

/// The DestinationRule's TLS for a cluster: (cluster side, endpoint side, descriptions,
/// unknown mode warnings). Cluster side after `util.go` `MergeSubsetTrafficPolicy` /
/// `GetPortLevelTrafficPolicy`; endpoint side after `mtls_checker.go` `tlsModeForDestinationRule`.
struct DrTls {
    cluster: Option<DrTlsMode>,
    endpoint: Option<DrTlsMode>,
    r: DrRef,
    warnings: Vec<String>,
}

fn dr_tls(dr: &DestinationRule, port: u16, subset: Option<&str>) -> DrTls {
    let mut warnings = Vec::new();
    let mut parse = |t: Option<&super::istio::ClientTls>| -> Option<DrTlsMode> {
        match t?.parsed() {
            Ok(m) => Some(m),
            Err(raw) => {
                warnings.push(format!(
                    "DestinationRule tls mode {raw:?} is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL; ignored"
                ));
                None
            }
        }
    };
    let top = dr.spec.traffic_policy.as_ref();
    let (mut ctls, from_port) = top.map_or((None, false), |tp| tp.cluster_tls(port));
    let mut cluster_side = match (top.is_some(), from_port) {
        (_, true) => format!("port {port} entry (replaces the top-level trafficPolicy)"),
        (true, false) => "top-level trafficPolicy".to_owned(),
        (false, _) => "no trafficPolicy".to_owned(),
    };
    let sub_tp: Option<&TrafficPolicy> = subset.and_then(|name| {
        dr.spec
            .subsets
            .iter()
            .find(|x| x.name == name)
            .and_then(|x| x.traffic_policy.as_ref())
    });
    if let Some(stp) = sub_tp {
        let (st, sp) = stp.cluster_tls(port);
        if st.is_some() || sp {
            ctls = st;
            cluster_side = format!(
                "subset {} {}",
                subset.unwrap_or_default(),
                if sp {
                    format!("port {port} entry")
                } else {
                    "trafficPolicy".to_owned()
                }
            );
        }
    }
    let (etls, endpoint_side) = match subset {
        None => (
            top.and_then(|tp| tp.endpoint_tls(port)),
            "port entry's tls, else the top-level tls",
        ),
        Some(_) => (
            sub_tp.and_then(|tp| tp.endpoint_tls(port)),
            "the subset's own trafficPolicy only",
        ),
    };
    let cluster = parse(ctls);
    let endpoint = parse(etls);
    warnings.dedup();
    DrTls {
        cluster,
        endpoint,
        r: DrRef {
            name: dr.metadata.name.clone().unwrap_or_default(),
            namespace: dr.metadata.namespace.clone().unwrap_or_default(),
            host: dr.spec.host.clone(),
            cluster_side: format!(
                "{cluster_side}: {}",
                cluster.map_or("no tls".into(), |m| format!("{m:?}"))
            ),
            endpoint_side: format!(
                "{endpoint_side}: {}",
                endpoint.map_or("no tls".into(), |m| format!("{m:?}"))
            ),
        },
        warnings,
    }
}

/// What one service (or ServiceEntry host) offers, before decisions.
struct Target {
    service: String,
    kind: &'static str,
    fqdn: String,
    namespace: String,
    mesh_external: bool,
    passthrough: bool,
    resolution: String,
    served_by_eds: bool,
    /// (own namespace, exportTo) of a ServiceEntry; empty: everywhere.
    export_to: (String, Vec<String>),
    /// Per service port: its backends.
    ports: Vec<(u16, Vec<Backend>)>,
}

/// Every cluster of every Service and ServiceEntry, for a client with a sidecar: what EDS serves.
pub fn plan_all(
    objs: &MeshObjects,
    s: &MeshSettings,
    proofs: &dyn ProofLookup,
) -> Vec<ClusterPlan> {
    let idx = Index::new(objs, &s.cluster_name);
    let mut out = Vec::new();
    for svc in idx.services.iter().copied() {
        if let Some(t) = service_target(&idx, s, svc) {
            out.extend(plan_target(objs, s, proofs, &t, None));
        }
    }
    for se in &objs.service_entries {
        for t in service_entry_targets(&idx, s, se) {
            out.extend(plan_target(objs, s, proofs, &t, None));
        }
    }
    out
}

/// The clusters of the Service or ServiceEntry host `name` (`svc.ns`, or a ServiceEntry's
/// `name.ns` or host), for `client`. `None` when there is no such thing.
pub fn plan_named(
    objs: &MeshObjects,
    s: &MeshSettings,
    proofs: &dyn ProofLookup,
    name: &str,
    client: Option<&Client>,
) -> Option<Vec<ClusterPlan>> {
    plan_named_for(objs, s, proofs, name, &[client]).and_then(|mut v| v.pop())
}

/// As `plan_named`, once per client (the endpoints are joined once; only the DestinationRule
/// lookup depends on the client).
pub fn plan_named_for(
    objs: &MeshObjects,
    s: &MeshSettings,
    proofs: &dyn ProofLookup,
    name: &str,
    clients: &[Option<&Client>],
) -> Option<Vec<Vec<ClusterPlan>>> {
    let idx = Index::new(objs, &s.cluster_name);
    let targets = targets_named(objs, &idx, s, name);
    if targets.is_empty() {
        return None;
    }
    Some(
        clients
            .iter()
            .map(|c| {
                targets
                    .iter()
                    .flat_map(|t| plan_target(objs, s, proofs, t, *c))
                    .collect()
            })
            .collect(),
    )
}

fn targets_named(objs: &MeshObjects, idx: &Index<'_>, s: &MeshSettings, name: &str) -> Vec<Target> {
    if let Some((n, ns)) = name.split_once('.') {
        if let Some(svc) = idx.services.iter().copied().find(|x| {
            x.metadata.name.as_deref() == Some(n) && x.metadata.namespace.as_deref() == Some(ns)
        }) {
            return service_target(idx, s, svc).into_iter().collect();
        }
    }
    let mut out = Vec::new();
    for se in &objs.service_entries {
        let se_name = format!(
            "{}.{}",
            se.metadata.name.as_deref().unwrap_or(""),
            se.metadata.namespace.as_deref().unwrap_or("")
        );
        for t in service_entry_targets(idx, s, se) {
            if t.fqdn == name || se_name == name {
                out.push(t);
            }
        }
    }
    out
}

/// Whether a ServiceEntry (or Service) is visible to `client` (its `exportTo`).
pub fn visible(export_to: &[String], own_ns: &str, client: Option<&Client>) -> bool {
    client.is_none_or(|c| exported_to(export_to, own_ns, &c.namespace))
}

fn service_target<'a>(idx: &Index<'a>, s: &MeshSettings, svc: &'a Service) -> Option<Target> {
    let name = svc.metadata.name.as_deref()?;
    let ns = svc.metadata.namespace.as_deref()?;
    let spec = svc.spec.as_ref();
    let ports = spec
        .iter()
        .flat_map(|x| x.ports.iter().flatten())
        .map(|sp| (sp.port as u16, idx.service_backends(svc, sp)))
        .collect();
    Some(Target {
        service: format!("{name}.{ns}"),
        kind: "Service",
        fqdn: format!("{name}.{ns}.svc.{}", s.domain),
        namespace: ns.to_owned(),
        mesh_external: spec.and_then(|x| x.type_.as_deref()) == Some("ExternalName"),
        passthrough: spec.and_then(|x| x.cluster_ip.as_deref()) == Some("None"),
        resolution: "EDS".into(),
        served_by_eds: true,
        export_to: (ns.to_owned(), Vec::new()),
        ports,
    })
}

fn service_entry_targets<'a>(
    idx: &Index<'a>,
    s: &MeshSettings,
    se: &'a ServiceEntry,
) -> Vec<Target> {
    let ns = se.metadata.namespace.clone().unwrap_or_default();
    let name = se.metadata.name.clone().unwrap_or_default();
    let resolution = se.resolution().to_owned();
    se.spec
        .hosts
        .iter()
        .map(|host| Target {
            service: format!("{name}.{ns}"),
            kind: "ServiceEntry",
            fqdn: resolve_host(host, &ns, &s.domain),
            namespace: ns.clone(),
            mesh_external: se.mesh_external(),
            passthrough: resolution == "NONE",
            resolution: resolution.clone(),
            served_by_eds: resolution == "STATIC",
            export_to: (ns.clone(), se.spec.export_to.clone()),
            ports: se
                .spec
                .ports
                .iter()
                .map(|p| (p.number as u16, idx.service_entry_backends(se, p, host)))
                .collect(),
        })
        .collect()
}

fn plan_target(
    objs: &MeshObjects,
    s: &MeshSettings,
    proofs: &dyn ProofLookup,
    t: &Target,
    client: Option<&Client>,
) -> Vec<ClusterPlan> {
    let dr = destination_rule(&objs.destination_rules, s, &t.fqdn, &t.namespace, client);
    // `BestEffortInferServiceMTLSMode` reads the namespace/mesh policy only.
    let ns_mode = resolve_peer_auth(
        &objs.peer_authentications,
        &s.root_namespace,
        &t.namespace,
        &BTreeMap::new(),
        None,
    );
    let mut out = Vec::new();
    for (port, backends) in &t.ports {
        let mut subsets: Vec<Option<&super::istio::Subset>> = vec![None];
        subsets.extend(dr.iter().flat_map(|d| d.spec.subsets.iter()).map(Some));
        for subset in subsets {
            let chosen: Vec<&Backend> = backends
                .iter()
                .filter(|b| {
                    subset
                        .is_none_or(|ss| ss.labels.iter().all(|(k, v)| b.labels.get(k) == Some(v)))
                })
                .collect();
            out.push(plan_cluster(
                objs,
                s,
                proofs,
                t,
                *port,
                subset.map(|x| x.name.as_str()),
                dr,
                &ns_mode,
                &chosen,
            ));
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn plan_cluster(
    objs: &MeshObjects,
    s: &MeshSettings,
    proofs: &dyn ProofLookup,
    t: &Target,
    port: u16,
    subset: Option<&str>,
    dr: Option<&DestinationRule>,
    ns_mode: &PeerAuthResolution,
    backends: &[&Backend],
) -> ClusterPlan {
    let drt = dr.map(|d| dr_tls(d, port, subset));
    let passthrough = t.passthrough
        || dr
            .and_then(|d| d.spec.traffic_policy.as_ref())
            .is_some_and(TrafficPolicy::passthrough);
    let cluster_dr = drt.as_ref().and_then(|d| d.cluster);
    let endpoint_dr = drt.as_ref().and_then(|d| d.endpoint);
    let (tls, tls_why) = cluster_tls(ClusterInput {
        dr_tls: cluster_dr,
        mesh_external: t.mesh_external,
        auto_mtls: s.auto_mtls,
        inferred_disable: None,
        original_dst: false,
    });
    let inferred_disable = if passthrough && backends.is_empty() {
        Some("passthrough (headless) service with no endpoints: Istio infers DISABLE (BestEffortInferServiceMTLSMode)")
    } else if passthrough && backends.iter().any(|b| b.tls_label != TlsMode::Istio) {
        Some("passthrough (headless) service with an endpoint without the tlsMode=istio label: Istio sends plaintext to every endpoint (BestEffortInferServiceMTLSMode)")
    } else if ns_mode.mode == PeerAuthMode::Disable {
        Some("namespace/mesh PeerAuthentication DISABLE: Istio infers the service's mode from it alone, ignoring workload policies (BestEffortInferServiceMTLSMode)")
    } else {
        None
    };
    let (istio_tls, istio_tls_why) = cluster_tls(ClusterInput {
        dr_tls: cluster_dr,
        mesh_external: t.mesh_external,
        auto_mtls: s.auto_mtls,
        inferred_disable,
        original_dst: passthrough,
    });
    let mut warnings = drt.as_ref().map(|d| d.warnings.clone()).unwrap_or_default();
    let endpoints = backends
        .iter()
        .map(|b| plan_endpoint(objs, s, proofs, b, endpoint_dr))
        .collect();
    if backends.is_empty() && subset.is_none() && !t.mesh_external {
        warnings.push(match t.kind {
            "Service" => {
                "no endpoints: no EndpointSlice labelled kubernetes.io/service-name for this service (and no WorkloadEntry it selects)".into()
            }
            _ => "no endpoints: the ServiceEntry lists none and its workloadSelector selects nothing".into(),
        });
    }
    ClusterPlan {
        name: format!("outbound|{port}|{}|{}", subset.unwrap_or_default(), t.fqdn),
        service: t.service.clone(),
        kind: t.kind,
        fqdn: t.fqdn.clone(),
        port,
        subset: subset.map(str::to_owned),
        mesh_external: t.mesh_external,
        passthrough,
        resolution: t.resolution.clone(),
        served_by_eds: t.served_by_eds,
        export_to: t.export_to.clone(),
        destination_rule: drt.map(|d| d.r),
        tls,
        tls_why: tls_why.to_owned(),
        istio_tls,
        istio_tls_why: istio_tls_why.to_owned(),
        endpoints,
        warnings,
    }
}

fn plan_endpoint(
    objs: &MeshObjects,
    s: &MeshSettings,
    proofs: &dyn ProofLookup,
    b: &Backend,
    endpoint_dr: Option<DrTlsMode>,
) -> EndpointPlan {
    let pa = resolve_peer_auth(
        &objs.peer_authentications,
        &s.root_namespace,
        &b.namespace,
        &b.labels,
        Some(b.port),
    );
    let proof = match &b.pod {
        Some(p) => proofs.proof(
            &PodName {
                cluster: &b.cluster,
                namespace: &b.namespace,
                name: &p.name,
            },
            p.uid.as_deref(),
        ),
        None => ProxyProof::Unknown,
    };
    let declared = b.tls_label == TlsMode::Istio;
    let silent = declared && proof == ProxyProof::Never;
    let sidecar = declared && !(s.require_proxy_proof && silent);
    let (meta, why) = endpoint_metadata(EndpointInput {
        dr_tls: endpoint_dr,
        sidecar,
        peer_auth: pa.mode,
    });
    let (istio_meta, _) = endpoint_metadata(EndpointInput {
        dr_tls: endpoint_dr,
        sidecar: declared,
        peer_auth: pa.mode,
    });
    let mut warnings = b.warnings.clone();
    let mut eds_why = why.to_owned();
    if silent {
        if s.require_proxy_proof && endpoint_dr.is_none() {
            eds_why = "declared tlsMode=istio but no proxy has fetched a certificate: discovery.require_proxy_proof marks it tlsMode disabled".into();
        } else {
            warnings.push(
                "declared tlsMode=istio but no proxy of this pod has fetched a certificate from meshid: mTLS to it will fail".into(),
            );
        }
    }
    let mode = |b: bool| if b { TlsMode::Istio } else { TlsMode::Disabled };
    EndpointPlan {
        backend: b.clone(),
        proof,
        peer_authentication: pa,
        eds_tls_mode: mode(meta),
        eds_why,
        istio_eds_tls_mode: mode(istio_meta),
        sidecar,
        warnings,
    }
}
