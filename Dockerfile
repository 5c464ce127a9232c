# syntax=docker/dockerfile:1
#
# proxy-daemon's container image. From the repository root:
#
#   docker build -t ghcr.io/proxy-daemon/proxy-daemon:0.1.0 .
#
# NOT BUILT HERE: the machines this repository's tests and CI run on reach package
# registries only, not the image registries the base images below come from, so this file
# is checked by review, not by a build. The recipe is the one `cargo xtask setup` runs.
# `cargo xtask image` builds the image without any base image (an OCI archive under
# target/image/), and checks it: prefer that.

# ---- build: the daemon with its eBPF object inside ----------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src

# The toolchain rust-toolchain.toml names, with rust-src (the eBPF crate builds `core`
# from source for bpfel-unknown-none).
COPY rust-toolchain.toml ./
RUN rustup toolchain install && rustup component add rust-src

# bpf-linker 0.13.0 linked against the LLVM that rustc itself ships, so the bitcode rustc
# emits and the linker that reads it always agree (xtask/src/main.rs, setup()). The
# libLLVM symlinks go into a prefix; the binary's runpath points there.
RUN set -eux; \
    sysroot="$(rustc --print sysroot)"; \
    libllvm="$(find "$sysroot/lib" -maxdepth 1 -name 'libLLVM.so.*' | head -n 1)"; \
    test -n "$libllvm"; \
    major="$(basename "$libllvm" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')"; \
    mkdir -p /opt/llvm-prefix/lib; \
    ln -sf "$libllvm" /opt/llvm-prefix/lib/libLLVM.so; \
    ln -sf "$libllvm" "/opt/llvm-prefix/lib/$(basename "$libllvm")"; \
    LLVM_PREFIX=/opt/llvm-prefix cargo install --locked bpf-linker@0.13.0 \
        --no-default-features --features "llvm-${major}"

# proxy-daemon's build.rs builds proxy-ebpf and embeds the object in the binary.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p proxy-daemon \
    && install -D -m 0755 target/release/proxy-daemon /out/proxy-daemon

# ---- run: glibc and libgcc only (the binary needs nothing else) ----------------------
FROM gcr.io/distroless/cc-debian12
COPY --from=build /out/proxy-daemon /usr/local/bin/proxy-daemon
# Runs as root with the capabilities the DaemonSet adds (deploy/helm/proxy-daemon).
USER 0
ENTRYPOINT ["proxy-daemon"]
CMD ["run", "--kubernetes"]
