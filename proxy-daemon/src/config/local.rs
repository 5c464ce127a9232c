//! Local source: every `*.yaml`/`*.yml` below a directory, multi-document, each document
//! remembered with its file and starting line so every message can point at it.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::Deserialize;

use super::{k8s, ConfigError, Located, Object, ObjectRef, Origin};

/// One YAML document of a file.
#[derive(Debug, Clone)]
pub struct Document {
    pub path: PathBuf,
    /// 1-based line of the document's first line.
    pub first_line: usize,
    pub text: String,
}

/// Every YAML file below `root` (or `root` itself if it is a file), sorted for stable order.
pub fn yaml_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if root.is_file() {
        out.push(root.to_owned());
        return Ok(out);
    }
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let ft = entry.file_type()?;
            if ft.is_dir() {
                // Kubernetes ConfigMap mounts keep the real files in hidden ..data dirs and
                // link them from the top; skipping hidden entries avoids reading twice.
                if !entry.file_name().to_string_lossy().starts_with('.') {
                    stack.push(path);
                }
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml") | Some("yml")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Splits a multi-document YAML text at `---` lines.
// Kept rather than serde-saphyr's multi-document reader: that one returns all documents or
// one error, while a directory of YAML must report every bad document (each with the line
// it starts on) and still parse the good ones beside it.
pub fn split_documents(path: &Path, text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut first_line = 1;
    // Lines as YAML counts them (a lone CR breaks a line too), so that the line numbers
    // the parser reports and ours agree (found by fuzzing: a file with lone CRs had its
    // errors reported past its end).
    let text = yaml_line_breaks(text);
    for (idx, line) in text.lines().enumerate() {
        let is_separator = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if is_separator {
            docs.push(Document {
                path: path.to_owned(),
                first_line,
                text: std::mem::take(&mut current),
            });
            first_line = idx + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push(Document {
        path: path.to_owned(),
        first_line,
        text: current,
    });
    docs.retain(|d| {
        d.text
            .lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs.into_iter().flat_map(expand_list).collect()
}

/// A `kind: List` document (what `kubectl get -o yaml` prints for several objects) as one
/// document per item, each keeping its own lines, so that a migration can validate what
/// the cluster holds. Only kubectl's block form (`items:` then `- ` entries at column 0)
/// is expanded; any other document is returned as it is.
fn expand_list(doc: Document) -> Vec<Document> {
    let lines: Vec<&str> = doc.text.lines().collect();
    let is_list = lines.iter().any(|l| l.trim_end() == "kind: List");
    let Some(start) = lines.iter().position(|l| l.trim_end() == "items:") else {
        return vec![doc];
    };
    if !is_list {
        return vec![doc];
    }
    let mut items: Vec<Document> = Vec::new();
    for (i, line) in lines.iter().enumerate().skip(start + 1) {
        if let Some(rest) = line.strip_prefix("- ") {
            items.push(Document {
                path: doc.path.clone(),
                first_line: doc.first_line + i,
                text: format!("{rest}\n"),
            });
        } else if line.starts_with("  ") || line.trim().is_empty() {
            if let Some(item) = items.last_mut() {
                item.text.push_str(line.get(2..).unwrap_or(""));
                item.text.push('\n');
            }
        } else {
            break;
        }
    }
    items
}

/// `text` with every YAML line break (CRLF, CR, LF) as LF.
pub fn yaml_line_breaks(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\r') {
        std::borrow::Cow::Owned(text.replace("\r\n", "\n").replace('\r', "\n"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: HeadMeta,
}

/// Just enough of `metadata` to name the object; anything wrong elsewhere in it is reported
/// by the typed parse, with the object named.
#[derive(Debug, Default, Deserialize)]
struct HeadMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

impl Document {
    fn error(
        &self,
        line_in_doc: Option<usize>,
        object: Option<ObjectRef>,
        message: String,
    ) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            line: self.first_line + line_in_doc.unwrap_or(1).saturating_sub(1),
            object,
            message,
            severity: Default::default(),
        }
    }

    /// The line (1-based, in the file) of the document's first non-blank, non-comment line.
    fn head_line(&self) -> usize {
        let offset = self
            .text
            .lines()
            .position(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .unwrap_or(0);
        self.first_line + offset
    }
}

/// A serde-saphyr error as (line within the document, message without the location prefix).
fn yaml_error(e: &serde_saphyr::Error) -> (Option<usize>, String) {
    let line = e.location().map(|l| l.line() as usize).filter(|l| *l > 0);
    let text = e.to_string();
    let first = text.lines().next().unwrap_or(&text);
    // "error: line 5 column 11: expected …": our prefix already says where.
    let message = first.strip_prefix("error: ").unwrap_or(first);
    let message = match message.strip_prefix("line ") {
        Some(rest) => rest.split_once(": ").map(|(_, m)| m).unwrap_or(rest),
        None => message,
    };
    let mut message = explain_unknown_field(message);
    // "invalid i64" says what failed to parse, not what was wanted.
    for (ty, wanted) in [
        ("i64", "an integer"),
        ("u32", "a non-negative integer"),
        ("u64", "a non-negative integer"),
        ("f64", "a number"),
        ("bool", "true or false"),
    ] {
        if message == format!("invalid {ty}") {
            message = format!("expected {wanted}");
        }
    }
    if let Some(col) = e.location().map(|l| l.column()).filter(|c| *c > 0) {
        message.push_str(&format!(" (column {col}"));
        if message.contains("did not find expected") {
            message.push_str("; check the indentation");
        }
        message.push(')');
    }
    (line, message)
}

/// serde says "unknown field `x`, expected one of …"; say whether `x` is an Istio field we do
/// not implement, or not a field at all.
fn explain_unknown_field(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((field, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    if super::istio::KNOWN_UNSUPPORTED_FIELDS.contains(&field) {
        format!("field `{field}` is not supported by proxy-daemon")
    } else {
        let expected = expected.trim_start_matches(", ");
        format!("unknown field `{field}` ({expected})")
    }
}

/// The `security.istio.io` versions (one schema).
const SECURITY_ISTIO: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

const ISTIO_NETWORKING: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// Parses one document into an object of a kind we understand.
/// Kinds outside Kubernetes' and Istio's groups come back as `Ok(None)`: they are not ours.
pub fn parse_document(
    doc: &Document,
    default_namespace: &str,
) -> Result<Option<Located<Object>>, ConfigError> {
    let meta: TypeMeta = serde_saphyr::from_str(&doc.text).map_err(|e| {
        let (line, message) = yaml_error(&e);
        doc.error(line, None, format!("invalid YAML: {message}"))
    })?;
    let cluster_scoped = meta.kind == "Namespace";
    let object_ref = ObjectRef {
        kind: meta.kind.clone(),
        namespace: if cluster_scoped {
            String::new()
        } else {
            meta.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_string())
        },
        name: meta.metadata.name.clone(),
    };
    let origin = Origin {
        path: doc.path.clone(),
        line: doc.head_line(),
        doc_first_line: doc.first_line,
    };
    let at_head = |message: String| ConfigError {
        path: doc.path.clone(),
        line: origin.line,
        object: Some(object_ref.clone()),
        message,
        severity: Default::default(),
    };
    let warning = |message: String| ConfigError {
        severity: super::Severity::Warning,
        ..at_head(message)
    };
    if meta.kind.is_empty() || meta.api_version.is_empty() {
        return Err(at_head("apiVersion and kind are required".into()));
    }
    if meta.metadata.name.is_empty() {
        return Err(at_head("metadata.name is required".into()));
    }
    let typed = |e: serde_saphyr::Error| {
        let (line, message) = yaml_error(&e);
        doc.error(line, Some(object_ref.clone()), message)
    };
    let ns = object_ref.namespace.clone();
    let api = meta.api_version.as_str();
    let istio = ISTIO_NETWORKING.contains(&api);
    macro_rules! istio_kind {
        ($variant:ident) => {{
            let mut o: super::istio::IstioObject<_> =
                serde_saphyr::from_str(&doc.text).map_err(typed)?;
            o.metadata.namespace = Some(ns.clone());
            Object::$variant(o)
        }};
    }
    let value = match (api, meta.kind.as_str()) {
        ("v1", "Namespace") => {
            let mut o: k8s::Namespace = serde_saphyr::from_str(&doc.text).map_err(typed)?;
            o.metadata.namespace = None;
            Object::Namespace(o)
        }
        ("v1", "Pod") => {
            let mut o: k8s::Pod = serde_saphyr::from_str(&doc.text).map_err(typed)?;
            o.metadata.namespace = Some(ns.clone());
            Object::Pod(o)
        }
        ("v1", "Service") => {
            let mut o: k8s::Service = serde_saphyr::from_str(&doc.text).map_err(typed)?;
            o.metadata.namespace = Some(ns.clone());
            Object::Service(o)
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let mut o: k8s::EndpointSlice = serde_saphyr::from_str(&doc.text).map_err(typed)?;
            o.metadata.namespace = Some(ns.clone());
            Object::EndpointSlice(o)
        }
        (_, "VirtualService") if istio => istio_kind!(VirtualService),
        (_, "DestinationRule") if istio => istio_kind!(DestinationRule),
        (_, "ServiceEntry") if istio => istio_kind!(ServiceEntry),
        (_, "Sidecar") if istio => istio_kind!(Sidecar),
        (_, "EnvoyFilter") if istio => istio_kind!(EnvoyFilter),
        (_, "Gateway") if istio => Object::Gateway,
        (api, "PeerAuthentication") if SECURITY_ISTIO.contains(&api) => {
            istio_kind!(PeerAuthentication)
        }
        (api, "AuthorizationPolicy") if SECURITY_ISTIO.contains(&api) => {
            istio_kind!(AuthorizationPolicy)
        }
        (api, "RequestAuthentication") if SECURITY_ISTIO.contains(&api) => {
            istio_kind!(RequestAuthentication)
        }
        (api, "HTTPRoute") if super::gateway::GATEWAY_API_VERSIONS.contains(&api) => {
            istio_kind!(HttpRoute)
        }
        ("gateway.networking.k8s.io/v1", "GRPCRoute") => istio_kind!(GrpcRoute),
        // Gateways are ingress (not the node proxy's job); ReferenceGrants are not needed
        // by mesh routes. Other route kinds are valid but not carried out: a warning.
        (api, kind)
            if api.starts_with("gateway.networking.k8s.io/")
                && kind.ends_with("Route") =>
        {
            return Err(warning(format!(
                "{kind} ({api}) is not supported by proxy-daemon (HTTPRoute and GRPCRoute are); ignored"
            )))
        }
        ("v1", "ConfigMap")
            if ns == super::mesh::MESH_CONFIG_NAMESPACE
                && meta.metadata.name == super::mesh::MESH_CONFIG_NAME =>
        {
            let cm: k8s::ConfigMap = serde_saphyr::from_str(&doc.text).map_err(typed)?;
            let text = cm
                .data
                .get(super::mesh::MESH_CONFIG_KEY)
                .map(String::as_str)
                .unwrap_or_default();
            Object::MeshConfig(super::mesh::parse(text).map_err(at_head)?)
        }
        // Other ConfigMaps are the applications' own.
        ("v1", "ConfigMap") => return Ok(None),
        ("rbac.istio.io/v1alpha1", kind) => {
            return Err(at_head(format!(
                "{kind} ({api}) is not supported: rbac.istio.io was removed in Istio 1.6 (use security.istio.io AuthorizationPolicy, enforced at the destination)"
            )))
        }
        // Valid kinds the node proxy has no use for: reported as notes (`validate`), never
        // a reason to reject the rest.
        ("v1", kind) if UNUSED_CORE_KINDS.contains(&kind) => return Ok(None),
        (_, kind) if istio && UNUSED_ISTIO_NETWORKING_KINDS.contains(&kind) => return Ok(None),
        (api, kind) if istio || api == "v1" || api == "discovery.k8s.io/v1" => {
            return Err(at_head(format!("unknown kind {kind} for apiVersion {api}")))
        }
        // Istio's other APIs are valid objects with meaning a node proxy does not carry
        // out: a warning (the rest of the configuration is used), saying what is lost.
        (api, kind) if api.starts_with("security.istio.io/") => {
            return Err(warning(format!(
                "{kind} ({api}) is not enforced by proxy-daemon yet; ignored"
            )))
        }
        (api, kind) if api.contains("istio.io") => {
            return Err(warning(format!(
                "{kind} ({api}) is not supported by proxy-daemon; ignored"
            )))
        }
        _ => return Ok(None),
    };
    Ok(Some(Located {
        origin,
        object_ref,
        value,
    }))
}

/// Core `v1` kinds that are valid but not the node proxy's business.
const UNUSED_CORE_KINDS: &[&str] = &[
    "Binding",
    "ComponentStatus",
    "ConfigMap",
    "Endpoints",
    "Event",
    "LimitRange",
    "List",
    "Node",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "PodTemplate",
    "ReplicationController",
    "ResourceQuota",
    "Secret",
    "ServiceAccount",
];

/// `networking.istio.io` kinds a node proxy does not act on (Gateway is compiled into a
/// note of its own).
const UNUSED_ISTIO_NETWORKING_KINDS: &[&str] = &["WorkloadEntry", "WorkloadGroup", "ProxyConfig"];

/// Everything read from a directory: the objects that parsed, and one error per problem.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub objects: Vec<Located<Object>>,
    pub errors: Vec<ConfigError>,
    pub documents: usize,
    /// Documents of kinds this build does not act on (reported by `validate`).
    pub other_kinds: Vec<(Origin, ObjectRef)>,
}

/// Parses every YAML file below `root` (no caching).
pub fn load_path(root: &Path) -> LoadResult {
    Loader::default().load(root)
}

/// What one file gave, kept while the file's size and mtime stay the same.
struct ParsedFile {
    stamp: (u64, Option<SystemTime>),
    objects: Vec<Located<Object>>,
    errors: Vec<ConfigError>,
    other_kinds: Vec<(Origin, ObjectRef)>,
    documents: usize,
}

/// A loader that remembers parsed files, so a reload re-parses only files that changed
/// (parsing dominates a reload: ~110 µs per document against ~10 µs to compile it).
#[derive(Default)]
pub struct Loader {
    files: std::collections::HashMap<PathBuf, ParsedFile>,
}

impl Loader {
    pub fn load(&mut self, root: &Path) -> LoadResult {
        let mut result = LoadResult::default();
        let files = match yaml_files(root) {
            Ok(files) => files,
            Err(e) => {
                result.errors.push(ConfigError {
                    path: root.to_owned(),
                    line: 0,
                    object: None,
                    message: format!("cannot read: {e}"),
                    severity: Default::default(),
                });
                return result;
            }
        };
        self.files.retain(|p, _| files.contains(p));
        for file in files {
            let stamp = fs::metadata(&file)
                .map(|m| (m.len(), m.modified().ok()))
                .ok();
            let fresh = match (self.files.get(&file), stamp) {
                (Some(cached), Some(stamp)) => cached.stamp != stamp,
                _ => true,
            };
            if fresh {
                let parsed = parse_file(&file, stamp.unwrap_or((0, None)));
                self.files.insert(file.clone(), parsed);
            }
            if let Some(p) = self.files.get(&file) {
                result.objects.extend(p.objects.iter().cloned());
                result.errors.extend(p.errors.iter().cloned());
                result.other_kinds.extend(p.other_kinds.iter().cloned());
                result.documents += p.documents;
            }
        }
        result
    }
}

/// The largest configuration file read (a bigger one is an error, not a stalled loader).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

fn parse_file(file: &Path, stamp: (u64, Option<SystemTime>)) -> ParsedFile {
    let mut parsed = ParsedFile {
        stamp,
        objects: Vec::new(),
        errors: Vec::new(),
        other_kinds: Vec::new(),
        documents: 0,
    };
    // Only regular files (symlinks followed, as ConfigMap mounts use them): reading a FIFO
    // or a device named *.yaml would block the loader for good.
    let finding = |message: String, severity| ConfigError {
        path: file.to_owned(),
        line: 0,
        object: None,
        message,
        severity,
    };
    match fs::metadata(file) {
        Ok(m) if !m.is_file() => {
            parsed.errors.push(finding(
                "not a regular file (a FIFO, socket or device); skipped".into(),
                super::Severity::Warning,
            ));
            return parsed;
        }
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            parsed.errors.push(finding(
                format!(
                    "file is {} MiB; the limit is {} MiB",
                    m.len() / (1024 * 1024),
                    MAX_FILE_BYTES / (1024 * 1024)
                ),
                super::Severity::Error,
            ));
            return parsed;
        }
        _ => {}
    }
    let text = match fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            parsed.errors.push(ConfigError {
                path: file.to_owned(),
                line: 0,
                object: None,
                message: format!("cannot read: {e}"),
                severity: Default::default(),
            });
            // Unreadable now may be readable later: do not cache the failure.
            parsed.stamp = (u64::MAX, None);
            return parsed;
        }
    };
    for doc in split_documents(file, &text) {
        parsed.documents += 1;
        match parse_document(&doc, "default") {
            Ok(Some(obj)) => parsed.objects.push(obj),
            Ok(None) => {
                if let Ok(meta) = serde_saphyr::from_str::<TypeMeta>(&doc.text) {
                    parsed.other_kinds.push((
                        Origin {
                            path: doc.path.clone(),
                            line: doc.head_line(),
                            doc_first_line: doc.first_line,
                        },
                        ObjectRef {
                            kind: meta.kind,
                            namespace: meta.metadata.namespace.unwrap_or_else(|| "default".into()),
                            name: meta.metadata.name,
                        },
                    ))
                }
            }
            Err(e) => parsed.errors.push(e),
        }
    }
    parsed
}

/// Cheap fingerprint of a directory's YAML (paths, sizes, mtimes) to notice changes.
pub fn fingerprint(root: &Path) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    yaml_files(root)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let m = fs::metadata(&p).ok()?;
            Some((p, (m.len(), m.modified().ok())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_keep_their_lines() {
        let text = "# c\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\n\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: a\n";
        let docs = split_documents(Path::new("x.yaml"), text);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].head_line(), 2);
        assert_eq!(docs[1].head_line(), 8);
        let pod = parse_document(&docs[1], "default").unwrap().unwrap();
        assert_eq!(pod.object_ref.to_string(), "Pod/a/p");
        assert_eq!(pod.origin.line, 8);
    }

    #[test]
    fn type_error_points_at_its_line() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: [1, 2]\n";
        let docs = split_documents(Path::new("x.yaml"), text);
        let err = parse_document(&docs[0], "default").unwrap_err();
        assert_eq!(err.line, 5, "{err}");
        assert!(
            err.to_string().starts_with("x.yaml:5: Pod/default/p: "),
            "{err}"
        );
    }

    #[test]
    fn loader_reparses_only_changed_files_and_forgets_removed_ones() {
        let dir = std::env::temp_dir().join(format!("pd-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ns =
            |name: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n");
        std::fs::write(dir.join("a.yaml"), ns("a")).unwrap();
        std::fs::write(dir.join("b.yaml"), ns("b")).unwrap();
        let mut loader = Loader::default();
        let names = |r: &LoadResult| {
            r.objects
                .iter()
                .map(|o| o.object_ref.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&loader.load(&dir)), vec!["a", "b"]);
        std::fs::write(dir.join("b.yaml"), ns("bee")).unwrap();
        assert_eq!(names(&loader.load(&dir)), vec!["a", "bee"]);
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        assert_eq!(names(&loader.load(&dir)), vec!["bee"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_kubectl_list_is_validated_item_by_item_at_its_lines() {
        let text = "apiVersion: v1\nitems:\n- apiVersion: networking.istio.io/v1\n  kind: VirtualService\n  metadata:\n    name: a\n    namespace: shop\n  spec:\n    hosts: [a]\n    http: [{route: [{destination: {host: a}}]}]\n- apiVersion: networking.istio.io/v1\n  kind: VirtualService\n  metadata:\n    name: b\n    namespace: shop\n  spec:\n    hosts: [b]\n    bogus: 1\nkind: List\nmetadata:\n  resourceVersion: \"\"\n";
        let docs = split_documents(Path::new("mesh.yaml"), text);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].first_line, 3);
        assert_eq!(docs[1].first_line, 11);
        let a = parse_document(&docs[0], "default")
            .expect("a parses")
            .expect("a kind of ours");
        assert_eq!(a.object_ref.name, "a");
        assert_eq!(a.origin.line, 3);
        let err = parse_document(&docs[1], "default").expect_err("b has an unknown field");
        assert_eq!(err.line, 18, "{err}");
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn missing_name_is_reported() {
        let docs = split_documents(
            Path::new("x.yaml"),
            "\n\napiVersion: v1\nkind: Pod\nmetadata: {}\n",
        );
        let err = parse_document(&docs[0], "default").unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.message.contains("metadata.name"));
    }
}
