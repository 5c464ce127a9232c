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

/// AuthorizationPolicy: who may call a workload, and how (`security.istio.io`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub selector: Option<SecuritySelector>,
    /// Deprecated single form of `targetRefs`.
    pub target_ref: Option<PolicyTargetRef>,
    pub target_refs: Option<Vec<PolicyTargetRef>>,
    /// Absent: the policy matches nothing (with ALLOW: allow-nothing).
    pub rules: Option<Vec<Spanned<AuthzRule>>>,
    #[serde(default)]
    pub action: AuthzAction,
    /// The extension provider of a CUSTOM policy.
    pub provider: Option<AuthzProvider>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthzAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzProvider {
    #[serde(default)]
    pub name: String,
}

/// What a policy is attached to, when not to workloads by selector.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
}

/// One rule: matches when any `from` and any `to` entry and every `when` condition match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    pub from: Option<Vec<Spanned<AuthzFrom>>>,
    pub to: Option<Vec<Spanned<AuthzTo>>>,
    pub when: Option<Vec<Spanned<AuthzCondition>>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzFrom {
    pub source: Option<AuthzSource>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzTo {
    pub operation: Option<AuthzOperation>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzSource {
    pub principals: Option<Vec<String>>,
    pub not_principals: Option<Vec<String>>,
    pub request_principals: Option<Vec<String>>,
    pub not_request_principals: Option<Vec<String>>,
    pub namespaces: Option<Vec<String>>,
    pub not_namespaces: Option<Vec<String>>,
    pub service_accounts: Option<Vec<String>>,
    pub not_service_accounts: Option<Vec<String>>,
    pub ip_blocks: Option<Vec<String>>,
    pub not_ip_blocks: Option<Vec<String>>,
    pub remote_ip_blocks: Option<Vec<String>>,
    pub not_remote_ip_blocks: Option<Vec<String>>,
    pub trust_domains: Option<Vec<String>>,
    pub not_trust_domains: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzOperation {
    pub hosts: Option<Vec<String>>,
    pub not_hosts: Option<Vec<String>>,
    pub ports: Option<Vec<String>>,
    pub not_ports: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub not_methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub not_paths: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzCondition {
    #[serde(default)]
    pub key: String,
    pub values: Option<Vec<String>>,
    pub not_values: Option<Vec<String>>,
}

/// RequestAuthentication: which JWTs a workload accepts, and what it tells the app.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    pub selector: Option<SecuritySelector>,
    pub target_ref: Option<PolicyTargetRef>,
    pub target_refs: Option<Vec<PolicyTargetRef>>,
    /// An entry may be null in YAML (`-`): Istio's schema refuses it, so do we.
    pub jwt_rules: Option<Vec<Spanned<Option<JwtRule>>>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtRule {
    #[serde(default)]
    pub issuer: String,
    pub audiences: Option<Vec<String>>,
    pub jwks_uri: Option<String>,
    /// A JWKS document, inline.
    pub jwks: Option<String>,
    pub from_headers: Option<Vec<JwtHeader>>,
    pub from_params: Option<Vec<String>>,
    pub from_cookies: Option<Vec<String>>,
    pub output_payload_to_header: Option<String>,
    pub output_claim_to_headers: Option<Vec<Option<ClaimToHeader>>>,
    #[serde(default)]
    pub forward_original_token: bool,
    pub timeout: Option<String>,
    pub space_delimited_claims: Option<Vec<String>>,
    pub presence: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtHeader {
    pub name: Option<String>,
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    #[serde(default)]
    pub header: String,
    #[serde(default)]
    pub claim: String,
}
