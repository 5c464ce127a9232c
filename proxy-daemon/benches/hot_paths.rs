//! Criterion benches of the request path's hot pieces, in process (no sockets):
//! the route decision with 1,000 services × 5 routes configured, protocol sniffing, one
//! Istio request metric recorded, and one access-log line formatted.
//! `cargo bench -p proxy-daemon --bench hot_paths`.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, SystemTime},
};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use proxy_common::FailMode;
use proxy_daemon::{
    config::local,
    metrics::{DestinationLabels, IstioTcpLabels, Metrics, RequestLabels, RequestRecord},
    proxy::{
        access_log::{self, LogFormat},
        dns::DnsCache,
        http_route::{self, RequestView},
        sniff, Endpoints, OutboundPolicy,
    },
    state::{
        self,
        workload::{PeerLabels, SourceLabels},
        CaptureSettings,
    },
};

/// 1,000 ServiceEntries (one address each) with five-rule VirtualServices, and the pod.
fn mesh(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodeproxy.io/capture: enabled}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, uid: u-web-0, labels: {app: web, version: v1}}\nstatus: {podIP: 10.0.0.5}\n",
    );
    for i in 0..n {
        let (a, b) = (10 + i / 250, 1 + i % 250);
        y.push_str(&format!(
            "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc-{i}, namespace: shop}}
spec:
  hosts: [svc-{i}.bench]
  addresses: [198.18.{a}.{b}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 198.18.0.2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc-{i}, namespace: shop}}
spec:
  hosts: [svc-{i}.bench]
  http:
  - match: [{{uri: {{prefix: /v1/{i}/}}}}]
    route: [{{destination: {{host: svc-{i}.bench}}}}]
  - match: [{{headers: {{x-tenant: {{exact: t{i}}}}}}}]
    route: [{{destination: {{host: svc-{i}.bench}}}}]
  - match: [{{method: {{exact: POST}}, uri: {{exact: /submit}}}}]
    route: [{{destination: {{host: svc-{i}.bench}}}}]
  - match: [{{uri: {{regex: '/items/[0-9]+/{i}'}}}}]
    route: [{{destination: {{host: svc-{i}.bench}}}}]
  - route: [{{destination: {{host: svc-{i}.bench}}}}]
"
        ));
    }
    y
}

fn snapshot(n: usize) -> state::Snapshot {
    let yaml = mesh(n);
    let docs = local::split_documents(std::path::Path::new("bench.yaml"), &yaml);
    let objects: Vec<_> = docs
        .iter()
        .filter_map(|d| local::parse_document(d, "default").expect("valid YAML"))
        .collect();
    let settings = CaptureSettings {
        label_key: state::CAPTURE_LABEL_KEY.into(),
        label_value: "enabled".into(),
        node_name: "bench-node".into(),
        default_fail_mode: FailMode::Open,
        default_export_to: Vec::new(),
        trust_domain: "cluster.local".into(),
    };
    state::compile(&objects, &settings, 1).unwrap_or_else(|e| panic!("{} errors", e.len()))
}

/// The one captured pod of [`mesh`].
fn captured_pod(snap: &state::Snapshot) -> Arc<proxy_daemon::state::workload::WorkloadInfo> {
    snap.pods
        .values()
        .next()
        .map(|p| p.workload.clone())
        .expect("the pod is captured")
}

fn route_decision(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let snap = snapshot(1000);
    let workload = captured_pod(&snap);
    let dns =
        Arc::new(DnsCache::new(&[SocketAddr::from((Ipv4Addr::LOCALHOST, 9))], None).expect("dns"));
    let endpoints = Endpoints::new(dns);
    let scope = SourceLabels::of(&workload);
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tenant", http::HeaderValue::from_static("t999"));
    headers.insert("user-agent", http::HeaderValue::from_static("bench/1"));
    // The last service, matched by its second rule (a header), after a prefix miss.
    let req = RequestView {
        method: "GET",
        path: "/catalog/items",
        query: None,
        authority: "svc-999.bench",
        headers: &headers,
        dst: SocketAddrV4::new(Ipv4Addr::new(198, 18, 13, 250), 80),
        avoid: &[],
        scope: &scope,
    };
    c.bench_function("route decision, 1,000 services x 5 routes", |b| {
        b.iter(|| {
            black_box(http_route::decide(
                &snap,
                &endpoints,
                &workload,
                black_box(&req),
                OutboundPolicy::AllowAny,
                7,
            ))
        })
    });
}

fn sniffing(c: &mut Criterion) {
    let http1 = b"GET /api/v1/items?id=7 HTTP/1.1\r\nHost: svc.bench\r\nUser-Agent: x\r\n\r\n";
    let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let tls = [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let opaque = b"\x00\x00\x00\x2a\x00\x00\x00\x01binary-protocol";
    c.bench_function("sniff: HTTP/1, h2, TLS, opaque first bytes", |b| {
        b.iter(|| {
            black_box(sniff::classify(black_box(http1)));
            black_box(sniff::classify(black_box(h2)));
            black_box(sniff::classify(black_box(&tls)));
            black_box(sniff::classify(black_box(opaque)));
        })
    });
}

fn metric_record(c: &mut Criterion) {
    let snap = snapshot(1);
    let workload = captured_pod(&snap);
    let metrics = Metrics::new();
    let source = SourceLabels::of(&workload);
    let peer = PeerLabels::of(&workload);
    let dest = Arc::new(DestinationLabels {
        service: "svc-1.bench".into(),
        service_name: "svc-1.bench".into(),
        service_namespace: "shop".into(),
    });
    c.bench_function(
        "metric: one istio request recorded (existing series)",
        |b| {
            b.iter(|| {
                let mut base = IstioTcpLabels::new(&source, &peer, &dest, "-");
                base.request_protocol = "http";
                metrics.http.record(RequestRecord {
                    labels: RequestLabels {
                        response_code: 200,
                        grpc_response_status: None,
                        base,
                    },
                    duration: Duration::from_micros(350),
                    request_bytes: 120,
                    response_bytes: 1100,
                })
            })
        },
    );
}

fn access_log_line(c: &mut Criterion) {
    use access_log::Value::{Str, U64};
    let fields: Vec<(&str, access_log::Value)> = vec![
        ("method", Str("GET")),
        ("path", Str("/api/v1/items?id=7")),
        ("protocol", Str("HTTP/1.1")),
        ("response_code", U64(200)),
        ("response_flags", Str("-")),
        ("bytes_received", U64(0)),
        ("bytes_sent", U64(1024)),
        ("duration", U64(3)),
        ("upstream_host", Str("198.18.0.2:80")),
        ("authority", Str("svc-1.bench")),
        ("request_id", Str("3f1c9a2e-8d57-4d5b-9a3e-0c3f4b1a2d7e")),
        ("source_workload", Str("web")),
        ("destination_service", Str("svc-1.bench")),
    ];
    let mut out = String::with_capacity(1024);
    for (name, format) in [("json", LogFormat::Json), ("text", LogFormat::Text)] {
        c.bench_function(&format!("access log line ({name})"), |b| {
            b.iter(|| {
                out.clear();
                access_log::format(
                    format,
                    SystemTime::UNIX_EPOCH,
                    "request",
                    black_box(&fields),
                    &mut out,
                );
                black_box(out.len())
            })
        });
    }
}

criterion_group!(
    benches,
    route_decision,
    sniffing,
    metric_record,
    access_log_line
);
criterion_main!(benches);
