//! Propagation tracking: which bundle (own trust domain's root ids) and which leaf signer each
//! open SDS stream has acknowledged. One entry per stream, updated on ACK and removed when the
//! stream ends; counts are computed on demand (`summary`), so 10,000 streams cost a map entry
//! each and nothing per push.
//!
//! A stream counts for the bundle when it subscribes to `ROOTCA`, `ALL` or `spiffe://<own td>`,
//! and for the leaf when it subscribes to `default`, once it has ACKed anything at all. It lags
//! when its ACKed bundle misses a root the server trusts now, or its ACKed leaf is not from the
//! server's current signer. A stream that has never ACKed (just opened, or a client that only
//! NACKs or stays silent) is counted apart as `silent` and holds no rotation: its next response
//! carries the current bundle anyway, and one silent client must not keep a root from being
//! activated until it expires (SPIRE activates on schedule: `manager.go` `rotateX509CA`).
//! `meshid root rotate` waits on these counts (the "activation waits for propagation" rule).
//!
//! The registry is sharded: a status read walks one shard at a time, so an ACK waits at most
//! for one shard's walk, not for all 10,000 streams.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// At most this many laggards are listed in a summary.
pub const LAGGARDS_SHOWN: usize = 20;

/// Shards of the registry (a stream's id picks its shard).
const SHARDS: usize = 64;

/// The shared registry of one server's SDS streams.
pub struct Propagation {
    shards: [Mutex<HashMap<u64, Entry>>; SHARDS],
    next: AtomicU64,
}

impl Default for Propagation {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::default()),
            next: AtomicU64::new(0),
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    peer: String,
    pod: Option<String>,
    /// `None` until the stream's first request says what it subscribes to.
    wants: Option<Wants>,
    bundle: Option<Arc<[String]>>,
    signer: Option<String>,
    /// When the leaf the stream ACKed expires (Unix seconds).
    leaf_not_after: Option<i64>,
}

#[derive(Clone, Copy, Debug)]
struct Wants {
    bundle: bool,
    leaf: bool,
}

impl Entry {
    /// Whether the stream has ACKed anything: only then can it lag.
    fn acked(&self) -> bool {
        self.bundle.is_some() || self.signer.is_some()
    }

    fn wants_bundle(&self) -> bool {
        self.wants.is_some_and(|w| w.bundle)
    }

    fn wants_leaf(&self) -> bool {
        self.wants.is_some_and(|w| w.leaf)
    }
}

/// One stream's entry; removed from the registry when dropped.
pub struct StreamTrack {
    registry: Arc<Propagation>,
    id: u64,
}

impl Propagation {
    /// Registers a stream of `peer` (a SPIFFE ID) and, when known, its pod.
    pub fn open(self: &Arc<Self>, peer: String, pod: Option<String>) -> StreamTrack {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            peer,
            pod,
            wants: None,
            bundle: None,
            signer: None,
            leaf_not_after: None,
        };
        self.shard(id).insert(id, entry);
        StreamTrack {
            registry: self.clone(),
            id,
        }
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.shards[(id % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Open streams.
    pub fn len(&self) -> usize {
        (0..SHARDS as u64).map(|i| self.shard(i).len()).sum()
    }

    /// Whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open streams by the namespace of their peer's SPIFFE ID (`/ns/<ns>/...`; others
    /// under `""`): how many, the identities (the first `IDENTITIES_SHOWN`), and the earliest
    /// and latest expiry of the leaves they ACKed.
    pub fn namespaces(&self) -> BTreeMap<String, NamespaceStreams> {
        let mut out: BTreeMap<String, NamespaceStreams> = BTreeMap::new();
        for i in 0..SHARDS as u64 {
            let shard = self.shard(i);
            for e in shard.values() {
                let ns = e
                    .peer
                    .split_once("/ns/")
                    .and_then(|(_, rest)| rest.split('/').next())
                    .unwrap_or("");
                let n = match out.get_mut(ns) {
                    Some(n) => n,
                    None => out.entry(ns.to_owned()).or_default(),
                };
                n.streams += 1;
                if n.identities.len() < IDENTITIES_SHOWN && !n.identities.contains(&e.peer) {
                    n.identities.push(e.peer.clone());
                }
                if let Some(t) = e.leaf_not_after {
                    n.leaves += 1;
                    n.earliest_leaf_not_after =
                        Some(n.earliest_leaf_not_after.map_or(t, |x| x.min(t)));
                    n.latest_leaf_not_after = Some(n.latest_leaf_not_after.map_or(t, |x| x.max(t)));
                }
            }
        }
        for n in out.values_mut() {
            n.identities.sort();
        }
        out
    }

    /// Counts against the server's view now: `trusted` own root ids and the current `signer`.
    /// Each shard is locked while it is walked, and its streams' ACKs wait for that lock: so
    /// nothing is allocated per stream (streams on one snapshot share one list of root ids,
    /// counted once per list), and a laggard's reason is written only for the few shown.
    pub fn counts(&self, trusted: &[String], signer: &str) -> Counts {
        let mut c = Counts::default();
        let mut bundles: HashMap<*const String, (Arc<[String]>, usize)> = HashMap::new();
        let mut signers: HashMap<String, usize> = HashMap::new();
        for i in 0..SHARDS as u64 {
            let shard = self.shard(i);
            c.streams += shard.len();
            for e in shard.values() {
                c.count(e, trusted, signer, &mut bundles, &mut signers);
            }
        }
        for (held, n) in bundles.into_values() {
            for r in held.iter() {
                *c.roots.entry(r.clone()).or_default() += n;
            }
        }
        c.signers = signers.into_iter().collect();
        c.laggards.sort_by(|a, b| a.peer.cmp(&b.peer));
        c
    }
}

impl Counts {
    /// Adds one stream.
    fn count(
        &mut self,
        e: &Entry,
        trusted: &[String],
        signer: &str,
        bundles: &mut HashMap<*const String, (Arc<[String]>, usize)>,
        signers: &mut HashMap<String, usize>,
    ) {
        let c = self;
        if !e.acked() {
            c.silent += 1;
            return;
        }
        {
            let mut missing_root = None;
            let mut behind_signer = false;
            if e.wants_bundle() {
                c.bundle_streams += 1;
                if let Some(b) = &e.bundle {
                    bundles
                        .entry(b.as_ptr())
                        .or_insert_with(|| (b.clone(), 0))
                        .1 += 1;
                }
                let held = e.bundle.as_deref().unwrap_or_default();
                missing_root = trusted.iter().find(|t| !held.contains(t));
            }
            if e.wants_leaf() {
                c.leaf_streams += 1;
                if let Some(s) = &e.signer {
                    match signers.get_mut(s.as_str()) {
                        Some(n) => *n += 1,
                        None => {
                            signers.insert(s.clone(), 1);
                        }
                    }
                }
                behind_signer = e.signer.as_deref() != Some(signer);
            }
            if missing_root.is_none() && !behind_signer {
                return;
            }
            c.laggard_count += 1;
            if c.laggards.len() < LAGGARDS_SHOWN {
                let mut lag = Vec::new();
                if let Some(missing) = missing_root {
                    lag.push(format!("bundle without root {missing}"));
                }
                if behind_signer {
                    lag.push(match &e.signer {
                        Some(s) => format!("leaf from signer {s}"),
                        None => "no leaf acknowledged".into(),
                    });
                }
                c.laggards.push(Laggard {
                    peer: e.peer.clone(),
                    pod: e.pod.clone(),
                    why: lag.join("; "),
                });
            }
        }
    }
}

impl StreamTrack {
    fn update(&self, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.registry.shard(self.id).get_mut(&self.id) {
            f(e);
        }
    }

    /// What the stream subscribes to now.
    pub fn subscribed(&self, bundle: bool, leaf: bool) {
        self.update(|e| e.wants = Some(Wants { bundle, leaf }));
    }

    /// The stream ACKed a bundle holding these own root ids.
    pub fn acked_bundle(&self, roots: Arc<[String]>) {
        self.update(|e| e.bundle = Some(roots));
    }

    /// The leaf the stream ACKed expires at `not_after`.
    pub fn leaf_expires(&self, not_after: time::OffsetDateTime) {
        self.update(|e| e.leaf_not_after = Some(not_after.unix_timestamp()));
    }

    /// The stream ACKed a leaf from `signer`.
    pub fn acked_leaf(&self, signer: &str) {
        self.update(|e| {
            if e.signer.as_deref() != Some(signer) {
                e.signer = Some(signer.to_owned());
            }
        });
    }
}

impl Drop for StreamTrack {
    fn drop(&mut self) {
        self.registry.shard(self.id).remove(&self.id);
    }
}

/// A stream that has not caught up with the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Laggard {
    /// The caller's SPIFFE ID.
    pub peer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub why: String,
}

/// Counts over the open streams.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Open SDS streams.
    pub streams: usize,
    /// Streams that have never ACKed anything (just opened, or only NACKing): they hold no
    /// rotation and are not counted below.
    #[serde(default)]
    pub silent: usize,
    /// Streams that ACKed and subscribe to a bundle of the own trust domain.
    pub bundle_streams: usize,
    /// Streams that ACKed and subscribe to `default`.
    pub leaf_streams: usize,
    /// Root id → streams whose ACKed bundle holds it.
    pub roots: BTreeMap<String, usize>,
    /// Signer id → streams whose ACKed leaf it signed.
    pub signers: BTreeMap<String, usize>,
    /// Streams behind the server's current bundle or signer.
    pub laggard_count: usize,
    /// The first `LAGGARDS_SHOWN` of them.
    pub laggards: Vec<Laggard>,
}

/// How many identities [`Propagation::namespaces`] lists per namespace.
pub const IDENTITIES_SHOWN: usize = 20;

/// One namespace's open SDS streams.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NamespaceStreams {
    pub streams: usize,
    /// Streams holding an ACKed leaf.
    pub leaves: usize,
    /// Up to `IDENTITIES_SHOWN` SPIFFE IDs, sorted.
    pub identities: Vec<String>,
    /// Unix seconds.
    pub earliest_leaf_not_after: Option<i64>,
    pub latest_leaf_not_after: Option<i64>,
}

/// The rotation status a server publishes on `GET /debug/rotation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationStatus {
    /// The replica (host name).
    pub replica: String,
    /// The state generation the server runs.
    pub generation: u64,
    /// The bundle's `spiffe_sequence`.
    pub bundle_sequence: u64,
    /// Own root ids in the bundle the server serves.
    pub trusted_roots: Vec<String>,
    /// The signer of new leaves.
    pub signer: String,
    #[serde(flatten)]
    pub counts: Counts,
}

impl RotationStatus {
    /// `Err` unless the server trusts `root` and every bundle stream has ACKed it.
    pub fn root_propagated(&self, root: &str) -> Result<(), Lag> {
        if !self.trusted_roots.iter().any(|r| r == root) {
            return Err(Lag::RootNotServed {
                replica: self.replica.clone(),
                generation: self.generation,
                root: root.to_owned(),
            });
        }
        let have = self.counts.roots.get(root).copied().unwrap_or(0);
        if have < self.counts.bundle_streams {
            return Err(Lag::RootNotAcknowledged {
                replica: self.replica.clone(),
                root: root.to_owned(),
                have,
                streams: self.counts.bundle_streams,
                waiting: self.waiting(),
            });
        }
        Ok(())
    }

    /// `Err` unless the server signs with `signer` and every leaf stream runs on it.
    pub fn signer_propagated(&self, signer: &str) -> Result<(), Lag> {
        if self.signer != signer {
            return Err(Lag::SignerNotUsed {
                replica: self.replica.clone(),
                generation: self.generation,
                signer: signer.to_owned(),
            });
        }
        let have = self.counts.signers.get(signer).copied().unwrap_or(0);
        if have < self.counts.leaf_streams {
            return Err(Lag::SignerNotRunning {
                replica: self.replica.clone(),
                signer: signer.to_owned(),
                have,
                streams: self.counts.leaf_streams,
                waiting: self.waiting(),
            });
        }
        Ok(())
    }

    /// The same status with every string a server sent made printable (no terminal escapes):
    /// for a status read over the network before it reaches a terminal.
    pub fn printable(mut self) -> Self {
        let p = crate::http_client::printable;
        self.replica = p(&self.replica);
        self.signer = p(&self.signer);
        for r in &mut self.trusted_roots {
            *r = p(r);
        }
        self.counts.roots = self.counts.roots.iter().map(|(k, v)| (p(k), *v)).collect();
        self.counts.signers = self
            .counts
            .signers
            .iter()
            .map(|(k, v)| (p(k), *v))
            .collect();
        for l in &mut self.counts.laggards {
            l.peer = p(&l.peer);
            l.why = p(&l.why);
            l.pod = l.pod.as_deref().map(p);
        }
        self
    }

    /// The streams a rotation waits for on this replica (the laggards, capped), for messages.
    pub fn waiting(&self) -> Waiting {
        let c = &self.counts;
        Waiting {
            laggards: c.laggards.clone(),
            count: c.laggard_count,
            silent: c.silent,
        }
    }
}

/// Why one replica holds a rotation step back: it does not serve the new root (or signer) yet,
/// or some of its streams have not caught up.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum Lag {
    #[error("server {replica} (generation {generation}) does not serve root {root} yet")]
    RootNotServed {
        replica: String,
        generation: u64,
        root: String,
    },
    #[error("{have} of {streams} streams on {replica} have acknowledged a bundle with root {root}; waiting for {waiting}")]
    RootNotAcknowledged {
        replica: String,
        root: String,
        have: usize,
        streams: usize,
        waiting: Waiting,
    },
    #[error("server {replica} (generation {generation}) does not sign with {signer} yet")]
    SignerNotUsed {
        replica: String,
        generation: u64,
        signer: String,
    },
    #[error("{have} of {streams} streams on {replica} run on a leaf from signer {signer}; waiting for {waiting}")]
    SignerNotRunning {
        replica: String,
        signer: String,
        have: usize,
        streams: usize,
        waiting: Waiting,
    },
}

/// The streams of one replica that a rotation waits for: the first `LAGGARDS_SHOWN` laggards
/// named, how many lag in all, and how many never acknowledged anything (not waited for).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Waiting {
    pub laggards: Vec<Laggard>,
    pub count: usize,
    pub silent: usize,
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<String> = self
            .laggards
            .iter()
            .map(|l| match &l.pod {
                Some(p) => format!("{} (pod {p}: {})", l.peer, l.why),
                None => format!("{} ({})", l.peer, l.why),
            })
            .collect();
        if self.count > names.len() {
            names.push(format!("and {} more", self.count - names.len()));
        }
        if names.is_empty() {
            f.write_str("no stream")?;
        } else {
            f.write_str(&names.join(", "))?;
        }
        if self.silent > 0 {
            write!(
                f,
                " ({} more stream(s) never acknowledged anything and are not waited for)",
                self.silent
            )?;
        }
        Ok(())
    }
}

/// Where the server's HTTP port serves `RotationStatus`.
pub const STATUS_PATH: &str = "/debug/rotation";

/// The status of `registry` against `snapshot`, the one this server serves now.
pub fn status_of(
    registry: &Propagation,
    snapshot: &crate::trust::CaSnapshot,
    replica: &str,
) -> RotationStatus {
    let (trusted, counts, _) = current_counts(registry, snapshot);
    RotationStatus {
        replica: replica.to_owned(),
        generation: snapshot.generation.0,
        bundle_sequence: snapshot.bundle.sequence(),
        trusted_roots: trusted,
        signer: snapshot.signer_id.clone(),
        counts,
    }
}

/// The own roots `snapshot` serves (their ids), `registry`'s counts against it, and how many
/// bundle streams hold every one of those roots (the fewest holders among them: equal when
/// bundles are nested, as a rotation's are).
pub fn current_counts(
    registry: &Propagation,
    snapshot: &crate::trust::CaSnapshot,
) -> (Vec<String>, Counts, usize) {
    let trusted: Vec<String> = snapshot
        .bundle
        .own_roots()
        .iter()
        .map(|r| crate::ca::cert::fingerprint_id(r))
        .collect();
    let counts = registry.counts(&trusted, &snapshot.signer_id);
    let current = trusted
        .iter()
        .map(|r| counts.roots.get(r).copied().unwrap_or(0))
        .min()
        .unwrap_or(0)
        .min(counts.bundle_streams);
    (trusted, counts, current)
}

/// This replica's name: the host name (a pod's name in Kubernetes).
pub fn replica_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "meshid".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Arc<[String]> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn counts_follow_acks_and_entries_leave_with_their_stream() {
        let reg = Arc::new(Propagation::default());
        let a = reg.open("spiffe://td/ns/a/sa/a".into(), Some("a-1".into()));
        let b = reg.open("spiffe://td/ns/b/sa/b".into(), None);
        let leaf_only = reg.open("spiffe://td/ns/c/sa/c".into(), None);
        a.subscribed(true, true);
        b.subscribed(true, true);
        leaf_only.subscribed(false, true);
        a.acked_bundle(ids(&["old", "new"]));
        a.acked_leaf("new");
        b.acked_bundle(ids(&["old"]));
        b.acked_leaf("old");
        leaf_only.acked_leaf("new");

        let trusted = ["old".to_string(), "new".to_string()];
        let c = reg.counts(&trusted, "new");
        assert_eq!((c.streams, c.bundle_streams, c.leaf_streams), (3, 2, 3));
        assert_eq!(c.roots.get("new"), Some(&1));
        assert_eq!(c.roots.get("old"), Some(&2));
        assert_eq!(c.signers.get("new"), Some(&2));
        assert_eq!(c.laggard_count, 1);
        assert_eq!(c.laggards[0].peer, "spiffe://td/ns/b/sa/b");
        assert!(c.laggards[0].why.contains("bundle without root new"));
        assert!(c.laggards[0].why.contains("leaf from signer old"));

        drop(b);
        let c = reg.counts(&trusted, "new");
        assert_eq!((c.streams, c.laggard_count), (2, 0));
        drop((a, leaf_only));
        assert!(reg.is_empty());
    }

    /// Issue 17 item 2: a stream that never ACKed holds no rotation (SPIRE `manager.go`
    /// `rotateX509CA` activates on schedule whatever its clients do); one that ACKed once and
    /// then fell silent lags and is named.
    #[test]
    fn a_stream_that_never_acked_is_silent_and_holds_nothing() {
        let reg = Arc::new(Propagation::default());
        let silent = reg.open("spiffe://td/ns/x/sa/silent".into(), None);
        silent.subscribed(true, true);
        let _unsaid = reg.open("spiffe://td/ns/x/sa/unsaid".into(), None);
        let c = reg.counts(&["r".into()], "r");
        assert_eq!(
            (
                c.streams,
                c.silent,
                c.bundle_streams,
                c.leaf_streams,
                c.laggard_count
            ),
            (2, 2, 0, 0, 0)
        );
        let stale = reg.open("spiffe://td/ns/x/sa/stale".into(), None);
        stale.subscribed(true, false);
        stale.acked_bundle(ids(&["old"]));
        let c = reg.counts(&["old".into(), "r".into()], "r");
        assert_eq!((c.silent, c.bundle_streams, c.laggard_count), (2, 1, 1));
        assert_eq!(c.laggards[0].peer, "spiffe://td/ns/x/sa/stale");
    }

    /// Many streams over every shard: the counts add up across shards.
    #[test]
    fn counts_add_up_across_shards() {
        let reg = Arc::new(Propagation::default());
        let held = ids(&["r"]);
        let tracks: Vec<_> = (0..1000)
            .map(|i| {
                let t = reg.open(format!("spiffe://td/ns/a/sa/s{i}"), None);
                t.subscribed(true, true);
                t.acked_bundle(held.clone());
                t.acked_leaf(if i % 2 == 0 { "r" } else { "old" });
                t
            })
            .collect();
        let c = reg.counts(&["r".into()], "r");
        assert_eq!(
            (c.streams, c.bundle_streams, c.leaf_streams),
            (1000, 1000, 1000)
        );
        assert_eq!(c.roots.get("r"), Some(&1000));
        assert_eq!(
            (c.signers.get("r"), c.signers.get("old")),
            (Some(&500), Some(&500))
        );
        assert_eq!((c.laggard_count, c.laggards.len()), (500, LAGGARDS_SHOWN));
        drop(tracks);
        assert!(reg.is_empty());
    }
}
