//! Gateway API mesh routes in process: what the upstream corpus leaves out (precedence
//! across several routes, GRPCRoute over HTTPRoute, living with VirtualServices, tenants'
//! routes, unresolvable backends) and the CRD's validation rules, each with its line.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use crate::{
    config::{k8s::Pod, ConfigError, Object, Severity},
    proxy::{
        dns::DnsCache,
        http_route::{decide, HttpDecision, RequestView},
        Endpoints, OutboundPolicy,
    },
    state::{workload::WorkloadInfo, CaptureSettings, Snapshot},
};

const ECHO: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const ECHO_V1: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

/// Namespaces `mesh` (the Services) and `team-a`/`team-b` (clients), Services `echo`,
/// `echo-v1`, `echo-v2` (port 80 → 8080 and `grpc` 7070), their pods, and `extra`.
fn world(extra: &str) -> (Snapshot, Vec<ConfigError>, Vec<Pod>) {
    let yaml = base_yaml() + extra;
    compile_world(&yaml)
}

fn base_yaml() -> String {
    let mut yaml = String::new();
    for ns in ["mesh", "team-a", "team-b"] {
        yaml += &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n");
    }
    for (name, ip, sel) in [
        ("echo", ECHO, "{app: echo}"),
        ("echo-v1", ECHO_V1, "{app: echo, version: v1}"),
        (
            "echo-v2",
            Ipv4Addr::new(10, 96, 0, 12),
            "{app: echo, version: v2}",
        ),
    ] {
        yaml += &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: mesh}}
spec:
  clusterIP: {ip}
  selector: {sel}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: grpc, port: 7070}}
---
"
        );
    }
    for (pod, ns, labels, ip) in [
        ("echo-v1-a", "mesh", "{app: echo, version: v1}", "10.0.0.11"),
        ("echo-v2-a", "mesh", "{app: echo, version: v2}", "10.0.0.12"),
        ("client-a", "team-a", "{app: client}", "10.0.1.1"),
        ("client-b", "team-b", "{app: client}", "10.0.2.1"),
        ("client-m", "mesh", "{app: client}", "10.0.3.1"),
    ] {
        yaml += &format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: {ns}, uid: {pod}, labels: {labels}}}
spec: {{containers: [{{name: app}}]}}
status: {{phase: Running, podIP: {ip}}}
---
"
        );
    }
    yaml
}

fn compile_world(yaml: &str) -> (Snapshot, Vec<ConfigError>, Vec<Pod>) {
    let (objects, mut findings) = crate::testing::parse_yaml(yaml, "default");
    let pods = objects
        .iter()
        .filter_map(|o| match &o.value {
            Object::Pod(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    let settings = CaptureSettings {
        label_key: crate::state::CAPTURE_LABEL_KEY.into(),
        label_value: "enabled".into(),
        node_name: "n1".into(),
        default_fail_mode: proxy_common::FailMode::Open,
        default_export_to: Vec::new(),
        trust_domain: "cluster.local".into(),
    };
    match crate::state::compile(&objects, &settings, 1) {
        Ok(snap) => {
            findings.extend(snap.diagnostics.iter().cloned());
            (snap, findings, pods)
        }
        Err(errors) => {
            findings.extend(errors);
            (Snapshot::default(), findings, pods)
        }
    }
}

fn errors(findings: &[ConfigError]) -> Vec<String> {
    findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(ToString::to_string)
        .collect()
}

/// What a request gets: the destination service it goes to, or the status answered.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    To(String),
    Status(u16, Option<String>),
}

fn to(short: &str) -> Got {
    Got::To(format!("{short}.mesh.svc.cluster.local"))
}

struct Ask<'a> {
    snap: &'a Snapshot,
    pods: &'a [Pod],
}

impl Ask<'_> {
    fn get(&self, client: &str, dst: (Ipv4Addr, u16), path: &str, headers: &[(&str, &str)]) -> Got {
        match self.decide(client, dst, path, headers) {
            HttpDecision::Forward { labels, .. } => Got::To(labels.service),
            HttpDecision::Respond {
                status, location, ..
            } => Got::Status(status, location),
        }
    }

    fn decide(
        &self,
        client: &str,
        dst: (Ipv4Addr, u16),
        path: &str,
        headers: &[(&str, &str)],
    ) -> HttpDecision {
        let pod = self
            .pods
            .iter()
            .find(|p| p.metadata.name == client)
            .expect("a client pod");
        let src = WorkloadInfo::from_pod(pod);
        let eps = Endpoints::new(Arc::new(DnsCache::new(&[], None).expect("dns")));
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                http::HeaderValue::from_str(v).expect("value"),
            );
        }
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let scope = crate::state::workload::SourceLabels::of(&src);
        let req = RequestView {
            method: "GET",
            path,
            query,
            authority: "echo",
            headers: &map,
            dst: SocketAddrV4::new(dst.0, dst.1),
            avoid: &[],
            scope: &scope,
        };
        decide(self.snap, &eps, &src, &req, OutboundPolicy::AllowAny, 0)
    }
}

fn http_route(name: &str, ns: &str, created: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{created}'}}
spec:
  parentRefs: [{parent}]
  rules:
{rules}
---
"
    )
}

const ECHO_PARENT: &str = "{group: '', kind: Service, name: echo, namespace: mesh, port: 80}";

#[test]
fn rules_of_several_routes_merge_in_the_specs_precedence() {
    // Same match in two routes: the older route wins whatever the order read; an exact
    // path beats any prefix; a method beats more headers; headers beat query params.
    let yaml = http_route(
        "newer",
        "mesh",
        "2026-02-01T00:00:00Z",
        ECHO_PARENT,
        "  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /api/x}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {value: /m}, headers: [{name: a, value: '1'}, {name: b, value: '2'}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {value: /q}, queryParams: [{name: k, value: v}]}]
    backendRefs: [{name: echo-v2, port: 80}]",
    ) + &http_route(
        "older",
        "mesh",
        "2026-01-01T00:00:00Z",
        ECHO_PARENT,
        "  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/x/y}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {value: /m}, method: GET, headers: [{name: a, value: '1'}]}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {value: /q}, headers: [{name: h, value: x}]}]
    backendRefs: [{name: echo-v1, port: 80}]",
    );
    let (snap, findings, pods) = world(&yaml);
    assert!(errors(&findings).is_empty(), "{findings:?}");
    let ask = Ask {
        snap: &snap,
        pods: &pods,
    };
    let get = |path: &str, h: &[(&str, &str)]| ask.get("client-a", (ECHO, 80), path, h);
    assert_eq!(
        get("/api/z", &[]),
        to("echo-v1"),
        "equal prefixes: the older route"
    );
    assert_eq!(get("/api/x", &[]), to("echo-v2"), "exact beats prefix");
    assert_eq!(get("/api/x/y/z", &[]), to("echo-v1"), "the longest prefix");
    assert_eq!(
        get("/apix", &[]),
        Got::Status(404, None),
        "whole segments only"
    );
    assert_eq!(
        get("/m", &[("a", "1"), ("b", "2")]),
        to("echo-v1"),
        "a method match beats two header matches"
    );
    assert_eq!(
        get("/q?k=v", &[("h", "x")]),
        to("echo-v1"),
        "a header match beats a query match"
    );
    assert_eq!(get("/q?k=v", &[]), to("echo-v2"));
    // A pod IP is never routed by a route: forwarded as dialled (named by its Host), not
    // answered 404 by the rules bound to the Service.
    assert_eq!(
        ask.get(
            "client-a",
            (Ipv4Addr::new(10, 0, 0, 11), 8080),
            "/nothing",
            &[]
        ),
        Got::To("echo".into()),
    );
}

#[test]
fn consumer_routes_replace_producer_routes_for_their_own_namespace_only() {
    let parent = "{group: '', kind: Service, name: echo-v1, namespace: mesh}";
    let yaml = http_route(
        "producer",
        "mesh",
        "2026-01-01T00:00:00Z",
        parent,
        "  - backendRefs: [{name: echo-v1, port: 80}]",
    ) + &http_route(
        "steal",
        "team-b",
        "2025-01-01T00:00:00Z",
        parent,
        "  - backendRefs: [{name: echo-v2, namespace: mesh, port: 80}]",
    );
    let (snap, findings, pods) = world(&yaml);
    assert!(errors(&findings).is_empty(), "{findings:?}");
    let ask = Ask {
        snap: &snap,
        pods: &pods,
    };
    assert_eq!(ask.get("client-b", (ECHO_V1, 80), "/", &[]), to("echo-v2"));
    // Older, but another namespace's: never reaches team-a's or the producer's clients.
    assert_eq!(ask.get("client-a", (ECHO_V1, 80), "/", &[]), to("echo-v1"));
    assert_eq!(ask.get("client-m", (ECHO_V1, 80), "/", &[]), to("echo-v1"));
}

#[test]
fn grpc_route_takes_the_port_from_an_http_route_which_is_reported_conflicted() {
    let parent = "{group: '', kind: Service, name: echo, namespace: mesh, port: 7070}";
    let yaml = http_route(
        "h",
        "mesh",
        "2025-01-01T00:00:00Z",
        parent,
        "  - backendRefs: [{name: echo-v1, port: 7070}]",
    ) + "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 7070}]
  rules:
  - matches: [{method: {service: pkg.Echo, method: Say}}]
    backendRefs: [{name: echo-v2, port: 7070}]
---
";
    let (snap, findings, pods) = world(&yaml);
    assert!(errors(&findings).is_empty(), "{findings:?}");
    let ask = Ask {
        snap: &snap,
        pods: &pods,
    };
    assert_eq!(
        ask.get("client-a", (ECHO, 7070), "/pkg.Echo/Say", &[]),
        to("echo-v2")
    );
    assert_eq!(
        ask.get("client-a", (ECHO, 7070), "/pkg.Echo/Other", &[]),
        Got::Status(404, None)
    );
    assert!(
        snap.routes
            .route_status
            .iter()
            .any(|s| s.kind == "HTTPRoute" && s.name == "h" && s.accepted == (false, "Conflicted")),
        "{:?}",
        snap.routes.route_status
    );
}

#[test]
fn a_virtual_service_and_routes_on_one_service_follow_istios_order() {
    let vs = |ns: &str, created: &str, export: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs, namespace: {ns}, creationTimestamp: '{created}'}}
spec:
  hosts: [echo.mesh.svc.cluster.local]
  exportTo: [{export}]
  http: [{{route: [{{destination: {{host: echo-v2.mesh.svc.cluster.local}}}}]}}]
---
"
        )
    };
    let route = http_route(
        "r",
        "mesh",
        "2026-01-01T00:00:00Z",
        ECHO_PARENT,
        "  - backendRefs: [{name: echo-v1, port: 80}]",
    );
    let go = |extra: &str, client: &str| {
        let (snap, findings, pods) = world(&(route.clone() + extra));
        assert!(errors(&findings).is_empty(), "{findings:?}");
        Ask {
            snap: &snap,
            pods: &pods,
        }
        .get(client, (ECHO, 80), "/", &[])
    };
    // An older public VirtualService wins; a newer one loses to the producer route.
    assert_eq!(
        go(&vs("mesh", "2025-01-01T00:00:00Z", "'*'"), "client-a"),
        to("echo-v2")
    );
    assert_eq!(
        go(&vs("mesh", "2027-01-01T00:00:00Z", "'*'"), "client-a"),
        to("echo-v1")
    );
    // The client's own namespace's VirtualService wins, however new.
    assert_eq!(
        go(&vs("team-a", "2027-01-01T00:00:00Z", "'.'"), "client-a"),
        to("echo-v2")
    );
    // A consumer route beats an older public VirtualService.
    let consumer = http_route(
        "mine",
        "team-a",
        "2026-06-01T00:00:00Z",
        ECHO_PARENT,
        "  - backendRefs: [{name: echo-v1, namespace: mesh, port: 80}]",
    );
    assert_eq!(
        go(
            &(vs("mesh", "2025-01-01T00:00:00Z", "'*'") + &consumer),
            "client-a"
        ),
        to("echo-v1")
    );
}

#[test]
fn unresolvable_and_zero_weight_backends_and_ruleless_routes() {
    let yaml = http_route(
        "r",
        "mesh",
        "2026-01-01T00:00:00Z",
        ECHO_PARENT,
        "  - matches: [{path: {value: /gone}}]
    backendRefs: [{name: echo-v9, port: 80}]
  - matches: [{path: {value: /zero}}]
    backendRefs: [{name: echo-v1, port: 80, weight: 0}]
  - matches: [{path: {value: /mixed}}]
    backendRefs: [{name: echo-v1, port: 80, weight: 1}, {name: echo-v9, port: 80, weight: 0}]
  - matches: [{path: {value: /wrong-port}}]
    backendRefs: [{name: echo-v1, port: 8080}]",
    ) + "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: empty, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo-v1, port: 80}]
---
";
    let (snap, findings, pods) = world(&yaml);
    assert!(errors(&findings).is_empty(), "{findings:?}");
    assert!(
        findings
            .iter()
            .any(|f| f.message.contains("echo-v9 does not exist")),
        "{findings:?}"
    );
    let ask = Ask {
        snap: &snap,
        pods: &pods,
    };
    assert_eq!(
        ask.get("client-a", (ECHO, 80), "/gone", &[]),
        Got::Status(500, None)
    );
    assert_eq!(
        ask.get("client-a", (ECHO, 80), "/zero", &[]),
        Got::Status(500, None)
    );
    for _ in 0..20 {
        assert_eq!(
            ask.get("client-a", (ECHO, 80), "/mixed", &[]),
            to("echo-v1")
        );
    }
    // A backendRef's port is the Service's (80), not the pods' (8080).
    assert_eq!(
        ask.get("client-a", (ECHO, 80), "/wrong-port", &[]),
        Got::Status(500, None)
    );
    let status = snap
        .routes
        .route_status
        .iter()
        .find(|s| s.name == "r")
        .expect("status of r");
    assert_eq!(status.accepted, (true, "Accepted"));
    assert_eq!(
        status.resolved_refs,
        (false, "BackendNotFound"),
        "{status:?}"
    );
    // No rules: the CRD's default rule, which has no backend.
    assert_eq!(
        ask.get("client-a", (ECHO_V1, 80), "/", &[]),
        Got::Status(500, None)
    );
}

#[test]
fn the_crds_validation_rules_are_errors_at_their_lines() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad, namespace: mesh}
spec:
  parentRefs:
  - {group: '', kind: Service, name: echo}
  - {group: '', kind: Service, name: echo}
  rules:
  - matches: [{path: {type: Exact, value: /a}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {value: '/a//b'}}]
    backendRefs: [{name: echo-v1}]
  - filters:
    - type: RequestRedirect
      requestHeaderModifier: {set: [{name: x, value: y}]}
    - type: RequestRedirect
      requestRedirect: {statusCode: 305}
    backendRefs: [{name: echo-v1, port: 80}]
  - timeouts: {request: 1s, backendRequest: 2s}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {value: nope}}]
    backendRefs: [{name: echo-v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ingress, namespace: mesh}
spec:
  parentRefs: [{name: my-gateway}]
  rules: [{backendRefs: [{name: echo-v1, port: 80}]}]
---
";
    let (_, findings, _) = world(yaml);
    let errs = errors(&findings);
    // The world's own documents come first: its line count shifts every position.
    let before = base_yaml().lines().count();
    let has = |line: usize, text: &str| {
        errs.iter()
            .any(|e| e.contains(&format!("t.yaml:{}:", line + before)) && e.contains(text))
    };
    for (line, text) in [
        (7, "sectionName must be unique"),
        (9, "exactly one PathPrefix match"),
        (14, "must not contain '//'"),
        (15, "Must have port for Service reference"),
        (
            17,
            "must be nil if the filter.type is not RequestHeaderModifier",
        ),
        (19, "RequestRedirect filter cannot be repeated"),
        (19, "statusCode 305"),
        (16, "must not be used together with backendRefs"),
        (
            22,
            "backendRequest timeout cannot be longer than request timeout",
        ),
        (24, "must be an absolute path"),
    ] {
        assert!(has(line, text), "line {line}: {text}:\n{}", errs.join("\n"));
    }
    assert!(
        findings.iter().any(|f| f.severity == Severity::Note
            && f.message.contains("my-gateway")
            && f.message.contains("not a Service")),
        "{findings:?}"
    );
}

#[test]
fn path_modifiers_and_whole_segment_prefixes() {
    use crate::state::routes::{Matcher, PathModifier};
    let p = |s: &str| PathModifier::ReplacePrefixMatch(s.into());
    assert_eq!(p("/").apply("/strip/three", Some("/strip")), "/three");
    assert_eq!(p("/").apply("/strip", Some("/strip")), "/");
    assert_eq!(
        p("/one").apply("/prefix/one/two", Some("/prefix/one")),
        "/one/two"
    );
    assert_eq!(p("/new/").apply("/old/x", Some("/old")), "/new/x");
    assert_eq!(p("/new").apply("/x", Some("")), "/new/x");
    assert_eq!(
        PathModifier::ReplaceFullPath("/f".into()).apply("/a/b", Some("/a")),
        "/f"
    );
    let m = Matcher::PathPrefix("/v2".into());
    assert!(m.matches("/v2", false) && m.matches("/v2/", false) && m.matches("/v2/x", false));
    assert!(!m.matches("/v2x", false) && !m.matches("/v", false) && !m.matches("/x/v2", false));
    assert!(Matcher::PathPrefix(String::new()).matches("/anything", false));
}

#[test]
fn section_names_hostnames_mirror_percent_and_rewritten_hosts() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, sectionName: http}]
  hostnames: [somewhere.else.example]
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: echo-v1, port: 80}, percent: 25}
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.example}
    backendRefs: [{name: echo-v2, port: 80}]
---
";
    let (snap, findings, pods) = world(yaml);
    assert!(errors(&findings).is_empty(), "{findings:?}");
    let ask = Ask {
        snap: &snap,
        pods: &pods,
    };
    // sectionName `http` binds port 80 only; hostnames do not narrow a mesh route.
    assert_eq!(ask.get("client-a", (ECHO, 7070), "/", &[]), to("echo"));
    let HttpDecision::Forward {
        labels,
        mirrors,
        edits,
        ..
    } = ask.decide("client-a", (ECHO, 80), "/", &[])
    else {
        panic!("forwarded");
    };
    assert_eq!(labels.service, "echo-v2.mesh.svc.cluster.local");
    assert_eq!(mirrors.len(), 1);
    assert_eq!(mirrors[0].0.host, "echo-v1.mesh.svc.cluster.local");
    assert_eq!(mirrors[0].1, 25.0);
    assert_eq!(
        edits.rewrite_authority.as_deref(),
        Some("rewritten.example")
    );
}

#[test]
fn retry_and_backend_request_timeout_become_the_routes_retry_policy() {
    let yaml = http_route(
        "r",
        "mesh",
        "2026-01-01T00:00:00Z",
        ECHO_PARENT,
        "  - matches: [{path: {value: /retry}}]
    retry: {codes: [503, 429], attempts: 5}
    timeouts: {request: 10s, backendRequest: 2s}
    backendRefs: [{name: echo-v1, port: 80}]
  - backendRefs: [{name: echo-v1, port: 80}]",
    );
    let (snap, findings, pods) = world(&yaml);
    assert!(errors(&findings).is_empty(), "{findings:?}");
    assert!(
        findings
            .iter()
            .any(|f| f.severity == Severity::Note && f.message.contains("experimental")),
        "{findings:?}"
    );
    let ask = Ask {
        snap: &snap,
        pods: &pods,
    };
    let retry_of = |path: &str| match ask.decide("client-a", (ECHO, 80), path, &[]) {
        HttpDecision::Forward { retry, timeout, .. } => (retry, timeout),
        other => panic!("{other:?}"),
    };
    let (retry, timeout) = retry_of("/retry");
    assert_eq!(retry.attempts, 5);
    assert_eq!(
        retry.per_try_timeout,
        Some(std::time::Duration::from_secs(2))
    );
    assert!(retry.on.iter().any(|c| c == "503") && retry.on.iter().any(|c| c == "429"));
    assert_eq!(timeout, Some(std::time::Duration::from_secs(10)));
    // Without `retry`, Istio's default policy, as for a VirtualService.
    let (retry, _) = retry_of("/other");
    assert_eq!(retry, crate::proxy::http_route::Retry::istio_default());
}
