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

/// Runs meshid with its stdout a pipe whose reader is already gone (`meshid … | head -0`).
fn into_closed_pipe(args: &[&str]) -> std::process::Output {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meshid"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader closes before the first byte is written
    child.wait_with_output().unwrap()
}

/// Issue 24/25: output into a closed pipe (`| head -1`, `| grep -q`) ends the command quietly
/// with status 0 (as ripgrep does), for every kind of output: reports, JSON, long scripts.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    ok(&init_ca(&state));
    let s = state.to_str().unwrap();
    let snapshot = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/mixed-traffic.yaml"
    );
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/meshid.toml");
    for args in [
        vec!["root", "status", "--state-dir", s],
        vec!["root", "status", "--state-dir", s, "--output", "json"],
        vec!["bundle", "export", "--state-dir", s],
        vec![
            "describe",
            "service",
            "inventory-service.shop",
            "--snapshot",
            snapshot,
        ],
        vec!["completions", "zsh"],
        vec!["config", "check", config],
        vec!["--help"],
    ] {
        let out = into_closed_pipe(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
    }
}

/// Issue 25: `meshid completions bash|zsh|fish` prints a script each shell accepts.
#[test]
fn completions_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&meshid(&["completions", shell]));
        assert!(script.contains("meshid"), "{shell}");
        for sub in ["root", "rotate", "describe", "state-dir"] {
            assert!(script.contains(sub), "{shell} completes {sub}");
        }
    }
    let script = ok(&meshid(&["completions", "bash"]));
    let check = std::process::Command::new("bash")
        .args(["-n", "-c", &script])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    fails_with(&meshid(&["completions", "tcsh"]), "invalid value 'tcsh'");
}

/// Issue 25: `meshid config check FILE` validates without starting anything: the effective
/// values (defaults filled in), what the server needs at start, exit 0; a bad key exits 1
/// naming it; `--strict` fails on what is not there; `--clusters-from-flags` accepts a file
/// that leaves `[[clusters]]` to `meshid server`'s flags (the README's federation configs).
#[test]
fn config_check_validates_and_prints_what_the_server_would_need() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/meshid.toml");
    let out = ok(&meshid(&["config", "check", deploy]));
    assert!(out.contains(": valid"), "{out}");
    assert!(
        out.contains("max_ttl = \"1d\"") && out.contains("[limits]"),
        "defaults filled in: {out}"
    );
    assert!(out.contains("CA state"), "{out}");
    let j: serde_json::Value = serde_json::from_str(&ok(&meshid(&[
        "config", "check", deploy, "--output", "json",
    ])))
    .unwrap();
    assert_eq!(j["valid"], true);
    assert!(j["effective"]["listen"]["grpc"].is_string());
    assert!(j["needs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["what"] == "CA state"));

    // A state directory that exists: found; --strict passes only when everything is.
    let state = dir.path().join("state");
    ok(&init_ca(&state));
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "state_dir = \"{}\"\n[[clusters]]\nname = \"Kubernetes\"\n[clusters.jwks]\nissuer = \"https://kubernetes.default.svc.cluster.local\"\nfile = \"{}\"\n",
            state.display(),
            dir.path().join("jwks.json").display()
        ),
    )
    .unwrap();
    let out = ok(&meshid(&["config", "check", good.to_str().unwrap()]));
    assert!(out.contains("found     CA state"), "{out}");
    assert!(
        out.contains("NOT FOUND cluster Kubernetes tokens: JWKS file"),
        "{out}"
    );
    let strict = meshid(&["config", "check", "--strict", good.to_str().unwrap()]);
    assert_eq!(strict.status.code(), Some(1));
    std::fs::write(dir.path().join("jwks.json"), "{\"keys\":[]}").unwrap();
    ok(&meshid(&[
        "config",
        "check",
        "--strict",
        good.to_str().unwrap(),
    ]));

    // A typo and an out-of-range value: exit 1, each named.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "state_dir = \"/x\"\nstate_pol_interval = \"1s\"\n").unwrap();
    fails_with(
        &meshid(&["config", "check", bad.to_str().unwrap()]),
        "state_pol_interval",
    );
    std::fs::write(
        &bad,
        format!(
            "{}\n[issuance]\nmax_ttl = \"90d\"\n",
            std::fs::read_to_string(&good).unwrap()
        ),
    )
    .unwrap();
    fails_with(
        &meshid(&["config", "check", bad.to_str().unwrap()]),
        "issuance.max_ttl",
    );

    // No [[clusters]]: invalid for the server on its own, valid when flags bring them.
    let flags = dir.path().join("a.toml");
    std::fs::write(&flags, format!("state_dir = \"{}\"\n", state.display())).unwrap();
    fails_with(
        &meshid(&["config", "check", flags.to_str().unwrap()]),
        "at least one cluster",
    );
    let out = ok(&meshid(&[
        "config",
        "check",
        "--clusters-from-flags",
        flags.to_str().unwrap(),
    ]));
    assert!(out.contains("from meshid server's flags"), "{out}");
}

/// Issue 25: the documented exit codes: 0 done, 1 failed or refused, 2 a usage error.
#[test]
fn exit_codes_are_the_documented_ones() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    assert_eq!(init_ca(&state).status.code(), Some(0));
    assert_eq!(
        init_ca(&state).status.code(),
        Some(1),
        "refused: the state exists"
    );
    assert_eq!(
        meshid(&["root", "status"]).status.code(),
        Some(2),
        "usage: no --state-dir"
    );
    assert_eq!(meshid(&["no-such-command"]).status.code(), Some(2));
    let s = state.to_str().unwrap();
    assert_eq!(
        meshid(&["root", "taint", "nope", "--state-dir", s])
            .status
            .code(),
        Some(1)
    );
}
