//! Micro-benchmark of what each request costs the node for telemetry: recording Istio's
//! request metrics (labels built as the data path builds them) and writing its JSON access
//! log line; plus the scrape size for 100 pods × 20 destinations. Not a test: it reports.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use proxy_daemon::{
    metrics::{
        DestinationLabels, IstioTcpLabels, Metrics, PeerLabels, RequestLabels, RequestRecord,
        SourceLabels,
    },
    proxy::{
        access_log,
        report::{request_fields, rfc3339, AccessLine},
    },
    state::workload::WorkloadInfo,
};
use tracing_subscriber::prelude::*;

fn workload(i: usize) -> WorkloadInfo {
    WorkloadInfo {
        pod_name: format!("app-{i}-7d9f8c6b5-x2x9z"),
        namespace: format!("team-{}", i % 10),
        uid: format!("uid-{i}"),
        workload: format!("app-{i}"),
        app: format!("app-{i}"),
        version: "v1".into(),
        canonical_service: format!("app-{i}"),
        canonical_revision: "v1".into(),
        labels: BTreeMap::new(),
        ip: None,
        service_account: "default".into(),
    }
}

fn destination(d: usize) -> (Arc<PeerLabels>, DestinationLabels) {
    let w = workload(1000 + d);
    (
        PeerLabels::of(&w),
        DestinationLabels {
            service: format!("svc-{d}.team-{}.svc.cluster.local", d % 10),
            service_name: format!("svc-{d}"),
            service_namespace: format!("team-{}", d % 10),
        },
    )
}

/// What the data path does per request: labels from the pod's and the destination's
/// shared halves, then one record.
fn record(
    m: &Metrics,
    src: &Arc<SourceLabels>,
    peer: &Arc<PeerLabels>,
    dest: &DestinationLabels,
    code: u16,
) {
    let mut base = IstioTcpLabels::new(src, peer, &Arc::new(dest.clone()), "");
    base.request_protocol = "http";
    m.http.record(RequestRecord {
        labels: RequestLabels {
            response_code: code,
            grpc_response_status: None,
            base,
        },
        duration: Duration::from_micros(850),
        request_bytes: 310,
        response_bytes: 1_460,
    });
}

fn per_request(threads: usize, n: usize, m: &Arc<Metrics>) -> f64 {
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let m = m.clone();
            s.spawn(move || {
                let src = SourceLabels::of(&workload(t));
                let (peer, dest) = destination(t);
                for _ in 0..n {
                    record(&m, &src, &peer, &dest, 200);
                }
            });
        }
    });
    started.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    // Recording cost: one thread, then two threads at once (each its own series, as two
    // cores serving two pods).
    let m = Arc::new(Metrics::new());
    per_request(1, 200_000, &m); // warm up
    let one = per_request(1, 2_000_000, &m);
    let two = per_request(2, 2_000_000, &m);

    // Access log: a JSON line to a sink, through the same tracing stack the daemon uses.
    let src = workload(1);
    let (peer, dest) = destination(3);
    let upstream: SocketAddr = "10.0.3.7:8080".parse().unwrap();
    let line = || AccessLine {
        start_time: SystemTime::now(),
        method: "GET",
        authority: "svc-3.team-3",
        path: "/api/v1/items?id=42",
        protocol: "HTTP/1.1",
        code: 200,
        flags: "",
        received: 310,
        sent: 1_460,
        duration: Duration::from_micros(850),
        upstream: Some(upstream),
        request_id: Some("6f1c8a5e-2b7d-4c8e-9a31-0d5e7f2a9b10"),
        source: &src,
        destination_service: &dest.service,
        peer: &peer,
    };
    // What log_request does when on: the filter check, the fields, one JSON line formatted
    // into a reused buffer and handed to the writer (a sink here: the cost is ours, not
    // the terminal's).
    let on_subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::sink),
        );
    let log_on = tracing::subscriber::with_default(on_subscriber, || {
        let n = 500_000;
        let mut buf = String::with_capacity(1024);
        let mut sink = std::io::sink();
        let started = Instant::now();
        for _ in 0..n {
            if access_log::enabled() {
                let l = line();
                let start = rfc3339(l.start_time);
                let up = l.upstream.map(|u| u.to_string());
                buf.clear();
                access_log::format(
                    access_log::LogFormat::Json,
                    SystemTime::now(),
                    "request",
                    &request_fields(&l, &start, up.as_deref()),
                    &mut buf,
                );
                std::io::Write::write_all(&mut sink, buf.as_bytes()).unwrap();
            }
        }
        started.elapsed().as_nanos() as f64 / n as f64
    });
    let off_subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info,access_log=off"))
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::sink),
        );
    let log_off = tracing::subscriber::with_default(off_subscriber, || {
        let n = 2_000_000;
        let mut hits = 0u64;
        let started = Instant::now();
        for _ in 0..n {
            hits += u64::from(access_log::enabled());
        }
        assert_eq!(hits, 0);
        started.elapsed().as_nanos() as f64 / n as f64
    });

    // Scrape size: 100 source pods (10 namespaces) × 20 destinations, one response code,
    // HTTP metrics and the four TCP metrics for the same pairs.
    let m = Metrics::new();
    let empty = m.encode().len();
    let dests: Vec<_> = (0..20).map(destination).collect();
    for s in 0..100 {
        let src = SourceLabels::of(&workload(s));
        for (peer, dest) in &dests {
            record(&m, &src, peer, dest, 200);
        }
    }
    let http = m.encode();
    for s in 0..100 {
        let src = SourceLabels::of(&workload(s));
        for (peer, dest) in &dests {
            let l = IstioTcpLabels::new(&src, peer, &Arc::new(dest.clone()), "");
            m.tcp.open(&l);
            m.tcp.close(&l);
            m.tcp.sent_bytes.get_or_create(&l).inc_by(100);
            m.tcp.received_bytes.get_or_create(&l).inc_by(100);
        }
    }
    let both = m.encode();
    let started = Instant::now();
    let again = m.encode();
    let encode_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, again.as_bytes()).unwrap();
    let gzipped = gz.finish().unwrap().len();
    let gzip_ms = started.elapsed().as_secs_f64() * 1e3;

    println!("telemetry cost per request (release build, this machine)");
    println!(
        "  metrics record (istio_requests_total + 3 histograms), 1 thread:  {one:.0} ns/request"
    );
    println!("  metrics record, 2 threads at once:                               {two:.0} ns/request per thread");
    println!(
        "  access log JSON line (to a sink), on:                            {log_on:.0} ns/request"
    );
    println!("  access log switched off (access_log=off):                        {log_off:.1} ns/request");
    println!(
        "  metrics + access log:                                            {:.0} ns/request",
        one + log_on
    );
    println!("scrape size, 100 pods x 20 destinations (2,000 pairs, one response code)");
    println!(
        "  HTTP metrics only: {:.1} MiB, {} lines; with TCP metrics: {:.1} MiB, {} lines (empty registry {} B); encoding took {encode_ms:.0} ms",
        (http.len() - empty) as f64 / 1048576.0,
        http.lines().count(),
        (both.len() - empty) as f64 / 1048576.0,
        both.lines().count(),
        empty,
    );
    println!(
        "  gzip (what Prometheus asks for): {:.1} MiB on the wire, compressed in {gzip_ms:.0} ms",
        gzipped as f64 / 1048576.0
    );
}
