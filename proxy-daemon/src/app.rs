//! Wiring, in one place: preflight checks, config source, eBPF, enrolment, data path,
//! endpoints, and the shutdown order (drain, then detach).
use std::{
    net::SocketAddr,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, error, info, warn};

use crate::{
    admin::{self, ConfigDump},
    capture::bpf,
    capture::cgroup,
    capture::enrol::Enroller,
    cli::{FailModeArg, RunArgs},
    config::{cluster, local, ConfigError},
    metrics::Metrics,
    proxy::ProxyInputs,
    readiness::Ready,
    state::{self, CaptureSettings, Published},
    telemetry::{self, LogControl},
};
use proxy_common::FailMode;

// A stat per YAML file per poll; a change counts once it has been stable for one poll.
const CONFIG_POLL: Duration = Duration::from_millis(100);

/// Startup problems the operator must fix (exit 2) versus failures at run time (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Startup(String),
    #[error("{0}")]
    Runtime(#[from] anyhow::Error),
}

pub fn main(args: Box<RunArgs>) -> ExitCode {
    let logs = match telemetry::init(args.log_format, &args.log_level) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("proxy-daemon: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxy-daemon: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(*args, logs)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(AppError::Startup(msg)) => {
            eprintln!("proxy-daemon: {msg}");
            ExitCode::from(2)
        }
        Err(AppError::Runtime(e)) => {
            eprintln!("proxy-daemon: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A secret that never shows in logs or dumps.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// The settings `run` works with, after defaults are resolved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    /// Local mode: the YAML directory (None in cluster mode).
    pub config_dir: Option<PathBuf>,
    /// Cluster mode: how to reach the API (None in local mode).
    pub cluster: Option<crate::config::cluster::ClusterSettings>,
    pub cgroup_root: PathBuf,
    pub capture: CaptureSettings,
    /// `--capture`: the eBPF programs, or iptables rules in each pod's netns.
    pub capture_mode: crate::cli::CaptureArg,
    /// `--sockmap`: pod ↔ listener messages skip loopback TCP (eBPF capture only).
    pub sockmap: bool,
    pub outbound_port: u16,
    /// HBONE and plaintext inbound listeners on each captured pod's address.
    pub hbone_port: u16,
    pub inbound_port: u16,
    /// Where workload certificates come from, and for how long they are valid.
    pub ca: CaSettings,
    pub cert_ttl: Duration,
    pub outbound_traffic_policy: crate::cli::OutboundTrafficPolicyArg,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub bpf_pin_dir: PathBuf,
    pub drain_timeout: Duration,
    /// Detach the programs and remove the pins on a clean stop (for uninstalling).
    pub detach_on_exit: bool,
    pub run_dir: PathBuf,
    pub stay_after_handover: bool,
    /// With `--admin-token-file`: the bearer token every admin request must carry.
    #[serde(skip)]
    pub admin_token: Option<AdminToken>,
    pub connect_timeout: Duration,
    pub mirror_max_body_bytes: usize,
    pub mirror_max_in_flight: usize,
    pub dns_servers: Vec<SocketAddr>,
    pub hosts_file: Option<PathBuf>,
    pub credentials_dir: Option<PathBuf>,
    pub tls_session_cache: usize,
    pub metrics_retention: Duration,
    pub max_series_per_workload: usize,
    pub max_passthrough_lines_per_workload: usize,
    /// Downstream connection budgets (node, per source namespace).
    pub max_connections: usize,
    /// The memory the daemon may use (`--memory-limit`, else its cgroup's limit): the
    /// connection budgets stay within it and pressure sheds the heaviest tenant.
    pub memory_limit: Option<u64>,
    /// Where usage is read (the daemon's memory cgroup), if known.
    pub memory_cgroup: Option<crate::memory::CgroupMemory>,
    pub max_connections_per_namespace: usize,
    pub max_idle_upstream_connections: usize,
    pub header_read_timeout: Option<Duration>,
    /// `--jwks-allow-cidr`: loopback or link-local networks JWKS may still be fetched from.
    pub jwks_allow: Vec<ipnet::IpNet>,
    /// Tracing as the flags set it (the mesh configuration may replace it on reload).
    pub tracing: crate::spans::TraceSettings,
}

/// The tracing flags, checked (a bad one is a startup error naming the flag).
fn trace_settings(args: &RunArgs) -> Result<crate::spans::TraceSettings, String> {
    use crate::spans::{parse_sampling, Collector, Formats};
    let mut collectors = Vec::new();
    if let Some(url) = &args.otlp_endpoint {
        collectors.push(Collector::otlp(url).map_err(|e| format!("--otlp-endpoint {e}"))?);
    }
    if let Some(url) = &args.zipkin_endpoint {
        collectors.push(Collector::zipkin(url).map_err(|e| format!("--zipkin-endpoint {e}"))?);
    }
    Ok(crate::spans::TraceSettings {
        sampling: parse_sampling(&args.trace_sampling)
            .map_err(|e| format!("--trace-sampling: {e}"))?,
        collectors,
        propagation: Formats::parse(&args.trace_propagation)
            .map_err(|e| format!("--trace-propagation: {e}"))?,
        source: "flags".into(),
    })
}

/// The tracing settings in force: the flags, with what Istio's mesh config sets on top.
pub fn effective_tracing(
    flags: &crate::spans::TraceSettings,
    mesh: Option<&crate::config::mesh::MeshTracing>,
) -> crate::spans::TraceSettings {
    use crate::spans::Collector;
    let Some(m) = mesh else {
        return flags.clone();
    };
    let mut s = flags.clone();
    s.source = format!(
        "ConfigMap {}/{}",
        crate::config::mesh::MESH_CONFIG_NAMESPACE,
        crate::config::mesh::MESH_CONFIG_NAME
    );
    if let Some(p) = m.sampling {
        s.sampling = p;
    }
    if m.sets_collectors {
        // (Checked at compile: a bad URL never reaches a snapshot.)
        s.collectors = m
            .otlp
            .iter()
            .filter_map(|u| Collector::otlp(u).ok())
            .chain(m.zipkin.iter().filter_map(|u| Collector::zipkin(u).ok()))
            .collect();
    }
    if m.disabled {
        s.sampling = 0.0;
        s.collectors.clear();
    }
    s
}

/// Applies each published configuration's tracing settings to the tracer (sampling and
/// collectors change on reload, without a restart).
async fn apply_mesh_tracing(
    tracer: Arc<crate::spans::Tracer>,
    published: Arc<Published>,
    flags: crate::spans::TraceSettings,
) {
    let mut changes = published.subscribe();
    loop {
        let snap = published.load();
        let effective = effective_tracing(&flags, snap.mesh_tracing.as_ref());
        let (sampling, collectors, source) = (
            effective.sampling,
            effective.collectors.len(),
            effective.source.clone(),
        );
        if tracer.set_settings(effective) {
            info!(sampling, collectors, %source, "tracing settings applied");
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// A collector named by host (cluster mode: a Service, `otel-collector.observability`)
/// is found in the daemon's own registry: a ready endpoint at the port's target port,
/// else the service's address.
/// Samples the daemon's memory four times a second: above `memory::PRESSURE_ON` of its
/// limit, namespaces over their fair share of connections get no new ones until usage is
/// below `memory::PRESSURE_OFF` (so one tenant's connections cannot get the shared daemon
/// OOM-killed, whatever they hold: request heads, buffered bodies, socket buffers).
async fn watch_memory(inputs: Arc<ProxyInputs>, settings: Arc<Settings>) {
    let Some(limit) = settings.memory_limit else {
        return;
    };
    let daemon = &inputs.metrics.daemon;
    daemon
        .memory_limit_bytes
        .set(i64::try_from(limit).unwrap_or(i64::MAX));
    // The cgroup's own count when its limit is the one in force, else the resident set.
    let cgroup = settings
        .memory_cgroup
        .clone()
        .filter(|c| c.limit().is_some());
    let mut on = false;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let used = cgroup
            .as_ref()
            .and_then(crate::memory::CgroupMemory::working_set)
            .unwrap_or_else(crate::memory::resident_bytes);
        daemon
            .memory_working_set_bytes
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        let share = used as f64 / limit as f64;
        let next = if on {
            share >= crate::memory::PRESSURE_OFF
        } else {
            share >= crate::memory::PRESSURE_ON
        };
        if next != on {
            on = next;
            inputs.connections.set_memory_pressure(on);
            daemon.memory_pressure.set(i64::from(on));
            if on {
                warn!(used, limit, "memory pressure: namespaces over their fair share of connections get no new ones");
            } else {
                info!(used, limit, "memory pressure over");
            }
        }
    }
}

/// `--ca` and its files, checked at start.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CaSettings {
    /// The built-in CA with this certificate (chain) and key.
    Builtin { cert: PathBuf, key: PathBuf },
    /// The built-in CA with the node's own root (one node on its own).
    Ephemeral,
    /// Istio's CA API (istiod, istio-csr).
    Istio(crate::identity::istio_ca::IstioCaSettings),
}

fn ca_settings(args: &RunArgs) -> Result<CaSettings, AppError> {
    match (args.ca, &args.ca_cert, &args.ca_key) {
        (crate::cli::CaArg::Istio, _, _) => {
            let root_cert = args.ca_root_cert.clone().ok_or_else(|| {
                startup("--ca istio needs --ca-root-cert (the root that signed the CA's serving certificate)")
            })?;
            Ok(CaSettings::Istio(
                crate::identity::istio_ca::IstioCaSettings {
                    address: args.ca_address.clone(),
                    root_cert,
                    token_file: args.ca_token_file.clone(),
                    cluster_id: args.ca_cluster_id.clone(),
                },
            ))
        }
        (crate::cli::CaArg::Builtin, Some(cert), Some(key)) => Ok(CaSettings::Builtin {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (crate::cli::CaArg::Builtin, _, _) => Ok(CaSettings::Ephemeral),
    }
}

/// The certificate authority the settings name (its files read now: a bad file stops the
/// start with its reason).
fn certificate_authority(
    settings: &Settings,
    previous_root: Option<&str>,
    handover: &crate::handover::Table,
) -> Result<Arc<dyn crate::identity::CertificateAuthority>, AppError> {
    use crate::identity::ca::BuiltinCa;
    match &settings.ca {
        CaSettings::Builtin { cert, key } => {
            let read = |p: &PathBuf, flag: &str| {
                std::fs::read_to_string(p)
                    .map_err(|e| startup(format!("{flag} {}: {e}", p.display())))
            };
            let ca = BuiltinCa::from_pem(&read(cert, "--ca-cert")?, &read(key, "--ca-key")?)
                .map_err(|e| startup(format!("--ca-cert/--ca-key: {e}")))?;
            Ok(Arc::new(ca))
        }
        CaSettings::Istio(istio) => {
            let ca = crate::identity::istio_ca::IstioCa::new(istio.clone())
                .map_err(|e| startup(e.to_string()))?;
            Ok(Arc::new(ca))
        }
        CaSettings::Ephemeral => {
            if settings.cluster.is_some() {
                warn!("no --ca-cert/--ca-key: this node's workload certificates come from this node's own root, which no other node trusts; mTLS between nodes fails until every node has the mesh's CA");
            }
            let (ca, pem) = BuiltinCa::node_local(previous_root, &settings.capture.trust_domain)
                .map_err(|e| startup(e.to_string()))?;
            match crate::handover::sealed(&pem) {
                Ok(fd) => handover.set(crate::handover::Item::NodeRoot, Arc::new(fd)),
                Err(e) => warn!(error = %e, "the node's root cannot be kept for a successor"),
            }
            Ok(Arc::new(ca))
        }
    }
}

/// `--default-export-to`, checked as Istio checks an `exportTo` list.
fn default_export_to(list: &[String]) -> Result<Vec<String>, AppError> {
    let list: Vec<String> = list
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    state::check_export_to(&list).map_err(|e| {
        startup(format!(
            "--default-export-to (PROXY_DEFAULT_EXPORT_TO): {e}"
        ))
    })?;
    Ok(list)
}

fn collector_resolver(published: Arc<Published>) -> crate::spans::ResolveHost {
    Arc::new(move |host: &str, port: u16| {
        let snap = published.load();
        let dots = host.matches('.').count();
        let candidates = [
            host.to_string(),
            if dots == 1 {
                format!("{host}.svc.cluster.local")
            } else {
                format!("{host}.cluster.local")
            },
        ];
        // The daemon's own lookup (no client namespace): a Service before any entry.
        let svc = candidates
            .iter()
            .find_map(|h| snap.registry.by_host_unscoped(h))?;
        let port_info = svc.port(port as u32);
        let endpoint = svc.endpoints.iter().find_map(|e| {
            let ip = e.ip?;
            let p = port_info
                .and_then(|p| e.ports.get(&p.name).copied().or(p.target_port))
                .unwrap_or(port as u32);
            Some(SocketAddr::new(ip, p as u16))
        });
        endpoint.or_else(|| {
            svc.addresses
                .iter()
                .find_map(|a| a.parse::<std::net::IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, port))
        })
    })
}

fn startup(msg: impl Into<String>) -> AppError {
    AppError::Startup(msg.into())
}

fn preflight(args: &RunArgs) -> Result<Settings, AppError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(startup(
            "must run as root (needs CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run with sudo, or as the privileged DaemonSet",
        ));
    }
    let config_dir = match (&args.config_dir, args.kubernetes) {
        (Some(dir), _) => Some(dir.clone()),
        (None, true) => None,
        (None, false) => {
            return Err(startup(
                "one of --config-dir DIR or --kubernetes is required",
            ))
        }
    };
    if let Some(config_dir) = &config_dir {
        if let Err(e) = std::fs::read_dir(config_dir) {
            return Err(startup(format!(
                "config dir {}: {e} (create it or point --config-dir at your YAML)",
                config_dir.display()
            )));
        }
    }
    if let Some(path) = &args.kubeconfig {
        if let Err(e) = std::fs::metadata(path) {
            return Err(startup(format!("--kubeconfig {}: {e}", path.display())));
        }
    }
    if args.sockmap && args.capture == crate::cli::CaptureArg::Iptables {
        return Err(startup(
            "--sockmap needs --capture ebpf (the pairing is done by the sock_ops program)",
        ));
    }
    if args.capture == crate::cli::CaptureArg::Iptables {
        crate::capture::iptables::check_available().map_err(|e| startup(e.to_string()))?;
    } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(startup(
            "kernel has no BTF (/sys/kernel/btf/vmlinux missing): use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        ));
    }
    let cgroup_root = match &args.cgroup_root {
        Some(root) => root.clone(),
        None => cgroup::cgroup2_mount().map_err(|e| {
            startup(format!(
                "{e}: mount one (mount -t cgroup2 none /sys/fs/cgroup) or pass --cgroup-root"
            ))
        })?,
    };
    cgroup::check_cgroup2_dir(&cgroup_root).map_err(|e| startup(format!("--cgroup-root: {e}")))?;
    let (label_key, label_value) = args
        .capture_label
        .split_once('=')
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .ok_or_else(|| {
            startup(format!(
                "--capture-label {:?}: expected KEY=VALUE",
                args.capture_label
            ))
        })?;
    let node_name = args
        .node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_default();
    let cluster = config_dir
        .is_none()
        .then(|| crate::config::cluster::ClusterSettings {
            kubeconfig: args.kubeconfig.clone(),
            node_name: node_name.clone(),
            rediscovery: Duration::from_secs(args.kube_rediscovery_secs.max(1)),
            // Private to this process (parallel daemons on one host never share it).
            credentials_dir: std::env::temp_dir()
                .join(format!("proxy-daemon-{}", std::process::id()))
                .join("credentials"),
        });
    let tracing = trace_settings(args).map_err(|e| startup(e.to_string()))?;
    if cluster.is_some() && node_name.is_empty() {
        return Err(startup(
            "--kubernetes needs the node name: pass --node-name or set NODE_NAME (the DaemonSet sets it from spec.nodeName)",
        ));
    }
    let memory_cgroup = crate::memory::CgroupMemory::own();
    let memory_limit = match &args.memory_limit {
        Some(text) => Some(
            crate::memory::parse_quantity(text)
                .map_err(|e| startup(format!("--memory-limit (PROXY_MEMORY_LIMIT): {e}")))?,
        ),
        None => memory_cgroup.as_ref().and_then(|m| m.limit()),
    };
    Ok(Settings {
        config_dir,
        cluster,
        cgroup_root,
        capture: CaptureSettings {
            label_key: label_key.to_string(),
            label_value: label_value.to_string(),
            node_name,
            default_fail_mode: match args.fail_mode {
                FailModeArg::Open => FailMode::Open,
                FailModeArg::Closed => FailMode::Closed,
            },
            default_export_to: default_export_to(&args.default_export_to)?,
            trust_domain: args.trust_domain.clone(),
        },
        capture_mode: args.capture,
        sockmap: args.sockmap,
        outbound_port: args.outbound_port,
        hbone_port: args.hbone_port,
        inbound_port: args.inbound_port,
        ca: ca_settings(args)?,
        cert_ttl: Duration::from_secs(args.cert_ttl_secs.max(60)),
        outbound_traffic_policy: args.outbound_traffic_policy,
        admin_addr: args.admin_addr,
        metrics_addr: args.metrics_addr,
        health_addr: args.health_addr,
        bpf_pin_dir: args.bpf_pin_dir.clone(),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        detach_on_exit: args.detach_on_exit,
        run_dir: args.run_dir.clone(),
        stay_after_handover: args.stay_after_handover,
        admin_token: match &args.admin_token_file {
            None => None,
            Some(path) => {
                let token = std::fs::read_to_string(path)
                    .map_err(|e| startup(format!("--admin-token-file {}: {e}", path.display())))?;
                let token = token.trim();
                if token.len() < 16 {
                    return Err(startup(format!(
                        "--admin-token-file {}: the token must be at least 16 characters",
                        path.display()
                    )));
                }
                Some(AdminToken(Arc::from(token)))
            }
        },
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        mirror_max_body_bytes: args.mirror_max_body_bytes,
        mirror_max_in_flight: args.mirror_max_in_flight.max(1),
        dns_servers: crate::proxy::dns::parse_servers(&args.dns_servers)
            .map_err(|e| startup(e.to_string()))?,
        hosts_file: args.hosts_file.clone(),
        credentials_dir: args.credentials_dir.clone(),
        tls_session_cache: args.tls_session_cache,
        metrics_retention: Duration::from_secs(args.metrics_retention_secs),
        max_series_per_workload: args.max_series_per_workload,
        max_passthrough_lines_per_workload: args.max_passthrough_lines_per_workload,
        max_connections: args.max_connections,
        memory_limit,
        memory_cgroup,
        max_connections_per_namespace: args.max_connections_per_namespace,
        max_idle_upstream_connections: args.max_idle_upstream_connections,
        header_read_timeout: (args.http_header_read_timeout_ms > 0)
            .then(|| Duration::from_millis(args.http_header_read_timeout_ms)),
        jwks_allow: args.jwks_allow_cidr.clone(),
        tracing,
    })
}

async fn bind(addr: SocketAddr, flag: &str) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr).await.map_err(|e| {
        startup(format!(
            "{flag} {addr}: {e} (is another proxy-daemon running? pick another address)"
        ))
    })
}

/// State of the configuration source, for /config_dump and metrics.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ConfigStatus {
    pub generation: u64,
    pub last_success_unix_ms: u128,
    pub last_error: Vec<String>,
    pub last_error_unix_ms: Option<u128>,
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Loads and compiles the config dir; on any problem the caller keeps what it had.
fn load_config(
    loader: &mut local::Loader,
    settings: &Settings,
    published: &Published,
) -> Result<state::Snapshot, Vec<ConfigError>> {
    let Some(dir) = &settings.config_dir else {
        return Err(Vec::new());
    };
    let loaded = loader.load(dir);
    if loaded.errors.iter().any(ConfigError::is_error) {
        return Err(loaded.errors);
    }
    let mut snap = state::compile(
        &loaded.objects,
        &settings.capture,
        published.next_generation(),
    )?;
    // The loader's warnings (objects of Istio's that are valid but ignored) belong with
    // the compile's: logged once per change and shown in /config_dump.
    let mut warnings: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    warnings.append(&mut snap.findings);
    snap.findings = warnings;
    Ok(snap)
}

/// Makes a good snapshot current and records that it was.
fn publish(
    snap: state::Snapshot,
    published: &Published,
    metrics: &Metrics,
    status: &Mutex<ConfigStatus>,
) {
    let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
    st.generation = snap.generation;
    st.last_success_unix_ms = now_ms();
    st.last_error.clear();
    metrics
        .daemon
        .config_skipped_envoy_filters
        .set(snap.routes.skipped_envoy_filters as i64);
    metrics.daemon.config_conflicts.clear();
    for c in &snap.conflicts {
        metrics
            .daemon
            .config_conflicts
            .get_or_create(&crate::metrics::ConflictLabels {
                kind: c.kind(),
                reason: c.reason(),
            })
            .inc();
    }
    // What is accepted but ignored or doubtful, said once: only what the last snapshot
    // did not already say (cluster mode recompiles on every change).
    let before: std::collections::HashSet<String> =
        published.load().findings.iter().cloned().collect();
    for f in snap.findings.iter().filter(|f| !before.contains(*f)) {
        if f.contains(": warning: ") {
            warn!("{f}");
        } else {
            info!("{f}");
        }
    }
    published.store(snap);
    // The parse and compile peak is behind us; the old snapshot goes once its last
    // connection lets go of it.
    crate::memory::release_freed();
    metrics.daemon.config_reloads.inc();
    metrics
        .daemon
        .config_last_success
        .set((now_ms() / 1000) as i64);
}

/// Reports a configuration that is not used (each problem, a count, /config_dump); the
/// last good one keeps serving.
fn reject(errors: &[ConfigError], what: &str, metrics: &Metrics, status: &Mutex<ConfigStatus>) {
    metrics.daemon.config_errors.inc();
    for e in errors {
        error!("{e}");
    }
    warn!(
        problems = errors.len(),
        "{what} rejected; keeping the last good one"
    );
    let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
    st.last_error = errors.iter().map(ToString::to_string).collect();
    st.last_error_unix_ms = Some(now_ms());
}

/// Watches the config dir and publishes each good snapshot; a bad one is reported and the
/// last good one keeps serving.
async fn watch_config(
    mut loader: local::Loader,
    settings: Arc<Settings>,
    published: Arc<Published>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<ConfigStatus>>,
) {
    let Some(config_dir) = settings.config_dir.clone() else {
        return;
    };
    let mut loaded_print = local::fingerprint(&config_dir);
    let mut last_seen = loaded_print.clone();
    loop {
        tokio::time::sleep(CONFIG_POLL).await;
        let print = local::fingerprint(&config_dir);
        // Debounce: act once the directory has stopped changing for one poll interval.
        let stable = print == last_seen;
        last_seen = print.clone();
        if !stable || print == loaded_print {
            continue;
        }
        loaded_print = print;
        let started = Instant::now();
        // Parsing and compiling are CPU work: keep them off the runtime's workers.
        let (s, p) = (settings.clone(), published.clone());
        let joined = tokio::task::spawn_blocking(move || {
            let result = load_config(&mut loader, &s, &p);
            (loader, result)
        })
        .await;
        let (returned, result) = match joined {
            Ok(r) => r,
            Err(e) => {
                // A bug must not end reloads for the life of the process: count it, keep
                // the last good configuration, and start again with an empty cache.
                error!(error = %e, "configuration loader panicked; keeping the last good configuration");
                let panicked = ConfigError {
                    path: config_dir.clone(),
                    line: 0,
                    object: None,
                    message: format!("the configuration loader failed ({e}); the last good configuration keeps serving"),
                    severity: Default::default(),
                };
                reject(&[panicked], "configuration", &metrics, &status);
                loader = local::Loader::default();
                continue;
            }
        };
        loader = returned;
        match result {
            Ok(snap) => {
                let generation = snap.generation;
                publish(snap, &published, &metrics, &status);
                info!(
                    generation,
                    took_ms = started.elapsed().as_millis() as u64,
                    "configuration reloaded"
                );
            }
            Err(errors) => reject(&errors, "configuration", &metrics, &status),
        }
    }
}

/// Removes the private run directories (Secrets' key material) of earlier daemons that are
/// no longer running (a crash or OOM kill leaves them; with hostPID every run has a new pid).
fn remove_stale_run_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("proxy-daemon-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
            info!(dir = %e.path().display(), "removed an earlier daemon's credentials");
        }
    }
}

/// How often idle per-endpoint state is looked for, and how idle it must be to go.
const ENDPOINT_STATE_PRUNE: Duration = Duration::from_secs(30);
const ENDPOINT_STATE_IDLE: Duration = Duration::from_secs(600);

/// A burst of watch events (a re-list, a rollout) becomes one compile.
const CLUSTER_DEBOUNCE: Duration = Duration::from_millis(50);
/// At most this many compiles a second, however fast objects churn (a large cluster's pod
/// updates, or a tenant rewriting objects in a loop, must not keep a core busy).
const CLUSTER_MIN_COMPILE_INTERVAL: Duration = Duration::from_millis(250);

/// Kinds whose last accepted version is kept to stand in for a bad edit (the rules; pods,
/// services and slices are read leniently and are the API's own, so they are not kept
/// twice).
fn keeps_last_good(kind: &str) -> bool {
    matches!(
        kind,
        "Namespace"
            | "VirtualService"
            | "DestinationRule"
            | "ServiceEntry"
            | "Sidecar"
            | "EnvoyFilter"
    )
}

/// Cluster mode: compiles the watched objects into a snapshot on every change, once every
/// watch has had its first list. Objects that fail validation are skipped and reported
/// (each once, with `KIND/NAMESPACE/NAME: reason`); the rest is published.
async fn watch_cluster(
    store: Arc<cluster::ClusterStore>,
    settings: Arc<Settings>,
    published: Arc<Published>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<ConfigStatus>>,
    ready: Ready,
) {
    let mut first = Some(ready.register_task("kubernetes: first configuration"));
    let mut changed = store.subscribe();
    let mut reported: std::collections::BTreeSet<String> = Default::default();
    // The version of each rule the last published snapshot used.
    let mut last_good: Arc<
        std::collections::HashMap<
            crate::config::ObjectRef,
            crate::config::Located<crate::config::Object>,
        >,
    > = Default::default();
    let mut last_compile: Option<Instant> = None;
    let mut pending = true;
    loop {
        if !pending {
            // While waiting for the first lists, say every 2 s what is missing.
            match tokio::time::timeout(Duration::from_secs(2), changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    if first.is_some() {
                        info!(waiting_for = ?store.unsynced(), "waiting for the first list of every watched kind (not ready until then)");
                    }
                    continue;
                }
            }
            tokio::time::sleep(CLUSTER_DEBOUNCE).await;
        }
        pending = false;
        changed.borrow_and_update();
        if first.is_some() && !store.unsynced().is_empty() {
            continue;
        }
        if let Some(at) = last_compile {
            tokio::time::sleep_until((at + CLUSTER_MIN_COMPILE_INTERVAL).into()).await;
            changed.borrow_and_update();
        }
        last_compile = Some(Instant::now());
        let started = Instant::now();
        let (st, p, s, good) = (
            store.clone(),
            published.clone(),
            settings.clone(),
            last_good.clone(),
        );
        let joined = tokio::task::spawn_blocking(move || {
            let mut contents = st.contents();
            // A rule whose new version does not even parse keeps its last good version.
            for e in &contents.rejected {
                if let Some(previous) = e.object.as_ref().and_then(|o| good.get(o)) {
                    contents.objects.push(previous.clone());
                }
            }
            let objects = contents.objects.len();
            let compiled =
                state::compile_valid(contents.objects, &s.capture, p.next_generation(), &good);
            (compiled, contents.rejected, objects)
        })
        .await;
        let Ok((compiled, mut rejected, objects)) = joined else {
            error!("configuration compiler panicked; keeping the last good configuration");
            continue;
        };
        match compiled {
            Ok(state::Compiled {
                snapshot: snap,
                rejected: skipped,
                restored,
                objects: used,
            }) => {
                rejected.extend(skipped);
                let kept: std::collections::BTreeSet<_> = restored
                    .into_iter()
                    .chain(rejected.iter().filter_map(|e| e.object.clone()))
                    .filter(|o| last_good.contains_key(o))
                    .collect();
                last_good = Arc::new(
                    used.into_iter()
                        .filter(|o| keeps_last_good(&o.object_ref.kind))
                        .map(|o| (o.object_ref.clone(), o))
                        .collect(),
                );
                let mut by_kind: std::collections::BTreeMap<String, i64> = Default::default();
                for e in &rejected {
                    let line = e.to_string();
                    if let Some(o) = &e.object {
                        *by_kind.entry(o.kind.clone()).or_default() += 1;
                    }
                    if !reported.contains(&line) {
                        let kept_previous = e.object.as_ref().is_some_and(|o| kept.contains(o));
                        if kept_previous {
                            error!("{line} (its last good version keeps serving)");
                        } else {
                            error!(
                                "{line} (object skipped; the rest of the configuration applies)"
                            );
                        }
                    }
                }
                reported = rejected.iter().map(ToString::to_string).collect();
                metrics.daemon.config_rejected_objects.clear();
                for (kind, n) in by_kind {
                    metrics
                        .daemon
                        .config_rejected_objects
                        .get_or_create(&crate::metrics::KindLabels { kind })
                        .set(n);
                }
                let generation = snap.generation;
                publish(snap, &published, &metrics, &status);
                {
                    let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
                    st.last_error = reported.iter().cloned().collect();
                    if !rejected.is_empty() {
                        st.last_error_unix_ms = Some(now_ms());
                    }
                }
                if first.take().is_some() {
                    info!(
                        generation,
                        objects,
                        rejected = rejected.len(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "first configuration from the Kubernetes API"
                    );
                } else {
                    debug!(
                        generation,
                        objects,
                        took_ms = started.elapsed().as_millis() as u64,
                        "configuration updated from the Kubernetes API"
                    );
                }
            }
            Err(errors) => reject(
                &errors,
                "configuration from the Kubernetes API",
                &metrics,
                &status,
            ),
        }
    }
}

async fn drain_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Why the daemon stops when a successor took its sockets.
const HANDED_OVER: &str = "handed over to a new daemon";

async fn shutdown_signal(
    mut quit: watch::Receiver<bool>,
    handed: tokio::sync::oneshot::Receiver<()>,
) -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    // A dropped sender (the hand-over thread failed) is not a reason to stop.
    let handed = async {
        if handed.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tokio::select! {
            _ = quit.changed() => return "quitquitquit",
            _ = handed => return HANDED_OVER,
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = quit.changed() => "quitquitquit",
        _ = handed => HANDED_OVER,
    }
}

/// Metric series of a source workload whose pods have all left the node are removed once
/// `retention` has passed (long enough for a last scrape to see their final values);
/// a workload that comes back meanwhile keeps its series.
async fn expire_series(metrics: Arc<Metrics>, published: Arc<Published>, retention: Duration) {
    let mut gone_since: std::collections::HashMap<(String, String), std::time::Instant> =
        Default::default();
    let mut tick = tokio::time::interval(
        Duration::from_secs(1).min(retention.max(Duration::from_millis(200))),
    );
    loop {
        tick.tick().await;
        let snap = published.load();
        let live: std::collections::HashSet<(String, String)> = snap
            .pods
            .values()
            .map(|p| (p.workload.namespace.clone(), p.workload.workload.clone()))
            .collect();
        let mut sources = metrics.http.sources();
        sources.extend(metrics.tcp.sources());
        gone_since.retain(|k, _| !live.contains(k));
        for src in sources {
            if live.contains(&src) {
                continue;
            }
            let since = *gone_since
                .entry(src.clone())
                .or_insert_with(std::time::Instant::now);
            if since.elapsed() >= retention {
                let n = metrics.http.forget_source(&src.0, &src.1)
                    + metrics.tcp.forget_source(&src.0, &src.1);
                metrics.daemon.expired_series.inc_by(n as u64);
                info!(namespace = %src.0, workload = %src.1, series = n, "source workload left the node; its metric series expired");
                gone_since.remove(&src);
            }
        }
    }
}

/// The node's and each namespace's connection budget: as configured, else from the
/// open-file limit (two sockets per proxied connection, 1,024 descriptors kept for the
/// daemon's own files, listeners and upstream pools) and half of that per namespace.
/// (node, per namespace, idle upstream) connection budgets. File descriptors are shared
/// out so the daemon never reaches "too many open files": 1,024 for itself (listeners,
/// pinned maps, exporters), an eighth for idle upstream connections, the rest at two per
/// downstream connection (client and upstream socket).
fn connection_budgets(settings: &Settings) -> (usize, usize, usize) {
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024) as usize;
    let idle = match settings.max_idle_upstream_connections {
        0 => (nofile / 8).max(64),
        n => n,
    };
    let node = match settings.max_connections {
        0 => (nofile.saturating_sub(1024 + idle) / 2).max(64),
        n => n,
    };
    // And within memory: what the limit leaves after the daemon's own reserve, at
    // memory::CONNECTION_MEMORY a connection.
    let node = match (settings.max_connections, settings.memory_limit) {
        (0, Some(limit)) => {
            let by_memory = limit.saturating_sub(crate::memory::reserve(limit))
                / crate::memory::CONNECTION_MEMORY;
            node.min(by_memory as usize).max(64)
        }
        _ => node,
    };
    let per_namespace = match settings.max_connections_per_namespace {
        0 => (node / 2).max(1),
        n => n.min(node),
    };
    (node, per_namespace, idle)
}

/// Every proxied connection holds two sockets; the usual soft limit of 1024 would cap a
/// node at ~500 connections. Raise the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(error = %e, soft, hard, "could not raise the open-file limit");
            }
        }
    }
}

pub async fn run(args: RunArgs, logs: LogControl) -> Result<(), AppError> {
    let settings = Arc::new(preflight(&args)?);
    raise_fd_limit();
    let ready = Ready::new();
    let startup_block = ready.register_task("startup");

    // A daemon already running for these pins hands over its sockets (a rolling update):
    // the same ports and pod listeners, so no connect is refused meanwhile.
    let handover_path = crate::handover::socket_path(&settings.run_dir, &settings.bpf_pin_dir);
    let mut taken = match crate::handover::take(&handover_path) {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "no hand-over from a running daemon; starting fresh");
            None
        }
    };
    let handover_table = Arc::new(crate::handover::Table::default());
    let mut port = |name: &'static str, addr: SocketAddr, flag: &'static str| {
        let fd = taken.as_mut().and_then(|t| t.ports.remove(name));
        async move {
            if let Some(fd) = fd {
                let std = std::net::TcpListener::from(fd);
                // Only if it is the address this daemon is configured for.
                if std.local_addr().ok() == Some(addr) && std.set_nonblocking(true).is_ok() {
                    if let Ok(l) = TcpListener::from_std(std) {
                        return Ok(l);
                    }
                }
            }
            bind(addr, flag).await
        }
    };
    let admin_listener = port("admin", settings.admin_addr, "--admin-addr").await?;
    let metrics_listener = port("metrics", settings.metrics_addr, "--metrics-addr").await?;
    let health_listener = port("health", settings.health_addr, "--health-addr").await?;
    for (item, l) in [
        (crate::handover::Item::Admin, &admin_listener),
        (crate::handover::Item::Metrics, &metrics_listener),
        (crate::handover::Item::Health, &health_listener),
    ] {
        if let Ok(fd) = std::os::fd::AsFd::as_fd(l).try_clone_to_owned() {
            handover_table.set(item, Arc::new(fd));
        }
    }
    let taken_pods = taken
        .as_mut()
        .map(|t| std::mem::take(&mut t.pods))
        .unwrap_or_default();
    let taken_inbound = taken
        .as_mut()
        .map(|t| std::mem::take(&mut t.inbound))
        .unwrap_or_default();
    let taken_root = taken.as_mut().and_then(|t| t.node_root.take());

    let mut daemon_metrics = Metrics::new();
    // Each component registers its own metrics under the daemon's prefix.
    let cluster_metrics = Arc::new(cluster::ClusterMetrics::register(
        daemon_metrics
            .registry
            .sub_registry_with_prefix("proxy_daemon"),
    ));
    let (tracer, span_queue) = crate::spans::Tracer::new(
        settings.tracing.clone(),
        daemon_metrics
            .registry
            .sub_registry_with_prefix("proxy_daemon"),
    );
    daemon_metrics.set_series_cap(settings.max_series_per_workload);
    daemon_metrics.set_unnamed_lines_cap(settings.max_passthrough_lines_per_workload);
    let metrics = Arc::new(daemon_metrics);
    let published = Arc::new(Published::new());
    let config_status = Arc::new(Mutex::new(ConfigStatus::default()));
    let mut loader = local::Loader::default();
    if let Some(dir) = &settings.config_dir {
        match load_config(&mut loader, &settings, &published) {
            Ok(snap) => publish(snap, &published, &metrics, &config_status),
            Err(errors) => {
                for e in &errors {
                    eprintln!("{e}");
                }
                return Err(startup(format!(
                    "configuration in {} has {} problem(s) (listed above)",
                    dir.display(),
                    errors.len()
                )));
            }
        }
    }
    // Cluster mode: a client now (a broken kubeconfig is the operator's to fix: exit 2);
    // an unreachable API is not fatal: the watches retry and readiness says what is missing.
    let kube_client = match &settings.cluster {
        Some(c) => Some(
            cluster::client(c.kubeconfig.as_deref())
                .await
                .map_err(|e| startup(e.to_string()))?,
        ),
        None => None,
    };

    let iptables = settings.capture_mode == crate::cli::CaptureArg::Iptables;
    // Under `--capture iptables` nothing is loaded into the kernel: the rules go into each
    // pod's netns at enrolment and the original destination comes from the socket.
    let (attached, enrolment, inbound) = if iptables {
        if settings.capture.default_fail_mode == FailMode::Open {
            warn!("--capture iptables: a pod whose listener is gone is refused, not let out directly (fail-open needs --capture ebpf)");
        }
        (None, bpf::EnrolmentMaps::in_memory(), None)
    } else {
        let loaded = bpf::load_and_attach(&settings.cgroup_root, &settings.bpf_pin_dir)
            .map_err(|e| AppError::Runtime(anyhow::anyhow!("attaching eBPF programs: {e}")))?;
        let bpf::Loaded {
            attached,
            enrolment,
            inbound,
            logger,
        } = loaded;
        if let Some(logger) = logger {
            tokio::spawn(drain_ebpf_logs(logger));
        }
        (Some(attached), enrolment, Some(inbound))
    };
    let orig_dst: Box<dyn crate::proxy::OrigDstLookup> = match &attached {
        Some(a) => Box::new(
            a.orig_dst_table()
                .map_err(|e| AppError::Runtime(anyhow::anyhow!("{e}")))?,
        ),
        None => Box::new(crate::capture::iptables::SockOrigDst),
    };
    let dns = Arc::new(
        crate::proxy::dns::DnsCache::new(&settings.dns_servers, settings.hosts_file.clone())
            .map_err(|e| startup(e.to_string()))?,
    );
    tokio::spawn(dns.clone().run(published.clone()));
    tokio::spawn(expire_series(
        metrics.clone(),
        published.clone(),
        settings.metrics_retention,
    ));
    let tls = match &settings.cluster {
        Some(c) => {
            remove_stale_run_dirs();
            let _ = std::fs::remove_dir_all(&c.credentials_dir);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&c.credentials_dir)
                .map_err(|e| {
                    AppError::Runtime(anyhow::anyhow!(
                        "credentials dir {}: {e}",
                        c.credentials_dir.display()
                    ))
                })?;
            crate::proxy::tls::Originator::new(
                Some(c.credentials_dir.clone()),
                settings.tls_session_cache,
            )
            .namespaced()
        }
        None => crate::proxy::tls::Originator::new(
            settings.credentials_dir.clone(),
            settings.tls_session_cache,
        ),
    };
    // Set when the drain starts: HTTP connections close after the request in flight.
    let (drain_tx, drain_rx) = watch::channel(false);
    let (node_budget, namespace_budget, idle_budget) = connection_budgets(&settings);
    info!(
        node = node_budget,
        per_namespace = namespace_budget,
        idle_upstream = idle_budget,
        memory_limit = settings.memory_limit,
        "connection budgets"
    );
    let idle_upstream = Arc::new(crate::proxy::http::IdleBudget::new(
        idle_budget,
        &metrics.daemon,
    ));
    // Workload certificates: issued per identity of the pods enrolled here, renewed at
    // half-life.
    let certs = Arc::new(crate::identity::CertManager::new(
        certificate_authority(&settings, taken_root.as_deref(), &handover_table)?,
        &settings.capture.trust_domain,
        settings.cert_ttl,
        crate::identity::manager::CertMetrics {
            issued: metrics.daemon.workload_certificates_issued.clone(),
            failed: metrics.daemon.workload_certificates_failed.clone(),
            held: metrics.daemon.workload_certificates.clone(),
        },
    ));
    tokio::spawn(certs.clone().run_renewals());
    let inputs = Arc::new(ProxyInputs {
        orig_dst,
        metrics: metrics.clone(),
        settings: crate::proxy::ProxySettings {
            connect_timeout: settings.connect_timeout,
            outbound_policy: match settings.outbound_traffic_policy {
                crate::cli::OutboundTrafficPolicyArg::AllowAny => {
                    crate::proxy::OutboundPolicy::AllowAny
                }
                crate::cli::OutboundTrafficPolicyArg::RegistryOnly => {
                    crate::proxy::OutboundPolicy::RegistryOnly
                }
            },
            mirror_max_body_bytes: settings.mirror_max_body_bytes,
            header_read_timeout: settings.header_read_timeout,
            outbound_port: settings.outbound_port,
            hbone_port: settings.hbone_port,
            inbound_port: settings.inbound_port,
        },
        config: published.clone(),
        endpoints: crate::proxy::Endpoints::new(dns.clone()),
        mirror_slots: Arc::new(tokio::sync::Semaphore::new(settings.mirror_max_in_flight)),
        splice_pipes: Arc::new(tokio::sync::Semaphore::new(crate::proxy::tcp::SPLICE_PIPES)),
        tls: Arc::new(tls),
        tracer: tracer.clone(),
        draining: drain_rx,
        connections: crate::proxy::limits::ConnectionBudget::new(node_budget, namespace_budget),
        bodies: Default::default(),
        handshakes: Default::default(),
        jwks: crate::proxy::jwt::JwksCache::allowing(settings.jwks_allow.clone()),
        certs: certs.clone(),
        enrolled: Default::default(),
        idle_upstream,
    });
    tokio::spawn(watch_memory(inputs.clone(), settings.clone()));
    tokio::spawn(apply_mesh_tracing(
        tracer.clone(),
        published.clone(),
        settings.tracing.clone(),
    ));
    tokio::spawn(crate::spans::run_exporter(
        tracer.clone(),
        span_queue,
        collector_resolver(published.clone()),
    ));
    // Per-endpoint state of endpoints and hosts that left is dropped, so churn (pods,
    // DNS answers, a pod dialling many addresses) cannot grow it without bound.
    {
        let inputs = inputs.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ENDPOINT_STATE_PRUNE);
            loop {
                tick.tick().await;
                let gone = inputs.endpoints.prune(ENDPOINT_STATE_IDLE);
                if gone > 0 {
                    debug!(entries = gone, "forgot idle endpoint state");
                }
            }
        });
    }
    let enroller = Enroller::new(
        settings.cgroup_root.clone(),
        settings.outbound_port,
        enrolment,
        published.clone(),
        inputs.clone(),
        ready.clone(),
        crate::handover::PodListeners {
            table: handover_table.clone(),
            taken: taken_pods,
            taken_inbound,
        },
    );
    let enroller = match inbound {
        Some(inbound) => enroller.with_inbound(inbound),
        None => enroller,
    };
    let enroller = if iptables {
        enroller.with_iptables()
    } else if settings.sockmap {
        enroller.with_sockmap()
    } else {
        enroller
    };
    let workload_status = enroller.status();
    if let Err(e) =
        crate::capture::cgroup::watch_pod_cgroups(&settings.cgroup_root, enroller.waker())
    {
        warn!(error = %e, "no cgroup watch: new pods are found by the {} ms poll", crate::capture::enrol::RECONCILE_INTERVAL.as_millis());
    }
    let map_stats = attached
        .as_ref()
        .map(|a| a.map_stats())
        .transpose()
        .map_err(|e| AppError::Runtime(anyhow::anyhow!("{e}")))?;

    let cluster_store = match (kube_client, &settings.cluster) {
        (Some(client), Some(c)) => {
            // The routes' status follows the published snapshots (complete ones only:
            // cluster mode publishes once every kind has been listed).
            tokio::spawn(crate::config::route_status::run(
                client.clone(),
                published.clone(),
                cluster_metrics.route_status_writes.clone(),
            ));
            Some(cluster::start(client, c, cluster_metrics.clone(), &ready))
        }
        _ => None,
    };
    let mut dump = ConfigDump::default();
    if let Some(store) = &cluster_store {
        let st = store.clone();
        dump.add("kubernetes", Box::new(move || st.status()));
    }
    {
        let s = settings.clone();
        dump.add(
            "settings",
            Box::new(move || serde_json::to_value(&*s).unwrap_or_default()),
        );
        let info = attached.as_ref().map(|a| a.info.clone());
        let port = settings.outbound_port;
        dump.add(
            "ebpf",
            Box::new(move || match &info {
                Some(info) => serde_json::to_value(info).unwrap_or_default(),
                None => serde_json::json!({
                    "capture": "iptables",
                    "chain": crate::capture::iptables::CHAIN,
                    "redirect_to_port": port,
                    "upstream_mark": crate::capture::iptables::UPSTREAM_MARK,
                }),
            }),
        );
        let ws = workload_status.clone();
        dump.add(
            "workloads",
            Box::new(move || serde_json::to_value(&**ws.load()).unwrap_or_default()),
        );
        let p = published.clone();
        dump.add(
            "snapshot",
            Box::new(move || serde_json::to_value(&*p.load()).unwrap_or_default()),
        );
        let p = published.clone();
        dump.add(
            "effective_policies",
            Box::new(move || {
                let snap = p.load();
                let mut out = serde_json::Map::new();
                for (host, rules) in &snap.routes.destination_rules {
                    for r in rules {
                        let key = format!("{host} ({}/{})", r.namespace, r.name);
                        out.insert(
                            key,
                            serde_json::to_value(r.effective_all()).unwrap_or_default(),
                        );
                    }
                }
                serde_json::Value::Object(out)
            }),
        );
        let cs = config_status.clone();
        dump.add(
            "config",
            Box::new(move || {
                serde_json::to_value(&*cs.lock().unwrap_or_else(|p| p.into_inner()))
                    .unwrap_or_default()
            }),
        );
        let d = dns.clone();
        dump.add(
            "dns",
            Box::new(move || serde_json::to_value(d.states()).unwrap_or_default()),
        );
        let t = tracer.clone();
        dump.add("tracing", Box::new(move || t.dump()));
        let r = ready.clone();
        dump.add(
            "readiness",
            Box::new(move || serde_json::json!({ "pending": r.pending() })),
        );
    }
    let (quit_tx, quit_rx) = watch::channel(false);
    let admin_token = settings.admin_token.as_ref().map(|t| t.0.clone());
    let endpoint = |name| admin::Endpoint {
        name,
        refused: metrics.daemon.endpoint_connections_refused.clone(),
    };
    let servers = [
        tokio::spawn(admin::serve(
            admin_listener,
            admin::admin_handler(Arc::new(dump), logs, quit_tx),
            admin_token,
            endpoint("admin"),
        )),
        tokio::spawn(admin::serve(
            metrics_listener,
            admin::metrics_handler(metrics.clone(), {
                let metrics = metrics.clone();
                Arc::new(move || {
                    if let Some(m) = &map_stats {
                        m.export(&metrics.daemon);
                    }
                    metrics.refresh_process();
                })
            }),
            None,
            endpoint("metrics"),
        )),
        tokio::spawn(admin::serve(
            health_listener,
            admin::health_handler(ready.clone()),
            None,
            endpoint("health"),
        )),
    ];
    let watcher = match cluster_store {
        Some(store) => tokio::spawn(watch_cluster(
            store,
            settings.clone(),
            published.clone(),
            metrics.clone(),
            config_status.clone(),
            ready.clone(),
        )),
        _ => tokio::spawn(watch_config(
            loader,
            settings.clone(),
            published.clone(),
            metrics.clone(),
            config_status.clone(),
        )),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    // The enroller's first pass drops map entries of pods it does not want: it must not
    // run on the empty configuration of a cluster-mode daemon still listing the API
    // (fail-closed pods enrolled by an earlier daemon would go direct meanwhile).
    let enroller_task = {
        let published = published.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut changed = published.subscribe();
            while published.load().generation == 0 {
                tokio::select! {
                    r = changed.changed() => if r.is_err() { break },
                    _ = stop.changed() => return enroller.into_maps(),
                }
            }
            enroller.run(stop_rx).await
        })
    };
    drop(startup_block);
    // Serve our own hand-over socket, and tell a predecessor to drain once we are ready.
    let (stage_tx, mut stage_rx) = watch::channel(crate::handover::Stage::Serving);
    crate::handover::serve(handover_path, handover_table.clone(), stage_tx);
    // While a successor holds our sockets and gets ready, probes of the shared health
    // port reach either of us: ours say "not ready" so that only its answer counts.
    let (handed_tx, handed_rx) = tokio::sync::oneshot::channel();
    {
        let ready = ready.clone();
        tokio::spawn(async move {
            let mut handing = None;
            while stage_rx.changed().await.is_ok() {
                let stage = *stage_rx.borrow_and_update();
                match stage {
                    crate::handover::Stage::Taken => {
                        handing = Some(ready.register_task("handing over to a new daemon"));
                    }
                    crate::handover::Stage::Serving => handing = None,
                    crate::handover::Stage::Done => {
                        let _ = handed_tx.send(());
                        // Not ready again: this daemon is leaving.
                        std::mem::forget(handing.take());
                        return;
                    }
                }
            }
        });
    }
    if let Some(taken) = taken {
        let ready = ready.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + crate::handover::READY_WAIT;
            while !ready.is_ready() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = tokio::task::spawn_blocking(move || taken.confirm()).await;
        });
    }
    info!(
        config_dir = ?settings.config_dir,
        kubernetes = settings.cluster.is_some(),
        cgroup_root = %settings.cgroup_root.display(),
        node = %settings.capture.node_name,
        "proxy-daemon running"
    );

    let why = shutdown_signal(quit_rx, handed_rx).await;
    let handed_over = why == HANDED_OVER;
    if handed_over {
        // The successor answers on the same ports from now on.
        for s in &servers {
            s.abort();
        }
    }
    // Not ready from the first moment of the drain: load balancers and the DaemonSet's
    // rollout see it at once.
    let _draining = ready.register_task("draining: shutting down");
    info!(
        signal = why,
        "shutting down: closing listeners, draining connections"
    );
    watcher.abort();
    let _ = stop_tx.send(true);
    let _ = drain_tx.send(true);
    let maps = enroller_task.await.ok();
    let deadline = Instant::now() + settings.drain_timeout;
    while metrics.daemon.active_connections.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let left = metrics.daemon.active_connections.get();
    if left > 0 {
        warn!(
            connections = left,
            "drain timeout: closing remaining connections"
        );
    }
    drop(maps);
    if settings.detach_on_exit && !handed_over {
        if let Some(attached) = attached {
            attached.detach();
        }
    } else if attached.is_some() {
        // Stop is not uninstall: the programs and pins stay, so capture and fail-closed
        // hold while no daemon runs (fail-open pods connect directly, fail-closed ones are
        // refused) until the next daemon adopts them. `proxy-daemon uninstall` removes them.
        info!(
            pin_dir = %settings.bpf_pin_dir.display(),
            "leaving the eBPF programs and pins in place for the next daemon (`proxy-daemon uninstall` removes them)"
        );
        drop(attached);
    }
    if let (Some(c), false) = (&settings.cluster, handed_over) {
        if let Some(run_dir) = c.credentials_dir.parent() {
            let _ = std::fs::remove_dir_all(run_dir);
        }
    }
    for s in servers {
        s.abort();
    }
    if handed_over && settings.stay_after_handover {
        info!("handed over and drained; waiting for SIGTERM (the DaemonSet controller removes this pod)");
        let (_never_tx, never) = tokio::sync::oneshot::channel::<()>();
        let (_quit, quit) = watch::channel(false);
        shutdown_signal(quit, never).await;
    }
    Ok(())
}
