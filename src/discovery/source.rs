//! Where the discovery model comes from while the server runs, published as a `watch` of
//! `DiscoveryView`: a snapshot file, re-read whenever it changes.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{DiscoveryError, DiscoveryView, MeshObjects, MeshSettings};

/// A snapshot file, polled for changes.
pub struct SnapshotSource {
    path: PathBuf,
    settings: MeshSettings,
    tx: watch::Sender<Arc<DiscoveryView>>,
}

impl SnapshotSource {
    /// Reads the file once; a bad file is an error at start-up.
    pub fn load(path: PathBuf, settings: MeshSettings) -> Result<Self, DiscoveryError> {
        let view = read(&path, &settings)?;
        let (tx, _) = watch::channel(view);
        Ok(Self { path, settings, tx })
    }

    /// A receiver of views.
    pub fn subscribe(&self) -> watch::Receiver<Arc<DiscoveryView>> {
        self.tx.subscribe()
    }

    /// Re-reads the file whenever its modification time changes; a file that fails to parse
    /// keeps the last good view in service.
    pub async fn watch_file(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut seen = mtime(&self.path);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = mtime(&self.path);
            if now == seen {
                continue;
            }
            seen = now;
            match read(&self.path, &self.settings) {
                Ok(view) => {
                    tracing::info!(path = %self.path.display(), clusters = view.clusters.len(), "discovery snapshot reloaded");
                    self.tx.send_replace(view);
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "discovery snapshot unreadable; keeping the last one")
                }
            }
        }
    }
}

fn read(path: &PathBuf, settings: &MeshSettings) -> Result<Arc<DiscoveryView>, DiscoveryError> {
    let bytes = std::fs::read(path)
        .map_err(|e| DiscoveryError::NotADocument(format!("{}: {e}", path.display())))?;
    Ok(DiscoveryView::build(
        &MeshObjects::from_snapshot(&bytes)?,
        settings,
    ))
}
