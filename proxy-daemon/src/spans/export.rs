//! The exporter: drains the span queue in batches and posts each batch to every
//! configured collector, reading the collectors anew per batch (so a reload takes effect
//! without a restart). A slow or dead collector costs spans (dropped and counted), never
//! requests: the queue is bounded and only this task waits on the network. The daemon's
//! own sockets live in its own network namespace and cgroup, which capture never covers.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tracing::{info, warn};

use super::{
    encode, Collector, Protocol, ProtocolLabels, SpanQueue, SpanRecord, Tracer, BATCH_DELAY,
    BATCH_MAX, EXPORT_TIMEOUT,
};

/// Resolves a collector host that is not an IP (cluster mode: a Service name, looked up in
/// the daemon's own service registry), at the given port.
pub type ResolveHost = Arc<dyn Fn(&str, u16) -> Option<SocketAddr> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("cannot resolve {0}")]
    Unresolved(String),
    #[error("{0}")]
    Transport(String),
    #[error("collector answered {0}")]
    Status(String),
}

struct Clients {
    http1: Client<HttpConnector, Full<Bytes>>,
    h2: Client<HttpConnector, Full<Bytes>>,
}

const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

async fn address(c: &Collector, resolve: &ResolveHost) -> Result<SocketAddr, ExportError> {
    if let Ok(ip) = c.host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, c.port));
    }
    if let Some(a) = resolve(&c.host, c.port) {
        return Ok(a);
    }
    tokio::net::lookup_host((c.host.as_str(), c.port))
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ExportError::Unresolved(c.host.clone()))
}

async fn send(
    clients: &Clients,
    c: &Collector,
    batch: &[SpanRecord],
    resolve: &ResolveHost,
) -> Result<(), ExportError> {
    let addr = address(c, resolve).await?;
    let (path, content_type, body, client) = match c.protocol {
        Protocol::OtlpHttp => (
            c.path.as_str(),
            "application/x-protobuf",
            encode::otlp_bytes(batch),
            &clients.http1,
        ),
        Protocol::OtlpGrpc => (
            GRPC_PATH,
            "application/grpc",
            encode::grpc_frame(&encode::otlp_bytes(batch)),
            &clients.h2,
        ),
        Protocol::Zipkin => (
            c.path.as_str(),
            "application/json",
            encode::zipkin_json(batch),
            &clients.http1,
        ),
    };
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::HOST, format!("{}:{}", c.host, c.port));
    if c.protocol == Protocol::OtlpGrpc {
        req = req.header("te", "trailers");
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| ExportError::Transport(e.to_string()))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| ExportError::Transport(format!("{addr}: {e}")))?;
    let status = resp.status();
    let header_grpc = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ExportError::Transport(e.to_string()))?;
    if !status.is_success() {
        return Err(ExportError::Status(status.to_string()));
    }
    if c.protocol == Protocol::OtlpGrpc {
        let grpc = header_grpc.or_else(|| {
            collected
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        if grpc.as_deref() != Some("0") {
            return Err(ExportError::Status(format!(
                "grpc-status {}",
                grpc.as_deref().unwrap_or("missing")
            )));
        }
    }
    Ok(())
}

/// Runs for the life of the daemon.
pub async fn run_exporter(tracer: Arc<Tracer>, mut queue: SpanQueue, resolve: ResolveHost) {
    let clients = Clients {
        http1: Client::builder(TokioExecutor::new()).build_http(),
        h2: Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http(),
    };
    // The last outcome per collector, so a dead collector is logged once, not per batch.
    let mut failing: std::collections::HashMap<String, bool> = Default::default();
    loop {
        let Some(first) = queue.rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::from_std(Instant::now() + BATCH_DELAY);
        while batch.len() < BATCH_MAX {
            match tokio::time::timeout_at(deadline, queue.rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let settings = tracer.settings();
        for c in &settings.collectors {
            let key = format!("{}://{}:{}{}", c.protocol.label(), c.host, c.port, c.path);
            let outcome =
                tokio::time::timeout(EXPORT_TIMEOUT, send(&clients, c, &batch, &resolve)).await;
            let failure = match outcome {
                Ok(Ok(())) => {
                    tracer
                        .metrics
                        .exported
                        .get_or_create(&ProtocolLabels {
                            protocol: c.protocol.label(),
                        })
                        .inc_by(batch.len() as u64);
                    None
                }
                Ok(Err(e @ ExportError::Unresolved(_))) => Some(("unresolved", e.to_string())),
                Ok(Err(e)) => Some(("export_failed", e.to_string())),
                Err(_) => Some(("timeout", format!("no answer in {EXPORT_TIMEOUT:?}"))),
            };
            let was_failing = failing
                .insert(key.clone(), failure.is_some())
                .unwrap_or(false);
            match failure {
                Some((reason, error)) => {
                    tracer.metrics.drop_n(reason, batch.len());
                    if !was_failing {
                        warn!(collector = %key, %error, spans = batch.len(), "span export failed; spans are dropped (and counted) until the collector answers");
                    }
                }
                None if was_failing => info!(collector = %key, "span export working again"),
                None => {}
            }
        }
    }
}
