//! Builds the eBPF object (proxy-ebpf) for the bpfel target and hands its path to the daemon
//! through OUT_DIR, so a plain `cargo build` produces a daemon with its programs inside.
use anyhow::{anyhow, Context as _};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let metadata_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("daemon crate has no parent directory"))?
        .join("proxy-ebpf");
    let root_dir = metadata_root
        .to_str()
        .context("proxy-ebpf path is not UTF-8")?;
    // Stable toolchain + RUSTC_BOOTSTRAP=1 lets aya-build pass -Z build-std=core without nightly.
    // SAFETY-free: setting our own process environment in a single-threaded build script.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    let package = aya_build::Package {
        name: "proxy-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom("stable"))
}
