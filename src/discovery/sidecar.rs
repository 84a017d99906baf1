//! Does an endpoint have a sidecar? Istio's rule is the pod label
//! `security.istio.io/tlsMode: istio`; what the pod runs is checked too, and disagreement is
//! reported (a label without a proxy fails every mTLS handshake; a proxy without the label
//! gets plaintext it would have accepted as mTLS).

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

use super::TLS_MODE_LABEL;

const PROXY_CONTAINER: &str = "istio-proxy";
const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// An endpoint's transport mode, as Istio labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Istio,
    Disabled,
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Istio => "istio",
            Self::Disabled => "disabled",
        })
    }
}

/// What a pod says about its sidecar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SidecarInfo {
    /// From the label: the decision input.
    pub tls_mode: TlsMode,
    /// Whether the pod runs an `istio-proxy` container (or carries the injection annotation).
    pub runs_proxy: bool,
    /// Disagreements between the label and what the pod runs.
    pub warnings: Vec<String>,
}

/// Reads a pod's sidecar status.
pub fn sidecar_of(pod: &Pod) -> SidecarInfo {
    let labels = pod.metadata.labels.as_ref();
    let tls_mode = match labels
        .and_then(|l| l.get(TLS_MODE_LABEL))
        .map(String::as_str)
    {
        Some("istio") => TlsMode::Istio,
        _ => TlsMode::Disabled,
    };
    let spec = pod.spec.as_ref();
    let in_containers = spec.is_some_and(|s| {
        s.containers.iter().any(|c| c.name == PROXY_CONTAINER)
            || s.init_containers
                .iter()
                .flatten()
                .any(|c| c.name == PROXY_CONTAINER) // native sidecar
    });
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(STATUS_ANNOTATION));
    let runs_proxy = in_containers || annotated;
    let mut warnings = Vec::new();
    match (tls_mode, runs_proxy) {
        (TlsMode::Disabled, true) => warnings.push(format!(
            "runs {PROXY_CONTAINER} but lacks the label {TLS_MODE_LABEL}=istio: clients will send it plaintext"
        )),
        (TlsMode::Istio, false) => warnings.push(format!(
            "is labelled {TLS_MODE_LABEL}=istio but runs no {PROXY_CONTAINER}: mTLS to it will fail"
        )),
        _ => {}
    }
    SidecarInfo {
        tls_mode,
        runs_proxy,
        warnings,
    }
}
