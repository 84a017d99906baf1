//! Istio `cacerts` acceptance: what istiod accepts, meshid accepts, and the other way round.
//! Fixtures are made by the openssl binary the way Istio's `tools/certs` make them
//! (`common.mk` root-ca.conf / intermediate.conf, `Makefile.selfsigned.mk`), and the rules
//! match istiod's `pilot/pkg/bootstrap/istio_ca.go` detectSigningCABundle and
//! `security/pkg/pki/util/keycertbundle.go` (Go's `x509.Certificate.Verify` path building).

use std::{path::Path, sync::Arc};

use meshid::{
    ca::{cert, chain, plugin, Authority, CaError, CertDer, ChainError, SigningMaterial},
    clock::SystemClock,
};
use time::OffsetDateTime;

use crate::support::*;

/// One CA made by openssl in `dir`: `<name>-key.pem`, `<name>-cert.pem`. `parent` signs it
/// (self-signed when `None`); `bc` is its basicConstraints value.
fn ca(dir: &Path, name: &str, subj: &str, parent: Option<&str>, bc: &str) {
    let ext = format!(
        "[ca]\nbasicConstraints = critical, {bc}\nkeyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n"
    );
    std::fs::write(dir.join(format!("{name}.cnf")), ext).unwrap();
    let (key, csr, out) = (
        format!("{name}-key.pem"),
        format!("{name}.csr"),
        format!("{name}-cert.pem"),
    );
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &key,
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-new",
            "-multivalue-rdn",
            "-key",
            &key,
            "-subj",
            subj,
            "-out",
            &csr,
        ],
        dir,
    );
    let cnf = format!("{name}.cnf");
    let mut args = vec![
        "x509",
        "-req",
        "-sha256",
        "-days",
        "365",
        "-in",
        &csr,
        "-extfile",
        &cnf,
        "-extensions",
        "ca",
        "-out",
        &out,
    ];
    let (pc, pk) = parent
        .map(|p| (format!("{p}-cert.pem"), format!("{p}-key.pem")))
        .unwrap_or_default();
    match parent {
        Some(_) => args.extend(["-CA", &pc, "-CAkey", &pk, "-CAcreateserial"]),
        None => args.extend(["-signkey", &key]),
    }
    openssl(&args, dir);
}

fn read(dir: &Path, f: &str) -> String {
    std::fs::read_to_string(dir.join(f)).unwrap()
}

fn der(dir: &Path, f: &str) -> CertDer {
    cert::certs_from_pem(read(dir, f).as_bytes(), f)
        .unwrap()
        .remove(0)
}

/// Writes an Istio `cacerts` directory from CAs made by [`ca`].
fn cacerts(dir: &Path, out: &Path, signer: &str, root: &str, chain: &[&str]) {
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(
        dir.join(format!("{signer}-cert.pem")),
        out.join("ca-cert.pem"),
    )
    .unwrap();
    std::fs::copy(
        dir.join(format!("{signer}-key.pem")),
        out.join("ca-key.pem"),
    )
    .unwrap();
    std::fs::copy(
        dir.join(format!("{root}-cert.pem")),
        out.join("root-cert.pem"),
    )
    .unwrap();
    let chain: String = chain
        .iter()
        .map(|c| read(dir, &format!("{c}-cert.pem")))
        .collect();
    std::fs::write(out.join("cert-chain.pem"), chain).unwrap();
}

fn authority(material: SigningMaterial) -> Result<Authority, CaError> {
    Authority::new(td(), material, Default::default(), Arc::new(SystemClock))
}

fn load(dir: &Path) -> Result<SigningMaterial, CaError> {
    plugin::load_plugin_dir(dir, OffsetDateTime::now_utc())
}

/// Issues a leaf and has openssl verify it (strict, client and server) against the roots.
fn issue_and_verify(ca: &Authority, dir: &Path) -> CertDer {
    let (issued, _) = ca
        .issue_with_new_key(&workload("shop", "inventory-service"), None)
        .unwrap();
    chain::verify_leaf(
        &issued.leaf,
        &issued.chain,
        &issued.roots,
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    std::fs::write(dir.join("leaf-chain.pem"), issued.chain_pem()).unwrap();
    std::fs::write(dir.join("leaf-roots.pem"), issued.roots_pem()).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let out = openssl(
            &[
                "verify",
                "-x509_strict",
                "-purpose",
                purpose,
                "-CAfile",
                "leaf-roots.pem",
                "-untrusted",
                "leaf-chain.pem",
                "leaf-chain.pem",
            ],
            dir,
        );
        assert!(out.trim_end().ends_with(": OK"), "{out}");
    }
    issued.leaf
}

/// AD CS names repeat `DC`; some CAs use multi-valued RDNs. rcgen rebuilt the issuer name from
/// a map keyed by attribute type (one `DC` lost) or refused the multi-valued RDN, so the old
/// code failed its self-validation ("issuer name is not the signing certificate's subject")
/// or could not load the signer at all. The leaf's issuer must be the CA's subject, byte for byte.
#[test]
fn repeated_attribute_types_and_multi_valued_rdns_are_kept_byte_for_byte() {
    for (name, subj) in [
        ("repeated DC", "/DC=example/DC=corp/CN=Corp Issuing CA"),
        (
            "multi-valued RDN",
            "/DC=example/DC=corp/O=Corp+OU=Mesh/CN=Corp Issuing CA",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ca(
            d,
            "root",
            "/DC=example/DC=corp/CN=Corp Root CA",
            None,
            "CA:true",
        );
        ca(d, "int", subj, Some("root"), "CA:true, pathlen:0");
        let plug = d.join("cacerts");
        cacerts(d, &plug, "int", "root", &["int", "root"]);
        let ca = authority(load(&plug).unwrap())
            .unwrap_or_else(|e| panic!("{name}: authority refused: {e}"));
        let leaf = issue_and_verify(&ca, d);
        let signer = der(d, "int-cert.pem");
        let (leaf_p, signer_p) = (
            cert::parse(&leaf, "leaf").unwrap(),
            cert::parse(&signer, "int").unwrap(),
        );
        assert_eq!(
            leaf_p.issuer().as_raw(),
            signer_p.subject().as_raw(),
            "{name}"
        );
        assert_eq!(
            leaf_p.issuer().to_string().matches("DC=").count(),
            2,
            "{name}: both DCs"
        );
    }
}

/// `Makefile.selfsigned.mk` `<cluster>-cacerts` with `common.mk`'s configs: RSA 4096 keys,
/// `O=Istio, CN=Root CA`, intermediate with `pathlen:0`, a DNS SAN and `L=<cluster>`;
/// cert-chain.pem = ca-cert.pem + root-cert.pem.
#[test]
fn istio_tools_certs_cacerts_import_and_issue() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let req = "[ req ]\nencrypt_key = no\nprompt = no\nutf8 = yes\ndefault_md = sha256\ndefault_bits = 4096\nreq_extensions = req_ext\nx509_extensions = req_ext\ndistinguished_name = req_dn\n";
    let root_conf = format!("{req}[ req_ext ]\nsubjectKeyIdentifier = hash\nbasicConstraints = critical, CA:true\nkeyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign\n[ req_dn ]\nO = Istio\nCN = Root CA\n");
    let int_conf = format!("{req}[ req_ext ]\nsubjectKeyIdentifier = hash\nbasicConstraints = critical, CA:true, pathlen:0\nkeyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign\nsubjectAltName=@san\n[ san ]\nDNS.1 = istiod.istio-system.svc\n[ req_dn ]\nO = Istio\nCN = Intermediate CA\nL = cluster1\n");
    std::fs::write(d.join("root-ca.conf"), root_conf).unwrap();
    std::fs::create_dir(d.join("cluster1")).unwrap();
    std::fs::write(d.join("cluster1/intermediate.conf"), int_conf).unwrap();
    for args in [
        &["genrsa", "-out", "root-key.pem", "4096"][..],
        &[
            "req",
            "-new",
            "-key",
            "root-key.pem",
            "-config",
            "root-ca.conf",
            "-out",
            "root-cert.csr",
        ],
        &[
            "x509",
            "-req",
            "-days",
            "3650",
            "-signkey",
            "root-key.pem",
            "-extensions",
            "req_ext",
            "-extfile",
            "root-ca.conf",
            "-in",
            "root-cert.csr",
            "-out",
            "root-cert.pem",
        ],
        &["genrsa", "-out", "cluster1/ca-key.pem", "4096"],
        &[
            "req",
            "-new",
            "-config",
            "cluster1/intermediate.conf",
            "-key",
            "cluster1/ca-key.pem",
            "-out",
            "cluster1/cluster-ca.csr",
        ],
        &[
            "x509",
            "-req",
            "-days",
            "730",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-extensions",
            "req_ext",
            "-extfile",
            "cluster1/intermediate.conf",
            "-in",
            "cluster1/cluster-ca.csr",
            "-out",
            "cluster1/ca-cert.pem",
        ],
    ] {
        openssl(args, d);
    }
    let c1 = d.join("cluster1");
    std::fs::copy(d.join("root-cert.pem"), c1.join("root-cert.pem")).unwrap();
    let chain = read(&c1, "ca-cert.pem") + &read(d, "root-cert.pem");
    std::fs::write(c1.join("cert-chain.pem"), chain).unwrap();
    let material = load(&c1).unwrap();
    assert!(
        material.intermediates.is_empty(),
        "root and signer are not intermediates"
    );
    let ca = authority(material).unwrap();
    issue_and_verify(&ca, d);
}

/// istiod's self-signed `istio-ca-secret` (and `istio-generated` cacerts): ca-cert.pem is the
/// root, root-cert.pem the same certificate, cert-chain.pem empty. The old code refused the
/// empty file ("no CERTIFICATE PEM block").
#[test]
fn istio_ca_secret_with_an_empty_cert_chain_imports() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "root", "/O=cluster.local", None, "CA:true");
    let plug = d.join("istio-ca-secret");
    cacerts(d, &plug, "root", "root", &[]);
    assert_eq!(read(&plug, "cert-chain.pem"), "");
    let material = load(&plug).unwrap();
    assert!(material.intermediates.is_empty());
    issue_and_verify(&authority(material).unwrap(), d);
}

/// cert-chain.pem in any order, with certificates not on the path: the path is built like
/// Go's verifier and the rest ignored. The old code kept the chain in file order, extras
/// included, and refused it ("chain is out of order").
#[test]
fn chain_in_any_order_with_unrelated_certificates_imports() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "root", "/O=Corp/CN=Root CA", None, "CA:true");
    ca(
        d,
        "mid",
        "/O=Corp/CN=Policy CA",
        Some("root"),
        "CA:true, pathlen:1",
    );
    ca(
        d,
        "int",
        "/O=Corp/CN=Issuing CA",
        Some("mid"),
        "CA:true, pathlen:0",
    );
    ca(d, "stranger", "/O=Other/CN=Unrelated CA", None, "CA:true");
    let plug = d.join("cacerts");
    cacerts(d, &plug, "int", "root", &["root", "stranger", "mid", "int"]);
    let material = load(&plug).unwrap();
    assert_eq!(material.intermediates, vec![der(d, "mid-cert.pem")]);
    issue_and_verify(&authority(material).unwrap(), d);
}

/// Path length constraints hold on the whole path, the root's included (Go's verifier checks
/// the root too). The old code checked none.
#[test]
fn path_length_constraints_are_enforced_on_the_whole_chain() {
    for (name, root_bc, mid_bc) in [
        (
            "root pathlen:0 over an intermediate chain",
            "CA:true, pathlen:0",
            "CA:true",
        ),
        (
            "intermediate pathlen:0 over another CA",
            "CA:true",
            "CA:true, pathlen:0",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ca(d, "root", "/O=Corp/CN=Root CA", None, root_bc);
        ca(d, "mid", "/O=Corp/CN=Policy CA", Some("root"), mid_bc);
        ca(
            d,
            "int",
            "/O=Corp/CN=Issuing CA",
            Some("mid"),
            "CA:true, pathlen:0",
        );
        let plug = d.join("cacerts");
        cacerts(d, &plug, "int", "root", &["int", "mid", "root"]);
        let err = load(&plug).expect_err(name);
        assert!(
            matches!(
                &err,
                CaError::PluginChainInvalid {
                    why: ChainError::PathLenExceeded { .. }
                }
            ),
            "{name}: {err}"
        );
    }
}

/// Both layouts present: `tls.crt`/`tls.key`/`ca.crt` win, as in istiod's
/// detectSigningCABundle. The old code took the `ca-cert.pem` set.
#[test]
fn tls_crt_takes_precedence_over_the_istio_layout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "root", "/O=Istio/CN=Root CA", None, "CA:true");
    ca(
        d,
        "istio",
        "/O=Istio/CN=Istio layout CA",
        Some("root"),
        "CA:true, pathlen:0",
    );
    ca(
        d,
        "tls",
        "/O=Istio/CN=cert-manager CA",
        Some("root"),
        "CA:true, pathlen:0",
    );
    let plug = d.join("both");
    cacerts(d, &plug, "istio", "root", &["istio", "root"]);
    std::fs::copy(d.join("tls-cert.pem"), plug.join("tls.crt")).unwrap();
    std::fs::copy(d.join("tls-key.pem"), plug.join("tls.key")).unwrap();
    std::fs::copy(d.join("root-cert.pem"), plug.join("ca.crt")).unwrap();
    let material = load(&plug).unwrap();
    assert_eq!(material.signer_cert, der(d, "tls-cert.pem"));
    // With tls.crt present, its set must be complete: no silent fall back to the other layout.
    std::fs::remove_file(plug.join("tls.key")).unwrap();
    let err = load(&plug).unwrap_err();
    assert!(
        matches!(&err, CaError::PluginIncomplete { missing, .. } if missing == &["tls.key"]),
        "{err}"
    );
}

/// A chain signed with RSASSA-PSS (SHA-256, MGF1-SHA-256, salt 32, as
/// `openssl x509 -sigopt rsa_padding_mode:pss` makes it) imports and issues; the old code
/// refused the PSS signature ("not accepted"). A signing key ring cannot sign with (RSA 2560)
/// is refused naming ring's limits.
#[test]
fn rsa_pss_chain_signatures_import_and_rsa_sizes_ring_cannot_sign_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("ca.cnf"),
        "[ca]\nbasicConstraints = critical, CA:true\nkeyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n",
    )
    .unwrap();
    for args in [
        &["genrsa", "-out", "root-key.pem", "2048"][..],
        &[
            "req",
            "-new",
            "-key",
            "root-key.pem",
            "-subj",
            "/O=Corp/CN=PSS Root",
            "-out",
            "root.csr",
        ],
        &[
            "x509",
            "-req",
            "-sha256",
            "-days",
            "365",
            "-in",
            "root.csr",
            "-signkey",
            "root-key.pem",
            "-extfile",
            "ca.cnf",
            "-extensions",
            "ca",
            "-out",
            "root-cert.pem",
        ],
        &["genrsa", "-out", "int-key.pem", "3072"],
        &[
            "req",
            "-new",
            "-key",
            "int-key.pem",
            "-subj",
            "/O=Corp/CN=PSS Issuing",
            "-out",
            "int.csr",
        ],
        &[
            "x509",
            "-req",
            "-sha256",
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:digest",
            "-days",
            "365",
            "-in",
            "int.csr",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-extfile",
            "ca.cnf",
            "-extensions",
            "ca",
            "-out",
            "int-cert.pem",
        ],
    ] {
        openssl(args, d);
    }
    let text = openssl(&["x509", "-in", "int-cert.pem", "-noout", "-text"], d);
    assert!(text.contains("rsassaPss"), "{text}");
    let plug = d.join("cacerts");
    cacerts(d, &plug, "int", "root", &["int", "root"]);
    let material = load(&plug).unwrap();
    assert_eq!(material.signer_key.key_type(), meshid::ca::KeyType::Rsa3072);
    issue_and_verify(&authority(material).unwrap(), d);

    openssl(&["genrsa", "-out", "odd-key.pem", "2560"], d);
    std::fs::copy(d.join("odd-key.pem"), plug.join("ca-key.pem")).unwrap();
    let err = load(&plug).unwrap_err().to_string();
    assert!(
        err.contains("2048, 3072 or 4096") && err.contains("ring"),
        "{err}"
    );
}

/// What ring cannot do is refused at import, saying so: a P-521 signing key, and an
/// ECDSA-with-SHA-512 signature on the chain.
#[test]
fn p521_keys_and_ecdsa_sha512_signatures_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("ca.cnf"),
        "[ca]\nbasicConstraints = critical, CA:true\nkeyUsage = critical, keyCertSign, cRLSign\n",
    )
    .unwrap();
    // P-521 signing key under a P-256 root.
    ca(d, "root", "/O=Corp/CN=Root CA", None, "CA:true");
    openssl(
        &[
            "ecparam",
            "-name",
            "secp521r1",
            "-genkey",
            "-noout",
            "-out",
            "p521-key.pem",
        ],
        d,
    );
    openssl(
        &[
            "req",
            "-new",
            "-key",
            "p521-key.pem",
            "-subj",
            "/CN=P-521 CA",
            "-out",
            "p521.csr",
        ],
        d,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-sha256",
            "-days",
            "30",
            "-in",
            "p521.csr",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-extfile",
            "ca.cnf",
            "-extensions",
            "ca",
            "-out",
            "p521-cert.pem",
        ],
        d,
    );
    let plug = d.join("p521");
    cacerts(d, &plug, "p521", "root", &[]);
    let err = load(&plug).unwrap_err().to_string();
    assert!(err.contains("P-521") && err.contains("ring"), "{err}");
    // An intermediate the root signed with ECDSA-SHA512.
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "s512-key.pem",
        ],
        d,
    );
    openssl(
        &[
            "req",
            "-new",
            "-key",
            "s512-key.pem",
            "-subj",
            "/CN=SHA-512 CA",
            "-out",
            "s512.csr",
        ],
        d,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-sha512",
            "-days",
            "30",
            "-in",
            "s512.csr",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-extfile",
            "ca.cnf",
            "-extensions",
            "ca",
            "-out",
            "s512-cert.pem",
        ],
        d,
    );
    let plug = d.join("s512");
    cacerts(d, &plug, "s512", "root", &[]);
    let err = load(&plug).unwrap_err().to_string();
    assert!(err.contains("SHA-512") && err.contains("ring"), "{err}");
}

// === ca-crl.pem, as istiod (`keycertbundle.go` Verify; `istio_ca.go` detectSigningCABundleAndCRL) ===

/// A CRL issued by CA `name` (made by [`ca`]) into `<name>-crl.pem`, revoking `revoke`'s
/// certificates (files `<r>-cert.pem`), made with `openssl ca -gencrl` as an operator would.
fn crl(dir: &Path, name: &str, revoke: &[&str]) {
    let cnf = format!("{name}-ca.cnf");
    std::fs::write(
        dir.join(&cnf),
        format!("[ca]\ndefault_ca = d\n[d]\ndatabase = {name}-index.txt\ndefault_md = sha256\ndefault_crl_days = 30\n"),
    )
    .unwrap();
    std::fs::write(dir.join(format!("{name}-index.txt")), "").unwrap();
    let (c, k) = (format!("{name}-cert.pem"), format!("{name}-key.pem"));
    for r in revoke {
        let rc = format!("{r}-cert.pem");
        openssl(
            &[
                "ca", "-config", &cnf, "-cert", &c, "-keyfile", &k, "-revoke", &rc,
            ],
            dir,
        );
    }
    let out = format!("{name}-crl.pem");
    openssl(
        &[
            "ca", "-config", &cnf, "-cert", &c, "-keyfile", &k, "-gencrl", "-out", &out,
        ],
        dir,
    );
}

/// root → intermediate (signer) with a `cacerts` dir in `dir/cacerts`, and CRLs of both.
fn crl_fixture(dir: &Path) -> std::path::PathBuf {
    ca(dir, "root", "/O=Istio/CN=Root CA", None, "CA:true");
    ca(
        dir,
        "int",
        "/O=Istio/CN=Intermediate CA",
        Some("root"),
        "CA:true, pathlen:0",
    );
    ca(dir, "other", "/O=Elsewhere/CN=Other CA", None, "CA:true");
    ca(
        dir,
        "sib",
        "/O=Istio/CN=Sibling CA",
        Some("root"),
        "CA:true",
    );
    let out = dir.join("cacerts");
    cacerts(dir, &out, "int", "root", &["int", "root"]);
    out
}

fn written(state: &Path) -> usize {
    std::fs::read_dir(state).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn ca_crl_pem_from_openssl_is_imported_into_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = crl_fixture(dir.path());
    // The root revokes a sibling CA (not on our path): accepted, as istiod accepts it.
    crl(dir.path(), "root", &["sib"]);
    crl(dir.path(), "int", &[]);
    let pem = read(dir.path(), "int-crl.pem") + &read(dir.path(), "root-crl.pem");
    std::fs::write(plugin.join("ca-crl.pem"), &pem).unwrap();
    let state = dir.path().join("state");
    let o = import_plugin(&plugin, &state);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc: String = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect();
    assert_eq!(doc.matches("BEGIN X509 CRL").count(), 2, "{doc}");
}

#[test]
fn ca_crl_pem_refusals_name_the_file_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = crl_fixture(dir.path());
    crl(dir.path(), "int", &[]);
    crl(dir.path(), "other", &[]);
    let int_crl = read(dir.path(), "int-crl.pem");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unparseable",
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n".into(),
            "does not parse",
        ),
        (
            "wrong signer",
            int_crl.clone() + &read(dir.path(), "other-crl.pem"),
            "not signed by a CA certificate",
        ),
        // Envoy (only_verify_leaf_cert_crl false) needs the root's CRL too; istiod's Verify
        // refuses the same file ("missing CRL signed by certificates").
        ("root's CRL missing", int_crl.clone(), "no CRL from"),
    ];
    for (case, pem, why) in cases {
        std::fs::write(plugin.join("ca-crl.pem"), pem).unwrap();
        let state = dir.path().join(format!("state-{}", case.replace(' ', "-")));
        let o = import_plugin(&plugin, &state);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{case}: accepted");
        assert!(
            err.contains("ca-crl.pem") && err.contains(why),
            "{case}: {err}"
        );
        assert_eq!(written(&state), 0, "{case}: something was written");
    }
    // The root revokes our own signing intermediate: every leaf would be refused by peers.
    crl(dir.path(), "root", &["int"]);
    std::fs::write(
        plugin.join("ca-crl.pem"),
        int_crl.clone() + &read(dir.path(), "root-crl.pem"),
    )
    .unwrap();
    let state = dir.path().join("state-revoked");
    let o = import_plugin(&plugin, &state);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("revokes"), "{err}");
    assert_eq!(written(&state), 0);
}

#[test]
fn an_expired_ca_crl_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = crl_fixture(dir.path());
    crl(dir.path(), "root", &[]);
    crl(dir.path(), "int", &[]);
    let pem = read(dir.path(), "int-crl.pem") + &read(dir.path(), "root-crl.pem");
    let m = load(&plugin).unwrap();
    let now = OffsetDateTime::now_utc();
    meshid::ca::crl::check_crls(pem.as_bytes(), "ca-crl.pem", &m, now).unwrap();
    // default_crl_days = 30: past nextUpdate 31 days on.
    let later = now + time::Duration::days(31);
    let err = meshid::ca::crl::check_crls(pem.as_bytes(), "ca-crl.pem", &m, later)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ca-crl.pem") && err.contains("nextUpdate"),
        "{err}"
    );
}
