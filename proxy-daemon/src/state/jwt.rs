//! RequestAuthentication compiled: the JWT issuers a workload accepts, where their tokens
//! are read from, and what a verified token tells the app. Bound as AuthorizationPolicy is
//! (selector, namespace, root namespace, targetRefs to a Service); the rules of every
//! policy bound to a workload are combined, as in Istio.
use std::{sync::Arc, time::Duration};

use http::HeaderName;

use super::authz::{rank_of, ByNamespace, Rank, Scope, Scoped, Target};
use crate::config::{
    istio::IstioObject,
    security::{JwtRule, RequestAuthenticationSpec},
    ConfigError, Located, Object, ObjectRef,
};

/// Where a JWKS comes from.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// The `jwks` field, parsed once.
    Inline(#[serde(skip)] Arc<jsonwebtoken::jwk::JwkSet>),
    /// Fetched by the daemon (from the node's network), cached.
    Uri { uri: String, timeout: Duration },
}

/// One `jwtRules` entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JwtProvider {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: KeySource,
    /// Headers and the prefix before the token (`Authorization: Bearer ` by default).
    #[serde(skip)]
    pub headers: Vec<(HeaderName, String)>,
    /// Query parameters (`access_token` by default).
    pub params: Vec<String>,
    pub cookies: Vec<String>,
    #[serde(skip)]
    pub payload_header: Option<HeaderName>,
    /// (header, claim path).
    #[serde(skip)]
    pub claim_headers: Vec<(HeaderName, Vec<String>)>,
    pub forward_original_token: bool,
    /// Claims whose string value is a space-separated list (`scope`, `permission` always).
    pub space_delimited: Vec<String>,
    /// `presence: REQUIRED`: a request without a token is refused.
    pub required: bool,
}

/// One RequestAuthentication.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuthnPolicy {
    pub object: ObjectRef,
    pub scope: Scope,
    pub providers: Vec<Arc<JwtProvider>>,
    #[serde(skip)]
    rank: Rank,
}

impl Scoped for AuthnPolicy {
    fn scope(&self) -> &Scope {
        &self.scope
    }
    fn rank(&self) -> &Rank {
        &self.rank
    }
}

/// Every RequestAuthentication of the configuration.
#[derive(Debug, Default, serde::Serialize)]
pub struct RequestAuthn {
    root_namespace: String,
    policies: ByNamespace<AuthnPolicy>,
}

impl RequestAuthn {
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The providers of every policy bound to `target`.
    pub fn providers_for(&self, target: &Target) -> Vec<Arc<JwtProvider>> {
        self.policies
            .bound(&self.root_namespace, target)
            .iter()
            .flat_map(|p| p.providers.iter().cloned())
            .collect()
    }
}

/// The prefix of a key URI that means "discover the keys from this issuer".
pub const DISCOVER: &str = "discover:";

/// The default timeout of a JWKS fetch (Istio's).
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// Compiles the RequestAuthentications among `objects`; problems go to `findings` at their
/// line.
pub fn build(
    objects: &[Located<Object>],
    root_namespace: &str,
    findings: &mut Vec<ConfigError>,
) -> RequestAuthn {
    let mut table = RequestAuthn {
        root_namespace: root_namespace.to_string(),
        policies: ByNamespace::default(),
    };
    for o in objects {
        let Object::RequestAuthentication(ra) = &o.value else {
            continue;
        };
        if let Some(policy) = compile(o, ra, findings) {
            table.policies.insert(&o.object_ref.namespace, policy);
        }
    }
    table.policies.sort();
    table
}

fn compile(
    o: &Located<Object>,
    ra: &IstioObject<RequestAuthenticationSpec>,
    findings: &mut Vec<ConfigError>,
) -> Option<AuthnPolicy> {
    let spec = &ra.spec;
    let before = findings.len();
    let err = |findings: &mut Vec<ConfigError>, line: u64, m: String| {
        findings.push(o.error(line, format!("RequestAuthentication: {m}")));
    };
    let namespace = &o.object_ref.namespace;
    let scope = match super::authz::target_scope(
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        spec.target_refs.as_deref(),
        namespace,
    ) {
        Ok((scope, _warnings)) => scope,
        Err(m) => {
            err(findings, 0, m);
            return None;
        }
    };
    let mut providers = Vec::new();
    for (i, r) in spec.jwt_rules.iter().flatten().enumerate() {
        let line = r.referenced.line();
        let Some(rule) = &r.value else {
            err(
                findings,
                line,
                format!("spec.jwtRules[{i}] in body must be of type object"),
            );
            continue;
        };
        match provider(rule, i) {
            Ok(p) => providers.push(Arc::new(p)),
            Err(m) => err(findings, line, m),
        }
    }
    if findings[before..].iter().any(ConfigError::is_error) {
        return None;
    }
    let rank = rank_of(&ra.metadata);
    Some(AuthnPolicy {
        object: o.object_ref.clone(),
        scope,
        providers,
        rank,
    })
}

fn header_name(name: &str, what: &str) -> Result<HeaderName, String> {
    if name.is_empty() {
        return Err(format!("{what} in body should be at least 1 chars long"));
    }
    if name.starts_with(':') {
        return Err(format!("{what} in body should match '^[-_A-Za-z0-9]+$'"));
    }
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{what} in body should match '^[-_A-Za-z0-9]+$'"))
}

fn provider(r: &JwtRule, i: usize) -> Result<JwtProvider, String> {
    let at = format!("spec.jwtRules[{i}]");
    if r.issuer.is_empty() {
        return Err(format!("{at}.issuer: Required value"));
    }
    let audiences = r.audiences.clone().unwrap_or_default();
    if let Some(j) = audiences.iter().position(String::is_empty) {
        return Err(format!(
            "{at}.audiences[{j}] in body should be at least 1 chars long"
        ));
    }
    let timeout = match &r.timeout {
        None => JWKS_TIMEOUT,
        Some(t) => crate::config::duration::parse(t)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("{at}.timeout: must be a valid duration greater than 1ms"))?,
    };
    let keys = match (&r.jwks, &r.jwks_uri) {
        (Some(inline), _) => KeySource::Inline(Arc::new(
            serde_json::from_str(inline).map_err(|e| format!("{at}.jwks: not a JWKS: {e}"))?,
        )),
        (None, Some(uri)) => {
            let parsed: Result<http::Uri, _> = uri.parse();
            match parsed {
                Ok(u) if matches!(u.scheme_str(), Some("http") | Some("https")) => KeySource::Uri {
                    uri: uri.clone(),
                    timeout,
                },
                _ => {
                    return Err(format!(
                        "{at}.jwksUri: url must have scheme http:// or https://"
                    ))
                }
            }
        }
        // OpenID Connect discovery from the issuer, as istiod does it.
        (None, None) => KeySource::Uri {
            uri: format!("{DISCOVER}{}", r.issuer),
            timeout,
        },
    };
    let mut headers = Vec::new();
    for (j, h) in r.from_headers.iter().flatten().enumerate() {
        let Some(name) = &h.name else {
            return Err(format!("{at}.fromHeaders[{j}].name: Required value"));
        };
        headers.push((
            header_name(name, &format!("{at}.fromHeaders[{j}].name"))?,
            h.prefix.clone(),
        ));
    }
    let params = r.from_params.clone().unwrap_or_default();
    if let Some(j) = params.iter().position(String::is_empty) {
        return Err(format!(
            "{at}.fromParams[{j}] in body should be at least 1 chars long"
        ));
    }
    let cookies = r.from_cookies.clone().unwrap_or_default();
    if let Some(j) = cookies.iter().position(String::is_empty) {
        return Err(format!(
            "{at}.fromCookies[{j}] in body should be at least 1 chars long"
        ));
    }
    let defaults = headers.is_empty() && params.is_empty() && cookies.is_empty();
    if defaults {
        headers.push((http::header::AUTHORIZATION, "Bearer ".into()));
    }
    let params = if defaults {
        vec!["access_token".to_string()]
    } else {
        params
    };
    let mut claim_headers = Vec::new();
    for (j, c) in r.output_claim_to_headers.iter().flatten().enumerate() {
        let Some(c) = c else {
            return Err(format!(
                "{at}.outputClaimToHeaders[{j}] in body must be of type object"
            ));
        };
        if c.claim.is_empty() {
            return Err(format!(
                "{at}.outputClaimToHeaders[{j}].claim in body should be at least 1 chars long"
            ));
        }
        let header = header_name(&c.header, &format!("{at}.outputClaimToHeaders[{j}].header"))?;
        claim_headers.push((header, c.claim.split('.').map(str::to_string).collect()));
    }
    let payload_header = match &r.output_payload_to_header {
        Some(h) => Some(header_name(h, &format!("{at}.outputPayloadToHeader"))?),
        None => None,
    };
    let mut space_delimited = vec!["scope".to_string(), "permission".to_string()];
    for (j, c) in r.space_delimited_claims.iter().flatten().enumerate() {
        if c.is_empty() {
            return Err(format!(
                "{at}.spaceDelimitedClaims[{j}] in body should be at least 1 chars long"
            ));
        }
        space_delimited.push(c.clone());
    }
    let required = match r.presence.as_deref() {
        None | Some("OPTIONAL") => false,
        Some("REQUIRED") => true,
        Some(other) => {
            return Err(format!(
                "{at}.presence: Unsupported value: {other:?}: supported values: \"OPTIONAL\", \"REQUIRED\""
            ))
        }
    };
    Ok(JwtProvider {
        issuer: r.issuer.clone(),
        audiences,
        keys,
        headers,
        params,
        cookies,
        payload_header,
        claim_headers,
        forward_original_token: r.forward_original_token,
        space_delimited,
        required,
    })
}
