//! The daemon's memory: giving freed heap back to the system, and knowing its limit and
//! use, so that connection budgets come from memory as well as from descriptors and one
//! tenant cannot get the shared daemon killed for memory.
//!
//! A configuration load (parse, compile) and a `/config_dump` of a large mesh allocate
//! tens of MiB for a moment; glibc keeps freed chunks in its per-thread arenas, so without
//! a trim the daemon's RSS stays at the peak (measured: 1,000 services × 5 routes left
//! 99 MB after the load and 146 MB after one dump, where the snapshot itself holds 17 MiB).
use std::path::{Path, PathBuf};

/// Returns free heap memory to the system (glibc `malloc_trim`); a no-op elsewhere.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What one downstream connection is reckoned to cost in the daemon's memory, held or not:
/// its task, hyper's buffers, its upstream connection's state (measured: ~22 KiB waiting
/// for a request head in a debug build; an active HTTP connection with its upstream, more).
pub const CONNECTION_MEMORY: u64 = 64 * 1024;

/// Memory the daemon keeps for itself (configuration, metrics, the runtime) before any is
/// reckoned for connections: a quarter of the limit, at least 48 MiB.
pub fn reserve(limit: u64) -> u64 {
    (limit / 4).max(48 << 20)
}

/// Above this share of the limit the daemon is under memory pressure: a namespace holding
/// more than its fair share of connections gets no new ones until usage is back below
/// [`PRESSURE_OFF`].
pub const PRESSURE_ON: f64 = 0.85;
pub const PRESSURE_OFF: f64 = 0.75;

/// The memory cgroup the daemon runs in: v2 (`memory.max`, `memory.current`, socket
/// buffers included) or v1 (`memory.limit_in_bytes`, `memory.usage_in_bytes`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CgroupMemory {
    dir: PathBuf,
    v2: bool,
}

impl CgroupMemory {
    /// The daemon's own, from /proc/self/cgroup and the mount table. None without one.
    pub fn own() -> Option<Self> {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        Self::find(&cgroups, &mounts)
    }

    fn find(cgroups: &str, mounts: &str) -> Option<Self> {
        // A v1 memory controller wins where both exist (hybrid hosts keep memory on v1).
        let v1 = cgroups.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.to_string())
        });
        let mount_of = |wanted: &dyn Fn(&str, &str) -> bool| {
            mounts.lines().find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let mut r = right.split_whitespace();
                let (fstype, _source, options) = (r.next()?, r.next()?, r.next()?);
                let mount_point = left.split_whitespace().nth(4)?;
                wanted(fstype, options).then(|| PathBuf::from(mount_point))
            })
        };
        if let Some(path) = v1 {
            let root =
                mount_of(&|fs, opts| fs == "cgroup" && opts.split(',').any(|o| o == "memory"))?;
            return Some(Self {
                dir: join_cgroup(&root, &path),
                v2: false,
            });
        }
        let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
        let root = mount_of(&|fs, _| fs == "cgroup2")?;
        Some(Self {
            dir: join_cgroup(&root, path),
            v2: true,
        })
    }

    /// The limit in bytes; None when unlimited.
    pub fn limit(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        let text = std::fs::read_to_string(self.dir.join(file)).ok()?;
        // v2 says "max"; v1 says a number near 2^63 for no limit.
        text.trim().parse::<u64>().ok().filter(|l| *l < 1 << 60)
    }

    /// Bytes in use now that the kernel could not just drop: usage less the inactive file
    /// cache (the kubelet's "working set"; the daemon's own log file fills page cache that
    /// is reclaimed long before an OOM kill).
    pub fn working_set(&self) -> Option<u64> {
        let (usage_file, inactive_key) = if self.v2 {
            ("memory.current", "inactive_file")
        } else {
            ("memory.usage_in_bytes", "total_inactive_file")
        };
        let usage: u64 = std::fs::read_to_string(self.dir.join(usage_file))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(self.dir.join("memory.stat")).unwrap_or_default();
        let inactive = stat
            .lines()
            .find_map(|l| l.strip_prefix(inactive_key)?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Some(usage.saturating_sub(inactive))
    }
}

/// The daemon's resident set, for when no memory cgroup of its own says more.
pub fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

fn join_cgroup(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Parses `--memory-limit`: bytes, or with a suffix `Ki`, `Mi`, `Gi` (1024s) or `K`, `M`,
/// `G` (1000s), as Kubernetes quantities are written.
pub fn parse_quantity(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (number, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| t.split_at(i))
        .unwrap_or((t, ""));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a byte count (e.g. 512Mi)"))?;
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (Ki, Mi, Gi, K, M, G)"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hybrid_host_keeps_memory_on_v1_a_unified_one_on_v2() {
        let mounts = "25 24 0:22 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                      31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        let hybrid = "12:memory:/pdt-mem-1\n1:name=systemd:/x\n0::/pdt-1/system.slice/d\n";
        let m = CgroupMemory::find(hybrid, mounts).unwrap();
        assert_eq!(m.dir, PathBuf::from("/sys/fs/cgroup/memory/pdt-mem-1"));
        assert!(!m.v2);
        let unified_mounts = "31 30 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let m = CgroupMemory::find("0::/kubepods/pod1/ctr\n", unified_mounts).unwrap();
        assert_eq!(m.dir, PathBuf::from("/sys/fs/cgroup/kubepods/pod1/ctr"));
        assert!(m.v2);
    }

    #[test]
    fn quantities_as_kubernetes_writes_them() {
        assert_eq!(parse_quantity("512Mi"), Ok(512 << 20));
        assert_eq!(parse_quantity("1G"), Ok(1_000_000_000));
        assert_eq!(parse_quantity("4096"), Ok(4096));
        assert!(parse_quantity("12Q").is_err());
        assert!(parse_quantity("lots").is_err());
        assert!(parse_quantity("99999999999Gi").is_err());
    }

    #[test]
    fn the_reserve_is_a_quarter_but_never_under_48_mib() {
        assert_eq!(reserve(512 << 20), 128 << 20);
        assert_eq!(reserve(96 << 20), 48 << 20);
    }
}
