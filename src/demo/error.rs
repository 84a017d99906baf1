//! Why the demo could not run, or what a step expected and what it saw.

use thiserror::Error;

/// A demo failure. Setup failures end the demo; step failures are reported per step.
#[derive(Debug, Error)]
pub enum DemoError {
    #[error("{what}: {why}")]
    Setup { what: String, why: String },
    #[error("expected {expected}, saw {seen}")]
    Unexpected { expected: String, seen: String },
    #[error("{what}: {why}")]
    Connection { what: String, why: String },
    #[error("timed out after {secs}s waiting for {what}")]
    Timeout { what: String, secs: u64 },
}

impl DemoError {
    pub(crate) fn setup(what: impl Into<String>, why: impl std::fmt::Display) -> Self {
        Self::Setup {
            what: what.into(),
            why: why.to_string(),
        }
    }

    pub(crate) fn conn(what: impl Into<String>, why: impl std::fmt::Display) -> Self {
        Self::Connection {
            what: what.into(),
            why: why.to_string(),
        }
    }

    pub(crate) fn unexpected(expected: impl Into<String>, seen: impl Into<String>) -> Self {
        Self::Unexpected {
            expected: expected.into(),
            seen: seen.into(),
        }
    }
}
