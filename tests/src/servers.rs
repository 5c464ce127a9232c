//! Upstream servers living in service namespaces, run by the test process on a background
//! runtime (the test process is in no pod cgroup, so its sockets are never captured).
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use crate::node::Host;

pub struct Servers {
    rt: tokio::runtime::Runtime,
}

/// What an identity server saw: one (peer address, first line) per connection.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<(SocketAddr, String)>>>);

impl Seen {
    pub fn peers(&self) -> Vec<(SocketAddr, String)> {
        self.0.lock().unwrap().clone()
    }
}

/// What a transfer server saw and sent.
#[derive(Clone, Debug, Default)]
pub struct XferRecord {
    pub received_sha256: String,
    pub received_bytes: u64,
    pub sent_sha256: String,
    pub sent_bytes: u64,
}

impl Default for Servers {
    fn default() -> Self {
        Self::new()
    }
}

impl Servers {
    pub fn new() -> Self {
        Self {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("server runtime"),
        }
    }

    /// Answers each connection's first line with `"<its own addr> <peer ip> <line>"`, so a
    /// client can check it reached the server it meant to and the test can see who came.
    pub fn identity(&self, host: &Host, port: u16) -> Seen {
        let std_listener = host.listen(port);
        let seen = Seen::default();
        let record = seen.clone();
        self.rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            let local = listener.local_addr().expect("local addr");
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut line = String::new();
                    if BufReader::new(r).read_line(&mut line).await.is_err() {
                        return;
                    }
                    let line = line.trim_end().to_string();
                    record.0.lock().unwrap().push((peer, line.clone()));
                    let _ = w
                        .write_all(format!("{local} {} {line}\n", peer.ip()).as_bytes())
                        .await;
                    let _ = w.shutdown().await;
                });
            }
        });
        seen
    }

    /// Reads everything (hashing it) while sending `send_bytes` of seeded data, then closes
    /// its write side: the peer's half-close must not cut our direction short.
    pub fn xfer(
        &self,
        host: &Host,
        port: u16,
        send_bytes: u64,
        seed: u64,
    ) -> Arc<Mutex<Vec<XferRecord>>> {
        let std_listener = host.listen(port);
        let records = Arc::new(Mutex::new(Vec::new()));
        let out = records.clone();
        self.rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let records = records.clone();
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.into_split();
                    let reader = tokio::spawn(async move {
                        let mut h = Sha256::new();
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut total = 0u64;
                        while let Ok(n) = r.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            h.update(&buf[..n]);
                            total += n as u64;
                        }
                        (hex::encode(h.finalize()), total)
                    });
                    let mut h = Sha256::new();
                    let mut state = seed;
                    let mut left = send_bytes;
                    let mut buf = vec![0u8; 64 * 1024];
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        crate::fill(&mut state, &mut buf[..n]);
                        if w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        h.update(&buf[..n]);
                        left -= n as u64;
                    }
                    let _ = w.shutdown().await;
                    let (received_sha256, received_bytes) = reader.await.unwrap_or_default();
                    records.lock().unwrap().push(XferRecord {
                        received_sha256,
                        received_bytes,
                        sent_sha256: hex::encode(h.finalize()),
                        sent_bytes: send_bytes - left,
                    });
                });
            }
        });
        out
    }
}

/// How an HTTP echo server behaves.
#[derive(Clone, Default)]
pub struct HttpEcho {
    /// Name reported in every response (`"server"`).
    pub name: String,
    /// Wait this long before answering.
    pub delay: std::time::Duration,
    /// Answer every Nth request (server-wide) with `fail_status` instead (0: never).
    pub fail_every: u32,
    /// The status of those failures (None: 503).
    pub fail_status: Option<u16>,
    /// Where to record every request's JSON description (what this server received).
    pub log: Option<Arc<Mutex<Vec<serde_json::Value>>>>,
}

async fn read_head(
    r: &mut (impl tokio::io::AsyncBufRead + Unpin),
) -> Option<(String, Vec<(String, String)>)> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let request_line = line.trim_end().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await.ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Some((request_line, headers))
}

/// Request headers by (lowercase) name; a header sent several times shows every value,
/// joined with `,` in the order received (as RFC 9110 combines them, and as the Gateway API
/// conformance echo reports them) — never only the last.
pub fn joined(headers: &[(String, String)]) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::<String, String>::new();
    for (k, v) in headers {
        out.entry(k.clone())
            .and_modify(|e| {
                e.push(',');
                e.push_str(v);
            })
            .or_insert_with(|| v.clone());
    }
    out
}

impl Servers {
    /// A minimal HTTP/1.1 server: answers each request with JSON describing it (server name,
    /// method, path, headers, peer); keep-alive; an Upgrade request gets 101 and then an
    /// echo of whatever bytes follow.
    pub fn http_echo(
        &self,
        host: &Host,
        port: u16,
        cfg: HttpEcho,
    ) -> Arc<std::sync::atomic::AtomicU32> {
        let std_listener = host.listen(port);
        let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let hits = served.clone();
        self.rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            loop {
                let Ok((stream, peer)) = listener.accept().await else { continue };
                let cfg = cfg.clone();
                let served = served.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r);
                    while let Some((request_line, headers)) = read_head(&mut r).await {
                        let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                        let len: usize = get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                        let mut body = vec![0u8; len];
                        if len > 0 && r.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        if let Some(log) = &cfg.log {
                            log.lock().unwrap().push(serde_json::json!({
                                "request_line": request_line,
                                "headers": joined(&headers),
                                "body_len": len,
                            }));
                        }
                        if !cfg.delay.is_zero() {
                            tokio::time::sleep(cfg.delay).await;
                        }
                        let mut parts = request_line.split_whitespace();
                        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                        if get("upgrade").is_some() {
                            let proto = get("upgrade").unwrap_or_default();
                            let _ = w.write_all(format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n\r\n").as_bytes()).await;
                            let mut buf = vec![0u8; 4096];
                            loop {
                                match r.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => {
                                        if w.write_all(&buf[..n]).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                            }
                        }
                        let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        // The status a client asks for (`x-echo-status: 503`): a failure that
                        // only that client's requests meet.
                        if let Some(code) = get("x-echo-status").and_then(|v| v.parse::<u16>().ok()) {
                            let resp = format!("HTTP/1.1 {code} Asked\r\nContent-Length: 0\r\nX-Served-By: {}\r\n\r\n", cfg.name);
                            if w.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        if cfg.fail_every > 0 && n.is_multiple_of(cfg.fail_every) {
                            let code = cfg.fail_status.unwrap_or(503);
                            let resp = format!("HTTP/1.1 {code} Failed\r\nContent-Length: 0\r\nX-Served-By: {}\r\n\r\n", cfg.name);
                            if w.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
                            let body = "x".repeat(n.min(1 << 20));
                            let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Served-By: {}\r\n\r\n{body}", body.len(), cfg.name);
                            if w.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let json = serde_json::json!({
                            "server": cfg.name,
                            "method": method,
                            "path": path,
                            "headers": joined(&headers),
                            "peer": peer.ip().to_string(),
                            "peer_port": peer.port(),
                            "body_len": len,
                        })
                        .to_string();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Served-By: {}\r\n\r\n{json}",
                            json.len(),
                            cfg.name
                        );
                        if w.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        hits
    }
}

impl Servers {
    /// A server-first service (SMTP-like): sends a banner on accept, then answers each
    /// line with "250 <line>".
    pub fn banner(&self, host: &Host, port: u16, banner: &'static str) {
        let std_listener = host.listen(port);
        self.rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    if w.write_all(format!("{banner}\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let mut r = BufReader::new(r);
                    let mut line = String::new();
                    while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                        let reply = format!("250 {}\r\n", line.trim_end());
                        if w.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                        line.clear();
                    }
                });
            }
        });
    }
}

impl Servers {
    /// Reads the first TLS record of each connection, keeps a SHA-256 of it, answers with
    /// `name` and closes: proof of where a ClientHello went, and that it arrived untouched.
    pub fn tls_record_sink(
        &self,
        host: &Host,
        port: u16,
        name: &'static str,
    ) -> Arc<Mutex<Vec<String>>> {
        let std_listener = host.listen(port);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = seen.clone();
        self.rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = [0u8; 5];
                    if stream.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = u16::from_be_bytes([head[3], head[4]]) as usize;
                    let mut rest = vec![0u8; len];
                    if stream.read_exact(&mut rest).await.is_err() {
                        return;
                    }
                    let mut h = Sha256::new();
                    h.update(head);
                    h.update(&rest);
                    seen.lock().unwrap().push(hex::encode(h.finalize()));
                    let _ = stream.write_all(format!("{name}\n").as_bytes()).await;
                });
            }
        });
        out
    }
}

impl Servers {
    /// An h2c (HTTP/2 prior knowledge) server answering every request with JSON naming
    /// itself, the path, the authority and the protocol it saw.
    pub fn h2c_echo(&self, host: &Host, port: u16, name: &'static str) {
        self.h2c_echo_logged(host, port, name, None)
    }

    /// [`Servers::h2c_echo`] that also records each request (authority, headers, body length).
    pub fn h2c_echo_logged(
        &self,
        host: &Host,
        port: u16,
        name: &'static str,
        log: Option<Arc<Mutex<Vec<serde_json::Value>>>>,
    ) {
        use http_body_util::{BodyExt as _, Full};
        let std_listener = host.listen(port);
        self.rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let log = log.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                        let (parts, incoming) = req.into_parts();
                        let received = incoming.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                        if let Some(log) = &log {
                            log.lock().unwrap().push(serde_json::json!({
                                "authority": parts.uri.authority().map(|a| a.to_string()),
                                "headers": parts.headers.iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect::<std::collections::BTreeMap<_, _>>(),
                                "body_len": received,
                            }));
                        }
                        let req = hyper::Request::from_parts(parts, ());
                        let pairs: Vec<(String, String)> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                            .collect();
                        let body = serde_json::json!({
                            "server": name,
                            "headers": joined(&pairs),
                            "path": req.uri().path(),
                            "authority": req.uri().authority().map(|a| a.to_string()),
                            "proto": format!("{:?}", req.version()),
                            "content_type": req.headers().get("content-type").and_then(|v| v.to_str().ok()),
                        })
                        .to_string();
                        let grpc = req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.starts_with("application/grpc"));
                        let mut resp = hyper::Response::builder().header("x-served-by", name);
                        if grpc {
                            // A gRPC answer's status: the "grpc-status" the test asked for
                            // (as a trailers-only response carries it, in the headers).
                            let status = req
                                .headers()
                                .get("x-want-grpc-status")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("0")
                                .to_string();
                            resp = resp
                                .header("content-type", "application/grpc")
                                .header("grpc-status", status);
                        }
                        let resp = resp
                            .body(Full::new(bytes::Bytes::from(body)))
                            .expect("response");
                        Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
}

impl Servers {
    /// Accepts and resets every connection at once (SO_LINGER 0, then close).
    pub fn resetter(&self, host: &Host, port: u16) {
        let std_listener = host.listen(port);
        self.rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                let _ = nix::sys::socket::setsockopt(
                    &stream,
                    nix::sys::socket::sockopt::Linger,
                    &linger,
                );
                drop(stream);
            }
        });
    }
}

/// Answers of the test DNS server: name → (IPv4 addresses, TTL seconds).
pub type DnsAnswers = Arc<Mutex<std::collections::HashMap<String, (Vec<std::net::Ipv4Addr>, u32)>>>;

/// What an HTTPS echo server requires of clients and tells about them.
pub struct HttpsEcho {
    pub name: &'static str,
    pub cert_pem: String,
    pub key_pem: String,
    /// Require a client certificate signed by this CA.
    pub client_ca_pem: Option<String>,
    /// Offer h2 by ALPN too (and serve h2 when the client picks it).
    pub h2: bool,
}

impl Servers {
    /// A DNS server on 127.0.0.1 (UDP, the node's loopback) answering A queries from
    /// `answers`; unknown names get NXDOMAIN. Returns its address and a query counter.
    pub fn dns(&self, answers: DnsAnswers) -> (SocketAddr, Arc<std::sync::atomic::AtomicU32>) {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("dns bind");
        sock.set_nonblocking(true).expect("nonblocking");
        let addr = sock.local_addr().expect("dns addr");
        let queries = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = queries.clone();
        self.rt.spawn(async move {
            let sock = tokio::net::UdpSocket::from_std(sock).expect("dns socket");
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(reply) = dns_reply(&buf[..n], &answers) {
                    let _ = sock.send_to(&reply, peer).await;
                }
            }
        });
        (addr, queries)
    }
}

/// One DNS answer (RFC 1035 §4): the question echoed, A records for a known name.
fn dns_reply(q: &[u8], answers: &DnsAnswers) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(pos..pos + len)?).to_ascii_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*q.get(pos)?, *q.get(pos + 1)?]);
    let question = q.get(12..pos + 4)?;
    let name = labels.join(".");
    let found = answers.lock().unwrap().get(&name).cloned();
    let rd = q[2] & 0x01;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&q[0..2]);
    out.push(0x80 | rd); // QR, opcode 0, RD as asked
    out.push(if found.is_some() { 0x80 } else { 0x83 }); // RA; NOERROR or NXDOMAIN
    let records = match (&found, qtype) {
        (Some((ips, ttl)), 1) => ips.iter().map(|ip| (*ip, *ttl)).collect(),
        _ => Vec::new(),
    };
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(records.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for (ip, ttl) in records {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

impl Servers {
    /// HTTPS (HTTP/1.1 over rustls) answering JSON that says what the TLS layer saw: SNI,
    /// ALPN, TLS version, the client certificate's presence, and whether the session was
    /// resumed. Every request is also described in `log`, if given.
    pub fn https_echo(&self, host: &Host, port: u16, cfg: HttpsEcho) {
        use http_body_util::Full;
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cfg.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("server cert");
        let key = PrivateKeyDer::from_pem_slice(cfg.key_pem.as_bytes()).expect("server key");
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = match &cfg.client_ca_pem {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                    roots.add(c.expect("client ca")).expect("add client ca");
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).expect("server config");
        config.alpn_protocols = if cfg.h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let std_listener = host.listen(port);
        let name = cfg.name;
        self.rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            loop {
                let Ok((stream, peer)) = listener.accept().await else { continue };
                let acceptor = acceptor.clone();
                // As any TLS server does: TLS writes records in several small writes.
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let (_, conn) = tls.get_ref();
                    let seen = serde_json::json!({
                        "server": name,
                        "tls": true,
                        "sni": conn.server_name(),
                        "alpn": conn.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned()),
                        "version": format!("{:?}", conn.protocol_version()),
                        "client_cert": conn.peer_certificates().is_some_and(|c| !c.is_empty()),
                        "resumed": matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed)),
                        "peer": peer.ip().to_string(),
                    });
                    let h2 = conn.alpn_protocol() == Some(b"h2");
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let mut body = seen.clone();
                        body["path"] = req.uri().path().into();
                        body["proto"] = format!("{:?}", req.version()).into();
                        body["host"] = req
                            .headers()
                            .get("host")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                            .or_else(|| req.uri().authority().map(|a| a.to_string()))
                            .into();
                        async move {
                            let resp = hyper::Response::builder()
                                .header("x-served-by", name)
                                .header("content-type", "application/json")
                                .body(Full::new(bytes::Bytes::from(body.to_string())))
                                .expect("response");
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(tls);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    }
                });
            }
        });
    }
}
