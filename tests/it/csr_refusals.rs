//! The CSR refusal matrix: each bad request refused with its own error kind, nothing issued
//! (and, through the CLI, nothing written).

use std::time::Duration;

use meshid::ca::{CaError, KeyType};

use crate::support::*;

fn refuse(csr: &[u8]) -> CaError {
    let ca = authority(KeyType::EcdsaP256);
    ca.sign_csr(csr, &workload("shop", "product-service"), None)
        .unwrap_err()
}

fn rsa_csr(bits: u32) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let rsa = format!("rsa:{bits}");
    openssl(
        &[
            "req", "-new", "-newkey", &rsa, "-nodes", "-keyout", "k.pem", "-out", "csr.pem",
            "-subj", "/CN=x",
        ],
        dir.path(),
    );
    std::fs::read(dir.path().join("csr.pem")).unwrap()
}

#[test]
fn wrong_signature() {
    // Flip the last byte of the signature value: still well-formed DER, no longer valid.
    let mut der = der_of(&csr(&p256(), &[]));
    let last = der.len() - 1;
    der[last] ^= 0x01;
    assert!(
        matches!(refuse(&der), CaError::CsrSignatureInvalid),
        "flipped signature byte"
    );
    // Tamper a CSR in a way that keeps it well-formed: swap in another key's public key.
    let a = csr(&p256(), &[]);
    let b = csr(&p256(), &[]);
    let (da, db) = (der_of(&a), der_of(&b));
    let mut franken = da.clone();
    let (sa, sb) = (find_point(&da), find_point(&db));
    franken[sa..sa + 65].copy_from_slice(&db[sb..sb + 65]);
    assert!(
        matches!(refuse(&franken), CaError::CsrSignatureInvalid),
        "well-formed CSR with a foreign key"
    );
}

fn der_of(pem: &str) -> Vec<u8> {
    let d: rustls_pki_types::CertificateSigningRequestDer<'_> =
        rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
    d.as_ref().to_vec()
}

/// Offset of the uncompressed P-256 point (0x04 followed by 64 bytes) inside the BIT STRING.
fn find_point(der: &[u8]) -> usize {
    der.windows(4)
        .position(|w| w == [0x03, 0x42, 0x00, 0x04])
        .unwrap()
        + 3
}

#[test]
fn foreign_uri_san() {
    let pem = csr(&p256(), &["spiffe://cluster.local/ns/kube-system/sa/admin"]);
    match refuse(pem.as_bytes()) {
        CaError::CsrForeignSan { requested, .. } => {
            assert_eq!(requested, "spiffe://cluster.local/ns/kube-system/sa/admin")
        }
        other => panic!("{other}"),
    }
}

#[test]
fn dns_san() {
    let pem = csr(&p256(), &["product.shop.svc"]);
    match refuse(pem.as_bytes()) {
        CaError::CsrSanNotAllowed { kind, value } => {
            assert_eq!((kind, value.as_str()), ("DNS", "product.shop.svc"))
        }
        other => panic!("{other}"),
    }
}

#[test]
fn ip_and_email_sans() {
    let err = refuse(csr(&p256(), &["10.1.2.3"]).as_bytes());
    assert!(
        matches!(&err, CaError::CsrSanNotAllowed { kind: "IP", value } if value == "10.1.2.3"),
        "{err}"
    );
    let err = refuse(csr(&p256(), &["a@b.example"]).as_bytes());
    assert!(
        matches!(&err, CaError::CsrSanNotAllowed { kind: "email", .. }),
        "{err}"
    );
}

#[test]
fn two_uri_sans() {
    let own = workload("shop", "product-service").to_string();
    let pem = csr(&p256(), &[&own, "spiffe://cluster.local/ns/shop/sa/other"]);
    assert!(matches!(
        refuse(pem.as_bytes()),
        CaError::CsrMultipleUriSans { count: 2 }
    ));
}

#[test]
fn own_uri_san_is_accepted() {
    let ca = authority(KeyType::EcdsaP256);
    let id = workload("shop", "product-service");
    let pem = csr(&p256(), &[&id.to_string()]);
    assert_eq!(ca.sign_csr(pem.as_bytes(), &id, None).unwrap().id, id);
}

#[test]
fn rsa_1024_is_too_small() {
    let err = refuse(&rsa_csr(1024));
    assert!(
        matches!(
            err,
            CaError::CsrKeyTooSmall {
                bits: 1024,
                min: 2048
            }
        ),
        "{err}"
    );
}

#[test]
fn rsa_2048_is_accepted_with_key_encipherment() {
    let ca = authority(KeyType::EcdsaP256);
    let issued = ca
        .sign_csr(&rsa_csr(2048), &workload("shop", "legacy"), None)
        .unwrap();
    let (_, c) = x509_parser::parse_x509_certificate(&issued.leaf).unwrap();
    let ku = c.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment());
}

#[test]
fn ed25519_is_unsupported() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let err = refuse(csr(&key, &[]).as_bytes());
    assert!(matches!(err, CaError::CsrKeyUnsupported { .. }), "{err}");
}

#[test]
fn garbage_is_malformed() {
    for input in [
        &b""[..],
        b"hello",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let err = refuse(input);
        assert!(matches!(err, CaError::CsrMalformed(_)), "{input:?}: {err}");
    }
}

#[test]
fn ttl_above_max() {
    let ca = authority(KeyType::EcdsaP256);
    let pem = csr(&p256(), &[]);
    let err = ca
        .sign_csr(
            pem.as_bytes(),
            &workload("a", "b"),
            Some(Duration::from_secs(25 * 3600)),
        )
        .unwrap_err();
    assert!(matches!(err, CaError::TtlAboveMax { .. }));
    assert!(err.to_string().contains("maximum of 1d"), "{err}");
}

/// Through the CLI: a refused CSR leaves the output directory untouched.
#[test]
fn cli_refusal_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("out");
    let s = state.to_str().unwrap();
    assert!(meshid(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--state-dir",
        s
    ])
    .status
    .success());
    let csr_path = dir.path().join("bad.csr");
    std::fs::write(&csr_path, csr(&p256(), &["product.shop.svc"])).unwrap();
    let o = meshid(&[
        "cert",
        "issue",
        "--state-dir",
        s,
        "--spiffe-id",
        "spiffe://cluster.local/ns/shop/sa/p",
        "--csr",
        csr_path.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("DNS SAN \"product.shop.svc\""), "{stderr}");
    assert!(
        files_in(&out).is_empty(),
        "nothing written: {:?}",
        files_in(&out)
    );
}
