//! The lifecycle state of a root: prepared → active → old → tainted → revoked.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Lifecycle state of a root: prepared → active → old → tainted → revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootState {
    /// Trusted (in every bundle), not signing yet.
    Prepared,
    /// Trusted and signing; exactly one root is active.
    Active,
    /// Trusted, no longer signing: leaves it signed stay valid until they expire.
    Old,
    /// Trusted, but every leaf it signed is re-issued from the active root now.
    Tainted,
    /// In no bundle; its keys are wiped, the record stays for the journal.
    Revoked,
}

impl fmt::Display for RootState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Old => "old",
            Self::Tainted => "tainted",
            Self::Revoked => "revoked",
        })
    }
}
