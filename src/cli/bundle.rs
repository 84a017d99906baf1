//! `meshid bundle ...`: export our SPIFFE bundle, show one (validated), store a peer's bundle
//! (the https_spiffe bootstrap, or an explicit replacement), delete one, and ask the server to
//! fetch a peer's bundle now.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};

use super::root::StoreArgs;
use crate::{
    ca::{cert, CertDer},
    clock::{rfc3339, Clock, SystemClock},
    spiffe::TrustDomain,
    state::StateStore,
    trust::{
        federated_store::{self, Association, DeleteMode, Origin, Stored},
        federation::{self, read_status_file, STATUS_FILE},
        SpiffeBundle, DEFAULT_REFRESH_HINT,
    },
};

#[derive(Debug, Subcommand)]
pub(super) enum BundleCommand {
    /// Print our trust domain's bundle (every root peers should trust, prepared ones included).
    Export(ExportArgs),
    /// Validate a SPIFFE bundle (a file, or an https_web endpoint URL) and print its authorities.
    Show(ShowArgs),
    /// Store TD's bundle from FILE (SPIFFE JSON or PEM): how an https_spiffe peer is
    /// bootstrapped, or an explicit replacement of the stored one (whatever its sequence).
    Set(SetArgs),
    /// Delete TD's stored bundle: refused while TD is a configured peer (--mode restrict), or
    /// deleted and dissociated so the server stores none of its bundles until `bundle set`
    /// (--mode dissociate).
    Delete(DeleteArgs),
    /// Ask the running server to fetch TD's bundle now (it picks the request up within
    /// state_poll_interval).
    Refresh(RefreshArgs),
}

/// Output format of `bundle export`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(super) enum Format {
    /// The SPIFFE bundle (JWK Set).
    #[default]
    Spiffe,
    /// PEM certificates.
    Pem,
}

#[derive(Debug, Args)]
pub(super) struct ExportArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// spiffe_refresh_hint to put in the bundle.
    #[arg(long, value_parser = super::duration_arg, default_value = "5m")]
    refresh_hint: Duration,
}

#[derive(Debug, Args)]
pub(super) struct ShowArgs {
    /// A bundle file, or an https:// URL of an https_web bundle endpoint.
    source: String,
    /// CA certificates (PEM) that validate an https_web URL (default: the system roots).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(super) struct SetArgs {
    /// The federated trust domain.
    trust_domain: TrustDomain,
    /// Its bundle: SPIFFE JSON, or PEM CA certificates.
    file: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
pub(super) struct DeleteArgs {
    /// The federated trust domain.
    trust_domain: TrustDomain,
    /// restrict: refuse while TD is in use (a peer in the config or of the running server, or
    /// the authority of a peer's https_spiffe endpoint); dissociate: delete anyway and stop
    /// storing TD's fetched bundles until `meshid bundle set`.
    #[arg(long, value_enum, default_value_t)]
    mode: DeleteMode,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
pub(super) struct RefreshArgs {
    /// The federated trust domain (one of the server's `federation.peers`).
    trust_domain: TrustDomain,
    #[command(flatten)]
    store: StoreArgs,
}

impl BundleCommand {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Export(a) => export(a),
            Self::Show(a) => show(a),
            Self::Set(a) => set(a),
            Self::Delete(a) => delete(a),
            Self::Refresh(a) => refresh(a),
        }
        .map(|()| ExitCode::SUCCESS)
    }
}

fn export(a: ExportArgs) -> anyhow::Result<()> {
    let (store, _) = a.store.open()?;
    let v = store.load_existing()?;
    let roots = v.state.trusted_roots()?;
    match a.format {
        Format::Pem => out!("{}", cert::to_pem_bundle(&roots)),
        Format::Spiffe => {
            // The state generation moves on every change and survives restarts: the sequence.
            let bundle = SpiffeBundle {
                roots,
                sequence: Some(v.generation.0),
                refresh_hint: Some(a.refresh_hint),
            };
            outln!("{}", bundle.to_json()?);
        }
    }
    Ok(())
}

fn show(a: ShowArgs) -> anyhow::Result<()> {
    let bytes = if a.source.starts_with("https://") {
        fetch_web(&a.source, a.ca_file.as_deref())?
    } else {
        std::fs::read(&a.source).with_context(|| format!("reading {}", a.source))?
    };
    let bundle = parse_any(&bytes).with_context(|| format!("bundle {}", a.source))?;
    outln!(
        "sequence {}  refresh hint {}",
        bundle.sequence.map_or("-".into(), |s| s.to_string()),
        bundle
            .refresh_hint
            .map_or("-".into(), |h| format!("{}s", h.as_secs()))
    );
    outln!("{:<18} {:<22} {:<14} SUBJECT", "ID", "NOT AFTER", "KEY");
    for r in &bundle.roots {
        let p = cert::parse(r, "root")?;
        let kind = crate::ca::sig::PublicKeyKind::of(p.public_key());
        outln!(
            "{:<18} {:<22} {:<14} {}",
            cert::fingerprint_id(r),
            rfc3339(p.validity().not_after.to_datetime()),
            kind.name(p.public_key()),
            p.subject()
        );
    }
    Ok(())
}

fn set(a: SetArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let bundle = parse_any(&bytes).with_context(|| format!("bundle {}", a.file.display()))?;
    let (store, _) = a.store.open()?;
    let source = format!("file {}", a.file.display());
    let td = &a.trust_domain;
    let outcome = federated_store::store_bundle(
        &store,
        td,
        &bundle,
        &source,
        Origin::Operator,
        SystemClock.now(),
    )?;
    let seq = |s: Option<u64>| s.map_or("none".into(), |s| s.to_string());
    match outcome {
        Stored::Updated(u) => {
            match &u.previous {
                Some(p) => outln!(
                    "replaced {td}'s bundle (sequence {}, from {}) with {} root(s) (sequence {}; state generation {})",
                    seq(p.sequence),
                    p.source,
                    bundle.roots.len(),
                    seq(bundle.sequence),
                    u.generation
                ),
                None => outln!(
                    "stored {} root(s) for {td} (sequence {}; state generation {})",
                    bundle.roots.len(),
                    seq(bundle.sequence),
                    u.generation
                ),
            }
            outln!(
                "  fetched bundles replace it from now on unless their sequence comes before {}",
                seq(bundle.sequence)
            );
        }
        Stored::Unchanged => outln!("{td} already holds this bundle"),
    }
    match a.store.federation()? {
        Some(f) if !f.peer_trust_domains().contains(td) => outln!(
            "  note: {td} is not in [[federation.peers]] of {}: the server trusts the bundle only once it is",
            a.store.config_path().map_or(String::new(), |p| p.display().to_string())
        ),
        Some(_) => {}
        None => outln!("  the server trusts it if {td} is one of its [[federation.peers]]"),
    }
    Ok(())
}

fn delete(a: DeleteArgs) -> anyhow::Result<()> {
    let (store, _) = a.store.open()?;
    let td = &a.trust_domain;
    let uses = uses_of(&a.store, a.store.files_dir()?.as_deref(), td)?;
    if a.store.config_path().is_none() && a.mode == DeleteMode::Restrict {
        outln!("no --config: checked the peers of the running server only ({STATUS_FILE})");
    }
    let by = super::root::ctx(None)?.actor.to_string();
    let deleted =
        federated_store::delete_bundle(&store, td, a.mode, &uses, &by, SystemClock.now())?;
    outln!(
        "deleted {td}'s bundle ({} root(s), sequence {}, from {}; state generation {})",
        deleted.bundle.roots().map(|r| r.len()).unwrap_or(0),
        deleted
            .bundle
            .sequence
            .map_or("none".into(), |s| s.to_string()),
        deleted.bundle.source,
        deleted.generation
    );
    outln!(
        "  a running server stops trusting {td} as soon as it reloads the state (the file is watched): ALL and a merged ROOTCA are pushed without it and spiffe://{td} is no longer served (an Envoy keeps the copy it has until it restarts; see the README)"
    );
    if deleted.dissociated {
        outln!(
            "  {td} is dissociated: the server stores none of its fetched bundles until `meshid bundle set {td} FILE`; remove it from [[federation.peers]] too"
        );
    }
    Ok(())
}

/// What uses `td`'s bundle: the config given with `--config`, and the running server (the
/// peers in the status file it writes beside the state).
fn uses_of(
    args: &StoreArgs,
    dir: Option<&std::path::Path>,
    td: &TrustDomain,
) -> anyhow::Result<Vec<Association>> {
    let mut uses = match (args.federation()?, args.config_path()) {
        (Some(f), Some(path)) => f.uses_of(td, &path.display().to_string()),
        _ => Vec::new(),
    };
    let polled = dir.is_some_and(|d| read_status_file(d).contains_key(&td.to_string()));
    let listed = uses.iter().any(|u| matches!(u, Association::Peer { .. }));
    if polled && !listed {
        uses.push(Association::Peer {
            seen_in: format!(
                "the running server fetches it: {}",
                dir.unwrap_or(std::path::Path::new("."))
                    .join(STATUS_FILE)
                    .display()
            ),
        });
    }
    Ok(uses)
}

fn refresh(a: RefreshArgs) -> anyhow::Result<()> {
    if let (Some(f), Some(path)) = (a.store.federation()?, a.store.config_path()) {
        if !f.peer_trust_domains().contains(&a.trust_domain) {
            bail!(
                "{} is not in [[federation.peers]] of {}; the server fetches only its peers",
                a.trust_domain,
                path.display()
            );
        }
    }
    let Some(files) = a.store.files_dir()? else {
        bail!("a refresh request goes to the server's state_dir: give --config (the state is in a Secret)");
    };
    let dir = files.join(federation::REFRESH_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let request = dir.join(a.trust_domain.to_string());
    std::fs::write(&request, b"").with_context(|| format!("writing {}", request.display()))?;
    outln!(
        "asked the server to fetch {}'s bundle; see `meshid root status` for the result",
        a.trust_domain
    );
    Ok(())
}

/// A SPIFFE bundle (JSON), or PEM CA certificates (no sequence, default hint).
fn parse_any(bytes: &[u8]) -> anyhow::Result<SpiffeBundle> {
    let text = String::from_utf8_lossy(bytes);
    if text.trim_start().starts_with('{') {
        return Ok(SpiffeBundle::parse(bytes)?);
    }
    let roots: Vec<CertDer> = cert::certs_from_pem(bytes, "PEM bundle")?;
    for (i, r) in roots.iter().enumerate() {
        let p = cert::parse(r, "PEM bundle")?;
        if let Some(why) = cert::signing_cert_problem(&p) {
            bail!("certificate {i} is not a CA ({why}); a bundle holds CA certificates");
        }
    }
    Ok(SpiffeBundle {
        roots,
        sequence: None,
        refresh_hint: Some(DEFAULT_REFRESH_HINT),
    })
}

fn fetch_web(url: &str, ca_file: Option<&std::path::Path>) -> anyhow::Result<Vec<u8>> {
    let peer = crate::trust::PeerConfig {
        trust_domain: TrustDomain::new("bundle.show").expect("a valid trust domain"),
        url: url.to_owned(),
        profile: crate::trust::EndpointProfile::HttpsWeb,
        endpoint_spiffe_id: None,
        ca_file: ca_file.map(Into::into),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(federation::fetch_web(&peer))?)
}
