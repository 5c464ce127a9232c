//! Failures the proxy answers itself: local responses, and upstream failures turned into
//! Envoy's status codes and response flags.
use super::*;

pub(super) fn local_response(
    status: u16,
    body: String,
    location: Option<String>,
) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    resp
}

/// A new upstream HTTP/1 connection from the pod's netns.
/// The TLS error behind an upstream failure, if the connection was ours to TLS: with TLS 1.3
/// a server that refuses the client's certificate says so only after the handshake, in an
/// alert that surfaces as the first request's I/O error.
pub(super) fn tls_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        if let Some(t) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(t.to_string());
        }
        cur = err.source();
    }
    None
}

/// Envoy's view of a request that failed upstream: a TLS failure is a connection failure
/// (UF, logged with host, SNI and reason); anything else a reset before headers (UC).
pub(super) fn upstream_failure(
    e: &hyper::Error,
    tls: Option<&UpstreamTls>,
    upstream: SocketAddr,
    what: &str,
) -> (u16, &'static str, String) {
    match (tls, tls_cause(e)) {
        (Some(tls), Some(reason)) => {
            warn!(%upstream, sni = %tls.sni, mode = ?tls.settings.mode, %reason, "upstream TLS failed after the handshake");
            (
                503,
                "UF",
                format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: TLS error: {reason} (upstream {upstream}, SNI {})",
                    tls.sni
                ),
            )
        }
        _ => (503, "UC", format!("{what}: {e}")),
    }
}
