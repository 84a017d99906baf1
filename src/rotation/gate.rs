//! The activation gate: the one rule the CLI (`root activate`), the guided rotation (`root
//! rotate`) and automatic rotation apply before a prepared root may sign.
//!
//! Two conditions, each optional by where it applies:
//! - **publication** (a bundle endpoint publishes our bundle): federated peers must have had
//!   time to fetch the prepared root (`publication::bundle_publication_gate`);
//! - **propagation**: every stream that has ACKed anything, on every replica read, holds a
//!   bundle with the root (`RotationStatus::root_propagated`).
//!
//! The operator's paths keep the strict gate (`--force` overrides it). Automatic rotation
//! passes a propagation deadline: past it, laggards are named in the log and the
//! `meshid_rotation_forced_activations` metric instead of holding the root back until it
//! expires (SPIRE activates on schedule: `pkg/server/ca/manager` `rotateX509CA`).

use std::{cell::RefCell, time::Duration};

use thiserror::Error;
use time::OffsetDateTime;

use super::{
    propagation::{status_of, Lag, Propagation, RotationStatus},
    publication::{bundle_publication_gate, Unpublished},
    status::{StatusError, StatusSource, STATUS_READ_TIMEOUT},
};
use crate::state::RootRecord;

/// Why the activation gate holds a prepared root (or a wait holds a step) back.
#[derive(Debug, Error)]
pub enum GateRefusal {
    /// Federated peers have not had time to fetch it from our bundle endpoint.
    #[error(transparent)]
    Unpublished(#[from] Unpublished),
    /// Replicas whose streams have not caught up, each with why.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    NotPropagated(Vec<Lag>),
    /// A replica's status could not be read.
    #[error("cannot read the server's status: {0}")]
    StatusUnreadable(StatusError),
}

/// `Ok` when `check` passes on every replica; otherwise every lagging replica's reason.
pub fn on_every_replica(
    statuses: &[RotationStatus],
    check: impl Fn(&RotationStatus) -> Result<(), Lag>,
) -> Result<(), GateRefusal> {
    let lags: Vec<Lag> = statuses.iter().filter_map(|s| check(s).err()).collect();
    if lags.is_empty() {
        Ok(())
    } else {
        Err(GateRefusal::NotPropagated(lags))
    }
}

/// Checks `check` against every replica of `server` now.
pub fn check_servers(
    server: &dyn StatusSource,
    check: impl Fn(&RotationStatus) -> Result<(), Lag>,
) -> Result<(), GateRefusal> {
    let statuses = server
        .statuses(STATUS_READ_TIMEOUT)
        .map_err(GateRefusal::StatusUnreadable)?;
    on_every_replica(&statuses, check)
}

/// The activation gate for one activation at `now`.
pub struct ActivationGate<'a> {
    /// The federation refresh hint when a bundle endpoint publishes our bundle.
    pub publication_hint: Option<Duration>,
    /// Where propagation is read: every replica's status. `None`: not checked (the caller says
    /// so to the operator).
    pub propagation: Option<&'a dyn StatusSource>,
    pub now: OffsetDateTime,
    /// From this instant on, propagation no longer holds the activation back: laggards are
    /// reported (automatic rotation's deadline). `None`: it always holds (the operator's gate).
    pub propagation_deadline: Option<OffsetDateTime>,
    overridden: RefCell<Option<GateRefusal>>,
}

impl<'a> ActivationGate<'a> {
    /// A strict gate (no deadline).
    pub fn new(
        publication_hint: Option<Duration>,
        propagation: Option<&'a dyn StatusSource>,
        now: OffsetDateTime,
    ) -> Self {
        Self {
            publication_hint,
            propagation,
            now,
            propagation_deadline: None,
            overridden: RefCell::new(None),
        }
    }

    /// Past `deadline`, propagation is reported instead of waited for.
    pub fn with_propagation_deadline(mut self, deadline: OffsetDateTime) -> Self {
        self.propagation_deadline = Some(deadline);
        self
    }

    /// `Err` while `root` may not sign yet.
    pub fn check(&self, root: &RootRecord) -> Result<(), GateRefusal> {
        if let Some(hint) = self.publication_hint {
            bundle_publication_gate(hint, self.now)(root)?;
        }
        let Some(source) = self.propagation else {
            return Ok(());
        };
        match check_servers(source, |st| st.root_propagated(&root.id)) {
            Ok(()) => Ok(()),
            Err(why) if self.propagation_deadline.is_some_and(|d| self.now >= d) => {
                *self.overridden.borrow_mut() = Some(why);
                Ok(())
            }
            Err(why) => Err(why),
        }
    }

    /// What held propagation back when the last `check` let the root through past its
    /// deadline, if anything (taken: a second call returns `None`).
    pub fn take_overridden(&self) -> Option<GateRefusal> {
        self.overridden.borrow_mut().take()
    }
}

/// This server's own registry as a status source (automatic rotation reads its own replica).
pub struct LocalStatus<'a> {
    pub registry: &'a Propagation,
    pub live: &'a crate::trust::LiveCa,
    pub replica: &'a str,
}

impl StatusSource for LocalStatus<'_> {
    fn statuses(&self, _: Duration) -> Result<Vec<RotationStatus>, StatusError> {
        Ok(vec![status_of(
            self.registry,
            &self.live.current(),
            self.replica,
        )])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ca::{root, KeyType},
        rotation::{Counts, Laggard, RotationStatus},
        spiffe::TrustDomain,
        state::{RootOrigin, RootState},
    };

    struct Fixed(RotationStatus);

    impl StatusSource for Fixed {
        fn statuses(&self, _: Duration) -> Result<Vec<RotationStatus>, StatusError> {
            Ok(vec![self.0.clone()])
        }
    }

    fn prepared(now: OffsetDateTime) -> RootRecord {
        let td = TrustDomain::new("example.org").unwrap();
        let ca = root::generate_root(&td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now).unwrap();
        RootRecord::new(
            &ca.cert,
            RootState::Prepared,
            RootOrigin::Generated,
            now,
            None,
            None,
        )
    }

    fn lagging(root: &str) -> Fixed {
        Fixed(RotationStatus {
            replica: "meshid-0".into(),
            generation: 3,
            bundle_sequence: 3,
            trusted_roots: vec!["old".into(), root.into()],
            signer: "old".into(),
            counts: Counts {
                streams: 2,
                bundle_streams: 2,
                roots: [(root.to_owned(), 1)].into(),
                laggard_count: 1,
                laggards: vec![Laggard {
                    peer: "spiffe://example.org/ns/a/sa/stuck".into(),
                    pod: None,
                    why: format!("bundle without root {root}"),
                }],
                ..Counts::default()
            },
        })
    }

    /// One row per rule: the strict gate holds on a laggard; automatic rotation's deadline lets
    /// it through and reports it; the publication rule holds whatever the deadline.
    #[test]
    fn the_gate_holds_until_propagated_or_past_the_automatic_deadline() {
        let now = OffsetDateTime::now_utc();
        let r = prepared(now - Duration::from_secs(3600));
        let source = lagging(&r.id);
        let strict = ActivationGate::new(None, Some(&source), now);
        assert!(
            strict
                .check(&r)
                .unwrap_err()
                .to_string()
                .contains("sa/stuck"),
            "strict: holds"
        );
        let before = ActivationGate::new(None, Some(&source), now)
            .with_propagation_deadline(now + Duration::from_secs(1));
        assert!(before.check(&r).is_err(), "before the deadline: holds");
        let past = ActivationGate::new(None, Some(&source), now)
            .with_propagation_deadline(now - Duration::from_secs(1));
        assert!(past.check(&r).is_ok(), "past the deadline: activates");
        assert!(
            past.take_overridden()
                .unwrap()
                .to_string()
                .contains("sa/stuck"),
            "and names the laggard"
        );
        let published = ActivationGate::new(Some(Duration::from_secs(3600)), Some(&source), now)
            .with_propagation_deadline(now - Duration::from_secs(1));
        assert!(
            matches!(published.check(&r), Err(GateRefusal::Unpublished(_))),
            "federated peers still get their time to fetch the root"
        );
        let unchecked = ActivationGate::new(None, None, now);
        assert!(unchecked.check(&r).is_ok() && unchecked.take_overridden().is_none());
    }
}
