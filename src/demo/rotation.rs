//! Step 4: a root rotation (prepare → activate → taint → revoke) through the library
//! transitions on the demo's state, with product → inventory mTLS traffic every 20 ms; each
//! phase waits on what the sidecars received over SDS, and handshakes and failures are counted.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::watch;

use super::{
    outcome::{active_root, expect, show, RotationCheck, INVENTORY},
    sidecar::{anchor_id, Sidecar, Transport},
    world::{World, WAIT},
    DemoError, ProxyState,
};
use crate::{
    ca::{root, DEFAULT_MAX_TTL},
    clock::{Clock, SystemClock},
    rotation::{self, Candidate, Ctx},
    state::{Actor, DirStore, StateStore},
};

#[derive(Default)]
struct Traffic {
    phase: AtomicUsize,
    handshakes: Mutex<Vec<u64>>,
    failures: Mutex<Vec<String>>,
    by_roots: Mutex<BTreeMap<(String, String), u64>>,
    stop: AtomicBool,
}

async fn traffic_loop(w_product: Sidecar, t: Arc<Traffic>, count: watch::Sender<u64>) {
    let mut n = 0u64;
    while !t.stop.load(Ordering::Acquire) {
        n += 1;
        let payload = format!("request {n} during rotation");
        let phase = t.phase.load(Ordering::Acquire);
        match w_product
            .call(INVENTORY.0, INVENTORY.1, payload.as_bytes())
            .await
        {
            Ok(c) if c.transport == Transport::Mtls => {
                {
                    let mut h = t.handshakes.lock().unwrap_or_else(|e| e.into_inner());
                    if h.len() <= phase {
                        h.resize(phase + 1, 0);
                    }
                    h[phase] += 1;
                }
                let key = (show(&c.own_root), show(&c.peer_root));
                *t.by_roots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(key)
                    .or_default() += 1;
                count.send_modify(|x| *x += 1);
            }
            Ok(c) => t
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("request {n}: {:?} instead of mTLS", c.transport)),
            Err(e) => t
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("request {n}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_sidecars(
    w: &World,
    what: &str,
    pred: impl Fn(&ProxyState) -> bool,
) -> Result<(), DemoError> {
    for s in [&w.product, &w.inventory] {
        let mut rx = s.watch();
        if tokio::time::timeout(WAIT, rx.wait_for(|st| pred(st)))
            .await
            .is_err()
        {
            return Err(DemoError::Timeout {
                what: format!("the {} sidecar: {what}", s.name),
                secs: WAIT.as_secs(),
            });
        }
    }
    Ok(())
}

async fn wait_handshakes(count: &mut watch::Receiver<u64>, more: u64) -> Result<(), DemoError> {
    let target = *count.borrow() + more;
    match tokio::time::timeout(WAIT, count.wait_for(|c| *c >= target)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(DemoError::Timeout {
            what: format!("{more} more mTLS handshakes"),
            secs: WAIT.as_secs(),
        }),
    }
}

fn leaf_root(st: &ProxyState) -> Option<String> {
    st.default
        .as_ref()
        .and_then(|d| anchor_id(&d.chain, &st.roots))
}

fn has_root(st: &ProxyState, id: &str) -> bool {
    st.roots
        .iter()
        .any(|r| crate::ca::cert::fingerprint_id(r) == id)
}

pub(super) async fn step4(w: &World) -> Result<RotationCheck, DemoError> {
    let t = Arc::new(Traffic::default());
    let (count_tx, mut count) = watch::channel(0u64);
    let task = tokio::spawn(traffic_loop(w.product.clone(), t.clone(), count_tx));
    let result = rotate(w, &t, &mut count).await;
    t.stop.store(true, Ordering::Release);
    let _ = task.await;
    let mut check = result?;
    let names = ["before", "prepared", "activated", "tainted", "revoked"];
    let h = t
        .handshakes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    check.phases = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), h.get(i).copied().unwrap_or(0)))
        .collect();
    check.handshakes = h.iter().sum();
    check.failures = t.failures.lock().unwrap_or_else(|e| e.into_inner()).clone();
    check.by_roots = t.by_roots.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for ((client, server), n) in &check.by_roots {
        w.say(&format!(
            "    {n:>4} handshakes: client leaf from root {client}, server leaf from root {server}"
        ));
    }
    w.say(&format!(
        "    {} mTLS handshakes during the rotation ({}), {} failures",
        check.handshakes,
        check
            .phases
            .iter()
            .map(|(n, c)| format!("{n} {c}"))
            .collect::<Vec<_>>()
            .join(", "),
        check.failures.len()
    ));
    expect(
        check.failures.is_empty(),
        "no failed connection",
        check
            .failures
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("; "),
    )?;
    expect(
        check.phases.iter().all(|(_, c)| *c > 0),
        "handshakes in every phase",
        format!("{:?}", check.phases),
    )?;
    Ok(check)
}

async fn rotate(
    w: &World,
    t: &Traffic,
    count: &mut watch::Receiver<u64>,
) -> Result<RotationCheck, DemoError> {
    let store = DirStore::new(w.state_dir());
    let ctx = || {
        Ctx::new(
            Actor::user("meshid-demo", "localhost"),
            SystemClock.now(),
            Some("meshid demo".into()),
        )
        .map_err(|e| DemoError::conn("journal context", e))
    };
    let apply = |step: &dyn Fn(
        &crate::state::CaState,
        &Ctx,
    ) -> Result<rotation::Transition, rotation::RootError>| {
        rotation::apply(&store, &ctx()?, step).map_err(|e| DemoError::conn("root transition", e))
    };
    let old = active_root(w)?;
    wait_handshakes(count, 3).await?;

    let candidate = std::sync::Mutex::new(Some(new_root(w, &store)?));
    let prepared = apply(&|s, c| {
        let cand = candidate.lock().unwrap_or_else(|e| e.into_inner()).take();
        rotation::prepare(s, cand.expect("prepare runs once"), c)
    })?;
    let new_id = prepared.outcome.root.clone();
    t.phase.store(1, Ordering::Release);
    w.say(&format!(
        "    prepare: root {new_id} added to every bundle (trusted, not signing)"
    ));
    wait_sidecars(w, &format!("ROOTCA with the new root {new_id}"), |st| {
        has_root(st, &new_id)
    })
    .await?;
    w.say("      both sidecars received the new ROOTCA over SDS");
    wait_handshakes(count, 3).await?;

    apply(&|s, c| rotation::activate(s, &new_id, false, &rotation::no_gate, c))?;
    t.phase.store(2, Ordering::Release);
    w.say(&format!(
        "    activate: root {new_id} signs; {old} is old (still trusted)"
    ));
    wait_sidecars(w, &format!("a leaf from root {new_id}"), |st| {
        leaf_root(st).as_deref() == Some(new_id.as_str())
    })
    .await?;
    w.say("      both sidecars received leaves from the new root over SDS (spread over rotation.signer_change_spread)");
    wait_handshakes(count, 3).await?;

    apply(&|s, c| rotation::taint(s, &old, c))?;
    t.phase.store(3, Ordering::Release);
    w.say(&format!(
        "    taint: root {old} tainted; any leaf still from it is re-issued at once"
    ));
    wait_serving_root(w, &new_id).await?;
    w.say("      meshid's own serving certificate now comes from the new root");
    wait_handshakes(count, 3).await?;

    let revoked = apply(&|s, c| rotation::revoke(s, &old, true, DEFAULT_MAX_TTL, c))?;
    t.phase.store(4, Ordering::Release);
    w.say(&format!(
        "    revoke: root {old} left every bundle. Forced: in production wait for `meshid root status` to say it is safe (last issuance + issuance.max_ttl + 5m); here every leaf it anchored was just re-issued"
    ));
    wait_sidecars(w, &format!("ROOTCA without root {old}"), |st| {
        !has_root(st, &old) && has_root(st, &new_id)
    })
    .await?;
    w.say("      both sidecars received a ROOTCA without the old root");
    wait_handshakes(count, 5).await?;
    Ok(RotationCheck {
        old_root: old,
        new_root: new_id,
        forced_revoke_note: revoked.outcome.notes,
        ..Default::default()
    })
}

/// A new root of the state's key type, generated now.
fn new_root(w: &World, store: &DirStore) -> Result<Candidate, DemoError> {
    let current = store
        .load_existing()
        .map_err(|e| DemoError::conn("reading the CA state", e))?;
    let new = root::generate_root(
        &w.td,
        current.state.key_type,
        root::DEFAULT_ROOT_TTL,
        SystemClock.now(),
    )
    .map_err(|e| DemoError::conn("generating the new root", e))?;
    Ok(Candidate::Generated(new))
}

/// Waits until meshid serves a certificate anchored by `root` (a fresh TLS handshake that
/// trusts only the sidecars' current roots).
async fn wait_serving_root(w: &World, root: &str) -> Result<(), DemoError> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = String::from("no handshake");
    while tokio::time::Instant::now() < deadline {
        let roots = w.product.state().roots;
        match serving_root(w, roots).await {
            Ok(Some(r)) if r == root => return Ok(()),
            Ok(r) => seen = format!("anchored by {}", show(&r)),
            Err(e) => seen = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(DemoError::unexpected(
        format!(
            "meshid's serving certificate from root {root} within {}s",
            WAIT.as_secs()
        ),
        seen,
    ))
}

async fn serving_root(
    w: &World,
    roots: Vec<crate::ca::CertDer>,
) -> Result<Option<String>, DemoError> {
    let id = crate::spiffe::SpiffeId::for_service_account(&w.td, "istio-system", "meshid")
        .map_err(|e| DemoError::conn("meshid's id", e))?;
    let cfg = super::control::client_config(
        roots.clone(),
        crate::tls::PeerPolicy::Exact(id),
        None,
        vec![b"h2".to_vec()],
    )
    .map_err(|e| DemoError::conn("TLS config", e))?;
    let tcp = tokio::net::TcpStream::connect(w.grpc_addr)
        .await
        .map_err(|e| DemoError::conn("connecting to meshid", e))?;
    let name = rustls_pki_types::ServerName::try_from("localhost")
        .map_err(|e| DemoError::conn("SNI", e))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| DemoError::conn("handshake with meshid", e))?;
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    Ok(anchor_id(chain, &roots))
}
