//! deploy/grafana and deploy/prometheus against a live server: every metric a dashboard panel
//! or an alert names is one the server exports (its `# TYPE` line on `/metrics`, present
//! whether or not the family has samples yet), and the dashboard is a well-formed Grafana
//! model (what an import needs). Prometheus's own parsers check the expressions in
//! tests/interop/prometheus (which also pins that every selector is a `meshid_` name, the
//! names this test reads).

use std::{collections::BTreeSet, sync::Arc};

use meshid::{
    clock::SystemClock,
    spiffe::TrustDomain,
    trust::{EndpointProfile, PeerConfig},
};
use serde_json::Value;

use crate::{server::http_get, server_support::TestServer, ui::MIXED};

fn repo(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The `meshid_…` identifiers of an expression (metric names: no function, label or keyword
/// of PromQL starts with `meshid_`; string literals are skipped).
fn names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_str = None;
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if let Some(q) = in_str {
            if c == b'\\' {
                i += 1;
            } else if c == q {
                in_str = None;
            }
            i += 1;
            continue;
        }
        if c == b'"' || c == b'\'' || c == b'`' {
            in_str = Some(c);
            i += 1;
            continue;
        }
        let boundary = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        if boundary && b[i..].starts_with(b"meshid_") {
            let end = expr[i..]
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_' || ch == ':'))
                .map_or(expr.len(), |e| i + e);
            out.push(expr[i..end].to_owned());
            i = end;
            continue;
        }
        i += 1;
    }
    out
}

/// `(family, type)` of every `# TYPE` line.
fn families(metrics: &str) -> BTreeSet<(String, String)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect()
}

/// Whether `name` (as PromQL writes it) is a series of an exported family.
fn exported(name: &str, fams: &BTreeSet<(String, String)>) -> bool {
    let has = |n: &str, t: &str| fams.contains(&(n.to_owned(), t.to_owned()));
    if let Some(base) = name.strip_suffix("_total") {
        if has(base, "counter") {
            return true;
        }
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if has(base, "histogram") {
                return true;
            }
        }
    }
    has(name, "gauge") || has(name, "unknown")
}

#[test]
fn names_are_read_from_expressions() {
    assert_eq!(
        names(
            r#"sum by (le) (rate(meshid_sds_push_latency_seconds_bucket{x="meshid_no"}[5m])) / meshid_a"#
        ),
        ["meshid_sds_push_latency_seconds_bucket", "meshid_a"]
    );
    assert!(names("sum(rate(xmeshid_b[1m]))").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_metric_is_exported() {
    // The mixed example (discovery on) and a federation peer (unreachable: its series exist
    // from the start at their "never fetched" values).
    let server = TestServer::start_with(Arc::new(SystemClock), |c| {
        c.discovery = Some(meshid::config::Discovery {
            snapshot: Some(MIXED.into()),
            ..Default::default()
        });
        c.federation.peers = vec![PeerConfig {
            trust_domain: TrustDomain::new("partner.example").unwrap(),
            url: "https://127.0.0.1:9/bundle".into(),
            profile: EndpointProfile::HttpsWeb,
            endpoint_spiffe_id: None,
            ca_file: None,
        }];
    })
    .await;
    // Some families appear with the server's first rounds (the identity probe sets
    // meshid_identity_backend_up): read /metrics until they have run, at most 10 s.
    let mut fams = BTreeSet::new();
    for _ in 0..200 {
        let resp = http_get(&server, "/metrics").await;
        fams = families(resp.split_once("\r\n\r\n").unwrap().1);
        // ... and discovery's first view of the snapshot (meshid_discovery_endpoints{tls_mode}).
        if exported("meshid_identity_backend_up", &fams)
            && exported("meshid_discovery_endpoints", &fams)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(fams.len() > 20, "{fams:?}");

    let dash: Value = serde_json::from_str(&repo("deploy/grafana/meshid.json")).unwrap();
    let mut exprs: Vec<(String, String)> = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push((
                format!("panel {:?}", p["title"]),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&repo("deploy/prometheus/meshid-rules.yaml")).unwrap();
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            exprs.push((
                format!("alert {:?}", r["alert"].as_str().unwrap()),
                r["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let mut missing = Vec::new();
    let mut seen = 0;
    for (whence, expr) in &exprs {
        let ns = names(expr);
        assert!(!ns.is_empty(), "{whence}: no metric in {expr:?}");
        for n in ns {
            seen += 1;
            if !exported(&n, &fams) {
                missing.push(format!("{whence}: {n}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not exported by the server:\n{}",
        missing.join("\n")
    );
    assert!(seen >= 30, "{seen} metric references");

    // Issue 25: every metric the README names is exported under that exact name (a counter
    // with its `_total`): the server's, and the agent's (`meshid_agent_…`) from a running agent.
    let agent_dir = tempfile::tempdir().unwrap();
    let cfg = crate::agent::agent_config(&server, agent_dir.path(), "product-service", false);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let agent = meshid::agent::start(cfg, Arc::new(SystemClock), stop_rx)
        .await
        .unwrap();
    let agent_fams = families(&agent.metrics.render());
    // Families whose label values come with traffic: a proxy's SDS stream gives the push
    // latency histogram its samples; the identity probe sets meshid_identity_backend_up.
    let _proxies = crate::ui::proxies(&server).await;
    for _ in 0..100 {
        let resp = http_get(&server, "/metrics").await;
        fams = families(resp.split_once("\r\n\r\n").unwrap().1);
        if exported("meshid_identity_backend_up", &fams)
            && exported("meshid_sds_push_latency_seconds_bucket", &fams)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A refused remote secret's labels (secret, cluster) exist only once one is refused:
    // automtls::multi_cluster::a_remote_secret_kubeconfig_runs_no_program_and_reads_no_file
    // reads that family from a live server.
    let only_with_traffic = ["meshid_discovery_remote_secret_refused_total"];
    let readme = repo("README.md");
    let mut missing = Vec::new();
    let mut seen = 0;
    for n in names(&readme.replace(['`', '"', '\''], " ")) {
        // `meshid_eds_*` stands for a family of names spelled out beside it.
        if n.ends_with('_') || only_with_traffic.contains(&n.as_str()) {
            continue;
        }
        seen += 1;
        let f = if n.starts_with("meshid_agent_") {
            &agent_fams
        } else {
            &fams
        };
        if !exported(&n, f) && !exported(&format!("{n}_bucket"), f) {
            missing.push(n);
        }
    }
    missing.dedup();
    assert!(
        missing.is_empty(),
        "the README names metrics not exported under that name: {missing:?}"
    );
    assert!(seen >= 30, "{seen} README metric references");
    let _ = stop.send(true);
    agent.join().await;
    server.running.shutdown().await;
}

/// What Grafana's import needs of the model: a Prometheus datasource input used by every
/// panel and target, unique panel ids, targets with refIds, panels that do not overlap.
#[test]
fn the_dashboard_is_a_well_formed_grafana_model() {
    let d: Value = serde_json::from_str(&repo("deploy/grafana/meshid.json")).unwrap();
    assert_eq!(d["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(d["__inputs"][0]["pluginId"], "prometheus");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(d["uid"]
        .as_str()
        .is_some_and(|u| !u.is_empty() && u.len() <= 40));
    assert!(d["title"].is_string());
    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in panels {
        let id = p["id"].as_u64().unwrap();
        assert!(ids.insert(id), "duplicate panel id {id}");
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        let typ = p["type"].as_str().unwrap();
        assert!(["row", "timeseries", "stat"].contains(&typ), "{typ}");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "{p}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "panel {id} overlaps another at {cx},{cy}"
                );
            }
        }
        if typ == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{p}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty());
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(refs.insert(t["refId"].as_str().unwrap().to_owned()));
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}");
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }
}

/// `meshid sds get` as `istioctl proxy-config secret` shows secrets: a table by default, one
/// JSON object per certificate with `--output json`, `ALL` written per trust domain, and a
/// closed pipe ending the output quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_get_prints_a_table_json_and_writes_all() {
    let server = TestServer::start(Arc::new(SystemClock)).await;
    let dir = tempfile::tempdir().unwrap();
    let (root, token, out) = (
        dir.path().join("root.pem"),
        dir.path().join("token"),
        dir.path().join("out"),
    );
    std::fs::write(&root, &server.root_pem).unwrap();
    std::fs::write(&token, server.token("shop", "product-service")).unwrap();
    let addr = format!("https://{}", server.running.grpc_addr);
    let base: Vec<String> = [
        "sds",
        "get",
        "--server",
        &addr,
        "--ca-file",
        root.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--name",
        "default",
        "--name",
        "ROOTCA",
        "--name",
        "ALL",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let b2 = base.clone();
    let run = move |extra: &[&str]| {
        let mut args = b2.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        std::process::Command::new(env!("CARGO_BIN_EXE_meshid"))
            .args(&args)
            .output()
            .unwrap()
    };
    let (table, json) = tokio::task::spawn_blocking({
        let out = out.clone();
        move || {
            let t = run(&[]);
            let j = run(&["--output", "json", "--out-dir", out.to_str().unwrap()]);
            (t, j)
        }
    })
    .await
    .unwrap();
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let table = String::from_utf8(table.stdout).unwrap();
    let header = table.lines().nth(1).unwrap();
    for col in [
        "RESOURCE NAME",
        "TYPE",
        "VALID CERT",
        "SERIAL NUMBER",
        "NOT AFTER",
        "NOT BEFORE",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let leaf = table.lines().find(|l| l.starts_with("default ")).unwrap();
    assert!(
        leaf.contains("Cert Chain") && leaf.contains("true"),
        "{leaf}"
    );
    assert!(
        leaf.contains("spiffe://cluster.local/ns/shop/sa/product-service"),
        "{leaf}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("ROOTCA ") && l.contains(" CA ")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("ALL ") && l.contains("cluster.local")),
        "{table}"
    );

    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    let rows = v["secrets"].as_array().unwrap();
    let leaf = rows.iter().find(|r| r["resource"] == "default").unwrap();
    assert_eq!(leaf["type"], "Cert Chain");
    assert_eq!(leaf["valid"], true);
    assert_eq!(leaf["trust_domain"], "cluster.local");
    assert_eq!(leaf["chain_length"], 1);
    assert!(leaf["serial"].as_str().unwrap().len() >= 16);
    let all = rows.iter().find(|r| r["resource"] == "ALL").unwrap();
    assert_eq!(all["type"], "CA");
    assert_eq!(all["trust_domain"], "cluster.local");
    // ALL as a readable file, per trust domain.
    let all_pem = std::fs::read_to_string(out.join("ALL-cluster.local.pem")).unwrap();
    assert_eq!(all_pem.trim(), server.root_pem.trim());
    assert!(out.join("ROOTCA.pem").exists() && out.join("cert-chain.pem").exists());

    // Into a closed pipe: no panic, exit 0.
    let status = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meshid"))
            .args(&base)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(status.status.success(), "{status:?}");
    assert!(!String::from_utf8_lossy(&status.stderr).contains("panicked"));
    server.running.shutdown().await;
}
