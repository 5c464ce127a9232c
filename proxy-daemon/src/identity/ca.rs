//! Where workload certificates come from: a CA built into the daemon (`--ca builtin`: a
//! root, or an intermediate with its chain, from files) or Istio's CA API (`--ca istio`).
//! Either way each certificate names one workload identity, with an EC P-256 key made here
//! and kept in memory only.
use std::{
    future::Future,
    pin::Pin,
    time::{Duration, SystemTime},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA {what}: {reason}")]
    Load { what: String, reason: String },
    #[error("issuing a certificate for {identity}: {reason}")]
    Issue { identity: String, reason: String },
}

/// A certificate issued for one identity, with its key and the roots to trust.
pub struct Issued {
    /// Leaf first, then the intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The trust roots of the mesh, as the CA gives them.
    pub roots: Vec<CertificateDer<'static>>,
}

/// Something that signs workload certificates.
pub trait CertificateAuthority: Send + Sync {
    fn issue<'a>(
        &'a self,
        identity: &'a Identity,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, CaError>> + Send + 'a>>;
}

/// A CA the daemon runs itself, from a CA certificate and key (a root, or an intermediate
/// whose file also holds the chain up to the root).
pub struct BuiltinCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA's certificate and the rest of its chain (sent after each leaf).
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

/// How long before "now" a certificate's validity starts (clocks of two nodes differ).
const BACKDATE: Duration = Duration::from_secs(60);

impl BuiltinCa {
    /// From PEM: `cert_pem` holds the CA certificate first, then the chain up to the root
    /// (the last certificate is the root the mesh trusts); `key_pem` its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let load = |what: &str, reason: String| CaError::Load {
            what: what.into(),
            reason,
        };
        let chain: Vec<CertificateDer<'static>> =
            rustls_pki_types::pem::PemObject::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| load("certificate", e.to_string()))?;
        let Some(first) = chain.first() else {
            return Err(load("certificate", "no certificate in the PEM".into()));
        };
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| load("key", e.to_string()))?;
        let issuer = rcgen::Issuer::from_ca_cert_der(first, key)
            .map_err(|e| load("certificate", e.to_string()))?;
        let roots = chain.last().cloned().into_iter().collect();
        Ok(Self {
            issuer,
            chain,
            roots,
        })
    }

    /// The node's own root: the one the previous daemon on this node handed over (its
    /// certificate and key in PEM), or a new one. Daemons that follow one another in a
    /// hand-over thus issue under one root, and a tunnel one opens to a pod the other
    /// serves is trusted. Nothing outside the node trusts it, and it never touches disk:
    /// it passes from daemon to daemon in memory (a sealed memfd). Also returns the PEM to
    /// hand to the next daemon.
    pub fn node_local(
        previous: Option<&str>,
        trust_domain: &str,
    ) -> Result<(Self, String), CaError> {
        if let Some(pem) = previous {
            // The certificate, then the key.
            if let Some(at) = pem.find("-----BEGIN PRIVATE KEY-----") {
                if let Ok(ca) = Self::from_pem(&pem[..at], &pem[at..]) {
                    return Ok((ca, pem.to_string()));
                }
            }
        }
        let (ca, cert_pem, key_pem) = Self::generate(trust_domain)?;
        Ok((ca, cert_pem + &key_pem))
    }

    /// A root made now, for one node on its own: nothing outside this daemon trusts it,
    /// and it is gone with the process.
    pub fn ephemeral(trust_domain: &str) -> Result<Self, CaError> {
        Self::generate(trust_domain).map(|(ca, _, _)| ca)
    }

    /// A new self-signed root, with its certificate and key in PEM.
    fn generate(trust_domain: &str) -> Result<(Self, String, String), CaError> {
        let fail = |reason: rcgen::Error| CaError::Load {
            what: "ephemeral root".into(),
            reason: reason.to_string(),
        };
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, trust_domain);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let cert = params.self_signed(&key).map_err(fail)?;
        let der = cert.der().clone();
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let ca = Self {
            issuer: rcgen::Issuer::new(params, key),
            chain: vec![der.clone()],
            roots: vec![der],
        };
        Ok((ca, cert_pem, key_pem))
    }

    /// The roots this CA's certificates chain to.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    fn issue_now(&self, identity: &Identity, ttl: Duration) -> Result<Issued, CaError> {
        let fail = |reason: rcgen::Error| CaError::Issue {
            identity: identity.to_string(),
            reason: reason.to_string(),
        };
        let now = SystemTime::now();
        let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
        let not_after = now + ttl;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(identity.to_string()).map_err(fail)?,
        )];
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(fail)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(Issued {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
            roots: self.roots.clone(),
        })
    }
}

impl CertificateAuthority for BuiltinCa {
    fn issue<'a>(
        &'a self,
        identity: &'a Identity,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, CaError>> + Send + 'a>> {
        Box::pin(async move { self.issue_now(identity, ttl) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_builtin_ca_issues_a_spiffe_certificate_for_one_identity() {
        let ca = BuiltinCa::ephemeral("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "shop", "cart");
        let issued = ca.issue(&id, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(super::super::identities_of(&issued.chain[0]), vec![id]);
        assert_eq!(issued.chain.len(), 2, "leaf and the CA");
        let life = issued.not_after.duration_since(issued.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(3600) + BACKDATE);
        // From files: the same CA, as PEM.
        let pem = |der: &CertificateDer| {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
            format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")
        };
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).unwrap();
        let from_files = BuiltinCa::from_pem(&pem(root.der()), &key.serialize_pem()).unwrap();
        assert_eq!(from_files.roots(), &[root.der().clone()]);
        assert!(BuiltinCa::from_pem("", &key.serialize_pem()).is_err());
    }

    /// Daemons that follow one another on a node issue under one root: the second is
    /// given the first one's; something that is not a root is replaced, not fatal.
    #[test]
    fn the_node_root_passes_to_the_next_daemon() {
        let (first, pem) = BuiltinCa::node_local(None, "cluster.local").unwrap();
        let (second, again) = BuiltinCa::node_local(Some(&pem), "cluster.local").unwrap();
        assert_eq!(first.roots(), second.roots());
        assert_eq!(pem, again);
        let (third, _) = BuiltinCa::node_local(Some("not a root"), "cluster.local").unwrap();
        assert_ne!(third.roots(), first.roots());
    }
}
