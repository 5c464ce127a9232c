//! `gateway.networking.k8s.io` route kinds for the mesh (GAMMA): `HTTPRoute` (v1, and
//! v1beta1 as still served) and `GRPCRoute` (v1), with the Gateway API's field names. Every
//! struct denies unknown fields, as the Istio kinds do; the CRD's CEL rules are checked
//! when routes compile (`state::routes::gateway`), where each finding gets its line.
use serde::Deserialize;
use serde_saphyr::Spanned;

/// The API versions whose HTTPRoute and GRPCRoute share these types.
pub const GATEWAY_API_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];

/// `parentRefs[]`: for the mesh, a Service (`group: ""`, `kind: Service`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentReference {
    /// Default `gateway.networking.k8s.io` (a Gateway).
    pub group: Option<String>,
    /// Default `Gateway`.
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u32>,
}

impl ParentReference {
    /// The parentRef as `status.parents[].parentRef` echoes it (the fields written).
    pub fn status_ref(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "name": self.name });
        for (k, val) in [
            ("group", &self.group),
            ("kind", &self.kind),
            ("namespace", &self.namespace),
            ("sectionName", &self.section_name),
        ] {
            if let Some(val) = val {
                v[k] = val.clone().into();
            }
        }
        if let Some(p) = self.port {
            v["port"] = p.into();
        }
        v
    }

    /// Whether this parent is a Service (the mesh's attachment), not a Gateway.
    pub fn is_service(&self) -> bool {
        self.group.as_deref() == Some("") && self.kind.as_deref().unwrap_or("Gateway") == "Service"
    }
}

/// A Service (or other object) a rule forwards or mirrors to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendObjectReference {
    /// Default `""` (core).
    pub group: Option<String>,
    /// Default `Service`.
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u32>,
}

impl BackendObjectReference {
    pub fn is_service(&self) -> bool {
        self.group.as_deref().unwrap_or("").is_empty()
            && self.kind.as_deref().unwrap_or("Service") == "Service"
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u32>,
    /// Relative (default 1); 0 sends nothing.
    pub weight: Option<Spanned<i64>>,
    #[serde(default)]
    pub filters: Vec<Spanned<HttpRouteFilter>>,
}

impl BackendRef {
    /// The object it names (serde cannot flatten under `deny_unknown_fields`).
    pub fn object(&self) -> BackendObjectReference {
        BackendObjectReference {
            group: self.group.clone(),
            kind: self.kind.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            port: self.port,
        }
    }
}

/// `Exact` (the default) or `RegularExpression`, for headers, query parameters and gRPC
/// methods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ValueMatch {
    #[serde(default, rename = "type")]
    pub match_type: ValueMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(default, rename = "type")]
    pub match_type: PathMatchType,
    /// Default `/`.
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Default PathPrefix `/`.
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    pub method: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HttpHeader>,
    #[serde(default)]
    pub add: Vec<HttpHeader>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub modifier_type: PathModifierType,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u32>,
    /// Default 302.
    pub status_code: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fraction {
    pub numerator: u32,
    /// Default 100.
    pub denominator: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: BackendObjectReference,
    pub percent: Option<u32>,
    pub fraction: Option<Fraction>,
}

/// One entry of `filters`: `type` names which of the other fields is set (the CRD's CEL
/// rules, checked at compile).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub filter_type: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_mirror: Option<RequestMirror>,
    pub request_redirect: Option<RequestRedirect>,
    pub url_rewrite: Option<UrlRewrite>,
    /// Implementation-specific: none is defined here, so a route using one is not accepted.
    pub extension_ref: Option<serde_json::Value>,
    /// Not implemented: a route using it is not accepted.
    pub cors: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

/// `retry` (experimental channel, GEP-1731).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRetry {
    #[serde(default)]
    pub codes: Vec<u32>,
    pub attempts: Option<u32>,
    pub backoff: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRule {
    pub name: Option<String>,
    /// Absent: one match, PathPrefix `/`.
    pub matches: Option<Vec<Spanned<HttpRouteMatch>>>,
    #[serde(default)]
    pub filters: Vec<Spanned<HttpRouteFilter>>,
    #[serde(default)]
    pub backend_refs: Vec<Spanned<BackendRef>>,
    pub timeouts: Option<Spanned<HttpRouteTimeouts>>,
    pub retry: Option<Spanned<HttpRouteRetry>>,
    /// Experimental: not implemented (a route using it is not accepted).
    pub session_persistence: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<Spanned<ParentReference>>,
    /// Ignored for the mesh (GEP-1294: routes bind by the Service, not by Host).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Absent: the CRD's default, one rule with PathPrefix `/` and no backend (so every
    /// request answers 500).
    pub rules: Option<Vec<Spanned<HttpRouteRule>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    #[serde(default, rename = "type")]
    pub match_type: ValueMatchType,
    pub service: Option<String>,
    pub method: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

/// GRPCRoute's filters: the HTTPRoute ones less redirect and rewrite (the CRD's enum).
pub type GrpcRouteFilter = HttpRouteFilter;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteRule {
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<Spanned<GrpcRouteMatch>>,
    #[serde(default)]
    pub filters: Vec<Spanned<GrpcRouteFilter>>,
    #[serde(default)]
    pub backend_refs: Vec<Spanned<BackendRef>>,
    pub session_persistence: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<Spanned<ParentReference>>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<Spanned<GrpcRouteRule>>,
}
