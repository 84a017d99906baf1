//! Where the discovery model comes from while the server runs: a snapshot file re-read whenever
//! it changes (or the kube watchers in `kube.rs`), published as a `watch` of `MeshObjects`; and
//! `spawn_view`, which turns objects plus the proxy registry into the `DiscoveryView` EDS serves.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};

use super::{
    proof::NoProofs, DiscoveryError, DiscoveryView, MeshObjects, MeshSettings, ProxyRegistry,
};

/// A snapshot file, polled for changes.
pub struct SnapshotSource {
    path: PathBuf,
    tx: watch::Sender<Arc<MeshObjects>>,
}

impl SnapshotSource {
    /// Reads the file once; a bad file is an error at start-up.
    pub fn load(path: PathBuf) -> Result<Self, DiscoveryError> {
        let objs = read(&path)?;
        let (tx, _) = watch::channel(objs);
        Ok(Self { path, tx })
    }

    /// A receiver of the objects.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshObjects>> {
        self.tx.subscribe()
    }

    /// Re-reads the file whenever its modification time changes: watched, and checked at least
    /// every `interval` (for a watch that misses events or cannot be set up). A file that fails
    /// to parse keeps the last good objects in service.
    pub async fn watch_file(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut seen = mtime(&self.path);
        let (wake_tx, mut wake_rx) = tokio::sync::mpsc::channel::<()>(1);
        let _watcher = crate::fswatch::watch_file(&self.path, wake_tx)
            .inspect_err(|e| {
                tracing::warn!(path = %self.path.display(), error = %e, poll = ?interval, "the discovery snapshot cannot be watched; changes are picked up by polling only")
            })
            .ok();
        loop {
            let woke = tokio::select! {
                _ = tokio::time::sleep(interval) => false,
                Some(()) = wake_rx.recv() => true,
                _ = stop.wait_for(|s| *s) => return,
            };
            // A file written in place (truncate, then write) wakes us mid-write: read it once
            // it has been quiet for a moment, not half-written.
            while woke && tokio::time::timeout(SETTLE, wake_rx.recv()).await.is_ok() {}
            let now = mtime(&self.path);
            if now == seen {
                continue;
            }
            seen = now;
            match read(&self.path) {
                Ok(objs) => {
                    tracing::info!(path = %self.path.display(), services = objs.services.len(), "discovery snapshot reloaded");
                    self.tx.send_replace(objs);
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "discovery snapshot unreadable; keeping the last one")
                }
            }
        }
    }
}

/// How long a watched snapshot must be quiet before it is read.
const SETTLE: Duration = Duration::from_millis(100);

fn read(path: &PathBuf) -> Result<Arc<MeshObjects>, DiscoveryError> {
    let bytes = std::fs::read(path)
        .map_err(|e| DiscoveryError::NotADocument(format!("{}: {e}", path.display())))?;
    Ok(Arc::new(MeshObjects::from_snapshot(&bytes)?))
}

type Digest = Vec<(String, String, String, String, bool)>;

fn build(
    objs: &MeshObjects,
    s: &MeshSettings,
    registry: Option<&ProxyRegistry>,
) -> (Arc<DiscoveryView>, Digest) {
    match registry {
        Some(r) => {
            let snap = r.snapshot();
            (DiscoveryView::build_with(objs, s, &snap), snap.digest())
        }
        None => (DiscoveryView::build_with(objs, s, &NoProofs), Vec::new()),
    }
}

/// Logs each input field that can change a decision but is not modeled (once per model).
fn log_ignored(objs: &MeshObjects) {
    for field in super::ignored_fields(objs) {
        tracing::warn!(%field, "discovery: a field that can change an auto mTLS decision is not modeled; ignored");
    }
}

fn proofs_moved(registry: Option<&ProxyRegistry>, digest: &Digest) -> bool {
    registry.is_some_and(|r| r.snapshot().digest() != *digest)
}

/// Builds the view now and again whenever the objects change or a proxy's proof does (a
/// stream opens or closes, a certificate is issued, or a grace period runs out: checked every
/// `tick`). Stops with `stop`.
pub fn spawn_view(
    mut objs: watch::Receiver<Arc<MeshObjects>>,
    settings: MeshSettings,
    registry: Option<Arc<ProxyRegistry>>,
    tick: Duration,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<Arc<DiscoveryView>>, JoinHandle<()>) {
    let current = objs.borrow_and_update().clone();
    log_ignored(&current);
    let (view, mut digest) = build(&current, &settings, registry.as_deref());
    let (tx, rx) = watch::channel(view);
    let mut changes = registry.as_ref().map(|r| r.subscribe());
    let task = tokio::spawn(async move {
        let mut current = current;
        let mut settle = false;
        loop {
            let proofs_changed = async {
                match changes.as_mut() {
                    Some(c) => c.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = objs.changed() => {
                    if r.is_err() { return }
                    current = objs.borrow_and_update().clone();
                    log_ignored(&current);
                }
                alive = proofs_changed => {
                    if !alive { return }
                    settle = true;
                }
                _ = tokio::time::sleep(tick), if registry.is_some() => {
                    if !proofs_moved(registry.as_deref(), &digest) { continue }
                }
                _ = stop.wait_for(|s| *s) => return,
            }
            if std::mem::take(&mut settle) {
                // Let a burst (a cold-start storm of streams) settle into one rebuild.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if !proofs_moved(registry.as_deref(), &digest) {
                    continue;
                }
            }
            let (view, d) = build(&current, &settings, registry.as_deref());
            digest = d;
            tx.send_replace(view);
        }
    });
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rewritten snapshot file is applied when it is written, not at the next poll (an hour
    /// here). The watch is set up once the task runs, so the file is rewritten until a change
    /// is seen; with polling only, none would be.
    #[tokio::test]
    async fn a_rewritten_snapshot_is_applied_without_waiting_for_the_poll() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        let example = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy/examples/mixed-traffic.yaml"),
        )
        .unwrap();
        std::fs::write(&path, b"[]").unwrap();
        let source = SnapshotSource::load(path.clone()).unwrap();
        let mut rx = source.subscribe();
        assert!(rx.borrow_and_update().services.is_empty());
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(source.watch_file(Duration::from_secs(3600), stop_rx));
        let mut applied = false;
        for _ in 0..30 {
            std::fs::write(&path, &example).unwrap();
            if tokio::time::timeout(Duration::from_secs(1), rx.changed())
                .await
                .is_ok()
            {
                applied = true;
                break;
            }
        }
        assert!(
            applied,
            "no rewrite applied within 30 s; the poll is an hour"
        );
        assert!(!rx.borrow().services.is_empty());
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
