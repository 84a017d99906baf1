//! Client side of meshid's gRPC API, for the CLI and tools: a channel over TLS (verifying the
//! server against a root file and a DNS name) or over a Unix socket, with the bearer token.

use tonic::{
    metadata::MetadataValue,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri},
    Request, Status,
};

/// Why a client could not be set up or connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the token has characters not allowed in a header")]
    TokenNotAHeader,
    #[error("cluster id {0:?} is not a valid header value")]
    ClusterNotAHeader(String),
    #[error("a TLS server needs --ca-file (the mesh root, e.g. root-cert.pem)")]
    NoCaFile,
    #[error("server {server:?}: {reason}")]
    BadAddress { server: String, reason: String },
    #[error("connecting to {server}: {reason}")]
    Connect { server: String, reason: String },
}

/// Adds `authorization: Bearer <token>` (and `ClusterID`) to every call.
#[derive(Clone)]
pub struct BearerToken {
    value: MetadataValue<tonic::metadata::Ascii>,
    cluster: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl BearerToken {
    pub fn new(token: &str, cluster: Option<&str>) -> Result<Self, ClientError> {
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| ClientError::TokenNotAHeader)?;
        let cluster = cluster
            .map(|c| {
                c.parse()
                    .map_err(|_| ClientError::ClusterNotAHeader(c.to_owned()))
            })
            .transpose()?;
        Ok(Self { value, cluster })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert("authorization", self.value.clone());
        if let Some(c) = &self.cluster {
            req.metadata_mut()
                .insert(super::auth::CLUSTER_ID_KEY, c.clone());
        }
        Ok(req)
    }
}

/// A channel with the bearer token attached.
pub type AuthedChannel = InterceptedService<Channel, BearerToken>;

/// Connects to `server`: `https://host:port` (TLS, verified against `ca_pem` for `server_name`)
/// or `unix:/path/to/socket`.
pub async fn connect(
    server: &str,
    ca_pem: Option<&[u8]>,
    server_name: &str,
) -> Result<Channel, ClientError> {
    let bad_address = |e: tonic::transport::Error| ClientError::BadAddress {
        server: server.to_owned(),
        reason: e.to_string(),
    };
    let connect_failed = |e: tonic::transport::Error| ClientError::Connect {
        server: server.to_owned(),
        reason: format!("{e:#}"),
    };
    if let Some(path) = server.strip_prefix("unix:") {
        let path = path.to_owned();
        return Endpoint::try_from("http://[::]:50051")
            .map_err(bad_address)?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(connect_failed);
    }
    let ca = ca_pem.ok_or(ClientError::NoCaFile)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(server_name);
    Endpoint::from_shared(server.to_owned())
        .map_err(bad_address)?
        .tls_config(tls)
        .map_err(bad_address)?
        .connect()
        .await
        .map_err(connect_failed)
}
