//! Re-run when bpf-linker changes, as aya-template does: the linker is part of the build.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
