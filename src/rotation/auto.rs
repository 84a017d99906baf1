//! Automatic rotation of generated roots, on SPIRE's schedule (`pkg/server/ca/manager`,
//! `preparationThreshold` and `keyActivationThreshold`): prepare a successor when
//! min(½ lifetime, `prepare_before`) of the active root's life remains, activate it when
//! min(⅙ lifetime, `activate_before`) remains and it has reached every stream — or, past
//! `propagation_timeout` after that point, with the laggards named (SPIRE activates on schedule
//! whatever its clients do; one silent proxy must not keep a root from activating until the
//! old one expires). Plug-in CAs are
//! never rotated automatically (their successor comes from outside). Transitions are journaled
//! with actor `auto`; taint and revoke stay with the operator (`meshid root rotate` continues
//! from an automatic activation).

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{
    gate::{ActivationGate, LocalStatus},
    propagation::Propagation,
    roots::{
        activate, activation_point, apply, expiry_warning, prepare, Candidate, Ctx, RootError,
    },
};
use crate::{
    ca::root::generate_root,
    clock::{rfc3339, Clock},
    state::{Actor, CaState, RootOrigin, RootState, StateStore},
    telemetry::Metrics,
    trust::LiveCa,
};

/// `[auto_rotation]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoRotation {
    /// Off by default: a root rotation is an operator's decision until they opt in.
    pub enabled: bool,
    /// Prepare at most this long before the active root expires (SPIRE: 30 d).
    #[serde(with = "crate::duration::serde")]
    pub prepare_before: Duration,
    /// Activate at most this long before the active root expires (SPIRE: 7 d).
    #[serde(with = "crate::duration::serde")]
    pub activate_before: Duration,
    /// How long an automatic activation waits for every stream to hold the prepared root once
    /// it is due; then it activates anyway, naming the laggards in the log and counting the
    /// activation in `meshid_rotation_forced_activations_total`.
    #[serde(with = "crate::duration::serde")]
    pub propagation_timeout: Duration,
    /// How often the schedule (and the expiry warning) is checked.
    #[serde(with = "crate::duration::serde")]
    pub check_interval: Duration,
}

const DAY: Duration = Duration::from_secs(86_400);

impl Default for AutoRotation {
    fn default() -> Self {
        Self {
            enabled: false,
            prepare_before: 30 * DAY,
            activate_before: 7 * DAY,
            propagation_timeout: Duration::from_secs(3600),
            check_interval: Duration::from_secs(60),
        }
    }
}

impl AutoRotation {
    /// Every problem, each naming its key.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.activate_before.is_zero() || self.activate_before >= self.prepare_before {
            errs.push("auto_rotation.activate_before: must be above zero and below auto_rotation.prepare_before (a successor is prepared before it is activated)".into());
        }
        if self.propagation_timeout < Duration::from_secs(60)
            || self.propagation_timeout >= self.activate_before
        {
            errs.push("auto_rotation.propagation_timeout: must be at least 1m and below auto_rotation.activate_before (the old root must still be valid when the new one activates)".into());
        }
        if self.check_interval < Duration::from_secs(1) || self.check_interval > DAY {
            errs.push("auto_rotation.check_interval: must be between 1s and 24h".into());
        }
        errs
    }
}

/// What the schedule wants now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AutoStep {
    Nothing,
    /// Prepare a generated successor valid as long as the active root was.
    Prepare {
        root_ttl: Duration,
    },
    /// Activate the prepared root with this id: once it has propagated, or from `due` plus
    /// `propagation_timeout` on, whatever the laggards.
    Activate {
        id: String,
        due: OffsetDateTime,
    },
}

/// The schedule's decision for `state` at `now`.
pub fn auto_step(state: &CaState, cfg: &AutoRotation, now: OffsetDateTime) -> AutoStep {
    let Ok(active) = state.signing_root() else {
        return AutoStep::Nothing;
    };
    if active.origin != RootOrigin::Generated {
        return AutoStep::Nothing;
    }
    let Some((not_before, not_after)) = active.cert_der().ok().and_then(|der| {
        let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let v = c.validity();
        Some((v.not_before.to_datetime(), v.not_after.to_datetime()))
    }) else {
        return AutoStep::Nothing;
    };
    let lifetime: Duration = (not_after - not_before).try_into().unwrap_or_default();
    let remaining = not_after - now;
    let prepared = state.roots.iter().find(|r| r.state == RootState::Prepared);
    // The same point `expiry_warning` calls overdue.
    let activate_at = activation_point(active, cfg.activate_before);
    let prepare_at = (lifetime / 2).min(cfg.prepare_before);
    match prepared {
        Some(p) if p.can_sign() && remaining <= activate_at => AutoStep::Activate {
            id: p.id.clone(),
            due: not_after - activate_at,
        },
        None if remaining <= prepare_at && active.prepared_signer.is_none() => {
            AutoStep::Prepare { root_ttl: lifetime }
        }
        _ => AutoStep::Nothing,
    }
}

/// What the schedule loop needs from the running server.
#[derive(Clone)]
pub struct Schedule {
    pub cfg: AutoRotation,
    pub store: Arc<dyn StateStore>,
    pub live: Arc<LiveCa>,
    pub registry: Arc<Propagation>,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    pub replica: String,
    /// The federation refresh hint when a bundle endpoint publishes our bundle: a prepared
    /// root is activated only once peers have had 3 hints to fetch it.
    pub publication_hint: Option<Duration>,
}

impl Schedule {
    /// Every `check_interval` of the injected clock: the expiry warning (log and
    /// `meshid_root_expiry_warning`) and, when enabled, the automatic prepare/activate with
    /// actor `auto`. A step not taken is tried again at the next check.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let me = Arc::new(self);
        let mut warned: Option<(String, OffsetDateTime)> = None;
        loop {
            // The next check is due one interval after this one starts, whatever it does.
            let next = me.clock.now() + me.cfg.check_interval;
            let m = me.clone();
            match tokio::task::spawn_blocking(move || m.check()).await {
                Ok(Ok(warning)) => {
                    me.metrics
                        .root_expiry_warning
                        .set(i64::from(warning.is_some()));
                    warned = me.warn(warning, warned);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "automatic rotation step not taken; retrying at the next check")
                }
                Err(e) => tracing::error!(error = %e, "automatic rotation task failed"),
            }
            tokio::select! {
                _ = me.clock.sleep_until(next) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Logs `warning` when it is new, changed, or last logged an hour ago: it keeps firing
    /// while the root nears its end unreplaced.
    fn warn(
        &self,
        warning: Option<String>,
        last: Option<(String, OffsetDateTime)>,
    ) -> Option<(String, OffsetDateTime)> {
        let w = warning?;
        let now = self.clock.now();
        match last {
            Some((said, at)) if said == w && now - at < Duration::from_secs(3600) => {
                Some((said, at))
            }
            _ => {
                tracing::warn!(warning = %w, "root expiry");
                Some((w, now))
            }
        }
    }

    /// One check: returns the expiry warning, if any.
    fn check(&self) -> Result<Option<String>, RootError> {
        let now = self.clock.now();
        if self.cfg.enabled {
            let state = self.store.load_existing()?.state;
            let ctx = Ctx::new(
                Actor::auto(),
                now,
                Some("automatic rotation schedule".into()),
            )?;
            match auto_step(&state, &self.cfg, now) {
                AutoStep::Nothing => {}
                AutoStep::Prepare { root_ttl } => self.prepare_successor(&state, root_ttl, &ctx)?,
                AutoStep::Activate { id, due } => self.activate_prepared(&id, due, &ctx)?,
            }
        }
        let state = self.store.load_existing()?.state;
        Ok(expiry_warning(&state, now, self.cfg.activate_before))
    }

    /// Prepares a generated successor valid for `root_ttl` (a failed generation is logged and
    /// tried again at the next check).
    fn prepare_successor(
        &self,
        state: &CaState,
        root_ttl: Duration,
        ctx: &Ctx,
    ) -> Result<(), RootError> {
        let ca = match generate_root(&state.trust_domain, state.key_type, root_ttl, ctx.now) {
            Ok(ca) => ca,
            Err(e) => {
                tracing::error!(error = %e, "automatic rotation: generating the successor root failed; retrying at the next check");
                return Ok(());
            }
        };
        let a = apply(self.store.as_ref(), ctx, |s, c| {
            prepare(s, Candidate::Generated(ca), c)
        })?;
        tracing::info!(root = %a.outcome.root, generation = %a.generation, "automatic rotation: successor root prepared");
        Ok(())
    }

    /// Activates the prepared root `id` through the activation gate, with its propagation
    /// deadline `propagation_timeout` after `due`.
    fn activate_prepared(&self, id: &str, due: OffsetDateTime, ctx: &Ctx) -> Result<(), RootError> {
        let local = LocalStatus {
            registry: &self.registry,
            live: &self.live,
            replica: &self.replica,
        };
        let deadline = due + self.cfg.propagation_timeout;
        let gate = ActivationGate::new(self.publication_hint, Some(&local), ctx.now)
            .with_propagation_deadline(deadline);
        let a = apply(self.store.as_ref(), ctx, |s, c| {
            activate(s, id, false, &|r| gate.check(r), c)
        })?;
        match gate.take_overridden() {
            Some(laggards) => {
                self.metrics.rotation_forced_activations.inc();
                tracing::warn!(root = %a.outcome.root, generation = %a.generation, deadline = %rfc3339(deadline), %laggards, "automatic rotation: root activated at its propagation deadline although streams lag; they refuse leaves from the new root until they take the new bundle");
            }
            None => {
                tracing::info!(root = %a.outcome.root, generation = %a.generation, "automatic rotation: root activated")
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ca::{root, KeyType},
        spiffe::TrustDomain,
        state::RootRecord,
    };

    fn state(origin: RootOrigin, ttl: Duration, start: OffsetDateTime) -> CaState {
        let td = TrustDomain::new("cluster.local").unwrap();
        let ca = root::generate_root(&td, KeyType::EcdsaP256, ttl, start).unwrap();
        let mut s = CaState::with_generated_root(td, &ca, start);
        s.roots[0].origin = origin;
        s
    }

    fn with_prepared(mut s: CaState, at: OffsetDateTime) -> CaState {
        let ca = root::generate_root(&s.trust_domain, KeyType::EcdsaP256, 90 * DAY, at).unwrap();
        let key = Some(crate::state::SecretPem::from_key(&ca.key));
        s.roots.push(RootRecord::new(
            &ca.cert,
            RootState::Prepared,
            RootOrigin::Generated,
            at,
            key,
            None,
        ));
        s
    }

    /// SPIRE `preparationThreshold` / `keyActivationThreshold`: min(½ lifetime, 30 d) and
    /// min(⅙ lifetime, 7 d) before expiry. One row per rule.
    #[test]
    fn the_schedule_follows_spires_thresholds() {
        let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let cfg = AutoRotation {
            enabled: true,
            ..Default::default()
        };
        // An hour either side of each threshold (a generated root's notBefore may be backdated).
        let h = Duration::from_secs(3600);
        let long = state(RootOrigin::Generated, 365 * DAY, t0);
        let short = state(RootOrigin::Generated, 12 * DAY, t0);
        let end_long = t0 + 365 * DAY;
        let end_short = t0 + 12 * DAY;
        let kind = |s: AutoStep| match s {
            AutoStep::Nothing => "nothing",
            AutoStep::Prepare { root_ttl } if root_ttl >= 12 * DAY => "prepare",
            AutoStep::Prepare { .. } => "prepare with a shorter ttl",
            AutoStep::Activate { .. } => "activate",
        };
        let rows: Vec<(&str, AutoStep, &str)> = vec![
            (
                "long root, 31 d left: nothing yet (cap 30 d)",
                auto_step(&long, &cfg, end_long - 30 * DAY - h),
                "nothing",
            ),
            (
                "long root, 30 d left: prepare",
                auto_step(&long, &cfg, end_long - 30 * DAY + h),
                "prepare",
            ),
            (
                "short root: half its life left prepares (6 d < 30 d)",
                auto_step(&short, &cfg, end_short - 6 * DAY + h),
                "prepare",
            ),
            (
                "short root, more than half left: nothing",
                auto_step(&short, &cfg, end_short - 6 * DAY - h),
                "nothing",
            ),
            (
                "plug-in CA: never",
                auto_step(
                    &state(RootOrigin::Plugin, 12 * DAY, t0),
                    &cfg,
                    end_short - h,
                ),
                "nothing",
            ),
        ];
        for (name, got, want) in rows {
            assert_eq!(kind(got), want, "{name}");
        }
        let p = with_prepared(long.clone(), t0);
        let pid = p.roots[1].id.clone();
        assert_eq!(
            auto_step(&p, &cfg, end_long - 7 * DAY - h),
            AutoStep::Nothing,
            "prepared, 7 d + 1 h left: not yet (cap 7 d), and no second prepare"
        );
        assert_eq!(
            auto_step(&p, &cfg, end_long - 7 * DAY + h),
            AutoStep::Activate {
                id: pid,
                due: p.signing_root().unwrap().not_after().unwrap() - 7 * DAY
            },
            "prepared, under 7 d left: activate, due 7 d before the end"
        );
        let ps = with_prepared(short, t0);
        assert!(
            matches!(auto_step(&ps, &cfg, end_short - 2 * DAY + h), AutoStep::Activate { id, .. } if id == ps.roots[1].id),
            "short root: a sixth of its life (2 d) left activates"
        );
    }

    /// Issue 17 item 2: automatic rotation is not held hostage by one client. A stream that
    /// ACKed the old bundle and then stopped holds the activation once it is due, with the
    /// expiry warning firing (the successor is not active); past `propagation_timeout` the root
    /// is activated anyway, the laggard named and the activation counted (SPIRE `manager.go`
    /// `rotateX509CA` activates on schedule whatever its clients do).
    #[test]
    fn activation_is_held_by_a_laggard_only_until_its_deadline() {
        let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let clock = Arc::new(crate::clock::ManualClock::new(t0));
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::state::DirStore::new(dir.path()));
        let s = state(RootOrigin::Generated, 12 * DAY, t0);
        let old = s.roots[0].id.clone();
        crate::state::StateStore::compare_and_swap(store.as_ref(), None, &s).unwrap();
        let live = Arc::new(
            crate::trust::LiveCa::load(store.clone(), Default::default(), clock.clone()).unwrap(),
        );
        let registry = Arc::new(Propagation::default());
        let stuck = registry.open("spiffe://cluster.local/ns/a/sa/stuck".into(), None);
        stuck.subscribed(true, false);
        stuck.acked_bundle(vec![old.clone()].into());
        let schedule = Schedule {
            cfg: AutoRotation {
                enabled: true,
                propagation_timeout: 3 * Duration::from_secs(3600),
                ..Default::default()
            },
            store: store.clone(),
            live: live.clone(),
            registry: registry.clone(),
            metrics: Arc::new(crate::telemetry::Metrics::new()),
            clock: clock.clone(),
            replica: "meshid-0".into(),
            publication_hint: None,
        };
        let roots = || {
            crate::state::StateStore::load_existing(store.as_ref())
                .unwrap()
                .state
                .roots
        };
        let h = Duration::from_secs(3600);

        clock.advance(6 * DAY + h);
        assert!(
            schedule.check().unwrap().is_none(),
            "prepared: no warning yet"
        );
        live.reload_if_changed().unwrap();
        let new = roots()[1].id.clone();
        assert_eq!(roots()[1].state, RootState::Prepared);

        clock.advance(4 * DAY); // an hour past the activation point (2 d before the end)
        let held = schedule.check().unwrap_err().to_string();
        assert!(
            held.contains("sa/stuck"),
            "held by the laggard, named: {held}"
        );
        let warning = expiry_warning(
            &crate::state::StateStore::load_existing(store.as_ref())
                .unwrap()
                .state,
            clock.now(),
            schedule.cfg.activate_before,
        );
        assert!(
            warning.is_some_and(|w| w.contains("prepared but still not active")),
            "the warning keeps firing"
        );
        assert_eq!(schedule.metrics.rotation_forced_activations.get(), 0);

        clock.advance(3 * h);
        schedule.check().unwrap();
        let active = roots()
            .into_iter()
            .find(|r| r.state == RootState::Active)
            .unwrap();
        assert_eq!(active.id, new, "activated at the deadline");
        assert_eq!(schedule.metrics.rotation_forced_activations.get(), 1);
    }

    #[test]
    fn validation_names_the_key() {
        let bad = AutoRotation {
            activate_before: 40 * DAY,
            check_interval: Duration::ZERO,
            ..Default::default()
        };
        let errs = bad.validate();
        assert!(
            errs[0].starts_with("auto_rotation.activate_before"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("auto_rotation.check_interval"),
            "{errs:?}"
        );
        assert!(AutoRotation::default().validate().is_empty());
    }
}
