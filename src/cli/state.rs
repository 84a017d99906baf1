//! `meshid state migrate`: moves the CA state between a directory and a Kubernetes Secret.

use std::{path::PathBuf, process::ExitCode};

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::state::{StateLocation, StateStore};

#[derive(Debug, Subcommand)]
pub(super) enum StateCommand {
    /// Copy the CA state to an empty location (a directory or kube://NAMESPACE/NAME), keeping
    /// its generation, and read it back to prove the copy. The source is left as it was:
    /// remove it once every server runs on the new location.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub(super) struct MigrateArgs {
    /// Where the state is now: a directory, or kube://NAMESPACE/NAME.
    #[arg(long, value_name = "DIR|kube://NS/NAME")]
    from: StateLocation,
    /// Where it goes: must hold no state yet (an empty Secret of type meshid.io/ca-state is fine).
    #[arg(long, value_name = "DIR|kube://NS/NAME")]
    to: StateLocation,
    /// The kubeconfig for kube:// locations (default: in-cluster, or KUBECONFIG).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
}

impl StateCommand {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Migrate(a) => migrate(a),
        }
        .map(|()| ExitCode::SUCCESS)
    }
}

fn migrate(a: MigrateArgs) -> anyhow::Result<()> {
    if a.from == a.to {
        bail!("--from and --to are the same location ({})", a.from);
    }
    let from = a.from.open(a.kubeconfig.as_deref())?;
    let to = a.to.open(a.kubeconfig.as_deref())?;
    let source = from.load_existing()?;
    if let Some(there) = to.load()? {
        bail!(
            "{} already holds a CA state (generation {}); refusing to overwrite it. Nothing was written",
            to.location(),
            there.generation
        );
    }
    let generation = to.create_migrated(&source)?;
    let back = to.load_existing()?;
    let same = serde_json::to_value(&back.state)? == serde_json::to_value(&source.state)?;
    if !same || back.generation != source.generation {
        bail!(
            "{} reads back differently from {} (generation {} vs {}); do not switch servers to it",
            to.location(),
            from.location(),
            back.generation,
            source.generation
        );
    }
    outln!(
        "copied the CA state of {} (trust domain {}, generation {generation}) to {}; read back identical",
        from.location(),
        source.state.trust_domain,
        to.location()
    );
    outln!(
        "  next: point every server at {} (--state or `state = \"{}\"`), then remove the old copy",
        to.location(),
        a.to
    );
    Ok(())
}
