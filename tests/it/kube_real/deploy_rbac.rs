//! deploy/kubernetes/base as `kubectl kustomize` renders it: its Namespace, ServiceAccount and
//! RBAC objects applied to a real API server, and its ConfigMap's `meshid.toml`.

use k8s_openapi::api::{
    core::v1::{Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use kube::{
    api::{Api, PostParams},
    Resource,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

/// The objects of `kubectl kustomize deploy/kubernetes/base`.
pub fn rendered_base() -> Vec<Value> {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/base");
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&base)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl is needed to render deploy/kubernetes/base (.ci/run installs it): {e}")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        base.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// `meshid.toml` of the rendered ConfigMap meshid-config.
pub fn deployed_config_toml() -> String {
    rendered_base()
        .into_iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "meshid-config")
        .and_then(|o| o["data"]["meshid.toml"].as_str().map(str::to_owned))
        .expect("deploy/kubernetes/base renders ConfigMap meshid-config with meshid.toml")
}

async fn create<K>(client: &kube::Client, obj: &Value)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let ns = obj["metadata"]["namespace"]
        .as_str()
        .expect("a namespaced object names its namespace");
    let k: K = serde_json::from_value(obj.clone()).unwrap();
    ok_or_exists(
        Api::<K>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &k)
            .await,
        obj,
    );
}

async fn create_cluster<K>(client: &kube::Client, obj: &Value)
where
    K: Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let k: K = serde_json::from_value(obj.clone()).unwrap();
    ok_or_exists(
        Api::<K>::all(client.clone())
            .create(&PostParams::default(), &k)
            .await,
        obj,
    );
}

fn ok_or_exists<K>(r: Result<K, kube::Error>, obj: &Value) {
    match r {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating {} {}: {e}", obj["kind"], obj["metadata"]["name"]),
    }
}

/// Creates the base's Namespace, ServiceAccount, ClusterRole(Binding) and Role(Binding).
pub async fn apply(client: &kube::Client) {
    let objs = rendered_base();
    let kinds = [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ];
    for kind in kinds {
        for o in objs.iter().filter(|o| o["kind"] == kind) {
            match kind {
                "Namespace" => create_cluster::<Namespace>(client, o).await,
                "ServiceAccount" => create::<ServiceAccount>(client, o).await,
                "ClusterRole" => create_cluster::<ClusterRole>(client, o).await,
                "ClusterRoleBinding" => create_cluster::<ClusterRoleBinding>(client, o).await,
                "Role" => create::<Role>(client, o).await,
                _ => create::<RoleBinding>(client, o).await,
            }
        }
    }
    for needed in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"] {
        assert!(
            objs.iter().any(|o| o["kind"] == needed),
            "deploy/kubernetes/base renders no {needed}"
        );
    }
}
