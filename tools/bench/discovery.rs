//! Discovery benchmark on a generated mesh of 10,000 pods, 1,000 services and 100 namespaces
//! (half the pods with sidecars; a namespace PeerAuthentication in every tenth namespace; a
//! DestinationRule in every twentieth):
//! (1) in process: parsing the snapshot, computing every decision (`DiscoveryView::build`, the
//!     plans EDS serves), and the memory the objects and the view hold (RSS growth);
//! (2) against a real `meshid server` process serving EDS from that snapshot: N EDS streams
//!     (default 1,000, stream i subscribed to service i), then one pod gains its sidecar label
//!     (the snapshot file is rewritten): the time until the stream subscribed to its service
//!     has the update, and how many other streams were pushed (should be none).
//!
//! Run: `cargo bench --bench discovery` (options after `--`: `--streams 1000 --pods 10000
//! --services 1000 --namespaces 100`).

#[path = "common.rs"]
mod common;
#[path = "server_proc.rs"]
mod server_proc;

use common::{arg, rss_kib};
use server_proc::{init_ca, init_issuer, start_server};
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::service::{
    discovery::v3::DiscoveryRequest,
    endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient,
};
use meshid::{
    api::{
        client::{connect, BearerToken},
        ENDPOINT_TYPE_URL,
    },
    discovery::{DiscoveryView, MeshObjects, MeshSettings},
    identity::dev_issuer::TokenRequest,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;

/// The generated mesh; `flipped` labels pod 1 of service 0 (which has none) for a sidecar.
fn mesh(pods: usize, services: usize, namespaces: usize, flipped: bool) -> Value {
    let per_svc = pods / services;
    let mut items = Vec::with_capacity(pods + 2 * services + namespaces);
    for n in 0..namespaces {
        items.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns-{n}")}}));
        if n % 10 == 0 {
            items.push(json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                "metadata": {"name": "default", "namespace": format!("ns-{n}")}, "spec": {"mtls": {"mode": "STRICT"}}}));
        }
    }
    for s in 0..services {
        let ns = format!("ns-{}", s % namespaces);
        let svc = format!("svc-{s}");
        let mut endpoints = Vec::with_capacity(per_svc);
        for p in 0..per_svc {
            let name = format!("{svc}-{p}");
            let ip = format!("10.{}.{}.{}", s / 250, s % 250, p + 1);
            let sidecar = p % 2 == 0 || (flipped && s == 0 && p == 1);
            let mut labels = json!({"app": svc});
            if sidecar {
                labels["security.istio.io/tlsMode"] = json!("istio");
            }
            items.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels, "uid": format!("uid-{name}")},
                "spec": {"serviceAccountName": svc, "containers": [{"name": "app", "image": "x"}]},
                "status": {"podIP": ip}}));
            endpoints.push(json!({"addresses": [ip], "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": name, "namespace": ns}}));
        }
        items.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc, "namespace": ns},
            "spec": {"selector": {"app": svc}, "ports": [{"name": "http", "port": 8080, "targetPort": 8080}]}}));
        items.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": format!("{svc}-a"), "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints}));
        if s % 20 == 0 {
            items.push(
                json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                "metadata": {"name": svc, "namespace": ns},
                "spec": {"host": svc, "subsets": [{"name": "v1", "labels": {"app": svc}}]}}),
            );
        }
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

fn main() {
    let n_pods: usize = arg("--pods", 10_000);
    let n_services: usize = arg("--services", 1_000);
    let n_namespaces: usize = arg("--namespaces", 100);
    let n_streams: usize = arg("--streams", 1_000).min(n_services);
    let me = std::process::id();

    // (1) In process.
    let doc = mesh(n_pods, n_services, n_namespaces, false).to_string();
    let rss0 = rss_kib(me);
    let t = Instant::now();
    let objs = MeshObjects::from_snapshot(doc.as_bytes()).unwrap();
    let parse = t.elapsed();
    let rss1 = rss_kib(me);
    let s = MeshSettings::default();
    let t = Instant::now();
    let view = DiscoveryView::build(&objs, &s);
    let decide = t.elapsed();
    let rss2 = rss_kib(me);
    let endpoints: usize = view.clusters.values().map(Vec::len).sum();
    println!("discovery: {n_pods} pods, {n_services} services, {n_namespaces} namespaces");
    println!(
        "  parse snapshot ({:.1} MiB): {:.0} ms; objects hold ~{} MiB",
        doc.len() as f64 / 1048576.0,
        parse.as_secs_f64() * 1e3,
        rss1.saturating_sub(rss0) / 1024
    );
    println!(
        "  every decision ({} clusters, {endpoints} endpoint entries): {:.0} ms; the view holds ~{} MiB",
        view.clusters.len(),
        decide.as_secs_f64() * 1e3,
        rss2.saturating_sub(rss1) / 1024
    );
    drop((objs, view));

    // (2) EDS fan-out against a server process.
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("mesh.json");
    std::fs::write(&snapshot, &doc).unwrap();
    let root_pem = init_ca(dir.path());
    let issuer_dir = dir.path().join("issuer");
    let issuer = init_issuer(dir.path(), None);
    let server = start_server(
        dir.path(),
        &issuer_dir,
        &format!(
            "[xds.max_resource_names_per_stream]\neds = 10\n[discovery]\nsnapshot = {snapshot:?}\n"
        ),
    );
    let grpc = server.grpc.clone();
    println!("  server: gRPC {grpc}, metrics {}/metrics", server.http);
    let token = issuer
        .token(
            &TokenRequest {
                namespace: "bench".into(),
                service_account: "client".into(),
                audiences: vec!["istio-ca".into()],
                ttl: Duration::from_secs(7200),
                pod: None,
            },
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channels: Vec<_> = futures::future::join_all(
            (0..8).map(|_| connect(&grpc, Some(root_pem.as_bytes()), "localhost")),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        let first = Arc::new(AtomicUsize::new(0));
        let pushes = Arc::new(AtomicUsize::new(0));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, Instant)>();
        let rss_before = rss_kib(server.child.id());
        for i in 0..n_streams {
            let auth = BearerToken::new(&token, None).unwrap();
            let mut client = EndpointDiscoveryServiceClient::new(InterceptedService::new(
                channels[i % channels.len()].clone(),
                auth,
            ));
            let (first, pushes, done_tx) = (first.clone(), pushes.clone(), done_tx.clone());
            let name = format!(
                "outbound|8080||svc-{i}.ns-{}.svc.cluster.local",
                i % n_namespaces
            );
            tokio::spawn(async move {
                let (tx, out) = mpsc::channel(4);
                let req = |nonce: String| DiscoveryRequest {
                    resource_names: vec![name.clone()],
                    type_url: ENDPOINT_TYPE_URL.into(),
                    response_nonce: nonce,
                    ..Default::default()
                };
                tx.send(req(String::new())).await.unwrap();
                let mut rx = client.stream_endpoints(ReceiverStream::new(out)).await.unwrap().into_inner();
                let r = rx.message().await.unwrap().unwrap();
                tx.send(req(r.nonce)).await.unwrap();
                first.fetch_add(1, Ordering::SeqCst);
                while let Ok(Some(r)) = rx.message().await {
                    pushes.fetch_add(1, Ordering::SeqCst);
                    let _ = done_tx.send((i, Instant::now()));
                    let _ = tx.send(req(r.nonce)).await;
                }
            });
        }
        while first.load(Ordering::SeqCst) < n_streams {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rss_after = rss_kib(server.child.id());
        println!(
            "  EDS: {n_streams} streams open; server RSS {} MiB -> {} MiB",
            rss_before / 1024,
            rss_after / 1024
        );
        // Pod 1 of svc-0 gains its sidecar label.
        let flipped = mesh(n_pods, n_services, n_namespaces, true).to_string();
        let t = Instant::now();
        std::fs::write(&snapshot, flipped).unwrap();
        let (stream, at) = tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
            .await
            .expect("an update within 30 s")
            .unwrap();
        println!(
            "  a pod gains its sidecar label -> stream {stream} (subscribed to its service) has it after {:.0} ms (the snapshot file is watched; re-read + every decision)",
            (at - t).as_secs_f64() * 1e3
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!(
            "  streams pushed in all: {} (only the one subscribed to that service should be)",
            pushes.load(Ordering::SeqCst)
        );
    });
    drop(server);
}
