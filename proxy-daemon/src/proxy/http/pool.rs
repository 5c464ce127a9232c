//! Upstream side: connections opened from the pod's netns (TLS originated when the
//! DestinationRule says so), kept idle per pod and endpoint, requests forwarded over them.
use super::*;
use crate::{proxy::http_route::UpstreamProtocol, state::routes::ConnectionPool};

/// Idle upstream connections per pod, upstream address and TLS setting (sockets live in
/// the pod netns): HTTP/1 connections one request at a time, HTTP/2 ones shared
/// (multiplexed).
pub struct UpstreamPool {
    /// Idle HTTP/1 senders.
    pub(super) idle: Mutex<HashMap<PoolKey, Vec<Parked>>>,
    /// Shared HTTP/2 connections, one per upstream and TLS setting, at most
    /// [`MAX_H2_PER_POD`]; each is counted in the node's idle budget while pooled (it
    /// holds a descriptor whether or not a request uses it).
    pub(super) h2: Mutex<HashMap<PoolKey, SharedH2>>,
    /// The node-wide count and cap of idle connections, shared by every pod's pool.
    budget: Arc<IdleBudget>,
    /// Set by [`Self::clear`]: a connection finishing its request is closed, not parked.
    closed: std::sync::atomic::AtomicBool,
}

/// A pooled HTTP/2 connection and when it was last used.
pub(super) struct SharedH2 {
    sender: client_http2::SendRequest<Body>,
    last_used: tokio::time::Instant,
    /// `http.idleTimeout` (0: never).
    idle_timeout: Duration,
}

impl SharedH2 {
    fn expired(&self, now: tokio::time::Instant) -> bool {
        !self.idle_timeout.is_zero() && now.duration_since(self.last_used) >= self.idle_timeout
    }
}

/// Shared HTTP/2 upstream connections one pod keeps: one per upstream address and TLS
/// setting, so a pod dialling many addresses (passthrough h2c, say) cannot hold a
/// connection to each for ever; past it, a new connection serves its request and closes.
pub(super) const MAX_H2_PER_POD: usize = 256;

/// An idle HTTP/1 connection in a pool.
pub(super) struct Parked {
    sender: Sender,
    /// Requests it has carried (connectionPool.http.maxRequestsPerConnection).
    uses: u32,
    /// When `http.idleTimeout` closes it (None: never).
    expires: Option<tokio::time::Instant>,
}

/// Idle upstream connections of every pod together: each holds a file descriptor and
/// belongs to no client, so their number is capped for the node (the connection budgets
/// leave room for exactly this many).
pub struct IdleBudget {
    /// `proxy_daemon_upstream_idle_connections`.
    gauge: prometheus_client::metrics::gauge::Gauge,
    cap: i64,
    closed_at_cap: prometheus_client::metrics::counter::Counter,
    closed_idle: prometheus_client::metrics::counter::Counter,
}

impl IdleBudget {
    pub fn new(cap: usize, metrics: &crate::metrics::DaemonMetrics) -> Self {
        Self {
            gauge: metrics.upstream_idle_connections.clone(),
            cap: i64::try_from(cap).unwrap_or(i64::MAX),
            closed_at_cap: metrics.upstream_idle_closed_at_cap.clone(),
            closed_idle: metrics.upstream_idle_closed_idle.clone(),
        }
    }
}

/// Istio's default `connectionPool.http.idleTimeout`.
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// An upstream address, the TLS settings in full (never a hash a rule's free text could
/// make equal to another rule's), and the mesh pod (its uid) when the connection goes
/// inside an HBONE tunnel.
pub(super) type PoolKey = (SocketAddr, Option<std::sync::Arc<str>>, Option<String>);

/// The pool key of a connection to `upstream` now. Whether it is a mesh pod is part of
/// it: a connection made in plaintext before the pod joined the mesh (a pod whose address
/// was routed to a moment before its enrolment) is never reused for it afterwards, so no
/// request bypasses the destination's mutual TLS and policies for a pooled connection's
/// lifetime.
pub(super) fn pool_key(
    inputs: &ProxyInputs,
    upstream: SocketAddr,
    tls: Option<&UpstreamTls>,
) -> PoolKey {
    let snap = inputs.config.load();
    let mesh = crate::proxy::hbone_peer(inputs, &snap, upstream).map(|p| p.uid.clone());
    (upstream, tls.map(|t| t.settings_key.clone()), mesh)
}

/// Idle connections a pod keeps per upstream: Envoy's default circuit breaker
/// (`max_connections` 1024 per cluster); the node-wide idle budget bounds them all. It was
/// 32: 64 concurrent clients then closed half their upstream connections after every
/// request and opened them again, and the connect storm (ephemeral-port search among
/// TIME_WAIT sockets) took a third of the daemon's CPU.
pub(super) const MAX_IDLE_PER_UPSTREAM: usize = 1024;

impl UpstreamPool {
    /// An empty pool counting its idle connections into the node's `budget`.
    pub fn new(budget: Arc<IdleBudget>) -> Self {
        Self {
            idle: Default::default(),
            h2: Default::default(),
            budget,
            closed: Default::default(),
        }
    }

    pub(super) fn take(&self, addr: &PoolKey) -> Option<(Sender, u32)> {
        let now = tokio::time::Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(addr)?;
        while let Some(p) = list.pop() {
            self.budget.gauge.dec();
            if p.expires.is_some_and(|e| e <= now) {
                self.budget.closed_idle.inc();
                continue;
            }
            if !p.sender.is_closed() && p.sender.is_ready() {
                return Some((p.sender, p.uses));
            }
        }
        None
    }

    /// Parks a connection for reuse, unless its upstream has enough parked already or the
    /// node is at its cap (then dropping the sender closes it).
    pub(super) fn put(&self, addr: PoolKey, sender: Sender, uses: u32, idle: Option<Duration>) {
        let idle_timeout = idle.unwrap_or(DEFAULT_HTTP_IDLE_TIMEOUT);
        // 0s: disabled (Envoy's meaning), never closed for idleness.
        let expires = (!idle_timeout.is_zero()).then(|| tokio::time::Instant::now() + idle_timeout);
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if self.budget.gauge.get() >= self.budget.cap {
            self.budget.closed_at_cap.inc();
            return;
        }
        let mut pools = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = pools.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push(Parked {
                sender,
                uses,
                expires,
            });
            self.budget.gauge.inc();
        }
    }

    /// Closes every idle upstream connection and parks none from now on (the daemon is
    /// draining: none will be used again, and one held open would hold a tunnel stream,
    /// and the drain, with it).
    pub fn clear(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let mut pools = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let idle: usize = pools.values().map(Vec::len).sum();
        pools.clear();
        drop(pools);
        let mut h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        let shared = h2.len();
        h2.clear();
        self.budget.gauge.dec_by((idle + shared) as i64);
    }

    /// Closes parked connections past their idle timeout or closed by the server, and
    /// forgets empty upstreams. Called periodically, so a pod that stops sending does not
    /// keep its connections (and descriptors) for ever.
    pub fn sweep(&self) {
        let now = tokio::time::Instant::now();
        let mut pools = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for list in pools.values_mut() {
            list.retain(|p| {
                let expired = p.expires.is_some_and(|e| e <= now);
                let keep = !expired && !p.sender.is_closed();
                if !keep {
                    self.budget.gauge.dec();
                    if expired {
                        self.budget.closed_idle.inc();
                    }
                }
                keep
            });
        }
        pools.retain(|_, list| !list.is_empty());
        drop(pools);
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, c| {
                let expired = c.expired(now);
                let keep = !expired && !c.sender.is_closed();
                if !keep {
                    self.budget.gauge.dec();
                    if expired {
                        self.budget.closed_idle.inc();
                    }
                }
                keep
            });
    }

    /// The pod's shared HTTP/2 connection to `key`, if it has a live one; marks it used.
    fn shared_h2(&self, key: &PoolKey) -> Option<client_http2::SendRequest<Body>> {
        let mut h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        let c = h2.get_mut(key).filter(|c| !c.sender.is_closed())?;
        c.last_used = tokio::time::Instant::now();
        Some(c.sender.clone())
    }

    /// Pools a new HTTP/2 connection, unless the pod has [`MAX_H2_PER_POD`] or the node is
    /// at its idle cap (then it serves the request that made it and closes). Replaces a
    /// closed one for the same key.
    fn share_h2(&self, key: PoolKey, sender: client_http2::SendRequest<Body>, idle: Duration) {
        let mut h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        if h2.remove(&key).is_some() {
            self.budget.gauge.dec();
        }
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if h2.len() >= MAX_H2_PER_POD || self.budget.gauge.get() >= self.budget.cap {
            self.budget.closed_at_cap.inc();
            return;
        }
        h2.insert(
            key,
            SharedH2 {
                sender,
                last_used: tokio::time::Instant::now(),
                idle_timeout: idle,
            },
        );
        self.budget.gauge.inc();
    }
}

impl Drop for UpstreamPool {
    fn drop(&mut self) {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let n: usize = idle.values().map(Vec::len).sum();
        let h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner()).len();
        self.budget.gauge.dec_by((n + h2) as i64);
    }
}

/// Connects from the pod to `upstream`, originating TLS when the destination's policy says
/// so (offering `alpn`). A failed handshake is a connect failure (UF) with its reason.
pub(super) async fn open_upstream(
    inputs: &ProxyInputs,
    pod: &PodContext,
    upstream: SocketAddr,
    tls: Option<&UpstreamTls>,
    alpn: &'static [u8],
    connect_timeout: Duration,
) -> Result<UpstreamIo, UpstreamError> {
    // A mesh pod: the request goes inside an HBONE tunnel (mutual TLS, the destination's
    // identity checked), whatever TLS the route would originate.
    let mesh = {
        let snap = inputs.config.load();
        crate::proxy::hbone_peer(inputs, &snap, upstream)
    };
    if let Err(reason) = crate::proxy::istio_mutual_check(tls, mesh.as_deref()) {
        warn!(%upstream, %reason, "upstream refused");
        return Err(UpstreamError::Tls {
            reason,
            upstream,
            sni: tls.map(|t| t.sni.clone()).unwrap_or_default(),
        });
    }
    if let Some(peer) = mesh {
        let tunnel = crate::proxy::hbone::open(
            inputs,
            pod,
            crate::proxy::hbone::TunnelRequest {
                target: upstream,
                peer: &peer.identity,
                service: None,
                connect_timeout,
            },
        )
        .await
        .map_err(|e| {
            warn!(%upstream, error = %e, "HBONE tunnel failed");
            UpstreamError::Connect(ProxyError::Hbone(e))
        })?;
        return Ok(UpstreamIo::Tunnel(Box::new(tunnel)));
    }
    let stream = connect_from_pod(pod, upstream, connect_timeout)
        .await
        .map_err(UpstreamError::Connect)?;
    let Some(tls) = tls else {
        return Ok(UpstreamIo::Plain(stream));
    };
    let handshakes = &inputs.metrics.daemon.upstream_tls_handshakes;
    let result = tokio::time::timeout(
        connect_timeout,
        inputs
            .tls
            .connect(tls, alpn, stream, &pod.workload.namespace),
    )
    .await
    .unwrap_or_else(|_| Err("handshake timed out".into()));
    match result {
        Ok((io, kind)) => {
            let result = match kind {
                crate::proxy::tls::Handshake::Full => "full",
                crate::proxy::tls::Handshake::Resumed => "resumed",
            };
            handshakes
                .get_or_create(&crate::metrics::TlsHandshakeLabels { result })
                .inc();
            Ok(io)
        }
        Err(reason) => {
            handshakes
                .get_or_create(&crate::metrics::TlsHandshakeLabels { result: "failed" })
                .inc();
            warn!(%upstream, sni = %tls.sni, mode = ?tls.settings.mode, %reason, "upstream TLS handshake failed");
            Err(UpstreamError::Tls {
                reason,
                upstream,
                sni: tls.sni.clone(),
            })
        }
    }
}

pub(super) async fn connect_upstream(
    inputs: &ProxyInputs,
    pod: &PodContext,
    upstream: SocketAddr,
    tls: Option<&UpstreamTls>,
    connect_timeout: Duration,
) -> Result<Sender, UpstreamError> {
    let stream = open_upstream(inputs, pod, upstream, tls, b"http/1.1", connect_timeout).await?;
    let (sender, conn) = client_http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| UpstreamError::Handshake {
            protocol: "",
            source,
        })?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// Sends an HTTP/2 request on the pod's shared connection to `upstream` (made on first use).
pub(super) async fn forward_h2(
    inputs: &ProxyInputs,
    pod: &PodContext,
    upstream: SocketAddr,
    tls: Option<&UpstreamTls>,
    req: Request<Body>,
    timeout: Option<Duration>,
    (connect_timeout, idle_timeout): (Duration, Duration),
) -> Result<Response<Body>, UpstreamError> {
    let key = pool_key(inputs, upstream, tls);
    let existing = pod.http_pool.shared_h2(&key);
    let mut sender = match existing {
        Some(s) => s,
        None => {
            let stream = open_upstream(inputs, pod, upstream, tls, b"h2", connect_timeout).await?;
            let (sender, conn) =
                client_http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .map_err(|source| UpstreamError::Handshake {
                        protocol: "h2 ",
                        source,
                    })?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            pod.http_pool.share_h2(key, sender.clone(), idle_timeout);
            sender
        }
    };
    let send = async {
        sender
            .ready()
            .await
            .map_err(|e| upstream_failure(e, tls, upstream, "upstream h2"))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| upstream_failure(e, tls, upstream, "upstream reset"))
    };
    let resp = match timeout {
        Some(t) => tokio::time::timeout(t, send)
            .await
            .map_err(|_| UpstreamError::Timeout)??,
        None => send.await?,
    };
    Ok(resp.map(|b| b.boxed()))
}

/// Sends one attempt upstream; Err is (status, Envoy flag, message) for the client.
/// For an Upgrade, the upstream's OnUpgrade is left in the response's extensions.
#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    inputs: &ProxyInputs,
    pod: &PodContext,
    upstream: SocketAddr,
    protocol: UpstreamProtocol,
    tls: Option<&UpstreamTls>,
    mut req: Request<Body>,
    timeout: Option<Duration>,
    pool: Option<&ConnectionPool>,
) -> Result<Response<Body>, UpstreamError> {
    let max_uses = pool
        .and_then(|p| p.max_requests_per_connection)
        .filter(|n| *n > 0)
        .unwrap_or(u32::MAX);
    let idle_timeout = pool.and_then(|p| p.http_idle_timeout);
    // connectionPool.tcp.connectTimeout bounds the connect and TLS handshake (Envoy's
    // cluster connect_timeout); the daemon's flag is the default.
    let connect_timeout = pool
        .and_then(|p| p.connect_timeout)
        .unwrap_or(inputs.settings.connect_timeout);
    let upgrade = is_upgrade(req.headers());
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let client_version = req.version();
    // An Upgrade (WebSocket) stays on HTTP/1.1, as Envoy keeps it without extended CONNECT.
    let h2 = match protocol {
        UpstreamProtocol::Http2 => !upgrade,
        UpstreamProtocol::Http1 => false,
        UpstreamProtocol::AsClient => client_version == http::Version::HTTP_2,
    };
    // An h2 upstream always gets `:scheme` and `:authority` from the request as it now
    // stands (a rewritten URI or authority included); an h2 client's request going out as
    // HTTP/1.1 gets its Host and request line.
    if h2 || client_version == http::Version::HTTP_2 {
        translate_request(&mut req, h2, tls.is_some());
    }
    if h2 {
        let timeouts = (
            connect_timeout,
            idle_timeout.unwrap_or(DEFAULT_HTTP_IDLE_TIMEOUT),
        );
        let resp = forward_h2(inputs, pod, upstream, tls, req, timeout, timeouts).await?;
        return Ok(translate_response(resp, client_version));
    }
    let key = pool_key(inputs, upstream, tls);
    // A pooled connection the server closed meanwhile hands the request back unsent.
    let pooled = if upgrade {
        None
    } else {
        pod.http_pool.take(&key)
    };
    let send = async {
        let (mut sender, mut uses) = match pooled {
            Some((s, uses)) => (s, uses),
            None => (
                connect_upstream(inputs, pod, upstream, tls, connect_timeout).await?,
                0,
            ),
        };
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    sender = connect_upstream(inputs, pod, upstream, tls, connect_timeout).await?;
                    uses = 0;
                    sender
                        .send_request(req)
                        .await
                        .map_err(|e| upstream_failure(e, tls, upstream, "upstream reset"))?
                }
                None => {
                    return Err(upstream_failure(
                        e.into_error(),
                        tls,
                        upstream,
                        "upstream reset before headers",
                    ))
                }
            },
        };
        Ok((sender, uses + 1, resp))
    };
    let (sender, uses, mut resp) = match timeout {
        Some(t) => tokio::time::timeout(t, send)
            .await
            .map_err(|_| UpstreamError::Timeout)??,
        None => send.await?,
    };
    if upgrade {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let on = hyper::upgrade::on(&mut resp);
            resp.extensions_mut().insert(on);
        }
    } else if uses < max_uses {
        // connectionPool.http.maxRequestsPerConnection: a used-up connection is not reused.
        // Parked only once its response body has been read to the end (an HTTP/1
        // connection takes its next request only then): parked at the response head, a
        // concurrent request would find it busy and drop it, and every burst would open
        // fresh upstream connections. A body the client abandons closes it instead.
        let pool = pod.http_pool.clone();
        let mut sender = sender;
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.put(key, sender, uses, idle_timeout);
            }
        });
    }
    Ok(translate_response(resp.map(|b| b.boxed()), client_version))
}

/// Rewrites a request for the other HTTP version upstream: h2 wants the scheme and
/// authority in the URI (`:scheme`, `:authority`) and no Host header; HTTP/1.1 wants the
/// path in the request line and the authority in Host.
fn translate_request(req: &mut Request<Body>, to_h2: bool, tls: bool) {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    if to_h2 {
        let authority = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        if let Some(authority) = authority {
            let scheme = if tls { "https" } else { "http" };
            if let Ok(uri) = format!("{scheme}://{authority}{path}").parse() {
                *req.uri_mut() = uri;
            }
        }
        req.headers_mut().remove(header::HOST);
        *req.version_mut() = http::Version::HTTP_2;
    } else {
        // h2 may split Cookie into several fields; HTTP/1.1 servers expect one
        // (RFC 9113 §8.2.3: joined with "; ").
        let cookies: Vec<&[u8]> = req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if cookies.len() > 1 {
            if let Ok(joined) = HeaderValue::from_bytes(&cookies.join(&b"; "[..])) {
                req.headers_mut().insert(header::COOKIE, joined);
            }
        }
        if !req.headers().contains_key(header::HOST) {
            if let Some(v) = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        if let Ok(uri) = path.parse() {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = http::Version::HTTP_11;
    }
}

/// The response as the client's HTTP version carries it: an h2 client must get no
/// connection-specific headers (they are a protocol error in h2).
fn translate_response(mut resp: Response<Body>, client_version: http::Version) -> Response<Body> {
    if resp.version() != client_version {
        if client_version == http::Version::HTTP_2 {
            for h in HOP_BY_HOP {
                resp.headers_mut().remove(h);
            }
        }
        *resp.version_mut() = client_version;
    }
    resp
}

#[cfg(test)]
mod translation_tests {
    use super::*;

    fn request(version: http::Version, uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
        let mut b = Request::builder().version(version).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(empty()).expect("request")
    }

    #[test]
    fn an_http1_request_gets_scheme_and_authority_for_h2_and_loses_host() {
        let mut req = request(
            http::Version::HTTP_11,
            "/v1/items?x=1",
            &[("host", "api.example:8080")],
        );
        translate_request(&mut req, true, true);
        assert_eq!(
            req.uri().to_string(),
            "https://api.example:8080/v1/items?x=1"
        );
        assert!(req.headers().get(header::HOST).is_none());
        assert_eq!(req.version(), http::Version::HTTP_2);
    }

    #[test]
    fn an_h2_request_with_a_rewritten_host_keeps_it_as_authority() {
        // rewrite.authority sets Host; the h2 upstream must see it as :authority.
        let mut req = request(
            http::Version::HTTP_2,
            "http://old.example/path",
            &[("host", "new.example")],
        );
        translate_request(&mut req, true, false);
        assert_eq!(req.uri().to_string(), "http://new.example/path");
    }

    #[test]
    fn an_h2_request_for_http1_gets_host_one_cookie_and_an_origin_form_path() {
        let mut req = request(
            http::Version::HTTP_2,
            "http://web.example/a?b=c",
            &[("cookie", "a=1"), ("cookie", "b=2")],
        );
        translate_request(&mut req, false, false);
        assert_eq!(req.uri().to_string(), "/a?b=c");
        assert_eq!(req.headers()[header::HOST], "web.example");
        let cookies: Vec<_> = req.headers().get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, vec!["a=1; b=2"]);
        assert_eq!(req.version(), http::Version::HTTP_11);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real HTTP/2 client connection to a local h2c server that answers nothing.
    async fn h2_sender() -> client_http2::SendRequest<Body> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                            bytes::Bytes,
                        >::new(
                        )))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), service)
                        .await;
                });
            }
        });
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = client_http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    #[tokio::test]
    async fn shared_h2_connections_are_capped_per_pod_counted_and_closed_when_idle() {
        let metrics = crate::metrics::Metrics::new();
        let budget = Arc::new(IdleBudget::new(10_000, &metrics.daemon));
        let pool = UpstreamPool::new(budget);
        let sender = h2_sender().await;
        let key = |i: u16| (SocketAddr::from(([198, 18, 0, 9], 10_000 + i)), None, None);
        // A pod dialling 300 addresses keeps at most MAX_H2_PER_POD connections.
        for i in 0..300 {
            pool.share_h2(key(i), sender.clone(), Duration::from_millis(100));
        }
        assert_eq!(pool.h2.lock().unwrap().len(), MAX_H2_PER_POD);
        assert_eq!(
            metrics.daemon.upstream_idle_connections.get(),
            MAX_H2_PER_POD as i64
        );
        assert!(pool.shared_h2(&key(0)).is_some());
        // Idle past http.idleTimeout: closed by the sweep and given back to the budget;
        // one used meanwhile stays.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(pool.shared_h2(&key(1)).is_some());
        tokio::time::sleep(Duration::from_millis(60)).await;
        pool.sweep();
        assert_eq!(pool.h2.lock().unwrap().len(), 1);
        assert_eq!(metrics.daemon.upstream_idle_connections.get(), 1);
        assert!(metrics.daemon.upstream_idle_closed_idle.get() >= 255);
        drop(pool);
        assert_eq!(metrics.daemon.upstream_idle_connections.get(), 0);
    }
}
