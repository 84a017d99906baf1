use std::path::PathBuf;

use thiserror::Error;

use super::generation::Generation;

/// Why the state could not be read or written. Nothing is changed when one of these is returned.
#[derive(Debug, Error)]
pub enum StateError {
    // The I/O error is printed here and not returned as `source()`, so `{:#}` says it once.
    #[error("{op} {path}: {error}")]
    Io {
        op: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("state file {path} is corrupted ({why}); it was left untouched: restore it from a backup or move it away and run `meshid ca init` again")]
    Corrupted { path: PathBuf, why: String },
    #[error("state file {path} has format {found:?}, which this meshid does not read (expected {expected:?})")]
    UnsupportedFormat {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    #[error("state changed underneath this writer: expected generation {}, found {}; another meshid process wrote it first. Nothing was written: reload and retry", fmt_gen(.expected), fmt_gen(.found))]
    Conflict {
        expected: Option<Generation>,
        found: Option<Generation>,
    },
    #[error("a CA state already exists in {path}; refusing to overwrite it")]
    AlreadyInitialized { path: PathBuf },
    #[error("no CA state in {path}; create one with `meshid ca init --state {}`", path.display())]
    NotInitialized { path: PathBuf },
    #[error(
        "timed out after {secs}s waiting for the lock on {path}; is another meshid process stuck?"
    )]
    LockTimeout { path: PathBuf, secs: u64 },
    #[error("{path} holds private keys but is accessible to group or others (mode {mode:04o}); refusing to use it: run `chmod 600 {}` and check who could have read it", path.display())]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("{op} {location}: {why}")]
    Remote {
        op: &'static str,
        location: String,
        why: String,
    },
    #[error("the CA state would be {size} bytes in {location}, above the {max} a Kubernetes Secret can hold; nothing was written (trim federated bundles or old roots)")]
    TooLarge {
        location: String,
        size: usize,
        max: usize,
    },
    #[error("CA state is invalid: {0}")]
    Invalid(String),
}

fn fmt_gen(g: &Option<Generation>) -> String {
    match g {
        Some(g) => g.to_string(),
        None => "none (no state yet)".into(),
    }
}
