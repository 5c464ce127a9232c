//! HBONE against a peer nobody here wrote: Envoy 1.40 (the engine of Istio's sidecars and
//! waypoints), configured as Istio configures it for HBONE: as a client, `tcp_proxy` with
//! `tunneling_config` over HTTP/2 and mutual TLS to a pod's port 15008; as a server, an
//! HTTP/2 listener on 15008 that requires a mesh client certificate and terminates
//! CONNECT. Both directions, in the netns harness, with one mesh CA.
use std::{path::Path, time::Duration};

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml_on, Node, FIRST_NODE},
    pki::TestCa,
    servers::Servers,
    target_bin, wait_for,
};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/prod/sa/db";
const ENVOY_CLIENT: &str = "spiffe://cluster.local/ns/istio-system/sa/waypoint";

/// Writes a workload certificate for `uri`; (cert path, key path).
fn workload_files(dir: &Path, ca: &TestCa, name: &str, uri: &str) -> (String, String) {
    let leaf = ca.workload(uri);
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, &leaf.cert_pem).unwrap();
    std::fs::write(&k, &leaf.key_pem).unwrap();
    (c.display().to_string(), k.display().to_string())
}

fn tls_context(cert: &(String, String), root: &str, san: (&str, &str)) -> String {
    let (kind, value) = san;
    format!(
        r#"common_tls_context:
          tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
          alpn_protocols: [h2]
          tls_certificates:
          - certificate_chain: {{filename: {cert}}}
            private_key: {{filename: {key}}}
          validation_context:
            trusted_ca: {{filename: {root}}}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{{kind}: "{value}"}}"#,
        cert = cert.0,
        key = cert.1,
    )
}

/// Envoy as Istio's HBONE client (a waypoint's or sidecar's upstream): a TCP listener on
/// 127.0.0.1:15123 tunnelling each connection to the db pod's HBONE port, CONNECT for
/// the app's address, presenting the waypoint's identity and checking the pod's.
#[test]
fn envoy_tunnels_into_a_pod_over_hbone_and_the_daemon_names_its_identity() {
    let mut node = Node::new("envoyc");
    let servers = Servers::new();
    let db = node.pod("prod", "db-0");
    let client = node.host("envoy-client");
    let seen = servers.identity(&db.host, 7000);
    let ca = TestCa::new("mesh-root");
    let dir = node.work_dir.clone();
    let root = dir.join("root.pem");
    std::fs::write(&root, &ca.cert_pem).unwrap();
    std::fs::write(dir.join("ca-key.pem"), &ca.key_pem).unwrap();
    node.write_config(
        "cluster.yaml",
        &(namespace_yaml("prod", true, None)
            + &pod_yaml_on(&db, &[("app", "db")], FIRST_NODE, "db")),
    );
    let d = Daemon::start(
        &node,
        &[
            "--ca-cert",
            &root.display().to_string(),
            "--ca-key",
            &dir.join("ca-key.pem").display().to_string(),
        ],
    );
    d.wait_enrolled(&db.uid, Duration::from_secs(5));
    let cert = workload_files(&dir, &ca, "envoy-client", ENVOY_CLIENT);
    let config = format!(
        r#"static_resources:
  listeners:
  - name: to_db
    address: {{socket_address: {{address: 127.0.0.1, port_value: 15123}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: hbone
          cluster: db_hbone
          tunneling_config:
            hostname: "{db_ip}:7000"
  clusters:
  - name: db_hbone
    connect_timeout: 2s
    type: STATIC
    load_assignment:
      cluster_name: db_hbone
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {db_ip}, port_value: 15008}}}}}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {tls}
"#,
        db_ip = db.host.ip,
        tls = tls_context(&cert, &root.display().to_string(), ("exact", DB)),
    );
    let _envoy = proxy_tests::envoy::run(&client, &dir, "envoy-client", &config, 15123);
    let out = client
        .command(
            None,
            &target_bin("pdtool"),
            &["connect", "--to", "127.0.0.1:15123", "--timeout-ms", "5000"],
        )
        .output()
        .expect("pdtool");
    let out: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(out["result"], "ok", "{out}");
    // The app saw the tunnel's end in its pod, and the daemon the waypoint's identity.
    assert_eq!(seen.peers().len(), 1);
    assert_eq!(seen.peers()[0].0.ip().to_string(), "127.0.0.6");
    let series = [
        ("reporter", "destination"),
        ("source_principal", ENVOY_CLIENT),
        ("destination_principal", DB),
        ("connection_security_policy", "mutual_tls"),
        ("destination_workload", "db"),
    ];
    assert!(
        wait_for(Duration::from_secs(3), || (d
            .metric_sum("istio_tcp_connections_closed_total", &series)
            == 1.0)
            .then_some(()))
        .is_some(),
        "{}",
        d.metrics_text()
    );
}

/// Envoy as Istio's HBONE server (a waypoint, or a sidecar's inbound): port 15008 with a
/// mesh client certificate required, HTTP/2 CONNECT terminated into the app. The daemon
/// tunnels a captured pod's connection to it, as to any mesh pod on another node.
#[test]
fn the_daemon_tunnels_a_pods_connection_to_envoys_hbone_server() {
    let mut node = Node::new("envoys");
    let servers = Servers::new();
    let b = node.second_node("node-b");
    let web = node.pod("shop", "web-0");
    let server_host = node.host("envoy-server");
    let seen = servers.identity(&server_host, 7000);
    let ca = TestCa::new("mesh-root");
    let dir = node.work_dir.clone();
    let root = dir.join("root.pem");
    std::fs::write(&root, &ca.cert_pem).unwrap();
    std::fs::write(dir.join("ca-key.pem"), &ca.key_pem).unwrap();
    // The server is a pod of node B (no proxy-daemon there: Envoy serves its HBONE port).
    node.write_config(
        "cluster.yaml",
        &(namespace_yaml("shop", true, None)
            + &namespace_yaml("prod", true, None)
            + &pod_yaml_on(&web, &[("app", "web")], FIRST_NODE, "web")
            + &format!(
                "apiVersion: v1
kind: Pod
metadata: {{name: db-0, namespace: prod, uid: envoy-db-0, labels: {{app: db}}}}
spec:
  nodeName: {node_b}
  serviceAccountName: db
  containers: [{{name: app}}]
status: {{phase: Running, podIP: {ip}}}
---
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: prod}}
spec:
  clusterIP: 198.18.0.250
  selector: {{app: db}}
  ports: [{{name: tcp-ident, port: 7000}}]
---
",
                node_b = b.name,
                ip = server_host.ip
            )),
    );
    let cert = workload_files(&dir, &ca, "envoy-server", DB);
    let access_log = dir.join("envoy-access.log");
    let config = format!(
        r#"static_resources:
  listeners:
  - name: hbone
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15008}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hbone_in
          codec_type: HTTP2
          http2_protocol_options: {{allow_connect: true}}
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                text_format_source:
                  inline_string: "%REQ(:METHOD)% %REQ(:AUTHORITY)% %DOWNSTREAM_PEER_URI_SAN% %RESPONSE_CODE% %REQ(FORWARDED)%\n"
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: app
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: app
    connect_timeout: 2s
    type: STATIC
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: 7000}}}}}}
"#,
        tls = tls_context(
            &cert,
            &root.display().to_string(),
            ("prefix", "spiffe://cluster.local/")
        )
        .replace("\n        ", "\n          "),
        log = access_log.display(),
        ip = server_host.ip,
    );
    let _envoy = proxy_tests::envoy::run(&server_host, &dir, "envoy-server", &config, 15008);
    let d = Daemon::start(
        &node,
        &[
            "--ca-cert",
            &root.display().to_string(),
            "--ca-key",
            &dir.join("ca-key.pem").display().to_string(),
        ],
    );
    d.wait_enrolled(&web.uid, Duration::from_secs(5));
    for _ in 0..3 {
        let out = web.pdtool(&["connect", "--to", "198.18.0.250:7000"]);
        assert_eq!(out["result"], "ok", "{out}");
    }
    assert_eq!(seen.peers().len(), 3);
    // Envoy terminated three CONNECTs for the app's address, from web's identity, over
    // one mutual-TLS connection.
    let logged = wait_for(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&access_log).unwrap_or_default();
        (text.lines().count() >= 3).then_some(text)
    })
    .expect("Envoy's access log");
    for line in logged.lines() {
        assert!(
            line.starts_with(&format!("CONNECT {}:7000 {WEB} 200", server_host.ip)),
            "{logged}"
        );
        assert!(line.contains("host=db.prod.svc.cluster.local"), "{logged}");
    }
    assert_eq!(
        d.metric_sum("proxy_daemon_hbone_handshakes_total", &[]),
        1.0
    );
    let series = [
        ("reporter", "source"),
        ("source_principal", WEB),
        ("destination_principal", DB),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        wait_for(Duration::from_secs(3), || (d
            .metric_sum("istio_tcp_connections_closed_total", &series)
            == 3.0)
            .then_some(()))
        .is_some(),
        "{}",
        d.metrics_text()
    );
}
