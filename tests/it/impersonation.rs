//! Node agents asking for the certificates of the pods on their node (Istio ambient's ztunnel:
//! `ImpersonatedIdentity` in the CSR request's metadata), judged as istiod's
//! `ClusterNodeAuthorizer.authenticateImpersonation` (security/pkg/server/ca/node_auth.go) judges them,
//! over the wire; and `csr_san_policy`, istiod's `CreateCertificate` signing for the
//! authenticated caller whatever the CSR asks.

use std::{sync::Arc, time::Duration};

use meshid::{
    api::istio::IstioCertificateRequest, clock::SystemClock, config::CsrSanPolicy,
    identity::dev_issuer::TokenRequest,
};
use prost_types::{value::Kind, Struct, Value};
use tonic::Code;
use x509_parser::{extensions::GeneralName, prelude::*};

use crate::{
    server::http_get,
    server_support::TestServer,
    support::{csr, p256},
};

const PODS: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Pod, metadata: {name: ztunnel-a, namespace: istio-system, uid: uid-za}, spec: {serviceAccountName: ztunnel, nodeName: node-a, containers: [{name: istio-proxy, image: ztunnel}]}, status: {phase: Running, podIP: 10.0.0.2}}
- {apiVersion: v1, kind: Pod, metadata: {name: ztunnel-b, namespace: istio-system, uid: uid-zb}, spec: {serviceAccountName: ztunnel, nodeName: node-b, containers: [{name: istio-proxy, image: ztunnel}]}, status: {phase: Running, podIP: 10.0.1.2}}
- {apiVersion: v1, kind: Pod, metadata: {name: product-0, namespace: shop, uid: uid-p0}, spec: {serviceAccountName: product-service, nodeName: node-a, containers: [{name: app, image: product}]}, status: {phase: Running, podIP: 10.0.0.10}}
- {apiVersion: v1, kind: Pod, metadata: {name: inventory-0, namespace: shop, uid: uid-i0}, spec: {serviceAccountName: inventory-service, nodeName: node-b, containers: [{name: app, image: inventory}]}, status: {phase: Running, podIP: 10.0.1.10}}
- {apiVersion: v1, kind: Pod, metadata: {name: batch-0, namespace: shop, uid: uid-b0}, spec: {serviceAccountName: batch, nodeName: node-a, containers: [{name: app, image: batch}]}, status: {phase: Failed}}
"#;

const TD: &str = "spiffe://cluster.local";

async fn server_with_pods(edit: impl FnOnce(&mut meshid::config::Config)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("pods.yaml");
    std::fs::write(&snapshot, PODS).unwrap();
    let server = TestServer::start_with(Arc::new(SystemClock), |c| {
        c.discovery = Some(meshid::config::Discovery {
            snapshot: Some(snapshot),
            ..Default::default()
        });
        edit(c);
    })
    .await;
    // The snapshot file is read at start; the directory may go.
    drop(dir);
    server
}

/// A token bound to pod `pod` (name, uid), as kubelet projects it.
fn pod_token(server: &TestServer, ns: &str, sa: &str, pod: Option<(&str, &str)>) -> String {
    let req = TokenRequest {
        namespace: ns.into(),
        service_account: sa.into(),
        audiences: vec!["istio-ca".into()],
        ttl: Duration::from_secs(3600),
        pod: pod.map(|(n, u)| (n.into(), u.into())),
    };
    server.issuer.token(&req, server.clock.now()).unwrap()
}

/// A request as ztunnel sends it: a CSR naming the identity, and `ImpersonatedIdentity`.
fn ztunnel_request(impersonated: Option<&str>, csr_sans: &[&str]) -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr: csr(&p256(), csr_sans),
        validity_duration: 3600,
        metadata: impersonated.map(|id| Struct {
            fields: [(
                "ImpersonatedIdentity".to_owned(),
                Value {
                    kind: Some(Kind::StringValue(id.into())),
                },
            )]
            .into(),
        }),
    }
}

/// The URI SANs of the leaf (the first element).
fn leaf_uris(chain: &[String]) -> Vec<String> {
    let der = rustls_pki_types::CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => panic!("the leaf carries a non-URI SAN {other:?}"),
        })
        .collect()
}

use rustls_pki_types::pem::PemObject;

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn metric(metrics: &str, line_start: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_gets_the_certificate_of_a_pod_on_its_node() {
    let server = server_with_pods(|_| {}).await;
    let token = pod_token(
        &server,
        "istio-system",
        "ztunnel",
        Some(("ztunnel-a", "uid-za")),
    );
    let product = format!("{TD}/ns/shop/sa/product-service");
    // As ztunnel asks: the CSR names the impersonated identity. And a CSR naming anything else
    // (here ztunnel's own identity): the certificate still names only the impersonated one.
    for sans in [
        vec![product.as_str()],
        vec!["spiffe://cluster.local/ns/istio-system/sa/ztunnel"],
        vec![],
    ] {
        let chain = server
            .csr(Some(token.clone()))
            .await
            .create_certificate(ztunnel_request(Some(&product), &sans))
            .await
            .unwrap()
            .into_inner()
            .cert_chain;
        assert_eq!(leaf_uris(&chain), [product.as_str()], "CSR SANs {sans:?}");
        // The root bundle last, as ztunnel reads it.
        assert_eq!(chain.last().unwrap().trim(), server.root_pem.trim());
    }
    // Without the metadata, the same caller gets its own identity.
    let own = server
        .csr(Some(token.clone()))
        .await
        .create_certificate(ztunnel_request(None, &[]))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(
        leaf_uris(&own),
        [format!("{TD}/ns/istio-system/sa/ztunnel")]
    );
    let metrics = http_get(&server, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "meshid_impersonation_requests_total{result=\"allowed\"}"
        ),
        Some(3.0),
        "{metrics}"
    );
    server.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_is_refused_unless_every_rule_holds() {
    let server = server_with_pods(|_| {}).await;
    let za = ("ztunnel-a", "uid-za");
    let cases: Vec<(&str, String, String)> = vec![
        // An untrusted caller (a workload) asking for a pod on its own node.
        (
            "caller_not_trusted",
            pod_token(
                &server,
                "shop",
                "product-service",
                Some(("product-0", "uid-p0")),
            ),
            format!("{TD}/ns/shop/sa/product-service"),
        ),
        // The target's only pod runs on another node.
        (
            "not_on_node",
            pod_token(&server, "istio-system", "ztunnel", Some(za)),
            format!("{TD}/ns/shop/sa/inventory-service"),
        ),
        // A failed pod does not count.
        (
            "not_on_node",
            pod_token(&server, "istio-system", "ztunnel", Some(za)),
            format!("{TD}/ns/shop/sa/batch"),
        ),
        // Another trust domain.
        (
            "foreign_trust_domain",
            pod_token(&server, "istio-system", "ztunnel", Some(za)),
            "spiffe://other.example/ns/shop/sa/product-service".into(),
        ),
        // The token is bound to a pod of that name with another UID (a recreated pod).
        (
            "caller_pod_uid_mismatch",
            pod_token(
                &server,
                "istio-system",
                "ztunnel",
                Some(("ztunnel-a", "uid-stale")),
            ),
            format!("{TD}/ns/shop/sa/product-service"),
        ),
        // A token bound to no pod.
        (
            "caller_not_pod_bound",
            pod_token(&server, "istio-system", "ztunnel", None),
            format!("{TD}/ns/shop/sa/product-service"),
        ),
        // Not Istio's identity shape.
        (
            "identity_invalid",
            pod_token(&server, "istio-system", "ztunnel", Some(za)),
            format!("{TD}/product-service"),
        ),
    ];
    for (reason, token, requested) in &cases {
        let err = server
            .csr(Some(token.clone()))
            .await
            .create_certificate(ztunnel_request(Some(requested), &[requested]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{reason}: {err:?}");
        // No reason to the caller.
        assert_eq!(
            err.message(),
            "request impersonation authorization failure",
            "{reason}"
        );
    }
    let metrics = http_get(&server, "/metrics").await;
    for (reason, want) in [
        ("caller_not_trusted", 1.0),
        ("not_on_node", 2.0),
        ("foreign_trust_domain", 1.0),
        ("caller_pod_uid_mismatch", 1.0),
        ("caller_not_pod_bound", 1.0),
        ("identity_invalid", 1.0),
    ] {
        assert_eq!(
            metric(
                &metrics,
                &format!("meshid_impersonation_requests_total{{result=\"{reason}\"}}")
            ),
            Some(want),
            "{reason}\n{metrics}"
        );
    }
    assert!(
        metrics.contains("meshid_impersonation_requests_total{result=\"allowed\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshid_certs_issued_total{api=\"csr\"} 0"),
        "nothing was issued: {metrics}"
    );
    server.running.shutdown().await;
}

/// Without discovery there is no pod index: impersonation is refused, and so it is with an
/// empty `trusted_node_accounts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_needs_the_pod_index_and_a_trusted_account() {
    let product = format!("{TD}/ns/shop/sa/product-service");
    let no_discovery = TestServer::start(Arc::new(SystemClock)).await;
    let none_trusted = server_with_pods(|c| c.trusted_node_accounts.clear()).await;
    for server in [&no_discovery, &none_trusted] {
        let token = pod_token(
            server,
            "istio-system",
            "ztunnel",
            Some(("ztunnel-a", "uid-za")),
        );
        let err = server
            .csr(Some(token))
            .await
            .create_certificate(ztunnel_request(Some(&product), &[&product]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let metrics = http_get(server, "/metrics").await;
        assert!(
            metrics.contains("meshid_impersonation_requests_total{result=\"not_configured\"} 1"),
            "{metrics}"
        );
    }
    no_discovery.running.shutdown().await;
    none_trusted.running.shutdown().await;
}

/// istiod's `CreateCertificate` ignores the CSR's SANs; meshid refuses a foreign one by default,
/// naming both identities and the setting, and signs for the caller under
/// `csr_san_policy = "authenticated-identity"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_san_policy() {
    let strict = TestServer::start(Arc::new(SystemClock)).await;
    let foreign = "spiffe://corp.example/ns/shop/sa/product-service";
    let err = strict
        .csr(Some(strict.token("shop", "product-service")))
        .await
        .create_certificate(ztunnel_request(None, &[foreign]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    for part in [
        foreign,
        "spiffe://cluster.local/ns/shop/sa/product-service",
        "csr_san_policy = \"authenticated-identity\"",
        "TRUST_DOMAIN",
    ] {
        assert!(err.message().contains(part), "{part:?} missing in {err:?}");
    }
    strict.running.shutdown().await;

    let lenient = TestServer::start_with(Arc::new(SystemClock), |c| {
        c.csr_san_policy = CsrSanPolicy::AuthenticatedIdentity;
    })
    .await;
    for sans in [
        vec![foreign],
        vec!["spiffe://cluster.local/ns/a/sa/b", "web.example"],
    ] {
        let chain = lenient
            .csr(Some(lenient.token("shop", "product-service")))
            .await
            .create_certificate(ztunnel_request(None, &sans))
            .await
            .unwrap()
            .into_inner()
            .cert_chain;
        assert_eq!(
            leaf_uris(&chain),
            ["spiffe://cluster.local/ns/shop/sa/product-service"],
            "{sans:?}"
        );
    }
    // The CSR itself is still checked (its form, key and signature): a damaged one is refused.
    let mut bad = ztunnel_request(None, &[]);
    let mut der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(bad.csr.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    bad.csr = pem("CERTIFICATE REQUEST", &der);
    let err = lenient
        .csr(Some(lenient.token("shop", "product-service")))
        .await
        .create_certificate(bad)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("signature"), "{err:?}");
    lenient.running.shutdown().await;
}

#[test]
fn the_setting_is_read_from_toml() {
    let base = r#"
state_dir = "/x"
csr_san_policy = "authenticated-identity"
trusted_node_accounts = ["istio-system/ztunnel", "kube-system/node-agent"]
[[clusters]]
name = "Kubernetes"
[clusters.jwks]
issuer = "https://kubernetes.default.svc.cluster.local"
file = "/etc/meshid/jwks.json"
"#;
    let c = meshid::config::Config::from_toml(base).unwrap();
    assert_eq!(c.csr_san_policy, CsrSanPolicy::AuthenticatedIdentity);
    assert_eq!(c.trusted_node_accounts.len(), 2);
    let errs = meshid::config::Config::from_toml(
        &base.replace("\"kube-system/node-agent\"", "\"ztunnel\""),
    )
    .unwrap_err();
    assert!(
        errs[0].starts_with("trusted_node_accounts[1]: \"ztunnel\""),
        "{errs:?}"
    );
    let errs = meshid::config::Config::from_toml(&base.replace("authenticated-identity", "any"))
        .unwrap_err();
    assert!(errs[0].contains("csr_san_policy"), "{errs:?}");
    // The default: Istio's ztunnel account.
    let c = meshid::config::Config::from_toml(
        &base
            .replace("csr_san_policy = \"authenticated-identity\"\n", "")
            .replace(
                "trusted_node_accounts = [\"istio-system/ztunnel\", \"kube-system/node-agent\"]\n",
                "",
            ),
    )
    .unwrap();
    assert_eq!(c.csr_san_policy, CsrSanPolicy::MatchCaller);
    assert_eq!(c.trusted_node_accounts, ["istio-system/ztunnel"]);
}
