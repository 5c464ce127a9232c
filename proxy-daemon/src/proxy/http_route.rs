//! Where one HTTP request goes: Host → service, EnvoyFilter route overrides, the first
//! matching VirtualService rule (evaluated against the real source pod), weighted
//! destinations, subsets, rewrites, redirects and direct responses.
use std::{net::SocketAddr, time::Duration};

use http::HeaderMap;

use std::sync::Arc;

use super::route::{endpoint_for, is_dns, labels_for, pick_weighted, tls_of, upstream_tls};
use crate::state::routes::{ConnectionPool, HashKey, LoadBalancer};
use crate::{
    metrics::{unnamed_service, DestinationLabels, BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER},
    state::registry::{PortInfo, ServiceInfo, CLUSTER_DOMAIN},
    state::routes::{
        selects, virtual_service_wins, ClusterRef, HeaderOps, HttpAction, HttpMatch, HttpRule,
        Matcher, PathModifier, RoutePatch,
    },
    state::workload::{WorkloadInfo, UNKNOWN},
    state::Snapshot,
};
use crate::{proxy::tls::UpstreamTls, proxy::Endpoints};

/// The parts of a request routing looks at.
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Host header (or :authority) as sent, port included.
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    /// Original destination.
    pub dst: std::net::SocketAddrV4,
    /// Endpoints earlier attempts of this request went to (a retry prefers others).
    pub avoid: &'a [SocketAddr],
    /// The source workload, whose view of endpoint health applies.
    pub scope: &'a crate::proxy::outlier::Scope,
}

#[derive(Debug, Clone, Default)]
pub struct RequestEdits {
    pub headers: Vec<HeaderOps>,
    /// (matched prefix, replacement): Istio replaces the matched prefix, or the whole path.
    pub rewrite_uri: Option<(Option<String>, String)>,
    pub rewrite_authority: Option<String>,
    /// Envoy's request_headers_to_add, each with its append action.
    pub add_headers: Vec<crate::state::routes::AddedHeader>,
}

/// Retries as Envoy applies them to one route.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Retries after the first try (Istio's `attempts`).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: Vec<String>,
}

/// How one upstream attempt ended, as a retry policy judges it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttemptOutcome {
    /// The response status; None when the attempt failed before a response.
    pub status: Option<u16>,
    /// `grpc-status` in the response headers (a trailers-only gRPC answer).
    pub grpc_status: Option<u16>,
    /// The response carried `x-envoy-ratelimited`.
    pub rate_limited: bool,
    /// The upstream refused the h2 stream (REFUSED_STREAM) before processing it.
    pub refused_stream: bool,
}

impl Retry {
    /// Istio's policy for routes that set none: 2 retries on connect failures, refused
    /// streams, unavailable/cancelled gRPC and 503.
    pub fn istio_default() -> Self {
        Retry {
            attempts: 2,
            per_try_timeout: None,
            on: crate::state::routes::ISTIO_DEFAULT_RETRY_ON
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }

    fn from_rule(r: &Option<crate::state::routes::RetryPolicy>) -> Self {
        match r {
            None => Self::istio_default(),
            Some(p) => Retry {
                attempts: p.attempts,
                per_try_timeout: p.per_try_timeout,
                on: p.retry_on.clone(),
            },
        }
    }

    /// Whether an attempt that ended with `outcome` (with Envoy flag `flags` when it
    /// failed before a response) should be retried, by Envoy's `retry_on` conditions.
    pub fn should_retry(&self, outcome: &AttemptOutcome, flags: &str) -> bool {
        let has = |c: &str| self.on.iter().any(|o| o == c);
        // gRPC status codes by name (Envoy's x-envoy-retry-grpc-on).
        let grpc = |code: u16| match code {
            1 => has("cancelled"),
            4 => has("deadline-exceeded"),
            8 => has("resource-exhausted"),
            13 => has("internal"),
            14 => has("unavailable"),
            _ => false,
        };
        match outcome.status {
            None => {
                (outcome.refused_stream && (has("refused-stream") || has("5xx")))
                    || (flags == "UF"
                        && (has("connect-failure") || has("5xx") || has("gateway-error")))
                    || (flags == "UC" && (has("reset") || has("5xx") || has("gateway-error")))
                    || (flags == "UT" && (has("5xx") || has("gateway-error")))
            }
            Some(code) => {
                (has("5xx") && code >= 500)
                    || (has("gateway-error") && matches!(code, 502..=504))
                    || (has("retriable-4xx") && code == 409)
                    || (has("envoy-ratelimited") && outcome.rate_limited)
                    || outcome.grpc_status.is_some_and(grpc)
                    // Numeric entries are the retriable status codes (Istio writes them
                    // into Envoy's retriable_status_codes with `retriable-status-codes`).
                    || self.on.iter().any(|o| o.parse::<u16>().ok() == Some(code))
            }
        }
    }
}

// One per request attempt, moved and matched once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum HttpDecision {
    Forward {
        upstream: SocketAddr,
        /// The protocol to speak to `upstream`.
        protocol: UpstreamProtocol,
        /// The destination cluster's connectionPool (its DestinationRule at the port and
        /// subset routed to), if any.
        pool: Option<ConnectionPool>,
        /// The cluster `upstream` was chosen from (outlier detection counts it there);
        /// None for the address the app dialled (passthrough, resolution NONE).
        cluster: Option<crate::proxy::outlier::ClusterKey>,
        /// TLS to originate (DestinationRule `tls`), if any.
        tls: Option<Arc<UpstreamTls>>,
        labels: DestinationLabels,
        edits: RequestEdits,
        response_headers: Vec<HeaderOps>,
        timeout: Option<Duration>,
        retry: Retry,
        fault: Option<crate::state::routes::Fault>,
        /// Shadow copies to send: (destination, percent, the rule's source for metrics).
        mirrors: Vec<(crate::state::routes::DestinationRef, f64)>,
        route: String,
    },
    Respond {
        status: u16,
        body: bytes::Bytes,
        location: Option<String>,
        labels: DestinationLabels,
        flags: &'static str,
    },
}

fn host_only(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((h, p))
            if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(']') || h.starts_with('[') =>
        {
            h
        }
        _ => authority,
    }
}

/// The service a Host names, the ways a sidecar accepts it: `reviews`, `reviews.ns`,
/// `reviews.ns.svc`, the FQDN, a ServiceEntry host; else the original destination's.
fn service_for<'a>(
    snap: &'a Snapshot,
    host: &str,
    src: &WorkloadInfo,
    dst: std::net::SocketAddrV4,
) -> Option<&'a ServiceInfo> {
    let src_ns = src.namespace.as_str();
    let host = host.to_ascii_lowercase();
    let dots = host.matches('.').count();
    let candidates = [
        host.clone(),
        if dots == 0 {
            format!("{host}.{src_ns}.{CLUSTER_DOMAIN}")
        } else {
            String::new()
        },
        if dots == 1 {
            format!("{host}.{CLUSTER_DOMAIN}")
        } else {
            String::new()
        },
        if host.ends_with(".svc") {
            format!("{host}.cluster.local")
        } else {
            String::new()
        },
    ];
    candidates
        .iter()
        .filter(|c| !c.is_empty())
        .find_map(|c| snap.registry.by_host(c, &src.namespace))
        .or_else(|| snap.registry.by_addr(SocketAddr::V4(dst), &src.namespace))
        // A service the client does not see (exportTo, Sidecar egress hosts) is not in
        // its registry.
        .filter(|s| super::route::sees_service(snap, src, s))
}

fn matcher_ok(m: &Option<Matcher>, value: Option<&str>, ignore_case: bool) -> bool {
    match (m, value) {
        (None, _) => true,
        (Some(m), Some(v)) => m.matches(v, ignore_case),
        (Some(_), None) => false,
    }
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// Does one `match` block accept the request (all its conditions hold)?
pub fn matches(m: &HttpMatch, req: &RequestView, src: &WorkloadInfo) -> bool {
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    matcher_ok(&m.uri, Some(req.path), m.ignore_uri_case)
        && matcher_ok(&m.method, Some(req.method), false)
        && matcher_ok(&m.scheme, Some("http"), false)
        && matcher_ok(&m.authority, Some(req.authority), false)
        && m.headers
            .iter()
            .all(|(k, mm)| header(k).is_some_and(|v| mm.matches(v, false)))
        && m.without_headers
            .iter()
            .all(|(k, mm)| !header(k).is_some_and(|v| mm.matches(v, false)))
        && m.query_params
            .iter()
            .all(|(k, mm)| query_param(req.query, k).is_some_and(|v| mm.matches(v, false)))
        && m.port.is_none_or(|p| p == req.dst.port() as u32)
        && selects(&m.source_labels, &src.labels)
        && m.source_namespace
            .as_ref()
            .is_none_or(|n| *n == src.namespace)
}

fn first_rule<'a>(
    mut rules: impl Iterator<Item = &'a HttpRule>,
    req: &RequestView,
    src: &WorkloadInfo,
) -> Option<(&'a HttpRule, Option<&'a HttpMatch>)> {
    rules.find_map(|r| {
        if r.matches.is_empty() {
            return Some((r, None));
        }
        r.matches
            .iter()
            .find(|m| matches(m, req, src))
            .map(|m| (r, Some(m)))
    })
}

fn passthrough_labels(req: &RequestView) -> DestinationLabels {
    DestinationLabels {
        service: unnamed_service(Some(host_only(req.authority)), SocketAddr::V4(req.dst)),
        service_name: PASSTHROUGH_CLUSTER.into(),
        service_namespace: UNKNOWN.into(),
    }
}

/// What an EnvoyFilter chain says about this request's route, if anything.
struct Override {
    cluster: Option<ClusterRef>,
    add_headers: Vec<crate::state::routes::AddedHeader>,
    timeout: Option<Duration>,
}

/// Applies the workload's EnvoyFilter patches for the outbound port, in order. An added
/// virtual host with an exact domain wins over generated ones; a MERGE changes every route
/// that exists when it is applied (so it does not reach virtual hosts added after it).
fn envoy_filter_override(
    snap: &Snapshot,
    src: &WorkloadInfo,
    req: &RequestView,
) -> Option<Override> {
    let port = req.dst.port() as u32;
    let host = host_only(req.authority).to_ascii_lowercase();
    let authority = req.authority.to_ascii_lowercase();
    let patches: Vec<_> = snap
        .routes
        .envoy_filters_for(&src.namespace, &src.labels)
        .flat_map(|f| f.patches.iter())
        .filter(|p| p.port.is_none_or(|pp| pp == port))
        .collect();
    if patches.is_empty() {
        return None;
    }
    // Which virtual host serves the request: the index of the ADD patch, or None (generated).
    let added = patches.iter().position(|p| match &p.patch {
        RoutePatch::AddVirtualHost { domains, .. } => {
            domains.iter().any(|d| *d == host || *d == authority)
        }
        _ => false,
    });
    let mut ov = Override {
        cluster: None,
        add_headers: Vec::new(),
        timeout: None,
    };
    if let Some(i) = added {
        if let RoutePatch::AddVirtualHost { routes, .. } = &patches[i].patch {
            let route = routes.iter().find(|r| r.matcher.matches(req.path, false));
            ov.cluster = route.map(|r| r.cluster.clone());
            if let Some(r) = route {
                ov.timeout = r.timeout;
                ov.add_headers
                    .extend(r.request_headers_to_add.iter().cloned());
            }
            if ov.cluster.is_none() {
                // No route of the added virtual host matches: Envoy answers 404.
                ov.cluster = Some(ClusterRef::BlackHole);
            }
        }
    }
    // Istio patches the generated virtual hosts' routes first and appends added virtual
    // hosts after: an HTTP_ROUTE MERGE never reaches a route of an added one.
    let merges: &[&crate::state::routes::PortPatch] = if added.is_some() { &[] } else { &patches };
    let mut touched = added.is_some();
    for p in merges {
        if let RoutePatch::MergeHttpRoute {
            cluster,
            request_headers_to_add,
            timeout,
        } = &p.patch
        {
            touched = true;
            if cluster.is_some() {
                ov.cluster = cluster.clone();
            }
            ov.add_headers
                .extend(request_headers_to_add.iter().cloned());
            if timeout.is_some() {
                ov.timeout = *timeout;
            }
        }
    }
    touched.then_some(ov)
}

pub fn decide(
    snap: &Snapshot,
    eps: &Endpoints,
    src: &WorkloadInfo,
    req: &RequestView,
    policy: crate::proxy::OutboundPolicy,
    roll: u32,
) -> HttpDecision {
    let port = req.dst.port() as u32;
    let ov = envoy_filter_override(snap, src, req);
    let mut edits = RequestEdits::default();
    let mut timeout = None;
    if let Some(ov) = &ov {
        edits.add_headers = ov.add_headers.clone();
        timeout = ov.timeout;
        match &ov.cluster {
            Some(ClusterRef::Passthrough) => {
                return plain_forward(
                    (
                        SocketAddr::V4(req.dst),
                        UpstreamProtocol::AsClient,
                        None,
                        None,
                    ),
                    None,
                    passthrough_labels(req),
                    edits,
                    Vec::new(),
                    timeout,
                )
            }
            Some(ClusterRef::BlackHole) => {
                return HttpDecision::Respond {
                    status: 404,
                    body: "route not found\n".into(),
                    location: None,
                    labels: DestinationLabels {
                        service: unnamed_service(
                            Some(host_only(req.authority)),
                            SocketAddr::V4(req.dst),
                        ),
                        service_name: BLACKHOLE_CLUSTER.into(),
                        service_namespace: UNKNOWN.into(),
                    },
                    flags: "NR",
                }
            }
            Some(ClusterRef::Service {
                port: cport,
                subset,
                host,
            }) => {
                let Some(target) = snap.registry.by_host(host, &src.namespace) else {
                    return no_route(req, "NR");
                };
                let labels = labels_for(target);
                let picked = pick(snap, eps, target, subset.as_deref(), *cport, src, req);
                return forward_picked(picked, labels, edits, timeout);
            }
            None => {}
        }
    }
    let ask = Ask {
        snap,
        eps,
        src,
        req,
        policy,
        roll,
    };
    if let Some(d) = mesh_route(&ask, &edits, timeout) {
        return d;
    }
    let Some(svc) = service_for(snap, host_only(req.authority), src, req.dst) else {
        if super::route::registry_only(snap, src, policy) {
            return blackhole(req);
        }
        return plain_forward(
            (
                SocketAddr::V4(req.dst),
                UpstreamProtocol::AsClient,
                None,
                None,
            ),
            None,
            passthrough_labels(req),
            edits,
            Vec::new(),
            timeout,
        );
    };
    let svc = frontend_bound(snap, src, req, svc);
    let vss: Vec<_> = super::route::client_virtual_services(snap, svc, src).collect();
    // The rules in order, borrowed from the snapshot (never cloned per request).
    let rules = || vss.iter().flat_map(|vs| vs.http.iter());
    if vss.is_empty() || rules().next().is_none() {
        // No VirtualService: the service itself, on the port dialled.
        let labels = labels_for(svc);
        if svc.endpoints.is_empty()
            && matches!(
                svc.kind,
                crate::state::registry::ServiceKind::ServiceEntry { .. }
            )
            && !is_dns(svc)
        {
            // resolution NONE: the address the app dialled (at the entry's targetPort), with
            // the entry's TLS policy; named by Host only, it must be where the entry points.
            if super::route::registry_only(snap, src, policy)
                && !super::route::dst_within(snap, svc, req.dst, &src.namespace)
            {
                return spoofed(req, svc);
            }
            let tls = upstream_tls(snap, svc, None, port, &src.namespace);
            let pool = snap
                .routes
                .destination_rule(&svc.hostname, &src.namespace, Some(&svc.namespace))
                .and_then(|dr| dr.effective(Some(port), None).connection_pool);
            return plain_forward(
                (
                    super::route::dialled_target(svc, req.dst),
                    UpstreamProtocol::of(svc.port(port), pool.as_ref()),
                    None,
                    pool,
                ),
                tls,
                labels,
                edits,
                Vec::new(),
                timeout,
            );
        }
        if unanswered_and_elsewhere(snap, eps, svc, src, policy, req) {
            return spoofed(req, svc);
        }
        let picked = pick(snap, eps, svc, None, port, src, req);
        return forward_picked(picked, labels, edits, timeout);
    }
    let Some((rule, matched)) = first_rule(rules(), req, src) else {
        return HttpDecision::Respond {
            status: 404,
            body: "no route matched\n".into(),
            location: None,
            labels: labels_for(svc),
            flags: "NR",
        };
    };
    apply_rule(&ask, svc, rule, matched, edits, timeout)
}

/// What every step of one request's routing reads.
struct Ask<'a, 'r> {
    snap: &'a Snapshot,
    eps: &'a Endpoints,
    src: &'a WorkloadInfo,
    req: &'a RequestView<'r>,
    policy: crate::proxy::OutboundPolicy,
    roll: u32,
}

/// The Gateway API routes bound to the Service port the app dialled — matched by its
/// ClusterIP and port, never by Host, and never for a pod's own address — unless a
/// VirtualService for that Service wins (Istio's order). A request no rule matches
/// answers 404.
fn mesh_route(ask: &Ask, edits: &RequestEdits, timeout: Option<Duration>) -> Option<HttpDecision> {
    let (snap, src, req) = (ask.snap, ask.src, ask.req);
    if snap.routes.mesh_routes.is_empty() {
        return None;
    }
    let svc = snap
        .registry
        .by_addr(SocketAddr::V4(req.dst), &src.namespace)
        .filter(|s| matches!(s.kind, crate::state::registry::ServiceKind::Kubernetes))?;
    let (group, consumer) =
        snap.routes
            .mesh_routes_for(&svc.hostname, req.dst.port() as u32, &src.namespace)?;
    let vs = super::route::client_virtual_services(snap, svc, src).find(|vs| !vs.http.is_empty());
    if vs.is_some_and(|vs| virtual_service_wins(vs, group, consumer, &src.namespace)) {
        return None;
    }
    let hit = group
        .entries
        .iter()
        .find(|e| matches(&e.rule.matches[e.match_index], req, src));
    let Some(e) = hit else {
        return Some(HttpDecision::Respond {
            status: 404,
            body: "no route matched\n".into(),
            location: None,
            labels: labels_for(svc),
            flags: "NR",
        });
    };
    let matched = Some(&e.rule.matches[e.match_index]);
    Some(apply_rule(
        ask,
        svc,
        &e.rule,
        matched,
        edits.clone(),
        timeout,
    ))
}

/// The Gateway API binds routes to a Service's frontend (MeshClusterIPMatching): a
/// request that dials one Service's ClusterIP with a Host naming another Service that has
/// routes is the dialled Service's traffic — a Host header never reaches another
/// Service's routes.
fn frontend_bound<'a>(
    snap: &'a Snapshot,
    src: &WorkloadInfo,
    req: &RequestView,
    named: &'a ServiceInfo,
) -> &'a ServiceInfo {
    if !snap.routes.mesh_routes.contains_key(&named.hostname) {
        return named;
    }
    snap.registry
        .by_addr(SocketAddr::V4(req.dst), &src.namespace)
        .filter(|d| matches!(d.kind, crate::state::registry::ServiceKind::Kubernetes))
        .unwrap_or(named)
}

/// The PathPrefix a request matched by, if it matched by one.
fn matched_prefix(matched: Option<&HttpMatch>) -> Option<&str> {
    match matched.and_then(|m| m.uri.as_ref()) {
        Some(Matcher::PathPrefix(p) | Matcher::Prefix(p)) => Some(p.as_str()),
        _ => None,
    }
}

/// The Gateway API's redirect `Location`: what the filter leaves unset comes from the
/// request (its Host without the port; the scheme's port when the scheme is set, else the
/// port dialled), and the default ports of http and https are left out.
fn gateway_location(
    req: &RequestView,
    redirect: (
        &Option<String>,
        &Option<String>,
        Option<u32>,
        &Option<PathModifier>,
    ),
    matched: Option<&HttpMatch>,
) -> String {
    let (scheme, hostname, port, path) = redirect;
    let scheme_out = scheme.clone().unwrap_or_else(|| "http".into());
    let host = hostname
        .clone()
        .unwrap_or_else(|| host_only(req.authority).to_string());
    let port = port.unwrap_or(match scheme.as_deref() {
        Some("https") => 443,
        Some(_) => 80,
        None => req.dst.port() as u32,
    });
    let port_part = match (scheme_out.as_str(), port) {
        ("http", 80) | ("https", 443) => String::new(),
        _ => format!(":{port}"),
    };
    let path = match path {
        Some(p) => p.apply(req.path, matched_prefix(matched)),
        None => req.path.to_string(),
    };
    let query = match req.query {
        Some(q) if !q.is_empty() => format!("?{q}"),
        _ => String::new(),
    };
    format!("{scheme_out}://{host}{port_part}{path}{query}")
}

/// Carries out the rule a request matched (of a VirtualService or a Gateway API route).
fn apply_rule(
    ask: &Ask,
    svc: &ServiceInfo,
    rule: &HttpRule,
    matched: Option<&HttpMatch>,
    mut edits: RequestEdits,
    mut timeout: Option<Duration>,
) -> HttpDecision {
    let Ask {
        snap,
        eps,
        src,
        req,
        policy,
        roll,
    } = *ask;
    let port = req.dst.port() as u32;
    edits.headers.push(rule.headers.request.clone());
    let mut response_headers = vec![rule.headers.response.clone()];
    if let Some(uri) = &rule.rewrite_uri {
        let prefix = matched.and_then(|m| match &m.uri {
            Some(Matcher::Prefix(p)) => Some(p.clone()),
            _ => None,
        });
        edits.rewrite_uri = Some((prefix, uri.clone()));
    }
    if let Some(p) = &rule.path_rewrite {
        edits.rewrite_uri = Some((None, p.apply(req.path, matched_prefix(matched))));
    }
    edits.rewrite_authority = rule.rewrite_authority.clone();
    timeout = timeout.or(rule.timeout);
    match &rule.action {
        HttpAction::GatewayRedirect {
            scheme,
            hostname,
            port: rport,
            path,
            code,
        } => HttpDecision::Respond {
            status: *code as u16,
            body: bytes::Bytes::new(),
            location: Some(gateway_location(
                req,
                (scheme, hostname, *rport, path),
                matched,
            )),
            labels: labels_for(svc),
            flags: "",
        },
        HttpAction::Redirect {
            uri,
            authority,
            port: rport,
            scheme,
            code,
        } => {
            // Envoy's redirect: what the rule does not replace is kept — the request's
            // Host (with its port, unless the rule sets one) and its query string
            // (unless the new path carries its own).
            let scheme = scheme.clone().unwrap_or_else(|| "http".into());
            let host = match (authority, rport) {
                (Some(a), _) => a.clone(),
                (None, Some(_)) => host_only(req.authority).to_string(),
                (None, None) => req.authority.to_string(),
            };
            let port_part = rport.map(|p| format!(":{p}")).unwrap_or_default();
            let path = uri.clone().unwrap_or_else(|| req.path.to_string());
            let query = match (req.query, path.contains('?')) {
                (Some(q), false) if !q.is_empty() => format!("?{q}"),
                _ => String::new(),
            };
            HttpDecision::Respond {
                status: *code as u16,
                body: bytes::Bytes::new(),
                location: Some(format!("{scheme}://{host}{port_part}{path}{query}")),
                labels: labels_for(svc),
                flags: "",
            }
        }
        HttpAction::DirectResponse { status, body } => HttpDecision::Respond {
            status: *status as u16,
            body: body.clone().unwrap_or_default(),
            location: None,
            labels: labels_for(svc),
            flags: "",
        },
        HttpAction::Route { destinations } => {
            let Some(dest) = pick_weighted(destinations, roll) else {
                return no_route(req, "NR");
            };
            edits.headers.push(dest.headers.request.clone());
            response_headers.push(dest.headers.response.clone());
            let Some(target) = snap
                .registry
                .by_host(&dest.destination.host, &src.namespace)
                .filter(|t| super::route::sees_service(snap, src, t))
            else {
                if rule.api.is_gateway() {
                    // The Gateway API: a backend that does not resolve answers 500 for
                    // its share of requests (Envoy's "no cluster").
                    return HttpDecision::Respond {
                        status: 500,
                        body: "backend not found\n".into(),
                        location: None,
                        labels: labels_for(svc),
                        flags: "NC",
                    };
                }
                return no_route(req, "NR");
            };
            let labels = labels_for(target);
            let port = dest.destination.port.unwrap_or(port);
            if unanswered_and_elsewhere(snap, eps, target, src, policy, req) {
                return spoofed(req, target);
            }
            let Picked {
                chosen,
                cookie_ops,
                tls,
                cluster,
                protocol,
                pool,
            } = pick(
                snap,
                eps,
                target,
                dest.destination.subset.as_deref(),
                port,
                src,
                req,
            );
            response_headers.extend(cookie_ops);
            match chosen {
                Ok(upstream) => HttpDecision::Forward {
                    upstream,
                    protocol,
                    pool,
                    cluster: Some(cluster),
                    tls,
                    labels,
                    edits,
                    response_headers,
                    timeout,
                    retry: Retry::from_rule(&rule.retries),
                    fault: rule.fault.clone(),
                    mirrors: rule
                        .mirrors
                        .iter()
                        .map(|m| (m.destination.clone(), m.percent))
                        .collect(),
                    route: rule.source.clone(),
                },
                Err(flags) => unavailable(labels, flags),
            }
        }
    }
}

/// The request's consistent-hash key under `lb`, and a cookie to set when the policy names a
/// cookie with a ttl that the client did not send (Envoy generates one).
fn hash_key(
    lb: &Option<LoadBalancer>,
    req: &RequestView,
    src: &WorkloadInfo,
) -> (Option<u64>, Option<String>) {
    let Some(LoadBalancer::ConsistentHash { key, .. }) = lb else {
        return (None, None);
    };
    let h = |v: &str| Some(crate::proxy::balance::fnv1a(v.as_bytes()));
    match key {
        HashKey::Header { name } => (
            req.headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .and_then(h),
            None,
        ),
        HashKey::QueryParameter { name } => (query_param(req.query, name).and_then(h), None),
        HashKey::SourceIp => (src.ip.as_deref().and_then(h), None),
        HashKey::Cookie { name, path, ttl } => {
            let sent = req
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|c| {
                    c.trim()
                        .strip_prefix(&format!("{name}="))
                        .map(str::to_string)
                });
            match (sent, ttl) {
                (Some(v), _) => (h(&v), None),
                (None, Some(ttl)) => {
                    let value = format!("{:016x}", rand::random::<u64>());
                    let mut cookie = format!("{name}={value}; Max-Age={}", ttl.as_secs());
                    if let Some(p) = path {
                        cookie.push_str(&format!("; Path={p}"));
                    }
                    (h(&value), Some(cookie))
                }
                (None, None) => (None, None),
            }
        }
    }
}

/// Which HTTP version a request goes upstream in (Istio's choice for the destination's
/// cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// The client's own: ports whose protocol is sniffed, `useClientProtocol: true`, and
    /// destinations outside the registry.
    AsClient,
}

impl UpstreamProtocol {
    /// Istio's cluster protocol: `useClientProtocol` keeps the client's; a port declared
    /// HTTP2 or gRPC (name prefix or appProtocol) is h2; a port declared HTTP, or sniffed,
    /// goes h2 under `h2UpgradePolicy: UPGRADE` (Istio's shouldH2Upgrade takes both);
    /// otherwise HTTP/1.1 for a declared port and the client's own for a sniffed one.
    pub fn of(port: Option<&PortInfo>, pool: Option<&ConnectionPool>) -> Self {
        if pool.is_some_and(|p| p.use_client_protocol) {
            return Self::AsClient;
        }
        let upgrade = pool.and_then(|p| p.h2_upgrade) == Some(true);
        match port.map(|p| p.protocol.as_str()) {
            Some(p) if p.eq_ignore_ascii_case("HTTP2") || p.eq_ignore_ascii_case("GRPC") => {
                Self::Http2
            }
            Some(p) if p.eq_ignore_ascii_case("GRPC-WEB") => Self::Http2,
            Some(p) if p.eq_ignore_ascii_case("HTTP") => {
                if upgrade {
                    Self::Http2
                } else {
                    Self::Http1
                }
            }
            _ if upgrade => Self::Http2,
            _ => Self::AsClient,
        }
    }
}

/// What [`pick`] chose: the endpoint (or Envoy's flag for none), the HeaderOps that set
/// a generated consistent-hash cookie on the response when one was needed, the TLS to
/// originate, and the cluster the endpoint was chosen from.
struct Picked {
    chosen: Result<SocketAddr, &'static str>,
    cookie_ops: Vec<HeaderOps>,
    tls: Option<Arc<UpstreamTls>>,
    cluster: crate::proxy::outlier::ClusterKey,
    protocol: UpstreamProtocol,
    pool: Option<ConnectionPool>,
}

/// Picks an endpoint under the destination's policy.
fn pick(
    snap: &Snapshot,
    eps: &Endpoints,
    target: &ServiceInfo,
    subset: Option<&str>,
    port: u32,
    src: &WorkloadInfo,
    req: &RequestView,
) -> Picked {
    // One merge of the destination's policy gives both the balancer and the TLS.
    let policy = snap
        .routes
        .destination_rule(&target.hostname, &src.namespace, Some(&target.namespace))
        .map(|dr| dr.effective(Some(port), subset));
    let lb = policy.as_ref().and_then(|p| p.load_balancer.clone());
    let (hash, cookie) = hash_key(&lb, req, src);
    let ops = cookie
        .map(|c| HeaderOps {
            add: vec![("set-cookie".to_string(), c)],
            ..Default::default()
        })
        .into_iter()
        .collect();
    let mut chosen = endpoint_for(
        snap,
        eps,
        target,
        subset,
        port,
        &src.namespace,
        super::route::Choice {
            scope: Some(req.scope),
            hash,
            avoid: req.avoid,
            dialled: Some(SocketAddr::V4(req.dst)),
        },
    );
    if chosen == Err("UH")
        && is_dns(target)
        && target.endpoints.is_empty()
        && host_only(req.authority).eq_ignore_ascii_case(&target.hostname)
        && eps.dns.lookup(&target.hostname).is_empty()
    {
        // The daemon has no answer for the name the app itself resolved and dialled: the
        // app's answer (the original destination) is used, at the entry's target port.
        let target_port = target
            .port(port)
            .and_then(|p| p.target_port)
            .unwrap_or(port);
        tracing::debug!(host = %target.hostname, dst = %req.dst, "no DNS answer; using the address the app dialled");
        chosen = Ok(SocketAddr::new(
            req.dst.ip().to_owned().into(),
            target_port as u16,
        ));
    }
    let tls = policy.as_ref().and_then(|p| tls_of(p, target));
    let cluster = crate::proxy::outlier::ClusterKey::new(&target.hostname, port, subset);
    let pool = policy.and_then(|p| p.connection_pool);
    let protocol = UpstreamProtocol::of(target.port(port), pool.as_ref());
    Picked {
        chosen,
        cookie_ops: ops,
        tls,
        cluster,
        protocol,
        pool,
    }
}

/// [`plain_forward`] to what [`pick`] chose, or Envoy's answer when it chose nothing.
fn forward_picked(
    picked: Picked,
    labels: DestinationLabels,
    edits: RequestEdits,
    timeout: Option<Duration>,
) -> HttpDecision {
    match picked.chosen {
        Ok(upstream) => plain_forward(
            (upstream, picked.protocol, Some(picked.cluster), picked.pool),
            picked.tls,
            labels,
            edits,
            picked.cookie_ops,
            timeout,
        ),
        Err(flags) => unavailable(labels, flags),
    }
}

/// A forward with no route rule behind it: Istio's default retries, no fault, no mirror.
fn plain_forward(
    (upstream, protocol, cluster, pool): (
        SocketAddr,
        UpstreamProtocol,
        Option<crate::proxy::outlier::ClusterKey>,
        Option<ConnectionPool>,
    ),
    tls: Option<Arc<UpstreamTls>>,
    labels: DestinationLabels,
    edits: RequestEdits,
    response_headers: Vec<HeaderOps>,
    timeout: Option<Duration>,
) -> HttpDecision {
    HttpDecision::Forward {
        upstream,
        protocol,
        pool,
        cluster,
        tls,
        labels,
        edits,
        response_headers,
        timeout,
        retry: Retry::istio_default(),
        fault: None,
        mirrors: Vec::new(),
        route: String::new(),
    }
}

/// A DNS entry the daemon has no answer for, named by the request's Host, would be sent to
/// the address the app dialled: from a registry-only pod only if that address is the
/// entry's.
fn unanswered_and_elsewhere(
    snap: &Snapshot,
    eps: &Endpoints,
    target: &ServiceInfo,
    src: &WorkloadInfo,
    policy: crate::proxy::OutboundPolicy,
    req: &RequestView,
) -> bool {
    is_dns(target)
        && target.endpoints.is_empty()
        && host_only(req.authority).eq_ignore_ascii_case(&target.hostname)
        && eps.dns.lookup(&target.hostname).is_empty()
        && super::route::registry_only(snap, src, policy)
        // Its resolved set is empty: only addresses the entry lists can vouch for the
        // destination.
        && (target.addresses.is_empty() || !super::route::dst_within(snap, target, req.dst, &src.namespace))
}

/// A Host naming a registered entry, sent to an address that is not the entry's, from a
/// registry-only pod: Istio's BlackHoleCluster.
fn spoofed(req: &RequestView, svc: &ServiceInfo) -> HttpDecision {
    tracing::debug!(host = %svc.hostname, dst = %req.dst, "Host names an entry the destination is not part of; refused (registry-only)");
    blackhole(req)
}

/// Istio's BlackHoleCluster: 502 NR, labelled by the Host asked for.
fn blackhole(req: &RequestView) -> HttpDecision {
    HttpDecision::Respond {
        status: 502,
        body: "destination not in the service registry\n".into(),
        location: None,
        labels: DestinationLabels {
            service: unnamed_service(Some(host_only(req.authority)), SocketAddr::V4(req.dst)),
            service_name: BLACKHOLE_CLUSTER.into(),
            service_namespace: UNKNOWN.into(),
        },
        flags: "NR",
    }
}

fn no_route(req: &RequestView, flags: &'static str) -> HttpDecision {
    HttpDecision::Respond {
        status: 503,
        body: "no route to the destination's cluster\n".into(),
        location: None,
        labels: DestinationLabels {
            service: host_only(req.authority).into(),
            service_name: UNKNOWN.into(),
            service_namespace: UNKNOWN.into(),
        },
        flags,
    }
}

fn unavailable(labels: DestinationLabels, flags: &'static str) -> HttpDecision {
    let body = match flags {
        "NR" => "no route: the destination's subset is not defined by its DestinationRule\n",
        _ => "no healthy upstream\n",
    };
    HttpDecision::Respond {
        status: 503,
        body: body.into(),
        location: None,
        labels,
        flags,
    }
}

#[cfg(test)]
mod tests {
    use super::Retry;

    #[test]
    fn retry_decision_follows_retry_on() {
        let status = |c: u16| AttemptOutcome {
            status: Some(c),
            ..Default::default()
        };
        let failed = AttemptOutcome::default();
        let istio = Retry::istio_default();
        assert!(
            istio.should_retry(&status(503), ""),
            "503 is in Istio's default"
        );
        assert!(!istio.should_retry(&status(500), ""), "500 is not");
        assert!(istio.should_retry(&failed, "UF"), "connect-failure");
        assert!(
            !istio.should_retry(&failed, "UC"),
            "a reset is not, without 'reset'"
        );
        let refused = AttemptOutcome {
            refused_stream: true,
            ..Default::default()
        };
        assert!(istio.should_retry(&refused, "UC"), "refused-stream is");
        let grpc = |g: u16| AttemptOutcome {
            status: Some(200),
            grpc_status: Some(g),
            ..Default::default()
        };
        assert!(istio.should_retry(&grpc(14), ""), "unavailable");
        assert!(istio.should_retry(&grpc(1), ""), "cancelled");
        assert!(
            !istio.should_retry(&grpc(4), ""),
            "deadline-exceeded is not a default"
        );
        assert!(!istio.should_retry(&grpc(0), ""));
        let all_grpc = Retry {
            attempts: 1,
            per_try_timeout: None,
            on: [
                "deadline-exceeded",
                "internal",
                "resource-exhausted",
                "envoy-ratelimited",
            ]
            .map(String::from)
            .to_vec(),
        };
        for g in [4, 13, 8] {
            assert!(all_grpc.should_retry(&grpc(g), ""), "{g}");
        }
        assert!(all_grpc.should_retry(
            &AttemptOutcome {
                status: Some(429),
                rate_limited: true,
                ..Default::default()
            },
            ""
        ));
        assert!(!all_grpc.should_retry(&status(429), ""));
        let gw = Retry {
            attempts: 3,
            per_try_timeout: None,
            on: vec!["gateway-error".into(), "retriable-4xx".into()],
        };
        for code in [502, 503, 504, 409] {
            assert!(gw.should_retry(&status(code), ""), "{code}");
        }
        assert!(!gw.should_retry(&status(500), ""));
        assert!(
            gw.should_retry(&failed, "UT"),
            "a per-try timeout is a gateway error"
        );
        let fivexx = Retry {
            attempts: 1,
            per_try_timeout: None,
            on: vec!["5xx".into()],
        };
        assert!(fivexx.should_retry(&status(500), "") && fivexx.should_retry(&failed, "UC"));
        assert!(!fivexx.should_retry(&status(404), ""));
    }

    use super::*;

    #[test]
    fn host_without_port() {
        assert_eq!(host_only("reviews:9080"), "reviews");
        assert_eq!(host_only("reviews"), "reviews");
        assert_eq!(host_only("169.254.169.254:80"), "169.254.169.254");
    }
}
