//! Quick measurements on this machine (not a test: nothing here passes or fails).
//! Captured and direct runs alternate in the same run so machine noise hits both; the
//! report gives ratios, not absolute claims.
use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::{Duration, Instant},
};

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml, Node, Pod},
    servers::Servers,
};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut node = Node::new("bench");
    let servers = Servers::new();
    let upstream = node.host("upstream");
    let _seen = servers.identity(&upstream, 8080);
    let captured = node.pod("captured", "client-cap");
    let direct = node.pod("plain", "client-direct");
    node.write_config(
        "bench.yaml",
        &(namespace_yaml("captured", true, None)
            + &namespace_yaml("plain", false, None)
            + &pod_yaml(&captured, &[("app", "cap")])
            + &pod_yaml(&direct, &[("app", "direct")])),
    );
    let daemon = Daemon::start(&node, &["--log-level", "warn"]);
    daemon.wait_enrolled(&captured.uid, Duration::from_secs(5));
    let pid = daemon.pid().expect("pid");
    let to = upstream.addr(8080).to_string();
    let rss_idle = rss_kib(pid);

    // Sequential connect + one round trip: added latency per connection.
    let (mut lat, mut rate) = (vec![Vec::new(), Vec::new()], vec![Vec::new(), Vec::new()]);
    for _round in 0..3 {
        for (i, pod) in [&direct, &captured].iter().enumerate() {
            let r = pod.pdtool(&["latency", "--to", &to, "--count", "2000"]);
            assert_eq!(r["failed"], 0, "{r}");
            lat[i].push((r["p50_us"].as_f64().unwrap(), r["p99_us"].as_f64().unwrap()));
            let p = pod.pdtool(&[
                "probe",
                "--to",
                &to,
                "--count",
                "5000",
                "--concurrency",
                "32",
            ]);
            assert_eq!(p["failed"], 0, "{p}");
            rate[i].push(p["per_sec"].as_f64().unwrap());
        }
    }
    let p50 = |i: usize| median(lat[i].iter().map(|x| x.0).collect());
    let p99 = |i: usize| median(lat[i].iter().map(|x| x.1).collect());
    let cps = |i: usize| median(rate[i].clone());

    // Keep-alive 1 KiB GETs: the L7 path (parsed, routed, forwarded by hyper) vs direct.
    let web = node.host("web");
    servers.http_echo(
        &web,
        80,
        proxy_tests::servers::HttpEcho {
            name: "web".into(),
            ..Default::default()
        },
    );
    let web_to = web.addr(80).to_string();
    let (mut http_lat, mut http_rate) =
        (vec![Vec::new(), Vec::new()], vec![Vec::new(), Vec::new()]);
    for _round in 0..3 {
        for (i, pod) in [&direct, &captured].iter().enumerate() {
            let r = pod.pdtool(&[
                "http",
                "--to",
                &web_to,
                "--host",
                "web.example",
                "--path",
                "/bytes/1024",
                "--count",
                "5000",
            ]);
            assert_eq!(r["statuses"]["200"], 5000, "{r}");
            http_lat[i].push((r["p50_us"].as_f64().unwrap(), r["p99_us"].as_f64().unwrap()));
            http_rate[i].push(r["per_sec"].as_f64().unwrap());
        }
    }
    let hp50 = |i: usize| median(http_lat[i].iter().map(|x| x.0).collect());
    let hp99 = |i: usize| median(http_lat[i].iter().map(|x| x.1).collect());
    let hrate = |i: usize| median(http_rate[i].clone());

    // 1,000 connections held open through the proxy.
    let mut hold = captured
        .host
        .command(
            Some(&captured.app_cgroup()),
            &proxy_tests::target_bin("pdtool"),
            &["hold-many", "--to", &to, "--count", "1000", "--ms", "4000"],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("hold-many");
    let mut first = String::new();
    BufReader::new(hold.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let rss_1000 = rss_kib(pid);
    let _ = hold.wait();

    // Enrolment: cgroup + process appear → enrolled (as kubelet starting a sandbox).
    let mut enrol_ms = Vec::new();
    let mut late: Pod = node.pod("captured", "late");
    late.stop();
    node.write_config("late.yaml", &pod_yaml(&late, &[("app", "late")]));
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(400));
        let t = Instant::now();
        late.start();
        daemon.wait_enrolled(&late.uid, Duration::from_secs(3));
        enrol_ms.push(t.elapsed().as_secs_f64() * 1e3);
        late.stop();
        proxy_tests::wait_for(Duration::from_secs(3), || {
            daemon
                .workload_state(&late.uid)
                .filter(|w| w["state"] != "enrolled")
        });
    }

    println!("proxy-daemon quick measurements (median of 3 interleaved rounds)");
    println!("  connect + 1 round trip, sequential (2000):   direct p50 {:.0} us p99 {:.0} us | captured p50 {:.0} us p99 {:.0} us | added p50 {:.0} us",
        p50(0), p99(0), p50(1), p99(1), p50(1) - p50(0));
    println!(
        "  keep-alive 1 KiB GETs, one connection (5000): direct {:.0} req/s p50 {:.0} us p99 {:.0} us | L7 path {:.0} req/s p50 {:.0} us p99 {:.0} us | ratio {:.2}",
        hrate(0), hp50(0), hp99(0), hrate(1), hp50(1), hp99(1), hrate(1) / hrate(0)
    );
    println!("  connects/s, 32 concurrent (5000):           direct {:.0}/s | captured {:.0}/s | ratio {:.2}",
        cps(0), cps(1), cps(1) / cps(0));
    println!(
        "  daemon RSS: idle {} KiB, with 1000 open proxied connections {} KiB (client: {})",
        rss_idle,
        rss_1000,
        first.trim()
    );
    println!(
        "  enrolment of a new pod (cgroup+process appear → enrolled), 5 runs: {:?} ms",
        enrol_ms
            .iter()
            .map(|m| m.round() as u64)
            .collect::<Vec<_>>()
    );
}
