//! `meshid describe service|pod NAME.NS`: why a connection is mTLS or plaintext.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Subcommand};

use super::Output;
use crate::{
    discovery::{
        describe_pod, describe_service_with, envoy_cluster, pod_text, service_text, MeshObjects,
        MeshSettings, MeshidGrpc, NoProofs,
    },
    spiffe::TrustDomain,
};

#[derive(Debug, Subcommand)]
pub(super) enum DescribeCommand {
    /// A service: each endpoint, its sidecar, PeerAuthentication, DestinationRule TLS, and the decision.
    Service(ServiceArgs),
    /// A pod: its sidecar, PeerAuthentication per port, and how clients of its services reach it.
    Pod(PodArgs),
}

/// Where the mesh objects come from, and mesh-wide settings.
#[derive(Debug, Args)]
#[group(id = "source_group")]
pub(super) struct Source {
    /// A snapshot: `kubectl get pods,endpointslices,services,namespaces,peerauthentications,destinationrules -A -o json` (or -o yaml).
    /// Decides as a server with no proxy connected would.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present_any = ["kubeconfig", "server"],
        conflicts_with_all = ["kubeconfig", "server"]
    )]
    snapshot: Option<PathBuf>,
    /// Read the objects from the cluster of this kubeconfig instead (no proxy connected).
    #[arg(long, value_name = "FILE", conflicts_with = "server")]
    kubeconfig: Option<PathBuf>,
    /// Ask a running meshid server instead (its HTTP port, e.g. http://127.0.0.1:15014): its
    /// objects, its settings (`require_proxy_proof`, its cluster name) and its live proofs of
    /// which proxies are connected, so the answer is the EDS metadata it serves now. Served to
    /// loopback (or `listen.debug_from`) only, like /debug/rotation.
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// Istio's root namespace (its selector-less PeerAuthentication is mesh-wide).
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Cluster DNS domain.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// Describe as if auto mTLS were off (Istio's enableAutoMtls: false).
    #[arg(long)]
    auto_mtls_off: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

impl Source {
    fn load(&self) -> anyhow::Result<(MeshObjects, MeshSettings)> {
        let objs = match (&self.snapshot, &self.kubeconfig) {
            (Some(path), _) => {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                MeshObjects::from_snapshot(&bytes)
                    .with_context(|| format!("reading snapshot {}", path.display()))?
            }
            (None, kubeconfig) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let client = crate::server::kube_client(kubeconfig.as_deref())
                        .await
                        .map_err(anyhow::Error::msg)?;
                    Ok::<_, anyhow::Error>(crate::discovery::list_all(client).await?)
                })?
            }
        };
        let settings = MeshSettings {
            auto_mtls: !self.auto_mtls_off,
            root_namespace: self.root_namespace.clone(),
            domain: self.domain.clone(),
            require_proxy_proof: false,
            cluster_name: "Kubernetes".into(),
        };
        Ok((objs, settings))
    }
}

#[derive(Debug, Args)]
pub(super) struct ServiceArgs {
    /// The service, as NAME.NAMESPACE.
    name: String,
    #[command(flatten)]
    source: Source,
    /// Decide for this client pod (NAME.NAMESPACE) instead of a client with a sidecar.
    #[arg(long, value_name = "POD.NS")]
    from: Option<String>,
    /// Print the Envoy cluster (transport_socket_matches tlsMode-istio / tlsMode-disabled) for this port instead.
    #[arg(long, value_name = "PORT")]
    envoy_cluster: Option<u16>,
    /// Also predict what an Istio sidecar fed by istiod would do (its limits: namespace-level
    /// policy only, headless all-or-nothing, the label decides), next to meshid's answer.
    #[arg(long, value_enum)]
    mesh: Option<MeshFlavour>,
    /// List the pods of the input as clients and whether each reaches the service with mTLS.
    #[arg(long)]
    clients: bool,
    /// Trust domain, for the SPIFFE IDs in --envoy-cluster.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: TrustDomain,
    /// For --envoy-cluster: meshid's gRPC address, where the cluster's EDS and SDS go.
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "meshid.istio-system.svc:15012"
    )]
    meshid_address: String,
    /// For --envoy-cluster: the mesh root the proxy verifies meshid with.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    root_cert_file: String,
    /// For --envoy-cluster: the projected service-account token (audience istio-ca) the proxy sends.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    token_file: String,
    /// For --envoy-cluster: the ClusterID the proxy sends.
    #[arg(long, default_value = "Kubernetes")]
    cluster_id: String,
}

/// Whose data plane to predict besides meshid's.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(super) enum MeshFlavour {
    Istio,
}

#[derive(Debug, Args)]
pub(super) struct PodArgs {
    /// The pod, as NAME.NAMESPACE.
    name: String,
    #[command(flatten)]
    source: Source,
}

impl DescribeCommand {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        if let Some(url) = self.server() {
            out!("{}", self.ask(url)?);
            return Ok(ExitCode::SUCCESS);
        }
        match self {
            Self::Service(a) => {
                let (objs, settings) = a.source.load()?;
                if let Some(port) = a.envoy_cluster {
                    let meshid = MeshidGrpc {
                        target_uri: a.meshid_address,
                        root_cert_file: a.root_cert_file,
                        token_file: a.token_file,
                        cluster_id: a.cluster_id,
                    };
                    let cluster =
                        envoy_cluster(&objs, &settings, &a.name, port, &a.trust_domain, &meshid)?;
                    outln!("{}", serde_json::to_string_pretty(&cluster)?);
                    return Ok(ExitCode::SUCCESS);
                }
                let report = describe_service_with(
                    &objs,
                    &settings,
                    &NoProofs,
                    &a.name,
                    a.from.as_deref(),
                    a.clients,
                )?;
                if a.source.output.is_json() {
                    outln!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    out!("{}", service_text(&report, a.mesh.is_some()));
                }
            }
            Self::Pod(a) => {
                let (objs, settings) = a.source.load()?;
                let report = describe_pod(&objs, &settings, &a.name)?;
                if a.source.output.is_json() {
                    outln!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    out!("{}", pod_text(&report));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    fn server(&self) -> Option<&str> {
        match self {
            Self::Service(a) => a.source.server.as_deref(),
            Self::Pod(a) => a.source.server.as_deref(),
        }
    }

    /// The running server's answer (`/debug/describe/service|pod`), from the same decision
    /// code with its live proofs.
    fn ask(&self, server: &str) -> anyhow::Result<String> {
        let (kind, name, output, mut query) = match self {
            Self::Service(a) => {
                if a.envoy_cluster.is_some() {
                    anyhow::bail!("--envoy-cluster is printed from a snapshot or a kubeconfig, not from --server");
                }
                let mut q = Vec::new();
                if let Some(f) = &a.from {
                    q.push(format!("from={}", query_escape(f)));
                }
                if a.clients {
                    q.push("clients=true".into());
                }
                if a.mesh.is_some() {
                    q.push("mesh=istio".into());
                }
                ("service", &a.name, a.source.output, q)
            }
            Self::Pod(a) => ("pod", &a.name, a.source.output, Vec::new()),
        };
        query.push(format!("name={}", query_escape(name)));
        query.push(format!(
            "output={}",
            if output.is_json() { "json" } else { "text" }
        ));
        let base = server.trim_end_matches('/');
        if !base.starts_with("http://") {
            anyhow::bail!("--server {server:?}: give the server's plain HTTP port as http://HOST:PORT (the port of /metrics)");
        }
        let url = format!("{base}/debug/describe/{kind}?{}", query.join("&"));
        let mut get = crate::http_client::Get::new(&url).max_body(16 << 20);
        get.accept = "application/json, text/plain";
        let body = get.send_blocking().map_err(|e| match &e {
            crate::http_client::HttpError::Status { status: 403, .. } => anyhow::anyhow!(
                "{e}: the server answers describe to loopback callers only (kubectl port-forward deploy/meshid 15014), or to listen.debug_from"
            ),
            _ => anyhow::Error::new(e),
        })?;
        Ok(crate::http_client::printable_text(
            &String::from_utf8_lossy(&body),
        ))
    }
}

/// `s` percent-encoded for a query string.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
