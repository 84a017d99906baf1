//! The last check before a certificate leaves the CA: every rule of the X.509-SVID profile,
//! re-read from the DER that was actually signed, independent of the code that built it.

use time::OffsetDateTime;
use x509_parser::{
    certificate::X509Certificate,
    extensions::{GeneralName, ParsedExtension},
    x509::X509Version,
};

use super::{cert, CaError, Serial};
use crate::spiffe::{SpiffeId, TrustDomain};

/// What the issuer meant to issue; the validator checks the certificate says exactly that.
#[derive(Debug)]
pub(crate) struct LeafExpectation<'a> {
    pub id: &'a SpiffeId,
    /// DNS SANs after the URI SAN (only on meshid's own serving certificate).
    pub dns_names: &'a [String],
    pub serial: &'a Serial,
    pub public_key_raw: &'a [u8],
    pub rsa_key: bool,
    /// The issuing time minus the backdate: notBefore must be exactly this.
    pub not_before: OffsetDateTime,
    /// The latest acceptable notAfter (the issuing chain's earliest notAfter).
    pub not_after_max: OffsetDateTime,
}

/// Validates leaves against the profile and their link to the signing certificate.
#[derive(Clone, Debug)]
pub struct LeafValidator {
    td: TrustDomain,
    issuer_subject_raw: Vec<u8>,
    issuer_key_id: Option<Vec<u8>>,
}

// === impl LeafValidator ===

impl LeafValidator {
    /// A validator for leaves signed by `signer` in trust domain `td`.
    pub fn new(td: TrustDomain, signer: &X509Certificate<'_>) -> Self {
        Self {
            td,
            issuer_subject_raw: signer.subject().as_raw().to_vec(),
            issuer_key_id: subject_key_id(signer),
        }
    }

    /// Checks a freshly signed leaf; any failure names the rule that was broken.
    pub(crate) fn validate(&self, der: &[u8], want: &LeafExpectation<'_>) -> Result<(), CaError> {
        let (_, c) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| reject(format!("does not parse: {e}")))?;
        self.check(&c, want).map_err(reject)
    }

    fn check(&self, c: &X509Certificate<'_>, want: &LeafExpectation<'_>) -> Result<(), String> {
        if c.version() != X509Version::V3 {
            return Err("must be X.509 v3".into());
        }
        if !want.serial.matches_raw(c.raw_serial()) {
            return Err(format!(
                "serial {} is not the drawn serial {}",
                cert::hex(c.raw_serial()),
                want.serial
            ));
        }
        if c.public_key().subject_public_key.data.as_ref() != want.public_key_raw {
            return Err("public key is not the requester's".into());
        }
        self.check_issuer(c)?;
        check_san(c, want.id, want.dns_names, &self.td)?;
        check_basic_constraints(c)?;
        check_key_usage(c, want.rsa_key)?;
        check_eku(c)?;
        check_validity(c, want)
    }

    fn check_issuer(&self, c: &X509Certificate<'_>) -> Result<(), String> {
        if c.issuer().as_raw() != self.issuer_subject_raw.as_slice() {
            return Err("issuer name is not the signing certificate's subject".into());
        }
        let aki = c
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        match (&self.issuer_key_id, aki) {
            (Some(ski), Some(aki)) if *ski == aki => Ok(()),
            (Some(_), _) => Err(
                "authority key identifier does not match the signer's subject key identifier"
                    .into(),
            ),
            (None, _) => Ok(()),
        }
    }
}

fn reject(rule: String) -> CaError {
    CaError::LeafRejected { rule }
}

/// The subject key identifier of a certificate, if it has one.
pub(crate) fn subject_key_id(c: &X509Certificate<'_>) -> Option<Vec<u8>> {
    c.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

fn check_san(
    c: &X509Certificate<'_>,
    id: &SpiffeId,
    dns_names: &[String],
    td: &TrustDomain,
) -> Result<(), String> {
    let san = c
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("no subjectAltName")?;
    let names = &san.value.general_names;
    let count = || {
        let dns = if dns_names.is_empty() {
            String::new()
        } else {
            format!(", then DNS {dns_names:?}")
        };
        format!("must have exactly one SAN, a URI{dns}; has {}", names.len())
    };
    let Some((GeneralName::URI(uri), dns)) = names.split_first() else {
        return Err(count());
    };
    let dns_ok = dns.len() == dns_names.len()
        && dns
            .iter()
            .zip(dns_names)
            .all(|(n, want)| matches!(n, GeneralName::DNSName(d) if d == want));
    if !dns_ok {
        return Err(count());
    }
    let parsed =
        SpiffeId::parse(uri).map_err(|e| format!("URI SAN {uri:?} is not a SPIFFE ID: {e}"))?;
    if parsed.trust_domain() != td {
        return Err(format!("URI SAN {uri} is outside trust domain {td}"));
    }
    if parsed != *id {
        return Err(format!(
            "URI SAN {uri} is not the authenticated identity {id}"
        ));
    }
    if c.subject().iter_attributes().next().is_none() && !san.critical {
        return Err("subjectAltName must be critical when the subject is empty".into());
    }
    Ok(())
}

fn check_basic_constraints(c: &X509Certificate<'_>) -> Result<(), String> {
    match c
        .basic_constraints()
        .map_err(|e| format!("bad basicConstraints: {e}"))?
    {
        Some(bc) if !bc.value.ca => Ok(()),
        Some(_) => Err("must be CA:false".into()),
        None => Err("basicConstraints CA:false must be present".into()),
    }
}

fn check_key_usage(c: &X509Certificate<'_>, rsa_key: bool) -> Result<(), String> {
    let ku = c
        .key_usage()
        .map_err(|e| format!("bad keyUsage: {e}"))?
        .ok_or("keyUsage must be present")?;
    if !ku.critical {
        return Err("keyUsage must be critical".into());
    }
    let v = ku.value;
    if !v.digital_signature() {
        return Err("keyUsage must include digitalSignature".into());
    }
    if v.key_encipherment() && !rsa_key {
        return Err("keyUsage keyEncipherment is only for RSA keys".into());
    }
    if v.key_cert_sign() || v.crl_sign() {
        return Err("keyUsage must not include keyCertSign or cRLSign".into());
    }
    if v.non_repudiation()
        || v.data_encipherment()
        || v.key_agreement()
        || v.encipher_only()
        || v.decipher_only()
    {
        return Err("keyUsage has bits beyond digitalSignature/keyEncipherment".into());
    }
    Ok(())
}

fn check_eku(c: &X509Certificate<'_>) -> Result<(), String> {
    let eku = c
        .extended_key_usage()
        .map_err(|e| format!("bad extendedKeyUsage: {e}"))?
        .ok_or("extendedKeyUsage must be present")?
        .value;
    if !(eku.server_auth && eku.client_auth) {
        return Err("extendedKeyUsage must include serverAuth and clientAuth".into());
    }
    Ok(())
}

fn check_validity(c: &X509Certificate<'_>, want: &LeafExpectation<'_>) -> Result<(), String> {
    let nb = c.validity().not_before.to_datetime();
    let na = c.validity().not_after.to_datetime();
    if nb != want.not_before {
        return Err(format!(
            "notBefore {nb} is not the backdated issuing time {}",
            want.not_before
        ));
    }
    if na <= nb {
        return Err("notAfter is not after notBefore".into());
    }
    if na > want.not_after_max {
        return Err(format!(
            "notAfter {na} is past the issuing chain's notAfter {}",
            want.not_after_max
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rcgen::{ExtendedKeyUsagePurpose as Eku, Issuer, KeyUsagePurpose as Ku};
    use time::{Duration, OffsetDateTime};

    use super::*;
    use crate::ca::{profile, root, KeyType, PrivateKey};

    struct Fixture {
        td: TrustDomain,
        root: root::NewCa,
        leaf_key: PrivateKey,
        id: SpiffeId,
        serial: Serial,
        now: OffsetDateTime,
    }

    fn fixture() -> Fixture {
        let td = TrustDomain::new("example.org").unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        Fixture {
            root: root::generate_root(&td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now)
                .unwrap(),
            leaf_key: PrivateKey::generate(KeyType::EcdsaP256).unwrap(),
            id: SpiffeId::for_service_account(&td, "ns1", "sa1").unwrap(),
            serial: Serial::random().unwrap(),
            td,
            now,
        }
    }

    fn sign(f: &Fixture, edit: impl FnOnce(&mut rcgen::CertificateParams)) -> Result<(), CaError> {
        let nb = f.now - Duration::seconds(60);
        let mut p =
            profile::leaf(&f.id, &[], &f.serial, nb, f.now + Duration::hours(1), false).unwrap();
        edit(&mut p);
        let issuer = Issuer::from_ca_cert_der(&f.root.cert, &f.root.key).unwrap();
        let leaf = p.signed_by(&f.leaf_key, &issuer).unwrap();
        let root = cert::parse(&f.root.cert, "root").unwrap();
        let v = LeafValidator::new(f.td.clone(), &root);
        v.validate(
            leaf.der(),
            &LeafExpectation {
                id: &f.id,
                dns_names: &[],
                serial: &f.serial,
                public_key_raw: f.leaf_key.public_key_raw(),
                rsa_key: false,
                not_before: nb,
                not_after_max: f.now + Duration::hours(2),
            },
        )
    }

    fn rule_of(r: Result<(), CaError>) -> String {
        match r {
            Err(CaError::LeafRejected { rule }) => rule,
            other => panic!("expected LeafRejected, got {other:?}"),
        }
    }

    #[test]
    fn the_template_passes() {
        sign(&fixture(), |_| {}).unwrap();
    }

    /// One row per profile rule: a certificate breaking it is refused, naming the rule.
    #[test]
    fn every_rule_is_enforced() {
        type Edit = Box<dyn FnOnce(&mut rcgen::CertificateParams)>;
        let other = SpiffeId::parse("spiffe://example.org/ns/x/sa/y").unwrap();
        let foreign = SpiffeId::parse("spiffe://evil.org/ns/ns1/sa/sa1").unwrap();
        let uri = |id: &SpiffeId| rcgen::SanType::URI(id.to_string().try_into().unwrap());
        let rows: Vec<(&str, Edit, &str)> = vec![
            (
                "two SANs",
                {
                    let u = uri(&other);
                    Box::new(move |p| p.subject_alt_names.push(u))
                },
                "exactly one SAN",
            ),
            (
                "DNS SAN",
                Box::new(|p| {
                    p.subject_alt_names =
                        vec![rcgen::SanType::DnsName("a.example".try_into().unwrap())]
                }),
                "exactly one SAN",
            ),
            (
                "other identity",
                {
                    let u = uri(&other);
                    Box::new(move |p| p.subject_alt_names = vec![u])
                },
                "not the authenticated identity",
            ),
            (
                "foreign trust domain",
                {
                    let u = uri(&foreign);
                    Box::new(move |p| p.subject_alt_names = vec![u])
                },
                "outside trust domain",
            ),
            (
                "CA:true",
                Box::new(|p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)),
                "CA:false",
            ),
            (
                "no basicConstraints",
                Box::new(|p| p.is_ca = rcgen::IsCa::NoCa),
                "basicConstraints",
            ),
            (
                "keyCertSign",
                Box::new(|p| p.key_usages.push(Ku::KeyCertSign)),
                "keyCertSign",
            ),
            (
                "EC keyEncipherment",
                Box::new(|p| p.key_usages.push(Ku::KeyEncipherment)),
                "only for RSA",
            ),
            (
                "no digitalSignature",
                Box::new(|p| p.key_usages = vec![Ku::KeyEncipherment]),
                "digitalSignature",
            ),
            (
                "no clientAuth",
                Box::new(|p| p.extended_key_usages = vec![Eku::ServerAuth]),
                "clientAuth",
            ),
            (
                "wrong serial",
                Box::new(|p| p.serial_number = Some(rcgen::SerialNumber::from_slice(&[1, 2, 3]))),
                "serial",
            ),
            (
                "notAfter past chain",
                Box::new(|p| p.not_after += Duration::hours(5)),
                "past the issuing chain",
            ),
            (
                "notBefore not backdated",
                Box::new(|p| p.not_before += Duration::seconds(60)),
                "notBefore",
            ),
        ];
        for (name, edit, want) in rows {
            let rule = rule_of(sign(&fixture(), edit));
            assert!(
                rule.contains(want),
                "row {name:?}: rule {rule:?} should mention {want:?}"
            );
        }
    }

    #[test]
    fn a_different_issuer_is_refused() {
        let f = fixture();
        let stranger =
            root::generate_root(&f.td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, f.now).unwrap();
        let nb = f.now - Duration::seconds(60);
        let p =
            profile::leaf(&f.id, &[], &f.serial, nb, f.now + Duration::hours(1), false).unwrap();
        let leaf = p
            .signed_by(
                &f.leaf_key,
                &Issuer::from_ca_cert_der(&stranger.cert, &stranger.key).unwrap(),
            )
            .unwrap();
        let v = LeafValidator::new(f.td.clone(), &cert::parse(&f.root.cert, "root").unwrap());
        let want = LeafExpectation {
            id: &f.id,
            dns_names: &[],
            serial: &f.serial,
            public_key_raw: f.leaf_key.public_key_raw(),
            rsa_key: false,
            not_before: nb,
            not_after_max: f.now + Duration::hours(2),
        };
        let rule = rule_of(v.validate(leaf.der(), &want));
        assert!(rule.contains("issuer name"), "{rule}");
    }
}
