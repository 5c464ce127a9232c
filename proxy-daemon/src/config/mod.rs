//! Configuration objects (the same YAML a user would `kubectl apply`) and where they come from.
pub mod cluster;
pub mod duration;
pub mod gateway;
pub mod istio;
pub mod k8s;
pub mod local;
pub mod mesh;
pub mod route_status;
pub mod security;

use std::{fmt, path::PathBuf};

/// `KIND/NAMESPACE/NAME`, the way every message names an object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// Where a document came from: file and the line its document starts on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Origin {
    pub path: PathBuf,
    /// Line of the object's first significant line (`apiVersion:` usually).
    pub line: usize,
    /// Line the YAML document starts on (after its `---`), for positions within it.
    #[serde(skip)]
    pub doc_first_line: usize,
}

/// How bad a finding is: errors reject the configuration; warnings and notes are reported
/// and the configuration is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Error,
    Warning,
    Note,
}

/// A problem with one object, printed as `PATH:LINE: KIND/NAMESPACE/NAME: message`
/// (warnings and notes say so at the start of the message).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: usize,
    pub object: Option<ObjectRef>,
    pub message: String,
    #[serde(default)]
    pub severity: Severity,
}

impl ConfigError {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.path.display(), self.line)?;
        if let Some(obj) = &self.object {
            write!(f, "{obj}: ")?;
        }
        match self.severity {
            Severity::Error => {}
            Severity::Warning => f.write_str("warning: ")?,
            Severity::Note => f.write_str("note: ")?,
        }
        f.write_str(&self.message)
    }
}

/// One parsed object of a kind we understand.
// Built once per load and read by the compiler; boxing would only add indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(k8s::Namespace),
    Pod(k8s::Pod),
    Service(k8s::Service),
    EndpointSlice(k8s::EndpointSlice),
    VirtualService(istio::IstioObject<istio::VirtualServiceSpec>),
    DestinationRule(istio::IstioObject<istio::DestinationRuleSpec>),
    ServiceEntry(istio::IstioObject<istio::ServiceEntrySpec>),
    Sidecar(istio::IstioObject<istio::SidecarSpec>),
    EnvoyFilter(istio::IstioObject<istio::EnvoyFilterSpec>),
    PeerAuthentication(istio::IstioObject<security::PeerAuthenticationSpec>),
    AuthorizationPolicy(istio::IstioObject<security::AuthorizationPolicySpec>),
    RequestAuthentication(istio::IstioObject<security::RequestAuthenticationSpec>),
    /// Gateway API routes; those whose parent is a Service are the mesh's (GAMMA).
    HttpRoute(istio::IstioObject<gateway::HttpRouteSpec>),
    GrpcRoute(istio::IstioObject<gateway::GrpcRouteSpec>),
    /// Ingress gateways are not the node proxy's job; kept to explain what is ignored.
    Gateway,
    /// ConfigMap `istio-system/istio`: the mesh config (its tracing part).
    MeshConfig(mesh::MeshConfig),
}

impl Object {
    /// The object's metadata (the mesh config and ignored Gateways carry none we keep).
    pub fn metadata(&self) -> Option<&k8s::ObjectMeta> {
        match self {
            Object::Namespace(o) => Some(&o.metadata),
            Object::Pod(o) => Some(&o.metadata),
            Object::Service(o) => Some(&o.metadata),
            Object::EndpointSlice(o) => Some(&o.metadata),
            Object::VirtualService(o) => Some(&o.metadata),
            Object::DestinationRule(o) => Some(&o.metadata),
            Object::ServiceEntry(o) => Some(&o.metadata),
            Object::Sidecar(o) => Some(&o.metadata),
            Object::EnvoyFilter(o) => Some(&o.metadata),
            Object::PeerAuthentication(o) => Some(&o.metadata),
            Object::AuthorizationPolicy(o) => Some(&o.metadata),
            Object::RequestAuthentication(o) => Some(&o.metadata),
            Object::HttpRoute(o) => Some(&o.metadata),
            Object::GrpcRoute(o) => Some(&o.metadata),
            Object::Gateway | Object::MeshConfig(_) => None,
        }
    }
}

/// Where an object stands among competitors, oldest first, as Istio orders them
/// (`creationTimestamp`, then name, then namespace). Objects without a timestamp (local
/// files that set none) come after those with one, in the order they were read.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct CreationOrder {
    /// Seconds and nanoseconds since the epoch; `None` sorts last.
    #[serde(skip)]
    created: (bool, i64, i32),
    /// Position in the configuration as read (0 for timestamped objects: name decides).
    #[serde(skip)]
    seq: usize,
    name: String,
    namespace: String,
}

impl CreationOrder {
    /// The key of `o`, read `seq`-th from its source.
    pub fn of(o: &Located<Object>, seq: usize) -> Self {
        let created = o
            .value
            .metadata()
            .and_then(|m| m.creation_timestamp.as_deref())
            .and_then(|t| t.parse::<jiff::Timestamp>().ok());
        Self {
            created: match created {
                Some(t) => (false, t.as_second(), t.subsec_nanosecond()),
                None => (true, 0, 0),
            },
            seq: if created.is_some() { 0 } else { seq },
            name: o.object_ref.name.clone(),
            namespace: o.object_ref.namespace.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Located<T> {
    pub origin: Origin,
    pub object_ref: ObjectRef,
    pub value: T,
}

impl<T> Located<T> {
    /// A finding about this object at `line` (0: the object's first line).
    pub fn finding(
        &self,
        severity: Severity,
        line: u64,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            path: self.origin.path.clone(),
            // Spanned lines count from the document's start; the origin knows the offset.
            line: if line == 0 {
                self.origin.line
            } else {
                self.origin.doc_first_line + line as usize - 1
            },
            object: Some(self.object_ref.clone()),
            message: message.into(),
            severity,
        }
    }

    pub fn error(&self, line: u64, message: impl Into<String>) -> ConfigError {
        self.finding(Severity::Error, line, message)
    }
}
