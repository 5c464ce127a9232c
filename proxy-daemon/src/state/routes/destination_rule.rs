//! DestinationRule: traffic policies (load balancer, connection pool, outlier detection,
//! TLS origination) per host, subset and port, merged subset > port > host.
use super::*;

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
    /// `tcp.idleTimeout`: an opaque TCP connection with no bytes either way this long is
    /// closed (Istio's default 1 h; 0s disables).
    #[serde(serialize_with = "ser_duration")]
    pub tcp_idle_timeout: Option<Duration>,
    /// `http.idleTimeout`: a pooled upstream connection unused this long is closed
    /// (default 1 h; 0s disables).
    #[serde(serialize_with = "ser_duration")]
    pub http_idle_timeout: Option<Duration>,
    /// `http.h2UpgradePolicy`: Some(true) UPGRADE (HTTP/1.1 requests go upstream over
    /// h2), Some(false) DO_NOT_UPGRADE, None DEFAULT (the mesh default: no upgrade).
    pub h2_upgrade: Option<bool>,
    /// `http.useClientProtocol`: upstream in the protocol the client used, whatever the
    /// port declares.
    pub use_client_protocol: bool,
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
    /// Envoy's healthy panic threshold: below this share of healthy endpoints, all are used.
    pub min_health_percent: u32,
    /// Connect failures, timeouts and resets counted apart from the upstream's 5xx.
    pub split_external_local_origin_errors: bool,
    /// With the split: consecutive local-origin failures that eject (Envoy's default 5).
    pub consecutive_local_origin_failures: Option<u32>,
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
    /// Namespaces that see it (empty: all).
    pub export_to: Vec<String>,
    pub host: String,
    pub policy: Policy,
    pub port_policies: BTreeMap<u32, Policy>,
    /// Boxed: a B-tree node reserves room for eleven values, and a policy is ~500 bytes.
    pub subsets: BTreeMap<String, Box<SubsetPolicy>>,
    pub source: String,
    /// Whether the rule set a top-level `trafficPolicy` (merging keeps the first one set).
    #[serde(skip)]
    pub has_traffic_policy: bool,
    /// Rules of the same namespace and host merged into this one (their sources).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<String>,
}

impl CompiledDestinationRule {
    /// Merges a younger rule of the same namespace and host into this one, as Istio does:
    /// subsets are joined (a name already defined keeps its first definition) and the
    /// first top-level traffic policy set is used. Returns what to report.
    pub fn merge(&mut self, younger: CompiledDestinationRule) -> String {
        let mut dropped = Vec::new();
        for (name, subset) in younger.subsets {
            match self.subsets.entry(name) {
                std::collections::btree_map::Entry::Occupied(e) => dropped.push(e.key().clone()),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(subset);
                }
            }
        }
        let policy_note = if self.has_traffic_policy && younger.has_traffic_policy {
            "; its trafficPolicy is ignored (the older rule's applies)"
        } else {
            ""
        };
        if !self.has_traffic_policy && younger.has_traffic_policy {
            self.policy = younger.policy;
            self.port_policies = younger.port_policies;
            self.has_traffic_policy = true;
        }
        if self.export_to != younger.export_to {
            // Istio keeps such rules apart; one rule per namespace here: the older
            // exportTo stands.
            self.merged.push(format!(
                "{} (exportTo differs: the older rule's applies)",
                younger.source
            ));
        } else {
            self.merged.push(younger.source.clone());
        }
        let subsets_note = if dropped.is_empty() {
            String::new()
        } else {
            format!("; subsets {dropped:?} are already defined there and keep that definition")
        };
        format!(
            "{} is merged into {} (both are DestinationRules for {} in namespace {}, as Istio merges them){subsets_note}{policy_note}",
            younger.source, self.source, self.host, self.namespace
        )
    }

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

pub(super) fn compile_policy(
    cx: &mut Ctx,
    tp: &istio::TrafficPolicy,
) -> (Policy, BTreeMap<u32, Policy>) {
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

pub(super) fn level_policy(
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
                (None, Some(m)) => {
                    let size = m.table_size.unwrap_or(MAGLEV_DEFAULT_TABLE);
                    // Envoy requires a prime (keys spread evenly) no larger than 5,000,011:
                    // an absurd size would make every table a huge allocation.
                    if size > MAGLEV_MAX_TABLE || !is_prime(size) {
                        cx.err(line, format!("maglev.tableSize {size}: must be a prime no larger than {MAGLEV_MAX_TABLE} (Envoy's rule; default {MAGLEV_DEFAULT_TABLE})"));
                        HashAlgorithm::Maglev { table_size: MAGLEV_DEFAULT_TABLE }
                    } else {
                        HashAlgorithm::Maglev { table_size: size }
                    }
                }
                (Some(r), None) => HashAlgorithm::RingHash { minimum_ring_size: r.minimum_ring_size.unwrap_or(1024).min(RING_MAX_SIZE) },
                (None, None) => HashAlgorithm::RingHash { minimum_ring_size: ch.minimum_ring_size.unwrap_or(1024).min(RING_MAX_SIZE) },
            };
            Some(LoadBalancer::ConsistentHash { key, algorithm })
        }
        (None, None) => None,
        }
    });
    let u = |v: Option<i64>| v.map(|v| v.clamp(0, u32::MAX as i64) as u32);
    // Istio passes these thresholds on only when above 0 (0 leaves Envoy's default: for
    // maxRetries and the others, no limit).
    let positive = |v: Option<i64>| u(v).filter(|n| *n > 0);
    let connection_pool = pool.as_ref().map(|p| ConnectionPool {
        max_connections: positive(p.tcp.as_ref().and_then(|t| t.max_connections)),
        connect_timeout: p
            .tcp
            .as_ref()
            .and_then(|t| cx.duration(&t.connect_timeout, "tcp.connectTimeout")),
        http1_max_pending_requests: positive(p.http.as_ref().and_then(|h| h.http1_max_pending_requests)),
        http2_max_requests: positive(p.http.as_ref().and_then(|h| h.http2_max_requests)),
        max_requests_per_connection: positive(p.http.as_ref().and_then(|h| h.max_requests_per_connection)),
        max_retries: positive(p.http.as_ref().and_then(|h| h.max_retries)),
        tcp_idle_timeout: p
            .tcp
            .as_ref()
            .and_then(|t| cx.duration(&t.idle_timeout, "tcp.idleTimeout")),
        http_idle_timeout: p
            .http
            .as_ref()
            .and_then(|h| cx.duration(&h.idle_timeout, "http.idleTimeout")),
        h2_upgrade: match p.http.as_ref().and_then(|h| h.h2_upgrade_policy.as_ref()) {
            None => None,
            Some(v) => match v.value.as_str() {
            "DEFAULT" => None,
            "UPGRADE" => Some(true),
            "DO_NOT_UPGRADE" => Some(false),
            other => {
                cx.err(
                    v.referenced.line(),
                    format!(
                        "connectionPool.http.h2UpgradePolicy {other:?}: expected DEFAULT, DO_NOT_UPGRADE or UPGRADE"
                    ),
                );
                None
            }
            },
        },
        use_client_protocol: p
            .http
            .as_ref()
            .and_then(|h| h.use_client_protocol)
            .unwrap_or(false),
    });
    let outlier_detection = outlier.as_ref().map(|od| {
        let line = od.referenced.line();
        let od = &od.value;
        // Istio passes maxEjectionPercent only when above 0; otherwise Envoy's 10 applies.
        let max = od.max_ejection_percent.filter(|m| *m > 0).unwrap_or(10);
        if !(0..=100).contains(&max) {
            cx.err(line, format!("maxEjectionPercent {max} is outside 0–100"));
        }
        let min_health = od.min_health_percent.unwrap_or(0);
        if !(0..=100).contains(&min_health) {
            cx.err(
                line,
                format!("minHealthPercent {min_health} is outside 0–100"),
            );
        }
        // Unset is Envoy's default, 5 consecutive 5xx (Istio passes nothing, and Envoy
        // enforces its default); 0 turns it off. Istio's deprecated consecutiveErrors
        // counts gateway errors only: with it (and no consecutive5xxErrors), Istio turns
        // the 5xx detector's enforcement off.
        let consecutive_5xx = match (od.consecutive_5xx_errors, od.consecutive_errors) {
            (Some(n), _) => Some(n),
            (None, Some(n)) if n > 0 => Some(0),
            (None, _) => Some(5),
        };
        let local_origin = match od.consecutive_local_origin_failures {
            Some(n) if n > 0 => Some(n),
            _ => Some(5),
        };
        Outlier {
            consecutive_5xx_errors: u(consecutive_5xx).filter(|n| *n > 0),
            consecutive_gateway_errors: u(od.consecutive_gateway_errors.or(od.consecutive_errors))
                .filter(|n| *n > 0),
            interval: cx.duration(&od.interval, "outlierDetection.interval"),
            base_ejection_time: cx
                .duration(&od.base_ejection_time, "outlierDetection.baseEjectionTime"),
            max_ejection_percent: max.clamp(0, 100) as u32,
            min_health_percent: min_health.clamp(0, 100) as u32,
            split_external_local_origin_errors: od.split_external_local_origin_errors,
            consecutive_local_origin_failures: u(local_origin)
                .filter(|_| od.split_external_local_origin_errors),
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
        // Each subjectAltName must be checkable: a DNS name, an IP, or a URI (SPIFFE IDs);
        // anything else would be dropped silently and the check weakened.
        for san in &t.subject_alt_names {
            let uri = san.contains("://");
            let name = rustls_pki_types::ServerName::try_from(san.as_str()).is_ok();
            if !(uri || name) {
                cx.err(
                    line,
                    format!("subjectAltNames entry {san:?} cannot be checked: not a DNS name, IP address or URI"),
                );
            }
        }
        // Istio's rule: ISTIO_MUTUAL uses the workload's own certificate and the mesh's
        // roots; naming others is an error.
        if t.mode == TlsMode::IstioMutual {
            for (set, field) in [
                (t.client_certificate.is_some(), "clientCertificate"),
                (t.private_key.is_some(), "privateKey"),
                (t.ca_certificates.is_some(), "caCertificates"),
                (t.credential_name.is_some(), "credentialName"),
            ] {
                if set {
                    cx.err(
                        line,
                        format!("tls mode ISTIO_MUTUAL takes no {field}: the workload's own certificate and the mesh's roots are used"),
                    );
                }
            }
            for san in t.subject_alt_names.iter().filter(|s| !s.starts_with("spiffe://")) {
                cx.err(
                    line,
                    format!("subjectAltNames entry {san:?}: ISTIO_MUTUAL checks workload identities (spiffe://…)"),
                );
            }
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

/// Maglev table sizes (Envoy's default and largest).
const MAGLEV_DEFAULT_TABLE: u64 = 65537;
const MAGLEV_MAX_TABLE: u64 = 5_000_011;
/// Envoy's largest ring (maximumRingSize default): more points buy nothing.
const RING_MAX_SIZE: u64 = 8_388_608;

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d: &u64| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

pub(super) fn compile_destination_rule(
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
        export_to: dr.spec.export_to.clone(),
        namespace: ns,
        host,
        policy,
        port_policies,
        subsets,
        source: cx.source(0),
        has_traffic_policy: dr.spec.traffic_policy.is_some(),
        merged: Vec::new(),
    }
}
