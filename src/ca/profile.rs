//! Certificate templates: what a root, an intermediate and a leaf look like. Policy fills
//! them; nothing here comes from a request.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use super::{cert::Serial, error::CaError};
use crate::spiffe::{SpiffeId, TrustDomain};

fn uri_san(uri: String) -> Result<SanType, CaError> {
    Ok(SanType::URI(uri.try_into().map_err(
        |e: rcgen::Error| CaError::Crypto(e.to_string()),
    )?))
}

fn ca_params(
    td: &TrustDomain,
    common_name: String,
    serial: &Serial,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    path_len: BasicConstraints,
) -> Result<CertificateParams, CaError> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td.as_str());
    dn.push(DnType::CommonName, common_name);
    let mut p = CertificateParams::default();
    p.distinguished_name = dn;
    p.serial_number = Some(serial.to_rcgen());
    p.not_before = not_before;
    p.not_after = not_after;
    p.is_ca = IsCa::Ca(path_len);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![uri_san(td.id_string())?];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// A self-signed root for `td`. The serial's first bytes in the CN keep rotated roots apart.
pub(crate) fn root(
    td: &TrustDomain,
    serial: &Serial,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let cn = format!("meshid root {} {}", td, &serial.to_string()[..8]);
    let mut p = ca_params(
        td,
        cn,
        serial,
        not_before,
        not_after,
        BasicConstraints::Unconstrained,
    )?;
    // A self-signed certificate's AKI would only repeat its SKI.
    p.use_authority_key_identifier_extension = false;
    Ok(p)
}

/// An intermediate (per-cluster signing CA) under a root; it may sign leaves only.
pub(crate) fn intermediate(
    td: &TrustDomain,
    cluster: &str,
    serial: &Serial,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let cn = format!("meshid intermediate {td} cluster {cluster}");
    ca_params(
        td,
        cn,
        serial,
        not_before,
        not_after,
        BasicConstraints::Constrained(0),
    )
}

/// A workload X.509-SVID: empty subject, one critical URI SAN, CA:false, digitalSignature
/// (+keyEncipherment for RSA), serverAuth + clientAuth. `dns_names` is empty for workloads;
/// meshid's own serving certificate adds the DNS names clients dial.
pub(crate) fn leaf(
    id: &SpiffeId,
    dns_names: &[String],
    serial: &Serial,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    rsa_key: bool,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    // Empty subject: rcgen then marks the SAN extension critical (RFC 5280 4.2.1.6).
    p.distinguished_name = DistinguishedName::new();
    p.serial_number = Some(serial.to_rcgen());
    p.not_before = not_before;
    p.not_after = not_after;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if rsa_key {
        p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = vec![uri_san(id.to_string())?];
    for d in dns_names {
        let name = d
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Crypto(format!("DNS name {d:?}: {e}")))?;
        p.subject_alt_names.push(SanType::DnsName(name));
    }
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}
