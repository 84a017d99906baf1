//! Auto mTLS: which endpoints have a sidecar (declared by label, proven by their proxies), and
//! whether a client reaches each one over mTLS or plaintext — one decision (`plan`) read by
//! EDS, the Envoy cluster template and `describe`, after Istio's own rules.

pub mod config;
mod decide;
mod describe;
mod endpoints;
mod error;
mod ignored;
mod istio;
mod join;
mod kube;
mod kubeconfig;
mod multicluster;
mod peer_auth;
mod plan;
mod proof;
mod render;
mod rules;
mod sidecar;
mod snapshot;
mod source;
mod template;

pub use self::kube::{list_all, start_kube_source, MultiCluster};
pub use decide::{
    cluster_tls, endpoint_metadata, outcome, ClusterInput, ClusterTls, Decision, DrTlsMode,
    EndpointInput, Inbound,
};
pub use describe::{
    describe_pod, describe_pod_with, describe_service, describe_service_with, ClientReport,
    ClusterReport, EndpointReport, PodReport, ServiceReport,
};
pub use endpoints::{cluster_name, DiscoveryStats, DiscoveryView, EndpointEntry};
pub use error::DiscoveryError;
pub use ignored::ignored_fields;
pub use istio::{DestinationRule, PeerAuthMode, PeerAuthentication, ServiceEntry, WorkloadEntry};
pub use join::Backend;
pub use kubeconfig::{KubeconfigPolicy, KubeconfigRefused};
pub use multicluster::{watch_remote_secrets, RemoteObjects, RemoteSecrets, REMOTE_SECRET_LABEL};
pub use peer_auth::{resolve_peer_auth, PeerAuthResolution};
pub use plan::{
    plan_all, plan_named, plan_named_for, Client, ClusterPlan, EndpointPlan, Mesh, Planner, Verdict,
};
pub use proof::{
    NoProofs, PodName, ProofLookup, ProofSnapshot, ProxyProof, ProxyRegistry, SharedProof,
    StreamGuard,
};
pub use render::{pod_text, service_text};
pub use sidecar::{sidecar_of, SidecarInfo, TlsMode};
pub use snapshot::{MeshObjects, MeshSettings};
pub use source::{spawn_view, SnapshotSource};
pub use template::{cluster_json, envoy_cluster, MeshidGrpc};

/// The pod label that marks an endpoint mTLS-capable (Istio's rule).
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
