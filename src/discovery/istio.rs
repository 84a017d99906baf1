//! The Istio resources auto mTLS reads: `PeerAuthentication` (security.istio.io/v1) and
//! `DestinationRule`, `ServiceEntry` and `WorkloadEntry` (networking.istio.io/v1), as far as
//! auto mTLS is concerned.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::DrTlsMode;

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

/// A DestinationRule `tls:` block. A block without `mode` is DISABLE: the proto enum's zero
/// value (networking/v1alpha3 `ClientTLSSettings.TLSmode`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTls {
    #[serde(default)]
    pub mode: Option<String>,
}

impl ClientTls {
    /// The mode, `Err(raw)` when it is not one Istio knows.
    pub fn parsed(&self) -> Result<DrTlsMode, String> {
        match self.mode.as_deref() {
            None | Some("") => Ok(DrTlsMode::Disable),
            Some(raw) => DrTlsMode::parse(raw).ok_or_else(|| raw.to_owned()),
        }
    }
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
pub struct LoadBalancer {
    #[serde(default)]
    pub simple: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficPolicy {
    #[serde(default)]
    pub tls: Option<ClientTls>,
    #[serde(default, rename = "loadBalancer")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, rename = "portLevelSettings")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

impl TrafficPolicy {
    fn port_entry(&self, port: u16) -> Option<&PortTrafficPolicy> {
        self.port_level_settings
            .iter()
            .find(|p| p.port.as_ref().is_some_and(|s| s.number == u32::from(port)))
    }

    /// Cluster side (`util.go` `GetPortLevelTrafficPolicy`): a port entry replaces the whole
    /// policy, so an entry without `tls` means no TLS setting (auto mTLS). `(tls, from a port entry)`.
    pub fn cluster_tls(&self, port: u16) -> (Option<&ClientTls>, bool) {
        match self.port_entry(port) {
            Some(p) => (p.tls.as_ref(), true),
            None => (self.tls.as_ref(), false),
        }
    }

    /// Endpoint side (`mtls_checker.go` `trafficPolicyTLSModeForPort`): the port entry's tls
    /// when it has one, else the top-level tls.
    pub fn endpoint_tls(&self, port: u16) -> Option<&ClientTls> {
        self.port_entry(port)
            .and_then(|p| p.tls.as_ref())
            .or(self.tls.as_ref())
    }

    /// `loadBalancer.simple: PASSTHROUGH` makes Istio treat the service as passthrough.
    pub fn passthrough(&self) -> bool {
        self.load_balancer
            .as_ref()
            .and_then(|l| l.simple.as_deref())
            == Some("PASSTHROUGH")
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, rename = "trafficPolicy")]
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default, rename = "trafficPolicy")]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default, rename = "exportTo")]
    pub export_to: Vec<String>,
    /// Applies only to client workloads in the rule's namespace whose labels match.
    #[serde(default, rename = "workloadSelector")]
    pub workload_selector: Option<WorkloadSelector>,
}

/// networking.istio.io/v1 DestinationRule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationRule {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DestinationRuleSpec,
}

/// Whether an `exportTo` list (of an object in `own_ns`) makes it visible in `client_ns`
/// (absent or empty: everywhere; `.`: its own namespace; `~`: nowhere; `*`: everywhere).
pub fn exported_to(export_to: &[String], own_ns: &str, client_ns: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || e == client_ns || (e == "." && own_ns == client_ns))
}

/// A host of a DestinationRule or ServiceEntry as a full name: only a name without a dot is
/// short and expanded with the object's namespace (`model.ResolveShortnameToFQDN`).
pub fn resolve_host(host: &str, ns: &str, domain: &str) -> String {
    if host.contains('.') || host.starts_with('*') {
        host.to_owned()
    } else {
        format!("{host}.{ns}.svc.{domain}")
    }
}

impl DestinationRule {
    /// How specifically this rule's host names `fqdn`: `Some(len)` of the host when it
    /// matches (exact beats any wildcard; a longer wildcard beats a shorter one), else `None`.
    pub fn host_match(&self, fqdn: &str, domain: &str) -> Option<usize> {
        let ns = self.metadata.namespace.as_deref().unwrap_or("default");
        let host = resolve_host(&self.spec.host, ns, domain);
        if host == fqdn {
            return Some(usize::MAX);
        }
        let suffix = host.strip_prefix('*')?;
        fqdn.ends_with(suffix).then_some(suffix.len())
    }

    /// Whether this rule's host names `fqdn`.
    pub fn matches_host(&self, fqdn: &str, domain: &str) -> bool {
        self.host_match(fqdn, domain).is_some()
    }
}

/// A WorkloadEntry's spec (also the form of a ServiceEntry's inline endpoints).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadEntrySpec {
    #[serde(default)]
    pub address: String,
    /// Port name → port number on this workload.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default, rename = "serviceAccount")]
    pub service_account: Option<String>,
}

/// networking.istio.io/v1 WorkloadEntry: a VM or other non-pod workload.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadEntry {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WorkloadEntrySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntryPort {
    pub number: u32,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default, rename = "targetPort")]
    pub target_port: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntrySelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    /// `MESH_EXTERNAL` (the proto's zero value, so the default) or `MESH_INTERNAL`.
    #[serde(default)]
    pub location: Option<String>,
    /// `NONE` (the default), `STATIC`, `DNS` or `DNS_ROUND_ROBIN`.
    #[serde(default)]
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntrySpec>,
    #[serde(default, rename = "workloadSelector")]
    pub workload_selector: Option<ServiceEntrySelector>,
    #[serde(default, rename = "exportTo")]
    pub export_to: Vec<String>,
}

/// networking.istio.io/v1 ServiceEntry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceEntry {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceEntrySpec,
}

impl ServiceEntry {
    /// `location` is MESH_EXTERNAL unless it says MESH_INTERNAL.
    pub fn mesh_external(&self) -> bool {
        self.spec.location.as_deref() != Some("MESH_INTERNAL")
    }

    /// The resolution, `NONE` when unset.
    pub fn resolution(&self) -> &str {
        self.spec.resolution.as_deref().unwrap_or("NONE")
    }
}
