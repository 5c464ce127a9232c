//! Upgrading over pins of the first release, whose enrolment entries had another layout:
//! the new daemon carries every pod's entry over (with its fail mode, not listening) before
//! its programs are attached, so a fail-closed pod is never let through while it starts.
//! Real kernel, real pins: needs root (as the netns suite does); skipped otherwise.
use std::path::PathBuf;

use aya::maps::{HashMap, MapData};
use proxy_common::{FailMode, ENROLMENT_LISTENING};
use proxy_daemon::capture::{bpf, cgroup};

struct Cleanup {
    pin_dir: PathBuf,
    cgroup: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = bpf::uninstall(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

#[test]
fn first_release_enrolments_are_carried_over_with_their_fail_mode() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (eBPF, bpffs, cgroups)");
        return;
    }
    let id = format!("pdt-migr-{:08x}", rand::random::<u32>());
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(&id);
    let cgroup_root = cgroup::cgroup2_mount().expect("cgroup2").join(&id);
    // As the daemon does: a fresh boot has no bpffs at /sys/fs/bpf yet.
    bpf::ensure_bpffs(&pin_dir).expect("pin dir on bpffs");
    std::fs::create_dir_all(&cgroup_root).expect("cgroup");
    let _cleanup = Cleanup {
        pin_dir: pin_dir.clone(),
        cgroup: cgroup_root.clone(),
    };
    // What a first-release daemon left: PD_ENROLLED with 16-byte values (netns cookie,
    // pod id, listener port, fail mode, padding), one fail-closed and one fail-open pod.
    let mut old = HashMap::<MapData, u64, [u8; 16]>::create(4096, 0).expect("create v1 map");
    let entry = |cookie: u64, pod: u32, mode: FailMode| {
        let mut v = [0u8; 16];
        v[0..8].copy_from_slice(&cookie.to_ne_bytes());
        v[8..12].copy_from_slice(&pod.to_ne_bytes());
        v[12..14].copy_from_slice(&15001u16.to_ne_bytes());
        v[14] = mode as u8;
        v
    };
    old.insert(1111, entry(77, 1, FailMode::Closed), 0)
        .expect("insert");
    old.insert(2222, entry(78, 2, FailMode::Open), 0)
        .expect("insert");
    // (pin consumes the handle; the pin keeps the map.)
    old.pin(pin_dir.join("PD_ENROLLED")).expect("pin v1 map");

    let loaded = bpf::load_and_attach(&cgroup_root, &pin_dir).expect("load over old pins");
    let maps = loaded.enrolment;
    let closed = maps.entry(1111).expect("fail-closed pod carried over");
    assert_eq!(closed.fail_mode, FailMode::Closed as u8);
    assert_eq!(
        closed.flags & ENROLMENT_LISTENING,
        0,
        "not listening until re-enrolled"
    );
    assert_eq!(closed.listener_port, 15001);
    let open = maps.entry(2222).expect("fail-open pod carried over");
    assert_eq!(open.fail_mode, FailMode::Open as u8);
    assert_eq!(maps.enrolled().len(), 2);
    loaded.attached.detach();
}
