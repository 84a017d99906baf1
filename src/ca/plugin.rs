//! Importing a plug-in CA: Istio's `cacerts` layout (`ca-cert.pem`, `ca-key.pem`,
//! `root-cert.pem`, `cert-chain.pem`) or the cert-manager layout (`tls.crt`, `tls.key`, `ca.crt`).

use std::path::Path;

use time::OffsetDateTime;

use super::{
    authority::SigningMaterial,
    cert::{self, CertDer},
    chain,
    error::CaError,
    key::PrivateKey,
};

const ISTIO_FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "root-cert.pem",
    "cert-chain.pem",
];
const TLS_FILES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];

/// Loads and checks a plug-in CA directory. Refuses, naming the problem, an incomplete set,
/// a key that does not match its certificate, a signing cert that is not a CA, or a chain
/// that does not verify to the root at `now`.
///
/// The acceptance rules are istiod's (`pilot/pkg/bootstrap/istio_ca.go` detectSigningCABundle,
/// `security/pkg/pki/util/keycertbundle.go` Verify): `tls.crt` wins when both layouts are
/// present; an empty `cert-chain.pem` means no intermediates; the chain files are an
/// unordered pool from which the path to a root is built, and what is not on it is ignored.
pub fn load_plugin_dir(dir: &Path, now: OffsetDateTime) -> Result<SigningMaterial, CaError> {
    let has = |f: &str| dir.join(f).is_file();
    let (cert_f, key_f, root_f, chain_f) = if has(TLS_FILES[0]) {
        require(dir, &TLS_FILES)?;
        ("tls.crt", "tls.key", "ca.crt", None)
    } else if ISTIO_FILES.iter().any(|f| has(f)) {
        require(dir, &ISTIO_FILES)?;
        (
            "ca-cert.pem",
            "ca-key.pem",
            "root-cert.pem",
            Some("cert-chain.pem"),
        )
    } else if TLS_FILES.iter().any(|f| has(f)) {
        require(dir, &TLS_FILES)?;
        ("tls.crt", "tls.key", "ca.crt", None)
    } else {
        return Err(CaError::PluginIncomplete {
            dir: dir.display().to_string(),
            missing: vec![ISTIO_FILES.join(", ") + " (or tls.crt, tls.key, ca.crt)"],
        });
    };
    let read = |f: &str| {
        std::fs::read(dir.join(f)).map_err(|e| CaError::CertificateInvalid {
            what: dir.join(f).display().to_string(),
            why: e.to_string(),
        })
    };
    let signer_chain = cert::certs_from_pem(&read(cert_f)?, cert_f)?;
    let roots = cert::certs_from_pem(&read(root_f)?, root_f)?;
    let signer_key = PrivateKey::from_pem(&read(key_f)?, key_f)?;
    let extra = match chain_f {
        Some(f) => certs_or_empty(&read(f)?, f)?,
        None => Vec::new(),
    };
    let signer_cert = signer_chain[0].clone();
    check_signer(&signer_cert, &signer_key, cert_f, key_f)?;
    let pool: Vec<CertDer> = signer_chain[1..]
        .iter()
        .chain(extra.iter())
        .cloned()
        .collect();
    let intermediates = chain::build_ca_path(&signer_cert, &pool, &roots, now)
        .map_err(|why| CaError::PluginChainInvalid { why })?;
    Ok(SigningMaterial {
        signer_cert,
        signer_key,
        intermediates,
        roots,
    })
}

/// The certificates of a chain file; a file with no PEM block at all (istiod writes an empty
/// `cert-chain.pem` for self-signed CAs) is an empty chain.
fn certs_or_empty(pem: &[u8], what: &str) -> Result<Vec<CertDer>, CaError> {
    if pem.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    cert::certs_from_pem(pem, what)
}

fn require(dir: &Path, files: &[&str]) -> Result<(), CaError> {
    let missing: Vec<String> = files
        .iter()
        .filter(|f| !dir.join(f).is_file())
        .map(|f| f.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CaError::PluginIncomplete {
            dir: dir.display().to_string(),
            missing,
        })
    }
}

fn check_signer(
    signer: &CertDer,
    key: &PrivateKey,
    cert_f: &str,
    key_f: &str,
) -> Result<(), CaError> {
    let parsed = cert::parse(signer, cert_f)?;
    if let Some(why) = cert::signing_cert_problem(&parsed) {
        return Err(CaError::PluginNotCa {
            what: cert_f.to_owned(),
            why,
        });
    }
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::PluginKeyMismatch {
            key: key_f.to_owned(),
            cert: cert_f.to_owned(),
        });
    }
    Ok(())
}
