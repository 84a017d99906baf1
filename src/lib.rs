//! meshid: a certificate authority and identity issuer for service meshes.
//!
//! It validates Kubernetes service-account tokens and issues short-lived SPIFFE X.509-SVIDs.
//! Module map: `spiffe` (IDs), `ca` (the authority), `state` (persistence), `cli` (commands).
#![forbid(unsafe_code)]

pub mod ca;
pub mod cli;
pub mod clock;
pub mod duration;
pub mod identity;
pub mod spiffe;
pub mod state;
