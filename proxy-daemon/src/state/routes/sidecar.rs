//! Sidecar: a workload's outbound traffic policy (registry-only or allow-any).
use super::*;

#[derive(Debug, Clone, Serialize)]
pub struct CompiledSidecar {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub outbound_mode: Option<OutboundMode>,
    pub source: String,
}

pub(super) fn compile_sidecar(
    o: &Located<Object>,
    sc: &istio::IstioObject<istio::SidecarSpec>,
) -> CompiledSidecar {
    CompiledSidecar {
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
    }
}
