//! A cluster's TLS settings as istiod's CDS would carry them, from discovery's own public
//! functions over the snapshot the server reads: `envoy_cluster` for the peers' SPIFFE IDs,
//! `describe_service` for the decision per endpoint and a DestinationRule's override.

use std::path::PathBuf;

use super::DemoError;
use crate::{
    discovery::{describe_service, envoy_cluster, Decision, MeshObjects, MeshSettings},
    spiffe::{SpiffeId, TrustDomain},
};

/// How a cluster picks its transport socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterTls {
    /// Auto mTLS: `tlsMode-istio` for endpoints whose EDS metadata says `tlsMode: istio`,
    /// `tlsMode-disabled` (raw_buffer) for the rest.
    SocketMatches,
    /// A DestinationRule sets the TLS mode for the whole cluster.
    DestinationRule(String),
}

/// One endpoint's decision according to discovery, with its explanation.
#[derive(Clone, Debug)]
pub struct EndpointDecision {
    pub addr: String,
    pub port: u16,
    pub decision: Decision,
    pub why: String,
}

/// A cluster's configuration as the sidecar uses it.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub tls: ClusterTls,
    /// SPIFFE IDs an mTLS peer must present (the service's service accounts).
    pub peer_ids: Vec<SpiffeId>,
    pub decisions: Vec<EndpointDecision>,
}

/// The demo's control-plane view of the cluster configuration: discovery over the same
/// snapshot file the server reads.
#[derive(Clone)]
pub(crate) struct ClusterSource {
    pub snapshot: PathBuf,
    pub settings: MeshSettings,
    pub td: TrustDomain,
    /// The calling pod, `name.namespace`.
    pub client_pod: String,
}

impl ClusterSource {
    pub(crate) fn cluster(&self, service: &str, port: u16) -> Result<ClusterConfig, DemoError> {
        let bytes = std::fs::read(&self.snapshot)
            .map_err(|e| DemoError::conn(format!("reading {}", self.snapshot.display()), e))?;
        let objs = MeshObjects::from_snapshot(&bytes)
            .map_err(|e| DemoError::conn("parsing the discovery snapshot", e))?;
        let template = envoy_cluster(
            &objs,
            &self.settings,
            service,
            port,
            &self.td,
            &crate::discovery::MeshidGrpc::default(),
        )
        .map_err(|e| DemoError::conn(format!("cluster for {service}:{port}"), e))?;
        let peer_ids = peer_ids(&template);
        let report = describe_service(&objs, &self.settings, service, Some(&self.client_pod))
            .map_err(|e| DemoError::conn(format!("describe {service}"), e))?;
        let tls = match &report.destination_rule {
            Some(dr) => ClusterTls::DestinationRule(format!("{}.{}", dr.name, dr.namespace)),
            None => ClusterTls::SocketMatches,
        };
        let decisions = report
            .endpoints
            .iter()
            .filter(|e| e.service_port == port)
            .map(|e| EndpointDecision {
                addr: e.address.clone(),
                port: e.port,
                decision: e.decision,
                why: e.why.clone(),
            })
            .collect();
        Ok(ClusterConfig {
            tls,
            peer_ids,
            decisions,
        })
    }
}

/// The URI SANs the `tlsMode-istio` socket match requires.
fn peer_ids(template: &serde_json::Value) -> Vec<SpiffeId> {
    let matches = template["transport_socket_matches"].as_array();
    matches
        .into_iter()
        .flatten()
        .filter(|m| m["name"] == "tlsMode-istio")
        .flat_map(|m| {
            m.pointer("/transport_socket/typed_config/common_tls_context/combined_validation_context/default_validation_context/match_typed_subject_alt_names")
                .and_then(|v| v.as_array())
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|san| san.pointer("/matcher/exact")?.as_str().map(str::to_owned))
        .filter_map(|s| SpiffeId::parse(&s).ok())
        .collect()
}
