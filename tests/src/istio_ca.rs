//! A stand-in for Istio's CA (istiod's `IstioCertificateService`, as cert-manager's
//! istio-csr serves it too): gRPC over TLS (HTTP/2), `CreateCertificate` with the messages
//! of Istio's published proto (`tests/fixtures/istio-ca/ca.proto`, written here by hand
//! with prost), a bearer token per caller, and istiod's rule for node proxies: a caller may
//! ask for another identity (`ImpersonatedIdentity` metadata) only if its account is one
//! of `CA_TRUSTED_NODE_ACCOUNTS`; the CSR must name exactly the identity asked for.
//! It can be taken down and brought back, and records every call.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http_body_util::BodyExt as _;

use crate::pki::TestCa;

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    #[prost(string, tag = "1")]
    pub csr: String,
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<PbStruct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// `google.protobuf.Struct`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PbStruct {
    #[prost(btree_map = "string, message", tag = "1")]
    pub fields: BTreeMap<String, PbValue>,
}

/// `google.protobuf.Value` (its string case).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PbValue {
    #[prost(string, optional, tag = "3")]
    pub string_value: Option<String>,
}

/// One call as the CA saw it.
#[derive(Debug, Clone)]
pub struct CaCall {
    /// The caller's account (from its token), None without a valid token.
    pub caller: Option<String>,
    pub impersonated: Option<String>,
    pub csr_uris: Vec<String>,
    pub cluster_id: Option<String>,
    /// 0: a certificate was issued; else the gRPC status returned.
    pub grpc_status: u32,
}

struct Shared {
    ca: TestCa,
    /// token → account (`<namespace>/<service account>`).
    tokens: Mutex<BTreeMap<String, String>>,
    trusted_node_accounts: Vec<String>,
    available: AtomicBool,
    calls: Mutex<Vec<CaCall>>,
}

/// The stand-in CA; stops when dropped.
pub struct IstioCa {
    shared: Arc<Shared>,
    pub addr: std::net::SocketAddr,
    /// The root that signed the CA's serving certificate (the daemon's --ca-root-cert).
    pub serving_root_pem: String,
    /// The mesh root workload certificates chain to.
    pub mesh_root_pem: String,
    _rt: tokio::runtime::Runtime,
}

const METHOD: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

impl IstioCa {
    /// Listens on 127.0.0.1 (a free port), serving as `localhost`; workload certificates
    /// signed by `mesh` (its root is the mesh's); `trusted_node_accounts` may impersonate.
    pub fn start(mesh: TestCa, trusted_node_accounts: &[&str]) -> IstioCa {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("istio-ca")
            .enable_all()
            .build()
            .expect("istio-ca runtime");
        let serving = TestCa::new("istiod-serving-root");
        let leaf = serving.server(&["localhost", "istiod.istio-system.svc"], false);
        let acceptor = acceptor(&leaf.cert_pem, &leaf.key_pem);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("istio-ca bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let mesh_root_pem = mesh.cert_pem.clone();
        let shared = Arc::new(Shared {
            ca: mesh,
            tokens: Mutex::new(BTreeMap::new()),
            trusted_node_accounts: trusted_node_accounts
                .iter()
                .map(|s| s.to_string())
                .collect(),
            available: AtomicBool::new(true),
            calls: Mutex::new(Vec::new()),
        });
        let accept = shared.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if !accept.available.load(Ordering::SeqCst) {
                    // Down: the connection is reset, as a dead istiod's would be.
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    continue;
                }
                let (acceptor, shared) = (acceptor.clone(), accept.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        IstioCa {
            shared,
            addr,
            serving_root_pem: serving.cert_pem,
            mesh_root_pem,
            _rt: rt,
        }
    }

    /// A bearer token for `account` (`<namespace>/<service account>`).
    pub fn token_for(&self, account: &str) -> String {
        let token = format!(
            "token-{}-{}",
            account.replace('/', "-"),
            rand::random::<u64>()
        );
        self.shared
            .tokens
            .lock()
            .unwrap()
            .insert(token.clone(), account.to_string());
        token
    }

    /// Down (new connections reset, calls on open ones answered UNAVAILABLE) or up.
    pub fn set_available(&self, up: bool) {
        self.shared.available.store(up, Ordering::SeqCst);
    }

    pub fn calls(&self) -> Vec<CaCall> {
        self.shared.calls.lock().unwrap().clone()
    }

    /// `https://localhost:<port>`.
    pub fn address(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

type Resp = hyper::Response<GrpcBody>;

/// A unary gRPC answer's body: the message, then the status in trailers.
pub struct GrpcBody {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl hyper::body::Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(d))));
        }
        std::task::Poll::Ready(
            self.trailers
                .take()
                .map(|t| Ok(hyper::body::Frame::trailers(t))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// A gRPC answer: a message with status 0 in trailers, or a "trailers-only" answer (the
/// status in the headers, no body).
fn grpc(status: u32, message: &str, body: Option<Bytes>) -> Resp {
    let b = hyper::Response::builder()
        .status(200)
        .header("content-type", "application/grpc");
    match body {
        Some(data) => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from(status));
            b.body(GrpcBody {
                data: Some(data),
                trailers: Some(trailers),
            })
        }
        None => b
            .header("grpc-status", status.to_string())
            .header("grpc-message", message)
            .body(GrpcBody {
                data: None,
                trailers: None,
            }),
    }
    .expect("response")
}

async fn handle(shared: &Shared, req: hyper::Request<hyper::body::Incoming>) -> Resp {
    if req.uri().path() != METHOD {
        return grpc(12, "unknown method", None);
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let cluster_id = header("clusterid");
    let caller = header("authorization")
        .and_then(|a| a.strip_prefix("Bearer ").map(str::to_string))
        .and_then(|t| shared.tokens.lock().unwrap().get(&t).cloned());
    let Ok(body) = req.into_body().collect().await else {
        return grpc(13, "body", None);
    };
    let mut body = body.to_bytes();
    let request: Option<IstioCertificateRequest> = (body.len() >= 5)
        .then(|| {
            let _compressed = body.get_u8();
            let len = body.get_u32() as usize;
            prost::Message::decode(body.split_to(len.min(body.len()))).ok()
        })
        .flatten();
    let mut call = CaCall {
        caller: caller.clone(),
        impersonated: None,
        csr_uris: Vec::new(),
        cluster_id,
        grpc_status: 0,
    };
    let answer = decide(shared, caller.as_deref(), request.as_ref(), &mut call);
    call.grpc_status = match &answer {
        Ok(_) => 0,
        Err((status, _)) => *status,
    };
    shared.calls.lock().unwrap().push(call);
    match answer {
        Ok(chain) => {
            let message =
                prost::Message::encode_to_vec(&IstioCertificateResponse { cert_chain: chain });
            let mut framed = BytesMut::with_capacity(5 + message.len());
            framed.put_u8(0);
            framed.put_u32(message.len() as u32);
            framed.extend_from_slice(&message);
            grpc(0, "", Some(framed.freeze()))
        }
        Err((status, message)) => grpc(status, &message, None),
    }
}

/// istiod's checks, in its order: available, authenticated, allowed to impersonate, the
/// CSR's identity the one asked for.
fn decide(
    shared: &Shared,
    caller: Option<&str>,
    request: Option<&IstioCertificateRequest>,
    call: &mut CaCall,
) -> Result<Vec<String>, (u32, String)> {
    if !shared.available.load(Ordering::SeqCst) {
        return Err((14, "unavailable".into()));
    }
    let Some(caller) = caller else {
        return Err((16, "authenticate failure".into()));
    };
    let Some(request) = request else {
        return Err((3, "bad request".into()));
    };
    let impersonated = request
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("ImpersonatedIdentity"))
        .and_then(|v| v.string_value.clone());
    call.impersonated = impersonated.clone();
    call.csr_uris = TestCa::csr_uris(&request.csr);
    let (ns, sa) = caller.split_once('/').unwrap_or(("", caller));
    let own = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    let wanted = match impersonated {
        Some(id) if id != own => {
            if !shared.trusted_node_accounts.iter().any(|a| a == caller) {
                return Err((
                    7,
                    format!("caller {caller} is not a trusted node account and may not impersonate {id}"),
                ));
            }
            id
        }
        _ => own,
    };
    if call.csr_uris != [wanted.clone()] {
        return Err((
            7,
            format!("the CSR names {:?}, not {wanted}", call.csr_uris),
        ));
    }
    let ttl = Duration::from_secs(
        u64::try_from(request.validity_duration)
            .unwrap_or(3600)
            .max(60),
    );
    let leaf = shared
        .ca
        .sign_csr(&request.csr, ttl)
        .map_err(|e| (3, format!("CSR: {e}")))?;
    Ok(vec![leaf, shared.ca.cert_pem.clone()])
}

fn acceptor(cert_pem: &str, key_pem: &str) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("server cert");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("server key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
