//! Automatic rotation of generated roots, on SPIRE's schedule (`pkg/server/ca/manager`,
//! `preparationThreshold` and `keyActivationThreshold`): prepare a successor when
//! min(½ lifetime, `prepare_before`) of the active root's life remains, activate it when
//! min(⅙ lifetime, `activate_before`) remains and it has reached every stream. Plug-in CAs are
//! never rotated automatically (their successor comes from outside). Transitions are journaled
//! with actor `auto`; taint and revoke stay with the operator (`meshid root rotate` continues
//! from an automatic activation).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::state::{CaState, RootOrigin, RootState};

fn d<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    crate::ca::serde_duration_de(de)
}

/// `[auto_rotation]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoRotation {
    /// Off by default: a root rotation is an operator's decision until they opt in.
    pub enabled: bool,
    /// Prepare at most this long before the active root expires (SPIRE: 30 d).
    #[serde(
        deserialize_with = "d",
        serialize_with = "crate::ca::serde_duration_ser"
    )]
    pub prepare_before: Duration,
    /// Activate at most this long before the active root expires (SPIRE: 7 d).
    #[serde(
        deserialize_with = "d",
        serialize_with = "crate::ca::serde_duration_ser"
    )]
    pub activate_before: Duration,
    /// How often the schedule (and the expiry warning) is checked.
    #[serde(
        deserialize_with = "d",
        serialize_with = "crate::ca::serde_duration_ser"
    )]
    pub check_interval: Duration,
}

const DAY: Duration = Duration::from_secs(86_400);

impl Default for AutoRotation {
    fn default() -> Self {
        Self {
            enabled: false,
            prepare_before: 30 * DAY,
            activate_before: 7 * DAY,
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
    /// Activate the prepared root with this id (once it has propagated).
    Activate(String),
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
    let activate_at = (lifetime / 6).min(cfg.activate_before);
    let prepare_at = (lifetime / 2).min(cfg.prepare_before);
    match prepared {
        Some(p) if p.can_sign() && remaining <= activate_at => AutoStep::Activate(p.id.clone()),
        None if remaining <= prepare_at && active.prepared_signer.is_none() => {
            AutoStep::Prepare { root_ttl: lifetime }
        }
        _ => AutoStep::Nothing,
    }
}

/// What the schedule loop needs from the running server.
pub struct Schedule {
    pub cfg: AutoRotation,
    pub store: std::sync::Arc<dyn crate::state::StateStore>,
    pub live: std::sync::Arc<crate::trust::LiveCa>,
    pub registry: std::sync::Arc<super::Propagation>,
    pub metrics: std::sync::Arc<crate::telemetry::Metrics>,
    pub clock: std::sync::Arc<dyn crate::clock::Clock>,
    pub replica: String,
    /// The federation refresh hint when a bundle endpoint publishes our bundle: a prepared
    /// root is activated only once peers have had 3 hints to fetch it.
    pub publication_hint: Option<Duration>,
}

impl Schedule {
    /// Every `check_interval`: the expiry warning (log and `meshid_root_expiry_warning`) and,
    /// when enabled, the automatic prepare/activate with actor `auto`.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let me = std::sync::Arc::new(self);
        let mut warned = false;
        loop {
            let m = me.clone();
            match tokio::task::spawn_blocking(move || m.check()).await {
                Ok(Ok(warning)) => {
                    me.metrics
                        .root_expiry_warning
                        .set(i64::from(warning.is_some()));
                    match warning {
                        Some(w) if !warned => tracing::warn!(warning = %w, "root expiry"),
                        _ => {}
                    }
                    warned = me.metrics.root_expiry_warning.get() == 1;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "automatic rotation step not taken; retrying at the next check")
                }
                Err(e) => tracing::error!(error = %e, "automatic rotation task failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(me.cfg.check_interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// One check: returns the expiry warning, if any.
    fn check(&self) -> Result<Option<String>, super::RootError> {
        let now = self.clock.now();
        let state = self.store.load_existing()?.state;
        if self.cfg.enabled {
            let ctx = super::Ctx::new(
                crate::state::Actor::auto(),
                now,
                Some("automatic rotation schedule".into()),
            )?;
            match auto_step(&state, &self.cfg, now) {
                AutoStep::Nothing => {}
                AutoStep::Prepare { root_ttl } => {
                    let ca = match crate::ca::root::generate_root(
                        &state.trust_domain,
                        state.key_type,
                        root_ttl,
                        now,
                    ) {
                        Ok(ca) => ca,
                        Err(e) => {
                            tracing::error!(error = %e, "automatic rotation: generating the successor root failed; retrying at the next check");
                            return Ok(super::expiry_warning(&state, now));
                        }
                    };
                    let a = super::apply(self.store.as_ref(), &ctx, |s, c| {
                        super::prepare(s, super::Candidate::Generated(ca), c)
                    })?;
                    tracing::info!(root = %a.outcome.root, generation = %a.generation, "automatic rotation: successor root prepared");
                }
                AutoStep::Activate(id) => {
                    let published = self
                        .publication_hint
                        .map(|hint| super::bundle_publication_gate(hint, now));
                    let gate = |r: &crate::state::RootRecord| {
                        if let Some(published) = &published {
                            published(r)?;
                        }
                        super::status_of(&self.registry, &self.live.current(), &self.replica)
                            .root_propagated(&r.id)
                    };
                    let a = super::apply(self.store.as_ref(), &ctx, |s, c| {
                        super::activate(s, &id, false, &gate, c)
                    })?;
                    tracing::info!(root = %a.outcome.root, generation = %a.generation, "automatic rotation: root activated");
                }
            }
        }
        let state = self.store.load_existing()?.state;
        Ok(super::expiry_warning(&state, now))
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
            AutoStep::Activate(_) => "activate",
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
            AutoStep::Activate(pid),
            "prepared, under 7 d left: activate"
        );
        let ps = with_prepared(short, t0);
        assert_eq!(
            auto_step(&ps, &cfg, end_short - 2 * DAY + h),
            AutoStep::Activate(ps.roots[1].id.clone()),
            "short root: a sixth of its life (2 d) left activates"
        );
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
