//! Lifecycles: one credential's cycle (`Renewer`, used by the serving certificate and every
//! SDS `default`), when a leaf is refreshed, the root state machine with its journal, the
//! activation gate, and the guided and automatic rotations that drive it.

mod auto;
mod gate;
mod guided;
mod propagation;
pub mod publication;
mod renewer;
pub mod replicas;
mod roots;
mod schedule;
mod status;

pub use auto::{auto_step, AutoRotation, AutoStep, Schedule};
pub use gate::{check_servers, on_every_replica, ActivationGate, GateRefusal, LocalStatus};
pub use guided::{rotate, Finished, GuidedError, GuidedOptions, DEFAULT_POLL};
pub use propagation::{
    current_counts, replica_name, status_of, Counts, Lag, Laggard, NamespaceStreams, Propagation,
    RotationStatus, StreamTrack, Waiting, IDENTITIES_SHOWN, LAGGARDS_SHOWN, STATUS_PATH,
};
pub use publication::{bundle_publication_gate, Unpublished};
pub(crate) use renewer::unit_random;
pub use renewer::{Held, Issued, RenewPolicy, Renewer, SignerView, Turn};
pub use replicas::ReplicaLeases;
pub use roots::{
    activate, activation_point, apply, expiry_warning, next_step, no_gate, prepare, resolve,
    revoke, taint, valid_certs_until, Applied, Candidate, Ctx, Gate, NextStep, Outcome, RootError,
    Target, Transition, EXPIRY_WARNING, REVOKE_MARGIN,
};
pub use schedule::{RefreshPolicy, RefreshPolicyError, DEFAULT_JITTER, DEFAULT_RATIO};
pub use status::{Budget, HttpStatus, StatusError, StatusSource, STATUS_READ_TIMEOUT};
