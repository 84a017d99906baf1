//! A small sidecar: the outbound half opens a real TCP connection to an EDS endpoint, with mTLS
//! (its SDS certificate, the peer checked against ROOTCA and the cluster's SPIFFE IDs) or in
//! plaintext, as the cluster's transport socket match picks; the inbound half accepts mTLS
//! (client certificate required and checked) or, PERMISSIVE like Istio's default, plaintext,
//! and forwards to its application.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use rustls_pki_types::{CertificateDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{
    cluster::{ClusterConfig, ClusterSource, ClusterTls},
    control::{client_config, ProxyState},
    DemoError,
};
use crate::{
    ca::{cert::fingerprint_id, CertDer},
    discovery::{cluster_name, Decision},
    spiffe::{SpiffeId, TrustDomain},
    tls::{crypto_provider, peer_spiffe_id, PeerPolicy, RotatingCert, SpiffeVerifier},
};

/// How a connection was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Mtls,
    Plaintext,
}

/// One outbound connection, as the calling sidecar saw it.
#[derive(Clone, Debug)]
pub struct Call {
    pub cluster: String,
    pub endpoint: SocketAddr,
    /// The endpoint's EDS `tlsMode` metadata.
    pub endpoint_tls_mode: Option<String>,
    pub transport: Transport,
    /// The DestinationRule that set the TLS mode, if one did.
    pub destination_rule: Option<String>,
    /// Discovery's explanation of the decision (`describe`).
    pub why: String,
    pub local: SocketAddr,
    pub own_id: Option<SpiffeId>,
    /// Root id (fingerprint) that anchors the certificate this side presented.
    pub own_root: Option<String>,
    pub peer_id: Option<SpiffeId>,
    pub peer_root: Option<String>,
    pub echoed: usize,
}

/// One inbound connection, as the receiving sidecar saw it.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub from: SocketAddr,
    pub mtls: bool,
    pub peer_id: Option<SpiffeId>,
    pub peer_root: Option<String>,
    pub own_root: Option<String>,
}

/// A workload's sidecar.
#[derive(Clone)]
pub struct Sidecar {
    pub name: String,
    pub id: SpiffeId,
    pub inbound_addr: SocketAddr,
    pub(crate) state: watch::Receiver<ProxyState>,
    pub(crate) clusters: ClusterSource,
    pub(crate) inbound: Arc<Mutex<Vec<Inbound>>>,
    pub(crate) td: TrustDomain,
    pub(crate) domain: String,
}

/// The root (by fingerprint id) among `roots` that signed the top of `chain`.
pub fn anchor_id(chain: &[CertificateDer<'_>], roots: &[CertDer]) -> Option<String> {
    let (_, top) = x509_parser::parse_x509_certificate(chain.last()?).ok()?;
    roots.iter().find_map(|r| {
        let (_, root) = x509_parser::parse_x509_certificate(r).ok()?;
        (root.subject() == top.issuer() && top.verify_signature(Some(root.public_key())).is_ok())
            .then(|| fingerprint_id(r))
    })
}

impl Sidecar {
    /// What this sidecar got from meshid so far.
    pub fn state(&self) -> ProxyState {
        self.state.borrow().clone()
    }

    /// A receiver that changes on every SDS or EDS update.
    pub fn watch(&self) -> watch::Receiver<ProxyState> {
        self.state.clone()
    }

    /// Inbound connections seen so far.
    pub fn inbound(&self) -> Vec<Inbound> {
        self.inbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The inbound record of the connection from `from`.
    pub fn inbound_from(&self, from: SocketAddr) -> Option<Inbound> {
        self.inbound().into_iter().rev().find(|i| i.from == from)
    }

    /// Connects to `service` (`name.namespace`) port `port` as Envoy would: an endpoint from EDS,
    /// the transport from the cluster's configuration and the endpoint's metadata, then sends
    /// `payload` and expects it echoed.
    pub async fn call(&self, service: &str, port: u16, payload: &[u8]) -> Result<Call, DemoError> {
        let (name, ns) = service.split_once('.').unwrap_or((service, ""));
        let cluster = cluster_name(port, &format!("{name}.{ns}.svc.{}", self.domain));
        let state = self.state();
        let ep = state
            .endpoints
            .get(&cluster)
            .and_then(|e| e.first())
            .cloned()
            .ok_or_else(|| {
                DemoError::unexpected(
                    format!("an EDS endpoint for {cluster}"),
                    "none (EDS sent no assignment, or an empty one)",
                )
            })?;
        let cfg = self.clusters.cluster(service, port)?;
        let (transport, why) = choose(&cfg, &ep.addr, ep.tls_mode.as_deref())?;
        let tcp = TcpStream::connect(ep.addr)
            .await
            .map_err(|e| DemoError::conn(format!("connecting to {}", ep.addr), e))?;
        let local = tcp
            .local_addr()
            .map_err(|e| DemoError::conn("local address", e))?;
        let mut call = Call {
            cluster,
            endpoint: ep.addr,
            endpoint_tls_mode: ep.tls_mode.clone(),
            transport,
            destination_rule: match &cfg.tls {
                ClusterTls::DestinationRule(n) => Some(n.clone()),
                ClusterTls::SocketMatches => None,
            },
            why,
            local,
            own_id: None,
            own_root: None,
            peer_id: None,
            peer_root: None,
            echoed: 0,
        };
        match transport {
            Transport::Plaintext => call.echoed = echo(tcp, payload).await?,
            Transport::Mtls => {
                let tls = self
                    .mtls_connect(tcp, service, &cfg, &state, &mut call)
                    .await?;
                call.echoed = echo(tls, payload).await?;
            }
        }
        Ok(call)
    }

    async fn mtls_connect(
        &self,
        tcp: TcpStream,
        service: &str,
        cfg: &ClusterConfig,
        state: &ProxyState,
        call: &mut Call,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, DemoError> {
        let secrets = state.default.clone().ok_or_else(|| {
            DemoError::unexpected("an SDS `default` certificate", "none received yet")
        })?;
        let tls_cfg = client_config(
            state.roots.clone(),
            PeerPolicy::TrustDomain(self.td.clone()),
            Some(secrets.certified.clone()),
            vec![b"istio".to_vec()],
        )
        .map_err(|e| DemoError::conn("client TLS config", e))?;
        let (name, ns) = service.split_once('.').unwrap_or((service, ""));
        let sni = ServerName::try_from(format!("{name}.{ns}.svc.{}", self.domain))
            .map_err(|e| DemoError::conn("SNI", e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg))
            .connect(sni, tcp)
            .await
            .map_err(|e| DemoError::conn(format!("mTLS handshake with {}", call.endpoint), e))?;
        let peer_chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
        let peer = peer_chain
            .first()
            .ok_or_else(|| DemoError::conn("mTLS handshake", "the peer sent no certificate"))?;
        let peer_id = peer_spiffe_id(peer).map_err(|e| DemoError::conn("peer certificate", e))?;
        // Envoy matches the SANs during the handshake; checked here before any byte is sent.
        if !cfg.peer_ids.contains(&peer_id) {
            return Err(DemoError::unexpected(
                format!(
                    "a peer with one of {:?}",
                    cfg.peer_ids
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                ),
                peer_id.to_string(),
            ));
        }
        call.peer_root = anchor_id(peer_chain, &state.roots);
        call.peer_id = Some(peer_id);
        call.own_id = secrets.chain.first().and_then(|c| peer_spiffe_id(c).ok());
        call.own_root = anchor_id(&secrets.chain, &state.roots);
        Ok(tls)
    }
}

/// The transport for one endpoint: the DestinationRule's, else the socket match on the
/// endpoint's EDS metadata — which must agree with discovery's decision for that endpoint.
fn choose(
    cfg: &ClusterConfig,
    addr: &SocketAddr,
    tls_mode: Option<&str>,
) -> Result<(Transport, String), DemoError> {
    let d = cfg
        .decisions
        .iter()
        .find(|d| d.addr == addr.ip().to_string() && d.port == addr.port())
        .ok_or_else(|| {
            DemoError::unexpected(
                format!("discovery to know the EDS endpoint {addr}"),
                "no such endpoint in describe",
            )
        })?;
    let decided = match d.decision {
        Decision::Mtls => Transport::Mtls,
        Decision::Plaintext => Transport::Plaintext,
        other => {
            return Err(DemoError::unexpected(
                "mTLS or plaintext",
                format!("{} ({})", other.label(), d.why),
            ))
        }
    };
    if cfg.tls == ClusterTls::SocketMatches {
        let matched = if tls_mode == Some("istio") {
            Transport::Mtls
        } else {
            Transport::Plaintext
        };
        if matched != decided {
            return Err(DemoError::unexpected(
                format!("EDS metadata (tlsMode {tls_mode:?}) to pick what describe decided ({decided:?})"),
                format!("{matched:?}"),
            ));
        }
    }
    Ok((decided, d.why.clone()))
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    payload: &[u8],
) -> Result<usize, DemoError> {
    s.write_all(payload)
        .await
        .map_err(|e| DemoError::conn("sending", e))?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back)
        .await
        .map_err(|e| DemoError::conn("reading the echo", e))?;
    let _ = s.shutdown().await;
    if back != payload {
        return Err(DemoError::unexpected(
            format!("{} bytes echoed unchanged", payload.len()),
            "different bytes",
        ));
    }
    Ok(back.len())
}

// === inbound ===

/// Accepts on `listener` until `stop`: mTLS (detected by its first byte) or plaintext, then
/// forwards to `app`.
pub(crate) async fn serve_inbound(
    listener: TcpListener,
    app: SocketAddr,
    state: watch::Receiver<ProxyState>,
    td: TrustDomain,
    log: Arc<Mutex<Vec<Inbound>>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, from) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = stop.wait_for(|s| *s) => return,
        };
        let (state, td, log) = (state.clone(), td.clone(), log.clone());
        tokio::spawn(async move {
            if let Err(e) = inbound_conn(tcp, from, app, state, td, log).await {
                tracing::debug!(%from, error = %e, "demo sidecar: inbound connection failed");
            }
        });
    }
}

async fn inbound_conn(
    tcp: TcpStream,
    from: SocketAddr,
    app: SocketAddr,
    state: watch::Receiver<ProxyState>,
    td: TrustDomain,
    log: Arc<Mutex<Vec<Inbound>>>,
) -> Result<(), DemoError> {
    let mut first = [0u8; 1];
    tcp.peek(&mut first)
        .await
        .map_err(|e| DemoError::conn("peeking", e))?;
    let record = |i: Inbound| log.lock().unwrap_or_else(|e| e.into_inner()).push(i);
    if first[0] != 0x16 {
        record(Inbound {
            from,
            mtls: false,
            peer_id: None,
            peer_root: None,
            own_root: None,
        });
        return forward(tcp, app).await;
    }
    let st = state.borrow().clone();
    let secrets = st
        .default
        .clone()
        .ok_or_else(|| DemoError::conn("inbound mTLS", "no SDS certificate yet"))?;
    let cfg = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| DemoError::conn("server TLS config", e))?
        .with_client_cert_verifier(SpiffeVerifier::new(
            st.roots.clone(),
            PeerPolicy::TrustDomain(td),
        ))
        .with_cert_resolver(Arc::new(RotatingCert::new(secrets.certified.clone())));
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        .accept(tcp)
        .await
        .map_err(|e| DemoError::conn("inbound mTLS handshake", e))?;
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    record(Inbound {
        from,
        mtls: true,
        peer_id: chain.first().and_then(|c| peer_spiffe_id(c).ok()),
        peer_root: anchor_id(chain, &st.roots),
        own_root: anchor_id(&secrets.chain, &st.roots),
    });
    forward(tls, app).await
}

async fn forward<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    app: SocketAddr,
) -> Result<(), DemoError> {
    let mut upstream = TcpStream::connect(app)
        .await
        .map_err(|e| DemoError::conn(format!("connecting to the app at {app}"), e))?;
    tokio::io::copy_bidirectional(&mut s, &mut upstream)
        .await
        .map_err(|e| DemoError::conn("forwarding", e))?;
    Ok(())
}
