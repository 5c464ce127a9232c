//! `--capture iptables`: no eBPF at all; each captured pod's netns gets a REDIRECT to its
//! listener and the daemon reads the original destination with SO_ORIGINAL_DST. The same
//! routing, identity and metrics as the eBPF mode, and the mode's own limits stated.
use std::time::Duration;

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml},
    node_with_upstream,
    reviews::{canary_virtual_service, served, to, Reviews, HOST},
    wait_for,
};

const IPTABLES: &[&str] = &["--capture", "iptables"];

/// The nat rules in a pod's netns, as `iptables -S` prints them.
fn nat_rules(pod: &proxy_tests::Pod) -> String {
    let out = pod
        .host
        .command(
            None,
            std::path::Path::new("iptables"),
            &["-w", "-t", "nat", "-S"],
        )
        .output()
        .expect("iptables -S");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn virtual_service_routing_and_istio_metrics_work_without_any_ebpf() {
    let vs = canary_virtual_service();
    let r = Reviews::builder("ipt-route")
        .yaml(&vs)
        .flags(IPTABLES)
        .pod("shop", "client-1", &[("app", "client"), ("version", "v3")])
        .start();
    let pod = &r.pods[0];
    // Nothing is loaded into the kernel; the dump says how capture works instead.
    let dump = r.daemon.config_dump();
    assert_eq!(dump["ebpf"]["capture"], "iptables", "{}", dump["ebpf"]);
    assert_eq!(dump["ebpf"]["programs"], serde_json::Value::Null);
    let rules = nat_rules(pod);
    assert!(
        rules.contains("-A OUTPUT -p tcp -j PROXY_DAEMON_OUTPUT")
            && rules.contains("--to-ports 15001"),
        "{rules}"
    );

    let plain = pod.pdtool(&[
        "http",
        "--to",
        &to(),
        "--host",
        "reviews.backend",
        "--count",
        "20",
    ]);
    assert_eq!(plain["statuses"]["200"], 20, "{plain}");
    assert_eq!(served(&plain, "reviews-v1"), 20, "{plain}");
    let canary = pod.pdtool(&[
        "http",
        "--to",
        &to(),
        "--host",
        "reviews.backend",
        "--header",
        "x-canary: yes",
        "--count",
        "20",
    ]);
    assert_eq!(served(&canary, "reviews-v2"), 20, "{canary}");
    let labels = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        ("source_version", "v3"),
        ("destination_service", HOST),
        ("response_code", "200"),
    ];
    let counted = wait_for(Duration::from_secs(3), || {
        (r.daemon.metric_sum("istio_requests_total", &labels) == 40.0).then_some(())
    });
    assert!(counted.is_some(), "{}", r.daemon.metrics_text());
}

#[test]
fn passthrough_keeps_the_dialled_address_and_the_pod_ip_and_only_captured_pods_are_redirected() {
    let (mut node, _servers, upstream, seen) = node_with_upstream("ipt-pass", 8080);
    let captured = node.pod("shop", "web-1");
    let plain = node.pod("plain", "cron-1");
    node.write_config(
        "all.yaml",
        &(namespace_yaml("shop", true, None)
            + &namespace_yaml("plain", false, None)
            + &pod_yaml(&captured, &[("app", "web")])
            + &pod_yaml(&plain, &[("app", "cron")])),
    );
    let daemon = Daemon::start(&node, IPTABLES);
    daemon.wait_enrolled(&captured.uid, Duration::from_secs(5));
    let dst = upstream.addr(8080).to_string();

    let out = captured.pdtool(&["connect", "--to", &dst]);
    assert_eq!(out["result"], "ok", "{out}");
    // NAT is invisible to the app: its peer is what it dialled...
    assert_eq!(out["peer"], dst, "{out}");
    assert!(
        out["reply"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{dst} ")),
        "{out}"
    );
    // ...the upstream saw the pod's own IP (the daemon's socket is in the pod netns, marked
    // so the redirect lets it out, not looped back to the listener)...
    let peers = seen.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].0.ip(), std::net::IpAddr::V4(captured.host.ip));
    // ...and the daemon proxied it, knowing where it was going.
    let opened = |workload: &str| {
        daemon.metric_sum(
            "istio_tcp_connections_opened_total",
            &[
                ("source_workload", workload),
                ("destination_service", dst.as_str()),
                ("destination_service_name", "PassthroughCluster"),
            ],
        )
    };
    assert!(
        wait_for(Duration::from_secs(3), || (opened("web") == 1.0)
            .then_some(()))
        .is_some(),
        "{}",
        daemon.metrics_text()
    );
    assert_eq!(
        daemon.metric_sum("proxy_daemon_orig_dst_missing_total", &[]),
        0.0
    );

    // A namespace not labelled for capture gets no rules and goes out directly.
    assert!(!nat_rules(&plain).contains("PROXY_DAEMON_OUTPUT"));
    let out = plain.pdtool(&["connect", "--to", &dst]);
    assert_eq!(out["result"], "ok", "{out}");
    assert_eq!(opened("cron"), 0.0);
}

#[test]
fn no_listener_means_refused_a_restart_recaptures_and_an_opted_out_pod_gets_its_rules_removed() {
    let (mut node, _servers, upstream, _seen) = node_with_upstream("ipt-life", 80);
    let pod = node.pod("shop", "web-1");
    let yaml = |capture: &str| {
        namespace_yaml("shop", true, None)
            + &pod_yaml(&pod, &[("app", "web"), ("nodeproxy.io/capture", capture)])
    };
    node.write_config("all.yaml", &yaml("enabled"));
    let to = upstream.addr(80).to_string();
    let mut daemon = Daemon::start(&node, IPTABLES);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    assert_eq!(pod.pdtool(&["connect", "--to", &to])["result"], "ok");

    // The mode's stated limit: with the daemon gone the redirect stays and nobody listens,
    // so connects are refused at once (never hang), whatever the fail mode.
    daemon.kill9();
    let out = pod.pdtool(&["connect", "--to", &to]);
    assert_eq!(out["result"], "refused", "{out}");

    // A new daemon re-applies the rules as they are (no duplicate jump) and captures again.
    let daemon = Daemon::start(&node, IPTABLES);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    let out = pod.pdtool(&["connect", "--to", &to]);
    assert_eq!(out["result"], "ok", "{out}");
    let rules = nat_rules(&pod);
    assert_eq!(
        rules.matches("-j PROXY_DAEMON_OUTPUT").count(),
        1,
        "{rules}"
    );

    // Opting the pod out removes its rules: it connects directly, not refused.
    node.write_config("all.yaml", &yaml("disabled"));
    let gone = wait_for(Duration::from_secs(10), || {
        (!nat_rules(&pod).contains("PROXY_DAEMON_OUTPUT")).then_some(())
    });
    assert!(gone.is_some(), "{}", nat_rules(&pod));
    let before = daemon.metric_sum("istio_tcp_connections_opened_total", &[]);
    let out = pod.pdtool(&["connect", "--to", &to]);
    assert_eq!(out["result"], "ok", "{out}");
    assert_eq!(
        daemon.metric_sum("istio_tcp_connections_opened_total", &[]),
        before
    );
}

/// The redirect lets the daemon's own sockets out by their cgroup, not by a mark: a pod
/// that sets the mark ztunnel and this daemon's sockets carry (0x539; `SO_MARK` needs only
/// CAP_NET_RAW since Linux 5.17, and runtimes grant it) is redirected like any other.
#[test]
fn a_pod_setting_the_daemons_mark_is_redirected_all_the_same() {
    let (mut node, _servers, upstream, seen) = node_with_upstream("ipt-mark", 8080);
    let pod = node.pod("shop", "web-1");
    node.write_config(
        "all.yaml",
        &(namespace_yaml("shop", true, None) + &pod_yaml(&pod, &[("app", "web")])),
    );
    let daemon = Daemon::start(&node, IPTABLES);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    let rules = nat_rules(&pod);
    assert!(rules.contains("-m cgroup --path"), "{rules}");
    assert!(!rules.contains("--mark"), "{rules}");
    let dst = upstream.addr(8080).to_string();
    let out = pod.pdtool(&["connect", "--to", &dst, "--mark", &0x539.to_string()]);
    assert_eq!(out["result"], "ok", "{out}");
    // Proxied: the daemon counted it as the pod's, and the upstream saw one connection
    // from the pod's address (the daemon's, made in the pod's namespace).
    assert!(
        wait_for(Duration::from_secs(3), || (daemon.metric_sum(
            "istio_tcp_connections_opened_total",
            &[
                ("source_workload", "web"),
                ("destination_service", dst.as_str())
            ]
        ) == 1.0)
            .then_some(()))
        .is_some(),
        "the marked connect went around the proxy: {}",
        daemon.metrics_text()
    );
    assert_eq!(seen.peers().len(), 1);
}

/// Inbound under `--capture iptables`: a PREROUTING redirect sends connections arriving at
/// a captured pod to the daemon's plaintext inbound listener (the original destination from
/// conntrack), so PeerAuthentication applies as with the eBPF program; the probe address
/// reaches the app directly.
#[test]
fn inbound_plaintext_goes_through_the_daemon_and_strict_refuses_it_without_ebpf() {
    let mut node = proxy_tests::Node::new("ipt-inbound");
    let servers = proxy_tests::servers::Servers::new();
    let db = node.pod("prod", "db-0");
    let outsider = node.host("outsider");
    let kubelet = node.host_at("kubelet", "169.254.7.127".parse().unwrap());
    db.host.route_to("169.254.7.127".parse().unwrap());
    let seen = servers.identity(&db.host, 7000);
    let base = namespace_yaml("prod", true, None) + &pod_yaml(&db, &[("app", "db")]);
    node.write_config("all.yaml", &base);
    let d = Daemon::start(&node, IPTABLES);
    d.wait_enrolled(&db.uid, Duration::from_secs(5));
    let rules = nat_rules(&db);
    assert!(
        rules.contains("-A PREROUTING -p tcp -j PROXY_DAEMON_INBOUND")
            && rules.contains("--to-ports 15006"),
        "{rules}"
    );
    let connect = |from: &proxy_tests::Host| -> serde_json::Value {
        let out = from
            .command(
                None,
                &proxy_tests::target_bin("pdtool"),
                &["connect", "--to", &db.host.addr(7000).to_string()],
            )
            .output()
            .expect("pdtool");
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let last_peer = || {
        seen.peers()
            .last()
            .map(|(p, _)| p.ip().to_string())
            .unwrap_or_default()
    };
    assert_eq!(connect(&outsider)["result"], "ok");
    assert_eq!(last_peer(), "127.0.0.6", "through the daemon");
    assert!(
        wait_for(Duration::from_secs(3), || (d.metric_sum(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("destination_workload", "db"),
                ("connection_security_policy", "none")
            ]
        ) == 1.0)
            .then_some(()))
        .is_some(),
        "{}",
        d.metrics_text()
    );
    assert_eq!(connect(&kubelet)["result"], "ok");
    assert_eq!(
        last_peer(),
        "169.254.7.127",
        "the probe goes straight to the app"
    );
    node.write_config(
        "all.yaml",
        &(base
            + "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: prod}\nspec: {mtls: {mode: STRICT}}\n"),
    );
    let refused = wait_for(Duration::from_secs(5), || {
        let out = connect(&outsider);
        (out["result"] != "ok").then_some(out)
    });
    assert!(refused.is_some(), "STRICT refuses plaintext");
    assert!(
        d.metric_sum(
            "proxy_daemon_inbound_refused_total",
            &[("reason", "plaintext_strict")]
        ) >= 1.0
    );
    assert_eq!(connect(&kubelet)["result"], "ok");
}
