//! Persistence of the CA state: the document, atomic file writes, and stores with
//! compare-and-swap on a generation number.

mod atomic;
mod dir;
mod document;
mod error;
mod store;

pub use atomic::write_file_atomic;
pub use dir::DirStore;
pub use document::{
    CaState, IssuedIntermediate, RootOrigin, RootRecord, RootState, SecretPem, SignerRecord,
};
pub use error::StateError;
pub use store::{Generation, StateStore, Versioned};
