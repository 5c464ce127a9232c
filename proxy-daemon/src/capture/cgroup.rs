//! cgroup v2: where it is mounted, where kubelet put a pod, which processes are in it.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("{path} is not a directory on a cgroup2 filesystem")]
    NotCgroup2 { path: PathBuf },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The mount point of the cgroup2 filesystem (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = PathBuf::from("/proc/self/mountinfo");
    let text = fs::read_to_string(&path).map_err(|source| CgroupError::Io { path, source })?;
    parse_cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Checks that `path` is a cgroup2 directory.
pub fn check_cgroup2_dir(path: &Path) -> Result<(), CgroupError> {
    // __fsword_t is i64 on x86_64 but not on every arch.
    #[allow(clippy::unnecessary_cast)]
    let magic = nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 as i64);
    match magic {
        Ok(m) if m == CGROUP2_SUPER_MAGIC => Ok(()),
        _ => Err(CgroupError::NotCgroup2 {
            path: path.to_owned(),
        }),
    }
}

/// The id the kernel uses for a cgroup (`bpf_get_current_cgroup_id`): its kernfs inode.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Directory names kubelet gives a pod's cgroup:
/// systemd driver `kubepods-<qos>-pod<uid with _>.slice`, cgroupfs driver `pod<uid>`.
fn matches_pod_dir(name: &str, uid: &str) -> bool {
    let systemd_uid = uid.replace('-', "_");
    if let Some(stem) = name.strip_suffix(".slice") {
        return stem.ends_with(&format!("pod{systemd_uid}"));
    }
    name == format!("pod{uid}")
}

/// Kubelet nests pods at most this deep below the root (plus room for a test root above).
const POD_SEARCH_DEPTH: usize = 6;

/// Finds the cgroup of the pod with `uid` below `root`, if it exists.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    fn walk(dir: &Path, uid: &str, depth: usize) -> Option<PathBuf> {
        if depth == 0 {
            return None;
        }
        let entries = fs::read_dir(dir).ok()?;
        let mut subdirs = Vec::new();
        for entry in entries.flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if matches_pod_dir(&name, uid) {
                return Some(entry.path());
            }
            // Only descend into kubelet's tree and our own test roots, not every service.
            if name.starts_with("kubepods")
                || name.starts_with("besteffort")
                || name.starts_with("burstable")
                || depth == POD_SEARCH_DEPTH
            {
                subdirs.push(entry.path());
            }
        }
        subdirs.into_iter().find_map(|d| walk(&d, uid, depth - 1))
    }
    walk(root, uid, POD_SEARCH_DEPTH)
}

/// The cgroup's level in the hierarchy (the root is 0), as the kernel's
/// `bpf_get_current_ancestor_cgroup_id` counts it: the steps from the top of the cgroup2
/// mount it sits in. Assumes that mount shows the hierarchy's root, as the host's and the
/// chart's hostPath mount do.
pub fn cgroup_level(path: &Path) -> usize {
    let mut level = 0;
    let mut dir = path;
    while let Some(parent) = dir.parent() {
        if check_cgroup2_dir(parent).is_err() {
            break;
        }
        level += 1;
        dir = parent;
    }
    level
}

/// Which directories below the cgroup root may hold (or be) a pod's cgroup: every child of
/// the root (test roots, `kubepods`), then only kubelet's own tree.
fn may_hold_pods(name: &str, depth: usize) -> bool {
    depth == 1
        || name.starts_with("kubepods")
        || name.starts_with("besteffort")
        || name.starts_with("burstable")
        || name.starts_with("pod")
}

/// Wakes `wake` whenever a directory appears or goes in kubelet's part of the tree below
/// `root` (inotify; the poll remains as a backstop), so a new pod's cgroup gets its kernel
/// entry within milliseconds instead of up to a poll interval later.
pub fn watch_pod_cgroups(
    root: &Path,
    wake: std::sync::Arc<tokio::sync::Notify>,
) -> Result<(), CgroupError> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |e: nix::errno::Errno| CgroupError::Io {
            path,
            source: std::io::Error::from(e),
        }
    };
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(io_err(root))?;
    // IN_MODIFY of a watched directory's `cgroup.events`: "populated" changed, that is, the
    // pod's first process arrived (kernfs notifies the parent directory's watch too).
    let flags = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ONLYDIR;
    let mut watched: std::collections::HashMap<
        nix::sys::inotify::WatchDescriptor,
        (PathBuf, usize),
    > = Default::default();
    // Adds a watch on `dir` and on what already lies below it (it may have filled up
    // before the watch was in place).
    fn add_tree(
        inotify: &Inotify,
        flags: AddWatchFlags,
        watched: &mut std::collections::HashMap<
            nix::sys::inotify::WatchDescriptor,
            (PathBuf, usize),
        >,
        dir: &Path,
        depth: usize,
    ) {
        let Ok(wd) = inotify.add_watch(dir, flags) else {
            return;
        };
        watched.insert(wd, (dir.to_owned(), depth));
        if depth >= POD_SEARCH_DEPTH {
            return;
        }
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if e.file_type().is_ok_and(|t| t.is_dir())
                && may_hold_pods(&name.to_string_lossy(), depth + 1)
            {
                add_tree(inotify, flags, watched, &e.path(), depth + 1);
            }
        }
    }
    add_tree(&inotify, flags, &mut watched, root, 0);
    std::thread::Builder::new()
        .name("cgroup-watch".into())
        .spawn(move || loop {
            let Ok(events) = inotify.read_events() else {
                // A broken inotify descriptor: the poll still finds pods, only later.
                tracing::warn!("cgroup watch stopped; new pods are found by the poll");
                return;
            };
            let mut changed = false;
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The directory went away; the kernel dropped its watch.
                    watched.remove(&event.wd);
                    continue;
                }
                let Some((dir, depth)) = watched.get(&event.wd).cloned() else {
                    continue;
                };
                let Some(name) = event.name else { continue };
                let name = name.to_string_lossy().into_owned();
                if !event.mask.contains(AddWatchFlags::IN_ISDIR) {
                    changed |= name == "cgroup.events";
                    continue;
                }
                changed = true;
                if event.mask.contains(AddWatchFlags::IN_CREATE)
                    && depth < POD_SEARCH_DEPTH
                    && may_hold_pods(&name, depth + 1)
                {
                    add_tree(&inotify, flags, &mut watched, &dir.join(&name), depth + 1);
                }
            }
            if changed {
                wake.notify_one();
            }
        })
        .map_err(|source| CgroupError::Io {
            path: root.to_owned(),
            source,
        })?;
    Ok(())
}

/// Every process in the cgroup and the cgroups below it (a pod's containers sit one level
/// down), at most `limit` of them.
pub fn processes(cgroup: &Path, limit: usize) -> Vec<u32> {
    fn walk(dir: &Path, depth: usize, limit: usize, out: &mut Vec<u32>) {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if depth == 0 || out.len() >= limit {
            return;
        }
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&e.path(), depth - 1, limit, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(cgroup, 3, limit, &mut out);
    out.truncate(limit);
    out
}

/// Whether `pid` is (still) in the cgroup or below it.
pub fn contains_process(cgroup: &Path, pid: u32) -> bool {
    processes(cgroup, usize::MAX).contains(&pid)
}

/// The process whose network namespace is the pod's: the sandbox's (`pause`, which holds
/// the namespace for the pod's lifetime), else the namespace most of the pod's processes
/// share (an app container that unshared a namespace of its own must not pick it), lowest
/// pid first for a stable choice.
pub fn sandbox_process(cgroup: &Path) -> Option<u32> {
    let mut pids = processes(cgroup, 4096);
    pids.sort_unstable();
    // A pod's own network namespace belongs to the node's user namespace. One an app made
    // itself (`unshare -rn`, needing no privilege) belongs to the app's new user namespace:
    // never a candidate, however many processes it holds or whatever they are called.
    let node_userns = fs::metadata("/proc/self/ns/user").ok().map(|m| m.ino());
    pids.retain(|pid| netns_owner_userns(*pid) == node_userns);
    // Nor the node's own network namespace (the daemon's: it runs with the host's): a
    // runtime puts a process into the pod's cgroup before that process enters the
    // sandbox's namespace, and a pod enrolled in that moment would get its listener in
    // the node's namespace and its own connects refused or, re-enrolled, let out.
    let node_netns = fs::metadata("/proc/self/ns/net").ok().map(|m| m.ino());
    pids.retain(|pid| {
        let netns = fs::metadata(format!("/proc/{pid}/ns/net"))
            .ok()
            .map(|m| m.ino());
        netns.is_some() && netns != node_netns
    });
    if let Some(pid) = pids.iter().copied().find(|pid| {
        fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == "pause")
    }) {
        return Some(pid);
    }
    let mut by_netns: std::collections::BTreeMap<u64, (usize, u32)> = Default::default();
    for pid in pids {
        let Ok(m) = fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        let e = by_netns.entry(m.ino()).or_insert((0, pid));
        e.0 += 1;
        e.1 = e.1.min(pid);
    }
    by_netns
        .values()
        .max_by_key(|(count, pid)| (*count, std::cmp::Reverse(*pid)))
        .map(|(_, pid)| *pid)
}

/// CAP_NET_ADMIN's bit in /proc/<pid>/status `CapEff`.
const CAP_NET_ADMIN: u32 = 12;

/// Whether a process of the pod (up to `limit` of them) holds CAP_NET_ADMIN over the
/// pod's network namespace: effective, in the node's user namespace (which owns a pod's
/// namespace; capabilities in a user namespace of the pod's own do not reach it). Such a
/// process can rewrite its namespace's routing and netfilter rules, and so undo what
/// happens in the pod's namespace (iptables capture, reserved ports, a DNAT of a loopback
/// connection to anywhere), though never the cgroup programs themselves.
pub fn holds_net_admin(cgroup: &Path, limit: usize) -> bool {
    let node_userns = fs::metadata("/proc/self/ns/user").ok().map(|m| m.ino());
    processes(cgroup, limit).into_iter().any(|pid| {
        let in_node_userns = fs::metadata(format!("/proc/{pid}/ns/user"))
            .ok()
            .map(|m| m.ino())
            == node_userns;
        in_node_userns
            && fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|status| {
                    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
                    u64::from_str_radix(hex.trim(), 16).ok()
                })
                .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
    })
}

/// NS_GET_USERNS (linux/nsfs.h): the user namespace that owns a namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;

/// The inode of the user namespace owning `pid`'s network namespace.
fn netns_owner_userns(pid: u32) -> Option<u64> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let netns = fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
    // SAFETY: an ioctl on an open nsfs file; it returns a new fd we take ownership of.
    let fd = unsafe { libc::ioctl(netns.as_raw_fd(), NS_GET_USERNS as _) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just returned to us by the kernel and is owned by nobody else.
    let owner = unsafe { OwnedFd::from_raw_fd(fd) };
    fs::File::from(owner).metadata().ok().map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let text = "30 24 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755\n\
                    31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn kubelet_pod_dir_names() {
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        assert!(matches_pod_dir(
            "kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice",
            uid
        ));
        assert!(matches_pod_dir(
            "kubepods-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice",
            uid
        ));
        assert!(matches_pod_dir(
            "pod1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            uid
        ));
        assert!(!matches_pod_dir(
            "pod1b4e28ba-2fa1-11d2-883f-0016d3cca428",
            uid
        ));
        assert!(!matches_pod_dir("kubepods-besteffort.slice", uid));
    }
}
