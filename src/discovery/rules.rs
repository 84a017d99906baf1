//! Which DestinationRule a client's sidecar gets for a host, as istiod computes it: rules are
//! indexed once per model (`push_context.go` `setDestinationRules`, rules for one host merged by
//! `destination_rule.go` `mergeDestinationRule`), looked up per client namespace
//! (`push_context.go` `destinationRule`) and chosen per client workload (`sidecar.go`
//! `SidecarScope.DestinationRule`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{
    istio::{resolve_host, DestinationRuleSpec},
    DestinationRule,
};

/// Rules for one host, merged as istiod merges them: subsets concatenated (first of a name
/// wins), the first top-level trafficPolicy kept.
#[derive(Clone, Debug)]
pub struct Consolidated {
    pub namespace: String,
    /// `namespace/name` of every rule merged in, in merge order.
    pub from: Vec<String>,
    /// The merged rule (its host resolved to a full name).
    pub spec: DestinationRuleSpec,
    export_to: BTreeSet<String>,
}

impl Consolidated {
    /// The first rule's name (`describe` shows `from` in full).
    pub fn name(&self) -> &str {
        self.from
            .first()
            .and_then(|f| f.split_once('/'))
            .map_or("", |(_, n)| n)
    }

    fn visible_to(&self, client_ns: &str) -> bool {
        self.export_to.is_empty()
            || self.export_to.contains("*")
            || self.export_to.contains(client_ns)
    }
}

#[derive(Default)]
struct HostRules {
    specific: HashMap<String, Vec<Consolidated>>,
    wildcard: HashMap<String, Vec<Consolidated>>,
}

impl HostRules {
    /// `config.go` `MostSpecificHostMatch`: the exact host, else the most specific wildcard.
    fn most_specific(&self, fqdn: &str) -> Option<&Vec<Consolidated>> {
        if let Some(v) = self.specific.get(fqdn) {
            return Some(v);
        }
        self.wildcard
            .iter()
            .filter(|(h, _)| fqdn.ends_with(&h[1..]))
            .max_by(|(a, _), (b, _)| a.len().cmp(&b.len()).then_with(|| b.cmp(a)))
            .map(|(_, v)| v)
    }

    /// `mergeDestinationRule` (with `ENABLE_ENHANCED_DESTINATIONRULE_MERGE`, on by default).
    fn merge(
        &mut self,
        ns: &str,
        name: &str,
        spec: &DestinationRuleSpec,
        export_to: &BTreeSet<String>,
    ) {
        let host = spec.host.clone();
        let map = if host.starts_with('*') {
            &mut self.wildcard
        } else {
            &mut self.specific
        };
        let fresh = || Consolidated {
            namespace: ns.to_owned(),
            from: vec![format!("{ns}/{name}")],
            spec: spec.clone(),
            export_to: export_to.clone(),
        };
        let Some(list) = map.get_mut(&host) else {
            map.insert(host, vec![fresh()]);
            return;
        };
        let mut append_separately = true;
        for mdr in list.iter_mut() {
            if *export_to == mdr.export_to {
                append_separately = false;
            } else if !mdr.export_to.is_empty() && export_to.is_superset(&mdr.export_to) {
                append_separately = true;
            } else {
                append_separately = true;
                continue;
            }
            let (new_sel, old_sel) = (&spec.workload_selector, &mdr.spec.workload_selector);
            let both_without = new_sel.is_none() && old_sel.is_none();
            let both_with = new_sel.is_some() && old_sel.is_some();
            let labels = |s: &Option<super::istio::WorkloadSelector>| {
                s.as_ref()
                    .map(|s| s.match_labels.clone())
                    .unwrap_or_default()
            };
            if both_with && labels(new_sel) != labels(old_sel) {
                append_separately = true;
                continue;
            }
            if both_without || both_with {
                append_separately = false;
            }
            mdr.from.push(format!("{ns}/{name}"));
            for s in &spec.subsets {
                if !mdr.spec.subsets.iter().any(|x| x.name == s.name) {
                    mdr.spec.subsets.push(s.clone());
                }
            }
            if mdr.spec.traffic_policy.is_none() {
                mdr.spec.traffic_policy = spec.traffic_policy.clone();
            }
        }
        if append_separately {
            list.push(fresh());
        }
    }
}

/// Every DestinationRule, indexed as istiod's push context indexes them.
pub struct RuleIndex {
    root: String,
    namespace_local: HashMap<String, HostRules>,
    exported: HashMap<String, HostRules>,
    root_local: HostRules,
    /// Namespaces whose clients may get another rule than a client in a namespace with no
    /// rules of its own that no `exportTo` names.
    pub special_namespaces: BTreeSet<String>,
    /// Namespaces with rules that carry a `workloadSelector` (the client's labels matter).
    pub selector_namespaces: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

impl RuleIndex {
    /// `setDestinationRules`: sorted with selector-bearing rules first, then by creation time
    /// and name; a rule with a `workloadSelector` is private to its namespace whatever its
    /// `exportTo`; a rule is visible in its own namespace only if its `exportTo` is empty or
    /// names `.`, `*` or that namespace.
    pub fn new(drs: &[DestinationRule], root: &str, domain: &str) -> Self {
        let mut sorted: Vec<&DestinationRule> = drs.iter().collect();
        sorted.sort_by(|a, b| {
            let sel = |d: &DestinationRule| d.spec.workload_selector.is_none();
            sel(a)
                .cmp(&sel(b))
                .then_with(|| {
                    a.metadata
                        .creation_timestamp
                        .cmp(&b.metadata.creation_timestamp)
                })
                .then_with(|| a.metadata.name.cmp(&b.metadata.name))
                .then_with(|| a.metadata.namespace.cmp(&b.metadata.namespace))
        });
        let mut idx = Self {
            root: root.to_owned(),
            namespace_local: HashMap::new(),
            exported: HashMap::new(),
            root_local: HostRules::default(),
            special_namespaces: BTreeSet::new(),
            selector_namespaces: BTreeMap::new(),
        };
        idx.special_namespaces.insert(root.to_owned());
        for d in sorted {
            let ns = d.metadata.namespace.as_deref().unwrap_or("default");
            let name = d.metadata.name.as_deref().unwrap_or("");
            let mut spec = d.spec.clone();
            spec.host = resolve_host(&spec.host, ns, domain);
            let export_to: BTreeSet<String> = match &spec.workload_selector {
                None => spec.export_to.iter().cloned().collect(),
                Some(sel) => {
                    idx.selector_namespaces
                        .entry(ns.to_owned())
                        .or_default()
                        .push(sel.match_labels.clone());
                    [".".to_owned()].into()
                }
            };
            idx.special_namespaces.insert(ns.to_owned());
            idx.special_namespaces.extend(
                export_to
                    .iter()
                    .filter(|e| !matches!(e.as_str(), "." | "*" | "~"))
                    .cloned(),
            );
            if export_to.is_empty()
                || export_to.contains("*")
                || export_to.contains(".")
                || export_to.contains(ns)
            {
                idx.namespace_local
                    .entry(ns.to_owned())
                    .or_default()
                    .merge(ns, name, &spec, &export_to);
            }
            // The default exportTo for DestinationRules is public: only `.` or the own
            // namespace alone keep a rule private.
            let private_only =
                export_to.len() == 1 && (export_to.contains(".") || export_to.contains(ns));
            if !private_only {
                // Matched against the client's namespace as written: `.` names no namespace
                // there (`getExportedDestinationRuleFromNamespace`).
                idx.exported
                    .entry(ns.to_owned())
                    .or_default()
                    .merge(ns, name, &spec, &export_to);
            } else if ns == root {
                idx.root_local.merge(ns, name, &spec, &export_to);
            }
        }
        idx
    }

    /// `push_context.go` `destinationRule`: the client namespace's rules (any exportTo that
    /// keeps them local), else the service namespace's exported rules, else the root
    /// namespace's; each step stops at the most specific host that has rules.
    fn candidates(&self, client_ns: &str, fqdn: &str, svc_ns: &str) -> Vec<&Consolidated> {
        let local = if client_ns != self.root {
            self.namespace_local.get(client_ns)
        } else {
            Some(&self.root_local)
        };
        if let Some(list) = local.and_then(|r| r.most_specific(fqdn)) {
            return list.iter().collect();
        }
        for ns in [svc_ns, self.root.as_str()] {
            if let Some(list) = self.exported.get(ns).and_then(|r| r.most_specific(fqdn)) {
                let out: Vec<&Consolidated> =
                    list.iter().filter(|d| d.visible_to(client_ns)).collect();
                if !out.is_empty() {
                    return out;
                }
            }
        }
        Vec::new()
    }

    /// `SidecarScope.DestinationRule`: among the candidates, a selector-bearing rule of the
    /// client's own namespace that selects the client wins; else the last rule without a
    /// selector; else none (a namespace whose rules for the host select other workloads
    /// gives this client no rule at all).
    pub fn choose(
        &self,
        client_ns: &str,
        labels: &BTreeMap<String, String>,
        fqdn: &str,
        svc_ns: &str,
    ) -> Option<&Consolidated> {
        let mut catch_all = None;
        for d in self.candidates(client_ns, fqdn, svc_ns) {
            match &d.spec.workload_selector {
                None => catch_all = Some(d),
                Some(sel) if d.namespace == client_ns => {
                    if sel
                        .match_labels
                        .iter()
                        .all(|(k, v)| labels.get(k) == Some(v))
                    {
                        return Some(d);
                    }
                }
                Some(_) => {}
            }
        }
        catch_all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dr(ns: &str, name: &str, created: &str, spec: serde_json::Value) -> DestinationRule {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
            "spec": spec,
        }))
        .unwrap()
    }

    const SVC: &str = "api.svc.svc.cluster.local";

    fn chosen(
        rules: &[DestinationRule],
        client_ns: &str,
        labels: &[(&str, &str)],
    ) -> Option<String> {
        let idx = RuleIndex::new(rules, "istio-system", "cluster.local");
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        idx.choose(client_ns, &labels, SVC, "svc")
            .map(|d| d.from.join("+"))
    }

    /// One row per rule of istiod's lookup, named after the function it follows.
    #[test]
    fn destination_rule_choice_table() {
        let t1 = "2026-01-01T00:00:00Z";
        let t2 = "2026-01-02T00:00:00Z";
        let host = json!(SVC);
        type Row = (
            &'static str,
            Vec<DestinationRule>,
            &'static str,
            Vec<(&'static str, &'static str)>,
            Option<&'static str>,
        );
        let rows: Vec<Row> = vec![
            (
                "destinationRule: the service namespace's rule applies to other namespaces",
                vec![dr("svc", "a", t1, json!({"host": host}))],
                "client",
                vec![],
                Some("svc/a"),
            ),
            (
                "setDestinationRules: exportTo applies in the rule's own namespace too (exportTo: [other] hides it from svc)",
                vec![dr("svc", "a", t1, json!({"host": host, "exportTo": ["other"]}))],
                "svc",
                vec![],
                None,
            ),
            (
                "setDestinationRules: exportTo [other] exports to other",
                vec![dr("svc", "a", t1, json!({"host": host, "exportTo": ["other"]}))],
                "other",
                vec![],
                Some("svc/a"),
            ),
            (
                "setDestinationRules: exportTo [.] is private",
                vec![dr("svc", "a", t1, json!({"host": host, "exportTo": ["."]}))],
                "client",
                vec![],
                None,
            ),
            (
                "setDestinationRules: any workloadSelector (even empty) makes a rule namespace-private",
                vec![dr("svc", "a", t1, json!({"host": host, "workloadSelector": {}}))],
                "client",
                vec![],
                None,
            ),
            (
                "SidecarScope.DestinationRule: an empty workloadSelector selects every client of its namespace",
                vec![dr("client", "a", t1, json!({"host": host, "workloadSelector": {}}))],
                "client",
                vec![],
                Some("client/a"),
            ),
            (
                "destinationRule: the lookup stops at the client namespace when it has rules for the host, even if none selects the client",
                vec![
                    dr("client", "sel", t1, json!({"host": host, "workloadSelector": {"matchLabels": {"app": "x"}}})),
                    dr("svc", "a", t1, json!({"host": host})),
                ],
                "client",
                vec![("app", "y")],
                None,
            ),
            (
                "SidecarScope.DestinationRule: a selecting rule of the client's namespace wins over its catch-all",
                vec![
                    dr("client", "all", t1, json!({"host": host})),
                    dr("client", "sel", t2, json!({"host": host, "workloadSelector": {"matchLabels": {"app": "x"}}})),
                ],
                "client",
                vec![("app", "x")],
                Some("client/sel"),
            ),
            (
                "mergeDestinationRule: rules for the same host and exportTo merge, the older first",
                vec![
                    dr("svc", "b", t2, json!({"host": host})),
                    dr("svc", "a", t1, json!({"host": host})),
                ],
                "client",
                vec![],
                Some("svc/a+svc/b"),
            ),
            (
                "mergeDestinationRule: different exportTo stay separate; the client sees the one exported to it",
                vec![
                    dr("svc", "a", t1, json!({"host": host, "exportTo": ["x"]})),
                    dr("svc", "b", t2, json!({"host": host, "exportTo": ["client"]})),
                ],
                "client",
                vec![],
                Some("svc/b"),
            ),
            (
                "MostSpecificHostMatch: the exact host beats a wildcard of the root namespace",
                vec![
                    dr("istio-system", "mesh", t1, json!({"host": "*.cluster.local"})),
                    dr("svc", "a", t2, json!({"host": "api"})),
                ],
                "client",
                vec![],
                Some("svc/a"),
            ),
            (
                "getExportedDestinationRuleFromNamespace: the most specific host not exported to the client hides less specific ones of that namespace",
                vec![
                    dr("svc", "exact", t1, json!({"host": host, "exportTo": ["other"]})),
                    dr("svc", "wild", t1, json!({"host": "*.svc.cluster.local"})),
                    dr("istio-system", "mesh", t1, json!({"host": "*.cluster.local"})),
                ],
                "client",
                vec![],
                Some("istio-system/mesh"),
            ),
        ];
        for (rule, rules, ns, labels, want) in rows {
            assert_eq!(chosen(&rules, ns, &labels).as_deref(), want, "rule: {rule}");
        }
    }

    /// `mergeDestinationRule`: subsets are concatenated, the first trafficPolicy wins.
    #[test]
    fn merged_rules_concatenate_subsets_and_keep_the_first_policy() {
        let rules = vec![
            dr(
                "svc",
                "a",
                "2026-01-01T00:00:00Z",
                json!({"host": SVC, "subsets": [{"name": "v1", "labels": {"v": "1"}}]}),
            ),
            dr(
                "svc",
                "b",
                "2026-01-02T00:00:00Z",
                json!({"host": SVC,
                "trafficPolicy": {"tls": {"mode": "DISABLE"}},
                "subsets": [{"name": "v1", "labels": {"v": "x"}}, {"name": "v2", "labels": {"v": "2"}}]}),
            ),
            dr(
                "svc",
                "c",
                "2026-01-03T00:00:00Z",
                json!({"host": SVC, "trafficPolicy": {"tls": {"mode": "SIMPLE"}}}),
            ),
        ];
        let idx = RuleIndex::new(&rules, "istio-system", "cluster.local");
        let d = idx.choose("client", &BTreeMap::new(), SVC, "svc").unwrap();
        let names: Vec<(&str, Option<&String>)> = d
            .spec
            .subsets
            .iter()
            .map(|s| (s.name.as_str(), s.labels.get("v")))
            .collect();
        assert_eq!(
            names,
            vec![
                ("v1", Some(&"1".to_string())),
                ("v2", Some(&"2".to_string()))
            ]
        );
        let tls = d.spec.traffic_policy.as_ref().and_then(|t| t.tls.as_ref());
        assert_eq!(tls.and_then(|t| t.mode.as_deref()), Some("DISABLE"));
        assert_eq!(d.from, vec!["svc/a", "svc/b", "svc/c"]);
    }
}
