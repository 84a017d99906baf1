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

/// A DestinationRule `tls:` block (`ClientTLSSettings`). A block without `mode` is DISABLE: the
/// proto enum's zero value (networking/v1alpha3 `ClientTLSSettings.TLSmode`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTls {
    #[serde(default)]
    pub mode: Option<String>,
    /// `kubernetes://` secret (or `configmap://`) the proxy loads the client certificate from.
    #[serde(
        default,
        rename = "credentialName",
        skip_serializing_if = "Option::is_none"
    )]
    pub credential_name: Option<String>,
    #[serde(
        default,
        rename = "clientCertificate",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_certificate: Option<String>,
    #[serde(
        default,
        rename = "privateKey",
        skip_serializing_if = "Option::is_none"
    )]
    pub private_key: Option<String>,
    /// For ISTIO_MUTUAL: the identities the server must present instead of the service's
    /// service accounts.
    #[serde(
        default,
        rename = "subjectAltNames",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub subject_alt_names: Vec<String>,
    /// Fields meshid reads no further (`sni`, `caCertificates`, `insecureSkipVerify`, ...):
    /// none of them changes which of mTLS / TLS / plaintext is sent.
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A DestinationRule `tls.mode` that is not one of Istio's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "DestinationRule tls mode {0:?} is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL; ignored"
)]
pub struct UnknownTlsMode(pub String);

impl ClientTls {
    /// The mode; an error naming the raw value when it is not one Istio knows.
    pub fn parsed(&self) -> Result<DrTlsMode, UnknownTlsMode> {
        match self.mode.as_deref() {
            None | Some("") => Ok(DrTlsMode::Disable),
            Some(raw) => DrTlsMode::parse(raw).ok_or_else(|| UnknownTlsMode(raw.to_owned())),
        }
    }

    fn non_empty(v: &Option<String>) -> bool {
        v.as_deref().is_some_and(|s| !s.is_empty())
    }

    /// `cluster_tls.go` `buildUpstreamClusterTLSContext`: why a SIMPLE or MUTUAL setting
    /// yields no TLS at all on a sidecar, if it does. `dr_has_selector`: the rule carries a
    /// `workloadSelector`.
    pub fn dropped_on_sidecar(&self, dr_has_selector: bool) -> Option<&'static str> {
        let mode = self.parsed().ok()?;
        if !matches!(mode, DrTlsMode::Simple | DrTlsMode::Mutual) {
            return None;
        }
        let cred = self.credential_name.as_deref().unwrap_or("");
        if !cred.is_empty() && !cred.starts_with("configmap://") && !dr_has_selector {
            return Some("credentialName on a DestinationRule without workloadSelector is ignored by sidecars: no TLS (buildUpstreamClusterTLSContext)");
        }
        if mode == DrTlsMode::Mutual
            && cred.is_empty()
            && !(Self::non_empty(&self.client_certificate) && Self::non_empty(&self.private_key))
        {
            return Some("MUTUAL without clientCertificate and privateKey (or credentialName): istiod fails to build the TLS context and the cluster gets none (constructUpstreamTLS)");
        }
        None
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
    #[serde(default, rename = "loadBalancer")]
    pub load_balancer: Option<LoadBalancer>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancer {
    #[serde(default)]
    pub simple: Option<String>,
}

/// The two parts of a traffic policy auto mTLS depends on, for one port (after istiod's
/// port-level and subset merges).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EffectivePolicy {
    pub tls: Option<ClientTls>,
    pub load_balancer: Option<LoadBalancer>,
}

impl EffectivePolicy {
    /// `loadBalancer.simple: PASSTHROUGH`: an ORIGINAL_DST cluster.
    pub fn passthrough(&self) -> bool {
        is_passthrough(self.load_balancer.as_ref())
    }
}

fn is_passthrough(lb: Option<&LoadBalancer>) -> bool {
    lb.and_then(|l| l.simple.as_deref()) == Some("PASSTHROUGH")
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficPolicy {
    #[serde(default)]
    pub tls: Option<ClientTls>,
    #[serde(default, rename = "loadBalancer")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, rename = "portLevelSettings")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    /// Fields auto mTLS does not read (`connectionPool`, `tunnel`, ...), named by `ignored.rs`.
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl TrafficPolicy {
    fn port_entry(&self, port: u16) -> Option<&PortTrafficPolicy> {
        self.port_level_settings
            .iter()
            .find(|p| p.port.as_ref().is_some_and(|s| s.number == u32::from(port)))
    }

    /// `util.go` `GetPortLevelTrafficPolicy`: a port entry replaces the whole policy (fields it
    /// omits fall back to defaults, not to the top level). `(policy, from a port entry)`.
    pub fn for_port(&self, port: u16) -> (EffectivePolicy, bool) {
        match self.port_entry(port) {
            Some(p) => (
                EffectivePolicy {
                    tls: p.tls.clone(),
                    load_balancer: p.load_balancer.clone(),
                },
                true,
            ),
            None => (
                EffectivePolicy {
                    tls: self.tls.clone(),
                    load_balancer: self.load_balancer.clone(),
                },
                false,
            ),
        }
    }

    /// `mtls_checker.go` `trafficPolicyTLSModeForPort`: the port entry's tls when it has
    /// one, else the top-level tls.
    pub fn tls_for_port(&self, port: u16) -> Option<&ClientTls> {
        self.port_entry(port)
            .and_then(|p| p.tls.as_ref())
            .or(self.tls.as_ref())
    }

    /// The top-level `loadBalancer.simple: PASSTHROUGH` (what `BestEffortInferServiceMTLSMode`
    /// looks at).
    pub fn passthrough(&self) -> bool {
        is_passthrough(self.load_balancer.as_ref())
    }
}

/// `util.go` `MergeSubsetTrafficPolicy` (+ `model.MergeTrafficPolicy`): the rule's policy for
/// the port, overridden by the subset's: a subset port entry replaces tls and loadBalancer even
/// when it omits them, a subset top-level field only when set.
pub fn merge_subset_policy(
    top: Option<&TrafficPolicy>,
    subset: Option<&TrafficPolicy>,
    port: u16,
) -> Option<EffectivePolicy> {
    let original = top.map(|t| t.for_port(port).0);
    let Some(sub) = subset else {
        return original;
    };
    let (sub, has_port_level) = sub.for_port(port);
    let Some(mut merged) = original else {
        return Some(sub);
    };
    if sub.tls.is_some() || has_port_level {
        merged.tls = sub.tls;
    }
    if sub.load_balancer.is_some() || has_port_level {
        merged.load_balancer = sub.load_balancer;
    }
    Some(merged)
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
    #[serde(default, rename = "subjectAltNames")]
    pub subject_alt_names: Vec<String>,
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
