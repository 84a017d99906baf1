//! The stored bundles of federated trust domains: storing one (fetched from a peer's endpoint,
//! or set by an operator) under the sequence rules, and deleting one (`meshid bundle delete`,
//! with SPIRE's `RESTRICT` and `DISSOCIATE` modes). Every write is one compare-and-swap of the
//! CA state, retried on a concurrent writer.
//!
//! Which stored bundles are *trusted* is decided elsewhere: the server trusts those of its
//! configured peers (`LiveCa::federate_with`), so a bundle kept here for a trust domain that
//! left `[[federation.peers]]` is in no bundle until the peer comes back.

use std::fmt;

use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use super::{
    federation_error::FederationError,
    spiffe_bundle::{serial_max, SpiffeBundle},
};
use crate::{
    ca::cert,
    spiffe::{SpiffeId, TrustDomain},
    state::{Dissociation, FederatedBundle, Generation, StateError, StateStore},
};

/// How many times a write is retried after losing a compare-and-swap.
const CAS_RETRIES: u32 = 3;

/// Who stores a bundle: the rules differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Fetched from the trust domain's bundle endpoint: refused for a dissociated trust domain
    /// and when its sequence comes before the highest stored one (a rollback).
    Endpoint,
    /// Set by an operator (`meshid bundle set`): replaces whatever is stored, whatever the
    /// sequences (SPIFFE federation spec 4.2: operators may update a foreign bundle at any
    /// time), restarts the sequence check from its own, and ends a dissociation.
    Operator,
}

/// What storing a bundle did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    /// The state was written.
    Updated(Update),
    /// Same roots as stored: nothing written.
    Unchanged,
}

/// A written bundle: the state's new generation and the bundle it replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub generation: Generation,
    pub previous: Option<FederatedBundle>,
}

/// Stores `bundle` as `td`'s last good bundle. Refuses our own trust domain and roots that
/// name another trust domain; from an endpoint, also a dissociated trust domain and a
/// sequence before the highest stored one. Writes only when the roots change: a peer whose
/// sequence moves without a root change (meshid's follows its state generation) causes no
/// write, so two peers never bounce writes off each other.
pub fn store_bundle(
    store: &dyn StateStore,
    td: &TrustDomain,
    bundle: &SpiffeBundle,
    source: &str,
    origin: Origin,
    now: OffsetDateTime,
) -> Result<Stored, FederationError> {
    check_trust_domain(bundle, td, source)?;
    let roots = cert::to_pem_bundle(&bundle.roots);
    let mut attempts = 0;
    loop {
        let current = store.load_existing()?;
        let state = &current.state;
        if &state.trust_domain == td {
            return Err(FederationError::OwnTrustDomain {
                trust_domain: td.clone(),
            });
        }
        if let (Origin::Endpoint, Some(d)) = (origin, state.dissociated.get(td)) {
            return Err(dissociated(td, d));
        }
        let stored = state.federated.get(td);
        // The same roots are no change, whatever the sequence: a bootstrap file exported from
        // the peer's state can be a generation ahead of what its endpoint serves yet.
        if stored.is_some_and(|b| b.roots == roots) {
            return Ok(Stored::Unchanged);
        }
        let highest_sequence = match origin {
            Origin::Endpoint => {
                let floor = stored.and_then(FederatedBundle::sequence_floor);
                bundle
                    .check_successor_of(floor)
                    .map_err(|source_err| FederationError::Bundle {
                        url: source.to_owned(),
                        source: source_err,
                    })?;
                match (floor, bundle.sequence) {
                    (Some(f), Some(s)) => Some(serial_max(f, s)),
                    (f, s) => f.or(s),
                }
            }
            Origin::Operator => bundle.sequence,
        };
        let mut next = state.clone();
        next.dissociated.remove(td);
        next.federated.insert(
            td.clone(),
            FederatedBundle {
                roots: roots.clone(),
                sequence: bundle.sequence,
                highest_sequence,
                refresh_hint_secs: bundle.refresh_hint.map(|h| h.as_secs()),
                updated_at: now.replace_nanosecond(0).unwrap_or(now),
                source: source.to_owned(),
            },
        );
        next.validate()?;
        match store.compare_and_swap(Some(current.generation), &next) {
            Ok(generation) => {
                return Ok(Stored::Updated(Update {
                    generation,
                    previous: stored.cloned(),
                }))
            }
            Err(StateError::Conflict { .. }) if attempts < CAS_RETRIES => attempts += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `td`'s dissociation, if an operator dissociated it.
pub fn dissociation_of(
    store: &dyn StateStore,
    td: &TrustDomain,
) -> Result<Option<Dissociation>, StateError> {
    Ok(store.load_existing()?.state.dissociated.get(td).cloned())
}

/// The refusal of a fetched bundle of a dissociated trust domain.
pub(super) fn dissociated(td: &TrustDomain, d: &Dissociation) -> FederationError {
    FederationError::Dissociated {
        trust_domain: td.clone(),
        at: crate::clock::rfc3339(d.at),
        by: d.by.clone(),
    }
}

/// A root whose certificate carries a SPIFFE ID (meshid's and SPIRE's do: `spiffe://<td>`)
/// must name `td`: a bundle served for another trust domain is refused.
fn check_trust_domain(
    bundle: &SpiffeBundle,
    td: &TrustDomain,
    url: &str,
) -> Result<(), FederationError> {
    for root in &bundle.roots {
        let Ok(p) = cert::parse(root, "root") else {
            continue;
        };
        let Ok(Some(san)) = p.subject_alternative_name() else {
            continue;
        };
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                if let Ok(id) = SpiffeId::parse(u) {
                    if id.trust_domain() != td {
                        return Err(FederationError::WrongTrustDomain {
                            url: url.to_owned(),
                            expected: td.clone(),
                            found: id.trust_domain().clone(),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

// === delete ===

/// How `meshid bundle delete` treats a trust domain that is still in use: SPIRE's
/// `BatchDeleteFederatedBundleRequest` modes, translated. SPIRE's uses are registration
/// entries that federate with the trust domain; meshid has none, and every workload trusts
/// every configured peer, so its uses are the server's `[[federation.peers]]` (the peer
/// itself, or a peer whose https_spiffe endpoint this bundle authenticates). SPIRE's
/// `DELETE` mode deletes those entries; deleting a peer from the operator's config file is
/// not meshid's to do, so there is no such mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DeleteMode {
    /// Refuse while the trust domain is in use (SPIRE's default, `RESTRICT`).
    #[default]
    Restrict,
    /// Delete, and dissociate the trust domain: the server stores none of its fetched bundles
    /// until an operator sets one with `meshid bundle set` (SPIRE's `DISSOCIATE`).
    Dissociate,
}

/// A use of a trust domain's stored bundle that `DeleteMode::Restrict` refuses to break.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Association {
    /// It is a peer the server fetches from; `seen_in` says where that was read.
    Peer { seen_in: String },
    /// It authenticates the https_spiffe bundle endpoint of `peer`.
    EndpointAuthority { peer: TrustDomain, seen_in: String },
}

impl fmt::Display for Association {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Peer { seen_in } => write!(f, "it is a federation peer ({seen_in})"),
            Self::EndpointAuthority { peer, seen_in } => write!(
                f,
                "it authenticates the https_spiffe bundle endpoint of peer {peer} ({seen_in})"
            ),
        }
    }
}

/// Why a bundle was not deleted. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("{trust_domain} is our own trust domain; its roots are managed with `meshid root`")]
    OwnTrustDomain { trust_domain: TrustDomain },
    #[error("no bundle of {trust_domain} is stored{}", .dissociated.as_ref().map_or(String::new(), |d| format!(" (it was deleted and dissociated by {} at {})", d.by, crate::clock::rfc3339(d.at))))]
    NotFound {
        trust_domain: TrustDomain,
        dissociated: Option<Dissociation>,
    },
    #[error("{trust_domain} is in use: {}; deleting its bundle now would last only until the server's next fetch. Remove it from [[federation.peers]] and restart the server (it then trusts {trust_domain} no more), then delete; or delete now with `--mode dissociate`, which also stops the server from storing {trust_domain}'s bundles until `meshid bundle set {trust_domain} FILE`", uses.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    InUse {
        trust_domain: TrustDomain,
        uses: Vec<Association>,
    },
    #[error("deleting the bundle: {0}")]
    State(#[from] StateError),
}

/// A deleted bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deleted {
    pub generation: Generation,
    pub bundle: FederatedBundle,
    pub dissociated: bool,
}

/// Deletes `td`'s stored bundle (`meshid bundle delete`): refused for our own trust domain,
/// when nothing is stored (SPIRE: NotFound), and in `Restrict` mode while `uses` is not
/// empty. `Dissociate` also records who dissociated it and when.
pub fn delete_bundle(
    store: &dyn StateStore,
    td: &TrustDomain,
    mode: DeleteMode,
    uses: &[Association],
    by: &str,
    now: OffsetDateTime,
) -> Result<Deleted, DeleteError> {
    let mut attempts = 0;
    loop {
        let current = store.load_existing()?;
        let state = &current.state;
        if &state.trust_domain == td {
            return Err(DeleteError::OwnTrustDomain {
                trust_domain: td.clone(),
            });
        }
        let Some(bundle) = state.federated.get(td) else {
            return Err(DeleteError::NotFound {
                trust_domain: td.clone(),
                dissociated: state.dissociated.get(td).cloned(),
            });
        };
        if mode == DeleteMode::Restrict && !uses.is_empty() {
            return Err(DeleteError::InUse {
                trust_domain: td.clone(),
                uses: uses.to_vec(),
            });
        }
        let mut next = state.clone();
        next.federated.remove(td);
        if mode == DeleteMode::Dissociate {
            next.dissociated.insert(
                td.clone(),
                Dissociation {
                    at: now.replace_nanosecond(0).unwrap_or(now),
                    by: by.to_owned(),
                },
            );
        }
        next.validate()?;
        match store.compare_and_swap(Some(current.generation), &next) {
            Ok(generation) => {
                return Ok(Deleted {
                    generation,
                    bundle: bundle.clone(),
                    dissociated: mode == DeleteMode::Dissociate,
                })
            }
            Err(StateError::Conflict { .. }) if attempts < CAS_RETRIES => attempts += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ca::{root, CertDer, KeyType},
        state::{CaState, DirStore},
        trust::BundleError,
    };

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn ca(of: &str) -> CertDer {
        root::generate_root(&td(of), KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now())
            .unwrap()
            .cert
    }

    fn init(dir: &std::path::Path) -> DirStore {
        let own = td("own.example");
        let r =
            root::generate_root(&own, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now()).unwrap();
        let store = DirStore::new(dir);
        store
            .compare_and_swap(None, &CaState::with_generated_root(own, &r, now()))
            .unwrap();
        store
    }

    fn bundle(root: &CertDer, sequence: Option<u64>) -> SpiffeBundle {
        SpiffeBundle {
            roots: vec![root.clone()],
            sequence,
            refresh_hint: None,
        }
    }

    /// (rule, origin, root, sequence, stored (true) / unchanged (false) / refused below, highest
    /// sequence after).
    type Row = (
        &'static str,
        Origin,
        usize,
        Option<u64>,
        Result<bool, u64>,
        Option<u64>,
    );

    /// SPIFFE federation spec 4.2 and RFC 1982 serial order, one row per rule; SPIRE's
    /// `pkg/server/bundle/client/updater.go` `UpdateBundle` stores any bundle that differs,
    /// meshid keeps the rollback check without locking anyone out.
    #[test]
    fn store_rules_per_origin() {
        let dir = tempfile::tempdir().unwrap();
        let store = init(dir.path());
        let peer = td("peer.example");
        let r: Vec<CertDer> = (0..8).map(|_| ca("peer.example")).collect();
        let max = u64::MAX;
        use Origin::{Endpoint, Operator};
        let rows: [Row; 10] = [
            ("first fetch", Endpoint, 0, Some(5), Ok(true), Some(5)),
            (
                "no sequence: taken, the floor stays",
                Endpoint,
                1,
                None,
                Ok(true),
                Some(5),
            ),
            (
                "below the floor after a bundle without one",
                Endpoint,
                2,
                Some(4),
                Err(5),
                Some(5),
            ),
            (
                "a jump of more than 2^63 (5 to 2^64-1) is a step back in serial order",
                Endpoint,
                3,
                Some(max),
                Err(5),
                Some(5),
            ),
            (
                "an operator's 2^64-1 is taken",
                Operator,
                3,
                Some(max),
                Ok(true),
                Some(max),
            ),
            (
                "a re-initialised peer after 2^64-1",
                Endpoint,
                4,
                Some(3),
                Ok(true),
                Some(3),
            ),
            ("a higher one", Endpoint, 5, Some(10), Ok(true), Some(10)),
            (
                "an operator replaces, whatever the sequence",
                Operator,
                6,
                Some(2),
                Ok(true),
                Some(2),
            ),
            (
                "then fetches are checked against the operator's",
                Endpoint,
                7,
                Some(1),
                Err(2),
                Some(2),
            ),
            (
                "the same roots are no change",
                Endpoint,
                6,
                Some(9),
                Ok(false),
                Some(2),
            ),
        ];
        for (rule, origin, i, seq, want, highest) in rows {
            let got = store_bundle(&store, &peer, &bundle(&r[i], seq), "test", origin, now());
            match (got, want) {
                (Ok(Stored::Updated(_)), Ok(true)) | (Ok(Stored::Unchanged), Ok(false)) => {}
                (
                    Err(FederationError::Bundle {
                        source: BundleError::SequenceWentBack { stored, .. },
                        ..
                    }),
                    Err(floor),
                ) => assert_eq!(stored, floor, "{rule}"),
                (other, _) => panic!("{rule}: {other:?}"),
            }
            let held = store.load_existing().unwrap().state.federated[&peer].clone();
            assert_eq!(held.sequence_floor(), highest, "{rule}");
        }
    }

    /// SPIRE `pkg/server/datastore/sqlstore` `deleteBundle` with RESTRICT / DISSOCIATE, and
    /// `api/bundle/v1` `deleteFederatedBundle` (not our own trust domain; NotFound).
    #[test]
    fn delete_modes_follow_spire() {
        let dir = tempfile::tempdir().unwrap();
        let store = init(dir.path());
        let peer = td("peer.example");
        let r = ca("peer.example");
        let set = |o| store_bundle(&store, &peer, &bundle(&r, Some(1)), "test", o, now());
        set(Origin::Endpoint).unwrap();
        let uses = [Association::Peer {
            seen_in: "[[federation.peers]] in b.toml".into(),
        }];
        let before = store.load_existing().unwrap().generation;
        let err =
            delete_bundle(&store, &peer, DeleteMode::Restrict, &uses, "ops@h", now()).unwrap_err();
        assert!(matches!(err, DeleteError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("b.toml"), "{err}");
        assert_eq!(
            store.load_existing().unwrap().generation,
            before,
            "nothing written"
        );

        let d =
            delete_bundle(&store, &peer, DeleteMode::Dissociate, &uses, "ops@h", now()).unwrap();
        assert!(d.dissociated && d.bundle.sequence == Some(1));
        let state = store.load_existing().unwrap().state;
        assert!(!state.federated.contains_key(&peer));
        assert_eq!(state.dissociated[&peer].by, "ops@h");
        // The server's fetch is refused; an operator's set trusts it again.
        assert!(matches!(
            set(Origin::Endpoint),
            Err(FederationError::Dissociated { .. })
        ));
        let err =
            delete_bundle(&store, &peer, DeleteMode::Restrict, &[], "ops@h", now()).unwrap_err();
        assert!(
            matches!(
                &err,
                DeleteError::NotFound {
                    dissociated: Some(_),
                    ..
                }
            ),
            "{err}"
        );
        set(Origin::Operator).unwrap();
        assert!(store.load_existing().unwrap().state.dissociated.is_empty());
        // Restrict with no use deletes and dissociates nothing.
        let d = delete_bundle(&store, &peer, DeleteMode::Restrict, &[], "ops@h", now()).unwrap();
        assert!(!d.dissociated);
        let state = store.load_existing().unwrap().state;
        assert!(state.federated.is_empty() && state.dissociated.is_empty());
        assert!(matches!(
            delete_bundle(
                &store,
                &td("own.example"),
                DeleteMode::Dissociate,
                &[],
                "o",
                now()
            ),
            Err(DeleteError::OwnTrustDomain { .. })
        ));
    }
}
