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

    /// Writes `from` into this empty store keeping its generation (`state migrate`: federation
    /// peers and replicas see the bundle sequence go on, not restart at 1). `Conflict` if this
    /// store holds a state already.
    fn create_migrated(&self, from: &Versioned) -> Result<Generation, StateError>;

    /// Wakes `wake` whenever the stored state may have changed (a watched file, a watched
    /// Secret) for as long as the returned guard lives. `None`: readers poll.
    fn on_change(
        &self,
        wake: tokio::sync::mpsc::Sender<()>,
    ) -> Result<Option<ChangeWatch>, StateError> {
        let _ = wake;
        Ok(None)
    }

    /// Reads the state, failing with `NotInitialized` if there is none.
    fn load_existing(&self) -> Result<Versioned, StateError> {
        self.load()?.ok_or_else(|| StateError::NotInitialized {
            path: self.location().into(),
        })
    }
}

/// Keeps a store's change notifications running; dropping it stops them.
pub struct ChangeWatch(#[allow(dead_code)] Box<dyn Send>);

impl ChangeWatch {
    pub fn new(guard: impl Send + 'static) -> Self {
        Self(Box::new(guard))
    }
}

/// A shared store is a store (`Arc<dyn StateStore>` where `&dyn StateStore` is wanted).
impl<T: StateStore + ?Sized> StateStore for std::sync::Arc<T> {
    fn load(&self) -> Result<Option<Versioned>, StateError> {
        (**self).load()
    }

    fn compare_and_swap(
        &self,
        expected: Option<Generation>,
        state: &CaState,
    ) -> Result<Generation, StateError> {
        (**self).compare_and_swap(expected, state)
    }

    fn location(&self) -> String {
        (**self).location()
    }

    fn create_migrated(&self, from: &Versioned) -> Result<Generation, StateError> {
        (**self).create_migrated(from)
    }

    fn on_change(
        &self,
        wake: tokio::sync::mpsc::Sender<()>,
    ) -> Result<Option<ChangeWatch>, StateError> {
        (**self).on_change(wake)
    }
}
