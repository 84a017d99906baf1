//! `meshid ca ...`: create the authority, issue intermediates for other clusters.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::{
    ca::{cert, plugin, root, Authority, IssuancePolicy, KeyType},
    clock::{Clock, SystemClock},
    spiffe::TrustDomain,
    state::{write_file_atomic, CaState, IssuedIntermediate, StateLocation, StateStore},
};

#[derive(Debug, Subcommand)]
pub(super) enum CaCommand {
    /// Create a new authority: generate a self-signed root, or import a plug-in CA.
    Init(InitArgs),
    /// Issue an intermediate CA for another cluster sharing this root, in Istio's `cacerts` layout.
    Intermediate(IntermediateArgs),
}

/// Where the CA state is, for the commands that need nothing else of a server config.
#[derive(Debug, Args)]
pub(super) struct StateArg {
    /// Where the CA state is: a directory, or kube://NAMESPACE/NAME for a Kubernetes Secret.
    #[arg(
        long = "state",
        visible_alias = "state-dir",
        value_name = "DIR|kube://NS/NAME"
    )]
    state: StateLocation,
    /// The kubeconfig for a kube:// state (default: in-cluster, or KUBECONFIG).
    #[arg(long, value_name = "FILE")]
    state_kubeconfig: Option<PathBuf>,
}

impl StateArg {
    pub(super) fn open(&self) -> anyhow::Result<Arc<dyn StateStore>> {
        Ok(self.state.open(self.state_kubeconfig.as_deref())?)
    }
}

#[derive(Debug, Args)]
pub(super) struct InitArgs {
    /// Trust domain of the mesh, e.g. cluster.local.
    #[arg(long)]
    trust_domain: TrustDomain,
    /// Where to create the CA state: a directory (created 0700 if missing) or
    /// kube://NAMESPACE/NAME for a Kubernetes Secret; it must not hold a state already.
    #[command(flatten)]
    state: StateArg,
    /// Key algorithm of the generated root.
    #[arg(long, value_enum, default_value_t = KeyType::EcdsaP256)]
    key_type: KeyType,
    /// Lifetime of the generated root.
    #[arg(long, value_parser = super::duration_arg, default_value = "10y")]
    root_ttl: Duration,
    /// Import a plug-in CA instead of generating a root: a directory with Istio's cacerts files
    /// (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem) or tls.crt, tls.key, ca.crt.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["key_type", "root_ttl"])]
    from_plugin: Option<PathBuf>,
    /// Import Istio's CA from a Kubernetes Secret instead, NAMESPACE/NAME: `cacerts` (a plug-in
    /// CA, either key layout, with ca-crl.pem if present) or `istio-ca-secret` (istiod's
    /// self-signed CA), so a mesh moves to meshid without a new root.
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with_all = ["key_type", "root_ttl", "from_plugin"])]
    from_secret: Option<String>,
    /// The kubeconfig for --from-secret (default: in-cluster, or KUBECONFIG).
    #[arg(long, value_name = "FILE", requires = "from_secret")]
    kubeconfig: Option<PathBuf>,
    /// Exit 0 without writing anything when a state already exists (a Kubernetes init
    /// container runs this on every start).
    #[arg(long)]
    if_absent: bool,
}

#[derive(Debug, Args)]
pub(super) struct IntermediateArgs {
    /// The CA state holding the root.
    #[command(flatten)]
    state: StateArg,
    /// Name of the cluster the intermediate is for (appears in its subject).
    #[arg(long)]
    cluster: String,
    /// Directory to write ca-cert.pem, ca-key.pem (0600), root-cert.pem and cert-chain.pem to.
    #[arg(long)]
    out_dir: PathBuf,
    /// Lifetime of the intermediate (capped to the root's).
    #[arg(long, value_parser = super::duration_arg, default_value = "1y")]
    ttl: Duration,
    /// Key algorithm of the intermediate.
    #[arg(long, value_enum, default_value_t = KeyType::EcdsaP256)]
    key_type: KeyType,
}

impl CaCommand {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Init(a) => init(a),
            Self::Intermediate(a) => intermediate(a),
        }
        .map(|()| ExitCode::SUCCESS)
    }
}

fn init(a: InitArgs) -> anyhow::Result<()> {
    let store = a.state.open()?;
    if store
        .load()
        .with_context(|| format!("reading {}", store.location()))?
        .is_some()
    {
        if a.if_absent {
            outln!(
                "a CA state already exists in {}; left unchanged (--if-absent)",
                store.location()
            );
            return Ok(());
        }
        bail!(
            "a CA state already exists in {}; refusing to overwrite it",
            store.location()
        );
    }
    let now = SystemClock.now();
    // A Secret's keys become a private directory of Istio's file names, read like --from-plugin.
    let secret_files = match &a.from_secret {
        Some(ns_name) => Some(secret_as_plugin_dir(ns_name, a.kubeconfig.as_deref())?),
        None => None,
    };
    let plugin_dir = (secret_files.as_ref().map(|d| d.path().to_owned())).or(a.from_plugin.clone());
    let state = match &plugin_dir {
        Some(dir) => {
            let material = plugin::load_plugin_dir(dir, now)?;
            let crl = crate::ca::crl::load_plugin_crl(dir, &material, now)?;
            let mut state = CaState::from_plugin(a.trust_domain.clone(), &material, now)?;
            state.crl = crl;
            state
        }
        None => {
            let ca = root::generate_root(&a.trust_domain, a.key_type, a.root_ttl, now)?;
            CaState::with_generated_root(a.trust_domain.clone(), &ca, now)
        }
    };
    // Prove the authority works before anything is written.
    let authority = Authority::new(
        a.trust_domain.clone(),
        state.signing_material()?,
        IssuancePolicy::default(),
        Arc::new(SystemClock),
    )?;
    authority.self_test()?;
    let generation = match store.compare_and_swap(None, &state) {
        Ok(g) => g,
        // Another replica's init container created it between our read and our write.
        Err(crate::state::StateError::Conflict { .. }) if a.if_absent => {
            outln!(
                "a CA state was created in {} meanwhile; left unchanged (--if-absent)",
                store.location()
            );
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let root = state.signing_root()?;
    outln!(
        "initialized CA for trust domain {} in {} (generation {generation})",
        a.trust_domain,
        store.location()
    );
    outln!(
        "  root {} ({:?}), signing until {}",
        root.id,
        root.origin,
        crate::clock::rfc3339(authority.chain_not_after())
    );
    Ok(())
}

/// A 0700 directory of its own under the temp dir, removed (with the keys in it) when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let mut nonce = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| anyhow::anyhow!("no randomness for a temp directory name"))?;
        let path =
            std::env::temp_dir().join(format!("meshid-import-{}", crate::ca::cert::hex(&nonce)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Istio's CA Secret `ns_name` (`cacerts` or `istio-ca-secret`) as a plug-in directory (0700,
/// files 0600, removed when dropped). istiod's `istio-ca-secret` holds its self-signed root as
/// `ca-cert.pem` + `ca-key.pem` (`root-cert.pem` the same root, `cert-chain.pem` empty; security
/// `pkg/pki/ca` `NewSelfSignedIstioCAOptions`); a missing `root-cert.pem` of a self-signed
/// `ca-cert.pem` is that certificate, as istiod reads it.
fn secret_as_plugin_dir(
    ns_name: &str,
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<PrivateDir> {
    let Some((ns, name)) = ns_name.split_once('/') else {
        bail!("--from-secret {ns_name:?}: give NAMESPACE/NAME, e.g. istio-system/cacerts");
    };
    let kube = crate::kube_client::BlockingKube::connect(kubeconfig, Duration::from_secs(15))
        .with_context(|| format!("reading Secret {ns}/{name}"))?;
    use k8s_openapi::api::core::v1::Secret;
    let api: kube::Api<Secret> = kube::Api::namespaced(kube.calls.clone(), ns);
    let secret_name = name.to_owned();
    let secret = kube
        .run(async move { api.get_opt(&secret_name).await })
        .context("the Kubernetes client's runtime stopped")?
        .with_context(|| format!("reading Secret {ns}/{name}"))?;
    let Some(secret) = secret else {
        bail!("Secret {ns}/{name} does not exist");
    };
    let data = secret.data.unwrap_or_default();
    let known = [
        "ca-cert.pem",
        "ca-key.pem",
        "root-cert.pem",
        "cert-chain.pem",
        "ca-crl.pem",
        "tls.crt",
        "tls.key",
        "ca.crt",
    ];
    let dir = PrivateDir::new()?;
    let mut written = Vec::new();
    for (k, v) in &data {
        if known.contains(&k.as_str()) && !v.0.is_empty() {
            write_file_atomic(&dir.path().join(k), &v.0, 0o600)?;
            written.push(k.as_str());
        }
    }
    let has = |f: &str| written.contains(&f);
    if has("ca-cert.pem") && has("ca-key.pem") {
        if !has("root-cert.pem") {
            write_file_atomic(
                &dir.path().join("root-cert.pem"),
                &data["ca-cert.pem"].0,
                0o600,
            )?;
        }
        if !has("cert-chain.pem") {
            write_file_atomic(&dir.path().join("cert-chain.pem"), b"", 0o600)?;
        }
    } else if !(has("tls.crt") && has("tls.key") && has("ca.crt")) {
        bail!(
            "Secret {ns}/{name} holds no CA Istio would load: it needs ca-cert.pem and ca-key.pem (cacerts, istio-ca-secret) or tls.crt, tls.key and ca.crt; it has {:?}",
            data.keys().collect::<Vec<_>>()
        );
    }
    Ok(dir)
}

fn intermediate(a: IntermediateArgs) -> anyhow::Result<()> {
    let store = a.state.open()?;
    let current = store.load_existing()?;
    let state = &current.state;
    let root = state.signing_root()?;
    let Some(root_key) = &root.private_key else {
        bail!(
            "the active root {} was imported without its key (plug-in CA); intermediates must be issued by whoever holds that root's key",
            root.id
        );
    };
    let root_cert = root.cert_der()?;
    let root_key = root_key.to_key("root key")?;
    let now = SystemClock.now();
    let ca = root::issue_intermediate(
        &state.trust_domain,
        &a.cluster,
        &root_cert,
        &root_key,
        a.key_type,
        a.ttl,
        now,
    )?;
    let parsed = cert::parse(&ca.cert, "intermediate")?;
    let mut next = state.clone();
    next.intermediates.push(IssuedIntermediate {
        cluster: a.cluster.clone(),
        serial: ca.serial.to_string(),
        root_id: root.id.clone(),
        not_after: parsed.validity().not_after.to_datetime(),
        certificate: cert::to_pem(&ca.cert),
    });
    // Record first: a crash after this leaves a recorded intermediate whose files can be re-made,
    // never key files for an intermediate the state does not know.
    store.compare_and_swap(Some(current.generation), &next)?;
    let roots = state.trusted_roots()?;
    write_cacerts(&a.out_dir, &ca, &root_cert, &roots)?;
    outln!(
        "issued intermediate for cluster {} (serial {}, valid until {}) into {}",
        a.cluster,
        ca.serial,
        crate::clock::rfc3339(parsed.validity().not_after.to_datetime()),
        a.out_dir.display()
    );
    Ok(())
}

fn write_cacerts(
    dir: &std::path::Path,
    ca: &root::NewCa,
    root_cert: &cert::CertDer,
    roots: &[cert::CertDer],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = ca.key.secret_pkcs8_pem();
    write_file_atomic(&dir.join("ca-key.pem"), key.as_bytes(), 0o600)?;
    write_file_atomic(
        &dir.join("ca-cert.pem"),
        cert::to_pem(&ca.cert).as_bytes(),
        0o644,
    )?;
    let chain = cert::to_pem_bundle([&ca.cert, root_cert]);
    write_file_atomic(&dir.join("cert-chain.pem"), chain.as_bytes(), 0o644)?;
    write_file_atomic(
        &dir.join("root-cert.pem"),
        cert::to_pem_bundle(roots).as_bytes(),
        0o644,
    )?;
    Ok(())
}
