//! HTTPS GETs for OIDC discovery and JWKS fetches: the one HTTP client (`crate::http_client`)
//! with the system roots plus optional extra CAs.

use std::{sync::Arc, time::Duration};

use rustls_pki_types::{pem::PemObject, CertificateDer};

use super::IdentityError;

const MAX_BODY: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches small documents over HTTPS, trusting the system roots plus optional extra CAs.
#[derive(Clone)]
pub(crate) struct HttpsGetter {
    tls: Arc<rustls::ClientConfig>,
}

impl HttpsGetter {
    pub(crate) fn new(extra_ca_pem: Option<&[u8]>) -> Result<Self, IdentityError> {
        let bad = |e: String| IdentityError::JwksUnavailable(e);
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(pem) = extra_ca_pem {
            for c in CertificateDer::pem_slice_iter(pem) {
                let c = c.map_err(|e| bad(format!("extra CA is not PEM: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| bad(format!("extra CA is unusable: {e}")))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self { tls: Arc::new(tls) })
    }

    /// GETs `url`, requiring a 200 and a body under 1 MiB, within 10 s.
    pub(crate) async fn get(&self, url: &str) -> Result<Vec<u8>, IdentityError> {
        // No media type is asked for: kube-apiserver answers `/openid/v1/jwks` as
        // `application/jwk-set+json` and refuses `Accept: application/json` with 406; go-oidc's
        // `RemoteKeySet` (what Istio uses) sends no Accept header either.
        crate::http_client::Get {
            accept: "*/*",
            ..crate::http_client::Get::new(url)
        }
        .tls(self.tls.clone())
        .timeout(TIMEOUT)
        .max_body(MAX_BODY)
        .send()
        .await
        .map(|body| body.to_vec())
        .map_err(|e| IdentityError::JwksUnavailable(e.to_string()))
    }
}
