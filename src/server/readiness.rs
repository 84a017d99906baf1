//! Readiness (the identity backends' probes) and what the HTTP port serves besides metrics.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    backoff::Backoff,
    clock::Clock,
    identity::{ClusterId, ClusterRouter, ProbeError},
    rotation::Propagation,
    shutdown::stopping,
    telemetry::{Health, Metrics, NotReady},
    trust::LiveCa,
};

/// Whether the default cluster's identity backend answered its last probe, and why not.
#[derive(Default)]
pub(super) struct Readiness {
    identity_ok: AtomicBool,
    why: Mutex<Option<ProbeError>>,
}

impl Health for Readiness {
    fn ready(&self) -> Result<(), NotReady> {
        if self.identity_ok.load(Ordering::Acquire) {
            Ok(())
        } else {
            let why = self.why.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Err(NotReady(Box::new(why.unwrap_or(ProbeError::NotProbedYet))))
        }
    }
}

/// What the HTTP port serves besides metrics: readiness and the rotation status.
pub(super) struct HttpSurface {
    pub(super) readiness: Arc<Readiness>,
    pub(super) rotation: RotationPage,
    /// Whether this replica leads, when replicas elect one.
    pub(super) leading: Option<watch::Receiver<bool>>,
    /// The status page.
    pub(super) ui: super::ui::Ui,
}

impl Health for HttpSurface {
    fn ready(&self) -> Result<(), NotReady> {
        self.readiness.ready()
    }

    /// The state this replica serves from and whether it can still read it, and whether it
    /// runs the schedules: with the API server gone a replica keeps issuing from the state it
    /// holds, and says so.
    fn details(&self) -> Vec<String> {
        let live = &self.rotation.live;
        let mut out = vec![match live.reload_problem() {
            None => format!(
                "CA state {}: generation {} in service",
                live.store_location(),
                live.current().generation
            ),
            Some(why) => format!(
                "CA state {}: generation {} in service; re-reading it fails ({why}): issuance goes on, state changes wait until it is readable",
                live.store_location(),
                live.current().generation
            ),
        }];
        if let Some(leading) = &self.leading {
            out.push(if *leading.borrow() {
                "leader: this replica runs the schedules (rotation, federation, ConfigMaps)".into()
            } else {
                "leader: another replica runs the schedules; this one serves".into()
            });
        }
        out
    }

    fn json_page(&self, path: &str) -> Option<String> {
        match path {
            crate::rotation::STATUS_PATH => Some(self.rotation.render()),
            super::ui::STATUS_JSON_PATH => Some(
                serde_json::to_string_pretty(&self.ui.status())
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
            ),
            _ => None,
        }
    }

    fn page(&self, path: &str) -> Option<crate::telemetry::Page> {
        use super::ui::page;
        let (content_type, body) = match path {
            "/ui" | "/ui/" => ("text/html; charset=utf-8", page::render(&self.ui.status())),
            "/ui/app.css" => ("text/css; charset=utf-8", page::APP_CSS.to_owned()),
            "/ui/app.js" => ("text/javascript; charset=utf-8", page::APP_JS.to_owned()),
            _ => return None,
        };
        Some(crate::telemetry::Page { content_type, body })
    }

    fn query_page(
        &self,
        path: &str,
        query: &str,
    ) -> Option<Result<crate::telemetry::Page, (hyper::StatusCode, String)>> {
        let kind = path.strip_prefix("/debug/describe/")?;
        Some(self.ui.describe(kind, query))
    }

    fn more_paths(&self) -> &'static str {
        ", /debug/rotation, /debug/describe/service?name=NAME.NS, /debug/describe/pod?name=NAME.NS, /ui, /ui/status.json"
    }
}

/// `GET /debug/rotation`: what every open SDS stream has ACKed, against the snapshot served now.
pub(super) struct RotationPage {
    pub(super) registry: Arc<Propagation>,
    pub(super) live: Arc<LiveCa>,
    pub(super) replica: String,
}

impl RotationPage {
    fn render(&self) -> String {
        let status =
            crate::rotation::status_of(&self.registry, &self.live.current(), &self.replica);
        serde_json::to_string_pretty(&status).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// Probes once: the default (local) cluster's backend gates readiness; a remote cluster's API
/// server being down is logged and exported (`meshid_identity_backend_up`) but does not take
/// this replica out of service for every local workload. Returns whether ready.
async fn probe_once(router: &ClusterRouter, readiness: &Readiness, metrics: &Metrics) -> bool {
    let up = |id: &ClusterId, ok: bool| {
        metrics
            .identity_backend_up
            .get_or_create(&Metrics::label("cluster", &id.0))
            .set(i64::from(ok));
    };
    for (id, result) in router.probe_remotes().await {
        if let Err(why) = &result {
            tracing::warn!(cluster = %id, %why, "remote cluster's identity backend is unavailable; its callers are refused until it recovers");
        }
        up(&id, result.is_ok());
    }
    let result = router.probe_default().await;
    up(router.default_cluster(), result.is_ok());
    match result {
        Ok(()) => {
            readiness.identity_ok.store(true, Ordering::Release);
            true
        }
        Err(why) => {
            tracing::warn!(%why, "identity backend not ready");
            *readiness.why.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            readiness.identity_ok.store(false, Ordering::Release);
            false
        }
    }
}

/// How often a ready replica re-probes its identity backends.
const PROBE_PERIOD: Duration = Duration::from_secs(30);

/// Probes until `stop`: every [`PROBE_PERIOD`] while ready, and on the shared [`Backoff`] (2 s
/// doubling to 10 s) while not, on the injected clock.
pub(super) async fn probe_loop(
    router: ClusterRouter,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(10));
    loop {
        let wait = if probe_once(&router, &readiness, &metrics).await {
            backoff.succeeded();
            PROBE_PERIOD
        } else {
            backoff.failed()
        };
        tokio::select! {
            () = crate::backoff::sleep(clock.as_ref(), wait) => {}
            () = stopping(&mut stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ProbeFuture, Token, TokenValidator, ValidateFuture};

    /// A backend whose probe says `up` or not.
    struct Backend(bool);

    impl TokenValidator for Backend {
        fn validate<'a>(&'a self, _: &'a Token) -> ValidateFuture<'a> {
            Box::pin(async { Err(crate::identity::IdentityError::NoToken) })
        }

        fn probe(&self) -> ProbeFuture<'_> {
            let up = self.0;
            Box::pin(async move {
                if up {
                    Ok(())
                } else {
                    Err(ProbeError::AccessReviewFailed("API server down".into()))
                }
            })
        }
    }

    fn router(local: bool, remote: bool) -> ClusterRouter {
        ClusterRouter::new(ClusterId("Kubernetes".into()), Arc::new(Backend(local)))
            .with_cluster(ClusterId("east".into()), Arc::new(Backend(remote)))
    }

    /// Issue 8 item 19: a remote cluster's API server does not gate readiness (the old loop
    /// probed every cluster and went unready on the first failure); it is exported instead.
    #[tokio::test]
    async fn only_the_default_cluster_gates_readiness() {
        let metrics = Metrics::new();
        let readiness = Readiness::default();
        assert!(probe_once(&router(true, false), &readiness, &metrics).await);
        assert!(readiness.ready().is_ok());
        let up = |c: &str| {
            metrics
                .identity_backend_up
                .get_or_create(&Metrics::label("cluster", c))
                .get()
        };
        assert_eq!((up("Kubernetes"), up("east")), (1, 0));
        assert!(!probe_once(&router(false, true), &readiness, &metrics).await);
        let why = readiness.ready().unwrap_err().to_string();
        assert!(why.contains("API server down"), "{why}");
    }
}
