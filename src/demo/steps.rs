//! The demo's five steps. Each checks what happened (transports, SPIFFE IDs seen by both
//! peers, which root anchors each leaf, what the apps received, handshake counts) and returns
//! it, or what it expected and what it saw.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
};

use super::{
    apps::EchoApp,
    sidecar::{anchor_id, Call, Inbound, Sidecar, Transport},
    world::{with_destination_rule, World, WAIT},
    DemoError, ProxyState,
};
use crate::{
    ca::{root, DEFAULT_MAX_TTL},
    clock::{Clock, SystemClock},
    rotation::{self, Candidate, Ctx},
    state::{Actor, DirStore, StateStore},
};

const INVENTORY: (&str, u16) = ("inventory-service.shop", 8080);
const LEGACY: (&str, u16) = ("legacy-db.legacy", 5432);

/// product → inventory over mTLS, as both sidecars saw it.
#[derive(Clone, Debug)]
pub struct MtlsCheck {
    pub call: Call,
    pub inbound: Inbound,
}

/// A plaintext connection and what the receiving app saw.
#[derive(Clone, Debug)]
pub struct PlainCheck {
    pub call: Call,
    pub app_saw_tls: bool,
}

/// The DestinationRule DISABLE case and its undoing.
#[derive(Clone, Debug)]
pub struct TroubleshootCheck {
    pub disabled: Call,
    /// The inventory sidecar accepted the plaintext connection (PERMISSIVE).
    pub disabled_inbound: Inbound,
    pub restored: MtlsCheck,
}

/// The rotation under traffic.
#[derive(Clone, Debug, Default)]
pub struct RotationCheck {
    pub old_root: String,
    pub new_root: String,
    /// mTLS handshakes completed (and echoed) per phase, in order.
    pub phases: Vec<(String, u64)>,
    pub handshakes: u64,
    pub failures: Vec<String>,
    /// Handshakes by (client leaf root, server leaf root).
    pub by_roots: BTreeMap<(String, String), u64>,
    pub forced_revoke_note: Vec<String>,
}

/// What a step established.
#[derive(Clone, Debug)]
pub enum StepOutcome {
    Mtls(MtlsCheck),
    Plaintext(PlainCheck),
    Troubleshoot(Box<TroubleshootCheck>),
    Rotation(RotationCheck),
    Summary { metrics_lines: Vec<String> },
}

/// One step: its number, title, and outcome.
#[derive(Debug)]
pub struct StepResult {
    pub number: u8,
    pub title: &'static str,
    pub outcome: Result<StepOutcome, DemoError>,
}

impl StepResult {
    pub fn passed(&self) -> bool {
        self.outcome.is_ok()
    }
}

fn expect(ok: bool, expected: impl Into<String>, seen: impl Into<String>) -> Result<(), DemoError> {
    if ok {
        Ok(())
    } else {
        Err(DemoError::unexpected(expected, seen))
    }
}

fn show<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("none".into(), ToString::to_string)
}

/// Runs steps 1–5, printing as it goes. A failed step does not stop the next ones.
pub async fn run_steps(w: &World) -> Vec<StepResult> {
    let mut out = Vec::new();
    let mut step = |number, title, outcome: Result<StepOutcome, DemoError>| {
        match &outcome {
            Ok(_) => w.say(&format!("    ✔ step {number} passed")),
            Err(e) => w.say(&format!("    ✘ step {number} FAILED: {e}")),
        }
        out.push(StepResult {
            number,
            title,
            outcome,
        });
    };
    w.say("\n[1] product-service → inventory-service (both have sidecars)");
    step(
        1,
        "product → inventory: mTLS",
        step1(w).await.map(StepOutcome::Mtls),
    );
    w.say("\n[2] product-service → legacy-db (no sidecar)");
    step(
        2,
        "product → legacy-db: plaintext",
        step2(w).await.map(StepOutcome::Plaintext),
    );
    w.say("\n[3] troubleshooting: a DestinationRule forces DISABLE on inventory-service");
    step(
        3,
        "DestinationRule DISABLE, then removed",
        step3(w)
            .await
            .map(|c| StepOutcome::Troubleshoot(Box::new(c))),
    );
    w.say("\n[4] root rotation under continuous traffic: prepare → activate → taint → revoke");
    step(
        4,
        "root rotation, zero failures",
        step4(w).await.map(StepOutcome::Rotation),
    );
    w.say("\n[5] summary");
    let metrics = step5_metrics(w).await;
    for l in metrics.iter().flatten() {
        w.say(&format!("    {l}"));
    }
    step(
        5,
        "summary and metrics",
        metrics.map(|m| StepOutcome::Summary { metrics_lines: m }),
    );
    print_summary(w, &out);
    out
}

fn active_root(w: &World) -> Result<String, DemoError> {
    let v = DirStore::new(w.state_dir())
        .load_existing()
        .map_err(|e| DemoError::conn("reading the CA state", e))?;
    Ok(v.state
        .signing_root()
        .map_err(|e| DemoError::conn("the CA state", e))?
        .id
        .clone())
}

/// product → inventory must be mTLS, each side seeing the other's SPIFFE ID.
async fn mtls_once(w: &World, payload: &[u8]) -> Result<MtlsCheck, DemoError> {
    let call = w.product.call(INVENTORY.0, INVENTORY.1, payload).await?;
    expect(
        call.transport == Transport::Mtls,
        "mTLS",
        format!("{:?} ({})", call.transport, call.why),
    )?;
    expect(
        call.peer_id.as_ref() == Some(&w.inventory.id),
        format!("server {}", w.inventory.id),
        show(&call.peer_id),
    )?;
    let inbound = w.inventory.inbound_from(call.local).ok_or_else(|| {
        DemoError::unexpected(
            format!(
                "the inventory sidecar to have accepted the connection from {}",
                call.local
            ),
            "no record of it",
        )
    })?;
    expect(
        inbound.mtls,
        "the inventory sidecar to terminate mTLS",
        "plaintext",
    )?;
    expect(
        inbound.peer_id.as_ref() == Some(&w.product.id),
        format!("client {}", w.product.id),
        show(&inbound.peer_id),
    )?;
    expect(
        !w.inventory_app.received().iter().any(|r| r.looked_like_tls),
        "inventory-service's app to receive plaintext from its sidecar",
        "TLS records",
    )?;
    Ok(MtlsCheck { call, inbound })
}

async fn step1(w: &World) -> Result<MtlsCheck, DemoError> {
    let payload = b"GET /stock/sku-42 (product-service -> inventory-service)";
    let c = mtls_once(w, payload).await?;
    let active = active_root(w)?;
    expect(
        c.call.own_root.as_deref() == Some(active.as_str())
            && c.inbound.own_root.as_deref() == Some(active.as_str()),
        format!("both leaves from the active root {active}"),
        format!(
            "client {}, server {}",
            show(&c.call.own_root),
            show(&c.inbound.own_root)
        ),
    )?;
    w.say(&format!(
        "    EDS {}: endpoint {} has tlsMode={} → transport socket match tlsMode-istio",
        c.call.cluster,
        c.call.endpoint,
        c.call.endpoint_tls_mode.as_deref().unwrap_or("(absent)")
    ));
    w.say(&format!("    describe: {}", c.call.why));
    w.say(&format!(
        "    client {} (leaf from root {}) ⇄ server {} (leaf from root {})",
        show(&c.call.own_id),
        show(&c.call.own_root),
        show(&c.call.peer_id),
        show(&c.call.peer_root)
    ));
    w.say(&format!(
        "    the inventory sidecar verified its client as {}; {} bytes echoed by inventory-service's app",
        show(&c.inbound.peer_id),
        c.call.echoed
    ));
    Ok(c)
}

async fn plain_to(
    w: &World,
    app: &EchoApp,
    service: (&str, u16),
    payload: &[u8],
) -> Result<PlainCheck, DemoError> {
    let call = w.product.call(service.0, service.1, payload).await?;
    expect(
        call.transport == Transport::Plaintext,
        "plaintext",
        format!("{:?} ({})", call.transport, call.why),
    )?;
    let seen = app.received();
    let app_saw_tls = seen.iter().any(|r| r.looked_like_tls);
    Ok(PlainCheck { call, app_saw_tls })
}

async fn step2(w: &World) -> Result<PlainCheck, DemoError> {
    let payload = b"SELECT 1 (product-service -> legacy-db)";
    let c = plain_to(w, &w.legacy_db, LEGACY, payload).await?;
    expect(
        c.call.endpoint_tls_mode.is_none(),
        "legacy-db's endpoint without tlsMode metadata",
        format!("tlsMode={}", show(&c.call.endpoint_tls_mode)),
    )?;
    expect(
        !c.app_saw_tls,
        "legacy-db to receive plaintext",
        "a TLS handshake",
    )?;
    w.say(&format!(
        "    EDS {}: endpoint {} has no tlsMode → transport socket match tlsMode-disabled (raw_buffer)",
        c.call.cluster, c.call.endpoint
    ));
    w.say(&format!("    describe: {}", c.call.why));
    w.say(&format!(
        "    legacy-db received plaintext and echoed {} bytes; no handshake was attempted",
        c.call.echoed
    ));
    Ok(c)
}

async fn step3(w: &World) -> Result<TroubleshootCheck, DemoError> {
    let host = "inventory-service.shop.svc.cluster.local";
    let dr = with_destination_rule(
        &w.base_snapshot,
        "inventory-tls-disable",
        "shop",
        host,
        "DISABLE",
    );
    w.write_snapshot(&dr)?;
    w.say(&format!(
        "    applied DestinationRule shop/inventory-tls-disable (host {host}, tls.mode DISABLE) to {}",
        w.snapshot.display()
    ));
    let result = async {
        let c = plain_to(w, &w.inventory_app, INVENTORY, b"GET /stock/sku-42 (forced plaintext)").await?;
        expect(
            c.call.destination_rule.is_some(),
            "the DestinationRule to decide",
            "auto mTLS decided",
        )?;
        let inbound = w.inventory.inbound_from(c.call.local).ok_or_else(|| {
            DemoError::unexpected("the inventory sidecar to see the connection", "no record")
        })?;
        expect(!inbound.mtls, "a plaintext connection at the inventory sidecar", "mTLS")?;
        w.say(&format!(
            "    the endpoint still says tlsMode={}, but the connection went plaintext",
            c.call.endpoint_tls_mode.as_deref().unwrap_or("(absent)")
        ));
        w.say(&format!(
            "    describe: {} (DestinationRule {}); the inventory sidecar accepted it only because the mesh is PERMISSIVE",
            c.call.why,
            show(&c.call.destination_rule)
        ));
        Ok::<_, DemoError>((c.call, inbound))
    }
    .await;
    // Remove the rule whatever happened, so later steps start from the example.
    w.write_snapshot(&w.base_snapshot)?;
    let (disabled, disabled_inbound) = result?;
    w.say("    removed the DestinationRule");
    let restored = mtls_once(w, b"GET /stock/sku-42 (auto mTLS again)").await?;
    w.say(&format!(
        "    next connection: mTLS again ({})",
        restored.call.why
    ));
    Ok(TroubleshootCheck {
        disabled,
        disabled_inbound,
        restored,
    })
}

// === step 4: rotation under traffic ===

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

async fn step4(w: &World) -> Result<RotationCheck, DemoError> {
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
    let candidate = std::sync::Mutex::new(Some(Candidate::Generated(new)));
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

// === step 5 ===

/// Reads /metrics and returns the lines worth showing; fails if the endpoint does not answer
/// or shows no issuance.
async fn step5_metrics(w: &World) -> Result<Vec<String>, DemoError> {
    let mut tcp = tokio::net::TcpStream::connect(w.http_addr)
        .await
        .map_err(|e| DemoError::conn("connecting to /metrics", e))?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| DemoError::conn("GET /metrics", e))?;
    let mut body = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut body))
        .await
        .map_err(|_| DemoError::Timeout {
            what: "/metrics".into(),
            secs: WAIT.as_secs(),
        })?
        .map_err(|e| DemoError::conn("reading /metrics", e))?;
    let lines: Vec<String> = body
        .lines()
        .filter(|l| {
            [
                "meshid_certs_issued_total",
                "meshid_sds_streams_open",
                "meshid_eds_streams_open",
                "meshid_discovery_endpoints",
            ]
            .iter()
            .any(|m| l.starts_with(m))
        })
        .map(str::to_owned)
        .collect();
    let issued: f64 = lines
        .iter()
        .filter(|l| l.starts_with("meshid_certs_issued_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    expect(
        issued > 0.0,
        "meshid_certs_issued_total > 0 on /metrics",
        format!("{issued}"),
    )?;
    Ok(lines)
}

fn print_summary(w: &World, results: &[StepResult]) {
    w.say("\n  step | what                                   | result");
    w.say("  -----+----------------------------------------+---------------------------------------------");
    for r in results {
        let detail = match &r.outcome {
            Ok(StepOutcome::Mtls(c)) => format!(
                "ok: mTLS, {} ⇄ {}",
                show(&c.call.own_id),
                show(&c.call.peer_id)
            ),
            Ok(StepOutcome::Plaintext(c)) => format!("ok: plaintext to {}", c.call.endpoint),
            Ok(StepOutcome::Troubleshoot(_)) => "ok: DISABLE → plaintext; removed → mTLS".into(),
            Ok(StepOutcome::Rotation(c)) => format!(
                "ok: {} → {}, {} handshakes, {} failures",
                c.old_root,
                c.new_root,
                c.handshakes,
                c.failures.len()
            ),
            Ok(StepOutcome::Summary { .. }) => "ok: /metrics answers".into(),
            Err(e) => format!("FAILED: {e}"),
        };
        w.say(&format!("  {:>4} | {:<38} | {detail}", r.number, r.title));
    }
    let state = w.state_dir();
    w.say("\nWhere to look next:");
    w.say(&format!(
        "  metrics:     curl http://{}/metrics   (while the demo runs: add --keep-running)",
        w.http_addr
    ));
    w.say(&format!("  state dir:   {}", state.display()));
    w.say(&format!(
        "  root status: meshid root status --state-dir {}",
        state.display()
    ));
    w.say(&format!(
        "  auto mTLS:   meshid describe service inventory-service.shop --snapshot {}",
        w.snapshot.display()
    ));
    w.say(&format!(
        "               meshid describe service legacy-db.legacy --snapshot {}",
        w.snapshot.display()
    ));
}
