//! PeerAuthentication resolution for a workload and port, as Istio does it: mesh (root
//! namespace, no selector) → namespace (no selector) → workload (selector) → port level.
//! UNSET inherits; with nothing set, the mode is PERMISSIVE.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{PeerAuthMode, PeerAuthentication};

/// The mode in force and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerAuthResolution {
    pub mode: PeerAuthMode,
    /// e.g. "namespace shop (PeerAuthentication default)", or "mesh default (none set)".
    pub source: String,
}

fn created(
    pa: &PeerAuthentication,
) -> (
    Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    Option<&String>,
) {
    (
        pa.metadata.creation_timestamp.as_ref(),
        pa.metadata.name.as_ref(),
    )
}

/// The oldest of several matching policies wins (Istio's conflict rule).
fn oldest(mut v: Vec<&PeerAuthentication>) -> Option<&PeerAuthentication> {
    v.sort_by(|a, b| created(a).cmp(&created(b)));
    v.into_iter().next()
}

fn selector_less(pa: &PeerAuthentication) -> bool {
    pa.spec
        .selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_empty())
}

/// Resolves the mode for a workload in `namespace` with `labels`, on container `port` if known.
pub fn resolve_peer_auth(
    policies: &[PeerAuthentication],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: Option<u16>,
) -> PeerAuthResolution {
    let in_ns = |ns: &str| -> Vec<&PeerAuthentication> {
        policies
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
            .collect()
    };
    let name = |p: &PeerAuthentication| p.metadata.name.clone().unwrap_or_default();
    let mut res = PeerAuthResolution {
        mode: PeerAuthMode::Permissive,
        source: "mesh default (no PeerAuthentication sets a mode)".into(),
    };
    let mut apply = |mode: PeerAuthMode, source: String| {
        if mode != PeerAuthMode::Unset {
            res = PeerAuthResolution { mode, source };
        }
    };
    let mode_of = |p: &PeerAuthentication| p.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default();
    if let Some(mesh) = oldest(
        in_ns(root_namespace)
            .into_iter()
            .filter(|p| selector_less(p))
            .collect(),
    ) {
        apply(
            mode_of(mesh),
            format!("mesh-wide ({root_namespace}/{})", name(mesh)),
        );
    }
    if namespace != root_namespace {
        if let Some(nsp) = oldest(
            in_ns(namespace)
                .into_iter()
                .filter(|p| selector_less(p))
                .collect(),
        ) {
            apply(
                mode_of(nsp),
                format!("namespace {namespace} ({namespace}/{})", name(nsp)),
            );
        }
    }
    // `authn` `ComposePeerAuthentication`: a workload policy is "the one with selector and not
    // in root namespace"; a selector-bearing policy in the root namespace is ignored.
    let matching = in_ns(namespace)
        .into_iter()
        .filter(|p| !selector_less(p) && namespace != root_namespace)
        .filter(|p| {
            let sel = &p
                .spec
                .selector
                .as_ref()
                .expect("has a selector")
                .match_labels;
            sel.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .collect();
    if let Some(wl) = oldest(matching) {
        apply(mode_of(wl), format!("workload ({namespace}/{})", name(wl)));
        if let Some(pm) = port.and_then(|p| wl.spec.port_level_mtls.get(&p.to_string())) {
            apply(
                pm.mode,
                format!(
                    "port {} of workload ({namespace}/{})",
                    port.unwrap_or_default(),
                    name(wl)
                ),
            );
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::istio::{MtlsSpec, PeerAuthSpec, WorkloadSelector};

    fn pa(
        ns: &str,
        name: &str,
        mode: PeerAuthMode,
        selector: &[(&str, &str)],
        ports: &[(u16, PeerAuthMode)],
    ) -> PeerAuthentication {
        let mut p = PeerAuthentication::default();
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p.spec = PeerAuthSpec {
            selector: (!selector.is_empty()).then(|| WorkloadSelector {
                match_labels: selector
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            }),
            mtls: Some(MtlsSpec { mode }),
            port_level_mtls: ports
                .iter()
                .map(|(p, m)| (p.to_string(), MtlsSpec { mode: *m }))
                .collect(),
        };
        p
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// One row per resolution rule, named after it.
    #[test]
    fn resolution_table() {
        use PeerAuthMode::*;
        let app = [("app", "db")];
        type Row = (
            &'static str,
            Vec<PeerAuthentication>,
            Option<u16>,
            PeerAuthMode,
            &'static str,
        );
        let rows: Vec<Row> = vec![
            (
                "nothing set: PERMISSIVE",
                vec![],
                None,
                Permissive,
                "mesh default",
            ),
            (
                "mesh-wide applies",
                vec![pa("istio-system", "default", Strict, &[], &[])],
                None,
                Strict,
                "mesh-wide",
            ),
            (
                "namespace overrides mesh",
                vec![
                    pa("istio-system", "default", Strict, &[], &[]),
                    pa("shop", "ns", Disable, &[], &[]),
                ],
                None,
                Disable,
                "namespace shop",
            ),
            (
                "UNSET namespace inherits mesh",
                vec![
                    pa("istio-system", "default", Strict, &[], &[]),
                    pa("shop", "ns", Unset, &[], &[]),
                ],
                None,
                Strict,
                "mesh-wide",
            ),
            (
                "workload overrides namespace",
                vec![
                    pa("shop", "ns", Strict, &[], &[]),
                    pa("shop", "db", Permissive, &app, &[]),
                ],
                None,
                Permissive,
                "workload",
            ),
            (
                "selector must match",
                vec![
                    pa("shop", "ns", Strict, &[], &[]),
                    pa("shop", "other", Disable, &[("app", "x")], &[]),
                ],
                None,
                Strict,
                "namespace",
            ),
            (
                "port level overrides workload",
                vec![pa("shop", "db", Strict, &app, &[(5432, Disable)])],
                Some(5432),
                Disable,
                "port 5432",
            ),
            (
                "port level only on its port",
                vec![pa("shop", "db", Strict, &app, &[(5432, Disable)])],
                Some(8080),
                Strict,
                "workload",
            ),
            (
                "UNSET port inherits workload",
                vec![pa("shop", "db", Strict, &app, &[(5432, Unset)])],
                Some(5432),
                Strict,
                "workload",
            ),
            (
                "ComposePeerAuthentication: a selector in the root namespace is ignored",
                vec![
                    pa("istio-system", "default", Strict, &[], &[]),
                    pa("istio-system", "db", Disable, &app, &[]),
                ],
                None,
                Strict,
                "mesh-wide",
            ),
            (
                "other namespaces do not apply",
                vec![pa("other", "ns", Strict, &[], &[])],
                None,
                Permissive,
                "mesh default",
            ),
        ];
        for (rule, policies, port, want_mode, want_source) in rows {
            if rule.contains("root namespace is ignored") {
                // Also for a workload that lives in the root namespace.
                let r = resolve_peer_auth(
                    &policies,
                    "istio-system",
                    "istio-system",
                    &labels(&app),
                    port,
                );
                assert_eq!(
                    r.mode, want_mode,
                    "rule: {rule} (workload in the root namespace)"
                );
            }
            let r = resolve_peer_auth(&policies, "istio-system", "shop", &labels(&app), port);
            assert_eq!(r.mode, want_mode, "rule: {rule}");
            assert!(
                r.source.contains(want_source),
                "rule: {rule}: source {:?}",
                r.source
            );
        }
    }
}
