//! The key algorithms meshid knows, by the names the CLI, JSON output and the state use.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The key algorithms meshid knows. ECDSA keys can be generated; RSA keys only imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

// === impl KeyType ===

impl KeyType {
    /// Every key type, in the order the CLI lists them.
    pub const ALL: [KeyType; 5] = [
        Self::EcdsaP256,
        Self::EcdsaP384,
        Self::Rsa2048,
        Self::Rsa3072,
        Self::Rsa4096,
    ];

    /// Stable name, as used on the CLI and in JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
        }
    }

    /// Whether this is an RSA key (RSA leaves may carry keyEncipherment, EC leaves must not).
    pub fn is_rsa(self) -> bool {
        matches!(self, Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096)
    }

    /// The RSA key type of a modulus of `bits` bits, if meshid can sign with it.
    pub(crate) fn from_rsa_bits(bits: usize) -> Option<Self> {
        match bits {
            2048 => Some(Self::Rsa2048),
            3072 => Some(Self::Rsa3072),
            4096 => Some(Self::Rsa4096),
            _ => None,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state file stores key types by their serde names; those must not change.
    #[test]
    fn serde_names_are_stable() {
        let names: Vec<String> = KeyType::ALL
            .iter()
            .map(|k| serde_json::to_string(k).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "\"ecdsa-p256\"",
                "\"ecdsa-p384\"",
                "\"rsa2048\"",
                "\"rsa3072\"",
                "\"rsa4096\""
            ]
        );
    }
}
