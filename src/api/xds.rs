//! The xDS protocol, once, for every resource type meshid serves (SDS, EDS): state of the
//! world (Stream*) and incremental (Delta*). A per-stream `ResourceSource` says which names
//! exist, renders them, versions them, and wakes the stream when something may have changed;
//! the engine decides what to send:
//! - `version_info` and `nonce` on every response; a request whose nonce is not the latest is
//!   stale and ignored (delta: subscription changes still count);
//! - `error_detail` marks a NACK: logged and counted, never answered with the same resources;
//! - the subscription may change on any request; unknown names are refused, naming them;
//! - on a change, only streams whose subscribed resources changed version get a response.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::Instant,
};

use envoy_types::pb::{
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        Resource,
    },
    google::protobuf::Any,
};
use futures::Stream;
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// A boxed response stream for tonic.
pub type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// One stream's view of a resource type.
pub trait ResourceSource: Send + 'static {
    /// The type URL served.
    fn type_url(&self) -> &'static str;
    /// Who the stream belongs to, for logs.
    fn peer(&self) -> String;
    /// Refuses names that are not served, naming them.
    fn check_names(&self, names: &mut dyn Iterator<Item = &String>) -> Result<(), Status>;
    /// The current version of `name`, `None` if it does not exist now.
    fn version(&mut self, name: &str) -> Result<Option<String>, Status>;
    /// The resource itself.
    fn render(&mut self, name: &str) -> Result<Option<Any>, Status>;
    /// Completes when resources may have changed; `false` when the source is gone.
    fn changed<'a>(
        &'a mut self,
        subscribed: &'a BTreeSet<String>,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>>;
    /// A low-cardinality metric label for `name`.
    fn label(name: &str) -> String
    where
        Self: Sized;
}

/// Counters of one xDS service.
#[derive(Clone)]
pub struct XdsMetrics {
    pub streams: Gauge,
    pub pushes: Family<Vec<(String, String)>, Counter>,
    pub nacks: Counter,
    pub latency: Histogram,
}

struct OpenStream(Gauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn check_type(got: &str, want: &str) -> Result<(), Status> {
    if got.is_empty() || got == want {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "type_url {got:?} is not served here; this service serves {want}"
        )))
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Starts a state-of-the-world stream.
pub fn spawn_sotw<R: ResourceSource>(
    res: R,
    inbound: Streaming<DiscoveryRequest>,
    metrics: Arc<XdsMetrics>,
    stop: watch::Receiver<bool>,
) -> Out<DiscoveryResponse> {
    let (tx, rx) = mpsc::channel(4);
    let s = Sotw {
        res,
        subscribed: BTreeSet::new(),
        sent: BTreeMap::new(),
        version: 0,
        nonce: 0,
        last_nonce: String::new(),
        tx,
        metrics,
    };
    tokio::spawn(drive(s, inbound, stop));
    Box::pin(ReceiverStream::new(rx))
}

/// Starts an incremental stream.
pub fn spawn_delta<R: ResourceSource>(
    res: R,
    inbound: Streaming<DeltaDiscoveryRequest>,
    metrics: Arc<XdsMetrics>,
    stop: watch::Receiver<bool>,
) -> Out<DeltaDiscoveryResponse> {
    let (tx, rx) = mpsc::channel(4);
    let d = Delta {
        res,
        subscribed: BTreeSet::new(),
        sent: HashMap::new(),
        nonce: 0,
        last_nonce: String::new(),
        tx,
        metrics,
    };
    tokio::spawn(drive(d, inbound, stop));
    Box::pin(ReceiverStream::new(rx))
}

// === the stream loop both flavours share ===

/// The resource source, the subscription and the response sender of a stream, borrowed at once.
type Parts<'a, R, T> = (
    &'a mut R,
    &'a BTreeSet<String>,
    &'a mpsc::Sender<Result<T, Status>>,
);

/// One flavour of xDS stream (state of the world, or delta).
trait Flavour: Send + 'static {
    type Req: prost::Message + Default + Send + 'static;
    type Resp: Send + 'static;
    type Res: ResourceSource;
    /// The resource source, the current subscription and the response sender, borrowed at once.
    fn parts(&mut self) -> Parts<'_, Self::Res, Self::Resp>;
    fn metrics(&self) -> &XdsMetrics;
    fn on_request(&mut self, req: Self::Req) -> impl Future<Output = Result<(), Status>> + Send;
    fn on_change(&mut self, started: Instant) -> impl Future<Output = Result<(), Status>> + Send;
}

enum Step<T> {
    Request(T),
    Changed,
    Closed,
    Stop,
}

/// Serves one stream until the client leaves, the source is gone, or the server stops.
async fn drive<F: Flavour>(
    mut f: F,
    mut inbound: Streaming<F::Req>,
    mut stop: watch::Receiver<bool>,
) {
    f.metrics().streams.inc();
    let _open = OpenStream(f.metrics().streams.clone());
    loop {
        let step = {
            let (res, subscribed, tx) = f.parts();
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => Step::Request(req),
                    Ok(None) | Err(_) => Step::Closed,
                },
                alive = res.changed(subscribed) => if alive { Step::Changed } else { Step::Closed },
                _ = tx.closed() => Step::Closed,
                () = stopped(&mut stop) => Step::Stop,
            }
        };
        let result = match step {
            Step::Request(req) => f.on_request(req).await,
            Step::Changed => f.on_change(Instant::now()).await,
            Step::Closed => return,
            Step::Stop => Err(Status::unavailable("meshid is shutting down; reconnect")),
        };
        if let Err(status) = result {
            let _ = f.parts().2.send(Err(status)).await;
            return;
        }
    }
}

// === state of the world ===

struct Sotw<R> {
    res: R,
    subscribed: BTreeSet<String>,
    /// Versions in the last response.
    sent: BTreeMap<String, String>,
    version: u64,
    nonce: u64,
    last_nonce: String,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    metrics: Arc<XdsMetrics>,
}

impl<R: ResourceSource> Flavour for Sotw<R> {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    type Res = R;

    fn parts(&mut self) -> Parts<'_, R, DiscoveryResponse> {
        (&mut self.res, &self.subscribed, &self.tx)
    }

    fn metrics(&self) -> &XdsMetrics {
        &self.metrics
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        self.handle_request(req).await
    }

    async fn on_change(&mut self, started: Instant) -> Result<(), Status> {
        self.push_if_changed(started).await
    }
}

impl<R: ResourceSource> Sotw<R> {
    async fn handle_request(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        check_type(&req.type_url, self.res.type_url())?;
        let initial = req.response_nonce.is_empty();
        if !initial && req.response_nonce != self.last_nonce {
            tracing::debug!(peer = %self.res.peer(), nonce = %req.response_nonce, latest = %self.last_nonce, "stale xDS request ignored");
            return Ok(());
        }
        let names: BTreeSet<String> = req.resource_names.into_iter().collect();
        if let Some(detail) = &req.error_detail {
            self.metrics.nacks.inc();
            tracing::warn!(peer = %self.res.peer(), type_url = self.res.type_url(), version = %req.version_info,
                resources = ?names, code = detail.code, detail = %detail.message, "xDS NACK");
            if names == self.subscribed {
                return Ok(()); // never answer a NACK with the same resources again
            }
        } else if !initial && names == self.subscribed {
            tracing::debug!(peer = %self.res.peer(), version = %req.version_info, "xDS ACK");
            return Ok(());
        }
        self.res.check_names(&mut names.iter())?;
        self.subscribed = names;
        if self.subscribed.is_empty() {
            return Ok(());
        }
        self.push(Instant::now()).await
    }

    async fn push_if_changed(&mut self, started: Instant) -> Result<(), Status> {
        let mut now = BTreeMap::new();
        for name in self.subscribed.clone() {
            if let Some(v) = self.res.version(&name)? {
                now.insert(name, v);
            }
        }
        if now != self.sent {
            self.push(started).await?;
        }
        Ok(())
    }

    async fn push(&mut self, started: Instant) -> Result<(), Status> {
        let mut resources = Vec::with_capacity(self.subscribed.len());
        let mut sent = BTreeMap::new();
        for name in self.subscribed.clone() {
            let Some(version) = self.res.version(&name)? else {
                continue;
            };
            if let Some(any) = self.res.render(&name)? {
                resources.push(any);
                sent.insert(name, version);
            }
        }
        self.version += 1;
        self.nonce += 1;
        self.last_nonce = self.nonce.to_string();
        let resp = DiscoveryResponse {
            version_info: self.version.to_string(),
            resources,
            type_url: self.res.type_url().into(),
            nonce: self.last_nonce.clone(),
            ..Default::default()
        };
        if self.tx.send(Ok(resp)).await.is_err() {
            return Ok(()); // the client went away; run() notices
        }
        for name in sent.keys() {
            self.metrics
                .pushes
                .get_or_create(&vec![("resource".into(), R::label(name))])
                .inc();
        }
        self.sent = sent;
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

// === incremental ===

struct Delta<R> {
    res: R,
    subscribed: BTreeSet<String>,
    /// What the client holds: name → version.
    sent: HashMap<String, String>,
    nonce: u64,
    last_nonce: String,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    metrics: Arc<XdsMetrics>,
}

impl<R: ResourceSource> Flavour for Delta<R> {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    type Res = R;

    fn parts(&mut self) -> Parts<'_, R, DeltaDiscoveryResponse> {
        (&mut self.res, &self.subscribed, &self.tx)
    }

    fn metrics(&self) -> &XdsMetrics {
        &self.metrics
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        self.handle_request(req).await
    }

    async fn on_change(&mut self, started: Instant) -> Result<(), Status> {
        self.push_changed(started).await
    }
}

impl<R: ResourceSource> Delta<R> {
    async fn handle_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        check_type(&req.type_url, self.res.type_url())?;
        if req.response_nonce.is_empty() {
            // A (re)connecting client tells us what it already holds.
            self.sent.extend(req.initial_resource_versions);
        } else if req.response_nonce == self.last_nonce {
            match &req.error_detail {
                Some(d) => {
                    self.metrics.nacks.inc();
                    tracing::warn!(peer = %self.res.peer(), code = d.code, detail = %d.message, "xDS delta NACK");
                }
                None => {
                    tracing::debug!(peer = %self.res.peer(), nonce = %req.response_nonce, "xDS delta ACK")
                }
            }
        }
        // Subscription changes count whatever the nonce.
        for n in &req.resource_names_unsubscribe {
            self.subscribed.remove(n);
            self.sent.remove(n);
        }
        self.res
            .check_names(&mut req.resource_names_subscribe.iter())?;
        self.subscribed.extend(req.resource_names_subscribe);
        self.push_changed(Instant::now()).await
    }

    async fn push_changed(&mut self, started: Instant) -> Result<(), Status> {
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for name in self.subscribed.clone() {
            let Some(version) = self.res.version(&name)? else {
                if self.sent.remove(&name).is_some() {
                    removed.push(name);
                }
                continue;
            };
            if self.sent.get(&name) == Some(&version) {
                continue;
            }
            let Some(any) = self.res.render(&name)? else {
                continue;
            };
            self.sent.insert(name.clone(), version.clone());
            resources.push(Resource {
                name,
                version,
                resource: Some(any),
                ..Default::default()
            });
        }
        if resources.is_empty() && removed.is_empty() {
            return Ok(());
        }
        self.nonce += 1;
        self.last_nonce = self.nonce.to_string();
        for r in &resources {
            self.metrics
                .pushes
                .get_or_create(&vec![("resource".into(), R::label(&r.name))])
                .inc();
        }
        let resp = DeltaDiscoveryResponse {
            system_version_info: self.nonce.to_string(),
            resources,
            type_url: self.res.type_url().into(),
            removed_resources: removed,
            nonce: self.last_nonce.clone(),
            ..Default::default()
        };
        let _ = self.tx.send(Ok(resp)).await;
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// A short content version: the first 8 bytes of SHA-256 over the encoded resource, hex.
pub fn content_version(any: &Any) -> String {
    crate::ca::cert::hex(&ring::digest::digest(&ring::digest::SHA256, &any.value).as_ref()[..8])
}
