//! Cluster source: the Kubernetes API, watched with kube-rs.
//!
//! Every watch event is turned into the same [`Object`]s the local source parses from files
//! (Istio kinds go through the very same parser, so `validate` and the cluster agree on what
//! is valid), kept in a [`ClusterStore`], and compiled into the one snapshot the rest of the
//! daemon reads. A cluster is never all good: where a bad file rejects a whole directory, an
//! object here that fails validation is reported (`KIND/NS/NAME: reason`, a log line, a
//! counter, /config_dump) and skipped, and the rest still compiles.
//!
//! Missing parts of a cluster are normal: Istio's CRDs may not be installed (those kinds are
//! empty and looked for again every `--kube-rediscovery-secs`), a kind may be forbidden by
//! RBAC, the API may be down or drop a watch or answer `410 Gone`: kube-rs' watcher re-lists,
//! we back off, and the last good snapshot keeps serving throughout.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt as _;
use kube::{
    api::{Api, ApiResource, DynamicObject},
    runtime::watcher,
    Client,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{local, ConfigError, Located, Object, ObjectRef, Origin};
use crate::readiness::{BlockReady, Ready};

/// The `path` of findings about API objects: their line is the line in the object's JSON
/// (as `kubectl get -o json` prints it, without `managedFields` and `status`).
pub const API_ORIGIN: &str = "apiserver";

/// The watch of this node's pods (the ones to enrol).
const THIS_NODE_PODS: &str = "Pod (this node)";
/// The watch of other nodes' pods (labels for subsets and destination metrics).
const OTHER_NODE_PODS: &str = "Pod (other nodes)";
const ISTIO_GROUP: &str = "networking.istio.io";
const SECURITY_GROUP: &str = "security.istio.io";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// Versions in the order we prefer them when the server's preferred one lacks a kind.
const ISTIO_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
/// The Istio kinds watched, with their API group.
const ISTIO_KINDS: [(&str, &str); 10] = [
    ("VirtualService", ISTIO_GROUP),
    ("DestinationRule", ISTIO_GROUP),
    ("ServiceEntry", ISTIO_GROUP),
    ("Sidecar", ISTIO_GROUP),
    ("EnvoyFilter", ISTIO_GROUP),
    ("PeerAuthentication", SECURITY_GROUP),
    ("AuthorizationPolicy", SECURITY_GROUP),
    ("RequestAuthentication", SECURITY_GROUP),
    // The Gateway API's mesh routes (GAMMA): watched like Istio's kinds, from whenever
    // their CRDs are installed.
    ("HTTPRoute", GATEWAY_GROUP),
    ("GRPCRoute", GATEWAY_GROUP),
];
/// Istio objects larger than this (as JSON) are rejected rather than parsed on the
/// daemon's threads; real VirtualServices are a few KiB.
const MAX_OBJECT_BYTES: usize = 256 * 1024;
/// Largest Secret value written for the TLS originator (certificates and keys are a few KiB).
const MAX_SECRET_VALUE_BYTES: usize = 64 * 1024;
/// DestinationRule TLS fields that name files: on a node they would be the daemon's (root's)
/// files, not a sidecar's mounts, so a tenant could make the daemon read the node's keys.
const FILE_TLS_FIELDS: [&str; 3] = ["caCertificates", "clientCertificate", "privateKey"];
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(8);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("no Kubernetes client configuration ({0}): run in a pod with a service account, or set KUBECONFIG / --kubeconfig")]
    Infer(String),
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// The cluster source's own metrics (`proxy_daemon_kubernetes_*`), registered by the
/// wiring into the daemon's registry.
#[derive(Default)]
pub struct ClusterMetrics {
    pub watch_errors: Family<WatchErrorLabels, Counter>,
    pub watch_synced: Family<KindLabels, Gauge>,
    pub events: Family<KindLabels, Counter>,
    /// credentialNames left out: past a namespace's [`MAX_CREDENTIALS_PER_NAMESPACE`].
    pub credentials_over_cap: Gauge,
    /// Gateway API route status writes, by kind and result.
    pub route_status_writes: super::route_status::WriteMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchErrorLabels {
    pub kind: String,
    /// not_found | forbidden | gone | unauthorized | unavailable | other
    pub reason: &'static str,
}

impl ClusterMetrics {
    /// Registers the families under `registry` (the daemon's `proxy_daemon` sub-registry).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "kubernetes_watch_errors",
            "Kubernetes API list/watch errors (each is retried with backoff), by kind and reason",
            m.watch_errors.clone(),
        );
        registry.register(
            "kubernetes_watch_synced",
            "1 once a kind's initial list has been received (or the kind is not served)",
            m.watch_synced.clone(),
        );
        registry.register(
            "kubernetes_events",
            "Watch events received from the Kubernetes API, by kind",
            m.events.clone(),
        );
        registry.register(
            "kubernetes_credentials_over_cap",
            "DestinationRule credentialNames not loaded because their namespace's rules name more than a node loads for one namespace (64)",
            m.credentials_over_cap.clone(),
        );
        registry.register(
            "route_status_writes",
            "Gateway API route status.parents updates, by kind and result (written, unchanged: already as computed, conflict: another node wrote first, error)",
            m.route_status_writes.clone(),
        );
        m
    }
}

/// What the cluster source needs to know.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterSettings {
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub rediscovery: Duration,
    /// Where the Secrets named by DestinationRule `credentialName` are written for the TLS
    /// originator (`<dir>/<namespace>/<name>/tls.crt…`), private to the daemon.
    pub credentials_dir: PathBuf,
}

/// A client from `--kubeconfig`, else `KUBECONFIG`/`~/.kube/config`, else the in-cluster
/// service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClusterError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                ClusterError::Kubeconfig {
                    path: path.to_owned(),
                    message: e.to_string(),
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| ClusterError::Kubeconfig {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| ClusterError::Infer(e.to_string()))?,
    };
    // kube's own retry of 503/429 backs off up to 1000 s between attempts and hides the
    // errors from the watch loop: we back off ourselves (bounded, counted, logged).
    config.default_retry = false;
    Client::try_from(config).map_err(|e| ClusterError::Client(e.to_string()))
}

/// One watched object, as the compile step will see it.
#[derive(Debug, Clone)]
enum Entry {
    /// The object, and the Secrets it names (DestinationRule `credentialName`s).
    Parsed(Box<Located<Object>>, Vec<String>),
    /// Failed to parse: reported, skipped.
    Rejected(ConfigError),
    /// A kind of ours that the daemon does not act on (Istio `Gateway`, say).
    Ignored,
}

#[derive(Debug, Default)]
struct KindState {
    objects: BTreeMap<(String, String), Entry>,
    /// The objects of a (re-)list still arriving, swapped in whole at its end.
    relist: Option<BTreeMap<(String, String), Entry>>,
    synced: bool,
    /// Why a synced kind is empty (CRDs not installed, forbidden) or where it is served.
    note: Option<String>,
}

/// What the watchers have seen, by watch and object; compiled on every change.
pub struct ClusterStore {
    kinds: Mutex<BTreeMap<&'static str, KindState>>,
    changed: watch::Sender<u64>,
    /// `(namespace, credentialName)` of every DestinationRule: the Secrets to watch.
    credentials: watch::Sender<BTreeSet<(String, String)>>,
    /// `proxy_daemon_kubernetes_credentials_over_cap`.
    credentials_over_cap: Gauge,
}

/// Objects to compile, and the ones that failed to parse.
pub struct StoreContents {
    pub objects: Vec<Located<Object>>,
    pub rejected: Vec<ConfigError>,
}

impl ClusterStore {
    /// A store for the watches named by `keys`, none synced yet.
    pub fn new(keys: &[&'static str]) -> Self {
        Self {
            kinds: Mutex::new(keys.iter().map(|k| (*k, KindState::default())).collect()),
            changed: watch::channel(0).0,
            credentials: watch::channel(BTreeSet::new()).0,
            credentials_over_cap: Gauge::default(),
        }
    }

    /// Counts credentialNames past their namespace's cap in `gauge`.
    fn counting_credentials_in(mut self, gauge: Gauge) -> Self {
        self.credentials_over_cap = gauge;
        self
    }

    fn with<R>(&self, key: &'static str, f: impl FnOnce(&mut KindState) -> R) -> R {
        let r = self.quietly(key, f);
        self.changed.send_modify(|n| *n += 1);
        r
    }

    /// A change nobody needs to recompile for (a re-list starting).
    fn quietly<R>(&self, key: &'static str, f: impl FnOnce(&mut KindState) -> R) -> R {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        f(kinds.entry(key).or_default())
    }

    /// An object added or changed (what a watch event does).
    pub fn apply(&self, key: &'static str, ar: &ApiResource, obj: DynamicObject) {
        let name = key_of(&obj);
        let entry = convert(ar, obj);
        self.with(key, |s| s.objects.insert(name, entry));
    }

    /// An object deleted.
    pub fn delete(&self, key: &'static str, namespace: &str, name: &str) {
        self.with(key, |s| {
            s.objects.remove(&(namespace.to_string(), name.to_string()))
        });
    }

    /// Marks a watch as having had its first list.
    pub fn mark_synced(&self, key: &'static str) {
        self.with(key, |s| s.synced = true);
    }

    /// Notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Watches not yet synced, to say what readiness waits for.
    pub fn unsynced(&self) -> Vec<&'static str> {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        kinds
            .iter()
            .filter(|(_, s)| !s.synced)
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn contents(&self) -> StoreContents {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = StoreContents {
            objects: Vec::new(),
            rejected: Vec::new(),
        };
        let local_pods = kinds.get(THIS_NODE_PODS).map(|s| &s.objects);
        for (key, state) in kinds.iter() {
            for (name, entry) in &state.objects {
                // A pod that was just scheduled here can still be in the other watch until
                // its DELETED arrives there: this node's copy wins, never a duplicate. Pods
                // not scheduled anywhere yet have no IP and are nobody's to enrol.
                if *key == OTHER_NODE_PODS {
                    let unscheduled = matches!(entry, Entry::Parsed(o, _) if matches!(
                        &o.value,
                        Object::Pod(p) if p.spec.node_name.as_deref().unwrap_or("").is_empty()
                    ));
                    if unscheduled || local_pods.is_some_and(|l| l.contains_key(name)) {
                        continue;
                    }
                }
                match entry {
                    Entry::Parsed(o, _) => out.objects.push((**o).clone()),
                    Entry::Rejected(e) => out.rejected.push(e.clone()),
                    Entry::Ignored => {}
                }
            }
        }
        out
    }

    /// Per watch: synced, objects, note (for /config_dump).
    pub fn status(&self) -> serde_json::Value {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        kinds
            .iter()
            .map(|(k, s)| {
                (
                    k.to_string(),
                    serde_json::json!({
                        "synced": s.synced,
                        "objects": s.objects.len(),
                        "note": s.note,
                    }),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// The Secrets to watch: named by a DestinationRule of a namespace that has pods on
    /// this node (a credential serves only its own namespace's pods, so other namespaces'
    /// Secrets are of no use here and are never read).
    fn refresh_credentials(&self) {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let local_namespaces: BTreeSet<&str> = kinds
            .get(THIS_NODE_PODS)
            .map(|s| s.objects.keys().map(|(ns, _)| ns.as_str()).collect())
            .unwrap_or_default();
        let mut wanted = BTreeSet::new();
        if let Some(state) = kinds.get("DestinationRule") {
            for entry in state.objects.values() {
                if let Entry::Parsed(o, secrets) = entry {
                    if !local_namespaces.contains(o.object_ref.namespace.as_str()) {
                        continue;
                    }
                    for name in secrets {
                        wanted.insert((o.object_ref.namespace.clone(), name.clone()));
                    }
                }
            }
        }
        drop(kinds);
        // At most MAX_CREDENTIALS_PER_NAMESPACE per namespace (by name order, so every
        // node keeps the same ones).
        let mut per_namespace: BTreeMap<String, usize> = BTreeMap::new();
        let mut over: BTreeMap<String, usize> = BTreeMap::new();
        wanted.retain(|(ns, _)| {
            let n = per_namespace.entry(ns.clone()).or_default();
            *n += 1;
            if *n > MAX_CREDENTIALS_PER_NAMESPACE {
                *over.entry(ns.clone()).or_default() += 1;
                false
            } else {
                true
            }
        });
        let left_out = over.values().sum::<usize>() as i64;
        if self.credentials_over_cap.set(left_out) == left_out {
            over.clear();
        }
        for (ns, n) in &over {
            warn!(namespace = %ns, left_out = n, cap = MAX_CREDENTIALS_PER_NAMESPACE, "the namespace's DestinationRules name more credentials than a node loads for one namespace; the rest are not loaded");
        }
        self.credentials.send_if_modified(|cur| {
            if *cur != wanted {
                *cur = wanted;
                true
            } else {
                false
            }
        });
    }
}

/// Every `credentialName` below a DestinationRule spec (top level, subsets, port levels);
/// Err names the first value that is not a Secret name, or a TLS field that names a file.
fn collect_credential_names(
    v: &serde_json::Value,
    out: &mut BTreeSet<String>,
) -> Result<(), String> {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("credentialName" | "credential_name", serde_json::Value::String(name))
                        if !name.is_empty() =>
                    {
                        if !is_secret_name(name) {
                            return Err(format!(
                                "credentialName {name:?} is not a Secret name (lower-case DNS subdomain, at most 253 characters)"
                            ));
                        }
                        out.insert(name.clone());
                    }
                    (field, serde_json::Value::String(path))
                        if FILE_TLS_FIELDS.contains(&field) && !path.is_empty() =>
                    {
                        return Err(format!(
                            "tls.{field} names a file ({path}); in cluster mode certificates come from a Secret: use credentialName"
                        ));
                    }
                    _ => collect_credential_names(v, out)?,
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                collect_credential_names(v, out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A Kubernetes object name (DNS-1123 subdomain): also exactly one safe path component.
fn is_secret_name(name: &str) -> bool {
    name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !name.contains("..")
}

/// Turns an API object into what the local source would have made of the same YAML.
fn convert(ar: &ApiResource, obj: DynamicObject) -> Entry {
    let mut v = match serde_json::to_value(&obj) {
        Ok(v) => v,
        Err(_) => return Entry::Ignored,
    };
    let Some(map) = v.as_object_mut() else {
        return Entry::Ignored;
    };
    // List items come without their type; the watch knows it.
    map.insert("apiVersion".into(), ar.api_version.clone().into());
    map.insert("kind".into(), ar.kind.clone().into());
    if let Some(meta) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
    let namespace = obj.metadata.namespace.clone().unwrap_or_default();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let object_ref = ObjectRef {
        kind: ar.kind.clone(),
        namespace: if ar.kind == "Namespace" {
            String::new()
        } else {
            namespace
        },
        name,
    };
    let origin = Origin {
        path: PathBuf::from(API_ORIGIN),
        line: 1,
        doc_first_line: 1,
    };
    let typed = |value: Result<Object, serde_json::Error>| match value {
        Ok(value) => Entry::Parsed(
            Box::new(Located {
                origin: origin.clone(),
                object_ref: object_ref.clone(),
                value,
            }),
            Vec::new(),
        ),
        Err(e) => Entry::Rejected(ConfigError {
            path: PathBuf::from(API_ORIGIN),
            line: 1,
            object: Some(object_ref.clone()),
            message: e.to_string(),
            severity: Default::default(),
        }),
    };
    // Kubernetes' own kinds are read leniently (as from files): straight from JSON.
    match ar.kind.as_str() {
        "Namespace" => return typed(serde_json::from_value(v).map(Object::Namespace)),
        "Pod" => return typed(serde_json::from_value(v).map(Object::Pod)),
        "Service" => return typed(serde_json::from_value(v).map(Object::Service)),
        "EndpointSlice" => return typed(serde_json::from_value(v).map(Object::EndpointSlice)),
        _ => {}
    }
    // Istio kinds: through the file parser (JSON is YAML), so unknown and unsupported
    // fields are found exactly as `validate` finds them. `status` is the server's.
    map.remove("status");
    let reject = |message: String| {
        Entry::Rejected(ConfigError {
            path: PathBuf::from(API_ORIGIN),
            line: 1,
            object: Some(object_ref.clone()),
            message,
            severity: Default::default(),
        })
    };
    let mut secrets = BTreeSet::new();
    if ar.kind == "DestinationRule" {
        let spec = map.get("spec").unwrap_or(&serde_json::Value::Null);
        if let Err(message) = collect_credential_names(spec, &mut secrets) {
            return reject(message);
        }
    }
    let text = serde_json::to_string_pretty(&v).unwrap_or_default();
    if text.len() > MAX_OBJECT_BYTES {
        return reject(format!(
            "object is {} KiB as JSON; the limit is {} KiB",
            text.len() / 1024,
            MAX_OBJECT_BYTES / 1024
        ));
    }
    let doc = local::Document {
        path: PathBuf::from(API_ORIGIN),
        first_line: 1,
        text,
    };
    match local::parse_document(&doc, "default") {
        Ok(Some(o)) if matches!(o.value, Object::Gateway) => Entry::Ignored,
        Ok(Some(o)) => Entry::Parsed(Box::new(o), secrets.into_iter().collect()),
        Ok(None) => Entry::Ignored,
        Err(e) => Entry::Rejected(e),
    }
}

fn key_of(obj: &DynamicObject) -> (String, String) {
    (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

/// Exponential backoff with jitter, reset by a success.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(BACKOFF_MIN)
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d + Duration::from_millis(rand::random::<u64>() % (d.as_millis() as u64 / 4 + 1))
    }
}

/// The HTTP status of a watch error, when the API answered one.
fn status_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

fn reason_of(code: Option<u16>) -> &'static str {
    match code {
        Some(404) => "not_found",
        Some(403) => "forbidden",
        Some(410) => "gone",
        Some(401) => "unauthorized",
        Some(500..=599) => "unavailable",
        _ => "other",
    }
}

/// How a watch ended.
enum WatchEnd {
    /// The resource is not served (a CRD was removed): look it up again.
    NotFound,
    /// The stream ended (it never does on its own).
    Closed,
}

struct Watch {
    key: &'static str,
    ar: ApiResource,
    namespace: Option<String>,
    config: watcher::Config,
    /// A 404 ends the watch (Istio kinds: the CRD went away) instead of being retried.
    end_on_not_found: bool,
}

/// Runs one watch into the store until it ends; errors are counted, logged and retried.
async fn run_watch(
    client: Client,
    w: Watch,
    store: Arc<ClusterStore>,
    metrics: Arc<ClusterMetrics>,
    mut guard: Option<BlockReady>,
) -> WatchEnd {
    let api: Api<DynamicObject> = match &w.namespace {
        Some(ns) => Api::namespaced_with(client, ns, &w.ar),
        None => Api::all_with(client, &w.ar),
    };
    let kind = KindLabels {
        kind: w.key.to_string(),
    };
    let mut stream = watcher::watcher(api, w.config.clone()).boxed();
    let mut backoff = Backoff::new();
    let mut said_forbidden = false;
    // One warning per outage, not one per retry.
    let mut failing = false;
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(event) => event,
            Err(e) => {
                let code = status_code(&e);
                metrics
                    .watch_errors
                    .get_or_create(&WatchErrorLabels {
                        kind: w.key.to_string(),
                        reason: reason_of(code),
                    })
                    .inc();
                match code {
                    Some(404) if w.end_on_not_found => return WatchEnd::NotFound,
                    Some(410) => {
                        // The watcher re-lists at once; nothing is lost meanwhile.
                        info!(kind = w.key, "watch expired (410 Gone); re-listing");
                        continue;
                    }
                    Some(403) => {
                        if !said_forbidden {
                            warn!(kind = w.key, error = %e, "forbidden by RBAC: this kind stays empty until the ClusterRole allows list and watch (retrying with backoff)");
                            said_forbidden = true;
                        }
                        // An empty kind is a complete answer: do not hold readiness on it.
                        store.with(w.key, |s| {
                            if !s.synced {
                                s.synced = true;
                                s.note = Some(format!("forbidden: {e}"));
                            }
                        });
                        metrics.watch_synced.get_or_create(&kind).set(1);
                        drop(guard.take());
                    }
                    _ if !failing => {
                        warn!(kind = w.key, error = %e, "list/watch failed; retrying with backoff (the last good configuration keeps serving)");
                    }
                    _ => debug!(kind = w.key, error = %e, "list/watch failed again"),
                }
                failing = true;
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        // `Init` only says a (re-)list is about to start: not yet a success.
        if !matches!(event, watcher::Event::Init) {
            if failing {
                info!(kind = w.key, "list/watch working again");
                failing = false;
            }
            backoff.reset();
            said_forbidden = false;
        }
        metrics.events.get_or_create(&kind).inc();
        let initial_item = matches!(event, watcher::Event::InitApply(_));
        match event {
            watcher::Event::Init => store.quietly(w.key, |s| s.relist = Some(BTreeMap::new())),
            watcher::Event::InitApply(obj) => {
                let key = key_of(&obj);
                let entry = convert(&w.ar, obj);
                // Compiled once the list is complete, not object by object.
                store.quietly(w.key, |s| {
                    s.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key, entry);
                });
            }
            watcher::Event::InitDone => {
                let count = store.with(w.key, |s| {
                    if let Some(fresh) = s.relist.take() {
                        s.objects = fresh;
                    }
                    s.synced = true;
                    s.note = Some(format!("served as {}", w.ar.api_version));
                    s.objects.len()
                });
                metrics.watch_synced.get_or_create(&kind).set(1);
                if guard.take().is_some() {
                    info!(kind = w.key, objects = count, api_version = %w.ar.api_version, "initial list received");
                } else {
                    debug!(kind = w.key, objects = count, "re-listed");
                }
            }
            watcher::Event::Apply(obj) => store.apply(w.key, &w.ar, obj),
            watcher::Event::Delete(obj) => {
                let (ns, name) = key_of(&obj);
                store.delete(w.key, &ns, &name);
            }
        }
        if (w.key == "DestinationRule" || w.key == THIS_NODE_PODS) && !initial_item {
            store.refresh_credentials();
        }
    }
    WatchEnd::Closed
}

/// The resource of a core (`v1`) kind.
pub fn core(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: String::new(),
        version: "v1".into(),
        api_version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The version of the Istio API group `group_name` that serves `kind`, if any: the server's
/// preferred version when it has the kind, else the first of v1, v1beta1, v1alpha3 that
/// does.
async fn istio_resource(
    client: &Client,
    group_name: &str,
    kind: &str,
) -> Result<Option<ApiResource>, kube::Error> {
    let groups = client.list_api_groups().await?;
    let Some(group) = groups.groups.iter().find(|g| g.name == group_name) else {
        return Ok(None);
    };
    let served: Vec<&str> = group.versions.iter().map(|v| v.version.as_str()).collect();
    let mut order: Vec<&str> = Vec::new();
    if let Some(p) = &group.preferred_version {
        order.push(p.version.as_str());
    }
    for v in ISTIO_VERSIONS {
        if served.contains(&v) && !order.contains(&v) {
            order.push(v);
        }
    }
    for version in order {
        let gv = format!("{group_name}/{version}");
        let resources = match client.list_api_group_resources(&gv).await {
            Ok(r) => r,
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            Err(e) => return Err(e),
        };
        if let Some(r) = resources
            .resources
            .iter()
            .find(|r| r.kind == kind && !r.name.contains('/'))
        {
            return Ok(Some(ApiResource {
                group: group_name.into(),
                version: version.into(),
                api_version: gv,
                kind: kind.into(),
                plural: r.name.clone(),
            }));
        }
    }
    Ok(None)
}

/// One Istio kind: find where it is served, watch it there; when it is not (CRDs not
/// installed, or removed), keep it empty and look again every `rediscovery`.
async fn run_istio_kind(
    client: Client,
    (kind, group): (&'static str, &'static str),
    store: Arc<ClusterStore>,
    metrics: Arc<ClusterMetrics>,
    rediscovery: Duration,
    guard: BlockReady,
) {
    let mut guard = Some(guard);
    let mut backoff = Backoff::new();
    let mut said_missing = false;
    let mut failing = false;
    // Whether the kind was being watched, and how many lookups since have not found it.
    let (mut was_served, mut misses) = (false, 0u32);
    let labels = KindLabels { kind: kind.into() };
    loop {
        let found = istio_resource(&client, group, kind).await;
        if found.is_ok() {
            failing = false;
        }
        match found {
            Err(e) => {
                if !failing {
                    warn!(kind, group, error = %e, "API discovery failed; retrying with backoff");
                    failing = true;
                }
                metrics
                    .watch_errors
                    .get_or_create(&WatchErrorLabels {
                        kind: kind.into(),
                        reason: "other",
                    })
                    .inc();
                tokio::time::sleep(backoff.next()).await;
            }
            Ok(None) if was_served && misses == 0 => {
                // An API server that is restarting can briefly not list a CRD it serves:
                // one miss is not a removal. Look again before dropping the kind's rules.
                misses += 1;
                debug!(
                    kind,
                    "not found in discovery; checking again before dropping it"
                );
                tokio::time::sleep(rediscovery.min(Duration::from_secs(5))).await;
            }
            Ok(None) => {
                backoff.reset();
                was_served = false;
                if !said_missing {
                    info!(
                        kind,
                        recheck_secs = rediscovery.as_secs_f64(),
                        "not served by this cluster (its CRD is not installed): no {kind} objects until it is"
                    );
                    said_missing = true;
                }
                store.with(kind, |s| {
                    s.objects.clear();
                    s.relist = None;
                    s.synced = true;
                    s.note = Some("not served (CRD not installed)".into());
                });
                metrics.watch_synced.get_or_create(&labels).set(1);
                drop(guard.take());
                tokio::time::sleep(rediscovery).await;
            }
            Ok(Some(ar)) => {
                backoff.reset();
                misses = 0;
                was_served = true;
                if said_missing {
                    info!(kind, api_version = %ar.api_version, "now served: watching");
                    said_missing = false;
                }
                let w = Watch {
                    key: kind,
                    ar,
                    namespace: None,
                    config: watcher::Config::default(),
                    end_on_not_found: true,
                };
                // The watch holds the readiness guard until its first list; if it ends
                // before that, a fresh guard is not needed: the loop above drops it.
                let g = guard.take();
                match run_watch(client.clone(), w, store.clone(), metrics.clone(), g).await {
                    WatchEnd::NotFound => {
                        info!(kind, "no longer served (CRD removed?); looking it up again");
                    }
                    WatchEnd::Closed => tokio::time::sleep(backoff.next()).await,
                }
            }
        }
    }
}

/// Keeps one list+watch of Secrets per namespace whose DestinationRules name credentials
/// (and that has pods on this node), writing only the named Secrets' TLS keys to
/// `dir/<namespace>/<name>/` for the TLS originator. One watch per namespace, whatever
/// the rules name: a rule naming thousands of Secrets costs one watch, not thousands.
async fn run_secrets(
    client: Client,
    store: Arc<ClusterStore>,
    metrics: Arc<ClusterMetrics>,
    dir: PathBuf,
) {
    let mut wanted = store.credentials.subscribe();
    let mut running: BTreeMap<String, (BTreeSet<String>, JoinHandle<()>)> = BTreeMap::new();
    loop {
        let mut by_namespace: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (ns, name) in wanted.borrow_and_update().iter() {
            by_namespace
                .entry(ns.clone())
                .or_default()
                .insert(name.clone());
        }
        running.retain(|ns, (names, task)| {
            let keep = by_namespace.get(ns) == Some(names);
            if !keep {
                task.abort();
                // Names no longer wanted lose their files; the others are rewritten by the
                // new watch's list.
                let still = by_namespace.get(ns);
                for name in names.iter() {
                    if still.is_none_or(|s| !s.contains(name)) {
                        let _ = std::fs::remove_dir_all(dir.join(ns).join(name));
                        info!(namespace = %ns, secret = %name, "secret no longer referenced; forgotten");
                    }
                }
            }
            keep
        });
        for (ns, names) in by_namespace {
            if running.contains_key(&ns) {
                continue;
            }
            info!(namespace = %ns, secrets = names.len(), "watching the namespace's secrets named by DestinationRule credentialNames");
            let task = tokio::spawn(watch_namespace_secrets(
                client.clone(),
                ns.clone(),
                names.clone(),
                metrics.clone(),
                dir.clone(),
            ));
            running.insert(ns, (names, task));
        }
        if wanted.changed().await.is_err() {
            return;
        }
    }
}

/// Secret keys the TLS originator reads (Kubernetes TLS Secrets and Istio's generic ones).
const SECRET_KEYS: [&str; 6] = ["tls.crt", "tls.key", "ca.crt", "cert", "key", "cacert"];

/// Credentials (distinct `credentialName`s) one namespace's rules may have loaded on a
/// node; past it the rest are left out, said once and counted
/// (`proxy_daemon_kubernetes_credentials_over_cap`), and TLS origination needing them
/// fails as for a missing Secret.
pub const MAX_CREDENTIALS_PER_NAMESPACE: usize = 64;

async fn watch_namespace_secrets(
    client: Client,
    namespace: String,
    names: BTreeSet<String>,
    metrics: Arc<ClusterMetrics>,
    dir: PathBuf,
) {
    use k8s_openapi::api::core::v1::Secret;
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
    let labels = KindLabels {
        kind: "Secret".into(),
    };
    let mut backoff = Backoff::new();
    let mut seen_in_list: BTreeSet<String> = BTreeSet::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                backoff.reset();
                metrics.events.get_or_create(&labels).inc();
                let named = |s: &Secret| s.metadata.name.clone().filter(|n| names.contains(n));
                match event {
                    watcher::Event::Init => seen_in_list.clear(),
                    watcher::Event::InitApply(s) | watcher::Event::Apply(s) => {
                        // Every other Secret of the namespace is looked at and dropped.
                        let Some(name) = named(&s) else { continue };
                        seen_in_list.insert(name.clone());
                        match write_secret(&dir.join(&namespace).join(&name), &s) {
                            Ok(n) => {
                                info!(%namespace, secret = %name, keys = n, "TLS credentials from secret updated")
                            }
                            Err(e) => {
                                warn!(%namespace, secret = %name, error = %e, "writing secret for the TLS originator")
                            }
                        }
                    }
                    watcher::Event::Delete(s) => {
                        let Some(name) = named(&s) else { continue };
                        let _ = std::fs::remove_dir_all(dir.join(&namespace).join(&name));
                        warn!(%namespace, secret = %name, "secret deleted: TLS origination that needs it fails until it is back");
                    }
                    watcher::Event::InitDone => {
                        for name in names.difference(&seen_in_list) {
                            let _ = std::fs::remove_dir_all(dir.join(&namespace).join(name));
                            warn!(%namespace, secret = %name, "secret named by credentialName does not exist (yet)");
                        }
                    }
                }
            }
            Err(e) => {
                let code = status_code(&e);
                metrics
                    .watch_errors
                    .get_or_create(&WatchErrorLabels {
                        kind: "Secret".into(),
                        reason: reason_of(code),
                    })
                    .inc();
                if code != Some(410) {
                    warn!(%namespace, error = %e, "secret watch failed; retrying with backoff");
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }
}

/// Writes a Secret's TLS keys atomically (temp file + rename), readable only by us.
fn write_secret(
    target: &Path,
    secret: &k8s_openapi::api::core::v1::Secret,
) -> std::io::Result<usize> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(target)?;
    let data = secret.data.clone().unwrap_or_default();
    let mut written = 0;
    for key in SECRET_KEYS {
        let path = target.join(key);
        match data.get(key) {
            Some(bytes) if bytes.0.len() > MAX_SECRET_VALUE_BYTES => {
                let _ = std::fs::remove_file(&path);
                warn!(
                    key,
                    bytes = bytes.0.len(),
                    "secret value too large for a certificate or key; skipped"
                );
            }
            Some(bytes) => {
                let tmp = target.join(format!(".{key}.tmp"));
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(&bytes.0)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                written += 1;
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(written)
}

/// Starts every watch; returns the store they fill. Readiness is blocked per watch until its
/// first list has arrived (or the kind is known to be absent or forbidden).
/// The store key of the mesh config watch.
const MESH_CONFIG: &str = "MeshConfig";

pub fn start(
    client: Client,
    settings: &ClusterSettings,
    metrics: Arc<ClusterMetrics>,
    ready: &Ready,
) -> Arc<ClusterStore> {
    let node = settings.node_name.clone();
    let mut keys: Vec<&'static str> = vec![
        "Namespace",
        THIS_NODE_PODS,
        OTHER_NODE_PODS,
        "Service",
        "EndpointSlice",
        MESH_CONFIG,
    ];
    keys.extend(ISTIO_KINDS.iter().map(|(k, _)| *k));
    let store = Arc::new(
        ClusterStore::new(&keys).counting_credentials_in(metrics.credentials_over_cap.clone()),
    );
    let watches = [
        Watch {
            key: "Namespace",
            ar: core("Namespace", "namespaces"),
            namespace: None,
            config: watcher::Config::default(),
            end_on_not_found: false,
        },
        // Full pods of this node: the ones to enrol.
        Watch {
            key: THIS_NODE_PODS,
            ar: core("Pod", "pods"),
            namespace: None,
            config: watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            end_on_not_found: false,
        },
        // Pods elsewhere: their labels pick subsets' endpoints and name destinations.
        Watch {
            key: OTHER_NODE_PODS,
            ar: core("Pod", "pods"),
            namespace: None,
            config: watcher::Config::default().fields(&format!("spec.nodeName!={node}")),
            end_on_not_found: false,
        },
        Watch {
            key: "Service",
            ar: core("Service", "services"),
            namespace: None,
            config: watcher::Config::default(),
            end_on_not_found: false,
        },
        Watch {
            key: "EndpointSlice",
            ar: ApiResource {
                group: "discovery.k8s.io".into(),
                version: "v1".into(),
                api_version: "discovery.k8s.io/v1".into(),
                kind: "EndpointSlice".into(),
                plural: "endpointslices".into(),
            },
            namespace: None,
            config: watcher::Config::default(),
            end_on_not_found: false,
        },
        // Istio's mesh config (tracing settings): one ConfigMap, selected by name.
        Watch {
            key: MESH_CONFIG,
            ar: core("ConfigMap", "configmaps"),
            namespace: Some(super::mesh::MESH_CONFIG_NAMESPACE.into()),
            config: watcher::Config::default()
                .fields(&format!("metadata.name={}", super::mesh::MESH_CONFIG_NAME)),
            end_on_not_found: false,
        },
    ];
    for w in watches {
        let guard = ready.register_task(&format!("kubernetes: initial list of {}", w.key));
        let (client, store, metrics) = (client.clone(), store.clone(), metrics.clone());
        tokio::spawn(async move {
            let key = w.key;
            if let WatchEnd::Closed = run_watch(client, w, store, metrics, Some(guard)).await {
                warn!(kind = key, "watch stream ended");
            }
        });
    }
    for (kind, group) in ISTIO_KINDS {
        let guard = ready.register_task(&format!("kubernetes: initial list of {kind}"));
        tokio::spawn(run_istio_kind(
            client.clone(),
            (kind, group),
            store.clone(),
            metrics.clone(),
            settings.rediscovery,
            guard,
        ));
    }
    tokio::spawn(run_secrets(
        client,
        store.clone(),
        metrics,
        settings.credentials_dir.clone(),
    ));
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ar(api_version: &str, kind: &str) -> ApiResource {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: api_version.into(),
            kind: kind.into(),
            plural: format!("{}s", kind.to_lowercase()),
        }
    }

    fn dynamic(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pod_from_the_api_keeps_labels_owner_and_ip() {
        let obj = dynamic(serde_json::json!({
            "metadata": {"name": "web-7d9f-abcde", "namespace": "shop", "uid": "u-1",
                "labels": {"app": "web", "pod-template-hash": "7d9f"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f", "uid": "rs", "controller": true}],
                "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "web", "image": "nginx"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5"}
        }));
        let Entry::Parsed(o, _) = convert(&ar("v1", "Pod"), obj) else {
            panic!("pod not parsed")
        };
        assert_eq!(o.object_ref.to_string(), "Pod/shop/web-7d9f-abcde");
        let Object::Pod(p) = &o.value else { panic!() };
        assert_eq!(p.status.pod_ip.as_deref(), Some("10.0.0.5"));
        // The owner reference is what the workload name is derived from (state::workload).
        let owner = &p.metadata.owner_references[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("ReplicaSet", "web-7d9f")
        );
        assert_eq!(p.metadata.labels["pod-template-hash"], "7d9f");
    }

    #[test]
    fn istio_object_goes_through_the_file_parser_with_its_errors() {
        let good = dynamic(serde_json::json!({
            "metadata": {"name": "r", "namespace": "shop", "managedFields": []},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
            "status": {"validationMessages": []}
        }));
        assert!(matches!(
            convert(&ar("networking.istio.io/v1", "VirtualService"), good),
            Entry::Parsed(..)
        ));
        let bad = dynamic(serde_json::json!({
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"hosts": ["reviews"], "htttp": []}
        }));
        let Entry::Rejected(e) = convert(&ar("networking.istio.io/v1beta1", "VirtualService"), bad)
        else {
            panic!("typo accepted")
        };
        let text = e.to_string();
        assert!(text.starts_with("apiserver:"), "{text}");
        assert!(text.contains("VirtualService/shop/r: "), "{text}");
        assert!(text.contains("htttp"), "{text}");
    }

    #[test]
    fn credential_names_are_found_at_every_level() {
        let spec = serde_json::json!({
            "host": "api.example.com",
            "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "top"},
                "portLevelSettings": [{"port": {"number": 443}, "tls": {"credentialName": "port"}}]},
            "subsets": [{"name": "v1", "trafficPolicy": {"tls": {"credentialName": "sub"}}}]
        });
        let mut out = BTreeSet::new();
        collect_credential_names(&spec, &mut out).unwrap();
        let names: Vec<_> = out.iter().map(String::as_str).collect();
        assert_eq!(names, vec!["port", "sub", "top"]);
    }

    fn dr(spec: serde_json::Value) -> DynamicObject {
        dynamic(serde_json::json!({"metadata": {"name": "d", "namespace": "team-a"}, "spec": spec}))
    }

    fn rejection(entry: Entry) -> String {
        match entry {
            Entry::Rejected(e) => e.to_string(),
            _ => panic!("accepted"),
        }
    }

    #[test]
    fn hostile_credential_names_and_file_paths_are_rejected() {
        let ar = ar("networking.istio.io/v1", "DestinationRule");
        for name in [
            "../team-b/keys",
            "/proc/1/root/etc",
            "a/b",
            ".hidden",
            "UPPER",
        ] {
            let text = rejection(convert(
                &ar,
                dr(
                    serde_json::json!({"host": "x", "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": name}}}),
                ),
            ));
            assert!(text.contains("is not a Secret name"), "{name}: {text}");
            assert!(text.contains("DestinationRule/team-a/d"), "{text}");
        }
        let text = rejection(convert(
            &ar,
            dr(
                serde_json::json!({"host": "x", "subsets": [{"name": "v1", "trafficPolicy": {"tls": {
                "mode": "MUTUAL", "clientCertificate": "/var/lib/kubelet/pki/kubelet-client-current.pem",
                "privateKey": "/var/lib/kubelet/pki/kubelet-client-current.pem"}}}]}),
            ),
        ));
        assert!(text.contains("names a file"), "{text}");
        let Entry::Parsed(_, secrets) = convert(
            &ar,
            dr(
                serde_json::json!({"host": "x", "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "client-cert.v2"}}}),
            ),
        ) else {
            panic!("a valid name is accepted")
        };
        assert_eq!(secrets, vec!["client-cert.v2"]);
    }

    #[test]
    fn oversized_objects_are_rejected_before_parsing() {
        let hosts: Vec<String> = (0..20_000)
            .map(|i| format!("host-{i}.example.com"))
            .collect();
        let big = dynamic(
            serde_json::json!({"metadata": {"name": "big", "namespace": "a"}, "spec": {"hosts": hosts}}),
        );
        let text = rejection(convert(&ar("networking.istio.io/v1", "ServiceEntry"), big));
        assert!(text.contains("limit is 256 KiB"), "{text}");
    }

    #[test]
    fn a_pod_in_both_pod_watches_counts_once_and_unscheduled_pods_not_at_all() {
        let store = ClusterStore::new(&[THIS_NODE_PODS, OTHER_NODE_PODS]);
        let pod = |name: &str, node: Option<&str>| {
            let mut spec = serde_json::json!({"containers": [{"name": "app"}]});
            if let Some(n) = node {
                spec["nodeName"] = n.into();
            }
            dynamic(
                serde_json::json!({"metadata": {"name": name, "namespace": "a", "uid": name}, "spec": spec}),
            )
        };
        let pods = core("Pod", "pods");
        // Scheduled here while the other watch still has the unscheduled copy.
        store.apply(OTHER_NODE_PODS, &pods, pod("moving", None));
        store.apply(THIS_NODE_PODS, &pods, pod("moving", Some("n1")));
        store.apply(OTHER_NODE_PODS, &pods, pod("pending", None));
        store.apply(OTHER_NODE_PODS, &pods, pod("remote", Some("n2")));
        let mut names: Vec<String> = store
            .contents()
            .objects
            .iter()
            .map(|o| o.object_ref.name.clone())
            .collect();
        names.sort();
        assert_eq!(names, vec!["moving", "remote"]);
    }

    #[test]
    fn backoff_grows_and_resets() {
        let mut b = Backoff::new();
        let first = b.next();
        let later = (0..10).map(|_| b.next()).last().unwrap();
        assert!(first < Duration::from_millis(300));
        assert!(later >= BACKOFF_MAX && later <= BACKOFF_MAX * 5 / 4 + Duration::from_millis(1));
        b.reset();
        assert!(b.next() < Duration::from_millis(300));
    }
}
