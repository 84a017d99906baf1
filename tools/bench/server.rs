//! Server load benchmark, against a real `meshid server` process on 127.0.0.1:
//! (1) CSR issuance over gRPC+TLS with C concurrent callers, pre-made CSRs and tokens:
//!     certificates/s and p50/p99 latency, next to the raw ring ECDSA P-256 sign+verify rate
//!     measured in this run (the crypto-only ceiling for 2 cores is twice the one-core rate);
//! (2) SDS at mesh scale, against a fresh server: N proxies (default 10,000), each on its own TLS
//!     connection with one StreamSecrets stream for `default` + `ROOTCA` that ACKs like Envoy,
//!     connected concurrently: the time to connect them all, the server's RSS per proxy (aim
//!     <= 32 KiB), sampled over a hold (default 600 s; flat);
//! (3) then a root rotation on those proxies: `prepare` written to the store -> every proxy has the
//!     bundle with the new root (client side, aim <= 250 ms; the server watches its store), and
//!     `activate` -> every proxy has ACKed a leaf from the new signer (the server's own
//!     propagation status, `GET /debug/rotation`; aim < 5 s including the 2 s
//!     `rotation.signer_change_spread`).
//!
//! Run: `cargo bench --bench server` (options after `--`: `--seconds 5 --concurrency 64
//! --streams 10000 --in-flight 512 --hold 600`). The load generator shares the machine's cores
//! with the server.

#[path = "common.rs"]
mod common;
#[path = "server_proc.rs"]
mod server_proc;

#[path = "lean.rs"]
mod lean;

use common::{arg, cpu_secs, percentile, rss_kib};
use server_proc::{init_ca, init_issuer, start_server};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use meshid::{
    api::{
        client::{connect, BearerToken},
        istio::{
            istio_certificate_service_client::IstioCertificateServiceClient,
            IstioCertificateRequest,
        },
    },
    identity::dev_issuer::{DevIssuer, TokenRequest},
    state::DirStore,
};
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;

fn main() {
    let budget = Duration::from_secs_f64(arg("--seconds", 5.0));
    let concurrency: usize = arg("--concurrency", 64);
    let n_streams: usize = arg("--streams", 10_000);
    let in_flight: usize = arg("--in-flight", 512);
    let hold = Duration::from_secs_f64(arg("--hold", 600.0));

    let (sign, verify, one_core) = common::ecdsa_p256_rates(Duration::from_secs(2));
    let ceiling = 2.0 * one_core;

    let dir = tempfile::tempdir().unwrap();
    let root_pem = init_ca(dir.path());
    let issuer = init_issuer(dir.path(), None);
    let server = start_server(dir.path(), &dir.path().join("issuer"), "");
    let pid = server.child.id();
    let tokens = bench_tokens(&issuer, 100);
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
    let skip_csr = std::env::args().any(|a| a == "--mesh-only");
    rt.block_on(async {
        if skip_csr {
            return;
        }
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
        let profile = perf_record(pid, "csr", budget.min(Duration::from_secs(5)));
        let cpu0 = cpu_secs(pid);
        let (mut lat, took) = run(budget).await;
        let server_cores = (cpu_secs(pid) - cpu0) / took.as_secs_f64();
        lat.sort();
        finish_perf(profile);
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

    });
    drop(server);
    mesh_bench(n_streams, in_flight, hold, &rt);
}

/// One proxy's events, as the load generator saw them.
enum Seen {
    /// The first response (default + ROOTCA) arrived.
    Connected,
    /// A later response arrived at proxy `.0`.
    Update(usize, Instant),
}

/// (2) and (3): a fresh server with `n` proxies, each on its own TLS connection with one SDS
/// stream for `default` + `ROOTCA`, ACKing like Envoy. Connected concurrently (at most `in_flight`
/// handshakes at a time). Reports RSS per proxy, held for `hold`; then a root is prepared
/// (bundle fan-out) and activated (every proxy re-keyed), timed from the store write.
fn mesh_bench(n: usize, in_flight: usize, hold: Duration, rt: &tokio::runtime::Runtime) {
    use meshid::rotation::{self, Candidate, Ctx, HttpStatus};
    let dir = tempfile::tempdir().unwrap();
    let root_pem = init_ca(dir.path());
    let store = DirStore::new(dir.path().join("state"));
    let issuer = init_issuer(dir.path(), None);
    let server = start_server(dir.path(), &dir.path().join("issuer"), "");
    let pid = server.child.id();
    let status = HttpStatus::new(&server.http).unwrap();
    let tokens = Arc::new(bench_tokens(&issuer, 100));
    let ctx = || {
        Ctx::new(
            meshid::state::Actor::user("bench", "localhost"),
            time::OffsetDateTime::now_utc(),
            None,
        )
        .unwrap()
    };
    // Polls the server's status until `done`, at most 120 s; the time it took.
    let until = |what: &str, done: &dyn Fn(&rotation::RotationStatus) -> bool| {
        let start = Instant::now();
        loop {
            if status.status().is_ok_and(|st| done(&st)) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{what}: not within 120 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = rss_kib(pid);
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    let opened = Instant::now();
    let addr: std::net::SocketAddr = server.grpc.trim_start_matches("https://").parse().unwrap();
    let tls = common::client_tls(root_pem.as_bytes(), true);
    let keep = rt.block_on(async {
        let handshakes = Arc::new(tokio::sync::Semaphore::new(in_flight));
        let mut keep = Vec::new();
        for i in 0..n {
            let (tokens, seen_tx, handshakes) =
                (tokens.clone(), seen_tx.clone(), handshakes.clone());
            let tls = tls.clone();
            keep.push(tokio::spawn(async move {
                let mut permit = Some(handshakes.acquire_owned().await.unwrap());
                let token = &tokens[i % tokens.len()];
                let mut stream = lean::SdsStream::open(addr, tls, token, &["default", "ROOTCA"])
                    .await
                    .unwrap();
                let mut n = 0;
                while let Some(resp) = stream.next().await {
                    let at = Instant::now();
                    n += 1;
                    stream.ack(&resp);
                    if n == 1 {
                        // The permit bounded the handshake; the rest of the stream is free.
                        permit.take();
                        let _ = seen_tx.send(Seen::Connected);
                        continue;
                    }
                    let _ = seen_tx.send(Seen::Update(i, at));
                }
            }));
        }
        let mut connected = 0;
        while connected < n {
            match tokio::time::timeout(Duration::from_secs(120), seen_rx.recv()).await {
                Ok(Some(Seen::Connected)) => connected += 1,
                Ok(Some(Seen::Update(..))) => {}
                _ => panic!("only {connected} of {n} proxies connected within 120 s"),
            }
        }
        keep
    });
    let open_time = opened.elapsed();
    until("every proxy ACKed", &|st| st.counts.streams == n);
    std::thread::sleep(Duration::from_millis(500));
    let per_proxy = |rss: u64| rss.saturating_sub(rss_before) as f64 / n as f64;
    let rss_open = rss_kib(pid);
    println!(
        "  SDS at mesh scale: {n} proxies, each its own TLS connection with default + ROOTCA, connected concurrently ({in_flight} handshakes in flight) in {:.2} s ({:.0}/s)",
        open_time.as_secs_f64(),
        n as f64 / open_time.as_secs_f64()
    );
    println!(
        "    server RSS {} MiB -> {} MiB = {:.1} KiB per proxy (aim <= 32)",
        rss_before / 1024,
        rss_open / 1024,
        per_proxy(rss_open)
    );
    if !hold.is_zero() {
        let step = hold / 10;
        let mut samples = vec![per_proxy(rss_open)];
        for _ in 0..10 {
            std::thread::sleep(step);
            samples.push(per_proxy(rss_kib(pid)));
        }
        let max = samples.iter().cloned().fold(0.0, f64::max);
        let streams = status.status().map(|s| s.counts.streams).unwrap_or(0);
        println!(
            "    held {:.0} s: KiB per proxy at each tenth {:?}; max {max:.1} (aim <= 32, flat); {streams} streams still open",
            hold.as_secs_f64(),
            samples.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>()
        );
    }
    while seen_rx.try_recv().is_ok() {}

    // Updates until every proxy has had one: (first, last).
    let wait_updates = |seen_rx: &mut mpsc::UnboundedReceiver<Seen>, what: &str| {
        rt.block_on(async {
            let mut got = std::collections::HashSet::new();
            let (mut first, mut last) = (None, None::<Instant>);
            while got.len() < n {
                match tokio::time::timeout(Duration::from_secs(120), seen_rx.recv()).await {
                    Ok(Some(Seen::Update(i, t))) => {
                        if !got.insert(i) {
                            continue;
                        }
                        first.get_or_insert(t);
                        last = Some(last.map_or(t, |l| l.max(t)));
                    }
                    Ok(Some(Seen::Connected)) => {}
                    _ => panic!(
                        "{what}: only {} of {n} proxies updated within 120 s",
                        got.len()
                    ),
                }
            }
            (first.unwrap(), last.unwrap())
        })
    };
    let (old, next) = server_proc::rotation_pair(&store);
    let profile = perf_record(pid, "fanout", Duration::from_secs(2));
    let client_profile = perf_record(std::process::id(), "fanout-client", Duration::from_secs(2));
    if profile.is_some() {
        std::thread::sleep(Duration::from_millis(700)); // perf is attached before the write
    }
    let (server_cpu0, client_cpu0) = (cpu_secs(pid), cpu_secs(std::process::id()));
    let changed = Instant::now();
    let applied = rotation::apply(&store, &ctx(), |s, c| {
        rotation::prepare(s, Candidate::Generated(next), c)
    })
    .unwrap();
    let written = Instant::now();
    let new = applied.outcome.root;
    let (first, last) = wait_updates(&mut seen_rx, "bundle fan-out");
    let (server_cpu, client_cpu) = (
        cpu_secs(pid) - server_cpu0,
        cpu_secs(std::process::id()) - client_cpu0,
    );
    finish_perf(profile);
    finish_perf(client_profile);
    println!(
        "    bundle fan-out (a root prepared): every proxy has the new bundle {:.3} s after the store write (aim <= 0.250), first to last {:.3} s; store write took {:.3} s",
        (last - written).as_secs_f64(),
        (last - first).as_secs_f64(),
        (written - changed).as_secs_f64()
    );
    println!(
        "      CPU during the fan-out: server {server_cpu:.2} s, load generator {client_cpu:.2} s ({:.0} + {:.0} us per proxy)",
        server_cpu * 1e6 / n as f64,
        client_cpu * 1e6 / n as f64
    );
    let acked = until("every proxy ACKs the new bundle", &|st| {
        st.root_propagated(&new).is_ok()
    });
    println!(
        "    server status: every proxy ACKed the new bundle {:.3} s after the fan-out ended",
        acked.as_secs_f64()
    );
    assert!(
        st_signer(&status) == old,
        "the old root still signs before activation"
    );
    rotation::apply(&store, &ctx(), |s, c| {
        rotation::activate(s, &new, false, &rotation::no_gate, c)
    })
    .unwrap();
    let on_new = until("every proxy on the new signer", &|st| {
        st.signer_propagated(&new).is_ok()
    });
    println!(
        "    root activated: every proxy re-keyed and ACKed a leaf from the new signer {:.3} s after the store write (server status; signer_change_spread 2 s included; aim < 5 s)",
        on_new.as_secs_f64()
    );
    println!(
        "    server RSS after rotation: {:.1} KiB per proxy",
        per_proxy(rss_kib(pid))
    );
    for k in keep {
        k.abort();
    }
    drop(server);
}

/// With `MESHID_BENCH_PERF_DIR` set: `perf record -g` on the server for `secs`, into
/// `<dir>/<what>.data` (the profiles in the issue 13 note were taken this way).
fn perf_record(pid: u32, what: &str, secs: Duration) -> Option<std::process::Child> {
    let dir = std::env::var_os("MESHID_BENCH_PERF_DIR")?;
    let out = std::path::Path::new(&dir).join(format!("{what}.data"));
    std::process::Command::new("perf")
        .args(["record", "-F", "999", "-g", "-o"])
        .arg(&out)
        .args([
            "-p",
            &pid.to_string(),
            "--",
            "sleep",
            &format!("{}", secs.as_secs_f64()),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .inspect_err(|e| eprintln!("perf record: {e}"))
        .ok()
}

fn finish_perf(child: Option<std::process::Child>) {
    if let Some(mut c) = child {
        let _ = c.wait();
    }
}

/// `n` tokens of distinct service accounts in namespace `bench`, for the CA's audience.
fn bench_tokens(issuer: &DevIssuer, n: usize) -> Vec<String> {
    (0..n)
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
        .collect()
}

fn st_signer(status: &meshid::rotation::HttpStatus) -> String {
    status.status().map(|s| s.signer).unwrap_or_default()
}
