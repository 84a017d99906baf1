//! The `[federation]` config section: our bundle endpoint and the peers we fetch from. Every
//! peer names its profile and, for `https_spiffe`, the endpoint's SPIFFE ID explicitly: none
//! is inferred from another or from the URL, and one profile never falls back to the other.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{federated_store::Association, spiffe_bundle::DEFAULT_REFRESH_HINT};
use crate::{
    duration::fmt_duration,
    spiffe::{SpiffeId, TrustDomain},
};

/// How a bundle endpoint authenticates itself (SPIFFE federation spec, section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointProfile {
    /// A Web PKI certificate, validated against `ca_file` (or the system roots).
    HttpsWeb,
    /// An X.509-SVID of the endpoint's trust domain, validated with its last stored bundle.
    HttpsSpiffe,
}

/// `[federation]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// `spiffe_refresh_hint` of the bundle we publish.
    #[serde(with = "crate::duration::serde")]
    pub refresh_hint: Duration,
    /// Also put federated roots into `ROOTCA` (for proxies that take one bundle only). Risky:
    /// a peer's root then validates *any* SPIFFE ID, ours included.
    pub merge_into_rootca: bool,
    /// Our bundle endpoint (off when absent).
    pub bundle_endpoint: Option<BundleEndpointConfig>,
    /// Trust domains whose bundles we fetch.
    pub peers: Vec<PeerConfig>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            refresh_hint: DEFAULT_REFRESH_HINT,
            merge_into_rootca: false,
            bundle_endpoint: None,
            peers: Vec::new(),
        }
    }
}

/// `[federation.bundle_endpoint]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleEndpointConfig {
    pub listen: SocketAddr,
    pub profile: EndpointProfile,
    /// `https_web`: the operator's certificate chain (PEM), re-read when it changes.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// `https_web`: its private key (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// `[[federation.peers]]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub trust_domain: TrustDomain,
    /// The peer's bundle endpoint, `https://...`.
    pub url: String,
    pub profile: EndpointProfile,
    /// `https_spiffe`: the SPIFFE ID the endpoint's certificate must carry; it is validated
    /// with the latest stored bundle of that ID's trust domain (usually `trust_domain`).
    #[serde(default)]
    pub endpoint_spiffe_id: Option<SpiffeId>,
    /// `https_web`: CA certificates (PEM) that validate the endpoint (default: system roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// The smallest refresh hint meshid publishes: its own clients poll at most once a minute,
/// and SPIRE's raise any hint below a minute to one (`pkg/common/bundleutil`
/// `MinimumRefreshHint`), so a shorter hint would promise polls that do not happen.
pub const MIN_REFRESH_HINT: Duration = Duration::from_secs(60);
/// The largest refresh hint meshid publishes.
pub const MAX_REFRESH_HINT: Duration = Duration::from_secs(86_400);
/// How long a meshid peer waits after a failed fetch before it tries again (then doubling, up
/// to 5 min, until one succeeds).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// How often a peer is polled: a quarter of its refresh hint (SPIRE's
/// `attemptsPerRefreshHint`), at least every 5 min and at most once a minute.
pub fn poll_interval(refresh_hint: Option<Duration>) -> Duration {
    (refresh_hint.unwrap_or(DEFAULT_REFRESH_HINT) / 4)
        .clamp(Duration::from_secs(60), Duration::from_secs(300))
}

/// The longest a meshid peer takes to fetch a change of a bundle published with
/// `refresh_hint`, when one of its polls fails: a poll interval, then the retry after the
/// failure.
pub fn worst_case_fetch(refresh_hint: Duration) -> Duration {
    poll_interval(Some(refresh_hint)) + RETRY_AFTER_FAILURE
}

impl FederationConfig {
    /// Adds every problem, naming its key, to `errs`.
    pub fn validate(&self, own: Option<&TrustDomain>, errs: &mut Vec<String>) {
        if self.refresh_hint < MIN_REFRESH_HINT || self.refresh_hint > MAX_REFRESH_HINT {
            errs.push(format!(
                "federation.refresh_hint: {} must be between {} and {} (peers poll at most once a minute; SPIRE raises a shorter hint to 1m)",
                fmt_duration(self.refresh_hint),
                fmt_duration(MIN_REFRESH_HINT),
                fmt_duration(MAX_REFRESH_HINT)
            ));
        }
        if let Some(e) = &self.bundle_endpoint {
            let files = e.cert_file.is_some() as u8 + e.key_file.is_some() as u8;
            match (e.profile, files) {
                (EndpointProfile::HttpsWeb, 2) | (EndpointProfile::HttpsSpiffe, 0) => {}
                (EndpointProfile::HttpsWeb, _) => errs.push(
                    "federation.bundle_endpoint: profile https_web needs cert_file and key_file".into(),
                ),
                (EndpointProfile::HttpsSpiffe, _) => errs.push(
                    "federation.bundle_endpoint: profile https_spiffe serves meshid's own SVID; remove cert_file and key_file".into(),
                ),
            }
        }
        for (i, p) in self.peers.iter().enumerate() {
            let at = format!("federation.peers[{i}] ({})", p.trust_domain);
            if self.peers[..i]
                .iter()
                .any(|o| o.trust_domain == p.trust_domain)
            {
                errs.push(format!("{at}.trust_domain: listed twice"));
            }
            if own == Some(&p.trust_domain) {
                errs.push(format!("{at}.trust_domain: is our own trust domain"));
            }
            if !p.url.starts_with("https://") {
                errs.push(format!("{at}.url: must start with https://"));
            }
            match (p.profile, &p.endpoint_spiffe_id, &p.ca_file) {
                (EndpointProfile::HttpsSpiffe, Some(_), None) => {}
                (EndpointProfile::HttpsSpiffe, None, _) => errs.push(format!(
                    "{at}.endpoint_spiffe_id: required with profile https_spiffe"
                )),
                (EndpointProfile::HttpsSpiffe, _, Some(_)) => {
                    errs.push(format!("{at}.ca_file: only for profile https_web"))
                }
                (EndpointProfile::HttpsWeb, Some(_), _) => errs.push(format!(
                    "{at}.endpoint_spiffe_id: only for profile https_spiffe"
                )),
                (EndpointProfile::HttpsWeb, None, _) => {}
            }
        }
    }
}

impl FederationConfig {
    /// How this config uses `td`'s stored bundle (for `meshid bundle delete`): as a peer, or
    /// to authenticate a peer's https_spiffe endpoint. `seen_in` names the config.
    pub fn uses_of(&self, td: &TrustDomain, seen_in: &str) -> Vec<Association> {
        let mut uses = Vec::new();
        if self.peers.iter().any(|p| &p.trust_domain == td) {
            uses.push(Association::Peer {
                seen_in: format!("[[federation.peers]] in {seen_in}"),
            });
        }
        for p in &self.peers {
            let authenticates = p.profile == EndpointProfile::HttpsSpiffe
                && p.endpoint_spiffe_id.as_ref().map(SpiffeId::trust_domain) == Some(td)
                && &p.trust_domain != td;
            if authenticates {
                uses.push(Association::EndpointAuthority {
                    peer: p.trust_domain.clone(),
                    seen_in: format!("its endpoint_spiffe_id in {seen_in}"),
                });
            }
        }
        uses
    }

    /// The trust domains of the configured peers: the federated trust domains the server
    /// trusts.
    pub fn peer_trust_domains(&self) -> std::collections::BTreeSet<TrustDomain> {
        self.peers.iter().map(|p| p.trust_domain.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_interval_is_a_quarter_of_the_hint_clamped() {
        let s = Duration::from_secs;
        assert_eq!(poll_interval(None), s(75));
        assert_eq!(
            poll_interval(Some(s(60))),
            s(60),
            "never more than once a minute"
        );
        assert_eq!(
            poll_interval(Some(s(86_400))),
            s(300),
            "at least every 5 min"
        );
        assert_eq!(poll_interval(Some(s(800))), s(200));
    }

    /// The commented example of deploy/meshid.toml, uncommented, parses and validates; each
    /// explicitness rule is refused with its key.
    #[test]
    fn the_documented_section_parses_and_mistakes_name_their_key() {
        let toml_text = r#"
refresh_hint = "5m"
merge_into_rootca = false
[bundle_endpoint]
listen = "0.0.0.0:8443"
profile = "https_web"
cert_file = "/etc/meshid/bundle/tls.crt"
key_file = "/etc/meshid/bundle/tls.key"
[[peers]]
trust_domain = "other.example"
url = "https://bundle.other.example:8443/"
profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://other.example/ns/istio-system/sa/meshid"
[[peers]]
trust_domain = "web.example"
url = "https://spiffe-bundle.web.example/"
profile = "https_web"
ca_file = "/etc/meshid/web-ca.pem"
"#;
        let cfg: FederationConfig = toml::from_str(toml_text).unwrap();
        let mut errs = Vec::new();
        cfg.validate(None, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");

        let mut bad = cfg.clone();
        bad.peers[0].endpoint_spiffe_id = None;
        bad.peers[1].endpoint_spiffe_id = Some(SpiffeId::parse("spiffe://web.example/x").unwrap());
        bad.peers.push(bad.peers[1].clone());
        bad.peers[2].url = "http://plain".into();
        let own = TrustDomain::new("web.example").unwrap();
        let mut errs = Vec::new();
        bad.validate(Some(&own), &mut errs);
        let want = [
            "federation.peers[0] (other.example).endpoint_spiffe_id: required with profile https_spiffe",
            "federation.peers[1] (web.example).trust_domain: is our own trust domain",
            "federation.peers[1] (web.example).endpoint_spiffe_id: only for profile https_spiffe",
            "federation.peers[2] (web.example).trust_domain: listed twice",
        ];
        for w in want {
            assert!(errs.iter().any(|e| e == w), "missing {w:?} in {errs:#?}");
        }
        assert!(
            errs.iter()
                .any(|e| e.contains("url: must start with https://")),
            "{errs:?}"
        );
    }

    /// What `meshid bundle delete` must not break silently (SPIRE's RESTRICT counts the
    /// entries that federate with the bundle): a peer, and the trust domain whose bundle
    /// authenticates a peer's https_spiffe endpoint.
    #[test]
    fn uses_of_a_trust_domain_are_its_peer_entry_and_the_endpoints_it_authenticates() {
        let toml_text = r#"
[[peers]]
trust_domain = "a.example"
url = "https://a/"
profile = "https_web"
[[peers]]
trust_domain = "b.example"
url = "https://b/"
profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://host.example/ns/x/sa/bundle"
"#;
        let cfg: FederationConfig = toml::from_str(toml_text).unwrap();
        let td = |s: &str| TrustDomain::new(s).unwrap();
        assert_eq!(
            cfg.uses_of(&td("a.example"), "b.toml"),
            [Association::Peer {
                seen_in: "[[federation.peers]] in b.toml".into()
            }]
        );
        assert_eq!(
            cfg.uses_of(&td("host.example"), "b.toml"),
            [Association::EndpointAuthority {
                peer: td("b.example"),
                seen_in: "its endpoint_spiffe_id in b.toml".into()
            }]
        );
        assert!(cfg.uses_of(&td("c.example"), "b.toml").is_empty());
        let mut errs = Vec::new();
        let mut short = cfg.clone();
        short.refresh_hint = Duration::from_secs(10);
        short.validate(None, &mut errs);
        assert!(
            errs.iter()
                .any(|e| e.starts_with("federation.refresh_hint: 10s must be between 1m and 1d")),
            "{errs:?}"
        );
    }
}
