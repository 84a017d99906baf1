//! Leaf and root profiles, field by field, read back with x509-parser.

use std::time::Duration;

use meshid::ca::{cert, chain, root, CaError, KeyType};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use crate::support::*;

fn san_uris(c: &X509Certificate<'_>) -> (Vec<String>, bool) {
    let san = c.subject_alternative_name().unwrap().unwrap();
    let uris = san
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => panic!("unexpected SAN {other:?}"),
        })
        .collect();
    (uris, san.critical)
}

#[test]
fn leaf_profile_field_by_field() {
    let ca = authority(KeyType::EcdsaP256);
    let id = workload("shop", "product-service");
    let before = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let (issued, key) = ca.issue_with_new_key(&id, None).unwrap();
    let (_, c) = X509Certificate::from_der(&issued.leaf).unwrap();

    assert_eq!(c.version(), x509_parser::x509::X509Version::V3);
    assert!(
        c.subject().iter_attributes().next().is_none(),
        "subject is empty"
    );
    assert_eq!(
        san_uris(&c),
        (vec![id.to_string()], true),
        "one critical URI SAN"
    );
    let bc = c
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(bc.critical && !bc.value.ca, "CA:false, critical");
    let ku = c.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(
        !ku.value.key_encipherment(),
        "EC leaf must not have keyEncipherment"
    );
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = c.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    let raw = c.raw_serial();
    assert!(
        raw.len() <= 17 && raw[0] & 0x80 == 0,
        "positive, at most 16 bytes plus a sign byte"
    );
    assert_eq!(issued.serial.to_string().len(), 32, "128-bit serial");
    assert!(issued.serial.matches_raw(c.raw_serial()));
    assert_eq!(
        c.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );

    // Validity: backdated 60 s, 1 h default lifetime.
    let nb = c.validity().not_before.to_datetime();
    let na = c.validity().not_after.to_datetime();
    assert!(
        nb >= before - Duration::from_secs(61) && nb <= before,
        "notBefore {nb} backdated from {before}"
    );
    assert_eq!(
        na - nb,
        time::Duration::seconds(3600 + 60),
        "1h lifetime counted from issue, plus the backdate"
    );
    // Issuer links to the root by name and key identifier.
    let (_, r) = X509Certificate::from_der(&issued.roots[0]).unwrap();
    assert_eq!(c.issuer().as_raw(), r.subject().as_raw());
    assert!(
        issued.chain.is_empty(),
        "the root signs directly: no intermediates"
    );
    chain::verify_leaf(
        &issued.leaf,
        &issued.chain,
        &issued.roots,
        OffsetDateTime::now_utc(),
    )
    .unwrap();
}

#[test]
fn root_profile_field_by_field() {
    for kt in [KeyType::EcdsaP256, KeyType::EcdsaP384] {
        let now = OffsetDateTime::now_utc();
        let ca = root::generate_root(&td(), kt, root::DEFAULT_ROOT_TTL, now).unwrap();
        let (_, c) = X509Certificate::from_der(&ca.cert).unwrap();
        assert_eq!(c.subject(), c.issuer(), "self-signed");
        let subject = c.subject().to_string();
        assert!(
            subject.contains("O=cluster.local"),
            "subject names the trust domain: {subject}"
        );
        let bc = c.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca && bc.value.path_len_constraint.is_none());
        let ku = c.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        assert_eq!(san_uris(&c).0, vec!["spiffe://cluster.local".to_string()]);
        let lifetime = c.validity().not_after.to_datetime() - now + time::Duration::minutes(1);
        assert_eq!(lifetime.whole_days(), 3650, "10-year default");
        assert!(c.extended_key_usage().unwrap().is_none());
        let kind = meshid::ca::sig::PublicKeyKind::of(c.public_key());
        assert_eq!(kind.key_type(), Some(kt));
    }
}

#[test]
fn same_key_gets_different_serials() {
    let ca = authority(KeyType::EcdsaP256);
    let key = p256();
    let id = workload("shop", "a");
    let pem = csr(&key, &[]);
    let a = ca.sign_csr(pem.as_bytes(), &id, None).unwrap();
    let b = ca.sign_csr(pem.as_bytes(), &id, None).unwrap();
    assert_ne!(a.serial, b.serial);
    let (_, ca_) = X509Certificate::from_der(&a.leaf).unwrap();
    let (_, cb) = X509Certificate::from_der(&b.leaf).unwrap();
    assert_ne!(ca_.raw_serial(), cb.raw_serial());
    assert_eq!(ca_.public_key().raw, cb.public_key().raw, "same key");
}

#[test]
fn csr_leaf_gets_policy_not_request() {
    let ca = authority(KeyType::EcdsaP256);
    let id = workload("shop", "b");
    let key = p256();
    // The CSR asks for a subject and extensions; only its key may reach the certificate.
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, "evil");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let pem = p.serialize_request(&key).unwrap().pem().unwrap();
    let issued = ca
        .sign_csr(pem.as_bytes(), &id, Some(Duration::from_secs(600)))
        .unwrap();
    let (_, c) = X509Certificate::from_der(&issued.leaf).unwrap();
    assert!(c.subject().iter_attributes().next().is_none());
    assert!(!c.basic_constraints().unwrap().unwrap().value.ca);
    assert!(!c.key_usage().unwrap().unwrap().value.key_cert_sign());
    assert_eq!(san_uris(&c).0, vec![id.to_string()]);
    assert_eq!(
        (issued.not_after - issued.not_before).whole_seconds(),
        600 + 60
    );
}

#[test]
fn not_after_is_capped_to_the_chain() {
    // A root that expires in 30 minutes: a 1h leaf must stop at the root's notAfter.
    let now = OffsetDateTime::now_utc();
    let ca =
        root::generate_root(&td(), KeyType::EcdsaP256, Duration::from_secs(1800), now).unwrap();
    let root_na = X509Certificate::from_der(&ca.cert)
        .unwrap()
        .1
        .validity()
        .not_after
        .to_datetime();
    let material = meshid::ca::SigningMaterial {
        signer_cert: ca.cert.clone(),
        signer_key: ca.key,
        intermediates: vec![],
        roots: vec![ca.cert],
    };
    let auth = meshid::ca::Authority::new(
        td(),
        material,
        Default::default(),
        std::sync::Arc::new(meshid::clock::SystemClock),
    )
    .unwrap();
    let (issued, _) = auth.issue_with_new_key(&workload("a", "b"), None).unwrap();
    assert_eq!(issued.not_after, root_na);
}

#[test]
fn identity_outside_trust_domain_is_refused() {
    let ca = authority(KeyType::EcdsaP256);
    let id = meshid::spiffe::SpiffeId::parse("spiffe://other.org/ns/a/sa/b").unwrap();
    assert!(matches!(
        ca.issue_with_new_key(&id, None).unwrap_err(),
        CaError::IdentityOutsideTrustDomain { .. }
    ));
    let td_id = meshid::spiffe::SpiffeId::parse("spiffe://cluster.local").unwrap();
    assert!(matches!(
        ca.issue_with_new_key(&td_id, None).unwrap_err(),
        CaError::IdentityOutsideTrustDomain { .. }
    ));
}

#[test]
fn issued_pem_round_trips() {
    let ca = authority(KeyType::EcdsaP384);
    let (issued, _) = ca.issue_with_new_key(&workload("a", "b"), None).unwrap();
    let chain = cert::certs_from_pem(issued.chain_pem().as_bytes(), "chain").unwrap();
    assert_eq!(chain[0], issued.leaf);
    let roots = cert::certs_from_pem(issued.roots_pem().as_bytes(), "roots").unwrap();
    assert_eq!(roots.as_slice(), &issued.roots[..]);
}
