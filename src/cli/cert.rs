//! `meshid cert ...`: issue a certificate from the local CA state; inspect certificate files.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{inspect::InspectArgs, Output};
use crate::{
    ca::{Authority, IssuancePolicy, DEFAULT_BACKDATE, DEFAULT_MAX_TTL},
    clock::SystemClock,
    spiffe::SpiffeId,
    state::{write_file_atomic, StateStore},
};

#[derive(Debug, Subcommand)]
pub(super) enum CertCommand {
    /// Issue an X.509-SVID for a SPIFFE ID, with a new key or for a CSR.
    Issue(IssueArgs),
    /// Print what a PEM file's certificates say, and whether the chain verifies against a root.
    Inspect(InspectArgs),
    /// Ask a running server for a certificate over Istio's CSR API (the key stays here).
    Request(super::client::RequestArgs),
}

#[derive(Debug, Args)]
pub(super) struct IssueArgs {
    #[command(flatten)]
    state: super::ca::StateArg,
    /// The identity to certify, e.g. spiffe://cluster.local/ns/shop/sa/product-service.
    #[arg(long)]
    spiffe_id: SpiffeId,
    /// Lifetime (0 means the default of 1h; at most --max-ttl).
    #[arg(long, value_parser = super::duration_arg)]
    ttl: Option<Duration>,
    /// Longest lifetime policy allows.
    #[arg(long, value_parser = super::duration_arg, default_value = "24h")]
    max_ttl: Duration,
    /// A PEM (or DER) CSR to sign instead of generating a key; it may name no SAN or exactly --spiffe-id.
    #[arg(long, value_name = "FILE")]
    csr: Option<PathBuf>,
    /// Directory to write cert-chain.pem (leaf first), key.pem (0600, unless --csr) and root-cert.pem to.
    #[arg(long)]
    out_dir: PathBuf,
}

impl CertCommand {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Issue(a) => issue(a).map(|()| ExitCode::SUCCESS),
            Self::Inspect(a) => a.run(),
            Self::Request(a) => a.run(),
        }
    }
}

fn issue(a: IssueArgs) -> anyhow::Result<()> {
    let store = a.state.open()?;
    let state = store.load_existing()?.state;
    let policy = IssuancePolicy {
        default_ttl: crate::ca::DEFAULT_TTL.min(a.max_ttl),
        max_ttl: a.max_ttl,
        backdate: DEFAULT_BACKDATE,
    };
    debug_assert!(DEFAULT_MAX_TTL >= crate::ca::DEFAULT_TTL);
    let authority = Authority::new(
        state.trust_domain.clone(),
        state.signing_material()?,
        policy,
        Arc::new(SystemClock),
    )?;
    // Everything is decided and signed before the first file is written.
    let (issued, key) = match &a.csr {
        Some(path) => {
            let csr =
                std::fs::read(path).with_context(|| format!("reading CSR {}", path.display()))?;
            (authority.sign_csr(&csr, &a.spiffe_id, a.ttl)?, None)
        }
        None => {
            let (issued, key) = authority.issue_with_new_key(&a.spiffe_id, a.ttl)?;
            (issued, Some(key))
        }
    };
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    if let Some(key) = &key {
        write_file_atomic(
            &a.out_dir.join("key.pem"),
            key.secret_pkcs8_pem().as_bytes(),
            0o600,
        )?;
    }
    write_file_atomic(
        &a.out_dir.join("cert-chain.pem"),
        issued.chain_pem().as_bytes(),
        0o644,
    )?;
    write_file_atomic(
        &a.out_dir.join("root-cert.pem"),
        issued.roots_pem().as_bytes(),
        0o644,
    )?;
    outln!(
        "issued {} (serial {}, valid {} to {}) into {}",
        issued.id,
        issued.serial,
        crate::clock::rfc3339(issued.not_before),
        crate::clock::rfc3339(issued.not_after),
        a.out_dir.display()
    );
    Ok(())
}

impl Output {
    pub(super) fn is_json(self) -> bool {
        self == Output::Json
    }
}
