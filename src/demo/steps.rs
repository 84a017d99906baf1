//! The demo's five steps. Each checks what happened (transports, SPIFFE IDs seen by both
//! peers, which root anchors each leaf, what the apps received, handshake counts) and returns
//! it, or what it expected and what it saw.

use super::{
    apps::EchoApp,
    outcome::{
        active_root, expect, show, MtlsCheck, PlainCheck, StepOutcome, StepResult,
        TroubleshootCheck, INVENTORY,
    },
    sidecar::Transport,
    world::{with_destination_rule, World},
    DemoError,
};

const LEGACY: (&str, u16) = ("legacy-db.legacy", 5432);

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
        super::rotation::step4(w).await.map(StepOutcome::Rotation),
    );
    w.say("\n[5] summary");
    let metrics = super::report::step5_metrics(w).await;
    for l in metrics.iter().flatten() {
        w.say(&format!("    {l}"));
    }
    step(
        5,
        "summary and metrics",
        metrics.map(|m| StepOutcome::Summary { metrics_lines: m }),
    );
    super::report::print_summary(w, &out);
    out
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

/// Waits until the product sidecar's EDS serves the inventory endpoint with `tls_mode`.
async fn wait_inventory_tls_mode(
    w: &World,
    host: &str,
    tls_mode: Option<&str>,
) -> Result<(), DemoError> {
    let cluster = crate::discovery::cluster_name(INVENTORY.1, host);
    let mut rx = w.product.watch();
    let served = |st: &super::control::ProxyState| {
        st.endpoints
            .get(&cluster)
            .and_then(|e| e.first())
            .is_some_and(|e| e.tls_mode.as_deref() == tls_mode)
    };
    let seen = tokio::time::timeout(super::world::WAIT, rx.wait_for(served))
        .await
        .is_ok_and(|r| r.is_ok());
    match seen {
        true => Ok(()),
        false => Err(DemoError::Timeout {
            what: format!(
                "EDS to serve {cluster} with tlsMode {}",
                tls_mode.unwrap_or("absent")
            ),
            secs: super::world::WAIT.as_secs(),
        }),
    }
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
    // The server re-reads the snapshot and pushes EDS: a DestinationRule DISABLE clears the
    // endpoint's tlsMode (Istio's endpoint side only ever clears it). Wait for that push, so
    // the call below sees what the server serves now.
    wait_inventory_tls_mode(w, host, None).await?;
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
            "    EDS now serves the endpoint with tlsMode {} (the rule clears it) and the connection went plaintext",
            c.call.endpoint_tls_mode.as_deref().unwrap_or("absent")
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
    wait_inventory_tls_mode(w, host, Some("istio")).await?;
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
