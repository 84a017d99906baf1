//! Chains verified by an independent stack: the `openssl` binary with -x509_strict, for TLS
//! client and server purposes; and in-process by webpki (the verifier rustls uses).

use std::path::Path;

use meshid::ca::{cert, chain, ChainError, KeyType};
use time::OffsetDateTime;

use crate::support::*;

fn openssl_verify_both(dir: &Path) {
    for purpose in ["sslclient", "sslserver"] {
        let out = openssl(
            &[
                "verify",
                "-x509_strict",
                "-purpose",
                purpose,
                "-CAfile",
                "root-cert.pem",
                "-untrusted",
                "cert-chain.pem",
                "cert-chain.pem",
            ],
            dir,
        );
        assert!(out.trim_end().ends_with("cert-chain.pem: OK"), "{out}");
    }
}

fn write(dir: &Path, issued: &meshid::ca::IssuedCert) {
    std::fs::write(dir.join("cert-chain.pem"), issued.chain_pem()).unwrap();
    std::fs::write(dir.join("root-cert.pem"), issued.roots_pem()).unwrap();
}

#[test]
fn generated_roots_p256_and_p384() {
    for kt in [KeyType::EcdsaP256, KeyType::EcdsaP384] {
        let dir = tempfile::tempdir().unwrap();
        let ca = authority(kt);
        let (issued, _) = ca
            .issue_with_new_key(&workload("shop", "product-service"), None)
            .unwrap();
        chain::verify_leaf(
            &issued.leaf,
            &issued.chain,
            &issued.roots,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        write(dir.path(), &issued);
        openssl_verify_both(dir.path());
        // The root itself passes openssl's strict checks as a CA.
        openssl(
            &[
                "verify",
                "-x509_strict",
                "-CAfile",
                "root-cert.pem",
                "root-cert.pem",
            ],
            dir.path(),
        );
    }
}

#[test]
fn rsa_csr_leaf() {
    let dir = tempfile::tempdir().unwrap();
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "k.pem",
            "-out",
            "csr.pem",
            "-subj",
            "/CN=ignored",
        ],
        dir.path(),
    );
    let ca = authority(KeyType::EcdsaP256);
    let issued = ca
        .sign_csr(
            &std::fs::read(dir.path().join("csr.pem")).unwrap(),
            &workload("db", "legacy-db"),
            None,
        )
        .unwrap();
    write(dir.path(), &issued);
    openssl_verify_both(dir.path());
    // The certificate matches the key openssl generated.
    let cert_pub = openssl(
        &["x509", "-in", "cert-chain.pem", "-noout", "-pubkey"],
        dir.path(),
    );
    let key_pub = openssl(&["pkey", "-in", "k.pem", "-pubout"], dir.path());
    assert_eq!(cert_pub, key_pub);
}

#[test]
fn chain_through_an_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("cacerts");
    std::fs::create_dir(&plugin).unwrap();
    crate::plugin_import::openssl_cacerts(&plugin);
    let material = meshid::ca::plugin::load_plugin_dir(&plugin, OffsetDateTime::now_utc()).unwrap();
    let ca = meshid::ca::Authority::new(
        td(),
        material,
        Default::default(),
        std::sync::Arc::new(meshid::clock::SystemClock),
    )
    .unwrap();
    let (issued, _) = ca
        .issue_with_new_key(&workload("shop", "inventory-service"), None)
        .unwrap();
    assert_eq!(issued.chain.len(), 1, "the intermediate");
    chain::verify_leaf(
        &issued.leaf,
        &issued.chain,
        &issued.roots,
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    write(dir.path(), &issued);
    openssl_verify_both(dir.path());
    // webpki refuses the leaf against an unrelated root.
    let stranger = authority(KeyType::EcdsaP256);
    let err = chain::verify_leaf(
        &issued.leaf,
        &issued.chain,
        stranger.roots(),
        OffsetDateTime::now_utc(),
    )
    .unwrap_err();
    assert!(matches!(err, ChainError::LeafRejected { .. }), "{err}");
    assert!(err.to_string().contains("does not verify"), "{err}");
    let _ = cert::to_pem(&issued.leaf);
}
