//! Envoy SDS v3 on the agent's Unix socket: StreamSecrets, DeltaSecrets and FetchSecrets with the
//! server's xDS rules (`api::xds`). Names: `default` (the agent's SVID, its key made here),
//! `ROOTCA`, `ALL`, `spiffe://<td>` (as the server serves them, followed over its SDS), and
//! istio-agent's `file-root:`/`file-cert:` names (`files.rs`). No token is asked for: as
//! istio-agent's, the socket is the boundary (its mode 0600, or 0660 for a configured group).

use std::{collections::BTreeSet, future::Future, pin::Pin, sync::Arc};

use envoy_types::{
    pb::{
        envoy::{
            config::core::v3::{data_source::Specifier, DataSource, TypedExtensionConfig},
            extensions::transport_sockets::tls::v3::{
                secret, spiffe_cert_validator_config::TrustDomain as SpiffeTrustDomain,
                CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate,
            },
            service::{
                discovery::v3::{
                    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
                    DiscoveryResponse,
                },
                secret::v3::secret_discovery_service_server::SecretDiscoveryService,
            },
        },
        google::protobuf::Any,
    },
    util::pack_any,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::{
    files::{is_file_name, FileSecrets},
    view::View,
};
use crate::{
    api::{
        xds::{self, content_version, Out, ResourceSource, XdsMetrics},
        SECRET_TYPE_URL,
    },
    ca::cert,
    spiffe::TrustDomain,
};

const DEFAULT: &str = "default";
const ROOTCA: &str = "ROOTCA";
const ALL: &str = "ALL";

/// The agent's SDS service.
#[derive(Clone)]
pub struct LocalSds {
    view: watch::Receiver<View>,
    metrics: Arc<XdsMetrics>,
    stop: watch::Receiver<bool>,
}

impl LocalSds {
    pub fn new(
        view: watch::Receiver<View>,
        metrics: Arc<XdsMetrics>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            view,
            metrics,
            stop,
        }
    }

    fn source(&self) -> LocalSecrets {
        let mut view = self.view.clone();
        let current = view.borrow_and_update().clone();
        LocalSecrets {
            view,
            current,
            files: FileSecrets::default(),
        }
    }
}

/// One stream's view of the agent's secrets.
struct LocalSecrets {
    view: watch::Receiver<View>,
    current: View,
    files: FileSecrets,
}

fn inline(b: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(b)),
        watched_directory: None,
    })
}

impl LocalSecrets {
    fn trust_domain_of(&self, name: &str) -> Option<TrustDomain> {
        let td = TrustDomain::new(name.strip_prefix("spiffe://")?).ok()?;
        self.current.trust.domains.contains_key(&td).then_some(td)
    }

    fn secret(&self, name: &str) -> Option<Secret> {
        let trust = &self.current.trust;
        let validation =
            |ctx: CertificateValidationContext| Some(secret::Type::ValidationContext(ctx));
        let crl = || trust.crl_pem.clone().and_then(|c| inline(c.into_bytes()));
        let r#type = match name {
            DEFAULT => {
                let svid = self.current.svid.as_ref()?;
                Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(svid.chain_pem().into_bytes()),
                    private_key: inline(svid.key.secret_pkcs8_pem().as_bytes().to_vec()),
                    ..Default::default()
                }))
            }
            ROOTCA if !trust.rootca_pem.is_empty() => validation(CertificateValidationContext {
                trusted_ca: inline(trust.rootca_pem.clone().into_bytes()),
                crl: crl(),
                ..Default::default()
            }),
            ALL if !trust.domains.is_empty() => {
                let trust_domains = trust
                    .domains
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
                    // As the server's ALL: a CRL only while one trust domain is trusted.
                    crl: (trust.domains.len() == 1).then(crl).flatten(),
                    custom_validator_config: Some(TypedExtensionConfig {
                        name: "envoy.tls.cert_validator.spiffe".into(),
                        typed_config: Some(pack_any(config)),
                    }),
                    ..Default::default()
                })
            }
            other if is_file_name(other) => {
                return self.files.get(other).and_then(|r| r.as_ref().ok()).cloned()
            }
            other => {
                let td = self.trust_domain_of(other)?;
                validation(CertificateValidationContext {
                    trusted_ca: inline(
                        cert::to_pem_bundle(trust.roots_of(&td).unwrap_or_default()).into_bytes(),
                    ),
                    ..Default::default()
                })
            }
        };
        r#type.map(|t| Secret {
            name: name.to_owned(),
            r#type: Some(t),
        })
    }
}

impl ResourceSource for LocalSecrets {
    fn type_url(&self) -> &'static str {
        SECRET_TYPE_URL
    }

    fn peer(&self) -> String {
        "local proxy".into()
    }

    fn unknown_reason(&self, name: &str) -> Option<String> {
        if is_file_name(name) {
            return self.files.unavailable(name);
        }
        if self.secret(name).is_some() {
            return None;
        }
        Some(match name {
            DEFAULT => "the agent holds no certificate yet; sent once it does".into(),
            ROOTCA | ALL => "the agent holds no trust bundle yet; sent once it does".into(),
            n if n.starts_with("spiffe://") => "trust domain not trusted now; sent if it becomes trusted".into(),
            _ => "the agent serves \"default\", \"ROOTCA\", \"ALL\", \"spiffe://<trust domain>\", \"file-root:<path>\" and \"file-cert:<cert>~<key>\"".into(),
        })
    }

    fn version(&mut self, name: &str) -> Result<Option<String>, Status> {
        if name == DEFAULT {
            return Ok(self.current.svid.as_ref().map(|s| s.serial.clone()));
        }
        Ok(self.secret(name).map(|s| content_version(&pack_any(s))))
    }

    fn render(&mut self, name: &str) -> Result<Option<Any>, Status> {
        Ok(self.secret(name).map(pack_any))
    }

    fn changed<'a>(
        &'a mut self,
        _subscribed: &'a BTreeSet<String>,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            tokio::select! {
                r = self.view.changed() => {
                    if r.is_err() {
                        return false;
                    }
                    self.current = self.view.borrow_and_update().clone();
                }
                _ = self.files.changed() => {}
            }
            true
        })
    }

    fn label(name: &str) -> String {
        if name.starts_with("spiffe://") {
            "spiffe".into()
        } else if name.starts_with("file-root:") {
            "file-root".into()
        } else if name.starts_with("file-cert:") {
            "file-cert".into()
        } else {
            name.into()
        }
    }

    fn on_subscribe(&mut self, subscribed: &BTreeSet<String>) {
        self.files.sync(subscribed);
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for LocalSds {
    type StreamSecretsStream = Out<DiscoveryResponse>;
    type DeltaSecretsStream = Out<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        Ok(Response::new(xds::spawn_sotw(
            self.source(),
            request.into_inner(),
            self.metrics.clone(),
            self.stop.clone(),
        )))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Ok(Response::new(xds::spawn_delta(
            self.source(),
            request.into_inner(),
            self.metrics.clone(),
            self.stop.clone(),
        )))
    }

    /// Answers the names it holds now; refuses the request naming any it does not.
    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let req = request.into_inner();
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            return Err(Status::invalid_argument(format!(
                "type_url {:?} is not served here; SDS serves {SECRET_TYPE_URL}",
                req.type_url
            )));
        }
        let mut source = self.source();
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        source.on_subscribe(&names);
        let mut resources = Vec::new();
        let mut versions = Vec::new();
        for name in &req.resource_names {
            if let Some(why) = source.unknown_reason(name) {
                return Err(Status::invalid_argument(format!("{name:?}: {why}")));
            }
            versions.push(source.version(name)?.unwrap_or_default());
            resources.extend(source.render(name)?);
        }
        Ok(Response::new(DiscoveryResponse {
            version_info: versions.join("."),
            resources,
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        }))
    }
}
