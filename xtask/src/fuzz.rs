//! `cargo xtask fuzz --minutes N`: every cargo-fuzz target of proxy-daemon/fuzz for its
//! share of N minutes, on nightly (the only place nightly is used; CI stays on stable).
//!
//! Each target starts from its seeds (proxy-daemon/fuzz/seeds, plus real TLS ClientHellos
//! captured here from OpenSSL, curl and rustls) and from everything it found before
//! (target/fuzz/corpus). A crash is copied to proxy-daemon/fuzz/regressions/<target>/,
//! which the normal test suite replays; the command then fails. target/fuzz/report.md
//! says what ran: executions, coverage, corpus size and findings per target.
use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, cargo_home_bin, have, output, run, workspace_root};

const CARGO_FUZZ_VERSION: &str = "0.12.0";
const TARGETS: [&str; 5] = [
    "sniff",
    "client_hello",
    "yaml",
    "cluster_name",
    "http_request",
];

pub fn fuzz(minutes: f64, only: Option<String>) -> Result<()> {
    let fuzz_dir = workspace_root().join("proxy-daemon/fuzz");
    if !cargo_home_bin().join("cargo-fuzz").exists() {
        run(&mut cargo(&[
            "install",
            "--locked",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    if output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_none() {
        bail!("cargo fuzz needs a nightly toolchain (rustup toolchain install nightly)");
    }
    let work = workspace_root().join("target/fuzz");
    let targets: Vec<&str> = TARGETS
        .into_iter()
        .filter(|t| only.as_deref().is_none_or(|o| o == *t))
        .collect();
    if targets.is_empty() {
        bail!("no fuzz target {only:?}; targets: {}", TARGETS.join(", "));
    }
    let hellos = capture_client_hellos(&work.join("hellos"))?;
    println!("captured {} real ClientHellos", hellos.len());
    // Build once, all targets: the eBPF object and the daemon take minutes on two cores.
    run(fuzz_cmd(&fuzz_dir, "build").args(["-s", "none", "-a"]))?;
    let seconds = ((minutes * 60.0) / targets.len() as f64).max(5.0) as u64;
    let mut report = vec![
        format!("# Fuzzing: {minutes} min, {seconds} s per target\n"),
        "| target | executions | exec/s | coverage (cov) | corpus | findings |".into(),
        "|---|---|---|---|---|---|".into(),
    ];
    let mut found = Vec::new();
    for target in targets {
        let corpus = work.join("corpus").join(target);
        let artifacts = work.join("artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        copy_dir(&fuzz_dir.join("seeds").join(target), &corpus)?;
        copy_dir(&fuzz_dir.join("regressions").join(target), &corpus)?;
        if target == "client_hello" || target == "sniff" {
            for h in &hellos {
                std::fs::copy(h, corpus.join(h.file_name().unwrap_or_default()))?;
            }
        }
        println!("fuzzing {target} for {seconds} s");
        let out = fuzz_cmd(&fuzz_dir, "run")
            .args(["-s", "none", "-a", target])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .arg("-timeout=10")
            .arg("-rss_limit_mb=4096")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .context("cargo fuzz run")?;
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        std::fs::write(work.join(format!("{target}.log")), &log)?;
        let stat = |name: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| "?".into())
        };
        let cov = log
            .lines()
            .rev()
            .find_map(|l| l.split(" cov: ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let corpus_files = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
        let mut crashes = Vec::new();
        for entry in std::fs::read_dir(&artifacts)?.flatten() {
            let keep = fuzz_dir.join("regressions").join(target);
            std::fs::create_dir_all(&keep)?;
            std::fs::copy(entry.path(), keep.join(entry.file_name()))?;
            crashes.push(entry.file_name().to_string_lossy().to_string());
            let _ = std::fs::remove_file(entry.path());
        }
        let execs = stat("number_of_executed_units");
        let rate = execs
            .parse::<f64>()
            .map(|e| format!("{:.0}", e / seconds as f64))
            .unwrap_or_else(|_| "?".into());
        report.push(format!(
            "| {target} | {execs} | {rate} | {cov} | {corpus_files} | {} |",
            if crashes.is_empty() {
                "none".to_string()
            } else {
                crashes.join(", ")
            }
        ));
        if !out.status.success() || !crashes.is_empty() {
            found.push(format!(
                "{target}: {} (log: target/fuzz/{target}.log)",
                if crashes.is_empty() {
                    "libFuzzer failed".to_string()
                } else {
                    format!("kept in proxy-daemon/fuzz/regressions/{target}/")
                }
            ));
        }
    }
    let text = report.join("\n") + "\n";
    std::fs::write(work.join("report.md"), &text)?;
    println!("{text}");
    if !found.is_empty() {
        bail!("fuzzing found problems:\n{}", found.join("\n"));
    }
    Ok(())
}

/// `cargo +nightly fuzz <sub>`, run from the crate whose `fuzz/` directory it is, building
/// under the workspace's target/ like everything else.
fn fuzz_cmd(fuzz_dir: &Path, sub: &str) -> Command {
    let mut cmd = cargo(&["+nightly", "fuzz", sub]);
    cmd.arg("--target-dir")
        .arg(workspace_root().join("target/fuzz/build"));
    cmd.current_dir(fuzz_dir.parent().unwrap_or(fuzz_dir));
    cmd
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(from) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// The first TLS record each client sends to a local listener: what OpenSSL, curl and
/// rustls (pdtool) really say, with SNI, ALPN and their extension orders.
fn capture_client_hellos(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let pdtool = workspace_root().join("target/debug/pdtool");
    if !pdtool.exists() {
        run(&mut cargo(&[
            "build",
            "-p",
            "proxy-tests",
            "--bin",
            "pdtool",
        ]))?;
    }
    let mut clients: Vec<(&str, Command)> = Vec::new();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    if have("openssl") {
        let mut c = Command::new("openssl");
        c.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "api.openssl.example", "-alpn", "h2,http/1.1"]);
        clients.push(("openssl", c));
    }
    if have("curl") {
        let mut c = Command::new("curl");
        c.args(["-s", "-m", "2", "--resolve"])
            .arg(format!("api.curl.example:{port}:127.0.0.1"))
            .arg(format!("https://api.curl.example:{port}/"));
        clients.push(("curl", c));
    }
    let mut c = Command::new(&pdtool);
    c.args(["tls-hello", "--to", &format!("127.0.0.1:{port}")])
        .args(["--sni", "api.rustls.example"]);
    clients.push(("rustls", c));
    let mut saved = Vec::new();
    for (name, mut cmd) in clients {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        listener.set_nonblocking(false)?;
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut record = Vec::new();
        let mut buf = [0u8; 4096];
        // One whole record: 5-byte header, then its length.
        while record.len() < 5
            || record.len() < 5 + u16::from_be_bytes([record[3], record[4]]) as usize
        {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => record.extend_from_slice(&buf[..n]),
            }
        }
        let _ = conn.write_all(b"\x15\x03\x03\x00\x02\x02\x28"); // alert: handshake failure
        drop(conn);
        let _ = child.kill();
        let _ = child.wait();
        if record.len() > 5 {
            let path = dir.join(format!("hello-{name}"));
            std::fs::write(&path, &record)?;
            saved.push(path);
        }
    }
    Ok(saved)
}
