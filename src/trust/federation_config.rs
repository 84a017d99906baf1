//! The `[federation]` config section: our bundle endpoint and the peers we fetch from. Every
//! peer names its profile and, for `https_spiffe`, the endpoint's SPIFFE ID explicitly: none
//! is inferred from another or from the URL, and one profile never falls back to the other.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::spiffe_bundle::DEFAULT_REFRESH_HINT;
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
    #[serde(
        deserialize_with = "crate::ca::serde_duration_de",
        serialize_with = "crate::ca::serde_duration_ser"
    )]
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

/// How often a peer is polled: a quarter of its refresh hint, at least every 5 min and at most
/// once a minute.
pub fn poll_interval(refresh_hint: Option<Duration>) -> Duration {
    (refresh_hint.unwrap_or(DEFAULT_REFRESH_HINT) / 4)
        .clamp(Duration::from_secs(60), Duration::from_secs(300))
}

impl FederationConfig {
    /// Adds every problem, naming its key, to `errs`.
    pub fn validate(&self, own: Option<&TrustDomain>, errs: &mut Vec<String>) {
        if self.refresh_hint < Duration::from_secs(10)
            || self.refresh_hint > Duration::from_secs(86_400)
        {
            errs.push(format!(
                "federation.refresh_hint: {} must be between 10s and 1d",
                fmt_duration(self.refresh_hint)
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
}
