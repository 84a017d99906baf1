//! Processes of the real cluster: started through `setpriv --pdeathsig KILL` from one thread
//! that lives as long as the test binary (a child's parent-death signal fires when the thread
//! that forked it ends), so they die with the test binary even when the shared cluster is never
//! dropped; stopped with SIGTERM, then SIGKILL.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Mutex, OnceLock},
    time::{Duration, Instant},
};

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from the keeper thread, which never exits before the test binary does: a
/// child's parent-death signal fires when the thread that forked it ends.
fn spawn_kept(cmd: Command) -> std::io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("kube-real-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("the keeper thread starts");
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .expect("the keeper thread is alive");
    answer.recv().expect("the keeper thread answers")
}

/// A started etcd or kube-apiserver; stopped on drop.
pub struct Proc {
    name: &'static str,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn start(name: &'static str, bin: &Path, args: &[String], log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = spawn_kept(cmd).unwrap_or_else(|e| {
            panic!(
                "cannot start {name} ({}) through setpriv (util-linux): {e}",
                bin.display()
            )
        });
        Self { name, child, log }
    }

    /// Panics with the log's tail if the process has exited.
    pub fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited ({status}) while starting; its log ({}) ends with:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 40)
            );
        }
    }

    /// SIGTERM, up to 10 s to exit, then SIGKILL; always reaped.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if term {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub const RUN_PREFIX: &str = "meshid-kube-real-";
pub const OWNER: &str = "owner.pid";

/// The shared cluster is never dropped (its processes die with the test binary), so its temp
/// dir stays: remove those whose test process is gone.
pub fn remove_dead_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let ours = e.file_name().to_string_lossy().starts_with(RUN_PREFIX);
        let owner = std::fs::read_to_string(path.join(OWNER)).ok();
        if let (true, Some(pid)) = (ours, owner) {
            if !Path::new("/proc").join(pid.trim()).exists() {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
