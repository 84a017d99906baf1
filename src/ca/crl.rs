//! Certificate revocation lists of a plug-in CA (`ca-crl.pem`), checked and distributed as
//! Istio does: istiod reads `ca-crl.pem` next to the `cacerts` files
//! (`pilot/pkg/bootstrap/istio_ca.go` detectSigningCABundleAndCRL), checks it in
//! `security/pkg/pki/util/keycertbundle.go` Verify, and the agent puts it into the `crl` of the
//! `ROOTCA` validation context (`security/pkg/nodeagent/sds/sdsservice.go` toEnvoySecret),
//! leaving `only_verify_leaf_cert_crl` at its default (false). Envoy then needs a CRL from
//! every CA of a peer's chain, or it refuses revoked and unrevoked peers alike; so, like
//! istiod, meshid refuses a file that lacks a CRL from a CA on the signing path.

use std::path::Path;

use rustls_pki_types::{pem::PemObject, CertificateRevocationListDer};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, revocation_list::CertificateRevocationList};

use super::{
    authority::SigningMaterial,
    cert::{self, CertDer},
    chain,
    error::{CaError, CrlError},
    sig,
};

/// The file name istiod reads (`security/pkg/pki/ca/ca.go` CACRLFile).
pub const CRL_FILE: &str = "ca-crl.pem";

/// Reads `dir/ca-crl.pem` when present and checks it against `m` (see [`check_crls`]);
/// `None` when the directory has no such file.
pub fn load_plugin_crl(
    dir: &Path,
    m: &SigningMaterial,
    now: OffsetDateTime,
) -> Result<Option<String>, CaError> {
    let path = dir.join(CRL_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let file = path.display().to_string();
    let pem = std::fs::read(&path).map_err(|e| CaError::CrlInvalid {
        file: file.clone(),
        why: CrlError::Read(e),
    })?;
    check_crls(&pem, &file, m, now).map(Some)
}

/// Checks PEM CRLs for the CA `m` at `now`, naming `file` in errors, and returns them
/// re-encoded as PEM. Each CRL must parse, be signed by a certificate of the signing path or
/// one of the roots, and not be past its nextUpdate; every CA on the signing path (the
/// signer, the intermediates and the anchoring root) must have issued one of them; and none
/// may revoke a certificate of the signing path (peers would refuse every leaf).
pub fn check_crls(
    pem: &[u8],
    file: &str,
    m: &SigningMaterial,
    now: OffsetDateTime,
) -> Result<String, CaError> {
    check(pem, file, m, now).map_err(|why| CaError::CrlInvalid {
        file: file.to_owned(),
        why,
    })
}

fn check(
    pem: &[u8],
    file: &str,
    m: &SigningMaterial,
    now: OffsetDateTime,
) -> Result<String, CrlError> {
    let ders = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(CrlError::BadPem)?;
    if ders.is_empty() {
        return Err(CrlError::NoPemBlock);
    }
    let path = signing_path(m);
    let path_p = parse_certs(path.iter().copied(), file)?;
    let roots_p = parse_certs(m.roots.iter(), file)?;
    let mut covered = vec![false; path_p.len()];
    let mut out = String::new();
    for (i, der) in ders.iter().enumerate() {
        let n = i + 1;
        let (rest, crl) = x509_parser::parse_x509_crl(der.as_ref())
            .map_err(|e| CrlError::Unparsable { n, error: e.into() })?;
        if !rest.is_empty() {
            return Err(CrlError::TrailingData { n });
        }
        if let Signer::Path(i) = check_one(&crl, n, &path_p, &roots_p, now)? {
            covered[i] = true;
        }
        out.push_str(&to_pem(der.as_ref()));
    }
    if let Some(i) = covered.iter().position(|c| !c) {
        return Err(CrlError::MissingFrom {
            subject: path_p[i].subject().to_string(),
        });
    }
    Ok(out)
}

/// The signing path, signer first, then the root that anchors it (unless the signer is it).
fn signing_path(m: &SigningMaterial) -> Vec<&CertDer> {
    let mut path: Vec<&CertDer> = std::iter::once(&m.signer_cert)
        .chain(m.intermediates.iter())
        .collect();
    let last = m.intermediates.last().unwrap_or(&m.signer_cert);
    if let Some(i) = chain::anchor_index(last, &m.roots) {
        if m.roots[i].as_ref() != last.as_ref() {
            path.push(&m.roots[i]);
        }
    }
    path
}

/// Checks CRL number `n`: not expired, issued by a CA of the path (`Signer::Path`) or another
/// root, and revoking no certificate of the path below its issuer.
fn check_one(
    crl: &CertificateRevocationList<'_>,
    n: usize,
    path: &[X509Certificate<'_>],
    roots: &[X509Certificate<'_>],
    now: OffsetDateTime,
) -> Result<Signer, CrlError> {
    let issuer = || crl.issuer().to_string();
    if let Some(next) = crl.next_update() {
        if now > next.to_datetime() {
            return Err(CrlError::Expired {
                n,
                issuer: issuer(),
                next_update: next.to_datetime(),
            });
        }
    }
    let signer = path
        .iter()
        .position(|c| issued(crl, c))
        .map(Signer::Path)
        .or_else(|| {
            roots
                .iter()
                .any(|c| issued(crl, c))
                .then_some(Signer::OtherRoot)
        })
        .ok_or_else(|| CrlError::UnknownIssuer {
            n,
            issuer: issuer(),
        })?;
    // The certificate below the issuer on the path: revoking it breaks every leaf.
    if let Signer::Path(i @ 1..) = signer {
        let child = &path[i - 1];
        if revokes(crl, child) {
            return Err(CrlError::RevokesSigningPath {
                n,
                issuer: issuer(),
                subject: child.subject().to_string(),
                serial: child.raw_serial_as_string(),
            });
        }
    }
    Ok(signer)
}

fn parse_certs<'a>(
    certs: impl Iterator<Item = &'a CertDer>,
    file: &str,
) -> Result<Vec<X509Certificate<'a>>, CrlError> {
    certs
        .map(|c| cert::parse(c, file).map_err(|e| CrlError::Certificate(Box::new(e))))
        .collect()
}

enum Signer {
    Path(usize),
    OtherRoot,
}

/// True when `ca` issued `crl`: same name, a CA that may sign CRLs (CA:true, cRLSign when
/// keyUsage is present, as Go's `RevocationList.CheckSignatureFrom` demands), signature
/// verifies with its key.
fn issued(crl: &CertificateRevocationList<'_>, ca: &X509Certificate<'_>) -> bool {
    let is_ca = matches!(ca.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let may_sign = match ca.key_usage() {
        Ok(Some(ku)) => ku.value.crl_sign(),
        Ok(None) => true,
        Err(_) => false,
    };
    crl.issuer() == ca.subject()
        && is_ca
        && may_sign
        && sig::verify(
            ca.public_key(),
            &crl.signature_algorithm,
            &crl.signature_value.data,
            crl.tbs_cert_list.as_ref(),
        )
        .is_ok()
}

fn revokes(crl: &CertificateRevocationList<'_>, c: &X509Certificate<'_>) -> bool {
    crl.iter_revoked_certificates()
        .any(|r| r.raw_serial() == c.raw_serial())
}

/// PEM (`X509 CRL`) for one DER CRL.
pub fn to_pem(der: &[u8]) -> String {
    let b64 = cert::base64_encode(der);
    let mut out = String::from("-----BEGIN X509 CRL-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END X509 CRL-----\n");
    out
}

/// The CRLs to keep after importing `new` over `old` (both PEM, as [`check_crls`] returns):
/// a CRL of `old` stays unless `new` has one from the same issuer name, so a staged signer's
/// CRLs do not drop those of the CAs still signing. `None` when both are empty.
pub fn merge(old: Option<&str>, new: Option<&str>) -> Option<String> {
    let issuers = |pem: &str| -> Vec<(Vec<u8>, String)> {
        CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
            .filter_map(Result::ok)
            .filter_map(|d| {
                let (_, crl) = x509_parser::parse_x509_crl(d.as_ref()).ok()?;
                Some((crl.issuer().as_raw().to_vec(), to_pem(d.as_ref())))
            })
            .collect()
    };
    let new = new.map(issuers).unwrap_or_default();
    let mut out: String = old
        .map(issuers)
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, _)| !new.iter().any(|(n, _)| n == name))
        .map(|(_, pem)| pem)
        .collect();
    out.extend(new.into_iter().map(|(_, pem)| pem));
    (!out.is_empty()).then_some(out)
}
