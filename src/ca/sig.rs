//! Signature checks with an explicit allow-list (no SHA-1, no DSA), and key classification
//! from a SubjectPublicKeyInfo. Shared by CSR verification and CA chain verification.

use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use x509_parser::{
    oid_registry::{
        Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
        OID_NIST_HASH_SHA256, OID_NIST_HASH_SHA384, OID_NIST_HASH_SHA512, OID_PKCS1_RSAENCRYPTION,
        OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ECDSA_WITH_SHA512,
    },
    signature_algorithm::RsaSsaPssParams,
    x509::{AlgorithmIdentifier, SubjectPublicKeyInfo},
};

use super::{key::bit_len, key_type::KeyType};

/// What a public key is, as far as meshid cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublicKeyKind {
    EcdsaP256,
    EcdsaP384,
    /// Recognized, but ring can neither sign nor verify with it.
    EcdsaP521,
    Rsa {
        bits: usize,
    },
    /// Anything else, with a printable name for errors.
    Other,
}

// === impl PublicKeyKind ===

impl PublicKeyKind {
    /// Classifies a SubjectPublicKeyInfo.
    pub fn of(spki: &SubjectPublicKeyInfo<'_>) -> Self {
        let alg = &spki.algorithm.algorithm;
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == OID_EC_P256 => Self::EcdsaP256,
                Some(c) if c == OID_NIST_EC_P384 => Self::EcdsaP384,
                Some(c) if c == OID_NIST_EC_P521 => Self::EcdsaP521,
                _ => Self::Other,
            }
        } else if *alg == OID_PKCS1_RSAENCRYPTION {
            match spki.parsed() {
                Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => Self::Rsa {
                    bits: bit_len(rsa.modulus),
                },
                _ => Self::Other,
            }
        } else {
            Self::Other
        }
    }

    /// The matching `KeyType`, if it is one meshid issues for.
    pub fn key_type(self) -> Option<KeyType> {
        match self {
            Self::EcdsaP256 => Some(KeyType::EcdsaP256),
            Self::EcdsaP384 => Some(KeyType::EcdsaP384),
            Self::Rsa { bits: 2048 } => Some(KeyType::Rsa2048),
            Self::Rsa { bits: 3072 } => Some(KeyType::Rsa3072),
            Self::Rsa { bits: 4096 } => Some(KeyType::Rsa4096),
            _ => None,
        }
    }

    /// A printable name, e.g. for inspect output.
    pub fn name(self, spki: &SubjectPublicKeyInfo<'_>) -> String {
        match self {
            Self::EcdsaP256 => "ecdsa-p256".into(),
            Self::EcdsaP384 => "ecdsa-p384".into(),
            Self::EcdsaP521 => "ecdsa-p521 (unsupported)".into(),
            Self::Rsa { bits } => format!("rsa-{bits}"),
            Self::Other => format!("unsupported ({})", spki.algorithm.algorithm),
        }
    }
}

/// Why a signature was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum SigError {
    /// The algorithm (or its pairing with the key) is not on the allow-list.
    Unsupported(String),
    /// The signature does not verify.
    Invalid,
}

/// Verifies `signature` over `message` with the signer's SPKI, accepting only
/// ECDSA (P-256/P-384 with SHA-256/384), RSA PKCS#1 v1.5 (SHA-256/384/512, 2048-8192 bits) and
/// RSASSA-PSS (SHA-256/384/512 with MGF1 of the same hash and a salt of the hash's length, the
/// parameters webpki and Go accept). ring, meshid's only crypto library, has no P-521 and no
/// ECDSA with SHA-512: those are refused with a message saying so.
pub fn verify(
    signer: &SubjectPublicKeyInfo<'_>,
    algorithm: &AlgorithmIdentifier<'_>,
    signature: &[u8],
    message: &[u8],
) -> Result<(), SigError> {
    let key = PublicKeyKind::of(signer);
    let alg = if algorithm.algorithm == OID_PKCS1_RSASSAPSS {
        pss_algorithm(key, algorithm)?
    } else {
        ring_algorithm(key, &algorithm.algorithm).ok_or_else(|| unsupported(key, algorithm))?
    };
    UnparsedPublicKey::new(alg, &signer.subject_public_key.data)
        .verify(message, signature)
        .map_err(|_| SigError::Invalid)
}

fn unsupported(key: PublicKeyKind, algorithm: &AlgorithmIdentifier<'_>) -> SigError {
    let name = algorithm_name(&algorithm.algorithm);
    SigError::Unsupported(if key == PublicKeyKind::EcdsaP521 {
        format!("{name} with a P-521 key (ring, meshid's only crypto library, cannot verify or sign with P-521; use P-256, P-384 or RSA)")
    } else if algorithm.algorithm == OID_SIG_ECDSA_WITH_SHA512 {
        format!("{name} (ring, meshid's only crypto library, has no ECDSA with SHA-512; re-sign with ECDSA SHA-256/384)")
    } else {
        name
    })
}

/// RSASSA-PSS with the only parameter sets ring verifies: hash H, MGF1 with H, salt len(H).
fn pss_algorithm(
    key: PublicKeyKind,
    algorithm: &AlgorithmIdentifier<'_>,
) -> Result<&'static dyn VerificationAlgorithm, SigError> {
    let bad = |why: &str| SigError::Unsupported(format!("RSASSA-PSS {why}"));
    if !matches!(key, PublicKeyKind::Rsa { .. }) {
        return Err(bad("with a non-RSA key"));
    }
    let params = algorithm
        .parameters
        .as_ref()
        .and_then(|p| RsaSsaPssParams::try_from(p).ok())
        .ok_or_else(|| bad("with missing or malformed parameters"))?;
    let hash = params.hash_algorithm_oid();
    let (alg, len): (&'static dyn VerificationAlgorithm, u32) = if *hash == OID_NIST_HASH_SHA256 {
        (&signature::RSA_PSS_2048_8192_SHA256, 32)
    } else if *hash == OID_NIST_HASH_SHA384 {
        (&signature::RSA_PSS_2048_8192_SHA384, 48)
    } else if *hash == OID_NIST_HASH_SHA512 {
        (&signature::RSA_PSS_2048_8192_SHA512, 64)
    } else {
        return Err(bad("with a hash other than SHA-256/384/512"));
    };
    let mgf = params
        .mask_gen_algorithm()
        .map_err(|_| bad("with a malformed mask generation function"))?;
    if mgf.hash != *hash || params.salt_length() != len || params.trailer_field() != 1 {
        return Err(bad(
            "parameters other than MGF1 with the same hash and a salt of the hash's length",
        ));
    }
    Ok(alg)
}

fn ring_algorithm(key: PublicKeyKind, sig: &Oid<'_>) -> Option<&'static dyn VerificationAlgorithm> {
    use PublicKeyKind::*;
    let alg: &'static dyn VerificationAlgorithm = match key {
        EcdsaP256 if *sig == OID_SIG_ECDSA_WITH_SHA256 => &signature::ECDSA_P256_SHA256_ASN1,
        EcdsaP256 if *sig == OID_SIG_ECDSA_WITH_SHA384 => &signature::ECDSA_P256_SHA384_ASN1,
        EcdsaP384 if *sig == OID_SIG_ECDSA_WITH_SHA256 => &signature::ECDSA_P384_SHA256_ASN1,
        EcdsaP384 if *sig == OID_SIG_ECDSA_WITH_SHA384 => &signature::ECDSA_P384_SHA384_ASN1,
        Rsa { .. } if *sig == OID_PKCS1_SHA256WITHRSA => &signature::RSA_PKCS1_2048_8192_SHA256,
        Rsa { .. } if *sig == OID_PKCS1_SHA384WITHRSA => &signature::RSA_PKCS1_2048_8192_SHA384,
        Rsa { .. } if *sig == OID_PKCS1_SHA512WITHRSA => &signature::RSA_PKCS1_2048_8192_SHA512,
        _ => return None,
    };
    Some(alg)
}

/// A readable name for a signature algorithm OID.
pub fn algorithm_name(oid: &Oid<'_>) -> String {
    x509_parser::oid_registry::OidRegistry::default()
        .with_all_crypto()
        .get(oid)
        .map(|e| e.sn().to_owned())
        .unwrap_or_else(|| oid.to_id_string())
}
