//! Compiled routing: VirtualServices as per-host rule lists in Istio's first-match order,
//! DestinationRules merged into per-host policies, EnvoyFilter route overrides, Sidecar
//! outbound policies. Everything here is immutable once built; the data path reads it.
mod destination_rule;
mod envoy_filter;
mod gateway;
mod matchers;
mod sidecar;
mod virtual_service;

pub use destination_rule::*;
pub use envoy_filter::*;
pub use gateway::*;
pub use matchers::*;
pub use sidecar::*;
pub use virtual_service::*;

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;
use serde_saphyr::Spanned;

use crate::{
    config::{
        duration,
        istio::{self, OutboundMode, SimpleLb, TlsMode},
        ConfigError, CreationOrder, Located, Object, Severity,
    },
    state::registry::{resolve_host, Registry},
};

fn ser_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
        None => s.serialize_none(),
    }
}

/// Everything routing needs, compiled.
/// Istio's config root namespace (meshConfig.rootNamespace's default): its selector-less
/// Sidecar is the mesh-wide default, its EnvoyFilters apply to every workload.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Default, Serialize)]
pub struct RouteTable {
    /// host (FQDN or wildcard) → VirtualServices for it, oldest first (creationTimestamp,
    /// name, namespace; file order without timestamps). Each client uses one of them.
    pub virtual_services: BTreeMap<String, Vec<std::sync::Arc<CompiledVirtualService>>>,
    /// host → DestinationRules for it, one per namespace (a namespace's several rules for
    /// one host are merged, as Istio merges them).
    pub destination_rules: BTreeMap<String, Vec<CompiledDestinationRule>>,
    pub envoy_filters: Vec<CompiledEnvoyFilter>,
    /// EnvoyFilters Istio accepts but that patch what a node proxy does not have
    /// (listeners, clusters, inbound, gateways): skipped, each with a warning.
    pub skipped_envoy_filters: u64,
    pub sidecars: Vec<CompiledSidecar>,
    /// Service FQDN → port → the Gateway API routes (HTTPRoute, GRPCRoute) bound there.
    pub mesh_routes: BTreeMap<String, BTreeMap<u32, BoundRoutes>>,
    /// Every Service parent of every route, with the conditions its status carries.
    pub route_status: Vec<ParentStatus>,
    /// What the build outranked or refused (each also a finding).
    #[serde(skip)]
    pub conflicts: Vec<crate::state::registry::Conflict>,
}

impl RouteTable {
    /// The DestinationRule for `host` as a client of namespace `client` sees it, in
    /// Istio's lookup order: one in the client's own namespace, then one in the namespace
    /// of the service the host names (`service_namespace`), then one in the root
    /// namespace — each only if exported to the client. Never another namespace's: a
    /// rule of a third namespace cannot steer (or slow, or re-credential) the traffic of
    /// clients elsewhere.
    pub fn destination_rule(
        &self,
        host: &str,
        client: &str,
        service_namespace: Option<&str>,
    ) -> Option<&CompiledDestinationRule> {
        let list = self.destination_rules.get(host)?;
        let in_namespace = |ns: &str| {
            list.iter()
                .find(|d| d.namespace == ns)
                .filter(|d| exported_to(&d.export_to, &d.namespace, client))
        };
        in_namespace(client)
            .or_else(|| service_namespace.and_then(in_namespace))
            .or_else(|| in_namespace(ROOT_NAMESPACE))
    }

    /// The Sidecar governing a workload: one in its namespace whose selector matches wins
    /// over the namespace's selector-less default, and that over the selector-less one in
    /// Istio's root namespace (the mesh-wide default) — Istio's rule.
    pub fn sidecar_for(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<&CompiledSidecar> {
        let in_ns = |ns: &'_ str| {
            let ns = ns.to_string();
            self.sidecars.iter().filter(move |s| s.namespace == ns)
        };
        in_ns(namespace)
            .find(|s| s.selector.as_ref().is_some_and(|sel| selects(sel, labels)))
            .or_else(|| in_ns(namespace).find(|s| s.selector.is_none()))
            .or_else(|| in_ns(ROOT_NAMESPACE).find(|s| s.selector.is_none()))
    }

    /// EnvoyFilters applying to a workload, in the order Istio applies them: those of the
    /// root namespace (mesh-wide) and of its namespace whose workloadSelector matches (an
    /// empty selector selects every workload), by `priority` (lower first), the root
    /// namespace's before the workload's own at equal priority, then in configuration
    /// order. Later patches win where they overlap.
    pub fn envoy_filters_for<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a CompiledEnvoyFilter> + 'a {
        let mut chosen: Vec<&CompiledEnvoyFilter> = self
            .envoy_filters
            .iter()
            .filter(move |f| {
                (f.namespace == namespace || f.namespace == ROOT_NAMESPACE)
                    && selects(&f.selector, labels)
            })
            .collect();
        // A stable sort keeps configuration order within equal keys.
        chosen.sort_by_key(|f| (f.priority, f.namespace != ROOT_NAMESPACE));
        chosen.into_iter()
    }

    /// Whether a workload of namespace `client` with `labels` sees a service or rule of
    /// namespace `owner` for `host`: exported to its namespace (exportTo) and imported by
    /// the Sidecar that governs it (`egress[].hosts`), as a sidecar's configuration would
    /// hold it.
    pub fn sees(
        &self,
        client: &str,
        labels: &BTreeMap<String, String>,
        export_to: &[String],
        owner: &str,
        host: &str,
    ) -> bool {
        exported_to(export_to, owner, client)
            && self
                .sidecar_for(client, labels)
                .is_none_or(|sc| sc.imports(client, owner, host))
    }

    /// The VirtualService (at most one) that routes `host` for a workload of namespace
    /// `client` with `labels`: of those it sees (exportTo, its Sidecar's imports), for the
    /// exact name first, then the longest wildcard. Several may claim the host: its own
    /// namespace's wins, then one exported to its namespace by name, then the oldest —
    /// one VirtualService per host, as each Istio sidecar gets. A host that a Kubernetes
    /// Service owns (`owner`: the Service's namespace) is routed only by that namespace's
    /// VirtualServices, the client's own and the root namespace's: a third namespace's
    /// rule (a mirror to its own sink, say) never reaches other namespaces' requests.
    pub fn virtual_services_for<'a>(
        &'a self,
        host: &'a str,
        client: &'a str,
        labels: &'a BTreeMap<String, String>,
        owner: Option<&'a str>,
    ) -> impl Iterator<Item = &'a std::sync::Arc<CompiledVirtualService>> + 'a {
        let eligible = move |vs: &std::sync::Arc<CompiledVirtualService>| {
            may_route(&vs.namespace, client, owner)
                && self.sees(client, labels, &vs.export_to, &vs.namespace, host)
        };
        let list = match self.virtual_services.get(host) {
            Some(v) if v.iter().any(eligible) => v.as_slice(),
            _ => self
                .virtual_services
                .iter()
                .filter(|(p, v)| {
                    crate::state::registry::host_matches(p, host) && v.iter().any(eligible)
                })
                .max_by_key(|(p, _)| p.len())
                .map(|(_, v)| v.as_slice())
                .unwrap_or(&[]),
        };
        list.iter()
            .filter(move |vs| eligible(vs))
            .min_by_key(|vs| claim_rank(vs, client))
            .into_iter()
    }
}

/// Whether a VirtualService of namespace `route_ns` may route a client of `client` to a
/// host a Kubernetes Service of namespace `owner` owns: the owner's, the client's own
/// (a consumer's override for itself) and the root namespace's (which speaks for all).
pub fn may_route(route_ns: &str, client: &str, owner: Option<&str>) -> bool {
    owner.is_none_or(|o| route_ns == o || route_ns == client || route_ns == ROOT_NAMESPACE)
}

/// Which of several VirtualServices for one host a client uses (lower first; ties go to
/// the oldest): its own namespace's, then one exported to it by name, then the rest.
fn claim_rank(vs: &CompiledVirtualService, client: &str) -> u8 {
    if vs.namespace == client {
        0
    } else if vs.export_to.iter().any(|e| e == client) {
        1
    } else {
        2
    }
}

/// Istio's `exportTo`: whether an object of namespace `owner` is visible to workloads of
/// namespace `client`. Empty is the mesh default, `*` (all); `.` is the owner's own
/// namespace, `~` none, anything else a namespace name.
pub fn exported_to(export_to: &[String], owner: &str, client: &str) -> bool {
    if export_to.is_empty() {
        return true;
    }
    export_to.iter().any(|e| match e.as_str() {
        "*" => true,
        "." => owner == client,
        "~" => false,
        ns => ns == client,
    })
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
    /// A header (or withoutHeaders) matcher: an empty one (`x-user: {}`) matches the
    /// header's presence, whatever its value (Istio's meaning).
    fn header_matcher(&mut self, m: &Spanned<istio::StringMatch>, what: &str) -> Option<Matcher> {
        let sm = &m.value;
        if sm.exact.is_none() && sm.prefix.is_none() && sm.regex.is_none() {
            return Some(Matcher::Prefix(String::new()));
        }
        self.matcher(m, what)
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
        self.regex(m.referenced.line(), sm.regex.as_deref().unwrap_or(""), what)
    }
    /// A whole-value regex matcher (one shared automaton per pattern); an invalid one is
    /// an error at `line`.
    fn regex(&mut self, line: u64, r: &str, what: &str) -> Option<Matcher> {
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
                    line,
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
    /// A percentage (0–100); an error names the percentage's own line.
    fn percent(&mut self, p: &Option<Spanned<istio::Percent>>, what: &str) -> Option<f64> {
        let p = p.as_ref()?;
        let v = p.value.value;
        if !(0.0..=100.0).contains(&v) {
            self.err(
                p.referenced.line(),
                format!("{what}: percentage {v} is outside 0–100"),
            );
            return None;
        }
        Some(v)
    }
}

/// Compiles the routing objects; findings (errors, warnings, notes) go to `findings`.
pub fn build(
    objects: &[Located<Object>],
    registry: &Registry,
    export_defaults: &crate::state::ExportDefaults,
    findings: &mut Vec<ConfigError>,
) -> RouteTable {
    let mut table = RouteTable::default();
    // Oldest first: where objects compete, the oldest wins (Istio's order).
    let mut ordered: Vec<(CreationOrder, &Located<Object>)> = objects
        .iter()
        .enumerate()
        .map(|(i, o)| (CreationOrder::of(o, i), o))
        .collect();
    ordered.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, o) in &ordered {
        if let Object::DestinationRule(dr) = &o.value {
            let mut c = compile_destination_rule(o, dr, registry, findings);
            if c.export_to.is_empty() {
                c.export_to = export_defaults.destination_rule.clone();
            }
            let list = table.destination_rules.entry(c.host.clone()).or_default();
            match list.iter_mut().find(|d| d.namespace == c.namespace) {
                Some(first) => {
                    let note = first.merge(c);
                    findings.push(o.finding(
                        Severity::Warning,
                        dr.spec.host.referenced.line(),
                        note,
                    ));
                    table
                        .conflicts
                        .push(crate::state::registry::Conflict::ConflictingDestinationRules);
                }
                None => list.push(c),
            }
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
    for (order, o) in &ordered {
        match &o.value {
            Object::VirtualService(vs) => {
                if let Some(mut c) = compile_virtual_service(o, vs, &check, findings, &mut regexes)
                {
                    c.order = order.clone();
                    if c.export_to.is_empty() {
                        c.export_to = export_defaults.virtual_service.clone();
                    }
                    let c = std::sync::Arc::new(c);
                    for (h, spanned) in c.hosts.iter().zip(&vs.spec.hosts) {
                        let line = spanned.referenced.line();
                        let list = table.virtual_services.entry(h.clone()).or_default();
                        if let Some(conflict) =
                            claim_conflict(o, &c, h, line, list, registry, findings)
                        {
                            table.conflicts.push(conflict);
                        }
                        list.push(c.clone());
                    }
                }
            }
            Object::EnvoyFilter(ef) => match compile_envoy_filter(o, ef, registry, findings) {
                Some(f) => table.envoy_filters.push(f),
                None => table.skipped_envoy_filters += 1,
            },
            Object::Sidecar(sc) => table.sidecars.push(compile_sidecar(o, sc, findings)),
            Object::Gateway => findings.push(o.finding(
                Severity::Note,
                0,
                "Gateway configures ingress gateways; the node proxy does not use it",
            )),
            _ => {}
        }
    }
    build_mesh_routes(&ordered, registry, &mut table, findings, &mut regexes);
    // EnvoyFilters and Sidecars are in creation order too: Istio applies EnvoyFilters of
    // equal priority oldest first, and of a namespace's several default Sidecars uses the
    // oldest.
    table
}

/// What to say when a VirtualService claims host `h` (written at `line`) that `earlier`
/// (older) ones already claim, or that a Kubernetes Service of another namespace owns.
fn claim_conflict(
    o: &Located<Object>,
    vs: &CompiledVirtualService,
    h: &str,
    line: u64,
    earlier: &[std::sync::Arc<CompiledVirtualService>],
    registry: &Registry,
    findings: &mut Vec<ConfigError>,
) -> Option<crate::state::registry::Conflict> {
    use crate::state::registry::Conflict;
    let owner = if h.contains('*') {
        None
    } else {
        registry.kubernetes_owner(h)
    };
    if let Some(owner) = owner.filter(|ow| !may_route(&vs.namespace, "", Some(ow))) {
        findings.push(o.finding(
            Severity::Warning,
            line,
            format!(
                "host {h} belongs to a Service of namespace {owner}: this VirtualService routes namespace {}'s own workloads only; other namespaces' requests to it keep their own routes",
                vs.namespace
            ),
        ));
        return Some(Conflict::RouteForAnotherNamespacesService);
    }
    let first = earlier
        .iter()
        .find(|e| may_route(&e.namespace, "", owner))?;
    findings.push(o.finding(
        Severity::Warning,
        line,
        format!(
            "(IST0109) host {h} is also routed by {}: a workload uses one VirtualService per host — its own namespace's, then one exported to its namespace by name, then the oldest — so this one is ignored wherever that one applies",
            first.source
        ),
    ));
    Some(Conflict::ConflictingVirtualServices)
}
