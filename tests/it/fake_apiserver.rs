//! A fake kube-apiserver: HTTPS on 127.0.0.1 speaking the real REST wire format, so the real
//! `kube` client talks to it. Serves TokenReview (scriptable: answers, errors, slowness),
//! OIDC discovery and the JWKS (optionally only to authenticated callers, as self-managed
//! clusters grant `system:service-account-issuer-discovery`), SelfSubjectAccessReview
//! (scriptable allowed/denied), and list + watch of pods, services, namespaces,
//! endpointslices, peerauthentications, destinationrules, serviceentries, workloadentries,
//! secrets, configmaps and leases (seeded and changed by tests), and get/create/update of one
//! ConfigMap, Secret or Lease per namespace (create of an existing one: 409 AlreadyExists;
//! update with a stale resourceVersion: 409 Conflict, as kube-apiserver does).
//! It runs on the test's tokio runtime and stops with it.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use serde_json::{json, Value};

/// What the fake answers to a TokenReview.
#[derive(Clone, Debug)]
pub enum Reply {
    /// `status` of the returned TokenReview.
    Status(Value),
    /// An API error (`kind: Status`) with this HTTP code.
    Error(u16, String),
}

type Reviewer = Arc<dyn Fn(&str, &[String]) -> Reply + Send + Sync>;

/// Collections served with list and watch: path → list kind.
const COLLECTIONS: &[(&str, &str, &str)] = &[
    ("/api/v1/pods", "v1", "Pod"),
    ("/api/v1/serviceaccounts", "v1", "ServiceAccount"),
    ("/api/v1/services", "v1", "Service"),
    ("/api/v1/namespaces", "v1", "Namespace"),
    ("/api/v1/configmaps", "v1", "ConfigMap"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSlice",
    ),
    (
        "/apis/security.istio.io/v1/peerauthentications",
        "security.istio.io/v1",
        "PeerAuthentication",
    ),
    (
        "/apis/networking.istio.io/v1/destinationrules",
        "networking.istio.io/v1",
        "DestinationRule",
    ),
    (
        "/apis/networking.istio.io/v1/serviceentries",
        "networking.istio.io/v1",
        "ServiceEntry",
    ),
    (
        "/apis/networking.istio.io/v1/workloadentries",
        "networking.istio.io/v1",
        "WorkloadEntry",
    ),
    ("/api/v1/secrets", "v1", "Secret"),
    (
        "/apis/coordination.k8s.io/v1/leases",
        "coordination.k8s.io/v1",
        "Lease",
    ),
];

type Body = BoxBody<Bytes, std::convert::Infallible>;

/// A stored change: (collection path, resourceVersion, watch event).
type Event = (String, u64, Value);

pub struct Shared {
    pub issuer: String,
    pub objects:
        Mutex<std::collections::BTreeMap<String, std::collections::BTreeMap<String, Value>>>,
    rv: std::sync::atomic::AtomicU64,
    history: Mutex<Vec<Event>>,
    events: tokio::sync::broadcast::Sender<Event>,
    reviewer: Mutex<Reviewer>,
    pub tokenreview_calls: AtomicUsize,
    pub last_review: Mutex<Option<Value>>,
    pub delay: Mutex<Duration>,
    /// Collections (e.g. `/api/v1/pods`) whose list answers only after this long.
    pub list_delay: Mutex<std::collections::HashMap<String, Duration>>,
    pub jwks: Mutex<Value>,
    pub jwks_fetches: AtomicUsize,
    /// Discovery and JWKS answer 401 without the kubeconfig's bearer token.
    pub discovery_requires_auth: std::sync::atomic::AtomicBool,
    /// The answer to a SelfSubjectAccessReview.
    pub ssar_allowed: std::sync::atomic::AtomicBool,
    pub last_ssar: Mutex<Option<Value>>,
    /// Every request: (method, path, query), for the RBAC coverage test.
    pub requests: Mutex<Vec<(String, String, String)>>,
    pub configmap_writes: AtomicUsize,
    /// Flips to true when the server is stopped: open connections and watches end.
    stopped: tokio::sync::watch::Sender<bool>,
}

const CONFIGMAPS: &str = "/api/v1/configmaps";

/// Stores `obj` under `collection` with a new resourceVersion and tells watchers.
fn store_object(s: &Shared, collection: &str, mut obj: Value) -> Value {
    let rv = s.rv.fetch_add(1, Ordering::SeqCst) + 1;
    obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
    let key = format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"].as_str().unwrap_or("")
    );
    let existed = s
        .objects
        .lock()
        .unwrap()
        .entry(collection.to_string())
        .or_default()
        .insert(key, obj.clone())
        .is_some();
    let event = json!({"type": if existed { "MODIFIED" } else { "ADDED" }, "object": obj});
    let e: Event = (collection.to_string(), rv, event);
    s.history.lock().unwrap().push(e.clone());
    let _ = s.events.send(e);
    obj
}

/// `GET .../namespaces/{ns}/{plural}/{name}`, `POST .../namespaces/{ns}/{plural}` and `PUT
/// .../{name}` of a ConfigMap, Secret or Lease, stored in `collection`.
async fn object_call(
    s: &Shared,
    collection: &str,
    plural: &str,
    method: Method,
    ns: &str,
    name: Option<&str>,
    body: &[u8],
) -> Response<Body> {
    let stored = |n: &str| {
        s.objects
            .lock()
            .unwrap()
            .get(collection)
            .and_then(|m| m.get(&format!("{ns}/{n}")).cloned())
    };
    let not_found = |n: &str| status_error(404, &format!("{plural} \"{n}\" not found"));
    let counted = || {
        if collection == CONFIGMAPS {
            s.configmap_writes.fetch_add(1, Ordering::SeqCst);
        }
    };
    match (method, name) {
        (Method::GET, Some(n)) => match stored(n) {
            Some(obj) => json_response(StatusCode::OK, &obj),
            None => not_found(n),
        },
        (Method::POST, None) => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
                return status_error(400, &format!("bad {plural} body"));
            };
            let n = obj["metadata"]["name"].as_str().unwrap_or("").to_owned();
            if stored(&n).is_some() {
                return conflict("AlreadyExists", &format!("{plural} \"{n}\" already exists"));
            }
            obj["metadata"]["namespace"] = json!(ns);
            counted();
            json_response(StatusCode::CREATED, &store_object(s, collection, obj))
        }
        (Method::PUT, Some(n)) => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
                return status_error(400, &format!("bad {plural} body"));
            };
            let Some(current) = stored(n) else {
                return not_found(n);
            };
            if obj["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return conflict("Conflict", &format!("Operation cannot be fulfilled on {plural} \"{n}\": the object has been modified; please apply your changes to the latest version and try again"));
            }
            obj["metadata"]["namespace"] = json!(ns);
            counted();
            json_response(StatusCode::OK, &store_object(s, collection, obj))
        }
        (Method::DELETE, Some(n)) => {
            let removed = s
                .objects
                .lock()
                .unwrap()
                .get_mut(collection)
                .and_then(|m| m.remove(&format!("{ns}/{n}")));
            match removed {
                Some(obj) => json_response(StatusCode::OK, &obj),
                None => not_found(n),
            }
        }
        _ => status_error(405, "method not allowed"),
    }
}

fn conflict(reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": 409});
    json_response(StatusCode::CONFLICT, &body)
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the server certificate.
    pub ca_pem: String,
    pub shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers like a real API server for a service-account JWT: authenticated as the token's
/// subject, pod from its claims, audiences = requested ∩ token's.
pub fn reviewer_from_claims(token: &str, audiences: &[String]) -> Reply {
    let Some(claims) = token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        return Reply::Status(json!({"authenticated": false, "error": "invalid bearer token"}));
    };
    let token_aud: Vec<String> = match &claims["aud"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => vec![],
    };
    let aud: Vec<&String> = audiences.iter().filter(|a| token_aud.contains(a)).collect();
    if aud.is_empty() {
        return Reply::Status(
            json!({"authenticated": false, "error": "token audiences do not match"}),
        );
    }
    let k = &claims["kubernetes.io"];
    let mut extra = json!({});
    if let Some(pod) = k.get("pod") {
        extra = json!({
            "authentication.kubernetes.io/pod-name": [pod["name"]],
            "authentication.kubernetes.io/pod-uid": [pod["uid"]],
        });
    }
    Reply::Status(json!({
        "authenticated": true,
        "user": {
            "username": claims["sub"],
            "uid": k["serviceaccount"]["uid"],
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", k["namespace"].as_str().unwrap_or(""))],
            "extra": extra,
        },
        "audiences": aud,
    }))
}

impl FakeApiServer {
    /// Starts the server on a free port of 127.0.0.1.
    pub async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf_params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let leaf = leaf_params
            .signed_by(&leaf_key, &Issuer::new(ca_params, &ca_key))
            .unwrap();

        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            issuer: format!("https://{addr}"),
            reviewer: Mutex::new(Arc::new(reviewer_from_claims)),
            tokenreview_calls: AtomicUsize::new(0),
            last_review: Mutex::new(None),
            delay: Mutex::new(Duration::ZERO),
            list_delay: Mutex::default(),
            jwks: Mutex::new(json!({"keys": []})),
            jwks_fetches: AtomicUsize::new(0),
            discovery_requires_auth: Default::default(),
            ssar_allowed: std::sync::atomic::AtomicBool::new(true),
            last_ssar: Mutex::default(),
            requests: Mutex::default(),
            configmap_writes: AtomicUsize::new(0),
            objects: Mutex::default(),
            rv: std::sync::atomic::AtomicU64::new(100),
            history: Mutex::default(),
            events: tokio::sync::broadcast::channel(1024).0,
            stopped: tokio::sync::watch::channel(false).0,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, s) = (acceptor.clone(), s.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut stopped = s.stopped.subscribe();
                    let svc = service_fn(move |req| handle(s.clone(), req));
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(tls), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stopped.wait_for(|s| *s) => {}
                    }
                });
            }
        });
        Self {
            addr,
            ca_pem: ca_cert.pem(),
            shared,
            task,
        }
    }

    /// Stops the server as if its machine went away: no new connections, open ones (and
    /// their watches) end.
    pub fn stop(&self) {
        self.task.abort();
        self.shared.stopped.send_replace(true);
    }

    /// Replaces the TokenReview answer.
    pub fn set_reviewer(&self, f: impl Fn(&str, &[String]) -> Reply + Send + Sync + 'static) {
        *self.shared.reviewer.lock().unwrap() = Arc::new(f);
    }

    /// Delays every TokenReview answer.
    /// Lists of `collection` (e.g. `/api/v1/pods`) answer only after `d`: one kind syncs late.
    pub fn set_list_delay(&self, collection: &str, d: Duration) {
        self.shared
            .list_delay
            .lock()
            .unwrap()
            .insert(collection.into(), d);
    }

    pub fn set_delay(&self, d: Duration) {
        *self.shared.delay.lock().unwrap() = d;
    }

    pub fn set_jwks(&self, jwks: &impl serde::Serialize) {
        *self.shared.jwks.lock().unwrap() = serde_json::to_value(jwks).unwrap();
    }

    /// Creates or replaces an object (by apiVersion, kind, namespace, name) and tells watchers.
    pub fn put(&self, obj: Value) {
        let (api, kind) = (
            obj["apiVersion"].as_str().unwrap_or("").to_owned(),
            obj["kind"].as_str().unwrap_or("").to_owned(),
        );
        let Some((path, _, _)) = COLLECTIONS.iter().find(|(_, a, k)| *a == api && *k == kind)
        else {
            panic!("the fake apiserver does not serve {api} {kind}");
        };
        store_object(&self.shared, path, obj);
    }

    /// Deletes an object (by apiVersion, kind, namespace, name) and tells watchers.
    pub fn delete(&self, obj: &Value) {
        let (api, kind) = (
            obj["apiVersion"].as_str().unwrap_or(""),
            obj["kind"].as_str().unwrap_or(""),
        );
        let Some((path, _, _)) = COLLECTIONS.iter().find(|(_, a, k)| *a == api && *k == kind)
        else {
            panic!("the fake apiserver does not serve {api} {kind}");
        };
        let key = format!(
            "{}/{}",
            obj["metadata"]["namespace"].as_str().unwrap_or(""),
            obj["metadata"]["name"].as_str().unwrap_or("")
        );
        let s = &self.shared;
        let Some(mut gone) = s
            .objects
            .lock()
            .unwrap()
            .get_mut(*path)
            .and_then(|m| m.remove(&key))
        else {
            panic!("the fake apiserver has no {kind} {key}");
        };
        let rv = s.rv.fetch_add(1, Ordering::SeqCst) + 1;
        gone["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let e: Event = (
            path.to_string(),
            rv,
            json!({"type": "DELETED", "object": gone}),
        );
        s.history.lock().unwrap().push(e.clone());
        let _ = s.events.send(e);
    }

    /// A ConfigMap as stored, if any.
    pub fn configmap(&self, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .objects
            .lock()
            .unwrap()
            .get(CONFIGMAPS)
            .and_then(|m| m.get(&format!("{ns}/{name}")).cloned())
    }

    /// ConfigMap writes (create and update) meshid made.
    pub fn configmap_writes(&self) -> usize {
        self.shared.configmap_writes.load(Ordering::SeqCst)
    }

    /// Every object of a kubectl-style List (or a single object).
    pub fn put_all(&self, doc: &Value) {
        match doc.get("items") {
            Some(Value::Array(items)) => items.iter().for_each(|i| self.put(i.clone())),
            _ => self.put(doc.clone()),
        }
    }

    pub fn tokenreview_calls(&self) -> usize {
        self.shared.tokenreview_calls.load(Ordering::SeqCst)
    }

    /// A kubeconfig pointing at this server, with a bearer token for the client itself.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\nclusters:\n- name: fake\n  cluster:\n    server: https://{}\n    certificate-authority-data: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: meshid\nusers:\n- name: meshid\n  user:\n    token: {CLIENT_TOKEN}\n",
            self.addr,
            STANDARD.encode(&self.ca_pem)
        )
    }

    /// A real `kube::Client` for this server.
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml()).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    }
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).unwrap())).boxed())
        .unwrap()
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn in_ns(obj: &Value, ns: Option<&str>) -> bool {
    ns.is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
}

fn list(s: &Shared, path: &str, kind: &str, ns: Option<&str>) -> Response<Body> {
    let items: Vec<Value> = s
        .objects
        .lock()
        .unwrap()
        .get(path)
        .map(|m| m.values().filter(|o| in_ns(o, ns)).cloned().collect())
        .unwrap_or_default();
    let rv = s.rv.load(Ordering::SeqCst);
    json_response(
        StatusCode::OK,
        &json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
    )
}

/// A watch: every event after `resourceVersion`, then new ones as they happen, one JSON per line.
fn watch(s: &Arc<Shared>, path: &str, query: &str, ns: Option<String>) -> Response<Body> {
    let after: u64 = query_param(query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut live = s.events.subscribe();
    let backlog: Vec<Event> = s
        .history
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, rv, e)| p == path && *rv > after && in_ns(&e["object"], ns.as_deref()))
        .cloned()
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
    >(64);
    let path = path.to_owned();
    tokio::spawn(async move {
        let line = |e: &Value| Ok(hyper::body::Frame::data(Bytes::from(format!("{e}\n"))));
        let mut last = after;
        for (_, rv, e) in backlog {
            last = rv;
            if tx.send(line(&e)).await.is_err() {
                return;
            }
        }
        while let Ok((p, rv, e)) = live.recv().await {
            if p == path && rv > last && in_ns(&e["object"], ns.as_deref()) {
                last = rv;
                if tx.send(line(&e)).await.is_err() {
                    return;
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed())
        .unwrap()
}

fn status_error(code: u16, message: &str) -> Response<Body> {
    let reason = match code {
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        429 => "TooManyRequests",
        _ => "InternalError",
    };
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    json_response(StatusCode::from_u16(code).unwrap(), &body)
}

/// The bearer token of the kubeconfig `kubeconfig_yaml` writes.
const CLIENT_TOKEN: &str = "meshid-client-token";

async fn handle(s: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, hyper::Error> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let query = req.uri().query().unwrap_or("").to_owned();
    s.requests
        .lock()
        .unwrap()
        .push((method.to_string(), path.clone(), query.clone()));
    let authed = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {CLIENT_TOKEN}"));
    let discovery = path == "/.well-known/openid-configuration" || path == "/openid/v1/jwks";
    if discovery && !authed && s.discovery_requires_auth.load(Ordering::SeqCst) {
        return Ok(status_error(401, "Unauthorized"));
    }
    // One object of a namespace: everything but a collection's list or watch.
    for prefix in ["/api/v1", "/apis/coordination.k8s.io/v1"] {
        let Some(rest) = path.strip_prefix(&format!("{prefix}/namespaces/")) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let plural = parts.get(1).copied().unwrap_or("");
        let known = matches!(
            (prefix, plural),
            ("/api/v1", "configmaps" | "secrets") | ("/apis/coordination.k8s.io/v1", "leases")
        );
        let collection_read = method == Method::GET && parts.len() == 2;
        if known && (2..=3).contains(&parts.len()) && !collection_read {
            let (ns, name) = (parts[0].to_owned(), parts.get(2).map(|n| n.to_string()));
            let collection = format!("{prefix}/{plural}");
            let body = req.into_body().collect().await?.to_bytes();
            return Ok(
                object_call(&s, &collection, plural, method, &ns, name.as_deref(), &body).await,
            );
        }
    }
    if method == Method::GET {
        // A namespaced collection (`.../namespaces/<ns>/<plural>`) is the cluster-wide one,
        // filtered to that namespace.
        let (collection, ns) = match path.split_once("/namespaces/") {
            Some((prefix, rest)) => match rest.split_once('/') {
                Some((ns, plural)) if !plural.contains('/') => {
                    (format!("{prefix}/{plural}"), Some(ns.to_owned()))
                }
                _ => (path.clone(), None),
            },
            None => (path.clone(), None),
        };
        if let Some((p, _, kind)) = COLLECTIONS.iter().find(|(p, _, _)| *p == collection) {
            if query_param(&query, "watch") == Some("true") {
                return Ok(watch(&s, p, &query, ns));
            }
            let delay = s.list_delay.lock().unwrap().get(*p).copied();
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            return Ok(list(&s, p, kind, ns.as_deref()));
        }
    }
    Ok(match (method, path.as_str()) {
        (Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let body = req.into_body().collect().await?.to_bytes();
            tokenreview(&s, &body).await
        }
        (Method::POST, "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews") => {
            let body = req.into_body().collect().await?.to_bytes();
            let mut review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            *s.last_ssar.lock().unwrap() = Some(review.clone());
            let allowed = s.ssar_allowed.load(Ordering::SeqCst);
            review["status"] = if allowed {
                json!({"allowed": true, "reason": "RBAC: allowed by ClusterRoleBinding"})
            } else {
                json!({"allowed": false})
            };
            json_response(StatusCode::CREATED, &review)
        }
        (Method::GET, "/.well-known/openid-configuration") => json_response(
            StatusCode::OK,
            &json!({"issuer": s.issuer, "jwks_uri": format!("{}/openid/v1/jwks", s.issuer),
                "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256"]}),
        ),
        (Method::GET, "/openid/v1/jwks") => {
            s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            let jwks = s.jwks.lock().unwrap().clone();
            json_response(StatusCode::OK, &jwks)
        }
        (_, p) => status_error(
            404,
            &format!("the server could not find the requested resource ({p})"),
        ),
    })
}

async fn tokenreview(s: &Shared, body: &[u8]) -> Response<Body> {
    s.tokenreview_calls.fetch_add(1, Ordering::SeqCst);
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return status_error(400, "bad TokenReview body");
    };
    *s.last_review.lock().unwrap() = Some(review.clone());
    let delay = *s.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let audiences: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let reviewer = s.reviewer.lock().unwrap().clone();
    match reviewer(token, &audiences) {
        Reply::Status(status) => {
            let mut out = review.clone();
            out["status"] = status;
            out["metadata"] = json!({"creationTimestamp": null});
            json_response(StatusCode::CREATED, &out)
        }
        Reply::Error(code, msg) => status_error(code, &msg),
    }
}
