//! Where the CA state lives: the store contract every backend implements.

use super::{document::CaState, error::StateError, generation::Generation};

/// A state as read, with the generation a later write must name.
#[derive(Debug)]
pub struct Versioned {
    pub generation: Generation,
    pub state: CaState,
}

/// Where the CA state lives. Implementations serialize writers and never overwrite a state
/// they did not read: `compare_and_swap` fails with `Conflict` when the generation moved.
/// The directory store is the embedded default; a Kubernetes Secret store implements the
/// same contract with the Secret's resourceVersion.
pub trait StateStore: Send + Sync {
    /// Reads the current state; `None` if nothing was ever written.
    fn load(&self) -> Result<Option<Versioned>, StateError>;

    /// Writes `state` if the stored generation is still `expected` (`None`: nothing stored yet).
    /// Returns the new generation.
    fn compare_and_swap(
        &self,
        expected: Option<Generation>,
        state: &CaState,
    ) -> Result<Generation, StateError>;

    /// Where the state lives, for messages.
    fn location(&self) -> String;

    /// The file whose replacement means the state changed, for stores that can be watched
    /// (`None`: readers poll).
    fn watched_file(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// Reads the state, failing with `NotInitialized` if there is none.
    fn load_existing(&self) -> Result<Versioned, StateError> {
        self.load()?.ok_or_else(|| StateError::NotInitialized {
            path: self.location().into(),
        })
    }
}
