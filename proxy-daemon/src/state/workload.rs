//! Who a pod is, in the terms Istio's metrics use.
use std::{collections::BTreeMap, sync::Arc};

use crate::config::k8s::Pod;

/// Identity of a source (or destination) workload, derived from pod metadata.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadInfo {
    pub pod_name: String,
    pub namespace: String,
    pub uid: String,
    /// Owning Deployment/StatefulSet/DaemonSet/Job name when derivable, else the app label,
    /// else the pod name (Istio's rule).
    pub workload: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub labels: BTreeMap<String, String>,
    /// status.podIP (consistent hashing on the source IP).
    pub ip: Option<String>,
    /// `spec.serviceAccountName` (`default` when unset): with the namespace, the workload's
    /// identity.
    pub service_account: String,
}

pub const UNKNOWN: &str = "unknown";

fn first_label<'a>(labels: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| labels.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// A ReplicaSet made by a Deployment is named `<deployment>-<pod-template-hash>`.
fn deployment_of_replicaset(rs: &str, labels: &BTreeMap<String, String>) -> String {
    if let Some(hash) = labels.get("pod-template-hash") {
        if let Some(stem) = rs.strip_suffix(&format!("-{hash}")) {
            return stem.to_string();
        }
    }
    match rs.rsplit_once('-') {
        Some((stem, tail))
            if !stem.is_empty() && tail.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            stem.to_string()
        }
        _ => rs.to_string(),
    }
}

/// A Job made by a CronJob is named `<cronjob>-<schedule time>`.
fn cronjob_of_job(job: &str) -> Option<String> {
    let (stem, tail) = job.rsplit_once('-')?;
    (tail.len() >= 8 && tail.chars().all(|c| c.is_ascii_digit())).then(|| stem.to_string())
}

impl WorkloadInfo {
    /// The workload's SPIFFE identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> crate::identity::Identity {
        crate::identity::Identity::new(trust_domain, &self.namespace, &self.service_account)
    }

    pub fn from_pod(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let labels = &meta.labels;
        let owner = meta
            .owner_references
            .iter()
            .find(|o| o.controller.unwrap_or(false))
            .or_else(|| meta.owner_references.first());
        let app = first_label(labels, &["app", "app.kubernetes.io/name"]);
        let workload = match owner {
            Some(o) if o.kind == "ReplicaSet" => deployment_of_replicaset(&o.name, labels),
            Some(o) if o.kind == "Job" => cronjob_of_job(&o.name).unwrap_or_else(|| o.name.clone()),
            Some(o) if !o.name.is_empty() => o.name.clone(),
            _ => app.map(str::to_string).unwrap_or_else(|| meta.name.clone()),
        };
        let canonical_service = first_label(
            labels,
            &[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ],
        )
        .map(str::to_string)
        .unwrap_or_else(|| workload.clone());
        let canonical_revision = first_label(
            labels,
            &[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ],
        )
        .unwrap_or("latest")
        .to_string();
        Self {
            pod_name: meta.name.clone(),
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            uid: meta.uid.clone().unwrap_or_default(),
            workload,
            app: app.unwrap_or(UNKNOWN).to_string(),
            version: first_label(labels, &["version", "app.kubernetes.io/version"])
                .unwrap_or(UNKNOWN)
                .to_string(),
            canonical_service,
            canonical_revision,
            labels: labels.clone(),
            ip: pod.status.pod_ip.clone(),
            service_account: pod
                .spec
                .service_account_name
                .clone()
                .or_else(|| pod.spec.service_account.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string()),
        }
    }
}

// The two halves of Istio's metric label sets that a workload determines: built once per
// pod at compile or enrol time, shared by every series of it.

/// The source half of Istio's labels, built once per pod (shared by every series of it).
#[derive(Debug, Hash, PartialEq, Eq)]
pub struct SourceLabels {
    pub workload: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

impl SourceLabels {
    /// A caller seen by the destination, as the cluster state names its address.
    pub fn from_peer(p: &PeerLabels) -> Arc<Self> {
        Arc::new(Self {
            workload: p.workload.clone(),
            namespace: p.namespace.clone(),
            app: p.app.clone(),
            version: p.version.clone(),
            canonical_service: p.canonical_service.clone(),
            canonical_revision: p.canonical_revision.clone(),
        })
    }

    /// A caller the cluster state does not know.
    pub fn unknown() -> Arc<Self> {
        Self::from_peer(&PeerLabels::unknown())
    }

    pub fn of(w: &WorkloadInfo) -> Arc<Self> {
        Arc::new(Self {
            workload: w.workload.clone(),
            namespace: w.namespace.clone(),
            app: w.app.clone(),
            version: w.version.clone(),
            canonical_service: w.canonical_service.clone(),
            canonical_revision: w.canonical_revision.clone(),
        })
    }
}

/// The destination workload's labels (mesh destinations: the pod behind the endpoint).
#[derive(Debug, Hash, PartialEq, Eq)]
pub struct PeerLabels {
    pub workload: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

impl PeerLabels {
    pub fn of(w: &WorkloadInfo) -> Arc<Self> {
        Arc::new(Self {
            workload: w.workload.clone(),
            namespace: w.namespace.clone(),
            app: w.app.clone(),
            version: w.version.clone(),
            canonical_service: w.canonical_service.clone(),
            canonical_revision: w.canonical_revision.clone(),
        })
    }

    /// Outside the mesh (ServiceEntry hosts, passthrough): every field `unknown`.
    pub fn unknown() -> Arc<Self> {
        static UNKNOWN_PEER: std::sync::LazyLock<Arc<PeerLabels>> =
            std::sync::LazyLock::new(|| {
                Arc::new(PeerLabels {
                    workload: UNKNOWN.into(),
                    namespace: UNKNOWN.into(),
                    app: UNKNOWN.into(),
                    version: UNKNOWN.into(),
                    canonical_service: UNKNOWN.into(),
                    canonical_revision: UNKNOWN.into(),
                })
            });
        UNKNOWN_PEER.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::k8s::{ObjectMeta, OwnerReference};

    fn pod(name: &str, labels: &[(&str, &str)], owner: Option<(&str, &str)>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: name.into(),
                namespace: Some("azar".into()),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                owner_references: owner
                    .map(|(kind, name)| OwnerReference {
                        kind: kind.into(),
                        name: name.into(),
                        controller: Some(true),
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn deployment_name_from_replicaset() {
        let p = pod(
            "api-7d9f8b6c5-x2x9z",
            &[
                ("app", "api"),
                ("version", "v2"),
                ("pod-template-hash", "7d9f8b6c5"),
            ],
            Some(("ReplicaSet", "api-test-7d9f8b6c5")),
        );
        let w = WorkloadInfo::from_pod(&p);
        assert_eq!(w.workload, "api-test");
        assert_eq!(w.app, "api");
        assert_eq!(w.version, "v2");
        assert_eq!(w.canonical_service, "api");
        assert_eq!(w.canonical_revision, "v2");
    }

    #[test]
    fn statefulset_and_bare_pods() {
        let w = WorkloadInfo::from_pod(&pod("db-0", &[], Some(("StatefulSet", "db"))));
        assert_eq!(w.workload, "db");
        assert_eq!(w.app, UNKNOWN);
        assert_eq!(w.canonical_revision, "latest");
        let w = WorkloadInfo::from_pod(&pod("client", &[("app", "curl")], None));
        assert_eq!(w.workload, "curl");
        let w = WorkloadInfo::from_pod(&pod("lonely", &[], None));
        assert_eq!(w.workload, "lonely");
        let w = WorkloadInfo::from_pod(&pod("j-1", &[], Some(("Job", "backup-28912345"))));
        assert_eq!(w.workload, "backup");
    }
}
