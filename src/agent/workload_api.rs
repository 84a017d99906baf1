//! The SPIFFE Workload API on the agent's own Unix socket (no TLS, as the specification says):
//! service `SpiffeWorkloadAPI` without a proto package, so go-spiffe, py-spiffe and the `spiffe`
//! crate reach it unchanged through `SPIFFE_ENDPOINT_SOCKET=unix:///path`.
//!
//! - Every call must carry the metadata `workload.spiffe.io: true`, or it is refused with
//!   `InvalidArgument` (the specification's guard against browsers and proxies; SPIRE's agent
//!   answers the same).
//! - Callers are attested from the socket's peer credentials (`SO_PEERCRED`: pid, uid, gid).
//!   The agent holds one identity, its token's; `allow_uids`/`allow_gids` say which local
//!   callers get it (none configured: whoever can open the socket). Anyone else gets
//!   `PermissionDenied` "no identity issued", as from SPIRE's agent for a caller no entry selects.
//! - `FetchX509SVID` and `FetchX509Bundles` stream: a first answer once the agent holds an SVID
//!   (bundles: a trust bundle), then another on every renewal and every bundle change.
//! - The JWT-SVID methods answer `Unimplemented`: the agent issues X.509-SVIDs only.

use std::{collections::HashMap, sync::Arc};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{transport::server::UdsConnectInfo, Request, Response, Status};

use super::{
    view::{concat_der, View},
    AgentMetrics,
};
use crate::{
    api::workload::{
        spiffe_workload_api_server::SpiffeWorkloadApi, JwtBundlesRequest, JwtBundlesResponse,
        JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest, ValidateJwtsvidResponse,
        X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
    },
    shutdown::stopping,
    telemetry::Metrics,
};

/// The metadata every Workload API call must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Which local callers get the agent's identity.
#[derive(Clone, Debug, Default)]
pub struct CallerPolicy {
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
}

/// A caller, from the socket's peer credentials.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

impl CallerPolicy {
    fn allows(&self, caller: Option<Caller>) -> bool {
        if self.allow_uids.is_empty() && self.allow_gids.is_empty() {
            return true;
        }
        caller.is_some_and(|c| self.allow_uids.contains(&c.uid) || self.allow_gids.contains(&c.gid))
    }
}

/// The Workload API service.
#[derive(Clone)]
pub struct WorkloadApi {
    view: watch::Receiver<View>,
    policy: Arc<CallerPolicy>,
    metrics: Arc<AgentMetrics>,
    stop: watch::Receiver<bool>,
}

type Stream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

impl WorkloadApi {
    pub fn new(
        view: watch::Receiver<View>,
        policy: CallerPolicy,
        metrics: Arc<AgentMetrics>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            view,
            policy: Arc::new(policy),
            metrics,
            stop,
        }
    }

    fn refuse(&self, reason: &str, status: Status) -> Status {
        self.metrics
            .workload_api_refused
            .get_or_create(&Metrics::label("reason", reason))
            .inc();
        status
    }

    /// The security header, then the caller's credentials against the policy.
    fn admit<T>(&self, req: &Request<T>, method: &str) -> Result<Caller, Status> {
        let header = req
            .metadata()
            .get(SECURITY_HEADER)
            .and_then(|v| v.to_str().ok());
        if header != Some("true") {
            tracing::info!(
                method,
                "Workload API call without the security header refused"
            );
            return Err(self.refuse(
                "no-security-header",
                Status::invalid_argument("security header missing from request"),
            ));
        }
        let caller = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| Caller {
                pid: c.pid(),
                uid: c.uid(),
                gid: c.gid(),
            });
        if !self.policy.allows(caller) {
            tracing::info!(
                method,
                ?caller,
                "Workload API caller not selected; no identity issued"
            );
            return Err(self.refuse(
                "not-selected",
                Status::permission_denied("no identity issued"),
            ));
        }
        tracing::debug!(method, ?caller, "Workload API call");
        Ok(caller.unwrap_or(Caller {
            pid: None,
            uid: u32::MAX,
            gid: u32::MAX,
        }))
    }

    /// Streams `render(view)` now (when it has something) and after every change that alters
    /// it, until the client goes away or the agent stops.
    fn stream<T, F>(&self, render: F) -> Stream<T>
    where
        T: Send + 'static,
        F: Fn(&View) -> Option<(String, T)> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(2);
        let mut view = self.view.clone();
        let mut stop = self.stop.clone();
        let gauge = self.metrics.workload_api_streams.clone();
        tokio::spawn(async move {
            gauge.inc();
            let mut last = String::new();
            loop {
                let current = view.borrow_and_update().clone();
                if let Some((key, msg)) = render(&current) {
                    if key != last {
                        if tx.send(Ok(msg)).await.is_err() {
                            break;
                        }
                        last = key;
                    }
                }
                tokio::select! {
                    r = view.changed() => if r.is_err() { break },
                    _ = stopping(&mut stop) => break,
                    _ = tx.closed() => break,
                }
            }
            gauge.dec();
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// The X.509-SVID response for `v`, with a key saying when it changed.
pub fn x509_svid_response(v: &View) -> Option<(String, X509svidResponse)> {
    let svid = v.svid.as_ref()?;
    let own = svid.spiffe_id.trust_domain();
    let bundle = v.trust.roots_of(own).map(concat_der).unwrap_or_default();
    let federated_bundles: HashMap<String, Vec<u8>> = v
        .trust
        .domains
        .iter()
        .filter(|(td, _)| *td != own)
        .map(|(td, roots)| (td.id_string(), concat_der(roots)))
        .collect();
    let response = X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.spiffe_id.to_string(),
            x509_svid: svid.chain_der(),
            x509_svid_key: svid.key.secret_pkcs8_der().to_vec(),
            bundle,
            hint: String::new(),
        }],
        crl: v.trust.crls_der(),
        federated_bundles,
    };
    Some((format!("{}/{}", svid.serial, v.trust.seq), response))
}

/// The X.509 bundles response for `v`.
pub fn x509_bundles_response(v: &View) -> Option<(String, X509BundlesResponse)> {
    if v.trust.domains.is_empty() {
        return None;
    }
    let bundles = v
        .trust
        .domains
        .iter()
        .map(|(td, roots)| (td.id_string(), concat_der(roots)))
        .collect();
    Some((
        v.trust.seq.to_string(),
        X509BundlesResponse {
            crl: v.trust.crls_der(),
            bundles,
        },
    ))
}

fn no_jwt() -> Status {
    Status::unimplemented(
        "meshid's agent issues X.509-SVIDs only; JWT-SVIDs are not available here",
    )
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream<X509svidResponse>;
    type FetchX509BundlesStream = Stream<X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.admit(&request, "FetchX509SVID")?;
        Ok(Response::new(self.stream(x509_svid_response)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.admit(&request, "FetchX509Bundles")?;
        Ok(Response::new(self.stream(x509_bundles_response)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        self.admit(&request, "FetchJWTSVID")?;
        Err(no_jwt())
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.admit(&request, "FetchJWTBundles")?;
        Err(no_jwt())
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.admit(&request, "ValidateJWTSVID")?;
        Err(no_jwt())
    }
}
