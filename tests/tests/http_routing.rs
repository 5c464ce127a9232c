//! HTTP routing end to end: real pods, real eBPF capture, requests routed per request by
//! VirtualService rules, asserted at the upstream servers.
use std::time::{Duration, Instant};

use proxy_tests::{
    daemon::Daemon,
    node::{endpoint_pod_yaml, Node},
    servers::{HttpEcho, Servers},
};

use proxy_tests::reviews::{served, to, Reviews, HOST};

/// reviews v1/v2 as HTTP echo servers behind a Service with subsets, plus `extra` YAML.
fn setup(
    tag: &str,
    v2_delay: Duration,
    extra: &str,
    pods: &[(&str, &[(&str, &str)])],
    flags: &[&str],
) -> (Node, Servers, Vec<proxy_tests::Pod>, Daemon) {
    let v2 = HttpEcho {
        name: "reviews-v2".into(),
        delay: v2_delay,
        ..Default::default()
    };
    setup_with(tag, v2, extra, pods, flags)
}

/// As [`setup`], with v2's behaviour given in full.
fn setup_with(
    tag: &str,
    v2: HttpEcho,
    extra: &str,
    pods: &[(&str, &[(&str, &str)])],
    flags: &[&str],
) -> (Node, Servers, Vec<proxy_tests::Pod>, Daemon) {
    let mut b = Reviews::builder(tag).v2(v2).yaml(extra).flags(flags);
    for (name, labels) in pods {
        b = b.pod("shop", name, labels);
    }
    let r = b.start();
    (r.node, r.servers, r.pods, r.daemon)
}

#[test]
fn weighted_subsets_split_requests_10_90_on_one_keep_alive_connection() {
    let vs = format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{HOST}]
  http:
  - route:
    - {{destination: {{host: {HOST}, subset: v1}}, weight: 10}}
    - {{destination: {{host: {HOST}, subset: v2}}, weight: 90}}
"
    );
    let (_node, _servers, pods, daemon) = setup(
        "weights",
        Duration::ZERO,
        &vs,
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&[
        "http",
        "--to",
        &to(),
        "--host",
        "reviews.backend",
        "--count",
        "1000",
    ]);
    assert_eq!(out["statuses"]["200"], 1000, "{out}");
    // Chosen per request at random (Envoy's way): 10 % ± 0.95 (binomial); 6–14 % fails
    // a correct split about once in 30,000 runs.
    let v1 = served(&out, "reviews-v1") as f64 / 10.0;
    assert!((6.0..=14.0).contains(&v1), "v1 share {v1}%: {out}");
    let labels = [
        ("source_workload", "client"),
        ("destination_service", HOST),
        ("destination_service_name", "reviews"),
        ("response_code", "200"),
        ("request_protocol", "http"),
    ];
    assert_eq!(daemon.metric_sum("istio_requests_total", &labels), 1000.0);
}

#[test]
fn header_matches_header_ops_rewrites_and_request_ids_reach_the_upstream() {
    let vs = format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [reviews.backend.svc.cluster.local]
  http:
  - match: [{{headers: {{user-agent: {{regex: '.*Android.*'}}}}}}]
    headers:
      request:
        set: {{x-route: android}}
        remove: [x-drop]
    route: [{{destination: {{host: {HOST}, subset: v1}}}}]
  - match: [{{headers: {{user-agent: {{regex: '.*iPhone.*'}}}}}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
  - match: [{{uri: {{prefix: /api/v1/}}}}]
    rewrite: {{uri: /}}
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
  - route: [{{destination: {{host: {HOST}, subset: v1}}}}]
"
    );
    let (_node, _servers, pods, _daemon) = setup(
        "match",
        Duration::ZERO,
        &vs,
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let c = &pods[0];
    let android = c.pdtool(&[
        "http",
        "--to",
        &to(),
        "--host",
        HOST,
        "-H",
        "User-Agent: Mozilla/5.0 (Linux; Android 14)",
        "-H",
        "X-Drop: secret",
    ]);
    let body = &android["first"]["body"];
    assert_eq!(body["server"], "reviews-v1", "{android}");
    assert_eq!(body["headers"]["x-route"], "android");
    assert!(body["headers"].get("x-drop").is_none(), "removed: {body}");
    assert_eq!(
        body["peer"],
        c.host.ip.to_string(),
        "the upstream sees the pod IP"
    );
    assert!(
        body["headers"]["x-request-id"]
            .as_str()
            .is_some_and(|v| v.len() == 36),
        "generated: {body}"
    );
    let iphone = c.pdtool(&[
        "http",
        "--to",
        &to(),
        "--host",
        HOST,
        "-H",
        "User-Agent: Mozilla/5.0 (iPhone; CPU iPhone OS 17_0)",
        "-H",
        "X-Request-Id: keep-me",
    ]);
    assert_eq!(iphone["first"]["body"]["server"], "reviews-v2", "{iphone}");
    assert_eq!(
        iphone["first"]["body"]["headers"]["x-request-id"], "keep-me",
        "kept when present"
    );
    let api = c.pdtool(&[
        "http",
        "--to",
        &to(),
        "--host",
        HOST,
        "--path",
        "/api/v1/items?page=2",
    ]);
    assert_eq!(api["first"]["body"]["server"], "reviews-v2", "{api}");
    assert_eq!(
        api["first"]["body"]["path"], "/items?page=2",
        "prefix rewritten, query kept"
    );
    let other = c.pdtool(&["http", "--to", &to(), "--host", HOST, "--path", "/health"]);
    assert_eq!(other["first"]["body"]["server"], "reviews-v1", "{other}");
}

#[test]
fn source_labels_route_two_pods_differently_at_the_same_time() {
    let vs = format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{HOST}]
  http:
  - match: [{{sourceLabels: {{app: api, stack: mirror}}}}]
    headers: {{request: {{set: {{X-Azar-Mirror: 'true'}}}}}}
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
  - match: [{{sourceLabels: {{app: api, stack: test}}}}]
    headers: {{request: {{set: {{X-Azar-Mirror: 'false'}}}}}}
    route: [{{destination: {{host: {HOST}, subset: v1}}}}]
  - route: [{{destination: {{host: {HOST}, subset: v1}}}}]
"
    );
    let (_node, _servers, pods, _daemon) = setup(
        "srclabels",
        Duration::ZERO,
        &vs,
        &[
            ("api-mirror-1", &[("app", "api"), ("stack", "mirror")]),
            ("api-test-1", &[("app", "api"), ("stack", "test")]),
        ],
        &[],
    );
    let (mirror, test) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            pods[0].pdtool(&[
                "http",
                "--to",
                &to(),
                "--host",
                "reviews.backend",
                "--count",
                "200",
            ])
        });
        let b = s.spawn(|| {
            pods[1].pdtool(&[
                "http",
                "--to",
                &to(),
                "--host",
                "reviews.backend",
                "--count",
                "200",
            ])
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(served(&mirror, "reviews-v2"), 200, "{mirror}");
    assert_eq!(served(&test, "reviews-v1"), 200, "{test}");
    assert_eq!(mirror["first"]["body"]["headers"]["x-azar-mirror"], "true");
    assert_eq!(test["first"]["body"]["headers"]["x-azar-mirror"], "false");
}

#[test]
fn registry_only_answers_502_and_an_allowing_sidecar_passes_through_with_status() {
    let sidecar = "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: legacy, namespace: shop}
spec:
  workloadSelector: {labels: {app: legacy}}
  outboundTrafficPolicy: {mode: ALLOW_ANY}
---
";
    let (mut node, servers, pods, daemon) = setup(
        "http502",
        Duration::ZERO,
        sidecar,
        &[
            ("strict-1", &[("app", "strict")]),
            ("legacy-1", &[("app", "legacy")]),
        ],
        &["--outbound-traffic-policy", "registry-only"],
    );
    let ext = node.host("external");
    servers.http_echo(
        &ext,
        80,
        HttpEcho {
            name: "external".into(),
            ..Default::default()
        },
    );
    let to_ext = ext.addr(80).to_string();
    let strict = pods[0].pdtool(&["http", "--to", &to_ext, "--host", "api.example.org"]);
    assert_eq!(strict["first"]["status"], 502, "{strict}");
    let legacy = pods[1].pdtool(&["http", "--to", &to_ext, "--host", "api.example.org"]);
    assert_eq!(legacy["first"]["status"], 200, "{legacy}");
    assert_eq!(legacy["first"]["body"]["server"], "external");
    assert_eq!(
        daemon.metric_sum(
            "istio_requests_total",
            &[
                ("source_workload", "strict"),
                ("destination_service_name", "BlackHoleCluster"),
                ("response_code", "502"),
                ("response_flags", "NR")
            ]
        ),
        1.0
    );
    assert_eq!(
        daemon.metric_sum(
            "istio_requests_total",
            &[
                ("source_workload", "legacy"),
                ("destination_service_name", "PassthroughCluster"),
                ("destination_service", "api.example.org"),
                ("response_code", "200")
            ]
        ),
        1.0
    );
}

#[test]
fn route_timeout_answers_504_in_about_half_a_second() {
    let vs = format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{HOST}]
  http:
  - timeout: 500ms
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
"
    );
    let (_node, _servers, pods, daemon) = setup(
        "timeout",
        Duration::from_secs(2),
        &vs,
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let started = Instant::now();
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST]);
    let took = started.elapsed();
    assert_eq!(out["first"]["status"], 504, "{out}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "took {took:?}"
    );
    assert_eq!(
        daemon.metric_sum(
            "istio_requests_total",
            &[("response_code", "504"), ("response_flags", "UT")]
        ),
        1.0
    );
}

#[test]
fn upgrade_is_passed_through_and_echoes() {
    let (_node, _servers, pods, _daemon) = setup(
        "upgrade",
        Duration::ZERO,
        "",
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&[
        "http",
        "--to",
        &to(),
        "--host",
        HOST,
        "--upgrade-echo",
        "hello through the proxy",
    ]);
    assert_eq!(out["first"]["status"], 101, "{out}");
    assert_eq!(out["first"]["echo"], "hello through the proxy", "{out}");
}

fn v2_only(retries: &str, fault: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{HOST}]
  http:
  - route: [{{destination: {{host: {HOST}, subset: v2}}}}]
{retries}{fault}"
    )
}

#[test]
fn retries_turn_a_half_failing_upstream_into_success_and_attempts_zero_does_not() {
    let flaky = || HttpEcho {
        name: "reviews-v2".into(),
        fail_every: 2,
        ..Default::default()
    };
    let vs = v2_only(
        "    retries: {attempts: 3, perTryTimeout: 1s, retryOn: 5xx}\n",
        "",
    );
    let (_node, _servers, pods, daemon) = setup_with(
        "retries",
        flaky(),
        &vs,
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "300"]);
    let ok = out["statuses"]["200"].as_u64().unwrap_or(0);
    assert!(ok >= 297, "at least 99% succeed: {out}");
    assert!(daemon.metric_sum("istio_requests_total", &[("response_code", "200")]) >= 297.0);

    let vs = v2_only("    retries: {attempts: 0}\n", "");
    let (_node, _servers, pods, _daemon) = setup_with(
        "noretry",
        flaky(),
        &vs,
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "100"]);
    assert_eq!(
        out["statuses"]["503"], 50,
        "without retries half fail: {out}"
    );
}

#[test]
fn istio_default_retry_policy_retries_503_when_none_is_set() {
    let flaky = HttpEcho {
        name: "reviews-v2".into(),
        fail_every: 3,
        ..Default::default()
    };
    let (_node, _servers, pods, _daemon) = setup_with(
        "defretry",
        flaky,
        &v2_only("", ""),
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "150"]);
    assert_eq!(
        out["statuses"]["200"], 150,
        "503s are retried by default: {out}"
    );
}

#[test]
fn fault_injection_aborts_and_delays() {
    let vs = v2_only(
        "",
        "    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n",
    );
    let (_node, _servers, pods, daemon) = setup(
        "abort",
        Duration::ZERO,
        &vs,
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "20"]);
    assert_eq!(out["statuses"]["418"], 20, "{out}");
    assert_eq!(
        daemon.metric_sum(
            "istio_requests_total",
            &[("response_code", "418"), ("response_flags", "FI")]
        ),
        20.0
    );

    let vs = v2_only(
        "",
        "    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}\n",
    );
    let (_node, _servers, pods, _daemon) = setup(
        "delay",
        Duration::ZERO,
        &vs,
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let started = Instant::now();
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "3"]);
    assert_eq!(out["statuses"]["200"], 3, "{out}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "3 x 300 ms delay: {:?}",
        started.elapsed()
    );
}

#[test]
fn outlier_detection_ejects_a_broken_pod_after_exactly_its_threshold() {
    outlier_ejects_after_two("outlier", "consecutive5xxErrors: 2");
}

/// Istio's deprecated `consecutiveErrors` counts gateway errors (the broken pod answers
/// 503, one of them).
#[test]
fn deprecated_consecutive_errors_eject_on_gateway_errors() {
    outlier_ejects_after_two("outlier-old", "consecutiveErrors: 2");
}

fn outlier_ejects_after_two(tag: &str, threshold: &str) {
    let failed = outlier_failures(tag, threshold, 503);
    // Bounded from both sides: two 503s in a row are what ejects (not one, not a third).
    assert_eq!(
        failed, 2,
        "the broken pod got exactly 2 requests before its ejection"
    );
}

/// `consecutiveGatewayErrors` alone counts 502, 503 and 504, never another 5xx: a pod
/// answering 500 to everything is never ejected (half of 100 requests fail), one
/// answering 502 is after two.
#[test]
fn consecutive_gateway_errors_count_gateway_errors_only() {
    let threshold = "consecutiveGatewayErrors: 2, consecutive5xxErrors: 0";
    // Never ejected: about half the requests go to it (least-request between two idle
    // pods alternates; 30–70 leaves room for any fair tie-break), against 2 if it were.
    let failed = outlier_failures("outlier-gw500", threshold, 500);
    assert!(
        (30..=70).contains(&failed),
        "{failed} of 100 failed with 500"
    );
    assert_eq!(outlier_failures("outlier-gw502", threshold, 502), 2);
}

/// 100 requests, one at a time, to reviews with v2 answering `status` to everything,
/// under the outlier `threshold`: how many failed.
fn outlier_failures(tag: &str, threshold: &str, status: u16) -> u64 {
    let broken = HttpEcho {
        name: "reviews-v2".into(),
        fail_every: 1,
        fail_status: Some(status),
        ..Default::default()
    };
    let dr_and_vs = format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews-health, namespace: shop}}
spec:
  host: {HOST}
  trafficPolicy:
    outlierDetection: {{{threshold}, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{HOST}]
  http:
  - retries: {{attempts: 0}}
    route: [{{destination: {{host: {HOST}}}}}]
"
    );
    let (_node, _servers, pods, _daemon) = setup_with(
        tag,
        broken,
        &dr_and_vs,
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "100"]);
    let failed = out["statuses"][status.to_string()].as_u64().unwrap_or(0);
    assert_eq!(
        out["statuses"]["200"].as_u64().unwrap_or(0) + failed,
        100,
        "{out}"
    );
    failed
}

#[test]
fn a_server_first_protocol_works_through_the_proxy() {
    let (mut node, servers, pods, _daemon) = setup(
        "banner",
        Duration::ZERO,
        "",
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let mail = node.host("mail");
    servers.banner(&mail, 25, "220 mail.test ESMTP ready");
    let out = pods[0].pdtool(&["banner", "--to", &mail.addr(25).to_string()]);
    assert_eq!(out["result"], "ok", "{out}");
    assert_eq!(out["banner"], "220 mail.test ESMTP ready");
    assert_eq!(out["reply"], "250 HELO pod");
    assert!(
        out["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "captured: {out}"
    );
    assert!(out["elapsed_ms"].as_f64().unwrap() < 1000.0, "{out}");
}

/// Each limit of `connectionPool` by itself (the others at Istio's defaults), five
/// concurrent requests to an upstream that answers after 1 s: the answered and the
/// overflowed (503 `UO`).
#[test]
fn connection_pool_limits_answer_503_uo_beyond_the_pending_queue() {
    // tcp.maxConnections: one connection, so one request in flight and one waiting for it.
    assert_eq!(
        pool_outcome(
            "pool-tcp",
            "tcp: {maxConnections: 1}\n      http: {http1MaxPendingRequests: 1}"
        ),
        (2, 3)
    );
    // http2MaxRequests (every protocol's active requests, as in Envoy): one in flight;
    // connections are not the limit, so none waits.
    assert_eq!(
        pool_outcome("pool-req", "http: {http2MaxRequests: 1}"),
        (1, 4)
    );
}

/// (answered 200, overflowed 503 UO) of 5 concurrent requests under `pool`.
fn pool_outcome(tag: &str, pool: &str) -> (u64, u64) {
    let slow = HttpEcho {
        name: "reviews-v2".into(),
        delay: Duration::from_secs(1),
        ..Default::default()
    };
    let dr_and_vs = format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews-pool, namespace: shop}}
spec:
  host: {HOST}
  trafficPolicy:
    connectionPool:
      {pool}
  # This rule, in the client's namespace, wins over the service's: it carries the subsets too.
  subsets:
  - {{name: v2, labels: {{version: v2}}}}
---
{}",
        v2_only("    retries: {attempts: 0}\n", "")
    );
    let (_node, _servers, pods, daemon) = setup_with(
        tag,
        slow,
        &dr_and_vs,
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--parallel", "5"]);
    let ok = out["statuses"]["200"].as_u64().unwrap_or(0);
    let overflow = out["statuses"]["503"].as_u64().unwrap_or(0);
    assert_eq!(ok + overflow, 5, "{out}");
    assert_eq!(
        daemon.metric_sum(
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UO")]
        ),
        overflow as f64,
        "every overflow is reported UO"
    );
    (ok, overflow)
}

#[test]
fn h2c_requests_are_routed_one_by_one_on_a_multiplexed_connection() {
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpc, namespace: backend}
spec:
  hosts: [grpc.backend.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /helloworld.Greeter/}}]
    route: [{destination: {host: grpc.backend.svc.cluster.local, subset: v2}}]
  - route:
    - {destination: {host: grpc.backend.svc.cluster.local, subset: v1}, weight: 10}
    - {destination: {host: grpc.backend.svc.cluster.local, subset: v2}, weight: 90}
"
    .to_string();
    let (mut node, servers, pods, daemon) = setup(
        "h2c",
        Duration::ZERO,
        "",
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let g1 = node.host("grpc-v1");
    let g2 = node.host("grpc-v2");
    servers.h2c_echo(&g1, 50051, "grpc-v1");
    servers.h2c_echo(&g2, 50051, "grpc-v2");
    let extra = vs
        + "---\n"
        + &endpoint_pod_yaml(
            &g1,
            "grpc-v1-0",
            "backend",
            &[("app", "grpc"), ("version", "v1")],
        )
        + &endpoint_pod_yaml(
            &g2,
            "grpc-v2-0",
            "backend",
            &[("app", "grpc"), ("version", "v2")],
        )
        + "apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: backend}
spec:
  clusterIP: 198.18.0.253
  selector: {app: grpc}
  ports: [{name: grpc, port: 50051}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: grpc, namespace: backend}
spec:
  host: grpc.backend.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";
    node.write_config("grpc.yaml", &extra);
    assert!(proxy_tests::wait_for(Duration::from_secs(5), || {
        daemon.config_dump()["snapshot"]["routes"]["virtual_services"]
            ["grpc.backend.svc.cluster.local"]
            .is_array()
            .then_some(())
    })
    .is_some());
    let to = "198.18.0.253:50051";
    let split = pods[0].pdtool(&[
        "h2",
        "--to",
        to,
        "--authority",
        "grpc.backend:50051",
        "--count",
        "1000",
    ]);
    assert_eq!(split["statuses"]["200"], 1000, "{split}");
    let v1 = split["servers"]["grpc-v1"].as_u64().unwrap_or(0) as f64 / 10.0;
    assert!(
        (6.0..=14.0).contains(&v1),
        "per-request split on one h2 connection: {v1}% {split}"
    );
    assert_eq!(
        split["first"]["proto"], "HTTP/2.0",
        "upstream spoke h2: {split}"
    );
    let rpc = pods[0].pdtool(&[
        "h2",
        "--to",
        to,
        "--authority",
        "grpc.backend:50051",
        "--path",
        "/helloworld.Greeter/SayHello",
        "--count",
        "20",
        "-H",
        "content-type: application/grpc",
    ]);
    assert_eq!(rpc["servers"]["grpc-v2"], 20, "{rpc}");
    assert_eq!(rpc["first"]["content_type"], "application/grpc");
}

#[test]
fn max_requests_per_connection_limits_upstream_connection_reuse() {
    let dr = format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews-reuse, namespace: shop}}
spec:
  host: {HOST}
  trafficPolicy:
    connectionPool:
      http: {{maxRequestsPerConnection: 2}}
  subsets:
  - {{name: v2, labels: {{version: v2}}}}
---
{}",
        v2_only("", "")
    );
    let (_node, _servers, pods, _daemon) = setup(
        "reuse",
        Duration::ZERO,
        &dr,
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "10"]);
    assert_eq!(out["statuses"]["200"], 10, "{out}");
    assert!(
        out["upstream_connections"].as_u64().unwrap() >= 5,
        "at most 2 requests per upstream connection: {out}"
    );
    let (_node, _servers, pods, _daemon) = setup(
        "reuse2",
        Duration::ZERO,
        &v2_only("", ""),
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "10"]);
    assert_eq!(
        out["upstream_connections"], 1,
        "keep-alive reuse without the limit: {out}"
    );
}

#[test]
fn timeout_zero_disables_the_route_timeout_as_in_envoy() {
    let vs = format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{HOST}]
  http:
  - timeout: 0s
    retries: {{attempts: 1, perTryTimeout: 0s}}
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
"
    );
    let (_node, _servers, pods, _daemon) = setup(
        "timeout0",
        Duration::from_millis(700),
        &vs,
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let started = Instant::now();
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST]);
    assert_eq!(out["first"]["status"], 200, "0s means no timeout: {out}");
    assert!(started.elapsed() >= Duration::from_millis(700));
}

/// `retries.attempts` is the number of retries, told apart from Istio's default (2) and
/// from none: every try of 10 requests to an upstream that answers 503 is counted where
/// it lands — 10 × (1 + 4) = 50.
#[test]
fn retry_attempts_are_counted_at_the_upstream() {
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (_node, _servers, pods, _daemon) = setup_with(
        "retryattempts",
        HttpEcho {
            name: "reviews-v2".into(),
            log: Some(log.clone()),
            ..Default::default()
        },
        &v2_only("    retries: {attempts: 4, retryOn: 5xx}\n", ""),
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&[
        "http",
        "--to",
        &to(),
        "--host",
        HOST,
        "--count",
        "10",
        "-H",
        "x-echo-status: 503",
    ]);
    assert_eq!(out["statuses"]["503"], 10, "every try failed: {out}");
    assert_eq!(log.lock().unwrap().len(), 50, "1 try and 4 retries each");
}

/// `retries.perTryTimeout` fires: an upstream that answers after 400 ms, tries of 100 ms,
/// 2 retries on 5xx (a try that times out counts as a 504): each request ends in 504
/// after its 3 tries, all 3 seen at the upstream, long before one try would have
/// answered 200.
#[test]
fn per_try_timeout_cuts_each_try_and_retries() {
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (_node, _servers, pods, _daemon) = setup_with(
        "pertry",
        HttpEcho {
            name: "reviews-v2".into(),
            delay: Duration::from_millis(400),
            log: Some(log.clone()),
            ..Default::default()
        },
        &v2_only(
            "    retries: {attempts: 2, perTryTimeout: 100ms, retryOn: 5xx}\n",
            "",
        ),
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "3"]);
    assert_eq!(out["statuses"]["504"], 3, "each try timed out: {out}");
    let tries = wait_for_count(&log, 9);
    assert_eq!(tries, 9, "3 tries per request at the upstream");
}

/// The upstream's log once it holds `n` entries (or what it has after 5 s).
fn wait_for_count(
    log: &std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    n: usize,
) -> usize {
    proxy_tests::wait_for(Duration::from_secs(5), || {
        let len = log.lock().unwrap().len();
        (len >= n).then_some(len)
    })
    .unwrap_or_else(|| log.lock().unwrap().len())
}

#[test]
fn attempts_without_retry_on_use_istios_default_conditions() {
    let (_node, _servers, pods, daemon) = setup_with(
        "retrydefault",
        HttpEcho {
            name: "reviews-v2".into(),
            fail_every: 2,
            ..Default::default()
        },
        &v2_only("    retries: {attempts: 3}\n", ""),
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "200"]);
    assert_eq!(
        out["statuses"]["200"], 200,
        "503 is among Istio's default conditions: {out}"
    );
    assert_eq!(
        daemon.metric_sum("istio_requests_total", &[("response_code", "200")]),
        200.0
    );
}

#[test]
fn a_retry_prefers_another_endpoint_and_never_leaves_its_subset() {
    // v2 has two endpoints, one of which answers 503 to everything; v1 is healthy.
    let (mut node, servers, pods, daemon) = setup_with(
        "retryhosts",
        HttpEcho {
            name: "reviews-v2".into(),
            fail_every: 1,
            ..Default::default()
        },
        "",
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let good = node.host("reviews-v2-b");
    servers.http_echo(
        &good,
        9080,
        HttpEcho {
            name: "reviews-v2-b".into(),
            ..Default::default()
        },
    );
    // One retry only: it succeeds every time only if it avoids the endpoint that failed.
    node.write_config(
        "retry.yaml",
        &(endpoint_pod_yaml(
            &good,
            "reviews-v2-b",
            "backend",
            &[("app", "reviews"), ("version", "v2")],
        ) + &v2_only("    retries: {attempts: 1, retryOn: 5xx}\n", "")),
    );
    let wait = proxy_tests::wait_for(Duration::from_secs(5), || {
        let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "4"]);
        (out["servers"]["reviews-v2-b"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    assert!(wait.is_some(), "the second v2 endpoint is in use");
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "200"]);
    assert_eq!(out["statuses"]["200"], 200, "{out}");
    assert_eq!(served(&out, "reviews-v2-b"), 200, "{out}");
    assert_eq!(served(&out, "reviews-v1"), 0, "never another subset: {out}");

    // A 50/50 split whose v2 always fails (v2-b removed): a retry stays in v2, so about
    // half the requests fail instead of being rescued by v1.
    node.write_config(
        "retry.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{HOST}]
  http:
  - retries: {{attempts: 2, retryOn: 5xx}}
    route:
    - {{destination: {{host: {HOST}, subset: v1}}, weight: 50}}
    - {{destination: {{host: {HOST}, subset: v2}}, weight: 50}}
"
        ),
    );
    std::thread::sleep(Duration::from_millis(600));
    let out = pods[0].pdtool(&["http", "--to", &to(), "--host", HOST, "--count", "400"]);
    let (ok, failed) = (
        out["statuses"]["200"].as_u64().unwrap_or(0),
        out["statuses"]["503"].as_u64().unwrap_or(0),
    );
    assert_eq!(ok + failed, 400, "{out}");
    assert_eq!(served(&out, "reviews-v1"), ok, "only v1 answers 200: {out}");
    // Binomial(400, 0.5): 200 ± 10; a re-rolled retry would rescue most of v2's share.
    assert!(
        (150..=250).contains(&failed),
        "{failed} of 400 failed: {out}"
    );
    assert!(
        daemon.metric_sum(
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "URX")]
        ) >= 150.0
    );
}

#[test]
fn grpc_status_conditions_decide_retries() {
    let (mut node, servers, pods, daemon) = setup(
        "grpcretry",
        Duration::ZERO,
        "",
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let g = node.host("grpc-status");
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    servers.h2c_echo_logged(&g, 50051, "grpc", Some(log.clone()));
    let grpc_yaml = endpoint_pod_yaml(&g, "grpc-0", "backend", &[("app", "grpc")])
        + "apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: backend}
spec:
  clusterIP: 198.18.0.253
  selector: {app: grpc}
  ports: [{name: grpc, port: 50051}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpc, namespace: backend}
spec:
  hosts: [grpc.backend.svc.cluster.local]
  http:
  - retries: {attempts: 2, retryOn: \"cancelled,deadline-exceeded,unavailable,resource-exhausted\"}
    route: [{destination: {host: grpc.backend.svc.cluster.local}}]
";
    node.write_config("grpc.yaml", &grpc_yaml);
    // The server answers with the grpc-status the call asks for (trailers-only).
    let call = |status: &str| {
        log.lock().unwrap().clear();
        let out = pods[0].pdtool(&[
            "h2",
            "--to",
            "198.18.0.253:50051",
            "--authority",
            "grpc.backend:50051",
            "-H",
            "content-type: application/grpc",
            "-H",
            &format!("x-want-grpc-status: {status}"),
        ]);
        assert_eq!(out["statuses"]["200"], 1, "{out}");
        log.lock().unwrap().len()
    };
    proxy_tests::wait_for(Duration::from_secs(5), || (call("0") == 1).then_some(()))
        .expect("gRPC service reachable");
    assert_eq!(call("14"), 3, "UNAVAILABLE is retried twice");
    assert_eq!(call("8"), 3, "RESOURCE_EXHAUSTED is retried twice");
    assert_eq!(call("1"), 3, "CANCELLED is retried twice");
    assert_eq!(call("4"), 3, "DEADLINE_EXCEEDED is retried twice");
    assert_eq!(call("13"), 1, "INTERNAL is not in retryOn");
    assert_eq!(call("5"), 1, "NOT_FOUND is no retry condition");
    assert_eq!(call("0"), 1, "OK is not retried");
    // `internal` alone: now INTERNAL is retried and UNAVAILABLE is not.
    let before = daemon.config_dump()["config"]["generation"]
        .as_u64()
        .unwrap_or(0);
    node.write_config(
        "grpc.yaml",
        &grpc_yaml.replace(
            "cancelled,deadline-exceeded,unavailable,resource-exhausted",
            "internal",
        ),
    );
    proxy_tests::wait_for(Duration::from_secs(5), || {
        (daemon.config_dump()["config"]["generation"]
            .as_u64()
            .unwrap_or(0)
            > before)
            .then_some(())
    })
    .expect("reloaded");
    assert_eq!(call("13"), 3, "INTERNAL is retried twice");
    assert_eq!(call("14"), 1, "UNAVAILABLE is no longer in retryOn");
}

/// Envoy's ejection clock, end to end: an ejected endpoint comes back at the first
/// `interval` tick after `baseEjectionTime` × its ejection count, fails again and is
/// ejected for twice as long; meanwhile its healthy peer takes everything.
#[test]
fn an_ejection_ends_on_an_interval_tick_and_doubles_when_the_pod_fails_again() {
    let broken = HttpEcho {
        name: "reviews-v2".into(),
        fail_every: 1,
        ..Default::default()
    };
    let dr_and_vs = format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews-health, namespace: shop}}
spec:
  host: {HOST}
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 2, interval: 250ms, baseEjectionTime: 1s, maxEjectionPercent: 100}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{HOST}]
  http:
  - retries: {{attempts: 0}}
    route: [{{destination: {{host: {HOST}}}}}]
"
    );
    let (_node, _servers, pods, _daemon) = setup_with(
        "eject-clock",
        broken,
        &dr_and_vs,
        &[("client-1", &[("app", "client")])],
        &[],
    );
    let out = pods[0].pdtool(&[
        "load",
        "--to",
        &to(),
        "--host",
        HOST,
        "--ms",
        "4600",
        "--rate",
        "100",
    ]);
    let times: Vec<u64> = out["not_ok"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p[0].as_u64()).collect())
        .unwrap_or_default();
    // Three bursts of two 503s: at the start, after the 1 s ejection (ending on a tick,
    // 1.0–1.25 s later, plus the time to be picked twice), and after a 2 s one.
    assert_eq!(
        times.len(),
        6,
        "three ejections of two failures each: {out}"
    );
    let back_1 = times[2] - times[1];
    let back_2 = times[4] - times[3];
    eprintln!("ejections lasted {back_1} ms, then {back_2} ms");
    assert!(
        (1000..1600).contains(&back_1),
        "first ejection lasted {back_1} ms (1 s, to the next 250 ms tick): {out}"
    );
    assert!(
        (2000..2600).contains(&back_2),
        "second ejection lasted {back_2} ms (2 s: the multiplier grew): {out}"
    );
    assert_eq!(
        out["errors"],
        serde_json::json!([]),
        "every request answered: {out}"
    );
}
