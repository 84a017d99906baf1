//! The xDS protocol, once, for every resource type meshid serves (SDS, EDS): state of the
//! world (Stream*) and incremental (Delta*). A per-stream `ResourceSource` says which names
//! exist, renders them, versions them, and wakes the stream when something may have changed;
//! the engine decides what to send. The rules (Envoy's `api-docs/xds_protocol.rst`, istiod's
//! `pilot/pkg/xds` `shouldRespond`/`shouldRespondDelta`, go-control-plane `pkg/server`):
//! - `version_info` and `nonce` on every response. SotW: a request whose nonce is not the
//!   latest one sent is stale and ignored; the first request of a stream is answered whatever
//!   its nonce (a client reconnecting after a server restart carries the old server's nonce).
//!   Delta: subscription changes count whatever the nonce.
//! - `error_detail` marks a NACK: logged and counted, never answered with the same resources.
//! - Unknown names do not end the stream: they stay in the subscription, are left out of SotW
//!   responses (Delta: listed in `removed_resources`, "Knowing When a Requested Resource Does
//!   Not Exist"), are counted (`meshid_xds_unknown_resource_names_total{type}`) and logged once
//!   when subscribed, and are sent as soon as they exist.
//! - SotW: a response is sent when the subscription gains names or a subscribed resource
//!   changes; a request that only drops names (including the empty list, "no longer interested
//!   in any resources") gets none, and no response is ever empty (for these types an empty
//!   response is a no-op for the client). A resource that stops existing is left out, or, where
//!   the source says so (EDS), replaced by a tombstone (an empty assignment).
//! - Delta: every name in `resource_names_subscribe` is answered, even one the client already
//!   holds at the current version ("the server *must* still provide those resources"); only on
//!   a stream's first request does `initial_resource_versions` spare resources the client holds.
//! - Per stream at most `max_names` names are subscribed (`initial_resource_versions` too), each
//!   at most `MAX_NAME_LEN` bytes: beyond that the stream ends with `ResourceExhausted` /
//!   `InvalidArgument` naming the limit and its config key.
//! - On a change, only streams whose subscribed resources changed version get a response.
//! - A request carrying the latest nonce and no `error_detail` ACKs that response: the source
//!   hears `on_ack` with what the client now holds (propagation tracking), and `on_subscribe`
//!   after every subscription change.

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

/// The longest resource name a stream may subscribe to: every name meshid serves is far
/// shorter (a DNS name is at most 253 bytes), and a stream's memory stays bounded.
pub const MAX_NAME_LEN: usize = 1024;

/// One stream's view of a resource type.
pub trait ResourceSource: Send + 'static {
    /// The type URL served.
    fn type_url(&self) -> &'static str;
    /// Who the stream belongs to, for logs.
    fn peer(&self) -> String;
    /// Why `name` is not served now, `None` when it is. Unknown names are kept (they may
    /// appear later), never an error.
    fn unknown_reason(&self, name: &str) -> Option<String>;
    /// The current version of `name`, `None` if it does not exist now.
    fn version(&mut self, name: &str) -> Result<Option<String>, Status>;
    /// The resource itself.
    fn render(&mut self, name: &str) -> Result<Option<Any>, Status>;
    /// What a SotW response carries for `name` once it stops existing after having been sent
    /// (SotW cannot delete these types); `None` leaves it out.
    fn tombstone(&self, _name: &str) -> Option<Any> {
        None
    }
    /// Completes when resources may have changed; `false` when the source is gone.
    fn changed<'a>(
        &'a mut self,
        subscribed: &'a BTreeSet<String>,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>>;
    /// A low-cardinality metric label for `name`.
    fn label(name: &str) -> String
    where
        Self: Sized;
    /// The subscription changed (after a request was applied).
    fn on_subscribe(&mut self, _subscribed: &BTreeSet<String>) {}
    /// The client ACKed the latest response: it now holds these `(name, version)` pairs.
    fn on_ack(&mut self, _acked: &[(String, String)]) {}
}

/// Counters and limits shared by every stream of one xDS service.
#[derive(Clone)]
pub struct XdsMetrics {
    pub streams: Gauge,
    pub pushes: Family<Vec<(String, String)>, Counter>,
    pub nacks: Counter,
    pub latency: Histogram,
    /// Unknown names subscribed (`meshid_xds_unknown_resource_names_total{type}`).
    pub unknown_names: Counter,
    /// Short name of the service (`sds`, `eds`): log field and config key suffix.
    pub kind: &'static str,
    /// Names one stream may subscribe to at once.
    pub max_names: usize,
}

impl XdsMetrics {
    /// Refuses a subscription of `total` names, or a name that is too long, naming the limit.
    fn check_limits<'a>(
        &self,
        total: usize,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), Status> {
        if total > self.max_names {
            return Err(Status::resource_exhausted(format!(
                "{total} resource names on one {} stream; the limit is {} (xds.max_resource_names_per_stream.{})",
                self.kind, self.max_names, self.kind
            )));
        }
        if let Some(long) = names.into_iter().find(|n| n.len() > MAX_NAME_LEN) {
            let start: String = long.chars().take(64).collect();
            return Err(Status::invalid_argument(format!(
                "resource name {start:?}... is {} bytes; names are at most {MAX_NAME_LEN} bytes",
                long.len()
            )));
        }
        Ok(())
    }
}

/// Counts and logs (once per subscription) the names in `added` that are not served now.
fn note_unknown<'a, R: ResourceSource>(
    res: &R,
    metrics: &XdsMetrics,
    added: impl IntoIterator<Item = &'a String>,
) {
    let unknown: Vec<(&str, String)> = added
        .into_iter()
        .filter_map(|n| res.unknown_reason(n).map(|why| (n.as_str(), why)))
        .collect();
    if unknown.is_empty() {
        return;
    }
    metrics.unknown_names.inc_by(unknown.len() as u64);
    tracing::info!(peer = %res.peer(), service = metrics.kind, unknown = ?unknown,
        "subscribed to resource names not served now; kept, and sent if they appear");
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

/// Starts a state-of-the-world stream.
pub fn spawn_sotw<R: ResourceSource>(
    res: R,
    inbound: Streaming<DiscoveryRequest>,
    metrics: Arc<XdsMetrics>,
    stop: watch::Receiver<bool>,
) -> Out<DiscoveryResponse> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(drive(Sotw::new(res, tx, metrics), inbound, stop));
    unboxed(rx)
}

/// Starts an incremental stream.
pub fn spawn_delta<R: ResourceSource>(
    res: R,
    inbound: Streaming<DeltaDiscoveryRequest>,
    metrics: Arc<XdsMetrics>,
    stop: watch::Receiver<bool>,
) -> Out<DeltaDiscoveryResponse> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(drive(Delta::new(res, tx, metrics), inbound, stop));
    unboxed(rx)
}

/// A response on its way to the client. Boxed: a channel allocates its slots in blocks of 32
/// whatever its bound, and an unboxed `Result<DiscoveryResponse, Status>` would make that
/// block ~5 KiB for every open stream.
type Queued<T> = Box<Result<T, Status>>;

fn unboxed<T: Send + 'static>(rx: mpsc::Receiver<Queued<T>>) -> Out<T> {
    use futures::StreamExt;
    Box::pin(ReceiverStream::new(rx).map(|item| *item))
}

// === the stream loop both flavours share ===

/// The resource source, the subscription and the response sender of a stream, borrowed at once.
type Parts<'a, R, T> = (&'a mut R, &'a BTreeSet<String>, &'a mpsc::Sender<Queued<T>>);

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
    /// A request that could not be read (too large, malformed): the stream ends with its status.
    Unreadable(Status),
    Changed,
    Closed,
    Stop,
}

/// The status a stream ends with when a request cannot be read, as grpc-go's server returns
/// the error of `RecvMsg`: a message above the limit is RESOURCE_EXHAUSTED (grpc-go
/// `recvAndDecompress`: "received message larger than max"; tonic's decoder says OUT_OF_RANGE),
/// naming the key that sets the limit. Before, the stream just ended with OK and the client
/// never learned why.
fn unreadable(status: Status) -> Status {
    use tonic::Code::{OutOfRange, ResourceExhausted};
    if matches!(status.code(), OutOfRange | ResourceExhausted) {
        return Status::resource_exhausted(format!(
            "{}; the server's limit is limits.xds_max_request_bytes",
            status.message()
        ));
    }
    status
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
                    Ok(None) => Step::Closed,
                    Err(status) => Step::Unreadable(status),
                },
                alive = res.changed(subscribed) => if alive { Step::Changed } else { Step::Closed },
                _ = tx.closed() => Step::Closed,
                () = crate::shutdown::stopping(&mut stop) => Step::Stop,
            }
        };
        // Boxed: the stream's task stays the size of its idle wait, not of its busiest step.
        let result = match step {
            Step::Request(req) => Box::pin(f.on_request(req)).await,
            Step::Changed => Box::pin(f.on_change(Instant::now())).await,
            Step::Unreadable(status) => Err(unreadable(status)),
            Step::Closed => return,
            Step::Stop => Err(Status::unavailable("meshid is shutting down; reconnect")),
        };
        if let Err(status) = result {
            let _ = f.parts().2.send(Box::new(Err(status))).await;
            return;
        }
    }
}

// === state of the world ===

/// The version recorded for a resource answered by its tombstone.
const GONE: &str = "";

struct Sotw<R> {
    res: R,
    subscribed: BTreeSet<String>,
    /// Versions in the last response (`GONE` for a tombstone).
    sent: BTreeMap<String, String>,
    version: u64,
    nonce: u64,
    /// The nonce of the latest response; empty until the first one.
    last_nonce: String,
    tx: mpsc::Sender<Queued<DiscoveryResponse>>,
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
    /// A new stream's state, answering through `tx`.
    fn new(res: R, tx: mpsc::Sender<Queued<DiscoveryResponse>>, metrics: Arc<XdsMetrics>) -> Self {
        Self {
            res,
            subscribed: BTreeSet::new(),
            sent: BTreeMap::new(),
            version: 0,
            nonce: 0,
            last_nonce: String::new(),
            tx,
            metrics,
        }
    }

    async fn handle_request(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        check_type(&req.type_url, self.res.type_url())?;
        // Nothing sent yet on this stream: whatever nonce the request carries (a reconnect to a
        // restarted server), it is an initial request (istiod shouldRespond: no previous info).
        let initial = req.response_nonce.is_empty() || self.last_nonce.is_empty();
        if !initial && req.response_nonce != self.last_nonce {
            tracing::debug!(peer = %self.res.peer(), nonce = %req.response_nonce, latest = %self.last_nonce, "stale xDS request ignored");
            return Ok(());
        }
        let names: BTreeSet<String> = req.resource_names.into_iter().collect();
        self.metrics.check_limits(names.len(), &names)?;
        if !initial && req.error_detail.is_none() {
            // The latest response is acknowledged: the client holds what it carried.
            let acked: Vec<(String, String)> = self
                .sent
                .iter()
                .filter(|(_, v)| v.as_str() != GONE)
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            self.res.on_ack(&acked);
        }
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
        let added = names.difference(&self.subscribed).count() > 0;
        note_unknown(&self.res, &self.metrics, names.difference(&self.subscribed));
        self.subscribed = names;
        self.sent.retain(|n, _| self.subscribed.contains(n));
        self.res.on_subscribe(&self.subscribed);
        if !initial && !added {
            return Ok(()); // only names dropped: nothing new to send (istiod shouldRespond)
        }
        let now = self.current()?;
        self.push(now, Instant::now()).await
    }

    /// The versions of the subscribed resources that exist now (`GONE` for tombstones).
    fn current(&mut self) -> Result<BTreeMap<String, String>, Status> {
        let mut now = BTreeMap::new();
        for name in &self.subscribed {
            match self.res.version(name)? {
                Some(v) => {
                    now.insert(name.clone(), v);
                }
                None if self.sent.contains_key(name) && self.res.tombstone(name).is_some() => {
                    now.insert(name.clone(), GONE.to_owned());
                }
                None => {}
            }
        }
        Ok(now)
    }

    async fn push_if_changed(&mut self, started: Instant) -> Result<(), Status> {
        let now = self.current()?;
        if now != self.sent {
            self.push(now, started).await?;
        }
        Ok(())
    }

    /// Sends `now`'s resources; an empty response is never sent.
    async fn push(
        &mut self,
        mut now: BTreeMap<String, String>,
        started: Instant,
    ) -> Result<(), Status> {
        let mut resources = Vec::with_capacity(now.len());
        let mut missing = Vec::new();
        for (name, version) in &now {
            let any = if version == GONE {
                self.res.tombstone(name)
            } else {
                self.res.render(name)?
            };
            match any {
                Some(any) => resources.push(any),
                None => missing.push(name.clone()),
            }
        }
        for name in missing {
            now.remove(&name);
        }
        if resources.is_empty() {
            self.sent = now;
            return Ok(());
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
        if self.tx.send(Box::new(Ok(resp))).await.is_err() {
            return Ok(()); // the client went away; run() notices
        }
        for name in now.keys() {
            self.metrics
                .pushes
                .get_or_create(&vec![("resource".into(), R::label(name))])
                .inc();
        }
        self.sent = now;
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
    /// Subscribed names to answer in the next response even if unchanged (with the resource,
    /// or in `removed_resources` when it does not exist).
    answer: BTreeSet<String>,
    /// Whether a request has been seen on this stream.
    started: bool,
    nonce: u64,
    last_nonce: String,
    tx: mpsc::Sender<Queued<DeltaDiscoveryResponse>>,
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
    /// A new stream's state, answering through `tx`.
    fn new(
        res: R,
        tx: mpsc::Sender<Queued<DeltaDiscoveryResponse>>,
        metrics: Arc<XdsMetrics>,
    ) -> Self {
        Self {
            res,
            subscribed: BTreeSet::new(),
            sent: HashMap::new(),
            answer: BTreeSet::new(),
            started: false,
            nonce: 0,
            last_nonce: String::new(),
            tx,
            metrics,
        }
    }

    async fn handle_request(&mut self, mut req: DeltaDiscoveryRequest) -> Result<(), Status> {
        check_type(&req.type_url, self.res.type_url())?;
        // What a (re)connecting client holds counts on a stream's first request only, whatever
        // its nonce (istiod shouldRespondDelta: no previous info means initial or reconnect).
        let initial = if self.started {
            HashMap::new()
        } else {
            std::mem::take(&mut req.initial_resource_versions)
        };
        self.started = true;
        if !req.response_nonce.is_empty() && req.response_nonce == self.last_nonce {
            match &req.error_detail {
                Some(d) => {
                    self.metrics.nacks.inc();
                    tracing::warn!(peer = %self.res.peer(), code = d.code, detail = %d.message, "xDS delta NACK");
                }
                None => {
                    tracing::debug!(peer = %self.res.peer(), nonce = %req.response_nonce, "xDS delta ACK");
                    let acked: Vec<(String, String)> = self
                        .sent
                        .iter()
                        .map(|(n, v)| (n.clone(), v.clone()))
                        .collect();
                    self.res.on_ack(&acked);
                }
            }
        }
        // Subscription changes count whatever the nonce.
        for n in &req.resource_names_unsubscribe {
            self.subscribed.remove(n);
            self.sent.remove(n);
            self.answer.remove(n);
        }
        let added: BTreeSet<&String> = req
            .resource_names_subscribe
            .iter()
            .filter(|n| !self.subscribed.contains(*n))
            .collect();
        self.metrics.check_limits(
            (self.subscribed.len() + added.len()).max(initial.len()),
            req.resource_names_subscribe.iter().chain(initial.keys()),
        )?;
        note_unknown(&self.res, &self.metrics, added);
        for name in req.resource_names_subscribe {
            match initial.get(&name) {
                Some(held) => {
                    self.sent.insert(name.clone(), held.clone());
                }
                None => {
                    self.answer.insert(name.clone());
                }
            }
            self.subscribed.insert(name);
        }
        self.res.on_subscribe(&self.subscribed);
        self.push_changed(Instant::now()).await
    }

    async fn push_changed(&mut self, started: Instant) -> Result<(), Status> {
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let answer = std::mem::take(&mut self.answer);
        for name in &self.subscribed {
            let must = answer.contains(name);
            let version = self.res.version(name)?;
            if version.is_some() && !must && self.sent.get(name) == version.as_ref() {
                continue;
            }
            let any = match &version {
                Some(_) => self.res.render(name)?,
                None => None,
            };
            match (version, any) {
                (Some(version), Some(any)) => {
                    self.sent.insert(name.clone(), version.clone());
                    resources.push(Resource {
                        name: name.clone(),
                        version,
                        resource: Some(any),
                        ..Default::default()
                    });
                }
                _ => {
                    if self.sent.remove(name).is_some() || must {
                        removed.push(name.clone());
                    }
                }
            }
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
        let _ = self.tx.send(Box::new(Ok(resp))).await;
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

/// Fuzzing (`crate::fuzzing::xds`): one SotW and one Delta stream, each driven through its
/// decoded requests by the state machines the services run, against a source that serves the
/// names starting with `r` (shorter than 64 bytes) at a version that moves on with every
/// request. Checks that a response only ever carries served names and that nonces never repeat.
#[doc(hidden)]
pub fn fuzz_streams(sotw: Vec<DiscoveryRequest>, delta: Vec<DeltaDiscoveryRequest>) {
    struct Source(u64);
    impl ResourceSource for Source {
        fn type_url(&self) -> &'static str {
            super::SECRET_TYPE_URL
        }
        fn peer(&self) -> String {
            "fuzz".into()
        }
        fn unknown_reason(&self, name: &str) -> Option<String> {
            (!served(name)).then(|| "not served".into())
        }
        fn version(&mut self, name: &str) -> Result<Option<String>, Status> {
            Ok(served(name).then(|| format!("v{}", self.0 / 2)))
        }
        fn render(&mut self, name: &str) -> Result<Option<Any>, Status> {
            Ok(served(name).then(|| Any {
                type_url: super::SECRET_TYPE_URL.into(),
                value: name.as_bytes().to_vec(),
            }))
        }
        fn changed<'a>(
            &'a mut self,
            _: &'a BTreeSet<String>,
        ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
            Box::pin(std::future::pending())
        }
        fn label(_: &str) -> String {
            "fuzz".into()
        }
    }
    fn served(name: &str) -> bool {
        name.starts_with('r') && name.len() < 64
    }
    let metrics = Arc::new(XdsMetrics {
        streams: Gauge::default(),
        pushes: Family::default(),
        nacks: Counter::default(),
        latency: Histogram::new([0.1]),
        unknown_names: Counter::default(),
        kind: "sds",
        max_names: 128,
    });
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return;
    };
    /// Feeds `reqs` to one stream's state machine, one at a time, and checks every response
    /// it queued: a new nonce, and only served names (`names`).
    async fn run<F: Flavour<Res = Source>>(
        mut f: F,
        rx: &mut mpsc::Receiver<Queued<F::Resp>>,
        reqs: Vec<F::Req>,
        names: impl Fn(&F::Resp) -> (String, Vec<String>),
    ) {
        let mut nonces = BTreeSet::new();
        for req in reqs {
            f.parts().0 .0 += 1;
            let ended = f.on_request(req).await.is_err();
            while let Ok(resp) = rx.try_recv() {
                if let Ok(r) = *resp {
                    let (nonce, sent) = names(&r);
                    assert!(nonces.insert(nonce), "a nonce repeats");
                    for name in sent {
                        assert!(served(&name), "an unserved name was sent: {name:?}");
                    }
                }
            }
            if ended {
                return;
            }
        }
    }
    rt.block_on(async {
        let (tx, mut rx) = mpsc::channel(1024);
        run(
            Sotw::new(Source(0), tx, metrics.clone()),
            &mut rx,
            sotw,
            |r| {
                let names = r.resources.iter();
                (
                    r.nonce.clone(),
                    names
                        .map(|a| String::from_utf8_lossy(&a.value).into_owned())
                        .collect(),
                )
            },
        )
        .await;
        let (tx, mut rx) = mpsc::channel(1024);
        run(Delta::new(Source(0), tx, metrics), &mut rx, delta, |r| {
            (
                r.nonce.clone(),
                r.resources.iter().map(|x| x.name.clone()).collect(),
            )
        })
        .await;
    });
}
