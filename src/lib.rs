//! meshid: a certificate authority and identity issuer for service meshes.
//!
//! It validates Kubernetes service-account tokens and issues short-lived SPIFFE X.509-SVIDs.
//! Module map: `spiffe` (IDs), `ca` (the authority), `state` (persistence), `cli` (commands).
#![forbid(unsafe_code)]

pub mod api;
pub mod backoff;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod discovery;
pub mod duration;
pub mod fswatch;
pub mod http_client;
pub mod identity;
pub mod net;
pub mod rotation;
pub mod server;
pub mod shutdown;
pub mod spiffe;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod trust;
