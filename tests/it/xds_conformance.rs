//! xDS conformance of the shared engine, over real tonic clients: unknown names (kept, left out,
//! counted, sent when they appear), a reconnect's first request carrying an old nonce, Delta
//! re-subscription, full SotW unsubscription, per-stream caps, EDS names, and distrusting a
//! trust domain through `ALL`. Each test names the reference it matches.

use std::{sync::Arc, time::Duration};

use envoy_types::pb::envoy::{
    config::endpoint::v3::ClusterLoadAssignment,
    extensions::transport_sockets::tls::v3::{secret, Secret, SpiffeCertValidatorConfig},
    service::{
        discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        },
        endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient,
        secret::v3::{
            secret_discovery_service_client::SecretDiscoveryServiceClient,
            secret_discovery_service_server::SecretDiscoveryServiceServer,
        },
    },
};
use meshid::{
    api::{Authenticator, SdsService, ENDPOINT_TYPE_URL, SECRET_TYPE_URL},
    ca::{cert, root, CertDer, KeyType},
    clock::{Clock, SystemClock},
    config,
    identity::{
        ClusterId, ClusterRouter, Identity, IdentityError, Token, TokenValidator, ValidateFuture,
    },
    rotation::RefreshPolicy,
    spiffe::{SpiffeId, TrustDomain},
    state::{CaState, DirStore, Generation, RootOrigin, RootRecord, RootState, StateStore},
    telemetry::Metrics,
    trust::{CaSnapshot, LiveCa},
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{transport::Channel, Code, Streaming};

use crate::server_support::{bearer, now, secrets, trusted_ca, Authed, TestServer};

// === helpers ===

fn req(names: &[&str], nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    }
}

fn sub(names: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    }
}

/// One open stream of either flavour: send requests, receive responses or the final status.
struct Open<Q, P> {
    tx: mpsc::Sender<Q>,
    rx: Streaming<P>,
}

impl<Q, P> Open<Q, P> {
    async fn send(&self, r: Q) {
        assert!(self.tx.send(r).await.is_ok(), "request stream closed");
    }

    async fn next(&mut self) -> Result<Option<P>, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("an answer within 10 s")
    }

    async fn recv(&mut self) -> P {
        self.next().await.unwrap().expect("a response, not the end")
    }

    async fn error(&mut self) -> tonic::Status {
        match self.next().await {
            Err(status) => status,
            Ok(_) => panic!("expected the stream to end with an error"),
        }
    }

    /// Asserts nothing arrives for a while (the stream stays open).
    async fn quiet(&mut self) {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(400), self.rx.message()).await {
            panic!("expected no response, got {:?}", m.map(|o| o.is_some()));
        }
    }
}

type Sotw = Open<DiscoveryRequest, DiscoveryResponse>;
type Delta = Open<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

async fn sotw(client: &mut SecretDiscoveryServiceClient<Authed>) -> Sotw {
    let (tx, out) = mpsc::channel(8);
    let rx = client
        .stream_secrets(ReceiverStream::new(out))
        .await
        .unwrap()
        .into_inner();
    Open { tx, rx }
}

async fn delta(client: &mut SecretDiscoveryServiceClient<Authed>) -> Delta {
    let (tx, out) = mpsc::channel(8);
    let rx = client
        .delta_secrets(ReceiverStream::new(out))
        .await
        .unwrap()
        .into_inner();
    Open { tx, rx }
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    secrets(r).into_iter().map(|s| s.name).collect()
}

fn delta_names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

fn secret_named(r: &DiscoveryResponse, name: &str) -> Option<Secret> {
    secrets(r).into_iter().find(|s| s.name == name)
}

/// The trust domains `ALL` carries.
fn all_trust_domains(s: &Secret) -> Vec<String> {
    let Some(secret::Type::ValidationContext(vc)) = &s.r#type else {
        panic!("ALL is not a validation context")
    };
    let ext = vc.custom_validator_config.as_ref().unwrap();
    let cfg =
        SpiffeCertValidatorConfig::decode(ext.typed_config.as_ref().unwrap().value.as_slice())
            .unwrap();
    cfg.trust_domains.into_iter().map(|t| t.name).collect()
}

async fn metrics_text(server: &TestServer) -> String {
    server.running.metrics.render()
}

/// Adds a second trusted root to the server's state, as a rotation does; the server pushes the
/// new bundle to every stream within its poll interval.
fn add_root(server: &TestServer) {
    let store = DirStore::new(server.state_dir());
    let current = store.load_existing().unwrap();
    let mut next = current.state.clone();
    let extra = root::generate_root(
        &next.trust_domain,
        KeyType::EcdsaP256,
        root::DEFAULT_ROOT_TTL,
        now(),
    )
    .unwrap();
    next.roots.push(RootRecord::new(
        &extra.cert,
        RootState::Prepared,
        RootOrigin::Plugin,
        now(),
        None,
        None,
    ));
    store
        .compare_and_swap(Some(current.generation), &next)
        .unwrap();
}

// === item 13: unknown names ===

/// xds_protocol.rst "Knowing When a Requested Resource Does Not Exist": the server remembers
/// requested names and leaves unknown ones out; go-control-plane `cache/v3` `createResponse`
/// filters to existing resources and never fails the stream. Old code: the stream ended with
/// InvalidArgument at the first unknown name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_are_left_out_counted_and_do_not_end_the_stream() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let mut client = server.sds(Some(server.token("shop", "a"))).await;
    let mut s = sotw(&mut client).await;
    let unknown = [
        "bogus",
        "file-root:/etc/certs/root-cert.pem",
        "spiffe://other.example",
    ];
    let mut all = vec!["ROOTCA"];
    all.extend(unknown);
    s.send(req(&all, "")).await;
    let r1 = s.recv().await;
    assert_eq!(names(&r1), ["ROOTCA"]);
    // The stream lives on: an ACK is answered by nothing, a new known name by a response.
    s.send(req(&all, &r1.nonce)).await;
    s.quiet().await;
    let mut more = all.clone();
    more.push("ALL");
    s.send(req(&more, &r1.nonce)).await;
    let r2 = s.recv().await;
    assert_eq!(names(&r2), ["ALL", "ROOTCA"]);
    let m = metrics_text(&server).await;
    assert!(
        m.contains("meshid_xds_unknown_resource_names_total{type=\"sds\"} 3"),
        "counted once each:\n{m}"
    );
    // Delta: an unknown name is reported in removed_resources (the incremental variant's
    // "does not exist"), and the stream lives on.
    let mut d = delta(&mut client).await;
    d.send(sub(&["ROOTCA", "bogus"], "")).await;
    let r = d.recv().await;
    assert_eq!(delta_names(&r), ["ROOTCA"]);
    assert_eq!(r.removed_resources, ["bogus"]);
    d.send(sub(&["ALL"], &r.nonce)).await;
    assert_eq!(delta_names(&d.recv().await), ["ALL"]);
    // FetchSecrets keeps refusing unknown names.
    let err = client
        .fetch_secrets(req(&["file-cert:/etc/certs/cert-chain.pem"], ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.running.shutdown().await;
}

// === item 14: a first request carrying a nonce ===

/// istiod `pilot/pkg/xds/ads.go` shouldRespond ("Envoy reconnects to a new Istiod ... non empty
/// response nonce ... We should always respond") and go-control-plane `sotw/v3` (a stream's first
/// request opens a watch whatever its nonce). Old code: the request was stale, never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_carrying_an_old_nonce_is_answered() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let mut client = server.sds(Some(server.token("shop", "a"))).await;
    let mut s = sotw(&mut client).await;
    let mut reconnect = req(&["ROOTCA"], "17");
    reconnect.version_info = "9".into();
    s.send(reconnect).await;
    let r1 = s.recv().await;
    assert_eq!(names(&r1), ["ROOTCA"]);
    // From then on, nonces are this stream's: the old one is stale.
    s.send(req(&["ROOTCA", "ALL"], "17")).await;
    s.quiet().await;
    s.send(req(&["ROOTCA"], &r1.nonce)).await;
    s.quiet().await;
    server.running.shutdown().await;
}

/// istiod `delta.go` shouldRespondDelta (no previous info: "RECONNECT") and go-control-plane
/// `delta/v3` `NewDeltaSubscription` take `initial_resource_versions` on the first request of a
/// stream; xds_protocol.rst: "On reconnect the Incremental xDS client may tell the server of its
/// known resources to avoid resending them". Old code ignored them when the request carried a
/// nonce, and resent what the client held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_reconnect_with_a_nonce_keeps_its_initial_resource_versions() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let mut client = server.sds(Some(server.token("shop", "a"))).await;
    let mut first = delta(&mut client).await;
    first.send(sub(&["ROOTCA"], "")).await;
    let held = first.recv().await.resources[0].version.clone();
    let mut d = delta(&mut client).await;
    let mut reconnect = sub(&["ROOTCA", "ALL"], "5");
    reconnect
        .initial_resource_versions
        .insert("ROOTCA".into(), held.clone());
    d.send(reconnect).await;
    let r = d.recv().await;
    assert_eq!(delta_names(&r), ["ALL"], "ROOTCA is held at its version");
    server.running.shutdown().await;
}

// === item 15: Delta re-subscription, SotW full unsubscription ===

/// xds_protocol.rst "Subscribing to Resources": a resource_names_subscribe "may contain resource
/// names that the server believes the client is already subscribed to, and furthermore has the
/// most recent versions of. However, the server *must* still provide those resources". Old code
/// skipped them (same version), so nothing came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_resubscription_is_answered_even_at_the_same_version() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let mut client = server.sds(Some(server.token("shop", "a"))).await;
    let mut d = delta(&mut client).await;
    d.send(sub(&["ROOTCA"], "")).await;
    let r1 = d.recv().await;
    d.send(sub(&[], &r1.nonce)).await; // ACK
    d.quiet().await;
    d.send(sub(&["ROOTCA"], &r1.nonce)).await;
    let r2 = d.recv().await;
    assert_eq!(delta_names(&r2), ["ROOTCA"]);
    assert_eq!(r2.resources[0].version, r1.resources[0].version);
    server.running.shutdown().await;
}

/// xds_protocol.rst "How the client specifies what resources to return": an empty list after
/// named subscriptions means "no longer interested in any resources"; istiod `ads.go`
/// shouldUnsubscribe answers nothing, and for these types "an empty DiscoveryResponse is
/// effectively a no-op" ("Deleting Resources"). Old code kept the last versions sent and pushed
/// an empty response at the next bundle change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sotw_unsubscription_is_followed_by_no_push() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let mut client = server.sds(Some(server.token("shop", "a"))).await;
    let mut s = sotw(&mut client).await;
    s.send(req(&["ROOTCA"], "")).await;
    let r1 = s.recv().await;
    s.send(req(&["ROOTCA"], &r1.nonce)).await;
    s.send(req(&[], &r1.nonce)).await;
    s.quiet().await;
    // A witness stream still subscribed proves the bundle change reached the server's streams.
    let mut witness = sotw(&mut client).await;
    witness.send(req(&["ROOTCA"], "")).await;
    let w1 = witness.recv().await;
    witness.send(req(&["ROOTCA"], &w1.nonce)).await;
    add_root(&server);
    let w2 = witness.recv().await;
    assert_eq!(names(&w2), ["ROOTCA"]);
    s.quiet().await;
    // A request dropping some names only is not answered either (istiod shouldRespond: "if no
    // new resources are subscribed ... we do not need to push").
    witness.send(req(&["ROOTCA", "ALL"], &w2.nonce)).await;
    let w3 = witness.recv().await;
    witness.send(req(&["ALL"], &w3.nonce)).await;
    witness.quiet().await;
    server.running.shutdown().await;
}

// === item 5: per-stream caps ===

/// Per-stream state is bounded by `xds.max_resource_names_per_stream.sds`: SotW lists, Delta
/// subscriptions accumulated over requests, and Delta initial_resource_versions. Old code had no
/// cap and answered all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_streams_are_capped_in_names() {
    let server = TestServer::start_with(Arc::new(SystemClock), |cfg| {
        cfg.xds.max_resource_names_per_stream.sds = 3;
    })
    .await;
    let mut client = server.sds(Some(server.token("shop", "a"))).await;
    let key = "xds.max_resource_names_per_stream.sds";
    let mut s = sotw(&mut client).await;
    s.send(req(&["ROOTCA", "ALL", "a", "b"], "")).await;
    let err = s.error().await;
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains(key), "{}", err.message());

    let mut d = delta(&mut client).await;
    d.send(sub(&["ROOTCA", "ALL"], "")).await;
    let r = d.recv().await;
    d.send(sub(&["a", "b"], &r.nonce)).await;
    let err = d.error().await;
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains(key), "{}", err.message());

    let mut d = delta(&mut client).await;
    let mut r = sub(&["ROOTCA"], "");
    for n in ["a", "b", "c", "d"] {
        r.initial_resource_versions.insert(n.into(), "1".into());
    }
    d.send(r).await;
    assert_eq!(d.error().await.code(), Code::ResourceExhausted);

    let mut s = sotw(&mut client).await;
    let long = "x".repeat(2000);
    s.send(req(&[long.as_str()], "")).await;
    let err = s.error().await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("1024"), "{}", err.message());
    server.running.shutdown().await;
}

// === item 5 and 13 for EDS ===

const INVENTORY: &str = "outbound|8080||inventory-service.shop.svc.cluster.local";
const NO_SUCH_SERVICE: &str = "outbound|8080||nope.shop.svc.cluster.local";
const MALFORMED: &str = "inventory";

fn eds_req(names: &[&str], nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        type_url: ENDPOINT_TYPE_URL.into(),
        ..Default::default()
    }
}

fn clusters(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| {
            ClusterLoadAssignment::decode(a.value.as_slice())
                .unwrap()
                .cluster_name
        })
        .collect()
}

/// EDS serves only the clusters of service ports discovery knows: a well-formed name of an
/// unknown service and a malformed name are left out (SotW) or removed (Delta), counted, and do
/// not end the stream; FetchEndpoints refuses them. The cap is
/// `xds.max_resource_names_per_stream.eds`. Old code served an empty assignment for any
/// well-formed name, ended the stream at a malformed one, and had no cap. (istiod answers an
/// unknown service with nothing in Delta: `delta.go`/`eds.go` "removed"; go-control-plane leaves
/// missing resources out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eds_serves_only_known_clusters_and_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("mesh.yaml");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/examples/mixed-traffic.yaml"
        ),
        &snapshot,
    )
    .unwrap();
    let server = TestServer::start_with(Arc::new(SystemClock), move |cfg| {
        cfg.discovery = Some(config::Discovery {
            snapshot: Some(snapshot),
            root_namespace: "istio-system".into(),
            domain: "cluster.local".into(),
            auto_mtls: true,
            ..Default::default()
        });
        cfg.xds.max_resource_names_per_stream.eds = 3;
    })
    .await;
    let mut client = EndpointDiscoveryServiceClient::with_interceptor(
        server.channel().await,
        bearer(Some(server.token("shop", "a"))),
    );
    let (tx, out) = mpsc::channel(8);
    let rx = client
        .stream_endpoints(ReceiverStream::new(out))
        .await
        .unwrap()
        .into_inner();
    let mut s = Open { tx, rx };
    s.send(eds_req(&[INVENTORY, NO_SUCH_SERVICE, MALFORMED], ""))
        .await;
    let r1 = s.recv().await;
    assert_eq!(clusters(&r1), [INVENTORY]);
    s.send(eds_req(&[INVENTORY, NO_SUCH_SERVICE, MALFORMED], &r1.nonce))
        .await;
    s.quiet().await;
    let m = metrics_text(&server).await;
    assert!(
        m.contains("meshid_xds_unknown_resource_names_total{type=\"eds\"} 2"),
        "{m}"
    );
    // Delta: both reported as not existing.
    let (tx, out) = mpsc::channel(8);
    let rx = client
        .delta_endpoints(ReceiverStream::new(out))
        .await
        .unwrap()
        .into_inner();
    let mut d = Open { tx, rx };
    d.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT_TYPE_URL.into(),
        resource_names_subscribe: vec![INVENTORY.into(), NO_SUCH_SERVICE.into()],
        ..Default::default()
    })
    .await;
    let r = d.recv().await;
    assert_eq!(delta_names(&r), [INVENTORY]);
    assert_eq!(r.removed_resources, [NO_SUCH_SERVICE]);
    // The cap.
    s.send(eds_req(
        &[INVENTORY, NO_SUCH_SERVICE, MALFORMED, "x"],
        &r1.nonce,
    ))
    .await;
    let err = s.error().await;
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message()
            .contains("xds.max_resource_names_per_stream.eds"),
        "{}",
        err.message()
    );
    // FetchEndpoints refuses, naming them.
    let err = client
        .fetch_endpoints(eds_req(&[NO_SUCH_SERVICE], ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(NO_SUCH_SERVICE), "{}", err.message());
    server.running.shutdown().await;
}

// === item 16: distrusting a trust domain through ALL ===

/// Accepts one fixed token as shop/a (the engine, not authentication, is under test here).
struct OneToken;

const TOKEN: &str = "workload-token";

impl TokenValidator for OneToken {
    fn validate<'a>(&'a self, token: &'a Token) -> ValidateFuture<'a> {
        Box::pin(async move {
            if token.secret_str() != TOKEN {
                return Err(IdentityError::NoToken);
            }
            let td = TrustDomain::new("cluster.local").unwrap();
            Ok(Identity {
                spiffe_id: SpiffeId::for_service_account(&td, "shop", "a").unwrap(),
                namespace: "shop".into(),
                service_account: "a".into(),
                service_account_uid: None,
                pod: None,
                cluster: ClusterId("primary".into()),
                expires_at: None,
            })
        })
    }
}

/// An SDS service fed CA snapshots by the test, on 127.0.0.1.
struct Fed {
    addr: std::net::SocketAddr,
    base: Arc<CaSnapshot>,
    tx: watch::Sender<Arc<CaSnapshot>>,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Fed {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let td = TrustDomain::new("cluster.local").unwrap();
        let ca = root::generate_root(
            &td,
            KeyType::EcdsaP256,
            root::DEFAULT_ROOT_TTL,
            now() - Duration::from_secs(60),
        )
        .unwrap();
        let store = DirStore::new(dir.path().join("state"));
        store
            .compare_and_swap(None, &CaState::with_generated_root(td, &ca, now()))
            .unwrap();
        let live = LiveCa::load(Arc::new(store), Default::default(), clock.clone()).unwrap();
        let base = live.current();
        let (tx, rx) = watch::channel(base.clone());
        let metrics = Arc::new(Metrics::new());
        let router = ClusterRouter::new(ClusterId("primary".into()), Arc::new(OneToken));
        let (stop, stop_rx) = watch::channel(false);
        let sds = SdsService::new(
            Authenticator::new(router, metrics.clone()),
            rx,
            stop_rx.clone(),
            clock,
            RefreshPolicy::default(),
            meshid::api::lifetime::StreamLimits {
                max_age: Duration::from_secs(1800),
            },
            metrics,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut until = stop_rx;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SecretDiscoveryServiceServer::new(sds))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = until.wait_for(|s| *s).await;
                }),
        );
        Self {
            addr,
            base,
            tx,
            stop,
            _dir: dir,
        }
    }

    /// Publishes the base snapshot, trusting `other` too when given (a new generation each time,
    /// as every change of the state document is).
    fn publish(&self, generation: u64, other: Option<(&TrustDomain, &CertDer)>) {
        let mut bundle = (*self.base.bundle).clone();
        if let Some((td, root)) = other {
            bundle = bundle.with_trust_domain(td.clone(), vec![root.clone()]);
        }
        self.publish_bundle(generation, bundle);
    }

    /// Publishes `bundle` with the base authority, as generation base + `generation`.
    fn publish_bundle(&self, generation: u64, bundle: meshid::trust::TrustBundleSet) {
        self.tx.send_replace(Arc::new(CaSnapshot {
            authority: self.base.authority.clone(),
            bundle: Arc::new(bundle),
            generation: Generation(self.base.generation.0 + generation),
            signer_id: self.base.signer_id.clone(),
            tainted_signers: Default::default(),
            state_digest: format!("{}-{generation}", self.base.state_digest),
            roots: self.base.roots.clone(),
        }));
    }

    async fn client(&self) -> SecretDiscoveryServiceClient<Authed> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        SecretDiscoveryServiceClient::with_interceptor(channel, bearer(Some(TOKEN.into())))
    }
}

/// Envoy keeps a secret SotW stops sending (xds_protocol.rst "Deleting Resources": no deletion
/// for these types) and newer Envoys ignore Delta SDS removals, so `ALL` is how a trust domain
/// stops being trusted: when its bundle leaves the CA snapshot, `ALL` is pushed without it and
/// `spiffe://<td>` is no longer sent (SotW: left out; Delta: removed). A `spiffe://<td>`
/// subscribed before the trust domain is trusted is sent once it is (xds_protocol.rst: "if one
/// of those resources springs into existence later, the server must send an update"); old code
/// ended the stream with InvalidArgument at that subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_domain_leaving_the_bundle_is_dropped_from_all() {
    let fed = Fed::start().await;
    let other = TrustDomain::new("other.example").unwrap();
    let other_root = root::generate_root(
        &other,
        KeyType::EcdsaP256,
        root::DEFAULT_ROOT_TTL,
        now() - Duration::from_secs(60),
    )
    .unwrap();
    let other_pem = cert::to_pem(&other_root.cert);
    let mut client = fed.client().await;

    // Subscribed while not trusted: kept, then sent when it becomes trusted.
    let mut s = sotw(&mut client).await;
    s.send(req(&["ALL", "spiffe://other.example"], "")).await;
    let r1 = s.recv().await;
    assert_eq!(names(&r1), ["ALL"]);
    assert_eq!(
        all_trust_domains(&secret_named(&r1, "ALL").unwrap()),
        ["cluster.local"]
    );
    s.send(req(&["ALL", "spiffe://other.example"], &r1.nonce))
        .await;
    fed.publish(1, Some((&other, &other_root.cert)));
    let r2 = s.recv().await;
    assert_eq!(names(&r2), ["ALL", "spiffe://other.example"]);
    assert_eq!(
        all_trust_domains(&secret_named(&r2, "ALL").unwrap()),
        ["cluster.local", "other.example"]
    );
    assert_eq!(
        trusted_ca(&secret_named(&r2, "spiffe://other.example").unwrap()),
        other_pem
    );
    s.send(req(&["ALL", "spiffe://other.example"], &r2.nonce))
        .await;

    let mut d = delta(&mut client).await;
    d.send(sub(&["ALL", "spiffe://other.example"], "")).await;
    let d1 = d.recv().await;
    let mut got = delta_names(&d1);
    got.sort();
    assert_eq!(got, ["ALL", "spiffe://other.example"]);
    d.send(sub(&[], &d1.nonce)).await;

    // The trust domain leaves the bundle.
    fed.publish(2, None);
    let r3 = s.recv().await;
    assert_eq!(names(&r3), ["ALL"], "spiffe://other.example is left out");
    assert_eq!(
        all_trust_domains(&secret_named(&r3, "ALL").unwrap()),
        ["cluster.local"]
    );
    let d2 = d.recv().await;
    assert_eq!(delta_names(&d2), ["ALL"]);
    assert_eq!(d2.removed_resources, ["spiffe://other.example"]);
    let Some(secret::Type::ValidationContext(_)) =
        Secret::decode(d2.resources[0].resource.as_ref().unwrap().value.as_slice())
            .unwrap()
            .r#type
    else {
        panic!("ALL is a validation context")
    };
    let _ = fed.stop.send(true);
}

/// The plug-in CA's `ca-crl.pem` rides in ROOTCA's validation context as istio-agent puts it
/// there (`security/pkg/nodeagent/sds/sdsservice.go` `toEnvoySecret`: `crl` inline,
/// `only_verify_leaf_cert_crl` left false); `ALL` carries it only while it trusts no other
/// trust domain (with the flag false, Envoy would refuse every federated peer, whose CAs have
/// no CRL here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootca_carries_the_ca_crl_and_a_federated_all_does_not() {
    let fed = Fed::start().await;
    let crl = "-----BEGIN X509 CRL-----\nMIIBmarker\n-----END X509 CRL-----\n";
    let crl_of = |s: &Secret| {
        let Some(secret::Type::ValidationContext(vc)) = &s.r#type else {
            panic!("{} is not a validation context", s.name)
        };
        assert!(
            !vc.only_verify_leaf_cert_crl,
            "every CA of the chain is checked"
        );
        vc.crl.as_ref().map(|d| match &d.specifier {
            Some(
                envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b),
            ) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("crl is not inline bytes: {other:?}"),
        })
    };
    let with_crl = (*fed.base.bundle).clone().with_own_crl(Some(crl.into()));
    fed.publish_bundle(1, with_crl.clone());
    let mut client = fed.client().await;
    let mut s = sotw(&mut client).await;
    s.send(req(&["ROOTCA", "ALL"], "")).await;
    let r = s.recv().await;
    assert_eq!(
        crl_of(&secret_named(&r, "ROOTCA").unwrap()).as_deref(),
        Some(crl)
    );
    assert_eq!(
        crl_of(&secret_named(&r, "ALL").unwrap()).as_deref(),
        Some(crl)
    );
    s.send(req(&["ROOTCA", "ALL"], &r.nonce)).await;

    let other = TrustDomain::new("other.example").unwrap();
    let other_root = root::generate_root(
        &other,
        KeyType::EcdsaP256,
        root::DEFAULT_ROOT_TTL,
        now() - Duration::from_secs(60),
    )
    .unwrap();
    fed.publish_bundle(
        2,
        with_crl.with_trust_domain(other, vec![other_root.cert.clone()]),
    );
    let r = s.recv().await;
    let all = secret_named(&r, "ALL").expect("ALL changed");
    assert_eq!(
        crl_of(&all),
        None,
        "no CRL while another trust domain is trusted"
    );
}

/// SDS is served with small codec buffers (`api::lean::SdsServer`) instead of the generated
/// server, and keeps its contract: a request far past the 1 KiB starting buffer is read whole,
/// one above `limits.xds_max_request_bytes` ends the stream with RESOURCE_EXHAUSTED naming the
/// key (grpc-go `recvAndDecompress`: "received message larger than max"; the stream used to end
/// with OK, so the client never learned why), and a method SDS does not have is UNIMPLEMENTED,
/// saying which ones it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lean_sds_server_keeps_the_generated_servers_contract() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    let server = TestServer::start_with(Arc::new(SystemClock), |cfg| {
        cfg.limits.xds_max_request_bytes = 16 * 1024;
    })
    .await;
    let mut client = server.sds(Some(server.token("shop", "a"))).await;
    let with_node = |len: usize| {
        let mut r = req(&["ROOTCA"], "");
        r.node = Some(Node {
            id: "x".repeat(len),
            ..Default::default()
        });
        r
    };
    let mut s = sotw(&mut client).await;
    s.send(with_node(8 * 1024)).await;
    assert_eq!(secrets(&s.recv().await).len(), 1);

    let mut s = sotw(&mut client).await;
    s.send(with_node(32 * 1024)).await;
    let err = s.error().await;
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("limits.xds_max_request_bytes"),
        "{}",
        err.message()
    );

    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let err = grpc
        .unary::<DiscoveryRequest, DiscoveryResponse, _>(
            tonic::Request::new(DiscoveryRequest::default()),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/envoy.service.secret.v3.SecretDiscoveryService/NoSuchMethod",
            ),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.message().contains("StreamSecrets"), "{}", err.message());
    server.running.shutdown().await;
}
