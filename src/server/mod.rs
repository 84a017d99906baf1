//! Composition: builds every part from its own config section, starts its tasks and returns.
//! No logic of its own: the gRPC routes are in `grpc`, the token validators in `identity`, EDS
//! and its sources in `discovery`, readiness and the HTTP pages in `readiness`; the listeners'
//! accept loops and connection adapters are `crate::net`'s.

mod discovery;
mod grpc;
mod identity;
mod proofs;
mod readiness;
mod ui;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use thiserror::Error;
use tokio::{sync::watch, task::JoinHandle};

pub use crate::kube_client::{kube_client, KubeClientError};
pub use identity::ValidatorError;

use crate::{
    api::{lifetime::StreamLimits, Authenticator, CsrService, SdsService},
    clock::Clock,
    config::Config,
    discovery::ProxyRegistry,
    net::{bind_tcp, tls_incoming, unix_incoming},
    rotation::{Issued, Propagation, Renewer},
    shutdown::stopping,
    spiffe::{SpiffeId, TrustDomain},
    state::StateStore,
    telemetry::{serve_http, HttpLimits, Metrics},
    tls::{certified_key, grpc_server_config, RotatingCert},
    trust::{federation::FederationStatus, federation_run, CaSnapshot, LiveCa, LiveCaError},
};

/// Why the server could not start. Each names what to fix.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("configuration is invalid:\n  - {}", .0.join("\n  - "))]
    Config(Vec<String>),
    #[error("loading the CA: {0}")]
    Ca(#[from] LiveCaError),
    #[error("the CA state: {0}")]
    State(#[from] crate::state::StateError),
    #[error("identity backend for cluster {cluster}: {source}")]
    Identity {
        cluster: String,
        #[source]
        source: identity::ValidatorError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serving certificate: {0}")]
    ServingCert(String),
}

/// A started server. Dropping it does not stop it; call `shutdown`.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub unix_path: Option<PathBuf>,
    pub live: Arc<LiveCa>,
    pub metrics: Arc<Metrics>,
    /// What every SDS stream has ACKed (served on `GET /debug/rotation`).
    pub propagation: Arc<Propagation>,
    /// Which pods' proxies meshid has seen (present when discovery is on).
    pub proxies: Option<Arc<ProxyRegistry>>,
    /// The SPIFFE bundle endpoint's address, when `[federation.bundle_endpoint]` is set.
    pub bundle_addr: Option<SocketAddr>,
    /// Every federation peer's status.
    pub federation: FederationStatus,
    /// Wakes a peer's client to fetch its bundle now (`meshid bundle refresh`).
    pub federation_refresh: std::collections::BTreeMap<TrustDomain, Arc<tokio::sync::Notify>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops every listener and stream, and waits for them (at most 5 s, then aborts).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What every part is built with: the config, the clock, the metrics, the stop signal, and the
/// tasks started so far (awaited by [`Running::shutdown`]).
struct Wiring<'a> {
    cfg: &'a Config,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    /// Whether this replica leads (runs the schedules).
    leading: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Wiring<'_> {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }
}

/// Builds and starts everything `cfg` describes.
pub async fn start(cfg: Config, clock: Arc<dyn Clock>) -> Result<Running, ServerError> {
    cfg.validate().map_err(ServerError::Config)?;
    let (location, kubeconfig) = (cfg.state_location(), cfg.state_kubeconfig.clone());
    let (policy, c2) = (cfg.issuance, clock.clone());
    let (store, live) = tokio::task::spawn_blocking(move || {
        let store = location.open(kubeconfig.as_deref())?;
        let live = LiveCa::load(store.clone(), policy, c2)?;
        Ok::<_, ServerError>((store, live))
    })
    .await
    .map_err(|e| ServerError::ServingCert(format!("the CA load task failed: {e}")))??;
    let live = Arc::new(live);
    let td = live.current().authority.trust_domain().clone();
    let (stop, stop_rx) = watch::channel(false);
    let mut w = Wiring {
        cfg: &cfg,
        clock,
        metrics: Arc::new(Metrics::new().with_known_labels(
            crate::identity::IdentityError::REASONS,
            crate::api::SIGN_ERROR_KINDS,
            crate::api::node_auth::RESULTS,
        )),
        stop: stop_rx,
        leading: crate::leader::always_leading(),
        tasks: Vec::new(),
    };
    leadership(&mut w).await?;
    let router = identity::build_router(&cfg, &td, &w.clock).await?;
    let auth = Authenticator::new(router.clone(), w.metrics.clone());
    let serving = serving_cert(&mut w, &td, &live)?;
    let proxies =
        (cfg.discovery.as_ref()).map(|d| ProxyRegistry::new(w.clock.clone(), d.proxy_proof_grace));
    let limits = StreamLimits {
        max_age: cfg.limits.max_stream_age,
    };
    let (sds, csr) = certificate_services(&w, &auth, &live, proxies.as_ref(), limits);
    let propagation = sds.propagation();
    let fed = federation_run::start(federation_run::Inputs {
        cfg: &cfg.federation,
        state_dir: &cfg.state_dir,
        poll: cfg.state_poll_interval,
        store: store.clone(),
        live: &live,
        serving: serving.clone(),
        clock: &w.clock,
        metrics: &w.metrics,
        stop: &w.stop,
        leading: &w.leading,
    })
    .await
    .map_err(ServerError::Config)?;
    w.tasks.extend(fed.tasks);
    if let (Some(d), Some(p)) = (&cfg.discovery, &proxies) {
        proofs::share(&mut w, p, d.proxy_proof_startup_grace).await?;
    }
    let (eds, csr, discovery_sources) = match &cfg.discovery {
        Some(d) => {
            let (eds, sources) =
                discovery::eds_service(&mut w, d, &auth, proxies.clone(), limits).await?;
            let csr = node_authorizer(&cfg, d, &td, sources.objects.clone(), csr)?;
            (Some(eds), csr, Some(sources))
        }
        None => (None, csr, None),
    };
    let services = grpc::Services {
        sds,
        csr,
        eds,
        auth,
    };
    let grpc_addr = serve_grpc_tcp(&mut w, &services, serving).await?;
    let unix_path = serve_grpc_unix(&mut w, &services)?;
    let replicas = matches!(cfg.state, Some(crate::state::StateLocation::Secret { .. }))
        .then(|| Arc::new(std::sync::Mutex::new(Err("not read yet".to_owned()))));
    let ui = ui::Ui::new(ui::UiSources {
        replicas: replicas.clone(),
        live: live.clone(),
        propagation: propagation.clone(),
        federation: fed.status.clone(),
        replica: crate::rotation::replica_name(),
        clock: w.clock.clone(),
        discovery: discovery_sources,
    });
    let http_addr = serve_http_surface(&mut w, router, &propagation, &live, ui).await?;
    schedules(&mut w, &store, &live, &propagation).await?;
    publish_replica_status(&mut w, &live, &propagation, replicas).await?;
    follow_state(&mut w, &live);
    w.spawn(rotation_gauges(
        live.clone(),
        propagation.clone(),
        w.metrics.clone(),
        w.stop.clone(),
    ));
    tracing::info!(%grpc_addr, %http_addr, trust_domain = %td, "meshid server started");
    Ok(Running {
        grpc_addr,
        http_addr,
        unix_path,
        live,
        metrics: w.metrics,
        propagation,
        proxies,
        bundle_addr: fed.bundle_addr,
        federation: fed.status,
        federation_refresh: fed.refresh,
        stop,
        tasks: w.tasks,
    })
}

/// meshid's own serving certificate, issued now and renewed by the one renewal driver
/// ([`Renewer::drive`]) like any leaf; the resolver every TLS listener serves it from.
fn serving_cert(
    w: &mut Wiring<'_>,
    td: &TrustDomain,
    live: &LiveCa,
) -> Result<Arc<RotatingCert>, ServerError> {
    let si = &w.cfg.server_identity;
    let id = SpiffeId::for_service_account(td, &si.namespace, &si.service_account)
        .map_err(|e| ServerError::ServingCert(e.to_string()))?;
    let dns = si.dns_names.clone();
    let issue = move |snap: &CaSnapshot| issue_serving_cert(snap, &id, &dns);
    let mut renewer = Renewer::new(w.cfg.rotation, w.clock.clone());
    let first = live.current();
    renewer.renew(|| issue(&first))?;
    let resolver = Arc::new(RotatingCert::new(
        renewer
            .current()
            .ok_or_else(|| ServerError::ServingCert("issued already expired".into()))?
            .clone(),
    ));
    let r = resolver.clone();
    let task = renewer.drive(
        live.subscribe(),
        w.stop.clone(),
        "serving certificate",
        issue,
        move |ck| r.set(ck.clone()),
    );
    w.spawn(task);
    Ok(resolver)
}

fn issue_serving_cert(
    snap: &CaSnapshot,
    id: &SpiffeId,
    dns: &[String],
) -> Result<Issued<Arc<rustls::sign::CertifiedKey>>, ServerError> {
    let (issued, key) = snap
        .authority
        .issue_server_cert(id, dns, None)
        .map_err(|e| ServerError::ServingCert(e.to_string()))?;
    let ck = certified_key(&issued, &key).map_err(|e| ServerError::ServingCert(e.to_string()))?;
    Ok(Issued {
        value: ck,
        signer_id: snap.signer_id.clone(),
        not_after: issued.not_after,
    })
}

/// The CSR API judging node agents' impersonation (ztunnel) against discovery's pods, when
/// `trusted_node_accounts` names any.
fn node_authorizer(
    cfg: &Config,
    d: &crate::discovery::config::Discovery,
    td: &TrustDomain,
    objects: watch::Receiver<Arc<crate::discovery::MeshObjects>>,
    csr: CsrService,
) -> Result<CsrService, ServerError> {
    let accounts = crate::config::parse_node_accounts(&cfg.trusted_node_accounts)
        .map_err(ServerError::Config)?;
    if accounts.is_empty() {
        return Ok(csr);
    }
    let na = crate::api::NodeAuthorizer::new(accounts, td.clone(), d.cluster_name.clone(), objects);
    Ok(csr.with_node_authorizer(Arc::new(na)))
}

/// SDS and the CSR API, with the proxy registry (auto mTLS proof by proxy) when discovery is on.
fn certificate_services(
    w: &Wiring<'_>,
    auth: &Authenticator,
    live: &LiveCa,
    proxies: Option<&Arc<ProxyRegistry>>,
    limits: StreamLimits,
) -> (SdsService, CsrService) {
    let sds = SdsService::new(
        auth.clone(),
        live.subscribe(),
        w.stop.clone(),
        w.clock.clone(),
        w.cfg.rotation,
        limits,
        w.metrics.clone(),
    )
    .with_name_limit(w.cfg.xds.max_resource_names_per_stream.sds)
    .with_propagation(Arc::default())
    .with_merge_into_rootca(w.cfg.federation.merge_into_rootca);
    let csr = CsrService::new(auth.clone(), live.subscribe(), w.metrics.clone())
        .with_san_policy(w.cfg.csr_san_policy);
    match proxies {
        Some(p) => (
            sds.with_proxy_registry(p.clone()),
            csr.with_proxy_registry(p.clone()),
        ),
        None => (sds, csr),
    }
}

/// gRPC over TLS on `listen.grpc`, serving meshid's own certificate.
async fn serve_grpc_tcp(
    w: &mut Wiring<'_>,
    services: &grpc::Services,
    serving: Arc<RotatingCert>,
) -> Result<SocketAddr, ServerError> {
    let tls = grpc_server_config(serving).map_err(|e| ServerError::ServingCert(e.to_string()))?;
    let listener = bind(w.cfg.listen.grpc, "gRPC")?;
    let addr = listener.local_addr().map_err(io("gRPC listener address"))?;
    let l = &w.cfg.limits;
    let incoming = tls_incoming(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        l.max_connections,
        l.tls_handshake_timeout,
        w.stop.clone(),
    );
    let routes = services.router(l);
    w.spawn(grpc::serve(routes, incoming, w.stop.clone(), "TCP"));
    Ok(addr)
}

/// gRPC on `listen.unix`, when set (a stale socket file is replaced).
fn serve_grpc_unix(
    w: &mut Wiring<'_>,
    services: &grpc::Services,
) -> Result<Option<PathBuf>, ServerError> {
    let Some(path) = &w.cfg.listen.unix else {
        return Ok(None);
    };
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(io(&format!("binding Unix socket {}", path.display())))?;
    let incoming = unix_incoming(listener, w.cfg.limits.max_connections, w.stop.clone());
    let routes = services.router(&w.cfg.limits);
    w.spawn(grpc::serve(routes, incoming, w.stop.clone(), "Unix socket"));
    Ok(Some(path.clone()))
}

/// `/metrics`, `/healthz`, `/readyz` (the identity backends' probe) and `/debug/rotation`.
async fn serve_http_surface(
    w: &mut Wiring<'_>,
    router: crate::identity::ClusterRouter,
    propagation: &Arc<Propagation>,
    live: &Arc<LiveCa>,
    ui: ui::Ui,
) -> Result<SocketAddr, ServerError> {
    let readiness = Arc::new(readiness::Readiness::default());
    w.spawn(readiness::probe_loop(
        router,
        readiness.clone(),
        w.metrics.clone(),
        w.clock.clone(),
        w.stop.clone(),
    ));
    let listener = bind(w.cfg.listen.http, "HTTP")?;
    let addr = listener.local_addr().map_err(io("HTTP listener address"))?;
    let l = &w.cfg.limits;
    let limits = HttpLimits {
        header_read_timeout: l.http_header_read_timeout,
        idle_timeout: l.http_idle_timeout,
        max_connections: l.http_max_connections,
        debug_from: w.cfg.listen.debug_from.clone(),
    };
    let surface = Arc::new(readiness::HttpSurface {
        readiness,
        rotation: readiness::RotationPage {
            registry: propagation.clone(),
            live: live.clone(),
            replica: crate::rotation::replica_name(),
        },
        leading: w.cfg.leader_election.enabled.then(|| w.leading.clone()),
        ui,
    });
    w.spawn(serve_http(
        listener,
        w.metrics.clone(),
        surface,
        limits,
        w.stop.clone(),
    ));
    Ok(addr)
}

/// `meshid_rotation_streams`, from the propagation registry every 2 s (a scrape reads the last).
async fn rotation_gauges(
    live: Arc<LiveCa>,
    registry: Arc<Propagation>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let snap = live.current();
        let (_, c, current) = crate::rotation::current_counts(&registry, &snap);
        for (view, n) in [
            ("bundle", c.bundle_streams),
            ("bundle_current", current),
            ("leaf", c.leaf_streams),
            (
                "leaf_current",
                c.signers.get(&snap.signer_id).copied().unwrap_or(0),
            ),
            ("behind", c.laggard_count),
        ] {
            metrics
                .rotation_streams
                .get_or_create(&Metrics::label("view", view))
                .set(n as i64);
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = stopping(&mut stop) => return,
        }
    }
}

/// The state store watched into new snapshots, and the expiry gauges set from each.
fn follow_state(w: &mut Wiring<'_>, live: &Arc<LiveCa>) {
    w.spawn(expiry_gauges(
        live.subscribe(),
        w.metrics.clone(),
        w.stop.clone(),
    ));
    w.spawn(
        live.clone()
            .watch_store(w.cfg.state_poll_interval, w.stop.clone()),
    );
}

/// Whether this replica leads: the Lease's verdict with `[leader_election]`, else always; the
/// `meshid_leader` gauge follows it.
async fn leadership(w: &mut Wiring<'_>) -> Result<(), ServerError> {
    let le = &w.cfg.leader_election;
    if le.enabled {
        let client = crate::kube_client::kube_client_for_calls(
            le.kubeconfig.as_deref(),
            crate::leader::client_deadline(le),
        )
        .await
        .map_err(|e| ServerError::Config(vec![format!("leader_election: {e}")]))?;
        let identity = (le.identity.clone()).unwrap_or_else(crate::rotation::replica_name);
        let (tx, rx) = watch::channel(false);
        let elector = crate::leader::Elector::new(client, le.clone(), identity, w.clock.clone());
        w.spawn(elector.run(tx, w.stop.clone()));
        w.leading = rx;
    }
    let (mut leading, metrics, mut stop) = (w.leading.clone(), w.metrics.clone(), w.stop.clone());
    w.spawn(async move {
        loop {
            metrics.leader.set(i64::from(*leading.borrow_and_update()));
            tokio::select! {
                r = leading.changed() => if r.is_err() { return },
                () = stopping(&mut stop) => return,
            }
        }
    });
    Ok(())
}

/// With the state in a Secret, this replica's rotation status in a Lease of its own beside it,
/// where the CLI reads every replica's (`rotation::replicas`).
async fn publish_replica_status(
    w: &mut Wiring<'_>,
    live: &Arc<LiveCa>,
    propagation: &Arc<Propagation>,
    seen: Option<Arc<crate::rotation::replicas::ReplicasSeen>>,
) -> Result<(), ServerError> {
    let Some(crate::state::StateLocation::Secret { namespace, .. }) = &w.cfg.state else {
        return Ok(());
    };
    let client = crate::kube_client::kube_client_for_calls(
        w.cfg.state_kubeconfig.as_deref(),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| ServerError::Config(vec![format!("state_kubeconfig: {e}")]))?;
    let (live, registry) = (live.clone(), propagation.clone());
    let replica = w
        .cfg
        .leader_election
        .identity
        .clone()
        .unwrap_or_else(crate::rotation::replica_name);
    let name = replica.clone();
    if let Some(seen) = seen {
        w.spawn(crate::rotation::replicas::follow(
            client.clone(),
            namespace.clone(),
            seen,
            w.stop.clone(),
        ));
    }
    w.spawn(crate::rotation::replicas::publish(
        client,
        namespace.clone(),
        replica,
        move || crate::rotation::status_of(&registry, &live.current(), &name),
        w.stop.clone(),
    ));
    Ok(())
}

/// The schedules: automatic rotation, and the root ConfigMap publishers when enabled.
async fn schedules(
    w: &mut Wiring<'_>,
    store: &Arc<dyn StateStore>,
    live: &Arc<LiveCa>,
    propagation: &Arc<Propagation>,
) -> Result<(), ServerError> {
    let cfg = w.cfg;
    let schedule = crate::rotation::Schedule {
        cfg: cfg.auto_rotation,
        store: store.clone(),
        live: live.clone(),
        registry: propagation.clone(),
        metrics: w.metrics.clone(),
        clock: w.clock.clone(),
        replica: crate::rotation::replica_name(),
        publication_hint: (cfg.federation.bundle_endpoint.as_ref())
            .map(|_| cfg.federation.refresh_hint),
    };
    w.spawn(crate::leader::while_leading(
        w.leading.clone(),
        w.stop.clone(),
        move |stop| schedule.clone().run(stop),
    ));
    let rc = &cfg.root_cert_configmap;
    if !rc.enabled {
        return Ok(());
    }
    let selector =
        crate::trust::configmap::Selector::parse(&rc.namespace_selector).map_err(|e| {
            ServerError::Config(vec![format!("root_cert_configmap.namespace_selector: {e}")])
        })?;
    let client = kube_client(rc.kubeconfig.as_deref())
        .await
        .map_err(|why| ServerError::Config(vec![format!("root_cert_configmap: {why}")]))?;
    for doc in [
        crate::trust::configmap::ROOT_CERT,
        crate::trust::configmap::CA_CRL,
    ] {
        let (client, selector, live) = (client.clone(), selector.clone(), live.clone());
        w.spawn(crate::leader::while_leading(
            w.leading.clone(),
            w.stop.clone(),
            move |stop| {
                crate::trust::configmap::publish_document(
                    client.clone(),
                    selector.clone(),
                    live.subscribe(),
                    doc,
                    stop,
                )
            },
        ));
    }
    Ok(())
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        what: what.to_owned(),
        source,
    }
}

/// Binds with the kernel's full accept backlog (`net::bind_tcp`), not mio's 128.
fn bind(addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener, ServerError> {
    bind_tcp(addr).map_err(|source| ServerError::Io {
        what: format!("binding {what} listener {addr}"),
        source,
    })
}

/// `meshid_cert_chain_expiry_timestamp_seconds` and `meshid_root_cert_expiry_timestamp_seconds`,
/// set from every snapshot served.
async fn expiry_gauges(
    mut live: watch::Receiver<Arc<CaSnapshot>>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let snap = live.borrow_and_update().clone();
        metrics
            .chain_expiry
            .set(snap.authority.chain_not_after().unix_timestamp());
        // The root that anchors the signer: the active one (a prepared successor's later
        // notAfter must not hide it).
        let active = snap
            .roots
            .iter()
            .find(|r| r.state == crate::state::RootState::Active);
        metrics.root_expiry.set(
            active
                .map(|r| r.not_after.unix_timestamp())
                .or_else(|| snap.latest_root_not_after())
                .unwrap_or(0),
        );
        let successor = snap.roots.iter().any(|r| {
            r.state == crate::state::RootState::Prepared
                || (r.state == crate::state::RootState::Active && r.signer_staged)
        });
        metrics.root_successor_prepared.set(i64::from(successor));
        for state in ["prepared", "active", "old", "tainted", "revoked"] {
            let n = snap
                .roots
                .iter()
                .filter(|r| r.state.to_string() == state)
                .count();
            metrics
                .roots
                .get_or_create(&Metrics::label("state", state))
                .set(n as i64);
        }
        tokio::select! {
            r = live.changed() => if r.is_err() { return },
            () = stopping(&mut stop) => return,
        }
    }
}
