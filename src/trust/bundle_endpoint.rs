//! The SPIFFE bundle endpoint (federation spec, section 5): `GET` over HTTPS returns our trust
//! domain's bundle as `application/json`, with `ETag` / `If-None-Match`. No client
//! authentication. Profile `https_web` serves the operator's certificate (re-read when its
//! files change, through `fswatch`); `https_spiffe` serves meshid's own SVID.
//!
//! Consumers as they are: Istio's `pkg/spiffe` RetrieveSpiffeBundleRootCerts (any path, 200 and
//! a go-jose JWK Set) and SPIRE's `pkg/server/bundle/client` (GET, 200, `spiffebundle.Parse`).

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use thiserror::Error;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};

use super::{
    spiffe_bundle::{BundleError, SpiffeBundle},
    CaSnapshot,
};
use crate::{
    ca::{cert, CaError, PrivateKey},
    shutdown::stopping,
    tls::crypto_provider,
};

const MAX_CONNECTIONS: usize = 256;
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the operator's certificate and key files could not be served.
#[derive(Debug, Error)]
pub enum CertFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(#[from] CaError),
    #[error("the key in {key} does not match the certificate in {cert}")]
    Mismatch { key: String, cert: String },
    #[error("{path}: {source}")]
    Unsupported {
        path: String,
        #[source]
        source: rustls::Error,
    },
}

/// The operator's certificate and key files, re-read when either changes (watched through
/// `fswatch`, not checked per handshake). A reload that fails keeps the previous certificate
/// in service; writing the pair one file after the other reloads once both match.
#[derive(Debug)]
pub struct FileCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl FileCert {
    /// Loads the files now, failing if they do not hold a usable certificate and key.
    pub fn load(cert_file: PathBuf, key_file: PathBuf) -> Result<Self, CertFileError> {
        let key = load_pair(&cert_file, &key_file)?;
        Ok(Self {
            cert_file,
            key_file,
            current: RwLock::new(key),
        })
    }

    /// Re-reads both files; on failure the previous certificate stays and the error is logged.
    pub fn reload(&self) {
        match load_pair(&self.cert_file, &self.key_file) {
            Ok(k) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = k;
                tracing::info!(cert = %self.cert_file.display(), "bundle endpoint certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "bundle endpoint certificate could not be reloaded; the previous one stays")
            }
        }
    }

    /// Reloads whenever either file changes, until `stop` fires. Without a working watch it
    /// says so once and keeps the loaded certificate.
    pub async fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::channel(1);
        let watchers =
            [&self.cert_file, &self.key_file].map(|f| crate::fswatch::watch_file(f, tx.clone()));
        if let Some(Err(e)) = watchers.iter().find(|w| w.is_err()) {
            tracing::error!(error = %e, cert = %self.cert_file.display(), "bundle endpoint certificate files cannot be watched; changes need a restart");
            return;
        }
        loop {
            tokio::select! {
                woke = rx.recv() => {
                    if woke.is_none() {
                        return;
                    }
                    self.reload();
                }
                () = stopping(&mut stop) => return,
            }
        }
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn load_pair(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>, CertFileError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| CertFileError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let chain = cert::certs_from_pem(&read(cert_file)?, &cert_file.display().to_string())?;
    let key = PrivateKey::from_pem(&read(key_file)?, &key_file.display().to_string())?;
    let leaf = cert::parse(&chain[0], "certificate")?;
    if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CertFileError::Mismatch {
            key: key_file.display().to_string(),
            cert: cert_file.display().to_string(),
        });
    }
    let der = key.secret_pkcs8_der();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.as_slice()).clone_key());
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|source| {
        CertFileError::Unsupported {
            path: key_file.display().to_string(),
            source,
        }
    })?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// One rendered bundle document and its entity tag.
#[derive(Clone)]
struct Rendered {
    sequence: u64,
    etag: String,
    body: Bytes,
}

/// Renders our bundle from the snapshot: every root peers should trust (prepared ones
/// included, so they propagate before they sign), the snapshot's sequence, the hint.
fn render(snapshot: &CaSnapshot, refresh_hint: Duration) -> Result<Rendered, BundleError> {
    let sequence = snapshot.bundle.sequence();
    let bundle = SpiffeBundle {
        roots: snapshot.bundle.own_roots().to_vec(),
        sequence: Some(sequence),
        refresh_hint: Some(refresh_hint),
    };
    let body = bundle.to_json()?;
    let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
    Ok(Rendered {
        sequence,
        etag: format!("\"{}\"", cert::hex(&digest.as_ref()[..16])),
        body: Bytes::from(body),
    })
}

/// Serves the bundle on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    resolver: Arc<dyn ResolvesServerCert>,
    live: watch::Receiver<Arc<CaSnapshot>>,
    refresh_hint: Duration,
    stop: watch::Receiver<bool>,
) {
    let mut tls = match rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b.with_no_client_auth().with_cert_resolver(resolver),
        Err(e) => {
            tracing::error!(error = %e, "bundle endpoint TLS config failed");
            return;
        }
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let cache: Arc<Mutex<Option<Rendered>>> = Arc::default();
    crate::net::accept_loop(
        listener,
        MAX_CONNECTIONS,
        "bundle endpoint",
        stop,
        move |tcp, permit| {
            let (acceptor, live, cache) = (acceptor.clone(), live.clone(), cache.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let conn = async move {
                    let tls = acceptor.accept(tcp).await.ok()?;
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let resp = respond(&req, &live, &cache, refresh_hint);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(tls), svc)
                        .await
                        .ok()
                };
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            });
            std::future::ready(true)
        },
    )
    .await;
}

fn respond(
    req: &Request<Incoming>,
    live: &watch::Receiver<Arc<CaSnapshot>>,
    cache: &Mutex<Option<Rendered>>,
    refresh_hint: Duration,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "the bundle endpoint serves GET\n",
        );
    }
    let snapshot = live.borrow().clone();
    let rendered = {
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        match c.as_ref() {
            Some(r) if r.sequence == snapshot.bundle.sequence() => r.clone(),
            _ => match render(&snapshot, refresh_hint) {
                Ok(r) => {
                    *c = Some(r.clone());
                    r
                }
                Err(e) => {
                    tracing::error!(error = %e, "bundle could not be rendered");
                    return plain(StatusCode::INTERNAL_SERVER_ERROR, "bundle unavailable\n");
                }
            },
        }
    };
    let not_modified = req
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == rendered.etag || t.trim() == "*");
    let builder = Response::builder()
        .header(header::ETAG, &rendered.etag)
        .header(header::CACHE_CONTROL, "no-cache");
    let resp = if not_modified {
        builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Full::new(Bytes::new()))
    } else {
        builder
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(rendered.body))
    };
    resp.expect("static response parts")
}

fn plain(code: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts")
}
