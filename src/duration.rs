//! Human durations for flags and config: `90s`, `30m`, `1h`, `7d`, `10y` (a year is 365 days).

use std::time::Duration;

const UNITS: &[(&str, u64)] = &[
    ("y", 365 * 86_400),
    ("d", 86_400),
    ("h", 3_600),
    ("m", 60),
    ("s", 1),
];

/// Parses `<number><unit>` where unit is one of s, m, h, d, y; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (expected e.g. 90s, 30m, 1h, 7d, 10y)"))?;
    let mult = if unit.is_empty() {
        1
    } else {
        UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, m)| *m)
            .ok_or_else(|| format!("{s:?} has an unknown unit {unit:?} (use s, m, h, d or y)"))?
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Formats a duration with the largest unit that divides it exactly (`86400s` → `1d`).
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let (unit, mult) = UNITS
        .iter()
        .find(|(_, m)| secs.is_multiple_of(*m))
        .copied()
        .unwrap_or(("s", 1));
    format!("{}{unit}", secs / mult)
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
    }

    #[test]
    fn refuses_garbage() {
        for s in ["", "h", "1w", "-1h", "1.5h", "99999999999999999999y"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }
}
