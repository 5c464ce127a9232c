//! Loading, attaching, pinning and detaching the eBPF programs; typed handles on their maps.
//! This is the only module that names an eBPF map or program.
//!
//! Links and maps are pinned under `--bpf-pin-dir`, so capture outlives the daemon: after a
//! crash, fail-closed pods stay refused and fail-open pods go direct (the programs check
//! the listener per connect). A restarted daemon reuses the pinned maps, attaches its new
//! links first and only then drops the old ones, so no connect slips through in between.
use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

// bpf_link_create on a cgroup takes no attach flags: a link never replaces another, so
// "Single" (flags 0) is the right mode even though several daemons may attach side by side.
use aya::{
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SkLookup, SkMsg, SockOps,
    },
    Ebpf, EbpfLoader,
};
use proxy_common::{
    maps, programs, CaptureStat, ClientKey, Enrolment, InboundPod, OrigDst, SockPairKey,
};
use tracing::{info, warn};

static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("program or map {0} missing from the eBPF object")]
    Missing(&'static str),
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
}

/// Counters of what the connect4 program decided, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct CaptureCounts {
    pub redirected: u64,
    pub bypass_fail_open: u64,
    pub refused_fail_closed: u64,
    pub netns_mismatch: u64,
    pub not_listening: u64,
    pub bind_refused: u64,
    pub ipv6_direct: u64,
    pub ipv6_refused: u64,
    pub too_deep: u64,
    pub foreign_listener: u64,
    pub sockmap_paired: u64,
    pub sockmap_fallback: u64,
    pub sockmap_budget_spent: u64,
    pub autobind_refused: u64,
    pub inbound_redirected: u64,
    pub inbound_from_node: u64,
    pub inbound_bypass_fail_open: u64,
    pub inbound_refused_fail_closed: u64,
}

impl CaptureCounts {
    /// (metric label, value) of every decision.
    pub fn labelled(&self) -> [(&'static str, u64); 18] {
        [
            ("redirected", self.redirected),
            ("fail_open_bypass", self.bypass_fail_open),
            ("fail_closed_refused", self.refused_fail_closed),
            ("netns_mismatch", self.netns_mismatch),
            ("not_listening", self.not_listening),
            ("bind_refused", self.bind_refused),
            ("ipv6_direct", self.ipv6_direct),
            ("ipv6_refused", self.ipv6_refused),
            ("too_deep", self.too_deep),
            ("foreign_listener", self.foreign_listener),
            ("sockmap_paired", self.sockmap_paired),
            ("sockmap_fallback", self.sockmap_fallback),
            ("sockmap_budget_spent", self.sockmap_budget_spent),
            ("autobind_refused", self.autobind_refused),
            ("inbound_redirected", self.inbound_redirected),
            ("inbound_from_node", self.inbound_from_node),
            ("inbound_fail_open_bypass", self.inbound_bypass_fail_open),
            (
                "inbound_fail_closed_refused",
                self.inbound_refused_fail_closed,
            ),
        ]
    }
}

/// Ids of what is loaded, for /config_dump.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadedInfo {
    pub pin_dir: PathBuf,
    pub cgroup_root: PathBuf,
    pub programs: Vec<(String, u32)>,
    /// Map name → kernel map id (for bpftool).
    pub maps: Vec<(String, u32)>,
    pub adopted_previous: bool,
}

/// What `load_and_attach` gives: the attachment (owned by the app, detached at shutdown),
/// the enrolment maps (owned by the enroller) and the eBPF log reader.
pub struct Loaded {
    pub attached: Attached,
    pub enrolment: EnrolmentMaps,
    /// The sk_lookup program and its maps, for the enroller to attach per pod.
    pub inbound: InboundCapture,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// The attached programs and their pinned links.
pub struct Attached {
    _ebpf: Ebpf,
    links: Vec<(PathBuf, PinnedLink)>,
    pub info: LoadedInfo,
}

/// Handles the enrolment side writes through (one owner).
pub struct EnrolmentMaps(Entries);

// One value per daemon, owned by the enroller: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Entries {
    Kernel {
        enrolled: HashMap<MapData, u64, Enrolment>,
        client_dst: HashMap<MapData, ClientKey, OrigDst>,
        sock_dst: HashMap<MapData, u64, OrigDst>,
    },
    /// `--capture iptables`: no programs read the entries; the enroller keeps them in
    /// memory so its pod states (listening, waiting, fail mode) read the same.
    Memory(std::collections::BTreeMap<u64, Enrolment>),
}

/// Read-only handle the data path uses to find a connection's original destination.
pub struct OrigDstTable {
    map: HashMap<MapData, ClientKey, OrigDst>,
}

impl crate::proxy::OrigDstLookup for OrigDstTable {
    fn lookup(&self, key: &ClientKey, _socket: std::os::fd::BorrowedFd<'_>) -> Option<OrigDst> {
        self.map.get(key, 0).ok()
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<Map, BpfError> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

impl Attached {
    /// A second, independent handle on the original-destination map for the data path.
    pub fn orig_dst_table(&self) -> Result<OrigDstTable, BpfError> {
        let name = maps::CLIENT_ORIG_DST;
        let map = open_pinned(&self.info.pin_dir, name)?;
        Ok(OrigDstTable {
            map: HashMap::try_from(map).map_err(map_err(name))?,
        })
    }

    /// Independent read-only handles on the maps, for the metrics endpoint.
    pub fn map_stats(&self) -> Result<MapStats, BpfError> {
        let dir = &self.info.pin_dir;
        Ok(MapStats {
            enrolled: HashMap::try_from(open_pinned(dir, maps::ENROLLED)?)
                .map_err(map_err(maps::ENROLLED))?,
            client_dst: HashMap::try_from(open_pinned(dir, maps::CLIENT_ORIG_DST)?)
                .map_err(map_err(maps::CLIENT_ORIG_DST))?,
            sock_dst: HashMap::try_from(open_pinned(dir, maps::SOCK_ORIG_DST)?)
                .map_err(map_err(maps::SOCK_ORIG_DST))?,
            stats: PerCpuArray::try_from(open_pinned(dir, maps::CAPTURE_STATS)?)
                .map_err(map_err(maps::CAPTURE_STATS))?,
        })
    }

    /// Detaches the programs and removes every pin: pods connect directly from now on.
    pub fn detach(self) {
        for (path, link) in self.links {
            match link.unpin() {
                Ok(fd_link) => drop(fd_link),
                Err(e) => warn!(path = %path.display(), error = %e, "unpinning link"),
            }
        }
        // The inbound program's link on each pod's network namespace.
        if let Ok(dir) = fs::read_dir(&self.info.pin_dir) {
            for entry in dir.flatten() {
                if entry.file_name().to_string_lossy().starts_with("inbound_") {
                    if let Ok(link) = PinnedLink::from_pin(entry.path()) {
                        if let Ok(fd_link) = link.unpin() {
                            drop(fd_link);
                        }
                    }
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        for name in maps::ALL {
            let _ = fs::remove_file(self.info.pin_dir.join(name));
        }
        let _ = fs::remove_dir(&self.info.pin_dir);
        info!("eBPF programs detached");
    }
}

impl EnrolmentMaps {
    /// Entries without kernel maps (`--capture iptables`).
    pub fn in_memory() -> Self {
        Self(Entries::Memory(Default::default()))
    }

    pub fn enrol(&mut self, cgroup_id: u64, enrolment: Enrolment) -> Result<(), BpfError> {
        match &mut self.0 {
            Entries::Kernel { enrolled, .. } => enrolled
                .insert(cgroup_id, enrolment, 0)
                .map_err(map_err(maps::ENROLLED)),
            Entries::Memory(m) => {
                m.insert(cgroup_id, enrolment);
                Ok(())
            }
        }
    }

    /// The kernel entry of a cgroup, if any.
    pub fn entry(&self, cgroup_id: u64) -> Option<Enrolment> {
        match &self.0 {
            Entries::Kernel { enrolled, .. } => enrolled.get(&cgroup_id, 0).ok(),
            Entries::Memory(m) => m.get(&cgroup_id).copied(),
        }
    }

    pub fn unenrol(&mut self, cgroup_id: u64) {
        match &mut self.0 {
            Entries::Kernel { enrolled, .. } => {
                let _ = enrolled.remove(&cgroup_id);
            }
            Entries::Memory(m) => {
                m.remove(&cgroup_id);
            }
        }
    }

    pub fn enrolled(&self) -> Vec<(u64, Enrolment)> {
        match &self.0 {
            Entries::Kernel { enrolled, .. } => enrolled.iter().filter_map(Result::ok).collect(),
            Entries::Memory(m) => m.iter().map(|(k, v)| (*k, *v)).collect(),
        }
    }

    /// Drops the connection entries of a network namespace (its pod is gone).
    pub fn forget_netns(&mut self, netns_cookie: u64) -> usize {
        let Entries::Kernel {
            client_dst,
            sock_dst,
            ..
        } = &mut self.0
        else {
            return 0;
        };
        let client_keys: Vec<ClientKey> = client_dst
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.netns_cookie == netns_cookie)
            .map(|(k, _)| k)
            .collect();
        let sock_keys: Vec<u64> = sock_dst
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.netns_cookie == netns_cookie)
            .map(|(k, _)| k)
            .collect();
        for k in &client_keys {
            let _ = client_dst.remove(k);
        }
        for k in &sock_keys {
            let _ = sock_dst.remove(k);
        }
        client_keys.len() + sock_keys.len()
    }
}

/// Read-only handles for metrics: entries per map and the kernel's capture counters.
pub struct MapStats {
    enrolled: HashMap<MapData, u64, Enrolment>,
    client_dst: HashMap<MapData, ClientKey, OrigDst>,
    sock_dst: HashMap<MapData, u64, OrigDst>,
    stats: PerCpuArray<MapData, u64>,
}

impl MapStats {
    /// Entries per map, for metrics and /config_dump.
    pub fn entry_counts(&self) -> [(&'static str, usize); 3] {
        [
            (maps::ENROLLED, self.enrolled.keys().count()),
            (maps::SOCK_ORIG_DST, self.sock_dst.keys().count()),
            (maps::CLIENT_ORIG_DST, self.client_dst.keys().count()),
        ]
    }

    pub fn capture_counts(&self) -> CaptureCounts {
        let sum = |stat: CaptureStat| -> u64 {
            self.stats
                .get(&(stat as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        CaptureCounts {
            redirected: sum(CaptureStat::Redirected),
            bypass_fail_open: sum(CaptureStat::BypassFailOpen),
            refused_fail_closed: sum(CaptureStat::RefusedFailClosed),
            netns_mismatch: sum(CaptureStat::NetnsMismatch),
            not_listening: sum(CaptureStat::NotListening),
            bind_refused: sum(CaptureStat::BindRefused),
            ipv6_direct: sum(CaptureStat::Ipv6Direct),
            ipv6_refused: sum(CaptureStat::Ipv6Refused),
            too_deep: sum(CaptureStat::TooDeep),
            foreign_listener: sum(CaptureStat::ForeignListener),
            sockmap_paired: sum(CaptureStat::SockmapPaired),
            sockmap_fallback: sum(CaptureStat::SockmapFallback),
            sockmap_budget_spent: sum(CaptureStat::SockmapBudgetSpent),
            autobind_refused: sum(CaptureStat::AutobindRefused),
            inbound_redirected: sum(CaptureStat::InboundRedirected),
            inbound_from_node: sum(CaptureStat::InboundFromNode),
            inbound_bypass_fail_open: sum(CaptureStat::InboundBypassFailOpen),
            inbound_refused_fail_closed: sum(CaptureStat::InboundRefusedFailClosed),
        }
    }
}

impl MapStats {
    /// Copies the kernel-side numbers into the daemon's gauges; called on each scrape.
    pub fn export(&self, d: &crate::metrics::DaemonMetrics) {
        use crate::metrics::{DecisionLabels, MapLabels};
        for (map, n) in self.entry_counts() {
            d.map_entries
                .get_or_create(&MapLabels { map })
                .set(n as i64);
        }
        for (decision, v) in self.capture_counts().labelled() {
            d.capture_decisions
                .get_or_create(&DecisionLabels { decision })
                .set(v as i64);
        }
    }
}

/// `proxy-daemon uninstall`: unpins every link (the programs detach once no running daemon
/// holds them) and removes the pinned maps and the directory. Returns what was removed.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<String>, BpfError> {
    let entries = match fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(BpfError::Bpffs(format!(
                "reading {}: {e}",
                pin_dir.display()
            )))
        }
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        match PinnedLink::from_pin(&path) {
            Ok(link) => match link.unpin() {
                Ok(fd_link) => {
                    drop(fd_link);
                    removed.push(format!("link {name}"));
                }
                Err(e) => warn!(path = %path.display(), error = %e, "unpinning link"),
            },
            Err(_) => {
                if fs::remove_file(&path).is_ok() {
                    removed.push(format!("map {name}"));
                }
            }
        }
    }
    let _ = fs::remove_dir(pin_dir);
    Ok(removed)
}

/// Makes sure `pin_dir` sits on a bpffs, mounting /sys/fs/bpf when it is not one yet (a
/// fresh boot has none), and creates it.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), BpfError> {
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            // __fsword_t is i64 on x86_64 but not on every arch.
            .map(|s| {
                #[allow(clippy::unnecessary_cast)]
                let magic = s.filesystem_type().0 as i64;
                magic == BPF_FS_MAGIC
            })
            .unwrap_or(false)
    };
    let mount_point = Path::new(BPFFS_MOUNT);
    if pin_dir.starts_with(mount_point) && !is_bpffs(mount_point) {
        fs::create_dir_all(mount_point).map_err(|e| BpfError::Bpffs(e.to_string()))?;
        nix::mount::mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| BpfError::Bpffs(format!("mount -t bpf bpf {BPFFS_MOUNT}: {e}")))?;
        info!("mounted bpffs at {BPFFS_MOUNT}");
    }
    fs::create_dir_all(pin_dir)
        .map_err(|e| BpfError::Bpffs(format!("creating {}: {e}", pin_dir.display())))?;
    if !is_bpffs(pin_dir) {
        return Err(BpfError::Bpffs(format!(
            "{} is not on a bpf filesystem (mount -t bpf bpf <dir>)",
            pin_dir.display()
        )));
    }
    Ok(())
}

/// The enrolment value of the first release (16 bytes: netns cookie, pod id, listener
/// port, fail mode, padding), as pinned by a daemon of that version.
const ENROLMENT_V1_SIZE: usize = 16;

/// Enrolment entries of an older layout, read before its pins are replaced.
fn read_old_enrolments(pin_dir: &Path) -> Vec<(u64, Enrolment)> {
    let Ok(data) = MapData::from_pin(pin_dir.join(maps::ENROLLED)) else {
        return Vec::new();
    };
    let Ok(map) = Map::from_map_data(data) else {
        return Vec::new();
    };
    // This layout (another map changed): the entries as they are, each still "not
    // listening" until this daemon's listener replaces it.
    let map = match HashMap::<_, u64, Enrolment>::try_from(map) {
        Ok(current) => {
            return current
                .iter()
                .filter_map(Result::ok)
                .map(|(cgroup_id, e)| {
                    (
                        cgroup_id,
                        Enrolment {
                            listener_token: 0,
                            flags: 0,
                            ..e
                        },
                    )
                })
                .collect()
        }
        Err(_) => {
            match MapData::from_pin(pin_dir.join(maps::ENROLLED)).and_then(Map::from_map_data) {
                Ok(map) => map,
                Err(_) => return Vec::new(),
            }
        }
    };
    let Ok(old) = HashMap::<_, u64, [u8; ENROLMENT_V1_SIZE]>::try_from(map) else {
        // Neither this layout nor the first one: nothing we can carry over.
        return Vec::new();
    };
    old.iter()
        .filter_map(Result::ok)
        .map(|(cgroup_id, v)| {
            let netns_cookie = u64::from_ne_bytes(v[0..8].try_into().unwrap_or_default());
            let pod_id = u32::from_ne_bytes(v[8..12].try_into().unwrap_or_default());
            let listener_port = u16::from_ne_bytes([v[12], v[13]]);
            (
                cgroup_id,
                Enrolment {
                    netns_cookie,
                    pod_id,
                    // The old listener carries no token: "not listening" until this
                    // daemon's own listener replaces the entry; meanwhile the fail mode.
                    listener_token: 0,
                    listener_port,
                    fail_mode: v[14],
                    flags: 0,
                    _pad: 0,
                },
            )
        })
        .collect()
}

/// Whether every map pinned in `pin_dir` has the key size, value size and capacity this
/// build's programs expect. The loader reuses a pinned map by name without comparing
/// (found by the upgrade test: a first-release map made the verifier refuse the programs,
/// so the daemon could not start), hence the check here.
fn pins_compatible(pin_dir: &Path) -> Result<(), String> {
    use proxy_common::{CAPTURE_STAT_SLOTS, MAX_ENROLLED, MAX_TRACKED_CONNECTIONS};
    let size = |n: usize| n as u32;
    let expected = [
        (
            maps::ENROLLED,
            8,
            size(std::mem::size_of::<Enrolment>()),
            MAX_ENROLLED,
        ),
        (
            maps::SOCK_ORIG_DST,
            8,
            size(std::mem::size_of::<OrigDst>()),
            MAX_TRACKED_CONNECTIONS,
        ),
        (
            maps::CLIENT_ORIG_DST,
            size(std::mem::size_of::<ClientKey>()),
            size(std::mem::size_of::<OrigDst>()),
            MAX_TRACKED_CONNECTIONS,
        ),
        (maps::CAPTURE_STATS, 4, 8, CAPTURE_STAT_SLOTS),
        (
            maps::INBOUND_PODS,
            4,
            size(std::mem::size_of::<InboundPod>()),
            MAX_ENROLLED,
        ),
        // A sockhash's values are socket descriptors (4 bytes) as the kernel sees them.
        (
            maps::INBOUND_LISTENERS,
            size(std::mem::size_of::<proxy_common::ListenerKey>()),
            4,
            2 * MAX_ENROLLED,
        ),
        (maps::NODE_ADDRS, 4, 1, proxy_common::MAX_NODE_ADDRS),
    ];
    for (name, key, value, max) in expected {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(|e| format!("{name}: {e}"))?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        if found != (key, value, max) {
            return Err(format!(
                "{name}: key/value size and capacity {found:?}, this build needs {:?}",
                (key, value, max)
            ));
        }
    }
    Ok(())
}

fn load_object(pin_dir: &Path) -> Result<Ebpf, BpfError> {
    let load = || {
        EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(PROGRAM_OBJECT)
    };
    let why = match pins_compatible(pin_dir) {
        Ok(()) => match load() {
            Ok(ebpf) => return Ok(ebpf),
            Err(e) => e.to_string(),
        },
        Err(why) => why,
    };
    // Maps pinned by an older build may have another layout; they are only reusable if
    // compatible. Carry the enrolments over (each pod keeps its fail mode: a fail-closed
    // pod must not go direct while this daemon starts), drop the stale pins (programs
    // still attached keep their own copies alive) and load fresh.
    let carried = read_old_enrolments(pin_dir);
    warn!(reason = %why, carried = carried.len(), "pinned maps not reusable; replacing them, carrying the enrolments over");
    for name in maps::ALL {
        let _ = fs::remove_file(pin_dir.join(name));
    }
    let mut ebpf = load()?;
    if let Some(map) = ebpf.map_mut(maps::ENROLLED) {
        if let Ok(mut enrolled) = HashMap::<_, u64, Enrolment>::try_from(map) {
            for (cgroup_id, e) in &carried {
                if let Err(err) = enrolled.insert(cgroup_id, e, 0) {
                    warn!(cgroup_id, error = %err, "carrying an enrolment over");
                }
            }
        }
    }
    if !carried.is_empty() {
        info!(
            entries = carried.len(),
            "enrolments carried over from an older map layout (fail mode in force until each pod's listener is up)"
        );
    }
    Ok(ebpf)
}

/// Attaches `link` and replaces whatever link an earlier daemon pinned at `path`: new one
/// first, old one after, so capture never has a gap.
fn pin_replacing(fd_link: FdLink, path: &Path) -> Result<(PinnedLink, bool), BpfError> {
    let mut adopted = false;
    if path.exists() {
        match PinnedLink::from_pin(path) {
            Ok(old) => {
                adopted = true;
                if let Ok(old) = old.unpin() {
                    drop(old);
                }
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "stale pin is not a link; removing");
                let _ = fs::remove_file(path);
            }
        }
    }
    let pinned = fd_link.pin(path).map_err(|e| BpfError::Pin {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok((pinned, adopted))
}

/// Loads program `$name` (of aya type `$ty`), attaches it to the cgroup and returns its
/// fd-based link with the program's id. A macro because aya's program types share these
/// methods without a common trait.
macro_rules! load_attach {
    ($ebpf:expr, $ty:ty, $name:expr, $cgroup:expr, $pin_dir:expr) => {{
        let name: &'static str = $name;
        let perr = |source| BpfError::Program { name, source };
        let program: &mut $ty = $ebpf
            .program_mut(name)
            .ok_or(BpfError::Missing(name))?
            .try_into()
            .map_err(perr)?;
        program.load().map_err(perr)?;
        let link_id = program
            .attach($cgroup, CgroupAttachMode::Single)
            .map_err(perr)?;
        let link = program.take_link(link_id).map_err(perr)?;
        let fd_link = FdLink::try_from(link).map_err(|e| BpfError::Pin {
            path: $pin_dir.to_owned(),
            message: format!("{name} link is not fd-based: {e}"),
        })?;
        (fd_link, program.info().ok().map(|info| info.id()))
    }};
}

/// Loads the programs, attaches them to `cgroup_root` and pins links and maps in `pin_dir`.
pub fn load_and_attach(cgroup_root: &Path, pin_dir: &Path) -> Result<Loaded, BpfError> {
    ensure_bpffs(pin_dir)?;
    let mut ebpf = load_object(pin_dir)?;
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(logger) => Some(logger),
        Err(e) => {
            warn!(error = %e, "eBPF log forwarding unavailable");
            None
        }
    };
    let cgroup = fs::File::open(cgroup_root).map_err(|source| BpfError::Cgroup {
        path: cgroup_root.to_owned(),
        source,
    })?;

    // The sk_msg program goes on this daemon's own sockmap before sock_ops can put any
    // socket in it (and nothing is, until the enroller flags a pod for it).
    {
        let name = programs::SK_MSG;
        let perr = |source| BpfError::Program { name, source };
        let pairs: SockHash<&MapData, SockPairKey> = SockHash::try_from(
            ebpf.map(maps::SOCK_PAIRS)
                .ok_or(BpfError::Missing(maps::SOCK_PAIRS))?,
        )
        .map_err(map_err(maps::SOCK_PAIRS))?;
        let pairs_fd = pairs.fd().try_clone().map_err(|e| BpfError::Map {
            name: maps::SOCK_PAIRS,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "dup",
                io_error: e,
            }),
        })?;
        let program: &mut SkMsg = ebpf
            .program_mut(name)
            .ok_or(BpfError::Missing(name))?
            .try_into()
            .map_err(perr)?;
        program.load().map_err(perr)?;
        program.attach(&pairs_fd).map_err(perr)?;
    }
    // Attach every new link before any old one is dropped: no connect slips through.
    let cgroup = cgroup.as_fd();
    let new_links = [
        (
            programs::CONNECT4,
            load_attach!(ebpf, CgroupSockAddr, programs::CONNECT4, cgroup, pin_dir),
        ),
        (
            programs::GETPEERNAME4,
            load_attach!(
                ebpf,
                CgroupSockAddr,
                programs::GETPEERNAME4,
                cgroup,
                pin_dir
            ),
        ),
        (
            programs::SOCK_OPS,
            load_attach!(ebpf, SockOps, programs::SOCK_OPS, cgroup, pin_dir),
        ),
        (
            programs::CONNECT6,
            load_attach!(ebpf, CgroupSockAddr, programs::CONNECT6, cgroup, pin_dir),
        ),
        (
            programs::GETPEERNAME6,
            load_attach!(
                ebpf,
                CgroupSockAddr,
                programs::GETPEERNAME6,
                cgroup,
                pin_dir
            ),
        ),
        (
            programs::BIND4,
            load_attach!(ebpf, CgroupSockAddr, programs::BIND4, cgroup, pin_dir),
        ),
        (
            programs::BIND6,
            load_attach!(ebpf, CgroupSockAddr, programs::BIND6, cgroup, pin_dir),
        ),
        (
            programs::POST_BIND4,
            load_attach!(ebpf, CgroupSock, programs::POST_BIND4, cgroup, pin_dir),
        ),
        (
            programs::POST_BIND6,
            load_attach!(ebpf, CgroupSock, programs::POST_BIND6, cgroup, pin_dir),
        ),
    ];
    let mut links = Vec::new();
    let mut program_ids = Vec::new();
    let mut adopted_previous = false;
    for (name, (fd_link, program_id)) in new_links {
        let path = pin_dir.join(format!("link_{name}"));
        let (pinned, adopted) = pin_replacing(fd_link, &path)?;
        adopted_previous |= adopted;
        links.push((path, pinned));
        if let Some(id) = program_id {
            program_ids.push((name.to_string(), id));
        }
    }

    let inbound = InboundCapture::load(&mut ebpf, pin_dir)?;
    if let Some(id) = inbound.program_id {
        program_ids.push((programs::SK_LOOKUP.to_string(), id));
    }
    let map_ids: Vec<(String, u32)> = ebpf
        .maps()
        .filter_map(|(name, map)| {
            let data = match map {
                aya::maps::Map::HashMap(d)
                | aya::maps::Map::LruHashMap(d)
                | aya::maps::Map::PerCpuArray(d)
                | aya::maps::Map::Array(d)
                | aya::maps::Map::PerCpuHashMap(d)
                | aya::maps::Map::RingBuf(d)
                | aya::maps::Map::PerfEventArray(d) => d,
                _ => return None,
            };
            Some((name.to_string(), data.info().ok()?.id()))
        })
        .collect();
    let take =
        |ebpf: &mut Ebpf, name: &'static str| ebpf.take_map(name).ok_or(BpfError::Missing(name));
    let enrolment = EnrolmentMaps(Entries::Kernel {
        enrolled: HashMap::try_from(take(&mut ebpf, maps::ENROLLED)?)
            .map_err(map_err(maps::ENROLLED))?,
        client_dst: HashMap::try_from(take(&mut ebpf, maps::CLIENT_ORIG_DST)?)
            .map_err(map_err(maps::CLIENT_ORIG_DST))?,
        sock_dst: HashMap::try_from(take(&mut ebpf, maps::SOCK_ORIG_DST)?)
            .map_err(map_err(maps::SOCK_ORIG_DST))?,
    });
    info!(
        cgroup_root = %cgroup_root.display(),
        pin_dir = %pin_dir.display(),
        adopted_previous,
        "eBPF programs attached"
    );
    Ok(Loaded {
        attached: Attached {
            _ebpf: ebpf,
            links,
            info: LoadedInfo {
                pin_dir: pin_dir.to_owned(),
                cgroup_root: cgroup_root.to_owned(),
                programs: program_ids,
                maps: map_ids,
                adopted_previous,
            },
        },
        enrolment,
        inbound,
        logger,
    })
}

/// Inbound capture: the sk_lookup program, attached to each captured pod's network
/// namespace by the enroller, and the maps it reads.
///
/// Each link is pinned (`inbound_<netns inode>`), so capture outlives the daemon as the
/// outbound side does: while no daemon listens, a fail-closed pod's inbound connections
/// are refused and a fail-open pod's reach the app. A successor daemon replaces the
/// link and the listener entry of each pod as it enrols it.
pub struct InboundCapture {
    program: SkLookup,
    program_id: Option<u32>,
    pods: HashMap<MapData, u32, InboundPod>,
    listeners: SockHash<MapData, proxy_common::ListenerKey>,
    node_addrs: HashMap<MapData, u32, u8>,
    pin_dir: PathBuf,
}

/// Pin of the inbound link of the network namespace with this inode.
fn inbound_link_pin(pin_dir: &Path, netns_inode: u64) -> PathBuf {
    pin_dir.join(format!("inbound_{netns_inode}"))
}

impl InboundCapture {
    fn load(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Self, BpfError> {
        let name = programs::SK_LOOKUP;
        let perr = |source| BpfError::Program { name, source };
        let program: &mut SkLookup = ebpf
            .program_mut(name)
            .ok_or(BpfError::Missing(name))?
            .try_into()
            .map_err(perr)?;
        program.load().map_err(perr)?;
        let info = program.info().map_err(perr)?;
        let program_id = Some(info.id());
        // An owned handle on the loaded program, so the enroller attaches without the
        // whole object.
        let program =
            SkLookup::from_program_info(info, std::borrow::Cow::Borrowed(name)).map_err(perr)?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(BpfError::Missing(name))
        };
        Ok(Self {
            program,
            program_id,
            pods: HashMap::try_from(take(ebpf, maps::INBOUND_PODS)?)
                .map_err(map_err(maps::INBOUND_PODS))?,
            listeners: SockHash::try_from(take(ebpf, maps::INBOUND_LISTENERS)?)
                .map_err(map_err(maps::INBOUND_LISTENERS))?,
            node_addrs: HashMap::try_from(take(ebpf, maps::NODE_ADDRS)?)
                .map_err(map_err(maps::NODE_ADDRS))?,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Steers a pod's inbound connections to `listener` (plaintext) and its HBONE
    /// connections to `hbone`: entries and listeners first, then the program on its
    /// namespace (replacing a predecessor's link).
    pub fn capture(
        &mut self,
        netns: std::os::fd::BorrowedFd<'_>,
        netns_inode: u64,
        pod_ip: std::net::Ipv4Addr,
        pod: InboundPod,
        listener: std::os::fd::BorrowedFd<'_>,
        hbone: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(), BpfError> {
        let key = u32::from(pod_ip).to_be();
        let listener_key = |kind| proxy_common::ListenerKey { ip_be: key, kind };
        self.listeners
            .insert(
                listener_key(proxy_common::LISTENER_PLAINTEXT),
                listener.as_raw_fd(),
                0,
            )
            .map_err(map_err(maps::INBOUND_LISTENERS))?;
        if let Some(hbone) = hbone {
            self.listeners
                .insert(
                    listener_key(proxy_common::LISTENER_HBONE),
                    hbone.as_raw_fd(),
                    0,
                )
                .map_err(map_err(maps::INBOUND_LISTENERS))?;
        }
        self.pods
            .insert(key, pod, 0)
            .map_err(map_err(maps::INBOUND_PODS))?;
        let name = programs::SK_LOOKUP;
        let perr = |source| BpfError::Program { name, source };
        let link_id = self.program.attach(netns).map_err(perr)?;
        let link = self.program.take_link(link_id).map_err(perr)?;
        let fd_link = FdLink::from(link);
        let path = inbound_link_pin(&self.pin_dir, netns_inode);
        let (pinned, _) = pin_replacing(fd_link, &path)?;
        // The pin holds the link; our handle is not needed.
        drop(pinned);
        Ok(())
    }

    /// Replaces a steered pod's entry (its fail mode changed).
    pub fn update(&mut self, pod_ip: std::net::Ipv4Addr, pod: InboundPod) -> Result<(), BpfError> {
        self.pods
            .insert(u32::from(pod_ip).to_be(), pod, 0)
            .map_err(map_err(maps::INBOUND_PODS))
    }

    /// Stops steering a pod's inbound connections (it left, or is no longer captured).
    pub fn release(&mut self, netns_inode: u64, pod_ip: Option<std::net::Ipv4Addr>) {
        let path = inbound_link_pin(&self.pin_dir, netns_inode);
        if let Ok(link) = PinnedLink::from_pin(&path) {
            if let Ok(fd_link) = link.unpin() {
                drop(fd_link);
            }
        }
        let _ = fs::remove_file(&path);
        if let Some(ip) = pod_ip {
            self.forget(u32::from(ip).to_be());
        }
    }

    /// Removes the links of namespaces not in `live` (pods gone while no daemon ran).
    pub fn release_others(&mut self, live: &std::collections::HashSet<u64>) -> usize {
        let Ok(dir) = fs::read_dir(&self.pin_dir) else {
            return 0;
        };
        let stale: Vec<u64> = dir
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("inbound_")?
                    .parse::<u64>()
                    .ok()
            })
            .filter(|ino| !live.contains(ino))
            .collect();
        for ino in &stale {
            self.release(*ino, None);
        }
        stale.len()
    }

    /// Drops the pod entries whose address is not in `live`.
    pub fn forget_pods_except(&mut self, live: &std::collections::HashSet<std::net::Ipv4Addr>) {
        let keys: Vec<u32> = self.pods.keys().filter_map(Result::ok).collect();
        for key in keys {
            if !live.contains(&std::net::Ipv4Addr::from(u32::from_be(key))) {
                self.forget(key);
            }
        }
    }

    /// Drops a pod's entry and both its listeners' (by its address, network order).
    fn forget(&mut self, ip_be: u32) {
        let _ = self.pods.remove(&ip_be);
        for kind in [
            proxy_common::LISTENER_PLAINTEXT,
            proxy_common::LISTENER_HBONE,
        ] {
            let _ = self
                .listeners
                .remove(&proxy_common::ListenerKey { ip_be, kind });
        }
    }

    /// The node's own addresses: connections from them (kubelet probes) reach the app.
    pub fn set_node_addrs(&mut self, addrs: &std::collections::BTreeSet<std::net::Ipv4Addr>) {
        let keys: Vec<u32> = self.node_addrs.keys().filter_map(Result::ok).collect();
        for key in keys {
            if !addrs.contains(&std::net::Ipv4Addr::from(u32::from_be(key))) {
                let _ = self.node_addrs.remove(&key);
            }
        }
        for addr in addrs.iter().take(proxy_common::MAX_NODE_ADDRS as usize) {
            if let Err(e) = self.node_addrs.insert(u32::from(*addr).to_be(), 1, 0) {
                warn!(%addr, error = %e, "recording a node address failed");
            }
        }
    }
}
