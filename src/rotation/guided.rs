//! The guided rotation behind `meshid root rotate`: prepare → wait until every connected stream
//! has ACKed a bundle with the new root → activate → wait until every stream runs on a leaf from
//! the new signer → taint the old root → revoke it when safe (or stop, naming the command and the
//! time it becomes safe).
//!
//! Each step is one compare-and-swap write with its journal entry (`apply`), and the driver
//! derives where it stands from the state alone, so a run interrupted at any point (killed, a
//! failed write, a timeout) continues from the state when run again. The waits read the server's
//! rotation status (`GET /debug/rotation`, `RotationStatus`) through `StatusSource`.

use std::time::{Duration, Instant};

use thiserror::Error;
use time::OffsetDateTime;

use super::{
    activate, apply, prepare, revoke, taint, valid_certs_until, Applied, Candidate, Ctx, RootError,
    RotationStatus, STATUS_PATH,
};
use crate::{
    ca::{root, KeyType},
    clock::rfc3339,
    state::{CaState, JournalAction, RootState, StateStore},
};

/// Reads the rotation status of one or more server replicas.
pub trait StatusSource {
    /// Each replica's status now, or why one could not be read, all within `within`.
    fn statuses(&self, within: Duration) -> Result<Vec<RotationStatus>, String>;
}

/// How long a single gate check may read statuses.
pub const STATUS_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// `Ok` when `check` passes on every replica; otherwise every replica's reason.
pub fn on_every_replica(
    statuses: &[RotationStatus],
    check: impl Fn(&RotationStatus) -> Result<(), String>,
) -> Result<(), String> {
    let why: Vec<String> = statuses.iter().filter_map(|s| check(s).err()).collect();
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

/// Checks `check` against every replica of `server` now.
pub fn check_servers(
    server: &dyn StatusSource,
    check: impl Fn(&RotationStatus) -> Result<(), String>,
) -> Result<(), String> {
    on_every_replica(&server.statuses(STATUS_READ_TIMEOUT)?, check)
}

/// Why a guided rotation stopped before its end. The state says where it stands; run again to
/// continue.
#[derive(Debug, Error)]
pub enum GuidedError {
    #[error(transparent)]
    Root(#[from] RootError),
    #[error("timed out after {} waiting: {why}; the rotation stays where it is (run `meshid root rotate` again to continue)", crate::duration::fmt_duration(*.waited))]
    TimedOut { waited: Duration, why: String },
    #[error("generating the new root: {0}")]
    Generate(#[source] crate::ca::CaError),
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
    let mut first = true;
    loop {
        let state = store.load_existing().map_err(RootError::from)?.state;
        let step = phase(&state)?;
        let applied = match step {
            Phase::Idle if first => {
                let active = state.signing_root().map_err(RootError::from)?;
                if active.origin == crate::state::RootOrigin::Plugin {
                    return Err(RootError::Refused {
                        refused: format!("the active root {} is a plug-in CA; `root rotate` does not replace it with a generated root", active.id),
                        next: "prepare the successor from its cacerts directory with `meshid root prepare --from-plugin DIR`, then re-run `meshid root rotate`".into(),
                    }
                    .into());
                }
                let c = ctx()?;
                let key_type = opts.key_type.unwrap_or(state.key_type);
                let ca = root::generate_root(&state.trust_domain, key_type, opts.root_ttl, c.now)
                    .map_err(GuidedError::Generate)?;
                apply(store, &c, |s, c| prepare(s, Candidate::Generated(ca), c))?
            }
            Phase::Idle => {
                return Err(RootError::Refused {
                    refused:
                        "no rotation is in progress any more (another writer finished or undid it)"
                            .into(),
                    next: "`meshid root status` shows the roots".into(),
                }
                .into())
            }
            Phase::Prepared(p) => {
                progress(&format!(
                    "waiting until every connected stream has acknowledged a bundle with root {p}"
                ));
                wait(server, opts, |st| st.root_propagated(&p), progress)?;
                let c = ctx()?;
                let gate = super::ActivationGate::new(opts.publication_hint, Some(server), c.now);
                apply(store, &c, |s, c| {
                    activate(s, &p, false, &|r| gate.check(r), c)
                })?
            }
            Phase::StagedSigner(sid) => {
                let applied = apply(store, &ctx()?, |s, c| {
                    activate(s, &sid, false, &super::no_gate, c)
                })?;
                report(&applied, progress);
                after_write(applied.outcome.action)?;
                progress(&format!(
                    "waiting until every connected stream runs on a leaf from signer {sid}"
                ));
                wait(server, opts, |st| st.signer_propagated(&sid), progress)?;
                return Ok(Finished::SignerActivated { signer: sid });
            }
            Phase::Old { old, signer } => {
                progress(&format!(
                    "waiting until every connected stream runs on a leaf from signer {signer}"
                ));
                wait(server, opts, |st| st.signer_propagated(&signer), progress)?;
                apply(store, &ctx()?, |s, c| taint(s, &old, c))?
            }
            Phase::Tainted(t) => {
                let c = ctx()?;
                let record = state
                    .roots
                    .iter()
                    .find(|r| r.id == t)
                    .expect("phase names a root");
                let (until, _) = valid_certs_until(&state, record, opts.max_ttl, c.now);
                if c.now < until {
                    let command = format!("meshid root revoke {t}");
                    progress(&format!(
                        "root {t} may still anchor valid leaves until {}; run `{command}` then (or re-run `meshid root rotate`)",
                        rfc3339(until)
                    ));
                    return Ok(Finished::RevokeLater {
                        root: t,
                        at: until,
                        command,
                    });
                }
                let applied = apply(store, &c, |s, c| revoke(s, &t, false, opts.max_ttl, c))?;
                report(&applied, progress);
                after_write(applied.outcome.action)?;
                return Ok(Finished::Revoked { root: t });
            }
        };
        first = false;
        report(&applied, progress);
        after_write(applied.outcome.action)?;
    }
}

fn report(applied: &Applied, progress: &mut dyn FnMut(&str)) {
    let o = &applied.outcome;
    progress(&format!(
        "{}: root {} is now {} (generation {})",
        o.action, o.root, o.to, applied.generation
    ));
}

/// Polls `server` until `done` passes, at most `opts.timeout`; prints the counts when they move.
fn wait(
    server: &dyn StatusSource,
    opts: &GuidedOptions,
    done: impl Fn(&RotationStatus) -> Result<(), String>,
    progress: &mut dyn FnMut(&str),
) -> Result<(), GuidedError> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let left = opts.timeout.saturating_sub(start.elapsed());
        if left.is_zero() && !last.is_empty() {
            return Err(GuidedError::TimedOut {
                waited: opts.timeout,
                why: last,
            });
        }
        let why = match server.statuses(left.clamp(Duration::from_millis(100), STATUS_READ_TIMEOUT))
        {
            Ok(st) => match on_every_replica(&st, &done) {
                Ok(()) => return Ok(()),
                Err(why) => why,
            },
            Err(e) => format!("cannot read the server's status: {e}"),
        };
        if why != last {
            progress(&format!("  {why}"));
            last = why.clone();
        }
        if start.elapsed() >= opts.timeout {
            return Err(GuidedError::TimedOut {
                waited: opts.timeout,
                why,
            });
        }
        std::thread::sleep(opts.poll.min(opts.timeout.saturating_sub(start.elapsed())));
    }
}

// === the server's status over HTTP ===

/// The status endpoint of a server's HTTP port, e.g. `http://meshid:15014`. What it trusts: the
/// answer is plain, unauthenticated HTTP from whoever answers at that address (the server
/// serves it to loopback callers only, so reach it through `kubectl port-forward`); a forged
/// answer can make the gate pass early, never make the CLI write anything but the transition
/// it was asked for. The whole read is bounded by `timeout`, the body by 16 MiB, and every
/// string in it is stripped of control characters before it is printed.
pub struct HttpStatus {
    url: String,
    timeout: Duration,
}

/// Largest status document read.
const MAX_STATUS_BYTES: usize = 16 << 20;

impl HttpStatus {
    /// Parses `http://host:port` (a trailing `/debug/rotation` or `/` is accepted).
    pub fn new(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("--server {url:?}: give the server's plain HTTP port as http://HOST:PORT (the port of /metrics)")
        })?;
        let hostport = rest
            .trim_end_matches('/')
            .trim_end_matches(STATUS_PATH)
            .trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') || !hostport.contains(':') {
            return Err(format!(
                "--server {url:?}: expected http://HOST:PORT, e.g. http://127.0.0.1:15014"
            ));
        }
        Ok(Self {
            url: format!("http://{hostport}{STATUS_PATH}"),
            timeout: Duration::from_secs(5),
        })
    }

    /// Bounds each whole read (connect, headers, body) by `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// This server's status now, read within `within` (at most the configured timeout).
    pub fn status_within(&self, within: Duration) -> Result<RotationStatus, String> {
        let body = crate::http_client::Get::new(&self.url)
            .timeout(self.timeout.min(within))
            .max_body(MAX_STATUS_BYTES)
            .send_blocking()
            .map_err(|e| match e {
                crate::http_client::HttpError::Status { status: 403, .. } => format!("{e}: the server serves {STATUS_PATH} to loopback callers only; reach it through `kubectl port-forward` (or see listen.debug_from)"),
                crate::http_client::HttpError::Status { .. } => format!("{e}: is it a meshid server's HTTP port?"),
                e => e.to_string(),
            })?;
        serde_json::from_slice::<RotationStatus>(&body)
            .map(RotationStatus::printable)
            .map_err(|e| format!("{} sent an unreadable rotation status: {e}", self.url))
    }
}

impl HttpStatus {
    /// This server's status now.
    pub fn status(&self) -> Result<RotationStatus, String> {
        self.status_within(self.timeout)
    }
}

impl StatusSource for HttpStatus {
    fn statuses(&self, within: Duration) -> Result<Vec<RotationStatus>, String> {
        Ok(vec![self.status_within(within)?])
    }
}

/// Several replicas (`--server` given more than once): every one must pass, all read within
/// `within` together.
impl StatusSource for Vec<HttpStatus> {
    fn statuses(&self, within: Duration) -> Result<Vec<RotationStatus>, String> {
        let start = Instant::now();
        self.iter()
            .map(|s| s.status_within(within.saturating_sub(start.elapsed())))
            .collect()
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
        fn statuses(&self, _: Duration) -> Result<Vec<RotationStatus>, String> {
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
