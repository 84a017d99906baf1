//! istio-agent's file-mounted SDS names, served by the node-local agent only (the central server
//! never reads files): `file-root:<path>` (a CA bundle from a local file; `file-root:system` for
//! the system roots) and `file-cert:<cert path>~<key path>` (a certificate and key from local
//! files). Istio sidecars ask for them for DestinationRule TLS origination
//! (`credentialName`-less `caCertificates`/`clientCertificate`), as istio-agent's
//! `security/pkg/nodeagent/cache` (`generateFileSecret`) serves them. Each file is watched: a
//! change is re-read and pushed at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use envoy_types::pb::envoy::{
    config::core::v3::{data_source::Specifier, DataSource},
    extensions::transport_sockets::tls::v3::{
        secret, CertificateValidationContext, Secret, TlsCertificate,
    },
};
use tokio::sync::mpsc;

use crate::ca::cert;

/// The prefix of a file-mounted CA bundle name.
pub const FILE_ROOT: &str = "file-root:";
/// The prefix of a file-mounted certificate name.
pub const FILE_CERT: &str = "file-cert:";

/// Whether `name` is a file-mounted name.
pub fn is_file_name(name: &str) -> bool {
    name.starts_with(FILE_ROOT) || name.starts_with(FILE_CERT)
}

/// What a file-mounted name asks for.
#[derive(Debug, PartialEq, Eq)]
enum FileName {
    /// The system's CA certificates.
    SystemRoots,
    Roots(PathBuf),
    Cert {
        cert: PathBuf,
        key: PathBuf,
    },
}

fn absolute(p: &str, what: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(p);
    if p.is_empty() || !path.is_absolute() {
        return Err(format!("{what} path {p:?} is not an absolute path"));
    }
    Ok(path)
}

fn parse(name: &str) -> Result<FileName, String> {
    if let Some(rest) = name.strip_prefix(FILE_ROOT) {
        if rest == "system" {
            return Ok(FileName::SystemRoots);
        }
        return absolute(rest, "file-root").map(FileName::Roots);
    }
    if let Some(rest) = name.strip_prefix(FILE_CERT) {
        let (cert, key) = rest
            .split_once('~')
            .ok_or_else(|| format!("{name:?} is not file-cert:<cert path>~<key path>"))?;
        return Ok(FileName::Cert {
            cert: absolute(cert, "file-cert certificate")?,
            key: absolute(key, "file-cert key")?,
        });
    }
    Err(format!("{name:?} is not a file-mounted name"))
}

fn inline(b: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(b)),
        watched_directory: None,
    })
}

fn read(path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

/// Reads what `name` names, checking it is what it claims (certificates parse; a key is there).
fn load(name: &str, parsed: &FileName) -> Result<Secret, String> {
    let r#type = match parsed {
        FileName::SystemRoots => {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                return Err(format!(
                    "no system CA certificates found ({} error(s))",
                    found.errors.len()
                ));
            }
            secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: inline(cert::to_pem_bundle(&found.certs).into_bytes()),
                ..Default::default()
            })
        }
        FileName::Roots(path) => {
            let pem = read(path)?;
            cert::certs_from_pem(&pem, &path.display().to_string()).map_err(|e| e.to_string())?;
            secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: inline(pem),
                ..Default::default()
            })
        }
        FileName::Cert { cert: c, key } => {
            let chain = read(c)?;
            cert::certs_from_pem(&chain, &c.display().to_string()).map_err(|e| e.to_string())?;
            let key_pem = read(key)?;
            crate::ca::PrivateKey::from_pem(&key_pem, &key.display().to_string())
                .map_err(|e| e.to_string())?;
            secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(chain),
                private_key: inline(key_pem),
                ..Default::default()
            })
        }
    };
    Ok(Secret {
        name: name.to_owned(),
        r#type: Some(r#type),
    })
}

struct Entry {
    parsed: Result<FileName, String>,
    content: Result<Secret, String>,
    _watchers: Vec<notify::RecommendedWatcher>,
}

/// The file-mounted names one stream subscribes to, read and watched.
pub struct FileSecrets {
    entries: BTreeMap<String, Entry>,
    wake_tx: mpsc::Sender<()>,
    wake_rx: mpsc::Receiver<()>,
}

impl Default for FileSecrets {
    fn default() -> Self {
        let (wake_tx, wake_rx) = mpsc::channel(1);
        Self {
            entries: BTreeMap::new(),
            wake_tx,
            wake_rx,
        }
    }
}

impl FileSecrets {
    /// Starts reading and watching the file names of `subscribed`; stops for the others.
    pub fn sync(&mut self, subscribed: &BTreeSet<String>) {
        self.entries.retain(|name, _| subscribed.contains(name));
        for name in subscribed.iter().filter(|n| is_file_name(n)) {
            if self.entries.contains_key(name) {
                continue;
            }
            let parsed = parse(name);
            let mut watchers = Vec::new();
            let paths: Vec<&PathBuf> = match &parsed {
                Ok(FileName::Roots(p)) => vec![p],
                Ok(FileName::Cert { cert, key }) => vec![cert, key],
                _ => Vec::new(),
            };
            for p in paths {
                match crate::fswatch::watch_file(p, self.wake_tx.clone()) {
                    Ok(w) => watchers.push(w),
                    Err(e) => {
                        tracing::warn!(file = %p.display(), error = %e, "cannot watch the file; changes are picked up on the next subscription")
                    }
                }
            }
            let content = parsed
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|p| load(name, p));
            if let Err(e) = &content {
                tracing::info!(name, error = %e, "file-mounted secret not available; sent once it is");
            }
            self.entries.insert(
                name.clone(),
                Entry {
                    parsed,
                    content,
                    _watchers: watchers,
                },
            );
        }
    }

    /// The secret of `name`, or why it is not available.
    pub fn get(&self, name: &str) -> Option<&Result<Secret, String>> {
        self.entries.get(name).map(|e| &e.content)
    }

    /// Why `name` is not served (`None` when it is, or when it is not a file name).
    pub fn unavailable(&self, name: &str) -> Option<String> {
        if !is_file_name(name) {
            return None;
        }
        match self.entries.get(name) {
            Some(Entry { content: Ok(_), .. }) => None,
            Some(Entry {
                content: Err(e), ..
            }) => Some(e.clone()),
            None => parse(name).err().or(Some("not read yet".into())),
        }
    }

    /// Completes when a watched file changed, after re-reading every entry; never while none is
    /// watched.
    pub async fn changed(&mut self) {
        if self.entries.is_empty() {
            return std::future::pending().await;
        }
        if self.wake_rx.recv().await.is_none() {
            return std::future::pending().await;
        }
        for (name, e) in &mut self.entries {
            if let Ok(p) = &e.parsed {
                e.content = load(name, p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_parse_as_istio_agent_writes_them() {
        assert_eq!(parse("file-root:system"), Ok(FileName::SystemRoots));
        assert_eq!(
            parse("file-root:/etc/certs/root.pem"),
            Ok(FileName::Roots("/etc/certs/root.pem".into()))
        );
        assert_eq!(
            parse("file-cert:/etc/certs/cert.pem~/etc/certs/key.pem"),
            Ok(FileName::Cert {
                cert: "/etc/certs/cert.pem".into(),
                key: "/etc/certs/key.pem".into()
            })
        );
        assert!(parse("file-cert:/etc/certs/cert.pem")
            .unwrap_err()
            .contains("~"));
        assert!(parse("file-root:relative.pem")
            .unwrap_err()
            .contains("absolute"));
        assert!(parse("file-cert:/a.pem~").unwrap_err().contains("absolute"));
    }
}
