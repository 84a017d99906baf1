//! Wire surfaces: Istio's CSR API and Envoy SDS. Domain errors become `tonic::Status` here
//! and only here (`status.rs`).

mod auth;
pub mod client;
pub mod config;
mod csr;
pub mod deadline;
mod eds;
pub mod gate;
mod lean;
pub mod lifetime;
pub mod node_auth;
mod proof_hook;
mod sds;
mod status;
pub mod xds;

pub use auth::{credentials, Authenticator, Credentials};
pub use csr::CsrService;
pub use eds::{load_assignment, EdsService, ENDPOINT_TYPE_URL};
pub use lean::SdsServer;
pub use node_auth::NodeAuthorizer;
pub use sds::{SdsService, SECRET_TYPE_URL};
pub use status::SIGN_ERROR_KINDS;

/// The SPIFFE Workload API, compiled from `proto/spiffe/workload/workload.proto` (no proto
/// package: its methods live at `/SpiffeWorkloadAPI/<Method>`).
pub mod workload {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// Istio's CA service types, compiled from `proto/istio/v1/auth/ca.proto`.
pub mod istio {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("istio.v1.auth");
}
