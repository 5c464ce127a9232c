//! Command line (SPEC.md): every flag is also an environment variable `PROXY_<FLAG>`.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "proxy-daemon",
    about = "Node-level transparent proxy for Kubernetes pods"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Capture the pods of labelled namespaces on this node and proxy their connections.
    Run(Box<RunArgs>),
    /// Check YAML files or directories; print `PATH:LINE: KIND/NAMESPACE/NAME: message`.
    Validate {
        /// YAML files or directories, taken together as one configuration (as `kubectl
        /// apply -f a -f b` takes them).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// No summary line on standard error (the problems are still printed).
        #[arg(short, long)]
        quiet: bool,
    },
    /// Live view of the busiest source → destination pairs (req/s, success %, p50/p99),
    /// read from the node's metrics endpoint.
    Top {
        /// The daemon's metrics endpoint.
        #[arg(long, env = "PROXY_METRICS_ADDR", default_value = "127.0.0.1:15320")]
        metrics_addr: SocketAddr,
        /// Refresh period.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stop after this many frames (0: run until interrupted).
        #[arg(long, default_value_t = 0)]
        iterations: u64,
    },
    /// Detach the eBPF programs and remove their pins from this node (what a stop does not
    /// do, so capture and fail-closed hold across restarts). Programs a running daemon still
    /// holds detach when it exits.
    Uninstall {
        /// The pin directory the daemon used (--bpf-pin-dir).
        #[arg(
            long,
            env = "PROXY_BPF_PIN_DIR",
            default_value = "/sys/fs/bpf/proxy-daemon"
        )]
        bpf_pin_dir: PathBuf,
        /// After uninstalling, stay running until stopped (SIGTERM): the main container
        /// of a cleanup DaemonSet, whose pods must stay up for `kubectl rollout status` to
        /// say every node is done
        #[arg(long)]
        stay: bool,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaptureArg {
    /// cgroup eBPF programs (connect4/6, sock_ops): fail modes, bind guard, no rules in pods.
    Ebpf,
    /// iptables REDIRECT in each captured pod's netns, original destination from
    /// SO_ORIGINAL_DST: for kernels without cgroup BPF. A pod without a listener is always
    /// refused (fail-closed), whatever its fail mode.
    Iptables,
}

/// Where workload certificates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaArg {
    /// A CA in the daemon: the root (or intermediate and chain) of --ca-cert/--ca-key; without
    /// them the node's own root, made at the first start and handed to each successor in
    /// memory, trusted by this node alone (one node, the demo).
    Builtin,
    /// Istio's CA API (istiod or istio-csr): `IstioCertificateService/CreateCertificate`.
    Istio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailModeArg {
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutboundTrafficPolicyArg {
    AllowAny,
    RegistryOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Local mode: read the Kubernetes YAML in DIR (recursively), reload on change.
    #[arg(long, env = "PROXY_CONFIG_DIR", conflicts_with = "kubernetes")]
    pub config_dir: Option<PathBuf>,

    /// Cluster mode: watch the Kubernetes API (in-cluster service account, or --kubeconfig /
    /// KUBECONFIG). Needs get/list/watch on namespaces, pods, services, endpointslices,
    /// secrets (only those DestinationRule credentialName names are watched) and the
    /// networking.istio.io kinds.
    #[arg(long, env = "PROXY_KUBERNETES")]
    pub kubernetes: bool,

    /// Cluster mode: kubeconfig file (default: KUBECONFIG, ~/.kube/config, else in-cluster).
    #[arg(long, env = "PROXY_KUBECONFIG", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,

    /// Cluster mode: how often to look again for Istio kinds the API does not serve
    /// (CRDs installed after the daemon started are picked up within this time).
    #[arg(long, env = "PROXY_KUBE_REDISCOVERY_SECS", default_value_t = 30)]
    pub kube_rediscovery_secs: u64,

    /// Only pods with this spec.nodeName (or none, in local mode) are enrolled.
    /// Defaults to $NODE_NAME, else the hostname.
    #[arg(long, env = "PROXY_NODE_NAME")]
    pub node_name: Option<String>,

    /// Where pod cgroups are found and programs attached. Defaults to the cgroup2 mount.
    #[arg(long, env = "PROXY_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// How pod connects reach the listener: cgroup eBPF, or iptables REDIRECT in each pod's
    /// netns with SO_ORIGINAL_DST (kernels without cgroup BPF; needs iptables and nsenter).
    #[arg(long, env = "PROXY_CAPTURE", value_enum, default_value_t = CaptureArg::Ebpf)]
    pub capture: CaptureArg,

    /// With --capture ebpf: a pod's connections to its listener skip the loopback TCP
    /// stack (sockmap + sk_msg hand each message to the other end's receive queue).
    /// Each connection hands over at most 4 MiB from the app, then uses TCP. Off by
    /// default: the kernel's recvmsg on a paired socket can return EAGAIN to a blocking
    /// read woken without data (see the README).
    #[arg(long, env = "PROXY_SOCKMAP")]
    pub sockmap: bool,

    /// The `exportTo` of VirtualServices, DestinationRules and ServiceEntries that set none
    /// (Istio's MeshConfig `defaultVirtualServiceExportTo`, `defaultDestinationRuleExportTo`
    /// and `defaultServiceExportTo` override it per kind): `*` (Istio's default: every
    /// namespace), `.` (the object's own namespace only: the choice where namespaces do not
    /// trust each other), `~`, or namespace names, comma-separated. Kubernetes Services
    /// stay visible to all unless the mesh config says otherwise.
    #[arg(
        long,
        env = "PROXY_DEFAULT_EXPORT_TO",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub default_export_to: Vec<String>,
    /// SPIFFE trust domain of workload identities (`spiffe://<domain>/ns/<ns>/sa/<sa>`).
    #[arg(long, env = "PROXY_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Where workload certificates come from.
    #[arg(long, env = "PROXY_CA", value_enum, default_value_t = CaArg::Builtin)]
    pub ca: CaArg,
    /// Built-in CA: its certificate (PEM; an intermediate followed by its chain up to the
    /// root the mesh trusts). Every node of a mesh needs the same root.
    #[arg(long, env = "PROXY_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Built-in CA: its private key (PEM).
    #[arg(long, env = "PROXY_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Istio CA: the address of IstioCertificateService.
    #[arg(
        long,
        env = "PROXY_CA_ADDRESS",
        default_value = "https://istiod.istio-system.svc:15012"
    )]
    pub ca_address: String,
    /// Istio CA: the root certificate (PEM) to verify the CA's server with.
    #[arg(long, env = "PROXY_CA_ROOT_CERT")]
    pub ca_root_cert: Option<PathBuf>,
    /// Istio CA: the service-account token sent with each request (a projected token,
    /// audience `istio-ca`).
    #[arg(long, env = "PROXY_CA_TOKEN_FILE")]
    pub ca_token_file: Option<PathBuf>,
    /// Istio CA: the `ClusterID` sent with each request (istiod's cluster name).
    #[arg(long, env = "PROXY_CA_CLUSTER_ID", default_value = "Kubernetes")]
    pub ca_cluster_id: String,
    /// How long a workload certificate is valid; renewed at half its life.
    #[arg(long, env = "PROXY_CERT_TTL_SECS", default_value_t = 24 * 3600)]
    pub cert_ttl_secs: u64,
    /// HBONE (HTTP/2 CONNECT over mutual TLS) listener on each captured pod's address.
    #[arg(long, env = "PROXY_HBONE_PORT", default_value_t = 15008)]
    pub hbone_port: u16,
    /// Plaintext inbound listener in each captured pod's network namespace (connections
    /// to the pod that did not come over HBONE).
    #[arg(long, env = "PROXY_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// Namespaces with this label are captured.
    #[arg(
        long,
        env = "PROXY_CAPTURE_LABEL",
        default_value = "nodeproxy.io/capture=enabled"
    )]
    pub capture_label: String,

    /// When a captured pod's listener is gone: connect directly (open) or refuse (closed).
    #[arg(long, env = "PROXY_FAIL_MODE", value_enum, default_value_t = FailModeArg::Open)]
    pub fail_mode: FailModeArg,

    /// Unknown destinations: pass through (allow-any) or refuse (registry-only).
    #[arg(long, env = "PROXY_OUTBOUND_TRAFFIC_POLICY", value_enum, default_value_t = OutboundTrafficPolicyArg::AllowAny)]
    pub outbound_traffic_policy: OutboundTrafficPolicyArg,

    /// Listener port on 127.0.0.1 inside each captured pod's network namespace.
    #[arg(long, env = "PROXY_OUTBOUND_PORT", default_value_t = proxy_common::DEFAULT_OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// Admin endpoint (/config_dump, /logging, /quitquitquit); loopback by default, as
    /// it can change the daemon (see --admin-token-file).
    #[arg(long, env = "PROXY_ADMIN_ADDR", default_value = "127.0.0.1:15300")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics endpoint (/metrics, /stats/prometheus).
    #[arg(long, env = "PROXY_METRICS_ADDR", default_value = "0.0.0.0:15320")]
    pub metrics_addr: SocketAddr,

    /// Health endpoint (/healthz/ready) for the kubelet's probes.
    #[arg(long, env = "PROXY_HEALTH_ADDR", default_value = "0.0.0.0:15321")]
    pub health_addr: SocketAddr,

    /// The daemon's own log lines (access log lines included): text or JSON.
    #[arg(long, env = "PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax); changeable at run time via admin /logging.
    #[arg(long, env = "PROXY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// bpffs directory where programs' links and maps are pinned, so capture (and
    /// fail-closed) outlives a crash and a restarted daemon adopts them.
    #[arg(
        long,
        env = "PROXY_BPF_PIN_DIR",
        default_value = "/sys/fs/bpf/proxy-daemon"
    )]
    pub bpf_pin_dir: PathBuf,

    /// Runtime directory: the hand-over socket a newer daemon on this node takes the
    /// listeners and ports from (a hostPath in the chart, shared by old and new pods).
    #[arg(long, env = "PROXY_RUN_DIR", default_value = "/run/proxy-daemon")]
    pub run_dir: PathBuf,

    /// After handing over to a newer daemon and draining, wait (idle, not ready) for
    /// SIGTERM instead of exiting: under a DaemonSet an exited container is restarted, and
    /// the controller deletes the old pod itself once the new one is ready.
    #[arg(long, env = "PROXY_STAY_AFTER_HANDOVER")]
    pub stay_after_handover: bool,

    /// On a clean stop, also detach the programs and remove the pins (as `uninstall` does):
    /// set it before removing the DaemonSet for good. Otherwise a stop leaves them for the
    /// next daemon, so capture and fail-closed hold across restarts and upgrades.
    #[arg(long, env = "PROXY_DETACH_ON_EXIT")]
    pub detach_on_exit: bool,

    /// A file holding a token (16+ characters) that every admin request must present as
    /// `Authorization: Bearer <token>` (the admin port changes state: quitquitquit, logging).
    #[arg(long, env = "PROXY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// How long SIGTERM waits for open connections before closing them.
    #[arg(long, env = "PROXY_DRAIN_TIMEOUT_SECS", default_value_t = 5)]
    pub drain_timeout_secs: u64,

    /// Largest request body copied to a mirror; beyond it the copy is dropped and counted
    /// (the primary request is never affected).
    #[arg(long, env = "PROXY_MIRROR_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub mirror_max_body_bytes: usize,

    /// Mirror copies in flight on the node at most; beyond, copies are dropped (counted)
    /// before any body is copied. Memory for copies stays under this times
    /// --mirror-max-body-bytes.
    #[arg(long, env = "PROXY_MIRROR_MAX_IN_FLIGHT", default_value_t = crate::proxy::http::MIRROR_CONCURRENCY)]
    pub mirror_max_in_flight: usize,

    /// Upstream connect timeout.
    #[arg(long, env = "PROXY_CONNECT_TIMEOUT_MS", default_value_t = 10_000)]
    pub connect_timeout_ms: u64,

    /// DNS server for ServiceEntry `resolution: DNS` names, `IP` or `IP:PORT` (repeatable;
    /// default: the nameservers of /etc/resolv.conf).
    #[arg(long = "dns-server", env = "PROXY_DNS_SERVER", value_delimiter = ',')]
    pub dns_servers: Vec<String>,

    /// Hosts file (`/etc/hosts` format) answering ServiceEntry names before DNS; re-read
    /// every 5 s.
    #[arg(long, env = "PROXY_HOSTS_FILE")]
    pub hosts_file: Option<PathBuf>,

    /// Local mode: directory of DestinationRule `credentialName` secrets:
    /// DIR/NAME/{tls.crt,tls.key,ca.crt}. In cluster mode the Secrets come from the API
    /// (the DestinationRule's own namespace only) and this flag is not used.
    #[arg(long, env = "PROXY_CREDENTIALS_DIR")]
    pub credentials_dir: Option<PathBuf>,

    /// Metric series of a workload whose pods all left the node are removed after this long.
    #[arg(long, env = "PROXY_METRICS_RETENTION_SECS", default_value_t = 300)]
    pub metrics_retention_secs: u64,

    /// TLS sessions kept per upstream TLS setting for resumption (0 turns resumption off).
    #[arg(long, env = "PROXY_TLS_SESSION_CACHE", default_value_t = 256)]
    pub tls_session_cache: usize,

    /// Percentage of new traces sampled (0–100, fractions allowed). A caller's decision
    /// and `x-envoy-force-trace` win; the namespace annotation `nodeproxy.io/trace-sampling`
    /// overrides, and a mesh config's `defaultConfig.tracing.sampling` replaces it on reload.
    #[arg(long, env = "PROXY_TRACE_SAMPLING", default_value = "1")]
    pub trace_sampling: String,

    /// Export spans with OTLP: `http://host:4318` (HTTP/protobuf, path `/v1/traces`) or
    /// `grpc://host:4317`.
    #[arg(long, env = "PROXY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Export spans as Zipkin v2 JSON, e.g. `http://host:9411/api/v2/spans`.
    #[arg(long, env = "PROXY_ZIPKIN_ENDPOINT")]
    pub zipkin_endpoint: Option<String>,

    /// Downstream connections in flight on the node at most (0: from the open-file limit,
    /// two sockets per connection, after 1,024 for everything else and the idle upstream
    /// connections' share). Beyond: reset, counted.
    #[arg(long, env = "PROXY_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// The memory the daemon may use, as a byte count or a Kubernetes quantity (`512Mi`);
    /// default: its cgroup's limit. Connection budgets stay within it (a quarter, at least
    /// 48 MiB, kept for the daemon itself; 64 KiB reckoned per connection), and above 85 %
    /// of it a namespace holding more than its fair share of connections gets no new ones.
    #[arg(long, env = "PROXY_MEMORY_LIMIT")]
    pub memory_limit: Option<String>,
    /// Downstream connections in flight per source namespace at most (0: half the node's),
    /// so that one tenant cannot take every place.
    #[arg(long, env = "PROXY_MAX_CONNECTIONS_PER_NAMESPACE", default_value_t = 0)]
    pub max_connections_per_namespace: usize,

    /// Idle upstream HTTP connections kept for reuse on the node at most, all pods together
    /// (0: an eighth of the open-file limit). Beyond, a finished connection is closed.
    #[arg(long, env = "PROXY_MAX_IDLE_UPSTREAM_CONNECTIONS", default_value_t = 0)]
    pub max_idle_upstream_connections: usize,

    /// An HTTP/1 request's head must arrive within this many milliseconds, or the
    /// connection is closed (slow-header attacks; 0 turns it off).
    #[arg(
        long,
        env = "PROXY_HTTP_HEADER_READ_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub http_header_read_timeout_ms: u64,

    /// Networks a RequestAuthentication's `jwksUri` (or its issuer's discovery) may be
    /// fetched from although they are loopback or link-local (comma-separated CIDRs). The
    /// daemon fetches from the node's network for any namespace's rule, so by default it
    /// refuses the node's own services and the cloud metadata address
    #[arg(long, env = "PROXY_JWKS_ALLOW_CIDR", value_delimiter = ',')]
    pub jwks_allow_cidr: Vec<ipnet::IpNet>,

    /// Istio metric series one source workload may have (per family); past it, new label
    /// sets are counted in its overflow series (`destination_service="overflow"`).
    #[arg(long, env = "PROXY_MAX_SERIES_PER_WORKLOAD", default_value_t = crate::metrics::DEFAULT_MAX_SERIES_PER_WORKLOAD)]
    pub max_series_per_workload: usize,
    /// Scrape lines one workload's traffic to destinations the configuration does not name
    /// (PassthroughCluster, BlackHoleCluster: a Host, SNI or port the pod chose) may add;
    /// past it, that traffic is counted in the workload's overflow series
    /// (`destination_service="overflow"`). An HTTP destination takes 67 lines, a TCP one 4.
    #[arg(long, env = "PROXY_MAX_PASSTHROUGH_LINES_PER_WORKLOAD", default_value_t = crate::metrics::DEFAULT_MAX_UNNAMED_LINES_PER_WORKLOAD)]
    pub max_passthrough_lines_per_workload: usize,

    /// Trace headers written upstream when a request brought none (a request that brought
    /// some is answered in its own formats): any of `w3c`, `b3`, `b3-single`.
    #[arg(long, env = "PROXY_TRACE_PROPAGATION", default_value = "w3c,b3")]
    pub trace_propagation: String,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// `--help` explains every flag and argument of every command.
    #[test]
    fn every_flag_has_help_text() {
        let cli = super::Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{} {id}", sub.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
