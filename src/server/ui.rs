//! The status page (`/ui`) and its JSON (`/ui/status.json`): what an operator wants to see at a
//! glance, built from what the server already holds (the CA snapshot and its roots, the SDS
//! streams' propagation registry, federation status, discovery's objects and view). Read-only;
//! no key, token or certificate body is in it. The JSON schema is documented in the README
//! ("The status page") and pinned by `tests/it/ui.rs`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::{
    clock::Clock,
    discovery::{
        describe_service_with, sidecar_of, Decision, DiscoveryView, MeshObjects, MeshSettings,
        NoProofs, ProofLookup, ProxyRegistry, ServiceReport, TlsMode,
    },
    rotation::Propagation,
    trust::{federation::FederationStatus, LiveCa},
};

pub mod page;

/// Where the JSON is served.
pub const STATUS_JSON_PATH: &str = "/ui/status.json";

/// The schema name the JSON carries; bumped on an incompatible change.
pub const SCHEMA: &str = "meshid.status/v1";
/// At most this many client → service edges are listed (the rest are counted).
pub const MAX_EDGES: usize = 500;
/// At most this many services are described.
pub const MAX_SERVICES: usize = 200;

/// Everything `/ui/status.json` answers.
#[derive(Clone, Debug, Serialize)]
pub struct UiStatus {
    pub schema: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    pub generated_at: OffsetDateTime,
    pub replica: String,
    pub trust_domain: String,
    pub state_generation: u64,
    /// Why the CA state cannot be re-read now (the server goes on from what it holds).
    pub state_problem: Option<String>,
    pub roots: Vec<RootView>,
    pub rotation: RotationView,
    pub federation: Vec<FederationView>,
    pub proxies: Vec<NamespaceProxies>,
    /// `null` when discovery is off.
    pub discovery: Option<DiscoverySection>,
    /// Every replica's published status, when the state is in a Secret (else `null`).
    pub replicas: Option<ReplicasSection>,
}

/// What every replica sharing the state published (its status Lease).
#[derive(Clone, Debug, Serialize)]
pub struct ReplicasSection {
    /// Why the Leases could not be read last time, else `null`.
    pub read_error: Option<String>,
    pub replicas: Vec<crate::rotation::replicas::ReplicaReport>,
}

/// A root and where it stands.
#[derive(Clone, Debug, Serialize)]
pub struct RootView {
    pub id: String,
    /// prepared, active, old, tainted, revoked.
    pub state: String,
    pub subject: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    pub expires_in_seconds: i64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub state_since: Option<OffsetDateTime>,
    /// In the bundle the server serves.
    pub trusted: bool,
    /// Signs new leaves.
    pub signs: bool,
    /// Open SDS streams whose ACKed bundle holds it.
    pub streams_holding: usize,
}

/// A rotation's progress over the open SDS streams.
#[derive(Clone, Debug, Serialize)]
pub struct RotationView {
    /// More than one root is trusted (a rotation is prepared, active, or winding down), or some
    /// stream is behind the current bundle or signer.
    pub in_progress: bool,
    pub streams: usize,
    /// Streams that ACKed a bundle of the own trust domain, and those of them holding every
    /// trusted root.
    pub bundle_streams: usize,
    pub bundle_streams_current: usize,
    /// Streams that ACKed a leaf, and those of them holding one from the current signer.
    pub leaf_streams: usize,
    pub leaf_streams_current: usize,
    pub signer: String,
    pub laggards: usize,
}

/// A federated trust domain.
#[derive(Clone, Debug, Serialize)]
pub struct FederationView {
    pub trust_domain: String,
    pub url: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_success: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_attempt: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt: Option<OffsetDateTime>,
    pub sequence: Option<u64>,
    pub last_error: Option<String>,
}

/// The proxies connected over SDS in one namespace.
#[derive(Clone, Debug, Serialize)]
pub struct NamespaceProxies {
    pub namespace: String,
    pub streams: usize,
    pub identities: Vec<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub earliest_leaf_expiry: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub latest_leaf_expiry: Option<OffsetDateTime>,
}

/// Auto mTLS as discovery sees it.
#[derive(Clone, Debug, Serialize)]
pub struct DiscoverySection {
    pub coverage: Vec<Coverage>,
    pub services: Vec<ServiceView>,
    /// Services or edges left out beyond `MAX_SERVICES` / `MAX_EDGES`.
    pub omitted_services: usize,
    pub omitted_edges: usize,
}

/// The share of a namespace's pods with a sidecar.
#[derive(Clone, Debug, Serialize)]
pub struct Coverage {
    pub namespace: String,
    pub ratio: f64,
}

/// How a connection goes: the icon and its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Link {
    /// Istio mTLS (a lock).
    Mtls,
    /// No TLS (an open lock).
    Plaintext,
    /// TLS the proxy originates with a DestinationRule (SIMPLE or MUTUAL with user certificates).
    Tls,
    /// Some endpoints one way, some another.
    Mixed,
    /// The connection cannot succeed (a warning).
    WillFail,
}

impl Link {
    fn of(d: Decision) -> Self {
        match d {
            Decision::Mtls => Self::Mtls,
            Decision::Plaintext => Self::Plaintext,
            Decision::Tls | Decision::MutualUser => Self::Tls,
            Decision::WillFail => Self::WillFail,
        }
    }

    /// The text equivalent of the icon.
    pub fn label(self) -> &'static str {
        match self {
            Self::Mtls => "mTLS",
            Self::Plaintext => "plaintext",
            Self::Tls => "TLS (DestinationRule)",
            Self::Mixed => "mixed",
            Self::WillFail => "will fail",
        }
    }
}

/// One service: its endpoints as a client with a sidecar reaches them, and every client.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceView {
    /// `name.namespace`.
    pub service: String,
    pub endpoints: Vec<EndpointView>,
    pub clients: Vec<EdgeView>,
}

/// One endpoint.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointView {
    pub address: String,
    pub port: u16,
    /// `name.namespace` of its pod, if any.
    pub pod: Option<String>,
    pub workload: String,
    pub sidecar: String,
    pub link: Link,
    pub reason: String,
}

/// One client → service edge.
#[derive(Clone, Debug, Serialize)]
pub struct EdgeView {
    /// `pod.namespace`.
    pub client: String,
    pub client_sidecar: bool,
    pub link: Link,
    pub reason: String,
}

/// What the page reads from, set up by the server.
pub struct UiSources {
    pub live: Arc<LiveCa>,
    pub propagation: Arc<Propagation>,
    pub federation: FederationStatus,
    pub replica: String,
    pub clock: Arc<dyn Clock>,
    pub discovery: Option<DiscoverySources>,
    /// The replicas' reports, when the state is in a Secret.
    pub replicas: Option<Arc<crate::rotation::replicas::ReplicasSeen>>,
}

/// Discovery's inputs and products.
pub struct DiscoverySources {
    pub objects: watch::Receiver<Arc<MeshObjects>>,
    pub view: watch::Receiver<Arc<DiscoveryView>>,
    pub settings: MeshSettings,
    pub proxies: Option<Arc<ProxyRegistry>>,
}

/// The service graph is rebuilt only when discovery's view changes.
type GraphCache = Option<(Arc<DiscoveryView>, Arc<DiscoverySection>)>;

/// Builds the status on demand.
pub struct Ui {
    sources: UiSources,
    graph: Mutex<GraphCache>,
}

impl Ui {
    pub fn new(sources: UiSources) -> Self {
        Self {
            sources,
            graph: Mutex::new(None),
        }
    }

    /// `GET /debug/describe/service|pod?name=…`: `meshid describe` answered by this server,
    /// with its objects, settings and live proofs (the same decision code as its EDS). Query:
    /// `name` (required), `from` (a client pod), `clients=true`, `mesh=istio`, `output=json|text`.
    pub fn describe(
        &self,
        kind: &str,
        query: &str,
    ) -> Result<crate::telemetry::Page, (hyper::StatusCode, String)> {
        use hyper::StatusCode;
        let bad = |why: String| (StatusCode::BAD_REQUEST, why);
        let mut name = None;
        let (mut from, mut clients, mut istio, mut json) = (None, false, false, false);
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match (&*k, &*v) {
                ("name", _) => name = Some(v.into_owned()),
                ("from", _) => from = Some(v.into_owned()),
                ("clients", "true") => clients = true,
                ("mesh", "istio") => istio = true,
                ("output", "json") => json = true,
                ("output", "text") => json = false,
                (k, v) => return Err(bad(format!("unknown query parameter {k}={v:?}; known: name, from, clients=true, mesh=istio, output=json|text"))),
            }
        }
        let name = name.ok_or_else(|| bad("give the name: ?name=NAME.NAMESPACE".into()))?;
        let Some(d) = &self.sources.discovery else {
            return Err((
                StatusCode::NOT_FOUND,
                "discovery is not configured on this server ([discovery], --discovery-snapshot or --discovery-kubeconfig)".into(),
            ));
        };
        let objects = d.objects.borrow().clone();
        let proofs: Box<dyn ProofLookup> = match &d.proxies {
            Some(p) => Box::new(p.snapshot()),
            None => Box::new(NoProofs),
        };
        let refused = |e: crate::discovery::DiscoveryError| {
            let code = if matches!(e, crate::discovery::DiscoveryError::NotFound { .. }) {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            };
            (code, e.to_string())
        };
        let (body, text) = match kind {
            "service" => {
                let r = describe_service_with(&objects, &d.settings, proofs.as_ref(), &name, from.as_deref(), clients)
                    .map_err(refused)?;
                if json {
                    (serde_json::to_string_pretty(&r), String::new())
                } else {
                    (Ok(String::new()), crate::discovery::service_text(&r, istio))
                }
            }
            "pod" => {
                let r = crate::discovery::describe_pod_with(&objects, &d.settings, proofs.as_ref(), &name).map_err(refused)?;
                if json {
                    (serde_json::to_string_pretty(&r), String::new())
                } else {
                    (Ok(String::new()), crate::discovery::pod_text(&r))
                }
            }
            other => return Err((StatusCode::NOT_FOUND, format!("no such endpoint /debug/describe/{other}; try /debug/describe/service or /debug/describe/pod"))),
        };
        let body = body.map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok(if json {
            crate::telemetry::Page {
                content_type: "application/json",
                body: body + "\n",
            }
        } else {
            crate::telemetry::Page {
                content_type: "text/plain; charset=utf-8",
                body: text,
            }
        })
    }

    /// The status now.
    pub fn status(&self) -> UiStatus {
        let s = &self.sources;
        let now = s.clock.now();
        let snap = s.live.current();
        let (trusted, counts, bundle_current) =
            crate::rotation::current_counts(&s.propagation, &snap);
        let roots = snap
            .roots
            .iter()
            .map(|r| RootView {
                id: r.id.clone(),
                state: r.state.to_string(),
                subject: r.subject.clone(),
                not_before: r.not_before,
                not_after: r.not_after,
                expires_in_seconds: (r.not_after - now).whole_seconds(),
                state_since: r.since,
                trusted: trusted.contains(&r.id),
                signs: r.state == crate::state::RootState::Active,
                streams_holding: counts.roots.get(&r.id).copied().unwrap_or(0),
            })
            .collect();
        let rotation = RotationView {
            in_progress: trusted.len() > 1 || counts.laggard_count > 0,
            streams: counts.streams,
            bundle_streams: counts.bundle_streams,
            bundle_streams_current: bundle_current,
            leaf_streams: counts.leaf_streams,
            leaf_streams_current: counts.signers.get(&snap.signer_id).copied().unwrap_or(0),
            signer: snap.signer_id.clone(),
            laggards: counts.laggard_count,
        };
        let federation = s
            .federation
            .snapshot()
            .into_iter()
            .map(|(td, p)| FederationView {
                trust_domain: td.to_string(),
                url: p.url,
                last_success: p.last_success,
                last_attempt: p.last_attempt,
                next_attempt: p.next_attempt,
                sequence: p.sequence,
                last_error: p.last_error,
            })
            .collect();
        let at = |t: Option<i64>| t.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
        let proxies = s
            .propagation
            .namespaces()
            .into_iter()
            .map(|(ns, n)| NamespaceProxies {
                namespace: ns,
                streams: n.streams,
                identities: n.identities,
                earliest_leaf_expiry: at(n.earliest_leaf_not_after),
                latest_leaf_expiry: at(n.latest_leaf_not_after),
            })
            .collect();
        UiStatus {
            schema: SCHEMA,
            generated_at: now,
            replica: s.replica.clone(),
            trust_domain: snap.authority.trust_domain().to_string(),
            state_generation: snap.generation.0,
            state_problem: s.live.reload_problem(),
            roots,
            rotation,
            federation,
            proxies,
            discovery: s.discovery.as_ref().map(|d| (*self.graph(d)).clone()),
            replicas: s.replicas.as_ref().map(|seen| {
                match &*seen.lock().unwrap_or_else(|e| e.into_inner()) {
                    Ok(list) => ReplicasSection {
                        read_error: None,
                        replicas: list.clone(),
                    },
                    Err(e) => ReplicasSection {
                        read_error: Some(e.clone()),
                        replicas: Vec::new(),
                    },
                }
            }),
        }
    }

    fn graph(&self, d: &DiscoverySources) -> Arc<DiscoverySection> {
        let view = d.view.borrow().clone();
        let mut cache = self.graph.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, g)) = cache.as_ref() {
            if Arc::ptr_eq(seen, &view) {
                return g.clone();
            }
        }
        let objects = d.objects.borrow().clone();
        let g = Arc::new(match &d.proxies {
            Some(p) => service_graph(&objects, &d.settings, &p.snapshot(), &view),
            None => service_graph(&objects, &d.settings, &NoProofs, &view),
        });
        *cache = Some((view, g.clone()));
        g
    }
}

/// Coverage and, per service, its endpoints and every client pod's edge, from the same
/// decision code as EDS and `meshid describe`.
fn service_graph(
    objs: &MeshObjects,
    s: &MeshSettings,
    proofs: &dyn ProofLookup,
    view: &DiscoveryView,
) -> DiscoverySection {
    let coverage = view
        .stats
        .mtls_coverage
        .iter()
        .map(|(ns, r)| Coverage {
            namespace: ns.clone(),
            ratio: *r,
        })
        .collect();
    let mut names: Vec<String> = objs
        .services
        .iter()
        .filter_map(|svc| {
            let m = &svc.metadata;
            Some(format!(
                "{}.{}",
                m.name.as_deref()?,
                m.namespace.as_deref()?
            ))
        })
        .collect();
    names.sort();
    let omitted_services = names.len().saturating_sub(MAX_SERVICES);
    names.truncate(MAX_SERVICES);
    let mut services = Vec::new();
    let mut edges = 0usize;
    let mut omitted_edges = 0usize;
    for name in names {
        let Ok(report) = describe_service_with(objs, s, proofs, &name, None, false) else {
            continue;
        };
        let endpoints: Vec<EndpointView> = report
            .endpoints
            .iter()
            .map(|e| EndpointView {
                address: e.address.clone(),
                port: e.port,
                pod: e.pod.clone(),
                workload: e.workload.clone(),
                sidecar: e.sidecar_state.clone(),
                link: Link::of(e.decision),
                reason: e.why.clone(),
            })
            .collect();
        let backing: Vec<&str> = endpoints.iter().filter_map(|e| e.pod.as_deref()).collect();
        let mut clients = Vec::new();
        for pod in &objs.pods {
            let (Some(pn), Some(pns)) = (&pod.metadata.name, &pod.metadata.namespace) else {
                continue;
            };
            let client = format!("{pn}.{pns}");
            if backing.contains(&client.as_str()) {
                continue; // a service's own pods are not its clients here
            }
            if edges >= MAX_EDGES {
                omitted_edges += 1;
                continue;
            }
            let Ok(r) = describe_service_with(objs, s, proofs, &name, Some(&client), false) else {
                continue;
            };
            edges += 1;
            let sidecar = sidecar_of(pod).tls_mode == TlsMode::Istio;
            clients.push(edge(client, sidecar, &r));
        }
        services.push(ServiceView {
            service: name,
            endpoints,
            clients,
        });
    }
    DiscoverySection {
        coverage,
        services,
        omitted_services,
        omitted_edges,
    }
}

/// One client's edge: one link when every endpoint goes the same way, else mixed (or will
/// fail when any would); the reasons of the endpoints, each once.
fn edge(client: String, client_sidecar: bool, r: &ServiceReport) -> EdgeView {
    let mut by_link: BTreeMap<&'static str, (Link, Vec<String>)> = BTreeMap::new();
    for e in &r.endpoints {
        let l = Link::of(e.decision);
        let entry = by_link.entry(l.label()).or_insert((l, Vec::new()));
        if !entry.1.contains(&e.why) {
            entry.1.push(e.why.clone());
        }
    }
    let link = match by_link.len() {
        0 => Link::WillFail,
        1 => by_link.values().next().expect("one entry").0,
        _ if by_link.values().any(|(l, _)| *l == Link::WillFail) => Link::WillFail,
        _ => Link::Mixed,
    };
    let reason = if by_link.is_empty() {
        "no endpoint".to_owned()
    } else {
        by_link
            .values()
            .map(|(l, whys)| format!("{}: {}", l.label(), whys.join("; ")))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    EdgeView {
        client,
        client_sidecar,
        link,
        reason,
    }
}
