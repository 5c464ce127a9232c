//! Workload certificates from Istio's CA API (`--ca istio`), as istiod and istio-csr serve
//! it: one CreateCertificate per workload identity of the node's pods, with the daemon's
//! own service-account token and the identity in `ImpersonatedIdentity`, which the CA
//! grants only to a trusted node account. A CA that is down keeps the certificates already
//! issued serving, and new pods wait in their fail mode until it is back.
use std::time::Duration;

use proxy_tests::{
    daemon::Daemon,
    istio_ca::IstioCa,
    node::{namespace_yaml, pod_yaml_on, Node, SecondNode, FIRST_NODE},
    pki::TestCa,
    servers::Servers,
    wait_for, Pod, Seen,
};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/prod/sa/db";
const NODE_ACCOUNT: &str = "istio-system/proxy-daemon";

struct Mesh {
    node: Node,
    _servers: Servers,
    b: SecondNode,
    web: Pod,
    db: Pod,
    seen: Seen,
    ca: IstioCa,
    yaml: String,
}

fn mesh(tag: &str) -> Mesh {
    let mut node = Node::new(tag);
    let servers = Servers::new();
    let b = node.second_node("node-b");
    let web = node.pod("shop", "web-0");
    let db = node.pod_on(&b, "prod", "db-0");
    let seen = servers.identity(&db.host, 7000);
    let ca = IstioCa::start(TestCa::new("mesh-root"), &[NODE_ACCOUNT]);
    let yaml = namespace_yaml("shop", true, Some("closed"))
        + &namespace_yaml("prod", true, Some("closed"))
        + &pod_yaml_on(&web, &[("app", "web")], FIRST_NODE, "web")
        + &pod_yaml_on(&db, &[("app", "db")], &b.name, "db")
        + "apiVersion: v1
kind: Service
metadata: {name: db, namespace: prod}
spec:
  clusterIP: 198.18.0.250
  selector: {app: db}
  ports: [{name: tcp-ident, port: 7000}]
---
";
    node.write_config("cluster.yaml", &yaml);
    Mesh {
        node,
        _servers: servers,
        b,
        web,
        db,
        seen,
        ca,
        yaml,
    }
}

impl Mesh {
    /// The flags of a daemon using the stand-in CA with a token of `account`.
    fn ca_flags(&self, account: &str, name: &str) -> Vec<String> {
        let dir = &self.node.work_dir;
        let token = dir.join(format!("{name}-token"));
        std::fs::write(&token, self.ca.token_for(account)).unwrap();
        let root = dir.join("istiod-root.pem");
        std::fs::write(&root, &self.ca.serving_root_pem).unwrap();
        vec![
            "--ca".into(),
            "istio".into(),
            "--ca-address".into(),
            self.ca.address(),
            "--ca-root-cert".into(),
            root.display().to_string(),
            "--ca-token-file".into(),
            token.display().to_string(),
        ]
    }

    fn start(&self, flags: Vec<String>) -> Daemon {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Daemon::start(&self.node, &flags)
    }

    fn node_b(&self, account: &str) -> Daemon {
        let mut flags = self.b.daemon_flags();
        flags.extend(self.ca_flags(account, "b"));
        self.start(flags)
    }
}

#[test]
fn workload_certificates_come_from_istios_ca_for_each_identity_of_the_node() {
    let m = mesh("istioca");
    let a = m.start(m.ca_flags(NODE_ACCOUNT, "a"));
    let b = m.node_b(NODE_ACCOUNT);
    a.wait_enrolled(&m.web.uid, Duration::from_secs(10));
    b.wait_enrolled(&m.db.uid, Duration::from_secs(10));
    let out = m.web.pdtool(&["connect", "--to", "198.18.0.250:7000"]);
    assert_eq!(out["result"], "ok", "{out}");
    assert_eq!(m.seen.peers().len(), 1);
    let mtls = [
        ("reporter", "destination"),
        ("source_principal", WEB),
        ("destination_principal", DB),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        wait_for(Duration::from_secs(3), || (b
            .metric_sum("istio_tcp_connections_closed_total", &mtls)
            == 1.0)
            .then_some(()))
        .is_some(),
        "{}",
        b.metrics_text()
    );
    // One call per identity, by the node's account, each asking for its pod's identity
    // with a CSR naming exactly that identity.
    let calls = m.ca.calls();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    let mut asked: Vec<String> = calls
        .iter()
        .map(|c| {
            assert_eq!(c.caller.as_deref(), Some(NODE_ACCOUNT), "{c:?}");
            assert_eq!(c.cluster_id.as_deref(), Some("Kubernetes"), "{c:?}");
            assert_eq!(c.grpc_status, 0, "{c:?}");
            assert_eq!(c.csr_uris, vec![c.impersonated.clone().unwrap()], "{c:?}");
            c.impersonated.clone().unwrap()
        })
        .collect();
    asked.sort();
    assert_eq!(asked, vec![DB.to_string(), WEB.to_string()]);
    for d in [&a, &b] {
        assert_eq!(
            d.metric_sum("proxy_daemon_workload_certificates_issued_total", &[]),
            1.0
        );
    }
}

#[test]
fn a_node_account_the_ca_does_not_trust_gets_no_certificate_and_its_pods_wait() {
    let m = mesh("istiocadeny");
    // Node A's token is a workload's, not a trusted node account's.
    let flags = m.ca_flags("shop/web-impostor", "a");
    let a = Daemon::spawn(
        &m.node,
        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let refused = wait_for(Duration::from_secs(10), || {
        let calls = m.ca.calls();
        calls.iter().find(|c| c.grpc_status == 7).cloned()
    })
    .expect("the CA refuses the impersonation");
    assert_eq!(refused.impersonated.as_deref(), Some(WEB));
    wait_for(Duration::from_secs(5), || a.readiness()).expect("the admin port answers");
    assert!(
        wait_for(Duration::from_secs(5), || (a.metric_sum(
            "proxy_daemon_workload_certificates_failed_total",
            &[]
        ) >= 1.0)
            .then_some(()))
        .is_some(),
        "{}",
        a.metrics_text()
    );
    // The pod waits in its fail mode (closed: refused), and readiness says why.
    let state = a.workload_state(&m.web.uid).expect("web's state");
    assert!(
        state["state"]
            .as_str()
            .unwrap_or("")
            .contains("certificate"),
        "{state}"
    );
    let out = m.web.pdtool(&["connect", "--to", "198.18.0.250:7000"]);
    assert_eq!(out["result"], "eperm", "{out}");
    assert!(a.readiness().is_some_and(|(code, _)| code == 503));
    assert!(
        a.log_text().contains("not a trusted node account"),
        "{}",
        a.log_text()
    );
}

#[test]
fn with_the_ca_down_issued_certificates_keep_serving_and_new_pods_wait_for_it() {
    let mut m = mesh("istiocadown");
    let a = m.start(m.ca_flags(NODE_ACCOUNT, "a"));
    let b = m.node_b(NODE_ACCOUNT);
    a.wait_enrolled(&m.web.uid, Duration::from_secs(10));
    b.wait_enrolled(&m.db.uid, Duration::from_secs(10));
    m.ca.set_available(false);
    // What is enrolled keeps working: its certificates are held.
    let out = m.web.pdtool(&["connect", "--to", "198.18.0.250:7000"]);
    assert_eq!(out["result"], "ok", "{out}");
    // A new pod of a new identity cannot get one: it waits, fail-closed, and says so.
    let api = m.node.pod("shop", "api-0");
    let yaml = m.yaml.clone() + &pod_yaml_on(&api, &[("app", "api")], FIRST_NODE, "api");
    m.node.write_config("cluster.yaml", &yaml);
    let waiting = wait_for(Duration::from_secs(10), || {
        a.workload_state(&api.uid)
            .filter(|s| s["state"].as_str().unwrap_or("").contains("certificate"))
    })
    .expect("the new pod waits for its certificate");
    assert!(
        waiting["kernel_entry"]
            .as_str()
            .unwrap_or("")
            .contains("fail mode"),
        "{waiting}"
    );
    let out = api.pdtool(&["connect", "--to", "198.18.0.250:7000"]);
    assert_eq!(out["result"], "eperm", "fail-closed while waiting: {out}");
    assert!(a.readiness().is_some_and(|(code, _)| code == 503));
    assert!(a.metric_sum("proxy_daemon_workload_certificates_failed_total", &[]) >= 1.0);
    // The CA back: the pod is enrolled without anyone's help.
    m.ca.set_available(true);
    a.wait_enrolled(&api.uid, Duration::from_secs(15));
    let out = api.pdtool(&["connect", "--to", "198.18.0.250:7000"]);
    assert_eq!(out["result"], "ok", "{out}");
    assert!(a.readiness().is_some_and(|(code, _)| code == 200));
}

/// The stand-in speaks gRPC as gRPC itself does: Istio's published ca.proto compiled with
/// grpcio-tools, called with gRPC's Python client, gets a chain for the identity it asks.
#[test]
fn the_stand_in_ca_answers_grpcs_own_python_client_with_istios_proto() {
    let ca = IstioCa::start(TestCa::new("mesh-root"), &[NODE_ACCOUNT]);
    let dir = std::env::temp_dir().join(format!("pdt-grpc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/istio-ca");
    let python = proxy_tests::venv_tool("python");
    let out = std::process::Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto_dir)
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .arg("ca.proto")
        .output()
        .expect("grpc_tools.protoc (installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = dir.join("root.pem");
    std::fs::write(&root, &ca.serving_root_pem).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(WEB).unwrap(),
    )];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let script = format!(
        r#"
import sys, grpc
sys.path.insert(0, {dir:?})
import ca_pb2, ca_pb2_grpc
from google.protobuf import struct_pb2
creds = grpc.ssl_channel_credentials(open({root:?}, 'rb').read())
channel = grpc.secure_channel('localhost:{port}', creds)
stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
md = struct_pb2.Struct()
md.update({{'ImpersonatedIdentity': {web:?}}})
req = ca_pb2.IstioCertificateRequest(csr={csr:?}, validity_duration=3600, metadata=md)
resp = stub.CreateCertificate(req, metadata=[('authorization', 'Bearer {token}')], timeout=10)
print(len(resp.cert_chain))
print(resp.cert_chain[0])
try:
    stub.CreateCertificate(req, timeout=10)
    print('UNEXPECTED')
except grpc.RpcError as e:
    print(e.code().name)
"#,
        dir = dir.display().to_string(),
        root = root.display().to_string(),
        port = ca.addr.port(),
        web = WEB,
        token = ca.token_for(NODE_ACCOUNT),
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("2"), "leaf and root: {stdout}");
    let leaf: String = lines
        .by_ref()
        .take_while(|l| !l.starts_with("UNAUTHENTICATED") && !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(leaf.as_bytes())
        .map(|d: rustls::pki_types::CertificateDer| d.to_vec())
        .expect("a PEM leaf");
    assert_eq!(
        proxy_daemon::identity::identities_of(&der)
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>(),
        vec![WEB.to_string()]
    );
    assert!(
        stdout.trim_end().ends_with("UNAUTHENTICATED"),
        "no token: {stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
