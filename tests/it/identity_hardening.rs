//! Issue 8, identity hardening: TokenReview flooding (local refusals, per-peer share), the
//! SelfSubjectAccessReview readiness probe, keys through the kube client, JWKS backoff, legacy
//! classification, node claims without uid, ES512, several issuers, leeway and aliases.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use meshid::{
    clock::{Clock, ManualClock, SystemClock},
    identity::{
        dev_issuer::{DevIssuer, TokenRequest},
        CacheConfig, CachingValidator, ClusterId, ClusterRouter, IdentityError, Jwk, JwksSource,
        JwksValidator, JwtConfig, Peer, RateLimit, Token, TokenReviewConfig, TokenReviewValidator,
        TokenValidator,
    },
};
use serde_json::json;
use time::OffsetDateTime;

use crate::{
    fake_apiserver::{reviewer_from_claims, FakeApiServer, Reply},
    support::td,
};

fn req(ns: &str, sa: &str) -> TokenRequest {
    TokenRequest {
        namespace: ns.into(),
        service_account: sa.into(),
        audiences: vec!["istio-ca".into()],
        ttl: Duration::from_secs(3600),
        pod: Some(("pod-1".into(), "pod-uid".into())),
    }
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// `token` with its signature replaced by `forger`'s over the same header and claims.
fn forged(token: &str, forger: &DevIssuer, claims: &serde_json::Value) -> String {
    let theirs = forger.sign(claims).unwrap();
    let (head, _) = token.rsplit_once('.').unwrap();
    format!("{head}.{}", theirs.rsplit_once('.').unwrap().1)
}

async fn reviewer(
    api: &FakeApiServer,
    clock: Arc<dyn Clock>,
    rate: RateLimit,
) -> TokenReviewValidator {
    let mut cfg = TokenReviewConfig::new(ClusterId("Kubernetes".into()), td());
    cfg.rate = rate;
    cfg.timeout = Duration::from_secs(5);
    TokenReviewValidator::new(api.client().await, cfg, clock)
}

/// Issue 8 item 2. One peer floods unique garbage and forged (well-formed, wrongly signed)
/// tokens at 10x the TokenReview qps while the cluster's keys are unreadable, so forged tokens
/// do reach TokenReview; another peer's valid new token is still validated within 2 s. On the
/// old code all callers shared one queue (100 deep at 10 qps = 10 s) and waited behind the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_does_not_starve_another() {
    let api = FakeApiServer::start().await;
    api.set_delay(Duration::from_millis(20));
    let saw_garbage = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let saw = saw_garbage.clone();
    api.set_reviewer(move |token, auds| {
        saw.fetch_or(token.starts_with("garbage"), Ordering::SeqCst);
        let claims = token
            .split('.')
            .nth(1)
            .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .unwrap_or_default();
        if String::from_utf8_lossy(&claims).contains("forged") {
            return Reply::Status(json!({"authenticated": false, "error": "invalid bearer token"}));
        }
        reviewer_from_claims(token, auds)
    });
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let issuer = DevIssuer::init(d1.path(), "https://kubernetes.default.svc", None).unwrap();
    let forger = DevIssuer::init(d2.path(), "https://kubernetes.default.svc", None).unwrap();
    let rate = RateLimit {
        qps: 10.0,
        burst: 1,
        max_queue: 100,
        max_queue_per_peer: 3,
    };
    let v = Arc::new(CachingValidator::new(
        reviewer(&api, Arc::new(SystemClock), rate).await,
        CacheConfig::default(),
        Arc::new(SystemClock),
    ));
    let attacker = Peer(Some([10, 0, 0, 66].into()));
    let victim = Peer(Some([10, 0, 0, 7].into()));
    let now = OffsetDateTime::now_utc();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let flood = {
        let (v, forger) = (v.clone(), Arc::new(forger));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10)); // 100/s = 10x qps
            for i in 0u64.. {
                if *stop.borrow() {
                    return;
                }
                tick.tick().await;
                let token = if i % 2 == 0 {
                    format!("garbage-{i}")
                } else {
                    forger
                        .token(&req("forged", &format!("sa-{i}")), now)
                        .unwrap()
                };
                let v = v.clone();
                tokio::spawn(async move { v.validate_from(&Token::new(token), attacker).await });
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let good = Token::new(issuer.token(&req("shop", "cart"), now).unwrap());
    let result = tokio::time::timeout(Duration::from_secs(2), v.validate_from(&good, victim)).await;
    let _ = stop_tx.send(true);
    flood.await.unwrap();
    let id = result
        .expect("the victim was validated within 2 s")
        .expect("and accepted");
    assert_eq!(id.service_account, "cart");
    assert!(
        api.tokenreview_calls() > 1,
        "forged tokens did reach TokenReview"
    );
    assert!(!saw_garbage.load(Ordering::SeqCst), "garbage never did");
}

/// Issue 8 item 2: with the cluster's keys readable (through the kube client), forged, garbage,
/// expired, foreign-audience and foreign-issuer tokens are refused without a TokenReview; the old
/// code sent every well-formed one to the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_well_signed_plausible_tokens_cost_a_tokenreview() {
    let api = FakeApiServer::start().await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let issuer = DevIssuer::init(d1.path(), &api.shared.issuer, None).unwrap();
    let forger = DevIssuer::init(d2.path(), &api.shared.issuer, None).unwrap();
    api.set_jwks(&issuer.jwks());
    let mut cfg = TokenReviewConfig::new(ClusterId("Kubernetes".into()), td());
    cfg.issuers = vec![api.shared.issuer.clone()];
    let v = TokenReviewValidator::new(api.client().await, cfg, Arc::new(SystemClock));
    let now = OffsetDateTime::now_utc();
    let claims = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = serde_json::to_value(issuer.claims(&req("shop", "a"), now)).unwrap();
        edit(&mut c);
        c
    };
    let good = issuer.token(&req("shop", "a"), now).unwrap();
    type Check = fn(&IdentityError) -> bool;
    let rows: Vec<(&str, String, Check)> = vec![
        ("garbage", "not-a-jwt".into(), |e| {
            matches!(e, IdentityError::Malformed(_))
        }),
        (
            "forged signature, real kid",
            forged(&good, &forger, &claims(&|_| {})),
            |e| matches!(e, IdentityError::BadSignature),
        ),
        (
            "signed by an unknown key",
            forger.token(&req("shop", "a"), now).unwrap(),
            |e| matches!(e, IdentityError::UnknownKid { .. }),
        ),
        (
            "expired beyond the leeway",
            issuer
                .sign(&claims(&|c| c["exp"] = json!(now.unix_timestamp() - 61)))
                .unwrap(),
            |e| matches!(e, IdentityError::Expired { .. }),
        ),
        (
            "foreign audience",
            issuer
                .sign(&claims(&|c| c["aud"] = json!(["vault"])))
                .unwrap(),
            |e| matches!(e, IdentityError::AudienceMismatch { .. }),
        ),
        (
            "foreign issuer",
            issuer
                .sign(&claims(&|c| c["iss"] = json!("https://evil.example")))
                .unwrap(),
            |e| matches!(e, IdentityError::WrongIssuer { .. }),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none"})),
                good.split('.').nth(1).unwrap()
            ),
            |e| matches!(e, IdentityError::AlgorithmNotAllowed { .. }),
        ),
    ];
    for (name, token, check) in rows {
        let err = v.validate(&Token::new(token)).await.expect_err(name);
        assert!(check(&err), "{name}: {err:?}");
    }
    assert_eq!(
        api.tokenreview_calls(),
        0,
        "nothing above reached TokenReview"
    );
    v.validate(&Token::new(good)).await.unwrap();
    assert_eq!(
        api.tokenreview_calls(),
        1,
        "the pod/SA question is still asked"
    );
    assert_eq!(
        v.key_fetch_count(),
        2,
        "one load, one gated unknown-kid refresh"
    );
}

/// Issue 8 item 22: the pre-check's leeway is configurable (default 60 s, the API server's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_precheck_leeway_is_configurable() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let issuer = DevIssuer::init(dir.path(), &api.shared.issuer, None).unwrap();
    let start = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let clock = ManualClock::new(start);
    let mut r = req("shop", "a");
    r.ttl = Duration::from_secs(600);
    let token = Token::new(issuer.token(&r, start).unwrap());
    clock.advance(Duration::from_secs(630));
    let mut cfg = TokenReviewConfig::new(ClusterId("Kubernetes".into()), td());
    let lenient =
        TokenReviewValidator::new(api.client().await, cfg.clone(), Arc::new(clock.clone()));
    lenient
        .validate(&token)
        .await
        .expect("30 s past exp is inside 60 s");
    cfg.leeway = Duration::ZERO;
    let strict = TokenReviewValidator::new(api.client().await, cfg, Arc::new(clock.clone()));
    let err = strict.validate(&token).await.unwrap_err();
    assert!(matches!(err, IdentityError::Expired { .. }), "{err:?}");
}

/// Issue 8 item 19: readiness asks whether meshid may `create tokenreviews`
/// (SelfSubjectAccessReview, as `kubectl auth can-i create tokenreviews` does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenreview_probe_checks_the_permission() {
    let api = FakeApiServer::start().await;
    let v = reviewer(&api, Arc::new(SystemClock), RateLimit::default()).await;
    v.probe().await.expect("allowed");
    let sent = api.shared.last_ssar.lock().unwrap().clone().unwrap();
    assert_eq!(sent["kind"], "SelfSubjectAccessReview");
    assert_eq!(
        sent["spec"]["resourceAttributes"],
        json!({"group": "authentication.k8s.io", "resource": "tokenreviews", "verb": "create"})
    );
    api.shared.ssar_allowed.store(false, Ordering::SeqCst);
    let why = v.probe().await.unwrap_err().to_string();
    assert!(
        why.contains("may not create tokenreviews") && why.contains("system:auth-delegator"),
        "{why}"
    );
}

/// Issue 8 item 20: keys and discovery from the API server with the kube client's credentials,
/// and the discovery document's issuer checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_from_the_api_server_use_the_kube_client_credentials() {
    let api = FakeApiServer::start().await;
    api.shared
        .discovery_requires_auth
        .store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let issuer = DevIssuer::init(dir.path(), &api.shared.issuer, None).unwrap();
    api.set_jwks(&issuer.jwks());
    let token = Token::new(
        issuer
            .token(&req("shop", "a"), OffsetDateTime::now_utc())
            .unwrap(),
    );
    let cfg = |iss: &str| {
        let mut c = JwtConfig::new(ClusterId("Kubernetes".into()), td(), Some(iss.into()));
        c.extra_ca_pem = Some(api.ca_pem.clone().into_bytes());
        c
    };
    // Anonymous OIDC discovery (the only way before) is refused by such a cluster.
    let anonymous = JwksValidator::new(
        cfg(&api.shared.issuer),
        JwksSource::Discovery(api.shared.issuer.clone()),
        Arc::new(SystemClock),
    )
    .unwrap();
    let err = anonymous.validate(&token).await.unwrap_err();
    assert!(
        matches!(&err, IdentityError::JwksUnavailable(m) if m.contains("401")),
        "{err:?}"
    );
    let v = JwksValidator::new(
        cfg(&api.shared.issuer),
        JwksSource::ApiServer(api.client().await),
        Arc::new(SystemClock),
    )
    .unwrap();
    assert_eq!(v.validate(&token).await.unwrap().service_account, "a");
    // A discovery document naming another issuer is not trusted.
    let other = JwksValidator::new(
        cfg("https://elsewhere.example"),
        JwksSource::ApiServer(api.client().await),
        Arc::new(SystemClock),
    )
    .unwrap();
    let err = other.validate(&token).await.unwrap_err();
    assert!(
        matches!(&err, IdentityError::JwksUnavailable(m) if m.contains("names issuer")),
        "{err:?}"
    );
}

/// Issue 8 item 10: keys that never loaded are not re-fetched on every request.
#[tokio::test]
async fn jwks_that_never_loaded_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let start = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let clock = ManualClock::new(start);
    let cfg = JwtConfig::new(ClusterId("c".into()), td(), Some("i".into()));
    let path = dir.path().join("missing.json");
    let v = JwksValidator::new(cfg, JwksSource::File(path), Arc::new(clock.clone())).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let issuer = DevIssuer::init(dir2.path(), "i", None).unwrap();
    let token = Token::new(issuer.token(&req("a", "b"), start).unwrap());
    for _ in 0..50 {
        let err = v.validate(&token).await.unwrap_err();
        assert!(matches!(err, IdentityError::JwksUnavailable(_)), "{err:?}");
    }
    assert_eq!(v.fetch_count(), 1, "requests during the backoff fail fast");
    let mut expected = 1;
    for wait in [1, 2, 4, 8] {
        clock.advance(Duration::from_secs(wait));
        v.validate(&token).await.unwrap_err();
        v.validate(&token).await.unwrap_err();
        expected += 1;
        assert_eq!(v.fetch_count(), expected, "one attempt after {wait}s");
    }
}

fn jwks_with(issuer: &DevIssuer, iss: &str) -> JwksValidator {
    let mut cfg = JwtConfig::new(ClusterId("Kubernetes".into()), td(), Some(iss.into()));
    cfg.allow_legacy_tokens = true;
    JwksValidator::new(
        cfg,
        JwksSource::Static(issuer.jwks()),
        Arc::new(SystemClock),
    )
    .unwrap()
}

/// Issue 8 item 18: legacy is "no kubernetes.io block and the legacy claims", not the `iss`;
/// and the audience is checked for legacy tokens too.
#[tokio::test]
async fn legacy_is_decided_by_the_claims_and_the_audience_is_always_checked() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = DevIssuer::init(dir.path(), "kubernetes/serviceaccount", None).unwrap();
    let now = OffsetDateTime::now_utc();
    let mut cfg = JwtConfig::new(
        ClusterId("Kubernetes".into()),
        td(),
        Some("kubernetes/serviceaccount".into()),
    );
    cfg.allow_legacy_tokens = false;
    let strict = JwksValidator::new(
        cfg,
        JwksSource::Static(issuer.jwks()),
        Arc::new(SystemClock),
    )
    .unwrap();
    let projected = Token::new(issuer.token(&req("shop", "a"), now).unwrap());
    let id = strict
        .validate(&projected)
        .await
        .expect("a projected token, whatever its iss");
    assert_eq!(id.service_account, "a");

    let lenient = jwks_with(&issuer, "https://kubernetes.default.svc");
    let legacy = |aud: serde_json::Value| {
        Token::new(
            issuer
                .sign(&json!({"iss": "kubernetes/serviceaccount", "aud": aud,
                    "kubernetes.io/serviceaccount/namespace": "shop",
                    "kubernetes.io/serviceaccount/service-account.name": "a",
                    "sub": "system:serviceaccount:shop:a"}))
                .unwrap(),
        )
    };
    let err = lenient
        .validate(&legacy(json!(["vault"])))
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdentityError::AudienceMismatch { .. }),
        "{err:?}"
    );
    let err = lenient.validate(&legacy(json!([]))).await.unwrap_err();
    assert!(
        matches!(err, IdentityError::AudienceMismatch { .. }),
        "{err:?}"
    );
    let id = lenient
        .validate(&legacy(json!(["istio-ca"])))
        .await
        .unwrap();
    assert_eq!((id.namespace.as_str(), id.expires_at), ("shop", None));
}

/// Issue 8 item 21: node without uid, several issuers.
#[tokio::test]
async fn node_without_uid_and_issuer_migration() {
    let dir = tempfile::tempdir().unwrap();
    let old_iss = "https://kubernetes.default.svc";
    let new_iss = "https://oidc.example/cluster-1";
    let issuer = DevIssuer::init(dir.path(), old_iss, None).unwrap();
    let now = OffsetDateTime::now_utc();
    let mut cfg = JwtConfig::new(ClusterId("Kubernetes".into()), td(), Some(old_iss.into()));
    cfg.issuers.push(new_iss.into());
    let v = JwksValidator::new(
        cfg,
        JwksSource::Static(issuer.jwks()),
        Arc::new(SystemClock),
    )
    .unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = serde_json::to_value(issuer.claims(&req("shop", "a"), now)).unwrap();
        edit(&mut c);
        Token::new(issuer.sign(&c).unwrap())
    };
    // The API server drops node.uid when the Node is gone (kube pkg/serviceaccount/claims.go).
    let no_uid = with(&|c| c["kubernetes.io"]["node"] = json!({"name": "node-1"}));
    v.validate(&no_uid).await.expect("node without uid is fine");
    v.validate(&with(&|c| c["iss"] = json!(new_iss)))
        .await
        .expect("second issuer");
    let err = v
        .validate(&with(&|c| c["iss"] = json!("https://third.example")))
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::WrongIssuer { .. }), "{err:?}");
}

/// Issue 17 item 10: an ES512 token (a kube-apiserver whose service-account key is P-521 signs
/// them: kube `pkg/serviceaccount/jwt.go` `signerFromECDSAPrivateKey`) made outside meshid, by
/// the `openssl` CLI, verifies against its published P-521 JWK; a tampered one, a P-521
/// signature under another key, and ES512 with a P-256 key are refused.
#[tokio::test]
async fn es512_tokens_made_by_openssl_verify() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("p521.pem");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("the openssl binary (installed by .ci/run) runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let k = key.to_str().unwrap();
    openssl(&[
        "ecparam",
        "-name",
        "secp521r1",
        "-genkey",
        "-noout",
        "-out",
        k,
    ]);
    let spki = openssl(&["ec", "-in", k, "-pubout", "-outform", "DER"]);
    let point = &spki[spki.len() - 133..];
    assert_eq!(point[0], 4, "uncompressed point");
    let jwk = |kid: &str, point: &[u8]| Jwk {
        kty: "EC".into(),
        kid: Some(kid.into()),
        alg: Some("ES512".into()),
        use_: Some("sig".into()),
        n: None,
        e: None,
        crv: Some("P-521".into()),
        x: Some(URL_SAFE_NO_PAD.encode(&point[1..67])),
        y: Some(URL_SAFE_NO_PAD.encode(&point[67..])),
    };
    let iss = "https://kubernetes.default.svc";
    let issuer = DevIssuer::init(dir.path(), iss, None).unwrap();
    let mut set = issuer.jwks();
    set.keys.push(jwk("p521", point));
    let cfg = JwtConfig::new(ClusterId("Kubernetes".into()), td(), Some(iss.into()));
    let v = JwksValidator::new(cfg, JwksSource::Static(set), Arc::new(SystemClock)).unwrap();
    let claims =
        serde_json::to_value(issuer.claims(&req("shop", "a"), OffsetDateTime::now_utc())).unwrap();
    let signing_input = format!(
        "{}.{}",
        b64(&json!({"alg": "ES512", "kid": "p521", "typ": "JWT"})),
        b64(&claims)
    );
    let input_file = dir.path().join("input");
    std::fs::write(&input_file, &signing_input).unwrap();
    let der = openssl(&["dgst", "-sha512", "-sign", k, input_file.to_str().unwrap()]);
    let token = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(jws_from_der(&der, 66))
    );
    let id = v
        .validate(&Token::new(token.clone()))
        .await
        .expect("an openssl-signed ES512 token verifies");
    assert_eq!(
        id.spiffe_id.to_string(),
        "spiffe://cluster.local/ns/shop/sa/a"
    );

    let mut tampered = token.clone().into_bytes();
    let at = signing_input.len() + 10;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let err = v
        .validate(&Token::new(String::from_utf8(tampered).unwrap()))
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::BadSignature), "{err:?}");

    let p256 = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "ES512", "kid": issuer.jwks().keys[0].kid.clone().unwrap()})),
        b64(&claims),
        URL_SAFE_NO_PAD.encode([0u8; 132])
    );
    let err = v.validate(&Token::new(p256)).await.unwrap_err();
    assert!(
        matches!(err, IdentityError::AlgorithmNotAllowed { .. }),
        "ES512 with a P-256 key: {err:?}"
    );
}

/// An ECDSA DER signature (SEQUENCE of two INTEGERs) as JWS r ‖ s, each `w` bytes.
fn jws_from_der(der: &[u8], w: usize) -> Vec<u8> {
    fn len(d: &[u8], at: &mut usize) -> usize {
        let first = d[*at] as usize;
        *at += 1;
        if first < 0x80 {
            return first;
        }
        let n = first & 0x7f;
        let mut l = 0;
        for _ in 0..n {
            l = (l << 8) | d[*at] as usize;
            *at += 1;
        }
        l
    }
    let mut at = 1;
    len(der, &mut at);
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[at], 2, "INTEGER");
        at += 1;
        let l = len(der, &mut at);
        let int = &der[at..at + l];
        at += l;
        let int = &int[int.iter().take_while(|b| **b == 0).count()..];
        out.extend(std::iter::repeat_n(0u8, w - int.len()));
        out.extend_from_slice(int);
    }
    out
}

/// Issue 8 item 17: stock sidecars send `ClusterID: Kubernetes`; a renamed cluster keeps
/// answering to its old name through an alias (istiod `getKubeClient`: name, then alias).
#[tokio::test]
async fn cluster_aliases_route_to_the_renamed_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = DevIssuer::init(dir.path(), "i", None).unwrap();
    let v: Arc<dyn TokenValidator> = Arc::new(jwks_with(&issuer, "i"));
    let router = ClusterRouter::new(ClusterId("Kubernetes".into()), v.clone())
        .with_cluster(ClusterId("east".into()), v)
        .with_alias("primary", ClusterId("Kubernetes".into()));
    let token = Token::new(
        issuer
            .token(&req("a", "b"), OffsetDateTime::now_utc())
            .unwrap(),
    );
    for name in [None, Some("Kubernetes"), Some("primary"), Some("east")] {
        router.validate(name, &token).await.unwrap();
    }
    let err = router.validate(Some("west"), &token).await.unwrap_err();
    assert!(matches!(err, IdentityError::UnknownCluster { .. }));
    let cfg = meshid::config::Config::from_toml(include_str!("../../deploy/meshid.toml")).unwrap();
    assert_eq!(
        cfg.default_cluster().name,
        "Kubernetes",
        "the example matches stock sidecars"
    );
}
