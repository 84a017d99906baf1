//! The Envoy cluster auto mTLS needs, as Istio builds it: EDS endpoints carry
//! `envoy.transport_socket_match: {tlsMode: istio}` on sidecar endpoints, and the cluster's
//! `transport_socket_matches` pick TLS from meshid's SDS for those, raw_buffer for the rest.

use serde_json::{json, Value};

use super::{DiscoveryError, MeshObjects, MeshSettings};
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

/// The cluster for `service` (`name.namespace`) port `port`, in Envoy's JSON config form.
pub fn envoy_cluster(
    objs: &MeshObjects,
    s: &MeshSettings,
    service: &str,
    port: u16,
    td: &TrustDomain,
    meshid_cluster: &str,
) -> Result<Value, DiscoveryError> {
    let report = super::describe_service(objs, s, service, None)?;
    // Peers must present the SPIFFE ID of one of the service's service accounts.
    let mut accounts: Vec<String> = report
        .endpoints
        .iter()
        .filter_map(|e| e.pod.as_deref())
        .filter_map(|p| {
            let (n, ns) = p.split_once('.')?;
            let pod = objs.pods.iter().find(|x| {
                x.metadata.name.as_deref() == Some(n) && x.metadata.namespace.as_deref() == Some(ns)
            })?;
            let sa = pod
                .spec
                .as_ref()?
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".into());
            Some(format!("{}/ns/{ns}/sa/{sa}", td.id_string()))
        })
        .collect();
    accounts.sort();
    accounts.dedup();
    let sans: Vec<Value> = accounts
        .iter()
        .map(|id| json!({ "san_type": "URI", "matcher": { "exact": id } }))
        .collect();
    let name = format!("outbound|{port}||{}", report.fqdn);
    Ok(json!({
        "name": name,
        "type": "EDS",
        "eds_cluster_config": { "service_name": name, "eds_config": { "ads": {}, "resource_api_version": "V3" } },
        "connect_timeout": "10s",
        "transport_socket_matches": [
            {
                "name": "tlsMode-istio",
                "match": { "tlsMode": "istio" },
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "sni": format!("outbound_.{port}_._.{}", report.fqdn),
                        "common_tls_context": {
                            "alpn_protocols": ["istio-peer-exchange", "istio"],
                            "tls_certificate_sds_secret_configs": [sds("default", meshid_cluster)],
                            "combined_validation_context": {
                                "default_validation_context": { "match_typed_subject_alt_names": sans },
                                "validation_context_sds_secret_config": sds("ROOTCA", meshid_cluster)
                            }
                        }
                    }
                }
            },
            {
                "name": "tlsMode-disabled",
                "match": {},
                "transport_socket": {
                    "name": "envoy.transport_sockets.raw_buffer",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" }
                }
            }
        ]
    }))
}
