//! The destination side of a captured pod: connections for its app, arriving over HBONE
//! (mutual TLS, see [`super::hbone`]) or in plaintext on the pod's inbound port (the
//! kernel's inbound program hands them over with the app's address as the local address).
//! Each is checked against the pod's PeerAuthentication, delivered to the app from
//! [`INBOUND_SOURCE`] in the pod's namespace, and reported as Istio's destination proxy
//! reports it: HTTP sniffed (requests), anything else as TCP (connections).
use std::{
    borrow::Cow,
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{atomic::AtomicU64, Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use bytes::{Buf as _, Bytes};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info, warn};

use super::{sniff, PodContext, PodHandle, ProxyInputs};
use crate::{
    identity::Identity,
    metrics::{
        DestinationLabels, IstioTcpLabels, PeerLabels, Principals, Reporter, RequestLabels,
        RequestRecord, SourceLabels,
    },
    proxy::access_log::Value,
    state::{authz, security::EffectiveMode, Snapshot},
};

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// Where the destination side connects to the app from, in the pod's namespace (Istio's
/// sidecars use the same address; the app sees it as its peer). Loopback: the inbound
/// program leaves it alone.
pub const INBOUND_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// How long a caller that said nothing is waited for before its bytes are taken as opaque
/// (server-first protocols speak first from the app).
const UNDECLARED_SNIFF: Duration = sniff::SNIFF_TIMEOUT;
/// How long a declared-HTTP port waits for the first request (as on the source side).
const DECLARED_HTTP_SNIFF: Duration = Duration::from_secs(3600);
/// Bytes read to tell the protocol (the HTTP/2 preface is the longest thing looked for).
const SNIFF_BYTES: usize = 64;

/// A connection for a pod's app, as it arrived.
pub struct Arrival {
    pub pod: Arc<PodContext>,
    /// The app's address and port (the pod's address, the port the caller dialled).
    pub target: SocketAddr,
    /// The TCP peer: the calling pod's address.
    pub peer: SocketAddr,
    /// The caller's verified identity (HBONE); None for plaintext.
    pub caller: Option<Identity>,
    /// This pod's identity.
    pub own: Identity,
    /// The Service the caller's proxy said the connection is for (`forwarded: host=`).
    pub forwarded_host: Option<String>,
}

/// Why a connection for the app was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// Plaintext to a port whose PeerAuthentication mode is STRICT.
    PlaintextUnderStrict,
    /// A port of the proxy itself (no loops through the daemon).
    ProxyPort,
    /// An AuthorizationPolicy denied the connection.
    Authorization,
}

impl Denial {
    pub fn reason(self) -> &'static str {
        match self {
            Denial::PlaintextUnderStrict => "plaintext_strict",
            Denial::ProxyPort => "proxy_port",
            Denial::Authorization => "authorization",
        }
    }
}

/// Decides whether a connection may reach the app (policy only: nothing is done here).
pub fn admit(
    snap: &Snapshot,
    settings: &super::ProxySettings,
    arrival: &Arrival,
) -> Result<EffectiveMode, Denial> {
    let port = arrival.target.port();
    if [
        settings.hbone_port,
        settings.inbound_port,
        settings.outbound_port,
    ]
    .contains(&port)
    {
        return Err(Denial::ProxyPort);
    }
    let w = &arrival.pod.workload;
    let mode = snap.peer_authentication.mode(&w.namespace, &w.labels, port);
    if arrival.caller.is_none() && !mode.accepts_plaintext() {
        return Err(Denial::PlaintextUnderStrict);
    }
    Ok(mode)
}

/// The destination's view of a connection: its metric labels and the port's protocol.
pub struct Destination {
    pub labels: IstioTcpLabels,
    pub declared: sniff::Declared,
}

/// Names the caller (the cluster state's workload at its address), this pod, the Service
/// (the one the caller's proxy named, if it selects this pod; else the Service whose
/// endpoint this port is) and both principals.
pub fn describe(snap: &Snapshot, arrival: &Arrival) -> Destination {
    let source = snap
        .peers
        .get(&arrival.peer.ip())
        .map(|p| SourceLabels::from_peer(p))
        .unwrap_or_else(SourceLabels::unknown);
    let destination = PeerLabels::of(&arrival.pod.workload);
    let served = snap.registry.served_at(arrival.target);
    let named = arrival.forwarded_host.as_deref().and_then(|host| {
        snap.registry
            .services
            .get(host)?
            .iter()
            .find(|s| {
                s.endpoints
                    .iter()
                    .any(|e| e.ip == Some(arrival.target.ip()))
            })
            .map(|s| (s.hostname.clone(), s.name.clone(), s.namespace.clone()))
    });
    let service =
        named.or_else(|| served.map(|s| (s.hostname.clone(), s.name.clone(), s.namespace.clone())));
    let unknown = crate::state::workload::UNKNOWN;
    let service = Arc::new(match service {
        Some((hostname, name, namespace)) => DestinationLabels {
            service: hostname,
            service_name: name,
            service_namespace: namespace,
        },
        None => DestinationLabels {
            service: unknown.into(),
            service_name: unknown.into(),
            service_namespace: unknown.into(),
        },
    });
    let mtls = arrival.caller.as_ref().map(|caller| {
        Arc::new(Principals {
            source: caller.to_string(),
            destination: arrival.own.to_string(),
        })
    });
    Destination {
        labels: IstioTcpLabels::new(&source, &destination, &service, "")
            .reported_by(Reporter::Destination)
            .with_mtls(mtls),
        declared: served
            .map(|s| sniff::Declared::from(s.class))
            .unwrap_or(sniff::Declared::Undeclared),
    }
}

// ---- AuthorizationPolicy

/// What the AuthorizationPolicies say of a connection before its first byte.
pub enum ConnectionAuthz {
    Allowed,
    Denied(authz::Decision),
    /// A policy names HTTP fields: decided per request (HTTP) or once the protocol is
    /// known (TCP).
    Later,
}

/// The workload (and Service, when known) a connection is for, as the policies see it.
fn authz_target<'a>(arrival: &'a Arrival, service: &'a str) -> authz::Target<'a> {
    let w = &arrival.pod.workload;
    authz::Target {
        namespace: &w.namespace,
        labels: &w.labels,
        service: (service != crate::state::workload::UNKNOWN).then_some(service),
    }
}

fn authz_attributes<'a>(
    arrival: &'a Arrival,
    http: Option<authz::HttpAttributes<'a>>,
) -> authz::Attributes<'a> {
    authz::Attributes {
        peer: arrival.caller.as_ref(),
        source_ip: Some(arrival.peer.ip()),
        destination: Some(arrival.target),
        sni: None,
        http,
        request_auth: None,
    }
}

/// Decides a connection at its start when no policy binding the pod needs HTTP to decide.
pub fn authorize_connection(
    inputs: &ProxyInputs,
    snap: &Snapshot,
    arrival: &Arrival,
    destination: &Destination,
) -> ConnectionAuthz {
    let policies = snap
        .authorization
        .for_target(&authz_target(arrival, &destination.labels.service.service));
    if policies.is_empty() {
        return ConnectionAuthz::Allowed;
    }
    if policies.iter().any(|p| p.needs_http()) {
        return ConnectionAuthz::Later;
    }
    let decision = tcp_custom(
        snap,
        authz::decide(&policies, &authz_attributes(arrival, None)),
    );
    if decision.denied() {
        // (An allowed connection is counted once its protocol is known.)
        record_authz(inputs, arrival, &decision, "tcp");
        ConnectionAuthz::Denied(decision)
    } else {
        ConnectionAuthz::Allowed
    }
}

/// The decision for a connection once it is known not to be HTTP (None: no policy).
fn authorize_tcp(inputs: &ProxyInputs, call: &Call) -> Option<authz::Decision> {
    let snap = inputs.config.load();
    let policies = snap
        .authorization
        .for_target(&authz_target(&call.arrival, &call.labels.service.service));
    if policies.is_empty() {
        return None;
    }
    Some(tcp_custom(
        &snap,
        authz::decide(&policies, &authz_attributes(&call.arrival, None)),
    ))
}

/// On TCP, an HTTP authorizer has nothing to check (Istio adds no TCP filter for it); a
/// CUSTOM match whose provider is unknown or not callable here is denied.
fn tcp_custom(snap: &Snapshot, mut decision: authz::Decision) -> authz::Decision {
    if let Some((policy, provider)) = &decision.custom {
        let usable = matches!(
            snap.authorization.providers.get(provider),
            Some(authz::ExtAuthz::Http(_))
        );
        if !usable && !decision.denied() {
            decision.verdict = authz::Verdict::Deny(Some(policy.clone()));
        }
    }
    decision
}

/// Counts a decision (and the AUDIT and dry-run policies it met), and logs each denying
/// or dry-run policy once per pod.
fn record_authz(
    inputs: &ProxyInputs,
    arrival: &Arrival,
    decision: &authz::Decision,
    layer: &'static str,
) {
    let family = &inputs.metrics.daemon.authorization;
    let count = |policy: String, decision: &'static str| {
        family
            .get_or_create(&crate::metrics::AuthorizationLabels {
                policy,
                decision,
                layer,
            })
            .inc();
    };
    let w = &arrival.pod.workload;
    let policy = decision.policy();
    count(
        policy.clone(),
        if decision.denied() { "deny" } else { "allow" },
    );
    if decision.denied() && log_first(&format!("authz/{}/{}/{policy}", w.namespace, w.pod_name)) {
        info!(pod = %w.pod_name, namespace = %w.namespace, peer = %arrival.peer, policy = %policy, "AuthorizationPolicy denied a {layer} call (logged once per pod and policy; counted in proxy_daemon_authorization_total)");
    }
    for audited in &decision.audited {
        count(audited.clone(), "audit");
    }
    for (dry, would_deny) in &decision.dry_run {
        count(
            dry.clone(),
            if *would_deny {
                "dry_run_deny"
            } else {
                "dry_run_allow"
            },
        );
        if *would_deny && log_first(&format!("dry/{}/{}/{dry}", w.namespace, w.pod_name)) {
            info!(pod = %w.pod_name, namespace = %w.namespace, peer = %arrival.peer, policy = %dry, "dry-run AuthorizationPolicy would deny (not enforced; logged once per pod and policy)");
        }
    }
}

/// Counts a refusal, reports it as Istio's destination does (a connection with
/// `response_flags="DENY"`) and logs it once per pod and reason.
pub fn refuse(inputs: &ProxyInputs, arrival: &Arrival, denial: Denial) {
    let w = &arrival.pod.workload;
    inputs
        .metrics
        .daemon
        .inbound_refused
        .get_or_create(&crate::metrics::InboundRefusalLabels {
            reason: denial.reason(),
        })
        .inc();
    let snap = inputs.config.load();
    let labels = describe(&snap, arrival).labels.with_flags("DENY");
    inputs.metrics.tcp.open(&labels);
    inputs.metrics.tcp.close(&labels);
    let key = format!("{}/{}/{}", w.namespace, w.pod_name, denial.reason());
    if log_first(&key) {
        info!(pod = %w.pod_name, namespace = %w.namespace, peer = %arrival.peer, port = arrival.target.port(), reason = denial.reason(), "inbound connection refused (logged once per pod and reason; counted in proxy_daemon_inbound_refused_total)");
    } else {
        debug!(pod = %w.pod_name, peer = %arrival.peer, reason = denial.reason(), "refused an inbound connection");
    }
}

/// Whether `key` is logged for the first time (a bounded memory of what was said).
pub(super) fn log_first(key: &str) -> bool {
    static SAID: std::sync::LazyLock<Mutex<HashSet<String>>> =
        std::sync::LazyLock::new(Default::default);
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    if said.len() >= 4096 {
        said.clear();
    }
    said.insert(key.to_string())
}

// ---- plaintext on the inbound port

/// Serves a pod's plaintext inbound listener until aborted (un-enrolment, shutdown).
pub async fn serve_plaintext(inputs: Arc<ProxyInputs>, handle: PodHandle, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "inbound accept failed");
                inputs.metrics.daemon.listener_failures.inc();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let pod = handle.load_full();
        let permit = match inputs.connections.admit(&pod.workload.namespace) {
            Ok(p) => p,
            Err(refusal) => {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
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
        // Counted from the accept, so a drain waits for it.
        let active = super::ActiveGuard::count(&inputs);
        let inputs = inputs.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _active = active;
            plaintext_connection(&inputs, pod, stream, peer).await;
        });
    }
}

async fn plaintext_connection(
    inputs: &Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    // The inbound program kept the address the caller dialled as the local address;
    // under `--capture iptables` the redirect made it this port, and conntrack knows.
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let target = if local.port() == inputs.settings.inbound_port {
        let fd = std::os::fd::AsFd::as_fd(&stream);
        crate::capture::iptables::original_destination(fd)
            .map(SocketAddr::V4)
            .unwrap_or(local)
    } else {
        local
    };
    let _ = stream.set_nodelay(true);
    let own = pod.workload.identity(inputs.certs.trust_domain());
    let arrival = Arrival {
        pod,
        target,
        peer,
        caller: None,
        own,
        forwarded_host: None,
    };
    let snap = inputs.config.load();
    if let Err(denial) = admit(&snap, &inputs.settings, &arrival) {
        refuse(inputs, &arrival, denial);
        // Reset: the caller learns at once, as from a closed port.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        return;
    }
    let destination = describe(&snap, &arrival);
    if let ConnectionAuthz::Denied(_) = authorize_connection(inputs, &snap, &arrival, &destination)
    {
        refuse(inputs, &arrival, Denial::Authorization);
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        return;
    }
    let app = match connect_to_app(&arrival.pod, target, inputs.settings.connect_timeout).await {
        Ok(app) => app,
        Err(e) => {
            debug!(%target, error = %e, "inbound: the app did not accept");
            let labels = destination.labels.with_flags("UF");
            inputs.metrics.tcp.open(&labels);
            inputs.metrics.tcp.close(&labels);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            return;
        }
    };
    deliver(inputs.clone(), arrival, destination, stream, app).await;
}

// ---- delivery to the app (both ways in)

/// Hands a connection that was let in to the app (already connected): HTTP request by
/// request, reported per request; anything else copied, reported per connection.
pub async fn deliver<I>(
    inputs: Arc<ProxyInputs>,
    arrival: Arrival,
    destination: Destination,
    mut client: I,
    app: TcpStream,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (protocol, prefix) = match sniff_io(&mut client, destination.declared).await {
        Ok(found) => found,
        Err(_) => return,
    };
    let client = Rewind::new(prefix, client);
    let call = Arc::new(Call {
        inputs,
        arrival,
        labels: destination.labels,
    });
    match protocol {
        sniff::Protocol::Http1 => serve_http(call, client, app, false).await,
        sniff::Protocol::Http2 => serve_http(call, client, app, true).await,
        sniff::Protocol::Tls | sniff::Protocol::Opaque => {
            if let Some(decision) = authorize_tcp(&call.inputs, &call) {
                record_authz(&call.inputs, &call.arrival, &decision, "tcp");
                if decision.denied() {
                    refuse(&call.inputs, &call.arrival, Denial::Authorization);
                    return;
                }
            }
            copy_tcp(call, client, app).await
        }
    }
}

/// Reads the caller's first bytes to tell its protocol (the bytes are given back).
async fn sniff_io<I: AsyncRead + Unpin>(
    io: &mut I,
    declared: sniff::Declared,
) -> std::io::Result<(sniff::Protocol, Vec<u8>)> {
    let wait = match declared {
        sniff::Declared::Tcp | sniff::Declared::Tls => {
            return Ok((sniff::Protocol::Opaque, Vec::new()))
        }
        sniff::Declared::Http => DECLARED_HTTP_SNIFF,
        sniff::Declared::Undeclared => UNDECLARED_SNIFF,
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = Vec::with_capacity(SNIFF_BYTES);
    loop {
        if let Some(p) = sniff::classify(&buf) {
            return Ok((p, buf));
        }
        if buf.len() >= SNIFF_BYTES {
            return Ok((sniff::Protocol::Opaque, buf));
        }
        let mut chunk = [0u8; SNIFF_BYTES];
        let room = SNIFF_BYTES - buf.len();
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..room])).await {
            Err(_) | Ok(Ok(0)) => return Ok((sniff::Protocol::Opaque, buf)),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// One delivered connection: what every request on it reports.
struct Call {
    inputs: Arc<ProxyInputs>,
    arrival: Arrival,
    labels: IstioTcpLabels,
}

async fn copy_tcp<I>(call: Arc<Call>, mut client: Rewind<I>, mut app: TcpStream)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let tcp = &call.inputs.metrics.tcp;
    let started = Instant::now();
    let start_time = SystemTime::now();
    tcp.open(&call.labels);
    let handles = tcp.handles(&call.labels);
    let copied = super::tcp::copy_pair(
        &mut client,
        &mut app,
        (&handles.received_bytes, &handles.sent_bytes),
    );
    let (result, revoked) = tokio::select! {
        r = copied => (r, false),
        _ = revoked(&call) => (Err(std::io::Error::other("denied by a policy update")), true),
    };
    let flags = match (&result, revoked) {
        (_, true) => "DENY",
        (Ok(_), _) => "",
        (Err(_), _) => "UC",
    };
    tcp.close(&call.labels.with_flags(flags));
    let (received, sent) = result.unwrap_or_default();
    log_connection(&call, start_time, started.elapsed(), flags, received, sent);
}

/// How often an open TCP connection looks for a configuration change that now denies it.
const AUTHZ_RECHECK: Duration = Duration::from_secs(1);

/// Resolves when a new configuration's policies deny this connection (Istio closes open
/// L4 connections that a policy update denies).
async fn revoked(call: &Call) {
    let mut seen = call.inputs.config.load().generation;
    loop {
        tokio::time::sleep(AUTHZ_RECHECK).await;
        let generation = call.inputs.config.load().generation;
        if generation == seen {
            continue;
        }
        seen = generation;
        if let Some(decision) = authorize_tcp(&call.inputs, call) {
            if decision.denied() {
                record_authz(&call.inputs, &call.arrival, &decision, "tcp");
                return;
            }
        }
    }
}

// ---- HTTP at the destination

/// The app side of one delivered HTTP connection.
enum AppSender {
    H1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Body>>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

async fn serve_http<I>(call: Arc<Call>, client: Rewind<I>, app: TcpStream, h2: bool)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app_io = TokioIo::new(app);
    let sender = if h2 {
        match hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(app_io)
            .await
        {
            Ok((sender, conn)) => {
                tokio::spawn(conn);
                AppSender::H2(sender)
            }
            Err(e) => return debug!(error = %e, "inbound: HTTP/2 to the app failed"),
        }
    } else {
        match hyper::client::conn::http1::Builder::new()
            .handshake(app_io)
            .await
        {
            Ok((sender, conn)) => {
                tokio::spawn(conn.with_upgrades());
                AppSender::H1(tokio::sync::Mutex::new(sender))
            }
            Err(e) => return debug!(error = %e, "inbound: HTTP/1 to the app failed"),
        }
    };
    let sender = Arc::new(sender);
    let requests = super::http::RequestSeen::new();
    let seen = requests.clone();
    let draining = call.inputs.draining.clone();
    let service = hyper::service::service_fn(move |req| {
        let (call, sender) = (call.clone(), sender.clone());
        seen.arrived();
        async move {
            let mut resp = forward(call.clone(), sender, req).await;
            // As on the way out: during a drain an HTTP/1 answer closes its connection
            // (the caller's pool opens the next one to the successor).
            let upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            if !h2 && !upgrade && *call.inputs.draining.borrow() {
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let io = TokioIo::new(client);
    let result = if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, service);
        drain_gracefully(conn, draining, &requests, |c| c.graceful_shutdown()).await
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(io, service)
            .with_upgrades();
        drain_gracefully(conn, draining, &requests, |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        debug!(error = %e, "inbound HTTP connection ended");
    }
}

/// Serves `conn` to its end; when the daemon drains, lets the next request in (or waits
/// a grace for it), then shuts the connection down gracefully, so a keep-alive caller
/// does not hold the drain to its timeout.
async fn drain_gracefully<C, T, E>(
    conn: C,
    mut draining: tokio::sync::watch::Receiver<bool>,
    requests: &super::http::RequestSeen,
    shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<T, E>
where
    C: std::future::Future<Output = Result<T, E>>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = super::http::wait_true(&mut draining) => {
            match requests.wait_while_serving(conn.as_mut()).await {
                Some(ended) => ended,
                None => {
                    shutdown(conn.as_mut());
                    conn.await
                }
            }
        }
    }
}

/// Istio's header naming the caller's verified identity to the app. A caller's own value
/// is always removed: only the destination's proxy may say who called.
const CLIENT_CERT_HEADER: &str = "x-forwarded-client-cert";

/// Sends one request to the app and reports it when its response ends.
async fn forward(
    call: Arc<Call>,
    sender: Arc<AppSender>,
    mut req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let start_time = SystemTime::now();
    let snap = call.inputs.config.load();
    let request_auth = match authenticate(&call, &snap, &mut req).await {
        Ok(auth) => auth,
        Err(rejection) => return jwt_refusal(&call, &req, rejection),
    };
    let mut denied_by = None;
    let mut ext_denial = None;
    match authorize_request(&call, &snap, &req, request_auth.as_ref()) {
        RequestAuthz::Denied(policy) => denied_by = Some(policy),
        RequestAuthz::Allowed => {}
        RequestAuthz::Custom { policy, provider } => {
            match ask_custom(&call, &snap, &mut req, &policy, &provider).await {
                CustomOutcome::Allowed => {}
                CustomOutcome::Unavailable => denied_by = Some(policy),
                CustomOutcome::Denied(denial) => ext_denial = Some((policy, denial)),
            }
        }
    }
    let namespace_sampling = snap
        .namespaces
        .get(&call.arrival.pod.workload.namespace)
        .and_then(|n| n.trace_sampling);
    let trace = call.inputs.tracer.begin(req.headers(), namespace_sampling);
    let headers = req.headers_mut();
    headers.remove(CLIENT_CERT_HEADER);
    if let Some(caller) = &call.arrival.caller {
        if let Ok(v) = HeaderValue::from_str(&format!("By={};URI={caller}", call.arrival.own)) {
            headers.insert(CLIENT_CERT_HEADER, v);
        }
    }
    if trace.sampled() {
        trace.inject(headers);
    }
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let upgrade = super::http::is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let request_line = req.method().as_str().len() + req.uri().path().len() + 11;
    let head = super::report::head_bytes(req.headers(), request_line);
    let body_bytes = Arc::new(AtomicU64::new(0));
    let mut finish = Finish {
        call: call.clone(),
        started,
        start_time,
        method: req.method().clone(),
        authority: req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into()),
        protocol: match req.version() {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        head,
        body_bytes: body_bytes.clone(),
        grpc,
        flags: Cow::Borrowed(""),
        code: 0,
        policy: None,
        trace,
        user_agent: req
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    if let Some((policy, (status, body, headers))) = ext_denial {
        // The external authorizer's answer, as Envoy passes it on.
        finish.flags = Cow::Borrowed("UAEX");
        finish.code = status.as_u16();
        finish.policy = Some(policy);
        let mut r = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
        *r.status_mut() = status;
        for (name, value) in headers {
            r.headers_mut().append(name, value);
        }
        return super::report::metered(r, finish);
    }
    if let Some(policy) = denied_by {
        // Istio's answer; the request never reaches the app.
        finish.flags = Cow::Borrowed("DENY");
        finish.code = 403;
        finish.policy = Some(policy);
        let mut r = Response::new(
            Full::new(Bytes::from_static(b"RBAC: access denied"))
                .map_err(|never| match never {})
                .boxed(),
        );
        *r.status_mut() = StatusCode::FORBIDDEN;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        return super::report::metered(r, finish);
    }
    let req = req.map(|inner| {
        super::report::CountingBody {
            inner: inner.boxed(),
            count: body_bytes,
        }
        .boxed()
    });
    let sent = match &*sender {
        AppSender::H1(s) => {
            let mut s = s.lock().await;
            match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            }
        }
        AppSender::H2(s) => s.clone().send_request(req).await,
    };
    let mut resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            debug!(error = %e, "inbound: the app reset the request");
            finish.flags = Cow::Borrowed("UC");
            finish.code = 503;
            let mut r = Response::new(
                Full::new(Bytes::from_static(
                    b"upstream connect error or disconnect/reset before headers",
                ))
                .map_err(|never| match never {})
                .boxed(),
            );
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            return super::report::metered(r, finish);
        }
    };
    finish.code = resp.status().as_u16();
    if let Some(client_upgrade) =
        upgrade.filter(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS)
    {
        let app_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(c), Ok(a)) = (client_upgrade.await, app_upgrade.await) {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(a)).await;
            }
        });
    }
    super::report::metered(resp.map(http_body_util::BodyExt::boxed), finish)
}

/// One request at the destination, reported when its response ends.
struct Finish {
    call: Arc<Call>,
    started: Instant,
    start_time: SystemTime,
    method: http::Method,
    authority: String,
    path: String,
    protocol: &'static str,
    head: u64,
    body_bytes: Arc<AtomicU64>,
    grpc: bool,
    flags: Cow<'static, str>,
    code: u16,
    /// The AuthorizationPolicy that denied the request (`namespace.name`).
    policy: Option<String>,
    trace: crate::spans::RequestTrace,
    user_agent: Option<String>,
}

impl super::report::ReportAtEnd for Finish {
    fn upstream_reset(&mut self) {
        if self.flags.is_empty() {
            self.flags = Cow::Borrowed("UR");
        }
    }

    fn done(self, response_bytes: u64, grpc: Option<u16>, downstream_gone: bool) {
        let flags: Cow<'static, str> = if downstream_gone && self.flags.is_empty() {
            Cow::Borrowed("DC")
        } else {
            self.flags.clone()
        };
        let duration = self.started.elapsed();
        let request_bytes = self.head + self.body_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let mut base = self.call.labels.with_flags(&flags);
        base.request_protocol = if self.grpc { "grpc" } else { "http" };
        let grpc_response_status = self.grpc.then(|| grpc.filter(|g| *g <= 16).unwrap_or(2));
        self.call.inputs.metrics.http.record(RequestRecord {
            labels: RequestLabels {
                response_code: self.code,
                grpc_response_status,
                base,
            },
            duration,
            request_bytes,
            response_bytes,
        });
        if self.trace.sampled() {
            self.call.inputs.tracer.submit(self.span(
                &flags,
                request_bytes,
                response_bytes,
                duration,
            ));
        }
        self.log(&flags, request_bytes, response_bytes, duration);
    }
}

impl Finish {
    /// The destination's span: a child of the caller's (SERVER kind), so the two sides
    /// of a call join in one trace.
    fn span(
        &self,
        flags: &str,
        request_bytes: u64,
        response_bytes: u64,
        duration: Duration,
    ) -> crate::spans::SpanRecord {
        let w = &self.call.arrival.pod.workload;
        let service = &self.call.labels.service;
        let cluster = format!("inbound|{}||", self.call.arrival.target.port());
        let pod_ip = w.ip.clone().unwrap_or_else(|| "-".into());
        let tags: Vec<(&'static str, String)> = vec![
            ("component", "proxy".into()),
            (
                "node_id",
                format!(
                    "sidecar~{pod_ip}~{}.{}~{}.svc.cluster.local",
                    w.pod_name, w.namespace, w.namespace
                ),
            ),
            (
                "http.url",
                format!("http://{}{}", self.authority, self.path),
            ),
            ("http.method", self.method.as_str().into()),
            ("downstream_cluster", "-".into()),
            (
                "user_agent",
                self.user_agent.clone().unwrap_or_else(|| "-".into()),
            ),
            ("http.protocol", self.protocol.into()),
            ("peer.address", self.call.arrival.peer.ip().to_string()),
            ("request_size", request_bytes.to_string()),
            ("upstream_cluster", cluster.clone()),
            ("upstream_cluster.name", cluster),
            ("http.status_code", self.code.to_string()),
            ("response_size", response_bytes.to_string()),
            (
                "response_flags",
                if flags.is_empty() { "-" } else { flags }.into(),
            ),
            ("istio.canonical_service", w.canonical_service.clone()),
            ("istio.canonical_revision", w.canonical_revision.clone()),
            ("istio.namespace", w.namespace.clone()),
            ("istio.mesh_id", "cluster.local".into()),
            (
                "source_principal",
                self.call
                    .arrival
                    .caller
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| crate::state::workload::UNKNOWN.into()),
            ),
        ];
        crate::spans::SpanRecord {
            kind: crate::spans::SpanKind::Server,
            context: self.trace.context,
            name: format!("{}:{}/*", service.service, self.call.arrival.target.port()),
            service: format!("{}.{}", w.canonical_service, w.namespace),
            start: self.start_time,
            duration,
            tags,
            error: self.code >= 500 || self.code == 0,
            events: Vec::new(),
            links: Vec::new(),
            remote: Some(self.call.arrival.target),
        }
    }

    fn log(&self, flags: &str, received: u64, sent: u64, duration: Duration) {
        let snap = self.call.inputs.config.load();
        let w = &self.call.arrival.pod.workload;
        if !crate::proxy::access_log::enabled()
            || !super::report::access_log_on(&snap, &w.namespace)
        {
            return;
        }
        let start = super::report::rfc3339(self.start_time);
        let upstream = self.call.arrival.target.to_string();
        let l = &self.call.labels;
        let (source_principal, destination_principal) = principals(&self.call);
        crate::proxy::access_log::write(
            "request",
            &[
                ("start_time", Value::Str(&start)),
                ("method", Value::Str(self.method.as_str())),
                ("authority", Value::Str(&self.authority)),
                ("path", Value::Str(&self.path)),
                ("protocol", Value::Str(self.protocol)),
                ("response_code", Value::U64(self.code.into())),
                (
                    "response_flags",
                    Value::Str(if flags.is_empty() { "-" } else { flags }),
                ),
                ("bytes_received", Value::U64(received)),
                ("bytes_sent", Value::U64(sent)),
                ("duration_ms", Value::F64(duration.as_secs_f64() * 1000.0)),
                ("upstream_host", Value::Str(&upstream)),
                ("source_workload", Value::Str(&l.source.workload)),
                ("source_namespace", Value::Str(&l.source.namespace)),
                ("source_principal", Value::Str(&source_principal)),
                ("destination_service", Value::Str(&l.service.service)),
                ("destination_workload", Value::Str(&w.workload)),
                ("destination_namespace", Value::Str(&w.namespace)),
                ("destination_pod", Value::Str(&w.pod_name)),
                ("destination_principal", Value::Str(&destination_principal)),
                (
                    "connection_security_policy",
                    Value::Str(security_policy(&self.call)),
                ),
                ("reporter", Value::Str("destination")),
                (
                    "authorization_policy",
                    Value::Str(self.policy.as_deref().unwrap_or("-")),
                ),
            ],
        );
    }
}

/// The request's verified JWT (None without a token), under the RequestAuthentications
/// bound to the pod; or why it is refused.
async fn authenticate(
    call: &Call,
    snap: &Snapshot,
    req: &mut Request<hyper::body::Incoming>,
) -> Result<Option<authz::RequestAuth>, super::jwt::Rejection> {
    if snap.request_authn.is_empty() {
        return Ok(None);
    }
    let providers = snap
        .request_authn
        .providers_for(&authz_target(&call.arrival, &call.labels.service.service));
    if providers.is_empty() {
        return Ok(None);
    }
    super::jwt::authenticate(&call.inputs.jwks, &providers, req).await
}

/// Envoy's answer to a request whose token does not verify (never sent to the app),
/// reported like any other request, and counted by reason.
fn jwt_refusal(
    call: &Arc<Call>,
    req: &Request<hyper::body::Incoming>,
    rejection: super::jwt::Rejection,
) -> Response<Body> {
    call.inputs
        .metrics
        .daemon
        .jwt_rejected
        .get_or_create(&crate::metrics::JwtRejectionLabels {
            reason: rejection.label(),
        })
        .inc();
    let w = &call.arrival.pod.workload;
    if log_first(&format!(
        "jwt/{}/{}/{}",
        w.namespace,
        w.pod_name,
        rejection.label()
    )) {
        info!(pod = %w.pod_name, namespace = %w.namespace, peer = %call.arrival.peer, reason = rejection.message(), "RequestAuthentication refused a request (logged once per pod and reason; counted in proxy_daemon_jwt_rejected_total)");
    }
    let finish = Finish {
        call: call.clone(),
        started: Instant::now(),
        start_time: SystemTime::now(),
        method: req.method().clone(),
        authority: req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into()),
        protocol: "HTTP/1.1",
        head: 0,
        body_bytes: Arc::new(AtomicU64::new(0)),
        grpc: false,
        flags: Cow::Borrowed(""),
        code: rejection.status().as_u16(),
        policy: None,
        trace: call.inputs.tracer.begin(req.headers(), None),
        user_agent: None,
    };
    let mut r = Response::new(
        Full::new(Bytes::from_static(rejection.message().as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = rejection.status();
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"proxy-daemon\", error=\"invalid_token\""),
    );
    super::report::metered(r, finish)
}

/// The policy that denies this request (`namespace.name`, or what decided), if one does.
/// What the policies say of a request before any external authorizer is asked.
enum RequestAuthz {
    Allowed,
    /// Denied by this policy (`namespace.name`, or what decided).
    Denied(String),
    /// Allowed by the rest, if this CUSTOM policy's provider allows too.
    Custom {
        policy: String,
        provider: String,
    },
}

/// What a CUSTOM policy's provider said.
enum CustomOutcome {
    Allowed,
    /// No usable provider of that name: what the policy matches is denied.
    Unavailable,
    /// The authorizer's status, body and headers for the caller.
    Denied((StatusCode, Bytes, Vec<(http::HeaderName, HeaderValue)>)),
}

/// Asks the provider of a matching CUSTOM policy; its allow may set request headers.
async fn ask_custom(
    call: &Call,
    snap: &Snapshot,
    req: &mut Request<hyper::body::Incoming>,
    policy: &str,
    provider: &str,
) -> CustomOutcome {
    let count = |decision: &'static str| {
        call.inputs
            .metrics
            .daemon
            .authorization
            .get_or_create(&crate::metrics::AuthorizationLabels {
                policy: policy.to_string(),
                decision,
                layer: "http",
            })
            .inc();
    };
    let Some(authz::ExtAuthz::Http(p)) = snap.authorization.providers.get(provider) else {
        count("custom_unavailable");
        return CustomOutcome::Unavailable;
    };
    match super::ext_authz::check(p, snap, req).await {
        super::ext_authz::Verdict::Allow { upstream } => {
            count("custom_allow");
            for (name, value) in upstream {
                req.headers_mut().insert(name, value);
            }
            CustomOutcome::Allowed
        }
        super::ext_authz::Verdict::Deny {
            status,
            body,
            headers,
        } => {
            count("custom_deny");
            CustomOutcome::Denied((status, body, headers))
        }
    }
}

fn authorize_request(
    call: &Call,
    snap: &Snapshot,
    req: &Request<hyper::body::Incoming>,
    request_auth: Option<&authz::RequestAuth>,
) -> RequestAuthz {
    if snap.authorization.is_empty() {
        return RequestAuthz::Allowed;
    }
    let policies = snap
        .authorization
        .for_target(&authz_target(&call.arrival, &call.labels.service.service));
    if policies.is_empty() {
        return RequestAuthz::Allowed;
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default();
    let path = authz::normalize_path(req.uri().path());
    let http = authz::HttpAttributes {
        method: req.method().as_str(),
        host,
        path: &path,
        headers: req.headers(),
    };
    let mut attributes = authz_attributes(&call.arrival, Some(http));
    attributes.request_auth = request_auth;
    let decision = authz::decide(&policies, &attributes);
    record_authz(&call.inputs, &call.arrival, &decision, "http");
    match (&decision.custom, decision.denied()) {
        (_, true) => RequestAuthz::Denied(decision.policy()),
        (Some((policy, provider)), false) => RequestAuthz::Custom {
            policy: policy.clone(),
            provider: provider.clone(),
        },
        (None, false) => RequestAuthz::Allowed,
    }
}

fn principals(call: &Call) -> (String, String) {
    match &call.arrival.caller {
        Some(c) => (c.to_string(), call.arrival.own.to_string()),
        None => (
            crate::state::workload::UNKNOWN.into(),
            crate::state::workload::UNKNOWN.into(),
        ),
    }
}

fn security_policy(call: &Call) -> &'static str {
    if call.arrival.caller.is_some() {
        "mutual_tls"
    } else {
        "none"
    }
}

fn log_connection(
    call: &Call,
    start_time: SystemTime,
    duration: Duration,
    flags: &str,
    received: u64,
    sent: u64,
) {
    let snap = call.inputs.config.load();
    let w = &call.arrival.pod.workload;
    if !crate::proxy::access_log::enabled() || !super::report::access_log_on(&snap, &w.namespace) {
        return;
    }
    let start = super::report::rfc3339(start_time);
    let upstream = call.arrival.target.to_string();
    let peer = call.arrival.peer.to_string();
    let l = &call.labels;
    let (source_principal, destination_principal) = principals(call);
    crate::proxy::access_log::write(
        "connection",
        &[
            ("start_time", Value::Str(&start)),
            ("protocol", Value::Str("tcp")),
            (
                "response_flags",
                Value::Str(if flags.is_empty() { "-" } else { flags }),
            ),
            ("bytes_received", Value::U64(received)),
            ("bytes_sent", Value::U64(sent)),
            ("duration_ms", Value::F64(duration.as_secs_f64() * 1000.0)),
            ("upstream_host", Value::Str(&upstream)),
            ("downstream_peer", Value::Str(&peer)),
            ("source_workload", Value::Str(&l.source.workload)),
            ("source_namespace", Value::Str(&l.source.namespace)),
            ("source_principal", Value::Str(&source_principal)),
            ("destination_service", Value::Str(&l.service.service)),
            ("destination_workload", Value::Str(&w.workload)),
            ("destination_namespace", Value::Str(&w.namespace)),
            ("destination_pod", Value::Str(&w.pod_name)),
            ("destination_principal", Value::Str(&destination_principal)),
            (
                "connection_security_policy",
                Value::Str(security_policy(call)),
            ),
            ("reporter", Value::Str("destination")),
        ],
    );
}

/// Connects to the app at `target` (this pod's address) from inside the pod's namespace,
/// from [`INBOUND_SOURCE`].
pub async fn connect_to_app(
    pod: &PodContext,
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let fd = pod
        .netns
        .tcp_socket(socket2::Domain::for_address(target))
        .await?;
    let socket = socket2::Socket::from(fd);
    if target.ip().is_ipv4() {
        socket.bind(&SocketAddr::from((INBOUND_SOURCE, 0)).into())?;
    }
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    tokio::time::timeout(timeout, socket.connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// A stream whose first bytes were already read (to sniff them): they are read again
/// first.
pub struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    pub fn new(prefix: Vec<u8>, inner: I) -> Self {
        Self {
            prefix: Bytes::from(prefix),
            inner,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
