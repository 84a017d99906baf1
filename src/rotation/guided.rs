//! The guided rotation behind `meshid root rotate`: prepare → wait until every connected stream
//! has ACKed a bundle with the new root → activate → wait until every stream runs on a leaf from
//! the new signer → taint the old root → revoke it when safe (or stop, naming the command and the
//! time it becomes safe).
//!
//! Each step is one compare-and-swap write with its journal entry (`apply`), and the driver
//! derives where it stands from the state alone, so a run interrupted at any point (killed, a
//! failed write, a timeout) continues from the state when run again. The waits read the server's
//! rotation status (`GET /debug/rotation`, `RotationStatus`) through `StatusSource`.

use std::time::Duration;

use thiserror::Error;
use time::OffsetDateTime;

use super::{
    gate::{on_every_replica, ActivationGate, GateRefusal},
    propagation::{Lag, RotationStatus},
    roots::{
        activate, apply, no_gate, prepare, revoke, taint, valid_certs_until, Applied, Candidate,
        Ctx, RootError,
    },
    status::{Budget, StatusSource, STATUS_READ_TIMEOUT},
};
use crate::{
    ca::{root, CaError, KeyType},
    clock::rfc3339,
    duration::fmt_duration,
    state::{CaState, JournalAction, RootOrigin, RootState, StateStore},
};

/// How often the CLI reads the server's status while it waits.
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);
/// The shortest bound of one status read while waiting (near the end of a wait).
const MIN_READ: Duration = Duration::from_millis(100);

/// Why a guided rotation stopped before its end. The state says where it stands; run again to
/// continue.
#[derive(Debug, Error)]
pub enum GuidedError {
    #[error(transparent)]
    Root(#[from] RootError),
    #[error("timed out after {} waiting: {why}; the rotation stays where it is (run `meshid root rotate` again to continue)", fmt_duration(*.waited))]
    TimedOut {
        waited: Duration,
        why: Box<GateRefusal>,
    },
    #[error("generating the new root: {0}")]
    Generate(CaError),
    #[error("stopped after {0}; run `meshid root rotate` again to continue")]
    Stopped(JournalAction),
}

/// How a guided rotation runs.
#[derive(Clone, Debug)]
pub struct GuidedOptions {
    /// Longest wait for each propagation step.
    pub timeout: Duration,
    /// How often the server's status is read while waiting.
    pub poll: Duration,
    /// Longest leaf lifetime the server issues (when the old root may be revoked).
    pub max_ttl: Duration,
    /// Key type of the generated root (default: the state's).
    pub key_type: Option<KeyType>,
    /// Lifetime of the generated root.
    pub root_ttl: Duration,
    /// The federation refresh hint when a bundle endpoint publishes our bundle: activation
    /// also waits until peers have had 3 hints to fetch the prepared root.
    pub publication_hint: Option<Duration>,
}

/// How a guided rotation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finished {
    /// The old root was revoked: the rotation is complete.
    Revoked { root: String },
    /// The old root is tainted but may still anchor valid leaves: revoke it at `at` with
    /// `command`.
    RevokeLater {
        root: String,
        at: OffsetDateTime,
        command: String,
    },
    /// A staged plug-in signer was activated and every stream runs on it.
    SignerActivated { signer: String },
}

/// Where a rotation stands, from the state alone.
enum Phase {
    Idle,
    Prepared(String),
    StagedSigner(String),
    Old { old: String, signer: String },
    Tainted(String),
}

fn phase(state: &CaState) -> Result<Phase, RootError> {
    let by = |s: RootState| state.roots.iter().find(|r| r.state == s);
    if let Some(p) = by(RootState::Prepared) {
        return Ok(Phase::Prepared(p.id.clone()));
    }
    let active = state.signing_root()?;
    if let Some(s) = &active.prepared_signer {
        return Ok(Phase::StagedSigner(s.signer_id()?));
    }
    if let Some(o) = by(RootState::Old) {
        return Ok(Phase::Old {
            old: o.id.clone(),
            signer: active.signer_id()?,
        });
    }
    if let Some(t) = by(RootState::Tainted) {
        return Ok(Phase::Tainted(t.id.clone()));
    }
    Ok(Phase::Idle)
}

/// Runs (or continues) a rotation. `ctx` makes each write's who/when/why; `progress` hears one
/// line per step; `after_write` runs after each journal write (the CLI passes a no-op; tests
/// inject failures there).
pub fn rotate(
    store: &dyn StateStore,
    server: &dyn StatusSource,
    opts: &GuidedOptions,
    ctx: &dyn Fn() -> Result<Ctx, RootError>,
    progress: &mut dyn FnMut(&str),
    after_write: &mut dyn FnMut(JournalAction) -> Result<(), GuidedError>,
) -> Result<Finished, GuidedError> {
    let mut guide = Guide {
        store,
        server,
        opts,
        ctx,
        progress,
        after_write,
    };
    let mut first = true;
    loop {
        let state = store.load_existing().map_err(RootError::from)?.state;
        let applied = match phase(&state)? {
            Phase::Idle if first => guide.prepare(&state)?,
            Phase::Idle => return Err(nothing_in_progress().into()),
            Phase::Prepared(p) => guide.activate_root(&p)?,
            Phase::StagedSigner(sid) => return guide.activate_signer(sid),
            Phase::Old { old, signer } => guide.taint_old(&old, &signer)?,
            Phase::Tainted(t) => return guide.revoke_when_safe(&state, t),
        };
        first = false;
        guide.written(&applied)?;
    }
}

fn nothing_in_progress() -> RootError {
    RootError::Refused {
        refused: "no rotation is in progress any more (another writer finished or undid it)".into(),
        next: "`meshid root status` shows the roots".into(),
    }
}

/// One run of the guided rotation: each phase's step.
struct Guide<'a> {
    store: &'a dyn StateStore,
    server: &'a dyn StatusSource,
    opts: &'a GuidedOptions,
    ctx: &'a dyn Fn() -> Result<Ctx, RootError>,
    progress: &'a mut dyn FnMut(&str),
    after_write: &'a mut dyn FnMut(JournalAction) -> Result<(), GuidedError>,
}

impl Guide<'_> {
    /// Idle at the start: prepares a generated successor (never over a plug-in CA).
    fn prepare(&mut self, state: &CaState) -> Result<Applied, GuidedError> {
        let active = state.signing_root().map_err(RootError::from)?;
        if active.origin == RootOrigin::Plugin {
            return Err(RootError::Refused {
                refused: format!("the active root {} is a plug-in CA; `root rotate` does not replace it with a generated root", active.id),
                next: "prepare the successor from its cacerts directory with `meshid root prepare --from-plugin DIR`, then re-run `meshid root rotate`".into(),
            }
            .into());
        }
        let c = (self.ctx)()?;
        let key_type = self.opts.key_type.unwrap_or(state.key_type);
        let ca = root::generate_root(&state.trust_domain, key_type, self.opts.root_ttl, c.now)
            .map_err(GuidedError::Generate)?;
        Ok(apply(self.store, &c, |s, c| {
            prepare(s, Candidate::Generated(ca), c)
        })?)
    }

    /// Waits until every stream has the prepared root, then activates it through the gate.
    fn activate_root(&mut self, root: &str) -> Result<Applied, GuidedError> {
        (self.progress)(&format!(
            "waiting until every connected stream has acknowledged a bundle with root {root}"
        ));
        self.wait(|st| st.root_propagated(root))?;
        let c = (self.ctx)()?;
        let gate = ActivationGate::new(self.opts.publication_hint, Some(self.server), c.now);
        Ok(apply(self.store, &c, |s, c| {
            activate(s, root, false, &|r| gate.check(r), c)
        })?)
    }

    /// Activates a staged plug-in signer and waits until every stream runs on it.
    fn activate_signer(&mut self, signer: String) -> Result<Finished, GuidedError> {
        let applied = apply(self.store, &(self.ctx)()?, |s, c| {
            activate(s, &signer, false, &no_gate, c)
        })?;
        self.written(&applied)?;
        (self.progress)(&format!(
            "waiting until every connected stream runs on a leaf from signer {signer}"
        ));
        self.wait(|st| st.signer_propagated(&signer))?;
        Ok(Finished::SignerActivated { signer })
    }

    /// Waits until every stream runs on the new signer, then taints the old root.
    fn taint_old(&mut self, old: &str, signer: &str) -> Result<Applied, GuidedError> {
        (self.progress)(&format!(
            "waiting until every connected stream runs on a leaf from signer {signer}"
        ));
        self.wait(|st| st.signer_propagated(signer))?;
        Ok(apply(self.store, &(self.ctx)()?, |s, c| taint(s, old, c))?)
    }

    /// Revokes the tainted root once nothing it anchors can be valid; until then, stops and
    /// says when and how.
    fn revoke_when_safe(&mut self, state: &CaState, t: String) -> Result<Finished, GuidedError> {
        let c = (self.ctx)()?;
        let Some(record) = state.roots.iter().find(|r| r.id == t) else {
            return Err(nothing_in_progress().into());
        };
        let (until, _) = valid_certs_until(state, record, self.opts.max_ttl, c.now);
        if c.now < until {
            let command = format!("meshid root revoke {t}");
            (self.progress)(&format!(
                "root {t} may still anchor valid leaves until {}; run `{command}` then (or re-run `meshid root rotate`)",
                rfc3339(until)
            ));
            return Ok(Finished::RevokeLater {
                root: t,
                at: until,
                command,
            });
        }
        let max_ttl = self.opts.max_ttl;
        let applied = apply(self.store, &c, |s, c| revoke(s, &t, false, max_ttl, c))?;
        self.written(&applied)?;
        Ok(Finished::Revoked { root: t })
    }

    /// Reports a write and runs `after_write`.
    fn written(&mut self, applied: &Applied) -> Result<(), GuidedError> {
        let o = &applied.outcome;
        (self.progress)(&format!(
            "{}: root {} is now {} (generation {})",
            o.action, o.root, o.to, applied.generation
        ));
        (self.after_write)(o.action)
    }

    /// Reads the server every `opts.poll` until `done` passes on every replica, for at most
    /// `opts.timeout`; prints the reason whenever it changes.
    fn wait(
        &mut self,
        done: impl Fn(&RotationStatus) -> Result<(), Lag>,
    ) -> Result<(), GuidedError> {
        let budget = Budget::new(self.opts.timeout);
        let mut last = String::new();
        loop {
            let within = budget.left().clamp(MIN_READ, STATUS_READ_TIMEOUT);
            let why = match self.server.statuses(within) {
                Ok(st) => match on_every_replica(&st, &done) {
                    Ok(()) => return Ok(()),
                    Err(why) => why,
                },
                Err(e) => GateRefusal::StatusUnreadable(e),
            };
            let text = why.to_string();
            if text != last {
                (self.progress)(&format!("  {text}"));
                last = text;
            }
            budget.sleep(self.opts.poll);
            if budget.is_spent() {
                return Err(GuidedError::TimedOut {
                    waited: budget.total(),
                    why: Box::new(why),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ca::root::DEFAULT_ROOT_TTL,
        spiffe::TrustDomain,
        state::{Actor, DirStore, RootOrigin},
    };

    struct NoServer;

    impl StatusSource for NoServer {
        fn statuses(
            &self,
            _: Duration,
        ) -> Result<Vec<RotationStatus>, crate::rotation::StatusError> {
            Ok(Vec::new())
        }
    }

    /// A plug-in CA is never replaced by a generated root: `root rotate` with nothing prepared
    /// refuses, names the plug-in path, and writes nothing.
    #[test]
    fn a_plugin_ca_is_not_replaced_by_a_generated_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path());
        let td = TrustDomain::new("cluster.local").unwrap();
        let now = OffsetDateTime::now_utc();
        let ca = root::generate_root(&td, KeyType::EcdsaP256, DEFAULT_ROOT_TTL, now).unwrap();
        let mut state = CaState::with_generated_root(td, &ca, now);
        state.roots[0].origin = RootOrigin::Plugin;
        let generation = store.compare_and_swap(None, &state).unwrap();
        let opts = GuidedOptions {
            timeout: Duration::from_secs(1),
            poll: Duration::from_millis(10),
            max_ttl: Duration::from_secs(86_400),
            key_type: None,
            root_ttl: DEFAULT_ROOT_TTL,
            publication_hint: None,
        };
        let ctx = || Ctx::new(Actor::user("op", "test"), OffsetDateTime::now_utc(), None);
        let err = rotate(&store, &NoServer, &opts, &ctx, &mut |_| {}, &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is a plug-in CA") && err.contains("--from-plugin DIR"),
            "{err}"
        );
        assert_eq!(
            store.load_existing().unwrap().generation,
            generation,
            "nothing written"
        );
    }
}
