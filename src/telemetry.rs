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

type Labels = Vec<(String, String)>;

/// Every metric meshid exports. Names follow istiod's CA metrics with a `meshid_` prefix.
pub struct Metrics {
    registry: Registry,
    pub csr_requests: Counter,
    pub auth_failures: Family<Labels, Counter>,
    pub sign_errors: Family<Labels, Counter>,
    pub certs_issued: Family<Labels, Counter>,
    pub root_expiry: Gauge,
    pub chain_expiry: Gauge,
    pub sds_streams: Gauge,
    pub sds_pushes: Family<Labels, Counter>,
    pub sds_nacks: Counter,
    pub sds_push_latency: Histogram,
    pub eds_streams: Gauge,
    pub eds_pushes: Family<Labels, Counter>,
    pub eds_nacks: Counter,
    pub eds_push_latency: Histogram,
    pub discovery_endpoints: Family<Labels, Gauge>,
    pub discovery_mtls_coverage: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub discovery_mismatches: Gauge,
    pub identity_backend_up: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Self {
            csr_requests: Counter::default(),
            auth_failures: Family::default(),
            sign_errors: Family::default(),
            certs_issued: Family::default(),
            root_expiry: Gauge::default(),
            chain_expiry: Gauge::default(),
            sds_streams: Gauge::default(),
            sds_pushes: Family::default(),
            sds_nacks: Counter::default(),
            sds_push_latency: latency_histogram(),
            eds_streams: Gauge::default(),
            eds_pushes: Family::default(),
            eds_nacks: Counter::default(),
            eds_push_latency: latency_histogram(),
            discovery_endpoints: Family::default(),
            discovery_mtls_coverage: Family::default(),
            discovery_mismatches: Gauge::default(),
            identity_backend_up: Family::default(),
            registry: Registry::default(),
        };
        r.register(
            "meshid_csr_requests",
            "CreateCertificate requests received",
            m.csr_requests.clone(),
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
            "meshid_root_cert_expiry_timestamp_seconds",
            "notAfter of the root that anchors the signer",
            m.root_expiry.clone(),
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
        Self { registry: r, ..m }
    }

    /// Publishes the discovery counts.
    pub fn set_discovery(&self, st: &crate::discovery::DiscoveryStats) {
        self.discovery_endpoints
            .get_or_create(&Self::label("tls_mode", "istio"))
            .set(st.endpoints_istio as i64);
        self.discovery_endpoints
            .get_or_create(&Self::label("tls_mode", "disabled"))
            .set(st.endpoints_disabled as i64);
        for (ns, ratio) in &st.mtls_coverage {
            self.discovery_mtls_coverage
                .get_or_create(&Self::label("namespace", ns))
                .set(*ratio);
        }
        self.discovery_mismatches.set(st.sidecar_mismatches as i64);
    }

    /// One label, for the families above.
    pub fn label(key: &str, value: &str) -> Labels {
        vec![(key.to_owned(), value.to_owned())]
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

/// What the health endpoints report.
pub trait Health: Send + Sync + 'static {
    /// `Ok` when the server can do its job; otherwise why not.
    fn ready(&self) -> Result<(), String>;
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
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r { Ok((tcp, _)) => tcp, Err(_) => continue },
            _ = stop.wait_for(|s| *s) => return,
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = match req.uri().path() {
                    "/metrics" => text(StatusCode::OK, metrics.render()),
                    "/healthz" => text(StatusCode::OK, "ok\n".into()),
                    "/readyz" => match health.ready() {
                        Ok(()) => text(StatusCode::OK, "ready\n".into()),
                        Err(why) => text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    },
                    other => text(
                        StatusCode::NOT_FOUND,
                        format!("no such endpoint {other}; try /metrics, /healthz, /readyz\n"),
                    ),
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
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

/// Installs the global tracing subscriber (`RUST_LOG` overrides `level`). Safe to call twice.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
