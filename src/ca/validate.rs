//! The last check before a certificate leaves the CA: every rule of the X.509-SVID profile,
//! re-read from the DER that was actually signed, independent of the code that built it.

use time::OffsetDateTime;
use x509_parser::{
    certificate::X509Certificate,
    extensions::{GeneralName, ParsedExtension},
    x509::X509Version,
};

use super::{
    cert::{self, Serial},
    error::{CaError, ValidationError as V},
};
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
            issuer_key_id: cert::subject_key_id(signer),
        }
    }

    /// Checks a freshly signed leaf; any failure names the rule that was broken.
    pub(crate) fn validate(&self, der: &[u8], want: &LeafExpectation<'_>) -> Result<(), CaError> {
        let (_, c) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| reject(V::Unparsable(e.into())))?;
        self.check(&c, want).map_err(reject)
    }

    fn check(&self, c: &X509Certificate<'_>, want: &LeafExpectation<'_>) -> Result<(), V> {
        if c.version() != X509Version::V3 {
            return Err(V::NotV3);
        }
        if !want.serial.matches_raw(c.raw_serial()) {
            return Err(V::SerialMismatch {
                found: cert::hex(c.raw_serial()),
                drawn: want.serial.to_string(),
            });
        }
        if c.public_key().subject_public_key.data.as_ref() != want.public_key_raw {
            return Err(V::PublicKeyMismatch);
        }
        self.check_issuer(c)?;
        check_san(c, want.id, want.dns_names, &self.td)?;
        check_basic_constraints(c)?;
        check_key_usage(c, want.rsa_key)?;
        check_eku(c)?;
        check_validity(c, want)
    }

    fn check_issuer(&self, c: &X509Certificate<'_>) -> Result<(), V> {
        if c.issuer().as_raw() != self.issuer_subject_raw.as_slice() {
            return Err(V::IssuerNameMismatch);
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
            (Some(_), _) => Err(V::AuthorityKeyIdMismatch),
            (None, _) => Ok(()),
        }
    }
}

fn reject(rule: V) -> CaError {
    CaError::LeafRejected { rule }
}

fn check_san(
    c: &X509Certificate<'_>,
    id: &SpiffeId,
    dns_names: &[String],
    td: &TrustDomain,
) -> Result<(), V> {
    let san = c
        .subject_alternative_name()
        .map_err(V::SanUnreadable)?
        .ok_or(V::SanMissing)?;
    let names = &san.value.general_names;
    let count = || V::SanCount {
        dns_names: dns_names.to_vec(),
        count: names.len(),
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
    let parsed = SpiffeId::parse(uri).map_err(|error| V::UriNotSpiffe {
        uri: (*uri).to_owned(),
        error,
    })?;
    if parsed.trust_domain() != td {
        return Err(V::UriOutsideTrustDomain {
            uri: (*uri).to_owned(),
            trust_domain: td.clone(),
        });
    }
    if parsed != *id {
        return Err(V::UriNotIdentity {
            uri: (*uri).to_owned(),
            id: id.clone(),
        });
    }
    if c.subject().iter_attributes().next().is_none() && !san.critical {
        return Err(V::SanNotCritical);
    }
    Ok(())
}

fn check_basic_constraints(c: &X509Certificate<'_>) -> Result<(), V> {
    match c
        .basic_constraints()
        .map_err(V::BasicConstraintsUnreadable)?
    {
        Some(bc) if !bc.value.ca => Ok(()),
        Some(_) => Err(V::IsCa),
        None => Err(V::BasicConstraintsMissing),
    }
}

fn check_key_usage(c: &X509Certificate<'_>, rsa_key: bool) -> Result<(), V> {
    let ku = c
        .key_usage()
        .map_err(V::KeyUsageUnreadable)?
        .ok_or(V::KeyUsageMissing)?;
    if !ku.critical {
        return Err(V::KeyUsageNotCritical);
    }
    let v = ku.value;
    if !v.digital_signature() {
        return Err(V::DigitalSignatureMissing);
    }
    if v.key_encipherment() && !rsa_key {
        return Err(V::KeyEnciphermentNotRsa);
    }
    if v.key_cert_sign() || v.crl_sign() {
        return Err(V::KeyUsageCaBits);
    }
    if v.non_repudiation()
        || v.data_encipherment()
        || v.key_agreement()
        || v.encipher_only()
        || v.decipher_only()
    {
        return Err(V::KeyUsageExtraBits);
    }
    Ok(())
}

fn check_eku(c: &X509Certificate<'_>) -> Result<(), V> {
    let eku = c
        .extended_key_usage()
        .map_err(V::EkuUnreadable)?
        .ok_or(V::EkuMissing)?
        .value;
    if !(eku.server_auth && eku.client_auth) {
        return Err(V::EkuLacksServerOrClientAuth);
    }
    Ok(())
}

fn check_validity(c: &X509Certificate<'_>, want: &LeafExpectation<'_>) -> Result<(), V> {
    let nb = c.validity().not_before.to_datetime();
    let na = c.validity().not_after.to_datetime();
    if nb != want.not_before {
        return Err(V::NotBeforeNotBackdated {
            not_before: nb,
            want: want.not_before,
        });
    }
    if na <= nb {
        return Err(V::NotAfterBeforeNotBefore);
    }
    if na > want.not_after_max {
        return Err(V::NotAfterPastChain {
            not_after: na,
            chain_not_after: want.not_after_max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rcgen::{ExtendedKeyUsagePurpose as Eku, Issuer, KeyUsagePurpose as Ku};
    use time::{Duration, OffsetDateTime};

    use super::*;
    use crate::ca::{key::PrivateKey, key_type::KeyType, profile, root};

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

    fn rule_of(r: Result<(), CaError>) -> V {
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
        type Want = fn(&V) -> bool;
        let other = SpiffeId::parse("spiffe://example.org/ns/x/sa/y").unwrap();
        let foreign = SpiffeId::parse("spiffe://evil.org/ns/ns1/sa/sa1").unwrap();
        let uri = |id: &SpiffeId| rcgen::SanType::URI(id.to_string().try_into().unwrap());
        let rows: Vec<(&str, Edit, Want)> = vec![
            (
                "two SANs",
                {
                    let u = uri(&other);
                    Box::new(move |p| p.subject_alt_names.push(u))
                },
                |r| matches!(r, V::SanCount { count: 2, .. }),
            ),
            (
                "DNS SAN",
                Box::new(|p| {
                    p.subject_alt_names =
                        vec![rcgen::SanType::DnsName("a.example".try_into().unwrap())]
                }),
                |r| matches!(r, V::SanCount { count: 1, .. }),
            ),
            (
                "other identity",
                {
                    let u = uri(&other);
                    Box::new(move |p| p.subject_alt_names = vec![u])
                },
                |r| matches!(r, V::UriNotIdentity { .. }),
            ),
            (
                "foreign trust domain",
                {
                    let u = uri(&foreign);
                    Box::new(move |p| p.subject_alt_names = vec![u])
                },
                |r| matches!(r, V::UriOutsideTrustDomain { .. }),
            ),
            (
                "CA:true",
                Box::new(|p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)),
                |r| matches!(r, V::IsCa),
            ),
            (
                "no basicConstraints",
                Box::new(|p| p.is_ca = rcgen::IsCa::NoCa),
                |r| matches!(r, V::BasicConstraintsMissing),
            ),
            (
                "keyCertSign",
                Box::new(|p| p.key_usages.push(Ku::KeyCertSign)),
                |r| matches!(r, V::KeyUsageCaBits),
            ),
            (
                "EC keyEncipherment",
                Box::new(|p| p.key_usages.push(Ku::KeyEncipherment)),
                |r| matches!(r, V::KeyEnciphermentNotRsa),
            ),
            (
                "no digitalSignature",
                Box::new(|p| p.key_usages = vec![Ku::KeyEncipherment]),
                |r| matches!(r, V::DigitalSignatureMissing),
            ),
            (
                "no clientAuth",
                Box::new(|p| p.extended_key_usages = vec![Eku::ServerAuth]),
                |r| matches!(r, V::EkuLacksServerOrClientAuth),
            ),
            (
                "wrong serial",
                Box::new(|p| p.serial_number = Some(rcgen::SerialNumber::from_slice(&[1, 2, 3]))),
                |r| matches!(r, V::SerialMismatch { .. }),
            ),
            (
                "notAfter past chain",
                Box::new(|p| p.not_after += Duration::hours(5)),
                |r| matches!(r, V::NotAfterPastChain { .. }),
            ),
            (
                "notBefore not backdated",
                Box::new(|p| p.not_before += Duration::seconds(60)),
                |r| matches!(r, V::NotBeforeNotBackdated { .. }),
            ),
        ];
        for (name, edit, want) in rows {
            let rule = rule_of(sign(&fixture(), edit));
            assert!(
                want(&rule),
                "row {name:?}: refused for another rule: {rule}"
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
        assert_eq!(rule, V::IssuerNameMismatch, "{rule}");
    }
}
