//! Configuration end-to-end: hot reload under traffic, and a broken file mid-run.
use std::time::{Duration, Instant};

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml, Node},
    node_with_upstream, wait_for,
};

fn generation(d: &Daemon) -> u64 {
    d.config_dump()["config"]["generation"]
        .as_u64()
        .unwrap_or(0)
}

fn reviews_vs(version: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v{version}
  - route:
    - destination:
        host: reviews
        subset: v1
"
    )
}

const REVIEWS: &str = "apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: shop
spec:
  clusterIP: 198.18.0.200
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
spec:
  host: reviews
  subsets:
";

fn destination_rule_with(versions: u32) -> String {
    let mut y = REVIEWS.to_string();
    for v in 1..=versions {
        y.push_str(&format!("  - name: v{v}\n    labels: {{version: v{v}}}\n"));
    }
    y
}

#[test]
fn twenty_reloads_under_traffic_lose_no_connection() {
    let (mut node, _servers, upstream, _seen) = node_with_upstream("reload", 80);
    let pod = node.pod("shop", "client-1");
    node.write_config(
        "ns.yaml",
        &(namespace_yaml("shop", true, None) + &pod_yaml(&pod, &[("app", "client")])),
    );
    node.write_config("reviews.yaml", &destination_rule_with(21));
    node.write_config("vs.yaml", &reviews_vs(1));
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));

    let to = upstream.addr(80).to_string();
    let watcher = {
        let mut c = pod.host.command(
            Some(&pod.app_cgroup()),
            &proxy_tests::target_bin("pdtool"),
            &["watch", "--to", &to, "--ms", "12000"],
        );
        c.stdout(std::process::Stdio::piped())
            .spawn()
            .expect("watch")
    };
    let mut latencies = Vec::new();
    for i in 2..=21 {
        let before = generation(&daemon);
        let written = Instant::now();
        node.write_config("vs.yaml", &reviews_vs(i));
        let took = wait_for(Duration::from_secs(5), || {
            (generation(&daemon) > before).then(|| written.elapsed())
        })
        .unwrap_or_else(|| panic!("reload {i} not effective; log:\n{}", daemon.log_text()));
        latencies.push(took);
        // The new rule is what the snapshot serves now.
        let dump = daemon.config_dump();
        let subset = &dump["snapshot"]["routes"]["virtual_services"]
            ["reviews.shop.svc.cluster.local"][0]["http"][0]["action"]["destinations"][0]
            ["destination"]["subset"];
        assert_eq!(subset, &serde_json::json!(format!("v{i}")));
    }
    let out = watcher.wait_with_output().expect("watch");
    let counts: serde_json::Value = serde_json::from_slice(&out.stdout).expect("watch JSON");
    let captured = counts["captured"].as_u64().unwrap_or(0);
    assert!(
        captured >= 1000,
        "too few requests to prove anything: {counts}"
    );
    // One kind of outcome (besides the timeline of runs): captured, every time.
    let kinds = counts
        .as_object()
        .map(|o| o.keys().filter(|k| *k != "runs").count())
        .unwrap_or(0);
    assert_eq!(kinds, 1, "every connection captured and answered: {counts}");
    assert!(daemon.metric_sum("proxy_daemon_config_reloads_total", &[]) >= 21.0);
    assert_eq!(
        daemon.metric_sum("proxy_daemon_config_errors_total", &[]),
        0.0
    );
    latencies.sort();
    eprintln!(
        "20 reloads during {captured} connections, 0 failed; reload-to-effective p50 {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
}

#[test]
fn a_broken_file_keeps_the_last_good_config_serving_until_fixed() {
    let (mut node, _servers, upstream, _seen) = node_with_upstream("broken", 80);
    let pod = node.pod("shop", "client-1");
    node.write_config(
        "ns.yaml",
        &(namespace_yaml("shop", true, None) + &pod_yaml(&pod, &[("app", "client")])),
    );
    node.write_config("reviews.yaml", &destination_rule_with(2));
    node.write_config("vs.yaml", &reviews_vs(2));
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    let good = generation(&daemon);

    // A subset the DestinationRule does not define, and a new pod in the same change.
    let late = node.pod("shop", "client-2");
    node.write_config("late.yaml", &pod_yaml(&late, &[("app", "client")]));
    node.write_config("vs.yaml", &reviews_vs(7));
    assert!(wait_for(Duration::from_secs(5), || {
        (daemon.metric_sum("proxy_daemon_config_errors_total", &[]) >= 1.0).then_some(())
    })
    .is_some());
    let dump = daemon.config_dump();
    let last_error = dump["config"]["last_error"].to_string();
    assert!(
        last_error.contains("vs.yaml:16: VirtualService/shop/reviews: subset \\\"v7\\\""),
        "error names file, line and object: {last_error}"
    );
    assert_eq!(
        generation(&daemon),
        good,
        "the broken config must not replace the good one"
    );
    let subset = &dump["snapshot"]["routes"]["virtual_services"]["reviews.shop.svc.cluster.local"]
        [0]["http"][0]["action"]["destinations"][0]["destination"]["subset"];
    assert_eq!(subset, "v2", "old routes keep serving");
    // Nothing of the rejected change applies: the new pod is not enrolled...
    std::thread::sleep(Duration::from_millis(500));
    assert!(daemon.workload_state(&late.uid).is_none());
    // ...while the enrolled one keeps working.
    let out = pod.pdtool(&["connect", "--to", &upstream.addr(80).to_string()]);
    assert_eq!(out["result"], "ok", "{out}");
    assert!(daemon
        .log_text()
        .contains("vs.yaml:16: VirtualService/shop/reviews:"));

    // Fixing the file recovers without a restart.
    node.write_config("vs.yaml", &reviews_vs(1));
    daemon.wait_enrolled(&late.uid, Duration::from_secs(5));
    let dump = daemon.config_dump();
    assert!(dump["config"]["last_error"].as_array().unwrap().is_empty());
    assert!(generation(&daemon) > good);
}

#[test]
fn config_dump_shows_registry_routes_in_match_order_and_where_each_came_from() {
    let node = Node::new("dump");
    node.write_config("ns.yaml", &namespace_yaml("shop", true, None));
    node.write_config("reviews.yaml", &destination_rule_with(2));
    node.write_config("vs.yaml", &reviews_vs(2));
    let daemon = Daemon::start(&node, &[]);
    let dump = daemon.config_dump();
    // Every service of a hostname (one here), oldest first.
    let svc = &dump["snapshot"]["registry"]["services"]["reviews.shop.svc.cluster.local"][0];
    assert_eq!(svc["addresses"][0], "198.18.0.200");
    assert_eq!(svc["ports"][0]["port"], 9080);
    let rules = dump["snapshot"]["routes"]["virtual_services"]["reviews.shop.svc.cluster.local"][0]
        ["http"]
        .as_array()
        .expect("rules")
        .clone();
    assert_eq!(rules.len(), 2);
    assert_eq!(
        rules[0]["matches"][0]["headers"][0][0], "end-user",
        "first match first"
    );
    assert!(
        rules[0]["source"].as_str().unwrap().ends_with("vs.yaml:9)"),
        "{}",
        rules[0]["source"]
    );
    assert!(
        rules[1]["matches"].as_array().unwrap().is_empty(),
        "catch-all last"
    );
    let dr = &dump["snapshot"]["routes"]["destination_rules"]["reviews.shop.svc.cluster.local"][0];
    assert_eq!(dr["subsets"]["v2"]["labels"]["version"], "v2");
    assert!(dr["source"]
        .as_str()
        .unwrap()
        .contains("DestinationRule/shop/reviews"));
}

#[test]
fn what_istio_accepts_loads_with_warnings_and_unsupported_envoy_filters_are_skipped() {
    let (mut node, _servers, upstream, _seen) = node_with_upstream("accepts", 80);
    let pod = node.pod("shop", "client-1");
    node.write_config(
        "ns.yaml",
        &(namespace_yaml("shop", true, None) + &pod_yaml(&pod, &[("app", "client")])),
    );
    // ServiceAccount, Deployment, AuthorizationPolicy, a Lua HTTP_FILTER EnvoyFilter, a
    // subset whose DestinationRule is elsewhere and a rule after a catch-all: all valid
    // in Istio, so none may keep the daemon from starting or the pod from working.
    let accepted = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/mistakes/19-istio-accepts.yaml"),
    )
    .unwrap();
    node.write_config("istio.yaml", &accepted);
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    // Two: the Lua HTTP_FILTER and the one matching a route by name.
    assert_eq!(
        daemon.metric_sum("proxy_daemon_config_skipped_envoy_filters", &[]),
        2.0
    );
    let findings = daemon.config_dump()["snapshot"]["findings"].to_string();
    assert!(
        findings.contains("EnvoyFilter/shop/lua-header: warning: configPatches[0]: not supported: applyTo HTTP_FILTER"),
        "{findings}"
    );
    assert!(daemon.config_dump()["snapshot"]["routes"]["envoy_filters"]
        .as_array()
        .unwrap()
        .is_empty());
    let out = pod.pdtool(&["connect", "--to", &upstream.addr(80).to_string()]);
    assert_eq!(out["result"], "ok", "{out}");
}

#[test]
fn fifos_and_huge_files_in_the_config_dir_never_stall_or_replace_the_config() {
    let (mut node, _servers, upstream, _seen) = node_with_upstream("hostilecfg", 80);
    let pod = node.pod("shop", "client-1");
    node.write_config(
        "ns.yaml",
        &(namespace_yaml("shop", true, None) + &pod_yaml(&pod, &[("app", "client")])),
    );
    // A FIFO named like YAML: reading it would block forever.
    nix::unistd::mkfifo(
        &node.config_dir.join("pipe.yaml"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("mkfifo");
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    let findings = daemon.config_dump()["snapshot"]["findings"].to_string();
    assert!(
        findings.contains("pipe.yaml:0: warning: not a regular file"),
        "{findings}"
    );
    // Reloads keep working beside it.
    let late = node.pod("shop", "client-2");
    node.write_config("late.yaml", &pod_yaml(&late, &[("app", "client")]));
    daemon.wait_enrolled(&late.uid, Duration::from_secs(5));
    // A 17 MiB file is refused; the last good configuration keeps serving.
    let good = generation(&daemon);
    node.write_config("huge.yaml", &"#".repeat(17 * 1024 * 1024));
    assert!(wait_for(Duration::from_secs(5), || {
        (daemon.metric_sum("proxy_daemon_config_errors_total", &[]) >= 1.0).then_some(())
    })
    .is_some());
    assert!(daemon.config_dump()["config"]["last_error"]
        .to_string()
        .contains("huge.yaml:0: file is 17 MiB; the limit is 16 MiB"));
    assert_eq!(generation(&daemon), good);
    // Numbers meant to overflow (durations, weights, a Maglev table of 10^12 slots): errors
    // at their lines, never a panic or an allocation of that size.
    node.remove_config("huge.yaml");
    let hostile = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/mistakes/20-hostile-numbers.yaml"),
    )
    .unwrap();
    node.write_config("hostile.yaml", &hostile);
    assert!(wait_for(Duration::from_secs(5), || {
        daemon.config_dump()["config"]["last_error"]
            .to_string()
            .contains("maglev.tableSize 1000000000000")
            .then_some(())
    })
    .is_some());
    assert_eq!(generation(&daemon), good);
    let out = pod.pdtool(&["connect", "--to", &upstream.addr(80).to_string()]);
    assert_eq!(out["result"], "ok", "{out}");
}

/// Istio users change VirtualServices under traffic (a canary shift is a series of such
/// edits): each swap must take effect without failing a routed HTTP request, on
/// keep-alive connections (already routed once) and on new ones alike.
#[test]
fn swapping_a_virtual_service_under_routed_http_load_fails_no_request() {
    use proxy_tests::reviews::{Reviews, HOST};
    let vs = |subset: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{HOST}]
  http:
  - route: [{{destination: {{host: {HOST}, subset: {subset}}}}}]
"
        )
    };
    let r = Reviews::builder("vs-swap")
        .pod("shop", "client-0", &[("app", "client")])
        .start();
    let swap = |subset: &str| {
        let before = generation(&r.daemon);
        r.node.write_config("swap.yaml", &vs(subset));
        wait_for(Duration::from_secs(5), || {
            (generation(&r.daemon) > before).then_some(())
        })
        .unwrap_or_else(|| panic!("swap to {subset} not effective"));
    };
    swap("v1");
    let pod = &r.pods[0];
    let to = proxy_tests::reviews::to();
    let swaps = 10;
    let load_ms = (swaps * 400 + 1500).to_string();
    let spawn = |args: &[&str]| {
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
    let base = [
        "load", "--to", &to, "--host", HOST, "--ms", &load_ms, "--rate",
    ];
    let keep_alive = spawn(&[&base[..], &["200"]].concat());
    let new_conns = spawn(&[&base[..], &["100", "--new-connections"]].concat());
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..swaps {
        swap(if i % 2 == 0 { "v2" } else { "v1" });
        std::thread::sleep(Duration::from_millis(400));
    }
    let read = |child: std::process::Child| -> serde_json::Value {
        let out = child.wait_with_output().expect("load output");
        serde_json::from_slice(&out.stdout).expect("load JSON")
    };
    for (name, out) in [
        ("keep-alive", read(keep_alive)),
        ("new connections", read(new_conns)),
    ] {
        eprintln!("{name} through {swaps} swaps: {out}");
        assert_eq!(out["errors"], serde_json::json!([]), "{name}: {out}");
        assert_eq!(out["retries"], serde_json::json!(0), "{name}: {out}");
        let requests = out["requests"].as_u64().unwrap_or(0);
        assert!(requests > 300, "{name}: {out}");
        assert_eq!(
            out["statuses"]["200"].as_u64(),
            Some(requests),
            "{name}: {out}"
        );
        // Both versions answered: the swaps took effect on this very traffic, keep-alive
        // connections included (routes are chosen per request, not per connection).
        for v in ["reviews-v1", "reviews-v2"] {
            assert!(
                out["servers"][v].as_u64().unwrap_or(0) > requests / 10,
                "{name}: {v} barely served: {out}"
            );
        }
    }
    assert_eq!(
        r.daemon.metric_sum("proxy_daemon_config_errors_total", &[]),
        0.0
    );
}
