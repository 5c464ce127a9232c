//! Trace context on the wire: W3C Trace Context (`traceparent`, `tracestate`) and Zipkin's
//! B3, as separate headers (`x-b3-*`) or the single `b3` header. What a request brings is
//! read leniently (anything malformed is ignored and a new trace starts); what goes
//! upstream names the proxy's own span as the parent, in the formats the request came with.
use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const B3: &str = "b3";
pub const B3_TRACE_ID: &str = "x-b3-traceid";
pub const B3_SPAN_ID: &str = "x-b3-spanid";
pub const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
pub const B3_SAMPLED: &str = "x-b3-sampled";
pub const B3_FLAGS: &str = "x-b3-flags";
/// Envoy's header that forces a trace whatever the sampling.
pub const FORCE_TRACE: &str = "x-envoy-force-trace";

/// Propagation formats (which header families a request used, or we write).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Formats {
    pub w3c: bool,
    pub b3_multi: bool,
    pub b3_single: bool,
}

impl Formats {
    pub fn any(self) -> bool {
        self.w3c || self.b3_multi || self.b3_single
    }

    /// Parses `w3c`, `b3`, `b3-single`, comma separated.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut f = Formats::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "w3c" | "tracecontext" => f.w3c = true,
                "b3" | "b3-multi" => f.b3_multi = true,
                "b3-single" => f.b3_single = true,
                other => {
                    return Err(format!(
                        "unknown trace propagation format {other:?} (known: w3c, b3, b3-single)"
                    ))
                }
            }
        }
        if !f.any() {
            return Err("no trace propagation format given".into());
        }
        Ok(f)
    }
}

/// The context a request arrived with, as far as it could be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Incoming {
    /// Trace and caller's span, when a complete, valid context came with the request.
    pub parent: Option<Parent>,
    /// The caller's sampling decision, if it made one (a B3 `x-b3-sampled: 0` alone is one).
    pub sampled: Option<bool>,
    /// B3 debug (`x-b3-flags: 1`, `b3: …-d`) or `x-envoy-force-trace`: always trace.
    pub forced: bool,
    pub tracestate: Option<HeaderValue>,
    /// Which formats the request used (valid or not: we answer in the caller's dialect).
    pub formats: Formats,
    /// A trace header was present but could not be read.
    pub malformed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: u128,
    pub span_id: u64,
    /// The trace id was 64-bit (16 hex digits) on the wire: keep writing it so.
    pub short_trace_id: bool,
}

fn hex_u64(s: &str) -> Option<u64> {
    (s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
        .filter(|v| *v != 0)
}

/// A trace id of 32 or 16 hex digits (B3 allows both); (id, was short).
fn hex_trace_id(s: &str) -> Option<(u128, bool)> {
    if !(s.len() == 32 || s.len() == 16) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let v = u128::from_str_radix(s, 16).ok().filter(|v| *v != 0)?;
    Some((v, s.len() == 16))
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// `00-<32 hex trace>-<16 hex span>-<2 hex flags>` (a newer version may append fields).
fn parse_traceparent(v: &str) -> Option<(Parent, bool)> {
    let mut parts = v.split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version.eq_ignore_ascii_case("ff") || trace.len() != 32 {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    u8::from_str_radix(version, 16).ok()?;
    let (trace_id, _) = hex_trace_id(trace)?;
    let span_id = hex_u64(span)?;
    let flags = (flags.len() == 2)
        .then(|| u8::from_str_radix(flags, 16).ok())
        .flatten()?;
    Some((
        Parent {
            trace_id,
            span_id,
            short_trace_id: false,
        },
        flags & 1 == 1,
    ))
}

/// `b3: {trace}-{span}[-{sampling}[-{parent}]]` or just `{sampling}`.
fn parse_b3_single(v: &str) -> Option<(Option<Parent>, Option<bool>, bool)> {
    let sampling = |s: &str| match s {
        "1" => Some((Some(true), false)),
        "0" => Some((Some(false), false)),
        "d" => Some((Some(true), true)),
        _ => None,
    };
    let parts: Vec<&str> = v.split('-').collect();
    match parts.as_slice() {
        [s] => {
            let (sampled, debug) = sampling(s)?;
            Some((None, sampled, debug))
        }
        [t, s, rest @ ..] if rest.len() <= 2 => {
            let (trace_id, short) = hex_trace_id(t)?;
            let span_id = hex_u64(s)?;
            let (sampled, debug) = match rest.first() {
                Some(x) => sampling(x)?,
                None => (None, false),
            };
            if let Some(p) = rest.get(1) {
                hex_u64(p)?;
            }
            Some((
                Some(Parent {
                    trace_id,
                    span_id,
                    short_trace_id: short,
                }),
                sampled,
                debug,
            ))
        }
        _ => None,
    }
}

/// Reads the trace context of a request. W3C wins over B3 when both are valid (Envoy's
/// order is the other way round only for its Zipkin tracer; either is a valid reading of
/// a request that carries the same context twice).
pub fn read(h: &HeaderMap) -> Incoming {
    let mut inc = Incoming {
        forced: h.contains_key(FORCE_TRACE),
        ..Default::default()
    };
    if let Some(v) = h.get(TRACEPARENT) {
        inc.formats.w3c = true;
        match v.to_str().ok().and_then(|s| parse_traceparent(s.trim())) {
            Some((p, sampled)) => {
                inc.parent = Some(p);
                inc.sampled = Some(sampled);
                inc.tracestate = h.get(TRACESTATE).cloned();
            }
            None => inc.malformed = true,
        }
    }
    if let Some(v) = h.get(B3) {
        inc.formats.b3_single = true;
        match v.to_str().ok().and_then(|s| parse_b3_single(s.trim())) {
            Some((p, sampled, debug)) => {
                if inc.parent.is_none() {
                    inc.parent = p;
                    inc.sampled = sampled.or(inc.sampled);
                }
                inc.forced |= debug;
            }
            None => inc.malformed = true,
        }
    }
    let b3_present = [
        B3_TRACE_ID,
        B3_SPAN_ID,
        B3_SAMPLED,
        B3_FLAGS,
        B3_PARENT_SPAN_ID,
    ]
    .iter()
    .any(|n| h.contains_key(*n));
    if b3_present {
        inc.formats.b3_multi = true;
        let ids = match (header(h, B3_TRACE_ID), header(h, B3_SPAN_ID)) {
            (Some(t), Some(s)) => match (hex_trace_id(t), hex_u64(s)) {
                (Some((trace_id, short)), Some(span_id)) => Some(Parent {
                    trace_id,
                    span_id,
                    short_trace_id: short,
                }),
                _ => {
                    inc.malformed = true;
                    None
                }
            },
            (None, None) => None,
            _ => {
                inc.malformed = true;
                None
            }
        };
        let sampled = match header(h, B3_SAMPLED) {
            Some("1") | Some("true") => Some(true),
            Some("0") | Some("false") => Some(false),
            None => None,
            Some(_) => {
                inc.malformed = true;
                None
            }
        };
        if header(h, B3_FLAGS) == Some("1") {
            inc.forced = true;
        }
        if inc.parent.is_none() {
            inc.parent = ids;
            if inc.sampled.is_none() {
                inc.sampled = sampled;
            }
        }
    }
    inc
}

/// The context the proxy sends upstream: its own span, child of the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_span_id: Option<u64>,
    pub sampled: bool,
    pub debug: bool,
    pub short_trace_id: bool,
}

impl Outgoing {
    pub fn trace_hex(&self) -> String {
        if self.short_trace_id {
            format!("{:016x}", self.trace_id as u64)
        } else {
            format!("{:032x}", self.trace_id)
        }
    }
}

fn put(h: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

/// Every trace header, so that stale or malformed ones never reach the upstream.
const ALL: [&str; 7] = [
    TRACEPARENT,
    B3,
    B3_TRACE_ID,
    B3_SPAN_ID,
    B3_PARENT_SPAN_ID,
    B3_SAMPLED,
    B3_FLAGS,
];

/// Writes `ctx` into a request going upstream, in `formats`; `tracestate` passes through.
pub fn write(
    h: &mut HeaderMap,
    ctx: &Outgoing,
    formats: Formats,
    tracestate: Option<&HeaderValue>,
) {
    for n in ALL {
        h.remove(n);
    }
    h.remove(TRACESTATE);
    let sampled = if ctx.sampled { "1" } else { "0" };
    if formats.w3c {
        put(
            h,
            TRACEPARENT,
            format!("00-{:032x}-{:016x}-0{}", ctx.trace_id, ctx.span_id, sampled),
        );
        if let Some(ts) = tracestate {
            h.insert(HeaderName::from_static(TRACESTATE), ts.clone());
        }
    }
    if formats.b3_multi {
        put(h, B3_TRACE_ID, ctx.trace_hex());
        put(h, B3_SPAN_ID, format!("{:016x}", ctx.span_id));
        if let Some(p) = ctx.parent_span_id {
            put(h, B3_PARENT_SPAN_ID, format!("{p:016x}"));
        }
        if ctx.debug {
            put(h, B3_FLAGS, "1".into());
        } else {
            put(h, B3_SAMPLED, sampled.into());
        }
    }
    if formats.b3_single {
        let s = if ctx.debug { "d" } else { sampled };
        let mut v = format!("{}-{:016x}-{s}", ctx.trace_hex(), ctx.span_id);
        if let Some(p) = ctx.parent_span_id {
            v.push_str(&format!("-{p:016x}"));
        }
        put(h, B3, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn w3c_traceparent_is_read() {
        let inc = read(&headers(&[
            (
                TRACEPARENT,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            (TRACESTATE, "congo=t61rcWkgMzE"),
        ]));
        let p = inc.parent.unwrap();
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert_eq!(inc.sampled, Some(true));
        assert!(inc.formats.w3c && !inc.formats.b3_multi);
        assert_eq!(inc.tracestate.unwrap(), "congo=t61rcWkgMzE");
        let unsampled = read(&headers(&[(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]));
        assert_eq!(unsampled.sampled, Some(false));
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz",
            "",
        ] {
            let inc = read(&headers(&[(TRACEPARENT, bad)]));
            assert_eq!(inc.parent, None, "{bad:?}");
            assert!(inc.malformed, "{bad:?}");
        }
    }

    #[test]
    fn b3_multi_and_single_are_read() {
        let inc = read(&headers(&[
            (B3_TRACE_ID, "80f198ee56343ba864fe8b2a57d3eff7"),
            (B3_SPAN_ID, "e457b5a2e4d86bd1"),
            (B3_PARENT_SPAN_ID, "05e3ac9a4f6e3b90"),
            (B3_SAMPLED, "1"),
        ]));
        assert_eq!(
            inc.parent.unwrap().trace_id,
            0x80f198ee56343ba864fe8b2a57d3eff7
        );
        assert_eq!(inc.parent.unwrap().span_id, 0xe457b5a2e4d86bd1);
        assert_eq!(inc.sampled, Some(true));
        assert!(inc.formats.b3_multi);

        let single = read(&headers(&[(
            B3,
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-d-05e3ac9a4f6e3b90",
        )]));
        assert_eq!(single.parent.unwrap().span_id, 0xe457b5a2e4d86bd1);
        assert!(single.forced, "d is debug");
        assert!(single.formats.b3_single);

        let deny = read(&headers(&[(B3, "0")]));
        assert_eq!((deny.parent, deny.sampled), (None, Some(false)));
        let short = read(&headers(&[
            (B3_TRACE_ID, "a3ce929d0e0e4736"),
            (B3_SPAN_ID, "e457b5a2e4d86bd1"),
        ]));
        assert!(short.parent.unwrap().short_trace_id);
        assert_eq!(short.sampled, None, "no decision: ours to make");
    }

    #[test]
    fn broken_b3_is_ignored() {
        for h in [
            headers(&[(B3_TRACE_ID, "zz"), (B3_SPAN_ID, "e457b5a2e4d86bd1")]),
            headers(&[(B3_TRACE_ID, "80f198ee56343ba864fe8b2a57d3eff7")]),
            headers(&[(B3, "80f198ee56343ba8-1")]),
            headers(&[(B3, "x")]),
        ] {
            let inc = read(&h);
            assert_eq!(inc.parent, None, "{h:?}");
            assert!(inc.malformed, "{h:?}");
        }
    }

    #[test]
    fn force_trace_and_b3_flags_force() {
        assert!(read(&headers(&[(FORCE_TRACE, "true")])).forced);
        assert!(read(&headers(&[(B3_FLAGS, "1")])).forced);
        assert!(!read(&HeaderMap::new()).forced);
    }

    #[test]
    fn written_context_round_trips_in_every_format() {
        let ctx = Outgoing {
            trace_id: 0x80f198ee56343ba864fe8b2a57d3eff7,
            span_id: 0x1122334455667788,
            parent_span_id: Some(0xe457b5a2e4d86bd1),
            sampled: true,
            debug: false,
            short_trace_id: false,
        };
        for formats in [
            Formats {
                w3c: true,
                ..Default::default()
            },
            Formats {
                b3_multi: true,
                ..Default::default()
            },
            Formats {
                b3_single: true,
                ..Default::default()
            },
        ] {
            let mut h = headers(&[(TRACEPARENT, "garbage"), (B3_SPAN_ID, "0")]);
            write(&mut h, &ctx, formats, None);
            let back = read(&h);
            assert_eq!(back.formats, formats, "{h:?}");
            assert!(!back.malformed, "{h:?}");
            let p = back.parent.unwrap();
            assert_eq!((p.trace_id, p.span_id), (ctx.trace_id, ctx.span_id));
            assert_eq!(back.sampled, Some(true));
        }
        let mut h = HeaderMap::new();
        write(
            &mut h,
            &Outgoing {
                short_trace_id: true,
                trace_id: 0xa3ce929d0e0e4736,
                ..ctx
            },
            Formats {
                b3_multi: true,
                ..Default::default()
            },
            None,
        );
        assert_eq!(h[B3_TRACE_ID], "a3ce929d0e0e4736");
        assert_eq!(h[B3_PARENT_SPAN_ID], "e457b5a2e4d86bd1");
    }
}
