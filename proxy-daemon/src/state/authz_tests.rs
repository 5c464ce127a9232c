//! AuthorizationPolicy semantics against Istio's own test data (tests/fixtures/istio-security).
use super::*;

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/istio-security"
);

fn parse(yaml: &str, default_ns: &str) -> (Vec<Located<Object>>, Vec<ConfigError>) {
    crate::testing::parse_yaml(yaml, default_ns)
}

fn table(yaml: &str, default_ns: &str) -> Authorization {
    let (objects, mut errors) = parse(yaml, default_ns);
    let t = build(&objects, "istio-system", &mut errors);
    let errs: Vec<_> = errors.iter().filter(|e| e.is_error()).collect();
    assert!(errs.is_empty(), "{errs:?}");
    t
}

/// The upstream suite's template values: service `b` in `ns1`, allowed caller `a` in
/// `ns1` (10.0.1.1), denied caller `a` in `ns2` (10.0.2.1), `b` at 10.0.0.2.
fn substitute(template: &str) -> String {
    let values = [
        ("( .To.PortForName `http` ).WorkloadPort", "18080"),
        ("(.To.PortForName `http`).WorkloadPort", "18080"),
        ("(.To.PortForName `http2`).WorkloadPort", "18085"),
        ("(.To.PortForName `grpc`).WorkloadPort", "17070"),
        ("(.To.PortForName `tcp`).WorkloadPort", "19090"),
        (
            ".Allowed.MustWorkloads.Addresses | toJson",
            "[\"10.0.1.1\"]",
        ),
        (".Denied.MustWorkloads.Addresses | toJson", "[\"10.0.2.1\"]"),
        (".To.MustWorkloads.Addresses | toJson", "[\"10.0.0.2\"]"),
        (".Allowed.NamespaceName", "ns1"),
        (".Denied.NamespaceName", "ns2"),
        (".Allowed.NamespacedName", "ns1/a"),
        (".Allowed.SpiffeIdentity", "cluster.local/ns/ns1/sa/a"),
        (".Denied.SpiffeIdentity", "cluster.local/ns/ns2/sa/a"),
        (".JWTServer.JwksURI", "http://jwt.example/jwks"),
        (".Namespace.Prefix", "ns1"),
        (".To.Config.Namespace.Prefix", "ns1"),
        (".To.ClusterLocalFQDN", "b.ns1.svc.cluster.local"),
        (".To.NamespaceName", "ns1"),
        (".To.ServiceName", "b"),
    ];
    let mut out = template.to_string();
    for (expr, value) in values {
        out = out.replace(&format!("{{{{ {expr} }}}}"), value);
    }
    assert!(!out.contains("{{"), "unsubstituted: {out}");
    out
}

fn integration(name: &str) -> Authorization {
    let path = format!("{FIXTURES}/integration/authz/{name}.yaml.tmpl");
    let text = std::fs::read_to_string(&path).expect("fixture");
    table(&substitute(&text), "ns1")
}

fn identity(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

/// A request to `b` (10.0.0.2, labels app=b, namespace ns1) on `port`.
struct Call<'a> {
    from: Option<Identity>,
    ip: &'a str,
    port: u16,
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    http: bool,
    auth: Option<RequestAuth>,
}

impl<'a> Call<'a> {
    fn get(path: &'a str) -> Self {
        Call {
            from: Some(identity("ns1", "a")),
            ip: "10.0.1.1",
            port: 18080,
            method: "GET",
            path,
            headers: Vec::new(),
            http: true,
            auth: None,
        }
    }

    fn denied_caller(mut self) -> Self {
        self.from = Some(identity("ns2", "a"));
        self.ip = "10.0.2.1";
        self
    }

    fn tcp(mut self) -> Self {
        self.http = false;
        self
    }

    fn decide(&self, t: &Authorization) -> Decision {
        self.decide_for(t, "ns1", &[("app", "b")])
    }

    fn decide_for(&self, t: &Authorization, ns: &str, labels: &[(&str, &str)]) -> Decision {
        let labels: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let policies = t.for_target(&Target {
            namespace: ns,
            labels: &labels,
            service: Some("b.ns1.svc.cluster.local"),
        });
        let mut headers = http::HeaderMap::new();
        for (k, v) in &self.headers {
            headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let path = normalize_path(self.path);
        let attrs = Attributes {
            peer: self.from.as_ref(),
            source_ip: Some(self.ip.parse().unwrap()),
            destination: Some(SocketAddr::new("10.0.0.2".parse().unwrap(), self.port)),
            sni: None,
            http: self.http.then(|| HttpAttributes {
                method: self.method,
                host: "b.ns1.svc.cluster.local",
                path: &path,
                headers: &headers,
            }),
            request_auth: self.auth.as_ref(),
        };
        decide(&policies, &attrs)
    }

    fn allowed(&self, t: &Authorization) -> bool {
        !self.decide(t).denied()
    }
}

#[test]
fn path_templates_match_as_istios_integration_suite_expects() {
    let t = integration("path-templating");
    for p in [
        "/allow/admin/",
        "/allow/admin/temp",
        "/allow/admin/temp.txt",
        "/allow/admin/foo/temp.txt",
        "/foo/buzz/bar/bat.txt",
        "/foo/buzz/bar/bat.temp.txt",
        "/foo/buzz/bar/bat/fuzz.txt",
        "/foo/buzz/bar/bat",
        "/store//cart",
        "/store/foo/cart",
        "/store/foo/bar/cart",
    ] {
        assert!(Call::get(p).allowed(&t), "{p} should be allowed");
    }
    for p in [
        "/allow/admin",
        "/allow/user/",
        "/allow/admin?param=value",
        "/allow",
        "/foo/bar/bat.txt",
        "/foo//bar/bat.txt",
        "/store/cart",
    ] {
        assert!(!Call::get(p).allowed(&t), "{p} should be denied");
    }
}

#[test]
fn paths_are_normalized_before_matching() {
    let t = integration("path-normalization");
    for p in ["/public", "/public/../public"] {
        assert!(Call::get(p).allowed(&t), "{p} should be allowed");
    }
    for p in [
        "/private",
        "/public/../private",
        "/public/./../private",
        "/public/.././private",
        "/public/%2E%2E/private",
        "/public/%2e%2e/private",
        "/public/%2E/%2E%2E/private",
        "/public/%2e/%2e%2e/private",
        "/public/%2E%2E/%2E/private",
        "/public/%2e%2e/%2e/private",
    ] {
        assert!(!Call::get(p).allowed(&t), "{p} should be denied");
    }
}

#[test]
fn principal_service_account_and_namespace_allow_only_their_caller() {
    for name in ["allow-principal", "allow-serviceaccount", "allow-namespace"] {
        let t = integration(name);
        for p in ["/allow", "/allow?param=value"] {
            assert!(Call::get(p).allowed(&t), "{name}: {p}");
            assert!(!Call::get(p).denied_caller().allowed(&t), "{name}: {p}");
        }
        assert!(!Call::get("/deny").allowed(&t), "{name}");
        let mut tcp = Call::get("/").tcp();
        tcp.port = 19090;
        assert!(tcp.allowed(&t), "{name}: tcp");
        assert!(!tcp.denied_caller().allowed(&t), "{name}: tcp");
    }
}

#[test]
fn deny_policies_win_and_the_root_namespaces_bind_every_workload() {
    let mut text = std::fs::read_to_string(format!(
        "{FIXTURES}/integration/authz/deny-principal.yaml.tmpl"
    ))
    .unwrap();
    text.push_str("\n---\n");
    text.push_str(
        &std::fs::read_to_string(format!(
            "{FIXTURES}/integration/authz/deny-global.yaml.tmpl"
        ))
        .unwrap()
        .replace("{{ .Namespace.Prefix }}", "istio-system"),
    );
    let t = table(&substitute(&text), "ns1");
    for p in ["/deny", "/deny?param=value"] {
        assert!(!Call::get(p).denied_caller().allowed(&t), "{p}");
        assert!(Call::get(p).allowed(&t), "{p}");
    }
    for p in [
        "/deny/allow",
        "/allow",
        "/allow?param=value",
        "/global-deny/allow",
    ] {
        assert!(Call::get(p).allowed(&t), "{p}");
        assert!(Call::get(p).denied_caller().allowed(&t), "{p}");
    }
    for p in ["/global-deny", "/global-deny?param=value"] {
        assert!(!Call::get(p).allowed(&t), "{p}");
    }
    let mut tcp = Call::get("/").tcp().denied_caller();
    tcp.port = 19090;
    assert!(!tcp.allowed(&t));
}

#[test]
fn conditions_on_headers_sources_and_destination() {
    let t = integration("conditions");
    let with_header = |path, v| {
        let mut c = Call::get(path);
        c.headers.push(("x-foo", v));
        c
    };
    assert!(with_header("/request-headers", "foo").allowed(&t));
    assert!(!with_header("/request-headers", "bar").allowed(&t));
    assert!(!Call::get("/request-headers").allowed(&t));
    assert!(with_header("/request-headers-notValues", "foo").allowed(&t));
    assert!(!with_header("/request-headers-notValues", "bar").allowed(&t));
    for p in [
        "/source-ip",
        "/source-ip-notValues",
        "/source-namespace",
        "/source-namespace-notValues",
        "/source-principal",
        "/source-principal-notValues",
    ] {
        assert!(Call::get(p).allowed(&t), "{p}");
        assert!(!Call::get(p).denied_caller().allowed(&t), "{p}");
    }
    for p in [
        "/source-trust-domain",
        "/source-trust-domain-notValues",
        "/destination-ip-good",
        "/destination-port-good",
    ] {
        assert!(Call::get(p).allowed(&t), "{p}");
    }
    for p in [
        "/destination-ip-bad",
        "/destination-ip-notValues",
        "/destination-port-bad",
        "/destination-port-notValues",
        "/other",
    ] {
        assert!(!Call::get(p).allowed(&t), "{p}");
    }
}

#[test]
fn not_method_not_port_and_not_namespace() {
    let t = integration("not-method");
    assert!(Call::get("/").allowed(&t));
    let mut put = Call::get("/");
    put.method = "PUT";
    assert!(!put.allowed(&t));
    let t = integration("not-port");
    assert!(Call::get("/").allowed(&t));
    let mut h2 = Call::get("/");
    h2.port = 18085;
    assert!(!h2.allowed(&t));
    let t = integration("not-namespace");
    assert!(Call::get("/").allowed(&t));
    assert!(!Call::get("/").denied_caller().allowed(&t));
}

#[test]
fn a_policy_without_a_peer_identity_rule_denies_plaintext() {
    let t = integration("plaintext");
    assert!(Call::get("/").allowed(&t));
    let mut plain = Call::get("/");
    plain.from = None;
    assert!(!plain.allowed(&t));
    assert!(!plain.tcp().allowed(&t));
}

#[test]
fn path_precedence_deny_before_allow() {
    let t = integration("path-precedence");
    assert!(!Call::get("/allow/admin").allowed(&t));
    assert!(!Call::get("/allow/admin?param=value").allowed(&t));
    assert!(Call::get("/allow").allowed(&t));
    assert!(Call::get("/allow?param=value").allowed(&t));
}

#[test]
fn workload_selectors_namespaces_and_the_root_namespace_scope_policies() {
    let mut objects = Vec::new();
    for (f, ns) in [
        ("workload", "ns1"),
        ("workload-bad", "ns1"),
        ("workload-ns", "ns1"),
        ("workload-ns", "ns2"),
        ("workload-system-ns", "istio-system"),
    ] {
        let text = std::fs::read_to_string(format!("{FIXTURES}/integration/authz/{f}.yaml.tmpl"))
            .unwrap()
            .replace("{{ .Namespace.Prefix }}", ns)
            .replace("{{ .To.Config.Namespace.Prefix }}", ns);
        let (o, errors) = parse(&substitute(&text), ns);
        assert!(errors.is_empty(), "{errors:?}");
        objects.extend(o);
    }
    let mut errors = Vec::new();
    let t = build(&objects, "istio-system", &mut errors);
    assert!(errors.iter().all(|e| !e.is_error()), "{errors:?}");
    let at = |path: &str, labels: &[(&str, &str)]| {
        !Call::get(path).decide_for(&t, "ns1", labels).denied()
    };
    let b = [("app", "b")];
    assert!(at("/policy-ns1-b", &b));
    assert!(at("/policy-system-b", &b));
    assert!(at("/policy-ns1-all", &b));
    assert!(
        !at("/policy-ns2-all", &b),
        "another namespace's policy binds nothing here"
    );
    assert!(!at("/policy-ns1-b-bad", &b));
    assert!(at("/policy-ns1-b-bad", &[("app", "b"), ("foo", "bla")]));
    assert!(!at("/policy-ns1-c", &b));
    assert!(!at("/policy-system-c", &b));
}

#[test]
fn on_tcp_allow_rules_with_http_fields_never_match_and_deny_rules_match_more() {
    let dir = format!("{FIXTURES}/authz-builder/tcp");
    let load = |f: &str| {
        table(
            &std::fs::read_to_string(format!("{dir}/{f}")).unwrap(),
            "foo",
        )
    };
    let at_foo = |t: &Authorization, c: &Call| {
        c.decide_for(t, "foo", &[("app", "httpbin"), ("version", "v1")])
    };
    // Every rule names an HTTP field: no TCP connection is allowed.
    let t = load("allow-only-http-in.yaml");
    assert!(at_foo(&t, &Call::get("/").tcp()).denied());
    // A DENY rule with only HTTP fields denies every TCP connection.
    let t = load("deny-both-http-tcp-in.yaml");
    assert!(at_foo(&t, &Call::get("/").tcp()).denied());
}

#[test]
fn no_rules_allow_nothing_an_empty_rule_allows_all_and_dry_run_only_reports() {
    let policy = |spec: &str, annotations: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: ns1\n{annotations}spec:\n{spec}")
    };
    let nothing = table(&policy("  selector: {matchLabels: {app: b}}\n", ""), "ns1");
    assert!(!Call::get("/").allowed(&nothing));
    assert_eq!(
        Call::get("/").decide(&nothing).policy(),
        "no_allow_policy_matched"
    );
    let all = table(&policy("  rules: [{}]\n", ""), "ns1");
    assert!(Call::get("/").denied_caller().allowed(&all));
    let dry = table(
        &policy(
            "  action: DENY\n  rules: [{}]\n",
            "  annotations: {istio.io/dry-run: \"true\"}\n",
        ),
        "ns1",
    );
    let d = Call::get("/").decide(&dry);
    assert!(!d.denied());
    assert_eq!(d.dry_run, vec![("ns1.p".to_string(), true)]);
    let deny = table(&policy("  action: DENY\n  rules: [{}]\n", ""), "ns1");
    assert_eq!(Call::get("/").decide(&deny).policy(), "ns1.p");
    // Another namespace's workloads are not bound by it.
    assert!(!Call::get("/")
        .decide_for(&deny, "ns2", &[("app", "b")])
        .denied());
}

/// Every policy Istio's tests use parses and validates; every invalid one is refused with
/// Istio's reason.
#[test]
fn istios_policies_validate_as_istio_says() {
    let mut files = Vec::new();
    for dir in ["authz-builder/http", "authz-builder/tcp", "ambient-ztunnel"] {
        for e in std::fs::read_dir(format!("{FIXTURES}/{dir}")).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.ends_with("-in.yaml") && !name.starts_with("peer-authn") {
                files.push(p);
            }
        }
    }
    files.push(format!("{FIXTURES}/crd-validation/authz-valid.yaml").into());
    assert!(files.len() > 30, "{}", files.len());
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let (objects, mut errors) = parse(&text, "foo");
        build(&objects, "istio-system", &mut errors);
        let errs: Vec<_> = errors.iter().filter(|e| e.is_error()).collect();
        assert!(errs.is_empty(), "{}: {errs:?}", f.display());
    }
    let text =
        std::fs::read_to_string(format!("{FIXTURES}/crd-validation/authz-invalid.yaml")).unwrap();
    for doc in text.split("\n---\n") {
        let want = doc
            .lines()
            .find_map(|l| l.strip_prefix("_err: "))
            .expect("_err")
            .to_string();
        let doc: String = doc
            .lines()
            .filter(|l| !l.starts_with("_err:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let (objects, mut errors) = parse(&doc, "foo");
        build(&objects, "istio-system", &mut errors);
        assert!(
            errors
                .iter()
                .any(|e| e.is_error() && e.message.contains(&want) && e.line > 1),
            "{want}: {errors:?}"
        );
    }
}

/// The fields the integration cases do not reach, each with the call it lets in beside
/// the one it keeps out.
#[test]
fn remote_ip_blocks_trust_domains_hosts_and_absent_attributes() {
    let policy = |rules: &str| {
        table(
            &format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: ns1}}\nspec:\n  rules:\n{rules}"
            ),
            "ns1",
        )
    };
    let t = policy("  - from: [{source: {remoteIpBlocks: [10.0.1.0/24]}}]\n");
    assert!(Call::get("/").allowed(&t));
    assert!(!Call::get("/").denied_caller().allowed(&t));
    let t = policy("  - from: [{source: {notTrustDomains: [cluster.local]}}]\n");
    assert!(!Call::get("/").allowed(&t));
    let t = policy("  - from: [{source: {trustDomains: [cluster.local]}}]\n");
    assert!(Call::get("/").allowed(&t));
    let t = policy("  - to: [{operation: {hosts: [\"B.NS1.svc.cluster.local\"]}}]\n");
    assert!(
        Call::get("/").allowed(&t),
        "hosts compare case-insensitively"
    );
    let t = policy("  - to: [{operation: {hosts: [other.example]}}]\n");
    assert!(!Call::get("/").allowed(&t));
    // No SNI and no Envoy metadata here: values never match, notValues always do.
    let t = policy("  - when: [{key: connection.sni, values: [\"*\"]}]\n");
    assert!(!Call::get("/").allowed(&t));
    let t = policy("  - when: [{key: connection.sni, notValues: [x]}]\n");
    assert!(Call::get("/").allowed(&t));
    let t = policy("  - when: [{key: \"experimental.envoy.filters.a.b[c]\", values: [x]}]\n");
    assert!(!Call::get("/").allowed(&t));
    // Without a verified JWT there is no request principal.
    let t = policy("  - from: [{source: {requestPrincipals: [\"*\"]}}]\n");
    assert!(!Call::get("/").allowed(&t));
}
