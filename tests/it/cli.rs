//! The README walkthrough through the real binary: init, issue, inspect, and the refusals an
//! operator meets first.

use std::os::unix::fs::PermissionsExt;

use crate::support::*;

#[test]
fn walkthrough() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("out");
    let (s, o) = (state.to_str().unwrap(), out.to_str().unwrap());
    ok(&meshid(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--state-dir",
        s,
    ]));
    let before = std::fs::read(state.join("state.json")).unwrap();
    fails_with(
        &meshid(&[
            "ca",
            "init",
            "--trust-domain",
            "cluster.local",
            "--state-dir",
            s,
        ]),
        "already exists",
    );
    assert_eq!(
        std::fs::read(state.join("state.json")).unwrap(),
        before,
        "state untouched"
    );

    let id = "spiffe://cluster.local/ns/shop/sa/product-service";
    ok(&meshid(&[
        "cert",
        "issue",
        "--state-dir",
        s,
        "--spiffe-id",
        id,
        "--ttl",
        "2h",
        "--out-dir",
        o,
    ]));
    assert_eq!(
        files_in(&out),
        ["cert-chain.pem", "key.pem", "root-cert.pem"]
    );
    assert_eq!(
        std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let chain = out.join("cert-chain.pem");
    let root = out.join("root-cert.pem");
    let json = ok(&meshid(&[
        "cert",
        "inspect",
        chain.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--output",
        "json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let c = &v["certificates"][0];
    assert_eq!(c["spiffe_id"], id);
    assert_eq!(c["is_ca"], false);
    assert_eq!(c["key_type"], "ecdsa-p256");
    assert_eq!(c["serial"].as_str().unwrap().len(), 32);
    assert_eq!(c["subject"], "");
    for field in ["not_before", "not_after"] {
        let t = c[field].as_str().unwrap();
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap();
    }
    assert_eq!(v["verification"]["verified"], true);
    assert!(v["verification"]["error"].is_null());

    let text = ok(&meshid(&[
        "cert",
        "inspect",
        chain.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
    ]));
    assert!(
        text.contains(&format!("spiffe id:  {id}")) && text.contains("chain: verifies"),
        "{text}"
    );

    // Against another CA's root: reported, and exit code 1.
    let other = dir.path().join("other");
    ok(&meshid(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--state-dir",
        other.to_str().unwrap(),
    ]));
    let other_out = dir.path().join("other-out");
    ok(&meshid(&[
        "cert",
        "issue",
        "--state-dir",
        other.to_str().unwrap(),
        "--spiffe-id",
        id,
        "--out-dir",
        other_out.to_str().unwrap(),
    ]));
    let o2 = meshid(&[
        "cert",
        "inspect",
        chain.to_str().unwrap(),
        "--root",
        other_out.join("root-cert.pem").to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(o2.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o2.stdout).unwrap();
    assert_eq!(v["verification"]["verified"], false);
    assert!(v["verification"]["error"]
        .as_str()
        .unwrap()
        .contains("does not verify"));
}

#[test]
fn operator_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let s = state.to_str().unwrap();
    let o = dir.path().join("out");
    let o = o.to_str().unwrap();
    fails_with(
        &meshid(&[
            "cert",
            "issue",
            "--state-dir",
            s,
            "--spiffe-id",
            "spiffe://cluster.local/ns/a/sa/b",
            "--out-dir",
            o,
        ]),
        "no CA state",
    );
    fails_with(
        &meshid(&[
            "ca",
            "init",
            "--trust-domain",
            "Cluster.Local",
            "--state-dir",
            s,
        ]),
        "trust domain must be lowercase",
    );
    fails_with(
        &meshid(&[
            "ca",
            "init",
            "--trust-domain",
            "cluster.local",
            "--state-dir",
            s,
            "--key-type",
            "rsa-2048",
        ]),
        "cannot be generated",
    );
    assert!(!state.join("state.json").exists());
    ok(&meshid(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--state-dir",
        s,
    ]));
    fails_with(
        &meshid(&[
            "cert",
            "issue",
            "--state-dir",
            s,
            "--spiffe-id",
            "spiffe://cluster.local/ns/a/sa/b",
            "--ttl",
            "48h",
            "--out-dir",
            o,
        ]),
        "above the maximum of 1d",
    );
    fails_with(
        &meshid(&[
            "cert",
            "issue",
            "--state-dir",
            s,
            "--spiffe-id",
            "spiffe://cluster.local/ns/a/../b",
            "--out-dir",
            o,
        ]),
        "\".\" or \"..\"",
    );
    fails_with(
        &meshid(&[
            "cert",
            "issue",
            "--state-dir",
            s,
            "--spiffe-id",
            "spiffe://other.org/ns/a/sa/b",
            "--out-dir",
            o,
        ]),
        "not in this authority's trust domain",
    );
    fails_with(
        &meshid(&[
            "cert",
            "issue",
            "--state-dir",
            s,
            "--spiffe-id",
            "spiffe://cluster.local/ns/a/sa/b",
            "--ttl",
            "1w",
            "--out-dir",
            o,
        ]),
        "unknown unit",
    );
    assert!(files_in(std::path::Path::new(o)).is_empty());
}

#[test]
fn help_reads_well() {
    let top = ok(&meshid(&["--help"]));
    assert!(top.contains("ca") && top.contains("cert"));
    for cmd in [
        &["ca", "init", "--help"][..],
        &["ca", "intermediate", "--help"],
        &["cert", "issue", "--help"],
        &["cert", "inspect", "--help"],
    ] {
        let h = ok(&meshid(cmd));
        assert!(h.contains("Usage: meshid"), "{h}");
    }
}

#[test]
fn server_config_errors_are_reported_at_start_up_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("meshid.toml");
    std::fs::write(
        &cfg,
        "state_dir = \"/nonexistent\"\n[issuance]\ndefault_ttl = \"48h\"\nmax_ttl = \"24h\"\n[rotation]\nratio = 0.99\n",
    )
    .unwrap();
    let o = meshid(&["server", "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    for key in ["issuance:", "rotation:", "clusters:"] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
    std::fs::write(&cfg, "state_dir = \"/x\"\nlisten_grpc = \"1.2.3.4:5\"\n").unwrap();
    let o = meshid(&["server", "--config", cfg.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("listen_grpc"),
        "unknown key named"
    );
}
