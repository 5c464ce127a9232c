//! Foundation end-to-end tests: real eBPF on real cgroups, pods as network namespaces,
//! the daemon as a real process. Each test builds its own node and tears it down.
use std::time::{Duration, Instant};

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml, Node},
    node_with_upstream, wait_for, Servers,
};

/// The app's socket is connected to the pod-local listener: the connect was captured.
#[track_caller]
fn assert_captured(out: &serde_json::Value) {
    assert_eq!(out["result"], "ok", "{out}");
    let local = out["local"].as_str().unwrap_or("");
    assert!(
        local.starts_with("127.0.0.1:"),
        "expected a captured connection: {out}"
    );
}

/// The app's socket carries the pod IP: the connect went directly to its destination.
#[track_caller]
fn assert_direct(out: &serde_json::Value, pod: &proxy_tests::Pod) {
    assert_eq!(out["result"], "ok", "{out}");
    let local = out["local"].as_str().unwrap_or("");
    assert!(
        local.starts_with(&format!("{}:", pod.host.ip)),
        "expected {} to connect directly: {out}",
        pod.name
    );
}

#[test]
fn captured_pod_reaches_upstream_through_daemon_with_its_own_ip() {
    let (mut node, _servers, upstream, seen) = node_with_upstream("basic", 8080);
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
    assert_captured(&out);
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
    assert_eq!(
        daemon.metric_sum(
            "proxy_daemon_capture_decisions",
            &[("decision", "redirected")]
        ),
        1.0
    );
}

#[test]
fn uncaptured_namespace_and_opted_out_pod_are_not_intercepted() {
    let (mut node, _servers, upstream, _seen) = node_with_upstream("nocap", 80);
    let captured = node.pod("shop", "web-1");
    let opted_out = node.pod("shop", "batch-1");
    let other_ns = node.pod("plain", "cron-1");
    node.write_config(
        "all.yaml",
        &(namespace_yaml("shop", true, None)
            + &namespace_yaml("plain", false, None)
            + &pod_yaml(&captured, &[("app", "web")])
            + &pod_yaml(
                &opted_out,
                &[("app", "batch"), ("nodeproxy.io/capture", "disabled")],
            )
            + &pod_yaml(&other_ns, &[("app", "cron")])),
    );
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&captured.uid, Duration::from_secs(5));
    let dump = daemon.config_dump();
    let not_captured = &dump["snapshot"]["not_captured"];
    assert_eq!(
        not_captured["Pod/shop/batch-1"], "pod opted out (nodeproxy.io/capture=disabled)",
        "{dump}"
    );
    assert_eq!(
        not_captured["Pod/plain/cron-1"], "namespace not captured",
        "{dump}"
    );

    let to = upstream.addr(80).to_string();
    for pod in [&opted_out, &other_ns] {
        let out = pod.pdtool(&["connect", "--to", &to]);
        assert_direct(&out, pod);
    }
    let out = captured.pdtool(&["connect", "--to", &to]);
    assert_captured(&out);
    let opened = |workload| {
        daemon.metric_sum(
            "istio_tcp_connections_opened_total",
            &[("source_workload", workload)],
        )
    };
    assert_eq!(opened("batch"), 0.0);
    assert_eq!(opened("cron"), 0.0);
    assert_eq!(opened("web"), 1.0);
}

#[test]
fn two_pods_with_200_concurrent_connections_each_reach_their_own_destinations() {
    let mut node = Node::new("conc");
    let servers = Servers::new();
    let mut targets = Vec::new();
    for i in 0..4 {
        let host = node.host(&format!("svc{i}"));
        for port in [8080, 9090] {
            let _ = servers.identity(&host, port);
            targets.push(host.addr(port).to_string());
        }
    }
    let a = node.pod("shop", "a-1");
    let b = node.pod("shop", "b-1");
    node.write_config(
        "shop.yaml",
        &(namespace_yaml("shop", true, None)
            + &pod_yaml(&a, &[("app", "a")])
            + &pod_yaml(&b, &[("app", "b")])),
    );
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&a.uid, Duration::from_secs(5));
    daemon.wait_enrolled(&b.uid, Duration::from_secs(5));

    let mut args = vec!["probe", "--count", "200", "--concurrency", "200", "--to"];
    args.extend(targets.iter().map(String::as_str));
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| a.pdtool(&args));
        // b targets the same set rotated, so both pods hit every upstream at once.
        let hb = s.spawn(|| b.pdtool(&args));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    for (name, r) in [("a", &ra), ("b", &rb)] {
        assert_eq!(r["ok"], 200, "pod {name}: {r}");
        assert_eq!(r["failed"], 0, "pod {name}: {r}");
    }
    let opened = |w| {
        daemon.metric_sum(
            "istio_tcp_connections_opened_total",
            &[("source_workload", w)],
        )
    };
    assert_eq!(opened("a"), 200.0);
    assert_eq!(opened("b"), 200.0);
    // Every redirected connection was found by its key: none went missing.
    assert_eq!(
        daemon.metric_sum("proxy_daemon_orig_dst_missing_total", &[]),
        0.0
    );
}

#[test]
fn fifty_megabytes_each_way_with_half_close_arrive_byte_identical() {
    const SIZE: u64 = 50 * 1024 * 1024;
    let mut node = Node::new("xfer");
    let servers = Servers::new();
    let upstream = node.host("store");
    let records = servers.xfer(&upstream, 7000, SIZE, 0x5eed);
    let pod = node.pod("shop", "uploader-1");
    node.write_config(
        "shop.yaml",
        &(namespace_yaml("shop", true, None) + &pod_yaml(&pod, &[("app", "uploader")])),
    );
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));

    let out = proxy_tests::xfer_both_ways(
        &pod,
        "uploader",
        upstream.addr(7000),
        &records,
        SIZE,
        &daemon,
        &[],
    );
    eprintln!(
        "50 MiB each way through the proxy: {:.0} ms",
        out["elapsed_ms"].as_f64().unwrap()
    );
}

fn program_ids(dump: &serde_json::Value) -> Vec<u32> {
    dump["ebpf"]["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_u64().unwrap() as u32)
        .collect()
}

fn loaded_program_ids() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect()
}

#[test]
fn kill_9_leaves_fail_open_pods_direct_and_fail_closed_pods_refused_then_restart_adopts() {
    let (mut node, _servers, upstream, _seen) = node_with_upstream("kill9", 80);
    let open_pod = node.pod("relaxed", "open-1");
    let closed_pod = node.pod("strict", "closed-1");
    node.write_config(
        "ns.yaml",
        &(namespace_yaml("relaxed", true, None)
            + &namespace_yaml("strict", true, Some("closed"))
            + &pod_yaml(&open_pod, &[("app", "open")])
            + &pod_yaml(&closed_pod, &[("app", "closed")])),
    );
    let mut daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&open_pod.uid, Duration::from_secs(5));
    daemon.wait_enrolled(&closed_pod.uid, Duration::from_secs(5));
    let first_programs = program_ids(&daemon.config_dump());
    let to = upstream.addr(80).to_string();
    for pod in [&open_pod, &closed_pod] {
        let out = pod.pdtool(&["connect", "--to", &to]);
        assert_captured(&out);
    }

    daemon.kill9();
    let killed = Instant::now();
    // Programs stay attached (pinned), so the kernel decides per connect.
    let out = open_pod.pdtool(&["connect", "--to", &to, "--retry-for-ms", "3000"]);
    let open_ok_after = killed.elapsed();
    assert_eq!(out["result"], "ok", "{out}");
    assert_direct(&out, &open_pod);
    assert!(
        open_ok_after < Duration::from_secs(1),
        "fail-open pod connected only after {open_ok_after:?}"
    );
    let out = closed_pod.pdtool(&["connect", "--to", &to, "--timeout-ms", "3000"]);
    assert_eq!(
        out["result"], "eperm",
        "fail-closed pod must be refused: {out}"
    );
    assert!(
        out["attempt_ms"].as_f64().unwrap() < 100.0,
        "refusal must be immediate: {out}"
    );
    eprintln!("after kill -9: fail-open direct connect after {open_ok_after:?}, fail-closed refused in {} ms", out["attempt_ms"]);

    // A new daemon adopts the pinned programs instead of stacking a second copy. While it
    // starts, the fail-closed pod keeps trying: refused or captured, never direct.
    let watcher = {
        let mut c = closed_pod.host.command(
            Some(&closed_pod.app_cgroup()),
            &proxy_tests::target_bin("pdtool"),
            &["watch", "--to", &to, "--ms", "2500"],
        );
        c.stdout(std::process::Stdio::piped())
            .spawn()
            .expect("watch")
    };
    std::thread::sleep(Duration::from_millis(300));
    let daemon = Daemon::start(&node, &[]);
    let watched: serde_json::Value =
        serde_json::from_slice(&watcher.wait_with_output().expect("watch output").stdout)
            .expect("watch JSON");
    assert_eq!(
        watched.get("direct"),
        None,
        "fail-closed pod bypassed the proxy during restart: {watched}"
    );
    assert!(watched["eperm"].as_u64().unwrap_or(0) > 0, "{watched}");
    assert!(watched["captured"].as_u64().unwrap_or(0) > 0, "{watched}");
    eprintln!("fail-closed pod during restart: {watched}");
    daemon.wait_enrolled(&open_pod.uid, Duration::from_secs(5));
    daemon.wait_enrolled(&closed_pod.uid, Duration::from_secs(5));
    let dump = daemon.config_dump();
    assert_eq!(dump["ebpf"]["adopted_previous"], true, "{dump}");
    let loaded = loaded_program_ids();
    for id in first_programs {
        assert!(
            !loaded.contains(&id),
            "program {id} of the killed daemon is still loaded"
        );
    }
    let links: Vec<_> = std::fs::read_dir(&node.pin_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
        .collect();
    assert_eq!(
        links.len(),
        9,
        "connect4/6, getpeername4/6, bind4/6, post_bind4/6, sock_ops"
    );
    for pod in [&open_pod, &closed_pod] {
        let out = pod.pdtool(&["connect", "--to", &to]);
        assert_eq!(out["result"], "ok", "{out}");
        assert_captured(&out);
    }
}

/// Entries of the daemon's pinned maps, read straight from the kernel (not via the daemon).
struct PinnedMaps {
    enrolled: aya::maps::HashMap<aya::maps::MapData, u64, proxy_common::Enrolment>,
    client: aya::maps::HashMap<aya::maps::MapData, proxy_common::ClientKey, proxy_common::OrigDst>,
    sock: aya::maps::HashMap<aya::maps::MapData, u64, proxy_common::OrigDst>,
}

impl PinnedMaps {
    fn open(node: &Node) -> Self {
        use aya::maps::{HashMap, Map, MapData};
        use proxy_common::maps;
        let open = |name: &str| {
            Map::from_map_data(MapData::from_pin(node.pin_dir.join(name)).expect("pinned map"))
                .expect("map")
        };
        Self {
            enrolled: HashMap::try_from(open(maps::ENROLLED)).unwrap(),
            client: HashMap::try_from(open(maps::CLIENT_ORIG_DST)).unwrap(),
            sock: HashMap::try_from(open(maps::SOCK_ORIG_DST)).unwrap(),
        }
    }

    /// (enrolment entries for the cgroup, connection entries for the netns)
    fn entries_for(&self, cgroup_id: u64, netns_cookie: u64) -> (usize, usize) {
        let enrolled = self
            .enrolled
            .keys()
            .flatten()
            .filter(|k| *k == cgroup_id)
            .count();
        let conns = self
            .client
            .iter()
            .flatten()
            .filter(|(k, _)| k.netns_cookie == netns_cookie)
            .count()
            + self
                .sock
                .iter()
                .flatten()
                .filter(|(_, v)| v.netns_cookie == netns_cookie)
                .count();
        (enrolled, conns)
    }
}

#[test]
fn late_pod_is_enrolled_quickly_and_deleted_pods_leave_nothing_behind() {
    let (mut node, _servers, upstream, _seen) = node_with_upstream("late", 80);
    node.write_config("ns.yaml", &namespace_yaml("shop", true, None));
    let daemon = Daemon::start(&node, &[]);
    let to = upstream.addr(80).to_string();

    // 1. The pod's YAML arrives first, its cgroup and process after: enrolled within 1 s.
    let mut late = node.pod("shop", "late-1");
    late.stop(); // no cgroup or process yet, as before kubelet starts the sandbox
    let late_uid = late.uid.clone();
    node.write_config("late.yaml", &pod_yaml(&late, &[("app", "late")]));
    assert!(wait_for(Duration::from_secs(3), || {
        daemon
            .workload_state(&late_uid)
            .filter(|w| w["state"] == "waiting for cgroup")
    })
    .is_some());
    late.start();
    let appeared = Instant::now();
    let state = daemon.wait_enrolled(&late_uid, Duration::from_secs(1));
    eprintln!(
        "late pod enrolled {:?} after its cgroup and process appeared",
        appeared.elapsed()
    );
    let out = late.pdtool(&["connect", "--to", &to]);
    assert_captured(&out);

    // 2. Removed from the configuration while still running: un-enrolled, listener closed,
    //    no map entries left, even with a connection open at the time.
    let cgroup_id = state["cgroup_id"].as_u64().unwrap();
    let cookie = state["netns_cookie"].as_u64().unwrap();
    let hold = {
        let cmd_pod = &late;
        let mut c = cmd_pod.host.command(
            Some(&cmd_pod.app_cgroup()),
            &proxy_tests::target_bin("pdtool"),
            &["hold", "--to", &to, "--ms", "3000"],
        );
        c.stdout(std::process::Stdio::null()).spawn().expect("hold")
    };
    let maps = PinnedMaps::open(&node);
    assert!(wait_for(Duration::from_secs(2), || (maps
        .entries_for(cgroup_id, cookie)
        .1
        > 0)
    .then_some(()))
    .is_some());
    node.remove_config("late.yaml");
    assert!(wait_for(Duration::from_secs(2), || daemon
        .workload_state(&late_uid)
        .is_none()
        .then_some(()))
    .is_some());
    assert_eq!(
        maps.entries_for(cgroup_id, cookie),
        (0, 0),
        "map entries left behind"
    );
    let out = late.pdtool(&["connect", "--to", "127.0.0.1:15001", "--timeout-ms", "500"]);
    assert_eq!(out["result"], "refused", "listener must be closed: {out}");
    let out = late.pdtool(&["connect", "--to", &to]);
    assert_direct(&out, &late);
    let mut hold = hold;
    let _ = hold.kill();
    let _ = hold.wait();

    // 3. A pod whose cgroup disappears (deleted from the node) while its YAML stays.
    let mut gone = node.pod("shop", "gone-1");
    node.write_config("gone.yaml", &pod_yaml(&gone, &[("app", "gone")]));
    let state = daemon.wait_enrolled(&gone.uid, Duration::from_secs(2));
    let (cgroup_id, cookie) = (
        state["cgroup_id"].as_u64().unwrap(),
        state["netns_cookie"].as_u64().unwrap(),
    );
    gone.stop();
    assert!(wait_for(Duration::from_secs(2), || {
        daemon
            .workload_state(&gone.uid)
            .filter(|w| w["state"] != "enrolled")
    })
    .is_some());
    assert_eq!(maps.entries_for(cgroup_id, cookie), (0, 0));
    assert_eq!(daemon.metric_sum("proxy_daemon_enrolled_pods", &[]), 0.0);
}

fn run_daemon_expecting_exit(node: &Node, extra: &[&str], uid: Option<u32>) -> (i32, String) {
    use std::os::unix::process::CommandExt as _;
    let (mut cmd, ..) = Daemon::command(node, extra);
    if let Some(uid) = uid {
        cmd.uid(uid);
    }
    let out = cmd.output().expect("run daemon");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn startup_errors_exit_2_with_one_line_saying_what_to_do() {
    let node = Node::new("errs");
    std::fs::remove_dir(&node.config_dir).unwrap();
    let (code, stderr) = run_daemon_expecting_exit(&node, &[], None);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "proxy-daemon: config dir {}: No such file",
            node.config_dir.display()
        )),
        "{stderr}"
    );
    std::fs::create_dir(&node.config_dir).unwrap();
    let cases: Vec<(Vec<String>, Option<u32>, &str)> = vec![
        (
            vec!["--cgroup-root".into(), "/tmp".into()],
            None,
            "not a directory on a cgroup2 filesystem",
        ),
        (vec![], Some(65534), "must run as root"),
        (
            vec!["--capture-label".into(), "oops".into()],
            None,
            "expected KEY=VALUE",
        ),
        (
            vec!["--sockmap".into(), "--capture".into(), "iptables".into()],
            None,
            "--sockmap needs --capture ebpf",
        ),
    ];
    for (extra, uid, expect) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (code, stderr) = run_daemon_expecting_exit(&node, &extra, uid);
        assert_eq!(code, 2, "{extra:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{extra:?}: one line expected, got: {stderr}"
        );
        assert!(stderr.contains(expect), "{extra:?}: {stderr}");
    }
    // A port already taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_daemon_expecting_exit(&node, &["--admin-addr", &addr], None);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--admin-addr") && stderr.contains("in use"),
        "{stderr}"
    );
    // A broken file at startup: exit 2, the problem named by file and line.
    node.write_config(
        "bad.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n  labels: [1]\n",
    );
    let (code, stderr) = run_daemon_expecting_exit(&node, &[], None);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("bad.yaml:5: Pod/default/x:"), "{stderr}");
}

#[test]
fn sigterm_keeps_capture_in_place_and_only_uninstall_removes_it() {
    let (mut node, _servers, upstream, _seen) = node_with_upstream("term", 80);
    let pod = node.pod("strict", "api-1");
    let open = node.pod("relaxed", "web-1");
    node.write_config(
        "all.yaml",
        &(namespace_yaml("strict", true, Some("closed"))
            + &namespace_yaml("relaxed", true, Some("open"))
            + &pod_yaml(&pod, &[("app", "api")])
            + &pod_yaml(&open, &[("app", "web")])),
    );
    let to = upstream.addr(80).to_string();

    let mut daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    daemon.wait_enrolled(&open.uid, Duration::from_secs(5));
    assert_captured(&pod.pdtool(&["connect", "--to", &to]));
    assert_eq!(daemon.terminate(), Some(0), "log:\n{}", daemon.log_text());
    // Stop is not uninstall: with no daemon running, the programs still hold. A fail-closed
    // pod is refused at once, a fail-open one connects directly.
    assert!(node.pin_dir.exists(), "pins stay after a clean stop");
    let refused = pod.pdtool(&["connect", "--to", &to]);
    assert_eq!(refused["result"], "eperm", "{refused}");
    let direct = open.pdtool(&["connect", "--to", &to]);
    assert_eq!(direct["result"], "ok", "{direct}");
    assert_direct(&direct, &open);
    // The next daemon adopts them and captures again.
    let mut daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    assert_captured(&pod.pdtool(&["connect", "--to", &to]));
    assert_eq!(daemon.config_dump()["ebpf"]["adopted_previous"], true);
    assert_eq!(daemon.terminate(), Some(0));
    // `uninstall` removes them: every pod connects directly.
    let out = std::process::Command::new(proxy_tests::target_bin("proxy-daemon"))
        .args(["uninstall", "--bpf-pin-dir"])
        .arg(&node.pin_dir)
        .output()
        .expect("uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!node.pin_dir.exists(), "uninstall removes the pins");
    let out = pod.pdtool(&["connect", "--to", &to]);
    assert_eq!(out["result"], "ok", "{out}");
    assert_direct(&out, &pod);
    // A drain shows at once: not ready while connections are still finishing.
    let mut daemon = Daemon::start(&node, &["--drain-timeout-secs", "3"]);
    daemon.wait_enrolled(&open.uid, Duration::from_secs(5));
    let mut held = open
        .host
        .command(
            Some(&open.app_cgroup()),
            &proxy_tests::target_bin("pdtool"),
            &["hold", "--to", &to, "--ms", "4000"],
        )
        .spawn()
        .expect("hold");
    wait_for(Duration::from_secs(3), || {
        (daemon.metric_sum("proxy_daemon_active_connections", &[]) >= 1.0).then_some(())
    })
    .expect("the held connection is proxied");
    let pid = daemon.pid().expect("pid");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let draining = wait_for(Duration::from_secs(2), || {
        daemon
            .readiness()
            .filter(|(code, body)| *code == 503 && body.contains("draining"))
    });
    assert!(draining.is_some(), "{:?}", daemon.readiness());
    let _ = held.kill();
    let _ = held.wait();
    assert_eq!(daemon.terminate(), Some(0));
    // --detach-on-exit: the stop before removing the DaemonSet for good detaches too.
    let mut daemon = Daemon::start(&node, &["--detach-on-exit"]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    assert_eq!(daemon.terminate(), Some(0));
    assert!(!node.pin_dir.exists(), "{}", daemon.log_text());

    let mut daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    assert_eq!(daemon.quit(), 200);
    let pid = daemon.pid().unwrap();
    assert!(wait_for(Duration::from_secs(10), || (!std::path::Path::new(
        &format!("/proc/{pid}")
    )
    .exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true))
    .then_some(()))
    .is_some());
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn readiness_waits_for_every_pod_listener_and_recovers() {
    let (mut node, _servers, upstream, _seen) = node_with_upstream("ready", 80);
    let pod = node.pod("shop", "squatter-1");
    // Something in the pod already listens on the outbound port.
    let squatter = pod.host.listen_loopback(15001);
    node.write_config(
        "all.yaml",
        &(namespace_yaml("shop", true, None) + &pod_yaml(&pod, &[("app", "squatter")])),
    );
    let (mut cmd, _admin, _metrics, health, log) = Daemon::command(&node, &[]);
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = cmd
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let not_ready = wait_for(Duration::from_secs(5), || {
        match proxy_tests::http_get(health, "/healthz/ready") {
            Ok((503, body)) if body.contains("pod listeners") => Some(body),
            _ => None,
        }
    });
    assert!(
        not_ready.is_some(),
        "expected 503 naming the pod listeners; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Not redirected meanwhile: no enrolment entry without our listener.
    let out = pod.pdtool(&["connect", "--to", &upstream.addr(80).to_string()]);
    assert_direct(&out, &pod);
    drop(squatter);
    let ready = wait_for(Duration::from_secs(5), || {
        matches!(
            proxy_tests::http_get(health, "/healthz/ready"),
            Ok((200, _))
        )
        .then_some(())
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ready.is_some(),
        "ready once the port is free; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("enrolment failed; the pod's connects get its fail mode; will retry"),
        "{text}"
    );
    assert!(
        text.contains("Address in use")
            || text.contains("address already in use")
            || text.contains("os error 98"),
        "{text}"
    );
}

#[test]
fn a_pod_process_in_another_network_namespace_gets_the_pods_fail_mode() {
    let (mut node, _servers, upstream, _seen) = node_with_upstream("mismatch", 80);
    let open_pod = node.pod("relaxed", "open-1");
    let closed_pod = node.pod("strict", "closed-1");
    // The attacker's way out: a network namespace with its own route to the upstream (a
    // privileged container could make one); here, another host's.
    let elsewhere = node.host("elsewhere");
    node.write_config(
        "ns.yaml",
        &(namespace_yaml("relaxed", true, None)
            + &namespace_yaml("strict", true, Some("closed"))
            + &pod_yaml(&open_pod, &[("app", "open")])
            + &pod_yaml(&closed_pod, &[("app", "closed")])),
    );
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&open_pod.uid, Duration::from_secs(5));
    daemon.wait_enrolled(&closed_pod.uid, Duration::from_secs(5));
    let to = upstream.addr(80).to_string();
    let from_elsewhere = |pod: &proxy_tests::Pod| -> serde_json::Value {
        let out = elsewhere
            .command(
                Some(&pod.app_cgroup()),
                &proxy_tests::target_bin("pdtool"),
                &["connect", "--to", &to, "--timeout-ms", "3000"],
            )
            .output()
            .expect("pdtool");
        serde_json::from_slice(&out.stdout).expect("pdtool JSON")
    };
    let closed = from_elsewhere(&closed_pod);
    assert_eq!(
        closed["result"], "eperm",
        "a fail-closed pod's process cannot leave through another netns: {closed}"
    );
    let open = from_elsewhere(&open_pod);
    assert_eq!(open["result"], "ok", "fail-open lets it through: {open}");
    assert!(
        daemon.metric_sum(
            "proxy_daemon_capture_decisions",
            &[("decision", "netns_mismatch")]
        ) >= 2.0,
        "both counted"
    );
    // The pods' own traffic is captured as before.
    for pod in [&open_pod, &closed_pod] {
        assert_captured(&pod.pdtool(&["connect", "--to", &to]));
    }
}

#[test]
fn a_drain_finishes_http_requests_in_flight_then_exits() {
    let mut node = Node::new("drainhttp");
    let servers = proxy_tests::Servers::new();
    let slow = node.host("slow");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    servers.http_echo(
        &slow,
        80,
        proxy_tests::servers::HttpEcho {
            name: "slow".into(),
            delay: Duration::from_millis(1500),
            log: Some(seen.clone()),
            ..Default::default()
        },
    );
    let pod = node.pod("shop", "client-1");
    node.write_config(
        "all.yaml",
        &(namespace_yaml("shop", true, None) + &pod_yaml(&pod, &[("app", "client")])),
    );
    let mut daemon = Daemon::start(&node, &["--drain-timeout-secs", "10"]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    let to = slow.addr(80).to_string();
    let request = {
        let cmd = pod.host.command(
            Some(&pod.app_cgroup()),
            &proxy_tests::target_bin("pdtool"),
            &["http", "--to", &to, "--host", "slow"],
        );
        std::thread::spawn(move || {
            let mut cmd = cmd;
            cmd.output().expect("pdtool")
        })
    };
    // In flight: the upstream has the request (and answers in 1.5 s).
    wait_for(Duration::from_secs(3), || {
        (!seen.lock().unwrap().is_empty()).then_some(())
    })
    .expect("the request is in flight");
    let started = std::time::Instant::now();
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_text());
    let took = started.elapsed();
    let out: serde_json::Value =
        serde_json::from_slice(&request.join().expect("request thread").stdout).expect("json");
    assert_eq!(
        out["statuses"]["200"], 1,
        "the request in flight was answered: {out}"
    );
    assert_eq!(out["first"]["headers"]["connection"], "close", "{out}");
    // It waited for the answer (~1.5 s), not for the 10 s drain timeout.
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
}

/// The cleanup DaemonSet's command (`deploy/kubernetes/proxy-daemon-cleanup.yaml`) on a
/// node whose daemon was killed: `uninstall --stay` removes the pins the dead daemon left
/// (its fail-closed pod, refused until then, connects directly at once), then stays up
/// until SIGTERM, and exits 0.
#[test]
fn the_cleanup_command_clears_a_crashed_daemons_pins_and_stays_until_stopped() {
    let (mut node, _servers, upstream, _seen) = node_with_upstream("cleanup", 80);
    let pod = node.pod("strict", "api-1");
    node.write_config(
        "all.yaml",
        &(namespace_yaml("strict", true, Some("closed")) + &pod_yaml(&pod, &[("app", "api")])),
    );
    let to = upstream.addr(80).to_string();
    let mut daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    assert_captured(&pod.pdtool(&["connect", "--to", &to]));
    daemon.kill9();
    let refused = pod.pdtool(&["connect", "--to", &to]);
    assert_eq!(
        refused["result"], "eperm",
        "fail-closed after the crash: {refused}"
    );
    assert!(node.pin_dir.exists());

    let mut cleanup = std::process::Command::new(proxy_tests::target_bin("proxy-daemon"))
        .args(["uninstall", "--stay", "--bpf-pin-dir"])
        .arg(&node.pin_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("uninstall --stay");
    wait_for(Duration::from_secs(5), || {
        (!node.pin_dir.exists()).then_some(())
    })
    .expect("the pins are removed");
    let out = pod.pdtool(&["connect", "--to", &to]);
    assert_direct(&out, &pod);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        cleanup.try_wait().expect("wait").is_none(),
        "it stays up until stopped"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cleanup.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = wait_for(Duration::from_secs(5), || cleanup.try_wait().ok().flatten())
        .expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    let mut printed = String::new();
    std::io::Read::read_to_string(cleanup.stdout.as_mut().expect("stdout"), &mut printed)
        .expect("stdout");
    assert!(printed.contains("removed "), "{printed}");
    assert!(printed.contains("staying until stopped"), "{printed}");
}
