//! ztunnel-style impersonation (issue 22) on a real API server: the caller's token is a
//! TokenRequest bound to its pod, reviewed by kube-apiserver (TokenReview's pod-name/pod-uid
//! extra), and the pods and their nodes come from discovery's live watch under deploy/'s RBAC,
//! as istiod's `ClusterNodeAuthorizer.authenticateImpersonation` reads them from its pod informer.

use std::{sync::Arc, time::Duration};

use kube::api::DeleteParams;
use meshid::{api::istio::IstioCertificateRequest, clock::SystemClock};
use prost_types::{value::Kind, Struct, Value};
use tonic::Code;

use super::{
    cluster::Cluster,
    support::{cluster_config, delete_pod_with, tokenreview_backend, workload_on, Timed},
};
use crate::server_support::TestServer;

async fn impersonate(
    server: &TestServer,
    token: &str,
    id: &str,
) -> Result<Vec<String>, tonic::Status> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let req = IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata: Some(Struct {
            fields: [(
                "ImpersonatedIdentity".to_owned(),
                Value {
                    kind: Some(Kind::StringValue(id.into())),
                },
            )]
            .into(),
        }),
    };
    Ok(server
        .csr(Some(token.to_owned()))
        .await
        .create_certificate(req)
        .await?
        .into_inner()
        .cert_chain)
}

/// Retries while discovery has not yet seen what the API server has (the watch is eventually
/// consistent, as istiod's informer is: ztunnel retries too).
async fn until_ok(server: &TestServer, token: &str, id: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match impersonate(server, token, id).await {
            Ok(chain) => return chain,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{id}: still refused after 30 s: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn a_node_agent_gets_the_pods_of_its_node_and_nothing_else() {
    let _t = Timed::start("kube_real::impersonation");
    let cluster = Cluster::shared().await;
    let admin = cluster.admin().await;
    let sys = cluster.namespace("imp-system").await;
    let ns = cluster.namespace("imp-shop").await;
    let za = workload_on(&admin, &sys, "ztunnel", "ztunnel-a", &[], Some("node-a")).await;
    workload_on(&admin, &sys, "ztunnel", "ztunnel-b", &[], Some("node-b")).await;
    workload_on(&admin, &ns, "product", "product-0", &[], Some("node-a")).await;
    workload_on(&admin, &ns, "inventory", "inventory-0", &[], Some("node-b")).await;
    let cfg_cluster = cluster_config(Some(tokenreview_backend(cluster).await), None);
    let kc = cluster.meshid_kubeconfig().await;
    let trusted = format!("{sys}/ztunnel");
    let server = TestServer::start_with(Arc::new(SystemClock), move |cfg| {
        cfg.clusters = vec![cfg_cluster];
        cfg.trusted_node_accounts = vec![trusted];
        cfg.discovery = Some(meshid::config::Discovery {
            kubeconfig: Some(kc),
            ..Default::default()
        });
    })
    .await;
    let td = "spiffe://cluster.local";
    let product = format!("{td}/ns/{ns}/sa/product");
    let inventory = format!("{td}/ns/{ns}/sa/inventory");
    let token_a = cluster
        .token(&sys, "ztunnel", &["istio-ca"], Some(("ztunnel-a", &za)))
        .await;

    // Allowed: product-0 runs on ztunnel-a's node. The leaf names exactly that identity.
    let chain = until_ok(&server, &token_a, &product).await;
    let der = rustls_pki_types::pem::PemObject::pem_slice_iter(chain[0].as_bytes())
        .collect::<Result<Vec<rustls_pki_types::CertificateDer<'static>>, _>>()
        .unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", sans.value.general_names),
        format!("[URI({product:?})]")
    );

    // Refused: inventory runs on node-b only.
    let e = impersonate(&server, &token_a, &inventory)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Refused: a workload's own pod-bound token is not a node account.
    let uid_p1 = workload_on(&admin, &ns, "product", "product-1", &[], Some("node-a")).await;
    let token_p = cluster
        .token(&ns, "product", &["istio-ca"], Some(("product-1", &uid_p1)))
        .await;
    let e = impersonate(&server, &token_p, &product).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Refused: a foreign trust domain.
    let e = impersonate(
        &server,
        &token_a,
        &format!("spiffe://other.example/ns/{ns}/sa/product"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // An inventory pod scheduled onto node-a later is found once discovery sees it.
    workload_on(&admin, &ns, "inventory", "inventory-1", &[], Some("node-a")).await;
    until_ok(&server, &token_a, &inventory).await;

    // ztunnel-a recreated under the same name: the old token's pod UID no longer matches. The
    // API server itself refuses the old token (its bound pod is gone), so TokenReview ends it
    // before the node check; a token for the new pod works.
    // No kubelet runs to confirm a graceful delete of a pod bound to a node: force it.
    delete_pod_with(
        &admin,
        &sys,
        "ztunnel-a",
        &DeleteParams::default().grace_period(0),
    )
    .await;
    let za2 = workload_on(&admin, &sys, "ztunnel", "ztunnel-a", &[], Some("node-a")).await;
    assert_ne!(za, za2);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        match impersonate(&server, &token_a, &product).await {
            Err(e) => {
                assert!(
                    matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied),
                    "{e:?}"
                );
                break;
            }
            Ok(_) if std::time::Instant::now() < deadline => {
                // The validator's cache may still hold the old review for up to cache_ttl.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(_) => panic!("a token bound to a deleted pod still impersonates after 90 s"),
        }
    }
    let token_a2 = cluster
        .token(&sys, "ztunnel", &["istio-ca"], Some(("ztunnel-a", &za2)))
        .await;
    until_ok(&server, &token_a2, &product).await;
    server.running.shutdown().await;
}
