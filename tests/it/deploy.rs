//! deploy/: every Kubernetes manifest parses into its k8s-openapi type (and back, unchanged: no
//! field the type does not know), the kustomizations reference files that exist, the ClusterRole
//! grants exactly the API calls meshid's code makes, and the Envoy bootstrap decodes strictly as
//! `envoy.config.bootstrap.v3.Bootstrap` against Envoy's own protos.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Service, ServiceAccount},
    policy::v1::PodDisruptionBudget,
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
};
use meshid::{
    clock::SystemClock,
    config::Config,
    discovery::{
        envoy_cluster, start_kube_source, watch_remote_secrets, MeshObjects, MeshSettings,
        MeshidGrpc, MultiCluster, RemoteSecrets,
    },
    identity::{
        dev_issuer::{DevIssuer, TokenRequest},
        ClusterId, Token, TokenReviewConfig, TokenReviewValidator, TokenValidator,
    },
    spiffe::TrustDomain,
};
use serde_json::Value;

use crate::fake_apiserver::FakeApiServer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Deserializes `doc` as `T` and serializes it back: equal only if `T` knew every field.
fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value, file: &Path) {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{}: {} does not parse: {e}", file.display(), doc["kind"]));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back,
        doc,
        "{}: a field its type does not have (or a wrong type)",
        file.display()
    );
}

fn check_manifest(doc: &Value, file: &Path) {
    match doc["kind"].as_str().unwrap_or("") {
        "Namespace" => roundtrip::<Namespace>(doc, file),
        "ServiceAccount" => roundtrip::<ServiceAccount>(doc, file),
        "ClusterRole" => roundtrip::<ClusterRole>(doc, file),
        "ClusterRoleBinding" => roundtrip::<ClusterRoleBinding>(doc, file),
        "Role" => roundtrip::<Role>(doc, file),
        "RoleBinding" => roundtrip::<RoleBinding>(doc, file),
        "ConfigMap" => roundtrip::<ConfigMap>(doc, file),
        "PersistentVolumeClaim" => roundtrip::<PersistentVolumeClaim>(doc, file),
        "Deployment" => roundtrip::<Deployment>(doc, file),
        "Service" => roundtrip::<Service>(doc, file),
        "PodDisruptionBudget" => roundtrip::<PodDisruptionBudget>(doc, file),
        other => panic!("{}: no type check for kind {other:?}", file.display()),
    }
}

/// The kustomization directories, each with the files it names.
fn kustomizations() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut dirs = vec![root().join("deploy/kubernetes")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().unwrap() == "kustomization.yaml" {
                out.push((d.clone(), yaml_docs(&p).remove(0)));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type_and_every_kustomization_is_whole() {
    let ks = kustomizations();
    let names: Vec<String> = ks
        .iter()
        .map(|(d, _)| d.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "deploy/kubernetes/base",
            "deploy/kubernetes/examples/agent",
            "deploy/kubernetes/examples/workload",
            "deploy/kubernetes/overlays/production"
        ]
    );
    let mut checked = 0;
    for (dir, k) in &ks {
        assert_eq!(k["kind"], "Kustomization", "{}", dir.display());
        for r in strings(&k["resources"]) {
            let p = dir.join(&r);
            if p.is_dir() {
                assert!(p.join("kustomization.yaml").exists(), "{}", p.display());
                continue;
            }
            for doc in yaml_docs(&p) {
                check_manifest(&doc, &p);
                checked += 1;
            }
        }
        for patch in k["patches"].as_array().into_iter().flatten() {
            let p = dir.join(patch["path"].as_str().unwrap());
            let doc = &yaml_docs(&p)[0];
            assert_eq!(doc["kind"], "Deployment", "{}", p.display());
        }
        for g in k["configMapGenerator"].as_array().into_iter().flatten() {
            for f in strings(&g["files"]) {
                let file = f.split_once('=').map_or(f.as_str(), |(_, f)| f);
                assert!(dir.join(file).exists(), "{}: {file}", dir.display());
            }
        }
        // Every manifest in the directory is listed (none forgotten by kustomize).
        for e in std::fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let listed = strings(&k["resources"]).contains(&name)
                || name == "kustomization.yaml"
                || k.to_string().contains(&name);
            assert!(
                listed,
                "{}/{name} is not in its kustomization",
                dir.display()
            );
        }
    }
    assert!(checked >= 11, "{checked}");
    // The config the Deployment mounts is a valid meshid config.
    let cm: ConfigMap = serde_json::from_value(
        yaml_docs(&root().join("deploy/kubernetes/base/configmap.yaml")).remove(0),
    )
    .unwrap();
    let toml = &cm.data.unwrap()["meshid.toml"];
    let cfg = Config::from_toml(toml).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.listen.grpc.port(), 15012);
    assert_eq!(cfg.listen.http.port(), 15014);
    assert_eq!(cfg.clusters[0].audiences, ["istio-ca"]);
}

/// `kubectl kustomize` renders every kustomization into objects of the types above (CI installs
/// kubectl; without it this test says so and checks nothing more than the test above).
#[test]
fn kubectl_kustomize_renders_every_kustomization() {
    let Ok(v) = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    else {
        eprintln!("kubectl is not installed: rendering is checked by .ci/run only");
        return;
    };
    assert!(v.status.success());
    for (dir, _) in kustomizations() {
        let out = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let file = dir.join("(rendered)");
        let mut kinds = Vec::new();
        for d in serde_yaml_ng::Deserializer::from_str(&text) {
            let doc: Value = serde::Deserialize::deserialize(d).unwrap();
            check_manifest(&doc, &file);
            kinds.push(doc["kind"].as_str().unwrap().to_owned());
        }
        if dir.ends_with("production") {
            assert!(text.contains("registry.example.com/mesh/meshid:0.1.0"));
            assert!(text.contains("priorityClassName: system-cluster-critical"));
            kinds.sort();
            assert_eq!(
                kinds,
                [
                    "ClusterRole",
                    "ClusterRoleBinding",
                    "ConfigMap",
                    "Deployment",
                    "Namespace",
                    "PodDisruptionBudget",
                    "Role",
                    "Role",
                    "RoleBinding",
                    "RoleBinding",
                    "Service",
                    "ServiceAccount"
                ]
            );
        }
    }
}

// === RBAC: exactly the calls the code makes ===

/// An RBAC need: (namespace or "" for cluster-wide, apiGroup, resource, verb) or
/// (nonResourceURL, verb).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    Resource(String, String, String, String),
    Url(String, String),
}

/// The RBAC verb of a request, as kube-apiserver's `RequestInfoFactory` derives it.
fn need_of(method: &str, path: &str, query: &str) -> Need {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", g, _v, rest @ ..] => (*g, rest),
        _ => return Need::Url(path.into(), method.to_ascii_lowercase()),
    };
    let (ns, resource, named) = match rest {
        [r] => ("", *r, false),
        [r, _name] if *r != "namespaces" => ("", *r, true),
        ["namespaces", _name] => ("", "namespaces", true),
        ["namespaces", ns, r] => (*ns, *r, false),
        ["namespaces", ns, r, _name] => (*ns, *r, true),
        _ => panic!("unexpected path {path}"),
    };
    let watch = query.split('&').any(|q| q == "watch=true");
    let verb = match (method, named) {
        ("POST", _) => "create",
        ("PUT", true) => "update",
        ("DELETE", true) => "delete",
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        (other, _) => panic!("unexpected {other} {path}"),
    };
    Need::Resource(ns.into(), group.into(), resource.into(), verb.into())
}

/// The needs `rules` grant, cluster-wide (ClusterRole) or in `namespace` (Role).
fn grants(rules: &[PolicyRule], namespace: &str) -> BTreeSet<Need> {
    let mut out = BTreeSet::new();
    for r in rules {
        for verb in &r.verbs {
            for url in r.non_resource_urls.iter().flatten() {
                out.insert(Need::Url(url.clone(), verb.clone()));
            }
            for g in r.api_groups.iter().flatten() {
                for res in r.resources.iter().flatten() {
                    out.insert(Need::Resource(
                        namespace.into(),
                        g.clone(),
                        res.clone(),
                        verb.clone(),
                    ));
                }
            }
        }
    }
    out
}

/// A need is met by a grant in its namespace or by a cluster-wide one.
fn met(need: &Need, granted: &BTreeSet<Need>) -> bool {
    match need {
        Need::Resource(ns, g, r, v) => {
            granted.contains(need)
                || granted.contains(&Need::Resource(
                    String::new(),
                    g.clone(),
                    r.clone(),
                    v.clone(),
                )) && !ns.is_empty()
        }
        Need::Url(..) => granted.contains(need),
    }
}

/// Every `kube::Api` type the library uses (and every raw GET path): when this list changes,
/// the new call must be exercised below and granted in deploy/kubernetes/base/rbac.yaml.
fn api_uses_in_src() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut dirs = vec![root().join("src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for marker in ["Api::<", "Api<", "kube_get(client, \""] {
                for (i, _) in text.match_indices(marker) {
                    let rest = &text[i + marker.len()..];
                    let end = rest.find(['>', '"', '(', ',']).unwrap_or(rest.len());
                    out.insert(format!("{marker}{}", &rest[..end]));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_role_grants_exactly_the_calls_the_code_makes() {
    assert_eq!(
        api_uses_in_src().into_iter().collect::<Vec<_>>(),
        [
            "Api::<ConfigMap",
            "Api::<DynamicObject",
            "Api::<EndpointSlice",
            "Api::<Namespace",
            "Api::<Pod",
            "Api::<Service",
            "Api<ConfigMap",
            "Api<K",
            "Api<Lease",
            "Api<PartialObjectMeta<K",
            "Api<Secret",
            "Api<SelfSubjectAccessReview",
            "Api<TokenReview",
            "kube_get(client, \"/openid/v1/jwks",
        ],
        "a Kubernetes API use changed in src/: exercise it in this test and grant it in deploy/kubernetes/base/rbac.yaml"
    );
    let api = FakeApiServer::start().await;
    let fixture: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("deploy/examples/mixed-traffic.yaml")).unwrap(),
    )
    .unwrap();
    api.put_all(&fixture);
    let dir = tempfile::tempdir().unwrap();
    let issuer = DevIssuer::init(dir.path(), &api.shared.issuer, None).unwrap();
    api.set_jwks(&issuer.jwks());

    // Identity: readiness probe (SSAR + signing keys), the local mode's metadata watches of pods
    // and service accounts, then a token validated (TokenReview: the fixture's pod is not "p").
    let td = TrustDomain::new("cluster.local").unwrap();
    let mut cfg = TokenReviewConfig::new(ClusterId("Kubernetes".into()), td);
    cfg.issuers = vec![api.shared.issuer.clone()];
    cfg.mode = meshid::identity::TokenReviewMode::Local;
    let v = TokenReviewValidator::new(api.client().await, cfg, Arc::new(SystemClock));
    v.probe().await.unwrap();
    let synced = std::time::Instant::now();
    while !v.bindings_synced() {
        assert!(
            synced.elapsed() < Duration::from_secs(30),
            "pod and service-account watches never synced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let req = TokenRequest {
        namespace: "shop".into(),
        service_account: "product-service".into(),
        audiences: vec!["istio-ca".into()],
        ttl: Duration::from_secs(600),
        pod: Some(("p".into(), "u".into())),
    };
    let token = issuer.token(&req, time::OffsetDateTime::now_utc()).unwrap();
    v.validate(&Token::new(token)).await.unwrap();

    // Discovery: the live source (list + watch of each kind), Istio's remote secrets in the
    // root namespace, and the one-shot list.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mc = MultiCluster::new();
    let secrets = watch_remote_secrets(RemoteSecrets {
        client: api.client().await,
        namespace: "istio-system".into(),
        remotes: mc.remotes.clone(),
        configured: vec![],
        notify: mc.notify.clone(),
        policy: Default::default(),
        metrics: Arc::new(meshid::telemetry::Metrics::new()),
    });
    let (mut view, mut tasks) = start_kube_source(api.client().await, mc, stop.clone());
    tasks.push(secrets);
    tokio::time::timeout(
        Duration::from_secs(30),
        view.wait_for(|v| v.services.len() >= 3),
    )
    .await
    .unwrap()
    .unwrap();
    meshid::discovery::list_all(api.client().await)
        .await
        .unwrap();
    // The istio-ca-root-cert publisher: watches namespaces and the ConfigMaps, creates one per
    // namespace, and updates one whose content was edited.
    let state = tempfile::tempdir().unwrap();
    let ca = meshid::ca::root::generate_root(
        &TrustDomain::new("cluster.local").unwrap(),
        meshid::ca::KeyType::EcdsaP256,
        meshid::ca::root::DEFAULT_ROOT_TTL,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let store = meshid::state::DirStore::new(state.path().join("state"));
    meshid::state::StateStore::compare_and_swap(
        &store,
        None,
        &meshid::state::CaState::with_generated_root(
            TrustDomain::new("cluster.local").unwrap(),
            &ca,
            time::OffsetDateTime::now_utc(),
        ),
    )
    .unwrap();
    let live = meshid::trust::LiveCa::load(
        Arc::new(store.clone()),
        Default::default(),
        Arc::new(SystemClock),
    )
    .unwrap();
    tasks.push(tokio::spawn(meshid::trust::configmap::publish(
        api.client().await,
        meshid::trust::configmap::Selector::parse("").unwrap(),
        live.subscribe(),
        stop,
    )));
    let cm_path = "/api/v1/namespaces/shop/configmaps/istio-ca-root-cert";
    let has = |method: &str, path: &str| {
        api.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|(m, p, _)| m == method && p == path)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !has("POST", "/api/v1/namespaces/shop/configmaps")
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Someone edits the copy in shop: the publisher reads it and puts the bundle back.
    let mut edited = api
        .shared
        .objects
        .lock()
        .unwrap()
        .get("/api/v1/configmaps")
        .and_then(|m| m.get("shop/istio-ca-root-cert").cloned())
        .expect("published in shop");
    edited["data"]["root-cert.pem"] = Value::String("tampered".into());
    api.put(edited);
    while !has("PUT", cm_path) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The CA state in Secret istio-system/meshid-ca-state (create, read, compare-and-swap,
    // watch) and leader election on Lease istio-system/meshid-leader (create, then renew).
    let kubeconfig = dir.path().join("fake.kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig_yaml()).unwrap();
    let secret_store = tokio::task::spawn_blocking({
        let state = meshid::state::StateStore::load_existing(&store).unwrap();
        let kubeconfig = kubeconfig.clone();
        move || {
            let secret: meshid::state::StateLocation =
                "kube://istio-system/meshid-ca-state".parse().unwrap();
            let to = secret.open(Some(&kubeconfig)).unwrap();
            to.create_migrated(&state).unwrap();
            let v = to.load_existing().unwrap();
            to.compare_and_swap(Some(v.generation), &v.state).unwrap();
            to
        }
    })
    .await
    .unwrap();
    let (wake, mut woken) = tokio::sync::mpsc::channel(1);
    let _state_watch = meshid::state::StateStore::on_change(&secret_store, wake).unwrap();
    tokio::time::timeout(Duration::from_secs(30), woken.recv())
        .await
        .expect("the state Secret is watched");
    let mut elector = meshid::leader::Elector::new(
        api.client().await,
        meshid::leader::LeaderElectionConfig {
            enabled: true,
            ..Default::default()
        },
        "meshid-0".into(),
        Arc::new(SystemClock),
    );
    assert!(elector.try_acquire_or_renew().await.unwrap(), "created");
    assert!(elector.try_acquire_or_renew().await.unwrap(), "renewed");
    // This replica's rotation status on a Lease of its own: created, renewed, deleted on stop.
    let (status_stop, status_stop_rx) = tokio::sync::watch::channel(false);
    let status = meshid::rotation::RotationStatus {
        replica: "meshid-0".into(),
        generation: 1,
        bundle_sequence: 1,
        trusted_roots: vec![],
        signer: String::new(),
        counts: Default::default(),
    };
    let publisher = tokio::spawn(meshid::rotation::replicas::publish(
        api.client().await,
        "istio-system".into(),
        "meshid-0".into(),
        move || status.clone(),
        status_stop_rx,
    ));
    tokio::time::sleep(meshid::rotation::replicas::HEARTBEAT + Duration::from_millis(500)).await;
    // The status page reads every replica's Lease (a list by label).
    let seen = Arc::new(std::sync::Mutex::new(Err("not read yet".to_owned())));
    let follower = tokio::spawn(meshid::rotation::replicas::follow(
        api.client().await,
        "istio-system".into(),
        seen.clone(),
        status_stop.subscribe(),
    ));
    let read = std::time::Instant::now();
    while seen.lock().unwrap().is_err() {
        assert!(
            read.elapsed() < Duration::from_secs(30),
            "{:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = status_stop.send(true);
    publisher.await.unwrap();
    follower.await.unwrap();
    // Wait until every watcher has opened its watch.
    let watched = || {
        api.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, q)| q.contains("watch=true"))
            .map(|(_, p, _)| p.clone())
            .collect::<BTreeSet<_>>()
            .len()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while watched() < 11 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        t.abort();
    }

    let made: BTreeSet<Need> = api
        .shared
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|(m, p, q)| need_of(m, p, q))
        .collect();
    let mut granted = BTreeSet::new();
    for doc in yaml_docs(&root().join("deploy/kubernetes/base/rbac.yaml")) {
        match doc["kind"].as_str() {
            Some("ClusterRole") => {
                let role: ClusterRole = serde_json::from_value(doc).unwrap();
                granted.extend(grants(&role.rules.unwrap(), ""));
            }
            Some("Role") => {
                let role: Role = serde_json::from_value(doc).unwrap();
                let ns = role
                    .metadata
                    .namespace
                    .clone()
                    .expect("a Role names its namespace");
                granted.extend(grants(&role.rules.unwrap(), &ns));
            }
            _ => {}
        }
    }
    let missing: Vec<_> = made.iter().filter(|n| !met(n, &granted)).collect();
    let unused: Vec<_> = granted
        .iter()
        .filter(|g| {
            !made
                .iter()
                .any(|n| n == *g || met(n, &BTreeSet::from([(*g).clone()])))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "calls the ClusterRole does not allow: {missing:?}"
    );
    assert!(unused.is_empty(), "grants no code path uses: {unused:?}");
}

// === Envoy bootstrap, strictly ===

/// Envoy's protos as shipped in the envoy-types crate (found through `cargo metadata`).
fn envoy_proto_dir() -> PathBuf {
    // Offline first (everything is usually cached); online if some platform's crates are not.
    let metadata = |offline: bool| {
        let mut c = std::process::Command::new(env!("CARGO"));
        c.args(["metadata", "--format-version", "1", "--manifest-path"])
            .arg(root().join("Cargo.toml"));
        if offline {
            c.arg("--offline");
        }
        c.output().unwrap()
    };
    let out = Some(metadata(true))
        .filter(|o| o.status.success())
        .unwrap_or_else(|| metadata(false));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pkg = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .expect("envoy-types in the dependency graph");
    Path::new(pkg["manifest_path"].as_str().unwrap())
        .parent()
        .unwrap()
        .join("proto")
}

fn envoy_pool() -> prost_reflect::DescriptorPool {
    let dir = envoy_proto_dir();
    let includes = [
        "data-plane-api",
        "xds",
        "protoc-gen-validate",
        "googleapis",
        "cel-spec/proto",
        "opentelemetry-proto",
        "client_model",
    ]
    .map(|d| dir.join(d));
    let mut c = protox::Compiler::new(includes).unwrap();
    c.include_imports(true);
    for f in [
        "envoy/config/bootstrap/v3/bootstrap.proto",
        "envoy/extensions/transport_sockets/tls/v3/tls.proto",
        "envoy/extensions/transport_sockets/raw_buffer/v3/raw_buffer.proto",
        "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
        "envoy/config/grpc_credential/v3/file_based_metadata.proto",
        "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    ] {
        c.open_file(f).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    c.descriptor_pool()
}

fn decode_strict(
    pool: &prost_reflect::DescriptorPool,
    message: &str,
    doc: &Value,
) -> Result<prost_reflect::DynamicMessage, String> {
    let desc = pool.get_message_by_name(message).unwrap();
    // Protobuf JSON: unknown fields refused (the default), every Any's @type resolved in `pool`.
    prost_reflect::DynamicMessage::deserialize_with_options(
        desc,
        doc,
        &prost_reflect::DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| e.to_string())
}

/// The bootstrap (deploy/kubernetes/examples/workload/envoy-bootstrap.yaml) is a valid
/// `envoy.config.bootstrap.v3.Bootstrap` (Envoy's `MessageUtil::loadFromYaml` with strict
/// validation: unknown fields and unresolvable `@type`s are errors); the decoder is shown to be
/// strict by refusing a misspelled field and an unknown `@type`. Its cluster agrees with what
/// meshid's EDS serves and with `meshid describe --envoy-cluster` (which decodes as a Cluster).
#[test]
fn the_envoy_bootstrap_decodes_strictly_as_an_envoy_bootstrap() {
    let pool = envoy_pool();
    let path = root().join("deploy/kubernetes/examples/workload/envoy-bootstrap.yaml");
    let doc = yaml_docs(&path).remove(0);
    let msg = decode_strict(&pool, "envoy.config.bootstrap.v3.Bootstrap", &doc).unwrap();
    let json = serde_json::to_value(&msg).unwrap();
    let cluster = &json["staticResources"]["clusters"][0];
    assert_eq!(
        cluster["name"],
        meshid::discovery::cluster_name(8080, "inventory-service.shop.svc.cluster.local")
    );
    let matches = cluster["transportSocketMatches"].as_array().unwrap();
    assert_eq!(matches[0]["name"], "tlsMode-istio");
    assert_eq!(matches[0]["match"], serde_json::json!({"tlsMode": "istio"}));
    assert_eq!(matches[1]["name"], "tlsMode-disabled");
    let text = json.to_string();
    for needle in [
        "envoy.grpc_credentials.file_based_metadata",
        "/var/run/secrets/tokens/istio-token",
        "\"headerPrefix\":\"Bearer \"",
        "\"name\":\"default\"",
        "\"name\":\"ROOTCA\"",
        "type.googleapis.com/envoy.config.grpc_credential.v3.FileBasedMetadataConfig",
    ] {
        assert!(text.contains(needle), "{needle} missing");
    }

    let mut typo = doc.clone();
    typo["static_resources"]["clusters"][0]["conect_timeout"] = "1s".into();
    let err = decode_strict(&pool, "envoy.config.bootstrap.v3.Bootstrap", &typo).unwrap_err();
    assert!(err.contains("conect_timeout"), "{err}");
    let mut bad_type = doc.clone();
    bad_type["static_resources"]["clusters"][0]["transport_socket_matches"][1]
        ["transport_socket"]["typed_config"]["@type"] =
        "type.googleapis.com/envoy.nope.v3.RawBuffer".into();
    let err = decode_strict(&pool, "envoy.config.bootstrap.v3.Bootstrap", &bad_type).unwrap_err();
    assert!(err.contains("envoy.nope.v3.RawBuffer"), "{err}");

    let objs = MeshObjects::from_snapshot(
        &std::fs::read(root().join("deploy/examples/mixed-traffic.yaml")).unwrap(),
    )
    .unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let tmpl = envoy_cluster(
        &objs,
        &MeshSettings::default(),
        "inventory-service.shop",
        8080,
        &td,
        &MeshidGrpc::default(),
    )
    .unwrap();
    let tmpl_msg = decode_strict(&pool, "envoy.config.cluster.v3.Cluster", &tmpl).unwrap();
    // Issue 25: the template reaches meshid as the bootstrap does. meshid serves EDS and SDS as
    // their own gRPC services (no ADS), so a template whose eds_config said `ads: {}` would
    // leave Envoy waiting for endpoints forever. Its EDS and SDS config sources are the
    // bootstrap's, field for field (both decoded by Envoy's protos).
    let tmpl_json = serde_json::to_value(&tmpl_msg).unwrap();
    let eds = &tmpl_json["edsClusterConfig"]["edsConfig"];
    assert!(eds.get("ads").is_none(), "no ADS: {eds}");
    assert_eq!(eds, &cluster["edsClusterConfig"]["edsConfig"]);
    let tls_ctx = |c: &serde_json::Value| {
        c["transportSocketMatches"][0]["transportSocket"]["typedConfig"]["commonTlsContext"].clone()
    };
    let (ours, boot) = (tls_ctx(&tmpl_json), tls_ctx(cluster));
    assert_eq!(
        ours["tlsCertificateSdsSecretConfigs"],
        boot["tlsCertificateSdsSecretConfigs"]
    );
    assert_eq!(
        ours["combinedValidationContext"]["validationContextSdsSecretConfig"],
        boot["combinedValidationContext"]["validationContextSdsSecretConfig"]
    );
    assert_eq!(
        ours["combinedValidationContext"]["defaultValidationContext"],
        boot["combinedValidationContext"]["defaultValidationContext"]
    );
}

/// The agent example (deploy/kubernetes/examples/agent): its bootstrap decodes strictly as an
/// `envoy.config.bootstrap.v3.Bootstrap`, takes `default` and `ROOTCA` from a static `sds-grpc`
/// cluster on a pipe (as Istio's sidecar bootstrap does) whose path is the agent container's
/// `--sds-socket`, and the agent container's arguments parse as `meshid agent`.
#[test]
fn the_agent_example_wires_envoys_sds_to_the_agents_socket() {
    use clap::Parser;
    let pool = envoy_pool();
    let dir = root().join("deploy/kubernetes/examples/agent");
    let doc = yaml_docs(&dir.join("envoy-bootstrap.yaml")).remove(0);
    let msg = decode_strict(&pool, "envoy.config.bootstrap.v3.Bootstrap", &doc).unwrap();
    let json = serde_json::to_value(&msg).unwrap();
    let clusters = json["staticResources"]["clusters"].as_array().unwrap();
    let sds = clusters
        .iter()
        .find(|c| c["name"] == "sds-grpc")
        .expect("an sds-grpc cluster");
    let pipe = sds["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]
        ["pipe"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let text = json.to_string();
    assert_eq!(
        text.matches("\"clusterName\":\"sds-grpc\"").count(),
        3,
        "default and ROOTCA from sds-grpc (+ its own load assignment)"
    );

    let deployment = yaml_docs(&dir.join("workload.yaml"))
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    let agent = containers
        .iter()
        .find(|c| c["name"] == "meshid-agent")
        .unwrap();
    let args = strings(&agent["args"]);
    assert!(
        args.contains(&format!("--sds-socket={pipe}")),
        "the agent serves SDS where Envoy looks: {args:?} vs {pipe}"
    );
    let argv = std::iter::once("meshid".to_owned()).chain(args);
    meshid::cli::Cli::try_parse_from(argv).unwrap();
}

/// The Deployment's init container: `ca init --if-absent` creates the CA once and leaves it alone
/// on every later start (plain `ca init` refuses an existing state).
#[test]
fn ca_init_if_absent_creates_once_and_then_leaves_the_state_alone() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let s = state.to_str().unwrap();
    let args = [
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--state-dir",
        s,
        "--if-absent",
    ];
    let first = crate::support::meshid(&args);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let before = std::fs::read(state.join("state.json")).unwrap();
    let again = crate::support::meshid(&args);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("left unchanged"));
    assert_eq!(std::fs::read(state.join("state.json")).unwrap(), before);
    let plain = crate::support::meshid(&args[..6]);
    assert!(!plain.status.success());
    assert!(String::from_utf8_lossy(&plain.stderr).contains("refusing to overwrite"));
}
