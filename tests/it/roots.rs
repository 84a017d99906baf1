//! Root lifecycle: the state machine's refusals (one row each, with the message the operator
//! sees), crash points after each journal write, two writers, the bundle and signer through a
//! rotation, roots that share a subject, and the CLI end to end (generated and plug-in CAs).
//!
//! Reference: SPIRE's `localauthority x509 prepare|activate|taint|revoke`
//! (spire/pkg/server/ca/manager: prepared → active → old, taint, revoke only a tainted one);
//! Istio's multi-root `root-cert.pem` (security/pkg/pki/ca/selfsignedcarootcertrotator.go and
//! `ISTIO_MULTIROOT_MESH`): every root trusted, one signs; Istio's tools name every root
//! `O=Istio, CN=Root CA` (tools/certs/common.mk), so roots are told apart by key, not name.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Barrier,
    },
    time::Duration,
};

use meshid::{
    ca::{
        cert, chain, root, Authority, CertDer, IssuancePolicy, KeyType, PrivateKey, SigningMaterial,
    },
    clock::SystemClock,
    rotation::{self, Candidate, Ctx, GateRefusal, Lag, RootError, Waiting},
    state::{
        Actor, CaState, DirStore, Generation, IssuedIntermediate, JournalAction, RootState,
        StateError, StateStore, Versioned,
    },
    trust::LiveCa,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use time::OffsetDateTime;

use crate::support::*;

const DAY: Duration = Duration::from_secs(86_400);
const MAX_TTL: Duration = DAY;

fn t0() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn ctx(now: OffsetDateTime) -> Ctx {
    Ctx::new(Actor::user("alice", "ops-1"), now, None).unwrap()
}

fn generated(now: OffsetDateTime) -> root::NewCa {
    root::generate_root(&td(), KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now).unwrap()
}

fn initial(now: OffsetDateTime) -> CaState {
    CaState::with_generated_root(td(), &generated(now), now)
}

fn id_in(s: &CaState, state: RootState) -> String {
    s.roots
        .iter()
        .find(|r| r.state == state)
        .unwrap()
        .id
        .clone()
}

fn err_text<T: std::fmt::Debug>(r: Result<T, RootError>) -> String {
    r.unwrap_err().to_string()
}

/// The states of one rotation: active A; + prepared B; B active, A old; A tainted; A revoked.
struct Walk {
    states: Vec<CaState>,
    a: String,
    b: String,
}

fn walk(now: OffsetDateTime) -> Walk {
    let s0 = initial(now);
    let c = ctx(now);
    let s1 = rotation::prepare(&s0, Candidate::Generated(generated(now)), &c)
        .unwrap()
        .state;
    let (a, b) = (
        id_in(&s1, RootState::Active),
        id_in(&s1, RootState::Prepared),
    );
    let s2 = rotation::activate(&s1, &b, false, &rotation::no_gate, &c)
        .unwrap()
        .state;
    let s3 = rotation::taint(&s2, &a, &c).unwrap().state;
    let s4 = rotation::revoke(&s3, &a, true, MAX_TTL, &c).unwrap().state;
    Walk {
        states: vec![s0, s1, s2, s3, s4],
        a,
        b,
    }
}

/// The activation gate's refusal while `have` of `streams` streams hold `root`.
fn not_acknowledged(root: &meshid::state::RootRecord, have: usize, streams: usize) -> GateRefusal {
    GateRefusal::NotPropagated(vec![Lag::RootNotAcknowledged {
        replica: "meshid-0".into(),
        root: root.id.clone(),
        have,
        streams,
        waiting: Waiting::default(),
    }])
}

#[test]
fn refusals_name_the_next_step() {
    let now = t0();
    let Walk { states: s, a, b } = walk(now);
    let c = ctx(now);
    let later = ctx(now + Duration::from_secs(3600));
    let gate = |r: &meshid::state::RootRecord| Err(not_acknowledged(r, 2, 5));
    let rows: Vec<(&str, String, Vec<String>)> = vec![
        (
            "prepare: at most one prepared root",
            err_text(rotation::prepare(
                &s[1],
                Candidate::Generated(generated(now)),
                &c,
            )),
            vec![
                "already prepared".into(),
                format!("next: activate it with `meshid root activate {b}`"),
            ],
        ),
        (
            "activate: the active root",
            err_text(rotation::activate(&s[0], &a, false, &rotation::no_gate, &c)),
            vec![
                format!("root {a} is already active"),
                "next: prepare a successor with `meshid root prepare`".into(),
            ],
        ),
        (
            "activate: an old root",
            err_text(rotation::activate(&s[2], &a, false, &rotation::no_gate, &c)),
            vec![
                "only a prepared root can be activated".into(),
                format!("`meshid root taint {a}`"),
            ],
        ),
        (
            "activate: a tainted root",
            err_text(rotation::activate(&s[3], &a, false, &rotation::no_gate, &c)),
            vec![
                "is tainted".into(),
                format!("next: revoke it with `meshid root revoke {a}`"),
            ],
        ),
        (
            "activate: propagation gate refuses",
            err_text(rotation::activate(&s[1], &b, false, &gate, &c)),
            vec![
                format!("has not reached every peer yet: 2 of 5 streams on meshid-0 have acknowledged a bundle with root {b}"),
                format!("`meshid root activate {b} --force`"),
            ],
        ),
        (
            "taint: a prepared root",
            err_text(rotation::taint(&s[1], &b, &c)),
            vec![
                "only an old root can be tainted".into(),
                format!("next: activate it with `meshid root activate {b}`"),
            ],
        ),
        (
            "taint: the active root, successor prepared",
            err_text(rotation::taint(&s[1], &a, &c)),
            vec![
                format!("root {a} is active"),
                format!("`meshid root activate {b}`, which makes {a} old"),
            ],
        ),
        (
            "taint: the only root",
            err_text(rotation::taint(&s[0], &a, &c)),
            vec![
                "only an old root can be tainted".into(),
                "prepare a successor (`meshid root prepare`)".into(),
            ],
        ),
        (
            "revoke: an old root",
            err_text(rotation::revoke(&s[2], &a, false, MAX_TTL, &c)),
            vec![
                "only a tainted root can be revoked".into(),
                format!("next: taint it first with `meshid root taint {a}`"),
            ],
        ),
        (
            "revoke: the active root",
            err_text(rotation::revoke(&s[2], &b, false, MAX_TTL, &c)),
            vec![format!(
                "root {b} is active; only a tainted root can be revoked"
            )],
        ),
        (
            "revoke: leaves it signed may still be valid",
            err_text(rotation::revoke(&s[3], &a, false, MAX_TTL, &later)),
            vec![
                "may still anchor valid certificates until".into(),
                "max TTL 1d".into(),
                format!("or `meshid root revoke {a} --force`"),
            ],
        ),
        (
            "revoke: already revoked",
            err_text(rotation::revoke(&s[4], &a, false, MAX_TTL, &c)),
            vec!["is revoked".into(), "already gone from every bundle".into()],
        ),
        (
            "unknown id",
            err_text(rotation::taint(&s[2], "nothex", &c)),
            vec![
                "no root or prepared signer has an id starting with \"nothex\"".into(),
                "meshid root status".into(),
            ],
        ),
    ];
    for (rule, msg, wants) in rows {
        for want in wants {
            assert!(
                msg.contains(&want),
                "{rule}: {msg:?} should contain {want:?}"
            );
        }
    }
    assert!(matches!(
        Ctx::new(Actor::auto(), now, Some("two\nlines".into())),
        Err(RootError::BadReason)
    ));
}

#[test]
fn forced_and_safe_transitions_are_journaled() {
    let now = t0();
    let Walk { states: s, a, b } = walk(now);
    let gate = |r: &meshid::state::RootRecord| Err(not_acknowledged(r, 0, 1));
    let forced = rotation::activate(&s[1], &b, true, &gate, &ctx(now))
        .unwrap()
        .state;
    let last = forced.journal.last().unwrap();
    assert_eq!(
        (last.action, last.forced, last.root.as_str()),
        (JournalAction::Activate, true, b.as_str())
    );

    // After the last issuance + max TTL + margin, revoke needs no force.
    let safe = now + MAX_TTL + rotation::REVOKE_MARGIN + Duration::from_secs(1);
    let t = rotation::revoke(&s[3], &a, false, MAX_TTL, &ctx(safe)).unwrap();
    let revoked = t.state.roots.iter().find(|r| r.id == a).unwrap();
    assert_eq!(revoked.state, RootState::Revoked);
    assert!(
        !revoked.can_sign() && revoked.private_key.is_none(),
        "keys wiped"
    );
    assert!(!t.state.journal.last().unwrap().forced);

    // An intermediate issued under the root keeps it unsafe until the intermediate expires.
    let mut with_int = s[3].clone();
    with_int.intermediates.push(IssuedIntermediate {
        cluster: "east".into(),
        serial: "01".into(),
        root_id: a.clone(),
        not_after: now + 365 * DAY,
        certificate: String::new(),
    });
    let msg = err_text(rotation::revoke(&with_int, &a, false, MAX_TTL, &ctx(safe)));
    assert!(msg.contains("intermediate for cluster east"), "{msg}");
}

#[test]
fn a_refusal_through_the_store_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::new(dir.path());
    store.compare_and_swap(None, &initial(t0())).unwrap();
    let before = std::fs::read(store.state_path()).unwrap();
    let a = id_in(&store.load_existing().unwrap().state, RootState::Active);
    let err = rotation::apply(&store, &ctx(t0()), |s, c| rotation::taint(s, &a, c)).unwrap_err();
    assert!(matches!(err, RootError::Refused { .. }), "{err}");
    assert_eq!(std::fs::read(store.state_path()).unwrap(), before);
}

// === crash points ===

/// A store that fails its N-th write, before or after the write reached the disk (a crash
/// between the rename and the caller learning of it).
struct Flaky {
    inner: DirStore,
    fail_at: usize,
    after: bool,
    writes: AtomicUsize,
}

impl StateStore for Flaky {
    fn load(&self) -> Result<Option<Versioned>, StateError> {
        self.inner.load()
    }

    fn compare_and_swap(
        &self,
        expected: Option<Generation>,
        state: &CaState,
    ) -> Result<Generation, StateError> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_at && !self.after {
            return Err(StateError::Invalid(
                "injected crash before the write".into(),
            ));
        }
        let g = self.inner.compare_and_swap(expected, state)?;
        if n == self.fail_at {
            return Err(StateError::Invalid("injected crash after the write".into()));
        }
        Ok(g)
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn create_migrated(&self, from: &Versioned) -> Result<Generation, StateError> {
        self.inner.create_migrated(from)
    }
}

/// A resumable rotation: reads where the state stands (the journal, the root states) and
/// takes the next step until the old root is revoked.
fn drive(store: &dyn StateStore, now: OffsetDateTime) -> Result<(), RootError> {
    let revoke_at = now + MAX_TTL + rotation::REVOKE_MARGIN + Duration::from_secs(60);
    loop {
        let s = store.load_existing()?.state;
        let by = |st: RootState| s.roots.iter().find(|r| r.state == st).map(|r| r.id.clone());
        if let Some(p) = by(RootState::Prepared) {
            rotation::apply(store, &ctx(now), |s, c| {
                rotation::activate(s, &p, false, &rotation::no_gate, c)
            })?;
        } else if let Some(o) = by(RootState::Old) {
            rotation::apply(store, &ctx(now), |s, c| rotation::taint(s, &o, c))?;
        } else if let Some(t) = by(RootState::Tainted) {
            rotation::apply(store, &ctx(revoke_at), |s, c| {
                rotation::revoke(s, &t, false, MAX_TTL, c)
            })?;
        } else if !s.journal.iter().any(|e| e.action == JournalAction::Prepare) {
            let ca = generated(now);
            rotation::apply(store, &ctx(now), |s, c| {
                rotation::prepare(s, Candidate::Generated(ca), c)
            })?;
        } else {
            return Ok(());
        }
    }
}

#[test]
fn a_crash_after_any_journal_write_resumes_and_finishes() {
    use JournalAction::*;
    let expected = [Prepare, Activate, Activate, Taint, Revoke];
    for fail_at in 1..=4 {
        for after in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let now = t0();
            DirStore::new(dir.path())
                .compare_and_swap(None, &initial(now))
                .unwrap();
            let flaky = Flaky {
                inner: DirStore::new(dir.path()),
                fail_at,
                after,
                writes: AtomicUsize::new(0),
            };
            let err = drive(&flaky, now).unwrap_err();
            assert!(err.to_string().contains("injected crash"), "{err}");
            // "Restart": a fresh store over the same directory; the journal says where it stood.
            let store = DirStore::new(dir.path());
            let journal = store.load_existing().unwrap().state.journal;
            let steps_done = if after { fail_at } else { fail_at - 1 };
            // Entries after k writes: prepare 1, activate 2 (old and new root), taint 1, revoke 1.
            let done = [0, 1, 3, 4, 5][steps_done];
            assert_eq!(
                journal.len(),
                done,
                "fail_at {fail_at} after {after}: {journal:?}"
            );
            drive(&store, now).unwrap();
            let s = store.load_existing().unwrap().state;
            let actions: Vec<_> = s.journal.iter().map(|e| e.action).collect();
            assert_eq!(
                actions, expected,
                "fail_at {fail_at} after {after}: nothing lost or doubled"
            );
            let seqs: Vec<_> = s.journal.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, [1, 2, 3, 4, 5]);
            let states: Vec<_> = s.roots.iter().map(|r| r.state).collect();
            assert_eq!(states, [RootState::Revoked, RootState::Active]);
            assert_eq!(
                s.journal[0].root, s.roots[1].id,
                "the prepared root is the one now active"
            );
            assert_eq!(
                s.journal.last().unwrap().from_generation,
                Some(Generation(4))
            );
        }
    }
}

#[test]
fn two_writers_one_wins_the_other_is_told_to_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::new(dir.path());
    store.compare_and_swap(None, &initial(t0())).unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            let ca = generated(t0());
            std::thread::spawn(move || {
                rotation::apply(&store, &ctx(t0()), |s, c| {
                    barrier.wait(); // both have read generation 1
                    rotation::prepare(s, Candidate::Generated(ca), c)
                })
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    let err = results.into_iter().find_map(Result::err).unwrap();
    assert!(
        matches!(
            err,
            RootError::Concurrent {
                expected: Generation(1),
                found: Some(Generation(2))
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("state changed concurrently (generation 1 → 2)") && msg.contains("re-run"),
        "{msg}"
    );
    let s = store.load_existing().unwrap().state;
    assert_eq!((s.roots.len(), s.journal.len()), (2, 1));
}

// === the bundle and the signer through a rotation ===

#[test]
fn bundle_and_signer_follow_the_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DirStore::new(dir.path()));
    store.compare_and_swap(None, &initial(t0())).unwrap();
    let live = LiveCa::load(
        store.clone(),
        IssuancePolicy::default(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let a = id_in(&store.load_existing().unwrap().state, RootState::Active);
    let cert_of = |id: &str| {
        let s = store.load_existing().unwrap().state;
        s.roots
            .iter()
            .find(|r| r.id == id)
            .unwrap()
            .cert_der()
            .unwrap()
    };
    let a_cert = cert_of(&a);
    let leaf_verifies_with = |roots: &[CertDer]| {
        let snap = live.current();
        let (issued, _key) = snap
            .authority
            .issue_with_new_key(&workload("shop", "web"), None)
            .unwrap();
        chain::verify_leaf(&issued.leaf, &issued.chain, roots, t0())
    };

    rotation::apply(store.as_ref(), &ctx(t0()), |s, c| {
        rotation::prepare(s, Candidate::Generated(generated(t0())), c)
    })
    .unwrap();
    assert!(live.reload_if_changed().unwrap());
    let b = id_in(&store.load_existing().unwrap().state, RootState::Prepared);
    let b_cert = cert_of(&b);
    assert_eq!(
        live.current().bundle.own_roots(),
        [a_cert.clone(), b_cert.clone()],
        "after prepare: both"
    );
    assert_eq!(live.current().signer_id, a, "prepared does not sign");
    leaf_verifies_with(std::slice::from_ref(&a_cert)).unwrap();

    rotation::apply(store.as_ref(), &ctx(t0()), |s, c| {
        rotation::activate(s, &b, false, &rotation::no_gate, c)
    })
    .unwrap();
    assert!(live.reload_if_changed().unwrap());
    assert_eq!(live.current().signer_id, b);
    leaf_verifies_with(std::slice::from_ref(&b_cert)).unwrap();
    assert!(
        leaf_verifies_with(std::slice::from_ref(&a_cert)).is_err(),
        "new leaves chain to the new root only"
    );
    assert!(live.current().tainted_signers.is_empty());

    rotation::apply(store.as_ref(), &ctx(t0()), |s, c| rotation::taint(s, &a, c)).unwrap();
    assert!(live.reload_if_changed().unwrap());
    assert_eq!(
        live.current().tainted_signers,
        [a.clone()].into_iter().collect()
    );
    assert_eq!(
        live.current().bundle.own_roots().len(),
        2,
        "tainted is still trusted"
    );

    rotation::apply(store.as_ref(), &ctx(t0()), |s, c| {
        rotation::revoke(s, &a, true, MAX_TTL, c)
    })
    .unwrap();
    assert!(live.reload_if_changed().unwrap());
    assert_eq!(
        live.current().bundle.own_roots(),
        [b_cert],
        "after revoke: only the new root"
    );
    assert!(live.current().tainted_signers.is_empty());
}

// === roots with the same subject ===

/// A root named as Istio's tools name every root.
fn istio_root(valid_for: Duration) -> (CertDer, KeyPair) {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::OrganizationName, "Istio");
    p.distinguished_name.push(DnType::CommonName, "Root CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = t0() - Duration::from_secs(3600);
    p.not_after = t0() + valid_for;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let c = p.self_signed(&key).unwrap();
    (c.der().clone(), key)
}

fn intermediate_under(root_cert: &CertDer, root_key: &KeyPair) -> (CertDer, PrivateKey) {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::OrganizationName, "Istio");
    p.distinguished_name
        .push(DnType::CommonName, "Intermediate CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local".try_into().unwrap(),
    )];
    p.not_before = t0() - Duration::from_secs(3600);
    p.not_after = t0() + 365 * DAY;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(root_cert, root_key).unwrap();
    let c = p.signed_by(&key, &issuer).unwrap();
    (
        c.der().clone(),
        PrivateKey::from_pem(key.serialize_pem().as_bytes(), "key").unwrap(),
    )
}

/// Old code looked the anchoring root up by subject: an older same-named root expiring in two
/// days capped every leaf (and stopped all signing once it expired).
#[test]
fn a_same_named_root_that_did_not_sign_does_not_cap_the_chain() {
    let (old_root, _) = istio_root(2 * DAY);
    let (new_root, new_key) = istio_root(3650 * DAY);
    let (inter, inter_key) = intermediate_under(&new_root, &new_key);
    let inter_not_after = cert::parse(&inter, "i")
        .unwrap()
        .validity()
        .not_after
        .to_datetime();
    let authority = Authority::new(
        td(),
        SigningMaterial {
            signer_cert: inter,
            signer_key: inter_key,
            intermediates: vec![],
            roots: vec![old_root, new_root],
        },
        IssuancePolicy::default(),
        Arc::new(SystemClock),
    )
    .unwrap();
    assert_eq!(authority.chain_not_after(), inter_not_after);
}

/// A multi-root root-cert.pem (ISTIO_MULTIROOT_MESH) with two `O=Istio, CN=Root CA` roots, the
/// non-signing one first: old code gave the signer to the first root with a matching name.
#[test]
fn a_multi_root_import_makes_the_anchor_active_and_the_others_trusted() {
    let (other, _) = istio_root(3650 * DAY);
    let (anchor, anchor_key) = istio_root(3650 * DAY);
    let (inter, inter_key) = intermediate_under(&anchor, &anchor_key);
    let m = SigningMaterial {
        signer_cert: inter,
        signer_key: inter_key,
        intermediates: vec![],
        roots: vec![other.clone(), anchor.clone()],
    };
    let s = CaState::from_plugin(td(), &m, t0()).unwrap();
    assert_eq!(s.signing_root().unwrap().id, cert::fingerprint_id(&anchor));
    let states: Vec<_> = s.roots.iter().map(|r| (r.id.clone(), r.state)).collect();
    assert_eq!(
        states,
        [
            (cert::fingerprint_id(&other), RootState::Old),
            (cert::fingerprint_id(&anchor), RootState::Active)
        ]
    );
    assert_eq!(s.trusted_roots().unwrap(), [other, anchor]);
}

// === the CLI end to end ===

/// Issue 17 item 11: with neither `USER` nor `LOGNAME` (a container, a cron job), the journal
/// names the process's OS account, not `unknown@host`.
#[test]
fn the_journal_names_the_os_user_when_user_is_unset() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    ok(&init_ca(&state));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshid"))
        .args(["root", "prepare", "--state-dir", state.to_str().unwrap()])
        .env_remove("USER")
        .env_remove("LOGNAME")
        .output()
        .unwrap();
    ok(&out);
    let actor = status_json(&state)["journal"][0]["actor"]
        .as_str()
        .unwrap()
        .to_owned();
    let me = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    let me = String::from_utf8_lossy(&me.stdout).trim().to_owned();
    assert!(
        actor.starts_with(&format!("{me}@")),
        "{actor} names the OS user {me}"
    );
}

fn root_cli(args: &[&str], state: &Path) -> std::process::Output {
    let mut all = vec!["root"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--state-dir", state.to_str().unwrap()]);
    meshid(&all)
}

fn status_json(state: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&root_cli(&["status", "--output", "json"], state))).unwrap()
}

fn id_with(j: &serde_json::Value, state: &str) -> String {
    j["roots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["state"] == state)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Issues a leaf through the CLI; returns (leaf and chain, bundle).
fn issue(state: &Path, out: &Path) -> (Vec<CertDer>, Vec<CertDer>) {
    let _ = std::fs::remove_dir_all(out);
    ok(&meshid(&[
        "cert",
        "issue",
        "--state-dir",
        state.to_str().unwrap(),
        "--spiffe-id",
        "spiffe://cluster.local/ns/shop/sa/web",
        "--out-dir",
        out.to_str().unwrap(),
    ]));
    let read = |f: &str| cert::certs_from_pem(&std::fs::read(out.join(f)).unwrap(), f).unwrap();
    (read("cert-chain.pem"), read("root-cert.pem"))
}

fn verifies(chain: &[CertDer], root: &CertDer) -> bool {
    chain::verify_leaf(&chain[0], &chain[1..], std::slice::from_ref(root), t0()).is_ok()
}

fn root_cert(state: &Path, id: &str) -> CertDer {
    let s = DirStore::new(state).load_existing().unwrap().state;
    s.roots
        .iter()
        .find(|r| r.id == id)
        .unwrap()
        .cert_der()
        .unwrap()
}

#[test]
fn cli_rotates_a_generated_root() {
    let dir = tempfile::tempdir().unwrap();
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    ok(&init_ca(&state));
    let a = id_with(&status_json(&state), "active");

    ok(&root_cli(
        &["prepare", "--reason", "yearly rotation"],
        &state,
    ));
    let j = status_json(&state);
    let b = id_with(&j, "prepared");
    assert_eq!(j["roots"].as_array().unwrap().len(), 2);
    assert_eq!(
        j["next_step"],
        format!("meshid root activate {b} --state-dir {}", state.display())
    );
    assert_eq!(j["journal"][0]["reason"], "yearly rotation");
    assert!(j["journal"][0]["actor"].as_str().unwrap().contains('@'));
    let (_, bundle) = issue(&state, &out);
    assert_eq!(bundle.len(), 2, "after prepare the bundle holds both roots");

    let before = std::fs::read(state.join("state.json")).unwrap();
    fails_with(
        &root_cli(&["prepare"], &state),
        &format!(
            "next: activate it with `meshid root activate {b} --state-dir {}`",
            state.display()
        ),
    );
    fails_with(
        &root_cli(&["taint", &a], &state),
        &format!(
            "`meshid root activate {b} --state-dir {}`, which makes {a} old",
            state.display()
        ),
    );
    assert_eq!(
        std::fs::read(state.join("state.json")).unwrap(),
        before,
        "refusals write nothing"
    );

    ok(&root_cli(&["activate", &b[..6]], &state)); // a unique prefix is enough
    let (leaf, _) = issue(&state, &out);
    assert!(verifies(&leaf, &root_cert(&state, &b)) && !verifies(&leaf, &root_cert(&state, &a)));

    ok(&root_cli(&["taint", &a], &state));
    let before = std::fs::read(state.join("state.json")).unwrap();
    fails_with(
        &root_cli(&["revoke", &a], &state),
        &format!(
            "or `meshid root revoke {a} --force --state-dir {}`",
            state.display()
        ),
    );
    assert_eq!(std::fs::read(state.join("state.json")).unwrap(), before);
    let o = ok(&root_cli(&["revoke", &a, "--force"], &state));
    assert!(
        o.contains("forced:") && o.contains("keys were wiped"),
        "{o}"
    );
    let (_, bundle) = issue(&state, &out);
    assert_eq!(
        bundle,
        [root_cert(&state, &b)],
        "after revoke only the new root"
    );

    let text = ok(&root_cli(&["status"], &state));
    for want in [
        format!("{a}   revoked"),
        format!("{b}   active"),
        "journal (last 5):".to_owned(),
        "revoke".to_owned(),
        "[forced]".to_owned(),
        ": yearly rotation".to_owned(),
    ] {
        assert!(text.contains(&want), "{text} should contain {want:?}");
    }
    let j = status_json(&state);
    let actions: Vec<_> = j["journal"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        actions,
        ["prepare", "activate", "activate", "taint", "revoke"]
    );
    assert_eq!(j["next_step"], serde_json::Value::Null);
}

/// Two openssl-made plug-in CAs whose roots are both `O=Istio, CN=Root CA`.
#[test]
fn cli_rotates_a_plugin_ca_to_a_same_named_root() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("cacerts-1"), dir.path().join("cacerts-2"));
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    for d in [&one, &two] {
        std::fs::create_dir_all(d).unwrap();
        crate::plugin_import::openssl_cacerts(d);
    }
    ok(&import_plugin(&one, &state));
    let a = id_with(&status_json(&state), "active");
    let o = ok(&root_cli(
        &["prepare", "--from-plugin", two.to_str().unwrap()],
        &state,
    ));
    assert!(o.contains("is now prepared"), "{o}");
    let j = status_json(&state);
    let b = id_with(&j, "prepared");
    let subjects: Vec<_> = j["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["subject"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(subjects, ["O=Istio, CN=Root CA", "O=Istio, CN=Root CA"]);

    ok(&root_cli(&["activate", &b], &state));
    let (leaf, bundle) = issue(&state, &out);
    assert_eq!(bundle.len(), 2);
    assert!(verifies(&leaf, &root_cert(&state, &b)) && !verifies(&leaf, &root_cert(&state, &a)));
    ok(&root_cli(&["taint", &a], &state));
    ok(&root_cli(&["revoke", &a, "--force"], &state));
    let (leaf, bundle) = issue(&state, &out);
    assert_eq!(bundle, [root_cert(&state, &b)]);
    assert!(verifies(&leaf, &bundle[0]));
}

/// A new intermediate under the same root: a signer change with no bundle change.
#[test]
fn cli_stages_and_activates_a_new_plugin_signer_under_the_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (parent, state, out) = (p("parent"), p("state"), p("out"));
    ok(&meshid(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--state-dir",
        parent.to_str().unwrap(),
    ]));
    for c in ["east-1", "east-2"] {
        ok(&meshid(&[
            "ca",
            "intermediate",
            "--state-dir",
            parent.to_str().unwrap(),
            "--cluster",
            c,
            "--out-dir",
            p(c).to_str().unwrap(),
        ]));
    }
    ok(&meshid(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--state-dir",
        state.to_str().unwrap(),
        "--from-plugin",
        p("east-1").to_str().unwrap(),
    ]));
    let before = status_json(&state);
    let o = ok(&root_cli(
        &["prepare", "--from-plugin", p("east-2").to_str().unwrap()],
        &state,
    ));
    assert!(o.starts_with("prepare-signer: signer "), "{o}");
    let j = status_json(&state);
    assert_eq!(j["roots"].as_array().unwrap().len(), 1, "no bundle change");
    let new_signer = j["roots"][0]["prepared_signer"]
        .as_str()
        .unwrap()
        .to_owned();
    let new_cert = cert::certs_from_pem(
        &std::fs::read(p("east-2").join("ca-cert.pem")).unwrap(),
        "c",
    )
    .unwrap();
    assert_eq!(new_signer, cert::fingerprint_id(&new_cert[0]));
    assert_eq!(
        j["next_step"],
        format!(
            "meshid root activate {new_signer} --state-dir {}",
            state.display()
        )
    );
    fails_with(
        &root_cli(
            &["prepare", "--from-plugin", p("east-2").to_str().unwrap()],
            &state,
        ),
        "already staged",
    );

    ok(&root_cli(&["activate", &new_signer], &state));
    let j = status_json(&state);
    assert_eq!(j["roots"][0]["signer"], new_signer.as_str());
    assert_ne!(j["roots"][0]["signer"], before["roots"][0]["signer"]);
    let (leaf, bundle) = issue(&state, &out);
    assert_eq!(
        leaf[1], new_cert[0],
        "leaves come from the new intermediate"
    );
    assert_eq!(bundle.len(), 1);
}

/// Issue 9 item 6: a prepared root never signed, so it can be withdrawn at once (old code
/// refused: "only a tainted root can be revoked", leaving no way to throw it away); it leaves
/// every bundle, its keys are wiped, the journal says prepared → revoked, and a new root can be
/// prepared after it. A staged plug-in signer is dropped the same way.
#[test]
fn a_prepared_root_can_be_withdrawn() {
    let now = t0();
    let w = walk(now);
    let prepared = &w.states[1];
    let t = rotation::revoke(prepared, &w.b, false, MAX_TTL, &ctx(now)).unwrap();
    assert!(
        t.outcome.notes[0].contains("never signed"),
        "{:?}",
        t.outcome.notes
    );
    let b = t.state.roots.iter().find(|r| r.id == w.b).unwrap();
    assert_eq!(b.state, RootState::Revoked);
    assert!(b.private_key.is_none() && !b.can_sign());
    assert_eq!(t.state.trusted_roots().unwrap().len(), 1);
    let last = t.state.journal.last().unwrap();
    assert_eq!(
        (last.action, last.from_state, last.to_state),
        (
            JournalAction::Revoke,
            Some(RootState::Prepared),
            RootState::Revoked
        )
    );
    t.state.validate().unwrap();
    rotation::prepare(&t.state, Candidate::Generated(generated(now)), &ctx(now))
        .expect("a new root can be prepared after the withdrawn one");
}

/// Issue 25: every hint the root commands print runs as printed. Each backticked command (and
/// `root status`'s next step) carries the `--state-dir` the command was given, shell-quoted
/// when the path needs it; pasted into a shell, each moves the rotation on.
#[test]
fn every_root_hint_runs_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    // A space and a quote in the path: the hint must quote it.
    let state = dir.path().join("my ca's state");
    ok(&init_ca(&state));
    let sh = |cmd: &str| {
        let cmd = cmd.trim().strip_prefix("meshid ").expect(cmd);
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("\"$MESHID\" {cmd}"))
            .env("MESHID", env!("CARGO_BIN_EXE_meshid"))
            .output()
            .unwrap()
    };
    let backticked = |text: &str, verb: &str| -> String {
        text.split('`')
            .skip(1)
            .step_by(2)
            .find(|c| c.starts_with(&format!("meshid root {verb}")))
            .unwrap_or_else(|| panic!("no `meshid root {verb}` hint in {text:?}"))
            .to_owned()
    };
    let a = id_with(&status_json(&state), "active");
    // prepare's note names the activate command.
    let out = ok(&root_cli(&["prepare"], &state));
    let activate = backticked(&out, "activate");
    assert!(activate.contains("--state-dir '"), "{activate}");
    // A refused step's `next:` names it too.
    let refused = root_cli(&["prepare"], &state);
    let err = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(backticked(&err, "activate"), activate, "{err}");
    // root status's next step is the same command, runnable as printed.
    let next = status_json(&state)["next_step"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(next, activate);
    let out = ok(&sh(&activate));
    let taint = backticked(&out, "taint");
    assert!(taint.contains(&a[..8]), "{taint}");
    ok(&sh(&taint));
    // Revoking too early is refused; the refusal names the --force command, runnable.
    let refused = root_cli(&["revoke", &a], &state);
    let err = String::from_utf8_lossy(&refused.stderr).into_owned();
    let force = err
        .split('`')
        .skip(1)
        .step_by(2)
        .find(|c| c.contains("--force"))
        .unwrap_or_else(|| panic!("{err}"))
        .to_owned();
    ok(&sh(&force));
    assert_eq!(
        id_with(&status_json(&state), "revoked"),
        a,
        "the pasted hints took the root through the whole rotation"
    );
}

/// Issue 25: `root rotate` asks the server before it changes anything. With nothing listening
/// at `--server` it fails naming the server, and no root was prepared.
#[test]
fn root_rotate_checks_the_server_before_preparing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    ok(&init_ca(&state));
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    let before = status_json(&state);
    let out = root_cli(&["rotate", "--server", &url, "--timeout", "5s"], &state);
    fails_with(&out, "nothing was changed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&url[7..]), "names the server: {err}");
    let after = status_json(&state);
    assert_eq!(after["generation"], before["generation"], "nothing written");
    assert_eq!(after["roots"].as_array().unwrap().len(), 1);
}
