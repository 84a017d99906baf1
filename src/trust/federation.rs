//! The federation client: fetches each peer's SPIFFE bundle from its endpoint, checks it, and
//! keeps the last good one in the CA state (through the store, with compare-and-swap), so a
//! restart or a peer outage loses no trust. A failed fetch changes nothing stored; it is
//! visible in the peer's status and in metrics.
//!
//! Client rules follow SPIRE's `pkg/server/bundle/client` (https_web with Web PKI roots,
//! https_spiffe authenticating the endpoint's SVID with the stored bundle of its trust domain;
//! no client certificate) and the SPIFFE federation spec (poll at the refresh hint).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};

pub use super::federation_error::FederationError;
use super::{
    federated_store::{self, dissociation_of, Origin, Stored},
    federation_config::{poll_interval, EndpointProfile, PeerConfig, RETRY_AFTER_FAILURE},
    spiffe_bundle::{SpiffeBundle, DEFAULT_REFRESH_HINT},
    CaSnapshot,
};
use crate::{
    backoff::Backoff,
    ca::{cert, CertDer},
    clock::Clock,
    shutdown::stopping,
    spiffe::{SpiffeId, TrustDomain},
    state::{StateError, StateStore},
    telemetry::Metrics,
    tls::{crypto_provider, PeerPolicy, SpiffeVerifier},
};

/// The largest bundle document accepted.
const MAX_BUNDLE_BYTES: usize = 1 << 20;
/// A fetch that takes longer (connect, handshake, response) fails: the HTTP client's one
/// whole-exchange deadline.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff after a failure (the shared `Backoff`, jittered): the first retry is exactly
/// `RETRY_AFTER_FAILURE` (the minimum poll interval, which the publication gate counts on),
/// doubles, capped.
const BACKOFF_MAX: Duration = Duration::from_secs(300);

// === status ===

/// One peer's federation state, for `root status`, `bundle` commands and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    pub url: String,
    /// Fetch attempts since the server started.
    pub attempts: u64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_attempt: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_success: Option<OffsetDateTime>,
    /// The sequence of the bundle we hold.
    pub sequence: Option<u64>,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt: Option<OffsetDateTime>,
}

/// Every peer's status, shared by the clients and the readers; also written (atomically) to
/// a file beside the state, where `meshid root status` and `meshid bundle` read it.
#[derive(Clone, Debug, Default)]
pub struct FederationStatus {
    peers: Arc<Mutex<BTreeMap<TrustDomain, PeerStatus>>>,
    file: Option<std::path::PathBuf>,
    /// Counts updates: readers wait on it instead of polling.
    updates: Arc<watch::Sender<u64>>,
}

/// The status file's name in the state directory.
pub const STATUS_FILE: &str = "federation-status.json";
/// The directory (in the state directory) where `meshid bundle refresh TD` leaves a file named
/// after the trust domain; the server fetches that peer's bundle at once and removes it.
pub const REFRESH_DIR: &str = "federation-refresh";

/// Reads the status file a server wrote in `state_dir` (empty if there is none).
pub fn read_status_file(state_dir: &std::path::Path) -> BTreeMap<String, serde_json::Value> {
    std::fs::read(state_dir.join(STATUS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

impl FederationStatus {
    /// A status that is also written to `state_dir/federation-status.json`, at once (empty):
    /// the file lists the peers of this server only, never those of an earlier run, so
    /// `meshid bundle delete` can tell which trust domains the running server fetches.
    pub fn with_file(state_dir: &std::path::Path) -> Self {
        let status = Self {
            file: Some(state_dir.join(STATUS_FILE)),
            ..Self::default()
        };
        status.write(&BTreeMap::new());
        status
    }

    fn write(&self, map: &BTreeMap<TrustDomain, PeerStatus>) {
        if let Some(path) = &self.file {
            let json = serde_json::to_vec_pretty(map).unwrap_or_default();
            if let Err(e) = crate::state::write_file_atomic(path, &json, 0o644) {
                tracing::warn!(error = %e, "federation status file not written");
            }
        }
    }

    /// A receiver that changes on every status update (one per fetch attempt).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.updates.subscribe()
    }

    /// A copy of every peer's status.
    pub fn snapshot(&self) -> BTreeMap<TrustDomain, PeerStatus> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, td: &TrustDomain, f: impl FnOnce(&mut PeerStatus)) {
        let mut map = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        f(map.entry(td.clone()).or_default());
        self.write(&map);
        drop(map);
        self.updates.send_modify(|n| *n += 1);
    }
}

// === the client ===

/// One peer's poll loop, and a handle to ask it to fetch now (shared by its clones).
#[derive(Clone)]
pub struct PeerClient {
    cfg: PeerConfig,
    store: Arc<dyn StateStore>,
    live: watch::Receiver<Arc<CaSnapshot>>,
    clock: Arc<dyn Clock>,
    status: FederationStatus,
    metrics: Arc<Metrics>,
    web_roots: Option<Arc<rustls::RootCertStore>>,
    refresh_now: Arc<Notify>,
}

impl PeerClient {
    /// A client for `cfg`. For `https_web`, the roots come from `ca_file` or the system.
    pub fn new(
        cfg: PeerConfig,
        store: Arc<dyn StateStore>,
        live: watch::Receiver<Arc<CaSnapshot>>,
        clock: Arc<dyn Clock>,
        status: FederationStatus,
        metrics: Arc<Metrics>,
    ) -> Result<Self, WebRootsError> {
        let web_roots = match cfg.profile {
            EndpointProfile::HttpsWeb => Some(Arc::new(web_roots(&cfg)?)),
            EndpointProfile::HttpsSpiffe => None,
        };
        status.update(&cfg.trust_domain, |s| s.url = cfg.url.clone());
        metrics.federation_peer(&cfg.trust_domain.to_string());
        Ok(Self {
            cfg,
            store,
            live,
            clock,
            status,
            metrics,
            web_roots,
            refresh_now: Arc::new(Notify::new()),
        })
    }

    /// Wakes the loop to fetch at once (`meshid bundle refresh`).
    pub fn refresh_handle(&self) -> Arc<Notify> {
        self.refresh_now.clone()
    }

    /// Polls until `stop` fires: at once, then every `poll_interval` of the peer's refresh
    /// hint after a success, with backoff after a failure.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let td = self.cfg.trust_domain.clone();
        let mut backoff = Backoff::new(RETRY_AFTER_FAILURE, BACKOFF_MAX);
        loop {
            let now = self.clock.now();
            let result = self.refresh_once().await;
            let labels = |result: &str| {
                vec![
                    ("trust_domain".to_owned(), td.to_string()),
                    ("result".to_owned(), result.to_owned()),
                ]
            };
            let wait = match &result {
                Ok(bundle) => {
                    backoff.succeeded();
                    self.metrics
                        .federation_refreshes
                        .get_or_create(&labels("ok"))
                        .inc();
                    let wait = poll_interval(bundle.refresh_hint);
                    let l = Metrics::label("trust_domain", &td.to_string());
                    self.metrics
                        .federation_last_success
                        .get_or_create(&l)
                        .set(now.unix_timestamp());
                    self.metrics.federation_refresh_hint.get_or_create(&l).set(
                        bundle
                            .refresh_hint
                            .unwrap_or(DEFAULT_REFRESH_HINT)
                            .as_secs() as i64,
                    );
                    wait
                }
                Err(e) => {
                    tracing::warn!(trust_domain = %td, error = %e, "federated bundle refresh failed; the last good bundle stays");
                    self.metrics
                        .federation_refreshes
                        .get_or_create(&labels(e.kind()))
                        .inc();
                    backoff.failed()
                }
            };
            let next = now + wait;
            self.record(&result, now, next);
            tokio::select! {
                _ = self.clock.sleep_until(next) => {}
                _ = self.refresh_now.notified() => {}
                () = stopping(&mut stop) => return,
            }
        }
    }

    fn record(
        &self,
        result: &Result<SpiffeBundle, FederationError>,
        now: OffsetDateTime,
        next: OffsetDateTime,
    ) {
        let td = &self.cfg.trust_domain;
        let up = Metrics::label("trust_domain", &td.to_string());
        self.metrics
            .federation_up
            .get_or_create(&up)
            .set(result.is_ok() as i64);
        self.status.update(td, |s| {
            s.attempts += 1;
            s.last_attempt = Some(now);
            s.next_attempt = Some(next);
            match result {
                Ok(b) => {
                    s.last_success = Some(now);
                    s.sequence = b.sequence;
                    s.last_error = None;
                }
                Err(e) => s.last_error = Some(e.to_string()),
            }
        });
        if let Some(seq) = self.status.snapshot().get(td).and_then(|s| s.sequence) {
            self.metrics
                .federation_sequence
                .get_or_create(&up)
                .set(seq as i64);
        }
    }

    /// Fetches, checks and stores the peer's bundle once. A dissociated trust domain is not
    /// fetched at all. A stored change is logged with the trust domain, the sequences and the
    /// roots (the state reload that follows only says the state changed).
    pub async fn refresh_once(&self) -> Result<SpiffeBundle, FederationError> {
        let td = self.cfg.trust_domain.clone();
        let (store, t) = (self.store.clone(), td.clone());
        if let Some(d) = blocking(move || dissociation_of(store.as_ref(), &t)).await? {
            return Err(federated_store::dissociated(&td, &d));
        }
        let url = self.cfg.url.clone();
        let tls = self.tls_config().await?;
        let body = fetch(&url, tls).await?;
        let bundle = SpiffeBundle::parse(&body).map_err(|source| FederationError::Bundle {
            url: url.clone(),
            source,
        })?;
        let (store, t, b, now, u) = (
            self.store.clone(),
            td.clone(),
            bundle.clone(),
            self.clock.now(),
            url.clone(),
        );
        let stored = blocking(move || {
            federated_store::store_bundle(store.as_ref(), &t, &b, &u, Origin::Endpoint, now)
        })
        .await?;
        match stored {
            Stored::Updated(update) => tracing::info!(
                trust_domain = %td,
                sequence = bundle.sequence,
                previous_sequence = update.previous.as_ref().and_then(|p| p.sequence),
                roots = bundle.roots.len(),
                ids = %bundle.roots.iter().map(|r| cert::fingerprint_id(r)).collect::<Vec<_>>().join(","),
                generation = %update.generation,
                url = %url,
                "federated bundle updated"
            ),
            Stored::Unchanged => {
                tracing::debug!(trust_domain = %td, sequence = bundle.sequence, "federated bundle unchanged")
            }
        }
        Ok(bundle)
    }

    async fn tls_config(&self) -> Result<rustls::ClientConfig, FederationError> {
        let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| FederationError::Fetch {
                url: self.cfg.url.clone(),
                why: e.to_string(),
            })?;
        let cfg = match (&self.web_roots, &self.cfg.endpoint_spiffe_id) {
            (Some(roots), _) => builder.with_root_certificates(roots.clone()),
            (None, Some(id)) => {
                let roots = self.spiffe_roots(id).await?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(SpiffeVerifier::new(
                        roots,
                        PeerPolicy::Exact(id.clone()),
                    ))
            }
            (None, None) => {
                return Err(FederationError::Fetch {
                    url: self.cfg.url.clone(),
                    why: "profile https_spiffe needs endpoint_spiffe_id".into(),
                })
            }
        };
        Ok(cfg.with_no_client_auth())
    }

    /// The latest stored bundle of the endpoint ID's trust domain: read from the store (a
    /// bundle just set or fetched counts at once), or our own roots from the live snapshot.
    async fn spiffe_roots(&self, id: &SpiffeId) -> Result<Vec<CertDer>, FederationError> {
        let td = id.trust_domain().clone();
        let store = self.store.clone();
        let t = td.clone();
        let stored = tokio::task::spawn_blocking(move || -> Result<_, StateError> {
            let v = store.load_existing()?;
            v.state.federated.get(&t).map(|b| b.roots()).transpose()
        })
        .await
        .map_err(|e| FederationError::State(StateError::Invalid(e.to_string())))??;
        let roots = match stored {
            Some(roots) => roots,
            None => self
                .live
                .borrow()
                .bundle
                .roots_of(&td)
                .map(<[CertDer]>::to_vec)
                .unwrap_or_default(),
        };
        if roots.is_empty() {
            return Err(FederationError::NoBootstrapBundle { trust_domain: td });
        }
        Ok(roots)
    }
}

/// Runs `f` on the blocking pool (state reads and writes take a file lock).
async fn blocking<T: Send + 'static, E>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, FederationError>
where
    E: Into<FederationError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FederationError::State(StateError::Invalid(e.to_string())))?
        .map_err(Into::into)
}

/// Fetches an https_web endpoint's document once (for `meshid bundle show URL`).
pub async fn fetch_web(cfg: &PeerConfig) -> Result<Vec<u8>, FederationError> {
    let fail = |why: String| FederationError::Fetch {
        url: cfg.url.clone(),
        why,
    };
    let roots = web_roots(cfg).map_err(|e| fail(e.to_string()))?;
    let tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    fetch(&cfg.url, tls).await
}

/// Why an https_web peer's CA certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum WebRootsError {
    #[error("federation peer {trust_domain}: ca_file {}: {source}", path.display())]
    Read {
        trust_domain: TrustDomain,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("federation peer {trust_domain}: {source}")]
    Pem {
        trust_domain: TrustDomain,
        #[source]
        source: Box<crate::ca::CaError>,
    },
    #[error("federation peer {0}: no CA certificate to validate its https_web endpoint")]
    Empty(TrustDomain),
}

fn web_roots(cfg: &PeerConfig) -> Result<rustls::RootCertStore, WebRootsError> {
    let td = || cfg.trust_domain.clone();
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| WebRootsError::Read {
                trust_domain: td(),
                path: path.clone(),
                source,
            })?;
            let certs =
                cert::certs_from_pem(&pem, &path.display().to_string()).map_err(|source| {
                    WebRootsError::Pem {
                        trust_domain: td(),
                        source: Box::new(source),
                    }
                })?;
            roots.add_parsable_certificates(certs);
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    if roots.is_empty() {
        return Err(WebRootsError::Empty(td()));
    }
    Ok(roots)
}

/// GET `url` over TLS with `tls`, HTTP/1.1; the body of a 200.
async fn fetch(url: &str, tls: rustls::ClientConfig) -> Result<Vec<u8>, FederationError> {
    use crate::http_client::{Get, HttpError};
    let body = Get::new(url)
        .tls(Arc::new(tls))
        .timeout(FETCH_TIMEOUT)
        .max_body(MAX_BUNDLE_BYTES)
        .send()
        .await
        .map_err(|e| match e {
            HttpError::Status { status, .. } => FederationError::HttpStatus {
                url: url.to_owned(),
                status,
            },
            HttpError::TimedOut { after, .. } => FederationError::Fetch {
                url: url.to_owned(),
                why: format!("no answer within {}s", after.as_secs()),
            },
            HttpError::Connect { source, .. } => FederationError::Fetch {
                url: url.to_owned(),
                why: source.to_string(),
            },
            other => FederationError::Fetch {
                url: url.to_owned(),
                why: other.to_string(),
            },
        })?;
    Ok(body.to_vec())
}
