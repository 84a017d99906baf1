//! `meshid config check FILE`: parse and validate a server config as `meshid server` would,
//! print the effective values and what it needs at start, and start nothing (as
//! `envoy --mode validate`, `promtool check config` and `nginx -t` do).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use super::Output;
use crate::{config::Config, state::StateLocation};

#[derive(Debug, Subcommand)]
pub(super) enum ConfigCommand {
    /// Parse and validate a server config (every key, every section), print the effective
    /// values with the defaults filled in and what the server would need at start (files, a
    /// Kubernetes API server), without starting anything. Exit 0 when valid, 1 when not.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub(super) struct CheckArgs {
    /// The server's TOML config (see deploy/meshid.toml).
    file: PathBuf,
    /// The callers' clusters come from `meshid server`'s flags (--dev-issuer-dir, --jwks or
    /// --kubeconfig), not from the file: do not require `[[clusters]]`.
    #[arg(long)]
    clusters_from_flags: bool,
    /// Also exit 1 when something the server needs at start is not found on this machine.
    #[arg(long)]
    strict: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

/// One thing the server needs at start, and whether it is there.
struct Need {
    what: String,
    /// `Some(true)`: found here; `Some(false)`: not found here; `None`: cannot be told without
    /// starting (an API server's answer).
    found: Option<bool>,
    detail: String,
}

impl ConfigCommand {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        let Self::Check(a) = self;
        let text = std::fs::read_to_string(&a.file)
            .with_context(|| format!("reading {}", a.file.display()))?;
        let cfg: Config = match toml::from_str(&text) {
            Ok(c) => c,
            Err(e) => return Ok(invalid(&a, vec![e.to_string().trim().to_owned()])),
        };
        if let Err(mut errs) = cfg.validate() {
            if a.clusters_from_flags && cfg.clusters.is_empty() {
                errs.retain(|e| !e.starts_with("clusters: at least one cluster"));
            }
            if !errs.is_empty() {
                return Ok(invalid(&a, errs));
            }
        }
        let needs = needs(&cfg, a.clusters_from_flags);
        let missing = needs.iter().filter(|n| n.found == Some(false)).count();
        let effective = toml::to_string(&cfg).context("printing the effective configuration")?;
        match a.output {
            Output::Json => {
                let doc = json!({
                    "file": a.file.display().to_string(),
                    "valid": true,
                    "errors": [],
                    "effective": serde_json::to_value(&cfg)?,
                    "needs": needs.iter().map(|n| json!({
                        "what": n.what, "found": n.found, "detail": n.detail,
                    })).collect::<Vec<_>>(),
                });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            }
            Output::Text => {
                outln!("{}: valid", a.file.display());
                outln!();
                outln!("# the effective configuration, defaults filled in");
                out!("{effective}");
                outln!();
                outln!(
                    "# what `meshid server --config {}` needs at start",
                    a.file.display()
                );
                for n in &needs {
                    let mark = match n.found {
                        Some(true) => "found    ",
                        Some(false) => "NOT FOUND",
                        None => "at start ",
                    };
                    outln!("{mark} {}: {}", n.what, n.detail);
                }
            }
        }
        Ok(if a.strict && missing > 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}

fn invalid(a: &CheckArgs, errs: Vec<String>) -> ExitCode {
    match a.output {
        Output::Json => outln!(
            "{}",
            json!({ "file": a.file.display().to_string(), "valid": false, "errors": errs })
        ),
        Output::Text => {
            eprintln!("error: {} is invalid:", a.file.display());
            for e in &errs {
                eprintln!("  - {e}");
            }
        }
    }
    ExitCode::FAILURE
}

/// Where a Kubernetes client would come from: the kubeconfig given, else in-cluster, else
/// `KUBECONFIG` / `~/.kube/config`.
fn kube_need(what: &str, kubeconfig: Option<&std::path::Path>) -> Need {
    match kubeconfig {
        Some(k) => file_need(what, k, "kubeconfig"),
        None => {
            let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
            let env = std::env::var_os("KUBECONFIG").map(PathBuf::from);
            let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config"));
            let found = if in_cluster {
                Some("this pod's service account (in-cluster)".to_owned())
            } else {
                env.iter()
                    .chain(home.iter())
                    .find(|p| p.is_file())
                    .map(|p| format!("kubeconfig {}", p.display()))
            };
            Need {
                what: what.into(),
                found: Some(found.is_some()),
                detail: match found {
                    Some(f) => format!("the Kubernetes API server through {f}"),
                    None => "the Kubernetes API server in-cluster (run in a pod) or through KUBECONFIG / ~/.kube/config: neither is here".into(),
                },
            }
        }
    }
}

fn file_need(what: &str, path: &std::path::Path, kind: &str) -> Need {
    Need {
        what: what.into(),
        found: Some(path.exists()),
        detail: format!("{kind} {}", path.display()),
    }
}

fn needs(cfg: &Config, clusters_from_flags: bool) -> Vec<Need> {
    let mut out = Vec::new();
    match cfg.state_location() {
        StateLocation::Dir(d) => {
            let f = d.join("state.json");
            out.push(Need {
                what: "CA state".into(),
                found: Some(f.is_file()),
                detail: format!(
                    "{} (create it with `meshid ca init --state-dir {}`)",
                    f.display(),
                    d.display()
                ),
            });
        }
        secret => {
            let mut n = kube_need("CA state", cfg.state_kubeconfig.as_deref());
            n.detail = format!("Secret {secret}, read through {}", n.detail);
            out.push(n);
        }
    }
    if cfg.clusters.is_empty() && clusters_from_flags {
        out.push(Need {
            what: "callers' clusters".into(),
            found: None,
            detail: "from meshid server's flags (--dev-issuer-dir, --jwks or --kubeconfig)".into(),
        });
    }
    for c in &cfg.clusters {
        let what = format!("cluster {} tokens", c.name);
        if let Some(tr) = &c.tokenreview {
            let mut n = kube_need(&what, tr.kubeconfig.as_deref());
            n.detail = format!("TokenReview through {}", n.detail);
            out.push(n);
        }
        if let Some(j) = &c.jwks {
            if let Some(f) = &j.file {
                out.push(file_need(&what, f, "JWKS file"));
            }
            if let Some(u) = j.url.as_ref().or(j.oidc_issuer.as_ref()) {
                out.push(Need {
                    what: what.clone(),
                    found: None,
                    detail: format!("JWKS from {u}"),
                });
            }
            if let Some(api) = &j.api_server {
                let mut n = kube_need(&what, api.kubeconfig.as_deref());
                n.detail = format!("JWKS from the API server through {}", n.detail);
                out.push(n);
            }
            if let Some(ca) = &j.ca_file {
                out.push(file_need(&what, ca, "CA file"));
            }
        }
    }
    if let Some(d) = &cfg.discovery {
        if let Some(s) = &d.snapshot {
            out.push(file_need("discovery", s, "snapshot"));
        }
        if d.kubeconfig.is_some() || d.in_cluster {
            let mut n = kube_need("discovery", d.kubeconfig.as_deref());
            n.detail = format!(
                "a watch of pods, services, endpointslices and Istio's objects through {}",
                n.detail
            );
            out.push(n);
        }
    }
    if let Some(u) = &cfg.listen.unix {
        let dir = u.parent().unwrap_or(std::path::Path::new("."));
        out.push(file_need("Unix socket", dir, "directory"));
    }
    if let Some(e) = &cfg.federation.bundle_endpoint {
        for (k, f) in [("certificate", &e.cert_file), ("key", &e.key_file)] {
            if let Some(f) = f {
                out.push(file_need("bundle endpoint", f, k));
            }
        }
    }
    for p in &cfg.federation.peers {
        if let Some(ca) = &p.ca_file {
            out.push(file_need(
                &format!("peer {}", p.trust_domain),
                ca,
                "CA file",
            ));
        }
    }
    if cfg.leader_election.enabled || cfg.root_cert_configmap.enabled {
        let what = if cfg.leader_election.enabled {
            "leader election"
        } else {
            "root ConfigMap"
        };
        out.push(kube_need(what, cfg.state_kubeconfig.as_deref()));
    }
    out
}
