//! The Gateway API's mesh conformance tests (GAMMA), replayed through the netns node: the
//! upstream manifests (`fixtures/gateway-api-mesh/`, unchanged) applied one test at a time
//! on top of the base Services, and every case of `INDEX.md`'s expectation tables asserted
//! N of N times once the configuration has converged — not upstream's "3 in a row", which
//! a proxy that ignores routes passes by chance. The cases INDEX.md marks **[ours]** (the
//! upstream path after a rewrite, redirect `Location`s, 404 for no match) are asserted too.
//!
//! The echo backends are the tests' own servers: `echo-v1-…` and `echo-v2-…` answer HTTP
//! on 8080 and h2c/gRPC on 7070 with the name of the "pod" and every request header they
//! received (repeated headers joined with `,`, as the conformance echo reports them).
use std::time::Duration;

use proxy_tests::{
    daemon::Daemon,
    node::{endpoint_pod_yaml, namespace_yaml, pod_yaml, Host, Node},
    servers::{HttpEcho, Servers},
    wait_for, Pod,
};
use serde_json::Value;

const NS: &str = "gateway-conformance-mesh";
const CONSUMER_NS: &str = "gateway-conformance-mesh-consumer";
/// ClusterIPs the API server would have assigned to the base manifests' Services.
const SERVICES: [(&str, &str); 3] = [
    ("echo", "198.18.0.160"),
    ("echo-v1", "198.18.0.161"),
    ("echo-v2", "198.18.0.162"),
];
/// Every case is asserted this many times in a row.
const N: usize = 20;

fn fixture(path: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/gateway-api-mesh")
            .join(path),
    )
    .expect(path)
}

fn cluster_ip(service: &str) -> &'static str {
    SERVICES
        .iter()
        .find(|(s, _)| *s == service)
        .map(|(_, ip)| *ip)
        .expect("a base Service")
}

/// The base manifests' Services as the cluster has them (a ClusterIP each); their
/// Deployments are the echo hosts below.
fn base_services() -> String {
    let mut out = String::new();
    for doc in fixture("mesh/manifests.yaml").split("\n---") {
        if !doc.contains("\nkind: Service\n") {
            continue;
        }
        let name = doc
            .lines()
            .find_map(|l| l.trim().strip_prefix("name: "))
            .expect("a name");
        out.push_str(&doc.replacen(
            "\nspec:\n",
            &format!("\nspec:\n  clusterIP: {}\n", cluster_ip(name)),
            1,
        ));
        out.push_str("\n---\n");
    }
    out
}

struct Mesh {
    node: Node,
    _servers: Servers,
    /// Requests each echo host served (v1, v2).
    hits: Vec<std::sync::Arc<std::sync::atomic::AtomicU32>>,
    daemon: Daemon,
    /// The client pod of the mesh namespace and of the consumer namespace.
    client: Pod,
    consumer: Pod,
    v2_host: Host,
}

impl Mesh {
    fn start(tag: &str) -> Self {
        let mut node = Node::new(tag);
        let servers = Servers::new();
        let mut yaml = namespace_yaml(NS, true, None) + &namespace_yaml(CONSUMER_NS, true, None);
        let mut hosts = Vec::new();
        let mut hits = Vec::new();
        for v in ["v1", "v2"] {
            let host = node.host(&format!("echo-{v}"));
            let pod_name: &'static str =
                Box::leak(format!("echo-{v}-5d8f7c9b4-x2k{v}").into_boxed_str());
            hits.push(servers.http_echo(
                &host,
                8080,
                HttpEcho {
                    name: pod_name.to_string(),
                    ..Default::default()
                },
            ));
            servers.h2c_echo(&host, 7070, pod_name);
            yaml += &endpoint_pod_yaml(&host, pod_name, NS, &[("app", "echo"), ("version", v)]);
            hosts.push(host);
        }
        yaml += &base_services();
        // Not in the base manifests: a backend that answers after 600 ms, for timeouts.
        let slow = node.host("echo-slow");
        servers.http_echo(
            &slow,
            8080,
            HttpEcho {
                name: "echo-slow".into(),
                delay: Duration::from_millis(600),
                ..Default::default()
            },
        );
        yaml += &endpoint_pod_yaml(&slow, "echo-slow-0", NS, &[("app", "echo-slow")]);
        yaml += &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: echo-slow, namespace: {NS}}}
spec:
  clusterIP: 198.18.0.163
  selector: {{app: echo-slow}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
"
        );
        let client = node.pod(NS, "client-7f6d");
        let consumer = node.pod(CONSUMER_NS, "client-c41b");
        yaml += &pod_yaml(&client, &[("app", "client")]);
        yaml += &pod_yaml(&consumer, &[("app", "client")]);
        node.write_config("base.yaml", &yaml);
        let daemon = Daemon::start(&node, &[]);
        daemon.wait_enrolled(&client.uid, Duration::from_secs(5));
        daemon.wait_enrolled(&consumer.uid, Duration::from_secs(5));
        let v2_host = hosts.pop().expect("v2");
        Mesh {
            node,
            _servers: servers,
            hits,
            daemon,
            client,
            consumer,
            v2_host,
        }
    }

    /// Applies one upstream test's manifest and waits until every route in it is bound.
    fn apply(&self, test_yaml: &str) {
        self.apply_text(test_yaml, &fixture(&format!("tests/{test_yaml}")));
    }

    /// Applies routes written here (`what` names them in messages).
    fn apply_text(&self, test_yaml: &str, text: &str) {
        let text = text.to_string();
        self.node.write_config("test.yaml", &text);
        let names: Vec<String> = text
            .split("\n---")
            .filter_map(|d| {
                let kind = d.lines().find_map(|l| l.strip_prefix("kind: "))?;
                let name = d.lines().find_map(|l| l.trim().strip_prefix("name: "))?;
                let ns = d
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("namespace: "))?;
                Some(format!("{kind}/{ns}/{name}"))
            })
            .collect();
        assert!(!names.is_empty(), "{test_yaml}: no route found to wait for");
        let bound = wait_for(Duration::from_secs(10), || {
            let dump = self.daemon.config_dump()["snapshot"]["routes"]["mesh_routes"].to_string();
            names
                .iter()
                .all(|n| dump.contains(n.as_str()))
                .then_some(())
        });
        assert!(
            bound.is_some(),
            "{test_yaml}: routes {names:?} never bound; dump: {}\nlog:\n{}",
            self.daemon.config_dump()["snapshot"]["routes"],
            self.daemon.log_text()
        );
    }

    /// N requests from `from` to `service[:port]` (the ClusterIP dialled), Host `host`.
    fn get(
        &self,
        from: &Pod,
        service: &str,
        port: u16,
        host: &str,
        path: &str,
        headers: &[&str],
    ) -> Value {
        let to = format!("{}:{port}", cluster_ip(service));
        let count = N.to_string();
        let mut args = vec![
            "http", "--to", &to, "--host", host, "--path", path, "--count", &count,
        ];
        for h in headers {
            args.push("-H");
            args.push(h);
        }
        from.pdtool(&args)
    }
}

/// All N answered `status` and, when `backend` is set, every one by that backend.
fn expect(out: &Value, status: u16, backend: Option<&str>, what: &str) {
    assert_eq!(
        out["statuses"][status.to_string()].as_u64(),
        Some(N as u64),
        "{what}: {out}"
    );
    if let Some(b) = backend {
        let servers = out["servers"].as_object().cloned().unwrap_or_default();
        assert!(
            servers.len() == 1 && servers.keys().all(|k| k.starts_with(b)),
            "{what}: every answer from {b}: {out}"
        );
        assert_eq!(
            out["first"]["body"]["server"]
                .as_str()
                .map(|s| s.starts_with(b)),
            Some(true),
            "{what}: {out}"
        );
    }
}

fn request_header<'a>(out: &'a Value, name: &str) -> Option<&'a str> {
    out["first"]["body"]["headers"][name.to_ascii_lowercase()].as_str()
}

#[test]
fn mesh_basic_split_same_namespace_and_matching() {
    let m = Mesh::start("gammabasic");
    let c = &m.client;
    // 1 MeshBasic: no route; Service echo balances over both.
    let out = c.pdtool(&[
        "http",
        "--to",
        &format!("{}:80", cluster_ip("echo")),
        "--host",
        "echo",
        "--count",
        "40",
    ]);
    assert_eq!(out["statuses"]["200"], 40, "{out}");
    assert_eq!(
        out["servers"].as_object().map(|s| s.len()),
        Some(2),
        "both backends: {out}"
    );

    // 2 MeshTrafficSplit.
    m.apply("mesh-split.yaml");
    expect(
        &m.get(c, "echo", 80, "echo", "/v1", &[]),
        200,
        Some("echo-v1"),
        "echo/v1",
    );
    expect(
        &m.get(c, "echo", 80, "echo", "/v2", &[]),
        200,
        Some("echo-v2"),
        "echo/v2",
    );
    // [ours] a Service with routes answers 404 to a request no rule matches.
    expect(
        &m.get(c, "echo", 80, "echo", "/other", &[]),
        404,
        None,
        "echo/other",
    );
    // The route has no port: it binds every port of the Service.
    expect(
        &m.get(c, "echo", 8080, "echo", "/v2", &[]),
        200,
        Some("echo-v2"),
        "echo:8080/v2",
    );

    // A broken route (a CEL rule of the CRD: ReplacePrefixMatch needs a PathPrefix match)
    // is refused with its line, and the routes in force keep routing.
    m.node.write_config(
        "broken.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: broken
  namespace: {NS}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo}}]
  rules:
  - matches: [{{path: {{type: Exact, value: /v1}}}}]
    filters:
    - type: URLRewrite
      urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /x}}}}
    backendRefs: [{{name: echo-v2, port: 8080}}]
"
        ),
    );
    let refused = wait_for(Duration::from_secs(10), || {
        (m.daemon.metric_sum("proxy_daemon_config_errors_total", &[]) >= 1.0).then_some(())
    });
    assert!(refused.is_some(), "{}", m.daemon.log_text());
    let last_error = m.daemon.config_dump()["config"]["last_error"].to_string();
    assert!(
        last_error.contains("broken.yaml:9:") && last_error.contains("PathPrefix"),
        "{last_error}"
    );
    expect(
        &m.get(c, "echo", 80, "echo", "/v1", &[]),
        200,
        Some("echo-v1"),
        "still /v1 → v1",
    );
    m.node.remove_config("broken.yaml");

    // 3 MeshHTTPRouteSimpleSameNamespace: never v2, although Service echo selects it.
    m.apply("httproute-simple-same-namespace.yaml");
    expect(
        &m.get(c, "echo", 80, "echo", "/", &[]),
        200,
        Some("echo-v1"),
        "echo/",
    );

    // 4 MeshHTTPRouteMatching.
    m.apply("httproute-matching.yaml");
    for (path, headers, backend) in [
        ("/", &[][..], "echo-v1"),
        ("/example", &[][..], "echo-v1"),
        ("/", &["Version: one"][..], "echo-v1"),
        ("/v2", &[][..], "echo-v2"),
        ("/v2/example", &[][..], "echo-v2"),
        ("/", &["Version: two"][..], "echo-v2"),
        ("/v2/", &[][..], "echo-v2"),
        ("/v2example", &[][..], "echo-v1"),
        ("/foo/v2/example", &[][..], "echo-v1"),
    ] {
        let out = m.get(c, "echo", 80, "echo", path, headers);
        expect(&out, 200, Some(backend), &format!("{path} {headers:?}"));
    }
}

#[test]
fn mesh_weights_split_per_request_and_an_absent_backend_gets_nothing() {
    let m = Mesh::start("gammaweight");
    // 5 MeshHTTPRouteWeight: 70/30 per request. 2,000 requests (upstream sends 500 and
    // retries a failed batch up to 10 times): ±0.05 is then 4.9 standard deviations.
    m.apply("httproute-weight.yaml");
    let to = format!("{}:80", cluster_ip("echo"));
    let out = m
        .client
        .pdtool(&["http", "--to", &to, "--host", "echo", "--count", "2000"]);
    assert_eq!(out["statuses"]["200"], 2000, "every request answers: {out}");
    let servers = out["servers"].as_object().cloned().unwrap_or_default();
    assert_eq!(servers.len(), 2, "no other backend: {out}");
    let share = |b: &str| -> f64 {
        servers
            .iter()
            .filter(|(k, _)| k.starts_with(b))
            .map(|(_, v)| v.as_f64().unwrap_or(0.0))
            .sum::<f64>()
            / 2000.0
    };
    assert!(
        (share("echo-v1") - 0.70).abs() <= 0.05,
        "v1 share {}: {out}",
        share("echo-v1")
    );
    assert!(
        (share("echo-v2") - 0.30).abs() <= 0.05,
        "v2 share {}: {out}",
        share("echo-v2")
    );

    // 22 MeshGRPCRouteWeight: 70/30/0 with echo-v3 absent, 2,000 calls multiplexed on one
    // h2 connection: balanced per stream, echo-v3 (weight 0, no such Service) gets none.
    m.apply("grpcroute-weight.yaml");
    let to = format!("{}:7070", cluster_ip("echo"));
    let out = m.client.pdtool(&[
        "h2",
        "--to",
        &to,
        "--authority",
        "echo:7070",
        "--path",
        "/proto.EchoTestService/Echo",
        "-H",
        "content-type: application/grpc",
        "--count",
        "2000",
    ]);
    assert_eq!(out["statuses"]["200"], 2000, "every call answers: {out}");
    let servers = out["servers"].as_object().cloned().unwrap_or_default();
    assert_eq!(servers.len(), 2, "exactly two backends: {out}");
    let v1: f64 = servers
        .iter()
        .filter(|(k, _)| k.starts_with("echo-v1"))
        .map(|(_, v)| v.as_f64().unwrap_or(0.0))
        .sum::<f64>()
        / 2000.0;
    assert!((v1 - 0.70).abs() <= 0.05, "v1 share {v1}: {out}");
}

/// A request path, the status it must get and the `Location` it must carry.
type Redirect<'a> = (&'a str, u16, &'a str);

#[test]
fn mesh_redirects_set_status_and_location() {
    let m = Mesh::start("gammaredirect");
    let c = &m.client;
    let cases: [(&str, &[Redirect]); 7] = [
        (
            "httproute-redirect-host-and-status.yaml",
            &[
                (
                    "/hostname-redirect",
                    302,
                    "http://example.org/hostname-redirect",
                ),
                (
                    "/host-and-status",
                    301,
                    "http://example.org/host-and-status",
                ),
            ],
        ),
        (
            "httproute-redirect-scheme.yaml",
            &[
                ("/scheme", 302, "https://echo/scheme"),
                (
                    "/scheme-and-host",
                    302,
                    "https://example.org/scheme-and-host",
                ),
                ("/scheme-and-status", 301, "https://echo/scheme-and-status"),
                (
                    "/scheme-and-host-and-status",
                    302,
                    "https://example.org/scheme-and-host-and-status",
                ),
            ],
        ),
        (
            "httproute-redirect-port.yaml",
            &[
                ("/port", 302, "http://echo:8083/port"),
                (
                    "/port-and-host",
                    302,
                    "http://example.org:8083/port-and-host",
                ),
                ("/port-and-status", 301, "http://echo:8083/port-and-status"),
                (
                    "/port-and-host-and-status",
                    302,
                    "http://example.org:8083/port-and-host-and-status",
                ),
            ],
        ),
        (
            "httproute-redirect-path.yaml",
            &[
                (
                    "/original-prefix/lemon",
                    302,
                    "http://echo/replacement-prefix/lemon",
                ),
                (
                    "/full/path/original",
                    302,
                    "http://echo/full-path-replacement",
                ),
                (
                    "/path-and-host",
                    302,
                    "http://example.org/replacement-prefix",
                ),
                ("/path-and-status", 301, "http://echo/replacement-prefix"),
                (
                    "/full-path-and-host",
                    302,
                    "http://example.org/replacement-full",
                ),
                ("/full-path-and-status", 301, "http://echo/replacement-full"),
            ],
        ),
        (
            "httproute-303-redirect.yaml",
            &[("/redirect", 303, "http://echo/redirect")],
        ),
        (
            "httproute-307-redirect.yaml",
            &[("/temporary", 307, "http://echo/temporary")],
        ),
        (
            "httproute-308-redirect.yaml",
            &[("/permanent", 308, "http://echo/permanent")],
        ),
    ];
    for (file, expectations) in cases {
        m.apply(file);
        for (path, status, location) in expectations {
            let out = m.get(c, "echo", 80, "echo", path, &[]);
            expect(&out, *status, None, &format!("{file} {path}"));
            assert_eq!(
                out["first"]["headers"]["location"].as_str(),
                Some(*location),
                "{file} {path}: {out}"
            );
        }
    }
}

/// The header cases shared by the rule-level and the backend-level modifier tests.
fn header_modifier_cases(m: &Mesh, what: &str) {
    let c = &m.client;
    let check = |path: &str, send: &[&str], want: &[(&str, &str)], absent: &[&str]| {
        let out = m.get(c, "echo", 80, "echo", path, send);
        expect(&out, 200, Some("echo-v1"), &format!("{what} {path}"));
        for (k, v) in want {
            assert_eq!(
                request_header(&out, k),
                Some(*v),
                "{what} {path}: {k}: {out}"
            );
        }
        for k in absent {
            assert_eq!(
                request_header(&out, k),
                None,
                "{what} {path}: {k} absent: {out}"
            );
        }
    };
    check(
        "/set",
        &["Some-Other-Header: val"],
        &[
            ("Some-Other-Header", "val"),
            ("X-Header-Set", "set-overwrites-values"),
        ],
        &[],
    );
    check(
        "/set",
        &["Some-Other-Header: val", "X-Header-Set: some-other-value"],
        &[("X-Header-Set", "set-overwrites-values")],
        &[],
    );
    check(
        "/add",
        &["Some-Other-Header: val"],
        &[("X-Header-Add", "add-appends-values")],
        &[],
    );
    check(
        "/add",
        &["X-Header-Add: some-other-value"],
        &[("X-Header-Add", "some-other-value,add-appends-values")],
        &[],
    );
    check(
        "/remove",
        &["X-Header-Remove: val"],
        &[],
        &["X-Header-Remove"],
    );
    check(
        "/multiple",
        &[
            "X-Header-Set-2: set-val-2",
            "X-Header-Add-2: add-val-2",
            "X-Header-Remove-2: remove-val-2",
            "Another-Header: another-header-val",
        ],
        &[
            ("X-Header-Set-1", "header-set-1"),
            ("X-Header-Set-2", "header-set-2"),
            ("X-Header-Add-1", "header-add-1"),
            ("X-Header-Add-2", "add-val-2,header-add-2"),
            ("X-Header-Add-3", "header-add-3"),
            ("Another-Header", "another-header-val"),
        ],
        &["X-Header-Remove-1", "X-Header-Remove-2"],
    );
    check(
        "/case-insensitivity",
        &[
            "x-header-set: original-val-set",
            "x-header-add: original-val-add",
            "x-header-remove: original-val-remove",
            "Another-Header: another-header-val",
        ],
        &[
            ("X-Header-Set", "header-set"),
            ("X-Header-Add", "original-val-add,header-add"),
        ],
        &["x-header-remove"],
    );
}

#[test]
fn mesh_header_modifiers_rewrites_query_matches_and_named_rules() {
    let m = Mesh::start("gammaheaders");
    let c = &m.client;
    // 7 and 8: the same cases with the filters on the rule and under backendRefs.
    m.apply("httproute-request-header-modifier.yaml");
    header_modifier_cases(&m, "rule filters");
    m.apply("httproute-request-header-modifier-backend.yaml");
    header_modifier_cases(&m, "backendRef filters");

    // 9 MeshHTTPRouteRewritePath, with the path the backend received ([ours]).
    m.apply("httproute-rewrite-path.yaml");
    for (path, upstream) in [
        ("/prefix/one/two", "/one/two"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/full/one/two", "/one"),
    ] {
        let out = m.get(c, "echo", 80, "echo", path, &[]);
        expect(&out, 200, Some("echo-v1"), path);
        assert_eq!(
            out["first"]["body"]["path"].as_str(),
            Some(upstream),
            "{path}: {out}"
        );
    }
    let send = [
        "X-Header-Remove: remove-val",
        "X-Header-Add-Append: append-val-1",
        "X-Header-Set: set-val",
    ];
    for (path, upstream) in [
        ("/full/rewrite-path-and-modify-headers/test", "/test"),
        ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
    ] {
        let out = m.get(c, "echo", 80, "echo", path, &send);
        expect(&out, 200, Some("echo-v1"), path);
        assert_eq!(
            out["first"]["body"]["path"].as_str(),
            Some(upstream),
            "{path}: {out}"
        );
        assert_eq!(
            request_header(&out, "X-Header-Add"),
            Some("header-val-1"),
            "{out}"
        );
        assert_eq!(
            request_header(&out, "X-Header-Add-Append"),
            Some("append-val-1,header-val-2"),
            "{out}"
        );
        assert_eq!(
            request_header(&out, "X-Header-Set"),
            Some("set-overwrites-values"),
            "{out}"
        );
        assert_eq!(request_header(&out, "X-Header-Remove"), None, "{out}");
    }

    // 13 MeshHTTPRouteQueryParamMatching.
    m.apply("httproute-query-param-matching.yaml");
    for (path, headers, expect_backend) in [
        ("/?animal=whale", &[][..], Some("echo-v1")),
        ("/?animal=dolphin", &[][..], Some("echo-v2")),
        (
            "/?animal=whale&otherparam=irrelevant",
            &[][..],
            Some("echo-v1"),
        ),
        ("/?animal=dolphin&color=yellow", &[][..], Some("echo-v2")),
        ("/?color=blue", &[][..], None),
        ("/?animal=dog", &[][..], None),
        ("/?animal=whaledolphin", &[][..], None),
        ("/", &[][..], None),
        ("/path1?animal=whale", &[][..], Some("echo-v1")),
        ("/?animal=whale", &["version: one"][..], Some("echo-v2")),
        ("/path3?animal=shark", &[][..], Some("echo-v1")),
        (
            "/path4?animal=kraken",
            &["version: three"][..],
            Some("echo-v1"),
        ),
        ("/?animal=shark", &[][..], None),
        ("/path4?animal=kraken", &[][..], None),
        ("/path5?animal=hydra", &[][..], Some("echo-v1")),
    ] {
        let out = m.get(c, "echo", 80, "echo", path, headers);
        match expect_backend {
            Some(b) => expect(&out, 200, Some(b), &format!("{path} {headers:?}")),
            None => expect(&out, 404, None, &format!("{path} {headers:?}")),
        }
    }

    // 14 MeshHTTPRouteNamedRule.
    m.apply("httproute-named-rule.yaml");
    expect(
        &m.get(c, "echo", 80, "echo", "/named", &[]),
        200,
        Some("echo-v1"),
        "/named",
    );
    let out = m.get(c, "echo", 80, "echo", "/unnamed", &[]);
    expect(&out, 200, Some("echo-v2"), "/unnamed");
    assert_eq!(
        out["first"]["body"]["path"].as_str(),
        Some("/unnamed"),
        "{out}"
    );
}

#[test]
fn mesh_routes_bind_the_service_frontend_ports_and_consumers() {
    let m = Mesh::start("gammafront");
    let c = &m.client;
    let set_header = |out: &Value| {
        out["first"]["headers"]["x-header-set"]
            .as_str()
            .map(str::to_string)
    };

    // 16 MeshFrontend: the route binds the ClusterIP, never the pod's own address.
    m.apply("mesh-frontend.yaml");
    let out = m.get(c, "echo-v2", 80, "echo-v2", "/", &[]);
    expect(&out, 200, Some("echo-v2"), "echo-v2/");
    assert_eq!(set_header(&out).as_deref(), Some("set"), "{out}");
    let pod = m.v2_host.addr(8080).to_string();
    let out = c.pdtool(&[
        "http",
        "--to",
        &pod,
        "--host",
        &pod,
        "--count",
        &N.to_string(),
    ]);
    expect(&out, 200, Some("echo-v2"), "pod IP");
    assert_eq!(set_header(&out), None, "a pod IP is never routed: {out}");
    // 17 MeshFrontendHostname: the address dialled decides, not Host.
    let out = m.get(c, "echo-v2", 80, "echo-v1", "/", &[]);
    expect(&out, 200, Some("echo-v2"), "dial echo-v2, Host echo-v1");
    assert_eq!(set_header(&out).as_deref(), Some("set"), "{out}");
    let out = m.get(c, "echo-v1", 80, "echo-v2", "/", &[]);
    expect(&out, 200, Some("echo-v1"), "dial echo-v1, Host echo-v2");
    assert_eq!(set_header(&out), None, "{out}");

    // 18 MeshPorts: a parentRef port binds that port only.
    m.apply("mesh-ports.yaml");
    for (svc, port, backend, header) in [
        ("echo-v1", 80, "echo-v1", Some("v1")),
        ("echo-v1", 8080, "echo-v1", None),
        ("echo-v2", 80, "echo-v2", Some("v2")),
        ("echo-v2", 8080, "echo-v2", Some("v2")),
    ] {
        let out = m.get(c, svc, port, svc, "/", &[]);
        expect(&out, 200, Some(backend), &format!("{svc}:{port}"));
        assert_eq!(set_header(&out).as_deref(), header, "{svc}:{port}: {out}");
    }

    // 15 MeshConsumerRoute: the consumer namespace's route applies to its clients only.
    m.apply("mesh-consumer-route.yaml");
    let out = m.get(
        &m.consumer,
        "echo-v1",
        80,
        "echo-v1.gateway-conformance-mesh",
        "/",
        &[],
    );
    expect(&out, 200, Some("echo-v1"), "consumer client");
    assert_eq!(set_header(&out).as_deref(), Some("set"), "{out}");
    let out = m.get(
        c,
        "echo-v1",
        80,
        "echo-v1.gateway-conformance-mesh",
        "/",
        &[],
    );
    expect(&out, 200, Some("echo-v1"), "producer-namespace client");
    assert_eq!(set_header(&out), None, "{out}");
}

#[test]
fn mesh_grpc_route_header_modifiers() {
    let m = Mesh::start("gammagrpc");
    // 23 MeshGRPCRouteRequestHeaderModifier: rules match the x-test-case metadata.
    m.apply("grpcroute-request-header-modifier.yaml");
    let to = format!("{}:7070", cluster_ip("echo"));
    let call = |headers: &[&str]| -> Value {
        let mut args = vec![
            "h2",
            "--to",
            &to,
            "--authority",
            "echo:7070",
            "--path",
            "/proto.EchoTestService/Echo",
            "-H",
            "content-type: application/grpc",
            "--count",
            "20",
        ];
        for h in headers {
            args.push("-H");
            args.push(h);
        }
        m.client.pdtool(&args)
    };
    let check = |send: &[&str], backend: &str, want: &[(&str, &str)], absent: &[&str]| {
        let out = call(send);
        assert_eq!(out["statuses"]["200"], 20, "{send:?}: {out}");
        let servers = out["servers"].as_object().cloned().unwrap_or_default();
        assert!(
            servers.len() == 1 && servers.keys().all(|k| k.starts_with(backend)),
            "{send:?}: {out}"
        );
        for (k, v) in want {
            assert_eq!(
                out["first"]["headers"][*k].as_str(),
                Some(*v),
                "{send:?} {k}: {out}"
            );
        }
        for k in absent {
            assert!(
                out["first"]["headers"][*k].is_null(),
                "{send:?} {k} absent: {out}"
            );
        }
    };
    check(
        &[
            "x-test-case: set",
            "some-other-header: this-header-should-be-set",
            "x-header-set: this-value-should-be-overwritten",
        ],
        "echo-v1",
        &[
            ("some-other-header", "this-header-should-be-set"),
            ("x-header-set", "set-overwrites-values"),
        ],
        &[],
    );
    check(
        &[
            "x-test-case: add",
            "x-header-add: this-value-should-be-appended",
        ],
        "echo-v1",
        &[(
            "x-header-add",
            "this-value-should-be-appended,add-appends-values",
        )],
        &[],
    );
    check(
        &[
            "x-test-case: remove",
            "x-header-remove: this-should-be-removed",
        ],
        "echo-v1",
        &[],
        &["x-header-remove"],
    );
    check(
        &[
            "x-test-case: multi",
            "x-header-set-2: set-header-2",
            "x-header-add-2: add-header-2",
            "x-header-remove-2: should-be-removed-2",
        ],
        "echo-v2",
        &[
            ("x-header-set-1", "header-set-1"),
            ("x-header-set-2", "header-set-2"),
            ("x-header-add-1", "header-add-1"),
            ("x-header-add-2", "add-header-2,header-add-2"),
        ],
        &["x-header-remove-1", "x-header-remove-2"],
    );
}

#[test]
fn mesh_mirrors_timeouts_and_istio_metrics_apply_to_routes() {
    let m = Mesh::start("gammafilters");
    let c = &m.client;
    m.apply_text(
        "filters",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: filters
  namespace: {NS}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo, port: 80}}]
  rules:
  - matches: [{{path: {{value: /mirrored}}}}]
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {{name: echo-v2, port: 80}}
        fraction: {{numerator: 1, denominator: 2}}
    backendRefs: [{{name: echo-v1, port: 80}}]
  - matches: [{{path: {{value: /slow}}}}]
    timeouts: {{request: 200ms}}
    backendRefs: [{{name: echo-slow, port: 80}}]
  - matches: [{{path: {{value: /patient}}}}]
    timeouts: {{request: 2s}}
    backendRefs: [{{name: echo-slow, port: 80}}]
"
        ),
    );
    // RequestMirror with a fraction: 1/2 of 400 requests copied to echo-v2 (binomial:
    // 200 ± 10; 140–260 is 6 standard deviations), the primary always answered by v1.
    let before = m.hits[1].load(std::sync::atomic::Ordering::Relaxed);
    let to = format!("{}:80", cluster_ip("echo"));
    let out = c.pdtool(&[
        "http",
        "--to",
        &to,
        "--host",
        "echo",
        "--path",
        "/mirrored",
        "--count",
        "400",
    ]);
    assert_eq!(out["statuses"]["200"], 400, "{out}");
    assert_eq!(
        out["servers"].as_object().map(|s| s.len()),
        Some(1),
        "{out}"
    );
    let copies = wait_for(Duration::from_secs(5), || {
        let n = m.hits[1].load(std::sync::atomic::Ordering::Relaxed) - before;
        (n >= 140).then_some(n)
    })
    .unwrap_or_else(|| m.hits[1].load(std::sync::atomic::Ordering::Relaxed) - before);
    assert!(
        (140..=260).contains(&copies),
        "{copies} copies of 400 at 1/2"
    );

    // timeouts.request: 504 after 200 ms from a backend that takes 600 ms; 2 s waits.
    let out = m.get(c, "echo", 80, "echo", "/slow", &[]);
    expect(&out, 504, None, "request timeout");
    // Three are enough to show a 2 s timeout waits (each takes 600 ms).
    let out = c.pdtool(&[
        "http", "--to", &to, "--host", "echo", "--path", "/patient", "--count", "3",
    ]);
    assert_eq!(out["statuses"]["200"], 3, "under the timeout: {out}");
    assert_eq!(out["first"]["body"]["server"], "echo-slow", "{out}");

    // Istio's standard metrics name the backend the route chose, as for a VirtualService.
    let labels = [
        ("reporter", "source"),
        (
            "destination_service",
            "echo-v1.gateway-conformance-mesh.svc.cluster.local",
        ),
        ("destination_service_name", "echo-v1"),
        ("destination_service_namespace", NS),
        ("source_workload_namespace", NS),
        ("response_code", "200"),
    ];
    assert_eq!(m.daemon.metric_sum("istio_requests_total", &labels), 400.0);
    let labels = [
        ("destination_service_name", "echo-slow"),
        ("response_code", "504"),
        ("response_flags", "UT"),
    ];
    assert_eq!(
        m.daemon.metric_sum("istio_requests_total", &labels),
        N as f64
    );
}
