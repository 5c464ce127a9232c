//! Where a connection goes, decided from the snapshot: the registry (Service cluster IPs,
//! ServiceEntry addresses), VirtualService `tcp[]` rules, DestinationRule subsets, and the
//! outbound traffic policy for destinations nobody registered.
use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::{
    cli::OutboundTrafficPolicyArg,
    config::istio::OutboundMode,
    metrics::{DestinationLabels, BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER},
    registry::{ServiceInfo, ServiceKind},
    routes::{selects, L4Match, WeightedDestination},
    state::Snapshot,
    workload::{WorkloadInfo, UNKNOWN},
};

/// What to do with one connection.
#[derive(Debug, Clone, PartialEq)]
pub enum L4Decision {
    /// Connect to `upstream` (an endpoint, or the original destination for passthrough).
    Forward {
        upstream: SocketAddr,
        labels: DestinationLabels,
    },
    /// Refuse: registry-only and nothing registered (reset the client), or no endpoint.
    Refuse {
        labels: DestinationLabels,
        flags: &'static str,
    },
}

/// Spreads connections over endpoints (round robin across the node; exact fairness per
/// service is the load-balancing work's job).
static NEXT_ENDPOINT: AtomicUsize = AtomicUsize::new(0);
/// Rolls for weighted destinations: a rotating counter, so weights hold exactly over every
/// hundred connections rather than on average.
static NEXT_ROLL: AtomicUsize = AtomicUsize::new(0);

/// The next roll in 0..100 for [`decide`].
pub fn next_roll() -> u32 {
    (NEXT_ROLL.fetch_add(1, Ordering::Relaxed) % 100) as u32
}

pub fn labels_for(svc: &ServiceInfo) -> DestinationLabels {
    match svc.kind {
        ServiceKind::Kubernetes => DestinationLabels {
            service: svc.hostname.clone(),
            service_name: svc.name.clone(),
            service_namespace: svc.namespace.clone(),
        },
        ServiceKind::ServiceEntry { .. } => DestinationLabels {
            service: svc.hostname.clone(),
            service_name: svc.hostname.clone(),
            service_namespace: svc.namespace.clone(),
        },
    }
}

fn l4_match(m: &L4Match, dst: SocketAddrV4, src: &WorkloadInfo) -> bool {
    let port_ok = m.port.is_none_or(|p| p == dst.port() as u32);
    let subnet_ok = m.destination_subnets.is_empty()
        || m.destination_subnets
            .iter()
            .any(|s| subnet_contains(s, IpAddr::V4(*dst.ip())));
    let labels_ok = selects(&m.source_labels, &src.labels);
    let ns_ok = m
        .source_namespace
        .as_ref()
        .is_none_or(|n| *n == src.namespace);
    port_ok && subnet_ok && labels_ok && ns_ok
}

fn subnet_contains(cidr: &str, ip: IpAddr) -> bool {
    let (net, prefix) = match cidr.split_once('/') {
        Some((n, p)) => (n.parse::<IpAddr>().ok(), p.parse::<u8>().ok()),
        None => (cidr.parse::<IpAddr>().ok(), Some(32)),
    };
    match (net, prefix, ip) {
        (Some(IpAddr::V4(n)), Some(p), IpAddr::V4(a)) if p <= 32 => {
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        _ => false,
    }
}

/// Weighted pick; `roll` in 0..100.
pub fn pick_weighted(dests: &[WeightedDestination], roll: u32) -> Option<&WeightedDestination> {
    let total: u32 = dests.iter().map(|d| d.weight).sum();
    if total == 0 {
        return dests.first();
    }
    let mut at = roll % total;
    for d in dests {
        if at < d.weight {
            return Some(d);
        }
        at -= d.weight;
    }
    dests.last()
}

/// Decides where a captured connection to `dst` from `src` goes.
pub fn decide(
    snap: &Snapshot,
    src: &WorkloadInfo,
    dst: SocketAddrV4,
    default_policy: OutboundTrafficPolicyArg,
    roll: u32,
) -> L4Decision {
    let Some(svc) = snap.registry.by_addr(SocketAddr::V4(dst)) else {
        let registry_only = match snap
            .routes
            .sidecar_for(&src.namespace, &src.labels)
            .and_then(|s| s.outbound_mode)
        {
            Some(OutboundMode::RegistryOnly) => true,
            Some(OutboundMode::AllowAny) => false,
            None => default_policy == OutboundTrafficPolicyArg::RegistryOnly,
        };
        return if registry_only {
            L4Decision::Refuse {
                labels: DestinationLabels {
                    service: dst.to_string(),
                    service_name: BLACKHOLE_CLUSTER.into(),
                    service_namespace: UNKNOWN.into(),
                },
                flags: "NR",
            }
        } else {
            L4Decision::Forward {
                upstream: SocketAddr::V4(dst),
                labels: DestinationLabels {
                    service: dst.to_string(),
                    service_name: PASSTHROUGH_CLUSTER.into(),
                    service_namespace: UNKNOWN.into(),
                },
            }
        };
    };
    // VirtualService tcp[] rules for the service's host: first match wins.
    let rule_dest = snap
        .routes
        .virtual_services_for(&svc.hostname)
        .iter()
        .flat_map(|vs| vs.tcp.iter())
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| l4_match(m, dst, src)))
        .and_then(|r| pick_weighted(&r.destinations, roll));
    let (target, subset, port) = match rule_dest {
        Some(d) => match snap.registry.by_host(&d.destination.host) {
            Some(t) => (
                t,
                d.destination.subset.as_deref(),
                d.destination.port.unwrap_or(dst.port() as u32),
            ),
            None => {
                return L4Decision::Refuse {
                    labels: labels_for(svc),
                    flags: "NR",
                };
            }
        },
        None => (svc, None, dst.port() as u32),
    };
    let labels = labels_for(target);
    if target.endpoints.is_empty()
        && matches!(target.kind, ServiceKind::ServiceEntry { .. })
        && std::ptr::eq(target, svc)
    {
        // A ServiceEntry without endpoints, dialled by its own address: the app resolved it
        // itself, so the original destination is the endpoint.
        return L4Decision::Forward {
            upstream: SocketAddr::V4(dst),
            labels,
        };
    }
    match endpoint_for(snap, target, subset, port, &src.namespace) {
        Ok(upstream) => L4Decision::Forward { upstream, labels },
        Err(flags) => L4Decision::Refuse { labels, flags },
    }
}

/// An endpoint of `target` (of `subset`, if given) for service port `port`, at its target
/// port. Err carries Envoy's flag: NR (no such subset), UH (no healthy upstream).
pub fn endpoint_for(
    snap: &Snapshot,
    target: &ServiceInfo,
    subset: Option<&str>,
    port: u32,
    client_namespace: &str,
) -> Result<SocketAddr, &'static str> {
    let subset_labels = match subset {
        Some(s) => Some(
            snap.routes
                .destination_rule(&target.hostname, client_namespace)
                .and_then(|dr| dr.subsets.get(s))
                .map(|sp| sp.labels.clone())
                .ok_or("NR")?,
        ),
        None => None,
    };
    let endpoints: Vec<_> = target
        .endpoints
        .iter()
        .filter(|e| subset_labels.as_ref().is_none_or(|l| selects(l, &e.labels)))
        .collect();
    if endpoints.is_empty() {
        return Err("UH");
    }
    let ep = endpoints[NEXT_ENDPOINT.fetch_add(1, Ordering::Relaxed) % endpoints.len()];
    let target_port = target
        .port(port)
        .and_then(|p| ep.ports.get(&p.name).copied().or(p.target_port))
        .unwrap_or(port);
    let ip = ep.address.parse::<IpAddr>().map_err(|_| "UH")?;
    Ok(SocketAddr::new(ip, target_port as u16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_pick_follows_weights() {
        let d = |w| WeightedDestination {
            destination: crate::routes::DestinationRef {
                host: format!("h{w}"),
                subset: None,
                port: None,
            },
            weight: w,
            headers: Default::default(),
        };
        let dests = [d(10), d(90)];
        let firsts = (0..100)
            .filter(|r| pick_weighted(&dests, *r).unwrap().weight == 10)
            .count();
        assert_eq!(firsts, 10);
        assert!(subnet_contains("10.0.0.0/8", "10.2.3.4".parse().unwrap()));
        assert!(!subnet_contains("10.0.0.0/8", "11.2.3.4".parse().unwrap()));
    }
}
