//! A sidecar's side of the control plane, as Envoy does it: one SDS stream (`default` and
//! `ROOTCA`) and one EDS stream (the clusters it calls), each ACKing what it applied and NACKing
//! what it cannot (Envoy's `error_detail`), reconnecting with a fresh token when the server
//! ends a stream (token expiry, max age). The control-plane connection itself is TLS verified
//! against the mesh roots (first the bootstrap root, then the latest ROOTCA) and meshid's SPIFFE
//! ID. meshid serves no CDS: the cluster's TLS settings come from `cluster.rs`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::{
            core::v3::{address, data_source::Specifier, socket_address::PortSpecifier, Node},
            endpoint::v3::{lb_endpoint::HostIdentifier, ClusterLoadAssignment},
        },
        extensions::transport_sockets::tls::v3::{secret, Secret},
        service::{
            discovery::v3::{DiscoveryRequest, DiscoveryResponse},
            endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient,
            secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
        },
    },
    google::{protobuf::value::Kind, rpc::Status as RpcStatus},
};
use prost::Message;
use rustls::sign::CertifiedKey;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint, Uri},
};

use crate::{
    api::{client::BearerToken, ENDPOINT_TYPE_URL, SECRET_TYPE_URL},
    ca::{cert, CertDer, PrivateKey},
    spiffe::SpiffeId,
    tls::{crypto_provider, PeerPolicy, SpiffeVerifier},
};

/// The `default` secret as the sidecar holds it.
pub struct Secrets {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertDer>,
    pub certified: Arc<CertifiedKey>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("chain", &self.chain.len())
            .field("key", &"[secret key elided]")
            .finish()
    }
}

/// One EDS endpoint with its transport-socket-match metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsEndpoint {
    pub addr: SocketAddr,
    /// `filter_metadata["envoy.transport_socket_match"]["tlsMode"]`, if any.
    pub tls_mode: Option<String>,
}

/// Everything a sidecar got from meshid so far.
#[derive(Clone, Debug, Default)]
pub struct ProxyState {
    pub default: Option<Arc<Secrets>>,
    /// ROOTCA: the trust domain's roots.
    pub roots: Vec<CertDer>,
    /// EDS assignments by cluster name.
    pub endpoints: BTreeMap<String, Vec<XdsEndpoint>>,
    pub sds_responses: u64,
    pub eds_responses: u64,
    /// The last control-plane error (cleared by the next accepted response).
    pub last_error: Option<String>,
}

/// Why a demo sidecar's xDS stream ended, or why it refused (NACKed) a response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum XdsClientError {
    #[error("token: {0}")]
    Token(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Client(#[from] crate::api::client::ClientError),
    #[error("connecting to meshid at {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("{kind:?}: {code:?}: {message}")]
    Rpc {
        kind: XdsKind,
        code: tonic::Code,
        message: String,
    },
    #[error("the request stream closed")]
    RequestsClosed,
    #[error("{what}: {reason}")]
    Resource { what: String, reason: String },
}

impl XdsClientError {
    fn rpc(kind: XdsKind, s: &tonic::Status) -> Self {
        Self::Rpc {
            kind,
            code: s.code(),
            message: s.message().to_owned(),
        }
    }

    fn resource(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Resource {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// How one sidecar reaches meshid.
#[derive(Clone)]
pub(crate) struct ControlPlane {
    pub addr: SocketAddr,
    pub server_id: SpiffeId,
    /// Roots the control-plane connection trusts: the bootstrap root, then the latest ROOTCA.
    pub trust: Arc<RwLock<Vec<CertDer>>>,
    pub token: Arc<dyn Fn() -> Result<String, crate::identity::IdentityError> + Send + Sync>,
    pub node: Node,
}

impl ControlPlane {
    /// A gRPC channel over TLS to meshid, verified against the current roots and meshid's ID.
    async fn channel(&self) -> Result<Channel, XdsClientError> {
        let (addr, trust, id) = (self.addr, self.trust.clone(), self.server_id.clone());
        let connector = tower::service_fn(move |_: Uri| {
            let roots = trust.read().unwrap_or_else(|e| e.into_inner()).clone();
            let id = id.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let cfg = client_config(roots, PeerPolicy::Exact(id), None, vec![b"h2".to_vec()])
                    .map_err(std::io::Error::other)?;
                let name = rustls_pki_types::ServerName::try_from("localhost")
                    .map_err(std::io::Error::other)?;
                let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let connect_failed = |e: tonic::transport::Error| XdsClientError::Connect {
            addr: self.addr,
            reason: e.to_string(),
        };
        Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(connect_failed)?
            .connect_with_connector(connector)
            .await
            .map_err(connect_failed)
    }

    fn authed(
        &self,
        channel: Channel,
    ) -> Result<InterceptedService<Channel, BearerToken>, XdsClientError> {
        let token = (self.token)()?;
        let auth = BearerToken::new(&token, Some(crate::identity::DEFAULT_CLUSTER))?;
        Ok(InterceptedService::new(channel, auth))
    }
}

/// A rustls client config: the peer verified against `roots` by `policy`, optionally with a
/// client certificate.
pub(crate) fn client_config(
    roots: Vec<CertDer>,
    policy: PeerPolicy,
    client: Option<Arc<CertifiedKey>>,
    alpn: Vec<Vec<u8>>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeVerifier::new(roots, policy));
    let mut cfg = match client {
        Some(ck) => builder.with_client_cert_resolver(Arc::new(OneCert(ck))),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn;
    Ok(cfg)
}

#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for OneCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn request(names: &[String], type_url: &str, version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.to_vec(),
        type_url: type_url.into(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// Runs one xDS subscription until `stop`, reconnecting (with a fresh token) when the stream
/// ends or fails. `apply` takes a response into the state, or says why it is refused (NACK).
pub(crate) async fn subscribe(
    cp: ControlPlane,
    kind: XdsKind,
    names: Vec<String>,
    state: Arc<watch::Sender<ProxyState>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let result = tokio::select! {
            r = stream_once(&cp, kind, &names, &state) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        if let Err(why) = result {
            tracing::debug!(%why, kind = ?kind, "demo sidecar: xDS stream failed; reconnecting");
            state.send_modify(|s| s.last_error = Some(why.to_string()));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Which xDS type a subscription is.
#[derive(Clone, Copy, Debug)]
pub(crate) enum XdsKind {
    Sds,
    Eds,
}

async fn stream_once(
    cp: &ControlPlane,
    kind: XdsKind,
    names: &[String],
    state: &watch::Sender<ProxyState>,
) -> Result<(), XdsClientError> {
    let channel = cp.channel().await?;
    let authed = cp.authed(channel)?;
    let type_url = match kind {
        XdsKind::Sds => SECRET_TYPE_URL,
        XdsKind::Eds => ENDPOINT_TYPE_URL,
    };
    let (tx, rx) = mpsc::channel(8);
    let mut first = request(names, type_url, "", "");
    first.node = Some(cp.node.clone());
    tx.send(first)
        .await
        .map_err(|_| XdsClientError::RequestsClosed)?;
    let requests = ReceiverStream::new(rx);
    let mut stream = match kind {
        XdsKind::Sds => SecretDiscoveryServiceClient::new(authed)
            .stream_secrets(requests)
            .await
            .map_err(|s| XdsClientError::rpc(kind, &s))?
            .into_inner(),
        XdsKind::Eds => EndpointDiscoveryServiceClient::new(authed)
            .stream_endpoints(requests)
            .await
            .map_err(|s| XdsClientError::rpc(kind, &s))?
            .into_inner(),
    };
    let mut accepted = String::new();
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(s) => return Err(XdsClientError::rpc(kind, &s)),
        };
        let applied = match kind {
            XdsKind::Sds => apply_sds(&resp, state, &cp.trust),
            XdsKind::Eds => apply_eds(&resp, state),
        };
        let mut ack = request(names, type_url, &accepted, &resp.nonce);
        match applied {
            Ok(()) => {
                accepted = resp.version_info.clone();
                ack.version_info = accepted.clone();
            }
            Err(why) => {
                tracing::warn!(%why, "demo sidecar: NACK");
                ack.error_detail = Some(RpcStatus {
                    code: tonic::Code::InvalidArgument as i32,
                    message: why.to_string(),
                    details: Vec::new(),
                });
            }
        }
        tx.send(ack)
            .await
            .map_err(|_| XdsClientError::RequestsClosed)?;
    }
}

fn inline(ds: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> Vec<u8> {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b.clone(),
        Some(Specifier::InlineString(s)) => s.clone().into_bytes(),
        _ => Vec::new(),
    }
}

fn apply_sds(
    resp: &DiscoveryResponse,
    state: &watch::Sender<ProxyState>,
    trust: &RwLock<Vec<CertDer>>,
) -> Result<(), XdsClientError> {
    let (mut default, mut roots) = (None, None);
    for any in &resp.resources {
        let s = Secret::decode(any.value.as_slice())
            .map_err(|e| XdsClientError::resource("secret", e))?;
        match (s.name.as_str(), &s.r#type) {
            ("default", Some(secret::Type::TlsCertificate(t))) => {
                let chain = cert::certs_from_pem(&inline(&t.certificate_chain), "default chain")
                    .map_err(|e| XdsClientError::resource("default chain", e))?;
                let key = PrivateKey::from_pem(&inline(&t.private_key), "default key")
                    .map_err(|e| XdsClientError::resource("default key", e))?;
                let der = key.secret_pkcs8_der();
                let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(
                    rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_slice()).clone_key(),
                );
                let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
                    .map_err(|e| XdsClientError::resource("default key", e))?;
                let ck = CertifiedKey::new(chain.clone(), signing);
                ck.keys_match()
                    .map_err(|e| XdsClientError::resource("default", e))?;
                default = Some(Arc::new(Secrets {
                    chain,
                    certified: Arc::new(ck),
                }));
            }
            ("ROOTCA", Some(secret::Type::ValidationContext(v))) => {
                let r = cert::certs_from_pem(&inline(&v.trusted_ca), "ROOTCA")
                    .map_err(|e| XdsClientError::resource("ROOTCA", e))?;
                roots = Some(r);
            }
            (name, _) => {
                return Err(XdsClientError::resource(
                    format!("secret {name:?}"),
                    "not one a sidecar asked for",
                ))
            }
        }
    }
    if let Some(r) = &roots {
        *trust.write().unwrap_or_else(|e| e.into_inner()) = r.clone();
    }
    state.send_modify(|s| {
        if let Some(d) = default {
            s.default = Some(d);
        }
        if let Some(r) = roots {
            s.roots = r;
        }
        s.sds_responses += 1;
        s.last_error = None;
    });
    Ok(())
}

fn apply_eds(
    resp: &DiscoveryResponse,
    state: &watch::Sender<ProxyState>,
) -> Result<(), XdsClientError> {
    let mut got = BTreeMap::new();
    for any in &resp.resources {
        let cla = ClusterLoadAssignment::decode(any.value.as_slice())
            .map_err(|e| XdsClientError::resource("assignment", e))?;
        let mut eps = Vec::new();
        for lb in cla.endpoints.iter().flat_map(|l| &l.lb_endpoints) {
            let Some(HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                continue;
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                return Err(XdsClientError::resource(
                    &cla.cluster_name,
                    "endpoint without a socket address",
                ));
            };
            let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else {
                return Err(XdsClientError::resource(
                    &cla.cluster_name,
                    "endpoint without a port",
                ));
            };
            let addr = format!("{}:{port}", sa.address).parse().map_err(|e| {
                XdsClientError::resource(
                    format!("{}: endpoint {}", cla.cluster_name, sa.address),
                    e,
                )
            })?;
            let tls_mode = lb
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"))
                .and_then(|s| s.fields.get("tlsMode"))
                .and_then(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                });
            eps.push(XdsEndpoint { addr, tls_mode });
        }
        got.insert(cla.cluster_name.clone(), eps);
    }
    state.send_modify(|s| {
        s.endpoints.extend(got);
        s.eds_responses += 1;
        s.last_error = None;
    });
    Ok(())
}
