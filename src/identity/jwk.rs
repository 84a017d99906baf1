//! JSON Web Keys and Key Sets (RFC 7517), public keys only: what an issuer's JWKS document holds.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use serde::{Deserialize, Serialize};

use super::{
    jwt::{self, VerifyKey},
    IdentityError,
};

/// One JSON Web Key (public).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
}

/// A JWK Set, as `kubectl get --raw /openid/v1/jwks` prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    pub keys: Vec<Jwk>,
}

impl Jwk {
    pub(crate) fn to_verify_key(&self) -> Option<VerifyKey> {
        let b = |v: &Option<String>| v.as_deref().and_then(|s| URL_SAFE_NO_PAD.decode(s).ok());
        match (self.kty.as_str(), self.crv.as_deref()) {
            ("RSA", _) => Some(VerifyKey::Rsa {
                n: b(&self.n)?,
                e: b(&self.e)?,
            }),
            ("EC", Some(crv @ ("P-256" | "P-384" | "P-521"))) => {
                let (x, y) = (b(&self.x)?, b(&self.y)?);
                let w = match crv {
                    "P-256" => 32,
                    "P-384" => 48,
                    _ => 66,
                };
                if x.len() != w || y.len() != w {
                    return None;
                }
                let point = [&[4u8][..], &x, &y].concat();
                Some(match w {
                    32 => VerifyKey::EcP256(point),
                    48 => VerifyKey::EcP384(point),
                    _ => VerifyKey::EcP521(point),
                })
            }
            _ => None,
        }
    }
}

impl JwkSet {
    /// Parses a JWKS document.
    pub fn from_json(bytes: &[u8]) -> Result<Self, IdentityError> {
        serde_json::from_slice(bytes)
            .map_err(|e| IdentityError::JwksUnavailable(format!("not a JWK Set: {e}")))
    }

    /// A public JWKS for a signing key (what `meshid dev issuer init` publishes).
    pub fn for_key(key: &crate::ca::PrivateKey, kid: &str) -> Self {
        let p = jwt::public_jwk_params(key);
        let get = |k: &str| p.get(k).cloned();
        Self {
            keys: vec![Jwk {
                kty: get("kty").unwrap_or_default(),
                kid: Some(kid.into()),
                alg: Some(jwt::jws_alg(key.key_type()).into()),
                use_: Some("sig".into()),
                n: get("n"),
                e: get("e"),
                crv: get("crv"),
                x: get("x"),
                y: get("y"),
            }],
        }
    }
}
