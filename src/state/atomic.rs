//! Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use super::error::StateError;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |error| StateError::Io {
        op,
        path: path.to_owned(),
        error,
    }
}

/// The temp-file name prefix used for `path`; stale ones can be recognized and removed.
pub(crate) fn temp_prefix(path: &Path) -> String {
    format!(
        ".{}.tmp.",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    )
}

/// Writes `bytes` to a new temp file beside `path` with `mode`, and fsyncs it. Returns its path.
pub(crate) fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf, StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        "{}{}.{nanos}",
        temp_prefix(path),
        std::process::id()
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    let written = f
        .write_all(bytes)
        .map_err(io("write", &tmp))
        .and_then(|()| f.sync_all().map_err(io("fsync", &tmp)));
    if let Err(e) = written {
        // A partial temp file may hold key material: never leave it behind.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Renames the temp file over `path` and fsyncs the directory so the rename is durable.
pub(crate) fn commit_temp(tmp: &Path, path: &Path) -> Result<(), StateError> {
    fs::rename(tmp, path).map_err(io("rename", path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}

/// Atomically replaces `path` with `bytes` (mode applies to the new file). A crash leaves
/// either the old file or the new one, never a mix.
pub fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    let tmp = write_temp(path, bytes, mode)?;
    commit_temp(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}
