//! `[discovery]`: where endpoints come from (exactly one source), remote clusters, and Istio's
//! mesh-wide settings, with their checks.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::duration::fmt_duration;

/// Where endpoints come from (exactly one source), and Istio's mesh-wide settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// A snapshot file (kubectl `-o json` or `-o yaml` of pods, endpointslices, services,
    /// namespaces, peerauthentications, destinationrules), re-read when it changes.
    #[serde(default)]
    pub snapshot: Option<PathBuf>,
    /// Watch a cluster through this kubeconfig.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Watch the cluster meshid runs in.
    #[serde(default)]
    pub in_cluster: bool,
    #[serde(default = "default_root_ns")]
    pub root_namespace: String,
    #[serde(default = "default_domain")]
    pub domain: String,
    #[serde(default = "default_true")]
    pub auto_mtls: bool,
    /// Serve a pod labelled tlsMode=istio as tlsMode disabled until one of its proxies holds an
    /// SDS stream or obtained a certificate within `proxy_proof_grace` (off: the label decides,
    /// as in Istio; silent sidecars are still shown by `describe` and counted in
    /// `meshid_discovery_declared_without_proxy`).
    #[serde(default)]
    pub require_proxy_proof: bool,
    /// How long a certificate fetched over the CSR API (or an SDS stream that closed) proves
    /// the pod's proxy. Covers istio-agent's renewal at half the certificate's lifetime.
    #[serde(default = "default_proof_grace", with = "crate::duration::serde")]
    pub proxy_proof_grace: Duration,
    /// With the state in a Secret (several replicas), how long after start a pod without a
    /// proof keeps its label's tlsMode: the proofs the other replicas share arrive, and this
    /// replica's proxies reconnect, within it.
    #[serde(
        default = "default_proof_startup_grace",
        with = "crate::duration::serde"
    )]
    pub proxy_proof_startup_grace: Duration,
    /// This cluster's name, shown next to its endpoints (multi-cluster discovery).
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
    /// Other clusters whose pods, services and endpointslices are merged per service hostname.
    #[serde(default)]
    pub clusters: Vec<RemoteCluster>,
    /// Also follow Istio's remote secrets: Secrets in `root_namespace` labelled
    /// `istio/multiCluster=true`, one kubeconfig per data key (the key names the cluster).
    #[serde(default)]
    pub remote_secrets: bool,
    /// Kubeconfig options a remote secret may use (istiod:
    /// `PILOT_INSECURE_MULTICLUSTER_KUBECONFIG_OPTIONS`): `exec`, `tokenFile`,
    /// `clientCertificate`, `clientKey`, `certificateAuthority`, `insecureSkipTlsVerify`, or an
    /// auth provider's name. None by default: such a kubeconfig is refused.
    #[serde(default)]
    pub insecure_kubeconfig_options: crate::discovery::KubeconfigPolicy,
}

/// A remote cluster for multi-cluster discovery.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteCluster {
    pub name: String,
    pub kubeconfig: PathBuf,
}

fn default_cluster_name() -> String {
    crate::identity::DEFAULT_CLUSTER.into()
}

impl Default for Discovery {
    fn default() -> Self {
        Self {
            snapshot: None,
            kubeconfig: None,
            in_cluster: false,
            root_namespace: default_root_ns(),
            domain: default_domain(),
            auto_mtls: true,
            require_proxy_proof: false,
            proxy_proof_grace: default_proof_grace(),
            proxy_proof_startup_grace: default_proof_startup_grace(),
            cluster_name: default_cluster_name(),
            clusters: Vec::new(),
            remote_secrets: false,
            insecure_kubeconfig_options: Default::default(),
        }
    }
}

fn default_proof_grace() -> Duration {
    Duration::from_secs(3600)
}

fn default_proof_startup_grace() -> Duration {
    Duration::from_secs(60)
}

fn default_root_ns() -> String {
    "istio-system".into()
}
fn default_domain() -> String {
    "cluster.local".into()
}
fn default_true() -> bool {
    true
}

impl Discovery {
    /// One source; cluster names unique; remote clusters only with a live source.
    pub fn validate(&self, errs: &mut Vec<String>) {
        let d = self;
        let n = [d.snapshot.is_some(), d.kubeconfig.is_some(), d.in_cluster]
            .iter()
            .filter(|b| **b)
            .count();
        if n != 1 {
            errs.push("discovery: set exactly one of snapshot, kubeconfig or in_cluster".into());
        }
        let mut names = vec![d.cluster_name.as_str()];
        for (i, c) in d.clusters.iter().enumerate() {
            if c.name.is_empty() || names.contains(&c.name.as_str()) {
                errs.push(format!(
                    "discovery.clusters[{i}].name: {:?} is empty or not unique (discovery.cluster_name is {:?})",
                    c.name, d.cluster_name
                ));
            }
            names.push(&c.name);
        }
        if d.snapshot.is_some() && (!d.clusters.is_empty() || d.remote_secrets) {
            errs.push(
                "discovery.clusters / discovery.remote_secrets: need a live source (kubeconfig or in_cluster), not a snapshot".into(),
            );
        }
        errs.extend(d.insecure_kubeconfig_options.validate());
        let grace = d.proxy_proof_grace;
        if grace.is_zero() || grace > Duration::from_secs(7 * 24 * 3600) {
            errs.push(format!(
                "discovery.proxy_proof_grace: {} is not between 1s and 7d",
                fmt_duration(grace)
            ));
        }
    }
}
