//! Fault injection (issue 24): `kill -9` of the CLI while it writes the state and of the server
//! while it issues, rotates and stores federated bundles, each at many points; a full disk and a
//! read-only state directory; the clock jumping forward and back. After every fault the state
//! is intact (it parses, its checksum holds, its generation never goes back) and service
//! resumes by itself. The API server slow, erroring, answering 409s, restarting and gone are
//! tested on a real kube-apiserver by `tools/kube-tests.sh` (see the README's fault table).

use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use meshid::{
    clock::{Clock, ManualClock},
    state::{DirStore, RootState, StateStore},
};
use serde_json::Value;

use crate::{
    server_support::{sds_req, secrets, tls_cert, TestServer},
    support::{meshid, ok},
};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshid")
}

/// A deterministic spread of kill points: `i`-th delay in 0..`max_ms`.
fn delay(i: u64, max_ms: u64) -> Duration {
    Duration::from_millis((i * 7919 + 13) % max_ms.max(1))
}

fn kill9(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// `root status --output json` of `state`: must always succeed, whatever was killed when.
fn status(state: &Path) -> Value {
    let out = meshid(&[
        "root",
        "status",
        "--state-dir",
        state.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "the state no longer reads after a kill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn roots_in(j: &Value, state: &str) -> Vec<String> {
    j["roots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == state)
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A `meshid server` process on loopback ports; killed (-9) when dropped.
struct Proc {
    child: Child,
    http: String,
    grpc: String,
    bundle: Option<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        kill9(&mut self.child);
    }
}

fn spawn_server(args: &[&str], log: &Path) -> Proc {
    spawn_server_with(args, log, false)
}

/// As `spawn_server`; `bundle_endpoint`: the config has one, whose address line follows.
fn spawn_server_with(args: &[&str], log: &Path, bundle_endpoint: bool) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = Command::new(bin())
        .arg("server")
        .args(args)
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        line.contains("gRPC (TLS) on"),
        "server did not start: {line:?}"
    );
    let grpc = line
        .split("on ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap()
        .trim()
        .to_owned();
    let http = line.split("HTTP on ").nth(1).unwrap().trim().to_owned();
    let mut bundle = None;
    let mut next = String::new();
    // The bundle endpoint's line follows at once when there is one.
    if bundle_endpoint {
        out.read_line(&mut next).unwrap();
        bundle = next
            .split("(HTTPS) on ")
            .nth(1)
            .map(|s| s.trim().to_owned());
    }
    std::thread::spawn(move || {
        let mut sink = String::new();
        while out.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    Proc {
        child,
        http,
        grpc,
        bundle,
    }
}

/// GET `path` on `addr`; the body of a 200.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200")
        .then(|| out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()))
        .flatten()
}

fn until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A CSR through the CLI against `grpc`, verified with `root`: whether a certificate came back.
fn cert_request(grpc: &str, root: &Path, token: &Path, out: &Path) -> bool {
    meshid(&[
        "cert",
        "request",
        "--server",
        &format!("https://{grpc}"),
        "--ca-file",
        root.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
    ])
    .status
    .success()
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(td: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let s = Self { dir };
        ok(&meshid(&[
            "ca",
            "init",
            "--trust-domain",
            td,
            "--state-dir",
            s.p("state").to_str().unwrap(),
        ]));
        ok(&meshid(&[
            "dev",
            "issuer",
            "init",
            "--dir",
            s.p("issuer").to_str().unwrap(),
        ]));
        let token = ok(&meshid(&[
            "dev",
            "token",
            "--issuer-dir",
            s.p("issuer").to_str().unwrap(),
            "--namespace",
            "shop",
            "--service-account",
            "product-service",
            "--ttl",
            "24h",
        ]));
        std::fs::write(s.p("token"), token.trim()).unwrap();
        s
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn state(&self) -> String {
        self.p("state").to_str().unwrap().to_owned()
    }

    /// Every root the state trusts, as PEM, for clients.
    fn bundle_pem(&self) -> PathBuf {
        let pem = ok(&meshid(&[
            "bundle",
            "export",
            "--state-dir",
            &self.state(),
            "--format",
            "pem",
        ]));
        let f = self.p("bundle.pem");
        std::fs::write(&f, pem).unwrap();
        f
    }
}

/// `kill -9` of the CLI at 40 points while it prepares or withdraws a root (key generation,
/// the journal entry, the atomic write). Every time the state still reads, its generation
/// never goes back, at most one root is prepared, and the next command works; both outcomes
/// (killed before and after the write) occur, so kills landed on both sides of it.
#[test]
fn kill_9_of_the_cli_while_it_writes_the_state() {
    let s = Setup::new("cluster.local");
    let state = s.state();
    // Kill points spread over 1.5 times what an uninterrupted write takes on this machine, so
    // some land before the write and some after it, however fast or slow the machine is.
    let t = Instant::now();
    ok(&meshid(&["root", "prepare", "--state-dir", &state]));
    let span_ms = (t.elapsed().as_millis() as u64 * 3 / 2).max(5);
    let prepared = roots_in(&status(&s.p("state")), "prepared");
    ok(&meshid(&[
        "root",
        "revoke",
        &prepared[0],
        "--state-dir",
        &state,
    ]));
    let mut generation = status(&s.p("state"))["generation"].as_u64().unwrap();
    let (mut before_write, mut after_write) = (0, 0);
    for i in 0..40u64 {
        let prepared = roots_in(&status(&s.p("state")), "prepared");
        let args: Vec<String> = match prepared.first() {
            None => vec![
                "root".into(),
                "prepare".into(),
                "--state-dir".into(),
                state.clone(),
            ],
            Some(id) => vec![
                "root".into(),
                "revoke".into(),
                id.clone(),
                "--state-dir".into(),
                state.clone(),
            ],
        };
        let mut child = Command::new(bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay(i, span_ms));
        kill9(&mut child);
        let j = status(&s.p("state"));
        let g = j["generation"].as_u64().unwrap();
        assert!(g >= generation, "generation went back: {generation} -> {g}");
        if g > generation {
            after_write += 1;
        } else {
            before_write += 1;
        }
        generation = g;
        assert!(roots_in(&j, "prepared").len() <= 1);
        assert_eq!(roots_in(&j, "active").len(), 1, "exactly one active root");
    }
    // The state takes the next write at once (no stale lock, no leftover that blocks it).
    let j = status(&s.p("state"));
    if let Some(id) = roots_in(&j, "prepared").first() {
        ok(&meshid(&["root", "revoke", id, "--state-dir", &state]));
    }
    ok(&meshid(&["root", "prepare", "--state-dir", &state]));
    assert!(
        before_write > 0 && after_write > 0,
        "kills landed before the write {before_write} times and after it {after_write} times"
    );
}

/// `kill -9` of the server, at 8 points, while it issues certificates and the CLI rotates its
/// root: restarted on the same state it serves at once, from the state's current generation,
/// and the rotation the CLI wrote in between is in force.
#[test]
fn kill_9_of_the_server_during_issuance_and_rotation() {
    let s = Setup::new("cluster.local");
    let state = s.state();
    let issuer = s.p("issuer").to_str().unwrap().to_owned();
    let args = ["--state-dir", &state, "--dev-issuer-dir", &issuer];
    let log = s.p("server.log");
    for i in 0..8u64 {
        let server = spawn_server(&args, &log);
        until("ready", Duration::from_secs(20), || {
            http_get(&server.http, "/readyz")
        });
        let root = s.bundle_pem();
        // Load: CSRs in a loop on another thread, and a rotation step from the CLI.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (grpc, token, out) = (server.grpc.clone(), s.p("token"), s.p(&format!("out-{i}")));
        let loader = {
            let (stop, root) = (stop.clone(), root.clone());
            std::thread::spawn(move || {
                let mut served = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    served += usize::from(cert_request(&grpc, &root, &token, &out));
                }
                served
            })
        };
        let j = status(&s.p("state"));
        let step: Vec<String> = match (
            roots_in(&j, "prepared").first(),
            roots_in(&j, "old").first(),
        ) {
            (Some(p), _) => vec!["activate".into(), p.clone()],
            (None, Some(o)) => vec!["taint".into(), o.clone()],
            (None, None) => match roots_in(&j, "tainted").first() {
                Some(t) => vec!["revoke".into(), t.clone(), "--force".into()],
                None => vec!["prepare".into()],
            },
        };
        let mut cli = vec!["root".to_owned()];
        cli.extend(step);
        cli.extend(["--state-dir".into(), state.clone()]);
        ok(&meshid(&cli.iter().map(String::as_str).collect::<Vec<_>>()));
        std::thread::sleep(Duration::from_millis(100) + delay(i, 400));
        drop(server); // kill -9, mid-load
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = loader.join().unwrap();

        // Restarted on the same state: serves at once, from the generation on disk.
        let server = spawn_server(&args, &log);
        let want = status(&s.p("state"))["generation"].as_u64().unwrap();
        until("ready after the kill", Duration::from_secs(20), || {
            http_get(&server.http, "/readyz")
        });
        let generation = until(
            "the state's generation in service",
            Duration::from_secs(20),
            || {
                let st: Value =
                    serde_json::from_str(&http_get(&server.http, "/debug/rotation")?).ok()?;
                (st["generation"].as_u64()? == want).then_some(want)
            },
        );
        assert_eq!(generation, want);
        let root = s.bundle_pem();
        assert!(
            cert_request(&server.grpc, &root, &s.p("token"), &s.p("after")),
            "round {i}: no certificate after the restart; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

/// `kill -9` of a server at 6 points while it fetches and stores a federated peer's bundle
/// (the peer's roots change each round): restarted, its state reads, the peer's bundle it holds
/// is one the peer published, and it catches up with the peer's current roots by itself.
#[test]
fn kill_9_of_the_server_while_it_stores_federated_bundles() {
    let a = Setup::new("a.example");
    let b = Setup::new("b.example");
    let b_cfg = b.p("b.toml");
    std::fs::write(
        &b_cfg,
        format!(
            "state_dir = {:?}\nstate_poll_interval = \"200ms\"\n[federation.bundle_endpoint]\nlisten = \"127.0.0.1:0\"\nprofile = \"https_spiffe\"\n",
            b.p("state")
        ),
    )
    .unwrap();
    let b_server = spawn_server_with(
        &[
            "--config",
            b_cfg.to_str().unwrap(),
            "--dev-issuer-dir",
            b.p("issuer").to_str().unwrap(),
        ],
        &b.p("server.log"),
        true,
    );
    let endpoint = b_server
        .bundle
        .clone()
        .expect("b's bundle endpoint address");
    // The https_spiffe bootstrap: b's bundle set in a's state by hand.
    let bundle = ok(&meshid(&["bundle", "export", "--state-dir", &b.state()]));
    std::fs::write(a.p("b.json"), bundle).unwrap();
    ok(&meshid(&[
        "bundle",
        "set",
        "b.example",
        a.p("b.json").to_str().unwrap(),
        "--state-dir",
        &a.state(),
    ]));
    let a_cfg = a.p("a.toml");
    std::fs::write(
        &a_cfg,
        format!(
            "state_dir = {:?}\nstate_poll_interval = \"200ms\"\n[[federation.peers]]\ntrust_domain = \"b.example\"\nurl = \"https://{endpoint}/\"\nprofile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://b.example/ns/istio-system/sa/meshid\"\n",
            a.p("state")
        ),
    )
    .unwrap();
    let a_issuer = a.p("issuer").to_str().unwrap().to_owned();
    let a_args = [
        "--config",
        a_cfg.to_str().unwrap(),
        "--dev-issuer-dir",
        &a_issuer,
    ];
    let b_roots = |j: &Value| j["federation"]["b.example"]["roots"].as_u64().unwrap_or(0);
    for i in 0..6u64 {
        // b's bundle changes: a root prepared (2 roots) or withdrawn (1 root).
        let bj = status(&b.p("state"));
        match roots_in(&bj, "prepared").first() {
            Some(p) => ok(&meshid(&["root", "revoke", p, "--state-dir", &b.state()])),
            None => ok(&meshid(&["root", "prepare", "--state-dir", &b.state()])),
        };
        let want = roots_in(&status(&b.p("state")), "prepared").len() as u64 + 1;
        // b serves it once it has re-read its state.
        std::thread::sleep(Duration::from_millis(400));
        let server = spawn_server(&a_args, &a.p("server.log"));
        ok(&meshid(&[
            "bundle",
            "refresh",
            "b.example",
            "--config",
            a_cfg.to_str().unwrap(),
        ]));
        std::thread::sleep(delay(i, 600));
        drop(server); // kill -9, maybe mid-fetch or mid-write
        let j = status(&a.p("state"));
        let held = b_roots(&j);
        assert!(
            held == 1 || held == 2,
            "round {i}: a holds {held} roots of b"
        );
        // Restarted, a catches up with b by itself (its first poll at start).
        let server = spawn_server(&a_args, &a.p("server.log"));
        until(
            "a holds b's current bundle",
            Duration::from_secs(30),
            || (b_roots(&status(&a.p("state"))) == want).then_some(()),
        );
        drop(server);
    }
    drop(b_server);
}

/// A shell inside a mount namespace of its own (root and `unshare` needed, as for the interop
/// part), where a small tmpfs can fill up and be remounted read-only.
fn in_mount_namespace(script: &str, dir: &Path) -> std::process::Output {
    let is_root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    assert!(
        is_root,
        "the full-disk and read-only tests mount a tmpfs in a mount namespace of their own: run the tests as root (as CI does; the interop part needs it too)"
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", script])
        .env("MESHID", bin())
        .current_dir(dir)
        .output()
        .expect("unshare (util-linux) is needed by the full-disk and read-only tests");
    out
}

/// A full disk and a read-only state directory: the write that cannot happen fails naming why,
/// the state is unchanged and still reads, a server on it keeps serving; space back, writes
/// work again.
#[test]
fn a_full_disk_and_a_read_only_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
set -u
m="$MESHID"
mkdir -p mnt
mount -t tmpfs -o size=512k tmpfs mnt
"$m" ca init --trust-domain cluster.local --state-dir mnt/state >/dev/null
"$m" dev issuer init --dir issuer >/dev/null
gen() { "$m" root status --state-dir mnt/state --output json | sed -n 's/^  "generation": \([0-9]*\),/\1/p'; }
echo "gen0=$(gen)"
dd if=/dev/zero of=mnt/fill bs=4k >/dev/null 2>&1
"$m" root prepare --state-dir mnt/state >/dev/null 2>full.err; echo "full_rc=$?"
echo "gen1=$(gen)"
echo "full_err=$(head -c 400 full.err)"
ls mnt/state | tr '\n' ' ' | sed 's/^/files=/'; echo
rm mnt/fill
"$m" root prepare --state-dir mnt/state >/dev/null 2>&1; echo "spaced_rc=$?"
echo "gen2=$(gen)"
mount -o remount,ro mnt
id=$("$m" root status --state-dir mnt/state --output json | sed -n 's/.*"next_step": "meshid root activate \([0-9a-f]*\).*/\1/p')
"$m" root activate "$id" --state-dir mnt/state >/dev/null 2>ro.err; echo "ro_rc=$?"
echo "ro_err=$(head -c 400 ro.err)"
echo "gen3=$(gen)"
"$m" server --state-dir mnt/state --dev-issuer-dir issuer --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >server.out 2>server.log &
for _ in $(seq 1 100); do grep -q "HTTP on" server.out 2>/dev/null && break; sleep 0.1; done
http=$(sed -n 's/.*HTTP on \(.*\)$/\1/p' server.out)
ready=no
for _ in $(seq 1 100); do if curl -fs "http://$http/readyz" >/dev/null 2>&1; then ready=yes; break; fi; sleep 0.1; done
echo "ro_server_ready=$ready"
kill %1 2>/dev/null; wait 2>/dev/null
umount mnt
"#;
    let out = in_mount_namespace(script, dir.path());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| {
                panic!(
                    "{k} missing:\n{text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .to_owned()
    };
    let g0: u64 = field("gen0").parse().unwrap();
    assert_ne!(
        field("full_rc"),
        "0",
        "a write to a full disk must fail:\n{text}"
    );
    assert!(
        field("full_err").contains("No space left on device"),
        "the error names the cause:\n{text}"
    );
    assert_eq!(
        field("gen1").parse::<u64>().unwrap(),
        g0,
        "the state is unchanged"
    );
    assert!(
        !field("files").contains(".tmp"),
        "no temp file left behind: {text}"
    );
    assert_eq!(
        field("spaced_rc"),
        "0",
        "with space back, writes work:\n{text}"
    );
    assert_eq!(field("gen2").parse::<u64>().unwrap(), g0 + 1);
    assert_ne!(
        field("ro_rc"),
        "0",
        "a write to a read-only directory must fail"
    );
    assert!(
        field("ro_err").contains("Read-only file system"),
        "the error names the cause:\n{text}"
    );
    assert_eq!(field("gen3").parse::<u64>().unwrap(), g0 + 1);
    assert_eq!(
        field("ro_server_ready"),
        "yes",
        "a server serves from a read-only state:\n{text}"
    );
}

/// The clock jumping forward and back under a running server (its injected clock): forward past
/// a leaf's refresh point, the stream gets a new leaf valid at the new time; back by a day, the
/// server neither panics nor spins re-issuing, and a new stream gets a leaf valid now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_jumping_forward_and_back() {
    let t0 = time::OffsetDateTime::now_utc();
    let clock = Arc::new(ManualClock::new(t0));
    // Streams live 6 h here, so the jump forward meets a leaf's refresh, not the stream's age.
    let server = TestServer::start_with(clock.clone(), |c| {
        c.limits.max_stream_age = Duration::from_secs(6 * 3600);
    })
    .await;
    // One TLS connection for the whole test: the client verifies meshid's serving certificate
    // against the real time, the server issues on its injected one.
    let channel = server.channel().await;
    let open = |token: String| {
        let channel = channel.clone();
        async move {
            use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let mut c = SecretDiscoveryServiceClient::with_interceptor(
                channel,
                crate::server_support::bearer(Some(token)),
            );
            let stream = c
                .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            (tx, stream)
        }
    };
    let (tx, mut s) = open(server.token_for("shop", "a", Duration::from_secs(48 * 3600))).await;
    tx.send(sds_req(&["default"], "", "")).await.unwrap();
    let r = next(&mut s).await;
    let first = tls_cert(&secrets(&r)[0]).0;
    tx.send(sds_req(&["default"], &r.nonce, &r.version_info))
        .await
        .unwrap();
    // Forward 40 minutes: past half of the default 1 h lifetime, a new leaf is pushed.
    clock.advance(Duration::from_secs(40 * 60));
    let r = next(&mut s).await;
    let second = tls_cert(&secrets(&r)[0]).0;
    assert_ne!(first, second, "a new leaf after the jump forward");
    let nb = crate::support::leaf_not_before(&second);
    assert!(nb <= clock.now() && clock.now() - nb < time::Duration::minutes(5));
    tx.send(sds_req(&["default"], &r.nonce, &r.version_info))
        .await
        .unwrap();
    // Back a day: the leaf held is not valid yet at the new time (its notBefore is 40 min
    // ahead), so it is replaced at once by one valid now, once: no renewal loop.
    clock.set(t0 - Duration::from_secs(86_400));
    let r = next(&mut s).await;
    let third = tls_cert(&secrets(&r)[0]).0;
    let nb = crate::support::leaf_not_before(&third);
    assert!(
        nb <= clock.now(),
        "the replacement is valid at the server's new now"
    );
    tx.send(sds_req(&["default"], &r.nonce, &r.version_info))
        .await
        .unwrap();
    let mut pushes = 0;
    let quiet_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < quiet_until {
        if let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_millis(200), s.message()).await
        {
            pushes += 1;
            tx.send(sds_req(&["default"], &r.nonce, &r.version_info))
                .await
                .unwrap();
        }
    }
    assert_eq!(
        pushes, 0,
        "{pushes} more pushes in 2 s after the clock went back: a renewal loop"
    );
    // A new stream, with a token minted at the new time, gets a leaf valid now.
    let (tx2, mut s2) = open(server.token_for("shop", "b", Duration::from_secs(3600))).await;
    tx2.send(sds_req(&["default"], "", "")).await.unwrap();
    let leaf = tls_cert(&secrets(&next(&mut s2).await)[0]).0;
    assert!(crate::support::leaf_not_before(&leaf) <= clock.now());
    // The state was never written by the jumps, and still reads.
    let st = DirStore::new(server.state_dir()).load_existing().unwrap();
    assert_eq!(
        st.state
            .roots
            .iter()
            .filter(|r| r.state == RootState::Active)
            .count(),
        1
    );
    server.running.shutdown().await;
}

type Responses =
    tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>;

/// The next response of an open stream, within 10 s.
async fn next(
    s: &mut Responses,
) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a response within 10 s")
        .unwrap()
        .expect("the stream is open")
}
