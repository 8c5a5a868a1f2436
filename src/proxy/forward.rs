//! Forwarding an upgrade to the session's owner node: one signed hop,
//! the owner's answer passed back to the client, then a byte tunnel.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;

use super::handshake::{text, Body, ConnInfo};
use super::hop::HOP_HEADER;
use super::io::{MaybeTls, UpstreamIo};
use crate::broker::Broker;
use crate::control::metrics::UpgradeResult;

/// Largest response head accepted from a peer node.
const MAX_HEAD: usize = 16 * 1024;

/// Request headers never copied onto the hop (the hop sets its own).
const NOT_COPIED: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "proxy-connection",
    "content-length",
    "sec-websocket-extensions",
    HOP_HEADER,
];

#[derive(Debug, thiserror::Error)]
pub(crate) enum HopFailure {
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad response from the owner")]
    BadResponse,
}

/// Opens a connection to a peer node's public listener.
pub(crate) async fn connect(broker: &Broker, advertise: &str) -> Result<UpstreamIo, HopFailure> {
    let tcp = TcpStream::connect(advertise).await?;
    let _ = tcp.set_nodelay(true);
    if broker.config.tls.is_none() {
        return Ok(MaybeTls::Plain(tcp));
    }
    let host = advertise
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(advertise);
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let name = ServerName::try_from(host).map_err(|_| HopFailure::BadResponse)?;
    let tls = broker
        .upstreams
        .tls()
        .connector()
        .connect(name, tcp)
        .await?;
    Ok(MaybeTls::Tls(Box::new(tls)))
}

/// Sends the upgrade to `advertise`; returns the owner's response head and
/// the open stream.
async fn open_hop(
    broker: &Broker,
    advertise: &str,
    parts: &Parts,
    hop: &str,
) -> Result<(u16, Vec<(String, String)>, UpstreamIo, BytesMut), HopFailure> {
    let mut io = connect(broker, advertise).await?;
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut head = format!("GET {target} HTTP/1.1\r\nHost: {advertise}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n");
    for (name, value) in &parts.headers {
        if NOT_COPIED.contains(&name.as_str()) {
            continue;
        }
        if let Ok(v) = value.to_str() {
            head.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    head.push_str(&format!("{HOP_HEADER}: {hop}\r\n\r\n"));
    io.write_all(head.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD || io.read_buf(&mut buf).await? == 0 {
            return Err(HopFailure::BadResponse);
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    if !matches!(resp.parse(&buf[..end]), Ok(httparse::Status::Complete(_))) {
        return Err(HopFailure::BadResponse);
    }
    let status = resp.code.unwrap_or(502);
    let headers = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let rest = buf.split_off(end);
    Ok((status, headers, io, rest))
}

/// Forwards the upgrade to the owner and, on its 101, tunnels bytes.
pub async fn forward(
    broker: &Arc<Broker>,
    parts: Parts,
    on_upgrade: hyper::upgrade::OnUpgrade,
    conn: Arc<ConnInfo>,
    session: &str,
    owner: &str,
    advertise: &str,
) -> Response<Body> {
    let Some(hops) = broker.hops.as_ref() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: no cluster secret",
        );
    };
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let client = conn.peer.ip().to_canonical().to_string();
    let hop = hops.sign(&broker.node_id, &client, conn.tls, session, target);
    let timeout = broker.upstreams.connect_timeout();
    let (status, headers, mut io, mut rest) =
        match tokio::time::timeout(timeout, open_hop(broker, advertise, &parts, &hop)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(session, owner, advertise, error = %e, "owner node unreachable");
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "503 Service Unavailable: session owner unreachable",
                );
            }
            Err(_) => {
                tracing::warn!(session, owner, advertise, "owner node timed out");
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "503 Service Unavailable: session owner unreachable",
                );
            }
        };
    broker.metrics.forwarded.inc();
    broker.metrics.upgrade(UpgradeResult::Forwarded);
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if matches!(
            lower.as_str(),
            "content-length" | "transfer-encoding" | "connection" | "keep-alive"
        ) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            resp.headers_mut().append(n, v);
        }
    }
    if status != 101 {
        // Pass the owner's short answer on (bounded), then close.
        let _ = tokio::time::timeout(Duration::from_secs(1), io.read_buf(&mut rest)).await;
        rest.truncate(4096);
        *resp.body_mut() = Full::new(rest.freeze());
        return resp;
    }
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let guard = conn.guard.clone();
    let stop = broker.shutdown.clone();
    let session = session.to_string();
    broker.tasks.spawn(async move {
        let _guard = guard;
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut client = TokioIo::new(upgraded);
        if !rest.is_empty() && client.write_all(&rest).await.is_err() {
            return;
        }
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut io) => {
                tracing::debug!(session, result = ?r.map(|_| ()), "forwarded connection ended");
            }
            _ = stop.cancelled() => {}
        }
    });
    resp
}
