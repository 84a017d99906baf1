//! Publishes the own trust domain's roots as ConfigMap `istio-ca-root-cert` (key
//! `root-cert.pem`, label `istio.io/config=true`) in every selected namespace, as istiod's
//! `NamespaceController` does (pilot/pkg/serviceregistry/kube/controller/namespacecontroller.go
//! and security/pkg/k8s/configutil.go `InsertDataToConfigMap`): namespaces created later get it,
//! a bundle change rewrites every one, and a ConfigMap someone edited or deleted is put back.
//! Like istiod: Kubernetes' own namespaces (`kube-system`, `kube-public`, `kube-node-lease`,
//! `local-path-storage`) and terminating namespaces are skipped; a create that finds the
//! ConfigMap already there, or a namespace that is gone, is not an error; updates carry the
//! resourceVersion read just before, so a concurrent writer makes the update fail with 409 and
//! it is retried from a fresh read.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    api::{ObjectMeta, PostParams},
    runtime::{reflector, watcher, WatchStreamExt},
    Api,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::CaSnapshot;
use crate::backoff::Backoff;

/// The ConfigMap's name (istiod `CACertNamespaceConfigMap`).
pub const CONFIGMAP_NAME: &str = "istio-ca-root-cert";
/// The data key (istiod `CACertNamespaceConfigMapDataName`).
pub const DATA_KEY: &str = "root-cert.pem";

/// One ConfigMap the publisher keeps in every selected namespace.
#[derive(Clone, Copy, Debug)]
pub struct Document {
    pub name: &'static str,
    pub key: &'static str,
    /// The content from a CA snapshot; `None`: nothing to publish (nothing is written).
    pub content: fn(&CaSnapshot) -> Option<String>,
}

/// `istio-ca-root-cert`: every trusted root of the own trust domain, concatenated.
pub const ROOT_CERT: Document = Document {
    name: CONFIGMAP_NAME,
    key: DATA_KEY,
    content: |s| Some(s.bundle.own_roots_pem().to_owned()),
};

/// `istio-ca-crl` (key `ca-crl.pem`): the plug-in CA's CRLs, as istiod publishes them beside
/// the roots (`namespacecontroller.go` `reconcileCACertAndCRL`, `PILOT_CRL_CONFIGMAP`); only
/// when the CA has a `ca-crl.pem`.
pub const CA_CRL: Document = Document {
    name: "istio-ca-crl",
    key: "ca-crl.pem",
    content: |s| s.bundle.own_crl_pem().map(str::to_owned),
};
/// The label istiod puts on it.
pub const LABEL: (&str, &str) = ("istio.io/config", "true");
/// Namespaces istiod never writes to (`inject.IgnoredNamespaces`).
pub const IGNORED_NAMESPACES: &[&str] = &[
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
];
/// Retries of a reconcile that left a namespace behind: the shared backoff from 1 s to 1 min.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// `[root_cert_configmap]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RootCertConfigMap {
    /// Off by default (meshid may run outside Kubernetes); turn on in a cluster.
    pub enabled: bool,
    /// Equality-based label selector of the namespaces to publish in (`a=b,c!=d,e,!f`);
    /// empty selects every namespace.
    pub namespace_selector: String,
    /// Kubeconfig to use; absent: in-cluster configuration (or `KUBECONFIG`).
    pub kubeconfig: Option<std::path::PathBuf>,
}

impl RootCertConfigMap {
    /// Every problem, each naming its key.
    pub fn validate(&self) -> Vec<String> {
        match Selector::parse(&self.namespace_selector) {
            Ok(_) => Vec::new(),
            Err(e) => vec![format!("root_cert_configmap.namespace_selector: {e}")],
        }
    }
}

/// A term that is not an equality-based label selector term.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an equality-based selector term (key=value, key!=value, key, !key)")]
pub struct SelectorError(pub String);

/// An equality-based label selector.
#[derive(Clone, Debug, Default)]
pub struct Selector(Vec<Term>);

#[derive(Clone, Debug)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

impl Selector {
    /// Parses `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma-separated; empty matches everything.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        for raw in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let valid = |k: &str| {
                !k.is_empty()
                    && k.len() <= 317
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            };
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = raw.strip_prefix('!') {
                Term::Absent(k.trim().into())
            } else {
                Term::Exists(raw.into())
            };
            let (Term::Eq(k, _) | Term::Ne(k, _) | Term::Exists(k) | Term::Absent(k)) = &term;
            if !valid(k) {
                return Err(SelectorError(raw.to_owned()));
            }
            terms.push(term);
        }
        Ok(Self(terms))
    }

    /// Whether `labels` match.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::Absent(k) => !labels.contains_key(k),
        })
    }

    /// The selector in Kubernetes' syntax, for server-side filtering.
    fn to_query(&self) -> String {
        let t: Vec<String> = self
            .0
            .iter()
            .map(|t| match t {
                Term::Eq(k, v) => format!("{k}={v}"),
                Term::Ne(k, v) => format!("{k}!={v}"),
                Term::Exists(k) => k.clone(),
                Term::Absent(k) => format!("!{k}"),
            })
            .collect();
        t.join(",")
    }
}

/// Runs the `istio-ca-root-cert` publisher until `stop` fires.
pub async fn publish(
    client: kube::Client,
    selector: Selector,
    live: watch::Receiver<Arc<CaSnapshot>>,
    stop: watch::Receiver<bool>,
) {
    publish_document(client, selector, live, ROOT_CERT, stop).await
}

/// Runs the publisher of `doc` until `stop` fires.
pub async fn publish_document(
    client: kube::Client,
    selector: Selector,
    mut live: watch::Receiver<Arc<CaSnapshot>>,
    doc: Document,
    mut stop: watch::Receiver<bool>,
) {
    let (notify, mut changes) = mpsc::channel::<()>(1);
    let (namespaces, nw) = reflector::store::<Namespace>();
    let (configmaps, cw) = reflector::store::<ConfigMap>();
    let mut ns_cfg = watcher::Config::default();
    if !selector.0.is_empty() {
        ns_cfg = ns_cfg.labels(&selector.to_query());
    }
    let cm_cfg = watcher::Config::default().fields(&format!("metadata.name={}", doc.name));
    let watchers = [
        run_watcher(
            Api::<Namespace>::all(client.clone()),
            ns_cfg,
            nw,
            notify.clone(),
        ),
        run_watcher(Api::<ConfigMap>::all(client.clone()), cm_cfg, cw, notify),
    ];
    let mut pending = true;
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    loop {
        if pending {
            let content = (doc.content)(&live.borrow_and_update());
            pending = match content {
                Some(pem) => {
                    !reconcile_all(&client, &selector, &namespaces, &configmaps, doc, &pem).await
                }
                None => false,
            };
        }
        let wait = if pending {
            backoff.failed()
        } else {
            backoff.succeeded();
            RETRY_MIN
        };
        let retry = async {
            if pending {
                tokio::time::sleep(wait).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            c = changes.recv() => if c.is_none() { break } else { pending = true },
            r = live.changed() => if r.is_err() { break } else { pending = true },
            () = retry => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    for w in watchers {
        w.abort();
    }
}

fn run_watcher<K>(
    api: Api<K>,
    cfg: watcher::Config,
    writer: reflector::store::Writer<K>,
    notify: mpsc::Sender<()>,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Clone + Default + Eq + std::hash::Hash,
{
    tokio::spawn(async move {
        let stream = watcher(api, cfg).default_backoff().reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    let _ = notify.try_send(());
                }
                Err(e) => {
                    tracing::debug!(error = %e, "root ConfigMap publisher: watch error; retrying")
                }
            }
        }
    })
}

/// Brings every selected namespace's ConfigMap to `pem`; `false` if some write must be retried.
async fn reconcile_all(
    client: &kube::Client,
    selector: &Selector,
    namespaces: &reflector::Store<Namespace>,
    configmaps: &reflector::Store<ConfigMap>,
    doc: Document,
    pem: &str,
) -> bool {
    let mut all_ok = true;
    for ns in namespaces.state() {
        let Some(name) = ns.metadata.name.as_deref() else {
            continue;
        };
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        let terminating =
            ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
        if IGNORED_NAMESPACES.contains(&name) || terminating || !selector.matches(&labels) {
            continue;
        }
        let cached = configmaps.state().into_iter().find(|c| {
            c.metadata.namespace.as_deref() == Some(name)
                && c.metadata.name.as_deref() == Some(doc.name)
        });
        if cached.as_deref().is_some_and(|c| up_to_date(c, doc, pem)) {
            continue;
        }
        if let Err(e) = ensure(client, name, doc, pem).await {
            tracing::warn!(namespace = name, configmap = doc.name, error = %e, "cannot publish; retrying");
            all_ok = false;
        }
    }
    all_ok
}

fn up_to_date(cm: &ConfigMap, doc: Document, pem: &str) -> bool {
    let data = cm.data.as_ref().and_then(|d| d.get(doc.key));
    let label = cm.metadata.labels.as_ref().and_then(|l| l.get(LABEL.0));
    data.map(String::as_str) == Some(pem) && label.map(String::as_str) == Some(LABEL.1)
}

/// Creates or updates one namespace's ConfigMap from a fresh read (istiod
/// `InsertDataToConfigMap`).
async fn ensure(
    client: &kube::Client,
    ns: &str,
    doc: Document,
    pem: &str,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match api.get_opt(doc.name).await? {
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(doc.name.into()),
                    namespace: Some(ns.into()),
                    labels: Some([(LABEL.0.into(), LABEL.1.into())].into()),
                    ..Default::default()
                },
                data: Some([(doc.key.into(), pem.into())].into()),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &cm).await {
                Ok(_) => {
                    tracing::info!(namespace = ns, configmap = doc.name, "created");
                    Ok(())
                }
                // Created meanwhile (the next event updates it), or the namespace is gone.
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
                Err(e) => Err(e),
            }
        }
        Some(mut cm) if !up_to_date(&cm, doc, pem) => {
            cm.data
                .get_or_insert_with(Default::default)
                .insert(doc.key.into(), pem.into());
            cm.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(LABEL.0.into(), LABEL.1.into());
            // `cm` carries the resourceVersion just read: a concurrent change is a 409.
            api.replace(doc.name, &PostParams::default(), &cm).await?;
            tracing::info!(namespace = ns, configmap = doc.name, "updated");
            Ok(())
        }
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_like_kubernetes_equality_selectors() {
        let labels: BTreeMap<String, String> = [
            ("env".to_string(), "prod".to_string()),
            ("mesh".into(), "on".into()),
        ]
        .into();
        for (sel, want) in [
            ("", true),
            ("env=prod", true),
            ("env==prod", true),
            ("env=dev", false),
            ("env!=dev", true),
            ("mesh", true),
            ("!mesh", false),
            ("env=prod,!legacy", true),
            ("env=prod,team", false),
        ] {
            assert_eq!(
                Selector::parse(sel).unwrap().matches(&labels),
                want,
                "{sel}"
            );
        }
        assert!(Selector::parse("env in (a,b)").is_err());
    }
}
