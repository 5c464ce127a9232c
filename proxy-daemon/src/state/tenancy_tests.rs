//! Which namespace's object a client's traffic follows where several compete: Istio's
//! precedence, and the ownership rule that keeps one namespace from taking another's
//! Service (its name, its address, its routes). In process: the snapshot is asked what
//! each client would get.
use super::*;
use crate::{
    config::local,
    state::{registry::Conflict, routes::HttpAction},
};

fn objects(yaml: &str) -> Vec<Located<Object>> {
    local::split_documents(std::path::Path::new("t.yaml"), yaml)
        .iter()
        .filter_map(|d| local::parse_document(d, "default").unwrap())
        .collect()
}

fn settings(default_export_to: &[&str]) -> CaptureSettings {
    CaptureSettings {
        label_key: CAPTURE_LABEL_KEY.into(),
        label_value: "enabled".into(),
        node_name: "n1".into(),
        default_fail_mode: FailMode::Open,
        default_export_to: default_export_to.iter().map(|s| s.to_string()).collect(),
        trust_domain: "cluster.local".into(),
    }
}

fn compile_ok(yaml: &str) -> Snapshot {
    compile(&objects(yaml), &settings(&[]), 1).unwrap_or_else(|e| panic!("{e:?}"))
}

fn service(ns: &str, name: &str, ip: &str, port: u32) -> String {
    format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: {port}}}]\n")
}

/// A VirtualService for `host` that routes to `to` (and mirrors to `mirror`, if given).
fn vs(ns: &str, name: &str, host: &str, to: &str, extra_meta: &str, extra_spec: &str) -> String {
    format!("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {name}\n  namespace: {ns}\n{extra_meta}spec:\n  hosts: [{host}]\n{extra_spec}  http:\n  - route: [{{destination: {{host: {to}}}}}]\n")
}

fn external(ns: &str, name: &str, host: &str, created: &str) -> String {
    format!("---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\n  creationTimestamp: \"{created}\"\nspec:\n  hosts: [{host}]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n")
}

/// The first route destination of the VirtualService `client` uses for `host`.
fn routed_to(snap: &Snapshot, host: &str, client: &str) -> Option<String> {
    let labels = BTreeMap::new();
    let vs = snap
        .routes
        .virtual_services_for(host, client, &labels, snap.registry.kubernetes_owner(host))
        .next()?;
    match &vs.http[0].action {
        HttpAction::Route { destinations } => Some(destinations[0].destination.host.clone()),
        _ => None,
    }
}

#[test]
fn a_client_uses_one_virtual_service_per_host_its_own_then_exported_to_it_then_the_oldest() {
    let created = |t: &str| format!("  creationTimestamp: \"{t}\"\n");
    let yaml = [
        external("ext", "api", "api.example.com", "2020-01-01T00:00:00Z"),
        external("ext", "a-sink", "a.sink", "2020-01-01T00:00:00Z"),
        external("ext", "web-sink", "web.sink", "2020-01-01T00:00:00Z"),
        external("ext", "other-sink", "other.sink", "2020-01-01T00:00:00Z"),
        // The oldest public one.
        vs(
            "aaa",
            "r",
            "api.example.com",
            "a.sink",
            &created("2021-01-01T00:00:00Z"),
            "",
        ),
        // A younger public one in web.
        vs(
            "web",
            "r",
            "api.example.com",
            "web.sink",
            &created("2024-01-01T00:00:00Z"),
            "",
        ),
        // Exported by name to shop and web, youngest.
        vs(
            "other",
            "r",
            "api.example.com",
            "other.sink",
            &created("2025-01-01T00:00:00Z"),
            "  exportTo: [shop, web]\n",
        ),
    ]
    .concat();
    let snap = compile_ok(&yaml);
    let h = "api.example.com";
    assert_eq!(
        routed_to(&snap, h, "web").as_deref(),
        Some("web.sink"),
        "its own namespace's first"
    );
    assert_eq!(
        routed_to(&snap, h, "shop").as_deref(),
        Some("other.sink"),
        "then one exported to it by name"
    );
    assert_eq!(
        routed_to(&snap, h, "ops").as_deref(),
        Some("a.sink"),
        "then the oldest public one"
    );
    // One per host: the others are not joined in.
    let labels = BTreeMap::new();
    assert_eq!(
        snap.routes
            .virtual_services_for(h, "ops", &labels, None)
            .count(),
        1
    );
    // Reported as Istio's analyzer does, and counted.
    assert!(
        snap.findings
            .iter()
            .any(|f| f.contains("VirtualService/web/r") && f.contains("IST0109")),
        "{:#?}",
        snap.findings
    );
    assert_eq!(
        snap.conflicts
            .iter()
            .filter(|c| **c == Conflict::ConflictingVirtualServices)
            .count(),
        2
    );
}

#[test]
fn without_timestamps_file_order_decides_and_a_name_tie_goes_by_name() {
    let yaml = [
        external("ext", "api", "api.example.com", "2020-01-01T00:00:00Z"),
        external("ext", "s1", "first.sink", "2020-01-01T00:00:00Z"),
        external("ext", "s2", "second.sink", "2020-01-01T00:00:00Z"),
        vs("zzz", "r", "api.example.com", "first.sink", "", ""),
        vs("aaa", "r", "api.example.com", "second.sink", "", ""),
    ]
    .concat();
    assert_eq!(
        routed_to(&compile_ok(&yaml), "api.example.com", "ops").as_deref(),
        Some("first.sink")
    );
    // Same timestamp: name, then namespace.
    let t = "  creationTimestamp: \"2022-02-02T00:00:00Z\"\n";
    let yaml = [
        external("ext", "api", "api.example.com", "2020-01-01T00:00:00Z"),
        external("ext", "s1", "first.sink", "2020-01-01T00:00:00Z"),
        external("ext", "s2", "second.sink", "2020-01-01T00:00:00Z"),
        vs("zzz", "b", "api.example.com", "first.sink", t, ""),
        vs("aaa", "a", "api.example.com", "second.sink", t, ""),
    ]
    .concat();
    assert_eq!(
        routed_to(&compile_ok(&yaml), "api.example.com", "ops").as_deref(),
        Some("second.sink")
    );
}

#[test]
fn a_virtual_service_for_another_namespaces_service_routes_only_its_own_namespace() {
    let host = "payments.prod.svc.cluster.local";
    let old = "  creationTimestamp: \"2019-01-01T00:00:00Z\"\n";
    let young = "  creationTimestamp: \"2024-01-01T00:00:00Z\"\n";
    let yaml = [
        service("prod", "payments", "10.96.1.1", 80),
        service("aaa", "sink", "10.96.2.2", 80),
        service("prod", "payments-v2", "10.96.1.2", 80),
        // aaa's, older than prod's own, mirroring every request to its sink.
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: steal\n  namespace: aaa\n{old}spec:\n  hosts: [{host}]\n  http:\n  - route: [{{destination: {{host: {host}}}}}]\n    mirror: {{host: sink.aaa.svc.cluster.local}}\n"
        ),
        vs("prod", "own", host, "payments-v2.prod.svc.cluster.local", young, ""),
    ]
    .concat();
    let snap = compile_ok(&yaml);
    for client in ["prod", "web"] {
        assert_eq!(
            routed_to(&snap, host, client).as_deref(),
            Some("payments-v2.prod.svc.cluster.local"),
            "{client}'s requests follow the owner's route"
        );
    }
    // aaa's own clients may route (and mirror) their own calls as they like.
    assert_eq!(routed_to(&snap, host, "aaa").as_deref(), Some(host));
    assert!(snap
        .findings
        .iter()
        .any(|f| f.contains("VirtualService/aaa/steal")
            && f.contains("belongs to a Service of namespace prod")));
    assert!(snap
        .conflicts
        .contains(&Conflict::RouteForAnotherNamespacesService));
    // Without prod's own rule, other namespaces get no rule at all (the Service itself).
    let without_owner: String = yaml
        .split("---\n")
        .filter(|d| !d.contains("name: own"))
        .collect::<Vec<_>>()
        .join("---\n");
    let snap = compile_ok(&without_owner);
    assert_eq!(routed_to(&snap, host, "web"), None);
    // The root namespace speaks for everyone.
    let root = format!(
        "{}{}",
        without_owner,
        vs(
            "istio-system",
            "mesh",
            host,
            "payments-v2.prod.svc.cluster.local",
            "",
            ""
        )
    );
    assert_eq!(
        routed_to(&compile_ok(&root), host, "web").as_deref(),
        Some("payments-v2.prod.svc.cluster.local")
    );
}

#[test]
fn a_destination_rule_is_the_clients_then_the_services_namespace_then_the_roots() {
    let host = "payments.prod.svc.cluster.local";
    let dr = |ns: &str, max: u32| {
        format!("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: p, namespace: {ns}}}\nspec:\n  host: {host}\n  trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: {max}}}}}}}\n")
    };
    let max = |snap: &Snapshot, client: &str| {
        snap.routes
            .destination_rule(host, client, Some("prod"))
            .and_then(|d| d.effective(None, None).connection_pool)
            .and_then(|p| p.max_connections)
    };
    let base = service("prod", "payments", "10.96.1.1", 80);
    let snap = compile_ok(
        &[
            base.clone(),
            dr("aaa", 1),
            dr("prod", 100),
            dr("istio-system", 7),
        ]
        .concat(),
    );
    assert_eq!(max(&snap, "aaa"), Some(1), "a client's own namespace first");
    assert_eq!(max(&snap, "web"), Some(100), "then the service's namespace");
    let snap = compile_ok(&[base.clone(), dr("aaa", 1), dr("istio-system", 7)].concat());
    assert_eq!(max(&snap, "web"), Some(7), "then the root namespace");
    let snap = compile_ok(&[base, dr("aaa", 1)].concat());
    assert_eq!(max(&snap, "web"), None, "never a third namespace's");
}

#[test]
fn a_service_entry_cannot_take_a_services_address_or_name_from_other_namespaces() {
    let yaml = [
        service("prod", "db", "10.96.5.5", 5432),
        // aaa claims prod's database address for a host of its own…
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: fake-db, namespace: aaa}\nspec:\n  hosts: [db.aaa.example]\n  addresses: [10.96.5.5, 192.0.2.10]\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n  resolution: STATIC\n  endpoints: [{address: 198.51.100.9}]\n".to_string(),
        // …and prod's database name.
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: fake-name, namespace: aaa}\nspec:\n  hosts: [db.prod.svc.cluster.local]\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n  resolution: STATIC\n  endpoints: [{address: 198.51.100.9}]\n".to_string(),
    ]
    .concat();
    let snap = compile_ok(&yaml);
    let at = |a: &str, client: &str| {
        snap.registry
            .by_addr(a.parse().unwrap(), client)
            .map(|s| format!("{}/{}", s.namespace, s.hostname))
    };
    for client in ["prod", "web", "aaa"] {
        assert_eq!(
            at("10.96.5.5:5432", client).as_deref(),
            Some("prod/db.prod.svc.cluster.local"),
            "{client}"
        );
    }
    // The rest of the entry applies.
    assert_eq!(
        at("192.0.2.10:5432", "web").as_deref(),
        Some("aaa/db.aaa.example")
    );
    let named = |client: &str| {
        snap.registry
            .by_host("db.prod.svc.cluster.local", client)
            .map(|s| s.namespace.clone())
    };
    assert_eq!(named("web").as_deref(), Some("prod"));
    assert_eq!(named("prod").as_deref(), Some("prod"));
    assert_eq!(
        named("aaa").as_deref(),
        Some("aaa"),
        "its own namespace may shadow the name for itself"
    );
    assert!(snap
        .findings
        .iter()
        .any(|f| f.contains("ServiceEntry/aaa/fake-db")
            && f.contains("address 10.96.5.5 is the cluster IP of Service/prod/db")));
    assert!(snap.conflicts.contains(&Conflict::AddressOwnedByService));
    assert!(snap.conflicts.contains(&Conflict::HostOwnedByService));
}

#[test]
fn one_hostname_in_two_namespaces_is_the_clients_own_else_the_oldest() {
    let yaml = [
        external("b", "api", "api.example.com", "2021-01-01T00:00:00Z"),
        external("a", "api", "api.example.com", "2022-01-01T00:00:00Z"),
    ]
    .concat();
    let snap = compile_ok(&yaml);
    let ns = |client: &str| {
        snap.registry
            .by_host("api.example.com", client)
            .map(|s| s.namespace.clone())
    };
    assert_eq!(
        ns("c").as_deref(),
        Some("b"),
        "the oldest, not the alphabetically first"
    );
    assert_eq!(ns("a").as_deref(), Some("a"));
    assert!(snap.conflicts.contains(&Conflict::DuplicateHost));
}

#[test]
fn a_redefined_object_is_its_later_definition_with_a_warning_naming_both() {
    let first = vs("shop", "r", "api.example.com", "first.sink", "", "");
    let second = vs("shop", "r", "api.example.com", "second.sink", "", "");
    let yaml = [
        external("ext", "api", "api.example.com", "2020-01-01T00:00:00Z"),
        external("ext", "s1", "first.sink", "2020-01-01T00:00:00Z"),
        external("ext", "s2", "second.sink", "2020-01-01T00:00:00Z"),
        first,
        second,
    ]
    .concat();
    let snap = compile_ok(&yaml);
    assert_eq!(
        routed_to(&snap, "api.example.com", "shop").as_deref(),
        Some("second.sink")
    );
    assert!(
        snap.findings
            .iter()
            .any(|f| f
                .contains("VirtualService/shop/r: warning: replaces the definition at t.yaml:")),
        "{:#?}",
        snap.findings
    );
    assert!(snap.conflicts.contains(&Conflict::RedefinedObject));
}

#[test]
fn two_destination_rules_of_one_namespace_merge_as_istio_merges_them() {
    let yaml = [
        service("shop", "reviews", "10.96.3.3", 80),
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: 5}}}\n  subsets: [{name: v1, labels: {version: v1}}]\n".to_string(),
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: b, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: 9}}}\n  subsets: [{name: v1, labels: {version: other}}, {name: v2, labels: {version: v2}}]\n".to_string(),
    ]
    .concat();
    let snap = compile_ok(&yaml);
    let dr = snap
        .routes
        .destination_rule("reviews.shop.svc.cluster.local", "shop", Some("shop"))
        .expect("merged rule");
    assert_eq!(dr.subsets.keys().collect::<Vec<_>>(), ["v1", "v2"]);
    assert_eq!(
        dr.subsets["v1"].labels["version"], "v1",
        "the first definition of a subset stays"
    );
    assert_eq!(
        dr.effective(None, None)
            .connection_pool
            .and_then(|p| p.max_connections),
        Some(5),
        "the first traffic policy applies"
    );
    assert!(snap
        .findings
        .iter()
        .any(|f| f.contains("DestinationRule/shop/b") && f.contains("merged into")));
}

#[test]
fn default_export_to_dot_keeps_every_namespaces_objects_at_home() {
    let yaml = [
        external("ext", "api", "api.example.com", "2020-01-01T00:00:00Z"),
        external("ext", "s", "a.sink", "2020-01-01T00:00:00Z"),
        vs("aaa", "r", "api.example.com", "a.sink", "", ""),
    ]
    .concat();
    let snap = compile(&objects(&yaml), &settings(&["."]), 1).expect("compiles");
    assert_eq!(routed_to(&snap, "api.example.com", "web"), None);
    // The entry itself is ext's only now.
    assert!(snap.registry.by_host("api.example.com", "web").is_none());
    assert!(snap.registry.by_host("api.example.com", "ext").is_some());
    // The mesh config's per-kind default wins over the flag.
    let mesh = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    defaultVirtualServiceExportTo: [\"*\"]\n    defaultServiceExportTo: [\"*\"]\n";
    let snap = compile(&objects(&format!("{yaml}{mesh}")), &settings(&["."]), 1).expect("compiles");
    assert_eq!(
        routed_to(&snap, "api.example.com", "web").as_deref(),
        Some("a.sink")
    );
    assert_eq!(snap.export_defaults.destination_rule, vec!["."]);
    // Istio's rules for the list itself.
    assert!(check_export_to(&["*".into(), "web".into()]).is_err());
    assert!(check_export_to(&["Web".into()]).is_err());
    assert!(check_export_to(&[".".into(), "web".into()]).is_ok());
}

#[test]
fn a_creation_timestamp_that_is_not_a_time_is_an_error_of_its_object() {
    let yaml = vs(
        "shop",
        "r",
        "api.example.com",
        "x",
        "  creationTimestamp: yesterday\n",
        "",
    );
    let errors = compile(&objects(&yaml), &settings(&[]), 1)
        .err()
        .unwrap_or_default();
    assert!(
        errors.iter().any(|e| e
            .to_string()
            .contains("VirtualService/shop/r: metadata.creationTimestamp \"yesterday\"")),
        "{errors:?}"
    );
}
