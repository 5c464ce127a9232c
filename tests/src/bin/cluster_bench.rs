//! Cluster mode at scale: 5,000 pods, 2,000 Services with their EndpointSlices and 500
//! VirtualServices as the API serves them (JSON, `managedFields` and all), fed through the
//! cluster store exactly as watch events are, then compiled. Reports the store's memory
//! (counting allocator: bytes kept, not RSS noise), the time to take in the initial lists,
//! the compile time, and the time from one pod's label change to a new snapshot.
use std::time::Instant;

use proxy_tests::counting_alloc::{live, Counting};

use kube::api::{ApiResource, DynamicObject};
use proxy_common::FailMode;
use proxy_daemon::{
    config::cluster::{core, ClusterStore},
    state,
};
use serde_json::json;

#[global_allocator]
static GLOBAL: Counting = Counting;

const PODS: usize = 5_000;
const SERVICES: usize = 2_000;
const VIRTUAL_SERVICES: usize = 500;
const NAMESPACES: usize = 50;

fn obj(v: serde_json::Value) -> DynamicObject {
    serde_json::from_value(v).expect("object")
}

fn managed_fields() -> serde_json::Value {
    json!([{"apiVersion": "v1", "fieldsType": "FieldsV1", "manager": "kubelet", "operation": "Update",
        "time": "2026-11-30T01:00:00Z", "subresource": "status",
        "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:podIP": {}}}}])
}

fn pod(i: usize) -> DynamicObject {
    let svc = i % SERVICES;
    obj(json!({
        "metadata": {"name": format!("svc-{svc}-7d9f8c-{i:05}"), "namespace": format!("ns-{}", svc % NAMESPACES),
            "uid": format!("00000000-0000-0000-0000-{i:012}"), "resourceVersion": "1",
            "labels": {"app": format!("svc-{svc}"), "version": if i.is_multiple_of(2) {"v1"} else {"v2"}, "pod-template-hash": "7d9f8c"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("svc-{svc}-7d9f8c"), "uid": "rs", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": managed_fields()},
        "spec": {"nodeName": format!("node-{}", i % 100), "containers": [{"name": "app", "image": "registry.example/app:1.2.3",
            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}],
            "restartPolicy": "Always", "serviceAccountName": "default", "dnsPolicy": "ClusterFirst"},
        "status": {"phase": "Running", "podIP": format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256),
            "hostIP": "192.0.2.1", "qosClass": "Burstable",
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]}
    }))
}

fn service(i: usize) -> DynamicObject {
    obj(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % NAMESPACES), "uid": format!("svc-{i}"),
            "managedFields": managed_fields()},
        "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250), "clusterIPs": [format!("10.96.{}.{}", i / 250, i % 250)],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "selector": {"app": format!("svc-{i}")}, "type": "ClusterIP", "sessionAffinity": "None"}
    }))
}

fn slice(i: usize) -> DynamicObject {
    let endpoints: Vec<_> = (0..PODS / SERVICES + 1)
        .map(|k| i + k * SERVICES)
        .filter(|p| *p < PODS)
        .map(|p| json!({"addresses": [format!("10.{}.{}.{}", 64 + p / 65536, (p / 256) % 256, p % 256)],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": format!("node-{}", p % 100),
            "targetRef": {"kind": "Pod", "name": format!("svc-{i}-7d9f8c-{p:05}"), "namespace": format!("ns-{}", i % NAMESPACES)}}))
        .collect();
    obj(json!({
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": format!("ns-{}", i % NAMESPACES),
            "labels": {"kubernetes.io/service-name": format!("svc-{i}"), "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "managedFields": managed_fields()},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))
}

fn virtual_service(i: usize) -> DynamicObject {
    obj(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % NAMESPACES), "managedFields": managed_fields()},
        "spec": {"hosts": [format!("svc-{i}")], "http": [
            {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": {"host": format!("svc-{i}"), "subset": "v2"}}]},
            {"match": [{"uri": {"prefix": "/api/v2"}}], "rewrite": {"uri": "/api"}, "route": [{"destination": {"host": format!("svc-{i}")}}]},
            {"route": [{"destination": {"host": format!("svc-{i}"), "subset": "v1"}, "weight": 10},
                       {"destination": {"host": format!("svc-{i}"), "subset": "v2"}, "weight": 90}]}]},
        "status": {}
    }))
}

fn destination_rule(i: usize) -> DynamicObject {
    obj(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % NAMESPACES)},
        "spec": {"host": format!("svc-{i}"), "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}
    }))
}

fn istio(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn main() {
    let keys = [
        "Namespace",
        "Pod",
        "Service",
        "EndpointSlice",
        "VirtualService",
        "DestinationRule",
    ];
    let settings = state::CaptureSettings {
        label_key: "nodeproxy.io/capture".into(),
        label_value: "enabled".into(),
        node_name: "node-0".into(),
        default_fail_mode: FailMode::Open,
        default_export_to: Vec::new(),
        trust_domain: "cluster.local".into(),
    };
    let before = live();
    let store = ClusterStore::new(&keys);
    let t = Instant::now();
    let ns_ar = core("Namespace", "namespaces");
    for n in 0..NAMESPACES {
        store.apply(
            "Namespace",
            &ns_ar,
            obj(json!({"metadata": {"name": format!("ns-{n}"), "labels": {"nodeproxy.io/capture": "enabled"}}})),
        );
    }
    let pod_ar = core("Pod", "pods");
    for i in 0..PODS {
        store.apply("Pod", &pod_ar, pod(i));
    }
    let svc_ar = core("Service", "services");
    let eps_ar = ApiResource {
        group: "discovery.k8s.io".into(),
        version: "v1".into(),
        api_version: "discovery.k8s.io/v1".into(),
        kind: "EndpointSlice".into(),
        plural: "endpointslices".into(),
    };
    for i in 0..SERVICES {
        store.apply("Service", &svc_ar, service(i));
        store.apply("EndpointSlice", &eps_ar, slice(i));
    }
    let vs_ar = istio("VirtualService", "virtualservices");
    let dr_ar = istio("DestinationRule", "destinationrules");
    for i in 0..VIRTUAL_SERVICES {
        store.apply("VirtualService", &vs_ar, virtual_service(i));
        store.apply("DestinationRule", &dr_ar, destination_rule(i));
    }
    for k in keys {
        store.mark_synced(k);
    }
    let ingest_ms = t.elapsed().as_secs_f64() * 1e3;
    let store_bytes = live() - before;

    let mut compile_ms = Vec::new();
    let mut snapshot_bytes = 0;
    for round in 0..5 {
        // Measured from before the store hands out its copies: those are dropped inside
        // the compile, so what is left afterwards is the snapshot.
        let before = live();
        let t = Instant::now();
        let contents = store.contents();
        assert!(
            contents.rejected.is_empty(),
            "{:?}",
            contents.rejected.first()
        );
        let state::Compiled {
            snapshot: snap,
            rejected,
            ..
        } = state::compile_valid(contents.objects, &settings, round, &Default::default())
            .expect("compile");
        compile_ms.push(t.elapsed().as_secs_f64() * 1e3);
        snapshot_bytes = live() - before;
        assert!(rejected.is_empty(), "{:?}", rejected.first());
        assert_eq!(snap.registry.all().count(), SERVICES);
        assert_eq!(snap.pods.len(), PODS / 100, "this node's pods are captured");
    }
    // One event: a pod of this node is relabelled; the daemon recompiles everything.
    let t = Instant::now();
    let mut changed = pod(0);
    changed
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("track".into(), "canary".into());
    store.apply("Pod", &pod_ar, changed);
    let contents = store.contents();
    let snap = state::compile_valid(contents.objects, &settings, 9, &Default::default())
        .expect("compile")
        .snapshot;
    let event_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(
        snap.pods
            .values()
            .filter(|p| p.workload.labels.contains_key("track"))
            .count(),
        1
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "cluster store: {PODS} pods, {SERVICES} services + slices, {VIRTUAL_SERVICES} VirtualServices + DestinationRules: \
         store {:.1} MiB after taking the lists in {ingest_ms:.0} ms; compile {:.0} ms (median of 5), snapshot {:.1} MiB; \
         one pod relabelled → new snapshot in {event_ms:.0} ms",
        store_bytes as f64 / (1024.0 * 1024.0),
        median(compile_ms),
        snapshot_bytes as f64 / (1024.0 * 1024.0),
    );
}
