//! The wire's own settings: connection, request and stream limits (`[limits]`) and the xDS
//! streams' name caps (`[xds]`), with their defaults and checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::fmt_duration;

/// Default of `xds.max_resource_names_per_stream.sds`: a proxy needs a handful of secrets.
pub const DEFAULT_SDS_MAX_NAMES: usize = 128;
/// Default of `xds.max_resource_names_per_stream.eds`: one cluster per service port it calls.
pub const DEFAULT_EDS_MAX_NAMES: usize = 10_000;
/// The largest accepted value of either cap.
pub const MAX_NAMES_CEILING: usize = 1_000_000;

/// Limits of the xDS streams.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Xds {
    pub max_resource_names_per_stream: MaxNames,
}

/// Resource names one stream may subscribe to at once, per service; a stream asking for more
/// ends with `ResourceExhausted` naming the key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaxNames {
    pub sds: usize,
    pub eds: usize,
}

impl Default for MaxNames {
    fn default() -> Self {
        Self {
            sds: DEFAULT_SDS_MAX_NAMES,
            eds: DEFAULT_EDS_MAX_NAMES,
        }
    }
}

/// Connection, request and stream limits; each default is safe for a mesh of ~10,000 proxies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// SDS and EDS streams end gracefully after this (± 10 %), and at the caller's token expiry.
    #[serde(with = "crate::duration::serde")]
    pub max_stream_age: Duration,
    /// Open gRPC connections (TCP and Unix socket each); further ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Concurrent gRPC streams on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    /// istiod allows 100,000 (`features.MaxConcurrentStreams`, `ISTIO_GPRC_MAXSTREAMS`); a proxy
    /// needs a handful, and a client with more in flight (ztunnel asking for many pods at
    /// once) queues them on its side as HTTP/2 requires, so a low cap costs no failures.
    pub max_concurrent_streams_per_connection: u32,
    /// A TLS handshake not finished by then is dropped.
    #[serde(with = "crate::duration::serde")]
    pub tls_handshake_timeout: Duration,
    /// Unary calls (CreateCertificate, FetchSecrets, FetchEndpoints) not answered by then fail
    /// with DEADLINE_EXCEEDED.
    #[serde(with = "crate::duration::serde")]
    pub unary_timeout: Duration,
    /// Largest CreateCertificate request decoded (a CSR with metadata is a few KiB).
    pub csr_max_request_bytes: usize,
    /// Largest xDS request decoded (resource names of a large EDS subscription).
    pub xds_max_request_bytes: usize,
    /// HTTP (/metrics, /healthz, /readyz): request headers must arrive within this.
    #[serde(with = "crate::duration::serde")]
    pub http_header_read_timeout: Duration,
    /// HTTP: a connection with no request in flight is closed after this.
    #[serde(with = "crate::duration::serde")]
    pub http_idle_timeout: Duration,
    /// HTTP: open connections at once.
    pub http_max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_stream_age: Duration::from_secs(30 * 60),
            max_connections: 20_000,
            max_concurrent_streams_per_connection: 128,
            tls_handshake_timeout: Duration::from_secs(10),
            unary_timeout: Duration::from_secs(10),
            csr_max_request_bytes: 64 * 1024,
            xds_max_request_bytes: 1024 * 1024,
            http_header_read_timeout: Duration::from_secs(5),
            http_idle_timeout: Duration::from_secs(60),
            http_max_connections: 256,
        }
    }
}

impl Limits {
    pub fn validate(&self, errs: &mut Vec<String>) {
        let secs = Duration::from_secs;
        for (key, v, min, max) in [
            (
                "max_stream_age",
                self.max_stream_age,
                secs(10),
                secs(24 * 3600),
            ),
            (
                "tls_handshake_timeout",
                self.tls_handshake_timeout,
                Duration::from_millis(100),
                secs(300),
            ),
            (
                "unary_timeout",
                self.unary_timeout,
                Duration::from_millis(100),
                secs(300),
            ),
            (
                "http_header_read_timeout",
                self.http_header_read_timeout,
                Duration::from_millis(100),
                secs(300),
            ),
            (
                "http_idle_timeout",
                self.http_idle_timeout,
                secs(1),
                secs(3600),
            ),
        ] {
            if v < min || v > max {
                errs.push(format!(
                    "limits.{key}: {} is outside {}..={}",
                    fmt_duration(v),
                    fmt_duration(min),
                    fmt_duration(max)
                ));
            }
        }
        for (key, v, min, max) in [
            ("max_connections", self.max_connections, 1, 1_000_000),
            (
                "max_concurrent_streams_per_connection",
                self.max_concurrent_streams_per_connection as usize,
                1,
                65_536,
            ),
            (
                "csr_max_request_bytes",
                self.csr_max_request_bytes,
                1024,
                4 * 1024 * 1024,
            ),
            (
                "xds_max_request_bytes",
                self.xds_max_request_bytes,
                1024,
                16 * 1024 * 1024,
            ),
            (
                "http_max_connections",
                self.http_max_connections,
                1,
                100_000,
            ),
        ] {
            if v < min || v > max {
                errs.push(format!("limits.{key}: {v} is outside {min}..={max}"));
            }
        }
    }
}

impl Xds {
    pub fn validate(&self, errs: &mut Vec<String>) {
        let caps = &self.max_resource_names_per_stream;
        for (key, v) in [("sds", caps.sds), ("eds", caps.eds)] {
            if v == 0 || v > MAX_NAMES_CEILING {
                errs.push(format!(
                    "xds.max_resource_names_per_stream.{key}: {v} is not between 1 and {MAX_NAMES_CEILING}"
                ));
            }
        }
    }
}
