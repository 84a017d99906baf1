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
            outln!(
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
    /// Write the secrets here: cert-chain.pem + key.pem for default, <name>.pem for roots,
    /// ALL-<trust domain>.pem for each trust domain of ALL.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// table (like `istioctl proxy-config secret`) or json (one object per certificate).
    #[arg(long, value_enum, default_value = "table")]
    output: SdsOutput,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SdsOutput {
    Table,
    Json,
}

/// One certificate of a fetched secret (`--output json` prints these).
#[derive(Debug, serde::Serialize)]
struct SecretRow {
    /// The SDS resource name.
    resource: String,
    /// "Cert Chain" (a leaf, with its key) or "CA" (a trusted root).
    #[serde(rename = "type")]
    kind: &'static str,
    /// The leaf's SPIFFE ID; for a root, `null`.
    spiffe_id: Option<String>,
    trust_domain: String,
    serial: String,
    not_before: String,
    not_after: String,
    /// Within its validity now and, for a leaf, verified to the roots fetched with it (when any
    /// were: ask for ROOTCA too).
    valid: bool,
    /// For a leaf: the number of certificates in its chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    chain_length: Option<usize>,
    subject: String,
}

fn inline(ds: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> Vec<u8> {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b.clone(),
        Some(Specifier::InlineString(s)) => s.clone().into_bytes(),
        _ => Vec::new(),
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Writes to stdout; a closed pipe (`| head -1`) ends the output quietly.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
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
            let secrets = resp
                .resources
                .iter()
                .map(|any| Secret::decode(any.value.as_slice()))
                .collect::<Result<Vec<_>, _>>()?;
            for s in &secrets {
                self.write_files(s)?;
            }
            let rows = rows(&secrets, time::OffsetDateTime::now_utc())?;
            match self.output {
                SdsOutput::Json => emit(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "version": resp.version_info,
                        "secrets": rows,
                    }))?
                ))?,
                SdsOutput::Table => emit(&table(&resp.version_info, &rows))?,
            }
            Ok(ExitCode::SUCCESS)
        })
    }

    fn write_files(&self, s: &Secret) -> anyhow::Result<()> {
        let Some(dir) = &self.out_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)?;
        match &s.r#type {
            Some(secret::Type::TlsCertificate(t)) => {
                write_file_atomic(&dir.join("key.pem"), &inline(&t.private_key), 0o600)?;
                write_file_atomic(
                    &dir.join("cert-chain.pem"),
                    &inline(&t.certificate_chain),
                    0o644,
                )?;
            }
            Some(secret::Type::ValidationContext(v)) => {
                let roots = inline(&v.trusted_ca);
                if !roots.is_empty() {
                    write_file_atomic(
                        &dir.join(format!("{}.pem", file_part(&s.name))),
                        &roots,
                        0o644,
                    )?;
                }
                for (td, pem) in spiffe_bundles(v)? {
                    write_file_atomic(
                        &dir.join(format!("{}-{}.pem", file_part(&s.name), file_part(&td))),
                        &pem,
                        0o644,
                    )?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn file_part(name: &str) -> String {
    name.replace("spiffe://", "spiffe-").replace('/', "_")
}

/// The trust domains of a SPIFFE certificate validator (`ALL`), each with its roots (PEM).
fn spiffe_bundles(
    v: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CertificateValidationContext,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let Some(ext) = &v.custom_validator_config else {
        return Ok(Vec::new());
    };
    let Some(cfg) = &ext.typed_config else {
        return Ok(Vec::new());
    };
    let spiffe = envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SpiffeCertValidatorConfig::decode(cfg.value.as_slice())
        .with_context(|| format!("{}: not a SPIFFE certificate validator", ext.name))?;
    Ok(spiffe
        .trust_domains
        .iter()
        .map(|td| (td.name.clone(), inline(&td.trust_bundle)))
        .collect())
}

/// One row per certificate: each secret's leaf, and each root of each bundle.
fn rows(secrets: &[Secret], now: time::OffsetDateTime) -> anyhow::Result<Vec<SecretRow>> {
    // Roots fetched alongside (ROOTCA, ALL, spiffe://<td>): what a leaf is verified against.
    let mut anchors = Vec::new();
    for s in secrets {
        if let Some(secret::Type::ValidationContext(v)) = &s.r#type {
            anchors
                .extend(cert::certs_from_pem(&inline(&v.trusted_ca), &s.name).unwrap_or_default());
            for (td, pem) in spiffe_bundles(v)? {
                anchors.extend(cert::certs_from_pem(&pem, &td).unwrap_or_default());
            }
        }
    }
    let mut out = Vec::new();
    let row = |resource: &str,
               kind,
               der: &cert::CertDer,
               td: Option<&str>|
     -> anyhow::Result<SecretRow> {
        let p = cert::parse(der, resource)?;
        let (nb, na) = (
            p.validity().not_before.to_datetime(),
            p.validity().not_after.to_datetime(),
        );
        let id = (kind == "Cert Chain")
            .then(|| crate::tls::peer_spiffe_id(der).ok())
            .flatten();
        Ok(SecretRow {
            resource: resource.to_owned(),
            kind,
            trust_domain: id
                .as_ref()
                .map(|i| i.trust_domain().to_string())
                .or_else(|| td.map(str::to_owned))
                .unwrap_or_default(),
            spiffe_id: id.map(|i| i.to_string()),
            serial: cert::hex(p.raw_serial()),
            not_before: rfc3339(nb),
            not_after: rfc3339(na),
            valid: nb <= now && now <= na,
            chain_length: None,
            subject: p.subject().to_string(),
        })
    };
    for s in secrets {
        match &s.r#type {
            Some(secret::Type::TlsCertificate(t)) => {
                let chain = cert::certs_from_pem(&inline(&t.certificate_chain), &s.name)?;
                let Some(leaf) = chain.first() else { continue };
                let mut r = row(&s.name, "Cert Chain", leaf, None)?;
                r.chain_length = Some(chain.len());
                if !anchors.is_empty() {
                    r.valid &=
                        crate::ca::chain::verify_leaf(leaf, &chain[1..], &anchors, now).is_ok();
                }
                out.push(r);
            }
            Some(secret::Type::ValidationContext(v)) => {
                let own = cert::certs_from_pem(&inline(&v.trusted_ca), &s.name).unwrap_or_default();
                let td = s.name.strip_prefix("spiffe://");
                for c in &own {
                    out.push(row(&s.name, "CA", c, td)?);
                }
                for (td, pem) in spiffe_bundles(v)? {
                    for c in cert::certs_from_pem(&pem, &td).unwrap_or_default() {
                        out.push(row(&s.name, "CA", &c, Some(&td))?);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The table, in `istioctl proxy-config secret`'s columns plus the SPIFFE ID / trust domain.
fn table(version: &str, rows: &[SecretRow]) -> String {
    let head = [
        "RESOURCE NAME",
        "TYPE",
        "STATUS",
        "VALID CERT",
        "SERIAL NUMBER",
        "NOT AFTER",
        "NOT BEFORE",
        "SPIFFE ID / TRUST DOMAIN",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.resource.clone(),
                r.kind.to_owned(),
                "ACTIVE".to_owned(),
                r.valid.to_string(),
                r.serial.clone(),
                r.not_after.clone(),
                r.not_before.clone(),
                r.spiffe_id
                    .clone()
                    .unwrap_or_else(|| r.trust_domain.clone()),
            ]
        })
        .collect();
    let mut width = head.map(str::len);
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            width[i] = width[i].max(v.len());
        }
    }
    let line = |vals: &[&str]| {
        let mut l = String::new();
        for (i, v) in vals.iter().enumerate() {
            if i + 1 == vals.len() {
                l.push_str(v);
            } else {
                l.push_str(&format!("{v:<w$}  ", w = width[i]));
            }
        }
        l.push('\n');
        l
    };
    let mut out = format!("version {version}\n");
    out.push_str(&line(&head));
    for c in &cells {
        out.push_str(&line(&c.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    out
}
