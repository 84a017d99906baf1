//! Trust bundles: the set of roots peers should trust, per trust domain, and the live CA
//! snapshot that every reader holds through a `watch` receiver, and the
//! `istio-ca-root-cert` ConfigMap publisher.

mod bundle;
pub mod bundle_endpoint;
pub mod configmap;
pub mod federated_store;
pub mod federation;
mod federation_config;
mod federation_error;
pub mod federation_run;
mod live;
mod spiffe_bundle;

pub use bundle::TrustBundleSet;
pub use federation_config::{
    poll_interval, worst_case_fetch, BundleEndpointConfig, EndpointProfile, FederationConfig,
    PeerConfig, MAX_REFRESH_HINT, MIN_REFRESH_HINT, RETRY_AFTER_FAILURE,
};
pub use live::{CaSnapshot, LiveCa, LiveCaError, RootSummary};
pub use spiffe_bundle::{serial_before, BundleError, SpiffeBundle, DEFAULT_REFRESH_HINT};
