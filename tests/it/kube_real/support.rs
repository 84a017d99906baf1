//! Workloads on the real API server, and meshid servers pointed at it.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ServiceAccount};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use meshid::{clock::Clock, config};

use super::cluster::Cluster;
use crate::server_support::TestServer;

/// Creates ServiceAccount `sa` (if absent) and an unscheduled Pod `pod` running as it, with
/// `labels`; returns the pod's UID. (No scheduler or kubelet runs: the pod stays Pending, which
/// is all the API server needs to bind tokens to it and to serve it to watchers.)
pub async fn workload(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    pod: &str,
    labels: &[(&str, &str)],
) -> String {
    workload_on(client, ns, sa, pod, labels, None).await
}

/// As [`workload`], with the pod bound to node `node` (`spec.nodeName`, as the scheduler would
/// set it; no Node object or kubelet is needed for the API server to keep it).
pub async fn workload_on(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    pod: &str,
    labels: &[(&str, &str)],
    node: Option<&str>,
) -> String {
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(sa.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match sas.create(&PostParams::default(), &account).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating ServiceAccount {ns}/{sa}: {e}"),
    }
    let p = Pod {
        metadata: ObjectMeta {
            name: Some(pod.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(sa.into()),
            node_name: node.map(str::to_owned),
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.invalid/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &p)
        .await
        .unwrap_or_else(|e| panic!("creating Pod {ns}/{pod}: {e}"))
        .metadata
        .uid
        .expect("a created pod has a uid")
}

/// Deletes a pod and waits until the API server no longer has it (an unscheduled pod is
/// deleted at once: no kubelet has to confirm).
pub async fn delete_pod(client: &kube::Client, ns: &str, pod: &str) {
    delete_pod_with(client, ns, pod, &DeleteParams::default()).await
}

/// As [`delete_pod`], with `params` (a pod bound to a node waits for its kubelet unless the
/// grace period is 0: `kubectl delete --force --grace-period=0`).
pub async fn delete_pod_with(client: &kube::Client, ns: &str, pod: &str, params: &DeleteParams) {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let uid = api.get(pod).await.unwrap().metadata.uid.unwrap();
    api.delete(pod, params).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        kube::runtime::wait::await_condition(
            api,
            pod,
            kube::runtime::wait::conditions::is_deleted(&uid),
        ),
    )
    .await
    .expect("the pod is gone within 30 s")
    .unwrap();
}

/// The default cluster of a test server, validating through `backend`.
pub fn cluster_config(
    tokenreview: Option<config::TokenReview>,
    jwks: Option<config::Jwks>,
) -> config::Cluster {
    config::Cluster {
        name: "Kubernetes".into(),
        aliases: Vec::new(),
        default: true,
        audiences: vec!["istio-ca".into()],
        allow_legacy_tokens: false,
        cache_ttl: Duration::from_secs(60),
        cache_max_entries: 1000,
        negative_cache_ttl: Duration::from_secs(5),
        negative_cache_max_entries: 1000,
        leeway: Duration::from_secs(60),
        tokenreview,
        jwks,
    }
}

/// TokenReview through meshid's kubeconfig (ServiceAccount istio-system/meshid).
pub async fn tokenreview_backend(cluster: &Cluster) -> config::TokenReview {
    config::TokenReview {
        kubeconfig: Some(cluster.meshid_kubeconfig().await),
        rate: Default::default(),
        timeout: Duration::from_secs(5),
        issuers: Vec::new(),
        verify_signatures: true,
        mode: Default::default(),
    }
}

/// JWKS from the API server through meshid's kubeconfig.
pub async fn apiserver_jwks_backend(cluster: &Cluster) -> config::Jwks {
    config::Jwks {
        issuer: cluster.issuer.clone(),
        additional_issuers: Vec::new(),
        file: None,
        url: None,
        oidc_issuer: None,
        api_server: Some(config::ApiServerJwks {
            kubeconfig: Some(cluster.meshid_kubeconfig().await),
        }),
        ca_file: None,
    }
}

/// A meshid server (in process, dev issuer unused) whose default cluster is `cluster_cfg`.
pub async fn meshid_with(
    clock: Arc<dyn Clock>,
    cluster_cfg: config::Cluster,
    edit: impl FnOnce(&mut config::Config),
) -> TestServer {
    TestServer::start_with(clock, move |cfg| {
        cfg.clusters = vec![cluster_cfg];
        edit(cfg);
    })
    .await
}

/// The SPIFFE ID of the leaf meshid issues over the CSR API for `token`, or the refusal.
pub async fn csr_identity(server: &TestServer, token: &str) -> Result<String, tonic::Status> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let mut client = server.csr(Some(token.to_string())).await;
    let resp = client
        .create_certificate(meshid::api::istio::IstioCertificateRequest {
            csr,
            validity_duration: 600,
            metadata: None,
        })
        .await?
        .into_inner();
    let leaf = &rustls_pki_types::pem::PemObject::pem_slice_iter(resp.cert_chain[0].as_bytes())
        .collect::<Result<Vec<rustls_pki_types::CertificateDer<'static>>, _>>()
        .unwrap()[0];
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let san = parsed
        .subject_alternative_name()
        .unwrap()
        .expect("an SVID has a SAN");
    let uris: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris.len(), 1, "one URI SAN: {uris:?}");
    Ok(uris[0].clone())
}

/// Prints how long a test took (libtest on stable Rust reports no per-test times).
pub struct Timed(&'static str, std::time::Instant);

impl Timed {
    pub fn start(name: &'static str) -> Self {
        Self(name, std::time::Instant::now())
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        eprintln!(
            "kube_real: {} took {:.1} s{}",
            self.0,
            self.1.elapsed().as_secs_f64(),
            if std::thread::panicking() {
                " (failed)"
            } else {
                ""
            }
        );
    }
}
