//! Shutdown: every task of a server holds a `watch::Receiver<bool>` that turns true once, when
//! the server stops (Ctrl-C, SIGTERM, `Running::shutdown`).

use tokio::sync::watch;

/// Completes when `stop` turns true (or its sender is gone).
pub async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
