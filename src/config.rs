//! Server configuration: plain data read from TOML (or built from flags), checked in one place
//! that names every wrong key at once.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    ca::IssuancePolicy,
    duration::fmt_duration,
    identity::{RateLimit, DEFAULT_AUDIENCE},
    rotation::RefreshPolicy,
    telemetry::LogFormat,
};

/// The whole server configuration. See `deploy/meshid.toml` for a documented example.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the CA state (`meshid ca init --state-dir`).
    pub state_dir: PathBuf,
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub server_identity: ServerIdentity,
    #[serde(default)]
    pub issuance: IssuancePolicy,
    #[serde(default)]
    pub rotation: RefreshPolicy,
    #[serde(default)]
    pub logging: Logging,
    /// How often the state store is re-read as a backstop: its file is watched, so changes (root
    /// rotation from the CLI) apply as soon as they are written.
    #[serde(default = "default_poll", with = "crate::duration::serde")]
    pub state_poll_interval: Duration,
    /// Clusters whose service-account tokens are accepted.
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    /// Auto mTLS discovery and EDS (off when absent).
    #[serde(default)]
    pub discovery: Option<Discovery>,
    /// Connection, request and stream limits.
    #[serde(default)]
    pub limits: Limits,
    /// Limits of the xDS streams (SDS, EDS).
    #[serde(default)]
    pub xds: Xds,
    /// Automatic rotation of generated roots (`[auto_rotation]`, off by default).
    #[serde(default)]
    pub auto_rotation: crate::rotation::AutoRotation,
    /// ConfigMap `istio-ca-root-cert` in every namespace (`[root_cert_configmap]`, off by default).
    #[serde(default)]
    pub root_cert_configmap: crate::trust::configmap::RootCertConfigMap,
    /// SPIFFE federation: our bundle endpoint and the peers whose bundles we trust.
    #[serde(default)]
    pub federation: crate::trust::FederationConfig,
}

/// Default of `xds.max_resource_names_per_stream.sds`: a proxy needs a handful of secrets.
pub const DEFAULT_SDS_MAX_NAMES: usize = 128;
/// Default of `xds.max_resource_names_per_stream.eds`: one cluster per service port it calls.
pub const DEFAULT_EDS_MAX_NAMES: usize = 10_000;
/// The largest accepted value of either cap.
const MAX_NAMES_CEILING: usize = 1_000_000;

/// Limits of the xDS streams.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Xds {
    pub max_resource_names_per_stream: MaxNames,
}

/// Resource names one stream may subscribe to at once, per service; a stream asking for more
/// ends with `ResourceExhausted` naming the key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaxNames {
    pub sds: usize,
    pub eds: usize,
}

impl Default for MaxNames {
    fn default() -> Self {
        Self {
            sds: DEFAULT_SDS_MAX_NAMES,
            eds: DEFAULT_EDS_MAX_NAMES,
        }
    }
}

/// Connection, request and stream limits; each default is safe for a mesh of ~10,000 proxies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// SDS and EDS streams end gracefully after this (± 10 %), and at the caller's token expiry.
    #[serde(with = "crate::duration::serde")]
    pub max_stream_age: Duration,
    /// Open gRPC connections (TCP and Unix socket each); further ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Concurrent gRPC streams on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    /// istiod allows 100,000 (`features.MaxConcurrentStreams`, `ISTIO_GPRC_MAXSTREAMS`); a proxy
    /// needs a handful, and a client with more in flight (ztunnel asking for many pods at
    /// once) queues them on its side as HTTP/2 requires, so a low cap costs no failures.
    pub max_concurrent_streams_per_connection: u32,
    /// A TLS handshake not finished by then is dropped.
    #[serde(with = "crate::duration::serde")]
    pub tls_handshake_timeout: Duration,
    /// Unary calls (CreateCertificate, FetchSecrets, FetchEndpoints) not answered by then fail
    /// with DEADLINE_EXCEEDED.
    #[serde(with = "crate::duration::serde")]
    pub unary_timeout: Duration,
    /// Largest CreateCertificate request decoded (a CSR with metadata is a few KiB).
    pub csr_max_request_bytes: usize,
    /// Largest xDS request decoded (resource names of a large EDS subscription).
    pub xds_max_request_bytes: usize,
    /// HTTP (/metrics, /healthz, /readyz): request headers must arrive within this.
    #[serde(with = "crate::duration::serde")]
    pub http_header_read_timeout: Duration,
    /// HTTP: a connection with no request in flight is closed after this.
    #[serde(with = "crate::duration::serde")]
    pub http_idle_timeout: Duration,
    /// HTTP: open connections at once.
    pub http_max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_stream_age: Duration::from_secs(30 * 60),
            max_connections: 20_000,
            max_concurrent_streams_per_connection: 128,
            tls_handshake_timeout: Duration::from_secs(10),
            unary_timeout: Duration::from_secs(10),
            csr_max_request_bytes: 64 * 1024,
            xds_max_request_bytes: 1024 * 1024,
            http_header_read_timeout: Duration::from_secs(5),
            http_idle_timeout: Duration::from_secs(60),
            http_max_connections: 256,
        }
    }
}

impl Limits {
    fn validate(&self, errs: &mut Vec<String>) {
        let secs = Duration::from_secs;
        for (key, v, min, max) in [
            (
                "max_stream_age",
                self.max_stream_age,
                secs(10),
                secs(24 * 3600),
            ),
            (
                "tls_handshake_timeout",
                self.tls_handshake_timeout,
                Duration::from_millis(100),
                secs(300),
            ),
            (
                "unary_timeout",
                self.unary_timeout,
                Duration::from_millis(100),
                secs(300),
            ),
            (
                "http_header_read_timeout",
                self.http_header_read_timeout,
                Duration::from_millis(100),
                secs(300),
            ),
            (
                "http_idle_timeout",
                self.http_idle_timeout,
                secs(1),
                secs(3600),
            ),
        ] {
            if v < min || v > max {
                errs.push(format!(
                    "limits.{key}: {} is outside {}..={}",
                    fmt_duration(v),
                    fmt_duration(min),
                    fmt_duration(max)
                ));
            }
        }
        for (key, v, min, max) in [
            ("max_connections", self.max_connections, 1, 1_000_000),
            (
                "max_concurrent_streams_per_connection",
                self.max_concurrent_streams_per_connection as usize,
                1,
                65_536,
            ),
            (
                "csr_max_request_bytes",
                self.csr_max_request_bytes,
                1024,
                4 * 1024 * 1024,
            ),
            (
                "xds_max_request_bytes",
                self.xds_max_request_bytes,
                1024,
                16 * 1024 * 1024,
            ),
            (
                "http_max_connections",
                self.http_max_connections,
                1,
                100_000,
            ),
        ] {
            if v < min || v > max {
                errs.push(format!("limits.{key}: {v} is outside {min}..={max}"));
            }
        }
    }
}

/// Where endpoints come from (exactly one source), and Istio's mesh-wide settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// A snapshot file (kubectl `-o json` or `-o yaml` of pods, endpointslices, services,
    /// namespaces, peerauthentications, destinationrules), re-read when it changes.
    #[serde(default)]
    pub snapshot: Option<PathBuf>,
    /// Watch a cluster through this kubeconfig.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Watch the cluster meshid runs in.
    #[serde(default)]
    pub in_cluster: bool,
    #[serde(default = "default_root_ns")]
    pub root_namespace: String,
    #[serde(default = "default_domain")]
    pub domain: String,
    #[serde(default = "default_true")]
    pub auto_mtls: bool,
    /// Serve a pod labelled tlsMode=istio as tlsMode disabled until one of its proxies holds an
    /// SDS stream or obtained a certificate within `proxy_proof_grace` (off: the label decides,
    /// as in Istio; silent sidecars are still shown by `describe` and counted in
    /// `meshid_discovery_declared_without_proxy`).
    #[serde(default)]
    pub require_proxy_proof: bool,
    /// How long a certificate fetched over the CSR API (or an SDS stream that closed) proves
    /// the pod's proxy. Covers istio-agent's renewal at half the certificate's lifetime.
    #[serde(default = "default_proof_grace", with = "crate::duration::serde")]
    pub proxy_proof_grace: Duration,
    /// This cluster's name, shown next to its endpoints (multi-cluster discovery).
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
    /// Other clusters whose pods, services and endpointslices are merged per service hostname.
    #[serde(default)]
    pub clusters: Vec<RemoteCluster>,
    /// Also follow Istio's remote secrets: Secrets in `root_namespace` labelled
    /// `istio/multiCluster=true`, one kubeconfig per data key (the key names the cluster).
    #[serde(default)]
    pub remote_secrets: bool,
    /// Kubeconfig options a remote secret may use (istiod:
    /// `PILOT_INSECURE_MULTICLUSTER_KUBECONFIG_OPTIONS`): `exec`, `tokenFile`,
    /// `clientCertificate`, `clientKey`, `certificateAuthority`, `insecureSkipTlsVerify`, or an
    /// auth provider's name. None by default: such a kubeconfig is refused.
    #[serde(default)]
    pub insecure_kubeconfig_options: crate::discovery::KubeconfigPolicy,
}

/// A remote cluster for multi-cluster discovery.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteCluster {
    pub name: String,
    pub kubeconfig: PathBuf,
}

fn default_cluster_name() -> String {
    crate::identity::DEFAULT_CLUSTER.into()
}

impl Default for Discovery {
    fn default() -> Self {
        Self {
            snapshot: None,
            kubeconfig: None,
            in_cluster: false,
            root_namespace: default_root_ns(),
            domain: default_domain(),
            auto_mtls: true,
            require_proxy_proof: false,
            proxy_proof_grace: default_proof_grace(),
            cluster_name: default_cluster_name(),
            clusters: Vec::new(),
            remote_secrets: false,
            insecure_kubeconfig_options: Default::default(),
        }
    }
}

fn default_proof_grace() -> Duration {
    Duration::from_secs(3600)
}

fn default_root_ns() -> String {
    "istio-system".into()
}
fn default_domain() -> String {
    "cluster.local".into()
}
fn default_true() -> bool {
    true
}

fn default_poll() -> Duration {
    Duration::from_secs(1)
}

/// Where the server listens.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// gRPC over TLS (SDS and the CSR API).
    pub grpc: SocketAddr,
    /// HTTP: /metrics, /healthz, /readyz.
    pub http: SocketAddr,
    /// Optional gRPC over a Unix socket (plaintext; for a node-local deployment).
    pub unix: Option<PathBuf>,
    /// Who besides loopback may read the HTTP port's `/debug/*` pages (the rotation status
    /// names pods and SPIFFE IDs): address ranges such as `10.0.0.0/8`. Empty by default, so
    /// reach them through `kubectl port-forward`.
    pub debug_from: Vec<crate::net::Cidr>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            grpc: ([0, 0, 0, 0], 15012).into(),
            http: ([0, 0, 0, 0], 15014).into(),
            unix: None,
            debug_from: Vec::new(),
        }
    }
}

/// The identity meshid's own serving certificate carries.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerIdentity {
    pub namespace: String,
    pub service_account: String,
    /// DNS names clients dial, added after the SPIFFE ID.
    pub dns_names: Vec<String>,
}

impl Default for ServerIdentity {
    fn default() -> Self {
        Self {
            namespace: "istio-system".into(),
            service_account: "meshid".into(),
            dns_names: vec!["meshid.istio-system.svc".into(), "localhost".into()],
        }
    }
}

/// Logging.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Logging {
    pub format: LogFormat,
    pub level: String,
}

impl Default for Logging {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
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

impl Config {
    /// Parses TOML, naming the key of any error.
    pub fn from_toml(text: &str) -> Result<Self, Vec<String>> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| vec![e.to_string().trim().to_owned()])?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every problem at once, each naming its key.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        if let Err(e) = self.issuance.validate() {
            errs.push(format!("issuance: {e}"));
        }
        if self.issuance.max_ttl > Duration::from_secs(30 * 86_400) {
            errs.push(format!("issuance.max_ttl: {} is above 30d; workload certificates are meant to be short-lived", fmt_duration(self.issuance.max_ttl)));
        }
        if let Err(e) = self.rotation.validate() {
            errs.push(format!("rotation: {e}"));
        }
        if self.state_poll_interval.is_zero()
            || self.state_poll_interval > Duration::from_secs(3600)
        {
            errs.push("state_poll_interval: must be above zero and at most 1h".into());
        }
        self.limits.validate(&mut errs);
        errs.extend(self.auto_rotation.validate());
        errs.extend(self.root_cert_configmap.validate());
        self.federation.validate(None, &mut errs);
        self.server_identity.validate(&mut errs);
        validate_clusters(&self.clusters, self.limits.unary_timeout, &mut errs);
        self.xds.validate(&mut errs);
        if let Some(d) = &self.discovery {
            d.validate(&mut errs);
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    /// The default cluster's name.
    pub fn default_cluster(&self) -> &Cluster {
        self.clusters
            .iter()
            .find(|c| c.default)
            .unwrap_or(&self.clusters[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
state_dir = "/var/lib/meshid"
[[clusters]]
name = "Kubernetes"
[clusters.jwks]
issuer = "https://kubernetes.default.svc.cluster.local"
file = "/etc/meshid/jwks.json"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.listen.grpc.port(), 15012);
        assert_eq!(c.issuance, IssuancePolicy::default());
        assert_eq!(c.default_cluster().name, "Kubernetes");
        assert_eq!(c.clusters[0].audiences, vec!["istio-ca"]);
    }

    /// The server identity is checked as Kubernetes names it (no trust domain is needed: the
    /// serving certificate's SPIFFE ID is built at start from the CA's own).
    #[test]
    fn server_identity_is_checked_as_kubernetes_names() {
        let with = |ns: &str, sa: &str| {
            let mut errs = Vec::new();
            ServerIdentity {
                namespace: ns.into(),
                service_account: sa.into(),
                dns_names: Vec::new(),
            }
            .validate(&mut errs);
            errs
        };
        assert!(with("istio-system", "meshid").is_empty());
        assert!(with("istio-system", "meshid.v2").is_empty());
        let bad_ns = with("Istio_System", "meshid");
        assert!(
            bad_ns[0].starts_with("server_identity.namespace: \"Istio_System\""),
            "{bad_ns:?}"
        );
        assert_eq!(
            with("a.b", "meshid").len(),
            1,
            "a namespace is a label, no dots"
        );
        assert_eq!(with("ns", "-sa").len(), 1);
        assert_eq!(with("ns", "").len(), 1);
        assert_eq!(with(&"n".repeat(64), "sa").len(), 1);
    }

    #[test]
    fn unknown_key_is_named() {
        let errs =
            Config::from_toml(&GOOD.replace("[[clusters]]", "statedir = \"x\"\n[[clusters]]"))
                .unwrap_err();
        assert!(errs[0].contains("statedir"), "{errs:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
state_dir = "/x"
[issuance]
default_ttl = "48h"
max_ttl = "24h"
backdate = "60s"
[rotation]
ratio = 0.99
jitter = 0.05
[[clusters]]
name = "a"
[[clusters]]
name = "a"
[clusters.jwks]
issuer = "i"
file = "f"
url = "u"
"#;
        let errs = Config::from_toml(text).unwrap_err();
        let all = errs.join("\n");
        for key in [
            "issuance:",
            "rotation:",
            "exactly one cluster must have default",
            "clusters[0] (a): set exactly one of",
            "duplicate cluster name",
            "exactly one of file, url, oidc_issuer or api_server",
        ] {
            assert!(all.contains(key), "missing {key:?} in:\n{all}");
        }
    }

    /// Item 8 of the security review: `10000y` used to parse and then panic in `time` when the
    /// server subtracted the backdate from now; every duration is now bounded at load.
    #[test]
    fn durations_that_would_overflow_are_refused_naming_the_key() {
        for (section, key) in [
            ("[issuance]", "backdate"),
            ("[limits]", "max_stream_age"),
            ("[rotation]", "retry_max"),
        ] {
            let text = format!("{GOOD}\n{section}\n{key} = \"10000y\"\n");
            let errs = Config::from_toml(&text).unwrap_err();
            assert!(
                errs[0].contains(key) && errs[0].contains("1000y"),
                "{key}: {errs:?}"
            );
        }
        let cases = [
            (
                "[issuance]\nbackdate = \"2h\"\n",
                "backdate (2h) is above 1h",
            ),
            (
                "[issuance]\ndefault_ttl = \"60s\"\nbackdate = \"60s\"\n",
                "default_ttl (1m) must be longer than backdate (1m)",
            ),
            (
                "[limits]\nmax_stream_age = \"1s\"\n",
                "limits.max_stream_age",
            ),
            ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
            ("[rotation]\nretry_min = \"0s\"\n", "retry_min"),
            ("state_poll_interval = \"2h\"\n", "state_poll_interval"),
        ];
        for (extra, want) in cases {
            // Top-level keys must come before the first table.
            let text = if extra.starts_with('[') {
                format!("{GOOD}\n{extra}")
            } else {
                format!("{extra}{GOOD}")
            };
            let errs = Config::from_toml(&text).unwrap_err().join("\n");
            assert!(errs.contains(want), "{want:?} not in {errs}");
        }
    }

    #[test]
    fn xds_name_caps_default_and_are_bounded() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(
            c.xds.max_resource_names_per_stream.sds,
            DEFAULT_SDS_MAX_NAMES
        );
        assert_eq!(
            c.xds.max_resource_names_per_stream.eds,
            DEFAULT_EDS_MAX_NAMES
        );
        let errs = Config::from_toml(&format!(
            "{GOOD}\n[xds.max_resource_names_per_stream]\nsds = 0\neds = 2000000\n"
        ))
        .unwrap_err();
        let all = errs.join("\n");
        assert!(
            all.contains("xds.max_resource_names_per_stream.sds: 0"),
            "{all}"
        );
        assert!(
            all.contains("xds.max_resource_names_per_stream.eds: 2000000"),
            "{all}"
        );
    }

    #[test]
    fn identity_keys_are_validated_by_name() {
        let text = r#"
state_dir = "/x"
[[clusters]]
name = "Kubernetes"
default = true
aliases = ["east", "primary"]
negative_cache_ttl = "1h"
leeway = "2h"
[clusters.tokenreview]
max_queue_per_peer = 0
[[clusters]]
name = "east"
aliases = ["primary"]
[clusters.jwks]
issuer = "i"
additional_issuers = ["j"]
[clusters.jwks.api_server]
"#;
        let all = Config::from_toml(text).unwrap_err().join("\n");
        for key in [
            "clusters[0] (Kubernetes).aliases: \"east\"",
            "clusters[1] (east).aliases: \"primary\"",
            "negative_cache_ttl",
            "leeway",
            "max_queue_per_peer",
        ] {
            assert!(all.contains(key), "missing {key:?} in:\n{all}");
        }
        assert!(
            !all.contains("api_server\n"),
            "api_server is one source: {all}"
        );
    }

    /// The TokenReview queue must drain within the unary deadline (issue 13: 1,000 queued at
    /// 50 qps waited 20 s behind a 10 s timeout); the defaults are consistent.
    #[test]
    fn a_tokenreview_queue_longer_than_the_unary_timeout_is_refused() {
        let base =
            "state_dir = \"/x\"\n[[clusters]]\nname = \"Kubernetes\"\n[clusters.tokenreview]\n";
        let cfg = Config::from_toml(base).expect("the defaults are consistent");
        let rate = cfg.clusters[0].tokenreview.as_ref().unwrap().rate;
        assert!(f64::from(rate.max_queue) / rate.qps < cfg.limits.unary_timeout.as_secs_f64());
        let all = Config::from_toml(&format!("{base}qps = 50.0\nmax_queue = 1000\n"))
            .unwrap_err()
            .join("\n");
        assert!(
            all.contains("clusters[0] (Kubernetes).tokenreview.max_queue: 1000 calls at 50 qps wait up to 20.0s, longer than limits.unary_timeout (10s); set max_queue to at most 500"),
            "{all}"
        );
        let raised =
            format!("{base}qps = 50.0\nmax_queue = 1000\n[limits]\nunary_timeout = \"30s\"\n");
        assert!(Config::from_toml(&raised).is_ok());
    }

    #[test]
    fn discovery_proxy_proof_keys() {
        let base = format!("{GOOD}\n[discovery]\nsnapshot = \"/m.yaml\"\n");
        let cfg = Config::from_toml(&base).unwrap();
        let d = cfg.discovery.unwrap();
        assert_eq!(
            (d.require_proxy_proof, d.proxy_proof_grace),
            (false, Duration::from_secs(3600))
        );
        let cfg = Config::from_toml(&format!(
            "{base}require_proxy_proof = true\nproxy_proof_grace = \"5m\"\n"
        ))
        .unwrap();
        let d = cfg.discovery.unwrap();
        assert_eq!(
            (d.require_proxy_proof, d.proxy_proof_grace),
            (true, Duration::from_secs(300))
        );
        let errs = Config::from_toml(&format!(
            "{base}[[discovery.clusters]]\nname = \"Kubernetes\"\nkubeconfig = \"/k\"\n"
        ))
        .unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("discovery.clusters[0].name"))
                && errs.iter().any(|e| e.contains("need a live source")),
            "{errs:?}"
        );
        let errs = Config::from_toml(&format!("{base}proxy_proof_grace = \"0s\"\n")).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("discovery.proxy_proof_grace")),
            "{errs:?}"
        );
    }

    #[test]
    fn bad_duration_names_the_key() {
        let errs =
            Config::from_toml(&format!("{GOOD}\n[issuance]\ndefault_ttl = \"1w\"\n")).unwrap_err();
        assert!(
            errs[0].contains("default_ttl") || errs[0].contains("issuance"),
            "{errs:?}"
        );
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn the_deploy_example_parses_and_validates() {
        let text = include_str!("../deploy/meshid.toml");
        let cfg = super::Config::from_toml(text).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(cfg.clusters[0].tokenreview.as_ref().unwrap().rate.qps, 50.0);
        assert_eq!(cfg.clusters[0].name, crate::identity::DEFAULT_CLUSTER);
    }
}

impl ServerIdentity {
    /// The namespace must be a DNS-1123 label and the service account a DNS-1123 subdomain, as
    /// Kubernetes names them (the serving certificate's SPIFFE ID is built from both at start).
    fn validate(&self, errs: &mut Vec<String>) {
        if !is_dns1123_label(&self.namespace) {
            errs.push(format!(
                "server_identity.namespace: {:?} is not a Kubernetes namespace name (DNS-1123 label)",
                self.namespace
            ));
        }
        if !is_dns1123_subdomain(&self.service_account) {
            errs.push(format!(
                "server_identity.service_account: {:?} is not a Kubernetes service account name (DNS-1123 subdomain)",
                self.service_account
            ));
        }
    }
}

fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// The `[[clusters]]`: at least one, one default when several, names and aliases unique.
fn validate_clusters(clusters: &[Cluster], unary_timeout: Duration, errs: &mut Vec<String>) {
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
        if let Some(tr) = &c.tokenreview {
            if tr.timeout.is_zero() || tr.timeout > Duration::from_secs(300) {
                errs.push(format!(
                    "{at}.tokenreview.timeout: {} is outside 1ms..=5m",
                    fmt_duration(tr.timeout)
                ));
            }
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
            (Some(tr), None) => {
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
                if tr.rate.max_queue_per_peer == 0 {
                    errs.push(format!(
                        "{at}.tokenreview.max_queue_per_peer: must be above zero"
                    ));
                }
            }
            (None, Some(j)) => {
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
            }
        }
    }
}

impl Xds {
    fn validate(&self, errs: &mut Vec<String>) {
        let caps = &self.max_resource_names_per_stream;
        for (key, v) in [("sds", caps.sds), ("eds", caps.eds)] {
            if v == 0 || v > MAX_NAMES_CEILING {
                errs.push(format!(
                    "xds.max_resource_names_per_stream.{key}: {v} is not between 1 and {MAX_NAMES_CEILING}"
                ));
            }
        }
    }
}

impl Discovery {
    /// One source; cluster names unique; remote clusters only with a live source.
    fn validate(&self, errs: &mut Vec<String>) {
        let d = self;
        let n = [d.snapshot.is_some(), d.kubeconfig.is_some(), d.in_cluster]
            .iter()
            .filter(|b| **b)
            .count();
        if n != 1 {
            errs.push("discovery: set exactly one of snapshot, kubeconfig or in_cluster".into());
        }
        let mut names = vec![d.cluster_name.as_str()];
        for (i, c) in d.clusters.iter().enumerate() {
            if c.name.is_empty() || names.contains(&c.name.as_str()) {
                errs.push(format!(
                    "discovery.clusters[{i}].name: {:?} is empty or not unique (discovery.cluster_name is {:?})",
                    c.name, d.cluster_name
                ));
            }
            names.push(&c.name);
        }
        if d.snapshot.is_some() && (!d.clusters.is_empty() || d.remote_secrets) {
            errs.push(
                "discovery.clusters / discovery.remote_secrets: need a live source (kubeconfig or in_cluster), not a snapshot".into(),
            );
        }
        errs.extend(d.insecure_kubeconfig_options.validate());
        let grace = d.proxy_proof_grace;
        if grace.is_zero() || grace > Duration::from_secs(7 * 24 * 3600) {
            errs.push(format!(
                "discovery.proxy_proof_grace: {} is not between 1s and 7d",
                fmt_duration(grace)
            ));
        }
    }
}
