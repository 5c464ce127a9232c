//! Enrolment: make the kernel send a captured pod's connects to a listener of ours inside
//! the pod's network namespace, and undo it when the pod goes away.
//!
//! The reconciler compares the snapshot's captured pods with what is enrolled, every
//! [`RECONCILE_INTERVAL`] and whenever the snapshot changes: pods whose cgroup or first
//! process appears later are picked up on the next pass, pods that vanish are dropped.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    capture::bpf::EnrolmentMaps,
    capture::cgroup,
    capture::netns::{self, NetnsWorker},
    metrics::Metrics,
    proxy::{self, PodContext, PodHandle, ProxyInputs},
    readiness::Ready,
    state::{fail_mode_name, CapturedPod, Published},
};
use proxy_common::{Enrolment, FailMode};

pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(200);
const READY_CONDITION: &str = "pod listeners";

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("netns: {0}")]
    Netns(#[from] netns::NetnsError),
    #[error("listener 127.0.0.1:{port} in pod netns: {source}")]
    Listener { port: u16, source: std::io::Error },
    #[error("eBPF map: {0}")]
    Map(#[from] crate::capture::bpf::BpfError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("process {pid} left the pod's cgroup while its netns was opened; retrying")]
    PidLeft { pid: u32 },
}

/// What /config_dump shows of each captured pod.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkloadStatus {
    pub pod: String,
    pub namespace: String,
    pub uid: String,
    pub workload: String,
    pub state: String,
    pub fail_mode: &'static str,
    pub cgroup: Option<PathBuf>,
    pub cgroup_id: Option<u64>,
    pub netns_inode: Option<u64>,
    pub netns_cookie: Option<u64>,
    pub listener: Option<String>,
    pub pid: Option<u32>,
    pub enrolled_at_unix_ms: Option<u128>,
}

struct EnrolledPod {
    pod_id: u32,
    cgroup: PathBuf,
    cgroup_id: u64,
    pid: u32,
    netns_inode: u64,
    netns_cookie: u64,
    fail_mode: FailMode,
    ctx: PodHandle,
    listener_task: JoinHandle<()>,
    enrolled_at: SystemTime,
}

pub struct Enroller {
    cgroup_root: PathBuf,
    outbound_port: u16,
    maps: EnrolmentMaps,
    published: Arc<Published>,
    inputs: Arc<ProxyInputs>,
    metrics: Arc<Metrics>,
    ready: Ready,
    pods: BTreeMap<String, EnrolledPod>,
    waiting: BTreeMap<String, String>,
    /// Pods of captured namespaces left alone on purpose, already logged.
    skipped: std::collections::BTreeSet<String>,
    next_pod_id: u32,
    status: Arc<ArcSwap<Vec<WorkloadStatus>>>,
}

impl Enroller {
    pub fn new(
        cgroup_root: PathBuf,
        outbound_port: u16,
        maps: EnrolmentMaps,
        published: Arc<Published>,
        inputs: Arc<ProxyInputs>,
        ready: Ready,
    ) -> Self {
        let metrics = inputs.metrics.clone();
        Self {
            cgroup_root,
            outbound_port,
            maps,
            published,
            inputs,
            metrics,
            ready,
            pods: BTreeMap::new(),
            waiting: BTreeMap::new(),
            skipped: Default::default(),
            next_pod_id: 1,
            status: Arc::new(ArcSwap::from_pointee(Vec::new())),
        }
    }

    pub fn status(&self) -> Arc<ArcSwap<Vec<WorkloadStatus>>> {
        self.status.clone()
    }

    /// The maps, for a daemon stopping before its first reconcile.
    pub fn into_maps(self) -> EnrolmentMaps {
        self.maps
    }

    /// Reconciles until `stop` fires, then closes every listener (drain starts) and hands the
    /// maps back.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> EnrolmentMaps {
        let mut changed = self.published.subscribe();
        // Entries an earlier daemon left stay until this first pass has replaced them:
        // meanwhile the kernel finds no listener and applies each pod's fail mode, so a
        // fail-closed pod is never let through during a restart.
        self.reconcile().await;
        self.forget_foreign_entries();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
                r = changed.changed() => { if r.is_err() { break } }
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            self.reconcile().await;
        }
        for (_, pod) in std::mem::take(&mut self.pods) {
            pod.listener_task.abort();
        }
        self.metrics.daemon.listeners.set(0);
        self.maps
    }

    /// Enrolment entries left by an earlier daemon for pods that are no longer wanted.
    fn forget_foreign_entries(&mut self) {
        for (cgroup_id, e) in self.maps.enrolled() {
            if !self.pods.values().any(|p| p.cgroup_id == cgroup_id) {
                self.maps.unenrol(cgroup_id);
                self.maps.forget_netns(e.netns_cookie);
            }
        }
    }

    async fn reconcile(&mut self) {
        let snapshot = self.published.load();
        // Drop what is no longer wanted or no longer there.
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            let reason = match snapshot.pods.get(&uid) {
                None => Some("removed from configuration"),
                Some(_) if !self.pods[&uid].cgroup.exists() => Some("cgroup gone"),
                Some(_) if self.netns_changed(&self.pods[&uid]) => {
                    Some("network namespace changed")
                }
                Some(_) => None,
            };
            if let Some(reason) = reason {
                self.unenrol(&uid, reason);
            }
        }
        // Keep fail modes and identities (labels: sourceLabels routing, metric labels)
        // current.
        for (uid, want) in &snapshot.pods {
            if let Some(p) = self.pods.get_mut(uid) {
                let current = p.ctx.load_full();
                if current.workload != want.workload {
                    info!(pod = %want.workload.pod_name, namespace = %want.workload.namespace, "pod labels changed: new connections use them");
                    p.ctx.store(Arc::new(PodContext {
                        source_labels: crate::state::workload::SourceLabels::of(&want.workload),
                        workload: want.workload.clone(),
                        netns: current.netns.clone(),
                        netns_cookie: current.netns_cookie,
                        http_pool: current.http_pool.clone(),
                    }));
                }
                if p.fail_mode != want.fail_mode {
                    p.fail_mode = want.fail_mode;
                    let entry = enrolment_entry(p, self.outbound_port);
                    if let Err(e) = self.maps.enrol(p.cgroup_id, entry) {
                        warn!(pod = %want.workload.pod_name, error = %e, "updating fail mode");
                    }
                }
            }
        }
        // Say once why a pod that looks like ours is left alone.
        let skipped: std::collections::BTreeSet<String> = snapshot
            .not_captured
            .iter()
            .filter(|(_, why)| {
                why.starts_with("runs an Istio sidecar") || why.as_str() == "host network"
            })
            .map(|(pod, why)| format!("{pod}: {why}"))
            .collect();
        for line in skipped.difference(&self.skipped) {
            info!("not capturing {line}");
        }
        self.skipped = skipped;
        // Enrol what is wanted and present.
        self.waiting.clear();
        let mut blocked = false;
        for (uid, want) in &snapshot.pods {
            if self.pods.contains_key(uid) {
                continue;
            }
            let Some(cgroup_dir) = cgroup::find_pod_cgroup(&self.cgroup_root, uid) else {
                self.waiting
                    .insert(uid.clone(), "waiting for cgroup".into());
                continue;
            };
            let Some(pid) = cgroup::sandbox_process(&cgroup_dir) else {
                self.waiting
                    .insert(uid.clone(), "waiting for a process".into());
                continue;
            };
            match self.enrol(want, cgroup_dir, pid).await {
                Ok(pod) => {
                    info!(
                        pod = %want.workload.pod_name,
                        namespace = %want.workload.namespace,
                        cgroup_id = pod.cgroup_id,
                        netns_cookie = pod.netns_cookie,
                        fail_mode = fail_mode_name(pod.fail_mode),
                        "pod enrolled"
                    );
                    self.pods.insert(uid.clone(), pod);
                }
                Err(e) => {
                    blocked = true;
                    self.metrics.daemon.enrolment_failures.inc();
                    warn!(pod = %want.workload.pod_name, namespace = %want.workload.namespace, error = %e, "enrolment failed; will retry");
                    self.waiting.insert(uid.clone(), format!("error: {e}"));
                }
            }
        }
        self.ready.set_blocked(READY_CONDITION, blocked);
        self.metrics
            .daemon
            .enrolled_pods
            .set(self.pods.len() as i64);
        self.metrics.daemon.listeners.set(self.pods.len() as i64);
        self.publish_status(&snapshot.pods);
    }

    fn netns_changed(&self, pod: &EnrolledPod) -> bool {
        // The process we entered may be gone while the pod lives on (container restart):
        // judge by any current process of the pod.
        match cgroup::sandbox_process(&pod.cgroup) {
            Some(pid) => netns::netns_inode_of_pid(pid).is_some_and(|ino| ino != pod.netns_inode),
            None => false,
        }
    }

    async fn enrol(
        &mut self,
        want: &CapturedPod,
        cgroup_dir: PathBuf,
        pid: u32,
    ) -> Result<EnrolledPod, EnrolError> {
        let cgroup_id = cgroup::cgroup_id(&cgroup_dir)?;
        let worker = NetnsWorker::spawn(pid, &want.workload.pod_name)?;
        // The netns file is open now. If the pid had been reused by a process outside the
        // pod between choosing and opening it, the file is someone else's namespace: the
        // pid must still be in the pod's cgroup after the open.
        if !cgroup::contains_process(&cgroup_dir, pid) {
            return Err(EnrolError::PidLeft { pid });
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.outbound_port));
        let std_listener = worker.listener(addr).await.map_err(|e| match e {
            netns::NetnsError::Socket(source) => EnrolError::Listener {
                port: self.outbound_port,
                source,
            },
            other => EnrolError::Netns(other),
        })?;
        let netns_cookie =
            netns::socket_netns_cookie(&std_listener).map_err(|source| EnrolError::Listener {
                port: self.outbound_port,
                source,
            })?;
        let listener =
            TcpListener::from_std(std_listener).map_err(|source| EnrolError::Listener {
                port: self.outbound_port,
                source,
            })?;
        let netns_inode = worker.inode;
        let ctx: PodHandle = Arc::new(ArcSwap::from_pointee(PodContext {
            source_labels: crate::state::workload::SourceLabels::of(&want.workload),
            workload: want.workload.clone(),
            netns: Arc::new(worker),
            netns_cookie,
            http_pool: Arc::new(crate::proxy::http::UpstreamPool::new(
                self.metrics.daemon.upstream_idle_connections.clone(),
            )),
        }));
        let listener_task = tokio::spawn(proxy::run_outbound_listener(
            self.inputs.clone(),
            ctx.clone(),
            listener,
        ));
        let pod = EnrolledPod {
            pod_id: self.next_pod_id,
            netns_inode,
            cgroup: cgroup_dir,
            cgroup_id,
            pid,
            netns_cookie,
            fail_mode: want.fail_mode,
            ctx,
            listener_task,
            enrolled_at: SystemTime::now(),
        };
        self.next_pod_id = self.next_pod_id.wrapping_add(1);
        // The map entry last: the kernel redirects only once the listener is accepting.
        if let Err(e) = self
            .maps
            .enrol(cgroup_id, enrolment_entry(&pod, self.outbound_port))
        {
            pod.listener_task.abort();
            return Err(e.into());
        }
        Ok(pod)
    }

    fn unenrol(&mut self, uid: &str, reason: &str) {
        let Some(pod) = self.pods.remove(uid) else {
            return;
        };
        // Map entry first, so no new connect is sent to a listener about to close.
        self.maps.unenrol(pod.cgroup_id);
        pod.listener_task.abort();
        let started = Instant::now();
        let forgotten = self.maps.forget_netns(pod.netns_cookie);
        let ctx = pod.ctx.load();
        info!(
            pod = %ctx.workload.pod_name,
            namespace = %ctx.workload.namespace,
            reason,
            map_entries_removed = forgotten,
            took_us = started.elapsed().as_micros() as u64,
            "pod unenrolled"
        );
    }

    fn publish_status(&self, wanted: &BTreeMap<String, CapturedPod>) {
        let status = wanted
            .iter()
            .map(|(uid, want)| {
                let w = &want.workload;
                let base = WorkloadStatus {
                    pod: w.pod_name.clone(),
                    namespace: w.namespace.clone(),
                    uid: uid.clone(),
                    workload: w.workload.clone(),
                    state: self.waiting.get(uid).cloned().unwrap_or_default(),
                    fail_mode: fail_mode_name(want.fail_mode),
                    cgroup: None,
                    cgroup_id: None,
                    netns_inode: None,
                    netns_cookie: None,
                    listener: None,
                    pid: None,
                    enrolled_at_unix_ms: None,
                };
                match self.pods.get(uid) {
                    Some(p) => WorkloadStatus {
                        state: "enrolled".into(),
                        cgroup: Some(p.cgroup.clone()),
                        cgroup_id: Some(p.cgroup_id),
                        netns_inode: Some(p.netns_inode),
                        netns_cookie: Some(p.netns_cookie),
                        listener: Some(format!("127.0.0.1:{}", self.outbound_port)),
                        pid: Some(p.pid),
                        enrolled_at_unix_ms: p
                            .enrolled_at
                            .duration_since(UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_millis()),
                        ..base
                    },
                    None => base,
                }
            })
            .collect();
        self.status.store(Arc::new(status));
    }
}

fn enrolment_entry(pod: &EnrolledPod, port: u16) -> Enrolment {
    Enrolment {
        netns_cookie: pod.netns_cookie,
        pod_id: pod.pod_id,
        listener_port: port,
        fail_mode: pod.fail_mode as u8,
        _pad: 0,
    }
}
