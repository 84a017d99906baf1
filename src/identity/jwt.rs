//! Compact JWS (JWT) handling with ring: parsing, signature verification against a JWK, the
//! Kubernetes service-account claims, and signing (for `meshid dev token`).

use std::collections::BTreeMap;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize};

use super::IdentityError;
use crate::ca::{der, KeyType, PrivateKey};

/// Tokens larger than this are refused before any parsing (Kubernetes tokens are ~1 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The JOSE header fields meshid reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Header {
    pub alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
}

/// `{"name": ..., "uid": ...}` as in the `kubernetes.io` claim block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameUid {
    pub name: String,
    pub uid: String,
}

/// The node a token was bound to. The API server omits `uid` when the Node object is gone
/// (kube `pkg/serviceaccount/claims.go`: every `ref` field is `omitempty`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// The `kubernetes.io` claim block of a projected service-account token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: NameUid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<NameUid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warnafter: Option<i64>,
}

/// The claims of a Kubernetes service-account token (projected, or legacy secret-based).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccountClaims {
    #[serde(
        default,
        deserialize_with = "string_or_seq",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub aud: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(
        rename = "kubernetes.io",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub kubernetes: Option<KubernetesClaims>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Legacy secret-based tokens carry these instead of `kubernetes.io`.
    #[serde(
        rename = "kubernetes.io/serviceaccount/namespace",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub legacy_namespace: Option<String>,
    #[serde(
        rename = "kubernetes.io/serviceaccount/service-account.name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub legacy_service_account: Option<String>,
}

impl ServiceAccountClaims {
    /// A legacy, secret-based token: no `kubernetes.io` block, and the legacy claims. The issuer
    /// says nothing: clusters run with `--service-account-issuer=kubernetes/serviceaccount` issue
    /// projected tokens with that `iss` (kube `pkg/serviceaccount/legacy.go` vs `claims.go`).
    pub fn is_legacy(&self) -> bool {
        self.kubernetes.is_none()
            && (self.legacy_namespace.is_some() || self.legacy_service_account.is_some())
    }
}

fn string_or_seq<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// A token split and decoded, signature not yet checked.
#[derive(Debug)]
pub(crate) struct Jws<'a> {
    pub header: Header,
    pub claims: ServiceAccountClaims,
    pub signing_input: &'a [u8],
    pub signature: Vec<u8>,
}

fn malformed(why: impl Into<String>) -> IdentityError {
    IdentityError::Malformed(why.into())
}

/// Splits and decodes a compact JWS, refusing oversized and malformed input.
pub(crate) fn parse(token: &str) -> Result<Jws<'_>, IdentityError> {
    if token.is_empty() {
        return Err(IdentityError::NoToken);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(IdentityError::TooLarge {
            len: token.len(),
            max: MAX_TOKEN_LEN,
        });
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not three dot-separated parts"));
    };
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| malformed(format!("{what} is not base64url ({e})")))
    };
    let header: Header = serde_json::from_slice(&decode(h, "header")?)
        .map_err(|e| malformed(format!("header is not a JOSE header ({e})")))?;
    let claims: ServiceAccountClaims = serde_json::from_slice(&decode(p, "payload")?)
        .map_err(|e| malformed(format!("payload is not a JSON claim set ({e})")))?;
    let signature = decode(s, "signature")?;
    Ok(Jws {
        header,
        claims,
        signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
        signature,
    })
}

/// A public key from a JWK, ready for ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum VerifyKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    EcP256(Vec<u8>),
    EcP384(Vec<u8>),
    /// Verified with the `p521` crate: ring has no P-521.
    EcP521(Vec<u8>),
}

/// Verifies the JWS signature with `key`, checking `alg` against the allow-list and the key type.
pub(crate) fn verify_signature(jws: &Jws<'_>, key: &VerifyKey) -> Result<(), IdentityError> {
    use signature as s;
    let alg = jws.header.alg.as_str();
    let msg = jws.signing_input;
    let sig = &jws.signature;
    let mismatch = || IdentityError::AlgorithmNotAllowed {
        alg: format!("{alg} with a key of another type"),
    };
    let ok = match (alg, key) {
        ("RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512", VerifyKey::Rsa { n, e }) => {
            let params: &s::RsaParameters = match alg {
                "RS256" => &s::RSA_PKCS1_2048_8192_SHA256,
                "RS384" => &s::RSA_PKCS1_2048_8192_SHA384,
                "RS512" => &s::RSA_PKCS1_2048_8192_SHA512,
                "PS256" => &s::RSA_PSS_2048_8192_SHA256,
                "PS384" => &s::RSA_PSS_2048_8192_SHA384,
                _ => &s::RSA_PSS_2048_8192_SHA512,
            };
            RsaPublicKeyComponents { n, e }
                .verify(params, msg, sig)
                .is_ok()
        }
        ("ES256", VerifyKey::EcP256(point)) => {
            UnparsedPublicKey::new(&s::ECDSA_P256_SHA256_FIXED, point)
                .verify(msg, sig)
                .is_ok()
        }
        ("ES384", VerifyKey::EcP384(point)) => {
            UnparsedPublicKey::new(&s::ECDSA_P384_SHA384_FIXED, point)
                .verify(msg, sig)
                .is_ok()
        }
        ("ES512", VerifyKey::EcP521(point)) => verify_es512(point, msg, sig),
        (
            "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512" | "ES256" | "ES384" | "ES512",
            _,
        ) => return Err(mismatch()),
        _ => {
            return Err(IdentityError::AlgorithmNotAllowed {
                alg: alg.to_owned(),
            })
        }
    };
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadSignature)
    }
}

/// The algorithms meshid verifies: every one the API server signs service-account tokens with
/// (kube `pkg/serviceaccount/jwt.go` `signerFromECDSAPrivateKey`: ES256/384/512; RS256).
pub(crate) const ALLOWED_ALGS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
];

/// Checks `alg` before any key is looked up: `none`, HMAC and unknown names are refused.
pub(crate) fn check_alg(alg: &str) -> Result<(), IdentityError> {
    if !ALLOWED_ALGS.contains(&alg) {
        return Err(IdentityError::AlgorithmNotAllowed { alg: alg.into() });
    }
    Ok(())
}

/// ECDSA P-521 with SHA-512 over `msg`, `sig` the JWS form (r ‖ s, 66 bytes each). ring (the
/// signing stack) has no P-521, so the `p521` crate verifies; meshid never signs with it.
fn verify_es512(point: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    use p521::ecdsa::{signature::Verifier, Signature, VerifyingKey};
    let (Ok(key), Ok(sig)) = (
        VerifyingKey::from_sec1_bytes(point),
        Signature::from_slice(sig),
    ) else {
        return false;
    };
    key.verify(msg, &sig).is_ok()
}

/// The JWS `alg` meshid signs with for a key type.
pub fn jws_alg(key_type: KeyType) -> &'static str {
    match key_type {
        KeyType::EcdsaP256 => "ES256",
        KeyType::EcdsaP384 => "ES384",
        _ => "RS256",
    }
}

/// The key id Kubernetes derives from a signing key: base64url(SHA-256(SPKI DER)).
pub(crate) fn kubernetes_kid(key: &PrivateKey) -> String {
    use rcgen::PublicKeyData;
    let spki = key.subject_public_key_info();
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &spki))
}

/// Signs `claims` into a compact JWS with `key` (ES256/ES384/RS256 by key type), header
/// `{"alg", "kid"}` as the Kubernetes token signer writes it.
pub fn sign_token(
    key: &PrivateKey,
    kid: &str,
    claims: &impl Serialize,
) -> Result<String, IdentityError> {
    use rcgen::SigningKey;
    let header = Header {
        alg: jws_alg(key.key_type()).into(),
        kid: Some(kid.into()),
        typ: None,
    };
    let input = format!("{}.{}", b64_json(&header)?, b64_json(claims)?);
    let der_sig = key
        .sign(input.as_bytes())
        .map_err(|e| malformed(format!("signing failed: {e}")))?;
    let sig = match key.key_type() {
        KeyType::EcdsaP256 => ecdsa_der_to_fixed(&der_sig, 32)?,
        KeyType::EcdsaP384 => ecdsa_der_to_fixed(&der_sig, 48)?,
        _ => der_sig,
    };
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

fn b64_json(v: &impl Serialize) -> Result<String, IdentityError> {
    let json = serde_json::to_vec(v).map_err(|e| malformed(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

/// ECDSA-Sig-Value (DER) to the fixed r||s form JWS uses.
fn ecdsa_der_to_fixed(sig: &[u8], width: usize) -> Result<Vec<u8>, IdentityError> {
    let bad = || malformed("ECDSA signature is not DER");
    let (_, seq, _) = der::read_tlv(sig).ok_or_else(bad)?;
    let (_, r, rest) = der::read_tlv(seq).ok_or_else(bad)?;
    let (_, s, _) = der::read_tlv(rest).ok_or_else(bad)?;
    let mut out = vec![0u8; 2 * width];
    for (i, int) in [r, s].iter().enumerate() {
        let int = &int[int.iter().take_while(|b| **b == 0).count()..];
        if int.len() > width {
            return Err(bad());
        }
        out[(i + 1) * width - int.len()..(i + 1) * width].copy_from_slice(int);
    }
    Ok(out)
}

/// A JWK's public parameters for a key, as Kubernetes publishes them.
pub(crate) fn public_jwk_params(key: &PrivateKey) -> BTreeMap<&'static str, String> {
    let raw = key.public_key_raw();
    let mut m = BTreeMap::new();
    match key.key_type() {
        KeyType::EcdsaP256 | KeyType::EcdsaP384 => {
            let w = (raw.len() - 1) / 2;
            m.insert("kty", "EC".into());
            m.insert("crv", if w == 32 { "P-256" } else { "P-384" }.into());
            m.insert("x", URL_SAFE_NO_PAD.encode(&raw[1..1 + w]));
            m.insert("y", URL_SAFE_NO_PAD.encode(&raw[1 + w..]));
        }
        _ => {
            let (_, seq, _) = der::read_tlv(raw).expect("RSAPublicKey is DER");
            let (_, n, rest) = der::read_tlv(seq).expect("modulus");
            let (_, e, _) = der::read_tlv(rest).expect("exponent");
            let strip = |b: &[u8]| b[b.iter().take_while(|x| **x == 0).count()..].to_vec();
            m.insert("kty", "RSA".into());
            m.insert("n", URL_SAFE_NO_PAD.encode(strip(n)));
            m.insert("e", URL_SAFE_NO_PAD.encode(strip(e)));
        }
    }
    m
}
