//! The one way meshid builds a Kubernetes client: from a kubeconfig file, or from the
//! in-cluster / `KUBECONFIG` configuration.

use thiserror::Error;

/// Why no Kubernetes client could be built.
#[derive(Debug, Error)]
pub enum KubeClientError {
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes API server to talk to: this process runs in no pod (no in-cluster service account) and found no kubeconfig (KUBECONFIG, ~/.kube/config); give one (--kubeconfig FILE, or the config's kubeconfig key)")]
    Infer(#[source] kube::Error),
    #[error("{0}")]
    Client(#[from] kube::Error),
}

/// A kube client from a kubeconfig file, or in-cluster/`KUBECONFIG` configuration, for watches
/// and calls of any length (no response deadline).
pub async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
) -> Result<kube::Client, KubeClientError> {
    Ok(kube::Client::try_from(kube_config(kubeconfig).await?)?)
}

/// A client for short calls (reads and writes of one object): a response that does not come
/// within `deadline` fails and its connection is closed, so a connection left hanging by an
/// API server that went away is not handed out again (client-go bounds these calls the same
/// way, and its HTTP/2 health check drops such connections).
pub async fn kube_client_for_calls(
    kubeconfig: Option<&std::path::Path>,
    deadline: std::time::Duration,
) -> Result<kube::Client, KubeClientError> {
    let mut config = kube_config(kubeconfig).await?;
    config.read_timeout = Some(deadline);
    config.write_timeout = Some(deadline);
    config.connect_timeout = Some(deadline);
    config.reset_reader_on_write = true;
    Ok(kube::Client::try_from(config)?)
}

async fn kube_config(
    kubeconfig: Option<&std::path::Path>,
) -> Result<kube::Config, KubeClientError> {
    match kubeconfig {
        Some(path) => {
            let bad = |source| KubeClientError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(bad)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(bad)
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeClientError::Infer(kube::Error::InferConfig(e))),
    }
}

/// Kubernetes clients on a runtime of their own, for synchronous callers (the CLI, the state
/// store behind `rotation::apply`): a call blocks the calling thread, whatever runtime it is on
/// or none, while the clients' connection tasks keep running on this one.
pub struct BlockingKube {
    rt: std::sync::Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    /// For reads and writes, each answered within the deadline it was built with.
    pub calls: kube::Client,
    /// For watches (long-lived; a watcher has its own idle timeout).
    pub watches: kube::Client,
}

/// Why the clients' runtime could not be used.
#[derive(Debug, Error)]
pub enum BlockingKubeError {
    #[error("cannot start a runtime for the Kubernetes client: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("the Kubernetes client's runtime stopped")]
    Stopped,
    #[error(transparent)]
    Client(#[from] KubeClientError),
}

impl BlockingKube {
    /// Clients from `kubeconfig` (in-cluster or `KUBECONFIG` when `None`); calls answered
    /// within `deadline`.
    pub fn connect(
        kubeconfig: Option<&std::path::Path>,
        deadline: std::time::Duration,
    ) -> Result<Self, BlockingKubeError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("meshid-kube")
            .enable_all()
            .build()
            .map_err(BlockingKubeError::Runtime)?;
        let handle = rt.handle().clone();
        let kubeconfig = kubeconfig.map(std::path::Path::to_owned);
        let (calls, watches) = run_on(&handle, async move {
            let calls = kube_client_for_calls(kubeconfig.as_deref(), deadline).await?;
            let watches = kube_client(kubeconfig.as_deref()).await?;
            Ok::<_, KubeClientError>((calls, watches))
        })
        .ok_or(BlockingKubeError::Stopped)??;
        Ok(Self {
            rt: std::sync::Mutex::new(Some(rt)),
            handle,
            calls,
            watches,
        })
    }

    /// Runs `fut` on the clients' runtime and waits for it; `None` if that runtime stopped.
    pub fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        run_on(&self.handle, fut)
    }

    /// Spawns `fut` on the clients' runtime (a watch), aborted when the handle is dropped.
    pub fn spawn(
        &self,
        fut: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        self.handle.spawn(fut)
    }
}

impl Drop for BlockingKube {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which a caller inside another runtime may not do.
        if let Some(rt) = self.rt.lock().unwrap_or_else(|e| e.into_inner()).take() {
            rt.shutdown_background();
        }
    }
}

fn run_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().ok()
}

/// What [`create_or_update`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Created,
    Updated,
    Unchanged,
}

/// Creates object `name` from `new()`, or changes the copy just read with `update` (which says
/// whether anything changed) and replaces it; the replace names the resourceVersion read, so a
/// concurrent change is a 409 rather than overwritten (the shape of istiod's
/// `InsertDataToConfigMap`; `trust::configmap::ensure` keeps its own copy because it tolerates a
/// 409 on create but not on update).
pub async fn create_or_update<K>(
    api: &kube::Api<K>,
    name: &str,
    new: impl FnOnce() -> K,
    update: impl FnOnce(&mut K) -> bool,
) -> Result<Written, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let params = kube::api::PostParams::default();
    match api.get_opt(name).await? {
        None => api.create(&params, &new()).await.map(|_| Written::Created),
        Some(mut obj) => {
            if !update(&mut obj) {
                return Ok(Written::Unchanged);
            }
            api.replace(name, &params, &obj)
                .await
                .map(|_| Written::Updated)
        }
    }
}
