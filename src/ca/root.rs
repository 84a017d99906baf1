//! Generating signing certificates: self-signed roots and per-cluster intermediates.

use std::time::Duration;

use rcgen::Issuer;
use time::OffsetDateTime;

use super::{
    cert::{self, CertDer, Serial},
    error::CaError,
    key::PrivateKey,
    key_type::KeyType,
    profile,
};
use crate::spiffe::TrustDomain;

/// Default lifetime of a self-signed root (Istio's default).
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Default lifetime of an intermediate issued for another cluster.
pub const DEFAULT_INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 86_400);
/// How far a signing certificate's notBefore is backdated.
const CA_BACKDATE: Duration = Duration::from_secs(3600);

/// A freshly made CA certificate and its key.
#[derive(Debug)]
pub struct NewCa {
    pub cert: CertDer,
    pub key: PrivateKey,
    pub serial: Serial,
}

fn truncate(now: OffsetDateTime) -> OffsetDateTime {
    now.replace_nanosecond(0).expect("0 is a valid nanosecond")
}

/// Generates a self-signed root for `td`.
pub fn generate_root(
    td: &TrustDomain,
    key_type: KeyType,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<NewCa, CaError> {
    let key = PrivateKey::generate(key_type)?;
    let serial = Serial::random()?;
    let now = truncate(now);
    let params = profile::root(td, &serial, now - CA_BACKDATE, now + ttl)?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Crypto(format!("self-signing the root failed: {e}")))?;
    Ok(NewCa {
        cert: cert.der().clone(),
        key,
        serial,
    })
}

/// Issues an intermediate for `cluster` from a root and its key. Its notAfter is capped to
/// the root's.
pub fn issue_intermediate(
    td: &TrustDomain,
    cluster: &str,
    root_cert: &CertDer,
    root_key: &PrivateKey,
    key_type: KeyType,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<NewCa, CaError> {
    check_cluster_name(cluster)?;
    let root = cert::parse(root_cert, "root certificate")?;
    if root.public_key().subject_public_key.data.as_ref() != root_key.public_key_raw() {
        return Err(CaError::RootKeyMismatch);
    }
    let root_not_after = root.validity().not_after.to_datetime();
    let now = truncate(now);
    if now >= root_not_after {
        return Err(CaError::SignerExpired {
            not_after: root_not_after.to_string(),
        });
    }
    let key = PrivateKey::generate(key_type)?;
    let serial = Serial::random()?;
    let params = profile::intermediate(
        td,
        cluster,
        &serial,
        now - CA_BACKDATE,
        (now + ttl).min(root_not_after),
    )?;
    let issuer = Issuer::from_ca_cert_der(root_cert, root_key).map_err(CaError::RootUnusable)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| CaError::Crypto(format!("signing the intermediate failed: {e}")))?;
    Ok(NewCa {
        cert: cert.der().clone(),
        key,
        serial,
    })
}

fn check_cluster_name(cluster: &str) -> Result<(), CaError> {
    let ok = !cluster.is_empty()
        && cluster.len() <= 63
        && cluster
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(CaError::ClusterNameInvalid {
            cluster: cluster.to_owned(),
        })
    }
}
