//! PeerAuthentication compiled: which connections to a workload may arrive without mutual
//! TLS. HBONE between captured pods is always mutual TLS; these policies decide only what
//! happens to plaintext arriving on a pod's inbound port.
//!
//! The effective mode of a (workload, port), as Istio computes it: the oldest workload
//! policy selecting the pod (its `portLevelMtls` entry for the port, then its `mtls`), then
//! the oldest namespace-wide policy, then the oldest mesh-wide one (root namespace, no
//! selector), then `PERMISSIVE`. `UNSET` at any level defers to the next.
use std::collections::BTreeMap;

use crate::config::{
    istio::{IstioObject, Labels},
    security::{MtlsMode, PeerAuthenticationSpec},
    ConfigError, Located, Object, ObjectRef,
};

/// One PeerAuthentication, compiled.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerPolicy {
    pub object: ObjectRef,
    /// None: namespace-wide (mesh-wide in the root namespace).
    pub selector: Option<Labels>,
    pub mode: MtlsMode,
    pub ports: BTreeMap<u16, MtlsMode>,
    /// Creation time (RFC 3339), then name: the oldest wins, as in Istio.
    #[serde(skip)]
    rank: (Option<jiff::Timestamp>, String),
}

/// Why plaintext was or was not accepted, for logs and /config_dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EffectiveMode {
    Strict,
    Permissive,
    Disable,
}

impl EffectiveMode {
    /// Whether a connection without a client certificate may reach the app.
    pub fn accepts_plaintext(self) -> bool {
        self != EffectiveMode::Strict
    }

    pub fn name(self) -> &'static str {
        match self {
            EffectiveMode::Strict => "STRICT",
            EffectiveMode::Permissive => "PERMISSIVE",
            EffectiveMode::Disable => "DISABLE",
        }
    }
}

/// Every PeerAuthentication of the configuration.
#[derive(Debug, Default, serde::Serialize)]
pub struct PeerAuthentication {
    root_namespace: String,
    /// By namespace, oldest first.
    policies: BTreeMap<String, Vec<PeerPolicy>>,
}

fn known(mode: MtlsMode) -> Option<EffectiveMode> {
    match mode {
        MtlsMode::Unset => None,
        MtlsMode::Disable => Some(EffectiveMode::Disable),
        MtlsMode::Permissive => Some(EffectiveMode::Permissive),
        MtlsMode::Strict => Some(EffectiveMode::Strict),
    }
}

fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl PeerAuthentication {
    /// The mode for connections to `port` of a workload in `namespace` with `labels`.
    pub fn mode(&self, namespace: &str, labels: &Labels, port: u16) -> EffectiveMode {
        let in_ns = self
            .policies
            .get(namespace)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let workload = in_ns
            .iter()
            .find(|p| p.selector.as_ref().is_some_and(|s| selects(s, labels)));
        let namespace_wide = in_ns.iter().find(|p| p.selector.is_none());
        let mesh_wide = self
            .policies
            .get(&self.root_namespace)
            .and_then(|ps| ps.iter().find(|p| p.selector.is_none()));
        workload
            .and_then(|p| p.ports.get(&port).copied().and_then(known))
            .or_else(|| workload.and_then(|p| known(p.mode)))
            .or_else(|| namespace_wide.and_then(|p| known(p.mode)))
            .or_else(|| mesh_wide.and_then(|p| known(p.mode)))
            .unwrap_or(EffectiveMode::Permissive)
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}

/// Compiles the PeerAuthentications among `objects`; problems go to `errors` at their line.
pub fn build(
    objects: &[Located<Object>],
    root_namespace: &str,
    errors: &mut Vec<ConfigError>,
) -> PeerAuthentication {
    let mut table = PeerAuthentication {
        root_namespace: root_namespace.to_string(),
        policies: BTreeMap::new(),
    };
    for o in objects {
        let Object::PeerAuthentication(pa) = &o.value else {
            continue;
        };
        if let Some(policy) = compile(o, pa, errors) {
            table
                .policies
                .entry(o.object_ref.namespace.clone())
                .or_default()
                .push(policy);
        }
    }
    for policies in table.policies.values_mut() {
        policies.sort_by(|a, b| a.rank.cmp(&b.rank));
    }
    table
}

fn compile(
    o: &Located<Object>,
    pa: &IstioObject<PeerAuthenticationSpec>,
    errors: &mut Vec<ConfigError>,
) -> Option<PeerPolicy> {
    let ports = match pa.spec.validate() {
        Ok(ports) => ports,
        Err(found) => {
            errors.extend(
                found
                    .into_iter()
                    .map(|(line, e)| o.error(line, format!("PeerAuthentication: {e}"))),
            );
            return None;
        }
    };
    let selector = pa
        .spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|l| !l.is_empty());
    let rank = (
        pa.metadata
            .creation_timestamp
            .as_deref()
            .and_then(|t| t.parse().ok()),
        pa.metadata.name.clone(),
    );
    Some(PeerPolicy {
        object: o.object_ref.clone(),
        selector,
        mode: pa.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default(),
        ports,
        rank,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/istio-security"
    );

    fn objects(yaml: &str, default_ns: &str) -> (Vec<Located<Object>>, Vec<ConfigError>) {
        crate::testing::parse_yaml(yaml, default_ns)
    }

    fn table(yaml: &str) -> PeerAuthentication {
        let (objects, mut errors) = objects(yaml, "foo");
        let t = build(&objects, "istio-system", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        t
    }

    fn app_a() -> Labels {
        [("app".to_string(), "a".to_string())].into()
    }

    /// Whether the converted L4 policy Istio sends ztunnel (`X.yaml`) denies plaintext to
    /// `port`: its groups OR'ed, each group's rules AND'ed, each rule's matches OR'ed; in
    /// these files a match names `destinationPorts`, `notDestinationPorts` and
    /// `notPrincipals: [presence]` (which a plaintext connection, without a principal,
    /// always satisfies).
    fn converted_denies_plaintext(doc: &serde_json::Value, port: u64) -> bool {
        let matches_one = |m: &serde_json::Value| -> bool {
            let mut any_field = false;
            if let Some(ports) = m.get("destinationPorts").and_then(|v| v.as_array()) {
                any_field = true;
                if !ports.iter().any(|p| p.as_u64() == Some(port)) {
                    return false;
                }
            }
            if let Some(ports) = m.get("notDestinationPorts").and_then(|v| v.as_array()) {
                any_field = true;
                if ports.iter().any(|p| p.as_u64() == Some(port)) {
                    return false;
                }
            }
            if m.get("notPrincipals").is_some() {
                any_field = true;
            }
            any_field
        };
        doc["groups"].as_array().into_iter().flatten().any(|g| {
            g["rules"].as_array().into_iter().flatten().all(|r| {
                r["matches"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(matches_one)
            })
        })
    }

    /// The cases whose output is empty (no port-specific policy) and whose mode is STRICT
    /// (Istio enforces those with its static strict policy, from the input's mode).
    const STRICT_WITHOUT_PORT_POLICY: [&str; 3] = [
        "peer-authn-strict",
        "peer-authn-strict-workload",
        "peer-authn-strict-and-strict-port-mtls",
    ];

    #[test]
    fn peer_authentication_matches_istio_ambient() {
        let dir = std::path::Path::new(FIXTURES).join("ambient-ztunnel");
        let mut cases = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            // (The AuthorizationPolicy cases beside them are authz_tests.rs's.)
            let Some(stem) = name
                .strip_suffix("-in.yaml")
                .filter(|s| s.starts_with("peer-authn"))
            else {
                continue;
            };
            let input = std::fs::read_to_string(&path).unwrap();
            let output = std::fs::read_to_string(dir.join(format!("{stem}.yaml"))).unwrap();
            let t = table(&input);
            for port in [80u16, 8080, 9090] {
                let ours = !t.mode("foo", &app_a(), port).accepts_plaintext();
                // An empty output: nothing port-specific, so the workload's, namespace's
                // or mesh's mode for every port (mesh- and namespace-wide STRICT reach
                // ztunnel as a static policy of their own, not in this file).
                let expected = if output.trim().is_empty() {
                    STRICT_WITHOUT_PORT_POLICY.contains(&stem)
                } else {
                    let doc: serde_json::Value = serde_saphyr::from_str(&output).unwrap();
                    assert_eq!(doc["action"], "DENY", "{name}");
                    converted_denies_plaintext(&doc, port.into())
                };
                assert_eq!(ours, expected, "{name}: port {port}");
            }
            cases += 1;
        }
        assert_eq!(cases, 19);
    }

    #[test]
    fn the_fixture_cases_decide_as_istio_documents() {
        let dir = std::path::Path::new(FIXTURES).join("ambient-ztunnel");
        let read = |n: &str| table(&std::fs::read_to_string(dir.join(n)).unwrap());
        // Mesh STRICT, workload port 9090 PERMISSIVE: plaintext only to 9090.
        let t = read("peer-authn-strict-root-permissive-workload-in.yaml");
        assert_eq!(t.mode("foo", &app_a(), 9090), EffectiveMode::Permissive);
        assert_eq!(t.mode("foo", &app_a(), 8080), EffectiveMode::Strict);
        // Another workload of foo is not selected: the mesh's STRICT.
        assert_eq!(t.mode("foo", &Labels::new(), 9090), EffectiveMode::Strict);
        // Mesh STRICT but namespace PERMISSIVE: the namespace wins; the workload's port
        // 9090 is STRICT again.
        let t = read("peer-authn-strict-root-permissive-namespace-strict-workload-in.yaml");
        assert_eq!(t.mode("foo", &app_a(), 8080), EffectiveMode::Permissive);
        assert_eq!(t.mode("foo", &app_a(), 9090), EffectiveMode::Strict);
        assert_eq!(t.mode("bar", &app_a(), 8080), EffectiveMode::Strict);
        // DISABLE accepts plaintext (HBONE between captured pods stays mutual TLS).
        let t = read("peer-authn-disable-port-mtls-strict-in.yaml");
        assert_eq!(t.mode("foo", &app_a(), 80), EffectiveMode::Disable);
        assert_eq!(t.mode("foo", &app_a(), 9090), EffectiveMode::Strict);
        // Nothing at all: PERMISSIVE, as in Istio.
        assert_eq!(
            PeerAuthentication::default().mode("foo", &app_a(), 80),
            EffectiveMode::Permissive
        );
    }

    #[test]
    fn the_oldest_policy_of_a_scope_wins() {
        let t = table(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: b-newer, namespace: foo, creationTimestamp: '2026-02-01T00:00:00Z'}\nspec: {mtls: {mode: PERMISSIVE}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a-older, namespace: foo, creationTimestamp: '2026-01-01T00:00:00Z'}\nspec: {mtls: {mode: STRICT}}\n",
        );
        assert_eq!(t.mode("foo", &app_a(), 80), EffectiveMode::Strict);
    }

    #[test]
    fn istio_validation_cases_are_rejected_with_istios_reason() {
        let dir = std::path::Path::new(FIXTURES).join("crd-validation");
        let invalid = std::fs::read_to_string(dir.join("peerauth-invalid.yaml")).unwrap();
        let mut checked = 0;
        for doc in invalid.split("\n---\n") {
            let expected: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
            let expected = expected["_err"].as_str().unwrap().to_string();
            let body: String = doc
                .lines()
                .filter(|l| !l.starts_with("_err:"))
                .collect::<Vec<_>>()
                .join("\n");
            let (objects, mut errors) = objects(&body, "foo");
            build(&objects, "istio-system", &mut errors);
            assert!(!errors.is_empty(), "accepted: {body}");
            let said = errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n");
            // Istio's wording for what its schema rejects differs from a YAML parser's;
            // the reason must be there.
            let key = match expected.as_str() {
                e if e.starts_with("Unsupported value") => "BLAH",
                e if e.starts_with("type conversion error") => "acd",
                e => e,
            };
            assert!(said.contains(key), "{said} does not say {expected:?}");
            checked += 1;
        }
        assert_eq!(checked, 6);
        let valid = std::fs::read_to_string(dir.join("peerauth-valid.yaml")).unwrap();
        let (objects, mut errors) = objects(&valid, "foo");
        build(&objects, "istio-system", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(objects.len(), 2);
    }
}
