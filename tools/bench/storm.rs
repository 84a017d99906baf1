//! Cold-start storm, against a real `meshid server` process on 127.0.0.1: N distinct workloads
//! (a cluster-wide restart, a node-pool upgrade), each with its own identity (namespace and
//! service account), its own token (no token-cache hit), its own P-256 CSR and its OWN TLS
//! connection (a fresh tonic Channel, dropped afterwards), call Istio's `CreateCertificate` as
//! fast as the server takes them, `--in-flight` at a time. Tokens and CSRs are made before the
//! clock starts (that work happens on the workloads' own nodes). Each workload is timed from
//! connect to certified; every reply is checked afterwards (the chain parses and verifies up to
//! the root, the leaf's only URI SAN is that workload's SPIFFE ID), and the server's own
//! `meshid_certs_issued_total{api="csr"}` must equal what the bench counted.
//!
//! Next to each figure: the crypto ceiling of the server's work per workload, measured in this
//! run on one core: the server side of a TLS handshake (rustls over memory buffers, meshid's own
//! `tls::grpc_server_config`, a serving key of the type the real server presented, the cipher
//! suite and key-exchange group the real run negotiated; only the server's calls are timed) +
//! the token's signature check (ring, ES256 or RS256) + the CSR's signature check (ECDSA P-256) +
//! the leaf's signature (ECDSA P-256, the CA key type of this bench). The aim (issue 13): at
//! least 0.5 of the 2-core ceiling, and 10,000 workloads in under 5 s, with the load generator
//! on the same 2 cores.
//!
//! Modes, each against a fresh server (`--modes es256,rs256,local,tokenreview`):
//! - `es256`: tokens from the dev issuer's default ECDSA P-256 key, checked by the JWKS file;
//! - `rs256`: an RSA-2048 issuer key (Kubernetes' default; made with the `openssl` CLI, since
//!   ring cannot generate RSA keys), checked by the JWKS file;
//! - `local`: `[clusters.tokenreview] mode = "local"` against the fake kube-apiserver: tokens
//!   bound to pods, the server's own metadata watch of the fake's pods and service accounts
//!   (one of each per workload) judges them; the fake counts the TokenReview calls (must be 0);
//!   all `--workloads`, like the JWKS modes;
//! - `tokenreview`: TokenReview against the fake kube-apiserver of the tests, with the server's
//!   default rate limit (`[clusters.tokenreview]` qps 50, burst 100) and the local signature
//!   pre-check against the API server's JWKS; `--tokenreview-workloads` (default 1,000, since
//!   50 qps makes 10,000 take 200 s). Then a variant where `--forged-share` (default 0.2) of the
//!   workloads present forged tokens (the genuine header and claims, signed by another P-256
//!   key): every forged one must be refused, and the fake counts the TokenReview calls made.
//!
//! Source addresses: in a cluster every pod connects from its own IP, and the server's
//! TokenReview limiter bounds each peer IP (`max_queue_per_peer`, 50). So each workload binds its
//! own loopback source address (127.1.x.y; all of 127/8 is local on Linux). `--one-source-ip`
//! sends the whole storm from 127.0.0.1 instead, to see what the per-peer bound does to it. The
//! bench sets no `[limits]` of its own: the server runs on its defaults.
//!
//! Client side: one shared rustls client config (ring, ALPN h2) with session resumption OFF (a
//! cold start has nothing to resume), so each connection is a full handshake; HTTP/2 and the
//! gRPC framing straight from h2 and prost, as lean per connection as a workload's own proxy.
//!
//! Run: `cargo bench --bench storm` (after `--`: `--workloads 10000 --in-flight 256
//! --modes es256,rs256,local,tokenreview --tokenreview-workloads 1000 --forged-share 0.2
//! --one-source-ip`). `MESHID_BENCH_BIN=/path/to/meshid` runs another server build.

#[path = "common.rs"]
mod common;
#[allow(dead_code)]
#[path = "../../tests/it/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "server_proc.rs"]
mod server_proc;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use common::{arg, cpu_secs, percentile, rate};
use meshid::{
    api::istio::{IstioCertificateRequest, IstioCertificateResponse},
    identity::dev_issuer::{DevIssuer, TokenRequest},
};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair},
};
use rustls::{ClientConnection, ServerConnection};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use server_proc::{init_ca, init_issuer, start_server_with, ServerProc, TD};

/// How tokens are made and checked.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Es256,
    Rs256,
    Local,
    TokenReview,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Es256 => "ES256 tokens, JWKS file",
            Mode::Rs256 => "RS256 (RSA-2048) tokens, JWKS file",
            Mode::Local => "local pod binding (API server's JWKS + own pod watch)",
            Mode::TokenReview => "TokenReview (fake kube-apiserver, default rate limit)",
        }
    }
}

/// One workload's credentials, made before the clock starts.
struct Workload {
    spiffe_id: String,
    token: String,
    csr: String,
    forged: bool,
}

/// What the storm did.
struct Storm {
    took: Duration,
    server_cpu: f64,
    /// CPU seconds of this process (the load generator; in TokenReview mode also the fake
    /// kube-apiserver).
    client_cpu: f64,
    /// The kernel's ListenOverflows during the storm (system-wide).
    listen_overflows: u64,
    latencies: Vec<Duration>,
    /// Of the certified ones: the part until TCP, TLS and HTTP/2 were up.
    connect: Vec<Duration>,
    /// (workload, cert_chain) of every certified workload.
    certified: Vec<(usize, Vec<String>)>,
    /// (workload, gRPC code, message) of every refused one.
    refused: Vec<(usize, tonic::Code, String)>,
}

/// Seconds of one core per workload for each piece of the server's crypto.
struct Ceiling {
    handshake: f64,
    token: f64,
    csr: f64,
    sign: f64,
    tls: String,
}

impl Ceiling {
    fn one_core(&self) -> f64 {
        1.0 / (self.handshake + self.token + self.csr + self.sign)
    }
}

struct Opts {
    in_flight: usize,
    one_ip: bool,
    budget: Duration,
}

fn main() {
    let n: usize = arg("--workloads", 10_000);
    let tr_n: usize = arg("--tokenreview-workloads", 1_000);
    let forged_share: f64 = arg("--forged-share", 0.2);
    let modes: String = arg("--modes", "es256,rs256,local,tokenreview".to_string());
    let opts = Opts {
        in_flight: arg("--in-flight", 256),
        one_ip: std::env::args().any(|a| a == "--one-source-ip"),
        budget: Duration::from_secs_f64(arg("--seconds", 0.5)),
    };
    raise_nofile();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "meshid cold-start storm (server process and load generator share {} cores; server: {})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        server_proc::server_bin().display()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut rates = BTreeMap::new();
    for mode in modes.split(',').map(str::trim) {
        let mode = match mode {
            "es256" => Mode::Es256,
            "rs256" => Mode::Rs256,
            "local" => Mode::Local,
            "tokenreview" => Mode::TokenReview,
            other => panic!("--modes: unknown mode {other:?} (es256, rs256, local, tokenreview)"),
        };
        let mdir = dir.path().join(mode_dir(mode));
        std::fs::create_dir_all(&mdir).unwrap();
        let rate = match mode {
            Mode::Local => rt.block_on(local_run(&mdir, n, &opts)),
            Mode::TokenReview => {
                let r = rt.block_on(tokenreview_run(&mdir, tr_n, 0.0, &opts));
                if forged_share > 0.0 {
                    let forged_dir = dir.path().join("tokenreview-forged");
                    std::fs::create_dir_all(&forged_dir).unwrap();
                    rt.block_on(tokenreview_run(&forged_dir, tr_n, forged_share, &opts));
                }
                r
            }
            _ => {
                let issuer = make_issuer(&mdir, mode);
                let server =
                    start_server_with(&mdir, &server_proc::jwks_cluster(&mdir.join("issuer")), "");
                let workloads = make_workloads(&issuer, n, 0.0, false);
                rt.block_on(run_and_report(mode, &server, &mdir, &workloads, &opts))
            }
        };
        rates.insert(mode.name(), rate);
    }
    if rates.len() > 1 {
        println!("summary (certificates/s):");
        for (m, r) in rates {
            println!("  {m:<58} {r:>8.0}");
        }
    }
}

fn mode_dir(mode: Mode) -> &'static str {
    match mode {
        Mode::Es256 => "es256",
        Mode::Rs256 => "rs256",
        Mode::Local => "local",
        Mode::TokenReview => "tokenreview",
    }
}

// === setup ===

/// The token issuer of `mode` in `dir/issuer` (and the CA state beside it).
fn make_issuer(dir: &Path, mode: Mode) -> DevIssuer {
    init_ca(dir);
    let key = (mode == Mode::Rs256).then(|| rsa_key(dir));
    init_issuer(dir, key.as_deref())
}

/// An RSA-2048 key from the `openssl` CLI (ring verifies RSA but cannot generate it).
fn rsa_key(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("rsa-2048.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .output()
        .expect("the rs256 mode needs the openssl CLI to make an RSA-2048 key");
    assert!(
        out.status.success(),
        "openssl genpkey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// `n` workloads with distinct identities; `forged_share` of them (spread evenly) carry a token
/// whose signature is by another key. Made on every core.
/// `n` workloads; `bound`: each token bound to its own pod (`pod-<i>`, uid `pod-uid-<i>`).
fn make_workloads(issuer: &DevIssuer, n: usize, forged_share: f64, bound: bool) -> Vec<Workload> {
    let t = Instant::now();
    let forger = P256::new();
    let forged_every = (forged_share > 0.0).then(|| (1.0 / forged_share).round() as usize);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = n.div_ceil(threads).max(1);
    let mut all: Vec<Workload> = Vec::with_capacity(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|from| {
                let forger = &forger;
                s.spawn(move || {
                    (from..(from + chunk).min(n))
                        .map(|i| {
                            let forged = forged_every.is_some_and(|k| i % k == k - 1);
                            workload(issuer, i, forged.then_some(forger), bound)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            all.extend(h.join().unwrap());
        }
    });
    println!(
        "  {n} tokens and CSRs made in {:.1} s (before the clock starts)",
        t.elapsed().as_secs_f64()
    );
    all
}

fn workload(issuer: &DevIssuer, i: usize, forger: Option<&P256>, bound: bool) -> Workload {
    let (ns, sa) = workload_names(i);
    let req = TokenRequest {
        namespace: ns.clone(),
        service_account: sa.clone(),
        audiences: vec!["istio-ca".into()],
        ttl: Duration::from_secs(3600),
        pod: bound.then(|| (format!("pod-{i}"), format!("pod-uid-{i}"))),
    };
    let mut token = issuer.token(&req, time::OffsetDateTime::now_utc()).unwrap();
    if let Some(f) = forger {
        // The genuine header (alg, kid) and claims, signed by a key the issuer never had.
        let input = &token[..token.rfind('.').unwrap()];
        let sig = f.sign_fixed(input.as_bytes());
        token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
    }
    let spiffe_id = format!("spiffe://{TD}/ns/{ns}/sa/{sa}");
    // As istio-agent does: a fresh P-256 key, the SPIFFE ID as the CSR's URI SAN.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.clone().try_into().unwrap())];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    Workload {
        spiffe_id,
        token,
        csr,
        forged: forger.is_some(),
    }
}

/// Workload `i`'s namespace and service account.
fn workload_names(i: usize) -> (String, String) {
    (format!("storm-{}", i / 100), format!("sa-{i}"))
}

/// An ECDSA P-256 key pair for forging and for the ceiling.
struct P256 {
    rng: SystemRandom,
    fixed: EcdsaKeyPair,
}

impl P256 {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let fixed = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        Self { rng, fixed }
    }

    fn sign_fixed(&self, msg: &[u8]) -> Vec<u8> {
        self.fixed.sign(&self.rng, msg).unwrap().as_ref().to_vec()
    }
}

/// Raises this process's open-file limit to the hard limit (the server child inherits it).
fn raise_nofile() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let Some((soft, hard)) = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            Some((v.get(3)?.to_string(), v.get(4)?.to_string()))
        })
    else {
        return;
    };
    if soft != hard {
        // No libc call (and no unsafe) in a bench: util-linux's prlimit on our own pid.
        let ok = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard}:{hard}"))
            .status()
            .is_ok_and(|s| s.success());
        println!(
            "  open-file limit {soft} -> {hard}: {}",
            if ok {
                "raised"
            } else {
                "NOT raised (prlimit failed)"
            }
        );
    }
}

// === the storm ===

/// Workload `i`'s source address: its own (127.1.x.y), or 127.0.0.1 for all.
fn source(i: usize, one_ip: bool) -> IpAddr {
    if one_ip {
        return IpAddr::V4(Ipv4Addr::LOCALHOST);
    }
    IpAddr::V4(Ipv4Addr::new(
        127,
        1 + (i / 62_500) as u8,
        ((i / 250) % 250) as u8,
        (i % 250 + 1) as u8,
    ))
}

async fn storm(server: &ServerProc, root_pem: &str, w: &[Workload], opts: &Opts) -> Storm {
    let addr: SocketAddr = server.grpc.trim_start_matches("https://").parse().unwrap();
    let tls = common::client_tls(root_pem.as_bytes(), false);
    let w: Arc<Vec<(String, String)>> =
        Arc::new(w.iter().map(|w| (w.token.clone(), w.csr.clone())).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let pid = server.child.id();
    let one_ip = opts.one_ip;
    let cpu0 = cpu_secs(pid);
    let own0 = cpu_secs(std::process::id());
    let overflows0 = listen_overflows();
    let start = Instant::now();
    let tasks: Vec<_> = (0..opts.in_flight.min(w.len()))
        .map(|_| {
            let (w, next, tls) = (w.clone(), next.clone(), tls.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((token, csr)) = w.get(i) else {
                        return out;
                    };
                    let t = Instant::now();
                    let r = one_workload(addr, source(i, one_ip), tls.clone(), token, csr).await;
                    out.push((i, t.elapsed(), r));
                }
            })
        })
        .collect();
    let mut s = Storm {
        took: Duration::ZERO,
        server_cpu: 0.0,
        client_cpu: 0.0,
        listen_overflows: 0,
        latencies: Vec::new(),
        connect: Vec::new(),
        certified: Vec::new(),
        refused: Vec::new(),
    };
    for t in tasks {
        for (i, lat, r) in t.await.unwrap() {
            match r {
                Ok((connected, chain)) => {
                    s.latencies.push(lat);
                    s.connect.push(connected);
                    s.certified.push((i, chain));
                }
                Err((code, msg)) => s.refused.push((i, code, msg)),
            }
        }
    }
    s.took = start.elapsed();
    s.server_cpu = cpu_secs(pid) - cpu0;
    s.client_cpu = cpu_secs(std::process::id()) - own0;
    s.listen_overflows = listen_overflows().saturating_sub(overflows0);
    s.latencies.sort();
    s.connect.sort();
    s
}

async fn one_workload(
    addr: SocketAddr,
    src: IpAddr,
    tls: Arc<rustls::ClientConfig>,
    token: &str,
    csr: &str,
) -> Result<(Duration, Vec<String>), (tonic::Code, String)> {
    use bytes::BytesMut;
    use prost::Message;
    let t = Instant::now();
    let unavailable = |what: &str, e: String| (tonic::Code::Unavailable, format!("{what}: {e}"));
    let mut h2 = common::h2_connect(addr, Some(src), tls)
        .await
        .map_err(|e| unavailable("connect", e))?;
    let connected = t.elapsed();
    let req = common::grpc_request(
        "/istio.v1.auth.IstioCertificateService/CreateCertificate",
        token,
    );
    let (resp, mut send) = h2
        .send_request(req, false)
        .map_err(|e| unavailable("send", e.to_string()))?;
    let msg = IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: 0,
        metadata: None,
    };
    send.send_data(common::grpc_frame(&msg), true)
        .map_err(|e| unavailable("send", e.to_string()))?;
    let resp = resp
        .await
        .map_err(|e| unavailable("response", e.to_string()))?;
    // A refusal comes as Trailers-Only (the status in the headers) or in the trailers.
    let refused = |h: &tonic::codegen::http::HeaderMap| {
        tonic::Status::from_header_map(h)
            .filter(|s| s.code() != tonic::Code::Ok)
            .map(|s| (s.code(), s.message().to_owned()))
    };
    if let Some(r) = refused(resp.headers()) {
        return Err(r);
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| unavailable("body", e.to_string()))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
    match body.trailers().await {
        Ok(Some(trailers)) => {
            if let Some(r) = refused(&trailers) {
                return Err(r);
            }
        }
        Ok(None) => return Err(unavailable("trailers", "none".into())),
        Err(e) => return Err(unavailable("trailers", e.to_string())),
    }
    if buf.len() < 5 {
        return Err(unavailable("reply", "no message".into()));
    }
    let reply = IstioCertificateResponse::decode(&buf[5..])
        .map_err(|e| unavailable("reply", e.to_string()))?;
    Ok((connected, reply.cert_chain))
}

// === checks and report ===

/// Every reply: each PEM parses, each certificate is signed by the next, the last is our root,
/// and the leaf's only URI SAN is the workload's SPIFFE ID. The number of failures.
fn check_replies(s: &Storm, w: &[Workload], root_pem: &str) -> usize {
    let root_der = CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap();
    let mut bad = 0;
    for (i, chain) in &s.certified {
        if let Err(e) = check_chain(chain, &w[*i].spiffe_id, &root_der) {
            if bad < 5 {
                println!("  workload {i}: {e}");
            }
            bad += 1;
        }
    }
    bad
}

fn check_chain(chain: &[String], id: &str, root: &[u8]) -> Result<(), String> {
    let ders: Vec<Vec<u8>> = chain
        .iter()
        .flat_map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()))
        .map(|c| c.map(|c| c.to_vec()).map_err(|e| format!("PEM: {e:?}")))
        .collect::<Result<_, _>>()?;
    if ders.last().map(Vec::as_slice) != Some(root) {
        return Err("the chain does not end with the root".into());
    }
    let certs: Vec<_> = ders
        .iter()
        .map(|d| x509_parser::parse_x509_certificate(d).map(|(_, c)| c))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("X.509: {e}"))?;
    for pair in certs.windows(2) {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .map_err(|e| format!("signature of {}: {e}", pair[0].subject()))?;
    }
    let uris: Vec<String> = certs[0]
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris != [id] {
        return Err(format!("leaf URI SANs {uris:?}, expected [{id}]"));
    }
    Ok(())
}

/// The kernel's `TcpExt: ListenOverflows` (connections dropped because a listener's accept
/// queue was full).
fn listen_overflows() -> u64 {
    let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut tcp_ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (tcp_ext.next(), tcp_ext.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// `meshid_certs_issued_total{api="csr"}` from the server's /metrics (0 before the first).
async fn issued_metric(server: &ServerProc) -> f64 {
    let addr = server.http.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut body = String::new();
    tcp.read_to_string(&mut body).await.unwrap();
    assert!(
        body.starts_with("HTTP/1.1 200"),
        "GET /metrics: {}",
        body.lines().next().unwrap_or("")
    );
    body.lines()
        .find_map(|l| l.strip_prefix("meshid_certs_issued_total{api=\"csr\"} "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The storm against `server` and its report; certificates/s.
async fn run_and_report(
    mode: Mode,
    server: &ServerProc,
    dir: &Path,
    w: &[Workload],
    opts: &Opts,
) -> f64 {
    let root_pem = std::fs::read_to_string(dir.join("root.pem")).unwrap();
    let tls = common::client_tls(root_pem.as_bytes(), false);
    let c = ceiling(mode, server, dir, tls.clone(), w, opts.budget).await;
    let before = issued_metric(server).await;
    let s = storm(server, &root_pem, w, opts).await;
    let issued = issued_metric(server).await - before;
    let n = w.len();
    let ok = s.certified.len();
    let rate = ok as f64 / s.took.as_secs_f64();
    let (one, two) = (c.one_core(), 2.0 * c.one_core());
    let forged = w.iter().filter(|w| w.forged).count();
    println!(
        "storm, {}: {n} workloads{}, {} in flight, one TLS connection each, {}",
        mode.name(),
        if forged > 0 {
            format!(" ({forged} with forged tokens)")
        } else {
            String::new()
        },
        opts.in_flight,
        if opts.one_ip {
            "all from 127.0.0.1"
        } else {
            "each from its own 127.1.x.y"
        }
    );
    println!(
        "  crypto per workload on 1 core (this run): TLS handshake, server side {:.3} ms ({}) + token {} {:.3} ms + CSR verify {:.3} ms + leaf sign {:.3} ms",
        c.handshake * 1e3,
        c.tls,
        if mode == Mode::Rs256 { "RS256 verify" } else { "ES256 verify" },
        c.token * 1e3,
        c.csr * 1e3,
        c.sign * 1e3
    );
    println!(
        "  crypto ceiling: 1 core {one:>7.0} /s, 2 cores {two:>7.0} /s  (10,000 at the 2-core ceiling: {:.2} s; aim < 5 s)",
        10_000.0 / two
    );
    println!(
        "  {ok} of {n} certified in {:.2} s: {rate:>7.0} certificates/s  ratio {:.2} of the 2-core ceiling (aim >= 0.5); 10,000 at this rate: {:.2} s (aim < 5 s)",
        s.took.as_secs_f64(),
        rate / two,
        10_000.0 / rate
    );
    println!(
        "  connect->certified p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (of which TCP+TLS+HTTP/2 up: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms)",
        percentile(&s.latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&s.latencies, 0.99).as_secs_f64() * 1e3,
        s.latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        percentile(&s.connect, 0.50).as_secs_f64() * 1e3,
        percentile(&s.connect, 0.99).as_secs_f64() * 1e3,
        s.connect.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    // A TCP SYN lost to a full accept queue is retried after 1 s: such stalls show here.
    let slow = s
        .latencies
        .iter()
        .filter(|l| l.as_secs_f64() >= 1.0)
        .count();
    if slow > 0 || s.listen_overflows > 0 {
        println!(
            "  {slow} workloads took 1 s or more; the kernel counted {} listen-queue overflows meanwhile (TcpExt ListenOverflows, system-wide: each drops a SYN that is resent 1 s later)",
            s.listen_overflows
        );
    }
    let cores = s.server_cpu / s.took.as_secs_f64();
    println!(
        "  server process: {:.2} CPU s ({cores:.2} cores): {:.2} of the crypto ceiling of the cores it used; the load generator: {:.2} CPU s ({:.2} cores)",
        s.server_cpu,
        ok as f64 / (s.server_cpu * one),
        s.client_cpu,
        s.client_cpu / s.took.as_secs_f64()
    );
    report_refusals(&s, w);
    let bad = check_replies(&s, w, &root_pem);
    println!(
        "  checked: {} replies {}; server meshid_certs_issued_total{{api=\"csr\"}} +{issued} vs {ok} counted {}",
        ok,
        if bad == 0 { "all good (chain verifies to the root, leaf URI SAN = the workload's SPIFFE ID)".to_string() } else { format!("{bad} BAD") },
        if issued as usize == ok { "(equal)" } else { "(DIFFERENT)" }
    );
    rate
}

fn report_refusals(s: &Storm, w: &[Workload]) {
    let mut by: BTreeMap<(bool, String), (usize, String)> = BTreeMap::new();
    for (i, code, msg) in &s.refused {
        let e = by
            .entry((w[*i].forged, format!("{code:?}")))
            .or_insert((0, msg.clone()));
        e.0 += 1;
    }
    let forged = w.iter().filter(|w| w.forged).count();
    let forged_certified = s.certified.iter().filter(|(i, _)| w[*i].forged).count();
    if forged > 0 {
        println!(
            "  forged tokens: {forged} presented, {forged_certified} certified{}",
            if forged_certified == 0 {
                " (every one refused)"
            } else {
                " (FORGED TOKENS ACCEPTED)"
            }
        );
    }
    for ((f, code), (count, msg)) in by {
        println!(
            "  refused{}: {count} x {code} (e.g. {msg:?})",
            if f { " (forged)" } else { " (GENUINE)" }
        );
    }
}

// === TokenReview ===

/// The TokenReview mode with `forged_share` of forged tokens: a fresh fake apiserver and server.
async fn tokenreview_run(dir: &Path, n: usize, forged_share: f64, opts: &Opts) -> f64 {
    let api = fake_apiserver::FakeApiServer::start().await;
    let issuer = make_issuer(dir, Mode::Es256);
    api.set_jwks(&issuer.jwks());
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig_yaml()).unwrap();
    // The server's defaults for everything else: qps 50, burst 100, local signature pre-check.
    let clusters = format!(
        "[[clusters]]\nname = \"bench\"\n[clusters.tokenreview]\nkubeconfig = {kubeconfig:?}\n"
    );
    let server = start_server_with(dir, &clusters, "");
    let w = make_workloads(&issuer, n, forged_share, false);
    let rate = run_and_report(Mode::TokenReview, &server, dir, &w, opts).await;
    let genuine = w.iter().filter(|w| !w.forged).count();
    println!(
        "  TokenReview calls the fake kube-apiserver got: {} for {genuine} genuine workloads{}",
        api.tokenreview_calls(),
        if forged_share > 0.0 {
            " (forged tokens never reached it: the local signature pre-check refused them)"
        } else {
            ""
        }
    );
    rate
}

// === local pod binding ===

/// The local mode: the fake holds each workload's pod and service account; the server watches
/// them (metadata only) and must judge every token itself.
async fn local_run(dir: &Path, n: usize, opts: &Opts) -> f64 {
    let api = fake_apiserver::FakeApiServer::start().await;
    let issuer = make_issuer(dir, Mode::Es256);
    api.set_jwks(&issuer.jwks());
    for i in 0..n {
        let (ns, sa) = workload_names(i);
        api.put(serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"namespace": ns, "name": sa,
                         "uid": meshid::identity::dev_issuer::service_account_uid(&ns, &sa)},
        }));
        api.put(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": ns, "name": format!("pod-{i}"), "uid": format!("pod-uid-{i}")},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "app"}]},
        }));
    }
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig_yaml()).unwrap();
    let clusters = format!(
        "[[clusters]]\nname = \"bench\"\n[clusters.tokenreview]\nkubeconfig = {kubeconfig:?}\nmode = \"local\"\n"
    );
    let server = start_server_with(dir, &clusters, "");
    // Synced once both watches are open: kube's watcher watches only after its list is done.
    let t = Instant::now();
    let watching = |path: &str| {
        api.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|(_, p, q)| p == path && q.contains("watch=true"))
    };
    while !(watching("/api/v1/pods") && watching("/api/v1/serviceaccounts")) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the server's pod and service-account watches did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "  the server listed {n} pods and {n} service accounts and watches them ({:.1} s after start)",
        t.elapsed().as_secs_f64()
    );
    let w = make_workloads(&issuer, n, 0.0, true);
    let rate = run_and_report(Mode::Local, &server, dir, &w, opts).await;
    let calls = api.tokenreview_calls();
    println!(
        "  TokenReview calls the fake kube-apiserver got: {calls} for {n} pod-bound workloads"
    );
    assert_eq!(calls, 0, "local mode judged every token itself");
    rate
}

// === the crypto ceiling ===

async fn ceiling(
    mode: Mode,
    server: &ServerProc,
    dir: &Path,
    tls: Arc<rustls::ClientConfig>,
    w: &[Workload],
    budget: Duration,
) -> Ceiling {
    // What the real server negotiates with our client: suite, group, serving key type.
    let addr: SocketAddr = server.grpc.trim_start_matches("https://").parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let conn = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let c = conn.get_ref().1;
    let real = negotiated(
        c.negotiated_cipher_suite(),
        c.negotiated_key_exchange_group(),
    );
    let suite = c.negotiated_cipher_suite().unwrap();
    let leaf = c.peer_certificates().unwrap()[0].to_vec();
    drop(conn);
    let key_alg = serving_key_alg(&leaf);
    // The client offers only the suite the real server chose, so the in-process handshake
    // costs what the real one does whatever the server under test prefers.
    let root_pem = std::fs::read(dir.join("root.pem")).unwrap();
    let only = common::client_tls_with_suites(&root_pem, false, Some(suite));
    let (hs, local) = handshake_secs(key_alg, &only, budget);
    assert_eq!(
        real, local,
        "the in-process handshake must negotiate what the real server does"
    );
    let token = token_verify_secs(mode, dir, &w[0].token, budget);
    let (sign, verify, _) = common::ecdsa_p256_rates(budget);
    Ceiling {
        handshake: hs,
        token,
        csr: 1.0 / verify,
        sign: 1.0 / sign,
        tls: format!("{real}, {key_alg:?} serving key"),
    }
}

fn negotiated(
    suite: Option<rustls::SupportedCipherSuite>,
    group: Option<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> String {
    format!(
        "{:?}, {:?}",
        suite.map(|s| s.suite()),
        group.map(|g| g.name())
    )
    .replace("Some(", "")
    .replace(')', "")
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ServingKey {
    EcdsaP256,
    EcdsaP384,
}

fn serving_key_alg(leaf: &[u8]) -> ServingKey {
    let (_, c) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let spki = c.public_key();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    match (
        spki.algorithm.algorithm.to_id_string().as_str(),
        curve.as_deref(),
    ) {
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => ServingKey::EcdsaP256,
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => ServingKey::EcdsaP384,
        (alg, curve) => panic!("serving key {alg} {curve:?}: not modelled by this bench"),
    }
}

/// Seconds of one core per full handshake, server side only, with meshid's gRPC server config
/// and a serving key of `key`'s type; and what was negotiated.
fn handshake_secs(
    key: ServingKey,
    client: &Arc<rustls::ClientConfig>,
    budget: Duration,
) -> (f64, String) {
    // A root and a "localhost" leaf, as the serving chain the real server sends (leaf + root).
    let alg = match key {
        ServingKey::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        ServingKey::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
    };
    let ca_key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate_for(alg).unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &rcgen::Issuer::new(ca_params, &ca_key))
        .unwrap();
    let key_der = PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der).unwrap();
    let ck = rustls::sign::CertifiedKey::new(vec![leaf.der().clone(), ca.der().clone()], signing);
    let rotating = Arc::new(meshid::tls::RotatingCert::new(Arc::new(ck)));
    let server_cfg = Arc::new(meshid::tls::grpc_server_config(rotating).unwrap());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    // The suites `client` offers (the one the real server chose).
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = client.crypto_provider().cipher_suites.clone();
    let mut client_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_cfg.alpn_protocols = client.alpn_protocols.clone();
    client_cfg.resumption = rustls::client::Resumption::disabled();
    let client_cfg = Arc::new(client_cfg);

    let mut server_time = Duration::ZERO;
    let mut count = 0u32;
    let mut what = String::new();
    let wall = Instant::now();
    while count < 20 || wall.elapsed() < budget {
        let (t, w) = one_handshake(&server_cfg, &client_cfg);
        if count >= 10 {
            server_time += t; // the first ten warm up
        }
        what = w;
        count += 1;
    }
    (server_time.as_secs_f64() / f64::from(count - 10), what)
}

/// One handshake over memory buffers; the time spent in the server's calls.
fn one_handshake(
    server_cfg: &Arc<rustls::ServerConfig>,
    client_cfg: &Arc<rustls::ClientConfig>,
) -> (Duration, String) {
    let mut client = ClientConnection::new(
        client_cfg.clone(),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let t = Instant::now();
    let mut server = ServerConnection::new(server_cfg.clone()).unwrap();
    let mut spent = t.elapsed();
    for _ in 0..10 {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server).unwrap();
        }
        let t = Instant::now();
        let mut rd = &to_server[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server.process_new_packets().unwrap();
        }
        let mut to_client = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut to_client).unwrap();
        }
        spent += t.elapsed();
        let mut rd = &to_client[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
        }
        if !server.is_handshaking() && !client.is_handshaking() && !client.wants_write() {
            break;
        }
    }
    assert!(
        !server.is_handshaking(),
        "in-process handshake did not finish"
    );
    let what = negotiated(
        server.negotiated_cipher_suite(),
        server.negotiated_key_exchange_group(),
    );
    (spent, what)
}

/// Seconds of one core for one token signature check of `mode`'s kind, over a real token's
/// signing input (ring, as the server's `jwt` module verifies).
fn token_verify_secs(mode: Mode, dir: &Path, token: &str, budget: Duration) -> f64 {
    let input = token.as_bytes()[..token.rfind('.').unwrap()].to_vec();
    let rng = SystemRandom::new();
    let (alg, public, sig): (
        &'static dyn signature::VerificationAlgorithm,
        Vec<u8>,
        Vec<u8>,
    ) = match mode {
        Mode::Rs256 => {
            let der = PrivateKeyDer::from_pem_file(dir.join("rsa-2048.pem")).unwrap();
            let kp = RsaKeyPair::from_pkcs8(der.secret_der()).unwrap();
            let mut sig = vec![0; kp.public().modulus_len()];
            kp.sign(&signature::RSA_PKCS1_SHA256, &rng, &input, &mut sig)
                .unwrap();
            let public = kp.public_key().as_ref().to_vec();
            (&signature::RSA_PKCS1_2048_8192_SHA256, public, sig)
        }
        Mode::Es256 | Mode::Local | Mode::TokenReview => {
            let k = P256::new();
            let public = k.fixed.public_key().as_ref().to_vec();
            (
                &signature::ECDSA_P256_SHA256_FIXED,
                public,
                k.sign_fixed(&input),
            )
        }
    };
    let pk = signature::UnparsedPublicKey::new(alg, public);
    1.0 / rate(budget, |_| {
        pk.verify(std::hint::black_box(&input), std::hint::black_box(&sig))
            .unwrap()
    })
}
