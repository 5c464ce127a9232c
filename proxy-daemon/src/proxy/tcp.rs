//! Opaque TCP: copy both ways, half-close faithfully, count bytes as they pass.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};
use tracing::debug;

use super::{
    connect_from_pod,
    route::{self, L4Decision},
    OrigDstAddr, PodContext, ProxyError, ProxyInputs,
};
use crate::{
    metrics::{DestinationLabels, IstioTcpLabels, PeerLabels},
    proxy::tls::UpstreamIo,
};

const COPY_BUFFER: usize = 64 * 1024;

/// Splice pipes at most, node-wide: 256 pipes are 512 descriptors of the 1,024 the fd
/// budgets keep for the daemon itself.
pub const SPLICE_PIPES: usize = 256;

pub async fn proxy(
    inputs: &ProxyInputs,
    pod: &PodContext,
    mut client: TcpStream,
    dst: OrigDstAddr,
    sni: Option<String>,
) -> Result<(), ProxyError> {
    let daemon = &inputs.metrics.daemon;
    let started = std::time::Instant::now();
    let start_time = std::time::SystemTime::now();
    let snapshot = inputs.config.load();
    let decision = route::decide(
        &snapshot,
        &inputs.endpoints,
        pod,
        dst.0,
        inputs.settings.outbound_policy,
        super::weighted_roll(),
        sni.as_deref(),
    );
    let tcp = &inputs.metrics.tcp;
    let (upstream_addr, destination, tls, idle_timeout) = match decision {
        L4Decision::Forward {
            upstream,
            labels,
            tls,
            idle_timeout,
        } => (upstream, Arc::new(labels), tls, idle_timeout),
        L4Decision::Refuse { labels, flags } => {
            let dest = Arc::new(labels);
            let refused =
                IstioTcpLabels::new(&pod.source_labels, &PeerLabels::unknown(), &dest, flags);
            tcp.open(&refused);
            tcp.close(&refused);
            super::report::log_tcp(super::report::TcpLog {
                pod,
                snap: &snapshot,
                start_time,
                duration: started.elapsed(),
                dest: &dest,
                peer: &PeerLabels::unknown(),
                upstream: None,
                original_dst: SocketAddr::V4(dst.0),
                requested_server_name: sni.as_deref(),
                flags,
                received: 0,
                sent: 0,
            });
            // Reset: the app sees the connection refused, as Envoy's BlackHole does.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return Err(ProxyError::Refused(flags, dst));
        }
    };
    // connectionPool.tcp.maxConnections: over it, the connection is reset (UO).
    let pool = {
        let snap = inputs.config.load();
        snap.routes
            .destination_rule(
                &destination.service,
                &pod.workload.namespace,
                Some(&destination.service_namespace),
            )
            .and_then(|dr| {
                dr.effective(Some(dst.0.port() as u32), None)
                    .connection_pool
            })
    };
    let peer = super::report::peer_for(&snapshot, &destination, Some(upstream_addr));
    let mesh_peer = super::hbone_peer(inputs, &snapshot, upstream_addr);
    drop(snapshot);
    // Over HBONE both ends are known: who this pod is, and who the destination must prove
    // to be (the tunnel is refused otherwise).
    let principals = mesh_peer.as_ref().map(|m| {
        Arc::new(crate::metrics::Principals {
            source: pod
                .workload
                .identity(inputs.certs.trust_domain())
                .to_string(),
            destination: m.identity.to_string(),
        })
    });
    let Ok(_permit) = inputs
        .endpoints
        .host_limits
        .admit(
            &pod.source_labels,
            &destination.service,
            pool.as_ref(),
            false,
        )
        .await
    else {
        let overflow = IstioTcpLabels::new(&pod.source_labels, &peer, &destination, "UO");
        tcp.open(&overflow);
        tcp.close(&overflow);
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        return Err(ProxyError::Refused("UO", dst));
    };
    let _load = inputs.endpoints.in_flight.start(upstream_addr);
    let labels =
        IstioTcpLabels::new(&pod.source_labels, &peer, &destination, "").with_mtls(principals);
    tcp.open(&labels);

    // connectionPool.tcp.connectTimeout bounds the connect (and TLS handshake), as
    // Envoy's cluster connect_timeout does; the daemon's flag is the default.
    let connect_timeout = pool
        .as_ref()
        .and_then(|p| p.connect_timeout)
        .unwrap_or(inputs.settings.connect_timeout);
    let connected = if let Err(reason) =
        super::istio_mutual_check(tls.as_deref(), mesh_peer.as_deref())
    {
        tracing::warn!(upstream = %upstream_addr, %reason, "upstream refused");
        Err(ProxyError::Tls(upstream_addr, reason))
    } else if let Some(mesh) = &mesh_peer {
        super::hbone::open(
            inputs,
            pod,
            super::hbone::TunnelRequest {
                target: upstream_addr,
                peer: &mesh.identity,
                service: Some(destination.service.as_str()),
                connect_timeout,
            },
        )
        .await
        .map(|t| UpstreamIo::Tunnel(Box::new(t)))
        .map_err(|e| {
            tracing::warn!(upstream = %upstream_addr, error = %e, "HBONE tunnel failed");
            ProxyError::from(e)
        })
    } else {
        match connect_from_pod(pod, upstream_addr, connect_timeout).await {
            Ok(s) => match &tls {
                None => Ok(UpstreamIo::Plain(s)),
                Some(t) => {
                    // DestinationRule tls on a TCP port: the bytes go out inside TLS.
                    let handshake = tokio::time::timeout(
                        connect_timeout,
                        inputs.tls.connect(t, b"", s, &pod.workload.namespace),
                    )
                    .await
                    .unwrap_or_else(|_| Err("handshake timed out".into()));
                    let result = match &handshake {
                        Ok((_, crate::proxy::tls::Handshake::Full)) => "full",
                        Ok((_, crate::proxy::tls::Handshake::Resumed)) => "resumed",
                        Err(_) => "failed",
                    };
                    daemon
                        .upstream_tls_handshakes
                        .get_or_create(&crate::metrics::TlsHandshakeLabels { result })
                        .inc();
                    handshake.map(|(io, _)| io).map_err(|reason| {
                    tracing::warn!(upstream = %upstream_addr, sni = %t.sni, %reason, "upstream TLS handshake failed");
                    ProxyError::Tls(upstream_addr, reason)
                })
                }
            },
            Err(e) => Err(e),
        }
    };
    let upstream = match connected {
        Ok(s) => s,
        Err(e) => {
            daemon.upstream_connect_failures.inc();
            let flag = match &e {
                ProxyError::Hbone(h) => h.flag(),
                _ => "UF",
            };
            tcp.close(&labels.with_flags(flag));
            let facts = ConnectionFacts {
                start_time,
                started,
                dest: &destination,
                peer: &peer,
                upstream: upstream_addr,
                dst,
                sni: sni.as_deref(),
            };
            log_close(inputs, pod, &facts, "UF", (0, 0));
            // Reset, so the app sees the connection fail rather than a clean empty close.
            // (SO_LINGER 0 never blocks on drop: it discards instead of waiting.)
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return Err(e);
        }
    };
    let handles = tcp.handles(&labels);
    let (received, sent) = (handles.received_bytes, handles.sent_bytes);
    let activity = Activity::new();
    let result = match upstream {
        UpstreamIo::Plain(plain) => {
            // Plain on both sides: the kernel moves the bytes (splice through a pipe),
            // never copying them into the daemon (a client socket paired by `--sockmap`
            // is found out and copied: see `waiting_beyond_splice`).
            let copied = until_idle(
                async {
                    tokio::try_join!(
                        splice_counted(
                            &inputs.splice_pipes,
                            &client,
                            &plain,
                            &received,
                            (&activity, 0)
                        ),
                        splice_counted(
                            &inputs.splice_pipes,
                            &plain,
                            &client,
                            &sent,
                            (&activity, 1)
                        ),
                    )
                },
                &activity,
                idle_timeout,
            )
            .await;
            if matches!(copied, Some(Err(_))) {
                // The client reset (or a write failed): reset the upstream too.
                let _ = socket2::SockRef::from(&plain).set_linger(Some(Duration::ZERO));
            }
            copied
        }
        tls_stream => {
            let (mut client_read, mut client_write) = client.split();
            let (mut upstream_read, mut upstream_write) = tokio::io::split(tls_stream);
            until_idle(
                async {
                    tokio::try_join!(
                        copy_counted(
                            &mut client_read,
                            &mut upstream_write,
                            &received,
                            (&activity, 0)
                        ),
                        copy_counted(&mut upstream_read, &mut client_write, &sent, (&activity, 1)),
                    )
                },
                &activity,
                idle_timeout,
            )
            .await
        }
    };
    let result = match result {
        Some(copied) => copied,
        None => {
            // tcp.idleTimeout: both sides closed (FIN), as Envoy's tcp_proxy does.
            daemon.tcp_idle_timeouts.inc();
            debug!(dst = %dst.0, timeout = ?idle_timeout, "opaque TCP connection idle: closed");
            Ok((activity.bytes(0), activity.bytes(1)))
        }
    };
    if result.is_err() {
        // A reset on either side is passed on as a reset, not a clean close, so the app
        // sees the failure it would have seen without the proxy.
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
    }
    let flags = match &result {
        Ok(_) => "",
        Err(_) => "UC",
    };
    if let Err(e) = &result {
        debug!(dst = %dst.0, error = %e, "copy ended with error");
    }
    tcp.close(&labels.with_flags(flags));
    let totals = result.as_ref().map(|(r, s)| (*r, *s)).unwrap_or((0, 0));
    let facts = ConnectionFacts {
        start_time,
        started,
        dest: &destination,
        peer: &peer,
        upstream: upstream_addr,
        dst,
        sni: sni.as_deref(),
    };
    log_close(inputs, pod, &facts, flags, totals);
    Ok(())
}

/// What the access log line of a forwarded connection says besides its outcome.
struct ConnectionFacts<'a> {
    start_time: std::time::SystemTime,
    started: std::time::Instant,
    dest: &'a DestinationLabels,
    peer: &'a PeerLabels,
    upstream: SocketAddr,
    dst: OrigDstAddr,
    /// The SNI of the app's own TLS, when it sent a ClientHello.
    sni: Option<&'a str>,
}

fn log_close(
    inputs: &ProxyInputs,
    pod: &PodContext,
    c: &ConnectionFacts,
    flags: &str,
    (received, sent): (u64, u64),
) {
    let snap = inputs.config.load();
    super::report::log_tcp(super::report::TcpLog {
        pod,
        snap: &snap,
        start_time: c.start_time,
        duration: c.started.elapsed(),
        dest: c.dest,
        peer: c.peer,
        upstream: Some(c.upstream),
        original_dst: SocketAddr::V4(c.dst.0),
        requested_server_name: c.sni,
        flags,
        received,
        sent,
    });
}

/// When bytes last moved on a connection, either way, and how many moved each way.
struct Activity {
    started: tokio::time::Instant,
    /// Milliseconds after `started`.
    last_ms: std::sync::atomic::AtomicU64,
    bytes: [std::sync::atomic::AtomicU64; 2],
}

impl Activity {
    fn new() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            last_ms: Default::default(),
            bytes: Default::default(),
        }
    }

    fn moved(&self, direction: usize, n: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.last_ms
            .store(self.started.elapsed().as_millis() as u64, Relaxed);
        self.bytes[direction].fetch_add(n, Relaxed);
    }

    fn bytes(&self, direction: usize) -> u64 {
        self.bytes[direction].load(std::sync::atomic::Ordering::Relaxed)
    }

    fn last(&self) -> tokio::time::Instant {
        let ms = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.started + Duration::from_millis(ms)
    }
}

/// Runs `copy` to its end, or gives up (None) once no byte moved for `timeout`. The timer
/// is re-armed from the last activity, not per read, so a busy connection costs no timer
/// churn.
async fn until_idle<T>(
    copy: impl std::future::Future<Output = T>,
    activity: &Activity,
    timeout: Option<Duration>,
) -> Option<T> {
    let Some(timeout) = timeout else {
        return Some(copy.await);
    };
    let idle = async {
        loop {
            let deadline = activity.last() + timeout;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        out = copy => Some(out),
        _ = idle => None,
    }
}

/// The first read buffer of each direction: an idle connection holds this much, not
/// [`COPY_BUFFER`] (one that moves data grows to it after a full read).
const FIRST_BUFFER: usize = 4 * 1024;

/// Copies both ways between `a` and `b` until both directions end (each half-closed in
/// turn), counting the bytes from `a` in `counters.0` and those from `b` in `counters.1`.
pub(super) async fn copy_pair<A, B>(
    a: &mut A,
    b: &mut B,
    counters: (&Counter, &Counter),
) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    tokio::try_join!(
        copy_counted(&mut a_read, &mut b_write, counters.0, (&activity, 0)),
        copy_counted(&mut b_read, &mut a_write, counters.1, (&activity, 1)),
    )
}

/// Copies until EOF, then shuts down the write side (half-close), counting as it goes
/// (direction 0: client → upstream, 1: upstream → client).
async fn copy_counted<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &Counter,
    (activity, direction): (&Activity, usize),
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; FIRST_BUFFER];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(total);
        }
        writer.write_all(&buf[..n]).await?;
        total += n as u64;
        counter.inc_by(n as u64);
        activity.moved(direction, n as u64);
        if n == buf.len() && buf.len() < COPY_BUFFER {
            buf.resize(COPY_BUFFER, 0);
        }
    }
}

/// A pipe for splice(2), closed on drop (with its place under [`SPLICE_PIPES`]).
struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl Pipe {
    fn new(budget: &Arc<tokio::sync::Semaphore>) -> std::io::Result<Self> {
        let place = budget
            .clone()
            .try_acquire_owned()
            .map_err(|_| std::io::Error::other("splice pipes at their cap"))?;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        use std::os::fd::FromRawFd as _;
        // SAFETY: both descriptors were just created and are owned by nothing else.
        Ok(unsafe {
            Pipe {
                read: std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                write: std::os::fd::OwnedFd::from_raw_fd(fds[1]),
                _place: place,
            }
        })
    }
}

/// One splice(2) call, non-blocking: bytes moved (0 at EOF), or the error.
fn splice_once(from: libc::c_int, to: libc::c_int, len: usize) -> std::io::Result<usize> {
    // SAFETY: plain descriptors, no offsets; the kernel checks everything else.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// [`copy_counted`] for two plain sockets, with splice(2): socket → pipe → socket inside
/// the kernel, waiting on tokio's readiness. The pipe is made when the first bytes are
/// ready to move (an idle connection holds no extra descriptors); when none can be made
/// (descriptors spent, or [`SPLICE_PIPES`] in use), the bytes are copied as
/// [`copy_counted`] does.
async fn splice_counted(
    budget: &Arc<tokio::sync::Semaphore>,
    from: &TcpStream,
    to: &TcpStream,
    counter: &Counter,
    (activity, direction): (&Activity, usize),
) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    use tokio::io::Interest;
    let mut total = 0u64;
    let mut pipe: Option<Pipe> = None;
    loop {
        from.readable().await?;
        let pipe_ref = match &pipe {
            Some(p) => p,
            None => match Pipe::new(budget) {
                Ok(p) => pipe.insert(p),
                Err(_) => return copy_plain(from, to, counter, (activity, direction), total).await,
            },
        };
        // The paired check runs inside `try_io`, so tokio keeps the readiness when the
        // bytes wait where only recv(2) finds them: the copy loop then reads at once.
        let moved = from.try_io(Interest::READABLE, || {
            match splice_once(from.as_raw_fd(), pipe_ref.write.as_raw_fd(), COPY_BUFFER) {
                Ok(0) if waiting_beyond_splice(from.as_raw_fd()) => Ok(SpliceIn::Paired),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && waiting_beyond_splice(from.as_raw_fd()) =>
                {
                    Ok(SpliceIn::Paired)
                }
                Ok(n) => Ok(SpliceIn::Moved(n)),
                Err(e) => Err(e),
            }
        });
        let n = match moved {
            Ok(SpliceIn::Paired) => {
                return copy_plain(from, to, counter, (activity, direction), total).await;
            }
            Ok(SpliceIn::Moved(0)) => {
                // EOF: pass the half-close on.
                socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                return Ok(total);
            }
            Ok(SpliceIn::Moved(n)) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice_once(pipe_ref.read.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        counter.inc_by(n as u64);
        activity.moved(direction, n as u64);
    }
}

/// What one splice from the client found.
enum SpliceIn {
    /// Bytes moved into the pipe (0: end of stream).
    Moved(usize),
    /// The socket is paired in a sockmap: see [`waiting_beyond_splice`].
    Paired,
}

/// Whether `socket` has bytes to read that splice(2) did not find: a socket paired in a
/// sockmap (`--sockmap`, by this daemon or by the one it took over from) receives the
/// pod's messages in a queue only recv(2) reads. Asked when splice finds nothing, or the
/// FIN; a byte that merely arrived in between makes the caller copy, which is correct too.
fn waiting_beyond_splice(socket: std::os::fd::RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: one byte into a valid buffer; the kernel checks the descriptor.
    let peeked = unsafe {
        libc::recv(
            socket,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    peeked > 0
}

/// The copy loop for two plain sockets without a pipe (descriptors spent).
async fn copy_plain(
    from: &TcpStream,
    to: &TcpStream,
    counter: &Counter,
    (activity, direction): (&Activity, usize),
    mut total: u64,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        // Read first, wait after: a caller may hand over with readiness already spent.
        let n = match from.try_read(&mut buf) {
            Ok(0) => {
                socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                from.readable().await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut sent = 0;
        while sent < n {
            to.writable().await?;
            match to.try_write(&buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        counter.inc_by(n as u64);
        activity.moved(direction, n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (b, _) = l.accept().await.expect("accept");
        (a, b)
    }

    /// Bytes arrive whole and the half-close passes on, with a pipe under the cap and with
    /// the user-space copy once the cap is spent; the pipe's place is given back.
    #[tokio::test]
    async fn splice_moves_bytes_and_falls_back_when_the_pipe_cap_is_spent() {
        for cap in [1, 0] {
            let budget = Arc::new(tokio::sync::Semaphore::new(cap));
            let (mut app, from) = pair().await;
            let (to, mut upstream) = pair().await;
            let counter = Counter::default();
            let activity = Activity::new();
            let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let sent = payload.clone();
            let writer = tokio::spawn(async move {
                app.write_all(&sent).await.expect("write");
                app.shutdown().await.expect("shutdown");
                app
            });
            let copy = splice_counted(&budget, &from, &to, &counter, (&activity, 0));
            let read = async {
                let mut got = Vec::new();
                upstream.read_to_end(&mut got).await.expect("read");
                got
            };
            let (copied, got) = tokio::join!(copy, read);
            assert_eq!(copied.expect("copied"), payload.len() as u64, "cap {cap}");
            assert_eq!(got, payload, "cap {cap}: bytes intact, EOF passed on");
            assert_eq!(counter.get(), payload.len() as u64);
            assert_eq!(budget.available_permits(), cap, "the pipe's place is back");
            let _ = writer.await;
        }
    }
}
