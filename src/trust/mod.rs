//! Trust bundles: the set of roots peers should trust, per trust domain, and the live CA
//! snapshot that every reader holds through a `watch` receiver, and the
//! `istio-ca-root-cert` ConfigMap publisher.

mod bundle;
pub mod configmap;
mod live;

pub use bundle::TrustBundleSet;
pub use live::{CaSnapshot, LiveCa, LiveCaError};
