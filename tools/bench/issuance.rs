//! Issuance benchmark: certificates issued per second from pre-made CSRs on one core, next to
//! the raw ring ECDSA P-256 sign and verify rates measured in the same run.
//!
//! Run: `cargo bench --bench issuance` (optionally `-- --seconds 5`).
//! The ratio reported is issued/s ÷ (rate of one verify + one sign), i.e. how close issuance
//! comes to the crypto it cannot avoid: verifying the CSR's signature and signing the leaf.

#[path = "common.rs"]
mod common;

use std::{hint::black_box, sync::Arc};

use common::{rate, seconds_arg};

use meshid::{
    ca::{root, Authority, IssuancePolicy, KeyType, SigningMaterial},
    clock::SystemClock,
    spiffe::{SpiffeId, TrustDomain},
};

fn main() {
    let budget = seconds_arg();
    let td = TrustDomain::new("cluster.local").unwrap();

    // Raw ring baseline, on a message the size of a leaf's TBSCertificate.
    let (sign_rate, verify_rate, ceiling) = common::ecdsa_p256_rates(budget);

    // The authority and 512 pre-made CSRs from distinct keys and identities.
    let ca = root::generate_root(
        &td,
        KeyType::EcdsaP256,
        root::DEFAULT_ROOT_TTL,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let material = SigningMaterial {
        signer_cert: ca.cert.clone(),
        signer_key: ca.key,
        intermediates: vec![],
        roots: vec![ca.cert],
    };
    let authority = Authority::new(
        td.clone(),
        material,
        IssuancePolicy::default(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let requests: Vec<(SpiffeId, String)> = (0..512)
        .map(|i| {
            let id = SpiffeId::for_service_account(&td, "bench", &format!("sa-{i}")).unwrap();
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap();
            (id, csr)
        })
        .collect();
    let csr_rate = rate(budget, |i| {
        let (id, csr) = &requests[i % requests.len()];
        black_box(authority.sign_csr(csr.as_bytes(), id, None).unwrap());
    });
    let keygen_rate = rate(budget, |i| {
        let (id, _) = &requests[i % requests.len()];
        black_box(authority.issue_with_new_key(id, None).unwrap());
    });

    println!(
        "meshid issuance benchmark (one core, {:.1}s per measurement)",
        budget.as_secs_f64()
    );
    println!("  ring ECDSA P-256 sign             {sign_rate:>10.0} /s");
    println!("  ring ECDSA P-256 verify           {verify_rate:>10.0} /s");
    println!("  crypto ceiling (1 verify + 1 sign){ceiling:>10.0} /s");
    println!(
        "  issued from CSR                   {csr_rate:>10.0} /s   ratio {:.2} of the ceiling",
        csr_rate / ceiling
    );
    println!("  issued with server-side key       {keygen_rate:>10.0} /s   (keygen + sign, no CSR to verify)");
}
