//! Foundation end-to-end tests: real eBPF on real cgroups, pods as network namespaces,
//! the daemon as a real process. Each test builds its own node and tears it down.
use std::time::{Duration, Instant};

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml, Node},
    servers::Servers,
    wait_for,
};

#[test]
fn captured_pod_reaches_upstream_through_daemon_with_its_own_ip() {
    let mut node = Node::new("basic");
    let servers = Servers::new();
    let upstream = node.host("upstream");
    let seen = servers.identity(&upstream, 8080);
    let pod = node.pod("shop", "web-1");
    node.write_config(
        "shop.yaml",
        &(namespace_yaml("shop", true, None)
            + &pod_yaml(&pod, &[("app", "web"), ("version", "v1")])),
    );
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));

    let out = pod.pdtool(&["connect", "--to", &upstream.addr(8080).to_string()]);
    assert_eq!(out["result"], "ok", "{out}");
    // The app reached the server it asked for and sees it as its peer (getpeername4).
    assert!(
        out["reply"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{} ", upstream.addr(8080))),
        "{out}"
    );
    assert_eq!(out["peer"], upstream.addr(8080).to_string());
    // Captured: the app's socket is connected to the pod-local listener...
    assert!(
        out["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{out}"
    );
    // ...and the upstream saw the pod's own IP, not the node's.
    let peers = seen.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].0.ip(), std::net::IpAddr::V4(pod.host.ip));

    let labels = [
        ("reporter", "source"),
        ("source_workload", "web"),
        ("source_workload_namespace", "shop"),
        ("source_app", "web"),
        ("source_version", "v1"),
        ("destination_service_name", "PassthroughCluster"),
    ];
    let dst = upstream.addr(8080).to_string();
    let labels_with_dst: Vec<_> = labels
        .iter()
        .copied()
        .chain([("destination_service", dst.as_str())])
        .collect();
    let closed = wait_for(Duration::from_secs(3), || {
        (daemon.metric_sum("istio_tcp_connections_closed_total", &labels_with_dst) >= 1.0)
            .then_some(())
    });
    assert!(closed.is_some(), "metrics:\n{}", daemon.metrics_text());
    assert_eq!(
        daemon.metric_sum("istio_tcp_connections_opened_total", &labels_with_dst),
        1.0
    );
    // "connect\n" went up; the reply line came back.
    assert_eq!(
        daemon.metric_sum("istio_tcp_received_bytes_total", &labels_with_dst),
        8.0
    );
    let reply_len = out["reply"].as_str().unwrap().len() as f64 + 1.0;
    assert_eq!(
        daemon.metric_sum("istio_tcp_sent_bytes_total", &labels_with_dst),
        reply_len
    );
    assert_eq!(daemon.metric_sum("proxy_daemon_enrolled_pods", &[]), 1.0);
}
