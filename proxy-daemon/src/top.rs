//! `proxy-daemon top`: a live terminal view of the busiest source → destination pairs,
//! like `kubectl top` for traffic. It reads only the node's metrics endpoint (the same
//! numbers Prometheus gets) and refreshes every interval: req/s and success % from the
//! counter deltas, p50/p99 from the duration histogram's bucket deltas.
use std::{
    collections::HashMap,
    io::Write,
    net::SocketAddr,
    process::ExitCode,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Empty};

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("fetching {0}: {1}")]
    Fetch(SocketAddr, String),
    #[error("{0} answered {1}")]
    Status(SocketAddr, String),
}

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, k: &str) -> &str {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }
}

/// Parses Prometheus text (comments skipped, quoted values with `\"`, `\\`, `\n`).
// Hand-written on purpose: prometheus-parse 0.2 splits label sets on ',' and '=' without
// honouring quotes or escapes, so a label value holding either (a path, a header-derived
// service name) would be mangled; this parser is tested on exactly those.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let mut labels = Vec::new();
        let mut rest = rest;
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let mut end = None;
            loop {
                // key
                let start = match chars.peek() {
                    Some((_, '}')) => {
                        end = chars.next().map(|(i, _)| i + 1);
                        break;
                    }
                    Some((i, _)) => *i,
                    None => break,
                };
                let mut key_end = start;
                for (i, c) in chars.by_ref() {
                    if c == '=' {
                        key_end = i;
                        break;
                    }
                }
                let key = body[start..key_end].trim_start_matches(',').to_string();
                if chars.next().map(|(_, c)| c) != Some('"') {
                    break;
                }
                let mut value = String::new();
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(o) => value.push(o),
                            None => break,
                        },
                        '"' => break,
                        o => value.push(o),
                    }
                }
                labels.push((key, value));
                if let Some((_, ',')) = chars.peek() {
                    chars.next();
                }
            }
            let Some(end) = end else { continue };
            rest = &body[end..];
        }
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// Traffic between one source workload and one destination service.
#[derive(Debug, Clone, Default, PartialEq)]
struct PairTotals {
    requests: f64,
    errors: f64,
    /// Cumulative duration bucket counts by upper bound (ms).
    buckets: Vec<(f64, f64)>,
}

type Pair = (String, String);

fn totals(samples: &[Sample]) -> HashMap<Pair, PairTotals> {
    let mut out: HashMap<Pair, PairTotals> = HashMap::new();
    let key = |s: &Sample| {
        (
            format!(
                "{}.{}",
                s.label("source_workload"),
                s.label("source_workload_namespace")
            ),
            s.label("destination_service").to_string(),
        )
    };
    for s in samples {
        match s.name.as_str() {
            "istio_requests_total" => {
                let t = out.entry(key(s)).or_default();
                t.requests += s.value;
                if s.label("response_code").starts_with('5') || s.label("response_code") == "0" {
                    t.errors += s.value;
                }
            }
            "istio_request_duration_milliseconds_bucket" => {
                let le = match s.label("le") {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or(f64::INFINITY),
                };
                let t = out.entry(key(s)).or_default();
                match t.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, n)) => *n += s.value,
                    None => t.buckets.push((le, s.value)),
                }
            }
            _ => {}
        }
    }
    for t in out.values_mut() {
        t.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The q-quantile of cumulative buckets, interpolated within the bucket (as PromQL's
/// histogram_quantile does).
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let within = if n > prev.1 {
                (rank - prev.1) / (n - prev.1)
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * within);
        }
        prev = (le, n);
    }
    Some(prev.0)
}

/// One row of the view.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub source: String,
    pub destination: String,
    pub rps: f64,
    pub success: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// Rows from two scrapes `secs` apart, busiest first.
fn rows(
    before: &HashMap<Pair, PairTotals>,
    now: &HashMap<Pair, PairTotals>,
    secs: f64,
) -> Vec<Row> {
    let mut rows: Vec<Row> = now
        .iter()
        .map(|(pair, t)| {
            let b = before.get(pair).cloned().unwrap_or_default();
            let requests = (t.requests - b.requests).max(0.0);
            let errors = (t.errors - b.errors).max(0.0);
            let delta: Vec<(f64, f64)> = t
                .buckets
                .iter()
                .map(|(le, n)| {
                    let old = b
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map(|(_, n)| *n)
                        .unwrap_or(0.0);
                    (*le, (n - old).max(0.0))
                })
                .collect();
            Row {
                source: pair.0.clone(),
                destination: pair.1.clone(),
                rps: requests / secs.max(1e-3),
                success: (requests > 0.0).then(|| 100.0 * (requests - errors) / requests),
                p50: quantile(0.5, &delta),
                p99: quantile(0.99, &delta),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.rps
            .total_cmp(&a.rps)
            .then_with(|| a.source.cmp(&b.source))
            .then_with(|| a.destination.cmp(&b.destination))
    });
    rows
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(ms) if ms < 10.0 => format!("{ms:.2}ms"),
        Some(ms) => format!("{ms:.0}ms"),
        None => "-".into(),
    }
}

/// The text of one frame (without the terminal control codes).
pub fn render(rows: &[Row], metrics: SocketAddr, height: usize) -> String {
    let mut out = format!(
        "proxy-daemon top — {metrics} — busiest source → destination pairs (last interval)\n\n{:<32} {:<44} {:>9} {:>8} {:>9} {:>9}\n",
        "SOURCE (workload.namespace)", "DESTINATION", "REQ/S", "SUCCESS", "P50", "P99"
    );
    for r in rows.iter().take(height.saturating_sub(4).max(1)) {
        out.push_str(&format!(
            "{:<32} {:<44} {:>9.1} {:>8} {:>9} {:>9}\n",
            r.source,
            r.destination,
            r.rps,
            r.success
                .map(|s| format!("{s:.1}%"))
                .unwrap_or_else(|| "-".into()),
            fmt_ms(r.p50),
            fmt_ms(r.p99),
        ));
    }
    if rows.is_empty() {
        out.push_str("(no HTTP traffic recorded yet)\n");
    }
    out
}

/// One scrape of the metrics endpoint, with hyper's client (keep-alive between frames).
struct Scraper {
    rt: tokio::runtime::Runtime,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Empty<bytes::Bytes>,
    >,
    addr: SocketAddr,
}

impl Scraper {
    fn new(addr: SocketAddr) -> Result<Self, TopError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TopError::Fetch(addr, e.to_string()))?;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Ok(Self { rt, client, addr })
    }

    fn fetch(&self) -> Result<String, TopError> {
        let addr = self.addr;
        let err = |e: String| TopError::Fetch(addr, e);
        let uri: http::Uri = format!("http://{addr}/metrics")
            .parse()
            .map_err(|e: http::uri::InvalidUri| err(e.to_string()))?;
        self.rt.block_on(async {
            let resp = tokio::time::timeout(Duration::from_secs(5), self.client.get(uri))
                .await
                .map_err(|_| err("timed out".into()))?
                .map_err(|e| err(e.to_string()))?;
            if !resp.status().is_success() {
                return Err(TopError::Status(addr, resp.status().to_string()));
            }
            let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
                .await
                .map_err(|_| err("timed out".into()))?
                .map_err(|e| err(e.to_string()))?
                .to_bytes();
            Ok(String::from_utf8_lossy(&body).into_owned())
        })
    }
}

fn terminal_height() -> usize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills the struct we pass; failure leaves it zeroed.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 {
        ws.ws_row as usize
    } else {
        24
    }
}

/// Runs the view: `iterations` frames (0: until interrupted).
pub fn run(metrics: SocketAddr, interval: Duration, iterations: u64) -> ExitCode {
    let scraper = match Scraper::new(metrics) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("proxy-daemon top: {e}");
            return ExitCode::from(1);
        }
    };
    let mut before = match scraper.fetch() {
        Ok(t) => totals(&parse(&t)),
        Err(e) => {
            eprintln!("proxy-daemon top: {e}");
            return ExitCode::from(1);
        }
    };
    let mut at = Instant::now();
    let mut frame = 0u64;
    let tty = {
        // SAFETY: isatty only inspects the descriptor.
        unsafe { libc::isatty(libc::STDOUT_FILENO) == 1 }
    };
    loop {
        std::thread::sleep(interval);
        let now = match scraper.fetch() {
            Ok(t) => totals(&parse(&t)),
            Err(e) => {
                eprintln!("proxy-daemon top: {e}");
                return ExitCode::from(1);
            }
        };
        let secs = at.elapsed().as_secs_f64();
        at = Instant::now();
        let text = render(&rows(&before, &now, secs), metrics, terminal_height());
        let mut stdout = std::io::stdout().lock();
        // On a terminal each frame replaces the last (home + clear); piped, frames follow.
        let _ = if tty {
            write!(stdout, "\x1b[H\x1b[2J{text}")
        } else {
            writeln!(stdout, "{text}")
        };
        let _ = stdout.flush();
        before = now;
        frame += 1;
        if iterations > 0 && frame >= iterations {
            return ExitCode::SUCCESS;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_with_escapes() {
        let s = parse(
            "# HELP x\nistio_requests_total{a=\"1\",b=\"q\\\"x\",response_code=\"200\"} 7\nup 1\n",
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label("b"), "q\"x");
        assert_eq!(s[0].value, 7.0);
        assert_eq!(s[1].name, "up");
    }

    #[test]
    fn rates_success_and_quantiles_from_two_scrapes() {
        let scrape = |ok: u32, bad: u32, fast: u32, slow: u32| {
            let l = "source_workload=\"web\",source_workload_namespace=\"azar\",destination_service=\"reviews\"";
            format!(
                "istio_requests_total{{{l},response_code=\"200\"}} {ok}\nistio_requests_total{{{l},response_code=\"503\"}} {bad}\n\
                 istio_request_duration_milliseconds_bucket{{{l},response_code=\"200\",le=\"10.0\"}} {fast}\n\
                 istio_request_duration_milliseconds_bucket{{{l},response_code=\"200\",le=\"100.0\"}} {}\n\
                 istio_request_duration_milliseconds_bucket{{{l},response_code=\"200\",le=\"+Inf\"}} {}\n",
                fast + slow,
                fast + slow
            )
        };
        let a = totals(&parse(&scrape(10, 0, 10, 0)));
        let b = totals(&parse(&scrape(100, 10, 91, 9)));
        let r = rows(&a, &b, 2.0);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].source, "web.azar");
        assert_eq!(r[0].rps, 50.0);
        assert!((r[0].success.unwrap() - 90.0).abs() < 1e-9);
        // 81 of 90 new requests under 10 ms: p50 inside (0, 10], p99 inside (10, 100].
        let (p50, p99) = (r[0].p50.unwrap(), r[0].p99.unwrap());
        assert!(p50 > 0.0 && p50 <= 10.0, "{p50}");
        assert!(p99 > 10.0 && p99 <= 100.0, "{p99}");
    }
}
