//! Files watched for changes (inotify on Linux, through `notify`), so a change written by the
//! CLI or an operator is picked up at once rather than at the next poll.

use std::path::Path;

use tokio::sync::mpsc;

/// Wakes `wake` whenever `file` is created, written or renamed over in its directory. Wakes
/// coalesce (one pending wake at most); a watch error wakes too, so the caller re-reads.
pub fn watch_file(
    file: &Path,
    wake: mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let name = file.file_name().map(ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match event {
            Ok(ev) => {
                !matches!(ev.kind, EventKind::Access(_))
                    && ev.paths.iter().any(|p| p.file_name() == name.as_deref())
            }
            Err(_) => true,
        };
        if relevant {
            let _ = wake.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
