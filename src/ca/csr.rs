//! Certificate signing requests: parse, check the key, verify the signature, check the SANs.
//! Nothing in a CSR but its public key reaches an issued certificate: policy decides the rest.

use rustls_pki_types::{pem::PemObject, CertificateSigningRequestDer};
use x509_parser::{
    certification_request::X509CertificationRequest,
    extensions::{GeneralName, ParsedExtension},
    prelude::FromDer,
};

use super::{
    cert,
    error::CaError,
    sig::{self, PublicKeyKind, SigError},
};
use crate::spiffe::SpiffeId;

/// Minimum RSA modulus size accepted in a CSR.
pub const MIN_RSA_BITS: usize = 2048;
/// Maximum RSA modulus size (ring verifies up to 8192 bits).
pub const MAX_RSA_BITS: usize = 8192;

/// What a CSR's SANs are held to. Whatever they say, only the identity policy decides reaches
/// the certificate; this decides whether a CSR asking for another one is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SanCheck {
    /// No SAN, or exactly the identity being issued (meshid's default).
    #[default]
    MatchIdentity,
    /// The SANs are not read (istiod's rule: `CreateCertificate` signs for the authenticated
    /// caller, or the identity a trusted node agent impersonates, whatever the CSR asks).
    Ignore,
}

/// A CSR whose signature verified and whose SANs fit the caller: only its public key is kept.
#[derive(Debug)]
pub struct VerifiedCsr {
    spki_der: Vec<u8>,
    public_key_raw: Vec<u8>,
    is_rsa: bool,
}

// === impl VerifiedCsr ===

impl VerifiedCsr {
    /// Parses and checks a CSR (PEM or DER) sent by `caller`.
    pub fn verify(csr: &[u8], caller: &SpiffeId) -> Result<Self, CaError> {
        Self::verify_with(csr, caller, SanCheck::MatchIdentity)
    }

    /// As [`verify`](Self::verify), holding the SANs to `sans`.
    pub fn verify_with(csr: &[u8], caller: &SpiffeId, sans: SanCheck) -> Result<Self, CaError> {
        let der = decode(csr)?;
        let (rest, req) = X509CertificationRequest::from_der(&der)
            .map_err(|e| CaError::CsrMalformed(format!("not a PKCS#10 request ({e})")))?;
        if !rest.is_empty() {
            return Err(CaError::CsrMalformed(
                "trailing bytes after the request".into(),
            ));
        }
        let info = &req.certification_request_info;
        let kind = check_key(&info.subject_pki)?;
        match sig::verify(
            &info.subject_pki,
            &req.signature_algorithm,
            &req.signature_value.data,
            info.raw,
        ) {
            Ok(()) => {}
            Err(SigError::Invalid) => return Err(CaError::CsrSignatureInvalid),
            Err(SigError::Unsupported(algorithm)) => {
                return Err(CaError::CsrSignatureAlgorithmUnsupported { algorithm })
            }
        }
        check_extensions(&req)?;
        if sans == SanCheck::MatchIdentity {
            check_sans(&req, caller)?;
        }
        Ok(Self {
            spki_der: info.subject_pki.raw.to_vec(),
            public_key_raw: info.subject_pki.subject_public_key.data.to_vec(),
            is_rsa: matches!(kind, PublicKeyKind::Rsa { .. }),
        })
    }

    /// The DER SubjectPublicKeyInfo of the requester's key.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The raw public key (as in a certificate's SPKI bit string).
    pub fn public_key_raw(&self) -> &[u8] {
        &self.public_key_raw
    }

    /// Whether the key is RSA (RSA leaves may carry keyEncipherment).
    pub fn is_rsa(&self) -> bool {
        self.is_rsa
    }
}

/// At most this many extensions in a request (istio-agent and ztunnel ask for one: the SAN).
const MAX_REQUESTED_EXTENSIONS: usize = 16;

/// The extensions a request asks for. meshid copies none of them into a certificate (its
/// profile decides), but it issues nothing on a request it cannot read as well-formed: an
/// extension asked for twice (RFC 5280 4.2: at most one instance of each), a critical one it
/// does not understand (the requester asks not to be served unless it is honoured, and it will
/// not be), or more than [`MAX_REQUESTED_EXTENSIONS`]. Stricter than istiod on purpose: its
/// `util.ParsePemEncodedCSR` reads the request with Go's `x509.ParseCertificateRequest`, which
/// checks duplicate extensions in certificates only and keeps unknown critical ones, and signs
/// with its own template whatever they say. istio-agent's CSRs (`pkiutil.GenCSR`) ask for one
/// SAN extension, which passes (the interop suite's pilot-agent and CSR-client rows).
fn check_extensions(req: &X509CertificationRequest<'_>) -> Result<(), CaError> {
    use x509_parser::{cri_attributes::ParsedCriAttribute, extensions::ParsedExtension};
    let mut seen = std::collections::BTreeSet::new();
    for attr in req.certification_request_info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(er) = attr.parsed_attribute() else {
            continue;
        };
        if er.extensions.len() > MAX_REQUESTED_EXTENSIONS {
            return Err(CaError::CsrMalformed(format!(
                "{} requested extensions; at most {MAX_REQUESTED_EXTENSIONS}",
                er.extensions.len()
            )));
        }
        for ext in &er.extensions {
            let oid = ext.oid.to_id_string();
            if !seen.insert(oid.clone()) {
                return Err(CaError::CsrMalformed(format!(
                    "extension {oid} is requested twice"
                )));
            }
            let unknown = matches!(
                ext.parsed_extension(),
                ParsedExtension::UnsupportedExtension { .. } | ParsedExtension::ParseError { .. }
            );
            if ext.critical && unknown {
                return Err(CaError::CsrMalformed(format!(
                    "critical extension {oid} is not one meshid understands; no certificate carries a requested extension"
                )));
            }
        }
    }
    Ok(())
}

fn decode(csr: &[u8]) -> Result<Vec<u8>, CaError> {
    let text = csr.trim_ascii_start();
    if text.starts_with(b"-----BEGIN") {
        // Go and older OpenSSL write "NEW CERTIFICATE REQUEST"; accept both labels.
        let normalized;
        let pem = if text.starts_with(b"-----BEGIN NEW CERTIFICATE REQUEST-----") {
            normalized = String::from_utf8_lossy(text)
                .replace("NEW CERTIFICATE REQUEST", "CERTIFICATE REQUEST");
            normalized.as_bytes()
        } else {
            text
        };
        let der = CertificateSigningRequestDer::from_pem_slice(pem).map_err(|e| {
            CaError::CsrMalformed(format!("no CERTIFICATE REQUEST PEM block ({e})"))
        })?;
        Ok(der.as_ref().to_vec())
    } else {
        Ok(csr.to_vec())
    }
}

fn check_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<PublicKeyKind, CaError> {
    let kind = PublicKeyKind::of(spki);
    match kind {
        PublicKeyKind::EcdsaP256 | PublicKeyKind::EcdsaP384 => Ok(kind),
        PublicKeyKind::Rsa { bits } if bits < MIN_RSA_BITS => Err(CaError::CsrKeyTooSmall {
            bits,
            min: MIN_RSA_BITS,
        }),
        PublicKeyKind::Rsa { bits } if bits > MAX_RSA_BITS => Err(CaError::CsrKeyUnsupported {
            algorithm: format!("rsa-{bits} (above {MAX_RSA_BITS} bits)"),
        }),
        PublicKeyKind::Rsa { .. } => Ok(kind),
        PublicKeyKind::EcdsaP521 | PublicKeyKind::Other => Err(CaError::CsrKeyUnsupported {
            algorithm: kind.name(spki),
        }),
    }
}

fn check_sans(req: &X509CertificationRequest<'_>, caller: &SpiffeId) -> Result<(), CaError> {
    let mut uris = Vec::new();
    for ext in req.requested_extensions().into_iter().flatten() {
        let ParsedExtension::SubjectAlternativeName(san) = ext else {
            continue;
        };
        for name in &san.general_names {
            match name {
                GeneralName::URI(uri) => uris.push(*uri),
                other => {
                    let (kind, value) = describe(other);
                    return Err(CaError::CsrSanNotAllowed { kind, value });
                }
            }
        }
    }
    match uris.as_slice() {
        [] => Ok(()),
        [one] if *one == caller.to_string() => Ok(()),
        [one] => Err(CaError::CsrForeignSan {
            requested: (*one).to_owned(),
            caller: caller.clone(),
        }),
        many => Err(CaError::CsrMultipleUriSans { count: many.len() }),
    }
}

fn describe(name: &GeneralName<'_>) -> (&'static str, String) {
    match name {
        GeneralName::DNSName(d) => ("DNS", (*d).to_owned()),
        GeneralName::RFC822Name(e) => ("email", (*e).to_owned()),
        GeneralName::IPAddress(ip) => ("IP", format_ip(ip)),
        GeneralName::DirectoryName(dn) => ("directory name", dn.to_string()),
        other => ("other", format!("{other:?}")),
    }
}

fn format_ip(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).expect("4 bytes")).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).expect("16 bytes")).to_string(),
        _ => cert::hex(bytes),
    }
}
