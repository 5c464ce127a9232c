//! Network namespaces of pods, and sockets made inside them.
//!
//! A socket belongs to the netns its creator was in at `socket()` time, and stays there.
//! Each enrolled pod gets one small OS thread that enters the pod's netns once (setns is
//! per thread; never done on a tokio worker) and makes sockets on request: the pod's
//! listener, and every upstream socket, so destinations see the pod's own IP.
use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::PathBuf,
    sync::mpsc,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("entering netns of pid {pid}: {source}")]
    Setns { pid: u32, source: nix::Error },
    #[error("netns worker is gone")]
    WorkerGone,
    #[error("socket in pod netns: {0}")]
    Socket(#[from] std::io::Error),
}

/// SO_NETNS_COOKIE (linux/asm-generic/socket.h); libc does not export it everywhere.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie the kernel gives a socket's network namespace (`bpf_get_netns_cookie`).
pub fn socket_netns_cookie(fd: &impl AsRawFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out pointer and length of a u64.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Identity of a netns file: same inode, same namespace.
pub fn netns_inode_of_pid(pid: u32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

enum Request {
    /// Top up the stock of spare IPv4 sockets.
    Refill,
    Listener {
        addr: SocketAddr,
        token: u32,
        reply: oneshot::Sender<std::io::Result<std::net::TcpListener>>,
    },
    Stream {
        domain: Domain,
        reply: oneshot::Sender<std::io::Result<OwnedFd>>,
    },
    ReservePorts {
        ports: Vec<u16>,
        reply: oneshot::Sender<std::io::Result<LocalPortRange>>,
    },
}

/// The namespace's `net.ipv4.ip_local_port_range`: where the kernel picks ports for
/// sockets that did not bind one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LocalPortRange {
    pub low: u16,
    pub high: u16,
}

impl LocalPortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Adds `ports` to the calling thread's network namespace's `ip_local_reserved_ports`
/// (the kernel never picks a reserved port for a socket that did not ask for one, whatever
/// the local port range says) and reads its local port range. /proc/sys/net shows the
/// namespace of the thread that reads it: call from the pod's worker thread.
fn reserve_ports(ports: &[u16]) -> std::io::Result<LocalPortRange> {
    let current = std::fs::read_to_string(RESERVED_PORTS)?;
    let mut list: Vec<String> = current
        .trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let reserved = |p: u16, list: &[String]| {
        list.iter().any(|item| match item.split_once('-') {
            Some((a, b)) => {
                a.parse::<u16>().is_ok_and(|a| a <= p) && b.parse::<u16>().is_ok_and(|b| p <= b)
            }
            None => item.parse::<u16>() == Ok(p),
        })
    };
    let missing: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|p| !reserved(*p, &list))
        .collect();
    if !missing.is_empty() {
        list.extend(missing.iter().map(u16::to_string));
        std::fs::write(RESERVED_PORTS, list.join(","))?;
    }
    let range = std::fs::read_to_string(PORT_RANGE)?;
    let mut bounds = range
        .split_whitespace()
        .filter_map(|v| v.parse::<u16>().ok());
    match (bounds.next(), bounds.next()) {
        (Some(low), Some(high)) => Ok(LocalPortRange { low, high }),
        _ => Err(std::io::Error::other(format!("{PORT_RANGE}: {range:?}"))),
    }
}

/// The link-local source Istio's CNI gives the kubelet's probes in ambient mode: treated
/// as the node's, so probes SNATed to it reach the app as well.
pub const AMBIENT_PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);

/// The IPv4 addresses of the daemon's (the node's) network namespace, except loopback,
/// with [`AMBIENT_PROBE_SOURCE`]: connections from them to a pod are the kubelet's probes.
pub fn node_ipv4_addrs() -> std::collections::BTreeSet<Ipv4Addr> {
    let mut addrs: std::collections::BTreeSet<Ipv4Addr> = nix::ifaddrs::getifaddrs()
        .map(|list| {
            list.filter_map(|ifa| ifa.address?.as_sockaddr_in().map(|a| a.ip()))
                .filter(|ip| !ip.is_loopback())
                .collect()
        })
        .unwrap_or_default();
    addrs.insert(AMBIENT_PROBE_SOURCE);
    addrs
}

/// Ready-made upstream sockets kept per pod, so a connection usually takes one without a
/// round trip to the netns thread; the thread tops the stock up in the background.
const SPARE_SOCKETS: usize = 16;

/// A thread living inside one pod's network namespace, making sockets there.
pub struct NetnsWorker {
    tx: mpsc::Sender<Request>,
    spares: std::sync::Arc<std::sync::Mutex<Vec<OwnedFd>>>,
    pub inode: u64,
    /// The namespace itself (programs attach to it).
    netns: File,
}

impl NetnsWorker {
    /// Enters the netns of `pid` on a new thread. The thread holds the netns file, so the
    /// namespace stays valid for our sockets while we use it. `mark`: the `SO_MARK` of
    /// every upstream socket (`--capture iptables` lets marked sockets through).
    pub fn spawn(pid: u32, label: &str, mark: Option<u32>) -> Result<Self, NetnsError> {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        let inode = file
            .metadata()
            .map_err(|source| NetnsError::Open {
                path: path.clone(),
                source,
            })?
            .ino();
        let netns = file
            .try_clone()
            .map_err(|source| NetnsError::Open { path, source })?;
        let (tx, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let spares = std::sync::Arc::new(std::sync::Mutex::new(Vec::with_capacity(SPARE_SOCKETS)));
        let stock = spares.clone();
        std::thread::Builder::new()
            .name(format!("netns-{label}"))
            .stack_size(128 * 1024)
            .spawn(move || {
                let entered = nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                // Ends when the worker handle (the only sender) is dropped.
                while let Ok(req) = rx.recv() {
                    match req {
                        Request::Refill => refill(&stock, mark),
                        Request::Listener { addr, token, reply } => {
                            let _ = reply.send(make_listener(addr, token));
                        }
                        Request::Stream { domain, reply } => {
                            let _ = reply.send(make_stream(domain, mark));
                        }
                        Request::ReservePorts { ports, reply } => {
                            let _ = reply.send(reserve_ports(&ports));
                        }
                    }
                }
            })
            .map_err(NetnsError::Socket)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {
                let _ = tx.send(Request::Refill);
                Ok(Self {
                    tx,
                    spares,
                    inode,
                    netns,
                })
            }
            Ok(Err(source)) => Err(NetnsError::Setns { pid, source }),
            Err(_) => Err(NetnsError::WorkerGone),
        }
    }

    /// The pod's network namespace.
    pub fn netns_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.netns.as_fd()
    }

    /// A non-blocking listener bound inside the pod netns, carrying `token` as its
    /// `SO_PRIORITY` (how the kernel program recognises it).
    pub async fn listener(
        &self,
        addr: SocketAddr,
        token: u32,
    ) -> Result<std::net::TcpListener, NetnsError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Listener { addr, token, reply })
            .map_err(|_| NetnsError::WorkerGone)?;
        Ok(rx.await.map_err(|_| NetnsError::WorkerGone)??)
    }

    /// A fresh non-blocking TCP socket inside the pod netns, ready to connect.
    /// Reserves `ports` in the pod's namespace (see [`reserve_ports`]); its local port range.
    pub async fn reserve_ports(&self, ports: Vec<u16>) -> Result<LocalPortRange, NetnsError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::ReservePorts { ports, reply })
            .map_err(|_| NetnsError::WorkerGone)?;
        Ok(rx.await.map_err(|_| NetnsError::WorkerGone)??)
    }

    pub async fn tcp_socket(&self, domain: Domain) -> Result<OwnedFd, NetnsError> {
        if domain == Domain::IPV4 {
            let (spare, left) = {
                let mut stock = self.spares.lock().unwrap_or_else(|p| p.into_inner());
                (stock.pop(), stock.len())
            };
            if left < SPARE_SOCKETS / 2 {
                let _ = self.tx.send(Request::Refill);
            }
            if let Some(fd) = spare {
                return Ok(fd);
            }
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Stream { domain, reply })
            .map_err(|_| NetnsError::WorkerGone)?;
        Ok(rx.await.map_err(|_| NetnsError::WorkerGone)??)
    }
}

impl crate::proxy::SocketFactory for NetnsWorker {
    fn tcp_socket(
        &self,
        domain: Domain,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<OwnedFd>> + Send + '_>>
    {
        Box::pin(async move {
            NetnsWorker::tcp_socket(self, domain)
                .await
                .map_err(|e| match e {
                    NetnsError::Socket(io) => io,
                    other => std::io::Error::other(other.to_string()),
                })
        })
    }
}

fn refill(stock: &std::sync::Mutex<Vec<OwnedFd>>, mark: Option<u32>) {
    let missing =
        SPARE_SOCKETS.saturating_sub(stock.lock().map(|s| s.len()).unwrap_or(SPARE_SOCKETS));
    let fresh: Vec<OwnedFd> = (0..missing)
        .filter_map(|_| make_stream(Domain::IPV4, mark).ok())
        .collect();
    if let Ok(mut s) = stock.lock() {
        s.extend(fresh);
    }
}

fn make_listener(addr: SocketAddr, token: u32) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // The pod-address listeners (HBONE, inbound) are bound by a successor daemon while
    // the predecessor still holds them (a hand-over): both accept until it lets go.
    if !addr.ip().is_loopback() {
        socket.set_reuse_port(true)?;
    }
    // Priority only orders packets in qdiscs, and loopback has none: harmless to the
    // connections, and values above 6 need CAP_NET_ADMIN, which the daemon has.
    socket.set_priority(token)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn make_stream(domain: Domain, mark: Option<u32>) -> std::io::Result<OwnedFd> {
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket.into())
}
