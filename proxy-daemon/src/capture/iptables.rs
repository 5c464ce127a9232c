//! `--capture iptables`: for kernels without cgroup eBPF, and as the benchmark's fair
//! comparison. Each captured pod's network namespace gets a nat `OUTPUT` chain that
//! `REDIRECT`s its TCP connects to the pod's listener; the listener reads where each one was
//! going with `SO_ORIGINAL_DST` (conntrack, per netns). The daemon's own upstream sockets,
//! made in the same netns, are let through by their cgroup (`-m cgroup --path`, the
//! daemon's own): a property a pod cannot give its sockets. (They also carry
//! [`UPSTREAM_MARK`], as ztunnel's do, but the mark is not trusted: since Linux 5.17
//! `SO_MARK` needs only CAP_NET_RAW, which container runtimes grant by default.)
//!
//! What this mode cannot give, and the eBPF mode does: a connect while no listener accepts
//! is refused by the redirect whatever the pod's fail mode (a fail-open pod is not let out
//! directly); a pod can bind the listener port itself before the daemon does; and native
//! IPv6 connects are refused only for fail-closed pods (`ip6tables`, when installed), not
//! proxied.

use std::os::fd::BorrowedFd;
use std::process::Stdio;

use proxy_common::{ClientKey, OrigDst};
use tokio::io::AsyncWriteExt;

/// `SO_MARK` on the daemon's upstream sockets in a pod netns; the redirect chain returns on
/// it. Istio's ztunnel uses the same value (1337) for the same purpose.
pub const UPSTREAM_MARK: u32 = 0x539;
/// Our chain in the pod's nat table (and filter table, for IPv6), jumped to from `OUTPUT`.
pub const CHAIN: &str = "PROXY_DAEMON_OUTPUT";
/// Our inbound chain in the pod's nat table, jumped to from `PREROUTING`.
pub const INBOUND_CHAIN: &str = "PROXY_DAEMON_INBOUND";

/// What the inbound redirect leaves alone and where it sends the rest.
pub struct InboundRules<'a> {
    /// The plaintext inbound listener's port.
    pub inbound_port: u16,
    /// The HBONE listener's port (reached directly).
    pub hbone_port: u16,
    /// The node's addresses: the kubelet's probes reach the app directly.
    pub node_addrs: &'a std::collections::BTreeSet<std::net::Ipv4Addr>,
}

/// The nat rules for connections arriving at the pod: everything but the HBONE port, the
/// inbound port itself and the node's addresses goes to the inbound listener (which reads
/// the original destination with `SO_ORIGINAL_DST`). Connections made inside the pod
/// (loopback, and the daemon's own to the app) are NATed, if at all, in `OUTPUT`, never
/// here.
fn inbound_rules(r: &InboundRules) -> String {
    let mut rules = format!(
        "*nat\n\
         :{INBOUND_CHAIN} - [0:0]\n\
         -A {INBOUND_CHAIN} -i lo -j RETURN\n\
         -A {INBOUND_CHAIN} -p tcp --dport {} -j RETURN\n\
         -A {INBOUND_CHAIN} -p tcp --dport {} -j RETURN\n",
        r.hbone_port, r.inbound_port
    );
    for addr in r.node_addrs {
        rules.push_str(&format!("-A {INBOUND_CHAIN} -s {addr}/32 -j RETURN\n"));
    }
    rules.push_str(&format!(
        "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}\nCOMMIT\n",
        r.inbound_port
    ));
    rules
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("--capture iptables needs `{0}` on the node: {1}")]
    Missing(&'static str, String),
    #[error("iptables in the netns of process {pid}: {message}")]
    Failed { pid: u32, message: String },
}

/// Startup check: the tools the mode runs must be there, and the daemon's cgroup known
/// (exit 2 with the reason if not).
pub fn check_available() -> Result<(), IptablesError> {
    own_cgroup()?;
    for tool in ["nsenter", "iptables-restore", "iptables"] {
        let out = std::process::Command::new(tool)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match out {
            Ok(s) if s.success() => {}
            Ok(s) => return Err(IptablesError::Missing(tool, format!("--version: {s}"))),
            Err(e) => return Err(IptablesError::Missing(tool, e.to_string())),
        }
    }
    Ok(())
}

/// The nat rules of one pod: loopback and the daemon's own sockets (those of its cgroup,
/// `daemon_cgroup` as /proc/self/cgroup names it) go out as they are, every other TCP
/// connect to `port` on 127.0.0.1 (locally made packets are redirected to the loopback
/// address).
fn nat_rules(port: u16, daemon_cgroup: &str) -> String {
    format!(
        "*nat\n\
         :{CHAIN} - [0:0]\n\
         -A {CHAIN} -m cgroup --path \"{daemon_cgroup}\" -j RETURN\n\
         -A {CHAIN} -d 127.0.0.0/8 -j RETURN\n\
         -A {CHAIN} -p tcp -j REDIRECT --to-ports {port}\n\
         COMMIT\n"
    )
}

/// IPv6 is not proxied: a fail-closed pod's native IPv6 connects are refused, as the eBPF
/// mode does (loopback and the daemon's own sockets excepted).
fn ip6_rules(daemon_cgroup: &str) -> String {
    format!(
        "*filter\n\
         :{CHAIN} - [0:0]\n\
         -A {CHAIN} -m cgroup --path \"{daemon_cgroup}\" -j RETURN\n\
         -A {CHAIN} -d ::1/128 -j RETURN\n\
         -A {CHAIN} -p tcp -j REJECT --reject-with tcp-reset\n\
         COMMIT\n"
    )
}

/// The daemon's own cgroup (v2), as the kernel names it to this process: the path the
/// `cgroup` match resolves in the cgroup namespace of the iptables it runs (the daemon's).
pub fn own_cgroup() -> Result<String, IptablesError> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| IptablesError::Missing("/proc/self/cgroup", e.to_string()))?;
    parse_own_cgroup(&text).ok_or_else(|| {
        IptablesError::Missing(
            "a cgroup v2 membership (0::/path in /proc/self/cgroup)",
            text.trim().to_string(),
        )
    })
}

fn parse_own_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .filter(|p| p.starts_with('/') && !p.contains(['"', '\\', '\n']))
}

/// Runs `script` with `sh` inside the network namespace of `pid`, `input` on its stdin.
async fn in_netns(pid: u32, script: &str, input: &str) -> Result<(), IptablesError> {
    let failed = |message: String| IptablesError::Failed { pid, message };
    let mut child = tokio::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("nsenter: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(|e| failed(format!("writing the rules: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Installs (or replaces: the chain is flushed and refilled, the jump added once) the
/// redirect in the pod's netns. Idempotent, so a restarted daemon re-applies it as is.
pub async fn redirect(
    pid: u32,
    port: u16,
    fail_closed: bool,
    inbound: Option<InboundRules<'_>>,
) -> Result<(), IptablesError> {
    let daemon_cgroup = own_cgroup()?;
    if let Some(inbound) = inbound {
        let script = format!(
            "iptables-restore -w --noflush && \
             {{ iptables -w -t nat -C PREROUTING -p tcp -j {INBOUND_CHAIN} 2>/dev/null || \
                iptables -w -t nat -A PREROUTING -p tcp -j {INBOUND_CHAIN}; }}"
        );
        in_netns(pid, &script, &inbound_rules(&inbound)).await?;
    }
    let nat = format!(
        "iptables-restore -w --noflush && \
         {{ iptables -w -t nat -C OUTPUT -p tcp -j {CHAIN} 2>/dev/null || \
            iptables -w -t nat -A OUTPUT -p tcp -j {CHAIN}; }}"
    );
    in_netns(pid, &nat, &nat_rules(port, &daemon_cgroup)).await?;
    if fail_closed {
        let ip6 = format!(
            "command -v ip6tables-restore >/dev/null || exit 0; \
             ip6tables-restore -w --noflush && \
             {{ ip6tables -w -C OUTPUT -p tcp -j {CHAIN} 2>/dev/null || \
                ip6tables -w -A OUTPUT -p tcp -j {CHAIN}; }}"
        );
        in_netns(pid, &ip6, &ip6_rules(&daemon_cgroup)).await?;
    }
    Ok(())
}

/// Removes the redirect (the pod stays, capture ends). Best effort: a pod whose netns is
/// gone took its rules with it.
pub async fn remove(pid: u32) {
    let script = format!(
        "iptables -w -t nat -D OUTPUT -p tcp -j {CHAIN} 2>/dev/null; \
         iptables -w -t nat -F {CHAIN} 2>/dev/null; iptables -w -t nat -X {CHAIN} 2>/dev/null; \
         iptables -w -t nat -D PREROUTING -p tcp -j {INBOUND_CHAIN} 2>/dev/null; \
         iptables -w -t nat -F {INBOUND_CHAIN} 2>/dev/null; \
         iptables -w -t nat -X {INBOUND_CHAIN} 2>/dev/null; \
         command -v ip6tables >/dev/null || exit 0; \
         ip6tables -w -D OUTPUT -p tcp -j {CHAIN} 2>/dev/null; \
         ip6tables -w -F {CHAIN} 2>/dev/null; ip6tables -w -X {CHAIN} 2>/dev/null; exit 0"
    );
    if let Err(e) = in_netns(pid, &script, "").await {
        tracing::debug!(error = %e, "removing the redirect");
    }
}

/// Marks a socket the daemon makes in a pod netns, so the redirect lets it through.
pub fn mark_upstream(socket: &socket2::Socket) -> std::io::Result<()> {
    socket.set_mark(UPSTREAM_MARK)
}

/// Where a connection redirected to one of the pod's listeners was going (conntrack's
/// `SO_ORIGINAL_DST`), None if it was not redirected.
pub fn original_destination(socket: BorrowedFd<'_>) -> Option<std::net::SocketAddrV4> {
    let addr =
        nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::OriginalDst).ok()?;
    if i32::from(addr.sin_family) != libc::AF_INET {
        return None;
    }
    Some(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

/// The data path's original destination in this mode: conntrack's, asked of the accepted
/// socket (`SO_ORIGINAL_DST`).
pub struct SockOrigDst;

impl crate::proxy::OrigDstLookup for SockOrigDst {
    fn lookup(&self, key: &ClientKey, socket: BorrowedFd<'_>) -> Option<OrigDst> {
        let addr =
            nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::OriginalDst).ok()?;
        if i32::from(addr.sin_family) != libc::AF_INET {
            return None;
        }
        Some(OrigDst {
            netns_cookie: key.netns_cookie,
            cgroup_id: 0,
            ip4_be: addr.sin_addr.s_addr,
            port: u16::from_be(addr.sin_port),
            _pad: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_return_for_loopback_and_our_cgroup_before_the_redirect_and_never_for_a_mark() {
        let r = nat_rules(15001, "/system.slice/proxy.scope");
        let ours = r
            .find("-m cgroup --path \"/system.slice/proxy.scope\" -j RETURN")
            .expect(&r);
        let lo = r.find("-d 127.0.0.0/8 -j RETURN").expect(&r);
        let redirect = r.find("REDIRECT --to-ports 15001").expect(&r);
        assert!(ours < redirect && lo < redirect, "{r}");
        assert!(
            !r.contains("--mark"),
            "a mark a pod can set lets nothing through: {r}"
        );
        assert!(r.starts_with("*nat\n") && r.ends_with("COMMIT\n"), "{r}");
        let nodes: std::collections::BTreeSet<std::net::Ipv4Addr> =
            ["169.254.7.127".parse().unwrap()].into();
        let inbound = inbound_rules(&InboundRules {
            inbound_port: 15006,
            hbone_port: 15008,
            node_addrs: &nodes,
        });
        let redirect = inbound.find("REDIRECT --to-ports 15006").expect(&inbound);
        for exempt in [
            "-i lo -j RETURN",
            "--dport 15008 -j RETURN",
            "-s 169.254.7.127/32 -j RETURN",
        ] {
            assert!(inbound.find(exempt).expect(exempt) < redirect, "{inbound}");
        }
        let r6 = ip6_rules("/a");
        assert!(r6.find("-d ::1/128 -j RETURN") < r6.find("REJECT"), "{r6}");
        assert!(!r6.contains("--mark"), "{r6}");
    }

    #[test]
    fn the_daemons_cgroup_comes_from_the_v2_line() {
        let hybrid = "12:pids:/x\n1:name=systemd:/x\n0::/kubepods/pod1/daemon\n";
        assert_eq!(
            parse_own_cgroup(hybrid).as_deref(),
            Some("/kubepods/pod1/daemon")
        );
        assert_eq!(parse_own_cgroup("0::/\n").as_deref(), Some("/"));
        assert_eq!(parse_own_cgroup("1:cpu:/x\n"), None);
        assert_eq!(parse_own_cgroup("0::/a\"b\n"), None);
    }
}
