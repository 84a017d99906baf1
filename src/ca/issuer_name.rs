//! Leaves carry their issuer's name byte for byte. rcgen rebuilds an issuer's name from a
//! map keyed by attribute type, so a CA subject that repeats a type (`DC=corp,DC=example`,
//! common from AD CS) loses an attribute, and a multi-valued RDN is refused outright: either
//! way the leaf's issuer no longer matches the CA's subject and no verifier builds the path.
//!
//! So rcgen builds the to-be-signed certificate with a placeholder issuer and a deferred
//! signer (no signature is computed), the CA's raw subject is put in its place, and the real
//! key signs the result once.

use rcgen::{
    CertificateParams, Issuer, KeyIdMethod, PublicKeyData, SignatureAlgorithm, SigningKey,
};
use x509_parser::certificate::X509Certificate;

use super::{
    cert::{subject_key_id, CertDer},
    der,
    error::CaError,
    key::PrivateKey,
};

const SEQUENCE: u8 = 0x30;
const BIT_STRING: u8 = 0x03;
const EXPLICIT_VERSION: u8 = 0xa0;

/// A key that lends rcgen its public half and algorithm but signs nothing.
pub(crate) struct DeferredKey(pub(crate) PrivateKey);

impl PublicKeyData for DeferredKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        PublicKeyData::algorithm(&self.0)
    }
}

impl SigningKey for DeferredKey {
    fn sign(&self, _msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(Vec::new())
    }
}

/// An rcgen issuer for `signer` whose name is a placeholder (replaced by [`finish`]) and
/// whose key identifier is the signer's own SKI, so the leaf's AKI matches it.
pub(crate) fn issuer_for(
    signer: &X509Certificate<'_>,
    key: PrivateKey,
) -> Issuer<'static, DeferredKey> {
    let mut params = CertificateParams::default();
    if let Some(ski) = subject_key_id(signer) {
        params.key_identifier_method = KeyIdMethod::PreSpecified(ski);
    }
    Issuer::new(params, DeferredKey(key))
}

/// Replaces the issuer name of an unsigned certificate (as rcgen wrote it with a
/// [`DeferredKey`]) with `issuer_raw` and signs it with `key`.
pub(crate) fn finish(
    unsigned: &[u8],
    issuer_raw: &[u8],
    key: &PrivateKey,
) -> Result<CertDer, CaError> {
    let malformed = || CaError::Crypto("rcgen wrote a certificate meshid cannot re-read".into());
    let (tag, outer, _) = der::read_tlv(unsigned).ok_or_else(malformed)?;
    if tag != SEQUENCE {
        return Err(malformed());
    }
    let (tbs, rest) = split_tlv(outer).ok_or_else(malformed)?;
    let (alg, _) = split_tlv(rest).ok_or_else(malformed)?;
    let tbs = replace_issuer(tbs, issuer_raw).ok_or_else(malformed)?;
    let signature = key
        .signer()
        .sign(&tbs)
        .map_err(|e| CaError::Crypto(format!("signing failed: {e}")))?;
    let mut bits = vec![0u8];
    bits.extend_from_slice(&signature);
    let mut body = tbs;
    body.extend_from_slice(alg);
    body.extend(der::tlv(BIT_STRING, &bits));
    Ok(CertDer::from(der::tlv(SEQUENCE, &body)))
}

/// One whole TLV (header included) and what follows it.
fn split_tlv(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let (_, _, rest) = der::read_tlv(input)?;
    Some(input.split_at(input.len() - rest.len()))
}

/// The TBSCertificate with its issuer field (after version, serial and signature) replaced.
fn replace_issuer(tbs: &[u8], issuer_raw: &[u8]) -> Option<Vec<u8>> {
    let (tag, mut fields, _) = der::read_tlv(tbs)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut body = Vec::with_capacity(tbs.len() + issuer_raw.len());
    let before = if fields.first() == Some(&EXPLICIT_VERSION) {
        3
    } else {
        2
    };
    for _ in 0..before {
        let (field, rest) = split_tlv(fields)?;
        body.extend_from_slice(field);
        fields = rest;
    }
    let (_, rest) = split_tlv(fields)?;
    body.extend_from_slice(issuer_raw);
    body.extend_from_slice(rest);
    Some(der::tlv(SEQUENCE, &body))
}
