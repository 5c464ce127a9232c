//! The users' story: the published EnvoyFilter and VirtualService, unchanged. Every
//! outbound HTTP:80 call of the test / mirror API pods goes to mirror-cache with
//! X-Azar-Mirror false / true; the cloud metadata address passes through untouched; every
//! other pod is unaffected.
use std::{net::Ipv4Addr, path::Path, time::Duration};

use proxy_tests::{
    daemon::Daemon,
    node::{endpoint_pod_yaml, namespace_yaml, pod_yaml, Node},
    servers::{HttpEcho, Servers},
};

fn seed(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/seed-examples")
            .join(name),
    )
    .expect("seed example")
}

#[test]
fn envoy_filter_override_sends_api_pods_to_the_cache_but_not_the_metadata_address() {
    let mut node = Node::new("override");
    let servers = Servers::new();
    let cache = node.host("mirror-cache");
    let tiny = node.host("tiny");
    let other_site = node.host("other-site");
    let metadata = node.host_at("metadata", Ipv4Addr::new(169, 254, 169, 254));
    for (h, name) in [
        (&cache, "mirror-cache"),
        (&tiny, "tiny-microservice"),
        (&other_site, "other-site"),
        (&metadata, "metadata"),
    ] {
        servers.http_echo(
            h,
            80,
            HttpEcho {
                name: name.into(),
                ..Default::default()
            },
        );
    }
    let api_test = node.pod("azar", "api-test-1");
    let api_mirror = node.pod("azar-mirror", "api-mirror-1");
    let web = node.pod("azar", "web-1");
    for p in [&api_test, &api_mirror, &web] {
        p.host.route_to(metadata.ip);
    }
    let services = "apiVersion: v1
kind: Service
metadata: {name: mirror-cache, namespace: azar}
spec:
  clusterIP: 198.18.0.240
  selector: {app: mirror-cache}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: tiny-microservice, namespace: azar}
spec:
  clusterIP: 198.18.0.241
  selector: {app: tiny-microservice}
  ports: [{name: http, port: 80}]
---
";
    let yaml = namespace_yaml("azar", true, None)
        + &namespace_yaml("azar-mirror", true, None)
        + services
        + &endpoint_pod_yaml(&cache, "mirror-cache-0", "azar", &[("app", "mirror-cache")])
        + &endpoint_pod_yaml(
            &tiny,
            "tiny-microservice-0",
            "azar",
            &[("app", "tiny-microservice")],
        )
        + &pod_yaml(&api_test, &[("app", "api"), ("stack", "test")])
        + &pod_yaml(&api_mirror, &[("app", "api"), ("stack", "mirror")])
        + &pod_yaml(&web, &[("app", "web")]);
    node.write_config("cluster.yaml", &yaml);
    node.write_config(
        "envoyfilter-override.yaml",
        &seed("envoyfilter-override.yaml"),
    );
    node.write_config("route-by-source.yaml", &seed("route-by-source.yaml"));
    let daemon = Daemon::start(&node, &[]);
    for p in [&api_test, &api_mirror, &web] {
        daemon.wait_enrolled(&p.uid, Duration::from_secs(5));
    }

    let call = |pod: &proxy_tests::Pod, to: String, host: &str| {
        let out = pod.pdtool(&[
            "http",
            "--to",
            &to,
            "--host",
            host,
            "-H",
            "X-Request-Id: story-1",
        ]);
        assert_eq!(out["first"]["status"], 200, "{} -> {host}: {out}", pod.name);
        out["first"]["body"].clone()
    };
    let tiny_addr = "198.18.0.241:80".to_string();
    let other_addr = other_site.addr(80).to_string();
    let metadata_addr = format!("{}:80", metadata.ip);

    for (pod, flag) in [(&api_test, "false"), (&api_mirror, "true")] {
        for (to, host) in [
            (tiny_addr.clone(), "tiny-microservice"),
            (other_addr.clone(), "other-site.example"),
        ] {
            let b = call(pod, to, host);
            assert_eq!(b["server"], "mirror-cache", "{} -> {host}: {b}", pod.name);
            assert_eq!(b["headers"]["x-azar-mirror"], flag, "{b}");
            assert_eq!(
                b["headers"]["x-request-id"], "story-1",
                "the cache can pair calls: {b}"
            );
        }
        let b = call(pod, metadata_addr.clone(), "169.254.169.254");
        assert_eq!(b["server"], "metadata", "metadata passes through: {b}");
        assert!(
            b["headers"].get("x-azar-mirror").is_none(),
            "untouched: {b}"
        );
    }
    // Everyone else is unaffected.
    let b = call(&web, tiny_addr, "tiny-microservice");
    assert_eq!(b["server"], "tiny-microservice", "{b}");
    assert!(b["headers"].get("x-azar-mirror").is_none(), "{b}");
    let b = call(&web, other_addr, "other-site.example");
    assert_eq!(b["server"], "other-site", "{b}");
}
