//! What the stand-in serves: the resource types, the object store with its history of
//! changes (one global resourceVersion counter, as etcd's revision), and selectors.
use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::util;

pub(crate) const ISTIO_GROUP: &str = "networking.istio.io";
/// The Gateway API's group (its CRDs installed on their own, as clusters do).
pub(crate) const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// Istio's security kinds, installed with the networking CRDs (as Istio's base chart
/// does), served at v1 and v1beta1.
pub(crate) const SECURITY_GROUP: &str = "security.istio.io";
const SECURITY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// One resource type, as discovery describes it.
pub(crate) struct ResDef {
    pub group: &'static str,
    /// The served version; empty for Istio kinds, whose versions are installed per test.
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Field selector labels beyond metadata.name and metadata.namespace.
    pub fields: &'static [&'static str],
    pub storage_hash: &'static str,
}

impl ResDef {
    /// A custom resource (Istio's or the Gateway API's): served only once its CRDs are.
    pub(crate) fn is_istio(&self) -> bool {
        self.group == ISTIO_GROUP || self.group == SECURITY_GROUP || self.group == GATEWAY_GROUP
    }

    pub(crate) fn group_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    /// Whether metadata.generation is kept (CRs and types whose strategy sets it).
    fn has_generation(&self) -> bool {
        self.is_istio() || self.plural == "endpointslices"
    }

    /// `pods` or `virtualservices.networking.istio.io`, as error messages name resources.
    pub(crate) fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const POD_FIELDS: &[&str] = &[
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.podIPs",
    "status.nominatedNodeName",
];
const ISTIO_CATEGORIES: &[&str] = &["istio-io", "networking-istio-io"];
const SECURITY_CATEGORIES: &[&str] = &["istio-io", "security-istio-io"];

pub(crate) static RESOURCES: &[ResDef] = &[
    ResDef {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        categories: &[],
        fields: &["status.phase"],
        storage_hash: "Q3oi5N2YM8M=",
    },
    ResDef {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        categories: &["all"],
        fields: POD_FIELDS,
        storage_hash: "xPOwRZ+Yhw8=",
    },
    ResDef {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        categories: &["all"],
        fields: &[],
        storage_hash: "0/CO1lhkEBI=",
    },
    ResDef {
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short_names: &[],
        categories: &[],
        fields: &["type"],
        storage_hash: "S6u1pOWzb84=",
    },
    ResDef {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        categories: &[],
        fields: &[],
        storage_hash: "qFsyl6wFWjQ=",
    },
    ResDef {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        categories: &[],
        fields: &[],
        storage_hash: "Nx3SIv6I0mE=",
    },
    ResDef {
        group: ISTIO_GROUP,
        version: "",
        plural: "virtualservices",
        singular: "virtualservice",
        kind: "VirtualService",
        namespaced: true,
        short_names: &["vs"],
        categories: ISTIO_CATEGORIES,
        fields: &[],
        storage_hash: "1SoS7E7nXE8=",
    },
    ResDef {
        group: ISTIO_GROUP,
        version: "",
        plural: "destinationrules",
        singular: "destinationrule",
        kind: "DestinationRule",
        namespaced: true,
        short_names: &["dr"],
        categories: ISTIO_CATEGORIES,
        fields: &[],
        storage_hash: "5ZLEJbkwBMk=",
    },
    ResDef {
        group: ISTIO_GROUP,
        version: "",
        plural: "serviceentries",
        singular: "serviceentry",
        kind: "ServiceEntry",
        namespaced: true,
        short_names: &["se"],
        categories: ISTIO_CATEGORIES,
        fields: &[],
        storage_hash: "1R6F3P1BYS4=",
    },
    ResDef {
        group: ISTIO_GROUP,
        version: "",
        plural: "sidecars",
        singular: "sidecar",
        kind: "Sidecar",
        namespaced: true,
        short_names: &[],
        categories: ISTIO_CATEGORIES,
        fields: &[],
        storage_hash: "a6hTd8CPBbE=",
    },
    ResDef {
        group: ISTIO_GROUP,
        version: "",
        plural: "envoyfilters",
        singular: "envoyfilter",
        kind: "EnvoyFilter",
        namespaced: true,
        short_names: &[],
        categories: ISTIO_CATEGORIES,
        fields: &[],
        storage_hash: "r5hnvE1TaYQ=",
    },
    ResDef {
        group: ISTIO_GROUP,
        version: "",
        plural: "gateways",
        singular: "gateway",
        kind: "Gateway",
        namespaced: true,
        short_names: &["gw"],
        categories: ISTIO_CATEGORIES,
        fields: &[],
        storage_hash: "8zTrVTzPzTk=",
    },
    ResDef {
        group: SECURITY_GROUP,
        version: "",
        plural: "peerauthentications",
        singular: "peerauthentication",
        kind: "PeerAuthentication",
        namespaced: true,
        short_names: &["pa"],
        categories: SECURITY_CATEGORIES,
        fields: &[],
        storage_hash: "S5uSRBqDYS0=",
    },
    ResDef {
        group: SECURITY_GROUP,
        version: "",
        plural: "authorizationpolicies",
        singular: "authorizationpolicy",
        kind: "AuthorizationPolicy",
        namespaced: true,
        short_names: &["ap"],
        categories: SECURITY_CATEGORIES,
        fields: &[],
        storage_hash: "LxJC2FTK2Vs=",
    },
    ResDef {
        group: SECURITY_GROUP,
        version: "",
        plural: "requestauthentications",
        singular: "requestauthentication",
        kind: "RequestAuthentication",
        namespaced: true,
        short_names: &["ra"],
        categories: SECURITY_CATEGORIES,
        fields: &[],
        storage_hash: "1VwmJ1ZgJfA=",
    },
    ResDef {
        group: GATEWAY_GROUP,
        version: "",
        plural: "httproutes",
        singular: "httproute",
        kind: "HTTPRoute",
        namespaced: true,
        short_names: &[],
        categories: &["gateway-api"],
        fields: &[],
        storage_hash: "Ok0n6sUDmFY=",
    },
    ResDef {
        group: GATEWAY_GROUP,
        version: "",
        plural: "grpcroutes",
        singular: "grpcroute",
        kind: "GRPCRoute",
        namespaced: true,
        short_names: &[],
        categories: &["gateway-api"],
        fields: &[],
        storage_hash: "VXqZ3Sx8v2E=",
    },
];

pub(crate) fn def(idx: usize) -> &'static ResDef {
    &RESOURCES[idx]
}

/// The resource type of `apiVersion` + `kind` (any version for Istio kinds).
pub(crate) fn def_by_kind(api_version: &str, kind: &str) -> Option<usize> {
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    RESOURCES
        .iter()
        .position(|d| d.group == group && d.kind == kind)
}

pub(crate) fn def_by_plural(group: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|d| d.group == group && d.plural == plural)
}

/// Kube-aware version order (GA > beta > alpha, then by number), highest first.
pub(crate) fn version_priority(v: &str) -> (u8, u32, u32) {
    let Some(rest) = v.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let major: u32 = digits.parse().unwrap_or(0);
    let tail = &rest[digits.len()..];
    let (stage, num) = if tail.is_empty() {
        (3, 0)
    } else if let Some(n) = tail.strip_prefix("beta") {
        (2, n.parse().unwrap_or(0))
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (1, n.parse().unwrap_or(0))
    } else {
        (0, 0)
    };
    (stage, major, num)
}

pub(crate) fn sort_versions(vs: &mut [String]) {
    vs.sort_by(|a, b| {
        let (sa, ma, na) = version_priority(a);
        let (sb, mb, nb) = version_priority(b);
        // GA first, then higher major, then beta before alpha, then higher number.
        (sb == 3)
            .cmp(&(sa == 3))
            .then(mb.cmp(&ma))
            .then(sb.cmp(&sa))
            .then(nb.cmp(&na))
            .then(a.cmp(b))
    });
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change: the object after it (for DELETED, its last state at the deletion's
/// resourceVersion) and the object before it.
pub(crate) struct Event {
    pub rv: u64,
    pub etype: EventType,
    pub def: usize,
    pub namespace: String,
    pub name: String,
    pub object: Value,
    pub prev: Option<Value>,
}

pub(crate) type Key = (usize, String, String);

#[derive(Default)]
pub(crate) struct Store {
    pub rv: u64,
    /// Requests for resourceVersions older than this are answered 410 Expired. The history
    /// itself is kept whole, so watches already open never miss an event.
    pub compacted: u64,
    pub objects: BTreeMap<Key, Value>,
    pub history: Vec<Event>,
    pub istio_versions: Vec<String>,
    /// Whether the Gateway API's route CRDs are installed.
    pub gateway_installed: bool,
}

impl Store {
    /// The versions `def` is served at now (sorted by priority).
    pub(crate) fn versions(&self, def: &ResDef) -> Vec<String> {
        if !def.is_istio() {
            return vec![def.version.to_string()];
        }
        if def.group == GATEWAY_GROUP {
            return match (self.gateway_installed, def.plural) {
                (false, _) => Vec::new(),
                (true, "httproutes") => vec!["v1".into(), "v1beta1".into()],
                (true, _) => vec!["v1".into()],
            };
        }
        if def.group == SECURITY_GROUP {
            if self.istio_versions.is_empty() {
                return Vec::new();
            }
            return SECURITY_VERSIONS.iter().map(|v| v.to_string()).collect();
        }
        if def.plural == "envoyfilters" {
            // EnvoyFilter's CRD has only v1alpha3.
            return self
                .istio_versions
                .iter()
                .filter(|v| *v == "v1alpha3")
                .cloned()
                .collect();
        }
        self.istio_versions.clone()
    }

    pub(crate) fn serves(&self, idx: usize, version: &str) -> bool {
        self.versions(def(idx)).iter().any(|v| v == version)
    }

    /// Events after `rv`, in order.
    pub(crate) fn events_after(&self, rv: u64) -> &[Event] {
        let start = self.history.partition_point(|e| e.rv <= rv);
        &self.history[start..]
    }

    /// Objects of `idx` as they were at `rv` (replayed from the history).
    pub(crate) fn state_at(&self, idx: usize, rv: u64) -> BTreeMap<(String, String), Value> {
        let mut out = BTreeMap::new();
        for e in &self.history {
            if e.rv > rv {
                break;
            }
            if e.def != idx {
                continue;
            }
            let key = (e.namespace.clone(), e.name.clone());
            match e.etype {
                EventType::Deleted => {
                    out.remove(&key);
                }
                _ => {
                    out.insert(key, e.object.clone());
                }
            }
        }
        out
    }

    fn record(&mut self, etype: EventType, key: &Key, object: Value, prev: Option<Value>) {
        self.history.push(Event {
            rv: self.rv,
            etype,
            def: key.0,
            namespace: key.1.clone(),
            name: key.2.clone(),
            object,
            prev,
        });
    }

    /// Creates or replaces an object, filling what the API server fills. A different
    /// metadata.uid than the stored one means a new object (DELETED, then ADDED).
    pub(crate) fn put(&mut self, idx: usize, mut obj: Value) -> Value {
        let d = def(idx);
        let name = obj["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| panic!("{} without metadata.name: {obj}", d.kind))
            .to_string();
        let namespace = if d.namespaced {
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_string();
            obj["metadata"]["namespace"] = ns.clone().into();
            ns
        } else {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            String::new()
        };
        let key = (idx, namespace, name);
        let old = self.objects.get(&key).cloned();
        let given_uid = obj["metadata"]["uid"].as_str().map(str::to_string);
        let old = match old {
            Some(o)
                if given_uid.is_some() && o["metadata"]["uid"].as_str() != given_uid.as_deref() =>
            {
                self.remove_key(&key);
                None
            }
            o => o,
        };
        self.rv += 1;
        let now = util::now_rfc3339();
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.insert("resourceVersion".into(), self.rv.to_string().into());
        }
        match &old {
            Some(o) => {
                obj["metadata"]["uid"] = o["metadata"]["uid"].clone();
                obj["metadata"]["creationTimestamp"] = o["metadata"]["creationTimestamp"].clone();
                if d.has_generation() {
                    let g = o["metadata"]["generation"].as_i64().unwrap_or(1);
                    let changed = strip_meta_status(o) != strip_meta_status(&obj);
                    obj["metadata"]["generation"] = (if changed { g + 1 } else { g }).into();
                }
            }
            None => {
                if given_uid.is_none() {
                    obj["metadata"]["uid"] = util::random_uid().into();
                }
                if obj["metadata"]["creationTimestamp"].as_str().is_none() {
                    obj["metadata"]["creationTimestamp"] = now.clone().into();
                }
                if d.has_generation() {
                    obj["metadata"]["generation"] = 1.into();
                }
            }
        }
        if d.is_istio() {
            // Stored once; every served version shows it (apiVersion rewritten on the way out).
            let v = obj["apiVersion"]
                .as_str()
                .and_then(|a| a.rsplit_once('/'))
                .map(|(_, v)| v.to_string())
                .unwrap_or_default();
            obj["apiVersion"] = d.group_version(&v).into();
        }
        if obj["metadata"].get("managedFields").is_none() {
            let mf = super::objects::managed_fields(d, &obj, &now);
            if let Some(anno) = mf.1 {
                obj["metadata"]["annotations"]
                    ["kubectl.kubernetes.io/last-applied-configuration"] = anno.into();
                // The annotation is itself a managed field; recompute with it present.
                let mf = super::objects::managed_fields(d, &obj, &now);
                obj["metadata"]["managedFields"] = mf.0;
            } else {
                obj["metadata"]["managedFields"] = mf.0;
            }
        }
        self.objects.insert(key.clone(), obj.clone());
        let etype = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(etype, &key, obj.clone(), old);
        obj
    }

    /// Changes a stored object in place through `f` (a MODIFIED event, new resourceVersion).
    pub(crate) fn modify(&mut self, key: &Key, f: impl FnOnce(&mut Value)) -> Option<Value> {
        let old = self.objects.get(key)?.clone();
        let mut obj = old.clone();
        f(&mut obj);
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.objects.insert(key.clone(), obj.clone());
        self.record(EventType::Modified, key, obj.clone(), Some(old));
        Some(obj)
    }

    pub(crate) fn remove_key(&mut self, key: &Key) -> Option<Value> {
        let old = self.objects.remove(key)?;
        self.rv += 1;
        let mut gone = old.clone();
        gone["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.record(EventType::Deleted, key, gone.clone(), Some(old));
        Some(gone)
    }
}

fn strip_meta_status(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
    }
    o
}

/// Rewrites an Istio object's apiVersion to the version it is read at.
pub(crate) fn present(d: &ResDef, version: &str, obj: &Value) -> Value {
    let mut o = obj.clone();
    if d.is_istio() {
        o["apiVersion"] = d.group_version(version).into();
    }
    o
}

// ---- selectors ----

#[derive(Debug, Clone)]
pub(crate) enum FieldReq {
    Eq(String, String),
    Ne(String, String),
}

#[derive(Debug, Clone)]
pub(crate) enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
    Gt(String, i64),
    Lt(String, i64),
}

/// The value of a field selector label on an object (fields.Set as the registry builds it).
fn field_value(obj: &Value, field: &str) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    match field {
        "metadata.name" => s(&obj["metadata"]["name"]),
        "metadata.namespace" => s(&obj["metadata"]["namespace"]),
        "spec.nodeName" => s(&obj["spec"]["nodeName"]),
        "spec.restartPolicy" => s(&obj["spec"]["restartPolicy"]),
        "spec.schedulerName" => s(&obj["spec"]["schedulerName"]),
        "spec.serviceAccountName" => s(&obj["spec"]["serviceAccountName"]),
        "spec.hostNetwork" => obj["spec"]["hostNetwork"]
            .as_bool()
            .unwrap_or(false)
            .to_string(),
        "status.phase" => s(&obj["status"]["phase"]),
        "status.podIP" => s(&obj["status"]["podIP"]),
        "status.podIPs" => obj["status"]["podIPs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["ip"].as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        "status.nominatedNodeName" => s(&obj["status"]["nominatedNodeName"]),
        "type" => s(&obj["type"]),
        _ => String::new(),
    }
}

/// Parses a field selector; an unknown field label is a 400 as on the real server.
pub(crate) fn parse_field_selector(sel: &str, d: &ResDef) -> Result<Vec<FieldReq>, String> {
    let mut out = Vec::new();
    for part in sel.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v, ne) = if let Some((k, v)) = part.split_once("!=") {
            (k, v, true)
        } else if let Some((k, v)) = part.split_once("==") {
            (k, v, false)
        } else if let Some((k, v)) = part.split_once('=') {
            (k, v, false)
        } else {
            return Err(format!(
                "invalid selector: '{sel}'; can't understand '{part}'"
            ));
        };
        let k = k.trim();
        if k != "metadata.name" && k != "metadata.namespace" && !d.fields.contains(&k) {
            return Err(format!("field label not supported: {k}"));
        }
        out.push(if ne {
            FieldReq::Ne(k.into(), v.trim().into())
        } else {
            FieldReq::Eq(k.into(), v.trim().into())
        });
    }
    Ok(out)
}

fn valid_label_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 316
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

/// Splits at commas outside parentheses.
fn split_top(sel: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for c in sel.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out
}

/// Parses a label selector (labels.Parse syntax).
pub(crate) fn parse_label_selector(sel: &str) -> Result<Vec<LabelReq>, String> {
    let mut out = Vec::new();
    if sel.trim().is_empty() {
        return Ok(out);
    }
    let bad =
        |part: &str| format!("unable to parse requirement: found '{part}', expected: identifier");
    for part in split_top(sel) {
        let part = part.trim();
        if part.is_empty() {
            return Err(bad(part));
        }
        let set = |rest: &str| -> Option<Vec<String>> {
            let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
            Some(
                inner
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect(),
            )
        };
        let req = if let Some(k) = part.strip_prefix('!') {
            LabelReq::NotExists(k.trim().into())
        } else if let Some((k, rest)) = part.split_once(" notin ") {
            LabelReq::NotIn(k.trim().into(), set(rest).ok_or_else(|| bad(part))?)
        } else if let Some((k, rest)) = part.split_once(" in ") {
            LabelReq::In(k.trim().into(), set(rest).ok_or_else(|| bad(part))?)
        } else if let Some((k, v)) = part.split_once("!=") {
            LabelReq::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once("==") {
            LabelReq::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once('=') {
            LabelReq::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once('>') {
            LabelReq::Gt(k.trim().into(), v.trim().parse().map_err(|_| bad(part))?)
        } else if let Some((k, v)) = part.split_once('<') {
            LabelReq::Lt(k.trim().into(), v.trim().parse().map_err(|_| bad(part))?)
        } else {
            LabelReq::Exists(part.into())
        };
        let key = match &req {
            LabelReq::Eq(k, _)
            | LabelReq::Ne(k, _)
            | LabelReq::In(k, _)
            | LabelReq::NotIn(k, _)
            | LabelReq::Exists(k)
            | LabelReq::NotExists(k)
            | LabelReq::Gt(k, _)
            | LabelReq::Lt(k, _) => k,
        };
        if !valid_label_key(key) {
            return Err(bad(part));
        }
        out.push(req);
    }
    Ok(out)
}

/// What a list or watch asks for: one resource type at one version, maybe one namespace,
/// and selectors.
#[derive(Clone)]
pub(crate) struct Selection {
    pub def: usize,
    pub version: String,
    pub namespace: Option<String>,
    pub fields: Vec<FieldReq>,
    pub labels: Vec<LabelReq>,
}

impl Selection {
    pub(crate) fn has_predicate(&self) -> bool {
        !self.fields.is_empty() || !self.labels.is_empty()
    }

    pub(crate) fn in_scope(&self, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let fields_ok = self.fields.iter().all(|r| match r {
            FieldReq::Eq(k, v) => field_value(obj, k) == *v,
            FieldReq::Ne(k, v) => field_value(obj, k) != *v,
        });
        if !fields_ok {
            return false;
        }
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| !vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::Gt(k, n) => label(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l > *n),
            LabelReq::Lt(k, n) => label(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l < *n),
        })
    }

    /// What a watcher with this selection sees of `e` (the watch cache's rules: an object
    /// that starts matching is ADDED, one that stops matching is DELETED with its previous
    /// content at the event's resourceVersion).
    pub(crate) fn view(&self, e: &Event) -> Option<(EventType, Value)> {
        if e.def != self.def || !self.in_scope(&e.namespace) {
            return None;
        }
        let cur = e.etype != EventType::Deleted && self.matches(&e.object);
        let old = e.prev.as_ref().is_some_and(|p| self.matches(p));
        let d = def(self.def);
        match (cur, old) {
            (true, false) => Some((EventType::Added, present(d, &self.version, &e.object))),
            (true, true) => Some((EventType::Modified, present(d, &self.version, &e.object))),
            (false, true) => {
                let mut o = present(d, &self.version, e.prev.as_ref().unwrap());
                o["metadata"]["resourceVersion"] = e.rv.to_string().into();
                Some((EventType::Deleted, o))
            }
            (false, false) => None,
        }
    }
}

/// A Status object (`metav1.Status`), as every error is answered.
pub(crate) fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    if reason.is_empty() {
        s.as_object_mut().unwrap().remove("reason");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let pod = json!({"metadata": {"name": "a", "namespace": "n", "labels": {"app": "x", "tier": "1"}},
                         "spec": {"nodeName": "node1"}});
        let sel = |f: &str, l: &str| Selection {
            def: 1,
            version: "v1".into(),
            namespace: None,
            fields: parse_field_selector(f, def(1)).unwrap(),
            labels: parse_label_selector(l).unwrap(),
        };
        assert!(sel("spec.nodeName=node1", "").matches(&pod));
        assert!(!sel("spec.nodeName=node2", "").matches(&pod));
        assert!(sel("spec.nodeName!=node2,metadata.name=a", "").matches(&pod));
        assert!(sel("", "app in (x,y),tier").matches(&pod));
        assert!(!sel("", "app notin (x,y)").matches(&pod));
        assert!(sel("", "!missing,app!=z,tier>0").matches(&pod));
        assert!(parse_field_selector("spec.bogus=1", def(1)).is_err());
        assert!(parse_field_selector("spec.nodeName=1", def(2)).is_err());
        let mut vs = vec!["v1alpha3".to_string(), "v1".into(), "v1beta1".into()];
        sort_versions(&mut vs);
        assert_eq!(vs, ["v1", "v1beta1", "v1alpha3"]);
    }
}
