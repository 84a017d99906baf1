//! Envoy EDS v3 for auto mTLS: `ClusterLoadAssignment`s named `outbound|<port>|<subset>|<fqdn>`
//! (Services, STATIC ServiceEntries, DestinationRule subsets), with
//! `envoy.transport_socket_match: {tlsMode: istio}` on the endpoints the one decision
//! (`discovery::plan`) marks, so the cluster's `tlsMode-istio` socket match picks mTLS for them
//! and raw_buffer for the rest. One locality per Kubernetes cluster (its name as the
//! sub-zone); endpoints kept from an unreachable cluster carry `meshid.discovery: {stale:
//! true}`. A ServiceEntry's cluster is served only to namespaces it is exported to. As istiod
//! builds EDS per proxy, each stream gets the endpoints as its own client would: the namespace
//! and pod its token names pick the DestinationRules that decide the metadata
//! (`DiscoveryView::endpoints_for`).
//! StreamEndpoints and DeltaEndpoints run on the shared xDS engine; FetchEndpoints is unary.
//!
//! Names: EDS serves the clusters of service ports discovery knows. A name of that form for a
//! service (or port) not known now is unknown: streams keep it, leave it out (Delta: list it in
//! `removed_resources`) and send it once the service appears; a malformed name is unknown for
//! good (kept, counted and logged, never sent). Neither ends the stream; FetchEndpoints refuses
//! both (`InvalidArgument` for malformed, `NotFound` for unknown clusters). When a cluster that
//! was sent goes away, SotW streams get an empty assignment for it (SotW cannot delete an
//! assignment; Envoy then drops its endpoints), Delta streams get it in `removed_resources`.
//! At most `xds.max_resource_names_per_stream.eds` names per stream.

use std::{collections::BTreeSet, future::Future, pin::Pin, sync::Arc};

use envoy_types::{
    pb::{
        envoy::{
            config::{
                core::v3::{
                    address, socket_address::PortSpecifier, Address, HealthStatus, Locality,
                    Metadata, SocketAddress,
                },
                endpoint::v3::{
                    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint,
                    LocalityLbEndpoints,
                },
            },
            service::{
                discovery::v3::{
                    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
                    DiscoveryResponse,
                },
                endpoint::v3::endpoint_discovery_service_server::EndpointDiscoveryService,
            },
        },
        google::protobuf::{value::Kind, Any, Struct, Value},
    },
    util::pack_any,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::{
    xds::{self, content_version, Out, ResourceSource, XdsMetrics},
    Authenticator,
};
use crate::{
    discovery::{DiscoveryView, EndpointEntry, TlsMode},
    identity::Identity,
    telemetry::Metrics,
};

/// The type URL of EDS resources.
pub const ENDPOINT_TYPE_URL: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const SOCKET_MATCH_KEY: &str = "envoy.transport_socket_match";
/// Endpoint metadata marking an endpoint kept from an unreachable cluster.
const STALE_KEY: &str = "meshid.discovery";

/// The EDS service.
#[derive(Clone)]
pub struct EdsService(Arc<Shared>);

struct Shared {
    auth: Authenticator,
    view: watch::Receiver<Arc<DiscoveryView>>,
    stop: watch::Receiver<bool>,
    xds: Arc<XdsMetrics>,
    /// Streams end at the caller's token expiry and after a maximum age, like SDS streams.
    lifetime: Option<(Arc<dyn crate::clock::Clock>, super::lifetime::StreamLimits)>,
}

impl EdsService {
    pub fn new(
        auth: Authenticator,
        view: watch::Receiver<Arc<DiscoveryView>>,
        stop: watch::Receiver<bool>,
        metrics: &Metrics,
    ) -> Self {
        let xds = Arc::new(XdsMetrics {
            streams: metrics.eds_streams.clone(),
            pushes: metrics.eds_pushes.clone(),
            nacks: metrics.eds_nacks.clone(),
            latency: metrics.eds_push_latency.clone(),
            unknown_names: metrics
                .xds_unknown_names
                .get_or_create(&Metrics::label("type", "eds"))
                .clone(),
            kind: "eds",
            max_names: super::config::DEFAULT_EDS_MAX_NAMES,
        });
        Self(Arc::new(Shared {
            auth,
            view,
            stop,
            xds,
            lifetime: None,
        }))
    }

    /// Bounds every stream by its caller's token expiry and `limits.max_age` on `clock`. Call
    /// before the service is shared.
    pub fn with_lifetime(
        self,
        clock: Arc<dyn crate::clock::Clock>,
        limits: super::lifetime::StreamLimits,
    ) -> Self {
        self.configure(|shared| {
            shared.lifetime = Some((clock, limits));
        })
    }

    /// `out`, ended at the stream's deadline when a lifetime is set.
    fn bounded<T: Send + 'static>(&self, identity: &Identity, out: Out<T>) -> Out<T> {
        match &self.0.lifetime {
            Some((clock, limits)) => {
                let deadline = super::lifetime::deadline(identity, limits, clock.now());
                // Nothing ends an EDS stream early: the end handle is dropped at once.
                let (_, ended) = super::lifetime::stream_end();
                super::lifetime::bound(out, clock, deadline, ended)
            }
            None => out,
        }
    }

    /// Caps the resource names one stream may subscribe to
    /// (`xds.max_resource_names_per_stream.eds`). Call before the service is shared.
    pub fn with_name_limit(self, max: usize) -> Self {
        self.configure(|shared| {
            Arc::make_mut(&mut shared.xds).max_names = max;
        })
    }

    /// Applies a setting while the service is being built. Settings after the service was
    /// cloned would reach only this copy, so that is a bug in the caller: it stops here.
    fn configure(mut self, set: impl FnOnce(&mut Shared)) -> Self {
        let shared = Arc::get_mut(&mut self.0)
            .expect("service settings are applied before the service is shared");
        set(shared);
        self
    }
}

fn string(v: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(v.into())),
    }
}

fn lb_endpoint(e: &EndpointEntry) -> LbEndpoint {
    let address = Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: e.address.clone(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(e.port))),
            ..Default::default()
        })),
    };
    let mut filter_metadata = std::collections::HashMap::new();
    if e.tls_mode == TlsMode::Istio {
        let tls = Struct {
            fields: [("tlsMode".to_owned(), string("istio"))]
                .into_iter()
                .collect(),
        };
        filter_metadata.insert(SOCKET_MATCH_KEY.to_owned(), tls);
    }
    if e.stale {
        // Kept from a cluster whose API server cannot be reached, and marked so.
        let mark = Struct {
            fields: [
                ("cluster".to_owned(), string(&e.cluster)),
                (
                    "stale".to_owned(),
                    Value {
                        kind: Some(Kind::BoolValue(true)),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        };
        filter_metadata.insert(STALE_KEY.to_owned(), mark);
    }
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
            address: Some(address),
            ..Default::default()
        })),
        health_status: if e.ready {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        } as i32,
        metadata: (!filter_metadata.is_empty()).then(|| Metadata {
            filter_metadata,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The assignment EDS serves for `name` (empty when the service has no endpoints or is gone:
/// the cluster still exists in the proxy's configuration). One locality per Kubernetes cluster
/// the endpoints come from, the cluster's name as its sub-zone.
pub fn load_assignment(name: &str, endpoints: &[EndpointEntry]) -> ClusterLoadAssignment {
    let mut localities: Vec<LocalityLbEndpoints> = Vec::new();
    for e in endpoints {
        let same = localities
            .last()
            .and_then(|l| l.locality.as_ref())
            .is_some_and(|l| l.sub_zone == e.cluster);
        if !same {
            localities.push(LocalityLbEndpoints {
                locality: Some(Locality {
                    sub_zone: e.cluster.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        if let Some(l) = localities.last_mut() {
            l.lb_endpoints.push(lb_endpoint(e));
        }
    }
    if localities.is_empty() {
        localities.push(LocalityLbEndpoints::default());
    }
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: localities,
        ..Default::default()
    }
}

/// Whether `name` has the form `outbound|<port>|<subset>|<service fqdn>`.
fn well_formed(name: &str) -> bool {
    let mut parts = name.split('|');
    matches!(
        (parts.next(), parts.next().map(|p| p.parse::<u16>().is_ok()), parts.next(), parts.next(), parts.next()),
        (Some("outbound"), Some(true), Some(_), Some(h), None) if !h.is_empty()
    )
}

const FORM: &str = "outbound|<port>|<subset>|<service fqdn>";

/// Refuses malformed names, then names of clusters not served now, naming them (FetchEndpoints).
fn check_cluster_names(view: &DiscoveryView, names: &[String]) -> Result<(), Status> {
    let bad: Vec<&str> = names
        .iter()
        .filter(|n| !well_formed(n))
        .map(String::as_str)
        .collect();
    if !bad.is_empty() {
        return Err(Status::invalid_argument(format!(
            "cluster name(s) {bad:?} are not of the form {FORM}"
        )));
    }
    let unknown: Vec<&str> = names
        .iter()
        .filter(|n| !view.clusters.contains_key(n.as_str()))
        .map(String::as_str)
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(Status::not_found(format!(
            "cluster(s) {unknown:?} are not served: discovery knows no such service port"
        )))
    }
}

/// One stream's view.
struct Stream {
    identity: Identity,
    view: watch::Receiver<Arc<DiscoveryView>>,
}

/// The endpoints of `name` for the client `identity` names.
fn endpoints_of<'v>(
    view: &'v DiscoveryView,
    name: &str,
    identity: &Identity,
) -> Option<&'v Vec<EndpointEntry>> {
    view.endpoints_for(
        name,
        &identity.namespace,
        identity.pod.as_ref().map(|p| p.name.as_str()),
    )
}

impl ResourceSource for Stream {
    fn type_url(&self) -> &'static str {
        ENDPOINT_TYPE_URL
    }

    fn peer(&self) -> String {
        self.identity.spiffe_id.to_string()
    }

    fn unknown_reason(&self, name: &str) -> Option<String> {
        if !well_formed(name) {
            Some(format!("not of the form {FORM}; never served"))
        } else if endpoints_of(&self.view.borrow(), name, &self.identity).is_none() {
            Some(
                "discovery knows no such service port for this client now; sent if it appears"
                    .into(),
            )
        } else if !self
            .view
            .borrow()
            .visible_to(name, &self.identity.namespace)
        {
            Some(format!(
                "not exported to namespace {} (exportTo); sent if it becomes visible",
                self.identity.namespace
            ))
        } else {
            None
        }
    }

    fn version(&mut self, name: &str) -> Result<Option<String>, Status> {
        Ok(self.render(name)?.map(|any| content_version(&any)))
    }

    fn render(&mut self, name: &str) -> Result<Option<Any>, Status> {
        let view = self.view.borrow().clone();
        if !view.visible_to(name, &self.identity.namespace) {
            return Ok(None);
        }
        Ok(endpoints_of(&view, name, &self.identity)
            .map(|endpoints| pack_any(load_assignment(name, endpoints))))
    }

    /// An empty assignment: Envoy drops the endpoints of a cluster that went away.
    fn tombstone(&self, name: &str) -> Option<Any> {
        Some(pack_any(load_assignment(name, &[])))
    }

    fn changed<'a>(
        &'a mut self,
        _subscribed: &'a BTreeSet<String>,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            let alive = self.view.changed().await.is_ok();
            self.view.borrow_and_update();
            alive
        })
    }

    fn label(_name: &str) -> String {
        "cluster".into()
    }
}

#[tonic::async_trait]
impl EndpointDiscoveryService for EdsService {
    type StreamEndpointsStream = Out<DiscoveryResponse>;
    type DeltaEndpointsStream = Out<DeltaDiscoveryResponse>;

    async fn stream_endpoints(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamEndpointsStream>, Status> {
        let identity = self.0.auth.authenticate(&request).await?;
        let mut view = self.0.view.clone();
        view.mark_unchanged();
        let bound_for = identity.clone();
        let s = Stream { identity, view };
        let out = xds::spawn_sotw(
            s,
            request.into_inner(),
            self.0.xds.clone(),
            self.0.stop.clone(),
        );
        Ok(Response::new(self.bounded(&bound_for, out)))
    }

    async fn delta_endpoints(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaEndpointsStream>, Status> {
        let identity = self.0.auth.authenticate(&request).await?;
        let mut view = self.0.view.clone();
        view.mark_unchanged();
        let bound_for = identity.clone();
        let s = Stream { identity, view };
        let out = xds::spawn_delta(
            s,
            request.into_inner(),
            self.0.xds.clone(),
            self.0.stop.clone(),
        );
        Ok(Response::new(self.bounded(&bound_for, out)))
    }

    async fn fetch_endpoints(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let identity = self.0.auth.authenticate(&request).await?;
        let req = request.into_inner();
        let view = self.0.view.borrow().clone();
        check_cluster_names(&view, &req.resource_names)?;
        let hidden: Vec<&str> = req
            .resource_names
            .iter()
            .filter(|n| !view.visible_to(n, &identity.namespace))
            .map(String::as_str)
            .collect();
        if !hidden.is_empty() {
            return Err(Status::not_found(format!(
                "cluster(s) {hidden:?} are not exported to namespace {} (exportTo)",
                identity.namespace
            )));
        }
        let resources: Vec<Any> = req
            .resource_names
            .iter()
            .map(|n| {
                pack_any(load_assignment(
                    n,
                    endpoints_of(&view, n, &identity)
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                ))
            })
            .collect();
        let version = resources
            .iter()
            .map(content_version)
            .collect::<Vec<_>>()
            .join(".");
        Ok(Response::new(DiscoveryResponse {
            version_info: version,
            resources,
            type_url: ENDPOINT_TYPE_URL.into(),
            ..Default::default()
        }))
    }
}
