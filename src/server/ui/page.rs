//! `/ui` as HTML: every table is a real table and readable without JavaScript; `app.js` only
//! polls `/ui/status.json` and swaps in the new page when something changed.

use std::fmt::Write;

use time::OffsetDateTime;

use super::{Link, UiStatus};

/// The stylesheet and the script, served from the binary (no CDN).
pub const APP_CSS: &str = include_str!("app.css");
pub const APP_JS: &str = include_str!("app.js");

/// HTML-escapes text for element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn ts(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn opt_ts(t: Option<OffsetDateTime>) -> String {
    t.map(ts).unwrap_or_else(|| "—".into())
}

/// "in 3d 4h", "2h ago".
fn relative(secs: i64) -> String {
    let a = secs.unsigned_abs();
    let s = if a >= 86_400 {
        format!("{}d {}h", a / 86_400, (a % 86_400) / 3600)
    } else if a >= 3600 {
        format!("{}h {}m", a / 3600, (a % 3600) / 60)
    } else if a >= 60 {
        format!("{}m", a / 60)
    } else {
        format!("{a}s")
    };
    if secs >= 0 {
        format!("in {s}")
    } else {
        format!("{s} ago")
    }
}

/// The icon (hidden from assistive technology) and its visible text.
fn badge(l: Link, title: &str) -> String {
    let (class, svg) = match l {
        Link::Mtls => (
            "mtls",
            r#"<path d="M5 7V5a3 3 0 0 1 6 0v2"/><rect x="3" y="7" width="10" height="8" rx="1"/>"#,
        ),
        Link::Plaintext => (
            "plain",
            r#"<path d="M5 7V5a3 3 0 0 1 6 0"/><rect x="3" y="7" width="10" height="8" rx="1"/>"#,
        ),
        Link::Tls => (
            "tls",
            r#"<path d="M5 7V5a3 3 0 0 1 6 0v2"/><rect x="3" y="7" width="10" height="8" rx="1"/>"#,
        ),
        Link::Mixed => (
            "mixed",
            r#"<circle cx="8" cy="8" r="6"/><path d="M8 2v12"/>"#,
        ),
        Link::WillFail => (
            "fail",
            r#"<path d="M8 2 15 14H1Z"/><path d="M8 6v4M8 12v1"/>"#,
        ),
    };
    format!(
        r#"<span class="badge {class}" title="{}"><svg class="icon" viewBox="0 0 16 16" aria-hidden="true" focusable="false">{svg}</svg>{}</span>"#,
        esc(title),
        esc(l.label())
    )
}

/// The whole page.
pub fn render(s: &UiStatus) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>meshid status: {td}</title>
<link rel="stylesheet" href="/ui/app.css">
<script src="/ui/app.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to the status</a>
<header>
<h1>meshid <span class="sub">trust domain {td}</span></h1>
<p class="meta">replica {replica} · state generation <span id="generation">{gen}</span> · generated <time id="generated" datetime="{gen_at}">{gen_at}</time> · <span id="live" role="status" aria-live="polite">live updates need JavaScript; reload to refresh</span> · <a href="/ui/status.json">JSON</a></p>
</header>
<main id="main">
"##,
        td = esc(&s.trust_domain),
        replica = esc(&s.replica),
        gen = s.state_generation,
        gen_at = ts(s.generated_at),
    );
    h.push_str(&main(s));
    h.push_str("</main>\n</body>\n</html>\n");
    h
}

/// The content of `<main>` (what the script swaps in on a change).
pub fn main(s: &UiStatus) -> String {
    let mut h = String::new();
    if let Some(p) = &s.state_problem {
        let _ = write!(
            h,
            r#"<p class="alert" role="alert">The CA state cannot be re-read: {}. Issuance goes on from the state held; changes wait until it is readable.</p>"#,
            esc(p)
        );
    }
    roots(&mut h, s);
    rotation(&mut h, s);
    replicas(&mut h, s);
    federation(&mut h, s);
    proxies(&mut h, s);
    discovery(&mut h, s);
    h
}

fn roots(h: &mut String, s: &UiStatus) {
    h.push_str(r#"<section aria-labelledby="roots-h"><h2 id="roots-h">Roots</h2>"#);
    // The timeline: one bar per root from notBefore to notAfter, and a line at now.
    let now = s.generated_at.unix_timestamp();
    let start = s.roots.iter().map(|r| r.not_before.unix_timestamp()).min();
    let end = s.roots.iter().map(|r| r.not_after.unix_timestamp()).max();
    if let (Some(a), Some(b)) = (start, end) {
        let (a, b) = (a.min(now), b.max(now));
        let span = (b - a).max(1) as f64;
        let x = |t: i64| 10.0 + 580.0 * ((t - a) as f64 / span);
        let rows = s.roots.len();
        let height = 20 + rows * 26;
        let _ = write!(
            h,
            r#"<figure><svg class="timeline" viewBox="0 0 600 {height}" role="img" aria-labelledby="tl-t"><title id="tl-t">Root validity timeline; the roots table below gives every date</title>"#
        );
        for (i, r) in s.roots.iter().enumerate() {
            let y = 10 + i * 26;
            let (x0, x1) = (
                x(r.not_before.unix_timestamp()),
                x(r.not_after.unix_timestamp()),
            );
            let _ = write!(
                h,
                r#"<g><title>{id} {state}: {nb} to {na}</title><rect class="bar {state}" x="{x0:.1}" y="{y}" width="{w:.1}" height="18" rx="3"/><text x="{tx:.1}" y="{ty}">{id} ({state})</text></g>"#,
                id = esc(&r.id),
                state = esc(&r.state),
                nb = ts(r.not_before),
                na = ts(r.not_after),
                w = (x1 - x0).max(2.0),
                tx = x0 + 4.0,
                ty = y + 13,
            );
        }
        let _ = write!(
            h,
            r#"<line class="now" x1="{n:.1}" x2="{n:.1}" y1="2" y2="{y2}"/><text class="now" x="{tx:.1}" y="{y2}">now</text></svg><figcaption>Validity of each root, with now marked.</figcaption></figure>"#,
            n = x(now),
            tx = x(now) + 3.0,
            y2 = height - 2,
        );
    }
    h.push_str(r#"<table><caption>Roots of this trust domain and their lifecycle state</caption><thead><tr><th scope="col">Root</th><th scope="col">State</th><th scope="col">Since</th><th scope="col">Signs new leaves</th><th scope="col">Not after</th><th scope="col">Expires</th><th scope="col">SDS streams holding it</th><th scope="col">Subject</th></tr></thead><tbody>"#);
    for r in &s.roots {
        let _ = write!(
            h,
            r#"<tr><th scope="row"><code>{}</code></th><td><span class="state {}">{}</span></td><td>{}</td><td>{}</td><td><time datetime="{na}">{na}</time></td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&r.id),
            esc(&r.state),
            esc(&r.state),
            opt_ts(r.state_since),
            if r.signs { "yes" } else { "no" },
            relative(r.expires_in_seconds),
            r.streams_holding,
            esc(&r.subject),
            na = ts(r.not_after),
        );
    }
    h.push_str("</tbody></table></section>\n");
}

fn rotation(h: &mut String, s: &UiStatus) {
    let r = &s.rotation;
    let _ = writeln!(
        h,
        r#"<section aria-labelledby="rot-h"><h2 id="rot-h">Rotation</h2><p id="rotation-summary">{}</p><table><caption>Propagation over the open SDS streams</caption><thead><tr><th scope="col">What</th><th scope="col">On the current one</th><th scope="col">Of</th></tr></thead><tbody><tr><th scope="row">Trust bundle (every trusted root)</th><td>{}</td><td>{}</td></tr><tr><th scope="row">Leaf from the current signer <code>{}</code></th><td>{}</td><td>{}</td></tr><tr><th scope="row">Streams behind</th><td colspan="2">{}</td></tr></tbody></table></section>"#,
        if r.in_progress {
            "A rotation is in progress: more than one root is trusted, or some stream is behind."
        } else {
            "No rotation in progress: one root is trusted and every stream is current."
        },
        r.bundle_streams_current,
        r.bundle_streams,
        esc(&r.signer),
        r.leaf_streams_current,
        r.leaf_streams,
        r.laggards,
    );
}

fn replicas(h: &mut String, s: &UiStatus) {
    let Some(r) = &s.replicas else { return };
    h.push_str(r#"<section aria-labelledby="rep-h"><h2 id="rep-h">Replicas</h2>"#);
    if let Some(e) = &r.read_error {
        let _ = write!(h, r#"<p class="alert">{}</p>"#, esc(e));
    }
    h.push_str(r#"<table><caption>What every replica sharing the state reports (its status Lease)</caption><thead><tr><th scope="col">Replica</th><th scope="col">Last seen</th><th scope="col">Current</th><th scope="col">State generation</th><th scope="col">Signer</th><th scope="col">SDS streams</th><th scope="col">Streams behind</th></tr></thead><tbody>"#);
    for rep in &r.replicas {
        let st = rep.status.as_ref();
        let _ = write!(
            h,
            r#"<tr><th scope="row">{}</th><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>"#,
            esc(&rep.replica),
            esc(rep.last_seen.as_deref().unwrap_or("never")),
            if rep.fresh {
                "yes"
            } else {
                "no: not renewed within its lease"
            },
            st.map(|x| x.generation.to_string())
                .unwrap_or_else(|| "—".into()),
            esc(st.map(|x| x.signer.as_str()).unwrap_or("—")),
            st.map(|x| x.counts.streams.to_string())
                .unwrap_or_else(|| "—".into()),
            st.map(|x| x.counts.laggard_count.to_string())
                .unwrap_or_else(|| "—".into()),
        );
    }
    h.push_str("</tbody></table></section>\n");
}

fn federation(h: &mut String, s: &UiStatus) {
    h.push_str(r#"<section aria-labelledby="fed-h"><h2 id="fed-h">Federated trust domains</h2>"#);
    if s.federation.is_empty() {
        h.push_str("<p>None configured.</p></section>\n");
        return;
    }
    h.push_str(r#"<table><caption>Peers whose bundles this server fetches</caption><thead><tr><th scope="col">Trust domain</th><th scope="col">Bundle endpoint</th><th scope="col">Last refresh</th><th scope="col">Sequence</th><th scope="col">Next attempt</th><th scope="col">Last error</th></tr></thead><tbody>"#);
    for f in &s.federation {
        let _ = write!(
            h,
            r#"<tr><th scope="row">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&f.trust_domain),
            esc(&f.url),
            opt_ts(f.last_success),
            f.sequence
                .map(|q| q.to_string())
                .unwrap_or_else(|| "—".into()),
            opt_ts(f.next_attempt),
            esc(f.last_error.as_deref().unwrap_or("none")),
        );
    }
    h.push_str("</tbody></table></section>\n");
}

fn proxies(h: &mut String, s: &UiStatus) {
    h.push_str(r#"<section aria-labelledby="px-h"><h2 id="px-h">Connected proxies</h2>"#);
    if s.proxies.is_empty() {
        h.push_str("<p>No SDS stream is open.</p></section>\n");
        return;
    }
    h.push_str(r#"<table><caption>Open SDS streams by namespace, with the expiry of the leaves they hold</caption><thead><tr><th scope="col">Namespace</th><th scope="col">Streams</th><th scope="col">Earliest leaf expiry</th><th scope="col">Latest leaf expiry</th><th scope="col">Identities</th></tr></thead><tbody>"#);
    for p in &s.proxies {
        let ids: Vec<String> = p.identities.iter().map(|i| esc(i)).collect();
        let _ = write!(
            h,
            r#"<tr><th scope="row">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(if p.namespace.is_empty() {
                "(not a namespace identity)"
            } else {
                &p.namespace
            }),
            p.streams,
            opt_ts(p.earliest_leaf_expiry),
            opt_ts(p.latest_leaf_expiry),
            ids.join("<br>"),
        );
    }
    h.push_str("</tbody></table></section>\n");
}

fn discovery(h: &mut String, s: &UiStatus) {
    let Some(d) = &s.discovery else {
        h.push_str(r#"<section aria-labelledby="am-h"><h2 id="am-h">Auto mTLS</h2><p>Discovery is off (no <code>[discovery]</code> in the configuration).</p></section>"#);
        return;
    };
    h.push_str(r#"<section aria-labelledby="cov-h"><h2 id="cov-h">Auto mTLS coverage</h2><table><caption>Share of each namespace's pods with a sidecar</caption><thead><tr><th scope="col">Namespace</th><th scope="col">Pods with a sidecar</th></tr></thead><tbody>"#);
    for c in &d.coverage {
        let pct = (c.ratio * 100.0).round();
        let _ = write!(
            h,
            r#"<tr><th scope="row">{}</th><td><meter min="0" max="100" value="{pct}" aria-hidden="true"></meter> {pct}%</td></tr>"#,
            esc(&c.namespace)
        );
    }
    h.push_str("</tbody></table></section>\n");
    h.push_str(r#"<section aria-labelledby="graph-h"><h2 id="graph-h">Service graph</h2><p class="legend">Legend: "#);
    for l in [Link::Mtls, Link::Plaintext, Link::Tls, Link::WillFail] {
        h.push_str(&badge(l, l.label()));
        h.push(' ');
    }
    h.push_str("</p>");
    graph_svg(h, s);
    for svc in &d.services {
        let id = format!("svc-{}", slug(&svc.service));
        let _ = write!(
            h,
            r#"<article class="service" id="{id}" aria-labelledby="{id}-h"><h3 id="{id}-h">{}</h3>"#,
            esc(&svc.service)
        );
        h.push_str(r#"<table class="endpoints"><caption>Endpoints, as a client with a sidecar reaches them</caption><thead><tr><th scope="col">Endpoint</th><th scope="col">Backed by</th><th scope="col">Sidecar</th><th scope="col">Connection</th><th scope="col">Reason</th></tr></thead><tbody>"#);
        for e in &svc.endpoints {
            let _ = write!(
                h,
                r#"<tr data-endpoint="{addr}:{port}"><th scope="row">{addr}:{port}</th><td>{}</td><td>{}</td><td>{}</td><td class="reason">{}</td></tr>"#,
                esc(&e.workload),
                esc(&e.sidecar),
                badge(e.link, &e.reason),
                esc(&e.reason),
                addr = esc(&e.address),
                port = e.port,
            );
        }
        h.push_str("</tbody></table>");
        if !svc.clients.is_empty() {
            h.push_str(r#"<table class="edges"><caption>Clients and how each reaches the service</caption><thead><tr><th scope="col">Client</th><th scope="col">Client sidecar</th><th scope="col">Connection</th><th scope="col">Reason</th></tr></thead><tbody>"#);
            for c in &svc.clients {
                let _ = write!(
                    h,
                    r#"<tr data-client="{cl}"><th scope="row">{cl} → {}</th><td>{}</td><td>{}</td><td class="reason">{}</td></tr>"#,
                    esc(&svc.service),
                    if c.client_sidecar { "yes" } else { "no" },
                    badge(c.link, &c.reason),
                    esc(&c.reason),
                    cl = esc(&c.client),
                );
            }
            h.push_str("</tbody></table>");
        }
        h.push_str("</article>\n");
    }
    if d.omitted_services > 0 || d.omitted_edges > 0 {
        let _ = write!(
            h,
            "<p>Not shown: {} services and {} client edges beyond the page's limits; <code>meshid describe</code> answers for any of them.</p>",
            d.omitted_services, d.omitted_edges
        );
    }
    h.push_str("</section>\n");
}

/// Clients on the left, services on the right, one line per edge (its reason on hover); the
/// tables after it are its text form.
fn graph_svg(h: &mut String, s: &UiStatus) {
    let Some(d) = &s.discovery else { return };
    let mut clients: Vec<&str> = d
        .services
        .iter()
        .flat_map(|s| s.clients.iter().map(|c| c.client.as_str()))
        .collect();
    clients.sort();
    clients.dedup();
    let services: Vec<&str> = d.services.iter().map(|s| s.service.as_str()).collect();
    let rows = clients.len().max(services.len()).max(1);
    let height = 20 + rows * 28;
    let y = |i: usize, n: usize| {
        let step = (height - 20) as f64 / n.max(1) as f64;
        10.0 + step * (i as f64 + 0.5)
    };
    let _ = write!(
        h,
        r#"<figure><svg class="graph" viewBox="0 0 760 {height}" role="img" aria-labelledby="g-t"><title id="g-t">Service graph: each client pod and each service it can reach; the tables below list every edge with its reason</title>"#
    );
    for (si, svc) in d.services.iter().enumerate() {
        for c in &svc.clients {
            let ci = clients.iter().position(|x| *x == c.client).unwrap_or(0);
            let _ = write!(
                h,
                r#"<line class="edge {}" x1="250" y1="{:.1}" x2="510" y2="{:.1}"><title>{} → {}: {} ({})</title></line>"#,
                link_class(c.link),
                y(ci, clients.len()),
                y(si, services.len()),
                esc(&c.client),
                esc(&svc.service),
                c.link.label(),
                esc(&c.reason),
            );
        }
    }
    for (i, c) in clients.iter().enumerate() {
        let _ = write!(
            h,
            r#"<text class="node" x="245" y="{:.1}" text-anchor="end">{}</text>"#,
            y(i, clients.len()) + 4.0,
            esc(c)
        );
    }
    for (i, svc) in services.iter().enumerate() {
        let _ = write!(
            h,
            r#"<text class="node" x="515" y="{:.1}">{}</text>"#,
            y(i, services.len()) + 4.0,
            esc(svc)
        );
    }
    h.push_str("</svg><figcaption>Clients (left) and services (right); a solid line is mTLS, a dashed one plaintext, a red one will fail.</figcaption></figure>");
}

fn link_class(l: Link) -> &'static str {
    match l {
        Link::Mtls => "mtls",
        Link::Plaintext => "plain",
        Link::Tls => "tls",
        Link::Mixed => "mixed",
        Link::WillFail => "fail",
    }
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn relative_times() {
        assert_eq!(relative(90_000), "in 1d 1h");
        assert_eq!(relative(-7200), "2h 0m ago");
        assert_eq!(relative(59), "in 59s");
    }
}
