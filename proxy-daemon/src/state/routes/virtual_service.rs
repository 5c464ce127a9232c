//! VirtualService: per-host rule lists in Istio's first-match order (HTTP, TLS, TCP),
//! with header operations, rewrites, retries, faults and mirrors.
use super::*;

#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderOps {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderPolicy {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationRef {
    /// FQDN (short names resolved against the VirtualService's namespace).
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WeightedDestination {
    pub destination: DestinationRef,
    pub weight: u32,
    pub headers: HeaderPolicy,
}

#[derive(Debug, Clone, Serialize)]
pub struct MirrorPolicy {
    pub destination: DestinationRef,
    /// 0.0–100.0; Istio's default for a `mirror` without a percentage is 100.
    pub percent: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryPolicy {
    pub attempts: u32,
    #[serde(serialize_with = "ser_duration")]
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    #[serde(serialize_with = "ser_duration")]
    pub delay: Option<Duration>,
    pub delay_percent: f64,
    pub abort_status: Option<u32>,
    pub abort_percent: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HttpAction {
    Route {
        destinations: Vec<WeightedDestination>,
    },
    Redirect {
        uri: Option<String>,
        authority: Option<String>,
        port: Option<u32>,
        scheme: Option<String>,
        code: u32,
    },
    DirectResponse {
        status: u32,
        #[serde(serialize_with = "body_as_text")]
        body: Option<bytes::Bytes>,
    },
    /// The Gateway API's RequestRedirect: what it leaves unset comes from the request
    /// (hostname without its port; the scheme's own port when the scheme is set, else the
    /// port dialled; 80 and 443 left out of `Location`).
    GatewayRedirect {
        scheme: Option<String>,
        hostname: Option<String>,
        port: Option<u32>,
        path: Option<PathModifier>,
        code: u32,
    },
}

/// A direct response's body in `/config_dump`: as text (binary bytes shown lossily).
fn body_as_text<S: serde::Serializer>(
    body: &Option<bytes::Bytes>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match body {
        Some(b) => s.serialize_some(&String::from_utf8_lossy(b)),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRule {
    pub name: Option<String>,
    /// Empty: matches every request.
    pub matches: Vec<HttpMatch>,
    pub action: HttpAction,
    pub rewrite_uri: Option<String>,
    pub rewrite_authority: Option<String>,
    pub headers: HeaderPolicy,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Option<Duration>,
    /// None: Istio's default policy applies (2 attempts on connect-failure, refused-stream,
    /// unavailable, cancelled, retriable-status-codes).
    pub retries: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    pub mirrors: Vec<MirrorPolicy>,
    /// Where it was written, e.g. `vs.yaml:12`.
    pub source: String,
    /// The API that wrote it.
    pub api: RouteApi,
    /// A Gateway API URLRewrite of the path (a VirtualService uses `rewrite_uri`).
    pub path_rewrite: Option<PathModifier>,
}

impl HttpRule {
    /// A rule of a Gateway API route; filters are filled in by the caller.
    pub fn gateway(
        api: RouteApi,
        name: Option<String>,
        matches: Vec<HttpMatch>,
        action: HttpAction,
        source: String,
    ) -> Self {
        HttpRule {
            name,
            matches,
            action,
            rewrite_uri: None,
            rewrite_authority: None,
            headers: HeaderPolicy::default(),
            timeout: None,
            retries: None,
            fault: None,
            mirrors: Vec::new(),
            source,
            api,
            path_rewrite: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct L4Rule {
    pub matches: Vec<L4Match>,
    pub destinations: Vec<WeightedDestination>,
    pub source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompiledVirtualService {
    pub name: String,
    pub namespace: String,
    pub hosts: Vec<String>,
    pub export_to: Vec<String>,
    pub http: Vec<HttpRule>,
    pub tcp: Vec<L4Rule>,
    pub tls: Vec<L4Rule>,
    pub source: String,
    /// Its age among competitors (a Gateway API route on the same Service is compared
    /// with it).
    #[serde(skip)]
    pub order: CreationOrder,
}

impl CompiledVirtualService {
    /// Whether workloads of namespace `client` see this VirtualService (exportTo).
    pub fn visible_to(&self, client: &str) -> bool {
        super::exported_to(&self.export_to, &self.namespace, client)
    }
}

pub(super) fn header_ops(h: &Option<istio::HeaderOperations>) -> HeaderOps {
    match h {
        Some(h) => HeaderOps {
            set: h
                .set
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            add: h
                .add
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            remove: h.remove.iter().map(|k| k.to_ascii_lowercase()).collect(),
        },
        None => HeaderOps::default(),
    }
}

pub(super) fn header_policy(h: &Option<istio::Headers>) -> HeaderPolicy {
    match h {
        Some(h) => HeaderPolicy {
            request: header_ops(&h.request),
            response: header_ops(&h.response),
        },
        None => HeaderPolicy::default(),
    }
}

/// Istio's retry conditions when a route sets none (or sets `attempts` without
/// `retryOn`): connect failures, refused streams, unavailable/cancelled gRPC, and 503 as a
/// retriable status code.
pub const ISTIO_DEFAULT_RETRY_ON: &[&str] = &[
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
    "503",
];

pub(super) const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
    "reset-before-request",
    "http3-post-connect-failure",
];

/// Where a destination points; checks host and subset against the registry and rules.
pub(super) struct DestCheck<'a> {
    pub(super) registry: &'a Registry,
    pub(super) subsets: &'a BTreeMap<String, Vec<String>>,
}

impl Ctx<'_> {
    fn destination(
        &mut self,
        d: &istio::Destination,
        ns: &str,
        check: &DestCheck,
    ) -> DestinationRef {
        let host = resolve_host(&d.host.value, ns);
        if d.host.value.trim().is_empty() {
            self.err(d.host.referenced.line(), "destination.host is required");
        } else if !check.registry.contains_host(&host) {
            self.warn(
                d.host.referenced.line(),
                format!("destination host {host} is not a known Service or ServiceEntry host"),
            );
        }
        if let Some(subset) = &d.subset {
            match check.subsets.get(&host) {
                Some(names) if names.contains(&subset.value) => {}
                Some(names) => self.err(
                    subset.referenced.line(),
                    format!(
                        "subset {:?} of {host} is not defined by its DestinationRule (defined: {})",
                        subset.value,
                        names.join(", ")
                    ),
                ),
                // Its DestinationRule may come later or live elsewhere (as an unknown
                // host may): Istio accepts the rule; until the subset exists, requests for
                // it answer 503 NR.
                None => self.warn(
                    subset.referenced.line(),
                    format!(
                        "subset {:?}: no DestinationRule defines subsets for {host} (requests routed to it answer 503 until one does)",
                        subset.value
                    ),
                ),
            }
        }
        DestinationRef {
            host,
            subset: d.subset.as_ref().map(|s| s.value.clone()),
            port: d.port.as_ref().map(|p| p.number),
        }
    }

    fn weights(&mut self, weights: &[Option<&Spanned<i64>>], rule_line: u64) -> Vec<u32> {
        if weights.len() == 1 && weights[0].is_none() {
            return vec![100];
        }
        let mut out = Vec::new();
        // i128: no sum of i64 weights can overflow it (and none passes the check below).
        let mut sum = 0i128;
        for w in weights {
            let v = w.map(|w| w.value).unwrap_or(0);
            if v < 0 {
                self.err(
                    w.map(|w| w.referenced.line()).unwrap_or(rule_line),
                    format!("weight {v} is negative"),
                );
            }
            sum += v as i128;
            out.push(v.clamp(0, 100) as u32);
        }
        if weights.len() == 1 && sum == 0 {
            return vec![100];
        }
        if sum != 100 {
            let line = weights
                .iter()
                .flatten()
                .next()
                .map(|w| w.referenced.line())
                .unwrap_or(rule_line);
            self.err(line, format!("route weights sum to {sum}, not 100"));
        }
        out
    }
}

pub(super) fn compile_virtual_service(
    o: &Located<Object>,
    vs: &istio::IstioObject<istio::VirtualServiceSpec>,
    check: &DestCheck,
    findings: &mut Vec<ConfigError>,
    regexes: &mut std::collections::HashMap<String, std::sync::Arc<regex::Regex>>,
) -> Option<CompiledVirtualService> {
    let mut cx = Ctx {
        o,
        findings,
        regexes,
    };
    let ns = o.object_ref.namespace.clone();
    let spec = &vs.spec;
    if spec.hosts.is_empty() {
        cx.err(0, "spec.hosts is required");
    }
    // `gateways` omitted or containing `mesh`: applies to sidecar (here: node) traffic.
    if !binds_pods(&spec.gateways) {
        cx.note(
            0,
            format!(
                "bound to gateways [{}], not to mesh: not applied to pod traffic",
                spec.gateways.join(", ")
            ),
        );
        return None;
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        cx.err(0, "no http, tcp or tls routes");
    }
    let mut http = Vec::new();
    let mut catch_all_line: Option<u64> = None;
    for (i, rule) in spec.http.iter().enumerate() {
        let line = rule.referenced.line();
        let r = &rule.value;
        if let Some(prev) = catch_all_line {
            // Istio's analyzer warns (IST0130-like) and the API server and Envoy accept
            // it; Istio's own fault-injection task ships such a rule.
            let prev_line = o.origin.doc_first_line + prev as usize - 1;
            cx.warn(
                line,
                format!(
                    "http[{i}] is unreachable: the rule at line {prev_line} matches every request"
                ),
            );
        }
        let mut matches = Vec::new();
        for m in &r.matches {
            let mv = &m.value;
            let mut hm = HttpMatch {
                name: mv.name.clone(),
                port: mv.port,
                source_labels: mv.source_labels.clone(),
                source_namespace: mv.source_namespace.clone(),
                ignore_uri_case: mv.ignore_uri_case,
                ..Default::default()
            };
            hm.uri = mv.uri.as_ref().and_then(|x| cx.matcher(x, "uri"));
            hm.scheme = mv.scheme.as_ref().and_then(|x| cx.matcher(x, "scheme"));
            hm.method = mv.method.as_ref().and_then(|x| cx.matcher(x, "method"));
            hm.authority = mv
                .authority
                .as_ref()
                .and_then(|x| cx.matcher(x, "authority"));
            for (k, v) in &mv.headers {
                if let Some(mm) = cx.header_matcher(v, &format!("headers.{k}")) {
                    hm.headers.push((k.to_ascii_lowercase(), mm));
                }
            }
            for (k, v) in &mv.without_headers {
                if let Some(mm) = cx.header_matcher(v, &format!("withoutHeaders.{k}")) {
                    hm.without_headers.push((k.to_ascii_lowercase(), mm));
                }
            }
            for (k, v) in &mv.query_params {
                if let Some(mm) = cx.matcher(v, &format!("queryParams.{k}")) {
                    hm.query_params.push((k.clone(), mm));
                }
            }
            if !binds_pods(&mv.gateways) {
                // As in Istio: a match block that names gateways but not `mesh` is left
                // out of the sidecar's (here: the node proxy's) routes.
                cx.note(
                    m.referenced.line(),
                    "match bound to gateways only: never matches pod traffic",
                );
                continue;
            }
            matches.push(hm);
        }
        if !r.matches.is_empty() && matches.is_empty() {
            // Every match block was for gateways: the rule is not a catch-all here, it
            // is absent.
            continue;
        }
        if r.matches.is_empty() {
            catch_all_line = Some(line);
        }
        let kinds = [
            !r.route.is_empty(),
            r.redirect.is_some(),
            r.direct_response.is_some(),
        ];
        let action = match kinds {
            [true, false, false] => {
                let weights: Vec<Option<&Spanned<i64>>> =
                    r.route.iter().map(|d| d.weight.as_ref()).collect();
                let w = cx.weights(&weights, line);
                let destinations = r
                    .route
                    .iter()
                    .zip(w)
                    .map(|(d, weight)| WeightedDestination {
                        destination: cx.destination(&d.destination, &ns, check),
                        weight,
                        headers: header_policy(&d.headers),
                    })
                    .collect();
                HttpAction::Route { destinations }
            }
            [false, true, false] => {
                let rd = r.redirect.clone().unwrap_or_default();
                HttpAction::Redirect {
                    uri: rd.uri,
                    authority: rd.authority,
                    port: rd.port,
                    scheme: rd.scheme,
                    code: rd.redirect_code.unwrap_or(301),
                }
            }
            [false, false, true] => {
                let dr = r.direct_response.clone().unwrap_or_default();
                if !(200..=599).contains(&dr.status) {
                    cx.err(
                        line,
                        format!("directResponse.status {} is not an HTTP status", dr.status),
                    );
                }
                let body = match dr.body {
                    None => None,
                    Some(b) => match (b.string, b.bytes) {
                        (Some(s), None) => Some(bytes::Bytes::from(s)),
                        // Istio's `bytes` is base64, as protobuf JSON writes bytes.
                        (None, Some(b64)) => {
                            use base64::Engine as _;
                            match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
                                Ok(raw) => Some(bytes::Bytes::from(raw)),
                                Err(e) => {
                                    cx.err(
                                        line,
                                        format!("directResponse.body.bytes is not base64: {e}"),
                                    );
                                    None
                                }
                            }
                        }
                        (Some(_), Some(_)) => {
                            cx.err(
                                line,
                                "directResponse.body: string and bytes exclude each other",
                            );
                            None
                        }
                        (None, None) => None,
                    },
                };
                HttpAction::DirectResponse {
                    status: dr.status,
                    body,
                }
            }
            [false, false, false] => {
                cx.err(
                    line,
                    format!("http[{i}] needs one of route, redirect or directResponse"),
                );
                continue;
            }
            _ => {
                cx.err(
                    line,
                    format!("http[{i}]: route, redirect and directResponse exclude each other"),
                );
                continue;
            }
        };
        // Envoy: a zero timeout disables it (the request may take as long as it takes).
        let timeout = cx.duration(&r.timeout, "timeout").filter(|d| !d.is_zero());
        let retries = r.retries.as_ref().map(|rt| {
            let mut retry_on = Vec::new();
            if rt.retry_on.is_none() {
                // `attempts` alone: Istio fills in its default conditions.
                retry_on.extend(ISTIO_DEFAULT_RETRY_ON.iter().map(|s| s.to_string()));
            }
            if let Some(on) = &rt.retry_on {
                for token in on.value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    if RETRY_ON.contains(&token) || token.parse::<u16>().is_ok() {
                        retry_on.push(token.to_string());
                    } else {
                        cx.err(
                            on.referenced.line(),
                            format!("retryOn: unknown condition {token:?}"),
                        );
                    }
                }
            }
            if rt.attempts < 0 {
                cx.err(
                    line,
                    format!("retries.attempts {} is negative", rt.attempts),
                );
            }
            RetryPolicy {
                attempts: rt.attempts.max(0) as u32,
                per_try_timeout: cx
                    .duration(&rt.per_try_timeout, "retries.perTryTimeout")
                    .filter(|d| !d.is_zero()),
                retry_on,
            }
        });
        // An unset fault percentage faults no request: Istio passes no percentage to
        // Envoy, whose FractionalPercent then defaults to 0 (the deprecated integer
        // `percent` of delays likewise defaults to 0).
        let fault = r.fault.as_ref().map(|f| Fault {
            delay: f
                .delay
                .as_ref()
                .and_then(|d| cx.duration(&d.fixed_delay, "fault.delay.fixedDelay")),
            delay_percent: f
                .delay
                .as_ref()
                .map(|d| {
                    cx.percent(&d.percentage, "fault.delay")
                        .or(d.percent.map(|p| p as f64))
                        .unwrap_or(0.0)
                })
                .unwrap_or(0.0),
            abort_status: f.abort.as_ref().and_then(|a| a.http_status),
            abort_percent: f
                .abort
                .as_ref()
                .map(|a| cx.percent(&a.percentage, "fault.abort").unwrap_or(0.0))
                .unwrap_or(0.0),
        });
        let mut mirrors = Vec::new();
        if let Some(m) = &r.mirror {
            let percent = match (&r.mirror_percentage, r.mirror_percent) {
                (Some(_), _) => cx
                    .percent(&r.mirror_percentage, "mirrorPercentage")
                    .unwrap_or(100.0),
                (None, Some(p)) if p <= 100 => p as f64,
                (None, Some(p)) => {
                    cx.err(line, format!("mirrorPercent {p} is above 100"));
                    100.0
                }
                (None, None) => 100.0,
            };
            mirrors.push(MirrorPolicy {
                destination: cx.destination(m, &ns, check),
                percent,
            });
        } else if r.mirror_percentage.is_some() || r.mirror_percent.is_some() {
            cx.warn(
                line,
                "mirror percentage without mirror: nothing is mirrored",
            );
        }
        for m in &r.mirrors {
            let percent = cx
                .percent(&m.percentage, "mirrors.percentage")
                .unwrap_or(100.0);
            mirrors.push(MirrorPolicy {
                destination: cx.destination(&m.destination, &ns, check),
                percent,
            });
        }
        http.push(HttpRule {
            name: r.name.clone(),
            matches,
            action,
            rewrite_uri: r.rewrite.as_ref().and_then(|rw| rw.uri.clone()),
            rewrite_authority: r.rewrite.as_ref().and_then(|rw| rw.authority.clone()),
            headers: header_policy(&r.headers),
            timeout,
            retries,
            fault,
            mirrors,
            source: cx.source(line),
            api: RouteApi::VirtualService,
            path_rewrite: None,
        });
    }
    let l4 =
        |cx: &mut Ctx, routes: &[istio::RouteDestination], line: u64| -> Vec<WeightedDestination> {
            let weights: Vec<Option<&Spanned<i64>>> =
                routes.iter().map(|d| d.weight.as_ref()).collect();
            let w = cx.weights(&weights, line);
            routes
                .iter()
                .zip(w)
                .map(|(d, weight)| WeightedDestination {
                    destination: cx.destination(&d.destination, &ns, check),
                    weight,
                    headers: HeaderPolicy::default(),
                })
                .collect()
        };
    let l4_rule = |cx: &mut Ctx,
                   matches: Vec<L4Match>,
                   route: &[istio::RouteDestination],
                   line: u64| L4Rule {
        matches,
        destinations: l4(cx, route, line),
        source: cx.source(line),
    };
    let tcp: Vec<L4Rule> = spec
        .tcp
        .iter()
        .filter_map(|t| {
            let subnets = t.value.matches.iter().map(|m| &m.destination_subnets[..]);
            check_subnets(&mut cx, t.referenced.line(), subnets);
            let kept = kept_for_pods(&mut cx, t.referenced.line(), &t.value.matches, |m| {
                &m.gateways
            })?;
            let matches = kept.into_iter().map(L4Match::from).collect();
            Some(l4_rule(
                &mut cx,
                matches,
                &t.value.route,
                t.referenced.line(),
            ))
        })
        .collect();
    let tls: Vec<L4Rule> = spec
        .tls
        .iter()
        .filter_map(|t| {
            if t.value.matches.iter().all(|m| m.sni_hosts.is_empty()) {
                cx.err(t.referenced.line(), "tls routes need match[].sniHosts");
            }
            let subnets = t.value.matches.iter().map(|m| &m.destination_subnets[..]);
            check_subnets(&mut cx, t.referenced.line(), subnets);
            let kept = kept_for_pods(&mut cx, t.referenced.line(), &t.value.matches, |m| {
                &m.gateways
            })?;
            let matches = kept.into_iter().map(L4Match::from).collect();
            Some(l4_rule(
                &mut cx,
                matches,
                &t.value.route,
                t.referenced.line(),
            ))
        })
        .collect();
    Some(CompiledVirtualService {
        order: CreationOrder::of(o, 0),
        name: o.object_ref.name.clone(),
        namespace: ns.clone(),
        hosts: spec
            .hosts
            .iter()
            .map(|h| resolve_host(&h.value, &ns))
            .collect(),
        export_to: spec.export_to.clone(),
        http,
        tcp,
        tls,
        source: cx.source(0),
    })
}

/// Whether a `gateways` list applies to sidecar (here: the node proxy's pod) traffic:
/// omitted, or naming `mesh` (Istio's rule).
fn binds_pods(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

/// The match blocks of an L4 rule that apply to pod traffic: as in Istio, blocks naming
/// gateways but not `mesh` are left out (noted); a rule whose blocks all are is absent
/// (None), not a catch-all.
fn kept_for_pods<'a, M>(
    cx: &mut Ctx,
    line: u64,
    matches: &'a [M],
    gateways: impl Fn(&M) -> &Vec<String>,
) -> Option<Vec<&'a M>> {
    let kept: Vec<&M> = matches.iter().filter(|m| binds_pods(gateways(m))).collect();
    if kept.len() < matches.len() {
        cx.note(
            line,
            "match bound to gateways only: never matches pod traffic",
        );
        if kept.is_empty() {
            return None;
        }
    }
    Some(kept)
}

/// Reports every `destinationSubnets` entry that is not an address or CIDR (the compiled
/// match would otherwise quietly lose it).
pub(super) fn check_subnets<'a>(
    cx: &mut Ctx,
    line: u64,
    subnets: impl Iterator<Item = &'a [String]>,
) {
    for list in subnets {
        if let Err(e) = parse_subnets(list) {
            cx.err(line, e);
        }
    }
}
