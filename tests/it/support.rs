//! Shared fixtures: authorities, CSRs, temp dirs, the openssl binary and the meshid binary.

use std::{path::Path, process::Command, sync::Arc};

use meshid::{
    ca::{root, Authority, IssuancePolicy, KeyType, SigningMaterial},
    clock::SystemClock,
    spiffe::{SpiffeId, TrustDomain},
};
use rcgen::{CertificateParams, KeyPair, SanType};
use time::OffsetDateTime;

pub fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

pub fn workload(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::for_service_account(&td(), ns, sa).unwrap()
}

/// An authority over a fresh self-signed root.
pub fn authority(key_type: KeyType) -> Authority {
    let ca = root::generate_root(
        &td(),
        key_type,
        root::DEFAULT_ROOT_TTL,
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    let material = SigningMaterial {
        signer_cert: ca.cert.clone(),
        signer_key: ca.key,
        intermediates: vec![],
        roots: vec![ca.cert],
    };
    Authority::new(
        td(),
        material,
        IssuancePolicy::default(),
        Arc::new(SystemClock),
    )
    .unwrap()
}

/// A PEM CSR from `key` asking for `sans` (URIs start with "spiffe:", IPs parse, else DNS).
pub fn csr(key: &KeyPair, sans: &[&str]) -> String {
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans
        .iter()
        .map(|s| {
            if s.starts_with("spiffe:") || s.starts_with("https:") {
                SanType::URI((*s).try_into().unwrap())
            } else if let Ok(ip) = s.parse() {
                SanType::IpAddress(ip)
            } else if s.contains('@') {
                SanType::Rfc822Name((*s).try_into().unwrap())
            } else {
                SanType::DnsName((*s).try_into().unwrap())
            }
        })
        .collect();
    p.serialize_request(key).unwrap().pem().unwrap()
}

pub fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

/// Runs the `openssl` binary, panicking with its stderr on failure.
pub fn openssl(args: &[&str], dir: &Path) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl binary is needed by these tests (CI installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the meshid binary built for these tests.
pub fn meshid(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshid"))
        .args(args)
        .output()
        .unwrap()
}

/// The stdout of a command that must have succeeded (its stderr in the failure message).
pub fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts a command failed and its stderr says `needle`.
pub fn fails_with(o: &std::process::Output, needle: &str) {
    assert!(
        !o.status.success(),
        "expected failure, stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(needle),
        "stderr {err:?} should contain {needle:?}"
    );
}

/// `meshid ca init` of a generated root into `state` (trust domain cluster.local).
pub fn init_ca(state: &Path) -> std::process::Output {
    meshid(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--state-dir",
        state.to_str().unwrap(),
    ])
}

/// `meshid ca init --from-plugin PLUGIN` into `state` (trust domain cluster.local).
pub fn import_plugin(plugin: &Path, state: &Path) -> std::process::Output {
    meshid(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--state-dir",
        state.to_str().unwrap(),
        "--from-plugin",
        plugin.to_str().unwrap(),
    ])
}

/// Lists the file names in a directory (empty if it does not exist).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The notBefore of the first certificate of a PEM chain.
pub fn leaf_not_before(chain_pem: &str) -> time::OffsetDateTime {
    let certs = meshid::ca::cert::certs_from_pem(chain_pem.as_bytes(), "chain").unwrap();
    let parsed = meshid::ca::cert::parse(&certs[0], "leaf").unwrap();
    parsed.validity().not_before.to_datetime()
}
