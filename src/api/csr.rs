//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: a drop-in CA for istio-agent.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::{
    istio::{
        istio_certificate_service_server::IstioCertificateService, IstioCertificateRequest,
        IstioCertificateResponse,
    },
    status, Authenticator,
};
use crate::{ca::cert, telemetry::Metrics, trust::CaSnapshot};

/// The CSR API.
#[derive(Clone)]
pub struct CsrService {
    auth: Authenticator,
    ca: watch::Receiver<Arc<CaSnapshot>>,
    metrics: Arc<Metrics>,
    proxies: Option<Arc<crate::discovery::ProxyRegistry>>,
}

impl CsrService {
    pub fn new(
        auth: Authenticator,
        ca: watch::Receiver<Arc<CaSnapshot>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            auth,
            ca,
            metrics,
            proxies: None,
        }
    }

    /// Reports each certificate's pod to `registry` (auto mTLS proof by proxy).
    pub fn with_proxy_registry(mut self, registry: Arc<crate::discovery::ProxyRegistry>) -> Self {
        self.proxies = Some(registry);
        self
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CsrService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.metrics.csr_requests.inc();
        // Normally proven by the gate on the headers, before the body was decoded.
        let identity = match request.extensions().get::<super::gate::GateIdentity>() {
            Some(g) => g.0.clone(),
            None => self.auth.authenticate(&request).await?,
        };
        let req = request.into_inner();
        let csr_sha256 =
            cert::hex(ring::digest::digest(&ring::digest::SHA256, req.csr.as_bytes()).as_ref());
        let ttl =
            (req.validity_duration > 0).then(|| Duration::from_secs(req.validity_duration as u64));
        let snapshot = self.ca.borrow().clone();
        let issued = snapshot
            .authority
            .sign_csr(req.csr.as_bytes(), &identity.spiffe_id, ttl)
            .map_err(|e| {
                self.metrics
                    .sign_errors
                    .get_or_create(&Metrics::label("kind", status::ca_kind(&e)))
                    .inc();
                tracing::info!(id = %identity.spiffe_id, csr_sha256, error = %e, "CSR refused");
                status::ca(&e)
            })?;
        self.metrics
            .certs_issued
            .get_or_create(&Metrics::label("api", "csr"))
            .inc();
        tracing::info!(id = %identity.spiffe_id, serial = %issued.serial, csr_sha256, "certificate issued");
        if let Some(p) = &self.proxies {
            p.certificate_issued(&identity);
        }
        // Leaf first, then intermediates, then the root bundle (every trusted root) last.
        let mut cert_chain = vec![cert::to_pem(&issued.leaf)];
        cert_chain.extend(issued.chain.iter().map(|c| cert::to_pem(c)));
        cert_chain.push(snapshot.bundle.own_roots_pem().to_owned());
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}
