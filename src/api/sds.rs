//! Envoy SDS v3: StreamSecrets (state of the world), DeltaSecrets (incremental) and
//! FetchSecrets (unary). Resources: `default` (the caller's certificate and a server-generated
//! key), `ROOTCA` (our trust domain's roots), `ALL` (the SPIFFE validator with every trusted
//! trust domain) and `spiffe://<td>` (one trust domain's roots).
//!
//! xDS rules kept: `version_info` and `nonce` on every response; a request whose nonce is not
//! the latest is stale and ignored; `error_detail` marks a NACK, which is logged and not
//! answered with the same resources; the subscription may change on any request. Each stream
//! holds one `watch` receiver of the CA snapshot, so a bundle change reaches every stream at once.

use std::{
    collections::{BTreeSet, HashMap},
    pin::Pin,
    sync::Arc,
    time::Instant,
};

use envoy_types::{
    pb::envoy::{
        config::core::v3::{data_source::Specifier, DataSource, TypedExtensionConfig},
        extensions::transport_sockets::tls::v3::{
            secret, spiffe_cert_validator_config::TrustDomain as SpiffeTrustDomain,
            CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate,
        },
        service::{
            discovery::v3::{
                DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
                Resource,
            },
            secret::v3::secret_discovery_service_server::SecretDiscoveryService,
        },
    },
    util::pack_any,
};
use futures::Stream;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{status, Authenticator};
use crate::{
    ca::{cert, IssuedCert, PrivateKey},
    clock::Clock,
    identity::Identity,
    rotation::RefreshPolicy,
    spiffe::TrustDomain,
    telemetry::Metrics,
    trust::CaSnapshot,
};

/// The type URL of SDS resources.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const DEFAULT: &str = "default";
const ROOTCA: &str = "ROOTCA";
const ALL: &str = "ALL";
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
/// How long to wait before retrying a failed renewal.
const RETRY: std::time::Duration = std::time::Duration::from_secs(30);

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The SDS service.
#[derive(Clone)]
pub struct SdsService(Arc<Shared>);

struct Shared {
    auth: Authenticator,
    live: watch::Receiver<Arc<CaSnapshot>>,
    /// Flips to true when the server shuts down: every stream ends so connections can close.
    stop: watch::Receiver<bool>,
    clock: Arc<dyn Clock>,
    refresh: RefreshPolicy,
    metrics: Arc<Metrics>,
}

impl SdsService {
    pub fn new(
        auth: Authenticator,
        live: watch::Receiver<Arc<CaSnapshot>>,
        stop: watch::Receiver<bool>,
        clock: Arc<dyn Clock>,
        refresh: RefreshPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self(Arc::new(Shared {
            auth,
            live,
            stop,
            clock,
            refresh,
            metrics,
        }))
    }
}

// === Workload: one caller's credential and the resources rendered for it ===

struct Credential {
    issued: IssuedCert,
    key: PrivateKey,
    refresh_at: OffsetDateTime,
}

struct Workload {
    shared: Arc<Shared>,
    identity: Identity,
    snapshot: Arc<CaSnapshot>,
    cred: Option<Credential>,
}

impl Workload {
    fn new(shared: Arc<Shared>, identity: Identity) -> Self {
        let snapshot = shared.live.borrow().clone();
        Self {
            shared,
            identity,
            snapshot,
            cred: None,
        }
    }

    /// Refuses names SDS does not serve, naming them.
    fn check_names<'a>(&self, names: impl IntoIterator<Item = &'a String>) -> Result<(), Status> {
        let unknown: Vec<&str> = names
            .into_iter()
            .filter(|n| !self.known(n))
            .map(String::as_str)
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(Status::invalid_argument(format!(
            "unknown secret name(s) {unknown:?}; meshid serves \"default\", \"ROOTCA\", \"ALL\" and \"spiffe://<trust domain>\" for {}",
            self.snapshot.bundle.iter().map(|(td, _)| td.id_string()).collect::<Vec<_>>().join(", ")
        )))
    }

    fn known(&self, name: &str) -> bool {
        matches!(name, DEFAULT | ROOTCA | ALL) || self.trust_domain_of(name).is_some()
    }

    fn trust_domain_of(&self, name: &str) -> Option<TrustDomain> {
        let td = TrustDomain::new(name.strip_prefix("spiffe://")?).ok()?;
        self.snapshot.bundle.roots_of(&td).map(|_| td)
    }

    /// Issues (or re-issues) `default` with a fresh key.
    fn renew(&mut self) -> Result<(), Status> {
        let authority = &self.snapshot.authority;
        let (issued, key) = authority.issue_with_new_key(&self.identity.spiffe_id, None).map_err(|e| {
            self.shared.metrics.sign_errors.get_or_create(&Metrics::label("kind", status::ca_kind(&e))).inc();
            tracing::error!(id = %self.identity.spiffe_id, error = %e, "SDS certificate issuance failed");
            status::ca(&e)
        })?;
        self.shared
            .metrics
            .certs_issued
            .get_or_create(&Metrics::label("api", "sds"))
            .inc();
        let refresh_at = self
            .shared
            .refresh
            .refresh_at(issued.not_before, issued.not_after);
        tracing::debug!(id = %self.identity.spiffe_id, serial = %issued.serial, refresh_at = %refresh_at, "SDS certificate issued");
        self.cred = Some(Credential {
            issued,
            key,
            refresh_at,
        });
        Ok(())
    }

    /// Renews on schedule; a failure is retried in 30 s (never past the current notAfter).
    fn renew_or_retry(&mut self) -> bool {
        match self.renew() {
            Ok(()) => true,
            Err(_) => {
                if let Some(c) = &mut self.cred {
                    let now = self.shared.clock.now();
                    c.refresh_at = (now + RETRY).min(c.issued.not_after);
                }
                false
            }
        }
    }

    fn render(&mut self, name: &str) -> Result<Secret, Status> {
        let inline = |b: Vec<u8>| {
            Some(DataSource {
                specifier: Some(Specifier::InlineBytes(b)),
                watched_directory: None,
            })
        };
        let validation =
            |ctx: CertificateValidationContext| Some(secret::Type::ValidationContext(ctx));
        let bundle = &self.snapshot.bundle;
        let r#type = match name {
            DEFAULT => {
                if self.cred.is_none() {
                    self.renew()?;
                }
                let c = self.cred.as_ref().expect("issued above");
                Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(c.issued.chain_pem().into_bytes()),
                    private_key: inline(c.key.secret_pkcs8_pem().as_bytes().to_vec()),
                    ..Default::default()
                }))
            }
            ROOTCA => validation(CertificateValidationContext {
                trusted_ca: inline(cert::to_pem_bundle(bundle.own_roots()).into_bytes()),
                ..Default::default()
            }),
            ALL => {
                let trust_domains = bundle
                    .iter()
                    .map(|(td, roots)| SpiffeTrustDomain {
                        name: td.to_string(),
                        trust_bundle: inline(cert::to_pem_bundle(roots).into_bytes()),
                        ..Default::default()
                    })
                    .collect();
                let config = SpiffeCertValidatorConfig {
                    trust_domains,
                    trust_bundles: None,
                };
                validation(CertificateValidationContext {
                    custom_validator_config: Some(TypedExtensionConfig {
                        name: SPIFFE_VALIDATOR.into(),
                        typed_config: Some(pack_any(config)),
                    }),
                    ..Default::default()
                })
            }
            other => {
                let td = self.trust_domain_of(other).ok_or_else(|| {
                    Status::not_found(format!("trust domain {other} is no longer trusted"))
                })?;
                validation(CertificateValidationContext {
                    trusted_ca: inline(bundle.pem_of(&td).unwrap_or_default().into_bytes()),
                    ..Default::default()
                })
            }
        };
        Ok(Secret {
            name: name.to_owned(),
            r#type,
        })
    }

    /// A content version of a resource: the serial for `default`, a digest of the roots otherwise.
    fn version_of(&mut self, name: &str) -> Result<String, Status> {
        if name == DEFAULT {
            if self.cred.is_none() {
                self.renew()?;
            }
            return Ok(self
                .cred
                .as_ref()
                .expect("issued above")
                .issued
                .serial
                .to_string());
        }
        let secret = self.render(name)?;
        let bytes = prost::Message::encode_to_vec(&secret);
        Ok(cert::hex(
            &ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref()[..8],
        ))
    }

    /// Takes a new CA snapshot; returns (trust changed, signer changed).
    fn update_snapshot(&mut self, next: Arc<CaSnapshot>) -> (bool, bool) {
        let trust = !next.bundle.iter().eq(self.snapshot.bundle.iter());
        let signer = next.signer_id != self.snapshot.signer_id;
        self.snapshot = next;
        if signer && self.cred.is_some() {
            // A new signer: re-issue now so the chain matches what peers are told to trust.
            self.renew_or_retry();
        }
        (trust, signer)
    }

    fn next_refresh(&self, default_subscribed: bool) -> Option<OffsetDateTime> {
        self.cred
            .as_ref()
            .filter(|_| default_subscribed)
            .map(|c| c.refresh_at)
    }
}

/// Decrements the open-streams gauge when a stream ends, however it ends.
struct StreamGauge(Arc<Metrics>);

impl StreamGauge {
    fn open(m: &Arc<Metrics>) -> Self {
        m.sds_streams.inc();
        Self(m.clone())
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.sds_streams.dec();
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn check_type(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "type_url {type_url:?} is not served here; SDS serves {SECRET_TYPE_URL}"
        )))
    }
}

fn sleep_or_never(clock: &Arc<dyn Clock>, at: Option<OffsetDateTime>) -> crate::clock::Sleep {
    match at {
        Some(t) => clock.sleep_until(t),
        None => Box::pin(std::future::pending()),
    }
}

// === StreamSecrets (state of the world) ===

struct SotwStream {
    w: Workload,
    subscribed: BTreeSet<String>,
    version: u64,
    nonce: u64,
    last_nonce: String,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

impl SotwStream {
    async fn run(mut self, mut inbound: Streaming<DiscoveryRequest>) {
        let _gauge = StreamGauge::open(&self.w.shared.metrics);
        let mut live = self.w.shared.live.clone();
        live.mark_unchanged();
        let mut stop = self.w.shared.stop.clone();
        loop {
            let wake = sleep_or_never(
                &self.w.shared.clock,
                self.w.next_refresh(self.subscribed.contains(DEFAULT)),
            );
            let result = tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.on_request(req).await,
                    Ok(None) | Err(_) => return,
                },
                changed = live.changed() => {
                    if changed.is_err() { return; }
                    let next = live.borrow_and_update().clone();
                    self.on_snapshot(next).await
                }
                _ = wake => {
                    let start = Instant::now();
                    if self.w.renew_or_retry() { self.push(start).await } else { Ok(()) }
                }
                _ = self.tx.closed() => return,
                () = stopped(&mut stop) => {
                    let _ = self.tx.send(Err(Status::unavailable("meshid is shutting down; reconnect"))).await;
                    return;
                }
            };
            if let Err(status) = result {
                let _ = self.tx.send(Err(status)).await;
                return;
            }
        }
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        check_type(&req.type_url)?;
        let initial = req.response_nonce.is_empty();
        if !initial && req.response_nonce != self.last_nonce {
            tracing::debug!(nonce = %req.response_nonce, latest = %self.last_nonce, "stale SDS request ignored");
            return Ok(());
        }
        let names: BTreeSet<String> = req.resource_names.into_iter().collect();
        if let Some(detail) = &req.error_detail {
            self.w.shared.metrics.sds_nacks.inc();
            tracing::warn!(id = %self.w.identity.spiffe_id, version = %req.version_info, resources = ?names,
                code = detail.code, detail = %detail.message, "SDS NACK");
            if names == self.subscribed {
                return Ok(()); // never answer a NACK with the same resources again
            }
        } else if !initial && names == self.subscribed {
            tracing::debug!(id = %self.w.identity.spiffe_id, version = %req.version_info, "SDS ACK");
            return Ok(());
        }
        self.w.check_names(&names)?;
        self.subscribed = names;
        if self.subscribed.is_empty() {
            return Ok(());
        }
        self.push(Instant::now()).await
    }

    async fn on_snapshot(&mut self, next: Arc<CaSnapshot>) -> Result<(), Status> {
        let start = Instant::now();
        let (trust, signer) = self.w.update_snapshot(next);
        let trust_subscribed = self.subscribed.iter().any(|n| n != DEFAULT);
        let default_subscribed = self.subscribed.contains(DEFAULT);
        if (trust && trust_subscribed) || (signer && default_subscribed) {
            self.push(start).await?;
        }
        Ok(())
    }

    async fn push(&mut self, started: Instant) -> Result<(), Status> {
        let mut resources = Vec::with_capacity(self.subscribed.len());
        let names: Vec<String> = self.subscribed.iter().cloned().collect();
        for name in &names {
            if name.starts_with("spiffe://") && self.w.trust_domain_of(name).is_none() {
                continue; // a trust domain that is no longer trusted is left out of the state of the world
            }
            resources.push(pack_any(self.w.render(name)?));
        }
        self.version += 1;
        self.nonce += 1;
        self.last_nonce = self.nonce.to_string();
        let resp = DiscoveryResponse {
            version_info: self.version.to_string(),
            resources,
            type_url: SECRET_TYPE_URL.into(),
            nonce: self.last_nonce.clone(),
            ..Default::default()
        };
        if self.tx.send(Ok(resp)).await.is_err() {
            return Ok(()); // the client went away; run() notices
        }
        let m = &self.w.shared.metrics;
        for name in &names {
            m.sds_pushes
                .get_or_create(&Metrics::label("resource", resource_label(name)))
                .inc();
        }
        m.sds_push_latency.observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

fn resource_label(name: &str) -> &str {
    if name.starts_with("spiffe://") {
        "spiffe"
    } else {
        name
    }
}

// === DeltaSecrets (incremental) ===

struct DeltaStream {
    w: Workload,
    subscribed: BTreeSet<String>,
    /// What the client holds: name → version.
    sent: HashMap<String, String>,
    nonce: u64,
    last_nonce: String,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl DeltaStream {
    async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) {
        let _gauge = StreamGauge::open(&self.w.shared.metrics);
        let mut live = self.w.shared.live.clone();
        live.mark_unchanged();
        let mut stop = self.w.shared.stop.clone();
        loop {
            let wake = sleep_or_never(
                &self.w.shared.clock,
                self.w.next_refresh(self.subscribed.contains(DEFAULT)),
            );
            let result = tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.on_request(req).await,
                    Ok(None) | Err(_) => return,
                },
                changed = live.changed() => {
                    if changed.is_err() { return; }
                    let next = live.borrow_and_update().clone();
                    self.w.update_snapshot(next);
                    self.push_changed(Instant::now()).await
                }
                _ = wake => {
                    let start = Instant::now();
                    if self.w.renew_or_retry() { self.push_changed(start).await } else { Ok(()) }
                }
                _ = self.tx.closed() => return,
                () = stopped(&mut stop) => {
                    let _ = self.tx.send(Err(Status::unavailable("meshid is shutting down; reconnect"))).await;
                    return;
                }
            };
            if let Err(status) = result {
                let _ = self.tx.send(Err(status)).await;
                return;
            }
        }
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        check_type(&req.type_url)?;
        if req.response_nonce.is_empty() {
            // A (re)connecting client tells us what it already holds.
            self.sent.extend(req.initial_resource_versions);
        } else if req.response_nonce == self.last_nonce {
            match &req.error_detail {
                Some(d) => {
                    self.w.shared.metrics.sds_nacks.inc();
                    tracing::warn!(id = %self.w.identity.spiffe_id, code = d.code, detail = %d.message, "SDS delta NACK");
                }
                None => {
                    tracing::debug!(id = %self.w.identity.spiffe_id, nonce = %req.response_nonce, "SDS delta ACK")
                }
            }
        }
        // Subscription changes count whatever the nonce.
        for n in &req.resource_names_unsubscribe {
            self.subscribed.remove(n);
            self.sent.remove(n);
        }
        self.w.check_names(&req.resource_names_subscribe)?;
        self.subscribed.extend(req.resource_names_subscribe);
        self.push_changed(Instant::now()).await
    }

    async fn push_changed(&mut self, started: Instant) -> Result<(), Status> {
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let names: Vec<String> = self.subscribed.iter().cloned().collect();
        for name in names {
            if name.starts_with("spiffe://") && self.w.trust_domain_of(&name).is_none() {
                if self.sent.remove(&name).is_some() {
                    removed.push(name);
                }
                continue;
            }
            let version = self.w.version_of(&name)?;
            if self.sent.get(&name) == Some(&version) {
                continue;
            }
            let secret = self.w.render(&name)?;
            self.sent.insert(name.clone(), version.clone());
            resources.push(Resource {
                name,
                version,
                resource: Some(pack_any(secret)),
                ..Default::default()
            });
        }
        if resources.is_empty() && removed.is_empty() {
            return Ok(());
        }
        self.nonce += 1;
        self.last_nonce = self.nonce.to_string();
        let m = &self.w.shared.metrics;
        for r in &resources {
            m.sds_pushes
                .get_or_create(&Metrics::label("resource", resource_label(&r.name)))
                .inc();
        }
        let resp = DeltaDiscoveryResponse {
            system_version_info: self.w.snapshot.generation.to_string(),
            resources,
            type_url: SECRET_TYPE_URL.into(),
            removed_resources: removed,
            nonce: self.last_nonce.clone(),
            ..Default::default()
        };
        let _ = self.tx.send(Ok(resp)).await;
        m.sds_push_latency.observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

// === the service ===

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type StreamSecretsStream = Out<DiscoveryResponse>;
    type DeltaSecretsStream = Out<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let identity = self.0.auth.authenticate(request.metadata()).await?;
        let (tx, rx) = mpsc::channel(4);
        let stream = SotwStream {
            w: Workload::new(self.0.clone(), identity),
            subscribed: BTreeSet::new(),
            version: 0,
            nonce: 0,
            last_nonce: String::new(),
            tx,
        };
        tokio::spawn(stream.run(request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let identity = self.0.auth.authenticate(request.metadata()).await?;
        let (tx, rx) = mpsc::channel(4);
        let stream = DeltaStream {
            w: Workload::new(self.0.clone(), identity),
            subscribed: BTreeSet::new(),
            sent: HashMap::new(),
            nonce: 0,
            last_nonce: String::new(),
            tx,
        };
        tokio::spawn(stream.run(request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let identity = self.0.auth.authenticate(request.metadata()).await?;
        let req = request.into_inner();
        check_type(&req.type_url)?;
        let mut w = Workload::new(self.0.clone(), identity);
        w.check_names(&req.resource_names)?;
        let mut resources = Vec::new();
        let mut versions = Vec::new();
        for name in &req.resource_names {
            versions.push(w.version_of(name)?);
            resources.push(pack_any(w.render(name)?));
            self.0
                .metrics
                .sds_pushes
                .get_or_create(&Metrics::label("resource", resource_label(name)))
                .inc();
        }
        Ok(Response::new(DiscoveryResponse {
            version_info: versions.join("."),
            resources,
            type_url: SECRET_TYPE_URL.into(),
            nonce: String::new(),
            ..Default::default()
        }))
    }
}
