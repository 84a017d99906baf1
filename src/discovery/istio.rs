//! The Istio resources auto mTLS reads: `PeerAuthentication` (security.istio.io/v1) and
//! `DestinationRule` (networking.istio.io/v1), as far as TLS is concerned.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// A PeerAuthentication mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum PeerAuthMode {
    /// Inherit from the parent level.
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl std::fmt::Display for PeerAuthMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unset => "UNSET",
            Self::Disable => "DISABLE",
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MtlsSpec {
    #[serde(default)]
    pub mode: PeerAuthMode,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSelector {
    #[serde(default, rename = "matchLabels")]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAuthSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MtlsSpec>,
    /// Keyed by the workload's (container) port number.
    #[serde(default, rename = "portLevelMtls")]
    pub port_level_mtls: BTreeMap<String, MtlsSpec>,
}

/// security.istio.io/v1 PeerAuthentication.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTls {
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSelector {
    #[serde(default)]
    pub number: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortTrafficPolicy {
    #[serde(default)]
    pub port: Option<PortSelector>,
    #[serde(default)]
    pub tls: Option<ClientTls>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficPolicy {
    #[serde(default)]
    pub tls: Option<ClientTls>,
    #[serde(default, rename = "portLevelSettings")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default, rename = "trafficPolicy")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// networking.istio.io/v1 DestinationRule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationRule {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DestinationRuleSpec,
}

impl DestinationRule {
    /// Whether this rule's host names `fqdn` (short names resolve in the rule's namespace;
    /// `*.suffix` and `*` wildcards match).
    pub fn matches_host(&self, fqdn: &str, domain: &str) -> bool {
        let host = self.spec.host.as_str();
        let ns = self.metadata.namespace.as_deref().unwrap_or("default");
        if host == "*" {
            return true;
        }
        if let Some(suffix) = host.strip_prefix('*') {
            return fqdn.ends_with(suffix);
        }
        if host == fqdn {
            return true;
        }
        // "reviews" → reviews.<rule ns>.svc.<domain>; "reviews.shop" → reviews.shop.svc.<domain>
        let expanded = match host.matches('.').count() {
            0 => format!("{host}.{ns}.svc.{domain}"),
            1 => format!("{host}.svc.{domain}"),
            _ => return false,
        };
        expanded == fqdn
    }

    /// The TLS mode for `port` (port-level settings win over the rule's traffic policy).
    pub fn tls_mode_for(&self, port: u16) -> Option<String> {
        let tp = self.spec.traffic_policy.as_ref()?;
        let port_level = tp
            .port_level_settings
            .iter()
            .find(|p| p.port.as_ref().is_some_and(|s| s.number == u32::from(port)))
            .and_then(|p| p.tls.as_ref())
            .and_then(|t| t.mode.clone());
        port_level.or_else(|| tp.tls.as_ref().and_then(|t| t.mode.clone()))
    }
}
