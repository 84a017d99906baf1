//! Mesh objects from a snapshot: what `kubectl get pods,endpointslices,services,namespaces,
//! peerauthentications,destinationrules,serviceentries,workloadentries -A -o json` (or `-o yaml`)
//! prints.

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{
    istio::{ServiceEntry, WorkloadEntry},
    DestinationRule, DiscoveryError, PeerAuthentication,
};

/// Mesh-wide settings that are not Kubernetes objects (Istio's MeshConfig).
#[derive(Clone, Debug)]
pub struct MeshSettings {
    /// Istio's `enableAutoMtls` (on by default).
    pub auto_mtls: bool,
    /// The root namespace, whose selector-less PeerAuthentication is mesh-wide.
    pub root_namespace: String,
    /// The cluster DNS domain.
    pub domain: String,
    /// `discovery.require_proxy_proof`: a pod labelled tlsMode=istio whose proxy has not
    /// fetched a certificate is served as tlsMode disabled.
    pub require_proxy_proof: bool,
    /// The name of the cluster the objects (other than `MeshObjects::remotes`) come from.
    pub cluster_name: String,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            auto_mtls: true,
            root_namespace: "istio-system".into(),
            domain: "cluster.local".into(),
            require_proxy_proof: false,
            cluster_name: "Kubernetes".into(),
        }
    }
}

/// Every object auto mTLS reads, from one source.
#[derive(Clone, Debug, Default)]
pub struct MeshObjects {
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub namespaces: Vec<Namespace>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub destination_rules: Vec<DestinationRule>,
    pub service_entries: Vec<ServiceEntry>,
    pub workload_entries: Vec<WorkloadEntry>,
    /// Pods, services and endpointslices of other clusters (multi-cluster discovery).
    pub remotes: Vec<super::multicluster::RemoteObjects>,
    /// Kinds present in the input that auto mTLS does not read (reported, not fatal).
    pub ignored_kinds: Vec<String>,
}

impl MeshObjects {
    /// Parses a snapshot: a JSON `List` (or single object), or YAML with one or more documents.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, DiscoveryError> {
        let text =
            std::str::from_utf8(bytes).map_err(|e| DiscoveryError::NotADocument(e.to_string()))?;
        let trimmed = text.trim_start();
        let docs: Vec<Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
            vec![serde_json::from_str(trimmed)
                .map_err(|e| DiscoveryError::NotADocument(format!("JSON: {e}")))?]
        } else {
            let mut docs = Vec::new();
            for d in serde_yaml_ng::Deserializer::from_str(text) {
                let v: Value = serde::Deserialize::deserialize(d)
                    .map_err(|e| DiscoveryError::NotADocument(format!("YAML: {e}")))?;
                if !v.is_null() {
                    docs.push(v);
                }
            }
            docs
        };
        let mut out = Self::default();
        for doc in docs {
            out.add_value(doc)?;
        }
        Ok(out)
    }

    fn add_value(&mut self, v: Value) -> Result<(), DiscoveryError> {
        if let Value::Array(items) = v {
            for i in items {
                self.add_value(i)?;
            }
            return Ok(());
        }
        let kind = v
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if kind.ends_with("List") {
            if let Some(Value::Array(items)) = v.get("items").cloned() {
                for i in items {
                    self.add_value(i)?;
                }
            }
            return Ok(());
        }
        match kind.as_str() {
            "Pod" => self.pods.push(parse(&kind, v)?),
            "Service" => self.services.push(parse(&kind, v)?),
            "EndpointSlice" => self.endpoint_slices.push(parse(&kind, v)?),
            "Namespace" => self.namespaces.push(parse(&kind, v)?),
            "PeerAuthentication" => self.peer_authentications.push(parse(&kind, v)?),
            "DestinationRule" => self.destination_rules.push(parse(&kind, v)?),
            "ServiceEntry" => self.service_entries.push(parse(&kind, v)?),
            "WorkloadEntry" => self.workload_entries.push(parse(&kind, v)?),
            other => {
                if !self.ignored_kinds.iter().any(|k| k == other) {
                    self.ignored_kinds.push(other.to_owned());
                }
            }
        }
        Ok(())
    }
}

fn parse<T: DeserializeOwned>(kind: &str, v: Value) -> Result<T, DiscoveryError> {
    let name = format!(
        "{}.{}",
        v.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?"),
        v.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
    );
    serde_json::from_value(v).map_err(|e| DiscoveryError::BadObject {
        kind: kind.into(),
        name,
        why: e.to_string(),
    })
}
