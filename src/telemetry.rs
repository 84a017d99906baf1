//! Metrics (Prometheus text), health endpoints, and logging set-up.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::sync::watch;

use crate::shutdown::stopping;

type Labels = Vec<(String, String)>;

/// Every metric meshid exports. Names follow istiod's CA metrics with a `meshid_` prefix.
pub struct Metrics {
    registry: Registry,
    pub csr_requests: Counter,
    pub auth_failures: Family<Labels, Counter>,
    pub sign_errors: Family<Labels, Counter>,
    pub certs_issued: Family<Labels, Counter>,
    /// CSR API requests carrying `ImpersonatedIdentity`, by result (`allowed` or the refusal).
    pub impersonations: Family<Labels, Counter>,
    pub root_expiry: Gauge,
    /// 1 while a successor waits: a prepared root, or a signer staged under the active one.
    pub root_successor_prepared: Gauge,
    /// 1 while the root that signs expires within 30 days, until a successor is active.
    pub root_expiry_warning: Gauge,
    pub chain_expiry: Gauge,
    pub sds_streams: Gauge,
    pub sds_pushes: Family<Labels, Counter>,
    pub sds_nacks: Counter,
    pub sds_push_latency: Histogram,
    pub eds_streams: Gauge,
    pub eds_pushes: Family<Labels, Counter>,
    pub eds_nacks: Counter,
    pub eds_push_latency: Histogram,
    pub xds_unknown_names: Family<Labels, Counter>,
    pub discovery_endpoints: Family<Labels, Gauge>,
    pub discovery_mtls_coverage: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub discovery_mismatches: Gauge,
    pub discovery_declared_without_proxy: Gauge,
    pub identity_backend_up: Family<Labels, Gauge>,
    /// 1 while this replica leads (runs the schedules).
    pub leader: Gauge,
    pub federation_refreshes: Family<Labels, Counter>,
    pub federation_up: Family<Labels, Gauge>,
    pub federation_sequence: Family<Labels, Gauge>,
    /// Unix time of a federated trust domain's last successful bundle fetch.
    pub federation_last_success: Family<Labels, Gauge>,
    /// The refresh hint of the bundle last fetched (its `spiffe_refresh_hint`, else the default).
    pub federation_refresh_hint: Family<Labels, Gauge>,
    /// Roots of the state by lifecycle state.
    pub roots: Family<Labels, Gauge>,
    /// Open SDS streams by what they hold against the served bundle and signer.
    pub rotation_streams: Family<Labels, Gauge>,
    /// Automatic activations let through at their propagation deadline with streams lagging.
    pub rotation_forced_activations: Counter,
    /// Remote-secret kubeconfigs refused, by secret, cluster and reason.
    pub remote_secret_refused: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the series whose label values are known in advance at zero, so that they are
    /// on `/metrics` from the start (dashboards and alerts see a 0, `rate()` starts from it):
    /// each API, refusal reason and error kind, and the resources SDS serves.
    pub fn with_known_labels(
        self,
        auth_reasons: &[&str],
        sign_error_kinds: &[&str],
        impersonation_results: &[&str],
    ) -> Self {
        let touch = |f: &Family<Labels, Counter>, key: &str, values: &[&str]| {
            for v in values {
                let _ = f.get_or_create(&Self::label(key, v));
            }
        };
        touch(&self.certs_issued, "api", &["sds", "csr"]);
        touch(&self.auth_failures, "reason", auth_reasons);
        touch(&self.sign_errors, "kind", sign_error_kinds);
        touch(&self.impersonations, "result", impersonation_results);
        touch(
            &self.sds_pushes,
            "resource",
            &["default", "ROOTCA", "ALL", "spiffe"],
        );
        touch(&self.eds_pushes, "resource", &["cluster"]);
        for view in ["bundle", "bundle_current", "leaf", "leaf_current", "behind"] {
            let _ = self
                .rotation_streams
                .get_or_create(&Self::label("view", view));
        }
        self
    }

    /// A federated trust domain's series, at their "never fetched" values (up 0, last success
    /// at 0): shown from the start, and stale for the alert until a fetch succeeds.
    pub fn federation_peer(&self, trust_domain: &str) {
        let l = Self::label("trust_domain", trust_domain);
        let _ = self.federation_up.get_or_create(&l);
        let _ = self.federation_last_success.get_or_create(&l);
        let _ = self.federation_refresh_hint.get_or_create(&l);
        let _ = self.federation_sequence.get_or_create(&l);
        let _ = self.federation_refreshes.get_or_create(&vec![
            ("trust_domain".to_owned(), trust_domain.to_owned()),
            ("result".to_owned(), "ok".to_owned()),
        ]);
    }

    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Self {
            csr_requests: Counter::default(),
            auth_failures: Family::default(),
            sign_errors: Family::default(),
            certs_issued: Family::default(),
            impersonations: Family::default(),
            root_expiry: Gauge::default(),
            root_successor_prepared: Gauge::default(),
            root_expiry_warning: Gauge::default(),
            chain_expiry: Gauge::default(),
            sds_streams: Gauge::default(),
            sds_pushes: Family::default(),
            sds_nacks: Counter::default(),
            sds_push_latency: latency_histogram(),
            eds_streams: Gauge::default(),
            eds_pushes: Family::default(),
            eds_nacks: Counter::default(),
            eds_push_latency: latency_histogram(),
            xds_unknown_names: Family::default(),
            discovery_endpoints: Family::default(),
            discovery_mtls_coverage: Family::default(),
            discovery_mismatches: Gauge::default(),
            discovery_declared_without_proxy: Gauge::default(),
            identity_backend_up: Family::default(),
            leader: Gauge::default(),
            federation_refreshes: Family::default(),
            federation_up: Family::default(),
            federation_sequence: Family::default(),
            federation_last_success: Family::default(),
            federation_refresh_hint: Family::default(),
            roots: Family::default(),
            rotation_streams: Family::default(),
            remote_secret_refused: Family::default(),
            rotation_forced_activations: Counter::default(),
            registry: Registry::default(),
        };
        r.register(
            "meshid_csr_requests",
            "CreateCertificate requests received",
            m.csr_requests.clone(),
        );
        r.register(
            "meshid_leader",
            "1 while this replica holds the leader Lease and runs the schedules (automatic rotation, federation polling, ConfigMap publishing); 1 without leader election",
            m.leader.clone(),
        );
        r.register(
            "meshid_identity_backend_up",
            "1 when a cluster's token backend passed its last probe, by cluster",
            m.identity_backend_up.clone(),
        );
        r.register(
            "meshid_authentication_failures",
            "Callers refused, by reason",
            m.auth_failures.clone(),
        );
        r.register(
            "meshid_sign_errors",
            "Certificate requests refused or failed, by kind",
            m.sign_errors.clone(),
        );
        r.register(
            "meshid_certs_issued",
            "Certificates issued, by API",
            m.certs_issued.clone(),
        );
        r.register(
            "meshid_impersonation_requests",
            "CSR API requests of node agents for another pod's identity (ImpersonatedIdentity), by result: allowed, or why refused",
            m.impersonations.clone(),
        );
        r.register(
            "meshid_root_cert_expiry_timestamp_seconds",
            "notAfter of the root that anchors the signer",
            m.root_expiry.clone(),
        );
        r.register(
            "meshid_root_successor_prepared",
            "1 while a successor waits to take over: a prepared root, or a plug-in signer staged under the active root (root prepare --from-plugin)",
            m.root_successor_prepared.clone(),
        );
        r.register(
            "meshid_root_expiry_warning",
            "1 while the root that signs expires within 30 days (it stays 1 until a successor is active)",
            m.root_expiry_warning.clone(),
        );
        r.register(
            "meshid_cert_chain_expiry_timestamp_seconds",
            "Earliest notAfter along the signing chain",
            m.chain_expiry.clone(),
        );
        r.register(
            "meshid_sds_streams_open",
            "Open SDS streams",
            m.sds_streams.clone(),
        );
        r.register(
            "meshid_sds_pushes",
            "SDS responses sent, by resource",
            m.sds_pushes.clone(),
        );
        r.register(
            "meshid_sds_nacks",
            "SDS NACKs received",
            m.sds_nacks.clone(),
        );
        r.register(
            "meshid_sds_push_latency_seconds",
            "Time from a change to its SDS response",
            m.sds_push_latency.clone(),
        );
        r.register(
            "meshid_eds_streams_open",
            "Open EDS streams",
            m.eds_streams.clone(),
        );
        r.register(
            "meshid_eds_pushes",
            "EDS responses sent",
            m.eds_pushes.clone(),
        );
        r.register(
            "meshid_eds_nacks",
            "EDS NACKs received",
            m.eds_nacks.clone(),
        );
        r.register(
            "meshid_eds_push_latency_seconds",
            "Time from a change to its EDS response",
            m.eds_push_latency.clone(),
        );
        r.register(
            "meshid_xds_unknown_resource_names",
            "Resource names subscribed on SDS/EDS streams that were not served then, by type",
            m.xds_unknown_names.clone(),
        );
        r.register(
            "meshid_discovery_endpoints",
            "Service endpoints, by tlsMode",
            m.discovery_endpoints.clone(),
        );
        r.register(
            "meshid_discovery_mtls_coverage_ratio",
            "Share of pods with a sidecar, by namespace",
            m.discovery_mtls_coverage.clone(),
        );
        r.register(
            "meshid_discovery_sidecar_mismatches",
            "Pods whose tlsMode label disagrees with what they run",
            m.discovery_mismatches.clone(),
        );
        r.register(
            "meshid_discovery_declared_without_proxy",
            "Pods labelled tlsMode=istio whose proxy has not fetched a certificate from meshid",
            m.discovery_declared_without_proxy.clone(),
        );
        r.register(
            "meshid_federation_refreshes",
            "Federated bundle fetches, by trust domain and result",
            m.federation_refreshes.clone(),
        );
        r.register(
            "meshid_federation_up",
            "1 when a federated trust domain's last bundle fetch succeeded",
            m.federation_up.clone(),
        );
        r.register(
            "meshid_federation_bundle_sequence",
            "spiffe_sequence of the bundle held for a federated trust domain",
            m.federation_sequence.clone(),
        );
        r.register(
            "meshid_federation_last_success_timestamp_seconds",
            "Unix time of a federated trust domain's last successful bundle fetch",
            m.federation_last_success.clone(),
        );
        r.register(
            "meshid_federation_refresh_hint_seconds",
            "The spiffe_refresh_hint of the bundle last fetched from a federated trust domain (5 min when it names none); meshid polls at a quarter of it",
            m.federation_refresh_hint.clone(),
        );
        r.register(
            "meshid_roots",
            "Roots of the CA state by lifecycle state (prepared, active, old, tainted, revoked)",
            m.roots.clone(),
        );
        r.register(
            "meshid_rotation_streams",
            "Open SDS streams: bundle / bundle_current (ACKed an own-trust-domain bundle / one holding every trusted root), leaf / leaf_current (ACKed a leaf / one from the current signer), behind",
            m.rotation_streams.clone(),
        );
        r.register(
            "meshid_discovery_remote_secret_refused",
            "Remote-secret kubeconfigs refused (exec, auth providers, local files, insecure TLS), by secret, cluster and reason",
            m.remote_secret_refused.clone(),
        );
        r.register(
            "meshid_rotation_forced_activations",
            "Automatic root activations made at their propagation deadline although streams lagged (named in the log)",
            m.rotation_forced_activations.clone(),
        );
        Self { registry: r, ..m }
    }

    /// One label, for the families above.
    pub fn label(key: &str, value: &str) -> Labels {
        vec![(key.to_owned(), value.to_owned())]
    }

    /// The registry, for a process that exports metrics of its own beside these (the node
    /// agent registers its own before the metrics are shared).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 14,
    ))
}

/// Why the server cannot do its job now (the body of a failing `/readyz`).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct NotReady(pub Box<dyn std::error::Error + Send + Sync>);

/// What the health endpoints report.
pub trait Health: Send + Sync + 'static {
    /// `Ok` when the server can do its job; otherwise why not.
    fn ready(&self) -> Result<(), NotReady>;
    /// What works and what does not beyond the verdict, one line each (listed under it on
    /// `/readyz`).
    fn details(&self) -> Vec<String> {
        Vec::new()
    }
    /// A JSON status document served at `path` (e.g. `/debug/rotation`), if there is one.
    fn json_page(&self, _path: &str) -> Option<String> {
        None
    }
    /// Any other document served at `path` (the status page and its assets), if there is one.
    fn page(&self, _path: &str) -> Option<Page> {
        None
    }
    /// A document computed from the request's query (`/debug/describe/*`), if `path` names
    /// one: the page, or the HTTP status and plain-text reason it is refused with.
    fn query_page(&self, _path: &str, _query: &str) -> Option<Result<Page, (StatusCode, String)>> {
        None
    }
    /// The paths of `json_page` and `page`, for the not-found hint (", /debug/rotation, /ui").
    fn more_paths(&self) -> &'static str {
        ""
    }
}

/// A document the HTTP port serves besides metrics and health.
pub struct Page {
    pub content_type: &'static str,
    pub body: String,
}

/// Whether `path` names pods and SPIFFE IDs, and is served only to loopback and
/// `listen.debug_from` callers: `/debug/*` and the status page `/ui`.
fn restricted(path: &str) -> bool {
    path.starts_with("/debug/") || path == "/ui" || path.starts_with("/ui/")
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `stop` fires.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<dyn Health>,
    limits: HttpLimits,
    stop: watch::Receiver<bool>,
) {
    let conn_stop = stop.clone();
    crate::net::accept_loop(listener, limits.max_connections, "HTTP", stop, move |tcp, permit| {
        let (metrics, health) = (metrics.clone(), health.clone());
        let debug_ok = crate::net::debug_allowed(
            tcp.peer_addr().ok().map(|a| a.ip()),
            &limits.debug_from,
        );
        let mut stop = conn_stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = match req.uri().path() {
                    "/metrics" => text(StatusCode::OK, metrics.render()),
                    "/healthz" => text(StatusCode::OK, "ok\n".into()),
                    "/readyz" => {
                        let details: String =
                            health.details().iter().map(|d| format!("  {d}\n")).collect();
                        match health.ready() {
                            Ok(()) => text(StatusCode::OK, format!("ready\n{details}")),
                            Err(why) => text(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("not ready: {why}\n{details}"),
                            ),
                        }
                    }
                    other if restricted(other) && !debug_ok => text(
                        StatusCode::FORBIDDEN,
                        format!("{other} is served to loopback callers only (use kubectl port-forward), or to the ranges in listen.debug_from\n"),
                    ),
                    other => match health.query_page(other, req.uri().query().unwrap_or("")) {
                        Some(Ok(page)) => Response::builder()
                            .status(StatusCode::OK)
                            .header("content-type", page.content_type)
                            .header("cache-control", "no-store")
                            .body(Full::new(Bytes::from(page.body)))
                            .expect("static response parts"),
                        Some(Err((code, why))) => text(code, format!("{why}\n")),
                        None => match health.json_page(other) {
                        Some(body) => Response::builder()
                            .status(StatusCode::OK)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body)))
                            .expect("static response parts"),
                        None => match health.page(other) {
                            Some(page) => Response::builder()
                                .status(StatusCode::OK)
                                .header("content-type", page.content_type)
                                .header("cache-control", "no-store")
                                .header("x-content-type-options", "nosniff")
                                .header(
                                    "content-security-policy",
                                    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                                )
                                .body(Full::new(Bytes::from(page.body)))
                                .expect("static response parts"),
                            None => text(
                                StatusCode::NOT_FOUND,
                                format!("no such endpoint {other}; try /metrics, /healthz, /readyz{}\n", health.more_paths()),
                            ),
                        },
                        },
                    },
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            let (io, idle) = IdleIo::new(tcp);
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(io), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = idle.expired(limits.idle_timeout) => {
                    tracing::debug!("HTTP connection idle; closed");
                }
                () = stopping(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn).await;
                }
            }
        });
        std::future::ready(true)
    })
    .await;
}

/// Limits of the HTTP listener.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    pub header_read_timeout: std::time::Duration,
    pub idle_timeout: std::time::Duration,
    pub max_connections: usize,
    /// Besides loopback, who may read `/debug/*` (istiod guards its debug handlers the same
    /// way: `xds/debug.go` `allowAuthenticatedOrLocalhost`).
    pub debug_from: Vec<crate::net::Cidr>,
}

/// A connection that remembers when it last read or wrote, so an idle one can be closed.
struct IdleIo<T> {
    io: T,
    last: Arc<std::sync::Mutex<tokio::time::Instant>>,
}

struct IdleWatch(Arc<std::sync::Mutex<tokio::time::Instant>>);

impl<T> IdleIo<T> {
    fn new(io: T) -> (Self, IdleWatch) {
        let last = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
        (
            Self {
                io,
                last: last.clone(),
            },
            IdleWatch(last),
        )
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
    }
}

impl IdleWatch {
    /// Completes once nothing was read or written for `idle`.
    async fn expired(&self, idle: std::time::Duration) {
        loop {
            let last = *self.0.lock().unwrap_or_else(|e| e.into_inner());
            let at = last + idle;
            if tokio::time::Instant::now() >= at {
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Whether text logs are coloured: only on a terminal, and never with `NO_COLOR` set (no-color.org).
/// Logs written to a file or a pipe (a container's log) carry no escape codes.
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global tracing subscriber (`RUST_LOG` overrides `level`). Safe to call twice.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = use_colour(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(
            !use_colour(false, None),
            "a file or a pipe gets no escape codes"
        );
        assert!(!use_colour(true, Some(std::ffi::OsStr::new("1"))));
        assert!(use_colour(true, Some(std::ffi::OsStr::new(""))));
    }
}

#[cfg(test)]
mod restricted_tests {
    use super::restricted;

    /// `/ui` names pods and SPIFFE IDs like `/debug/*`: both are held to `listen.debug_from`.
    #[test]
    fn the_status_page_is_held_like_debug() {
        for p in [
            "/ui",
            "/ui/",
            "/ui/status.json",
            "/ui/app.js",
            "/debug/rotation",
        ] {
            assert!(restricted(p), "{p}");
        }
        for p in ["/metrics", "/healthz", "/readyz", "/uix", "/"] {
            assert!(!restricted(p), "{p}");
        }
    }
}
