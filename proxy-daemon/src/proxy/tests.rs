//! The data path in-process (no root, milliseconds): routing, subsets, header operations,
//! retries, mirroring, load balancing and metrics through the real proxy code, with
//! loopback servers as upstreams (see [`crate::testing`]). Capture, enrolment and source
//! IPs are the netns suite's.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};

use crate::testing::InProcess;

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);

/// An HTTP/1.1 upstream on `ip`: answers `name` (or 503 for its first `fail_first`
/// requests) and records each request's head.
struct Upstream {
    port: u16,
    served: Arc<AtomicU32>,
    heads: Arc<Mutex<Vec<String>>>,
}

async fn upstream(ip: Ipv4Addr, port: u16, name: &'static str, fail_first: u32) -> Upstream {
    let listener = TcpListener::bind((ip, port)).await.expect("bind upstream");
    let port = listener.local_addr().unwrap().port();
    let served = Arc::new(AtomicU32::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (s, h) = (served.clone(), heads.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (s, h) = (s.clone(), h.clone());
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    h.lock().unwrap().push(head);
                    let n = s.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = if n < fail_first {
                        ("503 Service Unavailable", "busy".to_string())
                    } else {
                        ("200 OK", name.to_string())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Upstream {
        port,
        served,
        heads,
    }
}

/// Two versions of `reviews` on 127.0.0.2 and 127.0.0.3 (same port), a Service in front.
async fn reviews(fail_first_v1: u32) -> (Upstream, Upstream, String) {
    let v1 = upstream(Ipv4Addr::new(127, 0, 0, 2), 0, "reviews-v1", fail_first_v1).await;
    let v2 = upstream(Ipv4Addr::new(127, 0, 0, 3), v1.port, "reviews-v2", 0).await;
    let yaml = format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{nodeproxy.io/capture: enabled}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: backend}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client-1, namespace: shop, uid: u-client, labels: {{app: client}}}}
spec: {{containers: [{{name: app}}]}}
status: {{phase: Running, podIP: 127.0.0.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v1-a, namespace: backend, uid: u-v1, labels: {{app: reviews, version: v1}}}}
spec: {{containers: [{{name: app}}]}}
status: {{phase: Running, podIP: 127.0.0.2, conditions: [{{type: Ready, status: 'True'}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v2-a, namespace: backend, uid: u-v2, labels: {{app: reviews, version: v2}}}}
spec: {{containers: [{{name: app}}]}}
status: {{phase: Running, podIP: 127.0.0.3, conditions: [{{type: Ready, status: 'True'}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: backend}}
spec:
  clusterIP: {CLUSTER_IP}
  selector: {{app: reviews}}
  ports: [{{name: http, port: 80, targetPort: {port}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: backend}}
spec:
  host: reviews.backend.svc.cluster.local
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
",
        port = v1.port
    );
    (v1, v2, yaml)
}

/// One HTTP/1.1 request over a connection the app opened to `dst`: (status, body).
async fn get(dp: &InProcess, dst: SocketAddrV4, extra_headers: &str) -> (u16, String) {
    get_host(dp, dst, "reviews.backend.svc.cluster.local", extra_headers).await
}

async fn get_host(
    dp: &InProcess,
    dst: SocketAddrV4,
    host: &str,
    extra_headers: &str,
) -> (u16, String) {
    let mut s = dp.connect(dst).await;
    let req =
        format!("GET /items HTTP/1.1\r\nhost: {host}\r\n{extra_headers}connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut resp))
        .await
        .expect("response in time")
        .expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn svc() -> SocketAddrV4 {
    SocketAddrV4::new(CLUSTER_IP, 80)
}

#[tokio::test]
async fn header_match_routes_to_a_subset_and_sets_headers() {
    let (v1, v2, yaml) = reviews(0).await;
    let yaml = yaml
        + "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: backend}
spec:
  hosts: [reviews.backend.svc.cluster.local]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    headers: {request: {set: {x-route: jason}}}
    route: [{destination: {host: reviews.backend.svc.cluster.local, subset: v2}}]
  - route: [{destination: {host: reviews.backend.svc.cluster.local, subset: v1}}]
";
    let dp = InProcess::start(&yaml, "shop", "client-1").await;
    for _ in 0..5 {
        assert_eq!(
            get(&dp, svc(), "end-user: jason\r\n").await,
            (200, "reviews-v2".into())
        );
        assert_eq!(get(&dp, svc(), "").await, (200, "reviews-v1".into()));
    }
    assert_eq!(v1.served.load(Ordering::SeqCst), 5);
    assert_eq!(v2.served.load(Ordering::SeqCst), 5);
    let heads = v2.heads.lock().unwrap().join("\n");
    assert!(heads.contains("x-route: jason"), "{heads}");
    assert!(
        heads.contains("x-request-id: "),
        "a request id is added: {heads}"
    );
}

#[tokio::test]
async fn weights_split_10_90_chosen_per_request_at_random() {
    let (v1, v2, yaml) = reviews(0).await;
    let yaml = yaml
        + "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: backend}
spec:
  hosts: [reviews.backend.svc.cluster.local]
  http:
  - route:
    - {destination: {host: reviews.backend.svc.cluster.local, subset: v1}, weight: 10}
    - {destination: {host: reviews.backend.svc.cluster.local, subset: v2}, weight: 90}
";
    let dp = InProcess::start(&yaml, "shop", "client-1").await;
    for _ in 0..1000 {
        assert_eq!(get(&dp, svc(), "").await.0, 200);
    }
    // Random per request (Envoy's choice), so binomial: 100 ± 9.5 expected for v1;
    // 60..=140 fails a correct split about once in 30,000 runs.
    let (n1, n2) = (
        v1.served.load(Ordering::SeqCst),
        v2.served.load(Ordering::SeqCst),
    );
    assert_eq!(n1 + n2, 1000);
    assert!((60..=140).contains(&n1), "v1 got {n1} of 1000 at weight 10");
}

#[tokio::test]
async fn a_503_is_retried_by_istios_default_policy_and_metered_once() {
    let (v1, _v2, yaml) = reviews(1).await;
    let yaml = yaml
        + "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: backend}
spec:
  hosts: [reviews.backend.svc.cluster.local]
  http:
  - route: [{destination: {host: reviews.backend.svc.cluster.local, subset: v1}}]
";
    let dp = InProcess::start(&yaml, "shop", "client-1").await;
    assert_eq!(get(&dp, svc(), "").await, (200, "reviews-v1".into()));
    assert_eq!(
        v1.served.load(Ordering::SeqCst),
        2,
        "one failure, one retry"
    );
    let text = dp.metrics_text();
    let line = text
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .unwrap_or_else(|| panic!("no request series:\n{text}"));
    assert!(line.contains("source_workload=\"client\""), "{line}");
    assert!(line.contains("destination_version=\"v1\""), "{line}");
    assert!(
        line.ends_with(" 1"),
        "the client's one request, counted once: {line}"
    );
}

#[tokio::test]
async fn unknown_destinations_pass_through_and_are_metered_as_passthrough() {
    let (_v1, _v2, yaml) = reviews(0).await;
    let other = upstream(Ipv4Addr::new(127, 0, 0, 4), 0, "elsewhere", 0).await;
    let dp = InProcess::start(&yaml, "shop", "client-1").await;
    let dst = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 4), other.port);
    assert_eq!(
        get_host(&dp, dst, "api.example.com", "").await,
        (200, "elsewhere".into())
    );
    let text = dp.metrics_text();
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("destination_service_name=\"PassthroughCluster\"")
            && l.contains("destination_service=\"api.example.com\"")),
        "{text}"
    );
}

#[tokio::test]
async fn mirrored_requests_reach_the_mirror_with_a_shadow_host() {
    let (v1, v2, yaml) = reviews(0).await;
    let yaml = yaml
        + "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: backend}
spec:
  hosts: [reviews.backend.svc.cluster.local]
  http:
  - route: [{destination: {host: reviews.backend.svc.cluster.local, subset: v1}}]
    mirror: {host: reviews.backend.svc.cluster.local, subset: v2}
    mirrorPercentage: {value: 100}
";
    let dp = InProcess::start(&yaml, "shop", "client-1").await;
    for _ in 0..10 {
        assert_eq!(get(&dp, svc(), "").await, (200, "reviews-v1".into()));
    }
    // Copies are fire-and-forget: give them a moment.
    for _ in 0..100 {
        if v2.served.load(Ordering::SeqCst) == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(v1.served.load(Ordering::SeqCst), 10);
    assert_eq!(
        v2.served.load(Ordering::SeqCst),
        10,
        "every request mirrored"
    );
    let heads = v2.heads.lock().unwrap().join("\n");
    assert!(
        heads.contains("host: reviews.backend.svc.cluster.local-shadow"),
        "{heads}"
    );
}

#[tokio::test]
async fn consistent_hash_pins_each_user_to_one_endpoint() {
    let (v1, v2, yaml) = reviews(0).await;
    let yaml = yaml.replace(
        "  host: reviews.backend.svc.cluster.local\n  subsets:",
        "  host: reviews.backend.svc.cluster.local\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {httpHeaderName: x-user}\n  subsets:",
    );
    let dp = InProcess::start(&yaml, "shop", "client-1").await;
    let mut seen = std::collections::BTreeMap::new();
    for round in 0..3 {
        for user in 0..20 {
            let (status, server) = get(&dp, svc(), &format!("x-user: user-{user}\r\n")).await;
            assert_eq!(status, 200);
            let first = seen.entry(user).or_insert_with(|| server.clone());
            assert_eq!(*first, server, "user-{user} moved in round {round}");
        }
    }
    let on_v1 = seen.values().filter(|s| *s == "reviews-v1").count();
    assert!(
        (3..=17).contains(&on_v1),
        "users spread over both endpoints: {on_v1} of 20 on v1"
    );
    assert_eq!(
        v1.served.load(Ordering::SeqCst) + v2.served.load(Ordering::SeqCst),
        60
    );
}

/// exportTo decides what each namespace sees: a VirtualService and a DestinationRule kept
/// to team-a (`.`) steer team-a's traffic only; team-b's clients get the Service as is.
/// A ServiceEntry exported only to team-a is, for team-b, not in the registry at all.
#[tokio::test]
async fn export_to_keeps_each_namespaces_rules_to_itself() {
    let (v1, v2, yaml) = reviews(0).await;
    let api = upstream(Ipv4Addr::new(127, 0, 0, 4), 0, "partner-api", 0).await;
    let yaml = yaml
        + &format!(
            "apiVersion: v1
kind: Namespace
metadata: {{name: team-b, labels: {{nodeproxy.io/capture: enabled}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client-b, namespace: team-b, uid: u-client-b, labels: {{app: client}}}}
spec: {{containers: [{{name: app}}]}}
status: {{phase: Running, podIP: 127.0.0.1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews-for-shop, namespace: shop}}
spec:
  hosts: [reviews.backend.svc.cluster.local]
  exportTo: [.]
  http:
  - route: [{{destination: {{host: reviews.backend.svc.cluster.local, subset: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews-subsets-for-shop, namespace: shop}}
spec:
  host: reviews.backend.svc.cluster.local
  exportTo: [.]
  subsets:
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: partner, namespace: shop}}
spec:
  hosts: [partner.example]
  addresses: [127.0.0.9/32]
  exportTo: [.]
  location: MESH_EXTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {port}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.4}}]
",
            port = api.port
        );
    let shop = InProcess::start(&yaml, "shop", "client-1").await;
    let team_b = InProcess::start(&yaml, "team-b", "client-b").await;
    for _ in 0..6 {
        assert_eq!(get(&shop, svc(), "").await, (200, "reviews-v2".into()));
    }
    let mut seen_b = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (status, body) = get(&team_b, svc(), "").await;
        assert_eq!(status, 200);
        seen_b.insert(body);
    }
    assert!(
        seen_b.contains("reviews-v1"),
        "team-b does not see shop's rule (both versions serve it): {seen_b:?}"
    );
    assert!(v1.served.load(Ordering::SeqCst) > 0 && v2.served.load(Ordering::SeqCst) >= 6);
    // The ServiceEntry: shop reaches the partner through it (and its targetPort);
    // for team-b the address is an unknown one, passed through as dialled (nothing
    // listens on 127.0.0.9:80, so the connect fails: 503 UF), metered as passthrough.
    // (A loopback address: a test never sends traffic off the machine.)
    let partner = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 9), 80);
    assert_eq!(
        get_host(&shop, partner, "partner.example", "").await,
        (200, "partner-api".into())
    );
    let (status, body) = get_host(&team_b, partner, "partner.example", "").await;
    assert_eq!(status, 503, "team-b has no such entry: {body}");
    let text = team_b.metrics_text();
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total")
            && l.contains("destination_service_name=\"PassthroughCluster\"")),
        "{text}"
    );
    assert_eq!(api.served.load(Ordering::SeqCst), 1);
}

/// A Sidecar's `egress.hosts` narrow what its workloads see: with only its own namespace
/// imported (and registry-only), a Service of another namespace is not in the client's
/// registry (BlackHole, 502); importing that namespace brings it back.
#[tokio::test]
async fn sidecar_egress_hosts_decide_which_services_a_workload_sees() {
    let (v1, _v2, yaml) = reviews(0).await;
    let sidecar = |hosts: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: shop}}
spec:
  egress:
  - hosts: [{hosts}]
  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}
"
        )
    };
    let narrow = InProcess::start(
        &(yaml.clone() + &sidecar("./*, istio-system/*")),
        "shop",
        "client-1",
    )
    .await;
    let (status, body) = get(&narrow, svc(), "").await;
    assert_eq!(status, 502, "backend's Service is not imported: {body}");
    let text = narrow.metrics_text();
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("destination_service_name=\"BlackHoleCluster\"")),
        "{text}"
    );
    assert_eq!(v1.served.load(Ordering::SeqCst), 0);
    let wide = InProcess::start(&(yaml + &sidecar("./*, backend/*")), "shop", "client-1").await;
    let (status, _) = get(&wide, svc(), "").await;
    assert_eq!(status, 200, "imported from backend/*");
}

/// A fault without a percentage faults nobody (Istio sends Envoy no percentage, and
/// Envoy's default is 0 %); with `percentage: 100` everyone.
#[tokio::test]
async fn a_fault_without_a_percentage_faults_no_request() {
    let (_v1, _v2, yaml) = reviews(0).await;
    let fault = |percentage: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [reviews.backend.svc.cluster.local]
  http:
  - fault: {{abort: {{httpStatus: 418{percentage}}}}}
    route: [{{destination: {{host: reviews.backend.svc.cluster.local, subset: v1}}}}]
"
        )
    };
    let dp = InProcess::start(&(yaml.clone() + &fault("")), "shop", "client-1").await;
    for _ in 0..5 {
        assert_eq!(get(&dp, svc(), "").await.0, 200);
    }
    let dp = InProcess::start(
        &(yaml + &fault(", percentage: {value: 100}")),
        "shop",
        "client-1",
    )
    .await;
    assert_eq!(get(&dp, svc(), "").await.0, 418);
}

/// A hand-over's drain must not drop a request that is on its way: not the first of a
/// connection accepted just before it (a fresh connection's request is never resent by
/// clients), nor the next one on a keep-alive connection. Each is answered with
/// `Connection: close`; a keep-alive connection that stays quiet is closed after a grace.
#[tokio::test]
async fn a_drain_answers_requests_on_their_way_with_connection_close() {
    const REQUEST: &[u8] =
        b"GET /items HTTP/1.1\r\nhost: reviews.backend.svc.cluster.local\r\n\r\n";
    let (v1, v2, yaml) = reviews(0).await;
    let dp = InProcess::start(&yaml, "shop", "client-1").await;
    // Two keep-alive connections, served once and idle when the drain starts.
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut c = dp.connect(svc()).await;
        c.write_all(REQUEST).await.expect("write");
        let mut head = [0u8; 12];
        c.read_exact(&mut head).await.expect("first answer");
        assert_eq!(&head, b"HTTP/1.1 200");
        kept.push(c);
    }
    // Connected, requests not yet sent: the proxy accepted them and waits for their heads
    // (many, since which of a connection's wake-ups comes first varies).
    let mut fresh = Vec::new();
    for _ in 0..16 {
        fresh.push(dp.connect(svc()).await);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let drain_started = std::time::Instant::now();
    dp.start_drain();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut quiet = kept.pop().expect("two");
    let again = kept.pop().expect("two");
    let ask = |mut c: tokio::net::TcpStream, skip_first: bool| async move {
        c.write_all(REQUEST).await.expect("write");
        let mut resp = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut resp))
            .await
            .expect("answered and closed in time")
            .expect("read");
        if skip_first {
            // The rest of the first answer, read before the drain, comes first.
            resp = resp
                .split_once("HTTP/1.1 ")
                .map(|(_, r)| format!("HTTP/1.1 {r}"))
                .unwrap_or(resp);
        }
        resp
    };
    let mut answers = Vec::new();
    for c in fresh {
        answers.push(ask(c, false).await);
    }
    answers.push(ask(again, true).await);
    for (i, resp) in answers.iter().enumerate() {
        assert!(resp.starts_with("HTTP/1.1 200"), "connection {i}: {resp:?}");
        assert!(
            resp.to_ascii_lowercase().contains("connection: close"),
            "the last response says it closes: {resp}"
        );
        assert!(resp.contains("\r\n\r\nreviews-v"), "{resp}");
    }
    // The quiet keep-alive connection is closed once the grace is over, not before.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), quiet.read_to_end(&mut rest))
        .await
        .expect("quiet connection closed in time")
        .expect("read");
    let took = drain_started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed {took:?} after the drain started"
    );
    let served = v1.served.load(Ordering::SeqCst) + v2.served.load(Ordering::SeqCst);
    assert_eq!(served, 2 + 16 + 1);
}

/// A connection that never sends does not hold a drain to its timeout: it is closed a
/// grace after the drain starts, and the active-connection count the drain waits on
/// falls to 0.
#[tokio::test]
async fn a_drain_closes_a_connection_that_never_sends_after_a_grace() {
    let (_v1, _v2, yaml) = reviews(0).await;
    let dp = InProcess::start(&yaml, "shop", "client-1").await;
    let mut silent = dp.connect(svc()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(dp.metrics.daemon.active_connections.get(), 1);
    let started = std::time::Instant::now();
    dp.start_drain();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read");
    let took = started.elapsed();
    assert!(rest.is_empty());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed {took:?} after the drain started"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(dp.metrics.daemon.active_connections.get(), 0);
}
