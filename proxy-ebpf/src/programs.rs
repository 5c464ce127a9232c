//! The programs themselves (compiled for the bpf target only; see main.rs).

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_sk_lookup_tcp, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use proxy_common::{
    CaptureStat, ClientKey, Enrolment, FailMode, OrigDst, CAPTURE_STAT_SLOTS, MAX_CGROUP_DEPTH,
    MAX_ENROLLED, MAX_TRACKED_CONNECTIONS,
};

/// Return values of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const LOOPBACK_NET: u32 = 127;
const LOOPBACK_BE: u32 = u32::from_be_bytes([127, 0, 0, 1]).to_be();

#[map(name = "PD_ENROLLED")]
static ENROLLED: HashMap<u64, Enrolment> = HashMap::pinned(MAX_ENROLLED, 0);

#[map(name = "PD_SOCK_DST")]
static SOCK_ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "PD_CLIENT_DST")]
static CLIENT_ORIG_DST: LruHashMap<ClientKey, OrigDst> =
    LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "PD_STATS")]
static CAPTURE_STATS: PerCpuArray<u64> = PerCpuArray::pinned(CAPTURE_STAT_SLOTS, 0);

#[inline(always)]
fn count(stat: CaptureStat) {
    if let Some(slot) = CAPTURE_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

/// The enrolled pod cgroup among the current task's ancestors, if any.
#[inline(always)]
fn enrolled_ancestor() -> Option<(u64, Enrolment)> {
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: helper with a scalar argument.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return None;
        }
        // SAFETY: value is Copy and read at once.
        if let Some(enrolment) = unsafe { ENROLLED.get(&id) } {
            return Some((id, *enrolment));
        }
        level += 1;
    }
    None
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
    let Some((cgroup_id, enrolment)) = enrolled_ancestor() else {
        return ALLOW;
    };
    // SAFETY: helper on our own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns_cookie != enrolment.netns_cookie {
        // A process of the pod in another network namespace than the pod's (one it made,
        // or joined): there is no listener of ours there to send it to. Letting it through
        // would be a way out of capture, so it gets the pod's fail mode.
        count(CaptureStat::NetnsMismatch);
        if enrolment.fail_mode == FailMode::Closed as u8 {
            return REFUSE;
        }
        return ALLOW;
    }
    let listener_port_be = enrolment.listener_port.to_be();
    if !listener_alive(&ctx, listener_port_be) {
        if enrolment.fail_mode == FailMode::Closed as u8 {
            count(CaptureStat::RefusedFailClosed);
            debug!(
                &ctx,
                "pod cgroup {}: no listener, fail-closed: refused", cgroup_id
            );
            return REFUSE;
        }
        count(CaptureStat::BypassFailOpen);
        debug!(
            &ctx,
            "pod cgroup {}: no listener, fail-open: direct", cgroup_id
        );
        return ALLOW;
    }
    let orig = OrigDst {
        netns_cookie,
        cgroup_id,
        ip4_be: dst_ip_be,
        port: u16::from_be(sa.user_port as u16),
        _pad: 0,
    };
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if SOCK_ORIG_DST.insert(&cookie, &orig, 0).is_err() {
        // Without the entry the proxy could not tell where to go: leave the connect alone.
        return ALLOW;
    }
    sa.user_ip4 = LOOPBACK_BE;
    sa.user_port = listener_port_be as u32;
    count(CaptureStat::Redirected);
    ALLOW
}

/// Whether a socket listens on 127.0.0.1:<port> in the caller's network namespace.
#[inline(always)]
fn listener_alive(ctx: &SockAddrContext, port_be: u16) -> bool {
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
    // SAFETY: sk came from bpf_sk_lookup_tcp and is released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

#[sock_ops]
pub fn pd_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => publish_client_key(&ctx),
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

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
