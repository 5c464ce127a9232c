//! Cluster mode end to end: the daemon runs with `--kubernetes` against the stand-in API
//! server (real list/watch protocol over HTTPS, objects in their real JSON shapes), with
//! real eBPF capture of network-namespace pods. What a user of a cluster would check:
//! pods of this node are enrolled and others are not, rules created after start route,
//! label changes and deletions take effect, API trouble never costs traffic, readiness
//! waits for the first sync, bad objects are skipped and reported, credentials come from
//! Secrets of the rule's own namespace, and both kubelet cgroup layouts are found.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use proxy_tests::{
    collector::{Collector, Wire},
    daemon::Daemon,
    kube_api::{
        configmap_json, endpointslice_json, istio_json, namespace_json, pod_json, secret_json,
        service_json, KubeApi,
    },
    node::{CgroupDriver, Host, Node, Qos},
    pki::TestCa,
    servers::{HttpEcho, HttpsEcho, Servers},
    wait_for, Pod,
};
use serde_json::{json, Value};

const NODE: &str = "test-node";
const CLUSTER_IP: &str = "198.18.0.250";
const HOST: &str = "reviews.backend.svc.cluster.local";

/// A node, its API server, and reviews v1/v2 (HTTP echo servers on other "nodes") behind a
/// Service with an EndpointSlice, as a cluster would have them.
struct Cluster {
    node: Node,
    servers: Servers,
    api: KubeApi,
    kubeconfig: PathBuf,
    _backends: Vec<Host>,
}

impl Cluster {
    fn new(tag: &str) -> Self {
        let mut node = Node::new(tag);
        let servers = Servers::new();
        let api = KubeApi::start();
        let kubeconfig = node.work_dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let mut backends = Vec::new();
        let mut endpoints = Vec::new();
        for version in ["v1", "v2"] {
            let host = node.host(&format!("reviews-{version}"));
            servers.http_echo(
                &host,
                9080,
                HttpEcho {
                    name: format!("reviews-{version}"),
                    ..Default::default()
                },
            );
            let pod_name = format!("reviews-{version}-7f9c6-abcde");
            api.apply(pod_json(
                "backend",
                &pod_name,
                "other-node",
                &host.ip.to_string(),
                &[("app", "reviews"), ("version", version)],
                Some(&format!("reviews-{version}-7f9c6")),
            ));
            endpoints.push((host.ip.to_string(), pod_name));
            backends.push(host);
        }
        api.apply(namespace_json("backend", &[]));
        api.apply(namespace_json(
            "shop",
            &[("nodeproxy.io/capture", "enabled")],
        ));
        api.apply(service_json(
            "backend",
            "reviews",
            CLUSTER_IP,
            &[("http", 80, 9080)],
            &[("app", "reviews")],
        ));
        let eps: Vec<(&str, &str, &str, bool)> = endpoints
            .iter()
            .map(|(ip, pod)| (ip.as_str(), "other-node", pod.as_str(), true))
            .collect();
        api.apply(endpointslice_json(
            "backend",
            Some("reviews-x7k2p"),
            "reviews",
            &eps,
            &[("http", 9080)],
        ));
        Self {
            node,
            servers,
            api,
            kubeconfig,
            _backends: backends,
        }
    }

    /// A harness pod made known to the API as a Deployment's pod on `node_name`.
    fn pod_on(&mut self, name: &str, node_name: &str, labels: &[(&str, &str)]) -> Pod {
        let pod = self.node.pod("shop", name);
        self.register(&pod, node_name, labels, |_| {});
        pod
    }

    fn register(
        &self,
        pod: &Pod,
        node_name: &str,
        labels: &[(&str, &str)],
        edit: impl FnOnce(&mut Value),
    ) {
        let mut j = pod_json(
            &pod.namespace,
            &pod.name,
            node_name,
            &pod.host.ip.to_string(),
            labels,
            Some("client-6b8d9"),
        );
        j["metadata"]["uid"] = pod.uid.clone().into();
        edit(&mut j);
        self.api.apply(j);
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--kubernetes".into(),
            "--kubeconfig".into(),
            self.kubeconfig.display().to_string(),
            "--kube-rediscovery-secs".into(),
            "1".into(),
        ]
    }

    fn daemon(&self, extra: &[&str]) -> Daemon {
        let mut args = self.args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(&self.node, &refs)
    }

    fn subsets(&self, version: &str) {
        self.api.apply(istio_json(
            version,
            "DestinationRule",
            "backend",
            "reviews",
            json!({"host": HOST, "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}}]}),
        ));
    }

    fn route(&self, version: &str, rules: Value) {
        self.api.apply(istio_json(
            version,
            "VirtualService",
            "backend",
            "reviews",
            json!({"hosts": [HOST], "http": rules}),
        ));
    }
}

/// Which reviews server answered one request from `pod` (or the error).
fn served_by(pod: &Pod) -> String {
    let out = pod.pdtool(&["http", "--to", &format!("{CLUSTER_IP}:80"), "--host", HOST]);
    out["first"]["body"]["server"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("error: {out}"))
}

/// Waits until `pod`'s requests are answered by `server` (a changed rule has arrived):
/// five in a row, so a balancer's lucky pick does not count.
fn wait_served_by(pod: &Pod, server: &str, timeout: Duration, daemon: &Daemon) -> Duration {
    let started = Instant::now();
    wait_for(timeout, || {
        (0..5).all(|_| served_by(pod) == server).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "requests not served by {server} within {timeout:?} (last: {}); log:\n{}",
            served_by(pod),
            daemon.log_text()
        )
    });
    started.elapsed()
}

fn workload_gone_within(daemon: &Daemon, uid: &str, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    wait_for(timeout, || {
        daemon.workload_state(uid).is_none().then_some(())
    })
    .map(|_| started.elapsed())
}

#[test]
fn enrols_this_nodes_pods_routes_and_follows_labels_and_deletions() {
    let mut c = Cluster::new("k8senrol");
    // Only v1beta1 and v1alpha3 are served: the daemon must find them there.
    c.api.install_istio_crds(&["v1beta1", "v1alpha3"]);
    c.subsets("v1beta1");
    let client = c.pod_on("client-1", NODE, &[("app", "client")]);
    let elsewhere = c.pod_on("elsewhere-1", "other-node", &[("app", "client")]);
    let daemon = c.daemon(&[]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(10));
    assert!(
        daemon.workload_state(&elsewhere.uid).is_none(),
        "a pod of another node is not ours: {}",
        daemon.config_dump()["workloads"]
    );
    let requests = c.api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("/api/v1/pods") && r.contains("spec.nodeName%3Dtest-node")),
        "this node's pods are listed with a field selector: {requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.contains("networking.istio.io/v1beta1/virtualservices")),
        "VirtualServices watched where they are served: {requests:?}"
    );

    // No VirtualService yet: the Service's endpoints, both versions.
    let first = served_by(&client);
    assert!(first.starts_with("reviews-v"), "{first}");
    // The other node's pod is not captured: nothing serves the cluster IP for it.
    let direct = elsewhere.pdtool(&["http", "--to", &format!("{CLUSTER_IP}:80"), "--host", HOST]);
    assert!(
        direct["first"]["body"]["server"].is_null(),
        "an uncaptured pod cannot reach a cluster IP: {direct}"
    );

    // A VirtualService created after start routes.
    c.route(
        "v1beta1",
        json!([{"route": [{"destination": {"host": HOST, "subset": "v2"}}]}]),
    );
    let took = wait_served_by(&client, "reviews-v2", Duration::from_secs(5), &daemon);
    eprintln!(
        "VirtualService created → routing in {} ms",
        took.as_millis()
    );
    for _ in 0..5 {
        assert_eq!(served_by(&client), "reviews-v2");
    }

    // A label change re-evaluates sourceLabels for the pod's next connections.
    c.route(
        "v1beta1",
        json!([
            {"match": [{"sourceLabels": {"track": "canary"}}],
             "route": [{"destination": {"host": HOST, "subset": "v1"}}]},
            {"route": [{"destination": {"host": HOST, "subset": "v2"}}]}
        ]),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(served_by(&client), "reviews-v2", "not a canary yet");
    c.api.patch_labels(
        "v1",
        "Pod",
        "shop",
        "client-1",
        &[("track", Some("canary"))],
    );
    let took = wait_served_by(&client, "reviews-v1", Duration::from_secs(5), &daemon);
    eprintln!(
        "pod relabelled → sourceLabels route in {} ms",
        took.as_millis()
    );
    let before = daemon.metric_sum(
        "istio_requests_total",
        &[("source_workload", "client"), ("destination_version", "v1")],
    );
    assert!(
        before >= 1.0,
        "metrics name the source workload by its Deployment"
    );

    // A backend pod turns unready (the EndpointSlice controller marks its endpoint): no
    // more traffic to it while the service's other endpoint serves; ready again, it serves.
    c.route(
        "v1beta1",
        json!([{"route": [{"destination": {"host": HOST}}]}]),
    );
    let set_ready = |ready: bool| {
        c.api.modify(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            "backend",
            "reviews-x7k2p",
            |s| {
                for e in s["endpoints"].as_array_mut().unwrap() {
                    if e["targetRef"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("reviews-v1"))
                    {
                        e["conditions"]["ready"] = ready.into();
                        e["conditions"]["serving"] = ready.into();
                    }
                }
            },
        );
    };
    set_ready(false);
    wait_for(Duration::from_secs(5), || {
        (0..10)
            .all(|_| served_by(&client) == "reviews-v2")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "an unready endpoint still gets traffic; log:\n{}",
            daemon.log_text()
        )
    });
    set_ready(true);
    wait_for(Duration::from_secs(5), || {
        (0..20)
            .any(|_| served_by(&client) == "reviews-v1")
            .then_some(())
    })
    .expect("ready again, the endpoint serves");

    // A pod created while the daemon runs: from the API event to enrolment.
    let second = c.node.pod("shop", "client-2");
    let created = Instant::now();
    c.register(&second, NODE, &[("app", "client")], |_| {});
    daemon.wait_enrolled(&second.uid, Duration::from_secs(5));
    let enrol_ms = created.elapsed().as_millis();
    eprintln!("pod created in the API → enrolled in {enrol_ms} ms");
    assert!(enrol_ms < 2000, "enrolled in {enrol_ms} ms");

    // Deletion: the pod's listener and map entries go within one second.
    c.api.delete("v1", "Pod", "shop", "client-2");
    let gone =
        workload_gone_within(&daemon, &second.uid, Duration::from_secs(1)).unwrap_or_else(|| {
            panic!(
                "deleted pod still enrolled after 1 s; log:\n{}",
                daemon.log_text()
            )
        });
    eprintln!(
        "pod deleted in the API → unenrolled in {} ms",
        gone.as_millis()
    );
    let out = second.pdtool(&["http", "--to", &format!("{CLUSTER_IP}:80"), "--host", HOST]);
    assert!(
        out["first"]["body"]["server"].is_null(),
        "a deleted pod's connects are no longer captured: {out}"
    );
    assert!(daemon.log_text().contains("pod unenrolled"));
}

#[test]
fn api_trouble_never_costs_traffic_and_changes_resume() {
    let mut c = Cluster::new("k8strouble");
    c.api.install_istio_crds(&["v1", "v1beta1", "v1alpha3"]);
    // No bookmarks: each watch's last resourceVersion is its own kind's last event, so after
    // other changes and a compaction, resuming from it gets 410 Gone.
    c.api.set_bookmark_interval(Duration::from_secs(3600));
    c.subsets("v1");
    c.route(
        "v1",
        json!([{"route": [{"destination": {"host": HOST, "subset": "v2"}}]}]),
    );
    let client = c.pod_on("client-1", NODE, &[("app", "client")]);
    let daemon = c.daemon(&[]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(10));
    wait_served_by(&client, "reviews-v2", Duration::from_secs(5), &daemon);

    // History compacted and every watch dropped: re-watching from the old
    // resourceVersion gets 410 Gone, and the daemon re-lists.
    c.api.apply(proxy_tests::kube_api::configmap_json(
        "shop",
        "unrelated",
        &[("k", "v")],
    ));
    c.api.compact();
    let dropped = c.api.drop_watches();
    assert!(dropped >= 5, "the daemon had its watches open: {dropped}");
    for _ in 0..10 {
        assert_eq!(served_by(&client), "reviews-v2", "traffic through the drop");
    }
    c.route(
        "v1",
        json!([{"route": [{"destination": {"host": HOST, "subset": "v1"}}]}]),
    );
    wait_served_by(&client, "reviews-v1", Duration::from_secs(10), &daemon);
    assert!(
        wait_for(Duration::from_secs(5), || (c.api.open_watches() >= 10)
            .then_some(()))
        .is_some(),
        "watches re-opened: {}",
        c.api.open_watches()
    );
    assert_eq!(
        daemon.workload_state(&client.uid).unwrap()["state"],
        "enrolled",
        "no state lost"
    );

    // The API goes down: the last good snapshot keeps serving, readiness holds.
    c.api.set_available(false);
    let until = Instant::now() + Duration::from_secs(3);
    let mut served = 0;
    while Instant::now() < until {
        assert_eq!(
            served_by(&client),
            "reviews-v1",
            "served while the API is down"
        );
        served += 1;
    }
    assert!(served >= 5);
    assert!(
        daemon.is_ready(),
        "a synced daemon stays ready while the API is down"
    );
    let errors = daemon.metric_sum("proxy_daemon_kubernetes_watch_errors_total", &[]);
    assert!(
        errors >= 1.0,
        "API errors are counted: {errors}\n{}\nlog:\n{}",
        daemon
            .metrics_text()
            .lines()
            .filter(|l| l.contains("kubernetes"))
            .collect::<Vec<_>>()
            .join("\n"),
        daemon.log_text()
    );
    // Changes made while it was down arrive once it is back.
    c.api.set_available(true);
    c.route(
        "v1",
        json!([{"route": [{"destination": {"host": HOST, "subset": "v2"}}]}]),
    );
    let took = wait_served_by(&client, "reviews-v2", Duration::from_secs(20), &daemon);
    eprintln!("API back → change applied in {} ms", took.as_millis());
    let gone = daemon.metric_sum(
        "proxy_daemon_kubernetes_watch_errors_total",
        &[("reason", "gone")],
    );
    let log = daemon.log_text();
    assert!(
        gone >= 1.0 || log.contains("410"),
        "the expired watch was seen as 410 Gone (gone={gone}); log:\n{log}"
    );
}

#[test]
fn readiness_waits_for_the_first_sync_and_bad_objects_are_skipped() {
    let mut c = Cluster::new("k8sready");
    let client = c.pod_on("client-1", NODE, &[("app", "client")]);
    c.api.set_available(false);
    let mut args = c.args();
    args.push("--log-level".into());
    args.push("info".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::spawn(&c.node, &refs);
    // Not ready while the API cannot be listed, and it says what it waits for.
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < Duration::from_secs(3) {
        assert!(
            !daemon.exited(),
            "daemon exited; log:\n{}",
            daemon.log_text()
        );
        if let Some((status, body)) = daemon.readiness() {
            assert_eq!(status, 503, "ready before any list: {body}");
            last = Some(body);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = last.expect("the health endpoint answered");
    assert!(body.contains("kubernetes: initial list of Pod"), "{body}");
    assert!(
        wait_for(Duration::from_secs(5), || daemon
            .log_text()
            .contains("waiting for the first list")
            .then_some(()))
        .is_some(),
        "the log says what readiness waits for:\n{}",
        daemon.log_text()
    );
    c.api.set_available(true);
    daemon.wait_ready(Duration::from_secs(20));
    daemon.wait_enrolled(&client.uid, Duration::from_secs(5));
    let log = daemon.log_text();
    assert!(
        log.contains("its CRD is not installed"),
        "one line says the Istio kinds are absent:\n{log}"
    );
    // Istio's 8 kinds and the Gateway API's HTTPRoute and GRPCRoute.
    assert_eq!(
        log.matches("not served by this cluster").count(),
        10,
        "one line per kind, not one per retry:\n{log}"
    );

    // Istio installed later: picked up without a restart.
    c.api.install_istio_crds(&["v1"]);
    c.subsets("v1");
    // One bad object (a field Istio does not have) and one good: the good one applies.
    c.api.apply(istio_json(
        "v1",
        "VirtualService",
        "shop",
        "typo",
        json!({"hosts": ["details.shop.svc.cluster.local"], "htttp": []}),
    ));
    c.route(
        "v1",
        json!([{"route": [{"destination": {"host": HOST, "subset": "v1"}}]}]),
    );
    wait_served_by(&client, "reviews-v1", Duration::from_secs(10), &daemon);
    for _ in 0..5 {
        assert_eq!(served_by(&client), "reviews-v1");
    }
    let dump = daemon.config_dump();
    let errors = dump["config"]["last_error"].to_string();
    assert!(
        errors.contains("VirtualService/shop/typo") && errors.contains("htttp"),
        "the bad object is reported by name: {errors}"
    );
    assert_eq!(
        daemon.metric_sum(
            "proxy_daemon_config_rejected_objects",
            &[("kind", "VirtualService")]
        ),
        1.0
    );
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("VirtualService/shop/typo"))
        .unwrap_or_else(|| panic!("no log line names the bad object:\n{log}"));
    assert!(line.contains("apiserver:"), "{line}");
    assert_eq!(
        log.matches("VirtualService/shop/typo").count(),
        1,
        "reported once, not on every recompile:\n{log}"
    );
    // A bad edit of a rule that works: its last good version keeps routing.
    c.api.modify(
        "networking.istio.io/v1",
        "VirtualService",
        "backend",
        "reviews",
        |vs| {
            vs["spec"]["http"] = json!([{"route": [
            {"destination": {"host": HOST, "subset": "v2"}, "weight": 50},
            {"destination": {"host": HOST, "subset": "v2"}, "weight": 40}]}]);
        },
    );
    assert!(
        wait_for(Duration::from_secs(5), || daemon
            .log_text()
            .contains("its last good version keeps serving")
            .then_some(()))
        .is_some(),
        "the bad edit is reported; log:\n{}",
        daemon.log_text()
    );
    for _ in 0..5 {
        assert_eq!(
            served_by(&client),
            "reviews-v1",
            "the last good rule still routes"
        );
    }
    // Fixed: the reports go.
    c.route(
        "v1",
        json!([{"route": [{"destination": {"host": HOST, "subset": "v2"}}]}]),
    );
    wait_served_by(&client, "reviews-v2", Duration::from_secs(5), &daemon);
    c.api
        .delete("networking.istio.io/v1", "VirtualService", "shop", "typo");
    assert!(
        wait_for(Duration::from_secs(5), || (daemon.metric_sum(
            "proxy_daemon_config_rejected_objects",
            &[("kind", "VirtualService")]
        ) == 0.0)
            .then_some(()))
        .is_some(),
        "rejected count back to 0"
    );
    assert!(
        dump["kubernetes"]["VirtualService"]["synced"] == true,
        "{}",
        dump["kubernetes"]
    );
}

#[test]
fn tls_credentials_come_from_a_secret_of_the_clients_own_namespace() {
    let mut c = Cluster::new("k8stls");
    c.api.install_istio_crds(&["v1", "v1beta1", "v1alpha3"]);
    let ca = TestCa::new("test-ca");
    let client_ca = TestCa::new("client-ca");
    let server = c.node.host("mtls");
    let leaf = ca.server(
        &[
            "api.partner.test",
            "other.partner.test",
            "fresh.partner.test",
        ],
        false,
    );
    c.servers.https_echo(
        &server,
        443,
        HttpsEcho {
            name: "partner-tls",
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            client_ca_pem: Some(client_ca.cert_pem.clone()),
            h2: false,
        },
    );
    let hosts = c.node.work_dir.join("hosts");
    std::fs::write(
        &hosts,
        format!(
            "{ip} api.partner.test\n{ip} other.partner.test\n{ip} fresh.partner.test\n",
            ip = server.ip
        ),
    )
    .unwrap();
    let cert = client_ca.client("client.shop");
    c.api.apply(namespace_json("egress", &[]));
    let secret = |ns: &str| {
        secret_json(
            ns,
            "partner-client",
            "kubernetes.io/tls",
            &[
                ("tls.crt", cert.cert_pem.as_bytes()),
                ("tls.key", cert.key_pem.as_bytes()),
                ("ca.crt", ca.cert_pem.as_bytes()),
            ],
        )
    };
    // As in Istio, a credential serves the pods of its own namespace: the client pod is in
    // `shop`, whose rules and Secret it may use. `egress` (the hosts' namespace, with no
    // pods on this node) has a rule for another host naming a Secret of the same name,
    // which exists there too: the rule applies to shop's pods (a host's own namespace's
    // rule does), its credential is not lent to them.
    c.api.apply(secret("shop"));
    c.api.apply(secret("egress"));
    for (ns, host) in [
        ("shop", "api.partner.test"),
        ("egress", "other.partner.test"),
        ("shop", "fresh.partner.test"),
    ] {
        c.api.apply(istio_json(
            "v1",
            "ServiceEntry",
            "egress",
            host,
            json!({"hosts": [host], "ports": [{"number": 80, "targetPort": 443, "name": "http", "protocol": "HTTP"}],
                   "resolution": "DNS"}),
        ));
        c.api.apply(istio_json(
            "v1",
            "DestinationRule",
            ns,
            host,
            json!({"host": host, "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "partner-client"}}}),
        ));
    }
    let client = c.pod_on("client-1", NODE, &[("app", "client")]);
    let daemon = c.daemon(&["--hosts-file", hosts.to_str().unwrap()]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(10));
    let get =
        |host: &str| client.pdtool(&["http", "--to", &server.addr(80).to_string(), "--host", host]);
    let ok = wait_for(Duration::from_secs(10), || {
        let out = get("api.partner.test");
        (out["first"]["status"] == 200).then_some(out)
    })
    .unwrap_or_else(|| {
        panic!(
            "mTLS with the Secret's certificate; log:\n{}",
            daemon.log_text()
        )
    });
    assert_eq!(ok["first"]["body"]["client_cert"], true, "{ok}");
    assert_eq!(ok["first"]["body"]["sni"], "api.partner.test");
    let other = get("other.partner.test");
    assert_eq!(
        other["first"]["status"], 503,
        "egress's credential is never lent to a pod of shop: {other}"
    );
    assert!(
        daemon.log_text().contains("pods of shop cannot use it"),
        "the refusal says why; log:\n{}",
        daemon.log_text()
    );
    let requests = c.api.requests();
    // One list+watch of shop's Secrets (filtered in the daemon), not one per name.
    let shop_secret_requests = requests
        .iter()
        .filter(|r| r.contains("/namespaces/shop/secrets"))
        .count();
    assert!(
        (1..=4).contains(&shop_secret_requests),
        "shop's Secrets are watched once: {requests:?}"
    );
    assert!(
        !requests
            .iter()
            .any(|r| r.contains("/namespaces/egress/secrets")),
        "a namespace without pods on this node has its Secrets left unread: {requests:?}"
    );
    assert!(
        !requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/secrets")),
        "Secrets are never listed cluster-wide: {requests:?}"
    );
    // A deleted Secret is not presented on new connections (open ones keep theirs, as
    // Envoy's do): a host not contacted before now fails its handshake.
    c.api.delete("v1", "Secret", "shop", "partner-client");
    assert!(
        wait_for(Duration::from_secs(5), || daemon
            .log_text()
            .contains("secret deleted")
            .then_some(()))
        .is_some(),
        "the deletion is seen; log:\n{}",
        daemon.log_text()
    );
    let failed = wait_for(Duration::from_secs(15), || {
        let out = get("fresh.partner.test");
        (out["first"]["status"] == 503).then_some(out)
    });
    assert!(
        failed.is_some(),
        "a deleted Secret is no longer presented; log:\n{}",
        daemon.log_text()
    );
}

#[test]
fn both_kubelet_cgroup_layouts_and_every_qos_class_are_enrolled() {
    let mut c = Cluster::new("k8slayout");
    let mut pods = Vec::new();
    for (i, driver) in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs]
        .into_iter()
        .enumerate()
    {
        for (j, qos) in [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort]
            .into_iter()
            .enumerate()
        {
            let name = format!("layout-{i}-{j}");
            let pod = c.node.pod_with_layout("shop", &name, driver, qos);
            c.register(&pod, NODE, &[("app", "client")], |_| {});
            pods.push(pod);
        }
    }
    // Not to be captured: a pod on the host network, and one that still has its sidecar.
    let host_net = c.node.pod("shop", "hostnet-1");
    c.register(&host_net, NODE, &[("app", "client")], |p| {
        p["spec"]["hostNetwork"] = true.into();
    });
    let sidecar = c.node.pod("shop", "sidecar-1");
    c.register(&sidecar, NODE, &[("app", "client")], |p| {
        p["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.24.0"}));
        p["metadata"]["annotations"]["sidecar.istio.io/status"] =
            "{\"containers\":[\"istio-proxy\"]}".into();
    });
    let daemon = c.daemon(&[]);
    for pod in &pods {
        let state = daemon.wait_enrolled(&pod.uid, Duration::from_secs(10));
        assert_eq!(
            state["cgroup"].as_str().map(PathBuf::from),
            Some(pod.cgroup.clone()),
            "the pod cgroup kubelet made: {state}"
        );
        let server = served_by(pod);
        assert!(server.starts_with("reviews-v"), "{}: {server}", pod.name);
    }
    let dump = daemon.config_dump();
    let not = &dump["snapshot"]["not_captured"];
    assert_eq!(not["Pod/shop/hostnet-1"], "host network", "{not}");
    assert!(
        not["Pod/shop/sidecar-1"]
            .as_str()
            .is_some_and(|r| r.contains("Istio sidecar")),
        "{not}"
    );
    for p in [&host_net, &sidecar] {
        assert!(
            daemon.workload_state(&p.uid).is_none(),
            "{} enrolled",
            p.name
        );
        let out = p.pdtool(&["http", "--to", &format!("{CLUSTER_IP}:80"), "--host", HOST]);
        assert!(
            out["first"]["body"]["server"].is_null(),
            "{} captured: {out}",
            p.name
        );
    }
    let log = daemon.log_text();
    assert!(log.contains("not capturing Pod/shop/sidecar-1"), "{log}");
    assert!(log.contains("not capturing Pod/shop/hostnet-1"), "{log}");
}

#[test]
fn a_broken_kubeconfig_is_a_startup_error() {
    let node = Node::new("k8sbadcfg");
    let path = node.work_dir.join("kubeconfig");
    std::fs::write(&path, "apiVersion: v1\nkind: Config\nclusters: [oops\n").unwrap();
    let (mut cmd, ..) = Daemon::command(
        &node,
        &["--kubernetes", "--kubeconfig", path.to_str().unwrap()],
    );
    let out = cmd.output().expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kubeconfig") && err.contains(path.to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn a_pod_cannot_choose_the_network_namespace_it_is_enrolled_by() {
    let mut c = Cluster::new("k8sunshare");
    let client = c.pod_on("client-1", NODE, &[("app", "client")]);
    // A hostile app: a network namespace of its own (no privilege needed) holding more
    // processes than the pod's real one, one of them named like the sandbox ("pause").
    let decoy_dir = c.node.work_dir.join("decoy");
    std::fs::create_dir_all(&decoy_dir).unwrap();
    std::os::unix::fs::symlink("/bin/sleep", decoy_dir.join("pause")).unwrap();
    let script = format!(
        "{pause} 60 & sleep 60 & sleep 60 & sleep 60 & wait",
        pause = decoy_dir.join("pause").display()
    );
    let mut decoy = {
        use std::os::unix::process::CommandExt as _;
        client
            .host
            .command(
                Some(&client.app_cgroup()),
                std::path::Path::new("unshare"),
                &["-rn", "--", "bash", "-c", &script],
            )
            .process_group(0)
            .spawn()
            .expect("unshare")
    };
    std::thread::sleep(Duration::from_millis(300));
    let pause_pid: u32 = std::fs::read_to_string(client.pause_cgroup().join("cgroup.procs"))
        .unwrap()
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("the sandbox process");
    let pod_netns = std::fs::metadata(format!("/proc/{pause_pid}/ns/net"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let daemon = c.daemon(&[]);
    let state = daemon.wait_enrolled(&client.uid, Duration::from_secs(10));
    assert_eq!(
        state["netns_inode"], pod_netns,
        "enrolled by the pod's own network namespace: {state}"
    );
    let server = served_by(&client);
    assert!(server.starts_with("reviews-v"), "captured: {server}");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        daemon.workload_state(&client.uid).unwrap()["netns_inode"],
        pod_netns,
        "and it stays so across reconciles"
    );
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(decoy.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = decoy.wait();
}

#[test]
fn the_mesh_config_map_sets_tracing_and_a_collector_service_is_resolved() {
    let mut c = Cluster::new("k8strace");
    c.api.install_istio_crds(&["v1"]);
    let client = c.pod_on("client-1", NODE, &[("app", "client")]);
    // The collector is a Service (what Istio's mesh config names); its endpoint is where the
    // test's OTLP/gRPC collector listens, beside the daemon.
    let collector = Collector::start(Wire::OtlpGrpc, Duration::ZERO);
    let port = collector.addr.port();
    c.api.apply(namespace_json("observability", &[]));
    c.api.apply(service_json(
        "observability",
        "otel-collector",
        "198.18.0.251",
        &[("grpc-otlp", 4317, port)],
        &[("app", "otel-collector")],
    ));
    c.api.apply(endpointslice_json(
        "observability",
        Some("otel-collector-abcde"),
        "otel-collector",
        &[("127.0.0.1", "other-node", "otel-collector-0", true)],
        &[("grpc-otlp", port)],
    ));
    let daemon = c.daemon(&["--trace-sampling", "0"]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(10));
    c.api.apply(configmap_json(
        "istio-system",
        "istio",
        &[(
            "mesh",
            "defaultConfig:\n  tracing:\n    sampling: 100\nextensionProviders:\n- name: otel\n  opentelemetry:\n    service: otel-collector.observability\n    port: 4317\ndefaultProviders:\n  tracing: [otel]\n",
        )],
    ));
    wait_for(Duration::from_secs(5), || {
        (daemon.config_dump()["tracing"]["settings"]["sampling"] == 100.0).then_some(())
    })
    .unwrap_or_else(|| panic!("mesh config applied: {}", daemon.config_dump()["tracing"]));
    assert!(
        c.api
            .requests()
            .iter()
            .any(|r| r.contains("/api/v1/namespaces/istio-system/configmaps")
                && r.contains("metadata.name%3Distio")),
        "only Istio's own ConfigMap is watched: {:?}",
        c.api.requests()
    );
    let out = client.pdtool(&["http", "--to", &format!("{CLUSTER_IP}:80"), "--host", HOST]);
    assert_eq!(out["statuses"]["200"], 1, "{out}");
    let span = wait_for(Duration::from_secs(5), || {
        collector.spans().into_iter().next()
    })
    .expect("a span reached the collector Service");
    assert_eq!(span.service, "client.shop");
    assert_eq!(span.name, format!("{HOST}:80/*"));
    assert_eq!(span.tag("http.status_code"), "200");
    // Deleting the ConfigMap returns to the flags (0 %).
    c.api.delete("v1", "ConfigMap", "istio-system", "istio");
    wait_for(Duration::from_secs(5), || {
        (daemon.config_dump()["tracing"]["settings"]["sampling"] == 0.0).then_some(())
    })
    .expect("back to the flags");
}

/// One DestinationRule naming hundreds of credentials: the node keeps one list+watch of
/// the namespace's Secrets (not one per name) and loads at most 64 of the names, saying
/// so and counting the rest.
#[test]
fn a_rule_naming_hundreds_of_credentials_costs_one_watch_and_a_bounded_set() {
    let mut c = Cluster::new("k8screds");
    c.api.install_istio_crds(&["v1", "v1beta1", "v1alpha3"]);
    c.api.apply(namespace_json(
        "shop",
        &[("nodeproxy.io/capture", "enabled")],
    ));
    let subsets: Vec<serde_json::Value> = (0..200)
        .map(|i| {
            json!({"name": format!("s{i}"), "labels": {"v": format!("{i}")},
                   "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": format!("cred-{i:03}")}}})
        })
        .collect();
    c.api.apply(istio_json(
        "v1",
        "DestinationRule",
        "shop",
        "many",
        json!({"host": "api.partner.test", "subsets": subsets}),
    ));
    let client = c.pod_on("client-1", NODE, &[("app", "client")]);
    let daemon = c.daemon(&[]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(10));
    assert!(
        wait_for(Duration::from_secs(5), || (daemon
            .metric_sum("proxy_daemon_kubernetes_credentials_over_cap", &[])
            == 136.0)
            .then_some(()))
        .is_some(),
        "{}",
        daemon.metrics_text()
    );
    let secret_requests = c
        .api
        .requests()
        .into_iter()
        .filter(|r| r.contains("/secrets"))
        .collect::<Vec<_>>();
    assert!(
        !secret_requests.is_empty() && secret_requests.len() <= 4,
        "{secret_requests:?}"
    );
    assert!(daemon
        .log_text()
        .contains("name more credentials than a node loads"));
}

/// Istio's security kinds from the API: an AuthorizationPolicy created after start
/// denies at the destination pod from its next request, and deleting it lets the
/// request through again; a PeerAuthentication STRICT refuses plaintext from outside the
/// mesh.
#[test]
fn security_policies_from_the_api_apply_at_the_destination() {
    let mut c = Cluster::new("k8sauthz");
    c.api.install_istio_crds(&["v1"]);
    let client = c.pod_on("client-1", NODE, &[("app", "client")]);
    let api_pod = c.pod_on("api-1", NODE, &[("app", "api")]);
    c.servers.http_echo(
        &api_pod.host,
        8080,
        HttpEcho {
            name: "api".into(),
            ..Default::default()
        },
    );
    c.api.apply(service_json(
        "shop",
        "api",
        "198.18.0.240",
        &[("http", 80, 8080)],
        &[("app", "api")],
    ));
    c.api.apply(endpointslice_json(
        "shop",
        Some("api-x1"),
        "api",
        &[(&api_pod.host.ip.to_string(), NODE, "api-1", true)],
        &[("http", 8080)],
    ));
    let daemon = c.daemon(&[]);
    daemon.wait_enrolled(&client.uid, Duration::from_secs(10));
    daemon.wait_enrolled(&api_pod.uid, Duration::from_secs(10));
    let status = |path: &str| -> u64 {
        let out = client.pdtool(&[
            "http",
            "--to",
            "198.18.0.240:80",
            "--host",
            "api.shop",
            "--path",
            path,
        ]);
        out["first"]["status"].as_u64().unwrap_or(0)
    };
    assert_eq!(status("/admin"), 200);
    let policy = json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-admin", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "api"}},
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
        },
    });
    c.api.apply(policy);
    wait_for(Duration::from_secs(5), || {
        (status("/admin") == 403).then_some(())
    })
    .expect("the policy from the API denies");
    assert_eq!(status("/other"), 200);
    c.api.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "shop",
        "no-admin",
    );
    wait_for(Duration::from_secs(5), || {
        (status("/admin") == 200).then_some(())
    })
    .expect("deleted, the request passes again");
    // PeerAuthentication from the API: STRICT refuses plaintext from a host outside the
    // mesh, while the mesh client keeps its mutual TLS.
    let outsider = c.node.host("outsider");
    let plain = || {
        outsider
            .command(
                None,
                &proxy_tests::target_bin("pdtool"),
                &[
                    "connect",
                    "--to",
                    &format!("{}:8080", api_pod.host.ip),
                    "--timeout-ms",
                    "1000",
                ],
            )
            .output()
            .expect("pdtool connect");
    };
    let refused = || {
        daemon.metric_sum(
            "proxy_daemon_inbound_refused_total",
            &[("reason", "plaintext_strict")],
        )
    };
    plain();
    assert_eq!(refused(), 0.0, "PERMISSIVE before the policy");
    c.api.apply(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }));
    wait_for(Duration::from_secs(5), || {
        plain();
        (refused() > 0.0).then_some(())
    })
    .expect("STRICT from the API refuses plaintext");
    assert_eq!(status("/other"), 200, "the mesh client still gets through");
}

/// The Gateway API from the API server: HTTPRoute's CRD installed after the daemons start
/// is picked up without a restart; the route binds the Service's ClusterIP; and its
/// `status.parents` is written once for two nodes (each computes the same; the second
/// finds it in place) with the conditions the spec asks for, Istio's entry kept.
#[test]
fn gateway_routes_from_the_api_apply_and_two_nodes_write_their_status_once() {
    let mut c = Cluster::new("k8sgamma");
    let client = c.pod_on("client-1", NODE, &[("app", "client")]);
    let v2 = c._backends[1].ip.to_string();
    c.api.apply(service_json(
        "backend",
        "reviews-v2",
        "198.18.0.241",
        &[("http", 80, 9080)],
        &[("app", "reviews"), ("version", "v2")],
    ));
    c.api.apply(endpointslice_json(
        "backend",
        Some("reviews-v2-p8x2z"),
        "reviews-v2",
        &[(&v2, "other-node", "reviews-v2-7f9c6-abcde", true)],
        &[("http", 9080)],
    ));
    let b = c.node.second_node("node-b");
    let a = c.daemon(&[]);
    let mut b_args = b.daemon_flags();
    b_args.extend(c.args());
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let bd = Daemon::start(&c.node, &b_args);
    a.wait_enrolled(&client.uid, Duration::from_secs(10));
    bd.wait_ready(Duration::from_secs(20));

    c.api.install_gateway_crds();
    let route = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "canary", "namespace": "backend"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 80}],
            "rules": [
                {"matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}],
                 "backendRefs": [{"name": "reviews-v2", "port": 80}]},
                {"backendRefs": [{"name": "reviews", "port": 80},
                                 {"name": "reviews-v9", "port": 80, "weight": 0}]},
            ],
        },
        // Another controller's entry, which must stay.
        "status": {"parents": [{
            "parentRef": {"group": "", "kind": "Service", "name": "reviews"},
            "controllerName": "istio.io/gateway-controller",
            "conditions": [],
        }]},
    });
    c.api.apply(route);
    let canary = |n: usize| {
        client.pdtool(&[
            "http",
            "--to",
            &format!("{CLUSTER_IP}:80"),
            "--host",
            "reviews.backend",
            "-H",
            "x-canary: yes",
            "--count",
            &n.to_string(),
        ])
    };
    wait_for(Duration::from_secs(10), || {
        a.config_dump()["snapshot"]["routes"]["mesh_routes"]
            .to_string()
            .contains("HTTPRoute/backend/canary")
            .then_some(())
    })
    .expect("the route from the API applies once its CRD is installed");
    let out = canary(20);
    assert_eq!(out["servers"]["reviews-v2"], 20, "{out}");

    let status = wait_for(Duration::from_secs(10), || {
        let r = c.api.get(
            "gateway.networking.k8s.io/v1",
            "HTTPRoute",
            "backend",
            "canary",
        )?;
        let parents = r["status"]["parents"].as_array()?.clone();
        (parents.len() == 2).then_some(parents)
    })
    .expect("status written");
    let ours = status
        .iter()
        .find(|p| p["controllerName"] == "proxy-daemon.io/mesh")
        .expect("our entry");
    assert!(
        status
            .iter()
            .any(|p| p["controllerName"] == "istio.io/gateway-controller"),
        "the other controller's entry is kept: {status:?}"
    );
    assert_eq!(ours["parentRef"]["name"], "reviews", "{ours}");
    assert_eq!(ours["parentRef"]["port"], 80, "{ours}");
    let cond = |t: &str| {
        ours["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|x| x["type"] == t).cloned())
            .unwrap_or_default()
    };
    assert_eq!(cond("Accepted")["status"], "True", "{ours}");
    assert_eq!(cond("ResolvedRefs")["status"], "False", "{ours}");
    assert_eq!(cond("ResolvedRefs")["reason"], "BackendNotFound", "{ours}");
    assert_eq!(cond("Accepted")["observedGeneration"], 1, "{ours}");
    assert!(cond("Accepted")["lastTransitionTime"].is_string(), "{ours}");

    // Both nodes carry the route; one write between them, and none while nothing changes.
    let patches = || {
        c.api
            .requests()
            .iter()
            .filter(|r| r.starts_with("PATCH ") && r.contains("/httproutes/canary/status"))
            .count()
    };
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(patches(), 1, "{:?}", c.api.requests());
    let writes = |d: &Daemon, result: &str| {
        d.metric_sum(
            "proxy_daemon_route_status_writes_total",
            &[("result", result)],
        )
    };
    assert_eq!(writes(&a, "written") + writes(&bd, "written"), 1.0);
    assert_eq!(writes(&a, "unchanged") + writes(&bd, "unchanged"), 1.0);
}
