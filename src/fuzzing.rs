//! Fuzz entry points: one function per parser that meets untrusted input, each taking raw bytes
//! and required never to panic, hang or allocate without bound. The libFuzzer targets in
//! `fuzz/` call them; `tests/it/fuzz_regressions.rs` replays every kept input
//! (`fuzz/regressions/<target>/`) through the same functions in `cargo test`. Not an API.

use std::{
    path::Path,
    sync::{Arc, OnceLock},
    time::Duration,
};

use prost::Message;
use time::OffsetDateTime;

use crate::{
    ca::{
        cert, chain, crl, root, Authority, CertDer, IssuancePolicy, KeyType, PrivateKey, SanCheck,
        SigningMaterial,
    },
    clock::{Clock, ManualClock},
    spiffe::{SpiffeId, TrustDomain},
};

/// A fuzz target: raw bytes in, no panic out.
pub type Target = fn(&[u8]);

/// Every target, by name (the `fuzz/fuzz_targets/<name>.rs` files and the regression
/// directories use these names).
pub const TARGETS: &[(&str, Target)] = &[
    ("csr", csr),
    ("jwt", jwt),
    ("xds", xds),
    ("istio_csr", istio_csr),
    ("spiffe_bundle", spiffe_bundle),
    ("spiffe_id", spiffe_id),
    ("plugin_ca", plugin_ca),
    ("snapshot", snapshot),
    ("kubeconfig", kubeconfig),
    ("state_doc", state_doc),
    ("h2_authority", h2_authority),
];

/// A fixed time inside the validity of the test material (2026-12-01).
fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_796_083_200).expect("a valid time")
}

struct Ca {
    authority: Authority,
    caller: SpiffeId,
    roots: Vec<CertDer>,
}

/// One P-256 CA for the whole run (generating it per input would drown the signal).
fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let td = TrustDomain::new("cluster.local").expect("a valid trust domain");
        let r = root::generate_root(
            &td,
            KeyType::EcdsaP256,
            Duration::from_secs(10 * 365 * 86_400),
            now() - Duration::from_secs(86_400),
        )
        .expect("a root");
        let material = SigningMaterial {
            signer_cert: r.cert.clone(),
            signer_key: r.key,
            intermediates: Vec::new(),
            roots: vec![r.cert.clone()],
        };
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(now()));
        let authority =
            Authority::new(td, material, IssuancePolicy::default(), clock).expect("an authority");
        Ca {
            authority,
            caller: SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/product-service")
                .expect("a valid id"),
            roots: vec![r.cert],
        }
    })
}

/// `data` cut into up to `n` parts, each led by a little-endian u16 length (the last takes
/// the rest): how multi-part inputs are framed.
fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n && rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let len = len.min(body.len());
        out.push(&body[..len]);
        rest = &body[len..];
    }
    out.push(rest);
    out
}

/// A CSR (PEM or DER) through the CSR checks and, when accepted, the signing policy: the
/// certificate names the caller alone and verifies to the CA's root.
pub fn csr(data: &[u8]) {
    let ca = ca();
    for sans in [SanCheck::MatchIdentity, SanCheck::Ignore] {
        if let Ok(issued) = ca.authority.sign_csr_with(data, &ca.caller, None, sans) {
            let leaf = &issued.leaf;
            let parsed = cert::parse(leaf, "leaf").expect("meshid's own leaf parses");
            let uris: Vec<String> = parsed
                .subject_alternative_name()
                .ok()
                .flatten()
                .map(|s| {
                    s.value
                        .general_names
                        .iter()
                        .map(|g| format!("{g:?}"))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(uris.len(), 1, "a leaf names exactly one identity: {uris:?}");
            chain::verify_leaf(leaf, &issued.chain, &ca.roots, now())
                .expect("an issued leaf verifies to the root");
        }
    }
}

/// A bearer token through parsing, the algorithm rule and signature verification against a
/// fixed key, and the claims a service-account token must carry.
pub fn jwt(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    crate::identity::fuzz_token(text);
}

/// Decoded xDS requests (SotW and Delta) driving the stream state machines in turn.
pub fn xds(data: &[u8]) {
    let mut sotw = Vec::new();
    let mut delta = Vec::new();
    for (i, p) in parts(data, 8).into_iter().enumerate() {
        if i % 2 == 0 {
            if let Ok(r) =
                envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest::decode(p)
            {
                sotw.push(r);
            }
        } else if let Ok(r) =
            envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest::decode(p)
        {
            delta.push(r);
        }
    }
    crate::api::xds::fuzz_streams(sotw, delta);
}

/// Istio's `IstioCertificateRequest`: decoded, its impersonation metadata read as istiod reads
/// it, and its CSR through the same checks as `csr`.
pub fn istio_csr(data: &[u8]) {
    let Ok(req) = crate::api::istio::IstioCertificateRequest::decode(data) else {
        return;
    };
    if let Some(id) = crate::api::node_auth::requested_identity(req.metadata.as_ref()) {
        let _ = SpiffeId::parse(id);
    }
    let ca = ca();
    let _ = ca.authority.sign_csr_with(
        req.csr.as_bytes(),
        &ca.caller,
        Some(Duration::from_secs(
            u64::try_from(req.validity_duration.max(0))
                .unwrap_or(0)
                .min(86_400),
        )),
        SanCheck::MatchIdentity,
    );
}

/// A SPIFFE bundle as a federation peer serves it.
pub fn spiffe_bundle(data: &[u8]) {
    if let Ok(b) = crate::trust::SpiffeBundle::parse(data) {
        let _ = b.check_successor_of(Some(u64::from(data.len() as u32)));
        // What we parsed, we can write back and read again.
        if let Ok(json) = b.to_json() {
            crate::trust::SpiffeBundle::parse(json.as_bytes()).expect("our own bundle JSON parses");
        }
    }
}

/// A SPIFFE ID and a trust domain name.
pub fn spiffe_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(
            SpiffeId::parse(&id.to_string()).ok().as_ref(),
            Some(&id),
            "an ID reads back as itself"
        );
        let _ = id.service_account();
    }
    let _ = TrustDomain::new(s);
}

/// A plug-in CA as one PEM text: the first certificate signs, the last is the root, the ones
/// between are the pool the path is built from; a private key block is the signer's key and
/// CRL blocks are its `ca-crl.pem`.
pub fn plugin_ca(data: &[u8]) {
    let Ok(certs) = cert::certs_from_pem(data, "plugin") else {
        return;
    };
    if certs.len() < 2 {
        return;
    }
    let (signer, rest) = certs.split_first().expect("two or more");
    let (root, pool) = rest.split_last().expect("one or more");
    let roots = vec![root.clone()];
    let Ok(intermediates) = chain::build_ca_path(signer, pool, &roots, now()) else {
        return;
    };
    let Ok(key) = PrivateKey::from_pem(data, "plugin key") else {
        return;
    };
    let m = SigningMaterial {
        signer_cert: signer.clone(),
        signer_key: key,
        intermediates,
        roots,
    };
    let _ = crl::check_crls(data, "ca-crl.pem", &m, now());
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(now()));
    let td = TrustDomain::new("cluster.local").expect("valid");
    if let Ok(a) = Authority::new(td, m, IssuancePolicy::default(), clock) {
        let _ = a.issue_with_new_key(&ca().caller, None);
    }
}

/// A discovery snapshot (kubectl `-o json`/`-o yaml` of Kubernetes and Istio objects): read,
/// and every auto-mTLS decision made over it.
pub fn snapshot(data: &[u8]) {
    if let Ok(objs) = crate::discovery::MeshObjects::from_snapshot(data) {
        let s = crate::discovery::MeshSettings::default();
        let _ = crate::discovery::DiscoveryView::build(&objs, &s);
    }
}

/// A remote cluster's kubeconfig (from a remote secret): read and held to the policy that
/// refuses programs and local files.
pub fn kubeconfig(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(kc) = kube::config::Kubeconfig::from_yaml(text) {
        let _ = crate::discovery::KubeconfigPolicy::allowing(Vec::<String>::new()).check(&kc);
    }
}

/// The CA state document: as stored (checksummed envelope), and its inner state wrapped with
/// a valid checksum so the state's own checks are reached.
pub fn state_doc(data: &[u8]) {
    let _ = crate::state::fuzz_decode(data, Path::new("fuzz/state.json"));
    let _ = crate::state::fuzz_decode_inner(data);
}

/// Bytes a client sends on one of meshid's Unix sockets (the agent's SDS and Workload API, the
/// server's `listen.unix`): the HTTP/2 framing and HPACK re-encoding that rewrites a
/// malformed `:authority`.
pub fn h2_authority(data: &[u8]) {
    crate::h2_authority::fuzz_read(data);
}
