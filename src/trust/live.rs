//! The live CA: the authority and trust bundle built from the state store, republished on a
//! `watch` channel whenever the store's generation moves. The store's file is watched (inotify
//! on Linux), so a change is applied as soon as it is written; a poll backs the watch up.
//!
//! Federated trust domains: the server trusts the stored bundles of its configured peers only
//! (`federate_with`), so a peer taken out of `[[federation.peers]]` leaves `ALL`,
//! `spiffe://<td>` and a merged `ROOTCA` at the next start, while its last bundle stays stored
//! (it is deleted only by `meshid bundle delete`).

use std::{
    collections::{BTreeSet, HashSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use thiserror::Error;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use super::TrustBundleSet;
use crate::{
    ca::{cert, Authority, CaError, IssuancePolicy},
    clock::Clock,
    spiffe::TrustDomain,
    state::{CaState, Generation, StateError, StateStore},
};

/// What every reader sees: the authority, the bundle, and the state generation they came from.
#[derive(Debug)]
pub struct CaSnapshot {
    pub authority: Arc<Authority>,
    pub bundle: Arc<TrustBundleSet>,
    pub generation: Generation,
    /// Fingerprint of the certificate that signs leaves; a change means re-issue.
    pub signer_id: String,
    /// Fingerprint ids of signer certificates under tainted roots: a leaf from one of these is
    /// re-issued at once.
    pub tainted_signers: HashSet<String>,
    /// SHA-256 of the state the snapshot was built from: a replaced state with the same
    /// generation (a restored backup) is still noticed.
    pub state_digest: String,
    /// Every root of the state with its lifecycle state (revoked ones included), for views.
    pub roots: Arc<[RootSummary]>,
}

/// A root as views show it (no key material).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RootSummary {
    /// Fingerprint id.
    pub id: String,
    pub state: crate::state::RootState,
    pub subject: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// When it entered its current state, where the state records it.
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// A new signer under it is staged (`root prepare --from-plugin`).
    pub signer_staged: bool,
}

fn root_summaries(state: &CaState) -> Result<Arc<[RootSummary]>, StateError> {
    state
        .roots
        .iter()
        .map(|r| {
            let der = r.cert_der()?;
            let p = cert::parse(&der, "root").map_err(|e| StateError::Invalid(e.to_string()))?;
            Ok(RootSummary {
                id: r.id.clone(),
                state: r.state,
                subject: p.subject().to_string(),
                not_before: p.validity().not_before.to_datetime(),
                not_after: p.validity().not_after.to_datetime(),
                since: r.since.get(r.state),
                signer_staged: r.prepared_signer.is_some(),
            })
        })
        .collect()
}

impl CaSnapshot {
    /// The latest `notAfter` (Unix seconds) among this trust domain's own roots, if any parses.
    pub fn latest_root_not_after(&self) -> Option<i64> {
        self.bundle
            .own_roots()
            .iter()
            .filter_map(|r| {
                x509_parser::parse_x509_certificate(r)
                    .ok()
                    .map(|(_, c)| c.validity().not_after.timestamp())
            })
            .max()
    }
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
    /// The federated trust domains to trust; `None`: every stored one (library users that
    /// have no federation config; the server always sets it).
    peers: RwLock<Option<BTreeSet<TrustDomain>>>,
    tx: watch::Sender<Arc<CaSnapshot>>,
    /// Why the last reload of the store failed, while it does.
    reload_problem: std::sync::Mutex<Option<String>>,
}

impl LiveCa {
    /// Loads the state, builds and self-tests the authority.
    pub fn load(
        store: Arc<dyn StateStore>,
        policy: IssuancePolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, LiveCaError> {
        let snapshot = build(store.as_ref(), &policy, &clock, 0, None)?;
        let (tx, _) = watch::channel(Arc::new(snapshot));
        Ok(Self {
            store,
            policy,
            clock,
            peers: RwLock::new(None),
            tx,
            reload_problem: std::sync::Mutex::new(None),
        })
    }

    /// Trusts the stored bundles of `peers` only (the server's `[[federation.peers]]`), from
    /// the next snapshot on, which is published now if it trusts other trust domains than the
    /// current one. Returns the stored trust domains that are left out.
    pub fn federate_with(
        &self,
        peers: BTreeSet<TrustDomain>,
    ) -> Result<Vec<TrustDomain>, LiveCaError> {
        let stored = self.store.load_existing()?.state;
        let left_out = stored
            .federated
            .keys()
            .filter(|td| !peers.contains(*td))
            .cloned()
            .collect();
        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = Some(peers);
        let current = self.current();
        let next = self.build(current.bundle.sequence() + 1)?;
        let trusted = |s: &CaSnapshot| {
            s.bundle
                .iter()
                .map(|(td, r)| (td.clone(), r.to_vec()))
                .collect::<Vec<_>>()
        };
        if trusted(&next) != trusted(&current) || next.generation != current.generation {
            self.tx.send_replace(Arc::new(next));
        }
        Ok(left_out)
    }

    fn build(&self, min_sequence: u64) -> Result<CaSnapshot, LiveCaError> {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner()).clone();
        build(
            self.store.as_ref(),
            &self.policy,
            &self.clock,
            min_sequence,
            peers.as_ref(),
        )
    }

    /// A receiver of snapshots; one per reader (per SDS stream).
    pub fn subscribe(&self) -> watch::Receiver<Arc<CaSnapshot>> {
        self.tx.subscribe()
    }

    /// Why the state store could not be re-read lately (`None`: the last read worked). The
    /// snapshot in service stays the last good one.
    pub fn reload_problem(&self) -> Option<String> {
        self.reload_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Where the state lives.
    pub fn store_location(&self) -> String {
        self.store.location()
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<CaSnapshot> {
        self.tx.borrow().clone()
    }

    /// Reloads if the store's generation or content moved; returns whether a new snapshot was
    /// published. A state that fails to load keeps the current snapshot in service.
    pub fn reload_if_changed(&self) -> Result<bool, LiveCaError> {
        let stored = self.store.load_existing()?;
        let current = self.current();
        if stored.generation == current.generation && digest(&stored.state)? == current.state_digest
        {
            return Ok(false);
        }
        let next = self.build(current.bundle.sequence() + 1)?;
        self.tx.send_replace(Arc::new(next));
        Ok(true)
    }

    /// Reloads whenever the store says it changed (a watched file or Secret), and at least
    /// every `interval` (the poll backs up a watch that misses events, e.g. on a network file
    /// system, or that could not be set up), until `stop` fires.
    pub async fn watch_store(self: Arc<Self>, interval: Duration, mut stop: watch::Receiver<bool>) {
        let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
        let _watcher = match self.store.on_change(wake_tx) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(state = %self.store.location(), error = %e, poll = ?interval, "the state cannot be watched; changes are picked up by polling only");
                None
            }
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                Some(()) = wake_rx.recv() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let me = self.clone();
            let reloaded = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
            *self
                .reload_problem
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = match &reloaded {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            match reloaded {
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
    min_sequence: u64,
    peers: Option<&BTreeSet<TrustDomain>>,
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
    // The sequence follows the generation but never goes back or repeats, even when a
    // restored backup brings an equal or older generation.
    let sequence = v.generation.0.max(min_sequence);
    let mut bundle = TrustBundleSet::own(v.state.trust_domain.clone(), roots, sequence)
        .with_own_crl(v.state.crl.clone());
    for (td, fed) in &v.state.federated {
        if peers.is_none_or(|p| p.contains(td)) {
            bundle = bundle.with_trust_domain(td.clone(), fed.roots()?);
        }
    }
    Ok(CaSnapshot {
        authority: Arc::new(authority),
        bundle: Arc::new(bundle),
        generation: v.generation,
        signer_id,
        tainted_signers: v.state.tainted_signers()?,
        state_digest: digest(&v.state)?,
        roots: root_summaries(&v.state)?,
    })
}

/// A digest of the state's content, independent of how the store encodes it.
fn digest(state: &CaState) -> Result<String, StateError> {
    let json = serde_json::to_vec(state).map_err(|e| StateError::Invalid(e.to_string()))?;
    let d = ring::digest::digest(&ring::digest::SHA256, &json);
    Ok(cert::hex(d.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ca::{root, KeyType},
        clock::SystemClock,
        spiffe::TrustDomain,
        state::{CaState, DirStore},
    };

    fn init(dir: &std::path::Path) -> DirStore {
        let td = TrustDomain::new("example.org").unwrap();
        let now = time::OffsetDateTime::now_utc();
        let ca = root::generate_root(&td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now).unwrap();
        let store = DirStore::new(dir);
        store
            .compare_and_swap(None, &CaState::with_generated_root(td, &ca, now))
            .unwrap();
        store
    }

    /// Issue 8 item 9: a state file replaced by another with the same generation (a restored
    /// backup, another cluster's state copied in) used to be ignored until the next write.
    #[test]
    fn replacement_with_the_same_generation_is_reloaded() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (store_a, store_b) = (init(a.path()), init(b.path()));
        let live = LiveCa::load(
            Arc::new(store_a.clone()),
            IssuancePolicy::default(),
            Arc::new(SystemClock),
        )
        .unwrap();
        let before = live.current();
        assert!(!live.reload_if_changed().unwrap(), "nothing changed yet");
        std::fs::copy(store_b.state_path(), store_a.state_path()).unwrap();
        assert_eq!(
            store_a.load_existing().unwrap().generation,
            before.generation
        );

        assert!(
            live.reload_if_changed().unwrap(),
            "same generation, new content"
        );
        let after = live.current();
        let want = store_b
            .load_existing()
            .unwrap()
            .state
            .signing_root()
            .unwrap()
            .id
            .clone();
        assert_eq!(after.signer_id, want);
        assert_ne!(after.signer_id, before.signer_id);
        assert!(after.bundle.sequence() > before.bundle.sequence());
        assert!(!live.reload_if_changed().unwrap(), "and only once");
    }

    /// Issue 13: a root change written by the CLI reaches the server as soon as the store's file
    /// is replaced, not at the next poll (the poll here is an hour). A change of the file's
    /// neighbours (the lock, temp files) does not count as a change.
    #[tokio::test]
    async fn a_store_write_is_applied_without_waiting_for_the_poll() {
        let dir = tempfile::tempdir().unwrap();
        let store = init(dir.path());
        let live = Arc::new(
            LiveCa::load(
                Arc::new(store.clone()),
                IssuancePolicy::default(),
                Arc::new(SystemClock),
            )
            .unwrap(),
        );
        let mut rx = live.subscribe();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(live.clone().watch_store(Duration::from_secs(3600), stop_rx));
        std::fs::write(dir.path().join("unrelated"), b"x").unwrap();
        let before = store.load_existing().unwrap();
        let mut next = before.state.clone();
        let td = next.trust_domain.clone();
        let extra = root::generate_root(
            &td,
            KeyType::EcdsaP256,
            root::DEFAULT_ROOT_TTL,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        next.roots.push(crate::state::RootRecord::new(
            &extra.cert,
            crate::state::RootState::Prepared,
            crate::state::RootOrigin::Plugin,
            time::OffsetDateTime::now_utc(),
            None,
            None,
        ));
        // The watch is set up once the task runs; a write before that goes unseen (only the
        // hourly poll would find it), so write again, a new generation each time, until one is
        // applied. On a busy machine that may take a few rounds; with polling only, none is.
        let mut applied = false;
        for _ in 0..30 {
            let current = store.load_existing().unwrap();
            store
                .compare_and_swap(Some(current.generation), &next)
                .unwrap();
            if tokio::time::timeout(Duration::from_secs(1), rx.changed())
                .await
                .is_ok()
            {
                applied = true;
                break;
            }
        }
        assert!(applied, "no write applied within 30 s; the poll is an hour");
        assert!(live.current().generation > before.generation);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
