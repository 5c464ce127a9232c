//! AuthorizationPolicy enforced by the destination's node proxy: the identity (mutual TLS
//! over HBONE), method, path and port of each call decide, with the hostile case beside
//! the allowed one; denials look like Istio's (403 `RBAC: access denied`, a refused
//! connection), are reported (`response_flags="DENY"`, the deciding policy in the access
//! log and in `proxy_daemon_authorization_total`), and one namespace's policies never bind
//! another's workloads.
use std::time::Duration;

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml_on, Node, FIRST_NODE},
    servers::{HttpEcho, Servers},
    Pod,
};

const SERVICE: &str = "198.18.0.250";

struct Mesh {
    node: Node,
    _servers: Servers,
    web: Pod,
    spy: Pod,
    db: Pod,
    outsider: proxy_tests::Host,
    base: String,
}

/// `web` (shop/web) and `spy` (aaa/spy) call `db` (prod/db: HTTP echo on 8080 as port 80,
/// an identity server on 7000) through Service db.prod; `outsider` is a host outside the
/// mesh (plaintext).
fn mesh(tag: &str) -> Mesh {
    let mut node = Node::new(tag);
    let servers = Servers::new();
    let web = node.pod("shop", "web-0");
    let spy = node.pod("aaa", "spy-0");
    let db = node.pod("prod", "db-0");
    let outsider = node.host("outsider");
    servers.http_echo(
        &db.host,
        8080,
        HttpEcho {
            name: "db".into(),
            ..Default::default()
        },
    );
    let _ = servers.identity(&db.host, 7000);
    let base = namespace_yaml("shop", true, None)
        + &namespace_yaml("aaa", true, None)
        + &namespace_yaml("prod", true, None)
        + &pod_yaml_on(&web, &[("app", "web")], FIRST_NODE, "web")
        + &pod_yaml_on(&spy, &[("app", "spy")], FIRST_NODE, "spy")
        + &pod_yaml_on(&db, &[("app", "db")], FIRST_NODE, "db")
        + &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: db, namespace: prod}}
spec:
  clusterIP: {SERVICE}
  selector: {{app: db}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: tcp-ident, port: 7000}}
---
"
        );
    Mesh {
        node,
        _servers: servers,
        web,
        spy,
        db,
        outsider,
        base,
    }
}

impl Mesh {
    fn start(&self, policies: &str) -> Daemon {
        self.start_with(policies, &[])
    }

    fn start_with(&self, policies: &str, flags: &[&str]) -> Daemon {
        self.node
            .write_config("cluster.yaml", &(self.base.clone() + policies));
        let d = Daemon::start(&self.node, flags);
        for p in [&self.web, &self.spy] {
            d.wait_enrolled(&p.uid, Duration::from_secs(5));
        }
        d
    }

    /// Status and body of one request from `pod` to db.prod.
    fn call(pod: &Pod, path: &str, post: bool) -> (u64, String) {
        let to = format!("{SERVICE}:80");
        let mut args = vec!["http", "--to", &to, "--host", "db.prod", "--path", path];
        if post {
            args.extend(["--body-bytes", "10"]);
        }
        let out = pod.pdtool(&args);
        let first = &out["first"];
        (
            first["status"].as_u64().unwrap_or(0),
            match &first["body"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            },
        )
    }

    fn tcp_ok(pod: &Pod) -> bool {
        let to = format!("{SERVICE}:7000");
        let out = pod.pdtool(&["connect", "--to", &to, "--timeout-ms", "2000"]);
        out["result"] == "ok"
    }
}

const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-callers, namespace: prod}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]
    to: [{operation: {methods: [GET], paths: [\"/api/*\"]}}]
  - from: [{source: {namespaces: [shop]}}]
    to: [{operation: {ports: [\"7000\"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: prod}
spec:
  action: DENY
  rules:
  # The port keeps this rule to HTTP's port on a TCP connection, where its path is
  # ignored (Istio's rule for DENY: without it, it would refuse every TCP connection).
  - to: [{operation: {ports: [\"8080\"], paths: [\"/api/admin*\"]}}]
---
# A tenant's attempt to deny traffic to another namespace's workload: binds nothing there.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block-db, namespace: aaa}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules: [{}]
---
";

#[test]
fn identity_method_path_and_port_decide_over_mutual_tls_and_denials_look_like_istios() {
    let m = mesh("authz-mtls");
    let mut d = m.start(POLICIES);
    // The allowed caller, the allowed call.
    let (status, body) = Mesh::call(&m.web, "/api/items", false);
    assert_eq!(status, 200, "{body}");
    // The same caller: another method, a denied path, a path no rule allows.
    for (path, post) in [
        ("/api/items", true),
        ("/api/admin", false),
        ("/other", false),
    ] {
        let (status, body) = Mesh::call(&m.web, path, post);
        assert_eq!(
            (status, body.as_str()),
            (403, "RBAC: access denied"),
            "{path} post={post}"
        );
    }
    // Path normalization: a climb out of /api/ is not /api/.
    assert_eq!(Mesh::call(&m.web, "/api/../other", false).0, 403);
    // The wrong identity, the allowed request.
    assert_eq!(Mesh::call(&m.spy, "/api/items", false).0, 403);
    // TCP: the allowed namespace connects; the other is refused (HBONE CONNECT 401).
    assert!(Mesh::tcp_ok(&m.web));
    assert!(!Mesh::tcp_ok(&m.spy));
    // Reported as Istio's destination reports a denial, with the deciding policy.
    assert!(
        d.metric_sum(
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("response_code", "403"),
                ("response_flags", "DENY"),
                ("source_principal", "spiffe://cluster.local/ns/aaa/sa/spy"),
            ],
        ) >= 1.0
    );
    assert!(
        d.metric_sum(
            "proxy_daemon_authorization_total",
            &[
                ("policy", "prod.no-admin"),
                ("decision", "deny"),
                ("layer", "http")
            ],
        ) >= 1.0
    );
    assert!(
        d.metric_sum(
            "proxy_daemon_authorization_total",
            &[("policy", "prod.db-callers"), ("decision", "allow")],
        ) >= 2.0
    );
    assert!(
        d.metric_sum(
            "proxy_daemon_authorization_total",
            &[
                ("policy", "no_allow_policy_matched"),
                ("decision", "deny"),
                ("layer", "tcp")
            ],
        ) >= 1.0
    );
    assert!(
        d.metric_sum(
            "proxy_daemon_inbound_refused_total",
            &[("reason", "authorization")],
        ) >= 1.0
    );
    let log = d.log_text();
    assert!(
        log.contains("authorization_policy=prod.no-admin"),
        "access log names the deciding policy"
    );
    // The tenant's policy is in the snapshot but bound nothing of prod's.
    assert_eq!(
        d.metric_sum(
            "proxy_daemon_authorization_total",
            &[("policy", "aaa.block-db")],
        ),
        0.0
    );
    assert_eq!(d.terminate(), Some(0));
}

#[test]
fn plaintext_callers_are_judged_by_address_and_dry_run_policies_only_report() {
    let m = mesh("authz-plain");
    let outsider_ip = m.outsider.ip.to_string();
    let policies = format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: from-outsider
  namespace: prod
spec:
  selector: {{matchLabels: {{app: db}}}}
  rules:
  - from: [{{source: {{ipBlocks: [\"{outsider_ip}/32\"]}}}}]
    to: [{{operation: {{paths: [\"/public\"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: would-deny-all
  namespace: prod
  annotations: {{istio.io/dry-run: \"true\"}}
spec:
  action: DENY
  rules: [{{}}]
---
"
    );
    let mut d = m.start(&policies);
    let db = format!("{}:8080", m.db.host.ip);
    let get = |path: &str| -> u64 {
        let out = m
            .outsider
            .command(
                None,
                &proxy_tests::target_bin("pdtool"),
                &["http", "--to", &db, "--host", "db.prod", "--path", path],
            )
            .output()
            .expect("pdtool");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("pdtool JSON");
        v["first"]["status"].as_u64().unwrap_or(0)
    };
    // PERMISSIVE (no PeerAuthentication): plaintext arrives, and the policy judges it.
    assert_eq!(get("/public"), 200);
    assert_eq!(get("/private"), 403);
    // A mesh pod is not at the outsider's address: denied, though it has an identity.
    assert_eq!(Mesh::call(&m.web, "/public", false).0, 403);
    // The dry-run DENY matched every call and enforced nothing.
    assert!(
        d.metric_sum(
            "proxy_daemon_authorization_total",
            &[
                ("policy", "prod.would-deny-all"),
                ("decision", "dry_run_deny")
            ],
        ) >= 3.0
    );
    assert!(d
        .log_text()
        .contains("dry-run AuthorizationPolicy would deny"));
    assert_eq!(d.terminate(), Some(0));
}

/// A policy update closes open TCP connections it now denies (Istio's behaviour for L4),
/// and leaves those it still allows.
#[test]
fn a_policy_update_closes_the_open_connections_it_denies() {
    let m = mesh("authz-revoke");
    let mut d = m.start("");
    let to = format!("{SERVICE}:7000");
    let hold = |pod: &Pod| {
        pod.host
            .command(
                Some(&pod.app_cgroup()),
                &proxy_tests::target_bin("pdtool"),
                &["stall", "--to", &to, "--count", "3", "--ms", "5000"],
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("pdtool stall")
    };
    let (web, spy) = (hold(&m.web), hold(&m.spy));
    std::thread::sleep(Duration::from_millis(1500));
    m.node.write_config(
        "cluster.yaml",
        &(m.base.clone()
            + "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-shop, namespace: prod}
spec:
  rules:
  - from: [{source: {namespaces: [shop]}}]
---
"),
    );
    let read = |child: std::process::Child| -> serde_json::Value {
        let out = child.wait_with_output().expect("stall output");
        serde_json::from_slice(&out.stdout).expect("stall JSON")
    };
    let (web, spy) = (read(web), read(spy));
    assert_eq!(web["connected"], 3, "{web}");
    assert_eq!(
        web["still_open"], 3,
        "the allowed namespace keeps its connections: {web}"
    );
    assert_eq!(spy["connected"], 3, "{spy}");
    assert_eq!(spy["ended_by_peer"], 3, "the denied ones are closed: {spy}");
    assert!(
        d.metric_sum(
            "istio_tcp_connections_closed_total",
            &[("reporter", "destination"), ("response_flags", "DENY")],
        ) >= 3.0
    );
    assert_eq!(d.terminate(), Some(0));
}

/// A JWKS server on the node's loopback (the daemon fetches keys from its own network):
/// answers every GET with `body`, counting the requests.
fn jwks_server(
    body: String,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind JWKS server");
    let addr = listener.local_addr().expect("addr");
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(100) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (addr, hits)
}

fn test_token(name: &str) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/istio-security/jwt/tests_common_jwt_tokens.json"
    ))
    .expect("tokens");
    let v: serde_json::Value = serde_json::from_str(&text).expect("tokens JSON");
    v["tokens"]
        .as_array()
        .and_then(|l| l.iter().find(|t| t["name"] == name))
        .and_then(|t| t["token"].as_str())
        .expect("token")
        .to_string()
}

/// RequestAuthentication end to end: keys fetched once from a JWKS URI, a valid token's
/// principal allowed by AuthorizationPolicy and its claim handed to the app (the token
/// itself is not), an expired token refused with 401, no token refused by the policy
/// with 403, a path that needs no token open.
#[test]
fn jwt_principals_from_a_jwks_uri_decide_with_authorization_policy() {
    let m = mesh("authz-jwt");
    let jwks = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/istio-security/jwt/tests_common_jwt_jwks.json"
    ))
    .expect("JWKS");
    let (server, fetches) = jwks_server(jwks);
    let policies = format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: db-jwt, namespace: prod}}
spec:
  selector: {{matchLabels: {{app: db}}}}
  jwtRules:
  - issuer: test-issuer-1@istio.io
    jwksUri: http://{server}/jwks.json
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: db-users, namespace: prod}}
spec:
  selector: {{matchLabels: {{app: db}}}}
  rules:
  - from: [{{source: {{requestPrincipals: [test-issuer-1@istio.io/sub-1]}}}}]
    to: [{{operation: {{paths: [/secure]}}}}]
  - to: [{{operation: {{paths: [/open]}}}}]
---
"
    );
    let to = format!("{SERVICE}:80");
    let call = |path: &str, token: Option<&str>| -> serde_json::Value {
        let auth = token.map(|t| format!("Authorization: Bearer {}", test_token(t)));
        let mut args = vec!["http", "--to", &to, "--host", "db.prod", "--path", path];
        if let Some(a) = &auth {
            args.extend(["-H", a.as_str()]);
        }
        m.web.pdtool(&args)["first"].clone()
    };
    // A namespace's jwksUri on the node's loopback (where the kubelet's and the daemon's own
    // ports are): never fetched, its tokens refused, unless the operator allows it.
    let mut d = m.start(&policies);
    let refused = call("/secure", Some("TokenIssuer1"));
    assert_eq!(
        (refused["status"].as_u64(), refused["body"].as_str()),
        (Some(401), Some("Jwks remote fetch is failed")),
        "{refused}"
    );
    assert_eq!(
        fetches.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "never contacted"
    );
    assert!(
        d.log_text().contains("--jwks-allow-cidr"),
        "{}",
        d.log_text()
    );
    assert!(
        d.metric_sum(
            "proxy_daemon_jwt_rejected_total",
            &[("reason", "jwks_fetch")]
        ) >= 1.0,
        "{}",
        d.metrics_text()
    );
    assert_eq!(d.terminate(), Some(0));
    let mut d = m.start_with(&policies, &["--jwks-allow-cidr", "127.0.0.1/32"]);
    let ok = call("/secure", Some("TokenIssuer1"));
    assert_eq!(ok["status"], 200, "{ok}");
    let headers = &ok["body"]["headers"];
    assert_eq!(headers["x-jwt-sub"], "sub-1", "{ok}");
    assert!(
        headers.get("authorization").is_none(),
        "the token stays at the proxy: {ok}"
    );
    let expired = call("/secure", Some("TokenExpired"));
    assert_eq!(
        (expired["status"].as_u64(), expired["body"].as_str()),
        (Some(401), Some("Jwt is expired")),
        "{expired}"
    );
    assert_eq!(call("/secure", None)["status"], 403);
    assert_eq!(
        call("/secure", Some("TokenIssuer2"))["status"],
        401,
        "an issuer no rule names"
    );
    assert_eq!(call("/open", None)["status"], 200);
    assert_eq!(
        fetches.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the keys are fetched once and cached"
    );
    assert!(d.metric_sum("proxy_daemon_jwt_rejected_total", &[("reason", "expired")]) >= 1.0);
    assert_eq!(d.terminate(), Some(0));
}

/// Across two nodes over mutual TLS: node B's proxy decides for its pod with the
/// identities node A's pods proved, and both nodes report the denial as Istio's two
/// proxies would (403 at the source and the destination; a refused tunnel as DENY).
#[test]
fn across_nodes_the_destinations_node_decides_with_the_callers_proven_identity() {
    let mut node = Node::new("authz-2n");
    let servers = Servers::new();
    let b = node.second_node("node-b");
    let web = node.pod("shop", "web-0");
    let spy = node.pod("aaa", "spy-0");
    let db = node.pod_on(&b, "prod", "db-0");
    servers.http_echo(
        &db.host,
        8080,
        HttpEcho {
            name: "db".into(),
            ..Default::default()
        },
    );
    let _ = servers.identity(&db.host, 7000);
    let ca = proxy_tests::pki::TestCa::new("mesh-root");
    let (cert, key) = (
        node.work_dir.join("ca.pem"),
        node.work_dir.join("ca-key.pem"),
    );
    std::fs::write(&cert, &ca.cert_pem).unwrap();
    std::fs::write(&key, &ca.key_pem).unwrap();
    node.write_config(
        "cluster.yaml",
        &(namespace_yaml("shop", true, None)
            + &namespace_yaml("aaa", true, None)
            + &namespace_yaml("prod", true, None)
            + &pod_yaml_on(&web, &[("app", "web")], FIRST_NODE, "web")
            + &pod_yaml_on(&spy, &[("app", "spy")], FIRST_NODE, "spy")
            + &pod_yaml_on(&db, &[("app", "db")], &b.name, "db")
            + &format!(
                "apiVersion: v1
kind: Service
metadata: {{name: db, namespace: prod}}
spec:
  clusterIP: {SERVICE}
  selector: {{app: db}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: tcp-ident, port: 7000}}
---
"
            )
            + POLICIES),
    );
    let ca_flags = [
        "--ca-cert".to_string(),
        cert.display().to_string(),
        "--ca-key".to_string(),
        key.display().to_string(),
    ];
    let flags: Vec<&str> = ca_flags.iter().map(String::as_str).collect();
    let mut a = Daemon::start(&node, &flags);
    let mut b_flags = b.daemon_flags();
    b_flags.extend(ca_flags.iter().cloned());
    let b_flags: Vec<&str> = b_flags.iter().map(String::as_str).collect();
    let mut bd = Daemon::start(&node, &b_flags);
    for p in [&web, &spy] {
        a.wait_enrolled(&p.uid, Duration::from_secs(5));
    }
    bd.wait_enrolled(&db.uid, Duration::from_secs(5));
    assert_eq!(Mesh::call(&web, "/api/items", false).0, 200);
    let (status, body) = Mesh::call(&spy, "/api/items", false);
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(Mesh::call(&web, "/api/admin", false).0, 403);
    assert!(Mesh::tcp_ok(&web));
    assert!(!Mesh::tcp_ok(&spy));
    // Node B, the destination: the denial with the caller's proven identity.
    assert!(
        bd.metric_sum(
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("response_code", "403"),
                ("response_flags", "DENY"),
                ("source_principal", "spiffe://cluster.local/ns/aaa/sa/spy"),
                ("connection_security_policy", "mutual_tls"),
            ],
        ) >= 1.0
    );
    // The refused TCP connection, at the destination (the policy names HTTP fields, so
    // the tunnel opens and node B closes it once it sees the connection is not HTTP).
    assert!(
        bd.metric_sum(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("response_flags", "DENY"),
                ("source_principal", "spiffe://cluster.local/ns/aaa/sa/spy"),
            ],
        ) >= 1.0
    );
    // Node A, the source: the same request as the app saw it.
    assert!(
        a.metric_sum(
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("response_code", "403"),
                ("source_workload", "spy"),
            ],
        ) >= 1.0
    );
    assert_eq!(bd.terminate(), Some(0));
    assert_eq!(a.terminate(), Some(0));
}

/// An HTTP external authorizer on the node's loopback, as Istio's `samples/extauthz`
/// behaves: allows a request carrying `x-ext-authz: allow` (answering
/// `x-ext-authz-check-result: allowed`), denies the rest with 403, a body and
/// `x-ext-authz-check-result: denied`. Records the paths it was asked about.
fn ext_authz_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind ext_authz");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(200) {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split(' ').nth(1).unwrap_or("").to_string();
            let mut allow = false;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if h.to_ascii_lowercase().trim() == "x-ext-authz: allow" {
                    allow = true;
                }
            }
            record.lock().unwrap().push(path);
            let mut s = stream;
            let _ = if allow {
                write!(s, "HTTP/1.1 200 OK\r\nx-ext-authz-check-result: allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            } else {
                let body = "denied by ext_authz";
                write!(s, "HTTP/1.1 403 Forbidden\r\nx-ext-authz-check-result: denied\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
            };
        }
    });
    (addr, seen)
}

/// CUSTOM: the mesh config's HTTP authorizer decides the requests the policy matches
/// (under its path prefix, with the headers it asks for), passes its headers on as
/// configured, and is not asked about the others.
#[test]
fn custom_policies_ask_the_mesh_configs_external_authorizer() {
    let m = mesh("authz-ext");
    let (server, seen) = ext_authz_server();
    let mut d = m.start(&format!(
        "apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    extensionProviders:
    - name: sample-ext-authz-http
      envoyExtAuthzHttp:
        service: {ip}
        port: {port}
        pathPrefix: /check
        includeRequestHeadersInCheck: [x-ext-authz]
        headersToUpstreamOnAllow: [x-ext-authz-check-result]
        headersToDownstreamOnDeny: [x-ext-authz-check-result]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext-authz, namespace: prod}}
spec:
  selector: {{matchLabels: {{app: db}}}}
  action: CUSTOM
  provider: {{name: sample-ext-authz-http}}
  rules:
  - to: [{{operation: {{paths: [\"/guarded*\"]}}}}]
---
",
        ip = server.ip(),
        port = server.port()
    ));
    let to = format!("{SERVICE}:80");
    let call = |path: &str, allow: bool| -> serde_json::Value {
        let mut args = vec!["http", "--to", &to, "--host", "db.prod", "--path", path];
        if allow {
            args.extend(["-H", "x-ext-authz: allow"]);
        }
        m.web.pdtool(&args)["first"].clone()
    };
    let allowed = call("/guarded/a", true);
    assert_eq!(allowed["status"], 200, "{allowed}");
    assert_eq!(
        allowed["body"]["headers"]["x-ext-authz-check-result"], "allowed",
        "the authorizer's header reaches the app: {allowed}"
    );
    let denied = call("/guarded/a", false);
    assert_eq!(denied["status"], 403, "{denied}");
    assert_eq!(denied["body"], "denied by ext_authz", "{denied}");
    assert_eq!(
        denied["headers"]["x-ext-authz-check-result"], "denied",
        "{denied}"
    );
    assert_eq!(call("/open", false)["status"], 200);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            "/check/guarded/a".to_string(),
            "/check/guarded/a".to_string()
        ],
        "asked about the matching requests only, under the prefix"
    );
    assert!(
        d.metric_sum(
            "istio_requests_total",
            &[("reporter", "destination"), ("response_flags", "UAEX")],
        ) >= 1.0
    );
    assert!(
        d.metric_sum(
            "proxy_daemon_authorization_total",
            &[("policy", "prod.ext-authz"), ("decision", "custom_deny")],
        ) >= 1.0
    );
    assert_eq!(d.terminate(), Some(0));
}

/// Istio's integration cases for the field families the other tests do not reach, through
/// the node: `when` conditions (a request header, the source namespace), serviceAccounts,
/// notMethods, and an AUDIT policy that marks without blocking.
#[test]
fn conditions_service_accounts_not_methods_and_audit_through_the_node() {
    let m = mesh("authz-when");
    let mut d = m.start(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-when, namespace: prod}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - to: [{operation: {paths: [/request-headers]}}]
    when: [{key: \"request.headers[x-foo]\", values: [foo]}]
  - to: [{operation: {paths: [/source-namespace]}}]
    when: [{key: source.namespace, values: [shop]}]
  - from: [{source: {serviceAccounts: [shop/web]}}]
    to: [{operation: {paths: [/by-account], notMethods: [PUT, POST]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-audit, namespace: prod}
spec:
  action: AUDIT
  rules:
  - to: [{operation: {paths: [/request-headers]}}]
---
",
    );
    let to = format!("{SERVICE}:80");
    let call = |pod: &Pod, path: &str, header: Option<&str>, post: bool| -> u64 {
        let mut args = vec!["http", "--to", &to, "--host", "db.prod", "--path", path];
        if let Some(h) = header {
            args.extend(["-H", h]);
        }
        if post {
            args.extend(["--body-bytes", "4"]);
        }
        pod.pdtool(&args)["first"]["status"].as_u64().unwrap_or(0)
    };
    assert_eq!(
        call(&m.web, "/request-headers", Some("x-foo: foo"), false),
        200
    );
    assert_eq!(
        call(&m.web, "/request-headers", Some("x-foo: bar"), false),
        403
    );
    assert_eq!(call(&m.web, "/request-headers", None, false), 403);
    assert_eq!(call(&m.web, "/source-namespace", None, false), 200);
    assert_eq!(call(&m.spy, "/source-namespace", None, false), 403);
    assert_eq!(call(&m.web, "/by-account", None, false), 200);
    assert_eq!(
        call(&m.web, "/by-account", None, true),
        403,
        "POST is a notMethod"
    );
    assert_eq!(
        call(&m.spy, "/by-account", None, false),
        403,
        "another account"
    );
    // AUDIT marked the three /request-headers calls and blocked none of them.
    assert_eq!(
        d.metric_sum(
            "proxy_daemon_authorization_total",
            &[("policy", "prod.db-audit"), ("decision", "audit")],
        ),
        3.0
    );
    assert_eq!(d.terminate(), Some(0));
}
