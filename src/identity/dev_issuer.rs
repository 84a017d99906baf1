//! A local stand-in for a cluster's service-account token issuer, for local runs and tests:
//! a signing key, its JWKS, and tokens shaped exactly like Kubernetes projected tokens.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::OffsetDateTime;

use super::{
    jwt::{self, KubernetesClaims, NameUid, ServiceAccountClaims},
    IdentityError, JwkSet,
};
use crate::{
    ca::{KeyType, PrivateKey},
    state::write_file_atomic,
};

/// The default issuer URL, as in-cluster API servers name themselves.
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Serialize, Deserialize)]
struct IssuerMeta {
    issuer: String,
    kid: String,
}

/// A token to mint.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub namespace: String,
    pub service_account: String,
    pub audiences: Vec<String>,
    pub ttl: Duration,
    pub pod: Option<(String, String)>,
}

/// Why a dev issuer could not be created or loaded.
#[derive(Debug, Error)]
pub enum DevIssuerError {
    #[error("{} already holds an issuer; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: crate::state::StateError,
    },
    #[error("{}: not an issuer description: {source}", path.display())]
    Meta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("{0}")]
    Key(#[from] crate::ca::CaError),
}

fn read(path: &Path) -> Result<Vec<u8>, DevIssuerError> {
    std::fs::read(path).map_err(|source| DevIssuerError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The issuer: key, key id and issuer URL.
pub struct DevIssuer {
    key: PrivateKey,
    kid: String,
    issuer: String,
}

// === impl DevIssuer ===

impl DevIssuer {
    /// Creates `dir` with `key.pem` (0600), `jwks.json` and `issuer.json`. With `key`, imports
    /// that PEM key (RSA or ECDSA, e.g. a cluster's `sa.key`) instead of generating ECDSA P-256.
    pub fn init(dir: &Path, issuer: &str, key: Option<&Path>) -> Result<Self, DevIssuerError> {
        if dir.join("issuer.json").exists() {
            return Err(DevIssuerError::Exists(dir.to_owned()));
        }
        let key = match key {
            Some(p) => PrivateKey::from_pem(&read(p)?, &p.display().to_string())?,
            None => PrivateKey::generate(KeyType::EcdsaP256)?,
        };
        let kid = jwt::kubernetes_kid(&key);
        std::fs::create_dir_all(dir).map_err(|source| DevIssuerError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let jwks = serde_json::to_vec_pretty(&JwkSet::for_key(&key, &kid))?;
        let meta = serde_json::to_vec_pretty(&IssuerMeta {
            issuer: issuer.into(),
            kid: kid.clone(),
        })?;
        let write = |name: &str, bytes: &[u8], mode| {
            let path = dir.join(name);
            write_file_atomic(&path, bytes, mode)
                .map_err(|source| DevIssuerError::Write { path, source })
        };
        write("key.pem", key.secret_pkcs8_pem().as_bytes(), 0o600)?;
        write("jwks.json", &jwks, 0o644)?;
        write("issuer.json", &meta, 0o644)?; // last: its presence marks a complete issuer
        Ok(Self {
            key,
            kid,
            issuer: issuer.into(),
        })
    }

    /// Loads an issuer made by `init`.
    pub fn load(dir: &Path) -> Result<Self, DevIssuerError> {
        let meta_path = dir.join("issuer.json");
        let meta: IssuerMeta =
            serde_json::from_slice(&read(&meta_path)?).map_err(|source| DevIssuerError::Meta {
                path: meta_path.clone(),
                source,
            })?;
        let key = PrivateKey::from_pem(&read(&dir.join("key.pem"))?, "key.pem")?;
        Ok(Self {
            key,
            kid: meta.kid,
            issuer: meta.issuer,
        })
    }

    /// The JWKS path of an issuer directory.
    pub fn jwks_path(dir: &Path) -> PathBuf {
        dir.join("jwks.json")
    }

    /// The issuer URL (`iss`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The public keys.
    pub fn jwks(&self) -> JwkSet {
        JwkSet::for_key(&self.key, &self.kid)
    }

    /// The claims Kubernetes would put in a projected token for `req`, issued at `now`.
    pub fn claims(&self, req: &TokenRequest, now: OffsetDateTime) -> ServiceAccountClaims {
        let now_s = now.unix_timestamp();
        ServiceAccountClaims {
            aud: req.audiences.clone(),
            exp: Some(now_s + req.ttl.as_secs() as i64),
            iat: Some(now_s),
            nbf: Some(now_s),
            iss: Some(self.issuer.clone()),
            sub: Some(format!(
                "system:serviceaccount:{}:{}",
                req.namespace, req.service_account
            )),
            kubernetes: Some(KubernetesClaims {
                namespace: req.namespace.clone(),
                serviceaccount: NameUid {
                    name: req.service_account.clone(),
                    uid: service_account_uid(&req.namespace, &req.service_account),
                },
                pod: req.pod.as_ref().map(|(name, uid)| NameUid {
                    name: name.clone(),
                    uid: uid.clone(),
                }),
                node: None,
                warnafter: None,
            }),
            ..Default::default()
        }
    }

    /// Signs arbitrary claims (tests use this to mint bad tokens).
    pub fn sign(&self, claims: &impl Serialize) -> Result<String, IdentityError> {
        jwt::sign_token(&self.key, &self.kid, claims)
    }

    /// Mints a projected-style token for `req`.
    pub fn token(&self, req: &TokenRequest, now: OffsetDateTime) -> Result<String, IdentityError> {
        self.sign(&self.claims(req, now))
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }
}

/// The UID the dev issuer's tokens give service account `namespace/name` (stable, UUID-shaped),
/// for tests and benchmarks that create the matching object.
pub fn service_account_uid(namespace: &str, name: &str) -> String {
    uid_for(&format!("sa/{namespace}/{name}"))
}

/// A stable UUID-shaped id derived from a name (service-account uids are UUIDs).
fn uid_for(name: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let h = crate::ca::cert::hex(&d.as_ref()[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
