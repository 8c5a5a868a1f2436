//! The public listener: accepts connections under `max_connections`,
//! terminates TLS, and reads the request head with `handshake_timeout` and
//! `max_header_bytes` enforced. A complete WebSocket upgrade request is
//! answered here directly (the hot path: no HTTP machinery between the
//! head and the session); anything else — `/health`, `/live`, the internal
//! API, malformed or oversized heads — goes to hyper with the bytes
//! already read.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::client_reader::ReaderStart;
use super::conn_slot::ConnLimit;
use super::handshake::{self, After, Answer, Body, ConnInfo};
use super::io::{ClientConn, MaybeTls, Prefixed, PublicStream};
use crate::broker::Broker;

/// Connections over the limit that may be answered 503 at the same time;
/// past that they are closed unanswered.
const MAX_OVERLOAD_REPLIES: usize = 256;

/// Accepts connections until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) {
    let limit = ConnLimit::new(
        broker.config.limits.max_connections,
        broker.metrics.connections_active.clone(),
    );
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
        // On Linux the listener's TCP_NODELAY is inherited (see `server::bind`).
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        match limit.try_take() {
            Some(slot) => {
                let info = Arc::new(ConnInfo {
                    peer,
                    tls: tls.is_some(),
                    slot,
                });
                // The handshake's state is boxed and freed once answered; a
                // new session's first client is then read on this same task
                // (which stays small).
                let conn = Box::pin(serve_connection(stream, info, broker.clone(), tls.clone()));
                broker.tasks.spawn(async move {
                    if let Some(reader) = conn.await {
                        reader.run().await;
                    }
                });
            }
            None => {
                if let Ok(permit) = overload.clone().try_acquire_owned() {
                    broker
                        .tasks
                        .spawn(reject_overloaded(stream, tls.clone(), permit));
                }
            }
        }
    }
}

/// Serves one connection up to the end of its handshake; returns the
/// reader of a new session's first client, to run on the same task.
async fn serve_connection(
    stream: TcpStream,
    info: Arc<ConnInfo>,
    broker: Arc<Broker>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Option<ReaderStart> {
    let limits = &broker.config.limits;
    let io: PublicStream = match tls {
        None => MaybeTls::Plain(stream),
        Some(acceptor) => {
            // Boxed: a TLS handshake's future is large.
            let accept = Box::pin(acceptor.accept(stream));
            match tokio::time::timeout(limits.handshake_timeout, accept).await {
                Ok(Ok(s)) => MaybeTls::Tls(Box::new(s)),
                Ok(Err(e)) => {
                    tracing::debug!(peer = %info.peer, error = %e, "TLS handshake failed");
                    return None;
                }
                Err(_) => return None,
            }
        }
    };
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    let mut io = io;
    let mut buf = BytesMut::with_capacity(1024);
    let head = tokio::select! {
        h = tokio::time::timeout_at(deadline, read_head(&mut io, &mut buf, limits.max_header_bytes)) => h,
        _ = broker.shutdown.cancelled() => return None,
    };
    match head {
        // Slow, incomplete or closed: dropped.
        Err(_) | Ok(Head::Gone) => None,
        Ok(Head::Upgrade { parts, len }) => {
            // Frames right behind the request are rare: copied out, so the
            // head buffer goes back now.
            let leftover = match &buf[len..] {
                [] => Bytes::new(),
                rest => Bytes::copy_from_slice(rest),
            };
            drop(buf);
            answer_upgrade(io, *parts, leftover, info, broker).await
        }
        Ok(Head::Refuse(status, reason)) => {
            let response = handshake::text(status, reason);
            let write = write_response(&mut io, response, false);
            if let Ok(Ok(())) = tokio::time::timeout_at(deadline, write).await {
                close_after_answer(&mut io).await;
            }
            None
        }
        // Boxed: hyper's connection future is large; upgrades never need it.
        Ok(Head::Other) => {
            Box::pin(serve_http(Prefixed::new(buf.freeze(), io), info, broker)).await;
            None
        }
    }
}

/// What the first bytes of a connection hold.
enum Head {
    /// A complete WebSocket upgrade request, `len` bytes long.
    Upgrade { parts: Box<Parts>, len: usize },
    /// Anything else (hyper answers it, limits and errors included).
    Other,
    /// The peer closed or failed before a request head.
    Gone,
    /// A head that is malformed or over `max_header_bytes`: answered here
    /// with this status and short reason (hyper would send no reason).
    Refuse(StatusCode, &'static str),
}

impl Head {
    fn too_large() -> Head {
        Head::Refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "431 Request Header Fields Too Large: the request head is over max_header_bytes",
        )
    }
}

/// Most headers an upgrade request may have to be answered here (more go
/// to hyper).
const MAX_FAST_HEADERS: usize = 64;

async fn read_head(io: &mut PublicStream, buf: &mut BytesMut, limit: usize) -> Head {
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_FAST_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(len)) if len > limit => return Head::too_large(),
                Ok(httparse::Status::Complete(len)) => {
                    // One copy of the head; the path and every header value
                    // are views into it.
                    let head = Bytes::copy_from_slice(&buf[..len]);
                    return match upgrade_parts(&req, buf, &head) {
                        Some(parts) => Head::Upgrade { parts, len },
                        None => Head::Other,
                    };
                }
                Ok(httparse::Status::Partial) => {}
                // More headers than the fast path reads: hyper's limit is higher.
                Err(httparse::Error::TooManyHeaders) => return Head::Other,
                Err(_) => {
                    return Head::Refuse(
                        StatusCode::BAD_REQUEST,
                        "400 Bad Request: malformed request head",
                    )
                }
            }
        }
        if buf.len() >= limit {
            return Head::too_large();
        }
        buf.reserve(1024);
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return Head::Gone,
            Ok(_) => {}
        }
    }
}

/// The request as `Parts` when it is an HTTP/1.1 upgrade request. `req`
/// was parsed from `buf`; `head` is a copy of its head, which the path and
/// header values share instead of each being copied.
fn upgrade_parts(req: &httparse::Request<'_, '_>, buf: &[u8], head: &Bytes) -> Option<Box<Parts>> {
    if req.version != Some(1) {
        return None;
    }
    // httparse returns slices of its input, inside the head; checked anyway.
    let base = buf.as_ptr() as usize;
    let shared = |s: &[u8]| {
        let at = (s.as_ptr() as usize).checked_sub(base)?;
        (at + s.len() <= head.len()).then(|| head.slice(at..at + s.len()))
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        headers.append(
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_maybe_shared(shared(h.value)?).ok()?,
        );
    }
    if !handshake::is_upgrade(&headers) {
        return None;
    }
    let (mut parts, ()) = hyper::Request::new(()).into_parts();
    parts.method = hyper::Method::from_bytes(req.method?.as_bytes()).ok()?;
    parts.uri = hyper::Uri::from_maybe_shared(shared(req.path?.as_bytes())?).ok()?;
    parts.headers = headers;
    Some(Box::new(parts))
}

/// Answers an upgrade request read by the listener, then hands the client
/// to its session (or to the tunnel to its owner) on this same task. A new
/// session's first client comes back as a reader for this task to run.
async fn answer_upgrade(
    mut io: PublicStream,
    parts: Parts,
    leftover: Bytes,
    info: Arc<ConnInfo>,
    broker: Arc<Broker>,
) -> Option<ReaderStart> {
    let (answer, after) = handshake::upgrade(parts, &info, &broker).await;
    // On failure `after` is dropped: a created session's driver then starts
    // without a client and waits for one to resume.
    // Bounded: until the answer is written a created session's driver is
    // not running (no timers of its own).
    let limit = broker.config.limits.handshake_timeout;
    let written = match answer {
        Answer::Switching(s) => tokio::time::timeout(limit, io.write_all(&s.head())).await,
        Answer::Response(response) => {
            let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            tokio::time::timeout(limit, write_response(&mut io, response, upgraded)).await
        }
    };
    written.ok()?.ok()?;
    match after {
        After::Attach {
            reservation,
            driver,
        } => {
            let client = ClientConn::from_stream(io, leftover);
            let guard = info.guard();
            match driver {
                Some(driver) => driver.start_with(reservation, client, guard),
                None => {
                    reservation.attach(client, guard).await;
                    None
                }
            }
        }
        // Boxed: the rarer path.
        After::Tunnel(tunnel) => {
            Box::pin(tunnel.run(ClientConn::from_stream(io, leftover))).await;
            None
        }
        After::Nothing => {
            close_after_answer(&mut io).await;
            None
        }
    }
}

/// After an error answer: close, letting the answer reach the client
/// (its unread input would otherwise turn the close into a reset).
async fn close_after_answer(io: &mut PublicStream) {
    let _ = io.shutdown().await;
    super::client_reader::linger(io).await;
}

/// Writes a response head and body; non-101 answers close the connection.
async fn write_response(
    io: &mut PublicStream,
    response: Response<Body>,
    upgraded: bool,
) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(never) => match never {},
    };
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !upgraded {
        out.extend_from_slice(
            format!("content-length: {}\r\nconnection: close\r\n", body.len()).as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    io.write_all(&out).await
}

/// Serves a connection through hyper (everything but upgrades answered
/// above).
async fn serve_http(io: Prefixed<PublicStream>, info: Arc<ConnInfo>, broker: Arc<Broker>) {
    let limits = &broker.config.limits;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected client socket and the server's side of it.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    /// A head that completes only past the limit is refused with 431, even
    /// when the read that completes it started under the limit.
    #[tokio::test]
    async fn a_head_completing_past_the_limit_is_refused_with_431() {
        let (mut client, server) = socket_pair().await;
        let limit = 8 * 1024;
        let head = format!(
            "GET /?session=edge HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Pad: {}\r\n\r\n",
            "x".repeat(limit)
        );
        let (first, rest) = head.as_bytes().split_at(limit - 500);
        client.write_all(first).await.expect("write");
        let reader = tokio::spawn(async move {
            let mut io: PublicStream = MaybeTls::Plain(server);
            let mut buf = BytesMut::new();
            let head = read_head(&mut io, &mut buf, limit).await;
            matches!(
                head,
                Head::Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, _)
            )
        });
        tokio::task::yield_now().await;
        client.write_all(rest).await.expect("write");
        let refused = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("read_head returns")
            .expect("task");
        assert!(refused, "a head over the limit is refused with 431");
    }

    #[tokio::test]
    async fn an_upgrade_head_under_the_limit_is_answered_here() {
        let (mut client, server) = socket_pair().await;
        client
            .write_all(b"GET /?session=ok HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nEXTRA")
            .await
            .expect("write");
        let mut io: PublicStream = MaybeTls::Plain(server);
        let mut buf = BytesMut::new();
        let head = read_head(&mut io, &mut buf, 8192).await;
        let Head::Upgrade { parts, len } = head else {
            panic!("an upgrade request is answered by the listener");
        };
        assert_eq!(parts.uri.query(), Some("session=ok"));
        assert_eq!(parts.uri.path(), "/");
        assert_eq!(
            parts.headers.get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            parts.headers.get("host").map(|v| v.as_bytes()),
            Some(&b"a"[..])
        );
        assert_eq!(&buf[len..], b"EXTRA", "bytes past the head are kept");
    }
}
