//! The app's own TLS: never terminated, routed by the ClientHello's SNI, labelled by it.
use std::time::Duration;

use proxy_tests::{
    daemon::Daemon,
    node::{endpoint_pod_yaml, namespace_yaml, pod_yaml, Node},
    servers::Servers,
};

#[test]
fn app_tls_is_routed_by_sni_untouched_and_reported_with_the_sni() {
    let mut node = Node::new("sni");
    let servers = Servers::new();
    let external = node.host("external");
    let seen_external = servers.tls_record_sink(&external, 443, "external");
    let backend = node.host("tls-backend");
    let seen_backend = servers.tls_record_sink(&backend, 8443, "tls-backend");
    let client = node.pod("shop", "client-1");
    let yaml = namespace_yaml("shop", true, None)
        + &namespace_yaml("backend", false, None)
        + &endpoint_pod_yaml(
            &backend,
            "tls-backend-0",
            "backend",
            &[("app", "tls-backend")],
        )
        + "apiVersion: v1
kind: Service
metadata: {name: tls-backend, namespace: backend}
spec:
  clusterIP: 198.18.0.252
  selector: {app: tls-backend}
  ports: [{name: tls, port: 443, targetPort: 8443}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: secure, namespace: shop}
spec:
  hosts: [secure.example.com, moved.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: moved, namespace: shop}
spec:
  hosts: [moved.example.com]
  tls:
  - match: [{sniHosts: [moved.example.com], port: 443}]
    route: [{destination: {host: tls-backend.backend.svc.cluster.local, port: {number: 443}}}]
---
" + &pod_yaml(&client, &[("app", "client")]);
    node.write_config("all.yaml", &yaml);
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(5));
    let to = external.addr(443).to_string();

    // A registered host: passes to where the app dialled, labelled by its name.
    let out = client.pdtool(&["tls-hello", "--to", &to, "--sni", "secure.example.com"]);
    assert_eq!(out["reply"], "external", "{out}");
    assert!(
        out["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "captured: {out}"
    );
    assert_eq!(
        seen_external.lock().unwrap()[0],
        out["hello_sha256"].as_str().unwrap(),
        "ClientHello arrived untouched"
    );
    // An unknown host: passthrough, labelled with the SNI it carried.
    let out = client.pdtool(&["tls-hello", "--to", &to, "--sni", "other.example.org"]);
    assert_eq!(out["reply"], "external", "{out}");
    // A tls[] rule sends the SNI elsewhere, whatever address the app dialled.
    let out = client.pdtool(&["tls-hello", "--to", &to, "--sni", "moved.example.com"]);
    assert_eq!(out["reply"], "tls-backend", "{out}");
    assert_eq!(
        seen_backend.lock().unwrap()[0],
        out["hello_sha256"].as_str().unwrap()
    );

    let opened =
        |labels: &[(&str, &str)]| daemon.metric_sum("istio_tcp_connections_opened_total", labels);
    assert_eq!(
        opened(&[
            ("destination_service", "secure.example.com"),
            ("destination_service_name", "secure.example.com")
        ]),
        1.0
    );
    assert_eq!(
        opened(&[
            ("destination_service", "other.example.org"),
            ("destination_service_name", "PassthroughCluster")
        ]),
        1.0
    );
    assert_eq!(
        opened(&[
            (
                "destination_service",
                "tls-backend.backend.svc.cluster.local"
            ),
            ("destination_service_name", "tls-backend")
        ]),
        1.0
    );
}

/// tls[] match fields besides sniHosts — `sourceNamespace`, `sourceLabels`,
/// `destinationSubnets`, a gateway-bound block (never for pods) — and `route[].weight`.
#[test]
fn tls_routes_match_by_source_and_dialled_subnet_and_split_by_weight() {
    let mut node = Node::new("snimatch");
    let servers = Servers::new();
    let dialled = node.host("dialled");
    let _ = servers.tls_record_sink(&dialled, 443, "dialled");
    let elsewhere = node.host("elsewhere");
    let _ = servers.tls_record_sink(&elsewhere, 443, "elsewhere");
    let mut yaml = namespace_yaml("shop", true, None)
        + &namespace_yaml("team-b", true, None)
        + &namespace_yaml("backend", false, None);
    for (name, ip) in [
        ("a", "198.18.0.221"),
        ("b", "198.18.0.222"),
        ("c", "198.18.0.223"),
    ] {
        let host = node.host(&format!("tls-{name}"));
        let _ = servers.tls_record_sink(
            &host,
            8443,
            Box::leak(format!("tls-{name}").into_boxed_str()),
        );
        yaml += &endpoint_pod_yaml(
            &host,
            &format!("tls-{name}-0"),
            "backend",
            &[("app", &format!("tls-{name}"))],
        );
        yaml += &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: tls-{name}, namespace: backend}}
spec:
  clusterIP: {ip}
  selector: {{app: tls-{name}}}
  ports: [{{name: tls, port: 443, targetPort: 8443}}]
---
"
        );
    }
    let dest = |n: &str| {
        format!(
            "{{destination: {{host: tls-{n}.backend.svc.cluster.local, port: {{number: 443}}}}}}"
        )
    };
    yaml += &format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.example.com]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.example.com]
  tls:
  - match: [{{sniHosts: [api.example.com], gateways: [istio-system/egress]}}]
    route: [{c}]
  - match: [{{sniHosts: [api.example.com], sourceNamespace: team-b}}]
    route: [{b}]
  - match: [{{sniHosts: [api.example.com], sourceLabels: {{tier: canary}}}}]
    route: [{b}]
  - match: [{{sniHosts: [api.example.com], destinationSubnets: [{elsewhere}/32]}}]
    route: [{c}]
  - match: [{{sniHosts: [api.example.com]}}]
    route:
    - {{destination: {{host: tls-a.backend.svc.cluster.local, port: {{number: 443}}}}, weight: 25}}
    - {{destination: {{host: tls-b.backend.svc.cluster.local, port: {{number: 443}}}}, weight: 75}}
---
",
        b = dest("b"),
        c = dest("c"),
        elsewhere = elsewhere.ip,
    );
    let client = node.pod("shop", "client-1");
    let canary = node.pod("shop", "canary-1");
    let other = node.pod("team-b", "client-b");
    yaml += &pod_yaml(&client, &[("app", "client")]);
    yaml += &pod_yaml(&canary, &[("app", "client"), ("tier", "canary")]);
    yaml += &pod_yaml(&other, &[("app", "client")]);
    node.write_config("all.yaml", &yaml);
    let daemon = Daemon::start(&node, &[]);
    for p in [&client, &canary, &other] {
        daemon.wait_enrolled(&p.uid, Duration::from_secs(5));
    }
    let hello = |pod: &proxy_tests::Pod, to: &proxy_tests::Host| -> String {
        let out = pod.pdtool(&[
            "tls-hello",
            "--to",
            &to.addr(443).to_string(),
            "--sni",
            "api.example.com",
        ]);
        out["reply"].as_str().unwrap_or("").to_string()
    };
    let mut tally = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..400 {
        *tally.entry(hello(&client, &dialled)).or_default() += 1;
    }
    // No gateway block, no source rule: the weighted split, 25/75. 100 of 400 expected,
    // σ ≈ 8.7: the bounds are 4.6 σ wide (a CI run once saw 71 of 200, 3.4 σ, against
    // bounds of 3.3 σ), and still far from an even split's 200.
    let a = tally.get("tls-a").copied().unwrap_or(0);
    assert_eq!(
        a + tally.get("tls-b").copied().unwrap_or(0),
        400,
        "{tally:?}"
    );
    assert!((60..=140).contains(&a), "25 % of 400 to tls-a: {tally:?}");
    for _ in 0..5 {
        assert_eq!(hello(&other, &dialled), "tls-b", "sourceNamespace");
        assert_eq!(hello(&canary, &dialled), "tls-b", "sourceLabels");
        assert_eq!(hello(&client, &elsewhere), "tls-c", "destinationSubnets");
    }
}
