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
use tracing::{debug, info, warn};

use crate::{
    capture::bpf::EnrolmentMaps,
    capture::cgroup,
    capture::netns::{self, NetnsWorker},
    metrics::Metrics,
    metrics::NotListeningLabels,
    proxy::{self, PodContext, PodHandle, ProxyInputs},
    readiness::Ready,
    state::{fail_mode_name, CapturedPod, Published},
};
use proxy_common::{Enrolment, FailMode, ENROLMENT_LISTENING, ENROLMENT_SOCKMAP, MAX_CGROUP_DEPTH};

pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(200);

/// How soon to look again at a pod whose processes are not in its network namespace yet.
pub const RECHECK_INTERVAL: Duration = Duration::from_millis(20);
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
    #[error("{0}")]
    Iptables(#[from] crate::capture::iptables::IptablesError),
    /// The pod's workload certificate could not be had (the CA is down, or refuses):
    /// the pod waits in its fail mode.
    #[error("{0}")]
    Certificate(#[from] crate::identity::manager::Unavailable),
    #[error("HBONE listener {addr} in pod netns: {source}")]
    Hbone {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("inbound listener {addr} in pod netns: {source}")]
    Inbound {
        addr: SocketAddr,
        source: std::io::Error,
    },
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
    /// What the kernel knows of the pod: "listening" (redirected to our listener), "not
    /// listening: fail mode applies", or none (connects are not seen at all).
    pub kernel_entry: Option<&'static str>,
    /// When the kernel entry was first written (for a new pod: how soon after its cgroup).
    pub kernel_entry_at_unix_ms: Option<u128>,
    /// What started the pass that wrote it: "startup", "cgroup watch", "configuration" or
    /// "poll" (the backstop).
    pub kernel_entry_by: Option<&'static str>,
    /// What an operator should know about the pod's own powers over capture (see
    /// [`PodFlag`]), counted in `proxy_daemon_pods_flagged{reason}`.
    pub flags: Vec<&'static str>,
    /// The pod namespace's `ip_local_port_range` (the proxy's ports are reserved in it).
    pub local_port_range: Option<netns::LocalPortRange>,
}

/// Something about a captured pod that weakens what capture can promise for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodFlag {
    /// A process holds CAP_NET_ADMIN over the pod's namespace: it can rewrite that
    /// namespace's routes and netfilter rules (a DNAT of a loopback connection, the
    /// reserved ports, iptables-mode rules), though not the cgroup programs.
    NetAdmin,
    /// The namespace's local port range includes the listener port (the port is reserved,
    /// so the kernel does not hand it out; the pod asked for it all the same).
    PortRangeCoversListener,
}

impl PodFlag {
    pub fn reason(self) -> &'static str {
        match self {
            PodFlag::NetAdmin => "net_admin",
            PodFlag::PortRangeCoversListener => "port_range_covers_listener",
        }
    }
}

/// How often the capabilities of an enrolled pod's processes are looked at again (a
/// container that starts later may hold more than the sandbox did).
const CAPABILITY_RECHECK: Duration = Duration::from_secs(2);

/// A captured pod with a kernel entry but no listener yet: its cgroup exists, but it has no
/// process yet, or its listener could not be made. The kernel gives it the fail mode.
struct PendingPod {
    cgroup: PathBuf,
    cgroup_id: u64,
    pod_id: u32,
    fail_mode: FailMode,
    /// The `pods_not_listening` reason.
    reason: &'static str,
    written_at: SystemTime,
    /// What started the pass that wrote the entry (see `Enroller::pass_cause`).
    written_by: &'static str,
}

struct EnrolledPod {
    pod_id: u32,
    cgroup: PathBuf,
    cgroup_id: u64,
    pid: u32,
    netns_inode: u64,
    netns_cookie: u64,
    fail_mode: FailMode,
    /// The listener's SO_PRIORITY, which the kernel checks before redirecting to it.
    token: u32,
    ctx: PodHandle,
    listener_task: JoinHandle<()>,
    /// The HBONE and plaintext inbound listeners' accept loop. Stopped with the outbound
    /// one when the daemon stops: after a hand-over the successor holds the same sockets,
    /// and a draining daemon that kept accepting would take a share of the new
    /// connections. Connections already accepted are served to their end (counted, so the
    /// drain waits for them).
    inbound_task: JoinHandle<()>,
    enrolled_at: SystemTime,
    entry_written_at: SystemTime,
    entry_written_by: &'static str,
    local_port_range: Option<netns::LocalPortRange>,
    net_admin: bool,
    capabilities_checked: Instant,
    /// The pod's IPv4 address when its inbound connections are steered to the daemon.
    inbound_ip: Option<Ipv4Addr>,
}

impl EnrolledPod {
    fn flags(&self, listener_port: u16) -> Vec<PodFlag> {
        let mut flags = Vec::new();
        if self.net_admin {
            flags.push(PodFlag::NetAdmin);
        }
        if self
            .local_port_range
            .is_some_and(|r| r.contains(listener_port))
        {
            flags.push(PodFlag::PortRangeCoversListener);
        }
        flags
    }
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
    pending: BTreeMap<String, PendingPod>,
    waiting: BTreeMap<String, String>,
    /// Pods left alone for a reason found at run time (too deep, the daemon's own), logged.
    refused: std::collections::BTreeSet<String>,
    /// Woken by the cgroup watch when kubelet's tree changes.
    wake: Arc<tokio::sync::Notify>,
    /// Our listeners, for a successor daemon to take.
    handover: Arc<crate::handover::Table>,
    /// Listeners taken from the previous daemon, by pod uid, not yet adopted.
    taken: std::collections::HashMap<String, crate::handover::TakenListener>,
    /// Inbound (HBONE, plaintext) listeners taken from the previous daemon, by pod uid.
    taken_inbound: std::collections::HashMap<String, Vec<crate::handover::TakenInbound>>,
    /// Pods of captured namespaces left alone on purpose, already logged.
    skipped: std::collections::BTreeSet<String>,
    next_pod_id: u32,
    status: Arc<ArcSwap<Vec<WorkloadStatus>>>,
    /// What started the current pass: "startup", "cgroup watch", "configuration" or
    /// "poll". Reported per kernel entry, so a slow entry shows which path found the pod
    /// (the inotify watch should; the poll is the backstop).
    pass_cause: &'static str,
    /// `--capture iptables`: each pod's netns gets the redirect rules at enrolment, and the
    /// daemon's upstream sockets there carry the mark the rules let through.
    iptables: bool,
    /// Extra [`Enrolment::flags`] every listening pod gets ([`ENROLMENT_SOCKMAP`]).
    extra_flags: u8,
    /// A pod has processes but none in its own network namespace yet: the next pass comes
    /// after [`RECHECK_INTERVAL`], not the poll's.
    recheck_soon: bool,
    /// Inbound capture (`--capture ebpf`): the sk_lookup program each pod's namespace gets.
    inbound: Option<crate::capture::bpf::InboundCapture>,
    /// The node's addresses as last given to the inbound program.
    node_addrs: std::collections::BTreeSet<Ipv4Addr>,
}

impl Enroller {
    pub fn new(
        cgroup_root: PathBuf,
        outbound_port: u16,
        maps: EnrolmentMaps,
        published: Arc<Published>,
        inputs: Arc<ProxyInputs>,
        ready: Ready,
        listeners: crate::handover::PodListeners,
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
            pending: BTreeMap::new(),
            waiting: BTreeMap::new(),
            refused: Default::default(),
            wake: Arc::new(tokio::sync::Notify::new()),
            handover: listeners.table,
            taken: listeners.taken,
            taken_inbound: listeners.taken_inbound,
            skipped: Default::default(),
            next_pod_id: 1,
            status: Arc::new(ArcSwap::from_pointee(Vec::new())),
            pass_cause: "startup",
            iptables: false,
            extra_flags: 0,
            recheck_soon: false,
            inbound: None,
            node_addrs: Default::default(),
        }
    }

    /// Steer each enrolled pod's inbound connections to the daemon with `inbound`.
    pub fn with_inbound(mut self, inbound: crate::capture::bpf::InboundCapture) -> Self {
        self.inbound = Some(inbound);
        self
    }

    /// Capture by iptables rules in each pod's netns instead of the eBPF programs.
    pub fn with_iptables(mut self) -> Self {
        self.iptables = true;
        self
    }

    /// Pair each pod's connections to its listener in the sockmap (`--sockmap`).
    pub fn with_sockmap(mut self) -> Self {
        self.extra_flags |= ENROLMENT_SOCKMAP;
        self
    }

    pub fn status(&self) -> Arc<ArcSwap<Vec<WorkloadStatus>>> {
        self.status.clone()
    }

    /// What to notify for an immediate reconcile (the cgroup watch).
    pub fn waker(&self) -> Arc<tokio::sync::Notify> {
        self.wake.clone()
    }

    /// The maps, for a daemon stopping before its first reconcile.
    pub fn into_maps(self) -> EnrolmentMaps {
        self.maps
    }

    /// Reconciles until `stop` fires, then closes every listener (drain starts) and hands the
    /// maps back.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> EnrolmentMaps {
        let mut changed = self.published.subscribe();
        let wake = self.wake.clone();
        // Entries an earlier daemon left stay until this first pass has replaced them:
        // meanwhile the kernel finds no listener and applies each pod's fail mode, so a
        // fail-closed pod is never let through during a restart.
        self.reconcile().await;
        self.forget_foreign_entries();
        self.release_foreign_inbound();
        loop {
            let interval = if self.recheck_soon {
                RECHECK_INTERVAL
            } else {
                RECONCILE_INTERVAL
            };
            self.pass_cause = tokio::select! {
                _ = tokio::time::sleep(interval) => "poll",
                _ = wake.notified() => "cgroup watch",
                r = changed.changed() => { if r.is_err() { break } "configuration" }
                _ = stop.changed() => break,
            };
            if *stop.borrow() {
                break;
            }
            self.reconcile().await;
        }
        let mut stopped = Vec::new();
        for (_, pod) in std::mem::take(&mut self.pods) {
            pod.listener_task.abort();
            pod.inbound_task.abort();
            stopped.push(pod.listener_task);
            stopped.push(pod.inbound_task);
            // Idle upstream connections (plain or HBONE) will not be used again: closed
            // now, they do not hold the drain (a tunnel's far end counts its stream).
            let ctx = pod.ctx.load();
            ctx.http_pool.clear();
            ctx.hbone.clear();
        }
        // An aborted task may be in the middle of a poll on another worker; waiting for
        // each to end means every connection it accepted is already counted when the drain
        // looks at the active-connection count.
        for task in stopped {
            let _ = task.await;
        }
        self.metrics.daemon.listeners.set(0);
        self.maps
    }

    /// Enrolment entries left by an earlier daemon for pods that are no longer wanted.
    fn forget_foreign_entries(&mut self) {
        for (cgroup_id, e) in self.maps.enrolled() {
            if !self.pods.values().any(|p| p.cgroup_id == cgroup_id)
                && !self.pending.values().any(|p| p.cgroup_id == cgroup_id)
            {
                self.maps.unenrol(cgroup_id);
                self.maps.forget_netns(e.netns_cookie);
            }
        }
    }

    /// Inbound links and entries an earlier daemon left for pods this one did not enrol.
    fn release_foreign_inbound(&mut self) {
        let Some(inbound) = &mut self.inbound else {
            return;
        };
        let inodes = self.pods.values().map(|p| p.netns_inode).collect();
        let released = inbound.release_others(&inodes);
        let ips = self.pods.values().filter_map(|p| p.inbound_ip).collect();
        inbound.forget_pods_except(&ips);
        if released > 0 {
            info!(
                namespaces = released,
                "inbound capture removed from network namespaces of pods no longer enrolled"
            );
        }
    }

    /// Gives the inbound program the node's current addresses (probes come from them).
    fn refresh_node_addrs(&mut self) {
        if self.inbound.is_none() && !self.iptables {
            return;
        }
        let addrs = netns::node_ipv4_addrs();
        if addrs != self.node_addrs {
            if let Some(inbound) = &mut self.inbound {
                inbound.set_node_addrs(&addrs);
            }
            debug!(addresses = ?addrs, "node addresses for inbound capture");
            self.node_addrs = addrs;
        }
    }

    async fn reconcile(&mut self) {
        self.refresh_node_addrs();
        let snapshot = self.published.load();
        // Drop what is no longer wanted or no longer there.
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            match snapshot.pods.get(&uid) {
                None => self.unenrol(&uid, "removed from configuration"),
                Some(_) if !self.pods[&uid].cgroup.exists() => self.unenrol(&uid, "cgroup gone"),
                // Still captured: its entry goes back to "not listening" (the fail mode)
                // in one map update, and this pass enrols it again in its new namespace.
                // Deleting the entry first would let a fail-closed pod's connects out
                // directly in between.
                Some(want) if self.netns_changed(&self.pods[&uid]) => {
                    self.reenrol_later(&uid, want, "network namespace changed")
                }
                Some(_) => {}
            }
        }
        // A listener the previous daemon handed over for a pod this daemon does not capture
        // (its configuration or capture mode differs) would hold that pod's connects in a
        // backlog nobody accepts: closed, they are reset and the pod's kernel entry is
        // removed after the first pass, so its next connects go the uncaptured way. Only
        // once a configuration is published (generation 0 is the empty one before it).
        let before = self.taken.len();
        if snapshot.generation > 0 {
            self.taken.retain(|uid, _| snapshot.pods.contains_key(uid));
            self.taken_inbound
                .retain(|uid, _| snapshot.pods.contains_key(uid));
        }
        if self.taken.len() < before {
            info!(
                listeners = before - self.taken.len(),
                "closed handed-over listeners of pods this daemon does not capture"
            );
        }
        let pending: Vec<String> = self.pending.keys().cloned().collect();
        for uid in pending {
            let gone = !snapshot.pods.contains_key(&uid) || !self.pending[&uid].cgroup.exists();
            if gone {
                if let Some(p) = self.pending.remove(&uid) {
                    self.maps.unenrol(p.cgroup_id);
                }
            }
        }
        for (uid, want) in &snapshot.pods {
            if let Some(p) = self.pending.get_mut(uid) {
                if p.fail_mode != want.fail_mode {
                    p.fail_mode = want.fail_mode;
                    if let Err(e) = self
                        .maps
                        .enrol(p.cgroup_id, pending_entry(p, self.outbound_port))
                    {
                        warn!(pod = %want.workload.pod_name, error = %e, "updating fail mode");
                    }
                }
            }
        }
        // Idle upstream connections past their idle timeout give their descriptors back.
        for p in self.pods.values() {
            p.ctx.load().http_pool.sweep();
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
                        hbone: current.hbone.clone(),
                    }));
                }
                if p.fail_mode != want.fail_mode {
                    p.fail_mode = want.fail_mode;
                    let entry = enrolment_entry(p, self.outbound_port, self.extra_flags);
                    if let Err(e) = self.maps.enrol(p.cgroup_id, entry) {
                        warn!(pod = %want.workload.pod_name, error = %e, "updating fail mode");
                    }
                    if let (Some(inbound), Some(ip)) = (&mut self.inbound, p.inbound_ip) {
                        let entry = inbound_entry(&self.inputs.settings, want.fail_mode);
                        if let Err(e) = inbound.update(ip, entry) {
                            warn!(pod = %want.workload.pod_name, error = %e, "updating inbound fail mode");
                        }
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
        self.recheck_soon = false;
        let mut blocked = false;
        let mut refused = std::collections::BTreeSet::new();
        let own_pid = std::process::id();
        for (uid, want) in &snapshot.pods {
            if self.pods.contains_key(uid) {
                continue;
            }
            let pod_name = format!("{}/{}", want.workload.namespace, want.workload.pod_name);
            let known = self.pending.get(uid).map(|p| p.cgroup.clone());
            let Some(cgroup_dir) =
                known.or_else(|| cgroup::find_pod_cgroup(&self.cgroup_root, uid))
            else {
                self.waiting
                    .insert(uid.clone(), "waiting for cgroup".into());
                continue;
            };
            // The daemon's own pod (its namespace labelled by mistake, or on purpose): its
            // sockets must never be captured, or it would send its own traffic to itself.
            if cgroup::contains_process(&cgroup_dir, own_pid) {
                let why = "not captured: the node proxy's own pod".to_string();
                refused.insert(format!("{pod_name}: {why}"));
                self.waiting.insert(uid.clone(), why);
                continue;
            }
            // The kernel walks at most MAX_CGROUP_DEPTH levels up from a task: a pod below
            // that would look enrolled here and be invisible there.
            let level = cgroup::cgroup_level(&cgroup_dir);
            if level > MAX_CGROUP_DEPTH as usize {
                let why = format!(
                    "not captured: cgroup at level {level}, deeper than the {MAX_CGROUP_DEPTH} levels the kernel program walks"
                );
                refused.insert(format!("{pod_name}: {why}"));
                self.waiting.insert(uid.clone(), why);
                continue;
            }
            // From here on the kernel knows the pod: until our listener is up, its
            // connects get the namespace's fail mode instead of going out directly.
            if !self.pending.contains_key(uid) {
                match self.write_pending(want, &cgroup_dir) {
                    Ok(p) => {
                        self.pending.insert(uid.clone(), p);
                    }
                    Err(e) => {
                        blocked = true;
                        self.metrics.daemon.enrolment_failures.inc();
                        warn!(pod = %want.workload.pod_name, namespace = %want.workload.namespace, error = %e, "writing the kernel entry failed; will retry");
                        self.waiting.insert(uid.clone(), format!("error: {e}"));
                        continue;
                    }
                }
            }
            let Some(pid) = cgroup::sandbox_process(&cgroup_dir) else {
                if let Some(p) = self.pending.get_mut(uid) {
                    p.reason = "waiting_for_process";
                }
                // Processes that have not joined the pod's network namespace yet (a
                // runtime moves a process into the cgroup before it enters the sandbox):
                // nothing notifies that step, so look again shortly.
                if !cgroup::processes(&cgroup_dir, 1).is_empty() {
                    self.recheck_soon = true;
                }
                self.waiting.insert(
                    uid.clone(),
                    format!(
                        "waiting for a process (kernel entry written: {})",
                        fail_mode_effect(want.fail_mode)
                    ),
                );
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
                    self.pending.remove(uid);
                    self.pods.insert(uid.clone(), pod);
                }
                Err(e) => {
                    blocked = true;
                    self.metrics.daemon.enrolment_failures.inc();
                    let taken = matches!(&e, EnrolError::Listener { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse);
                    if let Some(p) = self.pending.get_mut(uid) {
                        p.reason = if taken {
                            "listener_port_taken"
                        } else {
                            "enrolment_error"
                        };
                    }
                    warn!(pod = %want.workload.pod_name, namespace = %want.workload.namespace, error = %e, fail_mode = fail_mode_name(want.fail_mode), "enrolment failed; the pod's connects get its fail mode; will retry");
                    self.waiting.insert(
                        uid.clone(),
                        format!("error: {e} ({})", fail_mode_effect(want.fail_mode)),
                    );
                }
            }
        }
        for line in refused.difference(&self.refused) {
            warn!("{line}");
        }
        let too_deep = refused.iter().filter(|l| l.contains("deeper than")).count();
        self.refused = refused;
        let mut by_reason: BTreeMap<&'static str, i64> = [
            ("waiting_for_process", 0),
            ("listener_port_taken", 0),
            ("enrolment_error", 0),
            ("cgroup_too_deep", too_deep as i64),
        ]
        .into_iter()
        .collect();
        for p in self.pending.values() {
            *by_reason.entry(p.reason).or_default() += 1;
        }
        for (reason, n) in by_reason {
            self.metrics
                .daemon
                .pods_not_listening
                .get_or_create(&NotListeningLabels { reason })
                .set(n);
        }
        self.ready.set_blocked(READY_CONDITION, blocked);
        self.metrics
            .daemon
            .enrolled_pods
            .set(self.pods.len() as i64);
        self.metrics.daemon.listeners.set(self.pods.len() as i64);
        self.check_capabilities();
        self.publish_mesh_state();
        self.publish_status(&snapshot.pods);
    }

    /// Tells the data path which of this node's pods speak HBONE now, and lets the
    /// certificates of identities with no pod left here go.
    fn publish_mesh_state(&self) {
        let td = self.inputs.certs.trust_domain().to_string();
        let mut ips = std::collections::HashSet::new();
        let mut identities = std::collections::HashSet::new();
        for p in self.pods.values() {
            let ctx = p.ctx.load();
            if let Some(ip) = ctx.workload.ip.as_deref().and_then(|ip| ip.parse().ok()) {
                ips.insert(ip);
            }
            identities.insert(ctx.workload.identity(&td));
        }
        if **self.inputs.enrolled.load() != ips {
            self.inputs.enrolled.store(Arc::new(ips));
        }
        self.inputs.certs.retain(&identities);
    }

    /// Looks again (every [`CAPABILITY_RECHECK`]) at which enrolled pods have processes
    /// holding CAP_NET_ADMIN; says so once when a pod gains it, and counts flagged pods.
    fn check_capabilities(&mut self) {
        for p in self.pods.values_mut() {
            if p.capabilities_checked.elapsed() < CAPABILITY_RECHECK {
                continue;
            }
            p.capabilities_checked = Instant::now();
            let held = cgroup::holds_net_admin(&p.cgroup, 1024);
            if held && !p.net_admin {
                let ctx = p.ctx.load();
                warn!(pod = %ctx.workload.pod_name, namespace = %ctx.workload.namespace, "a process of the pod holds CAP_NET_ADMIN: it can rewrite its network namespace's rules (what the cgroup programs decide still holds)");
            }
            p.net_admin = held;
        }
        for flag in [PodFlag::NetAdmin, PodFlag::PortRangeCoversListener] {
            let n = self
                .pods
                .values()
                .filter(|p| p.flags(self.outbound_port).contains(&flag))
                .count();
            self.metrics
                .daemon
                .pods_flagged
                .get_or_create(&crate::metrics::FlagLabels {
                    reason: flag.reason(),
                })
                .set(n as i64);
        }
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
        let worker = NetnsWorker::spawn(
            pid,
            &want.workload.pod_name,
            self.iptables
                .then_some(crate::capture::iptables::UPSTREAM_MARK),
        )?;
        // The netns file is open now. If the pid had been reused by a process outside the
        // pod between choosing and opening it, the file is someone else's namespace: the
        // pid must still be in the pod's cgroup after the open.
        if !cgroup::contains_process(&cgroup_dir, pid) {
            return Err(EnrolError::PidLeft { pid });
        }
        // The proxy's ports, reserved in the pod's namespace before the listener is made:
        // a socket of the pod that binds port 0, connects or listens without a bind never
        // gets one, whatever local port range the pod spec set (a "safe" sysctl).
        // Its workload certificate first: a pod whose identity cannot be had (the CA is
        // down) waits in its fail mode rather than speak without it.
        let identity = want.workload.identity(self.inputs.certs.trust_domain());
        self.inputs.certs.fetch(&identity).await?;
        let settings = &self.inputs.settings;
        let ports = vec![
            self.outbound_port,
            settings.hbone_port,
            settings.inbound_port,
        ];
        let local_port_range = match worker.reserve_ports(ports).await {
            Ok(range) => Some(range),
            Err(e) => {
                warn!(pod = %want.workload.pod_name, error = %e, "reserving the proxy's ports in the pod's network namespace failed");
                None
            }
        };
        if local_port_range.is_some_and(|r| r.contains(self.outbound_port)) {
            warn!(pod = %want.workload.pod_name, namespace = %want.workload.namespace, port = self.outbound_port, "the pod's local port range includes the listener port; it is reserved, so the kernel will not hand it out");
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.outbound_port));
        // The previous daemon's listener for this pod, if it handed one over for the same
        // network namespace and cgroup: the very socket, its backlog and its token, so the
        // kernel entry stays as it is and no connect falls between two listeners.
        let adopted = self
            .taken
            .remove(&want.workload.uid)
            .filter(|t| t.netns_inode == worker.inode && t.cgroup_id == cgroup_id);
        let (std_listener, token) = match adopted {
            Some(t) => {
                let l = std::net::TcpListener::from(t.fd);
                l.set_nonblocking(true)
                    .map_err(|source| EnrolError::Listener {
                        port: self.outbound_port,
                        source,
                    })?;
                info!(pod = %want.workload.pod_name, "adopted the previous daemon's listener");
                (l, t.token)
            }
            None => {
                let token = listener_token();
                let l = worker.listener(addr, token).await.map_err(|e| match e {
                    netns::NetnsError::Socket(source) => EnrolError::Listener {
                        port: self.outbound_port,
                        source,
                    },
                    other => EnrolError::Netns(other),
                })?;
                (l, token)
            }
        };
        let handover_fd = std::os::fd::AsFd::as_fd(&std_listener)
            .try_clone_to_owned()
            .map_err(|source| EnrolError::Listener {
                port: self.outbound_port,
                source,
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
        // HBONE on the pod's own address (port 15008), in its namespace: what mesh pods
        // of any node connect to.
        let pod_ip = want
            .workload
            .ip
            .as_deref()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
        let mut taken_inbound = self
            .taken_inbound
            .remove(&want.workload.uid)
            .unwrap_or_default();
        taken_inbound.retain(|t| t.netns_inode == worker.inode);
        let mut inbound_handover = Vec::new();
        let hbone_listener = match pod_ip {
            Some(ip) => {
                let addr = SocketAddr::new(ip, self.inputs.settings.hbone_port);
                let l = match adopt_inbound(&mut taken_inbound, addr) {
                    Some(l) => Ok(l),
                    None => worker.listener(addr, token).await,
                }
                .and_then(|l| {
                    inbound_handover.push((addr, clone_fd(&l)?));
                    TcpListener::from_std(l).map_err(netns::NetnsError::Socket)
                })
                .map_err(|e| EnrolError::Hbone {
                    addr,
                    source: std::io::Error::other(e.to_string()),
                })?;
                Some(l)
            }
            None => None,
        };
        // Plaintext inbound (port 15006), on the pod's IPv4 address: the inbound program
        // hands it every connection for the pod's other ports.
        let pod_ipv4 = pod_ip.and_then(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        });
        let inbound_listener = match pod_ipv4.filter(|_| self.inbound.is_some() || self.iptables) {
            Some(ip) => {
                let addr = SocketAddr::from((ip, self.inputs.settings.inbound_port));
                let l = match adopt_inbound(&mut taken_inbound, addr) {
                    Some(l) => Ok(l),
                    None => worker.listener(addr, token).await,
                }
                .and_then(|l| {
                    inbound_handover.push((addr, clone_fd(&l)?));
                    Ok(l)
                })
                .map_err(|e| EnrolError::Inbound {
                    addr,
                    source: std::io::Error::other(e.to_string()),
                })?;
                Some((ip, l))
            }
            None => None,
        };
        let netns_inode = worker.inode;
        let worker = Arc::new(worker);
        let ctx: PodHandle = Arc::new(ArcSwap::from_pointee(PodContext {
            source_labels: crate::state::workload::SourceLabels::of(&want.workload),
            workload: want.workload.clone(),
            netns: worker.clone(),
            netns_cookie,
            http_pool: Arc::new(crate::proxy::http::UpstreamPool::new(
                self.inputs.idle_upstream.clone(),
            )),
            hbone: Default::default(),
        }));
        // The inbound listener goes into the kernel's table before the program is attached
        // (no connection is steered to an empty slot), and the program before the pod
        // counts as enrolled.
        let (inbound_ip, inbound_task) = match inbound_listener {
            Some((ip, l)) => {
                let steered = self.inbound.as_mut().map(|inbound| {
                    inbound.capture(
                        worker.netns_fd(),
                        netns_inode,
                        ip,
                        inbound_entry(&self.inputs.settings, want.fail_mode),
                        std::os::fd::AsFd::as_fd(&l),
                        hbone_listener.as_ref().map(std::os::fd::AsFd::as_fd),
                    )
                });
                if let Some(Err(e)) = steered {
                    return Err(EnrolError::Inbound {
                        addr: SocketAddr::from((ip, self.inputs.settings.inbound_port)),
                        source: std::io::Error::other(e.to_string()),
                    });
                }
                let l = TcpListener::from_std(l).map_err(|source| EnrolError::Inbound {
                    addr: SocketAddr::from((ip, self.inputs.settings.inbound_port)),
                    source,
                })?;
                (
                    Some(ip),
                    Some(proxy::inbound::serve_plaintext(
                        self.inputs.clone(),
                        ctx.clone(),
                        l,
                    )),
                )
            }
            None => (None, None),
        };
        let outbound = proxy::run_outbound_listener(self.inputs.clone(), ctx.clone(), listener);
        let hbone =
            hbone_listener.map(|l| proxy::hbone::serve(self.inputs.clone(), ctx.clone(), l));
        let listener_task = tokio::spawn(outbound);
        let inbound_task = tokio::spawn(async move {
            let hbone = async move {
                if let Some(h) = hbone {
                    h.await
                }
            };
            let inbound = async move {
                if let Some(i) = inbound_task {
                    i.await
                }
            };
            tokio::join!(hbone, inbound);
        });
        let pod = EnrolledPod {
            pod_id: self.next_pod_id,
            netns_inode,
            cgroup: cgroup_dir,
            cgroup_id,
            pid,
            netns_cookie,
            fail_mode: want.fail_mode,
            token,
            ctx,
            listener_task,
            inbound_task,
            enrolled_at: SystemTime::now(),
            entry_written_at: self
                .pending
                .get(&want.workload.uid)
                .map(|p| p.written_at)
                .unwrap_or_else(SystemTime::now),
            entry_written_by: self
                .pending
                .get(&want.workload.uid)
                .map_or(self.pass_cause, |p| p.written_by),
            local_port_range,
            net_admin: false,
            // Looked at on this pass's flag check.
            capabilities_checked: Instant::now()
                .checked_sub(CAPABILITY_RECHECK)
                .unwrap_or_else(Instant::now),
            inbound_ip,
        };
        self.next_pod_id = self.next_pod_id.wrapping_add(1);
        if self.iptables {
            let closed = matches!(want.fail_mode, FailMode::Closed);
            let inbound = crate::capture::iptables::InboundRules {
                inbound_port: self.inputs.settings.inbound_port,
                hbone_port: self.inputs.settings.hbone_port,
                node_addrs: &self.node_addrs,
            };
            let inbound = inbound_ip.map(|_| inbound);
            if let Err(e) =
                crate::capture::iptables::redirect(pid, self.outbound_port, closed, inbound).await
            {
                pod.listener_task.abort();
                pod.inbound_task.abort();
                return Err(e.into());
            }
        }
        // The map entry last: the kernel redirects only once the listener is accepting.
        if let Err(e) = self.maps.enrol(
            cgroup_id,
            enrolment_entry(&pod, self.outbound_port, self.extra_flags),
        ) {
            pod.listener_task.abort();
            pod.inbound_task.abort();
            if let Some(inbound) = &mut self.inbound {
                inbound.release(pod.netns_inode, pod.inbound_ip);
            }
            return Err(e.into());
        }
        self.handover.set(
            crate::handover::Item::Pod {
                uid: want.workload.uid.clone(),
                netns_inode: pod.netns_inode,
                cgroup_id,
                token,
            },
            Arc::new(handover_fd),
        );
        for (addr, fd) in inbound_handover {
            self.handover.set(
                crate::handover::Item::PodInbound {
                    uid: want.workload.uid.clone(),
                    netns_inode: pod.netns_inode,
                    addr,
                },
                Arc::new(fd),
            );
        }
        Ok(pod)
    }

    /// The kernel entry of a captured pod that has no listener yet.
    fn write_pending(
        &mut self,
        want: &CapturedPod,
        cgroup_dir: &std::path::Path,
    ) -> Result<PendingPod, EnrolError> {
        let pod = PendingPod {
            cgroup: cgroup_dir.to_owned(),
            cgroup_id: cgroup::cgroup_id(cgroup_dir)?,
            pod_id: self.next_pod_id,
            fail_mode: want.fail_mode,
            reason: "waiting_for_process",
            written_at: SystemTime::now(),
            written_by: self.pass_cause,
        };
        self.next_pod_id = self.next_pod_id.wrapping_add(1);
        // An entry a previous daemon left for a live listener stays until ours replaces
        // it (a hand-over: the same listener, so connects keep being redirected); without
        // a listener the kernel applies the fail mode either way.
        let listening = self
            .maps
            .entry(pod.cgroup_id)
            .is_some_and(|e| e.flags & ENROLMENT_LISTENING != 0);
        if listening {
            return Ok(pod);
        }
        self.maps
            .enrol(pod.cgroup_id, pending_entry(&pod, self.outbound_port))?;
        tracing::debug!(pod = %want.workload.pod_name, cgroup_id = pod.cgroup_id, fail_mode = fail_mode_name(pod.fail_mode), "kernel entry written; no listener yet");
        Ok(pod)
    }

    /// Takes a pod that is still captured out of service: its kernel entry becomes a
    /// pending one (the fail mode applies, never a direct way out) before its listener
    /// closes; the enrol step of the pass enrols it again.
    fn reenrol_later(&mut self, uid: &str, want: &CapturedPod, reason: &str) {
        let Some(pod) = self.pods.get(uid) else {
            return;
        };
        let pending = PendingPod {
            cgroup: pod.cgroup.clone(),
            cgroup_id: pod.cgroup_id,
            pod_id: pod.pod_id,
            fail_mode: want.fail_mode,
            reason: "waiting_for_process",
            written_at: SystemTime::now(),
            written_by: self.pass_cause,
        };
        if let Err(e) = self.maps.enrol(
            pending.cgroup_id,
            pending_entry(&pending, self.outbound_port),
        ) {
            warn!(pod = %want.workload.pod_name, error = %e, "writing the pending kernel entry failed");
        }
        self.pending.insert(uid.to_string(), pending);
        self.retire(uid, reason, false);
    }

    fn unenrol(&mut self, uid: &str, reason: &str) {
        self.retire(uid, reason, true);
    }

    /// Closes a pod's listener and forgets its connections; `remove_entry`: its kernel
    /// entry goes too (the pod is no longer captured, or gone).
    fn retire(&mut self, uid: &str, reason: &str, remove_entry: bool) {
        let Some(pod) = self.pods.remove(uid) else {
            return;
        };
        // Map entry first, so no new connect is sent to a listener about to close.
        if remove_entry {
            self.maps.unenrol(pod.cgroup_id);
        }
        if self.iptables {
            // The rules go before the listener closes too, in the background: the enroller
            // does not wait on a process per pod that leaves.
            let pid = pod.pid;
            tokio::spawn(crate::capture::iptables::remove(pid));
        }
        if let Some(inbound) = &mut self.inbound {
            inbound.release(pod.netns_inode, pod.inbound_ip);
        }
        self.handover.remove_pod(uid);
        pod.listener_task.abort();
        pod.inbound_task.abort();
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
                    kernel_entry: None,
                    kernel_entry_at_unix_ms: None,
                    kernel_entry_by: None,
                    flags: Vec::new(),
                    local_port_range: None,
                };
                let unix_ms =
                    |t: SystemTime| t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_millis());
                match self.pods.get(uid) {
                    Some(p) => WorkloadStatus {
                        state: "enrolled".into(),
                        cgroup: Some(p.cgroup.clone()),
                        cgroup_id: Some(p.cgroup_id),
                        netns_inode: Some(p.netns_inode),
                        netns_cookie: Some(p.netns_cookie),
                        listener: Some(format!("127.0.0.1:{}", self.outbound_port)),
                        pid: Some(p.pid),
                        enrolled_at_unix_ms: unix_ms(p.enrolled_at),
                        kernel_entry: Some("listening"),
                        kernel_entry_at_unix_ms: unix_ms(p.entry_written_at),
                        kernel_entry_by: Some(p.entry_written_by),
                        flags: p
                            .flags(self.outbound_port)
                            .into_iter()
                            .map(PodFlag::reason)
                            .collect(),
                        local_port_range: p.local_port_range,
                        ..base
                    },
                    None => match self.pending.get(uid) {
                        Some(p) => WorkloadStatus {
                            cgroup: Some(p.cgroup.clone()),
                            cgroup_id: Some(p.cgroup_id),
                            kernel_entry: Some("not listening: fail mode applies"),
                            kernel_entry_at_unix_ms: unix_ms(p.written_at),
                            kernel_entry_by: Some(p.written_by),
                            ..base
                        },
                        None => base,
                    },
                }
            })
            .collect();
        self.status.store(Arc::new(status));
    }
}

fn enrolment_entry(pod: &EnrolledPod, port: u16, extra_flags: u8) -> Enrolment {
    Enrolment {
        netns_cookie: pod.netns_cookie,
        pod_id: pod.pod_id,
        listener_token: pod.token,
        listener_port: port,
        fail_mode: pod.fail_mode as u8,
        flags: ENROLMENT_LISTENING | extra_flags,
        _pad: 0,
    }
}

fn pending_entry(pod: &PendingPod, port: u16) -> Enrolment {
    Enrolment {
        netns_cookie: 0,
        pod_id: pod.pod_id,
        listener_token: 0,
        listener_port: port,
        fail_mode: pod.fail_mode as u8,
        flags: 0,
        _pad: 0,
    }
}

/// A fresh listener token: a random `SO_PRIORITY` above 6 (values up to 6 need no
/// privilege, so a pod could set those), below 2^31 (the option is an int).
/// The inbound program's entry for a pod: the daemon's ports, left to the normal lookup,
/// and the pod's fail mode.
fn inbound_entry(settings: &proxy::ProxySettings, fail_mode: FailMode) -> proxy_common::InboundPod {
    proxy_common::InboundPod {
        hbone_port: settings.hbone_port,
        inbound_port: settings.inbound_port,
        outbound_port: settings.outbound_port,
        fail_mode: fail_mode as u8,
        _pad: 0,
    }
}

fn listener_token() -> u32 {
    7 + rand::random::<u32>() % (i32::MAX as u32 - 7)
}

/// What the kernel does with a pod's connects while it has no listener.
fn fail_mode_effect(mode: FailMode) -> &'static str {
    match mode {
        FailMode::Closed => "fail-closed: its connects are refused",
        FailMode::Open => "fail-open: its connects go direct",
    }
}

/// The previous daemon's listener on `addr` in this pod, if it handed one over: the same
/// socket keeps its place in the kernel's steering table and its backlog.
fn adopt_inbound(
    taken: &mut Vec<crate::handover::TakenInbound>,
    addr: SocketAddr,
) -> Option<std::net::TcpListener> {
    let at = taken.iter().position(|t| t.addr == addr)?;
    let l = std::net::TcpListener::from(taken.swap_remove(at).fd);
    l.set_nonblocking(true).ok()?;
    Some(l)
}

/// A second descriptor of `l`, for the hand-over table.
fn clone_fd(l: &std::net::TcpListener) -> Result<std::os::fd::OwnedFd, netns::NetnsError> {
    std::os::fd::AsFd::as_fd(l)
        .try_clone_to_owned()
        .map_err(netns::NetnsError::Socket)
}
