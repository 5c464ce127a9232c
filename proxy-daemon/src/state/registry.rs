//! The service registry compiled from Services, EndpointSlices, Pods and ServiceEntries:
//! what a destination address or host name is, its ports, and its endpoints with the pod
//! labels subsets select on.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::{
    config::{
        istio::{Location, Resolution},
        k8s::{self, IntOrString},
        ConfigError, CreationOrder, Located, Object, Severity,
    },
    state::ExportDefaults,
};

/// Istio's annotation for a Kubernetes Service's `exportTo` (comma-separated).
pub const SERVICE_EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// Istio's rule: a name without dots is short for `<name>.<namespace>.svc.cluster.local`;
/// anything with a dot (or a wildcard) is taken as written.
pub fn resolve_host(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_ascii_lowercase()
    } else {
        format!("{}.{namespace}.{CLUSTER_DOMAIN}", host.to_ascii_lowercase())
    }
}

/// Does `pattern` (a host or `*.suffix` / `*`) cover `host`?
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => pattern == host,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServiceKind {
    Kubernetes,
    ServiceEntry {
        location: Location,
        resolution: Resolution,
    },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PortInfo {
    pub name: String,
    pub port: u32,
    /// Port on the endpoints (Service targetPort / ServiceEntry targetPort), when known.
    pub target_port: Option<u32>,
    /// Named targetPort, resolved per endpoint from the pod's container ports.
    pub target_port_name: Option<String>,
    /// Declared protocol (HTTP, HTTP2, GRPC, TCP, TLS, HTTPS…), empty when undeclared.
    pub protocol: String,
    /// What the declared protocol means for detection, decided once at compile.
    pub class: ProtocolClass,
}

/// How the data path treats a port by its declared protocol (Istio's protocol selection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolClass {
    /// HTTP, HTTP2, gRPC, gRPC-Web: wait for the client's request.
    Http,
    /// Opaque TCP (TCP, Mongo, MySQL, Redis): proxied at once (server-first protocols).
    Tcp,
    /// TLS, HTTPS: routed by the ClientHello's SNI, never terminated.
    Tls,
    /// Nothing declared: sniffed.
    Undeclared,
}

impl ProtocolClass {
    pub fn of(protocol: &str) -> Self {
        match protocol.to_ascii_uppercase().as_str() {
            "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" => ProtocolClass::Http,
            "TCP" | "MONGO" | "MYSQL" | "REDIS" => ProtocolClass::Tcp,
            "TLS" | "HTTPS" => ProtocolClass::Tls,
            _ => ProtocolClass::Undeclared,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointInfo {
    pub address: String,
    /// `address` as an IP, parsed once at compile (None: a DNS name or a Unix socket).
    pub ip: Option<IpAddr>,
    /// port name → port, when the endpoint overrides (ServiceEntry endpoints, named ports).
    pub ports: BTreeMap<String, u32>,
    pub labels: BTreeMap<String, String>,
    pub pod: Option<String>,
    /// Load-balancing weight (ServiceEntry `endpoints[].weight`; 1 when unset).
    pub weight: u32,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceInfo {
    pub hostname: String,
    pub name: String,
    pub namespace: String,
    pub kind: ServiceKind,
    pub addresses: Vec<String>,
    pub ports: Vec<PortInfo>,
    pub endpoints: Vec<EndpointInfo>,
    /// Namespaces whose workloads see it (ServiceEntry `exportTo`; empty: all).
    pub export_to: Vec<String>,
    pub source: String,
}

impl ServiceInfo {
    pub fn port(&self, port: u32) -> Option<&PortInfo> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Whether workloads of namespace `client` see this service: one not exported to
    /// them is, for them, not in the registry (passthrough, or BlackHole when
    /// registry-only).
    pub fn visible_to(&self, client: &str) -> bool {
        crate::state::routes::exported_to(&self.export_to, &self.namespace, client)
    }
}

/// An address range of a ServiceEntry (`addresses` may be CIDRs).
#[derive(Debug, Clone, serde::Serialize)]
struct Cidr {
    net: ipnet::IpNet,
    service: ServiceKey,
}

/// A service among those of one hostname: the hostname and the namespace defining it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
struct ServiceKey {
    hostname: String,
    namespace: String,
}

/// A CIDR, or a bare address as its /32 or /128.
fn parse_cidr(text: &str) -> Option<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

/// What one namespace's object tried to take from another's and was refused, counted
/// in `proxy_daemon_config_conflicts{kind,reason}` (each also a finding at its line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Conflict {
    /// A ServiceEntry address that is a Kubernetes Service's cluster IP: the Service keeps it.
    AddressOwnedByService,
    /// A ServiceEntry host that is a Kubernetes Service's name in another namespace: only
    /// the entry's own namespace uses it.
    HostOwnedByService,
    /// Several services of one hostname: each client uses one (its own namespace's, a
    /// Kubernetes Service, else the oldest).
    DuplicateHost,
    /// A VirtualService for a host a Kubernetes Service of another namespace owns: it
    /// routes its own namespace's clients only.
    RouteForAnotherNamespacesService,
    /// Several VirtualServices for one host: each client uses one (Istio's IST0109).
    ConflictingVirtualServices,
    /// Two DestinationRules for one host in one namespace: the oldest is used.
    ConflictingDestinationRules,
    /// The same object defined twice in a set of files: the later definition is used.
    RedefinedObject,
}

impl Conflict {
    pub fn kind(self) -> &'static str {
        match self {
            Conflict::AddressOwnedByService
            | Conflict::HostOwnedByService
            | Conflict::DuplicateHost => "ServiceEntry",
            Conflict::RouteForAnotherNamespacesService | Conflict::ConflictingVirtualServices => {
                "VirtualService"
            }
            Conflict::ConflictingDestinationRules => "DestinationRule",
            Conflict::RedefinedObject => "any",
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Conflict::AddressOwnedByService => "address_owned_by_service",
            Conflict::HostOwnedByService => "host_owned_by_service",
            Conflict::DuplicateHost => "duplicate_host",
            Conflict::RouteForAnotherNamespacesService => "host_owned_by_another_namespace",
            Conflict::ConflictingVirtualServices => "conflicting_virtual_services",
            Conflict::ConflictingDestinationRules => "conflicting_destination_rules",
            Conflict::RedefinedObject => "redefined_object",
        }
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Registry {
    /// By hostname (FQDN for Kubernetes services; as written for ServiceEntry hosts): every
    /// service of that name, oldest first. Several namespaces may define one hostname;
    /// which one a client uses is [`Registry::by_host`]'s choice.
    pub services: BTreeMap<String, Vec<ServiceInfo>>,
    #[serde(skip)]
    by_addr: HashMap<SocketAddr, Vec<ServiceKey>>,
    #[serde(skip)]
    wildcard_hosts: Vec<String>,
    #[serde(skip)]
    cidrs: Vec<Cidr>,
    /// Cluster IPs of Kubernetes Services: no ServiceEntry of any namespace takes them.
    #[serde(skip)]
    service_ips: HashMap<IpAddr, ServiceKey>,
    /// What the build refused, by kind.
    #[serde(skip)]
    pub conflicts: Vec<Conflict>,
    /// Kubernetes Services by the endpoint address and port they send to: what a pod's
    /// inbound connection to that port is a call of (the destination side's metrics and
    /// protocol).
    #[serde(skip)]
    by_endpoint: HashMap<SocketAddr, Arc<ServedPort>>,
}

/// A Service port as its endpoints serve it.
#[derive(Debug)]
pub struct ServedPort {
    pub hostname: String,
    pub name: String,
    pub namespace: String,
    pub class: ProtocolClass,
}

/// Istio's choice among the services of one hostname for a client of namespace `client`
/// (its SidecarScope): only those exported to it; its own namespace's first, then a
/// Kubernetes Service (a ServiceEntry elsewhere never squats a Service's name), then one
/// exported to it by name, then the oldest. `list` is oldest first.
fn choose<'a>(list: &'a [ServiceInfo], client: &str) -> Option<&'a ServiceInfo> {
    list.iter()
        .filter(|s| s.visible_to(client))
        .min_by_key(|s| preference(s, client))
}

/// Lower is preferred; ties keep the list's (age) order.
fn preference(s: &ServiceInfo, client: &str) -> (bool, bool, bool) {
    (
        s.namespace != client,
        s.kind != ServiceKind::Kubernetes,
        !s.export_to.iter().any(|e| e == client),
    )
}

impl Registry {
    /// Every service, each hostname's in order.
    pub fn all(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values().flatten()
    }

    fn get(&self, key: &ServiceKey) -> Option<&ServiceInfo> {
        self.services
            .get(&key.hostname)?
            .iter()
            .find(|s| s.namespace == key.namespace)
    }

    /// The service an original destination `ip:port` belongs to, for a client of namespace
    /// `client`.
    pub fn by_addr(&self, addr: SocketAddr, client: &str) -> Option<&ServiceInfo> {
        if let Some(keys) = self.by_addr.get(&addr) {
            return keys
                .iter()
                .filter_map(|k| self.get(k))
                .filter(|s| s.visible_to(client))
                .min_by_key(|s| preference(s, client));
        }
        self.cidrs
            .iter()
            .filter(|c| c.net.contains(&addr.ip()))
            .filter_map(|c| self.get(&c.service))
            .find(|s| s.port(addr.port() as u32).is_some() && s.visible_to(client))
    }

    /// The service for a Host/authority or SNI, for a client of namespace `client`: exact
    /// names before wildcard entries (the longest wildcard suffix wins).
    pub fn by_host(&self, host: &str, client: &str) -> Option<&ServiceInfo> {
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        if let Some(s) = self.services.get(host).and_then(|l| choose(l, client)) {
            return Some(s);
        }
        self.wildcard_hosts
            .iter()
            .filter(|p| host_matches(p, host))
            .filter_map(|p| Some((p, choose(self.services.get(p.as_str())?, client)?)))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, s)| s)
    }

    /// The service named `host` for the daemon's own use (its collectors), with no client
    /// namespace: a Kubernetes Service, else the oldest entry.
    pub fn by_host_unscoped(&self, host: &str) -> Option<&ServiceInfo> {
        let list = self.services.get(&host.to_ascii_lowercase())?;
        list.iter()
            .find(|s| s.kind == ServiceKind::Kubernetes)
            .or_else(|| list.first())
    }

    /// Whether any namespace defines `host` (compile-time checks of references).
    pub fn contains_host(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.services.contains_key(&host)
            || self.wildcard_hosts.iter().any(|p| host_matches(p, &host))
    }

    /// The namespace of the Kubernetes Service named `host`, if one is.
    pub fn kubernetes_owner(&self, host: &str) -> Option<&str> {
        self.services
            .get(host)?
            .iter()
            .find(|s| s.kind == ServiceKind::Kubernetes)
            .map(|s| s.namespace.as_str())
    }

    /// A ServiceEntry's `addresses` without the cluster IPs of Kubernetes Services: a
    /// Service's address is its own, and an entry of any namespace naming it would take
    /// that Service's connections (another tenant's database, say). Each one refused is
    /// reported at its line. Kubernetes Services must be in already.
    fn unclaimed_addresses(
        &mut self,
        o: &Located<Object>,
        addresses: &[serde_saphyr::Spanned<String>],
        findings: &mut Vec<ConfigError>,
    ) -> Vec<String> {
        let mut kept = Vec::with_capacity(addresses.len());
        for a in addresses {
            let owner = parse_cidr(&a.value)
                .filter(|n| n.prefix_len() == n.max_prefix_len())
                .and_then(|n| self.service_ips.get(&n.addr()))
                .and_then(|k| self.get(k));
            match owner {
                Some(owner) => {
                    findings.push(o.finding(
                        Severity::Warning,
                        a.referenced.line(),
                        format!(
                            "address {} is the cluster IP of {}: the Service keeps it; this entry does not use the address",
                            a.value, owner.source
                        ),
                    ));
                    self.conflicts.push(Conflict::AddressOwnedByService);
                }
                None => kept.push(a.value.clone()),
            }
        }
        kept
    }

    fn insert(
        &mut self,
        svc: ServiceInfo,
        findings: &mut Vec<ConfigError>,
        at: &dyn Fn(Severity, String) -> ConfigError,
    ) {
        let key = ServiceKey {
            hostname: svc.hostname.clone(),
            namespace: svc.namespace.clone(),
        };
        let others = self.services.entry(svc.hostname.clone()).or_default();
        if let Some(same) = others.iter().find(|o| o.namespace == svc.namespace) {
            // One namespace, one service per name: the first (Kubernetes Services are
            // read first, then the oldest entry) keeps it.
            findings.push(at(
                Severity::Warning,
                format!(
                    "host {} is already defined in this namespace by {}; that one is used",
                    svc.hostname, same.source
                ),
            ));
            self.conflicts.push(Conflict::DuplicateHost);
            return;
        }
        if svc.kind != ServiceKind::Kubernetes {
            if let Some(owner) = others.iter().find(|o| o.kind == ServiceKind::Kubernetes) {
                findings.push(at(
                    Severity::Warning,
                    format!(
                        "host {} is the name of {}: other namespaces keep using that Service; this entry serves namespace {}'s own workloads only",
                        svc.hostname, owner.source, svc.namespace
                    ),
                ));
                self.conflicts.push(Conflict::HostOwnedByService);
            } else if let Some(first) = others.first() {
                findings.push(at(
                    Severity::Warning,
                    format!(
                        "host {} is also defined by {}: each workload uses its own namespace's, else the oldest",
                        svc.hostname, first.source
                    ),
                ));
                self.conflicts.push(Conflict::DuplicateHost);
            }
        }
        for a in &svc.addresses {
            // A host prefix (`/32`, `/128`) is one address: looked up by hash like a plain
            // IP, not scanned with the ranges on every connection.
            let single = a.parse::<IpAddr>().ok().or_else(|| {
                parse_cidr(a)
                    .filter(|n| n.prefix_len() == n.max_prefix_len())
                    .map(|n| n.addr())
            });
            if let Some(ip) = single {
                if svc.kind == ServiceKind::Kubernetes {
                    self.service_ips.insert(ip, key.clone());
                }
                for p in &svc.ports {
                    let keys = self
                        .by_addr
                        .entry(SocketAddr::new(ip, p.port as u16))
                        .or_default();
                    if !keys.contains(&key) {
                        keys.push(key.clone());
                    }
                }
            } else if let Some(net) = parse_cidr(a) {
                // Longest prefix first: the first range that contains an address is the
                // most specific one.
                let at = self
                    .cidrs
                    .partition_point(|c| c.net.prefix_len() >= net.prefix_len());
                self.cidrs.insert(
                    at,
                    Cidr {
                        net,
                        service: key.clone(),
                    },
                );
            }
        }
        if svc.hostname.starts_with('*') && !self.wildcard_hosts.contains(&svc.hostname) {
            self.wildcard_hosts.push(svc.hostname.clone());
        }
        self.services
            .entry(svc.hostname.clone())
            .or_default()
            .push(svc);
    }
}

fn pod_ready(pod: &k8s::Pod) -> bool {
    let phase_ok = matches!(pod.status.phase.as_deref(), None | Some("Running"));
    let ready_cond = pod
        .status
        .conditions
        .iter()
        .find(|c| c.condition_type == "Ready")
        .map(|c| c.status == "True")
        .unwrap_or(true);
    phase_ok && ready_cond
}

fn named_container_port(pod: &k8s::Pod, name: &str) -> Option<u32> {
    pod.spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| p.container_port)
}

/// Builds the registry; problems are pushed to `findings`. Kubernetes Services go in
/// first (their names and cluster IPs are theirs), then ServiceEntries oldest first.
pub fn build(
    objects: &[Located<Object>],
    export_defaults: &ExportDefaults,
    findings: &mut Vec<ConfigError>,
) -> Registry {
    let mut reg = Registry::default();
    let pods: Vec<&k8s::Pod> = objects
        .iter()
        .filter_map(|o| match &o.value {
            Object::Pod(p) => Some(p),
            _ => None,
        })
        .collect();
    let pod_by_name: HashMap<(String, String), &k8s::Pod> = pods
        .iter()
        .map(|p| {
            (
                (
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.metadata.name.clone(),
                ),
                *p,
            )
        })
        .collect();
    let mut slices: HashMap<(String, String), Vec<&k8s::EndpointSlice>> = HashMap::new();
    for o in objects {
        if let Object::EndpointSlice(es) = &o.value {
            match es.metadata.labels.get(k8s::SERVICE_NAME_LABEL) {
                Some(svc) => slices
                    .entry((o.object_ref.namespace.clone(), svc.clone()))
                    .or_default()
                    .push(es),
                None => findings.push(o.finding(
                    Severity::Warning,
                    0,
                    format!(
                        "no {} label: not attached to any Service",
                        k8s::SERVICE_NAME_LABEL
                    ),
                )),
            }
        }
    }

    let mut entries: Vec<(CreationOrder, &Located<Object>)> = objects
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o.value, Object::ServiceEntry(_)))
        .map(|(i, o)| (CreationOrder::of(o, i), o))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let services = objects
        .iter()
        .filter(|o| matches!(o.value, Object::Service(_)));
    for o in services.chain(entries.into_iter().map(|(_, o)| o)) {
        match &o.value {
            Object::Service(svc) => {
                let ns = o.object_ref.namespace.clone();
                let name = svc.metadata.name.clone();
                let ports: Vec<PortInfo> = svc
                    .spec
                    .ports
                    .iter()
                    .map(|p| PortInfo {
                        class: ProtocolClass::Undeclared,
                        name: p.name.clone().unwrap_or_default(),
                        port: p.port,
                        target_port: match &p.target_port {
                            Some(IntOrString::Int(n)) => Some(*n),
                            Some(IntOrString::String(_)) => None,
                            None => Some(p.port),
                        },
                        target_port_name: match &p.target_port {
                            Some(IntOrString::String(s)) => Some(s.clone()),
                            _ => None,
                        },
                        // Istio's declaration: appProtocol or the port name's prefix. The
                        // port's `protocol: TCP` is the L4 protocol and declares nothing
                        // (empty: detect from the traffic).
                        protocol: p
                            .app_protocol
                            .as_deref()
                            .map(|a| match a {
                                // Kubernetes' own name for HTTP/2 over cleartext.
                                "kubernetes.io/h2c" => "HTTP2".to_string(),
                                a => a.to_ascii_uppercase(),
                            })
                            .or_else(|| infer_protocol(p.name.as_deref()))
                            .unwrap_or_default(),
                    })
                    .collect();
                let endpoints = match slices.get(&(ns.clone(), name.clone())) {
                    Some(list) => {
                        let mut out = Vec::new();
                        for es in list {
                            let port_map: BTreeMap<String, u32> = es
                                .ports
                                .iter()
                                .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port?)))
                                .collect();
                            for e in es
                                .endpoints
                                .iter()
                                .filter(|e| e.conditions.ready.unwrap_or(true))
                            {
                                let pod = e.target_ref.as_ref().and_then(|t| {
                                    let key = (
                                        t.namespace.clone().unwrap_or_else(|| ns.clone()),
                                        t.name.clone().unwrap_or_default(),
                                    );
                                    pod_by_name.get(&key)
                                });
                                for a in &e.addresses {
                                    out.push(EndpointInfo {
                                        ip: None,
                                        address: a.clone(),
                                        ports: port_map.clone(),
                                        labels: pod
                                            .map(|p| p.metadata.labels.clone())
                                            .unwrap_or_default(),
                                        pod: pod.map(|p| p.metadata.name.clone()),
                                        weight: 1,
                                    });
                                }
                            }
                        }
                        out
                    }
                    // Local mode without slices: ready pods matching the selector.
                    None => match &svc.spec.selector {
                        Some(sel) if !sel.is_empty() => pods
                            .iter()
                            .filter(|p| p.metadata.namespace.as_deref() == Some(&ns))
                            .filter(|p| {
                                sel.iter().all(|(k, v)| p.metadata.labels.get(k) == Some(v))
                            })
                            .filter(|p| pod_ready(p))
                            .filter_map(|p| {
                                let ip = p.status.pod_ip.clone()?;
                                let ports = ports
                                    .iter()
                                    .filter_map(|sp| {
                                        let target = sp.target_port.or_else(|| {
                                            named_container_port(p, sp.target_port_name.as_deref()?)
                                        })?;
                                        Some((sp.name.clone(), target))
                                    })
                                    .collect();
                                Some(EndpointInfo {
                                    ip: None,
                                    address: ip,
                                    ports,
                                    labels: p.metadata.labels.clone(),
                                    pod: Some(p.metadata.name.clone()),
                                    weight: 1,
                                })
                            })
                            .collect(),
                        _ => Vec::new(),
                    },
                };
                let mut addresses: Vec<String> = svc.spec.cluster_ips.clone();
                if let Some(ip) = &svc.spec.cluster_ip {
                    if ip != "None" && !addresses.contains(ip) {
                        addresses.insert(0, ip.clone());
                    }
                }
                addresses.retain(|a| a != "None" && !a.is_empty());
                let info = ServiceInfo {
                    hostname: format!("{name}.{ns}.{CLUSTER_DOMAIN}"),
                    name,
                    namespace: ns,
                    kind: ServiceKind::Kubernetes,
                    addresses,
                    ports,
                    endpoints,
                    // Istio reads a Service's visibility from this annotation.
                    export_to: match svc.metadata.annotations.get(SERVICE_EXPORT_TO_ANNOTATION) {
                        Some(list) => list
                            .split(',')
                            .map(|e| e.trim().to_string())
                            .filter(|e| !e.is_empty())
                            .collect(),
                        None => export_defaults.service.clone(),
                    },
                    source: format!(
                        "{} ({}:{})",
                        o.object_ref,
                        o.origin.path.display(),
                        o.origin.line
                    ),
                };
                reg.insert(info, findings, &|sev, m| o.finding(sev, 0, m));
            }
            Object::ServiceEntry(se) => {
                let spec = &se.spec;
                if spec.hosts.is_empty() {
                    findings.push(o.error(0, "spec.hosts is required"));
                    continue;
                }
                if spec.ports.is_empty() {
                    findings.push(o.error(0, "spec.ports is required"));
                }
                let resolution = spec.resolution.unwrap_or(Resolution::None);
                let location = spec.location.unwrap_or(Location::MeshExternal);
                if resolution == Resolution::Static && spec.endpoints.is_empty() {
                    findings.push(o.error(0, "resolution STATIC needs spec.endpoints"));
                }
                for a in &spec.addresses {
                    if parse_cidr(&a.value).is_none() {
                        findings.push(o.error(
                            a.referenced.line(),
                            format!("address {:?} is not an IP or CIDR", a.value),
                        ));
                    }
                }
                let mut port_names = BTreeMap::new();
                for p in &spec.ports {
                    let name = p.value.name.clone().unwrap_or_default();
                    if let Some(prev) = port_names.insert(p.value.number, name) {
                        let _ = prev;
                        findings.push(o.error(
                            p.referenced.line(),
                            format!("port {} is listed twice", p.value.number),
                        ));
                    }
                    if p.value.number == 0 || p.value.number > 65535 {
                        findings.push(o.error(
                            p.referenced.line(),
                            format!("port {} is out of range", p.value.number),
                        ));
                    }
                }
                let ports: Vec<PortInfo> = spec
                    .ports
                    .iter()
                    .map(|p| PortInfo {
                        class: ProtocolClass::Undeclared,
                        name: p.value.name.clone().unwrap_or_default(),
                        port: p.value.number,
                        target_port: p.value.target_port,
                        target_port_name: None,
                        protocol: p
                            .value
                            .protocol
                            .clone()
                            .unwrap_or_else(|| "TCP".into())
                            .to_ascii_uppercase(),
                    })
                    .collect();
                let endpoints: Vec<EndpointInfo> = spec
                    .endpoints
                    .iter()
                    .map(|e| EndpointInfo {
                        ip: None,
                        address: e.value.address.clone(),
                        ports: e.value.ports.clone(),
                        labels: e.value.labels.clone(),
                        pod: None,
                        weight: e.value.weight.filter(|w| *w > 0).unwrap_or(1),
                    })
                    .collect();
                let addresses = reg.unclaimed_addresses(o, &spec.addresses, findings);
                for h in &spec.hosts {
                    if h.value.contains('*')
                        && matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
                        && spec.endpoints.is_empty()
                    {
                        findings.push(o.error(
                            h.referenced.line(),
                            format!(
                                "wildcard host {} cannot be resolved by DNS; use resolution NONE",
                                h.value
                            ),
                        ));
                    }
                    let info = ServiceInfo {
                        hostname: h.value.to_ascii_lowercase(),
                        name: h.value.clone(),
                        namespace: o.object_ref.namespace.clone(),
                        kind: ServiceKind::ServiceEntry {
                            location,
                            resolution,
                        },
                        addresses: addresses.clone(),
                        ports: ports.clone(),
                        endpoints: endpoints.clone(),
                        export_to: if spec.export_to.is_empty() {
                            export_defaults.service_entry.clone()
                        } else {
                            spec.export_to.clone()
                        },
                        source: format!(
                            "{} ({}:{})",
                            o.object_ref,
                            o.origin.path.display(),
                            o.origin.line
                        ),
                    };
                    reg.insert(info, findings, &|sev, m| {
                        o.finding(sev, h.referenced.line(), m)
                    });
                }
            }
            _ => {}
        }
    }
    // Strings become types once, here: the data path never parses configuration.
    for svc in reg.services.values_mut().flatten() {
        for p in &mut svc.ports {
            p.class = ProtocolClass::of(&p.protocol);
        }
        for ep in &mut svc.endpoints {
            ep.ip = ep.address.parse().ok();
        }
    }
    reg.index_endpoints();
    reg
}

impl Registry {
    /// The Service (oldest first) whose port `addr` serves as an endpoint.
    pub fn served_at(&self, addr: SocketAddr) -> Option<&Arc<ServedPort>> {
        self.by_endpoint.get(&addr)
    }

    fn index_endpoints(&mut self) {
        let mut index: HashMap<SocketAddr, Arc<ServedPort>> = HashMap::new();
        for svc in self.services.values().flatten() {
            if svc.kind != ServiceKind::Kubernetes {
                continue;
            }
            for p in &svc.ports {
                let served = Arc::new(ServedPort {
                    hostname: svc.hostname.clone(),
                    name: svc.name.clone(),
                    namespace: svc.namespace.clone(),
                    class: p.class,
                });
                for ep in &svc.endpoints {
                    let Some(ip) = ep.ip else { continue };
                    let port = ep
                        .ports
                        .get(&p.name)
                        .copied()
                        .or(p.target_port)
                        .unwrap_or(p.port);
                    let Ok(port) = u16::try_from(port) else {
                        continue;
                    };
                    index
                        .entry(SocketAddr::new(ip, port))
                        .or_insert_with(|| served.clone());
                }
            }
        }
        self.by_endpoint = index;
    }
}

/// Istio's protocol selection by port name prefix (`http-web`, `grpc`, `tcp-db`…).
fn infer_protocol(name: Option<&str>) -> Option<String> {
    let name = name?.to_ascii_lowercase();
    let prefix = name.split('-').next().unwrap_or("");
    let proto = match prefix {
        "http" => "HTTP",
        "http2" => "HTTP2",
        "https" => "HTTPS",
        "grpc" | "grpc-web" => "GRPC",
        "tcp" => "TCP",
        "tls" => "TLS",
        "mongo" | "mysql" | "redis" => "TCP",
        _ => return None,
    };
    Some(proto.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_resolve_the_istio_way() {
        assert_eq!(
            resolve_host("reviews", "default"),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(
            resolve_host("api.azar-mirror.svc.cluster.local", "azar"),
            "api.azar-mirror.svc.cluster.local"
        );
        assert_eq!(resolve_host("httpbin.org", "x"), "httpbin.org");
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(host_matches("*", "anything"));
    }

    #[test]
    fn cidrs() {
        let n = parse_cidr("10.0.0.0/8").unwrap();
        assert!(n.contains(&"10.1.2.3".parse::<IpAddr>().unwrap()));
        assert!(!n.contains(&"11.1.2.3".parse::<IpAddr>().unwrap()));
        assert_eq!(parse_cidr("10.1.2.3").unwrap().prefix_len(), 32);
        assert!(parse_cidr("10.0.0.0/40").is_none());
        assert!(parse_cidr("nope").is_none());
    }
}
