//! Prometheus metrics: Istio's standard ones (`reporter="source"`) at the root of the
//! registry, the daemon's own under `proxy_daemon_`.
use std::{
    borrow::Cow,
    cell::RefCell,
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, LabelSetEncoder, MetricEncoder, NoLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, MetricType, TypedMetric},
    registry::Registry,
};

use crate::state::workload::UNKNOWN;
pub use crate::state::workload::{PeerLabels, SourceLabels};

/// What the data path knows of where a connection went.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct DestinationLabels {
    pub service: String,
    pub service_name: String,
    pub service_namespace: String,
}

pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

/// `destination_service` of traffic to a destination the configuration does not name:
/// the Host or SNI it carried when that is a host name or an address (lowercased: one
/// name, one series), else the address dialled. Both come from the pod; a value that is
/// not a name (quotes, spaces, control characters) never becomes a label.
pub fn unnamed_service(carried: Option<&str>, dialled: std::net::SocketAddr) -> String {
    match carried {
        Some(name) if is_host_name(name) => name.to_ascii_lowercase(),
        _ => dialled.to_string(),
    }
}

/// A DNS name, an IPv4 address or a bracketed IPv6 one (what a Host or SNI may hold).
pub fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'[' | b']')
        })
}
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

/// Which proxy reports a series: the client's (outbound) or the server's (inbound).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn label(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Who the two ends of a mutual TLS connection proved to be (SPIFFE IDs).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Principals {
    pub source: String,
    pub destination: String,
}

/// Istio's TCP metric labels, in full (values outside our view are `unknown`). Cloning
/// costs a few reference counts: the halves are shared.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct IstioTcpLabels {
    pub source: Arc<SourceLabels>,
    pub peer: Arc<PeerLabels>,
    pub service: Arc<DestinationLabels>,
    pub request_protocol: &'static str,
    pub response_flags: Cow<'static, str>,
    pub reporter: Reporter,
    /// Mutual TLS (HBONE): `connection_security_policy="mutual_tls"` and the principals.
    pub mtls: Option<Arc<Principals>>,
}

impl IstioTcpLabels {
    pub fn new(
        source: &Arc<SourceLabels>,
        peer: &Arc<PeerLabels>,
        service: &Arc<DestinationLabels>,
        response_flags: &str,
    ) -> Self {
        Self {
            source: source.clone(),
            peer: peer.clone(),
            service: service.clone(),
            request_protocol: "tcp",
            response_flags: match response_flags {
                "" => Cow::Borrowed("-"),
                f => Cow::Owned(f.to_string()),
            },
            reporter: Reporter::Source,
            mtls: None,
        }
    }

    /// The same series over mutual TLS between these principals.
    pub fn with_mtls(mut self, principals: Option<Arc<Principals>>) -> Self {
        self.mtls = principals;
        self
    }

    /// The same series with other response flags.
    pub fn with_flags(&self, flags: &str) -> Self {
        Self {
            response_flags: match flags {
                "" => Cow::Borrowed("-"),
                f => Cow::Owned(f.to_string()),
            },
            ..self.clone()
        }
    }

    /// The same series as the destination's proxy reports it.
    pub fn reported_by(mut self, reporter: Reporter) -> Self {
        self.reporter = reporter;
        self
    }

    /// Istio's TCP label set, in Istio's order.
    fn pairs(&self) -> [(&'static str, &str); 23] {
        let (s, p, d) = (&self.source, &self.peer, &self.service);
        let (source_principal, destination_principal, security) = match &self.mtls {
            Some(m) => (m.source.as_str(), m.destination.as_str(), "mutual_tls"),
            // The destination knows a connection without a client certificate is
            // plaintext; the source cannot tell what the other end does.
            None if self.reporter == Reporter::Destination => (UNKNOWN, UNKNOWN, "none"),
            None => (UNKNOWN, UNKNOWN, "unknown"),
        };
        [
            ("reporter", self.reporter.label()),
            ("source_workload", &s.workload),
            ("source_canonical_service", &s.canonical_service),
            ("source_canonical_revision", &s.canonical_revision),
            ("source_workload_namespace", &s.namespace),
            ("source_principal", source_principal),
            ("source_app", &s.app),
            ("source_version", &s.version),
            ("source_cluster", UNKNOWN),
            ("destination_workload", &p.workload),
            ("destination_workload_namespace", &p.namespace),
            ("destination_principal", destination_principal),
            ("destination_app", &p.app),
            ("destination_version", &p.version),
            ("destination_service", &d.service),
            ("destination_canonical_service", &p.canonical_service),
            ("destination_canonical_revision", &p.canonical_revision),
            ("destination_service_name", &d.service_name),
            ("destination_service_namespace", &d.service_namespace),
            ("destination_cluster", UNKNOWN),
            ("request_protocol", self.request_protocol),
            ("response_flags", &self.response_flags),
            ("connection_security_policy", security),
        ]
    }
}

impl EncodeLabelSet for IstioTcpLabels {
    fn encode(&self, encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.pairs().map(|(k, v)| (k, Escaped(v))).encode(encoder)
    }
}

/// A label value written as the Prometheus text format requires: `\`, `"` and line feeds
/// escaped. Istio's label values carry what pods chose (a Host, an SNI, pod labels from
/// local files): unescaped, one quote makes the node's whole scrape unparsable and a line
/// feed can forge series. Other control characters have no escape in the format; they
/// become U+FFFD.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl prometheus_client::encoding::EncodeLabelValue for Escaped<'_> {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        let v = self.0;
        if !v.chars().any(|c| c == '\\' || c == '"' || c.is_control()) {
            return encoder.write_str(v);
        }
        for c in v.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c if c.is_control() => encoder.write_char('\u{fffd}')?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Istio's request metric labels: the TCP set plus response code and gRPC status.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub response_code: u16,
    /// The gRPC status of a gRPC response (`grpc-status`), empty for other requests.
    pub grpc_response_status: Option<u16>,
    pub base: IstioTcpLabels,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let code = self.response_code.to_string();
        let grpc = self
            .grpc_response_status
            .map(|g| g.to_string())
            .unwrap_or_default();
        let base = self.base.pairs().map(|(k, v)| (k, Escaped(v)));
        let mut all: Vec<(&str, Escaped)> = Vec::with_capacity(base.len() + 2);
        // response_code and grpc_response_status sit just before response_flags.
        all.extend_from_slice(&base[..21]);
        all.push(("response_code", Escaped(&code)));
        all.push(("grpc_response_status", Escaped(&grpc)));
        all.extend_from_slice(&base[21..]);
        all.encode(encoder)
    }
}

/// Istio's (Envoy's default) buckets, used for durations in ms and for sizes in bytes.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// A histogram whose observations are a few relaxed atomic adds: no lock, so cores
/// recording into the same series never wait on each other.
#[derive(Clone, Debug)]
pub struct AtomicHistogram(Arc<HistogramCells>);

#[derive(Debug)]
struct HistogramCells {
    bounds: &'static [f64],
    /// One per bound, plus +Inf.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_bits: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self(Arc::new(HistogramCells {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }))
    }

    pub fn observe(&self, v: f64) {
        let c = &self.0;
        let i = c.bounds.partition_point(|b| *b < v);
        c.buckets[i].fetch_add(1, Ordering::Relaxed);
        c.count.fetch_add(1, Ordering::Relaxed);
        let mut cur = c.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match c
                .sum_bits
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        let mut buckets: Vec<(f64, u64)> = c
            .bounds
            .iter()
            .zip(c.buckets.iter())
            .map(|(b, n)| (*b, n.load(Ordering::Relaxed)))
            .collect();
        let inf = c.buckets[c.bounds.len()].load(Ordering::Relaxed);
        buckets.push((f64::MAX, inf));
        // The count is the buckets' total, so the exposition is always self-consistent.
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<NoLabelSet>(
            f64::from_bits(c.sum_bits.load(Ordering::Relaxed)),
            count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn ms_histogram() -> AtomicHistogram {
    AtomicHistogram::new(&DURATION_BUCKETS_MS)
}

type HistogramFamily<S> = Family<S, AtomicHistogram, fn() -> AtomicHistogram>;

/// The metric handles of one request series (cloned out of the families once).
#[derive(Clone)]
struct RequestHandles {
    requests: Counter,
    duration: AtomicHistogram,
    request_bytes: AtomicHistogram,
    response_bytes: AtomicHistogram,
}

/// One finished request, as Istio reports it.
pub struct RequestRecord {
    pub labels: RequestLabels,
    pub duration: std::time::Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

pub struct HttpMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: HistogramFamily<RequestLabels>,
    pub request_bytes: HistogramFamily<RequestLabels>,
    pub response_bytes: HistogramFamily<RequestLabels>,
    series: SeriesIndex<RequestLabels>,
}

/// Per-thread cache bound: past it the cache starts over (the families keep every series).
const HANDLE_CACHE_MAX: usize = 4096;

/// One worker thread's series → handles, with the index and epoch it was filled under.
type HandleCache<L, H> = RefCell<(usize, u64, HashMap<L, H>)>;

thread_local! {
    /// Per worker thread, so a request touches no lock shared between cores (the families'
    /// maps are locked only on a thread's first use of a series).
    static REQUEST_HANDLES: HandleCache<RequestLabels, RequestHandles> =
        RefCell::new((0, 0, HashMap::new()));
    static TCP_HANDLES: HandleCache<IstioTcpLabels, TcpHandles> =
        RefCell::new((0, 0, HashMap::new()));
}

/// Which series each source workload (namespace, workload) has, so the series of a
/// workload that left the node can be removed; removing bumps an epoch that the per-thread
/// handle caches compare, so a removed series' handles are never used again.
struct SeriesIndex<L> {
    by_source: Mutex<HashMap<(String, String), HashSet<L>>>,
    /// Scrape lines one label set of this family takes (a counter: 1 per counter family;
    /// a histogram: its buckets, +Inf, sum and count).
    lines_per_series: usize,
    /// Lines of series to destinations a pod chose (shared by the HTTP and TCP families).
    unnamed: Arc<UnnamedBudget>,
    epoch: AtomicU64,
    /// Series one source workload may have; past it, new label sets are folded into its
    /// overflow series (a pod looping over random Host headers cannot grow the node's
    /// scrape without bound).
    cap: AtomicUsize,
    /// Label sets folded into an overflow series (per thread that met them).
    overflowed: Counter,
}

/// Hand-over connections whose other end was not another daemon (see
/// `handover::check_peer`): counted from wherever they are met, before the registry is.
pub static HANDOVER_PEERS_REFUSED: std::sync::LazyLock<Counter> =
    std::sync::LazyLock::new(Counter::default);

/// Series per source workload by default (`--max-series-per-workload`).
pub const DEFAULT_MAX_SERIES_PER_WORKLOAD: usize = 2000;

/// Scrape lines one source workload's series to destinations the configuration does not
/// name may add, by default (`--max-passthrough-lines-per-workload`). Configured
/// destinations are bounded by the configuration; these are chosen by the pod (a Host
/// header, an SNI, a port), so they get a small budget of their own: about ten HTTP
/// destinations with their histograms, or a couple of hundred TCP ones, then one overflow
/// series per workload.
pub const DEFAULT_MAX_UNNAMED_LINES_PER_WORKLOAD: usize = 700;

/// Scrape lines spent per source workload on series to unnamed destinations
/// (PassthroughCluster, BlackHoleCluster), across the HTTP and TCP families.
#[derive(Debug)]
pub struct UnnamedBudget {
    used: Mutex<HashMap<(String, String), usize>>,
    limit: AtomicUsize,
}

impl Default for UnnamedBudget {
    fn default() -> Self {
        Self {
            used: Mutex::new(HashMap::new()),
            limit: AtomicUsize::new(DEFAULT_MAX_UNNAMED_LINES_PER_WORKLOAD),
        }
    }
}

impl UnnamedBudget {
    /// Takes `lines` for `source` if, after it, no more than `share` of the limit is used
    /// (quarters: exact destinations may use three, their overflow series all four).
    fn take(&self, source: &(String, String), lines: usize, quarters: usize) -> bool {
        let cap = self.limit.load(Ordering::Relaxed) / 4 * quarters;
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let now = used.entry(source.clone()).or_default();
        if *now + lines > cap {
            return false;
        }
        *now += lines;
        true
    }

    fn forget(&self, source: &(String, String)) {
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(source);
    }
}

/// What the series index needs of one family's label sets.
trait SeriesLabels: Clone + std::hash::Hash + Eq {
    /// The workload of this node a series belongs to (namespace, workload): the source
    /// for the series it reports as the source, the destination for those it reports as
    /// the destination. Its caps and its expiry when it leaves the node follow that
    /// workload.
    fn owner(&self) -> (&str, &str);
    /// Whether the destination is one the configuration does not name (the pod chose it).
    fn unnamed(&self) -> bool;
    /// The same source's overflow series for a named destination.
    fn overflowed(&self) -> Self;
    /// The same source's overflow series for an unnamed destination: destination
    /// `overflow`, the pseudo cluster, response code and flags kept.
    fn unnamed_overflow(&self) -> Self;
    /// The last resort once even those are spent: response code and flags cleared, so
    /// what is left is bounded by the few protocols and pseudo clusters.
    fn saturated(&self) -> Self;
}

/// What an overflow series names as its destination.
pub const OVERFLOW: &str = "overflow";

impl<L> Default for SeriesIndex<L> {
    fn default() -> Self {
        Self {
            by_source: Mutex::new(HashMap::new()),
            lines_per_series: 1,
            unnamed: Arc::default(),
            epoch: AtomicU64::new(0),
            cap: AtomicUsize::new(DEFAULT_MAX_SERIES_PER_WORKLOAD),
            overflowed: Counter::default(),
        }
    }
}

/// The destination half of an overflow series.
fn overflow_destination() -> (Arc<PeerLabels>, Arc<DestinationLabels>) {
    (
        PeerLabels::unknown(),
        Arc::new(DestinationLabels {
            service: OVERFLOW.into(),
            service_name: OVERFLOW.into(),
            service_namespace: UNKNOWN.into(),
        }),
    )
}

/// The source half of a destination-reported overflow series.
fn overflow_source() -> Arc<SourceLabels> {
    Arc::new(SourceLabels {
        workload: OVERFLOW.into(),
        namespace: UNKNOWN.into(),
        app: UNKNOWN.into(),
        version: UNKNOWN.into(),
        canonical_service: UNKNOWN.into(),
        canonical_revision: UNKNOWN.into(),
    })
}

impl SeriesLabels for IstioTcpLabels {
    fn owner(&self) -> (&str, &str) {
        match self.reporter {
            Reporter::Source => (&self.source.namespace, &self.source.workload),
            Reporter::Destination => (&self.peer.namespace, &self.peer.workload),
        }
    }

    fn unnamed(&self) -> bool {
        self.reporter == Reporter::Source
            && (self.service.service_name == PASSTHROUGH_CLUSTER
                || self.service.service_name == BLACKHOLE_CLUSTER)
    }

    /// The same source, protocol and flags, with the overflow destination (as the
    /// destination reports it: the same destination, with the overflow source).
    fn overflowed(&self) -> Self {
        if self.reporter == Reporter::Destination {
            return Self {
                source: overflow_source(),
                mtls: None,
                ..self.clone()
            };
        }
        let (peer, service) = overflow_destination();
        Self {
            peer,
            service,
            ..self.clone()
        }
    }

    fn unnamed_overflow(&self) -> Self {
        Self {
            peer: PeerLabels::unknown(),
            service: Arc::new(DestinationLabels {
                service: OVERFLOW.into(),
                service_name: self.service.service_name.clone(),
                service_namespace: UNKNOWN.into(),
            }),
            ..self.clone()
        }
    }

    fn saturated(&self) -> Self {
        let spent = if self.reporter == Reporter::Destination {
            self.overflowed()
        } else {
            self.unnamed_overflow()
        };
        Self {
            response_flags: Cow::Borrowed("-"),
            ..spent
        }
    }
}

impl SeriesLabels for RequestLabels {
    fn owner(&self) -> (&str, &str) {
        self.base.owner()
    }

    fn unnamed(&self) -> bool {
        self.base.unnamed()
    }

    fn overflowed(&self) -> Self {
        Self {
            base: self.base.overflowed(),
            ..self.clone()
        }
    }

    fn unnamed_overflow(&self) -> Self {
        Self {
            base: self.base.unnamed_overflow(),
            ..self.clone()
        }
    }

    fn saturated(&self) -> Self {
        Self {
            response_code: 0,
            grpc_response_status: None,
            base: self.base.saturated(),
        }
    }
}

impl<L: SeriesLabels> SeriesIndex<L> {
    fn with_lines(lines_per_series: usize, unnamed: Arc<UnnamedBudget>) -> Self {
        Self {
            lines_per_series,
            unnamed,
            ..Default::default()
        }
    }

    /// The series a new label set of `key`'s workload is counted in, recorded in `set`:
    /// itself while the caps allow, else its workload's overflow series.
    fn admit(&self, set: &mut HashSet<L>, labels: &L, key: &(String, String)) -> L {
        let cap = self.cap.load(Ordering::Relaxed);
        if !labels.unnamed() {
            if set.len() < cap {
                set.insert(labels.clone());
                return labels.clone();
            }
            let folded = labels.overflowed();
            set.insert(folded.clone());
            self.overflowed.inc();
            return folded;
        }
        // A destination the pod chose: within the workload's line budget (three quarters
        // of it for exact destinations, all of it once folded), else the last resort.
        for (candidate, quarters) in [(labels.clone(), 3), (labels.unnamed_overflow(), 4)] {
            let folded = quarters == 4;
            if set.contains(&candidate) {
                self.overflowed.inc();
                return candidate;
            }
            // The series cap holds for exact destinations; their overflow series is what
            // the cap folds into.
            let room = folded || set.len() < cap;
            if room && self.unnamed.take(key, self.lines_per_series, quarters) {
                if folded {
                    self.overflowed.inc();
                }
                set.insert(candidate.clone());
                return candidate;
            }
        }
        let last = labels.saturated();
        set.insert(last.clone());
        self.overflowed.inc();
        last
    }

    /// The handles of `labels` from this thread's `cache`; on a thread's first use of the
    /// series they are made by `make` and the series is indexed under `source`.
    fn handles<H: Clone>(
        &self,
        cache: &'static std::thread::LocalKey<HandleCache<L, H>>,
        labels: &L,
        make: impl FnOnce(&L) -> H,
    ) -> H {
        let owner = self as *const Self as usize;
        let epoch = self.epoch.load(Ordering::Acquire);
        cache.with(|cell| {
            let mut cache = cell.borrow_mut();
            if cache.0 != owner || cache.1 != epoch || cache.2.len() >= HANDLE_CACHE_MAX {
                *cache = (owner, epoch, HashMap::new());
            }
            if let Some(h) = cache.2.get(labels) {
                return h.clone();
            }
            let series = {
                let mut index = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
                let (namespace, workload) = labels.owner();
                let key = (namespace.to_string(), workload.to_string());
                let set = index.entry(key.clone()).or_default();
                if set.contains(labels) {
                    labels.clone()
                } else {
                    self.admit(set, labels, &key)
                }
            };
            let h = make(&series);
            cache.2.insert(labels.clone(), h.clone());
            h
        })
    }

    /// Takes the series of a source workload out of the index (the caller removes them
    /// from its families).
    fn take(&self, namespace: &str, workload: &str) -> HashSet<L> {
        let gone = self
            .by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(namespace.to_string(), workload.to_string()))
            .unwrap_or_default();
        self.unnamed
            .forget(&(namespace.to_string(), workload.to_string()));
        self.epoch.fetch_add(1, Ordering::AcqRel);
        gone
    }

    fn sources(&self) -> Vec<(String, String)> {
        self.by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(ms_histogram),
            request_bytes: Family::new_with_constructor(ms_histogram),
            response_bytes: Family::new_with_constructor(ms_histogram),
            series: SeriesIndex::default(),
        }
    }
}

impl HttpMetrics {
    pub fn record(&self, r: RequestRecord) {
        let l = &r.labels;
        let handles = self
            .series
            .handles(&REQUEST_HANDLES, l, |l| RequestHandles {
                requests: self.requests.get_or_create(l).clone(),
                duration: self.duration.get_or_create(l).clone(),
                request_bytes: self.request_bytes.get_or_create(l).clone(),
                response_bytes: self.response_bytes.get_or_create(l).clone(),
            });
        handles.requests.inc();
        handles.duration.observe(r.duration.as_secs_f64() * 1000.0);
        handles.request_bytes.observe(r.request_bytes as f64);
        handles.response_bytes.observe(r.response_bytes as f64);
    }

    /// Removes every series of a source workload that is gone from the node.
    pub fn forget_source(&self, namespace: &str, workload: &str) -> usize {
        let gone = self.series.take(namespace, workload);
        for l in &gone {
            self.requests.remove(l);
            self.duration.remove(l);
            self.request_bytes.remove(l);
            self.response_bytes.remove(l);
        }
        gone.len()
    }

    /// Source workloads that have series.
    pub fn sources(&self) -> Vec<(String, String)> {
        self.series.sources()
    }
}

/// Why a connection was refused, and whose it was (namespaces are bounded by the node's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundRefusalLabels {
    pub reason: &'static str,
}

/// `policy` is `namespace.name` of the policy that decided (or `no_allow_policy_matched`,
/// `no_allow_policy`); `decision` is allow, deny, audit, dry_run_allow or dry_run_deny.
/// Policy objects are few (each is a configuration object), so the series are bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwtRejectionLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorizationLabels {
    pub policy: String,
    pub decision: &'static str,
    /// tcp (a connection) or http (a request).
    pub layer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// node_limit | namespace_limit
    pub reason: &'static str,
    pub namespace: String,
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
pub struct IdleClosedLabels {
    /// node_cap | idle_timeout
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotListeningLabels {
    /// waiting_for_process | listener_port_taken | enrolment_error | cgroup_too_deep
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// redirected | fail_open_bypass | fail_closed_refused | netns_mismatch | not_listening |
    /// bind_refused | ipv6_direct | ipv6_refused | too_deep | foreign_listener |
    /// sockmap_* | autobind_refused | inbound_redirected | inbound_from_node |
    /// inbound_fail_open_bypass | inbound_fail_closed_refused
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
    series: SeriesIndex<IstioTcpLabels>,
}

/// The four TCP counters of one series (cloned out of the families once per thread).
#[derive(Clone)]
pub struct TcpHandles {
    pub opened: Counter,
    pub closed: Counter,
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
}

impl TcpMetrics {
    /// The counters of `labels`: no lock shared between cores once a thread has seen the
    /// series (the families and the expiry index are touched on first use only).
    pub fn handles(&self, labels: &IstioTcpLabels) -> TcpHandles {
        self.series.handles(&TCP_HANDLES, labels, |l| TcpHandles {
            opened: self.opened.get_or_create(l).clone(),
            closed: self.closed.get_or_create(l).clone(),
            sent_bytes: self.sent_bytes.get_or_create(l).clone(),
            received_bytes: self.received_bytes.get_or_create(l).clone(),
        })
    }

    /// Counts a connection opened.
    pub fn open(&self, labels: &IstioTcpLabels) {
        self.handles(labels).opened.inc();
    }

    /// Counts a connection closed.
    pub fn close(&self, labels: &IstioTcpLabels) {
        self.handles(labels).closed.inc();
    }

    /// Removes every series of a source workload that is gone from the node.
    pub fn forget_source(&self, namespace: &str, workload: &str) -> usize {
        let gone = self.series.take(namespace, workload);
        for l in &gone {
            self.opened.remove(l);
            self.closed.remove(l);
            self.sent_bytes.remove(l);
            self.received_bytes.remove(l);
        }
        gone.len()
    }

    pub fn sources(&self) -> Vec<(String, String)> {
        self.series.sources()
    }
}

#[derive(Default)]
pub struct DaemonMetrics {
    pub enrolled_pods: Gauge,
    /// Captured pods without a listener of ours, by why: their connects get the fail mode.
    pub pods_not_listening: Family<NotListeningLabels, Gauge>,
    pub listeners: Gauge,
    pub listener_failures: Counter,
    /// Retries not made because the destination's maxRetries were in flight.
    pub retry_overflows: Counter,
    pub enrolment_failures: Counter,
    pub config_reloads: Counter,
    pub config_errors: Counter,
    pub config_last_success: Gauge,
    /// Objects Istio accepts that the current snapshot skips (EnvoyFilters patching what a
    /// node proxy does not have).
    pub config_skipped_envoy_filters: Gauge,
    pub map_entries: Family<MapLabels, Gauge>,
    pub capture_decisions: Family<DecisionLabels, Gauge>,
    pub orig_dst_missing: Counter,
    /// Opaque TCP connections closed by `tcp.idleTimeout`.
    pub tcp_idle_timeouts: Counter,
    /// Upstream HTTP connections not kept idle because the node-wide cap was reached,
    /// or closed by `http.idleTimeout`.
    pub upstream_idle_closed: Family<IdleClosedLabels, Counter>,
    /// Its two series, made once at start.
    pub upstream_idle_closed_at_cap: Counter,
    pub upstream_idle_closed_idle: Counter,
    pub upstream_connect_failures: Counter,
    pub active_connections: Gauge,
    pub mirror_requests: Family<MirrorLabels, Counter>,
    pub mirror_dropped: Family<MirrorDropLabels, Counter>,
    /// Downstream connections reset at accept because a budget was spent.
    pub connections_refused: Family<RefusalLabels, Counter>,
    /// Bytes of request bodies held for mirror copies now, and the most ever held at once.
    pub mirror_copy_bytes: Gauge,
    pub mirror_copy_bytes_peak: Gauge,
    pub upstream_tls_handshakes: Family<TlsHandshakeLabels, Counter>,
    pub upstream_idle_connections: Gauge,
    pub expired_series: Counter,
    pub process_cpu_seconds: Counter<f64, AtomicU64>,
    pub process_resident_memory_bytes: Gauge,
    pub process_open_fds: Gauge,
    /// Scrapes answered 503 because too many were being encoded at once.
    pub scrapes_refused: Counter,
    pub process_threads: Gauge,
    pub build_info: Family<BuildLabels, Gauge>,
    pub config_rejected_objects: Family<KindLabels, Gauge>,
    /// Cross-object conflicts in the configuration in use (one namespace's object that
    /// would take another's host or address, competing VirtualServices…).
    pub config_conflicts: Family<ConflictLabels, Gauge>,
    /// Enrolled pods with a power over their own capture worth an operator's look.
    pub pods_flagged: Family<FlagLabels, Gauge>,
    /// The memory limit the daemon keeps to (`--memory-limit` or its cgroup's), its working
    /// set, and whether it is under pressure (1).
    pub memory_limit_bytes: Gauge,
    pub memory_working_set_bytes: Gauge,
    pub memory_pressure: Gauge,
    /// Workload certificates held (one per identity of the pods enrolled here), issued
    /// (renewals included) and failed.
    pub workload_certificates: Gauge,
    pub workload_certificates_issued: Counter,
    pub workload_certificates_failed: Counter,
    /// HBONE connections this node opened (TLS handshakes; streams reuse them).
    pub hbone_handshakes: Counter,
    /// HBONE connections or CONNECTs this node's pods refused (bad certificate, another
    /// pod's address asked for…).
    pub hbone_refused: Counter,
    /// Connections for a pod's app refused at the destination, by reason.
    pub inbound_refused: Family<InboundRefusalLabels, Counter>,
    /// Connections to the admin, metrics and health ports refused past their caps.
    pub endpoint_connections_refused: Family<EndpointRefusalLabels, Counter>,
    /// AuthorizationPolicy decisions at the destination, by deciding policy and outcome.
    pub authorization: Family<AuthorizationLabels, Counter>,
    /// Requests refused by RequestAuthentication, by reason.
    pub jwt_rejected: Family<JwtRejectionLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointRefusalLabels {
    /// admin | metrics | health
    pub endpoint: &'static str,
    /// endpoint_limit | peer_limit
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlagLabels {
    /// net_admin | port_range_covers_listener
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConflictLabels {
    pub kind: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
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
        let overflow = Family::<KindLabels, Counter>::default();
        let unnamed = Arc::new(UnnamedBudget::default());
        // A TCP label set is one line in each of the four counter families.
        let mut tcp = TcpMetrics {
            series: SeriesIndex::with_lines(4, unnamed.clone()),
            ..Default::default()
        };
        tcp.series.overflowed = overflow
            .get_or_create(&KindLabels { kind: "tcp".into() })
            .clone();
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
        // A request label set: the counter, and three histograms of the bounds, +Inf, sum
        // and count each.
        let mut http = HttpMetrics {
            series: SeriesIndex::with_lines(1 + 3 * (DURATION_BUCKETS_MS.len() + 3), unnamed),
            ..Default::default()
        };
        http.series.overflowed = overflow
            .get_or_create(&KindLabels {
                kind: "http".into(),
            })
            .clone();
        registry.register("istio_requests", "Total requests", http.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            http.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request size in bytes (headers and body)",
            http.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response size in bytes (headers and body)",
            http.response_bytes.clone(),
        );
        let mut daemon = DaemonMetrics::default();
        let at_cap = daemon
            .upstream_idle_closed
            .get_or_create(&IdleClosedLabels { reason: "node_cap" })
            .clone();
        daemon.upstream_idle_closed_at_cap = at_cap;
        let idle = daemon
            .upstream_idle_closed
            .get_or_create(&IdleClosedLabels {
                reason: "idle_timeout",
            })
            .clone();
        daemon.upstream_idle_closed_idle = idle;
        let sub = registry.sub_registry_with_prefix("proxy_daemon");
        sub.register(
            "metric_series_overflow",
            "Istio label sets folded into their source workload's overflow series (destination_service=\"overflow\") because it reached --max-series-per-workload",
            overflow,
        );
        sub.register(
            "enrolled_pods",
            "Pods whose connects are captured",
            daemon.enrolled_pods.clone(),
        );
        sub.register(
            "pods_not_listening",
            "Captured pods whose listener is not up, by reason: the kernel gives their connects the namespace's fail mode (cgroup_too_deep: the kernel cannot see the pod at all)",
            daemon.pods_not_listening.clone(),
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
            "retry_overflows",
            "Retries not made: the destination's connectionPool.http.maxRetries were in flight (Envoy's upstream_rq_retry_overflow)",
            daemon.retry_overflows.clone(),
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
            "config_skipped_envoy_filters",
            "EnvoyFilters in the current configuration that are skipped as unsupported (each with a warning)",
            daemon.config_skipped_envoy_filters.clone(),
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
            "tcp_idle_timeouts",
            "Opaque TCP connections closed after DestinationRule connectionPool.tcp.idleTimeout (default 1h) without a byte either way",
            daemon.tcp_idle_timeouts.clone(),
        );
        sub.register(
            "upstream_idle_closed",
            "Upstream HTTP/1 connections closed instead of kept idle: node_cap (--max-idle-upstream-connections reached) or idle_timeout (connectionPool.http.idleTimeout, default 1h)",
            daemon.upstream_idle_closed.clone(),
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
            "config_rejected_objects",
            "Objects skipped because they failed validation (cluster mode), by kind",
            daemon.config_rejected_objects.clone(),
        );
        sub.register(
            "memory_limit_bytes",
            "The memory limit the daemon keeps its connection budgets within (--memory-limit, else its cgroup's; absent: none)",
            daemon.memory_limit_bytes.clone(),
        );
        sub.register(
            "memory_working_set_bytes",
            "The daemon's memory in use (its cgroup's working set, else its resident set), sampled four times a second",
            daemon.memory_working_set_bytes.clone(),
        );
        sub.register(
            "memory_pressure",
            "1 while the daemon is above 85 % of its memory limit (until below 75 %): namespaces over their fair share of connections are refused new ones",
            daemon.memory_pressure.clone(),
        );
        sub.register(
            "workload_certificates",
            "Workload certificates held: one per identity of the pods enrolled on this node (keys in memory only)",
            daemon.workload_certificates.clone(),
        );
        sub.register(
            "workload_certificates_issued",
            "Workload certificates issued by the CA, renewals included",
            daemon.workload_certificates_issued.clone(),
        );
        sub.register(
            "workload_certificates_failed",
            "Workload certificates the CA could not issue (the identity's pods wait in their fail mode)",
            daemon.workload_certificates_failed.clone(),
        );
        sub.register(
            "hbone_handshakes",
            "HBONE (mutual TLS + HTTP/2) connections opened by this node's pods; each carries many tunnels",
            daemon.hbone_handshakes.clone(),
        );
        sub.register(
            "hbone_refused",
            "HBONE connections or CONNECT requests refused by this node's pods: a client certificate not of the mesh, a CONNECT for another address",
            daemon.hbone_refused.clone(),
        );
        sub.register(
            "inbound_refused",
            "Connections for a pod's app refused at the destination: plaintext_strict (no client certificate where PeerAuthentication is STRICT), proxy_port (a port of the proxy itself), tls_handshake (no or an untrusted client certificate, another trust domain), no_identity, other_address (HBONE CONNECT for another pod's address), handshake_budget (the caller's namespace has too many handshakes in progress), connection_budget, no_certificate, http2",
            daemon.inbound_refused.clone(),
        );
        sub.register(
            "authorization",
            "AuthorizationPolicy decisions at the destination: the deciding policy (namespace.name, or no_allow_policy_matched) and allow, deny, audit, dry_run_allow or dry_run_deny, per request (http) or connection (tcp)",
            daemon.authorization.clone(),
        );
        sub.register(
            "jwt_rejected",
            "Requests refused by RequestAuthentication at the destination: missing (presence REQUIRED), malformed, unknown_issuer, expired, not_yet_valid, audience (403), no_matching_key, signature, jwks_fetch",
            daemon.jwt_rejected.clone(),
        );
        sub.register(
            "endpoint_connections_refused",
            "Connections to the admin, metrics and health ports reset at accept: past the endpoint's cap, or the peer address's",
            daemon.endpoint_connections_refused.clone(),
        );
        sub.register(
            "handover_peers_refused",
            "Connections to the hand-over socket refused because the peer was not another daemon (not root, or another executable)",
            HANDOVER_PEERS_REFUSED.clone(),
        );
        sub.register(
            "pods_flagged",
            "Enrolled pods whose own powers weaken capture, by reason: net_admin (a process holds CAP_NET_ADMIN over the pod's network namespace and can rewrite its rules), port_range_covers_listener (its local port range includes the listener port; the port is reserved)",
            daemon.pods_flagged.clone(),
        );
        sub.register(
            "config_conflicts",
            "Conflicts in the configuration in use, each also a warning at its object's line: a ServiceEntry naming another namespace's Service address or host, a VirtualService for another namespace's Service, competing VirtualServices or DestinationRules, objects defined twice",
            daemon.config_conflicts.clone(),
        );
        sub.register(
            "mirror_requests",
            "Mirror copies sent, by route and outcome",
            daemon.mirror_requests.clone(),
        );
        sub.register(
            "scrapes_refused",
            "Scrapes answered 503 because the daemon was already encoding the most it does at once",
            daemon.scrapes_refused.clone(),
        );
        sub.register(
            "connections_refused",
            "Downstream connections reset at accept because the node's or the source namespace's connection budget was spent",
            daemon.connections_refused.clone(),
        );
        sub.register(
            "mirror_copy_bytes",
            "Bytes of streaming request bodies being copied for mirrors right now",
            daemon.mirror_copy_bytes.clone(),
        );
        sub.register(
            "mirror_copy_bytes_peak",
            "The most bytes ever held at once for mirror copies (bounded by the in-flight limit times --mirror-max-body-bytes)",
            daemon.mirror_copy_bytes_peak.clone(),
        );
        sub.register(
            "mirror_dropped",
            "Mirror copies not sent, by route and reason",
            daemon.mirror_dropped.clone(),
        );
        sub.register(
            "upstream_idle_connections",
            "Idle pooled HTTP upstream connections, all pods",
            daemon.upstream_idle_connections.clone(),
        );
        sub.register(
            "expired_series",
            "Metric series removed because their source workload left the node",
            daemon.expired_series.clone(),
        );
        sub.register(
            "process_cpu_seconds",
            "CPU time used by the daemon (user + system), in seconds",
            daemon.process_cpu_seconds.clone(),
        );
        sub.register(
            "process_resident_memory_bytes",
            "Resident memory of the daemon",
            daemon.process_resident_memory_bytes.clone(),
        );
        sub.register(
            "process_open_fds",
            "Open file descriptors of the daemon",
            daemon.process_open_fds.clone(),
        );
        sub.register(
            "process_threads",
            "Threads of the daemon",
            daemon.process_threads.clone(),
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

    /// The registry in Prometheus' classic text format (0.0.4), as Envoy serves Istio's
    /// metrics: counter families are named with their `_total` suffix and there is no
    /// `# EOF`, so every Prometheus text parser (and promtool) reads HELP and TYPE right.
    pub fn encode(&self) -> String {
        let mut open = String::new();
        if prometheus_client::encoding::text::encode(&mut open, &self.registry).is_err() {
            return String::new();
        }
        to_classic_text(&open)
    }
}

impl Metrics {
    /// Series one source workload may have in each of the request and TCP families.
    pub fn set_series_cap(&self, cap: usize) {
        self.http.series.cap.store(cap.max(1), Ordering::Relaxed);
        self.tcp.series.cap.store(cap.max(1), Ordering::Relaxed);
    }

    /// `--max-passthrough-lines-per-workload` (the HTTP and TCP families share it).
    pub fn set_unnamed_lines_cap(&self, lines: usize) {
        self.http
            .series
            .unnamed
            .limit
            .store(lines, Ordering::Relaxed);
    }

    /// The daemon's own process, from /proc/self (called on each scrape).
    pub fn refresh_process(&self) {
        let d = &self.daemon;
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces): state is field 3.
            let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            let cpu = (ticks(11) + ticks(12)) / hz;
            // A counter: add what was used since the last scrape.
            let seen = d.process_cpu_seconds.get();
            if cpu > seen {
                d.process_cpu_seconds.inc_by(cpu - seen);
            }
            d.process_threads.set(ticks(17) as i64);
        }
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            let pages: i64 = statm
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1);
            d.process_resident_memory_bytes.set(pages * page);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            d.process_open_fds.set(fds.count() as i64);
        }
    }
}

/// OpenMetrics text → classic Prometheus text: counter families take their samples'
/// `_total` name in HELP and TYPE; the `# EOF` marker goes.
// Kept: prometheus-client (0.23) encodes OpenMetrics text only, and promtool, Kiali and
// Grafana's Istio dashboards expect the classic names that Istio's own endpoint serves.
pub fn to_classic_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let mut pending_help: Option<&str> = None;
    for line in open.lines() {
        if line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(h) = pending_help.take() {
                out.push_str(h);
                out.push('\n');
            }
            let _ = rest;
            pending_help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let renamed = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = pending_help.take() {
                let text = h
                    .strip_prefix("# HELP ")
                    .and_then(|r| r.split_once(' '))
                    .map(|(_, t)| t)
                    .unwrap_or("");
                out.push_str(&format!("# HELP {renamed} {text}\n"));
            }
            out.push_str(&format!("# TYPE {renamed} {kind}\n"));
            continue;
        }
        if let Some(h) = pending_help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod cap_tests {
    use super::*;

    fn labels(source: &Arc<SourceLabels>, host: &str, code: u16) -> RequestLabels {
        RequestLabels {
            response_code: code,
            grpc_response_status: None,
            base: IstioTcpLabels::new(
                source,
                &PeerLabels::unknown(),
                &Arc::new(DestinationLabels {
                    service: host.into(),
                    service_name: PASSTHROUGH_CLUSTER.into(),
                    service_namespace: UNKNOWN.into(),
                }),
                "",
            ),
        }
    }

    fn source(workload: &str) -> Arc<SourceLabels> {
        Arc::new(SourceLabels {
            workload: workload.into(),
            namespace: "ns".into(),
            app: workload.into(),
            version: "v1".into(),
            canonical_service: workload.into(),
            canonical_revision: "v1".into(),
        })
    }

    #[test]
    fn a_workload_past_its_cap_counts_into_one_overflow_series() {
        let m = Metrics::new();
        m.set_series_cap(3);
        let (noisy, quiet) = (source("noisy"), source("quiet"));
        for i in 0..10 {
            m.http.record(RequestRecord {
                labels: labels(&noisy, &format!("h{i}.example"), 200),
                duration: std::time::Duration::from_millis(1),
                request_bytes: 1,
                response_bytes: 1,
            });
        }
        m.http.record(RequestRecord {
            labels: labels(&quiet, "api.example", 200),
            duration: std::time::Duration::from_millis(1),
            request_bytes: 1,
            response_bytes: 1,
        });
        let text = m.encode();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        let noisy_series = series
            .iter()
            .filter(|l| l.contains("source_workload=\"noisy\""))
            .count();
        assert_eq!(noisy_series, 4, "3 and the overflow: {series:#?}");
        assert!(series
            .iter()
            .any(|l| l.contains("source_workload=\"noisy\"")
                && l.contains("destination_service=\"overflow\"")
                && l.ends_with(" 7")));
        assert!(series
            .iter()
            .any(|l| l.contains("source_workload=\"quiet\"")
                && l.contains("destination_service=\"api.example\"")));
        assert!(
            text.contains("proxy_daemon_metric_series_overflow_total{kind=\"http\"} 7"),
            "{text}"
        );
    }

    fn tcp_labels(source: &Arc<SourceLabels>, service: &str, cluster: &str) -> IstioTcpLabels {
        IstioTcpLabels::new(
            source,
            &PeerLabels::unknown(),
            &Arc::new(DestinationLabels {
                service: service.into(),
                service_name: cluster.into(),
                service_namespace: UNKNOWN.into(),
            }),
            "",
        )
    }

    fn lines_of(text: &str, workload: &str) -> usize {
        text.lines()
            .filter(|l| l.contains(&format!("source_workload=\"{workload}\"")))
            .count()
    }

    #[test]
    fn what_a_pod_dials_outside_the_configuration_adds_a_bounded_number_of_scrape_lines() {
        let m = Metrics::new();
        let (noisy, quiet) = (source("noisy"), source("quiet"));
        // 1,500 Host headers and 1,500 ports, all passthrough.
        for i in 0..1500 {
            m.http.record(RequestRecord {
                labels: labels(&noisy, &format!("h{i}.example"), 200),
                duration: std::time::Duration::from_millis(1),
                request_bytes: 1,
                response_bytes: 1,
            });
            m.tcp.open(&tcp_labels(
                &noisy,
                &format!("10.0.0.1:{}", 1000 + i),
                PASSTHROUGH_CLUSTER,
            ));
        }
        let text = m.encode();
        let noisy_lines = lines_of(&text, "noisy");
        assert!(
            noisy_lines <= DEFAULT_MAX_UNNAMED_LINES_PER_WORKLOAD,
            "{noisy_lines} lines"
        );
        // Nothing is lost: every request and connection is counted, the rest in overflow.
        let total = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name) && l.contains("source_workload=\"noisy\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        assert_eq!(total("istio_requests_total{"), 1500.0);
        assert_eq!(total("istio_tcp_connections_opened_total{"), 1500.0);
        assert!(text.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("destination_service=\"overflow\"")
            && l.contains("destination_service_name=\"PassthroughCluster\"")));
        // Even a pod that also varies the response code stays within a few series more.
        for code in 200..600 {
            m.http.record(RequestRecord {
                labels: labels(&noisy, &format!("c{code}.example"), code),
                duration: std::time::Duration::from_millis(1),
                request_bytes: 1,
                response_bytes: 1,
            });
        }
        let noisy_lines = lines_of(&m.encode(), "noisy");
        assert!(
            noisy_lines <= DEFAULT_MAX_UNNAMED_LINES_PER_WORKLOAD + 2 * 67,
            "{noisy_lines}"
        );
        // Destinations the configuration names are not held by this budget.
        for i in 0..50 {
            m.tcp.open(&tcp_labels(
                &quiet,
                &format!("svc{i}.ns.svc.cluster.local"),
                &format!("svc{i}"),
            ));
        }
        assert_eq!(lines_of(&m.encode(), "quiet"), 50 * 4);
        // A workload that leaves gives its budget back.
        m.http.forget_source("ns", "noisy");
        m.tcp.forget_source("ns", "noisy");
        m.tcp
            .open(&tcp_labels(&noisy, "10.0.0.2:80", PASSTHROUGH_CLUSTER));
        assert!(m.encode().contains("destination_service=\"10.0.0.2:80\""));
    }

    #[test]
    fn label_values_are_escaped_so_no_request_can_break_or_forge_the_scrape() {
        let m = Metrics::new();
        let evil = "x\",destination_service=\"forged\"} 1\nistio_requests_total{source_workload=\"victim\"\\";
        m.tcp
            .open(&tcp_labels(&source("noisy"), evil, PASSTHROUGH_CLUSTER));
        let text = m.encode();
        let opened: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .collect();
        assert_eq!(opened.len(), 1, "{text}");
        assert!(!text.contains("source_workload=\"victim\""), "{text}");
        assert!(
            opened[0].contains(r#"destination_service="x\",destination_service=\"forged\"} 1\nistio_requests_total{source_workload=\"victim\"\\""#),
            "{}",
            opened[0]
        );
        // Control characters without an escape in the format are replaced.
        assert_eq!(
            unnamed_service(Some("a\u{1b}b"), "10.1.1.1:443".parse().unwrap()),
            "10.1.1.1:443"
        );
        assert_eq!(
            unnamed_service(Some("API.Example.com"), "10.1.1.1:443".parse().unwrap()),
            "api.example.com"
        );
    }
}
