//! Configuration objects (the same YAML a user would `kubectl apply`) and where they come from.
pub mod k8s;
pub mod local;

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
    pub line: usize,
}

/// A problem with one object, printed as `PATH:LINE: KIND/NAMESPACE/NAME: message`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: usize,
    pub object: Option<ObjectRef>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.path.display(), self.line)?;
        if let Some(obj) = &self.object {
            write!(f, "{obj}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// One parsed object of a kind we understand.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(k8s::Namespace),
    Pod(k8s::Pod),
}

#[derive(Debug, Clone)]
pub struct Located<T> {
    pub origin: Origin,
    pub object_ref: ObjectRef,
    pub value: T,
}
