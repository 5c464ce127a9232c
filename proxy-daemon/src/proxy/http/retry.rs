//! Retries: Istio's default policy when a route sets none, bounded body buffering, backoff.
use super::*;

/// Bodies up to this size are kept so a failed attempt can be retried; larger (or
/// unknown-length) bodies stream through with a single attempt, as in Envoy.
pub(super) const RETRY_BUFFER_LIMIT: u64 = 64 * 1024;

pub(super) fn retry_backoff(attempt: u32) -> Duration {
    // Envoy's default: 25 ms base, doubling, capped at ten times the base, jittered.
    let cap = 25u64.saturating_mul(1 << attempt.min(4)).min(250);
    Duration::from_millis(rand::random::<u64>() % cap + 1)
}

/// A copy of the request head, for another attempt.
pub(super) fn clone_head(parts: &http::request::Parts) -> http::request::Builder {
    let mut b = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(h) = b.headers_mut() {
        *h = parts.headers.clone();
    }
    b
}

/// How one attempt ended.
pub(super) struct Attempt {
    pub(super) resp: Response<Body>,
    pub(super) labels: DestinationLabels,
    /// The endpoint tried, if any (destination workload labels, access log).
    pub(super) upstream: Option<SocketAddr>,
    pub(super) flags: &'static str,
    /// The policy and what to judge it on (status, or the failure's flag).
    pub(super) retry: Option<(http_route::Retry, http_route::AttemptOutcome)>,
    /// The destination's `connectionPool.http.maxRetries`: retries in flight to it at once.
    pub(super) max_retries: Option<u32>,
}
