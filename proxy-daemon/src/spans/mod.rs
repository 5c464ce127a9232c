//! Distributed tracing: a client span for every request on the L7 path, as a sidecar's
//! Envoy makes one. The request's trace context is read (W3C or B3) or started, the
//! sampling decision taken (the caller's, a forced trace, else the namespace's or node's
//! percentage), the context forwarded upstream with our span as the parent, and sampled
//! spans handed to a bounded queue that a background task exports (OTLP or Zipkin). The
//! request path never waits on the exporter: a full queue drops the span and counts it.
pub mod context;
mod encode;
mod export;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::mpsc;

pub use context::Formats;
use context::{Incoming, Outgoing};
pub use export::{run_exporter, ResolveHost};

/// Spans waiting for export at most; beyond, new spans are dropped (`queue_full`).
pub const QUEUE_CAPACITY: usize = 8192;
/// Spans per export request at most.
pub const BATCH_MAX: usize = 512;
/// A batch leaves at the latest this long after its first span arrived.
pub const BATCH_DELAY: Duration = Duration::from_millis(500);
/// One export request may take this long; then its spans are dropped (`timeout`).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum TraceConfigError {
    #[error("{0}: not a collector URL ({1})")]
    BadUrl(String, &'static str),
    #[error("trace sampling {0}: must be a percentage from 0 to 100")]
    BadSampling(String),
}

/// How spans leave the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// OTLP over HTTP/1.1, protobuf body (`/v1/traces`).
    OtlpHttp,
    /// OTLP over gRPC (HTTP/2 without TLS).
    OtlpGrpc,
    /// Zipkin v2 JSON.
    Zipkin,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::OtlpHttp => "otlp_http",
            Protocol::OtlpGrpc => "otlp_grpc",
            Protocol::Zipkin => "zipkin",
        }
    }
}

/// A collector address: `http://host:port[/path]` or `grpc://host:port`. The host may be
/// an IP, or (cluster mode) a Service name that the daemon resolves itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Collector {
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Collector {
    fn parse(url: &str, zipkin: bool) -> Result<Self, TraceConfigError> {
        let bad = |why| TraceConfigError::BadUrl(url.to_string(), why);
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| bad("bad port"))?)),
            None => (hostport, None),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let (protocol, default_port, default_path) = match (scheme, zipkin) {
            ("http", true) => (Protocol::Zipkin, 9411, "/api/v2/spans"),
            ("http", false) => (Protocol::OtlpHttp, 4318, "/v1/traces"),
            ("grpc", false) => (Protocol::OtlpGrpc, 4317, ""),
            ("https", _) => return Err(bad("TLS to the collector is not supported; use http:// (or grpc://) inside the cluster")),
            _ => return Err(bad(if zipkin { "scheme must be http" } else { "scheme must be http or grpc" })),
        };
        if protocol == Protocol::OtlpGrpc && !path.is_empty() && path != "/" {
            return Err(bad("a gRPC collector URL has no path"));
        }
        Ok(Collector {
            protocol,
            host: host.to_ascii_lowercase(),
            port: port.unwrap_or(default_port),
            path: if path.is_empty() || path == "/" {
                default_path.to_string()
            } else {
                path.to_string()
            },
        })
    }

    pub fn otlp(url: &str) -> Result<Self, TraceConfigError> {
        Self::parse(url, false)
    }

    pub fn zipkin(url: &str) -> Result<Self, TraceConfigError> {
        Self::parse(url, true)
    }
}

/// Parses a sampling percentage (`0`–`100`, fractions allowed).
pub fn parse_sampling(s: &str) -> Result<f64, TraceConfigError> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(TraceConfigError::BadSampling(s.to_string())),
    }
}

/// The tracing settings in force (the flags, replaced whole when the mesh configuration
/// sets them).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TraceSettings {
    /// Percentage of new traces sampled.
    pub sampling: f64,
    pub collectors: Vec<Collector>,
    /// Formats written upstream when a request brought no trace context.
    pub propagation: Formats,
    /// Where the settings came from (`flags`, or the mesh configuration object).
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// queue_full | export_failed | timeout | unresolved
    pub reason: &'static str,
}

#[derive(Default)]
pub struct SpanMetrics {
    pub sampled: Counter,
    pub invalid_context: Counter,
    pub exported: Family<ProtocolLabels, Counter>,
    pub dropped: Family<DropLabels, Counter>,
}

impl SpanMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "traces_sampled",
            "Requests whose span was recorded (sampled, forced or sampled upstream)",
            m.sampled.clone(),
        );
        registry.register(
            "trace_context_invalid",
            "Requests with malformed trace headers (a new trace was started; the request went on)",
            m.invalid_context.clone(),
        );
        registry.register(
            "spans_exported",
            "Spans accepted by a collector, by protocol",
            m.exported.clone(),
        );
        registry.register(
            "spans_dropped",
            "Spans not exported, by reason (the request path never waits for the exporter)",
            m.dropped.clone(),
        );
        m
    }

    fn drop_n(&self, reason: &'static str, n: usize) {
        self.dropped
            .get_or_create(&DropLabels { reason })
            .inc_by(n as u64);
    }
}

/// One event on a span (an upstream attempt, say).
#[derive(Debug, Clone)]
pub struct SpanEvent {
    pub time: SystemTime,
    pub name: String,
    pub attributes: Vec<(&'static str, String)>,
}

/// Which side of a call a span is: the caller's proxy or the callee's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Client,
    Server,
}

/// A finished span, ready for export.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub context: Outgoing,
    pub kind: SpanKind,
    pub name: String,
    /// The source workload as Istio names it (`<canonical service>.<namespace>`).
    pub service: String,
    pub start: SystemTime,
    pub duration: Duration,
    pub tags: Vec<(&'static str, String)>,
    pub error: bool,
    pub events: Vec<SpanEvent>,
    /// (trace, span) of related spans (a mirror copy links to its primary).
    pub links: Vec<(u128, u64)>,
    /// The upstream the span's request went to (Zipkin's remoteEndpoint).
    pub remote: Option<std::net::SocketAddr>,
}

/// One request's place in its trace.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    pub context: Outgoing,
    pub formats: Formats,
    pub tracestate: Option<HeaderValue>,
}

impl RequestTrace {
    /// Writes the context upstream (our span as the parent of what the upstream does).
    pub fn inject(&self, headers: &mut HeaderMap) {
        context::write(
            headers,
            &self.context,
            self.formats,
            self.tracestate.as_ref(),
        );
    }

    /// A new span in the same trace, child of this one (a mirror copy's).
    pub fn child(&self) -> RequestTrace {
        RequestTrace {
            context: Outgoing {
                span_id: new_span_id(),
                parent_span_id: Some(self.context.span_id),
                ..self.context
            },
            formats: self.formats,
            tracestate: self.tracestate.clone(),
        }
    }

    pub fn sampled(&self) -> bool {
        self.context.sampled
    }
}

fn new_span_id() -> u64 {
    loop {
        let v = rand::random::<u64>();
        if v != 0 {
            return v;
        }
    }
}

fn new_trace_id() -> u128 {
    loop {
        let v = rand::random::<u128>();
        if v != 0 {
            return v;
        }
    }
}

/// The node's tracer: decides, propagates, and queues spans for the exporter.
pub struct Tracer {
    settings: ArcSwap<TraceSettings>,
    queue: mpsc::Sender<SpanRecord>,
    pub metrics: SpanMetrics,
}

/// The receiving end of the span queue (for [`run_exporter`]).
pub struct SpanQueue {
    rx: mpsc::Receiver<SpanRecord>,
}

impl Tracer {
    /// A tracer registering its metrics under `registry` (the daemon's `proxy_daemon`
    /// sub-registry), and the queue its exporter drains.
    pub fn new(settings: TraceSettings, registry: &mut Registry) -> (Arc<Tracer>, SpanQueue) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let tracer = Arc::new(Tracer {
            settings: ArcSwap::from_pointee(settings),
            queue: tx,
            metrics: SpanMetrics::register(registry),
        });
        (tracer, SpanQueue { rx })
    }

    pub fn settings(&self) -> Arc<TraceSettings> {
        self.settings.load_full()
    }

    /// Replaces the settings (a reload; the exporter reads them per batch); returns
    /// whether anything changed.
    pub fn set_settings(&self, new: TraceSettings) -> bool {
        if *self.settings.load_full() == new {
            return false;
        }
        self.settings.store(Arc::new(new));
        true
    }

    /// Reads the request's context and decides: the caller's decision if it made one,
    /// a forced trace, else `namespace_sampling` (the namespace's annotation) or the
    /// node's percentage.
    pub fn begin(&self, headers: &HeaderMap, namespace_sampling: Option<f64>) -> RequestTrace {
        let incoming: Incoming = context::read(headers);
        if incoming.malformed {
            self.metrics.invalid_context.inc();
        }
        let settings = self.settings.load();
        let sampled = incoming.forced
            || incoming.sampled.unwrap_or_else(|| {
                let pct = namespace_sampling.unwrap_or(settings.sampling);
                pct > 0.0 && rand::random::<f64>() * 100.0 < pct
            });
        let formats = if incoming.formats.any() {
            incoming.formats
        } else {
            settings.propagation
        };
        let (trace_id, parent_span_id, short) = match incoming.parent {
            Some(p) => (p.trace_id, Some(p.span_id), p.short_trace_id),
            None => (new_trace_id(), None, false),
        };
        if sampled {
            self.metrics.sampled.inc();
        }
        RequestTrace {
            context: Outgoing {
                trace_id,
                span_id: new_span_id(),
                parent_span_id,
                sampled,
                debug: incoming.forced,
                short_trace_id: short,
            },
            formats,
            tracestate: incoming.tracestate,
        }
    }

    /// Queues a finished span; never waits.
    pub fn submit(&self, span: SpanRecord) {
        if self.settings.load().collectors.is_empty() {
            return self.metrics.drop_n("no_collector", 1);
        }
        if self.queue.try_send(span).is_err() {
            self.metrics.drop_n("queue_full", 1);
        }
    }

    /// For `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let s = self.settings.load();
        let dropped: u64 = [
            "queue_full",
            "export_failed",
            "timeout",
            "unresolved",
            "no_collector",
        ]
        .iter()
        .map(|r| {
            self.metrics
                .dropped
                .get_or_create(&DropLabels { reason: r })
                .get()
        })
        .sum();
        let exported: u64 = [Protocol::OtlpHttp, Protocol::OtlpGrpc, Protocol::Zipkin]
            .iter()
            .map(|p| {
                self.metrics
                    .exported
                    .get_or_create(&ProtocolLabels {
                        protocol: p.label(),
                    })
                    .get()
            })
            .sum();
        serde_json::json!({
            "settings": &*s,
            "queue": {"capacity": QUEUE_CAPACITY, "queued": QUEUE_CAPACITY - self.queue.capacity()},
            "spans": {"sampled_requests": self.metrics.sampled.get(), "exported": exported, "dropped": dropped},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(sampling: f64) -> Arc<Tracer> {
        let mut reg = Registry::default();
        Tracer::new(
            TraceSettings {
                sampling,
                collectors: vec![],
                propagation: Formats::parse("w3c,b3").unwrap(),
                source: "flags".into(),
            },
            &mut reg,
        )
        .0
    }

    #[test]
    fn collector_urls() {
        let c = Collector::otlp("http://10.0.0.1:4318").unwrap();
        assert_eq!(
            (c.protocol, c.port, c.path.as_str()),
            (Protocol::OtlpHttp, 4318, "/v1/traces")
        );
        let g = Collector::otlp("grpc://otel-collector.observability:4317").unwrap();
        assert_eq!(
            (g.protocol, g.host.as_str()),
            (Protocol::OtlpGrpc, "otel-collector.observability")
        );
        let z = Collector::zipkin("http://zipkin.istio-system:9411/api/v2/spans").unwrap();
        assert_eq!((z.protocol, z.port), (Protocol::Zipkin, 9411));
        for bad in [
            "10.0.0.1:4318",
            "https://x:1",
            "http://:9",
            "grpc://x:4317/v1",
            "http://x:99999",
        ] {
            assert!(Collector::otlp(bad).is_err(), "{bad}");
        }
        assert!(Collector::zipkin("grpc://x:1").is_err());
    }

    #[test]
    fn sampling_percentages() {
        assert_eq!(parse_sampling("0.5").unwrap(), 0.5);
        assert!(
            parse_sampling("101").is_err()
                && parse_sampling("-1").is_err()
                && parse_sampling("x").is_err()
        );
    }

    #[test]
    fn decisions_follow_caller_force_and_percentage() {
        let none = tracer(0.0);
        assert!(!none.begin(&HeaderMap::new(), None).sampled());
        assert!(
            none.begin(&HeaderMap::new(), Some(100.0)).sampled(),
            "namespace override"
        );
        let mut forced = HeaderMap::new();
        forced.insert(context::FORCE_TRACE, HeaderValue::from_static("true"));
        assert!(none.begin(&forced, None).sampled());
        let mut upstream_yes = HeaderMap::new();
        upstream_yes.insert(
            context::TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let t = none.begin(&upstream_yes, None);
        assert!(t.sampled(), "the caller sampled it");
        assert_eq!(t.context.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.context.parent_span_id, Some(0x00f067aa0ba902b7));
        assert_ne!(t.context.span_id, 0x00f067aa0ba902b7, "our own span");
        assert!(
            t.formats.w3c && !t.formats.b3_multi,
            "answer in the caller's format"
        );
        let all = tracer(100.0);
        let mut upstream_no = HeaderMap::new();
        upstream_no.insert(context::B3_SAMPLED, HeaderValue::from_static("0"));
        assert!(
            !all.begin(&upstream_no, None).sampled(),
            "the caller said no"
        );
        let fresh = all.begin(&HeaderMap::new(), None);
        assert!(fresh.sampled() && fresh.context.parent_span_id.is_none());
        assert!(
            fresh.formats.w3c && fresh.formats.b3_multi,
            "both when none came"
        );
        let n = (0..2000)
            .filter(|_| tracer(10.0).begin(&HeaderMap::new(), None).sampled())
            .count();
        assert!((100..=300).contains(&n), "10 % of 2000 sampled: {n}");
    }

    #[test]
    fn malformed_context_is_counted_and_starts_a_trace() {
        let t = tracer(100.0);
        let mut h = HeaderMap::new();
        h.insert(
            context::TRACEPARENT,
            HeaderValue::from_static("not-a-context"),
        );
        let r = t.begin(&h, None);
        assert!(r.context.parent_span_id.is_none() && r.context.trace_id != 0);
        assert_eq!(t.metrics.invalid_context.get(), 1);
        let mut out = HeaderMap::new();
        r.inject(&mut out);
        assert!(out[context::TRACEPARENT]
            .to_str()
            .unwrap()
            .starts_with("00-"));
    }
}
