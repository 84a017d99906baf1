//! The live CA: the authority and trust bundle built from the state store, republished on a
//! `watch` channel whenever the store's generation moves (polled; applied within the interval).

use std::{sync::Arc, time::Duration};

use thiserror::Error;
use tokio::sync::watch;

use super::TrustBundleSet;
use crate::{
    ca::{cert, Authority, CaError, IssuancePolicy},
    clock::Clock,
    state::{Generation, StateError, StateStore},
};

/// What every reader sees: the authority, the bundle, and the state generation they came from.
#[derive(Debug)]
pub struct CaSnapshot {
    pub authority: Arc<Authority>,
    pub bundle: Arc<TrustBundleSet>,
    pub generation: Generation,
    /// Fingerprint of the certificate that signs leaves; a change means re-issue.
    pub signer_id: String,
}

/// Why the CA could not be (re)loaded.
#[derive(Debug, Error)]
pub enum LiveCaError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// Owner of the snapshot channel.
pub struct LiveCa {
    store: Arc<dyn StateStore>,
    policy: IssuancePolicy,
    clock: Arc<dyn Clock>,
    tx: watch::Sender<Arc<CaSnapshot>>,
}

impl LiveCa {
    /// Loads the state, builds and self-tests the authority.
    pub fn load(
        store: Arc<dyn StateStore>,
        policy: IssuancePolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, LiveCaError> {
        let snapshot = build(store.as_ref(), &policy, &clock)?;
        let (tx, _) = watch::channel(Arc::new(snapshot));
        Ok(Self {
            store,
            policy,
            clock,
            tx,
        })
    }

    /// A receiver of snapshots; one per reader (per SDS stream).
    pub fn subscribe(&self) -> watch::Receiver<Arc<CaSnapshot>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<CaSnapshot> {
        self.tx.borrow().clone()
    }

    /// Reloads if the store's generation moved; returns whether a new snapshot was published.
    /// A state that fails to load keeps the current snapshot in service.
    pub fn reload_if_changed(&self) -> Result<bool, LiveCaError> {
        let stored = self.store.load_existing()?.generation;
        if stored == self.current().generation {
            return Ok(false);
        }
        let next = build(self.store.as_ref(), &self.policy, &self.clock)?;
        self.tx.send_replace(Arc::new(next));
        Ok(true)
    }

    /// Polls the store every `interval` until the channel has no receivers left and `stop` fires.
    pub async fn watch_store(self: Arc<Self>, interval: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.reload_if_changed()).await {
                Ok(Ok(true)) => {
                    tracing::info!(generation = %self.current().generation, "CA state changed; new snapshot published")
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "CA state could not be reloaded; the current one stays in service")
                }
                Err(e) => tracing::error!(error = %e, "CA state reload task failed"),
            }
        }
    }
}

fn build(
    store: &dyn StateStore,
    policy: &IssuancePolicy,
    clock: &Arc<dyn Clock>,
) -> Result<CaSnapshot, LiveCaError> {
    let v = store.load_existing()?;
    let material = v.state.signing_material()?;
    let signer_id = cert::fingerprint_id(&material.signer_cert);
    let roots = v.state.trusted_roots()?;
    let authority = Authority::new(
        v.state.trust_domain.clone(),
        material,
        *policy,
        clock.clone(),
    )?;
    authority.self_test()?;
    let bundle = TrustBundleSet::own(v.state.trust_domain.clone(), roots, v.generation.0);
    Ok(CaSnapshot {
        authority: Arc::new(authority),
        bundle: Arc::new(bundle),
        generation: v.generation,
        signer_id,
    })
}
