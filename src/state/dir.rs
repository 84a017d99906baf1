//! The embedded state store: one checksummed JSON document in a directory, written
//! atomically under an exclusive lock, with compare-and-swap on its generation.
//!
//! Permissions: `state.json` holds private keys, so a file that group or others can access is
//! refused (like ssh does with keys); a directory that group or others can access is allowed
//! (volume mounts with an `fsGroup` make it so) but logged as a warning once per store.

use std::{
    fs::{self, File, OpenOptions},
    io::Read,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use super::{
    atomic::{commit_temp, temp_prefix, write_temp},
    document::CaState,
    envelope,
    error::StateError,
    generation::Generation,
    store::{ChangeWatch, StateStore, Versioned},
};

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = ".lock";
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// A state directory: `state.json` (0600), `.lock`, in a 0700 directory.
#[derive(Clone, Debug)]
pub struct DirStore {
    dir: PathBuf,
    warned_dir_mode: Arc<AtomicBool>,
}

/// Where a write stops, to simulate a crash or a failure in tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum CrashPoint {
    None,
    BeforeRename,
    /// The rename fails (as on EXDEV, EIO or a read-only remount).
    RenameFails,
    /// Not a crash: a first write that keeps the generation of a migrated state.
    KeepGeneration(Generation),
}

// === impl DirStore ===

impl DirStore {
    /// A store in `dir`; nothing is touched until the first read or write.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            warned_dir_mode: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state file's path.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn io<'a>(
        &self,
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> StateError + 'a {
        move |error| StateError::Io {
            op,
            path: path.to_owned(),
            error,
        }
    }

    fn lock(&self) -> Result<File, StateError> {
        if !self.dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(self.io("create directory", &self.dir))?;
        }
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(self.io("open lock", &path))?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(fs::TryLockError::WouldBlock) if start.elapsed() < LOCK_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(StateError::LockTimeout {
                        path,
                        secs: LOCK_TIMEOUT.as_secs(),
                    })
                }
                Err(fs::TryLockError::Error(e)) => return Err(self.io("lock", &path)(e)),
            }
        }
    }

    /// Reads the file, refusing it when group or others can access it (it holds keys).
    fn read_private(&self, path: &Path) -> Result<Option<Vec<u8>>, StateError> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("read", path)(e)),
        };
        let mode = file
            .metadata()
            .map_err(self.io("stat", path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(StateError::InsecurePermissions {
                path: path.to_owned(),
                mode,
            });
        }
        self.warn_on_open_dir();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(self.io("read", path))?;
        Ok(Some(bytes))
    }

    fn warn_on_open_dir(&self) {
        let Ok(meta) = fs::metadata(&self.dir) else {
            return;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 && !self.warned_dir_mode.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                dir = %self.dir.display(),
                mode = format!("{mode:04o}"),
                "the CA state directory is accessible to group or others; make it 0700 (chmod 700)"
            );
        }
    }

    fn read(&self) -> Result<Option<Versioned>, StateError> {
        let path = self.state_path();
        let Some(bytes) = self.read_private(&path)? else {
            return Ok(None);
        };
        envelope::decode(&bytes, &path).map(Some)
    }

    fn remove_stale_temps(&self) {
        let prefix = temp_prefix(&self.state_path());
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&prefix))
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    fn write(
        &self,
        expected: Option<Generation>,
        state: &CaState,
        crash: CrashPoint,
    ) -> Result<Generation, StateError> {
        state.validate()?;
        let _lock = self.lock()?;
        let found = self.read()?.map(|v| v.generation);
        if found != expected {
            return Err(StateError::Conflict { expected, found });
        }
        self.remove_stale_temps();
        let generation = match (crash, found) {
            (CrashPoint::KeepGeneration(g), None) => g.0,
            (_, found) => found.map_or(1, |g| g.0 + 1),
        };
        let bytes = envelope::encode(state, generation)?;
        let path = self.state_path();
        let tmp = write_temp(&path, &bytes, 0o600)?;
        let committed = match crash {
            CrashPoint::BeforeRename => {
                // A crash leaves the temp file; the next write sweeps it.
                return Err(StateError::Invalid("simulated crash before rename".into()));
            }
            CrashPoint::RenameFails => Err(self.io("rename", &path)(std::io::Error::other(
                "simulated rename failure",
            ))),
            CrashPoint::None | CrashPoint::KeepGeneration(_) => commit_temp(&tmp, &path),
        };
        // A failed write must not leave a key-bearing temp file behind.
        committed.inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        Ok(Generation(generation))
    }
}

impl StateStore for DirStore {
    fn load(&self) -> Result<Option<Versioned>, StateError> {
        self.read()
    }

    /// Every write renames a new file over the state file, which is watched.
    fn on_change(
        &self,
        wake: tokio::sync::mpsc::Sender<()>,
    ) -> Result<Option<ChangeWatch>, StateError> {
        let path = self.state_path();
        crate::fswatch::watch_file(&path, wake)
            .map(|w| Some(ChangeWatch::new(w)))
            .map_err(|e| StateError::Io {
                op: "watching",
                path,
                error: std::io::Error::other(e),
            })
    }

    fn compare_and_swap(
        &self,
        expected: Option<Generation>,
        state: &CaState,
    ) -> Result<Generation, StateError> {
        self.write(expected, state, CrashPoint::None)
    }

    fn create_migrated(&self, from: &Versioned) -> Result<Generation, StateError> {
        self.write(
            None,
            &from.state,
            CrashPoint::KeepGeneration(from.generation),
        )
    }

    fn location(&self) -> String {
        self.dir.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::{
        ca::{root, KeyType},
        spiffe::TrustDomain,
    };

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn sample_state() -> CaState {
        let td = TrustDomain::new("example.org").unwrap();
        let now = time::OffsetDateTime::now_utc();
        let ca = root::generate_root(&td, KeyType::EcdsaP256, root::DEFAULT_ROOT_TTL, now).unwrap();
        CaState::with_generated_root(td, &ca, now)
    }

    #[test]
    fn round_trips_with_0600_file_and_0700_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::new(tmp.path().join("state"));
        assert!(store.load().unwrap().is_none());
        let state = sample_state();
        assert_eq!(store.compare_and_swap(None, &state).unwrap(), Generation(1));
        let v = store.load().unwrap().unwrap();
        assert_eq!((v.generation, &v.state), (Generation(1), &state));
        assert_eq!(mode_of(&store.state_path()), 0o600);
        assert_eq!(mode_of(&tmp.path().join("state")), 0o700);
    }

    #[test]
    fn crash_before_rename_leaves_previous_state_readable() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::new(tmp.path());
        let first = sample_state();
        store.compare_and_swap(None, &first).unwrap();
        let second = sample_state();
        let err = store
            .write(Some(Generation(1)), &second, CrashPoint::BeforeRename)
            .unwrap_err();
        assert!(err.to_string().contains("simulated crash"));
        // The temp file is still there, as after a real crash, and the old state reads fine.
        let leftovers = fs::read_dir(tmp.path()).unwrap().filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".state.json.tmp.")
        });
        assert_eq!(leftovers.count(), 1);
        let v = store.load().unwrap().unwrap();
        assert_eq!((v.generation, &v.state), (Generation(1), &first));
        // The next write succeeds and sweeps the leftover.
        assert_eq!(
            store
                .compare_and_swap(Some(Generation(1)), &second)
                .unwrap(),
            Generation(2)
        );
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            names.iter().all(|n| !n.to_string_lossy().contains(".tmp.")),
            "{names:?}"
        );
    }

    #[test]
    fn torn_and_tampered_files_are_reported_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::new(tmp.path());
        store.compare_and_swap(None, &sample_state()).unwrap();
        let path = store.state_path();
        let good = fs::read(&path).unwrap();

        fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(matches!(
            store.load().unwrap_err(),
            StateError::Corrupted { .. }
        ));
        let err = store
            .compare_and_swap(Some(Generation(1)), &sample_state())
            .unwrap_err();
        assert!(matches!(err, StateError::Corrupted { .. }), "{err}");
        assert_eq!(
            fs::read(&path).unwrap(),
            &good[..good.len() / 2],
            "corrupted file left untouched"
        );

        let tampered =
            String::from_utf8(good)
                .unwrap()
                .replacen("\"generation\":1", "\"generation\":7", 1);
        fs::write(&path, tampered).unwrap();
        let err = store.load().unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn concurrent_writers_one_wins_other_conflicts() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::new(tmp.path());
        store.compare_and_swap(None, &sample_state()).unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (store, barrier) = (store.clone(), barrier.clone());
                let state = sample_state();
                std::thread::spawn(move || {
                    let seen = store.load().unwrap().unwrap().generation;
                    barrier.wait();
                    store.compare_and_swap(Some(seen), &state)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "{results:?}");
        let err = results.into_iter().find_map(Result::err).unwrap();
        match err {
            StateError::Conflict { expected, found } => {
                assert_eq!(
                    (expected, found),
                    (Some(Generation(1)), Some(Generation(2)))
                )
            }
            other => panic!("expected a conflict, got {other}"),
        }
        assert_eq!(store.load().unwrap().unwrap().generation, Generation(2));
    }

    fn temp_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect()
    }

    /// Issue 8 item 9: a failed write (the rename fails) used to leave the temp file, which
    /// holds every private key, until the next successful write.
    #[test]
    fn failed_write_removes_its_key_bearing_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::new(tmp.path());
        let first = sample_state();
        store.compare_and_swap(None, &first).unwrap();
        let err = store
            .write(
                Some(Generation(1)),
                &sample_state(),
                CrashPoint::RenameFails,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("simulated rename failure"),
            "{err}"
        );
        assert_eq!(temp_files(tmp.path()), Vec::<String>::new());
        let v = store.load().unwrap().unwrap();
        assert_eq!((v.generation, &v.state), (Generation(1), &first));
    }

    /// Issue 8 item 9: a state file group or others can read is refused (it holds keys),
    /// naming the file, its mode and the fix; an open directory only warns.
    #[test]
    fn state_file_accessible_to_others_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::new(tmp.path());
        store.compare_and_swap(None, &sample_state()).unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(
            store.load().unwrap().is_some(),
            "an open directory is a warning only"
        );
        for mode in [0o640, 0o604, 0o660] {
            fs::set_permissions(store.state_path(), fs::Permissions::from_mode(mode)).unwrap();
            let err = store.load().unwrap_err();
            assert!(
                matches!(err, StateError::InsecurePermissions { mode: m, .. } if m == mode),
                "{err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("chmod 600") && msg.contains("state.json"),
                "{msg}"
            );
            let err = store
                .compare_and_swap(Some(Generation(1)), &sample_state())
                .unwrap_err();
            assert!(
                matches!(err, StateError::InsecurePermissions { .. }),
                "{err}"
            );
        }
        fs::set_permissions(store.state_path(), fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(store.load().unwrap().unwrap().generation, Generation(1));
    }

    #[test]
    fn invalid_state_is_not_written() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::new(tmp.path());
        let mut state = sample_state();
        state.roots[0].private_key = None;
        assert!(matches!(
            store.compare_and_swap(None, &state).unwrap_err(),
            StateError::Invalid(_)
        ));
        assert!(!store.state_path().exists());
    }
}
