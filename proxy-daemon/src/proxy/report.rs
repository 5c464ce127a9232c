//! The end of a request or connection: Istio's metrics and one access log line, written
//! when the response body is done, so duration and sizes cover the whole exchange.
use std::{
    borrow::Cow,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame};

use super::{PodContext, ProxyInputs};
use crate::proxy::access_log::Value;
use crate::{
    metrics::{
        DestinationLabels, IstioTcpLabels, PeerLabels, RequestLabels, RequestRecord,
        BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER,
    },
    state::Snapshot,
};

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// The destination workload behind `upstream`, for mesh destinations.
pub fn peer_for(
    snap: &Snapshot,
    dest: &DestinationLabels,
    upstream: Option<SocketAddr>,
) -> Arc<PeerLabels> {
    if dest.service_name == PASSTHROUGH_CLUSTER || dest.service_name == BLACKHOLE_CLUSTER {
        return PeerLabels::unknown();
    }
    upstream
        .and_then(|u| snap.peers.get(&u.ip()).cloned())
        .unwrap_or_else(PeerLabels::unknown)
}

/// Whether the source pod's namespace wants access log lines
/// (`nodeproxy.io/access-log: "false"` turns them off).
pub fn access_log_on(snap: &Snapshot, namespace: &str) -> bool {
    snap.namespaces.get(namespace).is_none_or(|n| n.access_log)
}

/// The request's size, known up front (buffered) or counted as its body streams.
pub enum RequestSize {
    Known(u64),
    Counted { head: u64, body: Arc<AtomicU64> },
}

impl RequestSize {
    fn bytes(&self) -> u64 {
        match self {
            RequestSize::Known(n) => *n,
            RequestSize::Counted { head, body } => head + body.load(Ordering::Relaxed),
        }
    }
}

/// Everything needed to report one request once its response is done.
pub struct Finish {
    pub inputs: Arc<ProxyInputs>,
    pub pod: Arc<PodContext>,
    pub started: Instant,
    pub start_time: SystemTime,
    pub method: http::Method,
    pub authority: String,
    pub path: String,
    pub protocol: &'static str,
    pub request_id: Option<String>,
    pub request_size: RequestSize,
    pub grpc: bool,
    pub dest: DestinationLabels,
    pub upstream: Option<SocketAddr>,
    pub flags: Cow<'static, str>,
    pub code: u16,
    /// False for mirror copies: they are metered, not logged.
    pub log: bool,
    /// The request's span, when it is sampled.
    pub span: Option<SpanDraft>,
}

/// What a sampled request's span needs beyond what [`Finish`] has.
pub struct SpanDraft {
    pub trace: crate::spans::RequestTrace,
    /// The port the request was for (the span is named `<host>:<port>/*`, as Istio does).
    pub port: u16,
    pub user_agent: Option<String>,
    /// One per upstream attempt (retries show as more than one).
    pub events: Vec<crate::spans::SpanEvent>,
    /// A mirror copy links to its primary's span.
    pub links: Vec<(u128, u64)>,
    pub mirror: bool,
}

/// Size of a header block on the wire, roughly as Envoy counts it (`name: value\r\n`).
pub fn head_bytes(headers: &http::HeaderMap, first_line: usize) -> u64 {
    (first_line
        + headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
        + 2) as u64
}

pub(crate) fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

impl Finish {
    /// Reports the request: metrics always, the access log line when enabled.
    pub fn done(mut self, response_bytes: u64, grpc: Option<u16>, downstream_gone: bool) {
        let snap = self.inputs.config.load();
        let peer = peer_for(&snap, &self.dest, self.upstream);
        let flags: Cow<'static, str> = if downstream_gone && self.flags.is_empty() {
            Cow::Borrowed("DC")
        } else {
            std::mem::take(&mut self.flags)
        };
        let request_bytes = self.request_size.bytes();
        let duration = self.started.elapsed();
        if let Some(draft) = &self.span {
            self.inputs.tracer.submit(span_record(
                &self,
                draft,
                &flags,
                request_bytes,
                response_bytes,
                grpc,
                duration,
            ));
        }
        let dest = Arc::new(self.dest);
        // Over HBONE (a mesh destination) both identities are known and were checked.
        let mtls = self
            .upstream
            .and_then(|u| crate::proxy::hbone_peer(&self.inputs, &snap, u))
            .map(|m| {
                Arc::new(crate::metrics::Principals {
                    source: self
                        .pod
                        .workload
                        .identity(self.inputs.certs.trust_domain())
                        .to_string(),
                    destination: m.identity.to_string(),
                })
            });
        let mut base =
            IstioTcpLabels::new(&self.pod.source_labels, &peer, &dest, &flags).with_mtls(mtls);
        base.request_protocol = if self.grpc { "grpc" } else { "http" };
        let grpc_response_status = if self.grpc {
            // A gRPC response without a status (e.g. a local reply) is UNKNOWN (2), and so
            // is one outside the 17 codes gRPC defines: the label stays bounded.
            Some(grpc.filter(|g| *g <= 16).unwrap_or(2))
        } else {
            None
        };
        self.inputs.metrics.http.record(RequestRecord {
            labels: RequestLabels {
                response_code: self.code,
                grpc_response_status,
                base,
            },
            duration,
            request_bytes,
            response_bytes,
        });
        if self.log && access_log_on(&snap, &self.pod.workload.namespace) {
            log_request(&AccessLine {
                start_time: self.start_time,
                method: self.method.as_str(),
                authority: &self.authority,
                path: &self.path,
                protocol: self.protocol,
                code: self.code,
                flags: &flags,
                received: request_bytes,
                sent: response_bytes,
                duration,
                upstream: self.upstream,
                request_id: self.request_id.as_deref(),
                source: &self.pod.workload,
                destination_service: &dest.service,
                peer: &peer,
            });
        }
    }
}

/// Envoy's cluster name for a destination (`outbound|port||host`), or Istio's pseudo
/// clusters for traffic to unknown destinations.
fn cluster_name(dest: &DestinationLabels, port: u16) -> String {
    if dest.service_name == PASSTHROUGH_CLUSTER || dest.service_name == BLACKHOLE_CLUSTER {
        return dest.service_name.clone();
    }
    format!("outbound|{port}||{}", dest.service)
}

/// The span of one request, with the tags Istio's Envoy puts on its client spans.
#[allow(clippy::too_many_arguments)]
fn span_record(
    f: &Finish,
    draft: &SpanDraft,
    flags: &str,
    request_bytes: u64,
    response_bytes: u64,
    grpc: Option<u16>,
    duration: std::time::Duration,
) -> crate::spans::SpanRecord {
    let w = &f.pod.workload;
    let dest = &f.dest;
    let cluster = cluster_name(dest, draft.port);
    let pod_ip = w.ip.clone().unwrap_or_else(|| "-".into());
    let mut tags: Vec<(&'static str, String)> = vec![
        ("component", "proxy".into()),
        (
            "node_id",
            format!(
                "sidecar~{pod_ip}~{}.{}~{}.svc.cluster.local",
                w.pod_name, w.namespace, w.namespace
            ),
        ),
        (
            "guid:x-request-id",
            f.request_id.clone().unwrap_or_default(),
        ),
        ("http.url", format!("http://{}{}", f.authority, f.path)),
        ("http.method", f.method.as_str().into()),
        ("downstream_cluster", "-".into()),
        (
            "user_agent",
            draft.user_agent.clone().unwrap_or_else(|| "-".into()),
        ),
        ("http.protocol", f.protocol.into()),
        ("peer.address", pod_ip),
        ("request_size", request_bytes.to_string()),
        ("upstream_cluster", cluster.clone()),
        ("upstream_cluster.name", cluster),
        ("http.status_code", f.code.to_string()),
        ("response_size", response_bytes.to_string()),
        (
            "response_flags",
            if flags.is_empty() { "-" } else { flags }.into(),
        ),
        ("istio.canonical_service", w.canonical_service.clone()),
        ("istio.canonical_revision", w.canonical_revision.clone()),
        ("istio.namespace", w.namespace.clone()),
        ("istio.mesh_id", "cluster.local".into()),
    ];
    if let Some(u) = f.upstream {
        tags.push(("upstream_address", u.to_string()));
    }
    if let Some(g) = grpc {
        tags.push(("grpc.status_code", g.to_string()));
    }
    if draft.mirror {
        tags.push(("mirror", "true".into()));
    }
    crate::spans::SpanRecord {
        kind: crate::spans::SpanKind::Client,
        context: draft.trace.context,
        name: format!("{}:{}/*", dest.service, draft.port),
        service: format!("{}.{}", w.canonical_service, w.namespace),
        start: f.start_time,
        duration,
        tags,
        // Envoy marks a span failed on a 5xx or when no response came at all.
        error: f.code >= 500 || f.code == 0,
        events: draft.events.clone(),
        links: draft.links.clone(),
        remote: f.upstream,
    }
}

/// The fields of one request's access log line (Envoy's, in spirit).
pub struct AccessLine<'a> {
    pub start_time: SystemTime,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub code: u16,
    pub flags: &'a str,
    pub received: u64,
    pub sent: u64,
    pub duration: std::time::Duration,
    pub upstream: Option<SocketAddr>,
    pub request_id: Option<&'a str>,
    pub source: &'a crate::state::workload::WorkloadInfo,
    pub destination_service: &'a str,
    pub peer: &'a PeerLabels,
}

pub fn log_request(l: &AccessLine) {
    if !crate::proxy::access_log::enabled() {
        return;
    }
    let start = rfc3339(l.start_time);
    let upstream = l.upstream.map(|u| u.to_string());
    crate::proxy::access_log::write("request", &request_fields(l, &start, upstream.as_deref()));
}

/// The request line's fields, in order (`start` and `upstream` formatted by the caller).
pub fn request_fields<'a>(
    l: &'a AccessLine,
    start: &'a str,
    upstream: Option<&'a str>,
) -> [(&'static str, Value<'a>); 19] {
    [
        ("start_time", Value::Str(start)),
        ("method", Value::Str(l.method)),
        ("authority", Value::Str(l.authority)),
        ("path", Value::Str(l.path)),
        ("protocol", Value::Str(l.protocol)),
        ("response_code", Value::U64(l.code.into())),
        (
            "response_flags",
            Value::Str(if l.flags.is_empty() { "-" } else { l.flags }),
        ),
        ("bytes_received", Value::U64(l.received)),
        ("bytes_sent", Value::U64(l.sent)),
        ("duration_ms", Value::F64(l.duration.as_secs_f64() * 1000.0)),
        ("upstream_host", Value::Str(upstream.unwrap_or("-"))),
        ("x_request_id", Value::Str(l.request_id.unwrap_or("-"))),
        ("source_workload", Value::Str(&l.source.workload)),
        ("source_namespace", Value::Str(&l.source.namespace)),
        ("source_pod", Value::Str(&l.source.pod_name)),
        ("destination_service", Value::Str(l.destination_service)),
        ("destination_workload", Value::Str(&l.peer.workload)),
        ("destination_namespace", Value::Str(&l.peer.namespace)),
        ("reporter", Value::Str("source")),
    ]
}

/// What reports a request once its response body has ended.
pub trait ReportAtEnd: Send + Sync + Unpin + 'static {
    /// The upstream reset the body midway (Envoy's `UR`), unless a flag is already set.
    fn upstream_reset(&mut self);
    fn done(self, response_bytes: u64, grpc: Option<u16>, downstream_gone: bool);
}

impl ReportAtEnd for Finish {
    fn upstream_reset(&mut self) {
        if self.flags.is_empty() {
            self.flags = Cow::Borrowed("UR");
        }
    }

    fn done(self, response_bytes: u64, grpc: Option<u16>, downstream_gone: bool) {
        Finish::done(self, response_bytes, grpc, downstream_gone)
    }
}

/// Wraps a response so it is reported when its body ends (or the client goes away).
pub fn metered<R: ReportAtEnd>(resp: Response<Body>, finish: R) -> Response<Body> {
    let head = head_bytes(resp.headers(), 17);
    let header_grpc = grpc_status(resp.headers());
    resp.map(|inner| {
        Metered {
            inner,
            bytes: head,
            grpc: header_grpc,
            finish: Some(finish),
        }
        .boxed()
    })
}

struct Metered<R: ReportAtEnd> {
    inner: Body,
    bytes: u64,
    grpc: Option<u16>,
    finish: Option<R>,
}

impl<R: ReportAtEnd> Metered<R> {
    fn complete(&mut self, downstream_gone: bool) {
        if let Some(f) = self.finish.take() {
            f.done(self.bytes, self.grpc, downstream_gone);
        }
    }
}

impl<R: ReportAtEnd> hyper::body::Body for Metered<R> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // Metered is Unpin (Body is a boxed body, R is owned data).
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                } else if let Some(t) = frame.trailers_ref() {
                    this.bytes += head_bytes(t, 0);
                    if let Some(g) = grpc_status(t) {
                        this.grpc = Some(g);
                    }
                }
            }
            Poll::Ready(None) => this.complete(false),
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = this.finish.as_mut() {
                    f.upstream_reset();
                }
                this.complete(false);
            }
            Poll::Pending => {}
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

impl<R: ReportAtEnd> Drop for Metered<R> {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (Envoy: DC), unless the body was
        // complete and simply never polled to its end.
        let gone = !self.inner.is_end_stream();
        self.complete(gone);
    }
}

/// Counts a streaming request body as it passes.
pub struct CountingBody {
    pub inner: Body,
    pub count: Arc<AtomicU64>,
}

impl hyper::body::Body for CountingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
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

/// One line per TCP connection, at its close.
pub struct TcpLog<'a> {
    pub pod: &'a PodContext,
    pub snap: &'a Snapshot,
    pub start_time: SystemTime,
    pub duration: std::time::Duration,
    pub dest: &'a DestinationLabels,
    pub peer: &'a PeerLabels,
    pub upstream: Option<SocketAddr>,
    pub original_dst: SocketAddr,
    /// The SNI the app's ClientHello carried (Envoy's %REQUESTED_SERVER_NAME%).
    pub requested_server_name: Option<&'a str>,
    pub flags: &'a str,
    pub received: u64,
    pub sent: u64,
}

pub fn log_tcp(l: TcpLog) {
    if !crate::proxy::access_log::enabled() || !access_log_on(l.snap, &l.pod.workload.namespace) {
        return;
    }
    let w = &l.pod.workload;
    let start = rfc3339(l.start_time);
    let upstream = l.upstream.map(|u| u.to_string());
    let original = l.original_dst.to_string();
    crate::proxy::access_log::write(
        "connection",
        &[
            ("start_time", Value::Str(&start)),
            ("protocol", Value::Str("tcp")),
            (
                "response_flags",
                Value::Str(if l.flags.is_empty() { "-" } else { l.flags }),
            ),
            ("bytes_received", Value::U64(l.received)),
            ("bytes_sent", Value::U64(l.sent)),
            ("duration_ms", Value::F64(l.duration.as_secs_f64() * 1000.0)),
            (
                "upstream_host",
                Value::Str(upstream.as_deref().unwrap_or("-")),
            ),
            ("original_destination", Value::Str(&original)),
            (
                "requested_server_name",
                Value::Str(l.requested_server_name.unwrap_or("-")),
            ),
            ("source_workload", Value::Str(&w.workload)),
            ("source_namespace", Value::Str(&w.namespace)),
            ("source_pod", Value::Str(&w.pod_name)),
            ("destination_service", Value::Str(&l.dest.service)),
            ("destination_workload", Value::Str(&l.peer.workload)),
            ("destination_namespace", Value::Str(&l.peer.namespace)),
            ("reporter", Value::Str("source")),
        ],
    );
}

/// `2026-11-22T01:02:03.456Z` (UTC, milliseconds), as Envoy's %START_TIME%.
pub fn rfc3339(t: SystemTime) -> String {
    let (date, millis) = civil(t);
    format!("{date}.{:03}Z", millis / 1000)
}

/// `2026-11-22T01:02:03.456789Z` (UTC, microseconds), for log line timestamps.
pub fn rfc3339_micros(t: SystemTime) -> String {
    let (date, micros) = civil(t);
    format!("{date}.{micros:06}Z")
}

/// (`YYYY-MM-DDTHH:MM:SS`, microseconds within the second), in UTC.
fn civil(t: SystemTime) -> (String, u32) {
    let micros = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_micros();
    let dt = jiff::Timestamp::try_from(t)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_zoned(jiff::tz::TimeZone::UTC)
        .datetime();
    (
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            dt.year(),
            dt.month(),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        ),
        micros,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times_read_as_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_309_323_456);
        assert_eq!(rfc3339(t), "2026-11-22T01:02:03.456Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
