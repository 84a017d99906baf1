//! The syntax rules of the SPIFFE-ID specification, shared by SPIFFE IDs and trust domains.

use super::error::SpiffeIdError;

/// The scheme every SPIFFE ID starts with.
pub(super) const SCHEME: &str = "spiffe://";
/// Maximum length of a SPIFFE ID in bytes (SPIFFE-ID spec, section 2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Maximum length of a trust domain name in bytes (SPIFFE-ID spec, section 2.1).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Splits a SPIFFE ID into its trust domain name and its path (empty, or `/seg(/seg)*`),
/// checking every rule of the spec on both.
pub(super) fn split_id(s: &str) -> Result<(&str, &str), SpiffeIdError> {
    if s.is_empty() {
        return Err(SpiffeIdError::Empty);
    }
    if s.len() > MAX_SPIFFE_ID_LEN {
        return Err(SpiffeIdError::TooLong { len: s.len() });
    }
    let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
    // Query and fragment end the authority/path in a URI; refuse them wherever they appear.
    if rest.contains('?') {
        return Err(SpiffeIdError::Query);
    }
    if rest.contains('#') {
        return Err(SpiffeIdError::Fragment);
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    validate_name(authority)?;
    validate_path(path)?;
    Ok((authority, path))
}

/// Validates a trust domain name (the authority part of a SPIFFE ID).
pub(super) fn validate_name(s: &str) -> Result<(), SpiffeIdError> {
    if s.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if s.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if s.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    if s.contains('%') {
        return Err(SpiffeIdError::PercentEncoded);
    }
    if s.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: s.len() });
    }
    for c in s.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            'A'..='Z' => return Err(SpiffeIdError::TrustDomainNotLowercase { found: c }),
            _ => return Err(SpiffeIdError::TrustDomainBadChar { found: c }),
        }
    }
    Ok(())
}

/// Validates the path of a SPIFFE ID (empty, or `/seg(/seg)*`).
fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.contains('%') {
        return Err(SpiffeIdError::PercentEncoded);
    }
    if path.ends_with('/') {
        // "spiffe://td/" is a trailing slash, not an empty segment.
        return Err(SpiffeIdError::TrailingSlash);
    }
    for seg in path[1..].split('/') {
        match seg {
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment),
            _ => {}
        }
        if let Some(found) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeIdError::PathBadChar { found });
        }
    }
    Ok(())
}
