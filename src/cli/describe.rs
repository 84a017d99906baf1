//! `meshid describe service|pod NAME.NS`: why a connection is mTLS or plaintext.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Subcommand};

use super::Output;
use crate::{
    discovery::{
        describe_pod, describe_service_with, envoy_cluster, ClusterTls, MeshObjects, MeshSettings,
        NoProofs, PodReport, ServiceReport,
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
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "kubeconfig",
        conflicts_with = "kubeconfig"
    )]
    snapshot: Option<PathBuf>,
    /// Read the objects from the cluster of this kubeconfig instead.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
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
        match self {
            Self::Service(a) => {
                let (objs, settings) = a.source.load()?;
                if let Some(port) = a.envoy_cluster {
                    let cluster =
                        envoy_cluster(&objs, &settings, &a.name, port, &a.trust_domain, "meshid")?;
                    println!("{}", serde_json::to_string_pretty(&cluster)?);
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
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print_service(&report, a.mesh.is_some());
                }
            }
            Self::Pod(a) => {
                let (objs, settings) = a.source.load()?;
                let report = describe_pod(&objs, &settings, &a.name)?;
                if a.source.output.is_json() {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print_pod(&report);
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

fn cluster_tls_label(t: ClusterTls) -> String {
    match t {
        ClusterTls::AutoMatch => {
            "auto mTLS (socket matches tlsMode-istio / tlsMode-disabled)".into()
        }
        ClusterTls::Fixed(m) => format!("{m:?} for every endpoint"),
        ClusterTls::Plain => "no TLS".into(),
    }
}

fn print_service(r: &ServiceReport, istio: bool) {
    println!(
        "{}: {} ({}){}",
        r.kind,
        r.service,
        r.fqdn,
        if r.headless {
            ", headless/passthrough"
        } else {
            ""
        }
    );
    if r.mesh_external {
        println!("  mesh-external: auto mTLS does not apply");
    }
    if r.kind == "ServiceEntry" {
        println!("  Resolution:             {}", r.resolution);
    }
    println!("  Decisions for:          {}", r.client);
    println!(
        "  Auto mTLS:              {}",
        if r.auto_mtls { "on" } else { "off" }
    );
    println!(
        "  PeerAuthentication:     {} from {}",
        r.namespace_peer_authentication.mode, r.namespace_peer_authentication.source
    );
    match &r.destination_rule {
        Some(d) => {
            println!(
                "  DestinationRule:        {}/{} (host {})",
                d.namespace, d.name, d.host
            );
            println!("    cluster side:         {}", d.cluster_side);
            println!("    endpoint side:        {}", d.endpoint_side);
        }
        None => println!("  DestinationRule:        none (auto mTLS decides per endpoint)"),
    }
    print_clusters(r, istio);
    println!("  Endpoints:");
    for e in &r.endpoints {
        print_endpoint(e, istio);
    }
    let s = &r.summary;
    println!(
        "  Summary: {} mTLS, {} plaintext, {} TLS, {} will fail",
        s.mtls, s.plaintext, s.tls, s.will_fail
    );
    if istio {
        println!(
            "  Istio would decide otherwise for {} endpoint(s)",
            r.istio_differs
        );
    }
    if !r.clients.is_empty() {
        println!("  Clients:");
        for c in &r.clients {
            println!(
                "    {} ({}): {}",
                c.pod,
                if c.sidecar { "sidecar" } else { "no sidecar" },
                c.reaches_with
            );
        }
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
    for i in &r.ignored {
        println!("  ignored: {i}");
    }
}

fn print_clusters(r: &ServiceReport, istio: bool) {
    println!("  Clusters:");
    for c in &r.clusters {
        println!(
            "    {}  {}{}",
            c.name,
            cluster_tls_label(c.tls),
            if c.served_by_eds {
                ""
            } else {
                "  (not served by EDS)"
            }
        );
        println!("      why: {}", c.tls_why);
        if istio && c.istio_tls != c.tls {
            println!(
                "      istio: {} ({})",
                cluster_tls_label(c.istio_tls),
                c.istio_tls_why
            );
        }
    }
}

fn print_endpoint(e: &crate::discovery::EndpointReport, istio: bool) {
    println!(
        "    {}:{} (service port {})  {}  sidecar: {}  -> {}",
        e.address,
        e.port,
        e.service_port,
        e.workload,
        if e.sidecar { "yes" } else { "no" },
        e.decision.label()
    );
    println!(
        "      cluster {}{}; sidecar state: {}",
        e.cluster,
        if e.stale {
            " (STALE: its API server cannot be reached; last known endpoint)"
        } else {
            ""
        },
        e.sidecar_state
    );
    println!(
        "      why ({} side): {}; PeerAuthentication {} from {}",
        e.decided_by, e.why, e.peer_authentication.mode, e.peer_authentication.source
    );
    if istio {
        if e.istio.decision == e.decision {
            println!("      istio: same ({})", e.istio.decision.label());
        } else {
            println!(
                "      istio: {} ({} side): {}",
                e.istio.decision.label(),
                e.istio.decided_by,
                e.istio.why
            );
        }
    }
    for w in &e.warnings {
        println!("      warning: {w}");
    }
}

fn print_pod(r: &PodReport) {
    println!("Pod: {} (service account {})", r.pod, r.service_account);
    println!(
        "  Sidecar: {} (tlsMode {}, runs istio-proxy: {})",
        if r.sidecar.tls_mode == crate::discovery::TlsMode::Istio {
            "yes"
        } else {
            "no"
        },
        r.sidecar.tls_mode,
        r.sidecar.runs_proxy
    );
    for w in &r.sidecar.warnings {
        println!("  warning: pod {w}");
    }
    for (port, pa) in &r.peer_authentication {
        match port {
            None => println!(
                "  PeerAuthentication:        {} from {}",
                pa.mode, pa.source
            ),
            Some(p) => println!(
                "  PeerAuthentication :{p:<5}  {} from {}",
                pa.mode, pa.source
            ),
        }
    }
    for s in &r.services {
        println!();
        print_service(s, false);
    }
}
