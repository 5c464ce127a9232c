//! Upgrades without losing a request: a new daemon started beside the running one takes
//! its sockets (the pod listeners and the admin, metrics and health ports), the old one
//! drains and exits, while captured pods keep sending. Checked per request: every HTTP
//! request answered 200, every opaque TCP stream's SHA-256 intact, no connect refused.
use std::time::{Duration, Instant};

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml, Node},
    servers::{HttpEcho, Servers},
};
use sha2::{Digest as _, Sha256};

const STREAM_BYTES: u64 = 1 << 20;
const SERVER_SEED: u64 = 77;

fn expected_server_stream() -> String {
    let mut h = Sha256::new();
    let mut state = SERVER_SEED;
    let mut left = STREAM_BYTES;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        proxy_tests::fill(&mut state, &mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    hex::encode(h.finalize())
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    l.local_addr().expect("addr").to_string()
}

#[test]
fn hand_overs_under_load_lose_no_request_and_no_stream() {
    let handovers: usize = proxy_tests::env_size("PDT_HANDOVERS", 10);
    let mut node = Node::new("handover");
    let servers = Servers::new();
    let backend = node.host("backend");
    servers.http_echo(
        &backend,
        80,
        HttpEcho {
            name: "backend".into(),
            ..Default::default()
        },
    );
    let records = servers.xfer(&backend, 9000, STREAM_BYTES, SERVER_SEED);
    let open_pod = node.pod("relaxed", "client-0");
    let closed_pod = node.pod("strict", "client-1");
    node.write_config(
        "all.yaml",
        &(namespace_yaml("relaxed", true, None)
            + &namespace_yaml("strict", true, Some("closed"))
            + &pod_yaml(&open_pod, &[("app", "client")])
            + &pod_yaml(&closed_pod, &[("app", "client")])),
    );
    // Every daemon on the same ports, as a DaemonSet's pods are.
    let (admin, metrics, health) = (free_addr(), free_addr(), free_addr());
    let flags = [
        "--admin-addr",
        admin.as_str(),
        "--metrics-addr",
        metrics.as_str(),
        "--health-addr",
        health.as_str(),
        "--drain-timeout-secs",
        "20",
    ];
    let mut current = Daemon::start(&node, &flags);
    for pod in [&open_pod, &closed_pod] {
        current.wait_enrolled(&pod.uid, Duration::from_secs(5));
    }
    let to_http = backend.addr(80).to_string();
    let to_tcp = backend.addr(9000).to_string();
    let load_ms = (handovers as u64 * 1500 + 3000).to_string();
    let expected = expected_server_stream();
    let spawn = |pod: &proxy_tests::Pod, args: &[&str]| {
        pod.host
            .command(
                Some(&pod.app_cgroup()),
                &proxy_tests::target_bin("pdtool"),
                args,
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("load")
    };
    let keep_alive = spawn(
        &open_pod,
        &[
            "load", "--to", &to_http, "--host", "backend", "--ms", &load_ms, "--rate", "200",
        ],
    );
    let new_conns = spawn(
        &closed_pod,
        &[
            "load",
            "--to",
            &to_http,
            "--host",
            "backend",
            "--ms",
            &load_ms,
            "--rate",
            "100",
            "--new-connections",
        ],
    );
    let streams = spawn(
        &open_pod,
        &[
            "streams",
            "--to",
            &to_tcp,
            "--bytes",
            &STREAM_BYTES.to_string(),
            "--expect-sha256",
            &expected,
            "--ms",
            &load_ms,
        ],
    );
    let mut longest = Duration::ZERO;
    for i in 0..handovers {
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let next = Daemon::start(&node, &flags);
        // The old one stops accepting, drains and exits by itself.
        let code = current.wait_exit(Duration::from_secs(25));
        let took = started.elapsed();
        longest = longest.max(took);
        assert_eq!(
            code,
            Some(0),
            "hand-over {i}: old daemon log:\n{}",
            current.log_text()
        );
        assert!(current.log_text().contains("handed over to a new daemon"));
        assert!(
            next.log_text()
                .contains("took over the running daemon's sockets"),
            "{}",
            next.log_text()
        );
        // The same ports answer, now from the new daemon.
        assert!(next.is_ready());
        current = next;
    }
    let read = |child: std::process::Child| -> serde_json::Value {
        let out = child.wait_with_output().expect("load output");
        serde_json::from_slice(&out.stdout).expect("load JSON")
    };
    let (ka, nc, st) = (read(keep_alive), read(new_conns), read(streams));
    println!(
        "{handovers} hand-overs (longest {longest:?}) | keep-alive {} | new connections {} | streams ok {} bad {}",
        serde_json::json!({"requests": ka["requests"], "statuses": ka["statuses"], "retries": ka["retries"], "p99_us": ka["p99_us"], "max_us": ka["max_us"]}),
        serde_json::json!({"requests": nc["requests"], "statuses": nc["statuses"], "p99_us": nc["p99_us"], "max_us": nc["max_us"]}),
        st["ok"],
        st["bad"]
    );
    for (name, out) in [("keep-alive", &ka), ("new connections", &nc)] {
        assert_eq!(out["errors"], serde_json::json!([]), "{name}: {out}");
        let requests = out["requests"].as_u64().unwrap_or(0);
        assert!(requests > 100, "{name}: {out}");
        assert_eq!(
            out["statuses"]["200"].as_u64(),
            Some(requests),
            "{name}: {out}"
        );
    }
    // Not even a resend: a draining daemon answers each keep-alive connection's next
    // request with Connection: close instead of closing it between requests.
    assert_eq!(ka["retries"], serde_json::json!(0), "keep-alive: {ka}");
    assert_eq!(st["bad"], serde_json::json!([]), "{st}");
    assert!(st["ok"].as_u64().unwrap_or(0) > 0, "{st}");
    // The server received every stream whole, through whichever daemon carried it.
    let sent: Vec<String> = st["sent"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    // (The server records a stream once its own side is done: give the last a moment.)
    let missing = |got: &[proxy_tests::servers::XferRecord]| -> Vec<String> {
        sent.iter()
            .filter(|hash| {
                !got.iter()
                    .any(|r| &r.received_sha256 == *hash && r.received_bytes == STREAM_BYTES)
            })
            .cloned()
            .collect()
    };
    let all_there = proxy_tests::wait_for(Duration::from_secs(3), || {
        missing(&records.lock().expect("records"))
            .is_empty()
            .then_some(())
    });
    assert!(
        all_there.is_some(),
        "streams that did not arrive whole: {:?}",
        missing(&records.lock().expect("records"))
    );
    // Nothing was refused in the fail-closed namespace, and the last daemon runs.
    assert_eq!(
        current.metric_sum(
            "proxy_daemon_capture_decisions",
            &[("decision", "fail_closed_refused")]
        ),
        0.0
    );
    assert_eq!(current.terminate(), Some(0));
}

/// Pods come and go while traffic flows: every live pod of a captured namespace is captured,
/// and afterwards map entries, listeners, threads, fds and metric series are back at their
/// baseline. `PDT_CHURN_PODS` / `PDT_CHURN_SECS` size it (CI: 40 pods over 20 s;
/// `cargo xtask soak`: 200 over 120 s).
#[test]
fn pod_churn_leaves_nothing_behind() {
    let pods: usize = proxy_tests::env_size("PDT_CHURN_PODS", 40);
    let secs: u64 = proxy_tests::env_size("PDT_CHURN_SECS", 20);
    let mut node = Node::new("churn");
    let servers = Servers::new();
    let backend = node.host("backend");
    servers.http_echo(
        &backend,
        80,
        HttpEcho {
            name: "backend".into(),
            ..Default::default()
        },
    );
    let _seen = servers.identity(&backend, 81);
    let steady = node.pod("steady", "web-0");
    node.write_config(
        "base.yaml",
        &(namespace_yaml("steady", true, None)
            + &namespace_yaml("churn", true, Some("closed"))
            + &pod_yaml(&steady, &[("app", "web")])),
    );
    let daemon = Daemon::start(
        &node,
        &["--metrics-retention-secs", "1", "--log-level", "info"],
    );
    daemon.wait_enrolled(&steady.uid, Duration::from_secs(5));
    let to = backend.addr(80).to_string();
    // Warm up, then the baseline.
    let out = steady.pdtool(&["http", "--to", &to, "--host", "backend", "--count", "20"]);
    assert_eq!(out["statuses"]["200"], 20, "{out}");
    std::thread::sleep(Duration::from_millis(500));
    let pid = daemon.pid().expect("pid");
    let gauges = |d: &Daemon| {
        let text = d.metrics_text();
        let g = |name: &str, labels: &[(&str, &str)]| {
            proxy_tests::daemon::sum_samples(&text, name, labels)
        };
        let series = text
            .lines()
            .filter(|l| l.starts_with("istio_") && !l.starts_with('#'))
            .count();
        (
            g("proxy_daemon_listeners", &[]),
            g("proxy_daemon_ebpf_map_entries", &[("map", "PD_ENROLLED")]),
            g("proxy_daemon_ebpf_map_entries", &[("map", "PD_CLIENT_DST")]),
            series,
        )
    };
    let base = gauges(&daemon);
    let (fds_before, threads_before) = (proxy_tests::open_fds(pid), threads(pid));
    let steady_load = steady
        .host
        .command(
            Some(&steady.app_cgroup()),
            &proxy_tests::target_bin("pdtool"),
            &[
                "load",
                "--to",
                &to,
                "--host",
                "backend",
                "--ms",
                &((secs + 5) * 1000).to_string(),
                "--rate",
                "50",
            ],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("load");
    // Create and delete pods over `secs`, a few alive at any time; each one, once enrolled,
    // must be captured (fail-closed namespace: never a direct connect).
    let started = Instant::now();
    let gap = Duration::from_secs(secs) / pods as u32;
    let mut alive: std::collections::VecDeque<(proxy_tests::Pod, String)> = Default::default();
    let mut checked = 0;
    for i in 0..pods {
        let pod = node.pod("churn", &format!("churn-{i}"));
        let file = format!("churn-{i}.yaml");
        node.write_config(&file, &pod_yaml(&pod, &[("app", "churn")]));
        daemon.wait_enrolled(&pod.uid, Duration::from_secs(10));
        let out = pod.pdtool(&["http", "--to", &to, "--host", "backend", "--count", "3"]);
        assert_eq!(out["statuses"]["200"], 3, "pod {i}: {out}");
        let captured = pod.pdtool(&["connect", "--to", &backend.addr(81).to_string()]);
        assert_eq!(captured["result"], "ok", "pod {i}: {captured}");
        assert!(
            captured["local"]
                .as_str()
                .unwrap_or("")
                .starts_with("127.0.0.1:"),
            "pod {i} connected directly: {captured}"
        );
        checked += 1;
        alive.push_back((pod, file));
        if alive.len() > 4 {
            let (mut gone, file) = alive.pop_front().expect("oldest");
            node.remove_config(&file);
            gone.stop();
        }
        std::thread::sleep(gap.saturating_sub(Duration::from_millis(50)));
    }
    for (mut gone, file) in alive.drain(..) {
        node.remove_config(&file);
        gone.stop();
    }
    let churn_took = started.elapsed();
    let load = steady_load.wait_with_output().expect("load");
    let load: serde_json::Value = serde_json::from_slice(&load.stdout).expect("load JSON");
    assert_eq!(load["errors"], serde_json::json!([]), "{load}");
    // Back to the baseline once the last pods' state and series have expired.
    let settled = proxy_tests::wait_for(Duration::from_secs(15), || {
        let now = gauges(&daemon);
        (now.0 == base.0 && now.1 == base.1 && now.3 <= base.3).then_some(now)
    });
    let (fds_after, threads_after) = (proxy_tests::open_fds(pid), threads(pid));
    println!(
        "churn: {checked} pods in {churn_took:?} | listeners/enrolled/orig-dst entries/istio series {base:?} → {:?} | fds {fds_before} → {fds_after} | threads {threads_before} → {threads_after} | steady pod {}",
        gauges(&daemon),
        serde_json::json!({"requests": load["requests"], "statuses": load["statuses"], "p99_us": load["p99_us"]})
    );
    assert!(
        settled.is_some(),
        "not back to the baseline: {base:?} → {:?}",
        gauges(&daemon)
    );
    assert!(
        fds_after <= fds_before + 4,
        "fds {fds_before} → {fds_after}"
    );
    assert!(
        threads_after <= threads_before + 2,
        "threads {threads_before} → {threads_after}"
    );
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Under a DaemonSet the old pod must not exit by itself after handing over (its container
/// would be restarted and take the sockets back): with --stay-after-handover it drains and
/// waits, not ready, for the controller's SIGTERM, while the new daemon serves.
#[test]
fn under_a_daemonset_the_old_daemon_waits_for_its_sigterm_after_handing_over() {
    let (mut node, _servers, upstream, _seen) = proxy_tests::node_with_upstream("stay", 80);
    let pod = node.pod("shop", "web-0");
    node.write_config(
        "all.yaml",
        &(namespace_yaml("shop", true, Some("closed")) + &pod_yaml(&pod, &[("app", "web")])),
    );
    let (admin, metrics, health) = (free_addr(), free_addr(), free_addr());
    let flags = [
        "--admin-addr",
        admin.as_str(),
        "--metrics-addr",
        metrics.as_str(),
        "--health-addr",
        health.as_str(),
        "--stay-after-handover",
    ];
    let mut old = Daemon::start(&node, &flags);
    old.wait_enrolled(&pod.uid, Duration::from_secs(5));
    let new = Daemon::start(&node, &flags);
    assert!(
        proxy_tests::wait_for(Duration::from_secs(5), || old
            .log_text()
            .contains("waiting for SIGTERM")
            .then_some(()))
        .is_some(),
        "{}",
        old.log_text()
    );
    assert_eq!(
        old.wait_exit(Duration::from_secs(2)),
        None,
        "the old daemon stays"
    );
    // The pod is served (by the new daemon) while the old one waits.
    let out = pod.pdtool(&["connect", "--to", &upstream.addr(80).to_string()]);
    assert_eq!(out["result"], "ok", "{out}");
    assert!(new.is_ready());
    assert_eq!(old.terminate(), Some(0));
    let out = pod.pdtool(&["connect", "--to", &upstream.addr(80).to_string()]);
    assert_eq!(
        out["result"], "ok",
        "still served after the old pod is gone: {out}"
    );
    assert!(new
        .workload_state(&pod.uid)
        .is_some_and(|w| w["state"] == "enrolled"));
}

/// kill -9 under load, then a new daemon with no operator action: the fail-open pod goes
/// direct at once and the fail-closed pod is refused at once (nothing hangs), a connection
/// open through the dead daemon ends at once, and both pods are captured again as soon as
/// the new daemon is up. Prints the recovery times.
#[test]
fn kill_9_under_load_recovers_without_an_operator() {
    let mut node = Node::new("kill9load");
    let servers = Servers::new();
    let backend = node.host("backend");
    let _seen = servers.identity(&backend, 80);
    servers.banner(&backend, 25, "220 held");
    let open_pod = node.pod("relaxed", "client-0");
    let closed_pod = node.pod("strict", "client-1");
    node.write_config(
        "all.yaml",
        &(namespace_yaml("relaxed", true, None)
            + &namespace_yaml("strict", true, Some("closed"))
            + &pod_yaml(&open_pod, &[("app", "client")])
            + &pod_yaml(&closed_pod, &[("app", "client")])),
    );
    let mut daemon = Daemon::start(&node, &[]);
    for pod in [&open_pod, &closed_pod] {
        daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    }
    let to = backend.addr(80).to_string();
    let watch = |pod: &proxy_tests::Pod| {
        pod.host
            .command(
                Some(&pod.app_cgroup()),
                &proxy_tests::target_bin("pdtool"),
                &["watch", "--to", &to, "--ms", "6000"],
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("watch")
    };
    let t0 = Instant::now();
    let (open_watch, closed_watch) = (watch(&open_pod), watch(&closed_pod));
    // A long-lived connection through the daemon (server-first protocol, kept open).
    let held = open_pod
        .host
        .command(
            Some(&open_pod.app_cgroup()),
            &proxy_tests::target_bin("pdtool"),
            &[
                "raw",
                "--to",
                &backend.addr(25).to_string(),
                "--send",
                "",
                "--wait-ms",
                "8000",
            ],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("raw");
    std::thread::sleep(Duration::from_millis(1500));
    let killed_ms = t0.elapsed().as_millis() as u64;
    daemon.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let restart_ms = t0.elapsed().as_millis() as u64;
    let daemon = Daemon::start(&node, &[]);
    for pod in [&open_pod, &closed_pod] {
        daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    }
    let ready_ms = t0.elapsed().as_millis() as u64;
    let read = |c: std::process::Child| -> serde_json::Value {
        serde_json::from_slice(&c.wait_with_output().expect("output").stdout).expect("JSON")
    };
    let (open, closed, held) = (read(open_watch), read(closed_watch), read(held));
    let runs = |v: &serde_json::Value| -> Vec<(String, u64, u64)> {
        v["runs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        (
                            r["kind"].as_str().unwrap_or("").to_string(),
                            r["from_ms"].as_u64().unwrap_or(0),
                            r["to_ms"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (open_runs, closed_runs) = (runs(&open), runs(&closed));
    // When `kind` was first seen after `after` ms (the watcher's clock starts a few ms
    // after ours, so a run that began just "before" still counts).
    let first = |runs: &[(String, u64, u64)], kind: &str, after: u64| {
        runs.iter()
            .find(|(k, _, to)| k == kind && *to + 50 >= after)
            .map(|(_, from, _)| (*from).max(after))
    };
    let open_direct = first(&open_runs, "direct", killed_ms).expect("fail-open went direct");
    let closed_refused = first(&closed_runs, "eperm", killed_ms).expect("fail-closed refused");
    let open_back = first(&open_runs, "captured", restart_ms).expect("fail-open captured again");
    let closed_back =
        first(&closed_runs, "captured", restart_ms).expect("fail-closed captured again");
    println!(
        "kill -9 at {killed_ms} ms: fail-open direct after {} ms, fail-closed refused after {} ms; held connection: {held}; new daemon started at {restart_ms} ms, ready at {ready_ms} ms; captured again: fail-open +{} ms, fail-closed +{} ms after its start | open {open_runs:?} | closed {closed_runs:?}",
        open_direct.saturating_sub(killed_ms),
        closed_refused.saturating_sub(killed_ms),
        open_back.saturating_sub(restart_ms),
        closed_back.saturating_sub(restart_ms),
    );
    // Nothing hung: every attempt was captured, direct (fail-open) or refused (fail-closed);
    // only the exchange in flight through the daemon at the kill ended early, at once.
    let in_flight = |k: &str, from: u64| {
        (k == "eof" || k == "reset") && from + 100 >= killed_ms && from <= killed_ms + 200
    };
    for (k, from, _) in &open_runs {
        assert!(
            k == "captured" || k == "direct" || in_flight(k, *from),
            "fail-open: {open_runs:?}"
        );
    }
    for (k, from, _) in &closed_runs {
        assert!(
            k == "captured" || k == "eperm" || in_flight(k, *from),
            "fail-closed: {closed_runs:?}"
        );
    }
    assert!(open_direct - killed_ms < 1000, "{open_runs:?}");
    assert!(closed_refused - killed_ms < 1000, "{closed_runs:?}");
    assert!(open_back <= ready_ms + 100 && closed_back <= ready_ms + 100);
    // The connection through the dead daemon ended with it, not after a timeout.
    let closed_after = held["closed_after_ms"].as_u64().expect("ended");
    assert!(
        closed_after < killed_ms + 1000,
        "held connection ended at {closed_after} ms (kill at {killed_ms} ms)"
    );
}

/// The hand-over socket gives every listener of the node to whoever asks: only another
/// daemon may (root, running an executable of the daemon's name), and a daemon takes
/// sockets only from one. Here the asker, and then the offerer, is this test process: root,
/// but not proxy-daemon.
#[test]
fn only_another_daemon_may_take_the_sockets_or_offer_its_own() {
    let (mut node, _servers, upstream, _seen) = proxy_tests::node_with_upstream("hpeer", 80);
    let pod = node.pod("shop", "web-0");
    node.write_config(
        "all.yaml",
        &(namespace_yaml("shop", true, Some("closed")) + &pod_yaml(&pod, &[("app", "web")])),
    );
    let mut daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    let path = proxy_daemon::handover::socket_path(&node.run_dir(), &node.pin_dir);
    let taken = proxy_daemon::handover::take(&path);
    assert!(
        !taken.as_ref().is_ok_and(|t| t.is_some()),
        "a process that is not a daemon got the node's listeners"
    );
    assert!(proxy_tests::wait_for(Duration::from_secs(3), || (daemon
        .metric_sum("proxy_daemon_handover_peers_refused_total", &[])
        == 1.0)
        .then_some(()))
    .is_some());
    // It keeps serving its pods (and its hand-over socket).
    let out = pod.pdtool(&["connect", "--to", &upstream.addr(80).to_string()]);
    assert_eq!(out["result"], "ok", "{out}");
    daemon.kill9();

    // Something that is not a daemon listens where a predecessor would: a new daemon
    // takes nothing from it and starts on its own.
    let listener = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("seqpacket");
    let _ = std::fs::remove_file(&path);
    nix::sys::socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&listener),
        &nix::sys::socket::UnixAddr::new(&path).unwrap(),
    )
    .expect("bind");
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(4).unwrap())
        .expect("listen");
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    assert_eq!(
        daemon.metric_sum("proxy_daemon_handover_peers_refused_total", &[]),
        1.0
    );
    assert!(
        daemon.log_text().contains("hand-over peer refused"),
        "{}",
        daemon.log_text()
    );
    let out = pod.pdtool(&["connect", "--to", &upstream.addr(80).to_string()]);
    assert_eq!(out["result"], "ok", "{out}");
}

/// The destination side across hand-overs: a captured pod calling another over HBONE
/// (keep-alive and a new connection each time) and a host outside the mesh calling it in
/// plaintext, while the node's daemon is replaced: each successor takes the very HBONE
/// and inbound listening sockets (their kernel steering entries and backlogs stay), the
/// old daemon stops accepting on them, its keep-alive connections close after their
/// next request, and both issue under the node's one root, so no request is refused or
/// lost and no drain waits for its timeout.
#[test]
fn hand_overs_keep_the_inbound_and_hbone_sides_whole() {
    let handovers: usize = proxy_tests::env_size("PDT_HANDOVERS", 4);
    let mut node = Node::new("handover-in");
    let servers = Servers::new();
    let client = node.pod("shop", "web-0");
    let server = node.pod("prod", "db-0");
    let outsider = node.host("outsider");
    servers.http_echo(
        &server.host,
        8080,
        HttpEcho {
            name: "db".into(),
            ..Default::default()
        },
    );
    node.write_config(
        "all.yaml",
        &(namespace_yaml("shop", true, None)
            + &namespace_yaml("prod", true, Some("closed"))
            + &pod_yaml(&client, &[("app", "web")])
            + &pod_yaml(&server, &[("app", "db")])
            + "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: prod}\nspec:\n  clusterIP: 198.18.0.250\n  selector: {app: db}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\n"),
    );
    let (admin, metrics, health) = (free_addr(), free_addr(), free_addr());
    let flags = [
        "--admin-addr",
        admin.as_str(),
        "--metrics-addr",
        metrics.as_str(),
        "--health-addr",
        health.as_str(),
        "--drain-timeout-secs",
        "20",
    ];
    let mut current = Daemon::start(&node, &flags);
    for pod in [&client, &server] {
        current.wait_enrolled(&pod.uid, Duration::from_secs(5));
    }
    let load_ms = (handovers as u64 * 1500 + 3000).to_string();
    let direct = server.host.addr(8080).to_string();
    let load =
        |cgroup: Option<&std::path::Path>, host: &proxy_tests::Host, to: &str, extra: &[&str]| {
            let mut args = vec![
                "load", "--to", to, "--host", "db", "--ms", &load_ms, "--rate", "100",
            ];
            args.extend_from_slice(extra);
            host.command(cgroup, &proxy_tests::target_bin("pdtool"), &args)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("load")
        };
    let client_cg = client.app_cgroup();
    let mesh_keep_alive = load(Some(&client_cg), &client.host, "198.18.0.250:80", &[]);
    let mesh_new = load(
        Some(&client_cg),
        &client.host,
        "198.18.0.250:80",
        &["--new-connections"],
    );
    let plaintext_new = load(None, &outsider, &direct, &["--new-connections"]);
    for i in 0..handovers {
        std::thread::sleep(Duration::from_millis(500));
        let started = std::time::Instant::now();
        let next = Daemon::start(&node, &flags);
        let code = current.wait_exit(Duration::from_secs(25));
        assert_eq!(code, Some(0), "hand-over {i}: {}", current.log_text());
        // Every connection the old daemon served ends with its request, or a grace after
        // the drain starts: none holds the drain to its timeout (20 s here).
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "hand-over {i} took {:?}: {}",
            started.elapsed(),
            current.log_text()
        );
        current = next;
    }
    let read = |child: std::process::Child| -> serde_json::Value {
        let out = child.wait_with_output().expect("load output");
        serde_json::from_slice(&out.stdout).expect("load JSON")
    };
    for (name, out) in [
        ("HBONE keep-alive", read(mesh_keep_alive)),
        ("HBONE new connections", read(mesh_new)),
        ("plaintext inbound", read(plaintext_new)),
    ] {
        assert_eq!(out["errors"], serde_json::json!([]), "{name}: {out}");
        let requests = out["requests"].as_u64().unwrap_or(0);
        assert!(requests > 100, "{name}: {out}");
        assert_eq!(
            out["statuses"]["200"].as_u64(),
            Some(requests),
            "{name}: {out}"
        );
    }
    assert_eq!(
        current.metric_sum(
            "proxy_daemon_capture_decisions",
            &[("decision", "inbound_fail_closed_refused")]
        ),
        0.0
    );
    assert_eq!(current.terminate(), Some(0));
}
