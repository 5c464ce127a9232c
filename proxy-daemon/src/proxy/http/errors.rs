//! Failures the proxy answers itself: local responses, and upstream failures turned into
//! Envoy's status codes and response flags.
use super::*;

pub(super) fn local_response(status: u16, body: Bytes, location: Option<String>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    resp
}

/// Why an attempt upstream failed: each knows the status the client gets, Envoy's response
/// flag for it, and keeps its cause.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connect from the pod failed or timed out.
    #[error("upstream connect error: {0}")]
    Connect(#[source] ProxyError),
    /// Originating TLS failed (handshake, or the server's alert right after it).
    #[error("upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: TLS error: {reason} (upstream {upstream}, SNI {sni})")]
    Tls {
        reason: String,
        upstream: SocketAddr,
        sni: String,
    },
    /// The HTTP/1 or HTTP/2 client handshake on a new connection failed.
    #[error("upstream {protocol}handshake: {source}")]
    Handshake {
        /// "" for HTTP/1 (Envoy's wording), "h2 " for HTTP/2.
        protocol: &'static str,
        #[source]
        source: hyper::Error,
    },
    /// The connection was reset before the response headers.
    #[error("{what}: {source}")]
    Reset {
        what: &'static str,
        #[source]
        source: hyper::Error,
    },
    /// The route's timeout passed first.
    #[error("upstream request timeout")]
    Timeout,
}

impl UpstreamError {
    /// The status the client gets.
    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::Timeout => 504,
            _ => 503,
        }
    }

    /// An h2 upstream refused the stream (RST_STREAM REFUSED_STREAM: it did not process it,
    /// so a retry is safe).
    pub fn refused_stream(&self) -> bool {
        match self {
            UpstreamError::Reset { source, .. } => {
                let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source);
                while let Some(e) = cur {
                    if e.to_string().contains("refused stream") {
                        return true;
                    }
                    cur = e.source();
                }
                false
            }
            _ => false,
        }
    }

    /// Envoy's response flag: UF (connection failure), UC (reset), UT (timeout).
    pub fn flag(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_)
            | UpstreamError::Tls { .. }
            | UpstreamError::Handshake { .. } => "UF",
            UpstreamError::Reset { .. } => "UC",
            UpstreamError::Timeout => "UT",
        }
    }
}

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
    e: hyper::Error,
    tls: Option<&UpstreamTls>,
    upstream: SocketAddr,
    what: &'static str,
) -> UpstreamError {
    match (tls, tls_cause(&e)) {
        (Some(tls), Some(reason)) => {
            warn!(%upstream, sni = %tls.sni, mode = ?tls.settings.mode, %reason, "upstream TLS failed after the handshake");
            UpstreamError::Tls {
                reason,
                upstream,
                sni: tls.sni.clone(),
            }
        }
        _ => UpstreamError::Reset { what, source: e },
    }
}

#[cfg(test)]
mod tests {
    use super::UpstreamError;

    #[test]
    fn each_failure_knows_its_status_and_envoy_flag() {
        let tls = UpstreamError::Tls {
            reason: "UnknownIssuer".into(),
            upstream: "10.0.0.1:443".parse().unwrap(),
            sni: "api.example.com".into(),
        };
        assert_eq!((tls.status(), tls.flag()), (503, "UF"));
        assert!(tls.to_string().contains("SNI api.example.com"), "{tls}");
        let refused = UpstreamError::Connect(crate::proxy::ProxyError::ConnectTimeout(
            "10.0.0.1:80".parse().unwrap(),
        ));
        assert_eq!((refused.status(), refused.flag()), (503, "UF"));
        assert_eq!(
            (
                UpstreamError::Timeout.status(),
                UpstreamError::Timeout.flag()
            ),
            (504, "UT")
        );
    }
}
