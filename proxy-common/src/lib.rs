//! Types shared by the eBPF programs (kernel) and the daemon (user space).
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so the bytes the kernel hashes
//! for a key are exactly the bytes user space builds: an implicit padding byte with garbage
//! in it would make lookups miss.
#![no_std]

/// Port of the per-pod outbound listener when nothing else is configured.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// How deep below the cgroup2 root the connect4 program looks for an enrolled ancestor.
/// kubelet's deepest layout is `kubepods.slice/kubepods-<qos>.slice/<pod>.slice/<container>`;
/// the slack covers a test or nested root above it.
pub const MAX_CGROUP_DEPTH: i32 = 12;

/// Map names, shared so user space never spells them differently from the programs.
pub mod maps {
    /// cgroup id → [`super::Enrolment`].
    pub const ENROLLED: &str = "PD_ENROLLED";
    /// socket cookie of a redirected client socket → [`super::OrigDst`].
    pub const SOCK_ORIG_DST: &str = "PD_SOCK_DST";
    /// [`super::ClientKey`] (as the accepting side sees it) → [`super::OrigDst`].
    pub const CLIENT_ORIG_DST: &str = "PD_CLIENT_DST";
    /// per-CPU counters indexed by [`super::CaptureStat`].
    pub const CAPTURE_STATS: &str = "PD_STATS";
    /// [`super::SockPairKey`] → socket: both ends of each app ↔ listener loopback
    /// connection of a pod enrolled with [`super::ENROLMENT_SOCKMAP`]. Not pinned: each
    /// daemon has its own, with its own sk_msg program attached.
    pub const SOCK_PAIRS: &str = "PD_SOCK_PAIRS";
    /// Pod IPv4 (network order) → [`super::InboundPod`]: the pods whose inbound
    /// connections the sk_lookup program steers, and the ports it leaves alone.
    pub const INBOUND_PODS: &str = "PD_INBOUND_PODS";
    /// [`super::ListenerKey`] → the daemon's listener of that kind in that pod's netns (a
    /// sockhash: the kernel assigns connections to it, so a successor daemon takes them
    /// over by replacing the entry).
    pub const INBOUND_LISTENERS: &str = "PD_INBOUND_LSN";
    /// IPv4 (network order) → 1: the node's own addresses. Connections from them (the
    /// kubelet's probes) reach the app directly, as in Istio.
    pub const NODE_ADDRS: &str = "PD_NODE_ADDRS";
    /// Every map the daemon pins, in one place for cleanup.
    pub const ALL: [&str; 7] = [
        ENROLLED,
        SOCK_ORIG_DST,
        CLIENT_ORIG_DST,
        CAPTURE_STATS,
        INBOUND_PODS,
        INBOUND_LISTENERS,
        NODE_ADDRS,
    ];
}

/// Program names (the Rust function names in proxy-ebpf).
pub mod programs {
    pub const CONNECT4: &str = "pd_connect4";
    pub const SOCK_OPS: &str = "pd_sock_ops";
    pub const GETPEERNAME4: &str = "pd_getpeername4";
    pub const CONNECT6: &str = "pd_connect6";
    pub const GETPEERNAME6: &str = "pd_getpeername6";
    pub const BIND4: &str = "pd_bind4";
    pub const BIND6: &str = "pd_bind6";
    pub const POST_BIND4: &str = "pd_post_bind4";
    pub const POST_BIND6: &str = "pd_post_bind6";
    pub const SK_MSG: &str = "pd_sk_msg";
    pub const SK_LOOKUP: &str = "pd_sk_lookup";
}

/// Capacity of the enrolment map (pods per node; kubelet's default limit is 110).
pub const MAX_ENROLLED: u32 = 4096;
/// Capacity of each original-destination map (concurrent redirected connections).
pub const MAX_TRACKED_CONNECTIONS: u32 = 262_144;

/// What the kernel does when an enrolled pod's listener is gone.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// connect directly to the original destination
    Open = 0,
    /// refuse the connect (EPERM), at once
    Closed = 1,
}

/// [`Enrolment::flags`]: the daemon's listener is up in the pod netns. Without it the entry
/// only says "this cgroup is a captured pod": every connect gets the pod's fail mode (a pod
/// whose cgroup just appeared, or whose listener port something else holds).
pub const ENROLMENT_LISTENING: u8 = 1;

/// [`Enrolment::flags`]: the pod's connections to its listener skip the loopback TCP
/// stack: sock_ops puts both ends in [`maps::SOCK_PAIRS`] and the sk_msg program hands each
/// sent message straight to the other end's receive queue (`--sockmap`).
pub const ENROLMENT_SOCKMAP: u8 = 2;

/// Capacity of [`maps::SOCK_PAIRS`] (two entries per connection). When it is full, a
/// connection simply goes through loopback TCP.
pub const MAX_SOCK_PAIRS: u32 = 65_536;

/// [`ListenerKey::kind`]: the plaintext inbound listener.
pub const LISTENER_PLAINTEXT: u32 = 0;
/// [`ListenerKey::kind`]: the HBONE listener.
pub const LISTENER_HBONE: u32 = 1;

/// Key of [`maps::INBOUND_LISTENERS`]: a pod's address and which of its listeners.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// The pod's IPv4 address, network order.
    pub ip_be: u32,
    /// [`LISTENER_PLAINTEXT`] or [`LISTENER_HBONE`].
    pub kind: u32,
}

/// Capacity of [`maps::NODE_ADDRS`].
pub const MAX_NODE_ADDRS: u32 = 256;

/// Inbound capture of one pod: value of [`maps::INBOUND_PODS`], keyed by the pod's IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundPod {
    /// Ports left to the normal socket lookup (host order): the daemon's own listeners in
    /// the pod (HBONE, plaintext inbound, outbound).
    pub hbone_port: u16,
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// [`FailMode`] as u8: what a connection gets while the daemon's inbound listener is
    /// gone (fail-closed: refused, the client gets a reset; fail-open: the app itself).
    pub fail_mode: u8,
    pub _pad: u8,
}

/// Enrolment of one pod: value of [`maps::ENROLLED`], keyed by the pod cgroup's id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enrolment {
    /// Cookie of the pod's network namespace (0 while not listening): a connect from
    /// another netns gets the pod's fail mode.
    pub netns_cookie: u64,
    /// Daemon-assigned pod number (diagnostics only).
    pub pod_id: u32,
    /// `SO_PRIORITY` of the daemon's listener, a secret per listener (> 6, which only
    /// CAP_NET_ADMIN may set): the kernel redirects only to a socket carrying it, so a
    /// process of the pod listening on the port is never mistaken for ours.
    pub listener_token: u32,
    /// Port of the daemon's listener on 127.0.0.1 inside the pod netns (host order). Pods
    /// may not bind it.
    pub listener_port: u16,
    /// [`FailMode`] as u8.
    pub fail_mode: u8,
    /// [`ENROLMENT_LISTENING`] or 0.
    pub flags: u8,
    pub _pad: u32,
}

/// Where a redirected connection was going, and who opened it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Cookie of the client's network namespace.
    pub netns_cookie: u64,
    /// The enrolled (pod) cgroup the connecting task belongs to.
    pub cgroup_id: u64,
    /// Original IPv4 destination, network byte order.
    pub ip4_be: u32,
    /// Original destination port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Key by which the accepting side finds a connection's [`OrigDst`]: the listener's netns
/// plus the client's ephemeral port. Two pods may use the same port at once; their netns
/// cookies differ, so they never collide.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub netns_cookie: u64,
    /// Client (local) port of the redirected socket, host byte order.
    pub client_port: u16,
    pub _pad: [u8; 6],
}

impl ClientKey {
    pub const fn new(netns_cookie: u64, client_port: u16) -> Self {
        Self {
            netns_cookie,
            client_port,
            _pad: [0; 6],
        }
    }
}

/// Key of [`maps::SOCK_PAIRS`]: one end of a loopback connection inside a pod netns (both
/// ends are 127.0.0.1 there, so the ports and the netns name it). The other end's key has
/// the ports swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockPairKey {
    pub netns_cookie: u64,
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    pub _pad: u32,
}

impl SockPairKey {
    pub const fn new(netns_cookie: u64, local_port: u16, remote_port: u16) -> Self {
        Self {
            netns_cookie,
            local_port,
            remote_port,
            _pad: 0,
        }
    }

    /// The key of the connection's other end.
    pub const fn peer(&self) -> Self {
        Self::new(self.netns_cookie, self.remote_port, self.local_port)
    }
}

/// Indexes of [`maps::CAPTURE_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureStat {
    /// Rewritten to the pod's listener.
    Redirected = 0,
    /// Listener absent, namespace fail-open: connected directly.
    BypassFailOpen = 1,
    /// Listener absent, namespace fail-closed: connect refused.
    RefusedFailClosed = 2,
    /// Task in an enrolled cgroup but another netns: got the pod's fail mode.
    NetnsMismatch = 3,
    /// Connect from a pod whose listener is not up yet (new pod, or port held): fail mode.
    NotListening = 4,
    /// A pod process tried to bind the listener port: refused.
    BindRefused = 5,
    /// Native IPv6 destination from a fail-open pod: connected directly (no IPv6 proxying).
    Ipv6Direct = 6,
    /// Native IPv6 destination from a fail-closed pod: refused.
    Ipv6Refused = 7,
    /// A task deeper in the cgroup tree than [`MAX_CGROUP_DEPTH`]: could not be checked.
    TooDeep = 8,
    /// Something else listens on the listener port in the pod netns: not redirected there.
    ForeignListener = 9,
    /// A socket end put in [`maps::SOCK_PAIRS`] (two per connection).
    SockmapPaired = 10,
    /// A message whose other end was not in [`maps::SOCK_PAIRS`]: sent through TCP, and
    /// so is every later message of that socket (order is kept).
    SockmapFallback = 11,
    /// A paired end that handed over its budget of bytes: TCP from then on, so what the
    /// receiver has not read stays bounded.
    SockmapBudgetSpent = 12,
    /// A pod socket that the kernel gave the listener port to (`bind` to port 0 with the
    /// local port range set to it): the bind was undone.
    AutobindRefused = 13,
    /// An inbound connection to a pod handed to the daemon's inbound listener (sk_lookup).
    InboundRedirected = 14,
    /// An inbound connection from one of the node's own addresses (a kubelet probe): left
    /// to reach the app directly.
    InboundFromNode = 15,
    /// An inbound connection while the daemon's inbound listener was gone, pod fail-open:
    /// reached the app directly.
    InboundBypassFailOpen = 16,
    /// An inbound connection while the daemon's inbound listener was gone, pod
    /// fail-closed: refused (reset).
    InboundRefusedFailClosed = 17,
}

/// Number of [`CaptureStat`] slots: room to spare, so a new counter does not change the
/// pinned map's layout (which makes an upgrade replace the maps).
pub const CAPTURE_STAT_SLOTS: u32 = 32;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are #[repr(C)], Copy, built only of integers, with padding spelled out.
    unsafe impl aya::Pod for super::Enrolment {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::SockPairKey {}
    unsafe impl aya::Pod for super::InboundPod {}
    unsafe impl aya::Pod for super::ListenerKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sock_pair_key_and_its_peer_name_the_two_ends_of_one_connection() {
        let app = SockPairKey::new(7, 40_000, DEFAULT_OUTBOUND_PORT);
        let listener = app.peer();
        assert_eq!(listener, SockPairKey::new(7, DEFAULT_OUTBOUND_PORT, 40_000));
        assert_eq!(listener.peer(), app);
        // Another pod's connection with the same ports is another key.
        assert_ne!(SockPairKey::new(8, 40_000, DEFAULT_OUTBOUND_PORT), app);
        assert_eq!(core::mem::size_of::<SockPairKey>(), 16);
    }
}
