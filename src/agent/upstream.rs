//! The agent's side of the server: certificates through Istio's CSR API (a key made here, only a
//! CSR sent) and the trust bundle followed over the server's own SDS (`ROOTCA` and `ALL`, pushed
//! on every change, not polled at renewal as istio-agent does).
//!
//! Every call reads the token file afresh (the kubelet rotates projected tokens) and
//! authenticates the server with the latest bundle the agent holds, or the root-cert file until
//! it holds one.

use std::{path::PathBuf, sync::Arc, time::Duration};

use envoy_types::pb::envoy::{
    config::core::v3::{data_source::Specifier, DataSource, Node},
    extensions::transport_sockets::tls::v3::{secret, Secret, SpiffeCertValidatorConfig},
    service::{
        discovery::v3::{DiscoveryRequest, DiscoveryResponse},
        secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
    },
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;

use super::{
    view::{verifies_to, Svid, TrustSource, View},
    AgentError, AgentMetrics,
};
use crate::{
    api::{
        client::{connect, AuthedChannel, BearerToken},
        istio::{
            istio_certificate_service_client::IstioCertificateServiceClient,
            IstioCertificateRequest,
        },
        SECRET_TYPE_URL,
    },
    backoff::Backoff,
    ca::{cert, CertDer, KeyType, PrivateKey},
    clock::Clock,
    rotation::Issued,
    shutdown::stopping,
    spiffe::TrustDomain,
};

/// How long one CSR call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach and authenticate to the server.
pub struct Upstream {
    pub server: String,
    pub server_name: String,
    pub root_cert: Option<PathBuf>,
    pub token_file: PathBuf,
    pub cluster_id: Option<String>,
    pub clock: Arc<dyn Clock>,
}

impl Upstream {
    /// The token, read now.
    fn token(&self) -> Result<String, AgentError> {
        let t = std::fs::read_to_string(&self.token_file).map_err(|e| AgentError::Token {
            file: self.token_file.clone(),
            why: e.to_string(),
        })?;
        if t.trim().is_empty() {
            return Err(AgentError::Token {
                file: self.token_file.clone(),
                why: "the file is empty".into(),
            });
        }
        Ok(t)
    }

    /// The roots the server is verified with: the own trust domain's latest bundle once the
    /// agent holds one, the root-cert file before.
    fn anchors(&self, view: &View) -> Result<Option<Vec<u8>>, AgentError> {
        if let Some(roots) = view.own_roots().filter(|r| !r.is_empty()) {
            return Ok(Some(cert::to_pem_bundle(roots).into_bytes()));
        }
        match &self.root_cert {
            Some(f) => std::fs::read(f)
                .map(Some)
                .map_err(|e| AgentError::RootCert {
                    file: f.clone(),
                    why: e.to_string(),
                }),
            None => Ok(None),
        }
    }

    async fn channel(&self, view: &View) -> Result<AuthedChannel, AgentError> {
        let token = self.token()?;
        let anchors = self.anchors(view)?;
        let channel = connect(&self.server, anchors.as_deref(), &self.server_name)
            .await
            .map_err(|e| AgentError::Server(e.to_string()))?;
        let auth = BearerToken::new(&token, self.cluster_id.as_deref()).map_err(|e| {
            AgentError::Token {
                file: self.token_file.clone(),
                why: e.to_string(),
            }
        })?;
        Ok(InterceptedService::new(channel, auth))
    }

    /// A new key, a CSR for it (no SAN: the server certifies the caller's authenticated
    /// identity), and the certificate the server returns, checked before it is used: it
    /// certifies this key, names one SPIFFE ID and verifies to the roots sent with it.
    pub async fn issue(
        &self,
        view: &View,
        ttl: Option<Duration>,
    ) -> Result<(Issued<Arc<Svid>>, Vec<CertDer>), AgentError> {
        let key =
            PrivateKey::generate(KeyType::EcdsaP256).map_err(|e| AgentError::Key(e.to_string()))?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(key.signer())
            .and_then(|r| r.pem())
            .map_err(|e| AgentError::Key(e.to_string()))?;
        let mut client = IstioCertificateServiceClient::new(self.channel(view).await?);
        let call = client.create_certificate(IstioCertificateRequest {
            csr,
            validity_duration: ttl.map_or(0, |t| t.as_secs() as i64),
            metadata: None,
        });
        let resp = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| AgentError::Server(format!("no answer within {CALL_TIMEOUT:?}")))?
            .map_err(|s| AgentError::Refused {
                code: s.code(),
                message: s.message().to_owned(),
            })?
            .into_inner();
        self.check_issued(key, resp.cert_chain)
    }

    fn check_issued(
        &self,
        key: PrivateKey,
        cert_chain: Vec<String>,
    ) -> Result<(Issued<Arc<Svid>>, Vec<CertDer>), AgentError> {
        let bad = |why: String| AgentError::BadResponse(why);
        let Some((roots, chain)) = cert_chain.split_last().filter(|(_, c)| !c.is_empty()) else {
            return Err(bad(
                "the CSR API returned fewer than two cert_chain elements (the leaf, then the roots)"
                    .into(),
            ));
        };
        let chain = cert::certs_from_pem(chain.concat().as_bytes(), "cert_chain")
            .map_err(|e| bad(e.to_string()))?;
        let roots =
            cert::certs_from_pem(roots.as_bytes(), "roots").map_err(|e| bad(e.to_string()))?;
        let leaf = cert::parse(&chain[0], "leaf").map_err(|e| bad(e.to_string()))?;
        if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad(
                "the certificate is not for the key this agent made".into()
            ));
        }
        let spiffe_id = crate::tls::peer_spiffe_id(&chain[0]).map_err(|e| bad(e.to_string()))?;
        let not_before = leaf.validity().not_before.to_datetime();
        let not_after = leaf.validity().not_after.to_datetime();
        let serial = leaf.raw_serial_as_string().replace(':', "");
        drop(leaf);
        let anchor = verifies_to(&chain, &roots, self.clock.now()).ok_or_else(|| {
            bad("the certificate does not verify to the roots returned with it".into())
        })?;
        let svid = Arc::new(Svid {
            spiffe_id,
            chain,
            key,
            serial,
            not_before,
            not_after,
            anchor: anchor.clone(),
        });
        Ok((
            Issued {
                value: svid,
                signer_id: anchor,
                not_after,
            },
            roots,
        ))
    }

    /// Follows the server's `ROOTCA` and `ALL` until `stop` fires: every push replaces the
    /// agent's trust at once. A broken stream is reopened with backoff (the token re-read, the
    /// server verified with the latest bundle).
    pub async fn follow_trust(
        self: Arc<Self>,
        view: Arc<watch::Sender<View>>,
        metrics: Arc<AgentMetrics>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            let r = tokio::select! {
                r = self.trust_stream(&view, &metrics, &mut backoff) => r,
                _ = stopping(&mut stop) => return,
            };
            if let Err(e) = r {
                metrics.trust_stream_errors.inc();
                tracing::warn!(error = %e, server = %self.server, "trust bundle stream from the server broke; reopening with backoff");
            }
            let wait = backoff.failed();
            tokio::select! {
                _ = crate::backoff::sleep(self.clock.as_ref(), wait) => {}
                _ = stopping(&mut stop) => return,
            }
        }
    }

    async fn trust_stream(
        &self,
        view: &watch::Sender<View>,
        metrics: &AgentMetrics,
        backoff: &mut Backoff,
    ) -> Result<(), AgentError> {
        let current = view.borrow().clone();
        let mut client = SecretDiscoveryServiceClient::new(self.channel(&current).await?);
        let (tx, rx) = mpsc::channel(4);
        let names = vec!["ROOTCA".to_owned(), "ALL".to_owned()];
        let request = |version: String, nonce: String, error: Option<String>| DiscoveryRequest {
            node: Some(Node {
                id: "meshid-agent".into(),
                ..Default::default()
            }),
            resource_names: names.clone(),
            type_url: SECRET_TYPE_URL.into(),
            version_info: version,
            response_nonce: nonce,
            error_detail: error.map(|message| envoy_types::pb::google::rpc::Status {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: Vec::new(),
            }),
            ..Default::default()
        };
        let _ = tx.send(request(String::new(), String::new(), None)).await;
        let mut inbound = client
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .map_err(|s| AgentError::Refused {
                code: s.code(),
                message: s.message().to_owned(),
            })?
            .into_inner();
        let mut acked = String::new();
        loop {
            let resp = inbound
                .message()
                .await
                .map_err(|s| AgentError::Refused {
                    code: s.code(),
                    message: s.message().to_owned(),
                })?
                .ok_or_else(|| AgentError::Server("the server ended the trust stream".into()))?;
            backoff.succeeded();
            let next = match trust_from(&resp) {
                Ok(update) => {
                    apply_trust(view, update, metrics);
                    acked = resp.version_info.clone();
                    request(acked.clone(), resp.nonce, None)
                }
                Err(why) => {
                    tracing::warn!(error = %why, "trust bundle from the server refused (NACK); keeping the previous one");
                    request(acked.clone(), resp.nonce, Some(why))
                }
            };
            if tx.send(next).await.is_err() {
                return Err(AgentError::Server("the trust stream closed".into()));
            }
        }
    }
}

/// What one SDS response says about trust.
#[derive(Default)]
struct TrustUpdate {
    rootca: Option<(String, Option<String>)>,
    domains: Option<std::collections::BTreeMap<TrustDomain, Vec<CertDer>>>,
}

fn inline_bytes(ds: &Option<DataSource>) -> Vec<u8> {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b.clone(),
        Some(Specifier::InlineString(s)) => s.clone().into_bytes(),
        _ => Vec::new(),
    }
}

/// Decodes `ROOTCA` (trusted CA and CRL) and `ALL` (Envoy's SPIFFE validator: roots per trust
/// domain); anything malformed refuses the whole response (a NACK), so a bad push never
/// replaces good trust.
fn trust_from(resp: &DiscoveryResponse) -> Result<TrustUpdate, String> {
    let mut update = TrustUpdate::default();
    for any in &resp.resources {
        let s = Secret::decode(any.value.as_slice()).map_err(|e| format!("a Secret: {e}"))?;
        let Some(secret::Type::ValidationContext(ctx)) = &s.r#type else {
            return Err(format!("{}: not a validation context", s.name));
        };
        match s.name.as_str() {
            "ROOTCA" => {
                let pem = String::from_utf8(inline_bytes(&ctx.trusted_ca))
                    .map_err(|_| "ROOTCA: trusted_ca is not PEM text".to_owned())?;
                cert::certs_from_pem(pem.as_bytes(), "ROOTCA").map_err(|e| e.to_string())?;
                let crl = Some(inline_bytes(&ctx.crl))
                    .filter(|c| !c.is_empty())
                    .map(|c| String::from_utf8_lossy(&c).into_owned());
                update.rootca = Some((pem, crl));
            }
            "ALL" => {
                let config = ctx
                    .custom_validator_config
                    .as_ref()
                    .and_then(|c| c.typed_config.as_ref())
                    .ok_or("ALL: no SPIFFE validator config")?;
                let spiffe = SpiffeCertValidatorConfig::decode(config.value.as_slice())
                    .map_err(|e| format!("ALL: {e}"))?;
                let mut domains = std::collections::BTreeMap::new();
                for td in &spiffe.trust_domains {
                    let name = TrustDomain::new(&td.name)
                        .map_err(|e| format!("ALL: trust domain {:?}: {e}", td.name))?;
                    let roots = cert::certs_from_pem(&inline_bytes(&td.trust_bundle), &td.name)
                        .map_err(|e| format!("ALL: {e}"))?;
                    domains.insert(name, roots);
                }
                update.domains = Some(domains);
            }
            other => return Err(format!("{other}: not asked for")),
        }
    }
    Ok(update)
}

fn apply_trust(view: &watch::Sender<View>, update: TrustUpdate, metrics: &AgentMetrics) {
    view.send_if_modified(|v| {
        let mut next = (*v.trust).clone();
        if let Some((pem, crl)) = update.rootca {
            next.rootca_pem = pem;
            next.crl_pem = crl;
        }
        if let Some(domains) = update.domains {
            next.domains = domains;
        }
        if next.same_content(&v.trust) && v.trust.source == TrustSource::Sds {
            return false;
        }
        next.source = TrustSource::Sds;
        next.seq += 1;
        tracing::info!(
            seq = next.seq,
            trust_domains = next.domains.len(),
            "trust bundle updated from the server"
        );
        metrics.bundle_updates.inc();
        v.trust = Arc::new(next);
        true
    });
}
