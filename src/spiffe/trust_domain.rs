use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{
    error::SpiffeIdError,
    rules::{self, SCHEME},
};

/// A SPIFFE trust domain name, such as `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

// === impl TrustDomain ===

impl TrustDomain {
    /// Parses a bare trust domain name (`cluster.local`) or a trust-domain SPIFFE ID
    /// (`spiffe://cluster.local`).
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        if s.starts_with(SCHEME) {
            let (name, path) = rules::split_id(s)?;
            if !path.is_empty() {
                return Err(SpiffeIdError::PathBadChar { found: '/' });
            }
            return Ok(Self(name.to_owned()));
        }
        rules::validate_name(s)?;
        Ok(Self(s.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<td>`, used as the URI SAN of signing certificates.
    pub fn id_string(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_bare_name_and_spiffe_form() {
        assert_eq!(
            TrustDomain::new("cluster.local").unwrap().as_str(),
            "cluster.local"
        );
        assert_eq!(
            TrustDomain::new("spiffe://example.org").unwrap().as_str(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::new("example.org").unwrap().id_string(),
            "spiffe://example.org"
        );
    }

    #[test]
    fn refuses_each_rule() {
        let rows: &[(&str, &str, SpiffeIdError)] = &[
            ("empty", "", SpiffeIdError::MissingTrustDomain),
            (
                "uppercase",
                "Example.org",
                SpiffeIdError::TrustDomainNotLowercase { found: 'E' },
            ),
            (
                "bad char",
                "exa mple",
                SpiffeIdError::TrustDomainBadChar { found: ' ' },
            ),
            ("port", "example.org:8080", SpiffeIdError::Port),
            ("userinfo", "u@example.org", SpiffeIdError::UserInfo),
            ("percent", "ex%41mple", SpiffeIdError::PercentEncoded),
            (
                "with path",
                "spiffe://example.org/ns",
                SpiffeIdError::PathBadChar { found: '/' },
            ),
        ];
        for (rule, input, want) in rows {
            assert_eq!(TrustDomain::new(input).unwrap_err(), *want, "rule: {rule}");
        }
        let long = "a".repeat(256);
        assert_eq!(
            TrustDomain::new(&long).unwrap_err(),
            SpiffeIdError::TrustDomainTooLong { len: 256 }
        );
        assert!(TrustDomain::new(&"a".repeat(255)).is_ok());
    }
}
