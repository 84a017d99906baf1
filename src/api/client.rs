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
    #[error("connecting to {server}: {reason}: the server's certificate does not verify against the CA file given (--ca-file, --root-cert): the file does not hold the root the server signs with now. Take its current bundle: `meshid bundle export --state-dir DIR --format pem` on the CA, the istio-ca-root-cert ConfigMap in a cluster, or the ROOTCA of `meshid sds get` through a CA file that still verifies; after a root rotation use the bundle that holds the new root")]
    UntrustedServer { server: String, reason: String },
    #[error("connecting to {server}: {reason}: the server's certificate does not name {name:?}; give the name it carries with --server-name (meshid's default certificate names meshid.istio-system.svc and localhost)")]
    WrongName {
        server: String,
        name: String,
        reason: String,
    },
}

/// An error and every cause under it, each once (tonic's transport error says only
/// "transport error"; what went wrong is in its sources).
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !text.is_empty() && !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cur = err.source();
    }
    out
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
    let connect_failed = |e: tonic::transport::Error| {
        let reason = chain_text(&e);
        let server = server.to_owned();
        if reason.contains("UnknownIssuer") || reason.contains("BadSignature") {
            ClientError::UntrustedServer { server, reason }
        } else if reason.contains("NotValidForName") || reason.contains("not valid for name") {
            ClientError::WrongName {
                server,
                name: server_name.to_owned(),
                reason,
            }
        } else {
            ClientError::Connect { server, reason }
        }
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
