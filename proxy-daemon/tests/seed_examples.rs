//! Every published example parses, validates and compiles to what its authors meant.
//! (Copies of ../shared/fixtures/seed-examples live in tests/fixtures/seed-examples.)
use std::path::{Path, PathBuf};

/// A client workload without labels (no Sidecar selects it).
static NO_LABELS: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();

use proxy_common::FailMode;
use proxy_daemon::{
    config::local,
    state::routes::{
        AddedHeader, AddedRoute, ClusterRef, HashAlgorithm, HashKey, HeaderAppend, HttpAction,
        LoadBalancer, Matcher, RoutePatch,
    },
    state::{self, CaptureSettings, Snapshot},
    validate,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/seed-examples")
        .join(name)
}

fn settings() -> CaptureSettings {
    CaptureSettings {
        label_key: "nodeproxy.io/capture".into(),
        label_value: "enabled".into(),
        node_name: "n".into(),
        default_fail_mode: FailMode::Open,
        default_export_to: Vec::new(),
        trust_domain: "cluster.local".into(),
    }
}

fn compile(name: &str) -> Snapshot {
    let loaded = local::load_path(&fixture(name));
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    state::compile(&loaded.objects, &settings(), 1).unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

fn messages(name: &str) -> Vec<String> {
    validate::problems(&[fixture(name)])
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn mirror_api_mirrors_everything_to_the_mirror_namespace() {
    let snap = compile("mirror-api.yaml");
    let vs = &snap
        .routes
        .virtual_services_for("api.azar.svc.cluster.local", "azar", &NO_LABELS, None)
        .next()
        .expect("a VirtualService");
    let rule = &vs.http[0];
    assert!(rule.matches.is_empty());
    let HttpAction::Route { destinations } = &rule.action else {
        panic!("route expected")
    };
    assert_eq!(
        destinations[0].destination.host,
        "api.azar.svc.cluster.local"
    );
    assert_eq!(destinations[0].weight, 100);
    assert_eq!(rule.mirrors.len(), 1);
    assert_eq!(
        rule.mirrors[0].destination.host,
        "api.azar-mirror.svc.cluster.local"
    );
    assert_eq!(rule.mirrors[0].percent, 100.0);
    // Only warnings (hosts defined elsewhere): validate passes.
    assert!(messages("mirror-api.yaml")
        .iter()
        .all(|m| m.contains(": warning: ")));
}

#[test]
fn route_by_source_sends_test_and_mirror_pods_to_the_cache_with_a_header() {
    let snap = compile("route-by-source.yaml");
    let rules = &snap
        .routes
        .virtual_services_for(
            "tiny-microservice.azar.svc.cluster.local",
            "azar",
            &NO_LABELS,
            None,
        )
        .next()
        .expect("a VirtualService")
        .http;
    assert_eq!(rules.len(), 3);
    for (rule, stack, header) in [(&rules[0], "mirror", "true"), (&rules[1], "test", "false")] {
        assert_eq!(
            rule.matches[0].source_labels.get("app").map(String::as_str),
            Some("api")
        );
        assert_eq!(
            rule.matches[0]
                .source_labels
                .get("stack")
                .map(String::as_str),
            Some(stack)
        );
        assert_eq!(
            rule.headers.request.set,
            vec![("x-azar-mirror".to_string(), header.to_string())]
        );
        let HttpAction::Route { destinations } = &rule.action else {
            panic!()
        };
        assert_eq!(
            destinations[0].destination.host,
            "mirror-cache.azar.svc.cluster.local"
        );
    }
    assert!(rules[2].matches.is_empty(), "last rule is the catch-all");
    let HttpAction::Route { destinations } = &rules[2].action else {
        panic!()
    };
    assert_eq!(
        destinations[0].destination.host,
        "tiny-microservice.azar.svc.cluster.local"
    );
    assert!(
        rules[1].source.ends_with("route-by-source.yaml:21)"),
        "{}",
        rules[1].source
    );
}

#[test]
fn subsets_and_weights_split_10_90_for_mesh_traffic() {
    let snap = compile("subsets-weights.yaml");
    let host = "httpping-without-sidecar.infra-jinsu-lab.svc.cluster.local";
    let svc = snap.registry.by_host(host, "default").expect("service");
    assert_eq!(svc.ports[0].port, 8080);
    assert_eq!(svc.ports[0].target_port, Some(80));
    let dr = snap
        .routes
        .destination_rule(host, "infra-jinsu-lab", Some("infra-jinsu-lab"))
        .expect("DR");
    assert_eq!(dr.subsets["v1"].labels["version"], "v1");
    assert_eq!(dr.subsets["v2"].labels["version"], "v2");
    let rule = &snap
        .routes
        .virtual_services_for(
            host,
            "azar",
            &NO_LABELS,
            snap.registry.kubernetes_owner(host),
        )
        .next()
        .expect("a VirtualService")
        .http[0];
    assert!(matches!(rule.matches[0].uri, Some(Matcher::Prefix(ref p)) if p == "/"));
    let HttpAction::Route { destinations } = &rule.action else {
        panic!()
    };
    let split: Vec<_> = destinations
        .iter()
        .map(|d| {
            (
                d.destination.subset.clone().unwrap(),
                d.weight,
                d.destination.port,
            )
        })
        .collect();
    assert_eq!(
        split,
        vec![("v1".into(), 10, Some(8080)), ("v2".into(), 90, Some(8080))]
    );
    assert!(messages("subsets-weights.yaml").is_empty());
}

#[test]
fn consistent_hash_on_header_foo() {
    let snap = compile("consistent-hash.yaml");
    let dr = snap
        .routes
        .destination_rule(
            "httpping-without-sidecar.infra-jinsu-lab.svc.cluster.local",
            "infra-jinsu-lab",
            Some("infra-jinsu-lab"),
        )
        .expect("DR");
    match &dr.effective(None, None).load_balancer {
        Some(LoadBalancer::ConsistentHash {
            key: HashKey::Header { name },
            algorithm: HashAlgorithm::RingHash { minimum_ring_size },
        }) => {
            assert_eq!(name, "foo");
            assert_eq!(*minimum_ring_size, 1024);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn service_entry_with_tls_origination_on_port_80() {
    use proxy_daemon::config::istio::{Resolution, TlsMode};
    let snap = compile("serviceentry-tls-origination.yaml");
    let se = snap
        .registry
        .by_host("httpbin.org", "default")
        .expect("ServiceEntry host");
    let p80 = se.port(80).expect("port 80");
    assert_eq!(
        (p80.target_port, p80.protocol.as_str()),
        (Some(443), "HTTP")
    );
    assert_eq!(se.port(443).expect("443").protocol, "HTTPS");
    assert!(matches!(
        se.kind,
        proxy_daemon::state::registry::ServiceKind::ServiceEntry {
            resolution: Resolution::Dns,
            ..
        }
    ));
    let dr = snap
        .routes
        .destination_rule("httpbin.org", "test-ext-svc", None)
        .expect("DR");
    let tls80 = dr.effective(Some(80), None).tls.expect("tls on 80");
    assert_eq!(tls80.mode, TlsMode::Simple);
    assert!(
        dr.effective(Some(443), None).tls.is_none(),
        "443 carries the app's own TLS"
    );
    assert!(messages("serviceentry-tls-origination.yaml").is_empty());
}

#[test]
fn envoy_filter_overrides_port_80_and_passes_the_metadata_address_through() {
    let snap = compile("envoyfilter-override.yaml");
    let filters = &snap.routes.envoy_filters;
    assert_eq!(filters.len(), 2);
    for (f, ns, stack, header) in [
        (&filters[0], "azar", "test", "false"),
        (&filters[1], "azar-mirror", "mirror", "true"),
    ] {
        assert_eq!(f.namespace, ns);
        assert_eq!(f.selector["app"], "api");
        assert_eq!(f.selector["stack"], stack);
        assert_eq!(f.patches.len(), 2);
        assert_eq!(f.patches[0].port, Some(80));
        match &f.patches[0].patch {
            RoutePatch::MergeHttpRoute {
                cluster,
                request_headers_to_add,
                ..
            } => {
                assert_eq!(
                    cluster,
                    &Some(ClusterRef::Service {
                        port: 80,
                        subset: None,
                        host: "mirror-cache.azar.svc.cluster.local".into()
                    })
                );
                assert_eq!(
                    request_headers_to_add,
                    &vec![AddedHeader {
                        name: "x-azar-mirror".into(),
                        value: header.into(),
                        action: HeaderAppend::AppendIfExistsOrAdd,
                    }]
                );
            }
            other => panic!("{other:?}"),
        }
        match &f.patches[1].patch {
            RoutePatch::AddVirtualHost {
                domains, routes, ..
            } => {
                assert_eq!(
                    domains,
                    &vec![
                        "169.254.169.254".to_string(),
                        "169.254.169.254:80".to_string()
                    ]
                );
                assert!(
                    matches!(&routes[0], AddedRoute { matcher: Matcher::Prefix(p), cluster: ClusterRef::Passthrough, .. } if p == "/")
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn gateway_bound_virtual_service_is_not_applied_to_mesh_traffic() {
    let snap = compile("bookinfo-gateway.yaml");
    assert!(snap.routes.virtual_services.is_empty());
    let m = messages("bookinfo-gateway.yaml");
    assert!(
        m.iter().any(|l| l.contains(
            "bookinfo-gateway.yaml:16: VirtualService/default/bookinfo: note: bound to gateways [bookinfo-gateway]"
        )),
        "{m:?}"
    );
}

#[test]
fn broken_examples_fail_validate_at_the_right_line() {
    let m = messages("route-by-source.broken.yaml");
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].contains("route-by-source.broken.yaml:32: "), "{m:?}");
    assert!(m[0].contains("check the indentation"), "{m:?}");
    let m = messages("rbac-v1alpha1.broken.yaml");
    assert!(
        m[0].contains("rbac-v1alpha1.broken.yaml:1: ServiceRole/default/products-viewer: ServiceRole (rbac.istio.io/v1alpha1) is not supported"),
        "{m:?}"
    );
}

#[test]
fn envoy_filters_apply_only_to_the_selected_workloads_of_their_namespace() {
    let snap = compile("envoyfilter-override.yaml");
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let test_api = labels(&[("app", "api"), ("stack", "test")]);
    let mirror_api = labels(&[("app", "api"), ("stack", "mirror")]);
    let other = labels(&[("app", "web")]);
    let names = |ns: &str, l| {
        snap.routes
            .envoy_filters_for(ns, l)
            .map(|f| f.namespace.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names("azar", &test_api), vec!["azar"]);
    assert_eq!(names("azar-mirror", &mirror_api), vec!["azar-mirror"]);
    assert!(names("azar", &mirror_api).is_empty(), "selector must match");
    assert!(
        names("azar-mirror", &test_api).is_empty(),
        "filters never leave their namespace"
    );
    assert!(names("azar", &other).is_empty());
}

#[test]
fn service_lookups_by_address_and_host() {
    use std::net::SocketAddr;
    let yaml = "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.7
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partners, namespace: shop}
spec:
  hosts: ['*.partners.example']
  addresses: [192.0.2.0/24]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: legacy, namespace: shop}
spec:
  workloadSelector: {labels: {app: legacy}}
  outboundTrafficPolicy: {mode: ALLOW_ANY}
";
    let dir = std::env::temp_dir().join(format!("pd-lookup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("x.yaml"), yaml).unwrap();
    let loaded = local::load_path(&dir);
    let snap = state::compile(&loaded.objects, &settings(), 1).expect("compile");
    std::fs::remove_dir_all(&dir).unwrap();
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    assert_eq!(
        snap.registry
            .by_addr(addr("10.96.0.7:9080"), "default")
            .unwrap()
            .hostname,
        "reviews.shop.svc.cluster.local"
    );
    assert!(
        snap.registry
            .by_addr(addr("10.96.0.7:80"), "default")
            .is_none(),
        "port must be a service port"
    );
    assert_eq!(
        snap.registry
            .by_addr(addr("192.0.2.55:443"), "default")
            .unwrap()
            .hostname,
        "*.partners.example"
    );
    assert!(snap
        .registry
        .by_addr(addr("192.0.3.1:443"), "default")
        .is_none());
    assert_eq!(
        snap.registry
            .by_host("API.partners.example", "default")
            .unwrap()
            .hostname,
        "*.partners.example"
    );
    assert!(snap
        .registry
        .by_host("partners.example", "default")
        .is_none());
    use proxy_daemon::config::istio::OutboundMode;
    let l = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        snap.routes
            .sidecar_for("shop", &l(&[("app", "legacy")]))
            .unwrap()
            .outbound_mode,
        Some(OutboundMode::AllowAny)
    );
    assert_eq!(
        snap.routes
            .sidecar_for("shop", &l(&[("app", "web")]))
            .unwrap()
            .outbound_mode,
        Some(OutboundMode::RegistryOnly)
    );
    assert!(snap.routes.sidecar_for("other", &l(&[])).is_none());
}

#[test]
fn destination_rule_precedence_is_subset_over_port_over_host() {
    use proxy_daemon::config::istio::{SimpleLb, TlsMode};
    let yaml = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 100}}
    portLevelSettings:
    - port: {number: 80}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: LEAST_REQUEST}
      portLevelSettings:
      - port: {number: 80}
        tls: {mode: SIMPLE}
";
    let dir = std::env::temp_dir().join(format!("pd-precedence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dr.yaml"), yaml).unwrap();
    let loaded = local::load_path(&dir);
    let snap = state::compile(&loaded.objects, &settings(), 1).expect("compile");
    std::fs::remove_dir_all(&dir).unwrap();
    let dr = snap
        .routes
        .destination_rule("reviews.shop.svc.cluster.local", "shop", Some("shop"))
        .unwrap();
    let lb = |p: &proxy_daemon::state::routes::Policy| match &p.load_balancer {
        Some(LoadBalancer::Simple { algorithm }) => *algorithm,
        other => panic!("{other:?}"),
    };
    assert_eq!(lb(&dr.effective(None, None)), SimpleLb::RoundRobin);
    assert_eq!(
        lb(&dr.effective(Some(80), None)),
        SimpleLb::Random,
        "port-level over host-level"
    );
    assert_eq!(
        lb(&dr.effective(Some(80), Some("v2"))),
        SimpleLb::LeastRequest,
        "subset over port-level"
    );
    let v2_80 = dr.effective(Some(80), Some("v2"));
    assert_eq!(
        v2_80.tls.unwrap().mode,
        TlsMode::Simple,
        "subset port-level applies"
    );
    assert!(dr.effective(Some(9080), Some("v2")).tls.is_none());
    assert_eq!(
        v2_80.connection_pool.unwrap().max_connections,
        Some(100),
        "unset fields inherit"
    );
}

fn compile_yaml(yaml: &str) -> Snapshot {
    let dir = std::env::temp_dir().join(format!("pd-yaml-{}-{}", std::process::id(), yaml.len()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("x.yaml"), yaml).unwrap();
    let loaded = local::load_path(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    state::compile(&loaded.objects, &settings(), 1).expect("compile")
}

const PODS: &str = "apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-abc, namespace: shop, uid: u1, labels: {app: reviews, version: v1}}
spec:
  containers: [{name: app, ports: [{name: http-web, containerPort: 9080}]}]
status: {phase: Running, podIP: 198.18.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2-def, namespace: shop, uid: u2, labels: {app: reviews, version: v2}}
spec:
  containers: [{name: app, ports: [{name: http-web, containerPort: 9080}]}]
status:
  phase: Running
  podIP: 198.18.0.12
  conditions: [{type: Ready, status: 'False'}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.9
  selector: {app: reviews}
  ports: [{name: http, port: 80, targetPort: http-web}]
";

#[test]
fn service_without_slices_takes_ready_pods_matching_its_selector() {
    let snap = compile_yaml(PODS);
    let svc = snap
        .registry
        .by_host("reviews.shop.svc.cluster.local", "default")
        .unwrap();
    assert_eq!(
        svc.endpoints.len(),
        1,
        "the unready pod is left out: {:?}",
        svc.endpoints
    );
    let ep = &svc.endpoints[0];
    assert_eq!(ep.address, "198.18.0.11");
    assert_eq!(ep.labels["version"], "v1", "pod labels, for subsets");
    assert_eq!(
        ep.ports["http"], 9080,
        "named targetPort resolved from the pod"
    );
}

#[test]
fn endpoint_slices_win_over_selectors_and_carry_pod_labels() {
    let yaml = format!(
        "{PODS}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-x1
  namespace: shop
  labels: {{kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{{name: http, port: 9080}}]
endpoints:
- addresses: [198.18.0.12]
  conditions: {{ready: true}}
  targetRef: {{kind: Pod, name: reviews-v2-def}}
- addresses: [198.18.0.13]
  conditions: {{ready: false}}
"
    );
    let snap = compile_yaml(&yaml);
    let svc = snap
        .registry
        .by_host("reviews.shop.svc.cluster.local", "default")
        .unwrap();
    assert_eq!(svc.endpoints.len(), 1, "{:?}", svc.endpoints);
    assert_eq!(svc.endpoints[0].address, "198.18.0.12");
    assert_eq!(svc.endpoints[0].labels["version"], "v2");
    assert_eq!(svc.endpoints[0].pod.as_deref(), Some("reviews-v2-def"));
    assert_eq!(svc.endpoints[0].ports["http"], 9080);
}

#[test]
fn outlier_detection_without_a_threshold_ejects_after_five_5xx_as_envoy_does() {
    let rule = |od: &str| {
        format!(
            "{PODS}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: shop}}
spec:
  host: reviews.shop.svc.cluster.local
  trafficPolicy: {{outlierDetection: {{{od}}}}}
"
        )
    };
    let threshold = |od: &str| {
        let snap = compile_yaml(&rule(od));
        let dr = snap
            .routes
            .destination_rule("reviews.shop.svc.cluster.local", "shop", Some("shop"))
            .expect("rule");
        dr.effective(None, None)
            .outlier_detection
            .expect("outlier detection")
            .consecutive_5xx_errors
    };
    assert_eq!(threshold("baseEjectionTime: 30s"), Some(5));
    assert_eq!(threshold("consecutive5xxErrors: 2"), Some(2));
    assert_eq!(threshold("consecutive5xxErrors: 0"), None, "0 turns it off");
}
