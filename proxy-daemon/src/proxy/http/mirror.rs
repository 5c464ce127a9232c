//! Mirroring: fire-and-forget copies of requests (bodies teed up to a bound), at most
//! [`MIRROR_CONCURRENCY`] in flight, never delaying or failing the primary.
use super::*;

/// Mirror copies in flight on this node at most by default (`--mirror-max-in-flight`);
/// beyond, copies are dropped and counted.
pub const MIRROR_CONCURRENCY: usize = 256;
/// A mirror copy that has not answered by then is abandoned (and counted as failed).
pub(super) const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// Fire and forget: a copy of the request (same method, path, headers and x-request-id,
/// Host with Istio's `-shadow` suffix) to the mirror destination. Nothing here waits on,
/// or can fail, the primary request.
/// The primary request a copy is made of.
pub(super) struct Primary<'a> {
    pub head: &'a http::request::Parts,
    pub authority: &'a str,
    /// The rule's source, for the drop counters.
    pub route: &'a str,
    pub trace: &'a crate::spans::RequestTrace,
}

/// A place among the mirror copies in flight, taken before any body is copied (so a
/// copy that could not be sent never holds memory); None, counted, when all are taken.
pub(super) fn mirror_slot(
    inputs: &ProxyInputs,
    route: &str,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let slot = inputs.mirror_slots.clone().try_acquire_owned().ok();
    if slot.is_none() {
        inputs
            .metrics
            .daemon
            .mirror_dropped
            .get_or_create(&crate::metrics::MirrorDropLabels {
                route: route.to_string(),
                reason: "concurrency",
            })
            .inc();
    }
    slot
}

pub(super) fn send_mirror(
    inputs: &Arc<ProxyInputs>,
    pod: &Arc<PodContext>,
    primary: &Primary,
    body: MirrorBody,
    dest: &crate::state::routes::DestinationRef,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let Primary {
        head,
        authority,
        route,
        trace: primary,
    } = *primary;
    let m = &inputs.metrics.daemon;
    let dropped = |reason: &'static str| {
        m.mirror_dropped
            .get_or_create(&crate::metrics::MirrorDropLabels {
                route: route.to_string(),
                reason,
            })
            .inc();
    };
    let (upstream, labels, tls, port) = {
        let snap = inputs.config.load();
        let Some(target) = snap
            .registry
            .by_host(&dest.host, &pod.workload.namespace)
            .filter(|t| route::sees_service(&snap, &pod.workload, t))
        else {
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
            route::Choice {
                scope: Some(&pod.source_labels),
                ..Default::default()
            },
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
                port as u16,
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
    // The copy is its own span, a child of the primary's in the same trace (and linked to
    // it), so a trace shows what was mirrored where.
    let trace = primary.child();
    trace.inject(req.headers_mut());
    let span = trace.sampled().then(|| report::SpanDraft {
        links: vec![(primary.context.trace_id, primary.context.span_id)],
        trace,
        port,
        user_agent: None,
        events: Vec::new(),
        mirror: true,
    });
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
            span,
        };
        *req.body_mut() = Full::new(bytes).map_err(|never| match never {}).boxed();
        let result = forward(
            &inputs,
            &pod,
            upstream,
            crate::proxy::http_route::UpstreamProtocol::AsClient,
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
            Err(failure) => (failure.status(), "failed", failure.flag()),
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
pub(super) enum MirrorBody {
    Ready(Bytes),
    /// Filled in when the primary's streaming body ends; None if it outgrew the bound.
    Pending(tokio::sync::oneshot::Receiver<Option<Bytes>>),
}

/// Passes a streaming request body through to the primary untouched while keeping a copy
/// for the mirror, up to `limit` bytes; past it the copy is abandoned (the primary never is).
pub(super) struct TeeBody {
    pub(super) inner: Body,
    pub(super) copy: Option<bytes::BytesMut>,
    pub(super) limit: usize,
    pub(super) done: Option<tokio::sync::oneshot::Sender<Option<Bytes>>>,
    /// The node's count of bytes held for mirror copies (and its high-water mark).
    held: (
        prometheus_client::metrics::gauge::Gauge,
        prometheus_client::metrics::gauge::Gauge,
    ),
}

impl TeeBody {
    pub(super) fn new(
        inner: Body,
        limit: usize,
        metrics: &crate::metrics::DaemonMetrics,
    ) -> (Self, tokio::sync::oneshot::Receiver<Option<Bytes>>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tee = Self {
            inner,
            copy: Some(bytes::BytesMut::new()),
            limit,
            done: Some(tx),
            held: (
                metrics.mirror_copy_bytes.clone(),
                metrics.mirror_copy_bytes_peak.clone(),
            ),
        };
        (tee, rx)
    }

    fn hold(&self, n: usize) {
        let now = self.held.0.inc_by(n as i64) + n as i64;
        // A high-water mark: raised, never lowered (a lost race only under-reports).
        if now > self.held.1.get() {
            self.held.1.set(now);
        }
    }

    pub(super) fn finish(&mut self, complete: bool) {
        if let Some(c) = &self.copy {
            self.held.0.dec_by(c.len() as i64);
        }
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
                    // Nobody waits for the copy any more (the mirror gave up or was
                    // never sent): stop copying.
                    let abandoned = self.done.as_ref().is_none_or(|tx| tx.is_closed());
                    if over || abandoned {
                        self.finish(false);
                    } else if let Some(c) = self.copy.as_mut() {
                        c.extend_from_slice(data);
                        let n = data.len();
                        self.hold(n);
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
pub(super) struct Guarded {
    pub(super) inner: Body,
    pub(super) _guards: (
        crate::proxy::limits::Admitted,
        crate::proxy::limits::EndpointLoad,
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
