//! meshid under deploy/kubernetes/base's ServiceAccount, ClusterRole and Role on a real API
//! server (RBAC and Node authorization on): the deployed `meshid.toml`, plus the features it
//! leaves off that have grants (the istio-ca-root-cert publisher, remote secrets), makes every
//! call it needs, each allowed (read back from the API server's audit log); calls outside the
//! grants are refused.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::ConfigMap, core::v1::Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use meshid::{clock::SystemClock, config::Config};

use super::{
    cluster::{client_from, Cluster},
    deploy_rbac::deployed_config_toml,
    mesh::{cluster_name, service, EdsStream, Member},
    support::{csr_identity, workload},
};
use crate::server_support::TestServer;

const MESHID_USER: &str = "system:serviceaccount:istio-system:meshid";

/// A meshid server configured from deploy/'s ConfigMap, pointed at `kubeconfig` instead of
/// the in-cluster configuration, with the publisher and remote secrets on.
async fn deployed_meshid(kubeconfig: std::path::PathBuf) -> TestServer {
    let deployed =
        Config::from_toml(&deployed_config_toml()).expect("deployed meshid.toml is valid");
    TestServer::start_with(Arc::new(SystemClock), move |cfg| {
        cfg.clusters = deployed.clusters;
        for c in &mut cfg.clusters {
            let tr = c
                .tokenreview
                .as_mut()
                .expect("deploy/ validates tokens by TokenReview");
            tr.kubeconfig = Some(kubeconfig.clone());
        }
        let mut discovery = deployed.discovery.expect("deploy/ turns discovery on");
        assert!(discovery.in_cluster, "deploy/ watches its own cluster");
        discovery.in_cluster = false;
        discovery.kubeconfig = Some(kubeconfig.clone());
        discovery.remote_secrets = true;
        cfg.discovery = Some(discovery);
        cfg.root_cert_configmap.enabled = true;
        cfg.root_cert_configmap.kubeconfig = Some(kubeconfig.clone());
        // The state in the deployed Secret, created by meshid itself (as `ca init` does), and
        // the deployed leader election.
        let secret = deployed.state.expect("deploy/ keeps the state in a Secret");
        super::state::on_secret_state(cfg, &secret, &kubeconfig, true);
        assert!(deployed.leader_election.enabled, "deploy/ elects a leader");
        cfg.leader_election = deployed.leader_election;
        cfg.leader_election.kubeconfig = Some(kubeconfig);
    })
    .await
}

pub(super) async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let resp = client
        .request(
            hyper::Request::get(format!("http://{addr}{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>) {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: must be forbidden to meshid, got {other:?}"),
    }
}

/// (verb, resource or URI) of every call meshid made, and those not allowed.
fn meshid_calls(cluster: &Cluster) -> (BTreeSet<(String, String)>, Vec<serde_json::Value>) {
    let mut calls = BTreeSet::new();
    let mut denied = Vec::new();
    for e in cluster.audit_events() {
        if e["user"]["username"] != MESHID_USER {
            continue;
        }
        let what = match e["objectRef"]["resource"].as_str() {
            Some(r) => r.to_owned(),
            None => e["requestURI"].as_str().unwrap_or_default().to_owned(),
        };
        calls.insert((e["verb"].as_str().unwrap_or_default().to_owned(), what));
        if matches!(e["responseStatus"]["code"].as_i64(), Some(401 | 403)) {
            denied.push(e);
        }
    }
    (calls, denied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn meshid_under_the_deployed_rbac_is_allowed_every_call_it_makes_and_no_other() {
    let _timed = super::support::Timed::start(
        "meshid_under_the_deployed_rbac_is_allowed_every_call_it_makes_and_no_other",
    );
    let cluster = Cluster::shared().await;
    cluster.install_istio_crds().await;
    let admin = cluster.admin().await;
    let ns = cluster.namespace("rbac").await;
    service(
        &admin,
        &ns,
        "web",
        &[Member {
            pod: "web-0",
            ip: "10.23.0.1",
            labels: &[],
        }],
    )
    .await;
    let uid = workload(&admin, &ns, "workload", "w-0", &[]).await;
    let token = cluster
        .token(&ns, "workload", &["istio-ca"], Some(("w-0", &uid)))
        .await;

    let kubeconfig = cluster.meshid_kubeconfig().await;
    let server = deployed_meshid(kubeconfig.clone()).await;
    assert_eq!(
        csr_identity(&server, &token).await.unwrap(),
        format!("spiffe://cluster.local/ns/{ns}/sa/workload")
    );
    // Ready once its first probe (SelfSubjectAccessReview) has answered.
    let ready_by = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http_get(server.running.http_addr, "/readyz").await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < ready_by, "/readyz: {code} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let eds = EdsStream::open_as(&server, &cluster_name("web", &ns), token.clone()).await;
    eds.until(Duration::from_secs(60), |e| !e.is_empty()).await;
    let configmaps = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
    tokio::time::timeout(
        Duration::from_secs(60),
        kube::runtime::wait::await_condition(
            configmaps,
            "istio-ca-root-cert",
            |c: Option<&ConfigMap>| c.is_some(),
        ),
    )
    .await
    .expect("the publisher writes istio-ca-root-cert within 60 s")
    .unwrap();

    // A state write under meshid's account (the CLI in a pod, or the leader's schedules) and
    // the leader's first renewal (one retry period after it took the Lease).
    let store_kubeconfig = kubeconfig.clone();
    tokio::task::spawn_blocking(move || {
        let store = meshid::state::StateLocation::Secret {
            namespace: "istio-system".into(),
            name: "meshid-ca-state".into(),
        }
        .open(Some(&store_kubeconfig))
        .unwrap();
        let v = store.load_existing().unwrap();
        store
            .compare_and_swap(Some(v.generation), &v.state)
            .unwrap();
    })
    .await
    .unwrap();
    let renewed = Instant::now() + Duration::from_secs(15);
    while !meshid_calls(cluster)
        .0
        .contains(&("update".to_owned(), "leases".to_owned()))
    {
        assert!(
            Instant::now() < renewed,
            "the leader never renewed its Lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (calls, denied) = meshid_calls(cluster);
    assert!(denied.is_empty(), "calls refused to meshid: {denied:#?}");
    let has = |verb: &str, what: &str| calls.contains(&(verb.to_owned(), what.to_owned()));
    let mut missing = Vec::new();
    for (verb, what) in [
        ("create", "tokenreviews"),
        ("create", "selfsubjectaccessreviews"),
        ("get", "/openid/v1/jwks"),
        ("create", "configmaps"),
        ("list", "secrets"),
        ("watch", "secrets"),
        ("create", "secrets"),
        ("get", "secrets"),
        ("update", "secrets"),
        ("create", "leases"),
        ("get", "leases"),
        ("list", "leases"),
        ("update", "leases"),
    ]
    .into_iter()
    .chain(
        [
            "pods",
            "services",
            "endpointslices",
            "namespaces",
            "configmaps",
            "peerauthentications",
            "destinationrules",
            "serviceentries",
            "workloadentries",
        ]
        .into_iter()
        .flat_map(|r| [("list", r), ("watch", r)]),
    ) {
        if !has(verb, what) {
            missing.push(format!("{verb} {what}"));
        }
    }
    assert!(
        missing.is_empty(),
        "calls not seen: {missing:?}; seen: {calls:?}"
    );
    eprintln!("kube_real: meshid's calls under deploy/'s RBAC, all allowed: {calls:?}");

    // Outside the grants: another Secret (read or written), Secrets or Leases in another
    // namespace.
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("kube-real-probe".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let _ = Api::<Secret>::namespaced(admin.clone(), "istio-system")
        .create(&PostParams::default(), &secret)
        .await;
    let meshid = client_from(&kubeconfig).await;
    let secrets = Api::<Secret>::namespaced(meshid.clone(), "istio-system");
    refused(
        "get another Secret in istio-system",
        secrets.get("kube-real-probe").await,
    );
    let mut probe = Api::<Secret>::namespaced(admin.clone(), "istio-system")
        .get("kube-real-probe")
        .await
        .unwrap();
    probe.string_data = Some([("k".to_owned(), "v".to_owned())].into());
    refused(
        "update another Secret in istio-system",
        secrets
            .replace("kube-real-probe", &PostParams::default(), &probe)
            .await,
    );
    refused(
        "list Secrets in another namespace",
        Api::<Secret>::namespaced(meshid.clone(), &ns)
            .list(&Default::default())
            .await,
    );
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("kube-real-probe".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let leases = Api::<Lease>::namespaced(meshid.clone(), &ns);
    refused(
        &format!("get a Lease in {ns}"),
        leases.get("kube-real-probe").await,
    );
    refused(
        &format!("create a Lease in {ns}"),
        leases.create(&PostParams::default(), &lease).await,
    );
    server.running.shutdown().await;
}
