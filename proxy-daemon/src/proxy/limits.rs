//! In-flight accounting: per endpoint (for LEAST_REQUEST) and per destination host (for
//! DestinationRule connectionPool limits, Envoy's circuit breakers: over the limit a
//! request may wait in a bounded pending queue, beyond it gets 503 with flag UO).
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::state::routes::ConnectionPool;

/// Requests and connections in flight per endpoint (LEAST_REQUEST reads it).
#[derive(Clone, Default)]
pub struct InFlight(Arc<Mutex<HashMap<SocketAddr, u32>>>);

/// Counts one request or connection to an endpoint while alive.
pub struct EndpointLoad {
    table: InFlight,
    ep: SocketAddr,
}

impl InFlight {
    pub fn start(&self, ep: SocketAddr) -> EndpointLoad {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ep)
            .or_default() += 1;
        EndpointLoad {
            table: self.clone(),
            ep,
        }
    }

    /// Index of the least-loaded endpoint; ties go to the round-robin position `rr`.
    pub fn least_loaded(&self, endpoints: &[SocketAddr], rr: usize) -> usize {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = endpoints.len();
        (0..n)
            .map(|k| (rr + k) % n)
            .min_by_key(|i| m.get(&endpoints[*i]).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for EndpointLoad {
    fn drop(&mut self) {
        let mut m = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ep) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ep);
            }
        }
    }
}

struct HostLimit {
    max: u32,
    slots: Arc<Semaphore>,
    pending: AtomicU32,
}

/// Which connectionPool limit a semaphore stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LimitKind {
    /// `tcp.maxConnections` (Envoy's max_connections): a request waits for a place.
    Connections,
    /// `http.http2MaxRequests` (Envoy's max_requests): active requests, none queued.
    Requests,
}

/// connectionPool limits per (source workload, destination host, limit): each sidecar has
/// its own circuit breakers, so one tenant's overload never opens another's.
#[derive(Default)]
pub struct HostLimits(
    Mutex<HashMap<(crate::proxy::outlier::Scope, String, LimitKind), Arc<HostLimit>>>,
);

/// Why admission failed: Envoy's UO (upstream overflow).
#[derive(Debug)]
pub struct Overflow;

/// The places a request (or connection) holds under its destination's limits, given back
/// when dropped.
#[derive(Debug, Default)]
pub struct Admitted {
    request: Option<OwnedSemaphorePermit>,
    connection: Option<OwnedSemaphorePermit>,
}

impl Admitted {
    /// Whether any limit applied.
    pub fn is_limited(&self) -> bool {
        self.request.is_some() || self.connection.is_some()
    }
}

/// Admits one request (or connection) to `host` under its connectionPool; the places are
/// held for the request's life. No limit configured: always admitted.
impl HostLimits {
    /// Forgets hosts with nothing in flight or waiting (their limits are rebuilt from the
    /// policy on next use). Returns how many.
    pub fn prune(&self) -> usize {
        let mut hosts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let before = hosts.len();
        hosts.retain(|_, l| {
            l.slots.available_permits() < l.max as usize || l.pending.load(Ordering::Acquire) > 0
        });
        before - hosts.len()
    }

    /// The limit of `kind` for (`scope`, `host`), rebuilt when its maximum changed.
    fn limit(
        &self,
        scope: &crate::proxy::outlier::Scope,
        host: &str,
        kind: LimitKind,
        max: u32,
    ) -> Arc<HostLimit> {
        let mut hosts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let entry = hosts
            .entry((scope.clone(), host.to_string(), kind))
            .or_insert_with(|| HostLimit::new(max));
        if entry.max != max {
            // The limit changed with the configuration: start over with the new one.
            *entry = HostLimit::new(max);
        }
        entry.clone()
    }

    pub async fn admit(
        &self,
        scope: &crate::proxy::outlier::Scope,
        host: &str,
        pool: Option<&ConnectionPool>,
        http: bool,
    ) -> Result<Admitted, Overflow> {
        let Some(pool) = pool else {
            return Ok(Admitted::default());
        };
        // Envoy's max_requests counts every active HTTP request (HTTP/1.1 included, as
        // Istio documents `http2MaxRequests`) and queues none: past it, UO at once.
        let request = match (http, pool.http2_max_requests) {
            (true, Some(max)) => Some(
                self.limit(scope, host, LimitKind::Requests, max)
                    .slots
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Overflow)?,
            ),
            _ => None,
        };
        let connection = match pool.max_connections {
            Some(max) => Some(
                self.wait_for_connection(scope, host, max, pool, http)
                    .await?,
            ),
            None => None,
        };
        Ok(Admitted {
            request,
            connection,
        })
    }

    /// A place under `tcp.maxConnections`: at once, or after waiting as one of at most
    /// `http1MaxPendingRequests` (HTTP; a TCP connection never waits).
    async fn wait_for_connection(
        &self,
        scope: &crate::proxy::outlier::Scope,
        host: &str,
        max: u32,
        pool: &ConnectionPool,
        http: bool,
    ) -> Result<OwnedSemaphorePermit, Overflow> {
        let limit = self.limit(scope, host, LimitKind::Connections, max);
        if let Ok(p) = limit.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        // Envoy's default pending limit is large; Istio's examples set it small on purpose.
        let max_pending = if http {
            pool.http1_max_pending_requests.unwrap_or(u32::MAX)
        } else {
            0
        };
        if limit.pending.fetch_add(1, Ordering::AcqRel) >= max_pending {
            limit.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Overflow);
        }
        // Envoy keeps a pending request until a slot frees or its route timeout ends; the
        // route timeout ends it here too (the caller's deadline), and this bound keeps a
        // request without one from waiting for ever.
        let waited =
            tokio::time::timeout(PENDING_WAIT_LIMIT, limit.slots.clone().acquire_owned()).await;
        limit.pending.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Overflow),
        }
    }
}

impl HostLimit {
    fn new(max: u32) -> Arc<Self> {
        Arc::new(HostLimit {
            max,
            slots: Arc::new(Semaphore::new(max as usize)),
            pending: AtomicU32::new(0),
        })
    }
}

/// Retries in flight per (source workload, destination host), under the destination's
/// `connectionPool.http.maxRetries` (Istio's default: no limit).
#[derive(Default)]
pub struct RetryLimits(Mutex<HashMap<(crate::proxy::outlier::Scope, String), Arc<AtomicU32>>>);

/// One retry's place under maxRetries, given back when dropped.
pub struct RetrySlot(Option<Arc<AtomicU32>>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        if let Some(n) = &self.0 {
            n.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl RetryLimits {
    /// A place for one more retry to `host`, or None when `max` are already in flight.
    pub fn begin(
        &self,
        scope: &crate::proxy::outlier::Scope,
        host: &str,
        max: Option<u32>,
    ) -> Option<RetrySlot> {
        let Some(max) = max else {
            return Some(RetrySlot(None));
        };
        let counter = {
            let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
            all.entry((scope.clone(), host.to_string()))
                .or_default()
                .clone()
        };
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| RetrySlot(Some(counter)))
    }

    /// Forgets hosts with no retry in flight. Returns how many.
    pub fn prune(&self) -> usize {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let before = all.len();
        all.retain(|_, n| n.load(Ordering::Acquire) > 0);
        before - all.len()
    }
}

/// The longest a request waits in a connection pool's pending queue.
const PENDING_WAIT_LIMIT: Duration = Duration::from_secs(10);

/// Why a downstream connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node's budget (derived from the open-file limit) is spent.
    Node,
    /// The source namespace's share is spent: one tenant cannot starve the others.
    Namespace,
    /// The daemon is near its memory limit and the namespace holds more than its fair
    /// share of the connections: it gets no new ones until the pressure passes.
    MemoryPressure,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Node => "node_limit",
            Refusal::Namespace => "namespace_limit",
            Refusal::MemoryPressure => "memory_pressure",
        }
    }
}

/// Downstream connections in flight, node-wide and per source namespace (a tenant
/// budget). Each proxied connection holds two sockets, so the node budget keeps the
/// daemon clear of "too many open files".
pub struct ConnectionBudget {
    node: Arc<Semaphore>,
    node_size: usize,
    per_namespace: usize,
    namespaces: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Set while the daemon is under memory pressure (see `memory::PRESSURE_ON`).
    pressure: std::sync::atomic::AtomicBool,
}

/// Under memory pressure a namespace keeps getting connections up to this many whatever
/// its share: a small tenant is never the one refused.
const PRESSURE_FLOOR: usize = 16;

/// A connection's place in both budgets, held for its life.
pub struct ConnectionPermit {
    _node: OwnedSemaphorePermit,
    _namespace: OwnedSemaphorePermit,
}

impl ConnectionBudget {
    pub fn new(node: usize, per_namespace: usize) -> Self {
        Self {
            node: Arc::new(Semaphore::new(node.max(1))),
            node_size: node.max(1),
            per_namespace: per_namespace.max(1),
            namespaces: Mutex::new(HashMap::new()),
            pressure: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Memory pressure on or off (the daemon's memory watch sets it).
    pub fn set_memory_pressure(&self, on: bool) {
        self.pressure.store(on, Ordering::Relaxed);
    }

    /// A place for one more connection from `namespace`, or why there is none (never waits).
    pub fn admit(&self, namespace: &str) -> Result<ConnectionPermit, Refusal> {
        let pressure = self.pressure.load(Ordering::Relaxed);
        let ns = {
            let mut map = self.namespaces.lock().unwrap_or_else(|p| p.into_inner());
            // Looked up before inserting: an accept allocates only for a new namespace.
            let ns = match map.get(namespace) {
                Some(s) => s.clone(),
                None => map
                    .entry(namespace.to_string())
                    .or_insert_with(|| Arc::new(Semaphore::new(self.per_namespace)))
                    .clone(),
            };
            if pressure && self.over_fair_share(&ns, &map) {
                return Err(Refusal::MemoryPressure);
            }
            ns
        };
        let namespace = ns.try_acquire_owned().map_err(|_| Refusal::Namespace)?;
        let node = self
            .node
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Node)?;
        Ok(ConnectionPermit {
            _node: node,
            _namespace: namespace,
        })
    }
}

impl ConnectionBudget {
    /// Whether the namespace of `ns` holds more connections than the node's in use shared
    /// evenly among the namespaces that hold any (and more than [`PRESSURE_FLOOR`]).
    fn over_fair_share(&self, ns: &Semaphore, all: &HashMap<String, Arc<Semaphore>>) -> bool {
        let held =
            |s: &Semaphore| self.per_namespace - s.available_permits().min(self.per_namespace);
        let mine = held(ns);
        if mine < PRESSURE_FLOOR {
            return false;
        }
        let in_use = self.node_size - self.node.available_permits().min(self.node_size);
        let holders = all.values().filter(|s| held(s) > 0).count().max(1);
        mine * holders > in_use
    }
}

/// TLS handshakes in progress at the pods' HBONE ports, per source namespace (the
/// caller's address as the cluster state names it; callers it does not know share one
/// place). A pod that opens connections faster than they complete, or stalls them midway,
/// holds at most this many of its namespace's handshakes at once; the rest are reset at
/// accept, and other namespaces' handshakes are not held up by it.
pub struct HandshakeBudget {
    per_namespace: usize,
    inflight: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Handshakes one source namespace may have in progress on this node.
pub const HANDSHAKES_PER_NAMESPACE: usize = 64;

impl Default for HandshakeBudget {
    fn default() -> Self {
        Self::new(HANDSHAKES_PER_NAMESPACE)
    }
}

impl HandshakeBudget {
    pub fn new(per_namespace: usize) -> Self {
        Self {
            per_namespace: per_namespace.max(1),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one more handshake of `namespace`'s, held until it completes.
    pub fn begin(&self, namespace: &str) -> Option<OwnedSemaphorePermit> {
        let sem = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            // Namespaces with nothing in progress are forgotten as others arrive.
            if map.len() > 1024 {
                let full = self.per_namespace;
                map.retain(|_, s| s.available_permits() < full);
            }
            map.entry(namespace.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_namespace)))
                .clone()
        };
        sem.try_acquire_owned().ok()
    }
}

/// Request bodies held in memory for a retry (at most `RETRY_BUFFER_LIMIT` each), per
/// source namespace: one tenant's many concurrent uploads (h2 streams on one connection
/// need only one connection's place) stream through unbuffered past its share, and are
/// not retried, rather than fill the daemon's memory.
pub struct BodyBudget {
    per_namespace_kib: usize,
    namespaces: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Bytes of buffered request bodies one namespace may hold at once.
pub const BODY_BUFFER_PER_NAMESPACE: usize = 32 << 20;

impl Default for BodyBudget {
    fn default() -> Self {
        Self {
            per_namespace_kib: BODY_BUFFER_PER_NAMESPACE / 1024,
            namespaces: Mutex::new(HashMap::new()),
        }
    }
}

impl BodyBudget {
    /// Room to hold `bytes` of `namespace`'s request body while the request lasts, or
    /// None (then it streams).
    pub fn reserve(&self, namespace: &str, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let kib = u32::try_from(bytes.div_ceil(1024)).ok()?;
        let ns = {
            let mut map = self.namespaces.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(namespace) {
                Some(s) => s.clone(),
                None => map
                    .entry(namespace.to_string())
                    .or_insert_with(|| Arc::new(Semaphore::new(self.per_namespace_kib)))
                    .clone(),
            }
        };
        ns.try_acquire_many_owned(kib).ok()
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn one_namespace_cannot_take_the_whole_node() {
        let b = ConnectionBudget::new(10, 4);
        let noisy: Vec<_> = (0..4).map(|_| b.admit("noisy").unwrap()).collect();
        assert_eq!(b.admit("noisy").err(), Some(Refusal::Namespace));
        let quiet: Vec<_> = (0..4).map(|_| b.admit("quiet").unwrap()).collect();
        let third: Vec<_> = (0..2).map(|_| b.admit("third").unwrap()).collect();
        assert_eq!(b.admit("fourth").err(), Some(Refusal::Node));
        drop(noisy);
        assert!(
            b.admit("noisy").is_ok(),
            "places come back when connections end"
        );
        drop((quiet, third));
    }

    #[test]
    fn under_memory_pressure_only_a_namespace_over_its_fair_share_is_refused() {
        let b = ConnectionBudget::new(1000, 600);
        let noisy: Vec<_> = (0..500).map(|_| b.admit("noisy").unwrap()).collect();
        let quiet: Vec<_> = (0..20).map(|_| b.admit("quiet").unwrap()).collect();
        b.set_memory_pressure(true);
        assert_eq!(b.admit("noisy").err(), Some(Refusal::MemoryPressure));
        assert!(b.admit("quiet").is_ok(), "20 of 520 is under half");
        assert!(
            b.admit("new").is_ok(),
            "a namespace with nothing gets its floor"
        );
        b.set_memory_pressure(false);
        assert!(b.admit("noisy").is_ok());
        drop((noisy, quiet));
    }

    #[test]
    fn buffered_bodies_are_a_namespaces_share_and_come_back() {
        let b = BodyBudget::default();
        let held: Vec<_> = (0..512)
            .map(|_| b.reserve("noisy", 64 * 1024).expect("within the share"))
            .collect();
        assert!(
            b.reserve("noisy", 1).is_none(),
            "32 MiB held: the next streams"
        );
        assert!(b.reserve("quiet", 64 * 1024).is_some());
        drop(held);
        assert!(b.reserve("noisy", 64 * 1024).is_some());
    }
}

#[cfg(test)]
mod breaker_tests {
    use super::*;
    use crate::metrics::SourceLabels;

    fn scope(workload: &str) -> crate::proxy::outlier::Scope {
        Arc::new(SourceLabels {
            workload: workload.into(),
            namespace: workload.into(),
            app: workload.into(),
            version: "v1".into(),
            canonical_service: workload.into(),
            canonical_revision: "v1".into(),
        })
    }

    #[tokio::test]
    async fn one_workloads_open_breaker_is_not_anothers() {
        let limits = HostLimits::default();
        let pool = ConnectionPool {
            max_connections: Some(1),
            connect_timeout: None,
            http1_max_pending_requests: Some(0),
            http2_max_requests: None,
            max_requests_per_connection: None,
            max_retries: None,
            ..Default::default()
        };
        let (noisy, quiet) = (scope("noisy"), scope("quiet"));
        let held = limits.admit(&noisy, "h", Some(&pool), true).await;
        assert!(held.as_ref().is_ok_and(Admitted::is_limited));
        assert!(
            limits.admit(&noisy, "h", Some(&pool), true).await.is_err(),
            "the noisy workload's breaker is open (UO)"
        );
        assert!(
            limits
                .admit(&quiet, "h", Some(&pool), true)
                .await
                .is_ok_and(|a| a.is_limited()),
            "the quiet one's is its own"
        );
    }
}
