//! `cargo xtask image`: the OCI image the chart pulls (`image.repository`, tag = the
//! chart's `appVersion`), built without pulling anything. The root filesystem is the
//! stripped release binary and exactly the shared libraries `ldd` names for it, plus the
//! empty directories the DaemonSet mounts over: no shell, no package manager. umoci (from
//! Debian) packs it into an OCI layout, written as an OCI archive under `target/image/`.
//! The image is then checked from the archive's own content: unpacked again, and
//! `proxy-daemon version` and `validate` on the demo's YAML run in it (chroot).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// The repository the chart's `image.repository` names.
pub const REPOSITORY: &str = "ghcr.io/proxy-daemon/proxy-daemon";
/// Compressed size the image must stay under.
const MAX_BYTES: u64 = 25 * 1024 * 1024;

/// The chart's `appVersion`: the image's tag.
fn app_version(root: &Path) -> Result<String> {
    let chart = fs::read_to_string(root.join("deploy/helm/proxy-daemon/Chart.yaml"))?;
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("Chart.yaml has no appVersion")
}

/// The shared libraries `ldd` resolves for `binary` (absolute paths; the vDSO has none).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Copies `from` (following links) to `rootfs` at the same absolute path.
fn copy_into(rootfs: &Path, from: &Path, at: &Path) -> Result<()> {
    let dest = rootfs.join(at.strip_prefix("/").unwrap_or(at));
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, &dest).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

fn umoci(args: &[&str]) -> Result<()> {
    super::run(Command::new("umoci").args(args))
}

/// Bytes of the files under `dir`.
fn size_of(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) if m.is_file() => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

pub fn build(root: &Path) -> Result<()> {
    if !super::have("umoci") {
        super::run(Command::new("apt-get").args(["install", "-y", "-qq", "umoci"]))?;
    }
    let version = app_version(root)?;
    super::run(&mut super::cargo(&[
        "build",
        "--release",
        "-p",
        "proxy-daemon",
        "--bin",
        "proxy-daemon",
    ]))?;
    let out = root.join("target/image");
    let _ = fs::remove_dir_all(&out);
    let rootfs = out.join("rootfs");
    let binary = root.join("target/release/proxy-daemon");
    let in_image = Path::new("/usr/local/bin/proxy-daemon");
    copy_into(&rootfs, &binary, in_image)?;
    let copied = rootfs.join("usr/local/bin/proxy-daemon");
    super::run(Command::new("strip").arg(&copied))?;
    for lib in shared_libraries(&binary)? {
        copy_into(&rootfs, &lib, &lib)?;
    }
    // Mount points and scratch: the DaemonSet mounts over these (read-only root).
    for dir in [
        "tmp",
        "proc",
        "sys/fs/bpf",
        "host/sys/fs/cgroup",
        "run/proxy-daemon",
        "etc/proxy-daemon",
    ] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    let layout = out.join("layout");
    let image = format!("{}:{version}", layout.display());
    umoci(&["init", "--layout", &layout.display().to_string()])?;
    umoci(&["new", "--image", &image])?;
    let bundle = out.join("bundle");
    umoci(&["unpack", "--image", &image, &bundle.display().to_string()])?;
    super::run(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", rootfs.display()))
            .arg(bundle.join("rootfs")),
    )?;
    umoci(&["repack", "--image", &image, &bundle.display().to_string()])?;
    let source = "org.opencontainers.image.source=https://github.com/proxy-daemon/proxy-daemon";
    umoci(&[
        "config",
        "--image",
        &image,
        "--os",
        "linux",
        "--architecture",
        "amd64",
        "--config.entrypoint",
        "/usr/local/bin/proxy-daemon",
        "--config.cmd",
        "run",
        "--config.user",
        "0:0",
        "--config.workingdir",
        "/",
        "--config.label",
        "org.opencontainers.image.title=proxy-daemon",
        "--config.label",
        &format!("org.opencontainers.image.version={version}"),
        "--config.label",
        source,
    ])?;
    umoci(&["gc", "--layout", &layout.display().to_string()])?;
    let archive = out.join(format!("proxy-daemon-{version}.oci.tar"));
    super::run(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
    )?;
    check(&out, &archive, &version, root)?;
    let compressed = size_of(&layout.join("blobs"));
    let unpacked = size_of(&rootfs);
    println!(
        "image {REPOSITORY}:{version}: {} ({:.1} MB compressed, {:.1} MB unpacked)",
        archive.display(),
        compressed as f64 / 1e6,
        unpacked as f64 / 1e6
    );
    if compressed > MAX_BYTES {
        bail!("the image is {compressed} bytes, over {MAX_BYTES}");
    }
    println!(
        "push it: skopeo copy oci-archive:{}:{version} docker://{REPOSITORY}:{version}",
        archive.display()
    );
    Ok(())
}

/// Unpacks the archive afresh and runs the daemon from it: `version` prints the chart's
/// appVersion, and `validate` accepts the demo's configuration.
fn check(out: &Path, archive: &Path, version: &str, root: &Path) -> Result<()> {
    let again = out.join("check-layout");
    fs::create_dir_all(&again)?;
    super::run(
        Command::new("tar")
            .arg("-C")
            .arg(&again)
            .arg("-xf")
            .arg(archive),
    )?;
    let unpacked = out.join("check");
    umoci(&[
        "unpack",
        "--image",
        &format!("{}:{version}", again.display()),
        &unpacked.display().to_string(),
    ])?;
    let rootfs = unpacked.join("rootfs");
    let entries: Vec<String> = fs::read_dir(&rootfs)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for forbidden in ["bin", "sbin", "usr/bin", "var/lib/dpkg"] {
        if rootfs.join(forbidden).exists() {
            bail!("the image has /{forbidden} (top level: {entries:?})");
        }
    }
    let chroot = |args: &[&str]| -> Result<String> {
        let out = Command::new("chroot")
            .arg(&rootfs)
            .arg("/usr/local/bin/proxy-daemon")
            .args(args)
            .output()
            .context("chroot")?;
        if !out.status.success() {
            bail!(
                "proxy-daemon {args:?} in the image: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let printed = chroot(&["version"])?;
    if !printed.contains(version) {
        bail!("proxy-daemon version in the image printed {printed:?}, not {version}");
    }
    fs::copy(
        root.join("deploy/examples/demo.yaml"),
        rootfs.join("tmp/demo.yaml"),
    )?;
    chroot(&["validate", "-q", "/tmp/demo.yaml"])?;
    println!("image check: unpacked from the archive, version {version}, validate ok, no shell");
    Ok(())
}
