//! Access log lines, formatted by hand into a per-thread buffer and written with one
//! `write` each: the generic tracing formatter costs several microseconds a line, which
//! is too much for every request. Whether lines are written still follows the tracing
//! filter (target `access_log`), so `/logging?level=info,access_log=off` switches them.
//! The layout matches the daemon's other log lines (tracing's text or JSON format).
use std::{cell::RefCell, fmt::Write as _, io::Write as _, sync::OnceLock, time::SystemTime};

pub const TARGET: &str = "access_log";

/// How access log lines are written: as the daemon's other log lines are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();
/// Where lines go: a background thread's queue (tracing-appender's non-blocking writer), so
/// a slow log pipe never stalls the async workers; when the queue is full lines are dropped
/// rather than waited for. Unset (tests, benches): stderr directly.
static WRITER: OnceLock<tracing_appender::non_blocking::NonBlocking> = OnceLock::new();

/// Sends access log lines through `writer` from now on.
pub fn set_writer(writer: tracing_appender::non_blocking::NonBlocking) {
    let _ = WRITER.set(writer);
}

/// Set once, by the logging setup.
pub fn set_format(format: LogFormat) {
    let _ = FORMAT.set(format);
}

/// One field's value.
pub enum Value<'a> {
    Str(&'a str),
    U64(u64),
    F64(f64),
}

/// Whether access log lines are on (the tracing filter for target `access_log`).
pub fn enabled() -> bool {
    tracing::enabled!(target: "access_log", tracing::Level::INFO)
}

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(1024));
}

/// Writes one line (when enabled) to stderr, where the daemon's logs go.
pub fn write(message: &str, fields: &[(&str, Value)]) {
    if !enabled() {
        return;
    }
    LINE.with(|line| {
        let mut line = line.borrow_mut();
        line.clear();
        format(
            *FORMAT.get().unwrap_or(&LogFormat::Text),
            SystemTime::now(),
            message,
            fields,
            &mut line,
        );
        match WRITER.get() {
            Some(w) => {
                let _ = w.clone().write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    });
}

/// Formats one line (with its newline) into `out`.
pub fn format(
    format: LogFormat,
    now: SystemTime,
    message: &str,
    fields: &[(&str, Value)],
    out: &mut String,
) {
    let ts = crate::proxy::report::rfc3339_micros(now);
    match format {
        LogFormat::Json => {
            out.push_str("{\"timestamp\":\"");
            out.push_str(&ts);
            out.push_str("\",\"level\":\"INFO\",\"fields\":{\"message\":");
            json_str(message, out);
            for (k, v) in fields {
                out.push_str(",\"");
                out.push_str(k);
                out.push_str("\":");
                match v {
                    Value::Str(s) => json_str(s, out),
                    Value::U64(n) => {
                        let _ = write!(out, "{n}");
                    }
                    Value::F64(f) if f.is_finite() => {
                        let _ = write!(out, "{f}");
                    }
                    Value::F64(_) => out.push_str("null"),
                }
            }
            out.push_str("},\"target\":\"access_log\"}\n");
        }
        LogFormat::Text => {
            out.push_str(&ts);
            out.push_str("  INFO access_log: ");
            out.push_str(message);
            for (k, v) in fields {
                out.push(' ');
                out.push_str(k);
                out.push('=');
                match v {
                    Value::Str(s) if s.is_empty() || s.chars().any(needs_quoting) => quoted(s, out),
                    Value::Str(s) => out.push_str(s),
                    Value::U64(n) => {
                        let _ = write!(out, "{n}");
                    }
                    Value::F64(f) => {
                        let _ = write!(out, "{f}");
                    }
                }
            }
            out.push('\n');
        }
    }
}

/// Characters that a text line cannot carry bare: separators, quotes, backslashes, and
/// anything a terminal would act on (control characters, escape sequences, the bidi
/// overrides that reorder what a reader sees). Values come from the wire (Host, SNI,
/// paths): a request must not be able to write a line of its own or hide one.
fn needs_quoting(c: char) -> bool {
    matches!(c, ' ' | '"' | '=' | '\\') || c.is_control() || is_bidi_control(c)
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` in double quotes, with `"`, `\` and line breaks escaped and every other character
/// that needs it written as `\u{…}`.
fn quoted(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || is_bidi_control(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON string literal (RFC 8259 escapes).
fn json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_parse_and_escape() {
        let mut out = String::new();
        format(
            LogFormat::Json,
            SystemTime::UNIX_EPOCH,
            "request",
            &[
                ("path", Value::Str("/a?\"b\"\n\u{1}")),
                ("response_code", Value::U64(200)),
                ("duration_ms", Value::F64(1.25)),
            ],
            &mut out,
        );
        assert!(out.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).expect("JSON");
        assert_eq!(v["target"], "access_log");
        assert_eq!(v["fields"]["message"], "request");
        assert_eq!(v["fields"]["path"], "/a?\"b\"\n\u{1}");
        assert_eq!(v["fields"]["response_code"], 200);
        assert_eq!(v["fields"]["duration_ms"], 1.25);
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn hostile_values_cannot_break_a_text_line_or_hide_in_it() {
        let mut out = String::new();
        let sni =
            "evil.example\r\n2026-01-01T00:00:00Z  INFO access_log: forged\u{1b}[2J\u{202e}txt";
        format(
            LogFormat::Text,
            SystemTime::UNIX_EPOCH,
            "connection",
            &[("sni", Value::Str(sni)), ("path", Value::Str("/a\\b\"c"))],
            &mut out,
        );
        assert_eq!(out.matches('\n').count(), 1, "one line: {out:?}");
        assert!(
            !out.contains('\r') && !out.contains('\u{1b}') && !out.contains('\u{202e}'),
            "{out:?}"
        );
        assert!(out.contains(r#"sni="evil.example\r\n2026-01-01T00:00:00Z  INFO access_log: forged\u{1b}[2J\u{202e}txt""#), "{out}");
        assert!(out.contains(r#"path="/a\\b\"c""#), "{out}");
    }

    #[test]
    fn text_lines_quote_what_needs_it() {
        let mut out = String::new();
        format(
            LogFormat::Text,
            SystemTime::UNIX_EPOCH,
            "request",
            &[
                ("authority", Value::Str("a b")),
                ("method", Value::Str("GET")),
            ],
            &mut out,
        );
        assert_eq!(
            out,
            "1970-01-01T00:00:00.000000Z  INFO access_log: request authority=\"a b\" method=GET\n"
        );
    }
}
