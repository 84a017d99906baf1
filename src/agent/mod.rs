//! `meshid agent`: the node-local side, as istio-agent and SPIRE's agent are. The key is made
//! here and only a CSR goes to the server (Istio's CSR API, with the projected token re-read on
//! every call); the certificate is served to the local proxy over Envoy SDS on a Unix socket and
//! to workloads over the SPIFFE Workload API on another. The trust bundle is followed over the
//! server's own SDS, so a root change reaches the local proxy at once.
//!
//! Parts: `view` (what the agent holds, one `watch` channel), `upstream` (the server: CSR API
//! and the trust stream), `svid` (the renewal loop, `rotation::Renewer`), `local_sds` and
//! `files` (SDS on the socket, istio-agent's file-mounted names), `workload_api`.

mod files;
mod local_sds;
mod svid;
mod upstream;
pub mod view;
pub mod workload_api;

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use tokio::sync::watch;

pub use view::{Svid, Trust, View};
pub use workload_api::{CallerPolicy, SECURITY_HEADER};

use crate::{
    api::{workload::spiffe_workload_api_server::SpiffeWorkloadApiServer, xds::XdsMetrics},
    clock::Clock,
    net::unix_incoming,
    rotation::RenewPolicy,
    shutdown::stopping,
    telemetry::{Health, HttpLimits, Metrics, NotReady},
};

/// Largest request either socket decodes (SDS requests and Workload API calls are small).
const MAX_REQUEST_BYTES: usize = 1 << 20;

/// The agent's configuration (`meshid agent` flags).
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `https://host:port`, or `unix:/path` for a server on the same machine.
    pub server: String,
    /// The DNS name the server's certificate must carry.
    pub server_name: String,
    /// The mesh root(s) to verify the server with until the agent holds a bundle.
    pub root_cert: Option<PathBuf>,
    /// The projected service-account token (re-read on every call).
    pub token_file: PathBuf,
    /// Istio's `ClusterID`: the cluster whose tokens authenticate the agent.
    pub cluster_id: Option<String>,
    pub sds_socket: PathBuf,
    pub workload_api_socket: Option<PathBuf>,
    /// A group that may use the sockets too (mode 0660); none: owner only (0600).
    pub socket_group: Option<u32>,
    pub callers: CallerPolicy,
    /// Requested certificate lifetime (`None`: the server's default).
    pub ttl: Option<Duration>,
    /// Write `cert-chain.pem`, `key.pem` and `root-cert.pem` here after each renewal.
    pub out_dir: Option<PathBuf>,
    /// `/metrics`, `/healthz` and `/readyz`.
    pub http: Option<SocketAddr>,
    pub renew: RenewPolicy,
    /// Connections each socket holds open at once.
    pub max_connections: usize,
}

/// Why the agent could not start or do its job.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("token file {file}: {why}")]
    Token { file: PathBuf, why: String },
    #[error("root certificate file {file}: {why}")]
    RootCert { file: PathBuf, why: String },
    #[error("server: {0}")]
    Server(String),
    #[error("server refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the server's answer is unusable: {0}")]
    BadResponse(String),
    #[error("generating the key or CSR: {0}")]
    Key(String),
    #[error("{what} {path}: {error}")]
    Socket {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("binding {addr}: {error}")]
    Http {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// The agent's own metrics (beside the SDS ones its socket shares with the server's names).
pub struct AgentMetrics {
    /// When the held certificate expires (Unix seconds; 0 before the first).
    pub svid_expiry: Gauge,
    pub renewals: Family<Vec<(String, String)>, Counter>,
    pub bundle_updates: Counter,
    pub trust_stream_errors: Counter,
    pub workload_api_streams: Gauge,
    pub workload_api_refused: Family<Vec<(String, String)>, Counter>,
}

impl AgentMetrics {
    fn register(m: &mut Metrics) -> Self {
        let a = Self {
            svid_expiry: Gauge::default(),
            renewals: Family::default(),
            bundle_updates: Counter::default(),
            trust_stream_errors: Counter::default(),
            workload_api_streams: Gauge::default(),
            workload_api_refused: Family::default(),
        };
        let r = m.registry_mut();
        r.register(
            "meshid_agent_certificate_expiry_timestamp_seconds",
            "When the agent's certificate expires (Unix seconds; 0 before the first)",
            a.svid_expiry.clone(),
        );
        r.register(
            "meshid_agent_renewals",
            "Certificate renewals through the CSR API, by result (ok, error)",
            a.renewals.clone(),
        );
        r.register(
            "meshid_agent_bundle_updates",
            "Trust bundle changes pushed by the server",
            a.bundle_updates.clone(),
        );
        r.register(
            "meshid_agent_trust_stream_errors",
            "Trust bundle streams from the server that broke (reopened with backoff)",
            a.trust_stream_errors.clone(),
        );
        r.register(
            "meshid_agent_workload_api_streams",
            "Open Workload API streams",
            a.workload_api_streams.clone(),
        );
        r.register(
            "meshid_agent_workload_api_refused",
            "Workload API calls refused, by reason",
            a.workload_api_refused.clone(),
        );
        // Known label values at 0 from the start (dashboards and `rate()` see them).
        for result in ["ok", "error"] {
            let _ = a.renewals.get_or_create(&Metrics::label("result", result));
        }
        for reason in ["no-security-header", "not-selected"] {
            let _ = a
                .workload_api_refused
                .get_or_create(&Metrics::label("reason", reason));
        }
        a
    }
}

/// A running agent.
pub struct RunningAgent {
    view: watch::Receiver<View>,
    pub http: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningAgent {
    /// What the agent holds, and its changes.
    pub fn view(&self) -> watch::Receiver<View> {
        self.view.clone()
    }

    /// Waits until every task has ended (after `stop` fired).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Readiness: a certificate is held and unexpired.
struct AgentHealth {
    view: watch::Receiver<View>,
    clock: Arc<dyn Clock>,
}

impl Health for AgentHealth {
    fn ready(&self) -> Result<(), NotReady> {
        let v = self.view.borrow();
        let not_ready = |s: String| NotReady(s.into());
        match &v.svid {
            None => Err(not_ready(
                "no certificate received from the server yet".into(),
            )),
            Some(s) if s.not_after <= self.clock.now() => Err(not_ready(format!(
                "the certificate expired at {} and could not be renewed",
                crate::clock::rfc3339(s.not_after)
            ))),
            Some(_) if v.trust.is_empty() => Err(not_ready("no trust bundle yet".into())),
            Some(_) => Ok(()),
        }
    }

    fn details(&self) -> Vec<String> {
        let v = self.view.borrow();
        let mut out = Vec::new();
        if let Some(s) = &v.svid {
            out.push(format!(
                "certificate {} serial {} valid until {}",
                s.spiffe_id,
                s.serial,
                crate::clock::rfc3339(s.not_after)
            ));
        }
        out.push(format!(
            "trust bundle: {} trust domain(s), update {} ({:?})",
            v.trust.domains.len(),
            v.trust.seq,
            v.trust.source
        ));
        out
    }
}

/// Binds a Unix socket at `path` (a stale socket file is replaced) with mode 0600, or 0660
/// and group `group`.
fn bind_socket(path: &Path, group: Option<u32>) -> Result<tokio::net::UnixListener, AgentError> {
    let err = |what: &'static str| {
        let path = path.to_owned();
        move |error| AgentError::Socket { what, path, error }
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(AgentError::Socket {
                what: "refusing to replace",
                path: path.to_owned(),
                error: std::io::Error::other("the path exists and is not a socket"),
            });
        }
        std::fs::remove_file(path).map_err(err("removing the stale socket"))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err("binding"))?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(err("setting the mode of"))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err("changing the group of"))?;
    }
    Ok(listener)
}

async fn serve_socket<S>(
    listener: tokio::net::UnixListener,
    service: S,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
) where
    S: tower::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let incoming = unix_incoming(listener, max_connections, stop.clone());
    if let Err(e) = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move { stopping(&mut stop).await })
        .await
    {
        tracing::error!(error = %e, socket = what, "serving the socket failed");
    }
}

/// Starts the agent: binds its sockets (and HTTP port) first, so a bad path fails here, then
/// runs the renewal, the trust stream and the servers until `stop` fires.
pub async fn start(
    cfg: AgentConfig,
    clock: Arc<dyn Clock>,
    stop: watch::Receiver<bool>,
) -> Result<RunningAgent, AgentError> {
    if !cfg.server.starts_with("unix:") && cfg.root_cert.is_none() {
        return Err(AgentError::Config(
            "a TLS server needs --root-cert (the mesh root, e.g. root-cert.pem)".into(),
        ));
    }
    if !cfg.token_file.exists() {
        tracing::warn!(file = %cfg.token_file.display(), "the token file does not exist yet; the agent retries until it does");
    }
    let mut metrics = Metrics::new();
    let agent_metrics = Arc::new(AgentMetrics::register(&mut metrics));
    let metrics = Arc::new(metrics);
    let (view_tx, view_rx) = watch::channel(View::default());
    let view_tx = Arc::new(view_tx);

    let sds_listener = bind_socket(&cfg.sds_socket, cfg.socket_group)?;
    let wl_listener = cfg
        .workload_api_socket
        .as_deref()
        .map(|p| bind_socket(p, cfg.socket_group))
        .transpose()?;
    let http_listener = match cfg.http {
        Some(addr) => {
            Some(crate::net::bind_tcp(addr).map_err(|error| AgentError::Http { addr, error })?)
        }
        None => None,
    };
    let http = http_listener.as_ref().and_then(|l| l.local_addr().ok());

    let upstream = Arc::new(upstream::Upstream {
        server: cfg.server.clone(),
        server_name: cfg.server_name.clone(),
        root_cert: cfg.root_cert.clone(),
        token_file: cfg.token_file.clone(),
        cluster_id: cfg.cluster_id.clone(),
        clock: clock.clone(),
    });
    let mut tasks = Vec::new();
    let keeper = svid::SvidKeeper {
        upstream: upstream.clone(),
        view: view_tx.clone(),
        policy: cfg.renew,
        ttl: cfg.ttl,
        out_dir: cfg.out_dir.clone(),
        metrics: agent_metrics.clone(),
    };
    tasks.push(tokio::spawn(keeper.run(stop.clone())));
    tasks.push(tokio::spawn(upstream.follow_trust(
        view_tx.clone(),
        agent_metrics.clone(),
        stop.clone(),
    )));

    let xds = Arc::new(XdsMetrics {
        streams: metrics.sds_streams.clone(),
        pushes: metrics.sds_pushes.clone(),
        nacks: metrics.sds_nacks.clone(),
        latency: metrics.sds_push_latency.clone(),
        unknown_names: metrics
            .xds_unknown_names
            .get_or_create(&Metrics::label("type", "sds"))
            .clone(),
        kind: "sds",
        max_names: crate::api::config::DEFAULT_SDS_MAX_NAMES,
    });
    let sds = SecretDiscoveryServiceServer::new(local_sds::LocalSds::new(
        view_rx.clone(),
        xds,
        stop.clone(),
    ))
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    tasks.push(tokio::spawn(serve_socket(
        sds_listener,
        sds,
        cfg.max_connections,
        stop.clone(),
        "SDS",
    )));
    if let Some(listener) = wl_listener {
        let api = SpiffeWorkloadApiServer::new(workload_api::WorkloadApi::new(
            view_rx.clone(),
            cfg.callers.clone(),
            agent_metrics.clone(),
            stop.clone(),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        tasks.push(tokio::spawn(serve_socket(
            listener,
            api,
            cfg.max_connections,
            stop.clone(),
            "Workload API",
        )));
    }
    if let Some(listener) = http_listener {
        let health = Arc::new(AgentHealth {
            view: view_rx.clone(),
            clock: clock.clone(),
        });
        let limits = HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 64,
            debug_from: Vec::new(),
        };
        tasks.push(tokio::spawn(crate::telemetry::serve_http(
            listener,
            metrics.clone(),
            health,
            limits,
            stop.clone(),
        )));
    }
    tracing::info!(server = %cfg.server, sds = %cfg.sds_socket.display(), workload_api = ?cfg.workload_api_socket, "agent started");
    Ok(RunningAgent {
        view: view_rx,
        http,
        metrics,
        tasks,
    })
}
