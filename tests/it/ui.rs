//! The status page (`/ui`) and its JSON (`/ui/status.json`) against an in-process server with
//! the mission's mixed-traffic example: the schema the README documents, and the page as HTML
//! without JavaScript. The browser test (headless Chromium, axe-core) is `ui_browser.rs`.

use std::{sync::Arc, time::Duration};

use meshid::{clock::SystemClock, identity::dev_issuer::TokenRequest, state::DirStore};
use serde_json::Value;

use crate::{
    rotation_server::prepare_generated,
    server::{http_get, Sds},
    server_support::{sds_req, TestServer},
};

pub(crate) const MIXED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/examples/mixed-traffic.yaml"
);

/// A server over the mixed-traffic snapshot.
pub(crate) async fn mixed_server() -> TestServer {
    TestServer::start_with(Arc::new(SystemClock), |c| {
        c.discovery = Some(meshid::config::Discovery {
            snapshot: Some(MIXED.into()),
            ..Default::default()
        });
    })
    .await
}

/// The sidecar of pod `pod` (service account `sa`, namespace shop) of the mixed example,
/// connected over SDS with its pod-bound token, having ACKed `default` and `ROOTCA`: its pod
/// is then proven to run a proxy.
pub(crate) async fn connected_proxy(server: &TestServer, sa: &str, pod: &str) -> Sds {
    let token = server
        .issuer
        .token(
            &TokenRequest {
                namespace: "shop".into(),
                service_account: sa.into(),
                audiences: vec!["istio-ca".into()],
                ttl: Duration::from_secs(3600),
                pod: Some((pod.into(), format!("uid-{pod}"))),
            },
            server.clock.now(),
        )
        .unwrap();
    let mut s = Sds::open(server, token).await.unwrap();
    s.send(sds_req(&["default", "ROOTCA"], "", "")).await;
    let r = s.recv().await;
    s.send(sds_req(&["default", "ROOTCA"], &r.nonce, &r.version_info))
        .await;
    s
}

/// Both sidecars of the mixed example, connected.
pub(crate) async fn proxies(server: &TestServer) -> [Sds; 2] {
    [
        connected_proxy(server, "product-service", "product-service-7d4b9-x2x7q").await,
        connected_proxy(server, "inventory-service", "inventory-service-5c8f7-k9p2m").await,
    ]
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

pub(crate) async fn status(server: &TestServer) -> Value {
    let resp = http_get(server, "/ui/status.json").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    serde_json::from_str(body(&resp)).unwrap()
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

fn service<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["discovery"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["service"] == name)
        .unwrap_or_else(|| panic!("{name} missing in {s:#}"))
}

/// The schema documented in the README's "The status page": every key, and what the mixed
/// example shows through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_json_follows_its_documented_schema() {
    let server = mixed_server().await;
    let _proxies = proxies(&server).await;
    let mut s = status(&server).await;
    // The ACK lands just after the response the client read ...
    for _ in 0..100 {
        // ... and discovery's view follows the proofs the certificates gave.
        if s["rotation"]["leaf_streams_current"] == 2
            && service(&s, "inventory-service.shop")["endpoints"][0]["link"] == "mtls"
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        s = status(&server).await;
    }
    assert_eq!(
        keys(&s),
        [
            "discovery",
            "federation",
            "generated_at",
            "proxies",
            "replica",
            "replicas",
            "roots",
            "rotation",
            "schema",
            "state_generation",
            "state_problem",
            "trust_domain"
        ]
    );
    assert_eq!(s["schema"], "meshid.status/v1");
    assert!(
        s["replicas"].is_null(),
        "the state is a directory: no replicas to list"
    );
    assert_eq!(s["trust_domain"], "cluster.local");
    let root = &s["roots"][0];
    assert_eq!(
        keys(root),
        [
            "expires_in_seconds",
            "id",
            "not_after",
            "not_before",
            "signs",
            "state",
            "state_since",
            "streams_holding",
            "subject",
            "trusted"
        ]
    );
    assert_eq!(root["state"], "active");
    assert_eq!(root["signs"], true);
    assert_eq!(root["streams_holding"], 2);
    assert_eq!(
        keys(&s["rotation"]),
        [
            "bundle_streams",
            "bundle_streams_current",
            "in_progress",
            "laggards",
            "leaf_streams",
            "leaf_streams_current",
            "signer",
            "streams"
        ]
    );
    assert_eq!(s["rotation"]["in_progress"], false);
    assert_eq!(s["rotation"]["leaf_streams_current"], 2);
    let p = &s["proxies"][0];
    assert_eq!(
        keys(p),
        [
            "earliest_leaf_expiry",
            "identities",
            "latest_leaf_expiry",
            "namespace",
            "streams"
        ]
    );
    assert_eq!(p["namespace"], "shop");
    assert_eq!(p["streams"], 2);
    assert_eq!(
        p["identities"],
        serde_json::json!([
            "spiffe://cluster.local/ns/shop/sa/inventory-service",
            "spiffe://cluster.local/ns/shop/sa/product-service"
        ])
    );
    assert!(p["earliest_leaf_expiry"].is_string(), "{p}");
    let d = &s["discovery"];
    assert_eq!(
        keys(d),
        ["coverage", "omitted_edges", "omitted_services", "services"]
    );
    let cov: Vec<(String, f64)> = d["coverage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["namespace"].as_str().unwrap().to_owned(),
                c["ratio"].as_f64().unwrap(),
            )
        })
        .collect();
    assert!(cov.contains(&("shop".into(), 1.0)), "{cov:?}");
    assert!(cov.contains(&("legacy".into(), 0.0)), "{cov:?}");
    // legacy-db: plaintext, with the reason; inventory-service: mTLS.
    let db = &service(&s, "legacy-db.legacy")["endpoints"][0];
    assert_eq!(
        keys(db),
        ["address", "link", "pod", "port", "reason", "sidecar", "workload"]
    );
    assert_eq!(db["link"], "plaintext");
    assert!(
        db["reason"].as_str().unwrap().contains("no sidecar"),
        "{db}"
    );
    let inv = service(&s, "inventory-service.shop");
    assert_eq!(inv["endpoints"][0]["link"], "mtls", "{}", inv["endpoints"]);
    let edge = inv["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["client"]
                .as_str()
                .unwrap()
                .starts_with("product-service-")
        })
        .unwrap();
    assert_eq!(keys(edge), ["client", "client_sidecar", "link", "reason"]);
    assert_eq!(edge["link"], "mtls");
    assert_eq!(edge["client_sidecar"], true);
    // A service's own pods are not listed as its clients.
    assert!(inv["clients"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| !c["client"]
            .as_str()
            .unwrap()
            .starts_with("inventory-service-")));
    server.running.shutdown().await;
}

/// The page is whole without JavaScript: real tables, every icon with its text, nothing from
/// elsewhere (CSP), and a prepared root shows on the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_complete_without_javascript() {
    let server = mixed_server().await;
    let resp = http_get(&server, "/ui").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let head = resp.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    let html = body(&resp);
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no CDN"
    );
    assert!(html.contains("<table>") && html.contains("<th scope=\"col\">"));
    // Every icon is hidden from assistive technology and followed by its text.
    assert_eq!(
        html.matches("<svg class=\"icon\"").count(),
        html.matches("aria-hidden=\"true\" focusable=\"false\">")
            .count()
    );
    assert!(html.contains("legacy-db.legacy"));
    let row = html
        .split("<tr data-endpoint=\"10.244.2.20:")
        .nth(1)
        .expect("legacy-db's endpoint row");
    let row = row.split("</tr>").next().unwrap();
    assert!(row.contains("plaintext</span>"), "{row}");
    assert!(row.contains("no sidecar"), "{row}");
    for asset in ["/ui/app.js", "/ui/app.css"] {
        assert!(
            http_get(&server, asset).await.starts_with("HTTP/1.1 200"),
            "{asset}"
        );
    }
    assert!(!html.contains("(prepared)"));
    let gauge = |m: &str, name: &str| -> i64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing:\n{m}"))
            .trim()
            .parse()
            .unwrap()
    };
    let before = http_get(&server, "/metrics").await;
    let expiry = gauge(&before, "meshid_root_cert_expiry_timestamp_seconds");
    assert_eq!(gauge(&before, "meshid_root_successor_prepared"), 0);
    prepare_generated(&DirStore::new(server.state_dir()));
    let mut seen = false;
    for _ in 0..100 {
        let s = status(&server).await;
        if s["roots"].as_array().unwrap().len() == 2 {
            assert_eq!(s["rotation"]["in_progress"], true);
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the prepared root reached /ui/status.json");
    // The alert's inputs: a successor now waits, and the root that signs is still the one whose
    // expiry counts (the successor's later notAfter does not hide it).
    let mut after = http_get(&server, "/metrics").await;
    for _ in 0..100 {
        if gauge(&after, "meshid_root_successor_prepared") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = http_get(&server, "/metrics").await;
    }
    assert_eq!(
        gauge(&after, "meshid_root_successor_prepared"),
        1,
        "{after}"
    );
    assert_eq!(
        gauge(&after, "meshid_root_cert_expiry_timestamp_seconds"),
        expiry
    );
    assert!(body(&http_get(&server, "/ui").await).contains("(prepared)"));
    server.running.shutdown().await;
}
