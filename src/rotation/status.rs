//! Reading servers' rotation status (`GET /debug/rotation`, `RotationStatus`): the
//! `StatusSource` the activation gate and the guided rotation wait on, its HTTP reader for the
//! CLI, and `Budget`, the one clock the CLI's synchronous reads and waits take their time from.

use std::time::{Duration, Instant};

use thiserror::Error;

use super::propagation::{RotationStatus, STATUS_PATH};
use crate::http_client::{Get, HttpError};

/// How long a single gate check may read statuses (and an HTTP status read's default bound).
pub const STATUS_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest status document read.
const MAX_STATUS_BYTES: usize = 16 << 20;

/// Reads the rotation status of one or more server replicas.
pub trait StatusSource {
    /// Each replica's status now, or why one could not be read, all within `within`.
    fn statuses(&self, within: Duration) -> Result<Vec<RotationStatus>, StatusError>;
}

/// Why a server's rotation status could not be read (or where to read it is not usable).
#[derive(Debug, Error)]
pub enum StatusError {
    #[error("--server {url:?}: give the server's plain HTTP port as http://HOST:PORT (the port of /metrics)")]
    NotPlainHttp { url: String },
    #[error("--server {url:?}: expected http://HOST:PORT, e.g. http://127.0.0.1:15014")]
    NotHostPort { url: String },
    #[error("{0}: the server serves {STATUS_PATH} to loopback callers only; reach it through `kubectl port-forward` (or see listen.debug_from)")]
    LoopbackOnly(HttpError),
    #[error("{0}: is it a meshid server's HTTP port?")]
    NotMeshid(HttpError),
    #[error(transparent)]
    Read(HttpError),
    #[error("{url} sent an unreadable rotation status: {why}")]
    Unreadable { url: String, why: serde_json::Error },
    #[error("{what}: {why}")]
    Replicas { what: String, why: String },
    #[error("replica {replica} stopped reporting its rotation status (last at {last_seen}): its streams are unknown; wait until it reports or is gone, or use --force")]
    ReplicaUnknown { replica: String, last_seen: String },
}

/// A time budget on the std clock: the synchronous CLI's reads and waits (`meshid root rotate`
/// and `--server` gates) take their timing from here and sleep through it.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    started: Instant,
    total: Duration,
}

impl Budget {
    /// A budget of `total` from now.
    pub fn new(total: Duration) -> Self {
        Self {
            started: Instant::now(),
            total,
        }
    }

    /// The whole budget.
    pub fn total(&self) -> Duration {
        self.total
    }

    /// What is left of it (zero once spent).
    pub fn left(&self) -> Duration {
        self.total.saturating_sub(self.started.elapsed())
    }

    /// Whether nothing is left.
    pub fn is_spent(&self) -> bool {
        self.left().is_zero()
    }

    /// Sleeps `d`, never past the end of the budget.
    pub fn sleep(&self, d: Duration) {
        std::thread::sleep(d.min(self.left()));
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

impl HttpStatus {
    /// Parses `http://host:port` (a trailing `/debug/rotation` or `/` is accepted).
    pub fn new(url: &str) -> Result<Self, StatusError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| StatusError::NotPlainHttp { url: url.into() })?;
        let hostport = rest
            .trim_end_matches('/')
            .trim_end_matches(STATUS_PATH)
            .trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') || !hostport.contains(':') {
            return Err(StatusError::NotHostPort { url: url.into() });
        }
        Ok(Self {
            url: format!("http://{hostport}{STATUS_PATH}"),
            timeout: STATUS_READ_TIMEOUT,
        })
    }

    /// Bounds each whole read (connect, headers, body) by `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// This server's status now, read within `within` (at most the configured timeout).
    pub fn status_within(&self, within: Duration) -> Result<RotationStatus, StatusError> {
        let body = Get::new(&self.url)
            .timeout(self.timeout.min(within))
            .max_body(MAX_STATUS_BYTES)
            .send_blocking()
            .map_err(|e| match e {
                HttpError::Status { status: 403, .. } => StatusError::LoopbackOnly(e),
                HttpError::Status { .. } => StatusError::NotMeshid(e),
                e => StatusError::Read(e),
            })?;
        serde_json::from_slice::<RotationStatus>(&body)
            .map(RotationStatus::printable)
            .map_err(|why| StatusError::Unreadable {
                url: self.url.clone(),
                why,
            })
    }

    /// This server's status now.
    pub fn status(&self) -> Result<RotationStatus, StatusError> {
        self.status_within(self.timeout)
    }
}

impl StatusSource for HttpStatus {
    fn statuses(&self, within: Duration) -> Result<Vec<RotationStatus>, StatusError> {
        Ok(vec![self.status_within(within)?])
    }
}

/// Several replicas (`--server` given more than once): every one must pass, all read within
/// `within` together.
impl StatusSource for Vec<HttpStatus> {
    fn statuses(&self, within: Duration) -> Result<Vec<RotationStatus>, StatusError> {
        let budget = Budget::new(within);
        self.iter()
            .map(|s| s.status_within(budget.left()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--server` takes the plain HTTP port only, and says which form it wants.
    #[test]
    fn a_server_url_is_the_plain_http_port() {
        for (url, ok) in [
            ("http://127.0.0.1:15014", true),
            ("http://127.0.0.1:15014/", true),
            ("http://127.0.0.1:15014/debug/rotation", true),
            ("https://127.0.0.1:15014", false),
            ("http://127.0.0.1", false),
            ("http://127.0.0.1:15014/metrics", false),
        ] {
            match HttpStatus::new(url) {
                Ok(s) => assert!(ok, "{url} accepted as {}", s.url),
                Err(e) => assert!(!ok, "{url}: {e}"),
            }
        }
        assert!(matches!(
            HttpStatus::new("https://h:1"),
            Err(StatusError::NotPlainHttp { .. })
        ));
    }
}
