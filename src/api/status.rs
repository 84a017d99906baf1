//! Domain errors to gRPC status codes: the one place this mapping lives.

use tonic::{Code, Status};

use crate::{ca::CaError, identity::IdentityError};

/// Identity failures: the backend's fault is `Unavailable` (retry), the token's `Unauthenticated`.
pub(crate) fn identity(e: &IdentityError) -> Status {
    let code = if e.is_unavailable() {
        Code::Unavailable
    } else {
        Code::Unauthenticated
    };
    Status::new(code, e.to_string())
}

/// Issuance failures.
pub(crate) fn ca(e: &CaError) -> Status {
    use CaError::*;
    let code = match e {
        CsrForeignSan { .. } | IdentityOutsideTrustDomain { .. } => Code::PermissionDenied,
        CsrMalformed(_)
        | CsrSignatureInvalid
        | CsrSignatureAlgorithmUnsupported { .. }
        | CsrKeyUnsupported { .. }
        | CsrKeyTooSmall { .. }
        | CsrSanNotAllowed { .. }
        | CsrMultipleUriSans { .. }
        | TtlAboveMax { .. } => Code::InvalidArgument,
        SignerExpired { .. } => Code::FailedPrecondition,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

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
        _ => "internal",
    }
}
