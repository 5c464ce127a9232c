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
    let mut buf = [0u8; 32];
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, async {
            loop {
                // Wait for more bytes than last time (peek returns what is buffered).
                let _ = stream.readable().await;
                match stream.peek(&mut buf).await {
                    Ok(n) if n > seen || n == 0 => return Some(n),
                    Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    Err(_) => return None,
                }
            }
        })
        .await;
        let n = match peeked {
            Ok(Some(n)) if n > 0 => n,
            // Closed, error or timeout: nothing to parse.
            _ => return Protocol::Opaque,
        };
        seen = n;
        if let Some(p) = classify(&buf[..n]) {
            return p;
        }
        if n == buf.len() {
            return Protocol::Opaque;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
