//! The one join auto mTLS needs everywhere: a service's ports, through its EndpointSlices
//! (`kubernetes.io/service-name`, ports matched by name), to each endpoint and its pod.

use k8s_openapi::api::{
    core::v1::{Pod, Service, ServicePort},
    discovery::v1::Endpoint,
};

use super::MeshObjects;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One endpoint on one service port.
pub(crate) struct JoinedEndpoint<'a> {
    pub service_port: &'a ServicePort,
    /// The endpoint (target) port.
    pub port: u16,
    pub endpoint: &'a Endpoint,
    /// `name.namespace` the endpoint names, if any.
    pub pod_name: Option<String>,
    /// The pod itself, when it is in the input.
    pub pod: Option<&'a Pod>,
}

/// Every endpoint of `svc`, per service port.
pub(crate) fn service_endpoints<'a>(
    objs: &'a MeshObjects,
    svc: &'a Service,
) -> Vec<JoinedEndpoint<'a>> {
    let (Some(name), Some(ns)) = (
        svc.metadata.name.as_deref(),
        svc.metadata.namespace.as_deref(),
    ) else {
        return Vec::new();
    };
    let slices = objs.endpoint_slices.iter().filter(|e| {
        e.metadata.namespace.as_deref() == Some(ns)
            && e.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(String::as_str)
                == Some(name)
    });
    let mut out = Vec::new();
    for slice in slices {
        for sp in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            let same_name = |p: &&k8s_openapi::api::discovery::v1::EndpointPort| {
                p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or("")
            };
            let Some(ep_port) = slice.ports.iter().flatten().find(same_name) else {
                continue;
            };
            let port = ep_port.port.unwrap_or(sp.port) as u16;
            for endpoint in &slice.endpoints {
                let target = endpoint
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"));
                let pod_ref = target.and_then(|r| {
                    Some((
                        r.name.clone()?,
                        r.namespace.clone().unwrap_or_else(|| ns.to_owned()),
                    ))
                });
                let pod = pod_ref.as_ref().and_then(|(pn, pns)| {
                    objs.pods.iter().find(|p| {
                        p.metadata.name.as_deref() == Some(pn.as_str())
                            && p.metadata.namespace.as_deref() == Some(pns.as_str())
                    })
                });
                out.push(JoinedEndpoint {
                    service_port: sp,
                    port,
                    endpoint,
                    pod_name: pod_ref.map(|(pn, pns)| format!("{pn}.{pns}")),
                    pod,
                });
            }
        }
    }
    out
}
