//! Server load benchmark, against a real `meshid server` process on 127.0.0.1:
//! (1) CSR issuance over gRPC+TLS with C concurrent callers, pre-made CSRs and tokens:
//!     certificates/s and p50/p99 latency, next to the raw ring ECDSA P-256 sign+verify rate
//!     measured in this run (the crypto-only ceiling for 2 cores is twice the one-core rate);
//! (2) SDS: N open StreamSecrets streams (default + ROOTCA): the server's RSS per stream, and
//!     the time from a trust-bundle change in the state store until every stream has it;
//! (3) root rotation with R streams open (default 1,000, each ACKing like Envoy), against a fresh
//!     server: the time from `prepare` (written to the store) until every stream has ACKed a
//!     bundle with the new root (aim < 1 s), and from `activate` until every stream runs on a leaf
//!     from the new signer (aim < 5 s including the 2 s `rotation.signer_change_spread`), both
//!     read from the server's own propagation status (`GET /debug/rotation`).
//!
//! Run: `cargo bench --bench server` (options after `--`: `--seconds 5 --concurrency 64
//! --streams 10000 --rotation-streams 1000`). The load generator shares the machine's cores with the server.

#[path = "common.rs"]
mod common;
#[path = "server_proc.rs"]
mod server_proc;

use common::arg;
use server_proc::start_server;
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::service::{
    discovery::v3::DiscoveryRequest,
    secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
};
use meshid::{
    api::{
        client::{connect, BearerToken},
        istio::{
            istio_certificate_service_client::IstioCertificateServiceClient,
            IstioCertificateRequest,
        },
        SECRET_TYPE_URL,
    },
    ca::{cert, root, KeyType},
    identity::dev_issuer::{DevIssuer, TokenRequest},
    spiffe::TrustDomain,
    state::{CaState, DirStore, RootOrigin, RootRecord, RootState, StateStore},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) the process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0 // utime, stime (fields 14, 15), in USER_HZ = 100
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let budget = Duration::from_secs_f64(arg("--seconds", 5.0));
    let concurrency: usize = arg("--concurrency", 64);
    let n_streams: usize = arg("--streams", 10_000);
    let rotation_streams: usize = arg("--rotation-streams", 1_000);

    let (sign, verify, one_core) = common::ecdsa_p256_rates(Duration::from_secs(2));
    let ceiling = 2.0 * one_core;

    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let ca = root::generate_root(&td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now).unwrap();
    let root_pem = cert::to_pem(&ca.cert);
    let store = DirStore::new(dir.path().join("state"));
    store
        .compare_and_swap(None, &CaState::with_generated_root(td.clone(), &ca, now))
        .unwrap();
    let issuer_dir = dir.path().join("issuer");
    let issuer = DevIssuer::init(
        &issuer_dir,
        "https://kubernetes.default.svc.cluster.local",
        None,
    )
    .unwrap();
    let server = start_server(dir.path(), &issuer_dir, "");
    let pid = server.child.id();
    let token = |i: usize| {
        let req = TokenRequest {
            namespace: "bench".into(),
            service_account: format!("sa-{i}"),
            audiences: vec!["istio-ca".into()],
            ttl: Duration::from_secs(7200),
            pod: None,
        };
        issuer.token(&req, time::OffsetDateTime::now_utc()).unwrap()
    };
    let tokens: Vec<String> = (0..100).map(token).collect();
    let csrs: Vec<String> = (0..512)
        .map(|_| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.serialize_request(&key).unwrap().pem().unwrap()
        })
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // (1) CSR issuance.
        let channels: Vec<_> = futures::future::join_all((0..8).map(|_| connect(&server.grpc, Some(root_pem.as_bytes()), "localhost"))).await;
        let channels: Vec<_> = channels.into_iter().map(Result::unwrap).collect();
        let (tokens, csrs) = (Arc::new(tokens), Arc::new(csrs));
        let run = |secs: Duration| {
            let (channels, tokens, csrs) = (channels.clone(), tokens.clone(), csrs.clone());
            async move {
                let start = Instant::now();
                let workers: Vec<_> = (0..concurrency)
                    .map(|w| {
                        let ch = channels[w % channels.len()].clone();
                        let (tokens, csrs) = (tokens.clone(), csrs.clone());
                        tokio::spawn(async move {
                            let auth = BearerToken::new(&tokens[w % tokens.len()], None).unwrap();
                            let mut client = IstioCertificateServiceClient::new(InterceptedService::new(ch, auth));
                            let mut lat = Vec::new();
                            let mut i = w;
                            while start.elapsed() < secs {
                                let t = Instant::now();
                                let req = IstioCertificateRequest { csr: csrs[i % csrs.len()].clone(), validity_duration: 0, metadata: None };
                                client.create_certificate(req).await.unwrap();
                                lat.push(t.elapsed());
                                i += concurrency;
                            }
                            lat
                        })
                    })
                    .collect();
                let mut all = Vec::new();
                for w in workers {
                    all.extend(w.await.unwrap());
                }
                (all, start.elapsed())
            }
        };
        run(Duration::from_millis(500)).await; // warm-up: token cache, connections
        let cpu0 = cpu_secs(pid);
        let (mut lat, took) = run(budget).await;
        let server_cores = (cpu_secs(pid) - cpu0) / took.as_secs_f64();
        lat.sort();
        let issued = lat.len() as f64 / took.as_secs_f64();
        println!("meshid server benchmark (server process and load generator share 2 cores)");
        println!("  ring ECDSA P-256 sign (1 core)        {sign:>10.0} /s");
        println!("  ring ECDSA P-256 verify (1 core)      {verify:>10.0} /s");
        println!("  crypto ceiling, 1 verify + 1 sign, 2 cores {ceiling:>7.0} /s");
        println!(
            "  CSR issuance over gRPC+TLS, C={concurrency}     {issued:>8.0} /s   ratio {:.2} of the 2-core ceiling; p50 {:.2} ms, p99 {:.2} ms",
            issued / ceiling,
            percentile(&lat, 0.50).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3
        );
        println!(
            "    the server process used {server_cores:.2} cores: {:.2} of the crypto ceiling of the cores it had",
            issued / (server_cores * one_core)
        );

        // (2) SDS streams.
        let rss_before = rss_kib(pid);
        let per_conn = 100;
        let received = Arc::new(AtomicUsize::new(0));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Instant>();
        let mut keep = Vec::new();
        let opened = Instant::now();
        for c in 0..n_streams.div_ceil(per_conn) {
            let ch = connect(&server.grpc, Some(root_pem.as_bytes()), "localhost").await.unwrap();
            for s in 0..per_conn.min(n_streams - c * per_conn) {
                let auth = BearerToken::new(&tokens[(c * per_conn + s) % tokens.len()], None).unwrap();
                let mut client = SecretDiscoveryServiceClient::new(InterceptedService::new(ch.clone(), auth));
                let (tx, rx) = mpsc::channel(4);
                let first = DiscoveryRequest { resource_names: vec!["default".into(), "ROOTCA".into()], type_url: SECRET_TYPE_URL.into(), ..Default::default() };
                tx.send(first).await.unwrap();
                let (received, done_tx) = (received.clone(), done_tx.clone());
                keep.push(tokio::spawn(async move {
                    let mut inbound = client.stream_secrets(ReceiverStream::new(rx)).await.unwrap().into_inner();
                    let mut n = 0;
                    while let Ok(Some(resp)) = inbound.message().await {
                        n += 1;
                        let ack = DiscoveryRequest {
                            resource_names: vec!["default".into(), "ROOTCA".into()],
                            type_url: SECRET_TYPE_URL.into(),
                            response_nonce: resp.nonce.clone(),
                            version_info: resp.version_info.clone(),
                            ..Default::default()
                        };
                        let _ = tx.send(ack).await;
                        if n == 1 {
                            received.fetch_add(1, Ordering::SeqCst);
                        } else {
                            let _ = done_tx.send(Instant::now());
                        }
                    }
                }));
            }
        }
        while received.load(Ordering::SeqCst) < n_streams {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let open_time = opened.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_after = rss_kib(pid);
        println!(
            "  SDS: {n_streams} streams open (default + ROOTCA each) in {:.2} s; server RSS {} MiB -> {} MiB = {:.1} KiB per stream",
            open_time.as_secs_f64(),
            rss_before / 1024,
            rss_after / 1024,
            (rss_after.saturating_sub(rss_before)) as f64 / n_streams as f64
        );

        // A trust-bundle change: a second root lands in the store; the server polls every 100 ms.
        let current = store.load_existing().unwrap();
        let mut next = current.state.clone();
        let extra = root::generate_root(&td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, time::OffsetDateTime::now_utc()).unwrap();
        // Prepared: trusted by every peer, not signing (the first step of a rotation).
        next.roots.push(RootRecord::new(
            &extra.cert,
            RootState::Prepared,
            RootOrigin::Plugin,
            time::OffsetDateTime::now_utc(),
            None,
            None,
        ));
        store.compare_and_swap(Some(current.generation), &next).unwrap();
        let changed = Instant::now();
        let mut first = None;
        let mut last = changed;
        for _ in 0..n_streams {
            let t = tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await.expect("every stream gets the new bundle").unwrap();
            first.get_or_insert(t);
            last = last.max(t);
        }
        let first = first.unwrap();
        println!(
            "  bundle fan-out to {n_streams} streams: {:.3} s from the store write (poll interval 0.1 s), {:.3} s from first to last stream",
            (last - changed).as_secs_f64(),
            (last - first).as_secs_f64()
        );
        println!("  server RSS after fan-out: {} MiB", rss_kib(pid) / 1024);
        for k in keep {
            k.abort();
        }
    });
    drop(server);
    rotation_bench(rotation_streams, &rt);
}

/// (3): a fresh server with `n` Envoy-like streams; prepare and activate through the library,
/// timed until the server's propagation status says every stream has the new root / signer.
fn rotation_bench(n: usize, rt: &tokio::runtime::Runtime) {
    use meshid::rotation::{self, Candidate, Ctx, HttpStatus};
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let ca = root::generate_root(&td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now).unwrap();
    let root_pem = cert::to_pem(&ca.cert);
    let store = DirStore::new(dir.path().join("state"));
    store
        .compare_and_swap(None, &CaState::with_generated_root(td.clone(), &ca, now))
        .unwrap();
    let issuer_dir = dir.path().join("issuer");
    let issuer = DevIssuer::init(
        &issuer_dir,
        "https://kubernetes.default.svc.cluster.local",
        None,
    )
    .unwrap();
    let server = start_server(dir.path(), &issuer_dir, "");
    let status = HttpStatus::new(&server.http).unwrap();
    let tokens: Vec<String> = (0..100)
        .map(|i| {
            let req = TokenRequest {
                namespace: "bench".into(),
                service_account: format!("sa-{i}"),
                audiences: vec!["istio-ca".into()],
                ttl: Duration::from_secs(7200),
                pod: None,
            };
            issuer.token(&req, time::OffsetDateTime::now_utc()).unwrap()
        })
        .collect();
    let ctx = || {
        Ctx::new(
            meshid::state::Actor::user("bench", "localhost"),
            time::OffsetDateTime::now_utc(),
            None,
        )
        .unwrap()
    };
    // Polls the server's status until `done`, at most 60 s; the time it took.
    let until = |what: &str, done: &dyn Fn(&rotation::RotationStatus) -> bool| {
        let start = Instant::now();
        loop {
            if status.status().is_ok_and(|st| done(&st)) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{what}: not within 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let keep = rt.block_on(async {
        let mut keep = Vec::new();
        let per_conn = 100;
        for c in 0..n.div_ceil(per_conn) {
            let ch = connect(&server.grpc, Some(root_pem.as_bytes()), "localhost")
                .await
                .unwrap();
            for s in 0..per_conn.min(n - c * per_conn) {
                let auth =
                    BearerToken::new(&tokens[(c * per_conn + s) % tokens.len()], None).unwrap();
                let mut client =
                    SecretDiscoveryServiceClient::new(InterceptedService::new(ch.clone(), auth));
                let names = vec!["default".to_string(), "ROOTCA".to_string()];
                let (tx, rx) = mpsc::channel(4);
                let first = DiscoveryRequest {
                    resource_names: names.clone(),
                    type_url: SECRET_TYPE_URL.into(),
                    ..Default::default()
                };
                tx.send(first).await.unwrap();
                keep.push(tokio::spawn(async move {
                    let mut inbound = client
                        .stream_secrets(ReceiverStream::new(rx))
                        .await
                        .unwrap()
                        .into_inner();
                    while let Ok(Some(resp)) = inbound.message().await {
                        let ack = DiscoveryRequest {
                            resource_names: names.clone(),
                            type_url: SECRET_TYPE_URL.into(),
                            response_nonce: resp.nonce,
                            version_info: resp.version_info,
                            ..Default::default()
                        };
                        let _ = tx.send(ack).await;
                    }
                }));
            }
        }
        keep
    });
    let old = store
        .load_existing()
        .unwrap()
        .state
        .signing_root()
        .unwrap()
        .id
        .clone();
    until("every stream open and ACKed", &|st| {
        st.counts.streams == n
            && st.root_propagated(&old).is_ok()
            && st.signer_propagated(&old).is_ok()
    });

    let next = root::generate_root(
        &td,
        KeyType::EcdsaP256,
        root::DEFAULT_ROOT_TTL,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let applied = rotation::apply(&store, &ctx(), |s, c| {
        rotation::prepare(s, Candidate::Generated(next), c)
    })
    .unwrap();
    let new = applied.outcome.root;
    let prepared = until("every stream ACKs the new bundle", &|st| {
        st.root_propagated(&new).is_ok()
    });
    rotation::apply(&store, &ctx(), |s, c| {
        rotation::activate(s, &new, false, &rotation::no_gate, c)
    })
    .unwrap();
    let activated = until("every stream on the new signer", &|st| {
        st.signer_propagated(&new).is_ok()
    });
    println!(
        "  root rotation with {n} SDS streams (store poll 0.1 s, signer_change_spread 2 s): prepare -> every stream ACKed the new bundle {:.3} s (aim < 1 s); activate -> every stream on a leaf from the new signer {:.3} s (aim < 5 s)",
        prepared.as_secs_f64(),
        activated.as_secs_f64()
    );
    for k in keep {
        k.abort();
    }
    drop(server);
}
