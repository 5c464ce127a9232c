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
