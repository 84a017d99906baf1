//! The rotation journal: who moved which root (or signer) to which state, when, why, and from
//! which generation. It lives inside the state document, so a transition and its entry are
//! written together by one compare-and-swap.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{generation::Generation, root_state::RootState};

/// How many entries the state keeps; older ones are dropped (the sequence keeps counting).
pub const JOURNAL_MAX: usize = 200;

/// Who made a change: `user@host` for the CLI, `meshid-server`, or `auto` (the schedule).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Actor(String);

impl Actor {
    /// An operator at the CLI.
    pub fn user(user: &str, host: &str) -> Self {
        Self(format!("{user}@{host}"))
    }

    /// The running server (e.g. a guided rotation it drives).
    pub fn server() -> Self {
        Self("meshid-server".into())
    }

    /// The automatic rotation schedule.
    pub fn auto() -> Self {
        Self("auto".into())
    }

    /// The actor as written in the journal.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a journal entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JournalAction {
    /// A root was prepared (trusted, not signing).
    Prepare,
    /// A new signer (plug-in intermediate) was staged under the active root.
    PrepareSigner,
    /// A prepared root became the signing one.
    Activate,
    /// The staged signer replaced the active root's signer.
    ActivateSigner,
    /// An old root was tainted: leaves it signed are re-issued now.
    Taint,
    /// A tainted root left every bundle; its keys were wiped.
    Revoke,
}

impl fmt::Display for JournalAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Prepare => "prepare",
            Self::PrepareSigner => "prepare-signer",
            Self::Activate => "activate",
            Self::ActivateSigner => "activate-signer",
            Self::Taint => "taint",
            Self::Revoke => "revoke",
        })
    }
}

/// One transition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Increases by one per entry, across trimming.
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub actor: Actor,
    pub action: JournalAction,
    /// Fingerprint id of the root.
    pub root: String,
    /// Fingerprint id of the signer, for signer changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// The root's state before (`None` when the root is new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_state: Option<RootState>,
    pub to_state: RootState,
    /// Why, as the operator gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The generation the transition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_generation: Option<Generation>,
    /// The transition overrode a safety check (`--force`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
}

/// Appends `entry` to `journal` with the next sequence number, dropping the oldest beyond
/// `JOURNAL_MAX`.
pub(super) fn append(journal: &mut Vec<JournalEntry>, mut entry: JournalEntry) {
    entry.seq = journal.last().map_or(1, |e| e.seq + 1);
    journal.push(entry);
    let excess = journal.len().saturating_sub(JOURNAL_MAX);
    journal.drain(..excess);
}

/// The last `n` entries, oldest first.
pub(super) fn tail(journal: &[JournalEntry], n: usize) -> &[JournalEntry] {
    &journal[journal.len().saturating_sub(n)..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_is_bounded_and_keeps_counting() {
        let now = OffsetDateTime::now_utc();
        let mut journal = Vec::new();
        for _ in 0..JOURNAL_MAX + 50 {
            append(
                &mut journal,
                JournalEntry {
                    seq: 0,
                    at: now,
                    actor: Actor::auto(),
                    action: JournalAction::Taint,
                    root: "r".into(),
                    signer: None,
                    from_state: Some(RootState::Old),
                    to_state: RootState::Tainted,
                    reason: None,
                    from_generation: None,
                    forced: false,
                },
            );
        }
        assert_eq!(journal.len(), JOURNAL_MAX);
        assert_eq!(journal[0].seq, 51);
        assert_eq!(
            tail(&journal, 2).iter().map(|e| e.seq).collect::<Vec<_>>(),
            [249, 250]
        );
    }
}
