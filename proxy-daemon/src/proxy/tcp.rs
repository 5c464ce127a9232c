//! Opaque TCP: copy both ways, half-close faithfully, count bytes as they pass.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};
use tracing::debug;

use super::{
    connect_from_pod,
    route::{self, L4Decision},
    OrigDstAddr, PodContext, ProxyError, ProxyInputs,
};
use crate::{
    metrics::{DestinationLabels, IstioTcpLabels, PeerLabels},
    proxy::tls::UpstreamIo,
};

const COPY_BUFFER: usize = 64 * 1024;

pub async fn proxy(
    inputs: &ProxyInputs,
    pod: &PodContext,
    mut client: TcpStream,
    dst: OrigDstAddr,
    sni: Option<String>,
) -> Result<(), ProxyError> {
    let daemon = &inputs.metrics.daemon;
    let started = std::time::Instant::now();
    let start_time = std::time::SystemTime::now();
    let snapshot = inputs.config.load();
    let decision = route::decide(
        &snapshot,
        &inputs.endpoints,
        pod,
        dst.0,
        inputs.settings.outbound_policy,
        super::weighted_roll(),
        sni.as_deref(),
    );
    let tcp = &inputs.metrics.tcp;
    let (upstream_addr, destination, tls) = match decision {
        L4Decision::Forward {
            upstream,
            labels,
            tls,
        } => (upstream, Arc::new(labels), tls),
        L4Decision::Refuse { labels, flags } => {
            let dest = Arc::new(labels);
            let refused =
                IstioTcpLabels::new(&pod.source_labels, &PeerLabels::unknown(), &dest, flags);
            tcp.open(&refused);
            tcp.close(&refused);
            super::report::log_tcp(super::report::TcpLog {
                pod,
                snap: &snapshot,
                start_time,
                duration: started.elapsed(),
                dest: &dest,
                peer: &PeerLabels::unknown(),
                upstream: None,
                original_dst: SocketAddr::V4(dst.0),
                flags,
                received: 0,
                sent: 0,
            });
            // Reset: the app sees the connection refused, as Envoy's BlackHole does.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return Err(ProxyError::Refused(flags, dst));
        }
    };
    // connectionPool.tcp.maxConnections: over it, the connection is reset (UO).
    let pool = {
        let snap = inputs.config.load();
        snap.routes
            .destination_rule(&destination.service, &pod.workload.namespace)
            .and_then(|dr| {
                dr.effective(Some(dst.0.port() as u32), None)
                    .connection_pool
            })
    };
    let peer = super::report::peer_for(&snapshot, &destination, Some(upstream_addr));
    drop(snapshot);
    let Ok(_permit) = inputs
        .endpoints
        .host_limits
        .admit(
            &pod.source_labels,
            &destination.service,
            pool.as_ref(),
            false,
        )
        .await
    else {
        let overflow = IstioTcpLabels::new(&pod.source_labels, &peer, &destination, "UO");
        tcp.open(&overflow);
        tcp.close(&overflow);
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        return Err(ProxyError::Refused("UO", dst));
    };
    let _load = inputs.endpoints.in_flight.start(upstream_addr);
    let labels = IstioTcpLabels::new(&pod.source_labels, &peer, &destination, "");
    tcp.open(&labels);

    let connected = match connect_from_pod(pod, upstream_addr, inputs.settings.connect_timeout)
        .await
    {
        Ok(s) => match &tls {
            None => Ok(UpstreamIo::Plain(s)),
            Some(t) => {
                // DestinationRule tls on a TCP port: the bytes go out inside TLS.
                let handshake = tokio::time::timeout(
                    inputs.settings.connect_timeout,
                    inputs.tls.connect(t, b"", s, &pod.workload.namespace),
                )
                .await
                .unwrap_or_else(|_| Err("handshake timed out".into()));
                let result = match &handshake {
                    Ok((_, crate::proxy::tls::Handshake::Full)) => "full",
                    Ok((_, crate::proxy::tls::Handshake::Resumed)) => "resumed",
                    Err(_) => "failed",
                };
                daemon
                    .upstream_tls_handshakes
                    .get_or_create(&crate::metrics::TlsHandshakeLabels { result })
                    .inc();
                handshake.map(|(io, _)| io).map_err(|reason| {
                    tracing::warn!(upstream = %upstream_addr, sni = %t.sni, %reason, "upstream TLS handshake failed");
                    ProxyError::Tls(upstream_addr, reason)
                })
            }
        },
        Err(e) => Err(e),
    };
    let upstream = match connected {
        Ok(s) => s,
        Err(e) => {
            daemon.upstream_connect_failures.inc();
            let failed = IstioTcpLabels::new(&pod.source_labels, &peer, &destination, "UF");
            tcp.close(&failed);
            log_close(
                inputs,
                pod,
                start_time,
                started,
                &destination,
                &peer,
                upstream_addr,
                dst,
                "UF",
                (0, 0),
            );
            // Reset, so the app sees the connection fail rather than a clean empty close.
            // (SO_LINGER 0 never blocks on drop: it discards instead of waiting.)
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return Err(e);
        }
    };
    let handles = tcp.handles(&labels);
    let (received, sent) = (handles.received_bytes, handles.sent_bytes);
    let (mut client_read, mut client_write) = client.split();
    let result = match upstream {
        UpstreamIo::Plain(mut plain) => {
            let copied = {
                let (mut upstream_read, mut upstream_write) = plain.split();
                tokio::try_join!(
                    copy_counted(&mut client_read, &mut upstream_write, &received),
                    copy_counted(&mut upstream_read, &mut client_write, &sent),
                )
            };
            if copied.is_err() {
                // The client reset (or a write failed): reset the upstream too.
                let _ = socket2::SockRef::from(&plain).set_linger(Some(Duration::ZERO));
            }
            copied
        }
        tls_stream => {
            let (mut upstream_read, mut upstream_write) = tokio::io::split(tls_stream);
            tokio::try_join!(
                copy_counted(&mut client_read, &mut upstream_write, &received),
                copy_counted(&mut upstream_read, &mut client_write, &sent),
            )
        }
    };
    if result.is_err() {
        // A reset on either side is passed on as a reset, not a clean close, so the app
        // sees the failure it would have seen without the proxy.
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
    }
    let flags = match &result {
        Ok(_) => "",
        Err(_) => "UC",
    };
    if let Err(e) = &result {
        debug!(dst = %dst.0, error = %e, "copy ended with error");
    }
    tcp.close(&IstioTcpLabels::new(
        &pod.source_labels,
        &peer,
        &destination,
        flags,
    ));
    let totals = result.as_ref().map(|(r, s)| (*r, *s)).unwrap_or((0, 0));
    log_close(
        inputs,
        pod,
        start_time,
        started,
        &destination,
        &peer,
        upstream_addr,
        dst,
        flags,
        totals,
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn log_close(
    inputs: &ProxyInputs,
    pod: &PodContext,
    start_time: std::time::SystemTime,
    started: std::time::Instant,
    dest: &DestinationLabels,
    peer: &PeerLabels,
    upstream: SocketAddr,
    dst: OrigDstAddr,
    flags: &str,
    (received, sent): (u64, u64),
) {
    let snap = inputs.config.load();
    super::report::log_tcp(super::report::TcpLog {
        pod,
        snap: &snap,
        start_time,
        duration: started.elapsed(),
        dest,
        peer,
        upstream: Some(upstream),
        original_dst: SocketAddr::V4(dst.0),
        flags,
        received,
        sent,
    });
}

/// Copies until EOF, then shuts down the write side (half-close), counting as it goes.
async fn copy_counted<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &Counter,
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(total);
        }
        writer.write_all(&buf[..n]).await?;
        total += n as u64;
        counter.inc_by(n as u64);
    }
}
