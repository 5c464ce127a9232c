//! TLS origination: the app speaks plain HTTP, the node proxy speaks TLS upstream, as a
//! DestinationRule's `tls` (SIMPLE / MUTUAL) asks.
//!
//! Client configurations are built once per distinct setting and ALPN and kept, so their
//! session caches make later handshakes resumptions. The files behind a configuration
//! (CA bundle, client certificate and key, or a `credentialName` directory) are checked for
//! changes at most once a second; a changed file gives a new configuration on the next
//! connection, without a restart.
use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        Resumption, WebPkiServerVerifier,
    },
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::{config::istio::TlsMode, state::routes::TlsOrigination};

/// How often the files behind a cached configuration are checked for changes.
const RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {path}: {message}")]
    Parse {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("credentialName {name}: the Secret is in namespace {secret_namespace}; pods of {client_namespace} cannot use it (a credential serves the pods of its own namespace)")]
    CredentialNamespace {
        name: String,
        secret_namespace: String,
        client_namespace: String,
    },
    #[error("credentialName {0:?} is not a Secret name (no '/', no leading '.')")]
    BadCredentialName(String),
    #[error("credentialName {0}: no --credentials-dir to read it from")]
    NoCredentialsDir(String),
    #[error("tls mode MUTUAL without a client certificate: {0}; not connecting without one")]
    NoClientCertificate(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// TLS to use for one upstream: the DestinationRule's settings and the SNI to send.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub settings: TlsOrigination,
    pub sni: String,
    /// Distinguishes pooled connections made with different settings to the same address.
    pub pool_key: u64,
    /// The settings in full (SNI and every field): what a built client configuration is
    /// cached under. Never a hash of them: a namespace owner chooses free text in its rule
    /// (SNI, SANs) and could make a hash equal another tenant's, and be handed that
    /// tenant's configuration, client certificate included.
    pub settings_key: Arc<str>,
}

impl UpstreamTls {
    /// `None` for `mode: DISABLE`. `host` is the destination's hostname (the default SNI).
    pub fn new(settings: &TlsOrigination, host: &str) -> Option<Self> {
        if matches!(settings.mode, TlsMode::Disable) {
            return None;
        }
        let sni = settings.sni.clone().unwrap_or_else(|| host.to_string());
        let settings_key: Arc<str> = format!("{sni}|{settings:?}").into();
        let pool_key = crate::proxy::balance::fnv1a(settings_key.as_bytes()) | 1;
        Some(Self {
            settings: settings.clone(),
            sni,
            pool_key,
            settings_key,
        })
    }
}

/// Outcome of one origination handshake, for `proxy_daemon_upstream_tls_handshakes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    Full,
    Resumed,
}

struct Cached {
    config: Arc<ClientConfig>,
    files: Vec<(PathBuf, Option<(SystemTime, u64)>)>,
    checked: Instant,
}

pub struct Originator {
    provider: Arc<CryptoProvider>,
    credentials_dir: Option<PathBuf>,
    /// Cluster mode: `credentialName` is `<dir>/<rule namespace>/<name>` (Secrets written by
    /// the cluster source); local mode: `<dir>/<name>`.
    namespaced: bool,
    session_cache: usize,
    /// Built configurations by (full settings, ALPN, client namespace): each tenant's own,
    /// session resumption cache included.
    cache: Mutex<HashMap<ConfigKey, Cached>>,
}

/// (full settings, ALPN, client namespace).
type ConfigKey = (Arc<str>, &'static [u8], String);

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The files one setting reads: (CA bundle, client cert, client key).
struct Files {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    /// A Secret's directory, watched too: a file the Secret did not have yet when the
    /// configuration was built (it arrived after the first request) changes it.
    dir: Option<PathBuf>,
}

impl Originator {
    /// `session_cache`: TLS sessions kept per configuration for resumption (0: none).
    pub fn new(credentials_dir: Option<PathBuf>, session_cache: usize) -> Self {
        Self {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            credentials_dir,
            namespaced: false,
            session_cache,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// `credentialName`s resolve per namespace below `dir` (cluster mode's Secrets).
    pub fn namespaced(mut self) -> Self {
        self.namespaced = true;
        self
    }

    /// Where a setting's material lives. `credentialName` names a directory under
    /// `--credentials-dir` holding a Kubernetes TLS Secret's keys (`tls.crt`, `tls.key`,
    /// `ca.crt`) or Istio's generic ones (`cert`, `key`, `cacert`).
    fn files(&self, t: &TlsOrigination) -> Result<Files, TlsError> {
        if let Some(name) = &t.credential_name {
            // A name is one path component: "../other-namespace/x" must not reach another
            // team's Secret.
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(TlsError::BadCredentialName(name.clone()));
            }
            let base = self
                .credentials_dir
                .as_ref()
                .ok_or_else(|| TlsError::NoCredentialsDir(name.clone()))?;
            let dir = if self.namespaced {
                base.join(&t.credential_namespace).join(name)
            } else {
                base.join(name)
            };
            let first = |a: &str, b: &str| {
                let p = dir.join(a);
                if p.exists() {
                    Some(p)
                } else {
                    Some(dir.join(b)).filter(|p| p.exists())
                }
            };
            return Ok(Files {
                ca: first("ca.crt", "cacert").or_else(|| t.ca_certificates.clone().map(Into::into)),
                cert: first("tls.crt", "cert"),
                key: first("tls.key", "key"),
                dir: Some(dir),
            });
        }
        Ok(Files {
            ca: t.ca_certificates.clone().map(Into::into),
            cert: t.client_certificate.clone().map(Into::into),
            key: t.private_key.clone().map(Into::into),
            dir: None,
        })
    }

    /// The client configuration for `tls` offering `alpn` to pods of `client_namespace`,
    /// built or reused.
    pub fn config(
        &self,
        tls: &UpstreamTls,
        alpn: &'static [u8],
        client_namespace: &str,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let key = (tls.settings_key.clone(), alpn, client_namespace.to_string());
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get_mut(&key) {
                if c.checked.elapsed() < RECHECK {
                    return Ok(c.config.clone());
                }
                if c.files.iter().all(|(p, s)| stamp(p) == *s) {
                    c.checked = Instant::now();
                    return Ok(c.config.clone());
                }
                tracing::info!(sni = %tls.sni, "TLS files changed on disk; reloading");
            }
        }
        let files = self.files(&tls.settings)?;
        let config = Arc::new(self.build(&tls.settings, &files, alpn)?);
        let watched = [&files.ca, &files.cert, &files.key, &files.dir]
            .into_iter()
            .flatten()
            .map(|p| (p.clone(), stamp(p)))
            .collect();
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(
            key,
            Cached {
                config: config.clone(),
                files: watched,
                checked: Instant::now(),
            },
        );
        Ok(config)
    }

    fn build(
        &self,
        t: &TlsOrigination,
        files: &Files,
        alpn: &'static [u8],
    ) -> Result<ClientConfig, TlsError> {
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
        let verifier: Arc<dyn ServerCertVerifier> = if t.insecure_skip_verify {
            Arc::new(NoVerification(self.provider.clone()))
        } else {
            let mut roots = RootCertStore::empty();
            match &files.ca {
                Some(path) => {
                    for cert in read_certs(path, "caCertificates")? {
                        roots.add(cert).map_err(|e| TlsError::Parse {
                            what: "caCertificates",
                            path: path.clone(),
                            message: e.to_string(),
                        })?;
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            let roots_for_uri = roots.clone();
            let inner =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            let sans = t
                .subject_alt_names
                .iter()
                .filter_map(|s| match ServerName::try_from(s.clone()) {
                    _ if s.contains("://") => Some(San::Uri(s.clone())),
                    Ok(name) => Some(San::Name(name)),
                    // Refused at compile (`validate`): never silently dropped here.
                    Err(_) => None,
                })
                .collect();
            Arc::new(SanVerifier {
                inner,
                sans,
                roots: Arc::new(roots_for_uri),
                algorithms: self.provider.signature_verification_algorithms,
            })
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "clientCertificate")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Parse {
                    what: "privateKey",
                    path: key.clone(),
                    message: e.to_string(),
                })?;
                builder.with_client_auth_cert(chain, key)?
            }
            // MUTUAL means the server gets our certificate: without one (a Secret deleted
            // or missing its keys), fail rather than quietly connect as nobody.
            _ if t.mode == TlsMode::Mutual => {
                return Err(TlsError::NoClientCertificate(
                    t.credential_name
                        .clone()
                        .map(|n| format!("credentialName {n} has no tls.crt/tls.key (or cert/key)"))
                        .unwrap_or_else(|| {
                            "clientCertificate and privateKey are not both set".into()
                        }),
                ))
            }
            _ => builder.with_no_client_auth(),
        };
        // No ALPN for opaque TCP (an empty list, never an empty name).
        config.alpn_protocols = if alpn.is_empty() {
            Vec::new()
        } else {
            vec![alpn.to_vec()]
        };
        config.resumption = if self.session_cache == 0 {
            Resumption::disabled()
        } else {
            Resumption::in_memory_sessions(self.session_cache)
        };
        Ok(config)
    }

    /// Handshakes over `stream` for a pod of `client_namespace`; Err is the reason, for the
    /// 503 body and the log line.
    pub async fn connect(
        &self,
        tls: &UpstreamTls,
        alpn: &'static [u8],
        stream: TcpStream,
        client_namespace: &str,
    ) -> Result<(UpstreamIo, Handshake), String> {
        // Istio: a credentialName Secret serves the proxies of its own namespace. A node
        // proxy serves every namespace, so a rule in one namespace must not lend its
        // Secret to another namespace's pods.
        if let (true, Some(name)) = (self.namespaced, &tls.settings.credential_name) {
            if tls.settings.credential_namespace != client_namespace {
                return Err(TlsError::CredentialNamespace {
                    name: name.clone(),
                    secret_namespace: tls.settings.credential_namespace.clone(),
                    client_namespace: client_namespace.to_string(),
                }
                .to_string());
            }
        }
        let config = self
            .config(tls, alpn, client_namespace)
            .map_err(|e| e.to_string())?;
        let name =
            ServerName::try_from(tls.sni.clone()).map_err(|e| format!("SNI {:?}: {e}", tls.sni))?;
        let s = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| e.to_string())?;
        let kind = match s.get_ref().1.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => Handshake::Resumed,
            _ => Handshake::Full,
        };
        Ok((UpstreamIo::Tls(Box::new(s)), kind))
    }
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Parse {
            what,
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Parse {
            what,
            path: path.to_path_buf(),
            message: "no PEM certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// The chain must lead to a trusted root and name the SNI, or, when `subjectAltNames` are
/// given, one of them instead.
/// A `subjectAltNames` entry: a DNS name or IP (checked by webpki), or a URI such as a
/// SPIFFE ID (checked against the certificate's URI SANs after the chain is verified).
#[derive(Debug)]
enum San {
    Name(ServerName<'static>),
    Uri(String),
}

#[derive(Debug)]
struct SanVerifier {
    inner: Arc<WebPkiServerVerifier>,
    sans: Vec<San>,
    roots: Arc<RootCertStore>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

/// The URI SANs of a certificate.
fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(ext)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.sans.is_empty() {
            return self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp,
                now,
            );
        }
        let mut last = None;
        let mut uris: Option<Vec<String>> = None;
        for san in &self.sans {
            match san {
                San::Name(name) => {
                    match self
                        .inner
                        .verify_server_cert(end_entity, intermediates, name, ocsp, now)
                    {
                        Ok(v) => return Ok(v),
                        Err(e) => last = Some(e),
                    }
                }
                San::Uri(uri) => {
                    // The chain first (no name: a SPIFFE certificate has none), then the
                    // URI among the certificate's own.
                    let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                    rustls::client::verify_server_cert_signed_by_trust_anchor(
                        &parsed,
                        &self.roots,
                        intermediates,
                        now,
                        self.algorithms.all,
                    )?;
                    let have = uris.get_or_insert_with(|| uri_sans(end_entity));
                    if have.iter().any(|h| h == uri) {
                        return Ok(ServerCertVerified::assertion());
                    }
                    last = Some(rustls::Error::General(format!(
                        "certificate URI SANs {have:?} do not include {uri}"
                    )));
                }
            }
        }
        Err(last.unwrap_or_else(|| rustls::Error::General("no subjectAltNames".into())))
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

/// `insecureSkipVerify: true`: any certificate is accepted (the handshake signatures are
/// still checked, so the peer holds the key of the certificate it showed).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An upstream connection, plain or with originated TLS.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// An HBONE tunnel to a mesh pod (mutual TLS, HTTP/2 CONNECT).
    Tunnel(Box<crate::proxy::hbone::TunnelIo>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            UpstreamIo::Tunnel(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            UpstreamIo::Tunnel(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            UpstreamIo::Tunnel(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            UpstreamIo::Tunnel(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_client_configuration_is_never_another_tenants_whatever_the_hash() {
        let originator = Originator::new(None, 8);
        let settings = |sni: &str| TlsOrigination {
            mode: TlsMode::Simple,
            client_certificate: None,
            private_key: None,
            ca_certificates: None,
            credential_name: None,
            credential_namespace: "shop".into(),
            subject_alt_names: Vec::new(),
            sni: Some(sni.into()),
            insecure_skip_verify: true,
        };
        let theirs = UpstreamTls::new(&settings("victim.example"), "h").unwrap();
        let mut mine = UpstreamTls::new(&settings("attacker.example"), "h").unwrap();
        // As if the attacker had found settings whose hash equals the victim's.
        mine.pool_key = theirs.pool_key;
        let a = originator.config(&theirs, b"http/1.1", "prod").unwrap();
        let b = originator.config(&mine, b"http/1.1", "prod").unwrap();
        assert!(
            !Arc::ptr_eq(&a, &b),
            "a colliding hash got the victim's configuration"
        );
        // The same settings used by two namespaces: two configurations (and two session
        // caches), so no tenant resumes another's TLS sessions.
        let c = originator.config(&theirs, b"http/1.1", "aaa").unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(Arc::ptr_eq(
            &a,
            &originator.config(&theirs, b"http/1.1", "prod").unwrap()
        ));
    }

    #[test]
    fn mutual_without_a_client_certificate_fails_instead_of_downgrading() {
        let dir = std::env::temp_dir().join(format!("pd-tls-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("shop/partner")).unwrap();
        let originator = Originator::new(Some(dir.clone()), 0).namespaced();
        let settings = TlsOrigination {
            mode: TlsMode::Mutual,
            client_certificate: None,
            private_key: None,
            ca_certificates: None,
            credential_name: Some("partner".into()),
            credential_namespace: "shop".into(),
            subject_alt_names: Vec::new(),
            sni: None,
            insecure_skip_verify: false,
        };
        let tls = UpstreamTls::new(&settings, "api.example.com").unwrap();
        let Err(err) = originator.config(&tls, b"http/1.1", "shop") else {
            panic!("MUTUAL accepted without a client certificate")
        };
        assert!(
            err.to_string()
                .contains("credentialName partner has no tls.crt"),
            "{err}"
        );
        // SIMPLE needs no client certificate.
        let simple = TlsOrigination {
            mode: TlsMode::Simple,
            ..settings
        };
        let tls = UpstreamTls::new(&simple, "api.example.com").unwrap();
        assert!(originator.config(&tls, b"http/1.1", "shop").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
