//! A stand-in for the Kubernetes API server, in the test process, speaking the real
//! protocol over HTTPS (HTTP/1.1 and HTTP/2, bearer token) so that the daemon's cluster
//! mode and a real `kubectl` can talk to it.
//!
//! What it serves: core v1 namespaces, pods, services, secrets, configmaps;
//! discovery.k8s.io/v1 endpointslices; networking.istio.io kinds once their CRDs are
//! installed ([`KubeApi::install_istio_crds`]). Discovery (legacy form), list (selectors,
//! pagination, resourceVersion semantics, Table and PartialObjectMetadata output), get and
//! watch (history replay, bookmarks, 410 after compaction), errors as `Status` objects.
//! Objects change only through the test's calls ([`KubeApi::apply`] and friends); the HTTP
//! side is read-only (writes answer 405).
//!
//! The server runs on its own tokio runtime, so plain `#[test]`s use it; every method is
//! synchronous and never blocks on the server. `KUBE_API_DEBUG=1` prints each request
//! (protocol, URI, Accept, User-Agent) to stderr.
mod client;
mod objects;
mod store;
mod table;
mod util;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

pub use client::{RawResponse, WatchNext, WatchStream};
pub use objects::{
    configmap_json, endpointslice_json, istio_json, namespace_json, pod_json, secret_json,
    service_json,
};
pub use util::{b64_decode, b64_std, percent_encode};

use store::{def, def_by_kind, def_by_plural, present, status, EventType, Selection, Store};
use table::Include;
use util::Query;

/// The user the stand-in's token authenticates as (named in 403 messages).
pub const USER: &str = "system:serviceaccount:proxy-daemon:proxy-daemon";
/// The server version `/version` reports.
pub const GIT_VERSION: &str = "v1.31.0";

/// A response body: whole, or a watch stream whose error ends the connection abruptly.
enum ApiBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl hyper::body::Body for ApiBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            ApiBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ApiBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ApiBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ApiBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ApiBody::Full(None) => SizeHint::with_exact(0),
            ApiBody::Stream(_) => SizeHint::default(),
        }
    }
}

type Resp = hyper::Response<ApiBody>;

struct Shared {
    token: String,
    addr: SocketAddr,
    store: Mutex<Store>,
    /// Bumped on every change of the store (and of the CRDs): watches wake on it.
    changed: tokio::sync::watch::Sender<u64>,
    available: AtomicBool,
    forbidden: Mutex<Vec<(String, String)>>,
    bookmark_every: Mutex<Duration>,
    requests: Mutex<Vec<String>>,
    watches: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    next_watch: AtomicU64,
}

impl Shared {
    fn notify(&self) {
        let rv = self.store.lock().unwrap().rv;
        self.changed.send_replace(rv);
    }

    fn drop_watches(&self) -> usize {
        let all: Vec<_> = self.watches.lock().unwrap().drain().collect();
        let n = all.len();
        for (_, kill) in all {
            let _ = kill.send(());
        }
        n
    }
}

/// The stand-in API server (see the module docs). Stops when dropped.
pub struct KubeApi {
    shared: Arc<Shared>,
    ca_pem: String,
    rt: Option<tokio::runtime::Runtime>,
}

impl KubeApi {
    /// Starts a server on 127.0.0.1 (a free port) with a fresh CA, server certificate
    /// (SANs 127.0.0.1, localhost, kubernetes.default.svc...) and bearer token.
    pub fn start() -> KubeApi {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-api")
            .enable_all()
            .build()
            .expect("kube-api runtime");
        let ca = crate::pki::TestCa::new("kube-api-standin-ca");
        let leaf = ca.server(
            &[
                "localhost",
                "127.0.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            false,
        );
        let acceptor = tls_acceptor(&leaf.cert_pem, &leaf.key_pem);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("kube-api bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("kube-api addr");
        let shared = Arc::new(Shared {
            token: format!("standin-{}", util::random_hex(40)),
            addr,
            store: Mutex::new(Store::default()),
            changed: tokio::sync::watch::channel(0).0,
            available: AtomicBool::new(true),
            forbidden: Mutex::new(Vec::new()),
            bookmark_every: Mutex::new(Duration::from_secs(1)),
            requests: Mutex::new(Vec::new()),
            watches: Mutex::new(HashMap::new()),
            next_watch: AtomicU64::new(1),
        });
        let accept_shared = shared.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let shared = accept_shared.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        KubeApi {
            shared,
            ca_pem: ca.cert_pem,
            rt: Some(rt),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.shared.addr)
    }

    /// The bearer token the server accepts.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// The CA certificate (PEM) that signed the server's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig for this server: cluster with certificate-authority-data, user with the
    /// token, one context (namespace default) that is current.
    pub fn kubeconfig_text(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- cluster:
    certificate-authority-data: {ca}
    server: {url}
  name: standin
contexts:
- context:
    cluster: standin
    namespace: default
    user: proxy-daemon
  name: standin
current-context: standin
preferences: {{}}
users:
- name: proxy-daemon
  user:
    token: {token}
",
            ca = b64_std(self.ca_pem.as_bytes()),
            url = self.url(),
            token = self.shared.token,
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("kubeconfig dir");
        }
        std::fs::write(path, self.kubeconfig_text()).expect("write kubeconfig");
    }

    // ---- the object store ----

    /// Creates or replaces an object (by apiVersion/kind/namespace/name), filling uid (kept
    /// if given), creationTimestamp, resourceVersion, generation (where the real server
    /// keeps one), managedFields and, for objects without a controller owner, the
    /// last-applied-configuration annotation; status is kept as given. Returns the stored
    /// object. A namespaced object without a namespace goes to "default". Panics for an
    /// unknown kind, or an Istio kind whose CRD version is not installed.
    pub fn apply(&self, obj: Value) -> Value {
        let api_version = obj["apiVersion"].as_str().unwrap_or("").to_string();
        let kind = obj["kind"].as_str().unwrap_or("").to_string();
        let idx = def_by_kind(&api_version, &kind)
            .unwrap_or_else(|| panic!("the stand-in does not serve {api_version} {kind}"));
        let stored = {
            let mut st = self.shared.store.lock().unwrap();
            if def(idx).is_istio() {
                let v = api_version.rsplit_once('/').map(|(_, v)| v).unwrap_or("");
                assert!(
                    st.serves(idx, v),
                    "no CRD serves {api_version} {kind}: call install_istio_crds first \
                     (installed: {:?})",
                    st.istio_versions
                );
            }
            let mut obj = obj;
            if kind == "EndpointSlice" {
                fill_target_uids(&st, &mut obj);
            }
            let stored = st.put(idx, obj);
            present(def(idx), version_of(&api_version), &stored)
        };
        self.shared.notify();
        stored
    }

    /// Deletes an object; returns its last state, or None if there was none.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let key = key_of(api_version, kind, namespace, name);
        let gone = self.shared.store.lock().unwrap().remove_key(&key);
        self.shared.notify();
        gone.map(|g| present(def(key.0), version_of(api_version), &g))
    }

    /// The stored object as the API would return it at `api_version`.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = key_of(api_version, kind, namespace, name);
        let st = self.shared.store.lock().unwrap();
        st.objects
            .get(&key)
            .map(|o| present(def(key.0), version_of(api_version), o))
    }

    /// Every stored object of a kind (all namespaces), in key order.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let idx = def_by_kind(api_version, kind)
            .unwrap_or_else(|| panic!("the stand-in does not serve {api_version} {kind}"));
        let st = self.shared.store.lock().unwrap();
        st.objects
            .iter()
            .filter(|(k, _)| k.0 == idx)
            .map(|(_, o)| present(def(idx), version_of(api_version), o))
            .collect()
    }

    /// Sets (`Some`) or removes (`None`) labels of a stored object: one MODIFIED event.
    pub fn patch_labels(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        labels: &[(&str, Option<&str>)],
    ) -> Option<Value> {
        let key = key_of(api_version, kind, namespace, name);
        let out = self.shared.store.lock().unwrap().modify(&key, |o| {
            for (k, v) in labels {
                match v {
                    Some(v) => o["metadata"]["labels"][*k] = (*v).into(),
                    None => {
                        if let Some(m) = o["metadata"]["labels"].as_object_mut() {
                            m.remove(*k);
                        }
                    }
                }
            }
        });
        self.shared.notify();
        out.map(|o| present(def(key.0), version_of(api_version), &o))
    }

    /// Changes any stored object in place (one MODIFIED event).
    pub fn modify(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        let key = key_of(api_version, kind, namespace, name);
        let out = self.shared.store.lock().unwrap().modify(&key, f);
        self.shared.notify();
        out.map(|o| present(def(key.0), version_of(api_version), &o))
    }

    /// Flips a pod's readiness as the kubelet reports it: the Ready and ContainersReady
    /// conditions and every container's `ready`.
    pub fn set_pod_ready(&self, namespace: &str, name: &str, ready: bool) -> Option<Value> {
        let now = util::now_rfc3339();
        self.modify("v1", "Pod", namespace, name, |p| {
            let s = if ready { "True" } else { "False" };
            for c in p["status"]["conditions"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                if (c["type"] == "Ready" || c["type"] == "ContainersReady") && c["status"] != s {
                    c["status"] = s.into();
                    c["lastTransitionTime"] = now.clone().into();
                    if ready {
                        if let Some(m) = c.as_object_mut() {
                            m.remove("reason");
                        }
                    } else {
                        c["reason"] = "ContainersNotReady".into();
                    }
                }
            }
            for c in p["status"]["containerStatuses"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                c["ready"] = ready.into();
            }
        })
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().rv
    }

    /// Installs (or updates) the Istio networking CRDs serving `versions` (e.g.
    /// `["v1", "v1beta1", "v1alpha3"]`). As with Istio's real CRDs, EnvoyFilter exists
    /// only at v1alpha3. Watches on versions no longer served end.
    pub fn install_istio_crds(&self, versions: &[&str]) {
        assert!(!versions.is_empty(), "a CRD serves at least one version");
        let mut vs: Vec<String> = versions.iter().map(|v| v.to_string()).collect();
        store::sort_versions(&mut vs);
        vs.dedup();
        self.shared.store.lock().unwrap().istio_versions = vs;
        self.shared.notify();
    }

    /// Installs the Gateway API's HTTPRoute (v1, v1beta1) and GRPCRoute (v1) CRDs.
    pub fn install_gateway_crds(&self) {
        self.shared.store.lock().unwrap().gateway_installed = true;
        self.shared.notify();
    }

    /// Removes the Istio CRDs: every Istio object is deleted (DELETED events), then the
    /// group is gone (404, absent from /apis) and open watches on it end.
    pub fn uninstall_istio_crds(&self) {
        {
            let mut st = self.shared.store.lock().unwrap();
            let keys: Vec<_> = st
                .objects
                .keys()
                .filter(|k| def(k.0).is_istio() && def(k.0).group != store::GATEWAY_GROUP)
                .cloned()
                .collect();
            for k in keys {
                st.remove_key(&k);
            }
            st.istio_versions.clear();
        }
        self.shared.notify();
    }

    /// Forgets the history up to now (as etcd compaction and the watch cache's window do):
    /// a watch or exact list from an older resourceVersion gets 410. Returns the
    /// compaction point.
    pub fn compact(&self) -> u64 {
        let mut st = self.shared.store.lock().unwrap();
        st.compacted = st.rv;
        st.rv
    }

    /// Cuts every open watch connection abruptly (no final chunk / stream reset); returns
    /// how many there were.
    pub fn drop_watches(&self) -> usize {
        self.shared.drop_watches()
    }

    /// While unavailable every request answers 503 ServiceUnavailable; going unavailable
    /// also cuts the open watches.
    pub fn set_available(&self, up: bool) {
        self.shared.available.store(up, Ordering::SeqCst);
        if !up {
            self.shared.drop_watches();
        }
    }

    /// RBAC denies every verb on `resource` of API `group` ("" for core) from now on.
    pub fn forbid(&self, group: &str, resource: &str) {
        self.shared
            .forbidden
            .lock()
            .unwrap()
            .push((group.to_string(), resource.to_string()));
    }

    /// Undoes [`KubeApi::forbid`].
    pub fn allow(&self, group: &str, resource: &str) {
        self.shared
            .forbidden
            .lock()
            .unwrap()
            .retain(|(g, r)| !(g == group && r == resource));
    }

    /// How often watches with allowWatchBookmarks get a BOOKMARK (default 1 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.shared.bookmark_every.lock().unwrap() = every;
    }

    /// Every request so far, as "METHOD path?query" (query as sent, still encoded).
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn clear_requests(&self) {
        self.shared.requests.lock().unwrap().clear();
    }

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.shared.watches.lock().unwrap().len()
    }

    // ---- a plain client, for protocol-level tests ----

    fn target(&self) -> client::Target {
        client::Target {
            addr: self.shared.addr,
            ca_pem: self.ca_pem.clone(),
            rt: self.rt.as_ref().expect("runtime").handle().clone(),
        }
    }

    /// One HTTPS request (HTTP/1.1) with the given token (None: no Authorization header)
    /// and Accept header (None: application/json).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        accept: Option<&str>,
    ) -> std::io::Result<RawResponse> {
        self.target().request(method, path, token, accept)
    }

    /// GET `path` with the server's token; (status, JSON body).
    pub fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self
            .request("GET", path, Some(&self.shared.token), None)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        (r.status, r.json())
    }

    /// Opens a watch (`path` should carry `watch=1`) with the server's token.
    pub fn watch(&self, path: &str) -> WatchStream {
        self.target()
            .watch(path, &self.shared.token)
            .unwrap_or_else(|e| panic!("watch {path}: {e}"))
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shared.drop_watches();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn version_of(api_version: &str) -> &str {
    api_version
        .rsplit_once('/')
        .map(|(_, v)| v)
        .unwrap_or(api_version)
}

fn key_of(api_version: &str, kind: &str, namespace: &str, name: &str) -> store::Key {
    let idx = def_by_kind(api_version, kind)
        .unwrap_or_else(|| panic!("the stand-in does not serve {api_version} {kind}"));
    let ns = if def(idx).namespaced { namespace } else { "" };
    (idx, ns.to_string(), name.to_string())
}

/// The endpointslice controller writes each endpoint's pod uid in targetRef.
fn fill_target_uids(st: &Store, slice: &mut Value) {
    let pods = def_by_plural("", "pods").unwrap();
    let ns = slice["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    for e in slice["endpoints"].as_array_mut().into_iter().flatten() {
        let t = &mut e["targetRef"];
        if t["kind"] == "Pod" && t["uid"].is_null() {
            let name = t["name"].as_str().unwrap_or("").to_string();
            let pod_ns = t["namespace"].as_str().unwrap_or(&ns).to_string();
            if let Some(p) = st.objects.get(&(pods, pod_ns, name)) {
                t["uid"] = p["metadata"]["uid"].clone();
            }
        }
    }
}

fn tls_acceptor(cert_pem: &str, key_pem: &str) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("server cert");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("server key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

// ---- responses ----

fn respond(code: u16, content_type: &str, body: String) -> Resp {
    hyper::Response::builder()
        .status(code)
        .header("audit-id", util::random_uid())
        .header("cache-control", "no-cache, private")
        .header("content-type", content_type)
        .header(
            "x-kubernetes-pf-flowschema-uid",
            "6d3e6a1c-0d39-4e5f-9b8d-5c9d3cdb0e8f",
        )
        .header(
            "x-kubernetes-pf-prioritylevel-uid",
            "1b3a8c2e-7a5d-4c1e-8f0b-2d6e9a4c7b31",
        )
        .body(ApiBody::Full(Some(Bytes::from(body))))
        .expect("response")
}

fn json_resp(code: u16, v: &Value) -> Resp {
    respond(code, "application/json", format!("{v}\n"))
}

fn status_resp(code: u16, reason: &str, message: &str, details: Option<Value>) -> Resp {
    json_resp(code, &status(code, reason, message, details))
}

/// The real server's answer for a path it has no handler for.
fn not_found() -> Resp {
    status_resp(
        404,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

fn bad_request(message: &str) -> Resp {
    status_resp(400, "BadRequest", message, None)
}

/// 422 for invalid ListOptions (`field: Forbidden: message`).
fn invalid_options(field: &str, message: &str) -> Resp {
    status_resp(
        422,
        "Invalid",
        &format!("ListOptions.meta.k8s.io \"\" is invalid: {field}: Forbidden: {message}"),
        Some(json!({
            "group": "meta.k8s.io",
            "kind": "ListOptions",
            "causes": [{
                "reason": "FieldValueForbidden",
                "message": format!("Forbidden: {message}"),
                "field": field,
            }],
        })),
    )
}

fn resource_details(d: &store::ResDef, name: Option<&str>) -> Value {
    let mut details = json!({});
    if let Some(n) = name {
        details["name"] = n.into();
    }
    if !d.group.is_empty() {
        details["group"] = d.group.into();
    }
    details["kind"] = d.plural.into();
    details
}

/// The representation a request asked for in its Accept header.
#[derive(Clone, Copy)]
enum Format {
    Json,
    Table(Include),
    Partial,
}

fn negotiate(accept: &str, query: &Query) -> Format {
    for media in accept.split(',') {
        let mut parts = media.split(';').map(str::trim);
        let mime = parts.next().unwrap_or("");
        let params: Vec<(&str, &str)> = parts.filter_map(|p| p.split_once('=')).collect();
        let param = |k: &str| params.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        if mime != "application/json" && mime != "*/*" && mime != "application/*" {
            continue;
        }
        let meta =
            param("g") == Some("meta.k8s.io") && matches!(param("v"), Some("v1" | "v1beta1"));
        match param("as") {
            None => return Format::Json,
            Some("Table") if meta => {
                let include = match query.get("includeObject") {
                    Some("None") => Include::None,
                    Some("Object") => Include::Object,
                    _ => Include::Metadata,
                };
                return Format::Table(include);
            }
            Some("PartialObjectMetadata" | "PartialObjectMetadataList") if meta => {
                return Format::Partial
            }
            Some(_) => continue,
        }
    }
    Format::Json
}

// ---- request handling ----

async fn handle(shared: Arc<Shared>, req: hyper::Request<Incoming>) -> Resp {
    let method = req.method().as_str().to_string();
    if std::env::var_os("KUBE_API_DEBUG").is_some() {
        eprintln!(
            "kube-api: {:?} {method} {} accept={:?} user-agent={:?}",
            req.version(),
            req.uri(),
            req.headers().get(hyper::header::ACCEPT),
            req.headers().get(hyper::header::USER_AGENT),
        );
    }
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or("").to_string();
    shared
        .requests
        .lock()
        .unwrap()
        .push(if raw_query.is_empty() {
            format!("{method} {path}")
        } else {
            format!("{method} {path}?{raw_query}")
        });
    if !shared.available.load(Ordering::SeqCst) {
        return status_resp(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
            None,
        );
    }
    let authorized = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.trim() == shared.token);
    if !authorized {
        return status_resp(401, "Unauthorized", "Unauthorized", None);
    }
    let query = Query::parse(&raw_query);
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let format = negotiate(&accept, &query);
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if method == "PATCH" {
        use http_body_util::BodyExt as _;
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return bad_request("unreadable body"),
        };
        return patch_status(&shared, &segs, &body);
    }
    let get = method == "GET";
    match segs.as_slice() {
        ["version"] if get => json_resp(200, &version_json()),
        ["healthz" | "livez" | "readyz"] if get => {
            respond(200, "text/plain; charset=utf-8", "ok".into())
        }
        ["api"] if get => json_resp(
            200,
            &json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}],
            }),
        ),
        ["api", "v1"] if get => json_resp(200, &resource_list(&shared, "", "v1").unwrap()),
        ["apis"] if get => {
            let groups = groups(&shared);
            json_resp(
                200,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            )
        }
        ["apis", g] if get => match groups(&shared).into_iter().find(|x| x["name"] == *g) {
            Some(mut group) => {
                group["kind"] = "APIGroup".into();
                group["apiVersion"] = "v1".into();
                json_resp(200, &group)
            }
            None => not_found(),
        },
        ["apis", g, v] if get => match resource_list(&shared, g, v) {
            Some(list) => json_resp(200, &list),
            None => not_found(),
        },
        ["api", "v1", rest @ ..] => {
            resource(&shared, &method, "", "v1", rest, &query, format).await
        }
        ["apis", g, v, rest @ ..] => resource(&shared, &method, g, v, rest, &query, format).await,
        _ => not_found(),
    }
}

fn version_json() -> Value {
    json!({
        "major": "1",
        "minor": "31",
        "gitVersion": GIT_VERSION,
        "gitCommit": "9edcffcde5595e8a5b1a35f88c421764e575afce",
        "gitTreeState": "clean",
        "buildDate": "2024-08-13T07:28:49Z",
        "goVersion": "go1.22.5",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// The API groups (besides core) as /apis lists them.
fn groups(shared: &Shared) -> Vec<Value> {
    let st = shared.store.lock().unwrap();
    let gv = |g: &str, v: &str| json!({"groupVersion": format!("{g}/{v}"), "version": v});
    let mut out = vec![json!({
        "name": "discovery.k8s.io",
        "versions": [gv("discovery.k8s.io", "v1")],
        "preferredVersion": gv("discovery.k8s.io", "v1"),
    })];
    if let Some(preferred) = st.istio_versions.first() {
        out.push(json!({
            "name": store::ISTIO_GROUP,
            "versions": st.istio_versions.iter().map(|v| gv(store::ISTIO_GROUP, v)).collect::<Vec<_>>(),
            "preferredVersion": gv(store::ISTIO_GROUP, preferred),
        }));
        out.push(json!({
            "name": store::SECURITY_GROUP,
            "versions": [gv(store::SECURITY_GROUP, "v1"), gv(store::SECURITY_GROUP, "v1beta1")],
            "preferredVersion": gv(store::SECURITY_GROUP, "v1"),
        }));
    }
    if st.gateway_installed {
        out.push(json!({
            "name": store::GATEWAY_GROUP,
            "versions": [gv(store::GATEWAY_GROUP, "v1"), gv(store::GATEWAY_GROUP, "v1beta1")],
            "preferredVersion": gv(store::GATEWAY_GROUP, "v1"),
        }));
    }
    out
}

/// An APIResourceList for group/version, or None when it is not served.
fn resource_list(shared: &Shared, group: &str, version: &str) -> Option<Value> {
    let st = shared.store.lock().unwrap();
    let mut resources = Vec::new();
    for (i, d) in store::RESOURCES.iter().enumerate() {
        if d.group != group || !st.serves(i, version) {
            continue;
        }
        let verbs: &[&str] = match d.plural {
            "namespaces" => &[
                "create", "delete", "get", "list", "patch", "update", "watch",
            ],
            _ => &[
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ],
        };
        let mut r = json!({
            "name": d.plural,
            "singularName": d.singular,
            "namespaced": d.namespaced,
            "kind": d.kind,
            "verbs": verbs,
            "storageVersionHash": d.storage_hash,
        });
        if !d.short_names.is_empty() {
            r["shortNames"] = d.short_names.into();
        }
        if !d.categories.is_empty() {
            r["categories"] = d.categories.into();
        }
        resources.push(r);
        if matches!(d.plural, "pods" | "services" | "namespaces") || d.is_istio() {
            resources.push(json!({
                "name": format!("{}/status", d.plural),
                "singularName": "",
                "namespaced": d.namespaced,
                "kind": d.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// A JSON merge patch (RFC 7386) of `patch` onto `target`.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// `PATCH /apis/G/V/namespaces/NS/PLURAL/NAME/status` with a merge patch: only `status`
/// changes (as the status subresource does); a `metadata.resourceVersion` in the patch
/// is a precondition (409 Conflict when the object has moved on). Other PATCHes: 405.
fn patch_status(shared: &Shared, segs: &[&str], body: &[u8]) -> Resp {
    let ["apis", g, v, "namespaces", ns, plural, name, "status"] = segs else {
        return status_resp(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            Some(json!({})),
        );
    };
    let Some(idx) = def_by_plural(g, plural) else {
        return not_found();
    };
    let d = def(idx);
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return bad_request("the body is not JSON");
    };
    let stored = {
        let mut st = shared.store.lock().unwrap();
        if !st.serves(idx, v) {
            return not_found();
        }
        let key = (idx, ns.to_string(), name.to_string());
        let Some(current) = st.objects.get(&key).cloned() else {
            return status_resp(
                404,
                "NotFound",
                &format!("{} \"{name}\" not found", d.qualified()),
                Some(resource_details(d, Some(name))),
            );
        };
        if let Some(want) = patch["metadata"]["resourceVersion"].as_str() {
            if current["metadata"]["resourceVersion"].as_str() != Some(want) {
                return status_resp(
                    409,
                    "Conflict",
                    &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", d.qualified()),
                    Some(resource_details(d, Some(name))),
                );
            }
        }
        let mut updated = current.clone();
        let mut status = current["status"].clone();
        merge_patch(&mut status, &patch["status"]);
        updated["status"] = status;
        st.put(idx, updated)
    };
    shared.notify();
    json_resp(200, &present(d, v, &stored))
}

/// A request under /api/v1 or /apis/G/V.
async fn resource(
    shared: &Arc<Shared>,
    method: &str,
    group: &str,
    version: &str,
    rest: &[&str],
    query: &Query,
    format: Format,
) -> Resp {
    let (legacy_watch, rest) = match rest {
        ["watch", tail @ ..] => (true, tail),
        _ => (false, rest),
    };
    let (namespace, plural, name) = match rest {
        [p] => (None, *p, None),
        [p, n] => (None, *p, Some(*n)),
        ["namespaces", ns, p] => (Some(*ns), *p, None),
        ["namespaces", ns, p, n] => (Some(*ns), *p, Some(*n)),
        _ => return not_found(),
    };
    let Some(idx) = def_by_plural(group, plural) else {
        return not_found();
    };
    let d = def(idx);
    if !shared.store.lock().unwrap().serves(idx, version) {
        return not_found();
    }
    if (d.namespaced && namespace.is_none() && name.is_some())
        || (!d.namespaced && namespace.is_some())
    {
        return not_found();
    }
    if method != "GET" {
        return status_resp(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            Some(json!({})),
        );
    }
    let watch = legacy_watch || query.flag("watch");
    let verb = if watch {
        "watch"
    } else if name.is_some() {
        "get"
    } else {
        "list"
    };
    let denied = shared
        .forbidden
        .lock()
        .unwrap()
        .iter()
        .any(|(g, r)| g == group && r == plural);
    if denied {
        let subject = match name {
            Some(n) if !watch => format!("{} \"{n}\"", d.qualified()),
            _ => d.qualified(),
        };
        let scope = match namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".into(),
        };
        return status_resp(
            403,
            "Forbidden",
            &format!(
                "{subject} is forbidden: User \"{USER}\" cannot {verb} resource \"{plural}\" in API group \"{group}\" {scope}"
            ),
            Some(resource_details(d, name.filter(|_| !watch))),
        );
    }
    if let (Some(n), false) = (name, watch) {
        return get_one(shared, idx, version, namespace.unwrap_or(""), n, format);
    }
    let fields = match query.get("fieldSelector") {
        Some(s) => match store::parse_field_selector(s, d) {
            Ok(f) => f,
            Err(e) => return bad_request(&e),
        },
        None => Vec::new(),
    };
    let mut fields = fields;
    if let Some(n) = name {
        fields.push(store::FieldReq::Eq("metadata.name".into(), n.into()));
    }
    let labels = match store::parse_label_selector(query.get("labelSelector").unwrap_or("")) {
        Ok(l) => l,
        Err(e) => return bad_request(&e),
    };
    let sel = Selection {
        def: idx,
        version: version.to_string(),
        namespace: namespace.map(str::to_string),
        fields,
        labels,
    };
    if watch {
        start_watch(shared, sel, query, format)
    } else {
        list(shared, sel, query, format).await
    }
}

fn get_one(
    shared: &Shared,
    idx: usize,
    version: &str,
    ns: &str,
    name: &str,
    format: Format,
) -> Resp {
    let d = def(idx);
    let st = shared.store.lock().unwrap();
    let Some(obj) = st.objects.get(&(idx, ns.to_string(), name.to_string())) else {
        return status_resp(
            404,
            "NotFound",
            &format!("{} \"{name}\" not found", d.qualified()),
            Some(resource_details(d, Some(name))),
        );
    };
    let obj = present(d, version, obj);
    match format {
        Format::Json => json_resp(200, &obj),
        Format::Partial => json_resp(200, &table::partial(&obj)),
        Format::Table(include) => json_resp(
            200,
            &table::table(
                d,
                std::slice::from_ref(&obj),
                include,
                true,
                json!({"resourceVersion": obj["metadata"]["resourceVersion"]}),
            ),
        ),
    }
}

/// The continue token: base64url(JSON {"v","rv","start"}), as the etcd3 store encodes it.
fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    let start = if ns.is_empty() {
        format!("{name}\u{0}")
    } else {
        format!("{ns}/{name}\u{0}")
    };
    util::b64_url_raw(
        json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start})
            .to_string()
            .as_bytes(),
    )
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    let v: Value = serde_json::from_slice(&util::b64_decode(token)?).ok()?;
    if v["v"] != "meta.k8s.io/v1" {
        return None;
    }
    let rv = v["rv"].as_u64()?;
    let start = v["start"].as_str()?.trim_end_matches('\u{0}');
    let (ns, name) = start.split_once('/').unwrap_or(("", start));
    Some((rv, ns.to_string(), name.to_string()))
}

async fn list(shared: &Arc<Shared>, sel: Selection, query: &Query, format: Format) -> Resp {
    let d = def(sel.def);
    let rv_param = query.get("resourceVersion").unwrap_or("");
    let matching = query.get("resourceVersionMatch").unwrap_or("");
    let cont = query.get("continue").filter(|c| !c.is_empty());
    // ListOptions validation, as the real server does it.
    if !matching.is_empty() {
        if rv_param.is_empty() {
            return invalid_options(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            );
        }
        if cont.is_some() {
            return invalid_options(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden when continue is provided",
            );
        }
        if matching != "Exact" && matching != "NotOlderThan" {
            return status_resp(
                422,
                "Invalid",
                &format!("ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Unsupported value: \"{matching}\": supported values: \"Exact\", \"NotOlderThan\", \"\""),
                None,
            );
        }
        if matching == "Exact" && rv_param == "0" {
            return invalid_options(
                "resourceVersionMatch",
                "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            );
        }
    }
    if query.flag("sendInitialEvents") {
        return invalid_options(
            "sendInitialEvents",
            "sendInitialEvents is forbidden for list",
        );
    }
    if cont.is_some() && !rv_param.is_empty() && rv_param != "0" {
        return bad_request("specifying resource version is not allowed when using continue");
    }
    let requested: Option<u64> = if rv_param.is_empty() || rv_param == "0" {
        None
    } else {
        match rv_param.parse() {
            Ok(n) => Some(n),
            Err(_) => return bad_request(&format!("invalid resource version: {rv_param}")),
        }
    };
    // A resourceVersion not reached yet: wait up to 3 s for it, as the watch cache does.
    if let (Some(n), false) = (requested, matching == "Exact") {
        let mut changed = shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let current = shared.store.lock().unwrap().rv;
            if current >= n {
                break;
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return status_resp(
                    504,
                    "Timeout",
                    &format!("Too large resource version: {n}, current: {current}"),
                    Some(json!({
                        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                        "retryAfterSeconds": 1,
                    })),
                );
            }
        }
    }
    let limit: Option<usize> = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|&l| l > 0);
    let st = shared.store.lock().unwrap();
    // (snapshot rv, objects at it, start after this key)
    type NsName = (String, String);
    let (rv, objects, after): (u64, Vec<(NsName, Value)>, Option<NsName>) = if let Some(token) =
        cont
    {
        let Some((rv, ns, name)) = decode_continue(token) else {
            return bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)");
        };
        if rv < st.compacted {
            return status_resp(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                    None,
                );
        }
        (
            rv,
            st.state_at(sel.def, rv).into_iter().collect(),
            Some((ns, name)),
        )
    } else if let (Some(n), "Exact") = (requested, matching) {
        if n < st.compacted {
            return status_resp(
                410,
                "Expired",
                "The resourceVersion for the provided list is too old.",
                None,
            );
        }
        if n > st.rv {
            return status_resp(
                504,
                "Timeout",
                &format!("Too large resource version: {n}, current: {}", st.rv),
                Some(json!({
                    "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                    "retryAfterSeconds": 1,
                })),
            );
        }
        (n, st.state_at(sel.def, n).into_iter().collect(), None)
    } else {
        let objs = st
            .objects
            .iter()
            .filter(|(k, _)| k.0 == sel.def)
            .map(|(k, v)| ((k.1.clone(), k.2.clone()), v.clone()))
            .collect();
        (st.rv, objs, None)
    };
    drop(st);
    let mut items: Vec<((String, String), Value)> = objects
        .into_iter()
        .filter(|((ns, _), o)| sel.in_scope(ns) && sel.matches(o))
        .filter(|(k, _)| after.as_ref().is_none_or(|a| k > a))
        .collect();
    // resourceVersion=0 is served from the watch cache, which ignores limit.
    let paginate = rv_param != "0";
    let mut list_meta = json!({"resourceVersion": rv.to_string()});
    if let (Some(limit), true) = (limit, paginate) {
        if items.len() > limit {
            let remaining = items.len() - limit;
            items.truncate(limit);
            let ((ns, name), _) = items.last().unwrap();
            list_meta["continue"] = encode_continue(rv, ns, name).into();
            if !sel.has_predicate() {
                list_meta["remainingItemCount"] = remaining.into();
            }
        }
    }
    let objs: Vec<Value> = items
        .into_iter()
        .map(|(_, o)| present(d, &sel.version, &o))
        .collect();
    match format {
        Format::Table(include) => json_resp(200, &table::table(d, &objs, include, true, list_meta)),
        Format::Partial => json_resp(
            200,
            &json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": list_meta,
                "items": objs.iter().map(table::partial).collect::<Vec<_>>(),
            }),
        ),
        Format::Json => {
            // Items of built-in lists carry no apiVersion/kind on the wire (the typed
            // list's encoding drops them); custom resources' items keep theirs.
            let items: Vec<Value> = objs
                .into_iter()
                .map(|mut o| {
                    if !d.is_istio() {
                        if let Some(m) = o.as_object_mut() {
                            m.remove("apiVersion");
                            m.remove("kind");
                        }
                    }
                    o
                })
                .collect();
            json_resp(
                200,
                &json!({
                    "kind": format!("{}List", d.kind),
                    "apiVersion": d.group_version(&sel.version),
                    "metadata": list_meta,
                    "items": items,
                }),
            )
        }
    }
}

// ---- watch ----

struct WatchPlan {
    sel: Selection,
    /// None: start with ADDED for the current state; Some(rv): replay events after rv.
    from: Option<u64>,
    bookmarks: bool,
    initial_end_bookmark: bool,
    timeout: Option<Duration>,
    format: Format,
}

fn start_watch(shared: &Arc<Shared>, sel: Selection, query: &Query, format: Format) -> Resp {
    let rv_param = query.get("resourceVersion").unwrap_or("");
    let matching = query.get("resourceVersionMatch").unwrap_or("");
    let send_initial = query
        .get("sendInitialEvents")
        .map(|v| matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True"));
    let bookmarks = query.flag("allowWatchBookmarks");
    match send_initial {
        None if !matching.is_empty() => {
            return invalid_options(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            )
        }
        Some(_) if matching != "NotOlderThan" => {
            return invalid_options(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            )
        }
        Some(true) if !bookmarks => {
            return invalid_options(
                "allowWatchBookmarks",
                "allowWatchBookmarks must be set to true when sendInitialEvents is true",
            )
        }
        _ => {}
    }
    let from = if rv_param.is_empty() || rv_param == "0" || send_initial == Some(true) {
        None
    } else {
        match rv_param.parse() {
            Ok(n) => Some(n),
            Err(_) => return bad_request(&format!("invalid resource version: {rv_param}")),
        }
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|&t| t > 0)
        .map(Duration::from_secs);
    let plan = WatchPlan {
        sel,
        from,
        bookmarks,
        initial_end_bookmark: send_initial == Some(true),
        timeout,
        format,
    };
    let (tx, rx) = mpsc::channel(256);
    let (kill_tx, kill_rx) = oneshot::channel();
    let id = shared.next_watch.fetch_add(1, Ordering::Relaxed);
    shared.watches.lock().unwrap().insert(id, kill_tx);
    let task_shared = shared.clone();
    tokio::spawn(async move {
        let _registered = Registered(task_shared.clone(), id);
        run_watch(&task_shared, plan, tx, kill_rx).await;
    });
    hyper::Response::builder()
        .status(200)
        .header("audit-id", util::random_uid())
        .header("cache-control", "no-cache, private")
        .header("content-type", "application/json")
        .body(ApiBody::Stream(rx))
        .expect("watch response")
}

/// Removes a watch from the open set when its task ends, however it ends.
struct Registered(Arc<Shared>, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.watches.lock().unwrap().remove(&self.1);
    }
}

type LineTx = mpsc::Sender<Result<Bytes, std::io::Error>>;

async fn send_line(tx: &LineTx, etype: &str, object: Value) -> bool {
    let line = format!("{}\n", json!({"type": etype, "object": object}));
    tx.send(Ok(Bytes::from(line))).await.is_ok()
}

struct Encoder {
    format: Format,
    headers_sent: bool,
}

impl Encoder {
    fn encode(&mut self, sel: &Selection, obj: Value) -> Value {
        match self.format {
            Format::Json => obj,
            Format::Partial => table::partial(&obj),
            Format::Table(include) => {
                let headers = !self.headers_sent;
                self.headers_sent = true;
                let meta = json!({"resourceVersion": obj["metadata"]["resourceVersion"]});
                table::table(def(sel.def), &[obj], include, headers, meta)
            }
        }
    }
}

fn bookmark(sel: &Selection, rv: u64, initial_end: bool, format: Format) -> Value {
    let d = def(sel.def);
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    match format {
        Format::Partial => {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta})
        }
        _ => json!({"kind": d.kind, "apiVersion": d.group_version(&sel.version), "metadata": meta}),
    }
}

async fn run_watch(
    shared: &Arc<Shared>,
    plan: WatchPlan,
    tx: LineTx,
    mut kill: oneshot::Receiver<()>,
) {
    let sel = &plan.sel;
    let mut enc = Encoder {
        format: plan.format,
        headers_sent: false,
    };
    let mut changed = shared.changed.subscribe();
    changed.borrow_and_update();
    // Where the stream starts.
    enum Start {
        Expired(u64, u64),
        From(u64),
        Initial(u64, Vec<Value>),
    }
    let start = {
        let st = shared.store.lock().unwrap();
        match plan.from {
            Some(n) if n < st.compacted => Start::Expired(n, st.compacted),
            Some(n) => Start::From(n),
            None => Start::Initial(
                st.rv,
                st.objects
                    .iter()
                    .filter(|(k, o)| k.0 == sel.def && sel.in_scope(&k.1) && sel.matches(o))
                    .map(|(_, o)| present(def(sel.def), &sel.version, o))
                    .collect(),
            ),
        }
    };
    let (mut cursor, initial) = match start {
        Start::Expired(n, compacted) => {
            let err = status(
                410,
                "Expired",
                &format!("too old resource version: {n} ({compacted})"),
                None,
            );
            send_line(&tx, "ERROR", err).await;
            return;
        }
        Start::From(n) => (n, Vec::new()),
        Start::Initial(rv, objs) => (rv, objs),
    };
    for o in initial {
        let o = enc.encode(sel, o);
        if !send_line(&tx, "ADDED", o).await {
            return;
        }
    }
    if plan.initial_end_bookmark
        && !send_line(&tx, "BOOKMARK", bookmark(sel, cursor, true, plan.format)).await
    {
        return;
    }
    let every = *shared.bookmark_every.lock().unwrap();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let deadline = plan.timeout.map(|t| tokio::time::Instant::now() + t);
    loop {
        changed.borrow_and_update();
        let (events, served, rv) = {
            let st = shared.store.lock().unwrap();
            let events: Vec<(EventType, Value)> = st
                .events_after(cursor)
                .iter()
                .filter_map(|e| sel.view(e))
                .collect();
            (events, st.serves(sel.def, &sel.version), st.rv)
        };
        for (etype, o) in events {
            let o = enc.encode(sel, o);
            if !send_line(&tx, etype.as_str(), o).await {
                return;
            }
        }
        cursor = cursor.max(rv);
        if !served {
            // The CRD (or this version of it) is gone: the server ends its watches.
            return;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tick.tick(), if plan.bookmarks => {
                if !send_line(&tx, "BOOKMARK", bookmark(sel, cursor, false, plan.format)).await {
                    return;
                }
            }
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => return,
            _ = &mut kill => {
                let _ = tx.send(Err(std::io::Error::other("watch connection dropped"))).await;
                return;
            }
            _ = tx.closed() => return,
        }
    }
}
