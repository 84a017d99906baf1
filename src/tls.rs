//! TLS with SPIFFE identities over rustls (ring): a serving config whose certificate can be
//! swapped without a restart, and a verifier that checks a peer's chain against trust roots
//! and then its SPIFFE ID (rustls' default verifier wants DNS names; SVIDs carry a URI SAN).

use std::sync::{Arc, RwLock};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{
        ring as provider, verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms,
    },
    server::{
        danger::ClientCertVerified, danger::ClientCertVerifier, ClientHello, ResolvesServerCert,
    },
    sign::CertifiedKey,
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::{
    ca::{CertDer, IssuedCert, PrivateKey},
    spiffe::{SpiffeId, TrustDomain},
};

/// The provider every meshid TLS config uses.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(provider::default_provider())
}

/// A certificate and key as rustls serves them.
pub fn certified_key(
    issued: &IssuedCert,
    key: &PrivateKey,
) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let chain: Vec<CertificateDer<'static>> = std::iter::once(&issued.leaf)
        .chain(issued.chain.iter())
        .cloned()
        .collect();
    let der = key.secret_pkcs8_der();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.as_slice()).clone_key());
    let signing = provider::sign::any_supported_type(&key_der)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// A server certificate that can be replaced while the listener runs.
#[derive(Debug)]
pub struct RotatingCert(RwLock<Arc<CertifiedKey>>);

impl RotatingCert {
    pub fn new(initial: Arc<CertifiedKey>) -> Self {
        Self(RwLock::new(initial))
    }

    /// Serves `next` from the next handshake on.
    pub fn set(&self, next: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = next;
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// A TLS 1.2/1.3 server config for gRPC (ALPN h2) serving `cert`, without client certificates.
pub fn grpc_server_config(cert: Arc<RotatingCert>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(server_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // The server's order decides, as in Go's crypto/tls (istiod) and BoringSSL (Envoy).
    cfg.ignore_client_order = true;
    // A reconnecting proxy resumes its session (no certificate, no signature) from one
    // stateless ticket, as Go's crypto/tls server sends it: no per-session server memory, and
    // no cache that 10,000 proxies would thrash (rustls' default: two tickets per connection,
    // kept in a 256-entry cache).
    cfg.ticketer = provider::Ticketer::new()?;
    cfg.send_tls13_tickets = 1;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(cfg)
}

/// The provider with AES-128-GCM suites first: what Go's TLS 1.3 server picks on machines with
/// AES hardware (`defaultCipherSuitesTLS13`, AES_128_GCM_SHA256 first) and what BoringSSL
/// prefers. rustls would otherwise pick AES-256-GCM-SHA384, whose SHA-384 key schedule runs
/// without SHA extensions on most x86 CPUs: 4 % of the server's CPU in a cold-start storm of
/// fresh handshakes (`cargo bench --bench storm`).
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite as S;
    let mut p = provider::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            S::TLS13_AES_128_GCM_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

/// Which peers a `SpiffeVerifier` accepts.
#[derive(Clone, Debug)]
pub enum PeerPolicy {
    /// Any SVID of this trust domain.
    TrustDomain(TrustDomain),
    /// Exactly this SPIFFE ID.
    Exact(SpiffeId),
}

/// Verifies a peer's chain against `roots` (webpki, with the TLS purpose of the side), then
/// requires exactly one URI SAN that is a SPIFFE ID allowed by the policy.
#[derive(Debug)]
pub struct SpiffeVerifier {
    roots: Vec<CertDer>,
    policy: PeerPolicy,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeVerifier {
    pub fn new(roots: Vec<CertDer>, policy: PeerPolicy) -> Arc<Self> {
        Arc::new(Self {
            roots,
            policy,
            algs: provider::default_provider().signature_verification_algorithms,
        })
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        server: bool,
    ) -> Result<(), rustls::Error> {
        let bad = |e: String| rustls::Error::General(e);
        let anchors = self
            .roots
            .iter()
            .map(webpki::anchor_from_trusted_cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("trust root unusable: {e}")))?;
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| bad(format!("peer certificate: {e}")))?;
        let usage = if server {
            webpki::KeyUsage::server_auth()
        } else {
            webpki::KeyUsage::client_auth()
        };
        ee.verify_for_usage(
            self.algs.all,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        let id = peer_spiffe_id(end_entity).map_err(|e| bad(e.to_string()))?;
        let ok = match &self.policy {
            PeerPolicy::TrustDomain(td) => id.trust_domain() == td,
            PeerPolicy::Exact(want) => &id == want,
        };
        if ok {
            Ok(())
        } else {
            Err(bad(format!(
                "peer {id} is not allowed by {:?}",
                self.policy
            )))
        }
    }
}

/// Why a peer certificate names no single SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    #[error("peer certificate does not parse: {0}")]
    Unparsable(String),
    #[error("peer certificate has no SAN")]
    NoSan,
    #[error("peer URI SAN {uri:?}: {source}")]
    NotSpiffe {
        uri: String,
        source: crate::spiffe::SpiffeIdError,
    },
    #[error("peer certificate has {0} URI SANs; an SVID has exactly one")]
    UriSanCount(usize),
}

/// The SPIFFE ID of a certificate: its one URI SAN.
pub fn peer_spiffe_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdError> {
    let (_, c) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PeerIdError::Unparsable(e.to_string()))?;
    let san = c
        .subject_alternative_name()
        .map_err(|e| PeerIdError::Unparsable(e.to_string()))?
        .ok_or(PeerIdError::NoSan)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => SpiffeId::parse(one).map_err(|source| PeerIdError::NotSpiffe {
            uri: (*one).to_owned(),
            source,
        }),
        other => Err(PeerIdError::UriSanCount(other.len())),
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, true)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, false)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod suite_tests {
    use super::*;

    /// Moves TLS records between two in-memory peers until both finish the handshake.
    fn handshake(c: &mut rustls::ClientConnection, s: &mut rustls::ServerConnection) {
        for _ in 0..10 {
            if !c.is_handshaking() && !s.is_handshaking() {
                return;
            }
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        panic!("handshake did not finish");
    }

    /// A client that connects again resumes from the ticket of its first session (Go's
    /// crypto/tls server: `sendSessionTickets` in `handshake_server_tls13.go`, one stateless
    /// ticket). The ticket holds the session, not the server: 300 other proxies connecting in
    /// between (more than rustls' default 256-entry session cache) do not evict it.
    #[test]
    fn a_reconnecting_client_resumes_its_session() {
        let (server, cert) = server_config();
        let connect = |client: &Arc<rustls::ClientConfig>| {
            let mut c = rustls::ClientConnection::new(
                client.clone(),
                ServerName::try_from("localhost").unwrap(),
            )
            .unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            handshake(&mut c, &mut s);
            // The ticket follows the handshake.
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
            s.handshake_kind().unwrap()
        };
        use rustls::HandshakeKind::*;
        let first = client_config(&cert);
        assert_eq!(connect(&first), Full);
        assert_eq!(connect(&first), Resumed);
        for _ in 0..300 {
            assert_eq!(connect(&client_config(&cert)), Full);
        }
        assert_eq!(connect(&first), Resumed);
    }

    fn server_config() -> (Arc<rustls::ServerConfig>, CertificateDer<'static>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = crypto_provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                ck.signing_key.serialize_der(),
            )))
            .unwrap();
        let certified = Arc::new(CertifiedKey::new(vec![ck.cert.der().clone()], key));
        let server = grpc_server_config(Arc::new(RotatingCert::new(certified))).unwrap();
        (Arc::new(server), ck.cert.der().clone())
    }

    /// A client with rustls' defaults (its own session cache) trusting `cert`.
    fn client_config(cert: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// Go's crypto/tls server (`handshake_server_tls13.go`, `defaultCipherSuitesTLS13`) walks
    /// its own preference list, AES_128_GCM_SHA256 first; so does meshid's, even for a client
    /// that lists AES_256_GCM_SHA384 first (rustls' default order).
    #[test]
    fn the_server_picks_aes_128_gcm_sha256_whatever_the_client_order() {
        let (server, cert) = server_config();
        let client = client_config(&cert);
        assert_eq!(
            client.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the client prefers AES-256"
        );
        let mut c =
            rustls::ClientConnection::new(client, ServerName::try_from("localhost").unwrap())
                .unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        handshake(&mut c, &mut s);
        assert_eq!(
            s.negotiated_cipher_suite().unwrap().suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }
}
