//! SDS over gRPC with small per-call codec buffers.
//!
//! tonic's generated servers give every call an 8 KiB encode and an 8 KiB decode buffer
//! (`tonic::codec::DEFAULT_CODEC_BUFFER_SIZE`). An SDS stream lives as long as its proxy, so on a
//! mesh of 10,000 proxies those two buffers alone would hold 160 MiB. This server routes the
//! same three methods as `SecretDiscoveryServiceServer` (same paths, same messages, same
//! decode limit) to [`SdsService`], with buffers that start at 1 KiB and grow only as far as a
//! message needs.

use std::{
    convert::Infallible,
    marker::PhantomData,
    task::{Context, Poll},
};

use envoy_types::pb::envoy::service::{
    discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest},
    secret::v3::secret_discovery_service_server::{
        SecretDiscoveryService, SecretDiscoveryServiceServer,
    },
};
use tonic::{
    body::Body,
    codec::{BufferSettings, Codec},
    codegen::{http, Body as HttpBody, BoxFuture, StdError},
    server::{Grpc, NamedService},
    Request, Status, Streaming,
};
use tonic_prost::{ProstDecoder, ProstEncoder};

use super::SdsService;

/// Where a call's buffers start; they grow to the largest message the call carries.
const BUFFER_START: usize = 1024;
/// How much a call encodes before it yields to the runtime (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Protobuf with small starting buffers.
struct SmallCodec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for SmallCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<E, D> Codec for SmallCodec<E, D>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = ProstEncoder<E>;
    type Decoder = ProstDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_START, YIELD_THRESHOLD)
}

/// `envoy.service.secret.v3.SecretDiscoveryService` over [`SdsService`].
#[derive(Clone)]
pub struct SdsServer {
    sds: SdsService,
    max_decoding: usize,
}

impl SdsServer {
    /// Refuses request messages larger than `max_decoding` bytes (RESOURCE_EXHAUSTED).
    pub fn new(sds: SdsService, max_decoding: usize) -> Self {
        Self { sds, max_decoding }
    }
}

impl NamedService for SdsServer {
    // The generated server's name, so both route the same service.
    const NAME: &'static str = <SecretDiscoveryServiceServer<SdsService> as NamedService>::NAME;
}

fn grpc<E, D>(max_decoding: usize) -> Grpc<SmallCodec<E, D>>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    Grpc::new(SmallCodec::default()).apply_max_message_size_config(Some(max_decoding), None)
}

impl<B> tower::Service<http::Request<B>> for SdsServer
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (sds, max) = (self.sds.clone(), self.max_decoding);
        match req.uri().path() {
            "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets" => {
                Box::pin(async move {
                    let method =
                        tower::service_fn(move |r: Request<Streaming<DiscoveryRequest>>| {
                            let sds = sds.clone();
                            async move { sds.stream_secrets(r).await }
                        });
                    Ok(grpc(max).streaming(method, req).await)
                })
            }
            "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets" => {
                Box::pin(async move {
                    let method =
                        tower::service_fn(move |r: Request<Streaming<DeltaDiscoveryRequest>>| {
                            let sds = sds.clone();
                            async move { sds.delta_secrets(r).await }
                        });
                    Ok(grpc(max).streaming(method, req).await)
                })
            }
            "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets" => {
                Box::pin(async move {
                    let method = tower::service_fn(move |r: Request<DiscoveryRequest>| {
                        let sds = sds.clone();
                        async move { sds.fetch_secrets(r).await }
                    });
                    Ok(grpc(max).unary(method, req).await)
                })
            }
            other => {
                let why = format!(
                    "{other} is not a method of SDS here; it serves StreamSecrets, DeltaSecrets and FetchSecrets"
                );
                Box::pin(async move { Ok(Status::unimplemented(why).into_http()) })
            }
        }
    }
}
