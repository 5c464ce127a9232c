//! Prometheus metrics: Istio's standard ones (`reporter="source"`) at the root of the
//! registry, the daemon's own under `proxy_daemon_`.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::workload::{WorkloadInfo, UNKNOWN};

/// Istio's TCP metric labels, in full; values absent from our view are `unknown`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IstioTcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

/// What the data path knows of where a connection went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationLabels {
    pub service: String,
    pub service_name: String,
    pub service_namespace: String,
}

pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

impl IstioTcpLabels {
    pub fn new(src: &WorkloadInfo, dst: &DestinationLabels, response_flags: &str) -> Self {
        let unknown = || UNKNOWN.to_string();
        Self {
            reporter: "source",
            source_workload: src.workload.clone(),
            source_canonical_service: src.canonical_service.clone(),
            source_canonical_revision: src.canonical_revision.clone(),
            source_workload_namespace: src.namespace.clone(),
            source_principal: unknown(),
            source_app: src.app.clone(),
            source_version: src.version.clone(),
            source_cluster: unknown(),
            destination_workload: unknown(),
            destination_workload_namespace: unknown(),
            destination_principal: unknown(),
            destination_app: unknown(),
            destination_version: unknown(),
            destination_service: dst.service.clone(),
            destination_service_name: dst.service_name.clone(),
            destination_service_namespace: dst.service_namespace.clone(),
            destination_canonical_service: unknown(),
            destination_canonical_revision: unknown(),
            destination_cluster: unknown(),
            request_protocol: "tcp",
            response_flags: if response_flags.is_empty() {
                "-".into()
            } else {
                response_flags.into()
            },
            connection_security_policy: "unknown",
        }
    }
}

/// Istio's request metric labels: the TCP set plus the response code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub response_code: u16,
    // Flattened fields must come last (the derive hands its encoder over to them).
    #[prometheus(flatten)]
    pub base: IstioTcpLabels,
}

/// Istio's buckets for istio_request_duration_milliseconds.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

pub struct HttpMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
        }
    }
}

/// Per-route mirror outcomes (`route` is the rule's file:line, bounded by the config).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub route: String,
    /// sent | failed
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsHandshakeLabels {
    /// full | resumed | failed
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorDropLabels {
    pub route: String,
    /// concurrency | body_too_large | no_destination | no_endpoint | bad_request
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// redirected | fail_open_bypass | fail_closed_refused | netns_mismatch
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub git_revision: &'static str,
}

#[derive(Default)]
pub struct TcpMetrics {
    pub opened: Family<IstioTcpLabels, Counter>,
    pub closed: Family<IstioTcpLabels, Counter>,
    /// Bytes sent to the client (the response direction), as Istio counts them.
    pub sent_bytes: Family<IstioTcpLabels, Counter>,
    /// Bytes received from the client (the request direction).
    pub received_bytes: Family<IstioTcpLabels, Counter>,
}

#[derive(Default)]
pub struct DaemonMetrics {
    pub enrolled_pods: Gauge,
    pub listeners: Gauge,
    pub listener_failures: Counter,
    pub enrolment_failures: Counter,
    pub config_reloads: Counter,
    pub config_errors: Counter,
    pub config_last_success: Gauge,
    pub map_entries: Family<MapLabels, Gauge>,
    pub capture_decisions: Family<DecisionLabels, Gauge>,
    pub orig_dst_missing: Counter,
    pub upstream_connect_failures: Counter,
    pub active_connections: Gauge,
    pub mirror_requests: Family<MirrorLabels, Counter>,
    pub mirror_dropped: Family<MirrorDropLabels, Counter>,
    pub upstream_tls_handshakes: Family<TlsHandshakeLabels, Counter>,
    pub build_info: Family<BuildLabels, Gauge>,
}

pub struct Metrics {
    pub registry: Registry,
    pub tcp: TcpMetrics,
    pub http: HttpMetrics,
    pub daemon: DaemonMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let tcp = TcpMetrics::default();
        registry.register(
            "istio_tcp_connections_opened",
            "Total TCP connections opened",
            tcp.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Total TCP connections closed",
            tcp.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Total bytes sent during response in case of a TCP connection",
            tcp.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Total bytes received during request in case of a TCP connection",
            tcp.received_bytes.clone(),
        );
        let http = HttpMetrics::default();
        registry.register("istio_requests", "Total requests", http.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            http.duration.clone(),
        );
        let daemon = DaemonMetrics::default();
        let sub = registry.sub_registry_with_prefix("proxy_daemon");
        sub.register(
            "enrolled_pods",
            "Pods whose connects are captured",
            daemon.enrolled_pods.clone(),
        );
        sub.register(
            "listeners",
            "Outbound listeners open in pod network namespaces",
            daemon.listeners.clone(),
        );
        sub.register(
            "listener_failures",
            "Failures to create or run a pod listener",
            daemon.listener_failures.clone(),
        );
        sub.register(
            "enrolment_failures",
            "Failures to enrol a pod (cgroup, netns, map)",
            daemon.enrolment_failures.clone(),
        );
        sub.register(
            "config_reloads",
            "Configuration loads that produced a new snapshot",
            daemon.config_reloads.clone(),
        );
        sub.register(
            "config_errors",
            "Configuration loads rejected (the last good one stays)",
            daemon.config_errors.clone(),
        );
        sub.register(
            "config_last_success_timestamp_seconds",
            "Unix time of the last successful configuration load",
            daemon.config_last_success.clone(),
        );
        sub.register(
            "ebpf_map_entries",
            "Entries in each eBPF map",
            daemon.map_entries.clone(),
        );
        sub.register(
            "capture_decisions",
            "Connects seen by the connect4 program, by decision (kernel counters)",
            daemon.capture_decisions.clone(),
        );
        sub.register(
            "orig_dst_missing",
            "Accepted connections with no original destination (closed)",
            daemon.orig_dst_missing.clone(),
        );
        sub.register(
            "upstream_connect_failures",
            "Upstream connects that failed or timed out",
            daemon.upstream_connect_failures.clone(),
        );
        sub.register(
            "active_connections",
            "Proxied connections open now",
            daemon.active_connections.clone(),
        );
        sub.register("build_info", "Build information", daemon.build_info.clone());
        sub.register(
            "mirror_requests",
            "Mirror copies sent, by route and outcome",
            daemon.mirror_requests.clone(),
        );
        sub.register(
            "mirror_dropped",
            "Mirror copies not sent, by route and reason",
            daemon.mirror_dropped.clone(),
        );
        sub.register(
            "upstream_tls_handshakes",
            "TLS handshakes originated to upstreams, by result (full, resumed, failed)",
            daemon.upstream_tls_handshakes.clone(),
        );
        daemon
            .build_info
            .get_or_create(&BuildLabels {
                version: crate::version::VERSION,
                git_revision: crate::version::GIT_REVISION,
            })
            .set(1);
        Self {
            registry,
            tcp,
            http,
            daemon,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Metrics {
    /// Copies the kernel-side numbers into gauges; called on each scrape.
    pub fn refresh_from_maps(&self, maps: &crate::bpf::MapStats) {
        let d = &self.daemon;
        for (map, n) in maps.entry_counts() {
            d.map_entries
                .get_or_create(&MapLabels { map })
                .set(n as i64);
        }
        let c = maps.capture_counts();
        for (decision, v) in [
            ("redirected", c.redirected),
            ("fail_open_bypass", c.bypass_fail_open),
            ("fail_closed_refused", c.refused_fail_closed),
            ("netns_mismatch", c.netns_mismatch),
        ] {
            d.capture_decisions
                .get_or_create(&DecisionLabels { decision })
                .set(v as i64);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
