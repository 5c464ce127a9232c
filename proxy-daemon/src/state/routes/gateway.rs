//! Gateway API routes for the mesh (GAMMA): HTTPRoutes and GRPCRoutes whose parent is a
//! Service. Each route becomes rules of the same shape as a VirtualService's, bound to the
//! Service's ports (its ClusterIP frontend, not its Host) and ordered by the Gateway API's
//! precedence — across all routes of one group, so routes on one Service merge.
//!
//! Which group a client uses: the consumer routes of its own namespace when there are any,
//! else the producer routes (those in the Service's namespace). A route in any other
//! namespace is a consumer route of that namespace: it never reaches other clients.
use std::{cmp::Reverse, sync::Arc};

use super::*;
use crate::config::gateway::{self as gw, HttpRouteFilter, ParentReference, PathMatchType};

/// Which API wrote a rule: they differ in what a request that matches nothing gets (the
/// Gateway API: 404 once a Service has routes), what an unresolvable backend means (500
/// for its share) and how redirects fill what they do not set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum RouteApi {
    #[default]
    VirtualService,
    HttpRoute,
    GrpcRoute,
}

impl RouteApi {
    pub fn is_gateway(self) -> bool {
        self != RouteApi::VirtualService
    }
}

/// A Gateway API path modifier (redirect or rewrite).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the matched PathPrefix (whole segments), never leaving `//`.
    ReplacePrefixMatch(String),
}

impl PathModifier {
    /// The path after the modifier, for a request `path` matched by `prefix` (when the
    /// match was a PathPrefix).
    pub fn apply(&self, path: &str, prefix: Option<&str>) -> String {
        match self {
            PathModifier::ReplaceFullPath(p) => p.clone(),
            PathModifier::ReplacePrefixMatch(rep) => {
                let prefix = prefix.unwrap_or("/").trim_end_matches('/');
                let rest = path.get(prefix.len()..).unwrap_or("");
                let out = format!("{}{rest}", rep.trim_end_matches('/'));
                match out.as_str() {
                    "" => "/".to_string(),
                    o if !o.starts_with('/') => format!("/{o}"),
                    _ => out,
                }
            }
        }
    }
}

/// One (rule, match) of a bound group, in precedence order.
#[derive(Debug, Clone, Serialize)]
pub struct MeshRouteEntry {
    pub rule: Arc<HttpRule>,
    /// Index into `rule.matches`.
    pub match_index: usize,
}

/// The rules one group of routes (HTTPRoutes or GRPCRoutes) puts on a Service port.
#[derive(Debug, Clone, Serialize)]
pub struct MeshRouteGroup {
    pub api: RouteApi,
    /// `HTTPRoute/ns/name` of each route in the group.
    pub routes: Vec<String>,
    /// The oldest route's creation order (a VirtualService competing with the group is
    /// compared with it).
    #[serde(skip)]
    pub oldest: CreationOrder,
    pub entries: Vec<MeshRouteEntry>,
}

/// The routes bound to one Service port.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BoundRoutes {
    /// Routes in the Service's namespace: every client without consumer routes.
    pub producer: Option<Arc<MeshRouteGroup>>,
    /// Routes of other namespaces, by namespace: only that namespace's clients.
    pub consumers: BTreeMap<String, Arc<MeshRouteGroup>>,
}

/// What compiling a route left for the group builder.
struct CompiledRoute {
    api: RouteApi,
    object: String,
    name: String,
    namespace: String,
    order: CreationOrder,
    /// Each Service parent: the ports it binds, or why it binds none.
    parents: Vec<ParentBinding>,
    /// Why the route is not accepted at all (a feature proxy-daemon does not carry out).
    unsupported: Option<String>,
    /// A backend that does not resolve: (reason, message).
    unresolved: Option<(&'static str, String)>,
    /// Each rule with, per match, its precedence key.
    rules: Vec<(Arc<HttpRule>, Vec<PrecedenceKey>)>,
}

/// The Gateway API's order for matches, smaller first: exact path, longest prefix, method,
/// most headers, most query parameters (GRPCRoute: longest service, longest method, most
/// headers); then the route's age and name, then rule and match order.
type PrecedenceKey = (u8, Reverse<usize>, u8, Reverse<usize>, Reverse<usize>);

/// One Service parent of a route: the ports it binds (FQDN, namespace, port), or why it
/// binds none.
struct ParentBinding {
    parent_ref: serde_json::Value,
    binds: Vec<(String, String, u32)>,
    problem: Option<(&'static str, String)>,
}

/// A route's status for one Service parent, as its `status.parents[]` entry carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParentStatus {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// The parentRef as the route wrote it.
    pub parent_ref: serde_json::Value,
    /// (status, reason) of the `Accepted` condition.
    pub accepted: (bool, &'static str),
    /// (status, reason) of the `ResolvedRefs` condition.
    pub resolved_refs: (bool, &'static str),
    pub message: String,
}

pub const CONTROLLER_NAME: &str = "proxy-daemon.io/mesh";

/// The conditions of one parent: the first problem found decides `Accepted`.
fn parent_status(r: &CompiledRoute, parent: &ParentBinding, conflicted: bool) -> ParentStatus {
    let (accepted, message) = if let Some(m) = &r.unsupported {
        ((false, "UnsupportedValue"), m.clone())
    } else if let Some((reason, m)) = &parent.problem {
        ((false, *reason), m.clone())
    } else if conflicted {
        (
            (false, "Conflicted"),
            "a GRPCRoute of the same namespace binds this Service port; GRPCRoute takes precedence"
                .to_string(),
        )
    } else {
        ((true, "Accepted"), String::new())
    };
    let (resolved_refs, message) = match &r.unresolved {
        Some((reason, m)) => (
            (false, *reason),
            if message.is_empty() {
                m.clone()
            } else {
                message
            },
        ),
        None => ((true, "ResolvedRefs"), message),
    };
    ParentStatus {
        kind: match r.api {
            RouteApi::GrpcRoute => "GRPCRoute",
            _ => "HTTPRoute",
        },
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        parent_ref: parent.parent_ref.clone(),
        accepted,
        resolved_refs,
        message,
    }
}

/// Whether the Kubernetes Service `host` exists but has no port `port` (a backendRef's
/// port is the Service's, not the pods').
fn backend_lacks_port(registry: &Registry, host: &str, port: u32) -> bool {
    registry
        .by_host_unscoped(host)
        .is_some_and(|s| s.port(port).is_none())
}

/// The first backendRef that does not resolve to a Service: (reason, message).
fn unresolved<'a>(
    refs: impl Iterator<Item = &'a gw::BackendRef>,
    ns: &str,
    registry: &Registry,
) -> Option<(&'static str, String)> {
    for b in refs {
        if !b.object().is_service() {
            return Some((
                "InvalidKind",
                format!("backendRef {} is not a Service", b.name),
            ));
        }
        let bns = b.namespace.as_deref().unwrap_or(ns);
        let host = format!(
            "{}.{bns}.{}",
            b.name,
            crate::state::registry::CLUSTER_DOMAIN
        );
        if !registry.contains_host(&host) {
            return Some((
                "BackendNotFound",
                format!("backend Service {bns}/{} does not exist", b.name),
            ));
        }
        if let Some(port) = b.port.filter(|p| backend_lacks_port(registry, &host, *p)) {
            return Some((
                "BackendNotFound",
                format!("backend Service {bns}/{} has no port {port}", b.name),
            ));
        }
    }
    None
}

impl RouteTable {
    /// The Gateway API routes on Service port `host:port` for a client of namespace
    /// `client`: its own namespace's (consumer) routes if any, else the producer routes.
    /// The flag says whether they are the client's own.
    pub fn mesh_routes_for(
        &self,
        host: &str,
        port: u32,
        client: &str,
    ) -> Option<(&Arc<MeshRouteGroup>, bool)> {
        let bound = self.mesh_routes.get(host)?.get(&port)?;
        match bound.consumers.get(client) {
            Some(g) => Some((g, true)),
            None => bound.producer.as_ref().map(|g| (g, false)),
        }
    }
}

/// When a VirtualService and Gateway API routes both apply to one Service, which one a
/// client uses — Istio's order (`SelectVirtualServices`): a VirtualService of the client's
/// own namespace, then one exported to it by name, then the client's own (consumer)
/// routes, then the older of the VirtualService and the producer routes.
pub fn virtual_service_wins(
    vs: &CompiledVirtualService,
    group: &MeshRouteGroup,
    consumer: bool,
    client: &str,
) -> bool {
    if vs.namespace == client || vs.export_to.iter().any(|e| e == client) {
        return true;
    }
    !consumer && vs.order < group.oldest
}

/// Builds the bound route table from every HTTPRoute and GRPCRoute, oldest first.
pub(super) fn build_mesh_routes(
    ordered: &[(CreationOrder, &Located<Object>)],
    registry: &Registry,
    table: &mut RouteTable,
    findings: &mut Vec<ConfigError>,
    regexes: &mut std::collections::HashMap<String, Arc<regex::Regex>>,
) {
    let mut compiled = Vec::new();
    for (order, o) in ordered {
        let mut cx = Ctx {
            o,
            findings,
            regexes,
        };
        let route = match &o.value {
            Object::HttpRoute(r) => compile_http_route(&mut cx, &r.spec, registry),
            Object::GrpcRoute(r) => compile_grpc_route(&mut cx, &r.spec, registry),
            _ => continue,
        };
        if let Some(mut r) = route {
            r.order = order.clone();
            compiled.push(r);
        }
    }
    // A route proxy-daemon cannot carry out in full binds nothing (Accepted=False).
    let bound = |r: &&CompiledRoute| r.unsupported.is_none();
    // GRPCRoute beats HTTPRoute on one Service port (GEP-1426); the loser is Conflicted.
    let grpc_ports: std::collections::BTreeSet<(String, u32, String)> = compiled
        .iter()
        .filter(bound)
        .filter(|r| r.api == RouteApi::GrpcRoute)
        .flat_map(|r| {
            r.parents
                .iter()
                .flat_map(|p| &p.binds)
                .map(|(h, _, p)| (h.clone(), *p, r.namespace.clone()))
        })
        .collect();
    type GroupKey = (String, u32, String, String);
    let mut groups: BTreeMap<GroupKey, Vec<&CompiledRoute>> = BTreeMap::new();
    for r in &compiled {
        for parent in &r.parents {
            let mut conflicted = false;
            for (host, svc_ns, port) in parent.binds.iter().filter(|_| r.unsupported.is_none()) {
                let grpc_key = (host.clone(), *port, r.namespace.clone());
                if r.api == RouteApi::HttpRoute && grpc_ports.contains(&grpc_key) {
                    conflicted = true;
                    continue;
                }
                let key = (host.clone(), *port, r.namespace.clone(), svc_ns.clone());
                groups.entry(key).or_default().push(r);
            }
            table
                .route_status
                .push(parent_status(r, parent, conflicted));
        }
    }
    for ((host, port, route_ns, svc_ns), routes) in groups {
        let group = Arc::new(group_of(&routes));
        let bound = table
            .mesh_routes
            .entry(host)
            .or_default()
            .entry(port)
            .or_default();
        if route_ns == svc_ns {
            bound.producer = Some(group);
        } else {
            bound.consumers.insert(route_ns, group);
        }
    }
}

/// Merges the routes of one group into one precedence-ordered list.
fn group_of(routes: &[&CompiledRoute]) -> MeshRouteGroup {
    let mut keyed = Vec::new();
    for r in routes {
        for (ri, (rule, keys)) in r.rules.iter().enumerate() {
            for (mi, k) in keys.iter().enumerate() {
                keyed.push(((*k, r.order.clone(), ri, mi), rule.clone()));
            }
        }
    }
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    MeshRouteGroup {
        api: routes.first().map(|r| r.api).unwrap_or_default(),
        routes: routes.iter().map(|r| r.object.clone()).collect(),
        oldest: routes
            .iter()
            .map(|r| r.order.clone())
            .min()
            .unwrap_or_else(|| routes[0].order.clone()),
        entries: keyed
            .into_iter()
            .map(|((_, _, _, mi), rule)| MeshRouteEntry {
                rule,
                match_index: mi,
            })
            .collect(),
    }
}

impl Ctx<'_> {
    /// The Service ports a route's parentRefs bind, as (FQDN, namespace, port). Gateway
    /// parents are ingress, not the node proxy's; a Service that does not exist binds
    /// nothing (the route waits for it).
    fn parents(
        &mut self,
        refs: &[Spanned<ParentReference>],
        registry: &Registry,
    ) -> Vec<ParentBinding> {
        let ns = self.o.object_ref.namespace.clone();
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for p in refs {
            let line = p.referenced.line();
            let pr = &p.value;
            let pns = pr.namespace.clone().unwrap_or_else(|| ns.clone());
            if !seen.insert((
                pr.group.clone(),
                pr.kind.clone(),
                pr.name.clone(),
                pns.clone(),
                pr.section_name.clone(),
                pr.port,
            )) {
                self.err(line, "sectionName must be unique when parentRefs includes 2 or more references to the same parent");
            }
            if !pr.is_service() {
                self.note(
                    line,
                    format!(
                        "parent {}/{} ({}) is not a Service: gateways are not the node proxy's job; this parent is ignored",
                        pr.kind.as_deref().unwrap_or("Gateway"),
                        pr.name,
                        pr.group.as_deref().unwrap_or("gateway.networking.k8s.io")
                    ),
                );
                continue;
            }
            let mut binding = ParentBinding {
                parent_ref: pr.status_ref(),
                binds: Vec::new(),
                problem: None,
            };
            let host = format!(
                "{}.{pns}.{}",
                pr.name,
                crate::state::registry::CLUSTER_DOMAIN
            );
            let Some(svc) = registry
                .by_host_unscoped(&host)
                .filter(|s| matches!(s.kind, crate::state::registry::ServiceKind::Kubernetes))
            else {
                let message = format!("parent Service {pns}/{} does not exist: the route binds nothing until it does (Accepted=False, NoMatchingParent)", pr.name);
                self.warn(line, message.clone());
                binding.problem = Some(("NoMatchingParent", message));
                out.push(binding);
                continue;
            };
            let ports: Vec<u32> = svc
                .ports
                .iter()
                .filter(|sp| pr.port.is_none_or(|want| want == sp.port))
                .filter(|sp| pr.section_name.as_ref().is_none_or(|name| sp.name == *name))
                .map(|sp| sp.port)
                .collect();
            if ports.is_empty() {
                let message = format!(
                    "parent Service {pns}/{} has no port {}: the route binds nothing there (Accepted=False, NoMatchingParent)",
                    pr.name,
                    pr.port.map(|p| p.to_string()).or(pr.section_name.clone()).unwrap_or_default()
                );
                self.warn(line, message.clone());
                binding.problem = Some(("NoMatchingParent", message));
            }
            binding.binds = ports
                .into_iter()
                .map(|port| (svc.hostname.clone(), pns.clone(), port))
                .collect();
            out.push(binding);
        }
        out
    }

    /// A backendRef as a weighted destination; `None` for weight 0 (it gets nothing).
    fn backend(
        &mut self,
        line: u64,
        b: &gw::BackendRef,
        registry: &Registry,
    ) -> Option<WeightedDestination> {
        let ns = &self.o.object_ref.namespace;
        let weight = b.weight.as_ref().map(|w| w.value).unwrap_or(1);
        if !(0..=1_000_000).contains(&weight) {
            self.err(
                line,
                format!("backendRefs.weight {weight} is outside 0–1000000"),
            );
            return None;
        }
        if !b.object().is_service() {
            self.warn(line, format!("backendRef {}/{} is not a Service: its share answers 500 (ResolvedRefs=False, InvalidKind)", b.kind.as_deref().unwrap_or("Service"), b.name));
        }
        let Some(port) = b.port else {
            self.err(line, "Must have port for Service reference");
            return None;
        };
        if weight == 0 {
            return None;
        }
        let bns = b.namespace.clone().unwrap_or_else(|| ns.clone());
        let host = format!(
            "{}.{bns}.{}",
            b.name,
            crate::state::registry::CLUSTER_DOMAIN
        );
        if b.object().is_service() && !registry.contains_host(&host) {
            self.warn(
                line,
                format!("backend Service {bns}/{} does not exist: its share of requests answers 500 (ResolvedRefs=False, BackendNotFound)", b.name),
            );
        }
        let no_such_port = backend_lacks_port(registry, &host, port);
        if no_such_port {
            self.warn(
                line,
                format!("backend Service {bns}/{} has no port {port}: its share of requests answers 500 (ResolvedRefs=False, BackendNotFound)", b.name),
            );
        }
        let mut headers = HeaderPolicy::default();
        for f in &b.filters {
            let fl = f.referenced.line();
            match self.filter(fl, &f.value, registry) {
                Filter::RequestHeaders(ops) => headers.request = ops,
                Filter::ResponseHeaders(ops) => headers.response = ops,
                Filter::Unsupported => return None,
                _ => self.warn(fl, "this filter type under backendRefs is not applied by proxy-daemon (only header modifiers are)"),
            }
        }
        Some(WeightedDestination {
            destination: DestinationRef {
                // No host: the request meets no Service and answers 500 (as for a
                // backend that does not exist).
                host: if b.object().is_service() && !no_such_port {
                    host
                } else {
                    String::new()
                },
                subset: None,
                port: Some(port),
            },
            weight: weight as u32,
            headers,
        })
    }

    fn header_modifier(&mut self, line: u64, m: &gw::HeaderModifier) -> HeaderOps {
        let mut names = std::collections::BTreeSet::new();
        for h in m.set.iter().chain(&m.add) {
            self.header_name(line, &h.name);
            if !names.insert(h.name.to_ascii_lowercase()) {
                self.err(line, format!("header {} is set or added twice", h.name));
            }
        }
        for n in &m.remove {
            self.header_name(line, n);
        }
        HeaderOps {
            set: m
                .set
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect(),
            add: m
                .add
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect(),
            remove: m.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
        }
    }

    fn header_name(&mut self, line: u64, name: &str) {
        if name.is_empty()
            || name.len() > 256
            || http::HeaderName::from_bytes(name.as_bytes()).is_err()
        {
            self.err(line, format!("{name:?} is not a valid header name"));
        }
    }

    fn filter(&mut self, line: u64, f: &HttpRouteFilter, registry: &Registry) -> Filter {
        // (type, its field, whether the field is set): the CRD's CEL rules pair them.
        let set = [
            (
                "RequestHeaderModifier",
                "requestHeaderModifier",
                f.request_header_modifier.is_some(),
            ),
            (
                "ResponseHeaderModifier",
                "responseHeaderModifier",
                f.response_header_modifier.is_some(),
            ),
            ("RequestMirror", "requestMirror", f.request_mirror.is_some()),
            (
                "RequestRedirect",
                "requestRedirect",
                f.request_redirect.is_some(),
            ),
            ("URLRewrite", "urlRewrite", f.url_rewrite.is_some()),
            ("ExtensionRef", "extensionRef", f.extension_ref.is_some()),
            ("CORS", "cors", f.cors.is_some()),
        ];
        if !set.iter().any(|(t, _, _)| *t == f.filter_type) {
            self.err(line, format!("filter type {:?} is not one of RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, RequestRedirect, URLRewrite, ExtensionRef, CORS", f.filter_type));
            return Filter::Unsupported;
        }
        for (t, field, present) in set {
            if present && t != f.filter_type {
                self.err(
                    line,
                    format!("filter.{field} must be nil if the filter.type is not {t}"),
                );
            }
            if !present && t == f.filter_type {
                self.err(
                    line,
                    format!("filter.{field} must be specified for {t} filter.type"),
                );
                return Filter::Unsupported;
            }
        }
        match f.filter_type.as_str() {
            "RequestHeaderModifier" => Filter::RequestHeaders(self.header_modifier(
                line,
                f.request_header_modifier.as_ref().expect("checked present"),
            )),
            "ResponseHeaderModifier" => Filter::ResponseHeaders(
                self.header_modifier(
                    line,
                    f.response_header_modifier
                        .as_ref()
                        .expect("checked present"),
                ),
            ),
            "RequestMirror" => {
                let m = f.request_mirror.as_ref().expect("checked present");
                let percent = match (m.percent, &m.fraction) {
                    (Some(_), Some(_)) => {
                        self.err(line, "Only one of percent or fraction may be specified in HTTPRequestMirrorFilter");
                        100.0
                    }
                    (Some(p), None) if p <= 100 => p as f64,
                    (Some(p), None) => {
                        self.err(line, format!("requestMirror.percent {p} is above 100"));
                        100.0
                    }
                    (None, Some(fr)) => {
                        let d = fr.denominator.unwrap_or(100);
                        if d == 0 || fr.numerator > d {
                            self.err(line, "numerator must be less than or equal to denominator");
                            100.0
                        } else {
                            fr.numerator as f64 * 100.0 / d as f64
                        }
                    }
                    (None, None) => 100.0,
                };
                let b = &m.backend_ref;
                let Some(port) = b.port.filter(|_| b.is_service()) else {
                    self.err(
                        line,
                        "requestMirror.backendRef: Must have port for Service reference",
                    );
                    return Filter::Unsupported;
                };
                let bns = b
                    .namespace
                    .clone()
                    .unwrap_or_else(|| self.o.object_ref.namespace.clone());
                let host = format!(
                    "{}.{bns}.{}",
                    b.name,
                    crate::state::registry::CLUSTER_DOMAIN
                );
                if !registry.contains_host(&host) {
                    self.warn(line, format!("mirror backend Service {bns}/{} does not exist: nothing is mirrored until it does", b.name));
                }
                Filter::Mirror(MirrorPolicy {
                    destination: DestinationRef {
                        host,
                        subset: None,
                        port: Some(port),
                    },
                    percent,
                })
            }
            "RequestRedirect" => {
                let r = f.request_redirect.as_ref().expect("checked present");
                let code = r.status_code.unwrap_or(302);
                if ![301, 302, 303, 307, 308].contains(&code) {
                    self.err(line, format!("requestRedirect.statusCode {code} is not one of 301, 302, 303, 307, 308"));
                }
                if let Some(s) = &r.scheme {
                    if s != "http" && s != "https" {
                        self.err(
                            line,
                            format!("requestRedirect.scheme {s:?} is not http or https"),
                        );
                    }
                }
                Filter::Redirect(HttpAction::GatewayRedirect {
                    scheme: r.scheme.clone(),
                    hostname: r.hostname.clone(),
                    port: r.port,
                    path: r.path.as_ref().and_then(|p| self.path_modifier(line, p)),
                    code,
                })
            }
            "URLRewrite" => {
                let r = f.url_rewrite.as_ref().expect("checked present");
                Filter::Rewrite(
                    r.hostname.clone(),
                    r.path.as_ref().and_then(|p| self.path_modifier(line, p)),
                )
            }
            other => {
                self.warn(line, format!("filter {other} is not supported by proxy-daemon: the route is not accepted (Accepted=False, UnsupportedValue)"));
                Filter::Unsupported
            }
        }
    }

    fn path_modifier(&mut self, line: u64, p: &gw::PathModifier) -> Option<PathModifier> {
        match (
            p.modifier_type,
            &p.replace_full_path,
            &p.replace_prefix_match,
        ) {
            (gw::PathModifierType::ReplaceFullPath, Some(f), None) => {
                Some(PathModifier::ReplaceFullPath(f.clone()))
            }
            (gw::PathModifierType::ReplacePrefixMatch, None, Some(r)) => {
                Some(PathModifier::ReplacePrefixMatch(r.clone()))
            }
            (gw::PathModifierType::ReplaceFullPath, _, _) => {
                self.err(line, "replaceFullPath must be specified when type is set to 'ReplaceFullPath' (and replacePrefixMatch must not)");
                None
            }
            (gw::PathModifierType::ReplacePrefixMatch, _, _) => {
                self.err(line, "replacePrefixMatch must be specified when type is set to 'ReplacePrefixMatch' (and replaceFullPath must not)");
                None
            }
        }
    }

    fn value_matchers(
        &mut self,
        line: u64,
        list: &[gw::ValueMatch],
        what: &str,
        lower: bool,
    ) -> Vec<(String, Matcher)> {
        let mut names = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for m in list {
            if what == "headers" {
                self.header_name(line, &m.name);
            }
            let name = if lower {
                m.name.to_ascii_lowercase()
            } else {
                m.name.clone()
            };
            if !names.insert(name.clone()) {
                // The API server keeps one entry per name (listMapKeys); the first wins.
                self.warn(
                    line,
                    format!(
                        "{what}: {} is matched twice; only the first applies",
                        m.name
                    ),
                );
                continue;
            }
            let matcher = match m.match_type {
                gw::ValueMatchType::Exact => Some(Matcher::Exact(m.value.clone())),
                gw::ValueMatchType::RegularExpression => self.regex(line, &m.value, what),
            };
            if let Some(mm) = matcher {
                out.push((name, mm));
            }
        }
        out
    }

    fn path_matcher(&mut self, line: u64, p: &Option<gw::PathMatch>) -> (Matcher, PrecedencePath) {
        let (t, v) = match p {
            Some(p) => (p.match_type, p.value.clone().unwrap_or_else(|| "/".into())),
            None => (PathMatchType::PathPrefix, "/".into()),
        };
        if t != PathMatchType::RegularExpression {
            const BAD: [&str; 6] = ["//", "/./", "/../", "%2f", "%2F", "#"];
            if !v.starts_with('/') {
                self.err(line, "path: value must be an absolute path and start with '/' when type one of ['Exact', 'PathPrefix']");
            }
            if let Some(b) = BAD.iter().find(|b| v.contains(**b)) {
                self.err(
                    line,
                    format!(
                        "path: must not contain '{b}' when type one of ['Exact', 'PathPrefix']"
                    ),
                );
            }
            if v.ends_with("/..") || v.ends_with("/.") {
                self.err(line, "path: must not end with '/..' or '/.' when type one of ['Exact', 'PathPrefix']");
            }
        }
        match t {
            PathMatchType::Exact => (Matcher::Exact(v.clone()), (0, v.len())),
            PathMatchType::PathPrefix => (
                Matcher::PathPrefix(v.trim_end_matches('/').to_string()),
                (1, v.trim_end_matches('/').len()),
            ),
            PathMatchType::RegularExpression => (
                self.regex(line, &v, "path")
                    .unwrap_or(Matcher::Exact(String::new())),
                (2, v.len()),
            ),
        }
    }
}

type PrecedencePath = (u8, usize);

enum Filter {
    RequestHeaders(HeaderOps),
    ResponseHeaders(HeaderOps),
    Mirror(MirrorPolicy),
    Redirect(HttpAction),
    Rewrite(Option<String>, Option<PathModifier>),
    Unsupported,
}

/// What a rule's filters add up to.
#[derive(Default)]
struct RuleFilters {
    headers: HeaderPolicy,
    mirrors: Vec<MirrorPolicy>,
    redirect: Option<HttpAction>,
    rewrite_authority: Option<String>,
    rewrite_path: Option<PathModifier>,
    unsupported: bool,
}

fn rule_filters(
    cx: &mut Ctx,
    filters: &[Spanned<HttpRouteFilter>],
    registry: &Registry,
    grpc: bool,
) -> RuleFilters {
    let mut out = RuleFilters::default();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for f in filters {
        let line = f.referenced.line();
        let t = f.value.filter_type.clone();
        *counts.entry(t.clone()).or_default() += 1;
        if counts[&t] > 1 && t != "RequestMirror" && t != "ExtensionRef" {
            cx.err(line, format!("{t} filter cannot be repeated"));
        }
        if grpc && (t == "RequestRedirect" || t == "URLRewrite" || t == "CORS") {
            cx.err(line, format!("filter type {t:?} is not one of GRPCRoute's (RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, ExtensionRef)"));
            continue;
        }
        match cx.filter(line, &f.value, registry) {
            Filter::RequestHeaders(ops) => out.headers.request = ops,
            Filter::ResponseHeaders(ops) => out.headers.response = ops,
            Filter::Mirror(m) => out.mirrors.push(m),
            Filter::Redirect(r) => out.redirect = Some(r),
            Filter::Rewrite(h, p) => {
                out.rewrite_authority = h;
                out.rewrite_path = p;
            }
            Filter::Unsupported => out.unsupported = true,
        }
    }
    if counts.contains_key("RequestRedirect") && counts.contains_key("URLRewrite") {
        let line = filters.first().map(|f| f.referenced.line()).unwrap_or(0);
        cx.err(line, "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both");
    }
    out
}

/// A rule's action: a redirect, its backends, or 500 when it has none (the spec: a rule
/// whose backends all fail to resolve, or that has none, answers 500).
fn action_of(redirect: Option<HttpAction>, destinations: Vec<WeightedDestination>) -> HttpAction {
    match redirect {
        Some(r) => r,
        None if destinations.is_empty() => HttpAction::DirectResponse {
            status: 500,
            body: None,
        },
        None => HttpAction::Route { destinations },
    }
}

fn compile_http_route(
    cx: &mut Ctx,
    spec: &gw::HttpRouteSpec,
    registry: &Registry,
) -> Option<CompiledRoute> {
    let parents = cx.parents(&spec.parent_refs, registry);
    let default_rules;
    let rules: &[Spanned<gw::HttpRouteRule>] = match &spec.rules {
        Some(r) => r,
        None => {
            default_rules = Vec::new();
            &default_rules
        }
    };
    if rules.len() > 16 {
        cx.err(
            0,
            format!("spec.rules: {} rules, at most 16 are allowed", rules.len()),
        );
    }
    let total: usize = rules
        .iter()
        .map(|r| r.value.matches.as_ref().map_or(1, Vec::len))
        .sum();
    if total >= 128 {
        cx.err(0, "While 16 rules and 64 matches per rule are allowed, the total number of matches across all rules in a route must be less than 128");
    }
    let mut out_rules = Vec::new();
    let mut accepted = true;
    let object = cx.o.object_ref.to_string();
    if spec.rules.is_none() {
        // The CRD's default: every request, no backend.
        let rule = HttpRule::gateway(
            RouteApi::HttpRoute,
            None,
            vec![HttpMatch {
                uri: Some(Matcher::PathPrefix(String::new())),
                ..Default::default()
            }],
            action_of(None, Vec::new()),
            cx.source(0),
        );
        out_rules.push((
            Arc::new(rule),
            vec![(1, Reverse(0), 1, Reverse(0), Reverse(0))],
        ));
    }
    for rule in rules {
        let line = rule.referenced.line();
        let r = &rule.value;
        if r.session_persistence.is_some() {
            cx.warn(line, "sessionPersistence (experimental) is not supported by proxy-daemon: the route is not accepted");
            accepted = false;
        }
        let default_match = [Spanned {
            value: gw::HttpRouteMatch::default(),
            referenced: rule.referenced,
            defined: rule.defined,
        }];
        let matches: &[Spanned<gw::HttpRouteMatch>] = match &r.matches {
            Some(m) if !m.is_empty() => m,
            _ => &default_match,
        };
        if matches.len() > 64 {
            cx.err(
                line,
                format!(
                    "rules.matches: {} matches, at most 64 are allowed",
                    matches.len()
                ),
            );
        }
        let mut hms = Vec::new();
        let mut keys = Vec::new();
        let mut prefix_count = 0;
        for m in matches {
            let ml = m.referenced.line();
            let mv = &m.value;
            let (uri, (path_rank, path_len)) = cx.path_matcher(ml, &mv.path);
            if matches!(uri, Matcher::PathPrefix(_)) {
                prefix_count += 1;
            }
            if let Some(method) = &mv.method {
                if ![
                    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
                ]
                .contains(&method.as_str())
                {
                    cx.err(ml, format!("method {method:?} is not one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH"));
                }
            }
            let headers = cx.value_matchers(ml, &mv.headers, "headers", true);
            let query_params = cx.value_matchers(ml, &mv.query_params, "queryParams", false);
            keys.push((
                path_rank,
                Reverse(path_len),
                if mv.method.is_some() { 0 } else { 1 },
                Reverse(headers.len()),
                Reverse(query_params.len()),
            ));
            hms.push(HttpMatch {
                uri: Some(uri),
                method: mv.method.clone().map(Matcher::Exact),
                headers,
                query_params,
                ..Default::default()
            });
        }
        let f = rule_filters(cx, &r.filters, registry, false);
        accepted &= !f.unsupported;
        let prefix_rewrite = matches!(&f.rewrite_path, Some(PathModifier::ReplacePrefixMatch(_)))
            || matches!(
                &f.redirect,
                Some(HttpAction::GatewayRedirect {
                    path: Some(PathModifier::ReplacePrefixMatch(_)),
                    ..
                })
            );
        if prefix_rewrite && (matches.len() != 1 || prefix_count != 1) {
            cx.err(line, "When using a RequestRedirect or URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified");
        }
        if f.redirect.is_some() && !r.backend_refs.is_empty() {
            cx.err(
                line,
                "RequestRedirect filter must not be used together with backendRefs",
            );
        }
        let destinations: Vec<_> = r
            .backend_refs
            .iter()
            .filter_map(|b| cx.backend(b.referenced.line(), &b.value, registry))
            .collect();
        let (timeout, retries) = timeouts_and_retry(cx, r);
        let mut compiled = HttpRule::gateway(
            RouteApi::HttpRoute,
            r.name.clone(),
            hms,
            action_of(f.redirect, destinations),
            cx.source(line),
        );
        compiled.headers = f.headers;
        compiled.mirrors = f.mirrors;
        compiled.rewrite_authority = f.rewrite_authority;
        compiled.path_rewrite = f.rewrite_path;
        compiled.timeout = timeout;
        compiled.retries = retries;
        out_rules.push((Arc::new(compiled), keys));
    }
    let ns = cx.o.object_ref.namespace.clone();
    Some(CompiledRoute {
        api: RouteApi::HttpRoute,
        object,
        name: cx.o.object_ref.name.clone(),
        unsupported: (!accepted).then(|| "the route uses a feature proxy-daemon does not carry out (see the warnings at its lines)".to_string()),
        unresolved: unresolved(rules.iter().flat_map(|r| &r.value.backend_refs).map(|b| &b.value), &ns, registry),
        namespace: ns,
        order: CreationOrder::of(cx.o, 0),
        parents,
        rules: out_rules,
    })
}

/// `timeouts.request` is the route's timeout; `timeouts.backendRequest` each try's (Istio
/// maps them the same way); the experimental `retry` sets attempts and status codes.
fn timeouts_and_retry(
    cx: &mut Ctx,
    r: &gw::HttpRouteRule,
) -> (Option<Duration>, Option<RetryPolicy>) {
    let parse = |cx: &mut Ctx, v: &Option<String>, line: u64, what: &str| -> Option<Duration> {
        let v = v.as_ref()?;
        let ok = regex::Regex::new(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
            .map(|re| re.is_match(v))
            .unwrap_or(false);
        if !ok {
            cx.err(
                line,
                format!(
                    "timeouts.{what} {v:?} is not a Gateway API duration (e.g. 10s, 1m30s, 500ms)"
                ),
            );
            return None;
        }
        duration::parse(v).ok()
    };
    let (mut timeout, mut per_try) = (None, None);
    if let Some(t) = &r.timeouts {
        let line = t.referenced.line();
        timeout = parse(cx, &t.value.request, line, "request");
        per_try = parse(cx, &t.value.backend_request, line, "backendRequest");
        if let (Some(req), Some(b)) = (timeout, per_try) {
            if !req.is_zero() && b > req {
                cx.err(
                    line,
                    "backendRequest timeout cannot be longer than request timeout",
                );
            }
        }
    }
    let mut retries = per_try.filter(|d| !d.is_zero()).map(|d| RetryPolicy {
        attempts: 2,
        per_try_timeout: Some(d),
        retry_on: ISTIO_DEFAULT_RETRY_ON
            .iter()
            .map(|s| s.to_string())
            .collect(),
    });
    if let Some(rt) = &r.retry {
        let line = rt.referenced.line();
        cx.note(line, "retry is in the Gateway API's experimental channel; proxy-daemon applies attempts and codes (backoff is Envoy's default)");
        let mut on: Vec<String> = vec!["connect-failure".into(), "refused-stream".into()];
        if !rt.value.codes.is_empty() {
            on.push("retriable-status-codes".into());
        }
        for c in &rt.value.codes {
            if !(400..=599).contains(c) {
                cx.err(
                    line,
                    format!("retry.codes: {c} is not an HTTP error status"),
                );
            }
            on.push(c.to_string());
        }
        retries = Some(RetryPolicy {
            attempts: rt.value.attempts.unwrap_or(2),
            per_try_timeout: per_try.filter(|d| !d.is_zero()),
            retry_on: on,
        });
    }
    (timeout.filter(|d| !d.is_zero()), retries)
}

fn compile_grpc_route(
    cx: &mut Ctx,
    spec: &gw::GrpcRouteSpec,
    registry: &Registry,
) -> Option<CompiledRoute> {
    let parents = cx.parents(&spec.parent_refs, registry);
    if spec.rules.len() > 16 {
        cx.err(
            0,
            format!(
                "spec.rules: {} rules, at most 16 are allowed",
                spec.rules.len()
            ),
        );
    }
    let object = cx.o.object_ref.to_string();
    let mut accepted = true;
    let mut out_rules = Vec::new();
    for rule in &spec.rules {
        let line = rule.referenced.line();
        let r = &rule.value;
        let mut hms = Vec::new();
        let mut keys = Vec::new();
        let all = [Spanned {
            value: gw::GrpcRouteMatch::default(),
            referenced: rule.referenced,
            defined: rule.defined,
        }];
        let matches: &[Spanned<gw::GrpcRouteMatch>] = if r.matches.is_empty() {
            &all
        } else {
            &r.matches
        };
        for m in matches {
            let ml = m.referenced.line();
            let (uri, service_len, method_len) = match &m.value.method {
                None => (Matcher::Prefix("/".into()), 0, 0),
                Some(gm) => grpc_method(cx, ml, gm),
            };
            let headers = cx.value_matchers(ml, &m.value.headers, "headers", true);
            keys.push((
                0,
                Reverse(service_len),
                0,
                Reverse(method_len),
                Reverse(headers.len()),
            ));
            hms.push(HttpMatch {
                uri: Some(uri),
                headers,
                ..Default::default()
            });
        }
        let f = rule_filters(cx, &r.filters, registry, true);
        accepted &= !f.unsupported;
        if r.session_persistence.is_some() {
            cx.warn(line, "sessionPersistence (experimental) is not supported by proxy-daemon: the route is not accepted");
            accepted = false;
        }
        let destinations: Vec<_> = r
            .backend_refs
            .iter()
            .filter_map(|b| cx.backend(b.referenced.line(), &b.value, registry))
            .collect();
        let mut compiled = HttpRule::gateway(
            RouteApi::GrpcRoute,
            r.name.clone(),
            hms,
            action_of(None, destinations),
            cx.source(line),
        );
        compiled.headers = f.headers;
        compiled.mirrors = f.mirrors;
        out_rules.push((Arc::new(compiled), keys));
    }
    let ns = cx.o.object_ref.namespace.clone();
    Some(CompiledRoute {
        api: RouteApi::GrpcRoute,
        object,
        name: cx.o.object_ref.name.clone(),
        unsupported: (!accepted).then(|| "the route uses a feature proxy-daemon does not carry out (see the warnings at its lines)".to_string()),
        unresolved: unresolved(spec.rules.iter().flat_map(|r| &r.value.backend_refs).map(|b| &b.value), &ns, registry),
        namespace: ns,
        order: CreationOrder::of(cx.o, 0),
        parents,
        rules: out_rules,
    })
}

/// A gRPC method match as a path matcher on `/service/method`, with the lengths the
/// precedence counts.
fn grpc_method(cx: &mut Ctx, line: u64, gm: &gw::GrpcMethodMatch) -> (Matcher, usize, usize) {
    let (s, m) = (gm.service.as_deref(), gm.method.as_deref());
    if s.is_none() && m.is_none() {
        cx.err(
            line,
            "One or both of 'service' or 'method' must be specified",
        );
    }
    let slen = s.map_or(0, str::len);
    let mlen = m.map_or(0, str::len);
    match gm.match_type {
        gw::ValueMatchType::Exact => {
            let service_ok = regex::Regex::new(r"(?i)^\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$")
                .map(|re| s.is_none_or(|s| re.is_match(s)))
                .unwrap_or(true);
            let method_ok = regex::Regex::new(r"^[A-Za-z_][A-Za-z_0-9]*$")
                .map(|re| m.is_none_or(|m| re.is_match(m)))
                .unwrap_or(true);
            if !service_ok {
                cx.err(line, "service must only contain valid characters (matching ^(?i)\\.?[a-z_][a-z_0-9]*(\\.[a-z_][a-z_0-9]*)*$)");
            }
            if !method_ok {
                cx.err(
                    line,
                    "method must only contain valid characters (matching ^[A-Za-z_][A-Za-z_0-9]*$)",
                );
            }
            let matcher = match (s, m) {
                (Some(s), Some(m)) => Matcher::Exact(format!("/{s}/{m}")),
                (Some(s), None) => Matcher::Prefix(format!("/{s}/")),
                (None, Some(m)) => cx
                    .regex(line, &format!("/[^/]+/{}", regex::escape(m)), "method")
                    .unwrap_or(Matcher::Exact(String::new())),
                (None, None) => Matcher::Prefix("/".into()),
            };
            (matcher, slen, mlen)
        }
        gw::ValueMatchType::RegularExpression => {
            let pattern = format!("/{}/{}", s.unwrap_or("[^/]+"), m.unwrap_or("[^/]+"));
            (
                cx.regex(line, &pattern, "method")
                    .unwrap_or(Matcher::Exact(String::new())),
                slen,
                mlen,
            )
        }
    }
}
