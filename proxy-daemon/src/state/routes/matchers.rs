//! Matchers: string matchers (exact, prefix, whole-value regex), HTTP request matches and
//! L4/TLS matches, as VirtualService rules use them.
use super::*;

/// A compiled string matcher (Envoy semantics: regex must match the whole value).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    /// The Gateway API's PathPrefix: whole path segments (`/v2` matches `/v2` and `/v2/x`,
    /// not `/v2x`); kept without its trailing `/` (`""` is `/`, every path).
    PathPrefix(String),
    /// Shared: one compiled automaton (and cache pool) per distinct pattern.
    Regex(#[serde(serialize_with = "ser_regex")] std::sync::Arc<regex::Regex>),
}

pub(super) fn ser_regex<S: serde::Serializer>(
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
            Matcher::PathPrefix(p) => {
                let head = value.get(..p.len());
                let same = match head {
                    Some(h) if ignore_case => h.eq_ignore_ascii_case(p),
                    Some(h) => h == p,
                    None => false,
                };
                same && matches!(value.as_bytes().get(p.len()), None | Some(b'/'))
            }
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

#[derive(Debug, Clone, Serialize)]
pub struct L4Match {
    /// Parsed once here (a bare address is its /32 or /128); a malformed one is an error
    /// of the VirtualService, found at compile.
    pub destination_subnets: Vec<ipnet::IpNet>,
    pub sni_hosts: Vec<String>,
    pub port: Option<u32>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

/// `destinationSubnets` entries as networks; Err names the first that is not one.
pub fn parse_subnets(subnets: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    subnets
        .iter()
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("destinationSubnets: {s:?} is not an IP address or CIDR"))
        })
        .collect()
}

impl From<&istio::L4MatchAttributes> for L4Match {
    fn from(m: &istio::L4MatchAttributes) -> Self {
        Self {
            destination_subnets: parse_subnets(&m.destination_subnets).unwrap_or_default(),
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
            destination_subnets: parse_subnets(&m.destination_subnets).unwrap_or_default(),
            sni_hosts: m.sni_hosts.clone(),
            port: m.port,
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
        }
    }
}
