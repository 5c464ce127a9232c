//! Egress: ServiceEntry names resolved by DNS (against a DNS server the test runs on the
//! node's loopback), TLS origination from DestinationRule `tls` with a CA made in the test,
//! and apps' own TLS passing through, routed and labelled by SNI.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use proxy_tests::{
    daemon::Daemon,
    node::{namespace_yaml, pod_yaml, Node},
    pki::{self, TestCa},
    servers::{DnsAnswers, HttpEcho, HttpsEcho, Servers},
    wait_for, Host, Pod,
};

fn seed(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/seed-examples")
            .join(name),
    )
    .expect("seed example")
}

/// A node with one client pod in captured namespace `azar` and a test DNS server.
struct Egress {
    node: Node,
    servers: Servers,
    pod: Pod,
    answers: DnsAnswers,
    dns: std::net::SocketAddr,
    pki: PathBuf,
}

impl Egress {
    fn new(tag: &str) -> Self {
        let mut node = Node::new(tag);
        let servers = Servers::new();
        let pod = node.pod("azar", "client-1");
        let answers = DnsAnswers::default();
        let (dns, _) = servers.dns(answers.clone());
        let pki = node.work_dir.join("pki");
        node.write_config(
            "cluster.yaml",
            &(namespace_yaml("azar", true, None) + &pod_yaml(&pod, &[("app", "client")])),
        );
        Self {
            node,
            servers,
            pod,
            answers,
            dns,
            pki,
        }
    }

    fn answer(&self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        self.answers
            .lock()
            .unwrap()
            .insert(name.into(), (ips.to_vec(), ttl));
    }

    fn start(&self, extra: &[&str]) -> Daemon {
        let dns = self.dns.to_string();
        let mut args = vec!["--dns-server", dns.as_str()];
        args.extend_from_slice(extra);
        let d = Daemon::start(&self.node, &args);
        d.wait_enrolled(&self.pod.uid, Duration::from_secs(5));
        d
    }

    /// An "external" host serving HTTPS on 443 (certificate from `ca` for `names`) and, on
    /// 80, plain HTTP that answers as a different server.
    fn external(
        &mut self,
        name: &str,
        ca: &TestCa,
        names: &[&str],
        client_ca: Option<&TestCa>,
    ) -> Host {
        let host = self.node.host(name);
        let leaf = ca.server(names, false);
        self.servers.https_echo(
            &host,
            443,
            HttpsEcho {
                name: "httpbin-tls",
                cert_pem: leaf.cert_pem,
                key_pem: leaf.key_pem,
                client_ca_pem: client_ca.map(|c| c.cert_pem.clone()),
                h2: false,
            },
        );
        self.servers.http_echo(
            &host,
            80,
            HttpEcho {
                name: "httpbin-plain".into(),
                ..Default::default()
            },
        );
        host
    }

    /// Hosts answering plain HTTP on :80 with their own name.
    fn echo_hosts(&mut self, names: &[&str]) -> Vec<Host> {
        names
            .iter()
            .map(|n| {
                let h = self.node.host(n);
                self.servers.http_echo(
                    &h,
                    80,
                    HttpEcho {
                        name: n.to_string(),
                        ..Default::default()
                    },
                );
                h
            })
            .collect()
    }

    fn get(&self, to: &str, host: &str, path: &str) -> serde_json::Value {
        self.pod
            .pdtool(&["http", "--to", to, "--host", host, "--path", path])
    }
}

/// The published example, unchanged but for trusting the test's CA.
fn seed_with_ca(ca_file: &Path) -> String {
    let text = seed("serviceentry-tls-origination.yaml");
    let patched = text.replace(
        "          mode: SIMPLE",
        &format!(
            "          mode: SIMPLE\n          caCertificates: {}",
            ca_file.display()
        ),
    );
    assert_ne!(
        text, patched,
        "the seed still originates SIMPLE TLS on port 80"
    );
    patched
}

#[test]
fn serviceentry_tls_origination_sends_the_apps_http_out_as_https() {
    let mut e = Egress::new("egtls");
    let ca = TestCa::new("test-ca");
    let httpbin = e.external("httpbin", &ca, &["httpbin.org"], None);
    e.answer("httpbin.org", &[httpbin.ip], 30);
    let ca_file = pki::write(&e.pki, "ca.pem", &ca.cert_pem);
    e.node
        .write_config("serviceentry-tls-origination.yaml", &seed_with_ca(&ca_file));
    let daemon = e.start(&[]);

    // The app speaks plain HTTP to httpbin.org:80 ...
    let out = e.pod.pdtool(&[
        "http",
        "--to",
        &httpbin.addr(80).to_string(),
        "--host",
        "httpbin.org",
        "--path",
        "/status/200",
        "--count",
        "5",
    ]);
    assert_eq!(out["statuses"]["200"], 5, "{out}");
    let body = &out["first"]["body"];
    // ... and it leaves the node as HTTPS to :443, SNI httpbin.org, verified against the CA.
    assert_eq!(
        body["server"], "httpbin-tls",
        "reached the TLS listener: {out}"
    );
    assert_eq!(body["tls"], true);
    assert_eq!(body["sni"], "httpbin.org");
    assert_eq!(body["alpn"], "http/1.1");
    assert_eq!(body["path"], "/status/200");
    assert_eq!(
        body["peer"],
        e.pod.host.ip.to_string(),
        "from the pod's own address"
    );
    assert_eq!(
        daemon.metric_sum(
            "istio_requests_total",
            &[
                ("destination_service", "httpbin.org"),
                ("destination_service_name", "httpbin.org"),
                ("response_code", "200")
            ]
        ),
        5.0
    );
    // One keep-alive client connection: one handshake, reused for all five requests.
    assert_eq!(
        daemon.metric_sum("proxy_daemon_upstream_tls_handshakes_total", &[]),
        1.0,
        "{}",
        daemon.metrics_text()
    );
    // Concurrent clients need more upstream connections; their handshakes resume the
    // first session instead of starting over.
    let again = e.pod.pdtool(&[
        "http",
        "--to",
        &httpbin.addr(80).to_string(),
        "--host",
        "httpbin.org",
        "--count",
        "20",
        "--parallel",
        "4",
    ]);
    assert_eq!(again["statuses"]["200"], 80, "{again}");
    let resumed = daemon.metric_sum(
        "proxy_daemon_upstream_tls_handshakes_total",
        &[("result", "resumed")],
    );
    // (TLS 1.3 tickets are single-use, so a burst may still need a second full one.)
    assert!(resumed >= 1.0, "{}", daemon.metrics_text());

    // The app's own HTTPS to httpbin.org:443 is not terminated: the app sees the real
    // server certificate (it verifies it against the CA), and the connection is reported
    // by SNI on the TCP metrics.
    let own = e.pod.pdtool(&[
        "https",
        "--to",
        &httpbin.addr(443).to_string(),
        "--sni",
        "httpbin.org",
        "--ca",
        ca_file.to_str().unwrap(),
        "--path",
        "/own",
    ]);
    assert_eq!(own["result"], "ok", "{own}");
    assert_eq!(own["status"], 200, "{own}");
    assert_eq!(own["body"]["sni"], "httpbin.org");
    assert_eq!(own["body"]["path"], "/own");
    assert!(
        wait_for(Duration::from_secs(3), || (daemon.metric_sum(
            "istio_tcp_connections_closed_total",
            &[("destination_service", "httpbin.org")]
        ) >= 1.0)
            .then_some(()))
        .is_some(),
        "{}",
        daemon.metrics_text()
    );
    assert_eq!(
        daemon.metric_sum(
            "istio_tcp_connections_opened_total",
            &[
                ("destination_service", "httpbin.org"),
                ("destination_service_name", "httpbin.org")
            ]
        ),
        1.0
    );
    let dump = daemon.config_dump();
    assert_eq!(
        dump["dns"]["httpbin.org"]["addresses"][0],
        httpbin.ip.to_string(),
        "{}",
        dump["dns"]
    );
}

#[test]
fn bad_certificates_fail_visibly_and_fixed_files_are_picked_up_without_restart() {
    let mut e = Egress::new("egbad");
    let ca = TestCa::new("test-ca");
    let other_ca = TestCa::new("someone-else");
    let httpbin = e.external("httpbin", &ca, &["httpbin.org"], None);
    let expired = e.node.host("expired");
    let leaf = ca.server(&["expired.test"], true);
    e.servers.https_echo(
        &expired,
        443,
        HttpsEcho {
            name: "expired",
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            client_ca_pem: None,
            h2: false,
        },
    );
    e.answer("httpbin.org", &[httpbin.ip], 30);
    e.answer("expired.test", &[expired.ip], 30);
    e.answer("san.test", &[httpbin.ip], 30);
    e.answer("san-ok.test", &[httpbin.ip], 30);
    // The CA file starts out holding the wrong CA.
    let ca_file = pki::write(&e.pki, "ca.pem", &other_ca.cert_pem);
    let right_ca = pki::write(&e.pki, "right-ca.pem", &ca.cert_pem);
    e.node
        .write_config("serviceentry-tls-origination.yaml", &seed_with_ca(&ca_file));
    let se_dr = |host: &str, extra: &str| {
        format!(
            "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: {host}, namespace: egress}}
spec:
  hosts: [{host}]
  location: MESH_EXTERNAL
  ports: [{{number: 80, targetPort: 443, name: http, protocol: HTTP}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: {host}, namespace: egress}}
spec:
  host: {host}
  trafficPolicy:
    tls:
      mode: SIMPLE
      caCertificates: {}
{extra}---
",
            right_ca.display()
        )
    };
    e.node.write_config(
        "more.yaml",
        &(se_dr("expired.test", "")
            + &se_dr("san.test", "      subjectAltNames: [not-httpbin.example]\n")
            + &se_dr("san-ok.test", "      subjectAltNames: [httpbin.org]\n")),
    );
    let daemon = e.start(&[]);
    let to = httpbin.addr(80).to_string();

    let out = e.get(&to, "httpbin.org", "/status/200");
    assert_eq!(out["first"]["status"], 503, "untrusted CA: {out}");
    let flags_of = |host: &str| {
        daemon
            .metrics_text()
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("destination_service=\"{host}\""))
                    && l.contains("response_code=\"503\"")
            })
            .filter_map(|l| {
                l.split("response_flags=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .map(str::to_string)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        flags_of("httpbin.org"),
        ["UF,URX"],
        "connect failure, retries exhausted"
    );
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("upstream TLS handshake failed"))
        .unwrap_or_else(|| panic!("no log line naming the failure: {log}"));
    assert!(
        line.contains("httpbin.org") && line.contains("UnknownIssuer"),
        "host, SNI and reason: {line}"
    );

    // Expired certificate, and a certificate without the required SAN: same visibility.
    let out = e.get(&expired.addr(80).to_string(), "expired.test", "/");
    assert_eq!(out["first"]["status"], 503, "expired: {out}");
    assert!(
        daemon.log_text().contains("certificate expired"),
        "reason names expiry"
    );
    assert_eq!(flags_of("expired.test"), ["UF,URX"]);
    let out = e.get(&to, "san.test", "/");
    assert_eq!(out["first"]["status"], 503, "SAN mismatch: {out}");
    assert!(
        daemon
            .log_text()
            .contains("certificate not valid for name \"not-httpbin.example\""),
        "reason names the SAN"
    );
    // subjectAltNames replace the SNI as the name the certificate must carry.
    let out = e.get(&to, "san-ok.test", "/");
    assert_eq!(out["first"]["status"], 200, "SAN listed: {out}");
    assert_eq!(out["first"]["body"]["sni"], "san-ok.test");

    // The operator fixes the CA file in place: the next requests succeed, no restart.
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let fixed = wait_for(Duration::from_secs(5), || {
        let out = e.get(&to, "httpbin.org", "/status/200");
        (out["first"]["status"] == 200).then_some(out)
    })
    .expect("the corrected CA file is used without a restart");
    assert_eq!(fixed["first"]["body"]["sni"], "httpbin.org");
    assert!(
        daemon.metric_sum(
            "proxy_daemon_upstream_tls_handshakes_total",
            &[("result", "failed")]
        ) >= 9.0,
        "three failing requests, three attempts each"
    );
}

#[test]
fn mutual_tls_presents_the_client_certificate_from_files_or_a_credential() {
    let mut e = Egress::new("egmtls");
    let ca = TestCa::new("test-ca");
    let client_ca = TestCa::new("client-ca");
    let names = ["mtls.test", "cred.test", "nocert.test"];
    let server = e.external("mtls", &ca, &names, Some(&client_ca));
    for n in names {
        e.answer(n, &[server.ip], 30);
    }
    let ca_file = pki::write(&e.pki, "ca.pem", &ca.cert_pem);
    let client = client_ca.client("client.azar");
    let cert_file = pki::write(&e.pki, "client.pem", &client.cert_pem);
    let key_file = pki::write(&e.pki, "client-key.pem", &client.key_pem);
    // credentialName: a directory laid out like a kubernetes.io/tls Secret.
    let creds = e.node.work_dir.join("credentials");
    pki::write(&creds.join("mtls-client"), "tls.crt", &client.cert_pem);
    pki::write(&creds.join("mtls-client"), "tls.key", &client.key_pem);
    pki::write(&creds.join("mtls-client"), "ca.crt", &ca.cert_pem);
    let mut yaml = String::new();
    for (host, tls) in [
        (
            "mtls.test",
            format!(
                "mode: MUTUAL, clientCertificate: {}, privateKey: {}, caCertificates: {}",
                cert_file.display(),
                key_file.display(),
                ca_file.display()
            ),
        ),
        (
            "cred.test",
            "mode: MUTUAL, credentialName: mtls-client".to_string(),
        ),
        (
            "nocert.test",
            format!("mode: SIMPLE, caCertificates: {}", ca_file.display()),
        ),
    ] {
        yaml += &format!(
            "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: {host}, namespace: egress}}
spec:
  hosts: [{host}]
  ports: [{{number: 80, targetPort: 443, name: http, protocol: HTTP}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: {host}, namespace: egress}}
spec:
  host: {host}
  trafficPolicy:
    tls: {{{tls}}}
---
"
        );
    }
    e.node.write_config("mtls.yaml", &yaml);
    let daemon = e.start(&["--credentials-dir", creds.to_str().unwrap()]);
    let to = server.addr(80).to_string();
    for host in ["mtls.test", "cred.test"] {
        let out = e.get(&to, host, "/");
        assert_eq!(out["first"]["status"], 200, "{host}: {out}");
        assert_eq!(out["first"]["body"]["client_cert"], true, "{host}: {out}");
        assert_eq!(out["first"]["body"]["sni"], host);
    }
    let out = e.get(&to, "nocert.test", "/");
    assert_eq!(
        out["first"]["status"], 503,
        "a server that requires a client certificate refuses one without: {out}"
    );
    assert!(
        daemon.metric_sum(
            "istio_requests_total",
            &[
                ("destination_service", "nocert.test"),
                ("response_code", "503"),
                ("response_flags", "UF,URX")
            ]
        ) == 1.0,
        "{}",
        daemon.metrics_text()
    );
}

#[test]
fn dns_resolution_uses_every_address_and_follows_a_changed_answer() {
    let mut e = Egress::new("egdns");
    let hosts = e.echo_hosts(&["dns-a", "dns-b", "dns-c"]);
    e.answer("api.dns.test", &[hosts[0].ip, hosts[1].ip], 1);
    e.answer("rr.dns.test", &[hosts[1].ip, hosts[0].ip], 30);
    e.node.write_config(
        "se.yaml",
        "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: api-dns, namespace: egress}
spec:
  hosts: [api.dns.test]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: rr-dns, namespace: egress}
spec:
  hosts: [rr.dns.test]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS_ROUND_ROBIN
",
    );
    let daemon = e.start(&[]);
    // The app dialled one address; the proxy balances over every address of the answer.
    let to = hosts[0].addr(80).to_string();
    let out = e.pod.pdtool(&[
        "http",
        "--to",
        &to,
        "--host",
        "api.dns.test",
        "--count",
        "40",
    ]);
    assert_eq!(out["statuses"]["200"], 40, "{out}");
    assert!(
        out["servers"]["dns-a"].as_u64().unwrap_or(0) >= 10
            && out["servers"]["dns-b"].as_u64().unwrap_or(0) >= 10,
        "both addresses used: {out}"
    );
    assert!(out["servers"].get("dns-c").is_none(), "{out}");
    // DNS_ROUND_ROBIN (Envoy's LOGICAL_DNS): the first address of the answer only.
    let rr = e.pod.pdtool(&[
        "http",
        "--to",
        &to,
        "--host",
        "rr.dns.test",
        "--count",
        "20",
    ]);
    assert_eq!(rr["servers"]["dns-b"], 20, "{rr}");
    assert_eq!(
        daemon.metric_sum(
            "istio_requests_total",
            &[
                ("destination_service", "api.dns.test"),
                ("response_code", "200")
            ]
        ),
        40.0
    );

    // The answer changes; within the TTL (1 s) plus one refresh, traffic follows it.
    let changed = std::time::Instant::now();
    e.answer("api.dns.test", &[hosts[2].ip], 1);
    let moved = wait_for(Duration::from_secs(5), || {
        let out = e.pod.pdtool(&[
            "http",
            "--to",
            &to,
            "--host",
            "api.dns.test",
            "--count",
            "10",
        ]);
        (out["servers"]["dns-c"] == 10).then_some(())
    });
    assert!(moved.is_some(), "traffic never moved to the new answer");
    assert!(
        changed.elapsed() < Duration::from_secs(4),
        "moved after {:?}",
        changed.elapsed()
    );
}

#[test]
fn a_hosts_file_answers_names_and_is_reread() {
    let mut e = Egress::new("eghosts");
    let hosts = e.echo_hosts(&["file-a", "file-b", "dialled"]);
    let file = e.node.work_dir.join("hosts");
    std::fs::write(&file, format!("# test names\n{} files.test\n", hosts[0].ip)).unwrap();
    e.node.write_config(
        "se.yaml",
        "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: files, namespace: egress}
spec:
  hosts: [files.test]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: unresolved, namespace: egress}
spec:
  hosts: [unresolved.test]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
",
    );
    let daemon = e.start(&["--hosts-file", file.to_str().unwrap()]);
    // The app dialled a third address; the proxy sends the request where the file says.
    let to = hosts[2].addr(80).to_string();
    let out = e.get(&to, "files.test", "/");
    assert_eq!(out["first"]["body"]["server"], "file-a", "{out}");
    assert_eq!(
        daemon.config_dump()["dns"]["files.test"]["source"],
        "hosts-file"
    );
    // A name neither the file nor the DNS server knows (NXDOMAIN): the app resolved it
    // itself, so the address it dialled is used, and the failure shows in /config_dump.
    let out = e.get(&to, "unresolved.test", "/");
    assert_eq!(out["first"]["body"]["server"], "dialled", "{out}");
    assert!(daemon.config_dump()["dns"]["unresolved.test"]["last_error"].is_string());
    std::fs::write(&file, format!("{} files.test\n", hosts[1].ip)).unwrap();
    let moved = wait_for(Duration::from_secs(8), || {
        let out = e.get(&to, "files.test", "/");
        (out["first"]["body"]["server"] == "file-b").then_some(())
    });
    assert!(moved.is_some(), "the re-read file moves traffic");
}

#[test]
fn tls_is_originated_for_tcp_ports_too_but_never_over_the_apps_own_tls() {
    let mut e = Egress::new("egtcptls");
    let ca = TestCa::new("test-ca");
    let db = e.node.host("db");
    let leaf = ca.server(&["db.test"], false);
    e.servers.https_echo(
        &db,
        5432,
        HttpsEcho {
            name: "db-tls",
            cert_pem: leaf.cert_pem.clone(),
            key_pem: leaf.key_pem.clone(),
            client_ca_pem: None,
            h2: false,
        },
    );
    e.servers.https_echo(
        &db,
        443,
        HttpsEcho {
            name: "db-https",
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            client_ca_pem: None,
            h2: false,
        },
    );
    e.answer("db.test", &[db.ip], 30);
    let ca_file = pki::write(&e.pki, "ca.pem", &ca.cert_pem);
    e.node.write_config(
        "db.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: db, namespace: egress}}
spec:
  hosts: [db.test]
  addresses: [{}]
  ports:
  - {{number: 5432, name: tcp-db, protocol: TCP}}
  - {{number: 443, name: tls, protocol: TLS}}
  resolution: DNS
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: db, namespace: egress}}
spec:
  host: db.test
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {}}}
",
            db.ip,
            ca_file.display()
        ),
    );
    let daemon = e.start(&[]);
    // The app writes plain bytes to db.test:5432 (a TCP port: no HTTP parsing); they reach the server inside TLS.
    let out = e.get(&db.addr(5432).to_string(), "db.test", "/query");
    assert_eq!(out["first"]["status"], 200, "{out}");
    let body = &out["first"]["body"];
    assert_eq!(body["server"], "db-tls");
    assert_eq!(body["tls"], true);
    assert_eq!(body["sni"], "db.test");
    assert!(body["alpn"].is_null(), "no ALPN on an opaque port: {body}");
    // The app's own TLS to :443 (same DestinationRule) is passed through, not wrapped again.
    let own = e.pod.pdtool(&[
        "https",
        "--to",
        &db.addr(443).to_string(),
        "--sni",
        "db.test",
        "--ca",
        ca_file.to_str().unwrap(),
    ]);
    assert_eq!(own["status"], 200, "{own}");
    assert_eq!(own["body"]["server"], "db-https");
    assert_eq!(
        daemon.metric_sum(
            "proxy_daemon_upstream_tls_handshakes_total",
            &[("result", "full")]
        ),
        1.0,
        "one origination (5432), none for the app's own TLS"
    );
    assert!(
        wait_for(Duration::from_secs(3), || (daemon.metric_sum(
            "istio_tcp_connections_closed_total",
            &[("destination_service", "db.test")]
        ) == 2.0)
            .then_some(()))
        .is_some(),
        "{}",
        daemon.metrics_text()
    );
}

#[test]
fn resolution_none_honours_target_port_for_tls_origination() {
    // Istio's own TLS-origination docs (1.22+): an app dials port 80 of an address it
    // resolved itself; the entry's targetPort 443 and the rule's TLS send it out as HTTPS.
    let mut e = Egress::new("egnone");
    let ca = TestCa::new("none-ca");
    let api = e.external("api-none", &ca, &["api.none.test"], None);
    let ca_file = pki::write(&e.pki, "ca.pem", &ca.cert_pem);
    e.node.write_config(
        "none.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api-none, namespace: azar}}
spec:
  hosts: [api.none.test]
  location: MESH_EXTERNAL
  ports: [{{number: 80, targetPort: 443, name: http, protocol: HTTP}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api-none, namespace: azar}}
spec:
  host: api.none.test
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {}}}
",
            ca_file.display()
        ),
    );
    let _daemon = e.start(&[]);
    let out = e.get(&api.addr(80).to_string(), "api.none.test", "/get");
    assert_eq!(out["statuses"]["200"], 1, "{out}");
    assert_eq!(out["first"]["body"]["server"], "httpbin-tls", "{out}");
    assert_eq!(out["first"]["body"]["sni"], "api.none.test");
}

#[test]
fn under_registry_only_a_host_or_sni_cannot_open_a_way_to_another_address() {
    // An allowed NONE entry with addresses, and a DNS entry the daemon has no answer for.
    let mut e = Egress::new("egspoof");
    let hosts = e.echo_hosts(&["allowed", "attacker"]);
    let (allowed, attacker) = (&hosts[0], &hosts[1]);
    e.node.write_config(
        "entries.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: allowed, namespace: azar}}
spec:
  hosts: [allowed.test]
  addresses: [{}/32]
  ports: [{{number: 80, name: http, protocol: HTTP}}, {{number: 443, name: tls, protocol: TLS}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: unanswered, namespace: azar}}
spec:
  hosts: [unanswered.test]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: DNS
",
            allowed.ip
        ),
    );
    let daemon = e.start(&["--outbound-traffic-policy", "registry-only"]);
    // The entry's own address works ...
    let ok = e.get(&allowed.addr(80).to_string(), "allowed.test", "/");
    assert_eq!(ok["first"]["body"]["server"], "allowed", "{ok}");
    // ... a Host naming it, sent elsewhere, is the BlackHole ...
    for host in ["allowed.test", "unanswered.test"] {
        let spoof = e.get(&attacker.addr(80).to_string(), host, "/");
        assert_eq!(spoof["first"]["status"], 502, "{host}: {spoof}");
        assert!(spoof["first"]["body"]["server"].is_null(), "{spoof}");
    }
    // ... and so is an SNI naming it (the app's own TLS, routed by SNI): the attacker's
    // server greets whoever reaches it, and nobody does.
    e.servers.banner(attacker, 443, "attacker-greeting\n");
    let hello = e.pod.pdtool(&[
        "tls-hello",
        "--to",
        &attacker.addr(443).to_string(),
        "--sni",
        "allowed.test",
    ]);
    assert_ne!(hello["reply"], "attacker-greeting", "{hello}");
    let fair = e.pod.pdtool(&[
        "tls-hello",
        "--to",
        &attacker.addr(443).to_string(),
        "--sni",
        "attacker.test",
    ]);
    assert_ne!(
        fair["reply"], "attacker-greeting",
        "unknown SNI under registry-only: {fair}"
    );
    assert!(
        daemon.metric_sum(
            "istio_requests_total",
            &[("destination_service_name", "BlackHoleCluster")]
        ) >= 2.0,
        "{}",
        daemon.metrics_text()
    );
}

#[test]
fn spiffe_subject_alt_names_are_checked_not_dropped() {
    let mut e = Egress::new("egspiffe");
    let ca = TestCa::new("mesh-ca");
    let identity = "spiffe://cluster.local/ns/payments/sa/api";
    let host = e.node.host("payments");
    let leaf = ca.server_uri(identity);
    e.servers.https_echo(
        &host,
        443,
        HttpsEcho {
            name: "payments-tls",
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            client_ca_pem: None,
            h2: false,
        },
    );
    let ca_file = pki::write(&e.pki, "ca.pem", &ca.cert_pem);
    let entry = |name: &str, san: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: azar}}
spec:
  hosts: [{name}.payments.test]
  ports: [{{number: 80, targetPort: 443, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: azar}}
spec:
  host: {name}.payments.test
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {ca}, subjectAltNames: [\"{san}\"]}}
---
",
            ip = host.ip,
            ca = ca_file.display()
        )
    };
    e.node.write_config(
        "spiffe.yaml",
        &(entry("right", identity)
            + &entry("wrong", "spiffe://cluster.local/ns/payments/sa/other")),
    );
    let daemon = e.start(&[]);
    let right = e.get(&host.addr(80).to_string(), "right.payments.test", "/");
    assert_eq!(
        right["statuses"]["200"], 1,
        "the SPIFFE ID matches: {right}"
    );
    assert_eq!(right["first"]["body"]["server"], "payments-tls");
    let wrong = e.get(&host.addr(80).to_string(), "wrong.payments.test", "/");
    assert_eq!(
        wrong["first"]["status"], 503,
        "another identity is refused: {wrong}"
    );
    assert!(
        daemon.metric_sum("istio_requests_total", &[("response_flags", "UF,URX")]) >= 1.0,
        "{}",
        daemon.metrics_text()
    );
}

/// `insecureSkipVerify: true` originates TLS to a server whose certificate nothing vouches
/// for (Istio's escape hatch); without it the same server is refused (503 UF). And with
/// `--tls-session-cache 0` every connection makes a full handshake (no resumption).
#[test]
fn insecure_skip_verify_and_a_zero_session_cache_do_what_they_say() {
    let mut e = Egress::new("egskip");
    let ca = TestCa::new("unknown-ca");
    let api = e.external("api-skip", &ca, &["api.skip.test"], None);
    let rules = |skip: bool| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api-skip, namespace: azar}}
spec:
  hosts: [api.skip.test]
  location: MESH_EXTERNAL
  ports: [{{number: 80, targetPort: 443, name: http, protocol: HTTP}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api-skip, namespace: azar}}
spec:
  host: api.skip.test
  trafficPolicy:
    tls: {{mode: SIMPLE{}}}
",
            if skip {
                ", insecureSkipVerify: true"
            } else {
                ""
            }
        )
    };
    e.node.write_config("skip.yaml", &rules(false));
    let daemon = e.start(&["--tls-session-cache", "0"]);
    let to = api.addr(80).to_string();
    let out = e.get(&to, "api.skip.test", "/get");
    assert_eq!(out["statuses"]["503"], 1, "not vouched for: refused: {out}");
    e.node.write_config("skip.yaml", &rules(true));
    let ok = wait_for(Duration::from_secs(5), || {
        let out = e.get(&to, "api.skip.test", "/get");
        (out["statuses"]["200"] == 1).then_some(out)
    })
    .expect("insecureSkipVerify lets it through");
    assert_eq!(ok["first"]["body"]["server"], "httpbin-tls", "{ok}");
    // Parallel clients may need several upstream connections: none resumes.
    let out = e.pod.pdtool(&[
        "http",
        "--to",
        &to,
        "--host",
        "api.skip.test",
        "--parallel",
        "4",
        "--count",
        "5",
    ]);
    assert_eq!(out["statuses"]["200"], 20, "{out}");
    assert_eq!(
        daemon.metric_sum(
            "proxy_daemon_upstream_tls_handshakes_total",
            &[("result", "resumed")]
        ),
        0.0,
        "no resumption with a zero session cache"
    );
    // At least two upstream connections were made (the refused one and the first that
    // passed; parallel clients usually add more, but overlap is timing), every one a full
    // handshake.
    assert!(
        daemon.metric_sum(
            "proxy_daemon_upstream_tls_handshakes_total",
            &[("result", "full")]
        ) >= 2.0
    );
}

/// ALPN follows the upstream protocol when TLS is originated: a port-80 HTTP/1.1 app whose
/// DestinationRule asks `h2UpgradePolicy: UPGRADE` reaches the external HTTPS server over
/// h2 (ALPN `h2`); without it, the same server (which offers both) is asked for
/// `http/1.1`.
#[test]
fn originated_tls_offers_h2_by_alpn_when_the_request_goes_upstream_over_h2() {
    let mut e = Egress::new("egalpn");
    let ca = TestCa::new("test-ca");
    let api = e.node.host("api");
    let leaf = ca.server(&["api.example.com"], false);
    e.servers.https_echo(
        &api,
        443,
        HttpsEcho {
            name: "api-tls",
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            client_ca_pem: None,
            h2: true,
        },
    );
    e.answer("api.example.com", &[api.ip], 30);
    let ca_file = pki::write(&e.pki, "ca.pem", &ca.cert_pem);
    let config = |pool: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: azar}}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  ports: [{{number: 80, targetPort: 443, name: http, protocol: HTTP}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: azar}}
spec:
  host: api.example.com
  trafficPolicy:
    {pool}
    tls: {{mode: SIMPLE, caCertificates: {ca}}}
",
            ca = ca_file.display()
        )
    };
    e.node.write_config("api.yaml", &config(""));
    let daemon = e.start(&[]);
    let to = api.addr(80).to_string();
    let out = e.get(&to, "api.example.com", "/v1/items");
    assert_eq!(out["statuses"]["200"], 1, "{out}");
    let body = &out["first"]["body"];
    assert_eq!(body["alpn"], "http/1.1", "{out}");
    assert_eq!(body["proto"], "HTTP/1.1", "{out}");
    let before = daemon.config_dump()["config"]["generation"]
        .as_u64()
        .unwrap_or(0);
    e.node.write_config(
        "api.yaml",
        &config("connectionPool: {http: {h2UpgradePolicy: UPGRADE}}"),
    );
    wait_for(Duration::from_secs(5), || {
        (daemon.config_dump()["config"]["generation"]
            .as_u64()
            .unwrap_or(0)
            > before)
            .then_some(())
    })
    .expect("reloaded");
    let out = e.get(&to, "api.example.com", "/v1/items");
    assert_eq!(out["statuses"]["200"], 1, "{out}");
    let body = &out["first"]["body"];
    assert_eq!(
        body["alpn"], "h2",
        "ALPN follows the upstream protocol: {out}"
    );
    assert_eq!(body["proto"], "HTTP/2.0", "{out}");
    assert_eq!(body["host"], "api.example.com", ":authority kept: {out}");
    assert_eq!(body["path"], "/v1/items", "{out}");
    assert_eq!(body["sni"], "api.example.com", "{out}");
}

/// DestinationRule `tls.sni` replaces the SNI sent when TLS is originated (default: the
/// destination's host name).
#[test]
fn originated_tls_sends_the_sni_the_rule_names() {
    let mut e = Egress::new("egsni");
    let ca = TestCa::new("test-ca");
    let httpbin = e.external("httpbin", &ca, &["httpbin.org", "edge.httpbin.org"], None);
    e.answer("httpbin.org", &[httpbin.ip], 30);
    let ca_file = pki::write(&e.pki, "ca.pem", &ca.cert_pem);
    let config = seed_with_ca(&ca_file).replace(
        "          mode: SIMPLE\n",
        "          mode: SIMPLE\n          sni: edge.httpbin.org\n",
    );
    assert!(config.contains("sni: edge.httpbin.org"));
    e.node
        .write_config("serviceentry-tls-origination.yaml", &config);
    let _daemon = e.start(&[]);
    let out = e.get(&httpbin.addr(80).to_string(), "httpbin.org", "/");
    assert_eq!(out["statuses"]["200"], 1, "{out}");
    assert_eq!(out["first"]["body"]["sni"], "edge.httpbin.org", "{out}");
    assert_eq!(
        out["first"]["body"]["host"], "httpbin.org",
        "the Host is the app's: {out}"
    );
}
