//! Kiali's security view, from a real Prometheus (Debian's) scraping two nodes: the query
//! Kiali's graph runs for its lock badges (the rate of `reporter="destination"` series by
//! source and destination workload, principals and `connection_security_policy`) reports
//! 100 % mutual TLS for the meshed pair and 0 % for a workload outside the mesh calling
//! the same pod.
use std::{collections::BTreeMap, time::Duration};

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml_on, Node, FIRST_NODE},
    pki::TestCa,
    servers::{HttpEcho, Servers},
    wait_for, KillOnDrop,
};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/prod/sa/db";

fn prometheus_bin() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/prometheus")
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query's vector: each sample's labels and value.
fn query(prometheus: std::net::SocketAddr, q: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let (status, body) =
        proxy_tests::http_get(prometheus, &format!("/api/v1/query?query={}", urlencode(q)))
            .unwrap_or((0, String::new()));
    if status != 200 {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let labels = r["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let value = r["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
            (labels, value)
        })
        .collect()
}

/// Kiali's security query for `metric`: the destination's rate, by edge and security.
fn kiali_security(metric: &str) -> String {
    format!(
        "sum by (source_workload_namespace, source_workload, source_principal, destination_service, destination_workload_namespace, destination_workload, destination_principal, connection_security_policy) (rate({metric}{{reporter=\"destination\"}}[1m])) > 0"
    )
}

/// Percentage of an edge's rate that is mutual TLS, as Kiali computes its badge.
fn mtls_percent(
    samples: &[(BTreeMap<String, String>, f64)],
    source: &str,
    destination: &str,
) -> Option<f64> {
    let edge: Vec<_> = samples
        .iter()
        .filter(|(l, _)| l["source_workload"] == source && l["destination_workload"] == destination)
        .collect();
    let total: f64 = edge.iter().map(|(_, v)| v).sum();
    let mtls: f64 = edge
        .iter()
        .filter(|(l, _)| l["connection_security_policy"] == "mutual_tls")
        .map(|(_, v)| v)
        .sum();
    // Kiali shows whole percents.
    (total > 0.0).then(|| (100.0 * mtls / total).round())
}

#[test]
fn kialis_security_query_over_prometheus_shows_the_meshed_pair_all_mtls_and_the_legacy_pair_none() {
    let mut node = Node::new("kiali");
    let servers = Servers::new();
    let b = node.second_node("node-b");
    let web = node.pod("shop", "web-0");
    let legacy = node.pod("legacy", "legacy-0");
    let db = node.pod_on(&b, "prod", "db-0");
    servers.identity(&db.host, 7000);
    servers.http_echo(
        &db.host,
        8080,
        HttpEcho {
            name: "db".into(),
            ..Default::default()
        },
    );
    let ca = TestCa::new("mesh-root");
    let dir = node.work_dir.clone();
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    std::fs::write(&cert, &ca.cert_pem).unwrap();
    std::fs::write(&key, &ca.key_pem).unwrap();
    node.write_config(
        "cluster.yaml",
        &(namespace_yaml("shop", true, None)
            + &namespace_yaml("prod", true, None)
            + &namespace_yaml("legacy", false, None)
            + &pod_yaml_on(&web, &[("app", "web")], FIRST_NODE, "web")
            + &pod_yaml_on(&legacy, &[("app", "legacy")], FIRST_NODE, "legacy")
            + &pod_yaml_on(&db, &[("app", "db")], &b.name, "db")
            + "apiVersion: v1
kind: Service
metadata: {name: db, namespace: prod}
spec:
  clusterIP: 198.18.0.250
  selector: {app: db}
  ports:
  - {name: tcp-ident, port: 7000}
  - {name: http, port: 80, targetPort: 8080}
---
"),
    );
    let ca_flags = [
        "--ca-cert".to_string(),
        cert.display().to_string(),
        "--ca-key".to_string(),
        key.display().to_string(),
    ];
    let a_flags: Vec<&str> = ca_flags.iter().map(String::as_str).collect();
    let a = Daemon::start(&node, &a_flags);
    let mut b_flags = b.daemon_flags();
    b_flags.extend(ca_flags.iter().cloned());
    let b_flags: Vec<&str> = b_flags.iter().map(String::as_str).collect();
    let bd = Daemon::start(&node, &b_flags);
    a.wait_enrolled(&web.uid, Duration::from_secs(5));
    bd.wait_enrolled(&db.uid, Duration::from_secs(5));

    // Prometheus scraping both nodes every second.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prometheus = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n- job_name: proxy-daemon\n  static_configs:\n  - targets: ['{}', '{}']\n",
            a.metrics, bd.metrics
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _prometheus = KillOnDrop(
        std::process::Command::new(prometheus_bin())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prometheus}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (taken from Debian's package by `cargo xtask setup`)"),
    );
    wait_for(Duration::from_secs(20), || {
        let up = query(prometheus, "up == 1");
        (up.len() == 2).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus scrapes both nodes: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        )
    });

    // The meshed pair calls the Service; the legacy (uncaptured) workload has no proxy to
    // resolve it and calls the pod's address. HTTP and TCP both.
    let db_http = format!("{}:8080", db.host.ip);
    let db_tcp = format!("{}:7000", db.host.ip);
    // Traffic across several scrapes: a counter that appears with its final value has no
    // rate (Prometheus sees no increase), so Kiali shows live traffic only.
    for _round in 0..4 {
        for (pod, http, tcp) in [
            (&web, "198.18.0.250:80", "198.18.0.250:7000"),
            (&legacy, db_http.as_str(), db_tcp.as_str()),
        ] {
            let out = pod.pdtool(&[
                "http",
                "--to",
                http,
                "--host",
                "db.prod.svc.cluster.local",
                "--count",
                "5",
            ]);
            assert_eq!(out["statuses"]["200"], 5, "{out}");
            for _ in 0..2 {
                let out = pod.pdtool(&["connect", "--to", tcp]);
                assert_eq!(out["result"], "ok", "{out}");
            }
        }
        std::thread::sleep(Duration::from_millis(1200));
    }

    for metric in ["istio_requests_total", "istio_tcp_sent_bytes_total"] {
        let q = kiali_security(metric);
        let samples = wait_for(Duration::from_secs(20), || {
            let s = query(prometheus, &q);
            (mtls_percent(&s, "web", "db").is_some() && mtls_percent(&s, "legacy", "db").is_some())
                .then_some(s)
        })
        .unwrap_or_else(|| {
            panic!(
                "{metric}: both edges in Prometheus: {:#?}\nevery destination series: {:#?}\nnode B:\n{}",
                query(prometheus, &q),
                query(prometheus, &format!("{metric}{{reporter=\"destination\"}}")),
                bd.metrics_text()
            )
        });
        assert_eq!(
            mtls_percent(&samples, "web", "db"),
            Some(100.0),
            "{metric}: {samples:#?}"
        );
        assert_eq!(
            mtls_percent(&samples, "legacy", "db"),
            Some(0.0),
            "{metric}: {samples:#?}"
        );
        for (labels, _) in &samples {
            match labels["source_workload"].as_str() {
                "web" => {
                    assert_eq!(labels["source_principal"], WEB, "{labels:?}");
                    assert_eq!(labels["destination_principal"], DB, "{labels:?}");
                }
                "legacy" => {
                    assert_eq!(labels["connection_security_policy"], "none", "{labels:?}");
                    assert_eq!(labels["source_principal"], "unknown", "{labels:?}");
                    assert_eq!(labels["source_workload_namespace"], "legacy");
                }
                other => panic!("an edge from {other}: {labels:?}"),
            }
            assert_eq!(
                labels["destination_service"], "db.prod.svc.cluster.local",
                "{labels:?}"
            );
        }
    }
    // The source side of the meshed pair says the same (its series join the destination's).
    let source = query(
        prometheus,
        "sum by (connection_security_policy) (rate(istio_requests_total{reporter=\"source\",source_workload=\"web\"}[1m]))",
    );
    assert_eq!(source.len(), 1, "{source:#?}");
    assert_eq!(source[0].0["connection_security_policy"], "mutual_tls");
}
