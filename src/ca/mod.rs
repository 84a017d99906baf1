//! The authority: keys, signing certificates, leaf issuance (template → sign → validate),
//! plug-in CA import with its CRLs, and TTL policy.

mod authority;
pub mod cert;
pub mod chain;
pub mod crl;
pub mod csr;
pub(crate) mod der;
mod error;
mod issuer_name;
mod key;
mod key_type;
pub mod plugin;
mod policy;
mod profile;
pub mod root;
pub mod sig;
mod validate;

pub use authority::{Authority, IssuedCert, SigningMaterial};
pub use cert::{CertDer, Serial};
pub use csr::SanCheck;
pub use error::{CaError, CannotSign, ChainError, CrlError, PolicyError, ValidationError};
pub use key::PrivateKey;
pub use key_type::KeyType;
pub use policy::{IssuancePolicy, DEFAULT_BACKDATE, DEFAULT_MAX_TTL, DEFAULT_TTL};
pub use validate::LeafValidator;
