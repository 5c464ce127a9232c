//! Names of ServiceEntries with `resolution: DNS` / `DNS_ROUND_ROBIN`, resolved in the
//! background and read without waiting on the data path.
//!
//! A background task resolves every name the current snapshot needs as soon as it is
//! published, re-resolves each when its TTL runs out, and forgets names no longer needed.
//! Requests only read the last answers (one atomic load); a request that meets a name not
//! yet answered waits at most the connect timeout for the first answers (see
//! [`DnsCache::settled`]). Names in `--hosts-file` are answered from that file (re-read each
//! round), everything else by the resolvers in `/etc/resolv.conf` or `--dns-server`.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use hickory_resolver::{
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    TokioResolver,
};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::{config::istio::Resolution, state::registry::ServiceKind, state::Snapshot};

/// Shortest wait before asking again, whatever the TTL (a TTL of 0 must not spin).
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Answers from `--hosts-file` carry no TTL: the file is read again this often.
const HOSTS_FILE_REFRESH: Duration = Duration::from_secs(5);
/// After a failed lookup, try again this soon (the last good answer is kept meanwhile).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("--dns-server {0}: expected IP or IP:PORT")]
    BadServer(String),
    #[error("reading the system resolver configuration: {0}")]
    System(String),
    #[error("building the resolver: {0}")]
    Build(String),
}

/// One name's current answer, for `/config_dump`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NameState {
    pub addresses: Vec<IpAddr>,
    /// Seconds until the answer is refreshed.
    pub refresh_in_secs: f64,
    pub source: &'static str,
    pub last_error: Option<String>,
}

pub struct DnsCache {
    resolver: TokioResolver,
    hosts_file: Option<PathBuf>,
    answers: ArcSwap<HashMap<String, Arc<[IpAddr]>>>,
    /// Names the current snapshot needs that have not had a first lookup yet.
    pending: AtomicUsize,
    first_answers: tokio::sync::Notify,
    states: std::sync::Mutex<BTreeMap<String, NameState>>,
}

/// Parses `--dns-server` values: `IP` (port 53) or `IP:PORT`.
pub fn parse_servers(values: &[String]) -> Result<Vec<SocketAddr>, DnsError> {
    values
        .iter()
        .map(|v| {
            v.parse::<SocketAddr>()
                .or_else(|_| v.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| DnsError::BadServer(v.clone()))
        })
        .collect()
}

impl DnsCache {
    /// `servers` empty: the system's resolvers (`/etc/resolv.conf`).
    pub fn new(servers: &[SocketAddr], hosts_file: Option<PathBuf>) -> Result<Self, DnsError> {
        let mut builder = if servers.is_empty() {
            match TokioResolver::builder_tokio() {
                Ok(b) => b,
                Err(e) => {
                    // No usable /etc/resolv.conf: DNS names stay unanswered (requests go to
                    // the address the app dialled) rather than the daemon not starting.
                    warn!(error = %DnsError::System(e.to_string()), "no system DNS servers; pass --dns-server or --hosts-file to resolve ServiceEntry names");
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(Vec::new()),
                        TokioRuntimeProvider::default(),
                    )
                }
            }
        } else {
            let name_servers = servers
                .iter()
                .map(|s| {
                    let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                        .into_iter()
                        .map(|mut c| {
                            c.port = s.port();
                            c
                        })
                        .collect();
                    NameServerConfig::new(s.ip(), true, connections)
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(name_servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        // Captured traffic is IPv4 only; asking for AAAA would only add latency.
        opts.ip_strategy = LookupIpStrategy::Ipv4Only;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        // Names are absolute: never append search domains of the node.
        opts.ndots = 0;
        let resolver = builder
            .build()
            .map_err(|e| DnsError::Build(e.to_string()))?;
        Ok(Self {
            resolver,
            hosts_file,
            answers: ArcSwap::from_pointee(HashMap::new()),
            pending: AtomicUsize::new(0),
            first_answers: tokio::sync::Notify::new(),
            states: Default::default(),
        })
    }

    /// The last answer for `name` (empty when none yet or the name is unknown).
    pub fn lookup(&self, name: &str) -> Arc<[IpAddr]> {
        self.answers
            .load()
            .get(name)
            .cloned()
            .unwrap_or_else(|| Arc::from(Vec::new()))
    }

    /// Whether some needed name has not had its first lookup yet.
    pub fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// Waits (at most `limit`) until every needed name had its first lookup.
    pub async fn settled(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let notified = self.first_answers.notified();
                if !self.has_pending() {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }

    pub fn states(&self) -> BTreeMap<String, NameState> {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps the answers for the published snapshots' names fresh, until the process ends.
    pub async fn run(self: Arc<Self>, published: Arc<crate::state::Published>) {
        let mut changed = published.subscribe();
        // name → when to ask again
        let mut due: HashMap<String, Instant> = HashMap::new();
        loop {
            let wanted = names_to_resolve(&published.load());
            due.retain(|n, _| wanted.contains(n));
            let fresh: Vec<&String> = wanted.iter().filter(|n| !due.contains_key(*n)).collect();
            self.pending.store(fresh.len(), Ordering::Release);
            let now = Instant::now();
            for n in &wanted {
                due.entry(n.clone()).or_insert(now);
            }
            let ready: Vec<String> = due
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(n, _)| n.clone())
                .collect();
            let hosts = self.read_hosts_file();
            // Lookups run concurrently: each is network-bound.
            let mut lookups = tokio::task::JoinSet::new();
            for name in ready {
                let this = self.clone();
                let from_file = hosts.get(&name).cloned();
                lookups.spawn(async move {
                    let result = match from_file {
                        Some(addrs) => Ok((addrs, HOSTS_FILE_REFRESH, "hosts-file")),
                        None => this.resolve(&name).await,
                    };
                    (name, result)
                });
            }
            let results = lookups.join_all().await;
            let mut answers = (**self.answers.load()).clone();
            answers.retain(|n, _| wanted.contains(n));
            {
                let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
                states.retain(|n, _| wanted.contains(n));
                for (name, result) in results {
                    match result {
                        Ok((addrs, ttl, source)) => {
                            let wait = ttl.max(MIN_REFRESH);
                            due.insert(name.clone(), Instant::now() + wait);
                            debug!(%name, ?addrs, ?wait, "resolved");
                            states.insert(
                                name.clone(),
                                NameState {
                                    addresses: addrs.clone(),
                                    refresh_in_secs: wait.as_secs_f64(),
                                    source,
                                    last_error: None,
                                },
                            );
                            answers.insert(name, Arc::from(addrs));
                        }
                        Err(e) => {
                            warn!(%name, error = %e, "DNS lookup failed; keeping the last answer");
                            due.insert(name.clone(), Instant::now() + RETRY_AFTER_FAILURE);
                            let st = states.entry(name).or_insert(NameState {
                                addresses: Vec::new(),
                                refresh_in_secs: 0.0,
                                source: "dns",
                                last_error: None,
                            });
                            st.refresh_in_secs = RETRY_AFTER_FAILURE.as_secs_f64();
                            st.last_error = Some(e);
                        }
                    }
                }
            }
            self.answers.store(Arc::new(answers));
            self.pending.store(0, Ordering::Release);
            self.first_answers.notify_waiters();
            let next = due
                .values()
                .min()
                .copied()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }

    async fn resolve(&self, name: &str) -> Result<(Vec<IpAddr>, Duration, &'static str), String> {
        // A trailing dot: the name is absolute, never a search-domain candidate.
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let lookup = self
            .resolver
            .lookup_ip(fqdn.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let ttl = lookup
            .valid_until()
            .saturating_duration_since(std::time::Instant::now());
        let addrs: Vec<IpAddr> = lookup.iter().collect();
        if addrs.is_empty() {
            return Err("no addresses".into());
        }
        Ok((addrs, ttl, "dns"))
    }

    fn read_hosts_file(&self) -> HashMap<String, Vec<IpAddr>> {
        let Some(path) = &self.hosts_file else {
            return HashMap::new();
        };
        match std::fs::read_to_string(path) {
            Ok(text) => parse_hosts(&text),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read --hosts-file");
                HashMap::new()
            }
        }
    }
}

/// `/etc/hosts` format: `IP name [alias...]`, `#` comments; a name listed on several lines
/// gets every address (in file order).
pub fn parse_hosts(text: &str) -> HashMap<String, Vec<IpAddr>> {
    let mut out: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else {
            continue;
        };
        for name in words {
            let list = out.entry(name.to_ascii_lowercase()).or_default();
            if !list.contains(&ip) {
                list.push(ip);
            }
        }
    }
    out
}

/// Names the snapshot needs resolved: hosts of DNS ServiceEntries without endpoints, and
/// endpoint addresses that are names.
pub fn names_to_resolve(snap: &Snapshot) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for svc in snap.registry.all() {
        let ServiceKind::ServiceEntry { resolution, .. } = &svc.kind else {
            continue;
        };
        if !matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) {
            continue;
        }
        if svc.endpoints.is_empty() {
            if !svc.hostname.contains('*') {
                names.insert(svc.hostname.clone());
            }
        } else {
            for ep in &svc.endpoints {
                if ep.ip.is_none() && !ep.address.starts_with("unix://") {
                    names.insert(ep.address.to_ascii_lowercase());
                }
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_lines() {
        let h = parse_hosts(
            "# test\n198.18.0.9 httpbin.org api.example # two names\n198.18.0.10 httpbin.org\nbad line\n",
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(h["httpbin.org"], vec![ip("198.18.0.9"), ip("198.18.0.10")]);
        assert_eq!(h["api.example"], vec![ip("198.18.0.9")]);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn dns_server_flags() {
        let s = parse_servers(&["127.0.0.1:5353".into(), "10.0.0.10".into()]).unwrap();
        assert_eq!(s[0].port(), 5353);
        assert_eq!(s[1].to_string(), "10.0.0.10:53");
        assert!(parse_servers(&["dns.example".into()]).is_err());
    }
}
