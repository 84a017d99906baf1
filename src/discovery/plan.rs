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
    istio::{
        exported_to, merge_subset_policy, resolve_host, ClientTls, EffectivePolicy, ServiceEntry,
    },
    join::{Backend, Index},
    proof::{PodName, ProofLookup, ProxyProof},
    resolve_peer_auth,
    rules::{Consolidated, RuleIndex},
    Decision, DrTlsMode, MeshObjects, MeshSettings, PeerAuthMode, PeerAuthResolution, TlsMode,
};

/// Which answer: meshid's own, or Istio's data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mesh {
    Meshid,
    Istio,
}

/// The client a plan is made for (`None`: a client with a sidecar and no labels in the
/// service's own namespace).
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
    /// Every rule merged into this one (`mergeDestinationRule`), as `namespace/name`.
    pub merged_from: Vec<String>,
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

    /// What sits in front of the endpoint: a proxy only if the pod runs one (the label alone
    /// makes clients send mTLS, it does not terminate it).
    fn inbound(&self, mesh: Mesh, sans: &[String], trust_domain: &str) -> Inbound {
        let b = &self.backend;
        let identity = format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            b.namespace,
            b.service_account.as_deref().unwrap_or("default")
        );
        Inbound {
            proxy: b.runs_proxy,
            proxy_has_cert: mesh == Mesh::Istio || self.proof != ProxyProof::Never,
            peer_auth: self.peer_authentication.mode,
            identity_accepted: sans.is_empty() || sans.contains(&identity),
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
    /// The identities Istio mTLS to this cluster accepts: a DestinationRule's
    /// `subjectAltNames`, else the service's accounts; empty: any.
    pub subject_alt_names: Vec<String>,
    /// The trust domain SPIFFE IDs are compared in.
    #[serde(skip)]
    pub trust_domain: String,
    /// The endpoints served: ready ones (istiod's `filterIstioEndpoint`).
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
        let inbound = e.inbound(mesh, &self.subject_alt_names, &self.trust_domain);
        let (decision, what) = outcome(tls, meta, inbound, client_sidecar);
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

/// The client namespace and labels the DestinationRule lookup uses.
fn client_key<'c>(
    client: Option<&'c Client>,
    svc_ns: &'c str,
) -> (&'c str, Option<&'c BTreeMap<String, String>>) {
    match client {
        Some(c) => (c.namespace.as_str(), Some(&c.labels)),
        None => (svc_ns, None),
    }
}

/// The DestinationRule's TLS for a cluster: the cluster side after `util.go`
/// `GetPortLevelTrafficPolicy` / `MergeSubsetTrafficPolicy`, the endpoint side after
/// `mtls_checker.go` `tlsModeForDestinationRule`, and the policy
/// `BestEffortInferServiceMTLSMode` reads (the rule's, or the subset's, top level).
struct DrTls<'a> {
    cluster: Option<EffectivePolicy>,
    endpoint: Option<&'a ClientTls>,
    infer_passthrough: bool,
    subset_passthrough: bool,
    has_selector: bool,
    r: DrRef,
}

fn dr_tls<'a>(dr: &'a Consolidated, port: u16, subset: Option<&str>) -> DrTls<'a> {
    let top = dr.spec.traffic_policy.as_ref();
    let sub = subset.and_then(|name| dr.spec.subsets.iter().find(|x| x.name == name));
    let sub_tp = sub.and_then(|x| x.traffic_policy.as_ref());
    let (cluster, cluster_side) = match subset {
        None => {
            let from_port = top.is_some_and(|t| t.for_port(port).1);
            (
                top.map(|t| t.for_port(port).0),
                match (top.is_some(), from_port) {
                    (_, true) => {
                        format!("port {port} entry (replaces the top-level trafficPolicy)")
                    }
                    (true, false) => "top-level trafficPolicy".to_owned(),
                    (false, _) => "no trafficPolicy".to_owned(),
                },
            )
        }
        Some(name) => (
            merge_subset_policy(top, sub_tp, port),
            format!("subset {name} merged over the rule (MergeSubsetTrafficPolicy)"),
        ),
    };
    let (endpoint, endpoint_side) = match (subset, sub_tp.and_then(|t| t.tls_for_port(port))) {
        (Some(_), Some(t)) => (Some(t), "the subset's tls for this port"),
        (Some(_), None) => (
            top.and_then(|t| t.tls_for_port(port)),
            "the subset sets no tls for this port: the rule's port entry tls, else its top-level tls",
        ),
        (None, _) => (
            top.and_then(|t| t.tls_for_port(port)),
            "the port entry's tls, else the top-level tls",
        ),
    };
    let infer_passthrough = match subset {
        None => top.is_some_and(|t| t.passthrough()),
        Some(_) => sub_tp.is_some_and(|t| t.passthrough()),
    };
    let mode = |t: Option<&ClientTls>| {
        t.map_or("no tls".to_owned(), |t| {
            t.mode.clone().unwrap_or_else(|| "DISABLE (no mode)".into())
        })
    };
    DrTls {
        r: DrRef {
            name: dr.name().to_owned(),
            namespace: dr.namespace.clone(),
            host: dr.spec.host.clone(),
            merged_from: dr.from.clone(),
            cluster_side: format!(
                "{cluster_side}: {}",
                mode(cluster.as_ref().and_then(|c| c.tls.as_ref()))
            ),
            endpoint_side: format!("{endpoint_side}: {}", mode(endpoint)),
        },
        cluster,
        endpoint,
        infer_passthrough,
        subset_passthrough: sub_tp.is_some_and(|t| t.passthrough()),
        has_selector: dr.spec.workload_selector.is_some(),
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
    /// Per service port: its backends (unready ones included: istiod keeps them in its index).
    ports: Vec<(u16, Vec<Backend>)>,
    /// Endpoints istiod leaves out entirely, with why.
    skipped: Vec<String>,
}

/// Everything a plan needs that does not depend on the client: joined once per model.
/// A rule's TLS modes for one cluster: the cluster side (with `dropped` saying why istiod builds
/// no TLS at all on a sidecar), the endpoint side, and a warning for each mode Istio does not know.
struct DrModes {
    dropped: Option<&'static str>,
    cluster: Option<DrTlsMode>,
    endpoint: Option<DrTlsMode>,
    warnings: Vec<String>,
}

impl From<DrModes>
    for (
        Option<&'static str>,
        Option<DrTlsMode>,
        Option<DrTlsMode>,
        Vec<String>,
    )
{
    fn from(m: DrModes) -> Self {
        (m.dropped, m.cluster, m.endpoint, m.warnings)
    }
}

fn dr_modes(drt: Option<&DrTls<'_>>) -> DrModes {
    let mut warnings = Vec::new();
    let cluster_client_tls = drt
        .and_then(|d| d.cluster.as_ref())
        .and_then(|p| p.tls.as_ref());
    let dropped =
        cluster_client_tls.and_then(|t| t.dropped_on_sidecar(drt.is_some_and(|d| d.has_selector)));
    let mut parse = |t: Option<&ClientTls>| -> Option<DrTlsMode> {
        match t?.parsed() {
            Ok(m) => Some(m),
            Err(unknown) => {
                warnings.push(unknown.to_string());
                None
            }
        }
    };
    let cluster = if dropped.is_some() {
        Some(DrTlsMode::Disable)
    } else {
        parse(cluster_client_tls)
    };
    let endpoint = parse(drt.and_then(|d| d.endpoint));
    DrModes {
        dropped,
        cluster,
        endpoint,
        warnings,
    }
}

pub struct Planner<'a> {
    objs: &'a MeshObjects,
    s: &'a MeshSettings,
    proofs: &'a dyn ProofLookup,
    targets: Vec<Target>,
    pub(crate) rules: RuleIndex,
}

impl<'a> Planner<'a> {
    /// Joins every Service and ServiceEntry of `objs` to its endpoints and indexes the rules.
    pub fn new(objs: &'a MeshObjects, s: &'a MeshSettings, proofs: &'a dyn ProofLookup) -> Self {
        let idx = Index::new(objs, &s.cluster_name);
        let mut targets: Vec<Target> = idx
            .services
            .iter()
            .filter_map(|svc| service_target(&idx, s, svc))
            .collect();
        for se in &objs.service_entries {
            targets.extend(service_entry_targets(&idx, s, se));
        }
        Self {
            objs,
            s,
            proofs,
            targets,
            rules: RuleIndex::new(&objs.destination_rules, &s.root_namespace, &s.domain),
        }
    }

    /// Every cluster, for `client`.
    pub fn all(&self, client: Option<&Client>) -> Vec<ClusterPlan> {
        self.targets
            .iter()
            .flat_map(|t| self.plan_target(t, client))
            .collect()
    }

    /// The clusters of the targets whose DestinationRule for `client` differs from the one
    /// `base` gets (by the rules merged in), with every cluster name the base has for them.
    pub fn differing(&self, client: &Client, base: &Client) -> (Vec<ClusterPlan>, Vec<String>) {
        let mut plans = Vec::new();
        let mut replaced = Vec::new();
        for t in &self.targets {
            let dr = |c: &Client| {
                self.rules
                    .choose(&c.namespace, &c.labels, &t.fqdn, &t.namespace)
                    .map(|d| d.from.clone())
            };
            if dr(client) != dr(base) {
                let theirs = self.plan_target(t, Some(base));
                replaced.extend(theirs.into_iter().map(|p| p.name));
                plans.extend(self.plan_target(t, Some(client)));
            }
        }
        (plans, replaced)
    }

    fn plan_target(&self, t: &Target, client: Option<&Client>) -> Vec<ClusterPlan> {
        let (cns, labels) = client_key(client, &t.namespace);
        let none = BTreeMap::new();
        let dr = self
            .rules
            .choose(cns, labels.unwrap_or(&none), &t.fqdn, &t.namespace);
        // `BestEffortInferServiceMTLSMode` reads the namespace/mesh policy only.
        let ns_mode = resolve_peer_auth(
            &self.objs.peer_authentications,
            &self.s.root_namespace,
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
                        subset.is_none_or(|ss| {
                            ss.labels.iter().all(|(k, v)| b.labels.get(k) == Some(v))
                        })
                    })
                    .collect();
                let mut plan = self.plan_cluster(
                    t,
                    *port,
                    subset.map(|x| x.name.as_str()),
                    dr,
                    &ns_mode,
                    backends,
                    &chosen,
                );
                if subset.is_none() {
                    plan.warnings.extend(t.skipped.iter().cloned());
                }
                out.push(plan);
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn plan_cluster(
        &self,
        t: &Target,
        port: u16,
        subset: Option<&str>,
        dr: Option<&Consolidated>,
        ns_mode: &PeerAuthResolution,
        all: &[Backend],
        backends: &[&Backend],
    ) -> ClusterPlan {
        let s = self.s;
        let drt = dr.map(|d| dr_tls(d, port, subset));
        let policy = drt.as_ref().and_then(|d| d.cluster.as_ref());
        let cluster_client_tls = policy.and_then(|p| p.tls.as_ref());
        let (dropped, cluster_dr, endpoint_dr, mut warnings) = dr_modes(drt.as_ref()).into();
        // `buildUpstreamTLSSettings`: ISTIO_MUTUAL checks the rule's subjectAltNames, else the
        // service's accounts (`PushContext.ServiceAccounts`: those of its endpoints that name
        // one), so an endpoint without an account fails once others have one.
        let subject_alt_names = match cluster_client_tls {
            Some(t)
                if cluster_dr == Some(DrTlsMode::IstioMutual)
                    && !t.subject_alt_names.is_empty() =>
            {
                t.subject_alt_names.clone()
            }
            _ => service_accounts(all, &s.domain),
        };
        let lb_passthrough = policy.is_some_and(EffectivePolicy::passthrough)
            || drt.as_ref().is_some_and(|d| d.subset_passthrough);
        let passthrough = t.passthrough || lb_passthrough;
        let side = |inferred_disable, original_dst| match dropped {
            Some(why) => (ClusterTls::Plain, why),
            None => cluster_tls(ClusterInput {
                dr_tls: cluster_dr,
                mesh_external: t.mesh_external,
                auto_mtls: s.auto_mtls,
                inferred_disable,
                original_dst,
            }),
        };
        let (tls, tls_why) = side(None, false);
        // `BestEffortInferServiceMTLSMode`: a passthrough service (headless, or the rule's top
        // level PASSTHROUGH) is DISABLE unless every instance of the port has a sidecar.
        let infer_passthrough = t.passthrough || drt.as_ref().is_some_and(|d| d.infer_passthrough);
        let (istio_tls, istio_tls_why) = side(
            inferred_disable(infer_passthrough, all, ns_mode),
            passthrough,
        );
        let endpoints = backends
            .iter()
            .filter(|b| b.ready)
            .map(|b| self.plan_endpoint(b, endpoint_dr))
            .collect();
        endpoint_warnings(t, subset, backends, &mut warnings);
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
            subject_alt_names,
            trust_domain: s.domain.clone(),
            endpoints,
            warnings,
        }
    }

    fn plan_endpoint(&self, b: &Backend, endpoint_dr: Option<DrTlsMode>) -> EndpointPlan {
        let s = self.s;
        let pa = resolve_peer_auth(
            &self.objs.peer_authentications,
            &s.root_namespace,
            &b.namespace,
            &b.labels,
            Some(b.port),
        );
        let proof = match &b.pod {
            Some(p) => self.proofs.proof(
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
            if s.require_proxy_proof {
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
}

/// Every cluster of every Service and ServiceEntry for a client with a sidecar in a namespace
/// with no rules of its own that no `exportTo` names.
pub fn plan_all(
    objs: &MeshObjects,
    s: &MeshSettings,
    proofs: &dyn ProofLookup,
) -> Vec<ClusterPlan> {
    Planner::new(objs, s, proofs).all(Some(&Client::anywhere()))
}

impl Client {
    /// A sidecar client in a namespace that has no DestinationRules of its own and that no
    /// `exportTo` names: it sees only rules exported everywhere.
    pub fn anywhere() -> Self {
        Self {
            name: String::new(),
            namespace: String::new(),
            labels: BTreeMap::new(),
            sidecar: true,
        }
    }
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
    let planner = Planner::new(objs, s, proofs);
    let named = targets_named(objs, &planner.targets, name);
    if named.is_empty() {
        return None;
    }
    Some(
        clients
            .iter()
            .map(|c| {
                named
                    .iter()
                    .flat_map(|t| planner.plan_target(t, *c))
                    .collect()
            })
            .collect(),
    )
}

fn targets_named<'t>(objs: &MeshObjects, targets: &'t [Target], name: &str) -> Vec<&'t Target> {
    // A Service by `name.ns`, its host `name.ns.svc.<domain>`, or `name.ns.svc`.
    let short = name.strip_suffix(".svc");
    if let Some(t) = targets.iter().find(|t| {
        t.kind == "Service" && (t.service == name || t.fqdn == name || short == Some(&*t.service))
    }) {
        return vec![t];
    }
    let se_names: Vec<String> = objs
        .service_entries
        .iter()
        .map(|se| {
            format!(
                "{}.{}",
                se.metadata.name.as_deref().unwrap_or(""),
                se.metadata.namespace.as_deref().unwrap_or("")
            )
        })
        .collect();
    targets
        .iter()
        .filter(|t| {
            t.kind == "ServiceEntry"
                && (t.fqdn == name || (t.service == name && se_names.iter().any(|n| n == name)))
        })
        .collect()
}

/// Whether a ServiceEntry (or Service) is visible to `client` (its `exportTo`).
pub fn visible(export_to: &[String], own_ns: &str, client: Option<&Client>) -> bool {
    client.is_none_or(|c| exported_to(export_to, own_ns, &c.namespace))
}

fn service_target<'a>(idx: &Index<'a>, s: &MeshSettings, svc: &'a Service) -> Option<Target> {
    let name = svc.metadata.name.as_deref()?;
    let ns = svc.metadata.namespace.as_deref()?;
    let spec = svc.spec.as_ref();
    let mut skipped = Vec::new();
    let ports = spec
        .iter()
        .flat_map(|x| x.ports.iter().flatten())
        .map(|sp| (sp.port as u16, idx.service_backends(svc, sp, &mut skipped)))
        .collect();
    skipped.dedup();
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
        skipped,
    })
}

/// `PushContext.ServiceAccounts`: the SPIFFE IDs of the service's endpoints that name an
/// account, which ISTIO_MUTUAL checks when the rule lists no subjectAltNames.
fn service_accounts(all: &[Backend], domain: &str) -> Vec<String> {
    let mut sas: Vec<String> = all
        .iter()
        .filter_map(|b| {
            let sa = b.service_account.as_deref()?;
            Some(format!("spiffe://{domain}/ns/{}/sa/{sa}", b.namespace))
        })
        .collect();
    sas.sort();
    sas.dedup();
    sas
}

/// `BestEffortInferServiceMTLSMode`: why Istio infers DISABLE for the service, if it does.
fn inferred_disable(
    infer_passthrough: bool,
    all: &[Backend],
    ns_mode: &PeerAuthResolution,
) -> Option<&'static str> {
    if infer_passthrough && all.is_empty() {
        Some("passthrough service with no endpoints: Istio infers DISABLE (BestEffortInferServiceMTLSMode)")
    } else if infer_passthrough && all.iter().any(|b| b.tls_label != TlsMode::Istio) {
        Some("passthrough service with an endpoint without tlsMode istio: Istio sends plaintext to every endpoint (BestEffortInferServiceMTLSMode)")
    } else if ns_mode.mode == PeerAuthMode::Disable {
        Some("namespace/mesh PeerAuthentication DISABLE: Istio infers the service's mode from it alone, ignoring workload policies (BestEffortInferServiceMTLSMode)")
    } else {
        None
    }
}

/// Unready endpoints (not served) and a service with none at all.
fn endpoint_warnings(
    t: &Target,
    subset: Option<&str>,
    backends: &[&Backend],
    warnings: &mut Vec<String>,
) {
    for b in backends.iter().filter(|b| !b.ready) {
        warnings.push(format!(
            "{} ({}) is not ready: not served (istiod filterIstioEndpoint)",
            b.workload, b.address
        ));
    }
    if backends.is_empty() && subset.is_none() && !t.mesh_external {
        warnings.push(match t.kind {
            "Service" => {
                "no endpoints: no EndpointSlice labelled kubernetes.io/service-name for this service (and no WorkloadEntry it selects)".into()
            }
            _ => "no endpoints: the ServiceEntry lists none and its workloadSelector selects nothing".into(),
        });
    }
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
        .map(|host| {
            let mut skipped = Vec::new();
            let ports = se
                .spec
                .ports
                .iter()
                .map(|p| {
                    (
                        p.number as u16,
                        idx.service_entry_backends(se, p, host, &mut skipped),
                    )
                })
                .collect();
            skipped.dedup();
            Target {
                service: format!("{name}.{ns}"),
                kind: "ServiceEntry",
                fqdn: resolve_host(host, &ns, &s.domain),
                namespace: ns.clone(),
                mesh_external: se.mesh_external(),
                passthrough: resolution == "NONE",
                resolution: resolution.clone(),
                served_by_eds: resolution == "STATIC",
                export_to: (ns.clone(), se.spec.export_to.clone()),
                ports,
                skipped,
            }
        })
        .collect()
}
