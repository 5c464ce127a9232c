//! Workload identity: SPIFFE IDs (`spiffe://<trust domain>/ns/<namespace>/sa/<account>`),
//! the certificates of the workloads enrolled on this node (from a CA: built in, or
//! Istio's), and the mutual TLS that HBONE speaks with them. A certificate is one
//! workload identity's, never the node's: a daemon holds keys only for identities of pods
//! running on its node, in memory.
pub mod ca;
pub mod istio_ca;
pub mod manager;
pub mod tls;

use std::fmt;

pub use ca::{CaError, CertificateAuthority};
pub use manager::{CertManager, WorkloadCert};

/// A workload's SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: if service_account.is_empty() {
                "default".to_string()
            } else {
                service_account.to_string()
            },
        }
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>` (exactly that shape, as Istio requires).
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/');
        let (td, ns_key, ns, sa_key, sa) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        if parts.next().is_some() || ns_key != "ns" || sa_key != "sa" {
            return None;
        }
        if [td, ns, sa].iter().any(|s| s.is_empty()) {
            return None;
        }
        Some(Self::new(td, ns, sa))
    }
}

/// The SPIFFE identities among a certificate's URI SANs.
pub fn identities_of(der: &[u8]) -> Vec<Identity> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Identity::parse(uri),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_only_istios_shape_parses() {
        let id = Identity::new("cluster.local", "shop", "cart");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(Identity::parse(&id.to_string()), Some(id));
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/cart/extra",
            "spiffe://cluster.local/sa/cart/ns/shop",
            "https://cluster.local/ns/shop/sa/cart",
            "spiffe:///ns/shop/sa/cart",
        ] {
            assert_eq!(Identity::parse(bad), None, "{bad}");
        }
        assert_eq!(Identity::new("td", "ns", "").service_account, "default");
    }
}
