//! Discovery's live watch on a real kube-apiserver: pods, services, EndpointSlices, namespaces
//! and Istio's CRDs (installed from istio.io/api's published YAML) through meshid's own
//! ServiceAccount, served over a real EDS stream. The reference for the decisions is Istio's
//! `pilot/pkg/networking/core/cluster_tls.go` `buildAutoMtlsSettings` and
//! `pilot/pkg/xds/endpoints/mtls_checker.go` `checkMtlsEnabled` (rows in tests/it/automtls.rs);
//! here the question is whether the live source follows the API server, including across a
//! `410 Gone` after etcd compaction and an API server restart.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{core::v1::Pod, discovery::v1::EndpointSlice};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use meshid::{clock::SystemClock, config};

use super::{
    cluster::Cluster,
    mesh::{cluster_name, endpoint, service, tls_of, EdsStream, Member},
    proxy::TcpProxy,
    support::workload,
};
use crate::server_support::TestServer;

const ISTIO: Option<&str> = Some("istio");

/// A meshid server whose discovery watches the cluster through `kubeconfig`.
async fn meshid_watching(kubeconfig: std::path::PathBuf) -> TestServer {
    TestServer::start_with(Arc::new(SystemClock), move |cfg| {
        cfg.discovery = Some(config::Discovery {
            kubeconfig: Some(kubeconfig),
            ..Default::default()
        })
    })
    .await
}

async fn label(client: &kube::Client, ns: &str, pod: &str, value: Option<&str>) {
    let patch = serde_json::json!({"metadata": {"labels": {"security.istio.io/tlsMode": value}}});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

fn served(eps: &super::mesh::Endpoints, ip: &str, want: Option<&str>) -> bool {
    tls_of(eps, ip) == Some(want.map(str::to_owned))
}

/// A pod gaining `security.istio.io/tlsMode=istio` (a sidecar injected) flips its endpoint to
/// mTLS on an open EDS stream within 2 s of the API server accepting the change; losing it
/// flips it back. Both latencies are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn a_label_change_flips_tls_mode_on_eds_within_two_seconds() {
    let _timed =
        super::support::Timed::start("a_label_change_flips_tls_mode_on_eds_within_two_seconds");
    let cluster = Cluster::shared().await;
    cluster.install_istio_crds().await;
    let admin = cluster.admin().await;
    let ns = cluster.namespace("flip").await;
    let member = Member {
        pod: "web-0",
        ip: "10.20.0.10",
        labels: &[],
    };
    service(&admin, &ns, "web", &[member]).await;
    let server = meshid_watching(cluster.meshid_kubeconfig().await).await;
    let eds = EdsStream::open(&server, &cluster_name("web", &ns)).await;
    eds.until(Duration::from_secs(60), |e| served(e, "10.20.0.10", None))
        .await;

    let mut latencies = Vec::new();
    for (value, want) in [(ISTIO, ISTIO), (None, None), (ISTIO, ISTIO)] {
        label(&admin, &ns, "web-0", value).await;
        let accepted = std::time::Instant::now();
        eds.until(Duration::from_secs(10), |e| served(e, "10.20.0.10", want))
            .await;
        latencies.push(accepted.elapsed());
    }
    eprintln!(
        "kube_real: tlsMode flip latencies (API server accepted → EDS response): {latencies:?}"
    );
    for l in &latencies {
        assert!(*l < Duration::from_secs(2), "flipped in {latencies:?}");
    }
    server.running.shutdown().await;
}

fn istio_resource(group: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", kind), plural)
}

async fn create_istio(
    client: &kube::Client,
    ns: &str,
    ar: &ApiResource,
    name: &str,
    spec: serde_json::Value,
) {
    let mut obj = DynamicObject::new(name, ar).within(ns);
    obj.data = serde_json::json!({ "spec": spec });
    Api::<DynamicObject>::namespaced_with(client.clone(), ns, ar)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("creating {} {name}: {e}", ar.kind));
}

/// Istio's CRDs as published, with objects the real API server validated against their
/// schemas. A workload PeerAuthentication DISABLE strips a labelled endpoint's `istio`; a
/// DestinationRule ISTIO_MUTUAL keeps it (the rule decides: `mtls_checker.go`
/// `checkMtlsEnabled`), but never sets `istio` on an endpoint without the label
/// (`buildEnvoyLbEndpoint` only clears `TLSMode`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn istio_objects_from_the_published_crds_drive_eds() {
    let _timed = super::support::Timed::start("istio_objects_from_the_published_crds_drive_eds");
    let cluster = Cluster::shared().await;
    cluster.install_istio_crds().await;
    let admin = cluster.admin().await;
    let ns = cluster.namespace("crds").await;
    let (db, web) = ("10.21.0.10", "10.21.0.20");
    service(
        &admin,
        &ns,
        "db",
        &[Member {
            pod: "db-0",
            ip: db,
            labels: &[],
        }],
    )
    .await;
    service(
        &admin,
        &ns,
        "web",
        &[Member {
            pod: "web-0",
            ip: web,
            labels: &[("security.istio.io/tlsMode", "istio")],
        }],
    )
    .await;
    let server = meshid_watching(cluster.meshid_kubeconfig().await).await;
    let db_eds = EdsStream::open(&server, &cluster_name("db", &ns)).await;
    let web_eds = EdsStream::open(&server, &cluster_name("web", &ns)).await;
    db_eds
        .until(Duration::from_secs(60), |e| served(e, db, None))
        .await;
    web_eds
        .until(Duration::from_secs(60), |e| served(e, web, ISTIO))
        .await;

    let pa = istio_resource(
        "security.istio.io",
        "PeerAuthentication",
        "peerauthentications",
    );
    create_istio(
        &admin,
        &ns,
        &pa,
        "web-disable",
        serde_json::json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "DISABLE"}}),
    )
    .await;
    web_eds
        .until(Duration::from_secs(10), |e| served(e, web, None))
        .await;

    // DestinationRules ISTIO_MUTUAL for db (no sidecar label) and then for web: once web's is
    // served (`istio` again: the rule decides over the PeerAuthentication), db's, created
    // before it on the same watch, has been read too, and db is still served without.
    let dr = istio_resource("networking.istio.io", "DestinationRule", "destinationrules");
    for host in ["db", "web"] {
        create_istio(
            &admin,
            &ns,
            &dr,
            &format!("{host}-mtls"),
            serde_json::json!({"host": format!("{host}.{ns}.svc.cluster.local"), "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
        )
        .await;
    }
    web_eds
        .until(Duration::from_secs(10), |e| served(e, web, ISTIO))
        .await;
    db_eds
        .until(Duration::from_secs(1), |e| served(e, db, None))
        .await;
    server.running.shutdown().await;
}

/// Through a cut connection, an etcd compaction and an API server restart: meshid's watch
/// resumes from a resourceVersion the new API server no longer has (`410 Gone`, shown here by
/// a watch from the last version meshid could have seen), relists, and serves the changes made
/// while it was cut off; at no point does it serve a wrong decision for an unchanged pod (its
/// endpoint is always there, always `istio`), nor `istio` for the pod that lost its label once
/// it was served without, nor a new pod without its label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn the_watch_survives_410_gone_after_compaction_and_an_apiserver_restart() {
    let _timed = super::support::Timed::start(
        "the_watch_survives_410_gone_after_compaction_and_an_apiserver_restart",
    );
    let cluster = Cluster::start().await;
    eprintln!(
        "kube_real: private etcd + kube-apiserver ready in {:.1} s",
        cluster.startup.as_secs_f64()
    );
    let admin = cluster.admin().await;
    let ns = cluster.namespace("gone").await;
    let sidecar = [("security.istio.io/tlsMode", "istio")];
    let (a, b, c) = ("10.22.0.1", "10.22.0.2", "10.22.0.3");
    let members = [
        Member {
            pod: "a-0",
            ip: a,
            labels: &sidecar,
        },
        Member {
            pod: "b-0",
            ip: b,
            labels: &sidecar,
        },
    ];
    service(&admin, &ns, "web", &members).await;

    let proxy = TcpProxy::start(&cluster.url).await;
    let token = cluster.meshid_token().await.to_owned();
    let kubeconfig = cluster.token_kubeconfig("meshid-via-proxy", &proxy.url(), &token);
    let server = meshid_watching(kubeconfig).await;
    let eds = EdsStream::open(&server, &cluster_name("web", &ns)).await;
    eds.until(Duration::from_secs(60), |e| {
        served(e, a, ISTIO) && served(e, b, ISTIO)
    })
    .await;
    let pods = Api::<Pod>::all(admin.clone());
    let seen_rv = pods
        .list_metadata(&Default::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();

    proxy.cut();
    label(&admin, &ns, "b-0", None).await;
    let uid = workload(&admin, &ns, "web", "c-0", &[("app", "web"), sidecar[0]]).await;
    let slices = Api::<EndpointSlice>::namespaced(admin.clone(), &ns);
    let mut slice = slices.get("web-1").await.unwrap();
    slice.endpoints.push(endpoint(&ns, "c-0", &uid, c));
    slices
        .replace("web-1", &PostParams::default(), &slice)
        .await
        .unwrap();
    // Cut off, meshid keeps serving what it last knew, to new streams too.
    let during = EdsStream::open(&server, &cluster_name("web", &ns)).await;
    during
        .until(Duration::from_secs(10), |e| {
            served(e, a, ISTIO) && served(e, b, ISTIO) && tls_of(e, c).is_none()
        })
        .await;
    drop(during);
    let compacted = cluster.compact_etcd().await;
    cluster.stop_apiserver();
    cluster.start_apiserver().await;
    let restarted = time::OffsetDateTime::now_utc();

    // The reference: the restarted API server answers a watch from meshid's last possible
    // resourceVersion with 410 Gone (apiserver `cacher.Watch`: "too old resource version").
    let admin = cluster.admin().await;
    let pods = Api::<Pod>::all(admin.clone());
    let gone = match pods.watch(&Default::default(), &seen_rv).await {
        Err(kube::Error::Api(s)) => s.code,
        Ok(stream) => {
            use futures::StreamExt;
            futures::pin_mut!(stream);
            match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                Ok(Some(Ok(kube::core::WatchEvent::Error(e)))) => e.code,
                other => panic!("a watch from {seen_rv} (compacted at {compacted}) gave {other:?}"),
            }
        }
        Err(e) => panic!("watch from {seen_rv}: {e}"),
    };
    assert_eq!(
        gone, 410,
        "a watch from {seen_rv} after compaction at {compacted} and a restart"
    );

    proxy.heal();
    let healed = std::time::Instant::now();
    eds.until(Duration::from_secs(120), |e| {
        served(e, a, ISTIO) && served(e, b, None) && served(e, c, ISTIO)
    })
    .await;
    eprintln!(
        "kube_real: after the restart, meshid served the changes {:.1} s after its connection was restored",
        healed.elapsed().as_secs_f64()
    );

    // From the first response that had both pods (the stream may open before discovery has
    // the service), every response.
    let log = eds.log.lock().unwrap().clone();
    let first = log
        .iter()
        .position(|(_, e)| served(e, a, ISTIO) && served(e, b, ISTIO))
        .expect("the initial state was served");
    let mut b_plain = false;
    for (i, (_, eps)) in log.iter().enumerate().skip(first) {
        assert_eq!(
            tls_of(eps, a),
            Some(ISTIO.map(str::to_owned)),
            "response {i}: {eps:?}"
        );
        match tls_of(eps, b) {
            Some(None) => b_plain = true,
            Some(Some(_)) => assert!(!b_plain, "response {i}: b-0 back to istio: {eps:?}"),
            None => panic!("response {i}: b-0 missing: {eps:?}"),
        }
        assert_ne!(
            tls_of(eps, c),
            Some(None),
            "response {i}: c-0 without tlsMode: {eps:?}"
        );
    }
    // meshid relisted pods after the restart: its watcher lists only from scratch, which after
    // a cut connection means the API server answered 410 Gone.
    let relisted = cluster.audit_events().iter().any(|e| {
        e["user"]["username"] == "system:serviceaccount:istio-system:meshid"
            && e["verb"] == "list"
            && e["objectRef"]["resource"] == "pods"
            && e["stageTimestamp"]
                .as_str()
                .and_then(|t| {
                    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .is_some_and(|t| t > restarted)
    });
    assert!(relisted, "meshid did not relist pods after the restart");
    server.running.shutdown().await;
}
