//! `networking.istio.io` kinds (v1, v1beta1, v1alpha3 share one schema), with Istio's field
//! names and enum spellings. Every struct denies unknown fields, so a field we do not
//! implement is an explicit error, never silently dropped. Fields whose position a later
//! check must report are `Spanned`.
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

pub type Labels = BTreeMap<String, String>;

/// Istio fields that are valid but not implemented here; an unknown field in this list is
/// reported as "not supported" instead of "unknown".
pub const KNOWN_UNSUPPORTED_FIELDS: &[&str] = &[
    "corsPolicy",
    "delegate",
    "uriRegexRewrite",
    "derivePort",
    "retryRemoteLocalities",
    "grpcStatus",
    "http2Error",
    "localityLbSetting",
    "warmupDurationSecs",
    "warmup",
    "tunnel",
    "proxyProtocol",
    "workloadSelector",
    "ingress",
    "inboundConnectionPool",
    "outboundTrafficPolicyEgressProxy",
    "egressProxy",
    "statPrefix",
    "maxStreamDuration",
    "tcpKeepalive",
    "mirrorPolicy",
    "network",
    "locality",
    "serviceAccount",
    "sniHosts",
    "retryIgnorePreviousHosts",
    "backoff",
    "retryBudget",
    "attributes",
    "maxConnectionDuration",
    "maxConcurrentStreams",
    "caCrl",
];

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Destination {
    pub host: Spanned<String>,
    pub subset: Option<Spanned<String>>,
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: Destination,
    pub weight: Option<Spanned<i64>>,
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<Spanned<StringMatch>>,
    pub scheme: Option<Spanned<StringMatch>>,
    pub method: Option<Spanned<StringMatch>>,
    pub authority: Option<Spanned<StringMatch>>,
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<StringMatch>>,
    pub port: Option<u32>,
    #[serde(default)]
    pub source_labels: Labels,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub query_params: BTreeMap<String, Spanned<StringMatch>>,
    #[serde(default)]
    pub ignore_uri_case: bool,
    #[serde(default)]
    pub without_headers: BTreeMap<String, Spanned<StringMatch>>,
    pub source_namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u32>,
    pub scheme: Option<String>,
    pub redirect_code: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpBody {
    pub string: Option<String>,
    pub bytes: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpDirectResponse {
    pub status: u32,
    pub body: Option<HttpBody>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRetry {
    #[serde(default)]
    pub attempts: i64,
    pub per_try_timeout: Option<Spanned<String>>,
    pub retry_on: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Percent {
    pub value: f64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed_delay: Option<Spanned<String>>,
    pub percentage: Option<Spanned<Percent>>,
    pub percent: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    pub http_status: Option<u32>,
    pub percentage: Option<Spanned<Percent>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpFaultInjection {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    pub percentage: Option<Spanned<Percent>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matches: Vec<Spanned<HttpMatchRequest>>,
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<Spanned<String>>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFaultInjection>,
    pub mirror: Option<Destination>,
    #[serde(default)]
    pub mirrors: Vec<HttpMirrorPolicy>,
    pub mirror_percentage: Option<Spanned<Percent>>,
    /// Deprecated spelling kept by Istio; both forms appear in published YAML.
    #[serde(alias = "mirror_percent")]
    pub mirror_percent: Option<u32>,
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<Spanned<i64>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct L4MatchAttributes {
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    pub port: Option<u32>,
    #[serde(default)]
    pub source_labels: Labels,
    #[serde(default)]
    pub gateways: Vec<String>,
    pub source_namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsMatchAttributes {
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    pub port: Option<u32>,
    #[serde(default)]
    pub source_labels: Labels,
    #[serde(default)]
    pub gateways: Vec<String>,
    pub source_namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpRoute {
    #[serde(rename = "match", default)]
    pub matches: Vec<L4MatchAttributes>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsRoute {
    #[serde(rename = "match", default)]
    pub matches: Vec<TlsMatchAttributes>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<Spanned<HttpRoute>>,
    #[serde(default)]
    pub tcp: Vec<Spanned<TcpRoute>>,
    #[serde(default)]
    pub tls: Vec<Spanned<TlsRoute>>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpCookie {
    pub name: String,
    pub path: Option<String>,
    pub ttl: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RingHash {
    pub minimum_ring_size: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Maglev {
    pub table_size: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConsistentHashLb {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    #[serde(default)]
    pub use_source_ip: bool,
    pub http_query_parameter_name: Option<String>,
    pub ring_hash: Option<RingHash>,
    pub maglev: Option<Maglev>,
    /// Deprecated top-level form of ringHash.minimumRingSize.
    pub minimum_ring_size: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    Unspecified,
    LeastConn,
    Random,
    Passthrough,
    RoundRobin,
    LeastRequest,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    pub simple: Option<SimpleLb>,
    pub consistent_hash: Option<ConsistentHashLb>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpSettings {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpSettings {
    pub http1_max_pending_requests: Option<i64>,
    pub http2_max_requests: Option<i64>,
    pub max_requests_per_connection: Option<i64>,
    pub max_retries: Option<i64>,
    pub h2_upgrade_policy: Option<Spanned<String>>,
    pub use_client_protocol: Option<bool>,
    pub idle_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPoolSettings {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Deprecated alias of consecutiveGatewayErrors in old Istio.
    pub consecutive_errors: Option<i64>,
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub interval: Option<Spanned<String>>,
    pub base_ejection_time: Option<Spanned<String>>,
    pub max_ejection_percent: Option<i64>,
    pub min_health_percent: Option<i64>,
    #[serde(default)]
    pub split_external_local_origin_errors: bool,
    pub consecutive_local_origin_failures: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientTlsSettings {
    pub mode: TlsMode,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: PortSelector,
    pub load_balancer: Option<Spanned<LoadBalancerSettings>>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<Spanned<OutlierDetection>>,
    pub tls: Option<Spanned<ClientTlsSettings>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<Spanned<LoadBalancerSettings>>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<Spanned<OutlierDetection>>,
    pub tls: Option<Spanned<ClientTlsSettings>>,
    #[serde(default)]
    pub port_level_settings: Vec<Spanned<PortTrafficPolicy>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: Spanned<String>,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Spanned<Subset>>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub number: u32,
    pub protocol: Option<String>,
    pub name: Option<String>,
    pub target_port: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadEntry {
    pub address: String,
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: Labels,
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    #[serde(default)]
    pub addresses: Vec<Spanned<String>>,
    #[serde(default)]
    pub ports: Vec<Spanned<ServicePort>>,
    pub location: Option<Location>,
    pub resolution: Option<Resolution>,
    #[serde(default)]
    pub endpoints: Vec<Spanned<WorkloadEntry>>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    RegistryOnly,
    AllowAny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    pub mode: OutboundMode,
}

/// Sidecar: `workloadSelector`, `outboundTrafficPolicy` and `egress[].hosts` (what the
/// workload sees) mean something to a node proxy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SidecarSpec {
    #[serde(rename = "workloadSelector")]
    pub workload_selector: Option<WorkloadSelector>,
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    #[serde(default)]
    pub egress: Vec<Spanned<SidecarEgress>>,
}

/// One egress listener of a Sidecar: its `hosts` (`namespace/dnsName`) say which services
/// and rules the workload sees. A node proxy has no per-workload listeners, so `port`,
/// `bind` and `captureMode` do not apply (accepted, noted).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SidecarEgress {
    #[serde(default)]
    pub hosts: Vec<String>,
    pub port: Option<serde::de::IgnoredAny>,
    pub bind: Option<serde::de::IgnoredAny>,
    pub capture_mode: Option<serde::de::IgnoredAny>,
}

// ---- EnvoyFilter: the outbound route overrides teams write (Envoy's snake_case inside `value`).

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyHeader {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyHeaderValueOption {
    pub header: EnvoyHeader,
    pub append: Option<bool>,
    pub append_action: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyRouteAction {
    pub cluster: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyRouteMatch {
    pub prefix: Option<String>,
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyRoute {
    #[serde(rename = "match")]
    pub route_match: Option<EnvoyRouteMatch>,
    pub route: Option<EnvoyRouteAction>,
    #[serde(default)]
    pub request_headers_to_add: Vec<EnvoyHeaderValueOption>,
    pub name: Option<String>,
}

/// `value` of an HTTP_ROUTE MERGE patch.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRouteMerge {
    pub route: Option<EnvoyRouteAction>,
    #[serde(default)]
    pub request_headers_to_add: Vec<EnvoyHeaderValueOption>,
    pub timeout: Option<String>,
}

/// `value` of a VIRTUAL_HOST ADD patch.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHostAdd {
    pub name: Option<String>,
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub routes: Vec<EnvoyRoute>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteConfigurationMatch {
    pub name: Option<String>,
    pub port_number: Option<u32>,
    pub vhost: Option<serde_saphyr::Spanned<VhostMatch>>,
    /// Istio's, kept only to say they are not supported (the filter is then skipped).
    pub port_name: Option<Spanned<serde_json::Value>>,
    pub gateway: Option<Spanned<serde_json::Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VhostMatch {
    pub name: Option<String>,
    /// Istio's, kept only to say they are not supported (the filter is then skipped).
    pub domain_name: Option<Spanned<serde_json::Value>>,
    pub route: Option<Spanned<serde_json::Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PatchMatch {
    pub context: Option<String>,
    pub route_configuration: Option<RouteConfigurationMatch>,
    pub proxy: Option<serde_saphyr::Spanned<ProxyMatch>>,
    /// Istio's listener and cluster matches: valid, kept only to say they are not
    /// supported (the filter is then skipped).
    pub listener: Option<Spanned<serde_json::Value>>,
    pub cluster: Option<Spanned<serde_json::Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyMatch {
    pub proxy_version: Option<String>,
    /// Istio's; `match.proxy` as a whole is reported as not supported.
    pub metadata: Option<serde_json::Value>,
}

/// A patch's `value` is kept as text here and parsed by the compiler once `applyTo` and
/// `operation` say which shape it must have.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Patch {
    pub operation: Spanned<String>,
    pub value: Option<Spanned<serde_json::Value>>,
    /// Istio's filter placement for INSERT_* of HTTP filters (not supported).
    pub filter_class: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigPatch {
    pub apply_to: Spanned<String>,
    #[serde(rename = "match")]
    pub patch_match: Option<PatchMatch>,
    pub patch: Patch,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvoyFilterSpec {
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub config_patches: Vec<Spanned<ConfigPatch>>,
    pub priority: Option<i64>,
    /// Istio 1.22+ policy attachment (gateways, waypoints): not supported.
    pub target_refs: Option<Spanned<serde_json::Value>>,
}

/// An Istio object: metadata plus its typed spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IstioObject<S> {
    #[serde(default)]
    pub metadata: super::k8s::ObjectMeta,
    pub spec: S,
}
