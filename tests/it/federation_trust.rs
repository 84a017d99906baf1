//! Issue 17 items 3, 5, 13, 14 and 15: withdrawing a federated trust domain (a peer left out
//! of the config; `meshid bundle delete` with SPIRE's modes), the bundle sequence rules, one
//! timing rule for federation and the activation gate, the CLI reading the README's federation
//! configs, and what federation logs.
//!
//! References: SPIFFE federation spec 4.1 (publish 3-5 refresh hints ahead), 4.2 (sequence;
//! operator updates), 6.3 (terminating a relationship); SPIRE `spire-server bundle delete` and
//! `datastore/sqlstore` `deleteBundle` (RESTRICT / DISSOCIATE), `bundle/client/updater.go`
//! `UpdateBundle`, `bundle/client/manager.go` `refreshConfigs`, `bundleutil`
//! `MinimumRefreshHint`; RFC 1982 serial number arithmetic.

use std::{
    collections::BTreeMap,
    io::BufRead,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::Duration,
};

use meshid::{
    ca::{cert, root, CertDer, KeyType},
    clock::{Clock, ManualClock},
    rotation::{self, publication::publication_delay, Candidate, Ctx},
    state::{Actor, DirStore, RootState, StateStore},
    trust::{
        poll_interval, worst_case_fetch, EndpointProfile, FederationConfig, SpiffeBundle,
        MIN_REFRESH_HINT, RETRY_AFTER_FAILURE,
    },
};
use tokio_stream::wrappers::ReceiverStream;

use crate::federation::{
    all_bundles, bootstrap, endpoint, fake_endpoint, free_addr, peer, start, td, wait_roots,
    wait_status, web_pki, Mode,
};
use crate::server_support::{now, sds_req, secrets, trusted_ca, TestServer};
use crate::support::meshid;

const WAIT: Duration = Duration::from_secs(30);

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(now()))
}

/// `ROOTCA` (its certificates) and `ALL` (trust domain → roots) as a proxy of `s` gets them.
async fn rootca_and_all(s: &TestServer) -> (Vec<CertDer>, BTreeMap<String, Vec<CertDer>>) {
    let mut client = s.sds(Some(s.token("pay", "ledger"))).await;
    let resp = client
        .fetch_secrets(sds_req(&["ROOTCA", "ALL"], "", ""))
        .await
        .unwrap()
        .into_inner();
    let got = secrets(&resp);
    let by = |n: &str| got.iter().find(|s| s.name == n).unwrap().clone();
    let rootca = cert::certs_from_pem(trusted_ca(&by("ROOTCA")).as_bytes(), "ROOTCA").unwrap();
    (rootca, all_bundles(&by("ALL")))
}

/// Waits until the live bundle of `r` holds exactly `roots` for `td` (`None`: not trusted).
async fn wait_live(r: &meshid::server::Running, td: &str, roots: Option<Vec<CertDer>>) {
    let td = self::td(td);
    let mut rx = r.live.subscribe();
    tokio::time::timeout(
        WAIT,
        rx.wait_for(|s| s.bundle.roots_of(&td).map(<[_]>::to_vec) == roots),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{td}: live roots {:?}, want {roots:?}",
            r.live.current().bundle.roots_of(&td).map(<[_]>::len)
        )
    })
    .unwrap();
}

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &std::process::Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn gen_root(td: &str) -> CertDer {
    root::generate_root(
        &self::td(td),
        KeyType::EcdsaP256,
        root::DEFAULT_ROOT_TTL,
        now(),
    )
    .unwrap()
    .cert
}

// === item 3: a peer that leaves the config; `bundle delete` ===

/// A peer taken out of `[[federation.peers]]` is trusted nowhere after the restart that applies
/// the config — not in `ALL`, not as `spiffe://<td>`, not in a merged `ROOTCA` — while its last
/// bundle stays stored (so a server started without its config loses no bootstrap) until
/// `meshid bundle delete`. SPIFFE federation spec 6.3: terminating a relationship stops the
/// polling and must reach validators; SPIRE's `bundle/client/manager.go` `refreshConfigs`
/// stops the updater of a trust domain "no longer managed" and keeps the bundle in its
/// datastore until `spire-server bundle delete`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_left_out_of_the_config_is_trusted_nowhere_and_its_bundle_stays_until_deleted() {
    let pki = web_pki();
    let a_addr = free_addr();
    let web = EndpointProfile::HttpsWeb;
    let (ca, cb) = (clock(), clock());
    let a = start("a.example", &ca, Some(endpoint(a_addr, web, &pki)), vec![]).await;
    let a_root = a.running.live.current().bundle.own_roots().to_vec();
    let peers = vec![peer("a.example", a_addr, web, &pki)];
    let c: Arc<dyn Clock> = cb.clone();
    let b = TestServer::start_in(c, "b.example", root::DEFAULT_ROOT_TTL, move |cfg| {
        cfg.federation.peers = peers;
        cfg.federation.merge_into_rootca = true;
    })
    .await;
    wait_roots(&b.running, "a.example", 1).await;
    let (rootca, all) = rootca_and_all(&b).await;
    assert_eq!(rootca.len(), 2, "merged ROOTCA: ours and a.example's");
    assert_eq!(all.get("a.example"), Some(&a_root));

    // The operator takes the peer out of the config and restarts B on the same state.
    let (state_dir, b_root) = (b.state_dir(), b.root_pem.clone());
    b.running.shutdown().await;
    let sd = state_dir.clone();
    let c: Arc<dyn Clock> = cb.clone();
    let mut again = TestServer::start_in(c, "b.example", root::DEFAULT_ROOT_TTL, move |cfg| {
        cfg.state_dir = sd;
        cfg.federation.merge_into_rootca = true;
    })
    .await;
    again.root_pem = b_root.clone();
    let (rootca, all) = rootca_and_all(&again).await;
    assert_eq!(
        rootca,
        cert::certs_from_pem(b_root.as_bytes(), "b").unwrap(),
        "ROOTCA: ours only"
    );
    assert!(!all.contains_key("a.example"), "ALL: {:?}", all.keys());
    let mut client = again.sds(Some(again.token("pay", "ledger"))).await;
    let err = client
        .fetch_secrets(sds_req(&["spiffe://a.example"], "", ""))
        .await
        .expect_err("spiffe://a.example is served no more");
    assert!(err.message().contains("spiffe://a.example"), "{err:?}");
    let stored = DirStore::new(&state_dir).load_existing().unwrap().state;
    assert!(stored.federated.contains_key(&td("a.example")), "kept");

    // `root status` says so; `bundle delete` (nothing uses it any more) deletes it.
    let sd = state_dir.to_str().unwrap();
    let doc: serde_json::Value = serde_json::from_str(&ok(
        &meshid(&["root", "status", "--state-dir", sd, "--output", "json"]),
        "root status",
    ))
    .unwrap();
    assert_eq!(doc["federation"]["a.example"]["trusted"], false, "{doc}");
    let text = ok(
        &meshid(&["root", "status", "--state-dir", sd]),
        "root status",
    );
    assert!(
        text.contains("not trusted: a.example is not in [[federation.peers]]"),
        "{text}"
    );
    let out = ok(
        &meshid(&["bundle", "delete", "a.example", "--state-dir", sd]),
        "bundle delete",
    );
    assert!(
        out.contains("deleted a.example's bundle (1 root(s)"),
        "{out}"
    );
    let stored = DirStore::new(&state_dir).load_existing().unwrap().state;
    assert!(stored.federated.is_empty() && stored.dissociated.is_empty());
    again.running.shutdown().await;
    a.running.shutdown().await;
}

/// `meshid bundle delete` with `spire-server bundle delete`'s modes against a running server
/// (SPIRE `datastore/sqlstore` `deleteBundle`: RESTRICT refuses while registration entries
/// federate with the bundle, DISSOCIATE deletes it and dissociates them; `api/bundle/v1`
/// `deleteFederatedBundle` refuses the server's own trust domain and answers NotFound). In
/// meshid the uses are the server's peers: RESTRICT refuses a configured peer (seen in
/// `--config`, or in the running server's status file); DISSOCIATE withdraws it from every
/// SDS stream at once and the server stores none of its bundles until `bundle set`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_delete_restricts_a_configured_peer_and_dissociate_withdraws_it_live() {
    let pki = web_pki();
    let a_addr = free_addr();
    let web = EndpointProfile::HttpsWeb;
    let (ca, cb) = (clock(), clock());
    let a = start("a.example", &ca, Some(endpoint(a_addr, web, &pki)), vec![]).await;
    let b = start(
        "b.example",
        &cb,
        None,
        vec![peer("a.example", a_addr, web, &pki)],
    )
    .await;
    wait_roots(&b.running, "a.example", 1).await;
    let sd = b.state_dir().to_str().unwrap().to_owned();
    // B's config as an operator writes it: no [[clusters]] (the CLI reads what it uses).
    let b_toml = b.dir.path().join("b.toml");
    std::fs::write(
        &b_toml,
        format!(
            "state_dir = {sd:?}\n[[federation.peers]]\ntrust_domain = \"a.example\"\nurl = \"https://{a_addr}/\"\nprofile = \"https_web\"\nca_file = {:?}\n",
            pki.ca
        ),
    )
    .unwrap();
    let cfg = b_toml.to_str().unwrap();

    let mut client = b.sds(Some(b.token("pay", "ledger"))).await;
    let (tx, out) = tokio::sync::mpsc::channel(8);
    let mut rx = client
        .stream_secrets(ReceiverStream::new(out))
        .await
        .unwrap()
        .into_inner();
    tx.send(sds_req(&["ALL"], "", "")).await.unwrap();
    let first = rx.message().await.unwrap().unwrap();
    assert!(all_bundles(&secrets(&first)[0]).contains_key("a.example"));
    tx.send(sds_req(&["ALL"], &first.nonce, &first.version_info))
        .await
        .unwrap();

    // RESTRICT (the default): in use, nothing written.
    let generation = DirStore::new(b.state_dir())
        .load_existing()
        .unwrap()
        .generation;
    let err = refused(
        &meshid(&["bundle", "delete", "a.example", "--state-dir", &sd]),
        "restrict, running server",
    );
    assert!(
        err.contains("a.example is in use: it is a federation peer (the running server fetches it")
            && err.contains("--mode dissociate"),
        "{err}"
    );
    let err = refused(
        &meshid(&["bundle", "delete", "a.example", "--config", cfg]),
        "restrict, config",
    );
    assert!(
        err.contains(&format!("[[federation.peers]] in {cfg}")),
        "{err}"
    );
    assert_eq!(
        DirStore::new(b.state_dir())
            .load_existing()
            .unwrap()
            .generation,
        generation
    );

    // DISSOCIATE: deleted, pushed to the stream without a.example.
    let out = ok(
        &meshid(&[
            "bundle",
            "delete",
            "a.example",
            "--mode",
            "dissociate",
            "--config",
            cfg,
        ]),
        "dissociate",
    );
    assert!(out.contains("a.example is dissociated"), "{out}");
    let pushed = tokio::time::timeout(WAIT, rx.message())
        .await
        .expect("ALL pushed after the delete")
        .unwrap()
        .unwrap();
    assert!(
        !all_bundles(&secrets(&pushed)[0]).contains_key("a.example"),
        "ALL still holds a.example"
    );
    wait_live(&b.running, "a.example", None).await;

    // The server still polls a.example (configured) but stores nothing, and says why.
    b.running.federation_refresh[&td("a.example")].notify_one();
    let s = wait_status(&b.running, "a.example", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("dissociated"))
    })
    .await;
    let why = s.last_error.unwrap_or_default();
    assert!(why.contains("meshid bundle set a.example FILE"), "{why}");
    assert!(b.running.metrics.render().contains(
        "meshid_federation_refreshes_total{trust_domain=\"a.example\",result=\"dissociated\"}"
    ));
    let state = DirStore::new(b.state_dir()).load_existing().unwrap().state;
    assert!(!state.federated.contains_key(&td("a.example")));
    let doc: serde_json::Value = serde_json::from_str(&ok(
        &meshid(&["root", "status", "--config", cfg, "--output", "json"]),
        "root status",
    ))
    .unwrap();
    assert!(
        doc["federation"]["a.example"]["dissociated"]["by"].is_string(),
        "{doc}"
    );

    // `bundle set` trusts it again, explicitly.
    bootstrap(&a, &b, "a.example");
    wait_roots(&b.running, "a.example", 1).await;
    assert!(DirStore::new(b.state_dir())
        .load_existing()
        .unwrap()
        .state
        .dissociated
        .is_empty());

    // Our own trust domain, and one with nothing stored.
    let err = refused(
        &meshid(&["bundle", "delete", "b.example", "--state-dir", &sd]),
        "own",
    );
    assert!(err.contains("b.example is our own trust domain"), "{err}");
    let err = refused(
        &meshid(&["bundle", "delete", "nowhere.example", "--state-dir", &sd]),
        "missing",
    );
    assert!(
        err.contains("no bundle of nowhere.example is stored"),
        "{err}"
    );
    a.running.shutdown().await;
    b.running.shutdown().await;
}

// === item 5: sequence ===

fn doc(roots: Vec<CertDer>, sequence: Option<u64>) -> Vec<u8> {
    SpiffeBundle {
        roots,
        sequence,
        refresh_hint: Some(Duration::from_secs(300)),
    }
    .to_json()
    .unwrap()
    .into_bytes()
}

/// Over HTTPS from a peer's endpoint: a document without `spiffe_sequence` is taken (SPIFFE
/// federation spec 4.2: the most recently retrieved bundle is then the latest) but does not
/// reset the rollback check; `2^64-1` does not lock out the bundles after it (RFC 1982 serial
/// order; SPIRE's `bundle/client/updater.go` `UpdateBundle` stores any bundle that differs);
/// and `meshid bundle set` replaces a stored bundle whatever the sequences (spec 4.2:
/// operators may update a foreign bundle at any time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_without_a_sequence_does_not_reopen_rollback_and_2_64_minus_1_locks_nobody_out() {
    let pki = web_pki();
    let peer_td = "peer.example";
    let r: Vec<CertDer> = (0..6).map(|_| gen_root(peer_td)).collect();
    let mode = Arc::new(Mutex::new(Mode::Serve(doc(vec![r[0].clone()], Some(5)))));
    let (addr, _fake) = fake_endpoint(&pki, mode.clone()).await;
    let b = start(
        "b.example",
        &clock(),
        None,
        vec![peer(peer_td, addr, EndpointProfile::HttpsWeb, &pki)],
    )
    .await;
    wait_live(&b.running, peer_td, Some(vec![r[0].clone()])).await;
    let dir = b.state_dir();
    let set = |root: &CertDer, sequence: Option<u64>| {
        let file = b.dir.path().join("peer.json");
        std::fs::write(&file, doc(vec![root.clone()], sequence)).unwrap();
        ok(
            &meshid(&[
                "bundle",
                "set",
                peer_td,
                file.to_str().unwrap(),
                "--state-dir",
                dir.to_str().unwrap(),
            ]),
            "bundle set",
        )
    };
    // Serves `served` and asks B to fetch now. The status is recorded after the store, so a
    // wait on the live bundle can return before the attempt counts: each step waits for its
    // outcome instead of counting attempts.
    let fetch = |served: Vec<u8>| {
        *mode.lock().unwrap() = Mode::Serve(served);
        b.running.federation_refresh[&td(peer_td)].notify_one();
    };
    // No sequence: taken (the latest retrieved), and the rollback check still holds after it.
    fetch(doc(vec![r[1].clone()], None));
    wait_live(&b.running, peer_td, Some(vec![r[1].clone()])).await;
    fetch(doc(vec![r[2].clone()], Some(4)));
    wait_status(&b.running, peer_td, |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("bundle sequence 4 is below the stored 5"))
    })
    .await;
    wait_live(&b.running, peer_td, Some(vec![r[1].clone()])).await;
    // 2^64-1 (here from an operator's file) locks out nothing: a re-initialised peer's 3
    // comes after it.
    // (The endpoint serves what is set, so a fetch still pending changes nothing.)
    *mode.lock().unwrap() = Mode::Serve(doc(vec![r[3].clone()], Some(u64::MAX)));
    let out = set(&r[3], Some(u64::MAX));
    assert!(
        out.contains("replaced peer.example's bundle (sequence none"),
        "{out}"
    );
    wait_live(&b.running, peer_td, Some(vec![r[3].clone()])).await;
    fetch(doc(vec![r[4].clone()], Some(3)));
    wait_live(&b.running, peer_td, Some(vec![r[4].clone()])).await;
    // An operator replaces it with an older-numbered bundle: explicit, so taken.
    *mode.lock().unwrap() = Mode::Serve(doc(vec![r[5].clone()], Some(1)));
    let out = set(&r[5], Some(1));
    assert!(
        out.contains("replaced peer.example's bundle (sequence 3, from https://"),
        "{out}"
    );
    wait_live(&b.running, peer_td, Some(vec![r[5].clone()])).await;
    b.running.shutdown().await;
}

// === item 13: one timing rule ===

/// A TCP relay to `to` that drops every connection while `fail` is set: a peer's poll that
/// fails on the way.
async fn flaky_relay(to: SocketAddr, fail: Arc<AtomicBool>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            if fail.load(Ordering::SeqCst) {
                continue; // dropped
            }
            tokio::spawn(async move {
                if let Ok(mut u) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
            });
        }
    });
    addr
}

/// One rule for federation timing, with two servers over HTTPS: the published refresh hint is
/// at least a minute (peers poll at most once a minute; SPIRE raises a shorter hint to
/// `bundleutil.MinimumRefreshHint`), and a root prepared in A reaches B — whose poll after the
/// prepare fails — one poll interval plus one retry later, before A's activation gate opens
/// (SPIFFE federation spec 4.1: publish 3-5 hints ahead so a missed poll does no harm). The
/// gate's refusal says what it waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_root_reaches_a_peer_whose_poll_failed_before_the_gate_opens() {
    let mut errs = Vec::new();
    FederationConfig {
        refresh_hint: Duration::from_secs(10),
        ..Default::default()
    }
    .validate(None, &mut errs);
    assert!(
        errs.iter()
            .any(|e| e.contains("refresh_hint: 10s must be between 1m and 1d")),
        "a 10 s hint promises polls that do not happen: {errs:?}"
    );

    let hint = MIN_REFRESH_HINT;
    let pki = web_pki();
    let a_addr = free_addr();
    let web = EndpointProfile::HttpsWeb;
    let (ca, cb) = (clock(), clock());
    let c: Arc<dyn Clock> = ca.clone();
    let ep = endpoint(a_addr, web, &pki);
    let a = TestServer::start_in(c, "a.example", root::DEFAULT_ROOT_TTL, move |cfg| {
        cfg.federation.bundle_endpoint = Some(ep);
        cfg.federation.refresh_hint = hint;
    })
    .await;
    let fail = Arc::new(AtomicBool::new(false));
    let relay = flaky_relay(a_addr, fail.clone()).await;
    let b = start(
        "b.example",
        &cb,
        None,
        vec![peer("a.example", relay, web, &pki)],
    )
    .await;
    wait_roots(&b.running, "a.example", 1).await;
    let b_polled = cb.now(); // B's clock has not moved since its successful poll

    let store = DirStore::new(a.state_dir());
    let ctx = Ctx::new(Actor::user("ops", "test"), ca.now(), None).unwrap();
    let next = root::generate_root(
        &td("a.example"),
        KeyType::EcdsaP256,
        root::DEFAULT_ROOT_TTL,
        ca.now(),
    )
    .unwrap();
    rotation::apply(&store, &ctx, |s, c| {
        rotation::prepare(s, Candidate::Generated(next), c)
    })
    .unwrap();
    wait_roots(&a.running, "a.example", 2).await;

    // B's next poll fails; the retry after the failure gets the new root.
    fail.store(true, Ordering::SeqCst);
    cb.advance(poll_interval(Some(hint)));
    wait_status(&b.running, "a.example", |s| s.last_error.is_some()).await;
    fail.store(false, Ordering::SeqCst);
    cb.advance(RETRY_AFTER_FAILURE);
    wait_roots(&b.running, "a.example", 2).await;
    let took: Duration = (cb.now() - b_polled).try_into().unwrap();
    assert_eq!(took, worst_case_fetch(hint));

    // A's gate opens only after that, and says what it waits for.
    let prepared = store
        .load_existing()
        .unwrap()
        .state
        .roots
        .into_iter()
        .find(|r| r.state == RootState::Prepared)
        .unwrap();
    let since = prepared.since.prepared.unwrap();
    assert!(publication_delay(hint) >= took);
    let why = rotation::bundle_publication_gate(hint, since + took)(&prepared)
        .expect_err("the gate is still closed when the peer has just got the root");
    let why = why.to_string();
    assert!(
        why.contains("3x the refresh hint 1m")
            && why.contains("polls every 1m and retries a failed poll after 1m, 2m in all"),
        "{why}"
    );
    assert!(
        rotation::bundle_publication_gate(hint, since + publication_delay(hint))(&prepared).is_ok()
    );
    a.running.shutdown().await;
    b.running.shutdown().await;
}

// === items 14 and 15: the README's configs with the CLI; logs ===

/// A `meshid server` process, killed when dropped; its JSON log lines arrive on `logs`.
struct Server {
    child: Child,
    logs: mpsc::Receiver<serde_json::Value>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(dir: &Path, config: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshid"))
            .current_dir(dir)
            .args([
                "server",
                "--config",
                config,
                "--dev-issuer-dir",
                "./issuer",
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, logs) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("gRPC (TLS) on"), "{config}: {line}");
        Self { child, logs }
    }

    /// The first log line (from now on) whose message contains `what`.
    fn wait_log(&self, what: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let v = self
                .logs
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {what:?} within {WAIT:?}"));
            if v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(what))
            {
                return v;
            }
        }
    }
}

/// The README's federation walkthrough as written (ports picked free, JSON logs): the CLI's
/// `root prepare|activate --config` and `bundle refresh --config` read the README's configs,
/// which leave `[[clusters]]` to `meshid server`'s flags (main refused them: "clusters: at
/// least one cluster is needed"); `--state-dir` alone says loudly that the publication gate is
/// not applied; the bundle endpoint logs its address at start-up, and a federated update logs
/// the trust domain and the sequence stored.
#[test]
fn the_readme_federation_configs_work_with_the_cli_and_the_logs_say_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_meshid"))
            .current_dir(d)
            .args(args)
            .output()
            .unwrap()
    };
    for td in ["a", "b"] {
        ok(
            &run(&[
                "ca",
                "init",
                "--trust-domain",
                &format!("{td}.example"),
                "--state-dir",
                &format!("./{td}"),
            ]),
            "ca init",
        );
    }
    ok(
        &run(&["dev", "issuer", "init", "--dir", "./issuer"]),
        "issuer",
    );
    let ports = [free_addr().port(), free_addr().port()];
    for (i, td) in ["a", "b"].into_iter().enumerate() {
        let other = if td == "a" { "b" } else { "a" };
        std::fs::write(
            d.join(format!("{td}.toml")),
            format!(
                "state_dir = \"./{td}\"\n[federation.bundle_endpoint]\nlisten = \"127.0.0.1:{}\"\nprofile = \"https_spiffe\"\n[[federation.peers]]\ntrust_domain = \"{other}.example\"\nurl = \"https://127.0.0.1:{}/\"\nprofile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://{other}.example/ns/istio-system/sa/meshid\"\n",
                ports[i],
                ports[1 - i]
            ),
        )
        .unwrap();
    }
    for (from, to) in [("a", "b"), ("b", "a")] {
        let json = ok(
            &run(&["bundle", "export", "--state-dir", &format!("./{from}")]),
            "export",
        );
        std::fs::write(d.join(format!("{from}.bundle.json")), json).unwrap();
        ok(
            &run(&[
                "bundle",
                "set",
                &format!("{from}.example"),
                &format!("{from}.bundle.json"),
                "--state-dir",
                &format!("./{to}"),
            ]),
            "bundle set",
        );
    }
    let a = Server::start(d, "a.toml");
    let listening = a.wait_log("SPIFFE bundle endpoint listening on");
    assert_eq!(
        listening["fields"]["addr"],
        format!("127.0.0.1:{}", ports[0]),
        "{listening}"
    );
    assert!(
        listening["fields"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("https://127.0.0.1:{}/", ports[0])),
        "{listening}"
    );
    let b = Server::start(d, "b.toml");
    b.wait_log("SPIFFE bundle endpoint listening on");

    // Item 14: the CLI reads the README's configs.
    ok(
        &run(&["root", "prepare", "--config", "b.toml"]),
        "root prepare --config",
    );
    ok(
        &run(&["bundle", "refresh", "b.example", "--config", "a.toml"]),
        "bundle refresh --config",
    );
    let err = refused(
        &run(&["bundle", "refresh", "c.example", "--config", "a.toml"]),
        "refresh of a non-peer",
    );
    assert!(
        err.contains("c.example is not in [[federation.peers]] of a.toml"),
        "{err}"
    );

    // Item 15: A logs the update with the trust domain and the sequence it stored.
    let updated = a.wait_log("federated bundle updated");
    let status: serde_json::Value = serde_json::from_str(&ok(
        &run(&["root", "status", "--config", "a.toml", "--output", "json"]),
        "root status",
    ))
    .unwrap();
    let stored = &status["federation"]["b.example"];
    assert_eq!(stored["roots"], 2, "{status}");
    assert_eq!(updated["fields"]["trust_domain"], "b.example", "{updated}");
    assert_eq!(
        updated["fields"]["sequence"], stored["sequence"],
        "{updated}"
    );
    assert_eq!(updated["fields"]["roots"], 2, "{updated}");

    // Activation: with --config the gate applies; with --state-dir alone it says it does not.
    let b_status: serde_json::Value = serde_json::from_str(&ok(
        &run(&["root", "status", "--config", "b.toml", "--output", "json"]),
        "root status b",
    ))
    .unwrap();
    let prepared = b_status["roots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["state"] == "prepared")
        .unwrap();
    let id = prepared["id"].as_str().unwrap();
    let err = refused(
        &run(&["root", "activate", id, "--config", "b.toml"]),
        "activate --config",
    );
    assert!(
        err.contains("may sign from") && !err.contains("clusters"),
        "{err}"
    );
    let out = run(&["root", "activate", id, "--state-dir", "./b"]);
    ok(&out, "activate --state-dir");
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains("warning: the federation publication gate is not applied (no --config)"),
        "{warning}"
    );
    drop((a, b));
}
