//! Header handling: hop-by-hop headers, VirtualService header operations and rewrites,
//! request ids.
use super::*;

/// Hop-by-hop headers (RFC 9110 §7.6.1): never forwarded, except for an Upgrade handshake.
pub(super) const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub(crate) fn is_upgrade(headers: &http::HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

pub(super) fn strip_hop_by_hop(headers: &mut http::HeaderMap, keep_upgrade: bool) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    // `TE: trailers` says the client takes trailers (gRPC needs it; it is the one TE
    // value h2 allows): kept, as Envoy keeps it.
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for h in HOP_BY_HOP {
        if keep_upgrade && (h == "connection" || h == "upgrade") {
            continue;
        }
        headers.remove(h);
    }
    for h in named {
        if keep_upgrade && (h == "upgrade" || h == "connection") {
            continue;
        }
        headers.remove(h.as_str());
    }
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

pub(super) fn apply_ops(headers: &mut http::HeaderMap, ops: &HeaderOps) {
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
    for (k, v) in &ops.set {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.append(k, v);
        }
    }
}

/// A random (version 4) UUID for `x-request-id`. From the thread's seeded generator, not
/// `Uuid::new_v4`, which asks the kernel (a getrandom(2) system call) for every request: one
/// of five system calls per proxied request before.
pub(super) fn new_request_id() -> String {
    uuid::Builder::from_random_bytes(rand::random::<[u8; 16]>())
        .into_uuid()
        .to_string()
}

pub(super) fn rewrite(req: &mut Request<Body>, edits: &RequestEdits) {
    for ops in &edits.headers {
        apply_ops(req.headers_mut(), ops);
    }
    for h in &edits.add_headers {
        use crate::state::routes::HeaderAppend;
        let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) else {
            continue;
        };
        let headers = req.headers_mut();
        match h.action {
            HeaderAppend::AppendIfExistsOrAdd => {
                headers.append(k, v);
            }
            HeaderAppend::AddIfAbsent => {
                if !headers.contains_key(&k) {
                    headers.insert(k, v);
                }
            }
            HeaderAppend::OverwriteIfExistsOrAdd => {
                headers.insert(k, v);
            }
            HeaderAppend::OverwriteIfExists => {
                if headers.contains_key(&k) {
                    headers.insert(k, v);
                }
            }
        }
    }
    if let Some(authority) = edits
        .rewrite_authority
        .as_ref()
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        req.headers_mut().insert(header::HOST, authority);
    }
    if let Some((prefix, replacement)) = &edits.rewrite_uri {
        let path = req.uri().path();
        let new_path = match prefix {
            Some(p) if path.starts_with(p.as_str()) => format!("{replacement}{}", &path[p.len()..]),
            _ => replacement.clone(),
        };
        let pq = match req.uri().query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        if let Ok(uri) = pq.parse() {
            *req.uri_mut() = uri;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_distinct_version_4_uuids() {
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| super::new_request_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in ids.iter().take(20) {
            let u = uuid::Uuid::parse_str(id).expect(id);
            assert_eq!(u.get_version_num(), 4, "{id}");
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
    }
}
