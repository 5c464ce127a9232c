//! Where a connection goes, decided from the snapshot: the registry (Service cluster IPs,
//! ServiceEntry addresses), VirtualService `tcp[]` rules, DestinationRule subsets, and the
//! outbound traffic policy for destinations nobody registered.
use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use super::balance::HashTable;
use crate::{
    config::istio::OutboundMode,
    config::istio::{Resolution, SimpleLb},
    metrics::{unnamed_service, DestinationLabels, BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER},
    proxy::Endpoints,
    state::registry::{ServiceInfo, ServiceKind},
    state::routes::{selects, L4Match, WeightedDestination},
    state::routes::{HashAlgorithm, LoadBalancer},
    state::workload::{WorkloadInfo, UNKNOWN},
    state::Snapshot,
};

/// What to do with one connection.
#[derive(Debug, Clone)]
pub enum L4Decision {
    /// Connect to `upstream` (an endpoint, or the original destination for passthrough).
    Forward {
        upstream: SocketAddr,
        labels: DestinationLabels,
        /// TLS to originate (DestinationRule `tls` on a TCP port; never over the app's
        /// own TLS).
        tls: Option<std::sync::Arc<crate::proxy::tls::UpstreamTls>>,
        /// Close after this long without a byte either way (None: never).
        idle_timeout: Option<std::time::Duration>,
    },
    /// Refuse: registry-only and nothing registered (reset the client), or no endpoint.
    Refuse {
        labels: DestinationLabels,
        flags: &'static str,
    },
}

/// A ServiceEntry whose names are resolved by DNS (`DNS`, `DNS_ROUND_ROBIN`).
pub fn is_dns(svc: &ServiceInfo) -> bool {
    matches!(
        svc.kind,
        ServiceKind::ServiceEntry {
            resolution: Resolution::Dns | Resolution::DnsRoundRobin,
            ..
        }
    )
}

/// The TLS to originate towards `port` of `subset` of `target`, from its DestinationRule.
pub fn upstream_tls(
    snap: &Snapshot,
    target: &ServiceInfo,
    subset: Option<&str>,
    port: u32,
    client_namespace: &str,
) -> Option<std::sync::Arc<crate::proxy::tls::UpstreamTls>> {
    let dr = snap.routes.destination_rule(
        &target.hostname,
        client_namespace,
        Some(&target.namespace),
    )?;
    tls_of(&dr.effective(Some(port), subset), target)
}

/// Envoy's and Istio's default idle timeout of a TCP proxy connection.
pub const DEFAULT_TCP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The opaque TCP idle timeout towards `port` of `subset` of `target`: its
/// DestinationRule's `connectionPool.tcp.idleTimeout`, else 1 h; `0s` disables (None).
pub fn tcp_idle_timeout(
    snap: &Snapshot,
    target: &ServiceInfo,
    subset: Option<&str>,
    port: u32,
    client_namespace: &str,
) -> Option<std::time::Duration> {
    let configured = snap
        .routes
        .destination_rule(&target.hostname, client_namespace, Some(&target.namespace))
        .and_then(|dr| dr.effective(Some(port), subset).connection_pool)
        .and_then(|p| p.tcp_idle_timeout);
    match configured.unwrap_or(DEFAULT_TCP_IDLE_TIMEOUT) {
        t if t.is_zero() => None,
        t => Some(t),
    }
}

/// The TLS to originate under an already merged policy.
pub fn tls_of(
    policy: &crate::state::routes::Policy,
    target: &ServiceInfo,
) -> Option<std::sync::Arc<crate::proxy::tls::UpstreamTls>> {
    crate::proxy::tls::UpstreamTls::new(policy.tls.as_ref()?, &target.hostname)
        .map(std::sync::Arc::new)
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
            .any(|net| net.contains(&IpAddr::V4(*dst.ip())));
    let labels_ok = selects(&m.source_labels, &src.labels);
    let ns_ok = m
        .source_namespace
        .as_ref()
        .is_none_or(|n| *n == src.namespace);
    port_ok && subnet_ok && labels_ok && ns_ok
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

/// The VirtualService (at most one) a client of `src` uses for `svc`: Istio's choice
/// among those it sees, and only those a Service's owner allows to route it.
pub fn client_virtual_services<'a>(
    snap: &'a Snapshot,
    svc: &'a ServiceInfo,
    src: &'a WorkloadInfo,
) -> impl Iterator<Item = &'a std::sync::Arc<crate::state::routes::CompiledVirtualService>> + 'a {
    snap.routes.virtual_services_for(
        &svc.hostname,
        &src.namespace,
        &src.labels,
        snap.registry.kubernetes_owner(&svc.hostname),
    )
}

/// Whether unregistered destinations are refused for `src`: its Sidecar's
/// outboundTrafficPolicy if one selects it, else the daemon's flag.
pub fn registry_only(
    snap: &Snapshot,
    src: &WorkloadInfo,
    default_policy: crate::proxy::OutboundPolicy,
) -> bool {
    match snap
        .routes
        .sidecar_for(&src.namespace, &src.labels)
        .and_then(|s| s.outbound_mode)
    {
        Some(OutboundMode::RegistryOnly) => true,
        Some(OutboundMode::AllowAny) => false,
        None => default_policy == crate::proxy::OutboundPolicy::RegistryOnly,
    }
}

/// Decides where a captured connection to `dst` from `src` goes.
/// Whether the original destination is one the entry stands for: one of its ports, and
/// (when it lists addresses) one of its addresses. A name alone (Host, SNI) is only the
/// app's word; under REGISTRY_ONLY it must not open a way to any IP.
/// What steers the choice among a destination's endpoints, beyond its policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Choice<'a> {
    /// Whose view of endpoint health applies (the source workload's).
    pub scope: Option<&'a crate::proxy::outlier::Scope>,
    /// The request's consistent-hash key, when the policy hashes.
    pub hash: Option<u64>,
    /// Endpoints earlier attempts of the request went to (a retry prefers others).
    pub avoid: &'a [SocketAddr],
    /// The address the app dialled: `simple: PASSTHROUGH` (Envoy's ORIGINAL_DST) connects
    /// there instead of choosing an endpoint.
    pub dialled: Option<SocketAddr>,
}

pub fn dst_within(snap: &Snapshot, svc: &ServiceInfo, dst: SocketAddrV4, client: &str) -> bool {
    svc.port(dst.port() as u32).is_some()
        && (svc.addresses.is_empty()
            || snap
                .registry
                .by_addr(SocketAddr::V4(dst), client)
                .is_some_and(|s| s.hostname == svc.hostname))
}

/// Whether `src` sees `svc`: exported to its namespace and imported by its Sidecar. One it
/// does not see is, for it, not in the registry (passthrough, or BlackHole when
/// registry-only).
pub fn sees_service(snap: &Snapshot, src: &WorkloadInfo, svc: &ServiceInfo) -> bool {
    snap.routes.sees(
        &src.namespace,
        &src.labels,
        &svc.export_to,
        &svc.namespace,
        &svc.hostname,
    )
}

/// Where a ServiceEntry without endpoints sends a connection the app dialled itself: the
/// address dialled, at the entry's `targetPort` when it sets one (Istio ≥ 1.22 honours it
/// for `resolution: NONE`: how its docs originate TLS for an app that dials port 80).
pub fn dialled_target(svc: &ServiceInfo, dst: SocketAddrV4) -> SocketAddr {
    let port = svc
        .port(dst.port() as u32)
        .and_then(|p| p.target_port)
        .unwrap_or(dst.port() as u32);
    SocketAddr::new(std::net::IpAddr::V4(*dst.ip()), port as u16)
}

/// Where a connection from `pod` to `dst` (with the app's own TLS naming `sni`) goes.
pub fn decide(
    snap: &Snapshot,
    eps: &Endpoints,
    pod: &crate::proxy::PodContext,
    dst: SocketAddrV4,
    default_policy: crate::proxy::OutboundPolicy,
    roll: u32,
    sni: Option<&str>,
) -> L4Decision {
    let (src, scope) = (&*pod.workload, &pod.source_labels);
    // The SNI of the app's own TLS names the service when the registry knows it.
    let by_sni = sni.and_then(|h| snap.registry.by_host(h, &src.namespace));
    // A ServiceEntry not exported to the client's namespace is not in its registry.
    let Some(svc) = by_sni
        .or_else(|| snap.registry.by_addr(SocketAddr::V4(dst), &src.namespace))
        .filter(|s| sees_service(snap, src, s))
    else {
        let named = unnamed_service(sni, SocketAddr::V4(dst));
        return if registry_only(snap, src, default_policy) {
            L4Decision::Refuse {
                labels: DestinationLabels {
                    service: named,
                    service_name: BLACKHOLE_CLUSTER.into(),
                    service_namespace: UNKNOWN.into(),
                },
                flags: "NR",
            }
        } else {
            L4Decision::Forward {
                upstream: SocketAddr::V4(dst),
                idle_timeout: Some(DEFAULT_TCP_IDLE_TIMEOUT),
                labels: DestinationLabels {
                    service: named,
                    service_name: PASSTHROUGH_CLUSTER.into(),
                    service_namespace: UNKNOWN.into(),
                },
                tls: None,
            }
        };
    };
    // VirtualService tcp[] rules for the service's host: first match wins.
    let rule_dest = client_virtual_services(snap, svc, src)
        .flat_map(|vs| {
            if sni.is_some() {
                vs.tls.iter()
            } else {
                vs.tcp.iter()
            }
        })
        .find(|r| {
            r.matches.is_empty()
                || r.matches.iter().any(|m| {
                    l4_match(m, dst, src)
                        && (m.sni_hosts.is_empty()
                            || sni.is_some_and(|h| {
                                m.sni_hosts.iter().any(|p| {
                                    crate::state::registry::host_matches(&p.to_ascii_lowercase(), h)
                                })
                            }))
                })
        })
        .and_then(|r| pick_weighted(&r.destinations, roll));
    let (target, subset, port) = match rule_dest {
        Some(d) => match snap
            .registry
            .by_host(&d.destination.host, &src.namespace)
            .filter(|t| sees_service(snap, src, t))
        {
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
    let tls = match sni {
        Some(_) => None,
        None => upstream_tls(snap, target, subset, port, &src.namespace),
    };
    if target.endpoints.is_empty()
        && matches!(target.kind, ServiceKind::ServiceEntry { .. })
        && std::ptr::eq(target, svc)
        && (!is_dns(target) || eps.dns.lookup(&target.hostname).is_empty())
    {
        // A ServiceEntry without endpoints (or whose DNS name has no answer yet), dialled
        // by its own address: the app resolved it itself, so the original destination is
        // the endpoint. Named only by SNI, it must also be where the entry points, or a
        // registry-only pod could reach any IP by naming an allowed host.
        let vouched = dst_within(snap, target, dst, &src.namespace)
            && (!is_dns(target) || !target.addresses.is_empty());
        if registry_only(snap, src, default_policy) && !vouched {
            return L4Decision::Refuse {
                labels: DestinationLabels {
                    service: target.hostname.clone(),
                    service_name: BLACKHOLE_CLUSTER.into(),
                    service_namespace: UNKNOWN.into(),
                },
                flags: "NR",
            };
        }
        return L4Decision::Forward {
            upstream: dialled_target(target, dst),
            idle_timeout: tcp_idle_timeout(snap, target, subset, port, &src.namespace),
            labels,
            tls,
        };
    }
    let hash = match lb_policy(snap, target, subset, port, &src.namespace) {
        Some(LoadBalancer::ConsistentHash {
            key: crate::state::routes::HashKey::SourceIp,
            ..
        }) => src
            .ip
            .as_deref()
            .map(|ip| super::balance::fnv1a(ip.as_bytes())),
        _ => None,
    };
    let how = Choice {
        scope: Some(scope),
        hash,
        avoid: &[],
        dialled: Some(SocketAddr::V4(dst)),
    };
    match endpoint_for(snap, eps, target, subset, port, &src.namespace, how) {
        Ok(upstream) => L4Decision::Forward {
            upstream,
            idle_timeout: tcp_idle_timeout(snap, target, subset, port, &src.namespace),
            labels,
            tls,
        },
        Err(flags) => L4Decision::Refuse { labels, flags },
    }
}

/// The load-balancing policy that applies to traffic from `client_namespace` to `port` of
/// `subset` of `host`.
pub fn lb_policy(
    snap: &Snapshot,
    target: &ServiceInfo,
    subset: Option<&str>,
    port: u32,
    client_namespace: &str,
) -> Option<LoadBalancer> {
    snap.routes
        .destination_rule(&target.hostname, client_namespace, Some(&target.namespace))
        .and_then(|dr| dr.effective(Some(port), subset).load_balancer)
}

/// An endpoint of `target` (of `subset`, if given) for service port `port`, at its target
/// port, chosen by the DestinationRule's policy (`hash`: the request's consistent-hash key,
/// when the policy has one and the request carried it). Err carries Envoy's flag: NR (no
/// such subset), UH (no healthy upstream).
pub fn endpoint_for(
    snap: &Snapshot,
    eps: &Endpoints,
    target: &ServiceInfo,
    subset: Option<&str>,
    port: u32,
    client_namespace: &str,
    how: Choice,
) -> Result<SocketAddr, &'static str> {
    let Choice {
        scope,
        hash,
        avoid,
        dialled,
    } = how;
    let subset_labels = match subset {
        Some(s) => Some(
            snap.routes
                .destination_rule(&target.hostname, client_namespace, Some(&target.namespace))
                .and_then(|dr| dr.subsets.get(s))
                .map(|sp| sp.labels.clone())
                .ok_or("NR")?,
        ),
        None => None,
    };
    let policy = snap
        .routes
        .destination_rule(&target.hostname, client_namespace, Some(&target.namespace))
        .map(|dr| dr.effective(Some(port), subset));
    if let (
        Some(LoadBalancer::Simple {
            algorithm: SimpleLb::Passthrough,
        }),
        Some(dialled),
    ) = (
        policy.as_ref().and_then(|p| p.load_balancer.as_ref()),
        dialled,
    ) {
        // Istio's PASSTHROUGH (Envoy's ORIGINAL_DST): the original destination, with no
        // endpoint set and no load balancing, so no endpoints, DNS answers or ejections
        // stand in its way.
        return Ok(dialled);
    }
    let port_info = target.port(port);
    let at = |ip: IpAddr, ep_ports: Option<&std::collections::BTreeMap<String, u32>>| {
        let target_port = port_info
            .and_then(|p| {
                ep_ports
                    .and_then(|ports| ports.get(&p.name).copied())
                    .or(p.target_port)
            })
            .unwrap_or(port);
        SocketAddr::new(ip, target_port as u16)
    };
    let dns_named = is_dns(target);
    let mut addrs: Vec<SocketAddr> = Vec::new();
    // Endpoints whose load-balancing weight is not 1 (ServiceEntry `endpoints[].weight`);
    // empty in the common case, where every choice below is unweighted.
    let mut weights: Vec<(SocketAddr, u32)> = Vec::new();
    if dns_named && target.endpoints.is_empty() {
        // The host itself is resolved; its addresses carry no labels.
        if subset_labels.as_ref().is_none_or(|l| l.is_empty()) {
            let answer = eps.dns.lookup(&target.hostname);
            // DNS_ROUND_ROBIN (Envoy's LOGICAL_DNS): the first address of the latest answer.
            let take = match &target.kind {
                ServiceKind::ServiceEntry {
                    resolution: Resolution::DnsRoundRobin,
                    ..
                } => 1,
                _ => answer.len(),
            };
            addrs.extend(answer.iter().take(take).map(|ip| at(*ip, None)));
        }
    } else {
        for ep in target
            .endpoints
            .iter()
            .filter(|e| subset_labels.as_ref().is_none_or(|l| selects(l, &e.labels)))
        {
            let before = addrs.len();
            match ep.ip {
                Some(ip) => addrs.push(at(ip, Some(&ep.ports))),
                None if dns_named => addrs.extend(
                    eps.dns
                        .lookup(&ep.address.to_ascii_lowercase())
                        .iter()
                        .map(|ip| at(*ip, Some(&ep.ports))),
                ),
                None => {}
            }
            if ep.weight != 1 {
                weights.extend(addrs[before..].iter().map(|a| (*a, ep.weight)));
            }
        }
    }
    if addrs.is_empty() {
        return Err("UH");
    }
    let addrs = match policy.as_ref().and_then(|p| p.outlier_detection.as_ref()) {
        Some(od) => match scope {
            Some(scope) => eps.health.filter(
                scope,
                crate::proxy::outlier::ClusterKey::new(&target.hostname, port, subset),
                addrs,
                od,
            ),
            None => addrs,
        },
        None => addrs,
    };
    if addrs.is_empty() {
        return Err("UH");
    }
    let lb = policy.and_then(|p| p.load_balancer);
    // Istio's default retry host predicate (previous_hosts): a retry prefers an endpoint
    // it has not tried yet, when there is one. A hash key keeps choosing by itself.
    let hashed = matches!(lb, Some(LoadBalancer::ConsistentHash { .. })) && hash.is_some();
    let addrs = if avoid.is_empty() || hashed {
        addrs
    } else {
        let fresh: Vec<SocketAddr> = addrs
            .iter()
            .filter(|a| !avoid.contains(a))
            .copied()
            .collect();
        if fresh.is_empty() {
            addrs
        } else {
            fresh
        }
    };
    let weighted = !weights.is_empty() && !matches!(lb, Some(LoadBalancer::ConsistentHash { .. }));
    if weighted {
        let weight_of = |a: &SocketAddr| {
            weights
                .iter()
                .find(|(w, _)| w == a)
                .map(|(_, w)| u64::from(*w))
                .unwrap_or(1)
        };
        let total: u64 = addrs.iter().map(weight_of).sum();
        // The n-th unit of the total weight, and the endpoint that holds it.
        let nth = |n: u64| {
            let mut left = n % total.max(1);
            for a in &addrs {
                let w = weight_of(a);
                if left < w {
                    return *a;
                }
                left -= w;
            }
            addrs[0]
        };
        let chosen = match lb {
            // Weighted round robin: every endpoint's share of each cycle of the total.
            Some(LoadBalancer::Simple {
                algorithm: SimpleLb::RoundRobin,
            }) => nth(eps.round_robin.next(&target.hostname) as u64),
            Some(LoadBalancer::Simple {
                algorithm: SimpleLb::Random,
            }) => nth(rand::random::<u64>()),
            // Least request with weights (Envoy's default): two weighted draws, the one
            // with fewer requests in flight.
            _ => {
                let (a, b) = (nth(rand::random::<u64>()), nth(rand::random::<u64>()));
                let pair = [a, b];
                pair[eps.in_flight.least_loaded(&pair, 0) % 2]
            }
        };
        return Ok(chosen);
    }
    let index = match (lb, hash) {
        (Some(LoadBalancer::ConsistentHash { algorithm, .. }), Some(h)) => {
            let table =
                eps.tables.get(
                    snap.generation,
                    &target.hostname,
                    subset,
                    &addrs,
                    || match algorithm {
                        HashAlgorithm::RingHash { minimum_ring_size } => {
                            HashTable::ring(&addrs, minimum_ring_size)
                        }
                        HashAlgorithm::Maglev { table_size } => {
                            HashTable::maglev(&addrs, table_size)
                        }
                    },
                );
            table.pick(h).unwrap_or(0)
        }
        (
            Some(LoadBalancer::Simple {
                algorithm: SimpleLb::Random,
            }),
            _,
        )
        | (Some(LoadBalancer::ConsistentHash { .. }), None) => rand::random::<u64>() as usize,
        (
            Some(LoadBalancer::Simple {
                algorithm: SimpleLb::RoundRobin,
            }),
            _,
        ) => eps.round_robin.next(&target.hostname),
        // Istio's default (and LEAST_REQUEST / LEAST_CONN): fewest in flight, round robin
        // among equals.
        _ => eps
            .in_flight
            .least_loaded(&addrs, eps.round_robin.next(&target.hostname)),
    };
    Ok(addrs[index % addrs.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_pick_follows_weights() {
        let d = |w| WeightedDestination {
            destination: crate::state::routes::DestinationRef {
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
    }

    #[test]
    fn destination_subnets_are_typed_at_compile() {
        use crate::state::routes::parse_subnets;
        let nets = parse_subnets(&["10.0.0.0/8".into(), "192.168.1.7".into()]).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(nets[0].contains(&ip("10.2.3.4")) && !nets[0].contains(&ip("11.2.3.4")));
        assert!(nets[1].contains(&ip("192.168.1.7")) && !nets[1].contains(&ip("192.168.1.8")));
        let err = parse_subnets(&["10.0.0.0/40".into()]).unwrap_err();
        assert!(err.contains("10.0.0.0/40"), "{err}");
    }
}
