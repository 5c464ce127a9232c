//! `--sockmap`: both ends of each pod ↔ listener connection sit in a sockhash and an
//! sk_msg program hands every message straight to the other end's receive queue. What a
//! user checks: the same routing, metrics and byte-exact opaque TCP as without it, and the
//! counters showing the connections really were paired, and that a pod cannot use the
//! redirect to pile bytes up in the daemon.
use std::time::Duration;

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml, Node},
    reviews::{canary_virtual_service, served, to, Reviews},
    servers::Servers,
    wait_for,
};

const SOCKMAP: &[&str] = &["--sockmap"];

fn decisions(daemon: &Daemon, decision: &str) -> f64 {
    daemon.metric_sum("proxy_daemon_capture_decisions", &[("decision", decision)])
}

#[test]
fn routed_http_over_paired_sockets_is_routed_counted_and_never_falls_back() {
    let vs = canary_virtual_service();
    let r = Reviews::builder("sockmap-route")
        .yaml(&vs)
        .flags(SOCKMAP)
        .pod("shop", "client-1", &[("app", "client")])
        .start();
    let pod = &r.pods[0];
    let plain = pod.pdtool(&[
        "http",
        "--to",
        &to(),
        "--host",
        "reviews.backend",
        "--count",
        "30",
    ]);
    assert_eq!(plain["statuses"]["200"], 30, "{plain}");
    assert_eq!(served(&plain, "reviews-v1"), 30, "{plain}");
    let canary = pod.pdtool(&[
        "http",
        "--to",
        &to(),
        "--host",
        "reviews.backend",
        "--header",
        "x-canary: yes",
        "--count",
        "30",
    ]);
    assert_eq!(served(&canary, "reviews-v2"), 30, "{canary}");
    let counted = wait_for(Duration::from_secs(3), || {
        (r.daemon.metric_sum(
            "istio_requests_total",
            &[("source_workload", "client"), ("response_code", "200")],
        ) == 60.0)
            .then_some(())
    });
    assert!(counted.is_some(), "{}", r.daemon.metrics_text());
    // Both ends of each of the two connections were paired, and no message had to take
    // TCP.
    let paired = decisions(&r.daemon, "sockmap_paired");
    assert!(paired >= 4.0, "paired ends: {paired}");
    // A connection's first message may beat the pairing of the listener's end (the
    // handshake's last ACK handled late under load): that end then stays on TCP. At most
    // once per connection.
    let fell_back = decisions(&r.daemon, "sockmap_fallback");
    assert!(fell_back <= 2.0, "fallbacks: {fell_back}");
    let dump = r.daemon.config_dump();
    assert_eq!(dump["settings"]["sockmap"], true, "{}", dump["settings"]);
}

#[test]
fn opaque_tcp_over_paired_sockets_arrives_byte_identical_both_ways() {
    const SIZE: u64 = 20 * 1024 * 1024;
    let mut node = Node::new("sockmap-xfer");
    let servers = Servers::new();
    let upstream = node.host("store");
    let records = servers.xfer(&upstream, 7000, SIZE, 0x5eed);
    let pod = node.pod("shop", "uploader-1");
    node.write_config(
        "shop.yaml",
        &(namespace_yaml("shop", true, None) + &pod_yaml(&pod, &[("app", "uploader")])),
    );
    let daemon = Daemon::start(&node, SOCKMAP);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));

    // Once its budget is spent the app's end sends through TCP, whose ACKs wake pdtool's
    // blocking reader with nothing to read: the kernel's sockmap recvmsg then says EAGAIN
    // (a limit stated in the README). Read on, to check the bytes themselves.
    let out = proxy_tests::xfer_both_ways(
        &pod,
        "uploader",
        upstream.addr(7000),
        &records,
        SIZE,
        &daemon,
        &["--retry-eagain"],
    );
    eprintln!(
        "spurious EAGAIN on the app's blocking reads: {}",
        out["spurious_eagain"]
    );
    assert_eq!(decisions(&daemon, "sockmap_paired"), 2.0);
    assert_eq!(decisions(&daemon, "sockmap_fallback"), 0.0);
    // 20 MiB from the app is past its end's 4 MiB budget: it went on over TCP midway, and
    // the hashes above show no byte overtook another at the switch. The listener's end is
    // not counted (what it hands over waits in the pod's own memory).
    assert_eq!(decisions(&daemon, "sockmap_budget_spent"), 1.0);
}

#[test]
fn a_pod_flooding_a_stalled_upstream_is_pushed_back_instead_of_filling_the_daemon() {
    const FLOOD: u64 = 256 * 1024 * 1024;
    let mut node = Node::new("sockmap-flood");
    let upstream = node.host("stalled");
    // Accepts and never reads: everything the pod sends waits somewhere on the way.
    let listener = upstream.listen(7100);
    listener.set_nonblocking(false).expect("blocking accept");
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().take(4).flatten() {
            keep.lock().unwrap().push(s);
        }
    });
    let pod = node.pod("shop", "flooder-1");
    node.write_config(
        "shop.yaml",
        &(namespace_yaml("shop", true, None) + &pod_yaml(&pod, &[("app", "flooder")])),
    );
    let daemon = Daemon::start(&node, SOCKMAP);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));

    let out = pod.pdtool(&[
        "flood",
        "--to",
        &upstream.addr(7100).to_string(),
        "--bytes",
        &FLOOD.to_string(),
        "--ms",
        "1500",
    ]);
    assert_eq!(out["result"], "ok", "{out}");
    assert_eq!(out["blocked"], true, "the pod's writes never waited: {out}");
    // Redirected bytes are queued at the daemon whatever its receive buffer says; the
    // budget sends the rest through TCP, whose windows push back. What got in is the
    // budget plus the TCP buffers on the way (pod, daemon, upstream), far below the flood.
    let written = out["written"].as_u64().unwrap_or(u64::MAX);
    eprintln!("written into a stalled path before the pod's write waited: {written} bytes");
    assert!(
        written < 48 * 1024 * 1024,
        "{written} bytes written into a stalled path"
    );
    assert_eq!(decisions(&daemon, "sockmap_budget_spent"), 1.0);
    assert_eq!(decisions(&daemon, "sockmap_paired"), 2.0);
    drop(held);
}

#[test]
fn a_short_opaque_request_over_a_paired_socket_is_answered() {
    // One small message, then the app waits for the answer: nothing later would wake a
    // daemon that missed it (iperf3's control connection is such a client).
    let (mut node, _servers, upstream, _seen) =
        proxy_tests::node_with_upstream("sockmap-short", 8080);
    let pod = node.pod("shop", "asker-1");
    node.write_config(
        "shop.yaml",
        &(namespace_yaml("shop", true, None) + &pod_yaml(&pod, &[("app", "asker")])),
    );
    let daemon = Daemon::start(&node, SOCKMAP);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    for _ in 0..20 {
        let out = pod.pdtool(&[
            "connect",
            "--to",
            &upstream.addr(8080).to_string(),
            "--timeout-ms",
            "3000",
        ]);
        assert_eq!(out["result"], "ok", "{out}");
    }
    assert!(decisions(&daemon, "sockmap_paired") >= 40.0);
}
