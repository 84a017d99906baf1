//! Proxy proofs shared between replicas on a Secret state (issue 21): with
//! `discovery.require_proxy_proof`, a pod whose proxy fetched its certificate through replica A
//! is served `tlsMode: istio` by replica B too, and by a replica started after A is gone.
//! Without sharing, B would serve it `tlsMode` disabled and B's clients would send plaintext to
//! a sidecar that speaks mTLS.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use meshid::{
    clock::{Clock, SystemClock},
    identity::dev_issuer::TokenRequest,
    state::StateLocation,
};

use super::{
    cluster::Cluster,
    mesh::{cluster_name, service, tls_of, EdsStream, Member},
    state::on_secret_state,
    support::csr_identity,
};
use crate::server_support::TestServer;

const IP: &str = "10.31.0.1";

/// A replica on the Secret state with live discovery and proofs required.
async fn replica(loc: &StateLocation, kc: &std::path::Path, name: &str, seed: bool) -> TestServer {
    let (loc, kc, name) = (loc.clone(), kc.to_owned(), name.to_owned());
    TestServer::start_with(Arc::new(SystemClock), move |cfg| {
        on_secret_state(cfg, &loc, &kc, seed);
        cfg.leader_election.identity = Some(name);
        cfg.discovery = Some(meshid::config::Discovery {
            kubeconfig: Some(kc),
            require_proxy_proof: true,
            proxy_proof_startup_grace: Duration::ZERO,
            ..Default::default()
        });
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn a_pod_proven_through_one_replica_is_served_tls_mode_istio_by_the_others() {
    let cluster = Cluster::shared().await;
    let admin = cluster.admin().await;
    let ns = cluster.namespace("proofs").await;
    service(
        &admin,
        &ns,
        "web",
        &[Member {
            pod: "web-0",
            ip: IP,
            labels: &[("security.istio.io/tlsMode", "istio")],
        }],
    )
    .await;
    let uid = Api::<Pod>::namespaced(admin.clone(), &ns)
        .get("web-0")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let loc: StateLocation = format!("kube://{ns}/meshid-ca-state").parse().unwrap();
    let kc = cluster.admin_kubeconfig.clone();
    let a = replica(&loc, &kc, "replica-a", true).await;
    let mut b = replica(&loc, &kc, "replica-b", false).await;
    b.root_pem = a.root_pem.clone();
    let web = cluster_name("web", &ns);
    let eds_b = EdsStream::open_as(&b, &web, b.token(&ns, "client")).await;
    let unproven = eds_b
        .until(Duration::from_secs(30), |e| tls_of(e, IP).is_some())
        .await;
    assert_ne!(
        tls_of(&unproven, IP),
        Some(Some("istio".into())),
        "no proxy of web-0 has fetched a certificate yet"
    );

    // web-0's proxy fetches its certificate through replica A.
    let token = a
        .issuer
        .token(
            &TokenRequest {
                namespace: ns.clone(),
                service_account: "web".into(),
                audiences: vec!["istio-ca".into()],
                ttl: Duration::from_secs(3600),
                pod: Some(("web-0".into(), uid)),
            },
            SystemClock.now(),
        )
        .unwrap();
    let proven = Instant::now();
    csr_identity(&a, &token).await.unwrap();
    eds_b
        .until(Duration::from_secs(20), |e| {
            tls_of(e, IP) == Some(Some("istio".into()))
        })
        .await;
    eprintln!(
        "kube_real::proofs: proven through replica A, served tlsMode=istio by replica B after {:.1} s",
        proven.elapsed().as_secs_f64()
    );

    // A goes away; a replica started afterwards finds the proof A left.
    a.running.shutdown().await;
    let mut c = replica(&loc, &kc, "replica-c", false).await;
    c.root_pem = b.root_pem.clone();
    let eds_c = EdsStream::open_as(&c, &web, c.token(&ns, "client")).await;
    eds_c
        .until(Duration::from_secs(20), |e| {
            tls_of(e, IP) == Some(Some("istio".into()))
        })
        .await;
    drop((eds_b, eds_c));
    b.running.shutdown().await;
    c.running.shutdown().await;
}
