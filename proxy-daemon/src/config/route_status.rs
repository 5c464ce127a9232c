//! `status.parents` of the Gateway API routes (GEP-1294: a mesh MUST set status on the
//! routes it carries out). Every node computes the same conditions from the same
//! configuration, so there is nothing to elect: each write is a read-modify-write guarded
//! by `resourceVersion`, and skipped when our entry already says the same (conditions
//! compared without their `lastTransitionTime`). With many nodes a change is written by
//! whichever node gets there first; the others' writes conflict, they read again, find it
//! written, and stop — the status never flaps. Entries of other controllers (Istio's, say)
//! are kept as they are.
use std::{collections::HashMap, sync::Arc};

use kube::{
    api::{Api, ApiResource, DynamicObject, Patch, PatchParams},
    Client,
};
use prometheus_client::{
    encoding::EncodeLabelSet, metrics::counter::Counter, metrics::family::Family,
};
use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::state::{
    routes::{ParentStatus, CONTROLLER_NAME},
    Published,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub kind: &'static str,
    /// written | unchanged | conflict | error
    pub result: &'static str,
}

/// `proxy_daemon_route_status_writes_total`.
pub type WriteMetrics = Family<WriteLabels, Counter>;

/// Keeps the routes' status in step with each new snapshot until the daemon stops.
pub async fn run(client: Client, published: Arc<Published>, writes: WriteMetrics) {
    let mut changes = published.subscribe();
    // What was last written or found in place, per route: unchanged desires skip the API.
    let mut in_place: HashMap<(&'static str, String, String), Value> = HashMap::new();
    loop {
        let snap = published.load();
        let mut by_route: HashMap<(&'static str, String, String), Vec<&ParentStatus>> =
            HashMap::new();
        for s in &snap.routes.route_status {
            by_route
                .entry((s.kind, s.namespace.clone(), s.name.clone()))
                .or_default()
                .push(s);
        }
        for (key, parents) in by_route {
            let ours = our_entries(&parents);
            if in_place.get(&key) == Some(&ours) {
                continue;
            }
            let result = write(&client, &key, &ours).await;
            writes
                .get_or_create(&WriteLabels {
                    kind: key.0,
                    result,
                })
                .inc();
            if result == "written" || result == "unchanged" {
                in_place.insert(key, ours);
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

fn resource(kind: &'static str) -> ApiResource {
    let plural = if kind == "GRPCRoute" {
        "grpcroutes"
    } else {
        "httproutes"
    };
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Our `status.parents` entries for one route, without times (compared as they are).
fn our_entries(parents: &[&ParentStatus]) -> Value {
    let condition = |t: &str, (ok, reason): (bool, &str), message: &str| {
        json!({
            "type": t,
            "status": if ok { "True" } else { "False" },
            "reason": reason,
            "message": message,
        })
    };
    Value::Array(
        parents
            .iter()
            .map(|p| {
                json!({
                    "parentRef": p.parent_ref,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": [
                        condition("Accepted", p.accepted, &p.message),
                        condition("ResolvedRefs", p.resolved_refs, &p.message),
                    ],
                })
            })
            .collect(),
    )
}

/// Our entries as they stand in `current` (another controller's are not ours), with
/// `lastTransitionTime` and `observedGeneration` left out for comparison.
fn comparable(current: &[Value]) -> Value {
    Value::Array(
        current
            .iter()
            .filter(|p| p["controllerName"] == CONTROLLER_NAME)
            .map(|p| {
                let mut p = p.clone();
                if let Some(conds) = p["conditions"].as_array_mut() {
                    for c in conds {
                        if let Some(o) = c.as_object_mut() {
                            o.remove("lastTransitionTime");
                            o.remove("observedGeneration");
                        }
                    }
                }
                p
            })
            .collect(),
    )
}

/// Reads the route, and writes our entries if they differ: "written", "unchanged",
/// "conflict" (another node wrote first and ours no longer applies as read) or "error".
async fn write(
    client: &Client,
    (kind, namespace, name): &(&'static str, String, String),
    ours: &Value,
) -> &'static str {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource(kind));
    for _ in 0..3 {
        let obj = match api.get(name).await {
            Ok(o) => o,
            Err(e) => {
                debug!(kind, namespace, name, error = %e, "route status: read failed");
                return "error";
            }
        };
        let current: Vec<Value> = obj.data["status"]["parents"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if &comparable(&current) == ours {
            return "unchanged";
        }
        let generation = obj.metadata.generation.unwrap_or(0);
        let now = jiff::Timestamp::now().to_string();
        let mut parents: Vec<Value> = current
            .into_iter()
            .filter(|p| p["controllerName"] != CONTROLLER_NAME)
            .collect();
        for entry in ours.as_array().into_iter().flatten() {
            let mut e = entry.clone();
            for c in e["conditions"].as_array_mut().into_iter().flatten() {
                c["lastTransitionTime"] = now.clone().into();
                c["observedGeneration"] = generation.into();
            }
            parents.push(e);
        }
        let patch = json!({
            "metadata": {"resourceVersion": obj.metadata.resource_version},
            "status": {"parents": parents},
        });
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return "written",
            Err(kube::Error::Api(s)) if s.code == 409 => {
                debug!(
                    kind,
                    namespace, name, "route status: written meanwhile; reading again"
                );
                continue;
            }
            Err(e) => {
                warn!(kind, namespace, name, error = %e, "route status: write failed");
                return "error";
            }
        }
    }
    "conflict"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_compare_without_times_and_keep_other_controllers_out() {
        let p = ParentStatus {
            kind: "HTTPRoute",
            namespace: "ns".into(),
            name: "r".into(),
            parent_ref: json!({"group": "", "kind": "Service", "name": "echo"}),
            accepted: (true, "Accepted"),
            resolved_refs: (false, "BackendNotFound"),
            message: "backend Service ns/x does not exist".into(),
        };
        let ours = our_entries(&[&p]);
        let mut stored = ours[0].clone();
        for c in stored["conditions"].as_array_mut().unwrap() {
            c["lastTransitionTime"] = "2026-01-01T00:00:00Z".into();
            c["observedGeneration"] = 3.into();
        }
        let istio = json!({"controllerName": "istio.io/gateway-controller", "parentRef": {}, "conditions": []});
        assert_eq!(comparable(&[istio.clone(), stored.clone()]), ours);
        let mut other = stored;
        other["conditions"][1]["status"] = "True".into();
        assert_ne!(comparable(&[istio, other]), ours);
        assert_eq!(ours[0]["conditions"][1]["reason"], "BackendNotFound");
    }
}
