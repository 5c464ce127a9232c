//! What a captured connection speaks, from its first bytes (peeked, never consumed).
use std::time::Duration;

use tokio::net::TcpStream;

/// How long to wait for a client that has said nothing. Server-first protocols (MySQL,
/// SMTP, SSH banners) send nothing until the server speaks: after this they are opaque.
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c, gRPC without TLS).
    Http2,
    Tls,
    Opaque,
}

const METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Classifies what is known so far; None: not enough bytes to tell.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.is_empty() {
        return None;
    }
    // TLS handshake record: content type 22, major version 3.
    if bytes[0] == 0x16 {
        return match bytes.get(1) {
            None => None,
            Some(3) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    if H2_PREFACE.starts_with(&bytes[..bytes.len().min(H2_PREFACE.len())]) {
        return (bytes.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // An HTTP/1 request line starts with an upper-case method and a space.
    let mut undecided = false;
    for m in METHODS {
        let n = bytes.len().min(m.len() + 1);
        let want: Vec<u8> = m.iter().copied().chain(std::iter::once(b' ')).collect();
        if bytes[..n] == want[..n] {
            if n == want.len() {
                return Some(Protocol::Http1);
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Protocol::Opaque)
    }
}

/// Peeks until the protocol is clear, the client goes quiet for [`SNIFF_TIMEOUT`], or it
/// closes. Undecided or silent means opaque: bytes are then copied as they are.
pub async fn detect(stream: &TcpStream) -> Protocol {
    detect_within(stream, SNIFF_TIMEOUT).await
}

/// What the port declares about its protocol (Istio: port name prefix or appProtocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// HTTP family: the client speaks first, however long it takes (h1 or h2 told apart).
    Http,
    /// Opaque TCP family (incl. server-first protocols): no waiting, no parsing.
    Tcp,
    /// TLS / HTTPS: read the ClientHello's SNI (bounded).
    Tls,
    Undeclared,
}

impl From<crate::state::registry::ProtocolClass> for Declared {
    fn from(class: crate::state::registry::ProtocolClass) -> Self {
        use crate::state::registry::ProtocolClass;
        match class {
            ProtocolClass::Http => Declared::Http,
            ProtocolClass::Tcp => Declared::Tcp,
            ProtocolClass::Tls => Declared::Tls,
            ProtocolClass::Undeclared => Declared::Undeclared,
        }
    }
}

/// How long an HTTP-declared port waits for a client's first bytes. Istio waits without
/// limit (clients and pools may connect long before their first request); an idle wait
/// costs only a parked task, so this is a backstop, not a policy.
const DECLARED_HTTP_WAIT: Duration = Duration::from_secs(3600);

/// Detection steered by the port's declaration.
pub async fn detect_declared(stream: &TcpStream, declared: Declared) -> Protocol {
    match declared {
        Declared::Tcp => Protocol::Opaque,
        Declared::Tls => Protocol::Tls,
        Declared::Http => match detect_within(stream, DECLARED_HTTP_WAIT).await {
            Protocol::Http2 => Protocol::Http2,
            Protocol::Http1 => Protocol::Http1,
            // A declared HTTP port carrying something else: copy it as it is.
            other => other,
        },
        Declared::Undeclared => detect(stream).await,
    }
}

/// Peeks into `buf` once more than `seen` bytes are buffered, or the peer closed (0):
/// (bytes buffered, whether the peer has shut its side so no more will come).
///
/// Waits on readiness, never on a timer: a peek leaves the bytes in place, so the socket
/// stays readable and a naive loop would spin (one slow client sending a byte at a time
/// must cost a parked task, not a core). Inside `try_io`, a peek that found nothing new
/// clears tokio's readiness, race-free (bytes that arrived meanwhile set it again), and
/// the next wait is for the kernel's next wakeup. A peer that sent a few bytes and then
/// shut its side (FIN) sets no new readiness, only "read closed": seen here, so that such
/// a client is not waited on until the deadline (found by fuzzing: `PO` then FIN held a
/// declared-HTTP connection for the hour-long wait).
async fn peek_more(
    stream: &TcpStream,
    buf: &mut [u8],
    seen: usize,
) -> std::io::Result<(usize, bool)> {
    use std::os::fd::AsRawFd as _;
    loop {
        let ready = stream.ready(tokio::io::Interest::READABLE).await?;
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: recv into a valid, writable buffer of buf.len() bytes on an open fd.
            let n = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            match usize::try_from(n) {
                Err(_) => Err(std::io::Error::last_os_error()),
                Ok(n) if n > seen || n == 0 => Ok(n),
                Ok(_) => Err(std::io::ErrorKind::WouldBlock.into()),
            }
        });
        match peeked {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() {
                    return Ok((seen, true));
                }
            }
            Err(e) => return Err(e),
            Ok(n) => return Ok((n, ready.is_read_closed())),
        }
    }
}

async fn detect_within(stream: &TcpStream, wait: Duration) -> Protocol {
    let mut buf = [0u8; 32];
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, peek_more(stream, &mut buf, seen)).await;
        let (n, closed) = match peeked {
            Ok(Ok((n, closed))) if n > 0 => (n, closed),
            // Closed, error or timeout: nothing to parse.
            _ => return Protocol::Opaque,
        };
        seen = n;
        if let Some(p) = classify(&buf[..n]) {
            return p;
        }
        // Full buffer, or the client said all it will: what it sent is not a protocol
        // we know the start of.
        if n == buf.len() || closed {
            return Protocol::Opaque;
        }
    }
}

/// The server name from a TLS ClientHello (the first handshake record), if complete and
/// present. Only reads; `None` for anything malformed or truncated.
pub fn client_hello_sni(record: &[u8]) -> Option<String> {
    let take = |b: &[u8], at: usize, n: usize| b.get(at..at + n).map(|s| s.to_vec());
    let u16_at = |b: &[u8], at: usize| {
        b.get(at..at + 2)
            .map(|s| u16::from_be_bytes([s[0], s[1]]) as usize)
    };
    if record.first() != Some(&0x16) {
        return None;
    }
    let rec_len = u16_at(record, 3)?;
    let hs = record.get(5..5 + rec_len)?;
    if hs.first() != Some(&0x01) {
        return None;
    }
    // handshake header(4) + version(2) + random(32)
    let mut at = 4 + 2 + 32;
    at += 1 + *hs.get(at)? as usize; // session id
    at += 2 + u16_at(hs, at)?; // cipher suites
    at += 1 + *hs.get(at)? as usize; // compression methods
    let ext_end = at + 2 + u16_at(hs, at)?;
    at += 2;
    while at + 4 <= ext_end.min(hs.len()) {
        let ext_type = u16_at(hs, at)?;
        let ext_len = u16_at(hs, at + 2)?;
        let body = take(hs, at + 4, ext_len)?;
        if ext_type == 0 {
            // server_name_list: len(2), then entries of type(1) len(2) name
            let mut p = 2;
            while p + 3 <= body.len() {
                let name_len = u16_at(&body, p + 1)?;
                if body[p] == 0 {
                    let name = body.get(p + 3..p + 3 + name_len)?;
                    return std::str::from_utf8(name)
                        .ok()
                        .map(|n| n.to_ascii_lowercase());
                }
                p += 3 + name_len;
            }
            return None;
        }
        at += 4 + ext_len;
    }
    None
}

/// Peeks the whole first TLS record (bounded) and returns its SNI.
pub async fn peek_sni(stream: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024 + 5];
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let mut seen = 0;
    loop {
        let (n, closed) = tokio::time::timeout_at(deadline, peek_more(stream, &mut buf, seen))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if n >= 5 {
            let want = 5 + u16::from_be_bytes([buf[3], buf[4]]) as usize;
            if n >= want || n == buf.len() {
                return client_hello_sni(&buf[..n]);
            }
        }
        if closed {
            return client_hello_sni(&buf[..n]);
        }
        seen = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with one SNI entry, built by hand.
    fn hello(sni: &str) -> Vec<u8> {
        let name = sni.as_bytes();
        let mut sni_ext = vec![0, 0]; // type server_name
        let list_len = 3 + name.len();
        sni_ext.extend(((list_len + 2) as u16).to_be_bytes());
        sni_ext.extend((list_len as u16).to_be_bytes());
        sni_ext.push(0);
        sni_ext.extend((name.len() as u16).to_be_bytes());
        sni_ext.extend(name);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        let exts = [vec![0, 0x0b, 0, 2, 1, 0], sni_ext].concat(); // ec_point_formats, then SNI
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn reads_sni_from_a_client_hello() {
        assert_eq!(
            client_hello_sni(&hello("HttpBin.org")),
            Some("httpbin.org".into())
        );
        let h = hello("api.example.com");
        assert_eq!(client_hello_sni(&h[..h.len() - 3]), None, "truncated");
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST /x"), Some(Protocol::Http1));
        assert_eq!(classify(b"GE"), None, "could still be GET");
        assert_eq!(classify(b"GETX"), Some(Protocol::Opaque));
        assert_eq!(
            classify(b"get / HTTP/1.1"),
            Some(Protocol::Opaque),
            "methods are case-sensitive"
        );
        assert_eq!(classify(b"connect\n"), Some(Protocol::Opaque));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), Some(Protocol::Tls));
        assert_eq!(classify(&[0x16]), None);
        assert_eq!(classify(b"\x00\x01binary"), Some(Protocol::Opaque));
    }

    /// CPU time of the calling thread.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the valid timespec we pass.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn clients_that_trickle_bytes_cost_no_cpu_while_they_wait() {
        use tokio::io::AsyncWriteExt as _;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut clients = Vec::new();
            let mut sniffs = Vec::new();
            for i in 0..200 {
                let mut c = TcpStream::connect(addr).await.unwrap();
                // Half the clients stop after one byte of a request, half after one byte
                // of a TLS record: neither says enough to classify.
                c.write_all(if i % 2 == 0 { b"G" } else { b"\x16" })
                    .await
                    .unwrap();
                let (server, _) = listener.accept().await.unwrap();
                clients.push(c);
                sniffs.push(tokio::spawn(async move {
                    let p = detect_declared(&server, Declared::Http).await;
                    (p, server)
                }));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let before = thread_cpu();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let spent = thread_cpu() - before;
            // A 1 ms poll per connection would be 100,000 wakeups here.
            assert!(
                spent < Duration::from_millis(25),
                "{spent:?} of CPU while 200 clients waited"
            );
            for (i, c) in clients.iter_mut().enumerate() {
                let rest: &[u8] = if i % 2 == 0 {
                    b"ET / HTTP/1.1\r\n"
                } else {
                    &[3, 1, 0, 4]
                };
                c.write_all(rest).await.unwrap();
            }
            for (i, s) in sniffs.into_iter().enumerate() {
                let (p, _server) = s.await.unwrap();
                let want = if i % 2 == 0 {
                    Protocol::Http1
                } else {
                    Protocol::Tls
                };
                assert_eq!(p, want, "client {i}");
            }
        });
    }

    #[test]
    fn a_client_that_says_a_little_and_closes_is_not_waited_on() {
        use tokio::io::AsyncWriteExt as _;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut c = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            c.write_all(b"PO").await.unwrap();
            c.shutdown().await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            // A declared HTTP port waits up to an hour for a request; this one is over.
            let p = tokio::time::timeout(
                Duration::from_secs(2),
                detect_declared(&server, Declared::Http),
            )
            .await
            .expect("not waited on until the deadline");
            assert_eq!(p, Protocol::Opaque);
        });
    }
}
