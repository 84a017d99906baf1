//! Chain verification. Leaf chains go through webpki (the verifier rustls uses), for both
//! serverAuth and clientAuth; CA chains (plug-in import) are walked by name and signature.

use rustls_pki_types::UnixTime;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;

use super::{cert, sig, CertDer};

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
) -> Result<(), String> {
    let anchors = roots
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("a root is not a usable trust anchor: {e}"))?;
    let ee =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("leaf does not parse: {e}"))?;
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
        .map_err(|e| format!("chain does not verify for {name}: {e}"))?;
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
) -> Result<(), String> {
    let roots = roots
        .iter()
        .map(|r| parsed(r, "root"))
        .collect::<Result<Vec<_>, _>>()?;
    let chain_p = chain
        .iter()
        .map(|c| parsed(c, "chain"))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(mut current) = chain_p.first() else {
        return Err("empty chain".into());
    };
    let mut rest = &chain_p[1..];
    for _ in 0..=chain_p.len() {
        check_time(current, at)?;
        if roots.iter().any(|r| r.as_raw() == current.as_raw()) {
            return Ok(()); // reached a trusted root itself
        }
        if let Some(root) = roots
            .iter()
            .find(|r| r.subject() == current.issuer() && signed_by(current, r).is_ok())
        {
            check_issuer_is_ca(root)?;
            return check_time(root, at);
        }
        let Some((next, tail)) = rest.split_first() else {
            return Err(format!(
                "no root in the bundle issued {:?} (issuer {:?})",
                current.subject().to_string(),
                current.issuer().to_string()
            ));
        };
        if next.subject() != current.issuer() {
            return Err(format!(
                "chain is out of order: {:?} was not issued by the next certificate {:?}",
                current.subject().to_string(),
                next.subject().to_string()
            ));
        }
        check_issuer_is_ca(next)?;
        signed_by(current, next)?;
        current = next;
        rest = tail;
    }
    Err("chain is too long".into())
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

fn parsed<'a>(c: &'a CertDer, what: &str) -> Result<X509Certificate<'a>, String> {
    cert::parse(c, what).map_err(|e| e.to_string())
}

fn signed_by(c: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> Result<(), String> {
    sig::verify(
        issuer.public_key(),
        &c.signature_algorithm,
        &c.signature_value.data,
        c.tbs_certificate.as_ref(),
    )
    .map_err(|e| match e {
        sig::SigError::Invalid => format!(
            "signature of {:?} does not verify with its issuer's key",
            c.subject().to_string()
        ),
        sig::SigError::Unsupported(alg) => format!(
            "signature algorithm {alg} of {:?} is not accepted",
            c.subject().to_string()
        ),
    })
}

fn check_issuer_is_ca(c: &X509Certificate<'_>) -> Result<(), String> {
    super::plugin::signing_cert_problem(c).map_or(Ok(()), |why| {
        Err(format!(
            "{:?} cannot issue certificates: {why}",
            c.subject().to_string()
        ))
    })
}

fn check_time(c: &X509Certificate<'_>, at: OffsetDateTime) -> Result<(), String> {
    let (nb, na) = (
        c.validity().not_before.to_datetime(),
        c.validity().not_after.to_datetime(),
    );
    if at < nb || at > na {
        return Err(format!(
            "{:?} is not valid now (valid {nb} to {na})",
            c.subject().to_string()
        ));
    }
    Ok(())
}
