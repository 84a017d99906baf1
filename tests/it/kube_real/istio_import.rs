//! `meshid ca init --from-secret`: Istio's CA Secrets created through the real API server
//! become meshid's state with the same root. The layouts are Istio's: `cacerts` with
//! `ca-cert.pem`/`ca-key.pem`/`root-cert.pem`/`cert-chain.pem` or `tls.crt`/`tls.key`/`ca.crt`
//! (istiod `pilot/pkg/bootstrap/istio_ca.go` `detectSigningCABundle`), and `istio-ca-secret`,
//! istiod's self-signed CA (security `pkg/pki/ca` `NewSelfSignedIstioCAOptions`: type
//! `istio.io/ca-root`, `ca-cert.pem` = `root-cert.pem` = the root, its PKCS#1 RSA key in
//! `ca-key.pem`, `cert-chain.pem` and `key.pem` empty).

use std::{collections::BTreeMap, path::Path, process::Command};

use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::api::{Api, ObjectMeta, PostParams};

use super::cluster::Cluster;

fn meshid(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meshid"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "meshid {args:?}: {text}");
    text
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (tools/test.sh checks)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn create_secret(api: &Api<Secret>, name: &str, kind: &str, data: &[(&str, Vec<u8>)]) {
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        type_: Some(kind.into()),
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.clone())))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Default::default()
    };
    api.create(&PostParams::default(), &s).await.unwrap();
}

/// The root `meshid root status` reports as active, by fingerprint id.
fn active_root(state: &str) -> serde_json::Value {
    let status: serde_json::Value = serde_json::from_str(&meshid(&[
        "root", "status", "--state", state, "--output", "json",
    ]))
    .unwrap();
    status["roots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["state"] == "active")
        .cloned()
        .unwrap_or_else(|| panic!("no active root in {status}"))
}

/// Issue 21: `cacerts` in both key layouts and istiod's `istio-ca-secret` import with their
/// own root (the fingerprint Istio's proxies already trust), and the imported CA issues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn istio_ca_secrets_import_with_their_own_root() {
    let cluster = Cluster::shared().await;
    let ns = cluster.namespace("istio-import").await;
    let api: Api<Secret> = Api::namespaced(cluster.admin().await, &ns);
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_owned();
    let read = |n: &str| std::fs::read(tmp.path().join(n)).unwrap();

    // A plug-in CA as Istio's tools/certs make one: an intermediate under an offline root.
    meshid(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--state",
        &p("offline"),
    ]);
    meshid(&[
        "ca",
        "intermediate",
        "--state",
        &p("offline"),
        "--cluster",
        "east",
        "--out-dir",
        &p("east"),
    ]);
    let file = |f: &str| read(&format!("east/{f}"));
    create_secret(
        &api,
        "cacerts",
        "Opaque",
        &[
            ("ca-cert.pem", file("ca-cert.pem")),
            ("ca-key.pem", file("ca-key.pem")),
            ("root-cert.pem", file("root-cert.pem")),
            ("cert-chain.pem", file("cert-chain.pem")),
        ],
    )
    .await;
    create_secret(
        &api,
        "cacerts-tls",
        "kubernetes.io/tls",
        &[
            ("tls.crt", file("cert-chain.pem")),
            ("tls.key", file("ca-key.pem")),
            ("ca.crt", file("root-cert.pem")),
        ],
    )
    .await;
    // istiod's self-signed CA: RSA 2048, PKCS#1, O=<trust domain>.
    openssl(
        &["genrsa", "-traditional", "-out", "istiod-key.pem", "2048"],
        tmp.path(),
    );
    openssl(
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "istiod-key.pem",
            "-subj",
            "/O=cluster.local",
            "-days",
            "3650",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            "-out",
            "istiod-cert.pem",
        ],
        tmp.path(),
    );
    let (istiod_cert, istiod_key) = (read("istiod-cert.pem"), read("istiod-key.pem"));
    create_secret(
        &api,
        "istio-ca-secret",
        "istio.io/ca-root",
        &[
            ("ca-cert.pem", istiod_cert.clone()),
            ("ca-key.pem", istiod_key),
            ("root-cert.pem", istiod_cert.clone()),
            ("cert-chain.pem", Vec::new()),
            ("key.pem", Vec::new()),
        ],
    )
    .await;

    let kc = cluster.admin_kubeconfig.to_str().unwrap().to_owned();
    let fingerprint = |pem: &[u8]| {
        let der = &meshid::ca::cert::certs_from_pem(pem, "root").unwrap()[0];
        meshid::ca::cert::fingerprint_id(der)
    };
    let offline_root = fingerprint(&file("root-cert.pem"));
    for (secret, want_root) in [
        ("cacerts", &offline_root),
        ("cacerts-tls", &offline_root),
        ("istio-ca-secret", &fingerprint(&istiod_cert)),
    ] {
        let state = p(&format!("imported-{secret}"));
        let out = meshid(&[
            "ca",
            "init",
            "--trust-domain",
            "cluster.local",
            "--state",
            &state,
            "--from-secret",
            &format!("{ns}/{secret}"),
            "--kubeconfig",
            &kc,
        ]);
        assert!(out.contains("initialized CA"), "{out}");
        assert_eq!(&active_root(&state)["id"], want_root, "{secret}");
        meshid(&[
            "cert",
            "issue",
            "--state",
            &state,
            "--spiffe-id",
            "spiffe://cluster.local/ns/shop/sa/product",
            "--out-dir",
            &p(&format!("leaf-{secret}")),
        ]);
        let chain = p(&format!("leaf-{secret}/cert-chain.pem"));
        let root = p(&format!("leaf-{secret}/root-cert.pem"));
        meshid(&["cert", "inspect", &chain, "--root", &root]);
    }
    // A Secret without a CA is refused naming what it has.
    create_secret(&api, "not-a-ca", "Opaque", &[("token", b"x".to_vec())]).await;
    let out = Command::new(env!("CARGO_BIN_EXE_meshid"))
        .args([
            "ca",
            "init",
            "--trust-domain",
            "cluster.local",
            "--state",
            &p("none"),
            "--from-secret",
            &format!("{ns}/not-a-ca"),
            "--kubeconfig",
            &kc,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("token"), "{err}");
    assert!(!tmp.path().join("none/state.json").exists());
}
