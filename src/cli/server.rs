//! `meshid server`: the CA service proxies and istio-agents talk to.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::Args;

use crate::{
    clock::SystemClock,
    config::{self, Config},
    identity::dev_issuer::DevIssuer,
    telemetry::{init_logging, LogFormat},
};

/// Flags override the config file; without `--config`, flags alone describe the server.
#[derive(Debug, Args)]
pub(super) struct ServerArgs {
    /// TOML config file (see deploy/meshid.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory of the CA state (overrides state_dir).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where the CA state is: a directory, or kube://NAMESPACE/NAME for a Kubernetes Secret
    /// (overrides state; the directory then keeps only the server's own files).
    #[arg(long, value_name = "LOCATION")]
    state: Option<crate::state::StateLocation>,
    /// The kubeconfig for a kube:// state (overrides state_kubeconfig; default in-cluster or KUBECONFIG).
    #[arg(long, value_name = "FILE")]
    state_kubeconfig: Option<PathBuf>,
    /// gRPC over TLS address (overrides listen.grpc; default 0.0.0.0:15012).
    #[arg(long, value_name = "ADDR")]
    grpc_listen: Option<SocketAddr>,
    /// HTTP address for /metrics, /healthz, /readyz (overrides listen.http; default 0.0.0.0:15014).
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,
    /// Also serve gRPC on this Unix socket (overrides listen.unix).
    #[arg(long, value_name = "PATH")]
    unix_socket: Option<PathBuf>,
    /// DNS name for meshid's serving certificate (repeatable; overrides server_identity.dns_names).
    #[arg(long = "dns-name", value_name = "NAME")]
    dns_names: Vec<String>,
    /// Accept tokens of a `meshid dev issuer` (replaces the clusters with one named "Kubernetes", the ClusterID stock Istio sidecars send).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["jwks", "kubeconfig"])]
    dev_issuer_dir: Option<PathBuf>,
    /// Accept tokens verified against this JWKS file (with --issuer; replaces the clusters).
    #[arg(
        long,
        value_name = "FILE",
        requires = "issuer",
        conflicts_with = "kubeconfig"
    )]
    jwks: Option<PathBuf>,
    /// The `iss` of tokens, with --jwks.
    #[arg(long)]
    issuer: Option<String>,
    /// Accept tokens by TokenReview through this kubeconfig (replaces the clusters).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Serve EDS for auto mTLS from this snapshot file (replaces the discovery source).
    #[arg(long, value_name = "FILE", conflicts_with = "discovery_kubeconfig")]
    discovery_snapshot: Option<PathBuf>,
    /// Serve EDS for auto mTLS from the cluster of this kubeconfig (replaces the discovery source).
    #[arg(long, value_name = "FILE")]
    discovery_kubeconfig: Option<PathBuf>,
    /// Log format (overrides logging.format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Log level or filter, e.g. info or meshid=debug (overrides logging.level; RUST_LOG wins).
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

impl ServerArgs {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        let cfg = self.into_config()?;
        init_logging(cfg.logging.format, &cfg.logging.level);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let running = crate::server::start(cfg, Arc::new(SystemClock)).await?;
            // Handlers first: a SIGTERM right after the address line must drain, not kill.
            let signal = shutdown_signal()?;
            let mut lines = format!(
                "meshid server: gRPC (TLS) on {}, HTTP on {}\n",
                running.grpc_addr, running.http_addr
            );
            if let Some(p) = &running.unix_path {
                lines += &format!("meshid server: gRPC on unix:{}\n", p.display());
            }
            if let Some(a) = running.bundle_addr {
                lines += &format!("meshid server: SPIFFE bundle endpoint (HTTPS) on {a}\n");
            }
            say(&lines);
            let signal = signal.await?;
            say(&format!(
                "meshid server: {signal} received; draining and shutting down\n"
            ));
            running.shutdown().await;
            Ok(ExitCode::SUCCESS)
        })
    }

    /// The configuration: `--config`'s file (or defaults and `--state-dir`), overridden by the
    /// flags, with the cluster the token flags describe; checked as a whole.
    fn into_config(self) -> anyhow::Result<Config> {
        let mut cfg = self.base_config()?;
        if let Some(c) = self.flag_cluster()? {
            cfg.clusters = vec![c];
        }
        self.apply_overrides(&mut cfg);
        cfg.validate().map_err(|errs| {
            anyhow::anyhow!("configuration is invalid:\n  - {}", errs.join("\n  - "))
        })?;
        Ok(cfg)
    }

    /// `--config`'s file, or the defaults (which need `--state-dir`).
    fn base_config(&self) -> anyhow::Result<Config> {
        Ok(match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                parse_config(&text).map_err(|errs| {
                    anyhow::anyhow!("{}:\n  - {}", path.display(), errs.join("\n  - "))
                })?
            }
            None => Config {
                state_dir: match (&self.state_dir, &self.state) {
                    (Some(d), _) => d.clone(),
                    (None, Some(crate::state::StateLocation::Dir(d))) => d.clone(),
                    (None, Some(secret)) => std::env::temp_dir().join(format!(
                        "meshid-{}",
                        secret.to_string().replace(['/', ':'], "_")
                    )),
                    (None, None) => {
                        anyhow::bail!("--state (or --state-dir) is required without --config")
                    }
                },
                state: None,
                state_kubeconfig: None,
                listen: Default::default(),
                server_identity: Default::default(),
                issuance: Default::default(),
                rotation: Default::default(),
                logging: Default::default(),
                state_poll_interval: std::time::Duration::from_secs(1),
                clusters: Vec::new(),
                discovery: None,
                limits: Default::default(),
                xds: Default::default(),
                auto_rotation: Default::default(),
                root_cert_configmap: Default::default(),
                federation: Default::default(),
                leader_election: Default::default(),
                csr_san_policy: Default::default(),
                trusted_node_accounts: crate::config::default_trusted_node_accounts(),
            },
        })
    }

    /// The flags that override single settings.
    fn apply_overrides(self, cfg: &mut Config) {
        if let Some(d) = self.state_dir {
            cfg.state_dir = d;
        }
        match self.state {
            Some(crate::state::StateLocation::Dir(d)) => {
                cfg.state_dir = d;
                cfg.state = None;
            }
            Some(secret) => cfg.state = Some(secret),
            None => {}
        }
        if self.state_kubeconfig.is_some() {
            cfg.state_kubeconfig = self.state_kubeconfig;
        }
        if let Some(a) = self.grpc_listen {
            cfg.listen.grpc = a;
        }
        if let Some(a) = self.http_listen {
            cfg.listen.http = a;
        }
        if self.unix_socket.is_some() {
            cfg.listen.unix = self.unix_socket;
        }
        if !self.dns_names.is_empty() {
            cfg.server_identity.dns_names = self.dns_names;
        }
        if let Some(f) = self.log_format {
            cfg.logging.format = match f {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            };
        }
        if self.discovery_snapshot.is_some() || self.discovery_kubeconfig.is_some() {
            let d = cfg.discovery.get_or_insert_with(|| config::Discovery {
                root_namespace: "istio-system".into(),
                domain: "cluster.local".into(),
                auto_mtls: true,
                ..Default::default()
            });
            d.snapshot = self.discovery_snapshot;
            d.kubeconfig = self.discovery_kubeconfig;
            d.in_cluster = false;
        }
        if let Some(l) = self.log_level {
            cfg.logging.level = l;
        }
    }

    /// The one cluster `--dev-issuer-dir`, `--jwks` or `--kubeconfig` describes, if any.
    fn flag_cluster(&self) -> anyhow::Result<Option<config::Cluster>> {
        let cluster = |tokenreview, jwks| config::Cluster {
            name: crate::identity::DEFAULT_CLUSTER.into(),
            aliases: Vec::new(),
            default: true,
            audiences: vec![crate::identity::DEFAULT_AUDIENCE.into()],
            allow_legacy_tokens: false,
            cache_ttl: std::time::Duration::from_secs(60),
            cache_max_entries: 100_000,
            negative_cache_ttl: std::time::Duration::from_secs(5),
            negative_cache_max_entries: 10_000,
            leeway: std::time::Duration::from_secs(60),
            tokenreview,
            jwks,
        };
        let cluster = if let Some(dir) = &self.dev_issuer_dir {
            let issuer = DevIssuer::load(dir)
                .with_context(|| format!("--dev-issuer-dir {}", dir.display()))?;
            let jwks = config::Jwks {
                issuer: issuer.issuer().into(),
                additional_issuers: Vec::new(),
                file: Some(DevIssuer::jwks_path(dir)),
                url: None,
                oidc_issuer: None,
                api_server: None,
                ca_file: None,
            };
            cluster(None, Some(jwks))
        } else if let Some(file) = &self.jwks {
            let jwks = config::Jwks {
                issuer: self.issuer.clone().unwrap_or_default(),
                additional_issuers: Vec::new(),
                file: Some(file.clone()),
                url: None,
                oidc_issuer: None,
                api_server: None,
                ca_file: None,
            };
            cluster(None, Some(jwks))
        } else if let Some(kc) = &self.kubeconfig {
            let tr = config::TokenReview {
                kubeconfig: Some(kc.clone()),
                rate: Default::default(),
                timeout: std::time::Duration::from_secs(5),
                issuers: Vec::new(),
                verify_signatures: true,
                mode: Default::default(),
            };
            cluster(Some(tr), None)
        } else {
            return Ok(None);
        };
        Ok(Some(cluster))
    }
}

fn parse_config(text: &str) -> Result<Config, Vec<String>> {
    // Parse only; validation runs once flags are applied.
    toml::from_str(text).map_err(|e| vec![e.to_string().trim().to_owned()])
}

/// Waits for SIGTERM (what Kubernetes sends before SIGKILL) or Ctrl-C (SIGINT); both drain:
/// stop accepting, end streams, exit 0 within the shutdown cap.
/// Installs the SIGTERM and SIGINT handlers now; the future completes on the first signal.
pub(super) fn shutdown_signal(
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<&'static str>>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => Ok("SIGINT"),
            _ = term.recv() => Ok("SIGTERM"),
        }
    })
}

/// Writes to stdout, ignoring a reader that went away: a supervisor that read the address line
/// and closed the pipe must not take the server down (`println!` panics on EPIPE).
pub(super) fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}
