//! Discovery for EDS: the snapshot file or the live Kubernetes watch (with remote clusters),
//! the view built from it, and its gauges.

use std::sync::Arc;

use tokio::sync::watch;

use super::{ServerError, Wiring};
use crate::kube_client::kube_client;
use crate::{
    api::{lifetime::StreamLimits, Authenticator, EdsService},
    discovery::{
        spawn_view, start_kube_source, watch_remote_secrets, DiscoveryStats, DiscoveryView,
        MeshSettings, MultiCluster, ProxyRegistry, RemoteSecrets, SnapshotSource,
    },
    shutdown::stopping,
    telemetry::Metrics,
};

/// The EDS service over `[discovery]`: its source (the snapshot file, watched, or the live
/// watch of this cluster and the remote ones), the view rebuilt on every change, and the gauges.
pub(super) async fn eds_service(
    w: &mut Wiring<'_>,
    d: &crate::discovery::config::Discovery,
    auth: &Authenticator,
    proxies: Option<Arc<ProxyRegistry>>,
    limits: StreamLimits,
) -> Result<(EdsService, super::ui::DiscoverySources), ServerError> {
    let settings = MeshSettings {
        auto_mtls: d.auto_mtls,
        root_namespace: d.root_namespace.clone(),
        domain: d.domain.clone(),
        require_proxy_proof: d.require_proxy_proof,
        cluster_name: d.cluster_name.clone(),
    };
    let poll = w.cfg.state_poll_interval;
    let objects = match (&d.snapshot, &d.kubeconfig) {
        (Some(path), _) => {
            let source = SnapshotSource::load(path.clone())
                .map_err(|e| ServerError::Config(vec![format!("discovery.snapshot: {e}")]))?;
            let view = source.subscribe();
            w.spawn(source.watch_file(poll, w.stop.clone()));
            view
        }
        (None, kubeconfig) => {
            let client = kube_client(kubeconfig.as_deref())
                .await
                .map_err(|why| ServerError::Config(vec![format!("discovery: {why}")]))?;
            let mc = remote_clusters(d, &client, w).await?;
            let (objects, watchers) = start_kube_source(client, mc, w.stop.clone());
            w.tasks.extend(watchers);
            objects
        }
    };
    let (view, builder) = spawn_view(
        objects.clone(),
        settings.clone(),
        proxies.clone(),
        poll,
        w.stop.clone(),
    );
    w.tasks.push(builder);
    w.spawn(discovery_gauges(
        view.clone(),
        w.metrics.clone(),
        w.stop.clone(),
    ));
    let sources = super::ui::DiscoverySources {
        objects,
        view: view.clone(),
        settings,
        proxies,
    };
    let eds = EdsService::new(auth.clone(), view, w.stop.clone(), &w.metrics)
        .with_name_limit(w.cfg.xds.max_resource_names_per_stream.eds)
        .with_lifetime(w.clock.clone(), limits);
    Ok((eds, sources))
}

/// The remote clusters of multi-cluster discovery: configured ones, and Istio's remote secrets.
async fn remote_clusters(
    d: &crate::discovery::config::Discovery,
    primary: &kube::Client,
    w: &mut Wiring<'_>,
) -> Result<MultiCluster, ServerError> {
    let mc = MultiCluster::new();
    for (i, c) in d.clusters.iter().enumerate() {
        let client = kube_client(Some(&c.kubeconfig)).await.map_err(|why| {
            ServerError::Config(vec![format!("discovery.clusters[{i}] ({}): {why}", c.name)])
        })?;
        mc.add(&c.name, client);
    }
    if d.remote_secrets {
        w.tasks.push(watch_remote_secrets(RemoteSecrets {
            client: primary.clone(),
            namespace: d.root_namespace.clone(),
            remotes: mc.remotes.clone(),
            configured: d.clusters.iter().map(|c| c.name.clone()).collect(),
            notify: mc.notify.clone(),
            policy: d.insecure_kubeconfig_options.clone(),
            metrics: w.metrics.clone(),
        }));
    }
    Ok(mc)
}

async fn discovery_gauges(
    mut view: watch::Receiver<Arc<DiscoveryView>>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let v = view.borrow_and_update().clone();
        set_discovery_gauges(&metrics, &v.stats);
        tokio::select! {
            r = view.changed() => if r.is_err() { return },
            () = stopping(&mut stop) => return,
        }
    }
}

/// The discovery gauges from one view's stats.
fn set_discovery_gauges(m: &Metrics, st: &DiscoveryStats) {
    m.discovery_endpoints
        .get_or_create(&Metrics::label("tls_mode", "istio"))
        .set(st.endpoints_istio as i64);
    m.discovery_endpoints
        .get_or_create(&Metrics::label("tls_mode", "disabled"))
        .set(st.endpoints_disabled as i64);
    for (ns, ratio) in &st.mtls_coverage {
        m.discovery_mtls_coverage
            .get_or_create(&Metrics::label("namespace", ns))
            .set(*ratio);
    }
    m.discovery_mismatches.set(st.sidecar_mismatches as i64);
    m.discovery_declared_without_proxy
        .set(st.declared_without_proxy as i64);
}
