//! Human durations for flags and config: `250ms`, `90s`, `30m`, `1h`, `7d`, `10y` (a year is 365 days).

use std::time::Duration;

/// Units in milliseconds, largest first.
const UNITS: &[(&str, u64)] = &[
    ("y", 365 * 86_400_000),
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// The largest duration accepted anywhere (1000 years): far beyond any sensible setting, and
/// small enough that adding it to or subtracting it from any time of this era cannot overflow.
const MAX_DURATION_MS: u64 = 1000 * 365 * 86_400_000;

/// Why a duration could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration (expected e.g. 250ms, 90s, 30m, 1h, 7d, 10y)")]
    NotADuration(String),
    #[error("{input:?} has an unknown unit {unit:?} (use ms, s, m, h, d or y)")]
    UnknownUnit { input: String, unit: String },
    #[error("{0:?} is above the largest duration accepted (1000y)")]
    TooLong(String),
}

/// Parses `<number><unit>` where unit is one of ms, s, m, h, d, y; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| DurationError::NotADuration(s.to_owned()))?;
    let mult = if unit.is_empty() {
        1_000
    } else {
        UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, m)| *m)
            .ok_or_else(|| DurationError::UnknownUnit {
                input: s.to_owned(),
                unit: unit.to_owned(),
            })?
    };
    n.checked_mul(mult)
        .filter(|ms| *ms <= MAX_DURATION_MS)
        .map(Duration::from_millis)
        .ok_or_else(|| DurationError::TooLong(s.to_owned()))
}

/// Formats a duration with the largest unit that divides it exactly (`86400s` → `1d`).
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms == 0 {
        return "0s".into();
    }
    let (unit, mult) = UNITS
        .iter()
        .find(|(_, m)| ms.is_multiple_of(*m))
        .copied()
        .unwrap_or(("ms", 1));
    format!("{}{unit}", ms / mult)
}

/// Serde for durations written like `1h`, `24h`, `60s`: `#[serde(with = "crate::duration::serde")]`,
/// the one attribute every duration in config and state uses.
pub mod serde {
    use std::time::Duration;

    use ::serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::fmt_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(::serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        for (s, secs, back) in [
            ("45", 45, "45s"),
            ("90s", 90, "90s"),
            ("30m", 1800, "30m"),
            ("1h", 3600, "1h"),
            ("24h", 86_400, "1d"),
            ("10y", 315_360_000, "10y"),
        ] {
            let d = parse_duration(s).unwrap();
            assert_eq!(d.as_secs(), secs, "{s}");
            assert_eq!(fmt_duration(d), back);
        }
        let d = parse_duration("250ms").unwrap();
        assert_eq!((d.as_millis(), fmt_duration(d).as_str()), (250, "250ms"));
    }

    #[test]
    fn refuses_garbage() {
        for s in ["", "h", "1w", "-1h", "1.5h", "99999999999999999999y"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }

    #[test]
    fn durations_that_would_overflow_time_are_refused() {
        // 10000y parsed before and then panicked in `now - backdate` (time overflow).
        let e = parse_duration("10000y").unwrap_err();
        assert!(
            e.to_string().contains("largest duration accepted (1000y)"),
            "{e}"
        );
        let max = parse_duration("1000y").unwrap();
        let now = time::OffsetDateTime::now_utc();
        let _ = (now + max, now - max); // no overflow at the bound
    }
}
