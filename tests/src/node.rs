//! Bridge + network namespaces + cgroups, named per test.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{sh, sh_quiet};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The cgroup2 mount point (hybrid hosts have it at /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> PathBuf {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        })
        .expect("a cgroup2 mount")
}

/// A network namespace with one veth on the node's bridge.
pub struct Host {
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The host's end of its veth (inside its netns).
    pub dev: String,
}

impl Host {
    /// Runs `program args` inside this netns (and optionally a cgroup), capturing output.
    pub fn command(&self, cgroup: Option<&Path>, program: &Path, args: &[&str]) -> Command {
        let ns = fs::File::open(format!("/run/netns/{}", self.netns)).expect("netns file");
        let cg = cgroup.map(|c| {
            fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
                .expect("cgroup.procs")
        });
        let mut cmd = Command::new(program);
        cmd.args(args);
        // SAFETY: only async-signal-safe syscalls (write, setns) between fork and exec;
        // the files were opened before the fork and live in the closure.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(cg) = &cg {
                    // "0" moves the writing process itself.
                    if libc::write(cg.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// A listener bound inside this netns (a socket keeps the netns it was made in).
    pub fn listen(&self, port: u16) -> std::net::TcpListener {
        let path = format!("/run/netns/{}", self.netns);
        let addr = SocketAddr::from((self.ip, port));
        std::thread::spawn(move || {
            let ns = fs::File::open(path).expect("netns file");
            // SAFETY: setns on this short-lived thread only.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns"
            );
            let l =
                std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            l.set_nonblocking(true).expect("nonblocking");
            l
        })
        .join()
        .expect("listener thread")
    }

    /// An on-link route to `ip` over the bridge (for hosts made by [`Node::host_at`]).
    pub fn route_to(&self, ip: Ipv4Addr) {
        sh(&[
            "ip",
            "-n",
            &self.netns,
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            &self.dev,
        ]);
    }

    /// A listener on 127.0.0.1:`port` inside this netns (e.g. to occupy the proxy's port).
    pub fn listen_loopback(&self, port: u16) -> std::net::TcpListener {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::spawn(move || {
            let ns = fs::File::open(path).expect("netns file");
            // SAFETY: setns on this short-lived thread only.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns"
            );
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind loopback")
        })
        .join()
        .expect("listener thread")
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

/// Kubelet's `--cgroup-driver`: how it names the cgroups of pods and containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    /// Slices and scopes: `kubepods.slice/.../kubepods-<qos>-pod<uid with _>.slice/cri-containerd-<id>.scope`.
    Systemd,
    /// Plain directories: `kubepods/<qos>/pod<uid>/<id>`.
    Cgroupfs,
}

/// A pod's QoS class, which picks its parent cgroup (Guaranteed pods sit right below kubepods).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// Where kubelet puts a pod's cgroup (relative to the cgroup root) and how the container
/// runtime names a container's cgroup below it.
pub fn pod_cgroup_layout(driver: CgroupDriver, qos: Qos, uid: &str) -> PathBuf {
    let u = uid.replace('-', "_");
    PathBuf::from(match (driver, qos) {
        (CgroupDriver::Systemd, Qos::Guaranteed) => format!("kubepods.slice/kubepods-pod{u}.slice"),
        (CgroupDriver::Systemd, Qos::Burstable) => {
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice")
        }
        (CgroupDriver::Systemd, Qos::BestEffort) => {
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice")
        }
        (CgroupDriver::Cgroupfs, Qos::Guaranteed) => format!("kubepods/pod{uid}"),
        (CgroupDriver::Cgroupfs, Qos::Burstable) => format!("kubepods/burstable/pod{uid}"),
        (CgroupDriver::Cgroupfs, Qos::BestEffort) => format!("kubepods/besteffort/pod{uid}"),
    })
}

/// The cgroup directory name of container `id` (64 hex digits) under `driver`.
pub fn container_cgroup_name(driver: CgroupDriver, id: &str) -> String {
    match driver {
        CgroupDriver::Systemd => format!("cri-containerd-{id}.scope"),
        CgroupDriver::Cgroupfs => id.to_string(),
    }
}

/// A random container id as containerd makes them (64 hex digits).
pub fn container_id() -> String {
    format!(
        "{:016x}{:016x}{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>(),
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// A pod: a host plus a kubelet-like cgroup with a long-running "pause" process in it.
pub struct Pod {
    pub host: Host,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub cgroup: PathBuf,
    /// Container ids (the cgroups' names below `cgroup` derive from them): the app's and
    /// the sandbox's. For [`Node::pod`] these are "app" and "pause".
    pub app_container_id: String,
    pub pause_container_id: String,
    /// The directory names of the app's and the sandbox's container cgroups.
    app_dir: String,
    pause_dir: String,
    pause: Option<Child>,
}

impl Pod {
    /// The container cgroup app processes run in (one below the pod's, as with kubelet).
    pub fn app_cgroup(&self) -> PathBuf {
        self.cgroup.join(&self.app_dir)
    }

    /// The sandbox ("pause") container's cgroup.
    pub fn pause_cgroup(&self) -> PathBuf {
        self.cgroup.join(&self.pause_dir)
    }

    /// Runs pdtool inside the pod and parses its JSON answer.
    pub fn pdtool(&self, args: &[&str]) -> serde_json::Value {
        let out = self
            .host
            .command(Some(&self.app_cgroup()), &crate::target_bin("pdtool"), args)
            .stdin(Stdio::null())
            .output()
            .expect("run pdtool");
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "pdtool {args:?} in pod {}: bad output ({e}): {stdout} {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Starts a long-running pdtool (e.g. `serve`) as the pod's app; it dies with the pod.
    pub fn spawn_app(&self, args: &[&str]) -> Child {
        self.host
            .command(Some(&self.app_cgroup()), &crate::target_bin("pdtool"), args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn app")
    }

    /// Creates the pod's cgroups and starts its pause process (what kubelet does for a
    /// sandbox). A pod made by [`Node::pod`] is already started.
    pub fn start(&mut self) {
        if self.pause.is_some() {
            return;
        }
        let pause_cg = self.pause_cgroup();
        fs::create_dir_all(&pause_cg).expect("pod cgroup");
        fs::create_dir_all(self.app_cgroup()).expect("app cgroup");
        let pause = self
            .host
            .command(Some(&pause_cg), Path::new("/bin/sleep"), &["infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pause process");
        self.pause = Some(pause);
    }

    /// Kills the pod's processes and removes its cgroup (the pod is gone from the node).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.pause.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        remove_cgroup_tree(&self.cgroup);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    // Kill stragglers first: a cgroup with processes cannot be removed.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..50 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

pub struct Node {
    pub id: String,
    pub bridge: String,
    /// `--cgroup-root` for this node's daemon: pods live below it.
    /// May be moved deeper by a test; the node's own directory is removed on drop.
    pub cgroup_root: PathBuf,
    cgroup_top: PathBuf,
    pub config_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub work_dir: PathBuf,
    netns: Vec<String>,
    next_host: u32,
}

impl Node {
    pub fn new(tag: &str) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the end-to-end tests need root (eBPF, netns, cgroups)"
        );
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:04x}{:02x}", std::process::id() & 0xffff, n & 0xff);
        let bridge = format!("pdb{id}");
        let work_dir = std::env::temp_dir().join(format!("pdt-{id}-{tag}"));
        let _ = fs::remove_dir_all(&work_dir);
        let config_dir = work_dir.join("config");
        fs::create_dir_all(&config_dir).expect("config dir");
        let cgroup_root = cgroup2_mount().join(format!("pdt-{id}"));
        fs::create_dir_all(cgroup_root.join("kubepods.slice/kubepods-besteffort.slice"))
            .expect("cgroup root");
        sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
        sh(&["ip", "link", "set", &bridge, "up"]);
        Self {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/pdt-{id}")),
            id,
            bridge,
            cgroup_top: cgroup_root.clone(),
            cgroup_root,
            config_dir,
            work_dir,
            netns: Vec::new(),
            next_host: 2,
        }
    }

    /// A plain host (a service or an "external" machine) on the bridge.
    pub fn host(&mut self, name: &str) -> Host {
        let idx = self.next_host;
        self.next_host += 1;
        assert!(idx < 250, "too many hosts");
        let netns = format!("pdt-{}-{name}", self.id);
        let ip = Ipv4Addr::new(198, 18, 0, idx as u8);
        let outer = format!("pdv{}{:02x}a", self.id, idx);
        let inner = format!("pdv{}{:02x}b", self.id, idx);
        sh(&["ip", "netns", "add", &netns]);
        self.netns.push(netns.clone());
        sh(&[
            "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ]);
        sh(&["ip", "link", "set", &inner, "netns", &netns]);
        sh(&["ip", "link", "set", &outer, "master", &self.bridge, "up"]);
        sh(&[
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &inner,
        ]);
        sh(&["ip", "-n", &netns, "link", "set", &inner, "up"]);
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        Host {
            netns,
            ip,
            dev: inner,
        }
    }

    /// A host answering at `ip` outside the bridge's subnet (e.g. 169.254.169.254), still on
    /// the bridge. Hosts that must reach it get an on-link route via [`Host::route_to`].
    pub fn host_at(&mut self, name: &str, ip: Ipv4Addr) -> Host {
        let mut h = self.host(name);
        let netns = h.netns.clone();
        sh(&["ip", "-n", &netns, "addr", "flush", "dev", &h.dev]);
        sh(&[
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip}/32"),
            "dev",
            &h.dev,
        ]);
        sh(&[
            "ip",
            "-n",
            &netns,
            "route",
            "add",
            "198.18.0.0/24",
            "dev",
            &h.dev,
        ]);
        h.ip = ip;
        h
    }

    /// A pod: host + cgroup `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice`
    /// with a pause process in a container cgroup below it. No YAML is written.
    pub fn pod(&mut self, namespace: &str, name: &str) -> Pod {
        let uid = self.new_uid();
        self.pod_with_uid(namespace, name, &uid)
    }

    fn new_uid(&self) -> String {
        format!(
            "{:08x}-{}-4000-8000-{:012x}",
            rand::random::<u32>(),
            &self.id[..4],
            rand::random::<u64>() & 0xffff_ffff_ffff
        )
    }

    /// A pod whose uid is given (to match YAML written beforehand).
    pub fn pod_with_uid(&mut self, namespace: &str, name: &str, uid: &str) -> Pod {
        let rel = pod_cgroup_layout(CgroupDriver::Systemd, Qos::BestEffort, uid);
        let containers = [
            ("app".to_string(), "cri-containerd-app.scope".to_string()),
            (
                "pause".to_string(),
                "cri-containerd-pause.scope".to_string(),
            ),
        ];
        self.pod_at(namespace, name, uid, &rel, containers)
    }

    /// A pod laid out exactly as kubelet does with `driver` for QoS class `qos` (see
    /// [`pod_cgroup_layout`]), its app and pause processes each in a container cgroup named
    /// by a random 64-hex container id (`cri-containerd-<id>.scope` / `<id>`).
    pub fn pod_with_layout(
        &mut self,
        namespace: &str,
        name: &str,
        driver: CgroupDriver,
        qos: Qos,
    ) -> Pod {
        let uid = self.new_uid();
        self.pod_with_layout_and_uid(namespace, name, &uid, driver, qos)
    }

    /// [`Node::pod_with_layout`] with a given uid (to match an API object made beforehand).
    pub fn pod_with_layout_and_uid(
        &mut self,
        namespace: &str,
        name: &str,
        uid: &str,
        driver: CgroupDriver,
        qos: Qos,
    ) -> Pod {
        let rel = pod_cgroup_layout(driver, qos, uid);
        let (app, pause) = (container_id(), container_id());
        let containers = [
            (app.clone(), container_cgroup_name(driver, &app)),
            (pause.clone(), container_cgroup_name(driver, &pause)),
        ];
        self.pod_at(namespace, name, uid, &rel, containers)
    }

    /// A second node on this machine: its own cgroup subtree, pin directory and node name
    /// for a second daemon; its pods share this node's bridge, so traffic between the two
    /// "nodes" crosses real sockets (and, between mesh pods, real mutual TLS).
    pub fn second_node(&self, name: &str) -> SecondNode {
        let cgroup_root = self.cgroup_top.join(format!("node-{name}"));
        fs::create_dir_all(cgroup_root.join("kubepods.slice/kubepods-besteffort.slice"))
            .expect("second node's cgroup root");
        SecondNode {
            name: name.to_string(),
            cgroup_root,
            pin_dir: PathBuf::from(format!("{}-{name}", self.pin_dir.display())),
        }
    }

    /// A pod of `node` (see [`Node::second_node`]).
    pub fn pod_on(&mut self, node: &SecondNode, namespace: &str, name: &str) -> Pod {
        let uid = self.new_uid();
        let rel = node
            .cgroup_root
            .strip_prefix(&self.cgroup_root)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| node.cgroup_root.clone())
            .join(pod_cgroup_layout(
                CgroupDriver::Systemd,
                Qos::BestEffort,
                &uid,
            ));
        let containers = [
            ("app".to_string(), "cri-containerd-app.scope".to_string()),
            (
                "pause".to_string(),
                "cri-containerd-pause.scope".to_string(),
            ),
        ];
        self.pod_at(namespace, name, &uid, &rel, containers)
    }

    /// A started pod with its cgroup at `rel` below the cgroup root; `containers` are the
    /// app's and the sandbox's (id, cgroup directory name).
    fn pod_at(
        &mut self,
        namespace: &str,
        name: &str,
        uid: &str,
        rel: &Path,
        containers: [(String, String); 2],
    ) -> Pod {
        let host = self.host(name);
        let [(app_container_id, app_dir), (pause_container_id, pause_dir)] = containers;
        let mut pod = Pod {
            host,
            name: name.to_string(),
            namespace: namespace.to_string(),
            uid: uid.to_string(),
            cgroup: self.cgroup_root.join(rel),
            app_container_id,
            pause_container_id,
            app_dir,
            pause_dir,
            pause: None,
        };
        pod.start();
        pod
    }

    /// Writes YAML into the daemon's config dir.
    pub fn write_config(&self, file: &str, yaml: &str) {
        let path = self.config_dir.join(file);
        let tmp = self.config_dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).expect("write config");
        fs::rename(tmp, path).expect("rename config");
    }

    pub fn remove_config(&self, file: &str) {
        let _ = fs::remove_file(self.config_dir.join(file));
    }
}

/// YAML for a namespace, captured or not, with an optional fail mode annotation.
pub fn namespace_yaml(name: &str, captured: bool, fail_mode: Option<&str>) -> String {
    let labels = if captured {
        "  labels:\n    nodeproxy.io/capture: enabled\n"
    } else {
        ""
    };
    let annotations = fail_mode
        .map(|m| format!("  annotations:\n    nodeproxy.io/fail-mode: {m}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n{labels}{annotations}---\n"
    )
}

/// A second node's cgroup root, pin directory and name (see [`Node::second_node`]).
pub struct SecondNode {
    pub name: String,
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
}

impl SecondNode {
    /// The flags that make a daemon this node's.
    pub fn daemon_flags(&self) -> Vec<String> {
        vec![
            "--cgroup-root".into(),
            self.cgroup_root.display().to_string(),
            "--bpf-pin-dir".into(),
            self.pin_dir.display().to_string(),
            "--node-name".into(),
            self.name.clone(),
        ]
    }
}

/// The node name the harness's first daemon runs as.
pub const FIRST_NODE: &str = "test-node";

/// [`pod_yaml`] for a pod scheduled on `node_name`, running as `service_account`.
pub fn pod_yaml_on(
    pod: &Pod,
    labels: &[(&str, &str)],
    node_name: &str,
    service_account: &str,
) -> String {
    pod_yaml(pod, labels).replacen(
        "spec:\n",
        &format!("spec:\n  nodeName: {node_name}\n  serviceAccountName: {service_account}\n"),
        1,
    )
}

/// YAML for a pod as kubectl would show it (labels included), bound to no node.
pub fn pod_yaml(pod: &Pod, labels: &[(&str, &str)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n",
        pod.name, pod.namespace, pod.uid
    );
    if !labels.is_empty() {
        y.push_str("  labels:\n");
        for (k, v) in labels {
            y.push_str(&format!("    {k}: \"{v}\"\n"));
        }
    }
    y.push_str(&format!(
        "spec:\n  containers:\n  - name: app\n    image: example/app:1\nstatus:\n  phase: Running\n  podIP: {}\n---\n",
        pod.host.ip
    ));
    y
}

/// YAML for a pod that only serves (an endpoint on a plain host), not captured itself.
pub fn endpoint_pod_yaml(
    host: &Host,
    name: &str,
    namespace: &str,
    labels: &[(&str, &str)],
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  uid: ep-{name}-{}\n  labels:\n",
        host.ip
    );
    for (k, v) in labels {
        y.push_str(&format!("    {k}: \"{v}\"\n"));
    }
    y.push_str(&format!(
        "spec:\n  containers: [{{name: app}}]\nstatus:\n  phase: Running\n  podIP: {}\n---\n",
        host.ip
    ));
    y
}

impl Node {
    /// The `--run-dir` the node's daemons share (hand-over socket, the node's own root).
    pub fn run_dir(&self) -> PathBuf {
        self.work_dir.join("run")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.cgroup_top);
        for ns in &self.netns {
            sh_quiet(&["ip", "netns", "del", ns]);
        }
        sh_quiet(&["ip", "link", "del", &self.bridge]);
        // The node's pin directory and those a test gave further daemons (`<pin dir>-…`).
        let mut pin_dirs = vec![self.pin_dir.clone()];
        if let (Some(parent), Some(name)) = (
            self.pin_dir.parent(),
            self.pin_dir.file_name().and_then(|n| n.to_str()),
        ) {
            let prefix = format!("{name}-");
            if let Ok(entries) = fs::read_dir(parent) {
                pin_dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                        .map(|e| e.path()),
                );
            }
        }
        for dir in pin_dirs {
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let _ = fs::remove_file(e.path());
                }
            }
            let _ = fs::remove_dir(&dir);
        }
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.work_dir);
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.stop();
    }
}
