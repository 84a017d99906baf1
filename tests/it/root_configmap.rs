//! ConfigMap `istio-ca-root-cert` through the real `kube` client against the fake apiserver:
//! published in every selected namespace (Kubernetes' own skipped), in a namespace created later,
//! rewritten when the bundle changes, and put back when someone edits it.
//!
//! Reference: istiod's `NamespaceController`
//! (pilot/pkg/serviceregistry/kube/controller/namespacecontroller.go: name `istio-ca-root-cert`,
//! key `root-cert.pem`, label `istio.io/config=true`, `inject.IgnoredNamespaces` skipped, a
//! ConfigMap change re-inserts the data) and security/pkg/k8s/configutil.go
//! `InsertDataToConfigMap` (create, or update from a fresh read carrying its resourceVersion).

use std::{sync::Arc, time::Duration};

use meshid::{
    ca::{cert, root, KeyType},
    clock::SystemClock,
    rotation::{self, Candidate, Ctx},
    state::{Actor, DirStore, StateStore},
};
use rustls_pki_types::{pem::PemObject, CertificateDer};
use serde_json::{json, Value};

use crate::{fake_apiserver::FakeApiServer, server_support::*};

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels}, "status": {"phase": "Active"}})
}

fn pem_of(cm: &Value) -> String {
    cm["data"]["root-cert.pem"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within 20 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_cert_configmap_is_published_in_every_selected_namespace_and_kept_in_sync() {
    let fake = FakeApiServer::start().await;
    for ns in [
        namespace("default", json!({})),
        namespace("shop", json!({"team": "shop"})),
        namespace("kube-system", json!({})),
        namespace("legacy", json!({"mesh": "off"})),
    ] {
        fake.put(ns);
    }
    let kdir = tempfile::tempdir().unwrap();
    let kubeconfig = kdir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig_yaml()).unwrap();
    let server = TestServer::start_with(Arc::new(SystemClock), |c| {
        c.root_cert_configmap.enabled = true;
        c.root_cert_configmap.namespace_selector = "mesh!=off".into();
        c.root_cert_configmap.kubeconfig = Some(kubeconfig.clone());
    })
    .await;
    let root_pem = server.root_pem.clone();
    let cm = |ns: &str| fake.configmap(ns, "istio-ca-root-cert");

    eventually("published in default and shop", || {
        ["default", "shop"]
            .iter()
            .all(|ns| cm(ns).is_some_and(|c| pem_of(&c) == root_pem))
    })
    .await;
    let shop = cm("shop").unwrap();
    assert_eq!(shop["metadata"]["labels"]["istio.io/config"], "true");
    assert_eq!(shop["metadata"]["namespace"], "shop");
    assert!(
        cm("kube-system").is_none(),
        "Kubernetes' own namespaces are skipped"
    );
    assert!(cm("legacy").is_none(), "not selected");

    // A namespace created later.
    fake.put(namespace("payments", json!({})));
    eventually("published in a namespace created later", || {
        cm("payments").is_some_and(|c| pem_of(&c) == root_pem)
    })
    .await;

    // A bundle change (a prepared root) reaches every ConfigMap: both roots, concatenated.
    let store = DirStore::new(server.state_dir());
    let ctx = Ctx::new(Actor::user("op", "test"), now(), None).unwrap();
    let state = store.load_existing().unwrap().state;
    let next = root::generate_root(
        &state.trust_domain,
        KeyType::EcdsaP256,
        root::DEFAULT_ROOT_TTL,
        now(),
    )
    .unwrap();
    let next_pem = cert::to_pem(&next.cert);
    rotation::apply(&store, &ctx, |s, c| {
        rotation::prepare(s, Candidate::Generated(next), c)
    })
    .unwrap();
    eventually("every ConfigMap holds both roots", || {
        ["default", "shop", "payments"].iter().all(|ns| {
            cm(ns).is_some_and(|c| {
                let pem = pem_of(&c);
                let n = CertificateDer::pem_slice_iter(pem.as_bytes()).count();
                n == 2 && pem.contains(root_pem.trim()) && pem.contains(next_pem.trim())
            })
        })
    })
    .await;

    // Someone edits one (data and label): it is put back, through an update that carries the
    // resourceVersion it read (the fake refuses a stale one with 409).
    let mut edited = cm("shop").unwrap();
    let want = pem_of(&edited);
    edited["data"]["root-cert.pem"] = json!("tampered");
    edited["metadata"]["labels"] = json!({});
    fake.put(edited);
    eventually("the edited ConfigMap is restored", || {
        cm("shop").is_some_and(|c| {
            pem_of(&c) == want && c["metadata"]["labels"]["istio.io/config"] == "true"
        })
    })
    .await;
    let writes = fake.configmap_writes();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.configmap_writes(),
        writes,
        "nothing is rewritten once in sync"
    );
    server.running.shutdown().await;
}

/// A plug-in CA's `ca-crl.pem` is published as ConfigMap `istio-ca-crl` (key `ca-crl.pem`, label
/// `istio.io/config=true`) beside the roots, as istiod's namespace controller does
/// (`namespacecontroller.go` `reconcileCACertAndCRL`); without a CRL nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_crl_is_published_as_istio_ca_crl_when_there_is_one() {
    let fake = FakeApiServer::start().await;
    fake.put(namespace("shop", json!({})));
    let kdir = tempfile::tempdir().unwrap();
    let kubeconfig = kdir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig_yaml()).unwrap();
    let server = TestServer::start_with(Arc::new(SystemClock), |c| {
        c.root_cert_configmap.enabled = true;
        c.root_cert_configmap.kubeconfig = Some(kubeconfig.clone());
    })
    .await;
    eventually("the roots are published", || {
        fake.configmap("shop", "istio-ca-root-cert").is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        fake.configmap("shop", "istio-ca-crl").is_none(),
        "no CRL, no istio-ca-crl"
    );
    // The state gains CRLs (as `ca init|root prepare --from-plugin` store a checked ca-crl.pem).
    let crl = "-----BEGIN X509 CRL-----\nMIIBmarker\n-----END X509 CRL-----\n";
    let store = DirStore::new(server.state_dir());
    let current = store.load_existing().unwrap();
    let mut next = current.state.clone();
    next.crl = Some(crl.into());
    store
        .compare_and_swap(Some(current.generation), &next)
        .unwrap();
    eventually("istio-ca-crl is published", || {
        fake.configmap("shop", "istio-ca-crl").is_some_and(|c| {
            c["data"]["ca-crl.pem"] == crl && c["metadata"]["labels"]["istio.io/config"] == "true"
        })
    })
    .await;
    server.running.shutdown().await;
}
