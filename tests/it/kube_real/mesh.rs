//! Services, pods and EndpointSlices on the real API server (no controllers run, so the slices
//! are written as the EndpointSlice controller would), and an EDS client over a real gRPC stream
//! that records every response it is sent.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use envoy_types::pb::envoy::{
    config::endpoint::v3::{lb_endpoint::HostIdentifier, ClusterLoadAssignment},
    service::{
        discovery::v3::{DiscoveryRequest, DiscoveryResponse},
        endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient,
    },
};
use k8s_openapi::api::{
    core::v1::{ObjectReference, Service, ServicePort, ServiceSpec},
    discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
};
use kube::api::{Api, ObjectMeta, PostParams};
use meshid::api::ENDPOINT_TYPE_URL;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::support::workload;
use crate::server_support::{bearer, TestServer};

/// A pod behind a service: name, IP written into the slice, labels.
pub struct Member<'a> {
    pub pod: &'a str,
    pub ip: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
}

/// The EDS cluster name of `svc`'s port 8080 in `ns`.
pub fn cluster_name(svc: &str, ns: &str) -> String {
    format!("outbound|8080||{svc}.{ns}.svc.cluster.local")
}

/// Service `svc` (port `http` 8080, selector app=svc), its pods (ServiceAccount `svc`) and one
/// EndpointSlice naming each pod by targetRef.
pub async fn service(client: &kube::Client, ns: &str, svc: &str, members: &[Member<'_>]) {
    let s = Service {
        metadata: ObjectMeta {
            name: Some(svc.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some([("app".to_string(), svc.to_string())].into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
    let mut endpoints = Vec::new();
    for m in members {
        let mut labels = vec![("app", svc)];
        labels.extend_from_slice(m.labels);
        let uid = workload(client, ns, svc, m.pod, &labels).await;
        endpoints.push(endpoint(ns, m.pod, &uid, m.ip));
    }
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{svc}-1")),
            labels: Some([("kubernetes.io/service-name".to_string(), svc.to_string())].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    };
    Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &slice)
        .await
        .unwrap();
}

/// A ready endpoint of pod `pod` at `ip`.
pub fn endpoint(ns: &str, pod: &str, uid: &str, ip: &str) -> Endpoint {
    Endpoint {
        addresses: vec![ip.into()],
        conditions: Some(EndpointConditions {
            ready: Some(true),
            ..Default::default()
        }),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            name: Some(pod.into()),
            namespace: Some(ns.into()),
            uid: Some(uid.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// (address, tlsMode metadata) of every endpoint of a cluster.
pub type Endpoints = Vec<(String, Option<String>)>;

fn endpoints(cla: &ClusterLoadAssignment) -> Endpoints {
    let mut out: Endpoints = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| {
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!("an lb endpoint without an endpoint: {e:?}")
            };
            let addr = match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
                Some(
                    envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s),
                ) => s.address.clone(),
                other => panic!("{other:?}"),
            };
            let tls = e
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"))
                .and_then(|s| match s.fields.get("tlsMode")?.kind.as_ref()? {
                    envoy_types::pb::google::protobuf::value::Kind::StringValue(v) => {
                        Some(v.clone())
                    }
                    _ => None,
                });
            (addr, tls)
        })
        .collect();
    out.sort();
    out
}

/// One SotW EDS stream for one cluster, read and ACKed by a task; every response is recorded
/// with when it arrived, and the latest is watchable.
pub struct EdsStream {
    pub log: Arc<Mutex<Vec<(std::time::Instant, Endpoints)>>>,
    latest: watch::Receiver<Option<Endpoints>>,
    task: tokio::task::JoinHandle<()>,
}

impl EdsStream {
    /// Opens the stream to `server` for `cluster`, with a token of the server's dev issuer.
    pub async fn open(server: &TestServer, cluster: &str) -> Self {
        Self::open_as(server, cluster, server.token("default", "eds-client")).await
    }

    /// Opens the stream to `server` for `cluster`, authenticated by `token`.
    pub async fn open_as(server: &TestServer, cluster: &str, token: String) -> Self {
        let mut client = EndpointDiscoveryServiceClient::with_interceptor(
            server.channel().await,
            bearer(Some(token)),
        );
        let (tx, out) = mpsc::channel(8);
        let name = cluster.to_string();
        let req = move |nonce: &str| DiscoveryRequest {
            resource_names: vec![name.clone()],
            type_url: ENDPOINT_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        };
        tx.send(req("")).await.unwrap();
        let mut rx = client
            .stream_endpoints(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (latest_tx, latest) = watch::channel(None);
        let (log2, name) = (log.clone(), cluster.to_string());
        let req2 = req.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(r)) = rx.message().await {
                let r: DiscoveryResponse = r;
                let eps = r
                    .resources
                    .iter()
                    .map(|a| ClusterLoadAssignment::decode(a.value.as_slice()).unwrap())
                    .find(|c| c.cluster_name == name)
                    .map(|c| endpoints(&c))
                    .unwrap_or_default();
                log2.lock()
                    .unwrap()
                    .push((std::time::Instant::now(), eps.clone()));
                latest_tx.send_replace(Some(eps));
                let ack = DiscoveryRequest {
                    version_info: r.version_info.clone(),
                    ..req2(&r.nonce)
                };
                if tx.send(ack).await.is_err() {
                    break;
                }
            }
        });
        Self { log, latest, task }
    }

    /// Waits (up to `limit`) for a response whose endpoints satisfy `want`; returns them.
    pub async fn until(&self, limit: Duration, want: impl Fn(&Endpoints) -> bool) -> Endpoints {
        let mut latest = self.latest.clone();
        let got =
            tokio::time::timeout(limit, latest.wait_for(|l| l.as_ref().is_some_and(&want))).await;
        if let Ok(Ok(eps)) = got {
            if let Some(eps) = eps.clone() {
                return eps;
            }
        }
        panic!(
            "no EDS response as wanted within {limit:?}; the last was {:?}",
            self.latest.borrow().clone()
        )
    }
}

impl Drop for EdsStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The tlsMode served for `ip`, if the endpoint is there: `Some(None)` is plaintext.
pub fn tls_of(eps: &Endpoints, ip: &str) -> Option<Option<String>> {
    eps.iter().find(|(a, _)| a == ip).map(|(_, t)| t.clone())
}
