//! Compiled routing: VirtualServices as per-host rule lists in Istio's first-match order,
//! DestinationRules merged into per-host policies, EnvoyFilter route overrides, Sidecar
//! outbound policies. Everything here is immutable once built; the data path reads it.
mod destination_rule;
mod envoy_filter;
mod matchers;
mod sidecar;
mod virtual_service;

pub use destination_rule::*;
pub use envoy_filter::*;
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

/// Everything routing needs, compiled.
/// Istio's config root namespace (meshConfig.rootNamespace's default): its selector-less
/// Sidecar is the mesh-wide default, its EnvoyFilters apply to every workload.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Default, Serialize)]
pub struct RouteTable {
    /// host (FQDN or wildcard) → VirtualServices for it, in configuration order.
    pub virtual_services: BTreeMap<String, Vec<std::sync::Arc<CompiledVirtualService>>>,
    /// host → DestinationRule (one per host; most specific namespace first at lookup).
    pub destination_rules: BTreeMap<String, Vec<CompiledDestinationRule>>,
    pub envoy_filters: Vec<CompiledEnvoyFilter>,
    /// EnvoyFilters Istio accepts but that patch what a node proxy does not have
    /// (listeners, clusters, inbound, gateways): skipped, each with a warning.
    pub skipped_envoy_filters: u64,
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
        // Only rules exported to the client's namespace (exportTo) are candidates: a rule
        // one namespace keeps to itself never steers another's traffic.
        let visible = || {
            list.iter()
                .filter(move |d| exported_to(&d.export_to, &d.namespace, namespace))
        };
        visible()
            .find(|d| d.namespace == namespace)
            .or_else(|| visible().find(|d| host.split('.').nth(1) == Some(d.namespace.as_str())))
            .or_else(|| visible().next())
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

    /// VirtualServices for a host that a workload (namespace `client`, `labels`) sees:
    /// exact name first, then the longest wildcard, each only if one of its rules is seen.
    pub fn virtual_services_for<'a>(
        &'a self,
        host: &'a str,
        client: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a std::sync::Arc<CompiledVirtualService>> + 'a {
        let seen = move |vs: &std::sync::Arc<CompiledVirtualService>| {
            self.sees(client, labels, &vs.export_to, &vs.namespace, host)
        };
        let list = match self.virtual_services.get(host) {
            Some(v) if v.iter().any(seen) => v.as_slice(),
            _ => self
                .virtual_services
                .iter()
                .filter(|(p, v)| {
                    crate::state::registry::host_matches(p, host) && v.iter().any(seen)
                })
                .max_by_key(|(p, _)| p.len())
                .map(|(_, v)| v.as_slice())
                .unwrap_or(&[]),
        };
        list.iter().filter(move |vs| seen(vs))
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
    table
}
