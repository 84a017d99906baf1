//! An in-process meshid server on 127.0.0.1 ephemeral ports with a dev issuer, and real clients.

use std::{path::PathBuf, sync::Arc, time::Duration};

use envoy_types::pb::envoy::{
    config::core::v3::data_source::Specifier,
    extensions::transport_sockets::tls::v3::{secret, Secret},
    service::{
        discovery::v3::{DiscoveryRequest, DiscoveryResponse},
        secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
    },
};
use meshid::{
    api::istio::istio_certificate_service_client::IstioCertificateServiceClient,
    ca::{cert, root, KeyType},
    clock::Clock,
    config::{self, Config},
    identity::dev_issuer::{DevIssuer, TokenRequest},
    server::Running,
    spiffe::TrustDomain,
    state::{CaState, DirStore, StateStore},
};
use prost::Message;
use time::OffsetDateTime;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig},
};

pub struct TestServer {
    pub running: Running,
    /// The configuration it was started with (to start it again on the same state).
    pub cfg: Config,
    pub issuer: DevIssuer,
    pub root_pem: String,
    pub dir: tempfile::TempDir,
    pub clock: Arc<dyn Clock>,
}

/// Adds the bearer token to every call.
pub type BearerFn =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
pub type Authed = InterceptedService<Channel, BearerFn>;

impl TestServer {
    pub async fn start(clock: Arc<dyn Clock>) -> Self {
        Self::start_with(clock, |_| {}).await
    }

    pub async fn start_with(clock: Arc<dyn Clock>, edit: impl FnOnce(&mut Config)) -> Self {
        Self::start_custom(clock, root::DEFAULT_ROOT_TTL, edit).await
    }

    /// As `start_with`, with a root valid for `root_ttl` from a minute before the clock's now.
    pub async fn start_custom(
        clock: Arc<dyn Clock>,
        root_ttl: Duration,
        edit: impl FnOnce(&mut Config),
    ) -> Self {
        Self::start_in(clock, "cluster.local", root_ttl, edit).await
    }

    /// As `start_custom`, in trust domain `td`.
    pub async fn start_in(
        clock: Arc<dyn Clock>,
        td: &str,
        root_ttl: Duration,
        edit: impl FnOnce(&mut Config),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new(td).unwrap();
        let now = clock.now();
        let ca = root::generate_root(
            &td,
            KeyType::EcdsaP256,
            root_ttl + Duration::from_secs(60),
            now - Duration::from_secs(60),
        )
        .unwrap();
        let root_pem = cert::to_pem(&ca.cert);
        let store = DirStore::new(dir.path().join("state"));
        store
            .compare_and_swap(None, &CaState::with_generated_root(td, &ca, now))
            .unwrap();
        let issuer = DevIssuer::init(
            &dir.path().join("issuer"),
            "https://kubernetes.default.svc.cluster.local",
            None,
        )
        .unwrap();
        let mut cfg = Config {
            state_dir: dir.path().join("state"),
            state: None,
            state_kubeconfig: None,
            listen: config::Listen {
                grpc: "127.0.0.1:0".parse().unwrap(),
                http: "127.0.0.1:0".parse().unwrap(),
                unix: Some(dir.path().join("meshid.sock")),
                ..Default::default()
            },
            server_identity: Default::default(),
            issuance: Default::default(),
            rotation: Default::default(),
            logging: Default::default(),
            state_poll_interval: Duration::from_millis(100),
            clusters: vec![config::Cluster {
                name: "Kubernetes".into(),
                aliases: Vec::new(),
                default: true,
                audiences: vec!["istio-ca".into()],
                allow_legacy_tokens: false,
                cache_ttl: Duration::from_secs(60),
                cache_max_entries: 1000,
                negative_cache_ttl: Duration::from_secs(5),
                negative_cache_max_entries: 1000,
                leeway: Duration::from_secs(60),
                tokenreview: None,
                jwks: Some(config::Jwks {
                    issuer: issuer.issuer().into(),
                    additional_issuers: Vec::new(),
                    file: Some(DevIssuer::jwks_path(&dir.path().join("issuer"))),
                    url: None,
                    oidc_issuer: None,
                    api_server: None,
                    ca_file: None,
                }),
            }],
            discovery: None,
            limits: Default::default(),
            xds: Default::default(),
            auto_rotation: Default::default(),
            root_cert_configmap: Default::default(),
            federation: Default::default(),
            leader_election: Default::default(),
            csr_san_policy: Default::default(),
            trusted_node_accounts: meshid::config::default_trusted_node_accounts(),
        };
        edit(&mut cfg);
        let running = meshid::server::start(cfg.clone(), clock.clone())
            .await
            .unwrap();
        Self {
            running,
            cfg,
            issuer,
            root_pem,
            dir,
            clock,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A projected-style token for ns/sa, issued at the server clock's now.
    pub fn token(&self, ns: &str, sa: &str) -> String {
        self.token_for(ns, sa, Duration::from_secs(3600))
    }

    /// As `token`, valid for `ttl`.
    pub fn token_for(&self, ns: &str, sa: &str, ttl: Duration) -> String {
        let req = TokenRequest {
            namespace: ns.into(),
            service_account: sa.into(),
            audiences: vec!["istio-ca".into()],
            ttl,
            pod: None,
        };
        // Tokens are checked against the system clock by nothing here: the validator uses the
        // server's clock, so mint them at that time.
        self.issuer.token(&req, self.clock.now()).unwrap()
    }

    pub async fn channel(&self) -> Channel {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.root_pem))
            .domain_name("localhost");
        Channel::from_shared(format!("https://{}", self.running.grpc_addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn sds(&self, token: Option<String>) -> SecretDiscoveryServiceClient<Authed> {
        SecretDiscoveryServiceClient::with_interceptor(self.channel().await, bearer(token))
    }

    pub async fn csr(&self, token: Option<String>) -> IstioCertificateServiceClient<Authed> {
        IstioCertificateServiceClient::with_interceptor(self.channel().await, bearer(token))
    }
}

pub fn bearer(token: Option<String>) -> BearerFn {
    Box::new(move |mut req: tonic::Request<()>| {
        if let Some(t) = &token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(req)
    })
}

/// A StreamSecrets request for `names`, ACKing `nonce` at `version` (empty for the first).
pub fn sds_req(names: &[&str], nonce: &str, version: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        version_info: version.into(),
        type_url: meshid::api::SECRET_TYPE_URL.into(),
        ..Default::default()
    }
}

/// The secrets in a response, by name.
pub fn secrets(resp: &DiscoveryResponse) -> Vec<Secret> {
    resp.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, meshid::api::SECRET_TYPE_URL);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn inline(ds: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> String {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

/// (chain PEM, key PEM) of a `default` secret.
pub fn tls_cert(s: &Secret) -> (String, String) {
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            (inline(&t.certificate_chain), inline(&t.private_key))
        }
        other => panic!("{} is not a TlsCertificate: {other:?}", s.name),
    }
}

/// trusted_ca PEM of a validation-context secret.
pub fn trusted_ca(s: &Secret) -> String {
    match &s.r#type {
        Some(secret::Type::ValidationContext(v)) => inline(&v.trusted_ca),
        other => panic!("{} is not a ValidationContext: {other:?}", s.name),
    }
}

/// Now, for tests that do not move time.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}
