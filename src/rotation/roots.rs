//! The root state machine: prepared → active → old → tainted → revoked.
//!
//! Each transition is a pure function over a `CaState` (plus who, when and why) that returns
//! the next state with its journal entries, or a refusal naming the next valid step. `apply`
//! runs one through a `StateStore` as a single compare-and-swap write, so a crash leaves either
//! the old state or the new one (with its journal entry), and of two concurrent writers one
//! wins and the other is told to re-run.
//!
//! `activate` takes the activation gate (`gate::ActivationGate::check`: published long enough
//! for federated peers, acknowledged by every stream read); its refusal is carried typed in
//! `RootError::ActivationHeld`, and `--force` records the activation as forced.

use std::time::Duration;

use thiserror::Error;
use time::OffsetDateTime;

use super::gate::GateRefusal;
use crate::{
    ca::{root::NewCa, Authority, CaError, IssuancePolicy, SigningMaterial},
    clock::{rfc3339, ManualClock},
    duration::fmt_duration,
    state::{
        anchor_of, signing_parts, Actor, CaState, Generation, JournalAction, JournalEntry,
        RootOrigin, RootRecord, RootState, SecretPem, StateError, StateStore,
    },
};

/// Added to the last-issuance bound before a revoke is safe: the server applies a change
/// within its poll interval (and may have signed with the old root until then), and peers'
/// clocks may run behind.
pub const REVOKE_MARGIN: Duration = Duration::from_secs(300);
/// A root this close to expiry with no prepared successor is a warning (istio#14516).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);
const REASON_MAX: usize = 500;

/// Why a transition was refused or could not be written. Nothing was written.
#[derive(Debug, Error)]
pub enum RootError {
    #[error(
        "no root or prepared signer has an id starting with {0:?}; `meshid root status` lists them"
    )]
    UnknownId(String),
    #[error("{prefix:?} matches several ids ({}); give more of the id", ids.join(", "))]
    AmbiguousId { prefix: String, ids: Vec<String> },
    #[error("{refused}; next: {next}")]
    Refused { refused: String, next: String },
    #[error("state changed concurrently (generation {expected} → {}); nothing was written: re-run the command", found.map_or("none".into(), |g| g.to_string()))]
    Concurrent {
        expected: Generation,
        found: Option<Generation>,
    },
    #[error("--reason must be 1-{REASON_MAX} printable characters")]
    BadReason,
    #[error("root {root} has not reached every peer yet: {why}; next: wait and re-run, or `meshid root activate {root} --force` (peers without it will refuse the new leaves)")]
    ActivationHeld { root: String, why: Box<GateRefusal> },
    #[error("the resulting authority does not work, so nothing was written: {0}")]
    AuthorityCheck(CaError),
    #[error(transparent)]
    State(#[from] StateError),
}

fn refused(refused: impl Into<String>, next: impl Into<String>) -> RootError {
    RootError::Refused {
        refused: refused.into(),
        next: next.into(),
    }
}

/// Who, when and why: what every journal entry records.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub actor: Actor,
    pub now: OffsetDateTime,
    pub reason: Option<String>,
    /// Filled in by `apply` from the state it read.
    pub from_generation: Option<Generation>,
}

impl Ctx {
    /// A context with a checked reason (printable, bounded).
    pub fn new(
        actor: Actor,
        now: OffsetDateTime,
        reason: Option<String>,
    ) -> Result<Self, RootError> {
        if let Some(r) = &reason {
            if r.trim().is_empty()
                || r.chars().count() > REASON_MAX
                || r.chars().any(char::is_control)
            {
                return Err(RootError::BadReason);
            }
        }
        Ok(Self {
            actor,
            now,
            reason,
            from_generation: None,
        })
    }

    fn entry(
        &self,
        action: JournalAction,
        root: &str,
        from: Option<RootState>,
        to: RootState,
    ) -> JournalEntry {
        JournalEntry {
            seq: 0,
            at: self.now.replace_nanosecond(0).unwrap_or(self.now),
            actor: self.actor.clone(),
            action,
            root: root.to_owned(),
            signer: None,
            from_state: from,
            to_state: to,
            reason: self.reason.clone(),
            from_generation: self.from_generation,
            forced: false,
        }
    }
}

/// What a transition did, for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: JournalAction,
    /// The root (or, for signer changes, the root the signer is under).
    pub root: String,
    pub signer: Option<String>,
    pub to: RootState,
    /// Consequences worth printing (what `--force` breaks, roots ignored on import).
    pub notes: Vec<String>,
}

/// A computed next state.
#[derive(Debug)]
pub struct Transition {
    pub state: CaState,
    pub outcome: Outcome,
}

/// What `prepare` adds.
pub enum Candidate {
    /// A freshly generated self-signed root.
    Generated(NewCa),
    /// A plug-in `cacerts` directory, loaded and checked.
    Plugin(SigningMaterial),
}

/// The activation gate of `activate` (`ActivationGate::check`): `Err` while the prepared root
/// may not sign yet.
pub type Gate<'a> = &'a dyn Fn(&RootRecord) -> Result<(), GateRefusal>;

/// No gate (a staged signer, which changes no bundle; tests).
pub fn no_gate(_: &RootRecord) -> Result<(), GateRefusal> {
    Ok(())
}

// === resolving ids ===

/// What an id names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Root(String),
    /// The prepared signer under the root with this id.
    PreparedSigner {
        root: String,
        signer: String,
    },
}

/// Resolves a unique prefix of a root's or a prepared signer's fingerprint id.
pub fn resolve(state: &CaState, prefix: &str) -> Result<Target, RootError> {
    let p = prefix.trim().to_ascii_lowercase();
    if p.is_empty() || !p.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(RootError::UnknownId(prefix.to_owned()));
    }
    let mut hits = Vec::new();
    for r in &state.roots {
        if r.id.starts_with(&p) {
            hits.push(Target::Root(r.id.clone()));
        }
        if let Some(s) = &r.prepared_signer {
            let signer = s.signer_id()?;
            if signer.starts_with(&p) {
                hits.push(Target::PreparedSigner {
                    root: r.id.clone(),
                    signer,
                });
            }
        }
    }
    match hits.len() {
        0 => Err(RootError::UnknownId(prefix.to_owned())),
        1 => Ok(hits.remove(0)),
        _ => Err(RootError::AmbiguousId {
            prefix: prefix.to_owned(),
            ids: hits
                .iter()
                .map(|t| match t {
                    Target::Root(id) | Target::PreparedSigner { signer: id, .. } => id.clone(),
                })
                .collect(),
        }),
    }
}

fn root_mut<'a>(state: &'a mut CaState, id: &str) -> &'a mut RootRecord {
    state
        .roots
        .iter_mut()
        .find(|r| r.id == id)
        .expect("resolved ids name a root of this state")
}

fn root_of<'a>(state: &'a CaState, prefix: &str) -> Result<&'a RootRecord, RootError> {
    let id = match resolve(state, prefix)? {
        Target::Root(id) => id,
        Target::PreparedSigner { signer, .. } => {
            return Err(refused(
                format!("{signer} is a prepared signer, not a root"),
                format!("`meshid root activate {signer}` to make it sign"),
            ))
        }
    };
    Ok(state.roots.iter().find(|r| r.id == id).expect("resolved"))
}

// === transitions ===

/// Adds a prepared root (trusted, not signing), or stages a plug-in signer under the active
/// root when the candidate chains to it (a signer change with no bundle change).
pub fn prepare(state: &CaState, candidate: Candidate, ctx: &Ctx) -> Result<Transition, RootError> {
    let active = state.signing_root().map_err(|_| {
        refused(
            "there is no active signing root to prepare a successor for",
            "create the authority with `meshid ca init`",
        )
    })?;
    if let Some(p) = state.roots.iter().find(|r| r.state == RootState::Prepared) {
        return Err(refused(
            format!("root {} is already prepared (at most one at a time)", p.id),
            format!("activate it with `meshid root activate {}`", p.id),
        ));
    }
    if let Some(s) = &active.prepared_signer {
        let sid = s.signer_id()?;
        return Err(refused(
            format!(
                "signer {sid} is already staged under the active root {}",
                active.id
            ),
            format!("activate it with `meshid root activate {sid}`"),
        ));
    }
    let (cert, key, signer, origin, mut notes) = match candidate {
        Candidate::Generated(ca) => {
            let key = Some(SecretPem::from_key(&ca.key));
            (ca.cert, key, None, RootOrigin::Generated, Vec::new())
        }
        Candidate::Plugin(m) => {
            let anchor = anchor_of(&m)?;
            let (key, signer) = signing_parts(&m);
            let ignored = m
                .roots
                .iter()
                .enumerate()
                .filter(|(i, r)| *i != anchor && !state.roots.iter().any(|k| k.id == crate::ca::cert::fingerprint_id(r)))
                .map(|(_, r)| format!("root {} in root-cert.pem does not anchor the signer and is not known; it was not added", crate::ca::cert::fingerprint_id(r)))
                .collect();
            let cert = m.roots[anchor].clone();
            if cert.as_ref() == active.cert_der()?.as_ref() {
                return stage_signer(state, active, key, signer, ctx);
            }
            (cert, key, signer, RootOrigin::Plugin, ignored)
        }
    };
    let id = crate::ca::cert::fingerprint_id(&cert);
    if let Some(known) = state.roots.iter().find(|r| r.id == id) {
        return Err(refused(
            format!(
                "root {id} is already in the state ({}); a prepared root must be new",
                known.state
            ),
            "make a new root: `meshid root prepare` (generated) or a new cacerts directory",
        ));
    }
    let mut next = state.clone();
    next.roots.push(RootRecord::new(
        &cert,
        RootState::Prepared,
        origin,
        ctx.now,
        key,
        signer,
    ));
    next.record(ctx.entry(JournalAction::Prepare, &id, None, RootState::Prepared));
    notes.push(format!(
        "root {id} is now in every bundle; activate it with `meshid root activate {id}` once every peer has it"
    ));
    Ok(Transition {
        state: next,
        outcome: Outcome {
            action: JournalAction::Prepare,
            root: id,
            signer: None,
            to: RootState::Prepared,
            notes,
        },
    })
}

fn stage_signer(
    state: &CaState,
    active: &RootRecord,
    key: Option<SecretPem>,
    signer: Option<crate::state::SignerRecord>,
    ctx: &Ctx,
) -> Result<Transition, RootError> {
    let Some(signer) = signer.filter(|_| key.is_none()) else {
        return Err(refused(
            format!(
                "the plug-in directory's signer is the active root {} itself",
                active.id
            ),
            "give a cacerts directory with a new intermediate, or a new root",
        ));
    };
    let sid = signer.signer_id()?;
    if active.signer_id()? == sid {
        return Err(refused(
            format!("signer {sid} is already the active root's signer"),
            "give a cacerts directory with a new intermediate, or a new root",
        ));
    }
    let mut next = state.clone();
    root_mut(&mut next, &active.id).prepared_signer = Some(signer);
    let mut e = ctx.entry(
        JournalAction::PrepareSigner,
        &active.id,
        Some(RootState::Active),
        RootState::Active,
    );
    e.signer = Some(sid.clone());
    next.record(e);
    Ok(Transition {
        state: next,
        outcome: Outcome {
            action: JournalAction::PrepareSigner,
            root: active.id.clone(),
            signer: Some(sid.clone()),
            to: RootState::Active,
            notes: vec![format!(
                "signer {sid} is staged under root {} (no bundle change); activate it with `meshid root activate {sid}`",
                active.id
            )],
        },
    })
}

/// Makes a prepared root the signing one (the active root becomes old), or the staged signer
/// the active root's signer. Without `force`, `gate` must pass.
pub fn activate(
    state: &CaState,
    id: &str,
    force: bool,
    gate: Gate<'_>,
    ctx: &Ctx,
) -> Result<Transition, RootError> {
    let target = resolve(state, id)?;
    let root_id = match &target {
        Target::Root(r) | Target::PreparedSigner { root: r, .. } => r.clone(),
    };
    let root = state
        .roots
        .iter()
        .find(|r| r.id == root_id)
        .expect("resolved");
    if root.state == RootState::Active && root.prepared_signer.is_some() {
        return activate_signer(state, root, ctx);
    }
    match root.state {
        RootState::Prepared if root.can_sign() => {}
        RootState::Prepared => {
            return Err(refused(
                format!("root {} is prepared but trusted only (meshid holds no key or signer for it), so it cannot sign", root.id),
                "prepare a root meshid can sign with: `meshid root prepare` or `meshid root prepare --from-plugin DIR`",
            ))
        }
        RootState::Active => {
            return Err(refused(
                format!("root {} is already active", root.id),
                "prepare a successor with `meshid root prepare`",
            ))
        }
        other => return Err(not_activatable(root, other)),
    }
    let mut forced = false;
    if let Err(why) = gate(root) {
        if !force {
            return Err(RootError::ActivationHeld {
                root: root.id.clone(),
                why: Box::new(why),
            });
        }
        forced = true;
    }
    let old_id = state.signing_root()?.id.clone();
    let mut next = state.clone();
    let old = root_mut(&mut next, &old_id);
    old.state = RootState::Old;
    old.since.set(RootState::Old, ctx.now);
    let new = root_mut(&mut next, &root_id);
    new.state = RootState::Active;
    new.since.set(RootState::Active, ctx.now);
    next.record(ctx.entry(
        JournalAction::Activate,
        &old_id,
        Some(RootState::Active),
        RootState::Old,
    ));
    let mut e = ctx.entry(
        JournalAction::Activate,
        &root_id,
        Some(RootState::Prepared),
        RootState::Active,
    );
    e.forced = forced;
    next.record(e);
    Ok(Transition {
        state: next,
        outcome: Outcome {
            action: JournalAction::Activate,
            root: root_id.clone(),
            signer: None,
            to: RootState::Active,
            notes: vec![format!(
                "root {old_id} is now old (trusted, not signing); taint it with `meshid root taint {old_id}` to re-issue every leaf it signed"
            )],
        },
    })
}

fn not_activatable(root: &RootRecord, state: RootState) -> RootError {
    let next = match state {
        RootState::Old => format!("taint it with `meshid root taint {}` when it should stop being trusted, or prepare a new root", root.id),
        RootState::Tainted => format!("revoke it with `meshid root revoke {}`", root.id),
        _ => "prepare a new root with `meshid root prepare`".into(),
    };
    refused(
        format!(
            "root {} is {state}; only a prepared root can be activated",
            root.id
        ),
        next,
    )
}

fn activate_signer(state: &CaState, root: &RootRecord, ctx: &Ctx) -> Result<Transition, RootError> {
    let mut next = state.clone();
    let r = root_mut(&mut next, &root.id);
    let retired = r.signer_id()?;
    r.signer = r.prepared_signer.take();
    r.retired_signers.push(retired.clone());
    let sid = r.signer_id()?;
    let mut e = ctx.entry(
        JournalAction::ActivateSigner,
        &root.id,
        Some(RootState::Active),
        RootState::Active,
    );
    e.signer = Some(sid.clone());
    next.record(e);
    Ok(Transition {
        state: next,
        outcome: Outcome {
            action: JournalAction::ActivateSigner,
            root: root.id.clone(),
            signer: Some(sid),
            to: RootState::Active,
            notes: vec![format!(
                "signer {retired} is retired; leaves it signed stay valid under root {}",
                root.id
            )],
        },
    })
}

/// Taints an old root: it stays trusted, but every leaf it signed is re-issued now.
pub fn taint(state: &CaState, id: &str, ctx: &Ctx) -> Result<Transition, RootError> {
    let root = root_of(state, id)?;
    if root.state != RootState::Old {
        let next = match root.state {
            RootState::Prepared => format!("activate it with `meshid root activate {}`", root.id),
            RootState::Active => match state.roots.iter().find(|r| r.state == RootState::Prepared) {
                Some(p) => format!("activate the prepared root with `meshid root activate {}`, which makes {} old", p.id, root.id),
                None => format!("prepare a successor (`meshid root prepare`) and activate it, which makes {} old", root.id),
            },
            RootState::Tainted => format!("revoke it with `meshid root revoke {}`", root.id),
            _ => "nothing: a revoked root is gone from every bundle".into(),
        };
        return Err(refused(
            format!(
                "root {} is {}; only an old root can be tainted",
                root.id, root.state
            ),
            next,
        ));
    }
    let mut next = state.clone();
    let r = root_mut(&mut next, &root.id);
    r.state = RootState::Tainted;
    r.since.set(RootState::Tainted, ctx.now);
    next.record(ctx.entry(
        JournalAction::Taint,
        &root.id,
        Some(RootState::Old),
        RootState::Tainted,
    ));
    Ok(Transition {
        state: next,
        outcome: Outcome {
            action: JournalAction::Taint,
            root: root.id.clone(),
            signer: None,
            to: RootState::Tainted,
            notes: vec![format!(
                "leaves from root {} are re-issued from the active root now",
                root.id
            )],
        },
    })
}

/// Until when certificates under `root` may still be valid: its last issuance (when it stopped
/// signing) plus the maximum leaf TTL and `REVOKE_MARGIN`, and any intermediate it issued.
/// (A root with no recorded time is treated as having signed until `now`.)
pub fn valid_certs_until(
    state: &CaState,
    root: &RootRecord,
    max_ttl: Duration,
    now: OffsetDateTime,
) -> (OffsetDateTime, Vec<String>) {
    let last_issuance = root.since.old.or(root.since.tainted).unwrap_or(now);
    let mut until = last_issuance + max_ttl + REVOKE_MARGIN;
    let mut why = vec![format!(
        "leaves it signed (last issuance {} + max TTL {} + {} margin)",
        rfc3339(last_issuance),
        fmt_duration(max_ttl),
        fmt_duration(REVOKE_MARGIN)
    )];
    for i in state.intermediates.iter().filter(|i| i.root_id == root.id) {
        if i.not_after > until {
            until = i.not_after;
        }
        why.push(format!(
            "intermediate for cluster {} (serial {}) valid until {}",
            i.cluster,
            i.serial,
            rfc3339(i.not_after)
        ));
    }
    (until, why)
}

/// Revokes a tainted root: it leaves every bundle and its keys are wiped. Refused while
/// certificates it anchors may still be valid, unless `force`. A prepared root (or a staged
/// signer) never signed anything, so it can be withdrawn at once.
pub fn revoke(
    state: &CaState,
    id: &str,
    force: bool,
    max_ttl: Duration,
    ctx: &Ctx,
) -> Result<Transition, RootError> {
    if let Target::PreparedSigner { root, signer } = resolve(state, id)? {
        return withdraw_signer(state, &root, &signer, ctx);
    }
    let root = root_of(state, id)?;
    if root.state == RootState::Prepared {
        return withdraw_prepared(state, root, ctx);
    }
    if root.state != RootState::Tainted {
        let next = match root.state {
            RootState::Old => format!("taint it first with `meshid root taint {}`", root.id),
            RootState::Revoked => "nothing: it is already gone from every bundle".into(),
            _ => format!(
                "make it old by activating a successor, then `meshid root taint {}`",
                root.id
            ),
        };
        return Err(refused(
            format!(
                "root {} is {}; only a tainted root can be revoked",
                root.id, root.state
            ),
            next,
        ));
    }
    let (until, why) = valid_certs_until(state, root, max_ttl, ctx.now);
    let mut notes = Vec::new();
    let unsafe_now = ctx.now < until;
    if unsafe_now && !force {
        return Err(refused(
            format!("root {} may still anchor valid certificates until {}: {}; revoking it now breaks every workload still holding one", root.id, rfc3339(until), why.join("; ")),
            format!("wait until {} and re-run `meshid root revoke {}`, or `meshid root revoke {} --force`", rfc3339(until), root.id, root.id),
        ));
    }
    if unsafe_now {
        notes.push(format!(
            "forced: certificates under root {} that are valid until {} ({}) now fail verification everywhere the bundle reaches",
            root.id, rfc3339(until), why.join("; ")
        ));
    }
    let mut next = state.clone();
    let r = root_mut(&mut next, &root.id);
    r.state = RootState::Revoked;
    r.since.set(RootState::Revoked, ctx.now);
    r.wipe_keys();
    let mut e = ctx.entry(
        JournalAction::Revoke,
        &root.id,
        Some(RootState::Tainted),
        RootState::Revoked,
    );
    e.forced = unsafe_now;
    next.record(e);
    notes.push(format!(
        "root {} left every bundle; its keys were wiped",
        root.id
    ));
    Ok(Transition {
        state: next,
        outcome: Outcome {
            action: JournalAction::Revoke,
            root: root.id.clone(),
            signer: None,
            to: RootState::Revoked,
            notes,
        },
    })
}

/// A prepared root leaves every bundle before it ever signed: nothing it anchors exists.
fn withdraw_prepared(
    state: &CaState,
    root: &RootRecord,
    ctx: &Ctx,
) -> Result<Transition, RootError> {
    let mut next = state.clone();
    let r = root_mut(&mut next, &root.id);
    r.state = RootState::Revoked;
    r.since.set(RootState::Revoked, ctx.now);
    r.wipe_keys();
    next.record(ctx.entry(
        JournalAction::Revoke,
        &root.id,
        Some(RootState::Prepared),
        RootState::Revoked,
    ));
    Ok(Transition {
        state: next,
        outcome: Outcome {
            action: JournalAction::Revoke,
            root: root.id.clone(),
            signer: None,
            to: RootState::Revoked,
            notes: vec![format!(
                "root {} was prepared and never signed: it left every bundle and its keys were wiped; prepare another with `meshid root prepare`",
                root.id
            )],
        },
    })
}

/// A staged signer is dropped before it ever signed; the active root keeps its signer.
fn withdraw_signer(
    state: &CaState,
    root: &str,
    signer: &str,
    ctx: &Ctx,
) -> Result<Transition, RootError> {
    let mut next = state.clone();
    root_mut(&mut next, root).prepared_signer = None;
    let mut e = ctx.entry(
        JournalAction::Revoke,
        root,
        Some(RootState::Active),
        RootState::Active,
    );
    e.signer = Some(signer.to_owned());
    next.record(e);
    Ok(Transition {
        state: next,
        outcome: Outcome {
            action: JournalAction::Revoke,
            root: root.to_owned(),
            signer: Some(signer.to_owned()),
            to: RootState::Active,
            notes: vec![format!(
                "staged signer {signer} was dropped before it signed; root {root} keeps its signer"
            )],
        },
    })
}

// === status helpers ===

/// The next step of a rotation in progress: a command, and the time from which it is safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextStep {
    pub command: String,
    pub safe_from: Option<OffsetDateTime>,
}

impl NextStep {
    fn now(command: String) -> Self {
        Self {
            command,
            safe_from: None,
        }
    }

    /// As printed: the command, made runnable by `complete` (the CLI adds the options that
    /// name the state), then when it is safe.
    pub fn runnable_with(&self, complete: impl Fn(&str) -> String) -> String {
        let cmd = complete(&self.command);
        match self.safe_from {
            Some(t) => format!("{cmd} (safe from {})", rfc3339(t)),
            None => cmd,
        }
    }
}

impl std::fmt::Display for NextStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.runnable_with(str::to_owned))
    }
}

/// The next step of a rotation in progress, as a command, if any.
pub fn next_step(state: &CaState, max_ttl: Duration, now: OffsetDateTime) -> Option<NextStep> {
    let by = |s: RootState| state.roots.iter().find(|r| r.state == s);
    if let Some(p) = by(RootState::Prepared) {
        return Some(NextStep::now(format!("meshid root activate {}", p.id)));
    }
    if let Some(s) = state
        .signing_root()
        .ok()
        .and_then(|r| r.prepared_signer.as_ref())
    {
        return s
            .signer_id()
            .ok()
            .map(|sid| NextStep::now(format!("meshid root activate {sid}")));
    }
    if let Some(o) = by(RootState::Old) {
        return Some(NextStep::now(format!("meshid root taint {}", o.id)));
    }
    let t = by(RootState::Tainted)?;
    let (until, _) = valid_certs_until(state, t, max_ttl, now);
    Some(NextStep {
        command: format!("meshid root revoke {}", t.id),
        safe_from: (now < until).then_some(until),
    })
}

/// A warning while the root that signs nears its end unreplaced: within `EXPIRY_WARNING` with
/// no successor prepared, or with a successor prepared but still not active once the
/// activation point has passed (min(⅙ of its life, `activate_before`) before the end, the
/// schedule automatic rotation follows): a rotation stuck before activation is the same danger,
/// so the warning does not fall silent just because a root was prepared.
pub fn expiry_warning(
    state: &CaState,
    now: OffsetDateTime,
    activate_before: Duration,
) -> Option<String> {
    let active = state.signing_root().ok()?;
    let not_after = active.not_after().ok()?;
    let remaining = not_after - now;
    let prepared = state.roots.iter().find(|r| r.state == RootState::Prepared);
    match prepared {
        None if remaining < EXPIRY_WARNING => Some(format!(
            "the active root {} expires at {} and no successor is prepared: run `meshid root prepare` and rotate before then",
            active.id,
            rfc3339(not_after)
        )),
        Some(p) if remaining < activation_point(active, activate_before) => Some(format!(
            "the active root {} expires at {} and its successor {} is prepared but still not active: activate it before then (`meshid root status` shows what holds it)",
            active.id,
            rfc3339(not_after),
            p.id
        )),
        _ => None,
    }
}

/// How long before its end a root's successor should be active: min(⅙ of its life,
/// `activate_before`) (SPIRE `keyActivationThreshold`).
pub fn activation_point(root: &RootRecord, activate_before: Duration) -> Duration {
    let lifetime = root
        .cert_der()
        .ok()
        .and_then(|der| {
            let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
            let v = c.validity();
            (v.not_after.to_datetime() - v.not_before.to_datetime())
                .try_into()
                .ok()
        })
        .unwrap_or(Duration::ZERO);
    (lifetime / 6).min(activate_before)
}

// === apply through the store ===

/// A transition written.
#[derive(Debug)]
pub struct Applied {
    pub outcome: Outcome,
    pub generation: Generation,
}

/// Reads the state, computes `step` over it, proves the resulting authority signs leaves that
/// verify, and writes state and journal entry in one compare-and-swap. A refusal, a failed
/// check or a concurrent change writes nothing.
pub fn apply(
    store: &dyn StateStore,
    ctx: &Ctx,
    step: impl FnOnce(&CaState, &Ctx) -> Result<Transition, RootError>,
) -> Result<Applied, RootError> {
    let current = store.load_existing()?;
    let ctx = Ctx {
        from_generation: Some(current.generation),
        ..ctx.clone()
    };
    let t = step(&current.state, &ctx)?;
    t.state.validate()?;
    check_authority(&t.state, ctx.now)?;
    match store.compare_and_swap(Some(current.generation), &t.state) {
        Ok(generation) => Ok(Applied {
            outcome: t.outcome,
            generation,
        }),
        Err(StateError::Conflict { found, .. }) => Err(RootError::Concurrent {
            expected: current.generation,
            found,
        }),
        Err(e) => Err(e.into()),
    }
}

fn check_authority(state: &CaState, now: OffsetDateTime) -> Result<(), RootError> {
    let authority = Authority::new(
        state.trust_domain.clone(),
        state.signing_material()?,
        IssuancePolicy::default(),
        std::sync::Arc::new(ManualClock::new(now)),
    )
    .map_err(RootError::AuthorityCheck)?;
    authority.self_test().map_err(RootError::AuthorityCheck)
}
