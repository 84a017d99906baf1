//! Every replica's rotation status, published in the cluster: each replica keeps a Lease of its
//! own (`meshid-replica-<name>`, label `meshid.io/replica-status`) in the state Secret's
//! namespace, renewed every few seconds, with what `GET /debug/rotation` reports in an
//! annotation. `meshid root activate|rotate|status --state kube://…` read every such Lease
//! instead of one `--server` per replica; a replica whose Lease was not renewed within its
//! lease duration counts as unknown and holds the gate (`--force` overrides it). A replica
//! that stops cleanly deletes its Lease.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta};
use tokio::sync::watch;

use super::{
    propagation::RotationStatus,
    status::{StatusError, StatusSource},
};
use crate::{
    kube_client::{create_or_update, BlockingKube, BlockingKubeError},
    shutdown::stopping,
};

/// The label every replica's status Lease carries.
pub const REPLICA_LABEL: &str = "meshid.io/replica-status";
/// The annotation holding the status JSON.
pub const STATUS_ANNOTATION: &str = "meshid.io/rotation-status";
/// How often a replica renews its status.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A status not renewed for this long is unknown.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// The Lease name of `replica`.
pub fn lease_name(replica: &str) -> String {
    format!("meshid-replica-{}", name_part(replica))
}

/// `replica` as part of a Kubernetes object name (a DNS-1123 subdomain: lowercase, `-` for
/// anything else, at most 200 characters).
pub fn name_part(replica: &str) -> String {
    let mut name: String = replica
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(200);
    name.trim_matches(['-', '.']).to_owned()
}

fn micro_now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Keeps this replica's status Lease current every [`HEARTBEAT`] until `stop`, then deletes it.
pub async fn publish(
    client: kube::Client,
    namespace: String,
    replica: String,
    status: impl Fn() -> RotationStatus,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let name = lease_name(&replica);
    loop {
        if let Err(e) = write_status(&api, &name, &replica, &status()).await {
            tracing::warn!(lease = %format!("{namespace}/{name}"), error = %e, "could not publish this replica's rotation status; `root activate --state kube://…` counts it as unknown until it is");
        }
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT) => {}
            () = stopping(&mut stop) => break,
        }
    }
    let _ = api.delete(&name, &DeleteParams::default()).await;
}

async fn write_status(
    api: &Api<Lease>,
    name: &str,
    replica: &str,
    status: &RotationStatus,
) -> Result<(), kube::Error> {
    let json = serde_json::to_string(status).map_err(kube::Error::SerdeError)?;
    let spec = LeaseSpec {
        holder_identity: Some(replica.to_owned()),
        lease_duration_seconds: Some(STALE_AFTER.as_secs() as i32),
        renew_time: Some(micro_now()),
        ..Default::default()
    };
    let annotations = BTreeMap::from([(STATUS_ANNOTATION.to_owned(), json)]);
    let lease = || Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                REPLICA_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            annotations: Some(annotations.clone()),
            ..Default::default()
        },
        spec: Some(spec.clone()),
    };
    create_or_update(api, name, lease, |l| {
        l.spec = Some(spec.clone());
        l.metadata.annotations = Some(annotations.clone());
        true
    })
    .await
    .map(|_| ())
}

/// One replica's published status, as a view shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ReplicaReport {
    pub replica: String,
    /// When its Lease was last renewed (RFC 3339), if ever.
    pub last_seen: Option<String>,
    /// Renewed within its lease duration.
    pub fresh: bool,
    /// What it reported (absent when its annotation is missing or unreadable).
    pub status: Option<RotationStatus>,
}

/// What the replicas published, as last read: their reports, or why they could not be read.
pub type ReplicasSeen = std::sync::Mutex<Result<Vec<ReplicaReport>, String>>;

/// Reads every replica's Lease in `api`'s namespace.
pub async fn read_reports(api: &Api<Lease>) -> Result<Vec<ReplicaReport>, kube::Error> {
    let leases = api
        .list(&ListParams::default().labels(REPLICA_LABEL))
        .await?;
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut out: Vec<ReplicaReport> = leases
        .items
        .into_iter()
        .map(|lease| {
            let spec = lease.spec.clone().unwrap_or_default();
            let renewed = spec.renew_time.map(|t| t.0);
            let ttl = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
            ReplicaReport {
                replica: spec
                    .holder_identity
                    .unwrap_or_else(|| lease.metadata.name.clone().unwrap_or_default()),
                last_seen: renewed.map(|t| t.to_string()),
                fresh: renewed
                    .is_some_and(|t| now.duration_since(t).unsigned_abs() <= ttl || t > now),
                status: (lease.metadata.annotations.as_ref())
                    .and_then(|a| a.get(STATUS_ANNOTATION))
                    .and_then(|j| serde_json::from_str::<RotationStatus>(j).ok()),
            }
        })
        .collect();
    out.sort_by(|a, b| a.replica.cmp(&b.replica));
    Ok(out)
}

/// Reads every replica's report into `seen` every [`HEARTBEAT`] until `stop` (the status page
/// shows them).
pub async fn follow(
    client: kube::Client,
    namespace: String,
    seen: std::sync::Arc<ReplicasSeen>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    loop {
        let read = tokio::time::timeout(super::STATUS_READ_TIMEOUT, read_reports(&api))
            .await
            .map_err(|_| format!("the replica Leases in {namespace}: no answer in time"))
            .and_then(|r| r.map_err(|e| format!("the replica Leases in {namespace}: {e}")));
        *seen.lock().unwrap_or_else(|e| e.into_inner()) = read;
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT) => {}
            () = stopping(&mut stop) => return,
        }
    }
}

/// Every replica's status from its Lease in `namespace`: the CLI's [`StatusSource`] for a
/// state in a Secret. One client, reused by every read (the guided rotation polls).
pub struct ReplicaLeases {
    namespace: String,
    kube: BlockingKube,
}

impl ReplicaLeases {
    /// Reads the Leases in `namespace` through `kubeconfig` (in-cluster or `KUBECONFIG` when
    /// `None`).
    pub fn connect(
        namespace: &str,
        kubeconfig: Option<&std::path::Path>,
    ) -> Result<Self, BlockingKubeError> {
        Ok(Self {
            namespace: namespace.to_owned(),
            kube: BlockingKube::connect(kubeconfig, super::STATUS_READ_TIMEOUT)?,
        })
    }
}

impl StatusSource for ReplicaLeases {
    fn statuses(&self, within: Duration) -> Result<Vec<RotationStatus>, StatusError> {
        let where_ = format!("the replica Leases in {}", self.namespace);
        let api: Api<Lease> = Api::namespaced(self.kube.calls.clone(), &self.namespace);
        let read = async move {
            tokio::time::timeout(
                within,
                api.list(&ListParams::default().labels(REPLICA_LABEL)),
            )
            .await
            .map_err(|_| format!("no answer within {within:?}"))?
            .map_err(|e| e.to_string())
        };
        let leases = (self.kube.run(read))
            .unwrap_or_else(|| Err("the Kubernetes client's runtime stopped".into()))
            .map_err(|why| StatusError::Replicas {
                what: where_.clone(),
                why,
            })?;
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut out = Vec::new();
        for lease in leases.items {
            let name = lease.metadata.name.clone().unwrap_or_default();
            let spec = lease.spec.clone().unwrap_or_default();
            let renewed = spec.renew_time.map(|t| t.0);
            let ttl = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
            let fresh =
                renewed.is_some_and(|t| now.duration_since(t).unsigned_abs() <= ttl || t > now);
            if !fresh {
                return Err(StatusError::ReplicaUnknown {
                    replica: spec.holder_identity.unwrap_or(name),
                    last_seen: renewed.map_or("never".into(), |t| t.to_string()),
                });
            }
            let json = (lease.metadata.annotations.as_ref())
                .and_then(|a| a.get(STATUS_ANNOTATION))
                .ok_or_else(|| StatusError::Replicas {
                    what: format!("Lease {}/{name}", self.namespace),
                    why: format!("no {STATUS_ANNOTATION} annotation"),
                })?;
            let status = serde_json::from_str::<RotationStatus>(json).map_err(|why| {
                StatusError::Unreadable {
                    url: format!("Lease {}/{name}", self.namespace),
                    why,
                }
            })?;
            out.push(status.printable());
        }
        if out.is_empty() {
            return Err(StatusError::Replicas {
                what: where_,
                why: "no replica reports its status (is a server running on this state?)".into(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_kubernetes_names() {
        assert_eq!(
            lease_name("meshid-7d4b9-x2x7q"),
            "meshid-replica-meshid-7d4b9-x2x7q"
        );
        assert_eq!(lease_name("Host_Name"), "meshid-replica-host-name");
        assert!(lease_name(&"a".repeat(400)).len() <= 253);
    }
}
