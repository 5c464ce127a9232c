//! AuthorizationPolicy CUSTOM: asks an HTTP external authorizer (Istio's
//! `envoyExtAuthzHttp` provider) about a request, as Envoy's `ext_authz` filter does: the
//! request's method and path (under `pathPrefix`) with the headers the provider names; a
//! 2xx answer allows (copying `headersToUpstreamOnAllow` onto the request), any other is
//! the caller's answer (with `headersToDownstreamOnDeny`); an authorizer that fails or is
//! late allows with `failOpen`, else answers `statusOnError` (403).
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;

use crate::{config::mesh::ExtAuthzHttp, state::Snapshot};

/// Istio's default timeout of an external authorization check.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest denial body passed back to the caller.
const MAX_DENIAL_BODY: usize = 64 * 1024;

/// What the authorizer said.
#[derive(Debug)]
pub enum Verdict {
    Allow {
        /// Headers to set on the request before it goes to the app.
        upstream: Vec<(HeaderName, HeaderValue)>,
    },
    Deny {
        status: StatusCode,
        body: Bytes,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
}

/// Istio's header patterns: exact (any case), `prefix*`, `*suffix`.
fn header_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.to_ascii_lowercase(), name.to_ascii_lowercase());
    if let Some(prefix) = p.strip_suffix('*') {
        n.starts_with(prefix)
    } else if let Some(suffix) = p.strip_prefix('*') {
        n.ends_with(suffix)
    } else {
        p == n
    }
}

fn matching(headers: &http::HeaderMap, patterns: &[String]) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(name, _)| patterns.iter().any(|p| header_matches(p, name.as_str())))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

/// The authorizer's address: an address as given, a Service's cluster IP (the node
/// reaches it, kube-proxy or not, as it reaches the API server), else the name resolved.
async fn address(provider: &ExtAuthzHttp, snap: &Snapshot) -> Result<std::net::SocketAddr, String> {
    let host = provider.service.rsplit('/').next().unwrap_or_default();
    let port = u16::try_from(provider.port).map_err(|_| "port out of range".to_string())?;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok((ip, port).into());
    }
    let vip = snap
        .registry
        .services
        .get(host)
        .into_iter()
        .flatten()
        .flat_map(|s| s.addresses.iter())
        .find_map(|a| a.parse::<std::net::IpAddr>().ok());
    if let Some(ip) = vip {
        return Ok((ip, port).into());
    }
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} has no address"))
}

/// Asks `provider` about `req` (its head; the body is not sent).
pub async fn check<B>(provider: &ExtAuthzHttp, snap: &Snapshot, req: &Request<B>) -> Verdict {
    let timeout = provider
        .timeout
        .as_deref()
        .and_then(|t| crate::config::duration::parse(t).ok())
        .unwrap_or(DEFAULT_TIMEOUT);
    match tokio::time::timeout(timeout, ask(provider, snap, req)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => on_error(provider, &e),
        Err(_) => on_error(provider, "timed out"),
    }
}

fn on_error(provider: &ExtAuthzHttp, error: &str) -> Verdict {
    tracing::debug!(service = %provider.service, %error, "external authorizer failed");
    if provider.fail_open {
        return Verdict::Allow {
            upstream: Vec::new(),
        };
    }
    let status = provider
        .status_on_error
        .as_deref()
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::FORBIDDEN);
    Verdict::Deny {
        status,
        body: Bytes::new(),
        headers: Vec::new(),
    }
}

async fn ask<B>(
    provider: &ExtAuthzHttp,
    snap: &Snapshot,
    req: &Request<B>,
) -> Result<Verdict, String> {
    let addr = address(provider, snap).await?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let prefix = provider.path_prefix.as_deref().unwrap_or("");
    let mut check = Request::builder()
        .method(req.method())
        .uri(format!("{prefix}{path}"));
    // The request's authority, then the headers the provider asks for (Envoy's defaults
    // without a list: Authorization, and the request's own Host).
    let host = req
        .headers()
        .get(http::header::HOST)
        .cloned()
        .or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        })
        .unwrap_or_else(|| HeaderValue::from_static("localhost"));
    check = check.header(http::header::HOST, host);
    let patterns: Vec<String> = if !provider.include_request_headers_in_check.is_empty() {
        provider.include_request_headers_in_check.clone()
    } else if !provider.include_headers_in_check.is_empty() {
        provider.include_headers_in_check.clone()
    } else {
        vec!["authorization".into()]
    };
    for (name, value) in matching(req.headers(), &patterns) {
        if name != http::header::HOST {
            check = check.header(name, value);
        }
    }
    for (name, value) in &provider.include_additional_headers_in_check {
        check = check.header(name.as_str(), value.as_str());
    }
    let check = check
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(check)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    if parts.status.is_success() {
        return Ok(Verdict::Allow {
            upstream: matching(&parts.headers, &provider.headers_to_upstream_on_allow),
        });
    }
    let body = Limited::new(body, MAX_DENIAL_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok(Verdict::Deny {
        status: parts.status,
        body,
        headers: matching(&parts.headers, &provider.headers_to_downstream_on_deny),
    })
}

#[cfg(test)]
mod tests {
    use super::header_matches;

    #[test]
    fn header_patterns_are_istios() {
        assert!(header_matches("x-custom-id", "X-Custom-Id"));
        assert!(header_matches("x-prefix-*", "x-prefix-a"));
        assert!(header_matches("*-suffix", "a-suffix"));
        assert!(!header_matches("x-prefix-*", "x-other"));
        assert!(!header_matches("x-custom-id", "x-custom-idx"));
    }
}
