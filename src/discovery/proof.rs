//! Sidecars proven by their proxies: which pods have a live SDS stream, or recently obtained a
//! certificate over SDS or the CSR API (pod name and UID from the projected token's
//! `kubernetes.io.pod` claim). A pod labelled `tlsMode=istio` whose proxy never fetched a
//! certificate is the classic "expected mTLS, got connection failures" case.
//!
//! A proof is keyed by cluster, namespace and pod name: the cluster is the one whose token
//! validated the caller (`clusters[].name`), matched against the cluster discovery found the
//! pod in (`discovery.cluster_name`, a remote cluster's name), as istiod matches a proxy only
//! against its own cluster's registry. So a StatefulSet pod `db-0` in another cluster proves
//! nothing about this cluster's `db-0`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::{clock::Clock, identity::Identity};

/// What meshid knows about an endpoint's proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum ProxyProof {
    /// Nothing to go on: no registry (offline `describe`), or not a pod.
    Unknown,
    /// A proxy of this pod holds an SDS stream open.
    Connected {
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
    },
    /// A proxy of this pod obtained a certificate within `discovery.proxy_proof_grace`.
    Recent {
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// No proxy of this pod (this UID) has fetched a certificate, or the last one is older
    /// than the grace period.
    Never,
}

/// Looks up the proof for a pod.
pub trait ProofLookup {
    fn proof(&self, pod: &PodName<'_>, uid: Option<&str>) -> ProxyProof;
}

/// A pod by cluster, namespace and name.
#[derive(Clone, Copy, Debug)]
pub struct PodName<'a> {
    pub cluster: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

impl PodName<'_> {
    fn key(&self) -> Key {
        (
            self.cluster.to_owned(),
            self.namespace.to_owned(),
            self.name.to_owned(),
        )
    }
}

/// (cluster, namespace, pod name).
type Key = (String, String, String);

/// No registry: every proof is `Unknown`.
pub struct NoProofs;

impl ProofLookup for NoProofs {
    fn proof(&self, _: &PodName<'_>, _: Option<&str>) -> ProxyProof {
        ProxyProof::Unknown
    }
}

/// A pod's proof as a replica publishes it for the others: the pod (cluster, namespace, name,
/// UID) and when its proxy was last seen (now, while it holds a stream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SharedProof {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

#[derive(Clone, Debug)]
struct Seen {
    uid: String,
    streams: usize,
    connected_since: Option<OffsetDateTime>,
    last: OffsetDateTime,
}

/// The registry SDS and the CSR API report to.
pub struct ProxyRegistry {
    seen: Mutex<HashMap<Key, Seen>>,
    /// What the other replicas published, by replica.
    shared: Mutex<HashMap<String, Vec<SharedProof>>>,
    /// Until then a pod with no proof is `Unknown`, not `Never` (a start-up grace: the
    /// proxies of a replica that just started have not reached it yet).
    hold_until: Mutex<Option<OffsetDateTime>>,
    clock: Arc<dyn Clock>,
    grace: Duration,
    changes: watch::Sender<u64>,
}

/// Held by an SDS stream; reports the stream closed when dropped.
pub struct StreamGuard {
    registry: Arc<ProxyRegistry>,
    key: Key,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.registry.closed(&self.key);
    }
}

impl ProxyRegistry {
    pub fn new(clock: Arc<dyn Clock>, grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            seen: Mutex::default(),
            shared: Mutex::default(),
            hold_until: Mutex::default(),
            clock,
            grace,
            changes: watch::channel(0).0,
        })
    }

    /// Bumped on every stream opened or closed and every certificate issued.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn key(id: &Identity) -> Option<(Key, String)> {
        let pod = id.pod.as_ref()?;
        let key = (id.cluster.0.clone(), id.namespace.clone(), pod.name.clone());
        Some((key, pod.uid.clone()))
    }

    fn touch(&self, id: &Identity, stream: bool) -> Option<Key> {
        let (key, uid) = Self::key(id)?;
        let now = self.clock.now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let e = seen.entry(key.clone()).or_insert_with(|| Seen {
            uid: uid.clone(),
            streams: 0,
            connected_since: None,
            last: now,
        });
        if e.uid != uid {
            // A new pod under the same name: the old one's proof does not carry over.
            *e = Seen {
                uid,
                streams: 0,
                connected_since: None,
                last: now,
            };
        }
        e.last = now;
        if stream {
            e.streams += 1;
            e.connected_since.get_or_insert(now);
        }
        drop(seen);
        self.changes.send_modify(|v| *v += 1);
        Some(key)
    }

    /// An SDS stream of the token's pod opened; `None` when the token names no pod.
    pub fn stream_opened(self: &Arc<Self>, id: &Identity) -> Option<StreamGuard> {
        let key = self.touch(id, true)?;
        Some(StreamGuard {
            registry: self.clone(),
            key,
        })
    }

    /// The token's pod obtained a certificate.
    pub fn certificate_issued(&self, id: &Identity) {
        self.touch(id, false);
    }

    fn closed(&self, key: &Key) {
        let now = self.clock.now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = seen.get_mut(key) {
            e.streams = e.streams.saturating_sub(1);
            if e.streams == 0 {
                e.connected_since = None;
                e.last = now;
            }
        }
        drop(seen);
        self.changes.send_modify(|v| *v += 1);
    }

    /// Tells every reader to look again (a start-up grace ran out, shared proofs arrived).
    pub fn bump(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// The proofs this replica holds, to publish for the others: a pod with an open stream as
    /// seen at `now` rounded down to the minute (so an unchanged set is not rewritten every
    /// time), the others as last seen.
    pub fn export(&self) -> Vec<SharedProof> {
        let snap = self.local_snapshot();
        let minute = snap.now - Duration::from_secs(u64::from(snap.now.second()));
        let minute = minute.replace_nanosecond(0).unwrap_or(minute);
        let mut out: Vec<SharedProof> = snap
            .seen
            .iter()
            .map(|((cluster, ns, name), s)| SharedProof {
                cluster: cluster.clone(),
                namespace: ns.clone(),
                name: name.clone(),
                uid: s.uid.clone(),
                at: if s.streams > 0 { minute } else { s.last },
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.cluster, &a.namespace, &a.name).cmp(&(&b.cluster, &b.namespace, &b.name))
        });
        out
    }

    /// The proofs `replica` published (replacing what it published before).
    pub fn set_shared(&self, replica: &str, proofs: Vec<SharedProof>) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if proofs.is_empty() {
            shared.remove(replica);
        } else {
            shared.insert(replica.to_owned(), proofs);
        }
        drop(shared);
        self.bump();
    }

    /// Until `t`, a pod with no proof is `Unknown` (its label decides), not `Never`.
    pub fn hold_until(&self, t: OffsetDateTime) {
        *self.hold_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        self.bump();
    }

    fn local_snapshot(&self) -> ProofSnapshot {
        let now = self.clock.now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|_, s| s.streams > 0 || now - s.last <= self.grace);
        ProofSnapshot {
            seen: seen.clone(),
            now,
            grace: self.grace,
            hold_until: None,
        }
    }

    /// The proofs at this instant: this replica's and, where it knows of none newer, those
    /// the other replicas published. Pods with no stream whose grace ran out are forgotten (a
    /// pod meshid does not know is unproven anyway), so the registry does not grow with churn.
    pub fn snapshot(&self) -> ProofSnapshot {
        let mut snap = self.local_snapshot();
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        for p in shared.values().flatten() {
            if snap.now - p.at > self.grace {
                continue;
            }
            let key = (p.cluster.clone(), p.namespace.clone(), p.name.clone());
            match snap.seen.get_mut(&key) {
                Some(s) if s.streams > 0 => {}
                Some(s) if s.uid == p.uid || s.last < p.at => {
                    s.uid = p.uid.clone();
                    s.last = s.last.max(p.at);
                }
                Some(_) => {}
                None => {
                    snap.seen.insert(
                        key,
                        Seen {
                            uid: p.uid.clone(),
                            streams: 0,
                            connected_since: None,
                            last: p.at,
                        },
                    );
                }
            }
        }
        drop(shared);
        snap.hold_until = *self.hold_until.lock().unwrap_or_else(|e| e.into_inner());
        snap
    }
}

/// The registry at one instant.
#[derive(Clone)]
pub struct ProofSnapshot {
    seen: HashMap<Key, Seen>,
    now: OffsetDateTime,
    grace: Duration,
    hold_until: Option<OffsetDateTime>,
}

impl ProofSnapshot {
    /// What EDS depends on, for every pod the registry knows: (cluster, namespace, name, uid,
    /// proven). Changes when a proxy appears or a grace period runs out, not on every renewal.
    pub fn digest(&self) -> Vec<(String, String, String, String, bool)> {
        let mut v: Vec<_> = self
            .seen
            .iter()
            .map(|((cluster, ns, n), s)| {
                (
                    cluster.clone(),
                    ns.clone(),
                    n.clone(),
                    s.uid.clone(),
                    self.held(self.state(s)) != ProxyProof::Never,
                )
            })
            .collect();
        v.sort();
        v
    }

    /// `Never` reads `Unknown` during a start-up grace.
    fn held(&self, p: ProxyProof) -> ProxyProof {
        match p {
            ProxyProof::Never if self.hold_until.is_some_and(|t| self.now < t) => {
                ProxyProof::Unknown
            }
            p => p,
        }
    }

    /// The proof for a pod by name, whatever its UID.
    pub fn proof_of(&self, pod: &PodName<'_>) -> ProxyProof {
        self.proof(pod, None)
    }

    fn state(&self, s: &Seen) -> ProxyProof {
        if let Some(since) = s.connected_since.filter(|_| s.streams > 0) {
            return ProxyProof::Connected { since };
        }
        if self.now - s.last <= self.grace {
            ProxyProof::Recent { at: s.last }
        } else {
            ProxyProof::Never
        }
    }
}

impl ProofLookup for ProofSnapshot {
    fn proof(&self, pod: &PodName<'_>, uid: Option<&str>) -> ProxyProof {
        self.held(match self.seen.get(&pod.key()) {
            Some(s) if uid.is_none_or(|u| u == s.uid) => self.state(s),
            _ => ProxyProof::Never,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        clock::ManualClock,
        identity::{ClusterId, PodRef},
        spiffe::{SpiffeId, TrustDomain},
    };

    fn id(pod: &str, uid: &str) -> Identity {
        let td = TrustDomain::new("cluster.local").unwrap();
        Identity {
            spiffe_id: SpiffeId::for_service_account(&td, "shop", "web").unwrap(),
            namespace: "shop".into(),
            service_account: "web".into(),
            service_account_uid: None,
            pod: Some(PodRef {
                name: pod.into(),
                uid: uid.into(),
            }),
            cluster: ClusterId("Kubernetes".into()),
            expires_at: None,
        }
    }

    fn pod(name: &str) -> PodName<'_> {
        PodName {
            cluster: "Kubernetes",
            namespace: "shop",
            name,
        }
    }

    /// Issue 21: proofs published by another replica prove a pod here until the grace runs
    /// out from when that replica saw it; another UID is not proven by them; during a start-up
    /// grace an unproven pod reads `Unknown` (its label decides), not `Never`.
    #[test]
    fn shared_proofs_and_the_start_up_grace() {
        let clock = Arc::new(ManualClock::new(OffsetDateTime::UNIX_EPOCH));
        let r = ProxyRegistry::new(clock.clone(), Duration::from_secs(60));
        let shared = |uid: &str| SharedProof {
            cluster: "Kubernetes".into(),
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: uid.into(),
            at: OffsetDateTime::UNIX_EPOCH,
        };
        r.set_shared("replica-b", vec![shared("u1")]);
        assert!(matches!(
            r.snapshot().proof(&pod("web-0"), Some("u1")),
            ProxyProof::Recent { .. }
        ));
        assert_eq!(
            r.snapshot().proof(&pod("web-0"), Some("u2")),
            ProxyProof::Never,
            "another pod under the same name"
        );
        clock.advance(Duration::from_secs(61));
        assert_eq!(
            r.snapshot().proof(&pod("web-0"), Some("u1")),
            ProxyProof::Never,
            "grace over"
        );
        // What this replica exports: an open stream as seen now (to the minute).
        let _guard = r.stream_opened(&id("web-1", "u9")).unwrap();
        let out = r.export();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].name.as_str(), out[0].uid.as_str()), ("web-1", "u9"));
        r.set_shared("replica-b", Vec::new());
        r.hold_until(clock.now() + Duration::from_secs(30));
        assert_eq!(
            r.snapshot().proof(&pod("web-0"), Some("u1")),
            ProxyProof::Unknown,
            "start-up grace"
        );
        clock.advance(Duration::from_secs(31));
        assert_eq!(
            r.snapshot().proof(&pod("web-0"), Some("u1")),
            ProxyProof::Never
        );
    }

    /// One row per proof rule.
    #[test]
    fn proof_states() {
        let clock = Arc::new(ManualClock::new(OffsetDateTime::UNIX_EPOCH));
        let r = ProxyRegistry::new(clock.clone(), Duration::from_secs(60));
        assert_eq!(
            r.snapshot().proof(&pod("web-0"), Some("u1")),
            ProxyProof::Never,
            "never seen"
        );
        let guard = r.stream_opened(&id("web-0", "u1")).unwrap();
        assert!(
            matches!(
                r.snapshot().proof(&pod("web-0"), Some("u1")),
                ProxyProof::Connected { .. }
            ),
            "stream open"
        );
        assert_eq!(
            r.snapshot().proof(&pod("web-0"), Some("u2")),
            ProxyProof::Never,
            "a new pod under the same name is not proven by the old one's proxy"
        );
        clock.advance(Duration::from_secs(3600));
        assert!(
            matches!(
                r.snapshot().proof(&pod("web-0"), Some("u1")),
                ProxyProof::Connected { .. }
            ),
            "an open stream needs no grace"
        );
        drop(guard);
        assert!(
            matches!(
                r.snapshot().proof(&pod("web-0"), None),
                ProxyProof::Recent { .. }
            ),
            "closed: within grace"
        );
        clock.advance(Duration::from_secs(61));
        assert_eq!(
            r.snapshot().proof(&pod("web-0"), None),
            ProxyProof::Never,
            "grace over"
        );
        assert!(
            r.snapshot().digest().is_empty(),
            "forgotten once the grace ran out"
        );
        r.certificate_issued(&id("web-1", "u3"));
        assert!(
            matches!(
                r.snapshot().proof(&pod("web-1"), Some("u3")),
                ProxyProof::Recent { .. }
            ),
            "CSR issuance"
        );
        let mut other_cluster = id("web-1", "u3");
        other_cluster.cluster = ClusterId("west".into());
        let other = PodName {
            cluster: "west",
            ..pod("web-1")
        };
        assert_eq!(
            r.snapshot().proof(&other, Some("u3")),
            ProxyProof::Never,
            "a pod of the same name in another cluster is not proven (istiod: a proxy is matched in its own cluster's registry)"
        );
        let _west = r.stream_opened(&other_cluster).unwrap();
        assert!(
            matches!(
                r.snapshot().proof(&other, None),
                ProxyProof::Connected { .. }
            ),
            "its own stream proves it"
        );
        assert!(
            matches!(
                r.snapshot().proof(&pod("web-1"), None),
                ProxyProof::Recent { .. }
            ),
            "and leaves this cluster's pod of that name as it was"
        );
        let mut no_pod = id("x", "y");
        no_pod.pod = None;
        assert!(
            r.stream_opened(&no_pod).is_none(),
            "a token without a pod proves nothing"
        );
    }
}
