//! Envoy SDS v3: StreamSecrets (state of the world), DeltaSecrets (incremental) and
//! FetchSecrets (unary). Resources: `default` (the caller's certificate and a server-generated
//! key), `ROOTCA` (our trust domain's roots), `ALL` (the SPIFFE validator with every trusted
//! trust domain) and `spiffe://<td>` (one trust domain's roots).
//!
//! xDS rules kept: `version_info` and `nonce` on every response; a request whose nonce is not
//! the latest is stale and ignored; `error_detail` marks a NACK, which is logged and not
//! answered with the same resources; the subscription may change on any request. Each stream
//! holds one `watch` receiver of the CA snapshot, so a bundle change reaches every stream at once.

use std::{collections::BTreeSet, future::Future, pin::Pin, sync::Arc};

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
            },
            secret::v3::secret_discovery_service_server::SecretDiscoveryService,
        },
    },
    pb::google::protobuf::Any,
    util::pack_any,
};
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::{
    status,
    xds::{self, content_version, Out, ResourceSource, XdsMetrics},
    Authenticator,
};
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
    xds: Arc<XdsMetrics>,
    rendered: RenderCache,
}

/// Trust resources rendered for one CA snapshot generation, shared by every stream.
#[derive(Default)]
struct RenderCache(
    std::sync::RwLock<(
        Option<crate::state::Generation>,
        std::collections::HashMap<String, Any>,
    )>,
);

impl RenderCache {
    fn get(&self, generation: crate::state::Generation, name: &str) -> Option<Any> {
        let guard = self.0.read().unwrap_or_else(|e| e.into_inner());
        (guard.0 == Some(generation))
            .then(|| guard.1.get(name).cloned())
            .flatten()
    }

    fn put(&self, generation: crate::state::Generation, name: &str, any: Any) {
        let mut guard = self.0.write().unwrap_or_else(|e| e.into_inner());
        match guard.0 {
            // A stream still on an older snapshot does not evict the newer one.
            Some(current) if current > generation => return,
            Some(current) if current == generation => {}
            _ => *guard = (Some(generation), Default::default()),
        }
        guard.1.insert(name.to_owned(), any);
    }
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
        let xds = Arc::new(XdsMetrics {
            streams: metrics.sds_streams.clone(),
            pushes: metrics.sds_pushes.clone(),
            nacks: metrics.sds_nacks.clone(),
            latency: metrics.sds_push_latency.clone(),
        });
        Self(Arc::new(Shared {
            auth,
            live,
            stop,
            clock,
            refresh,
            metrics,
            xds,
            rendered: RenderCache::default(),
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
    live: watch::Receiver<Arc<CaSnapshot>>,
    snapshot: Arc<CaSnapshot>,
    cred: Option<Credential>,
}

impl Workload {
    fn new(shared: Arc<Shared>, identity: Identity) -> Self {
        let mut live = shared.live.clone();
        let snapshot = live.borrow_and_update().clone();
        Self {
            shared,
            identity,
            live,
            snapshot,
            cred: None,
        }
    }

    /// Refuses names SDS does not serve, naming them.
    fn check_names_in<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), Status> {
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

    fn render_secret(&mut self, name: &str) -> Result<Secret, Status> {
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
                trusted_ca: inline(bundle.own_roots_pem().as_bytes().to_vec()),
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

    /// Takes a new CA snapshot; a new signer means re-issuing `default` now, so the chain
    /// matches what peers are told to trust.
    fn update_snapshot(&mut self, next: Arc<CaSnapshot>) {
        let signer = next.signer_id != self.snapshot.signer_id;
        self.snapshot = next;
        if signer && self.cred.is_some() {
            self.renew_or_retry();
        }
    }

    fn next_refresh(&self, default_subscribed: bool) -> Option<OffsetDateTime> {
        self.cred
            .as_ref()
            .filter(|_| default_subscribed)
            .map(|c| c.refresh_at)
    }
}

fn sleep_or_never(clock: &Arc<dyn Clock>, at: Option<OffsetDateTime>) -> crate::clock::Sleep {
    match at {
        Some(t) => clock.sleep_until(t),
        None => Box::pin(std::future::pending()),
    }
}

fn resource_label(name: &str) -> &str {
    if name.starts_with("spiffe://") {
        "spiffe"
    } else {
        name
    }
}

impl ResourceSource for Workload {
    fn type_url(&self) -> &'static str {
        SECRET_TYPE_URL
    }

    fn peer(&self) -> String {
        self.identity.spiffe_id.to_string()
    }

    fn check_names(&self, names: &mut dyn Iterator<Item = &String>) -> Result<(), Status> {
        self.check_names_in(names)
    }

    /// The serial for `default`; a digest of the content for the trust resources.
    fn version(&mut self, name: &str) -> Result<Option<String>, Status> {
        if name == DEFAULT {
            if self.cred.is_none() {
                self.renew()?;
            }
            return Ok(self.cred.as_ref().map(|c| c.issued.serial.to_string()));
        }
        Ok(self.render(name)?.map(|any| content_version(&any)))
    }

    fn render(&mut self, name: &str) -> Result<Option<Any>, Status> {
        if name.starts_with("spiffe://") && self.trust_domain_of(name).is_none() {
            return Ok(None); // no longer trusted: left out (delta: removed)
        }
        if name == DEFAULT {
            return self.render_secret(name).map(|s| Some(pack_any(s)));
        }
        // Trust resources depend only on the snapshot: rendered once per snapshot for every
        // stream, not per stream and per check.
        let generation = self.snapshot.generation;
        if let Some(any) = self.shared.rendered.get(generation, name) {
            return Ok(Some(any));
        }
        let any = pack_any(self.render_secret(name)?);
        self.shared.rendered.put(generation, name, any.clone());
        Ok(Some(any))
    }

    fn changed<'a>(
        &'a mut self,
        subscribed: &'a BTreeSet<String>,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            let wake = sleep_or_never(
                &self.shared.clock,
                self.next_refresh(subscribed.contains(DEFAULT)),
            );
            tokio::select! {
                r = self.live.changed() => {
                    if r.is_err() {
                        return false;
                    }
                    let next = self.live.borrow_and_update().clone();
                    self.update_snapshot(next);
                }
                _ = wake => {
                    self.renew_or_retry();
                }
            }
            true
        })
    }

    fn label(name: &str) -> String {
        resource_label(name).to_owned()
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
        let identity = self.0.auth.authenticate(&request).await?;
        let w = Workload::new(self.0.clone(), identity);
        Ok(Response::new(xds::spawn_sotw(
            w,
            request.into_inner(),
            self.0.xds.clone(),
            self.0.stop.clone(),
        )))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let identity = self.0.auth.authenticate(&request).await?;
        let w = Workload::new(self.0.clone(), identity);
        Ok(Response::new(xds::spawn_delta(
            w,
            request.into_inner(),
            self.0.xds.clone(),
            self.0.stop.clone(),
        )))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let identity = self.0.auth.authenticate(&request).await?;
        let req = request.into_inner();
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            return Err(Status::invalid_argument(format!(
                "type_url {:?} is not served here; SDS serves {SECRET_TYPE_URL}",
                req.type_url
            )));
        }
        let mut w = Workload::new(self.0.clone(), identity);
        w.check_names_in(&req.resource_names)?;
        let mut resources = Vec::new();
        let mut versions = Vec::new();
        for name in &req.resource_names {
            versions.push(w.version(name)?.unwrap_or_default());
            resources.extend(w.render(name)?);
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
