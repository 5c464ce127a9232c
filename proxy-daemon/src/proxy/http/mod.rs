//! HTTP/1 on a captured connection: hyper serves the client, each request is routed on
//! its own (Host, VirtualService rules, the real source pod), and forwarded on a pooled
//! upstream connection opened from the pod's network namespace.
mod errors;
mod headers;
mod mirror;
mod pool;
mod retry;

use errors::*;
pub(crate) use headers::is_upgrade;
use headers::*;
pub use mirror::MIRROR_CONCURRENCY;
use mirror::*;
use pool::*;
pub use pool::{IdleBudget, UpstreamPool};
use retry::*;

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

/// Request headers accepted per request at most (hyper's default, said out loud).
const MAX_REQUEST_HEADERS: usize = 100;
/// Request head size at most (request line and headers).
const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;
/// h2: streams one client connection may have open at once, and the size of a header list.
const H2_MAX_CONCURRENT_STREAMS: u32 = 1024;
/// h2 rapid reset (CVE-2023-44487): streams a client may open and reset before the
/// server accepts them; beyond, the connection is closed with GOAWAY.
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;

pub async fn serve(
    inputs: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    dst: OrigDstAddr,
) -> Result<(), ProxyError> {
    let header_read_timeout = inputs.settings.header_read_timeout;
    let inputs_draining = inputs.draining.clone();
    let requests = RequestSeen::new();
    let seen = requests.clone();
    let service = service_fn(move |req| {
        let (inputs, pod) = (inputs.clone(), pod.clone());
        seen.arrived();
        let connect = req.method() == hyper::Method::CONNECT;
        async move {
            let mut resp = handle(&inputs, &pod, dst, req).await;
            // During a drain every answer says the connection closes: hyper then closes
            // it after this response, however quickly the request was served. (Not an
            // upgrade's or a tunnel's: the connection carries that stream until it ends.)
            let upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (connect && resp.status().is_success());
            if !upgrade && *inputs.draining.borrow() {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = server_http1::Builder::new();
    // A request head must come whole and in time: at most 100 headers and 64 KiB (Envoy's
    // default 60 KiB; beyond, 431), within --http-header-read-timeout-ms (slowloris).
    builder
        // A client that shuts its write side after the request still gets the response.
        .half_close(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_headers(MAX_REQUEST_HEADERS)
        .max_header_size(MAX_REQUEST_HEAD_BYTES);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut draining = inputs_draining;
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        _ = wait_true(&mut draining) => {
            match requests.wait_while_serving(conn.as_mut()).await {
                Some(ended) => ended,
                None => {
                    // Finish the request in flight (its response says Connection: close),
                    // then close; a connection quiet for the whole grace closes now.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = ended {
        debug!(error = %e, "http connection ended");
    }
    Ok(())
}

/// How long a drain waits for a connection's next request before closing it.
///
/// Closing an HTTP/1 connection between requests races the client's next request, which
/// then fails unanswered: clients resend only on a reused connection, never the first
/// request of a fresh one (and hyper's graceful shutdown closes a connection whose request
/// head is not read yet, however fresh). So a drain answers each connection's next request,
/// with `Connection: close`, and closes only those that stay quiet this long.
pub(super) const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Counts a connection's requests as they reach the service, so a drain can wait for the
/// next one.
#[derive(Clone)]
pub(super) struct RequestSeen(Arc<(std::sync::atomic::AtomicU64, tokio::sync::Notify)>);

impl RequestSeen {
    pub(super) fn new() -> Self {
        Self(Arc::new((
            std::sync::atomic::AtomicU64::new(0),
            tokio::sync::Notify::new(),
        )))
    }

    pub(super) fn arrived(&self) {
        self.0 .0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.0 .1.notify_one();
    }

    /// Keeps serving `conn` until its next request has reached the service (it is then in
    /// flight, and a graceful shutdown lets it finish), or the grace is over; or the
    /// connection ends by itself meanwhile: then its result.
    pub(super) async fn wait_while_serving<F: std::future::Future + Unpin>(
        &self,
        mut conn: F,
    ) -> Option<F::Output> {
        let (count, notify) = (&self.0 .0, &self.0 .1);
        let at_drain = count.load(std::sync::atomic::Ordering::Acquire);
        let grace = tokio::time::sleep(FIRST_REQUEST_GRACE);
        tokio::pin!(grace);
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if count.load(std::sync::atomic::Ordering::Acquire) != at_drain {
                return None;
            }
            tokio::select! {
                r = &mut conn => return Some(r),
                // (A permit stored by an earlier request wakes this once: look again.)
                _ = notified => {}
                _ = &mut grace => return None,
            }
        }
    }
}

/// HTTP/2 with prior knowledge (h2c, gRPC): the same per-request routing, forwarded over
/// HTTP/2 to the upstream.
pub async fn serve_h2(
    inputs: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    dst: OrigDstAddr,
) -> Result<(), ProxyError> {
    let inputs_draining = inputs.draining.clone();
    let requests = RequestSeen::new();
    let seen = requests.clone();
    let service = service_fn(move |req| {
        let (inputs, pod) = (inputs.clone(), pod.clone());
        seen.arrived();
        async move { Ok::<_, Infallible>(handle(&inputs, &pod, dst, req).await) }
    });
    let mut draining = inputs_draining;
    let conn = server_http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_REQUEST_HEAD_BYTES as u32)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        _ = wait_true(&mut draining) => {
            match requests.wait_while_serving(conn.as_mut()).await {
                Some(ended) => ended,
                None => {
                    // GOAWAY: streams in flight finish, no new ones.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = ended {
        debug!(error = %e, "h2 connection ended");
    }
    Ok(())
}

/// Resolves `grace` after a drain started.
pub(super) async fn drained_for(flag: &mut tokio::sync::watch::Receiver<bool>, grace: Duration) {
    wait_true(flag).await;
    tokio::time::sleep(grace).await;
}

/// Resolves once the flag is true (never, if its sender is gone while false).
pub(super) async fn wait_true(flag: &mut tokio::sync::watch::Receiver<bool>) {
    if flag.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
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
    // Trace context: read (or started) and decided once per request; every attempt and
    // the mirror copies carry it upstream.
    let namespace_sampling = inputs
        .config
        .load()
        .namespaces
        .get(&pod.workload.namespace)
        .and_then(|n| n.trace_sampling);
    let trace = inputs.tracer.begin(req.headers(), namespace_sampling);
    let user_agent = trace
        .sampled()
        .then(|| req.headers().get(header::USER_AGENT))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut events: Vec<crate::spans::SpanEvent> = Vec::new();
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| dst.0.to_string());
    // One roll per request: a retry decides again (the configuration may have changed)
    // but lands on the same weighted destination, as Envoy's retries stay in their cluster.
    let roll = super::weighted_roll();
    let decide = |head: &http::request::Parts, avoid: &[SocketAddr]| {
        let snap = inputs.config.load();
        let view = RequestView {
            method: head.method.as_str(),
            path: head.uri.path(),
            query: head.uri.query(),
            authority: &authority,
            headers: &head.headers,
            dst: dst.0,
            avoid,
            scope: &pod.source_labels,
        };
        http_route::decide(
            &snap,
            &inputs.endpoints,
            &pod.workload,
            &view,
            inputs.settings.outbound_policy,
            roll,
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
                  code: u16,
                  events: &[crate::spans::SpanEvent]| report::Finish {
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
        span: trace.sampled().then(|| report::SpanDraft {
            trace: trace.clone(),
            port: dst.0.port(),
            user_agent: user_agent.clone(),
            events: events.to_vec(),
            links: Vec::new(),
            mirror: false,
        }),
    };
    // Endpoints this request's attempts went to (a retry prefers another).
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut decision = decide(&parts, &tried);
    if matches!(decision, HttpDecision::Respond { flags: "UH", .. })
        && inputs.endpoints.dns.has_pending()
    {
        // A DNS name the new configuration needs has no first answer yet: wait for it
        // (never longer than a connect would take), then decide again.
        inputs
            .endpoints
            .dns
            .settled(inputs.settings.connect_timeout)
            .await;
        decision = decide(&parts, &tried);
    }
    // The route's timeout covers every attempt; 0 disables it (Envoy's rule, which an
    // EnvoyFilter's `timeout: 0s` can ask for over a VirtualService's timeout).
    let deadline = match &decision {
        HttpDecision::Forward {
            timeout: Some(t), ..
        } if !t.is_zero() => Some(started + *t),
        _ => None,
    };
    let retriable_body = client_upgrade.is_none()
        && body
            .size_hint()
            .upper()
            .is_some_and(|n| n <= RETRY_BUFFER_LIMIT);
    // Held until the request ends: the namespace's buffered bodies stay within its share;
    // past it the body streams through (and the request is not retried).
    let _body_room = retriable_body
        .then(|| {
            let bytes = body.size_hint().upper().unwrap_or(RETRY_BUFFER_LIMIT);
            inputs.bodies.reserve(&pod.workload.namespace, bytes)
        })
        .flatten();
    let retriable_body = retriable_body && _body_room.is_some();
    let (buffered, mut streaming) = if retriable_body {
        match body.collect().await {
            Ok(b) => {
                let b = b.to_bytes();
                body_count.store(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                (Some(b), None)
            }
            Err(e) => {
                return local_response(400, format!("reading request body: {e}\n").into(), None)
            }
        }
    } else {
        let counted = report::CountingBody {
            inner: body.boxed(),
            count: body_count.clone(),
        };
        (None, Some(counted.boxed()))
    };
    let mut attempt = 0u32;
    // The retry in progress holds a place under maxRetries until the next attempt ends.
    let mut _retry_slot: Option<crate::proxy::limits::RetrySlot> = None;
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
                max_retries: None,
            },
            HttpDecision::Forward {
                upstream,
                protocol,
                pool,
                cluster,
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
                            let Some(slot) = mirror_slot(inputs, &route) else {
                                continue;
                            };
                            // A kept body is copied; a streaming one is teed, bounded.
                            let body = match (&buffered, streaming.take()) {
                                (Some(b), _) => MirrorBody::Ready(b.clone()),
                                (None, Some(s)) => {
                                    let (tee, copy) = TeeBody::new(
                                        s,
                                        inputs.settings.mirror_max_body_bytes,
                                        &inputs.metrics.daemon,
                                    );
                                    streaming = Some(tee.boxed());
                                    MirrorBody::Pending(copy)
                                }
                                (None, None) => MirrorBody::Ready(Bytes::new()),
                            };
                            let primary = Primary {
                                head: &parts,
                                authority: &authority,
                                route: &route,
                                trace: &trace,
                            };
                            send_mirror(inputs, pod, &primary, body, dest, slot);
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
                            finish(labels, None, Cow::Borrowed("FI"), code as u16, &events),
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
                    Err(e) => {
                        return local_response(400, format!("bad request: {e}\n").into(), None)
                    }
                };
                rewrite(&mut out, &edits);
                trace.inject(out.headers_mut());
                let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                let per_try = match (retry.per_try_timeout, remaining) {
                    (Some(t), Some(r)) => Some(t.min(r)),
                    (t, r) => t.or(r),
                };
                // Circuit breaking on the destination's connectionPool, then count the
                // attempt on its endpoint (LEAST_REQUEST) until the response headers arrive.
                let Ok(permit) = inputs
                    .endpoints
                    .host_limits
                    .admit(&pod.source_labels, &labels.service, pool.as_ref(), true)
                    .await
                else {
                    let resp = local_response(503, "upstream connect error or disconnect/reset before headers. reset reason: overflow\n".into(), None);
                    return report::metered(
                        resp,
                        finish(labels, None, Cow::Borrowed("UO"), 503, &events),
                    );
                };
                if !tried.contains(&upstream) {
                    tried.push(upstream);
                }
                let load = inputs.endpoints.in_flight.start(upstream);
                let result = forward(
                    inputs,
                    pod,
                    upstream,
                    protocol,
                    tls.as_deref(),
                    out,
                    per_try,
                    pool.as_ref(),
                )
                .await;
                if let Some(cluster) = cluster {
                    inputs.endpoints.health.record(
                        &pod.source_labels,
                        cluster,
                        upstream,
                        match &result {
                            Ok(r) => crate::proxy::outlier::Outcome::Status(r.status().as_u16()),
                            Err(_) => crate::proxy::outlier::Outcome::LocalFailure,
                        },
                    );
                }
                if trace.sampled() {
                    events.push(crate::spans::SpanEvent {
                        time: std::time::SystemTime::now(),
                        name: "upstream attempt".into(),
                        attributes: vec![
                            ("attempt", (attempt + 1).to_string()),
                            ("upstream_address", upstream.to_string()),
                            (
                                "outcome",
                                match &result {
                                    Ok(r) => r.status().as_u16().to_string(),
                                    Err(f) => f.flag().to_string(),
                                },
                            ),
                        ],
                    });
                }
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
                        let outcome = http_route::AttemptOutcome {
                            status: Some(resp.status().as_u16()),
                            grpc_status: resp
                                .headers()
                                .get("grpc-status")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse().ok()),
                            rate_limited: resp.headers().contains_key("x-envoy-ratelimited"),
                            refused_stream: false,
                        };
                        Attempt {
                            resp,
                            labels,
                            upstream: Some(upstream),
                            flags: "",
                            retry: Some((retry, outcome)),
                            max_retries: pool.as_ref().and_then(|p| p.max_retries),
                        }
                    }
                    Err(failure) => {
                        debug!(%upstream, flags = failure.flag(), error = %failure, "upstream attempt failed");
                        let expired = deadline.is_some_and(|d| Instant::now() >= d);
                        let (status, flags) = if expired {
                            (504, "UT")
                        } else {
                            (failure.status(), failure.flag())
                        };
                        let outcome = http_route::AttemptOutcome {
                            refused_stream: failure.refused_stream(),
                            ..Default::default()
                        };
                        Attempt {
                            resp: local_response(status, format!("{failure}\n").into(), None),
                            labels,
                            upstream: Some(upstream),
                            flags,
                            retry: Some((retry, outcome)),
                            max_retries: pool.as_ref().and_then(|p| p.max_retries),
                        }
                    }
                }
            }
        };
        let mut again = match &done.retry {
            Some((policy, outcome)) => {
                attempt < policy.attempts
                    && buffered.is_some()
                    && deadline.is_none_or(|d| Instant::now() < d)
                    && policy.should_retry(outcome, done.flags)
            }
            None => false,
        };
        if again {
            // connectionPool.http.maxRetries (Envoy's retry circuit breaker): retries in
            // flight to the destination, from this workload, at once; over it the failed
            // answer stands (counted as a retry overflow).
            match inputs.endpoints.retry_limits.begin(
                &pod.source_labels,
                &done.labels.service,
                done.max_retries,
            ) {
                Some(guard) => _retry_slot = Some(guard),
                None => {
                    again = false;
                    inputs.metrics.daemon.retry_overflows.inc();
                }
            }
        }
        if !again {
            let code = done.resp.status().as_u16();
            // Envoy's URX: retries exhausted on a failing upstream (with the last
            // attempt's own flag, as Envoy lists them: "UF,URX").
            let flags = match (done.flags, attempt > 0 && code >= 500) {
                ("", true) => Cow::Borrowed("URX"),
                (f, true) => Cow::Owned(format!("{f},URX")),
                (f, false) => Cow::Borrowed(f),
            };
            let resp = report::metered(
                done.resp,
                finish(done.labels, done.upstream, flags, code, &events),
            );
            return match client_upgrade {
                Some(cu) => finish_upgrade(resp, cu),
                None => resp,
            };
        }
        attempt += 1;
        tokio::time::sleep(retry_backoff(attempt)).await;
        decision = decide(&parts, &tried);
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
