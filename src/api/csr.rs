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
use crate::{
    ca::{cert, SanCheck},
    config::CsrSanPolicy,
    telemetry::Metrics,
    trust::CaSnapshot,
};

use super::node_auth::{requested_identity, NodeAuthorizer};

/// The CSR API.
#[derive(Clone)]
pub struct CsrService {
    auth: Authenticator,
    ca: watch::Receiver<Arc<CaSnapshot>>,
    metrics: Arc<Metrics>,
    proxies: Option<Arc<crate::discovery::ProxyRegistry>>,
    san_policy: CsrSanPolicy,
    /// Judges `ImpersonatedIdentity` requests (none: every one is refused).
    node_auth: Option<Arc<NodeAuthorizer>>,
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
            san_policy: CsrSanPolicy::default(),
            node_auth: None,
        }
    }

    /// What a caller's own CSR may ask for (`csr_san_policy`).
    pub fn with_san_policy(mut self, policy: CsrSanPolicy) -> Self {
        self.san_policy = policy;
        self
    }

    /// Lets trusted node agents impersonate the pods on their node.
    pub fn with_node_authorizer(mut self, node_auth: Arc<NodeAuthorizer>) -> Self {
        self.node_auth = Some(node_auth);
        self
    }

    /// The identity a request is issued for and how its CSR's SANs are held: the caller's own
    /// under `csr_san_policy`, or the impersonated one (its SANs not read, as istiod) when the
    /// node check allows it. A refusal is `PermissionDenied` with no reason; the reason is
    /// logged and counted.
    fn subject(
        &self,
        caller: &crate::identity::Identity,
        req: &IstioCertificateRequest,
    ) -> Result<(crate::spiffe::SpiffeId, SanCheck, bool), Status> {
        let Some(requested) = requested_identity(req.metadata.as_ref()) else {
            return Ok((caller.spiffe_id.clone(), self.san_policy.san_check(), false));
        };
        let verdict = match &self.node_auth {
            Some(na) => na.authorize(caller, requested),
            None => Err(super::node_auth::Refusal {
                reason: "not_configured",
                detail: "impersonation needs [discovery] (its pod index) and trusted_node_accounts"
                    .into(),
            }),
        };
        let result = match &verdict {
            Ok(_) => "allowed",
            Err(r) => r.reason,
        };
        self.metrics
            .impersonations
            .get_or_create(&Metrics::label("result", result))
            .inc();
        match verdict {
            Ok(id) => {
                tracing::info!(caller = %caller.spiffe_id, impersonated = %id, "node agent impersonation allowed");
                Ok((id, SanCheck::Ignore, true))
            }
            Err(r) => {
                tracing::warn!(caller = %caller.spiffe_id, requested, reason = r.reason, detail = %r.detail, "node agent impersonation refused");
                Err(Status::permission_denied(
                    "request impersonation authorization failure",
                ))
            }
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
        let (subject, sans, impersonated) = self.subject(&identity, &req)?;
        let csr_sha256 =
            cert::hex(ring::digest::digest(&ring::digest::SHA256, req.csr.as_bytes()).as_ref());
        let ttl =
            (req.validity_duration > 0).then(|| Duration::from_secs(req.validity_duration as u64));
        let snapshot = self.ca.borrow().clone();
        let issued = snapshot
            .authority
            .sign_csr_with(req.csr.as_bytes(), &subject, ttl, sans)
            .map_err(|e| {
                self.metrics
                    .sign_errors
                    .get_or_create(&Metrics::label("kind", status::ca_kind(&e)))
                    .inc();
                tracing::info!(id = %subject, caller = %identity.spiffe_id, csr_sha256, error = %e, "CSR refused");
                status::ca(&e)
            })?;
        self.metrics
            .certs_issued
            .get_or_create(&Metrics::label("api", "csr"))
            .inc();
        tracing::info!(id = %subject, caller = %identity.spiffe_id, serial = %issued.serial, csr_sha256, "certificate issued");
        // A node agent's certificate for another pod is no proof of a sidecar in its own pod.
        if let (Some(p), false) = (&self.proxies, impersonated) {
            p.certificate_issued(&identity);
        }
        // Leaf first, then intermediates, then the root bundle (every trusted root) last.
        let mut cert_chain = vec![cert::to_pem(&issued.leaf)];
        cert_chain.extend(issued.chain.iter().map(|c| cert::to_pem(c)));
        cert_chain.push(snapshot.bundle.own_roots_pem().to_owned());
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}
