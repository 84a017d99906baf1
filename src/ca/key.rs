//! Private keys: generated (ECDSA) or imported (ECDSA, RSA), zeroized on drop, never printed.

use std::fmt;

use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm};
use rustls_pki_types::{pem::PemObject, PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::{Zeroize, Zeroizing};

use super::{der, error::CaError, key_type::KeyType};

/// Bit length of a big-endian unsigned integer (an RSA modulus).
pub(crate) fn bit_len(be: &[u8]) -> usize {
    let be = &be[be.iter().take_while(|b| **b == 0).count()..];
    match be.first() {
        Some(first) => (be.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
        None => 0,
    }
}

/// A private key that can sign certificates. Not `Clone`; `Debug` never shows key material;
/// the PKCS#8 bytes are wiped on drop.
pub struct PrivateKey {
    key_type: KeyType,
    pair: KeyPair,
}

// === impl PrivateKey ===

impl PrivateKey {
    /// Generates a fresh key. Only ECDSA keys can be generated (ring has no RSA key generation).
    pub fn generate(key_type: KeyType) -> Result<Self, CaError> {
        let alg: &'static SignatureAlgorithm = match key_type {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            rsa => return Err(CaError::KeyGenerationUnsupported { key_type: rsa }),
        };
        let pair = KeyPair::generate_for(alg).map_err(|e| CaError::Crypto(e.to_string()))?;
        Ok(Self { key_type, pair })
    }

    /// Loads a PEM private key: PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or SEC1
    /// (`EC PRIVATE KEY`). `what` names the source in errors (a file name, say).
    pub fn from_pem(pem: &[u8], what: &str) -> Result<Self, CaError> {
        let bad = |why: String| CaError::KeyInvalid {
            what: what.to_owned(),
            why,
        };
        let der = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| bad(format!("no private key PEM block ({e})")))?;
        let pkcs8 = Zeroizing::new(match &der {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            PrivateKeyDer::Pkcs1(k) => der::pkcs8_from_pkcs1(k.secret_pkcs1_der()),
            PrivateKeyDer::Sec1(k) => der::pkcs8_from_sec1(k.secret_sec1_der())
                .ok_or_else(|| bad("SEC1 EC key without curve parameters".into()))?,
            _ => return Err(bad("unsupported private key encoding".into())),
        });
        if contains(&pkcs8, OID_SECP521R1) {
            return Err(bad("P-521 keys cannot be used: ring, meshid's only crypto library, cannot sign or verify with P-521; use P-256, P-384 or RSA 2048-8192".into()));
        }
        let pair = KeyPair::try_from(&PrivatePkcs8KeyDer::from(pkcs8.as_slice())).map_err(|e| {
            // ring signs with RSA keys of 2048, 3072 or 4096 bits only (primes a multiple of
            // 512 bits); certificates in a chain may still hold RSA keys up to 8192 bits.
            bad(format!(
                "not a usable signing key ({e}): meshid signs with ECDSA P-256/P-384 or RSA of 2048, 3072 or 4096 bits (ring's limits); chain certificates may hold RSA keys up to 8192 bits"
            ))
        })?;
        let key_type =
            key_type_of(&pair).ok_or_else(|| bad("unsupported key algorithm or size".into()))?;
        Ok(Self { key_type, pair })
    }

    /// The key's algorithm.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The raw public key (EC point, or PKCS#1 RSAPublicKey), as in a certificate's SPKI bit string.
    pub fn public_key_raw(&self) -> &[u8] {
        self.pair.public_key_raw()
    }

    /// The PKCS#8 PEM encoding, for writing to a 0600 file or the state document.
    pub fn secret_pkcs8_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.pair.serialize_pem())
    }

    /// The PKCS#8 DER encoding, for TLS stacks.
    pub fn secret_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.pair.serialize_der())
    }

    /// The signer rcgen uses.
    pub(crate) fn signer(&self) -> &KeyPair {
        &self.pair
    }
}

/// The DER of the secp521r1 curve OID (1.3.132.0.35).
const OID_SECP521R1: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23];

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn key_type_of(pair: &KeyPair) -> Option<KeyType> {
    let alg = pair.algorithm();
    if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
        Some(KeyType::EcdsaP256)
    } else if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
        Some(KeyType::EcdsaP384)
    } else if alg == &rcgen::PKCS_RSA_SHA256 {
        // The raw RSA public key is a PKCS#1 RSAPublicKey: SEQUENCE { modulus, exponent }.
        let (_, seq, _) = der::read_tlv(pair.der_bytes())?;
        let (_, modulus, _) = der::read_tlv(seq)?;
        KeyType::from_rsa_bits(bit_len(modulus))
    } else {
        None
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.pair.zeroize();
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({}, [secret key elided])", self.key_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_reload_from_pem() {
        for kt in [KeyType::EcdsaP256, KeyType::EcdsaP384] {
            let key = PrivateKey::generate(kt).unwrap();
            let again = PrivateKey::from_pem(key.secret_pkcs8_pem().as_bytes(), "test").unwrap();
            assert_eq!(again.key_type(), kt);
            assert_eq!(again.public_key_raw(), key.public_key_raw());
        }
    }

    #[test]
    fn rsa_cannot_be_generated() {
        let err = PrivateKey::generate(KeyType::Rsa2048).unwrap_err();
        assert!(
            matches!(err, CaError::KeyGenerationUnsupported { .. }),
            "{err}"
        );
    }

    #[test]
    fn debug_elides_the_secret() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let dbg = format!("{key:?}");
        assert_eq!(dbg, "PrivateKey(ecdsa-p256, [secret key elided])");
    }

    #[test]
    fn garbage_is_refused_naming_the_source() {
        let err = PrivateKey::from_pem(b"not a key", "ca-key.pem").unwrap_err();
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
    }

    #[test]
    fn bit_len_counts_significant_bits() {
        assert_eq!(bit_len(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(bit_len(&[0x01]), 1);
        assert_eq!(bit_len(&[]), 0);
    }
}
