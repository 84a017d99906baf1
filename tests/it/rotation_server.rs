//! Root rotation against a running server (issue 9): propagation tracking on ACKs, the status
//! endpoint, the guided `root rotate` (waits, laggards, timeouts, crash points) and the headline
//! test: two SDS-fed workloads handshake continuously through prepare → activate → taint →
//! revoke with zero failures.
//!
//! References: SPIRE `localauthority x509` and `pkg/server/ca/manager` (prepare, activate once
//! the new authority has propagated, taint, revoke); Envoy `xds_protocol.rst` "ACK/NACK and
//! resource type instance version" (a request with the latest nonce and no error_detail ACKs it);
//! istiod `pilot/pkg/xds` `shouldRespond` (the same ACK rule on the server).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use meshid::{
    clock::SystemClock,
    rotation::{self, Ctx, Finished, GuidedError, GuidedOptions, HttpStatus, RotationStatus},
    spiffe::SpiffeId,
    state::{Actor, DirStore, JournalAction, RootState, StateStore},
    tls::{PeerPolicy, SpiffeVerifier},
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use time::OffsetDateTime;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;

use crate::server_support::{sds_req as req, *};

const TYPE: &str = meshid::api::SECRET_TYPE_URL;

/// A raw SotW stream.
struct Raw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl Raw {
    async fn open(server: &TestServer, sa: &str) -> Self {
        let (tx, out) = mpsc::channel(8);
        let mut client = server.sds(Some(server.token("shop", sa))).await;
        let rx = client
            .stream_secrets(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    /// A client that subscribes to `names`, ACKs the first response and never another: a
    /// stream that was live and fell behind (one that never ACKed holds no rotation).
    /// Every other stream of `server` must have ACKed already: this waits until the server
    /// counts this one's ACK (so a push that follows cannot overtake it).
    async fn acked_once(server: &TestServer, sa: &str, names: &[&str]) -> Self {
        let mut s = Self::open(server, sa).await;
        s.tx.send(req(names, "", "")).await.unwrap();
        let first = s.recv().await;
        eventually("only this stream is silent", || {
            status(server).counts.silent == 1
        })
        .await;
        s.tx.send(req(names, &first.nonce, &first.version_info))
            .await
            .unwrap();
        eventually("its ACK is counted", || status(server).counts.silent == 0).await;
        s
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(20), self.rx.message())
            .await
            .expect("a response within 20 s")
            .unwrap()
            .unwrap()
    }
}

/// What a workload holds now: chain, key and trusted roots (PEM).
#[derive(Clone, Default)]
pub(crate) struct Creds {
    pub(crate) chain: String,
    pub(crate) key: String,
    pub(crate) roots: String,
}

/// An Envoy-like SDS client: subscribes to `default` and `ROOTCA`, takes every response and
/// ACKs it.
struct Workload {
    id: SpiffeId,
    creds: Arc<Mutex<Creds>>,
    task: tokio::task::JoinHandle<()>,
}

impl Workload {
    async fn start(server: &TestServer, sa: &str) -> Self {
        let mut s = Raw::open(server, sa).await;
        let creds = Arc::new(Mutex::new(Creds::default()));
        s.tx.send(req(&["default", "ROOTCA"], "", ""))
            .await
            .unwrap();
        let first = s.recv().await;
        Self::take(&creds, &first);
        s.tx.send(req(
            &["default", "ROOTCA"],
            &first.nonce,
            &first.version_info,
        ))
        .await
        .unwrap();
        let c = creds.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(r)) = s.rx.message().await {
                Self::take(&c, &r);
                let ack = req(&["default", "ROOTCA"], &r.nonce, &r.version_info);
                if s.tx.send(ack).await.is_err() {
                    return;
                }
            }
        });
        Self {
            id: SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap(),
            creds,
            task,
        }
    }

    fn take(creds: &Mutex<Creds>, r: &DiscoveryResponse) {
        let mut c = creds.lock().unwrap();
        for s in secrets(r) {
            match s.name.as_str() {
                "default" => (c.chain, c.key) = tls_cert(&s),
                "ROOTCA" => c.roots = trusted_ca(&s),
                _ => {}
            }
        }
    }

    fn now(&self) -> Creds {
        self.creds.lock().unwrap().clone()
    }
}

pub(crate) fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// One real mTLS handshake (rustls, SPIFFE ID checked both ways) and a ping; `Err` says why it
/// failed instead of panicking, so failures can be counted.
pub(crate) async fn handshake(
    server: (&Creds, &SpiffeId),
    client: (&Creds, &SpiffeId),
) -> Result<(), String> {
    let key = |pem: &str| PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string());
    let (s, s_id) = server;
    let (c, c_id) = client;
    let scfg = rustls::ServerConfig::builder_with_provider(meshid::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(SpiffeVerifier::new(
            pem_certs(&s.roots),
            PeerPolicy::Exact(c_id.clone()),
        ))
        .with_single_cert(pem_certs(&s.chain), key(&s.key)?)
        .map_err(|e| e.to_string())?;
    let ccfg = rustls::ClientConfig::builder_with_provider(meshid::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeVerifier::new(
            pem_certs(&c.roots),
            PeerPolicy::Exact(s_id.clone()),
        ))
        .with_client_auth_cert(pem_certs(&c.chain), key(&c.key)?)
        .map_err(|e| e.to_string())?;
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(scfg));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ccfg));
    let srv = tokio::spawn(async move {
        let mut s = acceptor
            .accept(a)
            .await
            .map_err(|e| format!("server: {e}"))?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        s.write_all(b"pong").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())
    });
    let name = ServerName::try_from("workload.invalid").unwrap();
    let mut conn = connector
        .connect(name, b)
        .await
        .map_err(|e| format!("client: {e}"))?;
    conn.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    srv.await.map_err(|e| e.to_string())??;
    Ok(())
}

fn store(server: &TestServer) -> DirStore {
    DirStore::new(server.state_dir())
}

fn status(server: &TestServer) -> RotationStatus {
    HttpStatus::new(&format!("http://{}", server.running.http_addr))
        .unwrap()
        .status()
        .unwrap()
}

fn opts(timeout: Duration) -> GuidedOptions {
    GuidedOptions {
        timeout,
        poll: Duration::from_millis(100),
        max_ttl: Duration::from_secs(86_400),
        key_type: None,
        root_ttl: Duration::from_secs(10 * 365 * 86_400),
        publication_hint: None,
    }
}

/// Prepares a generated root in `store`, as `meshid root prepare` does; its id.
pub(crate) fn prepare_generated(store: &DirStore) -> String {
    let ctx = Ctx::new(Actor::user("op", "test"), OffsetDateTime::now_utc(), None).unwrap();
    let ca = meshid::ca::root::generate_root(
        &meshid::spiffe::TrustDomain::new("cluster.local").unwrap(),
        meshid::ca::KeyType::EcdsaP256,
        meshid::ca::root::DEFAULT_ROOT_TTL,
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    rotation::apply(store, &ctx, |s, c| {
        rotation::prepare(s, rotation::Candidate::Generated(ca), c)
    })
    .unwrap()
    .outcome
    .root
}

fn root_id_in(store: &DirStore, state: RootState) -> String {
    let s = store.load_existing().unwrap().state;
    s.roots
        .iter()
        .find(|r| r.state == state)
        .unwrap()
        .id
        .clone()
}

pub(crate) async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within 20 s");
}

/// The status endpoint counts what streams ACKed. Issue 17 item 2: a stream that took the
/// bundle but never ACKed anything is `silent` and holds no rotation (SPIRE `manager.go`
/// `rotateX509CA` activates on schedule); one that ACKed and then fell behind a new root lags
/// and is named; each leaves the counts when its stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_endpoint_counts_acked_bundles_and_signers() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let good = Workload::start(&server, "good").await;
    let behind = Raw::acked_once(&server, "behind", &["ROOTCA"]).await;
    let mut silent = Raw::open(&server, "silent").await;
    silent.tx.send(req(&["ROOTCA"], "", "")).await.unwrap();
    let _ = silent.recv().await; // never ACKed
    let root = root_id_in(&store(&server), RootState::Active);
    eventually("the ACKs are counted", || {
        let c = status(&server).counts;
        c.signers.get(&root) == Some(&1) && c.roots.get(&root) == Some(&2)
    })
    .await;
    let st = status(&server);
    assert_eq!(st.trusted_roots, std::slice::from_ref(&root));
    assert_eq!(st.signer, root);
    assert_eq!(
        (
            st.counts.streams,
            st.counts.silent,
            st.counts.bundle_streams,
            st.counts.leaf_streams
        ),
        (3, 1, 2, 1)
    );
    assert_eq!(st.counts.laggard_count, 0, "the silent stream does not lag");
    assert!(!st.replica.is_empty());
    assert_eq!(st.root_propagated(&root), Ok(()));

    // A new root: the good workload ACKs it, the one that fell behind does not.
    let new = prepare_generated(&store(&server));
    eventually("the good stream ACKs the new root", || {
        status(&server).counts.roots.get(&new) == Some(&1)
    })
    .await;
    let st = status(&server);
    assert_eq!(st.counts.laggard_count, 1);
    assert_eq!(
        st.counts.laggards[0].peer,
        "spiffe://cluster.local/ns/shop/sa/behind"
    );
    let why = st.root_propagated(&new).unwrap_err().to_string();
    assert!(
        why.contains("1 of 2")
            && why.contains("sa/behind")
            && why.contains("1 more stream(s) never acknowledged"),
        "{why}"
    );

    drop(behind);
    eventually("the ended stream leaves the registry", || {
        status(&server).counts.streams == 2
    })
    .await;
    assert_eq!(status(&server).root_propagated(&new), Ok(()));
    drop(silent);
    good.task.abort();
    server.running.shutdown().await;
}

/// `meshid root rotate --server` with a client that ACKed once and then stopped: it prepares,
/// waits, names the client and times out with the rotation left prepared; `root activate
/// --server` refuses for the same reason (the operator's gate stays strict: issue 17 item 2);
/// once the client is gone, `root rotate` continues from the state to the taint and prints the
/// revoke command with the time it becomes safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotate_waits_for_a_client_that_stops_acking_names_it_and_times_out() {
    let server = TestServer::start_with(Arc::new(SystemClock), |c| {
        c.rotation.signer_change_spread = Duration::from_millis(500);
    })
    .await;
    let good = Workload::start(&server, "good").await;
    let stuck = Raw::acked_once(&server, "stuck", &["default", "ROOTCA"]).await;
    let url = format!("http://{}", server.running.http_addr);
    let dir = server.state_dir();
    let dir = dir.to_str().unwrap().to_owned();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::support::meshid(&args)
        })
    };
    let argv = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["root", "rotate", "--server", &url, "--state-dir", &dir]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    let out = run(argv(&["--timeout", "2s"])).await.unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("prepare: root"), "{stdout}");
    assert!(stderr.contains("timed out after 2s"), "{stderr}");
    assert!(
        stderr.contains("spiffe://cluster.local/ns/shop/sa/stuck"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("sa/good"),
        "the good client is not a laggard: {stderr}"
    );
    let prepared = root_id_in(&store(&server), RootState::Prepared);

    let activate = tokio::task::block_in_place(|| {
        crate::support::meshid(&[
            "root",
            "activate",
            &prepared,
            "--server",
            &url,
            "--state-dir",
            &dir,
        ])
    });
    let err = String::from_utf8_lossy(&activate.stderr);
    assert!(!activate.status.success());
    assert!(
        err.contains("has not reached every peer") && err.contains("sa/stuck"),
        "{err}"
    );
    let status_out = tokio::task::block_in_place(|| {
        crate::support::meshid(&["root", "status", "--server", &url, "--state-dir", &dir])
    });
    let text = String::from_utf8_lossy(&status_out.stdout);
    assert!(
        text.contains(&format!(
            "root {prepared}: in the acknowledged bundle of 1 of 2 streams"
        )),
        "{text}"
    );

    drop(stuck);
    let out = run(argv(&["--timeout", "30s"])).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("activate: root {prepared} is now active")),
        "{stdout}"
    );
    assert!(stdout.contains("taint: root"), "{stdout}");
    let old = root_id_in(&store(&server), RootState::Tainted);
    assert!(
        stdout.contains(&format!("meshid root revoke {old}")),
        "{stdout}"
    );
    assert!(stdout.contains("stopped: root"), "{stdout}");
    let journal: Vec<JournalAction> = store(&server)
        .load_existing()
        .unwrap()
        .state
        .journal
        .iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        journal,
        [
            JournalAction::Prepare,
            JournalAction::Activate,
            JournalAction::Activate,
            JournalAction::Taint
        ],
        "one prepare: the second run continued the first"
    );
    good.task.abort();
    server.running.shutdown().await;
}

/// Writes happen at `t0 + 2 days × n` so that the old root is safe to revoke by the last step
/// (its last issuance + 24 h max TTL + margin has passed) without waiting.
fn stepping_ctx(t0: OffsetDateTime) -> impl Fn() -> Result<Ctx, rotation::RootError> {
    let n = AtomicUsize::new(0);
    move || {
        let k = n.fetch_add(1, Ordering::SeqCst) as i64;
        Ctx::new(
            Actor::user("op", "test"),
            t0 + time::Duration::days(2 * k),
            None,
        )
    }
}

/// Crash points: the guided rotation fails right after each of its journal writes (prepare,
/// activate, taint, revoke); run again, it continues from the state and finishes, with each
/// step journaled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotate_resumes_after_a_failure_after_each_journal_write() {
    for fail_at in [
        JournalAction::Prepare,
        JournalAction::Activate,
        JournalAction::Taint,
        JournalAction::Revoke,
    ] {
        let server = TestServer::start_with(Arc::new(SystemClock), |c| {
            c.rotation.signer_change_spread = Duration::from_millis(200);
        })
        .await;
        let w = Workload::start(&server, "w").await;
        let status = HttpStatus::new(&format!("http://{}", server.running.http_addr)).unwrap();
        let st = store(&server);
        let first_root = root_id_in(&st, RootState::Active);
        let result = tokio::task::block_in_place(|| {
            let ctx = stepping_ctx(OffsetDateTime::now_utc());
            rotation::rotate(
                &st,
                &status,
                &opts(Duration::from_secs(30)),
                &ctx,
                &mut |_| {},
                &mut |a| {
                    if a == fail_at {
                        Err(GuidedError::Stopped(a))
                    } else {
                        Ok(())
                    }
                },
            )
        });
        assert!(
            matches!(result, Err(GuidedError::Stopped(a)) if a == fail_at),
            "{fail_at}: {result:?}"
        );
        let again = tokio::task::block_in_place(|| {
            let ctx = stepping_ctx(OffsetDateTime::now_utc() + time::Duration::days(20));
            rotation::rotate(
                &st,
                &status,
                &opts(Duration::from_secs(30)),
                &ctx,
                &mut |_| {},
                &mut |_| Ok(()),
            )
        });
        let state = st.load_existing().unwrap().state;
        let actions: Vec<JournalAction> = state.journal.iter().map(|e| e.action).collect();
        if fail_at == JournalAction::Revoke {
            // The revoke was written before the failure: the rotation is over, so a second run
            // starts a new one; the first rotation's entries are each there once.
            assert!(again.is_ok() || matches!(again, Err(GuidedError::TimedOut { .. })));
        } else {
            assert_eq!(
                again.unwrap(),
                Finished::Revoked {
                    root: first_root.clone()
                },
                "{fail_at}"
            );
        }
        assert_eq!(
            actions[..5],
            [
                JournalAction::Prepare,
                JournalAction::Activate,
                JournalAction::Activate,
                JournalAction::Taint,
                JournalAction::Revoke
            ],
            "{fail_at}"
        );
        let first = state.roots.iter().find(|r| r.id == first_root).unwrap();
        assert_eq!(first.state, RootState::Revoked, "{fail_at}");
        w.task.abort();
        server.running.shutdown().await;
    }
}

/// The headline test (issue 9): two workloads fed by SDS handshake continuously (real rustls
/// mTLS, SPIFFE IDs checked both ways) while the root goes prepare → activate → taint → revoke
/// through the guided rotation: zero failed handshakes, and at the end both present leaves that
/// chain only to the new root. Without propagation tracking the guided rotation cannot wait (no
/// status endpoint), and activating before the bundle reached a peer fails its handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workloads_handshake_without_failure_through_a_whole_rotation() {
    let server = TestServer::start_with(Arc::new(SystemClock), |c| {
        c.rotation.signer_change_spread = Duration::from_secs(1);
    })
    .await;
    let a = Arc::new(Workload::start(&server, "frontend").await);
    let b = Arc::new(Workload::start(&server, "backend").await);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let looping = {
        let (a, b, stop, ok, failed) = (
            a.clone(),
            b.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let (ca, cb) = (a.now(), b.now());
                match handshake((&cb, &b.id), (&ca, &a.id)).await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failed.lock().unwrap().push(e),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let st = store(&server);
    let old = root_id_in(&st, RootState::Active);
    let http = HttpStatus::new(&format!("http://{}", server.running.http_addr)).unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let finished = tokio::task::block_in_place(|| {
        let ctx = || Ctx::new(Actor::user("op", "test"), OffsetDateTime::now_utc(), None);
        rotation::rotate(
            &st,
            &http,
            &opts(Duration::from_secs(30)),
            &ctx,
            &mut |l| lines.lock().unwrap().push(l.to_owned()),
            &mut |_| Ok(()),
        )
    })
    .unwrap();
    let Finished::RevokeLater { root, .. } = finished else {
        panic!("leaves from the old root are still valid for 24 h: {finished:?}")
    };
    assert_eq!(root, old);
    // Every leaf was re-issued by the taint, so revoking now breaks nothing: force it.
    let ctx = Ctx::new(Actor::user("op", "test"), OffsetDateTime::now_utc(), None).unwrap();
    rotation::apply(&st, &ctx, |s, c| {
        rotation::revoke(s, &old, true, Duration::from_secs(86_400), c)
    })
    .unwrap();
    let new = root_id_in(&st, RootState::Active);
    let new_cert = st
        .load_existing()
        .unwrap()
        .state
        .signing_root()
        .unwrap()
        .cert_der()
        .unwrap();
    eventually("both workloads trust only the new root", || {
        [&a, &b].iter().all(|w| {
            let roots = pem_certs(&w.now().roots);
            roots.len() == 1 && roots[0].as_ref() == new_cert.as_ref()
        })
    })
    .await;
    let before = ok.load(Ordering::SeqCst);
    eventually("handshakes go on after the revoke", || {
        ok.load(Ordering::SeqCst) > before + 5
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    looping.await.unwrap();

    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} failed handshakes: {failed:?}\n{:?}",
        failed.len(),
        lines.lock().unwrap()
    );
    assert!(ok.load(Ordering::SeqCst) > 20, "handshakes ran throughout");
    let (_, new_parsed) = x509_parser::parse_x509_certificate(new_cert.as_ref()).unwrap();
    for w in [&a, &b] {
        let chain = pem_certs(&w.now().chain);
        let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref()).unwrap();
        assert!(
            leaf.verify_signature(Some(new_parsed.public_key())).is_ok(),
            "{}'s leaf is signed by the new root {new}",
            w.id
        );
    }
    let st_now = status(&server);
    assert_eq!(st_now.trusted_roots, std::slice::from_ref(&new));
    assert_eq!(st_now.counts.signers.get(&new), Some(&2));
    a.task.abort();
    b.task.abort();
    server.running.shutdown().await;
}

/// `[auto_rotation]` on a generated root: the server prepares a successor once half the root's
/// life (at most 30 d) remains, and activates it once a sixth (at most 7 d) remains, journaled
/// with actor `auto` (SPIRE `pkg/server/ca/manager` `preparationThreshold`,
/// `keyActivationThreshold`). The expiry warning metric is set while no successor exists. Old
/// code had no schedule: nothing was ever prepared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_rotation_prepares_then_activates_a_generated_root() {
    let clock = Arc::new(meshid::clock::ManualClock::new(OffsetDateTime::now_utc()));
    let day = Duration::from_secs(86_400);
    let server = TestServer::start_custom(clock.clone(), 12 * day, |c| {
        c.auto_rotation.enabled = true;
        c.auto_rotation.check_interval = Duration::from_secs(1);
    })
    .await;
    let st = store(&server);
    let first = root_id_in(&st, RootState::Active);
    let journal = |st: &DirStore| st.load_existing().unwrap().state.journal;
    eventually("a 12-day root with no successor is a warning", || {
        server.running.metrics.root_expiry_warning.get() == 1
    })
    .await;
    assert!(
        journal(&st).is_empty(),
        "more than half its life left: nothing yet"
    );

    clock.advance(6 * day + Duration::from_secs(3600)); // under half of 12 d left
    eventually("the schedule prepares a successor", || {
        journal(&st)
            .iter()
            .any(|e| e.action == JournalAction::Prepare)
    })
    .await;
    let prepare = journal(&st)[0].clone();
    assert_eq!(prepare.actor.as_str(), "auto");
    let prepared = root_id_in(&st, RootState::Prepared);
    eventually("a successor exists: no warning", || {
        server.running.metrics.root_expiry_warning.get() == 0
    })
    .await;

    clock.advance(4 * day); // under a sixth of 12 d (2 d) left
    eventually("the schedule activates it", || {
        root_id_in(&st, RootState::Active) == prepared
    })
    .await;
    let last = journal(&st).last().unwrap().clone();
    assert_eq!(
        (last.action, last.actor.as_str()),
        (JournalAction::Activate, "auto")
    );
    assert_eq!(root_id_in(&st, RootState::Old), first);
    server.running.shutdown().await;
}

fn trust_pems(r: &DiscoveryResponse) -> Vec<(String, usize)> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        secret, SpiffeCertValidatorConfig,
    };
    use prost::Message;
    secrets(r)
        .into_iter()
        .map(|s| {
            let n = match &s.r#type {
                Some(secret::Type::ValidationContext(vc)) if s.name == "ALL" => {
                    let ext = vc.custom_validator_config.as_ref().unwrap();
                    let cfg = SpiffeCertValidatorConfig::decode(
                        ext.typed_config.as_ref().unwrap().value.as_slice(),
                    )
                    .unwrap();
                    let td = &cfg.trust_domains[0];
                    match td.trust_bundle.as_ref().and_then(|d| d.specifier.as_ref()) {
                        Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => {
                            pem_certs(std::str::from_utf8(b).unwrap()).len()
                        }
                        _ => 0,
                    }
                }
                _ => pem_certs(&trusted_ca(&s)).len(),
            };
            (s.name, n)
        })
        .collect()
}

/// Issue 9 "How changes reach the running server", with the default 1 s store poll: a prepared
/// root is pushed to every trust resource (`ROOTCA`, `ALL`, `spiffe://<own td>`) within 2 s, and
/// the CSR API's last `cert_chain` element holds every trusted root concatenated (istiod
/// `security/pkg/server/ca/server.go` CreateCertificate appends the root bundle last; ztunnel
/// and istio-agent read it as the trust bundle); a taint re-keys a leaf at once even with a
/// one-hour activation spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_reaches_every_trust_resource_the_csr_chain_and_tainted_leaves_quickly() {
    let server = TestServer::start_with(Arc::new(SystemClock), |c| {
        c.state_poll_interval = Duration::from_secs(1);
        c.rotation.signer_change_spread = Duration::from_secs(3600);
    })
    .await;
    let names = ["ALL", "ROOTCA", "spiffe://cluster.local"];
    let mut s = Raw::open(&server, "trust").await;
    s.tx.send(req(&names, "", "")).await.unwrap();
    let r = s.recv().await;
    assert_eq!(
        trust_pems(&r),
        names.iter().map(|n| (n.to_string(), 1)).collect::<Vec<_>>()
    );
    s.tx.send(req(&names, &r.nonce, &r.version_info))
        .await
        .unwrap();
    let w = Workload::start(&server, "leaf").await;

    let st = store(&server);
    let ctx = || Ctx::new(Actor::user("op", "test"), OffsetDateTime::now_utc(), None).unwrap();
    let ca = meshid::ca::root::generate_root(
        &meshid::spiffe::TrustDomain::new("cluster.local").unwrap(),
        meshid::ca::KeyType::EcdsaP256,
        meshid::ca::root::DEFAULT_ROOT_TTL,
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    let started = std::time::Instant::now();
    rotation::apply(&st, &ctx(), |s, c| {
        rotation::prepare(s, rotation::Candidate::Generated(ca), c)
    })
    .unwrap();
    let r = s.recv().await;
    let took = started.elapsed();
    assert_eq!(
        trust_pems(&r),
        names.iter().map(|n| (n.to_string(), 2)).collect::<Vec<_>>(),
        "every trust resource carries both roots"
    );
    assert!(took < Duration::from_secs(2), "pushed after {took:?}");
    s.tx.send(req(&names, &r.nonce, &r.version_info))
        .await
        .unwrap();

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut csr = server.csr(Some(server.token("shop", "agent"))).await;
    let chain = csr
        .create_certificate(meshid::api::istio::IstioCertificateRequest {
            csr: crate::support::csr(&key, &[]),
            validity_duration: 1800,
            metadata: None,
        })
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    let bundle = pem_certs(chain.last().unwrap());
    assert_eq!(bundle.len(), 2, "the last element holds both roots");

    let (old, new) = (
        root_id_in(&st, RootState::Active),
        root_id_in(&st, RootState::Prepared),
    );
    rotation::apply(&st, &ctx(), |s, c| {
        rotation::activate(s, &new, false, &rotation::no_gate, c)
    })
    .unwrap();
    eventually("the server signs with the new root", || {
        status(&server).signer == new
    })
    .await;
    let started = std::time::Instant::now();
    rotation::apply(&st, &ctx(), |s, c| rotation::taint(s, &old, c)).unwrap();
    eventually("the tainted leaf is re-issued from the new root", || {
        status(&server).signer_propagated(&new).is_ok()
    })
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "re-keyed at once, not over the 1 h spread: {took:?}"
    );
    let _ = w;
    server.running.shutdown().await;
}

/// Delta xDS ACKs count too: a DeltaSecrets stream that ACKs `ROOTCA` and `default` (a request
/// with the response's nonce and no error_detail, Envoy xds_protocol.rst "Incremental xDS") is
/// counted for both; before its ACK it lags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_acks_are_tracked() {
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let (tx, out) = mpsc::channel(8);
    let mut client = server.sds(Some(server.token("shop", "delta"))).await;
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
    let first = tokio::time::timeout(Duration::from_secs(20), rx.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.resources.len(), 2);
    let root = root_id_in(&store(&server), RootState::Active);
    eventually("the stream is registered", || {
        status(&server).counts.streams == 1
    })
    .await;
    let before = status(&server);
    assert_eq!(
        (before.counts.silent, before.counts.laggard_count),
        (1, 0),
        "not ACKed yet: silent, holding nothing"
    );
    assert!(before.counts.roots.is_empty() && before.counts.signers.is_empty());
    tx.send(DeltaDiscoveryRequest {
        type_url: TYPE.into(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    eventually("the delta ACK is counted", || {
        let st = status(&server);
        st.root_propagated(&root).is_ok() && st.signer_propagated(&root).is_ok()
    })
    .await;
    assert_eq!(status(&server).counts.laggard_count, 0);
    drop(tx);
    server.running.shutdown().await;
}

/// Several replicas share one state: `--server` given once per replica makes the gate and the
/// waits hold on every one, so a stream that has not ACKed on the second replica blocks the
/// activation even though the first replica is done (the architecture's "with several replicas
/// the CLI sees all of them").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_given_must_have_propagated() {
    let one = TestServer::start(Arc::new(SystemClock)).await;
    let shared_state = one.state_dir();
    let mut two = TestServer::start_with(Arc::new(SystemClock), |c| {
        c.state_dir = shared_state.clone();
    })
    .await;
    two.root_pem = one.root_pem.clone(); // its serving certificate comes from the shared state
    let _good = Workload::start(&one, "good").await;
    let stuck = Raw::acked_once(&two, "stuck-on-two", &["ROOTCA"]).await;

    let st = store(&one);
    let ctx = Ctx::new(Actor::user("op", "test"), OffsetDateTime::now_utc(), None).unwrap();
    let new = prepare_generated(&st);
    let http =
        |s: &TestServer| HttpStatus::new(&format!("http://{}", s.running.http_addr)).unwrap();
    let (h1, both) = (http(&one), vec![http(&one), http(&two)]);
    eventually("replica one has propagated", || {
        rotation::check_servers(&h1, |s| s.root_propagated(&new)).is_ok()
    })
    .await;
    let why = rotation::check_servers(&both, |s| s.root_propagated(&new))
        .unwrap_err()
        .to_string();
    assert!(why.contains("sa/stuck-on-two"), "{why}");
    let refused = rotation::apply(&st, &ctx, |s, c| {
        rotation::activate(
            s,
            &new,
            false,
            &|r| rotation::check_servers(&both, |s| s.root_propagated(&r.id)),
            c,
        )
    });
    assert!(
        matches!(
            &refused,
            Err(rotation::RootError::ActivationHeld { root, why })
                if *root == new && matches!(**why, rotation::GateRefusal::NotPropagated(_))
        ),
        "{refused:?}"
    );
    drop(stuck);
    eventually("both replicas have propagated", || {
        rotation::check_servers(&both, |s| s.root_propagated(&new)).is_ok()
    })
    .await;
    one.running.shutdown().await;
    two.running.shutdown().await;
}
