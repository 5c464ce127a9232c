//! Objects in the shapes `kubectl get -o json` shows them on a real cluster, for tests to
//! store in the stand-in (change them further with plain `serde_json` indexing).
use serde_json::{json, Map, Value};

use super::store::ResDef;
use super::util;

fn labels_map(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect(),
    )
}

/// A Deployment's pod as a real cluster shows it: owned by ReplicaSet `owner_rs` (with its
/// pod-template-hash label) when given, scheduled on `node`, Running and Ready, with the
/// projected service-account token volume, default tolerations and QoS class Burstable.
/// metadata.uid is left out (the store fills a random one; set it to match a harness pod).
pub fn pod_json(
    ns: &str,
    name: &str,
    node: &str,
    ip: &str,
    labels: &[(&str, &str)],
    owner_rs: Option<&str>,
) -> Value {
    let now = util::now_rfc3339();
    let mut labels = labels_map(labels);
    let volume = format!("kube-api-access-{}", util::random_suffix(5));
    let container_id = util::random_hex(64);
    let image = "registry.example.com/app:1.0";
    let mut meta = json!({
        "name": name,
        "namespace": ns,
        "labels": {},
    });
    if let Some(rs) = owner_rs {
        if let Some((_, hash)) = rs.rsplit_once('-') {
            labels["pod-template-hash"] = hash.into();
        }
        meta["generateName"] = format!("{rs}-").into();
        meta["ownerReferences"] = json!([{
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": rs,
            "uid": util::random_uid(),
            "controller": true,
            "blockOwnerDeletion": true,
        }]);
    }
    meta["labels"] = labels;
    let condition = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": now});
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [{
                "name": "app",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                "resources": {
                    "limits": {"memory": "128Mi"},
                    "requests": {"cpu": "100m", "memory": "64Mi"},
                },
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [{
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    "name": volume,
                    "readOnly": true,
                }],
            }],
            "dnsPolicy": "ClusterFirst",
            "enableServiceLinks": true,
            "nodeName": node,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "securityContext": {},
            "serviceAccount": "default",
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
            "tolerations": [
                {"effect": "NoExecute", "key": "node.kubernetes.io/not-ready",
                 "operator": "Exists", "tolerationSeconds": 300},
                {"effect": "NoExecute", "key": "node.kubernetes.io/unreachable",
                 "operator": "Exists", "tolerationSeconds": 300},
            ],
            "volumes": [{
                "name": volume,
                "projected": {
                    "defaultMode": 420,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"items": [{"key": "ca.crt", "path": "ca.crt"}],
                                       "name": "kube-root-ca.crt"}},
                        {"downwardAPI": {"items": [{
                            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            "path": "namespace"}]}},
                    ],
                },
            }],
        },
        "status": {
            "conditions": [
                condition("PodReadyToStartContainers"),
                condition("Initialized"),
                condition("Ready"),
                condition("ContainersReady"),
                condition("PodScheduled"),
            ],
            "containerStatuses": [{
                "containerID": format!("containerd://{container_id}"),
                "image": image,
                "imageID": format!("registry.example.com/app@sha256:{}", util::random_hex(64)),
                "lastState": {},
                "name": "app",
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": {"running": {"startedAt": now}},
            }],
            "hostIP": "198.18.0.1",
            "hostIPs": [{"ip": "198.18.0.1"}],
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "qosClass": "Burstable",
            "startTime": now,
        },
    })
}

/// A namespace as a real cluster shows it (with the automatic
/// `kubernetes.io/metadata.name` label, the `kubernetes` finalizer and phase Active).
pub fn namespace_json(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut l = labels_map(labels);
    l["kubernetes.io/metadata.name"] = name.into();
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": l},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// A ClusterIP service; `ports` are (name, port, targetPort), all TCP.
pub fn service_json(
    ns: &str,
    name: &str,
    cluster_ip: &str,
    ports: &[(&str, u16, u16)],
    selector: &[(&str, &str)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, t)| json!({"name": n, "port": p, "protocol": "TCP", "targetPort": t}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": ports,
            "selector": labels_map(selector),
            "sessionAffinity": "None",
            "type": "ClusterIP",
        },
        "status": {"loadBalancer": {}},
    })
}

/// An EndpointSlice of `service` as the endpointslice controller writes it. `endpoints` are
/// (pod IP, node name, pod name, ready); `ports` are (name, port), TCP. The name gets a
/// random generateName suffix unless `name` is given. Each targetRef's uid is filled from
/// the stored pod when the slice is stored (as the controller would have it).
pub fn endpointslice_json(
    ns: &str,
    name: Option<&str>,
    service: &str,
    endpoints: &[(&str, &str, &str, bool)],
    ports: &[(&str, u16)],
) -> Value {
    let name = name
        .map(str::to_string)
        .unwrap_or_else(|| format!("{service}-{}", util::random_suffix(5)));
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node, pod, ready)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": node,
                "targetRef": {"kind": "Pod", "name": pod, "namespace": ns},
            })
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    json!({
        "addressType": "IPv4",
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "endpoints": endpoints,
        "metadata": {
            "name": name,
            "namespace": ns,
            "generateName": format!("{service}-"),
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": util::now_rfc3339()},
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Service",
                "name": service,
                "uid": util::random_uid(),
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "ports": ports,
    })
}

/// A Secret (e.g. type `kubernetes.io/tls` with `tls.crt`/`tls.key`); data is base64-encoded.
pub fn secret_json(ns: &str, name: &str, type_: &str, data: &[(&str, &[u8])]) -> Value {
    let data: Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(util::b64_std(v))))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "type": type_,
        "data": data,
    })
}

pub fn configmap_json(ns: &str, name: &str, data: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns},
        "data": labels_map(data),
    })
}

/// A `networking.istio.io/<version>` object of `kind` with `spec`.
pub fn istio_json(version: &str, kind: &str, ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": format!("networking.istio.io/{version}"),
        "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

// ---- managedFields ----

/// The FieldsV1 set of a value: maps list their keys (`f:`), lists keyed by name or port
/// their items (`k:`), anything else is a leaf.
fn fields_of(v: &Value, dot: bool) -> Value {
    match v {
        Value::Object(m) if !m.is_empty() => {
            let mut out = Map::new();
            if dot {
                out.insert(".".into(), json!({}));
            }
            for (k, c) in m {
                out.insert(format!("f:{k}"), fields_of(c, true));
            }
            Value::Object(out)
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(|i| item_key(i).is_some()) => {
            let mut out = Map::new();
            if dot {
                out.insert(".".into(), json!({}));
            }
            for i in items {
                out.insert(format!("k:{}", item_key(i).unwrap()), fields_of(i, true));
            }
            Value::Object(out)
        }
        _ => json!({}),
    }
}

/// The merge key of a list item (`{"name":"app"}`, `{"containerPort":80,"protocol":"TCP"}`).
fn item_key(i: &Value) -> Option<String> {
    let o = i.as_object()?;
    if let Some(p) = o.get("containerPort") {
        return Some(json!({"containerPort": p, "protocol": o.get("protocol").cloned().unwrap_or("TCP".into())}).to_string());
    }
    if let (Some(p), Some(proto)) = (o.get("port"), o.get("protocol")) {
        return Some(json!({"port": p, "protocol": proto}).to_string());
    }
    if let Some(u) = o.get("uid") {
        return Some(json!({"uid": u}).to_string());
    }
    if let Some(t) = o.get("type").filter(|_| o.contains_key("status")) {
        return Some(json!({"type": t}).to_string());
    }
    o.get("name").map(|n| json!({"name": n}).to_string())
}

/// The managedFields entries a real cluster would show for `obj`, and the
/// last-applied-configuration annotation when the object was made by `kubectl apply`:
/// objects with a controller owner were written by kube-controller-manager, others by
/// kubectl client-side apply; a pod's status by the kubelet.
pub(crate) fn managed_fields(d: &ResDef, obj: &Value, now: &str) -> (Value, Option<String>) {
    let controlled = obj["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|o| o.iter().any(|r| r["controller"] == true));
    let mut fields = Map::new();
    let mut meta = Map::new();
    for k in ["annotations", "labels", "generateName", "ownerReferences"] {
        let v = &obj["metadata"][k];
        if !v.is_null() && v != &json!({}) && v != &json!([]) {
            meta.insert(format!("f:{k}"), fields_of(v, true));
        }
    }
    if !meta.is_empty() {
        fields.insert("f:metadata".into(), Value::Object(meta));
    }
    let mut applied = Map::new();
    if let Some(o) = obj.as_object() {
        for (k, v) in o {
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status") {
                continue;
            }
            // Typed structs (spec) have no "." entry; maps (data) and CRs' objects do.
            let dot = k != "spec" || d.is_istio();
            fields.insert(format!("f:{k}"), fields_of(v, dot));
            applied.insert(k.clone(), v.clone());
        }
    }
    let api_version = obj["apiVersion"].as_str().unwrap_or("v1");
    let mut entries = vec![json!({
        "manager": if controlled { "kube-controller-manager" } else { "kubectl-client-side-apply" },
        "operation": "Update",
        "apiVersion": api_version,
        "time": now,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    })];
    if d.kind == "Pod" && obj.get("status").is_some_and(|s| s != &json!({})) {
        entries.push(json!({
            "manager": "kubelet",
            "operation": "Update",
            "apiVersion": "v1",
            "time": now,
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:status": fields_of(&obj["status"], false)},
            "subresource": "status",
        }));
    }
    let annotation = (!controlled).then(|| {
        let mut m = Map::new();
        for k in ["annotations", "labels"] {
            let mut v = obj["metadata"][k].clone();
            if let Some(a) = v.as_object_mut() {
                a.remove("kubectl.kubernetes.io/last-applied-configuration");
                if !a.is_empty() {
                    m.insert(k.into(), v);
                }
            }
        }
        m.insert("name".into(), obj["metadata"]["name"].clone());
        if d.namespaced {
            m.insert("namespace".into(), obj["metadata"]["namespace"].clone());
        }
        applied.insert("apiVersion".into(), api_version.into());
        applied.insert("kind".into(), d.kind.into());
        applied.insert("metadata".into(), Value::Object(m));
        format!("{}\n", Value::Object(applied))
    });
    (Value::Array(entries), annotation)
}
