//! HTTP/1 on a captured connection: hyper serves the client, each request is routed on
//! its own (Host, VirtualService rules, the real source pod), and forwarded on a pooled
//! upstream connection opened from the pod's network namespace.
use std::{
    borrow::Cow,
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::body::Body as _;
use hyper::{
    body::Incoming,
    client::conn::{http1 as client_http1, http2 as client_http2},
    server::conn::{http1 as server_http1, http2 as server_http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    connect_from_pod,
    http_route::{self, HttpDecision, RequestEdits, RequestView},
    report, route, OrigDstAddr, PodContext, ProxyError, ProxyInputs,
};
use crate::{
    metrics::DestinationLabels,
    proxy::tls::{UpstreamIo, UpstreamTls},
    state::routes::HeaderOps,
};

type Body = BoxBody<Bytes, hyper::Error>;
type Sender = client_http1::SendRequest<Body>;

/// Idle upstream connections per pod, upstream address and TLS setting (sockets live in
/// the pod netns): HTTP/1 connections one request at a time, HTTP/2 ones shared
/// (multiplexed).
pub struct UpstreamPool {
    /// Idle HTTP/1 senders with how many requests each has carried.
    idle: Mutex<HashMap<PoolKey, Vec<(Sender, u32)>>>,
    h2: Mutex<HashMap<PoolKey, client_http2::SendRequest<Body>>>,
    /// Idle HTTP/1 connections of all pods (`proxy_daemon_upstream_idle_connections`),
    /// shared by every pool.
    idle_gauge: prometheus_client::metrics::gauge::Gauge,
}

/// (address, TLS setting's pool key; 0 for plain connections).
type PoolKey = (SocketAddr, u64);

fn pool_key(upstream: SocketAddr, tls: Option<&UpstreamTls>) -> PoolKey {
    (upstream, tls.map(|t| t.pool_key).unwrap_or(0))
}

const MAX_IDLE_PER_UPSTREAM: usize = 32;

impl UpstreamPool {
    /// An empty pool counting its idle connections into `idle_gauge`.
    pub fn new(idle_gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self {
            idle: Default::default(),
            h2: Default::default(),
            idle_gauge,
        }
    }

    fn take(&self, addr: PoolKey) -> Option<(Sender, u32)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&addr)?;
        while let Some((s, uses)) = list.pop() {
            self.idle_gauge.dec();
            if !s.is_closed() && s.is_ready() {
                return Some((s, uses));
            }
        }
        None
    }

    fn put(&self, addr: PoolKey, s: Sender, uses: u32) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push((s, uses));
            self.idle_gauge.inc();
        }
    }
}

impl Drop for UpstreamPool {
    fn drop(&mut self) {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let n: usize = idle.values().map(Vec::len).sum();
        self.idle_gauge.dec_by(n as i64);
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): never forwarded, except for an Upgrade handshake.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn is_upgrade(headers: &http::HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

fn strip_hop_by_hop(headers: &mut http::HeaderMap, keep_upgrade: bool) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    for h in HOP_BY_HOP {
        if keep_upgrade && (h == "connection" || h == "upgrade") {
            continue;
        }
        headers.remove(h);
    }
    for h in named {
        if keep_upgrade && (h == "upgrade" || h == "connection") {
            continue;
        }
        headers.remove(h.as_str());
    }
}

fn apply_ops(headers: &mut http::HeaderMap, ops: &HeaderOps) {
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
    for (k, v) in &ops.set {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.append(k, v);
        }
    }
}

fn new_request_id() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

fn local_response(status: u16, body: String, location: Option<String>) -> Response<Body> {
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

fn rewrite(req: &mut Request<Body>, edits: &RequestEdits) {
    for ops in &edits.headers {
        apply_ops(req.headers_mut(), ops);
    }
    for (k, v) in &edits.add_headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            req.headers_mut().append(k, v);
        }
    }
    if let Some(authority) = edits
        .rewrite_authority
        .as_ref()
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        req.headers_mut().insert(header::HOST, authority);
    }
    if let Some((prefix, replacement)) = &edits.rewrite_uri {
        let path = req.uri().path();
        let new_path = match prefix {
            Some(p) if path.starts_with(p.as_str()) => format!("{replacement}{}", &path[p.len()..]),
            _ => replacement.clone(),
        };
        let pq = match req.uri().query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        if let Ok(uri) = pq.parse() {
            *req.uri_mut() = uri;
        }
    }
}

pub async fn serve(
    inputs: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    dst: OrigDstAddr,
) -> Result<(), ProxyError> {
    let service = service_fn(move |req| {
        let (inputs, pod) = (inputs.clone(), pod.clone());
        async move { Ok::<_, Infallible>(handle(&inputs, &pod, dst, req).await) }
    });
    if let Err(e) = server_http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
    {
        debug!(error = %e, "http connection ended");
    }
    Ok(())
}

/// HTTP/2 with prior knowledge (h2c, gRPC): the same per-request routing, forwarded over
/// HTTP/2 to the upstream.
pub async fn serve_h2(
    inputs: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    dst: OrigDstAddr,
) -> Result<(), ProxyError> {
    let service = service_fn(move |req| {
        let (inputs, pod) = (inputs.clone(), pod.clone());
        async move { Ok::<_, Infallible>(handle(&inputs, &pod, dst, req).await) }
    });
    if let Err(e) = server_http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(error = %e, "h2 connection ended");
    }
    Ok(())
}

/// Bodies up to this size are kept so a failed attempt can be retried; larger (or
/// unknown-length) bodies stream through with a single attempt, as in Envoy.
const RETRY_BUFFER_LIMIT: u64 = 64 * 1024;

fn retry_backoff(attempt: u32) -> Duration {
    // Envoy's default: 25 ms base, doubling, capped at ten times the base, jittered.
    let cap = 25u64.saturating_mul(1 << attempt.min(4)).min(250);
    Duration::from_millis(rand::random::<u64>() % cap + 1)
}

/// A copy of the request head, for another attempt.
fn clone_head(parts: &http::request::Parts) -> http::request::Builder {
    let mut b = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(h) = b.headers_mut() {
        *h = parts.headers.clone();
    }
    b
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// How one attempt ended.
struct Attempt {
    resp: Response<Body>,
    labels: DestinationLabels,
    /// The endpoint tried, if any (destination workload labels, access log).
    upstream: Option<SocketAddr>,
    flags: &'static str,
    /// The policy and what to judge it on (status, or the failure's flag).
    retry: Option<(http_route::Retry, Option<u16>)>,
}

async fn handle(
    inputs: &Arc<ProxyInputs>,
    pod: &Arc<PodContext>,
    dst: OrigDstAddr,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let start_time = std::time::SystemTime::now();
    if !req.headers().contains_key("x-request-id") {
        if let Ok(v) = HeaderValue::from_str(&new_request_id()) {
            req.headers_mut().insert("x-request-id", v);
        }
    }
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| dst.0.to_string());
    let decide = |head: &http::request::Parts| {
        let snap = inputs.config.load();
        let view = RequestView {
            method: head.method.as_str(),
            path: head.uri.path(),
            query: head.uri.query(),
            authority: &authority,
            headers: &head.headers,
            dst: dst.0,
        };
        http_route::decide(
            &snap,
            &inputs.endpoints,
            &pod.workload,
            &view,
            inputs.outbound_policy,
            inputs.endpoints.next_roll(),
        )
    };
    let client_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let request_head = report::head_bytes(
        &parts.headers,
        parts.method.as_str().len() + path.len() + 11,
    );
    let grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let body_count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Reports the request once its response is done (see report::metered).
    let finish = |dest: DestinationLabels,
                  upstream: Option<SocketAddr>,
                  flags: Cow<'static, str>,
                  code: u16| report::Finish {
        inputs: inputs.clone(),
        pod: pod.clone(),
        started,
        start_time,
        method: parts.method.clone(),
        authority: authority.clone(),
        path: path.clone(),
        protocol: match parts.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        request_id: parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        request_size: report::RequestSize::Counted {
            head: request_head,
            body: body_count.clone(),
        },
        grpc,
        dest,
        upstream,
        flags,
        code,
        log: true,
    };
    let mut decision = decide(&parts);
    if matches!(decision, HttpDecision::Respond { flags: "UH", .. })
        && inputs.endpoints.dns.has_pending()
    {
        // A DNS name the new configuration needs has no first answer yet: wait for it
        // (never longer than a connect would take), then decide again.
        inputs.endpoints.dns.settled(inputs.connect_timeout).await;
        decision = decide(&parts);
    }
    // The route's timeout covers every attempt.
    let deadline = match &decision {
        HttpDecision::Forward {
            timeout: Some(t), ..
        } => Some(started + *t),
        _ => None,
    };
    let retriable_body = client_upgrade.is_none()
        && body
            .size_hint()
            .upper()
            .is_some_and(|n| n <= RETRY_BUFFER_LIMIT);
    let (buffered, mut streaming) = if retriable_body {
        match body.collect().await {
            Ok(b) => {
                let b = b.to_bytes();
                body_count.store(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                (Some(b), None)
            }
            Err(e) => return local_response(400, format!("reading request body: {e}\n"), None),
        }
    } else {
        let counted = report::CountingBody {
            inner: body.boxed(),
            count: body_count.clone(),
        };
        (None, Some(counted.boxed()))
    };
    let mut attempt = 0u32;
    loop {
        let done = match decision {
            HttpDecision::Respond {
                status,
                body,
                location,
                labels,
                flags,
            } => Attempt {
                resp: local_response(status, body, location),
                labels,
                upstream: None,
                flags,
                retry: None,
            },
            HttpDecision::Forward {
                upstream,
                tls,
                labels,
                edits,
                response_headers,
                timeout: _,
                retry,
                fault,
                mirrors,
                route,
            } => {
                if attempt == 0 {
                    for (dest, percent) in &mirrors {
                        if rand::random::<f64>() * 100.0 < *percent {
                            // A kept body is copied; a streaming one is teed, bounded.
                            let body = match (&buffered, streaming.take()) {
                                (Some(b), _) => MirrorBody::Ready(b.clone()),
                                (None, Some(s)) => {
                                    let (tee, copy) = TeeBody::new(s, inputs.mirror_max_body_bytes);
                                    streaming = Some(tee.boxed());
                                    MirrorBody::Pending(copy)
                                }
                                (None, None) => MirrorBody::Ready(Bytes::new()),
                            };
                            send_mirror(inputs, pod, &parts, &authority, body, dest, &route);
                        }
                    }
                }
                if let Some(f) = &fault {
                    if let Some(d) = f
                        .delay
                        .filter(|_| rand::random::<f64>() * 100.0 < f.delay_percent)
                    {
                        tokio::time::sleep(d).await;
                    }
                    if let Some(code) = f
                        .abort_status
                        .filter(|_| rand::random::<f64>() * 100.0 < f.abort_percent)
                    {
                        let resp = local_response(code as u16, "fault filter abort\n".into(), None);
                        return report::metered(
                            resp,
                            finish(labels, None, Cow::Borrowed("FI"), code as u16),
                        );
                    }
                }
                let body = match (&buffered, streaming.take()) {
                    (Some(b), _) => Full::new(b.clone()).map_err(|never| match never {}).boxed(),
                    (None, Some(s)) => s,
                    (None, None) => empty(),
                };
                let mut out = match clone_head(&parts).body(body) {
                    Ok(r) => r,
                    Err(e) => return local_response(400, format!("bad request: {e}\n"), None),
                };
                rewrite(&mut out, &edits);
                let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                let per_try = match (retry.per_try_timeout, remaining) {
                    (Some(t), Some(r)) => Some(t.min(r)),
                    (t, r) => t.or(r),
                };
                // Circuit breaking on the destination's connectionPool, then count the
                // attempt on its endpoint (LEAST_REQUEST) until the response headers arrive.
                let pool = {
                    let snap = inputs.config.load();
                    snap.routes
                        .destination_rule(&labels.service, &pod.workload.namespace)
                        .and_then(|dr| {
                            dr.effective(Some(dst.0.port() as u32), None)
                                .connection_pool
                        })
                };
                let Ok(permit) = inputs
                    .endpoints
                    .host_limits
                    .admit(&labels.service, pool.as_ref(), true)
                    .await
                else {
                    let resp = local_response(503, "upstream connect error or disconnect/reset before headers. reset reason: overflow\n".into(), None);
                    return report::metered(resp, finish(labels, None, Cow::Borrowed("UO"), 503));
                };
                let load = inputs.endpoints.in_flight.start(upstream);
                let max_per_conn = pool.as_ref().and_then(|p| p.max_requests_per_connection);
                let result = forward(
                    inputs,
                    pod,
                    upstream,
                    tls.as_deref(),
                    out,
                    per_try,
                    max_per_conn,
                )
                .await;
                inputs
                    .endpoints
                    .health
                    .record(upstream, result.as_ref().ok().map(|r| r.status().as_u16()));
                match result {
                    Ok(resp) => {
                        // The request counts against the pool and its endpoint until the
                        // response body has been sent, not just its headers.
                        let mut resp = resp.map(|b| {
                            Guarded {
                                inner: b,
                                _guards: (permit, load),
                            }
                            .boxed()
                        });
                        for ops in &response_headers {
                            apply_ops(resp.headers_mut(), ops);
                        }
                        let status = resp.status().as_u16();
                        Attempt {
                            resp,
                            labels,
                            upstream: Some(upstream),
                            flags: "",
                            retry: Some((retry, Some(status))),
                        }
                    }
                    Err((status, flags, message)) => {
                        debug!(%upstream, flags, message, "upstream attempt failed");
                        let expired = deadline.is_some_and(|d| Instant::now() >= d);
                        let (status, flags) = if expired {
                            (504, "UT")
                        } else {
                            (status, flags)
                        };
                        Attempt {
                            resp: local_response(status, format!("{message}\n"), None),
                            labels,
                            upstream: Some(upstream),
                            flags,
                            retry: Some((retry, None)),
                        }
                    }
                }
            }
        };
        let again = match &done.retry {
            Some((policy, status)) => {
                attempt < policy.attempts
                    && buffered.is_some()
                    && deadline.is_none_or(|d| Instant::now() < d)
                    && policy.should_retry(*status, done.flags)
            }
            None => false,
        };
        if !again {
            let code = done.resp.status().as_u16();
            // Envoy's URX: retries exhausted on a failing upstream (with the last
            // attempt's own flag, as Envoy lists them: "UF,URX").
            let flags = match (done.flags, attempt > 0 && code >= 500) {
                ("", true) => Cow::Borrowed("URX"),
                (f, true) => Cow::Owned(format!("{f},URX")),
                (f, false) => Cow::Borrowed(f),
            };
            let resp = report::metered(done.resp, finish(done.labels, done.upstream, flags, code));
            return match client_upgrade {
                Some(cu) => finish_upgrade(resp, cu),
                None => resp,
            };
        }
        attempt += 1;
        tokio::time::sleep(retry_backoff(attempt)).await;
        decision = decide(&parts);
    }
}

/// Completes an Upgrade: once both sides switched protocols, copy bytes between them.
fn finish_upgrade(
    mut resp: Response<Body>,
    client_upgrade: hyper::upgrade::OnUpgrade,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(server_upgrade) = resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() {
            tokio::spawn(async move {
                if let (Ok(c), Ok(s)) = tokio::join!(client_upgrade, server_upgrade) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(s))
                            .await;
                }
            });
        }
    }
    resp
}

/// A new upstream HTTP/1 connection from the pod's netns.
/// The TLS error behind an upstream failure, if the connection was ours to TLS: with TLS 1.3
/// a server that refuses the client's certificate says so only after the handshake, in an
/// alert that surfaces as the first request's I/O error.
fn tls_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
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
fn upstream_failure(
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

/// Connects from the pod to `upstream`, originating TLS when the destination's policy says
/// so (offering `alpn`). A failed handshake is a connect failure (UF) with its reason.
async fn open_upstream(
    inputs: &ProxyInputs,
    pod: &PodContext,
    upstream: SocketAddr,
    tls: Option<&UpstreamTls>,
    alpn: &'static [u8],
) -> Result<UpstreamIo, (u16, &'static str, String)> {
    let stream = connect_from_pod(pod, upstream, inputs.connect_timeout)
        .await
        .map_err(|e| (503u16, "UF", format!("upstream connect error: {e}")))?;
    let Some(tls) = tls else {
        return Ok(UpstreamIo::Plain(stream));
    };
    let handshakes = &inputs.metrics.daemon.upstream_tls_handshakes;
    let result = tokio::time::timeout(
        inputs.connect_timeout,
        inputs
            .tls
            .connect(tls, alpn, stream, &pod.workload.namespace),
    )
    .await
    .unwrap_or_else(|_| Err("handshake timed out".into()));
    match result {
        Ok((io, kind)) => {
            let result = match kind {
                crate::proxy::tls::Handshake::Full => "full",
                crate::proxy::tls::Handshake::Resumed => "resumed",
            };
            handshakes
                .get_or_create(&crate::metrics::TlsHandshakeLabels { result })
                .inc();
            Ok(io)
        }
        Err(reason) => {
            handshakes
                .get_or_create(&crate::metrics::TlsHandshakeLabels { result: "failed" })
                .inc();
            warn!(%upstream, sni = %tls.sni, mode = ?tls.settings.mode, %reason, "upstream TLS handshake failed");
            Err((
                503,
                "UF",
                format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: TLS error: {reason} (upstream {upstream}, SNI {})",
                    tls.sni
                ),
            ))
        }
    }
}

async fn connect_upstream(
    inputs: &ProxyInputs,
    pod: &PodContext,
    upstream: SocketAddr,
    tls: Option<&UpstreamTls>,
) -> Result<Sender, (u16, &'static str, String)> {
    let stream = open_upstream(inputs, pod, upstream, tls, b"http/1.1").await?;
    let (sender, conn) = client_http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| (503u16, "UF", format!("upstream handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// Mirror copies in flight on this node at most; beyond, copies are dropped and counted.
pub const MIRROR_CONCURRENCY: usize = 256;
/// A mirror copy that has not answered by then is abandoned (and counted as failed).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// Fire and forget: a copy of the request (same method, path, headers and x-request-id,
/// Host with Istio's `-shadow` suffix) to the mirror destination. Nothing here waits on,
/// or can fail, the primary request.
fn send_mirror(
    inputs: &Arc<ProxyInputs>,
    pod: &Arc<PodContext>,
    head: &http::request::Parts,
    authority: &str,
    body: MirrorBody,
    dest: &crate::state::routes::DestinationRef,
    route: &str,
) {
    let m = &inputs.metrics.daemon;
    let dropped = |reason: &'static str| {
        m.mirror_dropped
            .get_or_create(&crate::metrics::MirrorDropLabels {
                route: route.to_string(),
                reason,
            })
            .inc();
    };
    let Ok(slot) = inputs.mirror_slots.clone().try_acquire_owned() else {
        return dropped("concurrency");
    };
    let (upstream, labels, tls) = {
        let snap = inputs.config.load();
        let Some(target) = snap.registry.by_host(&dest.host) else {
            return dropped("no_destination");
        };
        let port = dest
            .port
            .unwrap_or_else(|| target.ports.first().map(|p| p.port).unwrap_or(80));
        match route::endpoint_for(
            &snap,
            &inputs.endpoints,
            target,
            dest.subset.as_deref(),
            port,
            &pod.workload.namespace,
            None,
        ) {
            Ok(ep) => (
                ep,
                route::labels_for(target),
                route::upstream_tls(
                    &snap,
                    target,
                    dest.subset.as_deref(),
                    port,
                    &pod.workload.namespace,
                ),
            ),
            Err(_) => return dropped("no_endpoint"),
        }
    };
    let shadow = format!("{authority}-shadow");
    let shadow_authority = shadow.clone();
    let mut req = match clone_head(head).body(empty()) {
        Ok(r) => r,
        Err(_) => return dropped("bad_request"),
    };
    if let Ok(v) = HeaderValue::from_str(&shadow) {
        req.headers_mut().insert(header::HOST, v);
    }
    if req.uri().authority().is_some() {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let scheme = req.uri().scheme_str().unwrap_or("http").to_string();
        if let Ok(uri) = format!("{scheme}://{shadow}{pq}").parse() {
            *req.uri_mut() = uri;
        }
    }
    let (inputs, pod, route) = (inputs.clone(), pod.clone(), route.to_string());
    tokio::spawn(async move {
        let _slot = slot;
        // A streaming body's copy is complete when the primary's body has passed.
        let bytes = match body {
            MirrorBody::Ready(b) => Some(b),
            MirrorBody::Pending(rx) => tokio::time::timeout(MIRROR_TIMEOUT, rx)
                .await
                .ok()
                .and_then(Result::ok)
                .flatten(),
        };
        debug!(route = %route, copied = bytes.as_ref().map(|b| b.len()), "mirror body ready");
        let Some(bytes) = bytes else {
            inputs
                .metrics
                .daemon
                .mirror_dropped
                .get_or_create(&crate::metrics::MirrorDropLabels {
                    route,
                    reason: "body_too_large",
                })
                .inc();
            return;
        };
        let request_size = report::RequestSize::Known(
            report::head_bytes(req.headers(), req.method().as_str().len() + 11)
                + bytes.len() as u64,
        );
        let finish = report::Finish {
            inputs: inputs.clone(),
            pod: pod.clone(),
            started: Instant::now(),
            start_time: std::time::SystemTime::now(),
            method: req.method().clone(),
            authority: shadow_authority,
            path: req.uri().path().to_string(),
            protocol: "HTTP/1.1",
            request_id: None,
            request_size,
            grpc: false,
            dest: labels,
            upstream: Some(upstream),
            flags: Cow::Borrowed(""),
            code: 0,
            log: false,
        };
        *req.body_mut() = Full::new(bytes).map_err(|never| match never {}).boxed();
        let result = forward(
            &inputs,
            &pod,
            upstream,
            tls.as_deref(),
            req,
            Some(MIRROR_TIMEOUT),
            None,
        )
        .await;
        let (code, outcome, flags) = match &result {
            Ok(resp) => (
                resp.status().as_u16(),
                if resp.status().is_server_error() {
                    "failed"
                } else {
                    "sent"
                },
                "",
            ),
            Err((status, flags, _)) => (*status, "failed", *flags),
        };
        // Drain the response so the pooled connection can be reused.
        let mut response_bytes = 0;
        if let Ok(resp) = result {
            response_bytes = report::head_bytes(resp.headers(), 17);
            if let Ok(b) = resp.into_body().collect().await {
                response_bytes += b.to_bytes().len() as u64;
            }
        }
        inputs
            .metrics
            .daemon
            .mirror_requests
            .get_or_create(&crate::metrics::MirrorLabels {
                route,
                result: outcome,
            })
            .inc();
        // The copy is metered under the mirror destination (never logged).
        report::Finish {
            code,
            flags: Cow::Borrowed(flags),
            ..finish
        }
        .done(response_bytes, None, false);
    });
}

/// The body a mirror copy will carry.
enum MirrorBody {
    Ready(Bytes),
    /// Filled in when the primary's streaming body ends; None if it outgrew the bound.
    Pending(tokio::sync::oneshot::Receiver<Option<Bytes>>),
}

/// Passes a streaming request body through to the primary untouched while keeping a copy
/// for the mirror, up to `limit` bytes; past it the copy is abandoned (the primary never is).
struct TeeBody {
    inner: Body,
    copy: Option<bytes::BytesMut>,
    limit: usize,
    done: Option<tokio::sync::oneshot::Sender<Option<Bytes>>>,
}

impl TeeBody {
    fn new(inner: Body, limit: usize) -> (Self, tokio::sync::oneshot::Receiver<Option<Bytes>>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tee = Self {
            inner,
            copy: Some(bytes::BytesMut::new()),
            limit,
            done: Some(tx),
        };
        (tee, rx)
    }

    fn finish(&mut self, complete: bool) {
        if let Some(tx) = self.done.take() {
            let copy = self
                .copy
                .take()
                .filter(|_| complete)
                .map(bytes::BytesMut::freeze);
            let _ = tx.send(copy);
        }
    }
}

impl hyper::body::Body for TeeBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let over = self
                        .copy
                        .as_ref()
                        .is_some_and(|c| c.len() + data.len() > self.limit);
                    if over {
                        self.finish(false);
                    } else if let Some(c) = self.copy.as_mut() {
                        c.extend_from_slice(data);
                    }
                }
                // hyper may stop polling once the body says it is done.
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            std::task::Poll::Ready(None) => self.finish(true),
            std::task::Poll::Ready(Some(Err(_))) => self.finish(false),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        // Dropped before its end (client gone, upstream failed): no complete copy.
        self.finish(false);
    }
}

/// A response body that holds the request's accounting guards until it is done.
struct Guarded {
    inner: Body,
    _guards: (
        Option<tokio::sync::OwnedSemaphorePermit>,
        super::limits::EndpointLoad,
    ),
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Sends an HTTP/2 request on the pod's shared connection to `upstream` (made on first use).
async fn forward_h2(
    inputs: &ProxyInputs,
    pod: &PodContext,
    upstream: SocketAddr,
    tls: Option<&UpstreamTls>,
    req: Request<Body>,
    timeout: Option<Duration>,
) -> Result<Response<Body>, (u16, &'static str, String)> {
    let key = pool_key(upstream, tls);
    let existing = {
        let h2 = pod.http_pool.h2.lock().unwrap_or_else(|p| p.into_inner());
        h2.get(&key).filter(|s| !s.is_closed()).cloned()
    };
    let mut sender = match existing {
        Some(s) => s,
        None => {
            let stream = open_upstream(inputs, pod, upstream, tls, b"h2").await?;
            let (sender, conn) =
                client_http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .map_err(|e| (503u16, "UF", format!("upstream h2 handshake: {e}")))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            pod.http_pool
                .h2
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, sender.clone());
            sender
        }
    };
    let send = async {
        sender
            .ready()
            .await
            .map_err(|e| upstream_failure(&e, tls, upstream, "upstream h2"))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| upstream_failure(&e, tls, upstream, "upstream reset"))
    };
    let resp = match timeout {
        Some(t) => tokio::time::timeout(t, send)
            .await
            .map_err(|_| (504u16, "UT", "upstream request timeout".to_string()))??,
        None => send.await?,
    };
    Ok(resp.map(|b| b.boxed()))
}

/// Sends one attempt upstream; Err is (status, Envoy flag, message) for the client.
/// For an Upgrade, the upstream's OnUpgrade is left in the response's extensions.
async fn forward(
    inputs: &ProxyInputs,
    pod: &PodContext,
    upstream: SocketAddr,
    tls: Option<&UpstreamTls>,
    mut req: Request<Body>,
    timeout: Option<Duration>,
    max_requests_per_connection: Option<u32>,
) -> Result<Response<Body>, (u16, &'static str, String)> {
    let max_uses = max_requests_per_connection
        .filter(|n| *n > 0)
        .unwrap_or(u32::MAX);
    let upgrade = is_upgrade(req.headers());
    strip_hop_by_hop(req.headers_mut(), upgrade);
    if req.version() == http::Version::HTTP_2 {
        return forward_h2(inputs, pod, upstream, tls, req, timeout).await;
    }
    let key = pool_key(upstream, tls);
    // A pooled connection the server closed meanwhile hands the request back unsent.
    let pooled = if upgrade {
        None
    } else {
        pod.http_pool.take(key)
    };
    let send = async {
        let (mut sender, mut uses) = match pooled {
            Some((s, uses)) => (s, uses),
            None => (connect_upstream(inputs, pod, upstream, tls).await?, 0),
        };
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    sender = connect_upstream(inputs, pod, upstream, tls).await?;
                    uses = 0;
                    sender
                        .send_request(req)
                        .await
                        .map_err(|e| upstream_failure(&e, tls, upstream, "upstream reset"))?
                }
                None => {
                    return Err(upstream_failure(
                        e.error(),
                        tls,
                        upstream,
                        "upstream reset before headers",
                    ))
                }
            },
        };
        Ok((sender, uses + 1, resp))
    };
    let (sender, uses, mut resp) = match timeout {
        Some(t) => tokio::time::timeout(t, send)
            .await
            .map_err(|_| (504u16, "UT", "upstream request timeout".to_string()))??,
        None => send.await?,
    };
    if upgrade {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let on = hyper::upgrade::on(&mut resp);
            resp.extensions_mut().insert(on);
        }
    } else if uses < max_uses {
        // connectionPool.http.maxRequestsPerConnection: a used-up connection is not reused.
        pod.http_pool.put(key, sender, uses);
    }
    Ok(resp.map(|b| b.boxed()))
}
