//! Compiled routing: VirtualServices as per-host rule lists in Istio's first-match order,
//! DestinationRules merged into per-host policies, EnvoyFilter route overrides, Sidecar
//! outbound policies. Everything here is immutable once built; the data path reads it.
use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;
use serde_saphyr::Spanned;

use crate::{
    config::{
        duration,
        istio::{self, OutboundMode, SimpleLb, TlsMode},
        ConfigError, Located, Object, Severity,
    },
    state::registry::{resolve_host, Registry},
};

fn ser_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
        None => s.serialize_none(),
    }
}

/// A compiled string matcher (Envoy semantics: regex must match the whole value).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    /// Shared: one compiled automaton (and cache pool) per distinct pattern.
    Regex(#[serde(serialize_with = "ser_regex")] std::sync::Arc<regex::Regex>),
}

fn ser_regex<S: serde::Serializer>(
    r: &std::sync::Arc<regex::Regex>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

impl Matcher {
    pub fn matches(&self, value: &str, ignore_case: bool) -> bool {
        match self {
            Matcher::Exact(e) if ignore_case => e.eq_ignore_ascii_case(value),
            Matcher::Exact(e) => e == value,
            Matcher::Prefix(p) if ignore_case => {
                value.len() >= p.len() && value[..p.len()].eq_ignore_ascii_case(p)
            }
            Matcher::Prefix(p) => value.starts_with(p.as_str()),
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HttpMatch {
    pub name: Option<String>,
    pub uri: Option<Matcher>,
    pub scheme: Option<Matcher>,
    pub method: Option<Matcher>,
    pub authority: Option<Matcher>,
    pub headers: Vec<(String, Matcher)>,
    pub without_headers: Vec<(String, Matcher)>,
    pub query_params: Vec<(String, Matcher)>,
    pub port: Option<u32>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub ignore_uri_case: bool,
}

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
        body: Option<String>,
    },
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
}

#[derive(Debug, Clone, Serialize)]
pub struct L4Match {
    pub destination_subnets: Vec<String>,
    pub sni_hosts: Vec<String>,
    pub port: Option<u32>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

impl From<&istio::L4MatchAttributes> for L4Match {
    fn from(m: &istio::L4MatchAttributes) -> Self {
        Self {
            destination_subnets: m.destination_subnets.clone(),
            sni_hosts: Vec::new(),
            port: m.port,
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
        }
    }
}

impl From<&istio::TlsMatchAttributes> for L4Match {
    fn from(m: &istio::TlsMatchAttributes) -> Self {
        Self {
            destination_subnets: m.destination_subnets.clone(),
            sni_hosts: m.sni_hosts.clone(),
            port: m.port,
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
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
}

// ---- DestinationRule policies

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HashKey {
    Header {
        name: String,
    },
    Cookie {
        name: String,
        path: Option<String>,
        #[serde(serialize_with = "ser_duration")]
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter {
        name: String,
    },
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashAlgorithm {
    RingHash { minimum_ring_size: u64 },
    Maglev { table_size: u64 },
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LoadBalancer {
    Simple {
        algorithm: SimpleLb,
    },
    ConsistentHash {
        key: HashKey,
        algorithm: HashAlgorithm,
    },
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectionPool {
    pub max_connections: Option<u32>,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Option<Duration>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outlier {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(serialize_with = "ser_duration")]
    pub interval: Option<Duration>,
    #[serde(serialize_with = "ser_duration")]
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsOrigination {
    pub mode: TlsMode,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    /// The DestinationRule's namespace: a `credentialName` Secret is looked up there only
    /// (Istio's rule), never in another team's namespace.
    pub credential_namespace: String,
    pub subject_alt_names: Vec<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: bool,
}

/// One level of policy; unset fields inherit from the level above when merged.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Policy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<Outlier>,
    pub tls: Option<TlsOrigination>,
}

impl Policy {
    /// `self` over `base`, field by field.
    pub fn over(&self, base: &Policy) -> Policy {
        Policy {
            load_balancer: self
                .load_balancer
                .clone()
                .or_else(|| base.load_balancer.clone()),
            connection_pool: self
                .connection_pool
                .clone()
                .or_else(|| base.connection_pool.clone()),
            outlier_detection: self
                .outlier_detection
                .clone()
                .or_else(|| base.outlier_detection.clone()),
            tls: self.tls.clone().or_else(|| base.tls.clone()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SubsetPolicy {
    pub labels: BTreeMap<String, String>,
    pub policy: Policy,
    pub port_policies: BTreeMap<u32, Policy>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompiledDestinationRule {
    pub name: String,
    pub namespace: String,
    pub host: String,
    pub policy: Policy,
    pub port_policies: BTreeMap<u32, Policy>,
    /// Boxed: a B-tree node reserves room for eleven values, and a policy is ~500 bytes.
    pub subsets: BTreeMap<String, Box<SubsetPolicy>>,
    pub source: String,
}

impl CompiledDestinationRule {
    /// Every merged policy this rule can produce, keyed `*`, `port 80`, `subset v1`,
    /// `subset v1 port 80` (for /config_dump; the data path calls [`Self::effective`]).
    pub fn effective_all(&self) -> BTreeMap<String, Policy> {
        let mut ports: Vec<Option<u32>> = vec![None];
        ports.extend(self.port_policies.keys().copied().map(Some));
        for s in self.subsets.values() {
            ports.extend(s.port_policies.keys().copied().map(Some));
        }
        ports.sort();
        ports.dedup();
        let mut subsets: Vec<Option<&str>> = vec![None];
        subsets.extend(self.subsets.keys().map(|s| Some(s.as_str())));
        let mut out = BTreeMap::new();
        for subset in &subsets {
            for port in &ports {
                let key = match (subset, port) {
                    (None, None) => "*".to_string(),
                    (None, Some(p)) => format!("port {p}"),
                    (Some(s), None) => format!("subset {s}"),
                    (Some(s), Some(p)) => format!("subset {s} port {p}"),
                };
                out.insert(key, self.effective(*port, *subset));
            }
        }
        out
    }

    /// The policy for traffic to `port` of `subset`: subset-level over host-level, and at each
    /// level port-level settings over the level's defaults (Istio's precedence).
    pub fn effective(&self, port: Option<u32>, subset: Option<&str>) -> Policy {
        let host_level = match port.and_then(|p| self.port_policies.get(&p)) {
            Some(pp) => pp.over(&self.policy),
            None => self.policy.clone(),
        };
        match subset.and_then(|s| self.subsets.get(s)) {
            Some(sp) => {
                let subset_level = match port.and_then(|p| sp.port_policies.get(&p)) {
                    Some(pp) => pp.over(&sp.policy),
                    None => sp.policy.clone(),
                };
                subset_level.over(&host_level)
            }
            None => host_level,
        }
    }
}

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

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RoutePatch {
    /// HTTP_ROUTE MERGE: applies to every route of every virtual host of the port.
    MergeHttpRoute {
        cluster: Option<ClusterRef>,
        request_headers_to_add: Vec<(String, String, bool)>,
        #[serde(serialize_with = "ser_duration")]
        timeout: Option<Duration>,
    },
    /// VIRTUAL_HOST ADD: exact domains win over the catch-all.
    AddVirtualHost {
        name: Option<String>,
        domains: Vec<String>,
        routes: Vec<(Matcher, ClusterRef)>,
    },
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
    pub selector: BTreeMap<String, String>,
    pub patches: Vec<PortPatch>,
    pub source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompiledSidecar {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub outbound_mode: Option<OutboundMode>,
    pub source: String,
}

/// Everything routing needs, compiled.
#[derive(Debug, Default, Serialize)]
pub struct RouteTable {
    /// host (FQDN or wildcard) → VirtualServices for it, in configuration order.
    pub virtual_services: BTreeMap<String, Vec<std::sync::Arc<CompiledVirtualService>>>,
    /// host → DestinationRule (one per host; most specific namespace first at lookup).
    pub destination_rules: BTreeMap<String, Vec<CompiledDestinationRule>>,
    pub envoy_filters: Vec<CompiledEnvoyFilter>,
    pub sidecars: Vec<CompiledSidecar>,
}

impl RouteTable {
    /// DestinationRule for `host` as seen from `namespace`: one in the client's namespace
    /// first, then one in the host's own namespace, then any (Istio's lookup order).
    pub fn destination_rule(
        &self,
        host: &str,
        namespace: &str,
    ) -> Option<&CompiledDestinationRule> {
        let list = self.destination_rules.get(host)?;
        list.iter()
            .find(|d| d.namespace == namespace)
            .or_else(|| {
                list.iter()
                    .find(|d| host.split('.').nth(1) == Some(d.namespace.as_str()))
            })
            .or_else(|| list.first())
    }

    /// The Sidecar governing a workload: one in its namespace whose selector matches wins
    /// over the namespace's selector-less default (Istio's rule).
    pub fn sidecar_for(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<&CompiledSidecar> {
        let in_ns = || {
            self.sidecars
                .iter()
                .filter(move |s| s.namespace == namespace)
        };
        in_ns()
            .find(|s| s.selector.as_ref().is_some_and(|sel| selects(sel, labels)))
            .or_else(|| in_ns().find(|s| s.selector.is_none()))
    }

    /// EnvoyFilters applying to a workload, in configuration order: those of its namespace
    /// whose workloadSelector matches (an empty selector selects every workload there).
    pub fn envoy_filters_for<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a CompiledEnvoyFilter> + 'a {
        self.envoy_filters
            .iter()
            .filter(move |f| f.namespace == namespace && selects(&f.selector, labels))
    }

    /// VirtualServices for a host, exact name first, then the longest wildcard.
    pub fn virtual_services_for(&self, host: &str) -> &[std::sync::Arc<CompiledVirtualService>] {
        if let Some(v) = self.virtual_services.get(host) {
            return v;
        }
        self.virtual_services
            .iter()
            .filter(|(p, _)| crate::state::registry::host_matches(p, host))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    }
}

/// Label selector semantics: every selector label present with the same value.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

// ---- compile

struct Ctx<'a> {
    o: &'a Located<Object>,
    findings: &'a mut Vec<ConfigError>,
    /// Compiled regexes by pattern: the same pattern in many rules shares one automaton.
    regexes: &'a mut std::collections::HashMap<String, std::sync::Arc<regex::Regex>>,
}

impl Ctx<'_> {
    fn err(&mut self, line: u64, msg: impl Into<String>) {
        self.findings.push(self.o.error(line, msg));
    }
    fn warn(&mut self, line: u64, msg: impl Into<String>) {
        self.findings
            .push(self.o.finding(Severity::Warning, line, msg));
    }
    fn note(&mut self, line: u64, msg: impl Into<String>) {
        self.findings
            .push(self.o.finding(Severity::Note, line, msg));
    }
    fn source(&self, line: u64) -> String {
        let l = if line == 0 {
            self.o.origin.line
        } else {
            self.o.origin.doc_first_line + line as usize - 1
        };
        format!(
            "{} ({}:{})",
            self.o.object_ref,
            self.o.origin.path.display(),
            l
        )
    }
    fn duration(&mut self, d: &Option<Spanned<String>>, what: &str) -> Option<Duration> {
        let d = d.as_ref()?;
        match duration::parse(&d.value) {
            Ok(v) => Some(v),
            Err(e) => {
                self.err(d.referenced.line(), format!("{what}: {e}"));
                None
            }
        }
    }
    fn matcher(&mut self, m: &Spanned<istio::StringMatch>, what: &str) -> Option<Matcher> {
        let sm = &m.value;
        let set = [sm.exact.is_some(), sm.prefix.is_some(), sm.regex.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        if set != 1 {
            self.err(
                m.referenced.line(),
                format!("{what}: exactly one of exact, prefix or regex is required"),
            );
            return None;
        }
        if let Some(e) = &sm.exact {
            return Some(Matcher::Exact(e.clone()));
        }
        if let Some(p) = &sm.prefix {
            return Some(Matcher::Prefix(p.clone()));
        }
        let r = sm.regex.as_deref().unwrap_or("");
        if let Some(re) = self.regexes.get(r) {
            return Some(Matcher::Regex(re.clone()));
        }
        match regex::Regex::new(&format!("^(?:{r})$")) {
            Ok(re) => {
                let re = std::sync::Arc::new(re);
                self.regexes.insert(r.to_string(), re.clone());
                Some(Matcher::Regex(re))
            }
            Err(e) => {
                self.err(
                    m.referenced.line(),
                    format!(
                        "{what}: invalid regex {r:?}: {}",
                        e.to_string()
                            .lines()
                            .last()
                            .unwrap_or("")
                            .trim_start_matches("error: ")
                    ),
                );
                None
            }
        }
    }
    fn percent(&mut self, p: &Option<istio::Percent>, line: u64, what: &str) -> Option<f64> {
        let v = p.as_ref()?.value;
        if !(0.0..=100.0).contains(&v) {
            self.err(line, format!("{what}: percentage {v} is outside 0–100"));
            return None;
        }
        Some(v)
    }
}

fn header_ops(h: &Option<istio::HeaderOperations>) -> HeaderOps {
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

fn header_policy(h: &Option<istio::Headers>) -> HeaderPolicy {
    match h {
        Some(h) => HeaderPolicy {
            request: header_ops(&h.request),
            response: header_ops(&h.response),
        },
        None => HeaderPolicy::default(),
    }
}

const RETRY_ON: &[&str] = &[
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
struct DestCheck<'a> {
    registry: &'a Registry,
    subsets: &'a BTreeMap<String, Vec<String>>,
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
                None => self.err(
                    subset.referenced.line(),
                    format!(
                        "subset {:?}: no DestinationRule defines subsets for {host}",
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
        let mut sum = 0i64;
        for w in weights {
            let v = w.map(|w| w.value).unwrap_or(0);
            if v < 0 {
                self.err(
                    w.map(|w| w.referenced.line()).unwrap_or(rule_line),
                    format!("weight {v} is negative"),
                );
            }
            sum += v;
            out.push(v.max(0) as u32);
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

fn compile_virtual_service(
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
    let for_mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
    if !for_mesh {
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
            let prev_line = o.origin.doc_first_line + prev as usize - 1;
            cx.err(
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
                if let Some(mm) = cx.matcher(v, &format!("headers.{k}")) {
                    hm.headers.push((k.to_ascii_lowercase(), mm));
                }
            }
            for (k, v) in &mv.without_headers {
                if let Some(mm) = cx.matcher(v, &format!("withoutHeaders.{k}")) {
                    hm.without_headers.push((k.to_ascii_lowercase(), mm));
                }
            }
            for (k, v) in &mv.query_params {
                if let Some(mm) = cx.matcher(v, &format!("queryParams.{k}")) {
                    hm.query_params.push((k.clone(), mm));
                }
            }
            if !mv.gateways.is_empty() && !mv.gateways.iter().any(|g| g == "mesh") {
                cx.note(
                    m.referenced.line(),
                    "match bound to gateways only: never matches pod traffic",
                );
            }
            matches.push(hm);
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
                HttpAction::DirectResponse {
                    status: dr.status,
                    body: dr.body.and_then(|b| b.string),
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
        let timeout = cx.duration(&r.timeout, "timeout");
        let retries = r.retries.as_ref().map(|rt| {
            let mut retry_on = Vec::new();
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
                per_try_timeout: cx.duration(&rt.per_try_timeout, "retries.perTryTimeout"),
                retry_on,
            }
        });
        let fault = r.fault.as_ref().map(|f| Fault {
            delay: f
                .delay
                .as_ref()
                .and_then(|d| cx.duration(&d.fixed_delay, "fault.delay.fixedDelay")),
            delay_percent: f
                .delay
                .as_ref()
                .map(|d| {
                    cx.percent(&d.percentage, line, "fault.delay")
                        .or(d.percent.map(|p| p as f64))
                        .unwrap_or(100.0)
                })
                .unwrap_or(0.0),
            abort_status: f.abort.as_ref().and_then(|a| a.http_status),
            abort_percent: f
                .abort
                .as_ref()
                .map(|a| {
                    cx.percent(&a.percentage, line, "fault.abort")
                        .unwrap_or(100.0)
                })
                .unwrap_or(0.0),
        });
        let mut mirrors = Vec::new();
        if let Some(m) = &r.mirror {
            let percent = match (&r.mirror_percentage, r.mirror_percent) {
                (Some(_), _) => cx
                    .percent(&r.mirror_percentage, line, "mirrorPercentage")
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
                .percent(&m.percentage, line, "mirrors.percentage")
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
        .map(|t| {
            let matches = t.value.matches.iter().map(L4Match::from).collect();
            l4_rule(&mut cx, matches, &t.value.route, t.referenced.line())
        })
        .collect();
    let tls: Vec<L4Rule> = spec
        .tls
        .iter()
        .map(|t| {
            if t.value.matches.iter().all(|m| m.sni_hosts.is_empty()) {
                cx.err(t.referenced.line(), "tls routes need match[].sniHosts");
            }
            let matches = t.value.matches.iter().map(L4Match::from).collect();
            l4_rule(&mut cx, matches, &t.value.route, t.referenced.line())
        })
        .collect();
    Some(CompiledVirtualService {
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

fn compile_policy(cx: &mut Ctx, tp: &istio::TrafficPolicy) -> (Policy, BTreeMap<u32, Policy>) {
    let base = level_policy(
        cx,
        &tp.load_balancer,
        &tp.connection_pool,
        &tp.outlier_detection,
        &tp.tls,
    );
    let mut ports = BTreeMap::new();
    for p in &tp.port_level_settings {
        let pl = &p.value;
        let policy = level_policy(
            cx,
            &pl.load_balancer,
            &pl.connection_pool,
            &pl.outlier_detection,
            &pl.tls,
        );
        if ports.insert(pl.port.number, policy).is_some() {
            cx.err(
                p.referenced.line(),
                format!("portLevelSettings lists port {} twice", pl.port.number),
            );
        }
    }
    (base, ports)
}

fn level_policy(
    cx: &mut Ctx,
    lb: &Option<Spanned<istio::LoadBalancerSettings>>,
    pool: &Option<istio::ConnectionPoolSettings>,
    outlier: &Option<Spanned<istio::OutlierDetection>>,
    tls: &Option<Spanned<istio::ClientTlsSettings>>,
) -> Policy {
    let load_balancer = lb.as_ref().and_then(|lb| {
        let line = lb.referenced.line();
        let lb = &lb.value;
        match (&lb.simple, &lb.consistent_hash) {
        (Some(_), Some(_)) => {
            cx.err(line, "loadBalancer: simple and consistentHash exclude each other");
            None
        }
        (Some(s), None) => Some(LoadBalancer::Simple { algorithm: *s }),
        (None, Some(ch)) => {
            let keys = [ch.http_header_name.is_some(), ch.http_cookie.is_some(), ch.use_source_ip, ch.http_query_parameter_name.is_some()];
            if keys.iter().filter(|k| **k).count() != 1 {
                cx.err(line, "consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName");
                return None;
            }
            let key = if let Some(h) = &ch.http_header_name {
                HashKey::Header { name: h.to_ascii_lowercase() }
            } else if let Some(c) = &ch.http_cookie {
                HashKey::Cookie { name: c.name.clone(), path: c.path.clone(), ttl: cx.duration(&c.ttl, "httpCookie.ttl") }
            } else if ch.use_source_ip {
                HashKey::SourceIp
            } else {
                HashKey::QueryParameter { name: ch.http_query_parameter_name.clone().unwrap_or_default() }
            };
            let algorithm = match (&ch.ring_hash, &ch.maglev) {
                (Some(_), Some(_)) => {
                    cx.err(line, "consistentHash: ringHash and maglev exclude each other");
                    HashAlgorithm::RingHash { minimum_ring_size: 1024 }
                }
                (None, Some(m)) => HashAlgorithm::Maglev { table_size: m.table_size.unwrap_or(65537) },
                (Some(r), None) => HashAlgorithm::RingHash { minimum_ring_size: r.minimum_ring_size.unwrap_or(1024) },
                (None, None) => HashAlgorithm::RingHash { minimum_ring_size: ch.minimum_ring_size.unwrap_or(1024) },
            };
            Some(LoadBalancer::ConsistentHash { key, algorithm })
        }
        (None, None) => None,
        }
    });
    let u = |v: Option<i64>| v.map(|v| v.clamp(0, u32::MAX as i64) as u32);
    let connection_pool = pool.as_ref().map(|p| ConnectionPool {
        max_connections: u(p.tcp.as_ref().and_then(|t| t.max_connections)),
        connect_timeout: p
            .tcp
            .as_ref()
            .and_then(|t| cx.duration(&t.connect_timeout, "tcp.connectTimeout")),
        http1_max_pending_requests: u(p.http.as_ref().and_then(|h| h.http1_max_pending_requests)),
        http2_max_requests: u(p.http.as_ref().and_then(|h| h.http2_max_requests)),
        max_requests_per_connection: u(p.http.as_ref().and_then(|h| h.max_requests_per_connection)),
        max_retries: u(p.http.as_ref().and_then(|h| h.max_retries)),
    });
    let outlier_detection = outlier.as_ref().map(|od| {
        let line = od.referenced.line();
        let od = &od.value;
        let max = od.max_ejection_percent.unwrap_or(10);
        if !(0..=100).contains(&max) {
            cx.err(line, format!("maxEjectionPercent {max} is outside 0–100"));
        }
        Outlier {
            consecutive_5xx_errors: u(od.consecutive_5xx_errors),
            consecutive_gateway_errors: u(od.consecutive_gateway_errors.or(od.consecutive_errors)),
            interval: cx.duration(&od.interval, "outlierDetection.interval"),
            base_ejection_time: cx
                .duration(&od.base_ejection_time, "outlierDetection.baseEjectionTime"),
            max_ejection_percent: max.clamp(0, 100) as u32,
        }
    });
    let tls = tls.as_ref().map(|t| {
        let line = t.referenced.line();
        let t = &t.value;
        if t.mode == TlsMode::Mutual
            && t.credential_name.is_none()
            && (t.client_certificate.is_none() || t.private_key.is_none())
        {
            cx.err(
                line,
                "tls mode MUTUAL needs clientCertificate and privateKey (or credentialName)",
            );
        }
        if t.mode == TlsMode::IstioMutual {
            cx.err(
                line,
                "tls mode ISTIO_MUTUAL is not supported: proxy-daemon has no mesh identity yet",
            );
        }
        TlsOrigination {
            mode: t.mode,
            client_certificate: t.client_certificate.clone(),
            private_key: t.private_key.clone(),
            ca_certificates: t.ca_certificates.clone(),
            credential_name: t.credential_name.clone(),
            credential_namespace: cx.o.object_ref.namespace.clone(),
            subject_alt_names: t.subject_alt_names.clone(),
            sni: t.sni.clone(),
            insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
        }
    });
    Policy {
        load_balancer,
        connection_pool,
        outlier_detection,
        tls,
    }
}

fn compile_destination_rule(
    o: &Located<Object>,
    dr: &istio::IstioObject<istio::DestinationRuleSpec>,
    registry: &Registry,
    findings: &mut Vec<ConfigError>,
) -> CompiledDestinationRule {
    let mut regexes = std::collections::HashMap::new();
    let mut cx = Ctx {
        o,
        findings,
        regexes: &mut regexes,
    };
    let ns = o.object_ref.namespace.clone();
    let host = resolve_host(&dr.spec.host.value, &ns);
    if !registry.contains_host(&host) {
        cx.warn(
            dr.spec.host.referenced.line(),
            format!("host {host} is not a known Service or ServiceEntry host"),
        );
    }
    let (policy, port_policies) = match &dr.spec.traffic_policy {
        Some(tp) => compile_policy(&mut cx, tp),
        None => (Policy::default(), BTreeMap::new()),
    };
    let mut subsets = BTreeMap::new();
    for s in &dr.spec.subsets {
        let (p, pp) = match &s.value.traffic_policy {
            Some(tp) => compile_policy(&mut cx, tp),
            None => (Policy::default(), BTreeMap::new()),
        };
        let sp = Box::new(SubsetPolicy {
            labels: s.value.labels.clone(),
            policy: p,
            port_policies: pp,
        });
        if subsets.insert(s.value.name.clone(), sp).is_some() {
            cx.err(
                s.referenced.line(),
                format!("subset {:?} is defined twice", s.value.name),
            );
        }
    }
    CompiledDestinationRule {
        name: o.object_ref.name.clone(),
        namespace: ns,
        host,
        policy,
        port_policies,
        subsets,
        source: cx.source(0),
    }
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
        ["outbound", port, subset, host] => Ok(ClusterRef::Service {
            port: port.parse().map_err(|_| format!("cluster {name:?}: {port:?} is not a port"))?,
            subset: (!subset.is_empty()).then(|| subset.to_string()),
            host: host.to_ascii_lowercase(),
        }),
        _ => Err(format!("cluster {name:?}: expected outbound|PORT|SUBSET|HOST, PassthroughCluster or BlackHoleCluster")),
    }
}

fn compile_envoy_filter(
    o: &Located<Object>,
    ef: &istio::IstioObject<istio::EnvoyFilterSpec>,
    registry: &Registry,
    findings: &mut Vec<ConfigError>,
) -> CompiledEnvoyFilter {
    let mut regexes = std::collections::HashMap::new();
    let mut cx = Ctx {
        o,
        findings,
        regexes: &mut regexes,
    };
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
        if let Some(m) = &p.patch_match {
            if let Some(px) = &m.proxy {
                cx.err(
                    px.referenced.line(),
                    format!("{what}: match.proxy is not supported"),
                );
            }
            if let Some(vh) = m
                .route_configuration
                .as_ref()
                .and_then(|r| r.vhost.as_ref())
            {
                cx.err(
                    vh.referenced.line(),
                    format!("{what}: routeConfiguration.vhost is not supported"),
                );
            }
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
                        RoutePatch::MergeHttpRoute {
                            cluster,
                            request_headers_to_add: v
                                .request_headers_to_add
                                .iter()
                                .map(|h| {
                                    (
                                        h.header.key.to_ascii_lowercase(),
                                        h.header.value.clone(),
                                        h.append.unwrap_or(true),
                                    )
                                })
                                .collect(),
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
                            match r
                                .route
                                .as_ref()
                                .and_then(|a| a.cluster.as_deref())
                                .map(parse_cluster)
                            {
                                Some(Ok(c)) => routes.push((m, c)),
                                Some(Err(e)) => cx.err(value_line, format!("{what}: {e}")),
                                None => cx.err(
                                    value_line,
                                    format!("{what}: each route needs route.cluster"),
                                ),
                            }
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
    CompiledEnvoyFilter {
        name: o.object_ref.name.clone(),
        namespace: o.object_ref.namespace.clone(),
        selector: ef
            .spec
            .workload_selector
            .as_ref()
            .map(|s| s.labels.clone())
            .unwrap_or_default(),
        patches,
        source: cx.source(0),
    }
}

/// Compiles the routing objects; findings (errors, warnings, notes) go to `findings`.
pub fn build(
    objects: &[Located<Object>],
    registry: &Registry,
    findings: &mut Vec<ConfigError>,
) -> RouteTable {
    let mut table = RouteTable::default();
    for o in objects {
        if let Object::DestinationRule(dr) = &o.value {
            let c = compile_destination_rule(o, dr, registry, findings);
            let list = table.destination_rules.entry(c.host.clone()).or_default();
            if let Some(other) = list.iter().find(|d| d.namespace == c.namespace) {
                findings.push(o.error(
                    dr.spec.host.referenced.line(),
                    format!(
                        "conflicts with {}: both are DestinationRules for {} in namespace {}",
                        other.source, c.host, c.namespace
                    ),
                ));
                continue;
            }
            list.push(c);
        }
    }
    let subsets: BTreeMap<String, Vec<String>> = table
        .destination_rules
        .iter()
        .map(|(h, list)| {
            (
                h.clone(),
                list.iter()
                    .flat_map(|d| d.subsets.keys().cloned())
                    .collect(),
            )
        })
        .collect();
    let check = DestCheck {
        registry,
        subsets: &subsets,
    };
    let mut regexes = std::collections::HashMap::new();
    for o in objects {
        match &o.value {
            Object::VirtualService(vs) => {
                if let Some(c) = compile_virtual_service(o, vs, &check, findings, &mut regexes) {
                    let c = std::sync::Arc::new(c);
                    for (h, spanned) in c.hosts.iter().zip(&vs.spec.hosts) {
                        let list = table.virtual_services.entry(h.clone()).or_default();
                        if let Some(other) = list.iter().find(|v| v.namespace == c.namespace) {
                            findings.push(o.error(
                                spanned.referenced.line(),
                                format!("conflicts with {}: both route host {h} in namespace {} (Istio would pick one arbitrarily)", other.source, c.namespace),
                            ));
                            continue;
                        }
                        list.push(c.clone());
                    }
                }
            }
            Object::EnvoyFilter(ef) => table
                .envoy_filters
                .push(compile_envoy_filter(o, ef, registry, findings)),
            Object::Sidecar(sc) => table.sidecars.push(CompiledSidecar {
                name: o.object_ref.name.clone(),
                namespace: o.object_ref.namespace.clone(),
                selector: sc.spec.workload_selector.as_ref().map(|s| s.labels.clone()),
                outbound_mode: sc.spec.outbound_traffic_policy.as_ref().map(|p| p.mode),
                source: format!(
                    "{} ({}:{})",
                    o.object_ref,
                    o.origin.path.display(),
                    o.origin.line
                ),
            }),
            Object::Gateway => findings.push(o.finding(
                Severity::Note,
                0,
                "Gateway configures ingress gateways; the node proxy does not use it",
            )),
            _ => {}
        }
    }
    table
}
