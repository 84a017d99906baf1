//! Plug-in CA import: meshid's own cacerts output, an openssl-made RSA/EC hierarchy, and the
//! refusal matrix (incomplete, mismatched key, chain not verifying, not a CA) with nothing written.

use std::path::Path;

use meshid::ca::{plugin, CaError};
use time::OffsetDateTime;

use crate::support::*;

const EXT: &str = "[v3_ca]
basicConstraints=critical,CA:true,pathlen:0
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid:always
subjectAltName=URI:spiffe://cluster.local
[leaf]
basicConstraints=critical,CA:false
keyUsage=critical,digitalSignature
";

/// An Istio-style plug-in hierarchy made by openssl: RSA root (PKCS#1 key), EC intermediate (SEC1 key).
pub fn openssl_cacerts(dir: &Path) {
    std::fs::write(dir.join("ext.cnf"), EXT).unwrap();
    for args in [
        &["genrsa", "-traditional", "-out", "root-key.pem", "2048"][..],
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root-key.pem",
            "-sha256",
            "-days",
            "3650",
            "-subj",
            "/O=Istio/CN=Root CA",
            "-addext",
            "basicConstraints=critical,CA:true",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "root-cert.pem",
        ],
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ca-key.pem",
        ],
        &[
            "req",
            "-new",
            "-key",
            "ca-key.pem",
            "-subj",
            "/O=Istio/CN=Intermediate CA",
            "-out",
            "ca.csr",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-days",
            "730",
            "-sha256",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "v3_ca",
            "-out",
            "ca-cert.pem",
        ],
    ] {
        openssl(args, dir);
    }
    let chain = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap()
        + &std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), chain).unwrap();
    for f in ["ext.cnf", "ca.csr", "root-key.pem", "root-cert.srl"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

#[test]
fn openssl_made_hierarchy_imports_and_issues() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("cacerts");
    std::fs::create_dir(&plugin).unwrap();
    openssl_cacerts(&plugin);
    assert!(
        std::fs::read_to_string(plugin.join("ca-key.pem"))
            .unwrap()
            .contains("EC PRIVATE KEY"),
        "SEC1 key"
    );
    let state = dir.path().join("state");
    let o = import_plugin(&plugin, &state);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("out");
    let o = meshid(&[
        "cert",
        "issue",
        "--state-dir",
        state.to_str().unwrap(),
        "--spiffe-id",
        "spiffe://cluster.local/ns/shop/sa/inventory-service",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The chain is leaf, intermediate; the root comes from root-cert.pem.
    let chain = meshid::ca::cert::certs_from_pem(
        &std::fs::read(out.join("cert-chain.pem")).unwrap(),
        "chain",
    )
    .unwrap();
    assert_eq!(chain.len(), 2);
    for purpose in ["sslclient", "sslserver"] {
        openssl(
            &[
                "verify",
                "-x509_strict",
                "-purpose",
                purpose,
                "-CAfile",
                "root-cert.pem",
                "-untrusted",
                "cert-chain.pem",
                "cert-chain.pem",
            ],
            &out,
        );
    }
}

#[test]
fn meshid_intermediate_round_trips_as_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let (root_state, east) = (dir.path().join("root"), dir.path().join("east-cacerts"));
    assert!(meshid(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--state-dir",
        root_state.to_str().unwrap()
    ])
    .status
    .success());
    let o = meshid(&[
        "ca",
        "intermediate",
        "--state-dir",
        root_state.to_str().unwrap(),
        "--cluster",
        "east",
        "--out-dir",
        east.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        files_in(&east),
        [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem"
        ]
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(east.join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    openssl(
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            "root-cert.pem",
            "ca-cert.pem",
        ],
        &east,
    );
    let east_state = dir.path().join("east-state");
    let o = import_plugin(&east, &east_state);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A cluster holding only an intermediate cannot mint more intermediates.
    let o = meshid(&[
        "ca",
        "intermediate",
        "--state-dir",
        east_state.to_str().unwrap(),
        "--cluster",
        "west",
        "--out-dir",
        dir.path().join("w").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("without its key"));
}

/// Each row breaks one thing in a good cacerts directory; the import is refused with its own
/// error kind, and `ca init` writes no state.
#[test]
fn refusal_matrix() {
    type Break = fn(&Path);
    type Expect = fn(&CaError) -> bool;
    let rows: &[(&str, Break, Expect)] = &[
        (
            "incomplete set",
            |d| std::fs::remove_file(d.join("cert-chain.pem")).unwrap(),
            |e| matches!(e, CaError::PluginIncomplete { missing, .. } if missing == &["cert-chain.pem"]),
        ),
        (
            "mismatched key",
            |d| {
                let other = tempfile::tempdir().unwrap();
                openssl(
                    &[
                        "ecparam",
                        "-name",
                        "prime256v1",
                        "-genkey",
                        "-noout",
                        "-out",
                        "k.pem",
                    ],
                    other.path(),
                );
                std::fs::copy(other.path().join("k.pem"), d.join("ca-key.pem")).unwrap();
            },
            |e| matches!(e, CaError::PluginKeyMismatch { .. }),
        ),
        (
            "chain does not verify to the root",
            |d| {
                let other = tempfile::tempdir().unwrap();
                openssl_cacerts(other.path());
                std::fs::copy(other.path().join("root-cert.pem"), d.join("root-cert.pem")).unwrap();
            },
            |e| matches!(e, CaError::PluginChainInvalid { .. }),
        ),
        (
            "signing cert is not a CA",
            |d| {
                // A leaf certificate signed by the intermediate, with its key, in place of ca-cert/ca-key.
                std::fs::write(d.join("ext.cnf"), EXT).unwrap();
                openssl(
                    &[
                        "ecparam",
                        "-name",
                        "prime256v1",
                        "-genkey",
                        "-noout",
                        "-out",
                        "leaf-key.pem",
                    ],
                    d,
                );
                openssl(
                    &[
                        "req",
                        "-new",
                        "-key",
                        "leaf-key.pem",
                        "-subj",
                        "/CN=leaf",
                        "-out",
                        "leaf.csr",
                    ],
                    d,
                );
                openssl(
                    &[
                        "x509",
                        "-req",
                        "-in",
                        "leaf.csr",
                        "-CA",
                        "ca-cert.pem",
                        "-CAkey",
                        "ca-key.pem",
                        "-CAcreateserial",
                        "-days",
                        "30",
                        "-extfile",
                        "ext.cnf",
                        "-extensions",
                        "leaf",
                        "-out",
                        "leaf.pem",
                    ],
                    d,
                );
                std::fs::rename(d.join("leaf.pem"), d.join("ca-cert.pem")).unwrap();
                std::fs::rename(d.join("leaf-key.pem"), d.join("ca-key.pem")).unwrap();
            },
            |e| matches!(e, CaError::PluginNotCa { .. }),
        ),
    ];
    for (name, break_it, is_expected) in rows {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("cacerts");
        std::fs::create_dir(&plugin).unwrap();
        openssl_cacerts(&plugin);
        plugin::load_plugin_dir(&plugin, OffsetDateTime::now_utc())
            .unwrap_or_else(|e| panic!("{name}: good dir refused: {e}"));
        break_it(&plugin);
        let err = plugin::load_plugin_dir(&plugin, OffsetDateTime::now_utc()).expect_err(name);
        assert!(is_expected(&err), "{name}: wrong error kind: {err:?}");
        let state = dir.path().join("state");
        let o = import_plugin(&plugin, &state);
        assert!(!o.status.success(), "{name}: CLI accepted it");
        assert_eq!(
            String::from_utf8_lossy(&o.stderr).trim(),
            format!("error: {err}"),
            "{name}"
        );
        assert!(!state.join("state.json").exists(), "{name}: state written");
    }
}

#[test]
fn empty_directory_names_both_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let err = plugin::load_plugin_dir(dir.path(), OffsetDateTime::now_utc()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("ca-cert.pem") && msg.contains("tls.crt"),
        "{msg}"
    );
}
