//! Clients of a running server: `meshid cert request` (Istio CSR API) and `meshid sds get`
//! (SDS FetchSecrets), so a certificate can be fetched without a proxy.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context};
use clap::Args;
use envoy_types::pb::envoy::{
    config::core::v3::data_source::Specifier,
    extensions::transport_sockets::tls::v3::{secret, Secret},
    service::{
        discovery::v3::DiscoveryRequest,
        secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
    },
};
use prost::Message;

use crate::{
    api::{
        client::{connect, AuthedChannel, BearerToken},
        istio::{
            istio_certificate_service_client::IstioCertificateServiceClient,
            IstioCertificateRequest,
        },
        SECRET_TYPE_URL,
    },
    ca::{cert, KeyType, PrivateKey},
    state::write_file_atomic,
};

/// How to reach and authenticate to the server.
#[derive(Debug, Args)]
pub(super) struct ServerConn {
    /// https://host:port (TLS) or unix:/path/to/socket.
    #[arg(long, default_value = "https://localhost:15012")]
    server: String,
    /// Root certificate(s) to verify the server with (TLS only).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// DNS name the server's certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// The service-account token, or - for standard input.
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the token (e.g. a projected token path).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The cluster whose tokens authenticate the caller (Istio's ClusterID).
    #[arg(long)]
    cluster_id: Option<String>,
}

impl ServerConn {
    async fn channel(&self) -> anyhow::Result<AuthedChannel> {
        let token =
            match (&self.token, &self.token_file) {
                (Some(t), _) if t == "-" => std::io::read_to_string(std::io::stdin())
                    .context("reading the token from stdin")?,
                (Some(t), _) => t.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?,
                (None, None) => bail!("give --token or --token-file"),
            };
        let ca = match &self.ca_file {
            Some(f) => Some(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?),
            None => None,
        };
        let channel = connect(&self.server, ca.as_deref(), &self.server_name).await?;
        let auth = BearerToken::new(&token, self.cluster_id.as_deref())?;
        Ok(tonic::service::interceptor::InterceptedService::new(
            channel, auth,
        ))
    }
}

#[derive(Debug, Args)]
pub(super) struct RequestArgs {
    #[command(flatten)]
    conn: ServerConn,
    /// Requested lifetime (0: the server's default).
    #[arg(long, value_parser = super::duration_arg, default_value = "0")]
    ttl: std::time::Duration,
    /// Directory to write cert-chain.pem, key.pem (0600) and root-cert.pem to.
    #[arg(long)]
    out_dir: PathBuf,
}

impl RequestArgs {
    /// Generates a key here, sends only a CSR, and writes what comes back.
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let key = PrivateKey::generate(KeyType::EcdsaP256)?;
            let mut params = rcgen::CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            let csr = params.serialize_request(&key)?.pem()?;
            let mut client = IstioCertificateServiceClient::new(self.conn.channel().await?);
            let resp = client
                .create_certificate(IstioCertificateRequest {
                    csr,
                    validity_duration: self.ttl.as_secs() as i64,
                    metadata: None,
                })
                .await
                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            let Some((roots, chain)) = resp.cert_chain.split_last() else {
                bail!("the server returned an empty chain")
            };
            std::fs::create_dir_all(&self.out_dir)?;
            write_file_atomic(
                &self.out_dir.join("key.pem"),
                key.secret_pkcs8_pem().as_bytes(),
                0o600,
            )?;
            write_file_atomic(
                &self.out_dir.join("cert-chain.pem"),
                chain.concat().as_bytes(),
                0o644,
            )?;
            write_file_atomic(&self.out_dir.join("root-cert.pem"), roots.as_bytes(), 0o644)?;
            let leaf = cert::certs_from_pem(chain[0].as_bytes(), "leaf")?;
            let id = crate::tls::peer_spiffe_id(&leaf[0])?;
            println!(
                "received {id} ({} certificate(s) + roots) into {}",
                chain.len(),
                self.out_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        })
    }
}

#[derive(Debug, Args)]
pub(super) struct SdsGetArgs {
    #[command(flatten)]
    conn: ServerConn,
    /// Secret to fetch: default, ROOTCA, ALL or spiffe://<td> (repeatable).
    #[arg(long = "name", default_values = ["default", "ROOTCA"])]
    names: Vec<String>,
    /// Write the secrets here: cert-chain.pem + key.pem for default, <name>.pem for roots.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

fn inline(ds: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> Vec<u8> {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b.clone(),
        Some(Specifier::InlineString(s)) => s.clone().into_bytes(),
        _ => Vec::new(),
    }
}

impl SdsGetArgs {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut client = SecretDiscoveryServiceClient::new(self.conn.channel().await?);
            let req = DiscoveryRequest {
                resource_names: self.names.clone(),
                type_url: SECRET_TYPE_URL.into(),
                ..Default::default()
            };
            let resp = client
                .fetch_secrets(req)
                .await
                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            println!("version {}", resp.version_info);
            for any in &resp.resources {
                let s = Secret::decode(any.value.as_slice())?;
                self.show(&s)?;
            }
            Ok(ExitCode::SUCCESS)
        })
    }

    fn show(&self, s: &Secret) -> anyhow::Result<()> {
        match &s.r#type {
            Some(secret::Type::TlsCertificate(t)) => {
                let chain = inline(&t.certificate_chain);
                let leaf = cert::certs_from_pem(&chain, "certificate_chain")?;
                let id = crate::tls::peer_spiffe_id(&leaf[0])?;
                println!(
                    "{}: certificate for {id} ({} in chain, private key included)",
                    s.name,
                    leaf.len()
                );
                if let Some(dir) = &self.out_dir {
                    std::fs::create_dir_all(dir)?;
                    write_file_atomic(&dir.join("key.pem"), &inline(&t.private_key), 0o600)?;
                    write_file_atomic(&dir.join("cert-chain.pem"), &chain, 0o644)?;
                }
            }
            Some(secret::Type::ValidationContext(v)) => {
                let roots = inline(&v.trusted_ca);
                match &v.custom_validator_config {
                    Some(ext) => println!("{}: validation context with {}", s.name, ext.name),
                    None => println!(
                        "{}: validation context with {} root(s)",
                        s.name,
                        cert::certs_from_pem(&roots, &s.name)
                            .map(|c| c.len())
                            .unwrap_or(0)
                    ),
                }
                if let (Some(dir), false) = (&self.out_dir, roots.is_empty()) {
                    std::fs::create_dir_all(dir)?;
                    let file = format!(
                        "{}.pem",
                        s.name.replace("spiffe://", "spiffe-").replace('/', "_")
                    );
                    write_file_atomic(&dir.join(file), &roots, 0o644)?;
                }
            }
            other => println!("{}: {other:?}", s.name),
        }
        Ok(())
    }
}
