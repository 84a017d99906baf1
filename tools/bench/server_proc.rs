#![allow(dead_code)]
//! A real `meshid server` process on 127.0.0.1 for the benchmarks that load a server.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use meshid::{
    ca::{cert, root, KeyType},
    identity::dev_issuer::DevIssuer,
    spiffe::TrustDomain,
    state::{CaState, DirStore, StateStore},
};

/// The trust domain and token issuer every benchmark uses.
pub const TD: &str = "cluster.local";
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A fresh CA in `dir/state` (an ECDSA P-256 root, meshid's default); its root PEM, also
/// written to `dir/root.pem`.
pub fn init_ca(dir: &Path) -> String {
    let td = TrustDomain::new(TD).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let ca = root::generate_root(&td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now).unwrap();
    DirStore::new(dir.join("state"))
        .compare_and_swap(None, &CaState::with_generated_root(td, &ca, now))
        .unwrap();
    let pem = cert::to_pem(&ca.cert);
    std::fs::write(dir.join("root.pem"), &pem).unwrap();
    pem
}

/// The id of the root that signs in `store` now, and a new generated root to rotate to.
pub fn rotation_pair(store: &DirStore) -> (String, root::NewCa) {
    let old = store
        .load_existing()
        .unwrap()
        .state
        .signing_root()
        .unwrap()
        .id
        .clone();
    let next = root::generate_root(
        &TrustDomain::new(TD).unwrap(),
        KeyType::EcdsaP256,
        root::DEFAULT_ROOT_TTL,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    (old, next)
}

/// The dev token issuer in `dir/issuer`: a generated P-256 key, or the PEM key at `key`.
pub fn init_issuer(dir: &Path, key: Option<&Path>) -> DevIssuer {
    DevIssuer::init(&dir.join("issuer"), ISSUER, key).unwrap()
}

/// The server process; killed when dropped.
pub struct ServerProc {
    pub child: Child,
    /// `https://127.0.0.1:PORT` (gRPC over TLS).
    pub grpc: String,
    /// `http://127.0.0.1:PORT` (metrics, health, status).
    pub http: String,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server binary: `MESHID_BENCH_BIN` (e.g. a previous release build, for a before/after
/// table), else the one cargo built with this benchmark.
pub fn server_bin() -> std::path::PathBuf {
    std::env::var_os("MESHID_BENCH_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_meshid").into())
}

/// The `[[clusters]]` table accepting tokens of the dev issuer in `issuer_dir` by its JWKS file.
pub fn jwks_cluster(issuer_dir: &std::path::Path) -> String {
    format!(
        "[[clusters]]\nname = \"bench\"\n[clusters.jwks]\nissuer = {ISSUER:?}\nfile = {:?}\n",
        DevIssuer::jwks_path(issuer_dir)
    )
}

/// Starts `meshid server` on ephemeral loopback ports with its state in `dir/state`, accepting
/// tokens of the dev issuer in `issuer_dir`; `extra` is TOML appended to the config (tables).
pub fn start_server(
    dir: &std::path::Path,
    issuer_dir: &std::path::Path,
    extra: &str,
) -> ServerProc {
    start_server_with(dir, &jwks_cluster(issuer_dir), extra)
}

/// Like `start_server`, with `clusters` (TOML `[[clusters]]` tables) deciding how tokens are
/// validated.
pub fn start_server_with(dir: &std::path::Path, clusters: &str, extra: &str) -> ServerProc {
    let cfg = format!(
        "state_dir = {:?}\nstate_poll_interval = \"1s\"\n[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n[logging]\nlevel = \"warn\"\n{clusters}{extra}",
        dir.join("state"),
    );
    std::fs::write(dir.join("meshid.toml"), cfg).unwrap();
    let mut child = Command::new(server_bin())
        .args([
            "server",
            "--config",
            dir.join("meshid.toml").to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start meshid server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    // "meshid server: gRPC (TLS) on 127.0.0.1:PORT, HTTP on 127.0.0.1:PORT"
    let grpc = line
        .split("on ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .expect("server address line")
        .trim()
        .to_owned();
    let http = line
        .split("HTTP on ")
        .nth(1)
        .expect("server HTTP address")
        .trim()
        .to_owned();
    ServerProc {
        child,
        grpc: format!("https://{grpc}"),
        http: format!("http://{http}"),
    }
}
