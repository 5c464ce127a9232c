//! The mutual TLS of HBONE, as Istio ambient's ztunnel speaks it: TLS 1.3, ALPN `h2`, no
//! SNI and no resumption. The server requires a client certificate chaining to the mesh's
//! roots whose SPIFFE identity is of its own trust domain (who may call whom is decided
//! after, by policy); the client requires the server's certificate to name one of the
//! identities it expects for the destination (the workload's, or its Service's SANs).
use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    server::danger::{ClientCertVerified, ClientCertVerifier},
    sign::CertifiedKey,
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{identities_of, CaError, Identity, WorkloadCert};

/// The ALPN HBONE uses.
pub const ALPN_H2: &[u8] = b"h2";

/// The server name a client presents: none (ztunnel sends a placeholder address and no
/// SNI); the server picks its certificate by the address it was reached at.
pub fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(rustls_pki_types::IpAddr::from(
        std::net::Ipv4Addr::UNSPECIFIED,
    ))
}

fn tls13(
    provider: &Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, rustls::Error> {
    ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
}

/// A pod's HBONE server: its identity's certificate; a client certificate of the mesh
/// (chaining to `roots`, a SPIFFE identity in `trust_domain`) required.
pub fn server_config(
    certified: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
    provider: Arc<CryptoProvider>,
) -> Result<ServerConfig, CaError> {
    let fail = |reason: String| CaError::Issue {
        identity: "server configuration".into(),
        reason,
    };
    let inner =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| fail(e.to_string()))?;
    let verifier = Arc::new(SpiffeClientVerifier {
        inner,
        trust_domain: trust_domain.to_string(),
    });
    let mut config = tls13(&provider)
        .map_err(|e| fail(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Fixed(certified)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client presenting `cert`'s identity, to a server that must name one of `expected`.
pub fn client_config(
    cert: &WorkloadCert,
    expected: Vec<Identity>,
) -> Result<ClientConfig, CaError> {
    let fail = |reason: String| CaError::Issue {
        identity: cert.identity.to_string(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: cert.roots.clone(),
        expected,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| fail(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(Fixed(cert.certified.clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Always the same certificate (a configuration is made per identity and renewal).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The server's check of a client: the chain (WebPKI, client auth) and then that the
/// certificate names a SPIFFE identity of this trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let ids = identities_of(end_entity);
        if ids.iter().any(|id| id.trust_domain == self.trust_domain) {
            return Ok(ClientCertVerified::assertion());
        }
        Err(rustls::Error::General(format!(
            "client identity {} is not of trust domain {}",
            ids.first()
                .map_or("(none)".to_string(), ToString::to_string),
            self.trust_domain
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client's check of a server: the chain to the mesh's roots (server auth), then that
/// the certificate names one of the identities the destination may have.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let named = identities_of(end_entity);
        if named.iter().any(|id| self.expected.contains(id)) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::General(format!(
            "server identity {} is not the destination's (expected one of {})",
            named
                .first()
                .map_or("(none)".to_string(), ToString::to_string),
            self.expected
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ca::BuiltinCa, manager::CertMetrics, CertManager};
    use std::time::Duration;

    fn manager(ca: Arc<BuiltinCa>, td: &str) -> CertManager {
        CertManager::new(ca, td, Duration::from_secs(3600), CertMetrics::default())
    }

    /// One handshake over an in-memory pipe: Ok(the client identity the server saw).
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<Vec<Identity>, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(client);
        let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(server_name(), b));
        let c = c.map_err(|e| format!("client: {e}"))?;
        let s = s.map_err(|e| format!("server: {e}"))?;
        assert_eq!(c.get_ref().1.alpn_protocol(), Some(ALPN_H2));
        let peer = s
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .first()
            .cloned();
        Ok(peer.map(|p| identities_of(&p)).unwrap_or_default())
    }

    #[tokio::test]
    async fn hbone_mtls_checks_both_identities_and_the_trust_domain() {
        let ca = Arc::new(BuiltinCa::ephemeral("cluster.local").unwrap());
        let m = manager(ca.clone(), "cluster.local");
        let (cart, payments, other) = (
            Identity::new("cluster.local", "shop", "cart"),
            Identity::new("cluster.local", "prod", "payments"),
            Identity::new("cluster.local", "prod", "ledger"),
        );
        let server = m.fetch(&payments).await.unwrap();
        let client = m.fetch(&cart).await.unwrap();
        // The right pair: the server sees who called.
        let seen = handshake(
            server.server.clone(),
            client.client(vec![payments.clone()]).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(seen, vec![cart.clone()]);
        // A server that is not the destination expected: refused by the client.
        let err = handshake(server.server.clone(), client.client(vec![other]).unwrap())
            .await
            .unwrap_err();
        assert!(err.contains("not the destination's"), "{err}");
        // A client of another trust domain, with a certificate of the same root: refused.
        let foreign = manager(ca, "evil.example");
        let stranger = foreign
            .fetch(&Identity::new("evil.example", "shop", "cart"))
            .await
            .unwrap();
        let err = handshake(
            server.server.clone(),
            stranger.client(vec![payments.clone()]).unwrap(),
        )
        .await
        .unwrap_err();
        assert!(err.contains("server") || err.contains("client"), "{err}");
        // A client from another root entirely: refused.
        let other_ca = manager(
            Arc::new(BuiltinCa::ephemeral("cluster.local").unwrap()),
            "cluster.local",
        );
        let outsider = other_ca.fetch(&cart).await.unwrap();
        assert!(handshake(
            server.server.clone(),
            outsider.client(vec![payments]).unwrap()
        )
        .await
        .is_err());
    }
}
