//! Multi-cluster discovery: pods, services and endpointslices from other clusters' API servers,
//! merged per service hostname as Istio does (a service `name.ns` is one service whose endpoints
//! come from every cluster that has it; policies come from the primary cluster). Remote clusters
//! come from `discovery.clusters` (a kubeconfig each) or from Istio's remote secrets (Secrets in
//! the root namespace labelled `istio/multiCluster=true`, one kubeconfig per data key, the key
//! being the cluster's name). When a remote API server goes away its last known endpoints stay,
//! marked stale, and the other clusters carry on.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::Api,
    runtime::{reflector, watcher, WatchStreamExt},
    Resource,
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinHandle};

/// What one remote cluster contributes.
#[derive(Clone, Debug, Default)]
pub struct RemoteObjects {
    pub name: String,
    /// Its API server cannot be reached: these are the last known objects.
    pub stale: bool,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
}

/// The label Istio's remote secrets carry.
pub const REMOTE_SECRET_LABEL: &str = "istio/multiCluster=true";

/// One remote cluster's watchers.
pub struct Remote {
    name: String,
    stale: Arc<AtomicBool>,
    pods: reflector::Store<Pod>,
    services: reflector::Store<Service>,
    slices: reflector::Store<EndpointSlice>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn watch_remote<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    notify: mpsc::Sender<()>,
    stale: Arc<AtomicBool>,
    cluster: String,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Default + Eq + std::hash::Hash,
{
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let was = stale.load(Ordering::SeqCst);
            let now = event.is_err();
            if let Err(e) = &event {
                tracing::debug!(cluster, error = %e, "remote cluster watch error; keeping its last endpoints");
            }
            if was != now {
                stale.store(now, Ordering::SeqCst);
                if now {
                    tracing::warn!(
                        cluster,
                        "remote cluster unreachable: its endpoints are kept, marked stale"
                    );
                } else {
                    tracing::info!(cluster, "remote cluster reachable again");
                }
            }
            let _ = notify.try_send(());
        }
    })
}

impl Remote {
    /// Starts watching `client`'s pods, services and endpointslices; `notify` on every change.
    pub fn start(name: &str, client: kube::Client, notify: mpsc::Sender<()>) -> Self {
        let stale = Arc::new(AtomicBool::new(false));
        let (pods, pw) = reflector::store::<Pod>();
        let (services, sw) = reflector::store::<Service>();
        let (slices, ew) = reflector::store::<EndpointSlice>();
        let tasks = vec![
            watch_remote(
                Api::all(client.clone()),
                pw,
                notify.clone(),
                stale.clone(),
                name.into(),
            ),
            watch_remote(
                Api::all(client.clone()),
                sw,
                notify.clone(),
                stale.clone(),
                name.into(),
            ),
            watch_remote(Api::all(client), ew, notify, stale.clone(), name.into()),
        ];
        Self {
            name: name.to_owned(),
            stale,
            pods,
            services,
            slices,
            tasks,
        }
    }

    /// The cluster's objects now.
    pub fn objects(&self) -> RemoteObjects {
        RemoteObjects {
            name: self.name.clone(),
            stale: self.stale.load(Ordering::SeqCst),
            pods: self
                .pods
                .state()
                .iter()
                .map(|p| p.as_ref().clone())
                .collect(),
            services: self
                .services
                .state()
                .iter()
                .map(|p| p.as_ref().clone())
                .collect(),
            endpoint_slices: self
                .slices
                .state()
                .iter()
                .map(|p| p.as_ref().clone())
                .collect(),
        }
    }
}

/// Every remote cluster by name (configured ones and those from remote secrets).
pub type Remotes = Arc<Mutex<BTreeMap<String, Remote>>>;

/// A kube client from kubeconfig YAML (a remote secret's value).
pub async fn client_from_yaml(yaml: &str) -> Result<kube::Client, String> {
    let kc = kube::config::Kubeconfig::from_yaml(yaml).map_err(|e| e.to_string())?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| e.to_string())?;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// Watches Istio's remote secrets in `namespace` and keeps `remotes` in line with them: a
/// cluster appears with its secret and goes with it. `configured` names are left alone.
pub fn watch_remote_secrets(
    client: kube::Client,
    namespace: &str,
    remotes: Remotes,
    configured: Vec<String>,
    notify: mpsc::Sender<()>,
) -> JoinHandle<()> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    tokio::spawn(async move {
        let (store, writer) = reflector::store::<Secret>();
        let stream = watcher(api, watcher::Config::default().labels(REMOTE_SECRET_LABEL))
            .default_backoff()
            .reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if event.is_err() {
                continue;
            }
            let mut wanted: BTreeMap<String, String> = BTreeMap::new();
            for s in store.state() {
                for (cluster, v) in s.data.iter().flatten() {
                    match String::from_utf8(v.0.clone()) {
                        Ok(yaml) => {
                            wanted.insert(cluster.clone(), yaml);
                        }
                        Err(_) => tracing::warn!(
                            secret = s.metadata.name.as_deref().unwrap_or(""),
                            cluster,
                            "remote secret value is not a kubeconfig (not UTF-8); ignored"
                        ),
                    }
                }
            }
            let present: Vec<String> = remotes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned()
                .collect();
            for gone in present
                .iter()
                .filter(|n| !wanted.contains_key(*n) && !configured.contains(n))
            {
                remotes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(gone);
                tracing::info!(cluster = gone, "remote secret removed: cluster dropped");
            }
            for (cluster, yaml) in wanted {
                if present.contains(&cluster) {
                    continue;
                }
                match client_from_yaml(&yaml).await {
                    Ok(c) => {
                        tracing::info!(cluster, "remote secret: watching cluster");
                        let r = Remote::start(&cluster, c, notify.clone());
                        remotes
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(cluster, r);
                    }
                    Err(e) => {
                        tracing::warn!(cluster, error = %e, "remote secret: kubeconfig unusable")
                    }
                }
            }
            let _ = notify.try_send(());
        }
    })
}
