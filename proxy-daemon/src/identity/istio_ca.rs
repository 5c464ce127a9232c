//! Istio's CA API, as istiod and cert-manager's istio-csr serve it: gRPC
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS, one call per
//! workload identity, with the daemon's service-account token (`authorization: Bearer`)
//! and the identity asked for in the request's `ImpersonatedIdentity` metadata (istiod
//! allows it for the accounts in `CA_TRUSTED_NODE_ACCOUNTS`, as it does for ztunnel).
//! The key is made here and never leaves memory; the CA sees only the CSR.
use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use super::{
    ca::{CaError, CertificateAuthority, Issued},
    Identity,
};

/// The gRPC method's path.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// How long one call may take, connection included: a CA that does not answer leaves the
/// pod in its fail mode, and the next attempt comes with the enroller's next pass.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted (a chain is a few KiB).
const MAX_RESPONSE: usize = 256 * 1024;

/// `istio.v1.auth.IstioCertificateRequest` (istio/api security/v1alpha1/ca.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    #[prost(string, tag = "1")]
    pub csr: String,
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// `google.protobuf.Struct`, with the one kind of value the API uses (strings).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Struct {
    #[prost(btree_map = "string, message", tag = "1")]
    pub fields: std::collections::BTreeMap<String, Value>,
}

/// `google.protobuf.Value`'s `string_value` (field 3 of its oneof).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(string, optional, tag = "3")]
    pub string_value: Option<String>,
}

/// gRPC's length-prefixed message framing (uncompressed).
pub fn frame(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(0);
    out.put_u32(body.len() as u32);
    out.extend_from_slice(&body);
    out.freeze()
}

/// The one message of a gRPC body.
pub fn unframe(mut body: Bytes) -> Result<Bytes, String> {
    if body.len() < 5 {
        return Err("a gRPC message shorter than its prefix".into());
    }
    let compressed = body.get_u8();
    let len = body.get_u32() as usize;
    if compressed != 0 {
        return Err("a compressed gRPC message (none was asked for)".into());
    }
    if body.len() < len {
        return Err("a gRPC message cut short".into());
    }
    Ok(body.split_to(len))
}

/// Where and how to reach the CA.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IstioCaSettings {
    /// `https://host:port` or `host:port`.
    pub address: String,
    /// The root that signed the CA's serving certificate.
    pub root_cert: PathBuf,
    /// The service-account token to send (read on each call: projected tokens rotate).
    pub token_file: Option<PathBuf>,
    /// `ClusterID` header (istiod: the cluster's name, `Kubernetes` by default).
    pub cluster_id: String,
}

pub struct IstioCa {
    settings: IstioCaSettings,
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    /// The open connection, reused for every call while it lives.
    sender: tokio::sync::Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
}

fn load(what: &str, reason: impl ToString) -> CaError {
    CaError::Load {
        what: what.into(),
        reason: reason.to_string(),
    }
}

impl IstioCa {
    pub fn new(settings: IstioCaSettings) -> Result<Self, CaError> {
        let authority = settings
            .address
            .trim_start_matches("https://")
            .trim_end_matches('/');
        let (host, port) = authority
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .ok_or_else(|| load("--ca-address", format!("{authority:?} is not host:port")))?;
        let pem = std::fs::read(&settings.root_cert).map_err(|e| {
            load(
                "--ca-root-cert",
                format!("{}: {e}", settings.root_cert.display()),
            )
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile_certs(&pem) {
            roots.add(cert).map_err(|e| load("--ca-root-cert", e))?;
        }
        if roots.is_empty() {
            return Err(load("--ca-root-cert", "no certificate in the file"));
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| load("TLS", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            host: host.to_string(),
            port,
            settings,
            tls: Arc::new(tls),
            sender: tokio::sync::Mutex::new(None),
        })
    }

    async fn connect(&self) -> Result<http2::SendRequest<Full<Bytes>>, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connecting to {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with the CA: {e}"))?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2 with the CA: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// One CreateCertificate call.
    async fn create(
        &self,
        request: &IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, String> {
        let mut slot = self.sender.lock().await;
        let mut sender = match slot.take().filter(|s| !s.is_closed()) {
            Some(s) => s,
            None => self.connect().await?,
        };
        sender
            .ready()
            .await
            .map_err(|e| format!("HTTP/2 with the CA: {e}"))?;
        let mut req = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!(
                "https://{}:{}{CREATE_CERTIFICATE}",
                self.host, self.port
            ))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header("clusterid", &self.settings.cluster_id);
        if let Some(path) = &self.settings.token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|e| format!("--ca-token-file {}: {e}", path.display()))?;
            req = req.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            );
        }
        let req = req
            .body(Full::new(frame(request)))
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("calling the CA: {e}"))?;
        *slot = Some(sender);
        drop(slot);
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        let collected = http_body_util::Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| format!("reading the CA's answer: {e}"))?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let grpc_status = trailers
            .get("grpc-status")
            .or_else(|| parts.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !status.is_success() || grpc_status != "0" {
            let message = trailers
                .get("grpc-message")
                .or_else(|| parts.headers.get("grpc-message"))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            return Err(format!(
                "the CA answered HTTP {status}, gRPC status {grpc_status:?} {message}"
            ));
        }
        let message = unframe(collected.to_bytes())?;
        prost::Message::decode(message).map_err(|e| format!("the CA's answer: {e}"))
    }

    async fn issue_with(&self, identity: &Identity, ttl: Duration) -> Result<Issued, CaError> {
        let fail = |reason: String| CaError::Issue {
            identity: identity.to_string(),
            reason,
        };
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| fail(e.to_string()))?;
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| fail(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(identity.to_string())
                .map_err(|e| fail(e.to_string()))?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(|e| fail(e.to_string()))?;
        let request = IstioCertificateRequest {
            csr,
            validity_duration: ttl.as_secs() as i64,
            metadata: Some(Struct {
                fields: [(
                    "ImpersonatedIdentity".to_string(),
                    Value {
                        string_value: Some(identity.to_string()),
                    },
                )]
                .into(),
            }),
        };
        let response = tokio::time::timeout(CALL_TIMEOUT, self.create(&request))
            .await
            .map_err(|_| fail(format!("the CA did not answer within {CALL_TIMEOUT:?}")))?
            .map_err(fail)?;
        // Leaf first, then intermediates; the last is the root the mesh trusts.
        let mut chain: Vec<CertificateDer<'static>> = response
            .cert_chain
            .iter()
            .flat_map(|pem| rustls_pemfile_certs(pem.as_bytes()))
            .collect();
        if chain.is_empty() {
            return Err(fail("the CA answered without a certificate".into()));
        }
        let root = if chain.len() > 1 { chain.pop() } else { None };
        let (not_before, not_after) =
            validity(&chain[0]).ok_or_else(|| fail("the leaf's validity is unreadable".into()))?;
        Ok(Issued {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
            roots: root.into_iter().collect(),
        })
    }
}

impl CertificateAuthority for IstioCa {
    fn issue<'a>(
        &'a self,
        identity: &'a Identity,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, CaError>> + Send + 'a>> {
        Box::pin(self.issue_with(identity, ttl))
    }
}

/// The certificates of a PEM text, in order.
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

/// (not before, not after) of a certificate.
fn validity(cert: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).ok()?))
    };
    let v = parsed.validity();
    Some((at(v.not_before)?, at(v.not_after)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_encodes_as_istios_proto_says() {
        let request = IstioCertificateRequest {
            csr: "CSR".into(),
            validity_duration: 3600,
            metadata: Some(Struct {
                fields: [(
                    "ImpersonatedIdentity".to_string(),
                    Value {
                        string_value: Some("spiffe://td/ns/a/sa/b".into()),
                    },
                )]
                .into(),
            }),
        };
        let framed = frame(&request);
        assert_eq!(framed[0], 0);
        assert_eq!(
            u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize,
            framed.len() - 5
        );
        let bytes = unframe(framed).unwrap();
        // Field 1 (csr, length-delimited): tag 0x0a; field 3 (varint): tag 0x18; field 4
        // (message): tag 0x22.
        assert_eq!(&bytes[..5], b"\x0a\x03CSR");
        assert_eq!(&bytes[5..8], b"\x18\x90\x1c");
        assert_eq!(bytes[8], 0x22);
        let back: IstioCertificateRequest = prost::Message::decode(bytes).unwrap();
        assert_eq!(back, request);
        assert!(unframe(Bytes::from_static(b"\x00\x00\x00")).is_err());
        assert!(unframe(Bytes::from_static(b"\x01\x00\x00\x00\x00")).is_err());
    }

    #[test]
    fn a_bad_address_or_root_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("pd-istioca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root.pem");
        std::fs::write(&root, "not a certificate").unwrap();
        let settings = |address: &str| IstioCaSettings {
            address: address.into(),
            root_cert: root.clone(),
            token_file: None,
            cluster_id: "Kubernetes".into(),
        };
        let e = IstioCa::new(settings("istiod")).err().unwrap().to_string();
        assert!(e.contains("--ca-address") && e.contains("host:port"), "{e}");
        let e = IstioCa::new(settings("https://istiod.istio-system.svc:15012"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("--ca-root-cert") && e.contains("no certificate"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
