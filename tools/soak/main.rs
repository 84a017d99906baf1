//! The soak (`tools/soak`): a release `meshid server` process on 127.0.0.1 holding N SDS proxies
//! (default 10,000, each its own TLS connection and StreamSecrets stream for `default` + `ROOTCA`
//! that ACKs like Envoy, reconnecting as Envoy does when the server ends a stream at its maximum
//! age) under a steady CSR load, while the root rotates (default twice: prepare → every proxy
//! has the bundle → activate → every proxy on the new signer → taint → revoke), for a
//! configurable time. Every sample interval it records proxies held, CSRs served, errors,
//! CSR latency p50/p99 and the server's RSS, writes them as CSV, and at the end draws them as a
//! PNG (`tools/soak/plot.rs`) and prints the summary: proxies held, requests served, errors
//! (must be 0: the exit code is 1 otherwise) and the RSS slope after the proxies connected.
//!
//! Run: `cargo bench --bench soak -- --duration 10m --proxies 10000 --csr-rate 20 --out target/soak`
//! (also `--sample 5s`, `--rotations 2`, `--in-flight 512`).

#[path = "../bench/common.rs"]
mod common;
#[path = "../bench/lean.rs"]
mod lean;
mod plot;
#[path = "../bench/server_proc.rs"]
mod server_proc;

use std::{
    io::Write,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::{arg, percentile, rss_kib};
use meshid::{
    api::{
        client::{connect, BearerToken},
        istio::{
            istio_certificate_service_client::IstioCertificateServiceClient,
            IstioCertificateRequest,
        },
    },
    identity::dev_issuer::TokenRequest,
    rotation::{self, Candidate, Ctx, HttpStatus},
    state::DirStore,
};
use server_proc::{init_ca, init_issuer, start_server};
use tonic::service::interceptor::InterceptedService;

#[derive(Default)]
struct Counters {
    /// Proxies holding an open stream now.
    held: AtomicUsize,
    /// Streams the server ended gracefully (maximum age) that the proxy re-opened.
    reconnects: AtomicU64,
    /// CSRs answered with a certificate.
    served: AtomicU64,
    /// Every failure: a CSR refused or failed, a stream that broke, a reconnect refused, a
    /// rotation step that did not complete.
    errors: AtomicU64,
    /// Latencies of the CSRs of the current sample.
    latencies: Mutex<Vec<Duration>>,
    /// What failed, for the report (the first 20).
    why: Mutex<Vec<String>>,
}

impl Counters {
    fn error(&self, why: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut w = self.why.lock().unwrap();
        if w.len() < 20 {
            w.push(why);
        }
    }
}

fn main() {
    let duration = meshid::duration::parse_duration(&arg("--duration", "10m".to_string()))
        .expect("--duration like 10m");
    let n: usize = arg("--proxies", 10_000);
    let csr_rate: f64 = arg("--csr-rate", 20.0);
    let sample = meshid::duration::parse_duration(&arg("--sample", "5s".to_string()))
        .expect("--sample like 5s");
    let rotations: usize = arg("--rotations", 2);
    let in_flight: usize = arg("--in-flight", 512);
    let out = std::path::PathBuf::from(arg("--out", "target/soak".to_string()));
    std::fs::create_dir_all(&out).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let root_pem = init_ca(dir.path());
    let issuer = init_issuer(dir.path(), None);
    let server = start_server(dir.path(), &dir.path().join("issuer"), "");
    let pid = server.child.id();
    let status = HttpStatus::new(&server.http).unwrap();
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..100)
            .map(|i| {
                let req = TokenRequest {
                    namespace: "soak".into(),
                    service_account: format!("sa-{i}"),
                    audiences: vec!["istio-ca".into()],
                    ttl: duration + Duration::from_secs(3600),
                    pod: None,
                };
                issuer.token(&req, time::OffsetDateTime::now_utc()).unwrap()
            })
            .collect(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let c = Arc::new(Counters::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr: std::net::SocketAddr = server.grpc.trim_start_matches("https://").parse().unwrap();
    let tls = common::client_tls(root_pem.as_bytes(), true);
    let started = Instant::now();
    let minutes = move |t: Instant| t.duration_since(started).as_secs_f64() / 60.0;

    println!(
        "soak: {n} SDS proxies, {csr_rate} CSR/s, {rotations} root rotations, {} s",
        duration.as_secs()
    );
    // The proxies.
    rt.block_on(async {
        let handshakes = Arc::new(tokio::sync::Semaphore::new(in_flight));
        for i in 0..n {
            let (tokens, tls, c, stop, handshakes) = (
                tokens.clone(),
                tls.clone(),
                c.clone(),
                stop.clone(),
                handshakes.clone(),
            );
            tokio::spawn(async move {
                let token = tokens[i % tokens.len()].clone();
                while !stop.load(Ordering::Relaxed) {
                    // The permit bounds handshakes in flight; it goes at the first response.
                    let mut permit = Some(handshakes.clone().acquire_owned().await.unwrap());
                    let mut s = match lean::SdsStream::open(
                        addr,
                        tls.clone(),
                        &token,
                        &["default", "ROOTCA"],
                    )
                    .await
                    {
                        Ok(s) => s,
                        Err(e) => {
                            c.error(format!("proxy {i}: connect: {e}"));
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    let mut got = 0;
                    while let Some(resp) = s.next().await {
                        s.ack(&resp);
                        got += 1;
                        if got == 1 {
                            permit.take();
                            c.held.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    drop(permit);
                    if got > 0 {
                        c.held.fetch_sub(1, Ordering::Relaxed);
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    // The server ended the stream: at its maximum age that is graceful and the
                    // proxy reconnects (as Envoy does); anything else is an error.
                    if got > 0 {
                        c.reconnects.fetch_add(1, Ordering::Relaxed);
                    } else {
                        c.error(format!("proxy {i}: the stream ended before any response"));
                    }
                }
            });
        }
        let t = Instant::now();
        while c.held.load(Ordering::Relaxed) < n {
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "only {} of {n} proxies connected within 300 s",
                c.held.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "soak: {n} proxies connected in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    });
    let connected_at = Instant::now();

    // The CSR load: one request every 1/rate s, at most 32 in flight.
    let csrs: Arc<Vec<String>> = Arc::new(
        (0..256)
            .map(|_| {
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                let mut p = rcgen::CertificateParams::default();
                p.distinguished_name = rcgen::DistinguishedName::new();
                p.serialize_request(&key).unwrap().pem().unwrap()
            })
            .collect(),
    );
    {
        let (c, stop, tokens, csrs, grpc, root_pem) = (
            c.clone(),
            stop.clone(),
            tokens.clone(),
            csrs.clone(),
            server.grpc.clone(),
            root_pem.clone(),
        );
        rt.spawn(async move {
            let ch = connect(&grpc, Some(root_pem.as_bytes()), "localhost")
                .await
                .unwrap();
            let slots = Arc::new(tokio::sync::Semaphore::new(32));
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / csr_rate.max(0.01)));
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let permit = slots.clone().acquire_owned().await.unwrap();
                let (ch, c, token, csr) = (
                    ch.clone(),
                    c.clone(),
                    tokens[i % tokens.len()].clone(),
                    csrs[i % csrs.len()].clone(),
                );
                i += 1;
                tokio::spawn(async move {
                    let _permit = permit;
                    let auth = BearerToken::new(&token, None).unwrap();
                    let mut client =
                        IstioCertificateServiceClient::new(InterceptedService::new(ch, auth));
                    let t = Instant::now();
                    let r = client
                        .create_certificate(IstioCertificateRequest {
                            csr,
                            validity_duration: 0,
                            metadata: None,
                        })
                        .await;
                    match r {
                        Ok(_) => {
                            c.served.fetch_add(1, Ordering::Relaxed);
                            c.latencies.lock().unwrap().push(t.elapsed());
                        }
                        Err(s) => c.error(format!("CSR: {s:?}")),
                    }
                });
            }
        });
    }

    // The rotations, at even points of the run, on a thread of their own (they block).
    let markers: Arc<Mutex<Vec<(f64, String)>>> = Arc::default();
    let rotations_done: Arc<Mutex<Vec<f64>>> = Arc::default();
    let rotation_thread = {
        let (c, markers, done, status) = (
            c.clone(),
            markers.clone(),
            rotations_done.clone(),
            HttpStatus::new(&server.http).unwrap(),
        );
        let store = DirStore::new(dir.path().join("state"));
        std::thread::spawn(move || {
            let ctx = || {
                Ctx::new(
                    meshid::state::Actor::user("soak", "localhost"),
                    time::OffsetDateTime::now_utc(),
                    None,
                )
                .unwrap()
            };
            let wait = |what: &str, done: &dyn Fn(&rotation::RotationStatus) -> bool| -> bool {
                let t = Instant::now();
                while t.elapsed() < Duration::from_secs(180) {
                    if status.status().is_ok_and(|st| done(&st)) {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                c.error(format!("rotation: {what} not within 180 s"));
                false
            };
            for k in 1..=rotations {
                let at = started + duration.mul_f64(k as f64 / (rotations + 1) as f64);
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                let (old, next) = server_proc::rotation_pair(&store);
                markers
                    .lock()
                    .unwrap()
                    .push((minutes(Instant::now()), format!("ROTATION {k}")));
                let new = rotation::apply(&store, &ctx(), |s, cx| {
                    rotation::prepare(s, Candidate::Generated(next), cx)
                })
                .unwrap()
                .outcome
                .root;
                if !wait("every proxy ACKed the new bundle", &|st| {
                    st.root_propagated(&new).is_ok()
                }) {
                    continue;
                }
                rotation::apply(&store, &ctx(), |s, cx| {
                    rotation::activate(s, &new, false, &rotation::no_gate, cx)
                })
                .unwrap();
                if !wait("every proxy on the new signer", &|st| {
                    st.signer_propagated(&new).is_ok()
                }) {
                    continue;
                }
                rotation::apply(&store, &ctx(), |s, cx| rotation::taint(s, &old, cx)).unwrap();
                std::thread::sleep(Duration::from_secs(5));
                rotation::apply(&store, &ctx(), |s, cx| {
                    rotation::revoke(s, &old, true, Duration::from_secs(86_400), cx)
                })
                .unwrap();
                done.lock().unwrap().push(minutes(Instant::now()));
                println!(
                    "soak: rotation {k} done at {:.1} min ({old} -> {new})",
                    minutes(Instant::now())
                );
            }
        })
    };

    // The samples.
    let csv_path = out.join("soak.csv");
    let mut csv = std::fs::File::create(&csv_path).unwrap();
    writeln!(csv, "minutes,proxies_held,reconnects,csr_served,csr_per_s,errors,csr_p50_ms,csr_p99_ms,server_rss_mib,server_streams").unwrap();
    let mut rows: Vec<[f64; 9]> = Vec::new();
    let mut last_served = 0;
    while started.elapsed() < duration {
        std::thread::sleep(sample);
        let mut lat = std::mem::take(&mut *c.latencies.lock().unwrap());
        lat.sort();
        let (p50, p99) = if lat.is_empty() {
            (0.0, 0.0)
        } else {
            (
                percentile(&lat, 0.5).as_secs_f64() * 1e3,
                percentile(&lat, 0.99).as_secs_f64() * 1e3,
            )
        };
        let served = c.served.load(Ordering::Relaxed);
        let rate = (served - last_served) as f64 / sample.as_secs_f64();
        last_served = served;
        let rss = rss_kib(pid) as f64 / 1024.0;
        let streams = status
            .status()
            .map(|s| s.counts.streams as f64)
            .unwrap_or(-1.0);
        let row = [
            minutes(Instant::now()),
            c.held.load(Ordering::Relaxed) as f64,
            c.reconnects.load(Ordering::Relaxed) as f64,
            served as f64,
            rate,
            c.errors.load(Ordering::Relaxed) as f64,
            p50,
            p99,
            rss,
        ];
        writeln!(
            csv,
            "{:.3},{},{},{},{:.1},{},{:.2},{:.2},{:.1},{}",
            row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], streams
        )
        .unwrap();
        println!(
            "soak: {:6.2} min  proxies {:>6}  CSR {:>7} ({:5.1}/s, p50 {:6.1} ms, p99 {:6.1} ms)  errors {}  RSS {:6.1} MiB",
            row[0], row[1], row[3], row[4], p50, p99, row[5], rss
        );
        rows.push(row);
    }
    // The figures are the run's: taken before the load stops and the server is killed (a CSR
    // still in flight then is cut by the kill, not failed by the server).
    let errors = c.errors.load(Ordering::Relaxed);
    let served = c.served.load(Ordering::Relaxed);
    let why = c.why.lock().unwrap().clone();
    stop.store(true, Ordering::Relaxed);
    let _ = rotation_thread.join();
    std::thread::sleep(Duration::from_secs(2));
    drop(server);

    // RSS slope after the proxies connected: least squares over the samples since.
    let since = minutes(connected_at);
    let pts: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r[0] >= since)
        .map(|r| (r[0], r[8]))
        .collect();
    // And since the last rotation ended (a rotation re-keys every proxy: a step, not a trend).
    let settled = rotations_done
        .lock()
        .unwrap()
        .last()
        .copied()
        .unwrap_or(since);
    let late: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.0 >= settled).collect();
    let slope = fit(&pts);
    let late_slope = fit(&late);
    let mean_rss = pts.iter().map(|p| p.1).sum::<f64>() / pts.len().max(1) as f64;
    let min_held = rows
        .iter()
        .filter(|r| r[0] >= since)
        .map(|r| r[1])
        .fold(f64::MAX, f64::min);
    let marks = markers.lock().unwrap().clone();
    let t_max = rows.last().map_or(1.0, |r| r[0]);
    let series = |i: usize| rows.iter().map(|r| (r[0], r[i])).collect::<Vec<_>>();
    plot::draw(
        &out.join("soak.png"),
        &format!("MESHID SOAK: {n} SDS PROXIES, {csr_rate} CSR/S, {rotations} ROOT ROTATIONS"),
        &[
            plot::Panel {
                title: format!("SERVER RSS MIB (SLOPE {slope:+.2} MIB/MIN)"),
                series: vec![("RSS".into(), [200, 40, 40], series(8))],
            },
            plot::Panel {
                title: "CSR LATENCY MS".into(),
                series: vec![
                    ("P50".into(), [30, 140, 60], series(6)),
                    ("P99".into(), [220, 120, 0], series(7)),
                ],
            },
            plot::Panel {
                title: "CSR PER S, ERRORS (CUMULATIVE)".into(),
                series: vec![
                    ("CSR/S".into(), [40, 40, 40], series(4)),
                    ("ERRORS".into(), [220, 0, 0], series(5)),
                ],
            },
            plot::Panel {
                title: "SDS PROXIES HELD".into(),
                series: vec![("PROXIES".into(), [120, 60, 180], series(1))],
            },
        ],
        &marks,
        t_max,
    )
    .unwrap();
    println!("soak: summary");
    println!("  proxies held: {n} connected, at least {min_held:.0} held at every sample after; {} graceful reconnects (stream age)", c.reconnects.load(Ordering::Relaxed));
    println!(
        "  CSRs served: {served} ({:.1}/s)",
        served as f64 / duration.as_secs_f64()
    );
    println!("  root rotations: {}", marks.len());
    println!("  errors: {errors}");
    for w in &why {
        println!("    {w}");
    }
    println!(
        "  server RSS after connect: mean {mean_rss:.1} MiB, slope {slope:+.3} MiB/min ({:+.2} % of the mean per hour); since the last rotation ended ({settled:.1} min) {late_slope:+.3} MiB/min ({:+.2} %/h)",
        slope * 60.0 * 100.0 / mean_rss.max(1e-9),
        late_slope * 60.0 * 100.0 / mean_rss.max(1e-9)
    );
    println!(
        "  CSV {}  plot {}",
        csv_path.display(),
        out.join("soak.png").display()
    );
    if errors > 0 || min_held < n as f64 {
        std::process::exit(1);
    }
}

/// The least-squares slope of `pts` (value per minute); 0 with fewer than two points.
fn fit(pts: &[(f64, f64)]) -> f64 {
    let m = pts.len() as f64;
    if pts.len() < 2 {
        return 0.0;
    }
    let (sx, sy) = pts.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
    let (mx, my) = (sx / m, sy / m);
    let (num, den) = pts.iter().fold((0.0, 0.0), |a, p| {
        (a.0 + (p.0 - mx) * (p.1 - my), a.1 + (p.0 - mx).powi(2))
    });
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}
