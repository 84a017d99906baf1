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
    #[error("no in-cluster or KUBECONFIG configuration: {0}")]
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
