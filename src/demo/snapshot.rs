//! The demo's discovery snapshot (the mission's example, rewritten to loopback listeners, with
//! or without a DestinationRule) and the server configuration that reads it.

use std::path::Path;

use serde_json::{json, Value};

use super::DemoError;
use crate::{config::Config, identity::dev_issuer::DevIssuer, state::write_file_atomic};

/// The loopback port each workload's endpoint is served on.
pub(super) struct Ports {
    pub product: u16,
    pub inventory: u16,
    pub legacy: u16,
}

/// The example with every pod IP and endpoint address set to 127.0.0.1 and each service's
/// target port set to the demo listener of its workload (a sidecar's inbound port, or
/// legacy-db's own), so EDS hands out addresses that work.
pub(super) fn rewrite_snapshot(example: &str, ports: &Ports) -> Result<Value, DemoError> {
    let mut doc: Value = serde_yaml_ng::from_str(example)
        .map_err(|e| DemoError::setup("parsing the mixed-traffic example", e))?;
    let port_of = |app: &str| match app {
        "product-service" => Some(ports.product),
        "inventory-service" => Some(ports.inventory),
        "legacy-db" => Some(ports.legacy),
        _ => None,
    };
    let items = doc["items"]
        .as_array_mut()
        .ok_or_else(|| DemoError::setup("the mixed-traffic example", "no items"))?;
    for item in items.iter_mut() {
        match item["kind"].as_str().unwrap_or("") {
            "Pod" => {
                let app = item["metadata"]["labels"]["app"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                let Some(port) = port_of(&app) else { continue };
                item["status"]["podIP"] = json!("127.0.0.1");
                for c in item["spec"]["containers"]
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                {
                    if c["name"] == app.as_str() {
                        c["ports"] = json!([{ "containerPort": port, "protocol": "TCP" }]);
                    }
                }
            }
            "Service" => {
                let name = item["metadata"]["name"].as_str().unwrap_or("").to_owned();
                let Some(port) = port_of(&name) else { continue };
                for p in item["spec"]["ports"].as_array_mut().into_iter().flatten() {
                    p["targetPort"] = json!(port);
                }
            }
            "EndpointSlice" => {
                let svc = item["metadata"]["labels"]["kubernetes.io/service-name"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                let Some(port) = port_of(&svc) else { continue };
                for p in item["ports"].as_array_mut().into_iter().flatten() {
                    p["port"] = json!(port);
                }
                for e in item["endpoints"].as_array_mut().into_iter().flatten() {
                    e["addresses"] = json!(["127.0.0.1"]);
                }
            }
            _ => {}
        }
    }
    Ok(doc)
}

/// `doc` with a DestinationRule forcing `mode` on `host`, as the mission's troubleshooting
/// section shows.
pub fn with_destination_rule(doc: &Value, name: &str, ns: &str, host: &str, mode: &str) -> Value {
    let mut doc = doc.clone();
    if let Some(items) = doc["items"].as_array_mut() {
        items.push(json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": { "name": name, "namespace": ns },
            "spec": { "host": host, "trafficPolicy": { "tls": { "mode": mode } } }
        }));
    }
    doc
}

pub(super) fn write_snapshot(path: &Path, doc: &Value) -> Result<(), DemoError> {
    let yaml = serde_yaml_ng::to_string(doc)
        .map_err(|e| DemoError::setup("serializing the snapshot", e))?;
    let text = format!(
        "# meshid demo: the mixed-traffic example (deploy/examples/mixed-traffic.yaml)\n\
         # with pod IPs and ports rewritten to the demo's loopback listeners.\n{yaml}"
    );
    write_file_atomic(path, text.as_bytes(), 0o644)
        .map_err(|e| DemoError::setup(format!("writing {}", path.display()), e))
}

/// The server's configuration: loopback listeners, the dev issuer's JWKS as the default
/// cluster ("Kubernetes"), discovery from the snapshot. Parsed from TOML so every other key
/// keeps its documented default.
pub(super) fn server_config(
    dir: &Path,
    issuer: &DevIssuer,
    snapshot: &Path,
) -> Result<Config, DemoError> {
    let s = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    let text = format!(
        r#"state_dir = {state}
state_poll_interval = "200ms"

[listen]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

[logging]
level = "warn"

[[clusters]]
name = "Kubernetes"
default = true
audiences = ["istio-ca"]

[clusters.jwks]
issuer = {issuer}
file = {jwks}

[discovery]
snapshot = {snapshot}
"#,
        state = s(&dir.join("state")),
        issuer = toml::Value::String(issuer.issuer().into()),
        jwks = s(&DevIssuer::jwks_path(&dir.join("issuer"))),
        snapshot = s(snapshot),
    );
    Config::from_toml(&text)
        .map_err(|errs| DemoError::setup("the demo's server configuration", errs.join("; ")))
}
