//! The federation side of activation: a prepared root must have been on our bundle endpoint
//! long enough for every federated peer to have fetched it before it signs (SPIFFE federation
//! spec 4.1: publish new keys 3-5 refresh hints ahead of use, so that missing a poll or two
//! causes no failure). Usable as (part of) the `activate` gate.
//!
//! One rule: the wait is 3 refresh hints, and never less than the worst case of a meshid peer
//! with one failed poll (a poll interval, then the retry after the failure:
//! `trust::worst_case_fetch`). With the published hint at least a minute (what peers poll at
//! most; SPIRE's `MinimumRefreshHint`), 3 hints always cover that worst case.

use std::time::Duration;

use thiserror::Error;
use time::OffsetDateTime;

use crate::{
    clock::rfc3339,
    duration::fmt_duration,
    state::RootRecord,
    trust::{poll_interval, worst_case_fetch, RETRY_AFTER_FAILURE},
};

/// How many refresh hints a prepared root stays published before it may sign.
pub const PUBLISH_HINTS: u32 = 3;

/// How long a prepared root stays on the bundle endpoint before it may sign, for a published
/// `refresh_hint`: `PUBLISH_HINTS` hints, at least a peer's worst case with one failed poll.
pub fn publication_delay(refresh_hint: Duration) -> Duration {
    (refresh_hint * PUBLISH_HINTS).max(worst_case_fetch(refresh_hint))
}

/// When `root` may be activated: `publication_delay` after it was prepared (it is in the
/// published bundle from then on, within the state poll interval).
pub fn publishable_at(root: &RootRecord, refresh_hint: Duration) -> OffsetDateTime {
    root.since.prepared.unwrap_or(root.created_at) + publication_delay(refresh_hint)
}

/// Why a prepared root may not sign yet: it has not been on the bundle endpoint for
/// `publication_delay` of the refresh hint. The message says what it waits for.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error(
    "it is on the bundle endpoint since {}; it may sign from {} ({} later: {PUBLISH_HINTS}x the refresh hint {}, as the SPIFFE federation spec advises, which covers a federated peer that polls every {} and retries a failed poll after {}, {} in all)",
    rfc3339(*.since),
    rfc3339(*.from),
    fmt_duration(publication_delay(*.refresh_hint)),
    fmt_duration(*.refresh_hint),
    fmt_duration(poll_interval(Some(*.refresh_hint))),
    fmt_duration(RETRY_AFTER_FAILURE),
    fmt_duration(worst_case_fetch(*.refresh_hint)),
)]
pub struct Unpublished {
    /// The prepared root.
    pub root: String,
    /// When it was prepared (and so published).
    pub since: OffsetDateTime,
    /// When it may sign.
    pub from: OffsetDateTime,
    /// The refresh hint we publish.
    pub refresh_hint: Duration,
}

/// The gate: `Err` until `root` has been published for `publication_delay` at `now`.
pub fn bundle_publication_gate(
    refresh_hint: Duration,
    now: OffsetDateTime,
) -> impl Fn(&RootRecord) -> Result<(), Unpublished> {
    move |root| {
        let from = publishable_at(root, refresh_hint);
        if now >= from {
            return Ok(());
        }
        Err(Unpublished {
            root: root.id.clone(),
            since: root.since.prepared.unwrap_or(root.created_at),
            from,
            refresh_hint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ca::{root, KeyType},
        spiffe::TrustDomain,
        state::{RootOrigin, RootState},
        trust::{MAX_REFRESH_HINT, MIN_REFRESH_HINT},
    };

    #[test]
    fn a_prepared_root_waits_three_refresh_hints() {
        let now = OffsetDateTime::now_utc();
        let td = TrustDomain::new("example.org").unwrap();
        let ca = root::generate_root(&td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now).unwrap();
        let r = RootRecord::new(
            &ca.cert,
            RootState::Prepared,
            RootOrigin::Generated,
            now,
            None,
            None,
        );
        let hint = Duration::from_secs(300);
        let early = bundle_publication_gate(hint, now + Duration::from_secs(899));
        let why = early(&r).unwrap_err().to_string();
        assert!(
            why.contains("3x the refresh hint 5m")
                && why.contains("polls every 75s and retries a failed poll after 1m"),
            "{why}"
        );
        assert!(bundle_publication_gate(hint, now + Duration::from_secs(900))(&r).is_ok());
    }

    /// Issue 17 item 13: the gate never opens before a meshid peer with one failed poll has
    /// the root, for every accepted hint (the boundaries, the clamps of the poll interval, and
    /// a 10 s hint that main accepted while peers polled every minute).
    #[test]
    fn the_gate_covers_a_peer_with_one_failed_poll_for_every_accepted_hint() {
        let s = Duration::from_secs;
        for hint in [
            s(10),
            MIN_REFRESH_HINT,
            s(239),
            s(240),
            s(300),
            s(1200),
            s(1201),
            MAX_REFRESH_HINT,
        ] {
            let delay = publication_delay(hint);
            assert!(
                delay >= poll_interval(Some(hint)) + RETRY_AFTER_FAILURE,
                "hint {hint:?}: gate {delay:?} opens before a peer with one failed poll has the root"
            );
            if hint >= MIN_REFRESH_HINT {
                assert_eq!(delay, hint * PUBLISH_HINTS, "hint {hint:?}: one rule");
            }
        }
    }
}
