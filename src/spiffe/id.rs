use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{
    error::SpiffeIdError,
    rules::{self, SCHEME},
    trust_domain::TrustDomain,
};

/// A validated SPIFFE ID: `spiffe://<trust-domain><path>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    td: TrustDomain,
    /// Empty, or `/seg(/seg)*`.
    path: String,
}

// === impl SpiffeId ===

impl SpiffeId {
    /// Parses and validates a SPIFFE ID against every rule of the SPIFFE-ID spec.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let (td, path) = rules::split_id(s)?;
        Ok(Self {
            td: TrustDomain::new(td)?,
            path: path.to_owned(),
        })
    }

    /// Builds `spiffe://<td>/ns/<namespace>/sa/<service-account>`, checking both are valid
    /// Kubernetes names (a namespace is a DNS label, a service account a DNS subdomain).
    pub fn for_service_account(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        check_k8s_name("namespace", namespace, 63, false)?;
        check_k8s_name("service account", service_account, 253, true)?;
        Ok(Self {
            td: td.clone(),
            path: format!("/ns/{namespace}/sa/{service_account}"),
        })
    }

    /// The trust domain of this ID.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `(namespace, service_account)` when the path is exactly `/ns/<ns>/sa/<sa>`.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let mut segs = self.path.strip_prefix('/')?.split('/');
        match (
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// Whether this is a trust-domain ID (no path), as on signing certificates.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path.is_empty()
    }
}

fn check_k8s_name(
    what: &'static str,
    value: &str,
    max: usize,
    dots: bool,
) -> Result<(), SpiffeIdError> {
    let bad = |why| SpiffeIdError::BadKubernetesName {
        what,
        value: value.to_owned(),
        why,
    };
    if value.is_empty() {
        return Err(bad("empty"));
    }
    if value.len() > max {
        return Err(bad("too long"));
    }
    let allowed =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    if !value.chars().all(allowed) {
        return Err(bad(
            "only lowercase letters, digits and '-' are allowed (and '.' in service accounts)",
        ));
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !edge_ok(value.chars().next()) || !edge_ok(value.chars().last()) {
        return Err(bad("must start and end with a letter or digit"));
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.td, self.path)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SpiffeIdError as E;

    #[test]
    fn valid_ids_round_trip() {
        for s in [
            "spiffe://example.org",
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
            "spiffe://a_b-c.d/Path/With.Mixed-Case_chars/0",
        ] {
            let id = SpiffeId::parse(s).unwrap();
            assert_eq!(id.to_string(), s);
        }
    }

    /// One row per rule of the SPIFFE-ID spec.
    #[test]
    fn refusal_table() {
        let long_td = format!("spiffe://{}", "a".repeat(256));
        let long_id = format!("spiffe://example.org/{}", "a".repeat(2048));
        let rows: Vec<(&str, &str, SpiffeIdError)> = vec![
            ("empty", "", E::Empty),
            ("scheme missing", "example.org/ns/a", E::WrongScheme),
            ("scheme wrong", "https://example.org/ns/a", E::WrongScheme),
            ("scheme uppercase", "SPIFFE://example.org", E::WrongScheme),
            (
                "scheme without slashes",
                "spiffe:example.org",
                E::WrongScheme,
            ),
            (
                "trust domain missing",
                "spiffe:///ns/a",
                E::MissingTrustDomain,
            ),
            (
                "trust domain missing, bare",
                "spiffe://",
                E::MissingTrustDomain,
            ),
            (
                "trust domain uppercase",
                "spiffe://Example.org",
                E::TrustDomainNotLowercase { found: 'E' },
            ),
            (
                "trust domain bad char",
                "spiffe://exa$mple.org",
                E::TrustDomainBadChar { found: '$' },
            ),
            (
                "trust domain too long",
                &long_td,
                E::TrustDomainTooLong { len: 256 },
            ),
            ("userinfo", "spiffe://user@example.org/a", E::UserInfo),
            ("port", "spiffe://example.org:443/a", E::Port),
            ("query", "spiffe://example.org/a?x=1", E::Query),
            ("fragment", "spiffe://example.org/a#frag", E::Fragment),
            (
                "percent-encoding",
                "spiffe://example.org/a%20b",
                E::PercentEncoded,
            ),
            (
                "empty segment",
                "spiffe://example.org/a//b",
                E::EmptySegment,
            ),
            ("dot segment", "spiffe://example.org/a/./b", E::DotSegment),
            (
                "dot-dot segment",
                "spiffe://example.org/a/../b",
                E::DotSegment,
            ),
            (
                "trailing slash",
                "spiffe://example.org/a/",
                E::TrailingSlash,
            ),
            (
                "trailing slash after trust domain",
                "spiffe://example.org/",
                E::TrailingSlash,
            ),
            (
                "path bad char",
                "spiffe://example.org/a b",
                E::PathBadChar { found: ' ' },
            ),
            (
                "path non-ascii",
                "spiffe://example.org/caf\u{e9}",
                E::PathBadChar { found: '\u{e9}' },
            ),
            ("too long", &long_id, E::TooLong { len: long_id.len() }),
        ];
        for (rule, input, want) in rows {
            assert_eq!(
                SpiffeId::parse(input).unwrap_err(),
                want,
                "rule: {rule} ({input:?})"
            );
        }
    }

    #[test]
    fn kubernetes_mapping_round_trips() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = SpiffeId::for_service_account(&td, "shop", "product-service").unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/shop/sa/product-service"
        );
        assert_eq!(id.service_account(), Some(("shop", "product-service")));
        let parsed = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/product-service").unwrap();
        assert_eq!(parsed, id);
    }

    #[test]
    fn non_kubernetes_paths_have_no_service_account() {
        for s in [
            "spiffe://td",
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/namespace/a/sa/b",
        ] {
            assert_eq!(SpiffeId::parse(s).unwrap().service_account(), None, "{s}");
        }
    }

    #[test]
    fn kubernetes_names_are_checked() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let rows = [
            ("uppercase namespace", "Shop", "sa"),
            ("dot in namespace", "a.b", "sa"),
            ("empty service account", "shop", ""),
            ("leading dash", "-shop", "sa"),
            ("namespace too long", &"a".repeat(64), "sa"),
        ];
        for (rule, ns, sa) in rows {
            let err = SpiffeId::for_service_account(&td, ns, sa).unwrap_err();
            assert!(
                matches!(err, E::BadKubernetesName { .. }),
                "rule: {rule}: {err}"
            );
        }
        assert!(SpiffeId::for_service_account(&td, "shop", "my.sa").is_ok());
    }
}
