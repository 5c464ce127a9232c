//! HBONE, as Istio ambient defines it: an HTTP/2 `CONNECT` stream inside mutual TLS to the
//! destination pod's port 15008, `:authority` the pod address and port the connection is
//! for. The source side tunnels its pods' connections to mesh pods over pooled
//! connections (one TLS handshake per source identity and destination pod, not one per
//! connection); the destination side serves port 15008 on each enrolled pod's address, in
//! the pod's network namespace, and connects to the app there.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{client::conn::http2 as client_http2, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::{PodContext, PodHandle, ProxyInputs};
use crate::identity::{identities_of, Identity};

/// The upgraded CONNECT stream, as a byte stream.
pub type TunnelIo = TokioIo<hyper::upgrade::Upgraded>;

/// Streams one pooled connection carries at most before another is opened (ztunnel's
/// default).
const MAX_STREAMS_PER_CONNECTION: usize = 100;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("{0}")]
    Certificate(#[from] crate::identity::manager::Unavailable),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("mutual TLS with {0}: {1}")]
    Tls(SocketAddr, String),
    #[error("HTTP/2 with {0}: {1}")]
    H2(SocketAddr, hyper::Error),
    #[error("CONNECT {authority} answered {status}")]
    Refused {
        authority: SocketAddr,
        status: StatusCode,
    },
}

impl HboneError {
    /// Envoy's response flag for the failure, as ztunnel reports it.
    pub fn flag(&self) -> &'static str {
        match self {
            HboneError::Certificate(_) => "IDENTITY_ERROR",
            HboneError::Tls(..) => "TLS_FAILURE",
            HboneError::Refused { status, .. } if *status == StatusCode::UNAUTHORIZED => "DENY",
            _ => "UF",
        }
    }
}

/// A pod's pooled HBONE connections, by destination (pod address at port 15008) and the
/// identity it must prove.
#[derive(Default)]
pub struct Pool {
    senders: Mutex<HashMap<(SocketAddr, Identity), Sender>>,
    /// Set by [`Self::clear`]: a connection opened during the drain is not kept.
    closed: std::sync::atomic::AtomicBool,
}

/// The sending half of a pooled HBONE connection.
type Sender = client_http2::SendRequest<Empty<Bytes>>;

impl Pool {
    /// Forgets every pooled connection (the daemon is draining): each closes once its
    /// streams in flight end.
    pub fn clear(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.senders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn pooled(
        &self,
        key: &(SocketAddr, Identity),
    ) -> Option<client_http2::SendRequest<Empty<Bytes>>> {
        let senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders.get(key).filter(|s| !s.is_closed()).cloned()
    }

    fn keep(&self, key: (SocketAddr, Identity), sender: Sender) {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders.retain(|_, s| !s.is_closed());
        senders.insert(key, sender);
    }
}

/// What the source side says about a tunnel it opens.
pub struct TunnelRequest<'a> {
    /// The pod address and port the app's connection is for.
    pub target: SocketAddr,
    /// Who the destination must prove to be.
    pub peer: &'a Identity,
    /// The Service the connection was for, if one (`forwarded: …;host=`).
    pub service: Option<&'a str>,
    pub connect_timeout: Duration,
}

/// Opens a tunnel from `pod` to `req.target` over HBONE, reusing a pooled connection.
pub async fn open(
    inputs: &ProxyInputs,
    pod: &PodContext,
    req: TunnelRequest<'_>,
) -> Result<TunnelIo, HboneError> {
    let hbone = SocketAddr::new(req.target.ip(), inputs.settings.hbone_port);
    let key = (hbone, req.peer.clone());
    let mut sender = match pod.hbone.pooled(&key) {
        Some(s) => s,
        None => {
            let s = connect(inputs, pod, hbone, req.peer, req.connect_timeout).await?;
            pod.hbone.keep(key, s.clone());
            s
        }
    };
    sender.ready().await.map_err(|e| HboneError::H2(hbone, e))?;
    let source = pod
        .workload
        .ip
        .clone()
        .unwrap_or_else(|| "unknown".to_string());
    let forwarded = match req.service {
        Some(host) => format!("for=\"{source}\";host={host}"),
        None => format!("for=\"{source}\""),
    };
    let request = Request::builder()
        .method(Method::CONNECT)
        .version(hyper::Version::HTTP_2)
        .uri(req.target.to_string())
        .header("forwarded", forwarded)
        .header("baggage", baggage(&pod.workload))
        .header("traceparent", traceparent())
        .body(Empty::<Bytes>::new())
        .map_err(|e| HboneError::Connect(hbone, e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| HboneError::H2(hbone, e))?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Refused {
            authority: req.target,
            status: response.status(),
        });
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| HboneError::H2(hbone, e))?;
    Ok(TokioIo::new(upgraded))
}

/// A new HBONE connection from the pod's namespace: TCP, mutual TLS as the pod's identity
/// (the server must be `peer`), HTTP/2.
async fn connect(
    inputs: &ProxyInputs,
    pod: &PodContext,
    hbone: SocketAddr,
    peer: &Identity,
    timeout: Duration,
) -> Result<Sender, HboneError> {
    let own = pod.workload.identity(inputs.certs.trust_domain());
    let cert = inputs.certs.fetch(&own).await?;
    let config = cert
        .client(vec![peer.clone()])
        .map_err(|e| HboneError::Tls(hbone, e.to_string()))?;
    let tcp = super::connect_from_pod(pod, hbone, timeout)
        .await
        .map_err(|e| HboneError::Connect(hbone, e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio::time::timeout(
        timeout.min(HANDSHAKE_TIMEOUT),
        tokio_rustls::TlsConnector::from(config).connect(crate::identity::tls::server_name(), tcp),
    )
    .await
    .map_err(|_| HboneError::Tls(hbone, "handshake timed out".into()))?
    .map_err(|e| HboneError::Tls(hbone, e.to_string()))?;
    inputs.metrics.daemon.hbone_handshakes.inc();
    let (sender, conn) = client_http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .initial_max_send_streams(MAX_STREAMS_PER_CONNECTION)
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|e| HboneError::H2(hbone, e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%hbone, error = %e, "HBONE connection ended");
        }
    });
    Ok(sender)
}

/// W3C baggage naming the source workload, in ztunnel's keys.
fn baggage(w: &crate::state::workload::WorkloadInfo) -> String {
    format!(
        "k8s.namespace.name={},k8s.deployment.name={},service.name={},service.version={}",
        w.namespace, w.workload, w.canonical_service, w.canonical_revision
    )
}

fn traceparent() -> String {
    format!(
        "00-{:032x}-{:016x}-00",
        rand::random::<u128>(),
        rand::random::<u64>()
    )
}

// ---- the destination side

/// Serves HBONE on one pod's 15008 listener until aborted (un-enrolment, shutdown).
pub async fn serve(inputs: Arc<ProxyInputs>, pod: PodHandle, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "HBONE accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (inputs, pod) = (inputs.clone(), pod.load_full());
        // The caller's namespace, as the cluster state names its address: its handshakes
        // and connections count against its own budgets, not the node's alone.
        let source_namespace = inputs
            .config
            .load()
            .peers
            .get(&peer.ip())
            .map(|p| p.namespace.clone())
            .unwrap_or_else(|| crate::state::workload::UNKNOWN.to_string());
        let Some(handshake) = inputs.handshakes.begin(&source_namespace) else {
            refuse_at_accept(&inputs, &pod, &stream, peer, "handshake_budget");
            continue;
        };
        let permit = match inputs.connections.admit(&source_namespace) {
            Ok(p) => p,
            Err(refusal) => {
                inputs
                    .metrics
                    .daemon
                    .connections_refused
                    .get_or_create(&crate::metrics::RefusalLabels {
                        reason: refusal.label(),
                        namespace: source_namespace,
                    })
                    .inc();
                refuse_at_accept(&inputs, &pod, &stream, peer, "connection_budget");
                continue;
            }
        };
        tokio::spawn(async move {
            let _permit = permit;
            match serve_connection(&inputs, pod.clone(), stream, peer, handshake).await {
                Ok(()) => {}
                // A connection that was served and ended badly was not refused.
                Err(("http2", detail)) => {
                    debug!(pod = %pod.workload.pod_name, %peer, %detail, "HBONE connection ended");
                }
                Err((reason, detail)) => {
                    count_refusal(&inputs, reason);
                    let key = format!("{}/{}/{reason}", pod.workload.pod_name, peer.ip());
                    if super::inbound::log_first(&key) {
                        info!(pod = %pod.workload.pod_name, %peer, reason, %detail, "HBONE connection refused (logged once per pod, peer and reason; counted in proxy_daemon_inbound_refused_total)");
                    } else {
                        debug!(pod = %pod.workload.pod_name, %peer, reason, %detail, "HBONE connection refused");
                    }
                }
            }
        });
    }
}

fn count_refusal(inputs: &ProxyInputs, reason: &'static str) {
    inputs.metrics.daemon.hbone_refused.inc();
    inputs
        .metrics
        .daemon
        .inbound_refused
        .get_or_create(&crate::metrics::InboundRefusalLabels { reason })
        .inc();
}

/// Resets a connection at accept (over a budget), counted and logged once.
fn refuse_at_accept(
    inputs: &ProxyInputs,
    pod: &PodContext,
    stream: &TcpStream,
    peer: SocketAddr,
    reason: &'static str,
) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
    count_refusal(inputs, reason);
    let key = format!("{}/{}/{reason}", pod.workload.pod_name, peer.ip());
    if super::inbound::log_first(&key) {
        warn!(pod = %pod.workload.pod_name, %peer, reason, "HBONE connection reset at accept (logged once per pod, peer and reason)");
    }
}

/// Serves one HBONE connection: mutual TLS (holding `handshake`, a place in the caller's
/// namespace's handshake budget, until it completes), then HTTP/2 CONNECTs. Err: why it
/// was refused (a metric label) and the detail.
async fn serve_connection(
    inputs: &Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    peer: SocketAddr,
    handshake: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), (&'static str, String)> {
    let own = pod.workload.identity(inputs.certs.trust_domain());
    let cert = inputs
        .certs
        .fetch(&own)
        .await
        .map_err(|e| ("no_certificate", e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(cert.server.clone()).accept(stream),
    )
    .await
    .map_err(|_| ("tls_handshake", "TLS handshake timed out".to_string()))?
    .map_err(|e| ("tls_handshake", format!("TLS handshake: {e}")))?;
    drop(handshake);
    let caller = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| identities_of(c))
        .and_then(|ids| ids.into_iter().next())
        .ok_or((
            "no_identity",
            "the client certificate names no identity".to_string(),
        ))?;
    let conn = Arc::new(Inbound {
        inputs: inputs.clone(),
        pod,
        caller,
        own,
        peer,
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(conn.connect(req).await) }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .max_concurrent_streams(200)
        .serve_connection(TokioIo::new(tls), service)
        .await
        .map_err(|e| ("http2", format!("HTTP/2: {e}")))
}

/// One mutual-TLS connection to a pod's 15008, and who made it.
struct Inbound {
    inputs: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    caller: Identity,
    own: Identity,
    /// The TCP peer (the caller's pod address, for a daemon or ztunnel in its pod).
    peer: SocketAddr,
}

type ConnectResponse = Response<Empty<Bytes>>;

fn status(code: StatusCode) -> ConnectResponse {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

impl Inbound {
    /// One CONNECT: to this pod's own address only (400 otherwise: a pod cannot be used to
    /// reach another through its port 15008), to a port of the app (not the proxy's own),
    /// answered 200 once the app accepted, 503 if it did not.
    async fn connect(&self, mut req: Request<hyper::body::Incoming>) -> ConnectResponse {
        if req.method() != Method::CONNECT {
            return status(StatusCode::BAD_REQUEST);
        }
        let Some(target) = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        else {
            return status(StatusCode::BAD_REQUEST);
        };
        let own_ip = self
            .pod
            .workload
            .ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        if Some(target.ip()) != own_ip {
            count_refusal(&self.inputs, "other_address");
            let key = format!(
                "{}/{}/other_address",
                self.pod.workload.pod_name, self.caller
            );
            if super::inbound::log_first(&key) {
                info!(pod = %self.pod.workload.pod_name, caller = %self.caller, %target, "HBONE CONNECT for another address: refused (logged once per pod and caller)");
            }
            return status(StatusCode::BAD_REQUEST);
        }
        let arrival = super::inbound::Arrival {
            pod: self.pod.clone(),
            target,
            peer: self.peer,
            caller: Some(self.caller.clone()),
            own: self.own.clone(),
            forwarded_host: forwarded_host(&req),
        };
        let snap = self.inputs.config.load();
        if let Err(denial) = super::inbound::admit(&snap, &self.inputs.settings, &arrival) {
            super::inbound::refuse(&self.inputs, &arrival, denial);
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
        let destination = super::inbound::describe(&snap, &arrival);
        if let super::inbound::ConnectionAuthz::Denied(_) =
            super::inbound::authorize_connection(&self.inputs, &snap, &arrival, &destination)
        {
            // As ztunnel answers a CONNECT its policies deny.
            super::inbound::refuse(
                &self.inputs,
                &arrival,
                super::inbound::Denial::Authorization,
            );
            return status(StatusCode::UNAUTHORIZED);
        }
        let app = match super::inbound::connect_to_app(
            &self.pod,
            target,
            self.inputs.settings.connect_timeout,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                debug!(%target, error = %e, "HBONE: the app did not accept");
                let labels = destination.labels.with_flags("UF");
                self.inputs.metrics.tcp.open(&labels);
                self.inputs.metrics.tcp.close(&labels);
                return status(StatusCode::SERVICE_UNAVAILABLE);
            }
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let inputs = self.inputs.clone();
        let active = super::ActiveGuard::count(&inputs);
        tokio::spawn(async move {
            let _active = active;
            match upgrade.await {
                Ok(upgraded) => {
                    super::inbound::deliver(
                        inputs,
                        arrival,
                        destination,
                        TokioIo::new(upgraded),
                        app,
                    )
                    .await
                }
                Err(e) => debug!(error = %e, "HBONE: the CONNECT stream did not open"),
            }
        });
        status(StatusCode::OK)
    }
}

/// `host=` of the `forwarded` header: the Service the source chose, if it said.
fn forwarded_host(req: &Request<hyper::body::Incoming>) -> Option<String> {
    let value = req.headers().get("forwarded")?.to_str().ok()?;
    value
        .split(';')
        .find_map(|part| part.trim().strip_prefix("host="))
        .map(|h| h.trim_matches('"').to_string())
        .filter(|h| crate::metrics::is_host_name(h))
}
