//! RequestAuthentication against Istio's own test tokens and expectations
//! (tests/fixtures/istio-security: jwt/, integration/authz/jwt, integration/requestauthn).
use super::*;
use crate::{
    config::{local, Located, Object},
    state::{
        authz::{self, Attributes, HttpAttributes, Target},
        jwt as state_jwt,
    },
};

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/istio-security"
);

fn token(name: &str) -> String {
    let text =
        std::fs::read_to_string(format!("{FIXTURES}/jwt/tests_common_jwt_tokens.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .and_then(|t| t["token"].as_str())
        .unwrap_or_else(|| panic!("no token {name}"))
        .to_string()
}

/// A template with the JWKS inline (where the suite gives a URI) and the suite's values.
fn load(path: &str) -> (authz::Authorization, state_jwt::RequestAuthn) {
    let jwks = std::fs::read_to_string(format!("{FIXTURES}/jwt/tests_common_jwt_jwks.json"))
        .unwrap()
        .replace('\n', "");
    let text = std::fs::read_to_string(format!("{FIXTURES}/{path}"))
        .unwrap()
        .replace(
            "jwksUri: \"{{ .JWTServer.JwksURI }}\"",
            &format!("jwks: '{jwks}'"),
        )
        .replace("{{ .To.ServiceName }}", "b");
    assert!(!text.contains("{{"), "{text}");
    let mut errors = Vec::new();
    let objects: Vec<Located<Object>> =
        local::split_documents(std::path::Path::new("t.yaml"), &text)
            .iter()
            .filter_map(|d| local::parse_document(d, "ns1").unwrap())
            .collect();
    let a = authz::build(&objects, "istio-system", &mut errors);
    let j = state_jwt::build(&objects, "istio-system", &mut errors);
    assert!(errors.iter().all(|e| !e.is_error()), "{errors:?}");
    (a, j)
}

struct Outcome {
    status: u16,
    headers: http::HeaderMap,
}

/// A request to `b` in ns1 (labels app=b), as the destination proxy decides it.
fn send(
    tables: &(authz::Authorization, state_jwt::RequestAuthn),
    method: &str,
    uri: &str,
    headers: &[(&str, String)],
) -> Outcome {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let mut req = req.body(()).unwrap();
    let labels: crate::config::istio::Labels = [("app".to_string(), "b".to_string())].into();
    let target = Target {
        namespace: "ns1",
        labels: &labels,
        service: None,
    };
    let providers = tables.1.providers_for(&target);
    let cache = JwksCache::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let auth = match rt.block_on(authenticate(&cache, &providers, &mut req)) {
        Ok(a) => a,
        Err(r) => {
            return Outcome {
                status: r.status().as_u16(),
                headers: req.headers().clone(),
            }
        }
    };
    let path = authz::normalize_path(req.uri().path());
    let policies = tables.0.for_target(&target);
    let peer = crate::identity::Identity::new("cluster.local", "ns1", "a");
    let attrs = Attributes {
        peer: Some(&peer),
        source_ip: Some("10.0.1.1".parse().unwrap()),
        destination: Some("10.0.0.2:18080".parse().unwrap()),
        sni: None,
        http: Some(HttpAttributes {
            method,
            host: "b",
            path: &path,
            headers: req.headers(),
        }),
        request_auth: auth.as_ref(),
    };
    let denied = authz::decide(&policies, &attrs).denied();
    Outcome {
        status: if denied { 403 } else { 200 },
        headers: req.headers().clone(),
    }
}

fn bearer(name: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {}", token(name)))]
}

#[test]
fn the_authz_jwt_suite_decides_as_istio_expects() {
    let t = load("integration/authz/jwt.yaml.tmpl");
    let get = |path: &str, tok: Option<&str>| {
        send(&t, "GET", path, &tok.map(bearer).unwrap_or_default()).status
    };
    for path in [
        "/token1",
        "/token2",
        "/tokenAny",
        "/custom-scope-admin",
        "/custom-scope-user",
    ] {
        assert_eq!(get(path, None), 403, "{path} without a token");
    }
    let cases = [
        ("TokenIssuer1", "/token1", 200),
        ("TokenIssuer1", "/token2", 403),
        ("TokenIssuer2", "/token1", 403),
        ("TokenIssuer2", "/token2", 200),
        ("TokenIssuer1", "/token3", 403),
        ("TokenIssuer2", "/token3", 200),
        ("TokenIssuer1", "/tokenAny", 200),
        ("TokenIssuer2", "/tokenAny", 200),
        ("TokenIssuer1", "/permission", 403),
        ("TokenIssuer2", "/permission", 403),
        (
            "TokenIssuer2WithSpaceDelimitedPermission",
            "/permission",
            200,
        ),
        ("TokenIssuer2WithSpaceDelimitedScope", "/scope", 200),
        ("TokenIssuer2WithSpaceDelimitedScope", "/otherscope", 403),
        (
            "TokenIssuer2WithCustomScopeSpaceDelimitedScope",
            "/custom-scope-admin",
            200,
        ),
        (
            "TokenIssuer2WithCustomScopeSpaceDelimitedScope",
            "/custom-scope-user",
            200,
        ),
        ("TokenIssuer1", "/custom-scope-admin", 403),
        ("TokenIssuer1WithNestedClaims1", "/nested-key1", 200),
        ("TokenIssuer1WithNestedClaims1", "/nested-2-key1", 200),
        ("TokenIssuer1WithNestedClaims1", "/nested-key2", 403),
        ("TokenIssuer1WithNestedClaims1", "/nested-non-exist", 403),
        ("TokenIssuer1WithNestedClaims2", "/nested-key2", 200),
        ("TokenIssuer1WithNestedClaims2", "/nested-key1", 403),
        ("TokenIssuer1WithAud", "/audiences", 200),
        ("TokenIssuer1WithAudList", "/audiences", 200),
    ];
    for (tok, path, want) in cases {
        assert_eq!(get(path, Some(tok)), want, "{tok} {path}");
    }
}

#[test]
fn authn_only_checks_tokens_without_requiring_one_and_tells_the_app() {
    let t = load("integration/requestauthn/authn-only.yaml.tmpl");
    let one = send(&t, "GET", "/", &bearer("TokenIssuer1"));
    assert_eq!(one.status, 200);
    assert!(
        one.headers.get("authorization").is_none(),
        "the token is not forwarded"
    );
    let payload = token("TokenIssuer1").split('.').nth(1).unwrap().to_string();
    assert_eq!(one.headers["x-test-payload"], payload.as_str());
    assert_eq!(one.headers["x-jwt-iss"], "test-issuer-1@istio.io");
    assert_eq!(one.headers["x-jwt-iat"], "1562182722");
    let nested = send(&t, "GET", "/", &bearer("TokenIssuer1WithNestedClaims2"));
    assert_eq!(nested.headers["x-jwt-nested-claim"], "valueC");
    assert_eq!(send(&t, "GET", "/", &bearer("TokenIssuer2")).status, 200);
    assert_eq!(send(&t, "GET", "/", &bearer("TokenExpired")).status, 401);
    assert_eq!(send(&t, "GET", "/", &bearer("TokenInvalid")).status, 401);
    assert_eq!(send(&t, "GET", "/", &[]).status, 200, "no token: passes");
    // A caller cannot set what only a verified token may.
    let forged = send(&t, "GET", "/", &[("x-jwt-iss", "someone".into())]);
    assert!(forged.headers.get("x-jwt-iss").is_none());
    let mut preflight = bearer("TokenExpired");
    preflight.push(("access-control-request-method", "POST".into()));
    let without_origin = send(&t, "OPTIONS", "/", &preflight);
    assert_eq!(without_origin.status, 401);
    preflight.push(("origin", "https://istio.io".into()));
    assert_eq!(
        send(&t, "OPTIONS", "/", &preflight).status,
        200,
        "CORS preflight"
    );
}

#[test]
fn authn_authz_forward_and_audiences() {
    let t = load("integration/requestauthn/authn-authz.yaml.tmpl");
    let ok = send(&t, "GET", "/", &bearer("TokenIssuer1"));
    assert_eq!(ok.status, 200);
    assert!(ok.headers.get("authorization").is_none());
    assert_eq!(send(&t, "GET", "/", &bearer("TokenExpired")).status, 401);
    assert_eq!(send(&t, "GET", "/", &[]).status, 403);
    let t = load("integration/requestauthn/forward.yaml.tmpl");
    let fwd = send(&t, "GET", "/", &bearer("TokenIssuer1"));
    assert_eq!(
        fwd.headers["authorization"],
        format!("Bearer {}", token("TokenIssuer1")).as_str()
    );
    let t = load("integration/requestauthn/aud.yaml.tmpl");
    assert_eq!(send(&t, "GET", "/", &bearer("TokenIssuer1")).status, 403);
    assert_eq!(
        send(&t, "GET", "/", &bearer("TokenIssuer1WithAud")).status,
        200
    );
    assert_eq!(send(&t, "GET", "/", &bearer("TokenIssuer2")).status, 200);
}

#[test]
fn tokens_are_read_only_where_the_rule_says() {
    let t = load("integration/requestauthn/headers-params.yaml.tmpl");
    let t1 = token("TokenIssuer1");
    let q = |query: &str| send(&t, "GET", &format!("/?{query}"), &[]).status;
    assert_eq!(q(&format!("token={t1}")), 200);
    assert_eq!(q(&format!("secondary_token={t1}")), 200);
    assert_eq!(q(&format!("token={t1}&secondary_token={t1}")), 200);
    assert_eq!(q(&format!("token_value={t1}")), 403);
    assert_eq!(
        q(&format!(
            "token={t1}&secondary_token={}",
            token("TokenExpired")
        )),
        401
    );
    let h = |name: &'static str, value: String| send(&t, "GET", "/", &[(name, value)]).status;
    assert_eq!(h("x-jwt-token", format!("Value {t1}")), 200);
    assert_eq!(h("auth-token", format!("Token {t1}")), 200);
    assert_eq!(h("auth-header-param", format!("Bearer {t1}")), 403);
}

/// Istio's RequestAuthentication validation cases: the valid one accepted, each invalid
/// one refused with Istio's reason.
#[test]
fn istios_request_authentication_cases_validate_as_istio_says() {
    let parse = |text: &str| {
        let (objects, mut errors) = crate::testing::parse_yaml(text, "foo");
        state_jwt::build(&objects, "istio-system", &mut errors);
        errors
    };
    let valid =
        std::fs::read_to_string(format!("{FIXTURES}/crd-validation/reqauth-valid.yaml")).unwrap();
    let errors = parse(&valid);
    assert!(errors.iter().all(|e| !e.is_error()), "{errors:?}");
    let invalid =
        std::fs::read_to_string(format!("{FIXTURES}/crd-validation/reqauth-invalid.yaml")).unwrap();
    let mut checked = 0;
    for doc in invalid.split("\n---\n") {
        let Some(want) = doc.lines().find_map(|l| l.strip_prefix("_err: ")) else {
            continue;
        };
        let want = want.trim_matches(|c| c == '\'' || c == '"');
        let doc: String = doc
            .lines()
            .filter(|l| !l.starts_with("_err:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let errors = parse(&doc);
        assert!(
            errors
                .iter()
                .any(|e| e.is_error() && e.message.contains(want)),
            "{want}: {errors:?}"
        );
        checked += 1;
    }
    assert_eq!(checked, 20);
}

#[test]
fn jwks_is_never_fetched_from_the_nodes_own_services_or_the_metadata_endpoint() {
    use super::fetch_permitted;
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    for refused in [
        "127.0.0.1",
        "127.1.2.3",
        "169.254.169.254",
        "169.254.7.127",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "fe80::1",
        "fd00:ec2::254",
    ] {
        assert!(!fetch_permitted(ip(refused), &[]), "{refused}");
    }
    for permitted in ["10.96.0.10", "198.18.0.5", "8.8.8.8", "2001:db8::1"] {
        assert!(fetch_permitted(ip(permitted), &[]), "{permitted}");
    }
    let allow: Vec<ipnet::IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
    assert!(fetch_permitted(ip("127.0.0.1"), &allow));
    assert!(!fetch_permitted(ip("127.0.0.2"), &allow));
    assert!(!fetch_permitted(ip("169.254.169.254"), &allow));

    // Through the cache, as a request's token is checked: refused before any connection
    // (nothing listens on the port; the error would otherwise be "connecting").
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(super::fetch_for_test("http://127.0.0.1:9/jwks.json", &[]))
        .expect_err("refused");
    assert!(err.contains("--jwks-allow-cidr"), "{err}");
    let err = rt
        .block_on(super::fetch_for_test(
            "http://169.254.169.254/latest/meta-data/",
            &allow,
        ))
        .expect_err("refused");
    assert!(err.contains("not fetched"), "{err}");
}
