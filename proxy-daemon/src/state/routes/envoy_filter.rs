//! EnvoyFilter: the supported outbound route overrides (`HTTP_ROUTE` MERGE, `VIRTUAL_HOST`
//! ADD) with their `outbound|PORT|SUBSET|HOST` clusters resolved.
use super::*;

// ---- EnvoyFilter route overrides

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClusterRef {
    Passthrough,
    BlackHole,
    /// `outbound|PORT|SUBSET|HOST`
    Service {
        port: u32,
        subset: Option<String>,
        host: String,
    },
}

/// Envoy's HeaderValueOption `append_action` (`append: false` is
/// OVERWRITE_IF_EXISTS_OR_ADD; the default appends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HeaderAppend {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

/// A header an EnvoyFilter adds to requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddedHeader {
    pub name: String,
    pub value: String,
    pub action: HeaderAppend,
}

/// A route of an added virtual host.
#[derive(Debug, Clone, Serialize)]
pub struct AddedRoute {
    pub name: Option<String>,
    pub matcher: Matcher,
    pub cluster: ClusterRef,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Option<Duration>,
    pub request_headers_to_add: Vec<AddedHeader>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RoutePatch {
    /// HTTP_ROUTE MERGE: applies to every route of every virtual host of the port.
    MergeHttpRoute {
        cluster: Option<ClusterRef>,
        request_headers_to_add: Vec<AddedHeader>,
        #[serde(serialize_with = "ser_duration")]
        timeout: Option<Duration>,
    },
    /// VIRTUAL_HOST ADD: exact domains win over the catch-all.
    AddVirtualHost {
        name: Option<String>,
        domains: Vec<String>,
        routes: Vec<AddedRoute>,
    },
}

/// Envoy's `request_headers_to_add` entries as this proxy applies them.
fn added_headers(list: &[istio::EnvoyHeaderValueOption]) -> Result<Vec<AddedHeader>, String> {
    list.iter()
        .map(|h| {
            let action = match (h.append, h.append_action.as_deref()) {
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "header {}: append and append_action exclude each other",
                        h.header.key
                    ))
                }
                (Some(false), None) => HeaderAppend::OverwriteIfExistsOrAdd,
                (Some(true) | None, None) | (None, Some("APPEND_IF_EXISTS_OR_ADD")) => {
                    HeaderAppend::AppendIfExistsOrAdd
                }
                (None, Some("ADD_IF_ABSENT")) => HeaderAppend::AddIfAbsent,
                (None, Some("OVERWRITE_IF_EXISTS_OR_ADD")) => HeaderAppend::OverwriteIfExistsOrAdd,
                (None, Some("OVERWRITE_IF_EXISTS")) => HeaderAppend::OverwriteIfExists,
                (None, Some(other)) => {
                    return Err(format!(
                        "header {}: append_action {other:?}: expected APPEND_IF_EXISTS_OR_ADD, ADD_IF_ABSENT, OVERWRITE_IF_EXISTS_OR_ADD or OVERWRITE_IF_EXISTS",
                        h.header.key
                    ))
                }
            };
            Ok(AddedHeader {
                name: h.header.key.to_ascii_lowercase(),
                value: h.header.value.clone(),
                action,
            })
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct PortPatch {
    /// `routeConfiguration.name` as a port ("80"); None = every outbound port.
    pub port: Option<u32>,
    pub patch: RoutePatch,
    pub source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompiledEnvoyFilter {
    pub name: String,
    pub namespace: String,
    /// `priority`: lower is applied first (default 0).
    pub priority: i64,
    pub selector: BTreeMap<String, String>,
    pub patches: Vec<PortPatch>,
    pub source: String,
}

/// `outbound|80||mirror-cache.azar.svc.cluster.local`, PassthroughCluster, BlackHoleCluster.
pub fn parse_cluster(name: &str) -> Result<ClusterRef, String> {
    match name {
        "PassthroughCluster" => return Ok(ClusterRef::Passthrough),
        "BlackHoleCluster" => return Ok(ClusterRef::BlackHole),
        _ => {}
    }
    let parts: Vec<&str> = name.split('|').collect();
    match parts.as_slice() {
        ["outbound", port, subset, host] => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("cluster {name:?}: {port:?} is not a port (1–65535)"))?;
            // A host or subset is a name: no spaces or control characters (they could
            // never match a registry entry, and would garble logs and /config_dump).
            let is_name = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic());
            if !is_name(host) || !(subset.is_empty() || is_name(subset)) {
                return Err(format!("cluster {name:?}: host and subset must be names"));
            }
            Ok(ClusterRef::Service {
                port: u32::from(port),
                subset: (!subset.is_empty()).then(|| subset.to_string()),
                host: host.to_ascii_lowercase(),
            })
        }
        _ => Err(format!("cluster {name:?}: expected outbound|PORT|SUBSET|HOST, PassthroughCluster or BlackHoleCluster")),
    }
}

impl std::fmt::Display for ClusterRef {
    /// Envoy's cluster name, as an EnvoyFilter would write it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterRef::Passthrough => f.write_str("PassthroughCluster"),
            ClusterRef::BlackHole => f.write_str("BlackHoleCluster"),
            ClusterRef::Service { port, subset, host } => write!(
                f,
                "outbound|{port}|{}|{host}",
                subset.as_deref().unwrap_or("")
            ),
        }
    }
}

/// Envoy's route timeout when a RouteAction sets none.
const ENVOY_DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// What we carry out of EnvoyFilter: outbound route patches.
const SUPPORTED_PATCHES: &str =
    "supported: HTTP_ROUTE MERGE and VIRTUAL_HOST ADD in context ANY or SIDECAR_OUTBOUND";

/// Why a filter as a whole is outside what a node proxy carries out, if it is: Istio
/// accepts it, so it is a warning and the filter is skipped (the rest of the
/// configuration is used).
fn unsupported_patch(ef: &istio::EnvoyFilterSpec) -> Option<(u64, String)> {
    if let Some(t) = &ef.target_refs {
        return Some((
            t.referenced.line(),
            "targetRefs (gateway and waypoint attachment) is not supported".into(),
        ));
    }
    for (i, cp) in ef.config_patches.iter().enumerate() {
        let p = &cp.value;
        let line = cp.referenced.line();
        let apply_to = p.apply_to.value.as_str();
        let op = p.patch.operation.value.as_str();
        let context = p
            .patch_match
            .as_ref()
            .and_then(|m| m.context.as_deref())
            .unwrap_or("ANY");
        let matched_on = p.patch_match.as_ref().and_then(|m| {
            let rc = m.route_configuration.as_ref();
            let vhost = rc.and_then(|r| r.vhost.as_ref()).map(|v| &v.value);
            let line = |v: &Spanned<serde_json::Value>| v.referenced.line();
            m.listener
                .as_ref()
                .map(|l| ("listener", line(l)))
                .or(m.proxy.as_ref().map(|p| ("proxy", p.referenced.line())))
                .or(m.cluster.as_ref().map(|c| ("cluster", line(c))))
                .or(rc
                    .and_then(|r| r.port_name.as_ref())
                    .map(|v| ("routeConfiguration.portName", line(v))))
                .or(rc
                    .and_then(|r| r.gateway.as_ref())
                    .map(|v| ("routeConfiguration.gateway", line(v))))
                .or(vhost
                    .and_then(|v| v.domain_name.as_ref())
                    .map(|v| ("routeConfiguration.vhost.domainName", line(v))))
                .or(vhost
                    .and_then(|v| v.route.as_ref())
                    .map(|v| ("routeConfiguration.vhost.route", line(v))))
                .or(rc
                    .and_then(|r| r.vhost.as_ref())
                    .map(|v| ("routeConfiguration.vhost", v.referenced.line())))
        });
        let why = if !matches!(
            (apply_to, op),
            ("HTTP_ROUTE", "MERGE") | ("VIRTUAL_HOST", "ADD")
        ) {
            format!("applyTo {apply_to} {op} patch")
        } else if let Some((field, l)) = matched_on {
            return Some((
                l,
                format!("configPatches[{i}]: not supported: match.{field} ({SUPPORTED_PATCHES})"),
            ));
        } else if matches!(context, "SIDECAR_INBOUND" | "GATEWAY") {
            format!("{context} patch (a node proxy handles its pods' outbound traffic)")
        } else {
            continue;
        };
        return Some((
            line,
            format!("configPatches[{i}]: not supported: {why} ({SUPPORTED_PATCHES})"),
        ));
    }
    None
}

/// The filter's outbound route patches; None when it is skipped as a whole (a warning
/// says why).
pub(super) fn compile_envoy_filter(
    o: &Located<Object>,
    ef: &istio::IstioObject<istio::EnvoyFilterSpec>,
    registry: &Registry,
    findings: &mut Vec<ConfigError>,
) -> Option<CompiledEnvoyFilter> {
    let mut regexes = std::collections::HashMap::new();
    let mut cx = Ctx {
        o,
        findings,
        regexes: &mut regexes,
    };
    if let Some((line, why)) = unsupported_patch(&ef.spec) {
        cx.warn(line, format!("{why}; this EnvoyFilter is skipped"));
        return None;
    }
    let mut patches = Vec::new();
    for (i, cp) in ef.spec.config_patches.iter().enumerate() {
        let line = cp.referenced.line();
        let p = &cp.value;
        let what = format!("configPatches[{i}]");
        let context = p
            .patch_match
            .as_ref()
            .and_then(|m| m.context.clone())
            .unwrap_or_else(|| "ANY".into());
        if !matches!(context.as_str(), "ANY" | "SIDECAR_OUTBOUND") {
            cx.err(
                line,
                format!("{what}: context {context} is not supported (ANY or SIDECAR_OUTBOUND)"),
            );
            continue;
        }
        let rc = p
            .patch_match
            .as_ref()
            .and_then(|m| m.route_configuration.as_ref());
        let port = match rc.and_then(|r| r.name.as_deref()) {
            Some(name) => match name.parse::<u32>() {
                Ok(port) => Some(port),
                Err(_) => {
                    cx.err(
                        line,
                        format!("{what}: routeConfiguration.name {name:?} is not an outbound port"),
                    );
                    continue;
                }
            },
            None => rc.and_then(|r| r.port_number),
        };
        let value = p.patch.value.as_ref();
        let value_line = value.map(|v| v.referenced.line()).unwrap_or(line);
        let json = value
            .map(|v| v.value.clone())
            .unwrap_or(serde_json::Value::Null);
        let patch = match (p.apply_to.value.as_str(), p.patch.operation.value.as_str()) {
            ("HTTP_ROUTE", "MERGE") => {
                match serde_json::from_value::<istio::HttpRouteMerge>(json) {
                    Ok(v) => {
                        let cluster = v
                            .route
                            .as_ref()
                            .and_then(|r| r.cluster.as_deref())
                            .map(parse_cluster)
                            .transpose();
                        let cluster = match cluster {
                            Ok(c) => c,
                            Err(e) => {
                                cx.err(value_line, format!("{what}: {e}"));
                                continue;
                            }
                        };
                        if let Some(ClusterRef::Service { host, .. }) = &cluster {
                            if !registry.contains_host(host) {
                                cx.warn(value_line, format!("{what}: cluster host {host} is not a known Service or ServiceEntry host"));
                            }
                        }
                        let timeout = v
                            .timeout
                            .as_ref()
                            .or(v.route.as_ref().and_then(|r| r.timeout.as_ref()));
                        let timeout = match timeout.map(|t| duration::parse(t)) {
                            Some(Ok(d)) => Some(d),
                            Some(Err(e)) => {
                                cx.err(value_line, format!("{what}: timeout: {e}"));
                                None
                            }
                            None => None,
                        };
                        let request_headers_to_add = match added_headers(&v.request_headers_to_add)
                        {
                            Ok(h) => h,
                            Err(e) => {
                                cx.err(value_line, format!("{what}: {e}"));
                                continue;
                            }
                        };
                        RoutePatch::MergeHttpRoute {
                            cluster,
                            request_headers_to_add,
                            timeout,
                        }
                    }
                    Err(e) => {
                        cx.err(value_line, format!("{what}: HTTP_ROUTE MERGE value: {e}"));
                        continue;
                    }
                }
            }
            ("VIRTUAL_HOST", "ADD") => {
                match serde_json::from_value::<istio::VirtualHostAdd>(json) {
                    Ok(v) => {
                        if v.domains.is_empty() {
                            cx.err(
                                value_line,
                                format!("{what}: VIRTUAL_HOST ADD needs domains"),
                            );
                        }
                        let mut routes = Vec::new();
                        for r in &v.routes {
                            let m = match r.route_match.as_ref() {
                                Some(istio::EnvoyRouteMatch {
                                    prefix: Some(p),
                                    path: None,
                                }) => Matcher::Prefix(p.clone()),
                                Some(istio::EnvoyRouteMatch {
                                    prefix: None,
                                    path: Some(p),
                                }) => Matcher::Exact(p.clone()),
                                _ => {
                                    cx.err(
                                        value_line,
                                        format!(
                                            "{what}: each route needs match.prefix or match.path"
                                        ),
                                    );
                                    continue;
                                }
                            };
                            let cluster = match r
                                .route
                                .as_ref()
                                .and_then(|a| a.cluster.as_deref())
                                .map(parse_cluster)
                            {
                                Some(Ok(c)) => c,
                                Some(Err(e)) => {
                                    cx.err(value_line, format!("{what}: {e}"));
                                    continue;
                                }
                                None => {
                                    cx.err(
                                        value_line,
                                        format!("{what}: each route needs route.cluster"),
                                    );
                                    continue;
                                }
                            };
                            // An Envoy RouteAction without a timeout has Envoy's 15 s.
                            let timeout = match r
                                .route
                                .as_ref()
                                .and_then(|a| a.timeout.as_deref())
                                .map(duration::parse)
                            {
                                Some(Ok(d)) => Some(d),
                                None => Some(ENVOY_DEFAULT_ROUTE_TIMEOUT),
                                Some(Err(e)) => {
                                    cx.err(value_line, format!("{what}: route.timeout: {e}"));
                                    continue;
                                }
                            };
                            let request_headers_to_add =
                                match added_headers(&r.request_headers_to_add) {
                                    Ok(h) => h,
                                    Err(e) => {
                                        cx.err(value_line, format!("{what}: {e}"));
                                        continue;
                                    }
                                };
                            routes.push(AddedRoute {
                                name: r.name.clone(),
                                matcher: m,
                                cluster,
                                timeout,
                                request_headers_to_add,
                            });
                        }
                        RoutePatch::AddVirtualHost {
                            name: v.name,
                            domains: v.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
                            routes,
                        }
                    }
                    Err(e) => {
                        cx.err(value_line, format!("{what}: VIRTUAL_HOST ADD value: {e}"));
                        continue;
                    }
                }
            }
            (apply_to, op) => {
                cx.err(
                    cp.value.apply_to.referenced.line(),
                    format!("{what}: applyTo {apply_to} with operation {op} is not supported (HTTP_ROUTE MERGE, VIRTUAL_HOST ADD)"),
                );
                continue;
            }
        };
        patches.push(PortPatch {
            port,
            patch,
            source: cx.source(line),
        });
    }
    Some(CompiledEnvoyFilter {
        name: o.object_ref.name.clone(),
        namespace: o.object_ref.namespace.clone(),
        priority: ef.spec.priority.unwrap_or(0),
        selector: ef
            .spec
            .workload_selector
            .as_ref()
            .map(|s| s.labels.clone())
            .unwrap_or_default(),
        patches,
        source: cx.source(0),
    })
}
