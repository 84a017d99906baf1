//! A small HTTPS GET client (hyper + rustls over ring) for OIDC discovery and JWKS fetches.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use rustls_pki_types::{pem::PemObject, CertificateDer};

use super::IdentityError;

const MAX_BODY: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches small documents over HTTPS, trusting the system roots plus optional extra CAs.
#[derive(Clone)]
pub(crate) struct HttpsGetter {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
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
        let conn = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(conn),
        })
    }

    /// GETs `url`, requiring a 200 and a body under 1 MiB, within 10 s.
    pub(crate) async fn get(&self, url: &str) -> Result<Vec<u8>, IdentityError> {
        let bad = |e: String| IdentityError::JwksUnavailable(format!("GET {url}: {e}"));
        let uri: hyper::Uri = url.parse().map_err(|e| bad(format!("bad URL ({e})")))?;
        let fut = async {
            let resp = self
                .client
                .get(uri)
                .await
                .map_err(|e| bad(format!("{e:#}")))?;
            if resp.status() != hyper::StatusCode::OK {
                return Err(bad(format!("HTTP {}", resp.status())));
            }
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| bad(format!("reading body: {e}")))?;
            Ok(body.to_bytes().to_vec())
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .map_err(|_| bad(format!("timed out after {}s", TIMEOUT.as_secs())))?
    }
}
