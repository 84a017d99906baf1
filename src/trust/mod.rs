//! Trust bundles: the set of roots peers should trust, per trust domain, and the live CA
//! snapshot that every reader holds through a `watch` receiver.

mod bundle;
mod live;

pub use bundle::TrustBundleSet;
pub use live::{CaSnapshot, LiveCa, LiveCaError};
