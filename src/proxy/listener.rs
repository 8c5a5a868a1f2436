//! The public listener: accepts connections under `max_connections`,
//! terminates TLS, and serves HTTP/1.1 with upgrades through hyper, with
//! `handshake_timeout` and `max_header_bytes` enforced.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::handshake::{self, ConnInfo};
use super::io::{MaybeTls, PublicStream};
use crate::broker::Broker;

/// Connections over the limit that may be answered 503 at the same time;
/// past that they are closed unanswered.
const MAX_OVERLOAD_REPLIES: usize = 256;

/// A place under `max_connections`, counted in `wsbroker_connections_active`.
struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Accepts connections until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(broker.config.limits.max_connections));
    let overload = Arc::new(Semaphore::new(MAX_OVERLOAD_REPLIES));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                broker.metrics.connections_active.inc();
                let slot = ConnSlot {
                    _permit: permit,
                    gauge: broker.metrics.connections_active.clone(),
                };
                let info = Arc::new(ConnInfo {
                    peer,
                    tls: tls.is_some(),
                    guard: Arc::new(slot),
                });
                broker
                    .tasks
                    .spawn(serve_connection(stream, info, broker.clone(), tls.clone()));
            }
            Err(_) => {
                if let Ok(permit) = overload.clone().try_acquire_owned() {
                    broker
                        .tasks
                        .spawn(reject_overloaded(stream, tls.clone(), permit));
                }
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    info: Arc<ConnInfo>,
    broker: Arc<Broker>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let limits = &broker.config.limits;
    let io: PublicStream = match tls {
        None => MaybeTls::Plain(stream),
        Some(acceptor) => {
            match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => MaybeTls::Tls(Box::new(s)),
                Ok(Err(e)) => {
                    tracing::debug!(peer = %info.peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size((limits.max_header_bytes * 2).max(8192))
        .keep_alive(true);
    let svc_broker = broker.clone();
    let svc_info = info.clone();
    let service =
        service_fn(move |req| handshake::handle(req, svc_info.clone(), svc_broker.clone()));
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                tracing::debug!(peer = %info.peer, error = %e, "connection ended with an error");
            }
        }
        _ = broker.shutdown.cancelled() => {}
    }
}

async fn reject_overloaded(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    _permit: OwnedSemaphorePermit,
) {
    const BODY: &str = "503 Service Unavailable: connection limit reached\n";
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let work = async {
        let mut io: PublicStream = match tls {
            None => MaybeTls::Plain(stream),
            Some(acceptor) => MaybeTls::Tls(Box::new(acceptor.accept(stream).await.ok()?)),
        };
        io.write_all(reply.as_bytes()).await.ok()?;
        io.shutdown().await.ok()?;
        // Let the reply reach the client before the socket closes.
        super::client_reader::linger(&mut io).await;
        Some(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), work).await;
}
