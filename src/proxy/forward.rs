//! Forwarding an upgrade to the session's owner node: one signed hop,
//! the owner's answer passed back to the client, then a byte tunnel.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;

use super::driver::{CLOSE_LINGER, CLOSE_WRITE_TIMEOUT};
use super::frame::{self, Event, FrameScanner};
use super::handshake::{text, values_have_token, Body, ConnInfo};
use super::hop::HOP_HEADER;
use super::io::{ClientConn, MaybeTls, ReadSide, UpstreamIo, WriteSide};
use super::session::ConnGuard;
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

/// The upgrade request sent to the owner: the client's path, its `Host`
/// (so the owner's upstream sees the client's `X-Forwarded-Host`; the
/// owner's address only when the client sent none) and its end-to-end
/// headers, then the signed hop.
fn hop_request_head(parts: &Parts, advertise: &str, hop: &str) -> String {
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or(advertise);
    let mut head = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    );
    // Headers the client's `Connection` names are hop-by-hop: not copied
    // (the direct path drops them too).
    let connection = parts.headers.get_all(header::CONNECTION);
    for (name, value) in &parts.headers {
        if NOT_COPIED.contains(&name.as_str()) || values_have_token(&connection, name.as_str()) {
            continue;
        }
        if let Ok(v) = value.to_str() {
            head.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    head.push_str(&format!("{HOP_HEADER}: {hop}\r\n\r\n"));
    head
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
    io.write_all(hop_request_head(parts, advertise, hop).as_bytes())
        .await?;
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

/// The byte tunnel between a client and the owner node, once the client
/// has its 101.
///
/// When this node drains, the client is sent away like the node's own
/// clients: at a random moment of the drain window it gets a 1012 Close at
/// a frame boundary of the owner's stream, and the connection to the owner
/// is dropped without a Close — to the owner that is a client gone without
/// one, so it keeps the session for the client to resume through another
/// node.
pub struct Tunnel {
    owner: UpstreamIo,
    /// Bytes the owner sent after its 101.
    rest: BytesMut,
    session: String,
    broker: Arc<Broker>,
    _counted: Counted,
    _guard: ConnGuard,
}

/// Counts a tunnel in `Broker::tunnels` while it exists.
struct Counted(Arc<Broker>);

impl Counted {
    fn new(broker: &Arc<Broker>) -> Counted {
        broker.tunnels.fetch_add(1, Ordering::AcqRel);
        Counted(broker.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How the owner-to-client half of a tunnel ended.
enum Ending {
    /// The owner closed its side (passed on to the client).
    Closed,
    /// The node drains: the client was sent a 1012 Close.
    SentAway,
}

/// Bytes read from the owner at a time.
const TUNNEL_BUF: usize = 8 * 1024;
/// How long past its moment a leaving client may wait for a frame
/// boundary (and for its Close to be written) before it is cut off.
const LEAVE_GRACE: Duration = Duration::from_secs(1);
/// A timer that is not armed yet.
const FAR_FUTURE: Duration = Duration::from_secs(365 * 24 * 3600);

impl Tunnel {
    pub async fn run(self, client: ClientConn) {
        let Tunnel {
            owner,
            rest,
            session,
            broker,
            _counted,
            _guard,
        } = self;
        let ClientConn {
            read: mut client_read,
            write: mut client_write,
            leftover,
        } = client;
        let (mut owner_read, mut owner_write) = owner.into_sides();
        // When this tunnel's client leaves in a drain: a random moment of
        // the window (as for the node's own clients).
        let jitter = (broker.config.node.drain_timeout / 2).mul_f64(fastrand::f64());
        let drain = &broker.lifecycle.drain;
        let sent_away = {
            let to_owner = async {
                if !leftover.is_empty() {
                    owner_write.write_all(&leftover).await?;
                }
                tokio::io::copy(&mut client_read, &mut owner_write).await?;
                owner_write.shutdown().await
            };
            let to_client = to_client(&mut owner_read, &mut client_write, rest, drain, jitter);
            // Bounds: a client that cannot be given its Close (the owner
            // mid-frame, or the client not reading) is cut LEAVE_GRACE after
            // its moment; once the owner has closed, the client has
            // CLOSE_LINGER to close its side.
            let cut = async {
                drain.cancelled().await;
                tokio::time::sleep(jitter + LEAVE_GRACE).await;
            };
            let linger = tokio::time::sleep(FAR_FUTURE);
            tokio::pin!(to_owner, to_client, cut, linger);
            let (mut owner_side_done, mut client_side_done) = (false, false);
            loop {
                tokio::select! {
                    r = &mut to_owner, if !owner_side_done => {
                        owner_side_done = true;
                        if r.is_err() {
                            break false;
                        }
                    }
                    r = &mut to_client, if !client_side_done => {
                        client_side_done = true;
                        match r {
                            Ok(Ending::Closed) => linger
                                .as_mut()
                                .reset(tokio::time::Instant::now() + CLOSE_LINGER),
                            Ok(Ending::SentAway) => break true,
                            Err(_) => break false,
                        }
                    }
                    _ = &mut cut => break false,
                    _ = &mut linger => break false,
                    _ = broker.shutdown.cancelled() => break false,
                }
                if owner_side_done && client_side_done {
                    break false;
                }
            }
        };
        if sent_away {
            tracing::debug!(session, "tunnelled client sent away (drain)");
            // The owner's connection goes without a Close (dropped here);
            // the client's answer is read and dropped, not passed on. The
            // drain counts the client as gone from here on.
            drop(owner_write);
            drop(owner_read);
            drop(_counted);
            let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, client_write.shutdown()).await;
            super::client_reader::linger_until_stop(&mut client_read, &broker.shutdown).await;
        } else {
            tracing::debug!(session, "forwarded connection ended");
        }
    }
}

/// Relays the owner's bytes to the client, tracking frame boundaries so a
/// drain can put its Close between two frames.
async fn to_client(
    owner: &mut ReadSide,
    client: &mut WriteSide,
    rest: BytesMut,
    drain: &CancellationToken,
    jitter: Duration,
) -> std::io::Result<Ending> {
    // The owner is a node of this cluster: its frames are well-formed and
    // already within the size limit.
    let mut scanner = FrameScanner::new(false, u64::MAX);
    let mut events = Vec::new();
    // Bytes read and not relayed yet sit at the front of `buf`: only a
    // partial frame header or an incomplete control frame (at most 139
    // bytes) stays between reads, so a read always has room.
    let mut buf = vec![0u8; TUNNEL_BUF.max(rest.len() + 256)];
    buf[..rest.len()].copy_from_slice(&rest);
    let mut filled = rest.len();
    let leave = async {
        drain.cancelled().await;
        tokio::time::sleep(jitter).await;
    };
    tokio::pin!(leave);
    let mut leaving = false;
    // The owner's Close went through: the closing handshake is under way
    // and a second Close must not follow it.
    let mut owner_closed = false;
    loop {
        if filled > 0 {
            events.clear();
            let whole = scanner
                .scan(&buf[..filled], &mut events)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            owner_closed |= events
                .iter()
                .any(|e| matches!(e, Event::Control { opcode, .. } if *opcode == frame::OP_CLOSE));
            client.write_all(&buf[..whole]).await?;
            buf.copy_within(whole..filled, 0);
            filled -= whole;
        }
        if leaving && !owner_closed && scanner.at_frame_boundary() {
            let close = frame::encode_close(1012, "service restart", false);
            let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, client.write_all(&close)).await;
            return Ok(Ending::SentAway);
        }
        tokio::select! {
            _ = &mut leave, if !leaving => leaving = true,
            n = owner.read(&mut buf[filled..]) => {
                let n = n?;
                if n == 0 {
                    client.shutdown().await?;
                    return Ok(Ending::Closed);
                }
                filled += n;
            }
        }
    }
}

/// Forwards the upgrade to the owner; on its 101, the tunnel to run once
/// the client has the answer.
pub async fn forward(
    broker: &Arc<Broker>,
    parts: &Parts,
    conn: &Arc<ConnInfo>,
    session: &str,
    owner: &str,
    advertise: &str,
) -> (Response<Body>, Option<Tunnel>) {
    let Some(hops) = broker.hops.as_ref() else {
        return (
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "503 Service Unavailable: no cluster secret",
            ),
            None,
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
        match tokio::time::timeout(timeout, open_hop(broker, advertise, parts, &hop)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(session, owner, advertise, error = %e, "owner node unreachable");
                return (unreachable(), None);
            }
            Err(_) => {
                tracing::warn!(session, owner, advertise, "owner node timed out");
                return (unreachable(), None);
            }
        };
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
        return (resp, None);
    }
    // Counted once, as forwarded; a refusal by the owner is counted by the
    // caller like any other refused upgrade.
    broker.metrics.forwarded.inc();
    broker.metrics.upgrade(UpgradeResult::Forwarded);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let tunnel = Tunnel {
        owner: io,
        rest,
        session: session.to_string(),
        broker: broker.clone(),
        _counted: Counted::new(broker),
        _guard: conn.guard(),
    };
    (resp, Some(tunnel))
}

fn unreachable() -> Response<Body> {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "503 Service Unavailable: session owner unreachable",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut req = hyper::Request::builder().uri("/room?session=s1");
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        req.body(()).expect("request").into_parts().0
    }

    #[test]
    fn the_hop_carries_the_clients_host_and_headers_but_not_its_hop_by_hop_ones() {
        let p = parts(&[
            ("host", "chat.example"),
            ("cookie", "a=b"),
            ("connection", "Upgrade, keep-alive, x-trace"),
            ("x-trace", "hop-by-hop"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("x-wsbroker-hop", "forged"),
        ]);
        let head = hop_request_head(&p, "10.0.0.5:8080", "signed");
        assert!(head.starts_with("GET /room?session=s1 HTTP/1.1\r\nHost: chat.example\r\n"));
        assert!(head.contains("cookie: a=b\r\n"));
        assert!(head.contains("sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"));
        assert!(!head.contains("keep-alive"));
        assert!(!head.contains("x-trace"), "named by Connection: not copied");
        assert!(!head.contains("forged"));
        assert!(head.ends_with("x-wsbroker-hop: signed\r\n\r\n"));
    }

    #[test]
    fn without_a_client_host_the_hop_names_the_owner() {
        let head = hop_request_head(&parts(&[]), "10.0.0.5:8080", "signed");
        assert!(head.contains("\r\nHost: 10.0.0.5:8080\r\n"));
    }
}
