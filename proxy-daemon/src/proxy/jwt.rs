//! JWT authentication at the destination (RequestAuthentication), as Envoy's `jwt_authn`
//! filter does it for Istio: a request without a token passes (unless a rule says
//! `presence: REQUIRED`); a token that does not verify is refused (401, or 403 for an
//! audience it is not for); a verified one names the request's principal
//! (`<iss>/<sub>`), audiences, presenter and claims for AuthorizationPolicy, and is
//! removed from the request unless the rule forwards it.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;

pub use crate::state::authz::RequestAuth;
use crate::state::jwt::{JwtProvider, KeySource, DISCOVER};

/// Why a request was refused, in Envoy's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Missing,
    Malformed,
    UnknownIssuer,
    Expired,
    NotYetValid,
    AudienceNotAllowed,
    NoMatchingKey,
    VerificationFailed,
    JwksFetchFailed,
}

impl Rejection {
    pub fn message(self) -> &'static str {
        match self {
            Rejection::Missing => "Jwt is missing",
            Rejection::Malformed => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            Rejection::UnknownIssuer => "Jwt issuer is not configured",
            Rejection::Expired => "Jwt is expired",
            Rejection::NotYetValid => "Jwt not yet valid",
            Rejection::AudienceNotAllowed => "Audiences in Jwt are not allowed",
            Rejection::NoMatchingKey => "Jwks doesn't have key to match kid or alg from Jwt",
            Rejection::VerificationFailed => "Jwt verification fails",
            Rejection::JwksFetchFailed => "Jwks remote fetch is failed",
        }
    }

    /// Envoy answers 403 to a token for another audience, 401 to the rest.
    pub fn status(self) -> StatusCode {
        if self == Rejection::AudienceNotAllowed {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        }
    }

    /// The label of `proxy_daemon_jwt_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Missing => "missing",
            Rejection::Malformed => "malformed",
            Rejection::UnknownIssuer => "unknown_issuer",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::AudienceNotAllowed => "audience",
            Rejection::NoMatchingKey => "no_matching_key",
            Rejection::VerificationFailed => "signature",
            Rejection::JwksFetchFailed => "jwks_fetch",
        }
    }
}

// ---- JWKS from a URI, cached

/// How long a fetched JWKS is used before it is fetched again (Envoy's default).
const JWKS_REFRESH: Duration = Duration::from_secs(600);
/// After a failed fetch, how long before the next try (requests meanwhile are refused).
const JWKS_RETRY: Duration = Duration::from_secs(5);
/// The largest JWKS document read (real ones are a few KiB).
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// URIs whose keys are kept; past it, the oldest is forgotten.
const MAX_JWKS_URIS: usize = 256;

struct Fetched {
    keys: Option<Arc<JwkSet>>,
    at: Instant,
}

/// JWKS documents by URI, each fetched by one request at a time.
#[derive(Default)]
pub struct JwksCache {
    entries: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Fetched>>>>>,
    /// Loopback or link-local networks fetching may still reach (`--jwks-allow-cidr`).
    allowed: Vec<ipnet::IpNet>,
}

impl JwksCache {
    pub fn allowing(allowed: Vec<ipnet::IpNet>) -> Self {
        Self {
            allowed,
            ..Default::default()
        }
    }

    async fn keys(&self, uri: &str, timeout: Duration) -> Result<Arc<JwkSet>, Rejection> {
        let slot = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if entries.len() >= MAX_JWKS_URIS && !entries.contains_key(uri) {
                entries.clear();
            }
            entries.entry(uri.to_string()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(f) = slot.as_ref() {
            let fresh = match &f.keys {
                Some(_) => f.at.elapsed() < JWKS_REFRESH,
                None => f.at.elapsed() < JWKS_RETRY,
            };
            if fresh {
                return f.keys.clone().ok_or(Rejection::JwksFetchFailed);
            }
        }
        let keys = match tokio::time::timeout(timeout, fetch_keys(uri, &self.allowed)).await {
            Ok(Ok(k)) => Some(Arc::new(k)),
            Ok(Err(e)) => {
                tracing::warn!(%uri, error = %e, "JWKS fetch failed; tokens of its issuer are refused until it succeeds");
                None
            }
            Err(_) => {
                tracing::warn!(%uri, timeout_ms = timeout.as_millis() as u64, "JWKS fetch timed out");
                None
            }
        };
        // A refresh that fails keeps the keys it had.
        let keys = keys.or_else(|| slot.as_ref().and_then(|f| f.keys.clone()));
        *slot = Some(Fetched {
            keys: keys.clone(),
            at: Instant::now(),
        });
        keys.ok_or(Rejection::JwksFetchFailed)
    }
}

/// The keys at `uri`; an issuer (a `discover:` URI) is asked for its `jwks_uri` first
/// (OpenID Connect discovery, as istiod does for a rule without `jwksUri`).
async fn fetch_keys(uri: &str, allowed: &[ipnet::IpNet]) -> Result<JwkSet, String> {
    let Some(issuer) = uri.strip_prefix(DISCOVER) else {
        return serde_json::from_slice(&fetch(uri, allowed).await?)
            .map_err(|e| format!("not a JWKS: {e}"));
    };
    let config = fetch(
        &format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        ),
        allowed,
    )
    .await?;
    let config: serde_json::Value =
        serde_json::from_slice(&config).map_err(|e| format!("OpenID configuration: {e}"))?;
    let jwks_uri = config["jwks_uri"]
        .as_str()
        .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
        .ok_or("OpenID configuration without jwks_uri")?;
    serde_json::from_slice(&fetch(jwks_uri, allowed).await?).map_err(|e| format!("not a JWKS: {e}"))
}

/// Whether the daemon may fetch from `ip` for a tenant's RequestAuthentication: never the
/// node's own loopback services (the kubelet's ports, the daemon's admin), link-local
/// addresses (among them the cloud metadata endpoint 169.254.169.254), AWS's IPv6
/// metadata address fd00:ec2::254, unspecified, multicast or broadcast addresses —
/// unless `allowed` names the network.
pub fn fetch_permitted(ip: std::net::IpAddr, allowed: &[ipnet::IpNet]) -> bool {
    use std::net::IpAddr;
    if allowed.iter().any(|n| n.contains(&ip)) {
        return true;
    }
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let metadata_v6 = std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local()
                || v6 == metadata_v6)
        }
    }
}

/// GET `uri` (http or https, from the daemon's own network): the body, at most
/// [`MAX_JWKS_BYTES`]. The name is resolved once and the address checked and dialled is
/// the same one (no second lookup a rebinding DNS answer could change).
async fn fetch(uri: &str, allowed: &[ipnet::IpNet]) -> Result<Bytes, String> {
    let parsed: http::Uri = uri.parse().map_err(|e| format!("{e}"))?;
    let https = parsed.scheme_str() == Some("https");
    let host = parsed.host().ok_or("no host")?.to_string();
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host_for_dial = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host_for_dial.as_str(), port))
        .await
        .map_err(|e| format!("resolving {host_for_dial}: {e}"))?
        .collect();
    let Some(addr) = addrs
        .iter()
        .copied()
        .find(|a| fetch_permitted(a.ip(), allowed))
    else {
        return Err(format!(
            "{host_for_dial} is {addrs:?}: loopback, link-local or otherwise not fetched for a namespace's RequestAuthentication (the node's own services, the cloud metadata endpoint); --jwks-allow-cidr allows a network"
        ));
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let path = parsed
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let req = Request::get(path)
        .header(
            http::header::HOST,
            parsed.authority().map(|a| a.as_str()).unwrap_or(&host),
        )
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    if https {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(host_for_dial.clone())
            .map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        get(TokioIo::new(tls), req).await
    } else {
        get(TokioIo::new(tcp), req).await
    }
}

#[cfg(test)]
pub(crate) async fn fetch_for_test(uri: &str, allowed: &[ipnet::IpNet]) -> Result<Bytes, String> {
    fetch(uri, allowed).await
}

async fn get<I>(io: I, req: Request<Empty<Bytes>>) -> Result<Bytes, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| format!("reading: {e}"))
}

// ---- tokens on a request

/// Where a token was found.
enum Location {
    Header(http::HeaderName),
    Param,
    Cookie,
}

/// The tokens of `req` at the providers' locations: (token, where, providers that read
/// there).
fn extract<'a, B>(
    req: &Request<B>,
    providers: &'a [Arc<JwtProvider>],
) -> Vec<(String, Location, Vec<&'a Arc<JwtProvider>>)> {
    let mut found: Vec<(String, Location, Vec<&'a Arc<JwtProvider>>)> = Vec::new();
    let mut add = |token: String, at: Location, p: &'a Arc<JwtProvider>| {
        if let Some(entry) = found.iter_mut().find(|(t, _, _)| *t == token) {
            entry.2.push(p);
        } else {
            found.push((token, at, vec![p]));
        }
    };
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let cookies: Vec<(String, String)> = req
        .headers()
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for p in providers {
        for (name, prefix) in &p.headers {
            for v in req.headers().get_all(name).iter() {
                let Ok(v) = v.to_str() else { continue };
                let token = if prefix.is_empty() {
                    Some(v)
                } else if v.len() >= prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix)
                {
                    Some(&v[prefix.len()..])
                } else {
                    None
                };
                if let Some(t) = token.map(str::trim).filter(|t| !t.is_empty()) {
                    add(t.to_string(), Location::Header(name.clone()), p);
                }
            }
        }
        for param in &p.params {
            for (k, v) in &query {
                if k == param && !v.is_empty() {
                    add(v.clone(), Location::Param, p);
                }
            }
        }
        for cookie in &p.cookies {
            for (k, v) in &cookies {
                if k == cookie && !v.is_empty() {
                    add(v.clone(), Location::Cookie, p);
                }
            }
        }
    }
    found
}

/// The claims of a token, unverified (to pick the providers of its issuer).
fn unverified_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Verifies `token` with `keys` for `provider`.
fn verify(
    token: &str,
    provider: &JwtProvider,
    keys: &JwkSet,
) -> Result<serde_json::Map<String, serde_json::Value>, Rejection> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| Rejection::Malformed)?;
    let candidates: Vec<&jsonwebtoken::jwk::Jwk> = match &header.kid {
        Some(kid) => keys
            .keys
            .iter()
            .filter(|k| k.common.key_id.as_deref() == Some(kid.as_str()))
            .collect(),
        None => keys.keys.iter().collect(),
    };
    if candidates.is_empty() {
        return Err(Rejection::NoMatchingKey);
    }
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_issuer(&[&provider.issuer]);
    validation.required_spec_claims = Default::default();
    validation.leeway = 60;
    validation.validate_nbf = true;
    if provider.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        // A token without `aud` is not for these audiences.
        validation.set_audience(&provider.audiences);
        validation.set_required_spec_claims(&["aud"]);
    }
    let mut last = Rejection::NoMatchingKey;
    for jwk in candidates {
        let Ok(key) = jsonwebtoken::DecodingKey::from_jwk(jwk) else {
            continue;
        };
        use jsonwebtoken::errors::ErrorKind;
        match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        ) {
            Ok(data) => return Ok(data.claims),
            Err(e) => {
                last = match e.kind() {
                    ErrorKind::ExpiredSignature => return Err(Rejection::Expired),
                    ErrorKind::ImmatureSignature => return Err(Rejection::NotYetValid),
                    ErrorKind::InvalidAudience => return Err(Rejection::AudienceNotAllowed),
                    ErrorKind::MissingRequiredClaim(c) if c == "aud" => {
                        return Err(Rejection::AudienceNotAllowed)
                    }
                    ErrorKind::InvalidIssuer => return Err(Rejection::UnknownIssuer),
                    ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) => {
                        return Err(Rejection::Malformed)
                    }
                    ErrorKind::InvalidAlgorithm => Rejection::NoMatchingKey,
                    _ => Rejection::VerificationFailed,
                }
            }
        }
    }
    Err(last)
}

/// What the providers bound to a workload say of a request: its verified tokens'
/// principal (None without a token), or why it is refused. Edits the request as the rules
/// say (token removed unless forwarded, payload and claims copied to headers).
pub async fn authenticate<B>(
    cache: &JwksCache,
    providers: &[Arc<JwtProvider>],
    req: &mut Request<B>,
) -> Result<Option<RequestAuth>, Rejection> {
    // A CORS preflight is answered without a token, as Envoy's filter lets it through.
    let preflight = req.method() == http::Method::OPTIONS
        && req.headers().contains_key(http::header::ORIGIN)
        && req
            .headers()
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        return Ok(None);
    }
    // Only a verified token may set these: whatever the caller sent under their names
    // goes (stricter than Envoy, which leaves them when no token comes).
    for p in providers {
        if let Some(h) = &p.payload_header {
            req.headers_mut().remove(h);
        }
        for (h, _) in &p.claim_headers {
            req.headers_mut().remove(h);
        }
    }
    let tokens = extract(req, providers);
    if tokens.is_empty() {
        return if providers.iter().any(|p| p.required) {
            Err(Rejection::Missing)
        } else {
            Ok(None)
        };
    }
    let mut verified: Option<RequestAuth> = None;
    let mut edits: Vec<(http::HeaderName, HeaderValue)> = Vec::new();
    let mut remove: Vec<http::HeaderName> = Vec::new();
    for (token, at, readers) in &tokens {
        let Some(unverified) = unverified_claims(token) else {
            return Err(Rejection::Malformed);
        };
        let iss = unverified.get("iss").and_then(|v| v.as_str()).unwrap_or("");
        let of_issuer: Vec<&&Arc<JwtProvider>> =
            readers.iter().filter(|p| p.issuer == iss).collect();
        if of_issuer.is_empty() {
            return Err(Rejection::UnknownIssuer);
        }
        let mut outcome = Err(Rejection::VerificationFailed);
        for p in &of_issuer {
            let keys = match &p.keys {
                KeySource::Inline(k) => Ok(k.clone()),
                KeySource::Uri { uri, timeout } => cache.keys(uri, *timeout).await,
            };
            outcome = keys.and_then(|k| verify(token, p, &k).map(|claims| (claims, **p)));
            if outcome.is_ok() {
                break;
            }
        }
        let (claims, provider) = outcome?;
        if let (Location::Header(name), false) = (at, provider.forward_original_token) {
            remove.push(name.clone());
        }
        if let Some(h) = &provider.payload_header {
            if let Some(payload) = token.split('.').nth(1) {
                if let Ok(v) = HeaderValue::from_str(payload) {
                    edits.push((h.clone(), v));
                }
            }
        }
        let auth = RequestAuth {
            principal: format!(
                "{}/{}",
                claims.get("iss").and_then(|v| v.as_str()).unwrap_or(""),
                claims.get("sub").and_then(|v| v.as_str()).unwrap_or("")
            ),
            audiences: match claims.get("aud") {
                Some(serde_json::Value::String(a)) => vec![a.clone()],
                Some(serde_json::Value::Array(l)) => l
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            },
            presenter: claims
                .get("azp")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            space_delimited: provider.space_delimited.clone(),
            claims,
        };
        for (header, path) in &provider.claim_headers {
            let values = auth.claim_values(path);
            if let Some(v) = values.first().and_then(|v| HeaderValue::from_str(v).ok()) {
                edits.push((header.clone(), v));
            }
        }
        verified.get_or_insert(auth);
    }
    for name in remove {
        req.headers_mut().remove(name);
    }
    for (name, value) in edits {
        req.headers_mut().insert(name, value);
    }
    Ok(verified)
}

#[cfg(test)]
#[path = "jwt_tests.rs"]
mod tests;
