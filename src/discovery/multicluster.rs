//! Multi-cluster discovery: pods, services and endpointslices from other clusters' API servers,
//! merged per service hostname as Istio does (a service `name.ns` is one service whose endpoints
//! come from every cluster that has it; policies come from the primary cluster). Remote clusters
//! come from `discovery.clusters` (a kubeconfig each) or from Istio's remote secrets (Secrets in
//! the root namespace labelled `istio/multiCluster=true`, one kubeconfig per data key, the key
//! being the cluster's name). When a remote API server goes away its last known endpoints stay,
//! marked stale, and the other clusters carry on. A remote secret's kubeconfig passes
//! [`KubeconfigPolicy`] before any client is built from it.

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

use super::kubeconfig::KubeconfigPolicy;
use crate::telemetry::Metrics;

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

/// What follows Istio's remote secrets needs.
pub struct RemoteSecrets {
    /// The primary cluster, where the secrets live.
    pub client: kube::Client,
    /// Istio's root namespace.
    pub namespace: String,
    pub remotes: Remotes,
    /// Clusters from `discovery.clusters`: a secret never replaces or drops them.
    pub configured: Vec<String>,
    pub notify: mpsc::Sender<()>,
    /// Which unsafe kubeconfig options the operator allows.
    pub policy: KubeconfigPolicy,
    pub metrics: Arc<Metrics>,
}

/// One cluster's kubeconfig and the Secret it came from.
struct Wanted {
    secret: String,
    yaml: String,
}

/// Watches Istio's remote secrets and keeps `remotes` in line with them: a cluster appears
/// with its secret, is rebuilt when its kubeconfig changes (istiod replaces the cluster), and
/// goes with it. A kubeconfig refused by the policy is logged and counted once per content
/// (`meshid_discovery_remote_secret_refused_total`) and builds no client.
pub fn watch_remote_secrets(rs: RemoteSecrets) -> JoinHandle<()> {
    let api: Api<Secret> = Api::namespaced(rs.client.clone(), &rs.namespace);
    tokio::spawn(async move {
        let (store, writer) = reflector::store::<Secret>();
        let stream = watcher(api, watcher::Config::default().labels(REMOTE_SECRET_LABEL))
            .default_backoff()
            .reflect(writer);
        futures::pin_mut!(stream);
        // The kubeconfig each cluster runs on, and the ones refused (not retried until changed).
        let mut running: BTreeMap<String, String> = BTreeMap::new();
        let mut refused: BTreeMap<String, String> = BTreeMap::new();
        while let Some(event) = stream.next().await {
            if event.is_err() {
                continue;
            }
            let wanted = wanted_clusters(&store.state());
            rs.drop_gone(&wanted, &mut running);
            refused.retain(|c, _| wanted.contains_key(c));
            for (cluster, w) in wanted {
                if rs.configured.contains(&cluster)
                    || running.get(&cluster) == Some(&w.yaml)
                    || refused.get(&cluster) == Some(&w.yaml)
                {
                    continue;
                }
                match rs.policy.client(&w.yaml).await {
                    Ok(c) => {
                        tracing::info!(
                            cluster,
                            secret = w.secret,
                            "remote secret: watching cluster"
                        );
                        let r = Remote::start(&cluster, c, rs.notify.clone());
                        rs.lock().insert(cluster.clone(), r);
                        refused.remove(&cluster);
                        running.insert(cluster, w.yaml);
                    }
                    Err(e) => {
                        tracing::warn!(cluster, secret = w.secret, namespace = rs.namespace, error = %e, "remote secret refused: its kubeconfig is not used");
                        rs.metrics
                            .remote_secret_refused
                            .get_or_create(&vec![
                                ("secret".to_owned(), w.secret.clone()),
                                ("cluster".to_owned(), cluster.clone()),
                                ("reason".to_owned(), e.reason().to_owned()),
                            ])
                            .inc();
                        if rs.lock().remove(&cluster).is_some() {
                            tracing::warn!(
                                cluster,
                                "remote cluster dropped: its new kubeconfig was refused"
                            );
                        }
                        running.remove(&cluster);
                        refused.insert(cluster, w.yaml);
                    }
                }
            }
            let _ = rs.notify.try_send(());
        }
    })
}

/// Every cluster the labelled Secrets name, with its kubeconfig.
fn wanted_clusters(secrets: &[Arc<Secret>]) -> BTreeMap<String, Wanted> {
    let mut wanted = BTreeMap::new();
    for s in secrets {
        let secret = s.metadata.name.clone().unwrap_or_default();
        for (cluster, v) in s.data.iter().flatten() {
            match String::from_utf8(v.0.clone()) {
                Ok(yaml) => {
                    wanted.insert(
                        cluster.clone(),
                        Wanted {
                            secret: secret.clone(),
                            yaml,
                        },
                    );
                }
                Err(_) => tracing::warn!(
                    secret,
                    cluster,
                    "remote secret value is not a kubeconfig (not UTF-8); ignored"
                ),
            }
        }
    }
    wanted
}

impl RemoteSecrets {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Remote>> {
        self.remotes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the clusters whose secret (or data key) is gone.
    fn drop_gone(&self, wanted: &BTreeMap<String, Wanted>, running: &mut BTreeMap<String, String>) {
        running.retain(|cluster, _| {
            if wanted.contains_key(cluster) {
                return true;
            }
            self.lock().remove(cluster);
            tracing::info!(cluster, "remote secret removed: cluster dropped");
            false
        });
    }
}
