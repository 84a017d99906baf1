use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Refresh at half the lifetime (Istio's ratio).
pub const DEFAULT_RATIO: f64 = 0.5;
/// ± 5 % of the lifetime, so a fleet started together does not renew together.
pub const DEFAULT_JITTER: f64 = 0.05;

/// When a leaf is renewed: at `ratio` of its lifetime, ± `jitter` of the lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshPolicy {
    pub ratio: f64,
    pub jitter: f64,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            ratio: DEFAULT_RATIO,
            jitter: DEFAULT_JITTER,
        }
    }
}

impl RefreshPolicy {
    /// Checks 0 < ratio - jitter and ratio + jitter < 1.
    pub fn validate(&self) -> Result<(), String> {
        let ok =
            self.jitter >= 0.0 && self.ratio - self.jitter > 0.0 && self.ratio + self.jitter < 1.0;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "ratio {} ± jitter {} must stay strictly between 0 and 1 of the lifetime",
                self.ratio, self.jitter
            ))
        }
    }

    /// The refresh time of a certificate valid from `not_before` to `not_after`.
    pub fn refresh_at(
        &self,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> OffsetDateTime {
        let mut b = [0u8; 4];
        let unit = match SystemRandom::new().fill(&mut b) {
            Ok(()) => u32::from_le_bytes(b) as f64 / u32::MAX as f64,
            Err(_) => 0.5,
        };
        self.refresh_at_with(not_before, not_after, unit)
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
    use std::time::Duration;

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

    #[test]
    fn incoherent_policy_is_refused() {
        assert!(RefreshPolicy {
            ratio: 0.98,
            jitter: 0.05
        }
        .validate()
        .is_err());
        assert!(RefreshPolicy {
            ratio: 0.5,
            jitter: -0.1
        }
        .validate()
        .is_err());
    }
}
