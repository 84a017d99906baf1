//! `[[clusters]]`: whose service-account tokens are accepted and how each cluster's are
//! validated (TokenReview or JWKS), with their checks.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{RateLimit, DEFAULT_AUDIENCE};
use crate::duration::fmt_duration;

fn default_true() -> bool {
    true
}

/// One cluster: how its tokens are validated.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// The `ClusterID` callers name (stock Istio sidecars send `Kubernetes`).
    pub name: String,
    /// Other `ClusterID`s that mean this cluster (istiod's `CLUSTER_ALIASES`), e.g. its old name.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Used when the caller names no cluster (needed when there is more than one cluster).
    #[serde(default)]
    pub default: bool,
    #[serde(default = "default_audiences")]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub allow_legacy_tokens: bool,
    /// How long a validated token is reused (capped by its exp).
    #[serde(default = "default_cache_ttl", with = "crate::duration::serde")]
    pub cache_ttl: Duration,
    #[serde(default = "default_cache_max")]
    pub cache_max_entries: usize,
    /// How long a refused token is refused again without re-checking it.
    #[serde(default = "default_negative_ttl", with = "crate::duration::serde")]
    pub negative_cache_ttl: Duration,
    #[serde(default = "default_negative_max")]
    pub negative_cache_max_entries: usize,
    /// Clock-skew tolerance for `exp`, `nbf`, `iat` (the API server's is 60s).
    #[serde(default = "default_leeway", with = "crate::duration::serde")]
    pub leeway: Duration,
    pub tokenreview: Option<TokenReview>,
    pub jwks: Option<Jwks>,
}

fn default_audiences() -> Vec<String> {
    vec![DEFAULT_AUDIENCE.into()]
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_cache_max() -> usize {
    100_000
}
fn default_negative_ttl() -> Duration {
    Duration::from_secs(5)
}
fn default_negative_max() -> usize {
    10_000
}
fn default_leeway() -> Duration {
    Duration::from_secs(60)
}

/// TokenReview through the kube client.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenReview {
    /// A kubeconfig; absent means in-cluster configuration (or `KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    #[serde(default, flatten)]
    pub rate: RateLimit,
    #[serde(default = "default_review_timeout", with = "crate::duration::serde")]
    pub timeout: Duration,
    /// Accepted token issuers, checked before any API call (empty: left to the API server).
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Verify signatures against the API server's `/openid/v1/jwks` before calling TokenReview.
    #[serde(default = "default_true")]
    pub verify_signatures: bool,
    /// `review` (default): the API server judges every well-formed token. `local`: meshid judges
    /// the bound pod and service account against its own watch (kube-apiserver's rule), and
    /// calls TokenReview only while the watch is not synced or has not seen them.
    #[serde(default)]
    pub mode: super::TokenReviewMode,
}

fn default_review_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Local verification against the issuer's keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwks {
    /// The expected `iss`.
    pub issuer: String,
    /// More accepted issuers (an issuer migration, as with several `--service-account-issuer`).
    #[serde(default)]
    pub additional_issuers: Vec<String>,
    pub file: Option<PathBuf>,
    pub url: Option<String>,
    pub oidc_issuer: Option<String>,
    /// The cluster's own API server, through the kube client and its credentials.
    #[serde(default)]
    pub api_server: Option<ApiServerJwks>,
    pub ca_file: Option<PathBuf>,
}

/// Keys and discovery from the API server (`/.well-known/openid-configuration`, `/openid/v1/jwks`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiServerJwks {
    /// A kubeconfig; absent means in-cluster configuration (or `KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
}

// === validation ===

/// The `[[clusters]]`: at least one, one default when several, names and aliases unique.
pub fn validate_clusters(clusters: &[Cluster], unary_timeout: Duration, errs: &mut Vec<String>) {
    if clusters.is_empty() {
        errs.push("clusters: at least one cluster is needed to authenticate callers".into());
    }
    let defaults = clusters.iter().filter(|c| c.default).count();
    if clusters.len() > 1 && defaults != 1 {
        errs.push(format!(
            "clusters: exactly one cluster must have default = true; {defaults} do"
        ));
    }
    for (i, c) in clusters.iter().enumerate() {
        c.validate(i, clusters, unary_timeout, errs);
    }
}

impl Cluster {
    /// Checks the `i`-th of `all` clusters; a TokenReview queue must drain within `unary_timeout`.
    fn validate(&self, i: usize, all: &[Cluster], unary_timeout: Duration, errs: &mut Vec<String>) {
        let c = self;
        let at = format!("clusters[{i}] ({})", c.name);
        if c.name.is_empty() {
            errs.push(format!("clusters[{i}].name: must not be empty"));
        }
        if all[..i].iter().any(|o| o.name == c.name) {
            errs.push(format!("{at}.name: duplicate cluster name"));
        }
        if c.audiences.is_empty() {
            errs.push(format!("{at}.audiences: at least one audience is needed"));
        }
        if c.cache_ttl > Duration::from_secs(24 * 3600) {
            errs.push(format!(
                "{at}.cache_ttl: {} is above 1d",
                fmt_duration(c.cache_ttl)
            ));
        }
        for a in &c.aliases {
            let taken = all
                .iter()
                .enumerate()
                .any(|(j, o)| o.name == *a || (j < i && o.aliases.contains(a)));
            if a.is_empty() || taken || c.aliases.iter().filter(|x| *x == a).count() > 1 {
                errs.push(format!(
                    "{at}.aliases: {a:?} is empty or already names a cluster or alias"
                ));
            }
        }
        if c.leeway > Duration::from_secs(3600) {
            errs.push(format!(
                "{at}.leeway: {} is above 1h",
                fmt_duration(c.leeway)
            ));
        }
        if c.negative_cache_ttl > Duration::from_secs(300) {
            errs.push(format!(
                    "{at}.negative_cache_ttl: {} is above 5m; a refused token that became valid would stay refused",
                    fmt_duration(c.negative_cache_ttl)
                ));
        }
        match (&c.tokenreview, &c.jwks) {
            (Some(_), Some(_)) | (None, None) => {
                errs.push(format!("{at}: set exactly one of [tokenreview] or [jwks]"))
            }
            (Some(tr), None) => tr.validate(&at, unary_timeout, errs),
            (None, Some(j)) => j.validate(&at, errs),
        }
    }
}

impl TokenReview {
    /// The timeout, the rate limit, and a queue that drains within the unary deadline.
    fn validate(&self, at: &str, unary_timeout: Duration, errs: &mut Vec<String>) {
        let tr = self;
        if tr.timeout.is_zero() || tr.timeout > Duration::from_secs(300) {
            errs.push(format!(
                "{at}.tokenreview.timeout: {} is outside 1ms..=5m",
                fmt_duration(tr.timeout)
            ));
        }
        if tr.rate.qps <= 0.0 || tr.rate.burst == 0 {
            errs.push(format!(
                "{at}.tokenreview: qps and burst must be above zero"
            ));
        }
        // A call queued longer than the unary deadline would time out in the queue.
        let drain = f64::from(tr.rate.max_queue) / tr.rate.qps;
        let budget = unary_timeout.as_secs_f64();
        if tr.rate.qps > 0.0 && drain > budget {
            errs.push(format!(
                    "{at}.tokenreview.max_queue: {} calls at {} qps wait up to {drain:.1}s, longer than limits.unary_timeout ({}); set max_queue to at most {} or raise qps or limits.unary_timeout",
                    tr.rate.max_queue,
                    tr.rate.qps,
                    fmt_duration(unary_timeout),
                    (tr.rate.qps * budget).floor() as u64
                ));
        }
        if tr.mode == super::TokenReviewMode::Local && !tr.verify_signatures {
            errs.push(format!(
                "{at}.tokenreview.mode: \"local\" judges tokens whose signature meshid verified; set verify_signatures = true"
            ));
        }
        if tr.rate.max_queue_per_peer == 0 {
            errs.push(format!(
                "{at}.tokenreview.max_queue_per_peer: must be above zero"
            ));
        }
    }
}

impl Jwks {
    /// Exactly one key source, and an issuer.
    fn validate(&self, at: &str, errs: &mut Vec<String>) {
        let j = self;
        let n = [
            j.file.is_some(),
            j.url.is_some(),
            j.oidc_issuer.is_some(),
            j.api_server.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n != 1 {
            errs.push(format!(
                "{at}.jwks: set exactly one of file, url, oidc_issuer or api_server"
            ));
        }
        if j.issuer.is_empty() {
            errs.push(format!("{at}.jwks.issuer: must not be empty"));
        }
        for (key, url) in [("url", &j.url), ("oidc_issuer", &j.oidc_issuer)] {
            if let Some(why) = url.as_deref().and_then(not_https) {
                errs.push(format!("{at}.jwks.{key}: {why}"));
            }
        }
    }
}

/// Why `url` cannot be a source of token-signing keys: they decide who gets a certificate, so
/// they are fetched over HTTPS only (as the API server's own OIDC discovery requires).
pub(crate) fn not_https(url: &str) -> Option<String> {
    (!url.starts_with("https://")).then(|| {
        format!(
            "{url:?} is not an https:// URL: token-signing keys are fetched over HTTPS only; give an https:// URL (with --ca-file / ca_file for a private CA), or the keys in a file (--jwks FILE, [clusters.jwks] file)"
        )
    })
}
