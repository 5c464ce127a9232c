//! Istio fields that route requests, each end to end (real pods, eBPF capture, echo servers
//! as backends) and each checked as an Istio user would: who answered, with what.
use proxy_tests::reviews::{served, to, Reviews, HOST};

fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{HOST}]
  http:
{http}"
    )
}

fn get(pod: &proxy_tests::Pod, path: &str, headers: &[&str], count: &str) -> serde_json::Value {
    let to = to();
    let mut args = vec![
        "http", "--to", &to, "--host", HOST, "--path", path, "--count", count,
    ];
    for h in headers {
        args.extend(["-H", h]);
    }
    pod.pdtool(&args)
}

#[test]
fn redirect_and_direct_response_answer_without_a_backend() {
    let r = Reviews::builder("redirect")
        .yaml(&vs(&format!(
            "  - match: [{{uri: {{prefix: /old}}}}]
    redirect: {{uri: /new, authority: shop.example, redirectCode: 308}}
  - match: [{{uri: {{exact: /teapot}}}}]
    directResponse: {{status: 418, body: {{string: short and stout}}}}
  - match: [{{uri: {{exact: /binary}}}}]
    directResponse: {{status: 200, body: {{bytes: aGVsbG8gYnl0ZXM=}}}}
  - match: [{{uri: {{prefix: /gw}}, gateways: [istio-system/ingress]}}]
    directResponse: {{status: 403}}
  - route: [{{destination: {{host: {HOST}, subset: v1}}}}]
"
        )))
        .pod("shop", "client-0", &[("app", "client")])
        .start();
    let pod = &r.pods[0];
    let out = get(pod, "/old/page", &[], "1");
    assert_eq!(out["first"]["status"], 308, "{out}");
    assert_eq!(
        out["first"]["headers"]["location"], "http://shop.example/new",
        "{out}"
    );
    let out = get(pod, "/teapot", &[], "1");
    assert_eq!(out["first"]["status"], 418, "{out}");
    assert_eq!(out["first"]["body"], "short and stout", "{out}");
    assert_eq!(served(&out, "reviews-v1") + served(&out, "reviews-v2"), 0);
    // `body.bytes` is base64, as in Istio.
    let out = get(pod, "/binary", &[], "1");
    assert_eq!(out["first"]["status"], 200, "{out}");
    assert_eq!(out["first"]["body"], "hello bytes", "{out}");
    // A match block bound to a gateway (not `mesh`) never matches pod traffic.
    let out = get(pod, "/gw/admin", &[], "1");
    assert_eq!(served(&out, "reviews-v1"), 1, "{out}");
    // Everything else is routed.
    let out = get(pod, "/other", &[], "2");
    assert_eq!(served(&out, "reviews-v1"), 2, "{out}");
    // Istio's metrics for answers the proxy made itself: the route's destination.
    assert!(
        r.daemon.metric_sum(
            "istio_requests_total",
            &[("response_code", "418"), ("source_workload", "client")]
        ) >= 1.0
    );
}

#[test]
fn source_namespace_query_params_without_headers_authority_and_port_select_routes() {
    let r = Reviews::builder("matchfields")
        .yaml(&vs(&format!(
            "  - match: [{{sourceNamespace: team-b}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
    headers: {{response: {{set: {{x-rule: source-namespace}}}}}}
  - match: [{{queryParams: {{debug: {{exact: '1'}}}}}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
    headers: {{response: {{set: {{x-rule: query}}}}}}
  - match: [{{withoutHeaders: {{x-legacy: {{}}}}, uri: {{prefix: /modern}}}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
    headers: {{response: {{set: {{x-rule: without-headers}}}}}}
  - match: [{{authority: {{exact: reviews.alt}}}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
    headers: {{response: {{set: {{x-rule: authority}}}}}}
  - match: [{{port: 8080}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
    headers: {{response: {{set: {{x-rule: port}}}}}}
  - route: [{{destination: {{host: {HOST}, subset: v1}}}}]
"
        )))
        .pod("shop", "client-a", &[("app", "client")])
        .pod("team-b", "client-b", &[("app", "client")])
        .start();
    let (a, b) = (&r.pods[0], &r.pods[1]);
    let rule = |out: &serde_json::Value| out["first"]["headers"]["x-rule"].clone();
    // sourceNamespace: the same request, two namespaces.
    let out = get(b, "/", &[], "3");
    assert_eq!(served(&out, "reviews-v2"), 3, "{out}");
    assert_eq!(rule(&out), "source-namespace");
    let out = get(a, "/", &[], "3");
    assert_eq!(served(&out, "reviews-v1"), 3, "{out}");
    // queryParams: exact value only.
    let out = get(a, "/items?debug=1&x=2", &[], "2");
    assert_eq!(
        (served(&out, "reviews-v2"), rule(&out)),
        (2, "query".into()),
        "{out}"
    );
    let out = get(a, "/items?debug=10", &[], "2");
    assert_eq!(served(&out, "reviews-v1"), 2, "{out}");
    // withoutHeaders: the rule applies only while the header is absent.
    let out = get(a, "/modern/x", &[], "2");
    assert_eq!(rule(&out), "without-headers", "{out}");
    let out = get(a, "/modern/x", &["x-legacy: 1"], "2");
    assert_eq!(served(&out, "reviews-v1"), 2, "{out}");
    // authority: the Host the app sent.
    let to = to();
    let out = a.pdtool(&["http", "--to", &to, "--host", "reviews.alt", "--count", "2"]);
    assert_eq!(rule(&out), "authority", "{out}");
    // port: the Service port the app dialled.
    let alt = to.replace(":80", ":8080");
    let out = a.pdtool(&["http", "--to", &alt, "--host", HOST, "--count", "2"]);
    assert_eq!(
        (served(&out, "reviews-v2"), rule(&out)),
        (2, "port".into()),
        "{out}"
    );
}

#[test]
fn round_robin_alternates_and_random_spreads() {
    let dr = |lb: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews-lb, namespace: shop}}
spec:
  host: {HOST}
  trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}
"
        )
    };
    // v2 answers after 50 ms: a least-request balancer would send it far fewer of
    // concurrent requests; round robin does not look.
    let r = Reviews::builder("rr")
        .yaml(&dr("ROUND_ROBIN"))
        .v2(proxy_tests::servers::HttpEcho {
            name: "reviews-v2".into(),
            delay: std::time::Duration::from_millis(50),
            ..Default::default()
        })
        .pod("shop", "client-0", &[("app", "client")])
        .start();
    let out = get(&r.pods[0], "/", &[], "100");
    // Round robin over two endpoints, one request at a time: strict alternation. Random
    // or least-request picks alternate 99 times in a row once in 2^99.
    let (v1, v2) = (served(&out, "reviews-v1"), served(&out, "reviews-v2"));
    assert_eq!(v1 + v2, 100, "{out}");
    assert_eq!(
        repeats(&out),
        0,
        "ROUND_ROBIN never picks the same one twice: {out}"
    );
    // Concurrently (4 connections × 20), with v2 slow: still an even split, where
    // least-request would favour the fast one.
    let to = to();
    let out = r.pods[0].pdtool(&[
        "http",
        "--to",
        &to,
        "--host",
        HOST,
        "--count",
        "20",
        "--parallel",
        "4",
    ]);
    let (v1, v2) = (served(&out, "reviews-v1"), served(&out, "reviews-v2"));
    assert_eq!(v1 + v2, 80, "{out}");
    assert!(
        v1.abs_diff(v2) <= 4,
        "ROUND_ROBIN with a slow v2: {v1}/{v2}: {out}"
    );
    drop(r);
    let r = Reviews::builder("random")
        .yaml(&dr("RANDOM"))
        .pod("shop", "client-0", &[("app", "client")])
        .start();
    let out = get(&r.pods[0], "/", &[], "200");
    let (v1, v2) = (served(&out, "reviews-v1"), served(&out, "reviews-v2"));
    assert_eq!(v1 + v2, 200, "{out}");
    // Binomial(200, ½): below 60 on one side has odds under 1e-8.
    assert!(v1 >= 60 && v2 >= 60, "RANDOM {v1}/{v2}");
    // And independent picks: the next pick repeats the last one half the time. Binomial
    // (199, ½) = 99.5 ± 7.05: 60–140 is 5.6 standard deviations each way (a false failure
    // about once in 50 million runs); round robin repeats 0 times.
    let r = repeats(&out);
    assert!(
        (60..=140).contains(&r),
        "RANDOM repeated its last pick {r} times of 199: {out}"
    );
}

/// How many times a request went to the same server as the one before it.
fn repeats(out: &serde_json::Value) -> usize {
    let order: Vec<&str> = out["order"]
        .as_array()
        .expect("pdtool's order")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    order.windows(2).filter(|w| w[0] == w[1]).count()
}

#[test]
fn maglev_consistent_hash_pins_each_user_end_to_end() {
    let r = Reviews::builder("maglev")
        .yaml(&format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews-hash, namespace: shop}}
spec:
  host: {HOST}
  trafficPolicy:
    loadBalancer:
      consistentHash: {{httpHeaderName: x-user, maglev: {{tableSize: 65537}}}}
"
        ))
        .pod("shop", "client-0", &[("app", "client")])
        .start();
    let mut by_backend = std::collections::BTreeMap::<String, u32>::new();
    for user in 0..24 {
        let header = format!("x-user: user-{user}");
        let out = get(&r.pods[0], "/", &[&header], "10");
        let v1 = served(&out, "reviews-v1");
        let v2 = served(&out, "reviews-v2");
        assert!(
            (v1, v2) == (10, 0) || (v1, v2) == (0, 10),
            "user {user} moved between backends: {v1}/{v2}"
        );
        *by_backend
            .entry(if v1 > 0 { "v1" } else { "v2" }.into())
            .or_default() += 1;
    }
    // 24 users on a 65,537-slot table over two endpoints land on both.
    assert_eq!(by_backend.len(), 2, "{by_backend:?}");
}

/// The remaining HTTP rule fields, one request each, checked where a user would look:
/// which version answered, what the upstream received, what the client got back.
#[test]
fn method_scheme_case_rewrites_redirects_faults_and_header_edits_do_what_istio_says() {
    let r = Reviews::builder("morefields")
        .yaml(&vs(&format!(
            "  - name: by-method
    match: [{{name: posts, method: {{exact: POST}}}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
    headers: {{response: {{set: {{x-rule: method}}}}}}
  - match: [{{uri: {{prefix: /CaseLess}}, ignoreUriCase: true}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
    headers: {{response: {{set: {{x-rule: ignore-case}}}}}}
  - match: [{{scheme: {{exact: https}}, uri: {{prefix: /scheme}}}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
    headers: {{response: {{set: {{x-rule: https-scheme}}}}}}
  - match: [{{uri: {{prefix: /to-https}}}}]
    redirect: {{scheme: https, port: 8443, uri: /secure}}
  - match: [{{uri: {{prefix: /authority}}}}]
    rewrite: {{authority: internal.reviews}}
    route: [{{destination: {{host: {HOST}, subset: v1}}}}]
  - match: [{{uri: {{prefix: /slow}}}}]
    fault: {{delay: {{percent: 100, fixedDelay: 300ms}}}}
    route: [{{destination: {{host: {HOST}, subset: v1}}}}]
  - match: [{{uri: {{prefix: /edit}}}}]
    headers:
      request: {{add: {{x-added: two}}}}
      response: {{add: {{x-resp-added: 'yes'}}, remove: [content-type]}}
    route:
    - destination: {{host: {HOST}, subset: v1}}
      headers: {{request: {{set: {{x-dest: v1}}}}, response: {{set: {{x-dest-resp: v1}}}}}}
  - route: [{{destination: {{host: {HOST}, subset: v1}}}}]
"
        )))
        .pod("shop", "client-0", &[("app", "client")])
        .start();
    let pod = &r.pods[0];
    let to = to();
    let rule = |out: &serde_json::Value| out["first"]["headers"]["x-rule"].clone();
    // method: a POST goes to v2, a GET does not.
    let out = pod.pdtool(&[
        "http",
        "--to",
        &to,
        "--host",
        HOST,
        "--body-bytes",
        "10",
        "--count",
        "2",
    ]);
    assert_eq!(
        (served(&out, "reviews-v2"), rule(&out)),
        (2, "method".into()),
        "{out}"
    );
    assert_eq!(served(&get(pod, "/", &[], "2"), "reviews-v1"), 2);
    // ignoreUriCase: /caseless matches the /CaseLess prefix.
    let out = get(pod, "/caseless/page", &[], "1");
    assert_eq!(rule(&out), "ignore-case", "{out}");
    // scheme: the app speaks plain http, so an `https` scheme match never matches it.
    let out = get(pod, "/scheme", &[], "1");
    assert_eq!(served(&out, "reviews-v1"), 1, "{out}");
    // redirect scheme and port.
    let out = get(pod, "/to-https/a", &[], "1");
    assert_eq!(out["first"]["status"], 301, "{out}");
    assert_eq!(
        out["first"]["headers"]["location"],
        format!("https://{HOST}:8443/secure"),
        "{out}"
    );
    // rewrite.authority: the upstream sees the new Host.
    let out = get(pod, "/authority", &[], "1");
    assert_eq!(
        out["first"]["body"]["headers"]["host"], "internal.reviews",
        "{out}"
    );
    // fault.delay.percent (Istio's integer form).
    let started = std::time::Instant::now();
    let out = get(pod, "/slow", &[], "1");
    assert_eq!(out["statuses"]["200"], 1, "{out}");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "delayed 300 ms: {:?}",
        started.elapsed()
    );
    // Header edits: the rule's request add, the destination's own request set, the
    // rule's response add and remove, the destination's response set.
    // The app's own x-added stays: add appends (the echo reports every value, in order).
    let out = get(pod, "/edit", &["x-added: one"], "1");
    let seen = &out["first"]["body"]["headers"];
    assert_eq!(seen["x-added"], "one,two", "{out}");
    assert_eq!(seen["x-dest"], "v1", "{out}");
    let headers = &out["first"]["headers"];
    assert_eq!(headers["x-resp-added"], "yes", "{out}");
    assert_eq!(headers["x-dest-resp"], "v1", "{out}");
    assert!(headers["content-type"].is_null(), "removed: {out}");
    // Rule and match names are shown where the rules are.
    let dump = r.daemon.config_dump();
    let rules = &dump["snapshot"]["routes"]["virtual_services"][HOST][0]["http"];
    assert_eq!(rules[0]["name"], "by-method", "{rules}");
    assert_eq!(rules[0]["matches"][0]["name"], "posts", "{rules}");
}

/// The other consistent-hash keys and ring sizes: a query parameter (with Istio's
/// deprecated top-level `minimumRingSize`) and the source IP (with `ringHash`).
#[test]
fn query_parameter_and_source_ip_hashing_pin_clients_end_to_end() {
    let r = Reviews::builder("hashkeys")
        .yaml(&format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews-hash, namespace: shop}}
spec:
  host: {HOST}
  trafficPolicy:
    loadBalancer:
      consistentHash: {{httpQueryParameterName: user, minimumRingSize: 64}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews-hash, namespace: team-b}}
spec:
  host: {HOST}
  trafficPolicy:
    loadBalancer:
      consistentHash: {{useSourceIp: true, ringHash: {{minimumRingSize: 2048}}}}
"
        ))
        .pod("shop", "client-0", &[("app", "client")])
        .pod("team-b", "client-b", &[("app", "client")])
        .start();
    let pinned = |out: &serde_json::Value| {
        let (v1, v2) = (served(out, "reviews-v1"), served(out, "reviews-v2"));
        assert!(
            (v1, v2) == (10, 0) || (v1, v2) == (0, 10),
            "moved between backends: {out}"
        );
        if v1 > 0 {
            "v1"
        } else {
            "v2"
        }
    };
    let mut by_backend = std::collections::BTreeSet::new();
    for user in 0..24 {
        let out = get(
            &r.pods[0],
            &format!("/items?user=u{user}&page=2"),
            &[],
            "10",
        );
        by_backend.insert(pinned(&out));
    }
    assert_eq!(by_backend.len(), 2, "users land on both backends");
    // By source IP: every request of the pod, whatever it carries, to one backend.
    let first = pinned(&get(&r.pods[1], "/a?user=x", &[], "10"));
    for path in ["/b?user=y", "/c", "/d?user=z"] {
        assert_eq!(pinned(&get(&r.pods[1], path, &[], "10")), first);
    }
    // The ring sizes asked for are the ones built (shown with the policy).
    let dump = r.daemon.config_dump().to_string();
    assert!(dump.contains("\"minimum_ring_size\":64"), "{dump}");
    assert!(dump.contains("\"minimum_ring_size\":2048"), "{dump}");
}

/// `connectionPool.tcp.connectTimeout` bounds the upstream connect, as Envoy's cluster
/// connect_timeout: an endpoint nobody answers for fails after it, not after the daemon's
/// default.
#[test]
fn connect_timeout_bounds_the_upstream_connect() {
    let r = Reviews::builder("conntimeout")
        .yaml(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dead, namespace: shop}
spec:
  hosts: [dead.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 198.18.0.199}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dead, namespace: shop}
spec:
  host: dead.example
  trafficPolicy:
    connectionPool: {tcp: {connectTimeout: 300ms}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: dead, namespace: shop}
spec:
  hosts: [dead.example]
  http:
  - retries: {attempts: 0}
    route: [{destination: {host: dead.example}}]
",
        )
        .pod("shop", "client-0", &[("app", "client")])
        .flags(&["--connect-timeout-ms", "5000"])
        .start();
    let to = to();
    let started = std::time::Instant::now();
    let out = r.pods[0].pdtool(&["http", "--to", &to, "--host", "dead.example"]);
    let took = started.elapsed();
    assert_eq!(out["statuses"]["503"], 1, "{out}");
    assert!(
        took >= std::time::Duration::from_millis(280)
            && took < std::time::Duration::from_millis(1500),
        "failed after {took:?}: the rule's 300 ms, not the daemon's 5 s: {out}"
    );
}

/// EnvoyFilter as Istio applies it: the root namespace's filters reach every workload,
/// `priority` orders patches (lower first, so a later one overwrites), `append: false` and
/// `append_action` decide how a header is added, `routeConfiguration.portNumber` picks the
/// port, `value.timeout` is read as the route's, and an added virtual host's routes carry
/// their own `match.path`, `route.timeout`, `request_headers_to_add` and `name`.
#[test]
fn envoy_filters_apply_in_priority_order_mesh_wide_and_per_added_route() {
    let slow = proxy_tests::servers::HttpEcho {
        name: "reviews-v2".into(),
        delay: std::time::Duration::from_millis(600),
        ..Default::default()
    };
    let merge = |name: &str, ns: &str, extra: &str, port: u16, value: &str| {
        format!(
            "apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {{name: {name}, namespace: {ns}}}
spec:
{extra}  configPatches:
  - applyTo: HTTP_ROUTE
    match: {{context: SIDECAR_OUTBOUND, routeConfiguration: {{portNumber: {port}}}}}
    patch:
      operation: MERGE
      value: {value}
---
"
        )
    };
    let yaml = merge(
        "overwrite",
        "shop",
        "  priority: 10\n  workloadSelector: {labels: {app: client}}\n",
        80,
        "{request_headers_to_add: [{header: {key: x-order, value: ten}, append: false}]}",
    ) + &merge(
        "mesh-wide",
        "istio-system",
        "",
        80,
        &format!(
            "{{route: {{cluster: 'outbound|80|v1|{HOST}'}}, request_headers_to_add: [{{header: {{key: x-order, value: zero}}}}, {{header: {{key: x-mesh, value: root}}}}, {{header: {{key: x-keep, value: filter}}, append_action: ADD_IF_ABSENT}}]}}"
        ),
    ) + &merge(
        "alt-timeout",
        "shop",
        "",
        8080,
        &format!("{{timeout: 200ms, route: {{cluster: 'outbound|8080|v2|{HOST}'}}}}"),
    ) + &format!(
        "apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {{name: special-host, namespace: shop}}
spec:
  priority: 20
  configPatches:
  - applyTo: VIRTUAL_HOST
    match: {{context: SIDECAR_OUTBOUND, routeConfiguration: {{portNumber: 80}}}}
    patch:
      operation: ADD
      value:
        name: special
        domains: [special.example]
        routes:
        - name: exact-one
          match: {{path: /exact}}
          route: {{cluster: 'outbound|80|v2|{HOST}', timeout: 200ms}}
        - match: {{prefix: /}}
          route: {{cluster: 'outbound|80|v1|{HOST}'}}
          request_headers_to_add: [{{header: {{key: x-vhost, value: special}}}}]
"
    );
    let r = Reviews::builder("envoyfilter")
        .v2(slow)
        .yaml(&yaml)
        .pod("shop", "client-0", &[("app", "client")])
        .start();
    let pod = &r.pods[0];
    let to = to();
    // Port 80, the generated virtual host: the root filter (priority 0) sends to v1 and
    // appends x-order: zero; then "overwrite" (priority 10, listed first) replaces it.
    // The app sends its own x-order too: the root filter's append keeps it and adds
    // "zero"; the later filter's `append: false` replaces every value with "ten". In the
    // other priority order the result would be "ten,zero"; with append ignored,
    // "app,zero,ten".
    let out = get(pod, "/", &["x-keep: client", "x-order: app"], "1");
    let seen = &out["first"]["body"]["headers"];
    assert_eq!(served(&out, "reviews-v1"), 1, "{out}");
    assert_eq!(
        seen["x-order"], "ten",
        "priority order, append: false: {out}"
    );
    assert_eq!(
        seen["x-mesh"], "root",
        "the root namespace's filter applies: {out}"
    );
    assert_eq!(
        seen["x-keep"], "client",
        "ADD_IF_ABSENT keeps the app's: {out}"
    );
    // Port 8080: value.timeout as the route timeout (v2 answers after 600 ms).
    let alt = to.replace(":80", ":8080");
    let started = std::time::Instant::now();
    let out = pod.pdtool(&["http", "--to", &alt, "--host", HOST]);
    assert_eq!(out["statuses"]["504"], 1, "{out}");
    assert!(
        started.elapsed() < std::time::Duration::from_millis(550),
        "{:?}",
        started.elapsed()
    );
    // The added virtual host: its exact-path route's own timeout, and its prefix route's
    // own header.
    let out = pod.pdtool(&[
        "http",
        "--to",
        &to,
        "--host",
        "special.example",
        "--path",
        "/exact",
    ]);
    assert_eq!(out["statuses"]["504"], 1, "{out}");
    let out = pod.pdtool(&[
        "http",
        "--to",
        &to,
        "--host",
        "special.example",
        "--path",
        "/other",
    ]);
    assert_eq!(served(&out, "reviews-v1"), 1, "{out}");
    assert_eq!(
        out["first"]["body"]["headers"]["x-vhost"], "special",
        "{out}"
    );
    let dump = r.daemon.config_dump().to_string();
    assert!(
        dump.contains("\"exact-one\""),
        "the route's name is kept: {dump}"
    );
}

/// ServiceEntry endpoints as WorkloadEntries: `ports` maps the entry's port `name` to each
/// endpoint's own port, `labels` feed DestinationRule subsets, and `weight` shares the
/// traffic (round robin exactly, least request by weighted draws).
#[test]
fn serviceentry_endpoint_ports_labels_and_weights_are_honoured() {
    let mut r = Reviews::builder("epweights")
        .pod("shop", "client-0", &[("app", "client")])
        .start();
    let mut yaml = String::new();
    let mut ips = Vec::new();
    for (name, port) in [("light", 8081), ("heavy", 8082)] {
        let h = r.node.host(name);
        r.servers.http_echo(
            &h,
            port,
            proxy_tests::servers::HttpEcho {
                name: name.into(),
                ..Default::default()
            },
        );
        ips.push(h.ip);
    }
    for (host, lb) in [
        ("rr.example", "ROUND_ROBIN"),
        ("lr.example", "LEAST_REQUEST"),
    ] {
        yaml += &format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {host}, namespace: shop}}
spec:
  hosts: [{host}]
  ports: [{{number: 80, name: web, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: {a}, ports: {{web: 8081}}, labels: {{size: light}}, weight: 1}}
  - {{address: {b}, ports: {{web: 8082}}, labels: {{size: heavy}}, weight: 3}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}, namespace: shop}}
spec:
  host: {host}
  trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}
  subsets: [{{name: light, labels: {{size: light}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {host}, namespace: shop}}
spec:
  hosts: [{host}]
  http:
  - match: [{{uri: {{prefix: /light}}}}]
    route: [{{destination: {{host: {host}, subset: light}}}}]
  - route: [{{destination: {{host: {host}}}}}]
---
",
            a = ips[0],
            b = ips[1]
        );
    }
    r.node.write_config("weights.yaml", &yaml);
    let pod = &r.pods[0];
    let to = to();
    let ask = |host: &str, path: &str, count: &str| {
        pod.pdtool(&[
            "http", "--to", &to, "--host", host, "--path", path, "--count", count,
        ])
    };
    assert!(
        proxy_tests::wait_for(std::time::Duration::from_secs(5), || {
            // (Until then, the unknown Host goes where the app dialled: reviews.)
            let out = ask("rr.example", "/", "1");
            (served(&out, "light") + served(&out, "heavy") == 1).then_some(())
        })
        .is_some(),
        "the entries are loaded"
    );
    // Round robin over weights 1:3, exactly, each at its own port.
    let out = ask("rr.example", "/", "400");
    assert_eq!(out["statuses"]["200"], 400, "{out}");
    let light = served(&out, "light");
    assert!(
        (99..=101).contains(&light),
        "1 in 4 to the light endpoint: {out}"
    );
    // Least request (Istio's default) by weighted draws: about 1 in 4 (±5 σ).
    let out = ask("lr.example", "/", "400");
    let light = served(&out, "light");
    assert!((60..=140).contains(&light), "about 100 of 400: {out}");
    // Labels select the subset.
    let out = ask("lr.example", "/light/x", "20");
    assert_eq!(served(&out, "light"), 20, "{out}");
}

/// `connectionPool.http.maxRetries`: retries in flight to a destination at once (Envoy's
/// retry circuit breaker). Over it, the failed answer stands and the overflow is counted.
#[test]
fn max_retries_caps_retries_in_flight_and_counts_the_overflow() {
    let failing = proxy_tests::servers::HttpEcho {
        name: "reviews-v2".into(),
        fail_every: 1,
        delay: std::time::Duration::from_millis(30),
        ..Default::default()
    };
    let r = Reviews::builder("maxretries")
        .v2(failing)
        .yaml(&vs(&format!(
            "  - retries: {{attempts: 3, retryOn: 5xx}}
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
"
        )))
        .yaml(&format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews-retries, namespace: shop}}
spec:
  host: {HOST}
  trafficPolicy: {{connectionPool: {{http: {{maxRetries: 1}}}}}}
  subsets: [{{name: v2, labels: {{version: v2}}}}]
"
        ))
        .pod("shop", "client-0", &[("app", "client")])
        .start();
    let out = r.pods[0].pdtool(&[
        "http",
        "--to",
        &to(),
        "--host",
        HOST,
        "--parallel",
        "8",
        "--count",
        "5",
    ]);
    assert_eq!(
        out["statuses"]["503"], 40,
        "the failed answers stand: {out}"
    );
    let overflows = r
        .daemon
        .metric_sum("proxy_daemon_retry_overflows_total", &[]);
    // 40 requests would make 120 retries; with one retry in flight at a time most of those
    // that overlap are refused.
    assert!(
        (20.0..120.0).contains(&overflows),
        "retries refused for the cap: {overflows}"
    );
}

/// `simple: PASSTHROUGH` (Envoy's ORIGINAL_DST): the connection goes to the address the
/// app dialled, not to a balanced endpoint.
#[test]
fn passthrough_load_balancing_keeps_the_dialled_endpoint() {
    let mut r = Reviews::builder("lbpassthrough")
        .pod("shop", "client-0", &[("app", "client")])
        .start();
    let mut hosts = Vec::new();
    for name in ["pod-a", "pod-b"] {
        let h = r.node.host(name);
        r.servers.http_echo(
            &h,
            80,
            proxy_tests::servers::HttpEcho {
                name: name.into(),
                ..Default::default()
            },
        );
        hosts.push(h);
    }
    let entry = |lb: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pods, namespace: shop}}
spec:
  hosts: [pods.example]
  addresses: [{a}/32, {b}/32]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {a}}}, {{address: {b}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pods, namespace: shop}}
spec:
  host: pods.example
  trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}
",
            a = hosts[0].ip,
            b = hosts[1].ip
        )
    };
    let pod = &r.pods[0];
    let to_b = hosts[1].addr(80).to_string();
    let ask = || {
        pod.pdtool(&[
            "http",
            "--to",
            &to_b,
            "--host",
            "pods.example",
            "--count",
            "40",
        ])
    };
    r.node.write_config("pods.yaml", &entry("ROUND_ROBIN"));
    let balanced = proxy_tests::wait_for(std::time::Duration::from_secs(5), || {
        let out = ask();
        (served(&out, "pod-a") > 0 && served(&out, "pod-b") > 0).then_some(())
    });
    assert!(balanced.is_some(), "ROUND_ROBIN spreads over both");
    r.node.write_config("pods.yaml", &entry("PASSTHROUGH"));
    let kept = proxy_tests::wait_for(std::time::Duration::from_secs(5), || {
        let out = ask();
        (served(&out, "pod-b") == 40).then_some(())
    });
    assert!(
        kept.is_some(),
        "PASSTHROUGH keeps the dialled pod-b: {}",
        ask()
    );
}
