//! Server configuration: plain data read from TOML (or built from flags). Each section lives
//! beside the module that uses it and checks itself (`api::config` the limits, `identity::config`
//! the clusters, `discovery::config` discovery, `trust` federation, `rotation` automatic
//! rotation); `Config::validate` delegates to them and names every wrong key at once.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

pub use crate::{
    api::config::{Limits, MaxNames, Xds, DEFAULT_EDS_MAX_NAMES, DEFAULT_SDS_MAX_NAMES},
    discovery::config::{Discovery, RemoteCluster},
    identity::config::{ApiServerJwks, Cluster, Jwks, TokenReview},
};
use crate::{
    ca::IssuancePolicy, duration::fmt_duration, identity::config::validate_clusters,
    rotation::RefreshPolicy, telemetry::LogFormat,
};

/// The whole server configuration. See `deploy/meshid.toml` for a documented example.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the CA state (`meshid ca init --state DIR`), and of the server's own
    /// files (federation status) when the state is in a Secret.
    pub state_dir: PathBuf,
    /// The CA state in a Kubernetes Secret instead, `kube://NAMESPACE/NAME` (every replica
    /// shares it; see the README's "Several replicas").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<crate::state::StateLocation>,
    /// The kubeconfig for the state Secret (in-cluster or `KUBECONFIG` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_kubeconfig: Option<PathBuf>,
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
    /// Leader election among replicas (`[leader_election]`, off by default): only the leader
    /// runs the schedules.
    #[serde(default)]
    pub leader_election: crate::leader::LeaderElectionConfig,
    /// What the CSR API does with a CSR whose SAN names another identity than the caller's.
    #[serde(default)]
    pub csr_san_policy: CsrSanPolicy,
    /// Service accounts (`NAMESPACE/NAME`) whose pods may ask the CSR API for the certificates
    /// of other pods on their node (Istio's `CA_TRUSTED_NODE_ACCOUNTS`; ztunnel). Empty: none.
    #[serde(default = "default_trusted_node_accounts")]
    pub trusted_node_accounts: Vec<String>,
}

/// `csr_san_policy`: what a CSR's own SANs may say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CsrSanPolicy {
    /// No SAN, or exactly the caller's SPIFFE ID; anything else is refused naming both.
    #[default]
    MatchCaller,
    /// Sign for the authenticated caller whatever the CSR asks (istiod's behaviour), for
    /// istio-agents configured with another trust domain.
    AuthenticatedIdentity,
}

impl CsrSanPolicy {
    /// How the authority holds a caller's own CSR to it.
    pub fn san_check(self) -> crate::ca::SanCheck {
        match self {
            Self::MatchCaller => crate::ca::SanCheck::MatchIdentity,
            Self::AuthenticatedIdentity => crate::ca::SanCheck::Ignore,
        }
    }
}

/// Istio's own default for ztunnel (`CA_TRUSTED_NODE_ACCOUNTS` as the ambient profile sets it).
pub fn default_trusted_node_accounts() -> Vec<String> {
    vec!["istio-system/ztunnel".into()]
}

/// `trusted_node_accounts` parsed: (namespace, service account) pairs.
pub fn parse_node_accounts(list: &[String]) -> Result<Vec<(String, String)>, Vec<String>> {
    let mut out = Vec::new();
    let mut errs = Vec::new();
    for (i, entry) in list.iter().enumerate() {
        match entry.split_once('/') {
            Some((ns, sa)) if is_dns1123_label(ns) && is_dns1123_subdomain(sa) => {
                out.push((ns.to_owned(), sa.to_owned()))
            }
            _ => errs.push(format!(
                "trusted_node_accounts[{i}]: {entry:?} is not NAMESPACE/SERVICE_ACCOUNT (e.g. \"istio-system/ztunnel\")"
            )),
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(errs)
    }
}

impl Config {
    /// Where the CA state lives: `state`, else the directory `state_dir`.
    pub fn state_location(&self) -> crate::state::StateLocation {
        self.state
            .clone()
            .unwrap_or_else(|| crate::state::StateLocation::Dir(self.state_dir.clone()))
    }
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
        self.leader_election.validate(&mut errs);
        if let Some(d) = &self.discovery {
            d.validate(&mut errs);
        }
        if let Err(e) = parse_node_accounts(&self.trusted_node_accounts) {
            errs.extend(e);
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
