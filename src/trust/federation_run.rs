//! Starting federation inside the server: the bundle endpoint (if configured), one client per
//! peer, and the watcher of `meshid bundle refresh` requests. Wiring only.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::server::ResolvesServerCert;
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};

use super::{
    bundle_endpoint::{self, FileCert},
    federation::{FederationStatus, PeerClient, REFRESH_DIR},
    FederationConfig, LiveCa,
};
use crate::{
    clock::Clock, shutdown::stopping, spiffe::TrustDomain, state::StateStore, telemetry::Metrics,
};

/// What federation needs from the server.
pub struct Inputs<'a> {
    pub cfg: &'a FederationConfig,
    pub state_dir: &'a Path,
    /// How often refresh requests are looked for (the state poll interval).
    pub poll: Duration,
    pub store: Arc<dyn StateStore>,
    pub live: &'a Arc<LiveCa>,
    /// meshid's own serving certificate: what an `https_spiffe` endpoint serves.
    pub serving: Arc<dyn ResolvesServerCert>,
    pub clock: &'a Arc<dyn Clock>,
    pub metrics: &'a Arc<Metrics>,
    pub stop: &'a watch::Receiver<bool>,
    /// Whether this replica leads: peers are polled by the leader only (every replica serves
    /// the bundles stored in the shared state).
    pub leading: &'a watch::Receiver<bool>,
}

/// The running federation parts.
pub struct Started {
    pub bundle_addr: Option<SocketAddr>,
    pub status: FederationStatus,
    pub refresh: BTreeMap<TrustDomain, Arc<Notify>>,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Starts the endpoint and the clients; `Err` lists every problem, naming its key.
pub async fn start(i: Inputs<'_>) -> Result<Started, Vec<String>> {
    let own = i.live.current().authority.trust_domain().clone();
    let mut errs = Vec::new();
    i.cfg.validate(Some(&own), &mut errs);
    if !errs.is_empty() {
        return Err(errs);
    }
    trust_configured_peers(i.cfg, i.live).await?;
    let mut tasks = Vec::new();
    let bundle_addr = match &i.cfg.bundle_endpoint {
        Some(e) => {
            let resolver: Arc<dyn ResolvesServerCert> = match (&e.cert_file, &e.key_file) {
                (Some(c), Some(k)) => {
                    let files = Arc::new(
                        FileCert::load(c.clone(), k.clone())
                            .map_err(|why| vec![format!("federation.bundle_endpoint: {why}")])?,
                    );
                    tasks.push(tokio::spawn(files.clone().watch(i.stop.clone())));
                    files
                }
                _ => i.serving.clone(),
            };
            let listener = crate::net::bind_tcp(e.listen).map_err(|err| {
                vec![format!(
                    "federation.bundle_endpoint.listen: binding {}: {err}",
                    e.listen
                )]
            })?;
            let addr = listener
                .local_addr()
                .map_err(|err| vec![format!("federation.bundle_endpoint.listen: {err}")])?;
            tracing::info!(
                addr = %addr,
                profile = ?e.profile,
                refresh_hint = %crate::duration::fmt_duration(i.cfg.refresh_hint),
                "SPIFFE bundle endpoint listening on https://{addr}/"
            );
            tasks.push(tokio::spawn(bundle_endpoint::serve(
                listener,
                resolver,
                i.live.subscribe(),
                i.cfg.refresh_hint,
                i.stop.clone(),
            )));
            Some(addr)
        }
        None => None,
    };
    let status = FederationStatus::with_file(i.state_dir);
    let mut refresh = BTreeMap::new();
    for peer in &i.cfg.peers {
        let client = PeerClient::new(
            peer.clone(),
            i.store.clone(),
            i.live.subscribe(),
            i.clock.clone(),
            status.clone(),
            i.metrics.clone(),
        )
        .map_err(|why| vec![why.to_string()])?;
        refresh.insert(peer.trust_domain.clone(), client.refresh_handle());
        tasks.push(tokio::spawn(crate::leader::while_leading(
            i.leading.clone(),
            i.stop.clone(),
            move |stop| client.clone().run(stop),
        )));
    }
    if !refresh.is_empty() {
        tasks.push(spawn_refresh_requests(&i, &refresh));
    }
    Ok(Started {
        bundle_addr,
        status,
        refresh,
        tasks,
    })
}

/// The watcher of `meshid bundle refresh` requests, on the leader (which polls the peers).
fn spawn_refresh_requests(
    i: &Inputs<'_>,
    refresh: &BTreeMap<TrustDomain, Arc<Notify>>,
) -> JoinHandle<()> {
    let (dir, handles, poll) = (i.state_dir.join(REFRESH_DIR), refresh.clone(), i.poll);
    tokio::spawn(crate::leader::while_leading(
        i.leading.clone(),
        i.stop.clone(),
        move |stop| refresh_requests(dir.clone(), handles.clone(), poll, stop),
    ))
}

/// Trusts the stored bundles of the configured peers only; a stored bundle of any other trust
/// domain (a peer taken out of the config) is logged, with the command that deletes it.
async fn trust_configured_peers(
    cfg: &FederationConfig,
    live: &Arc<LiveCa>,
) -> Result<(), Vec<String>> {
    let (live, peers) = (live.clone(), cfg.peer_trust_domains());
    let left_out = tokio::task::spawn_blocking(move || live.federate_with(peers))
        .await
        .map_err(|e| vec![format!("federation: {e}")])?
        .map_err(|e| vec![format!("federation: reading the stored bundles: {e}")])?;
    for td in left_out {
        tracing::warn!(
            trust_domain = %td,
            "a bundle of {td} is stored but {td} is not in [[federation.peers]]: it is not trusted (not in ALL, spiffe://{td} or ROOTCA); `meshid bundle delete {td}` deletes it, adding the peer back trusts it again"
        );
    }
    Ok(())
}

/// Wakes a peer's client when `meshid bundle refresh TD` left a request file for it.
async fn refresh_requests(
    dir: PathBuf,
    peers: BTreeMap<TrustDomain, Arc<Notify>>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            () = stopping(&mut stop) => return,
        }
        for (td, notify) in &peers {
            if std::fs::remove_file(dir.join(td.to_string())).is_ok() {
                tracing::info!(trust_domain = %td, "bundle refresh requested");
                notify.notify_one();
            }
        }
    }
}
