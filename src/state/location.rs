//! Where the state lives, as operators write it: a directory path, or `kube://NAMESPACE/NAME`
//! for a Kubernetes Secret.

use std::{fmt, path::Path, path::PathBuf, str::FromStr, sync::Arc};

use serde::{Deserialize, Serialize};

use super::{dir::DirStore, error::StateError, kube::KubeStore, store::StateStore};

/// A state location.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StateLocation {
    Dir(PathBuf),
    Secret { namespace: String, name: String },
}

/// Why a location is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    #[error("{0:?}: a Secret location is kube://NAMESPACE/NAME")]
    NotNamespaceName(String),
    #[error("{input:?}: {part} {value:?} is not a valid Kubernetes name (lowercase letters, digits, '-', '.'; at most {max} characters)")]
    BadName {
        input: String,
        part: &'static str,
        value: String,
        max: usize,
    },
    #[error("the state location is empty")]
    Empty,
}

fn dns_name(s: &str, max: usize, dots: bool) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.')
        })
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

impl FromStr for StateLocation {
    type Err = LocationError;

    fn from_str(s: &str) -> Result<Self, LocationError> {
        let Some(rest) = s.strip_prefix("kube://") else {
            if s.is_empty() {
                return Err(LocationError::Empty);
            }
            return Ok(Self::Dir(PathBuf::from(s)));
        };
        let (namespace, name) = rest
            .split_once('/')
            .ok_or_else(|| LocationError::NotNamespaceName(s.to_owned()))?;
        let bad = |part, value: &str, max| LocationError::BadName {
            input: s.to_owned(),
            part,
            value: value.to_owned(),
            max,
        };
        // A namespace is a DNS-1123 label, a Secret's name a DNS-1123 subdomain.
        if !dns_name(namespace, 63, false) {
            return Err(bad("namespace", namespace, 63));
        }
        if !dns_name(name, 253, true) {
            return Err(bad("name", name, 253));
        }
        Ok(Self::Secret {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl TryFrom<String> for StateLocation {
    type Error = LocationError;
    fn try_from(s: String) -> Result<Self, LocationError> {
        s.parse()
    }
}

impl From<StateLocation> for String {
    fn from(l: StateLocation) -> String {
        l.to_string()
    }
}

impl fmt::Display for StateLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dir(p) => write!(f, "{}", p.display()),
            Self::Secret { namespace, name } => {
                f.write_str(&super::kube::location_of(namespace, name))
            }
        }
    }
}

impl StateLocation {
    /// The store at this location; a Secret is reached with `kubeconfig` (in-cluster or
    /// `KUBECONFIG` when `None`).
    pub fn open(&self, kubeconfig: Option<&Path>) -> Result<Arc<dyn StateStore>, StateError> {
        Ok(match self {
            Self::Dir(dir) => Arc::new(DirStore::new(dir)),
            Self::Secret { namespace, name } => {
                Arc::new(KubeStore::connect(namespace, name, kubeconfig)?)
            }
        })
    }

    /// The directory, when the state is in one.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Self::Dir(d) => Some(d),
            Self::Secret { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_directories_and_secrets() {
        assert_eq!(
            "/var/lib/meshid".parse::<StateLocation>().unwrap(),
            StateLocation::Dir("/var/lib/meshid".into())
        );
        let s: StateLocation = "kube://istio-system/meshid-ca-state".parse().unwrap();
        assert_eq!(
            s,
            StateLocation::Secret {
                namespace: "istio-system".into(),
                name: "meshid-ca-state".into()
            }
        );
        assert_eq!(s.to_string(), "kube://istio-system/meshid-ca-state");
        for bad in [
            "",
            "kube://",
            "kube://ns",
            "kube://ns/",
            "kube:///name",
            "kube://Ns/name",
            "kube://ns/na_me",
            "kube://ns/name/extra",
            "kube://a.b/name",
        ] {
            assert!(bad.parse::<StateLocation>().is_err(), "{bad}");
        }
    }
}
