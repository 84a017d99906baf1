//! `describe` as text: what `meshid describe` prints, and what a running server answers on
//! `/debug/describe/*` for `meshid describe --server` (one rendering for both).

use std::fmt::Write as _;

use super::{decide::ClusterTls, PodReport, ServiceReport};

/// `writeln!` into a `String`, which cannot fail.
macro_rules! w {
    ($o:expr) => {{
        $o.push('\n');
    }};
    ($o:expr, $($arg:tt)*) => {{
        let _ = writeln!($o, $($arg)*);
    }};
}

fn cluster_tls_label(t: ClusterTls) -> String {
    match t {
        ClusterTls::AutoMatch => {
            "auto mTLS (socket matches tlsMode-istio / tlsMode-disabled)".into()
        }
        ClusterTls::Fixed(m) => format!("{m:?} for every endpoint"),
        ClusterTls::Plain => "no TLS".into(),
    }
}

/// `describe service` as text.
pub fn service_text(r: &ServiceReport, istio: bool) -> String {
    let mut o = String::new();
    service_into(&mut o, r, istio);
    o
}

fn service_into(o: &mut String, r: &ServiceReport, istio: bool) {
    w!(
        o,
        "{}: {} ({}){}",
        r.kind,
        r.service,
        r.fqdn,
        if r.headless {
            ", headless/passthrough"
        } else {
            ""
        }
    );
    if r.mesh_external {
        w!(o, "  mesh-external: auto mTLS does not apply");
    }
    if r.kind == "ServiceEntry" {
        w!(o, "  Resolution:             {}", r.resolution);
    }
    w!(o, "  Decisions for:          {}", r.client);
    w!(
        o,
        "  Auto mTLS:              {}",
        if r.auto_mtls { "on" } else { "off" }
    );
    w!(
        o,
        "  PeerAuthentication:     {} from {}",
        r.namespace_peer_authentication.mode,
        r.namespace_peer_authentication.source
    );
    match &r.destination_rule {
        Some(d) => {
            w!(
                o,
                "  DestinationRule:        {}/{} (host {})",
                d.namespace,
                d.name,
                d.host
            );
            w!(o, "    cluster side:         {}", d.cluster_side);
            w!(o, "    endpoint side:        {}", d.endpoint_side);
        }
        None => w!(
            o,
            "  DestinationRule:        none (auto mTLS decides per endpoint)"
        ),
    }
    clusters_into(o, r, istio);
    w!(o, "  Endpoints:");
    for e in &r.endpoints {
        endpoint_into(o, e, istio);
    }
    let s = &r.summary;
    w!(
        o,
        "  Summary: {} mTLS, {} plaintext, {} TLS, {} will fail",
        s.mtls,
        s.plaintext,
        s.tls,
        s.will_fail
    );
    if istio {
        w!(
            o,
            "  Istio would decide otherwise for {} endpoint(s)",
            r.istio_differs
        );
    }
    if !r.clients.is_empty() {
        w!(o, "  Clients:");
        for c in &r.clients {
            w!(
                o,
                "    {} ({}): {}",
                c.pod,
                if c.sidecar { "sidecar" } else { "no sidecar" },
                c.reaches_with
            );
        }
    }
    for w in &r.warnings {
        w!(o, "  warning: {w}");
    }
    for i in &r.ignored {
        w!(o, "  ignored: {i}");
    }
}

fn clusters_into(o: &mut String, r: &ServiceReport, istio: bool) {
    w!(o, "  Clusters:");
    for c in &r.clusters {
        w!(
            o,
            "    {}  {}{}",
            c.name,
            cluster_tls_label(c.tls),
            if c.served_by_eds {
                ""
            } else {
                "  (not served by EDS)"
            }
        );
        w!(o, "      why: {}", c.tls_why);
        if istio && c.istio_tls != c.tls {
            w!(
                o,
                "      istio: {} ({})",
                cluster_tls_label(c.istio_tls),
                c.istio_tls_why
            );
        }
    }
}

fn endpoint_into(o: &mut String, e: &super::EndpointReport, istio: bool) {
    w!(
        o,
        "    {}:{} (service port {})  {}  sidecar: {}  -> {}",
        e.address,
        e.port,
        e.service_port,
        e.workload,
        if e.sidecar { "yes" } else { "no" },
        e.decision.label()
    );
    w!(
        o,
        "      cluster {}{}; sidecar state: {}",
        e.cluster,
        if e.stale {
            " (STALE: its API server cannot be reached; last known endpoint)"
        } else {
            ""
        },
        e.sidecar_state
    );
    w!(
        o,
        "      why ({} side): {}; PeerAuthentication {} from {}",
        e.decided_by,
        e.why,
        e.peer_authentication.mode,
        e.peer_authentication.source
    );
    if istio {
        if e.istio.decision == e.decision {
            w!(o, "      istio: same ({})", e.istio.decision.label());
        } else {
            w!(
                o,
                "      istio: {} ({} side): {}",
                e.istio.decision.label(),
                e.istio.decided_by,
                e.istio.why
            );
        }
    }
    for w in &e.warnings {
        w!(o, "      warning: {w}");
    }
}

/// `describe pod` as text.
pub fn pod_text(r: &PodReport) -> String {
    let mut o = String::new();
    let o = &mut o;
    w!(o, "Pod: {} (service account {})", r.pod, r.service_account);
    w!(
        o,
        "  Sidecar: {} (tlsMode {}, runs istio-proxy: {})",
        if r.sidecar.tls_mode == super::TlsMode::Istio {
            "yes"
        } else {
            "no"
        },
        r.sidecar.tls_mode,
        r.sidecar.runs_proxy
    );
    for w in &r.sidecar.warnings {
        w!(o, "  warning: pod {w}");
    }
    for (port, pa) in &r.peer_authentication {
        match port {
            None => w!(
                o,
                "  PeerAuthentication:        {} from {}",
                pa.mode,
                pa.source
            ),
            Some(p) => w!(
                o,
                "  PeerAuthentication :{p:<5}  {} from {}",
                pa.mode,
                pa.source
            ),
        }
    }
    for s in &r.services {
        w!(o);
        service_into(o, s, false);
    }
    std::mem::take(o)
}
