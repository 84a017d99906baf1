//! The objects a projected token is bound to — its pod and its service account — as meshid's own
//! metadata-only watch sees them, so a token can be judged without a TokenReview call.
//!
//! The rule is kube-apiserver's (`pkg/serviceaccount/claims.go`, `validator.Validate`): the bound
//! object exists under the claim's name with the claim's UID, and was not deleted more than the
//! leeway (go-jose's `DefaultLeeway`, 60 s) ago. The cache answers only what it knows:
//! - `Live`: seen, same UID, not deleted beyond the leeway;
//! - `Gone`: that UID was deleted (a watch `DELETED`, a replaced object, or missing from a
//!   re-list), or its deletion is older than the leeway;
//! - `Unknown`: not synced (no complete list yet, or the watch broke and has not re-listed), or
//!   never seen (a pod created a moment ago, or deleted before meshid started): TokenReview decides.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Pod, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    api::Api,
    core::PartialObjectMeta,
    runtime::watcher::{self, watcher, Event},
    Resource,
};
use time::OffsetDateTime;

use crate::backoff::Backoff;

/// kube-apiserver's tolerance for a bound object awaiting removal (`invalidIfDeletedBefore :=
/// now - jwt.DefaultLeeway`).
pub const DELETION_LEEWAY: Duration = Duration::from_secs(60);

/// Deleted UIDs remembered; older ones fall back to TokenReview (which refuses them too).
const MAX_GONE: usize = 100_000;

/// What the cache says about one bound object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Live,
    /// Refused, with the reason.
    Gone(String),
    /// The cache cannot tell, with the reason: ask TokenReview.
    Unknown(&'static str),
}

/// The kind of a bound object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pod,
    ServiceAccount,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Pod => "pod",
            Kind::ServiceAccount => "service account",
        })
    }
}

#[derive(Clone, Debug)]
struct Live {
    uid: String,
    /// `metadata.deletionTimestamp` (unix seconds): when a terminating object goes.
    deleting_at: Option<i64>,
}

type Key = (String, String);

/// Objects by namespace, then name: looked up by `&str` on every token and cache hit, with no
/// allocation.
#[derive(Default)]
struct ByName(HashMap<String, HashMap<String, Live>>);

impl ByName {
    fn get(&self, ns: &str, name: &str) -> Option<&Live> {
        self.0.get(ns)?.get(name)
    }

    fn insert(&mut self, (ns, name): Key, live: Live) -> Option<Live> {
        self.0.entry(ns).or_default().insert(name, live)
    }

    fn remove(&mut self, ns: &str, name: &str) {
        if let Some(names) = self.0.get_mut(ns) {
            names.remove(name);
            if names.is_empty() {
                self.0.remove(ns);
            }
        }
    }

    fn values(&self) -> impl Iterator<Item = &Live> {
        self.0.values().flat_map(|names| names.values())
    }
}

/// One kind's objects, by namespace and name.
#[derive(Default)]
struct Objects {
    synced: bool,
    live: ByName,
    gone: HashSet<String>,
    gone_order: VecDeque<String>,
    /// A re-list in progress (between the watcher's `Init` and `InitDone`).
    relist: Option<ByName>,
}

impl Objects {
    fn forget(&mut self, uid: String) {
        if self.gone.insert(uid.clone()) {
            self.gone_order.push_back(uid);
            while self.gone_order.len() > MAX_GONE {
                if let Some(old) = self.gone_order.pop_front() {
                    self.gone.remove(&old);
                }
            }
        }
    }

    fn apply(&mut self, key: Key, live: Live) {
        if let Some(old) = self.live.insert(key, live.clone()) {
            if old.uid != live.uid {
                self.forget(old.uid);
            }
        }
    }

    fn delete(&mut self, (ns, name): &Key, uid: &str) {
        if self.live.get(ns, name).is_some_and(|l| l.uid == uid) {
            self.live.remove(ns, name);
        }
        self.forget(uid.to_owned());
    }

    /// A complete list replaces the objects; whatever it lacks was deleted meanwhile.
    fn relisted(&mut self, listed: ByName) {
        let still: HashSet<&str> = listed.values().map(|l| l.uid.as_str()).collect();
        let lost: Vec<String> = self
            .live
            .values()
            .filter(|l| !still.contains(l.uid.as_str()))
            .map(|l| l.uid.clone())
            .collect();
        for uid in lost {
            self.forget(uid);
        }
        self.live = listed;
        self.synced = true;
    }

    fn judge(&self, kind: Kind, ns: &str, name: &str, uid: &str, now: OffsetDateTime) -> Verdict {
        if !self.synced {
            return Verdict::Unknown("the watch has no complete list");
        }
        if self.gone.contains(uid) {
            return Verdict::Gone(format!("{kind} {ns}/{name} (uid {uid}) was deleted"));
        }
        match self.live.get(ns, name) {
            Some(l) if l.uid == uid => {
                let limit = now - DELETION_LEEWAY;
                match l.deleting_at {
                    Some(at) if at < limit.unix_timestamp() => Verdict::Gone(format!(
                        "{kind} {ns}/{name} was deleted at {} and awaits removal",
                        OffsetDateTime::from_unix_timestamp(at)
                            .map(crate::clock::rfc3339)
                            .unwrap_or_else(|_| at.to_string())
                    )),
                    _ => Verdict::Live,
                }
            }
            // Another object of that name, or none: the watch may lag a recreation.
            Some(_) => Verdict::Unknown("another object has that name in the watch"),
            None => Verdict::Unknown("not seen by the watch"),
        }
    }
}

fn entry(meta: &ObjectMeta) -> Option<(Key, Live)> {
    let key = (meta.namespace.clone()?, meta.name.clone()?);
    let live = Live {
        uid: meta.uid.clone()?,
        deleting_at: meta.deletion_timestamp.as_ref().map(|t| t.0.as_second()),
    };
    Some((key, live))
}

/// The pods and service accounts of one cluster, from meshid's own watches.
#[derive(Default)]
pub struct BoundObjects {
    pods: RwLock<Objects>,
    accounts: RwLock<Objects>,
    tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Drop for BoundObjects {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

impl BoundObjects {
    /// Watches every namespace's pods and service accounts (metadata only) through `client`.
    /// The watches stop when the returned value is dropped.
    pub fn watch(client: kube::Client) -> Arc<Self> {
        let this = Arc::new(Self::default());
        let pods = tokio::spawn(run::<Pod>(Arc::downgrade(&this), client.clone(), Kind::Pod));
        let accounts = tokio::spawn(run::<ServiceAccount>(
            Arc::downgrade(&this),
            client,
            Kind::ServiceAccount,
        ));
        this.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([pods.abort_handle(), accounts.abort_handle()]);
        this
    }

    fn objects(&self, kind: Kind) -> &RwLock<Objects> {
        match kind {
            Kind::Pod => &self.pods,
            Kind::ServiceAccount => &self.accounts,
        }
    }

    /// Whether both watches hold a complete list.
    pub fn synced(&self) -> bool {
        [Kind::Pod, Kind::ServiceAccount].iter().all(|k| {
            self.objects(*k)
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .synced
        })
    }

    /// What the cache says of the `kind` object `ns/name` with `uid` at `now`.
    pub fn judge(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        uid: &str,
        now: OffsetDateTime,
    ) -> Verdict {
        self.objects(kind)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .judge(kind, ns, name, uid, now)
    }

    /// What the cache says of a token's binding in namespace `ns`: its service account and its
    /// pod, each `(name, uid)` where known. Gone when either is gone; Live when every one given is
    /// live; Unknown otherwise (or when none is given).
    pub fn judge_binding(
        &self,
        ns: &str,
        account: Option<(&str, &str)>,
        pod: Option<(&str, &str)>,
        now: OffsetDateTime,
    ) -> Verdict {
        let given = [(Kind::ServiceAccount, account), (Kind::Pod, pod)]
            .into_iter()
            .filter_map(|(kind, o)| o.map(|(name, uid)| (kind, name, uid)));
        let mut verdict = Verdict::Unknown("nothing to judge");
        for (i, (kind, name, uid)) in given.enumerate() {
            match self.judge(kind, ns, name, uid, now) {
                gone @ Verdict::Gone(_) => return gone,
                unknown @ Verdict::Unknown(_) => verdict = unknown,
                // Live only if every one before was live too.
                Verdict::Live if i == 0 => verdict = Verdict::Live,
                Verdict::Live => {}
            }
        }
        verdict
    }

    /// Applies one watch event (public for tests that feed events by hand).
    pub fn on_event(&self, kind: Kind, event: Event<ObjectMeta>) {
        let mut o = self
            .objects(kind)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Init => o.relist = Some(ByName::default()),
            Event::InitApply(meta) => {
                if let (Some((key, live)), Some(buf)) = (entry(&meta), o.relist.as_mut()) {
                    buf.insert(key, live);
                }
            }
            Event::InitDone => {
                let listed = o.relist.take().unwrap_or_default();
                o.relisted(listed);
            }
            Event::Apply(meta) => {
                if let Some((key, live)) = entry(&meta) {
                    o.apply(key, live);
                }
            }
            Event::Delete(meta) => {
                if let Some((key, live)) = entry(&meta) {
                    o.delete(&key, &live.uid);
                }
            }
        }
    }

    /// The watch broke: nothing is judged locally until it has re-listed.
    pub fn on_error(&self, kind: Kind) {
        let mut o = self
            .objects(kind)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        o.synced = false;
        o.relist = None;
    }
}

/// Runs one kind's watch until the cache is dropped. On an error the watcher is started afresh,
/// so it re-lists (kube's watcher would resume from its last resourceVersion with no list, and
/// the cache could not tell when it is current again).
async fn run<K>(cache: std::sync::Weak<BoundObjects>, client: kube::Client, kind: Kind)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<PartialObjectMeta<K>> = Api::all(client);
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        let mut events = std::pin::pin!(watcher(api.clone(), watcher::Config::default()));
        while let Some(item) = events.next().await {
            let Some(cache) = cache.upgrade() else { return };
            match item {
                Ok(event) => {
                    if matches!(event, Event::InitDone) {
                        backoff.succeeded();
                    }
                    cache.on_event(kind, metadata_of(event));
                }
                Err(e) => {
                    tracing::warn!(%kind, error = %e, "bound-object watch failed; tokens go to TokenReview until it has re-listed");
                    cache.on_error(kind);
                    break;
                }
            }
        }
        if cache.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff.failed()).await;
    }
}

fn metadata_of<K>(event: Event<PartialObjectMeta<K>>) -> Event<ObjectMeta> {
    match event {
        Event::Apply(o) => Event::Apply(o.metadata),
        Event::Delete(o) => Event::Delete(o.metadata),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(o.metadata),
        Event::InitDone => Event::InitDone,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn meta(ns: &str, name: &str, uid: &str, deleting_at: Option<i64>) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            deletion_timestamp: deleting_at
                .map(|s| Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap())),
            ..Default::default()
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn synced_with(objects: &[ObjectMeta]) -> BoundObjects {
        let b = BoundObjects::default();
        b.on_event(Kind::Pod, Event::Init);
        for o in objects {
            b.on_event(Kind::Pod, Event::InitApply(o.clone()));
        }
        b.on_event(Kind::Pod, Event::InitDone);
        b
    }

    fn judge(b: &BoundObjects, name: &str, uid: &str) -> Verdict {
        b.judge(Kind::Pod, "shop", name, uid, now())
    }

    #[test]
    fn nothing_is_judged_before_a_complete_list() {
        let b = BoundObjects::default();
        b.on_event(Kind::Pod, Event::Init);
        b.on_event(Kind::Pod, Event::InitApply(meta("shop", "p", "u1", None)));
        assert!(matches!(judge(&b, "p", "u1"), Verdict::Unknown(_)));
        b.on_event(Kind::Pod, Event::InitDone);
        assert_eq!(judge(&b, "p", "u1"), Verdict::Live);
        assert!(!b.synced(), "service accounts have not listed yet");
    }

    /// kube `claims.go` `validator.Validate`: the bound pod must exist with the claim's UID.
    #[test]
    fn a_deleted_pod_is_gone_and_an_unseen_one_unknown() {
        let b = synced_with(&[meta("shop", "p", "u1", None)]);
        assert!(matches!(judge(&b, "q", "u9"), Verdict::Unknown(_)));
        b.on_event(Kind::Pod, Event::Delete(meta("shop", "p", "u1", None)));
        match judge(&b, "p", "u1") {
            Verdict::Gone(why) => assert!(why.contains("shop/p") && why.contains("u1"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// A StatefulSet pod recreated under its name: the old UID is gone, the new one live; a UID
    /// the watch never saw under a known name is left to TokenReview (the watch may lag).
    #[test]
    fn a_recreated_pod_retires_the_old_uid() {
        let b = synced_with(&[meta("shop", "p", "u1", None)]);
        assert!(matches!(judge(&b, "p", "u2"), Verdict::Unknown(_)));
        b.on_event(Kind::Pod, Event::Apply(meta("shop", "p", "u2", None)));
        assert!(matches!(judge(&b, "p", "u1"), Verdict::Gone(_)));
        assert_eq!(judge(&b, "p", "u2"), Verdict::Live);
    }

    /// `pod.DeletionTimestamp.Time.Before(now - jwt.DefaultLeeway)`: a terminating pod keeps its
    /// token through its grace period and 60 s beyond.
    #[test]
    fn a_terminating_pod_stays_live_until_the_leeway_after_its_deletion_time() {
        let t = now().unix_timestamp();
        let b = synced_with(&[
            meta("shop", "graceful", "u1", Some(t + 30)),
            meta("shop", "recent", "u2", Some(t - 59)),
            meta("shop", "stuck", "u3", Some(t - 61)),
        ]);
        assert_eq!(judge(&b, "graceful", "u1"), Verdict::Live);
        assert_eq!(judge(&b, "recent", "u2"), Verdict::Live);
        assert!(matches!(judge(&b, "stuck", "u3"), Verdict::Gone(_)));
    }

    /// After a broken watch nothing is judged until the re-list; what the re-list lacks was
    /// deleted meanwhile.
    #[test]
    fn a_relist_after_an_error_retires_what_it_lacks() {
        let b = synced_with(&[meta("shop", "p", "u1", None), meta("shop", "q", "u2", None)]);
        b.on_error(Kind::Pod);
        assert!(matches!(judge(&b, "p", "u1"), Verdict::Unknown(_)));
        b.on_event(Kind::Pod, Event::Init);
        b.on_event(Kind::Pod, Event::InitApply(meta("shop", "q", "u2", None)));
        b.on_event(Kind::Pod, Event::InitDone);
        assert!(matches!(judge(&b, "p", "u1"), Verdict::Gone(_)));
        assert_eq!(judge(&b, "q", "u2"), Verdict::Live);
    }

    /// A token's binding: gone if its account or its pod is, live only if both are.
    #[test]
    fn a_binding_is_live_only_when_its_account_and_pod_are() {
        let b = synced_with(&[meta("shop", "p", "u1", None)]);
        b.on_event(Kind::ServiceAccount, Event::Init);
        b.on_event(
            Kind::ServiceAccount,
            Event::InitApply(meta("shop", "sa", "s1", None)),
        );
        b.on_event(Kind::ServiceAccount, Event::InitDone);
        let judge = |account, pod| b.judge_binding("shop", account, pod, now());
        assert_eq!(judge(Some(("sa", "s1")), Some(("p", "u1"))), Verdict::Live);
        assert_eq!(judge(Some(("sa", "s1")), None), Verdict::Live);
        assert!(matches!(
            judge(Some(("sa", "s1")), Some(("q", "u9"))),
            Verdict::Unknown(_)
        ));
        assert!(matches!(
            judge(Some(("other", "s9")), Some(("p", "u1"))),
            Verdict::Unknown(_)
        ));
        assert!(matches!(judge(None, None), Verdict::Unknown(_)));
        b.on_event(Kind::Pod, Event::Delete(meta("shop", "p", "u1", None)));
        assert!(matches!(
            judge(Some(("other", "s9")), Some(("p", "u1"))),
            Verdict::Gone(_)
        ));
    }

    #[test]
    fn kinds_are_kept_apart() {
        let b = synced_with(&[meta("shop", "x", "u1", None)]);
        b.on_event(Kind::ServiceAccount, Event::Init);
        b.on_event(Kind::ServiceAccount, Event::InitDone);
        assert!(b.synced());
        assert!(matches!(
            b.judge(Kind::ServiceAccount, "shop", "x", "u1", now()),
            Verdict::Unknown(_)
        ));
    }

    #[test]
    fn remembered_deletions_are_bounded() {
        let b = synced_with(&[]);
        for i in 0..MAX_GONE + 10 {
            b.on_event(
                Kind::Pod,
                Event::Delete(meta("shop", "p", &format!("u{i}"), None)),
            );
        }
        let o = b.pods.read().unwrap();
        assert_eq!(o.gone.len(), MAX_GONE);
        assert!(!o.gone.contains("u0") && o.gone.contains(&format!("u{}", MAX_GONE + 9)));
    }
}
