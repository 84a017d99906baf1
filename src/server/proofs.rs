//! Proxy proofs shared between replicas on a Secret state (`discovery.require_proxy_proof`):
//! each replica publishes the pods its proxies proved in a ConfigMap of its own beside the
//! state (`meshid-proofs-<replica>`, label `meshid.io/proxy-proofs`, key `proofs.json`) and
//! merges the others', so a pod proven through one replica is served `tlsMode: istio` by all,
//! and a replica that restarts finds the proofs of its previous life. A replica that starts
//! keeps every pod's label for `discovery.proxy_proof_startup_grace` while they arrive.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    api::{Api, ObjectMeta},
    runtime::watcher,
};

use super::{ServerError, Wiring};
use crate::{
    backoff::Backoff,
    discovery::{ProxyRegistry, SharedProof},
    kube_client::create_or_update,
    shutdown::stopping,
};

/// The label of every replica's proofs ConfigMap.
pub const PROOFS_LABEL: &str = "meshid.io/proxy-proofs";
/// The annotation naming the replica that wrote it.
const REPLICA_ANNOTATION: &str = "meshid.io/replica";
const PROOFS_KEY: &str = "proofs.json";
/// How often a replica writes its proofs when they changed.
const PUBLISH_EVERY: Duration = Duration::from_secs(5);

/// Starts sharing when the state is in a Secret; nothing otherwise (one replica).
pub(super) async fn share(
    w: &mut Wiring<'_>,
    registry: &Arc<ProxyRegistry>,
    startup_grace: Duration,
) -> Result<(), ServerError> {
    let Some(crate::state::StateLocation::Secret { namespace, .. }) = &w.cfg.state else {
        return Ok(());
    };
    let kubeconfig = w.cfg.state_kubeconfig.as_deref();
    let bad = |e: crate::kube_client::KubeClientError| {
        ServerError::Config(vec![format!("state_kubeconfig: {e}")])
    };
    let calls = crate::kube_client::kube_client_for_calls(kubeconfig, Duration::from_secs(10))
        .await
        .map_err(bad)?;
    let watch_client = crate::kube_client::kube_client(kubeconfig)
        .await
        .map_err(bad)?;
    let replica =
        (w.cfg.leader_election.identity.clone()).unwrap_or_else(crate::rotation::replica_name);
    registry.hold_until(w.clock.now() + startup_grace);
    let (r, mut stop) = (registry.clone(), w.stop.clone());
    w.spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(startup_grace) => r.bump(),
            () = stopping(&mut stop) => {}
        }
    });
    w.spawn(publish(
        Api::namespaced(calls, namespace),
        replica.clone(),
        registry.clone(),
        w.stop.clone(),
    ));
    w.spawn(follow(
        Api::namespaced(watch_client, namespace),
        replica,
        registry.clone(),
        w.stop.clone(),
    ));
    Ok(())
}

/// Writes this replica's proofs whenever they changed, checking every [`PUBLISH_EVERY`].
async fn publish(
    api: Api<ConfigMap>,
    replica: String,
    registry: Arc<ProxyRegistry>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let name = format!(
        "meshid-proofs-{}",
        crate::rotation::replicas::name_part(&replica)
    );
    let mut written: Option<String> = None;
    loop {
        let json = serde_json::to_string(&registry.export()).unwrap_or_else(|_| "[]".into());
        if written.as_ref() != Some(&json) {
            match write(&api, &name, &replica, &json).await {
                Ok(()) => written = Some(json),
                Err(e) => {
                    tracing::warn!(configmap = %name, error = %e, "could not publish this replica's proxy proofs; the other replicas keep what they had")
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(PUBLISH_EVERY) => {}
            () = stopping(&mut stop) => return,
        }
    }
}

async fn write(
    api: &Api<ConfigMap>,
    name: &str,
    replica: &str,
    json: &str,
) -> Result<(), kube::Error> {
    let data = BTreeMap::from([(PROOFS_KEY.to_owned(), json.to_owned())]);
    let new = || ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                PROOFS_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                REPLICA_ANNOTATION.to_owned(),
                replica.to_owned(),
            )])),
            ..Default::default()
        },
        data: Some(data.clone()),
        ..Default::default()
    };
    create_or_update(api, name, new, |cm| {
        cm.data = Some(data.clone());
        true
    })
    .await
    .map(|_| ())
}

/// Merges every other replica's proofs as they change.
async fn follow(
    api: Api<ConfigMap>,
    replica: String,
    registry: Arc<ProxyRegistry>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let config = watcher::Config::default().labels(PROOFS_LABEL);
    let mut events = std::pin::pin!(watcher(api, config));
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            () = stopping(&mut stop) => return,
        };
        let Some(event) = event else { return };
        let (cm, deleted) = match event {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => (cm, false),
            Ok(watcher::Event::Delete(cm)) => (cm, true),
            Ok(_) => continue,
            Err(e) => {
                let wait = backoff.failed();
                tracing::warn!(error = %e, retry_in = ?wait, "watch on the replicas' proxy proofs failed");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        backoff.succeeded();
        let Some(writer) = (cm.metadata.annotations.as_ref())
            .and_then(|a| a.get(REPLICA_ANNOTATION))
            .cloned()
        else {
            continue;
        };
        if writer == replica {
            continue;
        }
        let proofs: Vec<SharedProof> = match (
            deleted,
            cm.data.as_ref().and_then(|d| d.get(PROOFS_KEY)),
        ) {
            (false, Some(json)) => match serde_json::from_str(json) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(replica = %writer, error = %e, "unreadable proxy proofs; ignored");
                    continue;
                }
            },
            _ => Vec::new(),
        };
        registry.set_shared(&writer, proofs);
    }
}
