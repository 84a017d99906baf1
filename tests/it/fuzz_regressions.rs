//! The fuzz targets' inputs replayed in `cargo test` (issue 24): every seed (`fuzz/seeds/<target>/`)
//! and every input a fuzzer once crashed on (`fuzz/regressions/<target>/`, kept after the fix)
//! runs through the same `meshid::fuzzing` function the libFuzzer target calls, which must not
//! panic. `tools/fuzz.sh` runs the targets themselves.

use std::path::{Path, PathBuf};

use meshid::fuzzing::TARGETS;

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target)
}

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir(kind, target))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".keep"));
    v.sort();
    v
}

#[test]
fn every_target_has_a_libfuzzer_binary_and_seeds() {
    for (name, _) in TARGETS {
        let bin =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fuzz/fuzz_targets/{name}.rs"));
        assert!(bin.is_file(), "{} is missing", bin.display());
        assert!(
            !inputs("seeds", name).is_empty(),
            "no seeds in fuzz/seeds/{name}/"
        );
    }
}

#[test]
fn seeds_and_kept_crashes_replay_without_a_panic() {
    let mut ran = 0;
    for (name, f) in TARGETS {
        for path in inputs("seeds", name)
            .into_iter()
            .chain(inputs("regressions", name))
        {
            let data = std::fs::read(&path).unwrap();
            let r = std::panic::catch_unwind(|| f(&data));
            assert!(r.is_ok(), "fuzz target {name} panics on {}", path.display());
            ran += 1;
        }
    }
    assert!(ran >= TARGETS.len(), "{ran} inputs");
}

/// Writes the seed corpus (`cargo test --test it -- --ignored write_fuzz_seeds`): real inputs
/// of every kind, made with meshid's own CLI and libraries, for the fuzzers to mutate.
#[test]
#[ignore = "writes fuzz/seeds/; run by hand when a target is added"]
fn write_fuzz_seeds() {
    use meshid::api::istio::IstioCertificateRequest;
    use prost::Message;

    use crate::support::{csr, init_ca, meshid, ok, p256};
    let put = |target: &str, name: &str, data: &[u8]| {
        let d = dir("seeds", target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), data).unwrap();
    };
    let frame = |parts: &[Vec<u8>]| -> Vec<u8> {
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            if i + 1 < parts.len() {
                out.extend_from_slice(&(p.len() as u16).to_le_bytes());
            }
            out.extend_from_slice(p);
        }
        out
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_str().unwrap().to_owned();
    ok(&init_ca(&tmp.path().join("ca")));

    // csr
    let id = "spiffe://cluster.local/ns/shop/sa/product-service";
    let key = p256();
    put("csr", "p256-own-san.pem", csr(&key, &[id]).as_bytes());
    put("csr", "p256-no-san.pem", csr(&key, &[]).as_bytes());
    put(
        "csr",
        "p256-foreign-dns.pem",
        csr(&key, &["spiffe://other.example/x", "a.example"]).as_bytes(),
    );
    let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256);
    if let Ok(rsa) = rsa {
        put("csr", "rsa.pem", csr(&rsa, &[id]).as_bytes());
    }
    // jwt
    ok(&meshid(&["dev", "issuer", "init", "--dir", &t("issuer")]));
    let token = ok(&meshid(&[
        "dev",
        "token",
        "--issuer-dir",
        &t("issuer"),
        "--namespace",
        "shop",
        "--service-account",
        "product-service",
        "--pod-name",
        "p-0",
        "--pod-uid",
        "6f1c2a30-0000-4000-8000-000000000001",
    ]));
    put("jwt", "projected.jwt", token.trim().as_bytes());
    put(
        "jwt",
        "legacy-shape.jwt",
        b"eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJpc3MiOiJrdWJlcm5ldGVzL3NlcnZpY2VhY2NvdW50In0.c2ln",
    );
    // xds: SotW and Delta requests, alternating
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    let secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    let sotw = |names: &[&str], nonce: &str, version: &str| {
        DiscoveryRequest {
            type_url: secret.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            version_info: version.into(),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let delta = |sub: &[&str], unsub: &[&str], nonce: &str| {
        DeltaDiscoveryRequest {
            type_url: secret.into(),
            resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
        .encode_to_vec()
    };
    put(
        "xds",
        "subscribe-ack-resubscribe",
        &frame(&[
            sotw(&["rootca", "default", "x"], "", ""),
            delta(&["rootca", "zz"], &[], ""),
            sotw(&["rootca", "default"], "1", "v0"),
            delta(&["ra"], &["rootca"], "1"),
            sotw(&[], "2", "v1"),
            delta(&[], &["ra"], "2"),
        ]),
    );
    // istio_csr
    let mut meta = prost_types::Struct::default();
    meta.fields.insert(
        "ImpersonatedIdentity".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(id.into())),
        },
    );
    put(
        "istio_csr",
        "impersonated.pb",
        &IstioCertificateRequest {
            csr: csr(&key, &[id]),
            validity_duration: 86_400,
            metadata: Some(meta),
        }
        .encode_to_vec(),
    );
    put(
        "istio_csr",
        "plain.pb",
        &IstioCertificateRequest {
            csr: csr(&key, &[]),
            validity_duration: 3600,
            metadata: None,
        }
        .encode_to_vec(),
    );
    // spiffe_bundle
    let bundle = ok(&meshid(&["bundle", "export", "--state-dir", &t("ca")]));
    put("spiffe_bundle", "meshid.json", bundle.as_bytes());
    // spiffe_id
    for (n, s) in [
        ("sa", id),
        ("td", "spiffe://cluster.local"),
        ("path", "spiffe://example.org/a/b/c"),
        ("bad", "spiffe://Example.org//x/../y?q#f"),
    ] {
        put("spiffe_id", n, s.as_bytes());
    }
    // plugin_ca: an intermediate's files as one PEM text (signer, chain, root, key)
    ok(&meshid(&[
        "ca",
        "intermediate",
        "--state-dir",
        &t("ca"),
        "--cluster",
        "east",
        "--out-dir",
        &t("east"),
    ]));
    let read = |f: &str| std::fs::read(tmp.path().join("east").join(f)).unwrap();
    let mut pem = read("ca-cert.pem");
    pem.extend(read("cert-chain.pem"));
    pem.extend(read("root-cert.pem"));
    pem.extend(read("ca-key.pem"));
    put("plugin_ca", "intermediate.pem", &pem);
    // snapshot
    for ex in
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples")).unwrap()
    {
        let p = ex.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            put(
                "snapshot",
                p.file_name().unwrap().to_str().unwrap(),
                &std::fs::read(&p).unwrap(),
            );
        }
    }
    // kubeconfig
    put(
        "kubeconfig",
        "exec.yaml",
        br#"apiVersion: v1
kind: Config
clusters:
- name: remote
  cluster:
    server: https://10.0.0.1:6443
    certificate-authority-data: AAAA
users:
- name: u
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1
      command: /bin/sh
    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
contexts:
- name: c
  context: {cluster: remote, user: u}
current-context: c
"#,
    );
    put(
        "kubeconfig",
        "token.yaml",
        b"apiVersion: v1\nkind: Config\nclusters:\n- name: r\n  cluster: {server: 'https://r:6443', insecure-skip-tls-verify: true}\nusers:\n- name: u\n  user: {token: abc}\ncontexts:\n- name: c\n  context: {cluster: r, user: u}\ncurrent-context: c\n",
    );
    // state_doc: the stored document, and the state inside it
    let doc = std::fs::read(tmp.path().join("ca/state.json")).unwrap();
    put("state_doc", "state.json", &doc);
    let v: serde_json::Value = serde_json::from_slice(&doc).unwrap();
    put("state_doc", "inner.json", v["state"].to_string().as_bytes());
    // h2_authority: a client preface, SETTINGS, and a HEADERS frame with grpc C-core's
    // percent-encoded :authority, then a DATA frame
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let mut enc = loona_hpack::Encoder::new();
    let block = enc.encode([
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        (b":authority", b"%2Frun%2Fspiffe%2Fworkload.sock"),
        (b"content-type", b"application/grpc"),
        (b"workload.spiffe.io", b"true"),
    ]);
    let len = block.len();
    h2.extend_from_slice(&[
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        1,
        4,
        0,
        0,
        0,
        1,
    ]);
    h2.extend_from_slice(&block);
    h2.extend_from_slice(&[0, 0, 5, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
    put("h2_authority", "grpc-c-core.bin", &h2);
}
