//! Issuance policy: how long leaves live and how far notBefore is backdated.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{CaError, PolicyError};

/// Default workload certificate lifetime (SPIRE's default; Istio uses 24h).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Default upper bound on a requested lifetime.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default notBefore backdating, to absorb clock skew between the CA and peers.
pub const DEFAULT_BACKDATE: Duration = Duration::from_secs(60);

/// The largest backdate accepted (clock skew beyond an hour is a broken clock, not skew).
pub const MAX_BACKDATE: Duration = Duration::from_secs(3600);

/// What the authority decides for every leaf, whatever the request says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IssuancePolicy {
    /// Lifetime when the request names none (or zero, or a negative one).
    #[serde(with = "crate::duration::serde")]
    pub default_ttl: Duration,
    /// Longest lifetime a request may ask for.
    #[serde(with = "crate::duration::serde")]
    pub max_ttl: Duration,
    /// How far notBefore is set before the issuing time.
    #[serde(with = "crate::duration::serde")]
    pub backdate: Duration,
}

impl Default for IssuancePolicy {
    fn default() -> Self {
        Self {
            default_ttl: DEFAULT_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            backdate: DEFAULT_BACKDATE,
        }
    }
}

// === impl IssuancePolicy ===

impl IssuancePolicy {
    /// Checks the policy itself is coherent.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.default_ttl.is_zero() || self.max_ttl.is_zero() {
            return Err(PolicyError::ZeroTtl);
        }
        if self.default_ttl > self.max_ttl {
            return Err(PolicyError::DefaultAboveMax {
                default_ttl: self.default_ttl,
                max_ttl: self.max_ttl,
            });
        }
        if self.backdate > MAX_BACKDATE {
            return Err(PolicyError::BackdateTooLong {
                backdate: self.backdate,
                max: MAX_BACKDATE,
            });
        }
        if self.default_ttl <= self.backdate {
            return Err(PolicyError::DefaultNotAboveBackdate {
                default_ttl: self.default_ttl,
                backdate: self.backdate,
            });
        }
        Ok(())
    }

    /// The lifetime to issue for a request in seconds, as Istio's `validity_duration` carries it:
    /// zero or negative means the default; above the max is refused, naming the max.
    pub fn ttl_for_secs(&self, requested_secs: i64) -> Result<Duration, CaError> {
        if requested_secs <= 0 {
            return Ok(self.default_ttl);
        }
        self.ttl_for(Some(Duration::from_secs(requested_secs as u64)))
    }

    /// The lifetime to issue for an optional requested duration.
    pub fn ttl_for(&self, requested: Option<Duration>) -> Result<Duration, CaError> {
        match requested {
            None => Ok(self.default_ttl),
            Some(d) if d.is_zero() => Ok(self.default_ttl),
            Some(d) if d > self.max_ttl => Err(CaError::TtlAboveMax {
                requested: d,
                max: self.max_ttl,
            }),
            Some(d) => Ok(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rules() {
        let p = IssuancePolicy::default();
        assert_eq!(
            p.ttl_for_secs(0).unwrap(),
            DEFAULT_TTL,
            "zero means default"
        );
        assert_eq!(
            p.ttl_for_secs(-5).unwrap(),
            DEFAULT_TTL,
            "negative means default"
        );
        assert_eq!(
            p.ttl_for(None).unwrap(),
            DEFAULT_TTL,
            "absent means default"
        );
        assert_eq!(p.ttl_for_secs(600).unwrap(), Duration::from_secs(600));
        assert_eq!(
            p.ttl_for_secs(86_400).unwrap(),
            DEFAULT_MAX_TTL,
            "max itself is allowed"
        );
        let err = p.ttl_for_secs(86_401).unwrap_err();
        assert!(matches!(err, CaError::TtlAboveMax { .. }));
        assert!(err.to_string().contains("maximum of 1d"), "{err}");
    }

    #[test]
    fn incoherent_policy_is_refused() {
        let p = IssuancePolicy {
            default_ttl: Duration::from_secs(7200),
            max_ttl: Duration::from_secs(3600),
            ..Default::default()
        };
        let err = p.validate().unwrap_err();
        assert!(matches!(err, PolicyError::DefaultAboveMax { .. }), "{err}");
        assert_eq!(err.to_string(), "default_ttl (2h) is above max_ttl (1h)");
    }
}
