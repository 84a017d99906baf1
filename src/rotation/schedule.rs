//! When a leaf is renewed (`[rotation]`): at a fraction of its lifetime with jitter, how failed
//! renewals are retried, and how a signer change is spread.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::OffsetDateTime;

/// Refresh at half the lifetime (Istio's ratio).
pub const DEFAULT_RATIO: f64 = 0.5;
/// ± 5 % of the lifetime, so a fleet started together does not renew together.
pub const DEFAULT_JITTER: f64 = 0.05;

/// First retry after a failed renewal; doubled on every further failure ...
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_secs(1);
/// ... up to this.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60);
/// After a new signer is activated, leaves are re-issued at random points of this window.
pub const DEFAULT_SIGNER_CHANGE_SPREAD: Duration = Duration::from_secs(2);

/// When a leaf is renewed: at `ratio` of its remaining lifetime from the issue time, ± `jitter`
/// of it; how failures are retried; how a signer change is spread.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshPolicy {
    pub ratio: f64,
    pub jitter: f64,
    #[serde(with = "crate::duration::serde")]
    pub retry_min: Duration,
    #[serde(with = "crate::duration::serde")]
    pub retry_max: Duration,
    #[serde(with = "crate::duration::serde")]
    pub signer_change_spread: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            ratio: DEFAULT_RATIO,
            jitter: DEFAULT_JITTER,
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
            signer_change_spread: DEFAULT_SIGNER_CHANGE_SPREAD,
        }
    }
}

/// Why a refresh policy is refused, naming the key.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum RefreshPolicyError {
    #[error("ratio {ratio} ± jitter {jitter} must stay strictly between 0 and 1 of the lifetime")]
    Fraction { ratio: f64, jitter: f64 },
    #[error("retry_min must be at least 100ms and at most retry_max")]
    RetryMin,
    #[error("retry_max must be at most 1h")]
    RetryMax,
    #[error("signer_change_spread must be at most 1h")]
    SignerChangeSpread,
}

impl RefreshPolicy {
    /// Checks 0 < ratio - jitter and ratio + jitter < 1, and the retry and spread bounds.
    pub fn validate(&self) -> Result<(), RefreshPolicyError> {
        let ok =
            self.jitter >= 0.0 && self.ratio - self.jitter > 0.0 && self.ratio + self.jitter < 1.0;
        if !ok {
            return Err(RefreshPolicyError::Fraction {
                ratio: self.ratio,
                jitter: self.jitter,
            });
        }
        if self.retry_min < Duration::from_millis(100) || self.retry_min > self.retry_max {
            return Err(RefreshPolicyError::RetryMin);
        }
        if self.retry_max > Duration::from_secs(3600) {
            return Err(RefreshPolicyError::RetryMax);
        }
        if self.signer_change_spread > Duration::from_secs(3600) {
            return Err(RefreshPolicyError::SignerChangeSpread);
        }
        Ok(())
    }

    /// The refresh time of a certificate valid from `not_before` to `not_after`.
    pub fn refresh_at(
        &self,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> OffsetDateTime {
        self.refresh_at_with(not_before, not_after, crate::backoff::unit_random())
    }

    /// As `refresh_at`, with the random draw `unit` in [0, 1] given (0 → earliest, 1 → latest).
    pub fn refresh_at_with(
        &self,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        unit: f64,
    ) -> OffsetDateTime {
        let lifetime = not_after - not_before;
        let fraction = self.ratio + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        not_before + lifetime * fraction
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_life_with_jitter_bounds() {
        let p = RefreshPolicy::default();
        let nb = OffsetDateTime::UNIX_EPOCH;
        let na = nb + Duration::from_secs(3600);
        assert_eq!(
            p.refresh_at_with(nb, na, 0.5),
            nb + Duration::from_secs(1800)
        );
        assert_eq!(
            p.refresh_at_with(nb, na, 0.0),
            nb + Duration::from_secs(1620)
        );
        assert_eq!(
            p.refresh_at_with(nb, na, 1.0),
            nb + Duration::from_secs(1980)
        );
        for _ in 0..100 {
            let t = p.refresh_at(nb, na);
            assert!(t >= nb + Duration::from_secs(1620) && t <= nb + Duration::from_secs(1980));
        }
    }

    /// One row per rule, each refused by name.
    #[test]
    fn incoherent_policy_is_refused() {
        let rows = [
            (
                "ratio + jitter reaches the end of the lifetime",
                RefreshPolicy {
                    ratio: 0.98,
                    jitter: 0.05,
                    ..Default::default()
                },
                RefreshPolicyError::Fraction {
                    ratio: 0.98,
                    jitter: 0.05,
                },
            ),
            (
                "negative jitter",
                RefreshPolicy {
                    ratio: 0.5,
                    jitter: -0.1,
                    ..Default::default()
                },
                RefreshPolicyError::Fraction {
                    ratio: 0.5,
                    jitter: -0.1,
                },
            ),
            (
                "no retry delay",
                RefreshPolicy {
                    retry_min: Duration::ZERO,
                    ..Default::default()
                },
                RefreshPolicyError::RetryMin,
            ),
            (
                "retries more than an hour apart",
                RefreshPolicy {
                    retry_max: Duration::from_secs(7200),
                    ..Default::default()
                },
                RefreshPolicyError::RetryMax,
            ),
            (
                "a spread over an hour",
                RefreshPolicy {
                    signer_change_spread: Duration::from_secs(7200),
                    ..Default::default()
                },
                RefreshPolicyError::SignerChangeSpread,
            ),
        ];
        for (rule, policy, want) in rows {
            assert_eq!(policy.validate(), Err(want), "{rule}");
        }
        assert_eq!(RefreshPolicy::default().validate(), Ok(()));
    }
}
