//! The federation side of activation: a prepared root must have been on our bundle endpoint
//! for at least 3x the refresh hint before it signs, so every federated peer polling at the
//! hint has fetched it (SPIFFE federation spec, section 4.2: publish a new key well before
//! use). Usable as (part of) the `activate` gate.

use std::time::Duration;

use time::OffsetDateTime;

use crate::state::RootRecord;

/// How many refresh hints a prepared root stays published before it may sign.
pub const PUBLISH_HINTS: u32 = 3;

/// When `root` may be activated: `PUBLISH_HINTS` refresh hints after it was prepared (it is
/// in the published bundle from then on, within the state poll interval).
pub fn publishable_at(root: &RootRecord, refresh_hint: Duration) -> OffsetDateTime {
    root.since.prepared.unwrap_or(root.created_at) + refresh_hint * PUBLISH_HINTS
}

/// The gate: `Err(why)` until `root` has been published for `PUBLISH_HINTS` refresh hints at
/// `now`.
pub fn bundle_publication_gate(
    refresh_hint: Duration,
    now: OffsetDateTime,
) -> impl Fn(&RootRecord) -> Result<(), String> {
    move |root| {
        let at = publishable_at(root, refresh_hint);
        if now >= at {
            return Ok(());
        }
        Err(format!(
            "it is on the bundle endpoint since {}; federated peers poll every refresh hint ({}s), so it may sign from {} ({}x the hint)",
            crate::clock::rfc3339(root.since.prepared.unwrap_or(root.created_at)),
            refresh_hint.as_secs(),
            crate::clock::rfc3339(at),
            PUBLISH_HINTS
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ca::{root, KeyType},
        spiffe::TrustDomain,
        state::{RootOrigin, RootState},
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
        let why = early(&r).unwrap_err();
        assert!(why.contains("3x the hint"), "{why}");
        assert!(bundle_publication_gate(hint, now + Duration::from_secs(900))(&r).is_ok());
    }
}
