//! One namespace's Istio objects against another's traffic: a hostile namespace owner
//! (`aaa`, who may create objects in `aaa` only) writes a VirtualService, a
//! DestinationRule and ServiceEntries aimed at `prod`'s Service, listed before prod's own
//! objects. The victims' requests and bytes are checked where they land; the conflicts
//! show where an operator looks (/config_dump, `proxy_daemon_config_conflicts`).
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use proxy_tests::{
    daemon::Daemon,
    node::{endpoint_pod_yaml, namespace_yaml, pod_yaml, Node},
    servers::{HttpEcho, Servers},
    wait_for, Pod,
};

type Log = Arc<Mutex<Vec<serde_json::Value>>>;

const PAYMENTS_IP: &str = "198.18.0.240";
const PAYMENTS: &str = "payments.prod.svc.cluster.local";

/// prod's payments (an echo logging what it gets) and aaa's sink (the same), three
/// captured namespaces with a client pod each, and the hostile objects in `hostile.yaml`
/// (a file read before prod's `prod.yaml`).
struct Cluster {
    node: Node,
    _servers: Servers,
    payments: Log,
    payments_ip: std::net::Ipv4Addr,
    sink: Log,
    prod: Pod,
    web: Pod,
    aaa: Pod,
}

fn cluster(tag: &str) -> Cluster {
    let mut node = Node::new(tag);
    let servers = Servers::new();
    let (payments, sink): (Log, Log) = Default::default();
    let payments_host = node.host("payments");
    let sink_host = node.host("sink");
    for (host, name, log) in [
        (&payments_host, "payments", &payments),
        (&sink_host, "sink", &sink),
    ] {
        servers.http_echo(
            host,
            8080,
            HttpEcho {
                name: name.into(),
                log: Some(log.clone()),
                ..Default::default()
            },
        );
    }
    let prod = node.pod("prod", "checkout-0");
    let web = node.pod("web", "frontend-0");
    let aaa = node.pod("aaa", "tool-0");
    let yaml = namespace_yaml("prod", true, None)
        + &namespace_yaml("web", true, None)
        + &namespace_yaml("aaa", true, None)
        + &endpoint_pod_yaml(&payments_host, "payments-0", "prod", &[("app", "payments")])
        + &endpoint_pod_yaml(&sink_host, "sink-0", "aaa", &[("app", "sink")])
        + &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: payments, namespace: prod}}
spec:
  clusterIP: {PAYMENTS_IP}
  selector: {{app: payments}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: sink, namespace: aaa}}
spec:
  clusterIP: 198.18.0.241
  selector: {{app: sink}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
"
        )
        + &pod_yaml(&prod, &[("app", "checkout")])
        + &pod_yaml(&web, &[("app", "frontend")])
        + &pod_yaml(&aaa, &[("app", "tool")]);
    node.write_config("cluster.yaml", &yaml);
    Cluster {
        node,
        _servers: servers,
        payments,
        payments_ip: payments_host.ip,
        sink,
        prod,
        web,
        aaa,
    }
}

fn start(c: &Cluster, flags: &[&str]) -> Daemon {
    let daemon = Daemon::start(&c.node, flags);
    for p in [&c.prod, &c.web, &c.aaa] {
        daemon.wait_enrolled(&p.uid, Duration::from_secs(5));
    }
    daemon
}

/// `count` requests to payments from `pod` carrying a credential; returns pdtool's answer.
fn pay(pod: &Pod, count: usize, marker: &str) -> serde_json::Value {
    pod.pdtool(&[
        "http",
        "--to",
        &format!("{PAYMENTS_IP}:80"),
        "--host",
        PAYMENTS,
        "--path",
        "/charge",
        "-H",
        "Authorization: Bearer card-4111",
        "-H",
        &format!("x-marker: {marker}"),
        "--count",
        &count.to_string(),
    ])
}

fn markers(log: &Log) -> Vec<String> {
    log.lock()
        .unwrap()
        .iter()
        .map(|r| r["headers"]["x-marker"].as_str().unwrap_or("").to_string())
        .collect()
}

fn conflicts(daemon: &Daemon, reason: &str) -> f64 {
    daemon.metric_sum("proxy_daemon_config_conflicts", &[("reason", reason)])
}

fn findings(daemon: &Daemon) -> String {
    daemon.config_dump()["snapshot"]["findings"].to_string()
}

#[test]
fn a_namespace_cannot_mirror_or_reroute_another_namespaces_service() {
    let c = cluster("vsown");
    // aaa's rule comes first (file order; no creationTimestamp): mirror everything to aaa's
    // sink and mark the request. prod's own rule adds a header of its own.
    c.node.write_config(
        "a-hostile.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: steal, namespace: aaa}}
spec:
  hosts: [{PAYMENTS}]
  http:
  - route: [{{destination: {{host: {PAYMENTS}}}}}]
    mirror: {{host: sink.aaa.svc.cluster.local}}
    headers: {{request: {{set: {{x-route: aaa}}}}}}
"
        ),
    );
    c.node.write_config(
        "b-prod.yaml",
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payments, namespace: prod}
spec:
  hosts: [payments]
  http:
  - route: [{destination: {host: payments}}]
    headers: {request: {set: {x-route: prod}}}
",
    );
    let daemon = start(&c, &[]);
    for (pod, who) in [(&c.prod, "prod"), (&c.web, "web")] {
        let out = pay(pod, 20, who);
        assert_eq!(out["statuses"]["200"], 20, "{who}: {out}");
        // What payments got is the victim's request as sent, routed by prod's rule.
        let body = &out["first"]["body"];
        assert_eq!(body["server"], "payments", "{out}");
        assert_eq!(
            body["headers"]["authorization"], "Bearer card-4111",
            "{out}"
        );
        assert_eq!(
            body["headers"]["x-route"], "prod",
            "{who} follows prod's rule: {out}"
        );
    }
    // aaa may route and copy its own calls: its marker reaches the sink…
    let out = pay(&c.aaa, 1, "aaa-own");
    assert_eq!(out["first"]["body"]["headers"]["x-route"], "aaa", "{out}");
    assert!(
        wait_for(Duration::from_secs(5), || markers(&c.sink)
            .contains(&"aaa-own".to_string())
            .then_some(()))
        .is_some(),
        "aaa's own mirror copy never arrived"
    );
    // …and it is the only thing that ever did: no copy of the 40 victims' requests.
    assert_eq!(markers(&c.sink), vec!["aaa-own"]);
    let at_payments = markers(&c.payments);
    assert_eq!(at_payments.iter().filter(|m| *m == "prod").count(), 20);
    assert_eq!(at_payments.iter().filter(|m| *m == "web").count(), 20);
    // The operator sees why, at the object's line.
    assert_eq!(conflicts(&daemon, "host_owned_by_another_namespace"), 1.0);
    let f = findings(&daemon);
    assert!(
        f.contains("a-hostile.yaml:5: VirtualService/aaa/steal: warning: host payments.prod.svc.cluster.local belongs to a Service of namespace prod"),
        "{f}"
    );
}

#[test]
fn a_namespace_cannot_impose_its_destination_rule_on_another_namespaces_clients() {
    let c = cluster("drown");
    // aaa's rule would make every client originate TLS to payments' plaintext port (and
    // allow one connection): if it applied to others, their requests would fail with UF.
    c.node.write_config(
        "a-hostile.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payments, namespace: aaa}}
spec:
  host: {PAYMENTS}
  trafficPolicy:
    tls: {{mode: SIMPLE, insecureSkipVerify: true}}
    connectionPool: {{tcp: {{maxConnections: 1}}}}
"
        ),
    );
    let daemon = start(&c, &[]);
    for (pod, who) in [(&c.prod, "prod"), (&c.web, "web")] {
        let out = pay(pod, 10, who);
        assert_eq!(out["statuses"]["200"], 10, "{who}: {out}");
    }
    // The rule is live — for aaa's own clients, whom it may govern.
    let out = pay(&c.aaa, 1, "aaa-own");
    assert_eq!(out["statuses"]["503"], 1, "{out}");
    let aaa_failures = daemon
        .metrics_text()
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("source_workload_namespace=\"aaa\"")
        })
        .filter(|l| l.contains("response_code=\"503\"") && l.contains("response_flags=\"UF"))
        .count();
    assert_eq!(aaa_failures, 1, "{}", daemon.metrics_text());
    assert_eq!(
        daemon.metric_sum(
            "istio_requests_total",
            &[
                ("source_workload_namespace", "web"),
                ("response_code", "200")
            ]
        ),
        10.0
    );
}

#[test]
fn a_service_entry_cannot_take_another_namespaces_service_address_or_name() {
    let mut node = Node::new("seown");
    let servers = Servers::new();
    let db = node.host("db");
    let fake = node.host("fake-db");
    let real_records = servers.xfer(&db, 5432, 64 * 1024, 9);
    let fake_records = servers.xfer(&fake, 5432, 64 * 1024, 9);
    let prod = node.pod("prod", "api-0");
    let web = node.pod("web", "report-0");
    let yaml = namespace_yaml("prod", true, None)
        + &namespace_yaml("web", true, None)
        + &namespace_yaml("aaa", false, None)
        + &endpoint_pod_yaml(&db, "db-0", "prod", &[("app", "db")])
        + "apiVersion: v1
kind: Service
metadata: {name: db, namespace: prod}
spec:
  clusterIP: 198.18.0.250
  selector: {app: db}
  ports: [{name: tcp-postgres, port: 5432}]
---
" + &pod_yaml(&prod, &[("app", "api")])
        + &pod_yaml(&web, &[("app", "report")]);
    node.write_config("cluster.yaml", &yaml);
    // aaa's entry claims the database's cluster IP (and its name) for its own endpoint.
    node.write_config(
        "a-hostile.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: aaa}}
spec:
  hosts: [db.prod.svc.cluster.local, db.aaa.example]
  addresses: [198.18.0.250]
  ports: [{{number: 5432, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: {}}}]
",
            fake.ip
        ),
    );
    let daemon = Daemon::start(&node, &[]);
    for p in [&prod, &web] {
        daemon.wait_enrolled(&p.uid, Duration::from_secs(5));
    }
    let to: std::net::SocketAddr = "198.18.0.250:5432".parse().unwrap();
    let out = proxy_tests::xfer_both_ways(&prod, "api", to, &real_records, 64 * 1024, &daemon, &[]);
    assert_eq!(out["result"], "ok");
    // web's connection too reaches the database, whole.
    let out = web.pdtool(&[
        "xfer",
        "--to",
        "198.18.0.250:5432",
        "--bytes",
        "65536",
        "--seed",
        "42",
    ]);
    assert_eq!(out["result"], "ok", "{out}");
    let second = wait_for(Duration::from_secs(5), || {
        real_records.lock().ok().and_then(|r| r.get(1).cloned())
    })
    .expect("the database's record of web's connection");
    assert_eq!(out["sent_sha256"], second.received_sha256);
    assert_eq!(out["received_sha256"], second.sent_sha256);
    // Both connections are accounted for at the database; none reached aaa's endpoint.
    assert!(fake_records.lock().unwrap().is_empty());
    assert_eq!(
        daemon.metric_sum(
            "istio_tcp_connections_opened_total",
            &[("destination_service", "db.prod.svc.cluster.local")]
        ),
        2.0
    );
    assert_eq!(conflicts(&daemon, "address_owned_by_service"), 1.0);
    assert_eq!(conflicts(&daemon, "host_owned_by_service"), 1.0);
    let f = findings(&daemon);
    assert!(
        f.contains("ServiceEntry/aaa/db: warning: address 198.18.0.250 is the cluster IP of Service/prod/db"),
        "{f}"
    );
}

#[test]
fn one_external_name_in_two_namespaces_is_the_clients_own_else_the_oldest_not_the_first_alphabetically(
) {
    let mut node = Node::new("sename");
    let servers = Servers::new();
    let (old_log, young_log): (Log, Log) = Default::default();
    let old_host = node.host("old-api");
    let young_host = node.host("young-api");
    for (host, name, log) in [
        (&old_host, "zzz-endpoint", &old_log),
        (&young_host, "aaa-endpoint", &young_log),
    ] {
        servers.http_echo(
            host,
            80,
            HttpEcho {
                name: name.into(),
                log: Some(log.clone()),
                ..Default::default()
            },
        );
    }
    let web = node.pod("web", "frontend-0");
    let aaa = node.pod("aaa", "tool-0");
    let entry = |ns: &str, created: &str, ep: std::net::Ipv4Addr| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: api
  namespace: {ns}
  creationTimestamp: \"{created}\"
spec:
  hosts: [api.partner.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {ep}}}]
---
"
        )
    };
    node.write_config(
        "cluster.yaml",
        &(namespace_yaml("web", true, None)
            + &namespace_yaml("aaa", true, None)
            + &pod_yaml(&web, &[("app", "frontend")])
            + &pod_yaml(&aaa, &[("app", "tool")])
            // aaa sorts first but its entry is the younger.
            + &entry("aaa", "2024-06-01T00:00:00Z", young_host.ip)
            + &entry("zzz", "2021-03-01T00:00:00Z", old_host.ip)),
    );
    let daemon = Daemon::start(&node, &[]);
    for p in [&web, &aaa] {
        daemon.wait_enrolled(&p.uid, Duration::from_secs(5));
    }
    // The app dials some address for the name (its own DNS answer); the Host decides.
    let ask = |pod: &Pod| {
        pod.pdtool(&[
            "http",
            "--to",
            &format!("{}:80", old_host.ip),
            "--host",
            "api.partner.example",
            "--count",
            "5",
        ])
    };
    let out = ask(&web);
    assert_eq!(
        out["servers"]["zzz-endpoint"], 5,
        "web uses the oldest entry: {out}"
    );
    let out = ask(&aaa);
    assert_eq!(out["servers"]["aaa-endpoint"], 5, "aaa uses its own: {out}");
    assert_eq!(conflicts(&daemon, "duplicate_host"), 1.0);
}

#[test]
fn default_export_to_dot_keeps_each_namespaces_rules_at_home() {
    let c = cluster("exdot");
    // A rule for an external name, in aaa: with Istio's default (`*`) it would apply to
    // every namespace's calls to that name; with `.` only to aaa's.
    c.node.write_config(
        "a-rule.yaml",
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: ext}
spec:
  hosts: [api.partner.example]
  exportTo: ['*']
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: aaa}
spec:
  hosts: [api.partner.example]
  http:
  - route: [{destination: {host: sink.aaa.svc.cluster.local, port: {number: 80}}}]
",
    );
    let daemon = start(&c, &["--default-export-to", "."]);
    // The app dialled what its DNS said (here, payments' own address).
    let to = format!("{}:8080", c.payments_ip);
    let ask = |pod: &Pod| pod.pdtool(&["http", "--to", &to, "--host", "api.partner.example"]);
    // web's call goes where web dialled (payments), not to aaa's sink.
    let out = ask(&c.web);
    assert_eq!(out["first"]["body"]["server"], "payments", "{out}");
    let out = ask(&c.aaa);
    assert_eq!(out["first"]["body"]["server"], "sink", "{out}");
    assert_eq!(
        daemon.config_dump()["snapshot"]["export_defaults"]["virtual_service"],
        serde_json::json!(["."])
    );
}
