//! The "node on one machine" harness (../shared/DESIGN.md): a bridge, network namespaces as
//! pods and services, kubelet-like cgroups, and the daemon as a real process. Every name
//! carries a per-test id, and everything is removed on drop, also when a test fails.
pub mod collector;
pub mod counting_alloc;
pub mod daemon;
pub mod envoy;
pub mod istio_ca;
pub mod kube_api;
pub mod node;
pub mod pki;
pub mod reviews;
pub mod servers;

pub use daemon::Daemon;
pub use node::{CgroupDriver, Host, Node, Pod, Qos};
pub use servers::{Seen, Servers};

/// A node with one upstream host ("upstream") running an identity server on `port`.
pub fn node_with_upstream(tag: &str, port: u16) -> (Node, Servers, Host, Seen) {
    let mut node = Node::new(tag);
    let servers = Servers::new();
    let upstream = node.host("upstream");
    let seen = servers.identity(&upstream, port);
    (node, servers, upstream, seen)
}

/// Deterministic byte stream (xorshift64) so both ends of a transfer can make and check the
/// same data without storing it.
pub fn fill(seed: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Where cargo put the workspace's binaries (the test executable lives in target/<profile>/deps).
pub fn target_bin(name: &str) -> std::path::PathBuf {
    if let Ok(dir) = std::env::var("PROXY_BIN_DIR") {
        return std::path::Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Runs a command, panicking with its output if it fails (harness set-up must not half-work).
pub fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Like [`sh`] but for clean-up: failures are ignored.
pub fn sh_quiet(args: &[&str]) {
    let _ = std::process::Command::new(args[0])
        .args(&args[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Polls `f` every 20 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Minimal HTTP/1.0 GET against loopback (admin endpoints); returns (status, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path)
}

pub fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    http_request_with(addr, method, path, &[])
}

/// [`http_request`] with extra request headers.
pub fn http_request_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}Content-Length: 0\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A test's size from the environment (the long versions `cargo xtask soak` runs), else
/// `default` (the CI size).
pub fn env_size<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Open file descriptors of a process (0 if it is gone).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size of a process, KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A child process (an app in a pod) killed and reaped when the test lets go of it,
/// also when the test fails.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pdtool xfer` of `size` bytes each way from `pod` (workload `workload`) through the
/// daemon to a [`Servers::xfer`] server at `to` sending `size` bytes: checks both
/// directions byte for byte against the server's record, and the one connection in the
/// Istio TCP metrics. Returns pdtool's answer.
pub fn xfer_both_ways(
    pod: &Pod,
    workload: &str,
    to: std::net::SocketAddr,
    records: &std::sync::Arc<std::sync::Mutex<Vec<servers::XferRecord>>>,
    size: u64,
    daemon: &Daemon,
    extra: &[&str],
) -> serde_json::Value {
    use std::time::Duration;
    let (to, bytes) = (to.to_string(), size.to_string());
    let mut args = vec!["xfer", "--to", &to, "--bytes", &bytes, "--seed", "42"];
    args.extend_from_slice(extra);
    let out = pod.pdtool(&args);
    assert_eq!(out["result"], "ok", "{out}");
    let rec = wait_for(Duration::from_secs(5), || {
        records.lock().ok().and_then(|r| r.first().cloned())
    })
    .expect("server record");
    assert_eq!(rec.received_bytes, size);
    assert_eq!(
        out["sent_sha256"], rec.received_sha256,
        "client→server bytes differ"
    );
    assert_eq!(out["received_bytes"], size);
    assert_eq!(
        out["received_sha256"], rec.sent_sha256,
        "server→client bytes differ"
    );
    let labels = [("source_workload", workload)];
    assert!(wait_for(Duration::from_secs(3), || {
        (daemon.metric_sum("istio_tcp_connections_closed_total", &labels) == 1.0).then_some(())
    })
    .is_some());
    assert_eq!(
        daemon.metric_sum("istio_tcp_received_bytes_total", &labels),
        size as f64
    );
    assert_eq!(
        daemon.metric_sum("istio_tcp_sent_bytes_total", &labels),
        size as f64
    );
    out
}

/// Debian's promtool (`cargo xtask setup` takes it out of the `prometheus` package into
/// target/tools), else one on PATH.
pub fn promtool() -> std::path::PathBuf {
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/promtool");
    if local.exists() {
        return local;
    }
    "promtool".into()
}

/// `promtool check metrics` on a scrape: Err with its report on a parse error or any lint
/// but one. promtool's naming lint objects to one of Istio's own metric names (a real
/// sidecar's scrape gets the same line); that name is the contract, so that one line is
/// allowed and nothing else.
pub fn promtool_check(scrape: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool (installed by `cargo xtask setup`): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(scrape.as_bytes())
            .map_err(|e| format!("feeding promtool: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("promtool: {e}"))?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let istio_naming =
        r#"istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds""#;
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty() && l.trim() != istio_naming)
        .collect();
    let accepted = out.status.success() || (out.status.code() == Some(3) && problems.is_empty());
    if accepted && problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "promtool check metrics ({:?}): {report}",
            out.status.code()
        ))
    }
}

/// A tool of the test venv (`cargo xtask setup` installs tests/tools-requirements.txt
/// into target/tools/venv): `envoy`, `python`.
pub fn venv_tool(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools/venv/bin")
        .join(name)
}
