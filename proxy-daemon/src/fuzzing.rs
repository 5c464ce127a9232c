//! What each fuzz target feeds its input to (`proxy-daemon/fuzz`), kept here so the normal
//! test suite replays every input the fuzzer ever found (`fuzz/regressions/<target>/`)
//! through the very same code on stable Rust.
//!
//! A target fails by panicking (or by hanging, which libFuzzer reports as a timeout); each
//! also checks a property a user relies on, not only "does not crash".
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::OnceLock,
    time::Duration,
};

use crate::{config::local, proxy::sniff, state};

/// Every target, by the name of its `fuzz_targets/<name>.rs`.
pub const TARGETS: [&str; 5] = [
    "sniff",
    "client_hello",
    "yaml",
    "cluster_name",
    "http_request",
];

/// Runs target `name` on `data` (the regression replay).
pub fn run(name: &str, data: &[u8]) {
    match name {
        "sniff" => sniff_bytes(data),
        "client_hello" => client_hello(data),
        "yaml" => yaml(data),
        "cluster_name" => cluster_name(data),
        "http_request" => http_request(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// The protocol sniffer on any first bytes: a verdict is stable once given (more bytes of
/// the same stream never change it).
pub fn sniff_bytes(data: &[u8]) {
    let full = sniff::classify(data);
    for cut in 0..data.len().min(64) {
        if let Some(early) = sniff::classify(&data[..cut]) {
            assert_eq!(Some(early), full, "verdict changed after {cut} bytes");
        }
    }
}

/// The ClientHello parser: never panics, and a name it returns is lower-case UTF-8 that
/// really is in the record.
pub fn client_hello(data: &[u8]) {
    if let Some(name) = sniff::client_hello_sni(data) {
        assert_eq!(name, name.to_ascii_lowercase());
        let found = data
            .windows(name.len().max(1))
            .any(|w| w.eq_ignore_ascii_case(name.as_bytes()));
        assert!(found || name.is_empty(), "{name:?} is not in the record");
    }
}

/// The YAML loader and the compiler, as `validate` and a reload run them: any text gives
/// objects or errors that name a line inside the text, never a panic.
pub fn yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Lines as YAML (and so a user's error message) counts them.
    let lines = local::yaml_line_breaks(text).lines().count().max(1);
    let path = std::path::Path::new("fuzz.yaml");
    let mut objects = Vec::new();
    for doc in local::split_documents(path, text) {
        match local::parse_document(&doc, "default") {
            Ok(Some(o)) => objects.push(o),
            Ok(None) => {}
            Err(e) => assert_line_within(&e.to_string(), lines),
        }
    }
    let settings = state::CaptureSettings {
        label_key: state::CAPTURE_LABEL_KEY.into(),
        label_value: "enabled".into(),
        node_name: "fuzz-node".into(),
        default_fail_mode: proxy_common::FailMode::Open,
        default_export_to: Vec::new(),
        trust_domain: "cluster.local".into(),
    };
    if let Err(errors) = state::compile(&objects, &settings, 1) {
        for e in errors {
            assert_line_within(&e.to_string(), lines);
        }
    }
}

/// An error's `fuzz.yaml:<line>` is a line of the input.
fn assert_line_within(message: &str, lines: usize) {
    if let Some(rest) = message.split("fuzz.yaml:").nth(1) {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(line) = digits.parse::<usize>() {
            assert!(
                (1..=lines + 1).contains(&line),
                "line {line} of {lines}: {message}"
            );
        }
    }
}

/// The EnvoyFilter cluster-name parser: what it accepts is a real port and a name, and it
/// can say it again.
pub fn cluster_name(data: &[u8]) {
    use state::routes::{parse_cluster, ClusterRef};
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cluster) = parse_cluster(name) {
        if let ClusterRef::Service { port, host, .. } = &cluster {
            assert!((1..=65535).contains(port), "{name:?}: port {port}");
            assert!(!host.is_empty(), "{name:?}: empty host");
        }
        let again = cluster.to_string();
        let reparsed =
            parse_cluster(&again).unwrap_or_else(|e| panic!("{name:?} → {again:?}: {e}"));
        assert_eq!(reparsed, cluster, "{name:?} → {again:?}");
    }
}

/// The whole HTTP path of a captured connection, in-process: sniffing, hyper's parser with
/// our limits, routing (matches, rewrites, retries, mirrors, hash policies), forwarding to
/// a real upstream, and metrics. Whatever arrives, the client gets an answer or a close,
/// and a request that starts like HTTP but is malformed gets a 400 (or 431/414/505),
/// never a silent close.
pub fn http_request(data: &[u8]) {
    let h = harness();
    h.runtime.block_on(async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut conn = h.proxy.connect(h.service).await;
        let _ = conn.write_all(data).await;
        let _ = conn.shutdown().await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) if answer.len() < 1 << 20 => answer.extend_from_slice(&buf[..n]),
                    Ok(_) => break,
                }
            }
        })
        .await;
        assert!(read.is_ok(), "no answer and no close within 5 s");
        // Close with a reset: no TIME_WAIT left behind per input.
        let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
        assert!(
            !PANICKED.load(std::sync::atomic::Ordering::SeqCst),
            "the proxy panicked on this input"
        );
        if looks_like_http1_request(data) && answer.is_empty() && !h.upstream_saw(data) {
            panic!("an HTTP/1 request head got a silent close");
        }
    });
}

/// A whole request head (request line as hyper reads one, ending blank line): it must
/// get some response. A head cut short by the client's close gets none, as from Envoy or
/// nginx (found by fuzzing: the property first asked too much).
fn looks_like_http1_request(data: &[u8]) -> bool {
    if !data.windows(4).any(|w| w == b"\r\n\r\n") {
        return false;
    }
    let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    let Ok(line) = std::str::from_utf8(&data[..end]) else {
        return false;
    };
    let parts: Vec<&str> = line.split(' ').collect();
    parts.len() == 3
        && ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"].contains(&parts[0])
        && parts[1].starts_with('/')
        && (parts[2] == "HTTP/1.1" || parts[2] == "HTTP/1.0")
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    proxy: crate::testing::InProcess,
    service: SocketAddrV4,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Harness {
    /// Whether the upstream received these bytes as they were (an opaque stream, which
    /// is not ours to answer).
    fn upstream_saw(&self, data: &[u8]) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|s| s.starts_with(&data[..data.len().min(16)]))
    }
}

/// Name of the harness runtime's threads.
const HARNESS_THREAD: &str = "fuzz-harness";

/// Set by a panic on a harness thread, such as one inside a connection's task (which
/// tokio would otherwise swallow).
static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One proxy and one upstream for the whole fuzzing run (starting them per input would
/// measure tokio, not us). Panics are recorded (then handled as before: libFuzzer's hook
/// aborts, the test harness's reports).
fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Only the harness's own threads: other tests in the same binary may panic
            // on purpose.
            if std::thread::current().name() == Some(HARNESS_THREAD) {
                PANICKED.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            previous(info);
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name(HARNESS_THREAD)
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let upstream = runtime.block_on(upstream_server(seen.clone()));
        // Loopback: whatever the fuzzer makes of a request, nothing leaves the machine.
        let service = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 10), 80);
        let yaml = HTTP_CONFIG
            .replace("UPSTREAM_PORT", &upstream.port().to_string())
            .replace("SERVICE_IP", &service.ip().to_string());
        let proxy = runtime.block_on(crate::testing::InProcess::start(&yaml, "shop", "client"));
        Harness {
            runtime,
            proxy,
            service,
            seen,
        }
    })
}

/// An upstream that answers every HTTP/1 request 200 with a small body, and keeps the
/// first bytes of each connection.
async fn upstream_server(seen: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) -> SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap_or_else(|e| panic!("upstream: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("upstream: {e}"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = Vec::new();
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    got.extend_from_slice(&buf[..n]);
                    if got.len() < 4096 {
                        let mut log = seen.lock().unwrap_or_else(|p| p.into_inner());
                        if log.len() > 64 {
                            log.remove(0);
                        }
                        log.push(got.clone());
                    }
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        let body = "ok";
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            break;
                        }
                        got.clear();
                    }
                }
            });
        }
    });
    addr
}

/// A configuration that exercises much of the HTTP route code at once.
const HTTP_CONFIG: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodeproxy.io/capture: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, uid: 00000000-0000-4000-8000-000000000001, labels: {app: client}}
spec: {containers: [{name: app, image: example/app:1}]}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.test]
  addresses: [SERVICE_IP/32]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: UPSTREAM_PORT}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, labels: {version: v1}}, {address: 127.0.0.1, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: shop}
spec:
  host: api.test
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.test, SERVICE_IP]
  http:
  - match:
    - headers: {x-canary: {regex: '^(yes|true)$'}}
      queryParams: {debug: {exact: '1'}}
    - uri: {regex: '/v[0-9]+/items/.*'}
      withoutHeaders: {x-skip: {}}
    rewrite: {uri: /rewritten/, authority: rewritten.test}
    headers:
      request: {set: {x-route: canary}, add: {x-trace: a}, remove: [cookie]}
      response: {set: {x-served-by: canary}}
    route:
    - {destination: {host: api.test, subset: v2}, weight: 10}
    - {destination: {host: api.test, subset: v1}, weight: 90}
    retries: {attempts: 2, perTryTimeout: 1s, retryOn: '5xx,reset,connect-failure'}
    timeout: 3s
  - match:
    - uri: {prefix: /mirror}
      method: {exact: POST}
    mirror: {host: api.test, subset: v1}
    mirrorPercentage: {value: 50}
    route:
    - destination: {host: api.test, subset: v1}
  - match:
    - uri: {exact: /redirect}
    redirect: {uri: /elsewhere, redirectCode: 302}
  - match:
    - uri: {prefix: /direct}
    directResponse: {status: 418, body: {string: teapot}}
  - route:
    - destination: {host: api.test}
";

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed and every input the fuzzer ever found, through its target: what broke
    /// once stays fixed, on stable Rust and in every CI run.
    #[test]
    fn seeds_and_past_findings_replay_cleanly() {
        let fuzz_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut replayed = 0;
        for target in TARGETS {
            for kind in ["seeds", "regressions"] {
                let Ok(entries) = std::fs::read_dir(fuzz_dir.join(kind).join(target)) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let data = std::fs::read(entry.path()).expect("read input");
                    run(target, &data);
                    replayed += 1;
                }
            }
        }
        assert!(replayed >= 30, "only {replayed} inputs found");
    }

    #[test]
    fn a_malformed_request_head_gets_400_not_a_silent_close() {
        for head in [
            "GET /a b HTTP/1.1\r\nHost: api.test\r\n\r\n",
            "GET / HTTP/1.1\r\nHost api.test\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: api.test\r\nBad\x01Name: x\r\n\r\n",
        ] {
            let h = harness();
            let answer = h.runtime.block_on(async {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut conn = h.proxy.connect(h.service).await;
                conn.write_all(head.as_bytes()).await.expect("write");
                let mut answer = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer))
                    .await;
                String::from_utf8_lossy(&answer).to_string()
            });
            assert!(answer.starts_with("HTTP/1.1 400"), "{head:?} → {answer:?}");
        }
    }
}
