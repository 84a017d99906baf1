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

/// How the proxy reaches meshid for SDS and EDS: Envoy's Google gRPC client straight to
/// meshid's gRPC port, verifying it with the mesh root and sending the pod's projected token
/// (re-read as the kubelet rotates it) and its `ClusterID`, as the workload example's
/// bootstrap (`deploy/kubernetes/examples/workload/envoy-bootstrap.yaml`) does. meshid serves
/// SDS and EDS as their own services (no ADS), so each config source names this gRPC service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshidGrpc {
    /// meshid's gRPC address, `host:port`.
    pub target_uri: String,
    /// The mesh root the proxy verifies meshid with.
    pub root_cert_file: String,
    /// The projected service-account token (audience `istio-ca`).
    pub token_file: String,
    /// The `ClusterID` metadata.
    pub cluster_id: String,
}

impl Default for MeshidGrpc {
    fn default() -> Self {
        Self {
            target_uri: "meshid.istio-system.svc:15012".into(),
            root_cert_file: "/var/run/secrets/istio/root-cert.pem".into(),
            token_file: "/var/run/secrets/tokens/istio-token".into(),
            cluster_id: "Kubernetes".into(),
        }
    }
}

impl MeshidGrpc {
    /// An `envoy.config.core.v3.ConfigSource` for meshid's SDS or EDS service.
    pub fn config_source(&self) -> Value {
        json!({
            "resource_api_version": "V3",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{
                    "google_grpc": {
                        "target_uri": self.target_uri,
                        "stat_prefix": "meshid",
                        "channel_credentials": {
                            "ssl_credentials": { "root_certs": { "filename": self.root_cert_file } }
                        },
                        "call_credentials": [{
                            "from_plugin": {
                                "name": "envoy.grpc_credentials.file_based_metadata",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.config.grpc_credential.v3.FileBasedMetadataConfig",
                                    "secret_data": { "filename": self.token_file },
                                    "header_key": "authorization",
                                    "header_prefix": "Bearer "
                                }
                            }
                        }],
                        "credentials_factory_name": "envoy.grpc_credentials.file_based_metadata"
                    },
                    "initial_metadata": [{ "key": "ClusterID", "value": self.cluster_id }]
                }]
            }
        })
    }
}

fn sds(name: &str, meshid: &MeshidGrpc) -> Value {
    json!({ "name": name, "sds_config": meshid.config_source() })
}

const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

fn istio_mutual(plan: &ClusterPlan, td: &TrustDomain, meshid: &MeshidGrpc) -> Value {
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
                "tls_certificate_sds_secret_configs": [sds("default", meshid)],
                "combined_validation_context": {
                    "default_validation_context": { "match_typed_subject_alt_names": sans },
                    "validation_context_sds_secret_config": sds("ROOTCA", meshid)
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
pub fn cluster_json(plan: &ClusterPlan, td: &TrustDomain, meshid: &MeshidGrpc) -> Value {
    let mut c = json!({
        "name": plan.name,
        "connect_timeout": "10s",
    });
    if plan.served_by_eds {
        c["type"] = json!("EDS");
        c["eds_cluster_config"] =
            json!({ "service_name": plan.name, "eds_config": meshid.config_source() });
    } else if plan.resolution.starts_with("DNS") {
        c["type"] = json!("STRICT_DNS");
    } else {
        c["type"] = json!("ORIGINAL_DST");
        c["lb_policy"] = json!("CLUSTER_PROVIDED");
    }
    match plan.tls {
        ClusterTls::AutoMatch => {
            c["transport_socket_matches"] = json!([
                { "name": "tlsMode-istio", "match": { "tlsMode": "istio" }, "transport_socket": istio_mutual(plan, td, meshid) },
                { "name": "tlsMode-disabled", "match": {}, "transport_socket": raw_buffer() }
            ]);
        }
        ClusterTls::Fixed(DrTlsMode::IstioMutual) => {
            c["transport_socket"] = istio_mutual(plan, td, meshid);
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
    meshid: &MeshidGrpc,
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
    Ok(cluster_json(plan, td, meshid))
}
