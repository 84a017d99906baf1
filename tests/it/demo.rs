//! `meshid demo` in-process: every step's outcome is checked from what the sidecars, the apps
//! and the CA state recorded, not from the printed text.

use std::sync::{Arc, Mutex};

use meshid::{
    ca::cert::fingerprint_id,
    demo::{DemoError, DemoOptions, Progress, StepOutcome, Transport, World},
    state::{DirStore, RootState, StateStore},
};

fn collector() -> (Progress, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    let progress: Progress = Arc::new(move |s: &str| l.lock().unwrap().push(s.to_owned()));
    (progress, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_the_mixed_traffic_story_for_real() {
    let tmp = tempfile::tempdir().unwrap();
    let (progress, lines) = collector();
    let opts = DemoOptions {
        dir: Some(tmp.path().join("demo")),
    };
    let (world, results) = meshid::demo::run(opts, progress).await.unwrap();
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| {
            r.outcome
                .as_ref()
                .err()
                .map(|e| format!("step {}: {e}", r.number))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{failed:?}\n{}",
        lines.lock().unwrap().join("\n")
    );
    assert_eq!(
        results.iter().map(|r| r.number).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );

    let Ok(StepOutcome::Rotation(rot)) = &results[3].outcome else {
        panic!("step 4 is the rotation")
    };
    // 1: mTLS to the inventory sidecar's real listener; each side saw the other's SPIFFE ID;
    // both leaves came from the first root.
    let Ok(StepOutcome::Mtls(one)) = &results[0].outcome else {
        panic!("step 1 is mTLS")
    };
    assert_eq!(one.call.transport, Transport::Mtls);
    assert_eq!(one.call.endpoint, world.inventory.inbound_addr);
    assert_eq!(one.call.endpoint_tls_mode.as_deref(), Some("istio"));
    assert_eq!(one.call.peer_id.as_ref(), Some(&world.inventory.id));
    assert_eq!(one.inbound.peer_id.as_ref(), Some(&world.product.id));
    assert!(one.inbound.mtls);
    assert_eq!(one.call.own_root.as_deref(), Some(rot.old_root.as_str()));
    assert_eq!(one.call.peer_root.as_deref(), Some(rot.old_root.as_str()));
    assert!(one.call.echoed > 0);
    assert!(world
        .inventory_app
        .received()
        .iter()
        .all(|r| !r.looked_like_tls));

    // 2: plaintext straight to legacy-db's own port, no tlsMode, discovery's reason.
    let Ok(StepOutcome::Plaintext(two)) = &results[1].outcome else {
        panic!("step 2 is plaintext")
    };
    assert_eq!(two.call.transport, Transport::Plaintext);
    assert_eq!(two.call.endpoint, world.legacy_db.addr);
    assert_eq!(two.call.endpoint_tls_mode, None);
    assert!(two.call.why.contains("no sidecar"), "{}", two.call.why);
    assert!(!two.app_saw_tls);
    assert!(world
        .legacy_db
        .received()
        .iter()
        .any(|r| r.from == two.call.local && !r.looked_like_tls));

    // 3: the DestinationRule turns the next connection plaintext, and EDS serves the endpoint
    // without tlsMode (Istio `endpoints/mtls_checker.go` `checkMtlsEnabled`: a DestinationRule
    // mode other than ISTIO_MUTUAL clears it); removing it brings tlsMode and mTLS back. The
    // demo waits for each EDS push before it calls (it used to race the push).
    let Ok(StepOutcome::Troubleshoot(three)) = &results[2].outcome else {
        panic!("step 3 is the troubleshooting case")
    };
    assert_eq!(three.disabled.transport, Transport::Plaintext);
    assert_eq!(
        three.disabled.destination_rule.as_deref(),
        Some("inventory-tls-disable.shop")
    );
    assert_eq!(three.disabled.endpoint_tls_mode, None);
    assert_eq!(
        three.restored.call.endpoint_tls_mode.as_deref(),
        Some("istio")
    );
    assert!(
        three.disabled.why.contains("DISABLE"),
        "{}",
        three.disabled.why
    );
    assert!(!three.disabled_inbound.mtls);
    assert_eq!(three.restored.call.transport, Transport::Mtls);
    assert_eq!(three.restored.call.destination_rule, None);

    // 4: traffic in every phase, no failure, and the end state is real: the old root is revoked
    // in the store and gone from both sidecars' ROOTCA, and both leaves come from the new root.
    assert_ne!(rot.old_root, rot.new_root);
    assert!(rot.failures.is_empty(), "{:?}", rot.failures);
    assert_eq!(rot.phases.len(), 5);
    assert!(rot.phases.iter().all(|(_, n)| *n > 0), "{:?}", rot.phases);
    let state = DirStore::new(world.state_dir())
        .load_existing()
        .unwrap()
        .state;
    let by_id = |id: &str| state.roots.iter().find(|r| r.id == id).unwrap().state;
    assert_eq!(by_id(&rot.old_root), RootState::Revoked);
    assert_eq!(by_id(&rot.new_root), RootState::Active);
    for s in [&world.product, &world.inventory] {
        let st = s.state();
        let roots: Vec<String> = st.roots.iter().map(|r| fingerprint_id(r)).collect();
        assert_eq!(roots, vec![rot.new_root.to_string()], "{}", s.name);
        let chain = &st.default.as_ref().unwrap().chain;
        assert_eq!(
            meshid::demo::anchor_id(chain, &st.roots).as_deref(),
            Some(rot.new_root.as_str())
        );
    }
    // A leaf from the old root no longer verifies anywhere: the new handshakes used new leaves.
    assert!(rot
        .by_roots
        .keys()
        .any(|(c, s)| c == &rot.new_root && s == &rot.new_root));

    // 5: /metrics answered with issuance counted.
    let Ok(StepOutcome::Summary { metrics_lines }) = &results[4].outcome else {
        panic!("step 5 is the summary")
    };
    assert!(metrics_lines
        .iter()
        .any(|l| l.starts_with("meshid_certs_issued_total")));
    let text = lines.lock().unwrap().join("\n");
    assert!(text.contains("meshid root status --state-dir"), "{text}");
    // Issue 25: the README's sample output is what the demo prints: every line of it, in
    // order, with addresses, root IDs and counts masked.
    let printed: Vec<String> = lines
        .lock()
        .unwrap()
        .iter()
        .flat_map(|l| l.split('\n').map(mask).collect::<Vec<_>>())
        .collect();
    let mut at = 0;
    for want in readme_sample().iter().map(|l| mask(l)) {
        match printed[at..].iter().position(|p| *p == want) {
            Some(i) => at += i + 1,
            None => panic!(
                "the README's sample line\n  {want}\nis not printed by the demo (in this order); it printed:\n{}",
                printed.join("\n")
            ),
        }
    }
    world.shutdown().await;
}

#[tokio::test]
async fn the_demo_refuses_a_directory_that_is_not_empty() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("keep.txt"), "mine").unwrap();
    let (progress, _) = collector();
    let err = World::start(
        DemoOptions {
            dir: Some(tmp.path().to_path_buf()),
        },
        progress,
    )
    .await
    .err()
    .expect("refused");
    assert!(matches!(err, DemoError::Setup { .. }), "{err}");
    assert!(err.to_string().contains("not empty"), "{err}");
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "nothing was written");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("keep.txt")).unwrap(),
        "mine"
    );
}

/// `meshid demo --keep-running` (the binary): every step passes, it stays up, and SIGTERM stops
/// it with exit 0.
#[test]
fn the_demo_binary_keeps_running_until_sigterm() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meshid"))
        .args(["demo", "--keep-running", "--work-dir"])
        .arg(tmp.path().join("demo"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // A watchdog so a hung demo fails the test instead of hanging it; it stands down (and so
    // never signals a reused pid) once the child has been reaped.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let watchdog = std::thread::spawn(move || {
        for _ in 0..3000 {
            if d.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    });
    let mut seen = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.starts_with("still running") {
            let term = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .unwrap();
            assert!(term.success());
        }
    }
    let status = child.wait().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    let text = seen.join("\n");
    assert!(text.contains("meshid demo: every step passed"), "{text}");
    assert!(text.contains("SIGTERM received; stopping"), "{text}");
    assert!(status.success(), "{status:?}\n{text}");
}

/// The demo's sample output in the README's quick start.
fn readme_sample() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```text\n[1] ")
        .expect("the quick start's sample output")
        + 8;
    let end = start + readme[start..].find("```").unwrap();
    readme[start..end].lines().map(str::to_owned).collect()
}

/// A line with what differs between runs masked: hex IDs (8+ hex digits) and numbers.
fn mask(line: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.len() >= 8 && word.chars().all(|c| c.is_ascii_hexdigit()) {
            out.push('H');
        } else if !word.is_empty() && word.chars().all(|c| c.is_ascii_digit()) {
            out.push('N');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in line.trim_end().chars() {
        if c.is_ascii_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}
