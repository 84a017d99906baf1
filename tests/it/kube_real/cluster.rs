//! A real etcd and kube-apiserver on 127.0.0.1 (temp dirs, free ports): client-certificate admin,
//! RBAC and Node authorization, an ECDSA service-account signing key so TokenRequest mints real
//! projected tokens bound to Pods, the OIDC discovery document and `/openid/v1/jwks` served, and
//! an audit log (metadata only) that tests read to see every call meshid made and its answer.
//!
//! The binaries come from `tools/kube-bins.sh` through `MESHID_KUBE_APISERVER`, `MESHID_ETCD` and
//! `MESHID_ISTIO_CRDS` (`tools/kube-tests.sh` sets them). The shared cluster's processes die with
//! the test binary (`process.rs`); a private cluster is stopped when dropped.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use super::process::{free_port, remove_dead_runs, tail, Proc, OWNER, RUN_PREFIX};
use base64::{engine::general_purpose::STANDARD, Engine};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, ServiceAccount},
};
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// How the tests find the binaries, and what to run when they are missing.
pub const HOW_TO_RUN: &str = "run tools/kube-tests.sh, which builds kube-apiserver and etcd from the Go module proxy (tools/kube-bins.sh) and runs `cargo test --test it kube_real -- --include-ignored` with MESHID_KUBE_APISERVER, MESHID_ETCD and MESHID_ISTIO_CRDS set";

/// The paths `tools/kube-bins.sh` printed.
#[derive(Clone, Debug)]
pub struct Bins {
    pub apiserver: PathBuf,
    pub etcd: PathBuf,
    pub istio_crds: PathBuf,
}

impl Bins {
    /// Reads the paths from the environment; panics saying what is missing and what to run.
    pub fn from_env() -> Self {
        let get = |var: &str| -> PathBuf {
            let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) else {
                panic!("{var} is not set: this test needs a real kube-apiserver and etcd; {HOW_TO_RUN}");
            };
            let p = PathBuf::from(v);
            assert!(
                p.is_file(),
                "{var}={} is not a file; {HOW_TO_RUN}",
                p.display()
            );
            p
        };
        Self {
            apiserver: get("MESHID_KUBE_APISERVER"),
            etcd: get("MESHID_ETCD"),
            istio_crds: get("MESHID_ISTIO_CRDS"),
        }
    }
}

// === credentials ===

struct Pki {
    ca_pem: String,
    serving_cert: String,
    serving_key: String,
    client_ca_pem: String,
    admin_cert: String,
    admin_key: String,
    sa_key: String,
    sa_pub: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "kube-real serving CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let serving_key = KeyPair::generate().unwrap();
    let mut serving = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default.svc".to_string(),
    ])
    .unwrap();
    serving
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let serving_cert = serving
        .signed_by(&serving_key, &Issuer::new(ca, &ca_key))
        .unwrap();

    let client_ca_key = KeyPair::generate().unwrap();
    let mut client_ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    client_ca
        .distinguished_name
        .push(DnType::CommonName, "kube-real client CA");
    client_ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let client_ca_cert = client_ca.self_signed(&client_ca_key).unwrap();
    let admin_key = KeyPair::generate().unwrap();
    let mut admin = CertificateParams::new(Vec::<String>::new()).unwrap();
    admin
        .distinguished_name
        .push(DnType::CommonName, "kube-real-admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin
        .signed_by(&admin_key, &Issuer::new(client_ca, &client_ca_key))
        .unwrap();

    let sa = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        serving_cert: serving_cert.pem(),
        serving_key: serving_key.serialize_pem(),
        client_ca_pem: client_ca_cert.pem(),
        admin_cert: admin_cert.pem(),
        admin_key: admin_key.serialize_pem(),
        sa_key: sa.serialize_pem(),
        sa_pub: sa.public_key_pem(),
    }
}

const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n";

// === the cluster ===

/// etcd + kube-apiserver on loopback.
pub struct Cluster {
    dir: tempfile::TempDir,
    bins: Bins,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The service-account issuer: the API server's own URL, so its discovery document is real.
    pub issuer: String,
    /// The serving CA (PEM).
    pub ca_pem: String,
    pub admin_kubeconfig: PathBuf,
    pub audit_log: PathBuf,
    pub etcd_url: String,
    /// The service-account signing key (PKCS#8 PEM), for tokens the API server did not mint.
    pub sa_key_pem: String,
    /// How long etcd + kube-apiserver took to be ready.
    pub startup: Duration,
    apiserver_args: Vec<String>,
    etcd: Mutex<Option<Proc>>,
    apiserver: Mutex<Option<Proc>>,
    namespaces: AtomicUsize,
    meshid_token: tokio::sync::OnceCell<String>,
    istio_crds: tokio::sync::OnceCell<()>,
}

impl Cluster {
    /// A cluster of its own (stopped on drop), for tests that restart or compact.
    pub async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bins = Bins::from_env();
        let started = Instant::now();
        remove_dead_runs();
        let dir = tempfile::Builder::new()
            .prefix(RUN_PREFIX)
            .tempdir()
            .unwrap();
        let d = dir.path();
        std::fs::write(d.join(OWNER), std::process::id().to_string()).unwrap();
        let pki = pki();
        let write = |name: &str, text: &str| {
            let p = d.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        // For a person debugging with kubectl: --kubeconfig admin.kubeconfig, or this CA.
        write("ca.pem", &pki.ca_pem);
        let serving_cert = write("apiserver.pem", &pki.serving_cert);
        let serving_key = write("apiserver-key.pem", &pki.serving_key);
        let client_ca = write("client-ca.pem", &pki.client_ca_pem);
        let sa_key = write("sa.key", &pki.sa_key);
        let sa_pub = write("sa.pub", &pki.sa_pub);
        let audit_policy = write("audit-policy.yaml", AUDIT_POLICY);
        let audit_log = d.join("audit.log");

        let (client_port, peer_port) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let etcd_args = vec![
            "--name=kube-real".to_string(),
            format!("--data-dir={}", d.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=kube-real={peer}"),
            "--unsafe-no-fsync".to_string(),
            "--log-level=warn".to_string(),
        ];
        let mut etcd = Proc::start("etcd", &bins.etcd, &etcd_args, d.join("etcd.log"));
        wait_etcd(&mut etcd, &etcd_url).await;

        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".to_string(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", d.join("certs").display()),
            format!("--tls-cert-file={}", serving_cert.display()),
            format!("--tls-private-key-file={}", serving_key.display()),
            format!("--client-ca-file={}", client_ca.display()),
            "--authorization-mode=Node,RBAC".to_string(),
            "--enable-admission-plugins=NodeRestriction".to_string(),
            format!("--service-account-issuer={url}"),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-cluster-ip-range=10.96.0.0/16".to_string(),
            "--endpoint-reconciler-type=none".to_string(),
            format!("--audit-policy-file={}", audit_policy.display()),
            format!("--audit-log-path={}", audit_log.display()),
            "--profiling=false".to_string(),
        ];
        let admin_kubeconfig = write(
            "admin.kubeconfig",
            &kubeconfig(
                &url,
                &pki.ca_pem,
                &format!(
                    "    client-certificate-data: {}\n    client-key-data: {}\n",
                    STANDARD.encode(&pki.admin_cert),
                    STANDARD.encode(&pki.admin_key)
                ),
            ),
        );
        let mut cluster = Self {
            bins,
            url: url.clone(),
            issuer: url,
            ca_pem: pki.ca_pem,
            admin_kubeconfig,
            audit_log,
            etcd_url,
            sa_key_pem: pki.sa_key,
            startup: Duration::ZERO,
            apiserver_args,
            etcd: Mutex::new(Some(etcd)),
            apiserver: Mutex::new(None),
            namespaces: AtomicUsize::new(0),
            meshid_token: Default::default(),
            istio_crds: Default::default(),
            dir,
        };
        cluster.start_apiserver().await;
        cluster.startup = started.elapsed();
        cluster
    }

    /// One cluster for every test of this run that does not restart it (start-up is slow).
    pub async fn shared() -> &'static Self {
        static SHARED: tokio::sync::OnceCell<&'static Cluster> = tokio::sync::OnceCell::const_new();
        SHARED
            .get_or_init(|| async {
                let c = Cluster::start().await;
                eprintln!(
                    "kube_real: etcd + kube-apiserver ready in {:.1} s at {}",
                    c.startup.as_secs_f64(),
                    c.url
                );
                &*Box::leak(Box::new(c))
            })
            .await
    }

    /// Starts kube-apiserver (again) on its port and waits until `/readyz` answers 200.
    pub async fn start_apiserver(&self) {
        let log = self.dir.path().join("apiserver.log");
        // Keep earlier runs' output: a restart appends a new log.
        let log = if log.exists() {
            self.dir.path().join(format!(
                "apiserver.{}.log",
                std::fs::read_dir(self.dir.path()).unwrap().count()
            ))
        } else {
            log
        };
        let mut p = Proc::start(
            "kube-apiserver",
            &self.bins.apiserver,
            &self.apiserver_args,
            log,
        );
        let client = self.admin().await;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            p.check_alive();
            let req = hyper::Request::get("/readyz").body(Vec::new()).unwrap();
            if client.request_text(req).await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready within 300 s; its log ({}) ends with:\n{}",
                p.log.display(),
                tail(&p.log, 40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        *self.apiserver.lock().unwrap() = Some(p);
    }

    /// Stops kube-apiserver (SIGTERM; etcd keeps running).
    pub fn stop_apiserver(&self) {
        if let Some(mut p) = self.apiserver.lock().unwrap().take() {
            p.stop();
        }
    }

    /// A client with the admin certificate (group system:masters).
    pub async fn admin(&self) -> kube::Client {
        client_from(&self.admin_kubeconfig).await
    }

    /// A fresh namespace for one test.
    pub async fn namespace(&self, prefix: &str) -> String {
        let n = self.namespaces.fetch_add(1, Ordering::SeqCst);
        let name = format!("{prefix}-{n}");
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.admin().await)
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        name
    }

    /// A token from the TokenRequest API for `ns/sa`, bound to `pod` (name, uid) when given.
    pub async fn token(
        &self,
        ns: &str,
        sa: &str,
        audiences: &[&str],
        pod: Option<(&str, &str)>,
    ) -> String {
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audiences.iter().map(|s| s.to_string()).collect(),
                expiration_seconds: Some(3600),
                bound_object_ref: pod.map(|(name, uid)| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(name.into()),
                    uid: Some(uid.into()),
                }),
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(self.admin().await, ns)
            .create_token_request(sa, &PostParams::default(), &req)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{sa}: {e}"))
            .status
            .expect("a TokenRequest answer has a status")
            .token
    }

    /// A kubeconfig for `server` (this API server, or a proxy in front of it) with this
    /// cluster's CA and a bearer token.
    pub fn token_kubeconfig(&self, name: &str, server: &str, token: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(
            &p,
            kubeconfig(server, &self.ca_pem, &format!("    token: {token}\n")),
        )
        .unwrap();
        p
    }

    /// A token of ServiceAccount istio-system/meshid for the API server, once the
    /// deploy/kubernetes base's Namespace, ServiceAccount and RBAC are applied.
    pub async fn meshid_token(&self) -> &str {
        self.meshid_token
            .get_or_init(|| async {
                super::deploy_rbac::apply(&self.admin().await).await;
                self.token("istio-system", "meshid", &[], None).await
            })
            .await
    }

    /// meshid's kubeconfig: ServiceAccount istio-system/meshid under deploy/'s RBAC.
    pub async fn meshid_kubeconfig(&self) -> PathBuf {
        let token = self.meshid_token().await.to_owned();
        self.token_kubeconfig("meshid", &self.url, &token)
    }

    /// Istio's CRDs from istio.io/api's published YAML, installed once and established.
    pub async fn install_istio_crds(&self) {
        self.istio_crds
            .get_or_init(|| async {
                super::istio_crds::install(&self.admin().await, &self.bins.istio_crds).await
            })
            .await;
    }

    /// Compacts etcd at its current revision (physically); returns that revision.
    pub async fn compact_etcd(&self) -> i64 {
        let range = etcd_post(
            &self.etcd_url,
            "/v3/kv/range",
            serde_json::json!({"key": STANDARD.encode("\0")}),
        )
        .await;
        let rev: i64 = range["header"]["revision"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no revision in etcd's answer {range}"));
        etcd_post(
            &self.etcd_url,
            "/v3/kv/compaction",
            serde_json::json!({"revision": rev.to_string(), "physical": true}),
        )
        .await;
        rev
    }

    /// Every audit event so far (one JSON object per line).
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_apiserver();
        if let Some(mut p) = self.etcd.lock().unwrap_or_else(|e| e.into_inner()).take() {
            p.stop();
        }
    }
}

fn kubeconfig(url: &str, ca_pem: &str, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: kube-real\nclusters:\n- name: kube-real\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\ncontexts:\n- name: kube-real\n  context:\n    cluster: kube-real\n    user: u\nusers:\n- name: u\n  user:\n{user}",
        STANDARD.encode(ca_pem)
    )
}

/// A `kube::Client` from a kubeconfig file.
pub async fn client_from(path: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

async fn etcd_post(base: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = hyper::Request::post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("etcd {path}: {e}"));
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        status.is_success(),
        "etcd {path}: HTTP {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).unwrap()
}

async fn wait_etcd(p: &mut Proc, url: &str) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        p.check_alive();
        let req = hyper::Request::get(format!("{url}/health"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(resp) = client.request(req).await {
            let ok = resp.status().is_success();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
            if ok && body.is_ok_and(|b| String::from_utf8_lossy(&b).contains("\"true\"")) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "etcd not healthy within 60 s; its log ({}) ends with:\n{}",
            p.log.display(),
            tail(&p.log, 40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
