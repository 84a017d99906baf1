//! The state in a Kubernetes Secret (`--state kube://NAMESPACE/NAME`): the same checksummed
//! document as the directory store, in the Secret's `state.json` key, type
//! `meshid.io/ca-state`. Compare-and-swap is the API server's own: a write names the
//! `resourceVersion` it read (`PUT` with `metadata.resourceVersion`, answered `409 Conflict`
//! when another writer came first), so several replicas and the CLI never lose an update, and a
//! leader that lost its Lease cannot overwrite what the new leader wrote. Changes are seen
//! through a watch on the one Secret, not a poll.
//!
//! The store's calls are synchronous like the directory's; the Kubernetes clients run on a
//! runtime of their own ([`BlockingKube`]), so a caller on any runtime (or none) can block on
//! them without starving their connection tasks.

use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::{
    api::{ObjectMeta, PostParams},
    runtime::watcher,
    Api,
};
use tokio::sync::mpsc;

use crate::kube_client::BlockingKube;

use super::{
    document::CaState,
    envelope,
    error::StateError,
    generation::Generation,
    store::{ChangeWatch, StateStore, Versioned},
};

/// The Secret type meshid writes and accepts.
pub const SECRET_TYPE: &str = "meshid.io/ca-state";
/// The key of the state document in the Secret's data.
pub const STATE_KEY: &str = "state.json";
/// The largest document written: the API server refuses a Secret whose data exceeds 1 MiB
/// (`MaxSecretSize` in kube-apiserver's core validation); the rest is left for metadata.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024 - 16 * 1024;
/// How long one API call may take before the store gives up (nothing is written on a timeout
/// that the API server did not apply: a later read shows which).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A CA state in one Kubernetes Secret.
pub struct KubeStore {
    namespace: String,
    name: String,
    kube: BlockingKube,
}

impl KubeStore {
    /// A store in Secret `namespace/name`, reached with `kubeconfig` (in-cluster or
    /// `KUBECONFIG` when `None`). Nothing is read or written until the first call.
    pub fn connect(
        namespace: &str,
        name: &str,
        kubeconfig: Option<&Path>,
    ) -> Result<Self, StateError> {
        let location = location_of(namespace, name);
        let remote = |why: String| StateError::Remote {
            op: "connecting to the API server for",
            location: location.clone(),
            why,
        };
        let kube =
            BlockingKube::connect(kubeconfig, CALL_TIMEOUT).map_err(|e| remote(e.to_string()))?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            kube,
        })
    }

    fn api(&self) -> Api<Secret> {
        Api::namespaced(self.kube.calls.clone(), &self.namespace)
    }

    fn location_path(&self) -> PathBuf {
        PathBuf::from(location_of(&self.namespace, &self.name))
    }

    /// Runs one API call on the clients' runtime, with the store's deadline.
    fn call<T: Send + 'static>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, kube::Error>> + Send + 'static,
    ) -> Result<T, CallError> {
        let timed = async move { tokio::time::timeout(CALL_TIMEOUT, fut).await };
        match self.kube.run(timed) {
            None => Err(CallError::Other(
                self.remote(op, "the client's runtime stopped".into()),
            )),
            Some(Err(_)) => Err(CallError::Other(
                self.remote(op, format!("no answer within {}s", CALL_TIMEOUT.as_secs())),
            )),
            Some(Ok(Ok(v))) => Ok(v),
            Some(Ok(Err(kube::Error::Api(s)))) if s.code == 409 => Err(CallError::Conflict),
            Some(Ok(Err(e))) => Err(CallError::Other(self.remote(op, e.to_string()))),
        }
    }

    fn remote(&self, op: &'static str, why: String) -> StateError {
        StateError::Remote {
            op,
            location: location_of(&self.namespace, &self.name),
            why,
        }
    }

    /// The Secret as it is now (`None`: absent).
    fn get(&self) -> Result<Option<Secret>, StateError> {
        let (api, name) = (self.api(), self.name.clone());
        self.call("reading", async move { api.get_opt(&name).await })
            .map_err(|e| e.into_state(self, "reading"))
    }

    /// The document in `secret` (`None`: the Secret holds none yet, e.g. created empty by the
    /// deployment so that RBAC can name it).
    fn decode(&self, secret: &Secret) -> Result<Option<Versioned>, StateError> {
        let path = self.location_path();
        let kind = secret.type_.as_deref().unwrap_or("Opaque");
        if kind != SECRET_TYPE {
            return Err(StateError::Corrupted {
                path,
                why: format!("the Secret is of type {kind:?}, not {SECRET_TYPE:?}; meshid uses only a Secret of its own type"),
            });
        }
        match secret.data.as_ref().and_then(|d| d.get(STATE_KEY)) {
            None => Ok(None),
            Some(bytes) if bytes.0.is_empty() => Ok(None),
            Some(bytes) => envelope::decode(&bytes.0, &path).map(Some),
        }
    }

    /// Compare-and-swap: the generation must still be `expected`, and the API server refuses
    /// the write if the Secret changed since it was read. `keep`: the generation of a first
    /// write (a migrated state).
    fn write(
        &self,
        expected: Option<Generation>,
        state: &CaState,
        keep: Option<Generation>,
    ) -> Result<Generation, StateError> {
        state.validate()?;
        let current = self.get()?;
        let found = match &current {
            Some(s) => self.decode(s)?.map(|v| v.generation),
            None => None,
        };
        if found != expected {
            return Err(StateError::Conflict { expected, found });
        }
        let generation = match (keep, found) {
            (Some(g), None) => g.0,
            (_, found) => found.map_or(1, |g| g.0 + 1),
        };
        let bytes = envelope::encode(state, generation)?;
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(StateError::TooLarge {
                location: self.location(),
                size: bytes.len(),
                max: MAX_DOCUMENT_BYTES,
            });
        }
        let data = BTreeMap::from([(STATE_KEY.to_owned(), ByteString(bytes))]);
        let (api, name) = (self.api(), self.name.clone());
        let written = match current {
            // The API server refuses the write if anyone wrote since our read.
            Some(mut secret) => {
                secret.data = Some(data);
                secret.string_data = None;
                self.call("writing", async move {
                    api.replace(&name, &PostParams::default(), &secret).await
                })
            }
            None => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name),
                        namespace: Some(self.namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_owned(),
                            "meshid".to_owned(),
                        )])),
                        ..Default::default()
                    },
                    type_: Some(SECRET_TYPE.into()),
                    data: Some(data),
                    ..Default::default()
                };
                self.call("creating", async move {
                    api.create(&PostParams::default(), &secret).await
                })
            }
        };
        match written {
            Ok(_) => Ok(Generation(generation)),
            Err(CallError::Conflict) => Err(StateError::Conflict {
                expected,
                found: self.found_after_conflict(),
            }),
            Err(CallError::Other(e)) => Err(e),
        }
    }

    /// The found generation after a write lost a race, for the `Conflict` it reports.
    fn found_after_conflict(&self) -> Option<Generation> {
        let secret = self.get().ok()??;
        Some(self.decode(&secret).ok()??.generation)
    }
}

/// Why one API call failed: lost a compare-and-swap, or anything else.
enum CallError {
    Conflict,
    Other(StateError),
}

impl CallError {
    fn into_state(self, store: &KubeStore, op: &'static str) -> StateError {
        match self {
            Self::Other(e) => e,
            Self::Conflict => store.remote(op, "409 Conflict".into()),
        }
    }
}

/// `kube://NAMESPACE/NAME`.
pub fn location_of(namespace: &str, name: &str) -> String {
    format!("kube://{namespace}/{name}")
}

impl StateStore for KubeStore {
    fn load(&self) -> Result<Option<Versioned>, StateError> {
        match self.get()? {
            None => Ok(None),
            Some(secret) => self.decode(&secret),
        }
    }

    fn compare_and_swap(
        &self,
        expected: Option<Generation>,
        state: &CaState,
    ) -> Result<Generation, StateError> {
        self.write(expected, state, None)
    }

    fn create_migrated(&self, from: &Versioned) -> Result<Generation, StateError> {
        self.write(None, &from.state, Some(from.generation))
    }

    fn location(&self) -> String {
        location_of(&self.namespace, &self.name)
    }

    /// A watch on the one Secret (`fieldSelector=metadata.name=NAME`, which RBAC authorizes
    /// by `resourceNames`); it re-lists by itself after a `410 Gone` or a lost connection.
    fn on_change(&self, wake: mpsc::Sender<()>) -> Result<Option<ChangeWatch>, StateError> {
        let api: Api<Secret> = Api::namespaced(self.kube.watches.clone(), &self.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let location = self.location();
        let task = self.kube.spawn(async move {
            let mut events = std::pin::pin!(watcher(api, config));
            // A watch of one object is cheap to re-open; a state change (a root rotation)
            // must not wait long behind an API server that came back.
            let mut backoff =
                crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
            while let Some(event) = events.next().await {
                match event {
                    Ok(_) => {
                        backoff.succeeded();
                        let _ = wake.try_send(());
                    }
                    Err(e) => {
                        let wait = backoff.failed();
                        tracing::warn!(state = %location, error = %e, retry_in = ?wait, "watch on the state Secret failed");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });
        Ok(Some(ChangeWatch::new(AbortOnDrop(task))))
    }
}

/// Stops the watch task when the guard goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
