//! Envoy SDS v3: StreamSecrets (state of the world), DeltaSecrets (incremental) and
//! FetchSecrets (unary). Resources: `default` (the caller's certificate and a server-generated
//! key), `ROOTCA` (our trust domain's roots), `ALL` (the SPIFFE validator with every trusted
//! trust domain) and `spiffe://<td>` (one trust domain's roots, while it is trusted).
//!
//! The xDS rules are the engine's (`xds.rs`). Names: any other name, and `spiffe://<td>` for a
//! trust domain not trusted now, is unknown: streams keep it, leave it out (Delta: list it in
//! `removed_resources`) and send it once it exists; FetchSecrets refuses it (`InvalidArgument`,
//! naming it). istio-agent's `file-root:`/`file-cert:` names are unknown here: the central server
//! never reads files. At most `xds.max_resource_names_per_stream.sds` names per stream.
//!
//! Distrusting a trust domain: when it leaves the CA state, `spiffe://<td>` is no longer sent,
//! but that does not make Envoy forget it (SotW cannot delete a secret, and newer Envoys ignore
//! Delta SDS removals), so a proxy validating with `spiffe://<td>` keeps trusting it until it
//! restarts. `ALL` is the way to distrust: it is re-sent without the trust domain, and Envoy
//! replaces its validation context. Each stream holds one `watch` receiver of the CA snapshot,
//! so a bundle change reaches every stream at once.
//!
//! Propagation: every stream has an entry in a shared `rotation::Propagation` registry, updated
//! when the client ACKs: the own root ids of an ACKed `ROOTCA`/`ALL`/`spiffe://<own td>` (when its
//! version is the one served now) and the signer of an ACKed `default` (when its serial is the
//! held leaf's). The server serves the counts on `GET /debug/rotation`.

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
    auth::{credentials, Credentials},
    lifetime::{self, StreamEnd, StreamLimits},
    status,
    xds::{self, content_version, Out, ResourceSource, XdsMetrics},
    Authenticator,
};
use crate::{
    ca::{cert, IssuedCert, PrivateKey},
    clock::Clock,
    identity::Identity,
    rotation::{Issued, Propagation, RefreshPolicy, Renewer, StreamTrack},
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
    limits: StreamLimits,
    metrics: Arc<Metrics>,
    xds: Arc<XdsMetrics>,
    rendered: RenderCache,
    /// Which bundle and signer every stream has ACKed.
    propagation: Arc<Propagation>,
    root_ids: RootIds,
    /// Told which pods' proxies hold a stream (auto mTLS proof by proxy).
    proxies: Option<Arc<crate::discovery::ProxyRegistry>>,
    /// `federation.merge_into_rootca`: ROOTCA also holds every federated trust domain's roots.
    merge_into_rootca: bool,
}

/// Own root ids of the latest bundle, computed once per bundle sequence for every stream.
#[derive(Default)]
struct RootIds(std::sync::Mutex<Option<(u64, Arc<[String]>)>>);

impl RootIds {
    fn of(&self, bundle: &crate::trust::TrustBundleSet) -> Arc<[String]> {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &*guard {
            Some((seq, ids)) if *seq == bundle.sequence() => ids.clone(),
            _ => {
                let ids: Arc<[String]> = bundle
                    .own_roots()
                    .iter()
                    .map(|r| cert::fingerprint_id(r))
                    .collect();
                *guard = Some((bundle.sequence(), ids.clone()));
                ids
            }
        }
    }
}

/// Which snapshot trust resources were rendered for: the bundle's sequence (it moves on every
/// bundle change, even when a replaced state file keeps its generation), then the generation.
type RenderKey = (u64, crate::state::Generation);

/// A trust resource rendered for one snapshot, with its version (a digest of its content).
type Rendered = Arc<(Any, String)>;

/// Trust resources rendered for one CA snapshot, shared by every stream: on a bundle change,
/// 10,000 streams render and digest the bundle once, not once each.
#[derive(Default)]
struct RenderCache(
    std::sync::RwLock<(
        Option<RenderKey>,
        std::collections::HashMap<String, Rendered>,
    )>,
);

impl RenderCache {
    fn get(&self, generation: RenderKey, name: &str) -> Option<Rendered> {
        let guard = self.0.read().unwrap_or_else(|e| e.into_inner());
        (guard.0 == Some(generation))
            .then(|| guard.1.get(name).cloned())
            .flatten()
    }

    fn put(&self, generation: RenderKey, name: &str, rendered: Rendered) {
        let mut guard = self.0.write().unwrap_or_else(|e| e.into_inner());
        match guard.0 {
            // A stream still on an older snapshot does not evict the newer one.
            Some(current) if current > generation => return,
            Some(current) if current == generation => {}
            _ => *guard = (Some(generation), Default::default()),
        }
        guard.1.insert(name.to_owned(), rendered);
    }
}

impl SdsService {
    pub fn new(
        auth: Authenticator,
        live: watch::Receiver<Arc<CaSnapshot>>,
        stop: watch::Receiver<bool>,
        clock: Arc<dyn Clock>,
        refresh: RefreshPolicy,
        limits: StreamLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let xds = Arc::new(XdsMetrics {
            streams: metrics.sds_streams.clone(),
            pushes: metrics.sds_pushes.clone(),
            nacks: metrics.sds_nacks.clone(),
            latency: metrics.sds_push_latency.clone(),
            unknown_names: metrics
                .xds_unknown_names
                .get_or_create(&Metrics::label("type", "sds"))
                .clone(),
            kind: "sds",
            max_names: super::config::DEFAULT_SDS_MAX_NAMES,
        });
        Self(Arc::new(Shared {
            auth,
            live,
            stop,
            clock,
            refresh,
            limits,
            metrics,
            xds,
            rendered: RenderCache::default(),
            propagation: Arc::default(),
            root_ids: RootIds::default(),
            proxies: None,
            merge_into_rootca: false,
        }))
    }

    /// Records propagation into `registry` (shared with the status endpoint). Call before the
    /// service is shared.
    pub fn with_propagation(self, registry: Arc<Propagation>) -> Self {
        self.configure(|shared| {
            shared.propagation = registry;
        })
    }

    /// Puts federated roots into `ROOTCA` too (`federation.merge_into_rootca`), for proxies
    /// that take a single bundle. Call before the service is shared.
    pub fn with_merge_into_rootca(self, merge: bool) -> Self {
        self.configure(|shared| {
            shared.merge_into_rootca = merge;
        })
    }

    /// Reports each stream's pod to `registry`. Call before the service is shared.
    pub fn with_proxy_registry(self, registry: Arc<crate::discovery::ProxyRegistry>) -> Self {
        self.configure(|shared| {
            shared.proxies = Some(registry);
        })
    }

    /// The registry of what every open stream has ACKed.
    pub fn propagation(&self) -> Arc<Propagation> {
        self.0.propagation.clone()
    }

    /// Caps the resource names one stream may subscribe to
    /// (`xds.max_resource_names_per_stream.sds`). Call before the service is shared.
    pub fn with_name_limit(self, max: usize) -> Self {
        self.configure(|shared| {
            Arc::make_mut(&mut shared.xds).max_names = max;
        })
    }

    /// Applies a setting while the service is being built. Settings after the service was
    /// cloned would reach only this copy, so that is a bug in the caller: it stops here.
    fn configure(mut self, set: impl FnOnce(&mut Shared)) -> Self {
        let shared = Arc::get_mut(&mut self.0)
            .expect("service settings are applied before the service is shared");
        set(shared);
        self
    }
}

// === Workload: one caller's credential and the resources rendered for it ===

/// `default`: a leaf and the key made for it on the server.
struct Leaf {
    issued: IssuedCert,
    key: PrivateKey,
}

struct Workload {
    shared: Arc<Shared>,
    identity: Identity,
    /// What the stream was opened with, re-checked before every renewal (absent for Fetch).
    creds: Option<Credentials>,
    /// Ends the stream when a re-check fails (absent for Fetch).
    end: Option<StreamEnd>,
    live: watch::Receiver<Arc<CaSnapshot>>,
    snapshot: Arc<CaSnapshot>,
    cred: Renewer<Leaf>,
    /// This stream's entry in the propagation registry (absent for Fetch).
    track: Option<StreamTrack>,
}

impl Workload {
    fn new(shared: Arc<Shared>, identity: Identity) -> Self {
        let mut live = shared.live.clone();
        let snapshot = live.borrow_and_update().clone();
        let cred = Renewer::new(shared.refresh, shared.clock.clone());
        Self {
            shared,
            identity,
            creds: None,
            end: None,
            live,
            snapshot,
            cred,
            track: None,
        }
    }

    /// A stream's workload: re-checks `creds` before each renewal and ends through `end`.
    fn for_stream(
        shared: Arc<Shared>,
        identity: Identity,
        creds: Option<Credentials>,
        end: StreamEnd,
    ) -> Self {
        let pod = identity.pod.as_ref().map(|p| p.name.clone());
        let track = shared.propagation.open(identity.spiffe_id.to_string(), pod);
        let mut w = Self::new(shared, identity);
        w.creds = creds;
        w.end = Some(end);
        w.track = Some(track);
        w
    }

    /// Refuses names SDS does not serve now, naming them (FetchSecrets).
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
            self.trusted_list()
        )))
    }

    fn trusted_list(&self) -> String {
        let tds: Vec<String> = self
            .snapshot
            .bundle
            .iter()
            .map(|(td, _)| td.id_string())
            .collect();
        tds.join(", ")
    }

    fn known(&self, name: &str) -> bool {
        matches!(name, DEFAULT | ROOTCA | ALL) || self.trust_domain_of(name).is_some()
    }

    /// Why a stream's `name` is not served now (`None` when it is), for the log.
    fn unknown_reason_of(&self, name: &str) -> Option<String> {
        if self.known(name) {
            return None;
        }
        Some(match name.strip_prefix("spiffe://") {
            Some(td) if TrustDomain::new(td).is_ok() => format!(
                "trust domain {td} is not trusted now (trusted: {}); sent if it becomes trusted",
                self.trusted_list()
            ),
            Some(_) => "not a valid SPIFFE trust domain".to_owned(),
            None if name.starts_with("file-root:") || name.starts_with("file-cert:") => {
                "istio-agent file-mounted name; the central server does not read files".to_owned()
            }
            None => {
                "meshid serves \"default\", \"ROOTCA\", \"ALL\" and \"spiffe://<trust domain>\""
                    .to_owned()
            }
        })
    }

    fn trust_domain_of(&self, name: &str) -> Option<TrustDomain> {
        let td = TrustDomain::new(name.strip_prefix("spiffe://")?).ok()?;
        self.snapshot.bundle.roots_of(&td).map(|_| td)
    }

    /// Issues (or re-issues) `default` with a fresh key; a failure is retried with backoff by
    /// the renewer, and the previous leaf stays in service meanwhile.
    fn renew(&mut self) -> Result<(), Status> {
        let (snapshot, shared, id) = (&self.snapshot, &self.shared, &self.identity.spiffe_id);
        self.cred.renew(|| {
            let (issued, key) = snapshot.authority.issue_with_new_key(id, None).map_err(|e| {
                shared.metrics.sign_errors.get_or_create(&Metrics::label("kind", status::ca_kind(&e))).inc();
                tracing::error!(id = %id, error = %e, "SDS certificate issuance failed; retrying with backoff");
                status::ca(&e)
            })?;
            shared
                .metrics
                .certs_issued
                .get_or_create(&Metrics::label("api", "sds"))
                .inc();
            tracing::debug!(id = %id, serial = %issued.serial, "SDS certificate issued");
            Ok(Issued {
                signer_id: snapshot.signer_id.clone(),
                not_after: issued.not_after,
                value: Leaf { issued, key },
            })
        })
    }

    /// The held leaf, issuing the first one if there is none yet.
    fn leaf(&mut self) -> Result<&Leaf, Status> {
        if self.cred.current().is_none() {
            self.renew()?;
        }
        self.cred
            .current()
            .ok_or_else(|| Status::unavailable("no certificate could be issued yet; retry"))
    }

    /// A scheduled renewal: first re-checks the caller's token (a refused token ends the stream;
    /// an unavailable backend defers the renewal with backoff: no certificate on a doubt), then
    /// re-issues.
    async fn renew_checked(&mut self) {
        if let Some(creds) = &self.creds {
            match self.shared.auth.revalidate(creds).await {
                Ok(id) if id.spiffe_id == self.identity.spiffe_id => {}
                Ok(id) => {
                    tracing::warn!(was = %self.identity.spiffe_id, now = %id.spiffe_id, "token now names another identity; ending the stream");
                    return self.end_stream(Status::permission_denied(
                        "the token no longer names the identity this stream was opened for; reconnect",
                    ));
                }
                Err(e) if e.is_unavailable() => {
                    tracing::warn!(id = %self.identity.spiffe_id, error = %e, "cannot re-check the caller before renewal; retrying with backoff");
                    return self.cred.backoff();
                }
                Err(e) => {
                    tracing::info!(id = %self.identity.spiffe_id, reason = e.reason(), error = %e, "caller's token no longer valid; ending the stream");
                    return self.end_stream(status::identity(&e));
                }
            }
        }
        let _ = self.renew();
    }

    fn end_stream(&mut self, status: Status) {
        if let Some(end) = &self.end {
            end.end(status);
        }
    }

    fn ended(&self) -> bool {
        self.end.as_ref().is_some_and(StreamEnd::is_ended)
    }

    fn render_secret(&mut self, name: &str) -> Result<Secret, Status> {
        let validation =
            |ctx: CertificateValidationContext| Some(secret::Type::ValidationContext(ctx));
        let bundle = &self.snapshot.bundle;
        // The plug-in CA's CRLs (`ca-crl.pem`), as istio-agent puts them into ROOTCA
        // (`sdsservice.go` toEnvoySecret), `only_verify_leaf_cert_crl` left false as Istio
        // does. Envoy then wants a CRL from every CA of a peer's chain, so a context that
        // also trusts federated roots (whose CAs have none here) carries no CRL.
        let crl = || {
            bundle
                .own_crl_pem()
                .and_then(|c| inline(c.as_bytes().to_vec()))
        };
        let own_only_crl = || {
            if bundle.iter().count() == 1 {
                crl()
            } else {
                None
            }
        };
        let r#type = match name {
            DEFAULT => {
                let c = self.leaf()?;
                Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(c.issued.chain_pem().into_bytes()),
                    private_key: inline(c.key.secret_pkcs8_pem().as_bytes().to_vec()),
                    ..Default::default()
                }))
            }
            ROOTCA if self.shared.merge_into_rootca => validation(CertificateValidationContext {
                trusted_ca: inline(
                    cert::to_pem_bundle(bundle.iter().flat_map(|(_, roots)| roots)).into_bytes(),
                ),
                crl: own_only_crl(),
                ..Default::default()
            }),
            ROOTCA => validation(CertificateValidationContext {
                trusted_ca: inline(bundle.own_roots_pem().as_bytes().to_vec()),
                crl: crl(),
                ..Default::default()
            }),
            ALL => validation(spiffe_validation(bundle, own_only_crl())),
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

    /// A trust resource and its version. They depend only on the snapshot: rendered and
    /// digested once per snapshot for every stream, not per stream and per check.
    fn trust_resource(&mut self, name: &str) -> Result<Option<Rendered>, Status> {
        if !self.known(name) {
            return Ok(None); // unknown, or no longer trusted: left out (delta: removed)
        }
        let generation = (self.snapshot.bundle.sequence(), self.snapshot.generation);
        if let Some(r) = self.shared.rendered.get(generation, name) {
            return Ok(Some(r));
        }
        let any = pack_any(self.render_secret(name)?);
        let version = content_version(&any);
        let r: Rendered = Arc::new((any, version));
        self.shared.rendered.put(generation, name, r.clone());
        Ok(Some(r))
    }

    /// Takes a new CA snapshot; a new signer makes `default` due within the spread window, a
    /// tainted one at once (the renewer decides, as for every credential; the renewal itself
    /// runs from `changed`).
    fn update_snapshot(&mut self, next: Arc<CaSnapshot>) {
        self.snapshot = next;
        self.cred.observe_ca(&self.snapshot);
    }

    /// Whether `name` carries the own trust domain's roots.
    fn is_own_bundle(&self, name: &str) -> bool {
        match name {
            ROOTCA | ALL => true,
            other => other
                .strip_prefix("spiffe://")
                .is_some_and(|td| td == self.snapshot.bundle.own_trust_domain().to_string()),
        }
    }

    /// Records what the client now holds: the signer of `default` when its serial is the held
    /// leaf's, and the own roots of a bundle resource whose version is the current one (an
    /// older version is being replaced by a push already on its way).
    fn record_ack(&mut self, acked: &[(String, String)]) {
        if self.track.is_none() {
            return;
        }
        let mut bundle_acked = false;
        for (name, version) in acked {
            if name == DEFAULT {
                if let (Some(h), Some(track)) = (self.cred.held(), &self.track) {
                    if h.value.issued.serial.to_string() == *version {
                        track.acked_leaf(&h.signer_id);
                        track.leaf_expires(h.not_after);
                    }
                }
            } else if !bundle_acked && self.is_own_bundle(name) {
                let current = self.trust_resource(name).ok().flatten();
                if current.is_some_and(|r| r.1 == *version) {
                    bundle_acked = true;
                }
            }
        }
        if bundle_acked {
            if let Some(track) = &self.track {
                track.acked_bundle(self.shared.root_ids.of(&self.snapshot.bundle));
            }
        }
    }

    fn next_refresh(&self, default_subscribed: bool) -> Option<OffsetDateTime> {
        self.cred.next_wake().filter(|_| default_subscribed)
    }
}

/// Bytes inlined in a Secret.
fn inline(b: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(b)),
        watched_directory: None,
    })
}

/// `ALL`: Envoy's SPIFFE certificate validator with one trust bundle per trust domain.
fn spiffe_validation(
    bundle: &crate::trust::TrustBundleSet,
    crl: Option<DataSource>,
) -> CertificateValidationContext {
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
    CertificateValidationContext {
        crl,
        custom_validator_config: Some(TypedExtensionConfig {
            name: SPIFFE_VALIDATOR.into(),
            typed_config: Some(pack_any(config)),
        }),
        ..Default::default()
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

    fn unknown_reason(&self, name: &str) -> Option<String> {
        self.unknown_reason_of(name)
    }

    /// The serial for `default`; a digest of the content for the trust resources.
    fn version(&mut self, name: &str) -> Result<Option<String>, Status> {
        if name == DEFAULT {
            return Ok(Some(self.leaf()?.issued.serial.to_string()));
        }
        Ok(self.trust_resource(name)?.map(|r| r.1.clone()))
    }

    fn render(&mut self, name: &str) -> Result<Option<Any>, Status> {
        if name == DEFAULT {
            if !self.known(name) {
                return Ok(None);
            }
            return self.render_secret(name).map(|s| Some(pack_any(s)));
        }
        Ok(self.trust_resource(name)?.map(|r| r.0.clone()))
    }

    fn changed<'a>(
        &'a mut self,
        subscribed: &'a BTreeSet<String>,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            if self.ended() {
                return false;
            }
            let default = subscribed.contains(DEFAULT);
            let wake = if self.next_refresh(default).is_some() {
                self.cred.wake()
            } else {
                Box::pin(std::future::pending())
            };
            tokio::select! {
                r = self.live.changed() => {
                    if r.is_err() {
                        return false;
                    }
                    let next = self.live.borrow_and_update().clone();
                    self.update_snapshot(next);
                }
                _ = wake => {}
            }
            if default && self.cred.current().is_some() && self.cred.is_due() {
                self.renew_checked().await;
            }
            !self.ended()
        })
    }

    fn label(name: &str) -> String {
        resource_label(name).to_owned()
    }

    fn on_subscribe(&mut self, subscribed: &BTreeSet<String>) {
        if let Some(track) = &self.track {
            let bundle = subscribed.iter().any(|n| self.is_own_bundle(n));
            track.subscribed(bundle, subscribed.contains(DEFAULT));
        }
    }

    fn on_ack(&mut self, acked: &[(String, String)]) {
        self.record_ack(acked);
    }
}

// === the service ===

impl SdsService {
    /// The workload of a new stream and the bound of its lifetime (token expiry, maximum age,
    /// or a failed re-check).
    fn open<T>(&self, request: &Request<T>, identity: Identity) -> (Workload, Bound) {
        let (end, ended) = lifetime::stream_end();
        let deadline = lifetime::deadline(&identity, &self.0.limits, self.0.clock.now());
        let creds = credentials(request);
        let w = Workload::for_stream(self.0.clone(), identity, creds, end);
        let bound = Bound {
            clock: self.0.clock.clone(),
            deadline,
            ended,
        };
        (w, bound)
    }
}

/// A stream's lifetime bound, applied to its response stream.
struct Bound {
    clock: Arc<dyn Clock>,
    deadline: (OffsetDateTime, Status),
    ended: watch::Receiver<Option<Status>>,
}

impl Bound {
    fn apply<T: Send + 'static>(self, out: Out<T>) -> Out<T> {
        lifetime::bound(out, &self.clock, self.deadline, self.ended)
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type StreamSecretsStream = Out<DiscoveryResponse>;
    type DeltaSecretsStream = Out<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let identity = self.0.auth.authenticate(&request).await?;
        let proof = super::proof_hook::opened(self.0.proxies.as_ref(), &identity);
        let (w, bound) = self.open(&request, identity);
        let out = xds::spawn_sotw(
            w,
            request.into_inner(),
            self.0.xds.clone(),
            self.0.stop.clone(),
        );
        Ok(Response::new(super::proof_hook::hold(
            bound.apply(out),
            proof,
        )))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let identity = self.0.auth.authenticate(&request).await?;
        let proof = super::proof_hook::opened(self.0.proxies.as_ref(), &identity);
        let (w, bound) = self.open(&request, identity);
        let out = xds::spawn_delta(
            w,
            request.into_inner(),
            self.0.xds.clone(),
            self.0.stop.clone(),
        );
        Ok(Response::new(super::proof_hook::hold(
            bound.apply(out),
            proof,
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
        if let (Some(p), true) = (
            &self.0.proxies,
            req.resource_names.iter().any(|n| n == "default"),
        ) {
            p.certificate_issued(&w.identity);
        }
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
