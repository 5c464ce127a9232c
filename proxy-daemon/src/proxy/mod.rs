//! The data path: accept on a pod's listener → original destination → upstream from the
//! pod's netns → copy. (L7 handling arrives with the routing work; today every
//! connection is proxied as opaque TCP to where it was going.)
pub mod access_log;
pub mod balance;
pub mod dns;
pub mod ext_authz;
#[cfg(test)]
mod gamma_tests;
pub mod hbone;
pub mod http;
pub mod http_route;
pub mod inbound;
pub mod jwt;
pub mod limits;
pub mod outlier;
pub mod report;
pub mod route;
pub mod sniff;
pub mod tcp;
#[cfg(test)]
mod tests;
pub mod tls;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use socket2::Domain;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, warn};

use crate::{metrics::Metrics, state::workload::WorkloadInfo};
use proxy_common::{ClientKey, OrigDst};

/// Makes sockets inside one pod's network namespace, so upstream connections leave with the
/// pod's IP. Capture provides it (a thread that entered the pod netns); an in-process test
/// can hand out plain sockets.
pub trait SocketFactory: Send + Sync {
    /// A fresh non-blocking TCP socket of `domain`, ready to connect.
    fn tcp_socket(
        &self,
        domain: Domain,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<std::os::fd::OwnedFd>> + Send + '_>,
    >;
}

/// Where an accepted connection was going: capture provides it, from the eBPF maps (the
/// client's netns cookie and port → original destination) or, under `--capture iptables`,
/// from the accepted socket itself (`SO_ORIGINAL_DST`).
pub trait OrigDstLookup: Send + Sync {
    fn lookup(&self, key: &ClientKey, socket: std::os::fd::BorrowedFd<'_>) -> Option<OrigDst>;
}

/// What the data path does with a destination the registry does not know (Istio's
/// `outboundTrafficPolicy.mode`, the node default of `--outbound-traffic-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutboundPolicy {
    AllowAny,
    RegistryOnly,
}

/// Where the client meant to connect (recovered from the eBPF maps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDstAddr(pub SocketAddrV4);

/// The client's address as the pod-local listener sees it (127.0.0.1:<ephemeral>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl From<OrigDst> for OrigDstAddr {
    fn from(o: OrigDst) -> Self {
        Self(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(o.ip4_be)),
            o.port,
        ))
    }
}

/// One captured pod, as the data path needs it.
pub struct PodContext {
    pub workload: Arc<WorkloadInfo>,
    /// The pod's half of every metric label set, built once.
    pub source_labels: Arc<crate::metrics::SourceLabels>,
    pub netns: Arc<dyn SocketFactory>,
    pub netns_cookie: u64,
    /// Idle HTTP/1 upstream connections, made in this pod's netns (kept across identity
    /// updates).
    pub http_pool: Arc<http::UpstreamPool>,
    /// HBONE connections to mesh pods, made in this pod's netns.
    pub hbone: Arc<hbone::Pool>,
}

/// A pod's current context: replaced whole when the pod's labels change, so new
/// connections route (`sourceLabels`) and report with the new labels while open ones keep
/// the identity they started with.
pub type PodHandle = Arc<arc_swap::ArcSwap<PodContext>>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no original destination recorded for client {0:?}")]
    NoOrigDst(ClientAddr),
    #[error("upstream socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("TLS to {0}: {1}")]
    Tls(SocketAddr, String),
    #[error("HBONE: {0}")]
    Hbone(#[from] hbone::HboneError),
    #[error("refused by policy ({0}) for {1:?}")]
    Refused(&'static str, OrigDstAddr),
}

/// Everything endpoint choice reads and keeps: resolved DNS names, and what this proxy
/// learns per endpoint and host (outlier health, requests in flight, connectionPool
/// limits, balancer tables, round-robin positions). Owned by the proxy, dropped with it:
/// no process-wide statics.
pub struct Endpoints {
    /// Answers for ServiceEntry names with `resolution: DNS`.
    pub dns: Arc<crate::proxy::dns::DnsCache>,
    pub health: outlier::HealthTable,
    pub in_flight: limits::InFlight,
    pub host_limits: limits::HostLimits,
    pub retry_limits: limits::RetryLimits,
    pub tables: balance::Tables,
    pub round_robin: balance::RoundRobin,
}

impl Endpoints {
    pub fn new(dns: Arc<crate::proxy::dns::DnsCache>) -> Self {
        Self {
            dns,
            health: Default::default(),
            in_flight: Default::default(),
            host_limits: Default::default(),
            retry_limits: Default::default(),
            tables: Default::default(),
            round_robin: Default::default(),
        }
    }

    /// Drops what no longer belongs to anything: health of endpoints unused for `idle`
    /// (ejected ones stay until their ejection ends), limits of idle hosts. Returns how
    /// many entries went.
    pub fn prune(&self, idle: Duration) -> usize {
        self.health.prune(idle) + self.host_limits.prune() + self.retry_limits.prune()
    }
}

/// A weighted-choice roll: chosen per request at random, as Envoy does (a node-wide
/// counter would let one pod's traffic shift another's split).
pub fn weighted_roll() -> u32 {
    rand::random::<u32>()
}

/// The node-wide settings the data path reads (resolved from flags by the wiring; the data
/// path never sees command-line types).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProxySettings {
    /// Upstream connect (and TLS handshake) timeout.
    pub connect_timeout: Duration,
    /// Unknown destinations, unless a Sidecar says otherwise.
    pub outbound_policy: OutboundPolicy,
    /// Largest request body copied to a mirror; beyond it the copy is abandoned.
    pub mirror_max_body_bytes: usize,
    /// An HTTP/1 request head must arrive within this (slowloris); None: no limit.
    pub header_read_timeout: Option<Duration>,
    /// The proxy's ports in each captured pod: outbound listener (127.0.0.1), HBONE and
    /// plaintext inbound (the pod's address).
    pub outbound_port: u16,
    pub hbone_port: u16,
    pub inbound_port: u16,
}

/// What every connection handler shares.
pub struct ProxyInputs {
    pub settings: ProxySettings,
    pub orig_dst: Box<dyn OrigDstLookup>,
    pub metrics: Arc<Metrics>,
    /// The compiled configuration; loaded once per connection, never locked.
    pub config: Arc<crate::state::Published>,
    /// Endpoint choice: DNS answers and the per-endpoint state this proxy keeps.
    pub endpoints: Endpoints,
    /// Mirror copies in flight (fire-and-forget, bounded).
    pub mirror_slots: Arc<tokio::sync::Semaphore>,
    /// Splice pipes in use node-wide (two descriptors each): the connection budgets count
    /// two sockets per connection, so pipes come out of the daemon's own reserve and are
    /// capped; beyond the cap, bytes are copied in user space. A pod opening many busy
    /// opaque connections cannot spend the node's descriptors on pipes.
    pub splice_pipes: Arc<tokio::sync::Semaphore>,
    /// Upstream TLS (DestinationRule `tls`).
    pub tls: Arc<crate::proxy::tls::Originator>,
    /// Trace context, sampling and span export (see [`crate::spans`]).
    pub tracer: Arc<crate::spans::Tracer>,
    /// Downstream connections in flight, node-wide and per source namespace.
    pub connections: limits::ConnectionBudget,
    /// Request bodies held for retries, per source namespace.
    /// TLS handshakes in progress at the pods' HBONE ports, per source namespace.
    pub handshakes: limits::HandshakeBudget,
    /// JWKS documents RequestAuthentication rules name by URI.
    pub jwks: jwt::JwksCache,
    pub bodies: limits::BodyBudget,
    /// Workload certificates of the pods enrolled here (HBONE's mutual TLS).
    pub certs: Arc<crate::identity::CertManager>,
    /// Addresses of the pods this daemon has enrolled: a mesh pod of this node speaks
    /// HBONE only once it has.
    pub enrolled: Arc<arc_swap::ArcSwap<std::collections::HashSet<std::net::IpAddr>>>,
    /// Idle upstream connections of all pods: count and cap.
    pub idle_upstream: Arc<http::IdleBudget>,
    /// Turns true when the daemon starts draining: HTTP connections finish the request in
    /// flight and close (`Connection: close`, h2 GOAWAY) instead of waiting for more.
    pub draining: tokio::sync::watch::Receiver<bool>,
}

impl ProxyInputs {
    fn orig_dst(
        &self,
        pod: &PodContext,
        client: ClientAddr,
        socket: &TcpStream,
    ) -> Result<OrigDstAddr, ProxyError> {
        let key = ClientKey::new(pod.netns_cookie, client.0.port());
        self.orig_dst
            .lookup(&key, std::os::fd::AsFd::as_fd(socket))
            .map(OrigDstAddr::from)
            .ok_or(ProxyError::NoOrigDst(client))
    }
}

/// Opens a connection to `dst` from inside the pod's network namespace, so the
/// destination sees the pod's IP (and NetworkPolicy keeps applying).
/// The mesh pod at `addr` if it speaks HBONE now: one on another node (its node's proxy, or
/// ztunnel, serves its port 15008), or one of this node enrolled by this daemon.
pub fn hbone_peer(
    inputs: &ProxyInputs,
    snap: &crate::state::Snapshot,
    addr: SocketAddr,
) -> Option<Arc<crate::state::MeshPeer>> {
    let peer = snap.mesh.get(&addr.ip())?;
    (!peer.this_node || inputs.enrolled.load().contains(&addr.ip())).then(|| peer.clone())
}

/// Whether a connection to a (possibly mesh) endpoint may go ahead under its
/// DestinationRule TLS: `ISTIO_MUTUAL` means mutual TLS with workload identities, so it
/// only goes over HBONE (never in plaintext to an endpoint outside the mesh), and its
/// `subjectAltNames`, when given, must name the destination's identity.
pub fn istio_mutual_check(
    tls: Option<&tls::UpstreamTls>,
    mesh: Option<&crate::state::MeshPeer>,
) -> Result<(), String> {
    let Some(t) = tls.filter(|t| t.settings.mode == crate::config::istio::TlsMode::IstioMutual)
    else {
        return Ok(());
    };
    let Some(mesh) = mesh else {
        return Err(
            "tls mode ISTIO_MUTUAL: the endpoint is not a mesh pod (no HBONE), so not sending it plaintext"
                .into(),
        );
    };
    let sans = &t.settings.subject_alt_names;
    let identity = mesh.identity.to_string();
    if !sans.is_empty() && !sans.contains(&identity) {
        return Err(format!(
            "tls mode ISTIO_MUTUAL: the endpoint's identity {identity} is not among subjectAltNames {sans:?}"
        ));
    }
    Ok(())
}

pub async fn connect_from_pod(
    pod: &PodContext,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ProxyError> {
    let fd = pod.netns.tcp_socket(Domain::for_address(dst)).await?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(ProxyError::Connect(dst, e)),
        Err(_) => Err(ProxyError::ConnectTimeout(dst)),
    }
}

/// Accepts on one pod's listener until the task is aborted (un-enrolment or shutdown).
/// Keeps `proxy_daemon_active_connections` right however the handler ends.
pub(crate) struct ActiveGuard(prometheus_client::metrics::gauge::Gauge);

impl ActiveGuard {
    /// Counts one more connection in `proxy_daemon_active_connections` (what the drain
    /// waits for) until dropped.
    pub(crate) fn count(inputs: &ProxyInputs) -> Self {
        let gauge = inputs.metrics.daemon.active_connections.clone();
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub async fn run_outbound_listener(
    inputs: Arc<ProxyInputs>,
    handle: PodHandle,
    listener: TcpListener,
) {
    loop {
        let accepted = listener.accept().await;
        let pod = handle.load_full();
        match accepted {
            Ok((stream, peer)) => {
                let permit = match inputs.connections.admit(&pod.workload.namespace) {
                    Ok(p) => p,
                    Err(refusal) => {
                        // Over budget: reset at once (the app sees ECONNRESET and can
                        // back off), never queue.
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        drop(stream);
                        inputs
                            .metrics
                            .daemon
                            .connections_refused
                            .get_or_create(&crate::metrics::RefusalLabels {
                                reason: refusal.label(),
                                namespace: pod.workload.namespace.clone(),
                            })
                            .inc();
                        continue;
                    }
                };
                // Every connection counts for the drain, whatever its protocol, from the
                // moment it is accepted: counted inside the task, a connection accepted just
                // before the drain could go unseen until its task first ran, and the
                // daemon could exit with it unanswered.
                let active = inputs.metrics.daemon.active_connections.clone();
                active.inc();
                let active = ActiveGuard(active);
                let inputs = inputs.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _active = active;
                    let client = ClientAddr(peer);
                    if let Err(e) = handle_connection(inputs, pod.clone(), stream, client).await {
                        debug!(pod = %pod.workload.pod_name, error = %e, "connection ended with error");
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(pod = %pod.workload.pod_name, error = %e, "accept failed");
                inputs.metrics.daemon.listener_failures.inc();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle_connection(
    inputs: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    client: ClientAddr,
) -> Result<(), ProxyError> {
    let dst = match inputs.orig_dst(&pod, client, &stream) {
        Ok(dst) => dst,
        Err(e) => {
            inputs.metrics.daemon.orig_dst_missing.inc();
            return Err(e);
        }
    };
    let _ = stream.set_nodelay(true);
    // A declared protocol (Service port name / appProtocol, ServiceEntry protocol) decides
    // how to detect; undeclared ports are sniffed with a short bound.
    let declared = {
        let snap = inputs.config.load();
        snap.registry
            .by_addr(SocketAddr::V4(dst.0), &pod.workload.namespace)
            .and_then(|s| s.port(dst.0.port() as u32))
            .map(|p| sniff::Declared::from(p.class))
            .unwrap_or(sniff::Declared::Undeclared)
    };
    let mut draining = inputs.draining.clone();
    let detected = tokio::select! {
        p = sniff::detect_declared(&stream, declared) => p,
        // A connection that has sent nothing by a drain's grace is closed: it would
        // otherwise hold the drain to its timeout (pools open connections long before
        // their first request, and a declared HTTP port waits for one for an hour).
        _ = http::drained_for(&mut draining, http::FIRST_REQUEST_GRACE) => return Ok(()),
    };
    match detected {
        sniff::Protocol::Http1 => http::serve(inputs, pod, stream, dst).await,
        // The app's own TLS is not terminated: routed by its SNI, copied as it is.
        sniff::Protocol::Tls => {
            let sni = sniff::peek_sni(&stream).await;
            tcp::proxy(&inputs, &pod, stream, dst, sni).await
        }
        sniff::Protocol::Http2 => http::serve_h2(inputs, pod, stream, dst).await,
        sniff::Protocol::Opaque => tcp::proxy(&inputs, &pod, stream, dst, None).await,
    }
}
