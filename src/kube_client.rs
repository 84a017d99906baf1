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

/// A kube client from a kubeconfig file, or in-cluster/`KUBECONFIG` configuration.
pub async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
) -> Result<kube::Client, KubeClientError> {
    match kubeconfig {
        Some(path) => {
            let bad = |source| KubeClientError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(bad)?;
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(bad)?;
            Ok(kube::Client::try_from(config)?)
        }
        None => kube::Client::try_default()
            .await
            .map_err(KubeClientError::Infer),
    }
}
