//! The daemon as a real process, on ports of its own, with a log file to show on failure.
use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{http_get, http_request_with, node::Node, wait_for};

pub struct Daemon {
    child: Option<Child>,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    pub log: PathBuf,
    pub started: Instant,
    /// `Authorization` for the admin port, when the daemon was given `--admin-token-file`.
    admin_auth: Option<String>,
}

/// A port that is free now, from below the kernel's ephemeral range (32768+), so the
/// tests' own outgoing connections can never take it before the daemon binds it.
fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + (rand::random::<u16>() % 12_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .expect("bind :0")
        .local_addr()
        .expect("addr")
        .port()
}

impl Daemon {
    /// The command line the tests use, before spawning (so tests can vary it).
    pub fn command(
        node: &Node,
        extra: &[&str],
    ) -> (Command, SocketAddr, SocketAddr, SocketAddr, PathBuf) {
        // A port the test chose itself (a successor on its predecessor's ports) wins.
        let given = |flag: &str| {
            extra
                .iter()
                .position(|a| *a == flag)
                .and_then(|i| extra.get(i + 1))
                .and_then(|a| a.parse::<SocketAddr>().ok())
        };
        let admin = given("--admin-addr")
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let metrics = given("--metrics-addr")
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let health = given("--health-addr")
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let log = node.work_dir.join(format!(
            "daemon-{}-{:08x}.log",
            admin.port(),
            rand::random::<u32>()
        ));
        let defaults: Vec<(&str, String)> = vec![
            ("--config-dir", node.config_dir.display().to_string()),
            ("--cgroup-root", node.cgroup_root.display().to_string()),
            ("--bpf-pin-dir", node.pin_dir.display().to_string()),
            ("--admin-addr", admin.to_string()),
            ("--metrics-addr", metrics.to_string()),
            ("--health-addr", health.to_string()),
            ("--node-name", "test-node".to_string()),
            // The hand-over socket and the node's own root, gone with the node.
            ("--run-dir", node.run_dir().display().to_string()),
            ("--log-level", "info,proxy_daemon=debug".to_string()),
            // Never the machine's resolvers: a DNS ServiceEntry in a test resolves only
            // against the test's own DNS server (nothing listens on the discard port).
            ("--dns-server", "127.0.0.1:9".to_string()),
        ];
        let mut cmd = Command::new(crate::target_bin("proxy-daemon"));
        cmd.arg("run");
        // A flag the test passes itself replaces the default; cluster mode has no config dir.
        let cluster = extra.contains(&"--kubernetes");
        for (flag, value) in defaults {
            let skip = extra.contains(&flag) || (cluster && flag == "--config-dir");
            if !skip {
                cmd.args([flag, value.as_str()]);
            }
        }
        cmd.args(extra).env_remove("NODE_NAME");
        (cmd, admin, metrics, health, log)
    }

    pub fn start(node: &Node, extra: &[&str]) -> Self {
        // Two tests may still pick the same free port at once: the loser starts again.
        for _ in 0..3 {
            match Self::try_start(node, extra) {
                Ok(d) => return d,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("daemon exited before becoming ready; log:\n{log}"),
            }
        }
        panic!("daemon could not bind its ports in three tries");
    }

    /// Starts the daemon without waiting for readiness (to watch it become ready).
    pub fn spawn(node: &Node, extra: &[&str]) -> Self {
        Self::spawn_in(node, extra, &[])
    }

    /// [`Daemon::spawn`] with the daemon's process in `cgroups` (of any hierarchy: a v1
    /// memory cgroup with a limit, say) from its first instruction (as a DaemonSet pod's
    /// container is).
    pub fn spawn_in(node: &Node, extra: &[&str], cgroups: &[&std::path::Path]) -> Self {
        let (mut cmd, admin, metrics, health, log) = Self::command(node, extra);
        if !cgroups.is_empty() {
            use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
            let procs: Vec<fs::File> = cgroups
                .iter()
                .map(|cg| {
                    fs::OpenOptions::new()
                        .write(true)
                        .open(cg.join("cgroup.procs"))
                        .expect("cgroup.procs")
                })
                .collect();
            // SAFETY: only write(2) between fork and exec, on files opened before.
            unsafe {
                cmd.pre_exec(move || {
                    for p in &procs {
                        if libc::write(p.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let log_file = fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log clone"))
            .stderr(log_file)
            .spawn()
            .expect("spawn proxy-daemon");
        let admin_auth = extra
            .iter()
            .position(|a| *a == "--admin-token-file")
            .and_then(|i| extra.get(i + 1))
            .and_then(|path| fs::read_to_string(path).ok())
            .map(|t| format!("Bearer {}", t.trim()));
        Self {
            child: Some(child),
            admin,
            metrics,
            health,
            log,
            started: Instant::now(),
            admin_auth,
        }
    }

    /// A request to the admin port, with the token when there is one.
    fn admin_request(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        match &self.admin_auth {
            Some(auth) => http_request_with(self.admin, method, path, &[("Authorization", auth)]),
            None => http_request_with(self.admin, method, path, &[]),
        }
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(
            self.child.as_mut().map(|c| c.try_wait()),
            Some(Ok(Some(_))) | None
        )
    }

    /// The readiness endpoint's status and body.
    pub fn readiness(&self) -> Option<(u16, String)> {
        http_get(self.health, "/healthz/ready").ok()
    }

    /// [`Daemon::start`] with the daemon also in `cgroups` (another hierarchy's).
    pub fn start_in(node: &Node, extra: &[&str], cgroups: &[&std::path::Path]) -> Self {
        Self::try_start_in(node, extra, cgroups)
            .unwrap_or_else(|log| panic!("daemon exited before becoming ready; log:\n{log}"))
    }

    fn try_start(node: &Node, extra: &[&str]) -> Result<Self, String> {
        Self::try_start_in(node, extra, &[])
    }

    fn try_start_in(
        node: &Node,
        extra: &[&str],
        cgroups: &[&std::path::Path],
    ) -> Result<Self, String> {
        // Inside the node's cgroup tree but in no pod, as a DaemonSet pod is: the sock_ops
        // program (attached at that root) then sees the daemon's own sockets too.
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cgroup = node
            .cgroup_root
            .join(format!("system.slice/proxy-daemon-{n}"));
        fs::create_dir_all(&cgroup).expect("daemon cgroup");
        let mut all = vec![cgroup.as_path()];
        all.extend_from_slice(cgroups);
        let mut d = Self::spawn_in(node, extra, &all);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.is_ready() {
            // A daemon that exited will never be ready: say so now, with its log.
            if let Some(Ok(Some(status))) = d.child.as_mut().map(|c| c.try_wait()) {
                d.child = None;
                return Err(format!("({status}) {}", d.log_text()));
            }
            if Instant::now() > deadline {
                panic!("daemon not ready within 20s; log:\n{}", d.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_ready(&self) -> bool {
        matches!(http_get(self.health, "/healthz/ready"), Ok((200, _)))
    }

    pub fn wait_ready(&self, timeout: Duration) {
        if wait_for(timeout, || self.is_ready().then_some(())).is_none() {
            panic!(
                "daemon not ready within {timeout:?}; log:\n{}",
                self.log_text()
            );
        }
    }

    pub fn config_dump(&self) -> serde_json::Value {
        let (status, body) = self
            .admin_request("GET", "/config_dump")
            .expect("config_dump");
        assert_eq!(status, 200, "config_dump: {body}");
        serde_json::from_str(&body).expect("config_dump JSON")
    }

    pub fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics").expect("metrics").1
    }

    /// Sum of a metric's samples whose labels contain every `key="value"` given.
    pub fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum_samples(&self.metrics_text(), name, labels)
    }

    /// The enrolment state of a pod in /config_dump.
    pub fn workload_state(&self, uid: &str) -> Option<serde_json::Value> {
        self.config_dump()["workloads"]
            .as_array()?
            .iter()
            .find(|w| w["uid"] == uid)
            .cloned()
    }

    pub fn wait_enrolled(&self, uid: &str, timeout: Duration) -> serde_json::Value {
        wait_for(timeout, || {
            self.workload_state(uid)
                .filter(|w| w["state"] == "enrolled")
        })
        .unwrap_or_else(|| {
            panic!(
                "pod {uid} not enrolled within {timeout:?}; log:\n{}",
                self.log_text()
            )
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the daemon to exit by itself (after a hand-over); its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn quit(&self) -> u16 {
        self.admin_request("POST", "/quitquitquit")
            .map(|r| r.0)
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log {} ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        self.kill9();
    }
}

/// Parses Prometheus text and sums `name`'s samples matching all `labels`.
pub fn sum_samples(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}
