//! Hitless hand-over between two daemons on one node (a DaemonSet rolling update, or an
//! operator starting a new binary by hand).
//!
//! The running daemon serves a Unix socket (SOCK_SEQPACKET, one message per item) named
//! after its pin directory. A daemon that starts finds it, asks for everything it listens
//! on — the outbound listener in every enrolled pod's network namespace (with its kernel
//! token) and the admin, metrics and health sockets — and receives *the same sockets*
//! (SCM_RIGHTS). Nothing is closed and re-bound, so no connection waiting in a backlog is
//! lost and no connect is refused. Once the new daemon is ready it says so; the old one
//! then stops accepting, drains what it has in flight, and exits without detaching.
use std::{
    collections::HashMap,
    io::{IoSlice, IoSliceMut},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

const HELLO: &[u8] = b"HANDOVER 1";
const END: &[u8] = b"END";
const READY: &[u8] = b"READY";
/// A new daemon that is not ready this long after taking the sockets gives up waiting and
/// lets the old one go anyway (it accepts on the same sockets meanwhile).
pub const READY_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over peer refused: {0}")]
    Peer(String),
    #[error("hand-over socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("hand-over protocol: {0}")]
    Protocol(String),
}

/// What a handed-over socket is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Item {
    Admin,
    Metrics,
    Health,
    /// A pod's outbound listener.
    Pod {
        uid: String,
        netns_inode: u64,
        cgroup_id: u64,
        /// The listener's SO_PRIORITY token, which its kernel entry carries.
        token: u32,
    },
    /// A pod's HBONE or plaintext inbound listener, on the pod's address.
    PodInbound {
        uid: String,
        netns_inode: u64,
        addr: std::net::SocketAddr,
    },
    /// The node's own root certificate and key (PEM, in a sealed memfd), when no CA is
    /// configured: the successor issues under the same root.
    NodeRoot,
    /// A kind a newer daemon hands over that this one does not know (a rollback): its
    /// socket is closed and the hand-over goes on.
    #[serde(other)]
    Unknown,
}

/// What this daemon listens on, kept current by the app (ports) and the enroller (pods),
/// for a successor to take.
#[derive(Default)]
pub struct Table {
    items: Mutex<Vec<(Item, Arc<OwnedFd>)>>,
}

impl Table {
    pub fn set(&self, item: Item, fd: Arc<OwnedFd>) {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        items.retain(|(i, _)| !same_slot(i, &item));
        items.push((item, fd));
    }

    pub fn remove_pod(&self, uid: &str) {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        items.retain(|(i, _)| match i {
            Item::Pod { uid: u, .. } | Item::PodInbound { uid: u, .. } => u != uid,
            _ => true,
        });
    }

    fn snapshot(&self) -> Vec<(Item, Arc<OwnedFd>)> {
        self.items.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn same_slot(a: &Item, b: &Item) -> bool {
    match (a, b) {
        (Item::Pod { uid: x, .. }, Item::Pod { uid: y, .. }) => x == y,
        (
            Item::PodInbound {
                uid: x, addr: ax, ..
            },
            Item::PodInbound {
                uid: y, addr: ay, ..
            },
        ) => x == y && ax == ay,
        _ => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}

/// Where the daemon using `pin_dir` serves its hand-over socket: one per pin directory, so
/// that only daemons sharing programs and maps hand over to each other.
pub fn socket_path(run_dir: &Path, pin_dir: &Path) -> PathBuf {
    run_dir.join(format!("handover-{:016x}.sock", pin_dir_hash(pin_dir)))
}

/// FNV-1a of the pin directory's path.
fn pin_dir_hash(pin_dir: &Path) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in pin_dir.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Sockets taken from the previous daemon.
pub struct Taken {
    pub ports: HashMap<&'static str, OwnedFd>,
    pub pods: HashMap<String, TakenListener>,
    /// Pods' HBONE and plaintext inbound listeners, by pod uid.
    pub inbound: HashMap<String, Vec<TakenInbound>>,
    /// The node's own root (PEM), if the previous daemon had one.
    pub node_root: Option<String>,
    /// The connection to the previous daemon, to say "ready" on.
    conn: OwnedFd,
}

/// The enroller's side of a hand-over: where to publish its listeners, and those taken
/// from a predecessor.
pub struct PodListeners {
    pub table: Arc<Table>,
    pub taken: HashMap<String, TakenListener>,
    pub taken_inbound: HashMap<String, Vec<TakenInbound>>,
}

/// A pod's inbound listener taken from the previous daemon: the very socket, so the
/// kernel's steering entry and the connections in its backlog stay as they are.
pub struct TakenInbound {
    pub netns_inode: u64,
    pub addr: std::net::SocketAddr,
    pub fd: OwnedFd,
}

pub struct TakenListener {
    pub netns_inode: u64,
    pub cgroup_id: u64,
    pub token: u32,
    pub fd: OwnedFd,
}

impl Taken {
    /// Tells the previous daemon to stop accepting and drain.
    pub fn confirm(self) {
        if let Err(e) = socket::send(self.conn.as_raw_fd(), READY, MsgFlags::empty()) {
            warn!(error = %e, "telling the previous daemon to drain");
        }
    }
}

/// Whether the other end of a hand-over connection may have our sockets (or give us its
/// own): root, as we are, and — where its /proc entry can be seen from here — running an
/// executable of our name (not the same file: a successor is a newer build). A process
/// that reached the socket file any other way gets nothing, and is counted.
fn check_peer(conn: &OwnedFd) -> Result<(), HandoverError> {
    let refuse = |why: String| {
        crate::metrics::HANDOVER_PEERS_REFUSED.inc();
        Err(HandoverError::Peer(why))
    };
    let creds = match socket::getsockopt(conn, socket::sockopt::PeerCredentials) {
        Ok(c) => c,
        Err(e) => return refuse(format!("no peer credentials: {e}")),
    };
    let ours = nix::unistd::geteuid().as_raw();
    if creds.uid() != 0 || creds.uid() != ours {
        return refuse(format!("uid {} (pid {})", creds.uid(), creds.pid()));
    }
    let exe_name = |path: &str| {
        std::fs::read_link(path)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .map(|n| n.trim_end_matches(" (deleted)").to_string())
    };
    match (
        exe_name(&format!("/proc/{}/exe", creds.pid())),
        exe_name("/proc/self/exe"),
    ) {
        (Some(theirs), Some(mine)) if theirs != mine => {
            refuse(format!("pid {} runs {theirs:?}, not {mine:?}", creds.pid()))
        }
        // Not visible from this pid namespace: uid 0 is all that can be known.
        _ => Ok(()),
    }
}

fn seqpacket() -> Result<OwnedFd, nix::errno::Errno> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Asks a running daemon for its sockets. None when there is none (the usual start).
pub fn take(path: &Path) -> Result<Option<Taken>, HandoverError> {
    let err = |source| HandoverError::Socket {
        path: path.to_owned(),
        source,
    };
    if !path.exists() {
        return Ok(None);
    }
    let conn = seqpacket().map_err(err)?;
    let addr = UnixAddr::new(path).map_err(err)?;
    match socket::connect(conn.as_raw_fd(), &addr) {
        Ok(()) => {}
        // A socket file left by a daemon that is gone.
        Err(nix::errno::Errno::ECONNREFUSED) | Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(err(e)),
    }
    // What it hands us becomes our listeners: only another daemon may.
    check_peer(&conn)?;
    let timeout = nix::sys::time::TimeVal::new(5, 0);
    let _ = socket::setsockopt(&conn, socket::sockopt::ReceiveTimeout, &timeout);
    socket::send(conn.as_raw_fd(), HELLO, MsgFlags::empty()).map_err(err)?;
    let mut taken = Taken {
        ports: HashMap::new(),
        pods: HashMap::new(),
        inbound: HashMap::new(),
        node_root: None,
        conn,
    };
    loop {
        let (data, fd) = receive(taken.conn.as_raw_fd()).map_err(err)?;
        if data == END {
            break;
        }
        let item: Item = serde_json::from_slice(&data)
            .map_err(|e| HandoverError::Protocol(format!("item: {e}")))?;
        let fd = fd.ok_or_else(|| HandoverError::Protocol(format!("{item:?} without a socket")))?;
        match item {
            Item::Admin => drop(taken.ports.insert("admin", fd)),
            Item::Metrics => drop(taken.ports.insert("metrics", fd)),
            Item::Health => drop(taken.ports.insert("health", fd)),
            Item::Pod {
                uid,
                netns_inode,
                cgroup_id,
                token,
            } => drop(taken.pods.insert(
                uid,
                TakenListener {
                    netns_inode,
                    cgroup_id,
                    token,
                    fd,
                },
            )),
            Item::PodInbound {
                uid,
                netns_inode,
                addr,
            } => taken.inbound.entry(uid).or_default().push(TakenInbound {
                netns_inode,
                addr,
                fd,
            }),
            Item::NodeRoot => taken.node_root = read_sealed(fd),
            Item::Unknown => {}
        }
    }
    info!(
        ports = taken.ports.len(),
        pod_listeners = taken.pods.len(),
        inbound_listeners = taken.inbound.values().map(Vec::len).sum::<usize>(),
        "took over the running daemon's sockets"
    );
    Ok(Some(taken))
}

/// `text` in an anonymous memory file, sealed against change, to hand over: secrets
/// passed this way never touch a file system.
pub fn sealed(text: &str) -> std::io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(
        c"proxy-daemon-handover",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut &file, text.as_bytes())?;
    let seals = nix::fcntl::SealFlag::F_SEAL_SEAL
        | nix::fcntl::SealFlag::F_SEAL_SHRINK
        | nix::fcntl::SealFlag::F_SEAL_GROW
        | nix::fcntl::SealFlag::F_SEAL_WRITE;
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_ADD_SEALS(seals))?;
    Ok(OwnedFd::from(file))
}

/// What a sealed memory file holds (read from its start, whatever its offset), at most
/// 64 KiB.
fn read_sealed(fd: OwnedFd) -> Option<String> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::File::from(fd);
    let mut buf = vec![0u8; 64 * 1024];
    let n = file.read_at(&mut buf, 0).ok()?;
    buf.truncate(n);
    String::from_utf8(buf).ok()
}

/// One message and the socket it carries, if any.
fn receive(fd: RawFd) -> Result<(Vec<u8>, Option<OwnedFd>), nix::errno::Errno> {
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut received = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: the kernel just installed this descriptor for us; nobody else
                // owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if received.is_none() {
                    received = Some(owned);
                }
            }
        }
    }
    let n = msg.bytes;
    if n == 0 {
        return Err(nix::errno::Errno::ECONNRESET);
    }
    buf.truncate(n);
    Ok((buf, received))
}

/// Where a hand-over stands, as the predecessor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Serving,
    /// A successor holds our sockets and is getting ready: both accept meanwhile.
    Taken,
    /// The successor is ready: stop accepting, drain, leave.
    Done,
}

/// Serves the hand-over socket until a successor has taken the sockets and said it is
/// ready, reporting each stage on `stage`. Runs on its own thread: the exchange is a few
/// blocking calls, once in the daemon's life.
pub fn serve(path: PathBuf, table: Arc<Table>, stage: tokio::sync::watch::Sender<Stage>) {
    let result = std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            if let Err(e) = serve_blocking(&path, &table, &stage) {
                warn!(path = %path.display(), error = %e, "hand-over socket stopped; a new daemon will start beside this one instead of taking over");
            }
        });
    if let Err(e) = result {
        warn!(error = %e, "no hand-over thread");
    }
}

fn serve_blocking(
    path: &Path,
    table: &Table,
    stage: &tokio::sync::watch::Sender<Stage>,
) -> Result<(), HandoverError> {
    let err = |source| HandoverError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // This daemon has taken over from whoever served here before (or they are gone).
    let _ = std::fs::remove_file(path);
    let listener = seqpacket().map_err(err)?;
    socket::bind(listener.as_raw_fd(), &UnixAddr::new(path).map_err(err)?).map_err(err)?;
    // The successor binds its own socket at the same path; ours is removed only if the
    // path still names it.
    let ours = std::fs::metadata(path)
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    // Only root may connect: whoever does receives every listener of the node.
    let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
    socket::listen(&listener, socket::Backlog::new(4).map_err(err)?).map_err(err)?;
    loop {
        let raw = socket::accept(listener.as_raw_fd()).map_err(err)?;
        // SAFETY: accept returned a new descriptor that we now own.
        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
        match hand_over(&conn, table, stage) {
            Ok(()) => {
                info!("a new daemon took this daemon's sockets and is ready: draining");
                let now = std::fs::metadata(path)
                    .ok()
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
                if now.is_some() && now == ours {
                    let _ = std::fs::remove_file(path);
                }
                let _ = stage.send(Stage::Done);
                return Ok(());
            }
            Err(e) => {
                warn!(error = %e, "hand-over did not complete; still serving");
                let _ = stage.send(Stage::Serving);
            }
        }
    }
}

fn hand_over(
    conn: &OwnedFd,
    table: &Table,
    stage: &tokio::sync::watch::Sender<Stage>,
) -> Result<(), HandoverError> {
    let perr = |e: nix::errno::Errno| HandoverError::Protocol(e.to_string());
    // Whoever passes receives every listener of the node.
    check_peer(conn)?;
    let timeout = nix::sys::time::TimeVal::new(5, 0);
    let _ = socket::setsockopt(conn, socket::sockopt::ReceiveTimeout, &timeout);
    let (hello, _) = receive(conn.as_raw_fd()).map_err(perr)?;
    if hello != HELLO {
        return Err(HandoverError::Protocol(format!(
            "unexpected greeting {:?}",
            String::from_utf8_lossy(&hello)
        )));
    }
    for (item, fd) in table.snapshot() {
        let data = serde_json::to_vec(&item)
            .map_err(|e| HandoverError::Protocol(format!("encoding {item:?}: {e}")))?;
        let fds = [fd.as_fd().as_raw_fd()];
        socket::sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(&data)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(perr)?;
    }
    socket::send(conn.as_raw_fd(), END, MsgFlags::empty()).map_err(perr)?;
    let _ = stage.send(Stage::Taken);
    // Until the successor is ready both accept on the same sockets; it may take a while
    // (its first configuration load, eBPF attach).
    let wait = nix::sys::time::TimeVal::new(READY_WAIT.as_secs() as i64 + 5, 0);
    let _ = socket::setsockopt(conn, socket::sockopt::ReceiveTimeout, &wait);
    let (ready, _) = receive(conn.as_raw_fd()).map_err(perr)?;
    if ready != READY {
        return Err(HandoverError::Protocol(
            "the new daemon did not get ready".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_pass_from_one_side_to_the_other_and_stay_the_same() {
        let dir = std::env::temp_dir().join(format!("pd-handover-{}", std::process::id()));
        let path = socket_path(&dir, Path::new("/sys/fs/bpf/test"));
        let table = Arc::new(Table::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        table.set(
            Item::Admin,
            Arc::new(OwnedFd::from(listener.try_clone().unwrap())),
        );
        table.set(
            Item::Pod {
                uid: "u1".into(),
                netns_inode: 7,
                cgroup_id: 9,
                token: 1234,
            },
            Arc::new(OwnedFd::from(listener.try_clone().unwrap())),
        );
        let (tx, rx) = tokio::sync::watch::channel(Stage::Serving);
        serve(path.clone(), table, tx);
        let taken = (0..100)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(10));
                take(&path).ok().flatten()
            })
            .expect("taken");
        assert_eq!(taken.pods["u1"].token, 1234);
        // The same socket: a connection to the old address is accepted on the new fd.
        let admin = std::net::TcpListener::from(taken.ports["admin"].try_clone().unwrap());
        assert_eq!(admin.local_addr().unwrap(), addr);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        drop(listener);
        assert!(admin.accept().is_ok());
        // (The stage is reported right after the last item is sent: give it a moment.)
        let handing = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            *rx.borrow() == Stage::Taken
        });
        assert!(handing);
        taken.confirm();
        let done = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            *rx.borrow() == Stage::Done
        });
        assert!(done);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
