//! Client side of the end-to-end tests, run inside a pod's netns and cgroup. Prints one JSON
//! object per run, so tests assert on what the app itself observed.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use proxy_tests::fill;
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One connection: send a line, read the identity reply.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Keep trying until a connect succeeds or this much time passed.
        #[arg(long, default_value_t = 0)]
        retry_for_ms: u64,
        /// SO_MARK on the socket first (needs CAP_NET_RAW, which runtimes grant).
        #[arg(long)]
        mark: Option<u32>,
    },
    /// Many concurrent connections, spread over targets; each checks it reached its own.
    Probe {
        #[arg(long, required = true, num_args = 1..)]
        to: Vec<SocketAddr>,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        concurrency: usize,
    },
    /// Sequential connect + one exchange, N times: latency percentiles and rate.
    Latency {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Open N connections and keep them all open for a while.
    /// Send `--send` (with `\r\n` escapes) and read until the peer closes or `--wait-ms`
    /// passes: the first line read, bytes read, and when the peer closed.
    Raw {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        send: String,
        #[arg(long, default_value_t = 5000)]
        wait_ms: u64,
        /// Shut the write side after sending (a half-close).
        #[arg(long)]
        half_close: bool,
    },
    /// Slowloris: open `--count` connections, send a request line and one header, then one
    /// more header line on each every `--every-ms`, never finishing the head, for `--ms`.
    /// Prints once all are opened (`{"opened", "failed"}`), then at the end how many the
    /// far side had closed (or reset) and how many were still open.
    Slowloris {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 5000)]
        every_ms: u64,
        #[arg(long)]
        ms: u64,
    },
    /// Open `--count` connections that send nothing (a TLS client that never says hello)
    /// and hold them `--ms`; prints how many the far side reset or closed meanwhile.
    Stall {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        ms: u64,
    },
    /// Listen on `--addr` (an app taking a port) and hold it for `--ms`; prints the result
    /// of the bind at once.
    Bind {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 0)]
        ms: u64,
    },
    HoldMany {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        ms: u64,
    },
    /// Connect over and over for a while; count how each attempt went
    /// (captured = via the pod-local listener, direct, or the error).
    Watch {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        ms: u64,
    },
    /// Sequential connections; counts which server answered (first word of its reply).
    Spread {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// HTTP/1.1 requests over one keep-alive connection; tallies statuses and servers.
    Http {
        /// Where to connect (the address the app dials).
        #[arg(long)]
        to: SocketAddr,
        /// Host header.
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "/")]
        path: String,
        /// Extra header, `Name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Send an Upgrade request and echo this text through the upgraded connection.
        #[arg(long)]
        upgrade_echo: Option<String>,
        /// Run this many clients at once, each on its own connection (counts add up).
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// POST a body of this many bytes instead of a GET.
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
        /// Pace requests at this many per second (0: back to back); latency is measured
        /// from each request's own start, so a slow response shows as latency, not rate.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
    },
    /// Server-first: connect, read the banner without sending, then say one line.
    Banner {
        #[arg(long)]
        to: SocketAddr,
    },
    /// Send a real TLS ClientHello (made by rustls) with this SNI, read the server's line.
    TlsHello {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "")]
        sni: String,
        /// A server name of any bytes (hex), which no TLS library would send: rustls's
        /// hello for a placeholder of the same length, with these bytes put in its place.
        #[arg(long)]
        sni_hex: Option<String>,
    },
    /// HBONE as a mesh peer speaks it: TLS 1.3 + ALPN h2 to `--to` (a pod's 15008), with the
    /// client certificate `--cert`/`--key` if given, then one HTTP/2 CONNECT for
    /// `--authority`; on 200, sends `--send` and a newline and reads one line back.
    Hbone {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        authority: String,
        #[arg(long)]
        cert: Option<std::path::PathBuf>,
        #[arg(long)]
        key: Option<std::path::PathBuf>,
        #[arg(long, default_value = "hbone")]
        send: String,
        /// Repeat this many times, each a new connection (TLS handshake, HTTP/2, CONNECT,
        /// one exchange); reports the p50 and p99 of each whole.
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// One connection to each of `--count` ports of `--to` from `--from` on: send a line,
    /// read until the peer closes. Tallies how each went.
    Ports {
        #[arg(long)]
        to: std::net::Ipv4Addr,
        #[arg(long)]
        from: u16,
        #[arg(long)]
        count: u16,
    },
    /// HTTP/2 prior knowledge (h2c): N requests multiplexed on one connection.
    H2 {
        #[arg(long)]
        to: SocketAddr,
        /// :authority of the requests.
        #[arg(long)]
        authority: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Extra header, `Name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
    },
    /// Write `--bytes` as fast as the connection takes them, without reading; stop once
    /// one write has waited `--ms` (the path pushed back). Reports what was written.
    Flood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        ms: u64,
    },
    /// Connect and keep the connection open (idle) for a while.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        ms: u64,
    },
    /// A tiny app server (runs until killed): every HTTP/1.1 request it receives makes one
    /// onward GET to `--onward` with Host `--onward-host`, carrying the same x-request-id
    /// (what a traced microservice does); it answers JSON with what the onward call got.
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
        #[arg(long)]
        onward: SocketAddr,
        #[arg(long)]
        onward_host: String,
    },
    /// The app's own HTTPS: a full TLS handshake (trusting `--ca`) with SNI `--sni`, one
    /// GET, the JSON answer.
    Https {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        sni: String,
        #[arg(long)]
        ca: std::path::PathBuf,
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// Send N pseudo-random bytes, half-close, read everything back; report hashes.
    Xfer {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Read again when a blocking read says EAGAIN (counted as `spurious_eagain`):
        /// Linux's recvmsg for a socket in a sockmap returns it after a wake-up that
        /// brought no data, e.g. the same socket's send buffer freeing up.
        #[arg(long)]
        retry_eagain: bool,
    },
    /// A client under steady load for `--ms`, as real ones behave: HTTP/1.1 at `--rate`
    /// requests a second over a kept-alive connection (or one per request with
    /// `--new-connections`), honouring `Connection: close`, and sending a request again
    /// once if a reused connection closed before any byte of its answer (what Go, curl and
    /// browsers do). Every request must get a 200 from the server; tallies failures and
    /// the slowest answer.
    Load {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long)]
        ms: u64,
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long)]
        new_connections: bool,
    },
    /// Keep-alive GETs at a fixed total `--rate` over `--conns` connections (one thread
    /// each) for `--ms`; latency counted from each request's scheduled send time, so a
    /// stall is charged to every request it delays (no coordinated omission, as wrk2).
    Rate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long)]
        ms: u64,
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 4)]
        conns: u32,
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// Opaque TCP streams one after another for `--ms`: each sends `--bytes` (seeded by
    /// its index), half-closes, reads the server's whole stream and checks its SHA-256
    /// against `--expect-sha256`. Prints the SHA-256 of every stream sent.
    Streams {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        expect_sha256: String,
        #[arg(long)]
        ms: u64,
    },
}

/// One HTTP/1.1 GET on `conn` (opened if None). Ok(status) or why not; `fresh` says the
/// connection was opened for this request; the connection is kept unless the answer
/// says close.
fn load_request(
    conn: &mut Option<(TcpStream, BufReader<TcpStream>)>,
    to: SocketAddr,
    host: &str,
    path: &str,
    keep_alive: bool,
) -> Result<(u16, Option<String>), (bool, String)> {
    let fresh = conn.is_none();
    if conn.is_none() {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| (true, format!("connect: {e}")))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let r = BufReader::new(s.try_clone().map_err(|e| (true, e.to_string()))?);
        *conn = Some((s, r));
    }
    let Some((w, r)) = conn.as_mut() else {
        return Err((true, "no connection".into()));
    };
    let close = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{close}\r\n");
    if let Err(e) = w.write_all(req.as_bytes()) {
        *conn = None;
        return Err((fresh, format!("write: {e}")));
    }
    // Whether the answer started: a close before its first byte may be retried.
    match r.fill_buf() {
        Ok(b) if !b.is_empty() => {}
        Ok(_) => {
            *conn = None;
            return Err((fresh, "closed before any answer (FIN)".into()));
        }
        Err(e) => {
            *conn = None;
            return Err((fresh, format!("closed before any answer ({e})")));
        }
    }
    match read_response(r) {
        Ok((status, headers, _)) => {
            let closing = headers
                .iter()
                .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
            if closing || !keep_alive {
                *conn = None;
            }
            let server = headers
                .iter()
                .find(|(k, _)| k == "x-served-by")
                .map(|(_, v)| v.clone());
            Ok((status, server))
        }
        Err(e) => {
            *conn = None;
            // Part of an answer came: never sent again (it may have had an effect).
            Err((true, format!("answer: {e}")))
        }
    }
}

fn load(
    to: SocketAddr,
    host: &str,
    ms: u64,
    rate: f64,
    new_connections: bool,
) -> serde_json::Value {
    let started = Instant::now();
    let mut conn = None;
    let mut statuses = std::collections::BTreeMap::<String, u64>::new();
    let mut servers = std::collections::BTreeMap::<String, u64>::new();
    let mut errors = Vec::new();
    // When each answer other than 200 came (ms since the start, status): the first 1,000.
    let mut not_ok: Vec<(u128, u16)> = Vec::new();
    let (mut retries, mut connections) = (0u64, 0u64);
    let mut latencies: Vec<f64> = Vec::new();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_millis(ms) {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        i += 1;
        let t = Instant::now();
        let mut result = {
            connections += u64::from(conn.is_none());
            load_request(&mut conn, to, host, "/", !new_connections)
        };
        if let Err((false, _)) = &result {
            // A reused connection the server closed before answering: once more on a new one.
            retries += 1;
            connections += 1;
            result = load_request(&mut conn, to, host, "/", !new_connections);
        }
        latencies.push(t.elapsed().as_secs_f64() * 1e6);
        match result {
            Ok((status, server)) => {
                *statuses.entry(status.to_string()).or_default() += 1;
                if status != 200 && not_ok.len() < 1000 {
                    not_ok.push((started.elapsed().as_millis(), status));
                }
                if let Some(server) = server {
                    *servers.entry(server).or_default() += 1;
                }
            }
            // The wall clock too, to find the moment in the daemons' logs.
            Err((_, e)) => errors.push(format!(
                "request {i} at {} ms ({}): {e}",
                started.elapsed().as_millis(),
                humantime_utc()
            )),
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    json!({"requests": i, "statuses": statuses, "servers": servers, "not_ok": not_ok,
        "errors": errors, "retries": retries,
        "connections": connections, "p50_us": pct(0.5), "p99_us": pct(0.99),
        "max_us": latencies.last().copied().unwrap_or(0.0)})
}

fn rate(
    to: SocketAddr,
    host: &str,
    path: &str,
    ms: u64,
    rate: f64,
    conns: u32,
) -> serde_json::Value {
    let conns = conns.max(1);
    let per_conn = rate / f64::from(conns);
    let started = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|c| {
            let (host, path) = (host.to_string(), path.to_string());
            std::thread::spawn(move || {
                // Spread the connections' schedules evenly over one period.
                let offset = f64::from(c) / (per_conn * f64::from(conns));
                let mut conn = None;
                let (mut lat, mut failed) = (Vec::new(), 0u64);
                let mut i = 0u64;
                loop {
                    let due = started + Duration::from_secs_f64(offset + i as f64 / per_conn);
                    if due.duration_since(started) >= Duration::from_millis(ms) {
                        break;
                    }
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    i += 1;
                    match load_request(&mut conn, to, &host, &path, true) {
                        Ok((200, _)) => lat.push(due.elapsed().as_secs_f64() * 1e6),
                        _ => {
                            failed += 1;
                            conn = None;
                        }
                    }
                }
                (lat, failed)
            })
        })
        .collect();
    let (mut latencies, mut failed) = (Vec::new(), 0u64);
    for w in workers {
        if let Ok((l, f)) = w.join() {
            latencies.extend(l);
            failed += f;
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    json!({"ok": latencies.len(), "failed": failed,
        "per_sec": latencies.len() as f64 / started.elapsed().as_secs_f64(),
        "p50_us": pct(0.5), "p99_us": pct(0.99), "max_us": latencies.last().copied().unwrap_or(0.0)})
}

fn streams(to: SocketAddr, bytes: u64, expect: &str, ms: u64) -> serde_json::Value {
    let started = Instant::now();
    let (mut ok, mut bad) = (0u64, Vec::new());
    let mut sent = Vec::new();
    let mut seed = 1000u64;
    while started.elapsed() < Duration::from_millis(ms) {
        seed += 1;
        let run = || -> std::io::Result<(String, String)> {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut reader = s.try_clone()?;
            let recv = std::thread::spawn(move || -> std::io::Result<String> {
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match reader.read(&mut buf)? {
                        0 => return Ok(hex::encode(h.finalize())),
                        n => h.update(&buf[..n]),
                    }
                }
            });
            let mut w = s;
            let mut h = Sha256::new();
            let mut state = seed;
            let mut left = bytes;
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                fill(&mut state, &mut buf[..n]);
                w.write_all(&buf[..n])?;
                h.update(&buf[..n]);
                left -= n as u64;
            }
            w.shutdown(Shutdown::Write)?;
            let got = recv
                .join()
                .map_err(|_| std::io::Error::other("receiver panicked"))??;
            Ok((hex::encode(h.finalize()), got))
        };
        match run() {
            Ok((mine, got)) if got == expect => {
                ok += 1;
                sent.push(mine);
            }
            Ok((_, got)) => bad.push(format!("stream {seed}: received {got}")),
            Err(e) => bad.push(format!(
                "stream {seed} at {} ms: {e}",
                started.elapsed().as_millis()
            )),
        }
    }
    json!({"ok": ok, "bad": bad, "sent": sent})
}

fn classify(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => "eperm",
        Some(libc::ECONNREFUSED) => "refused",
        Some(libc::ECONNRESET) => "reset",
        Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) => "timeout",
        _ if e.kind() == std::io::ErrorKind::TimedOut
            || e.kind() == std::io::ErrorKind::WouldBlock =>
        {
            "timeout"
        }
        _ if e.kind() == std::io::ErrorKind::UnexpectedEof => "eof",
        _ => "error",
    }
}

/// Connects, sends `id`, and returns (reply line, local addr, peer addr as the app sees it).
fn exchange(
    to: SocketAddr,
    id: &str,
    timeout: Duration,
) -> std::io::Result<(String, SocketAddr, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let local = s.local_addr()?;
    let peer = s.peer_addr()?;
    s.write_all(format!("{id}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "no reply",
        ));
    }
    Ok((line.trim_end().to_string(), local, peer))
}

/// [`exchange`] over a socket carrying `mark` (SO_MARK) from before its connect.
fn marked_exchange(
    to: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> std::io::Result<(String, SocketAddr, SocketAddr)> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
    socket.connect_timeout(&to.into(), timeout)?;
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(timeout))?;
    let (local, peer) = (s.local_addr()?, s.peer_addr()?);
    (&s).write_all(b"marked\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok((line.trim_end().to_string(), local, peer))
}

/// Status, headers (lower-case names) and body of a response.
type HttpResponse = (u16, Vec<(String, String)>, String);

/// Reads one HTTP/1.1 response (Content-Length bodies; "Connection: close" reads to EOF).
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<HttpResponse> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    if status == 101 {
        return Ok((status, headers, String::new()));
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = Vec::new();
    match len {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

#[allow(clippy::too_many_arguments)]
fn http_run(
    to: SocketAddr,
    host: &str,
    path: &str,
    extra: &[String],
    count: usize,
    upgrade_echo: Option<String>,
    body_bytes: usize,
    rate: f64,
) -> serde_json::Value {
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::<String, u64>::new();
    let mut servers = std::collections::BTreeMap::<String, u64>::new();
    let mut first: Option<serde_json::Value> = None;
    let mut errors = Vec::new();
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut latencies_us: Vec<f64> = Vec::with_capacity(count);
    let mut peer_ports = std::collections::BTreeSet::new();
    // Which server answered, request by request (the first 1,000): what a balancer's
    // order shows that tallies cannot (round robin alternates; random repeats).
    let mut order: Vec<String> = Vec::new();
    for i in 0..count {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let t = Instant::now();
        if conn.is_none() {
            match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let r = BufReader::new(s.try_clone().expect("clone"));
                    conn = Some((s, r));
                }
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            }
        }
        let Some((w, r)) = conn.as_mut() else {
            continue;
        };
        let method = if body_bytes > 0 { "POST" } else { "GET" };
        // "{i}" in the Host becomes the request's index (distinct hosts per request).
        let host_i = host.replace("{i}", &i.to_string());
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host_i}\r\n");
        if body_bytes > 0 {
            req.push_str(&format!("Content-Length: {body_bytes}\r\n"));
        }
        for h in extra {
            req.push_str(h);
            req.push_str("\r\n");
        }
        if upgrade_echo.is_some() {
            // A WebSocket handshake (RFC 6455); the echo server answers 101 and echoes.
            req.push_str("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend(std::iter::repeat_n(b'b', body_bytes));
        if let Err(e) = w.write_all(&bytes) {
            errors.push(e.to_string());
            conn = None;
            continue;
        }
        match read_response(r) {
            Ok((status, headers, body)) => {
                latencies_us.push(t.elapsed().as_secs_f64() * 1e6);
                *statuses.entry(status.to_string()).or_default() += 1;
                if let Some((_, name)) = headers.iter().find(|(k, _)| k == "x-served-by") {
                    *servers.entry(name.clone()).or_default() += 1;
                    if order.len() < 1000 {
                        order.push(name.clone());
                    }
                }
                if let (101, Some(text)) = (status, &upgrade_echo) {
                    let _ = w.write_all(text.as_bytes());
                    let mut echoed = vec![0u8; text.len()];
                    let got = r
                        .read_exact(&mut echoed)
                        .map(|_| String::from_utf8_lossy(&echoed).into_owned());
                    first = Some(
                        json!({"status": 101, "echo": got.unwrap_or_else(|e| format!("error: {e}"))}),
                    );
                    break;
                }
                let parsed: serde_json::Value = serde_json::from_str(&body).unwrap_or(json!(body));
                if let Some(p) = parsed["peer_port"].as_u64() {
                    peer_ports.insert(p);
                }
                if first.is_none() {
                    let hdrs: std::collections::BTreeMap<_, _> = headers.into_iter().collect();
                    first = Some(json!({"status": status, "body": parsed, "headers": hdrs}));
                }
                if status >= 500 && body.is_empty() {
                    conn = None;
                }
            }
            Err(e) => {
                errors.push(e.to_string());
                conn = None;
            }
        }
    }
    latencies_us.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies_us
            .get(((latencies_us.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let secs = started.elapsed().as_secs_f64();
    json!({"statuses": statuses, "servers": servers, "first": first, "errors": errors,
        "order": order,
        "elapsed_ms": secs * 1e3, "per_sec": latencies_us.len() as f64 / secs,
        "upstream_connections": peer_ports.len(),
        "p50_us": pct(0.5), "p99_us": pct(0.99)})
}

/// The first flight of a real TLS client: rustls's ClientHello for `sni`.
fn client_hello(sni: &str) -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("server name");
    let mut conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("client hello");
    out
}

/// rustls's ClientHello for a placeholder name as long as `name`, with `name`'s bytes in
/// the placeholder's place (the name is sent verbatim in the server_name extension).
fn client_hello_with_name(name: &[u8]) -> Vec<u8> {
    assert!((5..=63).contains(&name.len()), "4 < name length <= 63");
    let placeholder = format!("{}.io", "q".repeat(name.len() - 3));
    let mut hello = client_hello(&placeholder);
    let at = hello
        .windows(name.len())
        .position(|w| w == placeholder.as_bytes())
        .expect("placeholder in the hello");
    hello[at..at + name.len()].copy_from_slice(name);
    hello
}

fn tls_hello_raw(to: SocketAddr, name: &[u8]) -> serde_json::Value {
    let hello = client_hello_with_name(name);
    let run = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&hello)?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        Ok(line.trim_end().to_string())
    };
    match run() {
        Ok(reply) => json!({"result": "ok", "reply": reply}),
        Err(e) => json!({"result": classify(&e), "error": e.to_string()}),
    }
}

fn tls_hello(to: SocketAddr, sni: &str) -> serde_json::Value {
    let hello = client_hello(sni);
    let run = || -> std::io::Result<(String, String)> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let local = s.local_addr()?.to_string();
        s.write_all(&hello)?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        Ok((line.trim_end().to_string(), local))
    };
    match run() {
        Ok((reply, local)) => json!({"result": "ok", "reply": reply, "local": local,
            "hello_sha256": hex::encode(Sha256::digest(&hello))}),
        Err(e) => json!({"result": classify(&e), "error": e.to_string()}),
    }
}

fn h2_run(
    to: SocketAddr,
    authority: &str,
    path: &str,
    count: usize,
    extra: &[String],
) -> serde_json::Value {
    use http_body_util::{BodyExt as _, Empty};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let stream = match tokio::net::TcpStream::connect(to).await {
            Ok(s) => s,
            Err(e) => return json!({"result": classify(&e), "error": e.to_string()}),
        };
        let (mut sender, conn) = match hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        {
            Ok(x) => x,
            Err(e) => return json!({"result": "error", "error": e.to_string()}),
        };
        tokio::spawn(conn);
        let mut servers = std::collections::BTreeMap::<String, u64>::new();
        let mut statuses = std::collections::BTreeMap::<String, u64>::new();
        let mut first = serde_json::Value::Null;
        for i in 0..count {
            let mut req = hyper::Request::builder().uri(format!("http://{authority}{path}"));
            for h in extra {
                if let Some((k, v)) = h.split_once(':') {
                    // "{i}" in a value becomes the request's index (distinct request ids).
                    req = req.header(k.trim(), v.trim().replace("{i}", &i.to_string()));
                }
            }
            let req = req.body(Empty::<bytes::Bytes>::new()).expect("request");
            match sender.send_request(req).await {
                Ok(resp) => {
                    *statuses
                        .entry(resp.status().as_u16().to_string())
                        .or_default() += 1;
                    if let Some(s) = resp
                        .headers()
                        .get("x-served-by")
                        .and_then(|v| v.to_str().ok())
                    {
                        *servers.entry(s.to_string()).or_default() += 1;
                    }
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    if first.is_null() {
                        first = serde_json::from_slice(&body)
                            .unwrap_or(json!(String::from_utf8_lossy(&body)));
                    }
                }
                Err(e) => *statuses.entry(format!("error: {e}")).or_default() += 1,
            }
        }
        json!({"result": "ok", "statuses": statuses, "servers": servers, "first": first})
    })
}

/// Accepts any server certificate: the HBONE client here tests the server's checks.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn hbone_connect(
    to: SocketAddr,
    authority: &str,
    identity: Option<(&std::path::Path, &std::path::Path)>,
    send: &str,
) -> serde_json::Value {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match identity {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .expect("cert file")
                .collect::<Result<_, _>>()
                .expect("certs");
            let key = PrivateKeyDer::from_pem_file(key).expect("key file");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let tcp = match tokio::net::TcpStream::connect(to).await {
            Ok(s) => s,
            Err(e) => return json!({"result": classify(&e), "error": e.to_string()}),
        };
        let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into());
        let tls = match tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
        {
            Ok(t) => t,
            Err(e) => return json!({"result": "tls_error", "error": e.to_string()}),
        };
        let (mut sender, conn) = match hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        {
            // With TLS 1.3 a refused client certificate shows here, at the first read.
            Ok(x) => x,
            Err(e) => return json!({"result": "tls_error", "error": e.to_string()}),
        };
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .version(hyper::Version::HTTP_2)
            .uri(authority)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => return json!({"result": "tls_error", "error": e.to_string()}),
        };
        let status = resp.status().as_u16();
        if status != 200 {
            return json!({"result": "status", "status": status});
        }
        let mut io = match hyper::upgrade::on(resp).await {
            Ok(u) => hyper_util::rt::TokioIo::new(u),
            Err(e) => return json!({"result": "error", "error": e.to_string()}),
        };
        if io.write_all(format!("{send}\n").as_bytes()).await.is_err() {
            return json!({"result": "error", "error": "write"});
        }
        let mut line = String::new();
        let _ = tokio::io::BufReader::new(&mut io)
            .read_line(&mut line)
            .await;
        json!({"result": "ok", "status": 200, "reply": line.trim_end()})
    })
}

fn https_get(to: SocketAddr, sni: &str, ca: &std::path::Path, path: &str) -> serde_json::Value {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let run = || -> Result<HttpResponse, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
            roots
                .add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
        let conn =
            rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
        let sock =
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        // A peer that closes without close_notify still gave us the whole response.
        let _ = tls.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no response")?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, Vec::new(), body.to_string()))
    };
    match run() {
        Ok((status, _, body)) => json!({"result": "ok", "status": status,
            "body": serde_json::from_str::<serde_json::Value>(&body).unwrap_or(json!(body))}),
        Err(e) => json!({"result": "error", "error": e}),
    }
}

/// Reads one request head (request line, lower-case headers); None at EOF.
fn read_request_head(r: &mut impl BufRead) -> Option<(String, Vec<(String, String)>)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
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
    Some((line.trim_end().to_string(), headers))
}

/// The headers Istio's documentation tells applications to propagate.
const TRACE_HEADERS: [&str; 9] = [
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "x-envoy-force-trace",
];

fn serve(port: u16, name: &str, onward: SocketAddr, onward_host: &str) -> serde_json::Value {
    let listener = match std::net::TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => return json!({"result": classify(&e), "error": e.to_string()}),
    };
    for conn in listener.incoming().flatten() {
        let (name, onward_host) = (name.to_string(), onward_host.to_string());
        std::thread::spawn(move || {
            let Ok(mut w) = conn.try_clone() else { return };
            let mut r = BufReader::new(conn);
            while let Some((request_line, headers)) = read_request_head(&mut r) {
                let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                let len: usize = get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                let id = get("x-request-id").unwrap_or_default();
                // What Istio asks every app to do: pass the trace headers it received on
                // to the calls it makes for that request.
                let trace: Vec<(String, String)> = headers
                    .iter()
                    .filter(|(n, _)| TRACE_HEADERS.contains(&n.as_str()))
                    .cloned()
                    .collect();
                let forwarded: String =
                    trace.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
                let path = request_line.split_whitespace().nth(1).unwrap_or("/");
                let onward_result = (|| -> std::io::Result<HttpResponse> {
                    let s = TcpStream::connect_timeout(&onward, Duration::from_secs(5))?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let mut ow = s.try_clone()?;
                    ow.write_all(
                        format!(
                            "GET {path} HTTP/1.1\r\nHost: {onward_host}\r\nX-Request-Id: {id}\r\n{forwarded}Connection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )?;
                    read_response(&mut BufReader::new(s))
                })();
                let onward_json = match onward_result {
                    Ok((status, _, body)) => json!({"status": status,
                        "body": serde_json::from_str::<serde_json::Value>(&body).unwrap_or(json!(body))}),
                    Err(e) => json!({"error": e.to_string()}),
                };
                let trace: std::collections::BTreeMap<String, String> = trace.into_iter().collect();
                let out = json!({"server": name, "request_id": id, "host": get("host"),
                    "body_len": len, "trace_headers": trace, "onward": onward_json})
                .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Served-By: {name}\r\n\r\n{out}",
                    out.len()
                );
                if w.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
    json!({"result": "stopped"})
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let out = match cli.cmd {
        Cmd::Connect {
            to,
            timeout_ms,
            retry_for_ms: _,
            mark: Some(mark),
        } => match marked_exchange(to, mark, Duration::from_millis(timeout_ms)) {
            Ok((reply, local, peer)) => json!({"result": "ok", "reply": reply,
                "local": local.to_string(), "peer": peer.to_string()}),
            Err(e) => json!({"result": classify(&e), "error": e.to_string()}),
        },
        Cmd::Connect {
            to,
            timeout_ms,
            retry_for_ms,
            mark: None,
        } => {
            let started = Instant::now();
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                let attempt_started = Instant::now();
                match exchange(to, "connect", Duration::from_millis(timeout_ms)) {
                    Ok((reply, local, peer)) => {
                        break json!({"result": "ok", "reply": reply, "local": local.to_string(),
                            "peer": peer.to_string(), "attempts": attempts,
                            "elapsed_ms": started.elapsed().as_secs_f64() * 1e3});
                    }
                    Err(e) => {
                        if started.elapsed() >= Duration::from_millis(retry_for_ms) {
                            break json!({"result": classify(&e), "error": e.to_string(), "attempts": attempts,
                                "attempt_ms": attempt_started.elapsed().as_secs_f64() * 1e3,
                                "elapsed_ms": started.elapsed().as_secs_f64() * 1e3});
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        Cmd::Probe {
            to,
            count,
            concurrency,
        } => {
            let started = Instant::now();
            let next = Arc::new(Mutex::new(0usize));
            let results = Arc::new(Mutex::new((0usize, 0usize, Vec::<String>::new())));
            let barrier = Arc::new(std::sync::Barrier::new(concurrency));
            let threads: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (to, next, results, barrier) =
                        (to.clone(), next.clone(), results.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        // All threads connect at once: the connections really are concurrent.
                        barrier.wait();
                        loop {
                            let i = {
                                let mut n = next.lock().unwrap();
                                if *n >= count {
                                    return;
                                }
                                *n += 1;
                                *n - 1
                            };
                            let target = to[i % to.len()];
                            let id = format!("conn-{i}");
                            let r = exchange(target, &id, Duration::from_secs(10));
                            let mut res = results.lock().unwrap();
                            match r {
                                // The server answers "<its own local addr> <peer ip> <id>".
                                Ok((reply, _, _))
                                    if reply.starts_with(&format!("{target} "))
                                        && reply.ends_with(&id) =>
                                {
                                    res.0 += 1
                                }
                                Ok((reply, _, _)) => {
                                    res.1 += 1;
                                    if res.2.len() < 10 {
                                        res.2.push(format!("{id} to {target}: got {reply}"))
                                    }
                                }
                                Err(e) => {
                                    res.1 += 1;
                                    if res.2.len() < 10 {
                                        res.2.push(format!("{id} to {target}: {e}"))
                                    }
                                }
                            }
                        }
                    })
                })
                .collect();
            for t in threads {
                let _ = t.join();
            }
            let res = results.lock().unwrap();
            let secs = started.elapsed().as_secs_f64();
            json!({"ok": res.0, "failed": res.1, "errors": res.2, "elapsed_ms": secs * 1e3, "per_sec": res.0 as f64 / secs})
        }
        Cmd::Latency { to, count } => {
            let started = Instant::now();
            let mut samples = Vec::with_capacity(count);
            let mut failed = 0;
            for i in 0..count {
                let t = Instant::now();
                match exchange(to, &format!("lat-{i}"), Duration::from_secs(5)) {
                    Ok(_) => samples.push(t.elapsed().as_secs_f64() * 1e6),
                    Err(_) => failed += 1,
                }
            }
            let total = started.elapsed().as_secs_f64();
            samples.sort_by(f64::total_cmp);
            let pct = |p: f64| {
                samples
                    .get(((samples.len() as f64 - 1.0) * p) as usize)
                    .copied()
                    .unwrap_or(0.0)
            };
            json!({"ok": samples.len(), "failed": failed, "per_sec": samples.len() as f64 / total,
                "p50_us": pct(0.5), "p90_us": pct(0.9), "p99_us": pct(0.99)})
        }
        Cmd::Raw {
            to,
            send,
            wait_ms,
            half_close,
        } => {
            let started = Instant::now();
            let run = || -> std::io::Result<serde_json::Value> {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
                s.write_all(send.replace("\\r\\n", "\r\n").as_bytes())?;
                if half_close {
                    s.shutdown(Shutdown::Write)?;
                }
                s.set_read_timeout(Some(Duration::from_millis(wait_ms)))?;
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let mut reset = false;
                let closed = loop {
                    match s.read(&mut buf) {
                        Ok(0) => break Some(started.elapsed()),
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                            reset = true;
                            break Some(started.elapsed());
                        }
                        Err(_) => break None,
                    }
                };
                let text = String::from_utf8_lossy(&got);
                Ok(
                    json!({"result": "ok", "first_line": text.lines().next().unwrap_or(""),
                    "bytes": got.len(), "reset": reset,
                    "closed_after_ms": closed.map(|d| d.as_millis() as u64)}),
                )
            };
            match run() {
                Ok(v) => v,
                Err(e) => json!({"result": classify(&e), "error": e.to_string()}),
            }
        }
        Cmd::Stall { to, count, ms } => {
            raise_nofile();
            let started = Instant::now();
            let mut open = Vec::new();
            let mut failed = 0u64;
            for _ in 0..count {
                match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                    Ok(s) => {
                        let _ = s.set_read_timeout(Some(Duration::from_millis(5)));
                        open.push(s);
                    }
                    Err(_) => failed += 1,
                }
            }
            let mut ended = 0u64;
            let mut buf = [0u8; 64];
            while started.elapsed() < Duration::from_millis(ms) {
                std::thread::sleep(Duration::from_millis(100));
                open.retain_mut(|s| match s.read(&mut buf) {
                    Ok(0) => {
                        ended += 1;
                        false
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        true
                    }
                    Ok(_) => true,
                    Err(_) => {
                        ended += 1;
                        false
                    }
                });
            }
            json!({"connected": count as u64 - failed, "failed": failed, "ended_by_peer": ended,
                "still_open": open.len()})
        }
        Cmd::Slowloris {
            to,
            host,
            count,
            every_ms,
            ms,
        } => {
            raise_nofile();
            let started = Instant::now();
            let mut open = Vec::new();
            let mut failed = 0u64;
            for _ in 0..count {
                match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                    Ok(mut s) => {
                        let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\n");
                        if s.write_all(head.as_bytes()).is_ok() {
                            let _ = s.set_nonblocking(true);
                            open.push(s);
                        } else {
                            failed += 1;
                        }
                    }
                    Err(_) => failed += 1,
                }
            }
            println!(
                "{}",
                json!({"opened": open.len(), "failed": failed,
                    "open_ms": started.elapsed().as_millis() as u64})
            );
            let _ = std::io::stdout().flush();
            let mut closed = 0u64;
            let mut buf = [0u8; 512];
            let mut n = 0u64;
            while started.elapsed() < Duration::from_millis(ms) {
                std::thread::sleep(Duration::from_millis(every_ms.min(ms)));
                n += 1;
                open.retain_mut(|s| {
                    // A close or reset from the far side ends this one.
                    match s.read(&mut buf) {
                        Ok(0) => {
                            closed += 1;
                            return false;
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => {
                            closed += 1;
                            return false;
                        }
                    }
                    if s.write_all(format!("X-Slow-{n}: 1\r\n").as_bytes())
                        .is_err()
                    {
                        closed += 1;
                        return false;
                    }
                    true
                });
            }
            json!({"closed_by_peer": closed, "still_open": open.len(),
                "elapsed_ms": started.elapsed().as_millis() as u64})
        }
        Cmd::Bind { addr, ms } => {
            use std::io::Write as _;
            let held = std::net::TcpListener::bind(addr);
            let out = match &held {
                Ok(l) => {
                    json!({"result": "ok", "local": l.local_addr().map(|a| a.to_string()).unwrap_or_default()})
                }
                Err(e) => json!({"result": classify(e), "error": e.to_string()}),
            };
            println!("{out}");
            let _ = std::io::stdout().flush();
            if held.is_ok() {
                std::thread::sleep(Duration::from_millis(ms));
            }
            return;
        }
        Cmd::HoldMany { to, count, ms } => {
            raise_nofile();
            let mut held = Vec::new();
            let mut failed = 0;
            for _ in 0..count {
                match TcpStream::connect(to) {
                    Ok(s) => held.push(s),
                    Err(_) => failed += 1,
                }
            }
            // Tell the caller we are holding, then hold.
            println!("{}", json!({"holding": held.len(), "failed": failed}));
            std::thread::sleep(Duration::from_millis(ms));
            return;
        }
        Cmd::Watch { to, ms } => {
            let started = Instant::now();
            let mut counts = std::collections::BTreeMap::<String, u64>::new();
            // Runs of the same outcome, in order: what happened when.
            let mut runs: Vec<serde_json::Value> = Vec::new();
            let mut current: Option<(String, u128, u128, u64)> = None;
            while started.elapsed() < Duration::from_millis(ms) {
                let at = started.elapsed().as_millis();
                let kind = match exchange(to, "watch", Duration::from_secs(2)) {
                    Ok((_, local, _)) if local.ip().is_loopback() => "captured".to_string(),
                    Ok(_) => "direct".to_string(),
                    Err(e) => classify(&e).to_string(),
                };
                *counts.entry(kind.clone()).or_default() += 1;
                match &mut current {
                    Some((k, _, to_ms, n)) if *k == kind => {
                        *to_ms = at;
                        *n += 1;
                    }
                    _ => {
                        if let Some((k, from, to_ms, n)) = current.take() {
                            runs.push(
                                json!({"kind": k, "from_ms": from, "to_ms": to_ms, "count": n}),
                            );
                        }
                        current = Some((kind, at, at, 1));
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if let Some((k, from, to_ms, n)) = current.take() {
                runs.push(json!({"kind": k, "from_ms": from, "to_ms": to_ms, "count": n}));
            }
            let mut out = json!(counts);
            out["runs"] = json!(runs);
            out
        }
        Cmd::Spread { to, count } => {
            let mut servers = std::collections::BTreeMap::<String, u64>::new();
            let mut errors = std::collections::BTreeMap::<String, u64>::new();
            for i in 0..count {
                match exchange(to, &format!("spread-{i}"), Duration::from_secs(5)) {
                    Ok((reply, _, _)) => {
                        let server = reply.split_whitespace().next().unwrap_or("").to_string();
                        *servers.entry(server).or_default() += 1;
                    }
                    Err(e) => *errors.entry(classify(&e).to_string()).or_default() += 1,
                }
            }
            json!({"servers": servers, "errors": errors})
        }
        Cmd::Http {
            to,
            host,
            path,
            headers,
            count,
            upgrade_echo,
            parallel,
            body_bytes,
            rate,
        } if parallel > 1 => {
            let runs: Vec<serde_json::Value> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..parallel)
                    .map(|_| {
                        s.spawn(|| {
                            http_run(
                                to,
                                &host,
                                &path,
                                &headers,
                                count,
                                upgrade_echo.clone(),
                                body_bytes,
                                rate,
                            )
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("client thread"))
                    .collect()
            });
            let mut statuses = std::collections::BTreeMap::<String, u64>::new();
            let mut servers = std::collections::BTreeMap::<String, u64>::new();
            for r in &runs {
                for (k, v) in r["servers"].as_object().into_iter().flatten() {
                    *servers.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
                }
                for (k, v) in r["statuses"].as_object().into_iter().flatten() {
                    *statuses.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
                }
            }
            json!({"statuses": statuses, "servers": servers, "runs": runs})
        }
        Cmd::Http {
            to,
            host,
            path,
            headers,
            count,
            upgrade_echo,
            body_bytes,
            rate,
            ..
        } => http_run(
            to,
            &host,
            &path,
            &headers,
            count,
            upgrade_echo,
            body_bytes,
            rate,
        ),
        Cmd::Banner { to } => {
            let started = Instant::now();
            let run = || -> std::io::Result<(String, String, String)> {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let local = s.local_addr()?.to_string();
                let mut r = BufReader::new(s.try_clone()?);
                let mut banner = String::new();
                r.read_line(&mut banner)?;
                s.write_all(b"HELO pod\r\n")?;
                let mut reply = String::new();
                r.read_line(&mut reply)?;
                Ok((
                    banner.trim_end().to_string(),
                    reply.trim_end().to_string(),
                    local,
                ))
            };
            match run() {
                Ok((banner, reply, local)) => {
                    json!({"result": "ok", "banner": banner, "reply": reply, "local": local,
                    "elapsed_ms": started.elapsed().as_secs_f64() * 1e3})
                }
                Err(e) => json!({"result": classify(&e), "error": e.to_string()}),
            }
        }
        Cmd::TlsHello { to, sni, sni_hex } => match sni_hex {
            Some(hex_name) => {
                let name = hex::decode(hex_name).expect("--sni-hex: hex");
                tls_hello_raw(to, &name)
            }
            None => tls_hello(to, &sni),
        },
        Cmd::Hbone {
            to,
            authority,
            cert,
            key,
            send,
            count,
        } => {
            let identity = cert.as_deref().zip(key.as_deref());
            if count <= 1 {
                hbone_connect(to, &authority, identity, &send)
            } else {
                let mut samples = Vec::with_capacity(count);
                let mut last = serde_json::Value::Null;
                for _ in 0..count {
                    let t = Instant::now();
                    last = hbone_connect(to, &authority, identity, &send);
                    if last["result"] == "ok" {
                        samples.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
                samples.sort_by(f64::total_cmp);
                let pct = |p: f64| {
                    samples
                        .get(((samples.len() as f64 - 1.0) * p) as usize)
                        .copied()
                        .unwrap_or(0.0)
                };
                json!({"ok": samples.len(), "p50_us": pct(0.5), "p99_us": pct(0.99), "last": last})
            }
        }
        Cmd::Ports { to, from, count } => {
            let mut outcomes = std::collections::BTreeMap::<String, u64>::new();
            for port in from..from.saturating_add(count) {
                let addr = SocketAddr::from((to, port));
                let outcome = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(mut s) => {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let _ = s.write_all(b"hello\r\n");
                        let mut sink = Vec::new();
                        match s.read_to_end(&mut sink) {
                            Ok(_) => "closed".to_string(),
                            Err(e) => classify(&e).to_string(),
                        }
                    }
                    Err(e) => classify(&e).to_string(),
                };
                *outcomes.entry(outcome).or_default() += 1;
            }
            json!({"outcomes": outcomes})
        }
        Cmd::H2 {
            to,
            authority,
            path,
            count,
            headers,
        } => h2_run(to, &authority, &path, count, &headers),
        Cmd::Flood { to, bytes, ms } => match TcpStream::connect(to) {
            Ok(mut s) => {
                let _ = s.set_write_timeout(Some(Duration::from_millis(ms)));
                let buf = vec![0x5au8; 64 * 1024];
                let mut written = 0u64;
                let mut outcome = json!({"result": "ok", "blocked": false});
                while written < bytes {
                    match s.write(&buf) {
                        Ok(n) => written += n as u64,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            outcome["blocked"] = true.into();
                            break;
                        }
                        Err(e) => {
                            outcome = json!({"result": classify(&e), "error": e.to_string()});
                            break;
                        }
                    }
                }
                outcome["written"] = written.into();
                outcome
            }
            Err(e) => json!({"result": classify(&e), "error": e.to_string()}),
        },
        Cmd::Hold { to, ms } => match TcpStream::connect(to) {
            Ok(s) => {
                let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                std::thread::sleep(Duration::from_millis(ms));
                json!({"result": "ok", "local": local})
            }
            Err(e) => json!({"result": classify(&e), "error": e.to_string()}),
        },
        Cmd::Https { to, sni, ca, path } => https_get(to, &sni, &ca, &path),
        Cmd::Serve {
            port,
            name,
            onward,
            onward_host,
        } => serve(port, &name, onward, &onward_host),
        Cmd::Load {
            to,
            host,
            ms,
            rate,
            new_connections,
        } => load(to, &host, ms, rate, new_connections),
        Cmd::Rate {
            to,
            host,
            ms,
            rate: r,
            conns,
            path,
        } => rate(to, &host, &path, ms, r, conns),
        Cmd::Streams {
            to,
            bytes,
            expect_sha256,
            ms,
        } => streams(to, bytes, &expect_sha256, ms),
        Cmd::Xfer {
            to,
            bytes,
            seed,
            retry_eagain,
        } => {
            let spurious = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let spurious_seen = spurious.clone();
            let started = Instant::now();
            match TcpStream::connect(to) {
                Err(e) => json!({"result": classify(&e), "error": e.to_string()}),
                Ok(s) => {
                    let mut reader = s.try_clone().expect("clone socket");
                    let recv = std::thread::spawn(move || {
                        let mut h = Sha256::new();
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut total = 0u64;
                        loop {
                            match reader.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    h.update(&buf[..n]);
                                    total += n as u64;
                                }
                                Err(e)
                                    if retry_eagain
                                        && e.kind() == std::io::ErrorKind::WouldBlock =>
                                {
                                    spurious_seen
                                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                                Err(e) => return Err(e.to_string()),
                            }
                        }
                        Ok((hex::encode(h.finalize()), total))
                    });
                    let mut w = s;
                    let mut h = Sha256::new();
                    let mut state = seed;
                    let mut left = bytes;
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut send_err = None;
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        fill(&mut state, &mut buf[..n]);
                        if let Err(e) = w.write_all(&buf[..n]) {
                            send_err = Some(e.to_string());
                            break;
                        }
                        h.update(&buf[..n]);
                        left -= n as u64;
                    }
                    // Half-close: we are done sending but keep reading the reply stream.
                    let _ = w.shutdown(Shutdown::Write);
                    let received = recv.join().expect("receiver thread");
                    match (send_err, received) {
                        (None, Ok((rh, rn))) => {
                            json!({"result": "ok", "sent_sha256": hex::encode(h.finalize()),
                            "sent_bytes": bytes, "received_sha256": rh, "received_bytes": rn,
                            "elapsed_ms": started.elapsed().as_secs_f64() * 1e3,
                            "spurious_eagain": spurious.load(std::sync::atomic::Ordering::Relaxed)})
                        }
                        (s, r) => {
                            json!({"result": "error", "send_error": s, "receive": format!("{r:?}")})
                        }
                    }
                }
            }
        }
    };
    println!("{out}");
}

/// Now as `HH:MM:SS.ffffff` UTC, as the daemon's log lines show time.
fn humantime_utc() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_micros()
    )
}
