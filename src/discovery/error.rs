use thiserror::Error;

/// Why mesh objects could not be read or a name not found.
#[derive(Debug, Error)]
pub enum DiscoveryError {
    #[error("snapshot is neither a kubectl JSON nor YAML document: {0}")]
    NotADocument(String),
    #[error("{kind} {name}: {why}")]
    BadObject {
        kind: String,
        name: String,
        why: String,
    },
    #[error("{what} {name} not found{}", if .known.is_empty() { String::new() } else { format!("; known: {}", .known.join(", ")) })]
    NotFound {
        what: &'static str,
        name: String,
        known: Vec<String>,
    },
    #[error("{0:?} is not NAME.NAMESPACE")]
    BadName(String),
}
