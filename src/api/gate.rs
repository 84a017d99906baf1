//! Authentication on headers, before the request body is decoded: a unary call's message is
//! read only once its caller is known, so an unauthenticated caller cannot make the server
//! buffer and decode a large body. The identity rides in the request's extensions.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{
    body::Body,
    codegen::http,
    metadata::MetadataMap,
    server::NamedService,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::Service;

use super::Authenticator;
use crate::identity::Identity;

/// The caller proven by the gate, in the request's extensions.
#[derive(Clone, Debug)]
pub struct GateIdentity(pub Identity);

/// Wraps a gRPC service so every call is authenticated from its headers first.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    auth: Authenticator,
}

impl<S> Gate<S> {
    pub fn new(inner: S, auth: Authenticator) -> Self {
        Self { inner, auth }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

/// What authentication reads of a request (its bearer token, `ClusterID` and connection
/// info) as a body-less tonic request; the other headers are not copied.
fn head_of(req: &http::Request<Body>) -> tonic::Request<()> {
    let mut head = tonic::Request::new(());
    let mut headers = http::HeaderMap::with_capacity(2);
    for name in ["authorization", super::auth::CLUSTER_ID_KEY] {
        for v in req.headers().get_all(name) {
            headers.append(http::HeaderName::from_static(name), v.clone());
        }
    }
    *head.metadata_mut() = MetadataMap::from_headers(headers);
    if let Some(ci) = req.extensions().get::<TcpConnectInfo>() {
        head.extensions_mut().insert(ci.clone());
    }
    if let Some(ci) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
        head.extensions_mut().insert(ci.clone());
    }
    head
}

/// A request message above the decoding limit is RESOURCE_EXHAUSTED, as grpc-go answers it
/// (`recvAndDecompress`: "received message larger than max") and as meshid's xDS streams do;
/// tonic's decoder says OUT_OF_RANGE. The message names the key that sets the limit.
fn too_large_is_resource_exhausted(resp: http::Response<Body>) -> http::Response<Body> {
    match tonic::Status::from_header_map(resp.headers()) {
        Some(s)
            if s.code() == tonic::Code::OutOfRange
                && s.message().contains("message length too large") =>
        {
            tonic::Status::resource_exhausted(format!(
                "{}; the server's limit is limits.csr_max_request_bytes",
                s.message()
            ))
            .into_http()
        }
        _ => resp,
    }
}

impl<S> Service<http::Request<Body>> for Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The ready service goes with this call; a fresh clone stays for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let head = head_of(&req);
            match auth.authenticate(&head).await {
                Ok(identity) => {
                    req.extensions_mut().insert(GateIdentity(identity));
                    inner.call(req).await.map(too_large_is_resource_exhausted)
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}
