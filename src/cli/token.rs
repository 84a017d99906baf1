//! `meshid token verify`: validate a service-account token the way the server would, and say
//! exactly why it is refused.

use std::{io::Read, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};

use super::Output;
use crate::{
    clock::SystemClock,
    identity::{
        ClusterId, JwkSet, JwksSource, JwksValidator, JwtConfig, Token, TokenReviewConfig,
        TokenReviewValidator, TokenValidator,
    },
    spiffe::TrustDomain,
};

#[derive(Debug, Subcommand)]
pub(super) enum TokenCommand {
    /// Validate a token; exit code 0 only when it is valid.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("backend").required(true).args(["jwks", "jwks_url", "oidc_issuer", "kubeconfig"])))]
pub(super) struct VerifyArgs {
    /// The token, or - to read it from standard input.
    token: String,
    /// Verify locally against a JWKS file (as `kubectl get --raw /openid/v1/jwks` prints).
    #[arg(long, value_name = "FILE")]
    jwks: Option<PathBuf>,
    /// Verify locally against keys fetched from a JWKS URL.
    #[arg(long, value_name = "URL")]
    jwks_url: Option<String>,
    /// Verify locally against keys found by OIDC discovery at this issuer URL.
    #[arg(long, value_name = "URL")]
    oidc_issuer: Option<String>,
    /// Ask the cluster: a TokenReview through this kubeconfig.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Accepted audience (repeatable).
    #[arg(long, default_value = "istio-ca")]
    audience: Vec<String>,
    /// Expected issuer (`iss`) for local verification; defaults to --oidc-issuer when given.
    #[arg(long)]
    issuer: Option<String>,
    /// Trust domain for the SPIFFE ID shown.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: TrustDomain,
    /// Extra CA certificate(s) (PEM) for HTTPS key fetches.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Accept legacy secret-based tokens.
    #[arg(long)]
    allow_legacy_tokens: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

impl TokenCommand {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        let Self::Verify(a) = self;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(verify(a))
    }
}

async fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let text = if a.token == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the token from standard input")?;
        s
    } else {
        a.token.clone()
    };
    let token = Token::new(text);
    let validator = build(&a).await?;
    match validator.validate(&token).await {
        Ok(id) => {
            if a.output.is_json() {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"valid": true, "identity": id})
                    )?
                );
            } else {
                outln!("valid: {}", id.spiffe_id);
                outln!("  namespace:       {}", id.namespace);
                outln!("  service account: {}", id.service_account);
                if let Some(p) = &id.pod {
                    outln!("  pod:             {} ({})", p.name, p.uid);
                }
                if let Some(t) = id.expires_at {
                    outln!("  expires at:      {}", crate::clock::rfc3339(t));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if a.output.is_json() {
                let v = serde_json::json!({"valid": false, "reason": e.reason(), "error": e.to_string()});
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!("refused: {e}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn build(a: &VerifyArgs) -> anyhow::Result<Box<dyn TokenValidator>> {
    let cluster = ClusterId(crate::identity::DEFAULT_CLUSTER.into());
    if let Some(path) = &a.kubeconfig {
        let kc = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("reading {}", path.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        let client = kube::Client::try_from(config)?;
        let mut cfg = TokenReviewConfig::new(cluster, a.trust_domain.clone());
        cfg.audiences = a.audience.clone();
        cfg.allow_legacy_tokens = a.allow_legacy_tokens;
        return Ok(Box::new(TokenReviewValidator::new(
            client,
            cfg,
            Arc::new(SystemClock),
        )));
    }
    let source = match (&a.jwks, &a.jwks_url, &a.oidc_issuer) {
        (Some(f), _, _) => {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            JwksSource::Static(JwkSet::from_json(&bytes)?)
        }
        (_, Some(u), _) => JwksSource::Url(u.clone()),
        (_, _, Some(i)) => JwksSource::Discovery(i.clone()),
        _ => unreachable!("clap requires one backend"),
    };
    let issuer = a.issuer.clone().or_else(|| a.oidc_issuer.clone());
    if issuer.is_none() {
        eprintln!("warning: no --issuer given: the token's iss claim is not checked");
    }
    let mut cfg = JwtConfig::new(cluster, a.trust_domain.clone(), issuer);
    cfg.audiences = a.audience.clone();
    cfg.allow_legacy_tokens = a.allow_legacy_tokens;
    if let Some(ca) = &a.ca_file {
        cfg.extra_ca_pem =
            Some(std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?);
    }
    Ok(Box::new(JwksValidator::new(
        cfg,
        source,
        Arc::new(SystemClock),
    )?))
}
