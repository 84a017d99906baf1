//! `meshid agent`: the node-local agent (keys made here; SDS and the SPIFFE Workload API on Unix
//! sockets). Runs until SIGTERM or Ctrl-C.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Args;

use crate::{
    agent::{AgentConfig, CallerPolicy},
    clock::SystemClock,
    rotation::RenewPolicy,
    telemetry::{init_logging, LogFormat},
};

#[derive(Debug, Args)]
pub(super) struct AgentArgs {
    /// The meshid server: https://host:port (TLS), or unix:/path/to/socket.
    #[arg(long)]
    server: String,
    /// The mesh root(s) to verify the server with until the agent holds the trust bundle
    /// (istio-agent: the istio-ca-root-cert ConfigMap's root-cert.pem).
    #[arg(long, value_name = "FILE")]
    root_cert: Option<PathBuf>,
    /// The DNS name the server's certificate must carry (default: the host of --server).
    #[arg(long)]
    server_name: Option<String>,
    /// The projected service-account token, re-read on every call (istio-agent:
    /// /var/run/secrets/tokens/istio-token).
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// The cluster whose tokens authenticate the agent (Istio's ClusterID).
    #[arg(long)]
    cluster_id: Option<String>,
    /// Serve Envoy SDS on this Unix socket (istio-agent:
    /// /var/run/secrets/workload-spiffe-uds/socket).
    #[arg(long, value_name = "PATH")]
    sds_socket: PathBuf,
    /// Serve the SPIFFE Workload API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    workload_api_socket: Option<PathBuf>,
    /// A group id that may use the sockets too (mode 0660 instead of 0600).
    #[arg(long, value_name = "GID")]
    socket_group: Option<u32>,
    /// Give the identity over the Workload API only to callers with this uid (repeatable; with
    /// neither --allow-uid nor --allow-gid, to whoever can open the socket).
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// As --allow-uid, for a group id (repeatable).
    #[arg(long = "allow-gid", value_name = "GID")]
    allow_gids: Vec<u32>,
    /// Requested certificate lifetime (default: the server's).
    #[arg(long, value_parser = super::duration_arg)]
    ttl: Option<Duration>,
    /// Also write cert-chain.pem, key.pem (0600) and root-cert.pem here after each renewal
    /// (istio-agent's OUTPUT_CERTS). Without it the key never touches the disk.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long, value_name = "ADDR")]
    http_addr: Option<SocketAddr>,
    /// Log level (or RUST_LOG).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormatArg,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

/// The host of `https://host:port`.
fn host_of(server: &str) -> Option<String> {
    let rest = server.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then(|| host.to_owned())
}

impl AgentArgs {
    fn into_config(self) -> anyhow::Result<AgentConfig> {
        let server_name = match (&self.server_name, self.server.starts_with("unix:")) {
            (Some(n), _) => n.clone(),
            (None, true) => "localhost".into(),
            (None, false) => host_of(&self.server).with_context(|| {
                format!(
                    "--server {:?} is not https://host:port or unix:/path",
                    self.server
                )
            })?,
        };
        if !self.server.starts_with("unix:") && !self.server.starts_with("https://") {
            anyhow::bail!(
                "--server {:?}: give https://host:port (the server's gRPC port, TLS) or unix:/path",
                self.server
            );
        }
        if !self.server.starts_with("unix:") && self.root_cert.is_none() {
            anyhow::bail!(
                "--root-cert is needed to verify a TLS server (the mesh root, e.g. root-cert.pem)"
            );
        }
        Ok(AgentConfig {
            server: self.server,
            server_name,
            root_cert: self.root_cert,
            token_file: self.token_file,
            cluster_id: self.cluster_id,
            sds_socket: self.sds_socket,
            workload_api_socket: self.workload_api_socket,
            socket_group: self.socket_group,
            callers: CallerPolicy {
                allow_uids: self.allow_uids,
                allow_gids: self.allow_gids,
            },
            ttl: self.ttl,
            out_dir: self.out_dir,
            http: self.http_addr,
            renew: RenewPolicy::default(),
            max_connections: 1024,
        })
    }

    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        let format = match self.log_format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        };
        init_logging(format, &self.log_level);
        let cfg = self.into_config()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let (stop_tx, stop) = tokio::sync::watch::channel(false);
            let signal = super::server::shutdown_signal()?;
            let running = crate::agent::start(cfg.clone(), Arc::new(SystemClock), stop).await?;
            let mut lines = format!("meshid agent: SDS on unix:{}\n", cfg.sds_socket.display());
            if let Some(p) = &cfg.workload_api_socket {
                lines += &format!(
                    "meshid agent: SPIFFE Workload API on unix:{}\n",
                    p.display()
                );
            }
            if let Some(a) = running.http {
                lines += &format!("meshid agent: HTTP on {a}\n");
            }
            super::server::say(&lines);
            let signal = signal.await?;
            super::server::say(&format!("meshid agent: {signal} received; shutting down\n"));
            let _ = stop_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), running.join()).await;
            for p in std::iter::once(&cfg.sds_socket).chain(cfg.workload_api_socket.as_ref()) {
                let _ = std::fs::remove_file(p);
            }
            Ok(ExitCode::SUCCESS)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn the_server_name_defaults_to_the_host_of_the_url() {
        assert_eq!(
            host_of("https://meshid.meshid-system.svc:15012").as_deref(),
            Some("meshid.meshid-system.svc")
        );
        assert_eq!(host_of("https://[::1]:15012").as_deref(), Some("::1"));
        assert_eq!(host_of("https://localhost").as_deref(), Some("localhost"));
        assert_eq!(host_of("localhost:15012"), None);
    }
}
