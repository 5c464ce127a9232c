//! The certificates of the workload identities enrolled on this node: issued on first
//! use, renewed at half-life in the background (a connection keeps the certificate it was
//! made with; new ones get the new certificate, so nothing is dropped), forgotten when no
//! pod of the identity is left on the node. Keys live in memory only.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{sign::CertifiedKey, ClientConfig, RootCertStore, ServerConfig};
use tracing::{info, warn};

use super::{ca::Issued, CaError, CertificateAuthority, Identity};

/// One identity's current certificate, and the TLS configurations made from it.
pub struct WorkloadCert {
    pub identity: Identity,
    pub certified: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The HBONE server side (a pod's port 15008): this identity's certificate, a client
    /// certificate of the mesh required.
    pub server: Arc<ServerConfig>,
}

impl WorkloadCert {
    /// When to renew: halfway through its life (Istio's rule).
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }

    /// A client configuration presenting this identity to a server that must be one of
    /// `expected` (the destination workload's identity, or its Service's SANs).
    pub fn client(&self, expected: Vec<Identity>) -> Result<Arc<ClientConfig>, CaError> {
        super::tls::client_config(self, expected).map(Arc::new)
    }
}

/// A certificate that could not be had: the identity's pods wait in their fail mode.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no certificate for {identity}: {reason}")]
pub struct Unavailable {
    pub identity: String,
    pub reason: String,
}

pub struct CertManager {
    ca: Arc<dyn CertificateAuthority>,
    trust_domain: String,
    ttl: Duration,
    certs: Mutex<HashMap<Identity, Arc<ArcSwap<WorkloadCert>>>>,
    /// Serialises first issuance per identity (a burst of connections asks once).
    issuing: tokio::sync::Mutex<()>,
    /// The last failure per identity: asked again within [`RETRY_AFTER`], the answer is
    /// the same at once (a CA that is down must not hold every enrolment pass for its
    /// timeout, pod after pod).
    failures: Mutex<HashMap<Identity, (std::time::Instant, Unavailable)>>,
    metrics: CertMetrics,
}

/// How long a failed issuance is not tried again for the same identity.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// `proxy_daemon_workload_certificates{result}` and the count held.
#[derive(Clone, Default)]
pub struct CertMetrics {
    pub issued: prometheus_client::metrics::counter::Counter,
    pub failed: prometheus_client::metrics::counter::Counter,
    pub held: prometheus_client::metrics::gauge::Gauge,
}

impl CertManager {
    pub fn new(
        ca: Arc<dyn CertificateAuthority>,
        trust_domain: &str,
        ttl: Duration,
        metrics: CertMetrics,
    ) -> Self {
        Self {
            ca,
            trust_domain: trust_domain.to_string(),
            ttl,
            certs: Mutex::new(HashMap::new()),
            issuing: tokio::sync::Mutex::new(()),
            failures: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The identity's certificate, issued now if this node has none for it yet.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, Unavailable> {
        if let Some(c) = self.current(id) {
            return Ok(c);
        }
        if let Some(recent) = self.recent_failure(id) {
            return Err(recent);
        }
        let _one_at_a_time = self.issuing.lock().await;
        if let Some(c) = self.current(id) {
            return Ok(c);
        }
        if let Some(recent) = self.recent_failure(id) {
            return Err(recent);
        }
        let cert = match self.issue(id).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
                failures.retain(|_, (at, _)| at.elapsed() < RETRY_AFTER);
                failures.insert(id.clone(), (std::time::Instant::now(), e.clone()));
                return Err(e);
            }
        };
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.certs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), Arc::new(ArcSwap::new(cert.clone())));
        self.metrics.held.inc();
        Ok(cert)
    }

    fn recent_failure(&self, id: &Identity) -> Option<Unavailable> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let (at, e) = failures.get(id)?;
        (at.elapsed() < RETRY_AFTER).then(|| e.clone())
    }

    /// The identity's certificate if one is held (and still valid).
    pub fn current(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        let c = certs.get(id)?.load_full();
        (c.not_after > SystemTime::now()).then_some(c)
    }

    async fn issue(&self, id: &Identity) -> Result<WorkloadCert, Unavailable> {
        let unavailable = |reason: String| Unavailable {
            identity: id.to_string(),
            reason,
        };
        let issued = match self.ca.issue(id, self.ttl).await {
            Ok(i) => i,
            Err(e) => {
                self.metrics.failed.inc();
                return Err(unavailable(e.to_string()));
            }
        };
        // A CA that signs another identity than asked for is not believed.
        let named = super::identities_of(issued.chain.first().map(|c| c.as_ref()).unwrap_or(&[]));
        if !named.contains(id) {
            self.metrics.failed.inc();
            return Err(unavailable(format!(
                "the CA's certificate names {named:?}, not the identity asked for"
            )));
        }
        let cert = build(id, issued, &self.trust_domain).map_err(|e| {
            self.metrics.failed.inc();
            unavailable(e.to_string())
        })?;
        self.metrics.issued.inc();
        Ok(cert)
    }

    /// Keeps only the identities in `wanted` (those of pods enrolled on this node).
    pub fn retain(&self, wanted: &HashSet<Identity>) {
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        certs.retain(|id, _| wanted.contains(id));
        self.metrics.held.set(certs.len() as i64);
    }

    /// Renews each certificate at half-life, for ever; a failed renewal is tried again
    /// with backoff while the old certificate serves (until it expires).
    pub async fn run_renewals(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut backoff: HashMap<Identity, (SystemTime, Duration)> = HashMap::new();
        loop {
            tick.tick().await;
            let now = SystemTime::now();
            let due: Vec<(Identity, Arc<ArcSwap<WorkloadCert>>)> = {
                let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
                certs
                    .iter()
                    .filter(|(id, c)| {
                        c.load().refresh_at() <= now
                            && backoff.get(*id).is_none_or(|(at, _)| *at <= now)
                    })
                    .map(|(id, c)| (id.clone(), c.clone()))
                    .collect()
            };
            for (id, slot) in due {
                match self.issue(&id).await {
                    Ok(cert) => {
                        info!(identity = %id, not_after = ?cert.not_after, "workload certificate renewed");
                        slot.store(Arc::new(cert));
                        backoff.remove(&id);
                    }
                    Err(e) => {
                        let wait = backoff
                            .get(&id)
                            .map_or(Duration::from_secs(1), |(_, w)| (*w * 2).min(MAX_BACKOFF));
                        warn!(identity = %id, error = %e, retry_in = ?wait, "renewing a workload certificate failed; the current one serves until it expires");
                        backoff.insert(id, (now + wait, wait));
                    }
                }
            }
        }
    }
}

/// The longest wait between two renewal attempts (Istio's is 150 s).
const MAX_BACKOFF: Duration = Duration::from_secs(150);

fn build(id: &Identity, issued: Issued, trust_domain: &str) -> Result<WorkloadCert, CaError> {
    let fail = |reason: String| CaError::Issue {
        identity: id.to_string(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signing = provider
        .key_provider
        .load_private_key(issued.key)
        .map_err(|e| fail(e.to_string()))?;
    let certified = Arc::new(CertifiedKey::new(issued.chain, signing));
    let mut roots = RootCertStore::empty();
    for r in &issued.roots {
        roots.add(r.clone()).map_err(|e| fail(e.to_string()))?;
    }
    let roots = Arc::new(roots);
    let server = Arc::new(super::tls::server_config(
        certified.clone(),
        roots.clone(),
        trust_domain,
        provider,
    )?);
    Ok(WorkloadCert {
        identity: id.clone(),
        certified,
        roots,
        not_before: issued.not_before,
        not_after: issued.not_after,
        server,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::BuiltinCa;

    #[tokio::test]
    async fn certificates_are_issued_once_renewed_at_half_life_and_forgotten() {
        let ca = Arc::new(BuiltinCa::ephemeral("cluster.local").unwrap());
        let metrics = CertMetrics::default();
        // Backdated a minute: a 62 s certificate is due for renewal 1 s from now.
        let m = Arc::new(CertManager::new(
            ca,
            "cluster.local",
            Duration::from_secs(62),
            metrics.clone(),
        ));
        let id = Identity::new("cluster.local", "shop", "cart");
        let first = m.fetch(&id).await.unwrap();
        assert!(Arc::ptr_eq(&first, &m.fetch(&id).await.unwrap()));
        assert_eq!(metrics.issued.get(), 1);
        tokio::spawn(m.clone().run_renewals());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(metrics.issued.get(), 1, "not due yet");
        tokio::time::sleep(Duration::from_millis(2000)).await;
        assert!(metrics.issued.get() >= 2, "renewed at half-life");
        let renewed = m.current(&id).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert!(renewed.not_after > first.not_after);
        // The first one is still whole for whoever holds it (an open connection).
        assert_eq!(first.identity, id);
        m.retain(&HashSet::new());
        assert!(m.current(&id).is_none());
        assert_eq!(metrics.held.get(), 0);
    }
}
