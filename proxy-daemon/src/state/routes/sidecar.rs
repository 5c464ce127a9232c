//! Sidecar: a workload's outbound traffic policy (registry-only or allow-any) and what it
//! sees (`egress[].hosts`).
use super::*;

#[derive(Debug, Clone, Serialize)]
pub struct CompiledSidecar {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub outbound_mode: Option<OutboundMode>,
    /// `egress[].hosts` as (namespace pattern, host pattern); None: no egress section,
    /// everything exported to the namespace is seen.
    pub egress_hosts: Option<Vec<(String, String)>>,
    pub source: String,
}

impl CompiledSidecar {
    /// Whether a service or rule of namespace `owner` for `host` is imported by this
    /// Sidecar into its workloads (of namespace `client`): Istio's `namespace/dnsName`,
    /// with `*`, `.` (the Sidecar's own namespace) and `~` (none) as namespaces, and `*` or
    /// `*.suffix` wildcards as names.
    pub fn imports(&self, client: &str, owner: &str, host: &str) -> bool {
        let Some(hosts) = &self.egress_hosts else {
            return true;
        };
        hosts.iter().any(|(ns, name)| {
            let ns_ok = match ns.as_str() {
                "*" => true,
                "." => owner == client,
                "~" => false,
                other => other == owner,
            };
            ns_ok && (name == "*" || crate::state::registry::host_matches(name, host))
        })
    }
}

pub(super) fn compile_sidecar(
    o: &Located<Object>,
    sc: &istio::IstioObject<istio::SidecarSpec>,
    findings: &mut Vec<ConfigError>,
) -> CompiledSidecar {
    let mut egress_hosts = None;
    for listener in &sc.spec.egress {
        let line = listener.referenced.line();
        let l = &listener.value;
        if l.port.is_some() || l.bind.is_some() || l.capture_mode.is_some() {
            findings.push(o.finding(
                Severity::Note,
                line,
                "egress port, bind and captureMode do not apply to a node proxy (no per-workload listeners); its hosts do",
            ));
        }
        for h in &l.hosts {
            match h.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() => egress_hosts
                    .get_or_insert_with(Vec::new)
                    .push((ns.to_string(), name.to_ascii_lowercase())),
                _ => findings.push(o.finding(
                    Severity::Error,
                    line,
                    format!("egress host {h:?}: expected namespace/dnsName (e.g. ./* or istio-system/*)"),
                )),
            }
        }
    }
    CompiledSidecar {
        name: o.object_ref.name.clone(),
        namespace: o.object_ref.namespace.clone(),
        selector: sc.spec.workload_selector.as_ref().map(|s| s.labels.clone()),
        outbound_mode: sc.spec.outbound_traffic_policy.as_ref().map(|p| p.mode),
        egress_hosts,
        source: format!(
            "{} ({}:{})",
            o.object_ref,
            o.origin.path.display(),
            o.origin.line
        ),
    }
}
