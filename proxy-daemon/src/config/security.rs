//! `security.istio.io` kinds (v1 and v1beta1 share one schema), with Istio's field names and
//! enum spellings. Unknown fields are errors, as in [`super::istio`].
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::istio::Labels;

/// `selector` of the security kinds (a `matchLabels` map; networking's Sidecar says
/// `labels`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecuritySelector {
    #[serde(default)]
    pub match_labels: Labels,
}

/// Mutual TLS mode of a PeerAuthentication (`UNSET` inherits from the parent scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSetting {
    #[serde(default)]
    pub mode: MtlsMode,
}

/// PeerAuthentication: which connections a workload accepts without mutual TLS.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    pub selector: Option<SecuritySelector>,
    pub mtls: Option<MtlsSetting>,
    /// Keyed by the workload's (container) port, as a string in YAML.
    pub port_level_mtls: Option<BTreeMap<String, Spanned<MtlsSetting>>>,
}

/// What [`PeerAuthenticationSpec::validate`] found wrong, in Istio's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerAuthenticationError {
    #[error("portLevelMtls requires selector")]
    PortsWithoutSelector,
    #[error("spec.portLevelMtls in body should have at least 1 properties")]
    EmptyPorts,
    #[error("portLevelMtls: {0:?}: port must be between 1-65535")]
    BadPort(String),
}

impl PeerAuthenticationSpec {
    /// The port-level modes, checked as Istio's validation does; each error with the line
    /// of its entry (0: the object's).
    pub fn validate(&self) -> Result<BTreeMap<u16, MtlsMode>, Vec<(u64, PeerAuthenticationError)>> {
        let Some(ports) = &self.port_level_mtls else {
            return Ok(BTreeMap::new());
        };
        let mut errors = Vec::new();
        if ports.is_empty() {
            errors.push((0, PeerAuthenticationError::EmptyPorts));
        }
        let mut modes = BTreeMap::new();
        for (port, setting) in ports {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {
                    modes.insert(p, setting.value.mode);
                }
                _ => errors.push((
                    setting.referenced.line(),
                    PeerAuthenticationError::BadPort(port.clone()),
                )),
            }
        }
        let selects = self
            .selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty());
        if !ports.is_empty() && !selects {
            errors.push((0, PeerAuthenticationError::PortsWithoutSelector));
        }
        if errors.is_empty() {
            Ok(modes)
        } else {
            Err(errors)
        }
    }
}
