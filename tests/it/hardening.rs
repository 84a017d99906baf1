//! The front door, hardened (issue 8): streams bounded by their caller's credentials, renewals
//! that never spin, connection and request limits, SIGTERM draining, plain-text logs.

use std::{
    io::{Read, Write},
    sync::Arc,
    time::Duration,
};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use meshid::{api::istio::IstioCertificateRequest, clock::ManualClock};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::{
    server_support::{sds_req as req, *},
    support::meshid,
};

fn manual_clock() -> ManualClock {
    ManualClock::new(
        time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap(),
    )
}

/// One SDS stream of `default`, as Envoy holds it: request, ACK, then wait.
struct Stream {
    _tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl Stream {
    async fn open(server: &TestServer, token: String) -> (Self, DiscoveryResponse) {
        let (tx, out) = mpsc::channel(8);
        let mut client = server.sds(Some(token)).await;
        let mut rx = client
            .stream_secrets(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        tx.send(req(&["default"], "", "")).await.unwrap();
        let first = next(&mut rx).await.unwrap().unwrap();
        tx.send(req(&["default"], &first.nonce, &first.version_info))
            .await
            .unwrap();
        (Self { _tx: tx, rx }, first)
    }
}

async fn next(
    rx: &mut tonic::Streaming<DiscoveryResponse>,
) -> Result<Option<DiscoveryResponse>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("an answer or the end of the stream within 10 s")
}

fn leaf_not_before(resp: &DiscoveryResponse) -> i64 {
    let (chain, _) = tls_cert(&secrets(resp)[0]);
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(chain.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'static>| c)
        .unwrap();
    x509_parser::parse_x509_certificate(&der)
        .unwrap()
        .1
        .validity()
        .not_before
        .timestamp()
}

/// A metric's value from the server's Prometheus text (0 when absent).
fn metric(server: &TestServer, name_and_labels: &str) -> f64 {
    server
        .running
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// === item 1: a stream lives no longer than its caller's credentials ===

/// A stream opened with a 10-minute token ends with UNAUTHENTICATED at the token's exp (it
/// used to keep receiving fresh keys forever); a client that reconnects with the token file's
/// current content, as Envoy's `file_based_metadata` credentials do, keeps its certificate current.
/// The kubelet rewrites a projected token at 80 % of its lifetime (kubelet
/// `pkg/kubelet/token/token_manager.go` `requiresRefresh`), so a proxy holds a fresh one by `exp`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_at_token_expiry_and_a_reconnecting_client_stays_current() {
    let clock = manual_clock();
    let server = TestServer::start_with(Arc::new(clock.clone()), |c| {
        c.limits.max_stream_age = Duration::from_secs(24 * 3600);
    })
    .await;
    let token_file = server.dir.path().join("token");
    std::fs::write(
        &token_file,
        server.token_for("shop", "a", Duration::from_secs(600)),
    )
    .unwrap();
    let read_token = || std::fs::read_to_string(&token_file).unwrap();

    let (mut s, first) = Stream::open(&server, read_token()).await;
    let t0 = leaf_not_before(&first);
    // The kubelet rotates the token file at 80 % of its life.
    clock.advance(Duration::from_secs(480));
    std::fs::write(
        &token_file,
        server.token_for("shop", "a", Duration::from_secs(600)),
    )
    .unwrap();
    // Just before exp the stream is still open (no renewal is due yet: 1 h leaf).
    clock.advance(Duration::from_secs(119));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.rx.message())
            .await
            .is_err(),
        "the stream is still open before exp"
    );
    clock.advance(Duration::from_secs(1));
    let end = next(&mut s.rx).await.unwrap_err();
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert!(end.message().contains("token expired"), "{end:?}");

    // The client reconnects with what the file holds now and gets a certificate issued now.
    let (_s2, again) = Stream::open(&server, read_token()).await;
    assert_eq!(leaf_not_before(&again) - t0, 600, "issued at reconnection");
    server.running.shutdown().await;
}

/// EDS streams are bounded the same way: they end with UNAUTHENTICATED at the token's exp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eds_stream_ends_at_token_expiry_too() {
    use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient;
    let clock = manual_clock();
    let snapshot = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/mixed-traffic.yaml"
    );
    let server = TestServer::start_with(Arc::new(clock.clone()), |c| {
        c.limits.max_stream_age = Duration::from_secs(24 * 3600);
        c.discovery = Some(meshid::config::Discovery {
            snapshot: Some(snapshot.into()),
            ..Default::default()
        });
    })
    .await;
    let mut client = EndpointDiscoveryServiceClient::with_interceptor(
        server.channel().await,
        bearer(Some(server.token_for(
            "shop",
            "product-service",
            Duration::from_secs(600),
        ))),
    );
    let (tx, out) = mpsc::channel(8);
    let mut rx = client
        .stream_endpoints(ReceiverStream::new(out))
        .await
        .unwrap()
        .into_inner();
    tx.send(DiscoveryRequest {
        resource_names: vec!["outbound|8080||inventory-service.shop.svc.cluster.local".into()],
        type_url: meshid::api::ENDPOINT_TYPE_URL.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.resources.len(), 1);
    clock.advance(Duration::from_secs(600));
    let end = tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("the stream ends")
        .unwrap_err();
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    drop(tx);
    server.running.shutdown().await;
}

/// After `max_stream_age` (± 10 %) a stream ends gracefully (status OK), like istiod's
/// MaxServerConnectionAge (30 min in its chart) with grpc-go's jitter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_gracefully_after_its_maximum_age() {
    let clock = manual_clock();
    let server = TestServer::start_with(Arc::new(clock.clone()), |c| {
        c.limits.max_stream_age = Duration::from_secs(600);
    })
    .await;
    let (mut s, _) = Stream::open(&server, server.token("shop", "a")).await;
    clock.advance(Duration::from_secs(539)); // 10 min - 10 % - 1 s
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.rx.message())
            .await
            .is_err(),
        "still open before the earliest end"
    );
    clock.advance(Duration::from_secs(122)); // past 10 min + 10 %
    match next(&mut s.rx).await {
        Ok(None) => {}
        Err(st) if st.code() == Code::Ok => {}
        other => panic!("expected a graceful end, got {other:?}"),
    }
    server.running.shutdown().await;
}

/// The identity is re-checked before every renewal, through the validator and its cache: in
/// TokenReview mode, once the API server no longer authenticates the token (its pod or service
/// account was deleted), the next renewal ends the stream instead of issuing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_rechecks_the_token_and_ends_the_stream_when_refused() {
    let clock = manual_clock();
    let api = crate::fake_apiserver::FakeApiServer::start().await;
    api.set_reviewer(crate::fake_apiserver::reviewer_from_claims);
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kubeconfig.path(), api.kubeconfig_yaml()).unwrap();
    let kc = kubeconfig.path().to_owned();
    let server = TestServer::start_with(Arc::new(clock.clone()), move |c| {
        c.limits.max_stream_age = Duration::from_secs(24 * 3600);
        c.clusters[0].cache_ttl = Duration::from_secs(60);
        c.clusters[0].jwks = None;
        c.clusters[0].tokenreview = Some(meshid::config::TokenReview {
            kubeconfig: Some(kc),
            rate: Default::default(),
            timeout: Duration::from_secs(5),
            issuers: vec![],
            verify_signatures: true,
            mode: Default::default(),
        });
    })
    .await;
    api.set_jwks(&server.issuer.jwks());
    let token = server.token_for("shop", "a", Duration::from_secs(6 * 3600));
    let (mut s, _) = Stream::open(&server, token).await;
    let issued_before = metric(&server, "meshid_certs_issued_total{api=\"sds\"}");
    let reviews_before = api.tokenreview_calls();
    // The pod is deleted: the API server stops authenticating its token.
    api.set_reviewer(|_, _| {
        crate::fake_apiserver::Reply::Status(
            serde_json::json!({"authenticated": false, "error": "pod \"a-0\" not found"}),
        )
    });
    // Past the refresh point of the 1 h leaf (and the cache TTL).
    clock.advance(Duration::from_secs(34 * 60));
    let end = next(&mut s.rx).await.unwrap_err();
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert!(
        api.tokenreview_calls() > reviews_before,
        "re-checked with the API server"
    );
    assert_eq!(
        metric(&server, "meshid_certs_issued_total{api=\"sds\"}"),
        issued_before,
        "no certificate issued on a doubt"
    );
    server.running.shutdown().await;
}

// === item 3: renewal never spins ===

/// Near the end of the signing chain the leaf is capped to the chain's end; once the chain has
/// expired every issuance fails. The renewal used to be scheduled from the backdated notBefore
/// and retried at min(now + 30 s, notAfter), which is in the past: a tight loop of failures.
/// Now retries back off exponentially on the injected clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_near_and_past_the_end_of_the_chain_does_not_spin() {
    let clock = manual_clock();
    let server = TestServer::start_custom(Arc::new(clock.clone()), Duration::from_secs(600), |c| {
        c.limits.max_stream_age = Duration::from_secs(24 * 3600);
    })
    .await;
    let token = server.token_for("shop", "a", Duration::from_secs(6 * 3600));
    let (mut s, _) = Stream::open(&server, token).await;
    let issued = || metric(&server, "meshid_certs_issued_total{api=\"sds\"}");
    let errors = || metric(&server, "meshid_sign_errors_total");
    assert_eq!(issued(), 1.0);
    // The 10-minute chain caps the leaf: refreshed around 5 min, once.
    clock.advance(Duration::from_secs(6 * 60));
    let r = next(&mut s.rx).await.unwrap().unwrap();
    assert_eq!(secrets(&r).len(), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(issued(), 2.0, "one renewal, not a loop");
    // Past the end of the chain: issuance fails, and is retried with backoff, not in a loop.
    clock.advance(Duration::from_secs(5 * 60));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after_expiry = errors();
    assert!(
        (1.0..=2.0).contains(&after_expiry),
        "failed issuance retried {after_expiry} times while time stood still"
    );
    for _ in 0..5 {
        clock.advance(Duration::from_secs(61));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let later = errors();
    assert!(
        later - after_expiry <= 6.0,
        "{later} failures after 5 minutes of 60 s steps"
    );
    server.running.shutdown().await;
}

// === item 4: connection and request limits ===

/// At the connection cap the server stops accepting; a slot frees when a connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_further_clients_in_the_backlog() {
    let server = TestServer::start_with(Arc::new(meshid::clock::SystemClock), |c| {
        c.limits.max_connections = 2;
    })
    .await;
    let a = server.channel().await;
    let b = server.channel().await;
    let third = tokio::time::timeout(Duration::from_millis(700), server.channel()).await;
    assert!(
        third.is_err(),
        "a third connection is not served at the cap"
    );
    drop(a);
    let c = tokio::time::timeout(Duration::from_secs(10), server.channel())
        .await
        .expect("served once a slot frees");
    drop((b, c));
    server.running.shutdown().await;
}

/// The CSR API authenticates on headers before it decodes the body: a caller without a token
/// gets UNAUTHENTICATED even for a body above the decode limit (it used to be decoded first, up
/// to 4 MiB); an authenticated request above `csr_max_request_bytes` is refused by size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_csr_api_authenticates_before_decoding_and_limits_the_body() {
    let server = TestServer::start(Arc::new(meshid::clock::SystemClock)).await;
    let big = IstioCertificateRequest {
        csr: "A".repeat(5 * 1024 * 1024),
        ..Default::default()
    };
    let err = server
        .csr(None)
        .await
        .create_certificate(big)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let over = IstioCertificateRequest {
        csr: "A".repeat(100 * 1024),
        ..Default::default()
    };
    let err = server
        .csr(Some(server.token("shop", "a")))
        .await
        .create_certificate(over)
        .await
        .unwrap_err();
    // Issue 17 item 9: RESOURCE_EXHAUSTED, as grpc-go's server answers a message over its
    // limit (`recvAndDecompress`) and as meshid's xDS streams do; tonic alone said OUT_OF_RANGE.
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("limits.csr_max_request_bytes"),
        "{err:?}"
    );
    server.running.shutdown().await;
}

/// A unary call that is not answered within `limits.unary_timeout` fails instead of holding its
/// caller (here TokenReview answers after 3 s and the timeout is 500 ms), with DEADLINE_EXCEEDED
/// as grpc-go's server answers a passed deadline (`internal/transport/http2_server.go`
/// `operateHeaders` → `status.FromContextError`); tonic's `Server::timeout` answered CANCELLED
/// (issue 13 item 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_is_bounded_by_the_unary_timeout() {
    let api = crate::fake_apiserver::FakeApiServer::start().await;
    api.set_reviewer(crate::fake_apiserver::reviewer_from_claims);
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kubeconfig.path(), api.kubeconfig_yaml()).unwrap();
    let kc = kubeconfig.path().to_owned();
    let server = TestServer::start_with(Arc::new(meshid::clock::SystemClock), move |c| {
        c.limits.unary_timeout = Duration::from_millis(500);
        c.clusters[0].jwks = None;
        c.clusters[0].tokenreview = Some(meshid::config::TokenReview {
            kubeconfig: Some(kc),
            // The queue drains within the 500 ms timeout, as the config requires.
            rate: meshid::identity::RateLimit {
                max_queue: 10,
                ..Default::default()
            },
            timeout: Duration::from_secs(30),
            issuers: vec![],
            verify_signatures: true,
            mode: Default::default(),
        });
    })
    .await;
    api.set_jwks(&server.issuer.jwks());
    api.set_delay(Duration::from_secs(3));
    let started = std::time::Instant::now();
    let err = server
        .csr(Some(server.token("shop", "a")))
        .await
        .create_certificate(IstioCertificateRequest {
            csr: "irrelevant: the caller is never authenticated in time".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "answered after {:?}, before TokenReview did",
        started.elapsed()
    );
    server.running.shutdown().await;
}

/// An HTTP request whose headers never finish is dropped after `http_header_read_timeout`
/// (it used to be held open indefinitely); an idle keep-alive connection after
/// `http_idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_drops_unfinished_and_idle_connections() {
    let server = TestServer::start_with(Arc::new(meshid::clock::SystemClock), |c| {
        c.limits.http_header_read_timeout = Duration::from_millis(300);
        c.limits.http_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = server.running.http_addr;
    let closed_within = |mut tcp: std::net::TcpStream, limit: Duration| {
        tcp.set_read_timeout(Some(limit)).unwrap();
        let mut buf = Vec::new();
        match tcp.read_to_end(&mut buf) {
            Ok(_) => buf,
            Err(e) => panic!("connection still open after {limit:?}: {e}"),
        }
    };
    let slow = tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        closed_within(tcp, Duration::from_secs(5))
    });
    let idle = tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        closed_within(tcp, Duration::from_secs(6))
    });
    slow.await.unwrap();
    let answered = String::from_utf8(idle.await.unwrap()).unwrap();
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    server.running.shutdown().await;
}

// === items 11 and 12: SIGTERM drains; logs to a file carry no colour codes ===

#[test]
fn sigterm_drains_and_exits_zero_and_file_logs_are_plain() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let issuer = dir.path().join("issuer");
    let s = state.to_str().unwrap();
    assert!(meshid(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--state-dir",
        s
    ])
    .status
    .success());
    assert!(
        meshid(&["dev", "issuer", "init", "--dir", issuer.to_str().unwrap()])
            .status
            .success()
    );
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meshid"))
        .args([
            "server",
            "--state-dir",
            s,
            "--dev-issuer-dir",
            issuer.to_str().unwrap(),
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.contains("gRPC (TLS) on"), "{line}");
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("SIGTERM received"), "{rest}");
    let logs = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(logs.contains("meshid server started"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "ANSI escape codes in a log file: {logs:?}"
    );
}
