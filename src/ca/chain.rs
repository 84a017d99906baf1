//! Chain verification. Leaf chains go through webpki (the verifier rustls uses), for both
//! serverAuth and clientAuth; CA chains (plug-in import) are walked by name and signature.

use rustls_pki_types::UnixTime;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;

use super::{
    cert::{self, CertDer},
    error::ChainError,
    sig,
};

fn unix_time(at: OffsetDateTime) -> UnixTime {
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        at.unix_timestamp().max(0) as u64
    ))
}

/// Verifies `leaf` up to one of `roots` through `intermediates` at `at`, as a TLS client
/// certificate and as a TLS server certificate.
pub fn verify_leaf(
    leaf: &CertDer,
    intermediates: &[CertDer],
    roots: &[CertDer],
    at: OffsetDateTime,
) -> Result<(), ChainError> {
    let anchors = roots
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ChainError::AnchorUnusable)?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(ChainError::LeafUnparsable)?;
    for (name, usage) in [
        ("clientAuth", webpki::KeyUsage::client_auth()),
        ("serverAuth", webpki::KeyUsage::server_auth()),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            unix_time(at),
            usage,
            None,
            None,
        )
        .map_err(|error| ChainError::LeafRejected { usage: name, error })?;
    }
    Ok(())
}

/// Verifies a chain that starts with a CA certificate (`chain[0]`, e.g. a plug-in signing
/// cert) up to one of `roots`: each link by issuer name and signature, each issuer a CA with
/// keyCertSign, each certificate valid at `at`.
pub fn verify_ca_chain(
    chain: &[CertDer],
    roots: &[CertDer],
    at: OffsetDateTime,
) -> Result<(), ChainError> {
    let roots_p = roots
        .iter()
        .map(|r| parsed(r, "root"))
        .collect::<Result<Vec<_>, _>>()?;
    let chain_p = chain
        .iter()
        .map(|c| parsed(c, "chain"))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(mut current) = chain_p.first() else {
        return Err(ChainError::Empty);
    };
    let mut rest = &chain_p[1..];
    for _ in 0..=chain_p.len() {
        check_time(current, at)?;
        if roots_p.iter().any(|r| r.as_raw() == current.as_raw()) {
            return check_path_len(&chain[..chain.len() - rest.len()]); // reached a trusted root itself
        }
        if let Some(i) = roots_p
            .iter()
            .position(|r| r.subject() == current.issuer() && signed_by(current, r).is_ok())
        {
            check_issuer_is_ca(&roots_p[i])?;
            check_time(&roots_p[i], at)?;
            let mut path = chain[..chain.len() - rest.len()].to_vec();
            path.push(roots[i].clone());
            return check_path_len(&path);
        }
        let Some((next, tail)) = rest.split_first() else {
            return Err(ChainError::NoIssuingRoot {
                subject: current.subject().to_string(),
                issuer: current.issuer().to_string(),
            });
        };
        if next.subject() != current.issuer() {
            return Err(ChainError::OutOfOrder {
                subject: current.subject().to_string(),
                next: next.subject().to_string(),
            });
        }
        check_issuer_is_ca(next)?;
        signed_by(current, next)?;
        current = next;
        rest = tail;
    }
    Err(ChainError::TooLong)
}

/// The deepest path meshid builds: signer, intermediates, root.
const MAX_PATH: usize = 8;

/// Builds the path from `signer` (a CA certificate) to one of `roots` through `pool`, as Go's
/// `x509.Certificate.Verify` does for istiod: the pool is unordered, every candidate issuer
/// (by name, then by signature) is tried, and certificates not on the path are ignored.
/// Returns the intermediates on the path, the signer's issuer first. Every link is checked
/// (CA with keyCertSign, valid at `at`), and so are path length constraints on every CA of
/// the path, the root's included.
pub fn build_ca_path(
    signer: &CertDer,
    pool: &[CertDer],
    roots: &[CertDer],
    at: OffsetDateTime,
) -> Result<Vec<CertDer>, ChainError> {
    let mut path = vec![signer.clone()];
    let mut last_err = None;
    if extend_path(&mut path, pool, roots, at, &mut last_err) {
        // signer, intermediates, root (the signer alone when it is the root).
        path.remove(0);
        path.pop();
        return Ok(path);
    }
    if let Some(e) = last_err {
        return Err(e);
    }
    let p = parsed(signer, "signing certificate")?;
    Err(ChainError::NoIssuer {
        subject: p.subject().to_string(),
        issuer: p.issuer().to_string(),
    })
}

/// Depth-first: true when `path` (signer first) was completed up to a root; on false, `path`
/// is as it was and `last_err` holds the most specific reason a candidate was refused.
fn extend_path(
    path: &mut Vec<CertDer>,
    pool: &[CertDer],
    roots: &[CertDer],
    at: OffsetDateTime,
    last_err: &mut Option<ChainError>,
) -> bool {
    let tip = path.last().expect("path starts with the signer").clone();
    let Ok(tip_p) = parsed(&tip, "chain") else {
        return false;
    };
    if let Err(e) = check_time(&tip_p, at) {
        *last_err = Some(e);
        return false;
    }
    for root in roots {
        if root.as_ref() == tip.as_ref() {
            return check_path_len(path)
                .map_err(|e| *last_err = Some(e))
                .is_ok();
        }
    }
    for root in roots {
        let Ok(rp) = parsed(root, "root") else {
            continue;
        };
        if rp.subject() != tip_p.issuer() {
            continue;
        }
        if let Err(e) = signed_by(&tip_p, &rp) {
            *last_err = Some(e);
            continue;
        }
        path.push(root.clone());
        let ok = check_issuer_is_ca(&rp)
            .and_then(|_| check_time(&rp, at))
            .and_then(|_| check_path_len(path));
        match ok {
            Ok(()) => return true,
            Err(e) => *last_err = Some(e),
        }
        path.pop();
    }
    if path.len() >= MAX_PATH {
        *last_err = Some(ChainError::NoPathWithin { max: MAX_PATH });
        return false;
    }
    for candidate in pool {
        let seen = path
            .iter()
            .chain(roots)
            .any(|c| c.as_ref() == candidate.as_ref());
        if seen {
            continue;
        }
        let Ok(cp) = parsed(candidate, "chain") else {
            continue;
        };
        if cp.subject() != tip_p.issuer() {
            continue;
        }
        if let Err(e) = signed_by(&tip_p, &cp).and_then(|_| check_issuer_is_ca(&cp)) {
            *last_err = Some(e);
            continue;
        }
        path.push(candidate.clone());
        if extend_path(path, pool, roots, at, last_err) {
            return true;
        }
        path.pop();
    }
    false
}

/// RFC 5280 4.2.1.9 over a whole path (signer first, root last): a CA certificate with
/// `pathlen:n` may have at most n CA certificates below it, the signer counting as none
/// (it issues only leaves). Go's verifier applies this to the root as well.
pub fn check_path_len(path: &[CertDer]) -> Result<(), ChainError> {
    for (below, c) in path.iter().enumerate() {
        let p = parsed(c, "chain")?;
        if let Ok(Some(bc)) = p.basic_constraints() {
            if let Some(max) = bc.value.path_len_constraint {
                if below > max as usize {
                    return Err(ChainError::PathLenExceeded {
                        subject: p.subject().to_string(),
                        max,
                        below,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Which of `roots` anchors `c`: the root that is `c` itself, or the root whose subject is
/// `c`'s issuer *and* whose key verifies `c`'s signature. Roots are told apart by their key,
/// never by name alone: Istio's tools give every root the same subject (`O=Istio, CN=Root CA`).
pub fn anchor_index(c: &CertDer, roots: &[CertDer]) -> Option<usize> {
    if let Some(i) = roots.iter().position(|r| r.as_ref() == c.as_ref()) {
        return Some(i);
    }
    let cp = parsed(c, "chain").ok()?;
    roots.iter().position(|r| {
        parsed(r, "root").is_ok_and(|rp| rp.subject() == cp.issuer() && signed_by(&cp, &rp).is_ok())
    })
}

fn parsed<'a>(c: &'a CertDer, what: &str) -> Result<X509Certificate<'a>, ChainError> {
    cert::parse(c, what).map_err(|e| ChainError::Certificate(Box::new(e)))
}

fn signed_by(c: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> Result<(), ChainError> {
    sig::verify(
        issuer.public_key(),
        &c.signature_algorithm,
        &c.signature_value.data,
        c.tbs_certificate.as_ref(),
    )
    .map_err(|e| {
        let subject = c.subject().to_string();
        match e {
            sig::SigError::Invalid => ChainError::SignatureInvalid { subject },
            sig::SigError::Unsupported(algorithm) => {
                ChainError::SignatureAlgorithmUnsupported { subject, algorithm }
            }
        }
    })
}

fn check_issuer_is_ca(c: &X509Certificate<'_>) -> Result<(), ChainError> {
    cert::signing_cert_problem(c).map_or(Ok(()), |why| {
        Err(ChainError::IssuerNotCa {
            subject: c.subject().to_string(),
            why,
        })
    })
}

fn check_time(c: &X509Certificate<'_>, at: OffsetDateTime) -> Result<(), ChainError> {
    let (nb, na) = (
        c.validity().not_before.to_datetime(),
        c.validity().not_after.to_datetime(),
    );
    if at < nb || at > na {
        return Err(ChainError::NotValidAt {
            subject: c.subject().to_string(),
            not_before: nb,
            not_after: na,
        });
    }
    Ok(())
}
