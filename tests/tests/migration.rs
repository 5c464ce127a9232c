//! A namespace moved from Istio sidecars to proxy-daemon under load, as
//! docs/migrating-from-istio.md tells it: Service `api` of namespace `shop` starts with one
//! pod that has a sidecar (Envoy 1.40 in the pod's network namespace, with the iptables
//! inbound redirect Istio's init container installs, and the `sidecar.istio.io/status`
//! annotation), in a namespace already labelled for capture. The pod is replaced, as a
//! `rollout restart` without injection does, by one without a sidecar, which proxy-daemon
//! captures. A caller in a captured namespace sends requests at a steady rate the whole
//! time: every one must succeed, the old pod's answers must have gone through its Envoy,
//! and the new pod's must have arrived over mutual TLS (HBONE) and be reported by the
//! destination.
use std::time::Duration;

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml, Host, Node},
    servers::{HttpEcho, Servers},
    wait_for, KillOnDrop, Pod,
};

const API_IP: &str = "198.18.0.170";
const HOST: &str = "api.shop.svc.cluster.local";

/// What a sidecar does for inbound traffic: the pod's port 8080 redirected (nat
/// PREROUTING, as istio-init writes it) to Envoy's 15006, which passes it to the app and
/// logs each connection.
fn sidecar(host: &Host, dir: &std::path::Path) -> KillOnDrop {
    let log = dir.join("envoy-access.log");
    let config = format!(
        r#"static_resources:
  listeners:
  - name: virtualInbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15006}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: inbound
          cluster: app
          # A line as each connection is made (a pooled one may outlive the test).
          access_log_options: {{flush_access_log_on_connected: true}}
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: app
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: 8080}}}}}}}}]}}]
"#,
        log = log.display(),
        ip = host.ip
    );
    let guard = proxy_tests::envoy::run(host, dir, "sidecar", &config, 15006);
    proxy_tests::sh(&[
        "ip",
        "netns",
        "exec",
        &host.netns,
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15006",
    ]);
    guard
}

/// The configuration with the given `api` pods (the sidecar pod carries Istio's injection
/// annotation); those with `ready` set are behind the Service.
fn config(node: &Node, web: &Pod, api: &[(&Pod, bool, bool)]) {
    let mut yaml = namespace_yaml("front", true, None) + &namespace_yaml("shop", true, None);
    yaml += &pod_yaml(web, &[("app", "web")]);
    for (pod, with_sidecar, ready) in api {
        // Not ready yet: not selected (a real Service's EndpointSlice lists a pod once its
        // readiness probe passes, after its sandbox was made and enrolled).
        let app = if *ready { "api" } else { "api-starting" };
        let mut y = pod_yaml(pod, &[("app", app)]);
        if *with_sidecar {
            y = y.replacen(
                "  labels:\n",
                "  annotations:\n    sidecar.istio.io/status: '{\"containers\":[\"istio-proxy\"]}'\n  labels:\n",
                1,
            );
        }
        yaml += &y;
    }
    yaml += &format!(
        "apiVersion: v1
kind: Service
metadata: {{name: api, namespace: shop}}
spec:
  clusterIP: {API_IP}
  selector: {{app: api}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"
    );
    node.write_config("all.yaml", &yaml);
}

/// Waits until the daemon's registry has exactly `ips` behind the Service.
fn wait_endpoints(daemon: &Daemon, ips: &[String], absent: &[String]) {
    let ok = wait_for(Duration::from_secs(10), || {
        let svc = daemon.config_dump()["snapshot"]["registry"]["services"][HOST].to_string();
        (ips.iter().all(|ip| svc.contains(ip.as_str()))
            && absent.iter().all(|ip| !svc.contains(ip.as_str())))
        .then_some(())
    });
    assert!(ok.is_some(), "endpoints never became {ips:?}");
}

#[test]
fn a_namespace_moves_from_sidecars_to_the_node_proxy_with_no_failed_request() {
    let mut node = Node::new("migrate");
    let servers = Servers::new();
    let web = node.pod("front", "web-1");
    let old = node.pod("shop", "api-7c9f-old");
    let new = node.pod("shop", "api-5d2e-new");
    for (pod, name) in [(&old, "api-old"), (&new, "api-new")] {
        servers.http_echo(
            &pod.host,
            8080,
            HttpEcho {
                name: name.into(),
                ..Default::default()
            },
        );
    }
    let _envoy = sidecar(&old.host, &node.work_dir);
    config(&node, &web, &[(&old, true, true)]);
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&web.uid, Duration::from_secs(5));
    let (old_ip, new_ip) = (old.host.ip.to_string(), new.host.ip.to_string());
    wait_endpoints(&daemon, std::slice::from_ref(&old_ip), &[]);
    assert!(
        daemon.workload_state(&old.uid).is_none(),
        "the sidecar pod is left to its sidecar"
    );
    let reason = daemon.config_dump()["snapshot"]["not_captured"]["Pod/shop/api-7c9f-old"].clone();
    assert!(
        reason.as_str().is_some_and(|r| r.contains("Istio sidecar")),
        "{reason}"
    );

    // 1,500 requests at 100 a second from the caller while the rollout happens.
    let out = std::thread::scope(|s| {
        let load = s.spawn(|| {
            web.pdtool(&[
                "http",
                "--to",
                &format!("{API_IP}:80"),
                "--host",
                "api.shop",
                "--count",
                "1500",
                "--rate",
                "100",
            ])
        });
        std::thread::sleep(Duration::from_secs(4));
        // The rollout: the new pod (no sidecar) starts and is enrolled, becomes ready and
        // joins the Service, then the old one goes.
        config(&node, &web, &[(&old, true, true), (&new, false, false)]);
        daemon.wait_enrolled(&new.uid, Duration::from_secs(5));
        config(&node, &web, &[(&old, true, true), (&new, false, true)]);
        wait_endpoints(&daemon, &[old_ip.clone(), new_ip.clone()], &[]);
        std::thread::sleep(Duration::from_secs(4));
        config(&node, &web, &[(&new, false, true)]);
        wait_endpoints(
            &daemon,
            std::slice::from_ref(&new_ip),
            std::slice::from_ref(&old_ip),
        );
        load.join().expect("load")
    });
    assert_eq!(out["statuses"]["200"], 1500, "no request failed: {out}");
    assert_eq!(out["errors"].as_array().map(Vec::len), Some(0), "{out}");
    let old_served = out["servers"]["api-old"].as_u64().unwrap_or(0);
    let new_served = out["servers"]["api-new"].as_u64().unwrap_or(0);
    assert!(old_served >= 100 && new_served >= 300, "{out}");

    // The old pod's answers went through its sidecar; the new pod's arrived over HBONE and
    // its node's proxy reported them as the destination, with both identities.
    let envoy_log =
        std::fs::read_to_string(node.work_dir.join("envoy-access.log")).unwrap_or_default();
    assert!(
        !envoy_log.trim().is_empty(),
        "the sidecar's inbound listener carried the old pod's traffic"
    );
    let mtls = [
        ("reporter", "destination"),
        ("destination_workload_namespace", "shop"),
        ("source_workload_namespace", "front"),
        ("connection_security_policy", "mutual_tls"),
        ("response_code", "200"),
    ];
    assert_eq!(
        daemon.metric_sum("istio_requests_total", &mtls),
        new_served as f64,
        "{}",
        daemon.metrics_text()
    );
}

/// Labelling a namespace captures its running pods (no restart): a caller whose node proxy
/// already holds a pooled plaintext connection to such a pod must not reuse it once the
/// pod is in the mesh — every request after the enrolment arrives over mutual TLS and is
/// reported by the destination (before the fix, the pooled connection kept carrying
/// plaintext past the destination's policies for its whole life).
#[test]
fn capturing_a_running_namespace_moves_pooled_callers_to_mutual_tls() {
    let mut node = Node::new("migratepool");
    let servers = Servers::new();
    let web = node.pod("front", "web-1");
    let api = node.pod("shop", "api-1");
    servers.http_echo(
        &api.host,
        8080,
        HttpEcho {
            name: "api".into(),
            ..Default::default()
        },
    );
    let write = |shop_captured: bool| {
        let yaml = namespace_yaml("front", true, None)
            + &namespace_yaml("shop", shop_captured, None)
            + &pod_yaml(&web, &[("app", "web")])
            + &pod_yaml(&api, &[("app", "api")])
            + &format!(
                "apiVersion: v1
kind: Service
metadata: {{name: api, namespace: shop}}
spec:
  clusterIP: {API_IP}
  selector: {{app: api}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"
            );
        node.write_config("all.yaml", &yaml);
    };
    write(false);
    let daemon = Daemon::start(&node, &[]);
    daemon.wait_enrolled(&web.uid, Duration::from_secs(5));
    let send = |n: &str| {
        web.pdtool(&[
            "http",
            "--to",
            &format!("{API_IP}:80"),
            "--host",
            "api.shop",
            "--count",
            n,
        ])
    };
    let out = send("20");
    assert_eq!(out["statuses"]["200"], 20, "{out}");
    let mtls = [
        ("reporter", "destination"),
        ("destination_workload_namespace", "shop"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(daemon.metric_sum("istio_requests_total", &mtls), 0.0);
    write(true);
    daemon.wait_enrolled(&api.uid, Duration::from_secs(5));
    let out = send("50");
    assert_eq!(out["statuses"]["200"], 50, "{out}");
    assert_eq!(
        daemon.metric_sum("istio_requests_total", &mtls),
        50.0,
        "every request after the enrolment went over HBONE"
    );
}
