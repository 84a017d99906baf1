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
