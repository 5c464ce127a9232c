//! Observability: Istio's standard metrics with Istio's exact label sets (checked against
//! the list Istio documents, not against our code), counts equal to what was sent,
//! buckets, flags, promtool, the access log, and series of deleted pods ageing out.
use std::{collections::BTreeSet, time::Duration};

use proxy_tests::{
    daemon::Daemon,
    node::{endpoint_pod_yaml, namespace_yaml, Node},
    servers::{HttpEcho, Servers},
    wait_for, Pod,
};

/// Istio's standard request metric labels (istio.io, "Istio Standard Metrics").
const ISTIO_REQUEST_LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "destination_canonical_service",
    "destination_canonical_revision",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// The TCP metrics carry the same set without response_code and grpc_response_status.
fn tcp_labels() -> BTreeSet<&'static str> {
    ISTIO_REQUEST_LABELS
        .iter()
        .copied()
        .filter(|l| *l != "response_code" && *l != "grpc_response_status")
        .collect()
}

/// A pod as a Deployment makes it: owned by ReplicaSet `<deployment>-<hash>`.
fn deployment_pod_yaml(pod: &Pod, deployment: &str, labels: &[(&str, &str)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n  ownerReferences:\n  - {{apiVersion: apps/v1, kind: ReplicaSet, name: {deployment}-7d9f8c6b5, controller: true}}\n  labels:\n    pod-template-hash: 7d9f8c6b5\n",
        pod.name, pod.namespace, pod.uid
    );
    for (k, v) in labels {
        y.push_str(&format!("    {k}: \"{v}\"\n"));
    }
    y.push_str(&format!(
        "spec:\n  containers: [{{name: app}}]\nstatus:\n  phase: Running\n  podIP: {}\n---\n",
        pod.host.ip
    ));
    y
}

struct Scene {
    node: Node,
    /// The cluster.yaml the scene wrote (tests rewrite it).
    yaml: String,
    _servers: Servers,
    web: Pod,
    batch: Pod,
    daemon: Daemon,
    reviews_ip: String,
    external_ip: String,
    outside_ip: String,
}

fn scene(tag: &str, extra: &[&str]) -> Scene {
    scene_with(tag, extra, true)
}

fn scene_with(tag: &str, extra: &[&str], jobs_access_log: bool) -> Scene {
    let mut node = Node::new(tag);
    let servers = Servers::new();
    let reviews = node.host("reviews");
    let external = node.host("external");
    let outside = node.host("outside");
    let slow = node.host("slow");
    for (h, name, delay) in [
        (&reviews, "reviews", 0),
        (&external, "external", 0),
        (&outside, "outside", 0),
        (&slow, "slow", 2000),
    ] {
        servers.http_echo(
            h,
            80,
            HttpEcho {
                name: name.into(),
                delay: Duration::from_millis(delay),
                ..Default::default()
            },
        );
    }
    let _tcp = servers.identity(&outside, 7000);
    let web = node.pod("azar", "web-7d9f8c6b5-x2x9z");
    let batch = node.pod("jobs", "batch-1");
    let yaml = namespace_yaml("azar", true, None)
        + &namespace_yaml("jobs", true, None)
        + &namespace_yaml("shop", false, None)
        + &deployment_pod_yaml(&web, "web", &[("app", "web"), ("version", "v1")])
        + &deployment_pod_yaml(&batch, "batch", &[("app", "batch"), ("version", "v3")])
        + &endpoint_pod_yaml(
            &reviews,
            "reviews-v2-0",
            "shop",
            &[("app", "reviews"), ("version", "v2")],
        )
        + &endpoint_pod_yaml(&slow, "slow-0", "shop", &[("app", "slow")])
        + "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 198.18.0.240
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: slow, namespace: shop}
spec:
  clusterIP: 198.18.0.241
  selector: {app: slow}
  ports: [{name: http, port: 80}]
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: api-external, namespace: azar}
spec:
  hosts: [api.external.test]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: "
        + &external.ip.to_string()
        + "}]
---
apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {name: strict, namespace: jobs}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
";
    let yaml = if jobs_access_log {
        yaml
    } else {
        yaml.replace(
            "  name: jobs\n",
            "  name: jobs\n  annotations:\n    nodeproxy.io/access-log: \"false\"\n",
        )
    };
    node.write_config("cluster.yaml", &yaml);
    let daemon = Daemon::start(&node, extra);
    for p in [&web, &batch] {
        daemon.wait_enrolled(&p.uid, Duration::from_secs(5));
    }
    Scene {
        reviews_ip: reviews.ip.to_string(),
        external_ip: external.ip.to_string(),
        outside_ip: outside.ip.to_string(),
        node,
        yaml,
        _servers: servers,
        web,
        batch,
        daemon,
    }
}

fn send(pod: &Pod, to: &str, host: &str, count: usize) -> serde_json::Value {
    pod.pdtool(&[
        "http",
        "--to",
        to,
        "--host",
        host,
        "--count",
        &count.to_string(),
    ])
}

#[test]
fn istio_metrics_count_every_request_with_istios_labels() {
    let s = scene("obsmet", &[]);
    let _ = (&s.reviews_ip, &s.external_ip);
    let passthrough = format!("{}:80", s.outside_ip);
    // web: mesh service, ServiceEntry, passthrough. batch (registry-only): the same.
    for (pod, to, host, n, code) in [
        (
            &s.web,
            "198.18.0.240:9080",
            "reviews.shop.svc.cluster.local",
            7,
            200,
        ),
        (&s.web, passthrough.as_str(), "api.external.test", 5, 200),
        (&s.web, passthrough.as_str(), "outside.example", 3, 200),
        (&s.batch, "198.18.0.240:9080", "reviews.shop", 4, 200),
        (&s.batch, passthrough.as_str(), "api.external.test", 2, 200),
        (&s.batch, passthrough.as_str(), "outside.example", 1, 502),
    ] {
        let out = send(pod, to, host, n);
        assert_eq!(out["statuses"][code.to_string()], n, "{host}: {out}");
    }
    let slow = send(&s.web, "198.18.0.241:80", "slow.shop", 1);
    assert_eq!(slow["statuses"]["200"], 1, "{slow}");
    let d = &s.daemon;
    let text = wait_for(Duration::from_secs(3), || {
        let t = d.metrics_text();
        (proxy_tests::daemon::sum_samples(&t, "istio_requests_total", &[]) >= 23.0).then_some(t)
    })
    .unwrap_or_else(|| d.metrics_text());

    // Counts per (source, destination) equal what each pod sent.
    let count = |src: &str, labels: &[(&str, &str)]| {
        let mut l = vec![("source_workload", src)];
        l.extend_from_slice(labels);
        proxy_tests::daemon::sum_samples(&text, "istio_requests_total", &l)
    };
    let mesh = [
        ("destination_service", "reviews.shop.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "shop"),
        ("destination_workload", "reviews"),
        ("destination_workload_namespace", "shop"),
        ("destination_app", "reviews"),
        ("destination_version", "v2"),
        ("destination_canonical_service", "reviews"),
        ("destination_canonical_revision", "v2"),
        ("response_code", "200"),
        ("request_protocol", "http"),
        ("response_flags", "-"),
    ];
    assert_eq!(count("web", &mesh), 7.0, "{text}");
    assert_eq!(count("batch", &mesh), 4.0);
    let entry = [
        ("destination_service", "api.external.test"),
        ("destination_service_name", "api.external.test"),
        ("destination_service_namespace", "azar"),
        ("destination_workload", "unknown"),
        ("response_code", "200"),
    ];
    assert_eq!(count("web", &entry), 5.0);
    assert_eq!(count("batch", &entry), 2.0);
    let pass = [
        ("destination_service", "outside.example"),
        ("destination_service_name", "PassthroughCluster"),
        ("response_code", "200"),
    ];
    assert_eq!(count("web", &pass), 3.0);
    let refused = [
        ("destination_service_name", "BlackHoleCluster"),
        ("response_code", "502"),
        ("response_flags", "NR"),
    ];
    assert_eq!(
        count("batch", &refused),
        1.0,
        "the refused request carries NR"
    );
    // Source labels: the Deployment's name, not the pod's.
    assert_eq!(
        count(
            "web",
            &[
                ("source_workload_namespace", "azar"),
                ("source_app", "web"),
                ("source_version", "v1"),
                ("source_canonical_service", "web"),
                ("source_canonical_revision", "v1"),
                ("source_principal", "unknown"),
                ("reporter", "source"),
            ]
        ),
        16.0
    );

    // The 2 s request: in le=2500, not in le=1000; and the other histograms agree.
    let slow_labels = [
        ("source_workload", "web"),
        ("destination_service_name", "slow"),
    ];
    let bucket = |le: &str| {
        let mut l = slow_labels.to_vec();
        l.push(("le", le));
        proxy_tests::daemon::sum_samples(&text, "istio_request_duration_milliseconds_bucket", &l)
    };
    assert_eq!(bucket("1000.0"), 0.0, "{text}");
    assert_eq!(bucket("2500.0"), 1.0);
    assert_eq!(
        proxy_tests::daemon::sum_samples(
            &text,
            "istio_request_duration_milliseconds_count",
            &slow_labels
        ),
        1.0
    );
    let sum = proxy_tests::daemon::sum_samples(
        &text,
        "istio_request_duration_milliseconds_sum",
        &slow_labels,
    );
    assert!((2000.0..2500.0).contains(&sum), "{sum}");
    for h in ["istio_request_bytes", "istio_response_bytes"] {
        assert_eq!(
            proxy_tests::daemon::sum_samples(&text, &format!("{h}_count"), &[]),
            23.0,
            "{h}"
        );
    }
    // Response sizes are real: the echo's JSON body plus headers, well over 100 bytes.
    assert_eq!(
        proxy_tests::daemon::sum_samples(
            &text,
            "istio_response_bytes_bucket",
            &[("destination_service_name", "reviews"), ("le", "100.0")]
        ),
        0.0
    );

    // /config_dump names the kernel objects (for bpftool) next to the rest of the state.
    let dump = d.config_dump();
    for section in [
        "settings",
        "ebpf",
        "workloads",
        "snapshot",
        "effective_policies",
        "config",
        "dns",
        "readiness",
    ] {
        assert!(dump.get(section).is_some(), "config_dump lacks {section}");
    }
    let maps = dump["ebpf"]["maps"].as_array().cloned().unwrap_or_default();
    assert!(maps.len() >= 3, "{}", dump["ebpf"]);
    assert!(
        maps.iter().all(|m| m[1].as_u64().unwrap_or(0) > 0),
        "{}",
        dump["ebpf"]
    );
    assert!(dump["ebpf"]["programs"]
        .as_array()
        .is_some_and(|p| p.len() >= 3));

    // Prometheus asks for gzip: the same text, compressed.
    {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(d.metrics).unwrap();
        write!(
            sock,
            "GET /metrics HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        sock.read_to_end(&mut raw).unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        assert!(head.contains("content-encoding: gzip"), "{head}");
        let mut unzipped = String::new();
        flate2::read::GzDecoder::new(&raw[split + 4..])
            .read_to_string(&mut unzipped)
            .expect("gzip body");
        assert!(unzipped.contains("# TYPE istio_requests_total counter"));
    }

    // The daemon's own health.
    let own = |name: &str| proxy_tests::daemon::sum_samples(&text, name, &[]);
    assert!(
        own("proxy_daemon_process_resident_memory_bytes") > 1e6,
        "{text}"
    );
    assert!(own("proxy_daemon_process_open_fds") > 5.0);
    assert!(own("proxy_daemon_process_cpu_seconds_total") > 0.0);
    assert_eq!(own("proxy_daemon_enrolled_pods"), 2.0);
    assert!(
        own("proxy_daemon_upstream_idle_connections") >= 1.0,
        "pooled upstreams"
    );
    assert!(own("proxy_daemon_ebpf_map_entries") >= 2.0);
    assert!(own("proxy_daemon_capture_decisions") >= 1.0, "{text}");

    // Exact label sets, parsed by a Prometheus text parser.
    let lines: Vec<Result<String, std::io::Error>> =
        text.lines().map(|l| Ok(l.to_string())).collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).expect("Prometheus text");
    let mut seen = BTreeSet::new();
    for sample in &scrape.samples {
        let names: BTreeSet<&str> = sample
            .labels
            .keys()
            .map(|k| k.as_str())
            .filter(|k| *k != "le")
            .collect();
        let expected: Option<BTreeSet<&str>> = match sample.metric.as_str() {
            "istio_requests_total"
            | "istio_request_duration_milliseconds"
            | "istio_request_bytes"
            | "istio_response_bytes" => Some(ISTIO_REQUEST_LABELS.iter().copied().collect()),
            m if m.starts_with("istio_tcp_") => Some(tcp_labels()),
            _ => None,
        };
        if let Some(expected) = expected {
            assert_eq!(names, expected, "{}", sample.metric);
            seen.insert(sample.metric.clone());
        }
    }
    for m in [
        "istio_requests_total",
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    ] {
        assert!(seen.contains(m), "{m} missing; saw {seen:?}");
    }

    // promtool accepts the scrape.
    proxy_tests::promtool_check(&text).unwrap_or_else(|e| panic!("{e}"));
}

/// The daemon's JSON log lines written by the access log.
fn access_lines(d: &Daemon) -> Vec<serde_json::Value> {
    d.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access_log")
        .collect()
}

#[test]
fn access_log_is_one_json_line_per_request_and_switchable() {
    let s = scene_with("obslog", &["--log-format", "json"], false);
    let out = s.web.pdtool(&[
        "http",
        "--to",
        "198.18.0.240:9080",
        "--host",
        "reviews.shop",
        "--path",
        "/ratings?id=7",
        "-H",
        "X-Request-Id: log-1",
    ]);
    assert_eq!(out["statuses"]["200"], 1, "{out}");
    let tcp = s
        .web
        .pdtool(&["connect", "--to", &format!("{}:7000", s.outside_ip)]);
    assert_eq!(tcp["result"], "ok", "{tcp}");
    let batch = send(&s.batch, "198.18.0.240:9080", "reviews.shop", 1);
    assert_eq!(batch["statuses"]["200"], 1, "{batch}");

    let lines = wait_for(Duration::from_secs(3), || {
        let l = access_lines(&s.daemon);
        (l.len() >= 2).then_some(l)
    })
    .unwrap_or_else(|| panic!("no access log lines: {}", s.daemon.log_text()));
    let req = lines
        .iter()
        .map(|l| &l["fields"])
        .find(|f| f["message"] == "request")
        .expect("a request line");
    for (k, v) in [
        ("method", "GET"),
        ("authority", "reviews.shop"),
        ("path", "/ratings?id=7"),
        ("protocol", "HTTP/1.1"),
        ("response_flags", "-"),
        ("x_request_id", "log-1"),
        ("source_workload", "web"),
        ("source_namespace", "azar"),
        ("destination_service", "reviews.shop.svc.cluster.local"),
        ("destination_workload", "reviews"),
    ] {
        assert_eq!(req[k], v, "{k}: {req}");
    }
    assert_eq!(req["response_code"], 200);
    assert_eq!(req["upstream_host"], format!("{}:80", s.reviews_ip));
    assert!(req["bytes_sent"].as_u64().unwrap_or(0) > 100, "{req}");
    assert!(req["duration_ms"].as_f64().is_some(), "{req}");
    assert!(
        req["start_time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 24),
        "{req}"
    );
    let conn = lines
        .iter()
        .map(|l| &l["fields"])
        .find(|f| f["message"] == "connection")
        .expect("a connection line");
    assert_eq!(conn["protocol"], "tcp");
    assert_eq!(
        conn["destination_service"],
        format!("{}:7000", s.outside_ip)
    );
    assert!(conn["bytes_received"].as_u64().unwrap_or(0) > 0, "{conn}");
    // The jobs namespace turned its access log off by annotation.
    assert!(
        lines
            .iter()
            .all(|l| l["fields"]["source_namespace"] != "jobs"),
        "{lines:?}"
    );

    // At run time: POST /logging switches the access log off (and back on); a GET only
    // reads (a link preview or a scraper must not change the daemon).
    let (code, _) =
        proxy_tests::http_get(s.daemon.admin, "/logging?level=info,access_log=off").expect("admin");
    assert_eq!(code, 405, "GET does not change the filter");
    let (code, body) = proxy_tests::http_get(s.daemon.admin, "/logging").expect("admin");
    assert_eq!(code, 200);
    assert!(!body.contains("access_log=off"), "{body}");
    let (code, _) =
        proxy_tests::http_request(s.daemon.admin, "POST", "/logging?level=info,access_log=off")
            .expect("admin");
    assert_eq!(code, 200);
    let before = access_lines(&s.daemon).len();
    send(&s.web, "198.18.0.240:9080", "reviews.shop", 3);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(access_lines(&s.daemon).len(), before, "switched off");
    proxy_tests::http_request(s.daemon.admin, "POST", "/logging?level=info").expect("admin");
    send(&s.web, "198.18.0.240:9080", "reviews.shop", 1);
    assert!(
        wait_for(Duration::from_secs(2), || (access_lines(&s.daemon).len()
            == before + 1)
            .then_some(()))
        .is_some(),
        "switched back on"
    );
}

#[test]
fn series_of_a_workload_that_left_the_node_age_out() {
    let s = scene("obsage", &["--metrics-retention-secs", "1"]);
    send(&s.web, "198.18.0.240:9080", "reviews.shop", 2);
    send(&s.batch, "198.18.0.240:9080", "reviews.shop", 2);
    let web_series = || {
        s.daemon
            .metrics_text()
            .lines()
            .filter(|l| l.starts_with("istio_") && l.contains("source_workload=\"web\""))
            .count()
    };
    assert!(web_series() > 0);
    // The web pod is deleted (gone from the configuration).
    let without_web: String = s
        .yaml
        .split("---\n")
        .filter(|doc| !doc.contains("name: web-7d9f8c6b5-x2x9z"))
        .map(|d| format!("{d}---\n"))
        .collect();
    s.node.write_config("cluster.yaml", &without_web);
    assert!(
        wait_for(Duration::from_secs(6), || (web_series() == 0).then_some(())).is_some(),
        "web's series never aged out"
    );
    assert_eq!(
        s.daemon
            .metric_sum("istio_requests_total", &[("source_workload", "batch")]),
        2.0,
        "a workload still on the node keeps its series"
    );
    assert!(
        s.daemon
            .metric_sum("proxy_daemon_expired_series_total", &[])
            >= 1.0
    );
}

/// Runs `proxy-daemon top` on a pseudo-terminal (as an operator would) and returns what
/// the terminal received.
fn top_on_a_pty(metrics: std::net::SocketAddr, frames: u32) -> String {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    // A 40-row, 160-column terminal.
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 160,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors we then own.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors were just returned by openpty and are ours alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = std::process::Command::new(proxy_tests::target_bin("proxy-daemon"))
        .args([
            "top",
            "--metrics-addr",
            &metrics.to_string(),
            "--interval-ms",
            "700",
            "--iterations",
            &frames.to_string(),
        ])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .expect("proxy-daemon top");
    let mut term = std::fs::File::from(master);
    let mut seen = Vec::new();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        // Ends with EIO once the child (the last holder of the slave side) exits.
        while let Ok(n) = term.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    });
    let status = child.wait().expect("top exits");
    assert!(status.success(), "top: {status}");
    String::from_utf8_lossy(&reader.join().unwrap()).into_owned()
}

#[test]
fn top_shows_the_busiest_pair_in_a_terminal() {
    let s = scene("obstop", &[]);
    let screen = std::thread::scope(|scope| {
        // Steady traffic: web → reviews at 100 req/s, batch → api.external.test at 10.
        scope.spawn(|| {
            s.web.pdtool(&[
                "http",
                "--to",
                "198.18.0.240:9080",
                "--host",
                "reviews.shop",
                "--count",
                "500",
                "--rate",
                "100",
            ])
        });
        scope.spawn(|| {
            s.batch.pdtool(&[
                "http",
                "--to",
                &format!("{}:80", s.outside_ip),
                "--host",
                "api.external.test",
                "--count",
                "50",
                "--rate",
                "10",
            ])
        });
        std::thread::sleep(Duration::from_millis(500));
        top_on_a_pty(s.daemon.metrics, 4)
    });
    // The last frame: after the last clear-screen.
    let last = screen.rsplit("\x1b[2J").next().unwrap_or("");
    assert!(
        screen.contains("\x1b[H\x1b[2J"),
        "redraws in place on a terminal"
    );
    let rows: Vec<&str> = last
        .lines()
        .skip_while(|l| !l.starts_with("SOURCE"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(rows.len() >= 2, "{last}");
    let top: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!(top[0], "web.azar", "{last}");
    assert_eq!(top[1], "reviews.shop.svc.cluster.local", "{last}");
    let rps: f64 = top[2].parse().unwrap();
    assert!((60.0..=140.0).contains(&rps), "about 100 req/s: {last}");
    assert_eq!(top[3], "100.0%", "{last}");
    assert!(rows[1].starts_with("batch.jobs"), "{last}");
}

/// Metric names a PromQL expression reads: identifiers outside label matchers, ranges,
/// `by`/`without` lists and strings that are not functions or keywords.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let mut cleaned = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    let mut in_string = false;
    for c in expr.chars() {
        match c {
            '"' if depth_brace == 0 => in_string = !in_string,
            '{' if !in_string => depth_brace += 1,
            '}' if !in_string => depth_brace -= 1,
            '[' if !in_string && depth_brace == 0 => depth_bracket += 1,
            ']' if !in_string && depth_brace == 0 => depth_bracket -= 1,
            _ if in_string || depth_brace > 0 || depth_bracket > 0 => {}
            c => cleaned.push(c),
        }
    }
    // Drop grouping label lists: `by (a, b)` / `without (a)`.
    let mut without_groups = String::new();
    let mut rest = cleaned.as_str();
    loop {
        let next = ["by (", "by(", "without (", "without("]
            .iter()
            .filter_map(|k| rest.find(k).map(|i| (i, k.len())))
            .min();
        match next {
            Some((i, len)) => {
                without_groups.push_str(&rest[..i]);
                rest = &rest[i + len..];
                rest = rest.split_once(')').map(|(_, r)| r).unwrap_or("");
            }
            None => {
                without_groups.push_str(rest);
                break;
            }
        }
    }
    let keywords = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "and",
        "or",
        "unless",
    ];
    let mut names = BTreeSet::new();
    let chars: Vec<char> = without_groups.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() || chars[i] == '_' || chars[i] == '$' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '_'
                    || chars[i] == ':'
                    || chars[i] == '$')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if next != Some(&'(') && !keywords.contains(&word.as_str()) && !word.starts_with('$') {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

fn collect_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if let ("expr" | "query", serde_json::Value::String(s)) = (k.as_str(), v) {
                    if s != "prometheus" {
                        out.push(s.clone());
                    }
                }
                collect_queries(v, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_queries(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_queries_only_metrics_the_daemon_exports() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana/proxy-daemon-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("valid JSON");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| p.len() >= 10));
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    assert!(queries.len() >= 20, "{queries:?}");

    // What a live daemon exports: every family's TYPE line (histograms add their series).
    let s = scene("obsdash", &[]);
    let text = s.daemon.metrics_text();
    let mut exported = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            } else {
                exported.insert(name.to_string());
            }
        }
    }
    let mut used = BTreeSet::new();
    for q in &queries {
        // Grafana's label_values(selector, label): only the selector names a metric.
        let promql = match q.strip_prefix("label_values(") {
            Some(inner) => inner.rsplit_once(',').map(|(sel, _)| sel).unwrap_or(inner),
            None => q.as_str(),
        };
        let names = promql_metric_names(promql);
        assert!(!names.is_empty(), "a query that reads no metric: {q}");
        for n in names {
            assert!(
                exported.contains(&n),
                "{n} (in {q}) is not exported; exported: {exported:?}"
            );
            used.insert(n);
        }
    }
    // The panels the dashboard promises are there.
    for m in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "proxy_daemon_enrolled_pods",
    ] {
        assert!(used.contains(m), "{m} not on the dashboard");
    }
    // The parser itself: functions, labels and ranges are not metric names.
    assert_eq!(
        promql_metric_names(
            r#"histogram_quantile(0.9, sum by (le, a) (rate(x_bucket{b="c"}[5m]))) / y"#
        ),
        ["x_bucket", "y"].iter().map(|s| s.to_string()).collect()
    );
}

#[test]
fn grpc_requests_carry_protocol_and_grpc_status() {
    let mut node = Node::new("obsgrpc");
    let servers = Servers::new();
    let g = node.host("grpc");
    servers.h2c_echo(&g, 50051, "grpc-v1");
    let client = node.pod("azar", "client-1");
    node.write_config(
        "cluster.yaml",
        &(namespace_yaml("azar", true, None)
            + &deployment_pod_yaml(&client, "client", &[("app", "client")])
            + &endpoint_pod_yaml(&g, "grpc-0", "azar", &[("app", "grpc")])
            + "apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: azar}
spec:
  clusterIP: 198.18.0.242
  selector: {app: grpc}
  ports: [{name: grpc, port: 50051}]
"),
    );
    let d = Daemon::start(&node, &[]);
    d.wait_enrolled(&client.uid, Duration::from_secs(5));
    for (status, n) in [("0", "3"), ("14", "2")] {
        let out = client.pdtool(&[
            "h2",
            "--to",
            "198.18.0.242:50051",
            "--authority",
            "grpc:50051",
            "--count",
            n,
            "-H",
            "content-type: application/grpc",
            "-H",
            &format!("x-want-grpc-status: {status}"),
        ]);
        assert_eq!(out["statuses"]["200"], n.parse::<u64>().unwrap(), "{out}");
    }
    let count = |status: &str| {
        d.metric_sum(
            "istio_requests_total",
            &[
                ("request_protocol", "grpc"),
                ("response_code", "200"),
                ("grpc_response_status", status),
                ("destination_service_name", "grpc"),
            ],
        )
    };
    assert!(
        wait_for(Duration::from_secs(3), || (count("0") == 3.0
            && count("14") == 2.0)
            .then_some(()))
        .is_some(),
        "{}",
        d.metrics_text()
    );
}
