//! Remote-secret kubeconfigs, made safe before a client is built from them (istiod:
//! `pkg/kube/util.go` `sanitizeKubeConfig`). A Secret labelled `istio/multiCluster=true` is
//! written by whoever may write Secrets in the root namespace, yet its kubeconfig would make
//! meshid run programs (`exec`, auth-provider `cmd-path`), read local files (`tokenFile`, client
//! certificate, key and CA paths: meshid's own service-account token among them) and send what
//! they hold to any server. So every such option is refused unless an operator allows it by
//! name (istiod: `PILOT_INSECURE_MULTICLUSTER_KUBECONFIG_OPTIONS`), and so is
//! `insecure-skip-tls-verify`. Kubeconfigs an operator configures (`discovery.clusters`) are
//! trusted as istiod trusts its own.

use std::collections::BTreeSet;

use kube::config::Kubeconfig;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a remote secret's kubeconfig was not used. The variant's `reason` is the metric label.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum KubeconfigRefused {
    #[error("not a kubeconfig: {0}")]
    Unreadable(String),
    #[error("user {user:?} runs a program (exec {command:?}); allow it with discovery.insecure_kubeconfig_options = [\"exec\"]")]
    Exec { user: String, command: String },
    #[error("user {user:?} uses auth provider {provider:?} (only oidc is safe: the others run programs or read files); allow it with discovery.insecure_kubeconfig_options = [{provider:?}]")]
    AuthProvider { user: String, provider: String },
    #[error("{what} of {owner:?} reads the local file {path:?}; allow it with discovery.insecure_kubeconfig_options = [{option:?}]")]
    File {
        what: &'static str,
        option: &'static str,
        owner: String,
        path: String,
    },
    #[error("cluster {cluster:?} turns off TLS verification (insecure-skip-tls-verify), so a token would go to whoever answers; allow it with discovery.insecure_kubeconfig_options = [\"insecureSkipTlsVerify\"]")]
    InsecureSkipTlsVerify { cluster: String },
    #[error("building a client: {0}")]
    Client(String),
}

impl KubeconfigRefused {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreadable(_) => "unreadable",
            Self::Exec { .. } => "exec",
            Self::AuthProvider { .. } => "auth_provider",
            Self::File { option, .. } => option,
            Self::InsecureSkipTlsVerify { .. } => "insecureSkipTlsVerify",
            Self::Client(_) => "client",
        }
    }
}

/// The names `discovery.insecure_kubeconfig_options` accepts besides auth-provider names:
/// istiod's (`exec`, `tokenFile`, `clientCertificate`, `clientKey`) and meshid's stricter two.
pub const OPTION_NAMES: [&str; 6] = [
    "exec",
    "tokenFile",
    "clientCertificate",
    "clientKey",
    "certificateAuthority",
    "insecureSkipTlsVerify",
];

/// Auth providers other than oidc: each runs a program or reads files.
const AUTH_PROVIDERS: [&str; 3] = ["gcp", "azure", "openstack"];

/// Which unsafe kubeconfig options an operator allows in remote secrets (none by default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KubeconfigPolicy {
    allowed: BTreeSet<String>,
}

impl KubeconfigPolicy {
    /// Allows these options (names from [`OPTION_NAMES`], or an auth provider's name).
    pub fn allowing<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        Self {
            allowed: names.into_iter().map(Into::into).collect(),
        }
    }

    fn allows(&self, option: &str) -> bool {
        self.allowed.contains(option)
    }

    /// Every allowed name that is neither an option of [`OPTION_NAMES`] nor an auth provider
    /// meshid's kube client knows (`gcp`, `azure`, `openstack`), each naming the key.
    pub fn validate(&self) -> Vec<String> {
        self.allowed
            .iter()
            .filter(|n| !OPTION_NAMES.contains(&n.as_str()) && !AUTH_PROVIDERS.contains(&n.as_str()))
            .map(|n| format!("discovery.insecure_kubeconfig_options: {n:?} is not one of {} or an auth provider ({})", OPTION_NAMES.join(", "), AUTH_PROVIDERS.join(", ")))
            .collect()
    }

    /// `Ok` when `kc` uses no option this policy does not allow.
    pub fn check(&self, kc: &Kubeconfig) -> Result<(), KubeconfigRefused> {
        for named in &kc.auth_infos {
            let user = named.name.clone();
            let Some(a) = &named.auth_info else { continue };
            if let Some(exec) = &a.exec {
                if !self.allows("exec") {
                    return Err(KubeconfigRefused::Exec {
                        user,
                        command: exec.command.clone().unwrap_or_default(),
                    });
                }
            }
            if let Some(p) = &a.auth_provider {
                if p.name != "oidc" && !self.allows(&p.name) {
                    return Err(KubeconfigRefused::AuthProvider {
                        user,
                        provider: p.name.clone(),
                    });
                }
            }
            for (what, option, path) in [
                ("tokenFile", "tokenFile", &a.token_file),
                (
                    "client-certificate",
                    "clientCertificate",
                    &a.client_certificate,
                ),
                ("client-key", "clientKey", &a.client_key),
            ] {
                self.file(what, option, &user, path)?;
            }
        }
        for named in &kc.clusters {
            let Some(c) = &named.cluster else { continue };
            let cluster = named.name.clone();
            self.file(
                "certificate-authority",
                "certificateAuthority",
                &cluster,
                &c.certificate_authority,
            )?;
            if c.insecure_skip_tls_verify == Some(true) && !self.allows("insecureSkipTlsVerify") {
                return Err(KubeconfigRefused::InsecureSkipTlsVerify { cluster });
            }
        }
        Ok(())
    }

    fn file(
        &self,
        what: &'static str,
        option: &'static str,
        owner: &str,
        path: &Option<String>,
    ) -> Result<(), KubeconfigRefused> {
        match path {
            Some(p) if !p.is_empty() && !self.allows(option) => Err(KubeconfigRefused::File {
                what,
                option,
                owner: owner.to_owned(),
                path: p.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// A kube client from a remote secret's kubeconfig YAML, after [`Self::check`]: nothing is
    /// run, read or sent before the check passes.
    pub async fn client(&self, yaml: &str) -> Result<kube::Client, KubeconfigRefused> {
        let kc = Kubeconfig::from_yaml(yaml)
            .map_err(|e| KubeconfigRefused::Unreadable(e.to_string()))?;
        self.check(&kc)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|e| KubeconfigRefused::Client(e.to_string()))?;
        kube::Client::try_from(config).map_err(|e| KubeconfigRefused::Client(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kc(user: &str, cluster: &str) -> Kubeconfig {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- name: c\n  context: {{cluster: k, user: u}}\nclusters:\n- name: k\n  cluster:\n    server: https://127.0.0.1:6443\n{cluster}users:\n- name: u\n  user:\n{user}"
        );
        Kubeconfig::from_yaml(&yaml).unwrap()
    }

    /// istiod `sanitizeKubeConfig` (pkg/kube/util.go), one row per refused option, plus meshid's
    /// two stricter rows (a CA file path and insecure-skip-tls-verify), each with the option
    /// that allows it.
    #[test]
    fn sanitize_kube_config_refuses_what_runs_programs_or_reads_files() {
        let rows: [(&str, &str, &str, &str); 8] = [
            (
                "exec plugin",
                "    exec: {apiVersion: client.authentication.k8s.io/v1, command: sh, args: [-c, 'touch /tmp/x']}\n",
                "",
                "exec",
            ),
            (
                "gcp auth provider (runs cmd-path)",
                "    auth-provider: {name: gcp, config: {cmd-path: /bin/sh}}\n",
                "",
                "gcp",
            ),
            ("tokenFile", "    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token\n", "", "tokenFile"),
            ("client certificate path", "    client-certificate: /etc/x.crt\n", "", "clientCertificate"),
            ("client key path", "    client-key: /etc/x.key\n", "", "clientKey"),
            ("CA path", "    token: t\n", "    certificate-authority: /etc/ca.crt\n", "certificateAuthority"),
            ("insecure-skip-tls-verify", "    token: t\n", "    insecure-skip-tls-verify: true\n", "insecureSkipTlsVerify"),
            ("azure auth provider", "    auth-provider: {name: azure, config: {}}\n", "", "azure"),
        ];
        for (name, user, cluster, option) in rows {
            let k = kc(user, cluster);
            let err = KubeconfigPolicy::default().check(&k).unwrap_err();
            assert!(
                err.to_string().contains(&format!("{option:?}")),
                "{name}: the refusal names the option that allows it: {err}"
            );
            assert!(
                KubeconfigPolicy::allowing([option]).check(&k).is_ok(),
                "{name}: allowed by name"
            );
        }
        let safe = [
            (
                "inline token",
                "    token: abc\n",
                "    certificate-authority-data: Zm9v\n",
            ),
            (
                "oidc provider",
                "    auth-provider: {name: oidc, config: {id-token: x}}\n",
                "",
            ),
            (
                "inline client cert and key",
                "    client-certificate-data: Zm9v\n    client-key-data: Zm9v\n",
                "",
            ),
        ];
        for (name, user, cluster) in safe {
            assert!(
                KubeconfigPolicy::default()
                    .check(&kc(user, cluster))
                    .is_ok(),
                "{name} is safe"
            );
        }
    }
}
