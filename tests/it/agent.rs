//! `meshid agent` in-process against an in-process server, with real gRPC clients on its Unix
//! sockets: the key made in the agent (the server signs a CSR and never sees a private key),
//! SDS and the SPIFFE Workload API, mTLS between two agent-fed workloads, a root rotation
//! reaching both local APIs, a server outage, a token rotated on disk.
//!
//! References: istio-agent (`security/pkg/nodeagent/sds` serves `default`/`ROOTCA` on
//! `/var/run/secrets/workload-spiffe-uds/socket`; `security/pkg/nodeagent/cache`
//! `SecretManagerClient.generateNewSecret` makes the key and sends a CSR), SPIRE's agent
//! (`pkg/agent/endpoints/workload/handler.go` `FetchX509SVID`, the `workload.spiffe.io`
//! header check in `pkg/agent/endpoints/middleware.go`, "no identity issued").

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::service::{
    discovery::v3::DiscoveryRequest,
    secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
};
use meshid::{
    agent::{AgentConfig, CallerPolicy, RunningAgent},
    api::workload::{
        spiffe_workload_api_client::SpiffeWorkloadApiClient, X509BundlesRequest, X509svidRequest,
        X509svidResponse,
    },
    clock::{Clock, ManualClock, SystemClock},
    rotation::RenewPolicy,
    spiffe::SpiffeId,
    state::DirStore,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{
    rotation_server::{eventually, handshake, pem_certs, prepare_generated, Creds},
    server_support::{sds_req, secrets, tls_cert, trusted_ca, TestServer},
};

/// An agent for `shop/<sa>` with its sockets, token and root files in `dir`.
struct TestAgent {
    running: RunningAgent,
    stop: watch::Sender<bool>,
    sds: PathBuf,
    workload_api: PathBuf,
    token_file: PathBuf,
    id: SpiffeId,
}

pub(crate) fn agent_config(
    server: &TestServer,
    dir: &Path,
    sa: &str,
    via_unix: bool,
) -> AgentConfig {
    std::fs::create_dir_all(dir).unwrap();
    let token_file = dir.join("istio-token");
    std::fs::write(
        &token_file,
        server.token_for("shop", sa, Duration::from_secs(4 * 3600)),
    )
    .unwrap();
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, &server.root_pem).unwrap();
    let addr = if via_unix {
        format!(
            "unix:{}",
            server.running.unix_path.as_ref().unwrap().display()
        )
    } else {
        format!("https://{}", server.running.grpc_addr)
    };
    AgentConfig {
        server: addr,
        server_name: "localhost".into(),
        root_cert: Some(root),
        token_file,
        cluster_id: None,
        sds_socket: dir.join("sds.sock"),
        workload_api_socket: Some(dir.join("workload.sock")),
        socket_group: None,
        callers: CallerPolicy::default(),
        ttl: None,
        out_dir: None,
        http: Some("127.0.0.1:0".parse().unwrap()),
        renew: RenewPolicy::default(),
        max_connections: 64,
    }
}

impl TestAgent {
    async fn start(cfg: AgentConfig, clock: Arc<dyn Clock>, sa: &str) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let (sds, workload_api, token_file) = (
            cfg.sds_socket.clone(),
            cfg.workload_api_socket.clone().unwrap(),
            cfg.token_file.clone(),
        );
        let running = meshid::agent::start(cfg, clock, stop_rx).await.unwrap();
        Self {
            running,
            stop,
            sds,
            workload_api,
            token_file,
            id: SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap(),
        }
    }

    async fn channel(path: &Path) -> Channel {
        meshid::api::client::connect(&format!("unix:{}", path.display()), None, "")
            .await
            .unwrap()
    }

    /// The serial of the certificate the agent holds (empty: none).
    fn serial(&self) -> String {
        let v = self.running.view();
        let v = v.borrow();
        v.svid
            .as_ref()
            .map(|s| s.serial.clone())
            .unwrap_or_default()
    }

    async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.running.join().await;
    }
}

/// An Envoy-like client of the agent's SDS socket: subscribes to `default` and `ROOTCA`, ACKs
/// every response and keeps what it was sent.
struct LocalProxy {
    creds: Arc<Mutex<Creds>>,
    task: tokio::task::JoinHandle<()>,
}

impl LocalProxy {
    async fn start(agent: &TestAgent) -> Self {
        let mut client = SecretDiscoveryServiceClient::new(TestAgent::channel(&agent.sds).await);
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(4);
        let names = ["default", "ROOTCA"];
        tx.send(sds_req(&names, "", "")).await.unwrap();
        let mut inbound = client
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let creds = Arc::new(Mutex::new(Creds::default()));
        let c = creds.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                {
                    let mut c = c.lock().unwrap();
                    for s in secrets(&r) {
                        match s.name.as_str() {
                            "default" => (c.chain, c.key) = tls_cert(&s),
                            "ROOTCA" => c.roots = trusted_ca(&s),
                            _ => {}
                        }
                    }
                }
                if tx
                    .send(sds_req(&names, &r.nonce, &r.version_info))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Self { creds, task }
    }

    fn now(&self) -> Creds {
        self.creds.lock().unwrap().clone()
    }

    async fn ready(&self) -> Creds {
        eventually("the local proxy holds default and ROOTCA", || {
            let c = self.now();
            !c.chain.is_empty() && !c.roots.is_empty()
        })
        .await;
        self.now()
    }
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(meshid::agent::SECURITY_HEADER, "true".parse().unwrap());
    r
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The private key the agent serves is the one its certificate certifies, and the server only
/// ever signed a CSR for it: its issuance counters show the CSR API and no SDS `default` (the
/// path where the server makes keys); the Workload API serves the same SVID and refuses a call
/// without the security header. istio-agent: `cache.SecretManagerClient.generateNewSecret`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_makes_the_key_and_serves_it_over_sds_and_the_workload_api() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = agent_config(&server, dir.path(), "product-service", false);
    let agent = TestAgent::start(cfg, Arc::new(SystemClock), "product-service").await;
    for sock in [&agent.sds, &agent.workload_api] {
        let mode = std::fs::metadata(sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode,
            0o600,
            "{} is for the agent's user only",
            sock.display()
        );
    }
    let proxy = LocalProxy::start(&agent).await;
    let creds = proxy.ready().await;
    let chain = pem_certs(&creds.chain);
    assert_eq!(meshid::tls::peer_spiffe_id(&chain[0]).unwrap(), agent.id);
    let key = meshid::ca::PrivateKey::from_pem(creds.key.as_bytes(), "default").unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref()).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the served key is the certified one"
    );
    assert_eq!(pem_certs(&creds.roots), pem_certs(&server.root_pem));

    let text = server.running.metrics.render();
    assert_eq!(
        metric(&text, "meshid_certs_issued_total{api=\"csr\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "meshid_certs_issued_total{api=\"sds\"}"),
        Some(0.0),
        "the server made no key for the agent: {text}"
    );

    // The Workload API: the header is required; then the same SVID, key and bundle.
    let mut wl = SpiffeWorkloadApiClient::new(TestAgent::channel(&agent.workload_api).await);
    let refused = wl.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("security header"), "{refused:?}");
    let mut stream = wl
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first: X509svidResponse = stream.message().await.unwrap().unwrap();
    let svid = &first.svids[0];
    assert_eq!(svid.spiffe_id, agent.id.to_string());
    assert_eq!(
        svid.x509_svid,
        chain.iter().flat_map(|c| c.to_vec()).collect::<Vec<_>>()
    );
    assert_eq!(svid.x509_svid_key, key.secret_pkcs8_der().to_vec());
    assert_eq!(svid.bundle, pem_certs(&server.root_pem)[0].to_vec());
    assert!(first.federated_bundles.is_empty());

    // Readiness and the expiry metric.
    let http = agent.running.http.unwrap();
    let ready = readyz(http).await;
    assert!(ready.contains("ready"), "{ready}");
    let m = agent.running.metrics.render();
    assert_eq!(
        metric(&m, "meshid_agent_certificate_expiry_timestamp_seconds"),
        Some(leaf.validity().not_after.timestamp() as f64),
        "{m}"
    );
    proxy.task.abort();
    agent.shutdown().await;
    server.running.shutdown().await;
}

/// Two workloads fed by two agents handshake (rustls mTLS, SPIFFE IDs checked both ways); a root
/// prepared on the server reaches each agent's SDS client and Workload API stream within 2 s
/// (pushed over the server's SDS, not at the next renewal as istio-agent's
/// `cache.SecretManagerClient` learns roots), and the handshakes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_prepared_on_the_server_reaches_the_agents_local_clients_within_two_seconds() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let dir = tempfile::tempdir().unwrap();
    let a = TestAgent::start(
        agent_config(&server, &dir.path().join("a"), "product-service", false),
        Arc::new(SystemClock),
        "product-service",
    )
    .await;
    let b = TestAgent::start(
        agent_config(&server, &dir.path().join("b"), "inventory-service", false),
        Arc::new(SystemClock),
        "inventory-service",
    )
    .await;
    let (pa, pb) = (LocalProxy::start(&a).await, LocalProxy::start(&b).await);
    let (ca, cb) = (pa.ready().await, pb.ready().await);
    handshake((&cb, &b.id), (&ca, &a.id)).await.unwrap();
    handshake((&ca, &a.id), (&cb, &b.id)).await.unwrap();

    let mut wl = SpiffeWorkloadApiClient::new(TestAgent::channel(&a.workload_api).await);
    let mut bundles = wl
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    // The first answer may still be the CSR response's roots; wait for the server's.
    let first = bundles.message().await.unwrap().unwrap();
    assert_eq!(first.bundles.len(), 1, "{:?}", first.bundles.keys());

    let started = Instant::now();
    let new_root = prepare_generated(&DirStore::new(server.state_dir()));
    let wl_took = loop {
        let next = tokio::time::timeout(Duration::from_secs(5), bundles.message())
            .await
            .expect("a bundle update on the Workload API")
            .unwrap()
            .unwrap();
        let der = &next.bundles["spiffe://cluster.local"];
        if der_count(der) == 2 {
            break started.elapsed();
        }
    };
    eventually("both local proxies trust both roots", || {
        pem_certs(&pa.now().roots).len() == 2 && pem_certs(&pb.now().roots).len() == 2
    })
    .await;
    let sds_took = started.elapsed();
    assert!(
        wl_took < Duration::from_secs(2),
        "Workload API: {wl_took:?}"
    );
    assert!(
        sds_took < Duration::from_secs(2),
        "SDS: {sds_took:?} (root {new_root})"
    );
    handshake((&pb.now(), &b.id), (&pa.now(), &a.id))
        .await
        .unwrap();
    pa.task.abort();
    pb.task.abort();
    a.shutdown().await;
    b.shutdown().await;
    server.running.shutdown().await;
}

/// The agent's `/readyz` body (its status code is in the first word: "ready" or "not ready").
async fn readyz(http: std::net::SocketAddr) -> String {
    let url = format!("http://{http}/readyz");
    match meshid::http_client::Get::new(&url).send().await {
        Ok(body) => String::from_utf8_lossy(&body).into_owned(),
        Err(e) => format!("not ready: {e}"),
    }
}

/// How many DER certificates are concatenated in `der`.
fn der_count(mut der: &[u8]) -> usize {
    let mut n = 0;
    while let Ok((rest, _)) = x509_parser::parse_x509_certificate(der) {
        n += 1;
        der = rest;
    }
    n
}

/// The server stops for longer than a renewal: the agent keeps serving its certificate (ready,
/// the failures counted), then renews once the server is back; the Workload API stream gets the
/// renewed SVID. On a manual clock shared by server and agent, over the server's Unix socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_keeps_serving_through_a_server_outage_then_renews() {
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));
    let server = TestServer::start(clock.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(&server, dir.path(), "product-service", true);
    cfg.renew.retry_max = Duration::from_secs(30);
    let agent = TestAgent::start(cfg, clock.clone(), "product-service").await;
    eventually("a first certificate", || !agent.serial().is_empty()).await;
    let first = agent.serial();
    let mut wl = SpiffeWorkloadApiClient::new(TestAgent::channel(&agent.workload_api).await);
    let mut svids = wl
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let m = svids.message().await.unwrap().unwrap();
    assert_eq!(serial_of(&m), first);

    let TestServer {
        running,
        cfg,
        dir: server_dir,
        issuer,
        ..
    } = server;
    running.shutdown().await;
    // 50 minutes of a 1 h certificate: past its refresh (about 30 min), not past its expiry.
    for _ in 0..50 {
        clock.advance(Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failures = || {
        metric(
            &agent.running.metrics.render(),
            "meshid_agent_renewals_total{result=\"error\"}",
        )
        .unwrap_or(0.0)
    };
    eventually("renewals fail while the server is down", || {
        failures() >= 1.0
    })
    .await;
    assert_eq!(
        agent.serial(),
        first,
        "the held certificate stays in service"
    );
    let http = agent.running.http.unwrap();
    let ready = readyz(http).await;
    assert!(ready.starts_with("ready"), "{ready}");

    let running = meshid::server::start(cfg.clone(), clock.clone())
        .await
        .unwrap();
    // The token file still holds a valid token (4 h); the agent retries with backoff.
    for _ in 0..40 {
        if agent.serial() != first {
            break;
        }
        clock.advance(Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("a renewed certificate after the server is back", || {
        agent.serial() != first
    })
    .await;
    let renewed = agent.serial();
    let update = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let m = svids.message().await.unwrap().unwrap();
            if serial_of(&m) == renewed {
                return m;
            }
        }
    })
    .await
    .expect("the Workload API stream sends the renewed SVID");
    assert_eq!(update.svids[0].spiffe_id, agent.id.to_string());
    drop((server_dir, issuer));
    agent.shutdown().await;
    running.shutdown().await;
}

fn serial_of(m: &X509svidResponse) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(&m.svids[0].x509_svid).unwrap();
    c.raw_serial_as_string().replace(':', "")
}

/// The token is read from its file on every call (the kubelet rotates projected tokens): an
/// agent whose file holds no valid token gets nothing, and the token written later is used by
/// the next retry. istio-agent: `security/pkg/credentialfetcher/plugin/token.go` re-reads the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotated_on_disk_is_used_by_the_next_call() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(&server, dir.path(), "product-service", false);
    cfg.renew.retry_min = Duration::from_millis(100);
    cfg.renew.retry_max = Duration::from_millis(400);
    std::fs::write(&cfg.token_file, "not-a-token").unwrap();
    let agent = TestAgent::start(cfg, Arc::new(SystemClock), "product-service").await;
    eventually("the refused token is counted", || {
        metric(
            &agent.running.metrics.render(),
            "meshid_agent_renewals_total{result=\"error\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    assert!(agent.serial().is_empty());
    let tmp = agent.token_file.with_extension("new");
    std::fs::write(&tmp, server.token("shop", "product-service")).unwrap();
    std::fs::rename(&tmp, &agent.token_file).unwrap();
    eventually("a certificate with the rotated token", || {
        !agent.serial().is_empty()
    })
    .await;
    agent.shutdown().await;
    server.running.shutdown().await;
}

/// Callers are attested from the socket's peer credentials: with `allow_uids` naming another
/// uid, this process gets `PermissionDenied` "no identity issued" (SPIRE's agent answer for a
/// caller no registration entry selects); naming its own uid, it gets the SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_callers_are_selected_by_their_peer_credentials() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let dir = tempfile::tempdir().unwrap();
    let me = std::fs::metadata(dir.path()).unwrap().uid();
    for (allow, admitted) in [(me.wrapping_add(1), false), (me, true)] {
        let mut cfg = agent_config(
            &server,
            &dir.path().join(allow.to_string()),
            "product-service",
            false,
        );
        cfg.callers.allow_uids = vec![allow];
        let agent = TestAgent::start(cfg, Arc::new(SystemClock), "product-service").await;
        eventually("a certificate", || !agent.serial().is_empty()).await;
        let mut wl = SpiffeWorkloadApiClient::new(TestAgent::channel(&agent.workload_api).await);
        let r = wl.fetch_x509svid(with_header(X509svidRequest {})).await;
        match (r, admitted) {
            (Ok(mut s), true) => {
                let m = s.get_mut().message().await.unwrap().unwrap();
                assert_eq!(m.svids[0].spiffe_id, agent.id.to_string());
            }
            (Err(e), false) => {
                assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
                assert_eq!(e.message(), "no identity issued");
            }
            (r, _) => panic!(
                "allow uid {allow} (this process: {me}): {:?}",
                r.map(|_| ())
            ),
        }
        agent.shutdown().await;
    }
    server.running.shutdown().await;
}

/// istio-agent's file-mounted names are served by the agent from local files, re-sent when a
/// file changes (`security/pkg/nodeagent/cache` `generateFileSecret` and its file watch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mounted_names_are_read_locally_and_follow_their_files() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(
        agent_config(&server, dir.path(), "product-service", false),
        Arc::new(SystemClock),
        "product-service",
    )
    .await;
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let ca_file = files.join("ca.pem");
    std::fs::write(&ca_file, &server.root_pem).unwrap();
    let name = format!("file-root:{}", ca_file.display());
    let mut client = SecretDiscoveryServiceClient::new(TestAgent::channel(&agent.sds).await);
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(4);
    tx.send(sds_req(&[&name, "file-root:relative.pem"], "", ""))
        .await
        .unwrap();
    let mut inbound = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = inbound.message().await.unwrap().unwrap();
    let got = secrets(&first);
    assert_eq!(got.len(), 1, "the relative path is left out");
    assert_eq!(trusted_ca(&got[0]), server.root_pem);
    tx.send(sds_req(
        &[&name, "file-root:relative.pem"],
        &first.nonce,
        &first.version_info,
    ))
    .await
    .unwrap();
    // A new CA file (written as an operator or the kubelet would: a rename over the old one).
    let other = meshid::ca::root::generate_root(
        &meshid::spiffe::TrustDomain::new("example.org").unwrap(),
        meshid::ca::KeyType::EcdsaP256,
        Duration::from_secs(86_400),
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    let other_pem = meshid::ca::cert::to_pem(&other.cert);
    let tmp = files.join("ca.pem.tmp");
    std::fs::write(&tmp, &other_pem).unwrap();
    std::fs::rename(&tmp, &ca_file).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("the changed file is pushed")
        .unwrap()
        .unwrap();
    assert_eq!(trusted_ca(&secrets(&next)[0]), other_pem);
    agent.shutdown().await;
    server.running.shutdown().await;
}
