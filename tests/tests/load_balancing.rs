//! DestinationRule load balancing end to end: consistent hashing on a header (the
//! published example) and on a cookie the proxy sets.
use std::{collections::BTreeMap, time::Duration};

use proxy_tests::{
    daemon::Daemon,
    node::{endpoint_pod_yaml, namespace_yaml, pod_yaml, Host, Node},
    servers::{HttpEcho, Servers},
    wait_for,
};

const CLUSTER_IP: &str = "198.18.0.251";

fn backends(node: &mut Node, servers: &Servers, n: usize) -> Vec<Host> {
    (0..n)
        .map(|i| {
            let h = node.host(&format!("httpping-{i}"));
            servers.http_echo(
                &h,
                80,
                HttpEcho {
                    name: format!("httpping-{i}"),
                    ..Default::default()
                },
            );
            h
        })
        .collect()
}

fn endpoints_yaml(hosts: &[Host], skip: Option<usize>) -> String {
    hosts
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .map(|(i, h)| {
            endpoint_pod_yaml(
                h,
                &format!("httpping-{i}"),
                "infra-jinsu-lab",
                &[("app", "httpping-without-sidecar")],
            )
        })
        .collect()
}

fn service_yaml() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: httpping-without-sidecar, namespace: infra-jinsu-lab}}
spec:
  clusterIP: {CLUSTER_IP}
  selector: {{app: httpping-without-sidecar}}
  ports: [{{name: http, port: 8080, targetPort: 80}}]
---
"
    )
}

fn server_for(pod: &proxy_tests::Pod, value: &str) -> String {
    let out = pod.pdtool(&[
        "http",
        "--to",
        &format!("{CLUSTER_IP}:8080"),
        "--host",
        "httpping-without-sidecar.infra-jinsu-lab",
        "-H",
        &format!("foo: {value}"),
    ]);
    out["first"]["body"]["server"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

#[test]
fn consistent_hash_on_header_pins_values_spreads_them_and_moves_only_a_removed_pods_keys() {
    let mut node = Node::new("chash");
    let servers = Servers::new();
    let hosts = backends(&mut node, &servers, 3);
    let client = node.pod("shop", "client-1");
    let seed = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/seed-examples/consistent-hash.yaml"),
    )
    .unwrap();
    let base = namespace_yaml("infra-jinsu-lab", false, None)
        + &namespace_yaml("shop", true, None)
        + &service_yaml()
        + &pod_yaml(&client, &[("app", "client")]);
    node.write_config("seed.yaml", &seed);
    node.write_config(
        "cluster.yaml",
        &(base.clone() + &endpoints_yaml(&hosts, None)),
    );
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(5));

    // One value, one pod, 500 times.
    let out = client.pdtool(&[
        "http",
        "--to",
        &format!("{CLUSTER_IP}:8080"),
        "--host",
        "httpping-without-sidecar",
        "-H",
        "foo: alice",
        "--count",
        "500",
    ]);
    let servers_hit = out["servers"].as_object().unwrap();
    assert_eq!(
        servers_hit.len(),
        1,
        "one value must always land on one pod: {out}"
    );
    assert_eq!(servers_hit.values().next().unwrap(), 500);

    // Many values spread over every pod.
    let before: BTreeMap<String, String> = (0..60)
        .map(|i| {
            (
                format!("user-{i}"),
                server_for(&client, &format!("user-{i}")),
            )
        })
        .collect();
    let distinct: std::collections::BTreeSet<_> = before.values().collect();
    assert_eq!(distinct.len(), 3, "{before:?}");

    // Remove httpping-1 from the endpoints: only its keys move.
    let generation = daemon.config_dump()["config"]["generation"]
        .as_u64()
        .unwrap();
    node.write_config("cluster.yaml", &(base + &endpoints_yaml(&hosts, Some(1))));
    assert!(
        wait_for(Duration::from_secs(5), || (daemon.config_dump()["config"]
            ["generation"]
            .as_u64()
            .unwrap()
            > generation)
            .then_some(()))
        .is_some()
    );
    let mut moved = 0;
    for (value, old) in &before {
        let new = server_for(&client, value);
        assert_ne!(new, "httpping-1", "removed pod still chosen for {value}");
        if old != "httpping-1" {
            assert_eq!(&new, old, "{value} moved from a pod that is still there");
        } else {
            moved += 1;
        }
    }
    assert!(moved > 0, "httpping-1 had some keys: {before:?}");
}

#[test]
fn cookie_hashing_sets_the_cookie_and_then_sticks_to_one_pod() {
    let mut node = Node::new("cookie");
    let servers = Servers::new();
    let hosts = backends(&mut node, &servers, 3);
    let client = node.pod("shop", "client-1");
    let dr = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: sticky, namespace: infra-jinsu-lab}
spec:
  host: httpping-without-sidecar
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {name: user, path: /shop, ttl: 3600s}
---
";
    node.write_config(
        "all.yaml",
        &(namespace_yaml("infra-jinsu-lab", false, None)
            + &namespace_yaml("shop", true, None)
            + &service_yaml()
            + dr
            + &endpoints_yaml(&hosts, None)
            + &pod_yaml(&client, &[("app", "client")])),
    );
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(5));
    let to = format!("{CLUSTER_IP}:8080");
    let first = client.pdtool(&[
        "http",
        "--to",
        &to,
        "--host",
        "httpping-without-sidecar.infra-jinsu-lab",
    ]);
    let set_cookie = first["first"]["headers"]["set-cookie"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        set_cookie.starts_with("user=")
            && set_cookie.contains("Max-Age=3600")
            && set_cookie.contains("Path=/shop"),
        "name, ttl and path as the rule says: {first}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let again = client.pdtool(&[
        "http",
        "--to",
        &to,
        "--host",
        "httpping-without-sidecar.infra-jinsu-lab",
        "-H",
        &format!("Cookie: {cookie}"),
        "--count",
        "100",
    ]);
    assert_eq!(
        again["servers"].as_object().unwrap().len(),
        1,
        "sticky with the cookie: {again}"
    );
    assert!(
        again["first"]["headers"].get("set-cookie").is_none(),
        "not set again once sent"
    );
    // The cookie's value is the key: 20 users, each pinned to one pod, spread over the 3
    // (all 20 on one pod, as a hash that ignored the value would put them, has odds 3^-19).
    let mut pods = std::collections::BTreeSet::new();
    for user in 0..20 {
        let out = client.pdtool(&[
            "http",
            "--to",
            &to,
            "--host",
            "httpping-without-sidecar.infra-jinsu-lab",
            "-H",
            &format!("Cookie: user=u{user}"),
            "--count",
            "3",
        ]);
        let servers = out["servers"].as_object().cloned().unwrap_or_default();
        assert_eq!(servers.len(), 1, "user u{user} sticks: {out}");
        pods.extend(servers.keys().cloned());
    }
    assert!(pods.len() >= 2, "20 users all on {pods:?}");
}

#[test]
fn published_subsets_weights_split_2000_requests_10_90() {
    let mut node = Node::new("seedsplit");
    let servers = Servers::new();
    let v1 = node.host("httpping-v1");
    let v2 = node.host("httpping-v2");
    servers.http_echo(
        &v1,
        80,
        HttpEcho {
            name: "v1".into(),
            ..Default::default()
        },
    );
    servers.http_echo(
        &v2,
        80,
        HttpEcho {
            name: "v2".into(),
            ..Default::default()
        },
    );
    let client = node.pod("shop", "client-1");
    let seed = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/seed-examples/subsets-weights.yaml"),
    )
    .unwrap();
    // The published Service has no clusterIP (the API server assigns one): add ours.
    let seed = seed.replacen(
        "spec:\n  selector:",
        &format!("spec:\n  clusterIP: {CLUSTER_IP}\n  selector:"),
        1,
    );
    assert!(seed.contains(CLUSTER_IP));
    node.write_config("seed.yaml", &seed);
    node.write_config(
        "cluster.yaml",
        &(namespace_yaml("infra-jinsu-lab", false, None)
            + &namespace_yaml("shop", true, None)
            + &endpoint_pod_yaml(
                &v1,
                "httpping-v1",
                "infra-jinsu-lab",
                &[("app", "httpping-without-sidecar"), ("version", "v1")],
            )
            + &endpoint_pod_yaml(
                &v2,
                "httpping-v2",
                "infra-jinsu-lab",
                &[("app", "httpping-without-sidecar"), ("version", "v2")],
            )
            + &pod_yaml(&client, &[("app", "client")])),
    );
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(5));
    let out = client.pdtool(&[
        "http",
        "--to",
        &format!("{CLUSTER_IP}:8080"),
        "--host",
        "httpping-without-sidecar.infra-jinsu-lab:8080",
        "--count",
        "2000",
    ]);
    assert_eq!(out["statuses"]["200"], 2000, "{out}");
    let v1_share = out["servers"]["v1"].as_u64().unwrap_or(0) as f64 / 20.0;
    assert!(
        (7.0..=13.0).contains(&v1_share),
        "v1 share {v1_share}%: {out}"
    );
}
