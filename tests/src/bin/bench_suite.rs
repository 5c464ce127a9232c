//! The side-by-side performance suite (`cargo xtask bench`): the same scenarios over each
//! path, interleaved and repeated, medians reported as a Markdown table (stdout and
//! `target/bench/report.md`). Not a test: nothing here passes or fails.
//!
//! Paths: A direct (the app to nginx), B captured by iptables REDIRECT through a second
//! proxy-daemon (`--capture iptables`, its own capture label), C captured by the eBPF
//! programs through proxy-daemon, D HAProxy as an explicit reverse proxy. (C+, sockmap, is
//! not built: the report says so.)
//! Scenarios: S1 keep-alive 1 KiB GETs (wrk, 16 connections) at saturation, plus latency
//! at fixed rates (`pdtool rate`); S2 `Connection: close` GETs at 16 and 64 clients; S3
//! 1 MiB GETs and an iperf3 stream through opaque-TCP passthrough; S4 RSS idle and per idle
//! connection; S5 S1 again on C with 1,000 services × 5 routes configured, a 100 % mirror
//! on the tested route and a scrape every second; S6 h2 on one multiplexed connection
//! (h2load).
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml, pod_yaml_on, Node, Pod, FIRST_NODE},
    Host,
};

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU time (user + system) of a process, in microseconds.
fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    ticks as f64 * 1e6 / 100.0
}

/// A duration as wrk prints it ("812.00us", "1.23ms", "2.00s"), in microseconds.
fn wrk_duration_us(s: &str) -> Option<f64> {
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mul)
}

#[derive(Debug, Default, Clone, Copy)]
struct WrkRun {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    requests: f64,
}

fn parse_wrk(out: &str) -> WrkRun {
    let mut r = WrkRun::default();
    for line in out.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => r.p50_us = wrk_duration_us(v).unwrap_or(f64::NAN),
            ["99%", v] => r.p99_us = wrk_duration_us(v).unwrap_or(f64::NAN),
            [n, "requests", "in", ..] => r.requests = n.parse().unwrap_or(0.0),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse().unwrap_or(0),
            ["Socket", "errors:", ..] => {
                r.errors += line
                    .split(',')
                    .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    r
}

struct BenchPath {
    pod: usize,
    /// Where the client connects (and the Host it sends).
    to: String,
    /// The proxy's pid, whose CPU is charged to the path.
    proxy: Option<u32>,
}

struct Suite {
    quick: bool,
    secs: u32,
    rounds: usize,
    pods: Vec<Pod>,
}

impl Suite {
    fn run(&self, pod: usize, program: &str, args: &[&str]) -> String {
        let pod = &self.pods[pod];
        let out = pod
            .host
            .command(Some(&pod.app_cgroup()), Path::new(program), args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wrk(&self, path: &BenchPath, url_path: &str, conns: u32, extra: &[&str]) -> (WrkRun, f64) {
        let before = path.proxy.map(cpu_us).unwrap_or(0.0);
        let url = format!("http://{}{url_path}", path.to);
        let (c, d) = (conns.to_string(), format!("{}s", self.secs));
        let mut args = vec!["-t", "1", "-c", &c, "-d", &d, "--latency"];
        args.extend_from_slice(extra);
        args.push(&url);
        let out = self.run(path.pod, "wrk", &args);
        let run = parse_wrk(&out);
        let after = path.proxy.map(cpu_us).unwrap_or(0.0);
        let cpu_per_req = if run.requests > 0.0 && path.proxy.is_some() {
            (after - before) / run.requests
        } else {
            f64::NAN
        };
        (run, cpu_per_req)
    }
}

fn spawn_in(host: &Host, program: &str, args: &[&str]) -> Child {
    host.command(None, Path::new(program), args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn nginx_conf(dir: &Path) -> PathBuf {
    let www = dir.join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("1k"), vec![b'x'; 1024]).expect("1k");
    std::fs::write(www.join("1m"), vec![b'x'; 1 << 20]).expect("1m");
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\nerror_log stderr error;\npid {d}/nginx.pid;\nuser root;\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n  sendfile on;\n\
             client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3;\n\
             uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;\n\
             server {{ listen 80 reuseport; listen 81 http2; listen 82; location / {{ root {d}/www; }} }}\n}}\n"
        ),
    )
    .expect("nginx.conf");
    conf
}

/// S5's configuration: the tested host (nginx's address) behind a ServiceEntry whose
/// VirtualService mirrors every request to nginx's port 82, and 1,000 more services with
/// five routes each (prefix, header, method, regex and catch-all matches).
fn s5_config(nginx: &str, mirror: bool) -> String {
    let mut y = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: captured}}
spec:
  hosts: [web.bench]
  addresses: [{nginx}/32]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {nginx}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: mirror, namespace: captured}}
spec:
  hosts: [mirror.bench]
  ports: [{{number: 82, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {nginx}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: captured}}
spec:
  hosts: [web.bench]
  http:
  - route: [{{destination: {{host: web.bench, port: {{number: 80}}}}}}]
---
"
    );
    if !mirror {
        // Without the mirror, and without its ServiceEntry (how the load waits for it).
        let at = y
            .find("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: mirror")
            .unwrap_or(0);
        let end = y[at..].find("---\n").map_or(y.len(), |e| at + e + 4);
        y.replace_range(at..end, "");
    } else {
        y = y.replace(
            "  - route: [{destination: {host: web.bench, port: {number: 80}}}]\n",
            "  - route: [{destination: {host: web.bench, port: {number: 80}}}]\n    mirror: {host: mirror.bench, port: {number: 82}}\n    mirrorPercentage: {value: 100}\n",
        );
    }
    for i in 0..1000u32 {
        let (a, b) = (10 + i / 250, 1 + i % 250);
        let _ = write!(
            y,
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc-{i}, namespace: captured}}
spec:
  hosts: [svc-{i}.bench]
  addresses: [198.18.{a}.{b}/32]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {nginx}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc-{i}, namespace: captured}}
spec:
  hosts: [svc-{i}.bench]
  http:
  - match: [{{uri: {{prefix: /v1/{i}/}}}}]
    route: [{{destination: {{host: svc-{i}.bench}}}}]
  - match: [{{headers: {{x-tenant: {{exact: t{i}}}}}}}]
    route: [{{destination: {{host: svc-{i}.bench}}}}]
  - match: [{{method: {{exact: POST}}, uri: {{exact: /submit}}}}]
    route: [{{destination: {{host: svc-{i}.bench}}}}]
  - match: [{{uri: {{regex: '/items/[0-9]+/{i}'}}}}]
    route: [{{destination: {{host: svc-{i}.bench}}}}]
  - route: [{{destination: {{host: svc-{i}.bench}}}}]
---
"
        );
    }
    y
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--cross-node-only") {
        let md = cross_node(quick);
        print!("{md}");
        write_report("report-cross-node.md", &md);
        return;
    }
    let mut node = Node::new("suite");
    let nginx_host = node.host("nginx");
    let haproxy_host = node.host("haproxy");
    let captured = node.pod("captured", "client-cap");
    let direct = node.pod("plain", "client-direct");
    let redirected = node.pod("redirected", "client-ipt");
    let paired = node.pod("paired", "client-skm");
    node.write_config(
        "bench.yaml",
        &(namespace_yaml("captured", true, None)
            + &namespace_yaml("plain", false, None)
            + "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: redirected\n  labels:\n    bench.io/capture: iptables\n---\n"
            + "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: paired\n  labels:\n    bench.io/capture: sockmap\n---\n"
            + &pod_yaml(&captured, &[("app", "cap")])
            + &pod_yaml(&direct, &[("app", "direct")])
            + &pod_yaml(&redirected, &[("app", "ipt")])
            + &pod_yaml(&paired, &[("app", "skm")])),
    );
    let work = node.work_dir.join("suite");
    std::fs::create_dir_all(&work).expect("work dir");
    let conf = nginx_conf(&work);
    let mut nginx = spawn_in(
        &nginx_host,
        "nginx",
        &[
            "-p",
            work.to_str().unwrap_or_default(),
            "-c",
            conf.to_str().unwrap_or_default(),
            "-g",
            "daemon off;",
        ],
    );
    let mut iperf = spawn_in(&nginx_host, "iperf3", &["-s", "-p", "5201"]);
    let up = nginx_host.addr(80).to_string();
    let haproxy_cfg = work.join("haproxy.cfg");
    std::fs::write(
        &haproxy_cfg,
        format!(
            "global\n  nbthread 2\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\nfrontend fe\n  bind :8080\n  default_backend be\nbackend be\n  http-reuse always\n  server web {up}\n"
        ),
    )
    .expect("haproxy.cfg");
    let mut haproxy = spawn_in(
        &haproxy_host,
        "haproxy",
        &["-db", "-f", haproxy_cfg.to_str().unwrap_or_default()],
    );
    std::thread::sleep(Duration::from_millis(300));
    if let Ok(Some(status)) = haproxy.try_wait() {
        eprintln!("haproxy exited at start ({status}): the D column will be empty");
    }
    let daemon = Daemon::start(&node, &["--log-level", "warn"]);
    daemon.wait_enrolled(&captured.uid, Duration::from_secs(5));
    // Path B: the same binary, capturing its own namespace label by iptables. Its own pin
    // directory: the hand-over socket is named after it, and sharing it would make B take
    // over C's sockets.
    let ipt_pins = format!("{}-ipt", node.pin_dir.display());
    let daemon_ipt = Daemon::start(
        &node,
        &[
            "--bpf-pin-dir",
            &ipt_pins,
            "--log-level",
            "warn",
            "--capture",
            "iptables",
            "--capture-label",
            "bench.io/capture=iptables",
            "--fail-mode",
            "closed",
        ],
    );
    daemon_ipt.wait_enrolled(&redirected.uid, Duration::from_secs(5));
    // Path C+: eBPF capture plus sockmap pairing, its own label and pin directory.
    let skm_pins = format!("{}-skm", node.pin_dir.display());
    let daemon_skm = Daemon::start(
        &node,
        &[
            "--bpf-pin-dir",
            &skm_pins,
            "--log-level",
            "warn",
            "--sockmap",
            "--capture-label",
            "bench.io/capture=sockmap",
        ],
    );
    daemon_skm.wait_enrolled(&paired.uid, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    let daemon_pid = daemon.pid().expect("daemon pid");
    let ipt_pid = daemon_ipt.pid().expect("iptables daemon pid");
    let skm_pid = daemon_skm.pid().expect("sockmap daemon pid");
    let rss_idle = proxy_tests::rss_kib(daemon_pid);
    let suite = Suite {
        quick,
        secs: if quick { 3 } else { 10 },
        rounds: if quick { 1 } else { 3 },
        pods: vec![direct, captured, redirected, paired],
    };
    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;
    const CP: usize = 3;
    const D: usize = 4;
    let paths = [
        BenchPath {
            pod: 0,
            to: up.clone(),
            proxy: None,
        },
        BenchPath {
            pod: 2,
            to: up.clone(),
            proxy: Some(ipt_pid),
        },
        BenchPath {
            pod: 1,
            to: up.clone(),
            proxy: Some(daemon_pid),
        },
        BenchPath {
            pod: 3,
            to: up.clone(),
            proxy: Some(skm_pid),
        },
        BenchPath {
            pod: 0,
            to: haproxy_host.addr(8080).to_string(),
            proxy: Some(haproxy.id()),
        },
    ];
    // `--profile`: perf on the daemon during S1 and S2-64 on C (and HAProxy during S1 for
    // comparison), reports in target/bench/profile-*.txt; no table.
    if std::env::args().any(|a| a == "--profile") {
        let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
        let _ = std::fs::create_dir_all(&out_dir);
        let runs: [(&str, usize, &str, u32, &[&str]); 4] = [
            ("s1-c", C, "/1k", 16, &[]),
            ("s1-cplus", CP, "/1k", 16, &[]),
            ("s2-64-c", C, "/1k", 64, &["-H", "Connection: close"]),
            ("s1-d", D, "/1k", 16, &[]),
        ];
        for (name, i, url, conns, extra) in runs {
            let Some(pid) = paths[i].proxy else { continue };
            let data = out_dir.join(format!("profile-{name}.data"));
            let mut perf = std::process::Command::new("perf")
                .args(["record", "-F", "1999", "-g", "-p", &pid.to_string(), "-o"])
                .arg(&data)
                .args(["--", "sleep", &suite.secs.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("perf");
            let (r, cpu) = suite.wrk(&paths[i], url, conns, extra);
            let _ = perf.wait();
            let report = std::process::Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "--percent-limit",
                    "0.7",
                    "-g",
                    "none",
                    "-i",
                ])
                .arg(&data)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let text = format!(
                "{name}: {:.0} req/s, {cpu:.1} µs CPU per request\n\n{report}",
                r.rps
            );
            let _ = std::fs::write(out_dir.join(format!("profile-{name}.txt")), &text);
            println!("{name}: {:.0} req/s, {cpu:.1} µs CPU per request", r.rps);
        }
        // System calls per request, the daemon beside HAProxy (perf trace's summary).
        for (name, i) in [("s1-c", C), ("s1-d", D)] {
            let Some(pid) = paths[i].proxy else { continue };
            let trace = std::process::Command::new("perf")
                .args(["trace", "-s", "-p", &pid.to_string(), "--", "sleep"])
                .arg(suite.secs.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("perf trace");
            let (r, _) = suite.wrk(&paths[i], "/1k", 16, &[]);
            let out = trace
                .wait_with_output()
                .map(|o| o.stderr)
                .unwrap_or_default();
            let text = format!(
                "{name}: {:.0} requests in {} s\n\n{}",
                r.requests,
                suite.secs,
                String::from_utf8_lossy(&out)
            );
            let _ = std::fs::write(out_dir.join(format!("syscalls-{name}.txt")), &text);
        }
        for child in [&mut nginx, &mut iperf, &mut haproxy] {
            let _ = child.kill();
            let _ = child.wait();
        }
        return;
    }
    // Warm up every path (connections, pools, page cache).
    for p in &paths {
        let _ = suite.run(
            p.pod,
            "wrk",
            &[
                "-t",
                "1",
                "-c",
                "4",
                "-d",
                "1s",
                &format!("http://{}/1k", p.to),
            ],
        );
    }

    type Row = (String, [Vec<f64>; 5], &'static str);
    let mut rows: Vec<Row> = Vec::new();
    let mut row = |label: &str, unit: &'static str| -> usize {
        rows.push((
            label.to_string(),
            [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()],
            unit,
        ));
        rows.len() - 1
    };
    let s1_rps = row("S1 keep-alive 1 KiB, 16 conns: req/s", "req/s");
    let s1_p50 = row("S1 same: p50", "µs");
    let s1_p99 = row("S1 same: p99", "µs");
    let s1_cpu = row("S1 same: proxy CPU per request", "µs");
    let s2_16 = row("S2 Connection: close, 16 clients: req/s", "req/s");
    let s2_16cpu = row("S2 same: proxy CPU per request", "µs");
    let s2_64 = row("S2 Connection: close, 64 clients: req/s", "req/s");
    let s3_1m = row("S3 1 MiB GETs, 4 conns: req/s", "req/s");
    let s3_iperf = row("S3 iperf3 through opaque TCP: Gbit/s", "Gbit/s");
    let s6_h2 = row("S6 h2 (h2load, 1 conn × 100 streams): req/s", "req/s");
    let r1k_p50 = row("S1 at a fixed 1,000 req/s (4 conns): p50", "µs");
    let r1k_p99 = row("S1 at a fixed 1,000 req/s (4 conns): p99", "µs");
    let r5k_p50 = row("S1 at a fixed 5,000 req/s (16 conns): p50", "µs");
    let r5k_p99 = row("S1 at a fixed 5,000 req/s (16 conns): p99", "µs");
    let s5 = row(
        "S5 S1 with 1,000 services × 5 routes, 100 % mirror, 1 s scrapes: req/s",
        "req/s",
    );
    let s5_plain = row(
        "S5 without the mirror (1,000 services × 5 routes, 1 s scrapes): req/s",
        "req/s",
    );
    let mut errors = 0u64;
    for _round in 0..suite.rounds {
        for (i, p) in paths.iter().enumerate() {
            let (r, cpu) = suite.wrk(p, "/1k", 16, &[]);
            errors += r.errors;
            rows[s1_rps].1[i].push(r.rps);
            rows[s1_p50].1[i].push(r.p50_us);
            rows[s1_p99].1[i].push(r.p99_us);
            rows[s1_cpu].1[i].push(cpu);
            let (r, cpu) = suite.wrk(p, "/1k", 16, &["-H", "Connection: close"]);
            errors += r.errors;
            rows[s2_16].1[i].push(r.rps);
            rows[s2_16cpu].1[i].push(cpu);
            if !suite.quick {
                let (r, _) = suite.wrk(p, "/1k", 64, &["-H", "Connection: close"]);
                errors += r.errors;
                rows[s2_64].1[i].push(r.rps);
            }
            // Latency at fixed rates, from each request's scheduled time (no coordinated
            // omission): what a service under ordinary load sees.
            for (rate, conns, p50, p99) in [
                ("1000", "4", r1k_p50, r1k_p99),
                ("5000", "16", r5k_p50, r5k_p99),
            ] {
                let out = suite.run(
                    p.pod,
                    &proxy_tests::target_bin("pdtool").display().to_string(),
                    &[
                        "rate",
                        "--to",
                        &p.to,
                        "--host",
                        "bench",
                        "--ms",
                        &(suite.secs.div_ceil(2).max(3) * 1000).to_string(),
                        "--rate",
                        rate,
                        "--conns",
                        conns,
                        "--path",
                        "/1k",
                    ],
                );
                let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                errors += v["failed"].as_u64().unwrap_or(0);
                rows[p50].1[i].push(v["p50_us"].as_f64().unwrap_or(f64::NAN));
                rows[p99].1[i].push(v["p99_us"].as_f64().unwrap_or(f64::NAN));
            }
            let (r, _) = suite.wrk(p, "/1m", 4, &[]);
            errors += r.errors;
            rows[s3_1m].1[i].push(r.rps);
            // iperf3 and h2 are not proxied by HAProxy here (http mode).
            if i != D {
                let t = suite.secs.to_string();
                let out = suite.run(
                    p.pod,
                    "iperf3",
                    &[
                        "-c",
                        &nginx_host.ip.to_string(),
                        "-p",
                        "5201",
                        "-t",
                        &t,
                        "-J",
                    ],
                );
                let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                rows[s3_iperf].1[i].push(
                    v["end"]["sum_received"]["bits_per_second"]
                        .as_f64()
                        .unwrap_or(f64::NAN)
                        / 1e9,
                );
                let n = if suite.quick { "20000" } else { "100000" };
                let out = suite.run(
                    p.pod,
                    "h2load",
                    &[
                        "-n",
                        n,
                        "-c",
                        "1",
                        "-m",
                        "100",
                        &format!("http://{}:81/1k", nginx_host.ip),
                    ],
                );
                let rps = out
                    .lines()
                    .find_map(|l| l.strip_prefix("finished in"))
                    .and_then(|l| l.split(',').nth(1))
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse::<f64>().ok())
                    .unwrap_or(f64::NAN);
                rows[s6_h2].1[i].push(rps);
            }
        }
    }

    // S4: RSS idle and per idle proxied connection.
    let mut s4 = String::new();
    let counts: &[usize] = if quick { &[1000] } else { &[1000, 10000] };
    for &n in counts {
        let before = proxy_tests::rss_kib(daemon_pid);
        let mut hold = suite.pods[1]
            .host
            .command(
                Some(&suite.pods[1].app_cgroup()),
                &proxy_tests::target_bin("pdtool"),
                &[
                    "hold-many",
                    "--to",
                    &up,
                    "--count",
                    &n.to_string(),
                    "--ms",
                    "3000",
                ],
            )
            .stdout(Stdio::piped())
            .spawn()
            .expect("hold-many");
        std::thread::sleep(Duration::from_millis(2000));
        let during = proxy_tests::rss_kib(daemon_pid);
        let _ = hold.wait();
        let _ = writeln!(
            s4,
            "| S4 RSS with {n} idle proxied connections | {during} KiB | {:.1} KiB per connection |",
            (during as f64 - before as f64) / n as f64
        );
    }
    // S5: S1 again on B and C with a big configuration, a 100 % mirror on the tested route
    // and a scrape every second.
    let mut rss_s5_config = 0;
    let mut mirrored = 0.0;
    for (variant, mirror) in [(s5, true), (s5_plain, false)] {
        node.write_config("s5.yaml", &s5_config(&nginx_host.ip.to_string(), mirror));
        let loaded = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            [&daemon, &daemon_ipt].iter().all(|d| {
                let snap = d.config_dump()["snapshot"].to_string();
                snap.contains("svc-999.bench") && snap.contains("mirror.bench") == mirror
            })
        });
        if !loaded {
            eprintln!("S5 configuration (mirror: {mirror}) not loaded within 20 s");
        }
        std::thread::sleep(Duration::from_secs(1));
        if mirror {
            rss_s5_config = proxy_tests::rss_kib(daemon_pid);
        }
        for _round in 0..suite.rounds {
            for (i, p) in paths.iter().enumerate() {
                if i == A || i == CP || i == D {
                    continue;
                }
                let scraping = std::sync::atomic::AtomicBool::new(true);
                let scraper_of = if i == B { &daemon_ipt } else { &daemon };
                let r = std::thread::scope(|scope| {
                    scope.spawn(|| {
                        while scraping.load(std::sync::atomic::Ordering::Relaxed) {
                            let _ = scraper_of.metrics_text();
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    });
                    let (r, _) = suite.wrk(p, "/1k", 16, &[]);
                    scraping.store(false, std::sync::atomic::Ordering::Relaxed);
                    r
                });
                errors += r.errors;
                rows[variant].1[i].push(r.rps);
            }
        }
        if mirror {
            mirrored = daemon.metric_sum(
                "istio_requests_total",
                &[("destination_service", "mirror.bench")],
            );
        }
    }
    let rss_s5_after = proxy_tests::rss_kib(daemon_pid);
    node.remove_config("s5.yaml");
    let _ = writeln!(
        s4,
        "| RSS with S5's configuration loaded (2,003 objects), before its load | {rss_s5_config} KiB | |\n| RSS after S5's loads | {rss_s5_after} KiB | |"
    );

    for child in [&mut nginx, &mut iperf, &mut haproxy] {
        let _ = child.kill();
        let _ = child.wait();
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "## proxy-daemon performance suite ({}; medians of {} interleaved round{}, {} s per run; release build; 2 cores shared by load, proxy and upstream)\n",
        if quick { "--quick" } else { "full" },
        suite.rounds,
        if suite.rounds == 1 { "" } else { "s" },
        suite.secs
    );
    let _ = writeln!(
        md,
        "| scenario | A direct | B iptables + proxy-daemon | C eBPF + proxy-daemon | C+ eBPF + sockmap | D HAProxy 2.6 | C / A | C / B | C / D | C+ / C | C+ / D |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let medians: Vec<[f64; 5]> = rows
        .iter()
        .map(|(_, v, _)| [0, 1, 2, 3, 4].map(|i| median(v[i].clone())))
        .collect();
    for ((label, _, unit), m) in rows.iter().zip(&medians) {
        let fmt = |x: f64| {
            if x.is_nan() {
                "—".to_string()
            } else if *unit == "Gbit/s" {
                format!("{x:.2} {unit}")
            } else {
                format!("{x:.0} {unit}")
            }
        };
        let ratio = |a: f64, b: f64| {
            if a.is_nan() || b.is_nan() || b == 0.0 {
                "—".to_string()
            } else {
                format!("{:.2}×", a / b)
            }
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt(m[A]),
            fmt(m[B]),
            fmt(m[C]),
            fmt(m[CP]),
            fmt(m[D]),
            ratio(m[C], m[A]),
            ratio(m[C], m[B]),
            ratio(m[C], m[D]),
            ratio(m[CP], m[C]),
            ratio(m[CP], m[D])
        );
    }
    let _ = writeln!(
        md,
        "\n| added latency vs direct (median of rounds) | B iptables | C eBPF | C+ sockmap | D HAProxy |\n|---|---|---|---|---|"
    );
    for idx in [r1k_p50, r1k_p99, r5k_p50, r5k_p99] {
        let m = medians[idx];
        let _ = writeln!(
            md,
            "| {} | {:+.0} µs | {:+.0} µs | {:+.0} µs | {:+.0} µs |",
            rows[idx].0,
            m[B] - m[A],
            m[C] - m[A],
            m[CP] - m[A],
            m[D] - m[A]
        );
    }
    let _ = writeln!(
        md,
        "\nS5 / S1 on C: {:.2}× with the mirror, {:.2}× without (B: {:.2}×, {:.2}×); mirror copies counted on C: {mirrored}.",
        medians[s5][C] / medians[s1_rps][C],
        medians[s5_plain][C] / medians[s1_rps][C],
        medians[s5][B] / medians[s1_rps][B],
        medians[s5_plain][B] / medians[s1_rps][B]
    );
    let _ = writeln!(
        md,
        "\n| memory | value | |\n|---|---|---|\n| S4 daemon RSS idle | {rss_idle} KiB | |\n{s4}"
    );
    let _ = writeln!(
        md,
        "Errors (non-2xx, socket errors) over all wrk and rate runs: {errors}. Path C+ pairing: {} socket ends paired, {} messages fell back to TCP.",
        daemon_skm.metric_sum("proxy_daemon_capture_decisions", &[("decision", "sockmap_paired")]),
        daemon_skm.metric_sum("proxy_daemon_capture_decisions", &[("decision", "sockmap_fallback")])
    );
    drop(daemon_skm);
    drop(daemon_ipt);
    drop(daemon);
    md.push_str(&cross_node(quick));
    print!("{md}");
    write_report("report.md", &md);
}

fn write_report(name: &str, md: &str) {
    let report = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&report);
    let _ = std::fs::write(report.join(name), md);
}

/// The cross-node path: a client pod on node A calling a pod on node B, plaintext (the
/// server's namespace not captured: node A's proxy, then straight to the pod) and over
/// HBONE (both captured: node A's proxy, mutual TLS, node B's proxy). Keep-alive and
/// `Connection: close` requests, the added latency of a new app connection over a pooled
/// tunnel, and of a new HBONE connection (handshake included).
/// A 20-rule L7 AuthorizationPolicy on the server: 19 rules for other callers and paths,
/// the allowing one last, so each request is checked against every rule.
fn twenty_rule_policy() -> String {
    let mut rules = String::new();
    for i in 1..20 {
        rules.push_str(&format!(
            "  - from: [{{source: {{principals: [cluster.local/ns/other{i}/sa/app]}}}}]\n    to: [{{operation: {{methods: [GET, POST], paths: [\"/p{i}/*\"]}}}}]\n"
        ));
    }
    rules.push_str(
        "  - from: [{source: {principals: [cluster.local/ns/xa/sa/client]}}]\n    to: [{operation: {methods: [GET], paths: [\"/1k\"]}}]\n",
    );
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bench-20-rules, namespace: xb}}\nspec:\n  selector: {{matchLabels: {{app: srv}}}}\n  rules:\n{rules}---\n"
    )
}

/// The destination proxy's CPU per request over HBONE keep-alive, without and with the
/// 20-rule policy, interleaved round by round.
fn authz_cost(suite: &Suite, node: &Node, daemon_b: &Daemon) -> String {
    let path = BenchPath {
        pod: 0,
        to: "198.18.0.210:80".into(),
        proxy: daemon_b.pid(),
    };
    let (mut bare, mut with, mut rps_bare, mut rps_with) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..suite.rounds {
        node.write_config("authz.yaml", "");
        std::thread::sleep(Duration::from_millis(1500));
        let (r, cpu) = suite.wrk(&path, "/1k", 16, &[]);
        bare.push(cpu);
        rps_bare.push(r.rps);
        node.write_config("authz.yaml", &twenty_rule_policy());
        std::thread::sleep(Duration::from_millis(1500));
        let (r, cpu) = suite.wrk(&path, "/1k", 16, &[]);
        with.push(cpu);
        rps_with.push(r.rps);
    }
    node.write_config("authz.yaml", "");
    let allowed = daemon_b.metric_sum(
        "proxy_daemon_authorization_total",
        &[("policy", "xb.bench-20-rules"), ("decision", "allow")],
    );
    let (b, w) = (median(bare), median(with));
    format!(
        "\n### AuthorizationPolicy on the destination (node B), HBONE keep-alive, 16 conns\n\n| | no policy | 20-rule L7 policy (the allowing rule last) | change |\n|---|---|---|---|\n| node B's CPU per request | {b:.1} µs | {w:.1} µs | {:+.1} % |\n| req/s | {:.0} | {:.0} | {:+.1} % |\n\nRequests the policy allowed (proxy_daemon_authorization_total): {allowed}.\n",
        (w / b - 1.0) * 100.0,
        median(rps_bare.clone()),
        median(rps_with.clone()),
        (median(rps_with) / median(rps_bare) - 1.0) * 100.0
    )
}

fn cross_node(quick: bool) -> String {
    let mut node = Node::new("xnode");
    let b = node.second_node("node-b");
    let client = node.pod("xa", "client-0");
    let mesh_srv = node.pod_on(&b, "xb", "srv-0");
    let plain_srv = node.pod_on(&b, "xplain", "srv-1");
    let ca = proxy_tests::pki::TestCa::new("bench-mesh-root");
    let work = node.work_dir.join("xnode");
    std::fs::create_dir_all(&work).expect("work dir");
    let (cert, key) = (work.join("ca.pem"), work.join("ca-key.pem"));
    std::fs::write(&cert, &ca.cert_pem).expect("ca");
    std::fs::write(&key, &ca.key_pem).expect("ca key");
    node.write_config(
        "bench.yaml",
        &(namespace_yaml("xa", true, None)
            + &namespace_yaml("xb", true, None)
            + &namespace_yaml("xplain", false, None)
            + &pod_yaml_on(&client, &[("app", "client")], FIRST_NODE, "client")
            + &pod_yaml_on(&mesh_srv, &[("app", "srv")], &b.name, "srv")
            + &pod_yaml_on(&plain_srv, &[("app", "srv")], &b.name, "srv")
            + "apiVersion: v1\nkind: Service\nmetadata: {name: srv, namespace: xb}\nspec:\n  clusterIP: 198.18.0.210\n  selector: {app: srv}\n  ports: [{name: http, port: 80}, {name: tcp-echo, port: 7000}]\n---\n"
            + "apiVersion: v1\nkind: Service\nmetadata: {name: srv, namespace: xplain}\nspec:\n  clusterIP: 198.18.0.211\n  selector: {app: srv}\n  ports: [{name: http, port: 80}, {name: tcp-echo, port: 7000}]\n---\n"),
    );
    let ca_flags = [
        "--ca-cert".to_string(),
        cert.display().to_string(),
        "--ca-key".to_string(),
        key.display().to_string(),
        "--log-level".to_string(),
        "warn".to_string(),
    ];
    let a_flags: Vec<&str> = ca_flags.iter().map(String::as_str).collect();
    let daemon_a = Daemon::start(&node, &a_flags);
    let mut b_flags = b.daemon_flags();
    b_flags.extend(ca_flags.iter().cloned());
    let b_flags: Vec<&str> = b_flags.iter().map(String::as_str).collect();
    let daemon_b = Daemon::start(&node, &b_flags);
    daemon_a.wait_enrolled(&client.uid, Duration::from_secs(5));
    daemon_b.wait_enrolled(&mesh_srv.uid, Duration::from_secs(5));
    let servers = proxy_tests::servers::Servers::new();
    let mut nginxes = Vec::new();
    for (name, pod) in [("mesh", &mesh_srv), ("plain", &plain_srv)] {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let conf = nginx_conf(&dir);
        nginxes.push(spawn_in(
            &pod.host,
            "nginx",
            &[
                "-p",
                dir.to_str().unwrap_or_default(),
                "-c",
                conf.to_str().unwrap_or_default(),
                "-g",
                "daemon off;",
            ],
        ));
        servers.identity(&pod.host, 7000);
    }
    std::thread::sleep(Duration::from_millis(500));
    let suite = Suite {
        quick,
        secs: if quick { 3 } else { 10 },
        rounds: if quick { 1 } else { 3 },
        pods: vec![client],
    };
    let targets = [("198.18.0.211", "plaintext"), ("198.18.0.210", "HBONE")];
    for (ip, _) in targets {
        let _ = suite.run(
            0,
            "wrk",
            &["-t", "1", "-c", "4", "-d", "1s", &format!("http://{ip}/1k")],
        );
    }
    let mut keep = [Vec::new(), Vec::new()];
    let mut keep_p50 = [Vec::new(), Vec::new()];
    let mut close = [Vec::new(), Vec::new()];
    let mut new_conn = [Vec::new(), Vec::new()];
    let count = if quick { "500" } else { "2000" };
    for _ in 0..suite.rounds {
        for (i, (ip, _)) in targets.iter().enumerate() {
            let path = BenchPath {
                pod: 0,
                to: format!("{ip}:80"),
                proxy: None,
            };
            let (r, _) = suite.wrk(&path, "/1k", 16, &[]);
            keep[i].push(r.rps);
            keep_p50[i].push(r.p50_us);
            let (r, _) = suite.wrk(&path, "/1k", 16, &["-H", "Connection: close"]);
            close[i].push(r.rps);
            let out = suite.run(
                0,
                &proxy_tests::target_bin("pdtool").display().to_string(),
                &["latency", "--to", &format!("{ip}:7000"), "--count", count],
            );
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            new_conn[i].push(v["p50_us"].as_f64().unwrap_or(f64::NAN));
        }
    }
    // A new HBONE connection of its own (TLS 1.3 handshake with a workload certificate,
    // HTTP/2, CONNECT, one exchange), from the client pod's address, beside a plain TCP
    // connect and exchange to the same pod.
    let leaf = ca.workload("spiffe://cluster.local/ns/xa/sa/client");
    let (lc, lk) = (work.join("client.pem"), work.join("client-key.pem"));
    std::fs::write(&lc, &leaf.cert_pem).expect("leaf");
    std::fs::write(&lk, &leaf.key_pem).expect("leaf key");
    let n = if quick { "100" } else { "400" };
    let hbone = suite.pods[0]
        .host
        .command(
            None,
            &proxy_tests::target_bin("pdtool"),
            &[
                "hbone",
                "--to",
                &format!("{}:15008", mesh_srv.host.ip),
                "--authority",
                &format!("{}:7000", mesh_srv.host.ip),
                "--cert",
                lc.to_str().unwrap_or_default(),
                "--key",
                lk.to_str().unwrap_or_default(),
                "--count",
                n,
            ],
        )
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let hbone: serde_json::Value = serde_json::from_str(&hbone).unwrap_or_default();
    let plain = suite.pods[0]
        .host
        .command(
            None,
            &proxy_tests::target_bin("pdtool"),
            &[
                "latency",
                "--to",
                &format!("{}:7000", plain_srv.host.ip),
                "--count",
                n,
            ],
        )
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let plain: serde_json::Value = serde_json::from_str(&plain).unwrap_or_default();
    let handshakes = daemon_a.metric_sum("proxy_daemon_hbone_handshakes_total", &[]);
    let authz = authz_cost(&suite, &node, &daemon_b);
    for mut c in nginxes {
        let _ = c.kill();
        let _ = c.wait();
    }
    let m = |v: &Vec<f64>| median(v.clone());
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}×", a / b)
        } else {
            "—".into()
        }
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n## Cross-node: pod on node A → pod on node B (medians of {} round{}, {} s per run)\n\n| scenario | plaintext | HBONE (mutual TLS) | HBONE / plaintext |\n|---|---|---|---|",
        suite.rounds,
        if suite.rounds == 1 { "" } else { "s" },
        suite.secs
    );
    let _ = writeln!(
        md,
        "| keep-alive 1 KiB, 16 conns: req/s | {:.0} | {:.0} | {} |",
        m(&keep[0]),
        m(&keep[1]),
        ratio(m(&keep[1]), m(&keep[0]))
    );
    let _ = writeln!(
        md,
        "| keep-alive: p50 | {:.0} µs | {:.0} µs | {:+.0} µs |",
        m(&keep_p50[0]),
        m(&keep_p50[1]),
        m(&keep_p50[1]) - m(&keep_p50[0])
    );
    let _ = writeln!(
        md,
        "| Connection: close, 16 clients: req/s | {:.0} | {:.0} | {} |",
        m(&close[0]),
        m(&close[1]),
        ratio(m(&close[1]), m(&close[0]))
    );
    let _ = writeln!(
        md,
        "| new app connection + one exchange, p50 (HBONE: over the pooled tunnel) | {:.0} µs | {:.0} µs | {:+.0} µs |",
        m(&new_conn[0]),
        m(&new_conn[1]),
        m(&new_conn[1]) - m(&new_conn[0])
    );
    let _ = writeln!(
        md,
        "| a connection that needs its own handshake (plain TCP vs TLS 1.3 + HTTP/2 + CONNECT), p50 | {:.0} µs | {:.0} µs | {:+.0} µs |",
        plain["p50_us"].as_f64().unwrap_or(f64::NAN),
        hbone["p50_us"].as_f64().unwrap_or(f64::NAN),
        hbone["p50_us"].as_f64().unwrap_or(f64::NAN) - plain["p50_us"].as_f64().unwrap_or(f64::NAN)
    );
    let _ = writeln!(
        md,
        "\nHBONE connections node A opened for all of the above: {handshakes} (pooled: one per source identity and destination pod)."
    );
    md.push_str(&authz);
    drop(daemon_b);
    drop(daemon_a);
    md
}
