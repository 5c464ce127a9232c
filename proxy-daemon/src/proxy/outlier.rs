//! Passive health (Envoy's outlier detection), as Envoy runs it for each Istio cluster:
//!
//! - Every attempt's outcome is counted per endpoint *of a cluster* (a destination host,
//!   port and subset: Istio's `outbound|port|subset|host`), so an endpoint failing behind
//!   one subset is not ejected from another cluster that shares it.
//! - Runs of 5xx (`consecutive5xxErrors`), of 502/503/504 (`consecutiveGatewayErrors`) or,
//!   with `splitExternalLocalOriginErrors`, of locally-originated failures (connect
//!   failures, timeouts, resets: `consecutiveLocalOriginFailures`) eject the endpoint, as
//!   long as no more than `maxEjectionPercent` of the cluster is ejected (Envoy's rule, without
//!   `always_eject_one_host`, which Istio does not set: at the default 10 %, a cluster of
//!   fewer than 10 endpoints ejects none).
//! - An ejection lasts `baseEjectionTime` × the endpoint's ejection multiplier, capped at
//!   Envoy's `max_ejection_time` (300 s, or `baseEjectionTime` if longer); the endpoint
//!   returns at the first `interval` tick after that with its failure runs reset, and
//!   every tick it spends healthy lowers its multiplier by one (which grows only while the
//!   ejection it gives is under the cap, as in Envoy).
//! - Below `minHealthPercent` healthy endpoints, all are used (Envoy's panic threshold).
//!
//! The interval ticks are evaluated when endpoints are next chosen (a timer per cluster
//! would only wake to do what the next choice does anyway): each cluster keeps the time
//! its ticks count from.
//!
//! Health is kept per source workload, as each sidecar keeps its own: one tenant's failing
//! requests never eject an endpoint for another's pods.
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{metrics::SourceLabels, state::routes::Outlier};

/// Whose view of an endpoint's health (the source workload's).
pub type Scope = Arc<SourceLabels>;

/// Envoy's defaults where Istio leaves a field unset.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
/// Envoy's `max_ejection_time` default (Istio does not expose it).
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// Which cluster an endpoint is counted in: host, service port and subset, hashed (the
/// same for a given destination in every snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterKey(u64);

impl ClusterKey {
    pub fn new(host: &str, port: u32, subset: Option<&str>) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        host.hash(&mut h);
        port.hash(&mut h);
        subset.hash(&mut h);
        Self(h.finish())
    }
}

/// What one attempt to an endpoint came to.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// The upstream answered with this status.
    Status(u16),
    /// No answer: connect failure, timeout or reset (Envoy's locally-originated errors).
    LocalFailure,
}

#[derive(Debug)]
struct Health {
    /// Upstream 5xx and 502–504 in a row, counting local failures too (the default mode,
    /// where Envoy maps them to 503).
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// The same, upstream answers only (for splitExternalLocalOriginErrors).
    external_5xx: u32,
    external_gateway: u32,
    /// Local-origin failures in a row (for splitExternalLocalOriginErrors).
    local_origin: u32,
    /// When the run that crossed a threshold ended: the moment Envoy would have ejected.
    last_failure: Instant,
    ejected: Option<Ejection>,
    /// Envoy's ejection multiplier: +1 per ejection, −1 per interval tick spent healthy.
    multiplier: u32,
    /// Last attempt or check: an endpoint unused for long is forgotten.
    last_used: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Ejection {
    at: Instant,
    lasts: Duration,
}

impl Default for Health {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            consecutive_5xx: 0,
            consecutive_gateway: 0,
            external_5xx: 0,
            external_gateway: 0,
            local_origin: 0,
            last_failure: now,
            ejected: None,
            multiplier: 0,
            last_used: now,
        }
    }
}

impl Health {
    fn record(&mut self, outcome: Outcome) {
        let now = Instant::now();
        self.last_used = now;
        match outcome {
            Outcome::Status(code) if code < 500 => {
                self.consecutive_5xx = 0;
                self.consecutive_gateway = 0;
                self.external_5xx = 0;
                self.external_gateway = 0;
                // An answer is a local-origin success: the connection worked.
                self.local_origin = 0;
            }
            Outcome::Status(code) => {
                let gateway = matches!(code, 502..=504);
                self.consecutive_5xx += 1;
                self.external_5xx += 1;
                if gateway {
                    self.consecutive_gateway += 1;
                    self.external_gateway += 1;
                } else {
                    self.consecutive_gateway = 0;
                    self.external_gateway = 0;
                }
                self.local_origin = 0;
                self.last_failure = now;
            }
            Outcome::LocalFailure => {
                self.consecutive_5xx += 1;
                self.consecutive_gateway += 1;
                self.local_origin += 1;
                self.last_failure = now;
            }
        }
    }

    /// Whether a run has crossed one of the policy's thresholds.
    fn crossed(&self, policy: &Outlier) -> bool {
        let over = |limit: Option<u32>, run: u32| limit.is_some_and(|n| n > 0 && run >= n);
        if policy.split_external_local_origin_errors {
            over(policy.consecutive_5xx_errors, self.external_5xx)
                || over(policy.consecutive_gateway_errors, self.external_gateway)
                || over(policy.consecutive_local_origin_failures, self.local_origin)
        } else {
            over(policy.consecutive_5xx_errors, self.consecutive_5xx)
                || over(policy.consecutive_gateway_errors, self.consecutive_gateway)
        }
    }

    fn reset_runs(&mut self) {
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        self.external_5xx = 0;
        self.external_gateway = 0;
        self.local_origin = 0;
    }
}

/// One cluster's endpoints, as one source workload sees them.
#[derive(Debug)]
struct ClusterHealth {
    /// Interval ticks count from here (the cluster's first use, as Envoy's timer starts
    /// with the cluster; again from a change of `interval`).
    epoch: Instant,
    /// The interval the ticks were counted with.
    interval: Duration,
    /// Ticks already applied.
    ticks_done: u64,
    hosts: HashMap<SocketAddr, Health>,
}

impl ClusterHealth {
    fn new(now: Instant) -> Self {
        Self {
            epoch: now,
            interval: DEFAULT_INTERVAL,
            ticks_done: 0,
            hosts: HashMap::new(),
        }
    }

    /// Applies the interval ticks up to `now`: ejections that have run their time end at
    /// the first tick after it, and each tick an endpoint spends healthy lowers its
    /// multiplier.
    fn tick(&mut self, now: Instant, interval: Duration) {
        let interval = interval.max(Duration::from_millis(1));
        if interval != self.interval {
            // A new interval: its ticks count from now (as Envoy restarts its timer).
            self.interval = interval;
            self.epoch = now;
            self.ticks_done = 0;
            return;
        }
        let ticks_now = (now.duration_since(self.epoch).as_nanos() / interval.as_nanos()) as u64;
        if ticks_now <= self.ticks_done {
            return;
        }
        let since = self.ticks_done;
        for h in self.hosts.values_mut() {
            let healthy_ticks = match h.ejected {
                None => ticks_now - since,
                Some(e) => {
                    let due = e.at + e.lasts;
                    // The first tick at or after `due`.
                    let due_tick = due
                        .checked_duration_since(self.epoch)
                        .map(|d| d.as_nanos().div_ceil(interval.as_nanos()) as u64)
                        .unwrap_or(0)
                        .max(since + 1);
                    if due_tick <= ticks_now {
                        // Envoy's uneject: back in service with its runs cleared (failures
                        // of requests that were in flight meanwhile do not count).
                        h.ejected = None;
                        h.reset_runs();
                        ticks_now - due_tick
                    } else {
                        0
                    }
                }
            };
            h.multiplier = h
                .multiplier
                .saturating_sub(u32::try_from(healthy_ticks).unwrap_or(u32::MAX));
        }
        self.ticks_done = ticks_now;
    }
}

/// Passive health of every endpoint this proxy has used, per source workload and cluster.
#[derive(Default)]
pub struct HealthTable(Mutex<HashMap<(Scope, ClusterKey), ClusterHealth>>);

impl HealthTable {
    /// Forgets endpoints not used for `idle` and not ejected now (endpoints come and go
    /// with pods and DNS answers; their history must not pile up), and clusters left with
    /// none. Returns how many endpoints.
    pub fn prune(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut forgotten = 0;
        all.retain(|_, c| {
            let before = c.hosts.len();
            c.hosts.retain(|_, h| {
                h.ejected.is_some_and(|e| e.at + e.lasts > now)
                    || now.duration_since(h.last_used) < idle
            });
            forgotten += before - c.hosts.len();
            !c.hosts.is_empty()
        });
        forgotten
    }

    /// Endpoints remembered, over all clusters and workloads.
    pub fn len(&self) -> usize {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.values().map(|c| c.hosts.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What one attempt to `ep` in `cluster` came to.
    pub fn record(&self, scope: &Scope, cluster: ClusterKey, ep: SocketAddr, outcome: Outcome) {
        let now = Instant::now();
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.entry((scope.clone(), cluster))
            .or_insert_with(|| ClusterHealth::new(now))
            .hosts
            .entry(ep)
            .or_default()
            .record(outcome);
    }

    /// The endpoints of `cluster` to choose from now: `candidates` (the cluster's whole
    /// endpoint set) without the ejected ones, after applying the interval ticks and
    /// ejecting the endpoints whose runs crossed a threshold — within maxEjectionPercent —
    /// or all of them below minHealthPercent healthy (panic).
    pub fn filter(
        &self,
        scope: &Scope,
        cluster: ClusterKey,
        candidates: Vec<SocketAddr>,
        policy: &Outlier,
    ) -> Vec<SocketAddr> {
        let now = Instant::now();
        let interval = policy.interval.unwrap_or(DEFAULT_INTERVAL);
        let base = policy.base_ejection_time.unwrap_or(DEFAULT_BASE_EJECTION);
        let cap = MAX_EJECTION_TIME.max(base);
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let c = all
            .entry((scope.clone(), cluster))
            .or_insert_with(|| ClusterHealth::new(now));
        c.tick(now, interval);
        let total = candidates.len();
        let mut ejected_now = candidates
            .iter()
            .filter(|ep| c.hosts.get(ep).is_some_and(|h| h.ejected.is_some()))
            .count();
        for ep in &candidates {
            let Some(h) = c.hosts.get_mut(ep) else {
                continue;
            };
            if h.ejected.is_some() || !h.crossed(policy) {
                continue;
            }
            // Envoy: eject while the ejected share stays within maxEjectionPercent.
            let allowed = (ejected_now + 1) * 100 <= total * policy.max_ejection_percent as usize;
            h.reset_runs();
            if !allowed {
                continue;
            }
            // Envoy raises the multiplier only while the ejection it gives is under the
            // cap (one healthy tick per step brings it back down).
            if base.saturating_mul(h.multiplier) < cap + base {
                h.multiplier += 1;
            }
            h.ejected = Some(Ejection {
                at: h.last_failure,
                lasts: base.saturating_mul(h.multiplier).min(cap),
            });
            ejected_now += 1;
        }
        let healthy: Vec<SocketAddr> = candidates
            .iter()
            .filter(|ep| c.hosts.get(ep).is_none_or(|h| h.ejected.is_none()))
            .copied()
            .collect();
        // Envoy's panic threshold (Istio's minHealthPercent, 0 by default: off).
        if healthy.len() * 100 < total * policy.min_health_percent as usize {
            return candidates;
        }
        healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(workload: &str) -> Scope {
        Arc::new(SourceLabels {
            workload: workload.into(),
            namespace: "ns".into(),
            app: workload.into(),
            version: "v1".into(),
            canonical_service: workload.into(),
            canonical_revision: "v1".into(),
        })
    }

    fn policy() -> Outlier {
        Outlier {
            consecutive_5xx_errors: Some(1),
            consecutive_gateway_errors: None,
            interval: Some(Duration::from_millis(10)),
            base_ejection_time: Some(Duration::from_secs(60)),
            max_ejection_percent: 100,
            min_health_percent: 0,
            split_external_local_origin_errors: false,
            consecutive_local_origin_failures: None,
        }
    }

    fn eps(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect()
    }

    const CLUSTER: fn() -> ClusterKey = || ClusterKey::new("reviews", 80, None);

    #[test]
    fn idle_endpoints_are_forgotten_but_ejected_ones_kept() {
        let table = HealthTable::default();
        let me = scope("client");
        let [a, b] = [eps(2)[0], eps(2)[1]];
        let policy = policy();
        table.record(&me, CLUSTER(), a, Outcome::Status(200));
        table.record(&me, CLUSTER(), b, Outcome::Status(500));
        assert_eq!(
            table.filter(&me, CLUSTER(), vec![a, b], &policy),
            vec![a],
            "b ejected"
        );
        assert_eq!(
            table.filter(&scope("other"), CLUSTER(), vec![a, b], &policy),
            vec![a, b],
            "another workload's view is its own"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(table.prune(Duration::from_millis(10)), 1, "a forgotten");
        assert_eq!(table.len(), 1, "b kept while ejected");
        assert_eq!(
            table.filter(&me, CLUSTER(), vec![a, b], &policy),
            vec![a],
            "and still ejected"
        );
    }

    #[test]
    fn state_belongs_to_the_cluster_a_subset_is_its_own() {
        let table = HealthTable::default();
        let me = scope("client");
        let v1 = ClusterKey::new("reviews", 80, Some("v1"));
        let all = ClusterKey::new("reviews", 80, None);
        let [a, b] = [eps(2)[0], eps(2)[1]];
        table.record(&me, v1, a, Outcome::Status(503));
        assert_eq!(table.filter(&me, v1, vec![a], &policy()), Vec::new());
        assert_eq!(
            table.filter(&me, all, vec![a, b], &policy()),
            vec![a, b],
            "the same endpoint in another cluster is healthy there"
        );
    }

    #[test]
    fn max_ejection_percent_caps_ejections_even_below_one_endpoint() {
        let table = HealthTable::default();
        let me = scope("client");
        let ten = eps(10);
        let mut p = policy();
        p.max_ejection_percent = 20;
        for ep in &ten[..5] {
            table.record(&me, CLUSTER(), *ep, Outcome::Status(500));
        }
        assert_eq!(
            table.filter(&me, CLUSTER(), ten.clone(), &p).len(),
            8,
            "20 % of 10"
        );
        // 10 % of 3 endpoints is 0.3: Envoy (without always_eject_one_host, which Istio
        // does not set) ejects none.
        let three = eps(3);
        let other = ClusterKey::new("ratings", 80, None);
        p.max_ejection_percent = 10;
        for ep in &three {
            table.record(&me, other, *ep, Outcome::Status(500));
        }
        assert_eq!(table.filter(&me, other, three, &p).len(), 3);
    }

    #[test]
    fn ejections_grow_with_the_multiplier_and_end_at_an_interval_tick() {
        let table = HealthTable::default();
        let me = scope("client");
        let [a, b] = [eps(2)[0], eps(2)[1]];
        let mut p = policy();
        p.base_ejection_time = Some(Duration::from_millis(40));
        p.interval = Some(Duration::from_millis(25));
        let start = Instant::now();
        table.record(&me, CLUSTER(), a, Outcome::Status(500));
        assert_eq!(table.filter(&me, CLUSTER(), vec![a, b], &p), vec![b]);
        // Back at the first tick after 40 ms: 50 ms (ticks at 25, 50, 75 … ms).
        let back = wait_until_back(&table, &me, a, b, &p);
        let first = back.duration_since(start);
        assert!(
            first >= Duration::from_millis(40) && first < Duration::from_millis(120),
            "first ejection lasted {first:?}"
        );
        // Failing again at once: the multiplier is 2 (no healthy tick passed), 80 ms.
        let again = Instant::now();
        table.record(&me, CLUSTER(), a, Outcome::Status(500));
        assert_eq!(table.filter(&me, CLUSTER(), vec![a, b], &p), vec![b]);
        let second = wait_until_back(&table, &me, a, b, &p).duration_since(again);
        assert!(
            second >= Duration::from_millis(80) && second < Duration::from_millis(200),
            "second ejection lasted {second:?}"
        );
        assert!(second > first, "{second:?} after {first:?}");
    }

    fn wait_until_back(
        table: &HealthTable,
        me: &Scope,
        a: SocketAddr,
        b: SocketAddr,
        p: &Outlier,
    ) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if table.filter(me, CLUSTER(), vec![a, b], p).contains(&a) {
                return Instant::now();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("never came back");
    }

    #[test]
    fn split_local_origin_failures_count_apart_from_the_upstreams_5xx() {
        let table = HealthTable::default();
        let me = scope("client");
        let [a, b] = [eps(2)[0], eps(2)[1]];
        let mut p = policy();
        p.consecutive_5xx_errors = Some(3);
        // Default mode: a connect failure counts as a 5xx (Envoy maps it to 503).
        for _ in 0..3 {
            table.record(&me, CLUSTER(), a, Outcome::LocalFailure);
        }
        assert_eq!(table.filter(&me, CLUSTER(), vec![a, b], &p), vec![b]);
        // Split: three local failures are not three 5xx; five are (the default).
        let split = ClusterKey::new("split", 80, None);
        p.split_external_local_origin_errors = true;
        p.consecutive_local_origin_failures = Some(5);
        for _ in 0..3 {
            table.record(&me, split, a, Outcome::LocalFailure);
        }
        assert_eq!(table.filter(&me, split, vec![a, b], &p), vec![a, b]);
        for _ in 0..2 {
            table.record(&me, split, a, Outcome::LocalFailure);
        }
        assert_eq!(table.filter(&me, split, vec![a, b], &p), vec![b]);
        // And the upstream's own 5xx still count on their own.
        for _ in 0..3 {
            table.record(&me, split, b, Outcome::Status(500));
        }
        assert_eq!(table.filter(&me, split, vec![a, b], &p), Vec::new());
    }

    #[test]
    fn below_min_health_percent_every_endpoint_is_used() {
        let table = HealthTable::default();
        let me = scope("client");
        let four = eps(4);
        let mut p = policy();
        p.min_health_percent = 50;
        for ep in &four[..3] {
            table.record(&me, CLUSTER(), *ep, Outcome::Status(500));
        }
        assert_eq!(
            table.filter(&me, CLUSTER(), four.clone(), &p),
            four,
            "1 of 4 healthy is below 50 %: panic, all used"
        );
        p.min_health_percent = 0;
        assert_eq!(
            table.filter(&me, CLUSTER(), four.clone(), &p),
            vec![four[3]]
        );
    }
}
