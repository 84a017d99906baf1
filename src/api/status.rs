//! Domain errors to gRPC status codes: the one place this mapping lives.

use tonic::{Code, Status};

use crate::{ca::CaError, identity::IdentityError};

/// Identity failures: the backend's fault is `Unavailable` (retry), the token's `Unauthenticated`.
/// The caller is not yet authenticated, so it gets a short reason only: never the expected
/// issuer or audiences, cluster names, key URLs or API server errors (those are logged).
pub(crate) fn identity(e: &IdentityError) -> Status {
    use IdentityError::*;
    let (code, why) = match e {
        NoToken => (Code::Unauthenticated, "no bearer token"),
        TooLarge { .. } | Malformed(_) => (Code::Unauthenticated, "malformed token"),
        AlgorithmNotAllowed { .. } => (Code::Unauthenticated, "token algorithm not accepted"),
        UnknownKid { .. } | BadSignature => (Code::Unauthenticated, "token signature not valid"),
        Expired { .. } => (Code::Unauthenticated, "token expired"),
        NotYetValid { .. } => (Code::Unauthenticated, "token not yet valid"),
        WrongIssuer { .. } => (Code::Unauthenticated, "token issuer not accepted"),
        AudienceMismatch { .. } | ReviewAudienceMismatch { .. } => {
            (Code::Unauthenticated, "token audience not accepted")
        }
        MissingClaim(_) | NotServiceAccount(_) => (
            Code::Unauthenticated,
            "token is not a service-account token",
        ),
        LegacyToken => (
            Code::Unauthenticated,
            "legacy service-account tokens are refused",
        ),
        ReviewNotAuthenticated { .. } | Invalidated(_) => {
            (Code::Unauthenticated, "token not authenticated")
        }
        UnknownCluster { .. } => (Code::Unauthenticated, "unknown ClusterID"),
        TokenReviewFailed(_) | JwksUnavailable(_) => {
            (Code::Unavailable, "identity backend unavailable; retry")
        }
        Overloaded(_) => (
            Code::Unavailable,
            "identity backend overloaded; retry with backoff",
        ),
    };
    Status::new(code, why)
}

/// Issuance failures. Only a fault in the caller's own request (its CSR, its TTL, its identity
/// against this trust domain) is explained to the caller; the CA's own faults get a short reason
/// (they can carry file paths and key material descriptions) and are logged by the caller of
/// this function.
pub(crate) fn ca(e: &CaError) -> Status {
    use CaError::*;
    match e {
        CsrForeignSan { .. } | IdentityOutsideTrustDomain { .. } => {
            Status::new(Code::PermissionDenied, e.to_string())
        }
        CsrMalformed(_)
        | CsrSignatureInvalid
        | CsrSignatureAlgorithmUnsupported { .. }
        | CsrKeyUnsupported { .. }
        | CsrKeyTooSmall { .. }
        | CsrSanNotAllowed { .. }
        | CsrMultipleUriSans { .. }
        | TtlAboveMax { .. } => Status::new(Code::InvalidArgument, e.to_string()),
        SignerExpired { .. } => Status::new(
            Code::FailedPrecondition,
            "the CA's signing certificate has expired; its operator must rotate it",
        ),
        KeyGenerationUnsupported { .. }
        | KeyInvalid { .. }
        | CertificateInvalid { .. }
        | PluginIncomplete { .. }
        | PluginKeyMismatch { .. }
        | PluginChainInvalid { .. }
        | PluginNotCa { .. }
        | CrlInvalid { .. }
        | PolicyInvalid(_)
        | RootKeyMismatch
        | RootUnusable(_)
        | ClusterNameInvalid { .. }
        | SignerNotCa(_)
        | SignerKeyMismatch
        | SignerChainInvalid(_)
        | SelfTestFailed(_)
        | LeafRejected { .. }
        | Crypto(_) => Status::new(Code::Internal, "the CA failed to issue; see its log"),
    }
}

/// Every `kind` label [`ca_kind`] gives.
pub const SIGN_ERROR_KINDS: &[&str] = &[
    "permission_denied",
    "csr_signature",
    "csr_malformed",
    "csr_key",
    "csr_san",
    "ttl",
    "signer_expired",
    "crypto",
    "signer_invalid",
    "leaf_rejected",
];

/// A stable label for the sign-errors metric.
pub(crate) fn ca_kind(e: &CaError) -> &'static str {
    use CaError::*;
    match e {
        CsrForeignSan { .. } | IdentityOutsideTrustDomain { .. } => "permission_denied",
        CsrSignatureInvalid => "csr_signature",
        CsrMalformed(_) => "csr_malformed",
        CsrKeyUnsupported { .. }
        | CsrKeyTooSmall { .. }
        | CsrSignatureAlgorithmUnsupported { .. } => "csr_key",
        CsrSanNotAllowed { .. } | CsrMultipleUriSans { .. } => "csr_san",
        TtlAboveMax { .. } => "ttl",
        SignerExpired { .. } => "signer_expired",
        KeyGenerationUnsupported { .. } | KeyInvalid { .. } | Crypto(_) => "crypto",
        CertificateInvalid { .. }
        | PluginIncomplete { .. }
        | PluginKeyMismatch { .. }
        | PluginChainInvalid { .. }
        | PluginNotCa { .. }
        | CrlInvalid { .. }
        | PolicyInvalid(_)
        | RootKeyMismatch
        | RootUnusable(_)
        | ClusterNameInvalid { .. }
        | SignerNotCa(_)
        | SignerKeyMismatch
        | SignerChainInvalid(_)
        | SelfTestFailed(_) => "signer_invalid",
        LeafRejected { .. } => "leaf_rejected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 8 item 7: the old mapping sent `e.to_string()`, details included.
    #[test]
    fn refusals_tell_the_caller_no_details() {
        let secret = "https://issuer.internal.example";
        let rows: Vec<(IdentityError, Code)> = vec![
            (
                IdentityError::WrongIssuer {
                    got: "x".into(),
                    want: secret.into(),
                },
                Code::Unauthenticated,
            ),
            (
                IdentityError::AudienceMismatch {
                    got: vec!["x".into()],
                    want: vec![secret.into()],
                },
                Code::Unauthenticated,
            ),
            (
                IdentityError::UnknownCluster {
                    got: "x".into(),
                    known: vec![secret.into()],
                },
                Code::Unauthenticated,
            ),
            (
                IdentityError::JwksUnavailable(format!("GET {secret}/jwks: HTTP 403")),
                Code::Unavailable,
            ),
            (
                IdentityError::TokenReviewFailed(format!("HTTP 500: etcd at {secret} down")),
                Code::Unavailable,
            ),
            (
                IdentityError::ReviewNotAuthenticated {
                    error: Some(format!("[{secret}] invalid bearer token")),
                },
                Code::Unauthenticated,
            ),
            (
                IdentityError::Overloaded(format!("queue of {secret} full")),
                Code::Unavailable,
            ),
        ];
        for (e, code) in rows {
            let s = identity(&e);
            assert_eq!(s.code(), code, "{e}");
            assert!(!s.message().contains(secret), "{e} leaks: {}", s.message());
            assert!(s.message().len() < 60, "{}", s.message());
        }
    }

    /// Issue 17 item 8: every `CaError` maps by name (no wildcard), and a CA fault sends the
    /// caller no detail (paths, key descriptions); a fault in the caller's own CSR is explained.
    #[test]
    fn ca_faults_tell_the_caller_no_details() {
        let path = "/var/lib/meshid/secret/ca-key.pem";
        let internal = [
            CaError::KeyInvalid {
                what: path.into(),
                why: "bad".into(),
            },
            CaError::PluginKeyMismatch {
                key: path.into(),
                cert: path.into(),
            },
            CaError::CrlInvalid {
                file: path.into(),
                why: crate::ca::CrlError::NoPemBlock,
            },
            CaError::ClusterNameInvalid {
                cluster: path.into(),
            },
            CaError::Crypto(path.into()),
            CaError::SignerExpired {
                not_after: path.into(),
            },
        ];
        for e in internal {
            let s = ca(&e);
            assert!(
                matches!(s.code(), Code::Internal | Code::FailedPrecondition),
                "{e}"
            );
            assert!(!s.message().contains(path), "{e} leaks: {}", s.message());
        }
        let own = CaError::CsrKeyTooSmall {
            bits: 1024,
            min: 2048,
        };
        let s = ca(&own);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("1024-bit"), "{}", s.message());
    }
}
