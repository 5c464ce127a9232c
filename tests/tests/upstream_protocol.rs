//! Which HTTP version goes upstream, end to end, as Istio decides it for a cluster: the
//! port's declared protocol (name prefix or appProtocol), DestinationRule
//! `connectionPool.http.h2UpgradePolicy` and `useClientProtocol`. Upstreams that speak only
//! one version prove which one arrived.
use std::time::Duration;

use proxy_tests::{
    daemon::Daemon,
    node::{endpoint_pod_yaml, namespace_yaml, pod_yaml, Node},
    servers::{HttpEcho, Servers},
};

/// A Service `name` at `ip`, one port 8080 named `port_name` (and `appProtocol`, if given),
/// selecting pods labelled app=`name`.
fn service(name: &str, ip: &str, port_name: &str, app_protocol: Option<&str>) -> String {
    let app_protocol = app_protocol
        .map(|a| format!(", appProtocol: {a}"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: backend}}
spec:
  clusterIP: {ip}
  selector: {{app: {name}}}
  ports: [{{name: {port_name}, port: 8080{app_protocol}}}]
---
"
    )
}

fn pool_rule(host: &str, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}, namespace: backend}}
spec:
  host: {host}.backend.svc.cluster.local
  trafficPolicy:
    connectionPool:
      http: {{{http}}}
---
"
    )
}

/// The body's JSON (the h2c echo names the protocol it saw).
fn body_json(out: &serde_json::Value) -> serde_json::Value {
    match &out["first"]["body"] {
        serde_json::Value::String(s) => serde_json::from_str(s).unwrap_or_default(),
        v => v.clone(),
    }
}

#[test]
fn http1_clients_reach_h2_only_upstreams_the_port_or_the_upgrade_policy_declares() {
    let mut node = Node::new("up-h2");
    let servers = Servers::new();
    // Four h2-only servers (HTTP/2 prior knowledge, no HTTP/1.1 at all).
    let cases = [
        // (service, cluster IP, port name, appProtocol, DestinationRule http pool)
        ("grpc-named", "198.18.0.201", "grpc-api", None, None),
        (
            "h2c-app",
            "198.18.0.202",
            "web",
            Some("kubernetes.io/h2c"),
            None,
        ),
        (
            "upgraded",
            "198.18.0.203",
            "http",
            None,
            Some("h2UpgradePolicy: UPGRADE"),
        ),
        ("plain", "198.18.0.204", "http", None, None),
    ];
    let mut yaml = namespace_yaml("backend", false, None) + &namespace_yaml("shop", true, None);
    for (name, ip, port_name, app_protocol, pool) in cases {
        let host = node.host(name);
        servers.h2c_echo(&host, 8080, Box::leak(name.to_string().into_boxed_str()));
        yaml += &endpoint_pod_yaml(&host, &format!("{name}-0"), "backend", &[("app", name)]);
        yaml += &service(name, ip, port_name, app_protocol);
        if let Some(http) = pool {
            yaml += &pool_rule(name, http);
        }
    }
    let pod = node.pod("shop", "client-0");
    yaml += &pod_yaml(&pod, &[("app", "client")]);
    node.write_config("all.yaml", &yaml);
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    let get = |ip: &str, name: &str| {
        let to = format!("{ip}:8080");
        let host = format!("{name}.backend");
        pod.pdtool(&["http", "--to", &to, "--host", &host, "--count", "3"])
    };
    for (name, ip, ..) in &cases[..3] {
        let out = get(ip, name);
        assert_eq!(out["statuses"]["200"], 3, "{name}: {out}");
        let body = body_json(&out);
        assert_eq!(
            body["proto"], "HTTP/2.0",
            "{name}: went upstream over h2: {out}"
        );
        assert_eq!(body["server"], *name, "{out}");
        assert_eq!(
            body["authority"],
            format!("{name}.backend"),
            "{name}: the Host became :authority: {out}"
        );
    }
    // The control: a port declared plain HTTP stays HTTP/1.1, which an h2-only server
    // cannot answer (so the three above really were the declaration's doing).
    let out = get(cases[3].1, cases[3].0);
    assert_eq!(
        out["statuses"]["200"].as_u64().unwrap_or(0),
        0,
        "HTTP/1.1 to an h2-only server must fail: {out}"
    );
}

#[test]
fn h2c_clients_reach_http1_upstreams_on_http_ports_unless_the_client_protocol_is_kept() {
    let mut node = Node::new("up-h1");
    let servers = Servers::new();
    let cases = [
        ("web", "198.18.0.211", None),
        ("keep", "198.18.0.212", Some("useClientProtocol: true")),
    ];
    let mut yaml = namespace_yaml("backend", false, None) + &namespace_yaml("shop", true, None);
    for (name, ip, pool) in cases {
        let host = node.host(name);
        servers.http_echo(
            &host,
            8080,
            HttpEcho {
                name: name.into(),
                ..Default::default()
            },
        );
        yaml += &endpoint_pod_yaml(&host, &format!("{name}-0"), "backend", &[("app", name)]);
        yaml += &service(name, ip, "http", None);
        if let Some(http) = pool {
            yaml += &pool_rule(name, http);
        }
    }
    let pod = node.pod("shop", "client-0");
    yaml += &pod_yaml(&pod, &[("app", "client")]);
    node.write_config("all.yaml", &yaml);
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&pod.uid, Duration::from_secs(5));
    let h2 = |ip: &str, name: &str| {
        let to = format!("{ip}:8080");
        let authority = format!("{name}.backend:8080");
        pod.pdtool(&["h2", "--to", &to, "--authority", &authority, "--count", "5"])
    };
    // An h2c client, a port declared HTTP (HTTP/1.1 in Istio), an HTTP/1.1-only server:
    // each request goes upstream as HTTP/1.1, answers come back over h2.
    let out = h2(cases[0].1, cases[0].0);
    assert_eq!(out["statuses"]["200"], 5, "{out}");
    assert_eq!(out["servers"]["web"], 5, "{out}");
    // useClientProtocol keeps h2 upstream, which the HTTP/1.1 server cannot answer.
    let out = h2(cases[1].1, cases[1].0);
    assert_eq!(
        out["statuses"]["200"].as_u64().unwrap_or(0),
        0,
        "h2 kept, refused by an HTTP/1.1 server: {out}"
    );
}
