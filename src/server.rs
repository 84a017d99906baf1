//! Composition: builds every part from the config and runs it. No logic of its own.

use std::{
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_server::EndpointDiscoveryServiceServer;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::{watch, OwnedSemaphorePermit},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    api::{gate::Gate, lifetime::StreamLimits},
    api::{
        istio::istio_certificate_service_server::IstioCertificateServiceServer, Authenticator,
        CsrService, EdsService, SdsServer, SdsService,
    },
    clock::Clock,
    config::{self, Config},
    discovery::{
        spawn_view, start_kube_source, watch_remote_secrets, DiscoveryView, MeshSettings,
        MultiCluster, ProxyRegistry, RemoteSecrets, SnapshotSource,
    },
    identity::{
        CacheConfig, CachingValidator, ClusterId, ClusterRouter, JwksSource, JwksValidator,
        JwtConfig, TokenReviewConfig, TokenReviewValidator, TokenValidator,
    },
    rotation::{Issued, Propagation, Renewer, SignerView},
    spiffe::{SpiffeId, TrustDomain},
    state::DirStore,
    telemetry::{serve_http, stopping, Health, HttpLimits, Metrics},
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
    #[error("identity backend for cluster {cluster}: {why}")]
    Identity { cluster: String, why: String },
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

/// Builds and starts everything `cfg` describes.
pub async fn start(cfg: Config, clock: Arc<dyn Clock>) -> Result<Running, ServerError> {
    cfg.validate().map_err(ServerError::Config)?;
    let store = Arc::new(DirStore::new(&cfg.state_dir));
    let (policy, c2, s2) = (cfg.issuance, clock.clone(), store.clone());
    let live = tokio::task::spawn_blocking(move || LiveCa::load(s2, policy, c2))
        .await
        .expect("CA load task does not panic")?;
    let live = Arc::new(live);
    let td = live.current().authority.trust_domain().clone();
    let metrics = Arc::new(Metrics::new());
    let router = build_router(&cfg, &td, &clock).await?;
    let auth = Authenticator::new(router.clone(), metrics.clone());
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    // meshid's own serving certificate, renewed like any leaf.
    let server_id = SpiffeId::for_service_account(
        &td,
        &cfg.server_identity.namespace,
        &cfg.server_identity.service_account,
    )
    .map_err(|e| ServerError::ServingCert(e.to_string()))?;
    let mut serving = ServingCert {
        renewer: Renewer::new(cfg.rotation, clock.clone()),
        id: server_id,
        dns: cfg.server_identity.dns_names.clone(),
    };
    serving.issue(&live.current())?;
    let resolver = Arc::new(RotatingCert::new(
        serving.renewer.current().expect("issued above").clone(),
    ));
    tasks.push(tokio::spawn(serving.renew_loop(
        live.subscribe(),
        resolver.clone(),
        stop_rx.clone(),
    )));

    let stream_limits = StreamLimits {
        max_age: cfg.limits.max_stream_age,
    };
    let sds = SdsService::new(
        auth.clone(),
        live.subscribe(),
        stop_rx.clone(),
        clock.clone(),
        cfg.rotation,
        stream_limits,
        metrics.clone(),
    )
    .with_name_limit(cfg.xds.max_resource_names_per_stream.sds)
    .with_propagation(Arc::default())
    .with_merge_into_rootca(cfg.federation.merge_into_rootca);
    let propagation = sds.propagation();
    let fed = federation_run::start(federation_run::Inputs {
        cfg: &cfg.federation,
        state_dir: &cfg.state_dir,
        poll: cfg.state_poll_interval,
        store: store.clone(),
        live: &live,
        serving: resolver.clone(),
        clock: &clock,
        metrics: &metrics,
        stop: &stop_rx,
    })
    .await
    .map_err(ServerError::Config)?;
    tasks.extend(fed.tasks);
    let csr = CsrService::new(auth.clone(), live.subscribe(), metrics.clone());
    // Which pods' proxies hold an SDS stream or got a certificate (auto mTLS proof by proxy).
    let proxies =
        (cfg.discovery.as_ref()).map(|d| ProxyRegistry::new(clock.clone(), d.proxy_proof_grace));
    let (sds, csr) = match &proxies {
        Some(p) => (
            sds.with_proxy_registry(p.clone()),
            csr.with_proxy_registry(p.clone()),
        ),
        None => (sds, csr),
    };
    let tls = grpc_server_config(resolver).map_err(|e| ServerError::ServingCert(e.to_string()))?;
    let eds = match &cfg.discovery {
        Some(d) => {
            let settings = MeshSettings {
                auto_mtls: d.auto_mtls,
                root_namespace: d.root_namespace.clone(),
                domain: d.domain.clone(),
                require_proxy_proof: d.require_proxy_proof,
                cluster_name: d.cluster_name.clone(),
            };
            let objects = match (&d.snapshot, &d.kubeconfig) {
                (Some(path), _) => {
                    let source = SnapshotSource::load(path.clone()).map_err(|e| {
                        ServerError::Config(vec![format!("discovery.snapshot: {e}")])
                    })?;
                    let view = source.subscribe();
                    tasks.push(tokio::spawn(
                        source.watch_file(cfg.state_poll_interval, stop_rx.clone()),
                    ));
                    view
                }
                (None, kubeconfig) => {
                    let client = kube_client(kubeconfig.as_deref())
                        .await
                        .map_err(|why| ServerError::Config(vec![format!("discovery: {why}")]))?;
                    let mc = remote_clusters(d, &client, &metrics, &mut tasks).await?;
                    let (objects, watchers) = start_kube_source(client, mc, stop_rx.clone());
                    tasks.extend(watchers);
                    objects
                }
            };
            let (view, builder) = spawn_view(
                objects,
                settings,
                proxies.clone(),
                cfg.state_poll_interval,
                stop_rx.clone(),
            );
            tasks.push(builder);
            tasks.push(tokio::spawn(discovery_gauges(
                view.clone(),
                metrics.clone(),
                stop_rx.clone(),
            )));
            Some(
                EdsService::new(auth.clone(), view, stop_rx.clone(), &metrics)
                    .with_name_limit(cfg.xds.max_resource_names_per_stream.eds)
                    .with_lifetime(clock.clone(), stream_limits),
            )
        }
        None => None,
    };
    let grpc = bind(cfg.listen.grpc, "gRPC").await?;
    let grpc_addr = grpc.local_addr().map_err(io("gRPC listener address"))?;
    let incoming = tls_incoming(
        grpc,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        &cfg.limits,
        stop_rx.clone(),
    );
    let routes = grpc_router(&sds, &csr, eds.as_ref(), &auth, &cfg.limits);
    tasks.push(tokio::spawn(serve(
        routes,
        incoming,
        stop_rx.clone(),
        "TCP",
    )));

    let unix_path = match &cfg.listen.unix {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)
                .map_err(io(&format!("binding Unix socket {}", path.display())))?;
            let incoming = unix_incoming(listener, cfg.limits.max_connections, stop_rx.clone());
            let routes = grpc_router(&sds, &csr, eds.as_ref(), &auth, &cfg.limits);
            tasks.push(tokio::spawn(serve(
                routes,
                incoming,
                stop_rx.clone(),
                "Unix socket",
            )));
            Some(path.clone())
        }
        None => None,
    };

    let readiness = Arc::new(Readiness::default());
    tasks.push(tokio::spawn(probe_loop(
        router,
        readiness.clone(),
        metrics.clone(),
        stop_rx.clone(),
    )));
    let http = bind(cfg.listen.http, "HTTP").await?;
    let http_addr = http.local_addr().map_err(io("HTTP listener address"))?;
    let http_limits = HttpLimits {
        header_read_timeout: cfg.limits.http_header_read_timeout,
        idle_timeout: cfg.limits.http_idle_timeout,
        max_connections: cfg.limits.http_max_connections,
        debug_from: cfg.listen.debug_from.clone(),
    };
    let surface = Arc::new(HttpSurface {
        readiness,
        rotation: RotationPage {
            registry: propagation.clone(),
            live: live.clone(),
            replica: crate::rotation::replica_name(),
        },
    });
    tasks.push(tokio::spawn(serve_http(
        http,
        metrics.clone(),
        surface,
        http_limits,
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(expiry_gauges(
        live.subscribe(),
        metrics.clone(),
        stop_rx.clone(),
    )));
    let schedule = crate::rotation::Schedule {
        cfg: cfg.auto_rotation,
        store: Arc::new(DirStore::new(&cfg.state_dir)),
        live: live.clone(),
        registry: propagation.clone(),
        metrics: metrics.clone(),
        clock: clock.clone(),
        replica: crate::rotation::replica_name(),
        publication_hint: cfg
            .federation
            .bundle_endpoint
            .as_ref()
            .map(|_| cfg.federation.refresh_hint),
    };
    tasks.push(tokio::spawn(schedule.run(stop_rx.clone())));
    if cfg.root_cert_configmap.enabled {
        let rc = &cfg.root_cert_configmap;
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
            tasks.push(tokio::spawn(crate::trust::configmap::publish_document(
                client.clone(),
                selector.clone(),
                live.subscribe(),
                doc,
                stop_rx.clone(),
            )));
        }
    }
    tasks.push(tokio::spawn(
        live.clone().watch_store(cfg.state_poll_interval, stop_rx),
    ));
    tracing::info!(%grpc_addr, %http_addr, trust_domain = %td, "meshid server started");
    Ok(Running {
        grpc_addr,
        http_addr,
        unix_path,
        live,
        metrics,
        propagation,
        proxies,
        bundle_addr: fed.bundle_addr,
        federation: fed.status,
        federation_refresh: fed.refresh,
        stop,
        tasks,
    })
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        what: what.to_owned(),
        source,
    }
}

/// Binds with the kernel's full accept backlog (`net::bind_tcp`), not mio's 128.
async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, ServerError> {
    crate::net::bind_tcp(addr).map_err(|source| ServerError::Io {
        what: format!("binding {what} listener {addr}"),
        source,
    })
}

/// Serves gRPC on `incoming` until `stop` fires.
async fn serve<I, IO, IE>(
    routes: GrpcRoutes,
    incoming: I,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
) where
    I: futures::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Err(e) = routes
        .serve_with_incoming_shutdown(incoming, async move { stopping(&mut stop).await })
        .await
    {
        tracing::error!(error = %e, listener = what, "gRPC server failed");
    }
}

/// The gRPC router, with the deadline layer around every call.
type GrpcRoutes = tonic::transport::server::Router<
    tower::layer::util::Stack<crate::api::deadline::DeadlineLayer, tower::layer::util::Identity>,
>;

/// The gRPC services with their limits: streams per connection, a deadline on unary calls
/// answered DEADLINE_EXCEEDED (a stream's covers only its opening), per-method decode limits,
/// and the CSR API authenticated on headers before its body is decoded.
fn grpc_router(
    sds: &SdsService,
    csr: &CsrService,
    eds: Option<&EdsService>,
    auth: &Authenticator,
    limits: &config::Limits,
) -> GrpcRoutes {
    let xds_max = limits.xds_max_request_bytes;
    let csr_server = IstioCertificateServiceServer::new(csr.clone())
        .max_decoding_message_size(limits.csr_max_request_bytes);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(limits.max_concurrent_streams_per_connection))
        .layer(crate::api::deadline::DeadlineLayer::new(
            limits.unary_timeout,
        ))
        .add_service(SdsServer::new(sds.clone(), xds_max))
        .add_service(Gate::new(csr_server, auth.clone()))
        .add_optional_service(eds.map(|e| {
            EndpointDiscoveryServiceServer::new(e.clone()).max_decoding_message_size(xds_max)
        }))
}

/// The remote clusters of multi-cluster discovery: configured ones, and Istio's remote secrets.
async fn remote_clusters(
    d: &config::Discovery,
    primary: &kube::Client,
    metrics: &Arc<Metrics>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<MultiCluster, ServerError> {
    let mc = MultiCluster::new();
    for (i, c) in d.clusters.iter().enumerate() {
        let client = kube_client(Some(&c.kubeconfig)).await.map_err(|why| {
            ServerError::Config(vec![format!("discovery.clusters[{i}] ({}): {why}", c.name)])
        })?;
        mc.add(&c.name, client);
    }
    if d.remote_secrets {
        tasks.push(watch_remote_secrets(RemoteSecrets {
            client: primary.clone(),
            namespace: d.root_namespace.clone(),
            remotes: mc.remotes.clone(),
            configured: d.clusters.iter().map(|c| c.name.clone()).collect(),
            notify: mc.notify.clone(),
            policy: d.insecure_kubeconfig_options.clone(),
            metrics: metrics.clone(),
        }));
    }
    Ok(mc)
}

async fn discovery_gauges(
    mut view: watch::Receiver<Arc<DiscoveryView>>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let v = view.borrow_and_update().clone();
        metrics.set_discovery(&v.stats);
        tokio::select! {
            r = view.changed() => if r.is_err() { return },
            () = stopping(&mut stop) => return,
        }
    }
}

type TlsConn = Limited<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// Runs [`crate::net::accept_loop`] on its own task.
fn spawn_accept_loop<L, F, Fut>(
    listener: L,
    max_connections: usize,
    what: &'static str,
    stop: watch::Receiver<bool>,
    handle: F,
) where
    L: crate::net::Accept,
    F: FnMut(L::Conn, OwnedSemaphorePermit) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    tokio::spawn(crate::net::accept_loop(
        listener,
        max_connections,
        what,
        stop,
        handle,
    ));
}

/// Accepts TCP connections (at most `limits.max_connections`) and completes TLS handshakes off
/// the accept loop, each within `limits.tls_handshake_timeout`.
fn tls_incoming(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    limits: &config::Limits,
    stop: watch::Receiver<bool>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let handshake_timeout = limits.tls_handshake_timeout;
    spawn_accept_loop(
        listener,
        limits.max_connections,
        "gRPC",
        stop,
        move |tcp, permit| {
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let limited = Limited {
                            io: tls,
                            _permit: permit,
                        };
                        let _ = tx.send(Ok(limited)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
            std::future::ready(true)
        },
    );
    ReceiverStream::new(rx)
}

/// Accepts Unix-socket connections, at most `max_connections` open at once.
fn unix_incoming(
    listener: tokio::net::UnixListener,
    max_connections: usize,
    stop: watch::Receiver<bool>,
) -> ReceiverStream<Result<Limited<tokio::net::UnixStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    spawn_accept_loop(
        listener,
        max_connections,
        "Unix socket",
        stop,
        move |conn, permit| {
            let tx = tx.clone();
            async move {
                let limited = Limited {
                    io: conn,
                    _permit: permit,
                };
                tx.send(Ok(limited)).await.is_ok()
            }
        },
    );
    ReceiverStream::new(rx)
}

/// A connection that holds one of the listener's connection slots until it closes.
struct Limited<IO> {
    io: IO,
    _permit: OwnedSemaphorePermit,
}

impl<IO: Connected> Connected for Limited<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

async fn build_router(
    cfg: &Config,
    td: &TrustDomain,
    clock: &Arc<dyn Clock>,
) -> Result<ClusterRouter, ServerError> {
    let mut clusters = Vec::new();
    for c in &cfg.clusters {
        let v = validator_for(c, td, clock)
            .await
            .map_err(|why| ServerError::Identity {
                cluster: c.name.clone(),
                why,
            })?;
        clusters.push((ClusterId(c.name.clone()), v));
    }
    let default = ClusterId(cfg.default_cluster().name.clone());
    let mut router = ClusterRouter::from_clusters(default, clusters)
        .map_err(|e| ServerError::Config(vec![format!("clusters: {e}")]))?;
    for c in &cfg.clusters {
        for alias in &c.aliases {
            router = router.with_alias(alias.clone(), ClusterId(c.name.clone()));
        }
    }
    Ok(router)
}

/// A kube client from a kubeconfig file, or in-cluster/`KUBECONFIG` configuration.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
    match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| e.to_string())?;
            kube::Client::try_from(config).map_err(|e| e.to_string())
        }
        None => kube::Client::try_default()
            .await
            .map_err(|e| format!("no in-cluster or KUBECONFIG configuration: {e}")),
    }
}

async fn validator_for(
    c: &config::Cluster,
    td: &TrustDomain,
    clock: &Arc<dyn Clock>,
) -> Result<Arc<dyn TokenValidator>, String> {
    let cache = CacheConfig {
        ttl: c.cache_ttl,
        max_entries: c.cache_max_entries,
        negative_ttl: c.negative_cache_ttl,
        negative_max_entries: c.negative_cache_max_entries,
    };
    let id = ClusterId(c.name.clone());
    if let Some(tr) = &c.tokenreview {
        let client = kube_client(tr.kubeconfig.as_deref()).await?;
        let mut rc = TokenReviewConfig::new(id, td.clone());
        rc.audiences = c.audiences.clone();
        rc.allow_legacy_tokens = c.allow_legacy_tokens;
        rc.rate = tr.rate;
        rc.timeout = tr.timeout;
        rc.issuers = tr.issuers.clone();
        rc.leeway = c.leeway;
        rc.verify_signatures = tr.verify_signatures;
        let v = TokenReviewValidator::new(client, rc, clock.clone());
        return Ok(Arc::new(CachingValidator::new(v, cache, clock.clone())));
    }
    let j = c.jwks.as_ref().ok_or("set [tokenreview] or [jwks]")?;
    let mut jc = JwtConfig::new(id, td.clone(), Some(j.issuer.clone()));
    jc.issuers.extend(j.additional_issuers.iter().cloned());
    jc.audiences = c.audiences.clone();
    jc.allow_legacy_tokens = c.allow_legacy_tokens;
    jc.leeway = c.leeway;
    if let Some(ca) = &j.ca_file {
        jc.extra_ca_pem =
            Some(std::fs::read(ca).map_err(|e| format!("ca_file {}: {e}", ca.display()))?);
    }
    let source = match (&j.file, &j.url, &j.oidc_issuer, &j.api_server) {
        (Some(f), ..) => JwksSource::File(f.clone()),
        (_, Some(u), ..) => JwksSource::Url(u.clone()),
        (_, _, Some(i), _) => JwksSource::Discovery(i.clone()),
        (.., Some(a)) => JwksSource::ApiServer(kube_client(a.kubeconfig.as_deref()).await?),
        _ => return Err("set one of file, url, oidc_issuer or api_server".into()),
    };
    let v = JwksValidator::new(jc, source, clock.clone()).map_err(|e| e.to_string())?;
    Ok(Arc::new(CachingValidator::new(v, cache, clock.clone())))
}

/// meshid's serving certificate, owned by a `Renewer` like every other credential.
struct ServingCert {
    renewer: Renewer<Arc<rustls::sign::CertifiedKey>>,
    id: SpiffeId,
    dns: Vec<String>,
}

impl ServingCert {
    fn issue(&mut self, snapshot: &CaSnapshot) -> Result<(), ServerError> {
        let (id, dns) = (&self.id, &self.dns);
        self.renewer.renew(|| {
            let (issued, key) = snapshot
                .authority
                .issue_server_cert(id, dns, None)
                .map_err(|e| ServerError::ServingCert(e.to_string()))?;
            let ck = certified_key(&issued, &key)
                .map_err(|e| ServerError::ServingCert(e.to_string()))?;
            Ok(Issued {
                value: ck,
                signer_id: snapshot.signer_id.clone(),
                not_after: issued.not_after,
            })
        })
    }

    async fn renew_loop(
        mut self,
        mut live: watch::Receiver<Arc<CaSnapshot>>,
        resolver: Arc<RotatingCert>,
        mut stop: watch::Receiver<bool>,
    ) {
        let clock = self.renewer_clock();
        loop {
            let wake = match self.renewer.next_wake() {
                Some(t) => clock.sleep_until(t),
                None => Box::pin(std::future::pending()),
            };
            tokio::select! {
                _ = wake => {}
                r = live.changed() => {
                    if r.is_err() { return }
                    let snap = live.borrow_and_update().clone();
                    let tainted = |s: &str| snap.tainted_signers.contains(s);
                    self.renewer.observe(&SignerView { current: &snap.signer_id, is_tainted: &tainted });
                }
                () = stopping(&mut stop) => return,
            }
            if !self.renewer.is_due() {
                continue;
            }
            let snapshot = live.borrow_and_update().clone();
            match self.issue(&snapshot) {
                Ok(()) => {
                    if let Some(ck) = self.renewer.current() {
                        resolver.set(ck.clone());
                    }
                    tracing::info!(refresh_at = ?self.renewer.next_wake(), "serving certificate renewed");
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_at = ?self.renewer.next_wake(), "serving certificate renewal failed; retrying with backoff");
                }
            }
        }
    }

    fn renewer_clock(&self) -> Arc<dyn Clock> {
        self.renewer.clock()
    }
}

#[derive(Default)]
struct Readiness {
    identity_ok: AtomicBool,
    why: Mutex<String>,
}

impl Health for Readiness {
    fn ready(&self) -> Result<(), String> {
        if self.identity_ok.load(Ordering::Acquire) {
            Ok(())
        } else {
            let why = self.why.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Err(if why.is_empty() {
                "identity backends not probed yet".into()
            } else {
                why
            })
        }
    }
}

/// What the HTTP port serves besides metrics: readiness and the rotation status.
struct HttpSurface {
    readiness: Arc<Readiness>,
    rotation: RotationPage,
}

impl Health for HttpSurface {
    fn ready(&self) -> Result<(), String> {
        self.readiness.ready()
    }

    fn json_page(&self, path: &str) -> Option<String> {
        (path == crate::rotation::STATUS_PATH).then(|| self.rotation.render())
    }
}

/// `GET /debug/rotation`: what every open SDS stream has ACKed, against the snapshot served now.
struct RotationPage {
    registry: Arc<Propagation>,
    live: Arc<LiveCa>,
    replica: String,
}

impl RotationPage {
    fn render(&self) -> String {
        let status =
            crate::rotation::status_of(&self.registry, &self.live.current(), &self.replica);
        serde_json::to_string_pretty(&status).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// Probes once: the default (local) cluster's backend gates readiness; a remote cluster's API
/// server being down is logged and exported (`meshid_identity_backend_up`) but does not take
/// this replica out of service for every local workload. Returns whether ready.
async fn probe_once(router: &ClusterRouter, readiness: &Readiness, metrics: &Metrics) -> bool {
    let up = |id: &ClusterId, ok: bool| {
        metrics
            .identity_backend_up
            .get_or_create(&Metrics::label("cluster", &id.0))
            .set(i64::from(ok));
    };
    for (id, result) in router.probe_remotes().await {
        if let Err(why) = &result {
            tracing::warn!(cluster = %id, %why, "remote cluster's identity backend is unavailable; its callers are refused until it recovers");
        }
        up(&id, result.is_ok());
    }
    let result = router.probe_default().await;
    up(router.default_cluster(), result.is_ok());
    match result {
        Ok(()) => {
            readiness.identity_ok.store(true, Ordering::Release);
            true
        }
        Err(why) => {
            tracing::warn!(%why, "identity backend not ready");
            *readiness.why.lock().unwrap_or_else(|e| e.into_inner()) = why;
            readiness.identity_ok.store(false, Ordering::Release);
            false
        }
    }
}

async fn probe_loop(
    router: ClusterRouter,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let wait = if probe_once(&router, &readiness, &metrics).await {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(2)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            () = stopping(&mut stop) => return,
        }
    }
}

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
        let root_expiry = snap
            .bundle
            .own_roots()
            .iter()
            .filter_map(|r| {
                x509_parser::parse_x509_certificate(r)
                    .ok()
                    .map(|(_, c)| c.validity().not_after.timestamp())
            })
            .max()
            .unwrap_or(0);
        metrics.root_expiry.set(root_expiry);
        tokio::select! {
            r = live.changed() => if r.is_err() { return },
            () = stopping(&mut stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ProbeFuture, Token, ValidateFuture};

    /// A backend whose probe says `up` or not.
    struct Backend(bool);

    impl TokenValidator for Backend {
        fn validate<'a>(&'a self, _: &'a Token) -> ValidateFuture<'a> {
            Box::pin(async { Err(crate::identity::IdentityError::NoToken) })
        }

        fn probe(&self) -> ProbeFuture<'_> {
            let up = self.0;
            Box::pin(async move {
                if up {
                    Ok(())
                } else {
                    Err("API server down".into())
                }
            })
        }
    }

    fn router(local: bool, remote: bool) -> ClusterRouter {
        ClusterRouter::new(ClusterId("Kubernetes".into()), Arc::new(Backend(local)))
            .with_cluster(ClusterId("east".into()), Arc::new(Backend(remote)))
    }

    /// Issue 8 item 19: a remote cluster's API server does not gate readiness (the old loop
    /// probed every cluster and went unready on the first failure); it is exported instead.
    #[tokio::test]
    async fn only_the_default_cluster_gates_readiness() {
        let metrics = Metrics::new();
        let readiness = Readiness::default();
        assert!(probe_once(&router(true, false), &readiness, &metrics).await);
        assert!(readiness.ready().is_ok());
        let up = |c: &str| {
            metrics
                .identity_backend_up
                .get_or_create(&Metrics::label("cluster", c))
                .get()
        };
        assert_eq!((up("Kubernetes"), up("east")), (1, 0));
        assert!(!probe_once(&router(false, true), &readiness, &metrics).await);
        assert!(readiness.ready().unwrap_err().contains("API server down"));
    }
}
