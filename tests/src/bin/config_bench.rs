//! Compile time and snapshot memory for a synthetic config of N services × 5 routes
//! (Service + DestinationRule with two subsets + VirtualService with five rules each).
//! Memory is counted by a wrapping allocator: bytes the snapshot keeps, not RSS noise.
use std::time::Instant;

use proxy_tests::counting_alloc::{live, Counting};

use proxy_common::FailMode;
use proxy_daemon::{
    config::local,
    state::{self, Snapshot},
};

#[global_allocator]
static GLOBAL: Counting = Counting;

fn synthetic(n: usize) -> String {
    let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n  labels: {nodeproxy.io/capture: enabled}\n");
    for i in 0..n {
        let (a, b) = (i / 250, i % 250);
        y.push_str(&format!(
            "---
apiVersion: v1
kind: Service
metadata: {{name: svc-{i}, namespace: bench}}
spec:
  clusterIP: 10.96.{a}.{b}
  selector: {{app: svc-{i}}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc-{i}, namespace: bench}}
spec:
  host: svc-{i}
  trafficPolicy:
    loadBalancer: {{simple: LEAST_REQUEST}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc-{i}, namespace: bench}}
spec:
  hosts: [svc-{i}]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: svc-{i}, subset: v2}}}}]
  - match: [{{uri: {{prefix: /api/v2}}}}]
    rewrite: {{uri: /api}}
    route: [{{destination: {{host: svc-{i}, subset: v2}}}}]
  - match: [{{uri: {{regex: \"/items/[0-9]+\"}}}}]
    timeout: 2s
    route: [{{destination: {{host: svc-{i}, subset: v1}}}}]
  - match: [{{sourceLabels: {{app: canary}}}}]
    route: [{{destination: {{host: svc-{i}, subset: v1}}, weight: 10}}, {{destination: {{host: svc-{i}, subset: v2}}, weight: 90}}]
  - route: [{{destination: {{host: svc-{i}, subset: v1}}}}]
"
        ));
    }
    y
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let dir = std::env::temp_dir().join(format!("pd-config-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("bench.yaml"), synthetic(n)).expect("write");
    let settings = state::CaptureSettings {
        label_key: "nodeproxy.io/capture".into(),
        label_value: "enabled".into(),
        node_name: "n".into(),
        default_fail_mode: FailMode::Open,
        default_export_to: Vec::new(),
        trust_domain: "cluster.local".into(),
    };
    let mut parse_ms = Vec::new();
    let mut compile_ms = Vec::new();
    let mut held = 0isize;
    for round in 0..5 {
        let t = Instant::now();
        let loaded = local::load_path(&dir);
        parse_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(loaded.errors.is_empty(), "{:?}", &loaded.errors[..1]);
        let before = live();
        let t = Instant::now();
        let snap = state::compile(&loaded.objects, &settings, round).expect("compile");
        compile_ms.push(t.elapsed().as_secs_f64() * 1e3);
        // What the snapshot itself keeps once the parsed objects are gone.
        drop(loaded);
        let after_drop = live();
        let _ = before;
        held = after_drop;
        assert_eq!(snap.registry.all().count(), n);
        if round == 0 {
            let Snapshot {
                registry, routes, ..
            } = snap;
            let a = live();
            drop(registry);
            let b = live();
            let vs = routes.virtual_services;
            let drs = routes.destination_rules;
            drop(vs);
            let c = live();
            drop(drs);
            let d = live();
            eprintln!(
                "registry {} KiB, virtual services {} KiB, destination rules {} KiB",
                (a - b) / 1024,
                (b - c) / 1024,
                (c - d) / 1024
            );
            continue;
        }
        assert_eq!(snap.routes.virtual_services.len(), n);
        drop(snap);
        held -= live();
    }
    // One file per service, as many teams keep them: a reload after one file changed.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let text = synthetic(n);
    let mut docs = text.split("\n---\n");
    std::fs::write(dir.join("ns.yaml"), docs.next().unwrap_or_default()).expect("write");
    let rest: Vec<&str> = docs.collect();
    for (i, chunk) in rest.chunks(3).enumerate() {
        std::fs::write(dir.join(format!("svc-{i}.yaml")), chunk.join("\n---\n")).expect("write");
    }
    let mut loader = local::Loader::default();
    let t = Instant::now();
    let first = loader.load(&dir);
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(first.errors.is_empty());
    drop(first);
    let changed = dir.join("svc-7.yaml");
    let body = std::fs::read_to_string(&changed).expect("read");
    std::fs::write(&changed, body.replace("timeout: 2s", "timeout: 3s")).expect("write");
    let t = Instant::now();
    let again = loader.load(&dir);
    let reload_parse_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let snap = state::compile(&again.objects, &settings, 9).expect("compile");
    let reload_compile_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(snap.registry.all().count(), n);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{n} files, one changed: first load {first_ms:.0} ms; reload parses in {reload_parse_ms:.0} ms (cached files reused) + compile {reload_compile_ms:.0} ms"
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "config of {n} services x 5 routes ({} documents): parse {:.0} ms, compile {:.0} ms (medians of 5), snapshot holds {:.1} MiB ({:.0} bytes/service)",
        n * 3 + 1,
        median(parse_ms),
        median(compile_ms),
        held as f64 / (1024.0 * 1024.0),
        held as f64 / n as f64
    );
}
