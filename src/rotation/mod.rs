//! Lifecycles: one credential's cycle (`Renewer`, used by the serving certificate and every
//! SDS `default`), when a leaf is refreshed, and the root state machine with its journal.

mod auto;
mod gate;
mod guided;
mod propagation;
pub mod publication;
mod renewer;
mod roots;
mod schedule;

pub use auto::{auto_step, AutoRotation, AutoStep, Schedule};
pub use gate::{ActivationGate, LocalStatus};
pub use guided::{
    check_servers, on_every_replica, rotate, Finished, GuidedError, GuidedOptions, HttpStatus,
    StatusSource, STATUS_READ_TIMEOUT,
};
pub use propagation::{
    replica_name, status_of, Counts, Laggard, Propagation, RotationStatus, StreamTrack,
    LAGGARDS_SHOWN, STATUS_PATH,
};
pub use publication::bundle_publication_gate;
pub(crate) use renewer::unit_random;
pub use renewer::{Held, Issued, RenewPolicy, Renewer, SignerView, Turn};
pub use roots::{
    activate, activation_point, apply, expiry_warning, next_step, no_gate, prepare, resolve,
    revoke, taint, valid_certs_until, Applied, Candidate, Ctx, Gate, Outcome, RootError, Target,
    Transition, EXPIRY_WARNING, REVOKE_MARGIN,
};
pub use schedule::{RefreshPolicy, DEFAULT_JITTER, DEFAULT_RATIO};
