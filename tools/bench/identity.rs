//! Identity benchmark: token validations per second for JWKS cold (signature verified every
//! time), cache hit, and TokenReview against the fake apiserver over real HTTPS through the
//! real `kube` client, next to the raw ring RS256 verify rate measured in the same run.
//!
//! Run: `cargo bench --bench identity` (optionally `-- --seconds 3`). Needs the `openssl`
//! binary to make an RSA-2048 signing key (ring cannot generate RSA keys).

#[path = "common.rs"]
mod common;

#[path = "../../tests/it/fake_apiserver.rs"]
#[allow(dead_code)]
mod fake_apiserver;

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use meshid::{
    clock::SystemClock,
    identity::{
        dev_issuer::{DevIssuer, TokenRequest},
        CacheConfig, CachingValidator, ClusterId, JwksSource, JwksValidator, JwtConfig, RateLimit,
        Token, TokenReviewConfig, TokenReviewValidator, TokenValidator,
    },
    spiffe::TrustDomain,
};
use time::OffsetDateTime;

async fn rate_async<F: std::future::Future<Output = ()>>(
    budget: Duration,
    mut op: impl FnMut(usize) -> F,
) -> f64 {
    for i in 0..20 {
        op(i).await;
    }
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < budget {
        for _ in 0..256 {
            op(n).await;
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn req(sa: &str) -> TokenRequest {
    TokenRequest {
        namespace: "bench".into(),
        service_account: sa.into(),
        audiences: vec!["istio-ca".into()],
        ttl: Duration::from_secs(3600),
        pod: Some(("pod-0".into(), "uid-0".into())),
    }
}

fn main() {
    let budget = common::seconds_arg();
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("openssl")
        .args(["genrsa", "-out", "sa.key", "2048"])
        .current_dir(dir.path())
        .output()
        .expect("the openssl binary makes the RSA key for this benchmark");
    assert!(status.status.success());
    let issuer = DevIssuer::init(
        &dir.path().join("issuer"),
        "https://kubernetes.default.svc",
        Some(&dir.path().join("sa.key")),
    )
    .unwrap();
    let now = OffsetDateTime::now_utc();
    let token_text = issuer.token(&req("sa-0"), now).unwrap();
    let token = Token::new(token_text.clone());
    let td = TrustDomain::new("cluster.local").unwrap();

    // Raw ring RS256 verify of the same token.
    let (input, sig) = token_text.rsplit_once('.').unwrap();
    let sig =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig).unwrap();
    let jwk = &issuer.jwks().keys[0];
    let dec = |s: &Option<String>| {
        base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            s.as_ref().unwrap(),
        )
        .unwrap()
    };
    let (n, e) = (dec(&jwk.n), dec(&jwk.e));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let raw = rt.block_on(rate_async(budget, |_| {
        let key = ring::signature::RsaPublicKeyComponents { n: &n, e: &e };
        key.verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            black_box(input.as_bytes()),
            black_box(&sig),
        )
        .unwrap();
        async {}
    }));

    let cfg = JwtConfig::new(
        ClusterId("bench".into()),
        td.clone(),
        Some(issuer.issuer().into()),
    );
    let jwks = Arc::new(
        JwksValidator::new(
            cfg,
            JwksSource::Static(issuer.jwks()),
            Arc::new(SystemClock),
        )
        .unwrap(),
    );
    let cold = rt.block_on(rate_async(budget, |_| {
        let (v, t) = (jwks.clone(), token.clone());
        async move {
            black_box(v.validate(&t).await.unwrap());
        }
    }));

    let cfg = JwtConfig::new(
        ClusterId("bench".into()),
        td.clone(),
        Some(issuer.issuer().into()),
    );
    let inner = JwksValidator::new(
        cfg,
        JwksSource::Static(issuer.jwks()),
        Arc::new(SystemClock),
    )
    .unwrap();
    let cached = CachingValidator::new(inner, CacheConfig::default(), Arc::new(SystemClock));
    let hit = rt.block_on(rate_async(budget, |_| {
        let (v, t) = (&cached, &token);
        async move {
            black_box(v.validate(t).await.unwrap());
        }
    }));

    // TokenReview: 32 callers with distinct tokens, no cache, limiter wide open.
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (tr_rate, tr_calls) = mt.block_on(async {
        let api = fake_apiserver::FakeApiServer::start().await;
        let mut cfg = TokenReviewConfig::new(ClusterId("bench".into()), td.clone());
        cfg.rate = RateLimit {
            qps: 1e6,
            burst: 1_000_000,
            max_queue: 1_000_000,
            max_queue_per_peer: 1_000_000,
        };
        let v = Arc::new(TokenReviewValidator::new(
            api.client().await,
            cfg,
            Arc::new(SystemClock),
        ));
        let tokens: Arc<Vec<Token>> = Arc::new(
            (0..256)
                .map(|i| Token::new(issuer.token(&req(&format!("sa-{i}")), now).unwrap()))
                .collect(),
        );
        let start = Instant::now();
        let workers: Vec<_> = (0..32)
            .map(|w| {
                let (v, tokens) = (v.clone(), tokens.clone());
                tokio::spawn(async move {
                    let mut n = 0usize;
                    while start.elapsed() < budget {
                        v.validate(&tokens[(w * 8 + n) % tokens.len()])
                            .await
                            .unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut total = 0;
        for w in workers {
            total += w.await.unwrap();
        }
        (
            total as f64 / start.elapsed().as_secs_f64(),
            api.tokenreview_calls(),
        )
    });

    println!(
        "meshid identity benchmark ({:.1}s per measurement)",
        budget.as_secs_f64()
    );
    println!("  ring RS256 verify (raw)                 {raw:>12.0} /s   (one core)");
    println!("  JWKS cold, RS256 verified every time    {cold:>12.0} /s   ratio {:.2} of raw verify (one core)", cold / raw);
    println!("  cache hit                               {hit:>12.0} /s   (one core)");
    println!("  TokenReview via fake apiserver (HTTPS)  {tr_rate:>12.0} /s   ({tr_calls} calls; client and server share 2 cores)");
}
