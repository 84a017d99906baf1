//! Issuance benchmark: certificates issued per second from pre-made CSRs on one core, next to
//! the raw ring ECDSA P-256 sign and verify rates measured in the same run.
//!
//! Run: `cargo bench --bench issuance` (optionally `-- --seconds 5`).
//! The ratio reported is issued/s ÷ (rate of one verify + one sign), i.e. how close issuance
//! comes to the crypto it cannot avoid: verifying the CSR's signature and signing the leaf.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use meshid::{
    ca::{root, Authority, IssuancePolicy, KeyType, SigningMaterial},
    clock::SystemClock,
    spiffe::{SpiffeId, TrustDomain},
};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair},
};

fn seconds_arg() -> Duration {
    let args: Vec<String> = std::env::args().collect();
    let secs = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// Runs `op` repeatedly for about `budget`, returning operations per second.
fn rate(budget: Duration, mut op: impl FnMut(usize)) -> f64 {
    for i in 0..50 {
        op(i); // warm-up
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

fn main() {
    let budget = seconds_arg();
    let rng = SystemRandom::new();
    let td = TrustDomain::new("cluster.local").unwrap();

    // Raw ring baseline, on a message the size of a leaf's TBSCertificate.
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
    let sign_rate = rate(budget, |_| {
        black_box(kp.sign(&rng, black_box(&msg)).unwrap());
    });
    let verify_rate = rate(budget, |_| {
        pk.verify(black_box(&msg), black_box(sig.as_ref())).unwrap();
    });
    let ceiling = 1.0 / (1.0 / sign_rate + 1.0 / verify_rate);

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
