//! `describe`: for a service (or a pod), every endpoint with its sidecar status, the
//! PeerAuthentication in force, the DestinationRule TLS if any, and the decision with its reason.

use k8s_openapi::api::core::v1::{Pod, Service};
use serde::Serialize;

use super::{
    decide, sidecar_of, Decision, DecisionInput, DestinationRule, DiscoveryError, DrTlsMode,
    MeshObjects, MeshSettings, PeerAuthResolution, TlsMode,
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
    pub ready: bool,
    pub sidecar: bool,
    pub tls_mode: TlsMode,
    pub peer_authentication: PeerAuthResolution,
    pub decision: Decision,
    pub why: String,
    pub warnings: Vec<String>,
}

/// The DestinationRule that applies, if any.
#[derive(Clone, Debug, Serialize)]
pub struct DestinationRuleReport {
    pub name: String,
    pub namespace: String,
    pub host: String,
}

/// Counts by decision.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub mtls: usize,
    pub plaintext: usize,
    pub tls: usize,
    pub will_fail: usize,
}

/// What `meshid describe service` reports.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceReport {
    pub service: String,
    pub fqdn: String,
    pub mesh_external: bool,
    pub headless: bool,
    pub auto_mtls: bool,
    /// Who the decisions are for.
    pub client: String,
    /// The namespace-level PeerAuthentication (workloads may override it; see each endpoint).
    pub namespace_peer_authentication: PeerAuthResolution,
    pub destination_rule: Option<DestinationRuleReport>,
    pub endpoints: Vec<EndpointReport>,
    pub summary: Summary,
    pub warnings: Vec<String>,
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

/// The DestinationRule for `fqdn`: looked up in the client's namespace, then the service's,
/// then the root namespace; an exact host beats a wildcard.
fn destination_rule<'a>(
    objs: &'a MeshObjects,
    s: &MeshSettings,
    fqdn: &str,
    namespaces: &[&str],
) -> Option<&'a DestinationRule> {
    for ns in namespaces {
        let candidates: Vec<&DestinationRule> = objs
            .destination_rules
            .iter()
            .filter(|d| {
                d.metadata.namespace.as_deref() == Some(*ns) && d.matches_host(fqdn, &s.domain)
            })
            .collect();
        if let Some(d) = candidates
            .iter()
            .find(|d| !d.spec.host.starts_with('*'))
            .or(candidates.first())
        {
            return Some(d);
        }
    }
    None
}

/// Describes `name.namespace` for a client with a sidecar, or for `client` (`pod.namespace`).
pub fn describe_service(
    objs: &MeshObjects,
    s: &MeshSettings,
    name: &str,
    client: Option<&str>,
) -> Result<ServiceReport, DiscoveryError> {
    let (svc_name, ns) = split(name)?;
    let svc = objs
        .services
        .iter()
        .find(|x| {
            x.metadata.name.as_deref() == Some(svc_name)
                && x.metadata.namespace.as_deref() == Some(ns)
        })
        .ok_or_else(|| DiscoveryError::NotFound {
            what: "service",
            name: name.into(),
            known: objs
                .services
                .iter()
                .map(|x| meta_name(&x.metadata))
                .collect(),
        })?;
    let (client_sidecar, client_label, client_ns) = match client {
        Some(c) => {
            let (cn, cns) = split(c)?;
            let pod = find_pod(objs, cn, cns).ok_or_else(|| DiscoveryError::NotFound {
                what: "client pod",
                name: c.into(),
                known: vec![],
            })?;
            let side = sidecar_of(pod).tls_mode == TlsMode::Istio;
            (
                side,
                format!(
                    "pod {c} ({})",
                    if side {
                        "with a sidecar"
                    } else {
                        "without a sidecar"
                    }
                ),
                Some(cns.to_owned()),
            )
        }
        None => (true, "a client with a sidecar".to_owned(), None),
    };
    Ok(build_report(
        objs,
        s,
        svc,
        client_sidecar,
        client_label,
        client_ns.as_deref(),
        None,
    ))
}

fn build_report(
    objs: &MeshObjects,
    s: &MeshSettings,
    svc: &Service,
    client_sidecar: bool,
    client: String,
    client_ns: Option<&str>,
    only_pod: Option<&str>,
) -> ServiceReport {
    let svc_name = svc.metadata.name.clone().unwrap_or_default();
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let fqdn = format!("{svc_name}.{ns}.svc.{}", s.domain);
    let spec = svc.spec.clone().unwrap_or_default();
    let mesh_external = spec.type_.as_deref() == Some("ExternalName");
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let mut lookup_ns: Vec<&str> = client_ns.into_iter().collect();
    lookup_ns.extend([ns.as_str(), s.root_namespace.as_str()]);
    let dr = destination_rule(objs, s, &fqdn, &lookup_ns);
    let mut warnings = Vec::new();
    let mut endpoints = Vec::new();
    for j in super::join::service_endpoints(objs, svc) {
        if only_pod.is_some() && j.pod_name.as_deref() != only_pod {
            continue;
        }
        let dr_mode_raw = dr.and_then(|d| d.tls_mode_for(j.service_port.port as u16));
        let dr_tls = dr_mode_raw.as_deref().and_then(DrTlsMode::parse);
        if let (Some(raw), None) = (&dr_mode_raw, dr_tls) {
            let w = format!("DestinationRule tls mode {raw:?} is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL; ignored");
            if !warnings.contains(&w) {
                warnings.push(w);
            }
        }
        let side = j.pod.map(sidecar_of);
        let labels = j
            .pod
            .and_then(|p| p.metadata.labels.clone())
            .unwrap_or_default();
        let pa = resolve_peer_auth(
            &objs.peer_authentications,
            &s.root_namespace,
            &ns,
            &labels,
            Some(j.port),
        );
        let sidecar = side.as_ref().is_some_and(|x| x.tls_mode == TlsMode::Istio);
        let (decision, why) = decide(DecisionInput {
            dr_tls,
            mesh_external,
            auto_mtls: s.auto_mtls,
            endpoint_sidecar: sidecar,
            endpoint_peer_auth: pa.mode,
            client_sidecar,
        });
        let pod_name = j.pod_name.clone().unwrap_or_default();
        let mut ep_warnings: Vec<String> = side
            .as_ref()
            .map(|x| {
                x.warnings
                    .iter()
                    .map(|w| format!("pod {pod_name} {w}"))
                    .collect()
            })
            .unwrap_or_default();
        if j.pod.is_none() && j.pod_name.is_some() {
            ep_warnings.push(format!("pod {pod_name} is not in the input"));
        }
        for address in &j.endpoint.addresses {
            endpoints.push(EndpointReport {
                address: address.clone(),
                port: j.port,
                service_port: j.service_port.port as u16,
                pod: j.pod_name.clone(),
                ready: j
                    .endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true),
                sidecar,
                tls_mode: side.as_ref().map_or(TlsMode::Disabled, |x| x.tls_mode),
                peer_authentication: pa.clone(),
                decision,
                why: why.to_owned(),
                warnings: ep_warnings.clone(),
            });
        }
    }
    if endpoints.is_empty() && only_pod.is_none() && !mesh_external {
        warnings.push(
            "no endpoints: no EndpointSlice labelled kubernetes.io/service-name for this service"
                .into(),
        );
    }
    let mut summary = Summary::default();
    for e in &endpoints {
        match e.decision {
            Decision::Mtls | Decision::MutualUser => summary.mtls += 1,
            Decision::Plaintext => summary.plaintext += 1,
            Decision::Tls => summary.tls += 1,
            Decision::WillFail => summary.will_fail += 1,
        }
    }
    ServiceReport {
        service: format!("{svc_name}.{ns}"),
        fqdn,
        mesh_external,
        headless,
        auto_mtls: s.auto_mtls,
        client,
        namespace_peer_authentication: resolve_peer_auth(
            &objs.peer_authentications,
            &s.root_namespace,
            &ns,
            &Default::default(),
            None,
        ),
        destination_rule: dr.map(|d| DestinationRuleReport {
            name: d.metadata.name.clone().unwrap_or_default(),
            namespace: d.metadata.namespace.clone().unwrap_or_default(),
            host: d.spec.host.clone(),
        }),
        endpoints,
        summary,
        warnings,
    }
}

/// Describes `name.namespace`: its sidecar, PeerAuthentication, and how clients reach it.
pub fn describe_pod(
    objs: &MeshObjects,
    s: &MeshSettings,
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
        .map(|svc| {
            build_report(
                objs,
                s,
                svc,
                true,
                "a client with a sidecar".into(),
                None,
                Some(name),
            )
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
