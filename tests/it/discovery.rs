//! Auto mTLS on the mission's example (product-service and inventory-service with sidecars,
//! legacy-db without): describe says mTLS for the first and plaintext for the second; per-endpoint
//! decisions where Istio would decide per service; the Envoy cluster template.

use meshid::discovery::{
    describe_pod, describe_service, envoy_cluster, Decision, MeshObjects, MeshSettings, MeshidGrpc,
    PeerAuthMode,
};

use crate::support::meshid;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/examples/mixed-traffic.yaml"
);

fn mission() -> MeshObjects {
    MeshObjects::from_snapshot(&std::fs::read(FIXTURE).unwrap()).unwrap()
}

#[test]
fn the_snapshot_reads_as_yaml_and_as_json() {
    let objs = mission();
    assert_eq!(
        (
            objs.pods.len(),
            objs.services.len(),
            objs.endpoint_slices.len(),
            objs.namespaces.len()
        ),
        (3, 3, 3, 3)
    );
    assert_eq!(objs.peer_authentications.len(), 1);
    // The same objects as a kubectl JSON List.
    let yaml: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    let from_json =
        MeshObjects::from_snapshot(serde_json::to_string(&yaml).unwrap().as_bytes()).unwrap();
    assert_eq!(from_json.pods.len(), 3);
}

#[test]
fn inventory_is_mtls_and_legacy_db_is_plaintext() {
    let objs = mission();
    let s = MeshSettings::default();
    let inv = describe_service(&objs, &s, "inventory-service.shop", None).unwrap();
    assert_eq!(inv.endpoints.len(), 1);
    let e = &inv.endpoints[0];
    assert_eq!(
        (e.decision, e.sidecar, e.pod.as_deref()),
        (
            Decision::Mtls,
            true,
            Some("inventory-service-5c8f7-k9p2m.shop")
        )
    );
    assert_eq!(e.peer_authentication.mode, PeerAuthMode::Permissive);
    assert!(
        e.peer_authentication.source.contains("mesh-wide"),
        "{}",
        e.peer_authentication.source
    );
    let db = describe_service(&objs, &s, "legacy-db.legacy", None).unwrap();
    assert_eq!(
        (db.endpoints[0].decision, db.endpoints[0].sidecar),
        (Decision::Plaintext, false)
    );
    assert!(db.endpoints[0].why.contains("no sidecar"));
    assert_eq!((db.summary.mtls, db.summary.plaintext), (0, 1));
}

#[test]
fn strict_destination_fails_for_a_client_without_sidecar() {
    let mut objs = mission();
    let mut strict = objs.peer_authentications[0].clone();
    strict.metadata.namespace = Some("shop".into());
    strict.spec.mtls.as_mut().unwrap().mode = PeerAuthMode::Strict;
    objs.peer_authentications.push(strict);
    let s = MeshSettings::default();
    let from_db = describe_service(
        &objs,
        &s,
        "inventory-service.shop",
        Some("legacy-db-0.legacy"),
    )
    .unwrap();
    assert_eq!(from_db.endpoints[0].decision, Decision::WillFail);
    assert!(from_db.client.contains("without a sidecar"));
    let from_product = describe_service(
        &objs,
        &s,
        "inventory-service.shop",
        Some("product-service-7d4b9-x2x7q.shop"),
    )
    .unwrap();
    assert_eq!(from_product.endpoints[0].decision, Decision::Mtls);
}

/// Istio issue 49584: one backend without a sidecar must not turn mTLS off for the others.
#[test]
fn decisions_are_per_endpoint_not_per_service() {
    let mut objs = mission();
    let mut plain = objs
        .pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("inventory-service-5c8f7-k9p2m"))
        .unwrap()
        .clone();
    plain.metadata.name = Some("inventory-service-legacy-1".into());
    plain
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .remove("security.istio.io/tlsMode");
    plain.metadata.annotations = None;
    plain
        .spec
        .as_mut()
        .unwrap()
        .containers
        .retain(|c| c.name != "istio-proxy");
    objs.pods.push(plain);
    let slice = objs
        .endpoint_slices
        .iter_mut()
        .find(|e| e.metadata.name.as_deref() == Some("inventory-service-abc12"))
        .unwrap();
    let mut ep = slice.endpoints[0].clone();
    ep.addresses = vec!["10.244.1.99".into()];
    ep.target_ref.as_mut().unwrap().name = Some("inventory-service-legacy-1".into());
    slice.endpoints.push(ep);
    // Headless too (Istio issue 19703).
    objs.services
        .iter_mut()
        .find(|x| x.metadata.name.as_deref() == Some("inventory-service"))
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .cluster_ip = Some("None".into());
    let r = describe_service(
        &objs,
        &MeshSettings::default(),
        "inventory-service.shop",
        None,
    )
    .unwrap();
    assert!(r.headless);
    let decisions: Vec<(String, Decision)> = r
        .endpoints
        .iter()
        .map(|e| (e.address.clone(), e.decision))
        .collect();
    assert_eq!(
        decisions,
        [
            ("10.244.1.11".to_string(), Decision::Mtls),
            ("10.244.1.99".to_string(), Decision::Plaintext)
        ]
    );
}

#[test]
fn label_and_container_disagreements_are_warned() {
    let mut objs = mission();
    let db = objs
        .pods
        .iter_mut()
        .find(|p| p.metadata.name.as_deref() == Some("legacy-db-0"))
        .unwrap();
    db.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("security.istio.io/tlsMode".into(), "istio".into());
    let r = describe_pod(&objs, &MeshSettings::default(), "legacy-db-0.legacy").unwrap();
    assert!(
        r.sidecar.warnings[0].contains("runs no istio-proxy"),
        "{:?}",
        r.sidecar.warnings
    );
    assert_eq!(r.services.len(), 1);
    assert!(r.services[0].endpoints[0]
        .warnings
        .iter()
        .any(|w| w.contains("mTLS to it will fail")));
}

#[test]
fn envoy_cluster_has_both_socket_matches() {
    let objs = mission();
    let td = meshid::spiffe::TrustDomain::new("cluster.local").unwrap();
    let c = envoy_cluster(
        &objs,
        &MeshSettings::default(),
        "inventory-service.shop",
        8080,
        &td,
        &MeshidGrpc::default(),
    )
    .unwrap();
    assert_eq!(
        c["name"],
        "outbound|8080||inventory-service.shop.svc.cluster.local"
    );
    let m = c["transport_socket_matches"].as_array().unwrap();
    assert_eq!(
        (m[0]["name"].as_str(), m[1]["name"].as_str()),
        (Some("tlsMode-istio"), Some("tlsMode-disabled"))
    );
    assert_eq!(m[0]["match"]["tlsMode"], "istio");
    let ctx = &m[0]["transport_socket"]["typed_config"]["common_tls_context"];
    assert_eq!(
        ctx["tls_certificate_sds_secret_configs"][0]["name"],
        "default"
    );
    assert_eq!(
        ctx["combined_validation_context"]["validation_context_sds_secret_config"]["name"],
        "ROOTCA"
    );
    assert_eq!(
        ctx["combined_validation_context"]["default_validation_context"]
            ["match_typed_subject_alt_names"][0]["matcher"]["exact"],
        "spiffe://cluster.local/ns/shop/sa/inventory-service"
    );
    assert_eq!(
        m[1]["transport_socket"]["name"],
        "envoy.transport_sockets.raw_buffer"
    );
}

#[test]
fn describe_cli_answers_why_plaintext() {
    let o = meshid(&[
        "describe",
        "service",
        "legacy-db.legacy",
        "--snapshot",
        FIXTURE,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("pod legacy-db-0.legacy  sidecar: no  -> plaintext"),
        "{text}"
    );
    assert!(
        text.contains("why (endpoint side): plaintext, which the destination accepts (no sidecar"),
        "{text}"
    );
    let o = meshid(&[
        "describe",
        "service",
        "inventory-service.shop",
        "--snapshot",
        FIXTURE,
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["endpoints"][0]["decision"], "mtls");
    assert_eq!(v["endpoints"][0]["tls_mode"], "istio");
    let o = meshid(&["describe", "service", "nope.shop", "--snapshot", FIXTURE]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("service nope.shop not found; known: "));
    let o = meshid(&[
        "describe",
        "pod",
        "product-service-7d4b9-x2x7q.shop",
        "--snapshot",
        FIXTURE,
    ]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Sidecar: yes"));
}

mod eds {
    use std::{sync::Arc, time::Duration};

    use envoy_types::pb::envoy::{
        config::endpoint::v3::{lb_endpoint::HostIdentifier, ClusterLoadAssignment},
        service::{
            discovery::v3::{DiscoveryRequest, DiscoveryResponse},
            endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient,
        },
    };
    use meshid::{api::ENDPOINT_TYPE_URL, clock::SystemClock, config};
    use prost::Message;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    use crate::server_support::{bearer, TestServer};

    const INVENTORY: &str = "outbound|8080||inventory-service.shop.svc.cluster.local";
    const LEGACY_DB: &str = "outbound|5432||legacy-db.legacy.svc.cluster.local";

    /// (address, tlsMode metadata) per endpoint.
    fn endpoints(cla: &ClusterLoadAssignment) -> Vec<(String, Option<String>)> {
        cla.endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| {
                let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    panic!("no endpoint")
                };
                let addr = match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
                    Some(
                        envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                            s,
                        ),
                    ) => s.address.clone(),
                    other => panic!("{other:?}"),
                };
                let tls = e
                    .metadata
                    .as_ref()
                    .and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"))
                    .and_then(|s| match s.fields.get("tlsMode")?.kind.as_ref()? {
                        envoy_types::pb::google::protobuf::value::Kind::StringValue(v) => {
                            Some(v.clone())
                        }
                        _ => None,
                    });
                (addr, tls)
            })
            .collect()
    }

    /// Istio's default mesh settings, with no source yet.
    fn discovery() -> config::Discovery {
        config::Discovery {
            root_namespace: "istio-system".into(),
            domain: "cluster.local".into(),
            auto_mtls: true,
            ..Default::default()
        }
    }

    /// A test server serving EDS from `d`.
    async fn with_discovery(d: config::Discovery) -> TestServer {
        TestServer::start_with(Arc::new(SystemClock), move |cfg| cfg.discovery = Some(d)).await
    }

    fn by_name(r: &DiscoveryResponse) -> std::collections::BTreeMap<String, ClusterLoadAssignment> {
        r.resources
            .iter()
            .map(|a| ClusterLoadAssignment::decode(a.value.as_slice()).unwrap())
            .map(|c| (c.cluster_name.clone(), c))
            .collect()
    }

    async fn recv(rx: &mut tonic::Streaming<DiscoveryResponse>) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), rx.message())
            .await
            .expect("a response")
            .unwrap()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eds_carries_tls_mode_and_follows_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("mesh.yaml");
        std::fs::copy(super::FIXTURE, &snapshot).unwrap();
        let snap = snapshot.clone();
        let server = with_discovery(config::Discovery {
            snapshot: Some(snap),
            ..discovery()
        })
        .await;
        let mut client = EndpointDiscoveryServiceClient::with_interceptor(
            server.channel().await,
            bearer(Some(server.token("shop", "product-service"))),
        );
        let (tx, out) = mpsc::channel(8);
        let mut rx = client
            .stream_endpoints(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        let req = |nonce: &str| DiscoveryRequest {
            resource_names: vec![INVENTORY.into(), LEGACY_DB.into()],
            type_url: ENDPOINT_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        };
        tx.send(req("")).await.unwrap();
        let r1 = recv(&mut rx).await;
        let clas = by_name(&r1);
        assert_eq!(
            endpoints(&clas[INVENTORY]),
            [("10.244.1.11".to_string(), Some("istio".to_string()))]
        );
        assert_eq!(
            endpoints(&clas[LEGACY_DB]),
            [("10.244.2.20".to_string(), None)]
        );
        tx.send(req(&r1.nonce)).await.unwrap(); // ACK
                                                // legacy-db gets a sidecar (injected, restarted): its endpoint flips to mTLS.
        let text = std::fs::read_to_string(&snapshot).unwrap().replacen(
            "      labels:\n        app: \"legacy-db\"",
            "      labels:\n        app: \"legacy-db\"\n        security.istio.io/tlsMode: \"istio\"",
            1,
        );
        assert!(
            text.contains("tlsMode: \"istio\"\n"),
            "fixture layout changed"
        );
        std::fs::write(&snapshot, text).unwrap();
        let started = std::time::Instant::now();
        let r2 = recv(&mut rx).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "flipped within a second: {:?}",
            started.elapsed()
        );
        assert_eq!(
            endpoints(&by_name(&r2)[LEGACY_DB]),
            [("10.244.2.20".to_string(), Some("istio".to_string()))]
        );
        // The discovery metrics follow the model (updated by their own task: wait for it).
        let expected = [
            "meshid_discovery_endpoints{tls_mode=\"istio\"} 3",
            "meshid_discovery_mtls_coverage_ratio{namespace=\"legacy\"} 1.0",
            "meshid_discovery_sidecar_mismatches 1",
        ];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let metrics = server.running.metrics.render();
            let missing: Vec<&str> = expected
                .iter()
                .copied()
                .filter(|l| !metrics.contains(l))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "missing {missing:?}:\n{metrics}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Malformed cluster names are refused, naming them.
        let err = client
            .fetch_endpoints(DiscoveryRequest {
                resource_names: vec!["inventory".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(err.message().contains("\"inventory\""), "{}", err.message());
        server.running.shutdown().await;
    }

    /// Live: the kube watchers over the fake apiserver's list + watch. A pod gaining the label
    /// (sidecar injected, restarted) flips its endpoint to mTLS in the EDS stream within a second.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_updates_flip_an_endpoint_within_a_second() {
        let api = crate::fake_apiserver::FakeApiServer::start().await;
        let fixture: serde_json::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(super::FIXTURE).unwrap()).unwrap();
        api.put_all(&fixture);
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig_yaml()).unwrap();
        let kc = kubeconfig.clone();
        let server = with_discovery(config::Discovery {
            kubeconfig: Some(kc),
            ..discovery()
        })
        .await;
        let mut client = EndpointDiscoveryServiceClient::with_interceptor(
            server.channel().await,
            bearer(Some(server.token("shop", "product-service"))),
        );
        let (tx, out) = mpsc::channel(8);
        let mut rx = client
            .stream_endpoints(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        let req = |nonce: &str| DiscoveryRequest {
            resource_names: vec![LEGACY_DB.into()],
            type_url: ENDPOINT_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        };
        tx.send(req("")).await.unwrap();
        // The first answer may precede the initial list; wait until the endpoint is there.
        let mut last = recv(&mut rx).await;
        while by_name(&last)[LEGACY_DB]
            .endpoints
            .iter()
            .all(|l| l.lb_endpoints.is_empty())
        {
            tx.send(req(&last.nonce)).await.unwrap();
            last = recv(&mut rx).await;
        }
        assert_eq!(
            endpoints(&by_name(&last)[LEGACY_DB]),
            [("10.244.2.20".to_string(), None)]
        );
        tx.send(req(&last.nonce)).await.unwrap();
        let mut pod = fixture["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == "legacy-db-0")
            .unwrap()
            .clone();
        // Injected: the label and the proxy container (the label alone would be sent mTLS
        // and fail, which describe says).
        pod["metadata"]["labels"]["security.istio.io/tlsMode"] = serde_json::json!("istio");
        pod["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "istio-proxy", "image": "istio/proxyv2"}));
        let started = std::time::Instant::now();
        api.put(pod);
        let flipped = recv(&mut rx).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "flipped in {:?}",
            started.elapsed()
        );
        assert_eq!(
            endpoints(&by_name(&flipped)[LEGACY_DB]),
            [("10.244.2.20".to_string(), Some("istio".to_string()))]
        );
        // The same objects, listed once, for `meshid describe --kubeconfig`.
        let o = tokio::task::spawn_blocking(move || {
            crate::support::meshid(&[
                "describe",
                "service",
                "legacy-db.legacy",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
            ])
        })
        .await
        .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("sidecar: yes  -> mTLS"),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        server.running.shutdown().await;
    }

    async fn next_delta(
        rx: &mut tonic::Streaming<
            envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse,
        >,
    ) -> envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), rx.message())
            .await
            .expect("a response")
            .unwrap()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delta_endpoints_send_only_what_changed() {
        use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("mesh.yaml");
        std::fs::copy(super::FIXTURE, &snapshot).unwrap();
        let snap = snapshot.clone();
        let server = with_discovery(config::Discovery {
            snapshot: Some(snap),
            ..discovery()
        })
        .await;
        let mut client = EndpointDiscoveryServiceClient::with_interceptor(
            server.channel().await,
            bearer(Some(server.token("shop", "a"))),
        );
        let (tx, out) = mpsc::channel(8);
        let mut rx = client
            .delta_endpoints(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        tx.send(DeltaDiscoveryRequest {
            type_url: ENDPOINT_TYPE_URL.into(),
            resource_names_subscribe: vec![INVENTORY.into(), LEGACY_DB.into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let r1 = next_delta(&mut rx).await;
        assert_eq!(r1.resources.len(), 2);
        tx.send(DeltaDiscoveryRequest {
            type_url: ENDPOINT_TYPE_URL.into(),
            response_nonce: r1.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let text = std::fs::read_to_string(&snapshot).unwrap().replacen(
            "      labels:\n        app: \"legacy-db\"",
            "      labels:\n        app: \"legacy-db\"\n        security.istio.io/tlsMode: \"istio\"",
            1,
        );
        std::fs::write(&snapshot, text).unwrap();
        let r2 = next_delta(&mut rx).await;
        let names: Vec<&str> = r2.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, [LEGACY_DB], "only the changed cluster is sent");
        let cla = ClusterLoadAssignment::decode(
            r2.resources[0].resource.as_ref().unwrap().value.as_slice(),
        )
        .unwrap();
        assert_eq!(
            endpoints(&cla),
            [("10.244.2.20".to_string(), Some("istio".to_string()))]
        );
        server.running.shutdown().await;
    }
}
