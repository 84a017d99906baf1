//! Istio's CustomResourceDefinitions as istio.io/api publishes them
//! (`kubernetes/customresourcedefinitions.gen.yaml` of the module that `tools/kube-bins.sh`
//! downloads), created on a real API server and waited for until established.

use std::{path::Path, time::Duration};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    api::{Api, PostParams},
    runtime::wait::{await_condition, conditions},
};

/// Creates every CRD in `yaml_path`; panics unless the ones meshid watches are among them.
pub async fn install(client: &kube::Client, yaml_path: &Path) {
    let text = std::fs::read_to_string(yaml_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", yaml_path.display()));
    let crds: Vec<CustomResourceDefinition> = serde_yaml_ng::Deserializer::from_str(&text)
        .filter_map(|d| {
            let v: serde_json::Value = serde::Deserialize::deserialize(d).unwrap();
            (v["kind"] == "CustomResourceDefinition").then(|| serde_json::from_value(v).unwrap())
        })
        .collect();
    let names: Vec<String> = crds
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    for needed in [
        "peerauthentications.security.istio.io",
        "destinationrules.networking.istio.io",
        "serviceentries.networking.istio.io",
        "workloadentries.networking.istio.io",
    ] {
        assert!(
            names.iter().any(|n| n == needed),
            "{} has no CRD {needed}",
            yaml_path.display()
        );
    }
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in &crds {
        match api.create(&PostParams::default(), crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("creating CRD {:?}: {e}", crd.metadata.name),
        }
    }
    for name in &names {
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(api.clone(), name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not established within 60 s"))
        .unwrap();
    }
}
