//! The stand-in API server (proxy_tests::kube_api) is faithful enough that a real kubectl
//! works against it, and its protocol (list, watch, bookmarks, 410, errors) is the real one.
//! Only loopback traffic; every child process has a wall-clock limit.
use std::{
    io::{BufRead as _, Read as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use proxy_tests::kube_api::{
    configmap_json, endpointslice_json, istio_json, namespace_json, pod_json, secret_json,
    service_json, KubeApi, WatchNext,
};
use serde_json::{json, Value};

/// A scratch directory removed at the end (kept when the test fails, for a look).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kube-api-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn kubectl_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KUBECTL") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("kubectl"))
                .find(|p| p.is_file())
        })
        .expect("kubectl is needed for these tests (apt-get install -y kubernetes-client, or KUBECTL=/path)")
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// kubectl with its own kubeconfig, discovery cache and HOME in a scratch directory.
struct Kubectl {
    bin: PathBuf,
    dir: PathBuf,
}

impl Kubectl {
    fn new(api: &KubeApi, scratch: &Scratch) -> Self {
        api.write_kubeconfig(&scratch.0.join("kubeconfig"));
        Self {
            bin: kubectl_bin(),
            dir: scratch.0.clone(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg(format!(
            "--kubeconfig={}",
            self.dir.join("kubeconfig").display()
        ))
        .arg(format!("--cache-dir={}", self.dir.join("cache").display()))
        .arg("--request-timeout=5s")
        .args(args)
        .env("HOME", &self.dir)
        .env_remove("KUBECONFIG")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        c
    }

    /// Runs kubectl to completion within 30 s (killed and reaped otherwise).
    fn run(&self, args: &[&str]) -> Out {
        let mut child = self.command(args).spawn().expect("spawn kubectl");
        let stdout = reader(child.stdout.take().unwrap());
        let stderr = reader(child.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait kubectl") {
                break Some(s);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = Out {
            ok: status.is_some_and(|s| s.success()),
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        assert!(
            status.is_some(),
            "kubectl {args:?} ran past 30 s: {} {}",
            out.stdout,
            out.stderr
        );
        out
    }

    /// Runs kubectl, which must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.ok,
            "kubectl {args:?} failed:\n{}\n{}",
            out.stdout, out.stderr
        );
        println!("$ kubectl {}\n{}", args.join(" "), out.stdout);
        out.stdout
    }
}

fn reader(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// A long-running kubectl (e.g. `get -w`) whose stdout lines arrive on a channel; killed
/// and reaped when dropped.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(k: &Kubectl, args: &[&str]) -> Self {
        let mut child = k.command(args).spawn().expect("spawn kubectl");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most `timeout`) for a line containing every one of `words`.
    fn line_with(&mut self, words: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            println!("kubectl -w: {line}");
            self.seen.push(line.clone());
            if words.iter().all(|w| line.contains(w)) {
                return Some(line);
            }
        }
    }

    /// Like [`Running::line_with`], failing the test (with what kubectl printed) on timeout.
    fn expect_line(&mut self, words: &[&str], timeout: Duration, what: &str) -> String {
        match self.line_with(words, timeout) {
            Some(l) => l,
            None => {
                let seen = self.seen.clone();
                panic!(
                    "{what}: no line with {words:?}; stdout {seen:#?}; stderr {}",
                    self.stderr()
                )
            }
        }
    }

    fn stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn seed(api: &KubeApi) {
    api.apply(namespace_json("shop", &[("istio-injection", "disabled")]));
    api.apply(namespace_json("billing", &[]));
    api.apply(pod_json(
        "shop",
        "web-7d9f8b6c5d-x2k8p",
        "node-a",
        "10.244.1.5",
        &[("app", "web")],
        Some("web-7d9f8b6c5d"),
    ));
    api.apply(pod_json(
        "shop",
        "cart-5c6b7d8f9-q4w7z",
        "node-b",
        "10.244.2.7",
        &[("app", "cart")],
        Some("cart-5c6b7d8f9"),
    ));
    api.apply(pod_json(
        "billing",
        "ledger-0",
        "node-a",
        "10.244.1.9",
        &[("app", "ledger")],
        None,
    ));
    api.apply(service_json(
        "shop",
        "web",
        "10.96.12.34",
        &[("http", 80, 8080)],
        &[("app", "web")],
    ));
    api.apply(endpointslice_json(
        "shop",
        Some("web-h7xq2"),
        "web",
        &[("10.244.1.5", "node-a", "web-7d9f8b6c5d-x2k8p", true)],
        &[("http", 8080)],
    ));
    api.apply(configmap_json(
        "shop",
        "web-config",
        &[("mode", "fast"), ("level", "3")],
    ));
}

#[test]
fn kubectl_gets_pods_namespaces_and_services() {
    let api = KubeApi::start();
    seed(&api);
    let scratch = Scratch::new("get");
    let k = Kubectl::new(&api, &scratch);

    let out = k.ok(&["get", "pods", "-A"]);
    let header = out.lines().next().unwrap_or("");
    for col in ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"] {
        assert!(header.contains(col), "header {header:?} lacks {col}");
    }
    for (ns, name) in [
        ("shop", "web-7d9f8b6c5d-x2k8p"),
        ("shop", "cart-5c6b7d8f9-q4w7z"),
        ("billing", "ledger-0"),
    ] {
        let line = out
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} missing from:\n{out}"));
        assert!(line.starts_with(ns), "{line}");
        assert!(line.contains("1/1") && line.contains("Running"), "{line}");
    }

    let out = k.ok(&["get", "pods", "-n", "shop", "-o", "wide"]);
    assert!(
        out.contains("10.244.1.5") && out.contains("node-a"),
        "{out}"
    );
    assert!(!out.contains("ledger-0"), "{out}");

    // kubectl ≥ 1.21 hides managedFields unless asked; older ones show them and lack the flag.
    let args = [
        "get",
        "pods",
        "-n",
        "shop",
        "-o",
        "json",
        "--show-managed-fields",
    ];
    let out = k.run(&args);
    let text = if !out.ok && out.stderr.contains("unknown flag") {
        k.ok(&args[..6])
    } else {
        assert!(out.ok, "kubectl {args:?}: {}", out.stderr);
        out.stdout
    };
    let list: Value = serde_json::from_str(&text).expect("kubectl -o json");
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "{list}");
    for p in items {
        assert_eq!(p["kind"], "Pod");
        assert_eq!(p["apiVersion"], "v1");
        assert_eq!(p["metadata"]["namespace"], "shop");
        assert!(p["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
        assert!(p["metadata"]["resourceVersion"].as_str().is_some());
        let mf = p["metadata"]["managedFields"]
            .as_array()
            .expect("managedFields");
        assert!(mf.iter().any(|m| m["manager"] == "kube-controller-manager"));
        assert!(mf
            .iter()
            .any(|m| m["manager"] == "kubelet" && m["subresource"] == "status"));
        assert_eq!(p["status"]["phase"], "Running");
        assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "ReplicaSet");
    }

    let out = k.ok(&["get", "ns"]);
    assert!(out.lines().next().unwrap().contains("STATUS"), "{out}");
    for ns in ["shop", "billing"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(ns) && l.contains("Active")),
            "{ns} missing:\n{out}"
        );
    }

    let out = k.ok(&["get", "svc", "-n", "shop"]);
    let line = out
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("ClusterIP") && line.contains("10.96.12.34") && line.contains("80/TCP"),
        "{line}"
    );

    let out = k.ok(&["get", "endpointslices", "-n", "shop"]);
    let line = out
        .lines()
        .find(|l| l.starts_with("web-h7xq2"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("IPv4") && line.contains("8080") && line.contains("10.244.1.5"),
        "{line}"
    );
    let slice: Value = serde_json::from_str(&k.ok(&[
        "get",
        "endpointslices",
        "-n",
        "shop",
        "-l",
        "kubernetes.io/service-name=web",
        "-o",
        "json",
    ]))
    .unwrap();
    let pod = api
        .get("v1", "Pod", "shop", "web-7d9f8b6c5d-x2k8p")
        .unwrap();
    assert_eq!(
        slice["items"][0]["endpoints"][0]["targetRef"]["uid"], pod["metadata"]["uid"],
        "the slice names its pod by uid"
    );
    assert_eq!(
        slice["items"][0]["endpoints"][0]["conditions"]["ready"],
        true
    );

    let out = k.ok(&["get", "cm", "-n", "shop"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("web-config") && l.contains(" 2 ")),
        "{out}"
    );

    let out = k.ok(&["get", "pod", "ledger-0", "-n", "billing", "--show-labels"]);
    assert!(out.contains("app=ledger"), "{out}");

    let missing = k.run(&["get", "pod", "nope", "-n", "billing"]);
    assert!(!missing.ok);
    assert!(
        missing.stderr.contains("pods \"nope\" not found"),
        "{}",
        missing.stderr
    );
    println!("requests: {:#?}", api.requests());
}

#[test]
fn kubectl_version_reports_the_server() {
    let api = KubeApi::start();
    let scratch = Scratch::new("version");
    let k = Kubectl::new(&api, &scratch);
    let v: Value = serde_json::from_str(&k.ok(&["version", "-o", "json"])).expect("version json");
    assert_eq!(v["serverVersion"]["gitVersion"], "v1.31.0", "{v}");
    assert!(v["clientVersion"]["gitVersion"].as_str().is_some(), "{v}");
}

#[test]
fn kubectl_watch_sees_creation_relabel_and_deletion() {
    let api = KubeApi::start();
    seed(&api);
    let scratch = Scratch::new("watch");
    let k = Kubectl::new(&api, &scratch);
    // --request-timeout bounds a watch too (client side): give this one a minute; it is
    // killed when the test is done with it.
    let mut w = Running::spawn(
        &k,
        &[
            "get",
            "pods",
            "-n",
            "shop",
            "-w",
            "--show-labels",
            "--request-timeout=60s",
        ],
    );
    let t = Duration::from_secs(15);
    // The initial list, then the watch opened from its resourceVersion.
    w.expect_line(&["NAME", "STATUS"], t, "header");
    w.expect_line(&["web-7d9f8b6c5d-x2k8p"], t, "initial list");
    assert!(
        proxy_tests::wait_for(t, || (api.open_watches() == 1).then_some(())).is_some(),
        "kubectl opened no watch; requests: {:?}",
        api.requests()
    );

    api.apply(pod_json(
        "shop",
        "web-7d9f8b6c5d-n3m9t",
        "node-a",
        "10.244.1.6",
        &[("app", "web")],
        Some("web-7d9f8b6c5d"),
    ));
    w.expect_line(&["web-7d9f8b6c5d-n3m9t"], t, "new pod not shown");

    api.patch_labels(
        "v1",
        "Pod",
        "shop",
        "web-7d9f8b6c5d-n3m9t",
        &[("track", Some("canary"))],
    );
    w.expect_line(
        &["web-7d9f8b6c5d-n3m9t", "track=canary"],
        t,
        "relabel not shown",
    );

    api.set_pod_ready("shop", "web-7d9f8b6c5d-n3m9t", false);
    w.expect_line(&["web-7d9f8b6c5d-n3m9t", "0/1"], t, "readiness not shown");

    // Pods elsewhere are not shown.
    api.apply(pod_json(
        "billing",
        "ledger-1",
        "node-a",
        "10.244.1.10",
        &[],
        None,
    ));
    let before = w.seen.len();
    api.delete("v1", "Pod", "shop", "web-7d9f8b6c5d-n3m9t")
        .expect("pod was stored");
    // kubectl prints a deleted pod's last state once more.
    w.expect_line(&["web-7d9f8b6c5d-n3m9t"], t, "deletion not shown");
    assert!(
        w.seen[before..].iter().all(|l| !l.contains("ledger-1")),
        "{:?}",
        w.seen
    );
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/shop/pods?") && r.contains("watch=true")),
        "{:?}",
        api.requests()
    );
    for r in api.requests().iter().filter(|r| r.contains("watch=")) {
        println!("kubectl's watch request: {r}");
    }
    drop(w);
    assert!(
        proxy_tests::wait_for(t, || (api.open_watches() == 0).then_some(())).is_some(),
        "watch still open after kubectl was killed"
    );
}

#[test]
fn kubectl_sees_istio_resources_only_once_the_crds_are_installed() {
    let api = KubeApi::start();
    seed(&api);
    let scratch = Scratch::new("istio");
    let k = Kubectl::new(&api, &scratch);

    let before = k.run(&["get", "virtualservices", "-n", "shop"]);
    assert!(!before.ok, "{}", before.stdout);
    assert!(
        before.stderr.contains("virtualservices"),
        "error does not name the type: {}",
        before.stderr
    );
    println!("before install: {}", before.stderr.trim());
    let (code, body) =
        api.get_json("/apis/networking.istio.io/v1beta1/namespaces/shop/virtualservices");
    assert_eq!(code, 404, "{body}");
    let (_, groups) = api.get_json("/apis");
    assert!(
        !groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "networking.istio.io"),
        "{groups}"
    );

    api.install_istio_crds(&["v1beta1"]);
    api.apply(istio_json(
        "v1beta1",
        "VirtualService",
        "shop",
        "web-routes",
        json!({"hosts": ["web.shop.svc.cluster.local"], "gateways": ["mesh"],
               "http": [{"route": [{"destination": {"host": "web", "subset": "v1"}}]}]}),
    ));
    api.apply(istio_json(
        "v1beta1",
        "DestinationRule",
        "shop",
        "web",
        json!({"host": "web", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}),
    ));

    let out = k.ok(&["get", "virtualservices", "-n", "shop"]);
    let header = out.lines().next().unwrap_or("");
    assert!(
        header.contains("GATEWAYS") && header.contains("HOSTS"),
        "{out}"
    );
    // String columns print JSONPath results: arrays as JSON, as on a real cluster.
    assert!(
        out.lines().any(|l| l.starts_with("web-routes")
            && l.contains("[\"mesh\"]")
            && l.contains("[\"web.shop.svc.cluster.local\"]")),
        "{out}"
    );
    let out = k.ok(&[
        "get",
        "virtualservices.v1beta1.networking.istio.io",
        "-n",
        "shop",
    ]);
    assert!(out.contains("web-routes"), "{out}");
    let out = k.ok(&["get", "vs", "-A"]);
    assert!(out.contains("web-routes"), "{out}");
    let out = k.ok(&["get", "dr", "-n", "shop", "-o", "json"]);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        list["items"][0]["apiVersion"],
        "networking.istio.io/v1beta1"
    );
    assert_eq!(list["items"][0]["metadata"]["generation"], 1);
    assert_eq!(list["items"][0]["spec"]["host"], "web");

    // The same objects are served under every installed version, preferred first.
    api.install_istio_crds(&["v1", "v1beta1", "v1alpha3"]);
    let (_, group) = api.get_json("/apis/networking.istio.io");
    assert_eq!(group["preferredVersion"]["version"], "v1", "{group}");
    let out = k.ok(&[
        "get",
        "virtualservices.v1alpha3.networking.istio.io",
        "-n",
        "shop",
        "-o",
        "jsonpath={.items[*].apiVersion}",
    ]);
    assert_eq!(out.trim(), "networking.istio.io/v1alpha3");
    let out = k.ok(&[
        "get",
        "virtualservices",
        "-n",
        "shop",
        "-o",
        "jsonpath={.items[*].apiVersion}",
    ]);
    assert_eq!(
        out.trim(),
        "networking.istio.io/v1",
        "kubectl uses the preferred version"
    );

    api.uninstall_istio_crds();
    let after = k.run(&["get", "virtualservices", "-n", "shop"]);
    assert!(
        !after.ok && after.stderr.contains("virtualservices"),
        "{}{}",
        after.stdout,
        after.stderr
    );
}

#[test]
fn kubectl_is_forbidden_what_rbac_denies() {
    let api = KubeApi::start();
    seed(&api);
    api.apply(secret_json(
        "shop",
        "web-tls",
        "kubernetes.io/tls",
        &[
            ("tls.crt", b"-----BEGIN CERTIFICATE-----\n"),
            ("tls.key", b"-----BEGIN PRIVATE KEY-----\n"),
        ],
    ));
    let scratch = Scratch::new("forbid");
    let k = Kubectl::new(&api, &scratch);
    let out = k.ok(&["get", "secrets", "-n", "shop"]);
    assert!(
        out.lines().any(|l| l.starts_with("web-tls")
            && l.contains("kubernetes.io/tls")
            && l.contains(" 2 ")),
        "{out}"
    );

    api.forbid("", "secrets");
    let denied = k.run(&["get", "secrets", "-n", "shop"]);
    println!("forbidden: {}", denied.stderr.trim());
    assert!(!denied.ok);
    assert!(denied.stderr.contains("forbidden"), "{}", denied.stderr);
    assert!(
        denied.stderr.contains(
            "secrets is forbidden: User \"system:serviceaccount:proxy-daemon:proxy-daemon\" cannot list resource \"secrets\" in API group \"\" in the namespace \"shop\""
        ),
        "{}",
        denied.stderr
    );
    // Other resources stay readable.
    assert!(k
        .ok(&["get", "pods", "-n", "shop"])
        .contains("web-7d9f8b6c5d-x2k8p"));
}

// ---- protocol level, with a plain HTTPS client ----

const T: Duration = Duration::from_secs(5);

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

fn event(w: &proxy_tests::kube_api::WatchStream) -> Value {
    match w.next(T) {
        WatchNext::Event(e) => e,
        other => panic!("expected a watch event, got {other:?}"),
    }
}

#[test]
fn list_then_watch_from_its_resource_version() {
    let api = KubeApi::start();
    seed(&api);
    api.set_bookmark_interval(Duration::from_millis(200));
    let (code, list) = api.get_json("/api/v1/namespaces/shop/pods");
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["apiVersion"], "v1");
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .expect("list resourceVersion");
    assert_eq!(rv, api.resource_version().to_string());
    assert_eq!(
        names(&list),
        ["cart-5c6b7d8f9-q4w7z", "web-7d9f8b6c5d-x2k8p"]
    );
    // As on the wire from a real server: items of a built-in list carry no kind.
    assert!(
        list["items"][0].get("kind").is_none(),
        "{}",
        list["items"][0]
    );

    let w = api.watch(&format!(
        "/api/v1/namespaces/shop/pods?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=30"
    ));
    assert_eq!(w.status, 200);
    // Nothing changed yet: only bookmarks, at the list's resourceVersion.
    let b = w.next_of(&["BOOKMARK"], T).expect("a bookmark within 5 s");
    assert_eq!(b["object"]["kind"], "Pod");
    assert_eq!(b["object"]["metadata"]["resourceVersion"], rv);

    let created = api.apply(pod_json(
        "shop",
        "new-1",
        "node-a",
        "10.244.1.20",
        &[("app", "new")],
        None,
    ));
    let e = w
        .next_of(&["ADDED", "MODIFIED", "DELETED"], T)
        .expect("ADDED");
    assert_eq!(e["type"], "ADDED", "{e}");
    assert_eq!(e["object"]["kind"], "Pod");
    assert_eq!(e["object"]["metadata"]["name"], "new-1");
    assert_eq!(e["object"]["metadata"]["uid"], created["metadata"]["uid"]);
    api.patch_labels("v1", "Pod", "shop", "new-1", &[("app", Some("renamed"))]);
    let e = w
        .next_of(&["ADDED", "MODIFIED", "DELETED"], T)
        .expect("MODIFIED");
    assert_eq!(e["type"], "MODIFIED", "{e}");
    assert_eq!(e["object"]["metadata"]["labels"]["app"], "renamed");
    api.apply(pod_json(
        "billing",
        "elsewhere",
        "node-a",
        "10.244.1.21",
        &[],
        None,
    ));
    api.delete("v1", "Pod", "shop", "new-1").unwrap();
    let e = w
        .next_of(&["ADDED", "MODIFIED", "DELETED"], T)
        .expect("DELETED");
    assert_eq!(
        e["type"], "DELETED",
        "{e} (a pod of another namespace leaked in?)"
    );
    assert_eq!(e["object"]["metadata"]["name"], "new-1");
    let deleted_rv: u64 = e["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        deleted_rv,
        api.resource_version(),
        "a deletion carries its own resourceVersion"
    );
    let b = w
        .next_of(&["BOOKMARK"], T)
        .expect("bookmark after the changes");
    assert_eq!(
        b["object"]["metadata"]["resourceVersion"],
        deleted_rv.to_string()
    );

    // Replay: a second watch from the same old resourceVersion gets the same history.
    let w2 = api.watch(&format!(
        "/api/v1/namespaces/shop/pods?watch=true&resourceVersion={rv}"
    ));
    let types: Vec<String> = (0..3)
        .map(|_| event(&w2)["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, ["ADDED", "MODIFIED", "DELETED"]);
    assert!(
        matches!(w2.next(Duration::from_millis(300)), WatchNext::Timeout),
        "no bookmarks unless asked"
    );
}

#[test]
fn watch_without_resource_version_starts_with_the_current_state() {
    let api = KubeApi::start();
    seed(&api);
    let w = api.watch("/api/v1/pods?watch=1");
    let mut added: Vec<String> = (0..3)
        .map(|_| {
            let e = event(&w);
            assert_eq!(e["type"], "ADDED", "{e}");
            e["object"]["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    added.sort();
    assert_eq!(
        added,
        ["cart-5c6b7d8f9-q4w7z", "ledger-0", "web-7d9f8b6c5d-x2k8p"]
    );

    // Streaming list: initial events, then a bookmark marking their end.
    let w = api.watch(
        "/api/v1/namespaces/shop/pods?watch=1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan",
    );
    assert_eq!(event(&w)["type"], "ADDED");
    assert_eq!(event(&w)["type"], "ADDED");
    let b = event(&w);
    assert_eq!(b["type"], "BOOKMARK", "{b}");
    assert_eq!(
        b["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(
        b["object"]["metadata"]["resourceVersion"],
        api.resource_version().to_string()
    );

    // sendInitialEvents needs resourceVersionMatch=NotOlderThan.
    let r = api
        .request(
            "GET",
            "/api/v1/pods?watch=1&sendInitialEvents=true&allowWatchBookmarks=true",
            Some(api.token()),
            None,
        )
        .unwrap();
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["reason"], "Invalid");
}

#[test]
fn field_and_label_selectors_filter_lists_and_watches() {
    let api = KubeApi::start();
    seed(&api);
    let sel = proxy_tests::kube_api::percent_encode("spec.nodeName=node-a");
    let (_, list) = api.get_json(&format!("/api/v1/pods?fieldSelector={sel}"));
    assert_eq!(names(&list), ["ledger-0", "web-7d9f8b6c5d-x2k8p"]);
    let (_, list) = api.get_json(&format!(
        "/api/v1/pods?fieldSelector={}",
        proxy_tests::kube_api::percent_encode("spec.nodeName!=node-a,metadata.namespace=shop")
    ));
    assert_eq!(names(&list), ["cart-5c6b7d8f9-q4w7z"]);
    let (_, list) = api.get_json(&format!(
        "/api/v1/namespaces/shop/pods?fieldSelector={}",
        proxy_tests::kube_api::percent_encode("metadata.name=web-7d9f8b6c5d-x2k8p")
    ));
    assert_eq!(names(&list), ["web-7d9f8b6c5d-x2k8p"]);
    let (_, list) = api.get_json(&format!(
        "/api/v1/pods?labelSelector={}",
        proxy_tests::kube_api::percent_encode("app in (web,ledger),!missing")
    ));
    assert_eq!(names(&list), ["ledger-0", "web-7d9f8b6c5d-x2k8p"]);
    let (code, err) = api.get_json("/api/v1/pods?fieldSelector=spec.bogus%3Dx");
    assert_eq!(code, 400, "{err}");
    assert_eq!(err["message"], "field label not supported: spec.bogus");
    let (code, _) = api.get_json("/api/v1/services?fieldSelector=spec.nodeName%3Dx");
    assert_eq!(code, 400, "services have no spec.nodeName field label");

    // A node's watch sees only its pods; a pod leaving the selection is DELETED.
    let rv = api.resource_version();
    let w = api.watch(&format!(
        "/api/v1/pods?watch=1&resourceVersion={rv}&fieldSelector={sel}"
    ));
    api.apply(pod_json("shop", "on-b", "node-b", "10.244.2.8", &[], None));
    api.apply(pod_json("shop", "on-a", "node-a", "10.244.1.30", &[], None));
    let e = event(&w);
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("on-a")),
        "{e}"
    );
    api.modify("v1", "Pod", "shop", "on-a", |p| {
        p["spec"]["nodeName"] = "node-b".into()
    });
    let e = event(&w);
    assert_eq!(e["type"], "DELETED", "{e}");
    assert_eq!(
        e["object"]["spec"]["nodeName"], "node-a",
        "the last state that matched"
    );
    assert_eq!(
        e["object"]["metadata"]["resourceVersion"],
        api.resource_version().to_string()
    );

    let w = api.watch(&format!(
        "/api/v1/namespaces/shop/pods?watch=1&resourceVersion={}&labelSelector=app%3Dweb",
        api.resource_version()
    ));
    api.patch_labels(
        "v1",
        "Pod",
        "shop",
        "cart-5c6b7d8f9-q4w7z",
        &[("app", Some("web"))],
    );
    let e = event(&w);
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("cart-5c6b7d8f9-q4w7z")),
        "starts matching: ADDED"
    );
    api.patch_labels(
        "v1",
        "Pod",
        "shop",
        "cart-5c6b7d8f9-q4w7z",
        &[("app", None)],
    );
    assert_eq!(event(&w)["type"], "DELETED", "stops matching: DELETED");
}

#[test]
fn compaction_expires_old_resource_versions() {
    let api = KubeApi::start();
    seed(&api);
    let (_, list) = api.get_json("/api/v1/pods");
    let old = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    api.patch_labels("v1", "Pod", "billing", "ledger-0", &[("x", Some("1"))]);
    let compacted = api.compact();

    let w = api.watch(&format!(
        "/api/v1/pods?watch=1&resourceVersion={old}&allowWatchBookmarks=true"
    ));
    assert_eq!(w.status, 200, "expiry is reported inside the stream");
    let e = event(&w);
    assert_eq!(e["type"], "ERROR", "{e}");
    assert_eq!(e["object"]["kind"], "Status");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    assert_eq!(
        e["object"]["message"],
        format!("too old resource version: {old} ({compacted})")
    );
    assert!(
        matches!(w.next(T), WatchNext::Closed),
        "the stream ends after the error"
    );

    let (code, s) = api.get_json(&format!(
        "/api/v1/pods?resourceVersion={old}&resourceVersionMatch=Exact"
    ));
    assert_eq!(code, 410, "{s}");
    assert_eq!(s["reason"], "Expired");
    // From the compaction point on, all is well; a relist gets a fresh resourceVersion.
    let w = api.watch(&format!("/api/v1/pods?watch=1&resourceVersion={compacted}"));
    api.patch_labels("v1", "Pod", "billing", "ledger-0", &[("x", Some("2"))]);
    assert_eq!(event(&w)["type"], "MODIFIED");
    let (code, list) = api.get_json(&format!(
        "/api/v1/pods?resourceVersion={compacted}&resourceVersionMatch=Exact"
    ));
    assert_eq!(code, 200);
    assert_eq!(list["metadata"]["resourceVersion"], compacted.to_string());
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["metadata"]["labels"]["x"] == "1"),
        "the state at that version"
    );
}

#[test]
fn pagination_is_a_consistent_snapshot() {
    let api = KubeApi::start();
    for i in 0..5 {
        api.apply(pod_json(
            "shop",
            &format!("p{i}"),
            "node-a",
            &format!("10.244.1.{}", 40 + i),
            &[],
            None,
        ));
    }
    let (_, page1) = api.get_json("/api/v1/pods?limit=2");
    assert_eq!(names(&page1), ["p0", "p1"]);
    assert_eq!(page1["metadata"]["remainingItemCount"], 3);
    let cont = page1["metadata"]["continue"]
        .as_str()
        .expect("continue token")
        .to_string();
    // A change between pages is not seen by the continued list.
    api.delete("v1", "Pod", "shop", "p3");
    let (_, page2) = api.get_json(&format!("/api/v1/pods?limit=2&continue={cont}"));
    assert_eq!(names(&page2), ["p2", "p3"]);
    assert_eq!(
        page2["metadata"]["resourceVersion"],
        page1["metadata"]["resourceVersion"]
    );
    let cont = page2["metadata"]["continue"].as_str().unwrap().to_string();
    let (_, page3) = api.get_json(&format!("/api/v1/pods?limit=2&continue={cont}"));
    assert_eq!(names(&page3), ["p4"]);
    assert!(page3["metadata"].get("continue").is_none(), "{page3}");
    // resourceVersion=0 is served from the watch cache: no pagination.
    let (_, all) = api.get_json("/api/v1/pods?limit=2&resourceVersion=0");
    assert_eq!(names(&all).len(), 4);
    // A continue token from before a compaction is expired.
    api.compact();
    let (code, s) = api.get_json(&format!("/api/v1/pods?limit=2&continue={cont}"));
    assert_eq!((code, s["reason"].as_str()), (410, Some("Expired")), "{s}");
}

#[test]
fn tables_and_metadata_only_representations() {
    let api = KubeApi::start();
    seed(&api);
    let r = api
        .request(
            "GET",
            "/api/v1/namespaces/shop/pods?limit=500",
            Some(api.token()),
            Some("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"),
        )
        .unwrap();
    let t = r.json();
    assert_eq!(
        (t["kind"].as_str(), t["apiVersion"].as_str()),
        (Some("Table"), Some("meta.k8s.io/v1"))
    );
    let cols: Vec<&str> = t["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols[..5], ["Name", "Ready", "Status", "Restarts", "Age"]);
    assert_eq!(t["rows"][0]["cells"][0], "cart-5c6b7d8f9-q4w7z");
    assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    let r = api
        .request(
            "GET",
            "/api/v1/pods",
            Some(api.token()),
            Some("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"),
        )
        .unwrap();
    let l = r.json();
    assert_eq!(l["kind"], "PartialObjectMetadataList");
    assert_eq!(l["items"].as_array().unwrap().len(), 3);
    assert!(l["items"][0].get("spec").is_none());
    assert_eq!(l["items"][0]["metadata"]["namespace"], "billing");
}

#[test]
fn errors_are_status_objects() {
    let api = KubeApi::start();
    seed(&api);
    for token in [None, Some("wrong")] {
        let r = api.request("GET", "/api/v1/pods", token, None).unwrap();
        assert_eq!(r.status, 401);
        let s = r.json();
        assert_eq!(
            (s["kind"].as_str(), s["reason"].as_str(), s["code"].as_u64()),
            (Some("Status"), Some("Unauthorized"), Some(401)),
            "{s}"
        );
    }
    let (code, s) = api.get_json("/apis/networking.istio.io/v1/namespaces/shop/virtualservices");
    assert_eq!(code, 404);
    assert_eq!(
        (
            s["kind"].as_str(),
            s["status"].as_str(),
            s["reason"].as_str()
        ),
        (Some("Status"), Some("Failure"), Some("NotFound")),
        "{s}"
    );
    let (code, _) = api.get_json("/apis/networking.istio.io");
    assert_eq!(code, 404);
    let (code, s) = api.get_json("/api/v1/namespaces/shop/pods/nope");
    assert_eq!(code, 404);
    assert_eq!(s["message"], "pods \"nope\" not found");
    assert_eq!(s["details"], json!({"name": "nope", "kind": "pods"}));

    api.forbid("", "pods");
    let (code, s) = api.get_json("/api/v1/pods");
    assert_eq!(code, 403);
    assert_eq!(s["message"], "pods is forbidden: User \"system:serviceaccount:proxy-daemon:proxy-daemon\" cannot list resource \"pods\" in API group \"\" at the cluster scope");
    api.allow("", "pods");

    let w = api.watch(&format!(
        "/api/v1/pods?watch=1&resourceVersion={}",
        api.resource_version()
    ));
    assert!(proxy_tests::wait_for(T, || (api.open_watches() == 1).then_some(())).is_some());
    api.set_available(false);
    assert!(
        matches!(w.next(T), WatchNext::Broken(_)),
        "going unavailable cuts open watches"
    );
    let (code, s) = api.get_json("/api/v1/pods");
    assert_eq!(code, 503);
    assert_eq!(s["reason"], "ServiceUnavailable");
    let (code, _) = api.get_json("/version");
    assert_eq!(code, 503);
    api.set_available(true);
    assert_eq!(api.get_json("/api/v1/pods").0, 200);
}

#[test]
fn dropped_and_timed_out_watches_end() {
    let api = KubeApi::start();
    seed(&api);
    let rv = api.resource_version();
    let w = api.watch(&format!("/api/v1/pods?watch=1&resourceVersion={rv}"));
    let w2 = api.watch(&format!(
        "/api/v1/namespaces/shop/services?watch=1&resourceVersion={rv}"
    ));
    assert!(proxy_tests::wait_for(T, || (api.open_watches() == 2).then_some(())).is_some());
    assert_eq!(api.drop_watches(), 2);
    match w.next(T) {
        WatchNext::Broken(e) => println!("dropped watch: {e}"),
        other => panic!("an abruptly cut watch should break off, got {other:?}"),
    }
    assert!(matches!(w2.next(T), WatchNext::Broken(_)));
    assert!(proxy_tests::wait_for(T, || (api.open_watches() == 0).then_some(())).is_some());

    let started = Instant::now();
    let w = api.watch(&format!(
        "/api/v1/pods?watch=1&resourceVersion={rv}&timeoutSeconds=1"
    ));
    assert!(
        matches!(w.next(T), WatchNext::Closed),
        "timeoutSeconds ends the watch cleanly"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));

    // A watch on an Istio kind ends when the CRD goes away (after its objects' deletions).
    api.install_istio_crds(&["v1"]);
    api.apply(istio_json(
        "v1",
        "Sidecar",
        "shop",
        "default",
        json!({"egress": [{"hosts": ["./*"]}]}),
    ));
    let w = api.watch(&format!(
        "/apis/networking.istio.io/v1/namespaces/shop/sidecars?watch=1&resourceVersion={}",
        api.resource_version()
    ));
    api.uninstall_istio_crds();
    let e = event(&w);
    assert_eq!(
        (e["type"].as_str(), e["object"]["kind"].as_str()),
        (Some("DELETED"), Some("Sidecar")),
        "{e}"
    );
    assert!(matches!(w.next(T), WatchNext::Closed));
}
