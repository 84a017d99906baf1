//! The gRPC services on their listeners: SDS, the Istio CSR API and EDS, with their limits.

use std::time::Duration;

use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_server::EndpointDiscoveryServiceServer;
use tokio::sync::watch;

use crate::{
    api::{
        gate::Gate, istio::istio_certificate_service_server::IstioCertificateServiceServer,
        Authenticator, CsrService, EdsService, SdsServer, SdsService,
    },
    shutdown::stopping,
};

/// Serves gRPC on `incoming` until `stop` fires.
pub(super) async fn serve<I, IO, IE>(
    routes: GrpcRoutes,
    incoming: I,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
) where
    I: futures::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Err(e) = routes
        .serve_with_incoming_shutdown(incoming, async move { stopping(&mut stop).await })
        .await
    {
        tracing::error!(error = %e, listener = what, "gRPC server failed");
    }
}

/// The gRPC router, with the deadline layer around every call.
pub(super) type GrpcRoutes = tonic::transport::server::Router<
    tower::layer::util::Stack<crate::api::deadline::DeadlineLayer, tower::layer::util::Identity>,
>;

/// The gRPC services with their limits: streams per connection, a deadline on unary calls
/// answered DEADLINE_EXCEEDED (a stream's covers only its opening), per-method decode limits,
/// and the CSR API authenticated on headers before its body is decoded.
fn grpc_router(
    sds: &SdsService,
    csr: &CsrService,
    eds: Option<&EdsService>,
    auth: &Authenticator,
    limits: &crate::api::config::Limits,
) -> GrpcRoutes {
    let xds_max = limits.xds_max_request_bytes;
    let csr_server = IstioCertificateServiceServer::new(csr.clone())
        .max_decoding_message_size(limits.csr_max_request_bytes);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(limits.max_concurrent_streams_per_connection))
        .layer(crate::api::deadline::DeadlineLayer::new(
            limits.unary_timeout,
        ))
        .add_service(SdsServer::new(sds.clone(), xds_max))
        .add_service(Gate::new(csr_server, auth.clone()))
        .add_optional_service(eds.map(|e| {
            EndpointDiscoveryServiceServer::new(e.clone()).max_decoding_message_size(xds_max)
        }))
}

/// The gRPC services every listener serves.
pub(super) struct Services {
    pub(super) sds: SdsService,
    pub(super) csr: CsrService,
    pub(super) eds: Option<EdsService>,
    pub(super) auth: Authenticator,
}

impl Services {
    /// The routes for one listener, with `limits`.
    pub(super) fn router(&self, limits: &crate::api::config::Limits) -> GrpcRoutes {
        grpc_router(&self.sds, &self.csr, self.eds.as_ref(), &self.auth, limits)
    }
}
