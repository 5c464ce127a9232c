//! Spans on the wire: OTLP protobuf (the published OpenTelemetry messages) and Zipkin v2
//! JSON, with the names Istio's Envoy uses so Jaeger and Kiali show them as they would a
//! sidecar's.
use std::{collections::BTreeMap, time::SystemTime};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    resource::v1::Resource,
    trace::v1::{span, ResourceSpans, ScopeSpans, Span, Status},
};
use prost::Message as _;

use super::SpanRecord;

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn micros(t: SystemTime) -> u64 {
    nanos(t) / 1000
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

/// W3C trace flags: bit 0 sampled (every exported span is).
const SAMPLED_FLAG: u32 = 1;

fn otlp_span(s: &SpanRecord) -> Span {
    let end = s.start + s.duration;
    Span {
        trace_id: s.context.trace_id.to_be_bytes().to_vec(),
        span_id: s.context.span_id.to_be_bytes().to_vec(),
        parent_span_id: s
            .context
            .parent_span_id
            .map(|p| p.to_be_bytes().to_vec())
            .unwrap_or_default(),
        flags: SAMPLED_FLAG,
        name: s.name.clone(),
        kind: match s.kind {
            super::SpanKind::Client => span::SpanKind::Client as i32,
            super::SpanKind::Server => span::SpanKind::Server as i32,
        },
        start_time_unix_nano: nanos(s.start),
        end_time_unix_nano: nanos(end),
        attributes: s.tags.iter().map(|(k, v)| kv(k, v)).collect(),
        events: s
            .events
            .iter()
            .map(|e| span::Event {
                time_unix_nano: nanos(e.time),
                name: e.name.clone(),
                attributes: e.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
                ..Default::default()
            })
            .collect(),
        links: s
            .links
            .iter()
            .map(|(t, sp)| span::Link {
                trace_id: t.to_be_bytes().to_vec(),
                span_id: sp.to_be_bytes().to_vec(),
                flags: SAMPLED_FLAG,
                ..Default::default()
            })
            .collect(),
        status: Some(Status {
            code: if s.error {
                2 // STATUS_CODE_ERROR
            } else {
                0 // STATUS_CODE_UNSET, as Envoy leaves successful spans
            },
            message: String::new(),
        }),
        ..Default::default()
    }
}

/// An OTLP ExportTraceServiceRequest: one resource per source workload (`service.name`).
pub fn otlp_request(spans: &[SpanRecord]) -> ExportTraceServiceRequest {
    let mut by_service: BTreeMap<&str, Vec<Span>> = BTreeMap::new();
    for s in spans {
        by_service.entry(&s.service).or_default().push(otlp_span(s));
    }
    ExportTraceServiceRequest {
        resource_spans: by_service
            .into_iter()
            .map(|(service, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", service)],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "proxy-daemon".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

pub fn otlp_bytes(spans: &[SpanRecord]) -> Vec<u8> {
    otlp_request(spans).encode_to_vec()
}

/// A gRPC message frame: uncompressed flag, big-endian length, the message.
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Zipkin v2 JSON (`POST /api/v2/spans`).
pub fn zipkin_json(spans: &[SpanRecord]) -> Vec<u8> {
    let list: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut tags: serde_json::Map<String, serde_json::Value> = s
                .tags
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone().into()))
                .collect();
            if s.error {
                tags.insert("error".into(), "true".into());
            }
            let mut o = serde_json::json!({
                "traceId": s.context.trace_hex(),
                "id": format!("{:016x}", s.context.span_id),
                "name": s.name,
                "kind": zipkin_kind(s.kind),
                "timestamp": micros(s.start),
                // Zipkin rejects 0: a span shorter than a microsecond lasts one.
                "duration": (s.duration.as_micros() as u64).max(1),
                "localEndpoint": {"serviceName": s.service},
                "tags": tags,
                "shared": false,
            });
            if let Some(p) = s.context.parent_span_id {
                o["parentId"] = format!("{p:016x}").into();
            }
            if s.context.debug {
                o["debug"] = true.into();
            }
            if let Some(r) = s.remote {
                let ip = match r.ip() {
                    std::net::IpAddr::V4(v4) => ("ipv4", v4.to_string()),
                    std::net::IpAddr::V6(v6) => ("ipv6", v6.to_string()),
                };
                o["remoteEndpoint"] = serde_json::json!({ip.0: ip.1, "port": r.port()});
            }
            if !s.events.is_empty() {
                o["annotations"] = s
                    .events
                    .iter()
                    .map(|e| {
                        let detail: Vec<String> =
                            e.attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        serde_json::json!({
                            "timestamp": micros(e.time),
                            "value": if detail.is_empty() { e.name.clone() } else { format!("{} {}", e.name, detail.join(" ")) },
                        })
                    })
                    .collect();
            }
            o
        })
        .collect();
    serde_json::to_vec(&list).unwrap_or_default()
}

fn zipkin_kind(kind: super::SpanKind) -> &'static str {
    match kind {
        super::SpanKind::Client => "CLIENT",
        super::SpanKind::Server => "SERVER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::{context::Outgoing, SpanEvent};
    use std::time::Duration;

    fn span() -> SpanRecord {
        SpanRecord {
            kind: crate::spans::SpanKind::Client,
            context: Outgoing {
                trace_id: 0x0af7651916cd43dd8448eb211c80319c,
                span_id: 0xb7ad6b7169203331,
                parent_span_id: Some(0x00f067aa0ba902b7),
                sampled: true,
                debug: false,
                short_trace_id: false,
            },
            name: "reviews.default.svc.cluster.local:9080/*".into(),
            service: "productpage.default".into(),
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            duration: Duration::from_millis(12),
            tags: vec![("http.status_code", "200".into())],
            error: false,
            events: vec![SpanEvent {
                time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
                name: "upstream attempt".into(),
                attributes: vec![("attempt", "1".into())],
            }],
            links: vec![],
            remote: Some("10.0.0.7:9080".parse().unwrap()),
        }
    }

    #[test]
    fn otlp_round_trips_through_the_published_messages() {
        let bytes = otlp_bytes(&[span()]);
        let back = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let rs = &back.resource_spans[0];
        assert_eq!(
            rs.resource.as_ref().unwrap().attributes[0].key,
            "service.name"
        );
        let sp = &rs.scope_spans[0].spans[0];
        assert_eq!(sp.trace_id.len(), 16);
        assert_eq!(
            u64::from_be_bytes(sp.span_id.clone().try_into().unwrap()),
            0xb7ad6b7169203331
        );
        assert_eq!(sp.end_time_unix_nano - sp.start_time_unix_nano, 12_000_000);
        assert_eq!(sp.kind, span::SpanKind::Client as i32);
        assert_eq!(sp.events.len(), 1);
    }

    #[test]
    fn zipkin_json_has_v2_fields() {
        let v: serde_json::Value = serde_json::from_slice(&zipkin_json(&[span()])).unwrap();
        let s = &v[0];
        assert_eq!(s["traceId"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(s["id"], "b7ad6b7169203331");
        assert_eq!(s["parentId"], "00f067aa0ba902b7");
        assert_eq!(s["kind"], "CLIENT");
        assert_eq!(s["duration"], 12_000);
        assert_eq!(s["localEndpoint"]["serviceName"], "productpage.default");
        assert_eq!(s["remoteEndpoint"]["ipv4"], "10.0.0.7");
        assert_eq!(s["tags"]["http.status_code"], "200");
    }
}
