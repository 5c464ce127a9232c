//! Trace collectors for the tests, speaking the real wire formats: OTLP over HTTP
//! (protobuf) and over gRPC, decoded with the published OpenTelemetry protobuf messages
//! (`opentelemetry-proto`), and Zipkin v2 JSON. Each records the spans it received; one can
//! be told to answer slowly, to play a collector under load.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value, trace::v1::span,
};
use prost::Message as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    OtlpHttp,
    OtlpGrpc,
    Zipkin,
}

/// A span as a collector received it, whatever the wire format.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_id: Option<String>,
    pub name: String,
    pub service: String,
    pub kind: String,
    pub start_us: u64,
    pub duration_us: u64,
    pub tags: BTreeMap<String, String>,
    pub error: bool,
    /// Event (OTLP) or annotation (Zipkin) names.
    pub events: Vec<String>,
    /// (trace, span) of linked spans (OTLP only).
    pub links: Vec<(String, String)>,
}

impl ReceivedSpan {
    pub fn tag(&self, k: &str) -> &str {
        self.tags.get(k).map(String::as_str).unwrap_or("")
    }
}

pub struct Collector {
    pub addr: SocketAddr,
    pub wire: Wire,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<Mutex<u64>>,
    _rt: tokio::runtime::Runtime,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn decode_otlp(body: &[u8]) -> Vec<ReceivedSpan> {
    let req =
        ExportTraceServiceRequest::decode(body).expect("a valid OTLP ExportTraceServiceRequest");
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|a| a.key == "service.name")
            .and_then(|a| a.value.as_ref())
            .and_then(|v| match &v.value {
                Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                let tags = s
                    .attributes
                    .iter()
                    .filter_map(|a| match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(any_value::Value::StringValue(v)) => Some((a.key.clone(), v.clone())),
                        _ => None,
                    })
                    .collect();
                out.push(ReceivedSpan {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_id: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                    name: s.name.clone(),
                    service: service.clone(),
                    kind: match span::SpanKind::try_from(s.kind) {
                        Ok(span::SpanKind::Client) => "CLIENT".into(),
                        Ok(span::SpanKind::Server) => "SERVER".into(),
                        Ok(k) => format!("{k:?}"),
                        Err(_) => "?".into(),
                    },
                    start_us: s.start_time_unix_nano / 1000,
                    duration_us: s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano) / 1000,
                    tags,
                    error: s.status.as_ref().is_some_and(|st| st.code == 2),
                    events: s.events.iter().map(|e| e.name.clone()).collect(),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                });
            }
        }
    }
    out
}

fn decode_zipkin(body: &[u8]) -> Vec<ReceivedSpan> {
    let list: Vec<serde_json::Value> = serde_json::from_slice(body).expect("Zipkin v2 JSON array");
    list.iter()
        .map(|s| {
            let tags: BTreeMap<String, String> = s["tags"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            ReceivedSpan {
                trace_id: s["traceId"].as_str().unwrap_or_default().into(),
                span_id: s["id"].as_str().unwrap_or_default().into(),
                parent_id: s["parentId"].as_str().map(str::to_string),
                name: s["name"].as_str().unwrap_or_default().into(),
                service: s["localEndpoint"]["serviceName"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                kind: s["kind"].as_str().unwrap_or_default().into(),
                start_us: s["timestamp"].as_u64().unwrap_or(0),
                duration_us: s["duration"].as_u64().unwrap_or(0),
                error: tags.get("error").is_some_and(|v| v == "true"),
                tags,
                events: s["annotations"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| x["value"].as_str().unwrap_or_default().to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
                links: Vec::new(),
            }
        })
        .collect()
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn reply(status: u16, headers: &[(&str, &str)], body: Vec<u8>) -> Response<Body> {
    let mut r = Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(Full::new(Bytes::from(body)).boxed())
        .expect("response")
}

impl Collector {
    /// A collector on 127.0.0.1 (the daemon's own network namespace) that answers after
    /// `delay`.
    pub fn start(wire: Wire, delay: Duration) -> Collector {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
            .expect("collector listener");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(0u64));
        let (s, n) = (spans.clone(), requests.clone());
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (spans, requests) = (s.clone(), n.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (spans, requests) = (spans.clone(), requests.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            *requests.lock().unwrap() += 1;
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let resp = match wire {
                                Wire::OtlpHttp if path == "/v1/traces" => {
                                    spans.lock().unwrap().extend(decode_otlp(&body));
                                    reply(200, &[("content-type", "application/x-protobuf")], Vec::new())
                                }
                                Wire::OtlpGrpc
                                    if path == "/opentelemetry.proto.collector.trace.v1.TraceService/Export" =>
                                {
                                    assert!(body.len() >= 5 && body[0] == 0, "an uncompressed gRPC frame");
                                    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
                                    assert_eq!(len, body.len() - 5, "one whole gRPC message");
                                    spans.lock().unwrap().extend(decode_otlp(&body[5..]));
                                    // Trailers-only: the status in the headers, no message.
                                    reply(200, &[("content-type", "application/grpc"), ("grpc-status", "0")], Vec::new())
                                }
                                Wire::Zipkin if path == "/api/v2/spans" => {
                                    spans.lock().unwrap().extend(decode_zipkin(&body));
                                    reply(202, &[], Vec::new())
                                }
                                _ => reply(404, &[], Vec::new()),
                            };
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let io = TokioIo::new(stream);
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Collector {
            addr,
            wire,
            spans,
            requests,
            _rt: rt,
        }
    }

    /// The URL to give the daemon (`--otlp-endpoint` or `--zipkin-endpoint`).
    pub fn url(&self) -> String {
        match self.wire {
            Wire::OtlpHttp => format!("http://{}", self.addr),
            Wire::OtlpGrpc => format!("grpc://{}", self.addr),
            Wire::Zipkin => format!("http://{}/api/v2/spans", self.addr),
        }
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Export requests received (answered or not yet).
    pub fn requests(&self) -> u64 {
        *self.requests.lock().unwrap()
    }

    pub fn clear(&self) {
        self.spans.lock().unwrap().clear();
    }

    /// Spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}
