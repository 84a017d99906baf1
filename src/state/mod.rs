//! Persistence of the CA state: the document, atomic file writes, and stores with
//! compare-and-swap on a generation number; the rotation journal inside the document.

mod atomic;
mod dir;
mod document;
mod error;
mod generation;
mod journal;
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
pub use root_state::RootState;
pub use store::{StateStore, Versioned};
