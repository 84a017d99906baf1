//! `meshid describe --server URL` (issue 25): the running server answers `describe` from its
//! own objects, settings and live proofs, so the CLI shows the EDS metadata the server serves
//! now. With `require_proxy_proof` a labelled pod whose proxy never connected is served
//! `tlsMode` disabled, which a snapshot `describe` (no proxies known) cannot see.

use std::{sync::Arc, time::Duration};

use meshid::clock::SystemClock;
use serde_json::Value;

use crate::{
    server::http_get,
    server_support::TestServer,
    support::meshid,
    ui::{connected_proxy, MIXED},
};

async fn proof_server() -> TestServer {
    TestServer::start_with(Arc::new(SystemClock), |c| {
        c.discovery = Some(meshid::config::Discovery {
            snapshot: Some(MIXED.into()),
            require_proxy_proof: true,
            proxy_proof_startup_grace: Duration::ZERO,
            ..Default::default()
        });
    })
    .await
}

/// The CLI, off the test's runtime (it blocks).
async fn cli(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        meshid(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap()
}

fn json_of(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_asks_the_running_server_and_shows_its_live_proofs() {
    let server = proof_server().await;
    let url = format!("http://{}", server.running.http_addr);
    let svc = "inventory-service.shop";
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = owned(&["describe", "service", svc, "--server", &url]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    // The snapshot alone knows no proxies: the label decides, mTLS.
    let offline = json_of(
        &cli(owned(&[
            "describe",
            "service",
            svc,
            "--snapshot",
            MIXED,
            "--output",
            "json",
        ]))
        .await,
    );
    assert_eq!(offline["endpoints"][0]["eds_tls_mode"], "istio");

    // The server requires a proof and has none: it serves tlsMode disabled, and says so.
    let live = json_of(&cli(args(&["--output", "json"])).await);
    let ep = &live["endpoints"][0];
    assert_ne!(ep["eds_tls_mode"], "istio", "{ep:#}");
    assert_eq!(ep["decision"], "plaintext", "{ep:#}");
    let text = cli(args(&[])).await;
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("inventory-service.shop"), "{text}");
    assert!(text.contains("plaintext"), "{text}");

    // Its proxy connects (SDS with a pod-bound token): the server now serves mTLS, and
    // describe --server shows the proof.
    let _proxy = connected_proxy(
        &server,
        "inventory-service",
        "inventory-service-5c8f7-k9p2m",
    )
    .await;
    let mut ep = Value::Null;
    for _ in 0..100 {
        let live = json_of(&cli(args(&["--output", "json"])).await);
        ep = live["endpoints"][0].clone();
        if ep["eds_tls_mode"] == "istio" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ep["eds_tls_mode"], "istio", "{ep:#}");
    assert_eq!(ep["decision"], "mtls", "{ep:#}");
    assert!(
        ep["sidecar_state"].as_str().unwrap().contains("proxy"),
        "{ep:#}"
    );

    // The host form works against the server and offline alike (the README's table says hosts work).
    let host = json_of(
        &cli(owned(&[
            "describe",
            "service",
            "inventory-service.shop.svc.cluster.local",
            "--server",
            &url,
            "--output",
            "json",
        ]))
        .await,
    );
    assert_eq!(host["service"], svc);
    let pod = cli(owned(&[
        "describe",
        "pod",
        "legacy-db-0.legacy",
        "--server",
        &url,
    ]))
    .await;
    assert!(
        pod.status.success(),
        "{}",
        String::from_utf8_lossy(&pod.stderr)
    );

    // What the server refuses is said, with the reason it gave.
    let missing = cli(owned(&[
        "describe",
        "service",
        "nope.shop",
        "--server",
        &url,
    ]))
    .await;
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("HTTP 404") && err.contains("nope.shop not found"),
        "{err}"
    );
    let resp = http_get(&server, "/debug/describe/service?name=x.y&bogus=1").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

/// Offline, `NAME.NS.svc.cluster.local` and `NAME.NS.svc` name the Service as `NAME.NS` does.
#[test]
fn describe_takes_a_service_by_host() {
    for name in [
        "inventory-service.shop",
        "inventory-service.shop.svc",
        "inventory-service.shop.svc.cluster.local",
    ] {
        let out = meshid(&[
            "describe",
            "service",
            name,
            "--snapshot",
            MIXED,
            "--output",
            "json",
        ]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["service"], "inventory-service.shop", "{name}");
    }
}

/// Issue 25: a CA file that does not hold the server's root is named as such, with where to
/// take the current bundle, instead of tonic's bare "transport error"; a wrong server name
/// says to give `--server-name`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_wrong_ca_file_is_told_what_to_use() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    crate::support::ok(&crate::support::init_ca(&other));
    let wrong = dir.path().join("wrong-root.pem");
    let bundle = crate::support::ok(&meshid(&[
        "bundle",
        "export",
        "--state-dir",
        other.to_str().unwrap(),
        "--format",
        "pem",
    ]));
    std::fs::write(&wrong, bundle).unwrap();
    let right = dir.path().join("root.pem");
    std::fs::write(&right, &server.root_pem).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, server.token("shop", "a")).unwrap();
    let url = format!("https://localhost:{}", server.running.grpc_addr.port());
    let request = |ca: &std::path::Path, extra: &[&str]| {
        let mut a: Vec<String> = owned(&[
            "cert",
            "request",
            "--server",
            &url,
            "--ca-file",
            ca.to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
            "--out-dir",
            dir.path().join("out").to_str().unwrap(),
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let out = cli(request(&wrong, &[])).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("UnknownIssuer"), "the cause is shown: {err}");
    assert!(
        err.contains("does not hold the root the server signs with now"),
        "{err}"
    );
    assert!(err.contains("meshid bundle export"), "{err}");
    let out = cli(request(&right, &["--server-name", "not-meshid.example"])).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--server-name"), "{err}");
    let out = cli(request(&right, &[])).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 25: `--jwks-url http://…` (and a config's `jwks.url`/`oidc_issuer`) is refused saying
/// HTTPS is required, not with the HTTP client's "client error (Connect)".
#[test]
fn a_jwks_url_must_be_https_and_says_so() {
    let out = meshid(&[
        "token",
        "verify",
        "--jwks-url",
        "http://127.0.0.1:9/jwks",
        "a.b.c",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not an https:// URL"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("m.toml");
    std::fs::write(
        &cfg,
        "state_dir = \"/x\"\n[[clusters]]\nname = \"Kubernetes\"\n[clusters.jwks]\nissuer = \"https://k\"\nurl = \"http://127.0.0.1:9/jwks\"\n",
    )
    .unwrap();
    let out = meshid(&["config", "check", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("clusters[0] (Kubernetes).jwks.url") && err.contains("https://"),
        "{err}"
    );
}

/// Owned arguments for `cli`.
fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}
