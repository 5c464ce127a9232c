//! Server-side printing: `meta.k8s.io/v1 Table` as kubectl asks for it (the columns of the
//! real printers, and of Istio's CRDs' additionalPrinterColumns).
use serde_json::{json, Value};

use super::store::ResDef;
use super::util::{age_of, human_duration, parse_rfc3339, unix_now};

const NAME_DOC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const AGE_DOC: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";

/// How much of each object a Table row carries (`includeObject`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Include {
    None,
    Metadata,
    Object,
}

fn col(name: &str, type_: &str, description: &str, priority: u32) -> Value {
    let mut c = json!({
        "name": name,
        "type": type_,
        "format": "",
        "description": description,
        "priority": priority,
    });
    if name == "Name" {
        c["format"] = "name".into();
    }
    c
}

pub(crate) fn columns(d: &ResDef) -> Vec<Value> {
    let name = col("Name", "string", NAME_DOC, 0);
    let age = col(
        "Age",
        if d.is_istio() { "date" } else { "string" },
        AGE_DOC,
        0,
    );
    match d.plural {
        "pods" => vec![
            name,
            col("Ready", "string", "The aggregate readiness state of this pod for accepting traffic.", 0),
            col("Status", "string", "The aggregate status of the containers in this pod.", 0),
            col("Restarts", "string", "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.", 0),
            age,
            col("IP", "string", "podIP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.", 1),
            col("Node", "string", "NodeName indicates in which node this pod is scheduled.", 1),
            col("Nominated Node", "string", "nominatedNodeName is set only when this pod preempts other pods on the node, but it cannot be scheduled right away as preemption victims receive their graceful termination periods.", 1),
            col("Readiness Gates", "string", "If specified, all readiness gates will be evaluated for pod readiness.", 1),
        ],
        "namespaces" => vec![
            name,
            col("Status", "string", "The status of the namespace", 0),
            age,
        ],
        "services" => vec![
            name,
            col("Type", "string", "type determines how the Service is exposed.", 0),
            col("Cluster-IP", "string", "clusterIP is the IP address of the service and is usually assigned randomly.", 0),
            col("External-IP", "string", "List of IP addresses for which nodes in the cluster will also accept traffic for this service.", 0),
            col("Port(s)", "string", "The list of ports that are exposed by this service.", 0),
            age,
            col("Selector", "string", "Route service traffic to pods with label keys and values matching this selector.", 1),
        ],
        "secrets" => vec![
            name,
            col("Type", "string", "Used to facilitate programmatic handling of secret data.", 0),
            col("Data", "string", "Data contains the secret data.", 0),
            age,
        ],
        "configmaps" => vec![
            name,
            col("Data", "string", "Data contains the configuration data.", 0),
            age,
        ],
        "endpointslices" => vec![
            name,
            col("AddressType", "string", "addressType specifies the type of address carried by this EndpointSlice.", 0),
            col("Ports", "string", "ports specifies the list of network ports exposed by each endpoint in this slice.", 0),
            col("Endpoints", "string", "endpoints is a list of unique endpoints in this slice.", 0),
            age,
        ],
        "virtualservices" => vec![
            name,
            col("Gateways", "string", "The names of gateways and sidecars that should apply these routes", 0),
            col("Hosts", "string", "The destination hosts to which traffic is being sent", 0),
            age,
        ],
        "destinationrules" => vec![
            name,
            col("Host", "string", "The name of a service from the service registry", 0),
            age,
        ],
        "serviceentries" => vec![
            name,
            col("Hosts", "string", "The hosts associated with the ServiceEntry", 0),
            col("Location", "string", "Whether the service is external to the mesh or part of the mesh (MESH_EXTERNAL or MESH_INTERNAL)", 0),
            col("Resolution", "string", "Service resolution mode for the hosts (NONE, STATIC, or DNS)", 0),
            age,
        ],
        _ => vec![name, age],
    }
}

fn or_none(v: &Value) -> Value {
    match v.as_str() {
        Some(s) if !s.is_empty() => s.into(),
        _ => "<none>".into(),
    }
}

fn pod_status(obj: &Value) -> String {
    if !obj["metadata"]["deletionTimestamp"].is_null() {
        return "Terminating".into();
    }
    let mut reason = obj["status"]["reason"]
        .as_str()
        .or(obj["status"]["phase"].as_str())
        .unwrap_or("")
        .to_string();
    for c in obj["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(r) = c["state"]["waiting"]["reason"].as_str() {
            reason = r.to_string();
        } else if let Some(r) = c["state"]["terminated"]["reason"].as_str() {
            reason = r.to_string();
        }
    }
    reason
}

fn service_ports(obj: &Value) -> String {
    let ports: Vec<String> = obj["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_u64() {
                Some(n) => format!("{}:{n}/{proto}", p["port"]),
                None => format!("{}/{proto}", p["port"]),
            }
        })
        .collect();
    if ports.is_empty() {
        "<none>".into()
    } else {
        ports.join(",")
    }
}

fn selector(obj: &Value) -> String {
    match obj["spec"]["selector"].as_object() {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(","),
        _ => "<none>".into(),
    }
}

fn slice_endpoints(obj: &Value) -> String {
    let addrs: Vec<&str> = obj["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    match addrs.len() {
        0 => "<unset>".into(),
        n if n <= 3 => addrs.join(","),
        n => format!("{} + {} more...", addrs[..3].join(","), n - 3),
    }
}

fn cells(d: &ResDef, obj: &Value) -> Vec<Value> {
    let name: Value = obj["metadata"]["name"].clone();
    let age: Value = age_of(obj).into();
    let len = |v: &Value| v.as_object().map(|m| m.len()).unwrap_or(0);
    match d.plural {
        "pods" => {
            let statuses = obj["status"]["containerStatuses"].as_array();
            let total = obj["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = statuses.map_or(0, |s| s.iter().filter(|c| c["ready"] == true).count());
            let restarts: u64 = statuses.map_or(0, |s| {
                s.iter()
                    .map(|c| c["restartCount"].as_u64().unwrap_or(0))
                    .sum()
            });
            let gates = obj["spec"]["readinessGates"]
                .as_array()
                .filter(|g| !g.is_empty())
                .map(|g| format!("0/{}", g.len()))
                .unwrap_or_else(|| "<none>".into());
            vec![
                name,
                format!("{ready}/{total}").into(),
                pod_status(obj).into(),
                restarts.to_string().into(),
                age,
                or_none(&obj["status"]["podIP"]),
                or_none(&obj["spec"]["nodeName"]),
                or_none(&obj["status"]["nominatedNodeName"]),
                gates.into(),
            ]
        }
        "namespaces" => vec![name, obj["status"]["phase"].clone(), age],
        "services" => {
            let t = obj["spec"]["type"].as_str().unwrap_or("ClusterIP");
            let external = match t {
                "ExternalName" => obj["spec"]["externalName"].clone(),
                "LoadBalancer" => "<pending>".into(),
                _ => "<none>".into(),
            };
            vec![
                name,
                t.into(),
                or_none(&obj["spec"]["clusterIP"]),
                external,
                service_ports(obj).into(),
                age,
                selector(obj).into(),
            ]
        }
        "secrets" => vec![
            name,
            obj["type"].clone(),
            (len(&obj["data"]) as u64).into(),
            age,
        ],
        "configmaps" => vec![
            name,
            ((len(&obj["data"]) + len(&obj["binaryData"])) as u64).into(),
            age,
        ],
        "endpointslices" => {
            let ports: Vec<String> = obj["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p["port"].to_string())
                .collect();
            vec![
                name,
                obj["addressType"].clone(),
                if ports.is_empty() {
                    "<unset>".to_string()
                } else {
                    ports.join(",")
                }
                .into(),
                slice_endpoints(obj).into(),
                age,
            ]
        }
        // CRD columns of type string: the JSONPath result as text (arrays and objects as
        // JSON), null when absent; a "date" column as its age.
        "virtualservices" => vec![
            name,
            crd_text(&obj["spec"]["gateways"]),
            crd_text(&obj["spec"]["hosts"]),
            crd_age(obj),
        ],
        "destinationrules" => vec![name, crd_text(&obj["spec"]["host"]), crd_age(obj)],
        "serviceentries" => vec![
            name,
            crd_text(&obj["spec"]["hosts"]),
            crd_text(&obj["spec"]["location"]),
            crd_text(&obj["spec"]["resolution"]),
            crd_age(obj),
        ],
        _ => vec![name, if d.is_istio() { crd_age(obj) } else { age }],
    }
}

fn crd_text(v: &Value) -> Value {
    match v {
        Value::Null => Value::Null,
        Value::String(s) => s.clone().into(),
        other => other.to_string().into(),
    }
}

fn crd_age(obj: &Value) -> Value {
    obj["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(parse_rfc3339)
        .map(|t| human_duration(unix_now() - t).into())
        .unwrap_or(Value::Null)
}

fn row(d: &ResDef, obj: &Value, include: Include) -> Value {
    let mut r = json!({"cells": cells(d, obj)});
    match include {
        Include::None => {}
        Include::Object => r["object"] = obj.clone(),
        Include::Metadata => r["object"] = partial(obj),
    }
    r
}

/// `PartialObjectMetadata` of an object.
pub(crate) fn partial(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj["metadata"],
    })
}

/// A Table of `objs`; `headers` false leaves columnDefinitions null (watch events after
/// the first, as the real server sends them).
pub(crate) fn table(
    d: &ResDef,
    objs: &[Value],
    include: Include,
    headers: bool,
    list_meta: Value,
) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": if headers { Value::from(columns(d)) } else { Value::Null },
        "rows": objs.iter().map(|o| row(d, o, include)).collect::<Vec<_>>(),
    })
}
