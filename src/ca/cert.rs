//! Certificates as DER bytes, PEM in and out, and serial numbers.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{pem::PemObject, CertificateDer};
use x509_parser::{certificate::X509Certificate, extensions::ParsedExtension};

use super::error::{CaError, CannotSign};

/// A DER-encoded X.509 certificate.
pub type CertDer = CertificateDer<'static>;

/// Parses every `CERTIFICATE` block of a PEM text. `what` names the source in errors.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertDer>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::CertificateInvalid {
            what: what.to_owned(),
            why: format!("bad PEM ({e})"),
        })?;
    if certs.is_empty() {
        return Err(CaError::CertificateInvalid {
            what: what.to_owned(),
            why: "no CERTIFICATE PEM block".into(),
        });
    }
    for cert in &certs {
        parse(cert, what)?;
    }
    Ok(certs)
}

/// Parses a certificate, naming `what` in the error.
pub fn parse<'a>(der: &'a CertDer, what: &str) -> Result<X509Certificate<'a>, CaError> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CaError::CertificateInvalid {
            what: what.to_owned(),
            why: format!("not a valid X.509 certificate ({e})"),
        })?;
    if !rest.is_empty() {
        return Err(CaError::CertificateInvalid {
            what: what.to_owned(),
            why: "trailing bytes after the certificate".into(),
        });
    }
    Ok(cert)
}

/// Why a certificate cannot sign others, or `None` if it can (CA:true, keyCertSign if keyUsage
/// is present).
pub fn signing_cert_problem(c: &X509Certificate<'_>) -> Option<CannotSign> {
    match c.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Some(CannotSign::NotCa),
        Err(e) => return Some(CannotSign::BasicConstraintsUnreadable(e)),
    }
    match c.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => Some(CannotSign::NoKeyCertSign),
        Ok(_) => None,
        Err(e) => Some(CannotSign::KeyUsageUnreadable(e)),
    }
}

/// The subject key identifier of a certificate, if it has one.
pub(crate) fn subject_key_id(c: &X509Certificate<'_>) -> Option<Vec<u8>> {
    c.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

/// PEM-encodes one certificate.
pub fn to_pem(der: &[u8]) -> String {
    const LINE: usize = 64;
    let b64 = base64_encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / LINE + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(LINE) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// PEM-encodes several certificates, in order.
pub fn to_pem_bundle<'a>(certs: impl IntoIterator<Item = &'a CertDer>) -> String {
    certs.into_iter().map(|c| to_pem(c)).collect()
}

pub(crate) fn base64_encode(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Short, stable identifier of a certificate: the first 8 bytes of SHA-256 over its DER, in hex.
pub fn fingerprint_id(der: &[u8]) -> String {
    hex(&ring::digest::digest(&ring::digest::SHA256, der).as_ref()[..8])
}

/// A certificate serial number: 128 random bits, never derived from the key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Serial([u8; 16]);

// === impl Serial ===

impl Serial {
    /// Draws a fresh random serial from the system CSPRNG.
    pub fn random() -> Result<Self, CaError> {
        let mut bytes = [0u8; 16];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| CaError::Crypto("system random number generator failed".into()))?;
        // Always 16 content octets in DER: positive (top bit clear, so no 0x00 pad) and a
        // non-zero first octet (so none is dropped); RFC 5280 4.1.2.2 wants a positive integer
        // of at most 20 octets. 120+ random bits remain.
        bytes[0] = (bytes[0] & 0x7f).max(1);
        Ok(Self(bytes))
    }

    /// The serial's 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub(crate) fn to_rcgen(&self) -> rcgen::SerialNumber {
        // rcgen writes the INTEGER as positive, adding a 0x00 when the top bit is set.
        rcgen::SerialNumber::from_slice(&self.0)
    }

    /// Whether the raw DER INTEGER content of a certificate's serial is this serial.
    pub fn matches_raw(&self, raw: &[u8]) -> bool {
        let raw = raw.strip_prefix(&[0]).unwrap_or(raw);
        let ours = &self.0[self.0.iter().take_while(|b| **b == 0).count()..];
        raw == ours
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(i.as_bytes()), o);
        }
    }

    #[test]
    fn serials_differ_and_match_their_encoding() {
        let a = Serial::random().unwrap();
        let b = Serial::random().unwrap();
        assert_ne!(a, b);
        let mut raw = vec![0u8];
        raw.extend_from_slice(a.as_bytes());
        assert!(a.matches_raw(&raw));
        assert!(a.matches_raw(a.as_bytes()));
        assert!(!a.matches_raw(b.as_bytes()));
    }

    /// Every serial is 16 DER content octets: a leading zero octet (1 draw in 256 before) was
    /// dropped by the encoding, so `cert inspect` printed 30 hex digits instead of 32.
    #[test]
    fn serials_always_encode_to_sixteen_octets() {
        for _ in 0..2048 {
            let s = Serial::random().unwrap();
            let first = s.as_bytes()[0];
            assert!(first != 0 && first < 0x80, "{first:#x}");
        }
    }
}
