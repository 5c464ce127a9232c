//! AuthorizationPolicy compiled: who may call a workload, enforced by the destination's
//! node proxy (L4 fields on every connection, HTTP fields on every request).
//!
//! Evaluation as Istio documents it: CUSTOM, then DENY (any match denies), then ALLOW (a
//! workload with no ALLOW policy allows; one with ALLOW policies allows only what one of
//! them matches); AUDIT only marks; a dry-run policy (`istio.io/dry-run: "true"`) is
//! evaluated and counted, never enforced. A policy binds the workloads of its own
//! namespace only (by `selector`, all of them without one, or the traffic addressed to a
//! Service it targets); only the root namespace's bind every namespace.
//!
//! On a connection that is not HTTP, a rule that names HTTP-only fields follows Istio's
//! rule for TCP: in an ALLOW policy it never matches; elsewhere its HTTP fields are
//! ignored, so it matches more.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::{
    config::{
        istio::{IstioObject, Labels},
        security::{
            AuthorizationPolicySpec, AuthzAction, AuthzCondition, AuthzOperation, AuthzSource,
        },
        ConfigError, Located, Object, ObjectRef, Severity,
    },
    identity::Identity,
};

/// Istio's annotation for a policy that is only evaluated and reported.
const DRY_RUN: &str = "istio.io/dry-run";

/// A string match in Istio's forms: `v` exact, `v*` prefix, `*v` suffix, `*` present.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StrMatch {
    pub fn parse(v: &str) -> Self {
        if v == "*" {
            StrMatch::Presence
        } else if let Some(p) = v.strip_suffix('*') {
            StrMatch::Prefix(p.to_string())
        } else if let Some(s) = v.strip_prefix('*') {
            StrMatch::Suffix(s.to_string())
        } else {
            StrMatch::Exact(v.to_string())
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
            StrMatch::Presence => !v.is_empty(),
        }
    }

    fn matches_ignore_case(&self, v: &str) -> bool {
        let lower = |s: &str| s.to_ascii_lowercase();
        match self {
            StrMatch::Exact(e) => v.eq_ignore_ascii_case(e),
            StrMatch::Prefix(p) => lower(v).starts_with(&lower(p)),
            StrMatch::Suffix(s) => lower(v).ends_with(&lower(s)),
            StrMatch::Presence => !v.is_empty(),
        }
    }
}

/// A `paths` value: Istio's string forms, or a URI template with `{*}` (one non-empty
/// segment) and `{**}` (anything, `/` included).
#[derive(Debug, Clone, serde::Serialize)]
pub enum PathMatch {
    Str(StrMatch),
    Template(#[serde(skip)] Arc<regex::Regex>, String),
}

impl PathMatch {
    fn parse(v: &str) -> Result<Self, String> {
        if !v.contains('{') {
            return Ok(PathMatch::Str(StrMatch::parse(v)));
        }
        let mut pattern = String::from("^");
        for (i, segment) in v.split('/').enumerate() {
            if i > 0 {
                pattern.push('/');
            }
            match segment {
                "{*}" => pattern.push_str("[^/]+"),
                "{**}" => pattern.push_str(".*"),
                s if s.contains('{') || s.contains('}') => {
                    return Err(format!(
                    "invalid path template {v:?}: only whole segments {{*}} and {{**}} are allowed"
                ))
                }
                s => pattern.push_str(&regex::escape(s)),
            }
        }
        pattern.push('$');
        regex::Regex::new(&pattern)
            .map(|r| PathMatch::Template(Arc::new(r), v.to_string()))
            .map_err(|e| format!("invalid path template {v:?}: {e}"))
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Str(s) => s.matches(path),
            PathMatch::Template(r, _) => r.is_match(path),
        }
    }
}

/// What a verified token says, as AuthorizationPolicy reads it.
#[derive(Debug, Clone, Default)]
pub struct RequestAuth {
    /// `<iss>/<sub>`.
    pub principal: String,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Claims whose string value is a space-separated list.
    pub space_delimited: Vec<String>,
}

impl RequestAuth {
    /// The values of the claim at `path` (a string, each element of a list of strings, or
    /// the words of a space-delimited claim).
    pub fn claim_values(&self, path: &[String]) -> Vec<String> {
        let mut at: Option<&serde_json::Value> = None;
        for (i, key) in path.iter().enumerate() {
            at = if i == 0 {
                self.claims.get(key)
            } else {
                at.and_then(|v| v.get(key))
            };
        }
        let split = path.len() == 1 && self.space_delimited.iter().any(|c| c == &path[0]);
        match at {
            Some(serde_json::Value::String(s)) if split => s
                .split(' ')
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .filter_map(|v| match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    serde_json::Value::Bool(b) => Some(b.to_string()),
                    _ => None,
                })
                .collect(),
            Some(serde_json::Value::Number(n)) => vec![n.to_string()],
            Some(serde_json::Value::Bool(b)) => vec![b.to_string()],
            _ => Vec::new(),
        }
    }
}

/// A `from.source` entry.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Source {
    principals: Vec<StrMatch>,
    not_principals: Vec<StrMatch>,
    request_principals: Vec<StrMatch>,
    not_request_principals: Vec<StrMatch>,
    namespaces: Vec<StrMatch>,
    not_namespaces: Vec<StrMatch>,
    /// (namespace, service account).
    service_accounts: Vec<(String, String)>,
    not_service_accounts: Vec<(String, String)>,
    ip_blocks: Vec<ipnet::IpNet>,
    not_ip_blocks: Vec<ipnet::IpNet>,
    remote_ip_blocks: Vec<ipnet::IpNet>,
    not_remote_ip_blocks: Vec<ipnet::IpNet>,
    trust_domains: Vec<StrMatch>,
    not_trust_domains: Vec<StrMatch>,
}

/// A `to.operation` entry.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Operation {
    hosts: Vec<StrMatch>,
    not_hosts: Vec<StrMatch>,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    methods: Vec<StrMatch>,
    not_methods: Vec<StrMatch>,
    paths: Vec<PathMatch>,
    not_paths: Vec<PathMatch>,
}

/// A `when` key, as Istio names the attributes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum ConditionKey {
    RequestHeader(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    SourceServiceAccount,
    SourceTrustDomain,
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    AuthClaims(Vec<String>),
    DestinationIp,
    DestinationPort,
    ConnectionSni,
    /// `experimental.envoy.filters.*[…]`: Envoy metadata this proxy does not have.
    Experimental(String),
}

impl ConditionKey {
    fn parse(key: &str) -> Result<Self, String> {
        let bracket = |prefix: &str| -> Option<Vec<String>> {
            let rest = key.strip_prefix(prefix)?;
            let mut parts = Vec::new();
            let mut rest = rest;
            while let Some(r) = rest.strip_prefix('[') {
                let end = r.find(']')?;
                parts.push(r[..end].to_string());
                rest = &r[end + 1..];
            }
            (rest.is_empty() && !parts.is_empty() && parts.iter().all(|p| !p.is_empty()))
                .then_some(parts)
        };
        Ok(match key {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "source.serviceAccount" => ConditionKey::SourceServiceAccount,
            "source.trustDomain" => ConditionKey::SourceTrustDomain,
            "request.auth.principal" => ConditionKey::AuthPrincipal,
            "request.auth.audiences" => ConditionKey::AuthAudiences,
            "request.auth.presenter" => ConditionKey::AuthPresenter,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            "connection.sni" => ConditionKey::ConnectionSni,
            _ => {
                if let Some(mut parts) = bracket("request.headers") {
                    if parts.len() != 1 {
                        return Err(format!("invalid key {key:?}"));
                    }
                    return Ok(ConditionKey::RequestHeader(
                        parts.remove(0).to_ascii_lowercase(),
                    ));
                }
                if let Some(parts) = bracket("request.auth.claims") {
                    return Ok(ConditionKey::AuthClaims(parts));
                }
                if key.starts_with("experimental.envoy.filters.") && key.ends_with(']') {
                    return Ok(ConditionKey::Experimental(key.to_string()));
                }
                return Err(format!("unknown attribute: {key}"));
            }
        })
    }

    /// Only an HTTP request has it.
    fn http_only(&self) -> bool {
        matches!(
            self,
            ConditionKey::RequestHeader(_)
                | ConditionKey::AuthPrincipal
                | ConditionKey::AuthAudiences
                | ConditionKey::AuthPresenter
                | ConditionKey::AuthClaims(_)
        )
    }
}

/// A `when` entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Condition {
    key: ConditionKey,
    values: Vec<StrMatch>,
    not_values: Vec<StrMatch>,
    /// The same values as address blocks (IP keys) or ports (port key).
    #[serde(skip)]
    nets: (Vec<ipnet::IpNet>, Vec<ipnet::IpNet>),
    #[serde(skip)]
    ports: (Vec<u16>, Vec<u16>),
}

/// One rule.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
    /// Names a field only an HTTP request has.
    http_only_fields: bool,
}

/// Where a policy applies.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every workload of the namespace (every namespace's, in the root namespace).
    Namespace,
    /// Workloads whose labels include these.
    Selector(Labels),
    /// Traffic addressed to these Services (their host names) in the policy's namespace.
    Services(Vec<String>),
}

impl Scope {
    /// Whether a policy of this scope (in the target's namespace, or the root namespace)
    /// binds `target`.
    pub fn binds(&self, target: &Target) -> bool {
        match self {
            Scope::Namespace => true,
            Scope::Selector(s) => s.iter().all(|(k, v)| target.labels.get(k) == Some(v)),
            Scope::Services(hosts) => target.service.is_some_and(|s| hosts.iter().any(|h| h == s)),
        }
    }
}

/// Where a competing policy stands, as Istio orders them: `creationTimestamp`, then
/// name (the oldest first).
pub type Rank = (Option<jiff::Timestamp>, String);

/// The rank of an object with this metadata.
pub fn rank_of(meta: &crate::config::k8s::ObjectMeta) -> Rank {
    (
        meta.creation_timestamp
            .as_deref()
            .and_then(|t| t.parse().ok()),
        meta.name.clone(),
    )
}

/// A security policy kind bound to workloads by [`Scope`].
pub trait Scoped {
    fn scope(&self) -> &Scope;
    fn rank(&self) -> &Rank;
}

/// Policies of one kind by namespace, oldest first: what AuthorizationPolicy and
/// RequestAuthentication share.
#[derive(Debug, serde::Serialize)]
#[serde(transparent)]
pub struct ByNamespace<P> {
    policies: BTreeMap<String, Vec<Arc<P>>>,
}

impl<P> Default for ByNamespace<P> {
    fn default() -> Self {
        Self {
            policies: BTreeMap::new(),
        }
    }
}

impl<P: Scoped> ByNamespace<P> {
    pub fn insert(&mut self, namespace: &str, policy: P) {
        self.policies
            .entry(namespace.to_string())
            .or_default()
            .push(Arc::new(policy));
    }

    /// Puts each namespace's policies oldest first (after the last insert).
    pub fn sort(&mut self) {
        for policies in self.policies.values_mut() {
            policies.sort_by(|a, b| a.rank().cmp(b.rank()));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies that bind `target`: its namespace's, then the root namespace's.
    pub fn bound(&self, root_namespace: &str, target: &Target) -> Vec<Arc<P>> {
        let mut namespaces = vec![target.namespace];
        if root_namespace != target.namespace {
            namespaces.push(root_namespace);
        }
        namespaces
            .into_iter()
            .flat_map(|ns| self.policies.get(ns).into_iter().flatten())
            .filter(|p| p.scope().binds(target))
            .cloned()
            .collect()
    }
}

/// The scope of a security policy from its `selector` or `targetRef(s)`, checked as
/// Istio's schema checks them; also what a target that binds nothing is worth a warning.
pub fn target_scope(
    selector: Option<&crate::config::security::SecuritySelector>,
    target_ref: Option<&crate::config::security::PolicyTargetRef>,
    target_refs: Option<&[crate::config::security::PolicyTargetRef]>,
    namespace: &str,
) -> Result<(Scope, Vec<String>), String> {
    let mut targets: Vec<&crate::config::security::PolicyTargetRef> = Vec::new();
    targets.extend(target_ref);
    targets.extend(target_refs.into_iter().flatten());
    if (target_ref.is_some() && target_refs.is_some())
        || (!targets.is_empty() && selector.is_some())
    {
        return Err("only one of targetRefs or selector can be set".into());
    }
    let group_ok = regex_lite_dns(true);
    let mut services = Vec::new();
    let mut warnings = Vec::new();
    for t in &targets {
        if t.name.is_empty() {
            return Err("spec.targetRef.name: Required value".into());
        }
        if !group_ok(&t.group) {
            return Err(format!(
                "spec.targetRef.group in body should match '^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$': {:?}",
                t.group
            ));
        }
        let kind_ok = t
            .kind
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && t.kind
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !kind_ok {
            return Err(format!(
                "spec.targetRef.kind in body should match '^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$': {:?}",
                t.kind
            ));
        }
        if t.namespace
            .as_deref()
            .is_some_and(|n| !n.is_empty() && n != namespace)
        {
            return Err("cross namespace referencing is not currently supported".into());
        }
        if t.kind == "Service" && (t.group.is_empty() || t.group == "core") {
            services.push(format!("{}.{namespace}.svc.cluster.local", t.name));
        } else {
            warnings.push(format!(
                "targetRef {}/{} {}: only Services are targets here (Gateways are waypoints' and gateways'); this reference applies to nothing",
                t.group, t.kind, t.name
            ));
        }
    }
    let scope = if !targets.is_empty() {
        Scope::Services(services)
    } else {
        match selector.map(|s| &s.match_labels) {
            Some(l) if !l.is_empty() => Scope::Selector(l.clone()),
            _ => Scope::Namespace,
        }
    };
    Ok((scope, warnings))
}

/// A DNS-subdomain check (empty allowed when `empty_ok`), for API groups.
fn regex_lite_dns(empty_ok: bool) -> impl Fn(&str) -> bool {
    move |g: &str| {
        if g.is_empty() {
            return empty_ok;
        }
        g.split('.').all(|label| {
            !label.is_empty()
                && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
    }
}

/// One AuthorizationPolicy, compiled.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Policy {
    pub object: ObjectRef,
    pub scope: Scope,
    pub action: AuthzAction,
    pub dry_run: bool,
    /// None: `rules` absent (matches nothing).
    pub rules: Vec<Rule>,
    /// The CUSTOM provider's name.
    pub provider: Option<String>,
    #[serde(skip)]
    rank: Rank,
}

impl Scoped for Policy {
    fn scope(&self) -> &Scope {
        &self.scope
    }
    fn rank(&self) -> &Rank {
        &self.rank
    }
}

impl Policy {
    /// `namespace.name`, as logs and counters name it.
    pub fn label(&self) -> String {
        format!("{}.{}", self.object.namespace, self.object.name)
    }

    /// Whether one of its rules names an HTTP-only field.
    pub fn needs_http(&self) -> bool {
        self.rules.iter().any(|r| r.http_only_fields)
    }
}

/// The destination workload a request is for.
pub struct Target<'a> {
    pub namespace: &'a str,
    pub labels: &'a Labels,
    /// The Service host name the traffic was addressed to, if known.
    pub service: Option<&'a str>,
}

/// What a request or connection shows to the policies.
#[derive(Debug, Default)]
pub struct Attributes<'a> {
    /// The caller's verified identity (mutual TLS); None in plaintext.
    pub peer: Option<&'a Identity>,
    /// The TCP peer address.
    pub source_ip: Option<IpAddr>,
    /// The app's address and port the caller dialled.
    pub destination: Option<SocketAddr>,
    pub sni: Option<&'a str>,
    /// None: not an HTTP request (a TCP connection).
    pub http: Option<HttpAttributes<'a>>,
    /// The request's verified JWT, if it carried one.
    pub request_auth: Option<&'a RequestAuth>,
}

/// The HTTP part of a request.
#[derive(Debug)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// `:authority` or Host.
    pub host: &'a str,
    /// Normalized, without the query.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// What the policies decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied by this DENY policy, or (None) because the workload's ALLOW policies
    /// matched nothing.
    Deny(Option<String>),
}

/// A decision and what else the evaluation found (for counters and logs).
#[derive(Debug, Clone)]
pub struct Decision {
    pub verdict: Verdict,
    /// The policy that allowed (`ns.name`), if an ALLOW policy did.
    pub allowed_by: Option<String>,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
    /// Dry-run policies and what they would have done (`true`: denied).
    pub dry_run: Vec<(String, bool)>,
    /// A CUSTOM policy matched: (`ns.name`, provider) — the external authorizer decides
    /// too.
    pub custom: Option<(String, String)>,
}

impl Decision {
    pub fn denied(&self) -> bool {
        matches!(self.verdict, Verdict::Deny(_))
    }

    /// `ns.name` of the deciding policy, or what decided.
    pub fn policy(&self) -> String {
        match &self.verdict {
            Verdict::Deny(Some(p)) => p.clone(),
            Verdict::Deny(None) => "no_allow_policy_matched".into(),
            Verdict::Allow => self
                .allowed_by
                .clone()
                .unwrap_or_else(|| "no_allow_policy".into()),
        }
    }
}

/// Every AuthorizationPolicy of the configuration.
#[derive(Debug, Default, serde::Serialize)]
pub struct Authorization {
    root_namespace: String,
    policies: ByNamespace<Policy>,
    /// The mesh config's external authorizers, by name.
    pub providers: BTreeMap<String, ExtAuthz>,
}

/// An external authorizer a CUSTOM policy may name.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtAuthz {
    Http(Arc<crate::config::mesh::ExtAuthzHttp>),
    /// gRPC (`envoyExtAuthzGrpc`): not called here; what it would check is denied.
    Unsupported(String),
}

impl Authorization {
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies that bind `target`: its namespace's and the root namespace's.
    pub fn for_target(&self, target: &Target) -> Vec<Arc<Policy>> {
        self.policies.bound(&self.root_namespace, target)
    }
}

/// Decides for `attrs` under `policies` (those that bind the target).
pub fn decide(policies: &[Arc<Policy>], attrs: &Attributes) -> Decision {
    let mut decision = Decision {
        verdict: Verdict::Allow,
        allowed_by: None,
        audited: Vec::new(),
        dry_run: Vec::new(),
        custom: None,
    };
    let matched = |p: &Policy| p.rules.iter().any(|r| rule_matches(r, p, attrs));
    // CUSTOM: the provider of the first matching policy is asked (by the caller, which
    // can reach it); on TCP an HTTP provider has nothing to check, as in Istio.
    for p in policies.iter().filter(|p| p.action == AuthzAction::Custom) {
        if matched(p) {
            if p.dry_run {
                decision.dry_run.push((p.label(), true));
            } else if decision.custom.is_none() {
                decision.custom = Some((p.label(), p.provider.clone().unwrap_or_default()));
            }
        }
    }
    for p in policies.iter().filter(|p| p.action == AuthzAction::Audit) {
        if matched(p) {
            decision.audited.push(p.label());
        }
    }
    for p in policies.iter().filter(|p| p.action == AuthzAction::Deny) {
        if matched(p) {
            if p.dry_run {
                decision.dry_run.push((p.label(), true));
            } else if !decision.denied() {
                decision.verdict = Verdict::Deny(Some(p.label()));
            }
        }
    }
    let allows: Vec<&Arc<Policy>> = policies
        .iter()
        .filter(|p| p.action == AuthzAction::Allow)
        .collect();
    for p in allows.iter().filter(|p| p.dry_run) {
        decision.dry_run.push((p.label(), !matched(p)));
    }
    let enforced: Vec<&&Arc<Policy>> = allows.iter().filter(|p| !p.dry_run).collect();
    if decision.denied() || enforced.is_empty() {
        return decision;
    }
    match enforced.iter().find(|p| matched(p)) {
        Some(p) => decision.allowed_by = Some(p.label()),
        None => decision.verdict = Verdict::Deny(None),
    }
    decision
}

/// `from`: any entry; `to`: any entry; `when`: every condition. On TCP, HTTP-only parts
/// are treated as Istio treats them (see the module's comment).
fn rule_matches(rule: &Rule, policy: &Policy, attrs: &Attributes) -> bool {
    if attrs.http.is_none() && rule.http_only_fields && policy.action == AuthzAction::Allow {
        return false;
    }
    let from = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, attrs));
    let to = rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, attrs));
    from && to && rule.when.iter().all(|c| condition_matches(c, attrs))
}

/// A positive list holds if empty or any value matches; a `not` list holds if no value
/// matches (a missing attribute matches no value).
fn any_of<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(hit)
}

fn none_of<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
    !list.iter().any(hit)
}

fn source_matches(s: &Source, a: &Attributes) -> bool {
    let principal = a.peer.map(|p| {
        format!(
            "{}/ns/{}/sa/{}",
            p.trust_domain, p.namespace, p.service_account
        )
    });
    let principal_is = |m: &StrMatch| principal.as_deref().is_some_and(|p| m.matches(p));
    let namespace_is = |m: &StrMatch| a.peer.is_some_and(|p| m.matches(&p.namespace));
    let account_is = |(ns, sa): &(String, String)| {
        a.peer
            .is_some_and(|p| &p.namespace == ns && &p.service_account == sa)
    };
    let domain_is = |m: &StrMatch| a.peer.is_some_and(|p| m.matches(&p.trust_domain));
    let ip_in = |n: &ipnet::IpNet| a.source_ip.is_some_and(|ip| n.contains(&ip));
    let request_principal_is = |m: &StrMatch| {
        a.request_auth
            .is_some_and(|r| !r.principal.is_empty() && m.matches(&r.principal))
    };
    let http = a.http.is_some();
    any_of(&s.principals, principal_is)
        && none_of(&s.not_principals, principal_is)
        && (!http || any_of(&s.request_principals, request_principal_is))
        && (!http || none_of(&s.not_request_principals, request_principal_is))
        && any_of(&s.namespaces, namespace_is)
        && none_of(&s.not_namespaces, namespace_is)
        && any_of(&s.service_accounts, account_is)
        && none_of(&s.not_service_accounts, account_is)
        && any_of(&s.ip_blocks, ip_in)
        && none_of(&s.not_ip_blocks, ip_in)
        && any_of(&s.remote_ip_blocks, ip_in)
        && none_of(&s.not_remote_ip_blocks, ip_in)
        && any_of(&s.trust_domains, domain_is)
        && none_of(&s.not_trust_domains, domain_is)
}

fn operation_matches(o: &Operation, a: &Attributes) -> bool {
    let port = a.destination.map(|d| d.port());
    let port_is = |p: &u16| port == Some(*p);
    let l4 = any_of(&o.ports, port_is) && none_of(&o.not_ports, port_is);
    let Some(h) = &a.http else {
        // TCP: the HTTP fields are left out (an ALLOW rule naming them never got here).
        return l4;
    };
    let host_is = |m: &StrMatch| {
        m.matches_ignore_case(h.host)
            || h.host
                .rsplit_once(':')
                .is_some_and(|(name, _)| m.matches_ignore_case(name))
    };
    let method_is = |m: &StrMatch| m.matches(h.method);
    let path_is = |m: &PathMatch| m.matches(h.path);
    l4 && any_of(&o.hosts, host_is)
        && none_of(&o.not_hosts, host_is)
        && any_of(&o.methods, method_is)
        && none_of(&o.not_methods, method_is)
        && any_of(&o.paths, path_is)
        && none_of(&o.not_paths, path_is)
}

fn condition_matches(c: &Condition, a: &Attributes) -> bool {
    let text: Option<String> = match &c.key {
        ConditionKey::RequestHeader(name) => match &a.http {
            None => return true,
            Some(h) => h
                .headers
                .get_all(name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .first()
                .map(|v| v.to_string()),
        },
        ConditionKey::SourceIp | ConditionKey::RemoteIp => {
            let hit = |n: &ipnet::IpNet| a.source_ip.is_some_and(|ip| n.contains(&ip));
            return any_of(&c.nets.0, hit) && none_of(&c.nets.1, hit);
        }
        ConditionKey::DestinationIp => {
            let hit = |n: &ipnet::IpNet| a.destination.is_some_and(|d| n.contains(&d.ip()));
            return any_of(&c.nets.0, hit) && none_of(&c.nets.1, hit);
        }
        ConditionKey::DestinationPort => {
            let hit = |p: &u16| a.destination.is_some_and(|d| d.port() == *p);
            return any_of(&c.ports.0, hit) && none_of(&c.ports.1, hit);
        }
        ConditionKey::SourceNamespace => a.peer.map(|p| p.namespace.clone()),
        ConditionKey::SourcePrincipal => a.peer.map(|p| {
            format!(
                "{}/ns/{}/sa/{}",
                p.trust_domain, p.namespace, p.service_account
            )
        }),
        ConditionKey::SourceServiceAccount => a
            .peer
            .map(|p| format!("{}/{}", p.namespace, p.service_account)),
        ConditionKey::SourceTrustDomain => a.peer.map(|p| p.trust_domain.clone()),
        ConditionKey::ConnectionSni => a.sni.map(str::to_string),
        // A verified JWT's (on TCP these keys are left out).
        ConditionKey::AuthPrincipal
        | ConditionKey::AuthAudiences
        | ConditionKey::AuthPresenter
        | ConditionKey::AuthClaims(_) => {
            if a.http.is_none() {
                return true;
            }
            let values: Vec<String> = match (&c.key, a.request_auth) {
                (_, None) => Vec::new(),
                (ConditionKey::AuthPrincipal, Some(r)) => vec![r.principal.clone()],
                (ConditionKey::AuthAudiences, Some(r)) => r.audiences.clone(),
                (ConditionKey::AuthPresenter, Some(r)) => r.presenter.clone().into_iter().collect(),
                (ConditionKey::AuthClaims(path), Some(r)) => r.claim_values(path),
                _ => Vec::new(),
            };
            let hit = |m: &StrMatch| values.iter().any(|v| m.matches(v));
            return (c.values.is_empty() || c.values.iter().any(hit))
                && none_of(&c.not_values, hit);
        }
        ConditionKey::Experimental(_) => None,
    };
    let hit = |m: &StrMatch| text.as_deref().is_some_and(|t| m.matches(t));
    (c.values.is_empty() || c.values.iter().any(hit)) && none_of(&c.not_values, hit)
}

/// Istio's path normalization before matching: percent-decoded unreserved characters,
/// `.` and `..` segments resolved, the query left out; a path that climbs above the root
/// stays at the root.
pub fn normalize_path(raw: &str) -> String {
    let path = raw.split(['?', '#']).next().unwrap_or("/");
    let mut decoded = String::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = &path[i + 1..i + 3];
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    decoded.push(b as char);
                    i += 3;
                    continue;
                }
            }
        }
        decoded.push(bytes[i] as char);
        i += 1;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    if joined.starts_with('/') {
        joined
    } else {
        format!("/{joined}")
    }
}

// ---- compile

/// What Istio refuses in an `envoyExtAuthzHttp` provider.
fn check_ext_authz_http(h: &crate::config::mesh::ExtAuthzHttp) -> Result<(), String> {
    if h.port == 0 || h.port > 65535 {
        return Err(format!("port {} is not a valid port", h.port));
    }
    if let Some(p) = &h.path_prefix {
        if !p.starts_with('/') {
            return Err(format!("pathPrefix {p:?} must start with /"));
        }
    }
    if let Some(code) = &h.status_on_error {
        if !code.parse::<u16>().is_ok_and(|c| (200..600).contains(&c)) {
            return Err(format!("statusOnError {code:?} is not an HTTP status"));
        }
    }
    let host = h.service.rsplit('/').next().unwrap_or_default();
    if host.parse::<IpAddr>().is_err() && !host.contains('.') {
        return Err(format!(
            "service {:?} must be a fully qualified host name (or an address)",
            h.service
        ));
    }
    if let Some(t) = &h.timeout {
        crate::config::duration::parse(t).map_err(|e| format!("timeout: {e}"))?;
    }
    Ok(())
}

/// Compiles the AuthorizationPolicies among `objects`; problems go to `findings` at their
/// line (errors reject the configuration, warnings say what a field will not do).
pub fn build(
    objects: &[Located<Object>],
    root_namespace: &str,
    findings: &mut Vec<ConfigError>,
) -> Authorization {
    let mut table = Authorization {
        root_namespace: root_namespace.to_string(),
        policies: ByNamespace::default(),
        providers: BTreeMap::new(),
    };
    for o in objects {
        if let Object::MeshConfig(mesh) = &o.value {
            for p in &mesh.extension_providers {
                if let Some(h) = &p.envoy_ext_authz_http {
                    match check_ext_authz_http(h) {
                        Ok(()) => {
                            table
                                .providers
                                .insert(p.name.clone(), ExtAuthz::Http(Arc::new(h.clone())));
                        }
                        // Istio's answer to a provider it cannot use: what CUSTOM policies
                        // naming it match is denied.
                        Err(m) => {
                            findings.push(o.finding(
                                Severity::Warning,
                                0,
                                format!("mesh config: extension provider {}: {m}; CUSTOM policies naming it deny what they match", p.name),
                            ));
                            table
                                .providers
                                .insert(p.name.clone(), ExtAuthz::Unsupported(m));
                        }
                    }
                } else if p.envoy_ext_authz_grpc.is_some() {
                    table.providers.insert(
                        p.name.clone(),
                        ExtAuthz::Unsupported(
                            "gRPC external authorizers are not called by proxy-daemon".into(),
                        ),
                    );
                }
            }
        }
    }
    for o in objects {
        let Object::AuthorizationPolicy(ap) = &o.value else {
            continue;
        };
        if let Some(policy) = compile(o, ap, findings) {
            if let Some(name) = &policy.provider {
                if !table.providers.contains_key(name) {
                    findings.push(o.finding(
                        Severity::Warning,
                        0,
                        format!("AuthorizationPolicy: provider {name:?} is not among the mesh config's extensionProviders: the requests this policy matches are denied"),
                    ));
                }
            }
            table.policies.insert(&o.object_ref.namespace, policy);
        }
    }
    table.policies.sort();
    table
}

fn compile(
    o: &Located<Object>,
    ap: &IstioObject<AuthorizationPolicySpec>,
    findings: &mut Vec<ConfigError>,
) -> Option<Policy> {
    let spec = &ap.spec;
    let before = findings.len();
    let err = |findings: &mut Vec<ConfigError>, line: u64, m: String| {
        findings.push(o.error(line, format!("AuthorizationPolicy: {m}")));
    };
    let warn = |findings: &mut Vec<ConfigError>, line: u64, m: String| {
        findings.push(o.finding(Severity::Warning, line, format!("AuthorizationPolicy: {m}")));
    };
    let namespace = &o.object_ref.namespace;
    let scope = match target_scope(
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        spec.target_refs.as_deref(),
        namespace,
    ) {
        Ok((scope, warnings)) => {
            for w in warnings {
                warn(findings, 0, w);
            }
            scope
        }
        Err(m) => {
            err(findings, 0, m);
            Scope::Namespace
        }
    };
    match (spec.action, &spec.provider) {
        (AuthzAction::Custom, None) => err(
            findings,
            0,
            "must specify provider when using CUSTOM action".into(),
        ),
        (AuthzAction::Custom, Some(_)) => {}
        (_, Some(_)) => err(
            findings,
            0,
            "provider can only be used with CUSTOM action".into(),
        ),
        _ => {}
    }
    let mut rules = Vec::new();
    for r in spec.rules.iter().flatten() {
        let line = r.referenced.line();
        let rule = &r.value;
        let mut compiled = Rule::default();
        for f in rule.from.iter().flatten() {
            let fl = f.referenced.line();
            match &f.value.source {
                None => err(findings, fl, "`from.source` must not be empty".into()),
                Some(s) => match source(s, namespace) {
                    Ok((src, http)) => {
                        compiled.http_only_fields |= http;
                        compiled.from.push(src);
                    }
                    Err(m) => err(findings, fl, m),
                },
            }
        }
        for t in rule.to.iter().flatten() {
            let tl = t.referenced.line();
            match &t.value.operation {
                None => err(findings, tl, "`to.operation` must not be empty".into()),
                Some(op) => match operation(op) {
                    Ok((compiled_op, http)) => {
                        compiled.http_only_fields |= http;
                        compiled.to.push(compiled_op);
                    }
                    Err(m) => err(findings, tl, m),
                },
            }
        }
        for c in rule.when.iter().flatten() {
            match condition(&c.value) {
                Ok(cond) => {
                    compiled.http_only_fields |= cond.key.http_only();
                    compiled.when.push(cond);
                }
                Err(m) => err(findings, c.referenced.line(), m),
            }
        }
        if compiled.http_only_fields {
            let effect = match spec.action {
                AuthzAction::Allow => "on a TCP (non-HTTP) connection this rule never matches",
                _ => "on a TCP (non-HTTP) connection its HTTP fields are ignored and the rest of the rule applies",
            };
            findings.push(o.finding(
                Severity::Note,
                line,
                format!("AuthorizationPolicy: the rule names HTTP-only fields: {effect}"),
            ));
        }
        rules.push(compiled);
    }
    if findings[before..].iter().any(ConfigError::is_error) {
        return None;
    }
    let dry_run = ap
        .metadata
        .annotations
        .get(DRY_RUN)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let rank = rank_of(&ap.metadata);
    Some(Policy {
        object: o.object_ref.clone(),
        scope,
        action: spec.action,
        dry_run,
        rules,
        provider: spec.provider.as_ref().map(|p| p.name.clone()),
        rank,
    })
}

fn strs(list: &Option<Vec<String>>) -> Vec<StrMatch> {
    list.iter().flatten().map(|v| StrMatch::parse(v)).collect()
}

fn nets(list: &Option<Vec<String>>, field: &str) -> Result<Vec<ipnet::IpNet>, String> {
    list.iter()
        .flatten()
        .map(|v| {
            v.parse::<ipnet::IpNet>()
                .ok()
                .or_else(|| v.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
                .ok_or_else(|| format!("{field}: invalid IP address or CIDR {v:?}"))
        })
        .collect()
}

fn ports(list: &Option<Vec<String>>, field: &str) -> Result<Vec<u16>, String> {
    list.iter()
        .flatten()
        .map(|v| {
            v.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{field}: invalid port {v:?}"))
        })
        .collect()
}

fn accounts(list: &Option<Vec<String>>, namespace: &str) -> Vec<(String, String)> {
    list.iter()
        .flatten()
        .map(|v| match v.split_once('/') {
            Some((ns, sa)) => (ns.to_string(), sa.to_string()),
            None => (namespace.to_string(), v.clone()),
        })
        .collect()
}

/// A `source`, and whether it names an HTTP-only field.
fn source(s: &AuthzSource, namespace: &str) -> Result<(Source, bool), String> {
    let has = |l: &Option<Vec<String>>| l.as_ref().is_some_and(|v| !v.is_empty());
    if (has(&s.service_accounts) || has(&s.not_service_accounts))
        && (has(&s.namespaces)
            || has(&s.not_namespaces)
            || has(&s.principals)
            || has(&s.not_principals))
    {
        return Err("Cannot set serviceAccounts with namespaces or principals".into());
    }
    let fields = [
        &s.principals,
        &s.not_principals,
        &s.request_principals,
        &s.not_request_principals,
        &s.namespaces,
        &s.not_namespaces,
        &s.service_accounts,
        &s.not_service_accounts,
        &s.ip_blocks,
        &s.not_ip_blocks,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
        &s.trust_domains,
        &s.not_trust_domains,
    ];
    if !fields.iter().any(|f| has(f)) {
        return Err("`from.source` must not be empty".into());
    }
    let http = has(&s.request_principals) || has(&s.not_request_principals);
    Ok((
        Source {
            principals: strs(&s.principals),
            not_principals: strs(&s.not_principals),
            request_principals: strs(&s.request_principals),
            not_request_principals: strs(&s.not_request_principals),
            namespaces: strs(&s.namespaces),
            not_namespaces: strs(&s.not_namespaces),
            service_accounts: accounts(&s.service_accounts, namespace),
            not_service_accounts: accounts(&s.not_service_accounts, namespace),
            ip_blocks: nets(&s.ip_blocks, "ipBlocks")?,
            not_ip_blocks: nets(&s.not_ip_blocks, "notIpBlocks")?,
            remote_ip_blocks: nets(&s.remote_ip_blocks, "remoteIpBlocks")?,
            not_remote_ip_blocks: nets(&s.not_remote_ip_blocks, "notRemoteIpBlocks")?,
            trust_domains: strs(&s.trust_domains),
            not_trust_domains: strs(&s.not_trust_domains),
        },
        http,
    ))
}

/// An `operation`, and whether it names an HTTP-only field.
fn operation(o: &AuthzOperation) -> Result<(Operation, bool), String> {
    let has = |l: &Option<Vec<String>>| l.as_ref().is_some_and(|v| !v.is_empty());
    let any = [
        &o.hosts,
        &o.not_hosts,
        &o.ports,
        &o.not_ports,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ]
    .iter()
    .any(|f| has(f));
    if !any {
        return Err("`to.operation` must not be empty".into());
    }
    let paths = |l: &Option<Vec<String>>| -> Result<Vec<PathMatch>, String> {
        l.iter().flatten().map(|p| PathMatch::parse(p)).collect()
    };
    let http = [
        &o.hosts,
        &o.not_hosts,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ]
    .iter()
    .any(|f| has(f));
    Ok((
        Operation {
            hosts: strs(&o.hosts),
            not_hosts: strs(&o.not_hosts),
            ports: ports(&o.ports, "ports")?,
            not_ports: ports(&o.not_ports, "notPorts")?,
            methods: strs(&o.methods),
            not_methods: strs(&o.not_methods),
            paths: paths(&o.paths)?,
            not_paths: paths(&o.not_paths)?,
        },
        http,
    ))
}

fn condition(c: &AuthzCondition) -> Result<Condition, String> {
    let key = ConditionKey::parse(&c.key)?;
    let values = c.values.clone().unwrap_or_default();
    let not_values = c.not_values.clone().unwrap_or_default();
    if values.is_empty() && not_values.is_empty() {
        return Err(format!(
            "at least one of values or notValues must be set for key {}",
            c.key
        ));
    }
    let mut compiled = Condition {
        values: values.iter().map(|v| StrMatch::parse(v)).collect(),
        not_values: not_values.iter().map(|v| StrMatch::parse(v)).collect(),
        nets: (Vec::new(), Vec::new()),
        ports: (Vec::new(), Vec::new()),
        key,
    };
    match compiled.key {
        ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
            compiled.nets = (nets(&c.values, &c.key)?, nets(&c.not_values, &c.key)?);
        }
        ConditionKey::DestinationPort => {
            compiled.ports = (ports(&c.values, &c.key)?, ports(&c.not_values, &c.key)?);
        }
        _ => {}
    }
    Ok(compiled)
}

#[cfg(test)]
#[path = "authz_tests.rs"]
mod tests;
