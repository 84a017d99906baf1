//! The server end to end with real clients: SDS and the CSR API → a real rustls mTLS handshake
//! between two workloads; the xDS state machine; rotation on a moved clock; bundle pushes;
//! refusals; metrics, health and the Unix socket.

use std::{sync::Arc, time::Duration};

use envoy_types::pb::{
    envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse},
    google::rpc::Status as RpcStatus,
};
use meshid::{
    ca::{root, KeyType},
    clock::{ManualClock, SystemClock},
    spiffe::SpiffeId,
    state::{RootOrigin, RootRecord, RootState, StateStore},
    tls::{peer_spiffe_id, PeerPolicy, SpiffeVerifier},
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::server_support::{sds_req as req, *};

const TYPE: &str = meshid::api::SECRET_TYPE_URL;

/// An open StreamSecrets stream: send requests, receive responses.
pub(crate) struct Sds {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl Sds {
    pub(crate) async fn open(server: &TestServer, token: String) -> Result<Self, tonic::Status> {
        let (tx, out) = mpsc::channel(8);
        let mut client = server.sds(Some(token)).await;
        let rx = client
            .stream_secrets(ReceiverStream::new(out))
            .await?
            .into_inner();
        Ok(Self { tx, rx })
    }

    pub(crate) async fn send(&self, r: DiscoveryRequest) {
        self.tx.send(r).await.unwrap();
    }

    pub(crate) async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("a response within 10 s")
            .unwrap()
            .unwrap()
    }

    /// Asserts nothing arrives for a while.
    async fn quiet(&mut self) {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(400), self.rx.message()).await {
            panic!("expected no response, got {m:?}");
        }
    }
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A real TLS handshake over an in-memory pipe: each side presents its SVID and verifies the
/// other's SPIFFE ID against the roots it was given. Returns the IDs each side saw.
async fn mtls(
    server: (&str, &str, &str),
    server_expects: &SpiffeId,
    client: (&str, &str, &str),
    client_expects: &SpiffeId,
) -> (SpiffeId, SpiffeId) {
    let key = |pem: &str| PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (s_chain, s_key, s_roots) = server;
    let (c_chain, c_key, c_roots) = client;
    let scfg = rustls::ServerConfig::builder_with_provider(meshid::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(SpiffeVerifier::new(
            pem_certs(s_roots),
            PeerPolicy::Exact(server_expects.clone()),
        ))
        .with_single_cert(pem_certs(s_chain), key(s_key))
        .unwrap();
    let ccfg = rustls::ClientConfig::builder_with_provider(meshid::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeVerifier::new(
            pem_certs(c_roots),
            PeerPolicy::Exact(client_expects.clone()),
        ))
        .with_client_auth_cert(pem_certs(c_chain), key(c_key))
        .unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(scfg));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ccfg));
    let srv = tokio::spawn(async move {
        let mut s = acceptor.accept(a).await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"pong").await.unwrap();
        s.flush().await.unwrap();
        peer_spiffe_id(&s.get_ref().1.peer_certificates().unwrap()[0]).unwrap()
    });
    let mut c = connector
        .connect(ServerName::try_from("workload.invalid").unwrap(), b)
        .await
        .unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    let seen_by_client = peer_spiffe_id(&c.get_ref().1.peer_certificates().unwrap()[0]).unwrap();
    (srv.await.unwrap(), seen_by_client)
}

async fn default_and_rootca(server: &TestServer, ns: &str, sa: &str) -> (String, String, String) {
    let mut s = Sds::open(server, server.token(ns, sa)).await.unwrap();
    s.send(req(&["default", "ROOTCA"], "", "")).await;
    let resp = s.recv().await;
    assert_eq!(resp.type_url, TYPE);
    assert!(!resp.version_info.is_empty() && !resp.nonce.is_empty());
    let secrets = secrets(&resp);
    let names: Vec<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["ROOTCA", "default"]);
    let (chain, key) = tls_cert(&secrets[1]);
    (chain, key, trusted_ca(&secrets[0]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_credentials_complete_a_real_mtls_handshake() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let product = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/product-service").unwrap();
    let inventory = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/inventory-service").unwrap();
    let (p_chain, p_key, p_roots) = default_and_rootca(&server, "shop", "product-service").await;
    let (i_chain, i_key, i_roots) = default_and_rootca(&server, "shop", "inventory-service").await;
    assert_eq!(p_roots, server.root_pem);
    assert_eq!(peer_spiffe_id(&pem_certs(&p_chain)[0]).unwrap(), product);
    let (seen_by_inventory, seen_by_product) = mtls(
        (&i_chain, &i_key, &i_roots),
        &product,
        (&p_chain, &p_key, &p_roots),
        &inventory,
    )
    .await;
    assert_eq!((seen_by_inventory, seen_by_product), (product, inventory));
    server.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_api_credentials_complete_a_real_mtls_handshake() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let mut creds = Vec::new();
    for sa in ["product-service", "inventory-service"] {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let mut client = server.csr(Some(server.token("shop", sa))).await;
        let resp = client
            .create_certificate(meshid::api::istio::IstioCertificateRequest {
                csr,
                validity_duration: 1800,
                metadata: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.cert_chain.len(), 2, "leaf, then the root bundle");
        assert_eq!(resp.cert_chain[1], server.root_pem, "root bundle last");
        let leaf = &pem_certs(&resp.cert_chain[0])[0];
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).unwrap();
        let v = parsed.validity();
        assert_eq!(
            v.not_after.timestamp() - v.not_before.timestamp(),
            1800 + 60,
            "validity_duration honoured"
        );
        creds.push((
            resp.cert_chain[0].clone(),
            key.serialize_pem(),
            resp.cert_chain[1].clone(),
        ));
    }
    let product = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/product-service").unwrap();
    let inventory = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/inventory-service").unwrap();
    let (p, i) = (&creds[0], &creds[1]);
    let seen = mtls((&i.0, &i.1, &i.2), &product, (&p.0, &p.1, &p.2), &inventory).await;
    assert_eq!(seen, (product, inventory));
    server.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_state_machine() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let mut s = Sds::open(&server, server.token("shop", "a")).await.unwrap();
    s.send(req(&["ROOTCA"], "", "")).await;
    let r1 = s.recv().await;
    assert_eq!(secrets(&r1).len(), 1);
    // ACK: nothing more is sent.
    s.send(req(&["ROOTCA"], &r1.nonce, &r1.version_info)).await;
    s.quiet().await;
    // Changed subscription on the latest nonce: the new set, with a new version and nonce.
    s.send(req(&["ROOTCA", "ALL"], &r1.nonce, &r1.version_info))
        .await;
    let r2 = s.recv().await;
    assert_ne!(
        (r2.version_info.as_str(), r2.nonce.as_str()),
        (r1.version_info.as_str(), r1.nonce.as_str())
    );
    let names: Vec<String> = secrets(&r2).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["ALL", "ROOTCA"]);
    // A stale nonce is ignored, even with a new subscription.
    s.send(req(&["default"], &r1.nonce, &r1.version_info)).await;
    s.quiet().await;
    // NACK of the latest response: logged, counted, not answered with the same resources.
    let mut nack = req(&["ROOTCA", "ALL"], &r2.nonce, &r1.version_info);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "bad validation context".into(),
        details: vec![],
    });
    s.send(nack).await;
    s.quiet().await;
    let metrics = http_get(&server, "/metrics").await;
    assert!(metrics.contains("meshid_sds_nacks_total 1"), "{metrics}");
    // Unknown names do not end the stream: they are left out (xds_conformance has the rest).
    s.send(req(&["ROOTCA", "bogus"], &r2.nonce, &r2.version_info))
        .await;
    let r3 = s.recv().await;
    let names: Vec<String> = secrets(&r3).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["ROOTCA"]);
    server.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_carries_the_spiffe_validator_and_fetch_secrets_works() {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        secret, SpiffeCertValidatorConfig,
    };
    use prost::Message;
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let mut client = server.sds(Some(server.token("shop", "a"))).await;
    let resp = client
        .fetch_secrets(req(&["ALL", "spiffe://cluster.local", "default"], "", ""))
        .await
        .unwrap()
        .into_inner();
    let s = secrets(&resp);
    let Some(secret::Type::ValidationContext(vc)) = &s[0].r#type else {
        panic!()
    };
    let ext = vc.custom_validator_config.as_ref().unwrap();
    assert_eq!(ext.name, "envoy.tls.cert_validator.spiffe");
    let cfg =
        SpiffeCertValidatorConfig::decode(ext.typed_config.as_ref().unwrap().value.as_slice())
            .unwrap();
    assert_eq!(cfg.trust_domains.len(), 1);
    assert_eq!(cfg.trust_domains[0].name, "cluster.local");
    assert_eq!(trusted_ca(&s[1]), server.root_pem);
    let (chain, _) = tls_cert(&s[2]);
    assert_eq!(
        peer_spiffe_id(&pem_certs(&chain)[0]).unwrap().to_string(),
        "spiffe://cluster.local/ns/shop/sa/a"
    );
    let err = client
        .fetch_secrets(req(&["nope"], "", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("\"nope\""));
    server.running.shutdown().await;
}

async fn next_delta(
    rx: &mut tonic::Streaming<
        envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse,
    >,
) -> envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_secrets() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let mut client = server.sds(Some(server.token("shop", "a"))).await;
    let (tx, out) = mpsc::channel(8);
    let mut rx = client
        .delta_secrets(ReceiverStream::new(out))
        .await
        .unwrap()
        .into_inner();
    tx.send(DeltaDiscoveryRequest {
        type_url: TYPE.into(),
        resource_names_subscribe: vec!["default".into(), "ROOTCA".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let r1 = next_delta(&mut rx).await;
    let mut names: Vec<&str> = r1.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["ROOTCA", "default"]);
    assert!(r1.resources.iter().all(|r| !r.version.is_empty()));
    // ACK, then swap ROOTCA for ALL: only ALL is sent.
    tx.send(DeltaDiscoveryRequest {
        type_url: TYPE.into(),
        response_nonce: r1.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(DeltaDiscoveryRequest {
        type_url: TYPE.into(),
        response_nonce: r1.nonce.clone(),
        resource_names_subscribe: vec!["ALL".into()],
        resource_names_unsubscribe: vec!["ROOTCA".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let r2 = next_delta(&mut rx).await;
    assert_eq!(
        r2.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["ALL"]
    );
    assert_ne!(r2.nonce, r1.nonce);
    server.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_is_rotated_at_half_life_on_the_injected_clock() {
    let clock = ManualClock::new(
        time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap(),
    );
    // Streams outlive the half-life here (their maximum age is 30 min by default).
    let server = TestServer::start_with(Arc::new(clock.clone()), |c| {
        c.limits.max_stream_age = Duration::from_secs(2 * 3600)
    })
    .await;
    let mut s = Sds::open(&server, server.token("shop", "a")).await.unwrap();
    s.send(req(&["default"], "", "")).await;
    let r1 = s.recv().await;
    s.send(req(&["default"], &r1.nonce, &r1.version_info)).await;
    let (chain1, key1) = tls_cert(&secrets(&r1)[0]);
    // 25 minutes is before 50% - 5% of an hour: nothing happens.
    clock.advance(Duration::from_secs(25 * 60));
    s.quiet().await;
    // 34 minutes is past 50% + 5%: a new certificate with a new key is pushed.
    clock.advance(Duration::from_secs(9 * 60));
    let r2 = s.recv().await;
    let (chain2, key2) = tls_cert(&secrets(&r2)[0]);
    assert_ne!(key1, key2, "fresh key");
    let serial = |pem: &str| {
        x509_parser::parse_x509_certificate(&pem_certs(pem)[0])
            .unwrap()
            .1
            .raw_serial()
            .to_vec()
    };
    assert_ne!(serial(&chain1), serial(&chain2), "new serial");
    let nb = |pem: &str| {
        x509_parser::parse_x509_certificate(&pem_certs(pem)[0])
            .unwrap()
            .1
            .validity()
            .not_before
            .timestamp()
    };
    assert_eq!(
        nb(&chain2) - nb(&chain1),
        34 * 60,
        "issued at the moved time"
    );
    server.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_change_reaches_every_open_stream() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let mut streams = Vec::new();
    for i in 0..20 {
        let mut s = Sds::open(&server, server.token("shop", &format!("sa-{i}")))
            .await
            .unwrap();
        s.send(req(&["ROOTCA"], "", "")).await;
        let r = s.recv().await;
        s.send(req(&["ROOTCA"], &r.nonce, &r.version_info)).await;
        streams.push(s);
    }
    // An operator adds a second trusted root to the store (as a rotation will); the server
    // notices within its poll interval and pushes to every stream.
    let store = meshid::state::DirStore::new(server.state_dir());
    let current = store.load_existing().unwrap();
    let mut next = current.state.clone();
    let extra = root::generate_root(
        &next.trust_domain,
        KeyType::EcdsaP256,
        root::DEFAULT_ROOT_TTL,
        now(),
    )
    .unwrap();
    // Prepared: trusted by every peer, not signing (the first step of a rotation).
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
    for s in &mut streams {
        let r = s.recv().await;
        assert_eq!(pem_certs(&trusted_ca(&secrets(&r)[0])).len(), 2);
    }
    server.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_issue_nothing() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let csr_for = |sans: &[&str]| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        crate::support::csr(&key, sans)
    };
    let call = |token: Option<String>, csr: String, ttl: i64| {
        let server = &server;
        async move {
            let mut c = server.csr(token).await;
            c.create_certificate(meshid::api::istio::IstioCertificateRequest {
                csr,
                validity_duration: ttl,
                metadata: None,
            })
            .await
        }
    };
    let good = server.token("shop", "a");
    type Row<'a> = (&'a str, Option<String>, String, i64, Code, &'a str);
    let rows: Vec<Row> = vec![
        (
            "no token",
            None,
            csr_for(&[]),
            0,
            Code::Unauthenticated,
            "no bearer token",
        ),
        (
            "bad token",
            Some("a.b.c".into()),
            csr_for(&[]),
            0,
            Code::Unauthenticated,
            "malformed",
        ),
        (
            "CSR for another identity",
            Some(good.clone()),
            csr_for(&["spiffe://cluster.local/ns/kube-system/sa/admin"]),
            0,
            Code::PermissionDenied,
            "kube-system",
        ),
        (
            "TTL above max",
            Some(good.clone()),
            csr_for(&[]),
            48 * 3600,
            Code::InvalidArgument,
            "maximum of 1d",
        ),
        (
            "garbage CSR",
            Some(good),
            "not a csr".into(),
            0,
            Code::InvalidArgument,
            "CSR is malformed",
        ),
    ];
    for (name, token, csr, ttl, code, needle) in rows {
        let err = call(token, csr, ttl).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(err.message().contains(needle), "{name}: {}", err.message());
    }
    let err = Sds::open(&server, "garbage".into())
        .await
        .err()
        .expect("SDS refuses a bad token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let metrics = http_get(&server, "/metrics").await;
    // Both APIs' series exist from the start (at 0) and stay there.
    for api in ["csr", "sds"] {
        assert!(
            metrics.contains(&format!("meshid_certs_issued_total{{api=\"{api}\"}} 0\n")),
            "nothing issued:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("meshid_authentication_failures_total{reason=\"no_token\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshid_sign_errors_total{kind=\"permission_denied\"} 1"),
        "{metrics}"
    );
    server.running.shutdown().await;
}

pub(crate) async fn http_get(server: &TestServer, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(server.running.http_addr)
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_unix_socket() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    assert!(http_get(&server, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
    let mut ready = String::new();
    for _ in 0..50 {
        ready = http_get(&server, "/readyz").await;
        if ready.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    // It says what it serves from (issue 21: readiness says what works).
    assert!(
        ready.contains(&format!(
            "CA state {}: generation 1 in service",
            server.state_dir().display()
        )),
        "{ready}"
    );
    // The CSR API over the Unix socket, plaintext.
    let path = server.running.unix_path.clone().unwrap();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut client = meshid::api::istio::istio_certificate_service_client::IstioCertificateServiceClient::with_interceptor(
        channel,
        bearer(Some(server.token("shop", "unix"))),
    );
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = crate::support::csr(&key, &[]);
    let resp = client
        .create_certificate(meshid::api::istio::IstioCertificateRequest {
            csr,
            validity_duration: 0,
            metadata: None,
        })
        .await
        .unwrap();
    assert_eq!(resp.into_inner().cert_chain.len(), 2);
    let metrics = http_get(&server, "/metrics").await;
    for name in [
        "meshid_csr_requests_total 1",
        "meshid_certs_issued_total{api=\"csr\"} 1",
        "meshid_root_cert_expiry_timestamp_seconds",
        "meshid_cert_chain_expiry_timestamp_seconds",
        "meshid_sds_streams_open 0",
        "meshid_sds_push_latency_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "missing {name}:\n{metrics}");
    }
    server.running.shutdown().await;
}
