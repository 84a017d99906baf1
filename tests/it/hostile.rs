//! The hostile-input catalogue (issue 24): inputs a real attacker or a broken client sends, over
//! the wire, against one in-process server: gRPC (the Istio CSR API, SDS), TLS and HTTP/2, the
//! HTTP port, the server's Unix socket. Each case states its expected refusal or shedding; after
//! all of them, nothing was issued (`meshid_certs_issued_total` moved only for the control
//! cases), the server still serves a well-behaved client, and its memory stayed bounded. The
//! limits involved are config keys (README "Limits", SECURITY.md); the federation peer that
//! sends a huge or endless bundle, the remote kubeconfig asking for a program or a file, the
//! Workload API caller without its header and the token floods are pinned where those parts
//! are tested, named at the end of the catalogue.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest},
};
use meshid::{
    api::{istio::IstioCertificateRequest, SECRET_TYPE_URL},
    clock::SystemClock,
    identity::{dev_issuer::TokenRequest, ServiceAccountClaims},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{metadata::MetadataValue, Code, Status};

use crate::{
    server::http_get,
    server_support::{sds_req, TestServer},
    support::{csr, p256},
};

/// An `IstioCertificateRequest` whose fields may be anything on the wire (invalid UTF-8 in the
/// `csr` string, a malformed `metadata` Struct).
#[derive(Clone, PartialEq, prost::Message)]
struct RawCsrRequest {
    #[prost(bytes = "vec", tag = "1")]
    csr: Vec<u8>,
    #[prost(int64, tag = "3")]
    validity_duration: i64,
    #[prost(bytes = "vec", tag = "4")]
    metadata: Vec<u8>,
}

/// A `DiscoveryRequest` with raw bytes for its resource names and node.
#[derive(Clone, PartialEq, prost::Message)]
struct RawDiscoveryRequest {
    #[prost(bytes = "vec", tag = "1")]
    version_info: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    node: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "3")]
    resource_names: Vec<Vec<u8>>,
    #[prost(bytes = "vec", tag = "4")]
    type_url: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

const CSR_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
const SDS_PATH: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const DELTA_PATH: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";

struct Catalogue {
    server: TestServer,
    rows: Vec<(String, String, Result<(), String>)>,
}

impl Catalogue {
    fn record(&mut self, name: &str, expected: &str, ok: Result<(), String>) {
        self.rows.push((
            format!("{:>2}. {name}", self.rows.len() + 1),
            expected.into(),
            ok,
        ));
    }

    /// Expects a gRPC status of `code` whose message contains `needle`.
    fn expect_status<T: std::fmt::Debug>(
        &mut self,
        name: &str,
        r: Result<T, Status>,
        code: Code,
        needle: &str,
    ) {
        let outcome = match r {
            Err(s) if s.code() == code && s.message().contains(needle) => Ok(()),
            other => Err(format!("got {other:?}")),
        };
        self.record(name, &format!("{code:?} \"{needle}\""), outcome);
    }

    async fn grpc(&self) -> tonic::client::Grpc<tonic::transport::Channel> {
        let mut g = tonic::client::Grpc::new(self.server.channel().await);
        g.ready().await.unwrap();
        g
    }

    /// One CreateCertificate call, `token` (if any) as the bearer, `headers` added.
    async fn csr_call<M: prost::Message + Default + Send + Sync + 'static>(
        &self,
        token: Option<&str>,
        headers: &[(&'static str, &str)],
        msg: M,
    ) -> Result<(), Status> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = token {
            req.metadata_mut().insert(
                "authorization",
                MetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|e| Status::internal(e.to_string()))?,
            );
        }
        for (k, v) in headers {
            req.metadata_mut().insert(
                *k,
                MetadataValue::try_from(*v).map_err(|e| Status::internal(e.to_string()))?,
            );
        }
        let mut g = self.grpc().await;
        g.unary::<M, Empty, _>(
            req,
            tonic::codegen::http::uri::PathAndQuery::from_static(CSR_PATH),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .map(|_| ())
    }

    /// Opens a stream at `path`, sends `msgs`, and returns the first response or the status
    /// the stream ended with.
    async fn stream_first<M: prost::Message + Default + Clone + Send + Sync + 'static>(
        &self,
        path: &'static str,
        token: &str,
        msgs: Vec<M>,
    ) -> Result<(), Status> {
        let mut req = tonic::Request::new(tokio_stream::iter(msgs));
        req.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
        );
        let mut g = self.grpc().await;
        let resp = g
            .streaming::<_, M, Empty, _>(
                req,
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await?;
        let mut body = resp.into_inner();
        match tokio::time::timeout(Duration::from_secs(10), body.message()).await {
            Ok(Ok(Some(_))) => Ok(()),
            Ok(Ok(None)) => Err(Status::ok("ended without a response")),
            Ok(Err(s)) => Err(s),
            Err(_) => Err(Status::deadline_exceeded("no response within 10 s")),
        }
    }

    fn token_with(&self, edit: impl FnOnce(&mut ServiceAccountClaims)) -> String {
        let now = self.server.clock.now();
        let mut claims = self.server.issuer.claims(
            &TokenRequest {
                namespace: "shop".into(),
                service_account: "product-service".into(),
                audiences: vec!["istio-ca".into()],
                ttl: Duration::from_secs(3600),
                pod: None,
            },
            now,
        );
        edit(&mut claims);
        self.server.issuer.sign(&claims).unwrap()
    }

    fn issued(&self) -> u64 {
        let m = self.server.running.metrics.render();
        m.lines()
            .filter(|l| l.starts_with("meshid_certs_issued_total{api=\"csr\"}"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn b64url(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// A Struct nested `depth` deep: `{"a": {"a": … }}`.
fn nested_struct(depth: usize) -> Vec<u8> {
    use prost::Message;
    let mut s = prost_types::Struct::default();
    for _ in 0..depth {
        let mut outer = prost_types::Struct::default();
        outer.fields.insert(
            "a".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StructValue(s)),
            },
        );
        s = outer;
    }
    s.encode_to_vec()
}

/// `n` copies of one non-critical private extension (OID 1.3.6.1.4.1.99999.1, a NULL value).
fn private_extensions(n: usize) -> Vec<(&'static [u64], bool, Vec<u8>)> {
    (0..n)
        .map(|_| {
            (
                &[1u64, 3, 6, 1, 4, 1, 99999, 1][..],
                false,
                vec![0x05, 0x00],
            )
        })
        .collect()
}

/// A DER CSR whose request attribute carries `exts` (each `(oid, critical, value)`), signed by
/// a fresh key, with `id` as its URI SAN.
fn csr_with_extensions(id: &str, exts: &[(&[u64], bool, Vec<u8>)]) -> String {
    let key = p256();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    for (oid, critical, value) in exts {
        let mut e = rcgen::CustomExtension::from_oid_content(oid, value.clone());
        e.set_criticality(*critical);
        p.custom_extensions.push(e);
    }
    p.serialize_request(&key).unwrap().pem().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_catalogue() {
    let server = TestServer::start_with(Arc::new(SystemClock), |c| {
        c.limits.tls_handshake_timeout = Duration::from_millis(500);
        c.limits.http_header_read_timeout = Duration::from_millis(300);
        c.limits.unary_timeout = Duration::from_secs(3);
    })
    .await;
    let mut cat = Catalogue {
        server,
        rows: Vec::new(),
    };
    let rss_before = rss_kib();
    let good = cat.server.token("shop", "product-service");
    let id = "spiffe://cluster.local/ns/shop/sa/product-service";
    let good_csr = csr(&p256(), &[id]);
    let req = |csr: &str| IstioCertificateRequest {
        csr: csr.into(),
        validity_duration: 3600,
        metadata: None,
    };

    // Control: a well-formed request is served (the only issuance of the catalogue).
    let r = cat.csr_call(Some(&good), &[], req(&good_csr)).await;
    cat.record(
        "control: a valid CSR with a valid token",
        "issued",
        r.map_err(|s| format!("{s:?}")),
    );
    let issued_after_control = cat.issued();

    // --- authentication: tokens in every shape a real API server does not issue ---
    let r = cat.csr_call(None, &[], req(&good_csr)).await;
    cat.expect_status("no authorization header", r, Code::Unauthenticated, "");
    let r = cat.csr_call(Some(""), &[], req(&good_csr)).await;
    cat.expect_status("an empty bearer token", r, Code::Unauthenticated, "");
    let r = cat.csr_call(Some("not-a-jwt"), &[], req(&good_csr)).await;
    cat.expect_status("a token that is not a JWT", r, Code::Unauthenticated, "");
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none"}"#),
        b64url(format!(r#"{{"iss":"https://kubernetes.default.svc.cluster.local","aud":["istio-ca"],"sub":"system:serviceaccount:shop:product-service","exp":{}}}"#, time::OffsetDateTime::now_utc().unix_timestamp() + 600).as_bytes())
    );
    let r = cat.csr_call(Some(&none), &[], req(&good_csr)).await;
    cat.expect_status("alg none", r, Code::Unauthenticated, "");
    let hs = format!(
        "{}.{}.{}",
        b64url(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64url(br#"{"sub":"system:serviceaccount:shop:product-service"}"#),
        b64url(b"0123456789abcdef0123456789abcdef")
    );
    let r = cat.csr_call(Some(&hs), &[], req(&good_csr)).await;
    cat.expect_status(
        "an HMAC token (key confusion)",
        r,
        Code::Unauthenticated,
        "",
    );
    let forged = {
        let other = meshid::identity::dev_issuer::DevIssuer::init(
            &cat.server.dir.path().join("forger"),
            "https://kubernetes.default.svc.cluster.local",
            None,
        )
        .unwrap();
        other
            .token(
                &TokenRequest {
                    namespace: "shop".into(),
                    service_account: "product-service".into(),
                    audiences: vec!["istio-ca".into()],
                    ttl: Duration::from_secs(600),
                    pod: None,
                },
                cat.server.clock.now(),
            )
            .unwrap()
    };
    let r = cat.csr_call(Some(&forged), &[], req(&good_csr)).await;
    cat.expect_status(
        "a token signed by another key",
        r,
        Code::Unauthenticated,
        "",
    );
    let mut flipped = good.clone().into_bytes();
    let at = flipped.len() - 5;
    flipped[at] = if flipped[at] == b'A' { b'B' } else { b'A' };
    let r = cat
        .csr_call(
            Some(std::str::from_utf8(&flipped).unwrap()),
            &[],
            req(&good_csr),
        )
        .await;
    cat.expect_status(
        "a token with one signature byte changed",
        r,
        Code::Unauthenticated,
        "",
    );
    let t = cat.token_with(|c| c.exp = Some(c.exp.unwrap() - 7200));
    let r = cat.csr_call(Some(&t), &[], req(&good_csr)).await;
    cat.expect_status("an expired token", r, Code::Unauthenticated, "");
    let t = cat.token_with(|c| c.nbf = Some(c.nbf.unwrap() + 3600));
    let r = cat.csr_call(Some(&t), &[], req(&good_csr)).await;
    cat.expect_status(
        "a token not valid for an hour yet",
        r,
        Code::Unauthenticated,
        "",
    );
    let t = cat.token_with(|c| c.aud = vec!["kubernetes".into()]);
    let r = cat.csr_call(Some(&t), &[], req(&good_csr)).await;
    cat.expect_status("a token for another audience", r, Code::Unauthenticated, "");
    let t = cat.token_with(|c| c.iss = Some("https://evil.example".into()));
    let r = cat.csr_call(Some(&t), &[], req(&good_csr)).await;
    cat.expect_status("a token of another issuer", r, Code::Unauthenticated, "");
    let t = cat.token_with(|c| {
        c.kubernetes = None;
        c.sub = Some("system:node:n1".into());
    });
    let r = cat.csr_call(Some(&t), &[], req(&good_csr)).await;
    cat.expect_status(
        "a token naming no service account",
        r,
        Code::Unauthenticated,
        "",
    );
    let t = cat.token_with(|c| {
        c.exp = None;
        c.aud = vec![];
    });
    let r = cat.csr_call(Some(&t), &[], req(&good_csr)).await;
    cat.expect_status(
        "a legacy-shaped token (no exp, no audience)",
        r,
        Code::Unauthenticated,
        "",
    );
    // Request headers above 16 KiB in all (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE as the server
    // advertises it) are refused by the HTTP/2 layer with 431 before any gRPC handling.
    let huge = "a".repeat(15 * 1024) + "." + &"b".repeat(15 * 1024) + ".c";
    let r = cat.csr_call(Some(&huge), &[], req(&good_csr)).await;
    cat.expect_status(
        "a 30 KiB token (headers above 16 KiB)",
        r,
        Code::Unknown,
        "431",
    );
    let long = "a".repeat(7 * 1024) + "." + &"b".repeat(7 * 1024) + ".c";
    let r = cat.csr_call(Some(&long), &[], req(&good_csr)).await;
    cat.expect_status("a 14 KiB token of garbage", r, Code::Unauthenticated, "");
    let r = cat
        .csr_call(
            Some(&good),
            &[("clusterid", "no-such-cluster")],
            req(&good_csr),
        )
        .await;
    cat.expect_status("an unknown ClusterID", r, Code::Unauthenticated, "");

    // --- the Istio CSR API: the CSR and the request around it ---
    let r = cat.csr_call(Some(&good), &[], req("")).await;
    cat.expect_status("an empty CSR", r, Code::InvalidArgument, "");
    let r = cat
        .csr_call(
            Some(&good),
            &[],
            req("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"),
        )
        .await;
    cat.expect_status(
        "a PEM CSR with garbage inside",
        r,
        Code::InvalidArgument,
        "",
    );
    let mut bad_sig = good_csr.clone().into_bytes();
    let n = bad_sig.len() - 40;
    bad_sig[n] = if bad_sig[n] == b'A' { b'B' } else { b'A' };
    let r = cat
        .csr_call(
            Some(&good),
            &[],
            req(std::str::from_utf8(&bad_sig).unwrap()),
        )
        .await;
    cat.expect_status(
        "a CSR whose signature does not verify",
        r,
        Code::InvalidArgument,
        "",
    );
    let r = cat
        .csr_call(
            Some(&good),
            &[],
            req(&csr(
                &p256(),
                &["spiffe://cluster.local/ns/kube-system/sa/admin"],
            )),
        )
        .await;
    cat.expect_status(
        "a CSR naming another identity",
        r,
        Code::PermissionDenied,
        "",
    );
    let dup = private_extensions(2000);
    let r = cat
        .csr_call(Some(&good), &[], req(&csr_with_extensions(id, &dup)))
        .await;
    cat.expect_status(
        "a CSR asking for 2,000 extensions",
        r,
        Code::InvalidArgument,
        "at most 16",
    );
    let twice = private_extensions(2);
    let r = cat
        .csr_call(Some(&good), &[], req(&csr_with_extensions(id, &twice)))
        .await;
    cat.expect_status(
        "a CSR asking for one extension twice",
        r,
        Code::InvalidArgument,
        "twice",
    );
    let crit = csr_with_extensions(
        id,
        &[(&[1, 3, 6, 1, 4, 1, 99999, 2], true, vec![0x05, 0x00])],
    );
    let r = cat.csr_call(Some(&good), &[], req(&crit)).await;
    cat.expect_status(
        "a CSR with an unknown critical extension",
        r,
        Code::InvalidArgument,
        "critical extension",
    );
    let big = "A".repeat(100 * 1024);
    let r = cat.csr_call(Some(&good), &[], req(&big)).await;
    cat.expect_status(
        "a 100 KiB CSR field",
        r,
        Code::ResourceExhausted,
        "csr_max_request_bytes",
    );
    let r = cat
        .csr_call(
            Some(&good),
            &[],
            RawCsrRequest {
                csr: vec![0xff, 0xfe, 0x00, 0xc3, 0x28],
                validity_duration: 3600,
                metadata: Vec::new(),
            },
        )
        .await;
    cat.expect_status("invalid UTF-8 in the csr string", r, Code::Internal, "");
    let r = cat
        .csr_call(
            Some(&good),
            &[],
            RawCsrRequest {
                csr: good_csr.clone().into_bytes(),
                validity_duration: 3600,
                metadata: nested_struct(200),
            },
        )
        .await;
    cat.expect_status("metadata: a Struct nested 200 deep", r, Code::Internal, "");
    let r = cat
        .csr_call(
            Some(&good),
            &[],
            RawCsrRequest {
                csr: good_csr.clone().into_bytes(),
                validity_duration: 3600,
                metadata: vec![0x0a, 0xff, 0xff, 0xff, 0x0f],
            },
        )
        .await;
    cat.expect_status("metadata: a truncated Struct", r, Code::Internal, "");
    let r = cat
        .csr_call(
            Some(&good),
            &[],
            IstioCertificateRequest {
                csr: good_csr.clone(),
                validity_duration: i64::MAX,
                metadata: None,
            },
        )
        .await;
    cat.expect_status(
        "validity_duration i64::MAX",
        r,
        Code::InvalidArgument,
        "max",
    );
    let r = cat
        .csr_call(
            Some(&good),
            &[],
            IstioCertificateRequest {
                csr: good_csr.clone(),
                validity_duration: -1,
                metadata: None,
            },
        )
        .await;
    // istiod's `IstioCA.sign`: a non-positive requested lifetime means the default TTL.
    cat.record(
        "validity_duration -1",
        "issued with the default TTL, as istiod does",
        r.map_err(|s| format!("{s:?}")),
    );
    let mut meta = prost_types::Struct::default();
    meta.fields.insert(
        "ImpersonatedIdentity".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(
                "spiffe://cluster.local/ns/kube-system/sa/admin".into(),
            )),
        },
    );
    let r = cat
        .csr_call(
            Some(&good),
            &[],
            IstioCertificateRequest {
                csr: good_csr.clone(),
                validity_duration: 3600,
                metadata: Some(meta),
            },
        )
        .await;
    cat.expect_status(
        "impersonation asked by a workload that is no node agent",
        r,
        Code::PermissionDenied,
        "impersonation",
    );

    // --- SDS ---
    let sds = |names: Vec<String>| DiscoveryRequest {
        type_url: SECRET_TYPE_URL.into(),
        resource_names: names,
        ..Default::default()
    };
    let r = cat
        .stream_first(SDS_PATH, "garbage", vec![sds(vec!["default".into()])])
        .await;
    cat.expect_status("SDS with a garbage token", r, Code::Unauthenticated, "");
    let r = cat
        .stream_first(
            SDS_PATH,
            &good,
            vec![sds((0..129).map(|i| format!("n{i}")).collect())],
        )
        .await;
    cat.expect_status(
        "SDS: 129 names on one stream",
        r,
        Code::ResourceExhausted,
        "xds.max_resource_names_per_stream",
    );
    let r = cat
        .stream_first(
            SDS_PATH,
            &good,
            vec![sds((0..1_000_000).map(|i| i.to_string()).collect())],
        )
        .await;
    cat.expect_status(
        "SDS: a million resource names (6.9 MB message)",
        r,
        Code::ResourceExhausted,
        "limits.xds_max_request_bytes",
    );
    let r = cat
        .stream_first(SDS_PATH, &good, vec![sds(vec!["x".repeat(2000)])])
        .await;
    cat.expect_status(
        "SDS: a 2,000-byte resource name",
        r,
        Code::InvalidArgument,
        "1024",
    );
    let r = cat
        .stream_first(
            SDS_PATH,
            &good,
            vec![DiscoveryRequest {
                type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
                resource_names: vec!["default".into()],
                ..Default::default()
            }],
        )
        .await;
    cat.expect_status("SDS: another type URL", r, Code::InvalidArgument, "");
    let r = cat
        .stream_first(
            SDS_PATH,
            &good,
            vec![RawDiscoveryRequest {
                type_url: SECRET_TYPE_URL.as_bytes().to_vec(),
                resource_names: vec![vec![0xc3, 0x28, 0xff]],
                ..Default::default()
            }],
        )
        .await;
    cat.expect_status(
        "SDS: invalid UTF-8 in a resource name",
        r,
        Code::Internal,
        "",
    );
    let r = cat
        .stream_first(
            SDS_PATH,
            &good,
            vec![RawDiscoveryRequest {
                type_url: SECRET_TYPE_URL.as_bytes().to_vec(),
                resource_names: vec![b"default".to_vec()],
                node: {
                    use prost::Message;
                    // node.metadata (field 3) a Struct nested 500 deep
                    let inner = nested_struct(500);
                    let mut node = Vec::new();
                    prost::encoding::bytes::encode(3, &inner, &mut node);
                    let _ = Node::default().encode_to_vec();
                    node
                },
                ..Default::default()
            }],
        )
        .await;
    cat.expect_status("SDS: node metadata nested 500 deep", r, Code::Internal, "");
    let mut many = BTreeMap::new();
    for i in 0..200 {
        many.insert(format!("n{i}"), "v".into());
    }
    let r = cat
        .stream_first(
            DELTA_PATH,
            &good,
            vec![DeltaDiscoveryRequest {
                type_url: SECRET_TYPE_URL.into(),
                initial_resource_versions: many.into_iter().collect(),
                ..Default::default()
            }],
        )
        .await;
    cat.expect_status(
        "Delta SDS: 200 initial_resource_versions",
        r,
        Code::ResourceExhausted,
        "xds.max_resource_names_per_stream",
    );

    // A client that never reads: it subscribes and then ignores every response while the
    // server keeps pushing; another client is served meanwhile and the server's queue for
    // the silent one stays bounded (a 4-slot channel per stream).
    let silent = crate::server::Sds::open(&cat.server, good.clone())
        .await
        .unwrap();
    silent.send(sds_req(&["default", "ROOTCA"], "", "")).await;
    let store = meshid::state::DirStore::new(cat.server.state_dir());
    for _ in 0..5 {
        // Prepare a root, then withdraw it: two bundle changes pushed to every stream.
        let prepared = crate::rotation_server::prepare_generated(&store);
        let ctx = meshid::rotation::Ctx::new(
            meshid::state::Actor::user("op", "test"),
            time::OffsetDateTime::now_utc(),
            None,
        )
        .unwrap();
        meshid::rotation::apply(&store, &ctx, |s, c| {
            meshid::rotation::revoke(s, &prepared, false, Duration::from_secs(86_400), c)
        })
        .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let mut other = crate::server::Sds::open(&cat.server, good.clone())
        .await
        .unwrap();
    other.send(sds_req(&["ROOTCA"], "", "")).await;
    let served = tokio::time::timeout(Duration::from_secs(10), other.recv()).await;
    cat.record(
        "a client that never reads or ACKs while roots change",
        "others served; its queue bounded",
        served
            .map(|_| ())
            .map_err(|_| "another client was not served".into()),
    );
    drop(silent);

    // --- TLS and HTTP/2 on the gRPC port ---
    let grpc_addr = cat.server.running.grpc_addr;
    let t0 = Instant::now();
    let mut c = tokio::net::TcpStream::connect(grpc_addr).await.unwrap();
    c.write_all(&[0x16, 0x03, 0x01]).await.unwrap(); // the start of a ClientHello, then nothing
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
    cat.record(
        "TLS slow-loris: a ClientHello that never finishes",
        "closed after limits.tls_handshake_timeout",
        match closed {
            Ok(_) if t0.elapsed() < Duration::from_secs(4) => Ok(()),
            other => Err(format!("{other:?} after {:?}", t0.elapsed())),
        },
    );
    let mut c = tokio::net::TcpStream::connect(grpc_addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut Vec::new())).await;
    cat.record(
        "plain HTTP/1.1 to the TLS port",
        "closed",
        closed
            .map(|_| ())
            .map_err(|_| "still open after 5 s".into()),
    );
    let mut c = tokio::net::TcpStream::connect(grpc_addr).await.unwrap();
    let mut junk = vec![0x16, 0x03, 0x01, 0x40, 0x00];
    junk.extend(std::iter::repeat_n(0xAB, 0x4000));
    let _ = c.write_all(&junk).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut Vec::new())).await;
    cat.record(
        "a 16 KiB TLS record of garbage",
        "closed",
        closed
            .map(|_| ())
            .map_err(|_| "still open after 5 s".into()),
    );
    let (settings, pings, slow) = h2_floods(&cat.server).await;
    cat.record(
        "HTTP/2: 100,000 SETTINGS frames, no ACK read",
        "shed (GOAWAY or closed), no growth",
        settings,
    );
    cat.record(
        "HTTP/2: 100,000 PINGs, no PONG read",
        "shed (GOAWAY or closed), no growth",
        pings,
    );
    cat.record(
        "HTTP/2 slow-loris: the preface, then nothing",
        "closed within the handshake timeout or kept idle, server unaffected",
        slow,
    );

    // --- the HTTP port ---
    let http = cat.server.running.http_addr;
    let mut c = tokio::net::TcpStream::connect(http).await.unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut Vec::new())).await;
    cat.record(
        "HTTP slow-loris: headers that never end",
        "closed after limits.http_header_read_timeout",
        closed
            .map(|_| ())
            .map_err(|_| "still open after 5 s".into()),
    );
    let mut c = tokio::net::TcpStream::connect(http).await.unwrap();
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let _ = c.write_all(big.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    cat.record(
        "HTTP: a 1 MiB header",
        "431 or closed",
        if text.is_empty() || text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400") {
            Ok(())
        } else {
            Err(text.lines().next().unwrap_or("").into())
        },
    );
    let resp = http_get(&cat.server, "/debug/../../etc/passwd").await;
    cat.record(
        "HTTP: a path escaping upwards",
        "404, nothing read",
        if resp.starts_with("HTTP/1.1 404") {
            Ok(())
        } else {
            Err(resp.lines().next().unwrap_or("").into())
        },
    );
    let resp = http_get(
        &cat.server,
        "/debug/describe/service?name=%ff%fe&output=json",
    )
    .await;
    cat.record(
        "HTTP: invalid UTF-8 in a query",
        "404 or 400 naming it",
        if resp.starts_with("HTTP/1.1 404") || resp.starts_with("HTTP/1.1 400") {
            Ok(())
        } else {
            Err(resp.lines().next().unwrap_or("").into())
        },
    );

    // --- the server's Unix socket ---
    let sock = cat.server.running.unix_path.clone().unwrap();
    let mut u = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let _ = u.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x05\x01\x05\x00\x00\x00\x01\xff\xff\xff\xff\xff").await;
    let closed = tokio::time::timeout(Duration::from_secs(5), u.read_to_end(&mut Vec::new())).await;
    cat.record(
        "Unix socket: a HEADERS frame of invalid HPACK",
        "closed",
        closed
            .map(|_| ())
            .map_err(|_| "still open after 5 s".into()),
    );
    let mut u = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let mut frame = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame.extend_from_slice(&[0xff, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x00, 0x01]);
    let _ = u.write_all(&frame).await;
    let _ = u.write_all(&vec![0u8; 64 * 1024]).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), u.read_to_end(&mut Vec::new())).await;
    cat.record(
        "Unix socket: a 16 MiB HEADERS frame announced",
        "closed (above the frame size the server allows)",
        closed
            .map(|_| ())
            .map_err(|_| "still open after 5 s".into()),
    );

    // --- after the catalogue ---
    // Allowed through the CSR API since the control: validity_duration -1 (istiod's default
    // TTL) and the check after the HTTP/2 floods.
    let issued = cat.issued();
    let extra = issued - issued_after_control - 2;
    cat.record(
        "nothing issued by any hostile input",
        "meshid_certs_issued_total unchanged",
        if extra == 0 {
            Ok(())
        } else {
            Err(format!("{extra} certificates issued"))
        },
    );
    let r = cat
        .csr_call(Some(&good), &[], req(&csr(&p256(), &[id])))
        .await;
    cat.record(
        "the server still serves a well-behaved client",
        "issued",
        r.map_err(|s| format!("{s:?}")),
    );
    let grown = rss_kib().saturating_sub(rss_before);
    cat.record(
        "memory stays bounded",
        "test process RSS grew < 256 MiB",
        if grown < 256 * 1024 {
            Ok(())
        } else {
            Err(format!("grew {} MiB", grown / 1024))
        },
    );

    let failed: Vec<String> = cat
        .rows
        .iter()
        .filter_map(|(n, e, r)| {
            r.as_ref()
                .err()
                .map(|why| format!("{n}: expected {e}: {why}"))
        })
        .collect();
    for (n, e, r) in &cat.rows {
        eprintln!(
            "{n:<70} {e:<50} {}",
            if r.is_ok() { "ok" } else { "FAILED" }
        );
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(cat.rows.len() >= 40, "{} cases", cat.rows.len());
    cat.server.running.shutdown().await;
}

/// HTTP/2 abuse over a real TLS connection with ALPN h2: a SETTINGS flood and a PING flood
/// whose acknowledgements are never read, and a connection that sends the preface and stops.
/// Each must end in the server shedding the connection (GOAWAY or close) or absorbing it with
/// no effect on others.
async fn h2_floods(
    server: &TestServer,
) -> (Result<(), String>, Result<(), String>, Result<(), String>) {
    let tls = {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile_certs(&server.root_pem) {
            roots.add(c).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    };
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(server.running.grpc_addr)
            .await
            .unwrap();
        tokio_rustls::TlsConnector::from(tls.clone())
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap()
    };
    let connect = &connect;
    let flood = |frame: Vec<u8>| async move {
        let mut s = connect().await;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        let start = Instant::now();
        let mut sent = 0usize;
        let chunk: Vec<u8> = frame
            .iter()
            .cycle()
            .take(frame.len() * 1000)
            .cloned()
            .collect();
        while sent < 100_000 && start.elapsed() < Duration::from_secs(20) {
            match tokio::time::timeout(Duration::from_secs(2), s.write_all(&chunk)).await {
                Ok(Ok(())) => sent += 1000,
                // The server stopped reading (its buffers are bounded) or closed: shed.
                Ok(Err(_)) | Err(_) => return Ok(()),
            }
        }
        // Every frame was taken: the server must still answer others.
        Ok::<(), String>(())
    };
    let settings = flood(vec![0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]).await;
    let pings = flood(vec![0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]).await;
    let slow = {
        let mut s = connect().await;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        // Whatever the server did with it, a new client is served.
        let c = server.csr(Some(server.token("shop", "a"))).await;
        drop(c);
        Ok(())
    };
    let still = {
        let mut c = server
            .csr(Some(server.token("shop", "product-service")))
            .await;
        let key = p256();
        c.create_certificate(IstioCertificateRequest {
            csr: csr(&key, &["spiffe://cluster.local/ns/shop/sa/product-service"]),
            validity_duration: 3600,
            metadata: None,
        })
        .await
        .map(|_| ())
        .map_err(|s| format!("after the floods a client is refused: {s:?}"))
    };
    let both = |r: Result<(), String>| r.and(still.clone());
    (both(settings), both(pings), slow)
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}
