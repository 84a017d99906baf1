//! Auto mTLS: which endpoints have a sidecar, and whether a client reaches each one over mTLS
//! or plaintext — Istio's decision table, made per endpoint.

mod decide;
mod describe;
mod endpoints;
mod error;
mod istio;
mod join;
mod kube;
mod peer_auth;
mod sidecar;
mod snapshot;
mod source;
mod template;

pub use self::kube::{list_all, start_kube_source};
pub use decide::{decide, Decision, DecisionInput, DrTlsMode};
pub use describe::{describe_pod, describe_service, EndpointReport, PodReport, ServiceReport};
pub use endpoints::{cluster_name, DiscoveryStats, DiscoveryView, EndpointEntry};
pub use error::DiscoveryError;
pub use istio::{DestinationRule, PeerAuthMode, PeerAuthentication};
pub use peer_auth::{resolve_peer_auth, PeerAuthResolution};
pub use sidecar::{sidecar_of, SidecarInfo, TlsMode};
pub use snapshot::{MeshObjects, MeshSettings};
pub use source::SnapshotSource;
pub use template::envoy_cluster;

/// The pod label that marks an endpoint mTLS-capable (Istio's rule).
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
