//! Passive health (Envoy's outlier detection): every attempt's outcome is counted per
//! endpoint; when endpoints are chosen, a DestinationRule's outlierDetection turns long
//! enough runs of 5xx / gateway errors into an ejection for baseEjectionTime × (number of
//! ejections so far), never ejecting more than maxEjectionPercent of the endpoints.
//! Health is kept per source workload, as each sidecar keeps its own: one tenant's failing
//! requests never eject an endpoint for another's pods.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use std::sync::Arc;

use crate::{metrics::SourceLabels, state::routes::Outlier};

/// Whose view of an endpoint's health (the source workload's).
pub type Scope = Arc<SourceLabels>;

struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
    /// Last attempt or check: an endpoint unused for long is forgotten.
    last_used: Instant,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            consecutive_5xx: 0,
            consecutive_gateway: 0,
            ejected_until: None,
            ejections: 0,
            last_used: Instant::now(),
        }
    }
}

/// Passive health of every endpoint this proxy has used.
#[derive(Default)]
pub struct HealthTable(Mutex<HashMap<(Scope, SocketAddr), Health>>);

impl HealthTable {
    /// Forgets endpoints not used for `idle` and not ejected now (endpoints come and go
    /// with pods and DNS answers; their history must not pile up). Returns how many.
    pub fn prune(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let before = all.len();
        all.retain(|_, h| {
            h.ejected_until.is_some_and(|t| t > now) || now.duration_since(h.last_used) < idle
        });
        before - all.len()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What one attempt to `ep` came to: a status, or a failure before one.
    pub fn record(&self, scope: &Scope, ep: SocketAddr, status: Option<u16>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let h = all.entry((scope.clone(), ep)).or_default();
        h.last_used = Instant::now();
        match status {
            Some(code) if code < 500 => {
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
            }
            Some(code) => {
                h.consecutive_5xx += 1;
                if matches!(code, 502..=504) {
                    h.consecutive_gateway += 1;
                } else {
                    h.consecutive_gateway = 0;
                }
            }
            // Connect failures and resets count as gateway errors (and 5xx), as in Envoy.
            None => {
                h.consecutive_5xx += 1;
                h.consecutive_gateway += 1;
            }
        }
    }

    /// Removes ejected endpoints from `candidates` under `policy` (ejecting those that crossed a
    /// threshold), keeping at least the share maxEjectionPercent allows.
    pub fn filter(
        &self,
        scope: &Scope,
        candidates: Vec<SocketAddr>,
        policy: &Outlier,
    ) -> Vec<SocketAddr> {
        let now = Instant::now();
        let base = policy.base_ejection_time.unwrap_or(Duration::from_secs(30));
        let max_ejected = candidates.len() * policy.max_ejection_percent as usize / 100;
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut ejected = 0;
        let mut keep = Vec::with_capacity(candidates.len());
        for ep in &candidates {
            let h = all.entry((scope.clone(), *ep)).or_default();
            if h.ejected_until.is_some_and(|t| t <= now) {
                h.ejected_until = None;
            }
            let crossed = policy
                .consecutive_5xx_errors
                .is_some_and(|n| n > 0 && h.consecutive_5xx >= n)
                || policy
                    .consecutive_gateway_errors
                    .is_some_and(|n| n > 0 && h.consecutive_gateway >= n);
            if h.ejected_until.is_none() && crossed && ejected < max_ejected {
                h.ejections += 1;
                h.ejected_until = Some(now + base * h.ejections);
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
            }
            if h.ejected_until.is_some() && ejected < max_ejected {
                ejected += 1;
            } else {
                keep.push(*ep);
            }
        }
        keep
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

    #[test]
    fn idle_endpoints_are_forgotten_but_ejected_ones_kept() {
        let table = HealthTable::default();
        let me = scope("client");
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let policy = Outlier {
            consecutive_5xx_errors: Some(1),
            consecutive_gateway_errors: None,
            interval: None,
            base_ejection_time: Some(Duration::from_secs(60)),
            max_ejection_percent: 100,
        };
        table.record(&me, a, Some(200));
        table.record(&me, b, Some(500));
        assert_eq!(table.filter(&me, vec![a, b], &policy), vec![a], "b ejected");
        assert_eq!(
            table.filter(&scope("other"), vec![a, b], &policy),
            vec![a, b],
            "another workload's view is its own"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            table.prune(Duration::from_millis(10)),
            3,
            "a forgotten, and the other workload's healthy entries"
        );
        assert_eq!(table.len(), 1, "b kept while ejected");
        assert_eq!(
            table.filter(&me, vec![a, b], &policy),
            vec![a],
            "and still ejected"
        );
    }
}
