//! Step 5: /metrics read back, then the summary table and where to look next.

use super::{
    outcome::{expect, show, StepOutcome, StepResult},
    world::{World, WAIT},
    DemoError,
};

/// Reads /metrics and returns the lines worth showing; fails if the endpoint does not answer
/// or shows no issuance.
pub(super) async fn step5_metrics(w: &World) -> Result<Vec<String>, DemoError> {
    let url = format!("http://{}/metrics", w.http_addr);
    let mut get = crate::http_client::Get::new(&url)
        .timeout(WAIT)
        .max_body(16 << 20);
    get.accept = "text/plain";
    let body = get.send().await.map_err(|e| match e {
        crate::http_client::HttpError::TimedOut { .. } => DemoError::Timeout {
            what: "/metrics".into(),
            secs: WAIT.as_secs(),
        },
        other => DemoError::conn("GET /metrics", other),
    })?;
    let body = String::from_utf8_lossy(&body);
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

pub(super) fn print_summary(w: &World, results: &[StepResult]) {
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
    w.say(&format!(
        "  status page: http://{}/ui   (while the demo runs: add --keep-running)",
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
