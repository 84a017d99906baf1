//! `meshid root ...`: see and move roots through prepared → active → old → tainted → revoked.
//! Thin: each command resolves the store, calls `rotation::roots`, prints.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::json;

use super::Output;
use crate::{
    ca::{cert, plugin, root, KeyType, DEFAULT_MAX_TTL},
    clock::{rfc3339, Clock, SystemClock},
    config::Config,
    rotation::{self, Candidate, Ctx, Finished, GuidedOptions, HttpStatus},
    state::{Actor, CaState, JournalEntry, RootRecord, StateLocation, StateStore},
};

const JOURNAL_SHOWN: usize = 10;

#[derive(Debug, Subcommand)]
pub(super) enum RootCommand {
    /// Show every root (id, state, subject, not after, fingerprint, origin), the journal's last
    /// entries, the next step of a rotation in progress, and expiry warnings.
    Status(StatusArgs),
    /// Add a root that every peer trusts but nothing signs with yet: generated, or from a
    /// plug-in cacerts directory (a new intermediate under the active root is staged as its
    /// next signer instead, with no bundle change).
    Prepare(PrepareArgs),
    /// Make a prepared root (or a staged signer) the one that signs; the active root becomes old.
    Activate(TransitionArgs),
    /// Taint an old root: still trusted, but every leaf it signed is re-issued now.
    Taint(TransitionArgs),
    /// Remove a tainted root from every bundle and wipe its keys (or withdraw a prepared root
    /// or staged signer, which never signed).
    Revoke(RevokeArgs),
    /// The guided rotation against a running server: prepare, wait until every stream has the
    /// new root, activate, wait until every stream runs on the new signer, taint the old root,
    /// revoke it when safe. Interrupted, it continues from the state when run again.
    Rotate(RotateArgs),
}

#[derive(Debug, Args)]
pub(super) struct RotateArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The server's HTTP port (where /metrics is), e.g. http://127.0.0.1:15014; give it once
    /// per replica to wait on every one. Not needed with a kube:// state: every replica's
    /// status is read from its Lease.
    #[arg(long, value_name = "URL")]
    server: Vec<String>,
    /// Longest wait for each propagation step.
    #[arg(long, value_parser = super::duration_arg, default_value = "5m")]
    timeout: Duration,
    /// Key algorithm of the generated root (default: the state's key type).
    #[arg(long, value_enum)]
    key_type: Option<KeyType>,
    /// Lifetime of the generated root.
    #[arg(long, value_parser = super::duration_arg, default_value = "10y")]
    root_ttl: Duration,
    /// Longest leaf lifetime the server issues (default: the config's issuance.max_ttl, else 24h).
    #[arg(long, value_parser = super::duration_arg)]
    max_ttl: Option<Duration>,
    /// Why, recorded in the journal.
    #[arg(long)]
    reason: Option<String>,
}

/// Where the state is: `--state`, or the state of a server config file.
#[derive(Debug, Args)]
pub(super) struct StoreArgs {
    /// Where the CA state is: a directory, or kube://NAMESPACE/NAME for a Kubernetes Secret.
    #[arg(
        long = "state",
        visible_alias = "state-dir",
        value_name = "DIR|kube://NS/NAME",
        required_unless_present = "config"
    )]
    state: Option<StateLocation>,
    /// The kubeconfig for a kube:// state (default: the config's state_kubeconfig, else
    /// in-cluster or KUBECONFIG).
    #[arg(long, value_name = "FILE")]
    state_kubeconfig: Option<PathBuf>,
    /// The server's TOML config: its state (unless --state) and issuance.max_ttl.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(super) struct StatusArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Also show what the running server's SDS streams have acknowledged (its HTTP port; once
    /// per replica).
    #[arg(long, value_name = "URL")]
    server: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Args)]
pub(super) struct PrepareArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Take the new root or signer from a plug-in CA directory (Istio's cacerts layout, or
    /// tls.crt, tls.key, ca.crt) instead of generating a root.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["key_type", "root_ttl"])]
    from_plugin: Option<PathBuf>,
    /// Key algorithm of the generated root (default: the state's key type).
    #[arg(long, value_enum)]
    key_type: Option<KeyType>,
    /// Lifetime of the generated root.
    #[arg(long, value_parser = super::duration_arg, default_value = "10y")]
    root_ttl: Duration,
    /// Why, recorded in the journal.
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Debug, Args)]
pub(super) struct TransitionArgs {
    /// The root's id (or a staged signer's, for activate): a unique prefix is enough.
    id: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Activate even if the propagation check fails (with --server, or a kube:// state).
    #[arg(long)]
    force: bool,
    /// Activate only once every stream of this server (its HTTP port; once per replica) has the
    /// prepared root. With a kube:// state every replica's status is read from its Lease instead.
    #[arg(long, value_name = "URL")]
    server: Vec<String>,
    /// Why, recorded in the journal.
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Debug, Args)]
pub(super) struct RevokeArgs {
    /// The root's id: a unique prefix is enough.
    id: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Revoke although certificates it anchors may still be valid (they fail at once).
    #[arg(long)]
    force: bool,
    /// Longest leaf lifetime the server issues (default: the config's issuance.max_ttl, else 24h).
    #[arg(long, value_parser = super::duration_arg)]
    max_ttl: Option<Duration>,
    /// Why, recorded in the journal.
    #[arg(long)]
    reason: Option<String>,
}

impl RootCommand {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        let hint = self.hint();
        self.run_inner(&hint)
            .map_err(|e| anyhow::anyhow!(hint.runnable(&super::error_text(&e))))
    }

    /// The options a pasted hint needs to reach the same state (and servers).
    fn hint(&self) -> Hint {
        let (store, servers): (&StoreArgs, &[String]) = match self {
            Self::Status(a) => (&a.store, &a.server),
            Self::Prepare(a) => (&a.store, &[]),
            Self::Activate(a) | Self::Taint(a) => (&a.store, &a.server),
            Self::Revoke(a) => (&a.store, &[]),
            Self::Rotate(a) => (&a.store, &a.server),
        };
        Hint::new(store, servers)
    }

    fn run_inner(self, hint: &Hint) -> anyhow::Result<ExitCode> {
        match self {
            Self::Status(a) => status(a, hint),
            Self::Prepare(a) => prepare(a, hint),
            Self::Activate(a) => {
                let ctx = ctx(a.reason)?;
                let (store, _) = a.store.open()?;
                // With --server, every connected stream must have the root (propagation).
                // With a bundle endpoint, federated peers must have had time to fetch it.
                let publication = a
                    .store
                    .federation()?
                    .and_then(|f| f.bundle_endpoint.map(|_| f.refresh_hint));
                let id = a.id;
                let servers = servers(&a.server)?;
                // Every replica's Lease with a Secret state; else the --server list.
                let replicas = if servers.is_empty() {
                    a.store.replicas()?
                } else {
                    None
                };
                let propagation: Option<&dyn rotation::StatusSource> = match &replicas {
                    Some(r) => Some(r),
                    None => (!servers.is_empty()).then_some(&servers),
                };
                let gate = rotation::ActivationGate::new(publication, propagation, ctx.now);
                let applied = rotation::apply(&store, &ctx, |s, c| {
                    rotation::activate(s, &id, a.force, &|r| gate.check(r), c)
                })?;
                report(&applied, hint)?;
                if a.store.config_path().is_none() && applied.outcome.signer.is_none() {
                    warn_no_publication_gate(&format!("root {}", applied.outcome.root));
                }
                if propagation.is_none() && applied.outcome.signer.is_none() {
                    outln!("  propagation was not checked (no --server): peers that do not have root {} yet refuse its leaves", applied.outcome.root);
                }
                Ok(())
            }
            Self::Taint(a) => {
                let ctx = ctx(a.reason)?;
                let (store, _) = a.store.open()?;
                let applied = rotation::apply(&store, &ctx, |s, c| rotation::taint(s, &a.id, c))?;
                report(&applied, hint)
            }
            Self::Revoke(a) => {
                let ctx = ctx(a.reason)?;
                let (store, max) = a.store.open()?;
                let max_ttl = a.max_ttl.unwrap_or(max);
                let applied = rotation::apply(&store, &ctx, |s, c| {
                    rotation::revoke(s, &a.id, a.force, max_ttl, c)
                })?;
                report(&applied, hint)
            }
            Self::Rotate(a) => return rotate(a, hint),
        }
        .map(|()| ExitCode::SUCCESS)
    }
}

impl StoreArgs {
    /// The config file given with `--config`, if any.
    pub(super) fn config_path(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }

    /// The config file's `[federation]` section, when a config was given.
    pub(super) fn federation(&self) -> anyhow::Result<Option<crate::trust::FederationConfig>> {
        Ok(self.read_config()?.map(|c| c.federation))
    }

    /// The store, and the max leaf TTL to assume.
    pub(super) fn open(&self) -> anyhow::Result<(std::sync::Arc<dyn StateStore>, Duration)> {
        let cfg = self.read_config()?;
        let location = match (&self.state, &cfg) {
            (Some(l), _) => l.clone(),
            (None, Some(c)) => c.state_location(),
            (None, None) => bail!("give --state or --config"),
        };
        let kubeconfig = (self.state_kubeconfig.clone())
            .or_else(|| cfg.as_ref().and_then(|c| c.state_kubeconfig.clone()));
        let max_ttl = cfg.map_or(DEFAULT_MAX_TTL, |c| c.issuance.max_ttl);
        Ok((location.open(kubeconfig.as_deref())?, max_ttl))
    }

    /// Every replica's status from its Lease, when the state is in a Secret (`None`: a
    /// directory; give `--server`).
    pub(super) fn replicas(&self) -> anyhow::Result<Option<rotation::ReplicaLeases>> {
        let cfg = self.read_config()?;
        let location = match (&self.state, &cfg) {
            (Some(l), _) => l.clone(),
            (None, Some(c)) => c.state_location(),
            (None, None) => return Ok(None),
        };
        let StateLocation::Secret { namespace, .. } = location else {
            return Ok(None);
        };
        let kubeconfig = (self.state_kubeconfig.clone())
            .or_else(|| cfg.as_ref().and_then(|c| c.state_kubeconfig.clone()));
        let leases = rotation::ReplicaLeases::connect(&namespace, kubeconfig.as_deref())
            .with_context(|| format!("reading the replicas' status Leases in {namespace}"))?;
        Ok(Some(leases))
    }

    /// The directory of the server's own files (the federation status it writes, the refresh
    /// requests it reads): the state directory, or the config's `state_dir` when the state is
    /// in a Secret.
    pub(super) fn files_dir(&self) -> anyhow::Result<Option<PathBuf>> {
        if let Some(d) = self.state.as_ref().and_then(StateLocation::dir) {
            return Ok(Some(d.to_owned()));
        }
        Ok(self.read_config()?.map(|c| c.state_dir))
    }

    /// Reads the server config for the CLI. Every key must parse, as for the server (a typo is
    /// refused), but only the sections the CLI uses are validated: `state_dir`, `[issuance]`
    /// and `[federation]`. The server's own checks (e.g. `[[clusters]]`, which the README's
    /// configs leave to `meshid server`'s flags) are the server's business.
    fn read_config(&self) -> anyhow::Result<Option<Config>> {
        let Some(path) = &self.config else {
            return Ok(None);
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Config = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{} is invalid: {}", path.display(), e.to_string().trim())
        })?;
        let mut errs = Vec::new();
        if let Err(e) = cfg.issuance.validate() {
            errs.push(format!("issuance: {e}"));
        }
        cfg.federation.validate(None, &mut errs);
        if !errs.is_empty() {
            bail!("{} is invalid: {}", path.display(), errs.join("; "));
        }
        Ok(Some(cfg))
    }
}

/// Said when a root is activated without `--config`: the CLI cannot know whether a bundle
/// endpoint publishes this trust domain, so the publication gate was not applied.
fn warn_no_publication_gate(what: &str) {
    eprintln!(
        "warning: the federation publication gate is not applied (no --config): if a bundle endpoint publishes this trust domain, federated peers may not have fetched {what} yet and refuse its leaves. Give the server's config (--config FILE) to apply it."
    );
}

/// The journal's actor for this CLI: `user@host`, the user from `USER`/`LOGNAME`, else the
/// operating system's account of this process (a container or cron job sets neither).
pub(super) fn ctx(reason: Option<String>) -> anyhow::Result<Ctx> {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(os_user);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    Ok(Ctx::new(
        Actor::user(&user, &host),
        SystemClock.now(),
        reason,
    )?)
}

/// This process's user: its uid's name in /etc/passwd, else `uid:N`.
fn os_user() -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "unknown".into();
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    user_for_uid(&passwd, uid).unwrap_or_else(|| format!("uid:{uid}"))
}

/// The name of `uid` in a passwd(5) file.
fn user_for_uid(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

fn prepare(a: PrepareArgs, hint: &Hint) -> anyhow::Result<()> {
    let ctx = ctx(a.reason)?;
    let (store, _) = a.store.open()?;
    let current = store.load_existing()?;
    let mut crl = None;
    let candidate = match &a.from_plugin {
        Some(dir) => {
            let material = plugin::load_plugin_dir(dir, ctx.now)?;
            crl = crate::ca::crl::load_plugin_crl(dir, &material, ctx.now)?;
            Candidate::Plugin(material)
        }
        None => {
            let key_type = a.key_type.unwrap_or(current.state.key_type);
            let td = &current.state.trust_domain;
            Candidate::Generated(root::generate_root(td, key_type, a.root_ttl, ctx.now)?)
        }
    };
    let applied = rotation::apply(&store, &ctx, |s, c| {
        let mut t = rotation::prepare(s, candidate, c)?;
        // A new ca-crl.pem adds to the stored CRLs; none keeps them (as istiod keeps its CRL).
        t.state.crl = crate::ca::crl::merge(s.crl.as_deref(), crl.as_deref());
        Ok(t)
    })?;
    report(&applied, hint)
}

fn report(applied: &rotation::Applied, hint: &Hint) -> anyhow::Result<()> {
    let o = &applied.outcome;
    match &o.signer {
        Some(s) => outln!(
            "{}: signer {s} under root {} (generation {})",
            o.action,
            o.root,
            applied.generation
        ),
        None => outln!(
            "{}: root {} is now {} (generation {})",
            o.action,
            o.root,
            o.to,
            applied.generation
        ),
    }
    for n in &o.notes {
        outln!("  {}", hint.runnable(n));
    }
    Ok(())
}

/// Makes the commands a message suggests runnable as printed: each `` `meshid root …` `` and
/// `` `meshid bundle set|delete …` `` in backticks gets the options this command was given to
/// find its state (`--state-dir`, `--state`, `--state-kubeconfig`, `--config`), and `root
/// rotate` its `--server`s, so a pasted hint reaches the same state.
pub(super) struct Hint {
    store: String,
    servers: String,
}

impl Hint {
    pub(super) fn new(store: &StoreArgs, servers: &[String]) -> Self {
        let mut o = Vec::new();
        match &store.state {
            Some(l @ StateLocation::Dir(_)) => {
                o.push(format!("--state-dir {}", shell_word(&l.to_string())))
            }
            Some(l) => o.push(format!("--state {}", shell_word(&l.to_string()))),
            None => {}
        }
        if let Some(k) = &store.state_kubeconfig {
            o.push(format!(
                "--state-kubeconfig {}",
                shell_word(&k.display().to_string())
            ));
        }
        if let Some(c) = &store.config {
            o.push(format!("--config {}", shell_word(&c.display().to_string())));
        }
        let servers = servers
            .iter()
            .map(|s| format!(" --server {}", shell_word(s)))
            .collect();
        Self {
            store: o.join(" "),
            servers,
        }
    }

    /// A bare command (`meshid root activate ID`) with the options added.
    pub(super) fn command(&self, command: &str) -> String {
        let takes_store = [
            "meshid root ",
            "meshid bundle set ",
            "meshid bundle delete ",
        ]
        .iter()
        .any(|p| command.starts_with(p));
        if !takes_store
            || self.store.is_empty()
            || command.contains("--state")
            || command.contains("--config")
        {
            return command.to_owned();
        }
        let mut out = format!("{command} {}", self.store);
        if command.starts_with("meshid root rotate") {
            out.push_str(&self.servers);
        }
        out
    }

    /// `text` with every backticked command made runnable.
    pub(super) fn runnable(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 64);
        let mut parts = text.split('`');
        if let Some(first) = parts.next() {
            out.push_str(first);
        }
        for (i, part) in parts.enumerate() {
            out.push('`');
            if i % 2 == 0 {
                out.push_str(&self.command(part));
            } else {
                out.push_str(part);
            }
        }
        out
    }
}

/// `s` as one shell word: as it is when it needs no quoting, else in single quotes.
pub(super) fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:@%+=,-~".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

// === rotate ===

fn servers(urls: &[String]) -> anyhow::Result<Vec<HttpStatus>> {
    urls.iter()
        .map(|u| HttpStatus::new(u).map_err(anyhow::Error::msg))
        .collect()
}

fn rotate(a: RotateArgs, hint: &Hint) -> anyhow::Result<ExitCode> {
    let servers = servers(&a.server)?;
    let replicas = if servers.is_empty() {
        match a.store.replicas()? {
            Some(r) => Some(r),
            None => bail!("give --server (the HTTP port of each replica), or a kube:// state whose replicas publish their status"),
        }
    } else {
        None
    };
    let source: &dyn rotation::StatusSource = match &replicas {
        Some(r) => r,
        None => &servers,
    };
    if a.store.config_path().is_none() {
        warn_no_publication_gate("the new root");
    }
    let (store, max) = a.store.open()?;
    let opts = GuidedOptions {
        timeout: a.timeout,
        poll: Duration::from_millis(500),
        max_ttl: a.max_ttl.unwrap_or(max),
        key_type: a.key_type,
        root_ttl: a.root_ttl,
        publication_hint: a
            .store
            .federation()?
            .and_then(|f| f.bundle_endpoint.map(|_| f.refresh_hint)),
    };
    let reason = a.reason;
    let make_ctx = || {
        ctx(reason.clone()).map_err(|e| match e.downcast::<rotation::RootError>() {
            Ok(r) => r,
            Err(e) => rotation::RootError::Refused {
                refused: e.to_string(),
                next: "fix it and re-run".into(),
            },
        })
    };
    // Nothing is written before the servers (or the replicas' Leases) answer: a rotation that
    // cannot watch propagation must not prepare a root it then cannot take further.
    if let Err(e) = source.statuses(rotation::STATUS_READ_TIMEOUT) {
        bail!("{e}; nothing was changed (the rotation starts only once the server's status can be read)");
    }
    let mut progress = |line: &str| outln!("{}", hint.runnable(line));
    let finished = rotation::rotate(&store, source, &opts, &make_ctx, &mut progress, &mut |_| {
        Ok(())
    })?;
    match finished {
        Finished::Revoked { root } => {
            outln!("done: root {root} is revoked; the rotation is complete")
        }
        Finished::SignerActivated { signer } => {
            outln!("done: every stream runs on signer {signer}")
        }
        Finished::RevokeLater { root, at, command } => {
            outln!(
                "stopped: root {root} is tainted; revoke it at {} or later with:",
                rfc3339(at)
            );
            outln!("  {}", hint.command(&command));
        }
    }
    Ok(ExitCode::SUCCESS)
}

// === status ===

fn status(a: StatusArgs, hint: &Hint) -> anyhow::Result<()> {
    let (store, max_ttl) = a.store.open()?;
    let v = store.load_existing()?;
    let now = SystemClock.now();
    let state = &v.state;
    let next =
        rotation::next_step(state, max_ttl, now).map(|n| n.runnable_with(|c| hint.command(c)));
    let activate_before = a
        .store
        .read_config()?
        .map_or(rotation::AutoRotation::default(), |c| c.auto_rotation)
        .activate_before;
    let warnings: Vec<String> = rotation::expiry_warning(state, now, activate_before)
        .into_iter()
        .map(|w| hint.runnable(&w))
        .collect();
    let mut roots = state
        .roots
        .iter()
        .map(root_json)
        .collect::<anyhow::Result<Vec<_>>>()?;
    // With a bundle endpoint, a prepared root may sign once federated peers have fetched it.
    if let Some(hint) = a
        .store
        .federation()?
        .and_then(|f| f.bundle_endpoint.map(|_| f.refresh_hint))
    {
        for (r, j) in state.roots.iter().zip(roots.iter_mut()) {
            if r.state == crate::state::RootState::Prepared {
                j["activatable_from"] =
                    json!(rfc3339(rotation::publication::publishable_at(r, hint)));
            }
        }
    }
    let journal = state.journal_tail(JOURNAL_SHOWN);
    let mut server = servers(&a.server)?
        .iter()
        .map(|s| s.status().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if a.server.is_empty() {
        if let Some(replicas) = a.store.replicas()? {
            match rotation::StatusSource::statuses(&replicas, rotation::STATUS_READ_TIMEOUT) {
                Ok(s) => server = s,
                Err(e) => eprintln!("warning: {e}"),
            }
        }
    }
    let config_peers = a
        .store
        .federation()?
        .map(|f| f.peers.iter().map(|p| p.trust_domain.to_string()).collect());
    let federation = federation_json(state, a.store.files_dir()?.as_deref(), config_peers);
    match a.output {
        Output::Json => {
            let doc = json!({
                "trust_domain": state.trust_domain.to_string(),
                "generation": v.generation.0,
                "roots": roots,
                "journal": journal,
                "next_step": next,
                "warnings": warnings,
                "servers": server,
                "federation": federation,
            });
            outln!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Output::Text => {
            print_text(state, v.generation.0, &roots, journal, next, &warnings);
            for st in &server {
                print_server(st);
            }
            print_federation(&federation, hint);
        }
    }
    Ok(())
}

fn print_server(st: &rotation::RotationStatus) {
    let c = &st.counts;
    outln!(
        "server {} (generation {}, bundle sequence {}): {} SDS streams, {} with a bundle, {} with a leaf",
        st.replica, st.generation, st.bundle_sequence, c.streams, c.bundle_streams, c.leaf_streams
    );
    for r in &st.trusted_roots {
        outln!(
            "  root {r}: in the acknowledged bundle of {} of {} streams",
            c.roots.get(r).copied().unwrap_or(0),
            c.bundle_streams
        );
    }
    for (s, n) in &c.signers {
        let now = if *s == st.signer {
            " (signing now)"
        } else {
            ""
        };
        outln!(
            "  signer {s}{now}: leaves of {n} of {} streams",
            c.leaf_streams
        );
    }
    if c.laggard_count > 0 {
        outln!("  behind: {}", st.waiting());
    }
}

/// Every federated trust domain: what the state holds, whether the server trusts it (it does
/// for its configured peers only: from `--config`, else the peers the running server reported
/// in its status file; `null` when neither is known), the server's last attempt (from the
/// status file it keeps beside the state), and dissociated trust domains.
fn federation_json(
    state: &CaState,
    dir: Option<&std::path::Path>,
    config_peers: Option<std::collections::BTreeSet<String>>,
) -> serde_json::Value {
    use crate::trust::federation::{read_status_file, STATUS_FILE};
    let mut live = dir.map(read_status_file).unwrap_or_default();
    let peers = config_peers.or_else(|| {
        dir.is_some_and(|d| d.join(STATUS_FILE).exists())
            .then(|| live.keys().cloned().collect())
    });
    let trusted = |td: &str| peers.as_ref().map(|p| p.contains(td));
    let mut out = serde_json::Map::new();
    for (td, b) in &state.federated {
        let roots = b.roots().map(|r| r.len()).unwrap_or(0);
        out.insert(
            td.to_string(),
            json!({
                "roots": roots,
                "sequence": b.sequence,
                "highest_sequence": b.sequence_floor(),
                "updated_at": rfc3339(b.updated_at),
                "source": b.source,
                "trusted": trusted(&td.to_string()),
                "client": live.remove(&td.to_string()),
            }),
        );
    }
    for (td, d) in &state.dissociated {
        out.insert(
            td.to_string(),
            json!({
                "roots": 0,
                "trusted": false,
                "dissociated": { "at": rfc3339(d.at), "by": d.by },
                "client": live.remove(&td.to_string()),
            }),
        );
    }
    for (td, client) in live {
        out.insert(td, json!({ "roots": 0, "client": client }));
    }
    serde_json::Value::Object(out)
}

fn print_federation(fed: &serde_json::Value, hint: &Hint) {
    let Some(map) = fed.as_object().filter(|m| !m.is_empty()) else {
        return;
    };
    outln!("federation:");
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (td, f) in map {
        if f["dissociated"].is_object() {
            outln!(
                "  {td}: dissociated by {} at {}: the server stores none of its bundles until `{}`",
                s(&f["dissociated"]["by"]),
                s(&f["dissociated"]["at"]),
                hint.command(&format!("meshid bundle set {td} FILE"))
            );
        } else if f["source"].is_string() {
            outln!(
                "  {td}: {} root(s), sequence {}, stored {} from {}",
                s(&f["roots"]),
                s(&f["sequence"]),
                s(&f["updated_at"]),
                s(&f["source"])
            );
            if f["trusted"] == false {
                outln!(
                    "    not trusted: {td} is not in [[federation.peers]]; `{}` deletes the bundle",
                    hint.command(&format!("meshid bundle delete {td}"))
                );
            }
        } else {
            outln!("  {td}: no bundle stored yet");
        }
        let c = &f["client"];
        if c.is_object() {
            outln!(
                "    last attempt {}, last success {}, next {}",
                s(&c["last_attempt"]),
                s(&c["last_success"]),
                s(&c["next_attempt"])
            );
            if c["last_error"].is_string() {
                outln!("    last error: {}", s(&c["last_error"]));
            }
        }
    }
}

fn root_json(r: &RootRecord) -> anyhow::Result<serde_json::Value> {
    let der = r.cert_der()?;
    let sha = ring::digest::digest(&ring::digest::SHA256, &der);
    let prepared_signer = match &r.prepared_signer {
        Some(s) => Some(s.signer_id()?),
        None => None,
    };
    Ok(json!({
        "id": r.id,
        "state": r.state,
        "subject": r.subject()?,
        "not_after": rfc3339(r.not_after()?),
        "fingerprint_sha256": cert::hex(sha.as_ref()),
        "origin": r.origin,
        "since": r.since,
        "signs": r.state == crate::state::RootState::Active,
        "signer": if r.can_sign() { Some(r.signer_id()?) } else { None },
        "prepared_signer": prepared_signer,
    }))
}

fn print_text(
    state: &CaState,
    generation: u64,
    roots: &[serde_json::Value],
    journal: &[JournalEntry],
    next: Option<String>,
    warnings: &[String],
) {
    outln!(
        "trust domain {} (state generation {generation})",
        state.trust_domain
    );
    outln!(
        "{:<18} {:<9} {:<9} {:<22} SUBJECT",
        "ID",
        "STATE",
        "ORIGIN",
        "NOT AFTER"
    );
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    for r in roots {
        outln!(
            "{:<18} {:<9} {:<9} {:<22} {}",
            s(&r["id"]),
            s(&r["state"]),
            s(&r["origin"]),
            s(&r["not_after"]),
            s(&r["subject"])
        );
        outln!("    sha256 {}", s(&r["fingerprint_sha256"]));
        if r["signer"].is_string() && r["signer"] != r["id"] {
            outln!("    signer {}", s(&r["signer"]));
        }
        if r["prepared_signer"].is_string() {
            outln!("    prepared signer {}", s(&r["prepared_signer"]));
        }
        if r["activatable_from"].is_string() {
            outln!(
                "    on the bundle endpoint; activatable without --force from {}",
                s(&r["activatable_from"])
            );
        }
    }
    if !journal.is_empty() {
        outln!("journal (last {}):", journal.len());
    }
    for e in journal {
        let from = e.from_state.map_or("new".into(), |s| s.to_string());
        outln!(
            "  #{} {} {} {} {} {from} -> {}{}{}{}",
            e.seq,
            rfc3339(e.at),
            e.actor,
            e.action,
            e.signer
                .as_ref()
                .map_or(e.root.clone(), |s| format!("{} (signer {s})", e.root)),
            e.to_state,
            if e.forced { " [forced]" } else { "" },
            e.from_generation
                .map_or(String::new(), |g| format!(" (from generation {g})")),
            e.reason
                .as_ref()
                .map_or(String::new(), |r| format!(": {r}")),
        );
    }
    if let Some(n) = next {
        outln!("next step: {n}");
    }
    for w in warnings {
        outln!("warning: {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17 item 11: with no `USER`, the journal names the OS account, not `unknown`.
    #[test]
    fn the_os_user_comes_from_passwd_by_uid() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nnonroot:x:65532:65532::/home/nonroot:/sbin/nologin\n# comment\n";
        assert_eq!(user_for_uid(passwd, 0).as_deref(), Some("root"));
        assert_eq!(user_for_uid(passwd, 65532).as_deref(), Some("nonroot"));
        assert_eq!(user_for_uid(passwd, 1000), None);
        assert!(!os_user().is_empty() && os_user() != "unknown");
    }
}
