//! L4 routing from the snapshot, end to end: Service cluster IPs load-balanced over
//! endpoints (nothing listens on a cluster IP: only the proxy can make it work),
//! VirtualService `tcp[]` weights, subsets and `sourceLabels`, and the outbound traffic
//! policy for unregistered destinations.
use std::time::Duration;

use proxy_tests::{
    daemon::Daemon,
    node::{endpoint_pod_yaml, namespace_yaml, pod_yaml, Host, Node},
    servers::Servers,
};

const CLUSTER_IP: &str = "198.18.0.250";

fn backend(node: &mut Node, servers: &Servers) -> (Host, Host, String) {
    let b1 = node.host("reviews-v1");
    let b2 = node.host("reviews-v2");
    let _ = servers.identity(&b1, 9080);
    let _ = servers.identity(&b2, 9080);
    let yaml = namespace_yaml("backend", false, None)
        + &endpoint_pod_yaml(
            &b1,
            "reviews-v1-a",
            "backend",
            &[("app", "reviews"), ("version", "v1")],
        )
        + &endpoint_pod_yaml(
            &b2,
            "reviews-v2-a",
            "backend",
            &[("app", "reviews"), ("version", "v2")],
        )
        + &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: backend}}
spec:
  clusterIP: {CLUSTER_IP}
  selector: {{app: reviews}}
  ports: [{{name: tcp-reviews, port: 80, targetPort: 9080}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: backend}}
spec:
  host: reviews.backend.svc.cluster.local
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
"
        );
    (b1, b2, yaml)
}

fn count(spread: &serde_json::Value, server: &Host) -> u64 {
    spread["servers"][server.addr(9080).to_string()]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn service_cluster_ip_is_balanced_over_its_ready_endpoints() {
    let mut node = Node::new("svc");
    let servers = Servers::new();
    let (b1, b2, yaml) = backend(&mut node, &servers);
    let client = node.pod("shop", "client-1");
    node.write_config(
        "all.yaml",
        &(yaml + &namespace_yaml("shop", true, None) + &pod_yaml(&client, &[("app", "client")])),
    );
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(5));

    let spread = client.pdtool(&[
        "spread",
        "--to",
        &format!("{CLUSTER_IP}:80"),
        "--count",
        "100",
    ]);
    assert!(spread["errors"].as_object().unwrap().is_empty(), "{spread}");
    let (n1, n2) = (count(&spread, &b1), count(&spread, &b2));
    assert_eq!(n1 + n2, 100, "{spread}");
    assert!(n1 >= 40 && n2 >= 40, "both endpoints serve: {spread}");
    let labels = [
        ("source_workload", "client"),
        ("destination_service", "reviews.backend.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "backend"),
    ];
    assert_eq!(
        daemon.metric_sum("istio_tcp_connections_opened_total", &labels),
        100.0
    );
}

#[test]
fn tcp_routes_split_by_weight_and_pin_by_source_labels() {
    let mut node = Node::new("tcproute");
    let servers = Servers::new();
    let (b1, b2, yaml) = backend(&mut node, &servers);
    let client = node.pod("shop", "client-1");
    let canary = node.pod("shop", "canary-1");
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: backend}
spec:
  hosts: [reviews.backend.svc.cluster.local]
  tcp:
  - match: [{sourceLabels: {track: canary}}]
    route: [{destination: {host: reviews.backend.svc.cluster.local, subset: v2}}]
  - route:
    - {destination: {host: reviews.backend.svc.cluster.local, subset: v1}, weight: 10}
    - {destination: {host: reviews.backend.svc.cluster.local, subset: v2}, weight: 90}
---
";
    node.write_config(
        "all.yaml",
        &(yaml
            + vs
            + &namespace_yaml("shop", true, None)
            + &pod_yaml(&client, &[("app", "client")])
            + &pod_yaml(&canary, &[("app", "client"), ("track", "canary")])),
    );
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(5));
    daemon.wait_enrolled(&canary.uid, Duration::from_secs(5));

    let to = format!("{CLUSTER_IP}:80");
    let (split, pinned) = std::thread::scope(|s| {
        let a = s.spawn(|| client.pdtool(&["spread", "--to", &to, "--count", "1000"]));
        let b = s.spawn(|| canary.pdtool(&["spread", "--to", &to, "--count", "100"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    // Random per connection: 10 % ± 0.95; 6–14 % fails a correct split ~1 in 30,000.
    let v1_share = count(&split, &b1) as f64 / 1000.0 * 100.0;
    assert!(
        (6.0..=14.0).contains(&v1_share),
        "v1 share {v1_share}%: {split}"
    );
    assert_eq!(count(&split, &b1) + count(&split, &b2), 1000, "{split}");
    assert_eq!(
        count(&pinned, &b2),
        100,
        "canary pod always goes to v2: {pinned}"
    );
}

#[test]
fn registry_only_refuses_unknown_destinations_unless_a_sidecar_allows_them() {
    let mut node = Node::new("regonly");
    let servers = Servers::new();
    let (_b1, _b2, yaml) = backend(&mut node, &servers);
    let external = node.host("external");
    let _ = servers.identity(&external, 443);
    let strict = node.pod("shop", "strict-1");
    let legacy = node.pod("shop", "legacy-1");
    let sidecar = "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: legacy, namespace: shop}
spec:
  workloadSelector: {labels: {app: legacy}}
  outboundTrafficPolicy: {mode: ALLOW_ANY}
---
";
    node.write_config(
        "all.yaml",
        &(yaml
            + sidecar
            + &namespace_yaml("shop", true, None)
            + &pod_yaml(&strict, &[("app", "strict")])
            + &pod_yaml(&legacy, &[("app", "legacy")])),
    );
    let daemon = Daemon::start(&node, &["--outbound-traffic-policy", "registry-only"]);
    daemon.wait_enrolled(&strict.uid, Duration::from_secs(5));
    daemon.wait_enrolled(&legacy.uid, Duration::from_secs(5));
    let unknown = external.addr(443).to_string();

    let out = strict.pdtool(&["connect", "--to", &unknown]);
    assert!(
        matches!(out["result"].as_str(), Some("reset") | Some("eof")),
        "refused: {out}"
    );
    let out = legacy.pdtool(&["connect", "--to", &unknown]);
    assert_eq!(out["result"], "ok", "the Sidecar allows any: {out}");
    let out = strict.pdtool(&["connect", "--to", &format!("{CLUSTER_IP}:80")]);
    assert_eq!(out["result"], "ok", "registered services still work: {out}");

    let blackhole = [
        ("source_workload", "strict"),
        ("destination_service_name", "BlackHoleCluster"),
        ("response_flags", "NR"),
    ];
    assert_eq!(
        daemon.metric_sum("istio_tcp_connections_opened_total", &blackhole),
        1.0
    );
    let passthrough = [
        ("source_workload", "legacy"),
        ("destination_service_name", "PassthroughCluster"),
    ];
    assert_eq!(
        daemon.metric_sum("istio_tcp_connections_opened_total", &passthrough),
        1.0
    );
}

#[test]
fn half_closes_and_resets_reach_the_other_side_as_they_were() {
    let mut node = Node::new("halfclose");
    let servers = Servers::new();
    let echo = node.host("echo");
    servers.http_echo(
        &echo,
        80,
        proxy_tests::servers::HttpEcho {
            name: "echo".into(),
            ..Default::default()
        },
    );
    let resetter = node.host("resetter");
    servers.resetter(&resetter, 7000);
    let captured = node.pod("shop", "client-1");
    let direct = node.pod("plain", "client-2");
    node.write_config(
        "all.yaml",
        &(namespace_yaml("shop", true, None)
            + &namespace_yaml("plain", false, None)
            + &pod_yaml(&captured, &[("app", "client")])
            + &pod_yaml(&direct, &[("app", "client")])),
    );
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&captured.uid, Duration::from_secs(5));
    // A client that sends its request and shuts its write side still gets the answer.
    let asked = captured.pdtool(&[
        "raw",
        "--to",
        &echo.addr(80).to_string(),
        "--send",
        "GET / HTTP/1.1\\r\\nHost: echo\\r\\n\\r\\n",
        "--half-close",
    ]);
    assert_eq!(asked["first_line"], "HTTP/1.1 200 OK", "{asked}");
    // An upstream that resets: the app sees a reset through the proxy, as it does direct.
    for (who, pod) in [("direct", &direct), ("captured", &captured)] {
        let out = pod.pdtool(&[
            "raw",
            "--to",
            &resetter.addr(7000).to_string(),
            "--send",
            "hello\\r\\n",
        ]);
        // (The reset may already meet the write: then pdtool reports it as the result.)
        assert!(
            out["reset"] == true || out["result"] == "reset",
            "{who}: a reset, not a clean close: {out}"
        );
    }
}

/// tcp[] match fields: `port` (the port the app dialled), `sourceNamespace`, and a block
/// bound to a gateway, which never matches pod traffic.
#[test]
fn tcp_matches_by_port_and_source_namespace_and_skips_gateway_blocks() {
    let mut node = Node::new("tcpmatch");
    let servers = Servers::new();
    let (b1, b2, yaml) = backend(&mut node, &servers);
    let one_port = "ports: [{name: tcp-reviews, port: 80, targetPort: 9080}]";
    assert!(yaml.contains(one_port));
    let yaml = yaml.replace(
        one_port,
        "ports: [{name: tcp-reviews, port: 80, targetPort: 9080}, {name: tcp-alt, port: 81, targetPort: 9080}]",
    );
    let client = node.pod("shop", "client-1");
    let other = node.pod("team-b", "client-b");
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: backend}
spec:
  hosts: [reviews.backend.svc.cluster.local]
  tcp:
  - match: [{gateways: [istio-system/ingress]}]
    route: [{destination: {host: reviews.backend.svc.cluster.local, subset: v2}}]
  - match: [{port: 81}]
    route: [{destination: {host: reviews.backend.svc.cluster.local, subset: v2}}]
  - match: [{sourceNamespace: team-b}]
    route: [{destination: {host: reviews.backend.svc.cluster.local, subset: v2}}]
  - route: [{destination: {host: reviews.backend.svc.cluster.local, subset: v1}}]
---
";
    node.write_config(
        "all.yaml",
        &(yaml
            + vs
            + &namespace_yaml("shop", true, None)
            + &namespace_yaml("team-b", true, None)
            + &pod_yaml(&client, &[("app", "client")])
            + &pod_yaml(&other, &[("app", "client")])),
    );
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(5));
    daemon.wait_enrolled(&other.uid, Duration::from_secs(5));
    let spread = |pod: &proxy_tests::Pod, port: u16| {
        pod.pdtool(&[
            "spread",
            "--to",
            &format!("{CLUSTER_IP}:{port}"),
            "--count",
            "20",
        ])
    };
    let out = spread(&client, 80);
    assert_eq!(
        count(&out, &b1),
        20,
        "no gateway block, default route: {out}"
    );
    let out = spread(&client, 81);
    assert_eq!(count(&out, &b2), 20, "port 81: {out}");
    let out = spread(&other, 80);
    assert_eq!(count(&out, &b2), 20, "sourceNamespace team-b: {out}");
}
