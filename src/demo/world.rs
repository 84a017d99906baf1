//! The demo's world: a work directory with a fresh CA and a dev token issuer, the mixed-traffic
//! snapshot rewritten to loopback listeners, `meshid server` in-process on 127.0.0.1, the three
//! applications and two sidecars connected to meshid over SDS and EDS.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use envoy_types::pb::envoy::config::core::v3::Node;
use serde_json::Value;
use tokio::{net::TcpListener, sync::watch};

pub use super::snapshot::with_destination_rule;
use super::{
    apps::EchoApp,
    cluster::ClusterSource,
    control::{subscribe, ControlPlane, ProxyState, XdsKind},
    sidecar::{serve_inbound, Sidecar},
    snapshot::{rewrite_snapshot, server_config, write_snapshot, Ports},
    DemoError,
};
use crate::{
    ca::{cert, root, KeyType},
    clock::{Clock, SystemClock},
    discovery::{cluster_name, MeshSettings},
    identity::dev_issuer::{DevIssuer, TokenRequest, DEFAULT_ISSUER},
    server::Running,
    spiffe::{SpiffeId, TrustDomain},
    state::{CaState, DirStore, StateStore},
};

/// The mission's example, which the demo's snapshot is made from.
pub const MIXED_TRAFFIC: &str = include_str!("../../deploy/examples/mixed-traffic.yaml");
/// How long the demo waits for anything the control plane should deliver.
pub const WAIT: Duration = Duration::from_secs(30);

/// Where progress lines go (stdout for the CLI, a buffer in tests).
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

/// What `meshid demo` was asked for.
#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    /// Work directory (created; must be empty if it exists). Default: a new temp directory.
    pub dir: Option<PathBuf>,
}

/// Everything the demo runs.
pub struct World {
    pub dir: PathBuf,
    pub td: TrustDomain,
    pub snapshot: PathBuf,
    /// The snapshot as first written (no DestinationRule).
    pub base_snapshot: Value,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub product: Sidecar,
    pub inventory: Sidecar,
    pub product_app: EchoApp,
    pub inventory_app: EchoApp,
    pub legacy_db: EchoApp,
    pub progress: Progress,
    running: Option<Running>,
    stop: watch::Sender<bool>,
}

impl World {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn say(&self, line: &str) {
        (self.progress)(line)
    }

    /// The server's live CA.
    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running until shutdown")
    }

    /// Stops the sidecars, the apps and the server.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Writes the snapshot `doc` atomically; the server re-reads it within its poll interval.
    pub fn write_snapshot(&self, doc: &Value) -> Result<(), DemoError> {
        write_snapshot(&self.snapshot, doc)
    }

    /// Creates the work directory, CA, issuer, snapshot, server, apps and sidecars, and waits
    /// until both sidecars hold a certificate, roots and endpoints.
    pub async fn start(opts: DemoOptions, progress: Progress) -> Result<Self, DemoError> {
        let dir = work_dir(opts.dir)?;
        let say = |s: &str| progress(s);
        let td =
            TrustDomain::new("cluster.local").map_err(|e| DemoError::setup("trust domain", e))?;
        say(&format!("==> work directory {}", dir.display()));
        let (root_pem, issuer) = fresh_ca_and_issuer(&dir, &td, &say)?;

        let (stop, stop_rx) = watch::channel(false);
        let product_app = EchoApp::start("product-service", stop_rx.clone()).await?;
        let inventory_app = EchoApp::start("inventory-service", stop_rx.clone()).await?;
        let legacy_db = EchoApp::start("legacy-db", stop_rx.clone()).await?;
        let product_in = bind("product-service sidecar").await?;
        let inventory_in = bind("inventory-service sidecar").await?;
        let ports = Ports {
            product: local(&product_in)?.port(),
            inventory: local(&inventory_in)?.port(),
            legacy: legacy_db.addr.port(),
        };
        let (snapshot, base_snapshot) = mixed_traffic_snapshot(&dir, &ports, &say)?;

        let cfg = server_config(&dir, &issuer, &snapshot)?;
        let running = crate::server::start(cfg, Arc::new(SystemClock))
            .await
            .map_err(|e| DemoError::setup("starting meshid server", e))?;
        say(&format!(
            "==> meshid server on 127.0.0.1: gRPC (SDS, CSR API, EDS) {}, metrics http://{}/metrics",
            running.grpc_addr, running.http_addr
        ));

        let settings = MeshSettings::default();
        let server_id = SpiffeId::for_service_account(&td, "istio-system", "meshid")
            .map_err(|e| DemoError::setup("meshid's SPIFFE ID", e))?;
        let clusters = demo_clusters(&settings);
        let common = Common {
            td: td.clone(),
            settings: settings.clone(),
            snapshot: snapshot.clone(),
            grpc: running.grpc_addr,
            server_id,
            root_pem: root_pem.clone(),
            issuer: issuer.clone(),
            clusters,
            stop: stop_rx.clone(),
        };
        let product = common.shop_sidecar(
            "product-service",
            "product-service-7d4b9-x2x7q",
            product_in,
            product_app.addr,
        )?;
        let inventory = common.shop_sidecar(
            "inventory-service",
            "inventory-service-5c8f7-k9p2m",
            inventory_in,
            inventory_app.addr,
        )?;
        for s in [&product, &inventory] {
            wait_ready(s).await?;
            say(&sidecar_ready_line(s));
        }
        Ok(Self {
            dir,
            td,
            snapshot,
            base_snapshot,
            grpc_addr: running.grpc_addr,
            http_addr: running.http_addr,
            product,
            inventory,
            product_app,
            inventory_app,
            legacy_db,
            progress,
            running: Some(running),
            stop,
        })
    }
}

/// The mission's mixed-traffic example as the discovery snapshot, its pod IPs rewritten to
/// the demo's loopback listeners: the snapshot's path and its text.
fn mixed_traffic_snapshot(
    dir: &Path,
    ports: &Ports,
    say: &dyn Fn(&str),
) -> Result<(PathBuf, serde_json::Value), DemoError> {
    let snapshot = dir.join("mixed-traffic.yaml");
    let text = rewrite_snapshot(MIXED_TRAFFIC, ports)?;
    write_snapshot(&snapshot, &text)?;
    say(&format!(
        "==> discovery snapshot {} (the mixed-traffic example, pod IPs rewritten to 127.0.0.1: product-service sidecar :{}, inventory-service sidecar :{}, legacy-db :{} with no sidecar)",
        snapshot.display(), ports.product, ports.inventory, ports.legacy
    ));
    Ok((snapshot, text))
}

/// A fresh CA (an ECDSA P-256 root written as the state) and the dev token issuer standing in
/// for the cluster's service-account issuer.
fn fresh_ca_and_issuer(
    dir: &Path,
    td: &TrustDomain,
    say: &dyn Fn(&str),
) -> Result<(String, Arc<DevIssuer>), DemoError> {
    let now = SystemClock.now();
    let ca = root::generate_root(td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now)
        .map_err(|e| DemoError::setup("generating the root", e))?;
    let root_pem = cert::to_pem(&ca.cert);
    DirStore::new(dir.join("state"))
        .compare_and_swap(None, &CaState::with_generated_root(td.clone(), &ca, now))
        .map_err(|e| DemoError::setup("writing the CA state", e))?;
    say(&format!(
        "==> fresh CA for trust domain {td}: root {} (ECDSA P-256) in {}",
        cert::fingerprint_id(&ca.cert),
        dir.join("state").display()
    ));
    let issuer = Arc::new(
        DevIssuer::init(&dir.join("issuer"), DEFAULT_ISSUER, None)
            .map_err(|e| DemoError::setup("creating the dev token issuer", e))?,
    );
    say(&format!(
        "==> dev token issuer {DEFAULT_ISSUER} (stands in for the cluster's service-account issuer) in {}",
        dir.join("issuer").display()
    ));
    Ok((root_pem, issuer))
}

/// The EDS clusters each demo sidecar subscribes to.
fn demo_clusters(settings: &MeshSettings) -> Vec<String> {
    [
        ("inventory-service.shop", 8080),
        ("legacy-db.legacy", 5432),
        ("product-service.shop", 8080),
    ]
    .map(|(s, p)| {
        let (n, ns) = s.split_once('.').unwrap_or((s, ""));
        cluster_name(p, &format!("{n}.{ns}.svc.{}", settings.domain))
    })
    .to_vec()
}

/// What a ready sidecar got over SDS and EDS.
fn sidecar_ready_line(s: &Sidecar) -> String {
    let st = s.state();
    format!(
        "==> {} sidecar: SDS default {} (root {}), ROOTCA {} root(s), EDS {} cluster(s), with its own token (audience istio-ca)",
        s.name,
        s.id,
        st.default.as_ref().and_then(|d| super::sidecar::anchor_id(&d.chain, &st.roots)).unwrap_or_default(),
        st.roots.len(),
        st.endpoints.len()
    )
}

fn work_dir(dir: Option<PathBuf>) -> Result<PathBuf, DemoError> {
    let dir = match dir {
        Some(d) => {
            if d.exists() {
                let mut entries = std::fs::read_dir(&d)
                    .map_err(|e| DemoError::setup(format!("reading {}", d.display()), e))?;
                if entries.next().is_some() {
                    return Err(DemoError::setup(
                        format!("--work-dir {}", d.display()),
                        "the directory is not empty; the demo makes a fresh CA: give a new or empty directory",
                    ));
                }
            }
            d
        }
        None => {
            let mut r = [0u8; 6];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r)
                .map_err(|_| DemoError::setup("temp directory", "no randomness"))?;
            std::env::temp_dir().join(format!("meshid-demo-{}", cert::hex(&r)))
        }
    };
    create_private_dir(&dir)?;
    Ok(dir)
}

fn create_private_dir(dir: &Path) -> Result<(), DemoError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| DemoError::setup(format!("creating {}", dir.display()), e))
}

async fn bind(what: &str) -> Result<TcpListener, DemoError> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| DemoError::setup(format!("binding the {what}"), e))
}

fn local(l: &TcpListener) -> Result<SocketAddr, DemoError> {
    l.local_addr()
        .map_err(|e| DemoError::setup("listener address", e))
}

struct Workload {
    ns: String,
    sa: String,
    pod: String,
    listener: TcpListener,
    app: SocketAddr,
}

/// What every sidecar shares.
struct Common {
    td: TrustDomain,
    settings: MeshSettings,
    snapshot: PathBuf,
    grpc: SocketAddr,
    server_id: SpiffeId,
    root_pem: String,
    issuer: Arc<DevIssuer>,
    clusters: Vec<String>,
    stop: watch::Receiver<bool>,
}

impl Common {
    /// A sidecar for `app` (its service account too) in namespace `shop`, as pod `pod`.
    fn shop_sidecar(
        &self,
        app: &str,
        pod: &str,
        listener: TcpListener,
        app_addr: SocketAddr,
    ) -> Result<Sidecar, DemoError> {
        self.sidecar(Workload {
            ns: "shop".into(),
            sa: app.into(),
            pod: pod.into(),
            listener,
            app: app_addr,
        })
    }

    /// Starts a sidecar: SDS and EDS subscriptions with its own token, and its inbound listener.
    fn sidecar(&self, w: Workload) -> Result<Sidecar, DemoError> {
        let id = SpiffeId::for_service_account(&self.td, &w.ns, &w.sa)
            .map_err(|e| DemoError::setup("workload SPIFFE ID", e))?;
        let bootstrap = cert::certs_from_pem(self.root_pem.as_bytes(), "bootstrap root")
            .map_err(|e| DemoError::setup("bootstrap root", e))?;
        let req = TokenRequest {
            namespace: w.ns.clone(),
            service_account: w.sa.clone(),
            audiences: vec![crate::identity::DEFAULT_AUDIENCE.into()],
            ttl: Duration::from_secs(3600),
            pod: Some((w.pod.clone(), format!("uid-{}", w.pod))),
        };
        let issuer = self.issuer.clone();
        let token = Arc::new(move || issuer.token(&req, SystemClock.now()));
        let cp = ControlPlane {
            addr: self.grpc,
            server_id: self.server_id.clone(),
            trust: Arc::new(RwLock::new(bootstrap)),
            token,
            node: Node {
                id: format!(
                    "sidecar~127.0.0.1~{}.{}~{}.svc.{}",
                    w.pod, w.ns, w.ns, self.settings.domain
                ),
                cluster: format!("{}.{}", w.sa, w.ns),
                ..Default::default()
            },
        };
        let (tx, rx) = watch::channel(ProxyState::default());
        let tx = Arc::new(tx);
        let names = vec!["default".to_owned(), "ROOTCA".to_owned()];
        tokio::spawn(subscribe(
            cp.clone(),
            XdsKind::Sds,
            names,
            tx.clone(),
            self.stop.clone(),
        ));
        tokio::spawn(subscribe(
            cp,
            XdsKind::Eds,
            self.clusters.clone(),
            tx,
            self.stop.clone(),
        ));
        let inbound_addr = local(&w.listener)?;
        let log = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(serve_inbound(
            w.listener,
            w.app,
            rx.clone(),
            self.td.clone(),
            log.clone(),
            self.stop.clone(),
        ));
        Ok(Sidecar {
            name: w.sa.clone(),
            id,
            inbound_addr,
            state: rx,
            clusters: ClusterSource {
                snapshot: self.snapshot.clone(),
                settings: self.settings.clone(),
                td: self.td.clone(),
                client_pod: format!("{}.{}", w.pod, w.ns),
            },
            inbound: log,
            td: self.td.clone(),
            domain: self.settings.domain.clone(),
        })
    }
}

/// Waits until a sidecar holds a certificate, roots and an assignment for every cluster.
async fn wait_ready(s: &Sidecar) -> Result<(), DemoError> {
    let mut rx = s.watch();
    let want = 3;
    let ready = tokio::time::timeout(
        WAIT,
        rx.wait_for(|st| {
            st.default.is_some() && !st.roots.is_empty() && st.endpoints.len() >= want
        }),
    )
    .await;
    match ready {
        Ok(Ok(_)) => Ok(()),
        _ => {
            let st = s.state();
            Err(DemoError::unexpected(
                format!("{} sidecar to receive default, ROOTCA and {want} EDS clusters within {}s", s.name, WAIT.as_secs()),
                format!(
                    "default: {}, ROOTCA: {} root(s), EDS clusters: {}; last control-plane error: {}",
                    st.default.is_some(),
                    st.roots.len(),
                    st.endpoints.len(),
                    st.last_error.as_deref().unwrap_or("none")
                ),
            ))
        }
    }
}
