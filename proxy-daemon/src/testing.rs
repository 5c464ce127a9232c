//! The data path in-process, for tests without root: the real proxy (sniffing, routing,
//! load balancing, retries, mirroring, TLS origination, metrics, access log) fed by a
//! snapshot compiled from YAML, behind a loopback listener that stands in for a pod's.
//! Capture's two seams are replaced: upstream sockets are plain sockets of the test's own
//! network namespace ([`LocalSockets`]), and original destinations come from a table the
//! test fills as it connects ([`OrigDsts`]). What only the kernel can show (capture,
//! enrolment, source IPs, fail modes) stays in the netns suite.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpStream, task::JoinHandle};

use crate::{
    config::local,
    metrics::Metrics,
    proxy::{
        self, dns::DnsCache, http::UpstreamPool, tls::Originator, Endpoints, OrigDstLookup,
        OutboundPolicy, PodContext, ProxyInputs, SocketFactory,
    },
    state::{self, workload::SourceLabels, CaptureSettings, Published},
};
use proxy_common::{ClientKey, FailMode, OrigDst};

/// Upstream sockets of the test's own network namespace.
pub struct LocalSockets;

impl SocketFactory for LocalSockets {
    fn tcp_socket(
        &self,
        domain: Domain,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<OwnedFd>> + Send + '_>>
    {
        Box::pin(async move {
            let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
            s.set_nonblocking(true)?;
            s.set_tcp_nodelay(true)?;
            Ok(s.into())
        })
    }
}

/// Original destinations by client port, as the eBPF maps would hold them.
#[derive(Clone, Default)]
pub struct OrigDsts(Arc<Mutex<HashMap<u16, OrigDst>>>);

impl OrigDsts {
    pub fn insert(&self, client_port: u16, dst: SocketAddrV4) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(
            client_port,
            OrigDst {
                netns_cookie: 0,
                cgroup_id: 0,
                ip4_be: u32::from(*dst.ip()).to_be(),
                port: dst.port(),
                _pad: 0,
            },
        );
    }
}

impl OrigDstLookup for OrigDsts {
    fn lookup(&self, key: &ClientKey, _socket: std::os::fd::BorrowedFd<'_>) -> Option<OrigDst> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key.client_port)
            .copied()
    }
}

/// One pod's data path, in-process.
pub struct InProcess {
    pub inputs: Arc<ProxyInputs>,
    pub metrics: Arc<Metrics>,
    pub published: Arc<Published>,
    listener: SocketAddr,
    orig_dsts: OrigDsts,
    task: JoinHandle<()>,
    drain: tokio::sync::watch::Sender<bool>,
}

impl InProcess {
    /// Compiles `yaml` (which must define the captured pod `namespace/pod`) and starts the
    /// pod's listener. Panics on a configuration error: tests give valid YAML.
    pub async fn start(yaml: &str, namespace: &str, pod: &str) -> Self {
        let docs = local::split_documents(std::path::Path::new("test.yaml"), yaml);
        let objects: Vec<_> = docs
            .iter()
            .filter_map(|d| local::parse_document(d, "default").expect("valid YAML"))
            .collect();
        let settings = CaptureSettings {
            label_key: state::CAPTURE_LABEL_KEY.into(),
            label_value: "enabled".into(),
            node_name: "test-node".into(),
            default_fail_mode: FailMode::Open,
            default_export_to: Vec::new(),
            trust_domain: "cluster.local".into(),
        };
        let snap = state::compile(&objects, &settings, 1).unwrap_or_else(|errors| {
            panic!(
                "configuration: {}",
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        let workload = snap
            .pods
            .values()
            .find(|p| p.workload.namespace == namespace && p.workload.pod_name == pod)
            .map(|p| p.workload.clone())
            .unwrap_or_else(|| panic!("pod {namespace}/{pod} is not captured by the YAML"));
        let published = Arc::new(Published::new());
        published.store(snap);
        let metrics = Arc::new(Metrics::new());
        let orig_dsts = OrigDsts::default();
        // Nothing answers on the discard port: DNS names stay unresolved unless a test
        // passes its own hosts file through the YAML's addresses.
        let dns = Arc::new(
            DnsCache::new(&[SocketAddr::from((Ipv4Addr::LOCALHOST, 9))], None).expect("dns cache"),
        );
        let (drain, draining) = tokio::sync::watch::channel(false);
        let inputs = Arc::new(ProxyInputs {
            orig_dst: Box::new(orig_dsts.clone()),
            metrics: metrics.clone(),
            settings: crate::proxy::ProxySettings {
                connect_timeout: Duration::from_secs(2),
                outbound_policy: OutboundPolicy::AllowAny,
                mirror_max_body_bytes: 1024 * 1024,
                header_read_timeout: Some(Duration::from_secs(30)),
                outbound_port: 15001,
                hbone_port: 15008,
                inbound_port: 15006,
            },
            config: published.clone(),
            endpoints: Endpoints::new(dns),
            mirror_slots: Arc::new(tokio::sync::Semaphore::new(proxy::http::MIRROR_CONCURRENCY)),
            splice_pipes: Arc::new(tokio::sync::Semaphore::new(proxy::tcp::SPLICE_PIPES)),
            tls: Arc::new(Originator::new(None, 16)),
            tracer: crate::spans::Tracer::new(
                crate::spans::TraceSettings {
                    sampling: 0.0,
                    collectors: Vec::new(),
                    propagation: crate::spans::Formats::parse("w3c,b3").expect("formats"),
                    source: "test".into(),
                },
                &mut prometheus_client::registry::Registry::default(),
            )
            .0,
            connections: crate::proxy::limits::ConnectionBudget::new(4096, 4096),
            bodies: Default::default(),
            handshakes: Default::default(),
            jwks: Default::default(),
            certs: Arc::new(crate::identity::CertManager::new(
                Arc::new(crate::identity::ca::BuiltinCa::ephemeral("cluster.local").expect("CA")),
                "cluster.local",
                Duration::from_secs(3600),
                Default::default(),
            )),
            enrolled: Default::default(),
            idle_upstream: Arc::new(crate::proxy::http::IdleBudget::new(4096, &metrics.daemon)),
            // Draining once the test says so (`start_drain`).
            draining,
        });
        let ctx = Arc::new(ArcSwap::from_pointee(PodContext {
            source_labels: SourceLabels::of(&workload),
            workload,
            netns: Arc::new(LocalSockets),
            netns_cookie: 0,
            http_pool: Arc::new(UpstreamPool::new(inputs.idle_upstream.clone())),
            hbone: Default::default(),
        }));
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("listener");
        let addr = listener.local_addr().expect("listener addr");
        let task = tokio::spawn(proxy::run_outbound_listener(inputs.clone(), ctx, listener));
        Self {
            inputs,
            metrics,
            published,
            listener: addr,
            orig_dsts,
            task,
            drain,
        }
    }

    /// Starts the drain a hand-over or SIGTERM starts: HTTP connections finish what they
    /// serve and close.
    pub fn start_drain(&self) {
        let _ = self.drain.send(true);
    }

    /// What an app in the pod gets from `connect(dst)`: a connection the proxy handles as
    /// one to `dst`.
    pub async fn connect(&self, dst: SocketAddrV4) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        // Ports in TIME_WAIT may be taken again: a long run (the fuzzer's tens of
        // thousands of connections) would otherwise run out of them.
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind");
        let port = socket.local_addr().expect("local addr").port();
        self.orig_dsts.insert(port, dst);
        socket.connect(self.listener).await.expect("connect")
    }

    /// The metrics endpoint's text.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.metrics.registry)
            .expect("encode");
        out
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The objects of a YAML text (as file `t.yaml`, objects without a namespace in
/// `default_ns`), and the documents that did not parse.
pub fn parse_yaml(
    yaml: &str,
    default_ns: &str,
) -> (
    Vec<crate::config::Located<crate::config::Object>>,
    Vec<crate::config::ConfigError>,
) {
    let mut errors = Vec::new();
    let objects = crate::config::local::split_documents(std::path::Path::new("t.yaml"), yaml)
        .iter()
        .filter_map(
            |d| match crate::config::local::parse_document(d, default_ns) {
                Ok(o) => o,
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
        )
        .collect();
    (objects, errors)
}
