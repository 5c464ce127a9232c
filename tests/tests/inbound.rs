//! Inbound capture: every TCP connection to a captured pod reaches the daemon first (the
//! kernel's sk_lookup program hands it to the daemon's listener in the pod's namespace,
//! keeping the address the caller dialled), then the app from 127.0.0.6 — mutual TLS over
//! HBONE from captured pods, plaintext from the rest, as the pod's PeerAuthentication
//! allows. Kubelet probes (from the node, or ambient's 169.254.7.127) go straight to the
//! app.
use std::{net::Ipv4Addr, time::Duration};

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml_on, Host, Node, FIRST_NODE},
    pki::TestCa,
    servers::{HttpEcho, Servers},
    target_bin, wait_for, Pod, Seen,
};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/prod/sa/db";
/// Where ambient's CNI makes the kubelet's probes come from.
const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);

/// One node: `web` (shop, captured), `db` (prod, captured; an identity server on 7000 and
/// 7001, an HTTP echo on 8080), an outsider host (not a pod) and the kubelet's probe
/// address, with Service `db.prod` at 198.18.0.250.
struct Setup {
    node: Node,
    _servers: Servers,
    web: Pod,
    db: Pod,
    outsider: Host,
    kubelet: Host,
    seen: Seen,
    seen_other_port: Seen,
    echo_log: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    base_yaml: String,
}

fn setup(tag: &str, db_fail_mode: &str) -> Setup {
    let mut node = Node::new(tag);
    let servers = Servers::new();
    let web = node.pod("shop", "web-0");
    let db = node.pod("prod", "db-0");
    let outsider = node.host("outsider");
    let kubelet = node.host_at("kubelet", PROBE_SOURCE);
    db.host.route_to(PROBE_SOURCE);
    let seen = servers.identity(&db.host, 7000);
    let seen_other_port = servers.identity(&db.host, 7001);
    let echo_log: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
    servers.http_echo(
        &db.host,
        8080,
        HttpEcho {
            name: "db".into(),
            log: Some(echo_log.clone()),
            ..Default::default()
        },
    );
    let ca = TestCa::new("mesh-root");
    let (cert, key) = (
        node.work_dir.join("ca.pem"),
        node.work_dir.join("ca-key.pem"),
    );
    std::fs::write(&cert, &ca.cert_pem).unwrap();
    std::fs::write(&key, &ca.key_pem).unwrap();
    let base_yaml = namespace_yaml("shop", true, None)
        + &namespace_yaml("prod", true, Some(db_fail_mode))
        + &pod_yaml_on(&web, &[("app", "web")], FIRST_NODE, "web")
        + &pod_yaml_on(&db, &[("app", "db")], FIRST_NODE, "db")
        + "apiVersion: v1
kind: Service
metadata: {name: db, namespace: prod}
spec:
  clusterIP: 198.18.0.250
  selector: {app: db}
  ports:
  - {name: tcp-ident, port: 7000}
  - {name: tcp-ident2, port: 7001}
  - {name: http, port: 80, targetPort: 8080}
---
";
    node.write_config("cluster.yaml", &base_yaml);
    Setup {
        node,
        _servers: servers,
        web,
        db,
        outsider,
        kubelet,
        seen,
        seen_other_port,
        echo_log,
        base_yaml,
    }
}

impl Setup {
    fn daemon(&self) -> Daemon {
        let cert = self.node.work_dir.join("ca.pem").display().to_string();
        let key = self.node.work_dir.join("ca-key.pem").display().to_string();
        let d = Daemon::start(&self.node, &["--ca-cert", &cert, "--ca-key", &key]);
        d.wait_enrolled(&self.web.uid, Duration::from_secs(5));
        d.wait_enrolled(&self.db.uid, Duration::from_secs(5));
        d
    }

    /// `pdtool connect` from a host that is not a pod (its netns, no captured cgroup).
    fn connect_from(&self, host: &Host, port: u16) -> serde_json::Value {
        let to = format!("{}:{port}", self.db.host.ip);
        let out = host
            .command(
                None,
                &target_bin("pdtool"),
                &["connect", "--to", &to, "--timeout-ms", "2000"],
            )
            .output()
            .expect("pdtool connect");
        serde_json::from_slice(&out.stdout).expect("pdtool JSON")
    }

    /// The peer address the app saw for the last connection.
    fn last_peer(seen: &Seen) -> String {
        seen.peers()
            .last()
            .map(|(p, _)| p.ip().to_string())
            .unwrap_or_default()
    }

    fn apply_extra(&self, extra: &str) {
        self.node
            .write_config("cluster.yaml", &(self.base_yaml.clone() + extra));
    }
}

fn destination_tcp(d: &Daemon, extra: &[(&str, &str)]) -> f64 {
    let mut labels = vec![("reporter", "destination")];
    labels.extend_from_slice(extra);
    d.metric_sum("istio_tcp_connections_closed_total", &labels)
}

#[test]
fn plaintext_reaches_a_pod_through_the_daemon_and_strict_peer_authentication_refuses_it() {
    let s = setup("inbound", "closed");
    let d = s.daemon();

    // A caller outside the mesh, no policy (PERMISSIVE): through the daemon, which the app
    // sees as 127.0.0.6; the destination reports plaintext.
    let out = s.connect_from(&s.outsider, 7000);
    assert_eq!(out["result"], "ok", "{out}");
    assert_eq!(
        Setup::last_peer(&s.seen),
        "127.0.0.6",
        "{}",
        d.metrics_text()
    );
    let plaintext = [
        ("connection_security_policy", "none"),
        ("destination_workload", "db"),
        ("destination_service", "db.prod.svc.cluster.local"),
        ("source_principal", "unknown"),
    ];
    assert!(
        wait_for(Duration::from_secs(3), || (destination_tcp(&d, &plaintext)
            == 1.0)
            .then_some(()))
        .is_some(),
        "{}",
        d.metrics_text()
    );
    assert!(
        d.metric_sum(
            "proxy_daemon_capture_decisions",
            &[("decision", "inbound_redirected")]
        ) >= 1.0
    );
    // The kubelet's probe: straight to the app, which sees the probe's address.
    let out = s.connect_from(&s.kubelet, 7000);
    assert_eq!(out["result"], "ok", "{out}");
    assert_eq!(Setup::last_peer(&s.seen), PROBE_SOURCE.to_string());
    assert!(
        d.metric_sum(
            "proxy_daemon_capture_decisions",
            &[("decision", "inbound_from_node")]
        ) >= 1.0
    );
    // A captured pod: HBONE (same node), mutual TLS with both identities.
    let out = s.web.pdtool(&["connect", "--to", "198.18.0.250:7000"]);
    assert_eq!(out["result"], "ok", "{out}");
    assert_eq!(Setup::last_peer(&s.seen), "127.0.0.6");
    let mtls = [
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", WEB),
        ("destination_principal", DB),
        ("source_workload", "web"),
    ];
    assert!(
        wait_for(Duration::from_secs(3), || (destination_tcp(&d, &mtls)
            == 1.0)
            .then_some(()))
        .is_some(),
        "{}",
        d.metrics_text()
    );

    // STRICT for the namespace: plaintext refused, counted and reported as DENY; the
    // probe and the mesh still get through.
    s.apply_extra(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: prod}
spec:
  mtls: {mode: STRICT}
---
",
    );
    let refused = wait_for(Duration::from_secs(5), || {
        let out = s.connect_from(&s.outsider, 7000);
        (out["result"] != "ok").then_some(out)
    })
    .expect("plaintext refused once STRICT applies");
    assert_ne!(refused["result"], "timeout", "{refused}");
    let peers_before = s.seen.peers().len();
    let out = s.connect_from(&s.outsider, 7000);
    assert_ne!(out["result"], "ok", "{out}");
    assert_eq!(
        s.seen.peers().len(),
        peers_before,
        "nothing reached the app"
    );
    assert!(
        d.metric_sum(
            "proxy_daemon_inbound_refused_total",
            &[("reason", "plaintext_strict")]
        ) >= 2.0
    );
    assert!(
        destination_tcp(
            &d,
            &[
                ("response_flags", "DENY"),
                ("connection_security_policy", "none")
            ]
        ) >= 2.0,
        "{}",
        d.metrics_text()
    );
    assert!(
        d.log_text().matches("inbound connection refused").count() == 1,
        "logged once per pod and reason"
    );
    let out = s.connect_from(&s.kubelet, 7000);
    assert_eq!(out["result"], "ok", "probe under STRICT: {out}");
    let out = s.web.pdtool(&["connect", "--to", "198.18.0.250:7000"]);
    assert_eq!(out["result"], "ok", "mesh under STRICT: {out}");

    // A workload policy opens port 7000 to plaintext (portLevelMtls), and only that port.
    s.apply_extra(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: prod}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: prod}
spec:
  selector: {matchLabels: {app: db}}
  portLevelMtls:
    \"7000\": {mode: PERMISSIVE}
---
",
    );
    let out = wait_for(Duration::from_secs(5), || {
        let out = s.connect_from(&s.outsider, 7000);
        (out["result"] == "ok").then_some(out)
    });
    assert!(out.is_some(), "port 7000 PERMISSIVE");
    assert_eq!(Setup::last_peer(&s.seen), "127.0.0.6");
    let out = s.connect_from(&s.outsider, 7001);
    assert_ne!(out["result"], "ok", "port 7001 stays STRICT: {out}");
    assert!(s.seen_other_port.peers().is_empty());
}

#[test]
fn the_destination_reports_http_requests_with_both_identities_and_tells_the_app_who_called() {
    let s = setup("inboundhttp", "closed");
    let d = s.daemon();
    // The caller forges the header that names the caller's identity: it must not reach
    // the app as sent.
    let out = s.web.pdtool(&[
        "http",
        "--to",
        "198.18.0.250:80",
        "--host",
        "db.prod.svc.cluster.local",
        "--count",
        "5",
        "-H",
        "x-forwarded-client-cert: By=spiffe://cluster.local/ns/prod/sa/db;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
    ]);
    assert_eq!(out["statuses"]["200"], 5, "{out}");
    let log = s.echo_log.lock().unwrap().clone();
    assert_eq!(log.len(), 5);
    for req in &log {
        assert_eq!(
            req["headers"]["x-forwarded-client-cert"],
            format!("By={DB};URI={WEB}"),
            "{req}"
        );
    }
    let labels = |reporter| {
        [
            ("reporter", reporter),
            ("source_workload", "web"),
            ("source_principal", WEB),
            ("destination_workload", "db"),
            ("destination_principal", DB),
            ("destination_service", "db.prod.svc.cluster.local"),
            ("connection_security_policy", "mutual_tls"),
            ("response_code", "200"),
            ("request_protocol", "http"),
        ]
    };
    assert!(
        wait_for(Duration::from_secs(3), || (d
            .metric_sum("istio_requests_total", &labels("destination"))
            == 5.0
            && d.metric_sum("istio_requests_total", &labels("source"))
                == 5.0)
            .then_some(()))
        .is_some(),
        "{}",
        d.metrics_text()
    );
    // HTTP at the destination is reported per request, not as a TCP connection too.
    assert_eq!(destination_tcp(&d, &[("destination_workload", "db")]), 0.0);
    // The destination's access log line names both identities.
    let logs = d.log_text();
    assert!(
        logs.lines().any(|l| l.contains("reporter=destination")
            && l.contains(&format!("source_principal={WEB}"))
            && l.contains(&format!("destination_principal={DB}"))),
        "{logs}"
    );
}

#[test]
fn without_the_daemon_a_fail_closed_pod_refuses_inbound_and_a_fail_open_pod_is_reached_directly() {
    for (fail_mode, reaches_app) in [("closed", false), ("open", true)] {
        let s = setup(&format!("inbound{fail_mode}"), fail_mode);
        let mut d = s.daemon();
        let out = s.connect_from(&s.outsider, 7000);
        assert_eq!(out["result"], "ok", "{out}");
        assert_eq!(Setup::last_peer(&s.seen), "127.0.0.6");
        d.kill9();
        // The pinned program stays on the pod's namespace; the daemon's listener is gone.
        let out = s.connect_from(&s.outsider, 7000);
        if reaches_app {
            assert_eq!(out["result"], "ok", "fail-open: {out}");
            assert_eq!(Setup::last_peer(&s.seen), s.outsider.ip.to_string());
        } else {
            assert_ne!(out["result"], "ok", "fail-closed: {out}");
            assert_eq!(out["result"], "refused", "refused at once: {out}");
        }
        // A new daemon takes the pod's inbound connections again.
        let d2 = s.daemon();
        let out = wait_for(Duration::from_secs(5), || {
            let out = s.connect_from(&s.outsider, 7000);
            (out["result"] == "ok" && Setup::last_peer(&s.seen) == "127.0.0.6").then_some(out)
        });
        assert!(out.is_some(), "{fail_mode}: captured again");
        drop(d2);
    }
}

/// A flood of TLS handshakes that never finish, at a pod's HBONE port: the caller's
/// namespace holds at most 64 handshakes in progress on the node; the rest are reset at
/// accept, counted and logged once, and a meshed pod of another namespace still gets its
/// tunnel at once.
#[test]
fn a_flood_of_stalled_handshakes_is_held_to_the_callers_namespace_budget() {
    let s = setup("hsflood", "closed");
    let d = s.daemon();
    let hbone = format!("{}:15008", s.db.host.ip);
    let flood = s
        .outsider
        .command(
            None,
            &target_bin("pdtool"),
            &["stall", "--to", &hbone, "--count", "200", "--ms", "2000"],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("pdtool stall");
    // While the flood holds its handshakes, the mesh works.
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let out = s.web.pdtool(&["connect", "--to", "198.18.0.250:7000"]);
    assert_eq!(out["result"], "ok", "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the tunnel waited {:?}",
        started.elapsed()
    );
    let out = flood.wait_with_output().expect("flood");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    // Exactly the budget held on; every other attempt was reset (at accept, or before
    // its connect completed: the kernel's queue for the port is short).
    assert_eq!(report["still_open"], 64, "{report}");
    let reset = report["ended_by_peer"].as_u64().unwrap_or(0);
    assert_eq!(
        reset + report["failed"].as_u64().unwrap_or(0),
        200 - 64,
        "{report}"
    );
    assert!(
        d.metric_sum(
            "proxy_daemon_inbound_refused_total",
            &[("reason", "handshake_budget")]
        ) >= reset as f64,
        "{}",
        d.metrics_text()
    );
    assert_eq!(
        d.log_text()
            .matches("HBONE connection reset at accept")
            .count(),
        1,
        "logged once"
    );
}
