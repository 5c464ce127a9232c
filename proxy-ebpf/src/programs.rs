//! The programs themselves (compiled for the bpf target only; see main.rs).

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, sk_action, BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_NOEXIST,
        BPF_SK_LOOKUP_F_NO_REUSEPORT, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_sk_lookup_tcp, bpf_sk_release,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use proxy_common::{
    CaptureStat, ClientKey, Enrolment, FailMode, InboundPod, ListenerKey, OrigDst, SockPairKey,
    CAPTURE_STAT_SLOTS, ENROLMENT_LISTENING, ENROLMENT_SOCKMAP, LISTENER_HBONE, LISTENER_PLAINTEXT,
    MAX_CGROUP_DEPTH, MAX_ENROLLED, MAX_NODE_ADDRS, MAX_SOCK_PAIRS, MAX_TRACKED_CONNECTIONS,
};

/// Return values of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const LOOPBACK_NET: u32 = 127;
const LOOPBACK_BE: u32 = u32::from_be_bytes([127, 0, 0, 1]).to_be();
/// `bpf_sock.state` values (include/net/tcp_states.h).
const TCP_ESTABLISHED: u32 = 1;
const TCP_CLOSE_WAIT: u32 = 8;
/// Third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), as stored (network order).
const V4_MAPPED_PREFIX_BE: u32 = 0x0000_ffffu32.to_be();
/// Last word of `::1`, as stored.
const IPV6_LOOPBACK_LAST_BE: u32 = 1u32.to_be();

#[map(name = "PD_ENROLLED")]
static ENROLLED: HashMap<u64, Enrolment> = HashMap::pinned(MAX_ENROLLED, 0);

#[map(name = "PD_SOCK_DST")]
static SOCK_ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "PD_CLIENT_DST")]
static CLIENT_ORIG_DST: LruHashMap<ClientKey, OrigDst> =
    LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "PD_SOCK_PAIRS")]
static SOCK_PAIRS: SockHash<SockPairKey> = SockHash::with_max_entries(MAX_SOCK_PAIRS, 0);

/// Bytes each paired end has handed to the other end, or [`ON_TCP`] once the end went back
/// to TCP for good. Written when the end is paired (an end without an entry uses TCP),
/// removed when its socket closes; a plain hash, never evicted (an evicted entry would let
/// a socket switch back to redirecting, and bytes could overtake earlier ones).
#[map(name = "PD_SOCK_SENT")]
static SOCK_SENT: HashMap<SockPairKey, u64> = HashMap::with_max_entries(MAX_SOCK_PAIRS, 0);

/// [`SOCK_SENT`] value of an end that uses TCP from now on. Going from redirecting to TCP
/// keeps order (the receiver reads the redirected queue first); never the other way.
const ON_TCP: u64 = u64::MAX;

/// [`SOCK_SENT`] value of the listener's end, which is not counted: what it hands over is
/// queued at the app's socket, in the pod's own memory cgroup, so a pod that does not read
/// only holds itself up.
const UNCOUNTED: u64 = u64::MAX - 1;

/// Bytes the app's end may hand over before it goes back to TCP. A redirected message is
/// queued at the receiver whatever its receive buffer says, so without this a pod writing
/// faster than the daemon reads (an upload to a slow upstream, or on purpose) would pile
/// up memory in the daemon, which every tenant shares; with it, no connection holds more
/// unread bytes at the daemon than TCP's largest receive buffer (tcp_rmem's 6 MiB default
/// maximum) would.
const REDIRECT_BUDGET: u64 = 4 << 20;

#[map(name = "PD_STATS")]
static CAPTURE_STATS: PerCpuArray<u64> = PerCpuArray::pinned(CAPTURE_STAT_SLOTS, 0);

#[inline(always)]
fn count(stat: CaptureStat) {
    if let Some(slot) = CAPTURE_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

/// Where the ancestor walk ended.
enum Ancestor {
    Enrolled(u64, Enrolment),
    None,
    /// The task sits deeper than the walk reaches: it cannot be told apart from a pod.
    TooDeep,
}

/// The enrolled pod cgroup among the current task's ancestors, if any.
#[inline(always)]
fn enrolled_ancestor() -> Ancestor {
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: helper with a scalar argument.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return Ancestor::None;
        }
        // SAFETY: value is Copy and read at once.
        if let Some(enrolment) = unsafe { ENROLLED.get(&id) } {
            return Ancestor::Enrolled(id, *enrolment);
        }
        level += 1;
    }
    // SAFETY: helper with a scalar argument.
    if unsafe { bpf_get_current_ancestor_cgroup_id(MAX_CGROUP_DEPTH + 1) } != 0 {
        count(CaptureStat::TooDeep);
        return Ancestor::TooDeep;
    }
    Ancestor::None
}

/// What a connect of an enrolled pod's task becomes.
enum Verdict {
    Allow,
    Refuse,
    /// Redirect to the pod's listener on 127.0.0.1:<port, network order>.
    Redirect(u16),
}

#[inline(always)]
fn fail_mode_verdict(enrolment: &Enrolment) -> Verdict {
    if enrolment.fail_mode == FailMode::Closed as u8 {
        Verdict::Refuse
    } else {
        Verdict::Allow
    }
}

/// The decision for a TCP connect to an IPv4 address (also IPv4-mapped IPv6) that is not
/// loopback. Records the original destination when redirecting.
#[inline(always)]
fn decide_ipv4(ctx: &SockAddrContext, dst_ip_be: u32, dst_port_be: u32) -> Verdict {
    let (cgroup_id, enrolment) = match enrolled_ancestor() {
        Ancestor::Enrolled(id, e) => (id, e),
        Ancestor::None | Ancestor::TooDeep => return Verdict::Allow,
    };
    if enrolment.flags & ENROLMENT_LISTENING == 0 {
        // A captured pod whose listener is not up yet (its cgroup just appeared, or the
        // port is held): the namespace's fail mode, never a silent way around capture.
        count(CaptureStat::NotListening);
        return fail_mode_verdict(&enrolment);
    }
    // SAFETY: helper on our own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns_cookie != enrolment.netns_cookie {
        // A process of the pod in another network namespace than the pod's (one it made,
        // or joined): there is no listener of ours there to send it to. Letting it through
        // would be a way out of capture, so it gets the pod's fail mode.
        count(CaptureStat::NetnsMismatch);
        return fail_mode_verdict(&enrolment);
    }
    let listener_port_be = enrolment.listener_port.to_be();
    if !listener_alive(ctx, listener_port_be, enrolment.listener_token) {
        if enrolment.fail_mode == FailMode::Closed as u8 {
            count(CaptureStat::RefusedFailClosed);
            debug!(
                ctx,
                "pod cgroup {}: no listener, fail-closed: refused", cgroup_id
            );
            return Verdict::Refuse;
        }
        count(CaptureStat::BypassFailOpen);
        debug!(
            ctx,
            "pod cgroup {}: no listener, fail-open: direct", cgroup_id
        );
        return Verdict::Allow;
    }
    let orig = OrigDst {
        netns_cookie,
        cgroup_id,
        ip4_be: dst_ip_be,
        port: u16::from_be(dst_port_be as u16),
        _pad: 0,
    };
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if SOCK_ORIG_DST.insert(&cookie, &orig, 0).is_err() {
        // Without the entry the proxy could not tell where to go: the pod's fail mode.
        return fail_mode_verdict(&enrolment);
    }
    count(CaptureStat::Redirected);
    Verdict::Redirect(listener_port_be)
}

#[cgroup_sock_addr(connect4)]
pub fn pd_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let dst_ip_be = sa.user_ip4;
    if u32::from_be(dst_ip_be) >> 24 == LOOPBACK_NET {
        return ALLOW;
    }
    match decide_ipv4(&ctx, dst_ip_be, sa.user_port) {
        Verdict::Allow => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Redirect(port_be) => {
            sa.user_ip4 = LOOPBACK_BE;
            sa.user_port = port_be as u32;
            ALLOW
        }
    }
}

/// connect6: a dual-stack socket dialling `::ffff:a.b.c.d` (the JVM's default) is captured
/// like IPv4 (our IPv4 listener accepts it as `::ffff:127.0.0.1`); a native IPv6
/// destination cannot be proxied yet, so it gets the pod's fail mode, counted.
#[cgroup_sock_addr(connect6)]
pub fn pd_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let ip6 = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_PREFIX_BE {
        let dst_ip_be = ip6[3];
        if u32::from_be(dst_ip_be) >> 24 == LOOPBACK_NET {
            return ALLOW;
        }
        return match decide_ipv4(&ctx, dst_ip_be, sa.user_port) {
            Verdict::Allow => ALLOW,
            Verdict::Refuse => REFUSE,
            Verdict::Redirect(port_be) => {
                // Volatile: LLVM may merge neighbouring ctx stores into one 8-byte store,
                // which the verifier rejects.
                // SAFETY: fields of the valid context.
                unsafe {
                    core::ptr::write_volatile(&mut sa.user_ip6[3], LOOPBACK_BE);
                    core::ptr::write_volatile(&mut sa.user_port, port_be as u32);
                }
                ALLOW
            }
        };
    }
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == IPV6_LOOPBACK_LAST_BE {
        return ALLOW;
    }
    let enrolment = match enrolled_ancestor() {
        Ancestor::Enrolled(_, e) => e,
        Ancestor::None | Ancestor::TooDeep => return ALLOW,
    };
    if enrolment.fail_mode == FailMode::Closed as u8 {
        count(CaptureStat::Ipv6Refused);
        return REFUSE;
    }
    count(CaptureStat::Ipv6Direct);
    ALLOW
}

/// bind4/bind6: a pod's own process may not take the listener port (on any address), so it
/// can never stand in for our listener, even while no daemon runs.
#[inline(always)]
fn guard_bind(port_be: u32) -> i32 {
    let port = u16::from_be(port_be as u16);
    if port == 0 {
        return ALLOW;
    }
    match enrolled_ancestor() {
        Ancestor::Enrolled(_, e) if e.listener_port == port => {
            count(CaptureStat::BindRefused);
            REFUSE
        }
        _ => ALLOW,
    }
}

#[cgroup_sock_addr(bind4)]
pub fn pd_bind4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    guard_bind(sa.user_port)
}

#[cgroup_sock_addr(bind6)]
pub fn pd_bind6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    guard_bind(sa.user_port)
}

/// post_bind4/post_bind6: the port the kernel chose for a `bind` to port 0 is known only
/// here. A pod that sets `net.ipv4.ip_local_port_range` to the listener port (a "safe"
/// sysctl any pod spec may set) would otherwise be given it and stand in for the proxy.
/// (Connect and listen without a bind choose a port without this hook; the daemon reserves
/// its ports in each pod's namespace for those: `ip_local_reserved_ports`.)
#[inline(always)]
fn guard_post_bind(ctx: &SockContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock for the program's lifetime.
    let sk = unsafe { &*ctx.sock };
    if sk.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let port = sk.src_port as u16;
    match enrolled_ancestor() {
        Ancestor::Enrolled(_, e) if e.listener_port == port => {
            count(CaptureStat::AutobindRefused);
            REFUSE
        }
        _ => ALLOW,
    }
}

#[cgroup_sock(post_bind4)]
pub fn pd_post_bind4(ctx: SockContext) -> i32 {
    guard_post_bind(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn pd_post_bind6(ctx: SockContext) -> i32 {
    guard_post_bind(&ctx)
}

/// Whether *our* listener listens on 127.0.0.1:<port> in the caller's network namespace:
/// a socket there that does not carry the enrolment's token is someone else's.
#[inline(always)]
fn listener_alive(ctx: &SockAddrContext, port_be: u16, token: u32) -> bool {
    // SAFETY: an all-zero tuple is a valid value of this plain C union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // Writing a union arm is safe; reading one would not be.
    tuple.__bindgen_anon_1.ipv4.saddr = LOOPBACK_BE;
    tuple.__bindgen_anon_1.ipv4.daddr = LOOPBACK_BE;
    tuple.__bindgen_anon_1.ipv4.sport = 0;
    tuple.__bindgen_anon_1.ipv4.dport = port_be;
    let tuple_size = 12u32; // sizeof(tuple.ipv4)
                            // SAFETY: valid context and tuple; the returned reference is released below.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            tuple_size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: sk is a valid socket reference until released just below.
    let priority = unsafe { (*sk).priority };
    // SAFETY: sk came from bpf_sk_lookup_tcp and is released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    if priority != token {
        count(CaptureStat::ForeignListener);
        return false;
    }
    true
}

#[sock_ops]
pub fn pd_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => publish_client_key(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => pair_app_end(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => pair_listener_end(&ctx),
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                forget_connection(&ctx);
            }
        }
        _ => {}
    }
    0
}

#[inline(always)]
fn publish_client_key(ctx: &SockOpsContext) {
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: value is Copy and read at once.
    let Some(orig) = (unsafe { SOCK_ORIG_DST.get(&cookie) }).copied() else {
        return;
    };
    let key = ClientKey::new(orig.netns_cookie, ctx.local_port() as u16);
    if CLIENT_ORIG_DST.insert(&key, &orig, 0).is_ok() {
        // Ask for state callbacks on this socket only, so close can clean up after it.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

#[inline(always)]
fn forget_connection(ctx: &SockOpsContext) {
    // SAFETY: helpers on our own context.
    let (cookie, netns_cookie) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    let _ = SOCK_ORIG_DST.remove(&cookie);
    let _ = CLIENT_ORIG_DST.remove(&ClientKey::new(netns_cookie, ctx.local_port() as u16));
    let _ = SOCK_SENT.remove(&SockPairKey::new(
        netns_cookie,
        ctx.local_port() as u16,
        remote_port_host(ctx.remote_port()),
    ));
}

/// `remote_port` of sock_ops and sk_msg contexts, in host order: the kernel hands the
/// network-order port in the word's upper 16 bits (local_port is already host order).
#[inline(always)]
fn remote_port_host(word: u32) -> u16 {
    (u32::from_be(word) & 0xffff) as u16
}

/// The listener port of the enrolled pod cgroup `cgroup_id`, if it asked for sockmap
/// pairing.
#[inline(always)]
fn sockmap_listener(cgroup_id: u64) -> Option<u16> {
    // SAFETY: value is Copy and read at once.
    match unsafe { ENROLLED.get(&cgroup_id) } {
        Some(e) if e.flags & ENROLMENT_SOCKMAP != 0 => Some(e.listener_port),
        _ => None,
    }
}

/// Puts this socket end in [`SOCK_PAIRS`] under `key`, unless a byte of it already went
/// through TCP (TCP Fast Open data in the SYN): its later messages must not overtake it.
#[inline(always)]
fn pair(ctx: &SockOpsContext, mut key: SockPairKey, initial: u64) {
    // SAFETY: the kernel hands a valid bpf_sock_ops for the program's lifetime.
    let ops = unsafe { &mut *ctx.ops };
    if ops.data_segs_out != 0 || ops.local_ip4 != LOOPBACK_BE || ops.remote_ip4 != LOOPBACK_BE {
        return;
    }
    if SOCK_SENT.insert(&key, &initial, 0).is_err() {
        return;
    }
    // NOEXIST: a key in use is never taken over by another socket.
    if SOCK_PAIRS.update(&mut key, ops, BPF_NOEXIST as u64).is_ok() {
        count(CaptureStat::SockmapPaired);
        // State callbacks, so close removes this end's SOCK_SENT entry.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    } else {
        let _ = SOCK_SENT.remove(&key);
    }
}

/// The app's end of a redirected connection, once established (it is in the pod netns,
/// 127.0.0.1:<ephemeral> → 127.0.0.1:<listener>).
#[inline(always)]
fn pair_app_end(ctx: &SockOpsContext) {
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: value is Copy and read at once.
    let Some(orig) = (unsafe { SOCK_ORIG_DST.get(&cookie) }).copied() else {
        return;
    };
    let remote_port = remote_port_host(ctx.remote_port());
    if sockmap_listener(orig.cgroup_id) != Some(remote_port) {
        return;
    }
    let key = SockPairKey::new(orig.netns_cookie, ctx.local_port() as u16, remote_port);
    pair(ctx, key, 0);
}

/// The listener's end of a redirected connection, once accepted by the kernel: a socket
/// on 127.0.0.1 whose peer port is a redirected client's in this netns.
#[inline(always)]
fn pair_listener_end(ctx: &SockOpsContext) {
    // SAFETY: helper on our own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let remote_port = remote_port_host(ctx.remote_port());
    // SAFETY: value is Copy and read at once.
    let Some(orig) =
        (unsafe { CLIENT_ORIG_DST.get(&ClientKey::new(netns_cookie, remote_port)) }).copied()
    else {
        return;
    };
    // Only our listener's end: a pod's own server that happens to accept from the same
    // client port is left alone.
    let local_port = ctx.local_port() as u16;
    if sockmap_listener(orig.cgroup_id) != Some(local_port) {
        return;
    }
    pair(
        ctx,
        SockPairKey::new(netns_cookie, local_port, remote_port),
        UNCOUNTED,
    );
}

/// Every message sent on a paired end goes straight to the other end's receive queue,
/// skipping loopback TCP. If the other end is not paired (yet, or no more), the message
/// and all later ones of this end go through TCP.
#[sk_msg]
pub fn pd_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the kernel hands a valid sk_msg_md for the program's lifetime.
    let md = unsafe { &*ctx.msg };
    // SAFETY: `sk` of an sk_msg context is the sending socket, never null.
    let state = unsafe { (*md.__bindgen_anon_3.sk).state };
    if state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT {
        // Shut down for writing, or closing: TCP says so (EPIPE) instead of a redirect
        // delivering bytes after the FIN.
        return sk_action::SK_PASS;
    }
    // SAFETY: helper on our own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.msg.cast()) };
    let own = SockPairKey::new(
        netns_cookie,
        md.local_port as u16,
        remote_port_host(md.remote_port),
    );
    // One message of a socket at a time (the kernel holds the socket's lock), so the
    // entry is read and written without atomics.
    let Some(sent) = SOCK_SENT.get_ptr_mut(&own) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: a valid map value pointer, written only under this socket's lock.
    let before = unsafe { *sent };
    if before == ON_TCP {
        return sk_action::SK_PASS;
    }
    let after = if before == UNCOUNTED {
        UNCOUNTED
    } else {
        before + md.size as u64
    };
    if after != UNCOUNTED && after > REDIRECT_BUDGET {
        count(CaptureStat::SockmapBudgetSpent);
        // SAFETY: as above.
        unsafe { *sent = ON_TCP };
        return sk_action::SK_PASS;
    }
    let mut peer = own.peer();
    if SOCK_PAIRS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == sk_action::SK_PASS as i64 {
        // SAFETY: as above.
        unsafe { *sent = after };
        return sk_action::SK_PASS;
    }
    count(CaptureStat::SockmapFallback);
    // SAFETY: as above.
    unsafe { *sent = ON_TCP };
    sk_action::SK_PASS
}

#[cgroup_sock_addr(getpeername4)]
pub fn pd_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: value is Copy and read at once.
    if let Some(orig) = unsafe { SOCK_ORIG_DST.get(&cookie) } {
        // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.ip4_be;
        sa.user_port = orig.port.to_be() as u32;
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn pd_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: value is Copy and read at once.
    if let Some(orig) = unsafe { SOCK_ORIG_DST.get(&cookie) } {
        // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
        let sa = unsafe { &mut *ctx.sock_addr };
        // Volatile: see pd_connect6.
        // SAFETY: fields of the valid context.
        unsafe {
            core::ptr::write_volatile(&mut sa.user_ip6[0], 0);
            core::ptr::write_volatile(&mut sa.user_ip6[1], 0);
            core::ptr::write_volatile(&mut sa.user_ip6[2], V4_MAPPED_PREFIX_BE);
            core::ptr::write_volatile(&mut sa.user_ip6[3], orig.ip4_be);
            core::ptr::write_volatile(&mut sa.user_port, orig.port.to_be() as u32);
        }
    }
    ALLOW
}

#[map(name = "PD_INBOUND_PODS")]
static INBOUND_PODS: HashMap<u32, InboundPod> = HashMap::pinned(MAX_ENROLLED, 0);

#[map(name = "PD_INBOUND_LSN")]
static INBOUND_LISTENERS: SockHash<ListenerKey> = SockHash::pinned(2 * MAX_ENROLLED, 0);

#[map(name = "PD_NODE_ADDRS")]
static NODE_ADDRS: HashMap<u32, u8> = HashMap::pinned(MAX_NODE_ADDRS, 0);

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
/// Every network namespace's loopback device has index 1.
const LOOPBACK_IFINDEX: u32 = 1;

/// Inbound capture, attached to each captured pod's network namespace: a TCP connection
/// to the pod's address goes to the daemon's inbound listener in that namespace, which
/// accepts it with the original destination as its local address. Left alone: the
/// daemon's own ports (HBONE arrives on its listener by the normal lookup), connections
/// from loopback addresses (the daemon's to the app come from 127.0.0.6) or from the pod
/// itself, and connections from the node's own addresses (kubelet probes).
#[sk_lookup]
pub fn pd_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid bpf_sk_lookup for the program's lifetime.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.family != AF_INET || lookup.protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let pod_ip = lookup.local_ip4;
    // SAFETY: value is Copy and read at once.
    let Some(pod) = (unsafe { INBOUND_PODS.get(&pod_ip) }).copied() else {
        return sk_action::SK_PASS;
    };
    let port = lookup.local_port as u16;
    // HBONE goes to this daemon's listener (the one in the table: after a hand-over the
    // successor's, never the predecessor's still in the port's reuseport group). Without
    // one, the normal lookup decides.
    if port == pod.hbone_port {
        let key = ListenerKey {
            ip_be: pod_ip,
            kind: LISTENER_HBONE,
        };
        let _ =
            INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, BPF_SK_LOOKUP_F_NO_REUSEPORT as u64);
        return sk_action::SK_PASS;
    }
    if port == pod.inbound_port || port == pod.outbound_port {
        return sk_action::SK_PASS;
    }
    // Connections from loopback (the daemon's to the app, from 127.0.0.6) and the pod's
    // calls to itself: local, not the network's. (Traffic to the pod's own address does
    // not show loopback as its ingress device, so the source decides.)
    let remote_net = u32::from_be(lookup.remote_ip4) >> 24;
    if lookup.ingress_ifindex == LOOPBACK_IFINDEX
        || remote_net == LOOPBACK_NET
        || lookup.remote_ip4 == pod_ip
    {
        return sk_action::SK_PASS;
    }
    // A copy on the stack: the verifier takes no map key from the context.
    let remote_ip = lookup.remote_ip4;
    // SAFETY: read-only lookup of a scalar.
    if unsafe { NODE_ADDRS.get(&remote_ip) }.is_some() {
        count(CaptureStat::InboundFromNode);
        return sk_action::SK_PASS;
    }
    let key = ListenerKey {
        ip_be: pod_ip,
        kind: LISTENER_PLAINTEXT,
    };
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, BPF_SK_LOOKUP_F_NO_REUSEPORT as u64) {
        Ok(()) => {
            count(CaptureStat::InboundRedirected);
            sk_action::SK_PASS
        }
        Err(_) if pod.fail_mode == FailMode::Closed as u8 => {
            count(CaptureStat::InboundRefusedFailClosed);
            sk_action::SK_DROP
        }
        Err(_) => {
            count(CaptureStat::InboundBypassFailOpen);
            sk_action::SK_PASS
        }
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
