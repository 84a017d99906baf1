// Each benchmark includes this file as a module and uses a subset of it.
#![allow(dead_code)]

//! Helpers the benchmarks share: flags, rate loops, and the raw ring ECDSA P-256 baseline.

use std::time::{Duration, Instant};

use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair},
};

/// The value after `name` on the command line (`-- --seconds 5`), or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `--seconds N` (default 3) as a measurement budget.
pub fn seconds_arg() -> Duration {
    Duration::from_secs_f64(arg("--seconds", 3.0))
}

/// Runs `op` (after a short warm-up) for about `budget`; operations per second.
pub fn rate(budget: Duration, mut op: impl FnMut(usize)) -> f64 {
    for i in 0..50 {
        op(i);
    }
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < budget {
        for _ in 0..64 {
            op(n);
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Raw ring ECDSA P-256 (sign/s, verify/s, and the rate of one verify + one sign) on one core,
/// over a message the size of a leaf's TBSCertificate.
pub fn ecdsa_p256_rates(budget: Duration) -> (f64, f64, f64) {
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let kp = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .unwrap();
    let msg = vec![0x5au8; 400];
    let sig = kp.sign(&rng, &msg).unwrap();
    let pk = signature::UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        kp.public_key().as_ref().to_vec(),
    );
    let sign = rate(budget, |_| {
        std::hint::black_box(kp.sign(&rng, std::hint::black_box(&msg)).unwrap());
    });
    let verify = rate(budget, |_| {
        pk.verify(
            std::hint::black_box(&msg),
            std::hint::black_box(sig.as_ref()),
        )
        .unwrap()
    });
    (sign, verify, 1.0 / (1.0 / sign + 1.0 / verify))
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) process `pid` has used.
pub fn cpu_secs(pid: u32) -> f64 {
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

/// The `p` quantile of `sorted` (zero when empty).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A client TLS config (ring, ALPN h2) trusting the roots in `root_pem`; `resume` keeps
/// rustls' session cache, off for a cold start where every handshake is a full one.
pub fn client_tls(root_pem: &[u8], resume: bool) -> std::sync::Arc<rustls::ClientConfig> {
    client_tls_with_suites(root_pem, resume, None)
}

/// [`client_tls`] offering only `suite` (when given).
pub fn client_tls_with_suites(
    root_pem: &[u8],
    resume: bool,
    suite: Option<rustls::SupportedCipherSuite>,
) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(only) = suite {
        provider.cipher_suites = vec![only];
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(root_pem) {
        roots.add(c.expect("root PEM")).expect("root certificate");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    std::sync::Arc::new(cfg)
}

/// A fresh TCP+TLS+HTTP/2 connection to `server` (from source address `src`, when given):
/// rustls and h2 directly, as lean per connection as a workload's own proxy. A tonic channel
/// would add its buffer and reconnect tasks, and the load generator, not the server, would set
/// the pace of a storm or a fan-out.
pub async fn h2_connect(
    server: std::net::SocketAddr,
    src: Option<std::net::IpAddr>,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> Result<h2::client::SendRequest<bytes::Bytes>, String> {
    let e = |e: std::io::Error| e.to_string();
    let sock = match server {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(e)?;
    if let Some(ip) = src {
        sock.bind(std::net::SocketAddr::new(ip, 0)).map_err(e)?;
    }
    let tcp = sock.connect(server).await.map_err(e)?;
    tcp.set_nodelay(true).map_err(e)?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(e)?;
    let (h2, conn) = h2::client::handshake(stream)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    h2.ready().await.map_err(|e| e.to_string())
}

/// The head of a gRPC call to `path` (`/package.Service/Method`) with a bearer token.
pub fn grpc_request(path: &str, token: &str) -> tonic::codegen::http::Request<()> {
    tonic::codegen::http::Request::post(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap()
}

/// One gRPC message frame: uncompressed, 4-byte big-endian length, then the message.
pub fn grpc_frame(msg: &impl prost::Message) -> bytes::Bytes {
    use bytes::BufMut;
    let mut b = bytes::BytesMut::with_capacity(5 + msg.encoded_len());
    b.put_u8(0);
    b.put_u32(msg.encoded_len() as u32);
    msg.encode(&mut b).unwrap();
    b.freeze()
}
