//! Distributed tracing end to end: a pod calls A, A's app (a real process in its pod)
//! forwards the trace headers to B, and the test's collectors (OTLP over HTTP and gRPC,
//! decoded with the published OpenTelemetry protobuf messages, and Zipkin v2) receive
//! exactly the spans Istio's sidecars would have sent.
use std::time::Duration;

use proxy_tests::{
    collector::{Collector, ReceivedSpan, Wire},
    daemon::Daemon,
    node::{endpoint_pod_yaml, namespace_yaml, pod_yaml, Node},
    servers::{HttpEcho, Servers},
    wait_for, Pod,
};

/// B's answer is this slow: each span must contain it.
const BACKEND_DELAY: Duration = Duration::from_millis(60);

struct Scene {
    node: Node,
    servers: Servers,
    _app: proxy_tests::KillOnDrop,
    web: Pod,
    api: Pod,
    daemon: Daemon,
}

/// web (azar) → api (azar, a real app forwarding trace headers) → backend (shop, 60 ms).
fn scene(tag: &str, extra: &[&str], azar_annotations: &str) -> Scene {
    let mut node = Node::new(tag);
    let servers = Servers::new();
    let backend = node.host("backend");
    servers.http_echo(
        &backend,
        80,
        HttpEcho {
            name: "backend".into(),
            delay: BACKEND_DELAY,
            ..Default::default()
        },
    );
    let web = node.pod("azar", "web-0");
    let api = node.pod("azar", "api-0");
    let azar = namespace_yaml("azar", true, None).replace(
        "  name: azar\n",
        &format!("  name: azar\n{azar_annotations}"),
    );
    let yaml = azar
        + &namespace_yaml("shop", false, None)
        + &pod_yaml(&web, &[("app", "web"), ("version", "v1")])
        + &pod_yaml(&api, &[("app", "api"), ("version", "v2")])
        + &endpoint_pod_yaml(&backend, "backend-0", "shop", &[("app", "backend")])
        + "apiVersion: v1
kind: Service
metadata: {name: api, namespace: azar}
spec:
  clusterIP: 198.18.0.230
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  clusterIP: 198.18.0.231
  selector: {app: backend}
  ports: [{name: http, port: 80}]
";
    node.write_config("cluster.yaml", &yaml);
    let daemon = Daemon::start(&node, extra);
    for p in [&web, &api] {
        daemon.wait_enrolled(&p.uid, Duration::from_secs(5));
    }
    let app = proxy_tests::KillOnDrop(api.spawn_app(&[
        "serve",
        "--port",
        "8080",
        "--name",
        "api",
        "--onward",
        "198.18.0.231:80",
        "--onward-host",
        "backend.shop",
    ]));
    wait_for(Duration::from_secs(5), || {
        let out = web.pdtool(&[
            "http",
            "--to",
            "198.18.0.230:80",
            "--host",
            "api",
            "-H",
            "b3: 0",
        ]);
        (out["statuses"]["200"] == 1 && out["first"]["body"]["onward"]["status"] == 200)
            .then_some(())
    })
    .expect("the api app answers through both hops");
    Scene {
        node,
        servers,
        _app: app,
        web,
        api,
        daemon,
    }
}

/// One call from web to api with extra headers; the JSON pdtool prints.
fn call(web: &Pod, headers: &[&str]) -> serde_json::Value {
    let mut args = vec!["http", "--to", "198.18.0.230:80", "--host", "api"];
    for h in headers {
        args.extend(["-H", h]);
    }
    let out = web.pdtool(&args);
    assert_eq!(out["statuses"]["200"], 1, "{out}");
    out
}

/// Waits until `collector` holds `n` spans of the trace.
fn spans_of(collector: &Collector, trace_id: &str, n: usize) -> Vec<ReceivedSpan> {
    wait_for(Duration::from_secs(5), || {
        let t = collector.trace(trace_id);
        (t.len() >= n).then_some(t)
    })
    .unwrap_or_else(|| {
        panic!(
            "{:?} collector: {n} spans of trace {trace_id} expected, got {:#?}",
            collector.wire,
            collector.trace(trace_id)
        )
    })
}

/// The trace id the api app received (from whichever format it came in).
fn received_trace_id(out: &serde_json::Value) -> String {
    let h = &out["first"]["body"]["trace_headers"];
    if let Some(tp) = h["traceparent"].as_str() {
        return tp.split('-').nth(1).unwrap_or_default().to_string();
    }
    if let Some(t) = h["x-b3-traceid"].as_str() {
        return t.to_string();
    }
    h["b3"]
        .as_str()
        .and_then(|b| b.split('-').next())
        .unwrap_or_default()
        .to_string()
}

/// Both hops as Istio's sidecars show them: web's client span to api is the root; api's
/// proxy's server span (the destination side) its child; api's client span to backend
/// the server span's child (the app forwards the context its proxy handed it). Names,
/// services, kinds, tags and durations.
fn assert_two_hop_tree(spans: &[ReceivedSpan], out: &serde_json::Value, scene: &Scene) {
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let root = spans
        .iter()
        .find(|s| s.service == "web.azar")
        .unwrap_or_else(|| panic!("web's span: {spans:#?}"));
    let server = spans
        .iter()
        .find(|s| s.service == "api.azar" && s.kind == "SERVER")
        .unwrap_or_else(|| panic!("api's server span: {spans:#?}"));
    let child = spans
        .iter()
        .find(|s| s.service == "api.azar" && s.kind == "CLIENT")
        .unwrap_or_else(|| panic!("api's client span: {spans:#?}"));
    assert_eq!(root.name, "api.azar.svc.cluster.local:80/*");
    assert_eq!(server.name, "api.azar.svc.cluster.local:8080/*");
    assert_eq!(child.name, "backend.shop.svc.cluster.local:80/*");
    assert_eq!(root.parent_id, None, "web sent no context: a new trace");
    assert_eq!(
        server.parent_id.as_deref(),
        Some(root.span_id.as_str()),
        "api's proxy continues web's trace: {spans:#?}"
    );
    assert_eq!(
        child.parent_id.as_deref(),
        Some(server.span_id.as_str()),
        "api's call is a child of the request it serves: {spans:#?}"
    );
    for s in [root, server, child] {
        assert_eq!(s.tag("component"), "proxy");
        assert_eq!(s.tag("http.method"), "GET");
        assert_eq!(s.tag("http.status_code"), "200");
        assert_eq!(s.tag("response_flags"), "-");
        assert_eq!(s.tag("istio.namespace"), "azar");
        assert!(!s.error);
        assert!(
            s.duration_us >= BACKEND_DELAY.as_micros() as u64,
            "{} lasted {} µs, less than the backend's delay",
            s.name,
            s.duration_us
        );
    }
    assert_eq!(root.kind, "CLIENT");
    assert_eq!(child.kind, "CLIENT");
    assert_eq!(root.tag("istio.canonical_service"), "web");
    assert_eq!(server.tag("istio.canonical_service"), "api");
    assert_eq!(child.tag("istio.canonical_service"), "api");
    assert_eq!(
        root.tag("upstream_cluster"),
        "outbound|80||api.azar.svc.cluster.local"
    );
    assert_eq!(server.tag("upstream_cluster"), "inbound|8080||");
    assert_eq!(
        child.tag("upstream_cluster"),
        "outbound|80||backend.shop.svc.cluster.local"
    );
    assert_eq!(root.tag("http.url"), "http://api/");
    assert_eq!(root.tag("peer.address"), scene.web.host.ip.to_string());
    assert_eq!(server.tag("peer.address"), scene.web.host.ip.to_string());
    assert_eq!(
        server.tag("source_principal"),
        "spiffe://cluster.local/ns/azar/sa/default"
    );
    assert_eq!(child.tag("peer.address"), scene.api.host.ip.to_string());
    assert_eq!(
        root.tag("guid:x-request-id"),
        out["first"]["body"]["request_id"].as_str().unwrap(),
        "the span carries the request id the app saw"
    );
    assert_eq!(
        root.tag("guid:x-request-id"),
        child.tag("guid:x-request-id")
    );
    // Each contains the next: it starts first and ends last.
    for (outer, inner) in [(root, server), (server, child)] {
        assert!(outer.start_us <= inner.start_us, "{outer:?} {inner:?}");
        assert!(
            outer.start_us + outer.duration_us >= inner.start_us + inner.duration_us,
            "{outer:?} {inner:?}"
        );
    }
    assert!(
        root.events
            .iter()
            .any(|e| e.starts_with("upstream attempt")),
        "{root:?}"
    );
}

#[test]
fn a_request_across_two_hops_is_one_trace_in_otlp_and_zipkin() {
    let otlp = Collector::start(Wire::OtlpHttp, Duration::ZERO);
    let zipkin = Collector::start(Wire::Zipkin, Duration::ZERO);
    let scene = scene(
        "trace2hop",
        &[
            "--trace-sampling",
            "100",
            "--otlp-endpoint",
            &otlp.url(),
            "--zipkin-endpoint",
            &zipkin.url(),
        ],
        "",
    );
    let out = call(&scene.web, &[]);
    let trace = received_trace_id(&out);
    assert_eq!(trace.len(), 32, "{out}");
    // The app got our span as its parent, in both formats (a request with none gets both).
    let h = &out["first"]["body"]["trace_headers"];
    assert_eq!(h["x-b3-traceid"], trace, "{out}");
    assert_eq!(h["x-b3-sampled"], "1", "{out}");
    let spans = spans_of(&otlp, &trace, 3);
    assert_two_hop_tree(&spans, &out, &scene);
    let server = spans
        .iter()
        .find(|s| s.service == "api.azar" && s.kind == "SERVER")
        .unwrap();
    assert_eq!(
        h["x-b3-spanid"].as_str(),
        Some(server.span_id.as_str()),
        "the app's parent is its proxy's server span"
    );
    assert!(h["traceparent"]
        .as_str()
        .unwrap()
        .contains(&format!("-{}-01", server.span_id)));
    // Zipkin receives the same three spans.
    let zspans = spans_of(&zipkin, &trace, 3);
    assert_two_hop_tree(&zspans, &out, &scene);
    let mut ids: Vec<_> = spans.iter().map(|s| s.span_id.clone()).collect();
    let mut zids: Vec<_> = zspans.iter().map(|s| s.span_id.clone()).collect();
    ids.sort();
    zids.sort();
    assert_eq!(ids, zids);
    // The warm-up call said b3: 0: not one span of it anywhere.
    assert_eq!(otlp.spans().len(), 3, "{:#?}", otlp.spans());
    // Counters and /config_dump.
    let d = &scene.daemon;
    wait_for(Duration::from_secs(3), || {
        (d.metric_sum(
            "proxy_daemon_spans_exported_total",
            &[("protocol", "otlp_http")],
        ) >= 3.0
            && d.metric_sum(
                "proxy_daemon_spans_exported_total",
                &[("protocol", "zipkin")],
            ) >= 3.0)
            .then_some(())
    })
    .expect("exports counted");
    let dump = d.config_dump();
    assert_eq!(
        dump["tracing"]["settings"]["sampling"], 100.0,
        "{}",
        dump["tracing"]
    );
    assert!(dump["tracing"]["spans"]["exported"].as_u64().unwrap() >= 6);
}

#[test]
fn sampling_zero_forced_traces_and_upstream_decisions_in_every_format() {
    let otlp = Collector::start(Wire::OtlpGrpc, Duration::ZERO);
    let scene = scene(
        "tracedecide",
        &["--trace-sampling", "0", "--otlp-endpoint", &otlp.url()],
        "",
    );
    let web = &scene.web;
    // 0 %: nothing recorded, but the context still travels (sampled = 0) so that the
    // next hop makes the same decision.
    for _ in 0..20 {
        let out = call(web, &[]);
        assert_eq!(
            out["first"]["body"]["trace_headers"]["x-b3-sampled"], "0",
            "{out}"
        );
        assert!(out["first"]["body"]["trace_headers"]["traceparent"]
            .as_str()
            .unwrap()
            .ends_with("-00"));
    }
    // A forced trace under 0 %: both hops recorded.
    let out = call(web, &["x-envoy-force-trace: true"]);
    let spans = spans_of(&otlp, &received_trace_id(&out), 3);
    assert_two_hop_tree(&spans, &out, &scene);

    // An upstream decision to sample, in each format: recorded, the caller's trace id and
    // span kept, and the app answered in the caller's own format only.
    let parent = "00f067aa0ba902b7";
    let cases = [
        (
            "w3c",
            vec![
                "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
            ],
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ),
        (
            "b3 multi",
            vec![
                "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7".to_string(),
                format!("x-b3-spanid: {parent}"),
                "x-b3-sampled: 1".to_string(),
            ],
            "80f198ee56343ba864fe8b2a57d3eff7",
        ),
        (
            "b3 single",
            vec![format!("b3: a3ce929d0e0e4736a3ce929d0e0e4736-{parent}-1")],
            "a3ce929d0e0e4736a3ce929d0e0e4736",
        ),
        (
            "b3 64-bit",
            vec![
                "x-b3-traceid: 0000000000000000a3ce929d0e0e4737".to_string(),
                format!("x-b3-spanid: {parent}"),
                "x-b3-sampled: 1".to_string(),
            ],
            "0000000000000000a3ce929d0e0e4737",
        ),
    ];
    for (format, headers, trace) in cases {
        let hs: Vec<&str> = headers.iter().map(String::as_str).collect();
        let out = call(web, &hs);
        let got = &out["first"]["body"]["trace_headers"];
        assert_eq!(received_trace_id(&out), trace, "{format}: {out}");
        match format {
            "w3c" => assert!(
                got.get("x-b3-traceid").is_none() && got.get("b3").is_none(),
                "{format}: {got}"
            ),
            "b3 single" => assert!(
                got.get("traceparent").is_none() && got.get("x-b3-traceid").is_none(),
                "{format}: {got}"
            ),
            _ => assert!(
                got.get("traceparent").is_none() && got.get("b3").is_none(),
                "{format}: {got}"
            ),
        }
        let spans = spans_of(&otlp, trace, 3);
        let root = spans.iter().find(|s| s.service == "web.azar").unwrap();
        assert_eq!(
            root.parent_id.as_deref(),
            Some(parent),
            "{format}: the caller's span is the parent"
        );
        let server = spans
            .iter()
            .find(|s| s.service == "api.azar" && s.kind == "SERVER")
            .unwrap();
        assert_eq!(
            server.parent_id.as_deref(),
            Some(root.span_id.as_str()),
            "{format}"
        );
    }
    // An upstream decision not to sample wins over a namespace-wide 100 % too (below),
    // and malformed headers start a new trace without failing the request.
    let before = scene
        .daemon
        .metric_sum("proxy_daemon_trace_context_invalid_total", &[]);
    for bad in [
        "traceparent: 00-zz-zz-01",
        "b3: nonsense",
        "x-b3-traceid: 123",
    ] {
        let out = call(web, &[bad]);
        assert_eq!(
            received_trace_id(&out).len(),
            32,
            "{bad}: a fresh trace id: {out}"
        );
    }
    assert!(
        scene
            .daemon
            .metric_sum("proxy_daemon_trace_context_invalid_total", &[])
            >= before + 3.0
    );
    // No other spans than the five traces above (3 spans each).
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(otlp.spans().len(), 15, "{:#?}", otlp.spans());
}

#[test]
fn a_namespace_annotation_overrides_the_node_sampling() {
    let otlp = Collector::start(Wire::OtlpHttp, Duration::ZERO);
    let scene = scene(
        "tracens",
        &["--trace-sampling", "0", "--otlp-endpoint", &otlp.url()],
        "  annotations:\n    nodeproxy.io/trace-sampling: \"100\"\n",
    );
    let out = call(&scene.web, &[]);
    let spans = spans_of(&otlp, &received_trace_id(&out), 3);
    assert_two_hop_tree(&spans, &out, &scene);
    // A caller's "no" still wins over the namespace's 100 %.
    otlp.clear();
    call(&scene.web, &["x-b3-sampled: 0"]);
    std::thread::sleep(Duration::from_millis(800));
    assert!(otlp.spans().is_empty(), "{:#?}", otlp.spans());
}

/// Latencies of `rounds` interleaved rounds of sampled and unsampled calls (µs, p99 of
/// each kind), so that both see the same machine.
fn interleaved_p99(web: &Pod, rounds: usize, per_round: usize) -> (f64, f64, u64) {
    let (mut sampled, mut unsampled) = (Vec::new(), Vec::new());
    let mut ok = 0u64;
    for _ in 0..rounds {
        for (force, into) in [(true, &mut sampled), (false, &mut unsampled)] {
            let n = per_round.to_string();
            let mut args = vec![
                "http",
                "--to",
                "198.18.0.230:80",
                "--host",
                "api",
                "--count",
                &n,
            ];
            if !force {
                args.extend(["-H", "x-b3-sampled: 0"]);
            }
            let out = web.pdtool(&args);
            ok += out["statuses"]["200"].as_u64().unwrap_or(0);
            into.push(out["p99_us"].as_f64().unwrap_or(f64::MAX));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(&mut sampled), median(&mut unsampled), ok)
}

#[test]
fn a_dead_or_slow_collector_costs_spans_not_requests() {
    // The OTLP collector answers after 5 s (longer than the export timeout); nothing
    // listens at the Zipkin address.
    let slow = Collector::start(Wire::OtlpHttp, Duration::from_secs(5));
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let scene = scene(
        "tracedown",
        &[
            "--trace-sampling",
            "100",
            "--otlp-endpoint",
            &slow.url(),
            "--zipkin-endpoint",
            &format!("http://{dead}/api/v2/spans"),
        ],
        "",
    );
    let (sampled_p99, unsampled_p99, ok) = interleaved_p99(&scene.web, 5, 40);
    assert_eq!(ok, 400, "every request answered");
    eprintln!("p99 sampled {sampled_p99:.0} µs, unsampled {unsampled_p99:.0} µs");
    // Both go through the backend's 60 ms; the exporter's trouble must not show. (Slack
    // for a shared 2-core machine: 20 ms.)
    assert!(
        sampled_p99 <= unsampled_p99 + 20_000.0,
        "sampled p99 {sampled_p99} µs vs unsampled {unsampled_p99} µs"
    );
    let d = &scene.daemon;
    let dropped =
        |reason: &str| d.metric_sum("proxy_daemon_spans_dropped_total", &[("reason", reason)]);
    wait_for(Duration::from_secs(10), || {
        (dropped("export_failed") >= 1.0 && dropped("timeout") >= 1.0).then_some(())
    })
    .unwrap_or_else(|| panic!("drops counted: {}", d.metrics_text()));
    assert!(slow.requests() >= 1, "the slow collector was tried");
    assert!(
        d.log_text().contains("span export failed"),
        "said once in the log"
    );
}

/// Istio's mesh config as an installation keeps it (ConfigMap istio-system/istio).
fn mesh_config(mesh: &str) -> String {
    let indented: String = mesh.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: istio-system\ndata:\n  mesh: |\n{indented}"
    )
}

fn wait_tracing(d: &Daemon, sampling: f64, source_prefix: &str) {
    wait_for(Duration::from_secs(5), || {
        let t = d.config_dump()["tracing"]["settings"].clone();
        (t["sampling"].as_f64() == Some(sampling)
            && t["source"]
                .as_str()
                .unwrap_or("")
                .starts_with(source_prefix))
        .then_some(())
    })
    .unwrap_or_else(|| panic!("tracing settings: {}", d.config_dump()["tracing"]));
}

#[test]
fn the_mesh_config_changes_sampling_and_collectors_on_reload() {
    let flags_collector = Collector::start(Wire::OtlpHttp, Duration::ZERO);
    let mesh_collector = Collector::start(Wire::OtlpGrpc, Duration::ZERO);
    let scene = scene(
        "tracemesh",
        &[
            "--trace-sampling",
            "0",
            "--otlp-endpoint",
            &flags_collector.url(),
        ],
        "",
    );
    let (d, web) = (&scene.daemon, &scene.web);
    call(web, &[]);
    // Istio's own shape: a provider named in defaultProviders, a sampling percentage.
    let node = &scene.node;
    let mesh = format!(
        "defaultConfig:\n  tracing:\n    sampling: 100\nextensionProviders:\n- name: otel\n  opentelemetry:\n    service: 127.0.0.1\n    port: {}\ndefaultProviders:\n  tracing: [otel]\n",
        mesh_collector.addr.port()
    );
    node.write_config("mesh.yaml", &mesh_config(&mesh));
    wait_tracing(d, 100.0, "ConfigMap istio-system/istio");
    let out = call(web, &[]);
    let spans = spans_of(&mesh_collector, &received_trace_id(&out), 3);
    assert_two_hop_tree(&spans, &out, &scene);
    // A bad edit is rejected and the last good settings keep working.
    node.write_config(
        "mesh.yaml",
        &mesh_config("defaultConfig:\n  tracing:\n    sampling: 150\n"),
    );
    wait_for(Duration::from_secs(5), || {
        d.log_text().contains("sampling 150").then_some(())
    })
    .unwrap_or_else(|| panic!("the rejection is logged: {}", d.log_text()));
    let out = call(web, &[]);
    spans_of(&mesh_collector, &received_trace_id(&out), 3);
    // Without the mesh config, the flags again: 0 %, nothing recorded anywhere.
    node.remove_config("mesh.yaml");
    wait_tracing(d, 0.0, "flags");
    mesh_collector.clear();
    for _ in 0..10 {
        call(web, &[]);
    }
    std::thread::sleep(Duration::from_millis(800));
    assert!(mesh_collector.spans().is_empty() && flags_collector.spans().is_empty());
}

#[test]
fn grpc_calls_retries_and_mirror_copies_show_in_the_trace() {
    let otlp = Collector::start(Wire::OtlpHttp, Duration::ZERO);
    let mut scene = scene(
        "traceextra",
        &["--trace-sampling", "100", "--otlp-endpoint", &otlp.url()],
        "",
    );
    let grpc = scene.node.host("grpc");
    let flaky = scene.node.host("flaky");
    let shadow = scene.node.host("shadow");
    let grpc_log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    scene
        .servers
        .h2c_echo_logged(&grpc, 50051, "grpc", Some(grpc_log.clone()));
    // Every 2nd request answered 503: Istio's default retry policy retries it.
    scene.servers.http_echo(
        &flaky,
        80,
        HttpEcho {
            name: "flaky".into(),
            fail_every: 2,
            ..Default::default()
        },
    );
    scene.servers.http_echo(
        &shadow,
        80,
        HttpEcho {
            name: "shadow".into(),
            ..Default::default()
        },
    );
    let svc = |name: &str, ip: &str, port: &str, port_name: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  clusterIP: {ip}\n  selector: {{app: {name}}}\n  ports: [{{name: {port_name}, port: {port}}}]\n---\n")
    };
    scene.node.write_config(
        "extra.yaml",
        &(endpoint_pod_yaml(&grpc, "grpc-0", "shop", &[("app", "grpc")])
            + &endpoint_pod_yaml(&flaky, "flaky-0", "shop", &[("app", "flaky")])
            + &endpoint_pod_yaml(&shadow, "shadow-0", "shop", &[("app", "shadow")])
            + &svc("grpc", "198.18.0.233", "50051", "grpc")
            + &svc("flaky", "198.18.0.232", "80", "http")
            + &svc("shadow", "198.18.0.234", "80", "http")
            + "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: flaky, namespace: shop}
spec:
  hosts: [flaky.shop.svc.cluster.local]
  http:
  - route: [{destination: {host: flaky.shop.svc.cluster.local}}]
    mirror: {host: shadow.shop.svc.cluster.local}
    mirrorPercentage: {value: 100}
"),
    );
    let web = &scene.web;
    wait_for(Duration::from_secs(5), || {
        let out = web.pdtool(&[
            "http",
            "--to",
            "198.18.0.234:80",
            "--host",
            "shadow.shop",
            "-H",
            "b3: 0",
        ]);
        (out["statuses"]["200"] == 1).then_some(())
    })
    .expect("the new services are known");

    // gRPC over h2: a span per call, the context reaches the server.
    let out = web.pdtool(&[
        "h2",
        "--to",
        "198.18.0.233:50051",
        "--authority",
        "grpc.shop:50051",
        "--path",
        "/shop.Catalog/List",
        "-H",
        "content-type: application/grpc",
    ]);
    assert_eq!(out["statuses"]["200"], 1, "{out}");
    let span = wait_for(Duration::from_secs(5), || {
        otlp.spans()
            .into_iter()
            .find(|s| s.name == "grpc.shop.svc.cluster.local:50051/*")
    })
    .unwrap_or_else(|| panic!("a gRPC span: {:#?}", otlp.spans()));
    assert_eq!(span.tag("http.protocol"), "HTTP/2");
    assert_eq!(span.tag("grpc.status_code"), "0");
    assert_eq!(
        span.tag("http.url"),
        "http://grpc.shop:50051/shop.Catalog/List"
    );
    let seen = grpc_log.lock().unwrap().clone();
    let tp = seen
        .iter()
        .find_map(|r| r["headers"]["traceparent"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("the gRPC server got a traceparent: {seen:?}"));
    assert_eq!(tp, format!("00-{}-{}-01", span.trace_id, span.span_id));

    // A retried request: one span, one event per attempt.
    otlp.clear();
    let out = web.pdtool(&[
        "http",
        "--to",
        "198.18.0.232:80",
        "--host",
        "flaky.shop",
        "--count",
        "2",
    ]);
    assert_eq!(out["statuses"]["200"], 2, "the 503 was retried: {out}");
    let primaries = wait_for(Duration::from_secs(5), || {
        let p: Vec<ReceivedSpan> = otlp
            .spans()
            .into_iter()
            .filter(|s| s.name == "flaky.shop.svc.cluster.local:80/*")
            .collect();
        (p.len() == 2).then_some(p)
    })
    .unwrap_or_else(|| panic!("two flaky spans: {:#?}", otlp.spans()));
    let mut attempts: Vec<usize> = primaries
        .iter()
        .map(|s| s.events.iter().filter(|e| *e == "upstream attempt").count())
        .collect();
    attempts.sort();
    assert_eq!(attempts, [1, 2], "{primaries:#?}");
    // Each mirror copy: its own span, child of (and linked to) its primary, same trace.
    let copies = wait_for(Duration::from_secs(5), || {
        let c: Vec<ReceivedSpan> = otlp
            .spans()
            .into_iter()
            .filter(|s| s.tag("mirror") == "true")
            .collect();
        (c.len() == 2).then_some(c)
    })
    .unwrap_or_else(|| panic!("two mirror spans: {:#?}", otlp.spans()));
    for c in &copies {
        assert_eq!(c.name, "shadow.shop.svc.cluster.local:80/*");
        let primary = primaries
            .iter()
            .find(|p| Some(&p.span_id) == c.parent_id.as_ref())
            .unwrap_or_else(|| panic!("a primary parents {c:#?}: {primaries:#?}"));
        assert_eq!(c.trace_id, primary.trace_id);
        assert_eq!(
            c.links,
            [(primary.trace_id.clone(), primary.span_id.clone())]
        );
    }
}
