//! Zero trust between pods: two nodes on one machine (two daemons, each with its own pods,
//! cgroup subtree and pins; one bridge), workload certificates from one mesh CA, and every
//! connection between captured pods tunnelled over HBONE (HTTP/2 CONNECT inside mutual
//! TLS) with the workload identities on both ends, as Istio ambient's ztunnel does.
use std::time::Duration;

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml_on, Node, SecondNode, FIRST_NODE},
    pki::TestCa,
    servers::Servers,
    wait_for, Pod,
};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/prod/sa/db";

/// Two nodes sharing the mesh CA: `web` (shop, on node A) and `db` (prod, on node B),
/// the db pod serving a byte stream on 5432 and an identity line on 7000, behind Service
/// `db.prod` (198.18.0.250).
struct TwoNodes {
    node: Node,
    servers: Servers,
    b: SecondNode,
    web: Pod,
    db: Pod,
    records: std::sync::Arc<std::sync::Mutex<Vec<proxy_tests::servers::XferRecord>>>,
    seen: proxy_tests::Seen,
    ca_flags: Vec<String>,
}

fn two_nodes(tag: &str) -> TwoNodes {
    let mut node = Node::new(tag);
    let servers = Servers::new();
    let b = node.second_node("node-b");
    let web = node.pod("shop", "web-0");
    let db = node.pod_on(&b, "prod", "db-0");
    let records = servers.xfer(&db.host, 5432, 256 * 1024, 7);
    let seen = servers.identity(&db.host, 7000);
    let ca = TestCa::new("mesh-root");
    let (cert, key) = (
        node.work_dir.join("ca.pem"),
        node.work_dir.join("ca-key.pem"),
    );
    std::fs::write(&cert, &ca.cert_pem).unwrap();
    std::fs::write(&key, &ca.key_pem).unwrap();
    node.write_config(
        "cluster.yaml",
        &(namespace_yaml("shop", true, Some("closed"))
            + &namespace_yaml("prod", true, Some("closed"))
            + &pod_yaml_on(&web, &[("app", "web")], FIRST_NODE, "web")
            + &pod_yaml_on(&db, &[("app", "db")], &b.name, "db")
            + "apiVersion: v1
kind: Service
metadata: {name: db, namespace: prod}
spec:
  clusterIP: 198.18.0.250
  selector: {app: db}
  ports:
  - {name: tcp-postgres, port: 5432}
  - {name: tcp-ident, port: 7000}
---
"),
    );
    TwoNodes {
        node,
        servers,
        b,
        web,
        db,
        records,
        seen,
        ca_flags: vec![
            "--ca-cert".into(),
            cert.display().to_string(),
            "--ca-key".into(),
            key.display().to_string(),
        ],
    }
}

impl TwoNodes {
    fn daemons(&self) -> (Daemon, Daemon) {
        let flags: Vec<&str> = self.ca_flags.iter().map(String::as_str).collect();
        let a = Daemon::start(&self.node, &flags);
        let mut b_flags = self.b.daemon_flags();
        b_flags.extend(self.ca_flags.iter().cloned());
        let b_flags: Vec<&str> = b_flags.iter().map(String::as_str).collect();
        let b = Daemon::start(&self.node, &b_flags);
        a.wait_enrolled(&self.web.uid, Duration::from_secs(5));
        b.wait_enrolled(&self.db.uid, Duration::from_secs(5));
        (a, b)
    }
}

fn tcp_series(d: &Daemon, reporter: &str, extra: &[(&str, &str)]) -> f64 {
    let mut labels = vec![("reporter", reporter)];
    labels.extend_from_slice(extra);
    d.metric_sum("istio_tcp_connections_closed_total", &labels)
}

#[test]
fn pods_on_two_nodes_talk_over_hbone_with_their_workload_identities() {
    let t = two_nodes("hbone2");
    let (a, b) = t.daemons();
    let svc: std::net::SocketAddr = "198.18.0.250:5432".parse().unwrap();
    // 256 KiB each way, checked byte for byte at both ends.
    let out = t.web.pdtool(&[
        "xfer",
        "--to",
        &svc.to_string(),
        "--bytes",
        "262144",
        "--seed",
        "42",
    ]);
    assert_eq!(out["result"], "ok", "{out}");
    let rec = wait_for(Duration::from_secs(5), || {
        t.records.lock().ok().and_then(|r| r.first().cloned())
    })
    .expect("the database's record");
    assert_eq!(rec.received_bytes, 262_144);
    assert_eq!(out["sent_sha256"], rec.received_sha256);
    assert_eq!(out["received_sha256"], rec.sent_sha256);
    // Both proxies report the connection, with both identities and mutual TLS.
    let mtls = [
        ("source_principal", WEB),
        ("destination_principal", DB),
        ("connection_security_policy", "mutual_tls"),
        ("source_workload", "web"),
        ("destination_workload", "db"),
    ];
    assert!(
        wait_for(Duration::from_secs(5), || (tcp_series(&a, "source", &mtls)
            == 1.0
            && tcp_series(&b, "destination", &mtls) == 1.0)
            .then_some(()))
        .is_some(),
        "node A:\n{}\nnode B:\n{}",
        a.metrics_text(),
        b.metrics_text()
    );
    let bytes = |d: &Daemon, reporter: &str, name: &str| {
        d.metric_sum(name, &[("reporter", reporter), ("source_principal", WEB)])
    };
    assert_eq!(
        bytes(&b, "destination", "istio_tcp_received_bytes_total"),
        262_144.0
    );
    assert_eq!(
        bytes(&b, "destination", "istio_tcp_sent_bytes_total"),
        262_144.0
    );
    assert_eq!(
        bytes(&a, "source", "istio_tcp_received_bytes_total"),
        262_144.0
    );
    assert_eq!(
        b.metric_sum(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("destination_service", "db.prod.svc.cluster.local")
            ]
        ),
        1.0,
        "the Service named by the source (forwarded host=)"
    );
    // Pooled: more connections, one handshake.
    for _ in 0..5 {
        let out = t.web.pdtool(&["connect", "--to", "198.18.0.250:7000"]);
        assert_eq!(out["result"], "ok", "{out}");
    }
    assert_eq!(
        a.metric_sum("proxy_daemon_hbone_handshakes_total", &[]),
        1.0
    );
    // What the app sees as its peer: the in-pod tunnel end (Istio sidecars' 127.0.0.6).
    assert!(
        t.seen
            .peers()
            .iter()
            .all(|(p, _)| p.ip().to_string() == "127.0.0.6"),
        "{:?}",
        t.seen.peers()
    );
    // Each daemon holds the certificates of its own pods' identities, no other.
    assert_eq!(a.metric_sum("proxy_daemon_workload_certificates", &[]), 1.0);
    assert_eq!(b.metric_sum("proxy_daemon_workload_certificates", &[]), 1.0);
}

/// Port 15008 of a pod, as another node's proxy (or a hostile one) reaches it — from the
/// network, not from a captured pod: only a client with a certificate of the mesh's CA and
/// trust domain gets a tunnel, only to that pod's own address, only to an app port.
#[test]
fn a_pods_hbone_port_refuses_strangers_other_addresses_and_the_proxys_own_ports() {
    let t = two_nodes("hbonerefuse");
    let (_a, b) = t.daemons();
    let ca = TestCa::from_pem(
        &std::fs::read_to_string(&t.ca_flags[1]).unwrap(),
        &std::fs::read_to_string(&t.ca_flags[3]).unwrap(),
    );
    let write = |name: &str, leaf: &proxy_tests::pki::Leaf| {
        let (c, k) = (
            t.node.work_dir.join(format!("{name}.pem")),
            t.node.work_dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, &leaf.cert_pem).unwrap();
        std::fs::write(&k, &leaf.key_pem).unwrap();
        (c.display().to_string(), k.display().to_string())
    };
    let mesh = write("mesh", &ca.workload(WEB));
    let foreign_td = write(
        "foreign-td",
        &ca.workload("spiffe://evil.example/ns/shop/sa/web"),
    );
    let stranger = write("stranger", &TestCa::new("another-root").workload(WEB));
    let db_ip = t.db.host.ip;
    let hbone = format!("{db_ip}:15008");
    // From the web pod's network namespace, but not its cgroup (not captured).
    let call = |authority: &str, identity: Option<&(String, String)>| {
        let mut args = vec![
            "hbone",
            "--to",
            &hbone,
            "--authority",
            authority,
            "--send",
            "hello",
        ];
        if let Some((c, k)) = identity {
            args.extend(["--cert", c.as_str(), "--key", k.as_str()]);
        }
        let out = t
            .web
            .host
            .command(None, &proxy_tests::target_bin("pdtool"), &args)
            .output()
            .expect("pdtool hbone");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON")
    };
    let app = format!("{db_ip}:7000");
    let ok = call(&app, Some(&mesh));
    assert_eq!(ok["result"], "ok", "{ok}");
    assert!(
        ok["reply"]
            .as_str()
            .unwrap_or("")
            .ends_with("127.0.0.6 hello"),
        "{ok}"
    );
    let refused_before = b.metric_sum("proxy_daemon_hbone_refused_total", &[]);
    // Another pod's address through this pod's port: 400.
    let other = call(&format!("{}:7000", t.web.host.ip), Some(&mesh));
    assert_eq!(other["status"], 400, "{other}");
    // The proxy's own ports: 503.
    let own = call(&format!("{db_ip}:15008"), Some(&mesh));
    assert_eq!(own["status"], 503, "{own}");
    // No client certificate, another trust domain, another root: no tunnel at all.
    for (what, identity) in [
        ("no certificate", None),
        ("another trust domain", Some(&foreign_td)),
        ("another root", Some(&stranger)),
    ] {
        let out = call(&app, identity);
        assert_eq!(out["result"], "tls_error", "{what}: {out}");
    }
    assert!(
        wait_for(Duration::from_secs(3), || (b
            .metric_sum("proxy_daemon_hbone_refused_total", &[])
            - refused_before
            >= 4.0)
            .then_some(()))
        .is_some(),
        "{}",
        b.metrics_text()
    );
    // None of it reached the app.
    assert_eq!(t.seen.peers().len(), 1);
}

/// The users' story across nodes: a client on node A calls `reviews`, split 10/90 between
/// v1 and v2 with every request mirrored to a shadow copy, all three on node B. Routing
/// stays at the source; every hop is mutual TLS between workload identities.
#[test]
fn the_10_90_split_and_the_mirror_work_across_nodes_over_mutual_tls() {
    use proxy_tests::servers::HttpEcho;
    let mut node = Node::new("seed2");
    let servers = Servers::new();
    let b = node.second_node("node-b");
    let web = node.pod("shop", "web-0");
    let v1 = node.pod_on(&b, "backend", "reviews-v1-0");
    let v2 = node.pod_on(&b, "backend", "reviews-v2-0");
    let shadow = node.pod_on(&b, "shadow", "reviews-0");
    let shadow_log: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
    for (pod, name, log) in [
        (&v1, "reviews-v1", None),
        (&v2, "reviews-v2", None),
        (&shadow, "reviews-shadow", Some(shadow_log.clone())),
    ] {
        servers.http_echo(
            &pod.host,
            9080,
            HttpEcho {
                name: name.into(),
                log,
                ..Default::default()
            },
        );
    }
    let ca = TestCa::new("mesh-root");
    let (cert, key) = (
        node.work_dir.join("ca.pem"),
        node.work_dir.join("ca-key.pem"),
    );
    std::fs::write(&cert, &ca.cert_pem).unwrap();
    std::fs::write(&key, &ca.key_pem).unwrap();
    let host = "reviews.backend.svc.cluster.local";
    node.write_config(
        "cluster.yaml",
        &(namespace_yaml("shop", true, None)
            + &namespace_yaml("backend", true, None)
            + &namespace_yaml("shadow", true, None)
            + &pod_yaml_on(&web, &[("app", "web")], FIRST_NODE, "web")
            + &pod_yaml_on(
                &v1,
                &[("app", "reviews"), ("version", "v1")],
                &b.name,
                "reviews",
            )
            + &pod_yaml_on(
                &v2,
                &[("app", "reviews"), ("version", "v2")],
                &b.name,
                "reviews",
            )
            + &pod_yaml_on(&shadow, &[("app", "reviews")], &b.name, "reviews")
            + &format!(
                "apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: backend}}
spec:
  clusterIP: 198.18.0.250
  selector: {{app: reviews}}
  ports: [{{name: http, port: 80, targetPort: 9080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: shadow}}
spec:
  clusterIP: 198.18.0.251
  selector: {{app: reviews}}
  ports: [{{name: http, port: 80, targetPort: 9080}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: backend}}
spec:
  host: {host}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{host}]
  http:
  - route:
    - {{destination: {{host: {host}, subset: v1}}, weight: 10}}
    - {{destination: {{host: {host}, subset: v2}}, weight: 90}}
    mirror: {{host: reviews.shadow.svc.cluster.local}}
---
"
            )),
    );
    let ca_flags = [
        "--ca-cert".to_string(),
        cert.display().to_string(),
        "--ca-key".into(),
        key.display().to_string(),
    ];
    let a_flags: Vec<&str> = ca_flags.iter().map(String::as_str).collect();
    let a = Daemon::start(&node, &a_flags);
    let mut b_flags = b.daemon_flags();
    b_flags.extend(ca_flags.iter().cloned());
    let b_flags: Vec<&str> = b_flags.iter().map(String::as_str).collect();
    let bd = Daemon::start(&node, &b_flags);
    a.wait_enrolled(&web.uid, Duration::from_secs(5));
    for p in [&v1, &v2, &shadow] {
        bd.wait_enrolled(&p.uid, Duration::from_secs(5));
    }
    let out = web.pdtool(&[
        "http",
        "--to",
        "198.18.0.250:80",
        "--host",
        host,
        "--count",
        "400",
    ]);
    assert_eq!(out["statuses"]["200"], 400, "{out}");
    // 10/90 of 400: v1 is Binomial(400, 0.1), mean 40, sd 6; 15..=70 is over 4 sd either
    // way (a false failure about once in 30,000 runs).
    let n1 = out["servers"]["reviews-v1"].as_u64().unwrap_or(0);
    let n2 = out["servers"]["reviews-v2"].as_u64().unwrap_or(0);
    assert_eq!(n1 + n2, 400, "{out}");
    assert!((15..=70).contains(&n1), "v1 got {n1} of 400");
    // Every request mirrored to the shadow, on node B too (fire-and-forget: wait for them).
    assert!(
        wait_for(Duration::from_secs(10), || (shadow_log
            .lock()
            .unwrap()
            .len()
            == 400)
            .then_some(()))
        .is_some(),
        "{} mirror copies",
        shadow_log.lock().unwrap().len()
    );
    assert!(shadow_log.lock().unwrap()[0]["headers"]["host"]
        .as_str()
        .unwrap_or("")
        .ends_with("-shadow"));
    // The source reports each request over mutual TLS to reviews' identity...
    let reviews_id = "spiffe://cluster.local/ns/backend/sa/reviews";
    assert_eq!(
        a.metric_sum(
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("destination_service", host),
                ("connection_security_policy", "mutual_tls"),
                ("source_principal", WEB),
                ("destination_principal", reviews_id),
            ]
        ),
        400.0,
        "{}",
        a.metrics_text()
    );
    // ...and node B reports the same requests as their destination, from web's identity
    // (the mirror copies under the shadow Service), so the two sides' edges join.
    let destination = |service: &str, principal: &str| {
        bd.metric_sum(
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("destination_service", service),
                ("connection_security_policy", "mutual_tls"),
                ("source_principal", WEB),
                ("source_workload", "web"),
                ("destination_principal", principal),
            ],
        )
    };
    assert!(
        wait_for(Duration::from_secs(5), || (destination(host, reviews_id)
            == 400.0
            && destination(
                "reviews.shadow.svc.cluster.local",
                "spiffe://cluster.local/ns/shadow/sa/reviews"
            ) == 400.0)
            .then_some(()))
        .is_some(),
        "{}",
        bd.metrics_text()
    );
}

/// DestinationRule `tls.mode: ISTIO_MUTUAL` (what Istio users write for mesh mTLS): to a
/// mesh pod it is the HBONE tunnel, and its `subjectAltNames` must name the pod's
/// identity; to an endpoint outside the mesh nothing goes out in plaintext.
#[test]
fn istio_mutual_means_hbone_checks_its_subject_alt_names_and_never_falls_back_to_plaintext() {
    let mut t = two_nodes("istiomutual");
    let outside = t.node.host("outside");
    let outside_seen = t.servers.identity(&outside, 7000);
    let dr = |sans: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: prod}}
spec:
  host: db.prod.svc.cluster.local
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
      subjectAltNames: [{sans}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy, namespace: shop}}
spec:
  hosts: [legacy.example]
  addresses: [198.18.0.240]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 7000, name: tcp, protocol: TCP}}]
  endpoints: [{{address: {outside_ip}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: legacy, namespace: shop}}
spec:
  host: legacy.example
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
---
",
            outside_ip = outside.ip
        )
    };
    t.node.write_config("dr.yaml", &dr(&format!("\"{DB}\"")));
    let (a, _b) = t.daemons();
    let out = t.web.pdtool(&["connect", "--to", "198.18.0.250:7000"]);
    assert_eq!(
        out["result"], "ok",
        "the pod's identity is among the SANs: {out}"
    );
    // A host outside the mesh under ISTIO_MUTUAL: refused, nothing sent to it.
    let out = t.web.pdtool(&["connect", "--to", "198.18.0.240:7000"]);
    assert_ne!(out["result"], "ok", "{out}");
    assert!(outside_seen.peers().is_empty(), "no plaintext left the pod");
    // SANs that do not name the pod: refused before any tunnel.
    t.node.write_config(
        "dr.yaml",
        &dr("\"spiffe://cluster.local/ns/prod/sa/other\""),
    );
    let refused = wait_for(Duration::from_secs(5), || {
        let out = t.web.pdtool(&["connect", "--to", "198.18.0.250:7000"]);
        (out["result"] != "ok").then_some(out)
    });
    assert!(refused.is_some(), "a SAN mismatch refuses the connection");
    assert!(
        a.metric_sum(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "source"),
                ("destination_service", "db.prod.svc.cluster.local"),
                ("response_flags", "UF")
            ]
        ) >= 1.0,
        "{}",
        a.metrics_text()
    );
    assert!(a.log_text().contains("is not among subjectAltNames"));
}
