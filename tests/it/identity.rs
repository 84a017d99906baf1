//! Identity: the bad-token matrix (JWKS and TokenReview), cache and single-flight, the rate
//! limit, OIDC discovery with key rotation, cluster routing, and `meshid token verify`.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use meshid::{
    clock::{Clock, ManualClock, SystemClock},
    identity::{
        dev_issuer::{DevIssuer, TokenRequest},
        CacheConfig, CachingValidator, ClusterId, ClusterRouter, IdentityError, JwksSource,
        JwksValidator, JwtConfig, RateLimit, Token, TokenReviewConfig, TokenReviewMode,
        TokenReviewValidator, TokenValidator,
    },
};
use serde_json::json;
use time::OffsetDateTime;

use crate::{
    fake_apiserver::{FakeApiServer, Reply},
    support::td,
};

fn issuer_in(dir: &std::path::Path) -> DevIssuer {
    DevIssuer::init(dir, "https://kubernetes.default.svc.cluster.local", None).unwrap()
}

fn req(ns: &str, sa: &str) -> TokenRequest {
    TokenRequest {
        namespace: ns.into(),
        service_account: sa.into(),
        audiences: vec!["istio-ca".into()],
        ttl: Duration::from_secs(3600),
        pod: Some(("product-7d4b9".into(), "2f1e-uid".into())),
    }
}

fn jwks_validator(issuer: &DevIssuer, clock: Arc<dyn Clock>) -> JwksValidator {
    let cfg = JwtConfig::new(
        ClusterId("Kubernetes".into()),
        td(),
        Some(issuer.issuer().into()),
    );
    JwksValidator::new(cfg, JwksSource::Static(issuer.jwks()), clock).unwrap()
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[tokio::test]
async fn jwks_accepts_a_projected_token() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = issuer_in(dir.path());
    let v = jwks_validator(&issuer, Arc::new(SystemClock));
    let token = Token::new(
        issuer
            .token(&req("shop", "product-service"), OffsetDateTime::now_utc())
            .unwrap(),
    );
    let id = v.validate(&token).await.unwrap();
    assert_eq!(
        id.spiffe_id.to_string(),
        "spiffe://cluster.local/ns/shop/sa/product-service"
    );
    assert_eq!(
        (id.namespace.as_str(), id.service_account.as_str()),
        ("shop", "product-service")
    );
    assert_eq!(id.pod.unwrap().name, "product-7d4b9");
    assert_eq!(id.cluster, ClusterId("Kubernetes".into()));
    assert!(id.expires_at.is_some());
    assert_eq!(format!("{token:?}"), "Token([redacted])");
}

/// Every row is refused with its own error kind, and nothing panics.
#[tokio::test]
async fn jwks_bad_token_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = issuer_in(dir.path());
    let other_dir = tempfile::tempdir().unwrap();
    let stranger = issuer_in(other_dir.path());
    let now = OffsetDateTime::now_utc();
    let v = jwks_validator(&issuer, Arc::new(SystemClock));
    let good = issuer.token(&req("shop", "a"), now).unwrap();
    let claims = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = serde_json::to_value(issuer.claims(&req("shop", "a"), now)).unwrap();
        edit(&mut c);
        issuer.sign(&c).unwrap()
    };
    let parts: Vec<&str> = good.split('.').collect();
    let jwk = serde_json::to_vec(&issuer.jwks()).unwrap();
    let hs256 = {
        let input = format!(
            "{}.{}",
            b64(&json!({"alg": "HS256", "kid": issuer.kid()})),
            parts[1]
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &jwk);
        format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, input.as_bytes()))
        )
    };
    let other_payload =
        b64(&serde_json::to_value(issuer.claims(&req("kube-system", "admin"), now)).unwrap());
    let legacy = issuer
        .sign(&json!({"iss": "kubernetes/serviceaccount", "kubernetes.io/serviceaccount/namespace": "shop",
            "kubernetes.io/serviceaccount/service-account.name": "a", "sub": "system:serviceaccount:shop:a"}))
        .unwrap();
    type Check = fn(&IdentityError) -> bool;
    let rows: Vec<(&str, String, Check)> = vec![
        (
            "expired",
            claims(&|c| {
                c["exp"] = json!(now.unix_timestamp() - 3600);
                c["iat"] = json!(now.unix_timestamp() - 7200);
            }),
            |e| matches!(e, IdentityError::Expired { .. }),
        ),
        (
            "not yet valid",
            claims(&|c| c["nbf"] = json!(now.unix_timestamp() + 3600)),
            |e| matches!(e, IdentityError::NotYetValid { .. }),
        ),
        (
            "wrong audience",
            claims(&|c| c["aud"] = json!(["kubernetes"])),
            |e| matches!(e, IdentityError::AudienceMismatch { .. }),
        ),
        (
            "wrong issuer",
            claims(&|c| c["iss"] = json!("https://evil.example")),
            |e| matches!(e, IdentityError::WrongIssuer { .. }),
        ),
        (
            "alg none",
            format!("{}.{}.", b64(&json!({"alg": "none"})), parts[1]),
            |e| matches!(e, IdentityError::AlgorithmNotAllowed { alg } if alg == "none"),
        ),
        (
            "HS256 signed with the public key",
            hs256,
            |e| matches!(e, IdentityError::AlgorithmNotAllowed { alg } if alg == "HS256"),
        ),
        (
            "unknown kid",
            stranger.token(&req("shop", "a"), now).unwrap(),
            |e| matches!(e, IdentityError::UnknownKid { .. }),
        ),
        (
            "tampered payload",
            format!("{}.{}.{}", parts[0], other_payload, parts[2]),
            |e| matches!(e, IdentityError::BadSignature),
        ),
        (
            "bad base64",
            format!("{}.{}.!!!", parts[0], parts[1]),
            |e| matches!(e, IdentityError::Malformed(_)),
        ),
        ("three dots of garbage", "...".into(), |e| {
            matches!(e, IdentityError::Malformed(_))
        }),
        ("three parts of garbage", "a.b.c".into(), |e| {
            matches!(e, IdentityError::Malformed(_))
        }),
        ("1 MiB token", "a".repeat(1 << 20), |e| {
            matches!(e, IdentityError::TooLarge { .. })
        }),
        ("legacy token", legacy, |e| {
            matches!(e, IdentityError::LegacyToken)
        }),
        (
            "no kubernetes.io claims",
            claims(&|c| {
                c.as_object_mut().unwrap().remove("kubernetes.io");
            }),
            |e| matches!(e, IdentityError::MissingClaim("kubernetes.io")),
        ),
        (
            "no exp",
            claims(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            |e| matches!(e, IdentityError::MissingClaim("exp")),
        ),
        (
            "sub of another account",
            claims(&|c| c["sub"] = json!("system:serviceaccount:kube-system:admin")),
            |e| matches!(e, IdentityError::NotServiceAccount(_)),
        ),
        ("empty", String::new(), |e| {
            matches!(e, IdentityError::NoToken)
        }),
    ];
    for (name, token, check) in rows {
        let err = v.validate(&Token::new(token)).await.expect_err(name);
        assert!(check(&err), "{name}: wrong error kind: {err:?}");
    }
}

#[tokio::test]
async fn unknown_kid_refreshes_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = issuer_in(dir.path());
    let cfg = JwtConfig::new(ClusterId("c".into()), td(), Some(issuer.issuer().into()));
    let v = JwksValidator::new(
        cfg,
        JwksSource::File(DevIssuer::jwks_path(dir.path())),
        Arc::new(SystemClock),
    )
    .unwrap();
    let good = Token::new(
        issuer
            .token(&req("a", "b"), OffsetDateTime::now_utc())
            .unwrap(),
    );
    v.validate(&good).await.unwrap();
    let before = v.fetch_count();
    for i in 0..200 {
        let bogus = format!(
            "{}.{}.AAAA",
            b64(&json!({"alg": "ES256", "kid": format!("bogus-{i}")})),
            good.secret_str().split('.').nth(1).unwrap()
        );
        assert!(matches!(
            v.validate(&Token::new(bogus)).await,
            Err(IdentityError::UnknownKid { .. })
        ));
    }
    assert!(
        v.fetch_count() - before <= 1,
        "a flood of bogus kids fetched keys {} times",
        v.fetch_count() - before
    );
}

async fn reviewer(
    api: &FakeApiServer,
    clock: Arc<dyn Clock>,
    rate: RateLimit,
) -> TokenReviewValidator {
    let mut cfg = TokenReviewConfig::new(ClusterId("Kubernetes".into()), td());
    cfg.rate = rate;
    cfg.timeout = Duration::from_secs(2);
    TokenReviewValidator::new(api.client().await, cfg, clock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenreview_through_the_kube_client() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let issuer = issuer_in(dir.path());
    let v = reviewer(&api, Arc::new(SystemClock), RateLimit::default()).await;
    let token = Token::new(
        issuer
            .token(&req("shop", "inventory-service"), OffsetDateTime::now_utc())
            .unwrap(),
    );
    let id = v.validate(&token).await.unwrap();
    assert_eq!(
        id.spiffe_id.to_string(),
        "spiffe://cluster.local/ns/shop/sa/inventory-service"
    );
    assert_eq!(id.pod.unwrap().uid, "2f1e-uid");
    let sent = api.shared.last_review.lock().unwrap().clone().unwrap();
    assert_eq!(sent["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(sent["kind"], "TokenReview");
    assert_eq!(sent["spec"]["audiences"], json!(["istio-ca"]));
    assert_eq!(api.tokenreview_calls(), 1);
}

/// The TokenReview half of the matrix: the API server's answer decides, and meshid fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenreview_refusals() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let issuer = issuer_in(dir.path());
    let v = reviewer(&api, Arc::new(SystemClock), RateLimit::default()).await;
    let token = Token::new(
        issuer
            .token(&req("shop", "a"), OffsetDateTime::now_utc())
            .unwrap(),
    );
    type Check = fn(&IdentityError) -> bool;
    let user =
        json!({"username": "system:serviceaccount:shop:a", "groups": ["system:serviceaccounts"]});
    let rows: Vec<(&str, Reply, Check)> = vec![
        (
            "authenticated: false",
            Reply::Status(json!({"authenticated": false, "error": "invalid bearer token"})),
            |e| matches!(e, IdentityError::ReviewNotAuthenticated { error: Some(_) }),
        ),
        (
            "audience-unaware authenticator",
            Reply::Status(
                json!({"authenticated": true, "user": user, "audiences": ["https://kubernetes.default.svc"]}),
            ),
            |e| matches!(e, IdentityError::ReviewAudienceMismatch { .. }),
        ),
        (
            "no audiences at all",
            Reply::Status(json!({"authenticated": true, "user": user})),
            |e| matches!(e, IdentityError::ReviewAudienceMismatch { .. }),
        ),
        (
            "not a service account",
            Reply::Status(json!({"authenticated": true, "audiences": ["istio-ca"],
            "user": {"username": "alice", "groups": ["system:authenticated"]}})),
            |e| matches!(e, IdentityError::NotServiceAccount(_)),
        ),
        (
            "service account outside the group",
            Reply::Status(json!({"authenticated": true, "audiences": ["istio-ca"],
            "user": {"username": "system:serviceaccount:shop:a", "groups": []}})),
            |e| matches!(e, IdentityError::NotServiceAccount(_)),
        ),
        (
            "API server error",
            Reply::Error(500, "etcd is down".into()),
            |e| matches!(e, IdentityError::TokenReviewFailed(m) if m.contains("etcd is down")),
        ),
        (
            "meshid may not create TokenReviews",
            Reply::Error(
                403,
                "tokenreviews.authentication.k8s.io is forbidden".into(),
            ),
            |e| matches!(e, IdentityError::TokenReviewFailed(m) if m.contains("HTTP 403") && m.contains("forbidden")),
        ),
    ];
    for (name, reply, check) in rows {
        api.set_reviewer(move |_, _| reply.clone());
        let err = v.validate(&token).await.expect_err(name);
        assert!(check(&err), "{name}: wrong error kind: {err:?}");
        assert!(err.to_string().len() > 10);
    }
    // Slowness past the deadline is a clear failure, not a hang.
    api.set_reviewer(crate::fake_apiserver::reviewer_from_claims);
    api.set_delay(Duration::from_secs(5));
    let err = v.validate(&token).await.unwrap_err();
    assert!(
        matches!(&err, IdentityError::TokenReviewFailed(m) if m.contains("no answer within")),
        "{err:?}"
    );
    // A legacy token is refused without spending an API call.
    let calls = api.tokenreview_calls();
    let legacy = issuer.sign(&json!({"iss": "kubernetes/serviceaccount", "kubernetes.io/serviceaccount/namespace": "shop"})).unwrap();
    assert!(matches!(
        v.validate(&Token::new(legacy)).await,
        Err(IdentityError::LegacyToken)
    ));
    assert_eq!(api.tokenreview_calls(), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_make_no_call_and_expired_tokens_are_refused() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let issuer = issuer_in(dir.path());
    let start = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let clock = ManualClock::new(start);
    let v = reviewer(&api, Arc::new(clock.clone()), RateLimit::default()).await;
    let cached = CachingValidator::new(
        v,
        CacheConfig {
            ttl: Duration::from_secs(7200),
            max_entries: 10,
            ..CacheConfig::default()
        },
        Arc::new(clock.clone()),
    );
    let mut r = req("shop", "a");
    r.ttl = Duration::from_secs(600);
    let token = Token::new(issuer.token(&r, start).unwrap());
    cached.validate(&token).await.unwrap();
    cached.validate(&token).await.unwrap();
    assert_eq!(
        api.tokenreview_calls(),
        1,
        "second validation served from the cache"
    );
    // Within the API server's 60 s leeway (go-jose `ValidateWithLeeway` in kube
    // `pkg/serviceaccount/claims.go`) the token is still good: the old pre-check refused it.
    clock.advance(Duration::from_secs(630));
    cached.validate(&token).await.unwrap();
    assert_eq!(api.tokenreview_calls(), 2, "the cache entry ended at exp");
    clock.advance(Duration::from_secs(31));
    let err = cached.validate(&token).await.unwrap_err();
    assert!(matches!(err, IdentityError::Expired { .. }), "{err:?}");
    assert_eq!(
        api.tokenreview_calls(),
        2,
        "an expired token costs no API call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_validations_make_one_call() {
    let api = FakeApiServer::start().await;
    api.set_delay(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let issuer = issuer_in(dir.path());
    let v = reviewer(&api, Arc::new(SystemClock), RateLimit::default()).await;
    let cached = Arc::new(CachingValidator::new(
        v,
        CacheConfig::default(),
        Arc::new(SystemClock),
    ));
    let token = Token::new(
        issuer
            .token(&req("shop", "a"), OffsetDateTime::now_utc())
            .unwrap(),
    );
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (c, t) = (cached.clone(), token.clone());
            tokio::spawn(async move { c.validate(&t).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(api.tokenreview_calls(), 1);
    assert_eq!(cached.inner().call_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_refused_as_overloaded() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let issuer = issuer_in(dir.path());
    let rate = RateLimit {
        qps: 2.0,
        burst: 1,
        max_queue: 2,
        max_queue_per_peer: 100,
    };
    let v = Arc::new(reviewer(&api, Arc::new(SystemClock), rate).await);
    let now = OffsetDateTime::now_utc();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let v = v.clone();
            let token = Token::new(issuer.token(&req("shop", &format!("sa-{i}")), now).unwrap());
            tokio::spawn(async move { v.validate(&token).await })
        })
        .collect();
    let mut ok = 0;
    let mut overloaded = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(IdentityError::Overloaded(m)) => {
                assert!(m.contains("queued"), "{m}");
                overloaded += 1
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        (ok, overloaded),
        (3, 5),
        "1 at once + 2 queued; the rest refused at once"
    );
    assert_eq!(api.tokenreview_calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_discovery_and_key_rotation() {
    let api = FakeApiServer::start().await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let old = DevIssuer::init(d1.path(), &api.shared.issuer, None).unwrap();
    let new = DevIssuer::init(d2.path(), &api.shared.issuer, None).unwrap();
    api.set_jwks(&old.jwks());
    let mut cfg = JwtConfig::new(ClusterId("c".into()), td(), Some(api.shared.issuer.clone()));
    cfg.extra_ca_pem = Some(api.ca_pem.clone().into_bytes());
    cfg.unknown_kid_min_interval = Duration::ZERO;
    let v = JwksValidator::new(
        cfg,
        JwksSource::Discovery(api.shared.issuer.clone()),
        Arc::new(SystemClock),
    )
    .unwrap();
    let now = OffsetDateTime::now_utc();
    v.validate(&Token::new(old.token(&req("a", "b"), now).unwrap()))
        .await
        .unwrap();
    // The issuer rotates its key: a token with the new kid triggers a refresh and verifies.
    let mut both = old.jwks();
    both.keys.extend(new.jwks().keys);
    api.set_jwks(&both);
    let id = v
        .validate(&Token::new(new.token(&req("a", "c"), now).unwrap()))
        .await
        .unwrap();
    assert_eq!(id.service_account, "c");
    assert_eq!(api.shared.jwks_fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unknown_cluster_names_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = issuer_in(dir.path());
    let v: Arc<dyn TokenValidator> = Arc::new(jwks_validator(&issuer, Arc::new(SystemClock)));
    let router = ClusterRouter::new(ClusterId("Kubernetes".into()), v.clone())
        .with_cluster(ClusterId("east".into()), v);
    let token = Token::new(
        issuer
            .token(&req("a", "b"), OffsetDateTime::now_utc())
            .unwrap(),
    );
    router.validate(None, &token).await.unwrap();
    router.validate(Some("east"), &token).await.unwrap();
    let err = router.validate(Some("west"), &token).await.unwrap_err();
    assert_eq!(
        err,
        IdentityError::UnknownCluster {
            got: "west".into(),
            known: vec!["Kubernetes".into(), "east".into()]
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_verify_cli() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig_yaml()).unwrap();
    let issuer_dir = dir.path().join("issuer");
    let out = crate::support::meshid(&[
        "dev",
        "issuer",
        "init",
        "--dir",
        issuer_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let out = crate::support::meshid(&[
        "dev",
        "token",
        "--issuer-dir",
        issuer_dir.to_str().unwrap(),
        "--namespace",
        "shop",
        "--service-account",
        "product-service",
        "--ttl",
        "10m",
    ]);
    let token = String::from_utf8(out.stdout).unwrap();
    let run = |args: Vec<&str>| {
        let mut cmd = vec!["token", "verify"];
        cmd.extend(args);
        crate::support::meshid(&cmd)
    };
    let jwks = issuer_dir.join("jwks.json");
    let kc = kubeconfig.to_str().unwrap().to_owned();
    let token2 = token.clone();
    let o = tokio::task::spawn_blocking(move || run(vec!["--kubeconfig", &kc, token2.trim()]))
        .await
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout)
        .contains("valid: spiffe://cluster.local/ns/shop/sa/product-service"));
    let o = run(vec![
        "--jwks",
        jwks.to_str().unwrap(),
        "--issuer",
        "https://kubernetes.default.svc.cluster.local",
        token.trim(),
    ]);
    assert!(o.status.success());
    let o = run(vec![
        "--jwks",
        jwks.to_str().unwrap(),
        "--audience",
        "vault",
        token.trim(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("refused: token audiences [\"istio-ca\"] include none of [\"vault\"]"),
        "{stdout}"
    );
}

#[tokio::test]
async fn stale_keys_keep_serving_while_refreshed_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = issuer_in(dir.path());
    let mut cfg = JwtConfig::new(ClusterId("c".into()), td(), Some(issuer.issuer().into()));
    cfg.refresh_interval = Duration::ZERO; // always stale
    let path = DevIssuer::jwks_path(dir.path());
    let v = JwksValidator::new(cfg, JwksSource::File(path.clone()), Arc::new(SystemClock)).unwrap();
    let token = Token::new(
        issuer
            .token(&req("a", "b"), OffsetDateTime::now_utc())
            .unwrap(),
    );
    v.validate(&token).await.unwrap();
    assert_eq!(v.fetch_count(), 1);
    // The key source goes away: refreshes fail, the keys already fetched keep serving.
    std::fs::remove_file(&path).unwrap();
    for _ in 0..3 {
        v.validate(&token).await.unwrap();
        tokio::task::yield_now().await;
    }
    for _ in 0..100 {
        if v.fetch_count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(v.fetch_count() >= 2, "a background refresh was attempted");
}

/// Validates `token()` until it is refused as invalidated (within 5 s); the reason.
async fn invalidated_within(v: &dyn TokenValidator, token: impl Fn() -> Token) -> String {
    let t = std::time::Instant::now();
    loop {
        match v.validate(&token()).await {
            Ok(_) if t.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(IdentityError::Invalidated(why)) => return why,
            other => panic!("the token must be refused as invalidated within 5 s, got {other:?}"),
        }
    }
}

/// `[clusters.tokenreview] mode = "local"` on the fake API server (the real one:
/// `kube_real::identity`): the pod and service account from meshid's own metadata watch, judged
/// with kube-apiserver's rule (`pkg/serviceaccount/claims.go`, `validator.Validate`). A token
/// whose pod and account the watch holds costs no TokenReview; an unseen pod goes to TokenReview;
/// a deleted pod, a pod deleted more than 60 s ago but not yet removed, and a service account
/// recreated under its name are refused locally, a cached identity included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_judges_the_bound_pod_and_service_account_from_its_own_watch() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let issuer = issuer_in(dir.path());
    api.set_jwks(&issuer.jwks());
    let sa_uid = meshid::identity::dev_issuer::service_account_uid("shop", "product-service");
    let account = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"namespace": "shop", "name": "product-service", "uid": sa_uid}});
    let pod = |name: &str, uid: &str, deleting: Option<&str>| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "shop", "name": name, "uid": uid, "deletionTimestamp": deleting},
            "spec": {"serviceAccountName": "product-service", "containers": [{"name": "app"}]}})
    };
    api.put(account.clone());
    api.put(pod("p-0", "uid-0", None));
    api.put(pod("p-1", "uid-1", None));
    let long_ago = (OffsetDateTime::now_utc() - Duration::from_secs(61))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    api.put(pod("stuck", "uid-stuck", Some(&long_ago)));

    let mut cfg = TokenReviewConfig::new(ClusterId("Kubernetes".into()), td());
    cfg.mode = TokenReviewMode::Local;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let v = CachingValidator::new(
        TokenReviewValidator::new(api.client().await, cfg, clock.clone()),
        CacheConfig::default(),
        clock,
    );
    let t = std::time::Instant::now();
    while !v.inner().bindings_synced() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "watches never synced"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let token = |pod: &str, uid: &str| {
        let mut r = req("shop", "product-service");
        r.pod = Some((pod.into(), uid.into()));
        Token::new(issuer.token(&r, OffsetDateTime::now_utc()).unwrap())
    };

    let id = v.validate(&token("p-0", "uid-0")).await.unwrap();
    assert_eq!(id.service_account_uid.as_deref(), Some(sa_uid.as_str()));
    assert_eq!((api.tokenreview_calls(), v.inner().local_count()), (0, 1));

    // Not seen by the watch: the API server decides.
    v.validate(&token("p-new", "uid-new")).await.unwrap();
    assert_eq!(api.tokenreview_calls(), 1);

    // Deleted more than the leeway ago and still there (a stuck kubelet): refused.
    match v.validate(&token("stuck", "uid-stuck")).await {
        Err(IdentityError::Invalidated(why)) => assert!(why.contains("awaits removal"), "{why}"),
        other => panic!("{other:?}"),
    }

    // The pod deleted: the cached identity is refused once the watch delivers it.
    api.delete(&pod("p-0", "uid-0", None));
    let why = invalidated_within(&v, || token("p-0", "uid-0")).await;
    assert!(
        why.contains("pod shop/p-0 (uid uid-0) was deleted"),
        "{why}"
    );

    // The service account recreated under its name (a new UID): the old one's tokens are refused.
    let judged = v.inner().local_count();
    v.validate(&token("p-1", "uid-1")).await.unwrap();
    assert_eq!(
        (api.tokenreview_calls(), v.inner().local_count()),
        (1, judged + 1)
    );
    let mut renewed = account.clone();
    renewed["metadata"]["uid"] = json!("another-uid");
    api.put(renewed);
    let why = invalidated_within(&v, || token("p-1", "uid-1")).await;
    assert!(
        why.contains("service account shop/product-service"),
        "{why}"
    );
    assert_eq!(api.tokenreview_calls(), 1, "every refusal was local");
}
