use thiserror::Error;

/// Why a string is not a valid SPIFFE ID or trust domain. One variant per rule of the spec.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with the scheme \"spiffe://\" (lowercase)")]
    WrongScheme,
    #[error("SPIFFE ID has no trust domain")]
    MissingTrustDomain,
    #[error("trust domain is {len} bytes; the maximum is 255")]
    TrustDomainTooLong { len: usize },
    #[error("trust domain must be lowercase; found {found:?}")]
    TrustDomainNotLowercase { found: char },
    #[error("trust domain characters are limited to a-z, 0-9, '.', '-' and '_'; found {found:?}")]
    TrustDomainBadChar { found: char },
    #[error("SPIFFE ID must not contain userinfo (\"user@\")")]
    UserInfo,
    #[error("SPIFFE ID must not contain a port")]
    Port,
    #[error("SPIFFE ID must not contain a query (\"?\")")]
    Query,
    #[error("SPIFFE ID must not contain a fragment (\"#\")")]
    Fragment,
    #[error("SPIFFE ID must not contain percent-encoding (\"%\")")]
    PercentEncoded,
    #[error("SPIFFE ID path must not contain an empty segment (\"//\")")]
    EmptySegment,
    #[error("SPIFFE ID path must not contain \".\" or \"..\" segments")]
    DotSegment,
    #[error("SPIFFE ID path must not end with a slash")]
    TrailingSlash,
    #[error(
        "SPIFFE ID path characters are limited to a-z, A-Z, 0-9, '.', '-' and '_'; found {found:?}"
    )]
    PathBadChar { found: char },
    #[error("SPIFFE ID is {len} bytes; the maximum is 2048")]
    TooLong { len: usize },
    #[error("{what} {value:?} is not a valid Kubernetes name: {why}")]
    BadKubernetesName {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}
