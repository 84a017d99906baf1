//! Fields of the input that can change what an Istio sidecar does but that meshid does not
//! model: named in `describe` and logged, never dropped in silence.

use super::MeshObjects;

/// Pod annotations that change which inbound traffic a sidecar intercepts.
const POD_ANNOTATIONS: &[&str] = &[
    "traffic.sidecar.istio.io/excludeInboundPorts",
    "traffic.sidecar.istio.io/includeInboundPorts",
    "sidecar.istio.io/interceptionMode",
];

/// Labels that move a workload or namespace to another data plane (ambient, HBONE).
const DATAPLANE_LABELS: &[&str] = &["istio.io/dataplane-mode", "networking.istio.io/tunnel"];

/// TrafficPolicy fields that change no TLS decision (connection limits, outlier detection).
const HARMLESS_POLICY: &[&str] = &["connectionPool", "outlierDetection", "retryBudget"];

/// Every field of `objs` that can change a decision and is not modeled, one line each
/// (`kind namespace/name: field (what it would change)`), sorted and without repeats.
pub fn ignored_fields(objs: &MeshObjects) -> Vec<String> {
    let mut out = Vec::new();
    for k in &objs.ignored_kinds {
        out.push(format!(
            "kind {k}: not read (a Sidecar can narrow which services and rules a proxy sees)"
        ));
    }
    for each in [
        pods,
        namespaces,
        services,
        destination_rules,
        service_entries,
    ] {
        each(objs, &mut out);
    }
    out.sort();
    out.dedup();
    out
}

/// `namespace/name` of an object.
fn name(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or(""),
        m.name.as_deref().unwrap_or("")
    )
}

/// Interception annotations and ambient labels on pods.
fn pods(objs: &MeshObjects, out: &mut Vec<String>) {
    for p in &objs.pods {
        for a in POD_ANNOTATIONS {
            if p.metadata
                .annotations
                .as_ref()
                .is_some_and(|m| m.contains_key(*a))
            {
                out.push(format!(
                    "Pod {}: annotation {a} (changes which inbound ports the sidecar intercepts)",
                    name(&p.metadata)
                ));
            }
        }
        for l in DATAPLANE_LABELS {
            if p.metadata
                .labels
                .as_ref()
                .is_some_and(|m| m.contains_key(*l))
            {
                out.push(format!(
                    "Pod {}: label {l} (ambient/HBONE data plane)",
                    name(&p.metadata)
                ));
            }
        }
    }
}

/// Ambient labels on namespaces.
fn namespaces(objs: &MeshObjects, out: &mut Vec<String>) {
    for n in &objs.namespaces {
        for l in DATAPLANE_LABELS {
            if n.metadata
                .labels
                .as_ref()
                .is_some_and(|m| m.contains_key(*l))
            {
                out.push(format!(
                    "Namespace {}: label {l} (ambient/HBONE data plane)",
                    n.metadata.name.as_deref().unwrap_or("")
                ));
            }
        }
    }
}

/// Service fields that change which endpoints a client is sent.
fn services(objs: &MeshObjects, out: &mut Vec<String>) {
    for s in &objs.services {
        let n = name(&s.metadata);
        if s.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("networking.istio.io/exportTo"))
        {
            out.push(format!(
                "Service {n}: annotation networking.istio.io/exportTo (which namespaces see the service)"
            ));
        }
        let spec = s.spec.as_ref();
        if spec.and_then(|x| x.internal_traffic_policy.as_deref()) == Some("Local") {
            out.push(format!(
                "Service {n}: spec.internalTrafficPolicy Local (only endpoints on the client's node are sent)"
            ));
        }
        if spec
            .and_then(|x| x.traffic_distribution.as_deref())
            .is_some()
        {
            out.push(format!(
                "Service {n}: spec.trafficDistribution (istiod then sends unready endpoints too, marked unhealthy)"
            ));
        }
    }
}

/// DestinationRule fields that are not modeled.
fn destination_rules(objs: &MeshObjects, out: &mut Vec<String>) {
    for d in &objs.destination_rules {
        let n = name(&d.metadata);
        let tp = d.spec.traffic_policy.iter();
        let subsets = d
            .spec
            .subsets
            .iter()
            .filter_map(|s| s.traffic_policy.as_ref());
        for (where_, t) in tp
            .map(|t| ("trafficPolicy", t))
            .chain(subsets.map(|t| ("subsets[].trafficPolicy", t)))
        {
            for k in t
                .other
                .keys()
                .filter(|k| !HARMLESS_POLICY.contains(&k.as_str()))
            {
                out.push(format!("DestinationRule {n}: {where_}.{k}"));
            }
            let tls = t
                .tls
                .iter()
                .chain(t.port_level_settings.iter().filter_map(|p| p.tls.as_ref()));
            for c in tls {
                for k in c.other.keys() {
                    out.push(format!(
                        "DestinationRule {n}: {where_} tls.{k} (the TLS outcome assumes the server's certificate verifies)"
                    ));
                }
            }
        }
    }
}

/// ServiceEntry `subjectAltNames`.
fn service_entries(objs: &MeshObjects, out: &mut Vec<String>) {
    for se in &objs.service_entries {
        if !se.spec.subject_alt_names.is_empty() {
            out.push(format!(
                "ServiceEntry {}: subjectAltNames (the identities auto mTLS would require)",
                name(&se.metadata)
            ));
        }
    }
}
