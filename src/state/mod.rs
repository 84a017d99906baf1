//! Persistence of the CA state: the document, atomic file writes, and stores with
//! compare-and-swap on a generation number (a directory, or a Kubernetes Secret); the
//! rotation journal inside the document.

mod atomic;
mod dir;
mod document;
mod envelope;
mod error;
mod generation;
mod journal;
pub mod kube;
mod location;
mod root_state;
mod store;

pub use atomic::write_file_atomic;
pub use dir::DirStore;
pub(crate) use document::{anchor_of, signing_parts};
pub use document::{
    CaState, Dissociation, FederatedBundle, IssuedIntermediate, RootOrigin, RootRecord, SecretPem,
    SignerRecord, StateTimes,
};
pub use error::StateError;
pub use generation::Generation;
pub use journal::{Actor, JournalAction, JournalEntry, JOURNAL_MAX};
pub use kube::KubeStore;
pub use location::{LocationError, StateLocation};
pub use root_state::RootState;
pub use store::{ChangeWatch, StateStore, Versioned};

/// Fuzzing (`crate::fuzzing::state_doc`): a stored state document, decoded as a store reads it.
#[doc(hidden)]
pub fn fuzz_decode(bytes: &[u8], location: &std::path::Path) -> Result<Versioned, StateError> {
    envelope::decode(bytes, location)
}

/// Fuzzing: `raw` as the state inside an envelope with a valid checksum, so the state's own
/// checks (not the checksum) meet it.
#[doc(hidden)]
pub fn fuzz_decode_inner(raw: &[u8]) -> Result<Versioned, StateError> {
    let doc = envelope::wrap_raw(raw, 1).ok_or_else(|| StateError::Invalid("not JSON".into()))?;
    envelope::decode(&doc, std::path::Path::new("fuzz/state.json"))
}
