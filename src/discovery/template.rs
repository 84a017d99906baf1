//! The Envoy cluster for a service port, from the same plan EDS serves: socket matches
//! (`tlsMode-istio` → TLS from meshid's SDS, `tlsMode-disabled` → raw_buffer) only when auto
//! mTLS applies (`cluster_tls.go` `applyUpstreamTLSSettings`); one transport socket when a
//! DestinationRule sets TLS; none when the cluster is plaintext.

use serde_json::{json, Value};

use super::{
    decide::ClusterTls,
    plan::{plan_named, ClusterPlan},
    proof::NoProofs,
    DiscoveryError, DrTlsMode, MeshObjects, MeshSettings,
};
use crate::spiffe::TrustDomain;

fn sds(name: &str, meshid_cluster: &str) -> Value {
    json!({
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": meshid_cluster } }]
            }
        }
    })
}

const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

fn istio_mutual(plan: &ClusterPlan, td: &TrustDomain, meshid_cluster: &str) -> Value {
    // Peers must present the SPIFFE ID of one of the service's service accounts.
    let mut accounts: Vec<String> = plan
        .endpoints
        .iter()
        .filter_map(|e| {
            let sa = e.backend.service_account.as_deref()?;
            Some(format!(
                "{}/ns/{}/sa/{sa}",
                td.id_string(),
                e.backend.namespace
            ))
        })
        .collect();
    accounts.sort();
    accounts.dedup();
    let sans: Vec<Value> = accounts
        .iter()
        .map(|id| json!({ "san_type": "URI", "matcher": { "exact": id } }))
        .collect();
    json!({
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": UPSTREAM_TLS,
            "sni": format!("outbound_.{}_.{}_.{}", plan.port, plan.subset.as_deref().unwrap_or(""), plan.fqdn),
            "common_tls_context": {
                "alpn_protocols": ["istio-peer-exchange", "istio"],
                "tls_certificate_sds_secret_configs": [sds("default", meshid_cluster)],
                "combined_validation_context": {
                    "default_validation_context": { "match_typed_subject_alt_names": sans },
                    "validation_context_sds_secret_config": sds("ROOTCA", meshid_cluster)
                }
            }
        }
    })
}

fn raw_buffer() -> Value {
    json!({
        "name": "envoy.transport_sockets.raw_buffer",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" }
    })
}

/// The Envoy JSON of one planned cluster.
pub fn cluster_json(plan: &ClusterPlan, td: &TrustDomain, meshid_cluster: &str) -> Value {
    let mut c = json!({
        "name": plan.name,
        "connect_timeout": "10s",
    });
    if plan.served_by_eds {
        c["type"] = json!("EDS");
        c["eds_cluster_config"] = json!({ "service_name": plan.name, "eds_config": { "ads": {}, "resource_api_version": "V3" } });
    } else if plan.resolution.starts_with("DNS") {
        c["type"] = json!("STRICT_DNS");
    } else {
        c["type"] = json!("ORIGINAL_DST");
        c["lb_policy"] = json!("CLUSTER_PROVIDED");
    }
    match plan.tls {
        ClusterTls::AutoMatch => {
            c["transport_socket_matches"] = json!([
                { "name": "tlsMode-istio", "match": { "tlsMode": "istio" }, "transport_socket": istio_mutual(plan, td, meshid_cluster) },
                { "name": "tlsMode-disabled", "match": {}, "transport_socket": raw_buffer() }
            ]);
        }
        ClusterTls::Fixed(DrTlsMode::IstioMutual) => {
            c["transport_socket"] = istio_mutual(plan, td, meshid_cluster);
        }
        ClusterTls::Fixed(DrTlsMode::Simple) | ClusterTls::Fixed(DrTlsMode::Mutual) => {
            // TLS origination: the DestinationRule's own certificates (MUTUAL) are not meshid's
            // to serve; SNI is the host.
            c["transport_socket"] = json!({
                "name": TLS_SOCKET,
                "typed_config": { "@type": UPSTREAM_TLS, "sni": plan.fqdn, "common_tls_context": {} }
            });
        }
        ClusterTls::Fixed(DrTlsMode::Disable) | ClusterTls::Plain => {}
    }
    c
}

/// The cluster for `service` (`name.namespace`, or a ServiceEntry host) port `port`, in
/// Envoy's JSON config form.
pub fn envoy_cluster(
    objs: &MeshObjects,
    s: &MeshSettings,
    service: &str,
    port: u16,
    td: &TrustDomain,
    meshid_cluster: &str,
) -> Result<Value, DiscoveryError> {
    let plans =
        plan_named(objs, s, &NoProofs, service, None).ok_or_else(|| DiscoveryError::NotFound {
            what: "service",
            name: service.into(),
            known: vec![],
        })?;
    let ports: Vec<String> = plans.iter().map(|p| p.port.to_string()).collect();
    let plan = plans
        .iter()
        .find(|p| p.port == port && p.subset.is_none())
        .ok_or_else(|| DiscoveryError::NotFound {
            what: "port of service",
            name: format!("{service}:{port}"),
            known: ports,
        })?;
    Ok(cluster_json(plan, td, meshid_cluster))
}
