//! Store → compile → snapshot. The store holds what the source last gave us; compiling
//! turns it into an immutable [`Snapshot`] the rest of the daemon reads without locks.
pub mod authz;
pub mod jwt;
pub mod registry;
pub mod routes;
pub mod security;
pub mod workload;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::{
    config::{ConfigError, Located, Object, ObjectRef, Origin},
    state::workload::WorkloadInfo,
};
use proxy_common::FailMode;

pub const FAIL_MODE_ANNOTATION: &str = "nodeproxy.io/fail-mode";
/// Namespace annotation: "false" turns the access log off for the namespace's pods.
pub const ACCESS_LOG_ANNOTATION: &str = "nodeproxy.io/access-log";
pub const TRACE_SAMPLING_ANNOTATION: &str = "nodeproxy.io/trace-sampling";
pub const CAPTURE_LABEL_KEY: &str = "nodeproxy.io/capture";

/// Settings that decide which pods are captured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaptureSettings {
    pub label_key: String,
    pub label_value: String,
    /// Pods with another spec.nodeName are not ours; pods with none are (local mode).
    pub node_name: String,
    #[serde(serialize_with = "ser_fail_mode")]
    pub default_fail_mode: FailMode,
    /// `--trust-domain`: the SPIFFE trust domain of workload identities.
    pub trust_domain: String,
    /// `--default-export-to`: the `exportTo` of VirtualServices, DestinationRules and
    /// ServiceEntries that set none (empty: `*`, Istio's default). The mesh config's
    /// `default*ExportTo` fields override it per kind.
    pub default_export_to: Vec<String>,
}

/// The `exportTo` an object gets when it sets none, per kind (Istio's MeshConfig
/// `defaultVirtualServiceExportTo`, `defaultDestinationRuleExportTo`,
/// `defaultServiceExportTo`). Empty means `*`: every namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExportDefaults {
    pub virtual_service: Vec<String>,
    pub destination_rule: Vec<String>,
    pub service_entry: Vec<String>,
    /// Kubernetes Services: only the mesh config's `defaultServiceExportTo` changes it
    /// (the flag does not: a Service is its namespace's own name, meant to be called).
    pub service: Vec<String>,
}

impl ExportDefaults {
    /// The flag's value for every kind, each replaced by the mesh config's where it sets one.
    fn of(settings: &CaptureSettings, mesh: Option<&crate::config::mesh::MeshConfig>) -> Self {
        let pick = |from_mesh: Option<&Vec<String>>| {
            from_mesh
                .filter(|v| !v.is_empty())
                .cloned()
                .unwrap_or_else(|| settings.default_export_to.clone())
        };
        Self {
            virtual_service: pick(mesh.map(|m| &m.default_virtual_service_export_to)),
            destination_rule: pick(mesh.map(|m| &m.default_destination_rule_export_to)),
            service_entry: pick(mesh.map(|m| &m.default_service_export_to)),
            service: mesh
                .map(|m| m.default_service_export_to.clone())
                .unwrap_or_default(),
        }
    }
}

/// Checks an `exportTo` list as Istio's validation does: `*` alone, `.`, `~` (alone) or
/// namespace names.
pub fn check_export_to(list: &[String]) -> Result<(), String> {
    for e in list {
        let name_ok = !e.is_empty()
            && e.len() <= 63
            && e.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !e.starts_with('-')
            && !e.ends_with('-');
        if !(name_ok || e == "*" || e == "." || e == "~") {
            return Err(format!(
                "exportTo {e:?} is neither \"*\", \".\", \"~\" nor a namespace name"
            ));
        }
        if (e == "*" || e == "~") && list.len() > 1 {
            return Err(format!("exportTo {e:?} must be the only entry"));
        }
    }
    Ok(())
}

fn ser_fail_mode<S: serde::Serializer>(m: &FailMode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(fail_mode_name(*m))
}

pub fn fail_mode_name(m: FailMode) -> &'static str {
    match m {
        FailMode::Open => "open",
        FailMode::Closed => "closed",
    }
}

/// A pod the daemon must capture.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CapturedPod {
    pub workload: Arc<WorkloadInfo>,
    #[serde(serialize_with = "ser_fail_mode")]
    pub fail_mode: FailMode,
    pub origin: Origin,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NamespaceState {
    pub captured: bool,
    #[serde(serialize_with = "ser_fail_mode")]
    pub fail_mode: FailMode,
    /// `nodeproxy.io/access-log` (default on).
    pub access_log: bool,
    /// `nodeproxy.io/trace-sampling`: percentage of new traces sampled for this
    /// namespace's pods (None: the node's setting).
    pub trace_sampling: Option<f64>,
    /// `istio.io/dataplane-mode: ambient`: ztunnel's pods, which speak HBONE too.
    pub ambient: bool,
}

/// The compiled configuration.
#[derive(Debug, Default, serde::Serialize)]
pub struct Snapshot {
    pub generation: u64,
    pub registry: crate::state::registry::Registry,
    pub routes: crate::state::routes::RouteTable,
    /// Warnings and notes of the compile that produced this snapshot.
    pub findings: Vec<String>,
    /// The same, with their places (`validate` prints them).
    #[serde(skip)]
    pub diagnostics: Vec<ConfigError>,
    pub namespaces: BTreeMap<String, NamespaceState>,
    /// Captured pods on this node, by uid.
    pub pods: BTreeMap<String, CapturedPod>,
    /// Pods seen but not captured, with the reason (for /config_dump).
    pub not_captured: BTreeMap<String, String>,
    /// Workload labels of every pod with an IP: the destination_* labels of mesh traffic.
    #[serde(skip)]
    pub peers: HashMap<std::net::IpAddr, Arc<workload::PeerLabels>>,
    /// Pod addresses that speak HBONE (the mesh), with the identity each must prove.
    pub mesh: HashMap<std::net::IpAddr, Arc<MeshPeer>>,
    /// Tracing settings of Istio's mesh config (ConfigMap istio-system/istio), if given.
    pub mesh_tracing: Option<crate::config::mesh::MeshTracing>,
    /// The `exportTo` of objects that set none.
    pub export_defaults: ExportDefaults,
    /// What one object tried to take from another and was refused or outranked (each is
    /// also a finding at its line).
    pub conflicts: Vec<crate::state::registry::Conflict>,
    /// Which inbound connections may arrive without mutual TLS.
    pub peer_authentication: security::PeerAuthentication,
    pub authorization: authz::Authorization,
    pub request_authn: jwt::RequestAuthn,
}

fn parse_fail_mode(v: &str) -> Option<FailMode> {
    match v {
        "open" => Some(FailMode::Open),
        "closed" => Some(FailMode::Closed),
        _ => None,
    }
}

/// Compiles objects into a snapshot, or every problem found (then nothing changes).
pub fn compile(
    objects: &[Located<Object>],
    settings: &CaptureSettings,
    generation: u64,
) -> Result<Snapshot, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut snap = Snapshot {
        generation,
        ..Default::default()
    };
    let latest;
    let objects = match latest_definitions(objects, &mut errors) {
        Some(kept) => {
            snap.conflicts.extend(std::iter::repeat_n(
                crate::state::registry::Conflict::RedefinedObject,
                objects.len() - kept.len(),
            ));
            latest = kept;
            &latest[..]
        }
        None => objects,
    };
    let err = |o: &Located<Object>, message: String| o.error(0, message);
    for o in objects {
        let stamp = o
            .value
            .metadata()
            .and_then(|m| m.creation_timestamp.as_deref());
        if let Some(t) = stamp.filter(|t| t.parse::<jiff::Timestamp>().is_err()) {
            errors.push(err(
                o,
                format!("metadata.creationTimestamp {t:?} is not an RFC 3339 time"),
            ));
        }
    }
    for o in objects {
        if let Object::Namespace(ns) = &o.value {
            let captured =
                ns.metadata.labels.get(&settings.label_key) == Some(&settings.label_value);
            let fail_mode = match ns.metadata.annotations.get(FAIL_MODE_ANNOTATION) {
                None => settings.default_fail_mode,
                Some(v) => match parse_fail_mode(v) {
                    Some(m) => m,
                    None => {
                        errors.push(err(
                            o,
                            format!("annotation {FAIL_MODE_ANNOTATION}: {v:?} is neither \"open\" nor \"closed\""),
                        ));
                        settings.default_fail_mode
                    }
                },
            };
            let access_log = match ns
                .metadata
                .annotations
                .get(ACCESS_LOG_ANNOTATION)
                .map(String::as_str)
            {
                None | Some("true") | Some("on") => true,
                Some("false") | Some("off") => false,
                Some(v) => {
                    errors.push(err(
                        o,
                        format!("annotation {ACCESS_LOG_ANNOTATION}: {v:?} is neither \"true\" nor \"false\""),
                    ));
                    true
                }
            };
            let trace_sampling = match ns.metadata.annotations.get(TRACE_SAMPLING_ANNOTATION) {
                None => None,
                Some(v) => match crate::spans::parse_sampling(v) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        errors.push(err(
                            o,
                            format!("annotation {TRACE_SAMPLING_ANNOTATION}: {e}"),
                        ));
                        None
                    }
                },
            };
            snap.namespaces.insert(
                ns.metadata.name.clone(),
                NamespaceState {
                    captured,
                    fail_mode,
                    access_log,
                    trace_sampling,
                    ambient: ns.metadata.labels.get(AMBIENT_LABEL).map(String::as_str)
                        == Some("ambient"),
                },
            );
        }
    }
    let mut mesh_config = None;
    for o in objects {
        if let Object::MeshConfig(mesh) = &o.value {
            match mesh.tracing() {
                Ok(t) => snap.mesh_tracing = Some(t),
                Err(e) => errors.push(err(o, e)),
            }
            for list in [
                &mesh.default_virtual_service_export_to,
                &mesh.default_destination_rule_export_to,
                &mesh.default_service_export_to,
            ] {
                if let Err(e) = check_export_to(list) {
                    errors.push(err(o, format!("mesh config: {e}")));
                }
            }
            mesh_config = Some(mesh);
        }
    }
    snap.export_defaults = ExportDefaults::of(settings, mesh_config);
    for o in objects {
        let Object::Pod(pod) = &o.value else { continue };
        if let Some(ip) = pod
            .status
            .pod_ip
            .as_deref()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
        {
            snap.peers
                .insert(ip, workload::PeerLabels::of(&WorkloadInfo::from_pod(pod)));
        }
    }
    let mut uids: BTreeMap<String, ObjectRef> = BTreeMap::new();
    for o in objects {
        let Object::Pod(pod) = &o.value else { continue };
        let key = o.object_ref.to_string();
        let Some(uid) = pod.metadata.uid.clone().filter(|u| !u.is_empty()) else {
            errors.push(err(
                o,
                "metadata.uid is required to find the pod's cgroup".into(),
            ));
            continue;
        };
        if let Some(other) = uids.insert(uid.clone(), o.object_ref.clone()) {
            errors.push(err(
                o,
                format!("metadata.uid {uid} is also used by {other}"),
            ));
            continue;
        }
        let namespace = snap.namespaces.get(&o.object_ref.namespace);
        let reason = not_captured_because(pod, namespace);
        // Wherever it runs, a captured pod (or a pod of ztunnel's, in an ambient namespace)
        // speaks HBONE on its port 15008: connections to it are tunnelled, mutual TLS.
        let ambient = namespace.is_some_and(|ns| ns.ambient)
            && pod.metadata.labels.get(AMBIENT_LABEL).map(String::as_str) != Some("none");
        if let Some(ip) = pod_ip(pod).filter(|_| reason.is_none() || ambient) {
            let node = pod.spec.node_name.as_deref();
            snap.mesh.insert(
                ip,
                Arc::new(MeshPeer {
                    identity: WorkloadInfo::from_pod(pod).identity(&settings.trust_domain),
                    uid: uid.clone(),
                    this_node: node.is_none_or(|n| n == settings.node_name),
                    ztunnel: reason.is_some(),
                }),
            );
        }
        let reason = match pod.spec.node_name.as_deref() {
            Some(node) if node != settings.node_name => Some(format!("on node {node}")),
            _ => reason,
        };
        if let Some(reason) = reason {
            snap.not_captured.insert(key, reason);
            continue;
        }
        let fail_mode = snap.namespaces[&o.object_ref.namespace].fail_mode;
        snap.pods.insert(
            uid,
            CapturedPod {
                workload: Arc::new(WorkloadInfo::from_pod(pod)),
                fail_mode,
                origin: o.origin.clone(),
            },
        );
    }
    snap.registry = crate::state::registry::build(objects, &snap.export_defaults, &mut errors);
    snap.routes =
        crate::state::routes::build(objects, &snap.registry, &snap.export_defaults, &mut errors);
    snap.peer_authentication =
        security::build(objects, crate::state::routes::ROOT_NAMESPACE, &mut errors);
    snap.authorization = authz::build(objects, crate::state::routes::ROOT_NAMESPACE, &mut errors);
    snap.request_authn = jwt::build(objects, crate::state::routes::ROOT_NAMESPACE, &mut errors);
    snap.conflicts
        .extend(snap.registry.conflicts.iter().copied());
    snap.conflicts.extend(snap.routes.conflicts.iter().copied());
    sort_findings(&mut errors);
    if errors.iter().any(ConfigError::is_error) {
        return Err(errors);
    }
    snap.findings = errors.iter().map(ToString::to_string).collect();
    snap.diagnostics = errors;
    Ok(snap)
}

/// The objects without those a later definition of the same kind, namespace and name
/// replaces — what `kubectl apply` of the files in order leaves — each replacement a warning
/// naming both places. `None` when nothing is defined twice.
fn latest_definitions(
    objects: &[Located<Object>],
    findings: &mut Vec<ConfigError>,
) -> Option<Vec<Located<Object>>> {
    let mut last: BTreeMap<&ObjectRef, usize> = BTreeMap::new();
    for (i, o) in objects.iter().enumerate() {
        if let Some(earlier) = last.insert(&o.object_ref, i) {
            let first: &Origin = &objects[earlier].origin;
            findings.push(o.finding(
                crate::config::Severity::Warning,
                0,
                format!(
                    "replaces the definition at {}:{} (the later one is used, as `kubectl apply` of these files in order would leave it)",
                    first.path.display(),
                    first.line
                ),
            ));
        }
    }
    if last.len() == objects.len() {
        return None;
    }
    Some(
        objects
            .iter()
            .enumerate()
            .filter(|(i, o)| last.get(&o.object_ref) == Some(i))
            .map(|(_, o)| o.clone())
            .collect(),
    )
}

/// What [`compile_valid`] made: the snapshot, the errors of what it left out or restored,
/// the objects whose previous version it restored, and the objects it compiled.
pub struct Compiled {
    pub snapshot: Snapshot,
    pub rejected: Vec<ConfigError>,
    pub restored: std::collections::BTreeSet<ObjectRef>,
    pub objects: Vec<Located<Object>>,
}

pub const ISTIO_SIDECAR_CONTAINER: &str = "istio-proxy";
pub const ISTIO_SIDECAR_ANNOTATION: &str = "sidecar.istio.io/status";

/// Istio's namespace (and pod) label for ambient capture by ztunnel.
pub const AMBIENT_LABEL: &str = "istio.io/dataplane-mode";

/// A pod address that speaks HBONE on port 15008: a pod this proxy captures (on any node)
/// or one of ztunnel's (an ambient namespace).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MeshPeer {
    /// Who its certificate must name.
    pub identity: crate::identity::Identity,
    pub uid: String,
    /// On this node: it speaks HBONE only once this daemon enrolled it.
    pub this_node: bool,
    /// Captured by ztunnel, not by a proxy-daemon.
    pub ztunnel: bool,
}

fn pod_ip(pod: &crate::config::k8s::Pod) -> Option<std::net::IpAddr> {
    pod.status.pod_ip.as_deref()?.parse().ok()
}

/// Why a pod of a namespace in `namespace` state is not captured (wherever it runs).
fn not_captured_because(
    pod: &crate::config::k8s::Pod,
    namespace: Option<&NamespaceState>,
) -> Option<String> {
    match namespace {
        None => return Some("namespace not defined".to_string()),
        Some(ns) if !ns.captured => return Some("namespace not captured".to_string()),
        Some(_) => {}
    }
    if pod
        .metadata
        .labels
        .get(CAPTURE_LABEL_KEY)
        .map(String::as_str)
        == Some("disabled")
    {
        return Some(format!("pod opted out ({CAPTURE_LABEL_KEY}=disabled)"));
    }
    // Never capture the node's own network namespace.
    if pod.spec.host_network {
        return Some("host network".to_string());
    }
    // During a migration from sidecars, a pod that still has one is left to it, so
    // nothing is proxied twice.
    if has_istio_sidecar(pod) {
        return Some(format!(
            "runs an Istio sidecar ({ISTIO_SIDECAR_CONTAINER} container or {ISTIO_SIDECAR_ANNOTATION} annotation)"
        ));
    }
    if matches!(
        pod.status.phase.as_deref(),
        Some("Succeeded") | Some("Failed")
    ) {
        return Some("pod finished".to_string());
    }
    None
}

fn has_istio_sidecar(pod: &crate::config::k8s::Pod) -> bool {
    pod.metadata
        .annotations
        .contains_key(ISTIO_SIDECAR_ANNOTATION)
        || pod
            .spec
            .containers
            .iter()
            .chain(&pod.spec.init_containers)
            .any(|c| c.name.as_deref() == Some(ISTIO_SIDECAR_CONTAINER))
}

/// Compiles what is valid: objects named by an error are dropped (and returned as
/// rejected, with their errors) and the rest compiled again, so one bad object never takes
/// the others down. Used by the cluster source, where objects arrive one by one and there
/// is no "fix the file and save again". Fails only on an error that names no object.
///
/// An object named by an error that has a version in `last_good` (the one the previous
/// snapshot used) gets that version back once — a bad edit never replaces a good rule;
/// objects without one, or whose old version fails too, are dropped.
pub fn compile_valid(
    mut objects: Vec<Located<Object>>,
    settings: &CaptureSettings,
    generation: u64,
    last_good: &HashMap<ObjectRef, Located<Object>>,
) -> Result<Compiled, Vec<ConfigError>> {
    let mut rejected = Vec::new();
    let mut restored: std::collections::BTreeSet<ObjectRef> = Default::default();
    // Each pass drops or restores at least one object; cross-references settle in a few.
    for _ in 0..16 {
        match compile(&objects, settings, generation) {
            Ok(snapshot) => {
                return Ok(Compiled {
                    snapshot,
                    rejected,
                    restored,
                    objects,
                })
            }
            Err(errors) => {
                let (bad, rest): (Vec<_>, Vec<_>) =
                    errors.into_iter().partition(ConfigError::is_error);
                let names: std::collections::BTreeSet<ObjectRef> =
                    bad.iter().filter_map(|e| e.object.clone()).collect();
                if names.is_empty() || bad.iter().any(|e| e.object.is_none()) {
                    let mut all = bad;
                    all.extend(rest);
                    return Err(all);
                }
                let mut next = Vec::with_capacity(objects.len());
                for o in objects.drain(..) {
                    if !names.contains(&o.object_ref) {
                        next.push(o);
                    } else if restored.contains(&o.object_ref) {
                        // Its previous version fails now too: dropped.
                    } else if let Some(previous) = last_good.get(&o.object_ref) {
                        restored.insert(o.object_ref.clone());
                        next.push(previous.clone());
                    }
                }
                objects = next;
                rejected.extend(bad);
            }
        }
    }
    Err(rejected)
}

/// File order, then line, so messages read top to bottom.
pub fn sort_findings(findings: &mut [ConfigError]) {
    findings.sort_by(|a, b| (&a.path, a.line, a.severity).cmp(&(&b.path, b.line, b.severity)));
}

/// The published snapshot plus change notification. Readers load; one writer stores.
pub struct Published {
    current: ArcSwap<Snapshot>,
    changed: watch::Sender<u64>,
    generation: AtomicU64,
}

impl Published {
    pub fn new() -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            changed: watch::channel(0).0,
            generation: AtomicU64::new(0),
        }
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn store(&self, snap: Snapshot) {
        let generation = snap.generation;
        self.current.store(Arc::new(snap));
        self.changed.send_replace(generation);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

impl Default for Published {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tenancy_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::local;

    fn objects(yaml: &str) -> Vec<Located<Object>> {
        local::split_documents(std::path::Path::new("t.yaml"), yaml)
            .iter()
            .filter_map(|d| local::parse_document(d, "default").unwrap())
            .collect()
    }

    fn settings() -> CaptureSettings {
        CaptureSettings {
            label_key: CAPTURE_LABEL_KEY.into(),
            label_value: "enabled".into(),
            node_name: "n1".into(),
            default_fail_mode: FailMode::Open,
            default_export_to: Vec::new(),
            trust_domain: "cluster.local".into(),
        }
    }

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {nodeproxy.io/capture: enabled}\n";

    #[test]
    fn compile_valid_skips_only_the_bad_object() {
        let yaml = format!(
            "{NS}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bad, namespace: shop}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews}}\n      weight: 50\n    - destination: {{host: ratings}}\n      weight: 40\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: good, namespace: shop}}\nspec:\n  hosts: [details]\n  http:\n  - route:\n    - destination: {{host: details}}\n"
        );
        let objs = objects(&yaml);
        assert!(
            compile(&objs, &settings(), 1).is_err(),
            "a file with the bad object is rejected whole"
        );
        let Compiled {
            snapshot: snap,
            rejected,
            ..
        } = compile_valid(objs, &settings(), 1, &HashMap::new()).expect("the rest compiles");
        assert!(!rejected.is_empty());
        assert!(rejected
            .iter()
            .all(|e| e.object.as_ref().unwrap().name == "bad"));
        let dump = serde_json::to_string(&snap.routes).unwrap();
        assert!(dump.contains("details"), "the good rule is in the snapshot");
        assert!(snap.namespaces["shop"].captured);
    }

    #[test]
    fn a_bad_edit_gives_way_to_the_last_good_version() {
        let vs = |weights: (u32, u32)| {
            format!("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: shop}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews}}\n      weight: {}\n    - destination: {{host: ratings}}\n      weight: {}\n", weights.0, weights.1)
        };
        let good = objects(&format!("{NS}{}", vs((30, 70))));
        let last_good: HashMap<ObjectRef, Located<Object>> = good
            .iter()
            .map(|o| (o.object_ref.clone(), o.clone()))
            .collect();
        let edited = objects(&format!("{NS}{}", vs((30, 60))));
        let out = compile_valid(edited, &settings(), 2, &last_good).expect("compiles");
        assert_eq!(out.restored.len(), 1, "the previous version stands in");
        assert!(
            out.rejected.iter().any(|e| e.message.contains("weight")),
            "and the edit is reported"
        );
        let routes = serde_json::to_string(&out.snapshot.routes).unwrap();
        assert!(routes.contains("70"), "the old weights route: {routes}");
        // Without a previous version the bad object is simply left out.
        let out = compile_valid(
            objects(&format!("{NS}{}", vs((30, 60)))),
            &settings(),
            3,
            &HashMap::new(),
        )
        .expect("compiles");
        assert!(out.restored.is_empty());
        assert!(!serde_json::to_string(&out.snapshot.routes)
            .unwrap()
            .contains("ratings"));
    }

    #[test]
    fn service_entry_addresses_find_host_prefixes_exactly_and_the_longest_range() {
        let se = |name: &str, addr: &str| {
            format!("---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  hosts: [{name}.ext]\n  addresses: [{addr}]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: NONE\n")
        };
        // The wide range first: the order written must not matter.
        let yaml = format!(
            "{NS}{}{}{}",
            se("wide", "10.0.0.0/8"),
            se("narrow", "10.1.0.0/16"),
            se("one", "10.1.2.3/32")
        );
        let snap = compile(&objects(&yaml), &settings(), 1).expect("compiles");
        let host = |ip: &str, port: u16| {
            snap.registry
                .by_addr(std::net::SocketAddr::new(ip.parse().unwrap(), port), "shop")
                .map(|s| s.hostname.clone())
        };
        assert_eq!(host("10.1.2.3", 80).as_deref(), Some("one.ext"));
        assert_eq!(host("10.1.2.4", 80).as_deref(), Some("narrow.ext"));
        assert_eq!(host("10.2.0.1", 80).as_deref(), Some("wide.ext"));
        assert_eq!(host("10.1.2.3", 81), None);
        assert_eq!(host("11.0.0.1", 80), None);
    }

    #[test]
    fn a_malformed_destination_subnet_is_an_error_of_its_virtual_service() {
        let yaml = format!(
            "{NS}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: db, namespace: shop}}\nspec:\n  hosts: [db]\n  tcp:\n  - match: [{{destinationSubnets: [10.0.0.0/40]}}]\n    route: [{{destination: {{host: db}}}}]\n"
        );
        let errors = compile(&objects(&yaml), &settings(), 1)
            .err()
            .unwrap_or_default();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|e| e.contains("VirtualService/shop/db") && e.contains("10.0.0.0/40")),
            "{text:?}"
        );
    }

    #[test]
    fn pods_with_an_istio_sidecar_or_host_network_are_not_captured() {
        let pod = |name: &str, extra: &str| {
            format!("---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  uid: uid-{name}\n{extra}")
        };
        let yaml = format!(
            "{NS}{}{}{}{}",
            pod("plain", "spec:\n  containers: [{name: app}]\n"),
            pod(
                "sidecar",
                "spec:\n  containers: [{name: app}, {name: istio-proxy}]\n"
            ),
            pod(
                "annotated",
                "  annotations: {sidecar.istio.io/status: '{}'}\nspec:\n  containers: [{name: app}]\n"
            ),
            pod("host", "spec:\n  hostNetwork: true\n  containers: [{name: app}]\n"),
        );
        let snap = compile(&objects(&yaml), &settings(), 1).unwrap();
        let captured: Vec<_> = snap.pods.keys().cloned().collect();
        assert_eq!(captured, vec!["uid-plain"]);
        assert!(snap.not_captured["Pod/shop/sidecar"].contains("Istio sidecar"));
        assert!(snap.not_captured["Pod/shop/annotated"].contains("Istio sidecar"));
        assert_eq!(snap.not_captured["Pod/shop/host"], "host network");
    }
}
