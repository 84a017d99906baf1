//! Lifecycles: one credential's cycle (`Renewer`, used by the serving certificate and every
//! SDS `default`) and when a leaf is refreshed. (The root state machine joins here.)

mod renewer;
mod schedule;

pub(crate) use renewer::unit_random;
pub use renewer::{Held, Issued, RenewPolicy, Renewer, SignerView};
pub use schedule::{RefreshPolicy, DEFAULT_JITTER, DEFAULT_RATIO};
