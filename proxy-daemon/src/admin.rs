//! The three small HTTP endpoints (SPEC.md): admin (config_dump, logging, quitquitquit),
//! metrics (Prometheus text) and health (readiness). Handlers are synchronous: each
//! answers from in-memory state and never waits on the data path.
use std::{collections::HashMap, convert::Infallible, net::IpAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::{metrics::Metrics, readiness::Ready, telemetry::LogControl};

type Body = Full<Bytes>;
/// (method, path, query, whether the client accepts gzip) → response.
pub type Handler = Arc<dyn Fn(&Method, &str, Option<&str>, bool) -> Response<Body> + Send + Sync>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

fn not_found() -> Response<Body> {
    respond(StatusCode::NOT_FOUND, "text/plain", "not found\n")
}

/// Connections one endpoint serves at once, and from one address: the metrics and health
/// ports listen on the node's addresses, which every pod can reach. A scraper needs one or
/// two; a pod that opens hundreds and never sends is refused past the cap, counted in
/// `proxy_daemon_endpoint_connections_refused_total{endpoint,reason}`.
pub const MAX_ENDPOINT_CONNECTIONS: usize = 64;
pub const MAX_ENDPOINT_CONNECTIONS_PER_PEER: usize = 8;
/// A request head must arrive within this long (slow-header clients are cut off)...
const ENDPOINT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// ...and no connection is held longer than this (scrapers reconnect).
const ENDPOINT_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Which endpoint a listener is, for its limits' counter.
#[derive(Clone)]
pub struct Endpoint {
    pub name: &'static str,
    pub refused: prometheus_client::metrics::family::Family<
        crate::metrics::EndpointRefusalLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

/// Connections in flight on one endpoint, in all and per peer address.
#[derive(Default)]
struct Admission {
    by_peer: std::sync::Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; gives its place back when dropped.
struct Admitted {
    admission: Arc<Admission>,
    peer: IpAddr,
}

impl Admission {
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, &'static str> {
        let mut guard = self.by_peer.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_peer) = &mut *guard;
        if *total >= MAX_ENDPOINT_CONNECTIONS {
            return Err("endpoint_limit");
        }
        let mine = per_peer.entry(peer).or_default();
        if *mine >= MAX_ENDPOINT_CONNECTIONS_PER_PEER {
            return Err("peer_limit");
        }
        *mine += 1;
        *total += 1;
        Ok(Admitted {
            admission: self.clone(),
            peer,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut guard = self
            .admission
            .by_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (total, per_peer) = &mut *guard;
        *total = total.saturating_sub(1);
        if let Some(n) = per_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

/// Serves `handler` on `listener` until the task is dropped. With `token`, every request
/// must carry `Authorization: Bearer <token>` (401 otherwise). Connections are bounded in
/// number (per peer too), head read time and lifetime; a failing accept backs off.
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    token: Option<Arc<str>>,
    endpoint: Endpoint,
) {
    let admission = Arc::new(Admission::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                debug!(endpoint = endpoint.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = match admission.admit(peer.ip()) {
            Ok(a) => a,
            Err(reason) => {
                endpoint
                    .refused
                    .get_or_create(&crate::metrics::EndpointRefusalLabels {
                        endpoint: endpoint.name,
                        reason,
                    })
                    .inc();
                // A reset, not a FIN: the peer learns at once, and no TIME_WAIT stays here.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                continue;
            }
        };
        let (handler, token) = (handler.clone(), token.clone());
        tokio::spawn(async move {
            let _admitted = admitted;
            let service = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                let authorized = token.as_deref().is_none_or(|t| {
                    req.headers()
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .is_some_and(|given| constant_time_eq(given.as_bytes(), t.as_bytes()))
                });
                let method = req.method().clone();
                let path = req.uri().path().to_string();
                let query = req.uri().query().map(str::to_string);
                let gzip = req
                    .headers()
                    .get(header::ACCEPT_ENCODING)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("gzip"));
                async move {
                    if !authorized {
                        return Ok::<_, Infallible>(respond(
                            StatusCode::UNAUTHORIZED,
                            "text/plain",
                            "admin needs Authorization: Bearer <token> (--admin-token-file)\n",
                        ));
                    }
                    // Handlers are synchronous and a big scrape takes a while to encode:
                    // off the async workers, so the data path never waits on it.
                    let resp = tokio::task::spawn_blocking(move || {
                        handler(&method, &path, query.as_deref(), gzip)
                    })
                    .await
                    .unwrap_or_else(|_| {
                        respond(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "text/plain",
                            "handler failed\n",
                        )
                    });
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ENDPOINT_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(ENDPOINT_CONNECTION_LIFETIME, conn).await {
                debug!(error = %e, "endpoint connection");
            }
        });
    }
}

/// Compares without returning early at the first difference (a token is a secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Scrapes encoded at once at most: a big scrape is CPU and memory, and the metrics port
/// is reachable from every pod on the node. Prometheus pairs need two.
pub const MAX_CONCURRENT_SCRAPES: usize = 2;

/// A named section of /config_dump, produced on demand (ztunnel's config_dump handlers).
pub type DumpSection = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

#[derive(Default)]
pub struct ConfigDump {
    sections: Vec<(&'static str, DumpSection)>,
}

impl ConfigDump {
    pub fn add(&mut self, name: &'static str, section: DumpSection) {
        self.sections.push((name, section));
    }

    pub fn render(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (name, section) in &self.sections {
            map.insert((*name).to_string(), section());
        }
        serde_json::Value::Object(map)
    }
}

/// A query parameter, percent-decoded.
fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

pub fn admin_handler(
    dump: Arc<ConfigDump>,
    logs: LogControl,
    quit: tokio::sync::watch::Sender<bool>,
) -> Handler {
    Arc::new(move |method, path, query, _| match (method, path) {
        (&Method::GET, "/config_dump") => {
            let body = serde_json::to_vec_pretty(&dump.render()).unwrap_or_default();
            // The JSON tree of a large mesh is several times the body: freed, it goes back.
            crate::memory::release_freed();
            respond(StatusCode::OK, "application/json", body)
        }
        // Changing state takes a POST (as Envoy's admin does): a GET, which a browser, a
        // link preview or a scraper may send, only reads.
        (&Method::GET, "/logging") if query_param(query, "level").is_some() => respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use POST to change the log filter\n",
        ),
        (&Method::GET | &Method::POST, "/logging") => match query_param(query, "level") {
            Some(level) => match logs.set_filter(&level) {
                Ok(()) => {
                    info!(filter = %level, "log filter changed");
                    respond(
                        StatusCode::OK,
                        "text/plain",
                        format!("log filter: {level}\n"),
                    )
                }
                Err(e) => respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            },
            None => respond(
                StatusCode::OK,
                "text/plain",
                format!("log filter: {}\n", logs.current()),
            ),
        },
        (&Method::POST, "/quitquitquit") => {
            let _ = quit.send(true);
            respond(StatusCode::OK, "text/plain", "draining\n")
        }
        (_, "/quitquitquit" | "/logging") => {
            respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use POST\n")
        }
        _ => not_found(),
    })
}

pub fn metrics_handler(
    metrics: Arc<Metrics>,
    before_scrape: Arc<dyn Fn() + Send + Sync>,
) -> Handler {
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Arc::new(move |_, path, _, gzip| match path {
        "/metrics" | "/stats/prometheus" => {
            use std::sync::atomic::Ordering;
            if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_CONCURRENT_SCRAPES {
                in_flight.fetch_sub(1, Ordering::AcqRel);
                metrics.daemon.scrapes_refused.inc();
                return respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "too many concurrent scrapes\n",
                );
            }
            struct Done<'a>(&'a std::sync::atomic::AtomicUsize);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                }
            }
            let _done = Done(&in_flight);
            before_scrape();
            let text = metrics.encode();
            let content_type = "text/plain; version=0.0.4; charset=utf-8";
            // Istio's label sets make scrapes large and very repetitive: gzip (as Prometheus
            // asks for) shrinks them many times over.
            if gzip && text.len() > 4096 {
                let mut enc = flate2::write::GzEncoder::new(
                    Vec::with_capacity(text.len() / 16),
                    flate2::Compression::fast(),
                );
                if std::io::Write::write_all(&mut enc, text.as_bytes()).is_ok() {
                    if let Ok(zipped) = enc.finish() {
                        let mut resp = respond(StatusCode::OK, content_type, zipped);
                        resp.headers_mut().insert(
                            header::CONTENT_ENCODING,
                            header::HeaderValue::from_static("gzip"),
                        );
                        return resp;
                    }
                }
            }
            respond(StatusCode::OK, content_type, text)
        }
        _ => not_found(),
    })
}

pub fn health_handler(ready: Ready) -> Handler {
    Arc::new(move |_, path, _, _| match path {
        "/healthz/ready" => {
            let pending = ready.pending();
            if pending.is_empty() {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {}\n", pending.join(", ")),
                )
            }
        }
        _ => not_found(),
    })
}
