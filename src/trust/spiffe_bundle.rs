//! The SPIFFE bundle format (SPIFFE Trust Domain and Bundle spec, section 4): a JWK Set with
//! one key per trusted X.509 authority (`"use": "x509-svid"`, a single-certificate `x5c`, the
//! key's own parameters), plus `spiffe_sequence` and `spiffe_refresh_hint`.
//!
//! Consumers read it as a go-jose `JSONWebKeySet` (Istio's `pkg/spiffe` RetrieveSpiffeBundleRootCerts,
//! SPIRE's `pkg/common/bundleutil` Decode / go-spiffe `spiffebundle.Parse`): go-jose refuses a
//! key whose `kty`/`crv`/`x`/`y` or `n`/`e` do not match its `x5c` certificate, so they are
//! written exactly; `kid` is not needed for X.509 authorities.

use std::time::Duration;

use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine,
};
use serde_json::{json, Map, Value};
use thiserror::Error;
use x509_parser::{
    oid_registry::{OID_EC_P256, OID_NIST_EC_P384, OID_NIST_EC_P521},
    public_key::PublicKey,
    x509::SubjectPublicKeyInfo,
};

use crate::ca::{cert, CertDer};

/// The spec's suggested refresh hint, and meshid's default.
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);

const X509_SVID: &str = "x509-svid";

/// A trust domain's X.509 authorities as a SPIFFE bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeBundle {
    pub roots: Vec<CertDer>,
    /// `spiffe_sequence`: increases on every change of the bundle.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`: how often consumers should poll.
    pub refresh_hint: Option<Duration>,
}

/// Why a bundle document was refused; nothing of it is used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("bundle is not a JSON object: {0}")]
    NotJson(String),
    #[error("bundle has no \"keys\" array (a SPIFFE bundle is a JWK Set)")]
    NoKeys,
    #[error("bundle key {index} is not a JSON object")]
    KeyNotObject { index: usize },
    #[error(
        "bundle key {index} (x509-svid) has an empty x5c; it must hold exactly one certificate"
    )]
    EmptyX5c { index: usize },
    #[error(
        "bundle key {index} (x509-svid) has {count} certificates in x5c; it must hold exactly one"
    )]
    MultipleX5c { index: usize, count: usize },
    #[error("bundle key {index}: certificate is unusable: {why}")]
    CertificateInvalid { index: usize, why: String },
    #[error("bundle key {index}: certificate is not a CA ({why}); X.509 authorities must be CA certificates")]
    NotCa { index: usize, why: String },
    #[error("bundle key {index}: its JWK parameters do not match its x5c certificate's key")]
    KeyMismatch { index: usize },
    #[error("bundle key {index} repeats the certificate of key {first}")]
    Duplicate { index: usize, first: usize },
    #[error("bundle holds no x509-svid key: nothing to trust")]
    NoAuthorities,
    #[error("bundle field {field} is not a non-negative integer")]
    BadField { field: &'static str },
    #[error("bundle sequence {got} is below the stored {stored}: refusing to go back")]
    SequenceWentBack { stored: u64, got: u64 },
}

// === impl SpiffeBundle ===

impl SpiffeBundle {
    /// Serializes the bundle: one JWK per root, keys in order.
    pub fn to_json(&self) -> Result<String, BundleError> {
        let keys = self
            .roots
            .iter()
            .enumerate()
            .map(|(index, c)| {
                jwk_of(c).ok_or(BundleError::CertificateInvalid {
                    index,
                    why: "its key is not EC P-256/P-384/P-521 or RSA".into(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        if let Some(s) = self.sequence {
            doc.insert("spiffe_sequence".into(), json!(s));
        }
        if let Some(h) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), json!(h.as_secs()));
        }
        Ok(serde_json::to_string_pretty(&Value::Object(doc)).expect("a JSON value serializes"))
    }

    /// Parses and checks a bundle document. Keys whose `use` is not `x509-svid` (JWT
    /// authorities) or whose `kty` is unknown are skipped, as the spec says.
    pub fn parse(json: &[u8]) -> Result<Self, BundleError> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| BundleError::NotJson(e.to_string()))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(BundleError::NoKeys)?;
        let mut roots: Vec<(usize, CertDer)> = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            let key = key.as_object().ok_or(BundleError::KeyNotObject { index })?;
            let known_kty = matches!(key.get("kty").and_then(Value::as_str), Some("EC" | "RSA"));
            if key.get("use").and_then(Value::as_str) != Some(X509_SVID) || !known_kty {
                continue;
            }
            let c = authority(index, key)?;
            if let Some((first, _)) = roots.iter().find(|(_, r)| r.as_ref() == c.as_ref()) {
                return Err(BundleError::Duplicate {
                    index,
                    first: *first,
                });
            }
            roots.push((index, c));
        }
        if roots.is_empty() {
            return Err(BundleError::NoAuthorities);
        }
        Ok(Self {
            roots: roots.into_iter().map(|(_, c)| c).collect(),
            sequence: uint(&doc, "spiffe_sequence")?,
            refresh_hint: uint(&doc, "spiffe_refresh_hint")?.map(Duration::from_secs),
        })
    }

    /// Refuses `self` as the successor of a stored bundle whose highest sequence is `floor`:
    /// a sequence before it is a rollback. Sequences are compared as RFC 1982 serial numbers
    /// (64 bits), so a publisher that reached 2^64-1 is not locked out: the next numbers
    /// after it (0, 1, ...) come later. A bundle without a sequence is taken (SPIFFE
    /// federation spec 4.2: the most recently retrieved bundle is then the latest); the
    /// caller keeps the floor, so it does not reset the check for the bundles after it.
    pub fn check_successor_of(&self, floor: Option<u64>) -> Result<(), BundleError> {
        match (floor, self.sequence) {
            (Some(stored), Some(got)) if serial_before(got, stored) => {
                Err(BundleError::SequenceWentBack { stored, got })
            }
            _ => Ok(()),
        }
    }
}

/// RFC 1982 section 3.2, SERIAL_BITS = 64: whether `a` comes before `b`. Values exactly half
/// the space apart are undefined there; they count as not before (the newer bundle is taken).
pub fn serial_before(a: u64, b: u64) -> bool {
    let d = b.wrapping_sub(a);
    d != 0 && d < 1 << 63
}

/// The later of two sequences in RFC 1982 order.
pub fn serial_max(a: u64, b: u64) -> u64 {
    if serial_before(a, b) {
        b
    } else {
        a
    }
}

fn uint(doc: &Value, field: &'static str) -> Result<Option<u64>, BundleError> {
    match doc.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(BundleError::BadField { field }),
    }
}

/// The single certificate of an x509-svid key, checked: a CA, and the key it carries.
fn authority(index: usize, key: &Map<String, Value>) -> Result<CertDer, BundleError> {
    let x5c = key.get("x5c").and_then(Value::as_array);
    let b64 = match x5c.map(Vec::as_slice) {
        None | Some([]) => return Err(BundleError::EmptyX5c { index }),
        Some([one]) => one.as_str().ok_or(BundleError::CertificateInvalid {
            index,
            why: "x5c entry is not a string".into(),
        })?,
        Some(more) => {
            return Err(BundleError::MultipleX5c {
                index,
                count: more.len(),
            })
        }
    };
    let invalid = |why: String| BundleError::CertificateInvalid { index, why };
    let der = CertDer::from(
        STANDARD
            .decode(b64)
            .map_err(|e| invalid(format!("x5c is not base64 ({e})")))?,
    );
    let parsed = cert::parse(&der, "x5c").map_err(|e| invalid(e.to_string()))?;
    if let Some(why) = cert::signing_cert_problem(&parsed) {
        return Err(BundleError::NotCa {
            index,
            why: why.to_string(),
        });
    }
    let want = jwk_params(parsed.public_key())
        .ok_or_else(|| invalid("its key is not EC P-256/P-384/P-521 or RSA".into()))?;
    for (name, value) in want.as_object().expect("jwk_params builds an object") {
        if key.get(name) != Some(value) {
            return Err(BundleError::KeyMismatch { index });
        }
    }
    Ok(der)
}

/// The JWK of a CA certificate as an x509-svid authority.
fn jwk_of(c: &CertDer) -> Option<Value> {
    let parsed = cert::parse(c, "root").ok()?;
    let mut jwk = jwk_params(parsed.public_key())?;
    let obj = jwk.as_object_mut()?;
    obj.insert("use".into(), json!(X509_SVID));
    obj.insert("x5c".into(), json!([STANDARD.encode(c.as_ref())]));
    Some(jwk)
}

/// `kty` and the public key parameters (RFC 7518 section 6), as go-jose writes them.
fn jwk_params(spki: &SubjectPublicKeyInfo<'_>) -> Option<Value> {
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    match spki.parsed().ok()? {
        PublicKey::EC(point) => {
            let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
            let (crv, size) = if curve == OID_EC_P256 {
                ("P-256", 32)
            } else if curve == OID_NIST_EC_P384 {
                ("P-384", 48)
            } else if curve == OID_NIST_EC_P521 {
                ("P-521", 66)
            } else {
                return None;
            };
            let data = point.data();
            if data.len() != 1 + 2 * size || data[0] != 0x04 {
                return None; // compressed points are not valid in a JWK
            }
            Some(json!({
                "kty": "EC",
                "crv": crv,
                "x": b64(&data[1..1 + size]),
                "y": b64(&data[1 + size..]),
            }))
        }
        PublicKey::RSA(rsa) => {
            let strip = |b: &[u8]| {
                b.iter()
                    .skip_while(|x| **x == 0)
                    .copied()
                    .collect::<Vec<u8>>()
            };
            Some(json!({
                "kty": "RSA",
                "n": b64(&strip(rsa.modulus)),
                "e": b64(&strip(rsa.exponent)),
            }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ca::{root, KeyType},
        spiffe::TrustDomain,
    };

    fn ca() -> CertDer {
        let td = TrustDomain::new("example.org").unwrap();
        root::generate_root(
            &td,
            KeyType::EcdsaP256,
            root::DEFAULT_ROOT_TTL,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap()
        .cert
    }

    fn doc(keys: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"keys": keys, "spiffe_sequence": 3})).unwrap()
    }

    fn key_of(c: &CertDer) -> Value {
        jwk_of(c).unwrap()
    }

    #[test]
    fn round_trips_with_sequence_and_hint() {
        let (a, b) = (ca(), ca());
        let bundle = SpiffeBundle {
            roots: vec![a, b],
            sequence: Some(7),
            refresh_hint: Some(DEFAULT_REFRESH_HINT),
        };
        let json = bundle.to_json().unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        let k0 = &v["keys"][0];
        assert_eq!(k0["use"], "x509-svid");
        assert_eq!(k0["kty"], "EC");
        assert_eq!(k0["crv"], "P-256");
        assert_eq!(k0["x5c"].as_array().unwrap().len(), 1);
        assert!(k0.get("kid").is_none());
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        assert_eq!(SpiffeBundle::parse(json.as_bytes()).unwrap(), bundle);
    }

    /// One row per refusal rule of the spec (and go-jose's key check); each names its rule.
    #[test]
    fn refusals() {
        let (a, b) = (ca(), ca());
        let leafish = {
            // A key whose certificate is not a CA: a leaf from an authority.
            let td = TrustDomain::new("example.org").unwrap();
            let r = root::generate_root(
                &td,
                KeyType::EcdsaP256,
                root::DEFAULT_ROOT_TTL,
                time::OffsetDateTime::now_utc(),
            )
            .unwrap();
            let auth = crate::ca::Authority::new(
                td.clone(),
                crate::ca::SigningMaterial {
                    signer_cert: r.cert.clone(),
                    signer_key: r.key,
                    intermediates: vec![],
                    roots: vec![r.cert],
                },
                Default::default(),
                std::sync::Arc::new(crate::clock::SystemClock),
            )
            .unwrap();
            let id = crate::spiffe::SpiffeId::parse("spiffe://example.org/w").unwrap();
            auth.issue_with_new_key(&id, None).unwrap().0.leaf
        };
        let mut mismatched = key_of(&a);
        mismatched["x"] = key_of(&b)["x"].clone();
        let mut two = key_of(&a);
        two["x5c"] = json!([STANDARD.encode(a.as_ref()), STANDARD.encode(b.as_ref())]);
        let mut empty = key_of(&a);
        empty["x5c"] = json!([]);
        let rows: Vec<(&str, Vec<u8>, BundleError)> = vec![
            (
                "not JSON",
                b"nope".to_vec(),
                BundleError::NotJson(String::new()),
            ),
            (
                "no keys",
                br#"{"spiffe_sequence":1}"#.to_vec(),
                BundleError::NoKeys,
            ),
            (
                "empty x5c",
                doc(json!([empty])),
                BundleError::EmptyX5c { index: 0 },
            ),
            (
                "two certs in x5c",
                doc(json!([two])),
                BundleError::MultipleX5c { index: 0, count: 2 },
            ),
            (
                "duplicate key",
                doc(json!([key_of(&a), key_of(&b), key_of(&a)])),
                BundleError::Duplicate { index: 2, first: 0 },
            ),
            (
                "not a CA",
                doc(json!([key_of(&leafish)])),
                BundleError::NotCa {
                    index: 0,
                    why: String::new(),
                },
            ),
            (
                "JWK does not match x5c",
                doc(json!([mismatched])),
                BundleError::KeyMismatch { index: 0 },
            ),
            (
                "only JWT keys",
                doc(json!([{"use": "jwt-svid", "kty": "EC", "kid": "k"}])),
                BundleError::NoAuthorities,
            ),
            (
                "negative sequence",
                serde_json::to_vec(&json!({"keys": [key_of(&a)], "spiffe_sequence": -1})).unwrap(),
                BundleError::BadField {
                    field: "spiffe_sequence",
                },
            ),
        ];
        for (rule, input, want) in rows {
            let got = SpiffeBundle::parse(&input).expect_err(rule);
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{rule}: {got}"
            );
        }
    }

    #[test]
    fn unknown_use_and_kty_are_skipped() {
        let a = ca();
        let mut odd_kty = key_of(&a);
        odd_kty["kty"] = json!("OKP");
        let input = doc(json!([
            {"use": "something-new", "kty": "EC"},
            odd_kty,
            key_of(&a),
        ]));
        let b = SpiffeBundle::parse(&input).unwrap();
        assert_eq!(b.roots, vec![a]);
        assert_eq!(b.sequence, Some(3));
        assert_eq!(b.refresh_hint, None);
    }

    /// SPIFFE federation spec 4.2 (the sequence orders bundles; a bundle without one is the
    /// latest retrieved) and RFC 1982 serial order, one row per rule. SPIRE's
    /// `pkg/server/bundle/client/updater.go` `UpdateBundle` stores any bundle that differs;
    /// meshid keeps the rollback check but never locks a publisher out.
    #[test]
    fn sequence_rules_refuse_rollback_and_never_lock_out() {
        let with = |sequence: Option<u64>| SpiffeBundle {
            roots: vec![ca()],
            sequence,
            refresh_hint: None,
        };
        let max = u64::MAX;
        let rows: [(&str, Option<u64>, Option<u64>, bool); 10] = [
            ("a lower sequence is a rollback", Some(5), Some(4), false),
            (
                "a jump of more than 2^63 is a step back",
                Some(5),
                Some(max),
                false,
            ),
            (
                "the same sequence is not a rollback",
                Some(5),
                Some(5),
                true,
            ),
            ("a higher sequence is taken", Some(5), Some(6), true),
            ("nothing stored: anything is taken", None, Some(1), true),
            (
                "no sequence: the latest retrieved is taken",
                Some(5),
                None,
                true,
            ),
            ("after 2^64-1 comes 0", Some(max), Some(0), true),
            (
                "after 2^64-1 a re-initialised peer's 3 is taken",
                Some(max),
                Some(3),
                true,
            ),
            (
                "2^64-1 after 1 is a rollback by wrap-around",
                Some(1),
                Some(max),
                false,
            ),
            (
                "2^64-1 after 2^64-2 is taken",
                Some(max - 1),
                Some(max),
                true,
            ),
        ];
        for (rule, floor, got, ok) in rows {
            assert_eq!(with(got).check_successor_of(floor).is_ok(), ok, "{rule}");
        }
        assert_eq!(
            with(Some(4)).check_successor_of(Some(5)),
            Err(BundleError::SequenceWentBack { stored: 5, got: 4 })
        );
        assert_eq!(serial_max(max, 3), 3);
        assert_eq!(serial_max(3, 2), 3);
    }
}
