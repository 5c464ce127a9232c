//! A plain HTTPS client for protocol-level tests (HTTP/1.1 over rustls, trusting the
//! stand-in's CA): one request per connection, watches read line by line.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use serde_json::Value;

/// A whole response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!("HTTP {} body is not JSON ({e}): {}", self.status, self.body)
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What came next on a watch stream.
#[derive(Debug, Clone)]
pub enum WatchNext {
    /// One `{"type": ..., "object": ...}` line.
    Event(Value),
    /// The server ended the stream cleanly (final chunk).
    Closed,
    /// The stream broke off (connection reset or closed mid-body).
    Broken(String),
    /// Nothing within the time asked.
    Timeout,
}

/// An open watch; dropping it closes the connection.
pub struct WatchStream {
    pub status: u16,
    rx: std::sync::mpsc::Receiver<WatchNext>,
    task: tokio::task::AbortHandle,
}

impl WatchStream {
    pub fn next(&self, timeout: Duration) -> WatchNext {
        match self.rx.recv_timeout(timeout) {
            Ok(n) => n,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => WatchNext::Timeout,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => WatchNext::Closed,
        }
    }

    /// The next event whose type is one of `types` within `timeout` (others are skipped);
    /// None when the time is up or the stream ends first.
    pub fn next_of(&self, types: &[&str], timeout: Duration) -> Option<Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.next(left) {
                WatchNext::Event(e) if types.iter().any(|t| e["type"] == *t) => return Some(e),
                WatchNext::Event(_) => {}
                _ => return None,
            }
        }
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) struct Target {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub rt: tokio::runtime::Handle,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr, ca_pem: &str) -> std::io::Result<Sender> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(c.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(addr.ip().to_string()).map_err(std::io::Error::other)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn send(
    t_addr: SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    accept: Option<&str>,
) -> std::io::Result<hyper::Response<hyper::body::Incoming>> {
    let mut sender = connect(t_addr, ca_pem).await?;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", t_addr.to_string())
        .header("user-agent", "proxy-tests/kube-api-client");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    req = req.header("accept", accept.unwrap_or("application/json"));
    let req = req.body(Empty::new()).map_err(std::io::Error::other)?;
    sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)
}

impl Target {
    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        accept: Option<&str>,
    ) -> std::io::Result<RawResponse> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (addr, ca) = (self.addr, self.ca_pem.clone());
        let (method, path) = (method.to_string(), path.to_string());
        let (token, accept) = (token.map(str::to_string), accept.map(str::to_string));
        let task = self.rt.spawn(async move {
            let result = async {
                let resp = send(
                    addr,
                    &ca,
                    &method,
                    &path,
                    token.as_deref(),
                    accept.as_deref(),
                )
                .await?;
                let status = resp.status().as_u16();
                let headers = resp
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(std::io::Error::other)?
                    .to_bytes();
                Ok(RawResponse {
                    status,
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                })
            }
            .await;
            let _ = tx.send(result);
        });
        let out = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| Err(std::io::Error::other("no answer within 10 s")));
        task.abort();
        out
    }

    pub(crate) fn watch(&self, path: &str, token: &str) -> std::io::Result<WatchStream> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (status_tx, status_rx) = std::sync::mpsc::channel();
        let (addr, ca) = (self.addr, self.ca_pem.clone());
        let (path, token) = (path.to_string(), token.to_string());
        let task = self.rt.spawn(async move {
            let resp = match send(addr, &ca, "GET", &path, Some(&token), None).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = status_tx.send(Err(e));
                    return;
                }
            };
            let _ = status_tx.send(Ok(resp.status().as_u16()));
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            loop {
                match body.frame().await {
                    None => {
                        let _ = tx.send(WatchNext::Closed);
                        return;
                    }
                    Some(Err(e)) => {
                        let _ = tx.send(WatchNext::Broken(e.to_string()));
                        return;
                    }
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else { continue };
                        buf.extend_from_slice(&data);
                        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=pos).collect();
                            let text = String::from_utf8_lossy(&line);
                            if text.trim().is_empty() {
                                continue;
                            }
                            let v = serde_json::from_str(text.trim()).unwrap_or_else(
                                |e| serde_json::json!({"type": "UNPARSABLE", "error": e.to_string(), "line": text}),
                            );
                            if tx.send(WatchNext::Event(v)).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        let status = match status_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                task.abort();
                return Err(e);
            }
            Err(_) => {
                task.abort();
                return Err(std::io::Error::other("no watch response within 10 s"));
            }
        };
        Ok(WatchStream {
            status,
            rx,
            task: task.abort_handle(),
        })
    }
}
