//! The demo node: pods as network namespaces with kubelet-like cgroups, an upstream
//! service, the daemon capturing with deploy/examples/demo.yaml, some traffic, and what the
//! daemon reports about it. Everything is removed at the end.
use std::time::Duration;

use proxy_tests::{
    daemon::Daemon,
    node::{endpoint_pod_yaml, Node},
    servers::{HttpEcho, Servers},
};

const YAML: &str = include_str!("../../../deploy/examples/demo.yaml");

fn main() {
    let mut node = Node::new("demo");
    let servers = Servers::new();
    let orders = node.host("orders");
    let _seen = servers.identity(&orders, 8080);
    let mut pods = Vec::new();
    for (ns, name, uid) in [
        (
            "shop",
            "web-6d4cf56db6-x7k2p",
            "5b1e6a3c-0d2f-4c1a-9e4b-7a2d3c4b5e01",
        ),
        (
            "payments",
            "ledger-0",
            "5b1e6a3c-0d2f-4c1a-9e4b-7a2d3c4b5e02",
        ),
        ("legacy", "old-cron", "5b1e6a3c-0d2f-4c1a-9e4b-7a2d3c4b5e03"),
    ] {
        pods.push(node.pod_with_uid(ns, name, uid));
    }
    node.write_config("demo.yaml", YAML);
    println!(
        "== demo node {}: bridge {}, cgroup root {}",
        node.id,
        node.bridge,
        node.cgroup_root.display()
    );
    let daemon = Daemon::start(&node, &[]);
    for p in &pods[..2] {
        daemon.wait_enrolled(&p.uid, Duration::from_secs(5));
    }
    println!("== enrolled workloads (admin /config_dump):");
    for w in daemon.config_dump()["workloads"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "   {}/{} workload={} fail_mode={} cgroup_id={} listener={}",
            w["namespace"].as_str().unwrap_or(""),
            w["pod"].as_str().unwrap_or(""),
            w["workload"].as_str().unwrap_or(""),
            w["fail_mode"].as_str().unwrap_or(""),
            w["cgroup_id"],
            w["listener"].as_str().unwrap_or("")
        );
    }
    let to = orders.addr(8080).to_string();
    println!("== traffic to orders at {to}:");
    for (pod, count) in [(&pods[0], "20"), (&pods[1], "10"), (&pods[2], "5")] {
        let r = pod.pdtool(&["probe", "--to", &to, "--count", count, "--concurrency", "5"]);
        let one = pod.pdtool(&["connect", "--to", &to]);
        println!(
            "   {:<22} {} ok, {} failed; app socket {} ({})",
            pod.name,
            r["ok"],
            r["failed"],
            one["local"].as_str().unwrap_or("?"),
            if one["local"]
                .as_str()
                .unwrap_or("")
                .starts_with("127.0.0.1:")
            {
                "captured"
            } else {
                "direct"
            }
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    println!("== metrics (node endpoint /metrics), abridged:");
    for line in daemon.metrics_text().lines() {
        if line.starts_with("istio_tcp_connections_opened_total")
            || line.starts_with("istio_tcp_sent_bytes_total")
            || line.starts_with("proxy_daemon_enrolled_pods")
            || line.starts_with("proxy_daemon_capture_decisions")
        {
            println!("   {}", abridge(line));
        }
    }
    // L7: a 10/90 split between two versions of reviews, every call mirrored to a shadow.
    let mut http_yaml = String::new();
    for (name, version) in [
        ("reviews-v1", "v1"),
        ("reviews-v2", "v2"),
        ("reviews-shadow", "shadow"),
    ] {
        let h = node.host(name);
        servers.http_echo(
            &h,
            9080,
            HttpEcho {
                name: name.into(),
                ..Default::default()
            },
        );
        let app = if version == "shadow" {
            "reviews-shadow"
        } else {
            "reviews"
        };
        http_yaml += &endpoint_pod_yaml(
            &h,
            &format!("{name}-0"),
            "shop",
            &[("app", app), ("version", version)],
        );
    }
    http_yaml += REVIEWS_YAML;
    node.write_config("demo-http.yaml", &http_yaml);
    std::thread::sleep(Duration::from_millis(600));
    println!("== HTTP: web -> reviews (VirtualService 10/90 v1/v2, mirrored to reviews-shadow):");
    let top = std::thread::scope(|s| {
        let load = s.spawn(|| {
            pods[0].pdtool(&[
                "http",
                "--to",
                "198.18.0.250:9080",
                "--host",
                "reviews",
                "--count",
                "300",
                "--rate",
                "150",
            ])
        });
        std::thread::sleep(Duration::from_millis(600));
        let top = std::process::Command::new(proxy_tests::target_bin("proxy-daemon"))
            .args([
                "top",
                "--metrics-addr",
                &daemon.metrics.to_string(),
                "--interval-ms",
                "1000",
                "--iterations",
                "1",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let r = load.join().expect("load");
        println!(
            "   {} requests: {} answered by {}",
            300, r["statuses"], r["servers"]
        );
        top
    });
    std::thread::sleep(Duration::from_millis(300));
    for line in daemon.metrics_text().lines() {
        if line.starts_with("istio_requests_total")
            || line.starts_with("proxy_daemon_mirror_requests_total")
        {
            println!("   {}", abridge(line));
        }
    }
    println!("== proxy-daemon top (one frame):");
    for line in top.lines() {
        println!("   {line}");
    }
    println!("== cleaning up");
}

const REVIEWS_YAML: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 198.18.0.250
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-shadow, namespace: shop}
spec:
  clusterIP: 198.18.0.251
  selector: {app: reviews-shadow}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 10}
    - {destination: {host: reviews, subset: v2}, weight: 90}
    mirror: {host: reviews-shadow}
    mirrorPercentage: {value: 100}
";

/// Keeps the labels a person reads first.
fn abridge(line: &str) -> String {
    let Some((name, rest)) = line.split_once('{') else {
        return line.to_string();
    };
    let Some((labels, value)) = rest.rsplit_once("} ") else {
        return line.to_string();
    };
    let keep: Vec<&str> = labels
        .split(',')
        .filter(|kv| {
            [
                "source_workload=",
                "source_workload_namespace=",
                "destination_service=",
                "destination_version=",
                "response_code=",
                "result=",
                "decision=",
                "response_flags=",
            ]
            .iter()
            .any(|k| kv.starts_with(k))
        })
        .collect();
    format!("{name}{{{}}} {value}", keep.join(","))
}
