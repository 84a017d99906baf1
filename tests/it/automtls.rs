//! Auto mTLS exactly as Istio decides it, and one decision for what meshid serves (EDS, the
//! Envoy cluster template) and what it explains (`describe`, with Istio's prediction next to
//! meshid's). Each row of the rules table names the Istio function it follows.

use meshid::discovery::{
    describe_service, envoy_cluster, Decision, DiscoveryView, MeshObjects, MeshSettings,
    MeshidGrpc, TlsMode,
};
use serde_json::{json, Value};

/// Builds kubectl-shaped objects in code.
#[derive(Default)]
pub struct Mesh {
    items: Vec<Value>,
    ip: u8,
}

/// A pod's sidecar as the pod declares it.
#[derive(Clone, Copy, PartialEq)]
pub enum Side {
    /// Labelled tlsMode=istio and running istio-proxy.
    Sidecar,
    /// Neither.
    None,
    /// Runs istio-proxy without the label.
    Unlabelled,
}

impl Mesh {
    pub fn new() -> Self {
        let mut m = Self::default();
        m.items.push(json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "istio-system", "creationTimestamp": "2026-11-01T00:00:00Z"},
            "spec": {"mtls": {"mode": "PERMISSIVE"}}}));
        m
    }

    /// A pod `name` in `ns` with labels `app: <app>` (+ extra), returning its IP.
    pub fn pod(
        &mut self,
        ns: &str,
        name: &str,
        app: &str,
        side: Side,
        extra: &[(&str, &str)],
    ) -> String {
        self.ip += 1;
        let ip = format!("10.250.0.{}", self.ip);
        let mut labels = json!({"app": app});
        for (k, v) in extra {
            labels[*k] = json!(v);
        }
        let mut containers =
            vec![json!({"name": app, "image": "example/app", "ports": [{"containerPort": 8080}]})];
        if side != Side::None {
            containers.push(json!({"name": "istio-proxy", "image": "istio/proxyv2"}));
        }
        if side == Side::Sidecar {
            labels["security.istio.io/tlsMode"] = json!("istio");
        }
        self.items.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels, "uid": format!("uid-{name}")},
            "spec": {"serviceAccountName": app, "containers": containers},
            "status": {"phase": "Running", "podIP": ip}}));
        ip
    }

    /// A Service `name` on port 8080 ("http") selecting `app: name`, with an EndpointSlice
    /// naming `pods` (name, ip).
    pub fn service(&mut self, ns: &str, name: &str, headless: bool, pods: &[(&str, &str)]) {
        self.items.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8080, "targetPort": 8080}],
                     "clusterIP": if headless { "None" } else { "10.96.1.1" }}}));
        let endpoints: Vec<Value> = pods
            .iter()
            .map(|(p, ip)| {
                json!({"addresses": [ip], "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": p, "namespace": ns}})
            })
            .collect();
        self.items.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "addressType": "IPv4",
            "metadata": {"name": format!("{name}-x1"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints}));
    }

    /// A service `name` in `ns` with one pod per `sides` entry (`name-<i>`).
    pub fn app(&mut self, ns: &str, name: &str, headless: bool, sides: &[Side]) {
        let mut pods = Vec::new();
        for (i, s) in sides.iter().enumerate() {
            let pn = format!("{name}-{i}");
            let ip = self.pod(ns, &pn, name, *s, &[]);
            pods.push((pn, ip));
        }
        let refs: Vec<(&str, &str)> = pods.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        self.service(ns, name, headless, &refs);
    }

    pub fn peer_auth(&mut self, ns: &str, name: &str, selector: Option<(&str, &str)>, mode: &str) {
        let mut spec = json!({"mtls": {"mode": mode}});
        if let Some((k, v)) = selector {
            spec["selector"] = json!({"matchLabels": {k: v}});
        }
        self.items.push(json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2026-11-02T00:00:00Z"}, "spec": spec}));
    }

    pub fn dr(&mut self, ns: &str, name: &str, spec: Value) {
        self.items.push(json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2026-11-02T00:00:00Z"}, "spec": spec}));
    }

    pub fn raw(&mut self, v: Value) {
        self.items.push(v);
    }

    pub fn json(&self) -> Value {
        json!({"apiVersion": "v1", "kind": "List", "items": self.items})
    }

    pub fn objects(&self) -> MeshObjects {
        MeshObjects::from_snapshot(self.json().to_string().as_bytes()).unwrap()
    }
}

use Decision::{Mtls, Plaintext, Tls, WillFail};
use Side::{None as NoSidecar, Sidecar, Unlabelled};

/// One row: the rule (with the Istio function it follows), the service, and per endpoint
/// (meshid's decision, Istio's decision, meshid's EDS tlsMode).
struct Row {
    rule: &'static str,
    service: &'static str,
    want: Vec<(Decision, Decision, TlsMode)>,
}

/// The rules fixture: one service per rule, in namespace `rules` (and `nsdis`, whose
/// namespace policy is DISABLE).
fn rules_mesh() -> (Mesh, Vec<Row>) {
    use TlsMode::{Disabled as D, Istio as I};
    let mut m = Mesh::new();
    let mut rows = Vec::new();
    // 1
    m.app("rules", "nomode", false, &[Sidecar]);
    m.dr(
        "rules",
        "nomode",
        json!({"host": "nomode", "trafficPolicy": {"tls": {}}}),
    );
    rows.push(Row {
        rule: "ClientTLSSettings: a tls block without mode is DISABLE (the enum's zero value; buildAutoMtlsSettings)",
        service: "nomode.rules",
        want: vec![(Plaintext, Plaintext, D)],
    });
    // 2
    m.app("rules", "portauto", false, &[Sidecar, NoSidecar]);
    m.dr("rules", "portauto", json!({"host": "portauto", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"},
        "portLevelSettings": [{"port": {"number": 8080}, "loadBalancer": {"simple": "ROUND_ROBIN"}}]}}));
    rows.push(Row {
        rule: "util.go GetPortLevelTrafficPolicy: a port entry without tls means auto mTLS on the cluster; mtls_checker.go checkMtlsEnabled (top-level ISTIO_MUTUAL) can only keep an endpoint's own tlsMode (buildEnvoyLbEndpoint): the endpoint without sidecar stays plaintext",
        service: "portauto.rules",
        want: vec![(Mtls, Mtls, I), (Plaintext, Plaintext, D)],
    });
    // 3
    m.app("rules", "portdisable", false, &[Sidecar]);
    m.dr(
        "rules",
        "portdisable",
        json!({"host": "portdisable", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"},
        "portLevelSettings": [{"port": {"number": 8080}, "tls": {}}]}}),
    );
    rows.push(Row {
        rule: "GetPortLevelTrafficPolicy + trafficPolicyTLSModeForPort: a port entry's tls without mode is DISABLE on both sides",
        service: "portdisable.rules",
        want: vec![(Plaintext, Plaintext, D)],
    });
    // 4
    m.app("rules", "padisable", false, &[Sidecar]);
    m.peer_auth("rules", "padisable", Some(("app", "padisable")), "DISABLE");
    m.dr(
        "rules",
        "padisable",
        json!({"host": "padisable", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
    );
    rows.push(Row {
        rule: "buildAutoMtlsSettings (user-supplied ISTIO_MUTUAL) to a sidecar whose PeerAuthentication is DISABLE: its inbound is plaintext only, will fail",
        service: "padisable.rules",
        want: vec![(WillFail, WillFail, I)],
    });
    // 5
    m.app("rules", "wldisable", false, &[Sidecar]);
    m.peer_auth("rules", "wldisable", Some(("app", "wldisable")), "DISABLE");
    rows.push(Row {
        rule: "mtls_checker.go checkMtlsEnabled: a workload PeerAuthentication DISABLE takes the endpoint's metadata off tlsMode istio",
        service: "wldisable.rules",
        want: vec![(Plaintext, Plaintext, D)],
    });
    // 6
    m.peer_auth("nsdis", "default", None, "DISABLE");
    m.app("nsdis", "wlstrict", false, &[Sidecar]);
    m.peer_auth("nsdis", "wlstrict", Some(("app", "wlstrict")), "STRICT");
    rows.push(Row {
        rule: "push_context.go BestEffortInferServiceMTLSMode: namespace DISABLE with a workload STRICT override: Istio sends plaintext and fails; meshid follows the workload policy",
        service: "wlstrict.nsdis",
        want: vec![(Mtls, WillFail, I)],
    });
    // 7
    m.app("rules", "headless", true, &[Sidecar, NoSidecar]);
    rows.push(Row {
        rule: "BestEffortInferServiceMTLSMode: a passthrough (headless) service with an endpoint without sidecar gets plaintext to every endpoint",
        service: "headless.rules",
        want: vec![(Mtls, Plaintext, I), (Plaintext, Plaintext, D)],
    });
    // 8
    let a = m.pod("rules", "headless2-0", "headless2", Sidecar, &[]);
    let b = m.pod(
        "rules",
        "headless2-1",
        "headless2",
        Sidecar,
        &[("instance", "b")],
    );
    m.service(
        "rules",
        "headless2",
        true,
        &[("headless2-0", &a), ("headless2-1", &b)],
    );
    m.peer_auth("rules", "headless2-1", Some(("instance", "b")), "DISABLE");
    rows.push(Row {
        rule: "BestEffortInferServiceMTLSMode + applyUpstreamTLSSettings: a headless service all with sidecars gets ISTIO_MUTUAL on an ORIGINAL_DST cluster with no socket matches: a DISABLE endpoint fails",
        service: "headless2.rules",
        want: vec![(Mtls, Mtls, I), (Plaintext, WillFail, D)],
    });
    // 9
    m.app("rules", "unlabelled", false, &[Unlabelled]);
    m.peer_auth("rules", "unlabelled", Some(("app", "unlabelled")), "STRICT");
    rows.push(Row {
        rule: "model.GetTLSModeFromEndpointLabels: the label decides, not the running container: a pod running istio-proxy without it is sent plaintext and fails under STRICT",
        service: "unlabelled.rules",
        want: vec![(WillFail, WillFail, D)],
    });
    // 10
    m.app("rules", "dotted", false, &[NoSidecar]);
    m.dr(
        "rules",
        "dotted",
        json!({"host": "dotted.rules", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
    );
    rows.push(Row {
        rule: "model.ResolveShortnameToFQDN: only a host without a dot is expanded; dotted.rules is not dotted.rules.svc.cluster.local",
        service: "dotted.rules",
        want: vec![(Plaintext, Plaintext, D)],
    });
    // 11
    m.app("rules", "plainsvc", false, &[Sidecar, NoSidecar]);
    rows.push(Row {
        rule: "checkMtlsEnabled: for ClusterIP services Istio already decides per endpoint (the label)",
        service: "plainsvc.rules",
        want: vec![(Mtls, Mtls, I), (Plaintext, Plaintext, D)],
    });
    (m, rows)
}

/// What the client proxy sends through `cluster` (Envoy JSON) to an endpoint with `meta`.
fn sends(cluster: &Value, meta: TlsMode) -> &'static str {
    if let Some(matches) = cluster["transport_socket_matches"].as_array() {
        let chosen = matches
            .iter()
            .find(|m| {
                m["match"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| k == "tlsMode" && v == "istio" && meta == TlsMode::Istio)
            })
            .unwrap();
        return match chosen["transport_socket"]["name"].as_str().unwrap() {
            "envoy.transport_sockets.tls" => "mtls",
            _ => "plaintext",
        };
    }
    let ts = &cluster["transport_socket"];
    if ts.is_null() {
        return "plaintext";
    }
    let ctx = &ts["typed_config"]["common_tls_context"];
    if ctx["tls_certificate_sds_secret_configs"].is_array() {
        "mtls"
    } else {
        "tls"
    }
}

/// The table, against `describe` (meshid's and Istio's answers) and against what meshid serves
/// (EDS metadata and the cluster template), which must agree with `describe`.
#[test]
fn istio_rules_table_against_describe_eds_and_template() {
    let (m, rows) = rules_mesh();
    let objs = m.objects();
    let s = MeshSettings::default();
    let view = DiscoveryView::build(&objs, &s);
    let td = meshid::spiffe::TrustDomain::new("cluster.local").unwrap();
    for row in &rows {
        let r = describe_service(&objs, &s, row.service, None).unwrap();
        let got: Vec<(Decision, Decision, TlsMode)> = r
            .endpoints
            .iter()
            .map(|e| (e.decision, e.istio.decision, e.eds_tls_mode))
            .collect();
        assert_eq!(got, row.want, "rule: {}\n{r:#?}", row.rule);
        // What meshid serves says the same as what it explains.
        let cluster =
            envoy_cluster(&objs, &s, row.service, 8080, &td, &MeshidGrpc::default()).unwrap();
        let eds = &view.clusters[cluster["name"].as_str().unwrap()];
        for e in &r.endpoints {
            let served = eds
                .iter()
                .find(|x| x.address == e.address)
                .unwrap_or_else(|| panic!("rule: {}: {} not served", row.rule, e.address));
            assert_eq!(served.tls_mode, e.eds_tls_mode, "rule: {}", row.rule);
            let sent = sends(&cluster, served.tls_mode);
            match e.decision {
                Mtls => assert_eq!(sent, "mtls", "rule: {}", row.rule),
                Plaintext => assert_eq!(sent, "plaintext", "rule: {}", row.rule),
                Tls => assert_eq!(sent, "tls", "rule: {}", row.rule),
                WillFail => {
                    let said = match sent {
                        "mtls" => "mTLS is sent",
                        "plaintext" => "plaintext is sent",
                        _ => "TLS without a mesh certificate is sent",
                    };
                    assert!(
                        e.why.contains(said),
                        "rule: {}: sent {sent}, why {}",
                        row.rule,
                        e.why
                    );
                }
                other => panic!("rule: {}: {other:?}", row.rule),
            }
        }
        assert!(
            r.clusters[0].tls_why.len() > 3 && !r.endpoints.iter().any(|e| e.why.is_empty()),
            "rule: {}",
            row.rule
        );
    }
}

/// Which side decided is said, and Istio's cluster-side limits are explained.
#[test]
fn describe_says_which_side_decided_and_why_istio_differs() {
    let (m, _) = rules_mesh();
    let objs = m.objects();
    let s = MeshSettings::default();
    let r = describe_service(&objs, &s, "portauto.rules", None).unwrap();
    let dr = r.destination_rule.as_ref().unwrap();
    assert!(dr.cluster_side.starts_with("port 8080 entry"), "{dr:?}");
    assert!(dr.endpoint_side.ends_with("ISTIO_MUTUAL"), "{dr:?}");
    assert_eq!(r.endpoints[1].decided_by, "endpoint");
    let r = describe_service(&objs, &s, "wlstrict.nsdis", None).unwrap();
    assert_eq!(r.istio_differs, 1);
    assert!(r.clusters[0]
        .istio_tls_why
        .contains("BestEffortInferServiceMTLSMode"));
    assert!(r.endpoints[0]
        .istio
        .why
        .contains("plaintext is sent to a STRICT destination"));
    let r = describe_service(&objs, &s, "headless2.rules", None).unwrap();
    assert_eq!(r.endpoints[1].istio.decided_by, "cluster");
    assert!(
        r.endpoints[1].istio.why.contains("DISABLE"),
        "{}",
        r.endpoints[1].istio.why
    );
}

/// `push_context.go` `destinationRule`: the client's namespace first, then the service's
/// (only rules exported to the client), then the root namespace; a selector-bearing rule only
/// for the clients it selects (`SidecarScope.DestinationRule`), and a client namespace with
/// rules for the host ends the lookup even when none selects the client.
#[test]
fn destination_rule_lookup_order_export_to_and_workload_selector() {
    let mut m = Mesh::new();
    m.app("svcns", "api", false, &[Sidecar]);
    m.pod("client1", "c1", "c1", Sidecar, &[]);
    m.pod("client2", "c2", "c2", Sidecar, &[]);
    m.pod("client3", "c3", "c3", Sidecar, &[("role", "special")]);
    m.pod("client3", "c4", "c4", Sidecar, &[]);
    // The service's namespace: SIMPLE, exported only to its own namespace.
    m.dr(
        "svcns",
        "api",
        json!({"host": "api.svcns.svc.cluster.local", "exportTo": ["."],
        "trafficPolicy": {"tls": {"mode": "SIMPLE"}}}),
    );
    // client1's own rule wins for client1.
    m.dr("client1", "api", json!({"host": "api.svcns.svc.cluster.local", "trafficPolicy": {"tls": {"mode": "DISABLE"}}}));
    // client3: a selector-bearing rule in its namespace, only for role=special.
    m.dr("client3", "api-special", json!({"host": "api.svcns.svc.cluster.local",
        "workloadSelector": {"matchLabels": {"role": "special"}}, "trafficPolicy": {"tls": {"mode": "DISABLE"}}}));
    // The root namespace: ISTIO_MUTUAL, for everyone else.
    m.dr(
        "istio-system",
        "mesh",
        json!({"host": "*.svc.cluster.local", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
    );
    let objs = m.objects();
    let s = MeshSettings::default();
    let from = |c: Option<&str>| {
        let r = describe_service(&objs, &s, "api.svcns", c).unwrap();
        (
            r.destination_rule
                .map(|d| format!("{}/{}", d.namespace, d.name)),
            r.endpoints[0].decision,
        )
    };
    assert_eq!(
        from(Some("c1.client1")),
        (Some("client1/api".into()), Plaintext)
    );
    assert_eq!(
        from(Some("c2.client2")),
        (Some("istio-system/mesh".into()), Mtls),
        "the service namespace's rule is not exported to client2"
    );
    assert_eq!(
        from(Some("c3.client3")),
        (Some("client3/api-special".into()), Plaintext)
    );
    assert_eq!(
        from(Some("c4.client3")),
        (None, Mtls),
        "push_context.go destinationRule stops at client3, which has a rule for the host; SidecarScope.DestinationRule: it does not select c4, so c4 gets no rule at all"
    );
    assert_eq!(from(None), (Some("svcns/api".into()), Tls));
}

const EXTERNAL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/examples/external-service.yaml"
);

/// The mission document's external-service example: a MESH_EXTERNAL ServiceEntry with a
/// DestinationRule SIMPLE is TLS origination, not mTLS (`cluster_tls.go`
/// `buildAutoMtlsSettings`: a user-supplied mode wins; mesh-external never gets auto mTLS).
#[test]
fn external_service_example_is_tls_origination() {
    let objs = MeshObjects::from_snapshot(&std::fs::read(EXTERNAL).unwrap()).unwrap();
    let s = MeshSettings::default();
    let r = describe_service(&objs, &s, "api.external-service.com", None).unwrap();
    assert_eq!(
        (r.kind, r.mesh_external, r.resolution.as_str()),
        ("ServiceEntry", true, "DNS")
    );
    let e = &r.endpoints[0];
    assert_eq!(
        (e.address.as_str(), e.port, e.decision),
        ("api.external-service.com", 443, Tls)
    );
    assert_eq!(e.decided_by, "cluster");
    assert!(e.why.contains("TLS origination"), "{}", e.why);
    assert!(
        !r.clusters[0].served_by_eds,
        "DNS entries are not EDS clusters"
    );
    // The same by the ServiceEntry's name.
    let by_name = describe_service(&objs, &s, "external-api.shop", None).unwrap();
    assert_eq!(by_name.endpoints[0].decision, Tls);
    let td = meshid::spiffe::TrustDomain::new("cluster.local").unwrap();
    let c = envoy_cluster(
        &objs,
        &s,
        "api.external-service.com",
        443,
        &td,
        &MeshidGrpc::default(),
    )
    .unwrap();
    assert_eq!(c["type"], "STRICT_DNS");
    assert!(c["transport_socket_matches"].is_null());
    assert_eq!(
        c["transport_socket"]["typed_config"]["sni"],
        "api.external-service.com"
    );
    assert_eq!(sends(&c, TlsMode::Disabled), "tls");
    // Without the DestinationRule: plaintext, because auto mTLS does not apply to it.
    let mut bare = objs.clone();
    bare.destination_rules.clear();
    let r = describe_service(&bare, &s, "api.external-service.com", None).unwrap();
    assert_eq!(r.endpoints[0].decision, Plaintext);
    assert!(
        r.endpoints[0].why.contains("mesh-external"),
        "{}",
        r.endpoints[0].why
    );
    // And the CLI says so.
    let o = crate::support::meshid(&[
        "describe",
        "service",
        "api.external-service.com",
        "--snapshot",
        EXTERNAL,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("-> TLS origination (SIMPLE)"), "{text}");
    assert!(text.contains("external-api-tls"), "{text}");
}

/// VMs: WorkloadEntries with and without the tlsMode label, selected by a MESH_INTERNAL STATIC
/// ServiceEntry's workloadSelector (and one by a Service's selector): EDS serves them with
/// their tlsMode, on the WorkloadEntry's own port for the port name.
#[test]
fn workload_entries_selected_by_service_entry_and_service() {
    let mut m = Mesh::new();
    m.raw(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "vms", "namespace": "vm", },
        "spec": {"hosts": ["vm.internal"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                 "exportTo": ["."],
                 "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                 "workloadSelector": {"labels": {"app": "vm"}}}}),
    );
    m.raw(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "vm-a", "namespace": "vm"},
        "spec": {"address": "10.1.0.5", "ports": {"http": 9080}, "network": "vpc-1",
                 "serviceAccount": "vm-sa",
                 "labels": {"app": "vm", "security.istio.io/tlsMode": "istio"}}}),
    );
    m.raw(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "vm-b", "namespace": "vm"},
        "spec": {"address": "10.1.0.6", "ports": {"http": 9080}, "labels": {"app": "vm"}}}),
    );
    // A Service whose selector picks a WorkloadEntry (and no pod).
    m.service("vm", "db", false, &[]);
    m.raw(json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "db-vm", "namespace": "vm"},
        "spec": {"address": "10.1.0.7", "labels": {"app": "db", "security.istio.io/tlsMode": "istio"}}}));
    m.pod("other", "client", "client", Sidecar, &[]);
    let objs = m.objects();
    let s = MeshSettings::default();
    let view = DiscoveryView::build(&objs, &s);
    let served: Vec<(String, u16, TlsMode, Option<String>)> = view.clusters
        ["outbound|8080||vm.internal"]
        .iter()
        .map(|e| (e.address.clone(), e.port, e.tls_mode, e.network.clone()))
        .collect();
    assert_eq!(
        served,
        [
            (
                "10.1.0.5".into(),
                9080,
                TlsMode::Istio,
                Some("vpc-1".into())
            ),
            ("10.1.0.6".into(), 9080, TlsMode::Disabled, None)
        ]
    );
    let r = describe_service(&objs, &s, "vm.internal", None).unwrap();
    let got: Vec<(&str, Decision)> = r
        .endpoints
        .iter()
        .map(|e| (e.workload.as_str(), e.decision))
        .collect();
    assert_eq!(
        got,
        [
            ("workloadentry vm-a.vm", Mtls),
            ("workloadentry vm-b.vm", Plaintext)
        ]
    );
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    // exportTo ".": a client in another namespace does not see it, and describe says so.
    let r = describe_service(&objs, &s, "vm.internal", Some("client.other")).unwrap();
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("not exported to namespace other")),
        "{:?}",
        r.warnings
    );
    // The Service selecting a WorkloadEntry: its endpoint, on the service's target port.
    assert_eq!(
        view.clusters["outbound|8080||db.vm.svc.cluster.local"]
            .iter()
            .map(|e| (e.address.as_str(), e.port, e.tls_mode))
            .collect::<Vec<_>>(),
        [("10.1.0.7", 8080, TlsMode::Istio)]
    );
    // The template's SANs come from the WorkloadEntry's service account.
    let td = meshid::spiffe::TrustDomain::new("cluster.local").unwrap();
    let c = envoy_cluster(&objs, &s, "vms.vm", 8080, &td, &MeshidGrpc::default()).unwrap();
    let ctx =
        &c["transport_socket_matches"][0]["transport_socket"]["typed_config"]["common_tls_context"];
    assert_eq!(
        ctx["combined_validation_context"]["default_validation_context"]
            ["match_typed_subject_alt_names"][0]["matcher"]["exact"],
        "spiffe://cluster.local/ns/vm/sa/vm-sa"
    );
}

/// Subsets: EDS serves `outbound|<port>|<subset>|<host>` with the subset's endpoints; a
/// subset's own traffic policy decides its endpoints' metadata (`tlsModeForDestinationRule`)
/// and, merged over the top level, its cluster (`MergeSubsetTrafficPolicy`).
#[test]
fn subsets_are_served_by_eds() {
    let mut m = Mesh::new();
    let a = m.pod(
        "rules",
        "reviews-v1",
        "reviews",
        Sidecar,
        &[("version", "v1")],
    );
    let b = m.pod(
        "rules",
        "reviews-v2",
        "reviews",
        Sidecar,
        &[("version", "v2")],
    );
    m.service(
        "rules",
        "reviews",
        false,
        &[("reviews-v1", &a), ("reviews-v2", &b)],
    );
    m.dr("rules", "reviews", json!({"host": "reviews", "subsets": [
        {"name": "v1", "labels": {"version": "v1"}},
        {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {"tls": {"mode": "DISABLE"}}}]}));
    let objs = m.objects();
    let s = MeshSettings::default();
    let view = DiscoveryView::build(&objs, &s);
    let fqdn = "reviews.rules.svc.cluster.local";
    let get = |subset: &str| -> Vec<(String, TlsMode)> {
        view.clusters[&format!("outbound|8080|{subset}|{fqdn}")]
            .iter()
            .map(|e| (e.address.clone(), e.tls_mode))
            .collect()
    };
    assert_eq!(
        get(""),
        [(a.clone(), TlsMode::Istio), (b.clone(), TlsMode::Istio)]
    );
    assert_eq!(get("v1"), [(a, TlsMode::Istio)]);
    assert_eq!(get("v2"), [(b, TlsMode::Disabled)]);
    let r = describe_service(&objs, &s, "reviews.rules", None).unwrap();
    let v2 = r
        .clusters
        .iter()
        .find(|c| c.subset.as_deref() == Some("v2"))
        .unwrap();
    assert_eq!(v2.tls, meshid::discovery::ClusterTls::Plain);
}

/// Sidecars proven by their proxies (`discovery.require_proxy_proof`): a pod labelled for a
/// sidecar with no SDS stream is served tlsMode disabled and counted; once a stream whose token
/// names the pod (name and UID) is open it is served tlsMode istio, and `describe` says
/// "proxy connected since"; after the stream closes and the grace period is over (the injected
/// clock moves), it is served disabled again.
mod proof_by_proxy {
    use std::{sync::Arc, time::Duration};

    use envoy_types::pb::envoy::service::{
        discovery::v3::{DiscoveryRequest, DiscoveryResponse},
        endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient,
    };
    use meshid::{
        api::ENDPOINT_TYPE_URL,
        clock::{Clock, ManualClock},
        config,
        discovery::{describe_service_with, MeshSettings, ProxyProof},
        identity::dev_issuer::TokenRequest,
    };
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    use super::{Mesh, Side};
    use crate::server_support::{bearer, now, TestServer};

    const WEB: &str = "outbound|8080||web.shop.svc.cluster.local";

    /// The tlsMode metadata of the only endpoint of WEB in `r`.
    fn tls_of(r: &DiscoveryResponse) -> Option<String> {
        use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
        use prost::Message;
        let cla = ClusterLoadAssignment::decode(r.resources[0].value.as_slice()).unwrap();
        let ep = &cla.endpoints[0].lb_endpoints[0];
        ep.metadata
            .as_ref()
            .and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"))
            .and_then(|s| match s.fields.get("tlsMode")?.kind.as_ref()? {
                envoy_types::pb::google::protobuf::value::Kind::StringValue(v) => Some(v.clone()),
                _ => None,
            })
    }

    async fn recv<T>(rx: &mut tonic::Streaming<T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), rx.message())
            .await
            .expect("a response within 5 s")
            .unwrap()
            .unwrap()
    }

    fn gauge(server: &TestServer) -> String {
        server
            .running
            .metrics
            .render()
            .lines()
            .find(|l| l.starts_with("meshid_discovery_declared_without_proxy "))
            .unwrap_or("")
            .to_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_declared_sidecar_counts_only_once_its_proxy_fetched_a_certificate() {
        let mut m = Mesh::new();
        m.app("shop", "web", false, &[Side::Sidecar]);
        let objs = m.objects();
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("mesh.json");
        std::fs::write(&snapshot, m.json().to_string()).unwrap();
        let clock = Arc::new(ManualClock::new(now()));
        let snap = snapshot.clone();
        let server = TestServer::start_with(clock.clone(), move |cfg| {
            cfg.discovery = Some(config::Discovery {
                snapshot: Some(snap),
                require_proxy_proof: true,
                proxy_proof_grace: Duration::from_secs(60),
                ..Default::default()
            })
        })
        .await;
        let registry = server
            .running
            .proxies
            .clone()
            .expect("a registry with discovery on");
        let settings = MeshSettings {
            require_proxy_proof: true,
            ..Default::default()
        };
        // A client's EDS stream for web.
        let mut eds = EndpointDiscoveryServiceClient::with_interceptor(
            server.channel().await,
            bearer(Some(server.token("shop", "client"))),
        );
        let (tx, out) = mpsc::channel(8);
        let mut rx = eds
            .stream_endpoints(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        let req = |nonce: &str| DiscoveryRequest {
            resource_names: vec![WEB.into()],
            type_url: ENDPOINT_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        };
        tx.send(req("")).await.unwrap();
        let r = recv(&mut rx).await;
        assert_eq!(tls_of(&r), None, "declared but silent: served disabled");
        let report = describe_service_with(
            &objs,
            &settings,
            &registry.snapshot(),
            "web.shop",
            None,
            false,
        )
        .unwrap();
        assert_eq!(
            report.endpoints[0].sidecar_state,
            "declared (tlsMode=istio) but no proxy has fetched a certificate"
        );
        assert!(report.endpoints[0].eds_tls_mode == meshid::discovery::TlsMode::Disabled);
        // The gauge is set by its own task: wait for it (bounded).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while gauge(&server) != "meshid_discovery_declared_without_proxy 1" {
            assert!(std::time::Instant::now() < deadline, "{}", gauge(&server));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tx.send(req(&r.nonce)).await.unwrap();

        // The pod's proxy opens its SDS stream; its token names the pod.
        let token = server
            .issuer
            .token(
                &TokenRequest {
                    namespace: "shop".into(),
                    service_account: "web".into(),
                    audiences: vec!["istio-ca".into()],
                    ttl: Duration::from_secs(3600),
                    pod: Some(("web-0".into(), "uid-web-0".into())),
                },
                clock.now(),
            )
            .unwrap();
        let mut sds = server.sds(Some(token)).await;
        let (stx, sout) = mpsc::channel(8);
        let mut srx = sds
            .stream_secrets(ReceiverStream::new(sout))
            .await
            .unwrap()
            .into_inner();
        stx.send(DiscoveryRequest {
            resource_names: vec!["default".into()],
            type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let _ = recv(&mut srx).await;
        let r = recv(&mut rx).await;
        assert_eq!(tls_of(&r).as_deref(), Some("istio"), "proven: served istio");
        let report = describe_service_with(
            &objs,
            &settings,
            &registry.snapshot(),
            "web.shop",
            None,
            false,
        )
        .unwrap();
        assert!(
            report.endpoints[0]
                .sidecar_state
                .starts_with("proxy connected since "),
            "{}",
            report.endpoints[0].sidecar_state
        );
        tx.send(req(&r.nonce)).await.unwrap();

        // The stream closes: still proven within the grace period ...
        drop(stx);
        drop(srx);
        drop(sds);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !matches!(
            registry.snapshot().proof_of(&meshid::discovery::PodName {
                cluster: "Kubernetes",
                namespace: "shop",
                name: "web-0"
            }),
            ProxyProof::Recent { .. }
        ) {
            assert!(
                std::time::Instant::now() < deadline,
                "the closed stream was not noticed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // ... and not after it.
        clock.advance(Duration::from_secs(61));
        let r = recv(&mut rx).await;
        assert_eq!(tls_of(&r), None, "grace over: served disabled again");
        server.running.shutdown().await;
    }
}

/// `describe --mesh istio` prints Istio's answer where it differs (`BestEffortInferServiceMTLSMode`
/// on a namespace DISABLE with a workload STRICT), and `--clients` lists each client pod and
/// how it reaches the service, like `istioctl x describe`.
#[test]
fn describe_cli_mesh_istio_and_clients() {
    let (mut m, _) = rules_mesh();
    m.pod("nsdis", "legacy-client", "legacy-client", NoSidecar, &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.json");
    std::fs::write(&path, m.json().to_string()).unwrap();
    let snap = path.to_str().unwrap();
    let o = crate::support::meshid(&[
        "describe",
        "service",
        "wlstrict.nsdis",
        "--snapshot",
        snap,
        "--mesh",
        "istio",
        "--clients",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("-> mTLS"), "{text}");
    assert!(
        text.contains("istio: will fail (cluster side): plaintext is sent to a STRICT destination"),
        "{text}"
    );
    assert!(
        text.contains("istio: no TLS (namespace/mesh PeerAuthentication DISABLE"),
        "{text}"
    );
    assert!(
        text.contains("Istio would decide otherwise for 1 endpoint(s)"),
        "{text}"
    );
    assert!(
        text.contains("legacy-client.nsdis (no sidecar): will fail (1 of 1 endpoints)"),
        "{text}"
    );
    assert!(text.contains("wlstrict-0.nsdis (sidecar): mTLS"), "{text}");
    // Without --mesh istio, Istio's answer is only in the JSON.
    let o = crate::support::meshid(&[
        "describe",
        "service",
        "wlstrict.nsdis",
        "--snapshot",
        snap,
        "--output",
        "json",
    ]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["endpoints"][0]["istio"]["decision"], "will-fail");
    assert_eq!(v["endpoints"][0]["decision"], "mtls");
    assert_eq!(v["istio_differs"], 1);
}

/// Multi-cluster discovery through two fake API servers: one service with endpoints in both,
/// merged per hostname, each endpoint in its cluster's locality; one API server stopped: its
/// endpoints stay, marked stale, and the other cluster carries on. The remote cluster comes
/// from the config, or from Istio's remote secret in the primary cluster.
mod multi_cluster {
    use std::{collections::BTreeMap, sync::Arc, time::Duration};

    use envoy_types::pb::envoy::{
        config::endpoint::v3::ClusterLoadAssignment,
        service::{
            discovery::v3::{DiscoveryRequest, DiscoveryResponse},
            endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient,
        },
    };
    use meshid::{api::ENDPOINT_TYPE_URL, clock::SystemClock, config};
    use prost::Message;
    use serde_json::json;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    use super::{Mesh, Side};
    use crate::{
        fake_apiserver::FakeApiServer,
        server_support::{bearer, TestServer},
    };

    const WEB: &str = "outbound|8080||web.shop.svc.cluster.local";

    /// (cluster, address, tlsMode, stale) per endpoint.
    type Seen = Vec<(String, String, Option<String>, bool)>;

    fn seen(r: &DiscoveryResponse) -> Seen {
        use envoy_types::pb::{
            envoy::config::{
                core::v3::address::Address, endpoint::v3::lb_endpoint::HostIdentifier,
            },
            google::protobuf::value::Kind,
        };
        let cla = ClusterLoadAssignment::decode(r.resources[0].value.as_slice()).unwrap();
        let mut out = Vec::new();
        for l in &cla.endpoints {
            let cluster = l
                .locality
                .as_ref()
                .map(|x| x.sub_zone.clone())
                .unwrap_or_default();
            for e in &l.lb_endpoints {
                let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    panic!()
                };
                let Some(Address::SocketAddress(sa)) =
                    ep.address.as_ref().and_then(|a| a.address.clone())
                else {
                    panic!()
                };
                let md = |k: &str, f: &str| {
                    e.metadata
                        .as_ref()?
                        .filter_metadata
                        .get(k)?
                        .fields
                        .get(f)?
                        .kind
                        .clone()
                };
                let tls = match md("envoy.transport_socket_match", "tlsMode") {
                    Some(Kind::StringValue(v)) => Some(v),
                    _ => None,
                };
                let stale = matches!(md("meshid.discovery", "stale"), Some(Kind::BoolValue(true)));
                out.push((cluster.clone(), sa.address, tls, stale));
            }
        }
        out
    }

    fn cluster_objects(api: &FakeApiServer, pod: &str, side: Side) {
        let mut m = Mesh::default();
        m.app("shop", "web", false, &[side]);
        // Distinct pod names and IPs per cluster.
        let mut doc = m.json();
        let text = doc.to_string().replace("web-0", pod).replace(
            "10.250.0.1",
            if pod == "web-a" {
                "10.1.0.1"
            } else {
                "10.2.0.1"
            },
        );
        doc = serde_json::from_str(&text).unwrap();
        api.put_all(&doc);
    }

    async fn eds_until(server: &TestServer, want: impl Fn(&Seen) -> bool) -> Seen {
        let mut client = EndpointDiscoveryServiceClient::with_interceptor(
            server.channel().await,
            bearer(Some(server.token("shop", "client"))),
        );
        let (tx, out) = mpsc::channel(8);
        let mut rx = client
            .stream_endpoints(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        let req = |nonce: String| DiscoveryRequest {
            resource_names: vec![WEB.into()],
            type_url: ENDPOINT_TYPE_URL.into(),
            response_nonce: nonce,
            ..Default::default()
        };
        tx.send(req(String::new())).await.unwrap();
        loop {
            let r = tokio::time::timeout(Duration::from_secs(10), rx.message())
                .await
                .expect("EDS reached the wanted state within 10 s")
                .unwrap()
                .unwrap();
            let s = seen(&r);
            if want(&s) {
                return s;
            }
            tx.send(req(r.nonce)).await.unwrap();
        }
    }

    fn kubeconfig(dir: &std::path::Path, name: &str, api: &FakeApiServer) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, api.kubeconfig_yaml()).unwrap();
        p
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoints_from_two_clusters_and_one_goes_away() {
        let (primary, east) = (FakeApiServer::start().await, FakeApiServer::start().await);
        cluster_objects(&primary, "web-a", Side::Sidecar);
        cluster_objects(&east, "web-b", Side::None);
        let dir = tempfile::tempdir().unwrap();
        let (kp, ke) = (
            kubeconfig(dir.path(), "p", &primary),
            kubeconfig(dir.path(), "e", &east),
        );
        let server = TestServer::start_with(Arc::new(SystemClock), move |cfg| {
            cfg.discovery = Some(config::Discovery {
                kubeconfig: Some(kp),
                clusters: vec![config::RemoteCluster {
                    name: "east".into(),
                    kubeconfig: ke,
                }],
                ..Default::default()
            })
        })
        .await;
        let both = eds_until(&server, |s| s.len() == 2).await;
        assert_eq!(
            both,
            [
                (
                    "Kubernetes".into(),
                    "10.1.0.1".into(),
                    Some("istio".into()),
                    false
                ),
                ("east".into(), "10.2.0.1".into(), None, false),
            ]
        );
        // The east API server goes away: its endpoint stays, marked stale.
        east.stop();
        let after = eds_until(&server, |s| s.iter().any(|e| e.3)).await;
        assert_eq!(
            after,
            [
                (
                    "Kubernetes".into(),
                    "10.1.0.1".into(),
                    Some("istio".into()),
                    false
                ),
                ("east".into(), "10.2.0.1".into(), None, true),
            ]
        );
        // The primary carries on: a change there still arrives.
        let mut m = Mesh::default();
        m.app("shop", "web", false, &[Side::None]);
        let text = m
            .json()
            .to_string()
            .replace("web-0", "web-a")
            .replace("10.250.0.1", "10.1.0.1");
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let pod = doc["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["kind"] == "Pod")
            .unwrap()
            .clone();
        primary.put(pod);
        eds_until(&server, |s| s.len() == 2 && s[0].2.is_none() && s[1].3).await;
        server.running.shutdown().await;
    }

    /// An endpoint is never served before its pod is known: with the Pod list slow to answer,
    /// the first EDS answer already carries the sidecar's tlsMode (istiod serves once its
    /// informers have synced: `HasSynced`). Before, the EndpointSlice alone was published and a
    /// client saw the endpoint without tlsMode, so it would pick plaintext toward a sidecar.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_endpoint_is_served_before_its_pod_is_listed() {
        let primary = FakeApiServer::start().await;
        cluster_objects(&primary, "web-a", Side::Sidecar);
        primary.set_list_delay("/api/v1/pods", Duration::from_millis(1500));
        let dir = tempfile::tempdir().unwrap();
        let kp = kubeconfig(dir.path(), "p", &primary);
        let server = TestServer::start_with(Arc::new(SystemClock), move |cfg| {
            cfg.discovery = Some(config::Discovery {
                kubeconfig: Some(kp),
                ..Default::default()
            })
        })
        .await;
        let first = eds_until(&server, |s| !s.is_empty()).await;
        assert_eq!(
            first,
            [(
                "Kubernetes".into(),
                "10.1.0.1".into(),
                Some("istio".into()),
                false
            )]
        );
        server.running.shutdown().await;
    }

    /// The live source watches ServiceEntries and WorkloadEntries too: a VM registered while
    /// the server runs is served over EDS with its tlsMode.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_source_serves_a_workload_entry_added_later() {
        let api = FakeApiServer::start().await;
        api.put(
            json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "vms", "namespace": "shop"},
            "spec": {"hosts": ["vm.internal"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                     "ports": [{"number": 8080, "name": "http"}],
                     "workloadSelector": {"labels": {"app": "vm"}}}}),
        );
        let dir = tempfile::tempdir().unwrap();
        let kp = kubeconfig(dir.path(), "p", &api);
        let server = TestServer::start_with(Arc::new(SystemClock), move |cfg| {
            cfg.discovery = Some(config::Discovery {
                kubeconfig: Some(kp),
                ..Default::default()
            })
        })
        .await;
        let mut client = EndpointDiscoveryServiceClient::with_interceptor(
            server.channel().await,
            bearer(Some(server.token("shop", "client"))),
        );
        let (tx, out) = mpsc::channel(8);
        let mut rx = client
            .stream_endpoints(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        let req = |nonce: String| DiscoveryRequest {
            resource_names: vec!["outbound|8080||vm.internal".into()],
            type_url: ENDPOINT_TYPE_URL.into(),
            response_nonce: nonce,
            ..Default::default()
        };
        tx.send(req(String::new())).await.unwrap();
        let mut added = false;
        loop {
            let r = tokio::time::timeout(Duration::from_secs(10), rx.message())
                .await
                .expect("a response within 10 s")
                .unwrap()
                .unwrap();
            let s = seen(&r);
            if s.len() == 1 {
                assert_eq!(
                    s[0],
                    (
                        "Kubernetes".into(),
                        "10.9.0.1".into(),
                        Some("istio".into()),
                        false
                    )
                );
                break;
            }
            tx.send(req(r.nonce)).await.unwrap();
            if !added {
                added = true;
                api.put(json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                    "metadata": {"name": "vm-1", "namespace": "shop"},
                    "spec": {"address": "10.9.0.1", "labels": {"app": "vm", "security.istio.io/tlsMode": "istio"}}}));
            }
        }
        server.running.shutdown().await;
    }

    fn remote_secret(api: &FakeApiServer, name: &str, clusters: &[(&str, String)]) {
        use base64::Engine;
        let data: BTreeMap<&str, String> = clusters
            .iter()
            .map(|(c, yaml)| (*c, base64::engine::general_purpose::STANDARD.encode(yaml)))
            .collect();
        api.put(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": "istio-system",
                         "labels": {"istio/multiCluster": "true"}},
            "data": data}));
    }

    fn hostile_kubeconfig(server: &str, cluster: &str, user: &str) -> String {
        format!("apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- name: c\n  context: {{cluster: k, user: u}}\nclusters:\n- name: k\n  cluster:\n    server: {server}\n{cluster}users:\n- name: u\n  user:\n{user}")
    }

    /// A listener standing in for an attacker's API server: every byte it receives.
    async fn attacker() -> (String, Arc<std::sync::Mutex<Vec<u8>>>) {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let g = g.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        g.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        (addr, got)
    }

    /// A server following the remote secrets of a primary cluster that holds one Secret with
    /// `secrets`' kubeconfigs, allowing `allow`.
    async fn with_remote_secret(
        dir: &std::path::Path,
        allow: &[&str],
        secrets: &[(&str, String)],
    ) -> (FakeApiServer, TestServer) {
        let primary = FakeApiServer::start().await;
        cluster_objects(&primary, "web-a", Side::Sidecar);
        remote_secret(&primary, "istio-remote-secret-evil", secrets);
        let kp = kubeconfig(dir, "p", &primary);
        let policy = meshid::discovery::KubeconfigPolicy::allowing(allow.iter().copied());
        let server = TestServer::start_with(Arc::new(SystemClock), move |cfg| {
            cfg.discovery = Some(config::Discovery {
                kubeconfig: Some(kp),
                remote_secrets: true,
                insecure_kubeconfig_options: policy,
                ..Default::default()
            })
        })
        .await;
        (primary, server)
    }

    async fn refusals(server: &TestServer, want: usize) -> String {
        for _ in 0..200 {
            let text = server.running.metrics.render();
            let n = text
                .lines()
                .filter(|l| l.starts_with("meshid_discovery_remote_secret_refused_total{"))
                .count();
            if n >= want {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{want} remote-secret refusals were not counted within 10 s");
    }

    /// istiod `sanitizeKubeConfig` (pkg/kube/util.go): a remote secret's kubeconfig that runs a
    /// program (`exec`) runs nothing, one that reads a token file (here: meshid's own token)
    /// sends nothing, and `insecure-skip-tls-verify` is refused too; each refusal is counted
    /// with the Secret's name. The allow-listed control shows the same kubeconfigs would have
    /// run the program and sent the token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_secret_kubeconfig_runs_no_program_and_reads_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let pwned = dir.path().join("pwned");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "meshid-own-service-account-token").unwrap();
        let (addr, got) = attacker().await;
        let exec = hostile_kubeconfig(
            &format!("http://{addr}"),
            "",
            &format!("    exec: {{apiVersion: client.authentication.k8s.io/v1beta1, command: sh, args: [-c, 'touch {}']}}\n", pwned.display()),
        );
        let token = hostile_kubeconfig(
            &format!("http://{addr}"),
            "",
            &format!("    tokenFile: {}\n", token_file.display()),
        );
        let insecure = hostile_kubeconfig(
            &format!("https://{addr}"),
            "    insecure-skip-tls-verify: true\n",
            "    token: inline\n",
        );
        let (_primary, server) = with_remote_secret(
            dir.path(),
            &[],
            &[
                ("exec", exec.clone()),
                ("token", token.clone()),
                ("insecure", insecure),
            ],
        )
        .await;
        let metrics = refusals(&server, 3).await;
        for (cluster, reason) in [
            ("exec", "exec"),
            ("token", "tokenFile"),
            ("insecure", "insecureSkipTlsVerify"),
        ] {
            assert!(
                metrics.contains(&format!("cluster=\"{cluster}\""))
                    && metrics.contains(&format!("reason=\"{reason}\"")),
                "{cluster} refused for {reason}:\n{metrics}"
            );
        }
        assert!(
            metrics.contains("secret=\"istio-remote-secret-evil\""),
            "{metrics}"
        );
        // The primary's endpoint is still served: refusing a secret costs nothing else.
        eds_until(&server, |s| s.len() == 1).await;
        assert!(!pwned.exists(), "the exec plugin ran");
        assert!(
            got.lock().unwrap().is_empty(),
            "the attacker's listener was contacted"
        );
        server.running.shutdown().await;

        // Control: allowed by name, the same kubeconfigs run the program and send the token.
        let (_primary, server) = with_remote_secret(
            dir.path(),
            &["exec", "tokenFile"],
            &[("exec", exec), ("token", token)],
        )
        .await;
        for _ in 0..200 {
            let sent = String::from_utf8_lossy(&got.lock().unwrap()).to_lowercase();
            if pwned.exists() && sent.contains("bearer meshid-own-service-account-token") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(pwned.exists(), "allowed, the exec plugin runs");
        let sent = String::from_utf8_lossy(&got.lock().unwrap()).to_lowercase();
        assert!(
            sent.contains("bearer meshid-own-service-account-token"),
            "allowed, tokenFile is sent: {sent}"
        );
        server.running.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remote_secrets_add_a_cluster() {
        use base64::Engine;
        let (primary, west) = (FakeApiServer::start().await, FakeApiServer::start().await);
        cluster_objects(&primary, "web-a", Side::Sidecar);
        cluster_objects(&west, "web-b", Side::Sidecar);
        let mut data = BTreeMap::new();
        data.insert(
            "west",
            base64::engine::general_purpose::STANDARD.encode(west.kubeconfig_yaml()),
        );
        primary.put(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "istio-remote-secret-west", "namespace": "istio-system",
                         "labels": {"istio/multiCluster": "true"}},
            "data": data}));
        let dir = tempfile::tempdir().unwrap();
        let kp = kubeconfig(dir.path(), "p", &primary);
        let server = TestServer::start_with(Arc::new(SystemClock), move |cfg| {
            cfg.discovery = Some(config::Discovery {
                kubeconfig: Some(kp),
                remote_secrets: true,
                ..Default::default()
            })
        })
        .await;
        let both = eds_until(&server, |s| s.len() == 2).await;
        assert_eq!(
            both.iter()
                .map(|e| (e.0.as_str(), e.2.as_deref()))
                .collect::<Vec<_>>(),
            [("Kubernetes", Some("istio")), ("west", Some("istio"))]
        );
        server.running.shutdown().await;
    }
}

/// A ServiceEntry's `exportTo` holds on the wire too: EDS serves its cluster only to
/// workloads of the namespaces it is exported to (the stream's token names the namespace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eds_respects_service_entry_export_to() {
    use envoy_types::pb::envoy::service::{
        discovery::v3::DiscoveryRequest,
        endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient,
    };
    let mut m = Mesh::new();
    m.raw(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "vms", "namespace": "vm"},
        "spec": {"hosts": ["vm.internal"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                 "exportTo": ["."], "ports": [{"number": 8080, "name": "http"}],
                 "endpoints": [{"address": "10.1.0.9"}]}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("mesh.json");
    std::fs::write(&snapshot, m.json().to_string()).unwrap();
    let server = crate::server_support::TestServer::start_with(
        std::sync::Arc::new(meshid::clock::SystemClock),
        move |cfg| {
            cfg.discovery = Some(meshid::config::Discovery {
                snapshot: Some(snapshot),
                ..Default::default()
            })
        },
    )
    .await;
    let fetch = |ns: &'static str| {
        let server = &server;
        async move {
            let mut c = EndpointDiscoveryServiceClient::with_interceptor(
                server.channel().await,
                crate::server_support::bearer(Some(server.token(ns, "app"))),
            );
            c.fetch_endpoints(DiscoveryRequest {
                resource_names: vec!["outbound|8080||vm.internal".into()],
                ..Default::default()
            })
            .await
        }
    };
    let own = fetch("vm").await.unwrap().into_inner();
    assert_eq!(own.resources.len(), 1);
    let err = fetch("other").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("not exported to namespace other"),
        "{}",
        err.message()
    );
    server.running.shutdown().await;
}

/// The EDS metadata one namespace's token gets for `cluster`, over the wire (FetchEndpoints).
async fn eds_tls_modes(
    server: &crate::server_support::TestServer,
    ns: &str,
    cluster: &str,
) -> Vec<(String, Option<String>)> {
    use envoy_types::pb::envoy::{
        config::core::v3::{address, socket_address::PortSpecifier},
        config::endpoint::v3::{lb_endpoint::HostIdentifier, ClusterLoadAssignment},
        service::{
            discovery::v3::DiscoveryRequest,
            endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient,
        },
    };
    use prost::Message;
    let mut c = EndpointDiscoveryServiceClient::with_interceptor(
        server.channel().await,
        crate::server_support::bearer(Some(server.token(ns, "app"))),
    );
    let r = c
        .fetch_endpoints(DiscoveryRequest {
            resource_names: vec![cluster.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let cla = ClusterLoadAssignment::decode(r.resources[0].value.as_slice()).unwrap();
    let mut out = Vec::new();
    for l in &cla.endpoints {
        for e in &l.lb_endpoints {
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                continue;
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                continue;
            };
            let _ = matches!(sa.port_specifier, Some(PortSpecifier::PortValue(_)));
            let tls = e
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"))
                .and_then(|s| s.fields.get("tlsMode"))
                .and_then(|v| match &v.kind {
                    Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => {
                        Some(s.clone())
                    }
                    _ => None,
                });
            out.push((sa.address.clone(), tls));
        }
    }
    out.sort();
    out
}

/// Over the wire: `buildEnvoyLbEndpoint` only clears tlsMode (a port entry without tls under a
/// top-level ISTIO_MUTUAL leaves the endpoint without sidecar unmarked), and EDS is computed
/// per client as istiod computes it per proxy (`SidecarScope.DestinationRule`): the client
/// namespace's own rule (DISABLE) clears the sidecar's mark for that namespace's streams only.
#[tokio::test]
async fn eds_only_clears_tls_mode_and_is_computed_per_client_namespace() {
    let mut m = Mesh::new();
    let with = m.pod("svc", "api-0", "api", Sidecar, &[]);
    let without = m.pod("svc", "api-1", "api", NoSidecar, &[]);
    m.service(
        "svc",
        "api",
        false,
        &[("api-0", &with), ("api-1", &without)],
    );
    m.dr(
        "svc",
        "api",
        json!({"host": "api", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"},
        "portLevelSettings": [{"port": {"number": 8080}}]}}),
    );
    m.dr(
        "private",
        "api-off",
        json!({"host": "api.svc.svc.cluster.local", "exportTo": ["."],
        "trafficPolicy": {"tls": {"mode": "DISABLE"}}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("mesh.json");
    std::fs::write(&snapshot, m.json().to_string()).unwrap();
    let server = crate::server_support::TestServer::start_with(
        std::sync::Arc::new(meshid::clock::SystemClock),
        move |cfg| {
            cfg.discovery = Some(meshid::config::Discovery {
                snapshot: Some(snapshot),
                ..Default::default()
            })
        },
    )
    .await;
    let cluster = "outbound|8080||api.svc.svc.cluster.local";
    let istio = Some("istio".to_string());
    let mut want = vec![(with.clone(), istio), (without.clone(), None)];
    want.sort();
    assert_eq!(eds_tls_modes(&server, "elsewhere", cluster).await, want);
    let mut private = vec![(with, None), (without, None)];
    private.sort();
    assert_eq!(
        eds_tls_modes(&server, "private", cluster).await,
        private,
        "the private namespace's own DISABLE rule applies to its streams"
    );
    server.running.shutdown().await;
}

/// Where an endpoint's tlsMode and its presence come from, one row per Istio function:
/// the pod label alone (`kube/conversion.go` `PodTLSMode`; a labelled pod without a proxy is a
/// decision, "will fail"), a WorkloadEntry's service account (`getTLSModeFromWorkloadEntry`),
/// an EndpointSlice endpoint without targetRef matched by IP (`endpointslice.go` `getPod`), a
/// targetRef to a pod that is not there (not served), unready endpoints (not served), and a
/// ServiceEntry selecting pods: Ready ones only, on their named container port (`pod.go`
/// `getPortMap`).
#[test]
fn where_tls_mode_comes_from() {
    use TlsMode::Istio as I;
    let mut m = Mesh::new();
    let lab = m.pod("src", "labelled-0", "labelled", Sidecar, &[]);
    m.service("src", "labelled", false, &[("labelled-0", &lab)]);
    let ip = m.pod("src", "byip-0", "byip", Sidecar, &[]);
    m.raw(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "byip", "namespace": "src"},
        "spec": {"selector": {"app": "byip"}, "ports": [{"name": "http", "port": 8080}]}}));
    m.raw(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "byip-1", "namespace": "src", "labels": {"kubernetes.io/service-name": "byip"}},
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": true}},
            {"addresses": ["10.250.9.9"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "gone", "namespace": "src"}},
            {"addresses": ["10.250.9.8"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "byip-0", "namespace": "src"}}
        ]}));
    m.raw(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "vm", "namespace": "src"},
        "spec": {"address": "10.1.0.7", "serviceAccount": "vm", "labels": {"app": "mixed"}}}),
    );
    let ready = m.pod("src", "mixed-ready", "mixed", Sidecar, &[]);
    m.pod("src", "mixed-unready", "mixed", Sidecar, &[]);
    m.raw(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "mixed", "namespace": "src"},
        "spec": {"hosts": ["mixed.internal"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                 "ports": [{"number": 80, "name": "web", "targetPort": 9999}],
                 "workloadSelector": {"labels": {"app": "mixed"}}}}),
    );
    let mut v = m.json();
    for p in v["items"].as_array_mut().unwrap() {
        if p["kind"] != "Pod" {
            continue;
        }
        let name = p["metadata"]["name"].as_str().unwrap_or("").to_owned();
        if name == "labelled-0" {
            // Labelled, but the proxy container is not there.
            p["spec"]["containers"] = json!([{"name": "app", "image": "example/app"}]);
        }
        if name == "byip-0" {
            // istiod's pod cache indexes only Ready pods by IP.
            p["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
        }
        if name.starts_with("mixed-") {
            let status = if name == "mixed-ready" {
                "True"
            } else {
                "False"
            };
            p["status"]["conditions"] = json!([{"type": "Ready", "status": status}]);
            p["spec"]["containers"][0]["ports"] =
                json!([{"name": "web", "containerPort": 8181, "protocol": "TCP"}]);
        }
    }
    let objs = MeshObjects::from_snapshot(v.to_string().as_bytes()).unwrap();
    let s = MeshSettings::default();
    type Row = (
        &'static str,
        &'static str,
        Vec<(String, u16, Decision, TlsMode)>,
    );
    let rows: Vec<Row> = vec![
        (
            "PodTLSMode: the label alone decides; a labelled pod with no proxy gets mTLS, which fails",
            "labelled.src",
            vec![(lab, 8080, WillFail, I)],
        ),
        (
            "endpointslice.go getPod: an endpoint without targetRef is its pod by IP; a targetRef to a missing pod and an unready endpoint are not served",
            "byip.src",
            vec![(ip, 8080, Mtls, I)],
        ),
        (
            "getTLSModeFromWorkloadEntry: a service account without label is istio; pod.go getPortMap: a selected pod serves on its named container port; only Ready pods",
            "mixed.internal",
            vec![("10.1.0.7".into(), 9999, Mtls, I), (ready, 8181, Mtls, I)],
        ),
    ];
    for (rule, service, mut want) in rows {
        let r = describe_service(&objs, &s, service, None).unwrap();
        let mut got: Vec<(String, u16, Decision, TlsMode)> = r
            .endpoints
            .iter()
            .map(|e| (e.address.clone(), e.port, e.istio.decision, e.eds_tls_mode))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want, "rule: {rule}\n{r:#?}");
        // meshid's own decision agrees here (no deliberate difference applies).
        assert!(
            r.endpoints.iter().all(|e| e.decision == e.istio.decision),
            "rule: {rule}"
        );
    }
    let r = describe_service(&objs, &s, "byip.src", None).unwrap();
    for want in ["not in the input: not served", "is not ready: not served"] {
        assert!(
            r.warnings.iter().any(|w| w.contains(want)),
            "{want}: {:?}",
            r.warnings
        );
    }
}

/// DestinationRule tls fields (`cluster_tls.go` `buildUpstreamClusterTLSContext`,
/// `buildUpstreamTLSSettings`, `applyLoadBalancer`): one row each, Istio's decision for a
/// sidecar endpoint and one without.
#[test]
fn destination_rule_tls_fields() {
    let mut m = Mesh::new();
    let mut rows: Vec<(&str, &str, Vec<Decision>)> = Vec::new();
    let mut case =
        |m: &mut Mesh, name: &'static str, tp: Value, rule: &'static str, want: Vec<Decision>| {
            m.app("tlsf", name, false, &[Sidecar, NoSidecar]);
            m.dr("tlsf", name, json!({"host": name, "trafficPolicy": tp}));
            rows.push((rule, name, want));
        };
    case(&mut m, "cred", json!({"tls": {"mode": "SIMPLE", "credentialName": "cert"}}),
        "buildUpstreamClusterTLSContext: credentialName without workloadSelector gives a sidecar no TLS",
        vec![Plaintext, Plaintext]);
    case(
        &mut m,
        "sans",
        json!({"tls": {"mode": "ISTIO_MUTUAL", "subjectAltNames": ["spiffe://cluster.local/ns/other/sa/x"]}}),
        "buildUpstreamTLSSettings: ISTIO_MUTUAL with subjectAltNames the server lacks fails",
        vec![WillFail, WillFail],
    );
    case(
        &mut m,
        "sansok",
        json!({"tls": {"mode": "ISTIO_MUTUAL", "subjectAltNames": ["spiffe://cluster.local/ns/tlsf/sa/sansok"]}}),
        "buildUpstreamTLSSettings: ISTIO_MUTUAL with the server's own identity in subjectAltNames",
        vec![Mtls, WillFail],
    );
    case(&mut m, "nocert", json!({"tls": {"mode": "MUTUAL"}}),
        "constructUpstreamTLS: MUTUAL without client certificate and key: no TLS context, plaintext",
        vec![Plaintext, Plaintext]);
    case(&mut m, "passthru", json!({"portLevelSettings": [{"port": {"number": 8080}, "loadBalancer": {"simple": "PASSTHROUGH"}}]}),
        "applyLoadBalancer: a port-level PASSTHROUGH makes an ORIGINAL_DST cluster: no socket matches, ISTIO_MUTUAL for every endpoint",
        vec![Mtls, WillFail]);
    let objs = m.objects();
    let s = MeshSettings::default();
    for (rule, name, want) in rows {
        let r = describe_service(&objs, &s, &format!("{name}.tlsf"), None).unwrap();
        let got: Vec<Decision> = r.endpoints.iter().map(|e| e.istio.decision).collect();
        assert_eq!(got, want, "rule: {rule}\n{r:#?}");
    }
}

/// Silence is a defect: fields that can change a decision and are not modeled are named by
/// `describe` (text and JSON).
#[test]
fn describe_names_every_ignored_field() {
    let mut m = Mesh::new();
    m.app("ign", "api", false, &[Sidecar]);
    m.dr(
        "ign",
        "api",
        json!({"host": "api", "trafficPolicy": {"tunnel": {"protocol": "CONNECT"},
        "tls": {"mode": "SIMPLE", "sni": "x"}}}),
    );
    m.raw(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
        "metadata": {"name": "default", "namespace": "ign"}, "spec": {}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.json");
    std::fs::write(&path, m.json().to_string()).unwrap();
    let o = crate::support::meshid(&[
        "describe",
        "service",
        "api.ign",
        "--snapshot",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    for want in [
        "ignored: DestinationRule ign/api: trafficPolicy.tunnel",
        "ignored: DestinationRule ign/api: trafficPolicy tls.sni",
        "ignored: kind Sidecar: not read",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    let r = describe_service(&m.objects(), &MeshSettings::default(), "api.ign", None).unwrap();
    assert_eq!(r.ignored.len(), 3, "{:?}", r.ignored);
}
