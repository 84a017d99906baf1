//! `meshid dev ...`: local stand-ins for cluster parts (a service-account token issuer).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::{
    clock::{Clock, SystemClock},
    identity::dev_issuer::{DevIssuer, TokenRequest, DEFAULT_ISSUER},
};

#[derive(Debug, Subcommand)]
pub(super) enum DevCommand {
    /// A local service-account token issuer.
    #[command(subcommand)]
    Issuer(IssuerCommand),
    /// Print a token shaped exactly like a Kubernetes projected service-account token.
    Token(TokenArgs),
}

#[derive(Debug, Subcommand)]
pub(super) enum IssuerCommand {
    /// Create a signing key (ECDSA P-256, or --key to import one), jwks.json and issuer.json in DIR.
    Init(IssuerInitArgs),
}

#[derive(Debug, Args)]
pub(super) struct IssuerInitArgs {
    /// Directory to create the issuer in.
    #[arg(long)]
    dir: PathBuf,
    /// The issuer URL written into tokens' `iss`.
    #[arg(long, default_value = DEFAULT_ISSUER)]
    issuer: String,
    /// Import this PEM signing key (RSA or ECDSA, e.g. a cluster's sa.key) instead of generating one.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(super) struct TokenArgs {
    /// Directory made by `meshid dev issuer init`.
    #[arg(long)]
    issuer_dir: PathBuf,
    #[arg(long)]
    namespace: String,
    #[arg(long)]
    service_account: String,
    /// Audience(s) of the token (repeatable).
    #[arg(long, default_value = "istio-ca")]
    audience: Vec<String>,
    /// Lifetime of the token.
    #[arg(long, value_parser = super::duration_arg, default_value = "1h")]
    ttl: Duration,
    /// Bind the token to a pod (both --pod-name and --pod-uid).
    #[arg(long, requires = "pod_uid")]
    pod_name: Option<String>,
    #[arg(long, requires = "pod_name")]
    pod_uid: Option<String>,
}

impl DevCommand {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Issuer(IssuerCommand::Init(a)) => {
                let issuer = DevIssuer::init(&a.dir, &a.issuer, a.key.as_deref())?;
                outln!(
                    "created issuer {} (kid {}) in {}",
                    issuer.issuer(),
                    issuer.kid(),
                    a.dir.display()
                );
                outln!("  public keys: {}", DevIssuer::jwks_path(&a.dir).display());
            }
            Self::Token(a) => {
                let issuer = DevIssuer::load(&a.issuer_dir)
                    .with_context(|| format!("loading the issuer in {}", a.issuer_dir.display()))?;
                let req = TokenRequest {
                    namespace: a.namespace,
                    service_account: a.service_account,
                    audiences: a.audience,
                    ttl: a.ttl,
                    pod: a.pod_name.zip(a.pod_uid),
                };
                outln!("{}", issuer.token(&req, SystemClock.now())?);
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
