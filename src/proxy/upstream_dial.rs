//! Opening the upstream WebSocket: TCP (and TLS for wss://), the client
//! handshake written and checked by hand, and the active health probe.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::BytesMut;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;

use super::handshake::offers;
use super::io::{MaybeTls, UpstreamIo};
use super::upstream_addrs::UpstreamAddrs;
use crate::config::UpstreamUrl;
use crate::decimal::decimal_str;
use crate::tls::UpstreamTls;

/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2): 28
/// bytes of base64.
pub fn accept_key_bytes(key: &[u8]) -> [u8; 28] {
    let mut buf = [0u8; 28];
    accept_key_in(key, &mut buf);
    buf
}

/// [`accept_key_bytes`] written into `buf`, as text.
fn accept_key_in<'b>(key: &[u8], buf: &'b mut [u8; 28]) -> &'b str {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID.as_bytes());
    let n = base64::engine::general_purpose::STANDARD
        .encode_slice(sha.finalize(), buf)
        .unwrap_or(0);
    // base64 output is ASCII.
    std::str::from_utf8(&buf[..n]).unwrap_or("")
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("upstream answered {status} instead of 101")]
    Refused { status: u16 },
    #[error("bad handshake: {0}")]
    BadHandshake(&'static str),
}

impl DialError {
    /// Whether the failure says the upstream is unwell (counts towards its
    /// circuit breaker) rather than that it refused this one request.
    pub fn is_upstream_fault(&self) -> bool {
        !matches!(self, DialError::Refused { status } if (400..500).contains(status))
    }
}

/// What the broker sends upstream besides the handshake's own headers.
pub struct DialRequest<'a> {
    /// The client's path and query, e.g. `/chat?room=1`.
    pub path_and_query: &'a str,
    /// End-to-end and X-Forwarded-* header lines (already filtered and
    /// rendered, `Name: value\r\n`).
    pub headers: &'a str,
    /// The subprotocols the client offered (comma-separated), if any: the
    /// upstream may select only one of these.
    pub protocols: Option<&'a str>,
    /// Session id and epoch, sent as X-Session-Id and X-Session-Epoch.
    pub session: (&'a str, u64),
    /// The `Sec-WebSocket-Key` to send (the client's, already validated).
    pub key: &'a str,
    /// The `Sec-WebSocket-Accept` the upstream must answer with.
    pub accept: &'a [u8; 28],
}

/// An open upstream WebSocket.
pub struct UpstreamConn {
    pub io: UpstreamIo,
    /// The subprotocol the upstream selected, if any.
    pub protocol: Option<String>,
    /// Frame bytes that arrived together with the 101.
    pub leftover: BytesMut,
}

/// Connects with `connect` to the upstream's address, or to each of its
/// name's addresses in turn until one answers. Every address but the last
/// gets an equal share of `budget` (the dial's time), so one that drops
/// packets silently is passed over in time instead of using it all; the
/// last runs until the dial's own timeout.
async fn connect_each<T, F, Fut>(
    url: &UpstreamUrl,
    addrs: &UpstreamAddrs,
    budget: Duration,
    connect: F,
) -> io::Result<T>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    if let Some(addr) = url.ip {
        return connect(addr).await;
    }
    let list = addrs.get(&url.host, url.port).await?;
    let share = budget / u32::try_from(list.len()).unwrap_or(u32::MAX).max(1);
    let mut last = None;
    for (i, &addr) in list.iter().enumerate() {
        let attempt = connect(addr);
        let result = if i + 1 < list.len() {
            tokio::time::timeout(share, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no answer within this address's share of connect_timeout",
                    ))
                })
        } else {
            attempt.await
        };
        match result {
            Ok(conn) => {
                addrs.worked(addr);
                return Ok(conn);
            }
            Err(e) => last = Some(e),
        }
    }
    addrs.forget();
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")))
}

async fn connect_io(
    url: &UpstreamUrl,
    addrs: &UpstreamAddrs,
    tls: &UpstreamTls,
    budget: Duration,
) -> Result<UpstreamIo, DialError> {
    let tcp = connect_each(url, addrs, budget, TcpStream::connect)
        .await
        .map_err(DialError::Connect)?;
    let _ = tcp.set_nodelay(true);
    if !url.tls {
        return Ok(MaybeTls::Plain(tcp));
    }
    let name = ServerName::try_from(url.host.clone())
        .map_err(|_| DialError::BadHandshake("upstream host is not a valid TLS server name"))?;
    // Boxed: a TLS handshake's future is large.
    let stream = Box::pin(tls.connector().connect(name, tcp))
        .await
        .map_err(DialError::Tls)?;
    Ok(MaybeTls::Tls(Box::new(stream)))
}

/// Connects to the upstream and sends the request head `head`.
async fn open_and_send(
    url: &UpstreamUrl,
    addrs: &UpstreamAddrs,
    tls: &UpstreamTls,
    head: &[u8],
    budget: Duration,
) -> Result<UpstreamIo, DialError> {
    #[cfg(target_os = "linux")]
    if !url.tls {
        let tcp = connect_each(url, addrs, budget, |addr| connect_and_send(addr, head))
            .await
            .map_err(DialError::Connect)?;
        return Ok(MaybeTls::Plain(tcp));
    }
    let mut io = connect_io(url, addrs, tls, budget).await?;
    io.write_all(head).await.map_err(DialError::Connect)?;
    Ok(io)
}

/// Connects to a plain `ws://` upstream's address and sends `head` right
/// behind the `connect`. On loopback or a fast network the
/// connection is up by the time `connect` returns, so the request goes out
/// without a round through the I/O driver to learn that the socket is
/// writable (nor a `getsockopt` for the connect's outcome: a failed
/// connect fails the send). Otherwise the request is written once the
/// socket is writable, as on any connection. Linux only: elsewhere a send
/// during the connect may fail instead of waiting.
#[cfg(target_os = "linux")]
async fn connect_and_send(addr: SocketAddr, head: &[u8]) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    let _ = socket.set_tcp_nodelay(true);
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // MSG_NOSIGNAL: a connection already reset gives EPIPE, not SIGPIPE.
    let sent = match socket.send_with_flags(head, libc::MSG_NOSIGNAL) {
        Ok(n) => n,
        // Still connecting: written below once writable.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    let mut tcp = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    if sent < head.len() {
        tcp.write_all(&head[sent..]).await?;
    }
    Ok(tcp)
}

/// Opens the upstream WebSocket for one session within `timeout`.
pub async fn dial(
    url: &UpstreamUrl,
    addrs: &UpstreamAddrs,
    tls: &UpstreamTls,
    timeout: Duration,
    req: &DialRequest<'_>,
) -> Result<UpstreamConn, DialError> {
    tokio::time::timeout(timeout, dial_inner(url, addrs, tls, req, timeout))
        .await
        .map_err(|_| DialError::Timeout(timeout))?
}

async fn dial_inner(
    url: &UpstreamUrl,
    addrs: &UpstreamAddrs,
    tls: &UpstreamTls,
    req: &DialRequest<'_>,
    budget: Duration,
) -> Result<UpstreamConn, DialError> {
    let key = req.key;
    let (sid, epoch) = req.session;
    let mut head = String::with_capacity(
        256 + url.base_path.len()
            + req.path_and_query.len()
            + url.host_header.len()
            + req.headers.len()
            + sid.len(),
    );
    head.push_str("GET ");
    head.push_str(&url.base_path);
    if !req.path_and_query.starts_with('/') {
        head.push('/');
    }
    head.push_str(req.path_and_query);
    head.push_str(" HTTP/1.1\r\nHost: ");
    head.push_str(&url.host_header);
    head.push_str("\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ");
    head.push_str(key);
    head.push_str("\r\n");
    head.push_str(req.headers);
    head.push_str("X-Session-Id: ");
    head.push_str(sid);
    head.push_str("\r\nX-Session-Epoch: ");
    head.push_str(decimal_str(epoch, &mut [0u8; 20]));
    head.push_str("\r\n\r\n");
    let mut io = open_and_send(url, addrs, tls, head.as_bytes(), budget).await?;

    let mut buf = BytesMut::with_capacity(1024);
    let head_len = loop {
        if let Some(i) = find_head_end(&buf) {
            break i;
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(DialError::BadHandshake("response head too large"));
        }
        let n = io.read_buf(&mut buf).await.map_err(DialError::Connect)?;
        if n == 0 {
            return Err(DialError::BadHandshake(
                "connection closed during the handshake",
            ));
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(DialError::BadHandshake("malformed response head")),
    }
    let status = resp.code.unwrap_or(0);
    if status != 101 {
        return Err(DialError::Refused { status });
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err(DialError::BadHandshake("missing Upgrade: websocket"));
    }
    if header("sec-websocket-accept").map(str::as_bytes) != Some(&req.accept[..]) {
        return Err(DialError::BadHandshake("wrong Sec-WebSocket-Accept"));
    }
    if header("sec-websocket-extensions").is_some_and(|v| !v.is_empty()) {
        return Err(DialError::BadHandshake(
            "upstream negotiated an extension it was not offered",
        ));
    }
    let protocol = header("sec-websocket-protocol").map(str::to_string);
    if let Some(p) = &protocol {
        if !offers(req.protocols.unwrap_or(""), p) {
            return Err(DialError::BadHandshake(
                "upstream selected a subprotocol it was not offered",
            ));
        }
    }
    // Frames right behind the 101 are rare: copied out, so the read
    // buffer goes back now.
    let leftover = match &buf[head_len..] {
        [] => BytesMut::new(),
        rest => BytesMut::from(rest),
    };
    Ok(UpstreamConn {
        io,
        protocol,
        leftover,
    })
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Active health probe: TCP connect, plus the TLS handshake for wss://.
pub async fn probe(
    url: &UpstreamUrl,
    addrs: &UpstreamAddrs,
    tls: &UpstreamTls,
    timeout: Duration,
) -> bool {
    matches!(
        tokio::time::timeout(timeout, connect_io(url, addrs, tls, timeout)).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(
            &accept_key_bytes(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn only_client_errors_spare_the_breaker() {
        assert!(!DialError::Refused { status: 403 }.is_upstream_fault());
        assert!(DialError::Refused { status: 503 }.is_upstream_fault());
        assert!(DialError::Timeout(Duration::from_secs(1)).is_upstream_fault());
    }

    /// A listener whose accept queue is full, so further connects get no
    /// answer (Linux drops their SYNs): an address that drops packets. The
    /// connections that fill it are returned to be held.
    fn silent_address() -> (socket2::Socket, Vec<std::net::TcpStream>, SocketAddr) {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("literal");
        listener.bind(&any.into()).expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener
            .local_addr()
            .expect("local address")
            .as_socket()
            .expect("an IP address");
        let mut held = Vec::new();
        for _ in 0..8 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(c) => held.push(c),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return (listener, held, addr),
                Err(e) => panic!("filling the accept queue: {e}"),
            }
        }
        panic!("the accept queue never filled");
    }

    #[tokio::test]
    async fn an_address_that_never_answers_is_passed_over_within_the_connect_timeout() {
        let (_silent, _held, silent) = silent_address();
        let live = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let live_addr = live.local_addr().expect("local address");
        let url = UpstreamUrl::parse("ws://upstream.test:9").expect("url");
        let addrs = UpstreamAddrs::kept_since(std::time::Instant::now(), vec![silent, live_addr]);
        let budget = Duration::from_secs(2);
        let started = std::time::Instant::now();
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            connect_each(&url, &addrs, budget, TcpStream::connect),
        )
        .await
        .expect("the silent address held the dial past its share")
        .expect("the second address answers");
        assert_eq!(conn.peer_addr().expect("peer"), live_addr);
        assert!(
            started.elapsed() < budget,
            "took {:?}, more than the connect timeout",
            started.elapsed()
        );
        let kept = addrs.get("upstream.test", 9).await.expect("kept");
        assert_eq!(kept[0], live_addr, "the address that answered goes first");
    }
}
