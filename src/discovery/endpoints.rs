//! Endpoints per Envoy cluster (`outbound|<port>||<service fqdn>`), with each endpoint's tlsMode:
//! what EDS serves. Computed once per model change and shared by every stream.

use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;

use super::{sidecar_of, MeshObjects, MeshSettings, TlsMode};

/// One endpoint of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointEntry {
    pub address: String,
    pub port: u16,
    pub ready: bool,
    /// From the pod label: `istio` endpoints get the transport-socket-match metadata.
    pub tls_mode: TlsMode,
}

/// The cluster name Istio gives a service port.
pub fn cluster_name(port: u16, fqdn: &str) -> String {
    format!("outbound|{port}||{fqdn}")
}

/// Counts for the discovery metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DiscoveryStats {
    pub endpoints_istio: usize,
    pub endpoints_disabled: usize,
    /// Per namespace: the share of pods that carry a sidecar.
    pub mtls_coverage: BTreeMap<String, f64>,
    /// Pods whose label disagrees with what they run.
    pub sidecar_mismatches: usize,
}

/// Everything EDS and the metrics need from one model.
#[derive(Clone, Debug, Default)]
pub struct DiscoveryView {
    pub clusters: BTreeMap<String, Vec<EndpointEntry>>,
    pub stats: DiscoveryStats,
}

impl DiscoveryView {
    /// Builds the view of `objs`.
    pub fn build(objs: &MeshObjects, s: &MeshSettings) -> Arc<Self> {
        let mut clusters = BTreeMap::new();
        for svc in &objs.services {
            let (Some(name), Some(ns)) = (
                svc.metadata.name.as_deref(),
                svc.metadata.namespace.as_deref(),
            ) else {
                continue;
            };
            let fqdn = format!("{name}.{ns}.svc.{}", s.domain);
            for sp in svc.spec.iter().flat_map(|x| x.ports.iter().flatten()) {
                clusters.insert(cluster_name(sp.port as u16, &fqdn), Vec::new());
            }
            for j in super::join::service_endpoints(objs, svc) {
                let tls_mode = j.pod.map_or(TlsMode::Disabled, |p| sidecar_of(p).tls_mode);
                let ready = j
                    .endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                let entries = clusters
                    .entry(cluster_name(j.service_port.port as u16, &fqdn))
                    .or_default();
                for address in &j.endpoint.addresses {
                    entries.push(EndpointEntry {
                        address: address.clone(),
                        port: j.port,
                        ready,
                        tls_mode,
                    });
                }
            }
        }
        for entries in clusters.values_mut() {
            entries.sort_by(|a, b| (&a.address, a.port).cmp(&(&b.address, b.port)));
        }
        Arc::new(Self {
            stats: stats(objs, &clusters),
            clusters,
        })
    }
}

fn stats(objs: &MeshObjects, clusters: &BTreeMap<String, Vec<EndpointEntry>>) -> DiscoveryStats {
    let mut st = DiscoveryStats::default();
    for e in clusters.values().flatten() {
        match e.tls_mode {
            TlsMode::Istio => st.endpoints_istio += 1,
            TlsMode::Disabled => st.endpoints_disabled += 1,
        }
    }
    let mut per_ns: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for p in &objs.pods {
        let info = sidecar_of(p);
        let e = per_ns
            .entry(p.metadata.namespace.clone().unwrap_or_default())
            .or_default();
        e.1 += 1;
        if info.tls_mode == TlsMode::Istio {
            e.0 += 1;
        }
        if !info.warnings.is_empty() {
            st.sidecar_mismatches += 1;
        }
    }
    st.mtls_coverage = per_ns
        .into_iter()
        .map(|(ns, (with, all))| (ns, with as f64 / all as f64))
        .collect();
    st
}
