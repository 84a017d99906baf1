//! The live source: Pods, EndpointSlices, Services, Namespaces, PeerAuthentications,
//! DestinationRules, ServiceEntries and WorkloadEntries through `kube` watchers into reflector
//! stores; every change re-publishes the objects (debounced), so a pod gaining its sidecar
//! label reaches EDS streams within a second.
//! Istio's CRDs may be absent: their watchers retry in the background and count as empty.

use std::{fmt::Debug, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams},
    runtime::{reflector, watcher, WatchStreamExt},
    Resource,
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    multicluster::RemoteObjects, DestinationRule, DiscoveryError, MeshObjects, PeerAuthentication,
    ServiceEntry, WorkloadEntry,
};

fn peer_auth_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", "v1", "PeerAuthentication"),
        "peerauthentications",
    )
}

fn dest_rule_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1", "DestinationRule"),
        "destinationrules",
    )
}

fn service_entry_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1", "ServiceEntry"),
        "serviceentries",
    )
}

fn workload_entry_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1", "WorkloadEntry"),
        "workloadentries",
    )
}

fn from_dynamic<T: DeserializeOwned>(objs: impl IntoIterator<Item = Arc<DynamicObject>>) -> Vec<T> {
    objs.into_iter()
        .filter_map(|o| {
            let v = serde_json::to_value(o.as_ref()).ok()?;
            serde_json::from_value(v)
                .map_err(
                    |e| tracing::warn!(error = %e, "skipping an Istio object that does not parse"),
                )
                .ok()
        })
        .collect()
}

/// Runs a watcher into a store, poking `notify` on every event.
fn watch_into<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    notify: mpsc::Sender<()>,
    what: &'static str,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash,
{
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    let _ = notify.try_send(());
                }
                Err(e) => tracing::debug!(kind = what, error = %e, "watch error; retrying"),
            }
        }
    })
}

/// The remote clusters the live source merges, and the channel their watchers poke.
pub struct MultiCluster {
    pub remotes: super::multicluster::Remotes,
    pub notify: mpsc::Sender<()>,
    changes: mpsc::Receiver<()>,
}

impl MultiCluster {
    /// No remote clusters yet.
    pub fn new() -> Self {
        let (notify, changes) = mpsc::channel(1);
        Self {
            remotes: Default::default(),
            notify,
            changes,
        }
    }

    /// Watches the remote cluster `name` through `client`.
    pub fn add(&self, name: &str, client: kube::Client) {
        let r = super::multicluster::Remote::start(name, client, self.notify.clone());
        self.remotes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), r);
    }
}

impl Default for MultiCluster {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts the watchers; the returned objects are re-published on every change (debounced)
/// until `stop` fires.
pub fn start_kube_source(
    client: kube::Client,
    mc: MultiCluster,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<Arc<MeshObjects>>, Vec<JoinHandle<()>>) {
    let MultiCluster {
        remotes,
        notify,
        mut changes,
    } = mc;
    let (stores, mut tasks) = Stores::watch(client, &notify);
    let (tx, rx) = watch::channel(Arc::new(MeshObjects::default()));
    let watchers: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    tasks.push(tokio::spawn(async move {
        // Nothing is published until the kinds every decision needs have had their first full
        // list, as istiod serves only once its informers have synced (`HasSynced`): otherwise
        // an endpoint could be served before its pod, without its sidecar label, and a client
        // would pick plaintext toward a sidecar. (Istio's CRDs may be absent from a cluster,
        // so their kinds are not waited for.)
        if core_synced(stores.core_ready(), &mut stop).await {
            loop {
                tokio::select! {
                    c = changes.recv() => if c.is_none() { break },
                    _ = stop.wait_for(|s| *s) => break,
                }
                // Let a burst of events settle into one rebuild.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while changes.try_recv().is_ok() {}
                let remotes: Vec<_> = (remotes.lock().unwrap_or_else(|e| e.into_inner()))
                    .values()
                    .map(super::multicluster::Remote::objects)
                    .collect();
                tx.send_replace(Arc::new(stores.objects(remotes)));
            }
        }
        for w in watchers {
            w.abort();
        }
    }));
    (rx, tasks)
}

/// The reflector stores of every kind discovery reads, filled by one watch each.
struct Stores {
    pods: reflector::Store<Pod>,
    services: reflector::Store<Service>,
    slices: reflector::Store<EndpointSlice>,
    namespaces: reflector::Store<Namespace>,
    peer_auths: reflector::Store<DynamicObject>,
    dest_rules: reflector::Store<DynamicObject>,
    service_entries: reflector::Store<DynamicObject>,
    workload_entries: reflector::Store<DynamicObject>,
}

impl Stores {
    /// Starts a watch per kind; each change wakes `notify`.
    fn watch(client: kube::Client, notify: &mpsc::Sender<()>) -> (Self, Vec<JoinHandle<()>>) {
        let (pods, pw) = reflector::store::<Pod>();
        let (services, sw) = reflector::store::<Service>();
        let (slices, ew) = reflector::store::<EndpointSlice>();
        let (namespaces, nw) = reflector::store::<Namespace>();
        let dynamic = |ar: ApiResource| {
            let w = reflector::store::Writer::<DynamicObject>::new(ar.clone());
            (
                w.as_reader(),
                w,
                Api::<DynamicObject>::all_with(client.clone(), &ar),
            )
        };
        let (peer_auths, paw, pa_api) = dynamic(peer_auth_resource());
        let (dest_rules, drw, dr_api) = dynamic(dest_rule_resource());
        let (service_entries, sew, se_api) = dynamic(service_entry_resource());
        let (workload_entries, wew, we_api) = dynamic(workload_entry_resource());
        let n = || notify.clone();
        let tasks = vec![
            watch_into(Api::<Pod>::all(client.clone()), pw, n(), "Pod"),
            watch_into(Api::<Service>::all(client.clone()), sw, n(), "Service"),
            watch_into(
                Api::<EndpointSlice>::all(client.clone()),
                ew,
                n(),
                "EndpointSlice",
            ),
            watch_into(Api::<Namespace>::all(client.clone()), nw, n(), "Namespace"),
            watch_into(pa_api, paw, n(), "PeerAuthentication"),
            watch_into(dr_api, drw, n(), "DestinationRule"),
            watch_into(se_api, sew, n(), "ServiceEntry"),
            watch_into(we_api, wew, n(), "WorkloadEntry"),
        ];
        let stores = Self {
            pods,
            services,
            slices,
            namespaces,
            peer_auths,
            dest_rules,
            service_entries,
            workload_entries,
        };
        (stores, tasks)
    }

    /// The first full list of each kind every decision needs.
    fn core_ready(&self) -> [(&'static str, Ready<'_>); 4] {
        [
            ("Pod", Box::pin(self.pods.wait_until_ready())),
            ("Service", Box::pin(self.services.wait_until_ready())),
            ("EndpointSlice", Box::pin(self.slices.wait_until_ready())),
            ("Namespace", Box::pin(self.namespaces.wait_until_ready())),
        ]
    }

    /// What the stores hold now, with the remote clusters' objects.
    fn objects(&self, remotes: Vec<RemoteObjects>) -> MeshObjects {
        fn all<K: Clone + kube::Resource>(s: &reflector::Store<K>) -> Vec<K>
        where
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            s.state().iter().map(|k| k.as_ref().clone()).collect()
        }
        MeshObjects {
            pods: all(&self.pods),
            services: all(&self.services),
            endpoint_slices: all(&self.slices),
            namespaces: all(&self.namespaces),
            peer_authentications: from_dynamic(self.peer_auths.state()),
            destination_rules: from_dynamic(self.dest_rules.state()),
            service_entries: from_dynamic(self.service_entries.state()),
            workload_entries: from_dynamic(self.workload_entries.state()),
            remotes,
            ignored_kinds: Vec::new(),
        }
    }
}

/// A store's first full list, as `Store::wait_until_ready` gives it.
type Ready<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), reflector::store::WriterDropped>> + Send + 'a>,
>;

/// Waits until every store in `kinds` has had its first full list (true), or `stop` fires
/// (false). Every 10 s it warns which kinds are still missing, since discovery serves nothing
/// until then: an API server that refuses to list them (RBAC) shows up here.
async fn core_synced<const N: usize>(
    kinds: [(&'static str, Ready<'_>); N],
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let mut pending: Vec<&str> = kinds.iter().map(|(k, _)| *k).collect();
    let mut waits: futures::stream::FuturesUnordered<_> = kinds
        .into_iter()
        .map(|(kind, ready)| async move {
            let _ = ready.await;
            kind
        })
        .collect();
    let mut warn = tokio::time::interval(Duration::from_secs(10));
    warn.tick().await;
    loop {
        tokio::select! {
            Some(kind) = waits.next() => {
                pending.retain(|k| *k != kind);
                if pending.is_empty() {
                    return true;
                }
            }
            _ = warn.tick() => tracing::warn!(
                kinds = ?pending,
                "discovery serves no endpoints until these kinds have been listed once; check that the API server answers and RBAC allows list and watch"
            ),
            _ = stop.wait_for(|s| *s) => return false,
        }
    }
}

/// Lists every object once (for `meshid describe --kubeconfig`). Absent Istio CRDs are empty.
pub async fn list_all(client: kube::Client) -> Result<MeshObjects, DiscoveryError> {
    async fn typed<K>(api: Api<K>) -> Result<Vec<K>, DiscoveryError>
    where
        K: Resource + Clone + DeserializeOwned + Debug,
    {
        api.list(&ListParams::default())
            .await
            .map(|l| l.items)
            .map_err(|e| {
                DiscoveryError::NotADocument(format!("listing {}: {e}", std::any::type_name::<K>()))
            })
    }
    async fn dynamic<T: DeserializeOwned>(
        client: kube::Client,
        ar: ApiResource,
    ) -> Result<Vec<T>, DiscoveryError> {
        match Api::<DynamicObject>::all_with(client, &ar)
            .list(&ListParams::default())
            .await
        {
            Ok(l) => Ok(from_dynamic(l.items.into_iter().map(Arc::new))),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()), // Istio not installed
            Err(e) => Err(DiscoveryError::NotADocument(format!(
                "listing {}: {e}",
                ar.plural
            ))),
        }
    }
    Ok(MeshObjects {
        pods: typed(Api::<Pod>::all(client.clone())).await?,
        services: typed(Api::<Service>::all(client.clone())).await?,
        endpoint_slices: typed(Api::<EndpointSlice>::all(client.clone())).await?,
        namespaces: typed(Api::<Namespace>::all(client.clone())).await?,
        peer_authentications: dynamic::<PeerAuthentication>(client.clone(), peer_auth_resource())
            .await?,
        destination_rules: dynamic::<DestinationRule>(client.clone(), dest_rule_resource()).await?,
        service_entries: dynamic::<ServiceEntry>(client.clone(), service_entry_resource()).await?,
        workload_entries: dynamic::<WorkloadEntry>(client, workload_entry_resource()).await?,
        remotes: Vec::new(),
        ignored_kinds: Vec::new(),
    })
}
