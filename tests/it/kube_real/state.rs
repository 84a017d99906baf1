//! The CA state in a Kubernetes Secret (`kube://NAMESPACE/NAME`) on a real kube-apiserver:
//! compare-and-swap on `resourceVersion` (the API server's optimistic concurrency, as
//! client-go's `retry.RetryOnConflict` users rely on: a `PUT` naming an old resourceVersion is
//! answered 409), a watch that brings a change to every replica, the 1 MiB limit of a Secret
//! (kube-apiserver `pkg/apis/core/validation` `ValidateSecret`: `MaxSecretSize`), format refusal,
//! and `meshid state migrate` both ways.

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::api::{Api, ObjectMeta, PostParams};
use meshid::{
    ca::{root, KeyType},
    clock::SystemClock,
    rotation::{self, Candidate, Ctx},
    spiffe::TrustDomain,
    state::{
        kube::{MAX_DOCUMENT_BYTES, SECRET_TYPE, STATE_KEY},
        Actor, CaState, Dissociation, StateError, StateLocation, StateStore,
    },
};
use tokio_stream::wrappers::ReceiverStream;

use super::{cluster::Cluster, support::csr_identity};
use crate::server_support::{now, sds_req, secrets, trusted_ca, TestServer};

fn secret_location(ns: &str, name: &str) -> StateLocation {
    format!("kube://{ns}/{name}").parse().unwrap()
}

fn open(loc: &StateLocation, kubeconfig: &Path) -> Arc<dyn StateStore> {
    loc.open(Some(kubeconfig)).unwrap()
}

fn sample_state(td: &str) -> CaState {
    let td = TrustDomain::new(td).unwrap();
    let ca = root::generate_root(&td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now()).unwrap();
    CaState::with_generated_root(td, &ca, now())
}

/// Points `cfg` at the Secret state `loc`; `seed`: first moves the harness server's freshly
/// made state into the Secret (`state migrate`'s path), otherwise the Secret holds one already.
pub(super) fn on_secret_state(
    cfg: &mut meshid::config::Config,
    loc: &StateLocation,
    kubeconfig: &Path,
    seed: bool,
) {
    if seed {
        let from = StateLocation::Dir(cfg.state_dir.clone())
            .open(None)
            .unwrap();
        let to = loc.open(Some(kubeconfig)).unwrap();
        to.create_migrated(&from.load_existing().unwrap()).unwrap();
    }
    cfg.state = Some(loc.clone());
    cfg.state_kubeconfig = Some(kubeconfig.to_owned());
}

/// A replica on the Secret at `loc`. `seed`: move this server's freshly made state into the
/// Secret first (`state migrate`'s path); otherwise the Secret already holds one. The state is
/// polled once a minute only, so what reaches the replica sooner came through the watch.
async fn replica(loc: &StateLocation, kubeconfig: &Path, seed: bool) -> TestServer {
    let (loc, kubeconfig) = (loc.clone(), kubeconfig.to_owned());
    TestServer::start_with(Arc::new(SystemClock), move |cfg| {
        on_secret_state(cfg, &loc, &kubeconfig, seed);
        cfg.state_poll_interval = Duration::from_secs(60);
    })
    .await
}

/// An SDS stream for `ROOTCA` on `server`, ACKing like Envoy; yields each trusted_ca PEM.
async fn rootca_stream(server: &TestServer) -> tokio::sync::mpsc::Receiver<String> {
    let mut client = server.sds(Some(server.token("shop", "product"))).await;
    let (tx, out) = tokio::sync::mpsc::channel(8);
    let mut rx = client
        .stream_secrets(ReceiverStream::new(out))
        .await
        .unwrap()
        .into_inner();
    tx.send(sds_req(&["ROOTCA"], "", "")).await.unwrap();
    let (pems, got) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok(Some(resp)) = rx.message().await {
            let pem = trusted_ca(&secrets(&resp)[0]);
            if tx
                .send(sds_req(&["ROOTCA"], &resp.nonce, &resp.version_info))
                .await
                .is_err()
                || pems.send(pem).await.is_err()
            {
                return;
            }
        }
    });
    got
}

async fn until_roots(rx: &mut tokio::sync::mpsc::Receiver<String>, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let pem = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no ROOTCA with {n} roots within {limit:?}"))
            .expect("stream open");
        if pem.matches("BEGIN CERTIFICATE").count() == n {
            return;
        }
    }
}

/// Issue 21: a root prepared through the CLI's path (rotation::apply on the Secret store)
/// reaches the SDS streams of both replicas within 2 s, through the watch (the poll is 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn a_root_prepared_on_the_secret_reaches_every_replicas_streams_within_2s() {
    let cluster = Cluster::shared().await;
    let ns = cluster.namespace("state-watch").await;
    let loc = secret_location(&ns, "meshid-ca-state");
    let a = replica(&loc, &cluster.admin_kubeconfig, true).await;
    let mut b = replica(&loc, &cluster.admin_kubeconfig, false).await;
    // B serves the Secret's root (A's), not the one its harness made.
    b.root_pem = a.root_pem.clone();
    assert_eq!(
        a.running.live.current().generation,
        b.running.live.current().generation,
        "both replicas serve the Secret's state"
    );
    let (mut on_a, mut on_b) = (rootca_stream(&a).await, rootca_stream(&b).await);
    until_roots(&mut on_a, 1, Duration::from_secs(10)).await;
    until_roots(&mut on_b, 1, Duration::from_secs(10)).await;

    let store = open(&loc, &cluster.admin_kubeconfig);
    let ctx = Ctx::new(Actor::user("ops", "test"), now(), None).unwrap();
    let td = a.running.live.current().authority.trust_domain().clone();
    let new_root =
        root::generate_root(&td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now()).unwrap();
    let written = Instant::now();
    rotation::apply(&store, &ctx, |s, c| {
        rotation::prepare(s, Candidate::Generated(new_root), c)
    })
    .unwrap();
    let (ra, rb) = tokio::join!(
        async {
            until_roots(&mut on_a, 2, Duration::from_secs(2)).await;
            written.elapsed()
        },
        async {
            until_roots(&mut on_b, 2, Duration::from_secs(2)).await;
            written.elapsed()
        }
    );
    eprintln!(
        "kube_real::state: prepared root on both replicas' ROOTCA streams after {:.0} ms / {:.0} ms",
        ra.as_secs_f64() * 1e3,
        rb.as_secs_f64() * 1e3
    );
    a.running.shutdown().await;
    b.running.shutdown().await;
}

/// The status page of every replica lists every replica sharing the Secret state (issue 23:
/// "on several replicas it shows every replica's view"), from their status Leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn the_status_page_lists_every_replica() {
    let cluster = Cluster::shared().await;
    let ns = cluster.namespace("state-ui").await;
    let loc = secret_location(&ns, "meshid-ca-state");
    let named = |name: &'static str, seed: bool| {
        let (loc, kc) = (loc.clone(), cluster.admin_kubeconfig.clone());
        async move {
            TestServer::start_with(Arc::new(SystemClock), move |cfg| {
                on_secret_state(cfg, &loc, &kc, seed);
                cfg.leader_election.identity = Some(name.into());
            })
            .await
        }
    };
    let a = named("replica-a", true).await;
    let b = named("replica-b", false).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let resp = crate::server::http_get(&a, "/ui/status.json").await;
        let body = resp.split_once("\r\n\r\n").unwrap().1;
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let names: Vec<String> = v["replicas"]["replicas"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|r| r["fresh"] == true && r["status"]["generation"].is_u64())
                    .map(|r| r["replica"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        if names == ["replica-a", "replica-b"] {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "both replicas not listed within 30 s: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(listed["replicas"]["read_error"].is_null(), "{listed:#}");
    let html = crate::server::http_get(&b, "/ui").await;
    assert!(html.contains("replica-a") && html.contains("replica-b"));
    a.running.shutdown().await;
    b.running.shutdown().await;
}

/// Adds a dissociation for `td` (a change every writer can make without touching another's).
fn with_dissociation(s: &CaState, td: &str) -> CaState {
    let mut next = s.clone();
    next.dissociated.insert(
        TrustDomain::new(td).unwrap(),
        Dissociation {
            at: now(),
            by: "writer@test".into(),
        },
    );
    next
}

/// Issue 21: concurrent writers on the Secret lose no update: each reads, changes and writes
/// with compare-and-swap, and retries from a fresh read on `Conflict` (safe: the change is
/// recomputed from what it read). A writer holding an old read is refused, not merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn concurrent_writers_on_the_secret_lose_no_update_and_a_late_write_is_refused() {
    let cluster = Cluster::shared().await;
    let ns = cluster.namespace("state-cas").await;
    let loc = secret_location(&ns, "meshid-ca-state");
    let kc = cluster.admin_kubeconfig.clone();
    let first = open(&loc, &kc);
    first
        .compare_and_swap(None, &sample_state("cluster.local"))
        .unwrap();

    let (writers, each) = (3, 6);
    let results = tokio::task::spawn_blocking(move || {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..writers)
                .map(|w| {
                    let store = open(&loc, &kc);
                    s.spawn(move || {
                        let mut conflicts = 0;
                        for i in 0..each {
                            loop {
                                let v = store.load_existing().unwrap();
                                let next =
                                    with_dissociation(&v.state, &format!("w{w}-{i}.example"));
                                match store.compare_and_swap(Some(v.generation), &next) {
                                    Ok(_) => break,
                                    Err(StateError::Conflict { .. }) => conflicts += 1,
                                    Err(e) => panic!("writer {w}: {e}"),
                                }
                            }
                        }
                        conflicts
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<usize>>()
        })
    })
    .await
    .unwrap();
    let v = first.load_existing().unwrap();
    assert_eq!(v.state.dissociated.len(), writers * each, "no update lost");
    assert_eq!(v.generation.0, 1 + (writers * each) as u64);
    eprintln!(
        "kube_real::state: {} writes by {writers} writers, {} conflicts retried",
        writers * each,
        results.iter().sum::<usize>()
    );

    // A late writer (a leader that lost its Lease, holding an old read) is refused.
    let stale = first.load_existing().unwrap();
    let other = open(
        &secret_location(&ns, "meshid-ca-state"),
        &cluster.admin_kubeconfig,
    );
    let fresh = other.load_existing().unwrap();
    other
        .compare_and_swap(
            Some(fresh.generation),
            &with_dissociation(&fresh.state, "new-leader.example"),
        )
        .unwrap();
    let late = first.compare_and_swap(
        Some(stale.generation),
        &with_dissociation(&stale.state, "old-leader.example"),
    );
    match late {
        Err(StateError::Conflict { expected, found }) => {
            assert_eq!(expected, Some(stale.generation));
            assert_eq!(found.map(|g| g.0), Some(stale.generation.0 + 1));
        }
        other => panic!("a late write must be refused, got {other:?}"),
    }
    let now_stored = first.load_existing().unwrap().state;
    assert!(now_stored
        .dissociated
        .contains_key(&TrustDomain::new("new-leader.example").unwrap()));
    assert!(!now_stored
        .dissociated
        .contains_key(&TrustDomain::new("old-leader.example").unwrap()));
}

/// Issue 21: a document near a Secret's 1 MiB is written; one beyond it is refused by meshid
/// with what to do, before the API server is asked, and the stored state is unchanged. The
/// API server itself refuses a Secret over 1 MiB (so the limit is the real one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn a_document_beyond_a_secrets_limit_is_refused_and_nothing_changes() {
    let cluster = Cluster::shared().await;
    let ns = cluster.namespace("state-limit").await;
    let loc = secret_location(&ns, "meshid-ca-state");
    let kc = cluster.admin_kubeconfig.clone();
    let (ns2, near, over) = tokio::task::spawn_blocking(move || {
        let store = open(&loc, &kc);
        let base = sample_state("cluster.local");
        store.compare_and_swap(None, &base).unwrap();
        let padded = |n: usize| {
            let mut s = base.clone();
            s.dissociated.insert(
                TrustDomain::new("big.example").unwrap(),
                Dissociation {
                    at: now(),
                    by: "x".repeat(n),
                },
            );
            s
        };
        let base_len = serde_json::to_vec_pretty(&base).unwrap().len();
        let near = store.compare_and_swap(
            Some(meshid::state::Generation(1)),
            &padded(MAX_DOCUMENT_BYTES - base_len - 4096),
        );
        let over = store.compare_and_swap(
            Some(meshid::state::Generation(2)),
            &padded(MAX_DOCUMENT_BYTES),
        );
        let after = store.load_existing().unwrap();
        assert_eq!(after.generation.0, 2, "the refused write changed nothing");
        (ns, near.map(|g| g.0), over.map_err(|e| e.to_string()))
    })
    .await
    .unwrap();
    assert_eq!(near.unwrap(), 2, "a document near the limit is stored");
    let why = over.unwrap_err();
    assert!(
        why.contains("above the") && why.contains("Secret"),
        "names the limit: {why}"
    );

    // The API server's own limit: 1 MiB of data plus one byte is refused.
    let api: Api<Secret> = Api::namespaced(cluster.admin().await, &ns2);
    let huge = Secret {
        metadata: ObjectMeta {
            name: Some("too-big".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "x".to_owned(),
            ByteString(vec![b'x'; 1024 * 1024 + 1]),
        )])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &huge).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 422, "{s:?}"),
        other => panic!("the API server must refuse a Secret over 1 MiB, got {other:?}"),
    }
}

/// Issue 21: a document of a newer format is refused naming both versions; a Secret of
/// another type is not taken for a state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn a_newer_format_or_a_foreign_secret_is_refused() {
    let cluster = Cluster::shared().await;
    let ns = cluster.namespace("state-format").await;
    let api: Api<Secret> = Api::namespaced(cluster.admin().await, &ns);
    let doc =
        br#"{"format":"meshid-ca-state/v2","generation":7,"checksum":"sha256:00","state":{}}"#;
    for (name, kind) in [("newer", SECRET_TYPE), ("foreign", "Opaque")] {
        let s = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            type_: Some(kind.into()),
            data: Some(BTreeMap::from([(
                STATE_KEY.to_owned(),
                ByteString(doc.to_vec()),
            )])),
            ..Default::default()
        };
        api.create(&PostParams::default(), &s).await.unwrap();
    }
    let kc = cluster.admin_kubeconfig.clone();
    let (newer, foreign) = tokio::task::spawn_blocking(move || {
        let load = |name: &str| {
            open(&secret_location(&ns, name), &kc)
                .load()
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        (load("newer"), load("foreign"))
    })
    .await
    .unwrap();
    assert!(
        newer.contains("meshid-ca-state/v2") && newer.contains("meshid-ca-state/v1"),
        "{newer}"
    );
    assert!(
        foreign.contains("Opaque") && foreign.contains(SECRET_TYPE),
        "{foreign}"
    );
}

fn meshid(args: &[&str]) -> (bool, String) {
    let (ok, out, err) = meshid_split(args);
    (ok, format!("{out}{err}"))
}

/// (success, stdout, stderr).
fn meshid_split(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshid"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 21: `meshid state migrate` moves a directory's state into a Secret and back, keeping
/// the generation; every command takes `--state kube://…`; a target that holds a state is
/// refused and left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn state_migrate_moves_a_state_into_a_secret_and_back() {
    let cluster = Cluster::shared().await;
    let ns = cluster.namespace("state-migrate").await;
    let tmp = tempfile::tempdir().unwrap();
    let (dir, back) = (tmp.path().join("state"), tmp.path().join("back"));
    let (dir, back) = (dir.to_str().unwrap(), back.to_str().unwrap());
    let kc = cluster.admin_kubeconfig.to_str().unwrap().to_owned();
    let secret = format!("kube://{ns}/meshid-ca-state");
    let run = |args: &[&str]| {
        let (ok, text) = meshid(args);
        assert!(ok, "meshid {args:?}: {text}");
        text
    };
    // stdout only: `root status` warns on stderr when no replica reports.
    let json = |args: &[&str]| {
        let (ok, out, err) = meshid_split(args);
        assert!(ok, "meshid {args:?}: {out}{err}");
        out
    };
    run(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--state",
        dir,
    ]);
    run(&["root", "prepare", "--state", dir]);
    let to_secret = [
        "state",
        "migrate",
        "--from",
        dir,
        "--to",
        &secret,
        "--kubeconfig",
        &kc,
    ];
    let moved = run(&to_secret);
    assert!(moved.contains("generation 2"), "{moved}");
    let (ok, again) = meshid(&to_secret);
    assert!(!ok && again.contains("already holds a CA state"), "{again}");
    // Every command reads the Secret with --state.
    let status = json(&[
        "root",
        "status",
        "--state",
        &secret,
        "--state-kubeconfig",
        &kc,
        "--output",
        "json",
    ]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["generation"], 2);
    assert_eq!(status["roots"].as_array().unwrap().len(), 2);
    run(&[
        "state",
        "migrate",
        "--from",
        &secret,
        "--to",
        back,
        "--kubeconfig",
        &kc,
    ]);
    let a = json(&["root", "status", "--state", dir, "--output", "json"]);
    let b = json(&["root", "status", "--state", back, "--output", "json"]);
    let strip = |s: &str| {
        let mut v: serde_json::Value = serde_json::from_str(s).unwrap();
        v["roots"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .for_each(|r| r.as_object_mut().unwrap().retain(|k, _| k != "expires_in"));
        v["roots"].clone()
    };
    assert_eq!(strip(&a), strip(&b), "the round trip keeps every root");
}

/// Issue 21: with the API server stopped for 30 s a replica on the Secret state keeps issuing
/// from the state it holds and stays ready; a state write fails naming the API server and
/// changes nothing; the leader steps down (its schedules stop) and leads again; once the API
/// server is back, the watch resumes and a write reaches the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn with_the_api_server_down_issuance_goes_on_and_writes_fail_clearly() {
    let cluster = Cluster::start().await;
    let ns = cluster.namespace("state-down").await;
    let loc = secret_location(&ns, "meshid-ca-state");
    let kc = cluster.admin_kubeconfig.clone();
    let (loc2, kc2, ns2) = (loc.clone(), kc.clone(), ns.clone());
    let server = TestServer::start_with(Arc::new(SystemClock), move |cfg| {
        on_secret_state(cfg, &loc2, &kc2, true);
        cfg.state_poll_interval = Duration::from_secs(60);
        cfg.leader_election = meshid::leader::LeaderElectionConfig {
            enabled: true,
            namespace: ns2,
            identity: Some("replica-a".into()),
            kubeconfig: Some(kc2),
            lease_duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_millis(250),
            ..Default::default()
        };
    })
    .await;
    let token = server.token("shop", "product");
    csr_identity(&server, &token).await.unwrap();
    let leads = || server.running.metrics.leader.get();
    let until = |want: i64, limit: Duration, when: &'static str| async move {
        let deadline = Instant::now() + limit;
        while leads() != want {
            assert!(
                Instant::now() < deadline,
                "meshid_leader never became {want} within {limit:?} {when}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    until(1, Duration::from_secs(30), "at start").await;
    let generation = server.running.live.current().generation;

    cluster.stop_apiserver();
    let down = Instant::now();
    let store = {
        let (loc, kc) = (loc.clone(), kc.clone());
        tokio::task::spawn_blocking(move || open(&loc, &kc))
            .await
            .unwrap()
    };
    let refused = {
        let store = store.clone();
        let state = sample_state("cluster.local");
        tokio::task::spawn_blocking(move || {
            store
                .compare_and_swap(Some(meshid::state::Generation(1)), &state)
                .unwrap_err()
                .to_string()
        })
        .await
        .unwrap()
    };
    assert!(
        refused.contains(&format!("kube://{ns}/meshid-ca-state")),
        "the error names the state: {refused}"
    );
    until(0, Duration::from_secs(10), "with the API server down").await;
    // Still ready (tokens are checked against keys it holds), and it says what it cannot do.
    let (code, body) = super::rbac::http_get(server.running.http_addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("leader: another replica runs the schedules")
            && body.contains(&format!("CA state kube://{ns}/meshid-ca-state: generation")),
        "{body}"
    );
    let mut issued = 0;
    while down.elapsed() < Duration::from_secs(30) {
        csr_identity(&server, &token)
            .await
            .unwrap_or_else(|e| panic!("issuance stopped with the API server down: {e}"));
        issued += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert_eq!(server.running.live.current().generation, generation);

    cluster.start_apiserver().await;
    let back = Instant::now();
    until(1, Duration::from_secs(90), "after the restart").await;
    eprintln!(
        "kube_real::state: leading again {:.1} s after the API server's restart",
        back.elapsed().as_secs_f64()
    );
    let td = server
        .running
        .live
        .current()
        .authority
        .trust_domain()
        .clone();
    let ctx = Ctx::new(Actor::user("ops", "test"), now(), None).unwrap();
    let new_root =
        root::generate_root(&td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now()).unwrap();
    tokio::task::spawn_blocking(move || {
        rotation::apply(&store, &ctx, |s, c| {
            rotation::prepare(s, Candidate::Generated(new_root), c)
        })
        .unwrap();
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.running.live.current().bundle.own_roots().len() != 2 {
        assert!(
            Instant::now() < deadline,
            "the watch did not resume: the prepared root never reached the replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "kube_real::state: {issued} certificates issued over 30 s with the API server down; after its restart the replica led again and saw a write {:.1} s later",
        back.elapsed().as_secs_f64()
    );
    server.running.shutdown().await;
}

/// Issue 21: with the state in a Secret, `root activate` reads every replica's status from its
/// Lease (no `--server`): a replica that stopped reporting holds the activation (named, with
/// `--force` to override); once it is gone, the root activates on both replicas' word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn root_activate_on_a_secret_state_waits_for_every_replicas_lease() {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use meshid::rotation::replicas::{REPLICA_LABEL, STATUS_ANNOTATION};
    let cluster = Cluster::shared().await;
    let ns = cluster.namespace("state-replicas").await;
    let loc = secret_location(&ns, "meshid-ca-state");
    let kc = cluster.admin_kubeconfig.clone();
    let start = |name: &'static str, seed: bool| {
        let (loc, kc, ns) = (loc.clone(), kc.clone(), ns.clone());
        TestServer::start_with(Arc::new(SystemClock), move |cfg| {
            on_secret_state(cfg, &loc, &kc, seed);
            cfg.leader_election = meshid::leader::LeaderElectionConfig {
                enabled: true,
                namespace: ns,
                identity: Some(name.into()),
                kubeconfig: Some(kc),
                ..Default::default()
            };
        })
    };
    let a = start("replica-a", true).await;
    let b = start("replica-b", false).await;
    let leases: Api<Lease> = Api::namespaced(cluster.admin().await, &ns);
    let listed = kube::api::ListParams::default().labels(REPLICA_LABEL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while leases.list(&listed).await.unwrap().items.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "both replicas publish their status"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = loc.to_string();
    let kcs = kc.to_str().unwrap().to_owned();
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--state", &state, "--state-kubeconfig", &kcs]);
        meshid(&all)
    };
    let (ok, out) = cli(&["root", "prepare"]);
    assert!(ok, "{out}");
    let (ok, status, err) = meshid_split(&[
        "root",
        "status",
        "--output",
        "json",
        "--state",
        &state,
        "--state-kubeconfig",
        &kcs,
    ]);
    assert!(ok, "{status}{err}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let prepared = status["roots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["state"] == "prepared")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut replicas: Vec<&str> = status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["replica"].as_str().unwrap())
        .collect();
    replicas.sort();
    assert_eq!(replicas, ["replica-a", "replica-b"]);

    // A replica that stopped reporting a minute ago.
    let stale =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(60);
    let ghost = Lease {
        metadata: ObjectMeta {
            name: Some("meshid-replica-ghost".into()),
            labels: Some(BTreeMap::from([(
                REPLICA_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                STATUS_ANNOTATION.to_owned(),
                serde_json::to_string(&status["servers"][0]).unwrap(),
            )])),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("ghost".into()),
            lease_duration_seconds: Some(10),
            renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                stale,
            )),
            ..Default::default()
        }),
    };
    leases.create(&PostParams::default(), &ghost).await.unwrap();
    let (ok, refused) = cli(&["root", "activate", &prepared]);
    assert!(
        !ok && refused.contains("ghost") && refused.contains("stopped reporting"),
        "{refused}"
    );
    leases
        .delete("meshid-replica-ghost", &Default::default())
        .await
        .unwrap();
    // The replicas report the prepared root at their next heartbeat (every 2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let activated = loop {
        let (ok, out) = cli(&["root", "activate", &prepared]);
        if ok {
            break out;
        }
        assert!(
            out.contains("does not serve root") && Instant::now() < deadline,
            "{out}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        !activated.contains("propagation was not checked"),
        "{activated}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let generation = |s: &TestServer| s.running.live.current().generation.0;
    while generation(&a) < 3 || generation(&b) < 3 {
        assert!(
            Instant::now() < deadline,
            "both replicas run the activation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.running.shutdown().await;
    b.running.shutdown().await;
    // A replica that stops deletes its Lease.
    assert!(leases.list(&listed).await.unwrap().items.is_empty());
}
